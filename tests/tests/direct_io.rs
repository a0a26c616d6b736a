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
