//! A node's own disk fails or fills (issue "Real faults never turn against the
//! good copy", item 1), on real XFS loop devices, real FUSE and TCP:
//! - the primary's backing filesystem shuts down (`xfs_io -x -c shutdown`) while
//!   fio and a checking writer write: every acknowledged write is on the peer, the
//!   primary records itself (never the peer) as not up to date, reports
//!   `disk_failed`, refuses to go alone (SIGUSR1) or to resync the peer from its
//!   copy (SIGUSR2), fails every later change and fsync, and refuses to start
//!   writing again on that state;
//! - one side's filesystem is full: the writer gets ENOSPC, the two copies are
//!   equal again before that, the link stays up, nobody is recorded outdated.

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vmha_fs::status::{LinkCondition, LinkStatus, StatusFile, PEER_OUTDATED, SELF_OUTDATED};
use vmha_test_infra::aligned::AlignedBuf;
use vmha_test_infra::loopfs::LoopFs;
use vmha_test_infra::pair::{Pair, PairOptions};
use vmha_test_infra::proc::Child;

const LOOP_SIZE: u64 = 512 << 20;
const BLOCK: usize = 64 << 10;
const CHECKED_FILE: &str = "checked.img";
const CHECKED_SIZE: u64 = 32 << 20;

/// A block written: (slot, seed of its data).
type Block = (u64, u64);

fn link_state(state: &Path) -> Option<LinkCondition> {
    Some(LinkStatus::read_from(state).ok()??.state)
}

fn wait_link_state(state: &Path, want: LinkCondition, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let now = link_state(state);
        if now == Some(want) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("link.json never said {want:?} (last: {now:?})");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Data of the `i`-th acknowledged block of a writer.
fn block_data(seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK];
    StdRng::seed_from_u64(seed).fill(&mut v[..]);
    v
}

