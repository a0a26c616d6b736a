//! Simulated nodes on one machine (DESIGN.md, "Testing on one machine").
//!
//! A [`Node`] is a network namespace (`ip netns add`, a unique name per test
//! run) plus a long-lived *holder* process started in it with private mount
//! and PID namespaces. Inside the mount namespace `/run`, `/etc/libvirt`,
//! `/var/lib/libvirt`, `/var/log/libvirt` and `/var/cache/libvirt` are bind
//! mounts of per-node directories, so each node runs its own `virtlogd` and
//! `libvirtd` and `qemu:///system` inside a node is that node's daemon. The
//! holder is PID 1 of the node's PID namespace (a perl loop that reaps the
//! node's orphans, e.g. qemu after libvirtd daemonized it); it is the node's
//! "hardware" and survives [`Node::kill_all`], so a crashed node can start its
//! daemons again.
//!
//! A [`Cluster`] owns a temporary directory and two nodes joined by two veth
//! pairs: the production network and the dedicated network. Dropping a node
//! kills every process of its namespaces by PID (SIGKILL), reaps what it
//! spawned and deletes the network namespace; the mount namespace disappears
//! with its last process, and nothing is ever mounted in the host's namespace.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::proc::Child;

/// Prefix of every network namespace created here: `vmha-t<pid>-<seq>-<node>`.
const NETNS_PREFIX: &str = "vmha-t";

/// Cluster directories are `/var/tmp/vmha-cluster-<pid>-XXXXXX`.
const CLUSTER_PARENT: &str = "/var/tmp";
const CLUSTER_PREFIX: &str = "vmha-cluster-";

/// The per-node directories bind-mounted over the host's paths in the node's
/// mount namespace: (subdirectory of the node's directory, mount point).
pub const NODE_MOUNTS: &[(&str, &str)] = &[
    ("run", "/run"),
    ("etc-libvirt", "/etc/libvirt"),
    ("var-lib-libvirt", "/var/lib/libvirt"),
    ("var-log-libvirt", "/var/log/libvirt"),
    ("var-cache-libvirt", "/var/cache/libvirt"),
];

/// `qemu.conf` of every node: no cgroups (two libvirtds on one host would
/// collide), root without systemd, dbus or a security driver.
pub const QEMU_CONF: &str = r#"user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
"#;

/// `libvirtd.conf` of every node.
pub const LIBVIRTD_CONF: &str = r#"auth_unix_ro = "none"
auth_unix_rw = "none"
unix_sock_group = "root"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
"#;

/// `virtlogd.conf` of every node.
pub const VIRTLOGD_CONF: &str = r#"log_outputs = "3:file:/var/log/libvirt/virtlogd.log"
"#;

/// The libvirt URI to use inside a node (resolves to the node's own daemon).
pub const LIBVIRT_URI: &str = "qemu:///system";

/// The two networks between nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Network {
    /// The production network (heartbeats, clients).
    Production,
    /// The dedicated replication network (heartbeats, replication).
    Dedicated,
}

impl Network {
    /// Both networks.
    pub const ALL: [Network; 2] = [Network::Production, Network::Dedicated];

    /// Interface name of this network inside every node.
    pub fn ifname(self) -> &'static str {
        match self {
            Network::Production => "prod0",
            Network::Dedicated => "ded0",
        }
    }

    /// The address of node `index` (0-based) on this network: 10.200.1.x for
    /// production, 10.201.1.x for dedicated (only inside the namespaces).
    pub fn address(self, index: u8) -> Ipv4Addr {
        let second = match self {
            Network::Production => 200,
            Network::Dedicated => 201,
        };
        Ipv4Addr::new(10, second, 1, index.saturating_add(1))
    }

    /// Prefix length of both networks.
    pub const PREFIX_LEN: u8 = 24;
}

/// Runs `cmd` to completion; fails with its stderr unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(out)
}

/// The namespace link (`net:[4026532…]`) of process `pid`, if readable.
fn ns_of(pid: u32, kind: &str) -> Option<String> {
    fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// All PIDs currently in /proc.
fn all_pids() -> Result<Vec<u32>> {
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").context("reading /proc")? {
        let entry = entry.context("reading /proc")?;
        if let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// The `net:[inode]` form of a network namespace file (e.g. /run/netns/NAME).
fn netns_id(path: &Path) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let md = fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
    Ok(format!("net:[{}]", md.ino()))
}

/// Best effort: the process may be gone already.
fn signal(pid: u32, sig: libc::c_int) {
    let _ = crate::fsctl::signal(pid, sig);
}

/// Process state letter from /proc/PID/stat (R, S, D, T, Z, ...).
pub fn process_state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    after.trim_start().chars().next()
}

