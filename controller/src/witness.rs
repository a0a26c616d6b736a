//! The split-brain witness probe: reachable if any witness answers (TCP:
//! a connection or a refusal; ICMP: one echo reply through `ping`). Blocking.
//! Any failure to probe counts as unreachable, so this module has no error type.

use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::config::Witness;

/// How long one witness gets to answer.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Whether any witness answers.
pub fn probe(witnesses: &[Witness]) -> bool {
    witnesses.iter().any(|w| match w {
        Witness::Tcp(addr) => match TcpStream::connect_timeout(addr, PROBE_TIMEOUT) {
            Ok(_) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionRefused,
        },
        Witness::Icmp(ip) => Command::new("ping")
            .args(["-c", "1", "-W", "1", &ip.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_refused_counts_as_reachable() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        assert!(probe(&[Witness::Tcp(addr)]));
        drop(listener);
        // Nothing listens any more: refused, still an answer.
        assert!(probe(&[Witness::Tcp(addr)]));
        assert!(!probe(&[]));
    }
}
