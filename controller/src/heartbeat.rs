//! Authenticated UDP heartbeats on every network (design, "Controller").
//!
//! Each node binds `address:heartbeat_port` for every one of its addresses and
//! sends, every `heartbeat_interval_ms`, one datagram from its address on
//! network `i` to the peer's address on network `i`. The peer is dead only
//! when all networks have been silent for `failover_timeout_ms`
//! ([`Liveness::all_silent_for`], monotonic time).
//!
//! Datagram, versions 2 to 4 (choices where the design is silent):
//! ```text
//! "VMHB" | version u8 | min u8 | max u8 | session u64 BE | counter u64 BE
//!        | challenge u64 BE | echo u64 BE | destination IP (16 bytes, v6-mapped)
//!        | payload length u32 BE | payload | MAC (32 bytes)
//! ```
//! The payload is JSON ([`Payload`]) in versions 2 and 3, and a binary
//! [`compact::Frame`] from version 4 on: a small summary per round, the
//! modules' full announcements only when they change ([`compact`]).
//! The MAC is keyed blake3 over everything before it, with a key derived from
//! the cluster key (`blake3::derive_key`, context "vmha heartbeat v1"), so the
//! heartbeat MAC never doubles as a replication-link one. The receiver rejects
//! a datagram that is forged (bad MAC), of another version, not addressed to
//! the address it arrived on (a datagram from one network replayed on
//! another), from a source that is not the peer's address for that network,
//! replayed or unproven (below), whose payload does not decode, or that names
//! another node than the peer.
//!
//! # Versions
//!
//! `version` is the format of this datagram, `min..=max` the versions the sender
//! reads ([`VERSIONS`]; the test hook [`VERSIONS_ENV`] narrows them). Everything
//! up to the payload, and the MAC, is laid out the same in every version, so a
//! receiver learns the peer's range from any authentic datagram it can read and
//! from then on sends the highest version both read ([`Opener::send_version`]);
//! before it knows, it sends its newest. A datagram of a version outside the
//! receiver's range is [`Rejection::Version`], naming both ranges. Version 3
//! adds `software` (the sender's vmhad version) to the payload; version 4 the
//! compact payload ([`compact`]); version 1 (wall-clock counters) is gone.
//!
//! # Freshness without clocks
//!
//! Version 1 numbered datagrams with the sender's wall clock and refused those
//! more than 30 s away from the receiver's clock: an NTP step or a manual
//! `date` on either node, or a peer restarting with its clock behind its
//! previous counters, made authentic heartbeats look stale or replayed — a
//! false failover, and without a witness a split brain. Version 2 reads no
//! clock:
//!
//! - **session**: random, drawn at each daemon start; **counter**: 1, 2, … per
//!   datagram within the session (one sequence for all networks; the receiver
//!   keeps the last one per network, so reordering across networks is no
//!   replay).
//! - The receiver trusts one session of its peer at a time. A datagram of the
//!   trusted session is accepted when its counter is above the last one
//!   accepted on its network, else it is [`Rejection::Replayed`].
//! - Every heartbeat carries the sender's **challenge**, a random value it
//!   draws at start and again each time it trusts a new peer session, and an
//!   **echo**: the challenge of the last datagram it accepted from the
//!   session it trusts (trusting none yet: of the last authentic one).
//! - A datagram of any other session is accepted, and its session becomes the
//!   trusted one, only when its echo is the receiver's current challenge; else
//!   it is [`Rejection::Unproven`] (the normal first heartbeats of a restarted
//!   peer, or a replay).
//!
//! Why no replay is ever accepted (assuming one daemon per node at a time, so
//! the peer's sessions follow one another): a datagram can echo a challenge
//! only if it was made after the challenge was drawn. The receiver's current
//! challenge was drawn when it started or when it trusted the peer's current
//! session S. Every earlier session of the peer ended before S began, so
//! before that draw, and none of its datagrams — whatever an attacker recorded
//! — echoes it. Datagrams of S itself are held to its counters. So a replay is
//! either refused or is a datagram of the peer's live session never accepted
//! before, which is no older than a late one.
//!
//! Cost: after either daemon restarts, its first heartbeats are refused until
//! the challenges have crossed. An unproven datagram, and the acceptance of a
//! new session, prompt one extra heartbeat ([`Endpoint::prompted`], at most
//! one per interval), so that takes a few round trips (milliseconds on a
//! LAN), not intervals. An attacker replaying old datagrams to a node that trusts
//! no session yet can delay that exchange (it changes what the node echoes),
//! as one dropping datagrams could; it cannot make anything stale accepted.
//!
//! # Heartbeats never wait behind other work
//!
//! A late heartbeat is a false failover, so the heartbeat path is isolated
//! from everything else the node does ([`runtime`]):
//! - every heartbeat socket, its receive tasks, the sender and the dispatcher
//!   that judges the peer's silence run on their own tokio runtime (one worker
//!   thread, `vmhad-heartbeat`), never queued behind a module task, a `virsh`
//!   call or a control request on the main runtime;
//! - that thread runs at nice [`THREAD_NICE`]: the scheduler wakes it ahead of
//!   the replication, FUSE and QEMU threads (nice 0) on a loaded CPU. Not
//!   `SCHED_RR` (corosync's choice): anyone can send datagrams to the
//!   heartbeat port, and a real-time thread checking the MAC of a flood of
//!   forged ones would take a whole core from the node;
//! - its datagrams carry DSCP CS6 (network control, `IP_TOS` 0xc0 /
//!   `IPV6_TCLASS`) for the switches and `SO_PRIORITY` [`SOCKET_PRIORITY`]
//!   (interactive) for the local queueing discipline, so a priority-aware
//!   qdisc (the default `pfifo_fast`, `prio`, the `mq`/`fq_codel` flows) sends
//!   them ahead of the replication stream's bulk traffic.
//!
//! Rejected datagrams are counted by kind ([`Rejections`], shown in
//! `vmctl status --json` as `heartbeats_rejected`) and logged at most once
//! per [`REJECT_LOG_INTERVAL`] per kind, with the number left unlogged since
//! — a flood of forged datagrams never writes a line each.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use vmha_fs::key::ClusterKey;
use vmha_fs::version::{VersionError, Versions};

use crate::config::{Digest, KeyDigests};
use crate::generation::History;
use crate::state::Announce;
use crate::status::ResyncStatus;

pub mod compact;

const MAGIC: &[u8; 4] = b"VMHB";
/// The datagram format versions this build reads and writes.
pub const VERSIONS: Versions = Versions { min: 2, max: 4 };
/// The newest datagram format version.
pub const VERSION: u8 = 4;
/// The first version whose payload carries `software`.
pub const SOFTWARE_SINCE: u8 = 3;
/// The first version whose payload is a binary [`compact::Frame`] (a summary
/// per round, full module beats only when they change), not JSON.
pub const COMPACT_SINCE: u8 = 4;
/// Test only: narrows the advertised heartbeat versions (`MAX` or `MIN..=MAX`).
pub const VERSIONS_ENV: &str = "VMHA_TEST_HEARTBEAT_VERSIONS";
const HEADER_LEN: usize = 4 + 1 + 1 + 1 + 8 + 8 + 8 + 8 + 16 + 4;

/// The heartbeat versions this process advertises: [`VERSIONS`] narrowed by
/// [`VERSIONS_ENV`] (vmhad refuses to start on an invalid value, [`check_env`]).
pub fn advertised() -> Versions {
    static ADVERTISED: std::sync::OnceLock<Versions> = std::sync::OnceLock::new();
    *ADVERTISED.get_or_init(|| VERSIONS.from_env(VERSIONS_ENV).unwrap_or(VERSIONS))
}

/// Validates the heartbeat test hook (a one-line error at start).
pub fn check_env() -> Result<Versions, VersionError> {
    VERSIONS.from_env(VERSIONS_ENV)
}

