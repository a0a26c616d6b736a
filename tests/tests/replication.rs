//! Every mutation through the primary's mount ends up identically in the
//! secondary's replica: random operation sequences, concurrent O_DIRECT writers,
//! punched holes.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, RngCore, SeedableRng};
use rustix::fs::{AtFlags, FallocateFlags, RenameFlags, Timespec, Timestamps, XattrFlags, CWD};
use rustix::io::Errno;
use vmha_test_infra::fsops::{errno_name, open_direct};
use vmha_test_infra::{assert_same_tree, AlignedBuf, Pair, PairOptions};

const MIB: u64 = 1 << 20;
const DIRS: [&str; 3] = ["d0", "d1", "d2"];
const FILES: [&str; 5] = ["f0", "f1", "f2", "f3", "f4"];
const XATTRS: [&str; 3] = ["user.a", "user.b", "user.c"];
/// Targets stay inside the tree (relative, no `..`) or point nowhere, so following
/// a symlink can never touch anything outside the mount.
const SYMLINK_TARGETS: [&str; 6] = [
    "f0",
    "d0",
    "d1/f1",
    "nowhere",
    "f4",
    "/nonexistent-vmha-target",
];
const MODES: [u32; 8] = [0o644, 0o600, 0o755, 0o4755, 0o2750, 0o1777, 0o000, 0o640];
const OWNERS: [(u32, u32); 3] = [(1000, 1000), (0, 0), (1000, 0)];

/// Every open in the random sequence uses O_NONBLOCK so that a FIFO never blocks it.
///
/// Failures a random operation may legitimately meet (the target is missing,
/// of the wrong kind, ...). Anything else (EIO, ENOSYS, EOPNOTSUPP, ENOTCONN, ...)
/// is a bug of the filesystem under test.
const EXPECTED_ERRNOS: [i32; 13] = [
    libc::ENOENT,
    libc::EEXIST,
    libc::ENOTDIR,
    libc::EISDIR,
    libc::ENOTEMPTY,
    libc::EINVAL,
    libc::EPERM,
    libc::ELOOP,
    libc::ENODATA,
    libc::EBUSY,
    libc::EMLINK,
    // Opening a FIFO for writing with O_NONBLOCK and no reader; I/O calls on a FIFO.
    libc::ENXIO,
    libc::ESPIPE,
];

struct Runner {
    root: PathBuf,
    rng: StdRng,
    /// op name -> (succeeded, failed as expected)
    stats: BTreeMap<&'static str, (u32, u32)>,
    unexpected: Vec<String>,
}

fn errno(e: Errno) -> io::Error {
    io::Error::from(e)
}

impl Runner {
    /// A directory path of depth 1..=3 made of directory names.
    fn dir_path(&mut self) -> PathBuf {
        let depth = match self.rng.random_range(0..10) {
            0..=5 => 1,
            6..=8 => 2,
            _ => 3,
        };
        let mut p = self.root.clone();
        for _ in 0..depth {
            p.push(DIRS.choose(&mut self.rng).unwrap_or(&"d0"));
        }
        p
    }

    /// A file name in the root or in a directory; now and then any name at all,
    /// so that operations also meet the wrong kind of object.
    fn path(&mut self) -> PathBuf {
        if self.rng.random_bool(0.05) {
            return self.dir_path();
        }
        let mut p = if self.rng.random_bool(0.4) {
            self.root.clone()
        } else {
            self.dir_path()
        };
        p.push(FILES.choose(&mut self.rng).unwrap_or(&"f0"));
        p
    }

    fn data(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        if self.rng.random_bool(0.5) {
            self.rng.fill_bytes(&mut v);
        } else {
            v.fill(self.rng.random());
        }
        v
    }

    fn len(&mut self) -> usize {
        match self.rng.random_range(0..10) {
            0..=4 => self.rng.random_range(1..9000),
            5 => 4096,
            6 => 65536,
            _ => MIB as usize,
        }
    }

    fn offset(&mut self) -> u64 {
        if self.rng.random_bool(0.5) {
            self.rng.random_range(0..4 * MIB / 4096) * 4096
        } else {
            self.rng.random_range(0..4 * MIB)
        }
    }

    fn open_existing(&self, p: &Path) -> io::Result<File> {
        OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(p)
    }

