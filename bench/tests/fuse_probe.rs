//! vmha-fuse-probe serves its backing directory correctly over both
//! transports: buffered and O_DIRECT writes, fsync, read-back through the
//! mount equal to the backing file, listing, unlink, and a clean exit on
//! SIGTERM with the mount gone; over io_uring the traffic really goes through
//! the ring (the probe's exit line counts requests per transport).
//!
//! Needs root (mount(2)) and /dev/fuse. The io_uring test switches the fuse
//! module's `enable_uring` on for its run (and back); it is skipped, with the
//! reason printed, only on a kernel without FUSE over io_uring.

use anyhow::{bail, ensure, Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::process::Command;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;
use vmha_test_infra::aligned::AlignedBuf;
use vmha_test_infra::fuse_uring::{self, EnableUring};
use vmha_test_infra::mounts::{mounts_at, MountGuard};
use vmha_test_infra::proc::{Child, SpawnOptions};

const PROBE: &str = env!("CARGO_BIN_EXE_vmha-fuse-probe");

/// The io_uring tests flip and read one kernel-wide switch: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// A deterministic, position-dependent pattern (a misplaced block shows).
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[i % 4] ^ seed)
        .collect()
}

fn read_all(path: &Path) -> Result<Vec<u8>> {
    let mut v = Vec::new();
    File::open(path)
        .with_context(|| format!("open {}", path.display()))?
        .read_to_end(&mut v)?;
    Ok(v)
}

/// `name` holds `expect` read back through the mount and in the backing
/// directory.
fn expect_file(mnt: &Path, backing: &Path, name: &str, expect: &[u8]) -> Result<()> {
    ensure!(
        read_all(&mnt.join(name))? == expect,
        "{name} read back differs"
    );
    ensure!(
        read_all(&backing.join(name))? == expect,
        "{name} in the backing directory differs from what was written"
    );
    Ok(())
}

/// Mounts the probe with `args`, exercises the mount, stops it; returns the
/// probe's exit line with the request counts.
fn round_trip(args: &[&str]) -> Result<String> {
    // Not a tmpfs: the backing files take O_DIRECT, as on the benchmark disk.
    let dir = tempfile::Builder::new()
        .prefix("vmha-fuse-probe-test.")
        .tempdir_in("/var/tmp")?;
    let (backing, mnt) = (dir.path().join("backing"), dir.path().join("mnt"));
    std::fs::create_dir_all(&backing)?;
    std::fs::create_dir_all(&mnt)?;
    let _unmount = MountGuard::new(mnt.clone());
    let mut cmd = Command::new(PROBE);
    cmd.arg("--backing")
        .arg(&backing)
        .arg("--mount")
        .arg(&mnt)
        .args(args);
    let opts = SpawnOptions::new()
        .log_file(dir.path().join("probe.log"))
        .kill_wait(Duration::from_secs(10))
        .stop_on_drop(Duration::from_secs(15));
    let mut probe = Child::spawn_with("vmha-fuse-probe", cmd, opts)?;
    probe.wait_ready(Duration::from_secs(60))?;
    ensure!(
        mounts_at(&mnt)?
            .iter()
            .any(|m| m.fs_type.starts_with("fuse")),
        "no FUSE mount at {}",
        mnt.display()
    );

    // Buffered: create, write 3 MiB + a tail, fsync, read back.
    let a = pattern((3 << 20) + 123, 1);
    {
        let mut f = File::create(mnt.join("a.dat"))?;
        f.write_all(&a)?;
        f.sync_all()?;
    }
    expect_file(&mnt, &backing, "a.dat", &a)?;

    // O_DIRECT: aligned 1 MiB and 4 KiB writes at offsets, fdatasync, and
    // an O_DIRECT read back; then an unaligned buffered overwrite.
    let mut expect = vec![0u8; 3 << 20];
    {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(mnt.join("b.dat"))?;
        f.set_len(3 << 20)?;
        for (off, len, seed) in [(1usize << 20, 1usize << 20, 7u8), (4096 * 5, 4096, 9)] {
            let data = pattern(len, seed);
            let buf = AlignedBuf::copy_from(&data);
            f.write_all_at(&buf, off as u64)?;
            expect[off..off + len].copy_from_slice(&data);
        }
        f.sync_data()?;
        let mut back = AlignedBuf::zeroed(3 << 20);
        f.read_exact_at(&mut back, 0)?;
        ensure!(
            back[..] == expect[..],
            "O_DIRECT read back of b.dat differs"
        );
    }
    {
        let mut f = OpenOptions::new().write(true).open(mnt.join("b.dat"))?;
        f.seek(SeekFrom::Start(1000))?;
        f.write_all(b"unaligned")?;
        f.sync_all()?;
        expect[1000..1009].copy_from_slice(b"unaligned");
    }
    expect_file(&mnt, &backing, "b.dat", &expect)?;

    // Listing and unlink go through too.
    let mut names: Vec<String> = std::fs::read_dir(&mnt)?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    names.sort();
    ensure!(names == ["a.dat", "b.dat"], "listing: {names:?}");
    std::fs::remove_file(mnt.join("a.dat"))?;
    ensure!(
        !backing.join("a.dat").exists(),
        "unlink did not reach the backing dir"
    );
    ensure!(
        std::fs::metadata(mnt.join("a.dat")).is_err(),
        "a.dat still visible after unlink"
    );

    let (status, killed) = probe.terminate(Duration::from_secs(15))?;
    ensure!(
        !killed && status.success(),
        "probe did not exit cleanly on SIGTERM ({status}, killed: {killed}):\n{}",
        probe.log_tail(20)
    );
    ensure!(mounts_at(&mnt)?.is_empty(), "mount left behind after exit");
    let text = probe.stderr_text();
    match text.lines().find(|l| l.contains("requests over /dev/fuse")) {
        Some(line) => Ok(line.to_owned()),
        None => bail!("no request count line in the probe's output:\n{text}"),
    }
}

