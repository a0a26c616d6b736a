//! The daemon channel between two `vmhad` processes (fake drivers) over real
//! TCP: remote status and commands, authentication, garbage, a pre-auth flood,
//! and version negotiation with one side capped to older versions.

// Test-only crate: its helpers panic on failure like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vmha_controller::channel::{self, ChannelError};
use vmha_controller::control::{Client, Request};
use vmha_controller::driver::VmDriver;
use vmha_fs::key::ClusterKey;
use vmha_fs::version::Versions;
use vmha_test_infra::ports::free_cluster_port;

mod common;
use common::vmhad::{NodeConfig, Vmhad};

fn free_tcp_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    l.local_addr().unwrap().port()
}

/// `dir/<node>/vmha.toml` of a pair on 127.0.0.1 / 127.0.0.2.
fn node_config(dir: &Path, node: &str, key: &Path, hb: u16, channel: u16) -> PathBuf {
    let base = dir.join(node);
    let libvirt = format!(
        "libvirt_uri = \"qemu+unix:///system?socket={}\"",
        base.join("libvirt-sock").display()
    );
    NodeConfig {
        channel_port: Some(channel),
        module_extra: &libvirt,
        ..NodeConfig::new("chan", &base, key, hb)
    }
    .write()
}

// Fields drop in order: both vmhad stop (and write their last event-log
// line) before their directory goes.
struct Pair {
    key: ClusterKey,
    channel_port: u16,
    n1: Vmhad,
    n2: Vmhad,
    dir: tempfile::TempDir,
}

