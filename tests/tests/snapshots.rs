//! End to end (issue 12, item 5): a module with two replicated directories —
//! the VM's (`vm1`, port 7101) and a snapshot directory (`vm1-snap`, port
//! 7102) — and libvirt snapshots that survive a failover.
//!
//! On node1 the running guest gets an external disk-only snapshot `ext1`
//! whose overlay lives in the snapshot directory (from then on the guest
//! writes there), then an internal full-system snapshot `int1` (qcow2 holds
//! it, in the overlay). node1 crashes. On node2 the guest boots from the
//! overlay without losing an acknowledged counter (both directories
//! replicated, the domain XML follows the new disk), `virsh snapshot-list`
//! shows both snapshots, int1 the current one (vmhad redefined them from
//! `vm1/vm1.snapshots/*.xml`), and reverting to `int1` takes the guest back
//! to its counter at the snapshot.
//!
//! One cluster start for all of it (TCG guests are slow). Needs root,
//! /dev/fuse, the packages of `.ci/install-deps` and the workspace binaries
//! (`cargo build --workspace --bins`).

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use vmha_test_infra::cluster_vm::{host_side, ClusterModule, DomainKind, Timing, VmCluster};
use vmha_test_infra::guest::{wait_console, Console};
use vmha_test_infra::scenario::{boots_on, start_pair, BOOT_TIMEOUT, STATE_TIMEOUT};
use vmha_test_infra::vmctl_status::{diag, state, wait_status};

const VM_DIR: &str = "/var/lib/libvirt/images/vm1";
const SNAP_DIR: &str = "/var/lib/libvirt/images/vm1-snap";
const OVERLAY: &str = "/var/lib/libvirt/images/vm1-snap/vm1.ext1.qcow2";

fn module() -> ClusterModule {
    let mut m = ClusterModule::new("vm1", 7101, 0, DomainKind::Counter);
    m.extra_dirs = vec![SNAP_DIR.to_string()];
    m
}