fn wire_version(v: u16) -> u8 {
    u8::try_from(v).unwrap_or(u8::MAX)
}
const MAC_LEN: usize = 32;
/// Largest datagram accepted (and sent).
pub const MAX_DATAGRAM: usize = 65_000;
/// Each kind of rejected datagram is logged at most once per this interval.
pub const REJECT_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Errors of the heartbeat layer.
#[derive(Debug, thiserror::Error)]
pub enum HeartbeatError {
    #[error("cannot start the heartbeat thread: {0}")]
    Runtime(String),
    #[error("cannot bind heartbeat socket {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the node has {local} addresses but its peer has {peer}: one per network on both")]
    NetworkCount { local: usize, peer: usize },
    #[error("cannot encode heartbeat: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("cannot encode heartbeat: {0}")]
    Compact(String),
    #[error("heartbeat payload of {0} bytes exceeds the datagram limit")]
    TooLarge(usize),
    #[error("no network index {0}")]
    NoSuchNetwork(usize),
    #[error("cannot send heartbeat to {addr}: {source}")]
    Send {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Why a received datagram was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("malformed datagram")]
    Malformed,
    #[error("heartbeat format version {version} (the peer reads {theirs}), this vmhad reads {ours}: no common version, upgrade the older node")]
    Version {
        version: u8,
        theirs: Versions,
        ours: Versions,
    },
    #[error("bad MAC (forged, or a different cluster key)")]
    Forged,
    #[error("addressed to {0}, not to this socket")]
    WrongDestination(IpAddr),
    #[error("source {0} is not the peer's address on this network")]
    WrongSource(IpAddr),
    #[error("replayed (counter not above the last one of its session)")]
    Replayed,
    #[error(
        "new session not proven fresh yet (a peer that just started, or a replay of an old session)"
    )]
    Unproven,
    #[error("undecodable payload")]
    Payload,
    #[error("sent by `{0}`, not by the peer")]
    WrongNode(String),
}

impl Rejection {
    /// A short name of the kind, for counts.
    pub fn kind(&self) -> &'static str {
        match self {
            Rejection::Malformed => "malformed",
            Rejection::Version { .. } => "version",
            Rejection::Forged => "forged",
            Rejection::WrongDestination(_) => "wrong_destination",
            Rejection::WrongSource(_) => "wrong_source",
            Rejection::Replayed => "replayed",
            Rejection::Unproven => "unproven",
            Rejection::Payload => "payload",
            Rejection::WrongNode(_) => "wrong_node",
        }
    }
}

/// What one node says about one module in its heartbeats.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleBeat {
    pub name: String,
    /// [`crate::config::Config::module_hash`] on the sender.
    pub module_hash: Digest,
    pub announce: Announce,
    /// The sender's persisted generation history (for `compare`).
    pub history: History,
    /// Bytes the sender wrote since its current generation began.
    pub changed_bytes: u64,
    pub resync: Option<ResyncStatus>,
    /// [`crate::config::Config::module_key_digests`] on the sender: the peer
    /// names the keys of this module that differ (absent from older senders).
    #[serde(default)]
    pub keys: KeyDigests,
}

/// The authenticated content of a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payload {
    pub node: String,
    /// The sender's heartbeat session ([`Sealer::session`]): random per
    /// daemon start, it tells a restarted peer from a running one. Must equal
    /// the datagram's session.
    pub session: u64,
    /// Incremented per send round (the same round goes out on every network).
    pub round: u64,
    pub config_hash: Digest,
    pub modules: Vec<ModuleBeat>,
    /// [`crate::config::Config::cluster_key_digests`] on the sender (16 hex
    /// digits per key: with 32 modules of 13 keys the payload is about 24 KB
    /// plus the histories, below [`MAX_DATAGRAM`]; see the test).
    #[serde(default)]
    pub config_keys: KeyDigests,
    /// Version 3 on: the sender's vmhad version (absent at version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub software: Option<String>,
}

fn mac_key(key: &ClusterKey) -> [u8; 32] {
    blake3::derive_key("vmha heartbeat v1", key.as_bytes())
}

/// A random value that is never 0 (0 means "none" in the echo field).
fn nonce() -> u64 {
    rand::random::<u64>().max(1)
}

fn ip_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn ip_from_bytes(bytes: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(bytes);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// The receiver's side of the freshness exchange, carried by every datagram.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Handshake {
    /// The sender's current challenge (the peer must echo it to open a new
    /// session).
    pub challenge: u64,
    /// The peer's challenge, sent back (0: none known).
    pub echo: u64,
}

/// The authenticated header of a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The format of this datagram and the versions its sender reads.
    pub version: u8,
    pub sender: Versions,
    pub session: u64,
    pub counter: u64,
    pub handshake: Handshake,
    pub destination: IpAddr,
}

/// Builds authenticated datagrams of one session.
#[derive(Debug)]
pub struct Sealer {
    key: [u8; 32],
    session: u64,
    counter: AtomicU64,
    versions: Versions,
}

impl Sealer {
    /// A new session (random id, counter from 1).
    pub fn new(key: &ClusterKey) -> Sealer {
        Sealer::with_session(key, nonce())
    }

    /// A given session (tests).
    pub fn with_session(key: &ClusterKey, session: u64) -> Sealer {
        Sealer {
            key: mac_key(key),
            session,
            counter: AtomicU64::new(0),
            versions: advertised(),
        }
    }

    /// This sealer advertising `versions` (tests).
    pub fn with_versions(mut self, versions: Versions) -> Sealer {
        self.versions = versions;
        self
    }

    /// The versions this sealer advertises.
    pub fn versions(&self) -> Versions {
        self.versions
    }

    pub fn session(&self) -> u64 {
        self.session
    }

    /// One datagram carrying `payload` (already encoded) for `destination`, in
    /// the newest format.
    pub fn seal(
        &self,
        destination: IpAddr,
        handshake: Handshake,
        payload: &[u8],
    ) -> Result<Vec<u8>, HeartbeatError> {
        self.seal_version(
            wire_version(self.versions.max),
            destination,
            handshake,
            payload,
        )
    }

    /// [`Sealer::seal`] in format `version`.
    pub fn seal_version(
        &self,
        version: u8,
        destination: IpAddr,
        handshake: Handshake,
        payload: &[u8],
    ) -> Result<Vec<u8>, HeartbeatError> {
        let total = HEADER_LEN + payload.len() + MAC_LEN;
        if total > MAX_DATAGRAM {
            return Err(HeartbeatError::TooLarge(total));
        }
        let len = u32::try_from(payload.len()).map_err(|_| HeartbeatError::TooLarge(total))?;
        let counter = self
            .counter
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        let mut out = Vec::with_capacity(total);
        out.extend_from_slice(MAGIC);
        out.push(version);
        out.push(wire_version(self.versions.min));
        out.push(wire_version(self.versions.max));
        out.extend_from_slice(&self.session.to_be_bytes());
        out.extend_from_slice(&counter.to_be_bytes());
        out.extend_from_slice(&handshake.challenge.to_be_bytes());
        out.extend_from_slice(&handshake.echo.to_be_bytes());
        out.extend_from_slice(&ip_bytes(destination));
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(payload);
        let mac = blake3::keyed_hash(&self.key, &out);
        out.extend_from_slice(mac.as_bytes());
        Ok(out)
    }
}

/// Checks the MAC and the format of `datagram` (of a version in `ours`); no
/// replay rules.
pub fn decode<'a>(
    key: &[u8; 32],
    ours: Versions,
    datagram: &'a [u8],
) -> Result<(Header, &'a [u8]), Rejection> {
    if datagram.len() < HEADER_LEN + MAC_LEN || datagram.len() > MAX_DATAGRAM {
        return Err(Rejection::Malformed);
    }
    let (body, mac) = datagram.split_at(datagram.len() - MAC_LEN);
    let mac: [u8; 32] = mac.try_into().map_err(|_| Rejection::Malformed)?;
    // blake3::Hash compares in constant time.
    if blake3::keyed_hash(key, body) != blake3::Hash::from_bytes(mac) {
        return Err(Rejection::Forged);
    }
    let (head, payload) = body.split_at(HEADER_LEN);
    if head.get(..4) != Some(MAGIC.as_slice()) {
        return Err(Rejection::Malformed);
    }
    let mut fields = head.get(4..).unwrap_or_default();
    let mut take = |n: usize| -> Result<&[u8], Rejection> {
        let (field, rest) = fields.split_at_checked(n).ok_or(Rejection::Malformed)?;
        fields = rest;
        Ok(field)
    };
    let mut byte = || take(1)?.first().copied().ok_or(Rejection::Malformed);
    let version = byte()?;
    let (min, max) = (byte()?, byte()?);
    let sender = Versions::new(u16::from(min), u16::from(max)).ok_or(Rejection::Malformed)?;
    if !ours.contains(u16::from(version)) {
        return Err(Rejection::Version {
            version,
            theirs: sender,
            ours,
        });
    }
    let mut u64_field = || -> Result<u64, Rejection> {
        Ok(u64::from_be_bytes(
            take(8)?.try_into().map_err(|_| Rejection::Malformed)?,
        ))
    };
    let session = u64_field()?;
    let counter = u64_field()?;
    let challenge = u64_field()?;
    let echo = u64_field()?;
    let destination: [u8; 16] = take(16)?.try_into().map_err(|_| Rejection::Malformed)?;
    let len = u32::from_be_bytes(take(4)?.try_into().map_err(|_| Rejection::Malformed)?);
    if usize::try_from(len).ok() != Some(payload.len()) {
        return Err(Rejection::Malformed);
    }
    Ok((
        Header {
            version,
            sender,
            session,
            counter,
            handshake: Handshake { challenge, echo },
            destination: ip_from_bytes(destination),
        },
        payload,
    ))
}

