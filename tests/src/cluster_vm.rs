//! Two simulated nodes running `vmhad` with one module (`vm1`, the counter
//! guest) replicated by `vmha-fs`: the setup of the end-to-end failover tests
//! and of the demo.
//!
//! Every node keeps its private paths (DESIGN.md, "Testing on one machine"):
//! the replicated directory [`REPLICATED`], the state directory, the key file
//! and the control socket are the same paths on both nodes but distinct
//! directories, so one configuration file serves both (its hash matches). The
//! guest's console log ([`CONSOLE`]) is per node too and outside the
//! replicated directory, since the nodes run the domain at different times.
//!
//! Teardown: the `vmhad` guards are dropped first (SIGKILL by PID), then the
//! [`Cluster`] kills every process of each node (qemu, vmha-fs, libvirtd) and
//! deletes its namespaces; the FUSE mounts live only in the nodes' mount
//! namespaces and vanish with them.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::guest::{build_guest, create_disk, domain_xml, DomainSpec, GuestImage};
use crate::node::{run, Cluster, Network, Node};
use crate::proc::Child;

/// The module and libvirt domain name.
pub const MODULE: &str = "vm1";
/// The replicated directory (inside each node; private per node).
pub const REPLICATED: &str = "/var/lib/libvirt/images/vm1";
/// The guest's console log inside each node (private per node, not replicated).
pub const CONSOLE: &str = "/var/log/libvirt/vm1-console.log";
/// The controller's state directory inside each node (private per node).
pub const STATE_DIR: &str = "/var/lib/libvirt/vmha-state";
/// The cluster key inside each node (a copy per node).
pub const KEY_FILE: &str = "/etc/libvirt/vmha/cluster.key";
/// The control socket inside each node.
pub const CONTROL_SOCKET: &str = "/run/vmha/vmhad.sock";

const LIBVIRT_TIMEOUT: Duration = Duration::from_secs(30);

/// Timeouts of the test configuration.
#[derive(Debug, Clone)]
pub struct Timing {
    /// `heartbeat_interval_ms`.
    pub heartbeat_interval_ms: u64,
    /// `failover_timeout_ms`.
    pub failover_timeout_ms: u64,
    /// `start_wait_ms`.
    pub start_wait_ms: u64,
    /// `lock_timeout_ms` of the module.
    pub lock_timeout_ms: u64,
    /// `stop_timeout_s` of the module.
    pub stop_timeout_s: u64,
    /// `maxloop` of the module: local restarts of the guest before failing over.
    pub maxloop: u32,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 200,
            failover_timeout_ms: 2000,
            start_wait_ms: 2000,
            lock_timeout_ms: 3000,
            stop_timeout_s: 30,
            maxloop: 3,
        }
    }
}

pub use crate::bin::workspace_bin;

/// What runs as a module's libvirt domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainKind {
    /// The counter guest (TCG, direct kernel boot) on a qcow2 disk in the
    /// module's replicated directory; its console is [`ClusterModule::console`].
    Counter,
    /// A domain with no disk, no kernel and 32 MiB of RAM: QEMU sits idle in
    /// its firmware (no bootable device). For benchmarks with more modules
    /// than TCG guests fit on the machine; the module's data is then written
    /// by a process outside the domain.
    Idle,
}

/// One `[[module]]` of the test cluster: its libvirt domain has the same name,
/// its replicated directory is `/var/lib/libvirt/images/NAME`.
#[derive(Debug, Clone)]
pub struct ClusterModule {
    /// Module and domain name.
    pub name: String,
    /// Replication port.
    pub port: u16,
    /// `default_primary` (a node index), if any.
    pub default_primary: Option<usize>,
    /// The node whose replicated directory holds the initial data (the disk
    /// and `NAME.xml`): the first `vmctl prim` goes there.
    pub data_on: usize,
    /// What the domain runs.
    pub kind: DomainKind,
    /// More replicated directories after [`ClusterModule::dir`] (e.g. a
    /// snapshot directory); directory `i` replicates on `port + i`.
    pub extra_dirs: Vec<String>,
}

impl ClusterModule {
    /// A module with its data on node `data_on` and no `default_primary`.
    pub fn new(name: &str, port: u16, data_on: usize, kind: DomainKind) -> Self {
        Self {
            name: name.to_string(),
            port,
            default_primary: None,
            data_on,
            kind,
            extra_dirs: Vec::new(),
        }
    }

