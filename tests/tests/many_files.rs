//! A tree with more files than the writer's and the receiver's open-file limit
//! (issue 12 item 3): the first copy, a verify, a degraded run changing more files
//! than the limit and the reintegration after it all complete, with renames and
//! writes going on through the mount during the copy, and both trees end
//! identical. Before, each of these held one descriptor per file (the copy's and
//! the verify's ids on both nodes, the receiver's writeback list, the dirty-map
//! files of the records) and failed with EMFILE.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use vmha_test_infra::fsctl::{attach_and_wait, signal, stop, verify};
use vmha_test_infra::resync::ResyncSetup as Setup;
use vmha_test_infra::{assert_same_tree, lazy_unmount_all};

/// Open files both processes may hold (hard and soft limit).
const NOFILE: u64 = 2048;
/// Files in one directory (a directory listing is not a descriptor per entry)...
const FLAT: usize = 3000;
/// ...and spread over 20 more.
const SPREAD: usize = 2000;
/// Files changed through the mount while the peer is down. Each stays a node the
/// writer's kernel holds: a descriptor on the writer and up to two on the receiver
/// at reintegration, by design (with the churn's, well under the limit).
const CHANGED: usize = 500;

fn flat(i: usize) -> String {
    format!("flat/f{i:05}")
}

fn spread(i: usize) -> String {
    format!("tree/d{:02}/g{i:05}", i % 20)
}

fn content(i: usize, round: u32) -> Vec<u8> {
    format!("file {i} round {round}\n")
        .repeat(1 + i % 40)
        .into_bytes()
}

#[test]
fn full_copy_verify_and_reintegration_of_more_files_than_the_descriptor_limit() -> Result<()> {
    let started = Instant::now();
    let mut s = Setup::new()?;
    s.nofile = Some(NOFILE);
    let data = s.a.data.clone();
    std::fs::create_dir_all(data.join("flat"))?;
    for d in 0..20 {
        std::fs::create_dir_all(data.join(format!("tree/d{d:02}")))?;
    }
    for i in 0..FLAT {
        std::fs::write(data.join(flat(i)), content(i, 0))?;
    }
    for i in 0..SPREAD {
        std::fs::write(data.join(spread(i)), content(i, 0))?;
    }
    std::fs::hard_link(data.join(flat(1)), data.join("tree/link"))?;
    // The peer's stale copy: a file to replace, one to remove.
    std::fs::create_dir_all(s.b.data.join("flat"))?;
    std::fs::write(s.b.data.join(flat(2)), b"stale")?;
    std::fs::write(s.b.data.join("obsolete"), b"gone after the copy")?;

    let mut b = s.secondary(&s.b)?;
    let mut a = s.primary_alone(&s.a, &[])?;
    // Renames and writes through the mount while the copy runs: a file renamed
    // before its data is copied is found again.
    let stop_churn = Arc::new(AtomicBool::new(false));
    let churn = {
        let (mnt, stop_churn) = (s.a.mnt.clone(), stop_churn.clone());
        std::thread::spawn(move || -> Result<usize> {
            let mut n = 0;
            while !stop_churn.load(Ordering::SeqCst) && n < 150 {
                let i = (n * 7919) % FLAT;
                let from = mnt.join(flat(i));
                if from.exists() {
                    std::fs::rename(&from, mnt.join(format!("tree/d{:02}/moved{i}", n % 20)))?;
                }
                std::fs::write(mnt.join(spread(n % SPREAD)), content(n, 9))?;
                n += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(n)
        })
    };
    let at = Instant::now();
    let tx0 = s.link.host_tx_bytes()?;
    let status = attach_and_wait(&a, &s.a.state)?;
    let copy_tx = s.link.host_tx_bytes()? - tx0;
    stop_churn.store(true, Ordering::SeqCst);
    let churned = churn
        .join()
        .map_err(|_| anyhow::anyhow!("churn thread panicked"))??;
    eprintln!(
        "first copy of {} files: {:?}, {copy_tx} bytes sent, {status:?}; {churned} renames meanwhile",
        FLAT + SPREAD,
        at.elapsed()
    );
    let at = Instant::now();
    let clean = verify(&a, &s.a.state)?;
    eprintln!("verify: {:?}", at.elapsed());
    ensure!(clean.differing.is_empty(), "{clean:?}");

    // node2 goes down; node1 changes files through the mount (their dirty-map
    // files are no longer all kept open).
    b.kill()?;
    lazy_unmount_all(&s.b.data)?;
    signal(a.pid(), libc::SIGUSR1)?;
    std::thread::sleep(Duration::from_millis(300));
    let mut changed = 0u64;
    for i in 0..CHANGED {
        let c = content(i, 1);
        changed += c.len() as u64;
        std::fs::write(s.a.mnt.join(spread(i)), c)?;
    }
    let mut b = s.secondary(&s.b)?;
    let at = Instant::now();
    let tx0 = s.link.host_tx_bytes()?;
    let status = attach_and_wait(&a, &s.a.state)?;
    let tx = s.link.host_tx_bytes()? - tx0;
    eprintln!(
        "reintegration: {:?}, {tx} bytes sent, {status:?}; {changed} bytes changed",
        at.elapsed()
    );
    // By the records: the changed files travel, not everything again.
    ensure!(
        tx < copy_tx / 3,
        "not by the records: {tx} bytes sent (the first copy: {copy_tx}), {status:?}"
    );
    std::fs::write(s.a.mnt.join("after"), b"replicated")?;
    stop(&mut a)?;
    stop(&mut b)?;
    for (who, log) in [("writer", a.stderr_text()), ("receiver", b.stderr_text())] {
        for bad in ["Too many open files", "EMFILE"] {
            ensure!(!log.contains(bad), "{who}'s log says {bad:?}");
        }
    }
    assert_same_tree(&s.a.data, &s.b.data)?;
    ensure!(std::fs::read(s.b.data.join("after"))? == b"replicated");
    eprintln!("test took {:?}", started.elapsed());
    Ok(())
}