    /// One random operation; returns its name and outcome.
    fn step(&mut self) -> (&'static str, io::Result<()>) {
        let choice = self.rng.random_range(0..26);
        let p = self.path();
        let name: &'static str;
        let res: io::Result<()> = match choice {
            0..=2 => {
                name = "write";
                let off = self.offset();
                let len = self.len();
                let buf = self.data(len);
                OpenOptions::new()
                    .write(true)
                    .create(true)
                    .mode(0o644)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                    .open(&p)
                    .and_then(|f| f.write_all_at(&buf, off))
            }
            3 => {
                name = "overwrite";
                let len = self.len();
                let buf = self.data(len);
                let r = self.rng.random::<u64>();
                self.open_existing(&p).and_then(|f| {
                    let size = f.metadata()?.len();
                    f.write_all_at(&buf, if size == 0 { 0 } else { r % size })
                })
            }
            4 => {
                name = "create_excl";
                let len = self.rng.random_range(0..3000);
                let buf = self.data(len);
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o640)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&p)
                    .and_then(|f| f.write_all_at(&buf, 0))
            }
            5 => {
                name = "truncate";
                let r = self.rng.random::<u64>();
                let up = self.rng.random_bool(0.5);
                self.open_existing(&p).and_then(|f| {
                    let size = f.metadata()?.len();
                    let new = if up {
                        size + r % (2 * MIB)
                    } else if size == 0 {
                        0
                    } else {
                        r % size
                    };
                    f.set_len(new)
                })
            }
            6 | 7 => {
                name = "mkdir";
                let p = self.dir_path();
                let mode = *[0o755u32, 0o700, 0o1777, 0o750]
                    .choose(&mut self.rng)
                    .unwrap_or(&0o755);
                rustix::fs::mkdirat(CWD, &p, rustix::fs::Mode::from_raw_mode(mode)).map_err(errno)
            }
            8 => {
                name = "rmdir";
                let p = self.dir_path();
                std::fs::remove_dir(&p)
            }
            9 => {
                name = "unlink";
                std::fs::remove_file(&p)
            }
            10..=12 => {
                let q = self.path();
                let (n, flags) = match choice {
                    10 => ("rename", RenameFlags::empty()),
                    11 => ("rename_noreplace", RenameFlags::NOREPLACE),
                    _ => ("rename_exchange", RenameFlags::EXCHANGE),
                };
                name = n;
                rustix::fs::renameat_with(CWD, &p, CWD, &q, flags).map_err(errno)
            }
            13 => {
                name = "symlink";
                let t = *SYMLINK_TARGETS.choose(&mut self.rng).unwrap_or(&"a");
                std::os::unix::fs::symlink(t, &p)
            }
            14 => {
                name = "link";
                let q = self.path();
                rustix::fs::linkat(CWD, &p, CWD, &q, AtFlags::empty()).map_err(errno)
            }
            15 => {
                name = "chmod";
                let m = *MODES.choose(&mut self.rng).unwrap_or(&0o644);
                // Symlink targets all stay inside the tree, so following is safe.
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m))
            }
            16 => {
                name = "chown";
                let (u, g) = *OWNERS.choose(&mut self.rng).unwrap_or(&(0, 0));
                rustix::fs::chownat(
                    CWD,
                    &p,
                    Some(rustix::fs::Uid::from_raw_unchecked(u)),
                    Some(rustix::fs::Gid::from_raw_unchecked(g)),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(errno)
            }
            17 => {
                name = "utimes";
                let t = |s: i64| Timespec {
                    tv_sec: s,
                    tv_nsec: 0,
                };
                let a = self.rng.random_range(1_000_000_000..1_700_000_000);
                let m = self.rng.random_range(1_000_000_000..1_700_000_000);
                rustix::fs::utimensat(
                    CWD,
                    &p,
                    &Timestamps {
                        last_access: t(a),
                        last_modification: t(m),
                    },
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(errno)
            }
            18 | 19 => {
                let (n, mode) = *[
                    ("fallocate", FallocateFlags::empty()),
                    ("fallocate_keep_size", FallocateFlags::KEEP_SIZE),
                    (
                        "punch_hole",
                        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                    ),
                    ("zero_range", FallocateFlags::ZERO_RANGE),
                ]
                .choose(&mut self.rng)
                .unwrap_or(&("fallocate", FallocateFlags::empty()));
                name = n;
                let off = self.offset();
                let len = self.len() as u64;
                self.open_existing(&p)
                    .and_then(|f| rustix::fs::fallocate(&f, mode, off, len).map_err(errno))
            }
            20 => {
                name = "copy_file_range";
                let q = self.path();
                let mut off_in = self.offset();
                let mut off_out = self.offset();
                let len = self.len();
                (|| -> io::Result<()> {
                    let src = OpenOptions::new()
                        .read(true)
                        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                        .open(&p)?;
                    let dst = OpenOptions::new()
                        .write(true)
                        .create(true)
                        .mode(0o644)
                        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                        .open(&q)?;
                    rustix::fs::copy_file_range(
                        &src,
                        Some(&mut off_in),
                        &dst,
                        Some(&mut off_out),
                        len,
                    )
                    .map_err(errno)?;
                    Ok(())
                })()
            }
            21 | 22 => {
                name = "setxattr";
                let key = *XATTRS.choose(&mut self.rng).unwrap_or(&"user.a");
                let len = self.rng.random_range(0..200);
                let v = self.data(len);
                rustix::fs::lsetxattr(&p, key, &v, XattrFlags::empty()).map_err(errno)
            }
            23 => {
                name = "removexattr";
                let key = *XATTRS.choose(&mut self.rng).unwrap_or(&"user.a");
                rustix::fs::lremovexattr(&p, key).map_err(errno)
            }
            24 => {
                name = "mkfifo";
                rustix::fs::mknodat(
                    CWD,
                    &p,
                    rustix::fs::FileType::Fifo,
                    rustix::fs::Mode::from_raw_mode(0o644),
                    0,
                )
                .map_err(errno)
            }
            _ => {
                name = "fsync";
                OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                    .open(&p)
                    .and_then(|f| f.sync_all())
            }
        };
        (name, res)
    }

    /// A starting tree (through the same path as everything else), so that the
    /// random operations mostly find what they look for.
    fn setup(&mut self) -> io::Result<()> {
        for a in DIRS {
            std::fs::create_dir(self.root.join(a))?;
            std::fs::write(self.root.join(a).join("f0"), a.as_bytes())?;
            for b in DIRS {
                std::fs::create_dir(self.root.join(a).join(b))?;
            }
        }
        std::fs::write(self.root.join("f0"), b"root file")?;
        Ok(())
    }

    fn run(&mut self, n: usize) {
        if let Err(e) = self.setup() {
            self.unexpected.push(format!("setup: {e}"));
        }
        for i in 0..n {
            let (name, res) = self.step();
            let st = self.stats.entry(name).or_default();
            match res {
                Ok(()) => st.0 += 1,
                Err(e) => {
                    st.1 += 1;
                    let code = e.raw_os_error().unwrap_or(0);
                    if !EXPECTED_ERRNOS.contains(&code) {
                        self.unexpected
                            .push(format!("op #{i} {name}: {} ({e})", errno_name(code)));
                    }
                }
            }
        }
    }
}

