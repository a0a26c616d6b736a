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
use vmha_test_infra::ports::free_cluster_port;

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

/// One pair at a time: the link-down tests assert write latencies.
static ONE_PAIR: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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
        Node::start_with(name, text, base, key_file, true).await
    }

    /// `with_dir: false`: the replicated directory does not exist.
    async fn start_with(
        name: &'static str,
        text: &str,
        base: &Path,
        key_file: &Path,
        with_dir: bool,
    ) -> Node {
        let mut config = Config::from_toml_str(text).unwrap();
        let node: NodeIndex = config.local_node(name).unwrap();
        let dir = base.join(name).join("vm1");
        if with_dir {
            std::fs::create_dir_all(&dir).unwrap();
        } else {
            std::fs::create_dir_all(base.join(name)).unwrap();
        }
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
            clock: vmha_controller::clock::WallClock::system(),
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
    let _one = ONE_PAIR.lock().await;
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
    let port = free_cluster_port();
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

    // `vmctl verify` on the PRIM: both copies compared block by block, identical.
    let r = n1.daemon().request(Request::Verify { module: None }).await;
    assert!(r.ok, "{r:?}");
    assert!(
        !r.lines.is_empty() && r.lines.iter().all(|l| l.starts_with("identical")),
        "{r:?}"
    );
    // Only the writer can compare.
    let r = n2.daemon().request(Request::Verify { module: None }).await;
    assert!(
        !r.ok && r.error.as_deref().unwrap_or("").contains("not the writer"),
        "{r:?}"
    );

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
        d.shutdown("test end").await;
    }
    // Dropping the drivers stops whatever children are left (SIGTERM).
    drop(n1);
    drop(n2);
    drop(cleanup);
}

/// A replicated directory missing on the node that becomes SECOND is created
/// there and filled by the resync (it used to fail the receiver and retry
/// every heartbeat, forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_replicated_dir_on_the_second_is_created() {
    let _one = ONE_PAIR.lock().await;
    if !rustix::process::geteuid().is_root() || !Path::new("/dev/fuse").exists() {
        eprintln!("skipped: needs root and /dev/fuse");
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("vmha-fs-pair")
        .tempdir_in("/var/tmp")
        .unwrap();
    let base = tmp.path();
    let key_file = base.join("cluster.key");
    ClusterKey::generate_file(&key_file).unwrap();
    let text = toml(free_cluster_port());
    let n1 = Node::start("node1", &text, base, &key_file).await;
    let n2 = Node::start_with("node2", &text, base, &key_file, false).await;
    let mut cleanup = Cleanup {
        dirs: vec![n1.dir.clone(), n2.dir.clone()],
        pids: Vec::new(),
    };
    assert!(!n2.dir.exists());
    std::fs::write(n1.dir.join("disk.img"), vec![5u8; 1 << 20]).unwrap();
    n2.wait_role("node2", Role::Wait, false).await;
    let r = n1.daemon().request(Request::Prim { module: None }).await;
    assert!(r.ok, "{r:?}");
    n1.wait_role("node1", Role::Prim, true).await;
    n2.wait_role("node2", Role::Second, true).await;
    cleanup.pids.extend(n1.fs.pids("vm1"));
    cleanup.pids.extend(n2.fs.pids("vm1"));
    assert_eq!(
        std::fs::read(n2.dir.join("disk.img")).unwrap(),
        vec![5u8; 1 << 20]
    );
    drop(n1);
    drop(n2);
    drop(cleanup);
}

/// SIGCONT on drop, if the process is still there and stopped.
struct Thaw(u32);

impl Drop for Thaw {
    fn drop(&mut self) {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.0)).unwrap_or_default();
        // The state follows the command name in parentheses.
        let stopped = stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('T'));
        if stopped {
            kill(self.0, rustix::process::Signal::CONT);
        }
    }
}

/// Every file and directory under `root`, with file contents (symlinks as
/// their targets), by relative path.
fn tree(root: &Path) -> std::collections::BTreeMap<PathBuf, Option<Vec<u8>>> {
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                todo.push(path);
                out.insert(rel, None);
            } else if kind.is_symlink() {
                let target = std::fs::read_link(&path).unwrap();
                out.insert(rel, Some(target.into_os_string().into_encoded_bytes()));
            } else {
                out.insert(rel, Some(std::fs::read(&path).unwrap()));
            }
        }
    }
    out
}

