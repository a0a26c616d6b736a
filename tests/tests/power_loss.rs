//! Power loss, not only a kill (issue: degraded mode and resync; design, "Testing on
//! one machine"). Each node keeps its backing directory and its state directory on
//! an XFS of its own on a loop device; a power cut is `xfs_io -x -c shutdown` (no log
//! flush) before the kill, then an unmount and a mount: what the node had only in
//! its page cache is gone.
//!
//! - The helper really loses what was not synced (else the tests below prove little).
//! - The primary loses power under writes: every write that an fsync acknowledged is
//!   on the survivor; the dead node's activity log survived and names every region
//!   where its copy now differs; the survivor takes over, the old primary returns as
//!   its receiver and an incremental resync (bounded by the activity log) makes both
//!   copies identical.
//! - The secondary loses power under writes: it keeps what an fsync acknowledged
//!   before the cut; the primary goes on alone, its records name every block where
//!   the copies differ (what the secondary lost included), the secondary returns, an
//!   incremental resync (with writes going on) makes both identical, and every
//!   acknowledged write is on both.
//! - A primary writing alone loses power: its dirty maps survive and name every
//!   difference; it comes back and resyncs the peer incrementally.
//! - A writer loses power right after, or in the middle of, a resync of what it
//!   wrote alone without fsync: no difference between the copies is left that no
//!   record names (the resync makes the writer's own copy durable before it forgets
//!   the records of what the peer lacked).

use std::fs::{File, OpenOptions};
use std::net::SocketAddr;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use vmha_fs::status::{FsMetrics, StatusFile, SyncPhase, SyncStatus};
use vmha_test_infra::fsctl::{attach_and_wait, last_sync_was_incremental, signal, stop};
use vmha_test_infra::hostlink::HostLink;
use vmha_test_infra::pair::{free_port, keygen, READY_TIMEOUT};
use vmha_test_infra::{assert_same_tree, lazy_unmount_all, vmha_fs_bin, AlignedBuf, Child, LoopFs};

/// Size of each node's XFS (sparse).
const FS_SIZE: u64 = 1 << 30;
const IMAGE: u64 = 256 << 20;
const SLOT: u64 = 16 << 10;
/// Activity-log size of the primaries: a crashed primary resends at most this × 4 MiB.
const AL_EXTENTS: u64 = 8;
const EXTENT: u64 = 4 << 20;
/// Writes between two fdatasync calls of a writer.
const SYNC_EVERY: usize = 4;
/// Pause of a writer between two writes (2 cores, other tests).
const PACE: Duration = Duration::from_millis(4);
/// Extents the writes before a power cut touch (fewer than `AL_EXTENTS`).
const HOT_EXTENTS: usize = 6;
const IMG: &str = "vm1/disk.img";
/// A second file: writes to it without fsync are not flushed by the fsyncs of the
/// image's writers, so a power cut loses them unless a checkpoint synced them.
const LOG: &str = "vm1/log.img";
/// The files compared block by block.
const FILES: [&str; 2] = [IMG, LOG];

/// One node: an XFS holding `data/` and `state/`, and a FUSE mount point outside it.
struct Node {
    fs: LoopFs,
    mnt: PathBuf,
}

impl Node {
    fn new(root: &Path, name: &str) -> Result<Node> {
        let fs = LoopFs::new(name, FS_SIZE)?;
        let mnt = root.join(name).join("mnt");
        std::fs::create_dir_all(&mnt)?;
        let n = Node { fs, mnt };
        std::fs::create_dir(n.data())?;
        std::fs::create_dir(n.state())?;
        Ok(n)
    }

    fn data(&self) -> PathBuf {
        self.fs.path().join("data")
    }

    fn state(&self) -> PathBuf {
        self.fs.path().join("state")
    }

    fn image(&self) -> PathBuf {
        self.data().join(IMG)
    }

    fn log(&self) -> PathBuf {
        self.data().join(LOG)
    }

    /// The power cut and the return of power, once the node's processes are dead:
    /// what they left mounted goes, the XFS is unmounted and mounted again.
    fn power_cycle(&mut self) -> Result<()> {
        lazy_unmount_all(&self.mnt)?;
        // A killed secondary leaves its read-only bind over the backing dir.
        lazy_unmount_all(&self.data())?;
        self.fs.power_cycle()
    }
}

struct Setup {
    bin: PathBuf,
    key: PathBuf,
    link: HostLink,
    port: u16,
    a: Node,
    b: Node,
    root: tempfile::TempDir,
}

impl Setup {
    fn new() -> Result<Setup> {
        let bin = vmha_fs_bin()?;
        let root = tempfile::Builder::new()
            .prefix("vmha-powerloss-")
            .tempdir_in("/var/tmp")?;
        let key = root.path().join("cluster.key");
        keygen(&bin, &key)?;
        Ok(Setup {
            a: Node::new(root.path(), "a")?,
            b: Node::new(root.path(), "b")?,
            link: HostLink::new()?,
            port: free_port()?,
            bin,
            key,
            root,
        })
    }

    /// Where the secondary listens (inside the namespace), whichever node it is.
    fn peer(&self) -> SocketAddr {
        SocketAddr::new(self.link.ns_addr.into(), self.port)
    }

