//! `vmha-bench-bigdata`: vmha-fs at scale (issue 12, items 3 and 4).
//!
//! The same two nodes as `vmha-bench-resync` ([`ResyncSetup`]: the receiver in a
//! network namespace behind an unshaped veth, the writer on the host), with
//!
//! - `files --count N`: N small files created directly in the writer's backing
//!   directory before it is mounted (1000 per subdirectory); time until the first
//!   write through the fresh mount, the first attach (full replication), the peer
//!   killed while 1 % of the files are rewritten through the mount, the
//!   incremental reintegration (bytes both ways on the veth: the receiver's report
//!   comes back), a verify; VmHWM of both processes.
//! - `sparse --size-gib S`: a sparse image of S GiB; the first attach, `--written-mib`
//!   written while connected in 1 MiB pieces spread evenly over the image (the
//!   activity log sees every extent), then the peer killed and 1 % of the written
//!   portion rewritten in 4 KiB pieces scattered over it (dirty maps), the
//!   reintegration; VmRSS of the writer before and after each step, the size of the
//!   records in the state directory; a verify (it reads only the data: holes are
//!   skipped on both sides), with `read_bytes` and both processes' CPU time. VmRSS
//!   of both processes idle after the first copy, after the writes, after the
//!   reintegration and after the verify, with the writer's resident memory by
//!   mapping kind (heap, anonymous, stacks, files).
//! - `filled --size-gib S`: an image of S GiB of data written in the backing
//!   directory (disk write rate), read back from disk (disk read rate), BLAKE3 of
//!   1 GiB in memory on one core; the full copy on first attach (rate against the
//!   link and the disk), a verify from disk and a verify from the page cache (rate,
//!   bytes read, CPU seconds per side: the verify rate per core). The image is
//!   deleted at the end.
//!
//! Everything is torn down at the end and on error or SIGINT/SIGTERM.

#[path = "../interrupt.rs"]
mod interrupt;
#[path = "../netprobe.rs"]
#[allow(dead_code)]
mod netprobe;
#[path = "../sysinfo.rs"]
#[allow(dead_code)]
mod sysinfo;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};
use vmha_fs::status::{StatusFile, SyncPhase, SyncStatus, VerifyPhase, VerifyStatus};
use vmha_test_infra::resync::ResyncSetup;
use vmha_test_infra::{lazy_unmount_all, Child};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// The open-file limit a systemd service gets by default (hard), given to both nodes.
const NOFILE: u64 = 524_288;