fn run_ops(root: &Path, seed: u64, n: usize) -> Runner {
    let mut r = Runner {
        root: root.to_path_buf(),
        rng: StdRng::seed_from_u64(seed),
        stats: BTreeMap::new(),
        unexpected: Vec::new(),
    };
    r.run(n);
    r
}

/// The harness itself: the same seed on two plain directories gives equal,
/// non-trivial trees without unexpected errors (so a difference through vmha-fs
/// is vmha-fs's doing), and a different seed gives a different tree.
#[test]
fn op_sequence_is_deterministic_on_plain_dirs() -> Result<()> {
    let a = tempfile::tempdir_in("/var/tmp")?;
    let b = tempfile::tempdir_in("/var/tmp")?;
    let c = tempfile::tempdir_in("/var/tmp")?;
    let ra = run_ops(a.path(), 7, 300);
    let rb = run_ops(b.path(), 7, 300);
    run_ops(c.path(), 8, 300);
    if !ra.unexpected.is_empty() || !rb.unexpected.is_empty() {
        bail!(
            "unexpected errors on a plain dir: {:?} {:?}",
            ra.unexpected,
            rb.unexpected
        );
    }
    eprintln!("plain dir stats: {:?}", ra.stats);
    let t = assert_same_tree(a.path(), b.path())?;
    if t.len() < 8 {
        bail!("only {} entries", t.len());
    }
    if assert_same_tree(a.path(), c.path()).is_ok() {
        bail!("seeds 7 and 8 produced identical trees: the comparison sees nothing");
    }
    Ok(())
}

