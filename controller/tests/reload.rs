//! Live configuration with two daemons in one process (fake drivers,
//! loopback): `reload` adds, updates and removes modules without touching
//! the others, a reload with errors changes nothing and names every reason,
//! and the nodes name the configuration keys that differ.

// Test-only crate: its helpers panic on failure like the tests themselves.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vmha_controller::clock::WallClock;
use vmha_controller::config::Config;
use vmha_controller::control::{Client, Request, Response};
use vmha_controller::daemon::{Daemon, DaemonSpec};
use vmha_controller::driver::fake::{FakeFs, FakeVm};
use vmha_controller::state::Role;
use vmha_controller::status::Status;
use vmha_fs::key::ClusterKey;
use vmha_test_infra::ports::free_cluster_port;

/// One node's file: the same cluster, with this node's state dir and socket.
fn text(dir: &Path, node: &str, port: u16, lock_timeout_ms: u64, modules: &str) -> String {
    format!(
        r#"
[cluster]
name = "test"
heartbeat_port = {port}
heartbeat_interval_ms = 50
failover_timeout_ms = 400
start_wait_ms = 300
state_dir = "{state}"
control_socket = "{socket}"

[[node]]
name = "node1"
addresses = ["127.0.0.1"]

[[node]]
name = "node2"
addresses = ["127.0.0.2"]

[[module]]
name = "vm1"
replicated = ["/srv/vmha-test/vm1"]
port = {vm1_port}
lock_timeout_ms = {lock_timeout_ms}
{modules}
"#,
        state = dir.join(node).join("state").display(),
        socket = dir.join(node).join("run/vmhad.sock").display(),
        vm1_port = port + 1,
    )
}

fn vm2(port: u16) -> String {
    format!(
        "\n[[module]]\nname = \"vm2\"\nreplicated = [\"/srv/vmha-test/vm2\"]\nport = {}\nlock_timeout_ms = 1000\n",
        port + 2
    )
}

struct Node {
    name: &'static str,
    daemon: Daemon,
    vm: FakeVm,
    socket: PathBuf,
    file: PathBuf,
}

impl Node {
    async fn start(name: &'static str, dir: &Path, text: &str) -> Node {
        let file = dir.join(format!("{name}.toml"));
        std::fs::write(&file, text).unwrap();
        let config = Config::load(&file).unwrap();
        let node = config.local_node(name).unwrap();
        let vm = FakeVm::new();
        let socket = config.cluster.control_socket.clone();
        let daemon = Daemon::start(DaemonSpec {
            config,
            node,
            key: ClusterKey::from_bytes([42; 32]),
            vm: Arc::new(vm.clone()),
            fs: Arc::new(FakeFs::new()),
            clock: WallClock::system(),
        })
        .await
        .unwrap();
        daemon.set_config_file(&file);
        Node {
            name,
            daemon,
            vm,
            socket,
            file,
        }
    }

    async fn request(&self, request: Request) -> Response {
        let socket = self.socket.clone();
        tokio::task::spawn_blocking(move || Client::connect(&socket)?.call(&request))
            .await
            .unwrap()
            .unwrap()
    }

    async fn reload_with(&self, text: &str) -> Response {
        std::fs::write(&self.file, text).unwrap();
        self.request(Request::Reload).await
    }

    fn status(&self) -> Status {
        self.daemon.status()
    }

    fn state(&self, module: &str, node: &str) -> Option<Role> {
        self.status()
            .modules
            .iter()
            .find(|m| m.name == module)?
            .nodes[node]
            .state
    }

    async fn log(&self, module: &str) -> Vec<String> {
        self.request(Request::Log {
            module: Some(module.into()),
        })
        .await
        .lines
    }

    async fn wait(&self, what: &str, cond: impl Fn(&Status) -> bool) {
        common::wait_status(self.name, &self.daemon, what, Duration::from_secs(10), cond).await;
    }
}

