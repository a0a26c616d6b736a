//! The split-brain witness probe (design, "Controller"): before going ALONE
//! without seeing its peer, a node checks that it reaches at least one witness.
//! TCP witness: a connection or a refusal is an answer. ICMP witness: an echo
//! reply, on a socket of our own: no external `ping` (a minimal Debian has
//! none, and a missing binary must never pass for a partition).
//!
//! A probe has three outcomes ([`WitnessOutcome`]): reachable, unreachable (no
//! answer in time, or the network says there is no route), and *could not
//! probe*: the probe itself could not run (no permission for an ICMP socket, a
//! local firewall refusing to send, no descriptors left...). That last one is a
//! fault of this node, not evidence of a partition, and is never reported as
//! "unreachable": in a partition both nodes would step down (total outage) for
//! a reason nobody sees. The errors are returned for the event log and `vmctl
//! status`. Blocking.
//!
//! ICMP sockets: an ICMP datagram socket ("ping socket", allowed for the groups
//! in `net.ipv4.ping_group_range`, which also covers IPv6) is tried first, then
//! a raw socket (needs `CAP_NET_RAW`; vmhad normally runs as root). Replies
//! are matched by source address, sequence number and a random payload (and
//! the identifier on raw sockets, which see every ICMP packet of the host).

use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use rustix::io::Errno;
use socket2::{Domain, Protocol, Socket, Type};

use crate::config::Witness;
pub use crate::state::WitnessOutcome;

/// How long one witness gets to answer.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a witness could not be probed.
#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    #[error("cannot open an ICMP socket (datagram: {datagram}; raw: {raw}): allow vmhad's group in net.ipv4.ping_group_range or give it CAP_NET_RAW")]
    NoIcmpSocket { datagram: io::Error, raw: io::Error },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
}

impl WitnessError {
    fn io(what: &'static str) -> impl FnOnce(io::Error) -> WitnessError {
        move |source| WitnessError::Io { what, source }
    }
}

/// What one probe of all witnesses found.
#[derive(Debug)]
pub struct Report {
    pub outcome: WitnessOutcome,
    /// Witnesses that could not be probed, as `"WITNESS: error"` (also when
    /// another witness answered: the operator should still hear of them).
    pub errors: Vec<String>,
}

/// Probes the witnesses in order until one answers: reachable if one does,
/// else could-not-probe if any could not be probed, else unreachable.
pub fn probe(witnesses: &[Witness]) -> Report {
    let mut errors = Vec::new();
    for w in witnesses {
        match probe_one(w, PROBE_TIMEOUT) {
            Ok(true) => {
                return Report {
                    outcome: WitnessOutcome::Reachable,
                    errors,
                }
            }
            Ok(false) => {}
            Err(e) => errors.push(format!("{}: {e}", name(w))),
        }
    }
    let outcome = if errors.is_empty() {
        WitnessOutcome::Unreachable
    } else {
        WitnessOutcome::CouldNotProbe
    };
    Report { outcome, errors }
}

/// The witness as configured.
pub fn name(w: &Witness) -> String {
    match w {
        Witness::Tcp(addr) => addr.to_string(),
        Witness::Icmp(ip) => ip.to_string(),
    }
}

/// Whether one witness answers within `timeout`.
pub fn probe_one(w: &Witness, timeout: Duration) -> Result<bool, WitnessError> {
    match w {
        Witness::Tcp(addr) => match TcpStream::connect_timeout(addr, timeout) {
            Ok(_) => Ok(true),
            // A refusal or a reset is the host's network stack answering.
            Err(e)
                if matches!(
                    Errno::from_io_error(&e),
                    Some(Errno::CONNREFUSED | Errno::CONNRESET)
                ) =>
            {
                Ok(true)
            }
            Err(e) if no_answer(&e) => Ok(false),
            Err(e) => Err(WitnessError::Io {
                what: "TCP connect",
                source: e,
            }),
        },
        Witness::Icmp(ip) => echo(*ip, timeout),
    }
}

/// Errors that say the witness cannot be reached from here: what a partition
/// looks like (as opposed to a fault of this node).
fn no_answer(e: &io::Error) -> bool {
    if matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
    ) {
        return true;
    }
    matches!(
        Errno::from_io_error(e),
        Some(
            Errno::TIMEDOUT
                | Errno::NETUNREACH
                | Errno::HOSTUNREACH
                | Errno::NETDOWN
                | Errno::HOSTDOWN
                | Errno::ADDRNOTAVAIL
        )
    )
}

const ECHO_REQUEST_V4: u8 = 8;
const ECHO_REPLY_V4: u8 = 0;
const ECHO_REQUEST_V6: u8 = 128;
const ECHO_REPLY_V6: u8 = 129;

