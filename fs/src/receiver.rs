//! The secondary's receiver: accepts one authenticated primary at a time and applies
//! its ordered operation stream to the replicated directory.
//!
//! The stream has two kinds of entries under one sequence (and one ack stream):
//! replicated mutations (`Message::Op`), replayed with `apply` exactly as the primary
//! applied them, and a sync's instructions to this side (`Message::Control`: wipe,
//! remove, compare blocks, sync all, in sync), which only the receiver carries out.
//!
//! Connections are accepted and authenticated by one thread (`preauth`): a bounded
//! number at a time, each with one total handshake deadline, rejections logged at
//! most once per second per kind. Only an authenticated primary gets a thread (and
//! its session's fsync workers). The handshake binds the module and port: a primary
//! meant for another module's directory is refused as "wrong module".
//!
//! A `SyncAll` (a resync's durability point, a checkpoint, the drain at a stop)
//! syncs what the session changed before it ([`crate::syncset`]: the files and
//! directories its operations touched, `syncfs` only where those cannot be
//! named; never the whole filesystem for another program's data). With more of
//! the stream already received it is synced by those workers too, so applying
//! goes on while the disk flushes; the acknowledgements of everything before it
//! are sent first, and its batch waits for every earlier one, so its own
//! acknowledgement still means "all before me applied, succeeded and on disk".
//! The last `SyncAll` of a resync (nothing more received) is synced in line,
//! under the keepalive.
//!
//! A connection that fails authentication, speaks garbage or sends a frame that does
//! not decode (including names that would leave the directory) is logged and
//! dropped; nothing of that frame is applied and the current primary's session goes
//! on.
//!
//! Some operations are long by nature: saving a split brain's data aside (a whole
//! tree copied and synced), removing a tree of 100,000 files, a wipe, a `syncfs`.
//! Without acknowledgements for longer than its lock timeout the writer would take
//! the peer for stalled and give up on it, so while one of these has run for more
//! than [`KEEPALIVE_INTERVAL`] the session's keepalive thread sends a `Ping` every
//! interval. The writer counts a receiver's `Ping` as progress only: it completes
//! nothing (only `Acks` do). The pings stop after [`KEEPALIVE_LIMIT`] on one
//! operation, so a receiver whose disk hangs is still given up on.

use std::collections::{HashMap, HashSet};
use std::io::{BufReader, BufWriter};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver as ChannelRx;
use parking_lot::{Condvar, Mutex};
use rustix::fs::{FileType, OFlags};

use crate::apply::{self, Applied, Errno, NodeTable};
use crate::aside::SaveAside;
use crate::compare;
use crate::key::ClusterKey;
use crate::op::{Control, NodeId, Op, Request, ROOT};
use crate::preauth::{self, Limits};
use crate::presync::{self, Pattern};
use crate::refusal::Refusal;
use crate::spin::Spinner;
use crate::syncset::{Batch, SyncSet};
use crate::track::Tracker;
use crate::wire::{
    self, Ack, Binding, FrameReader, FrameWriter, Message, SessionKeys, TimedAck, WireError,
};
use crate::writeback::{self, Writeback, Written};

/// How long the receiver waits for a frame before it considers the primary gone.
/// The primary pings every second when idle.
const SESSION_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an authenticated primary has to send its claim.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(5);
const FSYNC_WORKERS: usize = 4;
/// Written bytes from which the writeback hint goes to its own thread.
const WRITEBACK_HANDOFF_BYTES: usize = 256 << 10;

/// How often a long operation is announced to the writer (well below its default
/// lock timeout of 5 s).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// The longest one operation is kept alive; past it the writer's lock timeout
/// decides (a hung disk must not hold the writer forever).
pub const KEEPALIVE_LIMIT: Duration = Duration::from_secs(15 * 60);

/// Errors starting the receiver.
#[derive(Debug, thiserror::Error)]
pub enum ReceiverError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot open backing directory: {0}")]
    Backing(std::io::Error),
    #[error("module name: {0}")]
    Module(WireError),
}

#[derive(Debug)]
struct Entry {
    path: Arc<OwnedFd>,
    data: Mutex<Option<Arc<OwnedFd>>>,
}

/// The receiver's map from the primary's node ids to its own descriptors.
#[derive(Debug)]
struct SessionTable {
    nodes: Mutex<HashMap<NodeId, Arc<Entry>>>,
    /// The nodes changed since the last `SyncAll` (what it syncs; its first
    /// one syncs the whole filesystem: an earlier session's changes are not in it).
    changed: Arc<SyncSet>,
}

impl SessionTable {
    fn new(root: Arc<OwnedFd>) -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Arc::new(Entry {
                path: root,
                data: Mutex::new(None),
            }),
        );
        Self {
            nodes: Mutex::new(nodes),
            changed: Arc::new(SyncSet::new()),
        }
    }

    /// `op` was applied (or tried): the nodes it changed go to the next `SyncAll`.
    fn note_changed(&self, op: &Op) {
        let created = crate::syncset::created_node(op);
        for id in crate::syncset::changed_nodes(op).into_iter().chain(created) {
            match self.path_fd(id) {
                Ok(fd) => self.changed.add(&fd),
                // Unknown here (the op failed): sync everything, never less.
                Err(_) => self.changed.add_whole(),
            }
        }
    }

    fn entry(&self, id: NodeId) -> Result<Arc<Entry>, Errno> {
        // An id the primary never bound is a protocol error on its side, or a
        // divergence: report it, never guess.
        self.nodes.lock().get(&id).cloned().ok_or(Errno::STALE)
    }
}

