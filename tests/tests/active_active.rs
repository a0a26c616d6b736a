//! End to end (issue 12, item 1): active/active. vm1 runs on node1 and vm2
//! on node2 at the same time, each with `default_primary` on its own node and
//! its own replication port. node1 crashes: vm1 boots on node2 from its
//! replicated disk without losing an acknowledged counter, while vm2 — already
//! on node2 — keeps the same QEMU process and boots no more (it only goes
//! ALONE, writing degraded). node1 returns: it resyncs both modules, vm1
//! swaps back to node1 by `default_primary`, vm2 stays on node2 untouched.
//!
//! One cluster start for the whole story (TCG guests are slow). Needs root,
//! /dev/fuse, the packages of `.ci/install-deps` and the workspace binaries
//! (`cargo build --workspace --bins`).

use anyhow::{ensure, Context, Result};
use vmha_test_infra::cluster_vm::{ClusterModule, DomainKind, Timing, VmCluster};
use vmha_test_infra::guest::{wait_console, Console};
use vmha_test_infra::scenario::{boots_on, BOOT_TIMEOUT, STATE_TIMEOUT, SYNC_TIMEOUT};
use vmha_test_infra::vmctl_status::{
    diag, module_primary, module_ready, module_state, wait_status,
};

fn modules() -> Vec<ClusterModule> {
    let mut vm1 = ClusterModule::new("vm1", 7101, 0, DomainKind::Counter);
    vm1.default_primary = Some(0);
    let mut vm2 = ClusterModule::new("vm2", 7103, 1, DomainKind::Counter);
    vm2.default_primary = Some(1);
    vec![vm1, vm2]
}

/// Waits until module `name` has `n` more counters on node `i`'s console.
fn counting(vc: &VmCluster, i: usize, name: &str, n: usize) -> Result<Console> {
    let path = vc.console_of(i, name)?;
    let before = Console::read(&path).map(|c| c.counters.len()).unwrap_or(0);
    diag(
        vc,
        wait_console(
            &path,
            BOOT_TIMEOUT,
            &format!("{n} more {name} counters on node{}", i + 1),
            |c| c.counters.len() >= before + n,
        ),
    )
}

/// Both modules running where they belong, each SECOND ready on the other
/// node, in the view of node `i`.
fn home(vc: &VmCluster, i: usize, what: &str) -> Result<()> {
    wait_status(vc, i, what, SYNC_TIMEOUT, |s| {
        module_state(s, "vm1", "node1") == Some("PRIM")
            && module_primary(s, "vm1") == Some("node1")
            && module_state(s, "vm1", "node2") == Some("SECOND")
            && module_ready(s, "vm1", "node2")
            && module_state(s, "vm2", "node2") == Some("PRIM")
            && module_primary(s, "vm2") == Some("node2")
            && module_state(s, "vm2", "node1") == Some("SECOND")
            && module_ready(s, "vm2", "node1")
    })?;
    Ok(())
}

fn active_active() -> Result<()> {
    let mut vc = VmCluster::with_modules(&Timing::default(), modules())?;
    vc.start_vmhad(0)?;
    vc.start_vmhad(1)?;
    vc.vmctl(0, &["prim", "vm1", "--yes"])?;
    vc.vmctl(1, &["prim", "vm2", "--yes"])?;
    counting(&vc, 0, "vm1", 3)?;
    counting(&vc, 1, "vm2", 3)?;
    home(&vc, 0, "vm1 on node1, vm2 on node2, both replicated")?;
    home(&vc, 1, "the same in node2's view")?;
    for (i, other) in [(0, "vm2"), (1, "vm1")] {
        ensure!(
            vc.qemu_pid_of(i, other)?.is_none(),
            "node{} runs {other} too",
            i + 1
        );
    }
    let vm2_qemu = vc.qemu_pid_of(1, "vm2")?.context("vm2's qemu on node2")?;
    let vm2_boots = Console::read(&vc.console_of(1, "vm2")?)?.boots.len();
    let vm2_log = vc.vmctl(1, &["log", "vm2"])?;
    counting(&vc, 0, "vm1", 3)?;

    // node1 dies: vm1 moves to node2, vm2 stays as it is there.
    let killed = vc.crash(0)?;
    let acked = Console::read(&vc.console_of(0, "vm1")?)?
        .last_counter()
        .context("no vm1 counter on node1")?;
    eprintln!("[active-active] node1 crashed ({killed} processes), vm1 acknowledged {acked}");
    let s = wait_status(&vc, 1, "vm1 and vm2 ALONE on node2", STATE_TIMEOUT, |s| {
        module_state(s, "vm1", "node2") == Some("ALONE")
            && module_state(s, "vm2", "node2") == Some("ALONE")
    })?;
    ensure!(module_primary(&s, "vm2") == Some("node2"), "{s}");
    // `boots_on` follows vm1's console: booted from at least `acked`.
    let vm1_on_2 = boots_on(&vc, 1, 0, acked)?;
    ensure!(
        vm1_on_2.boots.len() == 1,
        "vm1 boots on node2: {:?}",
        vm1_on_2.boots
    );
    ensure!(
        vc.qemu_pid_of(1, "vm2")? == Some(vm2_qemu),
        "vm2's qemu {vm2_qemu} on node2 was replaced by {:?}",
        vc.qemu_pid_of(1, "vm2")?
    );
    let vm2_console = counting(&vc, 1, "vm2", 3)?;
    ensure!(
        vm2_console.boots.len() == vm2_boots,
        "vm2 rebooted on node2: boots {:?}",
        vm2_console.boots
    );
    vm2_console.check_monotonic()?;
    let vm2_log_after = vc.vmctl(1, &["log", "vm2"])?;
    let new_lines = vm2_log_after
        .strip_prefix(vm2_log.as_str())
        .context("vm2's event log was rewritten")?;
    eprintln!("[active-active] vm2's new events on node2:\n{new_lines}");
    ensure!(
        !new_lines.contains("VM started") && !new_lines.contains("VM stop"),
        "vm2's VM was restarted on node2:\n{new_lines}"
    );

    // node1 returns: resync of both, vm1 back to node1 by default_primary,
    // vm2 stays on node2 with the same QEMU.
    let vm1_boots_1 = Console::read(&vc.console_of(0, "vm1")?)?;
    vc.reboot(0)?;
    vc.start_vmhad(0)?;
    home(&vc, 1, "vm1 swapped back to node1, vm2 still on node2")?;
    let last_on_2 = Console::read(&vc.console_of(1, "vm1")?)?
        .last_counter()
        .context("no vm1 counter on node2")?;
    boots_on(&vc, 0, vm1_boots_1.boots.len(), last_on_2)?;
    home(&vc, 0, "the same in node1's view")?;
    ensure!(
        vc.qemu_pid_of(1, "vm1")?.is_none(),
        "vm1 still runs on node2"
    );
    ensure!(
        vc.qemu_pid_of(1, "vm2")? == Some(vm2_qemu),
        "vm2's qemu {vm2_qemu} on node2 was replaced after node1's return"
    );
    let vm2_console = counting(&vc, 1, "vm2", 3)?;
    ensure!(
        vm2_console.boots.len() == vm2_boots,
        "vm2 rebooted: {:?}",
        vm2_console.boots
    );
    Ok(())
}

#[test]
fn active_active_node_loss_moves_only_its_modules_and_swaps_back() {
    let _one = vmha_test_infra::node::one_cluster_at_a_time();
    if let Err(e) = active_active() {
        panic!("{e:#}");
    }
}
