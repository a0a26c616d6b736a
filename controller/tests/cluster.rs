//! Two daemons in one process on loopback with fake drivers: node1 on
//! 127.0.0.1 + 127.0.0.3, node2 on 127.0.0.2 + 127.0.0.4 (two networks),
//! short timeouts, temp state dirs and sockets; asserted through the control API.

// Test-only crate: its helpers panic on failure like the tests themselves.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use vmha_controller::clock::WallClock;
use vmha_controller::config::{Config, NodeIndex};
use vmha_controller::control::{Client, Request, Response};
use vmha_controller::daemon::{Daemon, DaemonSpec};
use vmha_controller::driver::fake::{FakeFs, FakeVm, Mounted};
use vmha_controller::driver::VmState;
use vmha_controller::generation::{History, Metadata};
use vmha_controller::heartbeat::{Handshake, ModuleBeat, Payload, Sealer};
use vmha_controller::state::{Announce, Readiness, Role};
use vmha_controller::status::Status;
use vmha_fs::key::ClusterKey;
use vmha_test_infra::ports::free_cluster_port;

const FAILOVER_MS: u64 = 400;

fn toml(port: u16, extra_module: &str, start_wait_ms: u64) -> String {
    format!(
        r#"
[cluster]
name = "test"
heartbeat_port = {port}
heartbeat_interval_ms = 50
failover_timeout_ms = {FAILOVER_MS}
start_wait_ms = {start_wait_ms}

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
{extra_module}
"#,
        port.wrapping_add(1).max(1024)
    )
}

fn key() -> ClusterKey {
    ClusterKey::from_bytes([42; 32])
}

struct Node {
    name: &'static str,
    daemon: Option<Daemon>,
    vm: FakeVm,
    fs: FakeFs,
    socket: PathBuf,
    config: Config,
    /// This node's wall clock (test hook: offset, stepped).
    clock: WallClock,
}

impl Node {
    async fn start(name: &'static str, text: &str, dir: &Path) -> Node {
        Node::start_with_clock(name, text, dir, WallClock::system()).await
    }

    async fn start_with_clock(
        name: &'static str,
        text: &str,
        dir: &Path,
        clock: WallClock,
    ) -> Node {
        let mut config = Config::from_toml_str(text).unwrap();
        let node = config.local_node(name).unwrap();
        // One file for both nodes; per-node paths overridden after hashing.
        config.cluster.state_dir = dir.join(name).join("state");
        config.cluster.control_socket = dir.join(name).join("run/vmhad.sock");
        let vm = FakeVm::new();
        let fs = FakeFs::new();
        let mut n = Node {
            name,
            daemon: None,
            vm,
            fs,
            socket: config.cluster.control_socket.clone(),
            config,
            clock,
        };
        n.restart(node).await;
        n
    }

    async fn restart(&mut self, node: NodeIndex) {
        let daemon = Daemon::start(DaemonSpec {
            config: self.config.clone(),
            node,
            key: key(),
            vm: Arc::new(self.vm.clone()),
            fs: Arc::new(self.fs.clone()),
            clock: self.clock.clone(),
        })
        .await
        .unwrap();
        self.daemon = Some(daemon);
    }

    fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().unwrap()
    }

    async fn request(&self, request: Request) -> Response {
        // Through the real socket, with the blocking client vmctl uses.
        let socket = self.socket.clone();
        tokio::task::spawn_blocking(move || Client::connect(&socket)?.call(&request))
            .await
            .unwrap()
            .unwrap()
    }

    fn status(&self) -> Status {
        self.daemon().status()
    }

    fn state_of(&self, node: &str) -> Option<Role> {
        self.status().modules[0].nodes[node].state
    }

    async fn wait(&self, what: &str, cond: impl Fn(&Status) -> bool) {
        common::wait_status(
            self.name,
            self.daemon(),
            what,
            Duration::from_secs(10),
            cond,
        )
        .await;
    }

    async fn wait_role(&self, node: &str, role: Role, ready: bool) {
        let timeout = Duration::from_secs(10);
        common::wait_role(self.name, self.daemon(), node, role, ready, timeout).await;
    }
}

async fn pair(dir: &Path) -> (Node, Node, u16) {
    let port = free_cluster_port();
    let text = toml(port, "", 300);
    let n1 = Node::start("node1", &text, dir).await;
    let n2 = Node::start("node2", &text, dir).await;
    (n1, n2, port)
}

/// `prim` on node1 and the steady state: node1 PRIM, node2 SECOND ready.
async fn running_pair(dir: &Path) -> (Node, Node, u16) {
    let (n1, n2, port) = pair(dir).await;
    steady(&n1, &n2).await;
    (n1, n2, port)
}

