//! `vmha-bench-resync`: how long a returning peer takes to catch up, in one run.
//!
//! Two "nodes" on this machine: the receiver (`vmha-fs secondary`) runs in a network
//! namespace joined to the host by a veth pair, the writer (`vmha-fs primary`) on the
//! host. The veth is shaped with `tc tbf` (both directions) so every transfer is
//! link-bound and comparable; the link's TCP throughput is measured in the same run
//! (a plain bulk transfer over the same veth), unshaped first to show that the shaping
//! is the bottleneck.
//!
//! 1. A `--size-gib` image of distinct data; the first attach copies all of it
//!    ("full copy" baseline).
//! 2. For each N in `--percents`: the receiver is killed, the writer goes degraded
//!    (SIGUSR1) and N % of the image is rewritten through its mount (distinct random
//!    64 KiB-aligned chunks), the receiver restarts and the writer resyncs it
//!    (SIGUSR2, timed until `sync.json` says `in_sync`). Then the same change is
//!    carried by `rsync --inplace --no-whole-file` from the writer's file to a third
//!    copy kept one round behind, through an rsync daemon in the namespace.
//! 3. The three copies are compared by BLAKE3 (64 KiB reads, page cache evicted
//!    first), which also gives the full-compare hashing rate.
//!
//! Every file is evicted from the page cache (fadvise DONTNEED, per file: nothing
//! else on the machine is affected) before each timed step. Everything is torn down
//! at the end and on error or SIGINT/SIGTERM (guards; processes killed by PID).

#[path = "../interrupt.rs"]
mod interrupt;

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

// The link probe and page-cache eviction, shared with `vmha-bench-bigdata`.
#[path = "../netprobe.rs"]
mod netprobe;
use netprobe::{evict, probe_link};

// Host facts shared with `vmha-bench` (its module, compiled into this binary too).
#[path = "../sysinfo.rs"]
#[allow(dead_code)]
mod sysinfo;
use clap::Parser;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use vmha_fs::status::{StatusFile, SyncPhase, SyncStatus};
use vmha_test_infra::hostlink::HostLink;
use vmha_test_infra::resync::{fill_image, ResyncSetup};
use vmha_test_infra::{lazy_unmount_all, Child};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Size and alignment of a rewritten chunk.
const CHUNK: u64 = 64 << 10;
/// Read size of the hashing pass.
const HASH_READ: usize = 64 << 10;
/// Ports inside the fresh namespace (nothing else listens there).
const RSYNC_PORT: u16 = 8730;
const IMAGE: &str = "vm1/disk.img";