    fn secondary(&self, n: &Node) -> Result<Child> {
        let mut c = self.link.command(&self.bin);
        c.arg("secondary")
            .arg("--backing")
            .arg(n.data())
            .arg("--listen")
            .arg(self.peer().to_string())
            .arg("--state")
            .arg(n.state())
            .arg("--key-file")
            .arg(&self.key);
        let mut child = Child::spawn("secondary", c)?;
        child.wait_ready(READY_TIMEOUT)?;
        Ok(child)
    }

    fn primary_alone(&self, n: &Node) -> Result<Child> {
        self.primary_alone_with(n, "C")
    }

    /// `--protocol` = `protocol` (C, B or flush).
    fn primary_alone_with(&self, n: &Node, protocol: &str) -> Result<Child> {
        let mut c = Command::new(&self.bin);
        c.arg("primary")
            .arg("--backing")
            .arg(n.data())
            .arg("--mount")
            .arg(&n.mnt)
            .arg("--alone")
            .arg("--peer")
            .arg(self.peer().to_string())
            .arg("--state")
            .arg(n.state())
            .arg("--key-file")
            .arg(&self.key)
            .arg("--lock-timeout-ms")
            .arg("3000")
            .arg("--al-extents")
            .arg(AL_EXTENTS.to_string())
            .args(["--protocol", protocol]);
        let mut child = Child::spawn("primary", c)?;
        child.wait_ready(READY_TIMEOUT)?;
        Ok(child)
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        // The processes are gone by now (declared later, dropped first): remove what
        // they left mounted before the filesystems go.
        for d in [&self.a.mnt, &self.b.mnt] {
            if let Err(e) = lazy_unmount_all(d) {
                eprintln!("cleanup {}: {e:#}", d.display());
            }
        }
        for d in [self.a.data(), self.b.data()] {
            if let Err(e) = lazy_unmount_all(&d) {
                eprintln!("cleanup {}: {e:#}", d.display());
            }
        }
    }
}

/// The image (every 4 KiB block distinct) and a few small files, synced.
fn fill(data: &Path) -> Result<()> {
    std::fs::create_dir_all(data.join("vm1"))?;
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(data.join(IMG))?;
    let mut buf = vec![0u8; 8 << 20];
    StdRng::seed_from_u64(1).fill(&mut buf[..]);
    let mut off = 0;
    while off < IMAGE {
        for (i, block) in buf.chunks_mut(4096).enumerate() {
            block[..8].copy_from_slice(&(off + i as u64 * 4096).to_le_bytes());
        }
        f.write_all_at(&buf, off)?;
        off += buf.len() as u64;
    }
    f.sync_all()?;
    let mut log = vec![0u8; EXTENT as usize];
    StdRng::seed_from_u64(2).fill(&mut log[..]);
    std::fs::write(data.join(LOG), &log)?;
    File::open(data.join(LOG))?.sync_all()?;
    std::fs::write(data.join("vm1/vm1.xml"), b"<domain type='kvm'/>")?;
    File::open(data.join("vm1"))?.sync_all()?;
    Ok(())
}

/// What one writer saw acknowledged, as (slot, seed) pairs.
#[derive(Debug, Default)]
struct Acked {
    /// write() returned the full length.
    written: Vec<(u64, u64)>,
    /// ...and a later fdatasync on the same descriptor returned 0.
    synced: Vec<(u64, u64)>,
    /// When that fdatasync returned, for each of `synced`.
    synced_at: Vec<Instant>,
    errors: usize,
}

impl Acked {
    /// The writes whose fdatasync returned before `t`.
    fn synced_before(&self, t: Instant) -> Vec<(u64, u64)> {
        self.synced
            .iter()
            .zip(&self.synced_at)
            .filter(|(_, at)| **at < t)
            .map(|(w, _)| *w)
            .collect()
    }
}

/// How one writer writes.
#[derive(Debug, Clone, Copy)]
struct Kind {
    direct: bool,
    /// fdatasync after this many writes; never if `None`.
    sync_every: Option<usize>,
    /// Sleep `PACE` between the write and its fdatasync.
    pause_before_sync: bool,
}

/// Buffered and O_DIRECT writers that fdatasync every `SYNC_EVERY` writes.
/// Two of them fdatasync after every write (a database's commit): those writes
/// are synced early on both nodes (`presync`), one of them with a pause before
/// its fdatasync, so the receiver's early sync is done and said before it comes
/// and the fdatasync skips the round trip.
const SYNCING: [Kind; 4] = [
    Kind {
        direct: false,
        sync_every: Some(SYNC_EVERY),
        pause_before_sync: false,
    },
    Kind {
        direct: true,
        sync_every: Some(1),
        pause_before_sync: true,
    },
    Kind {
        direct: false,
        sync_every: Some(1),
        pause_before_sync: false,
    },
    Kind {
        direct: true,
        sync_every: Some(SYNC_EVERY),
        pause_before_sync: false,
    },
];
/// ...plus a buffered writer that never syncs: a power cut loses its recent writes
/// on the node that had them only in its page cache.
const WITH_UNSYNCED: [Kind; 5] = [
    SYNCING[0],
    SYNCING[1],
    SYNCING[2],
    SYNCING[3],
    Kind {
        direct: false,
        sync_every: None,
        pause_before_sync: false,
    },
];

