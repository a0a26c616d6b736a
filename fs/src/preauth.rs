//! The receiver's accept loop: one thread multiplexes every connection that has not
//! authenticated yet; only an authenticated primary gets a thread of its own.
//!
//! Anyone who can reach the replication port can connect. If each connection had
//! its own thread and a per-read timeout, 2,000 connections sending one byte every
//! few seconds would hold 2,000 threads forever and keep the real primary out. Here:
//! - at most [`Limits::max_pending`] connections are in the handshake at once; a new
//!   one over the limit evicts the oldest that has not even sent its hello yet (else
//!   the oldest), so a flood of slow strangers cannot keep a new primary out, and a
//!   primary whose hello arrived is the last to go;
//! - each handshake has one total deadline ([`Limits::deadline`]) from accept, not
//!   a per-read timeout that a trickle of bytes renews;
//! - rejections are logged at most once per second per kind (see `ratelog`).
//!
//! The handshake is the byte-driven [`ServerHandshake`]: the loop reads at most what
//! it asks for, so the primary's first frame stays in the socket for its session.
//!
//! Public because vmhad's daemon channel (`vmha_controller::channel`) is guarded by
//! the same loop, with its own binding and version range ([`Door`]).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};

use crate::key::ClusterKey;
use crate::ratelog::RateLog;
use crate::version::Versions;
use crate::wire::{Binding, Progress, ServerHandshake, SessionKeys, WireError};

/// Bounds of the unauthenticated part of a listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections in the handshake at once.
    pub max_pending: usize,
    /// Total time a connection has, from accept, to authenticate.
    pub deadline: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_pending: 64,
            deadline: Duration::from_secs(5),
        }
    }
}

/// Connections accepted per turn of the loop, so that handshakes in progress are
/// served between bursts of new connections.
const ACCEPT_BATCH: usize = 64;
/// Longest wait in `poll`, so that `stop` is noticed.
const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// The same for the replication receiver ([`serve`]): it runs on
/// `vmha-fs secondary`'s main thread, which the SIGTERM or SIGINT that sets
/// `stop` interrupts (`poll` returns EINTR), so the stop is seen at once and
/// this is only the fallback. Idle, the loop wakes this often: 32 receivers
/// on a node woke 128 times a second at [`POLL_INTERVAL`] (issue 12, item 2).
const RECEIVER_POLL_INTERVAL: Duration = Duration::from_secs(1);

struct Pending {
    stream: TcpStream,
    peer: SocketAddr,
    since: Instant,
    handshake: ServerHandshake,
}

/// What one turn of reading did to a handshake.
enum Turn {
    /// Waiting for more input.
    Wait,
    Authenticated(SessionKeys),
}

/// What a listener admits: peers holding `key`, for `binding`, speaking a version
/// in `versions`; `name` names the listener in the rejection log.
#[derive(Debug, Clone)]
pub struct Door {
    pub name: &'static str,
    pub key: ClusterKey,
    pub binding: Binding,
    pub versions: Versions,
    pub limits: Limits,
}

/// Accepts connections on `listener` until `stop`, runs their handshakes for
/// `binding` and hands every authenticated one to `on_auth` (in blocking mode).
/// The replication receiver's listener (replication versions).
pub fn serve(
    listener: &TcpListener,
    key: &ClusterKey,
    binding: &Binding,
    limits: Limits,
    stop: &AtomicBool,
    on_auth: impl FnMut(TcpStream, SocketAddr, SessionKeys),
) -> std::io::Result<()> {
    let door = Door {
        name: "replication",
        key: key.clone(),
        binding: binding.clone(),
        versions: crate::wire::replication_versions(),
        limits,
    };
    serve_polling(listener, &door, stop, RECEIVER_POLL_INTERVAL, on_auth)
}

/// [`serve`] for any [`Door`].
pub fn serve_door(
    listener: &TcpListener,
    door: &Door,
    stop: &AtomicBool,
    on_auth: impl FnMut(TcpStream, SocketAddr, SessionKeys),
) -> std::io::Result<()> {
    serve_polling(listener, door, stop, POLL_INTERVAL, on_auth)
}