impl Pair {
    fn start(env1: &[(&str, &str)], env2: &[(&str, &str)]) -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("cluster.key");
        let key = ClusterKey::generate_file(&key_file).unwrap();
        let (hb, channel_port) = (free_cluster_port(), free_tcp_port());
        let c1 = node_config(dir.path(), "node1", &key_file, hb, channel_port);
        let c2 = node_config(dir.path(), "node2", &key_file, hb, channel_port);
        let n1 = Vmhad::spawn(&c1, "node1", env1);
        let n2 = Vmhad::spawn(&c2, "node2", env2);
        let pair = Pair {
            dir,
            key,
            channel_port,
            n1,
            n2,
        };
        pair.wait("both daemons answer", |p| {
            p.local_status("node1").is_some() && p.local_status("node2").is_some()
        });
        pair
    }

    fn socket(&self, node: &str) -> PathBuf {
        self.dir.path().join(node).join("vmhad.sock")
    }

    fn local_status(&self, node: &str) -> Option<vmha_controller::status::Status> {
        Client::connect(&self.socket(node))
            .ok()?
            .call(&Request::Status)
            .ok()?
            .status
    }

    fn channel_addr(&self, node: &str) -> SocketAddr {
        let ip = if node == "node1" {
            "127.0.0.1"
        } else {
            "127.0.0.2"
        };
        SocketAddr::new(ip.parse().unwrap(), self.channel_port)
    }

    fn wait(&self, what: &str, cond: impl Fn(&Pair) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cond(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\nnode1:\n{}\nnode2:\n{}",
                self.n1.log(),
                self.n2.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// node1's vmhad asks node2's for its status and runs a command there, over the
/// channel between the two processes.
#[test]
fn remote_status_and_command_over_the_channel() {
    let pair = Pair::start(&[], &[]);
    let mut client = channel::Client::connect(pair.channel_addr("node2"), &pair.key).unwrap();
    assert_eq!(client.version(), channel::CHANNEL.max);
    let status = client.status().unwrap();
    // The peer's own view: it names itself.
    assert_eq!(status.node, "node2");
    assert_eq!(status.modules[0].name, "vm1");
    // A command executed on node2: `prim` there makes node2 the primary, as
    // node1's own status then shows.
    let r = client.command(Request::Prim { module: None }).unwrap();
    assert!(r.ok, "{r:?}");
    pair.wait("node2 PRIM seen from node1", |p| {
        p.local_status("node1").is_some_and(|s| {
            s.modules[0].nodes["node2"].state == Some(vmha_controller::state::Role::Prim)
        })
    });
    // An error on the peer comes back as its answer.
    let r = client
        .command(Request::Start {
            module: Some("nope".into()),
        })
        .unwrap();
    assert!(!r.ok && r.error.unwrap_or_default().contains("nope"));
    // Config push reaches the peer's reload: a file it refuses is not
    // written; a valid one is written over its file and reloaded.
    let node2_file = pair.dir.path().join("node2/vmha.toml");
    let before = std::fs::read_to_string(&node2_file).unwrap();
    let r = client.config_push("[cluster]\n".into()).unwrap();
    assert!(!r.ok, "{r:?}");
    assert_eq!(std::fs::read_to_string(&node2_file).unwrap(), before);
    let changed = before.replace("start_wait_ms = 200", "start_wait_ms = 1234");
    assert_ne!(changed, before);
    let r = client.config_push(changed.clone()).unwrap();
    assert!(r.ok, "{r:?}");
    assert_eq!(std::fs::read_to_string(&node2_file).unwrap(), changed);
    // vmctl --node node2 status: the peer's view through the channel.
    let out = Command::new(env!("CARGO_BIN_EXE_vmhad").replace("vmhad", "vmctl"))
        .args([
            "--config",
            pair.dir.path().join("node1/vmha.toml").to_str().unwrap(),
            "--node",
            "node2",
            "status",
            "--json",
        ])
        .output();
    if let Ok(out) = out {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let s: vmha_controller::status::Status = serde_json::from_str(&text).unwrap();
        assert_eq!(s.node, "node2");
    }
}

/// A client with another key is refused (both sides see the failure); a
/// stranger sending garbage is dropped with a clear log line; a flood of
/// silent connections does not keep the real client out.
#[test]
fn channel_authentication_and_preauth_limits() {
    let pair = Pair::start(&[], &[]);
    let addr = pair.channel_addr("node2");
    let wrong = ClusterKey::from_bytes([0x55; 32]);
    let e = channel::Client::connect(addr, &wrong).unwrap_err();
    assert!(
        e.to_string().contains("does not hold the cluster key"),
        "{e}"
    );
    // Garbage: not a vmha peer.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 64];
    // Closed without an answer.
    assert!(matches!(s.read(&mut buf), Ok(0) | Err(_)));
    pair.wait("the garbage peer logged", |p| {
        let log = p.n2.log();
        log.contains("listener=\"channel\"") && log.contains("not a vmha peer")
    });
    // 200 silent connections (more than the 64 pending allowed): the real
    // client still gets in, at once.
    let flood: Vec<TcpStream> = (0..200)
        .filter_map(|_| TcpStream::connect(addr).ok())
        .collect();
    let started = Instant::now();
    let mut client = channel::Client::connect(addr, &pair.key).unwrap();
    assert_eq!(client.status().unwrap().node, "node2");
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(flood);
    pair.wait("evictions logged", |p| {
        p.n2.log().contains("closed the oldest")
    });
}

/// node2 advertises only the older versions of every protocol (the test hooks),
/// node1 the full ranges: heartbeats and the channel run at the older versions,
/// the pair forms, and what the older channel lacks is refused clearly. Disjoint
/// channel ranges are refused naming both.
#[test]
fn a_pair_on_different_versions_talks_at_the_lower_one() {
    let old = [
        ("VMHA_TEST_HEARTBEAT_VERSIONS", "2"),
        ("VMHA_TEST_CHANNEL_VERSIONS", "1"),
        ("VMHA_TEST_REPLICATION_VERSIONS", "5"),
    ];
    let pair = Pair::start(&[], &old);
    // Heartbeats: both sides hear each other and send version 2.
    pair.wait("heartbeats at version 2 both ways", |p| {
        ["node1", "node2"].iter().all(|n| {
            p.local_status(n).is_some_and(|s| {
                let hb = &s.protocols.as_ref().unwrap().heartbeat;
                hb.in_use == Some(2) && s.modules[0].nodes.values().all(|n| n.reachable)
            })
        })
    });
    let s1 = pair.local_status("node1").unwrap();
    let p1 = s1.protocols.unwrap();
    assert_eq!(p1.heartbeat.ours, "2..=4");
    assert_eq!(p1.heartbeat.peer.as_deref(), Some("2"));
    // Version 2 payloads do not carry the software version.
    assert_eq!(p1.heartbeat.peer_software, None);
    let p2 = pair.local_status("node2").unwrap().protocols.unwrap();
    assert_eq!(p2.heartbeat.ours, "2");
    assert_eq!(p2.replication.ours, "5");
    assert_eq!(p2.channel.ours, "1");
    // The pair forms and holds at the older heartbeat version.
    let r = Client::connect(&pair.socket("node1"))
        .unwrap()
        .call(&Request::Prim { module: None })
        .unwrap();
    assert!(r.ok, "{r:?}");
    pair.wait("node1 PRIM / node2 SECOND seen by node2", |p| {
        p.local_status("node2").is_some_and(|s| {
            let n = &s.modules[0].nodes;
            n["node1"].state == Some(vmha_controller::state::Role::Prim)
                && n["node2"].state == Some(vmha_controller::state::Role::Second)
        })
    });
    // Channel: the newer client meets the older server at version 1.
    let mut client = channel::Client::connect(pair.channel_addr("node2"), &pair.key).unwrap();
    assert_eq!(client.version(), 1);
    assert_eq!(client.status().unwrap().node, "node2");
    let r = client.command(Request::Status).unwrap();
    assert!(r.ok);
    let e = client.config_push("x".into()).unwrap_err();
    assert!(
        matches!(
            e,
            ChannelError::Unsupported {
                version: 1,
                needs: 2,
                ..
            }
        ),
        "{e}"
    );
    // And the other way: node2's range against node1's server.
    let mut back = channel::Client::connect_versions(
        pair.channel_addr("node1"),
        &pair.key,
        Versions { min: 1, max: 1 },
    )
    .unwrap();
    assert_eq!(back.version(), 1);
    assert_eq!(back.status().unwrap().node, "node1");
    // Disjoint: a client that speaks only version 2 is refused by node2 (1).
    let e = channel::Client::connect_versions(
        pair.channel_addr("node2"),
        &pair.key,
        Versions { min: 2, max: 2 },
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "daemon channel of {}: no common protocol version: this side speaks 2, the peer 1 (upgrade the older node)",
            pair.channel_addr("node2")
        )
    );
}

/// The compact heartbeat (version 4) against a peer of the previous release
/// (versions 2..=3, JSON): both send version 3, the pair forms and each side
/// follows the other's role; two current daemons use version 4 and form the
/// same pair.
#[test]
fn a_version_3_peer_and_a_version_4_pair_both_form() {
    for (env2, version) in [
        (&[("VMHA_TEST_HEARTBEAT_VERSIONS", "2..=3")][..], 3),
        (&[][..], 4),
    ] {
        let pair = Pair::start(&[], env2);
        pair.wait(&format!("heartbeats at version {version} both ways"), |p| {
            ["node1", "node2"].iter().all(|n| {
                p.local_status(n).is_some_and(|s| {
                    let hb = &s.protocols.as_ref().unwrap().heartbeat;
                    hb.in_use == Some(version) && s.modules[0].nodes.values().all(|n| n.reachable)
                })
            })
        });
        let p1 = pair.local_status("node1").unwrap().protocols.unwrap();
        assert_eq!(p1.heartbeat.ours, "2..=4");
        // Both versions carry the software version.
        assert!(p1.heartbeat.peer_software.is_some());
        let r = Client::connect(&pair.socket("node1"))
            .unwrap()
            .call(&Request::Prim { module: None })
            .unwrap();
        assert!(r.ok, "{r:?}");
        for node in ["node1", "node2"] {
            pair.wait(
                &format!("v{version}: node1 PRIM / node2 SECOND seen by {node}"),
                |p| {
                    p.local_status(node).is_some_and(|s| {
                        let n = &s.modules[0].nodes;
                        n["node1"].state == Some(vmha_controller::state::Role::Prim)
                            && n["node2"].state == Some(vmha_controller::state::Role::Second)
                    })
                },
            );
        }
    }
}

/// Heartbeat ranges with nothing in common: each side logs the refusal naming
/// both ranges, and neither ever hears the other.
#[test]
fn disjoint_heartbeat_ranges_are_refused_clearly() {
    // node1 only 3, node2 only 2.
    let pair = Pair::start(
        &[("VMHA_TEST_HEARTBEAT_VERSIONS", "3..=3")],
        &[("VMHA_TEST_HEARTBEAT_VERSIONS", "2")],
    );
    pair.wait("the version refusal logged on both sides", |p| {
        p.n1.log().contains(
            "heartbeat format version 2 (the peer reads 2), this vmhad reads 3: no common version",
        ) && p.n2.log().contains(
            "heartbeat format version 3 (the peer reads 3), this vmhad reads 2: no common version",
        )
    });
    for node in ["node1", "node2"] {
        let s = pair.local_status(node).unwrap();
        assert!(s.heartbeats_rejected.get("version").copied().unwrap_or(0) > 0);
        assert!(
            s.modules[0].nodes.values().any(|n| !n.reachable),
            "{node} heard a peer it cannot read"
        );
    }
}

/// A bad test-hook value is one clear line and a non-zero exit.
#[test]
fn a_bad_version_hook_is_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("cluster.key");
    ClusterKey::generate_file(&key).unwrap();
    let c = node_config(
        dir.path(),
        "node1",
        &key,
        free_cluster_port(),
        free_tcp_port(),
    );
    let out = Command::new(env!("CARGO_BIN_EXE_vmhad"))
        .args([
            "--config",
            c.to_str().unwrap(),
            "--node",
            "node1",
            "--fake-drivers",
        ])
        .env("VMHA_TEST_CHANNEL_VERSIONS", "9")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "vmhad: VMHA_TEST_CHANNEL_VERSIONS = `9` is not within the supported versions 1..=4"
        ),
        "{err}"
    );
}

