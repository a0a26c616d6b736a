//! Authenticated UDP heartbeats on every network (design, "Controller").
//!
//! Each node binds `address:heartbeat_port` for every one of its addresses and
//! sends, every `heartbeat_interval_ms`, one datagram from its address on
//! network `i` to the peer's address on network `i`. The peer is dead only
//! when all networks have been silent for `failover_timeout_ms`
//! ([`Liveness::all_silent_for`]).
//!
//! Datagram (choices where the design is silent):
//! ```text
//! "VMHB" | version u8 = 1 | counter u64 BE | destination IP (16 bytes, v6-mapped)
//!        | payload length u32 BE | payload (JSON) | MAC (32 bytes)
//! ```
//! The MAC is keyed blake3 over everything before it, with a key derived from
//! the cluster key (`blake3::derive_key`, context "vmha heartbeat v1"), so the
//! heartbeat MAC never doubles as a replication-link one. The counter is the
//! sender's wall clock in microseconds, forced strictly increasing. The
//! receiver rejects a datagram that is forged (bad MAC), not addressed to the
//! address it arrived on (a datagram from one network replayed on another),
//! from a source that is not the peer's address for that network, replayed
//! (counter not above the last one accepted from that source), or stale (counter
//! more than [`Opener::max_age`] away from the local clock: nodes must keep
//! their clocks within that of each other, 30 s by default; NTP does).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use vmha_fs::key::ClusterKey;

use crate::config::Digest;
use crate::generation::History;
use crate::state::Announce;
use crate::status::ResyncStatus;

const MAGIC: &[u8; 4] = b"VMHB";
const VERSION: u8 = 1;
const HEADER_LEN: usize = 4 + 1 + 8 + 16 + 4;
const MAC_LEN: usize = 32;
/// Largest datagram accepted (and sent).
pub const MAX_DATAGRAM: usize = 65_000;
/// Default tolerance of clock differences between the nodes.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(30);

/// Errors of the heartbeat layer.
#[derive(Debug, thiserror::Error)]
pub enum HeartbeatError {
    #[error("cannot bind heartbeat socket {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the node has {local} addresses but its peer has {peer}: one per network on both")]
    NetworkCount { local: usize, peer: usize },
    #[error("cannot encode heartbeat: {0}")]
    Encode(#[from] serde_json::Error),
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
    #[error("bad MAC (forged, or a different cluster key)")]
    Forged,
    #[error("addressed to {0}, not to this socket")]
    WrongDestination(IpAddr),
    #[error("source {0} is not the peer's address on this network")]
    WrongSource(IpAddr),
    #[error("replayed (counter not increasing)")]
    Replayed,
    #[error("stale or from the future (clocks more than the allowed skew apart?)")]
    Stale,
    #[error("undecodable payload")]
    Payload,
    #[error("sent by `{0}`, not by the peer")]
    WrongNode(String),
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
}

/// The authenticated content of a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payload {
    pub node: String,
    /// Random per daemon start: tells a restarted peer from a running one.
    pub session: u64,
    /// Incremented per send round (the same round goes out on every network).
    pub round: u64,
    pub config_hash: Digest,
    pub modules: Vec<ModuleBeat>,
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn mac_key(key: &ClusterKey) -> [u8; 32] {
    blake3::derive_key("vmha heartbeat v1", key.as_bytes())
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

/// Builds authenticated datagrams.
#[derive(Debug)]
pub struct Sealer {
    key: [u8; 32],
    counter: AtomicU64,
}

impl Sealer {
    pub fn new(key: &ClusterKey) -> Sealer {
        Sealer {
            key: mac_key(key),
            counter: AtomicU64::new(0),
        }
    }

    fn next_counter(&self) -> u64 {
        let now = now_micros();
        let mut prev = self.counter.load(Ordering::Relaxed);
        loop {
            let next = now.max(prev.saturating_add(1));
            match self
                .counter
                .compare_exchange(prev, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(actual) => prev = actual,
            }
        }
    }

    /// One datagram carrying `payload` (already encoded) for `destination`.
    pub fn seal(&self, destination: IpAddr, payload: &[u8]) -> Result<Vec<u8>, HeartbeatError> {
        let total = HEADER_LEN + payload.len() + MAC_LEN;
        if total > MAX_DATAGRAM {
            return Err(HeartbeatError::TooLarge(total));
        }
        let len = u32::try_from(payload.len()).map_err(|_| HeartbeatError::TooLarge(total))?;
        let mut out = Vec::with_capacity(total);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.next_counter().to_be_bytes());
        out.extend_from_slice(&ip_bytes(destination));
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(payload);
        let mac = blake3::keyed_hash(&self.key, &out);
        out.extend_from_slice(mac.as_bytes());
        Ok(out)
    }
}

/// Checks received datagrams: MAC, destination, replay, age.
#[derive(Debug)]
pub struct Opener {
    key: [u8; 32],
    /// Highest counter accepted per source address.
    last: HashMap<IpAddr, u64>,
    pub max_age: Duration,
}

impl Opener {
    pub fn new(key: &ClusterKey) -> Opener {
        Opener {
            key: mac_key(key),
            last: HashMap::new(),
            max_age: DEFAULT_MAX_AGE,
        }
    }