/// Writes fresh data to each of `slots` in turn, pausing `PACE` between writes,
/// until `stop` or the slots run out. On an error: stops, or (`keep_going`) counts
/// it and goes on with the next slot.
fn writer(
    path: PathBuf,
    slots: Vec<u64>,
    seed: u64,
    kind: Kind,
    keep_going: bool,
    stop: Arc<AtomicBool>,
) -> Acked {
    let mut acked = Acked::default();
    let mut opts = OpenOptions::new();
    opts.write(true);
    if kind.direct {
        opts.custom_flags(libc::O_DIRECT);
    }
    let mut buf = AlignedBuf::zeroed(SLOT as usize);
    let Ok(f) = opts.open(&path) else {
        acked.errors += 1;
        return acked;
    };
    let mut unsynced = Vec::new();
    for (i, slot) in slots.into_iter().enumerate() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let block_seed = seed * 1_000_000 + i as u64;
        StdRng::seed_from_u64(block_seed).fill(&mut buf[..]);
        match f.write_all_at(&buf, slot * SLOT) {
            Ok(()) => {
                acked.written.push((slot, block_seed));
                unsynced.push((slot, block_seed));
            }
            Err(_) => {
                acked.errors += 1;
                // Whatever the fsync below says, this write was not acknowledged.
                if !keep_going {
                    break;
                }
            }
        }
        if kind.sync_every.is_some_and(|n| (i + 1) % n == 0) {
            if kind.pause_before_sync {
                std::thread::sleep(PACE);
            }
            match f.sync_data() {
                Ok(()) => {
                    let now = Instant::now();
                    acked.synced_at.extend(unsynced.iter().map(|_| now));
                    acked.synced.append(&mut unsynced);
                }
                Err(_) => {
                    acked.errors += 1;
                    unsynced.clear();
                    if !keep_going {
                        break;
                    }
                }
            }
        }
        std::thread::sleep(PACE);
    }
    acked
}

/// Writer threads over disjoint parts of `slots` of the image under a mount.
struct Writers {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Acked>>,
}

impl Writers {
    fn start(mnt: &Path, slots: &[u64], seed: u64, kinds: &[Kind], keep_going: bool) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = slots
            .chunks(slots.len().div_ceil(kinds.len()))
            .zip(kinds)
            .enumerate()
            .map(|(i, (chunk, &kind))| {
                let (path, chunk, stop) = (mnt.join(IMG), chunk.to_vec(), stop.clone());
                let seed = seed * 10 + i as u64;
                std::thread::spawn(move || writer(path, chunk, seed, kind, keep_going, stop))
            })
            .collect();
        Writers { stop, threads }
    }

    /// Stops the writers and collects what they saw acknowledged.
    fn finish(self) -> Result<Acked> {
        self.stop.store(true, Ordering::SeqCst);
        self.join()
    }

    /// Waits until the writers ran out of slots (or failed).
    fn join(self) -> Result<Acked> {
        let mut all = Acked::default();
        for t in self.threads {
            let a = t.join().map_err(|_| anyhow!("writer panicked"))?;
            all.written.extend(a.written);
            all.synced.extend(a.synced);
            all.synced_at.extend(a.synced_at);
            all.errors += a.errors;
        }
        Ok(all)
    }
}

/// Every slot in random order.
fn shuffled_slots(seed: u64) -> Vec<u64> {
    let mut slots: Vec<u64> = (0..IMAGE / SLOT).collect();
    slots.shuffle(&mut StdRng::seed_from_u64(seed));
    slots
}

/// The slots of `n` random activity-log extents, in random order (writes with
/// locality, as a VM's: the log does not overflow, checkpoints come only every few
/// seconds, so a power cut finds unsynced data in the page cache).
fn hot_slots(seed: u64, n: usize) -> Vec<u64> {
    let mut extents: Vec<u64> = (0..IMAGE / EXTENT).collect();
    let mut rng = StdRng::seed_from_u64(seed);
    extents.shuffle(&mut rng);
    let per = EXTENT / SLOT;
    let mut slots: Vec<u64> = extents[..n]
        .iter()
        .flat_map(|e| e * per..(e + 1) * per)
        .collect();
    slots.shuffle(&mut rng);
    slots
}

/// How many of `writes` are not in `image` (as they were written).
fn count_missing(image: &Path, writes: &[(u64, u64)]) -> Result<usize> {
    let f = File::open(image)?;
    let mut want = vec![0u8; SLOT as usize];
    let mut got = vec![0u8; SLOT as usize];
    let mut n = 0;
    for &(slot, seed) in writes {
        StdRng::seed_from_u64(seed).fill(&mut want[..]);
        f.read_exact_at(&mut got, slot * SLOT)?;
        n += usize::from(got != want);
    }
    Ok(n)
}

/// Fails unless every (slot, seed) write is in `image`.
fn check_writes(image: &Path, writes: &[(u64, u64)], what: &str) -> Result<()> {
    let f = File::open(image).with_context(|| format!("{what}: opening {}", image.display()))?;
    let mut want = vec![0u8; SLOT as usize];
    let mut got = vec![0u8; SLOT as usize];
    let mut missing = Vec::new();
    for &(slot, seed) in writes {
        StdRng::seed_from_u64(seed).fill(&mut want[..]);
        f.read_exact_at(&mut got, slot * SLOT)?;
        if got != want {
            missing.push(slot);
        }
    }
    if !missing.is_empty() {
        bail!(
            "{what}: {} of {} acknowledged writes missing (slots {:?}…)",
            missing.len(),
            writes.len(),
            &missing[..missing.len().min(10)]
        );
    }
    Ok(())
}