/// [`serve_door`], looking at `stop` at least every `poll_interval`.
fn serve_polling(
    listener: &TcpListener,
    door: &Door,
    stop: &AtomicBool,
    poll_interval: Duration,
    mut on_auth: impl FnMut(TcpStream, SocketAddr, SessionKeys),
) -> std::io::Result<()> {
    let limits = door.limits;
    listener.set_nonblocking(true)?;
    let mut log = RateLog::new(door.name);
    // Oldest first.
    let mut pending: Vec<Pending> = Vec::new();
    let mut accept_paused_until: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        pending.retain(|p| {
            let alive = now.saturating_duration_since(p.since) < limits.deadline;
            if !alive {
                let ms = u64::try_from(limits.deadline.as_millis()).unwrap_or(u64::MAX);
                log.reject("deadline", &p.peer, &WireError::Deadline(ms).to_string());
            }
            alive
        });
        log.tick();
        if accept_paused_until.is_some_and(|t| now >= t) {
            accept_paused_until = None;
        }
        let mut timeout = poll_interval;
        for p in &pending {
            timeout = timeout.min((p.since + limits.deadline).saturating_duration_since(now));
        }
        if let Some(t) = accept_paused_until {
            timeout = timeout.min(t.saturating_duration_since(now));
        }
        // Round up: a zero timeout for a deadline 0.4 ms away would spin.
        let timeout = Timespec {
            tv_sec: timeout.as_secs() as i64,
            tv_nsec: i64::from(timeout.subsec_nanos().max(1_000_000)),
        };
        let (listener_ready, ready) = {
            let mut fds = Vec::with_capacity(1 + pending.len());
            let listen_flags = if accept_paused_until.is_some() {
                PollFlags::empty()
            } else {
                PollFlags::IN
            };
            fds.push(PollFd::new(listener, listen_flags));
            for p in &pending {
                fds.push(PollFd::new(&p.stream, PollFlags::IN));
            }
            match rustix::event::poll(&mut fds, Some(&timeout)) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
            let ready: Vec<bool> = fds[1..].iter().map(|f| !f.revents().is_empty()).collect();
            (!fds[0].revents().is_empty(), ready)
        };
        // Backwards, so that removing one leaves the indexes before it valid.
        for i in (0..ready.len()).rev() {
            if !ready[i] {
                continue;
            }
            if let Some(p) = finish(advance(&mut pending[i]), i, &mut pending, &mut log) {
                on_auth(p.0, p.1, p.2);
            }
        }
        if !listener_ready {
            continue;
        }
        for _ in 0..ACCEPT_BATCH {
            let (stream, peer) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors, typically: the pending connection stays
                    // queued; try again shortly instead of spinning on it.
                    log.reject("accept_failed", &"-", &e.to_string());
                    accept_paused_until = Some(Instant::now() + Duration::from_millis(100));
                    break;
                }
            };
            if let Err(e) = stream.set_nonblocking(true) {
                log.reject("io", &peer, &e.to_string());
                continue;
            }
            let _ = stream.set_nodelay(true);
            if pending.len() >= limits.max_pending {
                let victim = pending
                    .iter()
                    .position(|p| !p.handshake.hello_done())
                    .unwrap_or(0);
                let evicted = pending.remove(victim);
                log.reject(
                    "evicted",
                    &evicted.peer,
                    &format!(
                        "{} connections in the handshake: closed the oldest",
                        limits.max_pending
                    ),
                );
            }
            pending.push(Pending {
                stream,
                peer,
                since: Instant::now(),
                handshake: ServerHandshake::with_versions(
                    door.key.clone(),
                    door.binding.clone(),
                    door.versions,
                ),
            });
            // Its hello is often there already.
            let last = pending.len() - 1;
            if let Some(p) = finish(advance(&mut pending[last]), last, &mut pending, &mut log) {
                on_auth(p.0, p.1, p.2);
            }
        }
    }
    Ok(())
}

/// Removes the handshake at `index` when it ended; returns it when it authenticated.
fn finish(
    turn: Result<Turn, WireError>,
    index: usize,
    pending: &mut Vec<Pending>,
    log: &mut RateLog,
) -> Option<(TcpStream, SocketAddr, SessionKeys)> {
    match turn {
        Ok(Turn::Wait) => None,
        Ok(Turn::Authenticated(keys)) => {
            let p = pending.remove(index);
            match p.stream.set_nonblocking(false) {
                Ok(()) => Some((p.stream, p.peer, keys)),
                Err(e) => {
                    log.reject("io", &p.peer, &e.to_string());
                    None
                }
            }
        }
        Err(e) => {
            let p = pending.remove(index);
            log.reject(e.kind(), &p.peer, &e.to_string());
            None
        }
    }
}

/// Reads what the handshake wants until the socket has nothing more.
fn advance(p: &mut Pending) -> Result<Turn, WireError> {
    let mut buf = [0u8; 256];
    loop {
        let want = p.handshake.wants().min(buf.len());
        if want == 0 {
            return Err(WireError::Malformed("handshake already finished".into()));
        }
        let n = match p.stream.read(&mut buf[..want]) {
            Ok(0) => return Err(WireError::Closed),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(Turn::Wait),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(WireError::Io(e)),
        };
        match p.handshake.feed(&buf[..n])? {
            Progress::More => {}
            Progress::Send(reply) => send_all(&mut p.stream, &reply)?,
            Progress::Refuse(reply, error) => {
                let _ = send_all(&mut p.stream, &reply);
                return Err(error);
            }
            Progress::Done(keys) => return Ok(Turn::Authenticated(keys)),
        }
    }
}

/// Writes a short reply on a non-blocking socket: it fits in a fresh socket's send
/// buffer, so a partial write means the peer is not reading at all.
fn send_all(stream: &mut TcpStream, bytes: &[u8]) -> Result<(), WireError> {
    match stream.write(bytes) {
        Ok(n) if n == bytes.len() => Ok(()),
        Ok(_) => Err(WireError::Malformed(
            "peer does not read its replies".into(),
        )),
        Err(e) => Err(WireError::Io(e)),
    }
}