/// An ICMP socket for `ip`'s family; true when raw.
fn icmp_socket(ip: IpAddr) -> Result<(Socket, bool), WitnessError> {
    let (domain, protocol) = match ip {
        IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4),
        IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6),
    };
    let datagram = match Socket::new(domain, Type::DGRAM, Some(protocol)) {
        Ok(s) => return Ok((s, false)),
        Err(e) => e,
    };
    match Socket::new(domain, Type::RAW, Some(protocol)) {
        Ok(s) => Ok((s, true)),
        Err(raw) => Err(WitnessError::NoIcmpSocket { datagram, raw }),
    }
}

/// The Internet checksum (RFC 1071).
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // Folded above: at most 0xffff.
    !u16::try_from(sum).unwrap_or(u16::MAX)
}

/// An echo request: type, code, checksum, identifier, sequence, payload.
fn echo_request(kind: u8, ident: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut packet = vec![kind, 0, 0, 0];
    packet.extend_from_slice(&ident.to_be_bytes());
    packet.extend_from_slice(&seq.to_be_bytes());
    packet.extend_from_slice(payload);
    // ICMPv6 and datagram sockets get theirs from the kernel; harmless there.
    let sum = checksum(&packet);
    packet[2..4].copy_from_slice(&sum.to_be_bytes());
    packet
}

/// Whether `message` (an ICMP message, IP header removed) is the reply to our
/// request. `ident`: checked on raw sockets only (a datagram socket's kernel
/// replaces it with its own and delivers only the replies to it).
fn is_reply(message: &[u8], kind: u8, ident: Option<u16>, seq: u16, payload: &[u8]) -> bool {
    message.len() >= 8 + payload.len()
        && message[0] == kind
        && message[1] == 0
        && ident.is_none_or(|id| message[4..6] == id.to_be_bytes())
        && message[6..8] == seq.to_be_bytes()
        && &message[8..8 + payload.len()] == payload
}

