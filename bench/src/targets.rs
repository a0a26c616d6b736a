//! The directories fio runs in: a plain local directory, a vmha-fs pair on
//! this machine, bindfs as a plain FUSE pass-through reference, and
//! vmha-fuse-probe (a bare pass-through written against the kernel ABI) over
//! /dev/fuse or over io_uring, to measure the FUSE transport itself.

use crate::mounts::{fstype_at, lazy_unmount_all, MountGuard};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use vmha_test_infra::fuse_uring::EnableUring;
use vmha_test_infra::pair::{free_port, keygen};
use vmha_test_infra::proc::{Child, SpawnOptions};

/// How long a daemon may take to report ready / mount.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a child gets to exit after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(15);
/// How long to wait for a SIGKILLed child to be reaped.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// Starts a child of the benchmark (the test crate's process guard): stdout and
/// stderr go to `log`; its own process group, so a Ctrl-C at the terminal reaches
/// only us and we stop the children in order (primary before secondary, then
/// unmount); SIGTERM with [`STOP_GRACE`] before SIGKILL when dropped; a bounded
/// wait after SIGKILL (a process stuck in a FUSE request may never die); our
/// SIGINT flag ends a wait for `ready`.
pub fn spawn_logged(name: &str, cmd: Command, log: &Path) -> Result<Child> {
    let opts = SpawnOptions::new()
        .log_file(log)
        .own_process_group()
        .kill_wait(KILL_WAIT)
        .stop_on_drop(STOP_GRACE)
        .interrupt_check(crate::interrupt::check);
    Child::spawn_with(name, cmd, opts)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Local,
    /// Two fio jobs writing two files of a local directory at once: the best any
    /// two-copy system on this one disk can reach (rates are per copy).
    #[serde(rename = "two-copies")]
    TwoCopies,
    /// vmha-fs with the default protocol C.
    Vmha,
    #[serde(rename = "vmha-B")]
    VmhaB,
    #[serde(rename = "vmha-flush")]
    VmhaFlush,
    /// vmha-fs primary with no peer (the ALONE state): the FUSE path, the
    /// activity log and the dirty map without replication, i.e. the ceiling
    /// any replication protocol over this FUSE path can reach.
    #[serde(rename = "vmha-alone")]
    VmhaAlone,
    Bindfs,
    /// vmha-fuse-probe over /dev/fuse with vmha-fs's thread count: the bare
    /// classic transport, no replication, no fuser.
    #[serde(rename = "fuse-dev")]
    FuseDev,
    /// vmha-fuse-probe over FUSE io_uring, the backing I/O on the ring too
    /// (`enable_uring` is switched on for the run).
    #[serde(rename = "fuse-uring")]
    FuseUring,
    /// The same with the backing I/O done inline by the queue threads (what a
    /// synchronous filesystem would get from the ring).
    #[serde(rename = "fuse-uring-sync")]
    FuseUringSync,
}

