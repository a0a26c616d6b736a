//! The benchmark run: set up targets, run every job on every target
//! (interleaved per job), collect results.

use crate::diskstats;
use crate::fio_json::{self, Metrics};
use crate::interrupt;
use crate::jobs::{self, Job};
use crate::report::{Meta, Prefill, Results, RunResult, StageReport};
use crate::sysinfo;
use crate::targets::{spawn_logged, Kind, Target};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use vmha_test_infra::bin::workspace_bin;
use vmha_test_infra::proc::Child;
use vmha_test_infra::vmha_fs_bin;

#[derive(Debug)]
pub struct Opts {
    pub out: PathBuf,
    pub size: String,
    pub runtime_s: u64,
    pub jobs: Vec<Job>,
    pub targets: Vec<Kind>,
    pub dir: PathBuf,
    pub keep: bool,
    pub verify: bool,
}

/// Slack over the nominal runtime before a fio run counts as hung.
const FIO_SLACK: Duration = Duration::from_secs(120);
/// Longer than the primary's metrics.json period (1 s).
const METRICS_SETTLE: Duration = Duration::from_millis(1500);
/// Prefill must manage at least this rate (bytes/s) before counting as hung.
const PREFILL_MIN_RATE: u64 = 2 << 20;

/// SIGKILLs fio and its job processes; if they are stuck in a FUSE request,
/// only the daemon's death frees them, so the target is aborted then.
fn kill_fio(fio: &mut Child, target: &mut Target) {
    if fio.kill_group().is_err() {
        target.abort();
        if let Err(e) = fio.kill_group() {
            eprintln!("vmha-bench: {e:#}");
        }
    }
}

/// Runs fio on `jobfile`; kills it (and, if it is stuck in a FUSE request,
/// the target's daemons) after `timeout`.
fn run_fio(
    target: &mut Target,
    jobfile: &Path,
    writes: bool,
    timeout: Duration,
) -> Result<Metrics> {
    let out = jobfile.with_extension("json");
    let mut cmd = Command::new("fio");
    cmd.arg("--output-format=json")
        .arg(format!("--output={}", out.display()))
        .arg(jobfile);
    let mut fio = spawn_logged("fio", cmd, &jobfile.with_extension("log"))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = fio.wait_timeout(Duration::from_millis(200))? {
            break st;
        }
        if let Err(e) = interrupt::check() {
            // The daemons stop gracefully later (Target's drop), unless fio
            // is stuck in them.
            kill_fio(&mut fio, target);
            return Err(e);
        }
        if Instant::now() > deadline {
            kill_fio(&mut fio, target);
            // A daemon that let a run hang is not trusted with the next one,
            // and touching its mount again could hang us too.
            let logs = target.log_tails(10);
            target.abort();
            bail!("fio still running after {timeout:?}; killed it and aborted the target; daemon logs:\n{logs}");
        }
    };
    if !status.success() {
        bail!("fio failed ({status}):\n{}", fio.log_tail(15));
    }
    let text = std::fs::read_to_string(&out).with_context(|| format!("read {}", out.display()))?;
    fio_json::parse(&text, writes)
}

/// What every run needs besides the options.
#[derive(Debug)]
struct RunCtx {
    size_bytes: u64,
    /// Job files, fio outputs and logs.
    work: PathBuf,
    /// Block device under the scratch dir, for disk traffic counters.
    dev: Option<(u32, u32)>,
}

