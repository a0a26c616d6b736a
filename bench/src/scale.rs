//! `vmha-bench scale` (issue 12, item 2): many modules on one pair of
//! simulated nodes — the idle cost per module and a node crash that fails
//! every module over at once.
//!
//! What runs: the end-to-end cluster of the tests
//! (`vmha_test_infra::cluster_vm`, two nodes with their own libvirtd, `vmhad`
//! on both) with N modules of [`DomainKind::Idle`]: each module's libvirt
//! domain is a real QEMU (TCG, 32 MiB, no disk, no kernel: it idles in its
//! firmware), because N TCG guests do not boot on this 2-core machine. The
//! module's data is written by a **writer thread of this benchmark** per
//! module and node, through the node's mount namespace
//! (`/proc/<node>/root/<dir>`): every `--write-interval-ms` it writes and
//! `fdatasync`s 4 KiB to `<dir>/writer.dat`, but only while a FUSE mount is at
//! the directory (the node is the writer); the file is opened per write, so no
//! descriptor is left beneath a directory a takeover mounts over.
//!
//! Idle: writers off, everything settled; over `--idle-seconds` the CPU time
//! (utime + stime from `/proc/PID/stat`) of every `vmhad` and `vmha-fs` of
//! both nodes, their RSS, PSS and threads at the end, the QEMUs apart, and the
//! packets of each node's interfaces (`/proc/<node>/net/dev`): production
//! carries heartbeats only, the dedicated link heartbeats and the replication
//! links' keep-alives.
//!
//! Crash: writers on, every module written on its node, then SIGKILL of every
//! process of node1; node2's `vmctl status` is polled: kill → each module
//! ALONE on node2, kill → each module's first write on node2, and node2's
//! event log (`VM started` per module) for how the takeovers overlap.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use vmha_test_infra::cluster_vm::{ClusterModule, DomainKind, Timing, VmCluster};
use vmha_test_infra::vmctl_status::{module_ready, module_state, status, wait_status};

use crate::sysinfo::loadavg;

/// `statfs` f_type of a FUSE mount.
const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

/// What to run.
#[derive(Debug, Clone)]
pub struct Opts {
    pub out: PathBuf,
    pub modules: usize,
    pub idle_seconds: u64,
    /// Home every module on node1 (all fail over at the kill), else half on
    /// each node (active/active).
    pub all_on_node1: bool,
    pub write_interval_ms: u64,
    /// Idle windows of `idle_seconds` measured one after the other.
    pub idle_windows: usize,
    /// Measure the idle windows only (no node crash): for iterating.
    pub idle_only: bool,
}

/// One idle window's numbers.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IdleWindow {
    pub seconds: f64,
    pub loadavg_end: String,
    pub vmhad: ProcTotals,
    pub vmha_fs: ProcTotals,
    pub qemu: ProcTotals,
    pub libvirtd: ProcTotals,
    /// vmhad's CPU % of one core on node1, node2.
    pub vmhad_cpu_percent_per_node: Vec<f64>,
    /// vmhad's CPU % of one core per thread name (both nodes summed): where
    /// vmhad's time goes.
    pub vmhad_threads_cpu_percent: BTreeMap<String, f64>,
    /// vmha-fs's CPU % of one core per thread name (all processes summed).
    /// Both maps count the CPU of threads that ended during the window (the
    /// process's total less its live threads') as `(ended threads)`.
    pub vmha_fs_threads_cpu_percent: BTreeMap<String, f64>,
    /// vmha-fs's CPU % of one core on node1, node2 (all its processes there).
    pub vmha_fs_cpu_percent_per_node: Vec<f64>,
    /// Context switches per second per thread name (voluntary + involuntary,
    /// threads alive at the window's end, both nodes summed): the wake-ups.
    pub vmhad_threads_wakeups_per_s: BTreeMap<String, f64>,
    pub vmha_fs_threads_wakeups_per_s: BTreeMap<String, f64>,
    pub packets: Vec<IfPackets>,
}