impl Kind {
    const ALL: [Kind; 10] = [
        Kind::Local,
        Kind::TwoCopies,
        Kind::Vmha,
        Kind::VmhaB,
        Kind::VmhaFlush,
        Kind::VmhaAlone,
        Kind::Bindfs,
        Kind::FuseDev,
        Kind::FuseUring,
        Kind::FuseUringSync,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Local => "local",
            Kind::TwoCopies => "two-copies",
            Kind::Vmha => "vmha",
            Kind::VmhaB => "vmha-B",
            Kind::VmhaFlush => "vmha-flush",
            Kind::VmhaAlone => "vmha-alone",
            Kind::Bindfs => "bindfs",
            Kind::FuseDev => "fuse-dev",
            Kind::FuseUring => "fuse-uring",
            Kind::FuseUringSync => "fuse-uring-sync",
        }
    }

    /// vmha-fuse-probe's arguments for a probe target.
    fn probe_args(self) -> Option<&'static [&'static str]> {
        match self {
            // vmha-fs's default `--threads`.
            Kind::FuseDev => Some(&["--transport", "dev", "--threads", "16"]),
            Kind::FuseUring => Some(&["--transport", "uring"]),
            Kind::FuseUringSync => Some(&["--transport", "uring", "--sync-io"]),
            _ => None,
        }
    }

    /// Runs vmha-fuse-probe.
    pub fn is_probe(self) -> bool {
        self.probe_args().is_some()
    }

    /// Needs FUSE over io_uring switched on.
    pub fn needs_uring(self) -> bool {
        matches!(self, Kind::FuseUring | Kind::FuseUringSync)
    }

    /// How many files each job writes at once on this target.
    pub fn copies(self) -> u32 {
        if self == Kind::TwoCopies {
            2
        } else {
            1
        }
    }

    /// The `--protocol` of a vmha target.
    fn protocol(self) -> Option<&'static str> {
        match self {
            Kind::Vmha => Some("C"),
            Kind::VmhaB => Some("B"),
            Kind::VmhaFlush => Some("flush"),
            // Nothing is replicated: the protocol does not matter.
            Kind::VmhaAlone => Some("C"),
            _ => None,
        }
    }

    /// A vmha-fs pair.
    pub fn is_vmha(self) -> bool {
        self.protocol().is_some()
    }

    /// Targets named in a comma list, in canonical order (local first: the
    /// ratios are relative to it).
    pub fn parse_list(list: &str) -> Result<Vec<Kind>> {
        let wanted: Vec<&str> = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        for w in &wanted {
            if !Self::ALL.iter().any(|k| k.name() == *w) {
                let known: Vec<&str> = Self::ALL.iter().map(|k| k.name()).collect();
                bail!("unknown target {w:?}; known: {}", known.join(","));
            }
        }
        if wanted.is_empty() {
            bail!("--targets is empty");
        }
        Ok(Self::ALL
            .into_iter()
            .filter(|k| wanted.contains(&k.name()))
            .collect())
    }

    /// Targets named in a comma list, in the order given (duplicates
    /// dropped): for rotating the order between runs; the ratios are computed
    /// against `local` whatever its place.
    pub fn parse_list_as_given(list: &str) -> Result<Vec<Kind>> {
        let canonical = Self::parse_list(list)?;
        let mut out: Vec<Kind> = Vec::new();
        for w in list.split(',').map(str::trim) {
            if let Some(k) = canonical.iter().find(|k| k.name() == w) {
                if !out.contains(k) {
                    out.push(*k);
                }
            }
        }
        Ok(out)
    }
}

#[derive(Debug)]
struct VmhaPair {
    // Field order is drop order: primary (unmounts P/mnt) before secondary,
    // then the leftover-mount cleanup.
    primary: Child,
    /// None for `vmha-alone`.
    secondary: Option<Child>,
    p_data: PathBuf,
    s_data: PathBuf,
    /// The primary's state dir (its `metrics.json`).
    p_state: PathBuf,
    _unmount: [MountGuard; 2],
}

/// One FUSE pass-through daemon: bindfs or vmha-fuse-probe.
#[derive(Debug)]
struct PassThrough {
    // Drop order: the daemon stops, leftover mounts go, then enable_uring is
    // put back (io_uring targets).
    proc: Child,
    _unmount: MountGuard,
    _uring: Option<EnableUring>,
}

#[derive(Debug)]
enum Backend {
    Local,
    Vmha(VmhaPair),
    PassThrough(PassThrough),
}

/// A set-up target; dropping it stops its daemons and unmounts.
#[derive(Debug)]
pub struct Target {
    pub kind: Kind,
    /// Where fio's files go.
    pub dir: PathBuf,
    backend: Backend,
    aborted: bool,
}

fn mkdirs(dirs: &[&Path]) -> Result<()> {
    for d in dirs {
        std::fs::create_dir_all(d).with_context(|| format!("mkdir {}", d.display()))?;
    }
    Ok(())
}

