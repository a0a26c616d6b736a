//! Live swap's libvirt side on two simulated nodes (own namespaces, /run and
//! libvirtd each; real libvirtd, real TCG QEMU, both vmhad running):
//!
//! - node1 reaches node2's libvirt through vmhad's forwarder and node2's vmhad
//!   (daemon channel version 4): `virsh -c qemu+unix:///system?socket=…`
//!   inside node1 lists a domain defined only on node2, and the forwarded
//!   socket is gone after the forward;
//! - `LibvirtDriver::migrate_live` refuses a disk outside the module's
//!   directories (the domain keeps running), then live-migrates a counter
//!   guest whose disk is in a directory both nodes see at the same path, over
//!   the forwarder (`LIVE | PEER2PEER | TUNNELLED | PAUSED | UNSAFE`): it
//!   arrives paused on node2 (`VmDriver::paused`), nothing is left on node1,
//!   and after `VmDriver::resume` its counter goes on without a reboot.
//!
//! The driver and forwarder run inside a node: this test binary re-runs
//! itself there (`nsenter`, see `Node::command`) as [`node_helper`], which
//! does one step and prints its result.

// Test-only crate: its helpers panic on failure like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use vmha_controller::config::{Config, NodeIndex};
use vmha_controller::driver::libvirt::LibvirtDriver;
use vmha_controller::driver::{Paused, VmDriver};
use vmha_controller::migrate::{self, Forwarder};
use vmha_fs::key::ClusterKey;
use vmha_test_infra::cluster_vm::{host_side, ClusterModule, DomainKind, Timing, VmCluster};
use vmha_test_infra::guest::{create_disk, domain_xml, wait_console, Console, DomainSpec};
use vmha_test_infra::node::one_cluster_at_a_time;

/// The module vmhad runs (an idle domain nobody starts: no `vmctl prim`).
const MODULE: &str = "idle1";
/// The migrated guest (not a module: vmhad leaves it alone).
const GUEST: &str = "mig";
const HELPER_ENV: &str = "VMHA_LIVE_MIGRATE_HELPER";