/// Waits until `cond` holds on node `i`'s own copies (its backing files, i.e.
/// what it received as SECOND).
fn wait_copy(
    vc: &VmCluster,
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() >= deadline {
            bail!(
                "node2's copy: no {what} after {timeout:?}\n{}",
                vc.diagnostics()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// Waits for `n` more counters on node `i`'s console.
fn more(vc: &VmCluster, i: usize, n: usize) -> Result<Console> {
    let path = vc.console(i)?;
    let before = Console::read(&path)?.counters.len();
    diag(
        vc,
        wait_console(&path, BOOT_TIMEOUT, &format!("{n} more counters"), |c| {
            c.counters.len() >= before + n
        }),
    )
}

fn snapshots_survive_failover() -> Result<()> {
    let mut vc = VmCluster::with_modules(&Timing::default(), vec![module()])?;
    start_pair(&mut vc)?;
    let n1 = vc.node(0);
    let console1 = vc.console(0)?;

    // External disk-only snapshot: the overlay goes to the snapshot directory.
    let out = n1.virsh(&[
        "snapshot-create-as",
        "vm1",
        "ext1",
        "--disk-only",
        "--diskspec",
        &format!("vda,snapshot=external,file={OVERLAY}"),
    ])?;
    eprintln!("[snapshots] {}", out.trim());
    more(&vc, 0, 3)?;
    // Internal full-system snapshot (in the overlay, a qcow2 in the snapshot
    // directory).
    let before = Console::read(&console1)?
        .last_counter()
        .context("no counter")?;
    let out = n1.virsh(&["snapshot-create-as", "vm1", "int1"])?;
    let after = Console::read(&console1)?
        .last_counter()
        .context("no counter")?;
    eprintln!("[snapshots] {} (counters {before}..={after})", out.trim());
    let list = n1.virsh(&["snapshot-list", "vm1", "--name"])?;
    ensure!(
        list.lines().any(|l| l.trim() == "int1") && list.lines().any(|l| l.trim() == "ext1"),
        "node1's snapshots: {list}"
    );

    // What node2 receives: the snapshots' XML beside the domain XML, the
    // domain XML naming the overlay, the overlay in the snapshot directory.
    let n2 = vc.node(1);
    let snaps = host_side(n2, &format!("{VM_DIR}/vm1.snapshots"))?;
    let domain_xml = host_side(n2, &format!("{VM_DIR}/vm1.xml"))?;
    let overlay = host_side(n2, OVERLAY)?;
    wait_copy(
        &vc,
        "vm1.snapshots/{ext1,int1}.xml, current = int1, vm1.xml on the overlay",
        Duration::from_secs(30),
        || {
            snaps.join("ext1.xml").is_file()
                && snaps.join("int1.xml").is_file()
                // Written last in vmhad's export (every 2 s): a pass during
                // the snapshot's creation may see int1 listed while ext1 is
                // still current.
                && std::fs::read_to_string(snaps.join("current")).is_ok_and(|c| c == "int1")
                && overlay.is_file()
                && std::fs::read_to_string(&domain_xml).is_ok_and(|x| x.contains(OVERLAY))
        },
    )?;
    let int1 = std::fs::read_to_string(snaps.join("int1.xml"))?;
    ensure!(
        int1.contains("<name>int1</name>") && int1.contains("<name>ext1</name>"),
        "int1.xml (child of ext1): {int1}"
    );

    // node1 dies.
    more(&vc, 0, 3)?;
    vc.crash(0)?;
    let acked = Console::read(&console1)?
        .last_counter()
        .context("no counter on node1")?;
    eprintln!("[snapshots] node1 crashed, last acknowledged counter {acked}");
    wait_status(&vc, 1, "node2 ALONE", STATE_TIMEOUT, |s| {
        state(s, "node2") == Some("ALONE")
    })?;
    // The guest boots from the overlay replicated in the snapshot directory.
    let c2 = boots_on(&vc, 1, 0, acked)?;
    let disk = vc.node(1).virsh(&["domblklist", "vm1"])?;
    ensure!(disk.contains(OVERLAY), "vm1's disk on node2: {disk}");
    let list = vc.node(1).virsh(&["snapshot-list", "vm1", "--name"])?;
    ensure!(
        list.lines().any(|l| l.trim() == "int1") && list.lines().any(|l| l.trim() == "ext1"),
        "node2's snapshots after the failover: {list}"
    );
    let parent = vc.node(1).virsh(&["snapshot-parent", "vm1", "int1"])?;
    ensure!(parent.trim() == "ext1", "int1's parent on node2: {parent}");
    let current = vc.node(1).virsh(&["snapshot-current", "vm1", "--name"])?;
    ensure!(
        current.trim() == "int1",
        "current snapshot on node2: {current}"
    );

    // Revert to int1 on node2: the guest is back at its counter of then.
    let c2 = more(&vc, 1, 2).unwrap_or(c2);
    let seen = c2.counters.len();
    let latest = c2.last_counter().context("no counter on node2")?;
    ensure!(latest > after + 1, "node2 at {latest}, int1 at {after}");
    let out = vc.node(1).virsh(&["snapshot-revert", "vm1", "int1"])?;
    eprintln!("[snapshots] revert on node2: {}", out.trim());
    let c = diag(
        &vc,
        wait_console(
            &vc.console(1)?,
            BOOT_TIMEOUT,
            "3 counters after the revert",
            |c| c.counters.len() >= seen + 3,
        ),
    )?;
    // The guest resumes at the counter it held when int1 was taken (printed
    // between `before` and `after`), or one more; one more again if the
    // revert cut a console line, which then does not parse.
    let resumed = c.counters[seen];
    ensure!(
        (before..=after + 2).contains(&resumed) && resumed < latest,
        "after the revert to int1 (taken at counters {before}..={after}) the guest counts from \
         {resumed} (it was at {latest})"
    );
    ensure!(
        c.counters[seen..].windows(2).all(|w| w[1] == w[0] + 1),
        "counters after the revert: {:?}",
        &c.counters[seen..]
    );
    let s = wait_status(&vc, 1, "node2 still ALONE", STATE_TIMEOUT, |s| {
        state(s, "node2") == Some("ALONE")
    })?;
    eprintln!("[snapshots] after the revert: {s}");
    let domstate = vc.node(1).virsh(&["domstate", "vm1"])?;
    ensure!(domstate.trim() == "running", "vm1 on node2: {domstate}");
    Ok(())
}

#[test]
fn snapshots_replicate_and_are_redefined_on_failover() {
    let _one = vmha_test_infra::node::one_cluster_at_a_time();
    if let Err(e) = snapshots_survive_failover() {
        panic!("{e:#}");
    }
}
