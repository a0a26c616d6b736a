//! Split brain without a witness (design, "Controller" and "Reintegration"):
//! both networks are cut, both nodes go ALONE and both guests write, so the two
//! copies of the disk diverge. When the networks return, the default policy
//! (`discard-least-changes`, ties to the first node) picks a loser: it stops
//! its VM and resynchronises from the winner, saving aside every byte the
//! resync overwrites.
//!
//! What the operator relies on: the two copies end byte-identical and equal to
//! the winner's; the loser's diverged blocks (its guest's last counter) are in
//! `<state>/vm1/fs0/diverged/<time>/` (`manifest.tsv` + `blocks.bin`); the
//! winner's guest never reboots and its counters never go back.
//!
//! Needs root, /dev/fuse, the packages of `.ci/install-deps` and the
//! workspace binaries (`cargo build --workspace --bins`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use vmha_test_infra::cluster_vm::{host_side, Timing, VmCluster, MODULE, STATE_DIR};
use vmha_test_infra::guest::{read_disk_counter, wait_console, Console};
use vmha_test_infra::node::Network;
use vmha_test_infra::scenario::{
    more_counters, runs_vm, BOOT_TIMEOUT, STATE_TIMEOUT, SYNC_TIMEOUT,
};
use vmha_test_infra::vmctl_status::{diag, primary, ready, state, status, wait_status};

const NAMES: [&str; 2] = ["node1", "node2"];

/// Both networks cut at node1 (node2's ends stay up); restored when dropped.
struct Partition<'a> {
    vc: &'a VmCluster,
}

impl<'a> Partition<'a> {
    fn new(vc: &'a VmCluster) -> Result<Self> {
        for net in Network::ALL {
            vc.node(0).set_link(net, false)?;
        }
        Ok(Self { vc })
    }

    fn heal(self) -> Result<()> {
        for net in Network::ALL {
            self.vc.node(0).set_link(net, true)?;
        }
        Ok(())
    }
}

impl Drop for Partition<'_> {
    fn drop(&mut self) {
        for net in Network::ALL {
            if let Err(e) = self.vc.node(0).set_link(net, true) {
                eprintln!("[split_brain] restoring the link: {e:#}");
            }
        }
    }
}

/// Resumes the paused guest on node `i` when dropped.
struct Paused<'a> {
    vc: &'a VmCluster,
    i: usize,
}

impl<'a> Paused<'a> {
    fn new(vc: &'a VmCluster, i: usize) -> Result<Self> {
        vc.node(i).virsh(&["suspend", MODULE])?;
        Ok(Self { vc, i })
    }
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.vc.node(self.i).virsh(&["resume", MODULE]) {
            eprintln!("[split_brain] resuming the guest: {e:#}");
        }
    }
}

/// Offset of the guest's sector 0 (the counter) in a qcow2 file: where
/// `VMHA-COUNTER <n> ` stands at the start of a 512-byte sector.
fn counter_offset(image: &[u8]) -> Option<usize> {
    let pat = b"VMHA-COUNTER ";
    (0..image.len() / 512)
        .map(|s| s * 512)
        .find(|&o| image[o..].starts_with(pat))
}

/// One `manifest.tsv` line: path, offset in the file, length, offset in blocks.bin.
#[derive(Debug)]
struct Region {
    path: String,
    offset: u64,
    len: u64,
    at: u64,
}

fn manifest(dir: &Path) -> Result<Vec<Region>> {
    let text = std::fs::read_to_string(dir.join("manifest.tsv"))
        .with_context(|| format!("reading {}/manifest.tsv", dir.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            ensure!(f.len() == 4, "manifest line {l:?}");
            Ok(Region {
                path: f[0].to_string(),
                offset: f[1].parse()?,
                len: f[2].parse()?,
                at: f[3].parse()?,
            })
        })
        .collect()
}

