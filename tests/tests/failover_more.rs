//! More end-to-end failover scenarios on two simulated nodes (the setup of
//! `failover.rs`): `vmctl stop` on the PRIM, guest killed behind the
//! controller's back (`maxloop`), production network cut, `vmha-fs` of the
//! PRIM killed, node frozen with SIGSTOP; vmhad killed or stopped on the PRIM
//! (invisible to the guest, adopted by the next vmhad) and a frozen writer.
//!
//! Needs root, /dev/fuse, the packages of `.ci/install-deps` and the
//! workspace binaries (`cargo build --workspace --bins`).

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use vmha_test_infra::cluster_vm::{Timing, VmCluster, MODULE};
use vmha_test_infra::guest::Console;
use vmha_test_infra::node::Network;
use vmha_test_infra::scenario::{
    boots_on, more_counters, qemu_pids, running_pair, runs_vm, STATE_TIMEOUT, SYNC_TIMEOUT,
};
use vmha_test_infra::vmctl_status::{entry, primary, ready, state, status, wait_status};

/// A writer state: the node runs the module.
fn writer(st: Option<&str>) -> bool {
    matches!(st, Some("PRIM" | "ALONE"))
}

// ---- 1. vmctl stop on the PRIM ----

fn stop_on_prim() -> Result<()> {
    let vc = running_pair(&Timing::default())?;
    more_counters(&vc, 0, 3, Duration::from_secs(60))?;
    let t = Instant::now();
    let out = vc.vmctl(0, &["stop"])?;
    eprintln!("[failover_more] vmctl stop on node1: {}", out.trim());
    let s = wait_status(&vc, 1, "node2 writer", STATE_TIMEOUT, |s| {
        writer(state(s, "node2")) && primary(s) == Some("node2")
    })?;
    eprintln!(
        "[failover_more] node2 {:?} after {:?}; node1 {:?}",
        state(&s, "node2"),
        t.elapsed(),
        state(&s, "node1")
    );
    ensure!(
        !writer(state(&s, "node1")),
        "node1 still {:?}",
        state(&s, "node1")
    );
    // node1 stopped its guest before node2 started: its console is final.
    let c1 = Console::read(&vc.console(0)?)?;
    let acked = c1.last_counter().context("no counter on node1")?;
    let c2 = boots_on(&vc, 1, 0, acked)?;
    eprintln!(
        "[failover_more] stop -> counting on node2 after {:?}: node1 acknowledged {acked}, node2 booted from {}",
        t.elapsed(),
        c2.boots[0]
    );
    ensure!(!runs_vm(&vc, 0)?, "vm1 still running on node1");
    ensure!(runs_vm(&vc, 1)?, "vm1 not running on node2");
    let c2 = more_counters(&vc, 1, 3, Duration::from_secs(60))?;
    c2.check_monotonic()?;
    Ok(())
}

#[test]
fn stop_on_prim_hands_vm1_over_to_second() {
    let _one = vmha_test_infra::node::one_cluster_at_a_time();
    if let Err(e) = stop_on_prim() {
        panic!("{e:#}");
    }
}

// ---- 2. guest destroyed behind the controller's back ----

fn destroyed_guest() -> Result<()> {
    let maxloop = 2;
    let timing = Timing {
        maxloop,
        ..Timing::default()
    };
    let vc = running_pair(&timing)?;
    let console1 = vc.console(0)?;
    // `maxloop` deaths are restarted in place on node1.
    for death in 1..=maxloop {
        let before = Console::read(&console1)?;
        let acked = before.last_counter().context("no counter on node1")?;
        let t = Instant::now();
        vc.node(0).virsh(&["destroy", MODULE])?;
        let c = boots_on(&vc, 0, before.boots.len(), acked)?;
        eprintln!(
            "[failover_more] death {death}: restarted on node1 after {:?} (acknowledged {acked}, booted from {})",
            t.elapsed(),
            c.boots[before.boots.len()]
        );
        let s = status(&vc, 0)?;
        ensure!(
            state(&s, "node1") == Some("PRIM") && primary(&s) == Some("node1"),
            "after death {death}: {s}"
        );
        ensure!(
            !runs_vm(&vc, 1)?,
            "vm1 running on node2 after death {death}"
        );
        // node2 stays attached: SECOND ready again.
        wait_status(&vc, 1, "node2 SECOND ready", SYNC_TIMEOUT, |s| {
            state(s, "node2") == Some("SECOND") && ready(s, "node2")
        })?;
    }
    // One more death: maxloop reached, the module fails over to node2.
    let before = Console::read(&console1)?;
    let t = Instant::now();
    vc.node(0).virsh(&["destroy", MODULE])?;
    wait_status(&vc, 1, "node2 writer", STATE_TIMEOUT, |s| {
        writer(state(s, "node2")) && primary(s) == Some("node2")
    })?;
    let acked = Console::read(&console1)?
        .last_counter()
        .context("no counter on node1")?;
    let c2 = boots_on(&vc, 1, 0, acked)?;
    eprintln!(
        "[failover_more] death {}: failover, counting on node2 after {:?} (acknowledged {acked}, booted from {})",
        maxloop + 1,
        t.elapsed(),
        c2.boots[0]
    );
    let c1 = Console::read(&console1)?;
    ensure!(
        c1.boots.len() == before.boots.len(),
        "node1 restarted its guest again: boots {:?}",
        c1.boots
    );
    ensure!(!runs_vm(&vc, 0)?, "vm1 running on node1");
    let s = status(&vc, 1)?;
    ensure!(
        !writer(state(&s, "node1")),
        "node1 {:?} after giving up",
        state(&s, "node1")
    );
    Ok(())
}

