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

use std::collections::HashMap;
use std::io::{BufReader, BufWriter};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::apply::Errno;
use crate::key::ClusterKey;
use crate::op::Op;
use crate::wire::{self, FrameReader, FrameWriter, Message, WireError};

/// Called once with the receiver's outcome of an operation.
pub type Completion = Box<dyn FnOnce(Result<(), Errno>) + Send>;

/// Bytes of write data allowed in flight before submitters wait.
const MAX_INFLIGHT_BYTES: usize = 64 << 20;
/// An idle link sends a ping this often so the receiver can tell a live primary.
const PING_INTERVAL: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

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
}

struct Pending {
    completion: Completion,
    bytes: usize,
}

struct Shared {
    state: LinkState,
    next_seq: u64,
    pending: HashMap<u64, Pending>,
    inflight_bytes: usize,
    waiters: usize,
    /// Start of the current period without progress while work is outstanding.
    stall_since: Instant,
    /// Frames in sequence order, waiting for whoever holds the writer.
    outbox: Vec<Message>,
    last_send: Instant,
}

impl Shared {
    fn busy(&self) -> bool {
        !self.pending.is_empty() || self.waiters > 0
    }
}

/// Called when the link fails with operations whose outcome on the peer is unknown.
pub type DivergenceHook = Box<dyn Fn(&str) + Send + Sync>;

struct Inner {
    shared: Mutex<Shared>,
    changed: Condvar,
    /// Taken by one submitter at a time to write out the whole outbox (flat
    /// combining: no hand-off to a sender thread on the latency path).
    writer: Mutex<Option<FrameWriter<BufWriter<TcpStream>>>>,
    lock_timeout: Duration,
    stream: Option<TcpStream>,
    on_divergence: DivergenceHook,
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

impl LinkThreads {
    /// No threads (a link without a peer).
    pub fn none() -> Self {
        Self {
            handles: Vec::new(),
        }
    }
}

impl PeerLink {
    /// Connects to the receiver, authenticates both ways and starts the link threads.
    pub fn connect(
        addr: SocketAddr,
        key: &ClusterKey,
        generation: Option<String>,
        lock_timeout: Duration,
        on_divergence: DivergenceHook,
    ) -> Result<(PeerLink, LinkThreads), LinkError> {
        let protocol = |source| LinkError::Protocol { addr, source };
        let mut stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
            .map_err(|source| LinkError::Connect { addr, source })?;
        let _ = stream.set_nodelay(true);
        stream
            .set_read_timeout(Some(CONNECT_TIMEOUT))
            .map_err(|e| protocol(e.into()))?;
        let keys = wire::client_handshake(&mut stream, key).map_err(protocol)?;
        let write_half = stream.try_clone().map_err(|e| protocol(e.into()))?;
        let mut writer = FrameWriter::new(BufWriter::with_capacity(1 << 18, write_half), keys.send);
        writer
            .send(&Message::Claim { generation })
            .and_then(|()| writer.flush())
            .map_err(protocol)?;
        let read_half = stream.try_clone().map_err(|e| protocol(e.into()))?;
        let mut reader = FrameReader::new(BufReader::with_capacity(1 << 16, read_half), keys.recv);
        match reader.recv().map_err(protocol)? {
            Message::Welcome => {}
            Message::Refused { reason } => return Err(protocol(WireError::Refused(reason))),
            other => {
                return Err(protocol(WireError::Malformed(format!(
                    "expected Welcome, got {other:?}"
                ))))
            }
        }
        stream
            .set_read_timeout(None)
            .map_err(|e| protocol(e.into()))?;

        let link = PeerLink {
            inner: Arc::new(Inner {
                shared: Mutex::new(Shared {
                    state: LinkState::Connected,
                    next_seq: 1,
                    pending: HashMap::new(),
                    inflight_bytes: 0,
                    waiters: 0,
                    stall_since: Instant::now(),
                    outbox: Vec::new(),
                    last_send: Instant::now(),
                }),
                changed: Condvar::new(),
                writer: Mutex::new(Some(writer)),
                lock_timeout,
                stream: Some(stream),
                on_divergence,
            }),
        };
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(LinkError::Thread)
        };
        let (l1, l2, l3) = (link.clone(), link.clone(), link.clone());
        let handles = vec![
            spawn("link-ping", Box::new(move || l1.ping_loop()))?,
            spawn("link-acks", Box::new(move || l2.ack_loop(reader)))?,
            spawn("link-watchdog", Box::new(move || l3.watchdog_loop()))?,
        ];
        tracing::info!(%addr, "connected to peer");
        Ok((link, LinkThreads { handles }))
    }