/// From two fresh nodes: `prim` on node1, then node1 PRIM, node2 SECOND ready.
async fn steady(n1: &Node, n2: &Node) {
    // Fresh nodes: nobody has data, both wait.
    n1.wait_role("node1", Role::Wait, false).await;
    n2.wait_role("node2", Role::Wait, false).await;
    let r = n1.request(Request::Prim { module: None }).await;
    assert!(r.ok, "{r:?}");
    n1.wait_role("node1", Role::Prim, true).await;
    n1.wait_role("node2", Role::Second, true).await;
    n2.wait_role("node2", Role::Second, true).await;
    n2.wait_role("node1", Role::Prim, true).await;
    assert!(n1.vm.is_running("vm1"));
    assert!(!n2.vm.is_running("vm1"));
    assert_eq!(n1.fs.mounted("vm1"), Some(Mounted::Writer));
    assert_eq!(n2.fs.mounted("vm1"), Some(Mounted::Receiver));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prim_then_failover_when_node1_dies() {
    let dir = tempfile::tempdir().unwrap();
    let (mut n1, n2, _) = running_pair(dir.path()).await;
    let s = n1.status();
    assert_eq!(s.modules[0].primary.as_deref(), Some("node1"));
    let generation = s.modules[0].nodes["node1"].generation.clone();
    assert!(generation.is_some());
    assert_eq!(s.modules[0].nodes["node2"].generation, generation);

    let killed = Instant::now();
    n1.daemon.take().unwrap().kill().await;
    n2.wait_role("node2", Role::Alone, false).await;
    let took = killed.elapsed();
    assert!(
        took >= Duration::from_millis(FAILOVER_MS - 60),
        "failover after {took:?}, before the timeout"
    );
    n2.wait("VM running on node2", |_| n2.vm.is_running("vm1"))
        .await;
    assert_eq!(n2.fs.mounted("vm1"), Some(Mounted::Writer));
    let s = n2.status();
    let peer = &s.modules[0].nodes["node1"];
    assert!(!peer.reachable);
    assert_eq!(peer.state, None);
    let log = n2.log().await.join("\n");
    assert_eq!(peer.last_known_state, Some(Some(Role::Prim)), "{log}");
    assert_eq!(s.modules[0].primary.as_deref(), Some("node2"));
    // node2 began a new generation: it is now newer than node1's copy.
    assert_ne!(s.modules[0].nodes["node2"].generation, generation);
    // ALONE is published once the writer mounts, before the step's
    // transition line is written: wait for the line.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = n2.log().await.join("\n");
        if log.contains("SECOND -> ALONE") {
            break;
        }
        assert!(Instant::now() < deadline, "{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    n2.daemon.unwrap().kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_moves_the_vm_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let (n1, n2, _) = running_pair(dir.path()).await;
    let r = n1
        .request(Request::Swap {
            module: None,
            live: false,
        })
        .await;
    assert!(r.ok, "{r:?}");
    n2.wait_role("node2", Role::Prim, true).await;
    n2.wait_role("node1", Role::Second, true).await;
    n2.wait("VM on node2 only", |_| {
        n2.vm.is_running("vm1") && !n1.vm.is_running("vm1")
    })
    .await;
    // Swap asked on the SECOND this time (once it knows node2 is PRIM).
    n1.wait_role("node2", Role::Prim, true).await;
    let r = n1
        .request(Request::Swap {
            module: None,
            live: false,
        })
        .await;
    assert!(r.ok, "{r:?}");
    n1.wait_role("node1", Role::Prim, true).await;
    n1.wait_role("node2", Role::Second, true).await;
    n1.wait("VM back on node1", |_| {
        n1.vm.is_running("vm1") && !n2.vm.is_running("vm1")
    })
    .await;
    // Swap where it cannot be done is refused with a reason.
    let r = n1
        .request(Request::Swap {
            module: Some("nope".into()),
            live: false,
        })
        .await;
    assert!(!r.ok);
    assert!(r.error.unwrap().contains("unknown module `nope`"));
    n1.daemon.unwrap().kill().await;
    n2.daemon.unwrap().kill().await;
}

/// The new PRIM of a swap cannot replicate to its SECOND from the start (its
/// receiver is not there): it starts alone under a new generation once the
/// SECOND knows it is outdated, and the SECOND resynchronises.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_whose_connected_start_fails_starts_alone_and_resyncs() {
    let dir = tempfile::tempdir().unwrap();
    let (n1, n2, _) = running_pair(dir.path()).await;
    let before = n1.status().modules[0].nodes["node1"].generation.clone();
    n2.fs.set_failing("mount_writer_connected", true);
    let r = n1
        .request(Request::Swap {
            module: None,
            live: false,
        })
        .await;
    assert!(r.ok, "{r:?}");
    n2.wait_role("node2", Role::Prim, true).await;
    n2.wait("VM on node2 only", |_| {
        n2.vm.is_running("vm1") && !n1.vm.is_running("vm1")
    })
    .await;
    n1.wait_role("node1", Role::Second, true).await;
    n2.wait_role("node1", Role::Second, true).await;
    assert_eq!(n2.fs.count("mount_writer_connected"), 1);
    assert_eq!(n2.fs.mounted("vm1"), Some(Mounted::Writer));
    let log = n2.log().await.join("\n");
    let log1 = n1.log().await.join("\n");
    assert!(
        log.contains("starting alone once it knows it is outdated")
            && log.contains("the peer knows it is outdated"),
        "{log}\nnode1:\n{log1}"
    );
    let s = n2.status();
    let (g1, g2) = (
        &s.modules[0].nodes["node1"].generation,
        &s.modules[0].nodes["node2"].generation,
    );
    assert_ne!(g2, &before, "node2 wrote alone under the old generation");
    assert_eq!(g1, g2, "node1 did not adopt node2's generation: {log}");
    assert!(log1.contains("resynchronising"), "{log1}");
    n1.daemon.unwrap().kill().await;
    n2.daemon.unwrap().kill().await;
}

/// A swap whose VM will not stop is aborted: the VM stays where it runs, the
/// writer keeps its mount, the SECOND stays SECOND, and the refusal is logged
/// and returned to `vmctl`. Once the stop works, the operator's next swap does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_whose_vm_stop_fails_is_aborted_and_the_vm_stays() {
    let dir = tempfile::tempdir().unwrap();
    let (n1, n2, _) = running_pair(dir.path()).await;
    n1.vm.set_failing("stop", true);
    let r = n1
        .request(Request::Swap {
            module: None,
            live: false,
        })
        .await;
    assert!(!r.ok, "{r:?}");
    assert!(
        r.error
            .as_deref()
            .is_some_and(|e| e.contains("swap aborted")),
        "{r:?}"
    );
    // Long enough for node2 to have taken over if node1 had handed over.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(n1.state_of("node1"), Some(Role::Prim));
    assert_eq!(n2.state_of("node2"), Some(Role::Second));
    assert_eq!(n2.state_of("node1"), Some(Role::Prim));
    assert!(n1.vm.is_running("vm1"));
    assert!(!n2.vm.is_running("vm1"), "the VM runs on both nodes");
    assert_eq!(n1.fs.mounted("vm1"), Some(Mounted::Writer));
    assert_eq!(n2.fs.mounted("vm1"), Some(Mounted::Receiver));
    assert_eq!(n1.vm.count("stop"), 1, "the failed swap was retried");
    let log = n1.log().await.join("\n");
    assert!(
        log.contains("error: stop VM") && log.contains("swap aborted"),
        "{log}"
    );
    // The stop works again: the operator's swap goes through.
    n1.vm.set_failing("stop", false);
    let r = n1
        .request(Request::Swap {
            module: None,
            live: false,
        })
        .await;
    assert!(r.ok, "{r:?}");
    n2.wait_role("node2", Role::Prim, true).await;
    n2.wait("VM on node2 only", |_| {
        n2.vm.is_running("vm1") && !n1.vm.is_running("vm1")
    })
    .await;
    n1.daemon.unwrap().kill().await;
    n2.daemon.unwrap().kill().await;
}