/// The 4 KiB blocks where two copies of the image differ.
fn differing_blocks(a: &Path, b: &Path) -> Result<Vec<u64>> {
    let (fa, fb) = (File::open(a)?, File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        bail!("{} and {} differ in size", a.display(), b.display());
    }
    let len = fa.metadata()?.len();
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut out = Vec::new();
    let mut off = 0;
    while off < len {
        let n = (len - off).min(ba.len() as u64) as usize;
        fa.read_exact_at(&mut ba[..n], off)?;
        fb.read_exact_at(&mut bb[..n], off)?;
        for (i, (x, y)) in ba[..n].chunks(4096).zip(bb[..n].chunks(4096)).enumerate() {
            if x != y {
                out.push(off / 4096 + i as u64);
            }
        }
        off += n as u64;
    }
    Ok(out)
}

/// Size in bytes of the tracking files in `state/track` (the activity log, maps).
fn track_files(state: &Path) -> Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(state.join("track"))? {
        let e = e?;
        out.push((
            e.file_name().to_string_lossy().into_owned(),
            e.metadata()?.len(),
        ));
    }
    out.sort();
    Ok(out)
}

/// Checks that the tracking records in `state` (as a node opening them would see
/// them: the activity log folded in; opened on a copy under `scratch`, the node is
/// to find them untouched) name every 4 KiB block where the files of `data` differ
/// from those of `other`. Returns the number of differing blocks and the bytes of
/// the files the records name.
fn records_cover_differences(
    data: &Path,
    other: &Path,
    state: &Path,
    scratch: &Path,
) -> Result<(usize, u64)> {
    let mut diffs = Vec::new();
    for file in FILES {
        let ino = std::fs::metadata(data.join(file))?.ino();
        diffs.push((
            file,
            ino,
            differing_blocks(&data.join(file), &other.join(file))?,
        ));
    }
    // Copied after the comparison: records only grow until a resync, so a block
    // that differed then is still named now.
    let copy = scratch.join("track");
    std::fs::create_dir_all(&copy)?;
    for (name, _) in track_files(state)? {
        if !name.starts_with('.') {
            std::fs::copy(state.join("track").join(&name), copy.join(&name))?;
        }
    }
    let t = vmha_fs::track::Tracker::open(scratch, AL_EXTENTS as usize)?;
    assert!(
        t.is_valid(),
        "the records in {} lost their validity",
        state.display()
    );
    let (mut blocks, mut named) = (0, 0);
    for (file, ino, diff) in diffs {
        let dirt = t.ranges_of(ino);
        assert!(!dirt.whole, "the records name the whole of {file}");
        let covered = dirt.ranges;
        let gaps: Vec<u64> = diff
            .iter()
            .copied()
            .filter(|blk| {
                !covered
                    .iter()
                    .any(|&(s, e)| s <= blk * 4096 && (blk + 1) * 4096 <= e)
            })
            .collect();
        assert!(
            gaps.is_empty(),
            "{} of {} differing blocks of {file} are not in the records of {} \
             (first: {:?}; records {covered:?})",
            gaps.len(),
            diff.len(),
            state.display(),
            &gaps[..gaps.len().min(10)]
        );
        blocks += diff.len();
        named += covered.iter().map(|(s, e)| e - s).sum::<u64>();
    }
    Ok((blocks, named))
}

/// Buffered writes without fsync to the first slots of the log file through `mnt`,
/// acknowledged (replicated) but only in page caches; returns them.
fn unsynced_burst(mnt: &Path, seed: u64) -> Result<Vec<(u64, u64)>> {
    let f = OpenOptions::new().write(true).open(mnt.join(LOG))?;
    let mut buf = vec![0u8; SLOT as usize];
    let mut out = Vec::new();
    for slot in 0..32 {
        let block_seed = seed * 1_000_000 + slot;
        StdRng::seed_from_u64(block_seed).fill(&mut buf[..]);
        f.write_all_at(&buf, slot * SLOT)?;
        out.push((slot, block_seed));
    }
    Ok(out)
}

#[test]
fn loopfs_loses_what_was_not_synced() -> Result<()> {
    let mut fs = LoopFs::new("selftest", FS_SIZE)?;
    let synced = fs.path().join("synced");
    let unsynced = fs.path().join("unsynced");
    {
        let f = File::create(&synced)?;
        f.write_all_at(&[7u8; 65536], 0)?;
        f.sync_all()?;
        File::open(fs.path())?.sync_all()?;
        let g = File::create(&unsynced)?;
        g.write_all_at(&[8u8; 65536], 0)?;
        f.write_all_at(&[9u8; 4096], 0)?;
    }
    fs.shutdown()?;
    assert!(
        std::fs::read(&synced).is_err(),
        "a shut down XFS still answers reads"
    );
    fs.power_cycle()?;
    assert_eq!(std::fs::read(&synced)?, vec![7u8; 65536]);
    assert!(
        !unsynced.exists() || std::fs::read(&unsynced)?.is_empty(),
        "a file never synced survived the power cut"
    );
    Ok(())
}

