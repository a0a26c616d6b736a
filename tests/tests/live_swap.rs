//! Live swap end to end on two simulated nodes (own namespaces and libvirtd,
//! TCG counter guest, both vmhad running; issue 14):
//!
//! - `vmctl swap --live` there and back while the guest counts: the guest
//!   never reboots (no new `VMHA-BOOT` line on either console), its counter
//!   goes on across the move with no acknowledged value lost, no QEMU is
//!   left on the source, the roles flip (PRIM/SECOND, both ready) under the
//!   same generation and no resync follows;
//! - a migration refused by vmhad's disk check (a disk outside the module's
//!   directories, hot-plugged into the running guest): `swap --live` exits
//!   non-zero, never falls back, and the VM keeps running on the PRIM with
//!   its SECOND back to plain SECOND (no standby, no paused instance).
//!
//! Both in one cluster start (CI time): the refusal comes last since the
//! hot-plugged disk cannot be removed from this guest again.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use vmha_test_infra::cluster_vm::{Timing, VmCluster, MODULE};
use vmha_test_infra::guest::Console;
use vmha_test_infra::node::one_cluster_at_a_time;
use vmha_test_infra::scenario::{more_counters, qemu_pids, running_pair, runs_vm, STATE_TIMEOUT};
use vmha_test_infra::vmctl_status::{diag, entry, primary, ready, state, status, wait_status};

const NODES: [&str; 2] = ["node1", "node2"];

/// The module's generation on `node` as `s` shows it.
fn generation(s: &Value, node: &str) -> Option<String> {
    entry(s, node)["generation"].as_str().map(str::to_string)
}

/// The event log of node `i` (`vmctl log`).
fn log(vc: &VmCluster, i: usize) -> Result<String> {
    vc.vmctl(i, &["log"])
}

/// One live swap from node `from` to node `to` while the guest counts, and
/// every promise the swap makes.
fn live_swap(vc: &VmCluster, from: usize, to: usize) -> Result<()> {
    let (src, dst) = (NODES[from], NODES[to]);
    more_counters(vc, from, 3, Duration::from_secs(60))?;
    let before_src = Console::read(&vc.console(from)?)?;
    let before_dst = Console::read(&vc.console(to)?)?;
    let generation_before = generation(&status(vc, from)?, src);
    let logs_before = [log(vc, 0)?.lines().count(), log(vc, 1)?.lines().count()];

    let t = Instant::now();
    let out = diag(
        vc,
        vc.vmctl(from, &["swap", "--live"])
            .with_context(|| format!("vmctl swap --live on {src}")),
    )?;
    eprintln!(
        "[live_swap] {src} -> {dst}: vmctl answered in {:?}:\n{out}",
        t.elapsed()
    );
    ensure!(out.contains("live swap done"), "answer: {out}");

    let s = wait_status(
        vc,
        to,
        &format!("{dst} PRIM, {src} SECOND ready"),
        STATE_TIMEOUT,
        |s| {
            state(s, dst) == Some("PRIM")
                && state(s, src) == Some("SECOND")
                && ready(s, src)
                && ready(s, dst)
                && primary(s) == Some(dst)
        },
    )?;
    // The same generation on both: the SECOND holds everything, nothing to copy.
    ensure!(
        generation(&s, dst) == generation_before && generation(&s, src) == generation_before,
        "generations after the swap: {s}"
    );
    ensure!(entry(&s, dst)["swap_phase"].is_null(), "{s}");
    ensure!(entry(&s, src)["swap_phase"].is_null(), "{s}");

    // The guest goes on counting on the destination, without a reboot.
    let c = more_counters(vc, to, 5, Duration::from_secs(60))?;
    ensure!(
        c.boots == before_dst.boots,
        "the guest booted on {dst}: boots {:?} before, {:?} after",
        before_dst.boots,
        c.boots
    );
    let after_src = Console::read(&vc.console(from)?)?;
    ensure!(
        after_src.boots == before_src.boots,
        "the guest booted again on {src}: {:?}",
        after_src.boots
    );
    let last_src = after_src
        .last_counter()
        .context("no counter on the source")?;
    let first_dst = c.counters[before_dst.counters.len()];
    // The next counter, or the one after if the line printed across the
    // switch-over was split between the two consoles.
    ensure!(
        first_dst == last_src + 1 || first_dst == last_src + 2,
        "counter went from {last_src} on {src} to {first_dst} on {dst}"
    );
    c.check_monotonic()?;
    ensure!(c.errors.is_empty(), "guest errors: {:?}", c.errors);
    eprintln!("[live_swap] counter {last_src} on {src}, then {first_dst} on {dst}");

    // Nothing left on the source.
    ensure!(
        qemu_pids(vc, from)?.is_empty(),
        "QEMU left on {src}: {:?}",
        qemu_pids(vc, from)?
    );
    ensure!(!runs_vm(vc, from)?, "{MODULE} still listed on {src}");

    // No resync, no attach after the swap, on either node.
    for (i, before) in logs_before.iter().enumerate() {
        let text = log(vc, i)?;
        let new: Vec<&str> = text.lines().skip(*before).collect();
        for line in &new {
            ensure!(
                !line.contains("resync started") && !line.contains("attaching the SECOND"),
                "{} resynchronised after the live swap: {line}\n{}",
                NODES[i],
                new.join("\n")
            );
        }
    }
    Ok(())
}

#[test]
fn live_swap_there_and_back_and_a_refused_migration() -> Result<()> {
    let _one = one_cluster_at_a_time();
    let vc = running_pair(&Timing::default())?;

    live_swap(&vc, 0, 1)?;
    live_swap(&vc, 1, 0)?;

    // Refused: a disk outside the module's directories.
    let node = vc.node(0);
    node.run(
        "qemu-img",
        &["create", "-q", "-f", "raw", "/var/tmp/outside.img", "1M"],
    )?;
    node.virsh(&[
        "attach-disk",
        MODULE,
        "/var/tmp/outside.img",
        "vdb",
        "--live",
        "--cache",
        "none",
    ])?;
    let counters = Console::read(&vc.console(0)?)?.counters.len();
    let t = Instant::now();
    let refused = vc.vmctl(0, &["swap", "--live"]);
    let err = match refused {
        Ok(out) => bail!("swap --live with a disk outside the mount succeeded: {out}"),
        Err(e) => format!("{e:#}"),
    };
    eprintln!("[live_swap] refused in {:?}: {err}", t.elapsed());
    ensure!(err.contains("live swap aborted"), "error: {err}");
    ensure!(
        err.contains("outside.img"),
        "the error does not name the disk: {err}"
    );
    // The VM runs on node1 and goes on counting; node2 is a plain SECOND.
    ensure!(runs_vm(&vc, 0)?, "{MODULE} no longer runs on node1");
    let c = more_counters(&vc, 0, 3, Duration::from_secs(60))?;
    ensure!(c.counters.len() >= counters + 3);
    ensure!(c.boots == vec![0], "the guest rebooted: {:?}", c.boots);
    let s = wait_status(&vc, 0, "node2 plain SECOND again", STATE_TIMEOUT, |s| {
        state(s, "node1") == Some("PRIM")
            && state(s, "node2") == Some("SECOND")
            && ready(s, "node2")
            && entry(s, "node1")["swap_phase"].is_null()
            && entry(s, "node2")["swap_phase"].is_null()
    })?;
    ensure!(primary(&s) == Some("node1"), "{s}");
    ensure!(!runs_vm(&vc, 1)?, "a {MODULE} instance is left on node2");
    ensure!(qemu_pids(&vc, 1)?.is_empty(), "QEMU left on node2");
    Ok(())
}