/// Waits until a FUSE filesystem is mounted at `mnt`, while `proc` lives.
fn wait_fuse_mounted(proc: &mut Child, mnt: &Path) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(t) = fstype_at(mnt)? {
            if t.starts_with("fuse") {
                return Ok(());
            }
        }
        proc.ensure_running()?;
        crate::interrupt::check()?;
        if Instant::now() > deadline {
            bail!(
                "no FUSE mount at {} after {READY_TIMEOUT:?}; {} log tail:\n{}",
                mnt.display(),
                proc.name(),
                proc.log_tail(20)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn setup_vmha(root: &Path, bin: &Path, protocol: &str, alone: bool) -> Result<(PathBuf, VmhaPair)> {
    let key = root.join("cluster.key");
    let (p, s) = (root.join("p"), root.join("s"));
    let (p_data, p_mnt, p_state) = (p.join("data"), p.join("mnt"), p.join("state"));
    let (s_data, s_state) = (s.join("data"), s.join("state"));
    mkdirs(&[&p_data, &p_mnt, &p_state, &s_data, &s_state])?;

    keygen(bin, &key)?;

    // Guards first: whatever happens below, leftover mounts get detached.
    let unmount = [
        MountGuard::new(p_mnt.clone()),
        MountGuard::new(s_data.clone()),
    ];
    let addr = format!("127.0.0.1:{}", free_port()?);
    let secondary = if alone {
        None
    } else {
        let mut cmd = Command::new(bin);
        cmd.arg("secondary")
            .arg("--backing")
            .arg(&s_data)
            .args(["--listen", &addr])
            .arg("--state")
            .arg(&s_state)
            .arg("--key-file")
            .arg(&key);
        let mut secondary = spawn_logged("vmha-fs secondary", cmd, &root.join("secondary.log"))?;
        secondary.wait_ready(READY_TIMEOUT)?;
        Some(secondary)
    };
    let mut cmd = Command::new(bin);
    cmd.arg("primary")
        .arg("--backing")
        .arg(&p_data)
        .arg("--mount")
        .arg(&p_mnt);
    if alone {
        cmd.arg("--alone");
    } else {
        cmd.args(["--peer", &addr]);
    }
    cmd.arg("--state")
        .arg(&p_state)
        .arg("--key-file")
        .arg(&key)
        .args(["--protocol", protocol]);
    let mut primary = spawn_logged("vmha-fs primary", cmd, &root.join("primary.log"))?;
    primary.wait_ready(READY_TIMEOUT)?;
    // "ready" must mean mounted: otherwise fio would write into the bare dir.
    wait_fuse_mounted(&mut primary, &p_mnt)?;
    Ok((
        p_mnt,
        VmhaPair {
            primary,
            secondary,
            p_data,
            s_data,
            p_state,
            _unmount: unmount,
        },
    ))
}

/// Starts a pass-through of `root/src` on `root/mnt`: `command(src, mnt)`,
/// logging to `root/log`; `ready`: the daemon prints `ready` once serving
/// (vmha-fuse-probe).
fn setup_passthrough(
    root: &Path,
    name: &str,
    log: &str,
    command: impl FnOnce(&Path, &Path) -> Command,
    ready: bool,
    uring: Option<EnableUring>,
) -> Result<(PathBuf, PassThrough)> {
    let (src, mnt) = (root.join("src"), root.join("mnt"));
    mkdirs(&[&src, &mnt])?;
    let unmount = MountGuard::new(mnt.clone());
    let mut proc = spawn_logged(name, command(&src, &mnt), &root.join(log))?;
    if ready {
        proc.wait_ready(READY_TIMEOUT)?;
    }
    wait_fuse_mounted(&mut proc, &mnt)?;
    Ok((
        mnt,
        PassThrough {
            proc,
            _unmount: unmount,
            _uring: uring,
        },
    ))
}

fn setup_bindfs(root: &Path) -> Result<(PathBuf, PassThrough)> {
    // Foreground (-f) so it is our child and stops by PID.
    let command = |src: &Path, mnt: &Path| {
        let mut cmd = Command::new("bindfs");
        cmd.arg("-f").arg(src).arg(mnt);
        cmd
    };
    setup_passthrough(root, "bindfs", "bindfs.log", command, false, None)
}

fn setup_probe(root: &Path, bin: &Path, kind: Kind) -> Result<(PathBuf, PassThrough)> {
    // On before the probe mounts (the kernel offers io_uring at INIT only
    // then); back to the old value when the target is dropped, also on error.
    let uring = kind.needs_uring().then(EnableUring::new).transpose()?;
    let command = |src: &Path, mnt: &Path| {
        let mut cmd = Command::new(bin);
        cmd.arg("--backing")
            .arg(src)
            .arg("--mount")
            .arg(mnt)
            .args(kind.probe_args().unwrap_or_default());
        cmd
    };
    let name = format!("vmha-fuse-probe ({})", kind.name());
    setup_passthrough(root, &name, "probe.log", command, true, uring)
}

/// Compares two files; `None` if equal, else a description of the difference.
fn compare_files(a: &Path, b: &Path) -> Result<Option<String>> {
    let (mut fa, mut fb) = (
        File::open(a).with_context(|| format!("open {}", a.display()))?,
        File::open(b).with_context(|| format!("open {}", b.display()))?,
    );
    let (la, lb) = (fa.metadata()?.len(), fb.metadata()?.len());
    if la != lb {
        return Ok(Some(format!("sizes differ: {la} vs {lb}")));
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut off = 0u64;
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(None);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            let i = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y);
            return Ok(Some(format!(
                "content differs at offset {}",
                off + i.unwrap_or(0) as u64
            )));
        }
        off += n as u64;
    }
}