#[test]
fn primary_power_loss_then_incremental_resync_from_the_survivor() -> Result<()> {
    primary_power_loss_then_resync("C")
}

#[test]
fn primary_power_loss_with_protocol_b() -> Result<()> {
    primary_power_loss_then_resync("B")
}

/// With flush the survivor is only sure to have what an fsync acknowledged; what
/// A acknowledged without one and B lacks must be in A's records.
#[test]
fn primary_power_loss_with_protocol_flush() -> Result<()> {
    primary_power_loss_then_resync("flush")
}

fn primary_power_loss_then_resync(protocol: &str) -> Result<()> {
    // C and B: every acknowledged write is on the survivor; flush: every synced one.
    let every_acked = protocol != "flush";
    let mut s = Setup::new()?;
    fill(&s.a.data())?;
    let mut b = s.secondary(&s.b)?;
    let mut a = s.primary_alone_with(&s.a, protocol)?;
    let first = attach_and_wait(&a, &s.a.state())?;
    eprintln!("initial full sync: {first:?}");

    // Writes through A's mount; mid-flight, A loses power.
    let hot = hot_slots(7, HOT_EXTENTS);
    let writers = Writers::start(&s.a.mnt, &hot, 1, &WITH_UNSYNCED, false);
    std::thread::sleep(Duration::from_secs(3));
    // The writers that fdatasync after each write went through early syncs:
    // the cut below tests that path too. (Under C some of their fdatasyncs
    // are answered by the peer's early sync, `fsyncs_peer_early`; how many
    // depends on how the writers of the one image interleave.)
    let m = FsMetrics::read_from(&s.a.state())?.unwrap_or_default();
    eprintln!("A's metrics before the cut: {m:?}");
    assert!(m.early_syncs > 0 && m.fsyncs_early > 0, "{m:?}");
    let unsynced = unsynced_burst(&s.a.mnt, 5)?;
    s.a.fs.shutdown()?;
    std::thread::sleep(Duration::from_millis(200));
    a.kill()?;
    let acked = writers.finish()?;
    eprintln!(
        "before the power cut: {} writes acknowledged, {} of them by an fsync; {} errors",
        acked.written.len(),
        acked.synced.len(),
        acked.errors
    );
    assert!(
        acked.synced.len() >= 20,
        "only {} fsync-acknowledged writes: the test proves little",
        acked.synced.len()
    );
    s.a.power_cycle()?;

    // The survivor has every write the writers were told was there; the node that
    // lost power has those an fsync acknowledged, and may lack the others.
    check_writes(
        &s.b.image(),
        &acked.synced,
        "survivor B, fsync-acknowledged",
    )?;
    if every_acked {
        check_writes(
            &s.b.image(),
            &acked.written,
            "survivor B, write-acknowledged",
        )?;
    }
    check_writes(
        &s.a.image(),
        &acked.synced,
        "A after its power cut, fsync-acknowledged",
    )?;
    if every_acked {
        check_writes(&s.b.log(), &unsynced, "survivor B, unsynced log writes")?;
    }
    let lost = count_missing(&s.a.image(), &acked.written)?;
    let lost_log = count_missing(&s.a.log(), &unsynced)?;

    // A's tracking records survived the power cut, and they name every block where
    // its copy now differs from the survivor's.
    let records = track_files(&s.a.state())?;
    eprintln!("A's state/track after the power cut: {records:?}");
    assert!(
        records.iter().any(|(n, len)| n == "activity" && *len > 0),
        "A's activity log did not survive the power cut: {records:?}"
    );
    let (diff, dirty_bytes) = records_cover_differences(
        &s.a.data(),
        &s.b.data(),
        &s.a.state(),
        &s.root.path().join("a-state-copy"),
    )?;
    eprintln!(
        "A's copy differs from B's in {diff} blocks after the power cut (A lost \
         {lost_log} of {} unsynced log writes, {lost} unsynced image writes), all in A's \
         records ({dirty_bytes} bytes)",
        unsynced.len()
    );
    assert!(
        lost_log > 0,
        "A lost no unsynced write in its power cut: was its page cache really lost?"
    );
    assert!(
        dirty_bytes <= AL_EXTENTS * EXTENT,
        "A's records name {dirty_bytes} bytes, more than its activity log holds"
    );

    // B takes over and writes alone; A comes back as its receiver.
    stop(&mut b)?;
    let mut b = s.primary_alone(&s.b)?;
    let elsewhere: Vec<u64> = shuffled_slots(9)
        .into_iter()
        .filter(|slot| !hot.contains(slot))
        .take(64)
        .collect();
    let alone = Writers::start(&s.b.mnt, &elsewhere, 2, &SYNCING, false).join()?;
    assert_eq!(alone.synced.len(), 64, "B alone: {} errors", alone.errors);
    let mut a = s.secondary(&s.a)?;
    let tx = s.link.host_tx_bytes()?;
    let status = attach_and_wait(&b, &s.b.state())?;
    let sent = s.link.host_tx_bytes()? - tx;
    let total = status.total_bytes;
    // A's activity log plus the 4 KiB blocks B wrote alone.
    let bound = AL_EXTENTS * EXTENT + 64 * SLOT;
    eprintln!(
        "resync B -> A: {total} bytes (bound {bound}, image {IMAGE}), {sent} bytes on the interface"
    );
    assert!(
        last_sync_was_incremental(&b)?,
        "the resync after the power cut was a full copy"
    );
    assert!(total <= bound, "resync of {total} bytes exceeds {bound}");
    assert!(
        sent <= bound * 11 / 10 + (1 << 20),
        "{sent} bytes crossed the interface"
    );

    stop(&mut b)?;
    stop(&mut a)?;
    assert_same_tree(&s.a.data(), &s.b.data()).context("after the resync")?;
    if every_acked {
        check_writes(&s.a.image(), &acked.written, "A after the resync")?;
        check_writes(&s.a.log(), &unsynced, "A after the resync, log")?;
    } else {
        check_writes(&s.a.image(), &acked.synced, "A after the resync, synced")?;
    }
    check_writes(
        &s.a.image(),
        &alone.written,
        "A after the resync, B's writes",
    )?;
    Ok(())
}

