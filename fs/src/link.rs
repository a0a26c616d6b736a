//! The primary's replication link: one ordered stream of operations to the receiver,
//! many in flight, each completed when the receiver's acknowledgement arrives.
//!
//! This is the one place that decides what a mutation does when the peer is gone:
//! while the link is lost, submitters wait; when no acknowledgement has arrived for
//! `lock_timeout` while work is outstanding, the link fails, every waiting operation
//! fails with EIO, and so does every later one. Unless the node's controller has
//! decided the peer is dead first (`go_degraded`, the ALONE state): then the peer is
//! durably recorded as outdated and mutations proceed locally. Nothing is ever
//! acknowledged that is neither on the peer nor recorded as missing from it.
//!
//! A degraded link can take a peer again (`attach`): while the peer is brought up to
//! date (`Attaching`, then `Syncing`) it is still recorded as outdated, so losing it
//! again only returns the link to `Degraded`; `finish_sync` makes it a real replica.

use std::collections::HashMap;
use std::io::{BufReader, BufWriter};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::apply::Errno;
use crate::key::ClusterKey;
use crate::op::{Control, NodeId, Op, Request};
use crate::presync;
use crate::spin::Spinner;
use crate::track::{Report, Tracker};
use crate::wire::{self, Ack, FrameReader, FrameWriter, Message, WireError};

/// Called once with the receiver's outcome of an operation.
pub type Completion = Box<dyn FnOnce(Result<(), Errno>) + Send>;

/// When a data write is acknowledged to the writer (the module's `protocol`,
/// named after DRBD's). Namespace and metadata changes always wait for the
/// peer's outcome; an fsync always waits until both nodes synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Protocol {
    /// A write returns once applied on both nodes (in the peer's page cache).
    #[default]
    C,
    /// A write returns once applied here and received by the peer (not yet
    /// applied there); every fsync waits until both nodes synced everything
    /// before it.
    B,
    /// A write returns once applied here and queued, in order, for the peer;
    /// every fsync/fdatasync and every O_SYNC/O_DSYNC write returns only when
    /// both nodes synced everything before it: the contract of a disk with a
    /// volatile write cache. Writes not yet on the peer stay in the activity log.
    #[serde(rename = "flush")]
    Flush,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::C => "C",
            Protocol::B => "B",
            Protocol::Flush => "flush",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "C" => Ok(Protocol::C),
            "B" => Ok(Protocol::B),
            "flush" => Ok(Protocol::Flush),
            other => Err(format!(
                "unknown protocol {other:?}; expected C, B or flush"
            )),
        }
    }
}

thread_local! {
    /// While the link thread runs an acknowledgement's completion: the
    /// receiver's own time on that operation (0 when it does not say).
    static ACKED_BUSY_NS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    /// While the link thread runs the completion of an fdatasync that the
    /// peer's `Synced` answered (ahead of its acknowledgement).
    static ANSWERED_BY_SYNCED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// For a [`Completion`] running on the link thread: whether the peer's
/// `Synced` answered it (an fdatasync its early syncs cover) rather than its
/// acknowledgement.
pub fn answered_by_synced() -> bool {
    ANSWERED_BY_SYNCED.get()
}

/// For a [`Completion`] running on the link thread: the receiver's time on the
/// operation being acknowledged, in nanoseconds (0 when the receiver does not
/// report it, or elsewhere). Passed this way so completions keep one signature.
pub fn acked_busy_ns() -> u64 {
    ACKED_BUSY_NS.get()
}

/// A query in flight (see [`PeerLink::query`]).
#[derive(Debug)]
pub struct Query {
    answer: crossbeam_channel::Receiver<Vec<u32>>,
    done: crossbeam_channel::Receiver<Result<(), Errno>>,
}

impl Query {
    /// The peer's answer; EIO when the peer went away without one.
    pub fn wait(self) -> Result<Vec<u32>, Errno> {
        match self.done.recv() {
            Ok(Ok(())) => self.answer.try_recv().map_err(|_| Errno::IO),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Errno::IO),
        }
    }
}

/// Bytes of write data allowed in flight before submitters wait.
const MAX_INFLIGHT_BYTES: usize = 64 << 20;
/// A write at least this large is handed to the link's sender thread instead
/// of being written to the socket by its submitter: authenticating and
/// writing 1 MiB takes hundreds of microseconds, which the submitter spends
/// on its local write instead (measured: the `send` stage of a 1 MiB write was
/// 545 µs, all of it before the local write began). Smaller ones are sent
/// inline (flat combining), where a hand-off would cost a wake-up.
const HANDOFF_BYTES: usize = 128 << 10;
/// An idle link sends a ping this often so the receiver can tell a live primary
/// (vmhad's "data path alive" needs one within the failover timeout, 1.5 s by
/// default; the receiver publishes what it heard every 200 ms).
const PING_INTERVAL: Duration = Duration::from_millis(500);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the watchdog looks while work is outstanding, and at most how
/// long it sleeps while idle (never more than a quarter of the lock timeout:
/// work that begins meanwhile is seen, and from then on looked at every
/// [`WATCHDOG_BUSY`], long before it could stall for the lock timeout). An
/// idle look finds nothing to do: with 32 modules a node ran 32 watchdogs.
const WATCHDOG_BUSY: Duration = Duration::from_millis(50);
const WATCHDOG_IDLE: Duration = Duration::from_secs(1);
/// The least a peer being attached may stay silent (it may be emptying a large stale
/// directory) before the attach is given up.
const ATTACH_STALL_LIMIT: Duration = Duration::from_secs(60);

/// Errors establishing the link.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot connect to peer {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("peer {addr}: {source}")]
    Protocol { addr: SocketAddr, source: WireError },
    #[error("cannot start link thread: {0}")]
    Thread(std::io::Error),
    #[error("a peer can only be attached to a link that writes alone (it is {0:?})")]
    NotAlone(LinkState),
}