/// The peer session a receiver trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Trusted {
    session: u64,
    /// Last counter accepted per network (keyed by the local address).
    last: HashMap<IpAddr, u64>,
}

/// Checks received datagrams: MAC, destination, replay (module docs).
#[derive(Debug)]
pub struct Opener {
    key: [u8; 32],
    /// The versions this side reads.
    ours: Versions,
    /// The peer's range, from its latest authentic, readable datagram.
    peer: Option<Versions>,
    /// Ours: a new peer session must echo it.
    challenge: u64,
    /// The peer's challenge, to echo.
    echo: u64,
    trusted: Option<Trusted>,
}

/// A datagram that passed [`Opener::open`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened<T> {
    pub session: u64,
    /// The first datagram accepted of this session (the peer started, or
    /// this daemon did).
    pub new_session: bool,
    pub payload: T,
}

impl Opener {
    pub fn new(key: &ClusterKey) -> Opener {
        Opener {
            key: mac_key(key),
            ours: advertised(),
            peer: None,
            challenge: nonce(),
            echo: 0,
            trusted: None,
        }
    }

    /// What to put in the next datagram to the peer.
    pub fn handshake(&self) -> Handshake {
        Handshake {
            challenge: self.challenge,
            echo: self.echo,
        }
    }

    /// This opener reading `versions` (tests).
    pub fn with_versions(mut self, versions: Versions) -> Opener {
        self.ours = versions;
        self
    }

    /// The peer's advertised range, once an authentic datagram showed it.
    pub fn peer_versions(&self) -> Option<Versions> {
        self.peer
    }

    /// The format to send in: the highest version both read; our newest until
    /// the peer's range is known (or when there is none in common: the peer
    /// then logs the refusal with both ranges).
    pub fn send_version(&self) -> u8 {
        let v = self
            .peer
            .and_then(|p| self.ours.highest_common(p))
            .unwrap_or(self.ours.max);
        wire_version(v)
    }

    /// The peer session currently trusted.
    pub fn trusted_session(&self) -> Option<u64> {
        self.trusted.as_ref().map(|t| t.session)
    }

    /// Checks a datagram that arrived on the socket of `local`; `accept`
    /// decodes and checks its payload. The receiver's state changes only for
    /// a datagram that passes every check.
    pub fn open<T>(
        &mut self,
        datagram: &[u8],
        local: IpAddr,
        accept: impl FnOnce(&Header, &[u8]) -> Result<T, Rejection>,
    ) -> Result<Opened<T>, Rejection> {
        let (header, payload) = match decode(&self.key, self.ours, datagram) {
            Ok(decoded) => decoded,
            Err(e) => {
                if let Rejection::Version { theirs, .. } = &e {
                    // Authentic (the MAC passed): the range is the peer's.
                    self.peer = Some(*theirs);
                }
                return Err(e);
            }
        };
        // Authentic and readable: the peer reads this range. (A replayed old
        // datagram can only name a range the peer once had; we then send an
        // older format it still reads, until its next datagram.)
        self.peer = Some(header.sender);
        if header.destination != local {
            return Err(Rejection::WrongDestination(header.destination));
        }
        match &mut self.trusted {
            Some(trusted) if trusted.session == header.session => {
                let last = trusted.last.get(&local).copied().unwrap_or(0);
                if header.counter <= last {
                    return Err(Rejection::Replayed);
                }
                let payload = accept(&header, payload)?;
                trusted.last.insert(local, header.counter);
                self.echo = header.handshake.challenge;
                Ok(Opened {
                    session: header.session,
                    new_session: false,
                    payload,
                })
            }
            _ if header.handshake.echo == self.challenge => {
                let payload = accept(&header, payload)?;
                self.trusted = Some(Trusted {
                    session: header.session,
                    last: HashMap::from([(local, header.counter)]),
                });
                // Every datagram of an older session was made before this
                // draw: none can echo the new challenge.
                self.challenge = nonce();
                self.echo = header.handshake.challenge;
                Ok(Opened {
                    session: header.session,
                    new_session: true,
                    payload,
                })
            }
            trusted => {
                // Trusting no session yet, answer the latest authentic
                // challenge so that the peer can prove its session to us
                // and we ours to it.
                if trusted.is_none() && accept(&header, payload).is_ok() {
                    self.echo = header.handshake.challenge;
                }
                Err(Rejection::Unproven)
            }
        }
    }
}

/// Rejected datagrams, counted by kind and logged at a bounded rate.
/// Clones share the counts.
#[derive(Debug, Clone, Default)]
pub struct Rejections {
    kinds: Arc<Mutex<BTreeMap<&'static str, KindLog>>>,
}

#[derive(Debug, Default)]
struct KindLog {
    total: u64,
    /// Rejections since the last line of this kind, not logged.
    unlogged: u64,
    last_logged: Option<Instant>,
}

impl Rejections {
    fn kinds(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, KindLog>> {
        self.kinds.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one rejection and logs it, unless its kind was logged less than
    /// [`REJECT_LOG_INTERVAL`] before `now`. Returns whether it was logged.
    pub fn record(
        &self,
        network: usize,
        from: SocketAddr,
        reason: &Rejection,
        now: Instant,
    ) -> bool {
        let kind = reason.kind();
        let (total, unlogged) = {
            let mut kinds = self.kinds();
            let entry = kinds.entry(kind).or_default();
            entry.total = entry.total.saturating_add(1);
            if entry
                .last_logged
                .is_some_and(|at| now.saturating_duration_since(at) < REJECT_LOG_INTERVAL)
            {
                entry.unlogged = entry.unlogged.saturating_add(1);
                return false;
            }
            entry.last_logged = Some(now);
            (entry.total, std::mem::take(&mut entry.unlogged))
        };
        if *reason == Rejection::Unproven {
            // Expected once or twice each time the peer starts.
            tracing::info!(network, %from, %reason, kind, total, unlogged, "heartbeat rejected");
        } else {
            tracing::warn!(network, %from, %reason, kind, total, unlogged, "heartbeat rejected");
        }
        true
    }

    /// Logs the count of every kind with rejections not logged yet and no
    /// line for [`REJECT_LOG_INTERVAL`]. Returns the number of lines.
    pub fn flush(&self, now: Instant) -> usize {
        let due: Vec<(&'static str, u64, u64)> = self
            .kinds()
            .iter_mut()
            .filter(|(_, k)| {
                k.unlogged > 0
                    && k.last_logged
                        .is_none_or(|at| now.saturating_duration_since(at) >= REJECT_LOG_INTERVAL)
            })
            .map(|(kind, k)| {
                k.last_logged = Some(now);
                (*kind, std::mem::take(&mut k.unlogged), k.total)
            })
            .collect();
        for (kind, count, total) in &due {
            tracing::warn!(kind, count, total, "more heartbeats rejected");
        }
        due.len()
    }

    /// Rejections so far, by kind.
    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.kinds()
            .iter()
            .map(|(kind, k)| ((*kind).to_string(), k.total))
            .collect()
    }
}

/// When the peer was last heard on each network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Liveness {
    last: Vec<Option<Instant>>,
}

impl Liveness {
    pub fn new(networks: usize) -> Liveness {
        Liveness {
            last: vec![None; networks],
        }
    }

    pub fn record(&mut self, network: usize, at: Instant) {
        if let Some(slot) = self.last.get_mut(network) {
            if slot.is_none_or(|prev| prev < at) {
                *slot = Some(at);
            }
        }
    }

    pub fn last_seen(&self, network: usize) -> Option<Instant> {
        self.last.get(network).copied().flatten()
    }

    /// The latest heartbeat on any network.
    pub fn latest(&self) -> Option<Instant> {
        self.last.iter().flatten().max().copied()
    }

    /// Whether the peer, once heard, is now silent on every network for at
    /// least `timeout`. Never heard: false (unknown, not lost).
    pub fn all_silent_for(&self, now: Instant, timeout: Duration) -> bool {
        match self.latest() {
            Some(latest) => now.saturating_duration_since(latest) >= timeout,
            None => false,
        }
    }