#[test]
fn secondary_power_loss_then_incremental_resync_under_writes() -> Result<()> {
    let mut s = Setup::new()?;
    fill(&s.a.data())?;
    let mut b = s.secondary(&s.b)?;
    let mut a = s.primary_alone(&s.a)?;
    attach_and_wait(&a, &s.a.state())?;

    // Writes through A's mount; mid-flight, B loses power. Errors while B's fate is
    // undecided are allowed (those writes were never acknowledged).
    let hot = hot_slots(8, HOT_EXTENTS);
    let before = Writers::start(&s.a.mnt, &hot, 3, &WITH_UNSYNCED, true);
    std::thread::sleep(Duration::from_secs(3));
    let unsynced = unsynced_burst(&s.a.mnt, 6)?;
    let cut = Instant::now();
    s.b.fs.shutdown()?;
    std::thread::sleep(Duration::from_millis(200));
    b.kill()?;
    // The controller declares the peer dead: A writes alone, more writers join.
    signal(a.pid(), libc::SIGUSR1)?;
    let before = before.finish()?;
    let rest: Vec<u64> = shuffled_slots(10)
        .into_iter()
        .filter(|slot| !hot.contains(slot))
        .collect();
    let after = Writers::start(&s.a.mnt, &rest, 4, &SYNCING, true);
    std::thread::sleep(Duration::from_secs(2));
    s.b.power_cycle()?;

    // B kept what an fsync acknowledged before the cut (an fsync that returned
    // later, with A alone, promised nothing about B), and its record that it was in
    // sync.
    let synced_before_cut = before.synced_before(cut);
    check_writes(
        &s.b.image(),
        &synced_before_cut,
        "B after its power cut, fsync-acknowledged",
    )?;
    let lost = count_missing(&s.b.image(), &before.written)?;
    let lost_log = count_missing(&s.b.log(), &unsynced)?;
    let records = track_files(&s.b.state())?;
    eprintln!("B's state/track after the power cut: {records:?}");
    assert!(
        records.iter().any(|(n, _)| n == "valid"),
        "B's record that its copy was in sync did not survive: {records:?}"
    );
    let records = track_files(&s.a.state())?;
    eprintln!("A's state/track while degraded: {records:?}");
    assert!(
        records
            .iter()
            .any(|(n, len)| n.starts_with("map-") && *len > 0),
        "A wrote alone without a dirty map: {records:?}"
    );
    // A's records name every block where B's copy now differs, what B lost in the
    // power cut included.
    let (diff, dirty_bytes) = records_cover_differences(
        &s.a.data(),
        &s.b.data(),
        &s.a.state(),
        &s.root.path().join("a-state-copy"),
    )?;
    eprintln!(
        "before the power cut: {} writes acknowledged, {} by an fsync before it; B lost {lost} of \
         them and {lost_log} of {} unsynced log writes; B's copy differs from A's in {diff} \
         blocks, all in A's records ({dirty_bytes} bytes)",
        before.written.len(),
        synced_before_cut.len(),
        unsynced.len()
    );
    // (No claim that B lost anything: the receiver starts writing back what it
    // applied at once, so only what was in flight at the cut can be lost there.)

    // B is back; the resync runs while the writers go on.
    let mut b = s.secondary(&s.b)?;
    let status = attach_and_wait(&a, &s.a.state())?;
    std::thread::sleep(Duration::from_secs(1));
    let after = after.finish()?;
    let total = status.total_bytes;
    eprintln!(
        "while B was away and during the resync: {} writes acknowledged ({} by an fsync, \
         {} errors); resync {total} bytes of a {IMAGE}-byte image",
        after.written.len(),
        after.synced.len(),
        after.errors
    );
    assert!(
        last_sync_was_incremental(&a)?,
        "the resync after the power cut was a full copy"
    );
    assert!(
        total < IMAGE / 2,
        "resync of {total} bytes: not incremental"
    );
    assert!(
        before.synced.len() >= 20 && after.synced.len() >= 20,
        "too few fsync-acknowledged writes"
    );

    stop(&mut a)?;
    stop(&mut b)?;
    assert_same_tree(&s.a.data(), &s.b.data()).context("after the resync")?;
    // Every slot was written at most once: each acknowledged write is there, on both.
    for (node, image) in [("A", s.a.image()), ("B", s.b.image())] {
        for (phase, acked) in [("before", &before), ("after", &after)] {
            check_writes(
                &image,
                &acked.written,
                &format!("{node}, written {phase} the cut"),
            )?;
        }
        let log = image.with_file_name("log.img");
        check_writes(&log, &unsynced, &format!("{node}, log"))?;
    }
    Ok(())
}

