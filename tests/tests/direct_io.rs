//! O_DIRECT through the mount (QEMU cache=none): aligned writes and reads of
//! several sizes, fdatasync, and the data on the secondary.

use std::os::unix::fs::FileExt;

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use vmha_test_infra::fsops::open_direct;
use vmha_test_infra::{assert_same_tree, AlignedBuf, Pair, PairOptions};

#[test]
fn direct_io_write_read_fdatasync() -> Result<()> {
    let pair = Pair::start(PairOptions::default())?;
    let path = pair.mount().join("disk.raw");
    let f = open_direct(&path, true).context("open O_DIRECT|O_CREAT through the mount")?;
    let mut rng = StdRng::seed_from_u64(9);
    // (offset, length): 4 KiB, 64 KiB and 1 MiB requests, some beyond EOF.
    let layout: [(u64, usize); 5] = [
        (0, 4096),
        (8192, 65536),
        (1 << 20, 1 << 20),
        (4 << 20, 4096),
        (65536, 4096),
    ];
    let mut expected = vec![0u8; 4 << 20 | 4096];
    for &(off, len) in &layout {
        let mut buf = AlignedBuf::zeroed(len);
        rng.fill_bytes(&mut buf);
        f.write_all_at(&buf, off)
            .with_context(|| format!("O_DIRECT write of {len} at {off}"))?;
        expected[off as usize..off as usize + len].copy_from_slice(&buf);
    }
    f.sync_data().context("fdatasync")?;

    // Read back through the same O_DIRECT descriptor and through a fresh one.
    let g = open_direct(&path, false).context("second O_DIRECT open")?;
    for file in [&f, &g] {
        for &(off, len) in &layout {
            let mut buf = AlignedBuf::zeroed(len);
            file.read_exact_at(&mut buf, off)
                .with_context(|| format!("O_DIRECT read of {len} at {off}"))?;
            if buf[..] != expected[off as usize..off as usize + len] {
                bail!("O_DIRECT read at {off} ({len} bytes) differs from what was written");
            }
        }
    }
    let size = f.metadata()?.len();
    if size != expected.len() as u64 {
        bail!("size {size}, expected {}", expected.len());
    }
    drop((f, g));

    let sec = std::fs::read(pair.secondary_backing().join("disk.raw"))?;
    if sec != expected {
        bail!(
            "secondary copy differs from what was written ({} bytes)",
            sec.len()
        );
    }
    assert_same_tree(pair.primary_backing(), pair.secondary_backing())?;
    Ok(())
}

/// An O_DIRECT read into an unaligned buffer is the caller's error (EINVAL), not a
/// hang or a crash of the filesystem, and the mount keeps working.
#[test]
fn direct_io_survives_unaligned_request() -> Result<()> {
    let pair = Pair::start(PairOptions::default())?;
    let path = pair.mount().join("x");
    let f = open_direct(&path, true)?;
    let buf = AlignedBuf::filled(8192, 7);
    f.write_all_at(&buf, 0)?;
    // Whatever the outcome of an unaligned write (FUSE may accept it), it must
    // return, and afterwards aligned I/O and replication still work.
    let _ = f.write_at(&buf[1..4097], 1);
    let mut back = AlignedBuf::zeroed(8192);
    f.read_exact_at(&mut back, 0)?;
    f.sync_all()?;
    let sec = std::fs::read(pair.secondary_backing().join("x"))?;
    if sec[..] != back[..] {
        bail!("secondary differs from the primary's view after an unaligned write");
    }
    Ok(())
}

/// 16 MiB of scattered 4 KiB O_DIRECT writes through the mount, no fsync; the
/// data as written.
fn scattered_writes(path: &std::path::Path) -> Result<Vec<u8>> {
    let f = open_direct(path, true).context("open O_DIRECT|O_CREAT through the mount")?;
    let blocks = 4096u64;
    let mut expected = vec![0u8; (blocks * 4096) as usize];
    let mut rng = StdRng::seed_from_u64(11);
    for i in 0..blocks {
        // A permutation of the blocks (7919 is prime to 4096).
        let off = (i * 7919 % blocks) * 4096;
        let mut buf = AlignedBuf::zeroed(4096);
        rng.fill_bytes(&mut buf);
        f.write_all_at(&buf, off)
            .with_context(|| format!("O_DIRECT write at {off}"))?;
        expected[off as usize..off as usize + 4096].copy_from_slice(&buf);
    }
    Ok(expected)
}

/// The writer's copy takes a guest's O_DIRECT writes through its page cache
/// (`--local-writes cached`, the default) and starts their writeback at once:
/// with no fsync, the backing file has no dirty page left within seconds
/// (left to the kernel they would stay dirty for `dirty_expire_centisecs`,
/// 30 s). Once written out, the pages leave the cache on both copies: a
/// `cache='none'` guest's data does not fill the hosts' page cache (nor slow
/// later small writes down, see `writeback`). The data reads back the same
/// through the mount and from the backing files. With `--local-writes direct`
/// nothing of it is in the writer's page cache at any time.
#[test]
fn cached_local_writes_are_written_out_and_dropped_without_an_fsync() -> Result<()> {
    use vmha_fs::writeback::cachestat;
    for (mode, cached) in [(None, true), (Some("direct"), false)] {
        let pair = Pair::start(PairOptions {
            local_writes: mode,
            ..PairOptions::default()
        })?;
        let path = pair.mount().join("disk.raw");
        let expected = scattered_writes(&path)?;
        let metrics = pair.wait_metrics("the writes", |m| m.replicated_ops >= 4096)?;
        match (cached, metrics.cached_writes) {
            (true, n) if n < 4096 => {
                bail!("cached: {n} of 4096 writes went through the page cache")
            }
            (false, n) if n > 0 => bail!("direct: {n} writes went through the page cache"),
            _ => {}
        }
        let backing = std::fs::File::open(pair.primary_backing().join("disk.raw"))?;
        let replica = std::fs::File::open(pair.secondary_backing().join("disk.raw"))?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let (here, there) = (cachestat(&backing)?, cachestat(&replica)?);
            // Whatever is left in the cache is clean, and (cached) only a few
            // pages the kernel was still writing when they were dropped.
            let written_out = here.nr_dirty + here.nr_writeback == 0;
            let dropped = here.nr_cache <= 64 && there.nr_cache <= 64;
            if !cached && here.nr_cache + here.nr_evicted != 0 {
                bail!("direct: the writes went through the page cache: {here:?}");
            }
            if written_out && (dropped || !cached) {
                break;
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "{mode:?}: 5 s after the writes the backing files' pages are not \
                     written out and dropped: writer {here:?}, replica {there:?}"
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let through_mount = open_direct(&path, false)?;
        let mut buf = AlignedBuf::zeroed(expected.len());
        through_mount.read_exact_at(&mut buf, 0)?;
        if buf[..] != expected[..] {
            bail!("{mode:?}: the mount reads back other data than written");
        }
        if std::fs::read(pair.primary_backing().join("disk.raw"))? != expected {
            bail!("{mode:?}: the backing file holds other data than written");
        }
        if std::fs::read(pair.secondary_backing().join("disk.raw"))? != expected {
            bail!("{mode:?}: the replica holds other data than written");
        }
    }
    Ok(())
}
