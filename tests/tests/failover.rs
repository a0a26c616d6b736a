//! End to end: `vmhad` on two simulated nodes (DESIGN.md, "Testing on one
//! machine") running the counter guest as module `vm1`, its disk replicated
//! by `vmha-fs`; start, node crash with failover, swap.
//!
//! Needs root, /dev/fuse, the packages of `.ci/install-deps` and the
//! workspace binaries (`cargo build --workspace --bins`). Guests run as
//! `type='qemu'` (TCG). Set `VMHA_DEMO=1` to print `vmctl status` at each
//! step (the demo runs the node-failure test that way).

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use vmha_test_infra::cluster_vm::{Timing, VmCluster, MODULE};
use vmha_test_infra::guest::{read_disk_counter, wait_console, Console};
use vmha_test_infra::scenario::{running_pair, BOOT_TIMEOUT, STATE_TIMEOUT, SYNC_TIMEOUT};
use vmha_test_infra::vmctl_status::{diag, entry, primary, ready, state, status, wait_status};

fn demo() -> bool {
    std::env::var_os("VMHA_DEMO").is_some()
}

/// Prints `vmctl status` of node `i` when running as the demo.
fn show(vc: &VmCluster, i: usize, when: &str) {
    if demo() {
        let text = vc
            .vmctl(i, &["status"])
            .unwrap_or_else(|e| format!("(vmctl status failed: {e:#})"));
        eprintln!(
            "\n### {when}: vmctl status on {}\n{text}",
            vc.node(i).name()
        );
    }
}