/// What a node wrote alone, never fsynced, is on the peer once a resync declared
/// both copies identical; a power cut of that node right afterwards must not leave
/// its copy different from the peer's where no record says so.
#[test]
fn power_loss_right_after_a_resync_leaves_no_unrecorded_difference() -> Result<()> {
    let mut s = Setup::new()?;
    std::fs::create_dir_all(s.a.data().join("vm1"))?;
    let mut disk = vec![0u8; 8 << 20];
    StdRng::seed_from_u64(11).fill(&mut disk[..]);
    std::fs::write(s.a.data().join("vm1/disk.img"), &disk)?;
    File::open(s.a.data().join("vm1/disk.img"))?.sync_all()?;
    File::open(s.a.data().join("vm1"))?.sync_all()?;
    let mut b = s.secondary(&s.b)?;
    let mut a = s.primary_alone(&s.a)?;
    // Written alone, through the mount, without fsync: a new file, an overwrite.
    let mut fresh = vec![0u8; 1 << 20];
    StdRng::seed_from_u64(12).fill(&mut fresh[..]);
    std::fs::write(s.a.mnt.join("vm1/written-alone"), &fresh)?;
    {
        let f = OpenOptions::new()
            .write(true)
            .open(s.a.mnt.join("vm1/disk.img"))?;
        f.write_all_at(&fresh[..256 << 10], 3 << 20)?;
    }
    attach_and_wait(&a, &s.a.state())?;
    // At once, before anything else syncs A's filesystem: A loses power.
    s.a.fs.shutdown()?;
    a.kill()?;
    s.a.power_cycle()?;
    let lost = std::fs::read(s.a.data().join("vm1/written-alone")).ok() != Some(fresh.clone());
    eprintln!(
        "after the power cut A {} the file it wrote alone",
        if lost { "lost" } else { "kept" }
    );

    // B takes over, A returns as its receiver: the resync must leave no difference.
    stop(&mut b)?;
    let mut b = s.primary_alone(&s.b)?;
    let mut a = s.secondary(&s.a)?;
    attach_and_wait(&b, &s.b.state())?;
    stop(&mut b)?;
    stop(&mut a)?;
    assert_same_tree(&s.a.data(), &s.b.data()).context("after the resync")?;
    assert_eq!(std::fs::read(s.a.data().join("vm1/written-alone"))?, fresh);
    Ok(())
}

/// The peer is down and the primary writes alone (dirty maps), then the primary
/// loses power too: its dirty maps survive, name every block where its copy differs
/// from the peer's, and when it comes back and re-attaches the peer an incremental
/// resync makes both identical with every fsync-acknowledged write on both.
#[test]
fn degraded_primary_power_loss_keeps_its_dirty_maps() -> Result<()> {
    let mut s = Setup::new()?;
    fill(&s.a.data())?;
    let mut b = s.secondary(&s.b)?;
    let mut a = s.primary_alone(&s.a)?;
    attach_and_wait(&a, &s.a.state())?;

    // B is gone (a plain crash), A is told so and writes alone...
    b.kill()?;
    lazy_unmount_all(&s.b.data())?;
    signal(a.pid(), libc::SIGUSR1)?;
    let hot = hot_slots(12, HOT_EXTENTS);
    let writers = Writers::start(&s.a.mnt, &hot, 7, &WITH_UNSYNCED, false);
    std::thread::sleep(Duration::from_secs(3));
    let unsynced = unsynced_burst(&s.a.mnt, 8)?;
    // ...and loses power.
    s.a.fs.shutdown()?;
    std::thread::sleep(Duration::from_millis(200));
    a.kill()?;
    let acked = writers.finish()?;
    s.a.power_cycle()?;
    eprintln!(
        "A alone: {} writes acknowledged, {} by an fsync, {} errors",
        acked.written.len(),
        acked.synced.len(),
        acked.errors
    );
    assert!(
        acked.synced.len() >= 20,
        "only {} fsync-acknowledged writes",
        acked.synced.len()
    );
    check_writes(
        &s.a.image(),
        &acked.synced,
        "A after its power cut, fsync-acknowledged",
    )?;
    let lost_log = count_missing(&s.a.log(), &unsynced)?;

    let records = track_files(&s.a.state())?;
    eprintln!("A's state/track after the power cut: {records:?}");
    // Degraded writes are durable first as activity-log extents, their exact
    // blocks reach the dirty maps at the next checkpoint: either must be there.
    assert!(
        records
            .iter()
            .any(|(n, len)| (n.starts_with("map-") || n == "activity") && *len > 0),
        "A's dirty records did not survive the power cut: {records:?}"
    );
    let (diff, dirty_bytes) = records_cover_differences(
        &s.a.data(),
        &s.b.data(),
        &s.a.state(),
        &s.root.path().join("a-state-copy"),
    )?;
    eprintln!(
        "A's copy differs from B's in {diff} blocks (A lost {lost_log} of {} unsynced log \
         writes), all in A's records ({dirty_bytes} bytes)",
        unsynced.len()
    );
    assert!(diff > 0, "A's writes alone left no difference with B");

    // A comes back writing alone, B returns, the resync carries what A's maps say.
    let mut a = s.primary_alone(&s.a)?;
    let mut b = s.secondary(&s.b)?;
    let status = attach_and_wait(&a, &s.a.state())?;
    let total = status.total_bytes;
    eprintln!("resync A -> B: {total} bytes (A's records: {dirty_bytes} bytes)");
    assert!(
        last_sync_was_incremental(&a)?,
        "the resync after the power cut was a full copy"
    );
    assert!(
        total <= dirty_bytes + (1 << 20),
        "resync of {total} bytes for {dirty_bytes} recorded"
    );
    stop(&mut a)?;
    stop(&mut b)?;
    assert_same_tree(&s.a.data(), &s.b.data()).context("after the resync")?;
    check_writes(&s.b.image(), &acked.synced, "B after the resync")?;
    Ok(())
}

