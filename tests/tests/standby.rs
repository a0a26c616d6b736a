//! The vmha-fs side of a live swap: `vmha-fs primary --standby` mounted over
//! the SECOND's directory while its receiver still applies the PRIM's writes
//! (reads see them, every change is EROFS), then activated in place: SIGUSR2
//! into a connected writer (nothing copied), SIGUSR1 into an alone writer. And
//! the source's drain: a writer stopped by SIGTERM leaves every acknowledged
//! write applied and synced on the peer, whatever the protocol.
//!
//! Node A is the pair's primary (mounted over its directory) and node B the
//! pair's secondary; B's standby mount is over B's directory, with B's state
//! directory. The flip: A's writer stops (drained), B's receiver stops, A
//! starts as a receiver accepting a new generation, B is signalled.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use vmha_fs::status::{FsMetrics, GenerationId, LinkCondition, LinkStatus, StatusFile};
use vmha_test_infra::fsctl::{signal, stop};
use vmha_test_infra::pair::{free_port, READY_TIMEOUT};
use vmha_test_infra::{is_mount_point, Child, Pair, PairOptions};

const IMAGE: &str = "disk.img";
const MIB: usize = 1 << 20;
/// What B writes after the flip: a block, "written by B", "nested", "in a
/// held directory".
const NEW_BYTES: u64 = 4096 + 12 + 6 + 19;

/// Bytes unique to `salt` (and position).
fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt) ^ (i >> 12) as u8)
        .collect()
}

fn pair(protocol: Option<&'static str>) -> Result<Pair> {
    Pair::start(PairOptions {
        mount_over: true,
        protocol,
        ..PairOptions::default()
    })
}

/// `vmha-fs primary --standby` over B's directory (the pair's secondary's),
/// with B's state; its peer is A's future receiver at `peer_port`.
fn start_standby(p: &Pair, peer_port: u16, protocol: Option<&str>) -> Result<Child> {
    let mut c = Command::new(p.bin());
    c.arg("primary")
        .arg("--standby")
        .arg("--backing")
        .arg(p.secondary_backing())
        .arg("--mount")
        .arg(p.secondary_backing())
        .arg("--peer")
        .arg(format!("127.0.0.1:{peer_port}"))
        .arg("--state")
        .arg(p.secondary_state())
        .arg("--key-file")
        .arg(p.key_file())
        .arg("--lock-timeout-ms")
        .arg("3000");
    if let Some(protocol) = protocol {
        c.args(["--protocol", protocol]);
    }
    let mut child = Child::spawn("standby", c)?;
    child.wait_ready(READY_TIMEOUT)?;
    let top = vmha_fs::mounts::mounts_at(p.secondary_backing())?;
    ensure!(
        top.last().is_some_and(|t| t.starts_with("fuse")),
        "no FUSE mount on top of B's directory: {top:?}"
    );
    Ok(child)
}

/// A as a receiver (`vmha-fs secondary`) on its own directory, accepting only
/// `generation`.
fn start_receiver_a(p: &Pair, port: u16, generation: &str) -> Result<Child> {
    let mut c = Command::new(p.bin());
    c.arg("secondary")
        .arg("--backing")
        .arg(p.primary_backing())
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--state")
        .arg(p.primary_state())
        .arg("--key-file")
        .arg(p.key_file())
        .arg("--accept-generation")
        .arg(generation);
    let mut child = Child::spawn("receiver-a", c)?;
    child.wait_ready(READY_TIMEOUT)?;
    Ok(child)
}