/// The loser's saved-aside folders (`<state>/vm1/fs0/diverged/*`).
fn diverged_dirs(vc: &VmCluster, i: usize) -> Result<Vec<PathBuf>> {
    let root = host_side(vc.node(i), STATE_DIR)?.join(format!("{MODULE}/fs0/diverged"));
    let mut out = Vec::new();
    match std::fs::read_dir(&root) {
        Ok(entries) => {
            for e in entries {
                let p = e?.path();
                if p.is_dir() {
                    out.push(p);
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", root.display())),
    }
    out.sort();
    Ok(out)
}

fn split_brain() -> Result<()> {
    let timing = Timing::default();
    let mut vc = VmCluster::new(&timing)?;
    vc.start_vmhad(0)?;
    vc.start_vmhad(1)?;
    vc.vmctl(0, &["prim", "--yes"])?;
    wait_status(&vc, 0, "node1 PRIM", STATE_TIMEOUT, |s| {
        state(s, "node1") == Some("PRIM") && primary(s) == Some("node1")
    })?;
    let consoles = [vc.console(0)?, vc.console(1)?];
    diag(
        &vc,
        wait_console(&consoles[0], BOOT_TIMEOUT, "counters on node1", |c| {
            c.counters.len() >= 3
        }),
    )?;
    wait_status(&vc, 1, "node2 SECOND ready", SYNC_TIMEOUT, |s| {
        state(s, "node2") == Some("SECOND") && ready(s, "node2")
    })?;
    // The first copy to an empty node overwrites nothing of node2's: nothing
    // is saved aside (a folder here would hold a copy of the whole disk).
    let first = diverged_dirs(&vc, 1)?;
    ensure!(
        first.is_empty(),
        "the first join of an empty node2 saved data aside: {first:?}"
    );
    more_counters(&vc, 0, 2, Duration::from_secs(60))?;

    // The partition: both go ALONE, both guests write.
    let t = Instant::now();
    let partition = Partition::new(&vc)?;
    let split = Console::read(&consoles[0])?
        .last_counter()
        .context("no counter on node1")?;
    eprintln!("[split_brain] both networks cut; node1's guest at {split}");
    for (i, &name) in NAMES.iter().enumerate() {
        wait_status(&vc, i, &format!("{name} ALONE"), STATE_TIMEOUT, |s| {
            state(s, name) == Some("ALONE") && primary(s) == Some(name)
        })?;
    }
    let c2 = diag(
        &vc,
        wait_console(&consoles[1], BOOT_TIMEOUT, "counters on node2", |c| {
            c.counters.len() >= 5
        }),
    )?;
    more_counters(&vc, 0, 5, Duration::from_secs(60))?;
    eprintln!(
        "[split_brain] both ALONE and counting after {:?}: node2 booted from {:?}",
        t.elapsed(),
        c2.boots
    );
    let before: Vec<Console> = consoles
        .iter()
        .map(|c| Console::read(c))
        .collect::<Result<_>>()?;
    ensure!(
        before[0].boots.len() == 1 && before[1].boots.len() == 1,
        "boots: node1 {:?}, node2 {:?}",
        before[0].boots,
        before[1].boots
    );

    // Heal: one node steps down and resynchronises from the other.
    partition.heal()?;
    let t_heal = Instant::now();
    let deadline = Instant::now() + STATE_TIMEOUT;
    let (winner, loser) = loop {
        let s = status(&vc, 0)?;
        match (state(&s, "node1"), state(&s, "node2")) {
            (Some("PRIM" | "ALONE"), Some("SECOND" | "WAIT")) if !runs_vm(&vc, 1)? => break (0, 1),
            (Some("SECOND" | "WAIT"), Some("PRIM" | "ALONE")) if !runs_vm(&vc, 0)? => break (1, 0),
            _ => {}
        }
        ensure!(
            Instant::now() < deadline,
            "no loser {STATE_TIMEOUT:?} after the heal: {s}\n{}",
            vc.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let (wn, ln) = (NAMES[winner], NAMES[loser]);
    let lost = Console::read(&consoles[loser])?;
    let loser_last = lost.last_counter().context("no counter on the loser")?;
    eprintln!(
        "[split_brain] {:?} after the heal: {wn} keeps vm1, {ln} stopped its guest at {loser_last}",
        t_heal.elapsed()
    );
    let s = wait_status(
        &vc,
        winner,
        &format!("{ln} SECOND ready"),
        SYNC_TIMEOUT,
        |s| state(s, ln) == Some("SECOND") && ready(s, ln) && state(s, wn) == Some("PRIM"),
    )?;
    eprintln!(
        "[split_brain] {ln} SECOND ready {:?} after the heal",
        t_heal.elapsed()
    );
    ensure!(primary(&s) == Some(wn), "after the resync: {s}");
    ensure!(!runs_vm(&vc, loser)?, "vm1 runs on the loser {ln}");
    let log_l = vc.vmctl(loser, &["log"])?;
    ensure!(log_l.contains("split brain"), "{ln}'s log:\n{log_l}");

    // The copies: identical, with the winner's guest paused (no write in flight).
    more_counters(&vc, winner, 2, Duration::from_secs(60))?;
    let images = [
        vc.backing(0)?.join(format!("{MODULE}.qcow2")),
        vc.backing(1)?.join(format!("{MODULE}.qcow2")),
    ];
    let (copy_w, copy_l, acked_w) = {
        let _paused = Paused::new(&vc, winner)?;
        let acked = Console::read(&consoles[winner])?
            .last_counter()
            .context("no counter on the winner")?;
        // A write acknowledged to the guest is on both disks already; wait for
        // both copies to settle on the same bytes.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let w = std::fs::read(&images[winner])?;
            let l = std::fs::read(&images[loser])?;
            if w == l || Instant::now() >= deadline {
                break (w, l, acked);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    if copy_w != copy_l {
        let first = copy_w.iter().zip(&copy_l).position(|(a, b)| a != b);
        bail!(
            "the copies differ after the resync: {} vs {} bytes, first difference at {first:?}\n{}",
            copy_w.len(),
            copy_l.len(),
            vc.diagnostics()
        );
    }
    let on_disk = read_disk_counter(&images[loser])?.context("no counter on the copies")?;
    eprintln!(
        "[split_brain] the copies are identical ({} bytes), holding counter {on_disk} (the winner acknowledged {acked_w})",
        copy_w.len()
    );
    ensure!(
        on_disk >= acked_w,
        "the copies hold {on_disk}, the winner acknowledged {acked_w}"
    );

    // The loser's diverged blocks are saved aside: its guest's counter sector,
    // as the loser wrote it, at the offset where the copies now hold the
    // winner's.
    let dirs = diverged_dirs(&vc, loser)?;
    ensure!(
        !dirs.is_empty(),
        "no saved-aside folder on the loser {ln}\n{}",
        vc.diagnostics()
    );
    let sector = counter_offset(&copy_w).context("no counter sector in the image")? as u64;
    let mut found = Vec::new();
    for dir in &dirs {
        let blocks = std::fs::read(dir.join("blocks.bin"))
            .with_context(|| format!("reading {}/blocks.bin", dir.display()))?;
        let regions = manifest(dir)?;
        eprintln!(
            "[split_brain] {}: {} regions, {} bytes saved",
            dir.display(),
            regions.len(),
            blocks.len()
        );
        for r in &regions {
            ensure!(
                r.at + r.len <= blocks.len() as u64,
                "manifest region {r:?} beyond blocks.bin ({} bytes)",
                blocks.len()
            );
            if r.path.trim_start_matches('/') == format!("{MODULE}.qcow2")
                && r.offset <= sector
                && sector + 512 <= r.offset + r.len
            {
                let at = (r.at + sector - r.offset) as usize;
                let saved = String::from_utf8_lossy(&blocks[at..at + 64]).into_owned();
                found.push(saved.lines().next().unwrap_or_default().to_string());
            }
        }
    }
    eprintln!("[split_brain] saved-aside counter sector(s) of {ln}: {found:?} (its guest acknowledged {loser_last})");
    let mine = [
        format!("VMHA-COUNTER {loser_last} "),
        format!("VMHA-COUNTER {} ", loser_last + 1),
    ];
    ensure!(
        found
            .iter()
            .any(|f| mine.iter().any(|m| f.starts_with(m.as_str()))),
        "the loser's counter sector ({loser_last}) is not saved aside: {found:?}"
    );

    // The winner's guest never rebooted nor went back.
    let cw = Console::read(&consoles[winner])?;
    ensure!(
        cw.boots.len() == before[winner].boots.len(),
        "the winner's guest rebooted: {:?}",
        cw.boots
    );
    cw.check_monotonic()?;
    ensure!(
        cw.errors.is_empty(),
        "guest errors on {wn}: {:?}",
        cw.errors
    );
    Ok(())
}

#[test]
fn split_brain_heals_to_the_winners_copy_and_saves_the_losers_blocks() {
    let _one = vmha_test_infra::node::one_cluster_at_a_time();
    if let Err(e) = split_brain() {
        panic!("{e:#}");
    }
}
