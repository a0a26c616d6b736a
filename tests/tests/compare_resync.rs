//! The operator's repair of a copy changed behind vmha's back (`vmctl resync
//! --compare`, at the vmha-fs level): bytes of the receiver's replica are changed
//! underneath its read-only bind and a file is added there, where no record of
//! either node knows. An ordinary resync would trust the records and leave them;
//! a compare resync (`STATEDIR/compare-resync`, then SIGUSR1 and SIGUSR2) compares
//! every block while a writer keeps writing through the mount, repairs the
//! replica, and a verify afterwards finds no difference.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vmha_fs::status::COMPARE_RESYNC;
use vmha_test_infra::fsctl;
use vmha_test_infra::mounts::beneath_mounts;
use vmha_test_infra::{assert_same_tree, Pair, PairOptions};

const IMAGE: u64 = 8 << 20;

/// Changes the replica behind vmha's back: 4 KiB at 3 MiB of `disk.img` and a
/// new file. Returns the bytes written there.
fn tamper(pair: &Pair) -> Result<Vec<u8>> {
    let (guard, replica) = beneath_mounts(pair.secondary_backing(), &pair.root().join("beneath"))?;
    // Through the receiver's read-only bind the same write is refused.
    let refused = OpenOptions::new()
        .write(true)
        .open(pair.secondary_backing().join("disk.img"));
    if refused.is_ok() {
        bail!("the replica was writable through the receiver's bind");
    }
    let f = OpenOptions::new()
        .write(true)
        .open(replica.join("disk.img"))?;
    let junk = vec![0xA5u8; 4096];
    f.write_all_at(&junk, 3 << 20)?;
    f.sync_all()?;
    std::fs::write(replica.join("stray"), b"written behind vmha's back")?;
    drop(guard);
    Ok(junk)
}

/// Writes random blocks of `disk.img` through the mount until `stop`.
fn writer(pair: &Pair, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Result<u64>> {
    let mount = pair.mount().to_path_buf();
    std::thread::spawn(move || -> Result<u64> {
        let f = OpenOptions::new()
            .write(true)
            .open(mount.join("disk.img"))?;
        let mut rng = StdRng::seed_from_u64(5);
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let off = rng.random_range(0..IMAGE - 65536);
            let mut buf = vec![0u8; rng.random_range(1..65536)];
            rng.fill(&mut buf[..]);
            f.write_all_at(&buf, off)?;
            if n % 64 == 0 {
                f.sync_data()?;
            }
            n += 1;
        }
        Ok(n)
    })
}

#[test]
fn a_compare_resync_repairs_a_replica_changed_behind_vmhas_back_under_live_writes() -> Result<()> {
    let mut pair = Pair::start(PairOptions::default())?;
    let mut image = vec![0u8; IMAGE as usize];
    StdRng::seed_from_u64(3).fill(&mut image[..]);
    std::fs::write(pair.mount().join("disk.img"), &image)?;
    std::fs::write(pair.mount().join("vm.xml"), b"<domain/>")?;
    assert_same_tree(pair.primary_backing(), pair.secondary_backing())?;

    let state = pair.primary_state().to_path_buf();
    // One resync first: from then on both nodes' records are valid and complete,
    // so an ordinary resync is incremental and trusts them.
    let primary = pair.primary().ok_or_else(|| anyhow!("no primary"))?;
    fsctl::go_alone_and_wait(primary, &state)?;
    fsctl::attach_and_wait(primary, &state)?;

    let junk = tamper(&pair)?;
    let (backing, replica) = (
        pair.primary_backing().to_path_buf(),
        pair.secondary_backing().to_path_buf(),
    );
    let primary = pair.primary().ok_or_else(|| anyhow!("no primary"))?;
    let before = fsctl::verify(primary, &state)?;
    assert!(
        before.differing.iter().any(|d| d.path == "disk.img"),
        "verify missed the change behind vmha's back: {before:?}"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let writes = writer(&pair, stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    // The controller's steps: ask for a compare, go alone (the peer is recorded
    // outdated first), attach again.
    std::fs::write(
        state.join(COMPARE_RESYNC),
        b"test: replica changed behind vmha's back\n",
    )?;
    let primary = pair.primary().ok_or_else(|| anyhow!("no primary"))?;
    fsctl::go_alone_and_wait(primary, &state)?;
    let sync = fsctl::attach_and_wait(primary, &state)?;
    // Writes after the repair replicate as usual.
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let n = writes.join().map_err(|_| anyhow!("writer panicked"))??;
    assert!(n > 0, "no write during the repair");
    assert!(
        sync.done_bytes >= IMAGE,
        "a compare reads every block: {sync:?}"
    );
    let primary = pair.primary().ok_or_else(|| anyhow!("no primary"))?;
    assert!(
        !fsctl::last_sync_was_incremental(primary)?,
        "the resync trusted the records"
    );
    assert!(
        !state.join(COMPARE_RESYNC).exists(),
        "the compare request outlived the compare"
    );
    assert!(!state.join("peer-outdated").exists());

    let after = fsctl::verify(primary, &state)?;
    assert!(
        after.differing.is_empty(),
        "differences left after the repair: {:?}",
        after.differing
    );
    assert!(!replica.join("stray").exists());
    let got = std::fs::read(replica.join("disk.img"))?;
    assert_ne!(&got[3 << 20..(3 << 20) + 4096], &junk[..]);
    assert_same_tree(&backing, &replica)?;
    pair.stop()?;
    Ok(())
}