impl IdleWindow {
    /// vmhad + vmha-fs CPU % of one core (both nodes).
    pub fn own_cpu_percent(&self) -> f64 {
        self.vmhad.cpu_percent + self.vmha_fs.cpu_percent
    }
}

/// One process class's totals over the idle window.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProcTotals {
    pub processes: usize,
    pub cpu_ticks: u64,
    /// CPU time / window, in % of one core.
    pub cpu_percent: f64,
    pub rss_kib: u64,
    pub pss_kib: u64,
    pub threads: u64,
}

/// Packets of one node's interface over the idle window (rx + tx).
#[derive(Debug, Clone, Serialize)]
pub struct IfPackets {
    pub node: String,
    pub interface: String,
    pub packets: u64,
    pub bytes: u64,
    pub packets_per_s: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Results {
    pub started: String,
    pub loadavg_start: String,
    pub loadavg_end: String,
    pub modules: usize,
    pub layout: String,
    pub timing: String,
    pub idle_seconds: f64,
    pub vmhad: ProcTotals,
    pub vmha_fs: ProcTotals,
    pub qemu: ProcTotals,
    /// Both libvirtds (not vmha's, but they answer vmhad's state polls).
    pub libvirtd: ProcTotals,
    /// vmhad's CPU % of one core on node1, node2 (node1 holds the writers).
    pub vmhad_cpu_percent_per_node: Vec<f64>,
    pub packets: Vec<IfPackets>,
    /// Every idle window (the fields above are the median one's by vmha's
    /// own CPU).
    pub windows: Vec<IdleWindow>,
    /// Modules moved by the crash.
    pub moved: usize,
    /// kill → ALONE on node2, per moved module (ms).
    pub to_alone_ms: BTreeMap<String, f64>,
    /// kill → first write on node2, per moved module (ms).
    pub to_write_ms: BTreeMap<String, f64>,
    /// Longest pause between writes of node2's own modules across the kill.
    pub max_stall_own_ms: Option<f64>,
    /// node2's `VM started` events after the kill (ms after the kill).
    pub vm_started_ms: BTreeMap<String, f64>,
    /// node2's first event after the kill per moved module (the takeover begins).
    pub takeover_begins_ms: BTreeMap<String, f64>,
    /// node2's event log per moved module after the kill: (ms, event).
    pub events: BTreeMap<String, Vec<(f64, String)>>,
    pub error: Option<String>,
}

fn ticks_per_s() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime of `pid` in ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) close with ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // rest[0] is field 3 (state); utime = field 14, stime = field 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// One thread's time on a CPU (ns, `schedstat`: exact, where a thread's
/// utime + stime in ticks rounds the little an idle thread uses down to
/// nothing) and context switches.
#[derive(Debug, Clone, Copy, Default)]
struct ThreadSample {
    run_ns: u64,
    switches: u64,
}

/// voluntary + nonvoluntary context switches of `/proc/PID/task/TID`.
fn switches(task: &Path) -> u64 {
    let text = fs::read_to_string(task.join("status")).unwrap_or_default();
    field_kib(&text, "voluntary_ctxt_switches:") + field_kib(&text, "nonvoluntary_ctxt_switches:")
}

