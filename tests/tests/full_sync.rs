//! A primary writing alone takes its peer back (SIGUSR2): the receiver's stale
//! directory is replaced by a full copy made while writes go on through the mount,
//! and both trees end identical; after that every change replicates again.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vmha_fs::status::{StatusFile, SyncPhase, SyncStatus};
use vmha_test_infra::fsctl::signal;
use vmha_test_infra::proc::Child;
use vmha_test_infra::{assert_same_tree, Pair, PairOptions};

fn sync_state(pair: &Pair) -> Option<SyncStatus> {
    SyncStatus::read_from(pair.primary_state()).ok()?
}

#[test]
fn a_peer_attached_to_a_lone_writer_gets_a_full_copy_under_live_writes() -> Result<()> {
    let mut pair = Pair::prepare(PairOptions::default())?;
    let data = pair.primary_backing().to_path_buf();
    // What the node wrote alone: a tree with every kind of entry.
    std::fs::create_dir_all(data.join("vm1/snapshots"))?;
    let mut rng = StdRng::seed_from_u64(7);
    let mut image = vec![0u8; 6 << 20];
    rng.fill(&mut image[..]);
    std::fs::write(data.join("vm1/disk.img"), &image)?;
    let sparse = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(data.join("vm1/sparse.img"))?;
    sparse.set_len(64 << 20)?;
    sparse.write_all_at(&[7u8; 8192], 32 << 20)?;
    std::fs::write(data.join("vm1/vm1.xml"), b"<domain/>")?;
    std::fs::hard_link(
        data.join("vm1/vm1.xml"),
        data.join("vm1/snapshots/link.xml"),
    )?;
    std::os::unix::fs::symlink("disk.img", data.join("vm1/current"))?;
    std::fs::set_permissions(
        data.join("vm1/vm1.xml"),
        std::os::unix::fs::PermissionsExt::from_mode(0o640),
    )?;
    // The peer's stale copy: wrong content, and files that must disappear.
    let stale = pair.secondary_backing().to_path_buf();
    std::fs::create_dir_all(stale.join("vm1"))?;
    std::fs::write(stale.join("vm1/disk.img"), b"old")?;
    std::fs::write(stale.join("obsolete"), b"gone after the sync")?;
    pair.start_secondary()?;

    let cmd = pair.alone_primary_command();
    let mut primary = Child::spawn("primary-alone", cmd)?;
    primary.wait_ready(Duration::from_secs(20))?;
    assert!(pair.primary_state().join("peer-outdated").exists());

    // Live writes through the mount for the whole sync.
    let stop = Arc::new(AtomicBool::new(false));
    let mount = pair.mount().to_path_buf();
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || -> Result<u64> {
            let f = OpenOptions::new()
                .write(true)
                .open(mount.join("vm1/disk.img"))?;
            let mut rng = StdRng::seed_from_u64(11);
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let off = rng.random_range(0..(8u64 << 20));
                let mut buf = vec![0u8; rng.random_range(1..65536)];
                rng.fill(&mut buf[..]);
                f.write_all_at(&buf, off)?;
                if n % 50 == 0 {
                    std::fs::write(mount.join(format!("vm1/new-{n}")), n.to_le_bytes())?;
                    f.sync_data()?;
                }
                n += 1;
            }
            Ok(n)
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    signal(primary.pid(), libc::SIGUSR2)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match sync_state(&pair) {
            Some(s) if s.state == SyncPhase::InSync => break,
            Some(s) if s.state == SyncPhase::Alone => bail!("sync failed: {s:?}"),
            _ => {}
        }
        if Instant::now() > deadline {
            bail!("no sync after 120 s: {:?}", sync_state(&pair));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Keep writing a little after the sync: those writes replicate normally.
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let writes = writer.join().map_err(|_| anyhow!("writer panicked"))??;
    assert!(writes > 0);
    std::fs::write(pair.mount().join("after"), b"replicated")?;

    assert!(
        !pair.primary_state().join("peer-outdated").exists(),
        "peer still recorded as outdated after the sync"
    );
    assert!(
        !stale.join("obsolete").exists(),
        "stale file survived the sync"
    );
    assert_same_tree(pair.primary_backing(), pair.secondary_backing())?;
    let (status, _) = primary.terminate(Duration::from_secs(15))?;
    assert!(status.success());
    Ok(())
}