impl NodeTable for SessionTable {
    fn path_fd(&self, id: NodeId) -> Result<Arc<OwnedFd>, Errno> {
        Ok(self.entry(id)?.path.clone())
    }

    fn data_fd(&self, id: NodeId) -> Result<Arc<OwnedFd>, Errno> {
        let entry = self.entry(id)?;
        let mut data = entry.data.lock();
        if let Some(fd) = data.as_ref() {
            return Ok(fd.clone());
        }
        let st = rustix::fs::fstat(entry.path.as_fd())?;
        let flags = match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile => OFlags::RDWR,
            FileType::Directory => OFlags::RDONLY | OFlags::DIRECTORY,
            _ => return Err(Errno::INVAL),
        };
        let fd = Arc::new(apply::reopen(entry.path.as_fd(), flags)?);
        *data = Some(fd.clone());
        Ok(fd)
    }

    fn bind(&self, id: NodeId, fd: OwnedFd) -> Result<(), Errno> {
        let entry = Arc::new(Entry {
            path: Arc::new(fd),
            data: Mutex::new(None),
        });
        self.nodes.lock().insert(id, entry);
        Ok(())
    }

    fn forget(&self, id: NodeId) {
        if id != ROOT {
            self.nodes.lock().remove(&id);
        }
    }
}

impl SessionTable {
    /// Full sync: empty the directory and forget every id but the root's.
    /// Removes `parent/name` (recursively), forgetting the ids bound beneath.
    fn remove(&self, parent: NodeId, name: &crate::op::Name) -> Result<(), Errno> {
        let dir = self.path_fd(parent)?;
        let child = match apply::lookup_beneath(dir.as_fd(), name) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(()),
            Err(e) => return Err(e),
        };
        let st = rustix::fs::fstat(child.as_fd())?;
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            apply::remove_beneath(child.as_fd())?;
            rustix::fs::unlinkat(
                dir.as_fd(),
                name.as_os_str(),
                rustix::fs::AtFlags::REMOVEDIR,
            )
        } else {
            rustix::fs::unlinkat(dir.as_fd(), name.as_os_str(), rustix::fs::AtFlags::empty())
        }
    }

    fn wipe(&self) -> Result<(), Errno> {
        let root = self.path_fd(ROOT)?;
        self.nodes.lock().retain(|id, _| *id == ROOT);
        apply::remove_beneath(root.as_fd())
    }
}

/// A listening receiver for one replicated directory.
#[derive(Debug)]
pub struct ReceiverServer {
    listener: TcpListener,
    root: Arc<OwnedFd>,
    key: ClusterKey,
    /// The module and port this receiver serves (checked in the handshake).
    binding: Binding,
    limits: Limits,
    busy: Arc<AtomicBool>,
    /// [`crate::status::monotonic_ms`] of the last frame from a writer (0: never).
    heard: Arc<AtomicU64>,
    /// Fencing: when set, only a primary claiming this data generation is served.
    accept_generation: Option<String>,
    /// This node's records of what its copy may lack (reported to a writer that
    /// attaches; reset when the copy is replaced or declared identical).
    tracker: Option<Arc<Tracker>>,
    /// Split-brain loser: save what the next resync overwrites (see `aside`).
    save_aside: Option<Arc<AsidePolicy>>,
}

/// Where a split-brain loser saves its diverged data, until one resync finished.
#[derive(Debug)]
pub struct AsidePolicy {
    state: std::path::PathBuf,
    done: AtomicBool,
}

impl ReceiverServer {
    /// Binds the listening socket for the directory of `module` served on this
    /// port. `root` is the directory descriptor, opened before the directory was
    /// made read-only for everyone else.
    pub fn bind(
        addr: SocketAddr,
        root: OwnedFd,
        key: ClusterKey,
        module: &str,
    ) -> Result<Self, ReceiverError> {
        let listener =
            TcpListener::bind(addr).map_err(|source| ReceiverError::Listen { addr, source })?;
        let port = listener
            .local_addr()
            .map_err(|source| ReceiverError::Listen { addr, source })?
            .port();
        Ok(Self {
            listener,
            root: Arc::new(root),
            key,
            binding: Binding::new(module, port).map_err(ReceiverError::Module)?,
            limits: Limits::default(),
            busy: Arc::new(AtomicBool::new(false)),
            heard: Arc::new(AtomicU64::new(0)),
            accept_generation: None,
            tracker: None,
            save_aside: None,
        })
    }

    /// Before the next resync overwrites or removes anything here, save it under
    /// `state/diverged/` (this node lost a split brain).
    pub fn save_aside_to(mut self, state: std::path::PathBuf) -> Self {
        self.save_aside = Some(Arc::new(AsidePolicy {
            state,
            done: AtomicBool::new(false),
        }));
        self
    }

    /// Report this node's records to attaching writers and keep them current.
    pub fn with_tracker(mut self, tracker: Arc<Tracker>) -> Self {
        self.tracker = Some(tracker);
        self
    }

