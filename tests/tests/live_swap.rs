//! Live swap end to end on two simulated nodes (own namespaces and libvirtd,
//! TCG counter guest, both vmhad running; issue 14):
//!
//! - `vmctl swap --live` there and back while the guest counts: the guest
//!   never reboots (no new `VMHA-BOOT` line on either console), its counter
//!   goes on across the move with no acknowledged value lost, no QEMU is
//!   left on the source, the roles flip (PRIM/SECOND, both ready) under a
//!   new generation, the same on both, and no resync follows;
//! - a migration refused by vmhad's disk check (a disk outside the module's
//!   directories, hot-plugged into the running guest): `swap --live` exits
//!   non-zero, never falls back, and the VM keeps running on the PRIM with
//!   its SECOND back to plain SECOND (no standby, no paused instance).
//!
//! - the source node killed mid-migration (its SECOND in standby, the
//!   migration running or about to): the destination drops its standby and
//!   any paused instance and fails over as from any lost PRIM, booting the
//!   guest from a disk holding every acknowledged counter; the killed node
//!   comes back as SECOND;
//! - the destination node killed while the migration runs (slowed to 1 MiB/s
//!   with `virsh migrate-setspeed`, so that it surely runs): `swap --live`
//!   fails, the guest keeps running on the source without a reboot, past the
//!   last acknowledged counter, the source goes ALONE, and the killed node
//!   comes back as its SECOND, both nodes agreeing;
//! - the replication network cut at the destination while the migration
//!   runs: the source aborts the migration as soon as its writer reports the
//!   link stalled (the migration runs in the background: the module's task
//!   handles the link at once), the guest keeps running there without an
//!   I/O error, the destination drops its standby and paused instance, and once the link is back the nodes agree (source PRIM, the
//!   other SECOND after a resync);
//! - vmhad killed (SIGKILL) and started again mid-migration, on the
//!   destination, then on the source: the migration fails with the
//!   forwarded connection, the restarted vmhad cleans up what the swap left
//!   (a paused incoming instance, the orphaned standby mount, a migration
//!   job) before adopting its module; the guest runs on the source
//!   throughout, without a reboot or an I/O error, and the nodes agree;
//! - `swap = "live"` (reloaded) and a plain `vmctl swap` whose migration is
//!   refused (the hot-plugged disk): it falls back to stop/start, logged,
//!   and the guest boots on the peer from every acknowledged counter.
//!
//! All in one cluster start (CI time): the refusal and the fallback come
//! last since the hot-plugged disk cannot be removed from this guest again.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use vmha_test_infra::cluster_vm::{workspace_bin, Timing, VmCluster, MODULE};
use vmha_test_infra::guest::Console;
use vmha_test_infra::node::{one_cluster_at_a_time, Network};
use vmha_test_infra::scenario::{
    boots_on, more_counters, qemu_pids, running_pair, runs_vm, BOOT_TIMEOUT, STATE_TIMEOUT,
    SYNC_TIMEOUT,
};
use vmha_test_infra::vmctl_status::{diag, entry, primary, ready, state, status, wait_status};

const NODES: [&str; 2] = ["node1", "node2"];

/// The module's generation on `node` as `s` shows it.
fn generation(s: &Value, node: &str) -> Option<String> {
    entry(s, node)["generation"].as_str().map(str::to_string)
}