    /// The payload of a genuine, fresh datagram from `source` to `local`.
    pub fn open(
        &mut self,
        datagram: &[u8],
        source: IpAddr,
        local: IpAddr,
    ) -> Result<Vec<u8>, Rejection> {
        if datagram.len() < HEADER_LEN + MAC_LEN {
            return Err(Rejection::Malformed);
        }
        let (body, mac) = datagram.split_at(datagram.len() - MAC_LEN);
        let mac: [u8; 32] = mac.try_into().map_err(|_| Rejection::Malformed)?;
        // blake3::Hash compares in constant time.
        if blake3::keyed_hash(&self.key, body) != blake3::Hash::from_bytes(mac) {
            return Err(Rejection::Forged);
        }
        if &body[..4] != MAGIC || body[4] != VERSION {
            return Err(Rejection::Malformed);
        }
        let field = |range: std::ops::Range<usize>| body.get(range).ok_or(Rejection::Malformed);
        let counter =
            u64::from_be_bytes(field(5..13)?.try_into().map_err(|_| Rejection::Malformed)?);
        let dest: [u8; 16] = field(13..29)?
            .try_into()
            .map_err(|_| Rejection::Malformed)?;
        let len = u32::from_be_bytes(
            field(29..33)?
                .try_into()
                .map_err(|_| Rejection::Malformed)?,
        );
        let payload = field(HEADER_LEN..body.len())?;
        if usize::try_from(len).ok() != Some(payload.len()) {
            return Err(Rejection::Malformed);
        }
        let dest = ip_from_bytes(dest);
        if dest != local {
            return Err(Rejection::WrongDestination(dest));
        }
        let now = now_micros();
        let max_age = u64::try_from(self.max_age.as_micros()).unwrap_or(u64::MAX);
        if counter.saturating_add(max_age) < now || counter > now.saturating_add(max_age) {
            return Err(Rejection::Stale);
        }
        let last = self.last.entry(source).or_insert(0);
        if counter <= *last {
            return Err(Rejection::Replayed);
        }
        *last = counter;
        Ok(payload.to_vec())
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
    pub payload: Payload,
}

/// What the receive tasks report.
#[derive(Debug, Clone)]
pub enum Incoming {
    Beat(Box<Received>),
    Rejected {
        network: usize,
        from: SocketAddr,
        reason: Rejection,
    },
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

/// The heartbeat sockets of one node.
#[derive(Debug)]
pub struct Endpoint {
    sockets: Vec<Arc<UdpSocket>>,
    local: Vec<IpAddr>,
    peer: Vec<SocketAddr>,
    peer_name: String,
    sealer: Sealer,
    opener: Arc<Mutex<Opener>>,
}

impl Endpoint {
    /// Binds `address:port` for every local address.
    pub async fn bind(spec: EndpointSpec, key: &ClusterKey) -> Result<Endpoint, HeartbeatError> {
        if spec.local.len() != spec.peer.len() {
            return Err(HeartbeatError::NetworkCount {
                local: spec.local.len(),
                peer: spec.peer.len(),
            });
        }
        let mut sockets = Vec::with_capacity(spec.local.len());
        for ip in &spec.local {
            let addr = SocketAddr::new(*ip, spec.port);
            let socket = UdpSocket::bind(addr)
                .await
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
        })
    }

    pub fn networks(&self) -> usize {
        self.sockets.len()
    }

    /// Sets the tolerated clock difference (tests use a short one).
    pub fn set_max_age(&self, max_age: Duration) {
        if let Ok(mut opener) = self.opener.lock() {
            opener.max_age = max_age;
        }
    }

    /// Sends `payload` on network `network` only.
    pub async fn send_on(&self, network: usize, payload: &Payload) -> Result<(), HeartbeatError> {
        let encoded = serde_json::to_vec(payload)?;
        self.send_encoded(network, &encoded).await
    }

    async fn send_encoded(&self, network: usize, encoded: &[u8]) -> Result<(), HeartbeatError> {
        let (socket, peer) = match (self.sockets.get(network), self.peer.get(network)) {
            (Some(s), Some(p)) => (s, *p),
            _ => return Err(HeartbeatError::NoSuchNetwork(network)),
        };
        let datagram = self.sealer.seal(peer.ip(), encoded)?;
        socket
            .send_to(&datagram, peer)
            .await
            .map_err(|source| HeartbeatError::Send { addr: peer, source })?;
        Ok(())
    }