#[test]
fn destroyed_guest_restarts_in_place_then_fails_over_after_maxloop() {
    let _one = vmha_test_infra::node::one_cluster_at_a_time();
    if let Err(e) = destroyed_guest() {
        panic!("{e:#}");
    }
}

// ---- 3. production network cut ----

fn production_cut() -> Result<()> {
    let timing = Timing::default();
    let vc = running_pair(&timing)?;
    let console1 = vc.console(0)?;
    let before = Console::read(&console1)?;
    let hold = Duration::from_millis(timing.failover_timeout_ms * 3);
    {
        let _cut = vc.node(0).link_down(Network::Production)?;
        ensure!(
            !vc.node(0).ping(Network::Production.address(1))?,
            "production network still answers"
        );
        let deadline = Instant::now() + hold;
        let mut polls = 0;
        while Instant::now() < deadline {
            for i in 0..2 {
                let s = status(&vc, i)?;
                ensure!(
                    state(&s, "node1") == Some("PRIM")
                        && state(&s, "node2") == Some("SECOND")
                        && ready(&s, "node2")
                        && primary(&s) == Some("node1"),
                    "production cut: {} sees {s}\n{}",
                    vc.node(i).name(),
                    vc.diagnostics()
                );
            }
            polls += 1;
            std::thread::sleep(Duration::from_millis(200));
        }
        let during = Console::read(&console1)?;
        ensure!(
            during.counters.len() >= before.counters.len() + 3,
            "the guest's counter does not advance during the cut: {} -> {}",
            before.counters.len(),
            during.counters.len()
        );
        eprintln!(
            "[failover_more] production cut {hold:?}: {polls} polls, node1 PRIM, node2 SECOND ready, counters {} -> {}",
            before.last_counter().unwrap_or(0),
            during.last_counter().unwrap_or(0)
        );
        ensure!(!runs_vm(&vc, 1)?, "vm1 running on node2");
        // The cut is seen: node1 hears node2 only on the dedicated network.
        let s = status(&vc, 0)?;
        let hb = &entry(&s, "node2")["heartbeats"];
        let prod2 = Network::Production.address(1).to_string();
        ensure!(
            hb[prod2.as_str()]
                .as_u64()
                .is_none_or(|ms| ms > timing.failover_timeout_ms),
            "node1 still hears node2 on the production network: {hb}"
        );
        eprintln!("[failover_more] heartbeats seen by node1 during the cut: {hb}");
    }
    // Restored: node1 hears node2 on the production network again, nothing moved.
    let t = Instant::now();
    let prod2 = Network::Production.address(1).to_string();
    let s = wait_status(
        &vc,
        0,
        "heartbeats on the production network",
        STATE_TIMEOUT,
        |s| {
            entry(s, "node2")["heartbeats"][prod2.as_str()]
                .as_u64()
                .is_some_and(|ms| ms < timing.failover_timeout_ms / 2)
        },
    )?;
    ensure!(
        state(&s, "node1") == Some("PRIM") && state(&s, "node2") == Some("SECOND"),
        "after restore: {s}"
    );
    eprintln!(
        "[failover_more] production heartbeats back after {:?}: {}",
        t.elapsed(),
        entry(&s, "node2")["heartbeats"]
    );
    let c = more_counters(&vc, 0, 3, Duration::from_secs(60))?;
    c.check_monotonic()?;
    ensure!(c.boots.len() == 1, "node1 rebooted: {:?}", c.boots);
    Ok(())
}