/// One step inside a node, chosen by `VMHA_LIVE_MIGRATE_HELPER`; prints
/// `RESULT …` lines. Not a test of its own (ignored; skipped without the
/// variable).
#[test]
#[ignore = "run inside a simulated node by the tests of this file"]
fn node_helper() {
    let Ok(step) = std::env::var(HELPER_ENV) else {
        return;
    };
    let config = Config::load(Path::new(&std::env::var("VMHA_LM_CONFIG").unwrap())).unwrap();
    let module = config
        .modules
        .iter()
        .find(|m| m.name == MODULE)
        .unwrap()
        .clone();
    let mut guest = module.clone();
    guest.domain = GUEST.into();
    let say = |line: String| {
        println!("RESULT {line}");
        let _ = std::io::stdout().flush();
    };
    let forwarder = || {
        let key = ClusterKey::load(&config.cluster.key_file).unwrap();
        let peer = migrate::peer_channel_addr(&config, NodeIndex::FIRST.peer(), &module).unwrap();
        // The peer's vmhad may still be starting.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match Forwarder::start(&migrate::run_dir(&config), peer, &key, MODULE) {
                Ok(f) => return f,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("forwarder: {e}");
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => panic!("forwarder: {e}"),
            }
        }
    };
    let driver = LibvirtDriver::new();
    match step.as_str() {
        // Forward until stdin closes.
        "forward" => {
            let f = forwarder();
            say(format!("SOCKET {}", f.socket().display()));
            say(format!("URI {}", f.uri()));
            let _ = std::io::stdin().lines().count();
            drop(f);
            say("DONE".into());
        }
        "migrate" => {
            let shared = PathBuf::from(std::env::var("VMHA_LM_SHARED").unwrap());
            let f = forwarder();
            say(format!("SOCKET {}", f.socket().display()));
            // A module whose directories do not hold the disk: refused.
            guest.replicated = vec![shared.join("elsewhere")];
            match driver.migrate_live(&guest, f.socket()) {
                Ok(()) => say("REFUSED no".into()),
                Err(e) => say(format!("REFUSED {e}")),
            }
            guest.replicated = vec![shared.join("sub/..")];
            // A migration overdue (slowed to 1 MiB/s) is aborted: the call
            // fails, the domain runs on here.
            let virsh = |args: &[&str]| {
                let out = std::process::Command::new("virsh")
                    .args(["-c", "qemu:///system"])
                    .args(args)
                    .output()
                    .unwrap();
                assert!(out.status.success(), "virsh {args:?}: {out:?}");
            };
            virsh(&["migrate-setspeed", GUEST, "1"]);
            say("SLOW started".into());
            let hasty = LibvirtDriver::new().with_migrate_timeout(Duration::from_secs(6));
            match hasty.migrate_live(&guest, f.socket()) {
                Ok(()) => say("ABORTED no".into()),
                Err(e) => say(format!("ABORTED {e}")),
            }
            // Aborted from another thread, as vmhad's `AbortMigration` does
            // (again until the call returned: the job may not have started
            // at the first try): the call fails soon, the domain runs on here.
            let (done, finished) = std::sync::mpsc::channel::<()>();
            let aborter = std::thread::spawn({
                let guest = guest.clone();
                move || {
                    let driver = LibvirtDriver::new();
                    let mut results = Vec::new();
                    while finished.recv_timeout(Duration::from_secs(1))
                        == Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                    {
                        results.push(driver.abort_migration(&guest));
                    }
                    results
                }
            });
            let started = Instant::now();
            let result = driver.migrate_live(&guest, f.socket());
            let ms = started.elapsed().as_millis();
            let _ = done.send(());
            let aborts = aborter.join().unwrap();
            say(format!(
                "ABORTJOB {} after {ms} ms, {} aborts, all ok: {}",
                if result.is_ok() { "migrated" } else { "failed" },
                aborts.len(),
                aborts.iter().all(Result::is_ok)
            ));
            // Nothing to abort: fine.
            say(format!("NOJOB {:?}", driver.abort_migration(&guest)));
            virsh(&["migrate-setspeed", GUEST, "100000"]);
            drop(f);
            // As the daemon does it: forward for this call, migrate.
            let key = ClusterKey::load(&config.cluster.key_file).unwrap();
            let peer = NodeIndex::FIRST.peer();
            let started = Instant::now();
            match migrate::live_migrate(&driver, &config, &key, peer, &guest) {
                Ok(()) => say(format!("MIGRATED ok {} ms", started.elapsed().as_millis())),
                Err(e) => say(format!("MIGRATED {e}")),
            }
        }
        "paused" => say(format!("PAUSED {:?}", driver.paused(&guest))),
        "resume" => {
            say(format!("RESUME {:?}", driver.resume(&guest)));
            say(format!("PAUSED {:?}", driver.paused(&guest)));
        }
        other => panic!("unknown step {other}"),
    }
}