impl Target {
    /// Creates the target's directories under `root` and starts its daemons.
    /// `vmha_fs` and `probe` are the binaries of the vmha and probe targets.
    pub fn setup(
        kind: Kind,
        root: &Path,
        vmha_fs: Option<&Path>,
        probe: Option<&Path>,
    ) -> Result<Self> {
        mkdirs(&[root])?;
        let (dir, backend) = match kind {
            Kind::Local | Kind::TwoCopies => {
                let dir = root.join("dir");
                mkdirs(&[&dir])?;
                (dir, Backend::Local)
            }
            Kind::Vmha | Kind::VmhaB | Kind::VmhaFlush | Kind::VmhaAlone => {
                let bin = vmha_fs.context("vmha target needs the vmha-fs binary")?;
                let protocol = kind.protocol().unwrap_or("C");
                let (dir, pair) = setup_vmha(root, bin, protocol, kind == Kind::VmhaAlone)?;
                (dir, Backend::Vmha(pair))
            }
            Kind::Bindfs => {
                let (dir, b) = setup_bindfs(root)?;
                (dir, Backend::PassThrough(b))
            }
            Kind::FuseDev | Kind::FuseUring | Kind::FuseUringSync => {
                let bin = probe.context("probe target needs the vmha-fuse-probe binary")?;
                let (dir, p) = setup_probe(root, bin, kind)?;
                (dir, Backend::PassThrough(p))
            }
        };
        Ok(Self {
            kind,
            dir,
            backend,
            aborted: false,
        })
    }

    /// Errors if a daemon died or the mount vanished.
    pub fn ensure_healthy(&mut self) -> Result<()> {
        match &mut self.backend {
            Backend::Local => return Ok(()),
            Backend::Vmha(v) => {
                if let Some(s) = &mut v.secondary {
                    s.ensure_running()?;
                }
                v.primary.ensure_running()?;
            }
            Backend::PassThrough(p) => p.proc.ensure_running()?,
        }
        match fstype_at(&self.dir)? {
            Some(t) if t.starts_with("fuse") => Ok(()),
            other => bail!(
                "{}: no FUSE mount at {} (found {other:?})",
                self.kind.name(),
                self.dir.display()
            ),
        }
    }

    /// CPU time and context switches of the target's daemons so far (every
    /// thread; for vmha the primary and the secondary). None for `local`.
    pub fn daemon_usage(&self) -> Option<Usage> {
        if matches!(self.backend, Backend::Local) {
            return None;
        }
        let mut total = Usage::default();
        for p in self.daemons() {
            total.add(&Usage::of(p.pid())?);
        }
        Some(total)
    }

