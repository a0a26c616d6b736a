//! Writing without the peer once the controller has declared it dead (SIGUSR1 to a
//! running primary, or `--alone` at start): mutations go on locally, and the peer is
//! durably recorded as outdated before any of them is acknowledged.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use vmha_test_infra::proc::Child;
use vmha_test_infra::{Pair, PairOptions};

const LOCK_TIMEOUT_MS: u64 = 8000;

#[test]
fn sigusr1_lets_a_waiting_write_proceed_alone() -> Result<()> {
    let mut pair = Pair::start(PairOptions {
        lock_timeout_ms: LOCK_TIMEOUT_MS,
        ..PairOptions::default()
    })?;
    let path = pair.mount().join("disk.img");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    f.write_all_at(&[1u8; 8192], 0)?;
    f.sync_all()?;
    let marker = pair.primary_state().join("peer-outdated");
    assert!(!marker.exists(), "peer marked outdated while connected");

    pair.kill_secondary()?;
    let (tx, rx) = mpsc::channel();
    let writer = f.try_clone()?;
    std::thread::spawn(move || {
        let t0 = Instant::now();
        let r = writer
            .write_all_at(&[2u8; 4096], 4096)
            .and_then(|()| writer.sync_all());
        let _ = tx.send((r, t0.elapsed()));
    });
    // The write waits for the dead peer...
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        rx.try_recv().is_err(),
        "write returned while the peer was silent"
    );
    // ...until the controller declares the peer dead.
    let pid = pair.primary_pid().ok_or_else(|| anyhow!("no primary"))?;
    // SAFETY: signalling a child process we started, by PID.
    if unsafe { libc::kill(pid as libc::pid_t, libc::SIGUSR1) } != 0 {
        bail!("kill -USR1 {pid}: {}", std::io::Error::last_os_error());
    }
    let (result, took) = rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| anyhow!("write did not complete after SIGUSR1"))?;
    result?;
    assert!(
        took < Duration::from_millis(LOCK_TIMEOUT_MS),
        "write took {took:?}: it waited out the lock timeout instead of going on alone"
    );
    assert!(marker.exists(), "peer not recorded as outdated");
    // Later mutations go on alone too.
    f.write_all_at(&[3u8; 4096], 8192)?;
    f.sync_all()?;
    std::fs::write(pair.mount().join("new"), b"alone")?;
    let mut content = vec![0u8; 12288];
    OpenOptions::new()
        .read(true)
        .open(pair.primary_backing().join("disk.img"))?
        .read_exact_at(&mut content, 0)?;
    assert!(content[..4096].iter().all(|&b| b == 1));
    assert!(content[4096..8192].iter().all(|&b| b == 2));
    assert!(content[8192..].iter().all(|&b| b == 3));
    assert_eq!(std::fs::read(pair.primary_backing().join("new"))?, b"alone");
    Ok(())
}

#[test]
fn a_primary_started_alone_records_the_peer_outdated_before_writing() -> Result<()> {
    let pair = Pair::prepare(PairOptions::default())?;
    let cmd = pair.alone_primary_command();
    // Declared after `pair`: dropped (killed) first, then the pair unmounts.
    let mut primary = Child::spawn("primary-alone", cmd)?;
    primary.wait_ready(Duration::from_secs(20))?;
    let marker = pair.primary_state().join("peer-outdated");
    assert!(marker.exists(), "no outdated record before the first write");
    std::fs::write(pair.mount().join("f"), b"data")?;
    assert_eq!(std::fs::read(pair.primary_backing().join("f"))?, b"data");
    let (status, _) = primary.terminate(Duration::from_secs(15))?;
    assert!(status.success(), "primary exited with {status}");
    Ok(())
}