/// Waits until sync.json in `state` satisfies `done`; fails if the sync ends first
/// (`in_sync` or `alone`) without satisfying it.
fn wait_sync_status(
    state: &Path,
    what: &str,
    done: impl Fn(&SyncStatus) -> bool,
) -> Result<SyncStatus> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(Some(s)) = SyncStatus::read_from(state) {
            if done(&s) {
                return Ok(s);
            }
            if matches!(s.state, SyncPhase::InSync | SyncPhase::Alone) {
                bail!("the sync ended before {what}: {s:?}");
            }
        }
        if Instant::now() > deadline {
            bail!("no {what} within 120 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A node wrote alone without fsync, then loses power in the middle of the resync
/// that brings the peer up to date: what the resync already counted as done must be
/// on its disk, or still in its records — else its copy differs from the peer's
/// where nothing says so, and the next resync leaves the difference in place.
#[test]
fn power_loss_in_the_middle_of_a_resync_leaves_no_unrecorded_difference() -> Result<()> {
    const ALONE: u64 = 128;
    let mut s = Setup::new()?;
    fill(&s.a.data())?;
    let mut b = s.secondary(&s.b)?;
    let mut a = s.primary_alone(&s.a)?;
    attach_and_wait(&a, &s.a.state())?;

    // B is gone; A writes 128 MiB alone, 1 MiB in every 2 MiB (regions apart, as a
    // resync may handle them in steps), never fsynced.
    b.kill()?;
    lazy_unmount_all(&s.b.data())?;
    signal(a.pid(), libc::SIGUSR1)?;
    std::thread::sleep(Duration::from_millis(300));
    {
        let f = OpenOptions::new().write(true).open(s.a.mnt.join(IMG))?;
        let mut buf = vec![0u8; 1 << 20];
        for i in 0..ALONE {
            StdRng::seed_from_u64(100 + i).fill(&mut buf[..]);
            f.write_all_at(&buf, i << 21)?;
        }
    }

    // B returns over a slow link; A loses power when most of the resync is done.
    let mut b = s.secondary(&s.b)?;
    s.link.limit_host_tx(160)?;
    let _ = std::fs::remove_file(s.a.state().join(SyncStatus::FILE));
    signal(a.pid(), libc::SIGUSR2)?;
    // (total_bytes below the image's: not the counters of the first sync, which the
    // status shows until this one has counted its work.)
    let at = wait_sync_status(&s.a.state(), "80 MiB done", |st| {
        st.state == SyncPhase::Syncing && st.total_bytes < IMAGE && st.done_bytes >= 80 << 20
    })?;
    s.a.fs.shutdown()?;
    a.kill()?;
    s.link.unlimit_host_tx()?;
    eprintln!("A lost power during the resync at {at:?}");
    stop(&mut b)?;
    s.a.power_cycle()?;
    let img = File::open(s.a.image())?;
    let mut buf = vec![0u8; 1 << 20];
    let mut want = vec![0u8; 1 << 20];
    let mut kept = 0;
    for i in 0..ALONE {
        StdRng::seed_from_u64(100 + i).fill(&mut want[..]);
        img.read_exact_at(&mut buf, i << 21)?;
        kept += usize::from(buf == want);
    }
    drop(img);
    let (diff, dirty_bytes) = records_cover_differences(
        &s.a.data(),
        &s.b.data(),
        &s.a.state(),
        &s.root.path().join("a-state-copy"),
    )?;
    eprintln!(
        "after the power cut A kept {kept} of the {ALONE} MiB it wrote alone; its copy \
         differs from B's in {diff} blocks, all in its records ({dirty_bytes} bytes)"
    );

    // B takes over, A returns as its receiver: afterwards both are identical.
    let mut b = s.primary_alone(&s.b)?;
    let mut a = s.secondary(&s.a)?;
    attach_and_wait(&b, &s.b.state())?;
    assert!(last_sync_was_incremental(&b)?, "the resync was a full copy");
    stop(&mut b)?;
    stop(&mut a)?;
    assert_same_tree(&s.a.data(), &s.b.data()).context("after the resync")?;
    Ok(())
}
