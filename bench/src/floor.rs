//! `vmha-bench durable-floor`: what a durable 4k write kept on two copies
//! costs on this one disk with nothing else in the way — no FUSE, no
//! network, no vmha (issue 11, item 2: the durable-write target is 2× local).
//!
//! fio's `two-copies` target runs two independent jobs: each copy's write and
//! flush go when they like, so the device can serve one copy's flush while
//! the other's write runs and coalesce flushes that arrive together. A
//! synchronous replica cannot: the application's `fdatasync` comes after its
//! write returned, which (protocol C) is after both copies applied it, and the
//! sync returns when both copies are flushed. Each pattern here is one thread
//! per copy, the copies moving in lockstep (a barrier between the phases),
//! random 4 KiB blocks of a file written fully first:
//!
//! - `local`: one file, `pwrite` (O_DIRECT) + `fdatasync` — fio's durable job;
//! - `lockstep-direct`: both copies `pwrite` (O_DIRECT) at once, then both
//!   `fdatasync` at once;
//! - `lockstep-buffered`: the same with writes through the page cache (how
//!   vmha-fs applies them on both nodes by default): each `fdatasync` writes
//!   its page out and flushes.
//!
//! The barrier's two thread hand-offs per operation are part of any two-copy
//! system (a replica is another thread, or another machine). The patterns run
//! in rounds, alternated, so drift of the shared machine hits each alike;
//! the device's flush count is read from /proc/diskstats around each run.

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use vmha_fs::buffer::AlignedBuf;

use crate::diskstats;

const BLOCK: usize = 4096;

/// Options of one `durable-floor` run (its command line).
#[derive(Debug, clap::Args)]
pub struct Opts {
    /// Parent of the scratch directory (on the disk to measure).
    #[arg(long, default_value = "/var/tmp")]
    pub dir: PathBuf,
    /// Size of each copy's file in MiB (written fully first).
    #[arg(long, default_value_t = 1024)]
    pub size_mib: u64,
    /// Seconds per pattern and round.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Rounds (every pattern once per round).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Write all numbers as JSON here.
    #[arg(long, default_value = "bench/results-durable-floor.json")]
    pub out: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pattern {
    Local,
    LockstepDirect,
    LockstepBuffered,
}

impl Pattern {
    const ALL: [Pattern; 3] = [
        Pattern::Local,
        Pattern::LockstepDirect,
        Pattern::LockstepBuffered,
    ];

    fn name(self) -> &'static str {
        match self {
            Pattern::Local => "local",
            Pattern::LockstepDirect => "lockstep-direct",
            Pattern::LockstepBuffered => "lockstep-buffered",
        }
    }
}

/// One pattern's run in one round.
#[derive(Debug, Serialize)]
pub struct Sample {
    pub round: usize,
    pub pattern: Pattern,
    pub ops: u64,
    /// Mean time of one durable write (both copies, when two).
    pub us_per_op: f64,
    /// `us_per_op` over the same round's `local`.
    pub vs_local: f64,
    /// Device flushes per operation.
    pub flushes_per_op: f64,
}

#[derive(Debug, Serialize)]
pub struct Results {
    pub size_mib: u64,
    pub seconds: u64,
    pub samples: Vec<Sample>,
}

fn open(path: &Path, direct: bool) -> Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path)
        .with_context(|| format!("open {}", path.display()))
}

/// Writes `path` fully (1 MiB writes) and syncs it: every later write is an
/// overwrite of allocated blocks, as in fio's jobs after their prefill.
fn prefill(path: &Path, size_mib: u64) -> Result<()> {
    use std::io::Write;
    let mut f = File::create(path).with_context(|| format!("create {}", path.display()))?;
    let chunk = vec![0x5a_u8; 1 << 20];
    for _ in 0..size_mib {
        f.write_all(&chunk)
            .with_context(|| format!("write {}", path.display()))?;
    }
    f.sync_all()
        .with_context(|| format!("sync {}", path.display()))?;
    Ok(())
}

/// Writes `block` at `offset`, waits at `written` for the other copy's write
/// (even when this one failed: the other thread must not wait forever), then
/// syncs.
fn durable_write(file: &File, block: &AlignedBuf, offset: u64, written: &Barrier) -> Result<()> {
    let wrote = rustix::io::pwrite(file.as_fd(), block, offset);
    written.wait();
    match wrote.context("pwrite")? {
        BLOCK => {}
        n => bail!("short write: {n} of {BLOCK} bytes"),
    }
    rustix::fs::fdatasync(file.as_fd()).context("fdatasync")?;
    Ok(())
}