/// What the writer thread saw.
#[derive(Debug, Default)]
struct Writes {
    done: usize,
    /// Writes completed after the kill.
    after_kill: usize,
    slowest: Duration,
    errors: Vec<String>,
}

/// Creates, writes and fsyncs a file every few ms under `dir` until `stop`.
fn write_files(
    dir: PathBuf,
    stop: Arc<std::sync::atomic::AtomicBool>,
    killed: Arc<std::sync::Mutex<Option<Instant>>>,
) -> Writes {
    use std::io::Write;
    use std::sync::atomic::Ordering;
    let mut w = Writes::default();
    while !stop.load(Ordering::SeqCst) {
        let i = w.done;
        let t = Instant::now();
        let result = std::fs::File::create(dir.join(format!("w{i:05}.dat"))).and_then(|mut f| {
            f.write_all(&vec![(i % 251) as u8; 4096 + i])?;
            f.sync_all()
        });
        w.slowest = w.slowest.max(t.elapsed());
        if let Err(e) = result {
            w.errors.push(format!("write {i}: {e}"));
            break;
        }
        w.done += 1;
        if killed.lock().unwrap().is_some_and(|k| t > k) {
            w.after_kill += 1;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    w
}

/// How node2's receiver is taken out while its daemon keeps sending heartbeats.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// SIGKILL: the connection breaks at once (the link is lost).
    Kill,
    /// SIGSTOP: the connection stays open and silent (the link stalls, as when
    /// the replication network is down); the controller restarts it.
    Freeze,
}

/// Design, "Degraded mode": the replication link fails while heartbeats still
/// arrive (here: node2's receiver process is killed). node1's controller marks
/// node2 outdated over the heartbeats and vmha-fs goes on writing: no write
/// fails or waits for the lock timeout, node1 stays PRIM, node2 is not
/// promoted; node2's receiver is restarted, node1 re-attaches it with a full
/// copy, and node2 is SECOND ready again with the same files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_link_down_while_heartbeats_arrive() {
    link_down(Fault::Kill).await;
}

/// The same with a receiver that stops answering without closing the
/// connection: vmha-fs reports the stall after half the lock timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_link_stalled_while_heartbeats_arrive() {
    link_down(Fault::Freeze).await;
}