/// The writer's own disk fails: node2 takes over at once; node1 stops its VM,
/// unmounts, shows its disk failed (also in node2's view), never starts a
/// generation and touches nothing, not even after a restart of both daemons
/// (it persisted that its copy is outdated); `vmctl start` after the repair
/// joins it with a full compare.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_disk_failure_fails_over_and_the_node_waits_until_start() {
    use vmha_controller::driver::FsHealth;
    use vmha_controller::state::Disk;
    let dir = tempfile::tempdir().unwrap();
    let (mut n1, mut n2, _) = running_pair(dir.path()).await;
    let generation1 = n1.status().modules[0].nodes["node1"].generation.clone();
    let writers = n1.fs.count("mount_writer");
    n1.fs.set_health(
        "vm1",
        Some(FsHealth::DiskFailed("write: EIO (scripted)".into())),
    );
    n2.wait_role("node2", Role::Alone, true).await;
    n2.wait("VM on node2 only", |_| {
        n2.vm.is_running("vm1") && !n1.vm.is_running("vm1")
    })
    .await;
    n2.wait("node1's disk failed in node2's view", |s| {
        s.modules[0].nodes["node1"].disk == Some(Disk::Failed)
    })
    .await;
    let s = n1.status();
    let me = &s.modules[0].nodes["node1"];
    assert_eq!(
        (me.state, me.readiness, me.disk),
        (
            Some(Role::Wait),
            Some(Readiness::NotUpToDate),
            Some(Disk::Failed)
        )
    );
    assert_eq!(s.modules[0].nodes["node2"].disk, Some(Disk::Ok));
    assert_eq!(me.generation, generation1, "node1 started a generation");
    assert_eq!(n1.fs.mounted("vm1"), None);
    // It touches nothing while node2 writes.
    let receivers = n1.fs.count("mount_receiver");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(n1.state_of("node1"), Some(Role::Wait));
    assert_eq!(n1.fs.count("mount_receiver"), receivers);
    assert_eq!(n1.fs.count("mount_writer"), writers);
    let meta = std::fs::read_to_string(
        n1.config
            .cluster
            .state_dir
            .join("vm1")
            .join("generation.json"),
    )
    .unwrap();
    assert!(meta.contains("\"self_outdated\": true"), "{meta}");
    let log = n1.log().await.join("\n");
    let after = log
        .split_once("local disk failed")
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    assert!(
        after.contains("PRIM -> WAIT: the local disk failed"),
        "{log}"
    );
    assert!(!after.contains("new generation"), "{log}");

    // Both daemons crash; node1 comes back first: its copy is outdated, so it
    // waits instead of starting alone.
    n1.fs.set_health("vm1", None);
    n1.daemon.take().unwrap().kill().await;
    n2.daemon.take().unwrap().kill().await;
    n1.restart(NodeIndex::FIRST).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(n1.state_of("node1"), Some(Role::Wait));
    assert!(!n1.vm.is_running("vm1"));
    // node2 returns and runs the module; node1 joins with a full compare.
    n2.restart(NodeIndex::SECOND).await;
    n2.wait_role("node2", Role::Prim, true).await;
    n1.wait_role("node1", Role::Second, true).await;
    assert_eq!(n1.fs.count("resync_full"), 1);
    assert_eq!(n1.fs.count("resync"), 0);
    let meta = std::fs::read_to_string(
        n1.config
            .cluster
            .state_dir
            .join("vm1")
            .join("generation.json"),
    )
    .unwrap();
    assert!(!meta.contains("self_outdated"), "{meta}");
    assert_eq!(n1.status().modules[0].nodes["node1"].disk, Some(Disk::Ok));
    n1.daemon.unwrap().kill().await;
    n2.daemon.unwrap().kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_on_prim_hands_over_and_a_daemon_shutdown_leaves_the_vm_running() {
    let dir = tempfile::tempdir().unwrap();
    let (n1, mut n2, _) = running_pair(dir.path()).await;
    let r = n1.request(Request::Stop { module: None }).await;
    assert!(r.ok, "{r:?}");
    n2.wait_role("node2", Role::Alone, false).await;
    n2.wait("VM on node2", |_| n2.vm.is_running("vm1")).await;
    assert!(!n1.vm.is_running("vm1"));
    assert_eq!(n1.state_of("node1"), Some(Role::Stop));
    // Let node1 hear node2's takeover before it starts again (see the report:
    // a Start racing the peer's takeover can resolve as a split brain).
    n1.wait_role("node2", Role::Alone, false).await;
    // Start node1 again: it follows as SECOND.
    let r = n1.request(Request::Start { module: None }).await;
    assert!(r.ok, "{r:?}");
    n1.wait_role("node1", Role::Second, true).await;
    n2.wait_role("node2", Role::Prim, true).await;
    // A daemon shutdown (SIGTERM) on the PRIM ends vmhad alone: its VM keeps
    // running (`vmctl stop` hands over, as above).
    n2.daemon.take().unwrap().shutdown("test").await;
    assert!(n2.vm.is_running("vm1"));
    n1.daemon.unwrap().kill().await;
}