/// Runs `pattern` for `seconds`; returns the operations done.
fn run_pattern(pattern: Pattern, files: &[PathBuf; 2], size_mib: u64, seconds: u64) -> Result<u64> {
    let count = size_mib * (1 << 20) / BLOCK as u64;
    // The same sequence of blocks for every pattern and round.
    let mut rng = StdRng::seed_from_u64(0x9E37_79B9_7F4A_7C15);
    let mut next_offset = move || rng.random_range(0..count) * BLOCK as u64;
    let direct = pattern != Pattern::LockstepBuffered;
    let first = open(&files[0], direct)?;
    let block = AlignedBuf::filled(BLOCK, 0xa5);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    if pattern == Pattern::Local {
        let alone = Barrier::new(1);
        let mut ops = 0;
        while Instant::now() < deadline {
            durable_write(&first, &block, next_offset(), &alone)?;
            ops += 1;
        }
        return Ok(ops);
    }
    // The second copy: a thread that writes and syncs the same block in
    // lockstep. Barriers: start (the block is chosen), written (both
    // writes returned), synced (both syncs returned).
    let second = open(&files[1], direct)?;
    let offset = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (start, written, synced) = (
        Arc::new(Barrier::new(2)),
        Arc::new(Barrier::new(2)),
        Arc::new(Barrier::new(2)),
    );
    use std::sync::atomic::Ordering::SeqCst;
    let copy = {
        let (offset, stop) = (offset.clone(), stop.clone());
        let (start, written, synced) = (start.clone(), written.clone(), synced.clone());
        std::thread::Builder::new()
            .name("second-copy".into())
            .spawn(move || -> Result<()> {
                let block = AlignedBuf::filled(BLOCK, 0xa5);
                loop {
                    start.wait();
                    if stop.load(SeqCst) {
                        return Ok(());
                    }
                    let result = durable_write(&second, &block, offset.load(SeqCst), &written);
                    synced.wait();
                    result?;
                }
            })
            .context("start the second copy's thread")?
    };
    let mut ops = 0;
    let mut failed = None;
    while Instant::now() < deadline {
        offset.store(next_offset(), SeqCst);
        start.wait();
        let result = durable_write(&first, &block, offset.load(SeqCst), &written);
        synced.wait();
        if let Err(e) = result {
            failed = Some(e);
            break;
        }
        ops += 1;
    }
    stop.store(true, SeqCst);
    start.wait();
    match copy.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e.context("the second copy")),
        Err(_) => bail!("the second copy's thread panicked"),
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(ops),
    }
}

/// Runs every pattern `opts.rounds` times, alternated.
pub fn run(opts: &Opts) -> Result<Results> {
    if opts.size_mib == 0 || opts.seconds == 0 || opts.rounds == 0 {
        bail!("--size-mib, --seconds and --rounds must be at least 1");
    }
    let scratch = tempfile::Builder::new()
        .prefix("vmha-floor-")
        .tempdir_in(&opts.dir)
        .with_context(|| format!("scratch directory in {}", opts.dir.display()))?;
    let files = [scratch.path().join("a"), scratch.path().join("b")];
    for f in &files {
        prefill(f, opts.size_mib)?;
    }
    let dev = diskstats::device_of(scratch.path())?;
    let mut samples = Vec::new();
    for round in 1..=opts.rounds {
        let mut local_us = None;
        for pattern in Pattern::ALL {
            let before = diskstats::read(dev);
            let began = Instant::now();
            let ops = run_pattern(pattern, &files, opts.size_mib, opts.seconds)?;
            let elapsed = began.elapsed();
            let flushes = match (before, diskstats::read(dev)) {
                (Some(b), Some(a)) => diskstats::delta(b, a).flushes,
                _ => 0,
            };
            let us_per_op = elapsed.as_secs_f64() * 1e6 / ops.max(1) as f64;
            let local = *local_us.get_or_insert(us_per_op);
            let sample = Sample {
                round,
                pattern,
                ops,
                us_per_op,
                vs_local: us_per_op / local,
                flushes_per_op: flushes as f64 / ops.max(1) as f64,
            };
            eprintln!(
                "round {round}: {:<18} {:>7.1} µs/op ({:.2}× local, {:.2} flushes/op)",
                pattern.name(),
                sample.us_per_op,
                sample.vs_local,
                sample.flushes_per_op
            );
            samples.push(sample);
        }
    }
    let results = Results {
        size_mib: opts.size_mib,
        seconds: opts.seconds,
        samples,
    };
    if let Some(parent) = opts.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&opts.out, serde_json::to_string_pretty(&results)? + "\n")
        .with_context(|| format!("write {}", opts.out.display()))?;
    Ok(results)
}

impl Results {
    /// One row per pattern: mean, min and max over the rounds.
    pub fn markdown(&self) -> String {
        let mut s = String::from(
            "| pattern | µs per durable write (mean, min–max) | × local (mean, min–max) | flushes per write |\n| --- | --- | --- | --- |\n",
        );
        for pattern in Pattern::ALL {
            let of: Vec<&Sample> = self
                .samples
                .iter()
                .filter(|x| x.pattern == pattern)
                .collect();
            let stat = |f: fn(&Sample) -> f64| {
                let v: Vec<f64> = of.iter().map(|x| f(x)).collect();
                let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
                let min = v.iter().copied().fold(f64::INFINITY, f64::min);
                let max = v.iter().copied().fold(0.0, f64::max);
                (mean, min, max)
            };
            let (us, us_min, us_max) = stat(|x| x.us_per_op);
            let (r, r_min, r_max) = stat(|x| x.vs_local);
            let (fl, _, _) = stat(|x| x.flushes_per_op);
            s += &format!(
                "| {} | {us:.1} ({us_min:.1}–{us_max:.1}) | {r:.2}× ({r_min:.2}–{r_max:.2}) | {fl:.2} |\n",
                pattern.name()
            );
        }
        s
    }
}