    /// Every replicated directory of the module inside each node: its own
    /// ([`ClusterModule::dir`]) first, then the extra ones.
    pub fn dirs(&self) -> Vec<String> {
        let mut dirs = vec![self.dir()];
        dirs.extend(self.extra_dirs.iter().cloned());
        dirs
    }

    /// The module's replicated directory inside each node.
    pub fn dir(&self) -> String {
        format!("/var/lib/libvirt/images/{}", self.name)
    }

    /// The guest's console log inside each node.
    pub fn console(&self) -> String {
        format!("/var/log/libvirt/{}-console.log", self.name)
    }

    fn toml(&self, t: &Timing) -> String {
        let default_primary = self
            .default_primary
            .map(|i| format!("default_primary = \"node{}\"\n", i + 1))
            .unwrap_or_default();
        format!(
            r#"
[[module]]
name = "{name}"
domain = "{name}"
libvirt_uri = "qemu:///system"
replicated = [{dirs}]
port = {port}
replication_network = 1
{default_primary}failover = true
lock_timeout_ms = {lt}
stop_timeout_s = {st}
maxloop = {ml}
loop_interval_s = 86400
"#,
            name = self.name,
            dirs = self
                .dirs()
                .iter()
                .map(|d| format!("\"{d}\""))
                .collect::<Vec<_>>()
                .join(", "),
            port = self.port,
            lt = t.lock_timeout_ms,
            st = t.stop_timeout_s,
            ml = t.maxloop,
        )
    }
}

/// The module of [`VmCluster::new`]: `vm1`, the counter guest, data on node1.
pub fn default_module() -> ClusterModule {
    ClusterModule::new(MODULE, 7101, 0, DomainKind::Counter)
}

/// The libvirt domain of a [`DomainKind::Idle`] module.
pub fn idle_domain_xml(name: &str) -> String {
    format!(
        r#"<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <memballoon model='none'/>
  </devices>
</domain>
"#
    )
}

/// The cluster configuration (identical on both nodes) with module `vm1`.
pub fn config_toml(t: &Timing) -> String {
    config_toml_with(t, &[default_module()])
}

/// The cluster configuration (identical on both nodes) with `modules`.
pub fn config_toml_with(t: &Timing, modules: &[ClusterModule]) -> String {
    let addrs = |i: u8| {
        format!(
            "[\"{}\", \"{}\"]",
            Network::Production.address(i),
            Network::Dedicated.address(i)
        )
    };
    let mut text = format!(
        r#"[cluster]
name = "test"
key_file = "{KEY_FILE}"
state_dir = "{STATE_DIR}"
control_socket = "{CONTROL_SOCKET}"
heartbeat_port = 7100
heartbeat_interval_ms = {hb}
failover_timeout_ms = {fo}
start_wait_ms = {sw}

[[node]]
name = "node1"
addresses = {a1}

[[node]]
name = "node2"
addresses = {a2}

"#,
        hb = t.heartbeat_interval_ms,
        fo = t.failover_timeout_ms,
        sw = t.start_wait_ms,
        a1 = addrs(0),
        a2 = addrs(1),
    );
    for m in modules {
        text.push_str(&m.toml(t));
    }
    text
}

/// Two nodes with libvirt, the key, the configuration and the guest's disk and
/// XML in node1's replicated directory; `vmhad` started per node on demand.
#[derive(Debug)]
pub struct VmCluster {
    // Declared before `cluster`: the daemons' guards go first.
    vmhad: Vec<Option<Child>>,
    cluster: Cluster,
    config: PathBuf,
    vmhad_bin: PathBuf,
    vmctl_bin: PathBuf,
    vmha_fs_bin: PathBuf,
    image: GuestImage,
    modules: Vec<ClusterModule>,
}

impl VmCluster {
    /// Builds (or reuses) the guest, creates both nodes, starts their libvirt,
    /// writes the key, the configuration, and the guest's disk + `vm1.xml` into
    /// node1's replicated directory (node2's is empty).
    pub fn new(timing: &Timing) -> Result<Self> {
        Self::with_modules(timing, vec![default_module()])
    }