async fn link_down(fault: Fault) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let _one = ONE_PAIR.lock().await;
    if !rustix::process::geteuid().is_root() || !Path::new("/dev/fuse").exists() {
        eprintln!("skipped: needs root and /dev/fuse");
        return;
    }
    let bin = vmha_fs_bin();
    assert!(bin.is_file(), "{} missing", bin.display());
    let tmp = tempfile::Builder::new()
        .prefix("vmha-fs-linkdown")
        .tempdir_in("/var/tmp")
        .unwrap();
    let base = tmp.path();
    let key_file = base.join("cluster.key");
    ClusterKey::generate_file(&key_file).unwrap();
    let port = free_cluster_port();
    let text = toml(port);
    let lock_timeout = Duration::from_millis(1000);
    assert!(text.contains("lock_timeout_ms = 1000"));
    let mut n1 = Node::start("node1", &text, base, &key_file).await;
    let mut n2 = Node::start("node2", &text, base, &key_file).await;
    let mut cleanup = Cleanup {
        dirs: vec![n1.dir.clone(), n2.dir.clone()],
        pids: Vec::new(),
    };
    std::fs::write(n1.dir.join("before.img"), vec![3u8; 1 << 20]).unwrap();
    n1.wait_role("node1", Role::Wait, false).await;
    let r = n1.daemon().request(Request::Prim { module: None }).await;
    assert!(r.ok, "{r:?}");
    n1.wait_role("node1", Role::Prim, true).await;
    n1.wait_role("node2", Role::Second, true).await;
    n2.wait_role("node2", Role::Second, true).await;
    cleanup.pids.extend(n1.fs.pids("vm1"));
    let receiver = n2.fs.pids("vm1");
    assert_eq!(receiver.len(), 1, "node2's vmha-fs: {receiver:?}");
    cleanup.pids.extend(&receiver);
    let generation = |n: &Node, node: &str| {
        n.daemon().status().modules[0].nodes[node]
            .generation
            .clone()
    };
    let before = generation(&n1, "node1");

    let stop = Arc::new(AtomicBool::new(false));
    let killed = Arc::new(std::sync::Mutex::new(None));
    let writer = {
        let (dir, stop, killed) = (n1.dir.clone(), stop.clone(), killed.clone());
        std::thread::spawn(move || write_files(dir, stop, killed))
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    *killed.lock().unwrap() = Some(Instant::now());
    let _thaw = matches!(fault, Fault::Freeze).then(|| Thaw(receiver[0]));
    kill(
        receiver[0],
        match fault {
            Fault::Kill => rustix::process::Signal::KILL,
            Fault::Freeze => rustix::process::Signal::STOP,
        },
    );
    let t = Instant::now();
    // Well past the lock timeout: writes go on, nobody changes roles.
    while t.elapsed() < lock_timeout * 4 {
        let s1 = n1.daemon().status();
        let s2 = n2.daemon().status();
        let role = |s: &vmha_controller::status::Status, node: &str| s.modules[0].nodes[node].state;
        assert_eq!(
            role(&s1, "node1"),
            Some(Role::Prim),
            "node1 after {:?}",
            t.elapsed()
        );
        let r2 = role(&s2, "node2");
        assert!(
            !r2.is_some_and(Role::is_writer),
            "node2 promoted to {r2:?} after {:?}",
            t.elapsed()
        );
        assert!(
            !writer.is_finished(),
            "the writer stopped: {:?}",
            t.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let writes = writer.join().unwrap();
    eprintln!(
        "[link down, {fault:?}] {} writes, {} after the fault, slowest {:?}",
        writes.done, writes.after_kill, writes.slowest
    );
    assert!(writes.errors.is_empty(), "{:?}", writes.errors);
    assert!(writes.after_kill >= 20, "{writes:?}");
    // Not waited out: a write that makes no progress for the lock timeout
    // fails; the margin is for a loaded machine (fsyncs, scheduling).
    assert!(
        writes.slowest < lock_timeout * 2,
        "a write waited {:?} (lock timeout {lock_timeout:?})",
        writes.slowest
    );
    let log1 = n1
        .daemon()
        .request(Request::Log { module: None })
        .await
        .lines;
    assert!(
        log1.iter().any(|l| l.contains("replication link down"))
            && log1.iter().any(|l| l.contains("knows it is outdated")),
        "node1's log: {log1:#?}"
    );
    assert_ne!(
        generation(&n1, "node1"),
        before,
        "node1 kept its generation"
    );

    // node2 is brought back: SECOND ready, same generation, same files.
    n2.wait_role("node2", Role::Second, true).await;
    n1.wait_role("node2", Role::Second, true).await;
    eprintln!(
        "[link down, {fault:?}] node2 SECOND ready again {:?} after the fault",
        t.elapsed()
    );
    assert_eq!(generation(&n2, "node2"), generation(&n1, "node1"));
    cleanup.pids.extend(n2.fs.pids("vm1"));
    std::fs::write(n1.dir.join("after.txt"), b"replicated again\n").unwrap();
    assert_eq!(
        std::fs::read(n2.dir.join("after.txt")).unwrap(),
        b"replicated again\n",
        "a write acknowledged on node1 is on node2"
    );
    let (t1, t2) = (tree(&n1.dir), tree(&n2.dir));
    assert_eq!(t1.len(), t2.len(), "file counts differ");
    for (path, content) in &t1 {
        assert!(
            t2.get(path) == Some(content),
            "{} differs between the nodes",
            path.display()
        );
    }
    assert!(t1.len() > writes.done, "{} entries", t1.len());
    let log2 = n2
        .daemon()
        .request(Request::Log { module: None })
        .await
        .lines;
    eprintln!(
        "[link down] node1's log:\n{}\n[link down] node2's log:\n{}",
        log1.join("\n"),
        log2.join("\n")
    );

    if let Some(d) = n1.daemon.take() {
        d.shutdown("test end").await;
    }
    if let Some(d) = n2.daemon.take() {
        d.shutdown("test end").await;
    }
    drop(n1);
    drop(n2);
    drop(cleanup);
}