/// node1 PRIM, node2 SECOND for vm1.
async fn running_pair(dir: &Path, port: u16) -> (Node, Node) {
    let n1 = Node::start("node1", dir, &text(dir, "node1", port, 1000, "")).await;
    let n2 = Node::start("node2", dir, &text(dir, "node2", port, 1000, "")).await;
    let timeout = Duration::from_secs(10);
    common::wait_role("node1", &n1.daemon, "node1", Role::Wait, false, timeout).await;
    let r = n1.request(Request::Prim { module: None }).await;
    assert!(r.ok, "{r:?}");
    n1.wait("vm1 PRIM/SECOND", |s| {
        s.modules[0].nodes["node1"].state == Some(Role::Prim)
            && s.modules[0].nodes["node2"].state == Some(Role::Second)
            && s.modules[0].nodes["node2"].ready
    })
    .await;
    (n1, n2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_a_module_without_touching_the_running_one() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_cluster_port();
    let (n1, n2) = running_pair(dir.path(), port).await;
    let vm1_log = n1.log("vm1").await;
    let starts = n1.vm.count("start");

    // vm2 on node1 only: the nodes name the difference.
    let with_vm2 = |node| text(dir.path(), node, port, 1000, &vm2(port));
    let r = n1.reload_with(&with_vm2("node1")).await;
    assert!(r.ok, "{r:?}");
    assert!(r.lines.iter().any(|l| l.starts_with("vm2: added")), "{r:?}");
    assert_eq!(n1.state("vm2", "node1"), Some(Role::Stop));
    n1.wait("vm2 named as a difference", |s| {
        s.config_differences == vec!["modules.vm2".to_string()]
    })
    .await;
    n2.wait("vm2 named as a difference", |s| {
        s.config_differences == vec!["modules.vm2".to_string()]
    })
    .await;

    let r = n2.reload_with(&with_vm2("node2")).await;
    assert!(r.ok, "{r:?}");
    n1.wait("no difference left", |s| s.config_differences.is_empty())
        .await;
    n2.wait("no difference left", |s| s.config_differences.is_empty())
        .await;

    // vm1 untouched: same state, no restart of its VM, not one event.
    assert_eq!(n1.state("vm1", "node1"), Some(Role::Prim));
    assert_eq!(n2.state("vm1", "node2"), Some(Role::Second));
    assert!(n1.vm.is_running("vm1"));
    assert_eq!(n1.vm.count("start"), starts);
    assert_eq!(n1.log("vm1").await, vm1_log);

    // vm2 is startable (STOP on both until started).
    for n in [&n1, &n2] {
        let r = n
            .request(Request::Start {
                module: Some("vm2".into()),
            })
            .await;
        assert!(r.ok, "{r:?}");
    }
    let r = n1
        .request(Request::Prim {
            module: Some("vm2".into()),
        })
        .await;
    assert!(r.ok, "{r:?}");
    n1.wait("vm2 PRIM", |s| {
        s.modules.iter().any(|m| {
            m.name == "vm2"
                && m.nodes["node1"].state == Some(Role::Prim)
                && m.nodes["node2"].state == Some(Role::Second)
        })
    })
    .await;
    assert!(n1.vm.is_running("vm2"));

    // A running module is not removed; a stopped one is.
    let r = n2
        .reload_with(&text(dir.path(), "node2", port, 1000, ""))
        .await;
    assert!(!r.ok, "{r:?}");
    let error = r.error.unwrap();
    assert!(
        error.contains("nothing changed") && error.contains("vm2") && error.contains("SECOND"),
        "{error}"
    );
    assert!(n2.state("vm2", "node2").is_some());
    n1.daemon.kill().await;
    n2.daemon.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_errors_changes_nothing_and_names_every_reason() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_cluster_port();
    let (n1, n2) = running_pair(dir.path(), port).await;
    let before = n1.status();
    let good = text(dir.path(), "node1", port, 1000, "");

    // Syntax-level and semantic problems: each reported, with its position.
    let bad = good.replace("heartbeat_interval_ms = 50", "heartbeat_interval_ms = 50\nheartbeat_intervall = 3")
        + &format!("\n[[module]]\nname = \"vm3\"\nreplicated = [\"/srv/vmha-test/vm3\"]\nport = {}\nmaxloop = \"x\"\nbogus = 1\n", port + 3);
    let r = n1.reload_with(&bad).await;
    assert!(!r.ok, "{r:?}");
    let error = r.error.unwrap();
    for needle in [
        "cluster.heartbeat_intervall",
        "module[1].maxloop",
        "module[1].bogus",
        "node1.toml:",
    ] {
        assert!(error.contains(needle), "{needle}: {error}");
    }

    // Valid file, but refused: keys a running daemon cannot take, a running
    // module removed, a running module's port changed — all named at once.
    let refused = good.replace("/state\"", "/state2\"").replace(
        &format!("port = {}", port + 1),
        &format!("port = {}", port + 5),
    );
    let r = n1.reload_with(&refused).await;
    assert!(!r.ok, "{r:?}");
    let error = r.error.unwrap();
    assert!(
        error.contains("cluster.state_dir") && error.contains("restart"),
        "{error}"
    );
    assert!(
        error.contains("modules.vm1.port") && error.contains("vmctl stop vm1"),
        "{error}"
    );
    let without_vm1 = good.replace("[[module]]\nname = \"vm1\"", "[[module]]\nname = \"vm9\"");
    let r = n1.reload_with(&without_vm1).await;
    assert!(!r.ok, "{r:?}");
    assert!(r.error.unwrap().contains("module `vm1` is PRIM"));

    // Nothing changed: same configuration, same module, still running.
    let after = n1.status();
    assert_eq!(after.config_hash, before.config_hash);
    assert_eq!(
        after.modules.iter().map(|m| &m.name).collect::<Vec<_>>(),
        vec!["vm1"]
    );
    assert_eq!(n1.state("vm1", "node1"), Some(Role::Prim));
    assert!(n1.vm.is_running("vm1"));

    // A live key on one node only: applied here, and named by both nodes.
    let r = n1
        .reload_with(&text(dir.path(), "node1", port, 1500, ""))
        .await;
    assert!(r.ok, "{r:?}");
    assert!(
        r.lines
            .iter()
            .any(|l| l.contains("vm1") && l.contains("lock_timeout_ms")),
        "{r:?}"
    );
    for n in [&n1, &n2] {
        n.wait("lock_timeout_ms named", |s| {
            s.config_differences == vec!["modules.vm1.lock_timeout_ms".to_string()]
        })
        .await;
    }
    assert!(
        n2.log("vm1")
            .await
            .iter()
            .any(|l| l.contains("differs from the peer's: modules.vm1.lock_timeout_ms")),
        "{:?}",
        n2.log("vm1").await
    );
    assert_eq!(n1.state("vm1", "node1"), Some(Role::Prim));
    n1.daemon.kill().await;
    n2.daemon.kill().await;
}