#[derive(Parser, Debug)]
#[command(
    name = "vmha-bench-bigdata",
    about = "vmha-fs with many files / huge images"
)]
struct Args {
    /// Where the nodes' directories go.
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Machine-readable results.
    #[arg(long)]
    out: PathBuf,
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand, Debug)]
enum What {
    /// N small files (see the module docs).
    Files {
        #[arg(long, default_value_t = 1_000_000)]
        count: u64,
        /// Bytes per file.
        #[arg(long, default_value_t = 1024)]
        file_bytes: u64,
        /// Put both nodes on an XFS loop image of this many GiB (1 KiB blocks: a
        /// million 1 KiB files take ~1.5 GiB per node) instead of `--dir`'s disk;
        /// the image is deleted at the end.
        #[arg(long)]
        xfs_gib: Option<u64>,
    },
    /// A sparse image (see the module docs).
    Sparse {
        #[arg(long, default_value_t = 2048)]
        size_gib: u64,
        #[arg(long, default_value_t = 4096)]
        written_mib: u64,
        /// Skip the verify at the end (it reads only the data: seconds).
        #[arg(long)]
        no_verify: bool,
    },
    /// An image filled with data (see the module docs).
    Filled {
        #[arg(long, default_value_t = 8)]
        size_gib: u64,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmha-bench-bigdata: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn log(msg: impl AsRef<str>) {
    eprintln!("[bench-bigdata] {}", msg.as_ref());
}

/// `VmHWM` / `VmRSS` of a process, KiB.
fn mem_kib(pid: u32, field: &str) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    line.split_whitespace()
        .nth(1)
        .context("bad status line")?
        .parse()
        .context("bad status number")
}

fn mem(c: &Child) -> Result<Value> {
    // Open descriptors too: they must not grow with the number of files.
    let fds = std::fs::read_dir(format!("/proc/{}/fd", c.pid()))
        .map(|d| d.count())
        .unwrap_or(0);
    Ok(
        json!({"hwm_kib": mem_kib(c.pid(), "VmHWM:")?, "rss_kib": mem_kib(c.pid(), "VmRSS:")?, "fds": fds}),
    )
}

/// User + system CPU seconds of a process so far (all its threads).
fn cpu_secs(pid: u32) -> Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = text.rsplit_once(')').context("bad /proc/pid/stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 (1-based), i.e. 11 and 12 after ')'.
    let ticks: u64 =
        f.get(11).context("utime")?.parse::<u64>()? + f.get(12).context("stime")?.parse::<u64>()?;
    // SAFETY: sysconf has no memory arguments.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    Ok(ticks as f64 / hz as f64)
}

/// Resident KiB by mapping kind (`/proc/PID/smaps`): the heap (brk), anonymous
/// mappings (malloc arenas, large buffers, thread stacks without a name), stacks,
/// file-backed mappings (the binary, libraries).
fn smaps(pid: u32) -> Result<Value> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let (mut heap, mut anon, mut stack, mut file, mut big) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut kind = 0;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if first.contains('-') && !first.ends_with(':') {
            // A mapping's header: address range, perms, offset, dev, inode, [name].
            let name = line.split_whitespace().nth(5).unwrap_or("");
            kind = match name {
                "[heap]" => 0,
                "" => 1,
                n if n.starts_with("[stack") => 2,
                n if n.starts_with('/') => 3,
                _ => 4,
            };
        } else if first == "Rss:" {
            let kib: u64 = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            match kind {
                0 => heap += kib,
                1 => {
                    anon += kib;
                    if kib >= 16 << 10 {
                        big += kib;
                    }
                }
                2 => stack += kib,
                3 => file += kib,
                _ => {}
            }
        }
    }
    Ok(
        json!({"heap_kib": heap, "anon_kib": anon, "anon_in_mappings_of_16mib_or_more_kib": big, "stack_kib": stack, "file_kib": file}),
    )
}

fn mems(b: &Bench) -> Result<Value> {
    let w = b.writer.as_ref().context("writer")?;
    let mut v = json!({"writer": mem(w)?, "writer_smaps": smaps(w.pid())?});
    if let Some(rc) = b.receiver.as_ref() {
        v["receiver"] = mem(rc)?;
    }
    Ok(v)
}

/// `count` bytes read from `path` (after dropping it from the page cache), MB/s.
fn disk_read_mbps(path: &Path, count: u64) -> Result<f64> {
    use std::io::Read;
    netprobe::evict(path)?;
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 8 << 20];
    let start = Instant::now();
    let mut n = 0u64;
    while n < count {
        let r = f.read(&mut buf)?;
        if r == 0 {
            break;
        }
        n += r as u64;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64() / 1e6)
}

/// CPU seconds of the calling thread.
fn thread_cpu_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the valid timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// BLAKE3 on one core over 1 GiB in memory (64 KiB blocks, as a compare hashes),
/// MB per CPU second of this thread (the machine is shared: wall time would count
/// the waits for a core).
fn blake3_one_core_mbps() -> f64 {
    let mut buf = vec![0u8; 64 << 20];
    StdRng::seed_from_u64(9).fill(&mut buf[..]);
    let start = thread_cpu_secs();
    let mut acc = 0u8;
    for _ in 0..16 {
        for block in buf.chunks(64 << 10) {
            acc ^= blake3::hash(block).as_bytes()[0];
        }
    }
    let secs = thread_cpu_secs() - start;
    std::hint::black_box(acc);
    (16u64 * (64 << 20)) as f64 / secs / 1e6
}

