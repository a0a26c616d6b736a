//! Reintegration after a node crash (design, "Reintegration"): node1 (PRIM)
//! is killed, node2 fails over and runs vm1 ALONE; node1 reboots and comes
//! back as SECOND after an **incremental** resync — only what changed while it
//! was away travels, not the disk — then `vmctl swap` moves vm1 back to node1.
//! The guest's counters never go back across the whole story.
//!
//! The disk carries 56 MiB of data written before the start. A crashed PRIM's
//! activity log names the 4 MiB extents it may have left different (here the
//! qcow2 metadata and the guest's counter cluster), so the incremental resync
//! compares a few extents, not the whole image.
//!
//! Needs root, /dev/fuse, the packages of `.ci/install-deps` and the
//! workspace binaries (`cargo build --workspace --bins`).

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use vmha_test_infra::cluster_vm::{host_side, Timing, VmCluster, MODULE, STATE_DIR};
use vmha_test_infra::guest::{read_disk_counter, wait_console, Console};
use vmha_test_infra::node::run;
use vmha_test_infra::scenario::{more_counters, runs_vm, start_pair, BOOT_TIMEOUT, STATE_TIMEOUT};
use vmha_test_infra::vmctl_status::{diag, entry, primary, ready, state, status, wait_status};

const SYNC_TIMEOUT: Duration = Duration::from_secs(180);
/// Data written into the disk before the start (guest offset 1 MiB on).
const PREFILL_MIB: u64 = 56;

/// The writer's `sync.json` for the module's only directory on node `i`.
fn sync_json(vc: &VmCluster, i: usize) -> Result<Value> {
    let path = host_side(vc.node(i), STATE_DIR)?.join(format!("{MODULE}/fs0/sync.json"));
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}: {text}", path.display()))
}

