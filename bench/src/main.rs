//! vmha-bench: the same fio job set on a local directory, a vmha-fs pair on
//! this machine and bindfs (a plain FUSE pass-through), all on one disk.

mod diskstats;
mod failover;
mod fio_json;
mod floor;
mod interrupt;
mod jobs;
mod mounts;
mod report;
mod run;
mod scale;
mod swap;
mod sysinfo;
mod targets;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(name = "vmha-bench", version, about)]
// No subcommand means `fio` (the Makefile calls `vmha-bench --out ...`).
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    fio: FioArgs,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the fio job set on each target and report MiB/s, IOPS, latency
    /// percentiles and the ratio to `local`.
    ///
    /// Jobs (all direct=1, time based, one file per job written fully first):
    /// seqwrite (1M qd4 libaio), seqwrite-qd1 (1M qd1 psync), randwrite-sync
    /// (4k qd1 psync + fdatasync after each write), randwrite-qd16,
    /// randread-qd16 (4k libaio), seqread (1M qd4). For each job the targets
    /// run back to back (local, two-copies, vmha with each protocol, bindfs),
    /// with the page cache dropped before every measured run. `two-copies`
    /// runs the job twice at once on two local files (rates per copy): the
    /// best any two-copy system reaches on this one disk.
    /// Needs root (FUSE mounts, drop_caches), fio and bindfs; vmha-fs is
    /// taken from $VMHA_FS_BIN or from next to this binary.
    Fio(FioArgs),
    /// Failover time after a node crash and false failovers under a saturated
    /// replication link, on two simulated nodes running the counter guest
    /// (the end-to-end test setup) with DESIGN.md's default timeouts.
    ///
    /// Link load: `tc tbf` on the dedicated link of both nodes, fio writing
    /// sequentially through node1's replicated mount while both nodes'
    /// `vmctl status` is polled every 250 ms; once with the production link
    /// up, once with it down (heartbeats only over the saturated link).
    /// Crash: per run a fresh cluster, SIGKILL of every process of node1, then
    /// kill → ALONE on node2 and kill → first guest counter on node2, and
    /// whether node2's guest resumed at or after node1's last acknowledged
    /// counter. Exits non-zero on a lost counter, a false failover or an error.
    /// Needs root, fio, tc and the packages of .ci/install-deps; vmhad, vmctl
    /// and vmha-fs are taken from next to this binary.
    Failover(FailoverArgs),
    /// Guest downtime of a swap (issue 14): `vmctl swap --live` against
    /// stop/start, alternating direction on one pair of simulated nodes
    /// running the counter guest; last counter on the source to first
    /// counter on the destination, from the consoles polled every 10 ms.
    /// Needs root and the packages of .ci/install-deps.
    Swap(SwapArgs),
    /// Many modules on one pair (issue 12, item 2): idle cost per module
    /// (CPU, RSS/PSS, threads of vmhad and vmha-fs, packets per interface)
    /// and a node1 crash failing its modules over at once (kill → ALONE,
    /// kill → the module's writer writes again on node2).
    ///
    /// Two simulated nodes (the end-to-end setup), vmhad's default
    /// heartbeat (200 ms) and failover timeout (1500 ms); each module's domain is an idle QEMU (no disk, no kernel),
    /// its data written by a writer thread of this benchmark through the
    /// node's mount. Needs root and the packages of .ci/install-deps; vmhad,
    /// vmctl and vmha-fs are taken from next to this binary.
    Scale(ScaleArgs),
    /// The floor of a durable 4k write kept on two copies on this one disk,
    /// without FUSE, network or vmha (issue 11): both copies written, then
    /// both synced, in lockstep (a replica's order), against one copy (fio's
    /// durable job). Patterns: local, lockstep-direct (O_DIRECT writes),
    /// lockstep-buffered (writes through the page cache, vmha-fs's way),
    /// alternated over the rounds; flushes counted from /proc/diskstats.
    DurableFloor(floor::Opts),
}

fn durable_floor(opts: floor::Opts) -> Result<bool> {
    let results = floor::run(&opts)?;
    println!("{}", results.markdown());
    eprintln!("vmha-bench: wrote {}", opts.out.display());
    Ok(true)
}

