//! The split-brain witness (design, "Controller"): during a partition only the
//! node that reaches the witness goes ALONE; the other goes WAIT and stops its
//! VM, so the guest never runs on both sides.
//!
//! Setup: the witness is an ICMP witness on node2's side of the production
//! network (an extra address of node2's `prod0`), on hosts without `ping`: any
//! `ping` binary is hidden in both nodes (they are their own mount namespaces),
//! so the echo must come from vmhad's own socket (before, every probe
//! "failed" there and both nodes went WAIT). node1 reaches the witness over
//! the production network while that is up. The partition takes both of node1's links down: node1 (PRIM) loses
//! node2 and the witness and goes WAIT; node2 (SECOND) loses node1, reaches the
//! witness and goes ALONE. Then the links come back: node1 follows node2 as
//! SECOND after a resync and nothing node2's guest acknowledged is lost.
//!
//! Needs root, /dev/fuse, the packages of `.ci/install-deps` and the
//! workspace binaries (`cargo build --workspace --bins`).

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use vmha_test_infra::cluster_vm::{Timing, VmCluster, MODULE};
use vmha_test_infra::guest::{read_disk_counter, wait_console, Console};
use vmha_test_infra::node::Network;
use vmha_test_infra::scenario::{
    qemu_pids, runs_vm, start_pair, BOOT_TIMEOUT, STATE_TIMEOUT, SYNC_TIMEOUT,
};
use vmha_test_infra::vmctl_status::{diag, primary, ready, state, status};

/// The witness (ICMP echo): on node2's production interface.
const WITNESS_IP: &str = "10.200.1.254";

/// Makes node `i` a host without `ping`: every `ping`, `ping4` and `ping6`
/// on the PATH (or in the usual directories) is covered with `/dev/null` in
/// the node's own mount namespace (gone with the node). Checks that `ping`
/// cannot be executed there.
fn hide_ping(vc: &VmCluster, i: usize) -> Result<()> {
    let path = std::env::var("PATH").unwrap_or_default();
    let dirs = path
        .split(':')
        .chain(["/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"]);
    for dir in dirs.filter(|d| !d.is_empty()) {
        for name in ["ping", "ping4", "ping6"] {
            let file = std::path::Path::new(dir).join(name);
            // Bind over the file itself, not over a symlink to it.
            let real = match file.canonicalize() {
                Ok(real) => real,
                Err(_) => continue,
            };
            let real = real.to_string_lossy().into_owned();
            vc.node(i).run("mount", &["--bind", "/dev/null", &real])?;
        }
    }
    let out = vc
        .node(i)
        .command("ping")
        .args(["-c", "1", "-W", "1", "127.0.0.1"])
        .output()
        .context("running ping in the node")?;
    // nsenter exits 126/127 when it cannot execute the program.
    ensure!(
        matches!(out.status.code(), Some(126 | 127)),
        "ping still runs on node{}: {:?} {}",
        i + 1,
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The `witness` section of a status document: (last_probe, errors).
fn witness_probe(s: &serde_json::Value) -> (Option<&str>, Vec<String>) {
    let w = &s["witness"];
    let errors = w["errors"]
        .as_array()
        .map(|a| a.iter().map(|e| e.to_string()).collect())
        .unwrap_or_default();
    (w["last_probe"].as_str(), errors)
}

/// Brings node `i`'s links back up when dropped (the partition heals even
/// when the test fails half-way).
struct Partition<'a> {
    vc: &'a VmCluster,
    i: usize,
}

impl<'a> Partition<'a> {
    fn new(vc: &'a VmCluster, i: usize) -> Result<Self> {
        for net in Network::ALL {
            vc.node(i).set_link(net, false)?;
        }
        Ok(Self { vc, i })
    }

    fn heal(self) -> Result<()> {
        for net in Network::ALL {
            self.vc.node(self.i).set_link(net, true)?;
        }
        Ok(())
    }
}

impl Drop for Partition<'_> {
    fn drop(&mut self) {
        for net in Network::ALL {
            if let Err(e) = self.vc.node(self.i).set_link(net, true) {
                eprintln!("[witness] restoring the link: {e:#}");
            }
        }
    }
}

/// Samples which nodes run QEMU, recording how long both did.
#[derive(Default)]
struct Watch {
    samples: usize,
    both_since: Option<Instant>,
    both_longest: Duration,
    both_samples: usize,
}