fn reintegration() -> Result<()> {
    let timing = Timing::default();
    let mut vc = VmCluster::new(&timing)?;
    let disk1 = vc.backing(0)?.join(format!("{MODULE}.qcow2"));
    run(std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c"])
        .arg(format!("write -P 0x5a 1M {PREFILL_MIB}M"))
        .arg(&disk1))?;
    let image_len = std::fs::metadata(&disk1)?.len();
    ensure!(
        image_len >= PREFILL_MIB << 20,
        "prefilled image is only {image_len} bytes"
    );

    let t = Instant::now();
    start_pair(&mut vc)?;
    let console1 = vc.console(0)?;
    let first = sync_json(&vc, 0)?;
    eprintln!(
        "[reintegration] node2 SECOND ready after {:?}; node1's initial copy: {first}",
        t.elapsed()
    );
    more_counters(&vc, 0, 3, Duration::from_secs(60))?;

    // node1 crashes: node2 fails over and runs vm1 alone.
    let t_kill = Instant::now();
    let killed = vc.crash(0)?;
    let acked1 = Console::read(&console1)?
        .last_counter()
        .context("no counter on node1")?;
    eprintln!("[reintegration] node1 crashed ({killed} processes), acknowledged {acked1}");
    wait_status(&vc, 1, "node2 ALONE", STATE_TIMEOUT, |s| {
        state(s, "node2") == Some("ALONE") && primary(s) == Some("node2")
    })?;
    let console2 = vc.console(1)?;
    let c2 = diag(
        &vc,
        wait_console(&console2, BOOT_TIMEOUT, "counters on node2", |c| {
            c.counters.len() >= 5
        }),
    )?;
    eprintln!(
        "[reintegration] node2 ALONE, counting after {:?}: booted from {:?}",
        t_kill.elapsed(),
        c2.boots
    );
    ensure!(c2.boots.len() == 1, "node2 boots {:?}", c2.boots);
    ensure!(
        c2.boots[0] >= acked1,
        "node1 acknowledged {acked1}, node2 booted from {}",
        c2.boots[0]
    );

    // node1 reboots and rejoins: SECOND after an incremental resync.
    vc.reboot(0)?;
    let t_back = Instant::now();
    vc.start_vmhad(0)?;
    let mut seen_total = None;
    let deadline = Instant::now() + SYNC_TIMEOUT;
    let s = loop {
        let s = status(&vc, 0)?;
        let me = entry(&s, "node1");
        if let Some(total) = me["resync"]["total_bytes"].as_u64() {
            seen_total = Some(seen_total.unwrap_or(0).max(total));
        }
        ensure!(!runs_vm(&vc, 0)?, "vm1 runs on node1 while node2 is ALONE");
        if state(&s, "node1") == Some("SECOND") && ready(&s, "node1") {
            break s;
        }
        ensure!(
            Instant::now() < deadline,
            "node1 not SECOND ready {SYNC_TIMEOUT:?} after its restart: {s}\n{}",
            vc.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let rejoin = t_back.elapsed();
    ensure!(primary(&s) == Some("node2"), "node1 rejoined, primary: {s}");
    let sync = sync_json(&vc, 1)?;
    let moved = sync["total_bytes"]
        .as_u64()
        .context("sync.json total_bytes")?;
    eprintln!(
        "[reintegration] node1 SECOND ready {rejoin:?} after vmhad started; node2's sync.json: {sync}; \
         largest resync total in node1's status: {seen_total:?}; image {image_len} bytes"
    );
    ensure!(
        sync["state"].as_str() == Some("in_sync"),
        "node2's sync.json: {sync}"
    );
    ensure!(
        moved < image_len / 4,
        "the resync moved {moved} bytes of a {image_len}-byte image: not incremental"
    );
    if let Some(total) = seen_total {
        ensure!(
            total < image_len / 4,
            "node1's status showed a resync of {total} bytes (image {image_len})"
        );
    }
    let log1 = vc.vmctl(0, &["log"])?;
    ensure!(
        log1.contains("incremental resync started") && !log1.contains("full resync started"),
        "node1's log:\n{log1}"
    );
    // Synchronous again: what node2's guest acknowledges is on node1's disk.
    let acked2 = more_counters(&vc, 1, 3, Duration::from_secs(60))?
        .last_counter()
        .context("no counter on node2")?;
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

    // Swap back: node1 runs vm1 from where node2 left it.
    let before1 = Console::read(&console1)?;
    let t_swap = Instant::now();
    let out = vc.vmctl(0, &["swap"])?;
    eprintln!("[reintegration] vmctl swap on node1: {}", out.trim());
    wait_status(&vc, 0, "node1 PRIM", STATE_TIMEOUT, |s| {
        state(s, "node1") == Some("PRIM") && primary(s) == Some("node1")
    })?;
    let c1 = diag(
        &vc,
        wait_console(&console1, BOOT_TIMEOUT, "counters on node1 again", |c| {
            c.boots.len() > before1.boots.len() && c.counters.len() >= before1.counters.len() + 3
        }),
    )?;
    let c2 = Console::read(&console2)?;
    let last2 = c2.last_counter().context("no counter on node2")?;
    let boot = c1.boots[before1.boots.len()];
    eprintln!(
        "[reintegration] swap back: node1 counting after {:?}, booted from {boot} (node2 acknowledged {last2})",
        t_swap.elapsed()
    );
    ensure!(
        boot >= last2,
        "node2 acknowledged {last2}, node1 booted from {boot} after the swap"
    );
    let resumed = c1.first_after_boot(before1.boots.len());
    ensure!(resumed == Some(boot + 1), "node1 resumed at {resumed:?}");
    ensure!(!runs_vm(&vc, 1)?, "vm1 still runs on node2 after the swap");
    wait_status(&vc, 0, "node2 SECOND ready", SYNC_TIMEOUT, |s| {
        state(s, "node2") == Some("SECOND") && ready(s, "node2")
    })?;
    // Never back: node1's first life, node2's, node1's second, in order.
    let c1 = Console::read(&console1)?;
    let back = c1.boot_at[before1.boots.len()];
    let mut all = c1.counters[..back].to_vec();
    all.extend(&c2.counters);
    all.extend(&c1.counters[back..]);
    Console {
        counters: all,
        ..Console::default()
    }
    .check_monotonic()?;
    for (name, c) in [("node1", Console::read(&console1)?), ("node2", c2)] {
        ensure!(
            c.errors.is_empty(),
            "guest errors on {name}: {:?}",
            c.errors
        );
    }
    Ok(())
}

#[test]
fn crashed_node_rejoins_by_incremental_resync_then_swaps_back() {
    let _one = vmha_test_infra::node::one_cluster_at_a_time();
    if let Err(e) = reintegration() {
        panic!("{e:#}");
    }
}
