//! Standalone, a lost secondary makes writes fail with EIO within the lock timeout,
//! and nothing acknowledged before the loss is missing from the secondary.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use vmha_test_infra::fsops::errno_name;
use vmha_test_infra::{Pair, PairOptions};

const LOCK_TIMEOUT_MS: u64 = 1500;
/// Correctness bound for the failing operation (not a benchmark).
const BOUND: Duration = Duration::from_millis(LOCK_TIMEOUT_MS + 1000);

/// Runs write + fsync on `f` in a thread; returns the outcome and how long it took
/// until the first error (or both succeeded). Gives up after 30 s.
fn timed_write_fsync(f: &File, off: u64) -> Result<(std::io::Result<()>, Duration)> {
    let f = f.try_clone()?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let buf = vec![0x5a; 65536];
        let t0 = Instant::now();
        let r = f.write_all_at(&buf, off).and_then(|()| f.sync_all());
        let _ = tx.send((r, t0.elapsed()));
    });
    rx.recv_timeout(Duration::from_secs(30))
        .map_err(|_| anyhow!("write+fsync after the peer loss did not return within 30 s"))
}

#[test]
fn writes_fail_with_eio_within_lock_timeout() -> Result<()> {
    let mut pair = Pair::start(PairOptions {
        lock_timeout_ms: LOCK_TIMEOUT_MS,
        ..PairOptions::default()
    })?;
    let mut rng = StdRng::seed_from_u64(3);
    let mut synced = vec![0u8; 3 << 20];
    rng.fill_bytes(&mut synced);
    let mut acked = vec![0u8; 300_000];
    rng.fill_bytes(&mut acked);

    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(pair.mount().join("synced"))?;
    for (i, chunk) in synced.chunks(1 << 20).enumerate() {
        f.write_all_at(chunk, (i as u64) << 20)?;
    }
    f.sync_all().context("fsync before the kill")?;
    // Acknowledged but never fsynced: still must be on the peer (its page cache).
    std::fs::write(pair.mount().join("acked"), &acked)?;
    std::fs::create_dir(pair.mount().join("dir"))?;
    std::os::unix::fs::symlink("synced", pair.mount().join("link"))?;

    pair.kill_secondary()?;

    let (res, took) = timed_write_fsync(&f, 1 << 20)?;
    match &res {
        Ok(()) => bail!("write+fsync succeeded {took:?} after the secondary was killed"),
        Err(e) if e.raw_os_error() == Some(libc::EIO) => {}
        Err(e) => bail!(
            "write+fsync failed with {} ({e}), expected EIO",
            errno_name(e.raw_os_error().unwrap_or(0))
        ),
    }
    eprintln!("first failing write+fsync took {took:?}");
    if took > BOUND {
        bail!("the failing write+fsync took {took:?}, bound {BOUND:?}");
    }
    // No silent acknowledgement later either.
    let (res2, took2) = timed_write_fsync(&f, 2 << 20)?;
    if res2.is_ok() {
        bail!("a second write+fsync succeeded {took2:?} after the peer loss");
    }
    if took2 > BOUND {
        bail!("the second failing write+fsync took {took2:?}, bound {BOUND:?}");
    }

    let sec = pair.secondary_backing();
    let got = std::fs::read(sec.join("synced")).context("synced file on the secondary")?;
    // The failing writes may or may not have reached the secondary before it died,
    // but they were never acknowledged: compare everything outside them.
    if got.len() != synced.len() {
        bail!(
            "secondary 'synced' has {} bytes, expected {}",
            got.len(),
            synced.len()
        );
    }
    let outside = |v: &[u8]| -> Vec<u8> {
        let mut v = v.to_vec();
        for off in [1usize << 20, 2 << 20] {
            v[off..off + 65536].fill(0);
        }
        v
    };
    if outside(&got) != outside(&synced) {
        bail!("fsynced data missing or wrong on the secondary");
    }
    let got = std::fs::read(sec.join("acked")).context("acked file on the secondary")?;
    if got != acked {
        bail!("acknowledged (not fsynced) write missing on the secondary");
    }
    if !sec.join("dir").is_dir() {
        bail!("acknowledged mkdir missing on the secondary");
    }
    if std::fs::read_link(sec.join("link"))? != std::path::Path::new("synced") {
        bail!("acknowledged symlink wrong on the secondary");
    }
    Ok(())
}