/// `N` from "... served A requests over /dev/fuse, B over io_uring" (0 = A, 1 = B).
fn count(line: &str, which: usize) -> Result<u64> {
    let nums: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    nums.get(which)
        .copied()
        .with_context(|| format!("no counts in {line:?}"))
}

#[test]
fn dev_transport_round_trip() -> Result<()> {
    let line = round_trip(&["--transport", "dev", "--threads", "4"])?;
    ensure!(count(&line, 0)? > 0, "no requests over /dev/fuse: {line}");
    ensure!(count(&line, 1)? == 0, "ring used without io_uring: {line}");
    Ok(())
}

#[test]
fn uring_transport_round_trip() -> Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    if !fuse_uring::available() {
        eprintln!(
            "SKIP uring_transport_round_trip: this kernel has no FUSE over io_uring ({} missing)",
            fuse_uring::ENABLE_URING
        );
        return Ok(());
    }
    let _on = EnableUring::new()?;
    for extra in [&[][..], &["--sync-io"][..]] {
        let mut args = vec!["--transport", "uring", "--queue-depth", "4"];
        args.extend_from_slice(extra);
        let line = round_trip(&args)?;
        // INIT (and forgets) come over /dev/fuse; everything else over the ring.
        ensure!(
            count(&line, 1)? > 10,
            "too few requests over io_uring: {line}"
        );
    }
    Ok(())
}

#[test]
fn uring_refused_is_a_clear_error() -> Result<()> {
    // With the switch off the probe must fail, not fall back to /dev/fuse.
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    if !fuse_uring::available() {
        eprintln!("SKIP uring_refused_is_a_clear_error: no FUSE over io_uring in this kernel");
        return Ok(());
    }
    if std::fs::read_to_string(fuse_uring::ENABLE_URING)?.trim() == "Y" {
        eprintln!("SKIP uring_refused_is_a_clear_error: enable_uring is on (another run uses it)");
        return Ok(());
    }
    let dir = tempfile::tempdir_in("/var/tmp")?;
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&mnt)?;
    let _unmount = MountGuard::new(mnt.clone());
    let mut cmd = Command::new(PROBE);
    cmd.arg("--backing")
        .arg(dir.path())
        .arg("--mount")
        .arg(&mnt)
        .args(["--transport", "uring"]);
    let opts = SpawnOptions::new()
        .kill_wait(Duration::from_secs(10))
        .stop_on_drop(Duration::from_secs(5));
    let mut probe = Child::spawn_with("vmha-fuse-probe", cmd, opts)?;
    let status = probe.wait_exit(Duration::from_secs(30))?;
    let err = probe.stderr_text();
    ensure!(!status.success(), "probe ran without io_uring:\n{err}");
    ensure!(
        err.contains("io_uring refused") && err.contains("enable_uring"),
        "unclear error: {err}"
    );
    ensure!(mounts_at(&mnt)?.is_empty(), "mount left behind");
    Ok(())
}