fn random_ops(seed: u64, n: usize) -> Result<()> {
    eprintln!("random_ops: seed {seed} ({n} operations)");
    let pair = Pair::start(PairOptions::default())?;
    let r = run_ops(pair.mount(), seed, n);
    let ok: u32 = r.stats.values().map(|s| s.0).sum();
    eprintln!("seed {seed}: per op (ok, expected failure): {:?}", r.stats);

    let replica = assert_same_tree(pair.primary_backing(), pair.secondary_backing())
        .with_context(|| format!("seed {seed}: primary backing vs secondary backing"));
    let through_mount = assert_same_tree(pair.mount(), pair.primary_backing())
        .with_context(|| format!("seed {seed}: mount vs primary backing"));
    let mut problems = Vec::new();
    if !r.unexpected.is_empty() {
        problems.push(format!(
            "unexpected errors through the mount:\n{}",
            r.unexpected.join("\n")
        ));
    }
    match replica {
        Ok(t) if t.len() < 8 => problems.push(format!(
            "only {} entries in the final tree: the sequence did not exercise much",
            t.len()
        )),
        Ok(_) => {}
        Err(e) => problems.push(format!("{e:#}")),
    }
    if let Err(e) = through_mount {
        problems.push(format!("{e:#}"));
    }
    if (ok as usize) < n / 4 {
        problems.push(format!("only {ok} of {n} operations succeeded"));
    }
    if !problems.is_empty() {
        bail!("seed {seed}: {}", problems.join("\n\n"));
    }
    Ok(())
}

#[test]
fn random_ops_seed_1() -> Result<()> {
    random_ops(1, 300)
}

#[test]
fn random_ops_seed_2() -> Result<()> {
    random_ops(0x5eed_0002, 300)
}

#[test]
fn random_ops_seed_3() -> Result<()> {
    random_ops(0xdead_beef, 300)
}

/// A fresh seed every run (printed; reproduce with VMHA_SEED=<seed>).
#[test]
fn random_ops_random_seed() -> Result<()> {
    let seed = match std::env::var("VMHA_SEED") {
        Ok(s) => s.parse().with_context(|| format!("VMHA_SEED={s}"))?,
        Err(_) => rand::rng().random(),
    };
    random_ops(seed, 300).with_context(|| format!("reproduce with VMHA_SEED={seed}"))
}

const THREADS: usize = 4;
const ITERATIONS: usize = 48;
const FILE_SPAN: u64 = 8 * MIB;

/// One writer: O_DIRECT writes of 4 KiB and 64 KiB to its own file and to a shared
/// file, an fsync every few writes. Returns the expected content of its own file.
fn writer(mount: &Path, t: usize) -> Result<Vec<u8>> {
    let mut rng = StdRng::seed_from_u64(1000 + t as u64);
    let own = open_direct(&mount.join(format!("own{t}")), true)
        .with_context(|| format!("open own{t} O_DIRECT"))?;
    let shared = open_direct(&mount.join("shared"), true).context("open shared O_DIRECT")?;
    let mut model = Vec::new();
    for i in 0..ITERATIONS {
        let len = if rng.random_bool(0.5) { 4096 } else { 65536 };
        let mut buf = AlignedBuf::zeroed(len);
        rng.fill_bytes(&mut buf);
        buf[0] = t as u8;
        buf[1] = i as u8;
        let off = rng.random_range(0..(FILE_SPAN - len as u64) / 4096) * 4096;
        own.write_all_at(&buf, off)
            .with_context(|| format!("writer {t}: own write #{i} at {off}"))?;
        let end = off as usize + len;
        if model.len() < end {
            model.resize(end, 0);
        }
        model[off as usize..end].copy_from_slice(&buf);
        let soff = rng.random_range(0..(FILE_SPAN - len as u64) / 4096) * 4096;
        shared
            .write_all_at(&buf, soff)
            .with_context(|| format!("writer {t}: shared write #{i} at {soff}"))?;
        if i % 8 == 7 {
            own.sync_all()
                .with_context(|| format!("writer {t}: fsync own"))?;
            shared
                .sync_all()
                .with_context(|| format!("writer {t}: fsync shared"))?;
        }
    }
    own.sync_all()?;
    shared.sync_all()?;
    Ok(model)
}