    /// Like [`VmCluster::new`] with `modules`: each one's directory exists on
    /// both nodes, its data (disk and XML, or only the XML of an idle domain)
    /// in the directory of its `data_on` node.
    pub fn with_modules(timing: &Timing, modules: Vec<ClusterModule>) -> Result<Self> {
        let vmhad_bin = workspace_bin("vmhad", "VMHAD_BIN")?;
        let vmctl_bin = workspace_bin("vmctl", "VMCTL_BIN")?;
        let vmha_fs_bin = crate::bin::vmha_fs_bin()?;
        let image = build_guest()?;
        let mut cluster = Cluster::new(2)?;
        cluster.start_libvirt(LIBVIRT_TIMEOUT)?;

        let key = cluster.dir().join("cluster.key");
        run(std::process::Command::new(&vmha_fs_bin)
            .arg("keygen")
            .arg(&key))?;
        let config = cluster.dir().join("vmha.toml");
        fs::write(&config, config_toml_with(timing, &modules))
            .context("writing the configuration")?;
        for node in cluster.nodes() {
            let k = host_side(node, KEY_FILE)?;
            if let Some(parent) = k.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::copy(&key, &k).with_context(|| format!("copying the key to {}", k.display()))?;
            for dir in modules.iter().flat_map(ClusterModule::dirs) {
                fs::create_dir_all(host_side(node, &dir)?)?;
            }
        }
        for m in &modules {
            let dir = host_side(cluster.node(m.data_on), &m.dir())?;
            let xml = match m.kind {
                DomainKind::Counter => {
                    let disk = Path::new(&m.dir()).join(format!("{}.qcow2", m.name));
                    create_disk(&dir.join(format!("{}.qcow2", m.name)), 64)?;
                    domain_xml(&image, &DomainSpec::new(&m.name, &disk, m.console()))
                }
                DomainKind::Idle => idle_domain_xml(&m.name),
            };
            fs::write(dir.join(format!("{}.xml", m.name)), xml)
                .with_context(|| format!("writing {}.xml", m.name))?;
        }
        Ok(Self {
            vmhad: vec![None, None],
            cluster,
            config,
            vmhad_bin,
            vmctl_bin,
            vmha_fs_bin,
            image,
            modules,
        })
    }

    /// The configured modules.
    pub fn modules(&self) -> &[ClusterModule] {
        &self.modules
    }

    /// Node `i`'s console log of module `name`'s guest, read from the host.
    pub fn console_of(&self, i: usize, name: &str) -> Result<PathBuf> {
        host_side(
            self.node(i),
            &format!("/var/log/libvirt/{name}-console.log"),
        )
    }

    /// Host PID of node `i`'s QEMU running domain `name`, if it runs: found
    /// by libvirt's `-name guest=NAME,…` argument (libvirt's pid file holds
    /// the PID inside the node's PID namespace).
    pub fn qemu_pid_of(&self, i: usize, name: &str) -> Result<Option<u32>> {
        let want = format!("guest={name},");
        for pid in self.node(i).pids()? {
            let Ok(raw) = fs::read(format!("/proc/{pid}/cmdline")) else {
                continue; // exited meanwhile
            };
            let mut args = raw.split(|b| *b == 0);
            let Some(prog) = args.next() else { continue };
            let is_qemu = Path::new(std::ffi::OsStr::from_bytes(prog))
                .file_name()
                .is_some_and(|n| n.as_bytes().starts_with(b"qemu-system"));
            if is_qemu && args.any(|a| a.starts_with(want.as_bytes())) {
                return Ok(Some(pid));
            }
        }
        Ok(None)
    }

    /// Host PID of node `i`'s `vmhad`, if it runs.
    pub fn vmhad_pid(&self, i: usize) -> Result<Option<u32>> {
        Ok(self.pids_of(i, "vmhad", "--config")?.first().copied())
    }

    /// The simulated nodes.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Node `i` (0-based).
    pub fn node(&self, i: usize) -> &Node {
        self.cluster.node(i)
    }

    /// The guest image in use.
    pub fn image(&self) -> &GuestImage {
        &self.image
    }

    /// The configuration file (shared by both nodes, under /var/tmp).
    pub fn config(&self) -> &Path {
        &self.config
    }

    /// Node `i`'s console log, read from the host.
    pub fn console(&self, i: usize) -> Result<PathBuf> {
        host_side(self.node(i), CONSOLE)
    }

    /// Node `i`'s backing copy of the replicated directory, read from the host
    /// (under any FUSE mount of the node: the bytes on its own disk).
    pub fn backing(&self, i: usize) -> Result<PathBuf> {
        host_side(self.node(i), REPLICATED)
    }