    /// For vmha: the primary's `metrics.json` now (None for other targets, or
    /// when unreadable). It is rewritten at most once a second: wait that long
    /// after the operations to count.
    pub fn fs_metrics(&self) -> Option<vmha_fs::status::FsMetrics> {
        let Backend::Vmha(v) = &self.backend else {
            return None;
        };
        let text = std::fs::read(v.p_state.join(vmha_fs::status::METRICS)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// For vmha: whether the secondary's copy of `name` equals the
    /// primary's backing file. `None` for other targets.
    pub fn replica_check(&self, name: &str) -> Option<String> {
        let Backend::Vmha(v) = &self.backend else {
            return None;
        };
        // vmha-alone: no replica to compare.
        v.secondary.as_ref()?;
        let (p, s) = (v.p_data.join(name), v.s_data.join(name));
        if !p.exists() || !s.exists() {
            return Some(format!(
                "cannot compare by name: {} exists={}, {} exists={}",
                p.display(),
                p.exists(),
                s.display(),
                s.exists()
            ));
        }
        Some(match compare_files(&p, &s) {
            Ok(None) => "identical".to_owned(),
            Ok(Some(diff)) => format!("MISMATCH: {diff}"),
            Err(e) => format!("compare failed: {e:#}"),
        })
    }

    /// The target's daemons (for vmha the primary and the secondary).
    fn daemons(&self) -> Vec<&Child> {
        match &self.backend {
            Backend::Local => vec![],
            Backend::Vmha(v) => std::iter::once(&v.primary).chain(&v.secondary).collect(),
            Backend::PassThrough(p) => vec![&p.proc],
        }
    }

    pub fn is_aborted(&self) -> bool {
        self.aborted
    }

    /// The daemons' last log lines, for error reports.
    pub fn log_tails(&self, lines: usize) -> String {
        self.daemons()
            .iter()
            .map(|p| format!("[{}]\n{}", p.name(), p.log_tail(lines)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Kills the daemons at once (a hung FUSE request keeps fio unkillable
    /// until the daemon's /dev/fuse closes), then detaches the mounts.
    pub fn abort(&mut self) {
        let procs: Vec<&mut Child> = match &mut self.backend {
            Backend::Local => vec![],
            Backend::Vmha(v) => std::iter::once(&mut v.primary)
                .chain(&mut v.secondary)
                .collect(),
            Backend::PassThrough(p) => vec![&mut p.proc],
        };
        for p in procs {
            if let Err(e) = p.kill() {
                eprintln!("vmha-bench: {e:#}");
            }
        }
        let _ = lazy_unmount_all(&self.dir);
        self.aborted = true;
    }

    /// Stops the daemons with SIGTERM and reports anything unclean.
    pub fn shutdown(mut self) -> Vec<String> {
        let mut notes = Vec::new();
        let name = self.kind.name();
        if self.aborted {
            notes.push(format!("{name}: daemons were SIGKILLed after a hung run"));
            return notes;
        }
        let mut stop = |p: &mut Child, mnt: &Path| {
            match p.terminate(STOP_GRACE) {
                Ok((st, killed)) => {
                    if killed {
                        notes.push(format!(
                            "{name}: {} ignored SIGTERM for {STOP_GRACE:?}; SIGKILLed",
                            p.name()
                        ));
                    } else if !st.success() {
                        notes.push(format!(
                            "{name}: {} exited with {st} on SIGTERM; log tail:\n{}",
                            p.name(),
                            p.log_tail(10)
                        ));
                    }
                }
                Err(e) => notes.push(format!("{name}: stopping {}: {e:#}", p.name())),
            }
            match lazy_unmount_all(mnt) {
                Ok(0) => {}
                Ok(n) => notes.push(format!(
                    "{name}: {} left {n} mount(s) at {} after exiting; detached",
                    p.name(),
                    mnt.display()
                )),
                Err(e) => notes.push(format!("{name}: {e:#}")),
            }
        };
        match &mut self.backend {
            Backend::Local => {}
            Backend::Vmha(v) => {
                stop(&mut v.primary, &self.dir);
                if let Some(s) = &mut v.secondary {
                    stop(s, &v.s_data);
                }
            }
            Backend::PassThrough(p) => stop(&mut p.proc, &self.dir),
        }
        notes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_lists_are_canonical() -> Result<()> {
        assert_eq!(
            Kind::parse_list("bindfs,local")?,
            [Kind::Local, Kind::Bindfs]
        );
        assert!(Kind::parse_list("nfs").is_err());
        assert_eq!(
            Kind::parse_list("fuse-uring,local,fuse-dev,vmha-alone")?,
            [Kind::Local, Kind::VmhaAlone, Kind::FuseDev, Kind::FuseUring]
        );
        assert_eq!(
            Kind::parse_list_as_given("fuse-uring,local,fuse-dev,local")?,
            [Kind::FuseUring, Kind::Local, Kind::FuseDev]
        );
        assert_eq!(
            Kind::parse_list("vmha-flush,two-copies,local,vmha-B,vmha")?,
            [
                Kind::Local,
                Kind::TwoCopies,
                Kind::Vmha,
                Kind::VmhaB,
                Kind::VmhaFlush
            ]
        );
        Ok(())
    }

    #[test]
    fn compare_detects_difference() -> Result<()> {
        let d = tempfile::tempdir()?;
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        std::fs::write(&a, b"hello world")?;
        std::fs::write(&b, b"hello world")?;
        assert_eq!(compare_files(&a, &b)?, None);
        std::fs::write(&b, b"hello World")?;
        assert_eq!(
            compare_files(&a, &b)?.as_deref(),
            Some("content differs at offset 6")
        );
        Ok(())
    }
}

/// CPU time and context switches of processes (see [`Target::daemon_usage`]).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Usage {
    /// User + system CPU time, microseconds (clock-tick resolution).
    pub cpu_us: u64,
    /// Voluntary context switches (a thread blocked: a wake-up follows).
    pub voluntary_switches: u64,
    /// Involuntary ones (a thread preempted).
    pub involuntary_switches: u64,
}

impl Usage {
    /// Of process `pid`: CPU from `/proc/PID/stat` (all its threads, live or
    /// ended), switches summed over its live threads' `status`.
    pub fn of(pid: u32) -> Option<Usage> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name (which may hold spaces), 1-based from 3.
        let rest = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 =
            fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        // SAFETY: sysconf only reads a system constant.
        let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
            .ok()
            .filter(|h| *h > 0)?;
        let mut u = Usage {
            cpu_us: ticks * 1_000_000 / hz,
            ..Usage::default()
        };
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))
            .ok()?
            .flatten()
        {
            let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
                continue;
            };
            for line in status.lines() {
                let value = |l: &str| l.split_whitespace().nth(1)?.parse::<u64>().ok();
                if line.starts_with("voluntary_ctxt_switches:") {
                    u.voluntary_switches += value(line).unwrap_or(0);
                } else if line.starts_with("nonvoluntary_ctxt_switches:") {
                    u.involuntary_switches += value(line).unwrap_or(0);
                }
            }
        }
        Some(u)
    }

    pub fn add(&mut self, other: &Usage) {
        self.cpu_us += other.cpu_us;
        self.voluntary_switches += other.voluntary_switches;
        self.involuntary_switches += other.involuntary_switches;
    }

    /// What was added since `earlier`.
    pub fn since(&self, earlier: &Usage) -> Usage {
        Usage {
            cpu_us: self.cpu_us.saturating_sub(earlier.cpu_us),
            voluntary_switches: self
                .voluntary_switches
                .saturating_sub(earlier.voluntary_switches),
            involuntary_switches: self
                .involuntary_switches
                .saturating_sub(earlier.involuntary_switches),
        }
    }
}