    /// Milliseconds since the last heartbeat per network.
    pub fn ages_ms(&self, now: Instant) -> Vec<Option<u64>> {
        self.last
            .iter()
            .map(|t| t.map(|t| duration_ms(now.saturating_duration_since(t))))
            .collect()
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A datagram that passed every check.
#[derive(Debug, Clone)]
pub struct Received {
    pub network: usize,
    pub from: SocketAddr,
    pub at: Instant,
    /// The first heartbeat accepted of a new peer session.
    pub new_session: bool,
    /// The payload, its `modules` moved to [`Received::modules`].
    pub payload: Payload,
    /// The modules' beats, shared: an unchanged beat of version 4 is the
    /// one kept from before, not a copy (five rounds a second of 32 modules).
    pub modules: Vec<Arc<ModuleBeat>>,
}

/// A round's payload and its module beats apart ([`Received::modules`]).
pub type Round = (Payload, Vec<Arc<ModuleBeat>>);

/// Moves a JSON payload's modules out into shared beats.
fn split(mut payload: Payload) -> Round {
    let modules = std::mem::take(&mut payload.modules)
        .into_iter()
        .map(Arc::new)
        .collect();
    (payload, modules)
}

/// The payload as format `version` carries it (no `software` before version 3).
fn encode_for(payload: &Payload, version: u8) -> Result<Vec<u8>, HeartbeatError> {
    if version < SOFTWARE_SINCE && payload.software.is_some() {
        let mut older = payload.clone();
        older.software = None;
        return Ok(serde_json::to_vec(&older)?);
    }
    Ok(serde_json::to_vec(payload)?)
}

/// The heartbeat versions as `status` shows them.
#[derive(Debug, Clone)]
pub struct VersionView {
    opener: Arc<Mutex<Opener>>,
}

impl VersionView {
    fn opener(&self) -> std::sync::MutexGuard<'_, Opener> {
        self.opener.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The versions this side reads.
    pub fn ours(&self) -> Versions {
        self.opener().ours
    }

    /// The peer's range, once heard.
    pub fn peer(&self) -> Option<Versions> {
        self.opener().peer_versions()
    }

    /// The format this side sends in now.
    pub fn in_use(&self) -> u8 {
        self.opener().send_version()
    }
}

/// Where a node sends and receives heartbeats.
#[derive(Debug)]
pub struct EndpointSpec {
    /// The local node's addresses, one per network.
    pub local: Vec<IpAddr>,
    pub port: u16,
    /// The peer's addresses, one per network (same order).
    pub peer: Vec<IpAddr>,
    pub peer_port: u16,
    /// The peer's node name (payloads from other names are rejected).
    pub peer_name: String,
}

/// Nice value of the heartbeat thread (see the module docs).
pub const THREAD_NICE: i32 = -10;
/// `SO_PRIORITY` of the heartbeat sockets: `TC_PRIO_INTERACTIVE`, the highest
/// an unprivileged socket may set.
pub const SOCKET_PRIORITY: u32 = 6;
/// DSCP CS6 (network control) in the IPv4 TOS / IPv6 traffic class byte.
pub const DSCP_CS6_TOS: u32 = 0xc0;

/// The heartbeat runtime: one worker thread at nice [`THREAD_NICE`], shared
/// by every daemon of the process, never shut down. Heartbeat sockets are
/// registered with its reactor and every heartbeat task runs on it.
pub fn runtime() -> Result<tokio::runtime::Handle, HeartbeatError> {
    static RUNTIME: std::sync::OnceLock<Result<tokio::runtime::Runtime, String>> =
        std::sync::OnceLock::new();
    let built = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(1)
            .thread_name("vmhad-heartbeat")
            .on_thread_start(raise_priority)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    });
    match built {
        Ok(rt) => Ok(rt.handle().clone()),
        Err(e) => Err(HeartbeatError::Runtime(e.clone())),
    }
}

/// Runs on the heartbeat thread at its start: nice [`THREAD_NICE`] for this
/// thread only (Linux applies `setpriority` to a thread id). Without
/// `CAP_SYS_NICE` it stays at the process's value, which is logged.
fn raise_priority() {
    let tid = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(tid), THREAD_NICE) {
        tracing::warn!(
            error = %e,
            nice = THREAD_NICE,
            "cannot raise the heartbeat thread's priority; heartbeats may be delayed on a busy CPU"
        );
    }
}

