//! `vmhad` as a process (fake drivers): starts, answers on its socket, exits
//! cleanly on SIGTERM; configuration errors are one line and a non-zero exit.

// Test-only crate: its helpers panic on failure like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmha_controller::control::{Client, Request};
use vmha_fs::key::ClusterKey;
use vmha_test_infra::ports::free_cluster_port;

mod common;
use common::vmhad::{call, NodeConfig, Vmhad};

fn config(dir: &std::path::Path) -> std::path::PathBuf {
    config_with(dir, "")
}

/// The configuration with `extra` lines in `[cluster]`.
fn config_with(dir: &std::path::Path, extra: &str) -> std::path::PathBuf {
    let key = dir.join("cluster.key");
    ClusterKey::generate_file(&key).unwrap();
    write_config(dir, &key, free_cluster_port(), extra)
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
    NodeConfig {
        cluster_extra: extra,
        ..NodeConfig::new("proc", base, key, port)
    }
    .write()
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
    // A second vmhad with the same configuration says the first runs.
    let second = Command::new(env!("CARGO_BIN_EXE_vmhad"))
        .args([
            "--config",
            cfg.to_str().unwrap(),
            "--node",
            "node1",
            "--fake-drivers",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("vmhad: vmhad is already running"), "{err}");
    assert!(
        Client::connect(&socket).is_ok(),
        "the first one lost its socket"
    );
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
    // Each line says what caused it: the start.
    assert!(log.contains("[vmhad start] STOP -> WAIT: start"), "{log}");
    // SIGTERM ends vmhad alone: the module is not stopped.
    assert!(!log.contains("stop requested"), "{log}");
    assert!(
        log.contains("vmhad stopping (SIGTERM): the module's vmha-fs and VM keep running"),
        "{log}"
    );
}

#[test]
fn a_file_where_the_control_socket_goes_is_named_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let socket = dir.path().join("vmhad.sock");
    std::fs::write(&socket, b"not a socket").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vmhad"))
        .args([
            "--config",
            cfg.to_str().unwrap(),
            "--node",
            "node1",
            "--fake-drivers",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("exists and is not a socket") && err.contains("vmhad.sock"),
        "{err}"
    );
    assert_eq!(std::fs::read(&socket).unwrap(), b"not a socket");
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

fn spawn_vmhad(config: &std::path::Path, node: &str, offset_s: i64) -> Vmhad {
    let offset = offset_s.to_string();
    Vmhad::spawn(config, node, &[("VMHA_TEST_CLOCK_OFFSET_S", &offset)])
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
    let port = free_cluster_port();
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
            std::fs::read_to_string(dir.path().join("node1/vmhad.log")).unwrap_or_default(),
            std::fs::read_to_string(dir.path().join("node2/vmhad.log")).unwrap_or_default()
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

// ---- issue 10, item 7: vmhad under systemd (Type=notify, watchdog, journald) ----

/// A datagram socket in `dir` standing in for systemd's `NOTIFY_SOCKET` or
/// journald's socket: what vmhad sends there, one message per datagram.
struct Listener(std::os::unix::net::UnixDatagram);

impl Listener {
    fn bind(path: &std::path::Path) -> Listener {
        let socket = std::os::unix::net::UnixDatagram::bind(path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Listener(socket)
    }

    /// The next message, or `None` after the read timeout.
    fn next_raw(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 65536];
        let n = self.0.recv(&mut buf).ok()?;
        buf.truncate(n);
        Some(buf)
    }

    fn next(&self) -> Option<String> {
        self.next_raw()
            .map(|m| String::from_utf8_lossy(&m).into_owned())
    }

    /// Messages until one satisfies `what` (returned with all seen before it);
    /// panics after `timeout`.
    fn until(&self, timeout: Duration, what: impl Fn(&str) -> bool) -> (String, Vec<String>) {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            if let Some(m) = self.next() {
                if what(&m) {
                    return (m, seen);
                }
                seen.push(m);
            }
            assert!(Instant::now() < deadline, "not received; got {seen:?}");
        }
    }
}

fn spawn_notify(
    cfg: &std::path::Path,
    notify: &std::path::Path,
    watchdog_usec: Option<&str>,
) -> Vmhad {
    let mut command = Command::new(env!("CARGO_BIN_EXE_vmhad"));
    command
        .args([
            "--config",
            cfg.to_str().unwrap(),
            "--node",
            "node1",
            "--fake-drivers",
        ])
        .env("NOTIFY_SOCKET", notify)
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(cfg.with_file_name("vmhad.log")).unwrap());
    if let Some(usec) = watchdog_usec {
        command.env("WATCHDOG_USEC", usec);
    }
    Vmhad::adopt(command.spawn().unwrap(), cfg)
}

/// `Type=notify`: READY=1 comes once the control socket answers, with a
/// STATUS line summarising the modules; the STATUS line follows a state
/// change; WATCHDOG=1 comes again and again when WATCHDOG_USEC is set (at
/// half of it); STOPPING=1 on SIGTERM.
#[test]
fn notifies_systemd_ready_status_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let notify = Listener::bind(&dir.path().join("notify"));
    let mut vmhad = spawn_notify(&cfg, &dir.path().join("notify"), Some("400000"));
    let (ready, before) = notify.until(Duration::from_secs(10), |m| {
        m.lines().any(|l| l == "READY=1")
    });
    // READY means vmctl works now: the control socket answers at once.
    let status = call(&dir.path().join("vmhad.sock"), &Request::Status)
        .expect("the control socket does not answer at READY=1");
    assert!(status.ok);
    assert!(before.is_empty(), "sent before READY: {before:?}");
    assert!(
        ready
            .lines()
            .any(|l| l == "STATUS=vm1: WAIT, node2 unreachable"),
        "{ready:?}"
    );
    // Pings at ~200 ms: at least 5 within a generous 10 s.
    let start = Instant::now();
    for _ in 0..5 {
        notify.until(Duration::from_secs(10), |m| {
            m.lines().any(|l| l == "WATCHDOG=1")
        });
    }
    assert!(start.elapsed() < Duration::from_secs(10));
    // A state change shows in the next STATUS line.
    let r = call(
        &dir.path().join("vmhad.sock"),
        &Request::Stop { module: None },
    )
    .unwrap();
    assert!(r.ok, "{r:?}");
    notify.until(Duration::from_secs(10), |m| {
        m.lines()
            .any(|l| l == "STATUS=vm1: STOP, node2 unreachable")
    });
    // SIGTERM, without waiting for the exit yet.
    let _ = vmhad.terminate(Duration::ZERO);
    notify.until(Duration::from_secs(10), |m| {
        m.lines().any(|l| l == "STOPPING=1")
    });
}

