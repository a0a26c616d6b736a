//! Two daemons in one process on loopback (node1 on 127.0.0.1 + 127.0.0.3,
//! node2 on 127.0.0.2 + 127.0.0.4) with the REAL `VmhaFsDriver` (the
//! `vmha-fs` binary next to this test's profile dir, or `$VMHA_FS_BIN`) and
//! the fake VM driver.
//!
//! Both nodes run on one host, so they cannot use the same replicated path:
//! the configuration (and its hashes) is parsed once from one text, then each
//! node's copy gets its own `replicated` path, state dir, socket and key file
//! — the same trick `cluster.rs` uses for the state dir. The hashes exchanged
//! in heartbeats are those of the common text, so the nodes agree.
//!
//! Needs root and /dev/fuse; skipped (with a message) otherwise.

// Test-only crate: its helpers panic on failure like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmha_controller::config::{Config, NodeIndex};
use vmha_controller::control::Request;
use vmha_controller::daemon::{Daemon, DaemonSpec};
use vmha_controller::driver::fake::FakeVm;
use vmha_controller::driver::vmha_fs::VmhaFsDriver;
use vmha_controller::state::Role;
use vmha_fs::key::ClusterKey;

fn vmha_fs_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("VMHA_FS_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    let profile = exe
        .ancestors()
        .find(|a| a.file_name().is_some_and(|n| n == "deps"))
        .and_then(|d| d.parent())
        .unwrap()
        .to_path_buf();
    profile.join("vmha-fs")
}

fn free_port() -> u16 {
    'outer: for _ in 0..100 {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = s.local_addr().unwrap().port();
        drop(s);
        if port > 65000 {
            continue;
        }
        for ip in ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"] {
            if UdpSocket::bind((ip, port)).is_err()
                || std::net::TcpListener::bind((ip, port + 1)).is_err()
            {
                continue 'outer;
            }
        }
        return port;
    }
    panic!("no free port");
}

fn toml(port: u16) -> String {
    format!(
        r#"
[cluster]
name = "test"
heartbeat_port = {port}
heartbeat_interval_ms = 50
failover_timeout_ms = 600
start_wait_ms = 300

[[node]]
name = "node1"
addresses = ["127.0.0.1", "127.0.0.3"]

[[node]]
name = "node2"
addresses = ["127.0.0.2", "127.0.0.4"]

[[module]]
name = "vm1"
replicated = ["/srv/vmha-test/vm1"]
port = {}
lock_timeout_ms = 1000
"#,
        port + 1
    )
}

fn key() -> ClusterKey {
    ClusterKey::from_bytes([42; 32])
}

/// Lazy-unmounts what is left at the end, even when the test fails.
struct Cleanup {
    dirs: Vec<PathBuf>,
    pids: Vec<u32>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for pid in &self.pids {
            kill(*pid, rustix::process::Signal::KILL);
        }
        for dir in &self.dirs {
            let _ = rustix::mount::unmount(dir, rustix::mount::UnmountFlags::DETACH);
        }
    }
}

fn kill(pid: u32, signal: rustix::process::Signal) {
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, signal);
    }
}

struct Node {
    name: &'static str,
    daemon: Option<Daemon>,
    fs: Arc<VmhaFsDriver>,
    dir: PathBuf,
}

impl Node {
    async fn start(name: &'static str, text: &str, base: &Path, key_file: &Path) -> Node {
        let mut config = Config::from_toml_str(text).unwrap();
        let node: NodeIndex = config.local_node(name).unwrap();
        let dir = base.join(name).join("vm1");
        std::fs::create_dir_all(&dir).unwrap();
        // Per-node paths, overridden after hashing (one host, two nodes).
        config.cluster.state_dir = base.join(name).join("state");
        config.cluster.control_socket = base.join(name).join("run/vmhad.sock");
        config.cluster.key_file = key_file.to_path_buf();
        config.modules[0].replicated = vec![dir.clone()];
        let fs = Arc::new(VmhaFsDriver::new(vmha_fs_bin(), config.clone(), node));
        let daemon = Daemon::start(DaemonSpec {
            config,
            node,
            key: key(),
            vm: Arc::new(FakeVm::new()),
            fs: Arc::clone(&fs) as Arc<_>,
            max_clock_skew: Duration::from_secs(30),
        })
        .await
        .unwrap();
        Node {
            name,
            daemon: Some(daemon),
            fs,
            dir,
        }
    }

    fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().unwrap()
    }

    async fn wait_role(&self, node: &str, role: Role, ready: bool) {
        let timeout = Duration::from_secs(30);
        common::wait_role(self.name, self.daemon(), node, role, ready, timeout).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vmha_fs_pair_syncs_and_fails_over() {
    if !rustix::process::geteuid().is_root() || !Path::new("/dev/fuse").exists() {
        eprintln!("skipped: needs root and /dev/fuse");
        return;
    }
    let bin = vmha_fs_bin();
    assert!(
        bin.is_file(),
        "{} missing: build it (cargo build -p vmha-fs) or set VMHA_FS_BIN",
        bin.display()
    );
    let tmp = tempfile::Builder::new()
        .prefix("vmha-fs-pair")
        .tempdir_in("/var/tmp")
        .unwrap();
    let base = tmp.path();
    let key_file = base.join("cluster.key");
    ClusterKey::generate_file(&key_file).unwrap();
    let port = free_port();
    let text = toml(port);
    let mut n1 = Node::start("node1", &text, base, &key_file).await;
    let mut n2 = Node::start("node2", &text, base, &key_file).await;
    let mut cleanup = Cleanup {
        dirs: vec![n1.dir.clone(), n2.dir.clone()],
        pids: Vec::new(),
    };
    // Data that exists before the pair starts must reach node2 by the full copy.
    std::fs::write(n1.dir.join("before.img"), vec![7u8; 3 << 20]).unwrap();

    n1.wait_role("node1", Role::Wait, false).await;
    n2.wait_role("node2", Role::Wait, false).await;
    let r = n1.daemon().request(Request::Prim { module: None }).await;
    assert!(r.ok, "{r:?}");
    n1.wait_role("node1", Role::Prim, true).await;
    n2.wait_role("node2", Role::Second, true).await;
    n1.wait_role("node2", Role::Second, true).await;
    cleanup.pids.extend(n1.fs.pids("vm1"));
    cleanup.pids.extend(n2.fs.pids("vm1"));

    // The full copy arrived, and writes now replicate synchronously.
    assert_eq!(
        std::fs::read(n2.dir.join("before.img")).unwrap(),
        vec![7u8; 3 << 20]
    );
    std::fs::write(n1.dir.join("hello.txt"), b"replicated\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if std::fs::read(n2.dir.join("hello.txt")).ok().as_deref() == Some(b"replicated\n") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "hello.txt did not reach node2's directory"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // node1 crashes: the daemon and its vmha-fs children die.
    let pids = n1.fs.pids("vm1");
    assert!(!pids.is_empty());
    if let Some(d) = n1.daemon.take() {
        d.kill().await;
    }
    for pid in &pids {
        kill(*pid, rustix::process::Signal::KILL);
    }
    let _ = rustix::mount::unmount(&n1.dir, rustix::mount::UnmountFlags::DETACH);

    n2.wait_role("node2", Role::Alone, true).await;
    cleanup.pids.extend(n2.fs.pids("vm1"));
    // node2 writes alone over its copy, which has everything node1 wrote.
    assert_eq!(
        std::fs::read(n2.dir.join("hello.txt")).unwrap(),
        b"replicated\n"
    );
    std::fs::write(n2.dir.join("alone.txt"), b"alone\n").unwrap();

    if let Some(d) = n2.daemon.take() {
        d.shutdown().await;
    }
    // Dropping the drivers stops whatever children are left (SIGTERM).
    drop(n1);
    drop(n2);
    drop(cleanup);
}