    /// A link for a node that starts writing without its peer (ALONE): the peer is
    /// recorded as outdated before this returns.
    pub fn alone(on_divergence: DivergenceHook) -> PeerLink {
        on_divergence("started without the peer");
        PeerLink {
            inner: Arc::new(Inner {
                shared: Mutex::new(Shared {
                    state: LinkState::Degraded,
                    next_seq: 1,
                    pending: HashMap::new(),
                    inflight_bytes: 0,
                    waiters: 0,
                    stall_since: Instant::now(),
                    outbox: Vec::new(),
                    last_send: Instant::now(),
                }),
                changed: Condvar::new(),
                writer: Mutex::new(None),
                lock_timeout: Duration::MAX,
                stream: None,
                on_divergence,
            }),
        }
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
        let pending = {
            let mut shared = self.inner.shared.lock();
            shared.state = LinkState::Degraded;
            shared.inflight_bytes = 0;
            shared.outbox.clear();
            std::mem::take(&mut shared.pending)
        };
        self.inner.changed.notify_all();
        if let Some(stream) = &self.inner.stream {
            let _ = stream.shutdown(Shutdown::Both);
        }
        for (_, p) in pending {
            (p.completion)(Ok(()));
        }
    }

    pub fn state(&self) -> LinkState {
        self.inner.shared.lock().state.clone()
    }

    /// Queues `op` for the peer; `completion` receives the peer's outcome. Waits while
    /// the link is lost or too much data is in flight; fails with EIO once the link
    /// has failed, before anything is applied.
    pub fn submit(&self, op: Op, completion: Completion) -> Result<(), Errno> {
        let bytes = op.data_len();
        let mut shared = self.wait_until(|s| {
            let room = s.inflight_bytes == 0 || s.inflight_bytes + bytes <= MAX_INFLIGHT_BYTES;
            (s.state == LinkState::Connected && room) || s.state == LinkState::Degraded
        })?;
        if shared.state == LinkState::Degraded {
            drop(shared);
            completion(Ok(()));
            return Ok(());
        }
        self.enqueue(&mut shared, op, completion, bytes);
        drop(shared);
        self.pump();
        Ok(())
    }

    /// Waits while the link is lost; fails once it has failed. Called before a local
    /// change that will be replicated, so that nothing is applied that cannot be.
    pub fn wait_usable(&self) -> Result<(), Errno> {
        self.wait_until(|s| matches!(s.state, LinkState::Connected | LinkState::Degraded))
            .map(drop)
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

    /// Queues a bookkeeping op (no data) if the link is up; never waits. Used for
    /// Bind/Forget, which only matter to a connected peer.
    pub fn submit_nowait(&self, op: Op) {
        let mut shared = self.inner.shared.lock();
        if shared.state == LinkState::Connected {
            let link = self.clone();
            let what = format!("{op:?}");
            let completion: Completion = Box::new(move |result| {
                if let Err(errno) = result {
                    link.diverged(&format!("peer failed {what}: {errno}"));
                }
            });
            self.enqueue(&mut shared, op, completion, 0);
            drop(shared);
            self.pump();
        }
    }

    /// Submits `op` and waits for the peer's outcome.
    pub fn submit_wait(&self, op: Op) -> Result<(), Errno> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.submit(
            op,
            Box::new(move |result| {
                let _ = tx.send(result);
            }),
        )?;
        rx.recv().unwrap_or(Err(Errno::IO))
    }