/// Waits until B's `link.json` satisfies `ok`.
fn wait_link(state: &Path, what: &str, ok: impl Fn(&LinkStatus) -> bool) -> Result<LinkStatus> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let last = LinkStatus::read_from(state);
        if let Ok(Some(link)) = &last {
            if ok(link) {
                return Ok(link.clone());
            }
        }
        if Instant::now() > deadline {
            bail!("link.json never {what}; last: {last:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn write_generation(state: &Path, generation: &str) -> Result<()> {
    let id = GenerationId::try_from(generation)?;
    std::fs::write(state.join(vmha_fs::status::GENERATION), id.to_file())?;
    Ok(())
}

fn is_erofs<T: std::fmt::Debug>(what: &str, r: std::io::Result<T>) -> Result<()> {
    match r {
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => Ok(()),
        other => bail!("{what} in standby: expected EROFS, got {other:?}"),
    }
}

/// Every kind of change through the standby mount fails with EROFS; a
/// chmod/chown to what the file already is succeeds (libvirt relabels).
fn every_change_is_erofs(dir: &Path, rw: &File) -> Result<()> {
    let image = dir.join(IMAGE);
    let size = rw.metadata()?.len();
    is_erofs("pwrite", rw.write_at(b"x", 0))?;
    is_erofs("ftruncate", rw.set_len(size / 2))?;
    is_erofs(
        "fallocate",
        rustix::fs::fallocate(rw, rustix::fs::FallocateFlags::empty(), 0, size + 4096)
            .map_err(std::io::Error::from),
    )?;
    is_erofs("create", std::fs::write(dir.join("new"), b"new"))?;
    is_erofs(
        "open O_TRUNC",
        OpenOptions::new().write(true).truncate(true).open(&image),
    )?;
    is_erofs("mkdir", std::fs::create_dir(dir.join("newdir")))?;
    is_erofs("unlink", std::fs::remove_file(&image))?;
    is_erofs("rmdir", std::fs::remove_dir(dir.join("sub")))?;
    is_erofs("rename", std::fs::rename(&image, dir.join("moved")))?;
    is_erofs("link", std::fs::hard_link(&image, dir.join("hard")))?;
    is_erofs(
        "symlink",
        std::os::unix::fs::symlink(IMAGE, dir.join("sym")),
    )?;
    is_erofs(
        "setxattr",
        rustix::fs::setxattr(&image, "user.vmha", b"1", rustix::fs::XattrFlags::empty())
            .map_err(std::io::Error::from),
    )?;
    // libvirt's remembered owner: "not supported" in standby (libvirt then
    // skips remembering instead of failing the incoming migration).
    for r in [
        rustix::fs::setxattr(
            &image,
            "trusted.libvirt.security.ref_dac",
            b"2",
            rustix::fs::XattrFlags::empty(),
        ),
        rustix::fs::getxattr(&image, "trusted.libvirt.security.ref_dac", &mut [0u8; 16]).map(drop),
    ] {
        ensure!(
            r == Err(rustix::io::Errno::NOTSUP),
            "libvirt's label xattr in standby: {r:?}"
        );
    }
    let mode = std::fs::metadata(&image)?.permissions().mode() & 0o7777;
    is_erofs(
        "chmod to another mode",
        std::fs::set_permissions(&image, std::fs::Permissions::from_mode(mode ^ 0o040)),
    )?;
    // What changes nothing may succeed.
    std::fs::set_permissions(&image, std::fs::Permissions::from_mode(mode))
        .context("chmod to the same mode in standby")?;
    let meta = std::fs::metadata(&image)?;
    std::os::unix::fs::chown(
        &image,
        Some(std::os::unix::fs::MetadataExt::uid(&meta)),
        Some(std::os::unix::fs::MetadataExt::gid(&meta)),
    )
    .context("chown to the same owner in standby")?;
    Ok(())
}

/// The names and file contents of a directory, sorted (one level deep, plus `sub`).
fn listing(dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        let content = if e.file_type()?.is_file() {
            std::fs::read(e.path())?
        } else {
            Vec::new()
        };
        out.push((name, content));
    }
    out.sort();
    Ok(out)
}