#[test]
fn concurrent_direct_writers() -> Result<()> {
    let pair = Pair::start(PairOptions::default())?;
    let mount = pair.mount().to_path_buf();
    let models = std::thread::scope(|s| -> Result<Vec<Vec<u8>>> {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let m = mount.clone();
                s.spawn(move || writer(&m, t))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("writer thread panicked"))?)
            .collect()
    })?;
    for (t, model) in models.iter().enumerate() {
        let got = std::fs::read(pair.secondary_backing().join(format!("own{t}")))?;
        if &got != model {
            bail!(
                "own{t} on the secondary ({} bytes) differs from what writer {t} wrote ({} bytes)",
                got.len(),
                model.len()
            );
        }
    }
    assert_same_tree(pair.primary_backing(), pair.secondary_backing())
        .context("primary backing vs secondary backing")?;
    assert_same_tree(pair.mount(), pair.primary_backing()).context("mount vs primary backing")?;
    Ok(())
}

#[test]
fn punched_hole_is_a_hole_on_the_secondary() -> Result<()> {
    let pair = Pair::start(PairOptions::default())?;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(pair.mount().join("img"))?;
    f.write_all_at(&vec![0xaa; MIB as usize], 0)?;
    f.sync_all()?;
    rustix::fs::fallocate(
        &f,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        256 * 1024,
        256 * 1024,
    )
    .map_err(errno)
    .context("punch hole through the mount")?;
    f.sync_all()?;

    let sec = File::open(pair.secondary_backing().join("img"))?;
    let size = sec.metadata()?.len();
    if size != MIB {
        bail!("secondary file size {size}, expected {MIB}");
    }
    let hole = rustix::fs::seek(&sec, rustix::fs::SeekFrom::Hole(0)).map_err(errno)?;
    let data = rustix::fs::seek(&sec, rustix::fs::SeekFrom::Data(256 * 1024)).map_err(errno)?;
    if hole != 256 * 1024 || data != 512 * 1024 {
        bail!(
            "secondary: SEEK_HOLE(0) = {hole}, SEEK_DATA(256K) = {data}; expected a hole at 256K..512K"
        );
    }
    let mut buf = vec![0u8; MIB as usize];
    sec.read_exact_at(&mut buf, 0)?;
    let zeros = buf[256 * 1024..512 * 1024].iter().all(|b| *b == 0);
    let rest = buf[..256 * 1024].iter().all(|b| *b == 0xaa)
        && buf[512 * 1024..].iter().all(|b| *b == 0xaa);
    if !zeros || !rest {
        bail!("secondary content wrong (hole zeroed: {zeros}, rest intact: {rest})");
    }
    assert_same_tree(pair.primary_backing(), pair.secondary_backing())?;
    Ok(())
}

