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
//! - The secondary loses power under writes: the primary goes on alone, the
//!   secondary returns, an incremental resync (with writes going on) makes both
//!   identical, and every acknowledged write is on both.

use std::collections::BTreeSet;
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
use vmha_test_infra::hostlink::HostLink;
use vmha_test_infra::pair::{free_port, keygen, READY_TIMEOUT};
use vmha_test_infra::{assert_same_tree, lazy_unmount_all, vmha_fs_bin, AlignedBuf, Child, LoopFs};

/// Size of each node's XFS (sparse).
const FS_SIZE: u64 = 1 << 30;
const IMAGE: u64 = 256 << 20;
const SLOT: u64 = 64 << 10;
/// Activity-log size of the primaries: a crashed primary resends at most this × 4 MiB.
const AL_EXTENTS: u64 = 8;
const EXTENT: u64 = 4 << 20;
/// Writes between two fdatasync calls of a writer.
const SYNC_EVERY: usize = 4;
const IMG: &str = "vm1/disk.img";

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
            .arg(AL_EXTENTS.to_string());
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

fn signal(pid: u32, sig: libc::c_int) -> Result<()> {
    // SAFETY: signalling a child process we started, by PID.
    if unsafe { libc::kill(pid as libc::pid_t, sig) } != 0 {
        bail!("kill {sig} {pid}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// SIGUSR2 (attach the peer and resync) and wait for `in_sync`; returns sync.json.
fn attach_and_wait(primary: &Child, state: &Path) -> Result<serde_json::Value> {
    let file = state.join("sync.json");
    let _ = std::fs::remove_file(&file);
    signal(primary.pid(), libc::SIGUSR2)?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Ok(text) = std::fs::read_to_string(&file) {
            if let Ok(s) = serde_json::from_str::<serde_json::Value>(&text) {
                match s["state"].as_str() {
                    Some("in_sync") => return Ok(s),
                    Some("alone") => bail!("sync failed: {s}"),
                    _ => {}
                }
            }
        }
        if Instant::now() > deadline {
            bail!("no sync within 300 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The primary's own word on the last resync: `incremental=true` or `=false`.
fn last_sync_was_incremental(primary: &Child) -> Result<bool> {
    let lines: Vec<String> = primary
        .stderr_lines()
        .iter()
        .map(|l| strip_ansi(l))
        .collect();
    let line = lines
        .iter()
        .rev()
        .find(|l| l.contains("sync done"))
        .ok_or_else(|| anyhow!("the primary logged no `sync done`"))?;
    if line.contains("incremental=true") {
        Ok(true)
    } else if line.contains("incremental=false") {
        Ok(false)
    } else {
        bail!("cannot tell from {line:?}")
    }
}

/// `text` without terminal colour sequences (`ESC [ … m`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn stop(child: &mut Child) -> Result<()> {
    signal(child.pid(), libc::SIGTERM)?;
    let st = child.wait_exit(Duration::from_secs(30))?;
    if !st.success() {
        bail!("{} exited {st}: {}", child.name(), child.stderr_text());
    }
    Ok(())
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
    errors: usize,
}

/// Writes 64 KiB of fresh data to each of `slots` in turn (buffered or O_DIRECT),
/// fdatasync after every `SYNC_EVERY` writes, until `stop` or the slots run out. On
/// an error: stops, or (`keep_going`) counts it and goes on with the next slot.
fn writer(
    path: PathBuf,
    slots: Vec<u64>,
    seed: u64,
    direct: bool,
    keep_going: bool,
    stop: Arc<AtomicBool>,
) -> Acked {
    let mut acked = Acked::default();
    let mut opts = OpenOptions::new();
    opts.write(true);
    if direct {
        opts.custom_flags(libc::O_DIRECT);
    }
    let (Ok(f), Ok(mut buf)) = (opts.open(&path), AlignedBuf::new(SLOT as usize, 4096)) else {
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
        if (i + 1) % SYNC_EVERY == 0 {
            match f.sync_data() {
                Ok(()) => acked.synced.append(&mut unsynced),
                Err(_) => {
                    acked.errors += 1;
                    unsynced.clear();
                    if !keep_going {
                        break;
                    }
                }
            }
        }
        // Leave the CPU to the daemons now and then (2 cores, other tests).
        if i % 16 == 15 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    acked
}

/// Writers in threads over disjoint random slots of the image under `mnt`: half
/// buffered, half O_DIRECT.
struct Writers {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Acked>>,
}

impl Writers {
    fn start(mnt: &Path, slots: &[u64], seed: u64, keep_going: bool) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = slots
            .chunks(slots.len().div_ceil(4))
            .enumerate()
            .map(|(i, chunk)| {
                let (path, chunk, stop) = (mnt.join(IMG), chunk.to_vec(), stop.clone());
                let seed = seed * 10 + i as u64;
                std::thread::spawn(move || writer(path, chunk, seed, i % 2 == 1, keep_going, stop))
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
            all.errors += a.errors;
        }
        Ok(all)
    }
}

/// Slots in random order, split between the phases of a test.
fn shuffled_slots(seed: u64) -> Vec<u64> {
    let mut slots: Vec<u64> = (0..IMAGE / SLOT).collect();
    slots.shuffle(&mut StdRng::seed_from_u64(seed));
    slots
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
    let mut s = Setup::new()?;
    fill(&s.a.data())?;
    let mut b = s.secondary(&s.b)?;
    let mut a = s.primary_alone(&s.a)?;
    let first = attach_and_wait(&a, &s.a.state())?;
    eprintln!("initial full sync: {first}");

    // Writes through A's mount; mid-flight, A loses power.
    let slots = shuffled_slots(7);
    let (during, after) = slots.split_at(slots.len() / 2);
    let writers = Writers::start(&s.a.mnt, during, 1, false);
    std::thread::sleep(Duration::from_secs(4));
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

    // The survivor has every write the writers were told was there.
    check_writes(
        &s.b.image(),
        &acked.synced,
        "survivor B, fsync-acknowledged",
    )?;
    check_writes(
        &s.b.image(),
        &acked.written,
        "survivor B, write-acknowledged",
    )?;

    // A's tracking records survived the power cut, and they name every block where
    // its copy now differs from the survivor's.
    let records = track_files(&s.a.state())?;
    eprintln!("A's state/track after the power cut: {records:?}");
    assert!(
        records.iter().any(|(n, len)| n == "activity" && *len > 0),
        "A's activity log did not survive the power cut: {records:?}"
    );
    let diff = differing_blocks(&s.a.image(), &s.b.image())?;
    let lost = acked
        .written
        .iter()
        .filter(|(slot, _)| diff.contains(&(slot * SLOT / 4096)))
        .count();
    eprintln!(
        "A's copy differs from B's in {} blocks after the power cut ({lost} acknowledged writes lost on A)",
        diff.len()
    );
    let ino = std::fs::metadata(s.a.image())?.ino();
    let covered = {
        // What A's receiver will report: its records, the activity log folded in (on
        // a copy: A's receiver is to find its records as the power cut left them).
        let copy = s.root.path().join("a-state-copy");
        std::fs::create_dir_all(copy.join("track"))?;
        for (name, _) in &records {
            std::fs::copy(
                s.a.state().join("track").join(name),
                copy.join("track").join(name),
            )?;
        }
        let t = vmha_fs::track::Tracker::open(&copy, AL_EXTENTS as usize)?;
        assert!(t.is_valid(), "A's records lost their validity");
        let dirt = t.ranges_of(ino);
        assert!(!dirt.whole, "A's records cover the whole image");
        dirt.ranges
    };
    let dirty_bytes: u64 = covered.iter().map(|(s, e)| e - s).sum();
    eprintln!("A's records after the power cut: {dirty_bytes} bytes of the image in {covered:?}");
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
        "{} differing blocks not in A's records (first: {:?})",
        gaps.len(),
        &gaps[..gaps.len().min(10)]
    );
    assert!(
        dirty_bytes <= AL_EXTENTS * EXTENT,
        "A's records name {dirty_bytes} bytes, more than its activity log holds"
    );

    // B takes over and writes alone; A comes back as its receiver.
    stop(&mut b)?;
    let mut b = s.primary_alone(&s.b)?;
    let alone = Writers::start(&s.b.mnt, &after[..64], 2, false).join()?;
    assert_eq!(alone.written.len(), 64, "B alone: {} errors", alone.errors);
    let mut a = s.secondary(&s.a)?;
    let tx = s.link.host_tx_bytes()?;
    let status = attach_and_wait(&b, &s.b.state())?;
    let sent = s.link.host_tx_bytes()? - tx;
    let total = status["total_bytes"].as_u64().unwrap_or(u64::MAX);
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
    check_writes(&s.a.image(), &acked.synced, "A after the resync")?;
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

    // Writes go on through A's mount for the whole test; errors while the peer's
    // fate is undecided are allowed (those writes were never acknowledged).
    let slots = shuffled_slots(8);
    let writers = Writers::start(&s.a.mnt, &slots, 3, true);
    std::thread::sleep(Duration::from_secs(3));
    s.b.fs.shutdown()?;
    std::thread::sleep(Duration::from_millis(200));
    b.kill()?;
    // The controller declares the peer dead: A writes alone.
    signal(a.pid(), libc::SIGUSR1)?;
    std::thread::sleep(Duration::from_secs(2));
    s.b.power_cycle()?;
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

    // B is back; the resync runs while the writers go on.
    let mut b = s.secondary(&s.b)?;
    let status = attach_and_wait(&a, &s.a.state())?;
    std::thread::sleep(Duration::from_secs(1));
    let acked = writers.finish()?;
    let total = status["total_bytes"].as_u64().unwrap_or(u64::MAX);
    eprintln!(
        "{} writes acknowledged ({} by an fsync, {} errors); resync {total} bytes of a {IMAGE}-byte image",
        acked.written.len(),
        acked.synced.len(),
        acked.errors
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
        acked.synced.len() >= 20,
        "only {} fsync-acknowledged writes",
        acked.synced.len()
    );
    // Every slot was written at most once: what was acknowledged is there, on both.
    let unique: BTreeSet<u64> = acked.written.iter().map(|w| w.0).collect();
    assert_eq!(unique.len(), acked.written.len());

    stop(&mut a)?;
    stop(&mut b)?;
    assert_same_tree(&s.a.data(), &s.b.data()).context("after the resync")?;
    for (node, image) in [("A", s.a.image()), ("B", s.b.image())] {
        check_writes(
            &image,
            &acked.synced,
            &format!("{node}, fsync-acknowledged"),
        )?;
        check_writes(
            &image,
            &acked.written,
            &format!("{node}, write-acknowledged"),
        )?;
    }
    Ok(())
}
