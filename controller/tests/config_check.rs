//! `vmhad` as a process (fake drivers) for issue 10, items 3 and 4: SIGHUP
//! reloads and never kills; `--check-config` reports every error of a file
//! with its position, and checks the host of a live node.

// Test-only crate: its helpers panic on failure like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::net::{TcpListener, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmha_controller::control::{Client, Request, Response};
use vmha_fs::key::ClusterKey;

fn free_udp() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_tcp() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Setup {
    dir: tempfile::TempDir,
    file: PathBuf,
    key: PathBuf,
    socket: PathBuf,
    vm1_port: u16,
}

/// vm1: an existing directory and the libvirt test driver's own domain
/// `test`; `extra` appended (more modules).
fn setup(extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("cluster.key");
    ClusterKey::generate_file(&key).unwrap();
    let vm1 = dir.path().join("vm1");
    std::fs::create_dir(&vm1).unwrap();
    let socket = dir.path().join("run/vmhad.sock");
    let vm1_port = free_tcp();
    let text = format!(
        r#"[cluster]
name = "check"
key_file = "{key}"
state_dir = "{state}"
control_socket = "{socket}"
heartbeat_port = {hb}
heartbeat_interval_ms = 50
failover_timeout_ms = 400
start_wait_ms = 200

[[node]]
name = "node1"
addresses = ["127.0.0.1"]

[[node]]
name = "node2"
addresses = ["127.0.0.2"]

[[module]]
name = "vm1"
domain = "test"
libvirt_uri = "test:///default"
replicated = ["{vm1}"]
port = {vm1_port}
lock_timeout_ms = 1000
{extra}"#,
        key = key.display(),
        state = dir.path().join("state").display(),
        socket = socket.display(),
        hb = free_udp(),
        vm1 = vm1.display(),
    );
    let file = dir.path().join("vmha.toml");
    std::fs::write(&file, text).unwrap();
    Setup {
        dir,
        file,
        key,
        socket,
        vm1_port,
    }
}

/// A `vmhad` child, killed (by its PID) when dropped.
struct Vmhad(std::process::Child);

impl Drop for Vmhad {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Vmhad {
    fn start(s: &Setup) -> Vmhad {
        let child = Command::new(env!("CARGO_BIN_EXE_vmhad"))
            .args([
                "--config",
                s.file.to_str().unwrap(),
                "--node",
                "node1",
                "--fake-drivers",
            ])
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(s.dir.path().join("vmhad.err")).unwrap())
            .spawn()
            .unwrap();
        let v = Vmhad(child);
        wait_for("vmhad to answer", || {
            call(&s.socket, &Request::Status).is_some()
        });
        v
    }

    fn signal(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(i32::try_from(self.0.id()).unwrap()).unwrap();
        rustix::process::kill_process(pid, signal).unwrap();
    }

    fn alive(&mut self) -> bool {
        self.0.try_wait().unwrap().is_none()
    }
}

fn call(socket: &Path, request: &Request) -> Option<Response> {
    Client::connect(socket).ok()?.call(request).ok()
}

fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn modules(socket: &Path) -> Vec<String> {
    call(socket, &Request::Status)
        .and_then(|r| r.status)
        .map(|s| s.modules.into_iter().map(|m| m.name).collect())
        .unwrap_or_default()
}