/// A verify measured: time, link bytes, what the writer read, both sides' CPU.
fn measured_verify(b: &mut Bench) -> Result<Value> {
    let (wp, rp) = (
        b.writer()?.pid(),
        b.receiver.as_ref().context("receiver")?.pid(),
    );
    let (wc, rc) = (cpu_secs(wp)?, cpu_secs(rp)?);
    let (v, step) = b.measure(Bench::verify)?;
    let (wc, rc) = (cpu_secs(wp)? - wc, cpu_secs(rp)? - rc);
    log(format!(
        "verify {:.2} s, read {} B, cpu writer {:.2} s / receiver {:.2} s, {} differing",
        step.seconds,
        v.read_bytes,
        wc,
        rc,
        v.differing.len()
    ));
    let per_core = |cpu: f64| {
        if cpu > 0.0 {
            v.read_bytes as f64 / cpu / 1e6
        } else {
            0.0
        }
    };
    Ok(json!({
        "step": step,
        "total_bytes": v.total_bytes,
        "read_bytes": v.read_bytes,
        "differing": v.differing.len(),
        "writer_cpu_s": wc,
        "receiver_cpu_s": rc,
        "mbps": v.total_bytes as f64 / step.seconds / 1e6,
        "writer_read_mb_per_cpu_s": per_core(wc),
        "receiver_mb_per_cpu_s": per_core(rc),
    }))
}

fn du_bytes(p: &Path) -> u64 {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            if let Ok(m) = e.metadata() {
                use std::os::unix::fs::MetadataExt;
                n += if m.is_dir() {
                    du_bytes(&e.path())
                } else {
                    m.blocks() * 512
                };
            }
        }
    }
    n
}

#[derive(Debug, Serialize)]
struct Step {
    seconds: f64,
    tx_bytes: u64,
    rx_bytes: u64,
}

struct Bench {
    s: ResyncSetup,
    writer: Option<Child>,
    receiver: Option<Child>,
}

impl Bench {
    fn writer(&mut self) -> Result<&mut Child> {
        self.writer.as_mut().context("the writer is not running")
    }

    fn start_receiver(&mut self) -> Result<()> {
        self.receiver = Some(self.s.secondary(&self.s.b)?);
        Ok(())
    }

    fn kill_receiver(&mut self) -> Result<()> {
        if let Some(mut c) = self.receiver.take() {
            c.kill()?;
        }
        lazy_unmount_all(&self.s.b.data).map(drop)
    }

    fn measure<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<(T, Step)> {
        let (tx, rx) = (self.s.link.host_tx_bytes()?, self.s.link.host_rx_bytes()?);
        let start = Instant::now();
        let v = f(self)?;
        Ok((
            v,
            Step {
                seconds: start.elapsed().as_secs_f64(),
                tx_bytes: self.s.link.host_tx_bytes()? - tx,
                rx_bytes: self.s.link.host_rx_bytes()? - rx,
            },
        ))
    }