/// Prefill, drop caches, measured run, replica check, cleanup.
fn run_one(target: &mut Target, job: &Job, opts: &Opts, ctx: &RunCtx) -> RunResult {
    let mut res = RunResult {
        job: job.name,
        target: target.kind,
        spec: *job,
        prefill: None,
        metrics: None,
        vs_local: None,
        vs_two_copies: None,
        replica_check: None,
        disk: None,
        stages: None,
        daemon_cpu: None,
        error: None,
    };
    let (size_bytes, work) = (ctx.size_bytes, &ctx.work);
    // Reads come from one copy: the two-copies baseline of a read is local's.
    let copies = if job.writes() {
        target.kind.copies()
    } else {
        1
    };
    let file_name = format!("{}.dat", job.name);
    let file = target.dir.join(&file_name);
    let stem = work.join(format!("{}-{}", job.name, target.kind.name()));
    if target.is_aborted() {
        res.error = Some("skipped: target aborted after an earlier hung run".to_owned());
        return res;
    }
    let measured = (|| -> Result<()> {
        target.ensure_healthy()?;
        let prefill_job = stem.with_extension("prefill.fio");
        std::fs::write(&prefill_job, jobs::prefill_file(&file, &opts.size, copies))?;
        let t0 = Instant::now();
        let prefill_timeout = Duration::from_secs(60 + size_bytes / PREFILL_MIN_RATE);
        let m = run_fio(target, &prefill_job, true, prefill_timeout).context("prefill")?;
        res.prefill = Some(Prefill {
            secs: t0.elapsed().as_secs_f64(),
            mib_s: m.mib_s,
        });
        sysinfo::drop_caches()?;
        let job_file = stem.with_extension("fio");
        std::fs::write(
            &job_file,
            jobs::job_file(job, &file, &opts.size, opts.runtime_s, copies),
        )?;
        let timeout = Duration::from_secs(opts.runtime_s) + FIO_SLACK;
        let before = ctx.dev.and_then(diskstats::read);
        let metrics_before = target.fs_metrics().map(|m| {
            // metrics.json is rewritten at most once a second: let the
            // prefill's operations land in it first.
            std::thread::sleep(METRICS_SETTLE);
            target.fs_metrics().unwrap_or(m)
        });
        let usage_before = target.daemon_usage();
        let mut m = run_fio(target, &job_file, job.writes(), timeout)?;
        let usage = target
            .daemon_usage()
            .zip(usage_before)
            .map(|(a, b)| a.since(&b));
        // fio sums the copies: the rate of one copy is what a replicated write gets.
        m.iops /= f64::from(copies);
        m.mib_s /= f64::from(copies);
        res.daemon_cpu = usage;
        res.metrics = Some(m);
        let after = ctx.dev.and_then(diskstats::read);
        res.disk = before.zip(after).map(|(b, a)| diskstats::delta(b, a));
        if let Some(b) = metrics_before {
            std::thread::sleep(METRICS_SETTLE);
            if let Some(a) = target.fs_metrics() {
                res.stages = Some(StageReport {
                    write: a.write_stages.since(&b.write_stages),
                    fsync: a.fsync_stages.since(&b.fsync_stages),
                    daemons: usage,
                });
            }
        }
        target.ensure_healthy().context("after the run")?;
        if opts.verify {
            res.replica_check = target.replica_check(&file_name);
        }
        Ok(())
    })();
    if let Err(e) = measured {
        res.error = Some(format!("{e:#}"));
    }
    // One file at a time keeps the disk need at ~3x size (vmha stores two).
    for file in jobs::copy_files(&file, copies) {
        if !target.is_aborted() && file.exists() {
            if let Err(e) = std::fs::remove_file(&file) {
                let msg = format!("remove {}: {e}", file.display());
                res.error = Some(res.error.map_or(msg.clone(), |old| format!("{old}; {msg}")));
            }
        }
    }
    res
}

/// Copies vmha-fs into the scratch dir: both nodes run the same build even
/// if the fs crate is rebuilt meanwhile, and the process name ("bench-vmhafs")
/// is not hit by someone's `pkill vmha-fs` / `killall vmha-fs` cleanup
/// (observed on the shared dev machine: our pair got SIGTERM mid-run).
fn snapshot_binary(bin: &Path, base: &Path) -> Result<PathBuf> {
    let dir = base.join("bin");
    std::fs::create_dir_all(&dir)?;
    let copy = dir.join("bench-vmhafs");
    std::fs::copy(bin, &copy)
        .with_context(|| format!("copy {} to {}", bin.display(), copy.display()))?;
    Ok(copy)
}

fn mtime_unix(path: &Path) -> Option<u64> {
    let t = std::fs::metadata(path).ok()?.modified().ok()?;
    Some(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs())
}

/// vmha-fuse-probe, when a probe target is selected: `$VMHA_FUSE_PROBE_BIN`
/// or next to this binary.
fn probe_bin(targets: &[Kind]) -> Result<Option<PathBuf>> {
    if !targets.iter().any(|k| k.is_probe()) {
        return Ok(None);
    }
    if targets.iter().any(|k| k.needs_uring()) && !vmha_test_infra::fuse_uring::available() {
        bail!(
            "an io_uring target is selected but this kernel has no FUSE over io_uring ({} is missing)",
            vmha_test_infra::fuse_uring::ENABLE_URING
        );
    }
    workspace_bin("vmha-fuse-probe", "VMHA_FUSE_PROBE_BIN").map(Some)
}