/// Without WATCHDOG_USEC, READY comes but no watchdog pings.
#[test]
fn no_watchdog_pings_unless_systemd_asks() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let notify = Listener::bind(&dir.path().join("notify"));
    let _vmhad = spawn_notify(&cfg, &dir.path().join("notify"), None);
    notify.until(Duration::from_secs(10), |m| {
        m.lines().any(|l| l == "READY=1")
    });
    let quiet = Instant::now();
    while quiet.elapsed() < Duration::from_secs(2) {
        if let Some(m) = notify.next() {
            assert!(!m.contains("WATCHDOG=1"), "{m:?}");
        }
    }
}

/// Log lines on a stderr that is a file: plain text, no colour codes, even
/// with JOURNAL_STREAM inherited from somewhere else.
#[test]
fn logs_on_a_file_are_plain_text() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let err = dir.path().join("vmhad.log");
    let child = Vmhad::adopt(
        Command::new(env!("CARGO_BIN_EXE_vmhad"))
            .args([
                "--config",
                cfg.to_str().unwrap(),
                "--node",
                "node1",
                "--fake-drivers",
            ])
            .env("JOURNAL_STREAM", "8:12345")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap(),
        &cfg,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while call(&dir.path().join("vmhad.sock"), &Request::Status).is_none() {
        assert!(Instant::now() < deadline, "vmhad did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The control socket answers a moment before the start is logged.
    let mut text = String::new();
    while Instant::now() < deadline {
        text = std::fs::read_to_string(&err).unwrap();
        if text.contains("vmhad started") {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(child);
    assert!(text.contains("vmhad started"), "{text}");
    assert!(!text.contains('\x1b'), "colour codes in a file: {text:?}");
}

/// Under systemd (JOURNAL_STREAM names vmhad's stderr) the lines go to
/// journald's socket with structured fields: VMHA_NODE on every record,
/// VMHA_MODULE on a module's. journald is stood in for by a socket the test
/// listens on, bind-mounted at /run/systemd/journal in a mount namespace of
/// vmhad's own (nothing changes on the host).
#[test]
fn logs_go_to_journald_with_fields_under_systemd() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let journal = dir.path().join("journal");
    std::fs::create_dir(&journal).unwrap();
    let socket = Listener::bind(&journal.join("socket"));
    let err = dir.path().join("vmhad.log");
    let stderr = std::fs::File::create(&err).unwrap();
    let meta = stderr.metadata().unwrap();
    let vmhad = env!("CARGO_BIN_EXE_vmhad");
    let child = Vmhad::adopt(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(
                r#"mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal &&
                   mount --bind "$0" /run/systemd/journal && exec "$@""#,
            )
            .arg(&journal)
            .args([
                vmhad,
                "--config",
                cfg.to_str().unwrap(),
                "--node",
                "node1",
                "--fake-drivers",
            ])
            .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap(),
        &cfg,
    );
    // Every record (as its fields) until one of each kind below arrived.
    let message = |fields: &[(String, String)], what: &dyn Fn(&str) -> bool| {
        fields.iter().any(|(k, v)| k == "MESSAGE" && what(v))
    };
    let is_started = |f: &[(String, String)]| message(f, &|m| m == "vmhad started");
    let is_transition = |f: &[(String, String)]| message(f, &|m| m.contains("STOP -> WAIT"));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut records: Vec<Vec<Field>> = Vec::new();
    while !(records.iter().any(|f| is_started(f)) && records.iter().any(|f| is_transition(f))) {
        if let Some(raw) = socket.next_raw() {
            records.push(journal_fields(&raw));
        }
        assert!(
            Instant::now() < deadline,
            "records: {records:?}\nstderr: {}",
            std::fs::read_to_string(&err).unwrap_or_default()
        );
    }
    let record =
        |what: &dyn Fn(&[Field]) -> bool| records.iter().find(|f| what(f)).unwrap().clone();
    let has = |fields: &[(String, String)], name: &str, value: &str| {
        fields.iter().any(|(k, v)| k == name && v == value)
    };
    let started = record(&is_started);
    assert!(has(&started, "VMHA_NODE", "node1"), "{started:?}");
    assert!(has(&started, "PRIORITY", "5"), "{started:?}");
    assert!(has(&started, "SYSLOG_IDENTIFIER", "vmhad"), "{started:?}");
    let transition = record(&is_transition);
    assert!(has(&transition, "VMHA_MODULE", "vm1"), "{transition:?}");
    assert!(has(&transition, "VMHA_NODE", "node1"), "{transition:?}");
    drop(child);
    let text = std::fs::read_to_string(&err).unwrap();
    assert!(
        !text.contains("vmhad started"),
        "logged to stderr too: {text}"
    );
}

/// A journald field: name and value.
type Field = (String, String);

/// The fields of one journald native-protocol datagram: `NAME=value` lines,
/// or `NAME`, a newline, a 64-bit little-endian length, the value, a newline.
fn journal_fields(mut raw: &[u8]) -> Vec<Field> {
    let mut fields = Vec::new();
    while let Some(end) = raw.iter().position(|&b| b == b'\n' || b == b'=') {
        let name = String::from_utf8_lossy(&raw[..end]).into_owned();
        let value;
        if raw[end] == b'=' {
            let rest = &raw[end + 1..];
            let stop = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
            value = &rest[..stop];
            raw = rest.get(stop + 1..).unwrap_or_default();
        } else {
            let rest = &raw[end + 1..];
            let len = usize::try_from(u64::from_le_bytes(rest[..8].try_into().unwrap())).unwrap();
            value = &rest[8..8 + len];
            raw = rest.get(8 + len + 1..).unwrap_or_default();
        }
        fields.push((name, String::from_utf8_lossy(value).into_owned()));
    }
    fields
}