    /// SIGUSR2, wait for `in_sync`.
    fn attach(&mut self) -> Result<SyncStatus> {
        let _ = std::fs::remove_file(self.s.a.state.join(SyncStatus::FILE));
        self.writer()?.send_signal(libc::SIGUSR2)?;
        loop {
            if let Ok(Some(s)) = SyncStatus::read_from(&self.s.a.state) {
                match s.state {
                    SyncPhase::InSync => return Ok(s),
                    SyncPhase::Alone => bail!("the resync failed: {s:?}"),
                    _ => {}
                }
            }
            if let Some(st) = self.writer()?.try_status()? {
                bail!("the writer exited ({st}) during the resync");
            }
            interrupt::check()?;
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGHUP, wait for verify.json `done`.
    fn verify(&mut self) -> Result<VerifyStatus> {
        let _ = std::fs::remove_file(self.s.a.state.join(VerifyStatus::FILE));
        self.writer()?.send_signal(libc::SIGHUP)?;
        loop {
            if let Ok(Some(v)) = VerifyStatus::read_from(&self.s.a.state) {
                match v.state {
                    VerifyPhase::Done => return Ok(v),
                    VerifyPhase::Failed => bail!("verify failed: {v:?}"),
                    VerifyPhase::Running => {}
                }
            }
            if let Some(st) = self.writer()?.try_status()? {
                bail!("the writer exited ({st}) during the verify");
            }
            interrupt::check()?;
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Receiver down, writer degraded.
    fn lose_peer(&mut self) -> Result<()> {
        self.kill_receiver()?;
        self.writer()?.send_signal(libc::SIGUSR1)?;
        std::thread::sleep(Duration::from_millis(500));
        Ok(())
    }
}

fn file_path(root: &Path, i: u64) -> PathBuf {
    root.join(format!("d{:04}", i / 1000))
        .join(format!("f{:04}", i % 1000))
}

fn run(args: &Args) -> Result<()> {
    interrupt::install()?;
    if !rustix::process::geteuid().is_root() {
        bail!("must run as root (network namespace, FUSE mounts)");
    }
    // Both nodes get a service's default open-file limit, as under systemd.
    let lim = libc::rlimit {
        rlim_cur: NOFILE,
        rlim_max: NOFILE,
    };
    // SAFETY: plain syscall on a valid struct.
    let nofile = if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
        NOFILE
    } else {
        // Without CAP_SYS_RESOURCE: the hard limit we were given (vmha-fs raises
        // its soft limit to it).
        let mut cur = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: plain syscall writing into a valid struct.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur) };
        log(format!(
            "cannot raise RLIMIT_NOFILE to {NOFILE}: {}; the nodes run with {}",
            std::io::Error::last_os_error(),
            cur.rlim_max
        ));
        cur.rlim_max
    };
    let started = sysinfo::utc_rfc3339(sysinfo::unix_now());
    // Dropped last (after the nodes' directories and mounts beneath it).
    let xfs = match &args.what {
        What::Files {
            xfs_gib: Some(gib), ..
        } => Some(vmha_test_infra::loopfs::LoopFs::with_mkfs(
            "bigdata",
            gib * GIB,
            &["-b", "size=1024"],
        )?),
        _ => None,
    };
    let dir = xfs.as_ref().map_or(args.dir.as_path(), |x| x.path());
    let s = ResyncSetup::in_dir(dir, "vmha-bigdata-")?;
    let mut b = Bench {
        s,
        writer: None,
        receiver: None,
    };
    let mut r =
        json!({"started_utc": started, "loadavg_start": sysinfo::loadavg(), "nofile": nofile});
    let link = netprobe::probe_link(&b.s.link, 512 * MIB)?;
    log(format!("unshaped veth: {link:.0} MB/s"));
    r["link_mbps"] = json!(link);
    let res = match &args.what {
        What::Files {
            count, file_bytes, ..
        } => files(&mut b, &mut r, *count, *file_bytes),
        What::Sparse {
            size_gib,
            written_mib,
            no_verify,
        } => sparse(&mut b, &mut r, *size_gib, *written_mib, !*no_verify),
        What::Filled { size_gib } => filled(&mut b, &mut r, *size_gib),
    };
    r["loadavg_end"] = json!(sysinfo::loadavg());
    if let Some(mut w) = b.writer.take() {
        let _ = w.terminate(Duration::from_secs(120));
    }
    if let Some(mut c) = b.receiver.take() {
        let _ = c.terminate(Duration::from_secs(60));
    }
    if let Err(e) = &res {
        r["error"] = json!(format!("{e:#}"));
    }
    let text = serde_json::to_string_pretty(&r)? + "\n";
    std::fs::write(&args.out, &text).with_context(|| format!("writing {}", args.out.display()))?;
    println!("{text}");
    drop(b);
    res
}

fn files(b: &mut Bench, r: &mut Value, count: u64, file_bytes: u64) -> Result<()> {
    let root = b.s.a.data.join("files");
    log(format!(
        "creating {count} files of {file_bytes} B in the backing dir"
    ));
    let start = Instant::now();
    let mut buf = vec![0u8; file_bytes as usize];
    StdRng::seed_from_u64(1).fill(&mut buf[..]);
    for i in 0..count {
        if i % 1000 == 0 {
            interrupt::check()?;
            std::fs::create_dir_all(file_path(&root, i).parent().context("parent")?)?;
        }
        let k = buf.len().min(8);
        buf[..k].copy_from_slice(&i.to_le_bytes()[..k]);
        std::fs::write(file_path(&root, i), &buf)?;
    }
    rustix::fs::sync();
    r["create_s"] = json!(start.elapsed().as_secs_f64());
    r["files"] = json!(count);
    r["file_bytes"] = json!(file_bytes);

    b.start_receiver()?;
    let start = Instant::now();
    b.writer = Some(b.s.primary_alone(&b.s.a, &[])?);
    let ready = start.elapsed().as_secs_f64();
    std::fs::write(b.s.a.mnt.join("first-write"), b"x")?;
    r["mount_ready_s"] = json!(ready);
    r["mount_first_write_s"] = json!(start.elapsed().as_secs_f64());
    log(format!(
        "first write after {:.2} s",
        start.elapsed().as_secs_f64()
    ));
    r["writer_mem_after_mount"] = mem(b.writer()?)?;

    log("initial sync");
    let (st, step) = b.measure(Bench::attach)?;
    log(format!("initial sync {:.1} s", step.seconds));
    r["initial_sync"] = json!({"step": step, "total_bytes": st.total_bytes});
    r["writer_mem_after_initial_sync"] = mem(b.writer()?)?;
    r["receiver_mem_after_initial_sync"] = mem(b.receiver.as_ref().context("receiver")?)?;

    let changed = count.div_ceil(100);
    b.lose_peer()?;
    let mut order: Vec<u64> = (0..count).collect();
    order.shuffle(&mut StdRng::seed_from_u64(2));
    let mnt = b.s.a.mnt.join("files");
    let start = Instant::now();
    let mut new = vec![0u8; file_bytes as usize];
    StdRng::seed_from_u64(3).fill(&mut new[..]);
    for &i in order.iter().take(changed as usize) {
        interrupt::check()?;
        let f = OpenOptions::new().write(true).open(file_path(&mnt, i))?;
        f.write_all_at(&new, 0)?;
    }
    r["changed_files"] = json!(changed);
    r["change_s"] = json!(start.elapsed().as_secs_f64());
    r["track_dir_bytes"] = json!(du_bytes(&b.s.a.state.join("track")));
    b.start_receiver()?;
    log("reintegration");
    let (st, step) = b.measure(Bench::attach)?;
    log(format!(
        "reintegration {:.2} s, {} B →, {} B ←",
        step.seconds, step.tx_bytes, step.rx_bytes
    ));
    r["reintegration"] =
        json!({"step": step, "total_bytes": st.total_bytes, "changed_bytes": changed * file_bytes});
    r["writer_mem_after_reintegration"] = mem(b.writer()?)?;
    r["receiver_mem_after_reintegration"] = mem(b.receiver.as_ref().context("receiver")?)?;

    log("verify");
    let (v, step) = b.measure(Bench::verify)?;
    log(format!(
        "verify {:.1} s, {} differing",
        step.seconds,
        v.differing.len()
    ));
    r["verify"] =
        json!({"step": step, "total_bytes": v.total_bytes, "differing": v.differing.len()});
    r["writer_mem_end"] = mem(b.writer()?)?;
    r["receiver_mem_end"] = mem(b.receiver.as_ref().context("receiver")?)?;
    Ok(())
}

fn sparse(
    b: &mut Bench,
    r: &mut Value,
    size_gib: u64,
    written_mib: u64,
    verify: bool,
) -> Result<()> {
    let size = size_gib * GIB;
    let image = b.s.a.data.join("vm1/disk.img");
    std::fs::create_dir_all(image.parent().context("parent")?)?;
    OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&image)?
        .set_len(size)?;
    r["image_bytes"] = json!(size);
    b.start_receiver()?;
    b.writer = Some(b.s.primary_alone(&b.s.a, &[])?);
    r["writer_mem_start"] = mem(b.writer()?)?;
    let (_, step) = b.measure(Bench::attach)?;
    log(format!(
        "full copy of the sparse image {:.2} s",
        step.seconds
    ));
    r["initial_sync"] = json!(step);
    // Idle, connected, the image copied: what a 2 TiB image costs at rest.
    std::thread::sleep(Duration::from_secs(2));
    r["mem_idle_after_full_copy"] = mems(b)?;