/// Waits until someone holds `state`'s lock (the standby, once the receiver
/// exited).
fn wait_state_locked(state: &Path) -> Result<()> {
    let lock = OpenOptions::new()
        .write(true)
        .open(state.join(vmha_fs::status::LOCK))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Err(rustix::io::Errno::WOULDBLOCK) => return Ok(()),
            Ok(()) => {
                rustix::fs::flock(&lock, rustix::fs::FlockOperation::Unlock)?;
            }
            Err(e) => bail!("flock: {e}"),
        }
        ensure!(
            Instant::now() < deadline,
            "nobody holds {} after the receiver exited",
            state.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn metrics(state: &Path) -> Result<FsMetrics> {
    FsMetrics::read_from(state)?.context("no metrics.json")
}

#[test]
fn standby_mount_serves_the_receivers_copy_refuses_changes_and_flips_in_place() -> Result<()> {
    let mut p = pair(None)?;
    let a = p.mount().to_path_buf();
    let b = p.secondary_backing().to_path_buf();
    // A writes: an image and a directory, replicated to B's receiver.
    let first = pattern(2 * MIB, 1);
    std::fs::write(a.join(IMAGE), &first)?;
    std::fs::create_dir(a.join("sub"))?;
    std::fs::write(a.join("sub/f"), b"in sub")?;
    // What libvirt remembers on the writer (a real xattr there).
    rustix::fs::setxattr(
        a.join(IMAGE),
        "trusted.libvirt.security.ref_dac",
        b"1",
        rustix::fs::XattrFlags::empty(),
    )?;
    let a_port = free_port()?;
    let mut standby = start_standby(&p, a_port, None)?;
    let link = LinkStatus::read_from(p.secondary_state())?.context("no link.json in standby")?;
    ensure!(
        link.standby && link.state == LinkCondition::Standby && link.activation.is_none(),
        "{link:?}"
    );
    // The receiver's copy, through the standby mount.
    ensure!(
        std::fs::read(b.join(IMAGE))? == first,
        "standby read differs"
    );
    ensure!(std::fs::read(b.join("sub/f"))? == b"in sub");
    // The destination QEMU's open: read-write, O_DIRECT.
    let rw = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(b.join(IMAGE))
        .context("O_RDWR|O_DIRECT open in standby")?;
    // A appends: B sees the new size and bytes at once (no stale cache).
    let more = pattern(MIB, 2);
    {
        let f = OpenOptions::new().append(true).open(a.join(IMAGE))?;
        use std::io::Write;
        (&f).write_all(&more)?;
    }
    ensure!(
        std::fs::metadata(b.join(IMAGE))?.len() == (3 * MIB) as u64,
        "the size A grew is not visible through the standby mount"
    );
    ensure!(
        rw.metadata()?.len() == (3 * MIB) as u64,
        "fstat of the standby fd is stale"
    );
    let mut aligned = vmha_test_infra::AlignedBuf::zeroed(MIB);
    let n = rw.read_at(aligned.as_mut_slice(), (2 * MIB) as u64)?;
    ensure!(
        n == MIB && &aligned[..] == more.as_slice(),
        "O_DIRECT read of the appended part"
    );
    ensure!(std::fs::read(b.join(IMAGE))?[2 * MIB..] == more[..]);
    // A overwrites in place: the standby descriptor reads the new bytes.
    let over = pattern(8192, 6);
    OpenOptions::new()
        .write(true)
        .open(a.join(IMAGE))?
        .write_all_at(&over, 0)?;
    let n = rw.read_at(aligned.as_mut_slice(), 0)?;
    ensure!(
        n == MIB && aligned[..8192] == over[..],
        "stale data through the standby fd"
    );
    // The receiver works through its own directory descriptor: the mount over
    // the directory does not disturb A's namespace changes reaching B.
    std::fs::create_dir(a.join("d2"))?;
    std::fs::write(a.join("d2/x"), b"x")?;
    std::fs::rename(a.join("d2/x"), a.join("d2/y"))?;
    std::os::unix::fs::symlink("y", a.join("d2/sym"))?;
    std::fs::hard_link(a.join("d2/y"), a.join("d2/hard"))?;
    std::fs::write(a.join("gone"), b"soon")?;
    std::fs::remove_file(a.join("gone"))?;
    ensure!(
        !b.join("gone").exists(),
        "a name removed on A is still seen through B"
    );
    vmha_test_infra::assert_same_tree(&a, &b)?;
    // A nested file held open from standby (its directory bound first).
    let nested = OpenOptions::new()
        .read(true)
        .write(true)
        .open(b.join("d2/y"))?;
    // Every change fails and changes nothing.
    let before = listing(&b)?;
    every_change_is_erofs(&b, &rw)?;
    ensure!(listing(&b)? == before, "a refused change changed B's copy");
    ensure!(listing(&b)? == listing(&a)?, "B's copy differs from A's");
    // Standby wrote nothing the receiver owns.
    for name in ["generation", "peer-outdated", "metrics.json", "sync.json"] {
        ensure!(
            !p.secondary_state().join(name).exists(),
            "standby wrote {name}"
        );
    }

    // The flip. A's writer stops (drained), then B's receiver.
    let pri = p.primary().context("no primary")?;
    stop(pri)?;
    ensure!(
        pri.stderr_text().contains("drained"),
        "A's writer did not confirm the drain"
    );
    let sec = p.secondary().context("no secondary")?;
    stop(sec)?;
    // The receiver's exit left the standby mount alone, and the standby
    // holds the state directory from then on (nobody may clean it up).
    ensure!(
        vmha_fs::mounts::is_fuse_mounted(&b)?,
        "stopping B's receiver unmounted the standby mount"
    );
    wait_state_locked(p.secondary_state())?;
    let _receiver_a = start_receiver_a(&p, a_port, "2")?;
    write_generation(p.secondary_state(), "2")?;
    signal(standby.pid(), libc::SIGUSR2)?;
    let link = wait_link(p.secondary_state(), "connected", |l| {
        l.state == LinkCondition::Connected
    })?;
    ensure!(!link.standby && link.activation.is_none(), "{link:?}");
    // The descriptor opened in standby now writes, and A receives it.
    let block = vmha_test_infra::AlignedBuf::copy_from(&pattern(4096, 3));
    rw.write_at(&block, 4096)
        .context("write through the fd opened in standby")?;
    rw.sync_all()?;
    std::fs::write(b.join("after"), b"written by B")?;
    nested.write_all_at(b"nested", 0)?;
    nested.sync_all()?;
    drop(nested);
    std::fs::write(b.join("d2/new"), b"in a held directory")?;
    let on_a = std::fs::read(p.primary_backing().join(IMAGE))?;
    ensure!(
        on_a[4096..8192] == pattern(4096, 3)[..],
        "B's write did not arrive on A"
    );
    ensure!(std::fs::read(p.primary_backing().join("after"))? == b"written by B");
    ensure!(std::fs::read(p.primary_backing().join("d2/y"))? == b"nested");
    ensure!(std::fs::read(p.primary_backing().join("d2/hard"))? == b"nested");
    ensure!(std::fs::read(p.primary_backing().join("d2/new"))? == b"in a held directory");
    // No resync: only the writes since the activation went to A.
    let deadline = Instant::now() + Duration::from_secs(10);
    let m = loop {
        let m = metrics(p.secondary_state());
        if let Ok(m) = &m {
            if m.replicated_bytes >= NEW_BYTES {
                break m.clone();
            }
        }
        ensure!(Instant::now() < deadline, "metrics.json: {m:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    ensure!(
        m.replicated_bytes == NEW_BYTES,
        "more than the new writes travelled: {m:?}"
    );
    ensure!(
        !p.secondary_state().join("sync.json").exists()
            && !standby.stderr_text().contains("sync done"),
        "a resync ran"
    );
    drop(rw);
    stop(&mut standby)?;
    ensure!(!is_mount_point(&b)? || !vmha_fs::mounts::is_fuse_mounted(&b)?);
    Ok(())
}

#[test]
fn standby_activation_that_fails_stays_standby_and_sigusr1_writes_alone() -> Result<()> {
    let mut p = pair(None)?;
    let b = p.secondary_backing().to_path_buf();
    std::fs::write(p.mount().join(IMAGE), pattern(MIB, 4))?;
    // Nobody listens there.
    let unreachable = free_port()?;
    let mut standby = start_standby(&p, unreachable, None)?;
    let rw = OpenOptions::new()
        .read(true)
        .write(true)
        .open(b.join(IMAGE))?;
    // While B's receiver runs, it owns the state directory: refused.
    signal(standby.pid(), libc::SIGUSR2)?;
    let link = wait_link(p.secondary_state(), "a failed activation", |l| {
        l.activation.is_some()
    })?;
    ensure!(link.standby, "{link:?}");
    is_erofs("pwrite", rw.write_at(b"x", 0))?;
    let _ = std::fs::remove_file(p.secondary_state().join(LinkStatus::FILE));
    // The receiver stops; the peer is unreachable.
    stop(p.primary().context("no primary")?)?;
    stop(p.secondary().context("no secondary")?)?;
    write_generation(p.secondary_state(), "3")?;
    signal(standby.pid(), libc::SIGUSR2)?;
    let link = wait_link(p.secondary_state(), "a failed activation", |l| {
        l.activation.is_some()
    })?;
    ensure!(
        link.standby && link.state == LinkCondition::Standby,
        "{link:?}"
    );
    let reason = link.activation.unwrap_or_default();
    ensure!(reason.starts_with("failed: "), "{reason}");
    ensure!(
        standby.stderr_text().contains("activation failed"),
        "no log line for the failed activation"
    );
    is_erofs("pwrite after a failed activation", rw.write_at(b"x", 0))?;
    // A receiver there that serves another generation refuses us (fencing).
    let _receiver_a = start_receiver_a(&p, unreachable, "5")?;
    let _ = std::fs::remove_file(p.secondary_state().join(LinkStatus::FILE));
    signal(standby.pid(), libc::SIGUSR2)?;
    let link = wait_link(p.secondary_state(), "a refused activation", |l| {
        l.activation.is_some()
    })?;
    ensure!(link.standby, "{link:?}");
    let reason = link.activation.unwrap_or_default();
    ensure!(
        reason.starts_with("failed: ") && reason.contains("generation"),
        "{reason}"
    );
    is_erofs("pwrite after a refused activation", rw.write_at(b"x", 0))?;
    ensure!(
        !p.secondary_state().join("peer-outdated").exists(),
        "a failed activation recorded the peer outdated"
    );
    // SIGUSR1: write alone, the peer recorded outdated first.
    signal(standby.pid(), libc::SIGUSR1)?;
    let link = wait_link(p.secondary_state(), "degraded", |l| {
        l.state == LinkCondition::Degraded
    })?;
    ensure!(!link.standby, "{link:?}");
    ensure!(p.secondary_state().join("peer-outdated").exists());
    rw.write_at(b"alone", 0)
        .context("write through the fd opened in standby, alone")?;
    rw.sync_all()?;
    ensure!(&std::fs::read(b.join(IMAGE))?[..5] == b"alone");
    drop(rw);
    stop(&mut standby)?;
    Ok(())
}

#[test]
fn standby_sigterm_unmounts_writes_nothing_and_gives_the_receiver_its_protection_back() -> Result<()>
{
    let mut p = pair(None)?;
    let b = p.secondary_backing().to_path_buf();
    std::fs::write(p.mount().join(IMAGE), pattern(MIB, 5))?;
    let before: Vec<_> = std::fs::read_dir(p.secondary_state())?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()?;
    let mut standby = start_standby(&p, free_port()?, None)?;
    stop(&mut standby)?;
    ensure!(
        !vmha_fs::mounts::is_fuse_mounted(&b)?,
        "the standby mount stayed"
    );
    let mut after: Vec<_> = std::fs::read_dir(p.secondary_state())?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()?;
    after.retain(|n| n != LinkStatus::FILE);
    let mut before = before;
    before.sort();
    after.sort();
    ensure!(before == after, "standby wrote {after:?} (had {before:?})");
    // The receiver goes on, read-only for everyone else again.
    match std::fs::write(b.join("intruder"), b"x") {
        Err(e) if e.kind() == ErrorKind::ReadOnlyFilesystem => {}
        other => bail!("B's directory is writable after the standby left: {other:?}"),
    }
    std::fs::write(p.mount().join("later"), b"still replicated")?;
    ensure!(std::fs::read(b.join("later"))? == b"still replicated");
    p.stop()?;
    ensure!(
        !is_mount_point(&b)?,
        "the receiver left a mount at {}",
        b.display()
    );
    Ok(())
}

/// Protocol flush: writes acknowledged when queued, no fsync, then the flip:
/// the source's clean exit drains them all to B before it ends.
#[test]
fn standby_flip_after_protocol_flush_writes_without_fsync_loses_nothing() -> Result<()> {
    flip_after_writes_without_fsync("flush")
}

/// Protocol B: writes acknowledged when received.
#[test]
fn standby_flip_after_protocol_b_writes_without_fsync_loses_nothing() -> Result<()> {
    flip_after_writes_without_fsync("B")
}

fn flip_after_writes_without_fsync(protocol: &'static str) -> Result<()> {
    let mut p = pair(Some(protocol))?;
    let a = p.mount().to_path_buf();
    let b = p.secondary_backing().to_path_buf();
    let a_port = free_port()?;
    let mut standby = start_standby(&p, a_port, Some(protocol))?;
    let mut expected = Vec::new();
    {
        let f = File::create(a.join(IMAGE))?;
        for i in 0..64u8 {
            let chunk = pattern(MIB / 2, i);
            f.write_at(&chunk, expected.len() as u64)?;
            expected.extend_from_slice(&chunk);
        }
        // No fsync, no close-to-open wait: SIGTERM right away.
    }
    let pri = p.primary().context("no primary")?;
    stop(pri)?;
    ensure!(
        pri.stderr_text().contains("drained"),
        "A's writer did not confirm the drain: {}",
        pri.stderr_text()
    );
    stop(p.secondary().context("no secondary")?)?;
    ensure!(
        std::fs::read(b.join(IMAGE))? == expected,
        "B lacks writes A acknowledged"
    );
    let _receiver_a = start_receiver_a(&p, a_port, "4")?;
    write_generation(p.secondary_state(), "4")?;
    signal(standby.pid(), libc::SIGUSR2)?;
    wait_link(p.secondary_state(), "connected", |l| {
        l.state == LinkCondition::Connected
    })
    .with_context(|| standby.stderr_text())?;
    std::fs::write(b.join("after"), protocol)?;
    File::open(b.join("after"))?.sync_all()?;
    ensure!(std::fs::read(p.primary_backing().join("after"))? == protocol.as_bytes());
    ensure!(std::fs::read(p.primary_backing().join(IMAGE))? == expected);
    stop(&mut standby)?;
    Ok(())
}

/// `--standby` needs `--peer` and excludes `--alone`: a clear one-line error,
/// a non-zero exit, nothing mounted.
#[test]
fn standby_flags_that_contradict_are_refused() -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("vmha-standby-cli-")
        .tempdir_in("/var/tmp")?;
    let data = dir.path().join("data");
    std::fs::create_dir(&data)?;
    let bin = vmha_test_infra::vmha_fs_bin()?;
    vmha_test_infra::pair::keygen(&bin, &dir.path().join("key"))?;
    let base = |mount: &Path, extra: &[&str]| {
        let mut c = Command::new(&bin);
        c.arg("primary")
            .arg("--standby")
            .arg("--backing")
            .arg(&data)
            .arg("--mount")
            .arg(mount)
            .arg("--state")
            .arg(dir.path().join("state"))
            .arg("--key-file")
            .arg(dir.path().join("key"))
            .args(extra)
            .env("RUST_BACKTRACE", "0");
        c
    };
    for (what, extra, word) in [
        ("without --peer", &[][..], "--peer"),
        (
            "with --alone",
            &["--alone", "--peer", "127.0.0.1:9"][..],
            "--alone",
        ),
    ] {
        let out = base(&data, extra).output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            matches!(out.status.code(), Some(c) if c != 0 && c != 101),
            "--standby {what}: {:?}",
            out.status
        );
        ensure!(err.contains(word), "--standby {what}: {err}");
        ensure!(
            !is_mount_point(&data)?,
            "--standby {what} mounted something"
        );
    }
    // Mounted elsewhere than over the receiver's directory: refused.
    let elsewhere = dir.path().join("mnt");
    std::fs::create_dir(&elsewhere)?;
    let out = base(&elsewhere, &["--peer", "127.0.0.1:9"]).output()?;
    ensure!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("--mount must equal --backing"),
        "--standby mounted elsewhere: {out:?}"
    );
    ensure!(!is_mount_point(&elsewhere)?);
    ensure!(
        !dir.path().join("state").exists(),
        "a refused start created the state directory"
    );
    Ok(())
}