/// Where the link stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    Connected,
    /// The connection broke; operations wait (at most the lock timeout).
    Lost,
    /// Replication stopped for good; every mutation fails.
    Failed(String),
    /// Writing without the peer (ALONE): the peer is recorded as outdated and
    /// mutations are applied locally only.
    Degraded,
    /// A peer was attached and is being given the namespace: mutations are still
    /// applied locally only (their data is copied by the sync that follows).
    Attaching,
    /// The peer has the namespace and receives every mutation while the sync
    /// copies the data; it is still recorded as outdated.
    Syncing,
}

impl LinkState {
    /// Mutations are applied here only; what they change goes to the dirty
    /// records (the peer is recorded as outdated).
    pub fn writes_alone(&self) -> bool {
        matches!(self, LinkState::Degraded | LinkState::Attaching)
    }

    /// The peer receives every mutation and acknowledges it (a replica, or one
    /// being brought up to date).
    pub fn replicates(&self) -> bool {
        matches!(self, LinkState::Connected | LinkState::Syncing)
    }

    /// States in which operations travel to the peer.
    pub fn sends(&self) -> bool {
        matches!(
            self,
            LinkState::Connected | LinkState::Attaching | LinkState::Syncing
        )
    }

    /// States in which the peer is not (yet) a replica: losing it costs nothing.
    fn peer_untrusted(&self) -> bool {
        matches!(
            self,
            LinkState::Degraded | LinkState::Attaching | LinkState::Syncing
        )
    }
}

struct Pending {
    completion: Completion,
    bytes: usize,
    /// Protocol B: called when the peer confirms receipt (`Message::Received`),
    /// or with the outcome if the acknowledgement comes first.
    receipt: Option<Completion>,
    /// Completed only once every earlier operation is acknowledged too (an
    /// fsync under protocols B and flush: it covers everything before it).
    barrier: bool,
    /// A file's fdatasync under protocol C: answered as soon as the peer says
    /// its early syncs cover the file (`Message::Synced`), without waiting
    /// for the acknowledgement that follows it.
    synced_answers: Option<NodeId>,
    /// Answered already (by `Message::Synced`): the acknowledgement only
    /// confirms it.
    answered: bool,
}

struct Shared {
    state: LinkState,
    /// Which connection the state refers to; a stale connection's thread cannot
    /// change the state of a newer one.
    epoch: u64,
    next_seq: u64,
    pending: HashMap<u64, Pending>,
    /// Barriers acknowledged before some earlier operation: completed (with
    /// their own outcome) once nothing earlier is pending.
    held: std::collections::BTreeMap<u64, (Completion, Result<(), Errno>)>,
    inflight_bytes: usize,
    waiters: usize,
    /// Start of the current period without progress while work is outstanding.
    stall_since: Instant,
    /// Frames in sequence order, waiting for whoever holds the writer.
    outbox: Vec<Message>,
    last_send: Instant,
    /// Where the answers of queries in flight (`Message::Differ`) go, by sequence.
    queries: HashMap<u64, crossbeam_channel::Sender<Vec<u32>>>,
    protocol: Protocol,
    /// Set by `shutdown`: the timer threads end. A failed link keeps them, since
    /// a later attach (after SIGUSR1) brings it back to life.
    /// The replication protocol version of the current session.
    session_version: u16,
    stopping: bool,
    /// The sender thread has frames to write (see [`HANDOFF_BYTES`]).
    kick: bool,
    /// What the peer's early syncs cover ([`PeerSyncs`]).
    syncs: PeerSyncs,
}

/// Which files the peer's early syncs cover: for each file, the sequence of
/// the last operation of this session that changed its data, and the sequence
/// up to which the peer said it synced it (`Message::Synced`). Bounded: past
/// [`presync::MAX_FILES`] files the records start over, with every file
/// counted as changed at the last sequence (only early answers are lost).
#[derive(Debug, Default)]
struct PeerSyncs {
    changed: HashMap<NodeId, u64>,
    /// Files without an entry in `changed` count as changed at this sequence.
    floor: u64,
    synced: HashMap<NodeId, u64>,
}

impl PeerSyncs {
    fn sent(&mut self, seq: u64, request: &Request) {
        match request {
            // The id may name another file later: nothing of it is covered
            // (and many files forgotten do not fill the records).
            Request::Op(Op::Forget { id }) => {
                self.changed.remove(id);
                self.synced.remove(id);
            }
            Request::Op(op) => {
                if let Some(id) = op.changes_data_of() {
                    if presync::make_room(&mut self.changed, id) {
                        self.floor = seq;
                    }
                    self.changed.insert(id, seq);
                }
            }
            // A resync's instructions may change any file.
            Request::Control(_) => {
                self.changed.clear();
                self.floor = seq;
            }
        }
    }

    fn synced(&mut self, id: NodeId, upto: u64) {
        presync::make_room(&mut self.synced, id);
        let at = self.synced.entry(id).or_default();
        *at = (*at).max(upto);
    }

    fn covers(&self, id: NodeId) -> bool {
        let changed = self.changed.get(&id).copied().unwrap_or(self.floor);
        self.synced.get(&id).is_some_and(|&upto| upto >= changed)
    }
}

impl Shared {
    /// What `take` takes from the pending operations (a receipt, an early
    /// answer), in sequence order: completions are called in the order the
    /// operations were sent.
    fn take_in_order(
        &mut self,
        mut take: impl FnMut(u64, &mut Pending) -> Option<Completion>,
    ) -> Vec<Completion> {
        let mut due: Vec<(u64, Completion)> = self
            .pending
            .iter_mut()
            .filter_map(|(seq, p)| Some((*seq, take(*seq, p)?)))
            .collect();
        due.sort_by_key(|(seq, _)| *seq);
        due.into_iter().map(|(_, c)| c).collect()
    }

    fn busy(&self) -> bool {
        !self.pending.is_empty() || self.waiters > 0
    }

    /// Everything in flight, drained: pending operations (receipt first) and
    /// held barriers, in sequence order.
    fn drain(&mut self) -> Vec<Completion> {
        let mut all: Vec<(u64, Completion)> = Vec::new();
        for (seq, p) in std::mem::take(&mut self.pending) {
            if let Some(r) = p.receipt {
                all.push((seq, r));
            }
            all.push((seq, p.completion));
        }
        all.extend(
            std::mem::take(&mut self.held)
                .into_iter()
                .map(|(seq, (c, _))| (seq, c)),
        );
        all.sort_by_key(|(seq, _)| *seq);
        all.into_iter().map(|(_, c)| c).collect()
    }