    // Connected: 1 MiB pieces spread evenly (every one a new activity-log extent).
    let pieces = written_mib;
    let stride = (size / pieces) & !(MIB - 1);
    let f = OpenOptions::new()
        .write(true)
        .open(b.s.a.mnt.join("vm1/disk.img"))?;
    let mut buf = vec![0u8; MIB as usize];
    let mut rng = StdRng::seed_from_u64(1);
    let start = Instant::now();
    for i in 0..pieces {
        interrupt::check()?;
        rng.fill(&mut buf[..]);
        f.write_all_at(&buf, i * stride)?;
    }
    f.sync_all()?;
    let secs = start.elapsed().as_secs_f64();
    log(format!(
        "{written_mib} MiB written connected in {secs:.1} s"
    ));
    r["written_connected"] =
        json!({"bytes": pieces * MIB, "pieces": pieces, "stride": stride, "seconds": secs});
    r["writer_mem_after_connected_writes"] = mem(b.writer()?)?;
    r["mem_after_connected_writes"] = mems(b)?;
    // Idle past the writer's trim delay (10 s without writes).
    std::thread::sleep(IDLE_WAIT);
    r["mem_idle_after_connected_writes"] = mems(b)?;
    r["activity_file_bytes"] = json!(std::fs::metadata(b.s.a.state.join("track/activity"))
        .map(|m| m.len())
        .unwrap_or(0));