#[derive(Parser, Debug)]
#[command(
    name = "vmha-bench-resync",
    about = "Incremental resync vs full copy vs rsync over a shaped veth"
)]
struct Args {
    /// Where the three copies go (needs 3 × size + 1 GiB free).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Image size in GiB.
    #[arg(long, default_value_t = 4)]
    size_gib: u64,
    /// Percentages of the image rewritten before each resync, in order.
    #[arg(long, value_delimiter = ',', default_value = "1,10")]
    percents: Vec<u32>,
    /// Link rate in Mbit/s (`tc tbf` on both ends of the veth); 0 = unshaped.
    #[arg(long, default_value_t = 1000)]
    rate_mbit: u32,
    /// MiB sent by each link-throughput probe.
    #[arg(long, default_value_t = 512)]
    probe_mib: u64,
    /// Machine-readable results.
    #[arg(long, default_value = "bench/results-resync.json")]
    out: PathBuf,
    /// Leave the page cache as it is before the timed steps (default: every copy is
    /// evicted first, so reads come from the disk); shows what the disk reads cost.
    #[arg(long)]
    keep_cache: bool,
    /// Also write the markdown tables here (they are always printed).
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Time vmha only (no rsync copy, no rsync rounds): for repeated resync runs.
    #[arg(long)]
    skip_rsync: bool,
    /// Extra argument for the writer (`vmha-fs primary`), repeatable, e.g.
    /// `--writer-arg=--resync-streams=4`.
    #[arg(long, allow_hyphen_values = true)]
    writer_arg: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Results {
    started_utc: String,
    image_bytes: u64,
    rate_mbit: u32,
    /// Extra arguments the writer ran with (`--writer-arg`).
    writer_args: Vec<String>,
    /// The page cache was not evicted before the timed steps (`--keep-cache`).
    keep_cache: bool,
    /// TCP goodput over the veth before shaping, MB/s (10^6 bytes).
    unshaped_link_mbps: f64,
    /// TCP goodput over the shaped veth, MB/s: the throughput of the target.
    link_mbps: f64,
    shaping_is_bottleneck: bool,
    full_copy: Transfer,
    /// `image_bytes / link throughput`.
    full_copy_expected_s: f64,
    rounds: Vec<Round>,
    hashing: Hashing,
    copies_identical: bool,
    loadavg_start: String,
    loadavg_end: String,
    cpus: usize,
}

#[derive(Debug, Serialize, Clone)]
struct Transfer {
    seconds: f64,
    /// Host → namespace bytes on the veth (frames, headers included).
    tx_bytes: u64,
    /// Namespace → host bytes (acknowledgements, rsync's block checksums).
    rx_bytes: u64,
    /// Busy share of all CPUs of the machine during the transfer (other agents too).
    machine_cpu_busy_pct: f64,
    loadavg_before: String,
}

#[derive(Debug, Serialize)]
struct Round {
    percent: u32,
    changed_bytes: u64,
    chunks: u64,
    vmha: Transfer,
    /// `sync.json`'s total_bytes: what the writer decided to send.
    vmha_planned_bytes: u64,
    /// Bytes on the link host → namespace ÷ resync time, MB/s (10^6 bytes).
    vmha_link_mbps: f64,
    /// CPU seconds (user + system) the writer / receiver process used during it.
    writer_cpu_s: f64,
    receiver_cpu_s: f64,
    /// None with `--skip-rsync`.
    rsync: Option<Transfer>,
    rsync_literal_bytes: Option<u64>,
    rsync_matched_bytes: Option<u64>,
    /// 1.5 × changed / link throughput + 1 s.
    target_s: f64,
    pass: bool,
}

#[derive(Debug, Serialize)]
struct Hashing {
    /// BLAKE3 over each copy read from disk (page cache evicted), MiB/s.
    cold_mibps: Vec<f64>,
    /// The same file again from the page cache (CPU-bound), MiB/s.
    cached_mibps: f64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("vmha-bench-resync: the copies differ after the run");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("vmha-bench-resync: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn log(msg: impl AsRef<str>) {
    eprintln!("[bench-resync] {}", msg.as_ref());
}

/// Everything the run creates. Field order is drop order: the children (killed by
/// PID), then the setup (the mounts they leave, the namespace, the directory).
#[derive(Debug)]
struct Bench {
    writer: Option<Child>,
    receiver: Option<Child>,
    rsyncd: Option<Child>,
    /// The test crate's writer ("a", host) / receiver ("b", namespace) setup: the
    /// one `tests/tests/incremental_resync.rs` uses.
    s: ResyncSetup,
    /// The rsync destination (module `bench` of the daemon).
    r: PathBuf,
    keep_cache: bool,
    writer_args: Vec<String>,
}

impl Bench {
    fn new(dir: &Path, keep_cache: bool) -> Result<Bench> {
        let s = ResyncSetup::in_dir(dir, "vmha-bench-resync-")?;
        let r = s.root().join("r");
        std::fs::create_dir_all(&r)?;
        Ok(Bench {
            writer: None,
            receiver: None,
            rsyncd: None,
            s,
            r,
            keep_cache,
            writer_args: Vec::new(),
        })
    }

    fn start_receiver(&mut self) -> Result<()> {
        self.receiver = Some(self.s.secondary(&self.s.b)?);
        Ok(())
    }

    fn kill_receiver(&mut self) -> Result<()> {
        if let Some(mut c) = self.receiver.take() {
            c.kill()?;
        }
        // The read-only bind a killed secondary leaves over its directory.
        lazy_unmount_all(&self.s.b.data).map(drop)
    }