fn forged_beat(role: Role) -> Vec<u8> {
    let payload = Payload {
        node: "node1".into(),
        session: 1,
        round: 1_000_000,
        config_hash: vmha_controller::config::Digest([0; 32]),
        modules: vec![ModuleBeat {
            name: "vm1".into(),
            module_hash: vmha_controller::config::Digest([0; 32]),
            announce: Announce::ready(role),
            history: vmha_controller::generation::History::empty(),
            changed_bytes: 0,
            resync: None,
            keys: Default::default(),
        }],
        config_keys: Default::default(),
        software: None,
    };
    Sealer::new(&ClusterKey::from_bytes([7; 32]))
        .seal(
            "127.0.0.2".parse().unwrap(),
            Handshake::default(),
            &serde_json::to_vec(&payload).unwrap(),
        )
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_heartbeats_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut n1, n2, port) = running_pair(dir.path()).await;
    let generation = n2.status().modules[0].nodes["node2"].generation.clone();
    // Kill node1 and take its address: forged datagrams (wrong key) claiming
    // node1 is STOP, then that it still runs. Neither must count.
    n1.daemon.take().unwrap().kill().await;
    let evil = std::net::UdpSocket::bind(("127.0.0.1", port)).unwrap();
    let target = ("127.0.0.2", port);
    let killed = Instant::now();
    let mut saw_second_after_timeout = false;
    while killed.elapsed() < Duration::from_millis(FAILOVER_MS - 100) {
        evil.send_to(&forged_beat(Role::Stop), target).unwrap();
        tokio::time::sleep(Duration::from_millis(25)).await;
        // A forged STOP would make the SECOND take over at once.
        saw_second_after_timeout = n2.state_of("node2") == Some(Role::Second);
    }
    assert!(saw_second_after_timeout, "a forged STOP made node2 act");
    // Forged "PRIM" heartbeats do not keep the dead peer alive either.
    let flood = tokio::spawn(async move {
        for _ in 0..100 {
            let _ = evil.send_to(&forged_beat(Role::Prim), target);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    n2.wait_role("node2", Role::Alone, false).await;
    assert!(killed.elapsed() >= Duration::from_millis(FAILOVER_MS - 60));
    assert_ne!(n2.status().modules[0].nodes["node2"].generation, generation);
    // Counted (and logged at a bounded rate), never acted on.
    assert!(n2.status().heartbeats_rejected["forged"] >= 10);
    flood.abort();
    n2.daemon.unwrap().kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_hash_mismatch_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_cluster_port();
    // Whole-config mismatch only (start_wait_ms is not a module setting).
    let n1 = Node::start("node1", &toml(port, "", 300), dir.path()).await;
    let n2 = Node::start("node2", &toml(port, "", 301), dir.path()).await;
    // A module is in the heartbeats once started: wait for its beat.
    n1.wait("peer's module heard", |s| {
        s.modules[0].nodes["node2"]
            .module_config_match
            .flatten()
            .is_some()
    })
    .await;
    let json = serde_json::to_value(n1.status()).unwrap();
    assert_eq!(json["modules"][0]["nodes"]["node2"]["config_match"], false);
    assert_eq!(
        json["modules"][0]["nodes"]["node2"]["module_config_match"],
        true
    );
    n1.daemon.unwrap().kill().await;
    n2.daemon.unwrap().kill().await;

    // A module setting differs: the module's hash differs too.
    let dir = tempfile::tempdir().unwrap();
    let port = free_cluster_port();
    let n1 = Node::start("node1", &toml(port, "", 300), dir.path()).await;
    let n2 = Node::start("node2", &toml(port, "stop_timeout_s = 5", 300), dir.path()).await;
    n2.wait("peer's module heard", |s| {
        s.modules[0].nodes["node1"]
            .module_config_match
            .flatten()
            .is_some()
    })
    .await;
    let json = serde_json::to_value(n2.status()).unwrap();
    assert_eq!(json["modules"][0]["nodes"]["node1"]["config_match"], false);
    assert_eq!(
        json["modules"][0]["nodes"]["node1"]["module_config_match"],
        false
    );
    n1.daemon.unwrap().kill().await;
    n2.daemon.unwrap().kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_has_the_design_shape() {
    let dir = tempfile::tempdir().unwrap();
    let (n1, n2, _) = running_pair(dir.path()).await;
    let socket = n1.socket.clone();
    let raw = tokio::task::spawn_blocking(move || {
        use std::io::{BufRead, Write};
        let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
        s.write_all(b"{\"cmd\":\"status\"}\n").unwrap();
        let mut line = String::new();
        std::io::BufReader::new(s).read_line(&mut line).unwrap();
        line
    })
    .await
    .unwrap();
    let v: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(v["ok"], true);
    let st = &v["status"];
    assert_eq!(st["node"], "node1");
    let m = &st["modules"][0];
    assert_eq!(m["name"], "vm1");
    assert_eq!(m["domain"], "vm1");
    assert_eq!(m["primary"], "node1");
    let local = &m["nodes"]["node1"];
    for k in [
        "reachable",
        "state",
        "ready",
        "readiness",
        "colour",
        "generation",
        "resync",
    ] {
        assert!(local.get(k).is_some(), "local lacks {k}: {local}");
    }
    assert_eq!(local["state"], "PRIM");
    assert_eq!(local["colour"], "green");
    assert!(local.get("heartbeats").is_none());
    let peer = &m["nodes"]["node2"];
    assert_eq!(peer["state"], "SECOND");
    assert_eq!(peer["readiness"], "ready");
    assert!(peer["last_seen_ms"].as_u64().unwrap() < 1000);
    let hb = peer["heartbeats"].as_object().unwrap();
    assert_eq!(hb.len(), 2);
    assert!(hb["127.0.0.2"].as_u64().is_some() && hb["127.0.0.4"].as_u64().is_some());
    // Unknown command: a clear error, the connection stays usable.
    let r = n1
        .daemon()
        .request(Request::Log {
            module: Some("vm9".into()),
        })
        .await;
    assert!(!r.ok);
    n1.daemon.unwrap().kill().await;
    n2.daemon.unwrap().kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_killed_behind_the_back_is_restarted_then_fails_over() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_cluster_port();
    let text = toml(port, "maxloop = 2", 300);
    let n1 = Node::start("node1", &text, dir.path()).await;
    let n2 = Node::start("node2", &text, dir.path()).await;
    n1.wait_role("node1", Role::Wait, false).await;
    assert!(n1.request(Request::Prim { module: None }).await.ok);
    n1.wait_role("node2", Role::Second, true).await;
    let starts = n1.vm.count("start");
    for i in 1..=2 {
        n1.vm.kill("vm1");
        n1.wait("VM restarted", |_| n1.vm.count("start") == starts + i)
            .await;
        n1.wait("VM running", |_| n1.vm.is_running("vm1")).await;
    }
    // maxloop reached: node1 steps down, node2 fails over.
    n1.vm.kill("vm1");
    n2.wait_role("node2", Role::Alone, false).await;
    n2.wait("VM on node2", |_| n2.vm.is_running("vm1")).await;
    n1.wait_role("node1", Role::Second, false).await;
    let log = n1.log().await.join("\n");
    assert!(log.contains("maxloop reached"), "{log}");
    n1.daemon.unwrap().kill().await;
    n2.daemon.unwrap().kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_second_shows_resync_progress_until_done() {
    let dir = tempfile::tempdir().unwrap();
    let (n1, n2, _) = pair(dir.path()).await;
    n2.fs.set_manual_resync(true);
    n1.wait_role("node1", Role::Wait, false).await;
    assert!(n1.request(Request::Prim { module: None }).await.ok);
    n1.wait_role("node2", Role::Second, false).await;
    n2.fs.set_resync(
        "vm1",
        vmha_controller::driver::ResyncState::Running(vmha_controller::state::Progress {
            done_bytes: 512 << 10,
            total_bytes: 1 << 20,
        }),
    );
    n1.wait("progress shown for node2", |s| {
        s.modules[0].nodes["node2"]
            .resync
            .is_some_and(|r| r.done_bytes == 512 << 10 && r.total_bytes == 1 << 20)
    })
    .await;
    let s = n1.status();
    let peer = &s.modules[0].nodes["node2"];
    assert!(!peer.ready);
    assert_eq!(peer.readiness, Some(Readiness::NotUpToDate));
    // The writer becomes PRIM once it has seen the peer SECOND, even while it
    // resyncs (the status may show the heartbeat a moment before the module acts).
    n1.wait_role("node1", Role::Prim, false).await;
    n2.fs.finish_resync("vm1");
    n1.wait_role("node2", Role::Second, true).await;
    n1.wait_role("node1", Role::Prim, true).await;
    assert_eq!(n1.status().modules[0].nodes["node2"].resync, None);
    n1.daemon.unwrap().kill().await;
    n2.daemon.unwrap().kill().await;
}

impl Node {
    async fn log(&self) -> Vec<String> {
        self.request(Request::Log { module: None }).await.lines
    }
}

/// Neither node lost its peer ("lost the peer", "lost the PRIM") in the log
/// lines after `since` (their lengths before).
async fn no_failover_since(n1: &Node, n2: &Node, since: [usize; 2], why: &str) {
    for (n, from) in [(n1, since[0]), (n2, since[1])] {
        let log = n.log().await;
        let new = log.get(from..).unwrap_or_default();
        assert!(
            !new.iter().any(|l| l.contains("lost the")),
            "{} failed over ({why}):\n{}",
            n.name,
            log.join("\n")
        );
    }
}

/// Whether `n` sees node1 PRIM and node2 SECOND, both ready and the peer
/// reachable.
fn is_steady(n: &Node) -> bool {
    let s = n.status();
    let peer = if n.name == "node1" { "node2" } else { "node1" };
    let m = &s.modules[0].nodes;
    m[peer].reachable
        && m["node1"].state == Some(Role::Prim)
        && m["node1"].ready
        && m["node2"].state == Some(Role::Second)
        && m["node2"].ready
}

/// Asserts for `period` that node1 stays PRIM and node2 SECOND, each hearing
/// the other: no peer loss, no failover.
async fn hold_steady(n1: &Node, n2: &Node, period: Duration, why: &str) {
    let since = [n1.log().await.len(), n2.log().await.len()];
    let end = Instant::now() + period;
    while Instant::now() < end {
        for n in [n1, n2] {
            if !is_steady(n) {
                panic!(
                    "{} left the steady pair ({why}): {}\nlog:\n{}",
                    n.name,
                    serde_json::to_string_pretty(&n.status()).unwrap(),
                    n.log().await.join("\n")
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    no_failover_since(n1, n2, since, why).await;
}

const TEN_MINUTES_S: i64 = 600;

/// Issue 8, item 4: the nodes' wall clocks 20 minutes apart, then both
/// stepped by 20 minutes while running (an NTP step, a manual `date`): the
/// pair forms and stays PRIM/SECOND; nobody fails over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clocks_apart_and_stepping_cause_no_failover() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_cluster_port();
    let text = toml(port, "", 300);
    let c1 = WallClock::with_offset(TEN_MINUTES_S);
    let c2 = WallClock::with_offset(-TEN_MINUTES_S);
    let n1 = Node::start_with_clock("node1", &text, dir.path(), c1.clone()).await;
    let n2 = Node::start_with_clock("node2", &text, dir.path(), c2.clone()).await;
    steady(&n1, &n2).await;
    let hold = Duration::from_millis(FAILOVER_MS * 5);
    hold_steady(&n1, &n2, hold, "node1 at +10 min, node2 at -10 min").await;
    c1.set_offset(-TEN_MINUTES_S);
    c2.set_offset(TEN_MINUTES_S);
    hold_steady(&n1, &n2, hold, "both clocks stepped by 20 min").await;
    // Only the displayed time moved: node1's log, written while its clock
    // was 10 min ahead, shows it.
    let last = n1.log().await.pop().unwrap();
    let ahead = vmha_controller::eventlog::timestamp(
        std::time::SystemTime::now() + Duration::from_secs(TEN_MINUTES_S as u64 - 60),
    );
    assert!(last.as_str() > ahead.as_str(), "{last} vs {ahead}");
    n1.daemon.unwrap().kill().await;
    n2.daemon.unwrap().kill().await;
}

/// Issue 8, item 4: the SECOND's daemon dies and starts again with its clock
/// behind the one of its previous run (so behind every counter the PRIM has
/// seen from it): the PRIM hears it again, never loses it, and the pair is
/// PRIM/SECOND again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_restarted_with_its_clock_behind_is_heard_again() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_cluster_port();
    // A failover timeout the restart fits in with room to spare.
    let failover = Duration::from_millis(1500);
    let text = toml(port, "", 300)
        .replace(
            &format!("failover_timeout_ms = {FAILOVER_MS}"),
            &format!("failover_timeout_ms = {}", failover.as_millis()),
        )
        .replace("lock_timeout_ms = 1000", "lock_timeout_ms = 3000");
    let c2 = WallClock::system();
    let n1 = Node::start("node1", &text, dir.path()).await;
    let mut n2 = Node::start_with_clock("node2", &text, dir.path(), c2.clone()).await;
    steady(&n1, &n2).await;
    let node2 = n2.config.local_node("node2").unwrap();
    for behind_s in [5, TEN_MINUTES_S] {
        let why = format!("node2 restarted {behind_s} s behind");
        let since = [n1.log().await.len(), 0];
        n2.daemon.take().unwrap().kill().await;
        c2.set_offset(-behind_s);
        let restarted = Instant::now();
        n2.restart(node2).await;
        // node1 hears the new daemon (its old one is dead: any heartbeat
        // node1 accepts from now on is of the new session).
        loop {
            let s = n1.status();
            let seen = s.modules[0].nodes["node2"].last_seen_ms.flatten();
            if seen.is_some_and(|ms| u128::from(ms) < restarted.elapsed().as_millis()) {
                break;
            }
            assert!(restarted.elapsed() < failover, "{why}: not heard again");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        eprintln!("{why}: heard again after {:?}", restarted.elapsed());
        // Steady again, and for longer than the failover timeout since the
        // restart (node1 may first see the new node2 WAIT and write alone
        // for a moment: that is no peer loss).
        while !(is_steady(&n1) && is_steady(&n2) && restarted.elapsed() > failover * 2) {
            assert!(
                restarted.elapsed() < Duration::from_secs(15),
                "{why}: not steady again"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        no_failover_since(&n1, &n2, since, &why).await;
        hold_steady(&n1, &n2, failover * 2, &why).await;
    }
    n1.daemon.unwrap().kill().await;
    n2.daemon.unwrap().kill().await;
}

/// A receiver that cannot start is retried with back-off (1 s, doubling),
/// not at every heartbeat, and logged when it starts failing and when it
/// works again, not at each attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_receiver_start_backs_off_and_logs_once() {
    let dir = tempfile::tempdir().unwrap();
    let (n1, n2, _) = pair(dir.path()).await;
    n1.wait_role("node1", Role::Wait, false).await;
    n2.wait_role("node2", Role::Wait, false).await;
    n2.fs.set_failing("mount_receiver", true);
    let r = n1.request(Request::Prim { module: None }).await;
    assert!(r.ok, "{r:?}");
    n1.wait_role("node1", Role::Alone, true).await;
    // 3.5 s of heartbeats every 50 ms: attempts at 0, ~1 s, ~3 s.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let attempts = n2.fs.count("mount_receiver");
    assert!(
        (2..=4).contains(&attempts),
        "{attempts} receiver starts in 3.5 s"
    );
    let log = n2.log().await;
    let errors = log
        .iter()
        .filter(|l| l.contains("error: start the receiver"))
        .count();
    assert_eq!(errors, 1, "{log:#?}");
    assert_eq!(
        log.iter().filter(|l| l.contains("SECOND -> WAIT")).count(),
        1,
        "{log:#?}"
    );
    n2.fs.set_failing("mount_receiver", false);
    n2.wait_role("node2", Role::Second, true).await;
    let log = n2.log().await;
    assert!(
        log.iter()
            .any(|l| l.contains("start the receiver: done, after")),
        "{log:#?}"
    );
    n1.daemon.unwrap().kill().await;
    n2.daemon.unwrap().kill().await;
}

/// `vmctl resync --compare` on the PRIM and `vmctl invalidate` on the SECOND,
/// through the control socket: refusals where they make no sense; otherwise the
/// SECOND is made outdated (a new generation), resynchronised with a compare,
/// and ready again at the end with the PRIM's generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_compare_and_invalidate_repair_the_second() {
    let dir = tempfile::tempdir().unwrap();
    let (n1, n2, _) = running_pair(dir.path()).await;
    let generation = |s: &Status, node: &str| s.modules[0].nodes[node].generation.clone();
    let before = generation(&n1.status(), "node1");

    let r = n1.request(Request::Invalidate { module: None }).await;
    assert!(!r.ok, "{r:?}");
    assert!(r.error.unwrap_or_default().contains("invalidate refused"));
    let r = n1
        .request(Request::Resync {
            module: None,
            compare: false,
        })
        .await;
    assert!(!r.ok, "{r:?}");
    let resyncs = n2.fs.count("resync");
    let r = n1
        .request(Request::Resync {
            module: None,
            compare: true,
        })
        .await;
    assert!(r.ok, "{r:?}");
    assert_eq!(n1.fs.count("request_compare"), 1);
    n1.wait("the SECOND repaired and ready", |s| {
        let (g1, g2) = (generation(s, "node1"), generation(s, "node2"));
        g1 != before && g1 == g2 && s.modules[0].nodes["node2"].ready
    })
    .await;
    assert!(n2.fs.count("resync") > resyncs, "{:?}", n2.fs.calls());
    let log = n1.log().await.join("\n");
    assert!(log.contains("comparing every block"), "{log}");

    let before = generation(&n1.status(), "node1");
    let full = n2.fs.count("resync_full");
    let r = n2.request(Request::Invalidate { module: None }).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(n2.fs.count("invalidate"), 1);
    n1.wait("the SECOND's request reached the PRIM", |_| {
        n1.fs.count("request_compare") == 2
    })
    .await;
    n2.wait("the invalidated SECOND resynced and ready", |s| {
        let (g1, g2) = (generation(s, "node1"), generation(s, "node2"));
        g1 != before && g1 == g2 && s.modules[0].nodes["node2"].ready
    })
    .await;
    assert_eq!(n2.fs.count("resync_full"), full + 1, "{:?}", n2.fs.calls());
    n1.daemon.unwrap().kill().await;
    n2.daemon.unwrap().kill().await;
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leave_hands_over_and_stays_out_across_a_restart_until_join() {
    let dir = tempfile::tempdir().unwrap();
    let (mut n1, n2, _) = running_pair(dir.path()).await;
    let r = n1
        .request(Request::Leave {
            until_boot: false,
            wait_s: Some(10),
        })
        .await;
    assert!(r.ok, "{r:?}");
    // --wait answered only once node2 runs it.
    assert!(n2.vm.is_running("vm1"), "{r:?}");
    assert!(!n1.vm.is_running("vm1"));
    assert!(
        r.lines
            .iter()
            .any(|l| l.contains("handed over, node2 runs it")),
        "{r:?}"
    );
    let s = n2.status();
    assert!(s.modules[0].nodes["node1"].left);
    assert!(dir.path().join("node1/state/left.json").exists());
    // Out: start is refused, and a restarted vmhad keeps the node out.
    let r = n1.request(Request::Start { module: None }).await;
    assert!(
        !r.ok && r.error.as_deref().unwrap_or("").contains("join"),
        "{r:?}"
    );
    n1.daemon.take().unwrap().kill().await;
    n1.restart(NodeIndex::FIRST).await;
    n1.wait("node2 heard", |s| {
        s.modules[0].nodes["node2"].state == Some(Role::Alone)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(n1.state_of("node1"), Some(Role::Stop));
    assert!(n1.status().modules[0].nodes["node1"].left);
    assert_eq!(n1.fs.mounted("vm1"), None);
    // Join: node1 follows node2 as SECOND.
    let r = n1.request(Request::Join).await;
    assert!(r.ok, "{r:?}");
    n1.wait_role("node1", Role::Second, true).await;
    n2.wait_role("node2", Role::Prim, true).await;
    assert!(!n1.status().modules[0].nodes["node1"].left);
    assert!(!dir.path().join("node1/state/left.json").exists());
    n1.daemon.unwrap().kill().await;
    n2.daemon.unwrap().kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_holds_the_controller_on_both_nodes_and_persists() {
    let dir = tempfile::tempdir().unwrap();
    let (mut n1, mut n2, _) = running_pair(dir.path()).await;
    let r = n1
        .request(Request::Maintenance {
            on: true,
            module: None,
        })
        .await;
    assert!(r.ok, "{r:?}");
    n2.wait("node2 sees node1's maintenance", |s| {
        s.modules[0].nodes["node1"].maintenance
    })
    .await;
    // The VM killed on node1: not restarted, no failover.
    let starts = n1.vm.count("start");
    n1.vm.kill("vm1");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(n1.vm.count("start"), starts);
    assert_eq!(n1.state_of("node1"), Some(Role::Prim));
    assert_eq!(n2.state_of("node2"), Some(Role::Second));
    // Persisted: a restarted vmhad is still in maintenance.
    n1.daemon.take().unwrap().kill().await;
    n1.restart(NodeIndex::FIRST).await;
    assert!(n1.status().modules[0].nodes["node1"].maintenance);
    // node1's vmhad is down longer than the failover timeout: node2 does not
    // fail over onto itself (node1 is in maintenance).
    n1.daemon.take().unwrap().kill().await;
    tokio::time::sleep(Duration::from_millis(FAILOVER_MS * 3)).await;
    assert_eq!(n2.state_of("node2"), Some(Role::Second));
    assert!(!n2.vm.is_running("vm1"));
    n1.restart(NodeIndex::FIRST).await;
    // Off: the controller reacts (here node1 restarted WAIT and holds; node2
    // fails over from it or node1 starts: the VM runs again somewhere).
    let r = n1
        .request(Request::Maintenance {
            on: false,
            module: Some("vm1".into()),
        })
        .await;
    assert!(r.ok, "{r:?}");
    n2.wait("the VM runs again", |_| {
        n1.vm.is_running("vm1") || n2.vm.is_running("vm1")
    })
    .await;
    assert!(!n1.status().modules[0].nodes["node1"].maintenance);
    let r = n2
        .request(Request::Maintenance {
            on: true,
            module: Some("nope".into()),
        })
        .await;
    assert!(
        !r.ok && r.error.as_deref().unwrap_or("").contains("unknown module"),
        "{r:?}"
    );
    n1.daemon.take().unwrap().kill().await;
    n2.daemon.take().unwrap().kill().await;
}

/// Live swap through the daemons, with drivers that cannot mount a standby
/// (the fake vmha-fs): `swap --live` answers only once the live swap ended,
/// with an error (never a fallback) and the VM where it was; with `swap =
/// "live"` a plain swap tries the live swap, then falls back to stop/start
/// (logged); on a SECOND `swap --live` is refused at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_swap_never_falls_back_but_swap_live_config_does() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_cluster_port();
    let text = toml(port, "swap = \"live\"", 300);
    let n1 = Node::start("node1", &text, dir.path()).await;
    let n2 = Node::start("node2", &text, dir.path()).await;
    steady(&n1, &n2).await;
    let r = n1
        .request(Request::Swap {
            module: None,
            live: true,
        })
        .await;
    assert!(!r.ok, "{r:?}");
    let error = r.error.clone().unwrap_or_default();
    assert!(
        error.contains("live swap aborted") && error.contains("standby"),
        "{r:?}"
    );
    assert!(n1.vm.is_running("vm1") && !n2.vm.is_running("vm1"));
    assert_eq!(n1.state_of("node1"), Some(Role::Prim));
    n2.wait("node2 drops the live swap", |s| {
        s.modules[0].nodes["node2"].swap_phase.is_none()
    })
    .await;
    // `swap = "live"`: the plain swap falls back to stop/start.
    let r = n1
        .request(Request::Swap {
            module: None,
            live: false,
        })
        .await;
    assert!(r.ok, "{r:?}");
    n2.wait_role("node2", Role::Prim, true).await;
    n2.wait("VM on node2 only", |_| {
        n2.vm.is_running("vm1") && !n1.vm.is_running("vm1")
    })
    .await;
    let log = n1.log().await.join("\n");
    assert!(log.contains("falling back to stop/start"), "{log}");
    // On the SECOND: refused at once.
    n1.wait_role("node1", Role::Second, true).await;
    let r = n1
        .request(Request::Swap {
            module: None,
            live: true,
        })
        .await;
    assert!(!r.ok, "{r:?}");
    assert!(
        r.error.unwrap_or_default().contains("live swap refused"),
        "refusal"
    );
    n1.daemon.unwrap().kill().await;
    n2.daemon.unwrap().kill().await;
}

/// node1 PRIM, node2 its ready SECOND, with a failover timeout far above a
/// vmhad restart (the old PRIM must not fail over meanwhile); node1's VM
/// migrates to node2's fake libvirt, node2's fake vmha-fs mounts standbys
/// and is found running by a daemon started again on it.
async fn live_swap_pair(dir: &Path) -> (Node, Node) {
    let port = free_cluster_port();
    let text = toml(port, "", 300)
        .replace(
            &format!("failover_timeout_ms = {FAILOVER_MS}"),
            "failover_timeout_ms = 15000",
        )
        .replace("lock_timeout_ms = 1000", "lock_timeout_ms = 20000");
    let n1 = Node::start("node1", &text, dir).await;
    let n2 = Node::start("node2", &text, dir).await;
    steady(&n1, &n2).await;
    n1.vm.set_migration_peer(&n2.vm);
    n2.fs.set_live_swap(true);
    n2.fs.set_adoptable(true);
    (n1, n2)
}

/// `swap --live` on `n`, answered in the background.
fn swap_live_in_background(n: &Node) -> tokio::task::JoinHandle<Response> {
    let handle = n.daemon().handle();
    tokio::spawn(async move {
        handle
            .request_as(
                Request::Swap {
                    module: None,
                    live: true,
                },
                "test",
            )
            .await
    })
}

/// Polls `cond` until it holds; panics with `what` after `timeout`.
async fn wait_for(what: &str, timeout: Duration, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn history(n: &Node) -> History {
    Metadata::load(&n.config.cluster.state_dir, "vm1")
        .unwrap()
        .history
}

/// A live swap's destination whose vmhad dies after it adopted the flip G'
/// and before it activated its standby (its receiver still accepts G, the
/// generation before the flip), and starts again at once: the new vmhad
/// counts that receiver as up to date and takes the hand-over the old PRIM
/// still asks for. The VM ends on the destination and is never started
/// again on the old PRIM (the old rule took the receiver for outdated: the
/// destination stepped down and the old PRIM failed over, restarting the
/// VM there); `swap --live` on the old PRIM succeeds; both nodes stay on G'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_swap_destination_restarted_after_adopting_the_flip_takes_the_vm() {
    let dir = tempfile::tempdir().unwrap();
    let (n1, mut n2) = live_swap_pair(dir.path()).await;
    n2.fs.hold("activate_standby");
    let swap = swap_live_in_background(&n1);
    // node2 adopted the flip and is activating its standby: its vmhad dies.
    wait_for(
        "node2 activating its standby",
        Duration::from_secs(20),
        || n2.fs.count("activate_standby") == 1,
    )
    .await;
    n2.daemon.take().unwrap().kill().await;
    n2.fs.release("activate_standby", true);
    let (h1, h2) = (history(&n1), history(&n2));
    assert!(h2.current_is_flip(), "node2 adopted the flip: {h2:?}");
    assert_eq!(h1, h2);
    let parent = h2.previous()[0].to_string();
    assert_eq!(n2.fs.generation("vm1").as_deref(), Some(parent.as_str()));
    assert_eq!(n2.fs.mounted("vm1"), Some(Mounted::Receiver));
    assert!(!n1.vm.is_running("vm1"), "the VM left node1");
    assert_eq!(n1.vm.count("start"), 1);

    let node2 = n2.config.local_node("node2").unwrap();
    n2.restart(node2).await;
    n2.wait_role("node2", Role::Prim, true).await;
    n1.wait_role("node1", Role::Second, true).await;
    n1.wait_role("node2", Role::Prim, true).await;
    n2.wait("the VM on node2 only", |_| {
        n2.vm.is_running("vm1") && !n1.vm.is_running("vm1")
    })
    .await;
    assert_eq!(n1.vm.count("start"), 1, "the VM never restarted on node1");
    assert_eq!(n2.fs.mounted("vm1"), Some(Mounted::Writer));
    let current = h2.current().map(|g| g.to_string());
    assert_eq!(n2.fs.generation("vm1"), current, "the writer claims G'");
    assert_eq!(history(&n1), history(&n2), "no new generation, no resync");
    let r = tokio::time::timeout(Duration::from_secs(60), swap)
        .await
        .unwrap()
        .unwrap();
    assert!(r.ok, "{r:?}");
    let log = n2.log().await.join("\n");
    assert!(log.contains("live flip descends"), "{log}");
    n1.daemon.unwrap().kill().await;
    n2.daemon.unwrap().kill().await;
}

/// A live swap's destination whose vmhad dies after activating its standby
/// (the writer claims G') and before resuming the migrated VM, and starts
/// again: the new vmhad adopts the writer and, the VM being paused for the
/// swap (`resume-pending` in the module's state directory), resumes it
/// (never destroyed, never started on the old PRIM). Before, the paused
/// domain counted as running: adopted as it was, it stayed paused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_swap_destination_restarted_before_resuming_resumes_the_vm() {
    let dir = tempfile::tempdir().unwrap();
    let (n1, mut n2) = live_swap_pair(dir.path()).await;
    n2.vm.hold("resume");
    let swap = swap_live_in_background(&n1);
    wait_for("node2 resuming the VM", Duration::from_secs(20), || {
        n2.vm.count("resume") == 1
    })
    .await;
    n2.daemon.take().unwrap().kill().await;
    n2.vm.release("resume", true);
    assert_eq!(n2.vm.vm_state("vm1"), VmState::Paused);
    assert_eq!(n2.fs.mounted("vm1"), Some(Mounted::Writer));
    let pending = n2
        .config
        .cluster
        .state_dir
        .join("vm1")
        .join(vmha_controller::daemon::RESUME_PENDING);
    assert!(pending.exists(), "{}", pending.display());
    let stops = n2.vm.count("stop");

    let node2 = n2.config.local_node("node2").unwrap();
    n2.restart(node2).await;
    n2.wait_role("node2", Role::Prim, true).await;
    n1.wait_role("node1", Role::Second, true).await;
    n2.wait("the VM runs on node2", |_| {
        n2.vm.is_running("vm1") && !n1.vm.is_running("vm1")
    })
    .await;
    assert_eq!(
        n2.vm.count("stop"),
        stops,
        "the paused VM was not destroyed"
    );
    assert_eq!(n2.vm.count("resume"), 2, "resumed by the new vmhad");
    assert_eq!(n2.vm.count("start"), 0, "resumed, not started");
    assert_eq!(n1.vm.count("start"), 1, "the VM never restarted on node1");
    assert!(!pending.exists(), "{}", pending.display());
    assert_eq!(history(&n1), history(&n2), "no new generation, no resync");
    let r = tokio::time::timeout(Duration::from_secs(60), swap)
        .await
        .unwrap()
        .unwrap();
    assert!(r.ok, "{r:?}");
    let log = n2.log().await.join("\n");
    assert!(log.contains("still paused"), "{log}");
    n1.daemon.unwrap().kill().await;
    n2.daemon.unwrap().kill().await;
}
