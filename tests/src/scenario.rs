//! Building blocks of the end-to-end scenarios on a [`VmCluster`]: the usual start
//! (vm1 PRIM on node1 with its guest counting, node2 SECOND ready), and the checks
//! the scenarios share.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};

use crate::cluster_vm::{Timing, VmCluster, MODULE};
use crate::guest::{wait_console, Console};
use crate::vmctl_status::{diag, primary, ready, state, wait_status};

/// A TCG guest's boot to its first counters, on a loaded machine.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// A state change the controller makes on its own (seconds, normally).
pub const STATE_TIMEOUT: Duration = Duration::from_secs(60);
/// The initial copy of the guest's disk and the SECOND becoming ready.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(120);

/// A fresh cluster with vm1 PRIM on node1 (guest counting on a fresh disk) and
/// node2 SECOND and ready.
pub fn running_pair(timing: &Timing) -> Result<VmCluster> {
    let mut vc = VmCluster::new(timing)?;
    start_pair(&mut vc)?;
    Ok(vc)
}

/// On a prepared cluster: both daemons started, `vmctl prim --yes` on node1, until
/// vm1 runs there (guest counting on a fresh disk) and node2 is SECOND and ready.
pub fn start_pair(vc: &mut VmCluster) -> Result<()> {
    let t = Instant::now();
    vc.start_vmhad(0)?;
    vc.start_vmhad(1)?;
    vc.vmctl(0, &["prim", "--yes"])?;
    wait_status(vc, 0, "node1 PRIM", STATE_TIMEOUT, |s| {
        state(s, "node1") == Some("PRIM") && primary(s) == Some("node1")
    })?;
    let c = diag(
        vc,
        wait_console(&vc.console(0)?, BOOT_TIMEOUT, "counters on node1", |c| {
            c.counters.len() >= 3
        }),
    )?;
    ensure!(
        c.boots == vec![0],
        "node1 boots {:?} on a fresh disk",
        c.boots
    );
    let s = wait_status(vc, 1, "node2 SECOND ready", SYNC_TIMEOUT, |s| {
        state(s, "node2") == Some("SECOND") && ready(s, "node2")
    })?;
    ensure!(
        state(&s, "node1") == Some("PRIM"),
        "node2 sees node1 as {:?}",
        state(&s, "node1")
    );
    eprintln!(
        "[scenario] vm1 PRIM on node1, node2 SECOND ready after {:?}",
        t.elapsed()
    );
    Ok(())
}

/// Whether node `i`'s libvirt runs the module's domain.
pub fn runs_vm(vc: &VmCluster, i: usize) -> Result<bool> {
    let list = vc.node(i).virsh(&["list", "--name"])?;
    Ok(list.lines().any(|l| l.trim() == MODULE))
}

/// Host PIDs of node `i`'s QEMU processes.
pub fn qemu_pids(vc: &VmCluster, i: usize) -> Result<Vec<u32>> {
    Ok(vc
        .node(i)
        .pids()?
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| c.trim().starts_with("qemu-system"))
        })
        .collect())
}

/// Waits until node `i`'s console holds `n` more counters than it has now.
pub fn more_counters(vc: &VmCluster, i: usize, n: usize, timeout: Duration) -> Result<Console> {
    let console = vc.console(i)?;
    let before = Console::read(&console)?.counters.len();
    diag(
        vc,
        wait_console(
            &console,
            timeout,
            &format!("{n} more counters on {}", vc.node(i).name()),
            |c| c.counters.len() >= before + n,
        ),
    )
}

/// Waits until the guest boots (once more than `boots_before`) on node `to`
/// and counts there; checks it resumed from at least `acked` (the last counter
/// acknowledged elsewhere) and that `to`'s counters never go back.
pub fn boots_on(vc: &VmCluster, to: usize, boots_before: usize, acked: u64) -> Result<Console> {
    let name = vc.node(to).name().to_string();
    let c = diag(
        vc,
        wait_console(
            &vc.console(to)?,
            BOOT_TIMEOUT,
            &format!("a new boot and counter on {name}"),
            |c| c.boots.len() > boots_before && c.first_after_boot(boots_before).is_some(),
        ),
    )?;
    let boot = c.boots[boots_before];
    ensure!(
        boot >= acked,
        "acknowledged counter lost: {acked} was acknowledged, {name} booted from {boot}"
    );
    let resumed = c.first_after_boot(boots_before);
    ensure!(
        resumed == Some(boot + 1),
        "{name} resumed at {resumed:?} after booting from {boot}"
    );
    c.check_monotonic()?;
    ensure!(
        c.errors.is_empty(),
        "guest errors on {name}: {:?}",
        c.errors
    );
    Ok(c)
}