    /// Sends `payload` on every network; returns the errors (a network that is
    /// down must not keep the others from being used).
    pub async fn send(&self, payload: &Payload) -> Vec<HeartbeatError> {
        let encoded = match serde_json::to_vec(payload) {
            Ok(e) => e,
            Err(e) => return vec![HeartbeatError::Encode(e)],
        };
        let mut errors = Vec::new();
        for network in 0..self.sockets.len() {
            if let Err(e) = self.send_encoded(network, &encoded).await {
                errors.push(e);
            }
        }
        errors
    }

    /// Spawns one receive task per socket, reporting to `tx`. The tasks end
    /// when `tx`'s receiver is dropped or the handles are aborted.
    pub fn spawn_receivers(&self, tx: mpsc::Sender<Incoming>) -> Vec<JoinHandle<()>> {
        self.sockets
            .iter()
            .enumerate()
            .map(|(network, socket)| {
                let socket = Arc::clone(socket);
                let opener = Arc::clone(&self.opener);
                let local = self.local.get(network).copied();
                let expected = self.peer.get(network).map(|a| a.ip());
                let peer_name = self.peer_name.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
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
                        let result = check(datagram, from, local, expected, &peer_name, &opener);
                        let incoming = match result {
                            Ok(payload) => Incoming::Beat(Box::new(Received {
                                network,
                                from,
                                at,
                                payload,
                            })),
                            Err(reason) => Incoming::Rejected {
                                network,
                                from,
                                reason,
                            },
                        };
                        if tx.send(incoming).await.is_err() {
                            return;
                        }
                    }
                })
            })
            .collect()
    }
}