#[derive(Debug, Args)]
struct ScaleArgs {
    /// Write all numbers as JSON here.
    #[arg(long, default_value = "bench/results-scale.json")]
    out: PathBuf,
    /// Modules on the pair.
    #[arg(long, default_value_t = 32)]
    modules: usize,
    /// Idle measurement window in seconds.
    #[arg(long, default_value_t = 60)]
    idle_seconds: u64,
    /// Home half of the modules on node2 (active/active) instead of all on
    /// node1; the crash of node1 then moves only half.
    #[arg(long)]
    split: bool,
    /// Pause between a module writer's writes.
    #[arg(long, default_value_t = 200)]
    write_interval_ms: u64,
    /// Idle windows measured one after the other (the spread between them
    /// shows the noise of the shared machine).
    #[arg(long, default_value_t = 3)]
    idle_windows: usize,
    /// `[cluster] heartbeat_interval_ms` (vmhad's default).
    #[arg(long, default_value_t = 200)]
    heartbeat_ms: u64,
    /// `[cluster] failover_timeout_ms` (vmhad's default).
    #[arg(long, default_value_t = 1500)]
    failover_ms: u64,
    /// Measure the idle windows only, without the node crash (for iterating
    /// on the idle cost).
    #[arg(long)]
    idle_only: bool,
}

fn scale(args: ScaleArgs) -> Result<bool> {
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "warn");
    }
    anyhow::ensure!(
        (1..=32).contains(&args.modules),
        "--modules must be 1 to 32 (the configuration's limit), not {}",
        args.modules
    );
    let opts = scale::Opts {
        out: args.out,
        modules: args.modules,
        idle_seconds: args.idle_seconds,
        all_on_node1: !args.split,
        write_interval_ms: args.write_interval_ms,
        idle_windows: args.idle_windows.max(1),
        idle_only: args.idle_only,
    };
    let timing = failover::default_timing(args.heartbeat_ms, args.failover_ms);
    let results = scale::run(&opts, &timing)?;
    println!("{}", results.markdown());
    eprintln!("vmha-bench: wrote {}", opts.out.display());
    Ok(results.error.is_none())
}

#[derive(Debug, Args)]
struct FailoverArgs {
    /// Write all numbers as JSON here.
    #[arg(long, default_value = "bench/results-failover.json")]
    out: PathBuf,
    /// Crash runs (0: skip).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// fio seconds per link-load scenario (0: skip the link-load part).
    #[arg(long, default_value_t = 60)]
    fio_seconds: u64,
    /// tbf rate of the dedicated link (tc syntax).
    #[arg(long, default_value = "100mbit")]
    rate: String,
    /// tbf burst (tc syntax).
    #[arg(long, default_value = "64kb")]
    burst: String,
    /// tbf latency: the longest a packet may wait in the shaper's queue.
    #[arg(long, default_value = "50ms")]
    latency: String,
    /// Skip the scenario with the production link down.
    #[arg(long)]
    no_production_down: bool,
    /// Busy-loop processes of the `cpu-loaded` scenario (production down,
    /// link saturated, every core busy); 0: skip it.
    #[arg(long, default_value_t = 4)]
    cpu_hogs: usize,
    /// The cluster's heartbeat interval (vmhad's default).
    #[arg(long, default_value_t = 200)]
    heartbeat_interval_ms: u64,
    /// The cluster's failover timeout (vmhad's default).
    #[arg(long, default_value_t = 1500)]
    failover_timeout_ms: u64,
}

fn failover(args: FailoverArgs) -> Result<bool> {
    // vmhad's info logs (forwarded to our stderr) would drown the progress lines.
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "warn");
    }
    let opts = failover::Opts {
        out: args.out,
        runs: args.runs,
        fio_seconds: args.fio_seconds,
        rate: args.rate,
        burst: args.burst,
        latency: args.latency,
        production_down: !args.no_production_down,
        cpu_hogs: args.cpu_hogs,
        heartbeat_interval_ms: args.heartbeat_interval_ms,
        failover_timeout_ms: args.failover_timeout_ms,
    };
    let results = failover::run(&opts)?;
    println!("{}", results.markdown());
    eprintln!("vmha-bench: wrote {}", opts.out.display());
    Ok(results.ok())
}