    /// Serve only a primary that claims `generation` (its controller's current data
    /// generation): a writer that was frozen past a failover and wakes up with an
    /// older one is refused before it can change anything.
    pub fn accept_only_generation(mut self, generation: Option<String>) -> Self {
        self.accept_generation = generation;
        self
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// When a writer was last heard and whether its session is open (what the
    /// secondary publishes in `heard.json`).
    pub fn writer_heard(&self) -> WriterHeardProbe {
        WriterHeardProbe {
            busy: self.busy.clone(),
            heard: self.heard.clone(),
        }
    }

    /// Serves connections until `stop` becomes true.
    pub fn serve(&self, stop: &AtomicBool) -> std::io::Result<()> {
        preauth::serve(
            &self.listener,
            &self.key,
            &self.binding,
            self.limits,
            stop,
            |stream, peer, keys| {
                let conn = Connection {
                    root: self.root.clone(),
                    busy: self.busy.clone(),
                    heard: self.heard.clone(),
                    accept_generation: self.accept_generation.clone(),
                    tracker: self.tracker.clone(),
                    aside: self.save_aside.clone(),
                };
                let spawned = std::thread::Builder::new()
                    .name(format!("recv-{peer}"))
                    .spawn(move || handle_connection(stream, peer, keys, conn));
                if let Err(e) = spawned {
                    tracing::error!(%peer, "cannot start connection thread: {e}");
                }
            },
        )
    }
}

/// A view of the receiver's session for `heard.json`.
#[derive(Debug, Clone)]
pub struct WriterHeardProbe {
    busy: Arc<AtomicBool>,
    heard: Arc<AtomicU64>,
}

impl WriterHeardProbe {
    pub fn now(&self) -> crate::status::WriterHeard {
        crate::status::WriterHeard {
            connected: self.busy.load(Ordering::SeqCst),
            last_frame_ms: self.heard.load(Ordering::Relaxed),
        }
    }
}

/// Releases the single-session slot when the session ends, however it ends.
struct SessionSlot(Arc<AtomicBool>);

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// What one connection needs from the server.
struct Connection {
    root: Arc<OwnedFd>,
    busy: Arc<AtomicBool>,
    heard: Arc<AtomicU64>,
    accept_generation: Option<String>,
    tracker: Option<Arc<Tracker>>,
    aside: Option<Arc<AsidePolicy>>,
}

fn handle_connection(stream: TcpStream, peer: SocketAddr, keys: SessionKeys, conn: Connection) {
    let Connection {
        root,
        busy,
        heard,
        accept_generation,
        tracker,
        aside,
    } = conn;
    let accept_generation = accept_generation.as_deref();
    let _ = stream.set_read_timeout(Some(CLAIM_TIMEOUT));
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let mut writer = FrameWriter::for_session(BufWriter::with_capacity(1 << 16, write_half), &keys);
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    // Small enough that most of a large write payload bypasses it and lands in
    // its own (aligned, recycled) buffer without an extra copy: what the buffer
    // read ahead of a frame's data is copied once more (at most 64 KiB of each
    // 1 MiB write; 256 KiB before). Still a dozen 4 KiB writes per read.
    let mut reader = FrameReader::for_session(BufReader::with_capacity(64 << 10, read_half), &keys);
    let claimed = match reader.recv() {
        Ok(Message::Claim { generation }) => generation,
        Ok(other) => {
            tracing::warn!(%peer, "dropped primary: first frame {other:?}, expected Claim");
            return;
        }
        Err(e) => {
            tracing::warn!(%peer, "dropped primary before its claim: {e}");
            return;
        }
    };
    // Protocol 6 on: this side names its software before anything else.
    if keys.version >= wire::SOFTWARE_SINCE {
        let software = Message::Software {
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        if let Err(e) = writer.send(&software) {
            tracing::warn!(%peer, "session ended before it started: {e}");
            return;
        }
    }
    if let Some(current) = accept_generation {
        if claimed.as_deref() != Some(current) {
            tracing::warn!(%peer, ?claimed, current, "refused a stale writer (fenced by generation)");
            let refusal = Message::Refused {
                reason: Refusal::StaleWriter {
                    claimed: claimed.clone(),
                    current: current.to_string(),
                }
                .to_string(),
            };
            let _ = writer.send(&refusal).and_then(|()| writer.flush());
            return;
        }
    }
    if busy.swap(true, Ordering::SeqCst) {
        tracing::warn!(%peer, "refused a second primary while one is connected");
        let refusal = Message::Refused {
            reason: Refusal::Busy.to_string(),
        };
        let _ = writer.send(&refusal).and_then(|()| writer.flush());
        return;
    }
    let _slot = SessionSlot(busy);
    if let Err(e) = welcome(&mut writer, tracker.as_deref(), &root) {
        tracing::warn!(%peer, "session ended before it started: {e}");
        return;
    }
    tracing::info!(%peer, ?claimed, protocol = keys.version, "primary connected (replication protocol {})", keys.version);
    heard.store(crate::status::monotonic_ms(), Ordering::Relaxed);
    let _ = stream.set_read_timeout(Some(SESSION_IDLE_TIMEOUT));
    match run_session(reader, writer, root, tracker, aside, &heard, keys.version) {
        Ok(()) => tracing::info!(%peer, "primary disconnected"),
        Err(e) => tracing::warn!(%peer, "dropped primary session: {e}"),
    }
}

/// What stopped a streamed report.
enum ReportError {
    /// Listing the copy failed: the report is incomplete (the writer is told).
    Walk(Errno),
    /// The connection failed.
    Send(WireError),
}

impl From<Errno> for ReportError {
    fn from(e: Errno) -> Self {
        ReportError::Walk(e)
    }
}

/// Accepts the primary: `Welcome`, then (with records) the report on this copy,
/// streamed part by part as the tree is walked, so neither its size nor the
/// number of files is limited by a frame or by memory.
fn welcome(
    writer: &mut FrameWriter<BufWriter<TcpStream>>,
    tracker: Option<&Tracker>,
    root: &OwnedFd,
) -> Result<(), WireError> {
    let Some(tracker) = tracker else {
        writer.send(&Message::Welcome { report: false })?;
        return writer.flush();
    };
    writer.send(&Message::Welcome { report: true })?;
    let mut entries = 0u64;
    let walked = tracker.report_each(root.as_fd(), |part| {
        entries += part.entries.len() as u64;
        writer
            .send(&Message::ReportPart(part))
            .and_then(|()| writer.flush())
            .map_err(ReportError::Send)
    });
    let end = match walked {
        Ok(valid) => Message::ReportEnd {
            valid,
            complete: true,
            entries,
        },
        Err(ReportError::Walk(e)) => {
            // Without a report the writer compares everything: slower, never wrong.
            tracing::warn!("cannot report on this copy: {e}");
            Message::ReportEnd {
                valid: false,
                complete: false,
                entries,
            }
        }
        Err(ReportError::Send(e)) => return Err(e),
    };
    tracing::info!(entries, "reported on this copy");
    writer.send(&end)?;
    writer.flush()
}

type SharedWriter = Arc<Mutex<FrameWriter<BufWriter<TcpStream>>>>;

/// What the keepalive thread watches.
#[derive(Default)]
struct KeepaliveState {
    /// When the long operation running now began.
    busy_since: Option<Instant>,
    stop: bool,
}

/// Pings the writer while one long operation runs (see the module docs).
struct Keepalive {
    state: Arc<(Mutex<KeepaliveState>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Marks a long operation for as long as it lives.
struct Busy<'a>(Option<&'a Keepalive>);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        if let Some(k) = self.0 {
            k.state.0.lock().busy_since = None;
        }
    }
}

impl Keepalive {
    fn start(writer: SharedWriter) -> std::io::Result<Keepalive> {
        let state: Arc<(Mutex<KeepaliveState>, Condvar)> = Arc::default();
        let watched = state.clone();
        let thread = std::thread::Builder::new()
            .name("recv-keepalive".into())
            .spawn(move || keepalive_loop(&watched, &writer))?;
        Ok(Keepalive {
            state,
            thread: Some(thread),
        })
    }

