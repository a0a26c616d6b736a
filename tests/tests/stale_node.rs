//! A node whose data is older than its peer's does not start as PRIM alone: it
//! waits (WAIT, not up to date, red) however long; `vmctl prim --yes` forces
//! it, and the guest then runs from that node's older disk.
//!
//! Scenario: vm1 PRIM on node1, node2 SECOND ready; node2 crashes, node1 goes
//! ALONE and the guest keeps counting (node1's data is now newer); node1
//! crashes too; node2 reboots alone.
//!
//! Needs root, /dev/fuse, the packages of `.ci/install-deps` and the
//! workspace binaries (`cargo build --workspace --bins`).

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use vmha_test_infra::cluster_vm::{Timing, VmCluster, MODULE};
use vmha_test_infra::guest::{wait_console, Console};
use vmha_test_infra::scenario::{
    more_counters, qemu_pids, runs_vm, BOOT_TIMEOUT, STATE_TIMEOUT, SYNC_TIMEOUT,
};
use vmha_test_infra::vmctl_status::{diag, entry, primary, ready, state, status, wait_status};

fn stale_node_waits() -> Result<()> {
    let timing = Timing::default();
    let mut vc = VmCluster::new(&timing)?;
    vc.start_vmhad(0)?;
    vc.start_vmhad(1)?;
    vc.vmctl(0, &["prim", "--yes"])?;
    wait_status(&vc, 0, "node1 PRIM", STATE_TIMEOUT, |s| {
        state(s, "node1") == Some("PRIM") && primary(s) == Some("node1")
    })?;
    diag(
        &vc,
        wait_console(&vc.console(0)?, BOOT_TIMEOUT, "counters on node1", |c| {
            c.counters.len() >= 3
        }),
    )?;
    wait_status(&vc, 1, "node2 SECOND ready", SYNC_TIMEOUT, |s| {
        state(s, "node2") == Some("SECOND") && ready(s, "node2")
    })?;
    more_counters(&vc, 0, 2, Duration::from_secs(60))?;

    // node2 crashes: node1 goes on alone, its data becomes the newer copy.
    let replicated = Console::read(&vc.console(0)?)?
        .last_counter()
        .context("no counter on node1")?;
    let killed = vc.crash(1)?;
    eprintln!("[stale_node] node2 crashed ({killed} processes); node1 acknowledged {replicated}");
    wait_status(&vc, 0, "node1 ALONE", STATE_TIMEOUT, |s| {
        state(s, "node1") == Some("ALONE") && primary(s) == Some("node1")
    })?;
    let c1 = more_counters(&vc, 0, 5, Duration::from_secs(60))?;
    c1.check_monotonic()?;
    ensure!(c1.boots.len() == 1, "node1 rebooted: {:?}", c1.boots);

    // node1 crashes too; node2 comes back alone with the older copy.
    vc.crash(0)?;
    let newest = Console::read(&vc.console(0)?)?
        .last_counter()
        .context("no counter on node1")?;
    eprintln!("[stale_node] node1 crashed; its guest reached {newest}");
    vc.reboot(1)?;
    vc.start_vmhad(1)?;
    let t = Instant::now();
    let hold = Duration::from_millis((timing.start_wait_ms * 4).max(8000));
    let mut polls = 0;
    while t.elapsed() < hold {
        let s = status(&vc, 1)?;
        let me = entry(&s, "node2");
        ensure!(
            state(&s, "node2") == Some("WAIT")
                && me["readiness"].as_str() == Some("not_uptodate")
                && me["colour"].as_str() == Some("red")
                && primary(&s).is_none(),
            "node2 with older data, alone for {:?}: {s}\n{}",
            t.elapsed(),
            vc.diagnostics()
        );
        ensure!(!runs_vm(&vc, 1)?, "vm1 runs on node2 without `prim`");
        let qemu = qemu_pids(&vc, 1)?;
        ensure!(qemu.is_empty(), "qemu runs on node2: {qemu:?}");
        polls += 1;
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!(
        "[stale_node] node2 stayed WAIT (not up to date, red) for {:?} ({polls} polls, start_wait {} ms)",
        t.elapsed(),
        timing.start_wait_ms
    );
    let domstate = vc.node(1).virsh(&["domstate", MODULE]);
    ensure!(
        domstate.as_deref().map_or(true, |d| d.trim() != "running"),
        "virsh domstate {MODULE} on node2: {domstate:?}"
    );

    // Without --yes and without a terminal, `prim` refuses and changes nothing.
    let refused = vc.vmctl(1, &["prim"]);
    ensure!(
        refused.is_err(),
        "`vmctl prim` without --yes on a non-tty succeeded: {refused:?}"
    );
    eprintln!(
        "[stale_node] `vmctl prim` without --yes: {:#}",
        refused.err().map(|e| format!("{e:#}")).unwrap_or_default()
    );
    std::thread::sleep(Duration::from_millis(timing.heartbeat_interval_ms * 3));
    let s = status(&vc, 1)?;
    ensure!(
        state(&s, "node2") == Some("WAIT") && !runs_vm(&vc, 1)?,
        "after a refused `prim`: {s}"
    );

    // The operator forces node2: it runs vm1 from its own (older) disk.
    let t = Instant::now();
    let out = vc.vmctl(1, &["prim", "--yes"])?;
    eprintln!("[stale_node] vmctl prim --yes on node2: {}", out.trim());
    wait_status(&vc, 1, "node2 ALONE", STATE_TIMEOUT, |s| {
        state(s, "node2") == Some("ALONE") && primary(s) == Some("node2")
    })?;
    let c2 = diag(
        &vc,
        wait_console(&vc.console(1)?, BOOT_TIMEOUT, "counters on node2", |c| {
            !c.boots.is_empty() && c.counters.len() >= 3
        }),
    )?;
    let boot = c2.boots[0];
    eprintln!(
        "[stale_node] forced -> counting on node2 after {:?}: booted from {boot} (node2's copy had {replicated}, node1 reached {newest})",
        t.elapsed()
    );
    ensure!(
        boot >= replicated,
        "node2 booted from {boot}, but {replicated} was replicated to it"
    );
    ensure!(
        boot < newest,
        "node2 booted from {boot}: not its older copy (node1 reached {newest})"
    );
    ensure!(
        c2.counters[0] == boot + 1,
        "node2 resumed at {} after booting from {boot}",
        c2.counters[0]
    );
    c2.check_monotonic()?;
    ensure!(c2.errors.is_empty(), "guest errors: {:?}", c2.errors);
    ensure!(runs_vm(&vc, 1)?, "vm1 not running on node2");
    let s = status(&vc, 1)?;
    ensure!(
        state(&s, "node2") == Some("ALONE") && ready(&s, "node2"),
        "node2 after forcing: {s}"
    );
    Ok(())
}

#[test]
fn node_with_older_data_waits_until_prim_forces_it() {
    let _one = vmha_test_infra::node::one_cluster_at_a_time();
    if let Err(e) = stale_node_waits() {
        panic!("{e:#}");
    }
}
