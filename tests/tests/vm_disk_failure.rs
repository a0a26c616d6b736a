//! End-to-end with VMs: the writer's own disk fails (issue "fault hardening",
//! item 1; the fs-level cases are in `disk_failure.rs`).
//!
//! node1's replicated directory lives on an XFS of its own on a loop device,
//! mounted inside node1's mount namespace; vm1 runs on node1 with its guest
//! counting, node2 is a ready SECOND. `xfs_io -x -c shutdown` on that XFS makes
//! every later write and fsync on node1's copy fail with EIO, as a dying disk
//! does. What the user relies on: node2 runs the VM (ALONE) with every
//! acknowledged counter; node2's copy is never overwritten from node1 (node1
//! never writes again and never marks node2 outdated: no `peer-outdated` on
//! node1); node1 waits (WAIT, not up to date) and `status` shows its disk failed,
//! on both nodes.
//!
//! Needs root, /dev/fuse, XFS tools, the packages of `.ci/install-deps` and the
//! workspace binaries (`cargo build --workspace --bins`).

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use vmha_test_infra::cluster_vm::{host_side, Timing, VmCluster, MODULE, REPLICATED, STATE_DIR};
use vmha_test_infra::guest::Console;
use vmha_test_infra::scenario::{boots_on, more_counters, runs_vm, start_pair, STATE_TIMEOUT};
use vmha_test_infra::vmctl_status::{entry, primary, state, status, wait_status};
use vmha_test_infra::LoopFs;

/// The vmha-fs state directory of node `i` for vm1's only directory.
fn fs_state(vc: &VmCluster, i: usize) -> Result<std::path::PathBuf> {
    Ok(host_side(vc.node(i), STATE_DIR)?.join(MODULE).join("fs0"))
}

fn disk_fails() -> Result<()> {
    // Declared first, dropped last: the nodes (and node1's mount of it) go first.
    let disk1 = LoopFs::new("disk-failure-node1", 512 << 20)?;
    let mut vc = VmCluster::new(&Timing::default())?;
    // The guest's disk and XML move onto the XFS, mounted over node1's directory.
    let dir1 = vc.backing(0)?;
    for name in [format!("{MODULE}.qcow2"), format!("{MODULE}.xml")] {
        std::fs::copy(dir1.join(&name), disk1.path().join(&name))
            .with_context(|| format!("copying {name} onto the XFS"))?;
    }
    vc.node(0).run("mount", &[disk1.device(), REPLICATED])?;
    start_pair(&mut vc)?;
    more_counters(&vc, 0, 3, Duration::from_secs(60))?;
    let s = status(&vc, 1)?;
    ensure!(
        entry(&s, "node1")["disk"] == "ok" && entry(&s, "node2")["disk"] == "ok",
        "disks before the failure: {s}"
    );
    let generation1 = entry(&s, "node1")["generation"].clone();

    let t = Instant::now();
    disk1.shutdown()?;
    eprintln!("[disk_failure] node1's XFS shut down");
    wait_status(&vc, 1, "node2 ALONE, running vm1", STATE_TIMEOUT, |s| {
        state(s, "node2") == Some("ALONE") && primary(s) == Some("node2")
    })?;
    let to_writer = t.elapsed();
    // Whatever node1's guest printed was acknowledged: node2 boots from it.
    let acked = Console::read(&vc.console(0)?)?
        .last_counter()
        .context("no counter on node1")?;
    let c2 = boots_on(&vc, 1, 0, acked)?;
    eprintln!(
        "[disk_failure] shutdown -> node2 ALONE {to_writer:?}, -> counting on node2 {:?}; \
         node1 acknowledged {acked}, node2 booted from {}",
        t.elapsed(),
        c2.boots[0]
    );
    ensure!(!runs_vm(&vc, 0)?, "vm1 still running on node1");

    // node1: WAIT, not up to date, its disk failed — in both nodes' views.
    let s1 = wait_status(
        &vc,
        0,
        "node1 WAIT with its disk failed",
        STATE_TIMEOUT,
        |s| state(s, "node1") == Some("WAIT") && entry(s, "node1")["disk"] == "failed",
    )?;
    ensure!(
        entry(&s1, "node1")["readiness"] == "not_uptodate",
        "node1: {s1}"
    );
    ensure!(
        entry(&s1, "node1")["generation"] == generation1,
        "node1 started a generation on its failed disk: {s1}"
    );
    let s2 = wait_status(
        &vc,
        1,
        "node1's disk failed in node2's view",
        STATE_TIMEOUT,
        |s| entry(s, "node1")["disk"] == "failed",
    )?;
    ensure!(entry(&s2, "node2")["disk"] == "ok", "node2: {s2}");

    // node1 blamed itself, never its peer.
    let state1 = fs_state(&vc, 0)?;
    ensure!(
        !state1.join("peer-outdated").exists(),
        "node1 marked node2 outdated for its own disk failure"
    );
    ensure!(
        state1.join("self-outdated").exists(),
        "node1 did not record itself as outdated in {}",
        state1.display()
    );

    // node2 keeps writing; node1 never writes again, so node2's copy is never
    // overwritten from it: node1 stays WAIT, never a writer, never attached.
    let c2 = more_counters(&vc, 1, 5, Duration::from_secs(60))?;
    c2.check_monotonic()?;
    let s = status(&vc, 0)?;
    ensure!(
        state(&s, "node1") == Some("WAIT") && primary(&s) == Some("node2"),
        "after node2 counted on: {s}"
    );
    let log1 = vc.vmctl(0, &["log"])?;
    let after = log1
        .split_once("local disk failed")
        .map(|(_, rest)| rest)
        .context(format!("no disk failure in node1's log:\n{log1}"))?;
    for never in [
        "new generation",
        "writes alone",
        "-> ALONE",
        "-> PRIM",
        "-> SECOND",
    ] {
        ensure!(
            !after.contains(never),
            "node1 after its disk failed: `{never}`\n{log1}"
        );
    }
    let log2 = vc.vmctl(1, &["log"])?;
    let took_over = log2
        .rsplit_once("SECOND -> ALONE")
        .map(|(_, rest)| rest)
        .context(format!("no takeover in node2's log:\n{log2}"))?;
    ensure!(
        !took_over.contains("attaching the SECOND"),
        "node2 attached node1 after the failure:\n{log2}"
    );
    Ok(())
}

#[test]
fn writer_disk_failure_fails_over_and_the_node_waits_with_disk_failed() {
    let _one = vmha_test_infra::node::one_cluster_at_a_time();
    if let Err(e) = disk_fails() {
        panic!("{e:#}");
    }
}