fn check(
    datagram: &[u8],
    from: SocketAddr,
    local: IpAddr,
    expected: IpAddr,
    peer_name: &str,
    opener: &Mutex<Opener>,
) -> Result<Payload, Rejection> {
    if datagram.len() > MAX_DATAGRAM {
        return Err(Rejection::Malformed);
    }
    if from.ip() != expected {
        // Checked before the MAC only to keep strangers cheap; a genuine
        // datagram from an unexpected address is still refused.
        return Err(Rejection::WrongSource(from.ip()));
    }
    let bytes = {
        let mut opener = opener.lock().map_err(|_| Rejection::Malformed)?;
        opener.open(datagram, from.ip(), local)?
    };
    let payload: Payload = serde_json::from_slice(&bytes).map_err(|_| Rejection::Payload)?;
    if payload.node != peer_name {
        return Err(Rejection::WrongNode(payload.node));
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Readiness, Role};

    fn key(byte: u8) -> ClusterKey {
        ClusterKey::from_bytes([byte; 32])
    }

    fn payload(node: &str, round: u64) -> Payload {
        Payload {
            node: node.to_string(),
            session: 7,
            round,
            config_hash: Digest([1; 32]),
            modules: vec![ModuleBeat {
                name: "vm1".into(),
                module_hash: Digest([2; 32]),
                announce: Announce {
                    role: Role::Prim,
                    readiness: Readiness::Ready,
                    request: None,
                    forced: false,
                    disk: Default::default(),
                },
                history: History::empty(),
                changed_bytes: 0,
                resync: None,
            }],
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn seal_open_roundtrip_and_replay() {
        let sealer = Sealer::new(&key(1));
        let mut opener = Opener::new(&key(1));
        let d = sealer.seal(ip("10.0.0.1"), b"hello").unwrap();
        assert_eq!(
            opener.open(&d, ip("10.0.0.2"), ip("10.0.0.1")).unwrap(),
            b"hello"
        );
        assert_eq!(
            opener.open(&d, ip("10.0.0.2"), ip("10.0.0.1")),
            Err(Rejection::Replayed)
        );
        let d2 = sealer.seal(ip("10.0.0.1"), b"again").unwrap();
        assert!(opener.open(&d2, ip("10.0.0.2"), ip("10.0.0.1")).is_ok());
    }

    #[test]
    fn forged_and_tampered_are_rejected() {
        let good = Sealer::new(&key(1));
        let evil = Sealer::new(&key(2));
        let mut opener = Opener::new(&key(1));
        let d = evil.seal(ip("10.0.0.1"), b"x").unwrap();
        assert_eq!(
            opener.open(&d, ip("10.0.0.2"), ip("10.0.0.1")),
            Err(Rejection::Forged)
        );
        let mut d = good.seal(ip("10.0.0.1"), b"payload").unwrap();
        d[HEADER_LEN] ^= 1;
        assert_eq!(
            opener.open(&d, ip("10.0.0.2"), ip("10.0.0.1")),
            Err(Rejection::Forged)
        );
        assert_eq!(
            opener.open(&[0u8; 10], ip("10.0.0.2"), ip("10.0.0.1")),
            Err(Rejection::Malformed)
        );
    }

    #[test]
    fn other_network_and_stale_are_rejected() {
        let sealer = Sealer::new(&key(1));
        let mut opener = Opener::new(&key(1));
        let d = sealer.seal(ip("10.0.0.1"), b"x").unwrap();
        assert_eq!(
            opener.open(&d, ip("10.1.0.2"), ip("10.1.0.1")),
            Err(Rejection::WrongDestination(ip("10.0.0.1")))
        );
        opener.max_age = Duration::from_millis(1);
        let d = sealer.seal(ip("10.0.0.1"), b"x").unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(
            opener.open(&d, ip("10.0.0.2"), ip("10.0.0.1")),
            Err(Rejection::Stale)
        );
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

    async fn next(rx: &mut mpsc::Receiver<Incoming>) -> Incoming {
        tokio::time::timeout(Duration::from_secs(2), rx.recv())
            .await
            .unwrap()
            .unwrap()
    }

    #[tokio::test]
    async fn two_endpoints_on_two_networks() {
        let (a, b) = pair().await;
        let (tx, mut rx) = mpsc::channel(16);
        let _tasks = a.spawn_receivers(tx);
        assert!(b.send(&payload("node2", 1)).await.is_empty());
        let mut networks = Vec::new();
        for _ in 0..2 {
            match next(&mut rx).await {
                Incoming::Beat(r) => {
                    assert_eq!(r.payload, payload("node2", 1));
                    networks.push(r.network);
                }
                other => panic!("{other:?}"),
            }
        }
        networks.sort();
        assert_eq!(networks, vec![0, 1]);
    }

    #[tokio::test]
    async fn forged_datagram_and_wrong_node_are_rejected() {
        let (a, b) = pair().await;
        let (tx, mut rx) = mpsc::channel(16);
        let _tasks = a.spawn_receivers(tx);
        // Right source address, wrong key.
        let evil = std::net::UdpSocket::bind("127.0.0.2:0").unwrap();
        let forged = Sealer::new(&key(3))
            .seal(
                ip("127.0.0.1"),
                &serde_json::to_vec(&payload("node2", 1)).unwrap(),
            )
            .unwrap();
        evil.send_to(&forged, a.sockets[0].local_addr().unwrap())
            .unwrap();
        match next(&mut rx).await {
            Incoming::Rejected { reason, .. } => assert_eq!(reason, Rejection::Forged),
            other => panic!("{other:?}"),
        }
        // Genuine key, but claims to be another node.
        b.send_on(0, &payload("node3", 1)).await.unwrap();
        match next(&mut rx).await {
            Incoming::Rejected { reason, .. } => {
                assert_eq!(reason, Rejection::WrongNode("node3".into()))
            }
            other => panic!("{other:?}"),
        }
        // Replay of a genuine datagram captured earlier.
        let sealed = b
            .sealer
            .seal(
                ip("127.0.0.1"),
                &serde_json::to_vec(&payload("node2", 2)).unwrap(),
            )
            .unwrap();
        let target = a.sockets[0].local_addr().unwrap();
        b.sockets[0].send_to(&sealed, target).await.unwrap();
        b.sockets[0].send_to(&sealed, target).await.unwrap();
        assert!(matches!(next(&mut rx).await, Incoming::Beat(_)));
        match next(&mut rx).await {
            Incoming::Rejected { reason, .. } => assert_eq!(reason, Rejection::Replayed),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_silent_network_alone_is_not_peer_loss() {
        let (a, b) = pair().await;
        let (tx, mut rx) = mpsc::channel(64);
        let _tasks = a.spawn_receivers(tx);
        let timeout = Duration::from_millis(300);
        let mut live = Liveness::new(2);
        let start = Instant::now();
        let mut round = 0;
        // Network 1 goes silent: only network 0 carries heartbeats.
        while start.elapsed() < Duration::from_millis(600) {
            round += 1;
            b.send_on(0, &payload("node2", round)).await.unwrap();
            if let Incoming::Beat(r) = next(&mut rx).await {
                live.record(r.network, r.at);
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        assert!(live.last_seen(1).is_none());
        assert!(!live.all_silent_for(Instant::now(), timeout));
        // Now every network is silent.
        tokio::time::sleep(timeout).await;
        assert!(live.all_silent_for(Instant::now(), timeout));
    }
}