#[test]
fn production_network_cut_does_not_fail_over() {
    let _one = vmha_test_infra::node::one_cluster_at_a_time();
    if let Err(e) = production_cut() {
        panic!("{e:#}");
    }
}

// ---- 4. vmha-fs of the PRIM killed ----

fn fs_killed() -> Result<()> {
    let vc = running_pair(&Timing::default())?;
    more_counters(&vc, 0, 3, Duration::from_secs(60))?;
    let pids = vc.pids_of(0, "vmha-fs", "primary")?;
    ensure!(
        pids.len() == 1,
        "vmha-fs primary on node1: {pids:?}\n{}",
        vc.diagnostics()
    );
    let acked_at_kill = Console::read(&vc.console(0)?)?
        .last_counter()
        .context("no counter on node1")?;
    let t = Instant::now();
    for &p in &pids {
        // SAFETY: kill(2) on a PID of node1 listed just above.
        unsafe {
            libc::kill(p as libc::pid_t, libc::SIGKILL);
        }
    }
    eprintln!("[failover_more] SIGKILLed vmha-fs primary {pids:?} on node1 (acknowledged {acked_at_kill})");
    wait_status(&vc, 1, "node2 writer", STATE_TIMEOUT, |s| {
        writer(state(s, "node2")) && primary(s) == Some("node2")
    })?;
    let to_writer = t.elapsed();
    let c2 = boots_on(&vc, 1, 0, acked_at_kill)?;
    // Whatever node1's guest printed after the kill was acknowledged too.
    let acked = Console::read(&vc.console(0)?)?
        .last_counter()
        .context("no counter on node1")?;
    ensure!(
        c2.boots[0] >= acked,
        "acknowledged counter lost: node1 printed {acked}, node2 booted from {}",
        c2.boots[0]
    );
    eprintln!(
        "[failover_more] kill -> node2 writer {to_writer:?}, -> counting on node2 {:?}; node1 acknowledged {acked}, node2 booted from {}",
        t.elapsed(),
        c2.boots[0]
    );
    ensure!(!runs_vm(&vc, 0)?, "vm1 still running on node1");
    let s = status(&vc, 1)?;
    ensure!(
        !writer(state(&s, "node1")),
        "node1 {:?} after its vmha-fs died",
        state(&s, "node1")
    );
    more_counters(&vc, 1, 3, Duration::from_secs(60))?.check_monotonic()?;
    // node1 recovers on its own: the dead FUSE mount its vmha-fs left over the
    // directory is detached, and node1 rejoins as SECOND with an incremental
    // resync (its copy is intact: only a process died), then is ready again.
    let t = Instant::now();
    let s = wait_status(&vc, 1, "node1 SECOND and ready", SYNC_TIMEOUT, |s| {
        state(s, "node1") == Some("SECOND") && ready(s, "node1")
    })?;
    ensure!(
        primary(&s) == Some("node2"),
        "primary {:?} after node1 rejoined",
        primary(&s)
    );
    let log1 = vc.vmctl(0, &["log"])?;
    ensure!(
        log1.contains("incremental resync started") && !log1.contains("full resync started"),
        "node1 did not rejoin by an incremental resync; its log:\n{log1}"
    );
    eprintln!(
        "[failover_more] node1 SECOND and ready again {:?} after node2 took over",
        t.elapsed()
    );
    more_counters(&vc, 1, 3, Duration::from_secs(60))?.check_monotonic()?;
    Ok(())
}

#[test]
fn vmha_fs_of_prim_killed_fails_over_and_the_node_rejoins_as_second() {
    let _one = vmha_test_infra::node::one_cluster_at_a_time();
    if let Err(e) = fs_killed() {
        panic!("{e:#}");
    }
}

// ---- 5. node frozen ----

/// SIGCONTs every process of node `i` when dropped (unless already thawed).
struct Frozen<'a> {
    vc: &'a VmCluster,
    i: usize,
    thawed: bool,
}

impl<'a> Frozen<'a> {
    fn new(vc: &'a VmCluster, i: usize) -> Result<(Self, usize)> {
        let stopped = vc.node(i).freeze()?;
        Ok((
            Self {
                vc,
                i,
                thawed: false,
            },
            stopped.len(),
        ))
    }