    /// Starts `vmhad` on node `i` and waits until `vmctl status` answers there.
    pub fn start_vmhad(&mut self, i: usize) -> Result<()> {
        let node = self.cluster.node(i);
        let name = node.name().to_string();
        let mut cmd = node.command(&self.vmhad_bin);
        cmd.arg("--config")
            .arg(&self.config)
            .args(["--node", &name])
            .arg("--vmha-fs")
            .arg(&self.vmha_fs_bin)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdout(Stdio::null());
        let child = Child::spawn(&format!("{name}-vmhad"), cmd)?;
        if let Some(slot) = self.vmhad.get_mut(i) {
            *slot = Some(child);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.vmctl(i, &["status", "--json"]) {
                Ok(_) => return Ok(()),
                Err(e) => {
                    if let Some(Some(c)) = self.vmhad.get_mut(i) {
                        if let Some(st) = c.try_status()? {
                            bail!("vmhad on {name} exited ({st}): {}", c.stderr_text());
                        }
                    }
                    if Instant::now() >= deadline {
                        return Err(e.context(format!("vmhad on {name} does not answer")));
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Ends `vmhad` on node `i` with SIGTERM and waits for its exit (60 s at
    /// most); what it leaves running stays (start it again with
    /// [`VmCluster::start_vmhad`]). The signal goes to vmhad itself, by the PID
    /// found in the node's process list: the guard's process is `nsenter`,
    /// which does not forward signals.
    pub fn stop_vmhad(&mut self, i: usize) -> Result<()> {
        let name = self.node(i).name().to_string();
        let pids = self.pids_of(i, "vmhad", "--config")?;
        ensure!(pids.len() == 1, "vmhad processes on {name}: {pids:?}");
        let pid = libc::pid_t::try_from(pids[0]).context("pid out of range")?;
        // SAFETY: plain syscall on the PID of node i's vmhad, just read from the
        // node's own process list; its parent (our nsenter guard) has not reaped
        // it, so the PID cannot have been reused.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            bail!("kill({pid}, SIGTERM): {}", std::io::Error::last_os_error());
        }
        if let Some(Some(c)) = self.vmhad.get_mut(i) {
            let status = c.wait_exit(Duration::from_secs(60))?;
            ensure!(status.success(), "vmhad on {name} exited with {status}");
        }
        Ok(())
    }

    /// `vmctl --config FILE args` inside node `i`: its stdout, or an error.
    pub fn vmctl(&self, i: usize, args: &[&str]) -> Result<String> {
        let mut cmd = self.node(i).command(&self.vmctl_bin);
        cmd.arg("--config").arg(&self.config).args(args);
        let out = run(&mut cmd).with_context(|| format!("vmctl on {}", self.node(i).name()))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Ends node `i`'s `vmhad` alone with `signal` (SIGKILL: a crash of the
    /// daemon; SIGTERM or SIGINT: a stop) and reaps it; the rest of the node
    /// (vmha-fs, libvirt, QEMU) runs on. Its stderr stays readable.
    pub fn signal_vmhad(&mut self, i: usize, signal: libc::c_int) -> Result<()> {
        let name = self.node(i).name().to_string();
        // The child is `nsenter`: the daemon is its child inside the node.
        let pids = self.pids_of(i, "vmhad", "--node")?;
        ensure!(pids.len() == 1, "vmhad on {name}: PIDs {pids:?}");
        for pid in pids {
            let pid = libc::pid_t::try_from(pid).context("pid out of range")?;
            // SAFETY: plain syscall on the PID of this node's vmhad, listed just before.
            unsafe { libc::kill(pid, signal) };
        }
        let Some(Some(c)) = self.vmhad.get_mut(i) else {
            bail!("no vmhad runs on {name}");
        };
        let status = c.wait_exit(Duration::from_secs(20))?;
        eprintln!("[cluster] vmhad on {name} ended by signal {signal}: {status}");
        Ok(())
    }

    /// Node crash: SIGKILL every process of node `i` (qemu, vmhad, vmha-fs,
    /// libvirtd...) and reap its `vmhad`. Returns how many were killed.
    pub fn crash(&mut self, i: usize) -> Result<usize> {
        let killed = self.cluster.node_mut(i).kill_all()?;
        if let Some(Some(mut c)) = self.vmhad.get_mut(i).map(Option::take) {
            c.wait_exit(Duration::from_secs(5))?;
            // Keep its stderr readable for diagnostics.
            if let Some(slot) = self.vmhad.get_mut(i) {
                *slot = Some(c);
            }
        }
        Ok(killed)
    }

    /// Reboot of a crashed node `i` (after [`VmCluster::crash`]): what a real
    /// reboot drops is dropped — the mounts left at the replicated directory
    /// (a dead FUSE writer, a killed receiver's read-only bind) — and libvirt
    /// starts again. Start `vmhad` with [`VmCluster::start_vmhad`] afterwards.
    pub fn reboot(&mut self, i: usize) -> Result<()> {
        let node = self.cluster.node(i);
        ensure!(
            node.pids()?.is_empty(),
            "{} still runs processes: crash it first",
            node.name()
        );
        let mountinfo = PathBuf::from(format!("/proc/{}/mountinfo", node.holder_pid()));
        for _ in 0..16 {
            let text = fs::read_to_string(&mountinfo)
                .with_context(|| format!("reading {}", mountinfo.display()))?;
            let dirs: Vec<String> = self.modules.iter().flat_map(ClusterModule::dirs).collect();
            let stacked: Vec<&str> = text
                .lines()
                .filter_map(|l| l.split(' ').nth(4))
                .filter(|m| dirs.iter().any(|d| d == m))
                .collect();
            if stacked.is_empty() {
                return self.cluster.node_mut(i).start_libvirt(LIBVIRT_TIMEOUT);
            }
            for m in stacked {
                node.run("umount", &["-l", m])?;
            }
        }
        bail!(
            "{}: mounts at the replicated directories survive umount",
            node.name()
        )
    }

    /// Restarts node `i`'s libvirtd (its guests keep running).
    pub fn restart_libvirtd(&mut self, i: usize) -> Result<()> {
        self.cluster.node_mut(i).restart_libvirtd(LIBVIRT_TIMEOUT)
    }

    /// Host PIDs of node `i`'s processes whose command line holds `arg` as an
    /// argument after the program (e.g. the `vmha-fs` writer: `"primary"`) and
    /// whose program's file name is `program`.
    pub fn pids_of(&self, i: usize, program: &str, arg: &str) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        for pid in self.node(i).pids()? {
            let Ok(raw) = fs::read(format!("/proc/{pid}/cmdline")) else {
                continue; // exited meanwhile
            };
            let args: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
            let Some(prog) = args.first() else { continue };
            let prog = Path::new(std::ffi::OsStr::from_bytes(prog));
            if prog.file_name().is_some_and(|n| n == program)
                && args.iter().skip(1).any(|a| *a == arg.as_bytes())
            {
                out.push(pid);
            }
        }
        Ok(out)
    }

    /// Everything useful after a failure: per node `vmctl status`, `vmctl log`,
    /// the tail of vmhad's stderr (which includes vmha-fs's) and of the qemu log.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        for (i, node) in self.cluster.nodes().iter().enumerate() {
            let name = node.name();
            out.push_str(&format!("===== {name} =====\n"));
            for args in [&["status"][..], &["log"][..]] {
                let text = self
                    .vmctl(i, args)
                    .unwrap_or_else(|e| format!("(vmctl {args:?} failed: {e:#})"));
                out.push_str(&format!("--- vmctl {} ---\n{text}\n", args.join(" ")));
            }
            if let Some(Some(c)) = self.vmhad.get(i) {
                let lines = c.stderr_lines();
                let skip = lines.len().saturating_sub(60);
                out.push_str(&format!(
                    "--- vmhad stderr (last {}) ---\n{}\n",
                    lines.len() - skip,
                    lines[skip..].join("\n")
                ));
            }
            for m in self
                .modules
                .iter()
                .filter(|m| m.kind == DomainKind::Counter)
            {
                let qlog = node
                    .dir()
                    .join("var-log-libvirt/qemu")
                    .join(format!("{}.log", m.name));
                if let Ok(text) = fs::read_to_string(&qlog) {
                    let tail: Vec<&str> = text.lines().rev().take(10).collect();
                    out.push_str(&format!(
                        "--- qemu log tail of {} ---\n{}\n",
                        m.name,
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    ));
                }
            }
        }
        out
    }
}

/// `path` inside `node`, as a host path through the node's bind-mount sources
/// (not through its FUSE mounts): valid for the paths under the node's private
/// directories (`/run`, `/etc/libvirt`, `/var/lib/libvirt`, `/var/log/libvirt`).
pub fn host_side(node: &Node, path: &str) -> Result<PathBuf> {
    for (sub, target) in crate::node::NODE_MOUNTS {
        if let Ok(rest) = Path::new(path).strip_prefix(target) {
            return Ok(node.dir().join(sub).join(rest));
        }
    }
    bail!("{path} is not under a private directory of {}", node.name())
}