/// A non-blocking UDP socket bound to `addr`, its datagrams marked DSCP CS6
/// and `SO_PRIORITY` [`SOCKET_PRIORITY`]. The marks are best effort (logged):
/// an unmarked heartbeat still works, only without precedence.
fn heartbeat_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // The TOS first: setting it resets SO_PRIORITY from its old TOS bits.
    let marked = if addr.is_ipv4() {
        socket.set_tos_v4(DSCP_CS6_TOS)
    } else {
        socket.set_tclass_v6(DSCP_CS6_TOS)
    };
    if let Err(e) = marked.and_then(|()| socket.set_priority(SOCKET_PRIORITY)) {
        tracing::warn!(%addr, error = %e, "cannot mark heartbeat datagrams as network control");
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// The heartbeat sockets of one node.
#[derive(Debug)]
pub struct Endpoint {
    sockets: Vec<Arc<UdpSocket>>,
    local: Vec<IpAddr>,
    peer: Vec<SocketAddr>,
    peer_name: String,
    sealer: Sealer,
    opener: Arc<Mutex<Opener>>,
    /// Version 4: the peer's last full module beats (shared with the
    /// receive tasks) and what we last sent ([`compact`]).
    beats: Arc<Mutex<compact::PeerBeats>>,
    sent: Mutex<compact::SendState>,
    rejections: Rejections,
    /// Set when a challenge should reach the peer before the next tick.
    prompt: Arc<Notify>,
    /// The heartbeat [`runtime`], whose reactor serves `sockets`.
    runtime: tokio::runtime::Handle,
}

impl Endpoint {
    /// Binds `address:port` for every local address; draws a new session.
    /// The sockets belong to the heartbeat [`runtime`]: spawn the tasks that
    /// use them there ([`Endpoint::spawn_receivers`] does).
    pub async fn bind(spec: EndpointSpec, key: &ClusterKey) -> Result<Endpoint, HeartbeatError> {
        if spec.local.len() != spec.peer.len() {
            return Err(HeartbeatError::NetworkCount {
                local: spec.local.len(),
                peer: spec.peer.len(),
            });
        }
        let handle = runtime()?;
        let _in_heartbeat_runtime = handle.enter();
        let mut sockets = Vec::with_capacity(spec.local.len());
        for ip in &spec.local {
            let addr = SocketAddr::new(*ip, spec.port);
            let socket = heartbeat_socket(addr)
                .and_then(UdpSocket::from_std)
                .map_err(|source| HeartbeatError::Bind { addr, source })?;
            sockets.push(Arc::new(socket));
        }
        Ok(Endpoint {
            sockets,
            local: spec.local,
            peer: spec
                .peer
                .iter()
                .map(|ip| SocketAddr::new(*ip, spec.peer_port))
                .collect(),
            peer_name: spec.peer_name,
            sealer: Sealer::new(key),
            opener: Arc::new(Mutex::new(Opener::new(key))),
            beats: Arc::new(Mutex::new(compact::PeerBeats::default())),
            sent: Mutex::new(compact::SendState::default()),
            rejections: Rejections::default(),
            prompt: Arc::new(Notify::new()),
            runtime: handle.clone(),
        })
    }

    /// The heartbeat [`runtime`]: spawn every task using this endpoint there.
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.runtime
    }

    pub fn networks(&self) -> usize {
        self.sockets.len()
    }

    /// This daemon's heartbeat session (put it in [`Payload::session`]).
    pub fn session(&self) -> u64 {
        self.sealer.session()
    }

    /// The counts of rejected datagrams (shared with the receive tasks).
    pub fn rejections(&self) -> Rejections {
        self.rejections.clone()
    }

    /// Resolves when a heartbeat should go out before the next tick: an
    /// unproven peer session arrived (it needs our challenge) or a new one was
    /// just accepted (the peer needs its echo to accept ours). Sending then
    /// makes the exchange after a restart take round trips, not intervals;
    /// the sender limits these extra rounds (replays can cause them).
    pub async fn prompted(&self) {
        self.prompt.notified().await
    }

    /// Sends `payload` on network `network` only.
    pub async fn send_on(&self, network: usize, payload: &Payload) -> Result<(), HeartbeatError> {
        let version = self.version_view().in_use();
        for frame in self.encode(payload, version)? {
            self.send_encoded(network, version, &frame).await?;
        }
        Ok(())
    }

    /// The datagram payloads of one round in format `version`, in sending
    /// order: one JSON payload before version 4, else the [`compact`] frames.
    fn encode(&self, payload: &Payload, version: u8) -> Result<Vec<Vec<u8>>, HeartbeatError> {
        if version < COMPACT_SINCE {
            return Ok(vec![encode_for(payload, version)?]);
        }
        let (peer_wants, our_wants) = {
            let beats = self.beats.lock().unwrap_or_else(|p| p.into_inner());
            (beats.peer_wants().to_vec(), beats.our_wants())
        };
        self.sent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .frames(payload, &peer_wants, our_wants)
    }

    /// What status shows of the heartbeat versions (shares the receiver's state).
    pub fn version_view(&self) -> VersionView {
        VersionView {
            opener: Arc::clone(&self.opener),
        }
    }

    async fn send_encoded(
        &self,
        network: usize,
        version: u8,
        encoded: &[u8],
    ) -> Result<(), HeartbeatError> {
        let (socket, peer) = match (self.sockets.get(network), self.peer.get(network)) {
            (Some(s), Some(p)) => (s, *p),
            _ => return Err(HeartbeatError::NoSuchNetwork(network)),
        };
        let handshake = self
            .opener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .handshake();
        let datagram = self
            .sealer
            .seal_version(version, peer.ip(), handshake, encoded)?;
        socket
            .send_to(&datagram, peer)
            .await
            .map_err(|source| HeartbeatError::Send { addr: peer, source })?;
        Ok(())
    }

    /// Sends `payload` on every network; returns the errors (a network that is
    /// down must not keep the others from being used).
    pub async fn send(&self, payload: &Payload) -> Vec<HeartbeatError> {
        let version = self.version_view().in_use();
        let frames = match self.encode(payload, version) {
            Ok(f) => f,
            Err(e) => return vec![e],
        };
        let mut errors = Vec::new();
        for network in 0..self.sockets.len() {
            for frame in &frames {
                if let Err(e) = self.send_encoded(network, version, frame).await {
                    // The network is down: the rest of the round would fail too.
                    errors.push(e);
                    break;
                }
            }
        }
        errors
    }

    /// Spawns one receive task per socket, sending accepted heartbeats to
    /// `tx` and counting rejected ones in [`Endpoint::rejections`], and a
    /// task logging the rejection counts. The tasks end when `tx`'s receiver
    /// is dropped or the handles are aborted. They run on the heartbeat
    /// [`runtime`].
    pub fn spawn_receivers(&self, tx: mpsc::Sender<Received>) -> Vec<JoinHandle<()>> {
        let handle = &self.runtime;
        let mut tasks: Vec<JoinHandle<()>> = self
            .sockets
            .iter()
            .enumerate()
            .map(|(network, socket)| {
                let socket = Arc::clone(socket);
                let opener = Arc::clone(&self.opener);
                let beats = Arc::clone(&self.beats);
                let rejections = self.rejections.clone();
                let prompt = Arc::clone(&self.prompt);
                let local = self.local.get(network).copied();
                let expected = self.peer.get(network).map(|a| a.ip());
                let peer_name = self.peer_name.clone();
                let tx = tx.clone();
                handle.spawn(async move {
                    let (Some(local), Some(expected)) = (local, expected) else {
                        return;
                    };
                    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
                    loop {
                        let (len, from) = match socket.recv_from(&mut buf).await {
                            Ok(r) => r,
                            Err(e) => {
                                tracing::debug!(network, error = %e, "heartbeat receive error");
                                tokio::time::sleep(Duration::from_millis(10)).await;
                                continue;
                            }
                        };
                        let at = Instant::now();
                        let datagram = buf.get(..len).unwrap_or_default();
                        match check(datagram, from, local, expected, &peer_name, &opener, &beats) {
                            Ok(opened) => {
                                if opened.new_session {
                                    prompt.notify_one();
                                }
                                let Some((payload, modules)) = opened.payload else {
                                    // Full module beats of version 4: kept
                                    // until the round's summary arrives.
                                    continue;
                                };
                                let received = Received {
                                    network,
                                    from,
                                    at,
                                    new_session: opened.new_session,
                                    payload,
                                    modules,
                                };
                                if tx.send(received).await.is_err() {
                                    return;
                                }
                            }
                            Err(reason) => {
                                if reason == Rejection::Unproven {
                                    prompt.notify_one();
                                }
                                rejections.record(network, from, &reason, at);
                            }
                        }
                    }
                })
            })
            .collect();
        let rejections = self.rejections.clone();
        tasks.push(handle.spawn(async move {
            let mut ticker = tokio::time::interval(REJECT_LOG_INTERVAL);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                if tx.is_closed() {
                    return;
                }
                rejections.flush(Instant::now());
            }
        }));
        tasks
    }
}

/// A payload as its version carries it.
enum Decoded {
    Json(Payload),
    Compact(compact::Frame),
}