    fn new(state: LinkState) -> Self {
        Shared {
            state,
            epoch: 0,
            next_seq: 1,
            pending: HashMap::new(),
            held: std::collections::BTreeMap::new(),
            inflight_bytes: 0,
            waiters: 0,
            stall_since: Instant::now(),
            outbox: Vec::new(),
            last_send: Instant::now(),
            queries: HashMap::new(),
            protocol: Protocol::C,
            session_version: wire::PROTOCOL_VERSION,
            stopping: false,
            kick: false,
            syncs: PeerSyncs::default(),
        }
    }
}

/// Whether the operation `seq` just queued waits for a receipt.
fn p_receipt_wanted(shared: &Shared, seq: u64) -> bool {
    shared
        .pending
        .get(&seq)
        .is_some_and(|p| p.receipt.is_some())
}

/// Called when the link fails with operations whose outcome on the peer is unknown.
pub type DivergenceHook = Box<dyn Fn(&str) + Send + Sync>;

struct Inner {
    shared: Mutex<Shared>,
    changed: Condvar,
    /// Wakes the sender thread (`Shared::kick`).
    kick: Condvar,
    /// Wakes the timer threads (ping, watchdog) at a shutdown
    /// (`Shared::stopping`): their idle sleeps are long.
    stopped: Condvar,
    /// Taken by one submitter at a time to write out the whole outbox (flat
    /// combining: no hand-off to a sender thread on the latency path).
    writer: Mutex<Option<FrameWriter<BufWriter<TcpStream>>>>,
    /// The current connection, for shutting it down.
    stream: Mutex<Option<TcpStream>>,
    /// Acknowledgement readers of every connection so far, joined on shutdown.
    readers: Mutex<Vec<JoinHandle<()>>>,
    lock_timeout: Duration,
    on_divergence: DivergenceHook,
    tracker: std::sync::OnceLock<Arc<Tracker>>,
}

/// Handle to the replication link; cheap to clone.
#[derive(Clone)]
pub struct PeerLink {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PeerLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PeerLink({:?})", self.state())
    }
}

/// The link's threads, joined on shutdown.
#[derive(Debug)]
pub struct LinkThreads {
    handles: Vec<JoinHandle<()>>,
}

/// An authenticated session with a receiver that accepted us.
struct Session {
    stream: TcpStream,
    writer: FrameWriter<BufWriter<TcpStream>>,
    reader: FrameReader<BufReader<TcpStream>>,
    /// The receiver's report on its copy.
    report: Option<Box<Report>>,
    /// The replication protocol version both sides chose.
    version: u16,
}

fn open_session(
    addr: SocketAddr,
    key: &ClusterKey,
    module: &str,
    generation: Option<String>,
) -> Result<Session, LinkError> {
    let protocol = |source| LinkError::Protocol { addr, source };
    // The receiver of this module's directory listens on this port.
    let binding = wire::Binding::new(module, addr.port()).map_err(protocol)?;
    let mut stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        .map_err(|source| LinkError::Connect { addr, source })?;
    let _ = stream.set_nodelay(true);
    stream
        .set_read_timeout(Some(CONNECT_TIMEOUT))
        .map_err(|e| protocol(e.into()))?;
    let keys = wire::client_handshake(&mut stream, key, &binding).map_err(protocol)?;
    let write_half = stream.try_clone().map_err(|e| protocol(e.into()))?;
    let mut writer = FrameWriter::for_session(BufWriter::with_capacity(1 << 18, write_half), &keys);
    writer
        .send(&Message::Claim { generation })
        .and_then(|()| writer.flush())
        .map_err(protocol)?;
    let read_half = stream.try_clone().map_err(|e| protocol(e.into()))?;
    let mut reader = FrameReader::for_session(BufReader::with_capacity(1 << 16, read_half), &keys);
    if keys.version >= wire::SOFTWARE_SINCE {
        match reader.recv().map_err(protocol)? {
            Message::Software { version } => tracing::info!(
                %addr,
                protocol = keys.version,
                peer_software = %version,
                "replication session: protocol {}, the receiver runs vmha-fs {version}",
                keys.version
            ),
            other => {
                return Err(protocol(WireError::Malformed(format!(
                    "expected Software (protocol {}), got {}",
                    keys.version,
                    other.kind()
                ))))
            }
        }
    } else {
        tracing::info!(
            %addr,
            protocol = keys.version,
            "replication session: protocol {}",
            keys.version
        );
    }
    let report = match reader.recv().map_err(protocol)? {
        Message::Welcome { report: false } => None,
        Message::Welcome { report: true } => wire::read_report(&mut reader).map_err(protocol)?,
        Message::Refused { reason } => return Err(protocol(WireError::Refused(reason))),
        other => {
            return Err(protocol(WireError::Malformed(format!(
                "expected Welcome, got {other:?}"
            ))))
        }
    };
    stream
        .set_read_timeout(None)
        .map_err(|e| protocol(e.into()))?;
    Ok(Session {
        stream,
        writer,
        reader,
        report,
        version: keys.version,
    })
}

impl PeerLink {
    fn with_state(state: LinkState, lock_timeout: Duration, on_divergence: DivergenceHook) -> Self {
        PeerLink {
            inner: Arc::new(Inner {
                shared: Mutex::new(Shared::new(state)),
                changed: Condvar::new(),
                kick: Condvar::new(),
                stopped: Condvar::new(),
                writer: Mutex::new(None),
                stream: Mutex::new(None),
                readers: Mutex::new(Vec::new()),
                lock_timeout,
                on_divergence,
                tracker: std::sync::OnceLock::new(),
            }),
        }
    }