/// Waits until `done` holds, polling every 200 ms; fails after `timeout`
/// saying `what` (with the cluster's diagnostics). For what the product
/// promises will happen, not when: a QEMU killed by libvirt may take a
/// moment to exit on a loaded machine.
fn wait_until(
    vc: &VmCluster,
    what: &str,
    timeout: Duration,
    mut done: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if done()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{what} after {timeout:?}\n{}", vc.diagnostics());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
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
    // A new generation (the flip), the same on both: the SECOND holds
    // everything, nothing to copy.
    let generation_after = generation(&s, dst);
    ensure!(
        generation_after.is_some()
            && generation_after != generation_before
            && generation(&s, src) == generation_after,
        "generations after the swap (before: {generation_before:?}): {s}"
    );
    ensure!(
        entry(&s, dst)["resync"].is_null() && entry(&s, src)["resync"].is_null(),
        "a resync after the swap: {s}"
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
    wait_until(vc, &format!("QEMU left on {src}"), STATE_TIMEOUT, || {
        Ok(qemu_pids(vc, from)?.is_empty())
    })?;
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

/// `swap --live` on node1 (PRIM), node1 killed once node2 is in standby.
fn source_killed_mid_migration(vc: &mut VmCluster) -> Result<()> {
    more_counters(vc, 0, 3, Duration::from_secs(60))?;
    // What node2's console holds now: the part the guest ran there before
    // (its last line may be cut by the migration back: parsed apart).
    let dst_console = vc.console(1)?;
    let dst_offset = std::fs::metadata(&dst_console)
        .map(|m| m.len())
        .unwrap_or(0);
    let mut swap = spawn_live_swap(vc, 0)?;
    let standby = wait_status(vc, 1, "node2 in standby", STATE_TIMEOUT, |s| {
        entry(s, "node2")["swap_phase"].as_str() == Some("standby")
    });
    // The last counter node1 acknowledged before it dies.
    let acked = Console::read(&vc.console(0)?)?
        .last_counter()
        .context("no counter on node1")?;
    let killed = vc.crash(0)?;
    let _ = swap.wait();
    standby?;
    eprintln!("[live_swap] node1 killed mid-migration ({killed} processes), last counter {acked}");
    wait_status(vc, 1, "node2 ALONE", STATE_TIMEOUT, |s| {
        state(s, "node2") == Some("ALONE") && primary(s) == Some("node2")
    })?;
    // Failed over: the guest boots on node2 from a disk holding every
    // acknowledged counter (the migrated instance, if any, was dropped).
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let c = loop {
        let text = std::fs::read(&dst_console).unwrap_or_default();
        let tail = text.get(usize::try_from(dst_offset)?..).unwrap_or_default();
        let c = Console::parse(&format!("\n{}", String::from_utf8_lossy(tail)));
        if !c.boots.is_empty() && c.counters.len() >= 2 {
            break c;
        }
        if Instant::now() >= deadline {
            bail!(
                "no boot and counters on node2 after the failover: {c:?}\n{}",
                vc.diagnostics()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    ensure!(c.boots.len() == 1, "boots on node2: {:?}", c.boots);
    let boot = c.boots[0];
    ensure!(
        boot >= acked,
        "acknowledged counter lost: {acked} acknowledged, node2 booted from {boot}"
    );
    ensure!(
        c.counters[0] == boot + 1,
        "node2 resumed at {} after booting from {boot}",
        c.counters[0]
    );
    c.check_monotonic()?;
    ensure!(
        qemu_pids(vc, 1)?.len() == 1,
        "QEMU on node2: {:?}",
        qemu_pids(vc, 1)?
    );
    eprintln!("[live_swap] node2 booted from {:?}", c.boots.last());
    // node1 comes back as node2's SECOND.
    vc.reboot(0)?;
    vc.start_vmhad(0)?;
    wait_status(vc, 1, "node1 SECOND ready", SYNC_TIMEOUT, |s| {
        state(s, "node1") == Some("SECOND")
            && ready(s, "node1")
            && state(s, "node2") == Some("PRIM")
    })?;
    Ok(())
}

#[test]
fn live_swap_there_and_back_and_its_abort_points() -> Result<()> {
    let _one = one_cluster_at_a_time();
    let mut vc = running_pair(&Timing::default())?;

    live_swap(&vc, 0, 1)?;
    live_swap(&vc, 1, 0)?;
    source_killed_mid_migration(&mut vc)?;
    // node2 is PRIM now; its migrations are slowed down from here on so
    // that they are surely running when the destination dies or the link
    // goes (the refusal below does not migrate).
    vc.node(1).virsh(&["migrate-setspeed", MODULE, "1"])?;
    destination_killed_mid_migration(&mut vc, 1)?;
    let prim = link_cut_mid_migration(&mut vc, 1)?;
    vmhad_restarted_mid_migration(&mut vc, prim, 1 - prim)?;
    vmhad_restarted_mid_migration(&mut vc, prim, prim)?;
    refused(&vc, prim)?;
    live_config_falls_back(&vc, prim)
}

/// The `vmha-fs primary --standby` processes on node `i`.
fn standby_pids(vc: &VmCluster, i: usize) -> Result<Vec<u32>> {
    vc.pids_of(i, "vmha-fs", "--standby")
}

/// `swap --live` on `prim`, the vmhad of node `killed` (either side) killed
/// while the migration runs and started again: the forwarded libvirt
/// connection dies with it, the migration fails, and the restarted vmhad
/// cleans up what the live swap left (the destination's paused instance
/// and standby mount; the source's migration job) before it adopts its
/// module. The guest runs on `prim` throughout, without a reboot or an I/O
/// error, and the nodes agree again.
fn vmhad_restarted_mid_migration(vc: &mut VmCluster, prim: usize, killed: usize) -> Result<()> {
    let second = 1 - prim;
    let (q, k) = (NODES[second], NODES[killed]);
    more_counters(vc, prim, 3, Duration::from_secs(60))?;
    let boots = Console::read(&vc.console(prim)?)?.boots;
    let errors = Console::read(&vc.console(prim)?)?.errors.len();
    let mut swap = start_slow_live_swap(vc, prim)?;
    ensure!(
        !standby_pids(vc, second)?.is_empty(),
        "no standby mount on {q} during the migration"
    );
    let acked = Console::read(&vc.console(prim)?)?
        .last_counter()
        .context("no counter")?;
    vc.signal_vmhad(killed, libc::SIGKILL)?;
    let t = Instant::now();
    let swapped = wait_child(&mut swap, Duration::from_secs(120))?;
    eprintln!(
        "[live_swap] vmhad of {k} killed mid-migration, last counter {acked}; \
         vmctl swap --live ended after {:?}: {swapped}",
        t.elapsed()
    );
    ensure!(
        !swapped.success(),
        "swap --live succeeded with vmhad of {k} killed"
    );
    vc.start_vmhad(killed)?;
    agreed(vc, prim, SYNC_TIMEOUT)?;
    let c = more_counters(vc, prim, 3, Duration::from_secs(90))?;
    ensure!(
        c.boots == boots,
        "the guest rebooted: {:?} after {boots:?}",
        c.boots
    );
    c.check_monotonic()?;
    ensure!(
        c.errors.len() == errors,
        "guest errors: {:?}",
        &c.errors[errors..]
    );
    ensure!(c.last_counter().is_some_and(|l| l > acked), "{c:?}");
    ensure!(
        standby_pids(vc, second)?.is_empty(),
        "a standby mount is left on {q}: {:?}",
        standby_pids(vc, second)?
    );
    if killed == second {
        let text = log(vc, second)?;
        ensure!(
            text.contains("standby mount a live swap left"),
            "{q}'s log does not say it stopped the standby left behind:\n{text}"
        );
    }
    Ok(())
}

/// `swap = "live"` (reloaded on both nodes) makes a plain `vmctl swap` on
/// `prim` try the live migration first; refused (the disk outside the
/// module's directories that [`refused`] hot-plugged), it falls back to
/// stop/start, logged: the VM boots on the peer from every acknowledged
/// counter.
fn live_config_falls_back(vc: &VmCluster, prim: usize) -> Result<()> {
    let second = 1 - prim;
    let (p, q) = (NODES[prim], NODES[second]);
    let text = std::fs::read_to_string(vc.config())?;
    let anchor = "loop_interval_s = 86400\n";
    ensure!(text.matches(anchor).count() == 1, "{text}");
    std::fs::write(
        vc.config(),
        text.replacen(anchor, &format!("{anchor}swap = \"live\"\n"), 1),
    )?;
    for (i, node) in NODES.iter().enumerate() {
        let out = vc.vmctl(i, &["reload"]).context("vmctl reload")?;
        ensure!(out.contains("swap"), "reload on {node}: {out}");
    }
    let before = Console::read(&vc.console(second)?)?;
    let logged = log(vc, prim)?.lines().count();
    let acked = Console::read(&vc.console(prim)?)?
        .last_counter()
        .context("no counter")?;
    let out = vc.vmctl(prim, &["swap"])?;
    eprintln!("[live_swap] swap with swap = \"live\" on {p}:\n{out}");
    ensure!(out.contains("live swap"), "swap answer: {out}");
    wait_status(
        vc,
        second,
        &format!("{q} PRIM, {p} SECOND ready"),
        SYNC_TIMEOUT,
        |s| {
            state(s, q) == Some("PRIM")
                && state(s, p) == Some("SECOND")
                && ready(s, p)
                && primary(s) == Some(q)
        },
    )?;
    boots_on(vc, second, before.boots.len(), acked)?;
    let text = log(vc, prim)?;
    let new: Vec<&str> = text.lines().skip(logged).collect();
    ensure!(
        new.iter()
            .any(|l| l.contains("falling back to stop/start") && l.contains("outside.img")),
        "{p}'s log does not name the fallback:\n{}",
        new.join("\n")
    );
    wait_until(vc, &format!("QEMU left on {p}"), STATE_TIMEOUT, || {
        Ok(qemu_pids(vc, prim)?.is_empty())
    })
}

/// `vmctl swap --live` on node `prim`, in the background (output discarded).
fn spawn_live_swap(vc: &VmCluster, prim: usize) -> Result<std::process::Child> {
    let vmctl = workspace_bin("vmctl", "VMCTL_BIN")?;
    vc.node(prim)
        .command(&vmctl)
        .arg("--config")
        .arg(vc.config())
        .args(["swap", "--live"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn vmctl swap --live")
}

/// Starts `vmctl swap --live` on node `prim` in the background and waits
/// until the migration runs (the SECOND in standby, the PRIM migrating).
fn start_slow_live_swap(vc: &VmCluster, prim: usize) -> Result<std::process::Child> {
    let (p, q) = (NODES[prim], NODES[1 - prim]);
    let mut swap = spawn_live_swap(vc, prim)?;
    // The PRIM shows no phase while it migrates (one step): the incoming
    // instance listed on the SECOND shows the migration runs.
    let deadline = Instant::now() + STATE_TIMEOUT;
    loop {
        if runs_vm(vc, 1 - prim)? {
            break;
        }
        if Instant::now() >= deadline {
            let _ = swap.kill();
            let _ = swap.wait();
            bail!(
                "no incoming {MODULE} on {q}: no migration from {p}\n{}",
                vc.diagnostics()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Into the migration (1 MiB/s: it lasts far longer than this).
    std::thread::sleep(Duration::from_secs(1));
    Ok(swap)
}

/// The guest on node `prim` went on counting through an aborted live swap:
/// no reboot, counters monotonic and past `acked`, no I/O error (the
/// migration is aborted at once and the link's loss handled before the
/// writer's lock timeout, as without a live swap).
fn kept_running(vc: &VmCluster, prim: usize, boots: &[u64], acked: u64) -> Result<()> {
    let c = more_counters(vc, prim, 3, Duration::from_secs(90))?;
    ensure!(
        c.boots == boots,
        "the guest rebooted on {}: boots {boots:?} before, {:?} after",
        NODES[prim],
        c.boots
    );
    c.check_monotonic()?;
    ensure!(c.errors.is_empty(), "guest errors: {:?}", c.errors);
    let last = c.last_counter().context("no counter")?;
    ensure!(last > acked, "counter {last} after {acked} acknowledged");
    ensure!(
        qemu_pids(vc, prim)?.len() == 1,
        "QEMU on {}: {:?}",
        NODES[prim],
        qemu_pids(vc, prim)?
    );
    Ok(())
}

/// Both nodes agree: `prim` PRIM, the other SECOND ready, no live swap
/// phase left, the VM only on `prim`.
fn agreed(vc: &VmCluster, prim: usize, timeout: Duration) -> Result<()> {
    let (p, q) = (NODES[prim], NODES[1 - prim]);
    for i in [prim, 1 - prim] {
        wait_status(
            vc,
            i,
            &format!("{p} PRIM, {q} SECOND ready (as {} sees it)", NODES[i]),
            timeout,
            |s| {
                state(s, p) == Some("PRIM")
                    && state(s, q) == Some("SECOND")
                    && ready(s, q)
                    && primary(s) == Some(p)
                    && entry(s, p)["swap_phase"].is_null()
                    && entry(s, q)["swap_phase"].is_null()
            },
        )?;
    }
    wait_until(
        vc,
        &format!("a {MODULE} instance or QEMU is left on {q}"),
        STATE_TIMEOUT,
        || Ok(!runs_vm(vc, 1 - prim)? && qemu_pids(vc, 1 - prim)?.is_empty()),
    )
}

/// `swap --live` on `prim`, its SECOND's node crashed while the migration
/// runs: the VM keeps running on `prim`, which goes ALONE; the crashed node
/// comes back as its SECOND.
fn destination_killed_mid_migration(vc: &mut VmCluster, prim: usize) -> Result<()> {
    let second = 1 - prim;
    let (p, q) = (NODES[prim], NODES[second]);
    more_counters(vc, prim, 3, Duration::from_secs(60))?;
    let boots = Console::read(&vc.console(prim)?)?.boots;
    let mut swap = start_slow_live_swap(vc, prim)?;
    let acked = Console::read(&vc.console(prim)?)?
        .last_counter()
        .context("no counter")?;
    let killed = vc.crash(second)?;
    let t = Instant::now();
    let swapped = wait_child(&mut swap, Duration::from_secs(120))?;
    eprintln!(
        "[live_swap] {q} killed mid-migration ({killed} processes), last counter {acked}; \
         vmctl swap --live ended after {:?}: {swapped}",
        t.elapsed()
    );
    ensure!(!swapped.success(), "swap --live succeeded with {q} dead");
    wait_status(vc, prim, &format!("{p} ALONE"), STATE_TIMEOUT, |s| {
        state(s, p) == Some("ALONE") && primary(s) == Some(p) && entry(s, p)["swap_phase"].is_null()
    })?;
    // No guest I/O error: the peer's loss is handled while the migration
    // ends in the background, before the writer's lock timeout.
    kept_running(vc, prim, &boots, acked)?;
    vc.reboot(second)?;
    vc.start_vmhad(second)?;
    agreed(vc, prim, SYNC_TIMEOUT)?;
    kept_running(vc, prim, &boots, acked)
}

/// `swap --live` on `prim`, the replication network cut at the SECOND
/// while the migration runs: the VM ends up running on exactly one node
/// with every acknowledged counter, and once the link is back the nodes
/// agree. Returns the node the VM runs on.
fn link_cut_mid_migration(vc: &mut VmCluster, prim: usize) -> Result<usize> {
    let second = 1 - prim;
    let q = NODES[second];
    more_counters(vc, prim, 3, Duration::from_secs(60))?;
    let boots = Console::read(&vc.console(prim)?)?.boots;
    let mut swap = start_slow_live_swap(vc, prim)?;
    let acked = Console::read(&vc.console(prim)?)?
        .last_counter()
        .context("no counter")?;
    let t = Instant::now();
    let cut = vc.node(second).link_down(Network::Dedicated);
    let swapped = wait_child(&mut swap, Duration::from_secs(120));
    eprintln!(
        "[live_swap] replication link of {q} cut mid-migration, last counter {acked}; \
         vmctl swap --live ended after {:?}: {swapped:?}",
        t.elapsed()
    );
    let cut = cut?;
    // The migration was aborted: the VM keeps running on the PRIM, which
    // writes on without its SECOND, without a guest I/O error (the stall
    // shows at half the lock timeout; the link's loss is handled at once).
    ensure!(
        !swapped?.success(),
        "swap --live succeeded with the link cut"
    );
    kept_running(vc, prim, &boots, acked)?;
    // The destination drops its paused instance once it sees the swap given
    // up (a heartbeat, then libvirt's destroy).
    wait_until(
        vc,
        &format!("a {MODULE} instance is left on {q}"),
        STATE_TIMEOUT,
        || Ok(!runs_vm(vc, second)?),
    )?;
    drop(cut);
    agreed(vc, prim, SYNC_TIMEOUT)?;
    kept_running(vc, prim, &boots, acked)?;
    Ok(prim)
}

/// Waits for `child` (`vmctl swap --live`) to exit, killing it after `timeout`.
fn wait_child(
    child: &mut std::process::Child,
    timeout: Duration,
) -> Result<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().context("vmctl swap --live")? {
            return Ok(st);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("vmctl swap --live still running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A disk outside the module's directories refuses the live swap from
/// node `prim`: exit non-zero, the VM stays, the SECOND is plain SECOND.
fn refused(vc: &VmCluster, prim: usize) -> Result<()> {
    let second = 1 - prim;
    let (p, q) = (NODES[prim], NODES[second]);
    let node = vc.node(prim);
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
    let counters = Console::read(&vc.console(prim)?)?.counters.len();
    let boots = Console::read(&vc.console(prim)?)?.boots;
    let t = Instant::now();
    let refused = vc.vmctl(prim, &["swap", "--live"]);
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
    // The VM runs on the PRIM and goes on counting; the SECOND is plain.
    ensure!(runs_vm(vc, prim)?, "{MODULE} no longer runs on {p}");
    let c = more_counters(vc, prim, 3, Duration::from_secs(60))?;
    ensure!(c.counters.len() >= counters + 3);
    ensure!(c.boots == boots, "the guest rebooted: {:?}", c.boots);
    let s = wait_status(
        vc,
        prim,
        &format!("{q} plain SECOND again"),
        STATE_TIMEOUT,
        |s| {
            state(s, p) == Some("PRIM")
                && state(s, q) == Some("SECOND")
                && ready(s, q)
                && entry(s, p)["swap_phase"].is_null()
                && entry(s, q)["swap_phase"].is_null()
        },
    )?;
    ensure!(primary(&s) == Some(p), "{s}");
    ensure!(!runs_vm(vc, second)?, "a {MODULE} instance is left on {q}");
    ensure!(qemu_pids(vc, second)?.is_empty(), "QEMU left on {q}");
    Ok(())
}