#[derive(Debug, Args)]
struct SwapArgs {
    /// Write all numbers as JSON here.
    #[arg(long, default_value = "bench/results-swap.json")]
    out: PathBuf,
    /// Swaps of each kind.
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

fn swap_bench(args: SwapArgs) -> Result<bool> {
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "warn");
    }
    let results = swap::run(args.runs, &args.out)?;
    println!("{}", results.markdown());
    eprintln!("vmha-bench: wrote {}", args.out.display());
    Ok(true)
}

#[derive(Debug, Args)]
struct FioArgs {
    /// Write all numbers as JSON here.
    #[arg(long, default_value = "bench/results.json")]
    out: PathBuf,
    /// File size per job (fio syntax, binary units: 256M, 1G).
    #[arg(long, default_value = "1G")]
    size: String,
    /// Measured seconds per job and target.
    #[arg(long, default_value_t = 20)]
    runtime: u64,
    /// Comma list of jobs: seqwrite,seqwrite-qd1,randwrite-sync,randwrite-qd16,randread-qd16,seqread
    /// [default: all]
    #[arg(long)]
    jobs: Option<String>,
    /// Comma list of targets: local, two-copies (two jobs on two local files at
    /// once: the two-copy limit of this disk), vmha (protocol C), vmha-B,
    /// vmha-flush, vmha-alone (vmha-fs primary with no peer: the FUSE path
    /// without replication, the ceiling of any protocol), bindfs, and the bare
    /// FUSE transports of vmha-fuse-probe: fuse-dev (/dev/fuse, 16 threads),
    /// fuse-uring (FUSE over io_uring, backing I/O on the ring; switches the
    /// fuse module's enable_uring on for the run), fuse-uring-sync (the same,
    /// backing I/O inline).
    #[arg(
        long,
        default_value = "local,two-copies,vmha,vmha-B,vmha-flush,vmha-alone,bindfs"
    )]
    targets: String,
    /// Run the targets of each job in the order given in --targets instead of
    /// the canonical one (local first): rotate it between runs so drift does
    /// not always favour the same target.
    #[arg(long)]
    as_given: bool,
    /// Parent of the scratch directory (on the disk to measure; not a tmpfs).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Keep the scratch directory (fio job files, outputs, daemon logs).
    #[arg(long)]
    keep: bool,
    /// Skip comparing the secondary's copy with the primary's after each vmha run.
    #[arg(long)]
    no_verify: bool,
}

fn fio(args: FioArgs) -> Result<bool> {
    let opts = run::Opts {
        out: args.out,
        size: args.size,
        runtime_s: args.runtime,
        jobs: jobs::select(args.jobs.as_deref())?,
        targets: if args.as_given {
            targets::Kind::parse_list_as_given(&args.targets)?
        } else {
            targets::Kind::parse_list(&args.targets)?
        },
        dir: args.dir,
        keep: args.keep,
        verify: !args.no_verify,
    };
    let results = run::run(&opts)?;
    println!("{}", results.markdown());
    let json = serde_json::to_string_pretty(&results)?;
    if let Some(parent) = opts.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&opts.out, json + "\n")
        .with_context(|| format!("write {}", opts.out.display()))?;
    eprintln!("vmha-bench: wrote {}", opts.out.display());
    Ok(results.runs.iter().all(|r| r.error.is_none()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Some(Cmd::Fio(a)) => fio(a),
        Some(Cmd::Failover(a)) => failover(a),
        Some(Cmd::Swap(a)) => swap_bench(a),
        Some(Cmd::Scale(a)) => scale(a),
        Some(Cmd::DurableFloor(a)) => durable_floor(a),
        None => fio(cli.fio),
    };
    match res {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("vmha-bench: some runs failed (see the table)");
            ExitCode::FAILURE
        }
        // Chain on one line; no backtrace noise (RUST_BACKTRACE is often set).
        Err(e) => {
            eprintln!("vmha-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