    // Degraded: 1 % of the written portion in 4 KiB pieces scattered over it.
    b.lose_peer()?;
    r["writer_mem_degraded_before"] = mem(b.writer()?)?;
    let small = (pieces * MIB / 100) / 4096;
    let mut slots: Vec<u64> = (0..pieces * (MIB / 4096)).collect();
    slots.shuffle(&mut rng);
    let mut b4 = [0u8; 4096];
    let start = Instant::now();
    for &slot in slots.iter().take(small as usize) {
        interrupt::check()?;
        rng.fill(&mut b4[..]);
        let (piece, within) = (slot / (MIB / 4096), slot % (MIB / 4096));
        f.write_all_at(&b4, piece * stride + within * 4096)?;
    }
    f.sync_all()?;
    drop(f);
    let secs = start.elapsed().as_secs_f64();
    let pages: std::collections::HashSet<u64> = slots
        .iter()
        .take(small as usize)
        .map(|s| (s / (MIB / 4096)) * stride / (128 * MIB))
        .collect();
    log(format!(
        "{small} scattered 4 KiB writes degraded in {secs:.1} s"
    ));
    r["written_degraded"] = json!({"bytes": small * 4096, "writes": small, "seconds": secs, "map_pages_touched": pages.len()});
    r["writer_mem_degraded_after"] = mem(b.writer()?)?;
    r["mem_degraded_after"] = mems(b)?;
    r["track_dir_bytes"] = json!(du_bytes(&b.s.a.state.join("track")));