/// Waits until node `i`'s own copy of the disk (its backing directory, i.e.
/// what a SECOND received) holds at least counter `acked`.
fn wait_copy_has(vc: &VmCluster, i: usize, acked: u64, timeout: Duration) -> Result<u64> {
    let disk = vc.backing(i)?.join(format!("{MODULE}.qcow2"));
    let deadline = Instant::now() + timeout;
    loop {
        let got = read_disk_counter(&disk);
        if let Ok(Some(n)) = got {
            if n >= acked {
                return Ok(n);
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "{}'s copy of the disk ({}) holds {got:?} after {timeout:?}, \
                 but the guest acknowledged counter {acked}: the writes are not replicated\n{}",
                vc.node(i).name(),
                disk.display(),
                vc.diagnostics()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn cluster_start() -> Result<()> {
    let vc = running_pair(&Timing::default())?;
    // The guest keeps counting on node1 once node2 is attached.
    let console1 = vc.console(0)?;
    let before = Console::read(&console1)?.counters.len();
    let c = diag(
        &vc,
        wait_console(&console1, Duration::from_secs(60), "more counters", |c| {
            c.counters.len() >= before + 5
        }),
    )?;
    c.check_monotonic()?;
    ensure!(c.errors.is_empty(), "guest errors: {:?}", c.errors);
    // The SECOND's own disk receives what the guest acknowledges.
    let acked = c.last_counter().context("no counter")?;
    let copy = wait_copy_has(&vc, 1, acked, Duration::from_secs(5))?;
    eprintln!("[failover] node2's copy holds {copy} (node1 acknowledged {acked})");
    let s1 = status(&vc, 0)?;
    ensure!(primary(&s1) == Some("node1"), "primary {:?}", primary(&s1));
    ensure!(
        state(&s1, "node2") == Some("SECOND"),
        "node1 sees node2 as {:?}",
        state(&s1, "node2")
    );
    let domstate = vc.node(0).virsh(&["domstate", MODULE])?;
    ensure!(
        domstate.trim() == "running",
        "vm1 on node1: {}",
        domstate.trim()
    );
    // node2 does not run the domain.
    let list = vc.node(1).virsh(&["list", "--name"])?;
    ensure!(
        !list.lines().any(|l| l.trim() == MODULE),
        "vm1 running on node2 too"
    );
    Ok(())
}

#[test]
fn start_prim_on_node1_second_ready_on_node2() {
    let _one = vmha_test_infra::node::one_cluster_at_a_time();
    if let Err(e) = cluster_start() {
        panic!("{e:#}");
    }
}

fn node_failure() -> Result<()> {
    let mut vc = running_pair(&Timing::default())?;
    let console1 = vc.console(0)?;
    let console2 = vc.console(1)?;
    // A few counters replicated while node2 is SECOND.
    let before = Console::read(&console1)?.counters.len();
    diag(
        &vc,
        wait_console(&console1, Duration::from_secs(60), "counters", |c| {
            c.counters.len() >= before + 5
        }),
    )?;

    let t_kill = Instant::now();
    let killed = vc.crash(0)?;
    let c1 = Console::read(&console1)?;
    let acked = c1.last_counter().context("no counter on node1")?;
    eprintln!("[failover] node1 crashed ({killed} processes SIGKILLed), last acknowledged counter {acked}");

    let s = wait_status(&vc, 1, "node2 ALONE", STATE_TIMEOUT, |s| {
        state(s, "node2") == Some("ALONE")
    })?;
    let to_alone = t_kill.elapsed();
    ensure!(
        entry(&s, "node1")["reachable"] == Value::Bool(false),
        "node1 still reachable: {s}"
    );
    let c2 = diag(
        &vc,
        wait_console(&console2, BOOT_TIMEOUT, "a counter on node2", |c| {
            !c.counters.is_empty()
        }),
    )?;
    let to_counter = t_kill.elapsed();
    eprintln!(
        "[failover] kill -> node2 ALONE: {to_alone:?}; kill -> first counter on node2: {to_counter:?}"
    );
    show(&vc, 1, "after node1's crash");
    ensure!(c2.boots.len() == 1, "node2 boots {:?}", c2.boots);
    let boot = c2.boots[0];
    eprintln!(
        "[failover] node2's guest read {boot} from the disk (node1 acknowledged {acked}), first counter {}",
        c2.counters[0]
    );
    ensure!(
        boot >= acked,
        "acknowledged counter lost: node1 printed {acked}, node2 booted from {boot}"
    );
    ensure!(c2.counters[0] == boot + 1, "resumed at {}", c2.counters[0]);
    let s = wait_status(&vc, 1, "primary node2", STATE_TIMEOUT, |s| {
        primary(s) == Some("node2")
    })?;
    ensure!(
        state(&s, "node2") == Some("ALONE"),
        "node2 {:?}",
        state(&s, "node2")
    );
    let c2 = diag(
        &vc,
        wait_console(
            &console2,
            Duration::from_secs(60),
            "counters on node2",
            |c| c.counters.len() >= 5,
        ),
    )?;
    c2.check_monotonic()?;
    ensure!(
        c2.errors.is_empty(),
        "guest errors on node2: {:?}",
        c2.errors
    );
    if demo() {
        eprintln!(
            "\n### counters: node1 acknowledged up to {acked}; node2 booted from {boot} and counts {:?}",
            c2.counters
        );
        eprintln!("### timings: kill -> ALONE {to_alone:?}, kill -> first counter on node2 {to_counter:?}");
        vmha_test_infra::console_demo::console_until_enter(&vc, 1)?;
    }
    Ok(())
}

#[test]
fn node1_crash_fails_over_to_node2_without_losing_counters() {
    let _one = vmha_test_infra::node::one_cluster_at_a_time();
    if let Err(e) = node_failure() {
        panic!("{e:#}");
    }
}

/// `vmctl swap` on node `from`; waits until node `to` is PRIM with the guest
/// counting there past what it had before, and `from` is SECOND.
fn swap(vc: &VmCluster, from: usize, to: usize) -> Result<()> {
    let (nf, nt) = (
        vc.node(from).name().to_string(),
        vc.node(to).name().to_string(),
    );
    let cf = Console::read(&vc.console(from)?)?;
    let ct = Console::read(&vc.console(to)?)?;
    let t = Instant::now();
    let out = vc.vmctl(from, &["swap"])?;
    eprintln!("[failover] vmctl swap on {nf}: {}", out.trim());
    wait_status(vc, to, &format!("{nt} PRIM"), STATE_TIMEOUT, |s| {
        state(s, &nt) == Some("PRIM") && primary(s) == Some(nt.as_str())
    })?;
    let boots = ct.boots.len();
    let c = diag(
        vc,
        wait_console(
            &vc.console(to)?,
            BOOT_TIMEOUT,
            &format!("counters on {nt}"),
            |c| c.boots.len() > boots && c.first_after_boot(boots).is_some(),
        ),
    )?;
    eprintln!(
        "[failover] swap {nf} -> {nt}: counting after {:?}",
        t.elapsed()
    );
    // Counters never go back: the stopped side's console after its stop.
    let cf_after = Console::read(&vc.console(from)?)?;
    let last_from = cf_after
        .last_counter()
        .or(cf.last_counter())
        .context("no counter before the swap")?;
    let boot = c.boots[boots];
    ensure!(
        boot >= last_from,
        "swap {nf} -> {nt}: {nf} acknowledged {last_from}, {nt} booted from {boot}"
    );
    let resumed = c.first_after_boot(boots);
    ensure!(resumed == Some(boot + 1), "resumed at {resumed:?}");
    c.check_monotonic()?;
    // The new SECOND's disk receives what the guest acknowledges on the new PRIM.
    let c = diag(
        vc,
        wait_console(
            &vc.console(to)?,
            Duration::from_secs(60),
            &format!("more counters on {nt}"),
            |c| c.counters.len() >= ct.counters.len() + 5,
        ),
    )?;
    let acked = c.last_counter().context("no counter")?;
    let copy = wait_copy_has(vc, from, acked, Duration::from_secs(5))?;
    eprintln!("[failover] {nf}'s copy holds {copy} ({nt} acknowledged {acked})");
    let list = vc.node(from).virsh(&["list", "--name"])?;
    ensure!(
        !list.lines().any(|l| l.trim() == MODULE),
        "vm1 still running on {nf}"
    );
    wait_status(vc, to, &format!("{nf} SECOND ready"), SYNC_TIMEOUT, |s| {
        state(s, &nf) == Some("SECOND") && ready(s, &nf)
    })?;
    Ok(())
}

fn swap_there_and_back() -> Result<()> {
    let vc = running_pair(&Timing::default())?;
    swap(&vc, 0, 1)?;
    show(&vc, 1, "after swap to node2");
    swap(&vc, 1, 0)?;
    show(&vc, 0, "after swap back to node1");
    Ok(())
}

#[test]
fn swap_moves_vm1_to_node2_and_back() {
    let _one = vmha_test_infra::node::one_cluster_at_a_time();
    if let Err(e) = swap_there_and_back() {
        panic!("{e:#}");
    }
}