/// Every check of a datagram `from` arriving on the socket of `local`, whose
/// peer address on that network is `expected`. The payload is `None` for a
/// version-4 datagram of full module beats: they are kept in `beats` and
/// delivered with the round's summary.
pub fn check(
    datagram: &[u8],
    from: SocketAddr,
    local: IpAddr,
    expected: IpAddr,
    peer_name: &str,
    opener: &Mutex<Opener>,
    beats: &Mutex<compact::PeerBeats>,
) -> Result<Opened<Option<Round>>, Rejection> {
    if from.ip() != expected {
        // Checked before the MAC only to keep strangers cheap; a genuine
        // datagram from an unexpected address is still refused.
        return Err(Rejection::WrongSource(from.ip()));
    }
    let opened = {
        let mut opener = opener.lock().unwrap_or_else(|p| p.into_inner());
        opener.open(datagram, local, |header, bytes| {
            if header.version >= COMPACT_SINCE {
                return Ok(Decoded::Compact(compact::accept(
                    bytes,
                    header.session,
                    peer_name,
                )?));
            }
            let payload: Payload = serde_json::from_slice(bytes).map_err(|_| Rejection::Payload)?;
            if payload.session != header.session {
                return Err(Rejection::Payload);
            }
            if payload.node != peer_name {
                return Err(Rejection::WrongNode(payload.node));
            }
            Ok(Decoded::Json(payload))
        })?
    };
    // Only now, the datagram having passed every check, does the kept state
    // change (an unproven or replayed frame changes nothing).
    Ok(match opened.payload {
        Decoded::Json(payload) => Opened {
            session: opened.session,
            new_session: opened.new_session,
            payload: Some(split(payload)),
        },
        Decoded::Compact(frame) => {
            let mut beats = beats.lock().unwrap_or_else(|p| p.into_inner());
            match beats.apply(frame, opened.session, opened.new_session) {
                Some((payload, modules, new_session)) => Opened {
                    session: opened.session,
                    new_session,
                    payload: Some((payload, modules)),
                },
                None => Opened {
                    session: opened.session,
                    new_session: opened.new_session,
                    payload: None,
                },
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Role;
    use proptest::prelude::*;

    /// The per-key digests of the largest configuration (32 modules, every
    /// key spelled out) stay far below the datagram limit.
    #[test]
    fn per_key_digests_of_32_modules_fit_in_a_datagram() {
        let mut text = String::from(
            "[cluster]\nname = \"pair1\"\nwitness = [\"10.0.0.254\", \"10.0.0.253:22\"]\n\n[[node]]\nname = \"node1\"\naddresses = [\"10.0.0.1\", \"10.1.0.1\"]\n\n[[node]]\nname = \"node2\"\naddresses = [\"10.0.0.2\", \"10.1.0.2\"]\n",
        );
        for i in 0..crate::config::MAX_MODULES {
            text.push_str(&format!(
                "\n[[module]]\nname = \"a-rather-long-module-name-{i:02}\"\nreplicated = [\"/var/lib/libvirt/images/a-rather-long-directory-{i:02}\"]\nport = {}\ndefault_primary = \"node1\"\n",
                7200 + i
            ));
        }
        let config = crate::config::Config::from_toml_str(&text).unwrap();
        let mut beat = payload("node1", 1, 1);
        beat.config_keys = config.cluster_key_digests().clone();
        let template = beat.modules[0].clone();
        beat.modules = config
            .modules
            .iter()
            .map(|m| ModuleBeat {
                name: m.name.clone(),
                keys: config.module_key_digests(&m.name).unwrap().clone(),
                ..template.clone()
            })
            .collect();
        let bytes = serde_json::to_vec(&beat).unwrap();
        eprintln!(
            "payload of 32 modules with per-key digests: {} bytes",
            bytes.len()
        );
        assert!(bytes.len() < MAX_DATAGRAM / 2, "{} bytes", bytes.len());
        // One digest per module setting (14 with `protocol`).
        assert_eq!(beat.modules[0].keys.len(), 14);
    }

    fn key(byte: u8) -> ClusterKey {
        ClusterKey::from_bytes([byte; 32])
    }

    fn payload(node: &str, session: u64, round: u64) -> Payload {
        Payload {
            node: node.to_string(),
            session,
            round,
            config_hash: Digest([1; 32]),
            modules: vec![ModuleBeat {
                name: "vm1".into(),
                module_hash: Digest([2; 32]),
                announce: Announce {
                    live_swap: true,
                    ..Announce::ready(Role::Prim)
                },
                history: History::empty(),
                changed_bytes: 0,
                resync: None,
                keys: Default::default(),
            }],
            config_keys: Default::default(),
            software: None,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const A: &str = "10.0.0.1";

    fn raw(
        opener: &mut Opener,
        datagram: &[u8],
        local: &str,
    ) -> Result<Opened<Vec<u8>>, Rejection> {
        opener.open(datagram, ip(local), |_, bytes| Ok(bytes.to_vec()))
    }

    /// A sender's session plus what it echoes, as a peer daemon would.
    struct Peer {
        sealer: Sealer,
        opener: Opener,
    }

    impl Peer {
        fn new(k: u8) -> Peer {
            Peer {
                sealer: Sealer::new(&key(k)),
                opener: Opener::new(&key(k)),
            }
        }

        fn seal(&self, body: &[u8]) -> Vec<u8> {
            self.sealer
                .seal(ip(A), self.opener.handshake(), body)
                .unwrap()
        }
    }

    /// `a` and `b` exchange heartbeats until each trusts the other's session.
    fn handshake(a: &mut Peer, b: &mut Peer) {
        for _ in 0..3 {
            let to_b = a.seal(b"a");
            let _ = raw(&mut b.opener, &to_b, A);
            let to_a = b.seal(b"b");
            let _ = raw(&mut a.opener, &to_a, A);
        }
        assert_eq!(a.opener.trusted_session(), Some(b.sealer.session()));
        assert_eq!(b.opener.trusted_session(), Some(a.sealer.session()));
    }

    #[test]
    fn a_new_session_is_accepted_once_it_echoes_the_challenge() {
        let mut me = Opener::new(&key(1));
        let peer = Sealer::new(&key(1));
        // Before it has heard our challenge: authentic, but unproven.
        let first = peer.seal(ip(A), Handshake::default(), b"x").unwrap();
        assert_eq!(raw(&mut me, &first, A), Err(Rejection::Unproven));
        // Trusting nobody, we answer its challenge; it answers ours.
        let answer = Handshake {
            challenge: 99,
            echo: me.handshake().challenge,
        };
        let second = peer.seal(ip(A), answer, b"y").unwrap();
        let opened = raw(&mut me, &second, A).unwrap();
        assert!(opened.new_session);
        assert_eq!(opened.payload, b"y");
        assert_eq!(me.trusted_session(), Some(peer.session()));
        assert_eq!(me.handshake().echo, 99);
        // The challenge changed: it never proves another session again.
        assert_ne!(me.handshake().challenge, answer.echo);
        // Later datagrams of the session need no echo, only counters.
        let third = peer.seal(ip(A), Handshake::default(), b"z").unwrap();
        let opened = raw(&mut me, &third, A).unwrap();
        assert!(!opened.new_session);
    }

    #[test]
    fn an_old_counter_of_the_trusted_session_is_replayed() {
        let (mut a, mut b) = (Peer::new(1), Peer::new(1));
        handshake(&mut a, &mut b);
        let d1 = a.seal(b"1");
        let d2 = a.seal(b"2");
        assert!(raw(&mut b.opener, &d2, A).is_ok());
        assert_eq!(raw(&mut b.opener, &d2, A), Err(Rejection::Replayed));
        assert_eq!(raw(&mut b.opener, &d1, A), Err(Rejection::Replayed));
        assert!(raw(&mut b.opener, &a.seal(b"3"), A).is_ok());
    }

    #[test]
    fn counters_are_per_network() {
        let (mut a, mut b) = (Peer::new(1), Peer::new(1));
        handshake(&mut a, &mut b);
        // One round: counter n to network 0, n+1 to network 1; network 1's
        // arrives first.
        let hs = a.opener.handshake();
        let net0 = a.sealer.seal(ip("10.0.0.1"), hs, b"0").unwrap();
        let net1 = a.sealer.seal(ip("10.1.0.1"), hs, b"1").unwrap();
        assert!(raw(&mut b.opener, &net1, "10.1.0.1").is_ok());
        assert!(raw(&mut b.opener, &net0, "10.0.0.1").is_ok());
        assert_eq!(
            raw(&mut b.opener, &net0, "10.1.0.1"),
            Err(Rejection::WrongDestination(ip("10.0.0.1")))
        );
    }

    #[test]
    fn a_restarted_peer_is_accepted_and_its_old_session_never_again() {
        let (mut a, mut b) = (Peer::new(1), Peer::new(1));
        handshake(&mut a, &mut b);
        // Everything an attacker could record of a's first run, including
        // datagrams echoing b's challenge of the time.
        let recorded: Vec<Vec<u8>> = (0..3).map(|i| a.seal(&[i])).collect();
        // a restarts: new session, counters from 1 (behind its old ones).
        let mut a2 = Peer::new(1);
        assert!(a2.sealer.session() != a.sealer.session());
        handshake(&mut a2, &mut b);
        // The old run's datagrams, replayed: refused, trust unchanged.
        for d in &recorded {
            assert_eq!(raw(&mut b.opener, d, A), Err(Rejection::Unproven));
        }
        assert_eq!(b.opener.trusted_session(), Some(a2.sealer.session()));
        assert!(raw(&mut b.opener, &a2.seal(b"live"), A).is_ok());
    }

    #[test]
    fn a_restarted_receiver_accepts_no_datagram_recorded_before() {
        let (mut a, mut b) = (Peer::new(1), Peer::new(1));
        handshake(&mut a, &mut b);
        let recorded = a.seal(b"old");
        // b restarts: it trusts nothing; the recording echoes its old challenge.
        let mut b2 = Peer::new(1);
        assert_eq!(raw(&mut b2.opener, &recorded, A), Err(Rejection::Unproven));
        assert_eq!(b2.opener.trusted_session(), None);
        // The live a (still trusting b's old session) and b2 find each other.
        handshake(&mut a, &mut b2);
    }

    #[test]
    fn forged_and_tampered_are_rejected() {
        let good = Sealer::new(&key(1));
        let evil = Sealer::new(&key(2));
        let mut opener = Opener::new(&key(1));
        let proof = Handshake {
            challenge: 5,
            echo: opener.handshake().challenge,
        };
        let d = evil.seal(ip(A), proof, b"x").unwrap();
        assert_eq!(raw(&mut opener, &d, A), Err(Rejection::Forged));
        let mut d = good.seal(ip(A), proof, b"payload").unwrap();
        d[HEADER_LEN] ^= 1;
        assert_eq!(raw(&mut opener, &d, A), Err(Rejection::Forged));
        // A forged "session switch" header: the MAC covers session and echo.
        let mut d = good.seal(ip(A), proof, b"payload").unwrap();
        d[5] ^= 1;
        assert_eq!(raw(&mut opener, &d, A), Err(Rejection::Forged));
        assert_eq!(raw(&mut opener, &[0u8; 10], A), Err(Rejection::Malformed));
        assert_eq!(opener.trusted_session(), None);
        // The genuine one passes.
        let d = good.seal(ip(A), proof, b"payload").unwrap();
        assert!(raw(&mut opener, &d, A).is_ok());
    }

    #[test]
    fn other_versions_are_named() {
        let mut opener = Opener::new(&key(1)).with_versions(VERSIONS);
        let mut body = good_body(1, b"{}");
        body[4] = 7;
        body[5] = 7;
        body[6] = 8;
        let d = with_mac(&key(1), body);
        let e = raw(&mut opener, &d, A);
        assert_eq!(
            e,
            Err(Rejection::Version {
                version: 7,
                theirs: Versions { min: 7, max: 8 },
                ours: VERSIONS
            })
        );
        assert_eq!(
            e.err().map(|e| e.to_string()).unwrap_or_default(),
            "heartbeat format version 7 (the peer reads 7..=8), this vmhad reads 2..=4: no common version, upgrade the older node"
        );
    }

    /// Each side sends the highest format both read once it has heard the other;
    /// an older peer's datagrams are read, and its range learnt, at once.
    #[test]
    fn the_highest_common_format_is_sent() {
        let new = Sealer::new(&key(1)).with_versions(Versions { min: 2, max: 3 });
        let old = Sealer::new(&key(1)).with_versions(Versions { min: 2, max: 2 });
        let mut at_new = Opener::new(&key(1)).with_versions(new.versions());
        let mut at_old = Opener::new(&key(1)).with_versions(old.versions());
        assert_eq!(at_new.send_version(), 3);
        // The new side's first datagram (format 3) is refused by the old one,
        // naming both ranges.
        let d = new.seal(ip(A), at_new.handshake(), b"x").unwrap();
        assert!(matches!(
            raw(&mut at_old, &d, A),
            Err(Rejection::Version { version: 3, .. })
        ));
        // The old side's datagram (format 2) is read by the new one.
        let d = old.seal(ip(A), at_old.handshake(), b"x").unwrap();
        assert_eq!(d[4], 2);
        let _ = raw(&mut at_new, &d, A);
        assert_eq!(at_new.peer_versions(), Some(Versions { min: 2, max: 2 }));
        assert_eq!(at_new.send_version(), 2);
        let d = new
            .seal_version(at_new.send_version(), ip(A), at_new.handshake(), b"x")
            .unwrap();
        assert_ne!(
            raw(&mut at_old, &d, A).err().map(|e| e.kind()),
            Some("version")
        );
        // Version 2 payloads carry no `software`.
        let mut p = payload("node2", 1, 1);
        p.software = Some("9.9".into());
        let v2 = String::from_utf8(encode_for(&p, 2).unwrap()).unwrap();
        let v3 = String::from_utf8(encode_for(&p, 3).unwrap()).unwrap();
        assert!(!v2.contains("software") && v3.contains("\"software\":\"9.9\""));
    }

    #[test]
    fn a_bad_payload_changes_no_trust() {
        let mut opener = Opener::new(&key(1));
        let sealer = Sealer::new(&key(1));
        let proof = Handshake {
            challenge: 5,
            echo: opener.handshake().challenge,
        };
        let d = sealer.seal(ip(A), proof, b"x").unwrap();
        let r = opener.open(&d, ip(A), |_, _| -> Result<(), _> {
            Err(Rejection::WrongNode("node3".into()))
        });
        assert_eq!(r, Err(Rejection::WrongNode("node3".into())));
        assert_eq!(opener.trusted_session(), None);
        assert_eq!(opener.handshake().challenge, proof.echo);
        assert!(raw(&mut opener, &d, A).is_ok());
    }

    #[test]
    fn rejections_are_counted_and_logged_at_a_bounded_rate() {
        let r = Rejections::default();
        let from: SocketAddr = "10.0.0.2:7100".parse().unwrap();
        let t0 = Instant::now();
        let mut lines = 0;
        for i in 0..1000u64 {
            let at = t0 + Duration::from_micros(i * 100);
            lines += usize::from(r.record(0, from, &Rejection::Forged, at));
        }
        lines += usize::from(r.record(0, from, &Rejection::Replayed, t0));
        // One line per kind; the 999 other forged ones in one count line
        // once the interval has passed, and not before.
        assert_eq!(lines, 2);
        assert_eq!(r.flush(t0 + Duration::from_millis(500)), 0);
        assert_eq!(r.flush(t0 + REJECT_LOG_INTERVAL), 1);
        assert_eq!(r.flush(t0 + REJECT_LOG_INTERVAL * 5), 0);
        let counts = r.counts();
        assert_eq!(counts["forged"], 1000);
        assert_eq!(counts["replayed"], 1);
        assert!(r.record(0, from, &Rejection::Forged, t0 + REJECT_LOG_INTERVAL * 3));
    }

    #[test]
    fn liveness_needs_all_networks_silent() {
        let t0 = Instant::now();
        let mut l = Liveness::new(2);
        let timeout = Duration::from_millis(100);
        assert!(!l.all_silent_for(t0 + Duration::from_secs(10), timeout));
        l.record(0, t0);
        l.record(1, t0 + Duration::from_millis(80));
        assert!(!l.all_silent_for(t0 + Duration::from_millis(150), timeout));
        assert!(l.all_silent_for(t0 + Duration::from_millis(180), timeout));
        assert_eq!(
            l.ages_ms(t0 + Duration::from_millis(100)),
            vec![Some(100), Some(20)]
        );
    }

    /// A header (any session/counter/handshake) to `A` around `payload`.
    fn good_body(session: u64, payload: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(MAGIC);
        body.extend_from_slice(&[VERSION, 2, VERSION]);
        for field in [session, 1, 2, 3] {
            body.extend_from_slice(&field.to_be_bytes());
        }
        body.extend_from_slice(&ip_bytes(ip(A)));
        body.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        body.extend_from_slice(payload);
        body
    }

    fn with_mac(k: &ClusterKey, mut body: Vec<u8>) -> Vec<u8> {
        let mac = blake3::keyed_hash(&mac_key(k), &body);
        body.extend_from_slice(mac.as_bytes());
        body
    }

    fn check_all(
        opener: &Mutex<Opener>,
        datagram: &[u8],
    ) -> Result<Opened<Option<Round>>, Rejection> {
        let beats = Mutex::new(compact::PeerBeats::default());
        check(
            datagram,
            "10.0.0.2:7100".parse().unwrap(),
            ip(A),
            ip("10.0.0.2"),
            "node2",
            opener,
            &beats,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Arbitrary bytes never panic the decoder and are never accepted
        /// without the key, whatever the receiver's state.
        #[test]
        fn arbitrary_datagrams_are_rejected(
            bytes in proptest::collection::vec(any::<u8>(), 0..2048),
            trusted in any::<bool>(),
        ) {
            let opener = Mutex::new(Opener::new(&key(1)));
            if trusted {
                opener.lock().unwrap().trusted = Some(Trusted { session: 1, last: HashMap::new() });
            }
            prop_assert!(check_all(&opener, &bytes).is_err());
        }

        /// Arbitrary headers and payloads under a valid MAC never panic the
        /// decoder, and only a well-formed heartbeat of the trusted session
        /// or one proving a new session is accepted.
        #[test]
        fn authenticated_arbitrary_content_never_panics(
            mut head in proptest::collection::vec(any::<u8>(), HEADER_LEN..HEADER_LEN + 1),
            payload in proptest::collection::vec(any::<u8>(), 0..512),
            keep_magic in any::<bool>(),
        ) {
            if keep_magic {
                head[..4].copy_from_slice(MAGIC);
                head[4] = VERSION;
                head[5] = 2;
                head[6] = VERSION;
            }
            let mut body = head;
            body.extend_from_slice(&payload);
            let datagram = with_mac(&key(1), body);
            let opener = Mutex::new(Opener::new(&key(1)));
            let _ = check_all(&opener, &datagram);
            let mut o = Opener::new(&key(1));
            let _ = raw(&mut o, &datagram, A);
        }

        /// Arbitrary JSON-ish payloads in a proven, authentic datagram never
        /// panic the payload decoder.
        #[test]
        fn authenticated_arbitrary_payloads_never_panic(
            text in "\\PC{0,300}",
            session in any::<u64>(),
        ) {
            let opener = Mutex::new(Opener::new(&key(1)));
            let challenge = opener.lock().unwrap().handshake().challenge;
            let sealer = Sealer::with_session(&key(1), session);
            let hs = Handshake { challenge: 7, echo: challenge };
            let d = sealer.seal(ip(A), hs, text.as_bytes()).unwrap();
            let r = check_all(&opener, &d);
            if let Ok(Opened { payload: Some((payload, _)), .. }) = r {
                prop_assert_eq!(payload.session, session);
            }
        }
    }

    fn free_udp_port(ips: &[&str]) -> u16 {
        'outer: for _ in 0..50 {
            let s = std::net::UdpSocket::bind((ip(ips[0]), 0)).unwrap();
            let port = s.local_addr().unwrap().port();
            drop(s);
            for i in ips {
                if std::net::UdpSocket::bind((ip(i), port)).is_err() {
                    continue 'outer;
                }
            }
            return port;
        }
        panic!("no free port");
    }

    async fn pair() -> (Endpoint, Endpoint) {
        let port = free_udp_port(&["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"]);
        let a = Endpoint::bind(
            EndpointSpec {
                local: vec![ip("127.0.0.1"), ip("127.0.0.3")],
                port,
                peer: vec![ip("127.0.0.2"), ip("127.0.0.4")],
                peer_port: port,
                peer_name: "node2".into(),
            },
            &key(9),
        )
        .await
        .unwrap();
        let b = Endpoint::bind(
            EndpointSpec {
                local: vec![ip("127.0.0.2"), ip("127.0.0.4")],
                port,
                peer: vec![ip("127.0.0.1"), ip("127.0.0.3")],
                peer_port: port,
                peer_name: "node1".into(),
            },
            &key(9),
        )
        .await
        .unwrap();
        (a, b)
    }

    async fn next(rx: &mut mpsc::Receiver<Received>) -> Received {
        tokio::time::timeout(Duration::from_secs(2), rx.recv())
            .await
            .unwrap()
            .unwrap()
    }

    /// `b` sends on every network until `a` accepts its session.
    async fn introduce(a: &Endpoint, b: &Endpoint, rx: &mut mpsc::Receiver<Received>) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let (tx_b, mut rx_b) = mpsc::channel(64);
        let tasks = b.spawn_receivers(tx_b);
        let mut round = 0;
        loop {
            round += 1;
            assert!(b
                .send(&payload("node2", b.session(), round))
                .await
                .is_empty());
            assert!(a
                .send(&payload("node1", a.session(), round))
                .await
                .is_empty());
            tokio::time::sleep(Duration::from_millis(20)).await;
            while rx_b.try_recv().is_ok() {}
            if let Ok(r) = rx.try_recv() {
                assert!(r.new_session);
                break;
            }
            assert!(Instant::now() < deadline, "no handshake");
        }
        for t in tasks {
            t.abort();
        }
        while rx.try_recv().is_ok() {}
    }

    #[tokio::test]
    async fn heartbeat_datagrams_are_marked_network_control() {
        let (a, b) = pair().await;
        for socket in a.sockets.iter().chain(&b.sockets) {
            let socket = socket2::SockRef::from(socket.as_ref());
            assert_eq!(socket.tos_v4().unwrap(), DSCP_CS6_TOS);
            assert_eq!(socket.priority().unwrap(), SOCKET_PRIORITY);
        }
    }

    /// Busy work on the caller's runtime (a module task, a slow call) does
    /// not delay heartbeats: they are read, and time-stamped, on the
    /// heartbeat thread meanwhile, so the silence is never the reader's.
    #[tokio::test(flavor = "current_thread")]
    async fn heartbeats_are_received_while_the_callers_runtime_is_blocked() {
        let (a, b) = pair().await;
        let (tx, mut rx) = mpsc::channel(64);
        let _tasks = a.spawn_receivers(tx);
        introduce(&a, &b, &mut rx).await;
        let b = Arc::new(b);
        let sender = {
            let b = Arc::clone(&b);
            // The peer is another host: its own thread and runtime.
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    for round in 100..110 {
                        assert!(b
                            .send(&payload("node2", b.session(), round))
                            .await
                            .is_empty());
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                });
            })
        };
        let blocked_at = Instant::now();
        // Blocks this (single-threaded) runtime, as a busy task would.
        std::thread::sleep(Duration::from_millis(1500));
        let resumed = Instant::now();
        sender.join().unwrap();
        let first = next(&mut rx).await;
        assert!(
            first.at + Duration::from_millis(700) < resumed,
            "the first heartbeat was read {:?} after the block began, {:?} before it ended",
            first.at - blocked_at,
            resumed.saturating_duration_since(first.at)
        );
    }

    #[tokio::test]
    async fn an_unproven_session_prompts_a_heartbeat_and_so_does_its_acceptance() {
        let (a, b) = pair().await;
        let (tx, mut rx) = mpsc::channel(16);
        let _tasks = a.spawn_receivers(tx);
        let prompted = || tokio::time::timeout(Duration::from_secs(2), a.prompted());
        // b's first heartbeat cannot echo a's challenge: a is prompted to
        // send its challenge now.
        b.send_on(0, &payload("node2", b.session(), 1))
            .await
            .unwrap();
        prompted().await.unwrap();
        // (Version 4: the round's full beats and its summary, each unproven.)
        assert!(a.rejections().counts()["unproven"] >= 1);
        // b answers with a's challenge (as b's receiver would have learnt it).
        let hs = Handshake {
            challenge: 5,
            echo: a.opener.lock().unwrap().handshake().challenge,
        };
        // A version-3 (JSON) datagram: the opener's rules are the same.
        let body = serde_json::to_vec(&payload("node2", b.session(), 2)).unwrap();
        let d = b
            .sealer
            .seal_version(3, ip("127.0.0.1"), hs, &body)
            .unwrap();
        b.sockets[0]
            .send_to(&d, a.sockets[0].local_addr().unwrap())
            .await
            .unwrap();
        assert!(next(&mut rx).await.new_session);
        prompted().await.unwrap();
        // Nothing pending after that.
        assert!(
            tokio::time::timeout(Duration::from_millis(100), a.prompted())
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn two_endpoints_on_two_networks() {
        let (a, b) = pair().await;
        let (tx, mut rx) = mpsc::channel(16);
        let _tasks = a.spawn_receivers(tx);
        introduce(&a, &b, &mut rx).await;
        let beat = payload("node2", b.session(), 100);
        assert!(b.send(&beat).await.is_empty());
        let mut networks = Vec::new();
        for _ in 0..2 {
            let r = next(&mut rx).await;
            let mut got = r.payload.clone();
            got.modules = r.modules.iter().map(|b| (**b).clone()).collect();
            assert_eq!(got, beat);
            assert!(!r.new_session);
            networks.push(r.network);
        }
        networks.sort();
        assert_eq!(networks, vec![0, 1]);
    }

    async fn wait_count(a: &Endpoint, kind: &str, at_least: u64) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while a.rejections().counts().get(kind).copied().unwrap_or(0) < at_least {
            assert!(
                Instant::now() < deadline,
                "{kind}: {:?}",
                a.rejections().counts()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn forged_replayed_and_wrong_node_are_rejected_and_counted() {
        let (a, b) = pair().await;
        let (tx, mut rx) = mpsc::channel(16);
        let _tasks = a.spawn_receivers(tx);
        introduce(&a, &b, &mut rx).await;
        let target = a.sockets[0].local_addr().unwrap();
        // Right source address, wrong key, proving nothing: a flood.
        let evil = std::net::UdpSocket::bind("127.0.0.2:0").unwrap();
        let body = serde_json::to_vec(&payload("node2", 1, 1)).unwrap();
        let forged = Sealer::with_session(&key(3), 1)
            .seal(ip("127.0.0.1"), Handshake::default(), &body)
            .unwrap();
        for _ in 0..50 {
            evil.send_to(&forged, target).unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        wait_count(&a, "forged", 50).await;
        // Genuine key, but claims to be another node.
        b.send_on(0, &payload("node3", b.session(), 1))
            .await
            .unwrap();
        wait_count(&a, "wrong_node", 1).await;
        // Replay of a genuine datagram captured earlier.
        let hs = b.opener.lock().unwrap().handshake();
        let body = serde_json::to_vec(&payload("node2", b.session(), 2)).unwrap();
        let sealed = b
            .sealer
            .seal_version(3, ip("127.0.0.1"), hs, &body)
            .unwrap();
        b.sockets[0].send_to(&sealed, target).await.unwrap();
        assert!(!next(&mut rx).await.new_session);
        b.sockets[0].send_to(&sealed, target).await.unwrap();
        wait_count(&a, "replayed", 1).await;
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_silent_network_alone_is_not_peer_loss() {
        let (a, b) = pair().await;
        let (tx, mut rx) = mpsc::channel(64);
        let _tasks = a.spawn_receivers(tx);
        introduce(&a, &b, &mut rx).await;
        let timeout = Duration::from_millis(300);
        let mut live = Liveness::new(2);
        let start = Instant::now();
        let mut round = 0;
        // Network 1 goes silent: only network 0 carries heartbeats.
        while start.elapsed() < Duration::from_millis(600) {
            round += 1;
            b.send_on(0, &payload("node2", b.session(), round))
                .await
                .unwrap();
            let r = next(&mut rx).await;
            live.record(r.network, r.at);
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        assert!(live.last_seen(1).is_none());
        assert!(!live.all_silent_for(Instant::now(), timeout));
        // Now every network is silent.
        tokio::time::sleep(timeout).await;
        assert!(live.all_silent_for(Instant::now(), timeout));
    }
}
