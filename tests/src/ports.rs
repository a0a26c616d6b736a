//! Free ports for test clusters on loopback.
//!
//! A test pair listens on several addresses (127.0.0.1–127.0.0.4: two nodes,
//! sometimes two networks each) and on neighbouring ports (the daemon channel
//! defaults to the heartbeat port − 1, vmha-fs to the module port + 1): one
//! port free on 127.0.0.1 alone is not enough, and a clash shows up as a
//! flaky "address in use" far from its cause.

use std::net::{TcpListener, UdpSocket};

/// The loopback addresses test pairs use.
const ADDRESSES: [&str; 4] = ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"];

/// A port `p` that was free a moment ago for UDP and TCP on every test
/// address, with `p - 1` and `p + 1` free for TCP as well.
pub fn free_cluster_port() -> u16 {
    for _ in 0..200 {
        let Ok(probe) = UdpSocket::bind("127.0.0.1:0") else {
            continue;
        };
        let Ok(addr) = probe.local_addr() else {
            continue;
        };
        drop(probe);
        let port = addr.port();
        if !(1025..=65000).contains(&port) {
            continue;
        }
        let free = ADDRESSES.iter().all(|ip| {
            UdpSocket::bind((*ip, port)).is_ok()
                && [port - 1, port, port + 1]
                    .iter()
                    .all(|p| TcpListener::bind((*ip, *p)).is_ok())
        });
        if free {
            return port;
        }
    }
    panic!("no free port for a test cluster on loopback after 200 tries");
}