/// Deletes network namespaces left by earlier test processes that died without
/// tearing down (their creator PID no longer exists), killing their processes,
/// then those processes' cluster directories.
pub fn cleanup_stale_nodes() -> Result<()> {
    // Tests of one binary run in parallel: one cleans up at a time.
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    cleanup_stale_netns()?;
    let Ok(dir) = fs::read_dir(CLUSTER_PARENT) else {
        return Ok(());
    };
    for entry in dir {
        let entry = entry.with_context(|| format!("reading {CLUSTER_PARENT}"))?;
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(CLUSTER_PREFIX)) else {
            continue;
        };
        let Some(owner) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{owner}")).exists() {
            eprintln!("[node] removing stale {}", entry.path().display());
            match fs::remove_dir_all(entry.path()) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("removing {}", entry.path().display()))
                }
                _ => {}
            }
        }
    }
    Ok(())
}

fn cleanup_stale_netns() -> Result<()> {
    let Ok(dir) = fs::read_dir("/run/netns") else {
        return Ok(());
    };
    for entry in dir {
        let name = entry.context("reading /run/netns")?.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix(NETNS_PREFIX) else {
            continue;
        };
        let Some(owner) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        eprintln!("[node] removing stale network namespace {name}");
        let id = netns_id(&Path::new("/run/netns").join(name))?;
        for _ in 0..50 {
            let pids: Vec<u32> = all_pids()?
                .into_iter()
                .filter(|&p| ns_of(p, "net").as_deref() == Some(id.as_str()))
                .collect();
            if pids.is_empty() {
                break;
            }
            for p in pids {
                signal(p, libc::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Err(e) = run(Command::new("ip").args(["netns", "delete", name])) {
            // Another test process may have deleted it meanwhile.
            if Path::new("/run/netns").join(name).exists() {
                return Err(e);
            }
        }
    }
    Ok(())
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// One simulated node. See the module documentation.
#[derive(Debug)]
pub struct Node {
    name: String,
    index: u8,
    netns: String,
    dir: PathBuf,
    /// The `unshare` process (in the node's network namespace, host PID namespace).
    unshare: Option<Child>,
    /// Host PID of the holder (PID 1 of the node's PID namespace).
    holder_pid: u32,
    net_id: String,
    mnt_id: String,
    pid_id: String,
    daemons: Vec<Child>,
}

impl Node {
    /// Creates node `name` (index `index`, 0-based, used for its addresses) with
    /// its directories under `base/name`: a new network namespace with `lo` up,
    /// the per-node libvirt directories and configuration, and the holder.
    /// libvirt is not started: see [`Node::start_libvirt`].
    pub fn new(base: &Path, name: &str, index: u8) -> Result<Self> {
        let seq = SEQ.fetch_add(1, Ordering::SeqCst);
        let netns = format!("{NETNS_PREFIX}{}-{seq}-{name}", std::process::id());
        let dir = base.join(name);
        for (sub, _) in NODE_MOUNTS {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        let etc = dir.join("etc-libvirt");
        fs::write(etc.join("qemu.conf"), QEMU_CONF).context("writing qemu.conf")?;
        fs::write(etc.join("libvirtd.conf"), LIBVIRTD_CONF).context("writing libvirtd.conf")?;
        fs::write(etc.join("virtlogd.conf"), VIRTLOGD_CONF).context("writing virtlogd.conf")?;
        fs::create_dir_all(dir.join("var-lib-libvirt/qemu"))?;
        fs::create_dir_all(dir.join("var-log-libvirt/qemu"))?;

        run(Command::new("ip").args(["netns", "add", &netns]))?;
        let mut node = Self {
            name: name.to_string(),
            index,
            netns,
            dir,
            unshare: None,
            holder_pid: 0,
            net_id: String::new(),
            mnt_id: String::new(),
            pid_id: String::new(),
            daemons: Vec::new(),
        };
        // From here on, Drop tears down whatever exists.
        node.net_id = netns_id(&node.netns_path())?;
        run(Command::new("ip").args(["-n", &node.netns, "link", "set", "lo", "up"]))?;
        node.start_holder()?;
        Ok(node)
    }

    fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.netns)
    }

    fn start_holder(&mut self) -> Result<()> {
        let mut script = String::from("set -e\n");
        for (sub, target) in NODE_MOUNTS {
            let src = self.dir.join(sub);
            script.push_str(&format!(
                "mkdir -p '{target}'\nmount --bind '{}' '{target}'\n",
                src.display()
            ));
        }
        // PID 1 of the node reaps every orphan (e.g. qemu once libvirtd
        // daemonized it) without ever forking, so killing every other process
        // of the node terminates. perl-base is essential in Debian.
        script.push_str(
            "echo holder ready >&2\n\
             exec perl -e 'while (1) { sleep 1 if waitpid(-1, 0) < 0 }'\n",
        );
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns_path().display()))
            .args([
                "--",
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--pid",
                "--fork",
                "--mount-proc",
                "--",
                "/bin/bash",
                "-c",
                &script,
            ])
            .stdout(Stdio::null());
        let mut child = Child::spawn(&format!("{}-holder", self.name), cmd)?;
        let upid = child.pid();
        let res = child.wait_ready(Duration::from_secs(10));
        self.unshare = Some(child);
        res?;
        let children = fs::read_to_string(format!("/proc/{upid}/task/{upid}/children"))
            .context("reading the holder's PID")?;
        self.holder_pid = children
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| anyhow!("unshare {upid} has no child"))?;
        self.mnt_id = ns_of(self.holder_pid, "mnt").ok_or_else(|| anyhow!("holder mnt ns"))?;
        self.pid_id = ns_of(self.holder_pid, "pid").ok_or_else(|| anyhow!("holder pid ns"))?;
        Ok(())
    }

    /// The node's name (e.g. "node1").
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node's index (0-based).
    pub fn index(&self) -> u8 {
        self.index
    }

    /// The network namespace's name (for `ip -n` / `ip netns exec`).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The node's directory (holds its run/, etc-libvirt/, var-*-libvirt/).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The node's address on `net`.
    pub fn address(&self, net: Network) -> Ipv4Addr {
        net.address(self.index)
    }

    /// Host PID of the holder (PID 1 of the node's PID namespace).
    pub fn holder_pid(&self) -> u32 {
        self.holder_pid
    }

    /// `path` as seen inside the node, reachable from the host through the
    /// holder's root (`/proc/<holder>/root/<path>`): mounts made inside the
    /// node (e.g. a FUSE mount by a daemon started with [`Node::command`]) are
    /// only visible in the node's mount namespace.
    pub fn host_path(&self, path: impl AsRef<Path>) -> PathBuf {
        let rel = path.as_ref().strip_prefix("/").unwrap_or(path.as_ref());
        PathBuf::from(format!("/proc/{}/root", self.holder_pid)).join(rel)
    }

    /// A command that runs `program` inside the node (its network, mount and
    /// PID namespaces), via `nsenter` on the holder. The spawned process is
    /// `nsenter`, which waits for the program and returns its status.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.holder_pid.to_string(), "-n", "-m", "-p", "--"])
            .arg(program);
        cmd
    }

    /// Runs `program args` inside the node; its stdout, or an error with stderr.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        let out =
            run(self.command(program).args(args)).with_context(|| format!("on {}", self.name))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `virsh -c qemu:///system args` inside the node.
    pub fn virsh(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-c", LIBVIRT_URI];
        all.extend_from_slice(args);
        self.run("virsh", &all)
    }

    /// `ip -n <netns> args` (from the host, for links and addresses).
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let out = run(Command::new("ip").args(["-n", &self.netns]).args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts `virtlogd` and `libvirtd` inside the node (foreground, owned by
    /// this node) and waits until `virsh version` answers.
    pub fn start_libvirt(&mut self, timeout: Duration) -> Result<()> {
        for daemon in ["virtlogd", "libvirtd"] {
            let mut cmd = self.command(daemon);
            cmd.stdout(Stdio::null());
            let child = Child::spawn(&format!("{}-{daemon}", self.name), cmd)?;
            self.daemons.push(child);
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.virsh(&["version"]) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    let log = fs::read_to_string(self.dir.join("var-log-libvirt/libvirtd.log"))
                        .unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(20).collect();
                    bail!(
                        "libvirtd on {} not answering after {timeout:?}: {e:#}\nlibvirtd.log tail:\n{}",
                        self.name,
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
                Err(_) => {
                    for d in &mut self.daemons {
                        if let Some(st) = d.try_status()? {
                            bail!("{} exited ({st}): {}", d.name(), d.stderr_text());
                        }
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Restarts the node's `libvirtd` as `systemctl restart libvirtd` does:
    /// SIGTERM (its guests keep running), then a new one; waits until `virsh
    /// version` answers.
    pub fn restart_libvirtd(&mut self, timeout: Duration) -> Result<()> {
        let name = format!("{}-libvirtd", self.name);
        let i = self
            .daemons
            .iter()
            .position(|d| d.name() == name)
            .ok_or_else(|| anyhow!("{}: libvirtd not started", self.name))?;
        let mut old = self.daemons.remove(i);
        // The child is nsenter, which does not forward signals: libvirtd is
        // its (only) child.
        let nsenter = old.pid();
        let children = fs::read_to_string(format!("/proc/{nsenter}/task/{nsenter}/children"))
            .unwrap_or_default();
        for pid in children.split_whitespace().filter_map(|p| p.parse().ok()) {
            signal(pid, libc::SIGTERM);
        }
        old.wait_exit(Duration::from_secs(15))
            .with_context(|| format!("stopping {name}"))?;
        let mut cmd = self.command("libvirtd");
        cmd.stdout(Stdio::null());
        self.daemons.push(Child::spawn(&name, cmd)?);
        let deadline = Instant::now() + timeout;
        loop {
            match self.virsh(&["version"]) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(e.context(format!("{name} not answering after {timeout:?}")))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn is_infrastructure(&self, pid: u32) -> bool {
        pid == self.holder_pid
            || self.unshare.as_ref().is_some_and(|u| u.pid() == pid)
            || pid == std::process::id()
    }

    /// Host PIDs of every process of the node (in its network, mount or PID
    /// namespace), except the holder and its `unshare` parent. Zombies are not
    /// listed (their namespace links are gone).
    pub fn pids(&self) -> Result<Vec<u32>> {
        Ok(all_pids()?
            .into_iter()
            .filter(|&p| !self.is_infrastructure(p))
            .filter(|&p| {
                ns_of(p, "net").as_deref() == Some(self.net_id.as_str())
                    || (!self.mnt_id.is_empty()
                        && ns_of(p, "mnt").as_deref() == Some(self.mnt_id.as_str()))
                    || (!self.pid_id.is_empty()
                        && ns_of(p, "pid").as_deref() == Some(self.pid_id.as_str()))
            })
            .collect())
    }

    /// Node crash: SIGKILL (by PID) every process of the node until none is
    /// left (bounded), then reaps the daemons this node started. Returns how
    /// many processes were signalled. The holder stays, so
    /// [`Node::start_libvirt`] can be called again.
    pub fn kill_all(&mut self) -> Result<usize> {
        let mut killed = std::collections::BTreeSet::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pids = self.pids()?;
            if pids.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                bail!("{}: processes survive SIGKILL: {pids:?}", self.name);
            }
            for p in pids {
                signal(p, libc::SIGKILL);
                killed.insert(p);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for mut d in self.daemons.drain(..) {
            d.wait_exit(Duration::from_secs(5))
                .with_context(|| format!("reaping {}", d.name()))?;
        }
        Ok(killed.len())
    }

    /// Node freeze: SIGSTOP every process of the node (twice, to catch
    /// processes forked meanwhile). Returns the stopped PIDs.
    pub fn freeze(&self) -> Result<Vec<u32>> {
        let mut all = std::collections::BTreeSet::new();
        for _ in 0..2 {
            for p in self.pids()? {
                signal(p, libc::SIGSTOP);
                all.insert(p);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(all.into_iter().collect())
    }

    /// SIGCONT every process of the node.
    pub fn thaw(&self) -> Result<()> {
        for p in self.pids()? {
            signal(p, libc::SIGCONT);
        }
        Ok(())
    }

    /// Brings this node's end of `net` up or down (a partition of that network).
    pub fn set_link(&self, net: Network, up: bool) -> Result<()> {
        self.ip(&["link", "set", net.ifname(), if up { "up" } else { "down" }])?;
        Ok(())
    }

    /// Takes this node's end of `net` down until the returned guard is dropped.
    pub fn link_down(&self, net: Network) -> Result<LinkDown<'_>> {
        self.set_link(net, false)?;
        Ok(LinkDown { node: self, net })
    }

    /// One ICMP echo to `addr` from inside the node (busybox ping), within 1 s.
    pub fn ping(&self, addr: Ipv4Addr) -> Result<bool> {
        let st = self
            .command("busybox")
            .args(["ping", "-c", "1", "-W", "1", &addr.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("running ping")?;
        Ok(st.success())
    }

    fn teardown(&mut self) -> Result<()> {
        let mut errors = Vec::new();
        if let Err(e) = self.kill_all() {
            errors.push(format!("{e:#}"));
        }
        // Killing PID 1 of the node's PID namespace kills whatever is left in it;
        // the mount namespace (and its bind mounts) goes with its last process.
        if self.holder_pid != 0 {
            signal(self.holder_pid, libc::SIGKILL);
        }
        if let Some(mut u) = self.unshare.take() {
            if let Err(e) = u.wait_exit(Duration::from_secs(10)) {
                errors.push(format!("{e:#}"));
            }
        }
        if let Err(e) = self.kill_all() {
            errors.push(format!("{e:#}"));
        }
        if self.netns_path().exists() {
            if let Err(e) = run(Command::new("ip").args(["netns", "delete", &self.netns])) {
                errors.push(format!("{e:#}"));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("tearing down {}: {}", self.name, errors.join("; "))
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("[node] {e:#}");
        }
    }
}

/// Joins `a` and `b` by a veth pair for `net` (interface [`Network::ifname`]
/// in both), with their addresses, both ends up.
pub fn connect(a: &Node, b: &Node, net: Network) -> Result<()> {
    let ifname = net.ifname();
    run(Command::new("ip").args([
        "link",
        "add",
        ifname,
        "netns",
        a.netns(),
        "type",
        "veth",
        "peer",
        "name",
        ifname,
        "netns",
        b.netns(),
    ]))?;
    for n in [a, b] {
        let addr = format!("{}/{}", n.address(net), Network::PREFIX_LEN);
        n.ip(&["addr", "add", &addr, "dev", ifname])?;
        n.ip(&["link", "set", ifname, "up"])?;
    }
    Ok(())
}

/// A temporary directory and one or two nodes ("node1", "node2"), two nodes
/// being joined on both networks. Drop tears down the nodes, then removes the
/// directory.
#[derive(Debug)]
pub struct Cluster {
    // Declared before `dir`: fields drop in order, nodes before their directory.
    nodes: Vec<Node>,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Creates `n` (1 or 2) nodes under a new directory in /var/tmp (a disk
    /// filesystem: qemu's `cache='none'` needs O_DIRECT).
    pub fn new(n: usize) -> Result<Self> {
        if !(1..=2).contains(&n) {
            bail!("a cluster has 1 or 2 nodes, not {n}");
        }
        cleanup_stale_nodes()?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("{CLUSTER_PREFIX}{}-", std::process::id()))
            .tempdir_in(CLUSTER_PARENT)
            .context("creating the cluster directory")?;
        let mut cluster = Self {
            nodes: Vec::new(),
            dir,
        };
        for i in 0..n {
            let index = u8::try_from(i)?;
            let node = Node::new(cluster.dir.path(), &format!("node{}", i + 1), index)?;
            cluster.nodes.push(node);
        }
        if let [a, b] = cluster.nodes.as_slice() {
            for net in Network::ALL {
                connect(a, b, net)?;
            }
        }
        Ok(cluster)
    }

    /// The cluster's directory (node directories and anything the test puts there).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Node `i` (0-based).
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    /// Node `i` (0-based), mutably.
    pub fn node_mut(&mut self, i: usize) -> &mut Node {
        &mut self.nodes[i]
    }

    /// All nodes.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// All nodes, mutably.
    pub fn nodes_mut(&mut self) -> &mut [Node] {
        &mut self.nodes
    }

    /// Starts virtlogd + libvirtd on every node.
    pub fn start_libvirt(&mut self, timeout: Duration) -> Result<()> {
        for n in &mut self.nodes {
            n.start_libvirt(timeout)?;
        }
        Ok(())
    }
}

/// Two libvirt daemons and TCG guests per cluster saturate this machine's two CPUs:
/// the cluster tests of one test binary hold this for their whole run, so they take
/// turns even when the harness runs tests in parallel.
pub fn one_cluster_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A network cut on one node ([`Node::link_down`]): the link comes back up
/// when this is dropped, whatever the test did meanwhile.
#[derive(Debug)]
pub struct LinkDown<'a> {
    node: &'a Node,
    net: Network,
}

impl Drop for LinkDown<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.node.set_link(self.net, true) {
            eprintln!("[{}] restoring the link: {e:#}", self.node.name);
        }
    }
}