    /// Starts a long operation (ends when the guard drops).
    fn busy(&self) -> Busy<'_> {
        self.state.0.lock().busy_since = Some(Instant::now());
        self.state.1.notify_one();
        Busy(Some(self))
    }
}

impl Drop for Keepalive {
    fn drop(&mut self) {
        self.state.0.lock().stop = true;
        self.state.1.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn keepalive_loop(state: &(Mutex<KeepaliveState>, Condvar), writer: &SharedWriter) {
    let (lock, changed) = state;
    let mut last_ping: Option<(Instant, Instant)> = None;
    let mut s = lock.lock();
    loop {
        if s.stop {
            return;
        }
        let Some(since) = s.busy_since else {
            // Idle: sleep until an operation starts.
            changed.wait(&mut s);
            continue;
        };
        let running = since.elapsed();
        let pinged = last_ping
            .filter(|(op, _)| *op == since)
            .map(|(_, at)| at.elapsed());
        if running > KEEPALIVE_LIMIT {
            changed.wait(&mut s);
            continue;
        }
        let due = match pinged {
            Some(ago) => KEEPALIVE_INTERVAL.saturating_sub(ago),
            None => KEEPALIVE_INTERVAL.saturating_sub(running),
        };
        if !due.is_zero() {
            changed.wait_for(&mut s, due);
            continue;
        }
        last_ping = Some((since, Instant::now()));
        drop(s);
        tracing::debug!(
            running_ms = u64::try_from(running.as_millis()).unwrap_or(u64::MAX),
            "long operation: keepalive ping"
        );
        {
            let mut w = writer.lock();
            // A failed send ends the session on the main thread's next send or read.
            let _ = w.send(&Message::Ping).and_then(|()| w.flush());
        }
        s = lock.lock();
    }
}

/// Acks owed to the primary, sent when the input runs dry or the batch grows.
struct AckBatch {
    acks: Vec<TimedAck>,
    bytes: usize,
    /// The writer speaks protocol 8: acks carry the time spent (`TimedAcks`).
    timed: bool,
}

impl AckBatch {
    const MAX_ACKS: usize = 256;
    const MAX_BYTES: usize = 1 << 20;

    fn send(&mut self, writer: &SharedWriter) -> Result<(), WireError> {
        if self.acks.is_empty() {
            return Ok(());
        }
        let acks = std::mem::take(&mut self.acks);
        self.bytes = 0;
        let mut w = writer.lock();
        w.send(&acks_message(acks, self.timed))?;
        w.flush()
    }
}

fn run_session(
    mut reader: FrameReader<BufReader<TcpStream>>,
    writer: FrameWriter<BufWriter<TcpStream>>,
    root: Arc<OwnedFd>,
    tracker: Option<Arc<Tracker>>,
    aside_policy: Option<Arc<AsidePolicy>>,
    heard: &AtomicU64,
    version: u16,
) -> Result<(), WireError> {
    let timed = version >= wire::TIMED_ACKS_SINCE;
    let tells_syncs = version >= wire::SYNCED_SINCE;
    let mut early = EarlySyncs::default();
    let mut spinner = Spinner::new();
    // Whether the next operation is polled for (see below), frames read since
    // the input was last drained, and whether the last one was an fsync.
    let (mut poll_next, mut reads, mut last_was_sync) = (false, 0u32, false);
    let mut aside: Option<SaveAside> = None;
    // Files this session created: they hold nothing of this node's, so writes
    // to them (a resync filling a file new here) are not saved aside.
    let mut created: HashSet<NodeId> = HashSet::new();
    let table = Arc::new(SessionTable::new(root));
    // What earlier sessions left unsynced, synced meanwhile: the session's
    // `SyncAll`s then sync only what it changes.
    if let Ok(fd) = table.data_fd(ROOT) {
        table.changed.start_baseline(fd);
    }
    let writer: SharedWriter = Arc::new(Mutex::new(writer));
    let (sync_tx, sync_rx) = crossbeam_channel::unbounded::<SyncJob>();
    let mut threads = Vec::new();
    for _ in 0..FSYNC_WORKERS {
        let rx = sync_rx.clone();
        let w = writer.clone();
        threads.push(
            std::thread::Builder::new()
                .name("recv-fsync".into())
                .spawn(move || fsync_loop(rx, w, timed))?,
        );
    }
    drop(sync_rx);
    let keepalive = Keepalive::start(writer.clone())?;
    // Large writebacks are started by their own thread (see `Writeback::start`).
    let (writeback_tx, writeback_rx) = crossbeam_channel::unbounded::<Vec<Written>>();
    threads.push(
        std::thread::Builder::new()
            .name("recv-writeback".into())
            .spawn(move || {
                use crossbeam_channel::RecvTimeoutError;
                let mut started = Writeback::default();
                loop {
                    // Holding ranges, the thread wakes once more to drop them
                    // when no batch follows (the end of a stream, a resync).
                    let next = if started.holds() {
                        writeback_rx.recv_timeout(writeback::Flusher::DROP_AFTER)
                    } else {
                        writeback_rx
                            .recv()
                            .map_err(|_| RecvTimeoutError::Disconnected)
                    };
                    match next {
                        Ok(mut batch) => started.start(&mut batch),
                        Err(RecvTimeoutError::Timeout) => started.drop_all(),
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
                started.drop_all();
            })?,
    );

    let mut batch = AckBatch {
        acks: Vec::new(),
        bytes: 0,
        timed,
    };
    let mut written: Vec<Written> = Vec::new();
    // What this thread started writing out, dropped from the cache at a later
    // drained input (a ping each second when idle) once written out.
    let mut started = Writeback::default();
    let mut expected = 1u64;
    // The last operation read whose receipt is still owed (protocol B).
    let mut receipt: Option<u64> = None;
    let result = loop {
        if reader.buffered() == 0 {
            // A receipt still owed (the input ended with a ping).
            if let Some(upto) = receipt.take() {
                let mut w = writer.lock();
                if let Err(e) = w.send(&Message::Received { upto }).and_then(|()| w.flush()) {
                    break Err(e);
                }
            }
            if let Err(e) = batch.send(&writer) {
                break Err(e);
            }
            let one_at_a_time = std::mem::take(&mut reads) <= 1;
            poll_next = one_at_a_time && last_was_sync;
            // A big batch (a stream of 1 MiB writes) may wait in the block
            // layer: off this thread, which should be reading the next write.
            // A small one (before an fsync) is started here, at once.
            if written.iter().map(|w| w.2).sum::<usize>() >= WRITEBACK_HANDOFF_BYTES {
                let _ = writeback_tx.send(std::mem::take(&mut written));
            } else {
                started.start(&mut written);
            }
            // A file written and synced in turn: its sync starts now, while
            // the write's acknowledgement travels and the fdatasync comes.
            if let Some((id, fd)) = early
                .due()
                .and_then(|id| Some((id, table.data_fd(id).ok()?)))
            {
                let upto = expected - 1;
                let synced = rustix::fs::fdatasync(fd.as_fd());
                early.done(id, upto, synced);
                poll_next = one_at_a_time;
                if synced.is_ok() && tells_syncs {
                    let mut w = writer.lock();
                    if let Err(e) = w
                        .send(&Message::Synced { id, upto })
                        .and_then(|()| w.flush())
                    {
                        break Err(e);
                    }
                }
            }
        }
        // A writer syncing what it writes, one operation at a time (a commit:
        // write, fdatasync, write…): the fdatasync after an early sync, or the
        // write after an fsync, is polled for. Otherwise (several operations
        // at once, writes without syncs) the CPU is better spent elsewhere.
        if reader.buffered() == 0 && poll_next {
            spinner.wait(reader.get_ref().get_ref().as_fd());
        }
        let msg = match reader.recv() {
            Ok(msg) => {
                spinner.frame();
                reads += 1;
                last_was_sync = matches!(
                    msg,
                    Message::Op {
                        op: Op::Fsync { .. },
                        ..
                    }
                );
                // The writer's data path is alive (its controller may not be).
                heard.store(crate::status::monotonic_ms(), Ordering::Relaxed);
                msg
            }
            Err(WireError::Closed) => break Ok(()),
            Err(WireError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                // The primary pings every second: it is gone or frozen.
                break Err(WireError::Silent(SESSION_IDLE_TIMEOUT.as_secs()));
            }
            Err(e) => break Err(e),
        };
        let (seq, request) = match msg {
            Message::Op { seq, op } => (seq, Request::Op(op)),
            Message::OpReceipt { seq, op } => {
                // Protocol B: the writer may answer once we hold it. Confirmed
                // before applying, once the input is drained (a receipt covers
                // everything read before it).
                receipt = Some(seq);
                (seq, Request::Op(op))
            }
            Message::Control { seq, control } => (seq, Request::Control(control)),
            Message::Ping => continue,
            other => {
                break Err(WireError::Malformed(format!(
                    "unexpected message from primary: {other:?}"
                )))
            }
        };
        if seq != expected {
            break Err(WireError::Malformed(format!(
                "operation {seq} out of order, expected {expected}"
            )));
        }
        expected += 1;
        let began = Instant::now();
        if let Some(upto) = receipt {
            if reader.buffered() == 0 {
                receipt = None;
                let mut w = writer.lock();
                if let Err(e) = w.send(&Message::Received { upto }).and_then(|()| w.flush()) {
                    break Err(e);
                }
            }
        }
        // Long by nature (see the module docs): the writer hears of it meanwhile.
        let mut busy = Busy(None);
        if matches!(
            request,
            Request::Control(
                Control::Remove { .. } | Control::Wipe | Control::SyncAll | Control::InSync
            )
        ) {
            busy = keepalive.busy();
        }
        let saved = match &aside_policy {
            Some(policy) if !policy.done.load(Ordering::SeqCst) => {
                match &request {
                    Request::Op(Op::Create { node, .. }) => {
                        created.insert(node.id);
                    }
                    Request::Op(Op::Forget { id }) => {
                        created.remove(id);
                    }
                    _ => {}
                }
                if destroys_data(&request) && !targets_created(&request, &created) {
                    if busy.0.is_none() {
                        busy = keepalive.busy();
                    }
                    save_before(&mut aside, policy, &table, &request)
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        };
        let outcome = match (saved, request) {
            (Err(e), _) => Err(e),
            (Ok(()), Request::Op(Op::Fsync { id, datasync })) => match early.fsync(id, datasync) {
                Some(answered) => answered,
                None => match table.data_fd(id) {
                    // More input waiting: sync off the apply path so later operations
                    // need not wait for the disk.
                    Ok(fd) if reader.buffered() > 0 => {
                        let _ = sync_tx.send((seq, fd, SyncKind::file(datasync), began));
                        continue;
                    }
                    Ok(fd) => sync(&fd, SyncKind::file(datasync)),
                    Err(errno) => Err(errno),
                },
            },
            (Ok(()), Request::Op(op)) => {
                batch.bytes += op.data_len();
                if let Op::Write { id, offset, data } = &op {
                    if let Ok(fd) = table.data_fd(*id) {
                        written.push((fd, *offset, data.len()));
                        // Each entry keeps its file open: a stream of writes to many
                        // files (a resync) must not hold one descriptor per file.
                        if written.len() >= writeback::MAX_BATCH {
                            started.start(&mut written);
                        }
                    }
                }
                let applied = apply::apply(table.as_ref(), &op);
                table.note_changed(&op);
                early.applied(seq, &op);
                match (applied, &op) {
                    // The primary sends the byte count it copied; anything else differs.
                    (Ok(Applied::Copied(n)), Op::CopyRange { len, .. }) if n != *len => {
                        Err(Errno::IO)
                    }
                    (outcome, _) => outcome.map(|_| ()),
                }
            }
            (Ok(()), Request::Control(Control::Wipe)) => {
                tracing::warn!("full sync: emptying the replicated directory");
                early = EarlySyncs::default();
                // Records of a copy being replaced wholesale say nothing any more.
                table.changed.add_whole();
                match tracker.as_ref().map(|t| t.invalidate()).transpose() {
                    Ok(_) => table.wipe(),
                    Err(e) => {
                        tracing::error!("{e}");
                        Err(Errno::IO)
                    }
                }
            }
            (Ok(()), Request::Control(Control::InSync)) => {
                tracing::info!("resync finished: this copy is identical to the writer's");
                if let Some(policy) = &aside_policy {
                    // The split brain is resolved: later changes are ordinary replication.
                    policy.done.store(true, Ordering::SeqCst);
                    if let Some(dir) = aside.take().and_then(SaveAside::finish) {
                        tracing::warn!(dir = %dir.display(), "this node's diverged data is saved there");
                    }
                }
                match tracker.as_ref().map(|t| t.clear_all()).transpose() {
                    Ok(_) => Ok(()),
                    Err(e) => {
                        tracing::error!("{e}");
                        Err(Errno::IO)
                    }
                }
            }
            (Ok(()), Request::Control(Control::Remove { parent, name })) => {
                table.changed.add_whole();
                early = EarlySyncs::default();
                table.remove(parent, &name)
            }
            (
                Ok(()),
                Request::Control(Control::Compare {
                    id,
                    offset,
                    block,
                    hashes,
                }),
            ) => {
                let answer = table
                    .data_fd(id)
                    .and_then(|fd| compare::differing(fd.as_fd(), offset, block, &hashes));
                match answer {
                    Ok(blocks) => {
                        // The answer precedes the ack that completes the query.
                        let mut w = writer.lock();
                        if let Err(e) = w
                            .send(&Message::Differ { seq, blocks })
                            .and_then(|()| w.flush())
                        {
                            break Err(e);
                        }
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            (Ok(()), Request::Control(Control::SyncAll)) => match table.data_fd(ROOT) {
                // A resync's durability point with more of it waiting: sync off the
                // apply path, so the stream keeps being applied while the disk
                // flushes. The acknowledgements of everything before it go first:
                // its own then means all of them succeeded and are on disk.
                Ok(root) if reader.buffered() > 0 => {
                    if let Err(e) = batch.send(&writer) {
                        break Err(e);
                    }
                    let changed = SyncKind::Changed(table.changed.take());
                    let _ = sync_tx.send((seq, root, changed, began));
                    continue;
                }
                Ok(root) => sync(&root, SyncKind::Changed(table.changed.take())),
                Err(errno) => Err(errno),
            },
        };
        drop(busy);
        if let Err(errno) = outcome {
            tracing::warn!(seq, %errno, "operation failed on the secondary");
        }
        batch.acks.push(ack(seq, outcome, began));
        if batch.acks.len() >= AckBatch::MAX_ACKS || batch.bytes >= AckBatch::MAX_BYTES {
            if let Err(e) = batch.send(&writer) {
                break Err(e);
            }
        }
    };
    drop(keepalive);
    drop(sync_tx);
    drop(writeback_tx);
    for t in threads {
        let _ = t.join();
    }
    result
}

/// Requests that may destroy bytes this node has.
fn destroys_data(request: &Request) -> bool {
    matches!(
        request,
        Request::Op(
            Op::Write { .. }
                | Op::CopyRange { .. }
                | Op::Fallocate { .. }
                | Op::Truncate { .. }
                | Op::Unlink { .. }
                | Op::Rename { .. }
        ) | Request::Control(Control::Remove { .. } | Control::Wipe)
    )
}

/// Whether `request` changes the data of a file created in this session.
fn targets_created(request: &Request, created: &HashSet<NodeId>) -> bool {
    match request {
        Request::Op(
            Op::Write { id, .. }
            | Op::Truncate { id, .. }
            | Op::Fallocate { id, .. }
            | Op::CopyRange { dst: id, .. },
        ) => created.contains(id),
        _ => false,
    }
}

fn save_before(
    aside: &mut Option<SaveAside>,
    policy: &AsidePolicy,
    table: &SessionTable,
    request: &Request,
) -> Result<(), Errno> {
    if aside.is_none() {
        let root = table.path_fd(ROOT)?;
        match SaveAside::create(&policy.state, root.as_fd()) {
            Ok(a) => *aside = Some(a),
            Err(e) => {
                tracing::error!("{e}");
                return Err(Errno::IO);
            }
        }
    }
    match aside {
        Some(a) => a.before(request, &|id| table.path_fd(id)),
        None => Err(Errno::IO),
    }
}

/// The receiver's early syncs (see [`crate::presync`]; the primary's side is
/// `PreSync`): the receiver applies in one thread, in sequence order, so an
/// early sync started after applying operation `upto` covers every change
/// before it. Per file: the sequence of its last change, the sequence its
/// last early sync covers, that sync's error (owed to the next fdatasync),
/// and whether an fdatasync follows each write. Bounded like the writer's
/// records: past [`presync::MAX_FILES`] they start over (an fdatasync of a
/// file without a record syncs for itself).
#[derive(Debug, Default)]
struct EarlySyncs {
    files: HashMap<NodeId, Early>,
    /// The file whose early sync is due once the input is drained.
    next: Option<NodeId>,
}

#[derive(Debug, Default)]
struct Early {
    changed: u64,
    synced: u64,
    failed: Option<Errno>,
    pattern: Pattern,
}

impl EarlySyncs {
    /// Operation `seq` was applied.
    fn applied(&mut self, seq: u64, op: &Op) {
        if let Op::Forget { id } = op {
            // The id may name another file later: nothing of it is covered.
            self.files.remove(id);
            return;
        }
        let Some(id) = op.changes_data_of() else {
            return;
        };
        presync::make_room(&mut self.files, id);
        let file = self.files.entry(id).or_default();
        file.changed = seq;
        let expected = file.pattern.changed();
        if expected && matches!(op, Op::Write { .. }) {
            self.next = Some(id);
        } else if self.next == Some(id) {
            self.next = None;
        }
    }

    /// An fsync of `id` arrived: its outcome, when early syncs answer it.
    fn fsync(&mut self, id: NodeId, datasync: bool) -> Option<Result<(), Errno>> {
        if self.next == Some(id) {
            self.next = None;
        }
        let file = self.files.get_mut(&id)?;
        file.pattern.synced();
        if let Some(errno) = file.failed.take() {
            return Some(Err(errno));
        }
        (datasync && file.synced >= file.changed).then_some(Ok(()))
    }

    /// The file whose early sync is due, if it is not synced already.
    fn due(&mut self) -> Option<NodeId> {
        let id = self.next.take()?;
        let file = self.files.get(&id)?;
        (file.synced < file.changed).then_some(id)
    }

    /// The early sync of `id`, started after operation `upto`, ended.
    fn done(&mut self, id: NodeId, upto: u64, result: Result<(), Errno>) {
        let file = self.files.entry(id).or_default();
        match result {
            Ok(()) => file.synced = file.synced.max(upto),
            Err(errno) => file.failed = Some(errno),
        }
    }
}

/// What a sync off the apply path flushes.
#[derive(Debug)]
enum SyncKind {
    /// `fdatasync` of the file.
    Data,
    /// `fsync` of the file.
    Full,
    /// What the session changed before a `Control::SyncAll` (see
    /// [`crate::syncset`]; `syncfs` of the replicated directory's filesystem
    /// where it cannot name the changes).
    Changed(Batch),
}

impl SyncKind {
    fn file(datasync: bool) -> Self {
        if datasync {
            SyncKind::Data
        } else {
            SyncKind::Full
        }
    }
}

fn sync(fd: &OwnedFd, kind: SyncKind) -> Result<(), Errno> {
    match kind {
        SyncKind::Data => rustix::fs::fdatasync(fd.as_fd()),
        SyncKind::Full => rustix::fs::fsync(fd.as_fd()),
        SyncKind::Changed(batch) => batch.sync(fd.as_fd()).map(drop),
    }
}

/// The acknowledgement of operation `seq`, begun at `began`.
fn ack(seq: u64, outcome: Result<(), Errno>, began: Instant) -> TimedAck {
    TimedAck {
        seq,
        errno: outcome.err().map_or(0, |e| e.raw_os_error()),
        busy_ns: u64::try_from(began.elapsed().as_nanos()).unwrap_or(u64::MAX),
    }
}

/// `TimedAcks` for a writer of protocol 8 on, plain `Acks` for an older one.
fn acks_message(acks: Vec<TimedAck>, timed: bool) -> Message {
    if timed {
        Message::TimedAcks(acks)
    } else {
        Message::Acks(
            acks.into_iter()
                .map(|a| Ack {
                    seq: a.seq,
                    errno: a.errno,
                })
                .collect(),
        )
    }
}

/// A sync handed to the fsync workers: sequence, file, what to sync, when read.
type SyncJob = (u64, Arc<OwnedFd>, SyncKind, Instant);

fn fsync_loop(rx: ChannelRx<SyncJob>, writer: SharedWriter, timed: bool) {
    for (seq, fd, kind, began) in rx {
        let acks = acks_message(vec![ack(seq, sync(&fd, kind), began)], timed);
        let mut w = writer.lock();
        if w.send(&acks).and_then(|()| w.flush()).is_err() {
            // The reader notices the broken connection and ends the session.
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::buffer::Payload;

    fn write(id: NodeId) -> Op {
        Op::Write {
            id,
            offset: 0,
            data: Payload::Owned(Arc::new(vec![1; 4096])),
        }
    }

    /// File 7 written (1), fdatasynced, written again (3): its early sync is
    /// due, and ends with `result`.
    fn synced_early(result: Result<(), Errno>) -> EarlySyncs {
        let mut e = EarlySyncs::default();
        e.applied(1, &write(7));
        e.fsync(7, true);
        e.applied(3, &write(7));
        let id = e.due().unwrap();
        e.done(id, 3, result);
        e
    }

    /// Write and fdatasync in turn: from the second write on, the sync is
    /// due once the input drains, and it answers the fdatasync that follows.
    #[test]
    fn a_file_written_and_synced_in_turn_gets_early_syncs_that_answer_its_fdatasync() {
        let mut e = EarlySyncs::default();
        e.applied(1, &write(7));
        assert_eq!(e.due(), None, "nothing known of the file yet");
        assert_eq!(
            e.fsync(7, true),
            None,
            "its first fdatasync syncs for itself"
        );
        e.applied(3, &write(7));
        assert_eq!(e.due(), Some(7));
        e.done(7, 3, Ok(()));
        assert_eq!(e.fsync(7, true), Some(Ok(())));
        // A full fsync (metadata too) always syncs for itself.
        e.applied(5, &write(7));
        let id = e.due().unwrap();
        e.done(id, 5, Ok(()));
        assert_eq!(e.fsync(7, false), None);
    }

    #[test]
    fn a_change_after_the_early_sync_is_not_covered_by_it() {
        let mut e = synced_early(Ok(()));
        e.applied(4, &Op::Truncate { id: 7, size: 0 });
        assert_eq!(e.fsync(7, true), None);
    }

    #[test]
    fn a_failed_early_sync_answers_the_next_fdatasync_with_its_error() {
        let mut e = synced_early(Err(Errno::IO));
        assert_eq!(e.fsync(7, true), Some(Err(Errno::IO)));
        // Owed once; the next one syncs for itself.
        assert_eq!(e.fsync(7, true), None);
    }

    #[test]
    fn a_forgotten_file_is_covered_by_nothing_it_synced_before() {
        let mut e = synced_early(Ok(()));
        e.applied(4, &Op::Forget { id: 7 });
        assert_eq!(e.fsync(7, true), None);
        assert!(e.files.is_empty(), "a forgotten file's record is dropped");
    }

    #[test]
    fn writes_without_fdatasync_between_them_start_no_early_sync() {
        let mut e = EarlySyncs::default();
        for seq in 1..20 {
            e.applied(seq, &write(7));
            assert_eq!(e.due(), None);
        }
        // Another file's write in between: the due sync is of the file
        // written last, and only if its own pattern says so.
        e.fsync(7, true);
        e.applied(30, &write(8));
        assert_eq!(e.due(), None);
    }
}