    b.start_receiver()?;
    let (st, step) = b.measure(Bench::attach)?;
    log(format!(
        "reintegration {:.2} s, {} B on the link",
        step.seconds, step.tx_bytes
    ));
    r["reintegration"] =
        json!({"step": step, "total_bytes": st.total_bytes, "changed_bytes": small * 4096});
    r["writer_mem_after_reintegration"] = mem(b.writer()?)?;
    r["receiver_mem_after_reintegration"] = mem(b.receiver.as_ref().context("receiver")?)?;
    r["mem_after_reintegration"] = mems(b)?;
    if verify {
        r["verify"] = measured_verify(b)?;
        r["mem_after_verify"] = mems(b)?;
    }
    std::thread::sleep(IDLE_WAIT);
    r["mem_idle_end"] = mems(b)?;
    Ok(())
}

/// Longer than the writer's idle delay before it returns free memory (10 s).
const IDLE_WAIT: Duration = Duration::from_secs(13);

/// Free space that must stay on the shared disk after the image and its copy.
const KEEP_FREE: u64 = 15 * GIB;

fn filled(b: &mut Bench, r: &mut Value, size_gib: u64) -> Result<()> {
    let size = size_gib * GIB;
    let free = sysinfo::free_bytes(b.s.root())?;
    if free < 2 * size + KEEP_FREE {
        bail!(
            "{size_gib} GiB filled needs {} GiB free (two copies + {} GiB kept free), {} GiB free",
            (2 * size + KEEP_FREE) / GIB,
            KEEP_FREE / GIB,
            free / GIB
        );
    }
    r["image_bytes"] = json!(size);
    r["free_bytes_before"] = json!(free);
    r["blake3_one_core_mbps"] = json!(blake3_one_core_mbps());
    let image = b.s.a.data.join("vm1/disk.img");
    let start = Instant::now();
    vmha_test_infra::resync::fill_image(&image, size, interrupt::check)?;
    let secs = start.elapsed().as_secs_f64();
    r["disk_write_mbps"] = json!(size as f64 / secs / 1e6);
    log(format!("{size_gib} GiB written in {secs:.1} s"));
    let read = disk_read_mbps(&image, size.min(4 * GIB))?;
    r["disk_read_mbps"] = json!(read);
    log(format!("disk read {read:.0} MB/s"));
    netprobe::evict(&image)?;

    b.start_receiver()?;
    b.writer = Some(b.s.primary_alone(&b.s.a, &[])?);
    let (wp, rp) = (
        b.writer()?.pid(),
        b.receiver.as_ref().context("receiver")?.pid(),
    );
    let (wc, rc) = (cpu_secs(wp)?, cpu_secs(rp)?);
    let (st, step) = b.measure(Bench::attach)?;
    let mbps = size as f64 / step.seconds / 1e6;
    log(format!(
        "full copy of {size_gib} GiB filled: {:.1} s = {mbps:.0} MB/s",
        step.seconds
    ));
    r["full_copy"] = json!({
        "step": step,
        "total_bytes": st.total_bytes,
        "mbps": mbps,
        "writer_cpu_s": cpu_secs(wp)? - wc,
        "receiver_cpu_s": cpu_secs(rp)? - rc,
    });
    r["mem_after_full_copy"] = mems(b)?;

    // From disk: both copies out of the page cache first.
    netprobe::evict(&image)?;
    netprobe::evict(&b.s.b.data.join("vm1/disk.img"))?;
    r["verify_from_disk"] = measured_verify(b)?;
    // From the page cache (what is left of it after the first one): the CPU's rate.
    r["verify_cached"] = measured_verify(b)?;
    r["mem_after_verify"] = mems(b)?;
    std::thread::sleep(IDLE_WAIT);
    r["mem_idle_end"] = mems(b)?;
    Ok(())
}