/// Time on a CPU and context switches per thread of `pid`, keyed by
/// thread name (comm).
fn thread_ticks(pid: u32) -> BTreeMap<(u32, String), ThreadSample> {
    let mut out = BTreeMap::new();
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for e in dir.flatten() {
        let Ok(tid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_string();
        let run_ns = fs::read_to_string(e.path().join("schedstat"))
            .ok()
            .and_then(|t| t.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
        let switches = switches(&e.path());
        out.insert((tid, name), ThreadSample { run_ns, switches });
    }
    out
}

/// Thread samples of every pid in `pids`, keyed by (pid, tid, name).
fn threads_of(pids: &[u32]) -> BTreeMap<(u32, u32, String), ThreadSample> {
    pids.iter()
        .flat_map(|&p| {
            thread_ticks(p)
                .into_iter()
                .map(move |((tid, name), t)| ((p, tid, name), t))
        })
        .collect()
}

/// CPU % of one core per thread name between two [`threads_of`] samples;
/// `ended_s` (the processes' CPU seconds not in their live threads) is
/// shown as `(ended threads)`.
fn by_thread_name(
    before: &BTreeMap<(u32, u32, String), ThreadSample>,
    after: &BTreeMap<(u32, u32, String), ThreadSample>,
    ended_s: f64,
    window: f64,
) -> BTreeMap<String, f64> {
    let mut out: BTreeMap<String, f64> = BTreeMap::new();
    for (k, a) in after {
        let b = before.get(k).copied().unwrap_or_default();
        *out.entry(k.2.clone()).or_default() += a.run_ns.saturating_sub(b.run_ns) as f64 / 1e9;
    }
    if ended_s > 0.0 {
        out.insert("(ended threads)".into(), ended_s);
    }
    for v in out.values_mut() {
        *v = (*v / window * 1e4).round() / 100.0;
    }
    out.retain(|_, v| *v > 0.0);
    out
}

/// Context switches per second per thread name between two samples.
fn wakeups_by_thread_name(
    before: &BTreeMap<(u32, u32, String), ThreadSample>,
    after: &BTreeMap<(u32, u32, String), ThreadSample>,
    window: f64,
) -> BTreeMap<String, f64> {
    let mut out: BTreeMap<String, f64> = BTreeMap::new();
    for (k, a) in after {
        let b = before.get(k).copied().unwrap_or_default();
        *out.entry(k.2.clone()).or_default() += a.switches.saturating_sub(b.switches) as f64;
    }
    for v in out.values_mut() {
        *v = (*v / window * 10.0).round() / 10.0;
    }
    out.retain(|_, v| *v > 0.0);
    out
}

/// The processes' CPU seconds over the window not found in their threads
/// alive at its end (threads that ended meanwhile; 0 when the ticks'
/// rounding puts the total below the threads' exact sum).
fn ended_seconds(
    totals: &ProcTotals,
    before: &BTreeMap<(u32, u32, String), ThreadSample>,
    after: &BTreeMap<(u32, u32, String), ThreadSample>,
) -> f64 {
    let live_ns: u64 = after
        .iter()
        .map(|(k, a)| {
            a.run_ns
                .saturating_sub(before.get(k).map_or(0, |b| b.run_ns))
        })
        .sum();
    (totals.cpu_ticks as f64 / ticks_per_s() - live_ns as f64 / 1e9).max(0.0)
}

fn status_kib(pid: u32, key: &str) -> u64 {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    field_kib(&text, key)
}

fn field_kib(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn pss_kib(pid: u32) -> u64 {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    field_kib(&text, "Pss:")
}

/// Both nodes' processes by class: "vmhad", "vmha-fs", "qemu".
fn classify(vc: &VmCluster) -> Result<BTreeMap<&'static str, Vec<u32>>> {
    let mut out: BTreeMap<&'static str, Vec<u32>> = BTreeMap::new();
    for i in 0..2 {
        for pid in vc.node(i).pids()? {
            let Ok(comm) = fs::read_to_string(format!("/proc/{pid}/comm")) else {
                continue;
            };
            let class = match comm.trim() {
                "vmhad" => "vmhad",
                "vmha-fs" => "vmha-fs",
                "libvirtd" => "libvirtd",
                c if c.starts_with("qemu-system") => "qemu",
                _ => continue,
            };
            out.entry(class).or_default().push(pid);
        }
    }
    Ok(out)
}

/// (packets, bytes) rx + tx per interface of node `i`'s network namespace.
fn net_dev(vc: &VmCluster, i: usize) -> Result<BTreeMap<String, (u64, u64)>> {
    let path = format!("/proc/{}/net/dev", vc.node(i).holder_pid());
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let mut out = BTreeMap::new();
    for line in text.lines().skip(2) {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim();
        if name == "lo" {
            continue;
        }
        let v: Vec<u64> = rest
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if v.len() >= 10 {
            // rx bytes, rx packets ... tx bytes (8), tx packets (9)
            out.insert(name.to_string(), (v[1] + v[9], v[0] + v[8]));
        }
    }
    Ok(out)
}

type WriteLog = Arc<Mutex<BTreeMap<(usize, String), Vec<Instant>>>>;

/// The writer threads: per (node, module) the time of every successful write.
#[derive(Debug)]
struct Writers {
    on: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    /// (node, module) → instants of successful writes.
    log: WriteLog,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Writers {
    fn start(vc: &VmCluster, interval: Duration) -> Writers {
        let on = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let log: WriteLog = Arc::new(Mutex::new(BTreeMap::new()));
        let mut threads = Vec::new();
        for i in 0..2 {
            let root = PathBuf::from(format!("/proc/{}/root", vc.node(i).holder_pid()));
            for m in vc.modules() {
                let dir = root.join(m.dir().trim_start_matches('/'));
                let (on, stop, log) = (on.clone(), stop.clone(), log.clone());
                let key = (i, m.name.clone());
                threads.push(std::thread::spawn(move || {
                    let mut n: u64 = 0;
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(interval);
                        if !on.load(Ordering::Relaxed) || !is_fuse(&dir) {
                            continue;
                        }
                        n += 1;
                        if write_once(&dir, n).is_ok() {
                            if let Ok(mut l) = log.lock() {
                                l.entry(key.clone()).or_default().push(Instant::now());
                            }
                        }
                    }
                }));
            }
        }
        Writers {
            on,
            stop,
            log,
            threads,
        }
    }

    fn set(&self, on: bool) {
        self.on.store(on, Ordering::Relaxed);
    }

    fn writes(&self) -> BTreeMap<(usize, String), Vec<Instant>> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn is_fuse(dir: &Path) -> bool {
    rustix::fs::statfs(dir).is_ok_and(|s| s.f_type == FUSE_SUPER_MAGIC)
}

/// 4 KiB with the counter at the start, written and fdatasync'ed; the file is
/// open only for this call.
fn write_once(dir: &Path, n: u64) -> std::io::Result<()> {
    let f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(dir.join("writer.dat"))?;
    let mut buf = vec![0u8; 4096];
    buf[..8].copy_from_slice(&n.to_le_bytes());
    f.write_all_at(&buf, 0)?;
    f.sync_data()
}

fn layout(opts: &Opts) -> Vec<ClusterModule> {
    (0..opts.modules)
        .map(|k| {
            let home = if opts.all_on_node1 { 0 } else { k % 2 };
            let port = 7101 + u16::try_from(k).unwrap_or(0);
            let mut m = ClusterModule::new(&format!("m{:02}", k + 1), port, home, DomainKind::Idle);
            m.default_primary = Some(home);
            m
        })
        .collect()
}

fn home_name(m: &ClusterModule) -> String {
    format!("node{}", m.data_on + 1)
}

fn other_name(m: &ClusterModule) -> String {
    format!("node{}", 2 - m.data_on)
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

fn totals(pids: &[u32], before: &BTreeMap<u32, u64>, window: f64) -> ProcTotals {
    let mut t = ProcTotals::default();
    for &p in pids {
        let (Some(b), Some(a)) = (before.get(&p), cpu_ticks(p)) else {
            continue; // not alive over the whole window
        };
        t.processes += 1;
        t.cpu_ticks += a.saturating_sub(*b);
        t.rss_kib += status_kib(p, "VmRSS:");
        t.pss_kib += pss_kib(p);
        t.threads += status_kib(p, "Threads:");
    }
    t.cpu_percent = t.cpu_ticks as f64 / ticks_per_s() / window * 100.0;
    t
}

/// One idle window of `secs`: CPU of every vmha process (and per thread
/// name), memory and threads at its end, packets per interface.
fn idle_window(vc: &VmCluster, secs: u64) -> Result<IdleWindow> {
    let procs = classify(vc)?;
    let node_pids = [vc.node(0).pids()?, vc.node(1).pids()?];
    let before: BTreeMap<u32, u64> = procs
        .values()
        .flatten()
        .filter_map(|&p| Some((p, cpu_ticks(p)?)))
        .collect();
    let get = |k: &str| procs.get(k).cloned().unwrap_or_default();
    let vmhad_threads0 = threads_of(&get("vmhad"));
    let fs_threads0 = threads_of(&get("vmha-fs"));
    let net_before = [net_dev(vc, 0)?, net_dev(vc, 1)?];
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    crate::interrupt::check()?;
    let window = t.elapsed().as_secs_f64();
    let net_after = [net_dev(vc, 0)?, net_dev(vc, 1)?];
    let vmhad_threads1 = threads_of(&get("vmhad"));
    let fs_threads1 = threads_of(&get("vmha-fs"));
    let vmhad = totals(&get("vmhad"), &before, window);
    let vmha_fs = totals(&get("vmha-fs"), &before, window);
    let vmhad_ended = ended_seconds(&vmhad, &vmhad_threads0, &vmhad_threads1);
    let fs_ended = ended_seconds(&vmha_fs, &fs_threads0, &fs_threads1);
    let mut w = IdleWindow {
        seconds: window,
        loadavg_end: loadavg(),
        vmhad,
        vmha_fs,
        qemu: totals(&get("qemu"), &before, window),
        libvirtd: totals(&get("libvirtd"), &before, window),
        vmhad_threads_cpu_percent: by_thread_name(
            &vmhad_threads0,
            &vmhad_threads1,
            vmhad_ended,
            window,
        ),
        vmha_fs_threads_cpu_percent: by_thread_name(&fs_threads0, &fs_threads1, fs_ended, window),
        vmhad_threads_wakeups_per_s: wakeups_by_thread_name(
            &vmhad_threads0,
            &vmhad_threads1,
            window,
        ),
        vmha_fs_threads_wakeups_per_s: wakeups_by_thread_name(&fs_threads0, &fs_threads1, window),
        ..IdleWindow::default()
    };
    for (i, on_node) in node_pids.iter().enumerate() {
        let pids = vc.pids_of(i, "vmhad", "--config")?;
        w.vmhad_cpu_percent_per_node
            .push(totals(&pids, &before, window).cpu_percent);
        let fs_pids: Vec<u32> = get("vmha-fs")
            .into_iter()
            .filter(|p| on_node.contains(p))
            .collect();
        w.vmha_fs_cpu_percent_per_node
            .push(totals(&fs_pids, &before, window).cpu_percent);
    }
    for i in 0..2 {
        for (ifname, (p1, b1)) in &net_after[i] {
            let (p0, b0) = net_before[i].get(ifname).copied().unwrap_or((0, 0));
            w.packets.push(IfPackets {
                node: vc.node(i).name().to_string(),
                interface: ifname.clone(),
                packets: p1 - p0,
                bytes: b1 - b0,
                packets_per_s: (p1 - p0) as f64 / window,
            });
        }
    }
    Ok(w)
}

/// Runs the benchmark; the results also when a later step failed.
pub fn run(opts: &Opts, timing: &Timing) -> Result<Results> {
    let mut r = Results {
        started: crate::sysinfo::utc_rfc3339(crate::sysinfo::unix_now()),
        loadavg_start: loadavg(),
        modules: opts.modules,
        layout: if opts.all_on_node1 {
            "all on node1".into()
        } else {
            "half on each node".into()
        },
        timing: format!("{timing:?}"),
        ..Results::default()
    };
    if let Err(e) = measure(opts, timing, &mut r) {
        eprintln!("[scale] failed: {e:#}");
        r.error = Some(format!("{e:#}"));
    }
    r.loadavg_end = loadavg();
    let json = serde_json::to_string_pretty(&r)?;
    fs::write(&opts.out, json + "\n").with_context(|| format!("writing {}", opts.out.display()))?;
    Ok(r)
}

fn measure(opts: &Opts, timing: &Timing, r: &mut Results) -> Result<()> {
    // A stop signal ends the run through the error path: the cluster's guards
    // stop every process and remove the namespaces.
    crate::interrupt::install()?;
    let modules = layout(opts);
    let t0 = Instant::now();
    let mut vc = VmCluster::with_modules(timing, modules.clone())?;
    vc.start_vmhad(0)?;
    vc.start_vmhad(1)?;
    for m in &modules {
        vc.vmctl(m.data_on, &["prim", &m.name, "--yes"])?;
    }
    for i in 0..2 {
        wait_status(
            &vc,
            i,
            "every module PRIM at home, SECOND ready on the other node",
            Duration::from_secs(600),
            |s| {
                modules.iter().all(|m| {
                    module_state(s, &m.name, &home_name(m)) == Some("PRIM")
                        && module_state(s, &m.name, &other_name(m)) == Some("SECOND")
                        && module_ready(s, &m.name, &other_name(m))
                })
            },
        )?;
    }
    eprintln!(
        "[scale] {} modules PRIM at home, SECONDs ready after {:.1} s (load {})",
        modules.len(),
        t0.elapsed().as_secs_f64(),
        loadavg()
    );
    let writers = Writers::start(&vc, Duration::from_millis(opts.write_interval_ms));
    let result = idle_and_crash(opts, &mut vc, &modules, &writers, r);
    writers.finish();
    result
}

fn idle_and_crash(
    opts: &Opts,
    vc: &mut VmCluster,
    modules: &[ClusterModule],
    writers: &Writers,
    r: &mut Results,
) -> Result<()> {
    // Idle: let the start settle, then the windows.
    std::thread::sleep(Duration::from_secs(5));
    for k in 0..opts.idle_windows {
        let w = idle_window(vc, opts.idle_seconds)?;
        eprintln!(
            "[scale] idle window {}/{} ({:.0} s, load {}): vmhad {:.2} % ({:?}) {} KiB, vmha-fs {:.2} % {} KiB ({} processes); total {:.2} %",
            k + 1,
            opts.idle_windows,
            w.seconds,
            w.loadavg_end,
            w.vmhad.cpu_percent,
            w.vmhad_cpu_percent_per_node,
            w.vmhad.rss_kib,
            w.vmha_fs.cpu_percent,
            w.vmha_fs.rss_kib,
            w.vmha_fs.processes,
            w.own_cpu_percent()
        );
        eprintln!(
            "[scale]   vmha-fs per node {:?}\n[scale]   vmhad threads % {:?}\n[scale]   vmhad wake-ups/s {:?}\n[scale]   vmha-fs threads % {:?}\n[scale]   vmha-fs wake-ups/s {:?}",
            w.vmha_fs_cpu_percent_per_node,
            w.vmhad_threads_cpu_percent,
            w.vmhad_threads_wakeups_per_s,
            w.vmha_fs_threads_cpu_percent,
            w.vmha_fs_threads_wakeups_per_s
        );
        r.windows.push(w);
    }
    let mut order: Vec<&IdleWindow> = r.windows.iter().collect();
    order.sort_by(|a, b| a.own_cpu_percent().total_cmp(&b.own_cpu_percent()));
    if let Some(m) = order.get(order.len() / 2).copied().cloned() {
        r.idle_seconds = m.seconds;
        r.vmhad = m.vmhad;
        r.vmha_fs = m.vmha_fs;
        r.qemu = m.qemu;
        r.libvirtd = m.libvirtd;
        r.vmhad_cpu_percent_per_node = m.vmhad_cpu_percent_per_node;
        r.packets = m.packets;
    }
    if opts.idle_only {
        return Ok(());
    }

    // Writers on; every module written on its home node.
    writers.set(true);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let w = writers.writes();
        if modules.iter().all(|m| {
            w.get(&(m.data_on, m.name.clone()))
                .is_some_and(|v| v.len() >= 2)
        }) {
            break;
        }
        if Instant::now() >= deadline {
            bail!("not every module's writer wrote on its home node within 120 s");
        }
        crate::interrupt::check()?;
        std::thread::sleep(Duration::from_millis(100));
    }
    let moved: Vec<&ClusterModule> = modules.iter().filter(|m| m.data_on == 0).collect();
    r.moved = moved.len();
    eprintln!("[scale] killing node1 ({} modules to move)", moved.len());
    let t_kill = Instant::now();
    let wall_kill = std::time::SystemTime::now();
    vc.crash(0)?;
    // Parallel failover of 32 modules ends in seconds: two minutes is a failure.
    let deadline = t_kill + Duration::from_secs(120);
    loop {
        if let Ok(s) = status(vc, 1) {
            let now = t_kill.elapsed();
            for m in &moved {
                if module_state(&s, &m.name, "node2") == Some("ALONE") {
                    r.to_alone_ms.entry(m.name.clone()).or_insert(ms(now));
                }
            }
        }
        let w = writers.writes();
        for m in &moved {
            if let Some(first) = w
                .get(&(1, m.name.clone()))
                .and_then(|v| v.iter().find(|t| **t > t_kill))
            {
                r.to_write_ms
                    .entry(m.name.clone())
                    .or_insert(ms(first.duration_since(t_kill)));
            }
        }
        if r.to_alone_ms.len() == moved.len() && r.to_write_ms.len() == moved.len() {
            break;
        }
        if Instant::now() >= deadline {
            bail!(
                "after 120 s: {} of {} modules ALONE, {} writing on node2",
                r.to_alone_ms.len(),
                moved.len(),
                r.to_write_ms.len()
            );
        }
        crate::interrupt::check()?;
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    // node2's own modules: the longest pause between writes around the kill.
    let w = writers.writes();
    r.max_stall_own_ms = modules
        .iter()
        .filter(|m| m.data_on == 1)
        .filter_map(|m| w.get(&(1, m.name.clone())))
        .flat_map(|v| v.windows(2).map(|p| p[1].duration_since(p[0])))
        .max()
        .map(ms);
    // Since issue 11 a module is ALONE once its writer mounts, before libvirt
    // starts its domain: wait (up to 120 s) for every `VM started` too.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        for m in &moved {
            if !r.vm_started_ms.contains_key(&m.name) {
                r.events.remove(&m.name);
                r.takeover_begins_ms.remove(&m.name);
                events_after(vc, &m.name, wall_kill, r);
            }
        }
        if r.vm_started_ms.len() == moved.len() || Instant::now() >= deadline {
            break;
        }
        crate::interrupt::check()?;
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(())
}

/// Module `name`'s event lines on node2 after the kill: the first one (the
/// takeover begins) and `VM started`, in ms after the kill (the log lines'
/// wall clock against the kill's).
fn events_after(vc: &VmCluster, name: &str, kill: std::time::SystemTime, r: &mut Results) {
    let Ok(log) = vc.vmctl(1, &["log", name]) else {
        return;
    };
    let kill_ms = kill
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1e3)
        .unwrap_or(0.0);
    for line in log.lines() {
        let Some((ts, text)) = line.split_once(' ') else {
            continue;
        };
        let Ok(at) = humantime::parse_rfc3339(ts) else {
            continue;
        };
        let Ok(at) = at.duration_since(std::time::UNIX_EPOCH) else {
            continue;
        };
        let rel = at.as_secs_f64() * 1e3 - kill_ms;
        if rel < 0.0 {
            continue;
        }
        r.takeover_begins_ms.entry(name.to_string()).or_insert(rel);
        r.events
            .entry(name.to_string())
            .or_default()
            .push(((rel * 10.0).round() / 10.0, text.to_string()));
        if text.contains("VM started") {
            r.vm_started_ms.entry(name.to_string()).or_insert(rel);
        }
    }
}

fn stats(v: &BTreeMap<String, f64>) -> String {
    let mut x: Vec<f64> = v.values().copied().collect();
    if x.is_empty() {
        return "—".into();
    }
    x.sort_by(f64::total_cmp);
    format!(
        "min {:.0} / p50 {:.0} / max {:.0}",
        x[0],
        x[x.len() / 2],
        x[x.len() - 1]
    )
}

impl Results {
    pub fn markdown(&self) -> String {
        let n = self.modules.max(1) as f64;
        let mut s = String::new();
        s.push_str(&format!(
            "{} modules ({}), idle window {:.0} s, load {} → {}\n\n",
            self.modules, self.layout, self.idle_seconds, self.loadavg_start, self.loadavg_end
        ));
        s.push_str("| processes | count | CPU % of one core | per module | RSS MiB | per module | PSS MiB | threads |\n|---|---|---|---|---|---|---|---|\n");
        let own = ProcTotals {
            processes: self.vmhad.processes + self.vmha_fs.processes,
            cpu_ticks: self.vmhad.cpu_ticks + self.vmha_fs.cpu_ticks,
            cpu_percent: self.vmhad.cpu_percent + self.vmha_fs.cpu_percent,
            rss_kib: self.vmhad.rss_kib + self.vmha_fs.rss_kib,
            pss_kib: self.vmhad.pss_kib + self.vmha_fs.pss_kib,
            threads: self.vmhad.threads + self.vmha_fs.threads,
        };
        for (name, t) in [
            ("vmhad (2)", &self.vmhad),
            ("vmha-fs", &self.vmha_fs),
            ("**vmha total**", &own),
            ("qemu (idle domains, not vmha's)", &self.qemu),
            ("libvirtd (2, not vmha's)", &self.libvirtd),
        ] {
            s.push_str(&format!(
                "| {name} | {} | {:.2} | {:.3} | {:.0} | {:.1} | {:.0} | {} |\n",
                t.processes,
                t.cpu_percent,
                t.cpu_percent / n,
                t.rss_kib as f64 / 1024.0,
                t.rss_kib as f64 / 1024.0 / n,
                t.pss_kib as f64 / 1024.0,
                t.threads
            ));
        }
        s.push_str(&format!(
            "\nvmhad per node (CPU % of one core): {:?}\n",
            self.vmhad_cpu_percent_per_node
        ));
        if !self.windows.is_empty() {
            s.push_str("\n| idle window | load at end | vmhad % | vmha-fs % | **vmha total %** | RSS MiB |\n|---|---|---|---|---|---|\n");
            for (k, w) in self.windows.iter().enumerate() {
                s.push_str(&format!(
                    "| {} | {} | {:.2} | {:.2} | **{:.2}** | {:.0} |\n",
                    k + 1,
                    w.loadavg_end,
                    w.vmhad.cpu_percent,
                    w.vmha_fs.cpu_percent,
                    w.own_cpu_percent(),
                    (w.vmhad.rss_kib + w.vmha_fs.rss_kib) as f64 / 1024.0
                ));
            }
            if let Some(w) = self.windows.last() {
                s.push_str(&format!(
                    "\nvmhad threads (last window, % of one core): {:?}\nvmha-fs threads (last window): {:?}\n",
                    w.vmhad_threads_cpu_percent, w.vmha_fs_threads_cpu_percent
                ));
            }
        }
        s.push_str("\n| node | interface | packets/s (rx+tx) | per module | bytes/s |\n|---|---|---|---|---|\n");
        for p in &self.packets {
            s.push_str(&format!(
                "| {} | {} | {:.1} | {:.2} | {:.0} |\n",
                p.node,
                p.interface,
                p.packets_per_s,
                p.packets_per_s / n,
                p.bytes as f64 / self.idle_seconds.max(1.0)
            ));
        }
        s.push_str(&format!(
            "\nnode1 killed, {} modules moved to node2 (ms after the kill):\n\n| | min / p50 / max |\n|---|---|\n| takeover begins (first event) | {} |\n| `VM started` | {} |\n| ALONE in `vmctl status` | {} |\n| writer writes again | {} |\n",
            self.moved,
            stats(&self.takeover_begins_ms),
            stats(&self.vm_started_ms),
            stats(&self.to_alone_ms),
            stats(&self.to_write_ms),
        ));
        if let Some(st) = self.max_stall_own_ms {
            s.push_str(&format!(
                "\nnode2's own modules: longest pause between writes across the kill {st:.0} ms\n"
            ));
        }
        if let Some(e) = &self.error {
            s.push_str(&format!("\nERROR: {e}\n"));
        }
        s
    }
}