    fn enqueue(&self, shared: &mut Shared, op: Op, completion: Completion, bytes: usize) {
        let seq = shared.next_seq;
        shared.next_seq += 1;
        if !shared.busy() {
            shared.stall_since = Instant::now();
        }
        shared.pending.insert(seq, Pending { completion, bytes });
        shared.inflight_bytes += bytes;
        // Queued while holding the lock: outbox order is sequence order.
        shared.outbox.push(Message::Op { seq, op });
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
            loop {
                let batch = {
                    let mut shared = self.inner.shared.lock();
                    if shared.state != LinkState::Connected {
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
                        self.lost(&e.to_string());
                        return;
                    }
                }
                wrote = true;
            }
            if wrote {
                if let Err(e) = writer.flush() {
                    drop(guard);
                    self.lost(&e.to_string());
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

    /// The two nodes may now differ: record it and stop replicating.
    pub fn diverged(&self, reason: &str) {
        if matches!(
            self.inner.shared.lock().state,
            LinkState::Failed(_) | LinkState::Degraded
        ) {
            // The first reason is the one worth keeping; later ones follow from it.
            return;
        }
        tracing::error!(reason, "replicas diverged; the peer is outdated");
        (self.inner.on_divergence)(reason);
        self.fail(reason.to_string());
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
            std::mem::take(&mut shared.pending)
        };
        self.inner.changed.notify_all();
        if let Some(stream) = &self.inner.stream {
            let _ = stream.shutdown(Shutdown::Both);
        }
        for (_, p) in pending {
            (p.completion)(Err(Errno::IO));
        }
    }

    /// Ends the link threads (on unmount).
    pub fn shutdown(&self, threads: LinkThreads) {
        self.fail("shut down".into());
        for handle in threads.handles {
            let _ = handle.join();
        }
    }

    fn lost(&self, why: &str) {
        let mut shared = self.inner.shared.lock();
        if shared.state == LinkState::Connected {
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
        drop(shared);
        self.inner.changed.notify_all();
    }

    fn ping_loop(&self) {
        loop {
            std::thread::sleep(PING_INTERVAL / 4);
            {
                let mut shared = self.inner.shared.lock();
                match shared.state {
                    LinkState::Failed(_) | LinkState::Degraded => return,
                    LinkState::Lost => continue,
                    LinkState::Connected => {}
                }
                if shared.last_send.elapsed() < PING_INTERVAL || !shared.outbox.is_empty() {
                    continue;
                }
                shared.outbox.push(Message::Ping);
            }
            self.pump();
        }
    }

    fn ack_loop(&self, mut reader: FrameReader<BufReader<TcpStream>>) {
        loop {
            let acks = match reader.recv() {
                Ok(Message::Acks(acks)) => acks,
                Ok(Message::Ping) => continue,
                Ok(other) => {
                    self.lost(&format!("unexpected message from receiver: {other:?}"));
                    return;
                }
                Err(e) => {
                    self.lost(&e.to_string());
                    return;
                }
            };
            let mut done = Vec::with_capacity(acks.len());
            {
                let mut shared = self.inner.shared.lock();
                for ack in acks {
                    if let Some(p) = shared.pending.remove(&ack.seq) {
                        shared.inflight_bytes -= p.bytes;
                        let result = if ack.errno == 0 {
                            Ok(())
                        } else {
                            Err(Errno::from_raw_os_error(ack.errno))
                        };
                        done.push((p.completion, result));
                    }
                }
                shared.stall_since = Instant::now();
            }
            self.inner.changed.notify_all();
            for (completion, result) in done {
                completion(result);
            }
        }
    }

    fn watchdog_loop(&self) {
        loop {
            std::thread::sleep(Duration::from_millis(50));
            let shared = self.inner.shared.lock();
            if matches!(shared.state, LinkState::Failed(_) | LinkState::Degraded) {
                return;
            }
            if shared.busy() && shared.stall_since.elapsed() >= self.inner.lock_timeout {
                let unknown = shared.pending.len();
                drop(shared);
                let reason = format!(
                    "no acknowledgement from the peer for {} ms",
                    self.inner.lock_timeout.as_millis()
                );
                tracing::error!("{reason}; failing {unknown} operations with EIO");
                if unknown > 0 {
                    self.diverged(&format!("{reason} with {unknown} operations in flight"));
                } else {
                    self.fail(reason);
                }
            }
        }
    }
}
