//! `vmctl` against an in-process `vmhad` (fake drivers, peer absent) on a
//! temp socket.

// Test-only crate: its helpers panic on failure like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use vmha_controller::config::Config;
use vmha_controller::daemon::{Daemon, DaemonSpec};
use vmha_controller::driver::fake::{FakeFs, FakeVm};
use vmha_fs::key::ClusterKey;

fn free_port() -> u16 {
    'outer: for _ in 0..100 {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = s.local_addr().unwrap().port();
        drop(s);
        for ip in ["127.0.0.1", "127.0.0.3"] {
            if UdpSocket::bind((ip, port)).is_err() {
                continue 'outer;
            }
        }
        return port;
    }
    panic!("no free port");
}

fn write_config(dir: &Path, modules: &[&str]) -> PathBuf {
    let port = free_port();
    let mut text = format!(
        r#"
[cluster]
name = "cli"
state_dir = "{state}"
control_socket = "{socket}"
heartbeat_port = {port}
heartbeat_interval_ms = 50
failover_timeout_ms = 400
start_wait_ms = 200

[[node]]
name = "node1"
addresses = ["127.0.0.1", "127.0.0.3"]

[[node]]
name = "node2"
addresses = ["127.0.0.2", "127.0.0.4"]
"#,
        state = dir.join("state").display(),
        socket = dir.join("run/vmhad.sock").display(),
    );
    for (i, m) in modules.iter().enumerate() {
        text.push_str(&format!(
            "[[module]]\nname = \"{m}\"\nreplicated = [\"/srv/cli/{m}\"]\nport = {}\nlock_timeout_ms = 1000\n",
            20_000 + i
        ));
    }
    let path = dir.join("vmha.toml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn daemon(config: &Path) -> Daemon {
    let config = Config::load(config).unwrap();
    let node = config.local_node("node1").unwrap();
    Daemon::start(DaemonSpec {
        config,
        node,
        key: ClusterKey::from_bytes([1; 32]),
        vm: Arc::new(FakeVm::new()),
        fs: Arc::new(FakeFs::new()),
        clock: vmha_controller::clock::WallClock::system(),
    })
    .await
    .unwrap()
}

async fn vmctl(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_vmctl"))
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_and_table() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &["vm1"]);
    let d = daemon(&config).await;
    let cfg = config.to_str().unwrap();
    let out = vmctl(&["--config", cfg, "status", "--json"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["node"], "node1");
    let m = &v["modules"][0];
    assert_eq!(m["name"], "vm1");
    assert_eq!(m["primary"], serde_json::Value::Null);
    assert_eq!(m["nodes"]["node1"]["state"], "WAIT");
    assert_eq!(m["nodes"]["node1"]["reachable"], true);
    let peer = &m["nodes"]["node2"];
    assert_eq!(peer["reachable"], false);
    assert_eq!(peer["state"], serde_json::Value::Null);
    assert_eq!(peer["ready"], false);
    assert!(peer.get("last_known_state").is_some());
    assert_eq!(peer["heartbeats"]["127.0.0.2"], serde_json::Value::Null);

    let out = vmctl(&["--config", cfg, "status"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("MODULE") && text.contains("vm1") && text.contains("WAIT"),
        "{text}"
    );
    assert!(text.contains("unreachable"), "{text}");
    d.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prim_needs_confirmation_then_runs() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &["vm1"]);
    let d = daemon(&config).await;
    let cfg = config.to_str().unwrap();
    let out = vmctl(&["--config", cfg, "prim"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--yes"), "{}", stderr(&out));
    assert_eq!(
        d.status().modules[0].nodes["node1"]
            .state
            .unwrap()
            .to_string(),
        "WAIT"
    );

    let out = vmctl(&["--config", cfg, "prim", "--yes"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("ALONE"), "{}", stdout(&out));
    let s = d.status();
    assert_eq!(
        s.modules[0].nodes["node1"].state.unwrap().to_string(),
        "ALONE"
    );
    assert_eq!(s.modules[0].primary.as_deref(), Some("node1"));

    // Swap without a peer is refused: exit 3, the reason on stderr.
    let out = vmctl(&["--config", cfg, "swap"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("swap refused"), "{}", stderr(&out));

    let out = vmctl(&["--config", cfg, "log", "vm1"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("forced primary by the operator"),
        "{}",
        stdout(&out)
    );
    d.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn module_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &["vm1", "vm2"]);
    let d = daemon(&config).await;
    let cfg = config.to_str().unwrap();
    let out = vmctl(&["--config", cfg, "log", "nope"]).await;
    assert_eq!(out.status.code(), Some(5));
    assert_eq!(
        stderr(&out).trim(),
        "vmctl: unknown module `nope` (modules: vm1, vm2)"
    );
    let out = vmctl(&["--config", cfg, "stop"]).await;
    assert_eq!(out.status.code(), Some(5));
    assert!(stderr(&out).contains("name one"), "{}", stderr(&out));
    let out = vmctl(&["--config", cfg, "start", "nope"]).await;
    assert_eq!(out.status.code(), Some(5));
    // Usage errors are clap's 2.
    let out = vmctl(&["--config", cfg, "stop", "--bogus"]).await;
    assert_eq!(out.status.code(), Some(2));
    let out = vmctl(&["--config", cfg, "stop", "vm2"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    // A STOP node without data is not ready: its copy is not known current.
    let out = vmctl(&["--config", cfg, "status", "--json"]).await;
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let vm2 = &v["modules"][1]["nodes"]["node1"];
    assert_eq!(vm2["state"], "STOP");
    assert_eq!(vm2["ready"], false);
    assert_eq!(vm2["readiness"], "not_uptodate");
    d.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_not_running_and_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &["vm1"]);
    let cfg = config.to_str().unwrap();
    let out = vmctl(&["--config", cfg, "status"]).await;
    assert_eq!(out.status.code(), Some(4));
    let err = stderr(&out);
    assert!(err.starts_with("vmctl: vmhad is not running"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    // A stale socket (daemon crashed): refused connections.
    let sock = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let out = vmctl(&["--socket", sock.to_str().unwrap(), "status"]).await;
    assert_eq!(out.status.code(), Some(4));
    assert!(
        stderr(&out).contains("refuses connections"),
        "{}",
        stderr(&out)
    );

    let missing = dir.path().join("missing.toml");
    let out = vmctl(&["--config", missing.to_str().unwrap(), "status"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot read configuration"),
        "{}",
        stderr(&out)
    );

    // A daemon crash leaves the socket file; vmctl says so.
    let d = daemon(&config).await;
    d.kill().await;
    let out = vmctl(&["--config", cfg, "status"]).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("vmhad is not running"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lines_since_follow_and_causes() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &["vm1"]);
    let d = daemon(&config).await;
    let cfg = config.to_str().unwrap();
    let out = vmctl(&["--config", cfg, "prim", "--yes"]).await;
    assert!(out.status.success(), "{}", stderr(&out));

    // Every line says what caused it: the daemon's start, the operator with
    // the user the control socket saw.
    let out = vmctl(&["--config", cfg, "log"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let all: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
    assert!(all.len() >= 3, "{all:?}");
    assert!(
        all.iter().any(|l| l.contains("[vmhad start] STOP -> WAIT")),
        "{all:?}"
    );
    let me = rustix::process::geteuid().as_raw();
    let who = "[vmctl prim by ";
    let forced = all
        .iter()
        .find(|l| l.contains("forced primary by the operator"))
        .unwrap();
    assert!(
        forced.contains(who) && forced.contains(&format!("(uid {me})")),
        "{forced}"
    );
    if me == 0 {
        assert!(forced.contains("by root (uid 0)"), "{forced}");
    }

    // -n N: the last N.
    let out = vmctl(&["--config", cfg, "log", "-n", "2"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let two: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
    assert_eq!(two, all[all.len() - 2..].to_vec());

    // --since: a time after every line shows none; a duration ago shows all.
    let out = vmctl(&["--config", cfg, "log", "--since", "2999-01-01 00:00:00"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "");
    let out = vmctl(&["--config", cfg, "log", "--since", "1h"]).await;
    assert_eq!(stdout(&out).lines().count(), all.len());
    let out = vmctl(&["--config", cfg, "log", "--since", "yesterday-ish"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("neither a duration"),
        "{}",
        stderr(&out)
    );

    // -f: prints what happens next, with its cause.
    let mut follow = Command::new(env!("CARGO_BIN_EXE_vmctl"))
        .args(["--config", cfg, "log", "-f", "-n", "0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout_pipe = follow.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut lines = Vec::new();
        for line in std::io::BufReader::new(stdout_pipe).lines() {
            let line = line.unwrap();
            let done = line.contains("ALONE -> STOP");
            lines.push(line);
            if done {
                break;
            }
        }
        lines
    });
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    let out = vmctl(&["--config", cfg, "stop"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !reader.is_finished() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(reader.is_finished(), "log -f did not show the stop");
    let followed = reader.join().unwrap();
    assert!(
        followed
            .iter()
            .all(|l| !l.contains("forced primary by the operator")),
        "-n 0 printed old lines: {followed:?}"
    );
    let stop = followed.last().unwrap();
    assert!(stop.contains("[vmctl stop by "), "{followed:?}");
    d.kill().await;
}

/// Exit status of `verify` when the copies differ is 6, and the wire carries
/// `"kind": "differs"` (through a fake vmhad on a socket).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_differs_and_refusals_have_their_codes() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("fake.sock");
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let server = tokio::spawn(async move {
        for answer in [
            r#"{"ok":true,"kind":"differs","lines":["differs: disk.img 0..4096"]}"#,
            r#"{"ok":false,"error":"vmhad is shutting down","kind":"shutting_down"}"#,
            r#"{"ok":false,"error":"what now","kind":"a_kind_from_the_future"}"#,
        ] {
            let (stream, _) = listener.accept().await.unwrap();
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            tokio::io::BufReader::new(read)
                .read_line(&mut line)
                .await
                .unwrap();
            write.write_all(answer.as_bytes()).await.unwrap();
            write.write_all(b"\n").await.unwrap();
        }
    });
    let s = sock.to_str().unwrap();
    let out = vmctl(&["--socket", s, "verify"]).await;
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(stdout(&out).contains("differs: disk.img"));
    let out = vmctl(&["--socket", s, "start"]).await;
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let out = vmctl(&["--socket", s, "start"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    server.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_config_check_and_push_to_a_missing_peer() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &["vm1"]);
    let cfg = config.to_str().unwrap();
    let d = daemon(&config).await;
    d.set_config_file(&config);

    // `config check`: every problem, with its position, and a non-zero exit.
    let good = std::fs::read_to_string(&config).unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        good.replace("start_wait_ms = 200", "start_wait_ms = -1\nwitnes = []"),
    )
    .unwrap();
    let out = vmctl(&[
        "--config",
        bad.to_str().unwrap(),
        "config",
        "check",
        "--node",
        "node1",
    ])
    .await;
    assert!(!out.status.success());
    let text = stdout(&out);
    let file = bad.display().to_string();
    assert!(
        text.contains(&format!("error: {file}:9:17: cluster.start_wait_ms:")),
        "{text}"
    );
    // An unknown key is a warning (a file for a newer vmha), with its place.
    assert!(
        text.contains(&format!(
            "warning: {file}:10:1: unknown key `cluster.witnes`"
        )),
        "{text}"
    );
    assert!(text.contains("1 error(s), 1 warning(s)"), "{text}");

    // `reload`: a new module, listed at once; a broken file changes nothing.
    std::fs::write(
        &config,
        format!("{good}[[module]]\nname = \"vm2\"\nreplicated = [\"/srv/cli/vm2\"]\nport = 20001\nlock_timeout_ms = 1000\n"),
    )
    .unwrap();
    let out = vmctl(&["--config", cfg, "reload"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("vm2: added"), "{}", stdout(&out));
    assert_eq!(d.status().modules.len(), 2);
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("name = \"vm2\"", "name = \"vm/2\"")).unwrap();
    let out = vmctl(&[
        "--socket",
        dir.path().join("run/vmhad.sock").to_str().unwrap(),
        "reload",
    ])
    .await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("nothing changed") && stderr(&out).contains("module[1].name"),
        "{}",
        stderr(&out)
    );
    assert_eq!(d.status().modules.len(), 2);
    std::fs::write(&config, &text).unwrap();

    // `config push` with the peer's vmhad not running: says so, changes nothing.
    let out = vmctl(&["--config", cfg, "config", "push", "--yes"]).await;
    assert!(!out.status.success());
    // (Here the test config's key file does not exist: the channel to the
    // peer cannot even be tried; a real push is in `daemon_channel`.)
    let err = stderr(&out);
    assert!(err.contains("key file") || err.contains("channel"), "{err}");
    assert_eq!(std::fs::read_to_string(&config).unwrap(), text);
    d.kill().await;
}