    fn spawn(
        &self,
        name: &str,
        f: impl FnOnce(PeerLink) + Send + 'static,
    ) -> Result<JoinHandle<()>, LinkError> {
        let link = self.clone();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || f(link))
            .map_err(LinkError::Thread)
    }

    fn spawn_timers(&self) -> Result<LinkThreads, LinkError> {
        Ok(LinkThreads {
            handles: vec![
                self.spawn("link-ping", |l| l.ping_loop())?,
                self.spawn("link-watchdog", |l| l.watchdog_loop())?,
                self.spawn("link-send", |l| l.send_loop())?,
            ],
        })
    }

    /// Installs a fresh session as the current connection, in `state`.
    fn install(&self, session: Session, state: LinkState) -> Result<(), LinkError> {
        let Session {
            stream,
            writer,
            reader,
            report: _,
            version,
        } = session;
        let epoch = {
            let mut shared = self.inner.shared.lock();
            shared.epoch += 1;
            shared.session_version = version;
            shared.state = state;
            // A new session numbers its operations from 1 again.
            shared.next_seq = 1;
            shared.syncs = PeerSyncs::default();
            shared.outbox.clear();
            shared.queries.clear();
            shared.stall_since = Instant::now();
            shared.epoch
        };
        *self.inner.writer.lock() = Some(writer);
        *self.inner.stream.lock() = Some(stream);
        let reader_thread = self.spawn("link-acks", move |l| l.ack_loop(reader, epoch))?;
        self.inner.readers.lock().push(reader_thread);
        self.inner.changed.notify_all();
        Ok(())
    }

    /// Connects to the receiver of `module`'s directory at `addr`, authenticates
    /// both ways, claims `generation` and starts the link threads.
    pub fn connect(
        addr: SocketAddr,
        key: &ClusterKey,
        module: &str,
        generation: Option<String>,
        lock_timeout: Duration,
        on_divergence: DivergenceHook,
    ) -> Result<(PeerLink, LinkThreads), LinkError> {
        let session = open_session(addr, key, module, generation)?;
        let link = Self::with_state(
            LinkState::Failed("connecting".into()),
            lock_timeout,
            on_divergence,
        );
        link.install(session, LinkState::Connected)?;
        let threads = link.spawn_timers()?;
        tracing::info!(%addr, "connected to peer");
        Ok((link, threads))
    }

    /// A link for a node that starts writing without its peer (ALONE): the peer is
    /// recorded as outdated before this returns.
    pub fn alone(
        lock_timeout: Duration,
        on_divergence: DivergenceHook,
    ) -> Result<(PeerLink, LinkThreads), LinkError> {
        on_divergence("started without the peer");
        let link = Self::with_state(LinkState::Degraded, lock_timeout, on_divergence);
        let threads = link.spawn_timers()?;
        Ok((link, threads))
    }

    /// Takes a peer again while writing alone. The peer stays recorded as outdated;
    /// the caller gives it the namespace (`enqueue_sync`), then calls `begin_data`,
    /// copies the data and calls `finish_sync`. Returns the peer's report on its copy.
    pub fn attach(
        &self,
        addr: SocketAddr,
        key: &ClusterKey,
        module: &str,
        generation: Option<String>,
    ) -> Result<Option<Box<Report>>, LinkError> {
        let state = self.state();
        if state != LinkState::Degraded {
            return Err(LinkError::NotAlone(state));
        }
        let mut session = open_session(addr, key, module, generation)?;
        let report = session.report.take();
        tracing::info!(%addr, "peer attached; bringing it up to date");
        self.install(session, LinkState::Attaching)?;
        Ok(report)
    }

    /// From now on, when the peer stops receiving, what the activity log says may
    /// be missing there moves to the dirty records before anything is acknowledged.
    pub fn track(&self, tracker: Arc<Tracker>) {
        let _ = self.inner.tracker.set(tracker);
    }

    /// The peer has the namespace: from now on every mutation travels to it too.
    pub fn begin_data(&self) -> bool {
        self.transition(LinkState::Attaching, LinkState::Syncing)
    }

    /// The peer is up to date: it is a replica again.
    pub fn finish_sync(&self) -> bool {
        self.transition(LinkState::Syncing, LinkState::Connected)
    }

    fn transition(&self, from: LinkState, to: LinkState) -> bool {
        let mut shared = self.inner.shared.lock();
        if shared.state != from {
            return false;
        }
        shared.state = to;
        drop(shared);
        self.inner.changed.notify_all();
        true
    }

    /// The controller declared the peer dead: record it as outdated (durably, first),
    /// then let waiting and later mutations proceed locally. Operations in flight were
    /// applied here and are covered by that record.
    pub fn go_degraded(&self, reason: &str) {
        if self.state() == LinkState::Degraded {
            return;
        }
        tracing::warn!(
            reason,
            "writing without the peer; it is recorded as outdated"
        );
        (self.inner.on_divergence)(reason);
        self.degrade();
    }

    /// Switches to `Degraded` (the peer is already recorded as outdated) and
    /// completes what was in flight: applied here, covered by that record.
    fn degrade(&self) {
        let pending = {
            let mut shared = self.inner.shared.lock();
            shared.state = LinkState::Degraded;
            shared.inflight_bytes = 0;
            shared.outbox.clear();
            shared.drain()
        };
        self.inner.changed.notify_all();
        self.close_stream();
        // What was in flight (and anything the activity log says may not have
        // reached the peer) is recorded as dirty before it is acknowledged.
        let recorded = match self.inner.tracker.get() {
            Some(tracker) => tracker.degrade().map_err(|e| e.to_string()),
            None => Ok(()),
        };
        if let Err(e) = recorded {
            tracing::error!("cannot record what the peer lacks: {e}; replication stopped");
            self.inner.shared.lock().state = LinkState::Failed(e);
            self.inner.changed.notify_all();
            for completion in pending {
                completion(Err(Errno::IO));
            }
            return;
        }
        for completion in pending {
            completion(Ok(()));
        }
    }

    fn close_stream(&self) {
        if let Some(stream) = self.inner.stream.lock().as_ref() {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    pub fn state(&self) -> LinkState {
        self.inner.shared.lock().state.clone()
    }

    /// Waits at most `timeout` for a change of the link (a state change, an
    /// acknowledgement, room in flight): for observers that report the state.
    pub fn wait_changed(&self, timeout: Duration) {
        let mut shared = self.inner.shared.lock();
        self.inner.changed.wait_for(&mut shared, timeout);
    }

    /// How long a connected link has had work outstanding without any
    /// acknowledgement (None: connected and idle or progressing, or another
    /// state). The watchdog fails the link at the lock timeout; reporting the
    /// stall earlier lets a controller act first.
    pub fn stalled_for(&self) -> Option<Duration> {
        let shared = self.inner.shared.lock();
        (shared.state == LinkState::Connected && shared.busy())
            .then(|| shared.stall_since.elapsed())
    }

    /// Queues `op` for the peer; `completion` receives the peer's outcome. Waits while
    /// the link is lost or too much data is in flight; fails with EIO once the link
    /// has failed, before anything is applied.
    pub fn submit(&self, op: impl Into<Request>, completion: Completion) -> Result<(), Errno> {
        self.submit_with(op.into(), completion, None, false)
    }

    /// Like [`Self::submit`], and `receipt` is called as soon as the peer has
    /// received the operation (before applying it): protocol B.
    pub fn submit_received(
        &self,
        op: impl Into<Request>,
        receipt: Completion,
        completion: Completion,
    ) -> Result<(), Errno> {
        self.submit_with(op.into(), completion, Some(receipt), false)
    }

    /// Like [`Self::submit`], but `completion` runs only once every operation
    /// queued before this one is acknowledged too: an fsync that covers all the
    /// writes before it (protocols B and flush).
    pub fn submit_barrier(
        &self,
        op: impl Into<Request>,
        completion: Completion,
    ) -> Result<(), Errno> {
        self.submit_with(op.into(), completion, None, true)
    }

    fn submit_with(
        &self,
        op: Request,
        completion: Completion,
        receipt: Option<Completion>,
        barrier: bool,
    ) -> Result<(), Errno> {
        let bytes = op.data_len();
        let mut shared = self.wait_until(|s| {
            let room = s.inflight_bytes == 0 || s.inflight_bytes + bytes <= MAX_INFLIGHT_BYTES;
            (s.state.replicates() && room) || s.state.writes_alone()
        })?;
        if shared.state.writes_alone() {
            drop(shared);
            if let Some(receipt) = receipt {
                receipt(Ok(()));
            }
            completion(Ok(()));
            return Ok(());
        }
        let seq = self.enqueue(&mut shared, op, completion, bytes);
        if let Some(p) = shared.pending.get_mut(&seq) {
            p.barrier = barrier;
            p.receipt = receipt;
        }
        // A receiver older than protocol 7 never confirms receipt: the
        // receipt then comes with the acknowledgement (B runs as C).
        if p_receipt_wanted(&shared, seq) && shared.session_version >= wire::RECEIPT_SINCE {
            // The receiver confirms receipt of this one before applying it.
            if let Some(Message::Op { seq, op }) = shared.outbox.pop() {
                shared.outbox.push(Message::OpReceipt { seq, op });
            }
        }
        if bytes >= HANDOFF_BYTES {
            shared.kick = true;
            drop(shared);
            self.inner.kick.notify_one();
        } else {
            drop(shared);
            self.pump();
        }
        Ok(())
    }

    /// Queues an operation of the sync itself, in any state that sends; EIO once the
    /// peer is gone again (the sync is over).
    pub fn enqueue_sync(
        &self,
        op: impl Into<Request>,
        completion: Completion,
    ) -> Result<(), Errno> {
        let op = op.into();
        let bytes = op.data_len();
        let mut shared = self.wait_until(|s| {
            let room = s.inflight_bytes == 0 || s.inflight_bytes + bytes <= MAX_INFLIGHT_BYTES;
            !s.state.sends() || room
        })?;
        if !matches!(shared.state, LinkState::Attaching | LinkState::Syncing) {
            return Err(Errno::IO);
        }
        self.enqueue(&mut shared, op, completion, bytes);
        drop(shared);
        self.pump();
        Ok(())
    }

    /// Queues a `Control::Compare`, whose answer is a list of block indexes, in any
    /// state that sends; wait for the answer with [`Query::wait`].
    pub fn query(&self, compare: Control) -> Result<Query, Errno> {
        let mut shared = self.wait_until(|s| {
            !s.state.sends() || s.inflight_bytes == 0 || s.inflight_bytes < MAX_INFLIGHT_BYTES
        })?;
        if !shared.state.sends() {
            return Err(Errno::IO);
        }
        let (answer_tx, answer) = crossbeam_channel::bounded(1);
        let (done_tx, done) = crossbeam_channel::bounded(1);
        let seq = shared.next_seq;
        shared.queries.insert(seq, answer_tx);
        self.enqueue(
            &mut shared,
            compare.into(),
            Box::new(move |r| {
                let _ = done_tx.send(r);
            }),
            0,
        );
        drop(shared);
        self.pump();
        Ok(Query { answer, done })
    }

    /// Waits while the link is lost; fails once it has failed. Called before a local
    /// change that will be replicated, so that nothing is applied that cannot be.
    pub fn wait_usable(&self) -> Result<(), Errno> {
        self.wait_until(|s| s.state != LinkState::Lost).map(drop)
    }

    /// Waits until `ready` holds (or the link fails). A waiter counts as outstanding
    /// work for the lock timeout from the moment it starts waiting.
    fn wait_until(
        &self,
        ready: impl Fn(&Shared) -> bool,
    ) -> Result<parking_lot::MutexGuard<'_, Shared>, Errno> {
        let mut shared = self.inner.shared.lock();
        let mut waiting = false;
        let outcome = loop {
            if matches!(shared.state, LinkState::Failed(_)) {
                break Err(Errno::IO);
            }
            if ready(&shared) {
                break Ok(());
            }
            if !waiting {
                if !shared.busy() {
                    shared.stall_since = Instant::now();
                }
                shared.waiters += 1;
                waiting = true;
            }
            self.inner
                .changed
                .wait_for(&mut shared, Duration::from_millis(100));
        };
        if waiting {
            shared.waiters -= 1;
        }
        outcome.map(|()| shared)
    }

    /// Queues a bookkeeping op (no data) if the link sends to the peer; never waits.
    /// Used for Bind/Forget, which only matter to a connected peer.
    pub fn submit_nowait(&self, op: Op) {
        let mut shared = self.inner.shared.lock();
        if shared.state.replicates() {
            let link = self.clone();
            let what = format!("{op:?}");
            let completion: Completion = Box::new(move |result| {
                if let Err(errno) = result {
                    link.diverged(&format!("peer failed {what}: {errno}"));
                }
            });
            self.enqueue(&mut shared, op.into(), completion, 0);
            drop(shared);
            self.pump();
        }
    }

    /// Submits `op` and waits for the peer's outcome.
    pub fn submit_wait(&self, op: impl Into<Request>) -> Result<(), Errno> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.submit(
            op,
            Box::new(move |result| {
                let _ = tx.send(result);
            }),
        )?;
        rx.recv().unwrap_or(Err(Errno::IO))
    }

    fn enqueue(
        &self,
        shared: &mut Shared,
        request: Request,
        completion: Completion,
        bytes: usize,
    ) -> u64 {
        let seq = shared.next_seq;
        shared.next_seq += 1;
        if !shared.busy() {
            shared.stall_since = Instant::now();
        }
        shared.pending.insert(
            seq,
            Pending {
                completion,
                bytes,
                receipt: None,
                barrier: false,
                synced_answers: match &request {
                    Request::Op(Op::Fsync { id, datasync: true }) => Some(*id),
                    _ => None,
                },
                answered: false,
            },
        );
        shared.inflight_bytes += bytes;
        shared.syncs.sent(seq, &request);
        // Queued while holding the lock: outbox order is sequence order.
        shared.outbox.push(match request {
            Request::Op(op) => Message::Op { seq, op },
            Request::Control(control) => Message::Control { seq, control },
        });
        seq
    }

    /// Writes out the outbox unless another thread is already doing so (it will pick
    /// up what we queued). Never holds the shared lock while writing to the socket.
    fn pump(&self) {
        loop {
            let Some(mut guard) = self.inner.writer.try_lock() else {
                return;
            };
            let Some(writer) = guard.as_mut() else {
                return;
            };
            let mut wrote = false;
            let epoch = self.inner.shared.lock().epoch;
            loop {
                let batch = {
                    let mut shared = self.inner.shared.lock();
                    if !shared.state.sends() {
                        shared.outbox.clear();
                        return;
                    }
                    shared.last_send = Instant::now();
                    std::mem::take(&mut shared.outbox)
                };
                if batch.is_empty() {
                    break;
                }
                for msg in &batch {
                    if let Err(e) = writer.send(msg) {
                        drop(guard);
                        self.lost(epoch, &e.to_string());
                        return;
                    }
                }
                wrote = true;
            }
            if wrote {
                if let Err(e) = writer.flush() {
                    drop(guard);
                    self.lost(epoch, &e.to_string());
                    return;
                }
            }
            drop(guard);
            // Something queued between our last look and the unlock would be stranded.
            if self.inner.shared.lock().outbox.is_empty() {
                return;
            }
        }
    }

    /// The two nodes may now differ: record it and stop replicating (or, while the
    /// peer is being brought up to date, give up on it and write alone). Returns true
    /// when this node goes on writing alone, the peer recorded as outdated: the local
    /// outcome of the operation may then be acknowledged.
    pub fn diverged(&self, reason: &str) -> bool {
        let state = self.state();
        match state {
            LinkState::Degraded => return true,
            // The first reason is the one worth keeping; later ones follow from it.
            LinkState::Failed(_) => return false,
            _ => {}
        }
        if state.peer_untrusted() {
            tracing::warn!(
                reason,
                "the peer being synced failed an operation; writing alone"
            );
            self.degrade();
            return true;
        }
        tracing::error!(reason, "replicas diverged; the peer is outdated");
        (self.inner.on_divergence)(reason);
        self.fail(reason.to_string());
        false
    }

    /// Stops the link: pending and later operations fail.
    pub fn fail(&self, reason: String) {
        let pending = {
            let mut shared = self.inner.shared.lock();
            if matches!(shared.state, LinkState::Failed(_) | LinkState::Degraded) {
                return;
            }
            shared.state = LinkState::Failed(reason);
            shared.inflight_bytes = 0;
            shared.drain()
        };
        self.inner.changed.notify_all();
        self.close_stream();
        for completion in pending {
            completion(Err(Errno::IO));
        }
    }

    /// Ends the link threads (on unmount).
    pub fn shutdown(&self, threads: LinkThreads) {
        {
            let mut shared = self.inner.shared.lock();
            shared.stopping = true;
            if !matches!(shared.state, LinkState::Failed(_)) {
                shared.state = LinkState::Failed("shut down".into());
            }
        }
        self.inner.changed.notify_all();
        self.inner.kick.notify_all();
        self.inner.stopped.notify_all();
        self.close_stream();
        let readers = std::mem::take(&mut *self.inner.readers.lock());
        for handle in threads.handles.into_iter().chain(readers) {
            let _ = handle.join();
        }
    }

    fn lost(&self, epoch: u64, why: &str) {
        let mut shared = self.inner.shared.lock();
        if shared.epoch != epoch {
            return;
        }
        match shared.state {
            LinkState::Connected => {
                tracing::error!(
                    why,
                    "replication link lost; writes wait for the lock timeout"
                );
                shared.state = LinkState::Lost;
                if shared.busy() {
                    // Progress stopped when the link did, not when the last ack came.
                    shared.stall_since = shared.stall_since.max(Instant::now());
                }
            }
            LinkState::Attaching | LinkState::Syncing => {
                drop(shared);
                tracing::warn!(why, "lost the peer being synced; writing alone");
                self.degrade();
                return;
            }
            _ => {}
        }
        drop(shared);
        self.inner.changed.notify_all();
    }

    /// Writes out the outbox when a submitter handed it a large write.
    fn send_loop(&self) {
        loop {
            {
                let mut shared = self.inner.shared.lock();
                // Both are set under the lock and notified (`submit`,
                // `shutdown`): no timed look needed.
                while !shared.kick && !shared.stopping {
                    self.inner.kick.wait(&mut shared);
                }
                if shared.stopping {
                    return;
                }
                shared.kick = false;
            }
            self.pump();
        }
    }

    /// Sleeps for `wait`, or until the link is shut down.
    fn pause(&self, wait: Duration) {
        let mut shared = self.inner.shared.lock();
        if !shared.stopping {
            self.inner.stopped.wait_for(&mut shared, wait);
        }
    }

    /// Sleeps until a ping is due (one interval after the last frame sent), so an
    /// idle link wakes about once a second.
    fn ping_loop(&self) {
        let mut wait = PING_INTERVAL;
        loop {
            self.pause(wait);
            {
                let mut shared = self.inner.shared.lock();
                if shared.stopping {
                    return;
                }
                let since = shared.last_send.elapsed();
                if !shared.state.sends() || since < PING_INTERVAL || !shared.outbox.is_empty() {
                    wait = PING_INTERVAL.saturating_sub(since).max(PING_INTERVAL / 4);
                    continue;
                }
                shared.outbox.push(Message::Ping);
                wait = PING_INTERVAL;
            }
            self.pump();
        }
    }

    fn ack_loop(&self, mut reader: FrameReader<BufReader<TcpStream>>, epoch: u64) {
        let mut spinner = Spinner::new();
        loop {
            // One operation in flight (a writer waiting for it): its answer is
            // polled for. None: the next one's is (a writer syncing what it
            // writes, one operation at a time, sends its next write right
            // after this answer; asleep in `read` already, this thread would
            // meet its acknowledgement with a wake-up). More:
            // acknowledgements keep coming, and the CPU is better spent on the
            // writes. The spinner stops polling an idle stream by itself.
            if reader.buffered() == 0 && self.inner.shared.lock().pending.len() <= 1 {
                spinner.wait(reader.get_ref().get_ref().as_fd());
            }
            let received = reader.recv();
            spinner.frame();
            let acks: Vec<(Ack, u64)> = match received {
                Ok(Message::Acks(acks)) => acks.into_iter().map(|a| (a, 0)).collect(),
                Ok(Message::TimedAcks(acks)) => acks
                    .into_iter()
                    .map(|a| {
                        let ack = Ack {
                            seq: a.seq,
                            errno: a.errno,
                        };
                        (ack, a.busy_ns)
                    })
                    .collect(),
                Ok(Message::Received { upto }) => {
                    let receipts: Vec<Completion> = {
                        let mut shared = self.inner.shared.lock();
                        if shared.epoch != epoch {
                            return;
                        }
                        shared.stall_since = Instant::now();
                        shared.take_in_order(|seq, p| {
                            (seq <= upto).then(|| p.receipt.take()).flatten()
                        })
                    };
                    for receipt in receipts {
                        receipt(Ok(()));
                    }
                    continue;
                }
                Ok(Message::Synced { id, upto }) => {
                    let mut shared = self.inner.shared.lock();
                    if shared.epoch != epoch {
                        return;
                    }
                    if upto >= shared.next_seq {
                        drop(shared);
                        self.lost(epoch, &format!("a sync of operation {upto}, never sent"));
                        return;
                    }
                    shared.syncs.synced(id, upto);
                    let answered = Self::answer_synced(&mut shared, id);
                    drop(shared);
                    ANSWERED_BY_SYNCED.set(true);
                    for completion in answered {
                        completion(Ok(()));
                    }
                    ANSWERED_BY_SYNCED.set(false);
                    continue;
                }
                Ok(Message::Ping) => {
                    // The receiver is working on a long operation (saving a split
                    // brain's data aside) and says so: progress, not a stall.
                    let mut shared = self.inner.shared.lock();
                    if shared.epoch == epoch {
                        shared.stall_since = Instant::now();
                    }
                    continue;
                }
                Ok(Message::Differ { seq, blocks }) => {
                    let mut shared = self.inner.shared.lock();
                    if shared.epoch != epoch {
                        return;
                    }
                    match shared.queries.remove(&seq) {
                        Some(tx) => {
                            let _ = tx.send(blocks);
                            continue;
                        }
                        None => {
                            drop(shared);
                            self.lost(epoch, &format!("an answer to no query ({seq})"));
                            return;
                        }
                    }
                }
                Ok(other) => {
                    self.lost(
                        epoch,
                        &format!("unexpected message from receiver: {other:?}"),
                    );
                    return;
                }
                Err(e) => {
                    self.lost(epoch, &e.to_string());
                    return;
                }
            };
            // A peer-provided number: checked before it becomes an Errno.
            if let Some((bad, _)) = acks.iter().find(|(a, _)| !(0..4096).contains(&a.errno)) {
                self.lost(
                    epoch,
                    &format!("the receiver sent an invalid error number {}", bad.errno),
                );
                return;
            }
            let mut done = Vec::with_capacity(acks.len());
            let mut disagreed = Vec::new();
            {
                let mut shared = self.inner.shared.lock();
                if shared.epoch != epoch {
                    return;
                }
                for (ack, busy_ns) in acks {
                    if let Some(p) = shared.pending.remove(&ack.seq) {
                        shared.inflight_bytes -= p.bytes;
                        let result = if ack.errno == 0 {
                            Ok(())
                        } else {
                            Err(Errno::from_raw_os_error(ack.errno))
                        };
                        if p.answered {
                            // Its `Synced` said the peer's copy is on disk; the
                            // acknowledgement cannot take that back.
                            if let Err(errno) = result {
                                disagreed.push(format!(
                                    "the peer failed fdatasync {} after it said the file was synced: {errno}",
                                    ack.seq
                                ));
                            }
                            continue;
                        }
                        if let Some(receipt) = p.receipt {
                            done.push((receipt, result, 0));
                        }
                        let earlier = p.barrier && shared.pending.keys().any(|s| *s < ack.seq);
                        if earlier {
                            shared.held.insert(ack.seq, (p.completion, result));
                        } else {
                            done.push((p.completion, result, busy_ns));
                        }
                    }
                }
                if !shared.held.is_empty() {
                    let first_pending = shared.pending.keys().min().copied().unwrap_or(u64::MAX);
                    let rest = shared.held.split_off(&first_pending);
                    let ready = std::mem::replace(&mut shared.held, rest);
                    done.extend(ready.into_values().map(|(c, r)| (c, r, 0)));
                }
                shared.stall_since = Instant::now();
            }
            self.inner.changed.notify_all();
            for what in disagreed {
                self.diverged(&what);
            }
            for (completion, result, busy_ns) in done {
                ACKED_BUSY_NS.set(busy_ns);
                completion(result);
            }
            ACKED_BUSY_NS.set(0);
        }
    }

    /// The fdatasyncs of `id` in flight that the peer's early syncs now
    /// answer: taken (their acknowledgement still ends them), to be called
    /// with success outside the lock. Barriers (protocols B and flush) wait
    /// for their acknowledgement: they answer for every earlier operation too.
    fn answer_synced(shared: &mut Shared, id: NodeId) -> Vec<Completion> {
        // As `peer_synced`: only a replica's word counts (not a copy a
        // resync is still filling).
        if shared.state != LinkState::Connected || !shared.syncs.covers(id) {
            return Vec::new();
        }
        shared.take_in_order(|_, p| {
            if p.synced_answers != Some(id) || p.barrier || p.answered {
                return None;
            }
            p.answered = true;
            Some(std::mem::replace(&mut p.completion, Box::new(|_| {})))
        })
    }

    /// The protocol the link was set up with (see [`Protocol`]).
    pub fn protocol(&self) -> Protocol {
        self.inner.shared.lock().protocol
    }

    /// Whether the peer, a replica, said it synced every change of this
    /// session to `id`'s data (`Message::Synced`).
    pub fn peer_synced(&self, id: NodeId) -> bool {
        let shared = self.inner.shared.lock();
        shared.state == LinkState::Connected && shared.syncs.covers(id)
    }

    /// Sets the protocol; call before the first write.
    pub fn set_protocol(&self, protocol: Protocol) {
        self.inner.shared.lock().protocol = protocol;
    }

    fn watchdog_loop(&self) {
        let mut busy = false;
        let idle = WATCHDOG_IDLE.min(self.inner.lock_timeout / 4);
        loop {
            // Idle, a slower look is enough: work that began meanwhile is seen
            // at most a quarter of the lock timeout later, and looked at often
            // from then on (a stall is measured from when work began). The
            // wait ends early at a shutdown.
            self.pause(if busy { WATCHDOG_BUSY } else { idle });
            let shared = self.inner.shared.lock();
            busy = shared.busy();
            if shared.stopping {
                return;
            }
            match shared.state {
                LinkState::Failed(_) | LinkState::Degraded => continue,
                _ => {}
            }
            // While attaching, nothing live waits for the peer (mutations complete
            // locally) and the receiver may be emptying a large stale directory.
            let limit = if shared.state == LinkState::Attaching {
                self.inner
                    .lock_timeout
                    .saturating_mul(10)
                    .max(ATTACH_STALL_LIMIT)
            } else {
                self.inner.lock_timeout
            };
            if shared.busy() && shared.stall_since.elapsed() >= limit {
                let unknown = shared.pending.len();
                let epoch = shared.epoch;
                let untrusted = shared.state.peer_untrusted();
                drop(shared);
                let reason = format!(
                    "no acknowledgement from the peer for {} ms",
                    self.inner.lock_timeout.as_millis()
                );
                if untrusted {
                    self.lost(epoch, &reason);
                    continue;
                }
                tracing::error!("{reason}; failing {unknown} operations with EIO");
                if unknown > 0 {
                    let _ = self.diverged(&format!("{reason} with {unknown} operations in flight"));
                } else {
                    self.fail(reason);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::Payload;

    fn write(id: NodeId) -> Request {
        Request::Op(Op::Write {
            id,
            offset: 0,
            data: Payload::Owned(Arc::new(vec![1; 4096])),
        })
    }

    #[test]
    fn the_peer_covers_a_file_only_up_to_the_last_change_it_said_it_synced() {
        let mut s = PeerSyncs::default();
        assert!(!s.covers(7), "nothing said yet");
        s.sent(1, &write(7));
        s.synced(7, 1);
        assert!(s.covers(7));
        s.sent(2, &write(7));
        assert!(!s.covers(7), "written after the sync");
        // Another file's sync says nothing of this one.
        s.sent(3, &write(8));
        s.synced(8, 3);
        assert!(!s.covers(7));
        s.synced(7, 3);
        assert!(s.covers(7));
        // An fsync or a metadata change is no change of the data.
        s.sent(
            4,
            &Request::Op(Op::Fsync {
                id: 7,
                datasync: true,
            }),
        );
        assert!(s.covers(7));
        s.sent(5, &Request::Op(Op::Truncate { id: 7, size: 0 }));
        assert!(!s.covers(7));
    }

    #[test]
    fn a_forgotten_file_is_covered_by_nothing_said_before() {
        let mut s = PeerSyncs::default();
        s.sent(1, &write(7));
        s.synced(7, 1);
        s.sent(2, &Request::Op(Op::Forget { id: 7 }));
        assert!(!s.covers(7));
        assert!(s.changed.is_empty() && s.synced.is_empty());
    }

    #[test]
    fn a_resync_instruction_uncovers_every_file() {
        let mut s = PeerSyncs::default();
        s.sent(1, &write(7));
        s.synced(7, 1);
        s.sent(2, &Request::Control(Control::Wipe));
        assert!(!s.covers(7));
        s.synced(7, 2);
        assert!(s.covers(7));
    }

    #[test]
    fn past_its_bound_the_record_starts_over_and_covers_nothing_unsaid() {
        let mut s = PeerSyncs::default();
        s.sent(1, &write(1));
        s.synced(1, 1);
        let files = presync::MAX_FILES as u64;
        for id in 2..=files + 1 {
            s.sent(id, &write(id));
        }
        // File 1's record was dropped with the others: counted as changed at
        // the last sequence, which its sync (at 1) does not cover.
        assert!(!s.covers(1));
        s.synced(1, files + 1);
        assert!(s.covers(1));
    }
}