/// A frozen secondary (SIGSTOP: no RST, the connection stays open) makes a write
/// fail with EIO once nothing has been acknowledged for the lock timeout.
#[test]
fn frozen_secondary_fails_writes_within_lock_timeout() -> Result<()> {
    let mut pair = Pair::start(PairOptions {
        lock_timeout_ms: LOCK_TIMEOUT_MS,
        ..PairOptions::default()
    })?;
    let f = synced_file(&pair, b"before the freeze")?;
    pair.secondary()
        .ok_or_else(|| anyhow!("no secondary"))?
        .send_signal(libc::SIGSTOP)?;

    let took = expect_eio_within_bound(&f, 4096, "frozen secondary")?;
    if took < Duration::from_millis(LOCK_TIMEOUT_MS) {
        bail!("EIO after {took:?}: before the lock timeout of {LOCK_TIMEOUT_MS} ms");
    }
    pair.secondary()
        .ok_or_else(|| anyhow!("no secondary"))?
        .send_signal(libc::SIGCONT)?;
    let got = std::fs::read(pair.secondary_backing().join("f"))?;
    if !got.starts_with(b"before the freeze") {
        bail!(
            "acknowledged data missing on the secondary: {:?}",
            &got[..got.len().min(32)]
        );
    }
    Ok(())
}

/// `f` under the mount, holding `content`, fsynced (on both nodes).
fn synced_file(pair: &Pair, content: &[u8]) -> Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(pair.mount().join("f"))?;
    f.write_all_at(content, 0)?;
    f.sync_all()?;
    Ok(f)
}

fn signal_secondary(pair: &Pair, sig: libc::c_int) -> Result<()> {
    let pid = pair
        .secondary_pid()
        .ok_or_else(|| anyhow!("no secondary"))?;
    vmha_test_infra::fsctl::signal(pid, sig)
}

/// Write + fsync against a frozen secondary must fail with EIO within [`BOUND`].
fn expect_eio_within_bound(f: &File, off: u64, when: &str) -> Result<Duration> {
    let (res, took) = timed_write_fsync(f, off)?;
    eprintln!("{when}: write+fsync: {res:?} after {took:?}");
    match &res {
        Ok(()) => bail!("{when}: write+fsync succeeded while the secondary was frozen"),
        Err(e) if e.raw_os_error() == Some(libc::EIO) => {}
        Err(e) => bail!(
            "{when}: write+fsync failed with {} ({e}), expected EIO",
            errno_name(e.raw_os_error().unwrap_or(0))
        ),
    }
    if took > BOUND {
        bail!("{when}: the failing write+fsync took {took:?}, bound {BOUND:?}");
    }
    Ok(took)
}

/// The link's timers (ping, watchdog) survive a failure: a link that failed, went
/// alone (SIGUSR1) and took the peer back (SIGUSR2) still fails writes within the
/// lock timeout when the peer freezes again (they used to end with the first
/// failure, and such a write then waited forever).
#[test]
fn a_link_that_stalls_after_a_reattach_still_fails_writes_within_lock_timeout() -> Result<()> {
    let mut pair = Pair::start(PairOptions {
        lock_timeout_ms: LOCK_TIMEOUT_MS,
        ..PairOptions::default()
    })?;
    let f = synced_file(&pair, b"first")?;
    signal_secondary(&pair, libc::SIGSTOP)?;
    expect_eio_within_bound(&f, 4096, "first freeze")?;
    // The controller decides a while after the failure (the link's timers look
    // every 50 ms).
    std::thread::sleep(Duration::from_millis(500));
    let primary_pid = pair.primary_pid().ok_or_else(|| anyhow!("no primary"))?;
    vmha_test_infra::fsctl::signal(primary_pid, libc::SIGUSR1)?;
    std::thread::sleep(Duration::from_millis(300));
    f.write_all_at(b"alone", 8192)
        .context("a write after SIGUSR1 (alone)")?;
    signal_secondary(&pair, libc::SIGCONT)?;
    std::thread::sleep(Duration::from_millis(500));
    let state = pair.primary_state().to_path_buf();
    let primary = pair.primary().ok_or_else(|| anyhow!("no primary"))?;
    vmha_test_infra::fsctl::attach_and_wait(primary, &state)?;
    f.write_all_at(b"replicated again", 12288)?;
    f.sync_all()?;
    signal_secondary(&pair, libc::SIGSTOP)?;
    expect_eio_within_bound(&f, 16384, "freeze after the re-attach")?;
    signal_secondary(&pair, libc::SIGCONT)?;
    Ok(())
}