/// The helper running `step` inside node `i`, its stdout read line by line.
struct Helper {
    child: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Helper {
    fn spawn(vc: &VmCluster, i: usize, step: &str, env: &[(&str, &Path)]) -> Result<Helper> {
        let exe = std::env::current_exe()?;
        let mut cmd = vc.node(i).command(&exe);
        cmd.args(["--ignored", "--exact", "node_helper", "--nocapture"])
            .env(HELPER_ENV, step)
            .env("VMHA_LM_CONFIG", vc.config())
            .env("RUST_LOG", "info")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().context("starting the node helper")?;
        let lines = BufReader::new(child.stdout.take().context("helper stdout")?).lines();
        Ok(Helper { child, lines })
    }

    /// The next `RESULT <tag> …` line's rest.
    fn result(&mut self, tag: &str) -> Result<String> {
        for line in self.lines.by_ref() {
            let line = line?;
            if let Some(rest) = line.strip_prefix(&format!("RESULT {tag} ")) {
                return Ok(rest.to_string());
            }
            if let Some(rest) = line.strip_prefix("RESULT ") {
                bail!("expected RESULT {tag}, got {rest}");
            }
        }
        bail!("the helper ended before RESULT {tag}")
    }

    /// Closes stdin and waits for the helper.
    fn finish(mut self) -> Result<()> {
        drop(self.child.stdin.take());
        let status = self.child.wait()?;
        ensure!(status.success(), "node helper failed: {status}");
        Ok(())
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

fn cluster() -> Result<VmCluster> {
    let mut vc = VmCluster::with_modules(
        &Timing::default(),
        vec![ClusterModule::new(MODULE, 7301, 0, DomainKind::Idle)],
    )?;
    vc.start_vmhad(0)?;
    vc.start_vmhad(1)?;
    Ok(vc)
}

fn domstate(vc: &VmCluster, i: usize) -> String {
    vc.node(i)
        .virsh(&["domstate", "--reason", GUEST])
        .unwrap_or_else(|e| format!("{e:#}"))
        .trim()
        .to_string()
}

#[test]
fn live_migration_through_the_daemon_channel() -> Result<()> {
    if std::env::var(HELPER_ENV).is_ok() {
        return Ok(());
    }
    let _one = one_cluster_at_a_time();
    let vc = cluster()?;
    let shared = vc.cluster().dir().join("shared");
    std::fs::create_dir_all(&shared)?;

    // (a) node2's libvirt, seen from node1 through the forwarder.
    let marker = shared.join("only-on-node2.xml");
    std::fs::write(
        &marker,
        vmha_test_infra::cluster_vm::idle_domain_xml("only-on-node2"),
    )?;
    vc.node(1).virsh(&["define", marker.to_str().unwrap()])?;
    let mut fwd = Helper::spawn(&vc, 0, "forward", &[])?;
    let socket = PathBuf::from(fwd.result("SOCKET")?);
    let uri = fwd.result("URI")?;
    assert_eq!(
        uri,
        format!("qemu+unix:///system?socket={}", socket.display())
    );
    assert!(socket.starts_with("/run/vmha"), "{}", socket.display());
    let through = vc
        .node(0)
        .run("virsh", &["-c", &uri, "list", "--all", "--name"])?;
    assert!(through.contains("only-on-node2"), "{through}");
    let local = vc.node(0).virsh(&["list", "--all", "--name"])?;
    assert!(!local.contains("only-on-node2"), "{local}");
    let on_host = vc.node(0).host_path(&socket);
    assert!(on_host.exists());
    fwd.finish()?;
    assert!(
        !on_host.exists(),
        "the forwarded socket is removed after use"
    );
    assert!(!on_host.parent().unwrap().exists());

    // (b) A counter guest whose disk both nodes see at the same path,
    // defined on both nodes, running on node1.
    let disk = shared.join("mig.qcow2");
    create_disk(&disk, 64)?;
    let console = "/var/log/libvirt/mig-console.log";
    let xml = shared.join("mig.xml");
    std::fs::write(
        &xml,
        domain_xml(vc.image(), &DomainSpec::new(GUEST, &disk, console)),
    )?;
    // The same definition (UUID included) on both nodes, as vmhad defines
    // it from the replicated XML.
    vc.node(0).virsh(&["define", xml.to_str().unwrap()])?;
    let defined = vc
        .node(0)
        .virsh(&["dumpxml", "--inactive", "--security-info", GUEST])?;
    std::fs::write(&xml, defined)?;
    vc.node(1).virsh(&["define", xml.to_str().unwrap()])?;
    vc.node(0).virsh(&["start", GUEST])?;
    let console1 = host_side(vc.node(0), console)?;
    let console2 = host_side(vc.node(1), console)?;
    wait_console(
        &console1,
        Duration::from_secs(240),
        "3 counters on node1",
        |c| c.counters.len() >= 3,
    )?;

    let mut mig = Helper::spawn(&vc, 0, "migrate", &[("VMHA_LM_SHARED", &shared)])?;
    let socket = PathBuf::from(mig.result("SOCKET")?);
    let refused = mig.result("REFUSED")?;
    assert!(
        refused.contains("disk vda")
            && refused.contains("outside the module's replicated directories"),
        "{refused}"
    );
    assert!(
        domstate(&vc, 0).starts_with("running"),
        "{}",
        domstate(&vc, 0)
    );
    // While the slowed migration runs, node2 tells it is paused by it.
    mig.result("SLOW")?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        let mut p = Helper::spawn(&vc, 1, "paused", &[])?;
        let state = p.result("PAUSED")?;
        p.finish()?;
        if state == "Ok(Some(IncomingMigration))" {
            seen.push(state);
            break;
        }
        seen.push(state);
    }
    assert_eq!(
        seen.last().map(String::as_str),
        Some("Ok(Some(IncomingMigration))"),
        "{seen:?}"
    );
    let aborted = mig.result("ABORTED")?;
    assert_eq!(aborted, "live migration of mig timed out after 6 s");
    assert!(
        domstate(&vc, 0).starts_with("running"),
        "{}",
        domstate(&vc, 0)
    );
    // `VmDriver::abort_migration` (virDomainAbortJob) from another thread:
    // the 1 MiB/s migration (minutes) fails within seconds.
    let job = mig.result("ABORTJOB")?;
    eprintln!("abort_migration: {job}");
    assert!(job.starts_with("failed after "), "{job}");
    assert!(job.ends_with("all ok: true"), "{job}");
    let ms: u64 = job
        .split_whitespace()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .context("no duration")?;
    assert!(ms < 30_000, "{job}");
    assert_eq!(mig.result("NOJOB")?, "Ok(())");
    assert!(
        domstate(&vc, 0).starts_with("running"),
        "{}",
        domstate(&vc, 0)
    );
    assert!(
        !domstate(&vc, 1).starts_with("running"),
        "{}",
        domstate(&vc, 1)
    );
    let migrated = mig.result("MIGRATED")?;
    assert!(
        migrated.starts_with("ok"),
        "{migrated}\n{}",
        vc.diagnostics()
    );
    mig.finish()?;
    eprintln!("live migration: {migrated}");
    assert!(!vc.node(0).host_path(&socket).exists());
    let left: Vec<_> = std::fs::read_dir(vc.node(0).host_path("/run/vmha"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with("migrate-"))
        .collect();
    assert!(
        left.is_empty(),
        "forwarded sockets left after the migration: {left:?}"
    );
    // The source's QEMU is gone; the domain stays defined on both nodes.
    assert!(
        domstate(&vc, 0).starts_with("shut off"),
        "{}",
        domstate(&vc, 0)
    );
    assert!(vc.pids_of(0, "qemu-system-x86_64", GUEST)?.is_empty());
    assert!(
        domstate(&vc, 1).starts_with("paused"),
        "{}",
        domstate(&vc, 1)
    );
    let before = Console::read(&console1)?;
    let last = before.last_counter().unwrap();
    let mut paused = Helper::spawn(&vc, 1, "paused", &[])?;
    assert_eq!(
        paused.result("PAUSED")?,
        format!("{:?}", Ok::<_, ()>(Some(Paused::User)))
    );
    paused.finish()?;
    // Paused: not a counter on node2 yet.
    std::thread::sleep(Duration::from_secs(1));
    assert!(Console::read(&console2)?.counters.is_empty());

    let mut resume = Helper::spawn(&vc, 1, "resume", &[])?;
    assert_eq!(resume.result("RESUME")?, "Ok(())");
    assert_eq!(resume.result("PAUSED")?, "Ok(None)");
    resume.finish()?;
    let after = wait_console(
        &console2,
        Duration::from_secs(120),
        "counters on node2",
        |c| c.counters.len() >= 3,
    )?;
    // The same guest goes on: no boot on node2, the counter continues.
    assert!(after.boots.is_empty(), "the guest rebooted: {after:?}");
    assert!(
        after.counters[0] > last,
        "{} after {last}",
        after.counters[0]
    );
    assert!(
        after.counters[0] <= last + 2,
        "{} after {last}",
        after.counters[0]
    );
    after.check_monotonic()?;
    assert!(
        domstate(&vc, 1).starts_with("running"),
        "{}",
        domstate(&vc, 1)
    );
    Ok(())
}