    fn thaw(&mut self) -> Result<()> {
        self.thawed = true;
        self.vc.node(self.i).thaw()
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        if !self.thawed {
            if let Err(e) = self.vc.node(self.i).thaw() {
                eprintln!("[failover_more] thawing: {e:#}");
            }
        }
    }
}

fn node_frozen() -> Result<()> {
    let timing = Timing::default();
    let vc = running_pair(&timing)?;
    more_counters(&vc, 0, 3, Duration::from_secs(60))?;
    let t = Instant::now();
    let (mut frozen, n) = Frozen::new(&vc, 0)?;
    let acked = Console::read(&vc.console(0)?)?
        .last_counter()
        .context("no counter on node1")?;
    eprintln!("[failover_more] node1 frozen ({n} processes), acknowledged {acked}");
    wait_status(&vc, 1, "node2 ALONE", STATE_TIMEOUT, |s| {
        state(s, "node2") == Some("ALONE")
    })?;
    let to_alone = t.elapsed();
    let c2 = boots_on(&vc, 1, 0, acked)?;
    eprintln!(
        "[failover_more] freeze -> node2 ALONE {to_alone:?}, -> counting on node2 {:?} (booted from {})",
        t.elapsed(),
        c2.boots[0]
    );
    more_counters(&vc, 1, 3, Duration::from_secs(60))?;
    ensure!(
        t.elapsed() > Duration::from_millis(timing.failover_timeout_ms),
        "thawing before the failover timeout"
    );
    let t = Instant::now();
    frozen.thaw()?;
    // node1 comes back, sees node2 writing, stops its VM and waits.
    let s = wait_status(&vc, 0, "node1 steps down", STATE_TIMEOUT, |s| {
        matches!(state(s, "node1"), Some("WAIT" | "SECOND"))
    })?;
    eprintln!(
        "[failover_more] thaw -> node1 {:?} after {:?}",
        state(&s, "node1"),
        t.elapsed()
    );
    let deadline = Instant::now() + STATE_TIMEOUT;
    while runs_vm(&vc, 0)? {
        if Instant::now() >= deadline {
            bail!(
                "vm1 still running on node1 after the thaw\n{}",
                vc.diagnostics()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "[failover_more] thaw -> vm1 gone from node1 after {:?}",
        t.elapsed()
    );
    // node1 must not have taken its own stall for the peer's death (it then
    // went ALONE with a new generation and won over node2's newer data).
    let log1 = vc.vmctl(0, &["log"])?;
    ensure!(
        !log1.contains("lost the peer"),
        "node1 declared node2 lost after the thaw:\n{log1}\n{}",
        vc.diagnostics()
    );
    for line in vc.diagnostics().lines() {
        if line.contains("stalled") || line.contains("peer lost") {
            eprintln!("[failover_more] vmhad: {line}");
        }
    }
    // No split brain: everything node1's guest acknowledged (including what
    // its console flushed only after the thaw) is in what node2 booted from.
    let c1 = Console::read(&vc.console(0)?)?;
    eprintln!(
        "[failover_more] node1's console after the thaw: last counter {:?}, errors {:?}",
        c1.last_counter(),
        c1.errors
    );
    ensure!(
        c1.last_counter().is_some_and(|n| n <= c2.boots[0]),
        "node1's guest acknowledged {:?} after the thaw (node2 booted from {}): split brain",
        c1.last_counter(),
        c2.boots[0]
    );
    // node2 hears of it with node1's next heartbeat; from then on node2 keeps
    // running vm1 and node1 never becomes a writer again.
    wait_status(&vc, 1, "node2 sees node1 step down", STATE_TIMEOUT, |s| {
        !writer(state(s, "node1"))
    })?;
    let c2_before = Console::read(&vc.console(1)?)?;
    let settle = Instant::now() + Duration::from_millis(timing.failover_timeout_ms * 2);
    while Instant::now() < settle {
        for i in 0..2 {
            let s = status(&vc, i)?;
            ensure!(
                !writer(state(&s, "node1")) && writer(state(&s, "node2")),
                "after the thaw, {} sees {s}\n{}",
                vc.node(i).name(),
                vc.diagnostics()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    ensure!(runs_vm(&vc, 1)?, "vm1 not running on node2");
    let c2 = more_counters(&vc, 1, 3, Duration::from_secs(60))?;
    c2.check_monotonic()?;
    ensure!(
        c2.boots == c2_before.boots && c2.boots.len() == 1,
        "node2's guest rebooted: {:?}",
        c2.boots
    );
    ensure!(
        c2.errors.is_empty(),
        "guest errors on node2: {:?}",
        c2.errors
    );
    Ok(())
}

#[test]
fn frozen_node1_fails_over_and_steps_down_when_thawed() {
    let _one = vmha_test_infra::node::one_cluster_at_a_time();
    if let Err(e) = node_frozen() {
        panic!("{e:#}");
    }
}

// ---- 6. vmhad restarts are invisible to the VMs (issue 10, item 1) ----

/// The module's generation on `node` in a status document.
fn generation(s: &serde_json::Value, node: &str) -> Option<String> {
    entry(s, node)["generation"].as_str().map(str::to_string)
}

/// node1's vmhad is gone (killed or stopped) for longer than the failover
/// timeout: the guest keeps writing on node1 through the same QEMU, node2 stays
/// a ready SECOND and shows node1's controller down with its data path alive.
fn controller_gone_changes_nothing(
    vc: &VmCluster,
    timing: &Timing,
    qemu: &[u32],
    how: &str,
) -> Result<()> {
    std::thread::sleep(Duration::from_millis(timing.failover_timeout_ms * 3));
    more_counters(vc, 0, 3, Duration::from_secs(60)).context(how.to_string())?;
    let s = status(vc, 1)?;
    ensure!(
        state(&s, "node2") == Some("SECOND") && ready(&s, "node2"),
        "{how}: node2 is {:?} (ready {}), not a ready SECOND",
        state(&s, "node2"),
        ready(&s, "node2")
    );
    let n1 = entry(&s, "node1");
    ensure!(
        n1["reachable"] == false
            && n1["state"].is_null()
            && n1["last_known_state"] == "PRIM"
            && n1["controller"] == "down"
            && n1["data_path"] == "alive",
        "{how}: node2 shows node1 as {n1}"
    );
    ensure!(!runs_vm(vc, 1)?, "{how}: node2 runs the guest too");
    let now = qemu_pids(vc, 0)?;
    ensure!(
        now == qemu,
        "{how}: node1's QEMU changed: {qemu:?} -> {now:?}"
    );
    let log = vc.vmctl(1, &["log"])?;
    ensure!(
        log.contains("the peer's controller is down (heartbeats silent), its data path is alive"),
        "{how}: node2's log does not say so:\n{log}"
    );
    Ok(())
}

/// vmhad on node1 starts again: it adopts the writer, PRIM again with the same
/// generation and the same QEMU, node2 still a ready SECOND (no resync).
fn restarted_adopts(vc: &mut VmCluster, qemu: &[u32], gen: &str, how: &str) -> Result<()> {
    vc.start_vmhad(0)?;
    let s = wait_status(vc, 0, "node1 PRIM again", STATE_TIMEOUT, |s| {
        state(s, "node1") == Some("PRIM") && state(s, "node2") == Some("SECOND")
    })?;
    ensure!(
        generation(&s, "node1").as_deref() == Some(gen),
        "{how}: node1's generation changed: {gen} -> {:?}",
        generation(&s, "node1")
    );
    ensure!(
        ready(&s, "node2") && generation(&s, "node2").as_deref() == Some(gen),
        "{how}: node2 is not a ready SECOND at {gen} (no resync expected): {}",
        entry(&s, "node2")
    );
    let now = qemu_pids(vc, 0)?;
    ensure!(
        now == qemu,
        "{how}: node1's QEMU changed: {qemu:?} -> {now:?}"
    );
    let log = vc.vmctl(0, &["log"])?;
    ensure!(
        log.contains("adopted the running writer and VM a previous vmhad started"),
        "{how}: node1's log:\n{log}"
    );
    ensure!(
        !log.contains("resync started"),
        "{how}: a resync on node1:\n{log}"
    );
    more_counters(vc, 0, 2, Duration::from_secs(60))?;
    let s2 = status(vc, 1)?;
    ensure!(
        entry(&s2, "node1")["controller"] == "up",
        "{how}: node2 does not hear node1's controller again: {}",
        entry(&s2, "node1")
    );
    Ok(())
}

fn vmhad_restarts() -> Result<()> {
    let timing = Timing::default();
    let mut vc = running_pair(&timing)?;
    more_counters(&vc, 0, 2, Duration::from_secs(60))?;
    let qemu = qemu_pids(&vc, 0)?;
    ensure!(!qemu.is_empty(), "no QEMU on node1");
    let gen = generation(&status(&vc, 0)?, "node1").context("node1 has no generation")?;

    // A crash of vmhad alone, then a stop (SIGTERM): each time nothing moves.
    for (signal, how) in [(libc::SIGKILL, "SIGKILL"), (libc::SIGTERM, "SIGTERM")] {
        vc.signal_vmhad(0, signal)?;
        controller_gone_changes_nothing(&vc, &timing, &qemu, how)?;
        restarted_adopts(&mut vc, &qemu, &gen, how)?;
        eprintln!("[failover_more] vmhad {how} on the PRIM: invisible to the guest");
    }

    // vmhad on the SECOND killed: node1 stays PRIM replicating to it (no new
    // generation), and the new vmhad adopts the receiver (SECOND, ready).
    vc.signal_vmhad(1, libc::SIGKILL)?;
    std::thread::sleep(Duration::from_millis(timing.failover_timeout_ms * 3));
    more_counters(&vc, 0, 2, Duration::from_secs(60))?;
    let s = status(&vc, 0)?;
    ensure!(
        state(&s, "node1") == Some("PRIM")
            && generation(&s, "node1").as_deref() == Some(gen.as_str())
            && entry(&s, "node2")["controller"] == "down"
            && entry(&s, "node2")["data_path"] == "alive",
        "vmhad killed on the SECOND: node1 shows {s}"
    );
    vc.start_vmhad(1)?;
    let s = wait_status(&vc, 1, "node2 SECOND again", STATE_TIMEOUT, |s| {
        state(s, "node2") == Some("SECOND") && state(s, "node1") == Some("PRIM")
    })?;
    ensure!(
        ready(&s, "node2") && generation(&s, "node2").as_deref() == Some(gen.as_str()),
        "node2 adopted its receiver but is not a ready SECOND at {gen}: {}",
        entry(&s, "node2")
    );
    let log = vc.vmctl(1, &["log"])?;
    ensure!(
        log.contains("adopted the running receiver a previous vmhad started (up to date)"),
        "node2's log:\n{log}"
    );
    more_counters(&vc, 0, 2, Duration::from_secs(60))?;

    // A frozen writer (its vmhad and vmha-fs stopped; QEMU runs on) is still
    // failed over: no heartbeats and no pings.
    let mut frozen = Vec::new();
    for program in ["vmhad", "vmha-fs"] {
        for arg in ["--node", "primary"] {
            frozen.extend(vc.pids_of(0, program, arg)?);
        }
    }
    frozen.sort_unstable();
    frozen.dedup();
    let thaw = ThawPids(frozen.clone());
    let acked = Console::read(&vc.console(0)?)?
        .last_counter()
        .context("no counter on node1")?;
    for p in &frozen {
        signal_pid(*p, libc::SIGSTOP);
    }
    let t = Instant::now();
    wait_status(&vc, 1, "node2 ALONE", STATE_TIMEOUT, |s| {
        state(s, "node2") == Some("ALONE")
    })?;
    eprintln!(
        "[failover_more] frozen writer ({} processes) failed over after {:?}",
        frozen.len(),
        t.elapsed()
    );
    boots_on(&vc, 1, 0, acked)?;
    drop(thaw);
    // Thawed, node1 learns it lost (fenced, or sees the newer writer).
    wait_status(&vc, 1, "node1 no longer a writer", STATE_TIMEOUT, |s| {
        state(s, "node1").is_some() && !writer(state(s, "node1")) && writer(state(s, "node2"))
    })?;
    Ok(())
}

/// SIGCONT to the PIDs on drop.
struct ThawPids(Vec<u32>);

impl Drop for ThawPids {
    fn drop(&mut self) {
        for p in &self.0 {
            signal_pid(*p, libc::SIGCONT);
        }
    }
}

fn signal_pid(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: plain syscall on a PID of this test's node, listed just before.
        unsafe { libc::kill(pid, sig) };
    }
}

#[test]
fn vmhad_killed_or_stopped_on_the_prim_is_invisible_and_a_frozen_writer_still_fails_over() {
    let _g = vmha_test_infra::node::one_cluster_at_a_time();
    if let Err(e) = vmhad_restarts() {
        panic!("{e:#}");
    }
}