/// The receiver stops while the standby mount is there, and the mount is then
/// stopped without activation: no read-only bind is left behind (a receiver
/// started next opens the directory, not a stale bind), and a receiver is
/// refused while the standby mount covers the directory.
#[test]
fn standby_stopped_after_its_receiver_leaves_the_directory_to_the_next_receiver() -> Result<()> {
    let mut p = pair(None)?;
    let b = p.secondary_backing().to_path_buf();
    std::fs::write(p.mount().join(IMAGE), pattern(MIB, 7))?;
    let mut standby = start_standby(&p, free_port()?, None)?;
    stop(p.secondary().context("no secondary")?)?;
    // A receiver under the standby mount would open the mount: refused.
    let out = p.secondary_command().output()?;
    ensure!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("already mounted"),
        "a receiver started under the standby mount: {out:?}"
    );
    stop(&mut standby)?;
    ensure!(
        !is_mount_point(&b)?,
        "something is left mounted at {}",
        b.display()
    );
    // The node's receiver comes back (a swap aborted): it receives and its
    // directory is read-only for everyone else.
    let mut again = Child::spawn("secondary-again", p.secondary_command())?;
    again.wait_ready(READY_TIMEOUT)?;
    match std::fs::write(b.join("intruder"), b"x") {
        Err(e) if e.kind() == ErrorKind::ReadOnlyFilesystem => {}
        other => bail!("B's directory is writable under its receiver: {other:?}"),
    }
    stop(&mut again)?;
    ensure!(!is_mount_point(&b)?, "the receiver left its bind");
    Ok(())
}