/// One ICMP echo to `ip`: true on a reply within `timeout`.
fn echo(ip: IpAddr, timeout: Duration) -> Result<bool, WitnessError> {
    let (socket, raw) = icmp_socket(ip)?;
    // Only a safe wrapper of the descriptor, for timeouts and datagram I/O.
    let socket = UdpSocket::from(socket);
    let ident: u16 = rand::random();
    let seq: u16 = rand::random();
    let payload: [u8; 16] = rand::random();
    let (request, reply) = match ip {
        IpAddr::V4(_) => (ECHO_REQUEST_V4, ECHO_REPLY_V4),
        IpAddr::V6(_) => (ECHO_REQUEST_V6, ECHO_REPLY_V6),
    };
    let packet = echo_request(request, ident, seq, &payload);
    match socket.send_to(&packet, SocketAddr::new(ip, 0)) {
        Ok(_) => {}
        Err(e) if no_answer(&e) => return Ok(false),
        Err(e) => return Err(WitnessError::io("send an ICMP echo request")(e)),
    }
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        socket
            .set_read_timeout(Some(left))
            .map_err(WitnessError::io("set the ICMP socket's timeout"))?;
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // An ICMP error about our request (e.g. host unreachable).
            Err(e) if no_answer(&e) => return Ok(false),
            Err(e) => return Err(WitnessError::io("receive an ICMP echo reply")(e)),
        };
        if from.ip() != ip {
            continue;
        }
        let mut message = buf.get(..n).unwrap_or_default();
        if raw && ip.is_ipv4() {
            // Raw IPv4 sockets deliver the IP header too.
            let header = usize::from(message.first().map_or(0, |b| b & 0x0f)) * 4;
            message = message.get(header..).unwrap_or_default();
        }
        if is_reply(message, reply, raw.then_some(ident), seq, &payload) {
            return Ok(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_refused_counts_as_reachable() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let report = probe(&[Witness::Tcp(addr)]);
        assert_eq!(report.outcome, WitnessOutcome::Reachable);
        drop(listener);
        // Nothing listens any more: refused, still an answer.
        assert_eq!(
            probe(&[Witness::Tcp(addr)]).outcome,
            WitnessOutcome::Reachable
        );
        assert_eq!(probe(&[]).outcome, WitnessOutcome::Unreachable);
    }

    #[test]
    fn checksum_of_a_known_packet() {
        // Echo request id 1 seq 1, no payload: 0x0800 + 0x0001 + 0x0001.
        let p = echo_request(ECHO_REQUEST_V4, 1, 1, &[]);
        assert_eq!(p, [8, 0, 0xf7, 0xfd, 0, 1, 0, 1]);
        assert_eq!(checksum(&p), 0);
        // Odd length: the last byte is padded with zero.
        assert_eq!(checksum(&[0xff]), !0xff00);
    }

    #[test]
    fn replies_are_matched_by_sequence_and_payload() {
        let reply = echo_request(ECHO_REPLY_V4, 7, 9, b"token");
        assert!(is_reply(&reply, ECHO_REPLY_V4, Some(7), 9, b"token"));
        assert!(is_reply(&reply, ECHO_REPLY_V4, None, 9, b"token"));
        assert!(!is_reply(&reply, ECHO_REPLY_V4, Some(8), 9, b"token"));
        assert!(!is_reply(&reply, ECHO_REPLY_V4, None, 10, b"token"));
        assert!(!is_reply(&reply, ECHO_REPLY_V4, None, 9, b"other"));
        assert!(!is_reply(&reply, ECHO_REPLY_V6, None, 9, b"token"));
        assert!(!is_reply(&reply[..6], ECHO_REPLY_V4, None, 9, b""));
    }

    /// Runs `f` on a thread of its own in a fresh network namespace (only
    /// `lo`, up), with `ping_group_range` set and, unless `raw_allowed`, without
    /// `CAP_NET_RAW`. Namespaces and capabilities are per thread: the rest of
    /// the test process is untouched, and the namespace goes with the thread.
    fn in_netns<T: Send + 'static>(
        ping_groups: &str,
        raw_allowed: bool,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let ping_groups = ping_groups.to_string();
        std::thread::spawn(move || {
            // SAFETY: only a new network namespace for this thread; no
            // descriptor table or filesystem state (what makes `unshare`
            // unsafe) is unshared.
            unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) }
                .unwrap();
            // A child forked from this thread is in its network namespace.
            let st = std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status()
                .unwrap();
            assert!(st.success());
            std::fs::write("/proc/sys/net/ipv4/ping_group_range", &ping_groups).unwrap();
            if !raw_allowed {
                let mut caps = rustix::thread::capabilities(None).unwrap();
                caps.effective -= rustix::thread::CapabilitySet::NET_RAW;
                rustix::thread::set_capabilities(None, caps).unwrap();
            }
            f()
        })
        .join()
        .unwrap()
    }

    fn loopbacks() -> [Witness; 2] {
        [
            Witness::Icmp("127.0.0.1".parse().unwrap()),
            Witness::Icmp("::1".parse().unwrap()),
        ]
    }

    #[test]
    fn icmp_echo_through_a_datagram_socket() {
        // ping_group_range admits root's group; no CAP_NET_RAW.
        let results = in_netns("0 0", false, || {
            loopbacks().map(|w| probe_one(&w, PROBE_TIMEOUT).map_err(|e| e.to_string()))
        });
        for r in results {
            assert_eq!(r, Ok(true));
        }
    }

    #[test]
    fn icmp_echo_through_a_raw_socket() {
        // The default range admits nobody: only the raw socket is left.
        let results = in_netns("1 0", true, || {
            loopbacks().map(|w| probe_one(&w, PROBE_TIMEOUT).map_err(|e| e.to_string()))
        });
        for r in results {
            assert_eq!(r, Ok(true));
        }
    }

    #[test]
    fn icmp_without_any_socket_is_an_error_not_unreachable() {
        let (report, tcp_too) = in_netns("1 0", false, || {
            let report = probe(&loopbacks());
            // An unreachable TCP witness besides: still not "unreachable".
            let mut with_tcp = loopbacks().to_vec();
            with_tcp.insert(0, Witness::Tcp("192.0.2.1:7".parse().unwrap()));
            (report, probe(&with_tcp))
        });
        assert_eq!(report.outcome, WitnessOutcome::CouldNotProbe);
        assert_eq!(report.errors.len(), 2, "{:?}", report.errors);
        assert!(
            report.errors[0].starts_with("127.0.0.1: cannot open an ICMP socket"),
            "{:?}",
            report.errors
        );
        assert_eq!(tcp_too.outcome, WitnessOutcome::CouldNotProbe);
    }

    #[test]
    fn icmp_without_an_answer_is_unreachable() {
        // TEST-NET-1 through a route that leads nowhere (to `lo`, where no
        // address answers it).
        let report = in_netns("0 0", false, || {
            let st = std::process::Command::new("ip")
                .args(["route", "add", "192.0.2.0/24", "dev", "lo"])
                .status()
                .unwrap();
            assert!(st.success());
            let t = Instant::now();
            let report = probe(&[Witness::Icmp("192.0.2.1".parse().unwrap())]);
            (report, t.elapsed())
        });
        assert_eq!(
            report.0.outcome,
            WitnessOutcome::Unreachable,
            "{:?}",
            report.0
        );
        assert!(report.0.errors.is_empty());
        assert!(report.1 >= PROBE_TIMEOUT, "{:?}", report.1);
        // No route at all: unreachable at once, not an error.
        let report = in_netns("0 0", false, || {
            probe(&[Witness::Icmp("192.0.2.1".parse().unwrap())])
        });
        assert_eq!(report.outcome, WitnessOutcome::Unreachable, "{report:?}");
    }
}