/// Writes seeded 64 KiB blocks with O_DIRECT at random slots of `path`,
/// fdatasync every 4, until an error or `stop`; returns (slot, seed) of every
/// write whose `write` returned the full length, and of the one that failed (its
/// range is undefined to the writer: either content may be there).
fn checking_writer(path: PathBuf, stop: Arc<AtomicBool>) -> (Vec<Block>, Option<Block>) {
    let mut acked = Vec::new();
    let Ok(f) = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
    else {
        return (acked, None);
    };
    let mut buf = AlignedBuf::zeroed(BLOCK);
    let slots = CHECKED_SIZE / BLOCK as u64;
    let mut rng = StdRng::seed_from_u64(42);
    for i in 0u64.. {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let slot = rng.random_range(0..slots);
        let seed = 1000 + i;
        buf[..].copy_from_slice(&block_data(seed));
        if f.write_all_at(&buf, slot * BLOCK as u64).is_err() {
            return (acked, Some((slot, seed)));
        }
        acked.push((slot, seed));
        if i % 4 == 3 && f.sync_data().is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    (acked, None)
}

fn create_file(path: &Path, size: u64) -> Result<()> {
    let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.set_len(size)?;
    f.sync_all()?;
    Ok(())
}

fn fio_load(file: &Path) -> Result<Child> {
    let mut c = Command::new("fio");
    c.arg("--name=load")
        .arg(format!("--filename={}", file.display()))
        .args([
            "--size=32M",
            "--rw=randwrite",
            "--bs=4k",
            "--direct=1",
            "--ioengine=psync",
            "--fsync=8",
            "--time_based",
            "--runtime=60",
        ]);
    Child::spawn("fio", c)
}

#[test]
fn primary_disk_failure_loses_nothing_and_never_blames_the_peer() -> Result<()> {
    let disk = LoopFs::new("pri-disk", LOOP_SIZE)?;
    let mut pair = Pair::start(PairOptions {
        primary_backing_in: Some(disk.path().to_path_buf()),
        ..PairOptions::default()
    })?;
    let checked = pair.mount().join(CHECKED_FILE);
    create_file(&checked, CHECKED_SIZE)?;
    let mut fio = fio_load(&pair.mount().join("fio.dat"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (path, stop) = (checked.clone(), stop.clone());
        std::thread::spawn(move || checking_writer(path, stop))
    };
    std::thread::sleep(Duration::from_secs(2));
    disk.shutdown()?;
    wait_link_state(
        pair.primary_state(),
        LinkCondition::DiskFailed,
        Duration::from_secs(10),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let (acked, failed) = writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))?;
    let _ = fio.kill();
    ensure!(
        acked.len() > 20,
        "the writer got only {} writes acknowledged before the failure",
        acked.len()
    );

    // Every acknowledged write is on the peer (the last write of a slot wins).
    let mut last = std::collections::HashMap::new();
    for (slot, seed) in &acked {
        last.insert(*slot, *seed);
    }
    let replica = std::fs::File::open(pair.secondary_backing().join(CHECKED_FILE))?;
    let mut buf = vec![0u8; BLOCK];
    let mut missing = Vec::new();
    for (slot, seed) in &last {
        replica.read_exact_at(&mut buf, slot * BLOCK as u64)?;
        let failed_here = failed.is_some_and(|(s, d)| s == *slot && buf == block_data(d));
        if buf != block_data(*seed) && !failed_here {
            let zero = buf.iter().all(|b| *b == 0);
            let other = acked
                .iter()
                .find(|(s, d)| s == slot && buf == block_data(*d));
            missing.push((*slot, *seed, zero, other.copied()));
        }
    }
    ensure!(
        missing.is_empty(),
        "{} of {} acknowledged blocks are not on the peer (slot, seed, zeros, older): {:?}; acked: {:?}",
        missing.len(),
        last.len(),
        missing,
        acked
    );

    // This node is the one behind; the peer is never recorded outdated.
    let state = pair.primary_state().to_path_buf();
    ensure!(
        !state.join(PEER_OUTDATED).exists(),
        "the node whose disk failed recorded the peer as outdated: {:?}",
        std::fs::read_to_string(state.join(PEER_OUTDATED))
    );
    let own = std::fs::read_to_string(state.join(SELF_OUTDATED))
        .context("the primary did not record itself as outdated")?;
    ensure!(own.contains("disk failed"), "self-outdated says {own:?}");

    // No change and no fsync succeeds any more, and it does not go alone.
    let pid = pair.primary_pid().context("no primary")?;
    vmha_test_infra::fsctl::signal(pid, libc::SIGUSR1)?;
    vmha_test_infra::fsctl::signal(pid, libc::SIGUSR2)?;
    std::thread::sleep(Duration::from_millis(500));
    // (Opening may already fail: the failed filesystem answers EIO to lookups.)
    if let Ok(f) = OpenOptions::new().write(true).open(&checked) {
        let write = f.write_all_at(&[1u8; 4096], 0);
        ensure!(write.is_err(), "a write succeeded after the disk failed");
        ensure!(
            f.sync_all().is_err(),
            "fsync succeeded after the disk failed"
        );
    }
    ensure!(
        std::fs::write(pair.mount().join("new-file"), b"x").is_err(),
        "a file was created after the disk failed"
    );
    ensure!(
        link_state(&state) == Some(LinkCondition::DiskFailed),
        "after SIGUSR1 link.json says {:?}",
        link_state(&state)
    );
    ensure!(!state.join(PEER_OUTDATED).exists());
    let log = pair.primary().context("no primary")?.stderr_text();
    ensure!(log.contains("SIGUSR1 refused"), "no refusal logged:\n{log}");
    ensure!(log.contains("SIGUSR2 refused"), "no refusal logged:\n{log}");

    // The peer's copy still has every acknowledged write (nothing was resynced
    // from the failed copy).
    for (slot, seed) in &last {
        replica.read_exact_at(&mut buf, slot * BLOCK as u64)?;
        let failed_here = failed.is_some_and(|(s, d)| s == *slot && buf == block_data(d));
        ensure!(
            buf == block_data(*seed) || failed_here,
            "block {slot} changed on the peer"
        );
    }

    // A new writer on that state is refused with a clear message.
    pair.kill_primary()?;
    pair.cleanup_mounts()?;
    let mut child = Child::spawn("primary-again", pair.primary_command())?;
    let status = child.wait_exit(Duration::from_secs(20))?;
    ensure!(
        !status.success(),
        "a primary started on a self-outdated copy"
    );
    ensure!(
        child.stderr_text().contains("not up to date"),
        "unclear refusal: {}",
        child.stderr_text()
    );
    Ok(())
}

/// Fills the filesystem at `dir` until less than `leave` bytes are free.
fn fill(dir: &Path, leave: u64) -> Result<()> {
    let st = rustix::fs::statvfs(dir)?;
    let free = st.f_bavail * st.f_frsize;
    let filler = dir.join("filler");
    let f = std::fs::File::create(&filler)?;
    let len = free.saturating_sub(leave);
    rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, len)?;
    f.sync_all()?;
    Ok(())
}