/// Every kind of mutation once, each required to succeed, then identical replicas.
/// (The random sequences above may by chance never succeed at some kind.)
#[test]
fn each_mutation_kind_replicates() -> Result<()> {
    let pair = Pair::start(PairOptions::default())?;
    let m = pair.mount();
    let p = |s: &str| m.join(s);
    let mut rng = StdRng::seed_from_u64(42);
    let mut big = vec![0u8; MIB as usize];
    rng.fill_bytes(&mut big);

    rustix::fs::mkdirat(CWD, p("d"), rustix::fs::Mode::from_raw_mode(0o750))
        .map_err(errno)
        .context("mkdir")?;
    std::fs::create_dir(p("empty")).context("mkdir empty")?;
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(p("d/f"))
        .context("create d/f")?;
    f.write_all_at(&big, 12345).context("1 MiB write")?;
    f.write_all_at(b"overwritten", 100).context("overwrite")?;
    f.set_len(600_000).context("truncate down")?;
    f.set_len(3 * MIB).context("truncate up")?;
    rustix::fs::fallocate(&f, FallocateFlags::empty(), 4 * MIB, MIB)
        .map_err(errno)
        .context("fallocate")?;
    rustix::fs::fallocate(&f, FallocateFlags::KEEP_SIZE, 5 * MIB, MIB)
        .map_err(errno)
        .context("fallocate keep size")?;
    rustix::fs::fallocate(
        &f,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        8192,
        3 * 4096,
    )
    .map_err(errno)
    .context("punch hole")?;
    rustix::fs::fallocate(&f, FallocateFlags::ZERO_RANGE, 200_000, 70_000)
        .map_err(errno)
        .context("zero range")?;
    drop(f);

    let c = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(p("c"))
        .context("create_new c")?;
    let src = File::open(p("d/f"))?;
    let (mut off_in, mut off_out) = (12345u64, 777u64);
    let n = rustix::fs::copy_file_range(&src, Some(&mut off_in), &c, Some(&mut off_out), 300_000)
        .map_err(errno)
        .context("copy_file_range")?;
    if n == 0 {
        bail!("copy_file_range copied nothing");
    }
    drop((src, c));

    std::os::unix::fs::symlink("d/f", p("s")).context("symlink")?;
    std::fs::hard_link(p("d/f"), p("l")).context("link")?;
    std::fs::set_permissions(p("d/f"), std::fs::Permissions::from_mode(0o4755))
        .context("chmod 4755")?;
    std::fs::set_permissions(p("empty"), std::fs::Permissions::from_mode(0o1777))
        .context("chmod 1777")?;
    for path in [p("c"), p("s")] {
        rustix::fs::chownat(
            CWD,
            &path,
            Some(rustix::fs::Uid::from_raw_unchecked(1000)),
            Some(rustix::fs::Gid::from_raw_unchecked(1000)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(errno)
        .with_context(|| format!("chown {}", path.display()))?;
    }
    rustix::fs::lsetxattr(p("c"), "user.x", b"xx", XattrFlags::empty())
        .map_err(errno)
        .context("setxattr user.x")?;
    rustix::fs::lsetxattr(p("c"), "user.y", b"yy", XattrFlags::empty())
        .map_err(errno)
        .context("setxattr user.y")?;
    rustix::fs::lremovexattr(p("c"), "user.y")
        .map_err(errno)
        .context("removexattr")?;
    rustix::fs::mknodat(
        CWD,
        p("d/fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o640),
        0,
    )
    .map_err(errno)
    .context("mkfifo")?;
    std::fs::write(p("g"), b"g")?;
    std::fs::write(p("h"), b"h")?;
    std::fs::rename(p("g"), p("g2")).context("rename")?;
    rustix::fs::renameat_with(CWD, p("h"), CWD, p("d/h2"), RenameFlags::NOREPLACE)
        .map_err(errno)
        .context("rename noreplace")?;
    rustix::fs::renameat_with(CWD, p("c"), CWD, p("g2"), RenameFlags::EXCHANGE)
        .map_err(errno)
        .context("rename exchange")?;
    std::fs::write(p("gone"), b"x")?;
    std::fs::remove_file(p("gone")).context("unlink")?;
    std::fs::create_dir(p("d/sub"))?;
    std::fs::remove_dir(p("d/sub")).context("rmdir")?;
    let mtime = 1_234_567_890;
    rustix::fs::utimensat(
        CWD,
        p("g2"),
        &Timestamps {
            last_access: Timespec {
                tv_sec: 1_000_000_000,
                tv_nsec: 0,
            },
            last_modification: Timespec {
                tv_sec: mtime,
                tv_nsec: 0,
            },
        },
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(errno)
    .context("utimes")?;

    let tree = assert_same_tree(pair.primary_backing(), pair.secondary_backing())
        .context("primary backing vs secondary backing")?;
    assert_same_tree(pair.mount(), pair.primary_backing()).context("mount vs primary backing")?;
    for must in ["d/f", "l", "s", "c", "g2", "d/h2", "d/fifo", "empty"] {
        if tree.get(must).is_none() {
            bail!("{must} missing from the final tree");
        }
    }
    // Timestamps are not part of the tree comparison, but an explicit utimes is a
    // mutation and must reach the replica.
    use std::os::unix::fs::MetadataExt;
    let sec_mtime = std::fs::symlink_metadata(pair.secondary_backing().join("g2"))?.mtime();
    if sec_mtime != mtime {
        bail!("utimes not replicated: secondary mtime {sec_mtime}, set {mtime}");
    }
    Ok(())
}
