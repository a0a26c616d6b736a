//! `vmhad` as a process (fake drivers): starts, answers on its socket, exits
//! cleanly on SIGTERM; configuration errors are one line and a non-zero exit.

// Test-only crate: its helpers panic on failure like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::net::UdpSocket;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmha_controller::control::{Client, Request};
use vmha_fs::key::ClusterKey;

fn free_port() -> u16 {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap().port()
}

fn config(dir: &std::path::Path) -> std::path::PathBuf {
    config_with(dir, "")
}

/// The configuration with `extra` lines in `[cluster]`.
fn config_with(dir: &std::path::Path, extra: &str) -> std::path::PathBuf {
    let key = dir.join("cluster.key");
    ClusterKey::generate_file(&key).unwrap();
    write_config(dir, &key, free_port(), extra)
}

/// `base/vmha.toml`: a two-node cluster on 127.0.0.1/127.0.0.2 with one module,
/// short timeouts, state and control socket under `base`, `extra` lines in
/// `[cluster]`.
fn write_config(
    base: &std::path::Path,
    key: &std::path::Path,
    port: u16,
    extra: &str,
) -> std::path::PathBuf {
    let text = format!(
        r#"
[cluster]
name = "proc"
key_file = "{key}"
state_dir = "{state}"
control_socket = "{socket}"
heartbeat_port = {port}
heartbeat_interval_ms = 50
failover_timeout_ms = 400
start_wait_ms = 200
{extra}

[[node]]
name = "node1"
addresses = ["127.0.0.1"]

[[node]]
name = "node2"
addresses = ["127.0.0.2"]

[[module]]
name = "vm1"
replicated = ["/srv/proc/vm1"]
port = 7101
lock_timeout_ms = 1000
"#,
        key = key.display(),
        state = base.join("state").display(),
        socket = base.join("vmhad.sock").display(),
    );
    let path = base.join("vmha.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn starts_answers_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmhad"))
        .args([
            "--config",
            cfg.to_str().unwrap(),
            "--node",
            "node1",
            "--fake-drivers",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let socket = dir.path().join("vmhad.sock");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Ok(mut client) = Client::connect(&socket) {
            break client.call(&Request::Status).unwrap();
        }
        assert!(Instant::now() < deadline, "vmhad did not come up");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.ok);
    assert_eq!(status.status.unwrap().node, "node1");
    let pid = rustix::process::Pid::from_raw(i32::try_from(child.id()).unwrap()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(code) = child.try_wait().unwrap() {
            break code;
        }
        assert!(Instant::now() < deadline, "vmhad did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(code.success());
    assert!(!socket.exists());
    let log = std::fs::read_to_string(dir.path().join("state/vm1/events.log")).unwrap();
    assert!(log.contains("STOP -> WAIT: start"), "{log}");
    // SIGTERM ends vmhad alone: the module is not stopped.
    assert!(!log.contains("stop requested"), "{log}");
    assert!(
        log.contains("vmhad stopping (SIGTERM): the module's vmha-fs and VM keep running"),
        "{log}"
    );
}

#[test]
fn unknown_node_is_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let out = Command::new(env!("CARGO_BIN_EXE_vmhad"))
        .args(["--config", cfg.to_str().unwrap(), "--node", "node9"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.lines()
            .any(|l| l == "vmhad: node `node9` is not in the configuration (nodes: node1, node2)"),
        "{err}"
    );
}

/// A witness vmhad cannot probe (here: no ICMP socket allowed, in a network
/// namespace of its own without CAP_NET_RAW and with the default
/// `ping_group_range`) is an error shown in `status`, not "unreachable".
#[test]
fn a_witness_that_cannot_be_probed_shows_in_status() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_with(dir.path(), r#"witness = ["127.0.0.1"]"#);
    let vmhad = env!("CARGO_BIN_EXE_vmhad");
    let mut child = Command::new("unshare")
        .args(["--net", "sh", "-c"])
        .arg(r#"ip link set lo up && exec setpriv --bounding-set=-net_raw -- "$@""#)
        .args(["sh", vmhad, "--config", cfg.to_str().unwrap()])
        .args(["--node", "node1", "--fake-drivers"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let socket = dir.path().join("vmhad.sock");
    let deadline = Instant::now() + Duration::from_secs(10);
    // Stopped before any assertion: nothing outlives the test.
    let witness = loop {
        let shown = Client::connect(&socket)
            .ok()
            .and_then(|mut c| c.call(&Request::Status).ok())
            .and_then(|r| r.status)
            .and_then(|s| s.witness)
            .filter(|w| w.last_probe.is_some());
        if shown.is_some() || Instant::now() >= deadline {
            break shown;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let pid = rustix::process::Pid::from_raw(i32::try_from(child.id()).unwrap()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    child.wait().unwrap();
    let witness = witness.expect("no witness probe shown in status");
    assert_eq!(witness.addresses, ["127.0.0.1"]);
    assert_eq!(
        witness.last_probe,
        Some(vmha_controller::state::WitnessOutcome::CouldNotProbe)
    );
    assert_eq!(witness.errors.len(), 1, "{witness:?}");
    assert!(
        witness.errors[0].starts_with("127.0.0.1: cannot open an ICMP socket"),
        "{witness:?}"
    );
}

/// One node's configuration of a two-node cluster on 127.0.0.1/127.0.0.2,
/// with its own state directory and socket under `dir/<node>`.
fn pair_config(
    dir: &std::path::Path,
    node: &str,
    key: &std::path::Path,
    port: u16,
) -> std::path::PathBuf {
    let base = dir.join(node);
    std::fs::create_dir_all(&base).unwrap();
    write_config(&base, key, port, "")
}

/// A `vmhad` child, killed (by its PID) when dropped.
struct Vmhad(std::process::Child);

impl Drop for Vmhad {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_vmhad(config: &std::path::Path, node: &str, offset_s: i64) -> Vmhad {
    Vmhad(
        Command::new(env!("CARGO_BIN_EXE_vmhad"))
            .args([
                "--config",
                config.to_str().unwrap(),
                "--node",
                node,
                "--fake-drivers",
            ])
            .env("VMHA_TEST_CLOCK_OFFSET_S", offset_s.to_string())
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(config.with_file_name("vmhad.err")).unwrap())
            .spawn()
            .unwrap(),
    )
}

fn call(socket: &std::path::Path, request: &Request) -> Option<vmha_controller::control::Response> {
    Client::connect(socket).ok()?.call(request).ok()
}

/// Whether `socket`'s daemon sees node1 PRIM and node2 SECOND, both ready.
fn steady(socket: &std::path::Path) -> bool {
    let Some(status) = call(socket, &Request::Status).and_then(|r| r.status) else {
        return false;
    };
    let nodes = &status.modules[0].nodes;
    nodes["node1"].state == Some(vmha_controller::state::Role::Prim)
        && nodes["node1"].ready
        && nodes["node2"].state == Some(vmha_controller::state::Role::Second)
        && nodes["node2"].ready
}

/// Issue 8, item 4, on a live pair of processes: node1's wall clock 10 min
/// ahead, node2's 10 min behind (the test hook `VMHA_TEST_CLOCK_OFFSET_S`).
/// The pair forms and nobody fails over for several failover timeouts.
#[test]
fn a_pair_twenty_minutes_apart_forms_and_holds() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("cluster.key");
    ClusterKey::generate_file(&key).unwrap();
    let port = free_port();
    let c1 = pair_config(dir.path(), "node1", &key, port);
    let c2 = pair_config(dir.path(), "node2", &key, port);
    let (s1, s2) = (
        dir.path().join("node1/vmhad.sock"),
        dir.path().join("node2/vmhad.sock"),
    );
    let _n1 = spawn_vmhad(&c1, "node1", 600);
    let _n2 = spawn_vmhad(&c2, "node2", -600);
    let deadline = Instant::now() + Duration::from_secs(20);
    // `prim` on node1 once both daemons answer and have heard each other.
    loop {
        let heard = [&s1, &s2].iter().all(|s| {
            call(s, &Request::Status)
                .and_then(|r| r.status)
                .is_some_and(|st| st.modules[0].nodes.values().all(|n| n.reachable))
        });
        if heard {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the daemons did not hear each other: {:?}\n{:?}\n{}\n{}",
            call(&s1, &Request::Status),
            call(&s2, &Request::Status),
            std::fs::read_to_string(dir.path().join("node1/vmhad.err")).unwrap_or_default(),
            std::fs::read_to_string(dir.path().join("node2/vmhad.err")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = call(&s1, &Request::Prim { module: None }).unwrap();
    assert!(r.ok, "{r:?}");
    while !(steady(&s1) && steady(&s2)) {
        assert!(Instant::now() < deadline, "no PRIM/SECOND pair");
        std::thread::sleep(Duration::from_millis(20));
    }
    let hold = Instant::now();
    while hold.elapsed() < Duration::from_millis(5 * 400) {
        assert!(steady(&s1) && steady(&s2), "the pair broke up");
        std::thread::sleep(Duration::from_millis(20));
    }
    for node in ["node1", "node2"] {
        let log =
            std::fs::read_to_string(dir.path().join(node).join("state/vm1/events.log")).unwrap();
        assert!(!log.contains("lost the"), "{node}:\n{log}");
    }
    // The hook reached the daemon: node1's log is stamped 10 min ahead.
    let log = std::fs::read_to_string(dir.path().join("node1/state/vm1/events.log")).unwrap();
    let last = log.lines().last().unwrap();
    let ahead = vmha_controller::eventlog::timestamp(
        std::time::SystemTime::now() + Duration::from_secs(540),
    );
    assert!(last > ahead.as_str(), "{last} vs {ahead}");
}

#[test]
fn a_bad_clock_offset_is_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let out = Command::new(env!("CARGO_BIN_EXE_vmhad"))
        .args([
            "--config",
            cfg.to_str().unwrap(),
            "--node",
            "node1",
            "--fake-drivers",
        ])
        .env("VMHA_TEST_CLOCK_OFFSET_S", "ten minutes")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.lines().any(|l| l
            == "vmhad: VMHA_TEST_CLOCK_OFFSET_S = `ten minutes` is not a whole number of seconds"),
        "{err}"
    );
}