fn check(file: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vmhad"))
        .args([
            "--check-config",
            "--config",
            file.to_str().unwrap(),
            "--node",
            "node1",
        ])
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn sighup_reloads_and_never_kills() {
    let s = setup("");
    let mut vmhad = Vmhad::start(&s);
    let vm2_dir = s.dir.path().join("vm2");
    let with_vm2 = format!(
        "{}\n[[module]]\nname = \"vm2\"\nreplicated = [\"{}\"]\nport = {}\nlock_timeout_ms = 1000\n",
        std::fs::read_to_string(&s.file).unwrap(),
        vm2_dir.display(),
        free_tcp()
    );
    std::fs::write(&s.file, &with_vm2).unwrap();
    vmhad.signal(rustix::process::Signal::HUP);
    wait_for("vm2 after SIGHUP", || modules(&s.socket) == ["vm1", "vm2"]);
    assert!(vmhad.alive());

    // A broken file: SIGHUP changes nothing, vmhad stays.
    std::fs::write(&s.file, "[cluster\n").unwrap();
    vmhad.signal(rustix::process::Signal::HUP);
    std::thread::sleep(Duration::from_millis(500));
    assert!(vmhad.alive());
    assert_eq!(modules(&s.socket), ["vm1", "vm2"]);
    let log = std::fs::read_to_string(s.dir.path().join("vmhad.err")).unwrap();
    assert!(log.contains("reload refused"), "{log}");

    // `vmctl reload` says why, with the position, and exits non-zero.
    let out = Command::new(env!("CARGO_BIN_EXE_vmhad"))
        .args(["--version"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let r = call(&s.socket, &Request::Reload).unwrap();
    assert!(!r.ok);
    assert!(
        r.error.unwrap().contains("vmha.toml:1:"),
        "reload error names the position"
    );
}

#[test]
fn check_config_reports_every_error_with_its_position() {
    let s = setup("");
    let text = std::fs::read_to_string(&s.file)
        .unwrap()
        .replace("heartbeat_interval_ms = 50", "heartbeat_interval_ms = 50\nheartbeat_intervall = 1")
        + &format!(
            "\n[[module]]\nname = \"vm2\"\nreplicated = [\"/srv/x\"]\nport = {}\nmaxloop = -1\nfailvoer = true\n",
            s.vm1_port
        );
    std::fs::write(&s.file, &text).unwrap();
    let (ok, out) = check(&s.file);
    assert!(!ok, "{out}");
    let file = s.file.display().to_string();
    // 1-based line of the last line starting with `start`.
    let line_of = |text: &str, start: &str| {
        text.lines()
            .collect::<Vec<_>>()
            .iter()
            .rposition(|l| l.starts_with(start))
            .unwrap()
            + 1
    };
    // Unknown keys are warnings (a file written for a newer vmha), located.
    for expected in [
        format!(
            "warning: {file}:{}:1: unknown key `cluster.heartbeat_intervall`",
            line_of(&text, "heartbeat_intervall")
        ),
        format!(
            "error: {file}:{}:11: module[1].maxloop: invalid value",
            line_of(&text, "maxloop")
        ),
        format!(
            "warning: {file}:{}:1: unknown key `module[1].failvoer`",
            line_of(&text, "failvoer")
        ),
    ] {
        assert!(
            out.lines().any(|l| l.starts_with(&expected)),
            "{expected}\n{out}"
        );
    }
    assert!(out.contains("1 error(s), 2 warning(s)"), "{out}");

    // Semantic errors are located too: the duplicate port, once the rest is fixed.
    let fixed = text
        .replace("heartbeat_intervall = 1\n", "")
        .replace("maxloop = -1\n", "")
        .replace("failvoer = true\n", "");
    std::fs::write(&s.file, &fixed).unwrap();
    let (ok, out) = check(&s.file);
    assert!(!ok, "{out}");
    assert!(
        out.lines().any(|l| l.starts_with(&format!(
            "error: {file}:{}:8: module[1].port: port {}",
            line_of(&fixed, "port ="),
            s.vm1_port
        ))),
        "{out}"
    );
}

#[test]
fn check_config_on_a_live_node() {
    let missing = "/nonexistent/vmha-check/vm2";
    let s = setup(&format!(
        "\n[[module]]\nname = \"vm2\"\ndomain = \"nope\"\nlibvirt_uri = \"test:///default\"\nreplicated = [\"{missing}\"]\nport = {}\nlock_timeout_ms = 1000\n",
        free_tcp()
    ));
    // Before vmhad runs every module counts as started: vm2's host problems are errors.
    let (ok, out) = check(&s.file);
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!("error: modules.vm2.replicated[0]: {missing}")),
        "{out}"
    );
    assert!(out.contains("error: modules.vm2.domain: `nope`"), "{out}");
    assert!(!out.contains("modules.vm1"), "{out}");

    // Live: vmhad holds the heartbeat port (free for the check); vm2 stopped
    // makes its problems warnings.
    let _vmhad = Vmhad::start(&s);
    let r = call(
        &s.socket,
        &Request::Stop {
            module: Some("vm2".into()),
        },
    )
    .unwrap();
    assert!(r.ok, "{r:?}");
    let (ok, out) = check(&s.file);
    assert!(ok, "{out}");
    assert!(!out.contains("heartbeat_port"), "{out}");
    assert!(
        out.contains(&format!("warning: modules.vm2.replicated[0]: {missing}")),
        "{out}"
    );
    assert!(out.contains("(module not started)"), "{out}");

    // A foreign process on vm1's port, a key file others can read: errors.
    let squatter = TcpListener::bind(("127.0.0.1", s.vm1_port)).unwrap();
    std::fs::set_permissions(&s.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, out) = check(&s.file);
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!(
            "error: modules.vm1.port: 127.0.0.1:{} (TCP) is not free",
            s.vm1_port
        )),
        "{out}"
    );
    assert!(
        out.contains("error: cluster.key_file:") && out.contains("mode 644"),
        "{out}"
    );
    assert!(out.contains("2 error(s)"), "{out}");
    drop(squatter);
}