impl Watch {
    fn sample(&mut self, vc: &VmCluster) -> Result<()> {
        let (q1, q2) = (qemu_pids(vc, 0)?, qemu_pids(vc, 1)?);
        self.samples += 1;
        if q1.is_empty() || q2.is_empty() {
            self.both_since = None;
        } else {
            self.both_samples += 1;
            let since = *self.both_since.get_or_insert_with(Instant::now);
            self.both_longest = self.both_longest.max(since.elapsed());
        }
        Ok(())
    }
}

fn witness_partition() -> Result<()> {
    let timing = Timing::default();
    let mut vc = VmCluster::new(&timing)?;
    let config = std::fs::read_to_string(vc.config())?;
    let config = config.replacen(
        "start_wait_ms",
        &format!("witness = [\"{WITNESS_IP}\"]\nstart_wait_ms"),
        1,
    );
    std::fs::write(vc.config(), config)?;
    vc.node(1).ip(&[
        "addr",
        "add",
        &format!("{WITNESS_IP}/{}", Network::PREFIX_LEN),
        "dev",
        Network::Production.ifname(),
    ])?;

    hide_ping(&vc, 0)?;
    hide_ping(&vc, 1)?;

    start_pair(&mut vc)?;
    // Probed once at start: both reach the witness, no error.
    for i in 0..2 {
        let s = status(&vc, i)?;
        ensure!(
            witness_probe(&s) == (Some("reachable"), vec![]),
            "node{}'s witness at start: {}",
            i + 1,
            s["witness"]
        );
    }
    let console1 = vc.console(0)?;
    let console2 = vc.console(1)?;
    ensure!(
        vc.node(0).ping(WITNESS_IP.parse()?)?,
        "node1 cannot reach the witness before the partition"
    );

    let mut watch = Watch::default();
    let t = Instant::now();
    let partition = Partition::new(&vc, 0)?;
    eprintln!("[witness] node1 cut off from node2 and the witness");
    // Until both have decided: node1 WAIT with its VM stopped, node2 ALONE.
    let deadline = Instant::now() + STATE_TIMEOUT;
    let (mut t_wait, mut t_alone) = (None, None);
    loop {
        watch.sample(&vc)?;
        if t_wait.is_none() {
            let s = status(&vc, 0)?;
            if state(&s, "node1") == Some("WAIT") && qemu_pids(&vc, 0)?.is_empty() {
                t_wait = Some(t.elapsed());
            }
        }
        if t_alone.is_none() {
            let s = status(&vc, 1)?;
            if state(&s, "node2") == Some("ALONE") && primary(&s) == Some("node2") {
                t_alone = Some(t.elapsed());
            }
        }
        if t_wait.is_some() && t_alone.is_some() {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no decision after {STATE_TIMEOUT:?} (node1 WAIT at {t_wait:?}, node2 ALONE at {t_alone:?})\n{}",
            vc.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("[witness] node1 WAIT, VM stopped after {t_wait:?}; node2 ALONE after {t_alone:?}");
    let acked1 = Console::read(&console1)?
        .last_counter()
        .context("no counter on node1")?;
    // node2's guest boots from node1's last acknowledged counter and counts;
    // node1 stays WAIT without its VM all along.
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let c2 = loop {
        watch.sample(&vc)?;
        let c2 = Console::read(&console2)?;
        if c2.counters.len() >= 5 {
            break c2;
        }
        ensure!(
            Instant::now() < deadline,
            "node2's guest does not count: {c2:?}\n{}",
            vc.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    ensure!(c2.boots.len() == 1, "node2 boots {:?}", c2.boots);
    let boot = c2.boots[0];
    eprintln!(
        "[witness] node2 counting {:?} into the partition, booted from {boot} (node1 acknowledged {acked1})",
        t.elapsed()
    );
    ensure!(
        boot >= acked1,
        "node1 acknowledged {acked1}, node2 booted from {boot}"
    );
    let hold = Instant::now();
    while hold.elapsed() < Duration::from_secs(10) {
        watch.sample(&vc)?;
        let s1 = status(&vc, 0)?;
        ensure!(
            state(&s1, "node1") == Some("WAIT") && primary(&s1).is_none(),
            "node1 during the partition: {s1}"
        );
        ensure!(!runs_vm(&vc, 0)?, "vm1 runs on node1 during the partition");
        let s2 = status(&vc, 1)?;
        ensure!(
            state(&s2, "node2") == Some("ALONE"),
            "node2 during the partition: {s2}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let domstate = vc.node(0).virsh(&["domstate", MODULE]);
    ensure!(
        domstate.as_deref().map_or(true, |d| d.trim() != "running"),
        "virsh domstate {MODULE} on node1: {domstate:?}"
    );
    // Nothing node1's guest printed is newer than what node2 booted from: no
    // write was acknowledged on node1 once node2 could take over.
    let c1 = Console::read(&console1)?;
    ensure!(
        c1.last_counter() == Some(acked1) && acked1 <= boot,
        "node1's guest went on to {:?} (node2 booted from {boot})",
        c1.last_counter()
    );
    let log1 = vc.vmctl(0, &["log"])?;
    ensure!(log1.contains("witness unreachable"), "node1's log:\n{log1}");
    let log2 = vc.vmctl(1, &["log"])?;
    ensure!(log2.contains("witness reachable"), "node2's log:\n{log2}");
    // Real answers, not probes that could not run.
    ensure!(
        !log1.contains("could not be probed") && !log2.contains("could not be probed"),
        "node1's log:\n{log1}\nnode2's log:\n{log2}"
    );
    let (s1, s2) = (status(&vc, 0)?, status(&vc, 1)?);
    ensure!(
        witness_probe(&s1) == (Some("unreachable"), vec![]),
        "node1's witness: {}",
        s1["witness"]
    );
    ensure!(
        witness_probe(&s2) == (Some("reachable"), vec![]),
        "node2's witness: {}",
        s2["witness"]
    );

    // Heal: node1 follows node2 as SECOND after a resync.
    partition.heal()?;
    let t_heal = Instant::now();
    let deadline = Instant::now() + SYNC_TIMEOUT;
    let s = loop {
        watch.sample(&vc)?;
        let s = status(&vc, 1)?;
        if state(&s, "node1") == Some("SECOND") && ready(&s, "node1") {
            break s;
        }
        ensure!(
            Instant::now() < deadline,
            "node1 not SECOND ready {SYNC_TIMEOUT:?} after the heal: {s}\n{}",
            vc.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!(
        "[witness] healed: node1 SECOND ready after {:?}; qemu on both nodes in {} of {} samples, at most {:?} in a row",
        t_heal.elapsed(),
        watch.both_samples,
        watch.samples,
        watch.both_longest
    );
    ensure!(
        primary(&s) == Some("node2") && state(&s, "node2") == Some("PRIM"),
        "after the heal: {s}"
    );
    let s1 = status(&vc, 0)?;
    ensure!(
        state(&s1, "node1") == Some("SECOND") && state(&s1, "node2") == Some("PRIM"),
        "node1's view after the heal: {s1}"
    );
    // node1 wrote nothing on its own: node2's data simply descends from its
    // own, an incremental resync, no split brain.
    let log1 = vc.vmctl(0, &["log"])?;
    ensure!(
        !log1.contains("split brain") && log1.contains("incremental resync started"),
        "node1's log after the heal:\n{log1}"
    );
    let before = Console::read(&console2)?.counters.len();
    let c2 = diag(
        &vc,
        wait_console(&console2, Duration::from_secs(60), "more counters", |c| {
            c.counters.len() >= before + 3
        }),
    )?;
    let acked2 = c2.last_counter().context("no counter on node2")?;
    let disk1 = vc.backing(0)?.join(format!("{MODULE}.qcow2"));
    let deadline = Instant::now() + Duration::from_secs(5);
    let on1 = loop {
        let got = read_disk_counter(&disk1)?;
        if got.is_some_and(|n| n >= acked2) || Instant::now() >= deadline {
            break got;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    ensure!(
        on1.is_some_and(|n| n >= acked2),
        "node1's copy holds {on1:?}, node2's guest acknowledged {acked2}"
    );
    c2.check_monotonic()?;
    ensure!(
        c2.boots.len() == 1,
        "node2's guest rebooted: {:?}",
        c2.boots
    );
    ensure!(
        c2.errors.is_empty(),
        "guest errors on node2: {:?}",
        c2.errors
    );
    ensure!(!runs_vm(&vc, 0)?, "vm1 runs on node1 as SECOND");
    Ok(())
}

#[test]
fn witness_on_node2s_side_keeps_node1_waiting_during_a_partition() {
    let _one = vmha_test_infra::node::one_cluster_at_a_time();
    if let Err(e) = witness_partition() {
        panic!("{e:#}");
    }
}