fn check_tools(targets: &[Kind]) -> Result<Option<PathBuf>> {
    if targets.contains(&Kind::Bindfs) {
        let ok = Command::new("bindfs")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            bail!("bindfs target selected but `bindfs --version` fails");
        }
    }
    if !targets.iter().any(|k| k.is_vmha()) {
        return Ok(None);
    }
    let bin = vmha_fs_bin()?;
    let help = Command::new(&bin)
        .arg("--help")
        .output()
        .with_context(|| format!("run {} --help", bin.display()))?;
    let text = String::from_utf8_lossy(&help.stdout);
    // A stub binary (fs crate still being written) exits 0 and prints nothing.
    if !help.status.success() || !text.contains("primary") || !text.contains("secondary") {
        bail!(
            "{} --help ({}) does not list primary/secondary: not a usable vmha-fs",
            bin.display(),
            help.status
        );
    }
    Ok(Some(bin))
}

/// Runs the benchmark; returns the results (errors of single runs are inside).
pub fn run(opts: &Opts) -> Result<Results> {
    let started = Instant::now();
    interrupt::install()?;
    let size_bytes = sysinfo::parse_size(&opts.size)?;
    let fio_version = sysinfo::fio_version()?;
    let vmha_fs = check_tools(&opts.targets)?;
    let probe = probe_bin(&opts.targets)?;

    let scratch = tempfile::Builder::new()
        .prefix("vmha-bench.")
        .tempdir_in(&opts.dir)
        .with_context(|| format!("create scratch dir in {}", opts.dir.display()))?;
    // Canonical, so paths compare equal to mountinfo's.
    let base = scratch.path().canonicalize()?;
    let need = size_bytes * 3 + (1 << 30);
    let free = sysinfo::free_bytes(&base)?;
    if free < need {
        bail!(
            "{} has {} MiB free; need {} MiB (3x size + 1 GiB)",
            base.display(),
            free >> 20,
            need >> 20
        );
    }
    let ctx = RunCtx {
        size_bytes,
        work: base.join("fio"),
        dev: diskstats::device_of(&base).ok(),
    };
    std::fs::create_dir_all(&ctx.work)?;
    let vmha_fs_copy = vmha_fs
        .as_deref()
        .map(|bin| snapshot_binary(bin, &base))
        .transpose()?;

    let mut targets = Vec::new();
    for k in &opts.targets {
        eprintln!("vmha-bench: setting up {}", k.name());
        targets.push(Target::setup(
            *k,
            &base.join(k.name()),
            vmha_fs_copy.as_deref(),
            probe.as_deref(),
        )?);
    }

    let mut runs = Vec::new();
    // Interleaved: drift over time (thermal, background writeback) hits
    // every target alike.
    for job in &opts.jobs {
        for t in targets.iter_mut() {
            eprintln!("vmha-bench: {} on {}", job.name, t.kind.name());
            let r = run_one(t, job, opts, &ctx);
            interrupt::check()?;
            if let Some(e) = &r.error {
                eprintln!("vmha-bench: {} on {} failed: {e}", job.name, t.kind.name());
            }
            runs.push(r);
        }
    }

    let mut notes = Vec::new();
    for t in targets {
        notes.extend(t.shutdown());
    }
    if opts.keep {
        let kept = scratch.keep();
        eprintln!("vmha-bench: scratch dir kept: {}", kept.display());
    }

    let now = sysinfo::unix_now();
    let mut results = Results {
        meta: Meta {
            fio_version,
            date_utc: sysinfo::utc_rfc3339(now),
            unix_time: now,
            kernel: sysinfo::kernel(),
            nproc: sysinfo::nproc(),
            mem_total_bytes: sysinfo::mem_total_bytes(),
            size: opts.size.clone(),
            size_bytes,
            runtime_s: opts.runtime_s,
            targets: opts.targets.clone(),
            jobs: opts.jobs.iter().map(|j| j.name.to_owned()).collect(),
            scratch_dir: base.display().to_string(),
            vmha_fs_mtime_unix: vmha_fs.as_deref().and_then(mtime_unix),
            vmha_fs_bin: vmha_fs.map(|p| p.display().to_string()),
            elapsed_s: started.elapsed().as_secs_f64(),
        },
        runs,
        notes,
    };
    results.compute_ratios();
    Ok(results)
}
