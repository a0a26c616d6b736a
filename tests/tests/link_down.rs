//! The replication link fails while heartbeats still arrive (design,
//! "Degraded mode"): node2's `vmha-fs secondary` is killed under a running
//! guest. node1's controller marks node2 outdated over the heartbeats and its
//! vmha-fs goes on writing alone: the guest never sees an I/O error and keeps
//! counting, node1 stays PRIM, node2 is not promoted; node2's receiver is
//! restarted, node1 re-attaches it with a full copy, node2 is SECOND ready
//! again and holds the guest's latest counter.
//!
//! Needs root, /dev/fuse, the packages of `.ci/install-deps` and the
//! workspace binaries (`cargo build --workspace --bins`).

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use vmha_test_infra::cluster_vm::{Timing, VmCluster, MODULE};
use vmha_test_infra::guest::{read_disk_counter, Console};
use vmha_test_infra::scenario::{runs_vm, start_pair, SYNC_TIMEOUT};
use vmha_test_infra::vmctl_status::{primary, ready, state, status, wait_status};

fn writer(st: Option<&str>) -> bool {
    matches!(st, Some("PRIM" | "ALONE"))
}

fn receiver_killed() -> Result<()> {
    let timing = Timing::default();
    let mut vc = VmCluster::new(&timing)?;
    start_pair(&mut vc)?;
    let console = vc.console(0)?;

    let pids = vc.pids_of(1, "vmha-fs", "secondary")?;
    ensure!(
        pids.len() == 1,
        "vmha-fs secondary on node2: {pids:?}\n{}",
        vc.diagnostics()
    );
    let before = Console::read(&console)?;
    let t = Instant::now();
    for &p in &pids {
        // SAFETY: kill(2) on the PID of node2's receiver listed just above.
        unsafe {
            libc::kill(p as libc::pid_t, libc::SIGKILL);
        }
    }
    eprintln!(
        "[link_down] killed node2's receiver {pids:?}; node1's guest at {:?}",
        before.last_counter()
    );
    // Three lock timeouts: without the controller, writes would fail after one.
    let hold = Duration::from_millis(timing.lock_timeout_ms * 3);
    let mut polls = 0;
    while t.elapsed() < hold {
        for i in 0..2 {
            let s = status(&vc, i)?;
            ensure!(
                state(&s, "node1") == Some("PRIM") && !writer(state(&s, "node2")),
                "{:?} after the kill, {} sees {s}\n{}",
                t.elapsed(),
                vc.node(i).name(),
                vc.diagnostics()
            );
        }
        ensure!(!runs_vm(&vc, 1)?, "vm1 runs on node2");
        polls += 1;
        std::thread::sleep(Duration::from_millis(250));
    }
    let during = Console::read(&console)?;
    eprintln!(
        "[link_down] {hold:?} after the kill ({polls} polls): node1 PRIM, counters {:?} -> {:?}",
        before.last_counter(),
        during.last_counter()
    );
    ensure!(
        during.counters.len() >= before.counters.len() + 3,
        "the guest stopped counting: {} -> {} counters\n{}",
        before.counters.len(),
        during.counters.len(),
        vc.diagnostics()
    );
    ensure!(
        during.errors.is_empty(),
        "guest I/O errors: {:?}",
        during.errors
    );
    let log1 = vc.vmctl(0, &["log"])?;
    ensure!(
        log1.contains("replication link down") && log1.contains("knows it is outdated"),
        "node1's log:\n{log1}"
    );

    let s = wait_status(&vc, 0, "node2 SECOND ready again", SYNC_TIMEOUT, |s| {
        state(s, "node2") == Some("SECOND") && ready(s, "node2")
    })?;
    eprintln!(
        "[link_down] node2 SECOND ready again {:?} after the kill",
        t.elapsed()
    );
    ensure!(primary(&s) == Some("node1"), "{s}");
    // Synchronous again: what the guest acknowledged is on node2's disk.
    let acked = Console::read(&console)?
        .last_counter()
        .context("no counter on node1")?;
    let disk = vc.backing(1)?.join(format!("{MODULE}.qcow2"));
    let on_node2 = read_disk_counter(&disk)?.context("no counter on node2's disk")?;
    eprintln!("[link_down] guest acknowledged {acked}, node2's disk holds {on_node2}");
    ensure!(
        on_node2 >= acked,
        "node2's disk holds {on_node2}, the guest acknowledged {acked}"
    );
    let c = Console::read(&console)?;
    c.check_monotonic()?;
    ensure!(c.boots.len() == 1, "the guest rebooted: {:?}", c.boots);
    ensure!(c.errors.is_empty(), "guest errors: {:?}", c.errors);
    Ok(())
}

#[test]
fn receiver_killed_under_a_running_guest_degrades_then_resyncs() {
    let _one = vmha_test_infra::node::one_cluster_at_a_time();
    if let Err(e) = receiver_killed() {
        panic!("{e:#}");
    }
}