/// Live swap's libvirt forward: a connection to node1's forwarded socket
/// reaches the unix socket of node2's `libvirt_uri` (here an echo server
/// standing in for libvirtd) through node2's vmhad, bytes both ways, several
/// connections at once; the socket is private and gone after the forward.
/// A peer capped to channel version 3 is refused with a clear error.
#[test]
fn libvirt_is_forwarded_over_the_channel_and_an_older_peer_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::{UnixListener, UnixStream};
    use vmha_controller::migrate::{Forwarder, MigrateError};

    let pair = Pair::start(&[], &[]);
    // node2's "libvirtd": echoes every byte, upper-cased.
    let listener = UnixListener::bind(pair.dir.path().join("node2/libvirt-sock")).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            buf[..n].make_ascii_uppercase();
                            if conn.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    let run = pair.dir.path().join("node1/run");
    let fwd = Forwarder::start(&run, pair.channel_addr("node2"), &pair.key, "vm1").unwrap();
    let socket = fwd.socket().to_path_buf();
    assert!(socket.starts_with(&run));
    assert_eq!(
        std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(socket.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    assert_eq!(
        fwd.uri(),
        format!("qemu+unix:///system?socket={}", socket.display())
    );
    let mut a = UnixStream::connect(&socket).unwrap();
    let mut b = UnixStream::connect(&socket).unwrap();
    a.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    b.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // More than one frame's worth (64 KiB chunks) through `a`.
    let big: Vec<u8> = (0..300_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let writer = {
        let mut a = a.try_clone().unwrap();
        let big = big.clone();
        std::thread::spawn(move || a.write_all(&big).unwrap())
    };
    b.write_all(b"hello libvirt").unwrap();
    let mut got = [0u8; 13];
    b.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"HELLO LIBVIRT");
    let mut back = vec![0u8; big.len()];
    a.read_exact(&mut back).unwrap();
    writer.join().unwrap();
    assert_eq!(back, big.to_ascii_uppercase());
    // The forward ends with the value: socket and directory gone, the open
    // connections closed.
    drop(fwd);
    assert!(!socket.exists());
    assert!(!socket.parent().unwrap().exists());
    let mut rest = Vec::new();
    assert_eq!(a.read_to_end(&mut rest).unwrap_or(0), 0);
    assert!(UnixStream::connect(&socket).is_err());

    // A peer whose module has no such name answers an error on connect.
    let fwd = Forwarder::start(&run, pair.channel_addr("node2"), &pair.key, "nope").unwrap();
    let mut c = UnixStream::connect(fwd.socket()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut rest = Vec::new();
    assert_eq!(c.read_to_end(&mut rest).unwrap_or(0), 0, "closed at once");
    drop(fwd);
    assert!(
        std::fs::read_dir(&run).unwrap().next().is_none(),
        "nothing left in the run dir"
    );

    // The one-call form the daemon uses: forward, migrate (a fake driver
    // here: it records the socket), stop forwarding.
    let config =
        vmha_controller::config::Config::load(&pair.dir.path().join("node1/vmha.toml")).unwrap();
    let vm = vmha_controller::driver::fake::FakeVm::new();
    let module = config.modules[0].clone();
    vm.define(&module).unwrap();
    vm.start(&module).unwrap();
    let peer = vmha_controller::config::NodeIndex::FIRST.peer();
    vmha_controller::migrate::live_migrate(&vm, &config, &pair.key, peer, &module).unwrap();
    let used = vm.migrated_to();
    assert_eq!(used.len(), 1);
    assert!(
        used[0].starts_with(pair.dir.path().join("node1")),
        "{used:?}"
    );
    assert!(!used[0].exists());
    drop(pair);

    // node2 capped to channel version 3: no forward, a clear error.
    let old = Pair::start(&[], &[("VMHA_TEST_CHANNEL_VERSIONS", "1..=3")]);
    let config =
        vmha_controller::config::Config::load(&old.dir.path().join("node1/vmha.toml")).unwrap();
    let e =
        vmha_controller::migrate::live_migrate(&vm, &config, &old.key, peer, &module).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("peer vmhad too old for live swap"),
        "{e}"
    );
    assert_eq!(vm.migrated_to().len(), 1, "no migration tried");
    let run = old.dir.path().join("node1/run");
    let e = Forwarder::start(&run, old.channel_addr("node2"), &old.key, "vm1").unwrap_err();
    assert!(
        matches!(
            e,
            MigrateError::Channel(ChannelError::TooOldForLiveSwap {
                version: 3,
                needs: 4
            })
        ),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "peer vmhad too old for live swap: it speaks daemon-channel version 3, live swap needs version 4 (upgrade it)"
    );
    assert!(!run.exists() || std::fs::read_dir(&run).unwrap().next().is_none());
}