/// Writes 1 MiB blocks to a new file until an error; the error.
fn write_until_error(path: &Path, max: u64) -> Result<std::io::Error> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)?;
    let block = vec![0xa5u8; 1 << 20];
    for i in 0..max {
        if let Err(e) = f.write_all_at(&block, i << 20) {
            return Ok(e);
        }
    }
    bail!("{} MiB written without an error", max)
}

fn same_file(a: &Path, b: &Path) -> Result<()> {
    let (x, y) = (std::fs::read(a)?, std::fs::read(b)?);
    ensure!(
        x.len() == y.len(),
        "sizes differ: {} has {} bytes, {} has {}",
        a.display(),
        x.len(),
        b.display(),
        y.len()
    );
    let first = x.iter().zip(&y).position(|(p, q)| p != q);
    ensure!(first.is_none(), "contents differ from byte {first:?}");
    Ok(())
}

fn full_disk_on(primary_side: bool) -> Result<()> {
    let disk = LoopFs::new(
        if primary_side { "pri-full" } else { "sec-full" },
        320 << 20,
    )?;
    let mut opts = PairOptions::default();
    if primary_side {
        opts.primary_backing_in = Some(disk.path().to_path_buf());
    } else {
        opts.secondary_backing_in = Some(disk.path().to_path_buf());
    }
    let mut pair = Pair::start(opts)?;
    fill(disk.path(), 6 << 20)?;
    let file = pair.mount().join("big.img");
    let error = write_until_error(&file, 64)?;
    ensure!(
        error.raw_os_error() == Some(libc::ENOSPC),
        "the writer got {error} instead of ENOSPC"
    );
    // Copies equal, link up, nobody outdated.
    same_file(
        &pair.primary_backing().join("big.img"),
        &pair.secondary_backing().join("big.img"),
    )?;
    for state in [pair.primary_state(), pair.secondary_state()] {
        for marker in [PEER_OUTDATED, SELF_OUTDATED] {
            ensure!(
                !state.join(marker).exists(),
                "{marker} recorded after a full disk"
            );
        }
    }
    ensure!(
        link_state(pair.primary_state()) == Some(LinkCondition::Connected),
        "link is {:?} after a full disk",
        link_state(pair.primary_state())
    );
    // Space again: writing goes on, replicated.
    std::fs::remove_file(disk.path().join("filler"))?;
    let f = OpenOptions::new().write(true).open(&file)?;
    f.write_all_at(&[7u8; 1 << 20], 0)?;
    f.sync_all()?;
    drop(f);
    same_file(
        &pair.primary_backing().join("big.img"),
        &pair.secondary_backing().join("big.img"),
    )?;
    pair.stop()
}

#[test]
fn a_full_primary_disk_fails_the_write_with_enospc_and_keeps_the_copies_equal() -> Result<()> {
    full_disk_on(true)
}

#[test]
fn a_full_secondary_disk_fails_the_write_with_enospc_and_keeps_the_copies_equal() -> Result<()> {
    full_disk_on(false)
}
