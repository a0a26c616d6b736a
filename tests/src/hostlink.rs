//! A network namespace joined to the host by a veth pair: a process run inside it
//! (`command`) talks to the host over a real interface whose byte counters say what
//! really crossed the "network" (`host_tx_bytes`, `host_rx_bytes`). Dropping it
//! deletes the namespace (the test kills its processes first).

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result};

use crate::node::run;

/// Same prefix as the simulated nodes, so stale namespaces of a crashed test
/// process are cleaned up the same way.
const PREFIX: &str = "vmha-t";

#[derive(Debug)]
pub struct HostLink {
    netns: String,
    host_if: String,
    pub host_addr: Ipv4Addr,
    pub ns_addr: Ipv4Addr,
}

impl HostLink {
    pub fn new() -> Result<Self> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let netns = format!("{PREFIX}{pid}-{seq}-hl");
        let host_if = format!("vh{}x{seq}", pid % 10_000_000);
        // A /30 per (process, link) in 10.213.0.0/16.
        let slot = (pid.wrapping_mul(8).wrapping_add(seq)) % 16384;
        let (hi, lo) = ((slot / 64) as u8, ((slot % 64) * 4) as u8);
        let host_addr = Ipv4Addr::new(10, 213, hi, lo + 1);
        let ns_addr = Ipv4Addr::new(10, 213, hi, lo + 2);
        run(Command::new("ip").args(["netns", "add", &netns]))?;
        let link = HostLink {
            netns,
            host_if,
            host_addr,
            ns_addr,
        };
        link.setup()?;
        Ok(link)
    }

    fn setup(&self) -> Result<()> {
        let ns = self.netns.as_str();
        run(Command::new("ip").args([
            "link",
            "add",
            &self.host_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns,
        ]))?;
        run(Command::new("ip").args([
            "addr",
            "add",
            &format!("{}/30", self.host_addr),
            "dev",
            &self.host_if,
        ]))?;
        run(Command::new("ip").args(["link", "set", &self.host_if, "up"]))?;
        run(Command::new("ip").args([
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/30", self.ns_addr),
            "dev",
            "eth0",
        ]))?;
        run(Command::new("ip").args(["-n", ns, "link", "set", "eth0", "up"]))?;
        run(Command::new("ip").args(["-n", ns, "link", "set", "lo", "up"]))?;
        Ok(())
    }

    /// `program` run inside the network namespace only (`nsenter --net` execs it:
    /// the child's PID is the program's). Not `ip netns exec`: its private copy of
    /// the mount table would keep every FUSE mount of the moment alive in the child
    /// after the host unmounts it.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.netns))
            .arg("--")
            .arg(program);
        c
    }

    /// The namespace's name (`/run/netns/<name>`, `ip -n <name>`, `tc -n <name>`).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The host's end of the veth pair (the namespace's end is `eth0`).
    pub fn host_if(&self) -> &str {
        &self.host_if
    }

    fn counter(&self, name: &str) -> Result<u64> {
        let path = format!("/sys/class/net/{}/statistics/{name}", self.host_if);
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        text.trim()
            .parse()
            .with_context(|| format!("parsing {path}: {text:?}"))
    }

    /// Bytes the host sent into the namespace (frames, headers included).
    pub fn host_tx_bytes(&self) -> Result<u64> {
        self.counter("tx_bytes")
    }

    /// Bytes the host received from the namespace.
    pub fn host_rx_bytes(&self) -> Result<u64> {
        self.counter("rx_bytes")
    }
}

impl Drop for HostLink {
    fn drop(&mut self) {
        // Deleting the namespace removes its veth end, and with it ours.
        if let Err(e) = run(Command::new("ip").args(["netns", "delete", &self.netns])) {
            eprintln!("[hostlink] {e:#}");
        }
        let _ = run(Command::new("ip").args(["link", "del", &self.host_if]));
    }
}