    fn start_writer(&mut self) -> Result<()> {
        let extra: Vec<&str> = self.writer_args.iter().map(String::as_str).collect();
        self.writer = Some(self.s.primary_alone(&self.s.a, &extra)?);
        Ok(())
    }

    /// CPU seconds used so far by the writer and the receiver process.
    fn vmha_cpu_s(&self) -> Result<(f64, f64)> {
        let of = |c: &Option<Child>| -> Result<f64> {
            let Some(c) = c else { return Ok(0.0) };
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", c.pid()))?;
            // Fields after the command (which may hold spaces) end with ')'.
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
                + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
            // SAFETY: sysconf only reads a constant of the system.
            let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
            Ok(ticks / hz.max(1.0))
        };
        Ok((of(&self.writer)?, of(&self.receiver)?))
    }

    fn writer(&mut self) -> Result<&mut Child> {
        self.writer.as_mut().context("the writer is not running")
    }

    /// SIGUSR2 and wait for `in_sync`; returns sync.json and the time it took.
    fn attach_and_wait(&mut self) -> Result<(SyncStatus, Duration)> {
        let _ = std::fs::remove_file(self.s.a.state.join(SyncStatus::FILE));
        let start = Instant::now();
        self.writer()?.send_signal(libc::SIGUSR2)?;
        let deadline = start + Duration::from_secs(1800);
        loop {
            // Read through vmha-fs's own type (the state-directory contract).
            if let Ok(Some(s)) = SyncStatus::read_from(&self.s.a.state) {
                match s.state {
                    SyncPhase::InSync => return Ok((s, start.elapsed())),
                    SyncPhase::Alone => bail!("the resync failed: {s:?}"),
                    _ => {}
                }
            }
            if Instant::now() > deadline {
                bail!("no in_sync within 30 min");
            }
            if let Some(st) = self.writer()?.try_status()? {
                bail!("the writer exited ({st}) during the resync");
            }
            interrupt::check()?;
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn start_rsyncd(&mut self) -> Result<()> {
        let conf = self.s.root().join("rsyncd.conf");
        std::fs::write(
            &conf,
            format!(
                "use chroot = no\nuid = root\ngid = root\n[bench]\npath = {}\nread only = no\n",
                self.r.display()
            ),
        )?;
        let mut c = self.s.link.command("rsync");
        c.arg("--daemon")
            .arg("--no-detach")
            .arg(format!("--config={}", conf.display()))
            .arg(format!("--address={}", self.s.link.ns_addr))
            .arg(format!("--port={RSYNC_PORT}"))
            .arg(format!(
                "--log-file={}",
                self.s.root().join("rsyncd.log").display()
            ));
        let mut child = Child::spawn("rsyncd", c)?;
        let addr = SocketAddr::new(self.s.link.ns_addr.into(), RSYNC_PORT);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Some(st) = child.try_status()? {
                bail!("rsync --daemon exited ({st}): {}", child.stderr_text());
            }
            if Instant::now() > deadline {
                bail!("rsync --daemon not listening after 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.rsyncd = Some(child);
        Ok(())
    }

    /// `rsync --inplace --no-whole-file` of the writer's image onto the copy in the
    /// namespace; returns rsync's `--stats` output.
    fn rsync(&self) -> Result<String> {
        let src = self.s.a.data.join(IMAGE);
        let dst = format!(
            "rsync://{}:{RSYNC_PORT}/bench/disk.img",
            self.s.link.ns_addr
        );
        let out = Command::new("rsync")
            .args(["--inplace", "--no-whole-file", "--ignore-times", "--stats"])
            .arg(&src)
            .arg(&dst)
            .stdin(Stdio::null())
            .output()
            .context("running rsync")?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "rsync failed ({}): {}{stdout}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(stdout)
    }

    fn images(&self) -> [PathBuf; 3] {
        [
            self.s.a.data.join(IMAGE),
            self.s.b.data.join(IMAGE),
            self.r.join("disk.img"),
        ]
    }

    fn evict_all(&self) -> Result<()> {
        for p in self.images() {
            if p.exists() {
                evict(&p)?;
            }
        }
        Ok(())
    }

    /// Times `f` with the veth's counters and the machine's CPU use around it.
    fn measure<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<(T, Transfer)> {
        if !self.keep_cache {
            self.evict_all()?;
        }
        let loadavg_before = sysinfo::loadavg();
        let (tx, rx) = (self.s.link.host_tx_bytes()?, self.s.link.host_rx_bytes()?);
        let cpu = CpuTimes::read()?;
        let start = Instant::now();
        let value = f(self)?;
        let seconds = start.elapsed().as_secs_f64();
        let busy = cpu.busy_pct_since()?;
        Ok((
            value,
            Transfer {
                seconds,
                tx_bytes: self.s.link.host_tx_bytes()? - tx,
                rx_bytes: self.s.link.host_rx_bytes()? - rx,
                machine_cpu_busy_pct: busy,
                loadavg_before,
            },
        ))
    }
}

/// Aggregate jiffies from /proc/stat.
struct CpuTimes {
    busy: u64,
    total: u64,
}

impl CpuTimes {
    fn read() -> Result<CpuTimes> {
        let text = std::fs::read_to_string("/proc/stat")?;
        let line = text.lines().next().context("empty /proc/stat")?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        if v.len() < 5 {
            bail!("unexpected /proc/stat: {line}");
        }
        let total: u64 = v.iter().take(8).sum();
        // idle + iowait
        let idle = v[3] + v[4];
        Ok(CpuTimes {
            busy: total - idle,
            total,
        })
    }

    fn busy_pct_since(&self) -> Result<f64> {
        let now = CpuTimes::read()?;
        let total = now.total.saturating_sub(self.total);
        if total == 0 {
            return Ok(0.0);
        }
        Ok(100.0 * now.busy.saturating_sub(self.busy) as f64 / total as f64)
    }
}

fn tc(args: &[&str]) -> Result<()> {
    let out = Command::new("tc")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running tc")?;
    if !out.status.success() {
        bail!(
            "tc {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Token bucket on both ends of the veth: every byte either way crosses one.
fn shape(link: &HostLink, rate_mbit: u32) -> Result<()> {
    let rate = format!("{rate_mbit}mbit");
    // A burst of ~2 ms of traffic, at least one 64 KiB GSO frame.
    let burst = format!(
        "{}",
        (u64::from(rate_mbit) * 1_000_000 / 8 / 500).max(128 << 10)
    );
    let q = [
        "root", "tbf", "rate", &rate, "burst", &burst, "latency", "50ms",
    ];
    let mut host = vec!["qdisc", "replace", "dev", link.host_if()];
    host.extend_from_slice(&q);
    tc(&host)?;
    let mut ns = vec!["-n", link.netns(), "qdisc", "replace", "dev", "eth0"];
    ns.extend_from_slice(&q);
    tc(&ns)
}

/// Rewrites `percent` % of the file through `path` (the writer's mount) in distinct
/// random 64 KiB-aligned chunks; returns the number of chunks.
fn rewrite(path: &Path, size: u64, percent: u32, seed: u64) -> Result<u64> {
    let slots = size / CHUNK;
    let count = (slots * u64::from(percent)).div_ceil(100).min(slots);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut order: Vec<u64> = (0..slots).collect();
    order.shuffle(&mut rng);
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    let mut buf = vec![0u8; CHUNK as usize];
    for &slot in order.iter().take(count as usize) {
        interrupt::check()?;
        rng.fill(&mut buf[..]);
        f.write_all_at(&buf, slot * CHUNK)?;
    }
    f.sync_all()?;
    Ok(count)
}

/// BLAKE3 of the file in 64 KiB reads; returns the hash and MiB/s.
fn hash_file(path: &Path) -> Result<(blake3::Hash, f64)> {
    let mut f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut buf = vec![0u8; HASH_READ];
    let mut h = blake3::Hasher::new();
    let mut n = 0u64;
    let start = Instant::now();
    loop {
        let r = f.read(&mut buf)?;
        if r == 0 {
            break;
        }
        h.update(&buf[..r]);
        n += r as u64;
    }
    let rate = n as f64 / MIB as f64 / start.elapsed().as_secs_f64();
    Ok((h.finalize(), rate))
}

/// A number after `label` in rsync's --stats output ("Literal data: 1,234 bytes").
fn rsync_stat(stats: &str, label: &str) -> Option<u64> {
    let line = stats.lines().find(|l| l.trim_start().starts_with(label))?;
    let rest = line.split_once(':')?.1;
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == ',' || *c == '.')
        .filter(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

fn check_tools() -> Result<()> {
    for (tool, arg) in [
        ("rsync", "--version"),
        ("tc", "-V"),
        ("nsenter", "--version"),
    ] {
        let ok = Command::new(tool)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            bail!("`{tool}` is not available: run .ci/install-deps (make deps)");
        }
    }
    if !rustix::process::geteuid().is_root() {
        bail!("must run as root (network namespace, tc, FUSE mounts)");
    }
    Ok(())
}

fn check_space(dir: &Path, size: u64) -> Result<()> {
    let need = 3 * size + GIB;
    let vfs = rustix::fs::statvfs(dir).with_context(|| format!("statvfs {}", dir.display()))?;
    let avail = vfs.f_bavail * vfs.f_frsize;
    if avail < need {
        bail!(
            "not enough free space in {}: {:.1} GiB available, {:.1} GiB needed (3 copies of a {} GiB image + 1 GiB); free some or pass --dir / --size-gib",
            dir.display(),
            avail as f64 / GIB as f64,
            need as f64 / GIB as f64,
            size / GIB
        );
    }
    log(format!(
        "{:.1} GiB free in {} ({:.1} GiB needed)",
        avail as f64 / GIB as f64,
        dir.display(),
        need as f64 / GIB as f64
    ));
    Ok(())
}

fn run(args: &Args) -> Result<bool> {
    interrupt::install()?;
    check_tools()?;
    if args.size_gib == 0 || args.percents.is_empty() {
        bail!("--size-gib and --percents must not be empty");
    }
    let size = args.size_gib * GIB;
    check_space(&args.dir, size)?;
    let started_utc = sysinfo::utc_rfc3339(sysinfo::unix_now());
    let loadavg_start = sysinfo::loadavg();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());

    let mut b = Bench::new(&args.dir, args.keep_cache)?;
    b.writer_args.clone_from(&args.writer_arg);
    let probe = args.probe_mib * MIB;
    let unshaped = probe_link(&b.s.link, probe)?;
    log(format!("unshaped veth: {unshaped:.0} MB/s"));
    let link_mbps = if args.rate_mbit > 0 {
        shape(&b.s.link, args.rate_mbit)?;
        let shaped = probe_link(&b.s.link, probe)?;
        log(format!(
            "shaped to {} Mbit/s: {shaped:.1} MB/s",
            args.rate_mbit
        ));
        shaped
    } else {
        unshaped
    };
    let shaping_is_bottleneck = args.rate_mbit > 0 && link_mbps < 0.8 * unshaped;
    if args.rate_mbit > 0 && !shaping_is_bottleneck {
        log("warning: the shaped link is not clearly slower than the unshaped one");
    }
    let bps = link_mbps * 1e6;

    log(format!("writing a {} GiB image", args.size_gib));
    let image = b.s.a.data.join(IMAGE);
    fill_image(&image, size, interrupt::check)?;
    if !args.skip_rsync {
        // The rsync destination starts as the image before any change.
        std::fs::copy(&image, b.r.join("disk.img")).context("copying the rsync destination")?;
        std::fs::File::open(b.r.join("disk.img"))?.sync_all()?;
    }

    b.start_receiver()?;
    b.start_writer()?;
    log("full copy (first attach)");
    let ((status, _), full_copy) = b.measure(|b| b.attach_and_wait())?;
    log(format!(
        "full copy: {:.1} s, {} MiB on the link; sync.json {status:?}",
        full_copy.seconds,
        full_copy.tx_bytes / MIB
    ));
    let full_copy_expected_s = size as f64 / bps;
    if !args.skip_rsync {
        b.start_rsyncd()?;
    }

    let mut rounds = Vec::new();
    for (i, &percent) in args.percents.iter().enumerate() {
        log(format!("round {percent}%: receiver down, writer degraded"));
        b.kill_receiver()?;
        b.writer()?.send_signal(libc::SIGUSR1)?;
        std::thread::sleep(Duration::from_millis(500));
        let chunks = rewrite(&b.s.a.mnt.join(IMAGE), size, percent, 100 + i as u64)?;
        let changed_bytes = chunks * CHUNK;
        b.start_receiver()?;
        let cpu_before = b.vmha_cpu_s()?;
        let ((status, _), vmha) = b.measure(|b| b.attach_and_wait())?;
        let cpu_after = b.vmha_cpu_s()?;
        let (writer_cpu_s, receiver_cpu_s) =
            (cpu_after.0 - cpu_before.0, cpu_after.1 - cpu_before.1);
        log(format!(
            "vmha-fs CPU during the resync: writer {writer_cpu_s:.2} s, receiver {receiver_cpu_s:.2} s"
        ));
        let vmha_planned_bytes = status.total_bytes;
        log(format!(
            "vmha resync of {} MiB: {:.2} s, {} MiB on the link",
            changed_bytes / MIB,
            vmha.seconds,
            vmha.tx_bytes / MIB
        ));
        let (stats, rsync) = if args.skip_rsync {
            (String::new(), None)
        } else {
            let (stats, rsync) = b.measure(|b| b.rsync())?;
            log(format!(
                "rsync: {:.2} s, {} MiB on the link",
                rsync.seconds,
                (rsync.tx_bytes + rsync.rx_bytes) / MIB
            ));
            (stats, Some(rsync))
        };
        let target_s = 1.5 * changed_bytes as f64 / bps + 1.0;
        rounds.push(Round {
            percent,
            changed_bytes,
            chunks,
            pass: vmha.seconds <= target_s,
            vmha_link_mbps: vmha.tx_bytes as f64 / vmha.seconds / 1e6,
            writer_cpu_s,
            receiver_cpu_s,
            vmha,
            vmha_planned_bytes,
            rsync_literal_bytes: rsync_stat(&stats, "Literal data"),
            rsync_matched_bytes: rsync_stat(&stats, "Matched data"),
            rsync,
            target_s,
        });
    }

    // Stop cleanly so every copy is final, then compare (and time the hashing).
    if let Some(mut w) = b.writer.take() {
        w.terminate(Duration::from_secs(60))?;
    }
    if let Some(mut r) = b.receiver.take() {
        r.terminate(Duration::from_secs(60))?;
    }
    lazy_unmount_all(&b.s.a.mnt)?;
    lazy_unmount_all(&b.s.b.data)?;
    b.evict_all()?;
    let mut hashes = Vec::new();
    let mut cold = Vec::new();
    for p in b.images().into_iter().filter(|p| p.exists()) {
        let (h, rate) = hash_file(&p)?;
        log(format!(
            "blake3 {}: {rate:.0} MiB/s (from disk)",
            p.display()
        ));
        hashes.push(h);
        cold.push(rate);
    }
    let (_, cached) = hash_file(&image)?;
    log(format!("blake3 from the page cache: {cached:.0} MiB/s"));
    let copies_identical = hashes.windows(2).all(|w| w[0] == w[1]);

    let results = Results {
        started_utc,
        image_bytes: size,
        rate_mbit: args.rate_mbit,
        writer_args: args.writer_arg.clone(),
        keep_cache: args.keep_cache,
        unshaped_link_mbps: unshaped,
        link_mbps,
        shaping_is_bottleneck,
        full_copy,
        full_copy_expected_s,
        rounds,
        hashing: Hashing {
            cold_mibps: cold,
            cached_mibps: cached,
        },
        copies_identical,
        loadavg_start,
        loadavg_end: sysinfo::loadavg(),
        cpus,
    };
    drop(b);
    let json = serde_json::to_string_pretty(&results)?;
    std::fs::write(&args.out, json + "\n")
        .with_context(|| format!("writing {}", args.out.display()))?;
    let md = markdown(&results);
    println!("{md}");
    if let Some(p) = &args.markdown {
        std::fs::write(p, &md).with_context(|| format!("writing {}", p.display()))?;
    }
    // A missed target is a result (FAIL in the table), not a failed run.
    for r in results.rounds.iter().filter(|r| !r.pass) {
        log(format!(
            "target missed at {}%: {:.2} s > {:.2} s",
            r.percent, r.vmha.seconds, r.target_s
        ));
    }
    Ok(copies_identical)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn first_word(s: &str) -> &str {
    s.split_whitespace().next().unwrap_or("")
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

fn markdown(r: &Results) -> String {
    let mut s = String::new();
    let link = if r.rate_mbit > 0 {
        format!(
            "veth shaped to {} Mbit/s (tbf): {:.1} MB/s measured (unshaped {:.0} MB/s)",
            r.rate_mbit, r.link_mbps, r.unshaped_link_mbps
        )
    } else {
        format!("veth unshaped: {:.0} MB/s measured", r.link_mbps)
    };
    let cache = if r.keep_cache {
        "page cache kept (`--keep-cache`)"
    } else {
        "page cache evicted before each timed step"
    };
    s.push_str(&format!(
        "Run of {}, {} GiB image, {link}, {cache}; full copy (first attach) {:.1} s, {:.0} MiB on the link ({} GiB / link = {:.1} s); loadavg {} → {} ({} CPUs).\n\n",
        r.started_utc,
        r.image_bytes / GIB,
        r.full_copy.seconds,
        mib(r.full_copy.tx_bytes),
        r.image_bytes / GIB,
        r.full_copy_expected_s,
        r.loadavg_start,
        r.loadavg_end,
        r.cpus
    ));
    s.push_str("| N | changed MiB | vmha resync s | vmha MiB on link | full copy s | rsync s | rsync MiB on link (→/←) | link MB/s | target s | vmha vs target | BLAKE3 MiB/s (disk, median of 3 copies / cached) | loadavg (1 min) before resync / rsync | CPU busy resync / rsync |\n");
    s.push_str("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
    let cold = median(&r.hashing.cold_mibps);
    let none = Transfer {
        seconds: f64::NAN,
        tx_bytes: 0,
        rx_bytes: 0,
        machine_cpu_busy_pct: f64::NAN,
        loadavg_before: "-".into(),
    };
    for x in &r.rounds {
        let rsync = x.rsync.as_ref().unwrap_or(&none);
        s.push_str(&format!(
            "| {}% | {:.0} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} / {:.1} | {:.1} | {:.2} | {} | {:.0} / {:.0} | {} / {} | {:.0}% / {:.0}% |\n",
            x.percent,
            mib(x.changed_bytes),
            x.vmha.seconds,
            mib(x.vmha.tx_bytes + x.vmha.rx_bytes),
            r.full_copy.seconds,
            rsync.seconds,
            mib(rsync.tx_bytes),
            mib(rsync.rx_bytes),
            r.link_mbps,
            x.target_s,
            if x.pass { "PASS" } else { "**FAIL**" },
            cold,
            r.hashing.cached_mibps,
            first_word(&x.vmha.loadavg_before),
            first_word(&rsync.loadavg_before),
            x.vmha.machine_cpu_busy_pct,
            rsync.machine_cpu_busy_pct,
        ));
    }
    s.push_str(&format!(
        "\nCopies identical after the run (BLAKE3 of writer, receiver, rsync copy): {}.\n",
        if r.copies_identical { "yes" } else { "**NO**" }
    ));
    s
}
