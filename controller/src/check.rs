//! `vmhad --check-config` and `vmctl config check`: the configuration file
//! checked whole (every problem at once, each as `FILE:LINE:COLUMN: KEY:
//! MESSAGE`, see [`crate::config::check_text`]), then what the file asks of
//! this host:
//!
//! - this node's addresses are configured here;
//! - each module's replicated directories exist;
//! - the ports are free: the heartbeat port (UDP) on each local address, each
//!   module's replication ports (TCP) on its replication address — a port
//!   held by this node's own `vmhad` or `vmha-fs` counts as free, so the
//!   check runs on a live node;
//! - each module's libvirt URI answers, and its domain is known there or its
//!   XML (`<first replicated dir>/<domain>.xml`) is present;
//! - the witnesses answer;
//! - the cluster key file exists, belongs to root (or to the user running
//!   the check) and is not readable by group or others.
//!
//! Host problems of a module that is not started are warnings (a module
//! added for later need not exist yet). A module counts as started when the
//! `vmhad` running here shows it in another state than STOP; with no `vmhad`
//! running, every module counts as started (vmhad starts them all). The
//! exit status is 0 only when no error remains.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::config::{check_text, Config, Module, NodeIndex};
use crate::control::{Client, Request};
use crate::state::{Role, WitnessOutcome};

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

/// The outcome of a check: one line per finding, errors and warnings counted.
#[derive(Debug, Default)]
pub struct Report {
    pub lines: Vec<String>,
    pub errors: usize,
    pub warnings: usize,
}

impl Report {
    fn add(&mut self, severity: Severity, line: String) {
        match severity {
            Severity::Error => {
                self.errors += 1;
                self.lines.push(format!("error: {line}"));
            }
            Severity::Warning => {
                self.warnings += 1;
                self.lines.push(format!("warning: {line}"));
            }
        }
    }

    /// The closing line.
    pub fn summary(&self) -> String {
        format!("{} error(s), {} warning(s)", self.errors, self.warnings)
    }
}

/// Checks the file at `path` for node `node` (when `None`: the node the
/// running vmhad says it is, else the one node whose addresses are here).
pub fn check_file(path: &Path, node: Option<&str>) -> Report {
    let mut report = Report::default();
    let file = path.display().to_string();
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => {
            report.add(Severity::Error, format!("{file}: cannot read: {e}"));
            return report;
        }
    };
    // A key this release does not know: a warning (a file written for a
    // newer vmha, during a rolling upgrade), or a typo.
    for unknown in crate::config::unknown_keys(&text) {
        report.add(Severity::Warning, format!("{file}:{unknown}"));
    }
    let config = match check_text(&text) {
        Ok(config) => config,
        Err(problems) => {
            for p in problems {
                report.add(Severity::Error, p.render(&file, &text));
            }
            return report;
        }
    };
    let running = running_status(&config);
    let name = match node {
        Some(name) => name.to_string(),
        None => match running
            .as_ref()
            .map(|s| s.node.clone())
            .or_else(|| guess_node(&config))
        {
            Some(name) => name,
            None => {
                report.add(
                    Severity::Error,
                    format!("{file}: which node is this? pass --node (no running vmhad, and not exactly one node's addresses are here)"),
                );
                return report;
            }
        },
    };
    let index = match config.local_node(&name) {
        Ok(index) => index,
        Err(e) => {
            report.add(Severity::Error, format!("{file}: node: {e}"));
            return report;
        }
    };
    let started: Option<HashSet<String>> = running.map(|status| {
        status
            .modules
            .iter()
            .filter(|m| {
                m.nodes
                    .get(&status.node)
                    .and_then(|n| n.state)
                    .is_some_and(|r| r != Role::Stop)
            })
            .map(|m| m.name.clone())
            .collect()
    });
    host_checks(&config, index, started.as_ref(), &mut report);
    report
}

/// The running vmhad's status, if one answers on the configured socket.
fn running_status(config: &Config) -> Option<crate::status::Status> {
    let mut client = Client::connect(&config.cluster.control_socket).ok()?;
    client.call(&Request::Status).ok()?.status
}

fn is_local(ip: IpAddr) -> bool {
    // Binding an address succeeds only when it is configured on this host.
    UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

fn guess_node(config: &Config) -> Option<String> {
    let here: Vec<&crate::config::Node> = config
        .nodes
        .iter()
        .filter(|n| n.addresses.first().is_some_and(|a| is_local(*a)))
        .collect();
    match here.as_slice() {
        [one] => Some(one.name.clone()),
        _ => None,
    }
}

fn host_checks(
    config: &Config,
    node: NodeIndex,
    started: Option<&HashSet<String>>,
    report: &mut Report,
) {
    let local = config.node(node);
    let cluster = &config.cluster;
    let own = own_sockets();
    for (i, address) in local.addresses.iter().enumerate() {
        if !is_local(*address) {
            report.add(
                Severity::Error,
                format!(
                    "node[{}].addresses[{i}]: {address} is not an address of this host",
                    node.get()
                ),
            );
            continue;
        }
        let at = SocketAddr::new(*address, cluster.heartbeat_port);
        if let Err(e) = UdpSocket::bind(at) {
            if !own.udp.contains(&cluster.heartbeat_port) {
                report.add(
                    Severity::Error,
                    format!("cluster.heartbeat_port: {at} (UDP) is not free: {e}"),
                );
            }
        }
    }
    key_file_check(&cluster.key_file, report);
    if !cluster.witness.is_empty() {
        let outcome = crate::witness::probe(&cluster.witness);
        match outcome.outcome {
            WitnessOutcome::Reachable => {}
            WitnessOutcome::Unreachable => report.add(
                Severity::Error,
                "cluster.witness: no witness answers from here".to_string(),
            ),
            WitnessOutcome::CouldNotProbe => report.add(
                Severity::Error,
                format!(
                    "cluster.witness: could not be probed: {}",
                    outcome.errors.join("; ")
                ),
            ),
        }
    }
    for module in &config.modules {
        let severity = match started {
            Some(set) if !set.contains(&module.name) => Severity::Warning,
            _ => Severity::Error,
        };
        module_checks(config, node, module, &own, severity, report);
    }
}

fn module_checks(
    config: &Config,
    node: NodeIndex,
    module: &Module,
    own: &OwnSockets,
    severity: Severity,
    report: &mut Report,
) {
    let name = &module.name;
    let note = if severity == Severity::Warning {
        " (module not started)"
    } else {
        ""
    };
    for (i, dir) in module.replicated.iter().enumerate() {
        if !dir.is_dir() {
            report.add(
                severity,
                format!(
                    "modules.{name}.replicated[{i}]: {} does not exist or is not a directory{note}",
                    dir.display()
                ),
            );
        }
    }
    if let Some(ip) = config
        .node(node)
        .addresses
        .get(module.replication_network)
        .copied()
    {
        for i in 0..module.replicated.len() {
            let Ok(port) = u16::try_from(usize::from(module.port) + i) else {
                continue;
            };
            if let Err(e) = TcpListener::bind(SocketAddr::new(ip, port)) {
                if !own.tcp.contains(&port) {
                    report.add(
                        severity,
                        format!("modules.{name}.port: {ip}:{port} (TCP) is not free: {e}{note}"),
                    );
                }
            }
        }
    }
    libvirt_check(module, severity, note, report);
}

fn libvirt_check(module: &Module, severity: Severity, note: &str, report: &mut Report) {
    let name = &module.name;
    virt::error::clear_error_callback();
    let conn = match virt::connect::Connect::open(Some(&module.libvirt_uri)) {
        Ok(conn) => conn,
        Err(e) => {
            report.add(
                severity,
                format!(
                    "modules.{name}.libvirt_uri: {} does not answer: {e}{note}",
                    module.libvirt_uri
                ),
            );
            return;
        }
    };
    let known = conn.lookup_domain_by_name(&module.domain).is_ok();
    drop(conn);
    let xml = crate::driver::libvirt::xml_path(module).ok();
    let xml_present = xml.as_ref().is_some_and(|p| p.is_file());
    if !known && !xml_present {
        report.add(
            severity,
            format!(
                "modules.{name}.domain: `{}` is neither defined in {} nor described by {}{note}",
                module.domain,
                module.libvirt_uri,
                xml.map(|p| p.display().to_string())
                    .unwrap_or_else(|| "an XML file".into())
            ),
        );
    }
}

fn key_file_check(path: &Path, report: &mut Report) {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) => {
            report.add(
                Severity::Error,
                format!("cluster.key_file: {}: {e}", path.display()),
            );
            return;
        }
    };
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != me {
        report.add(
            Severity::Error,
            format!(
                "cluster.key_file: {} belongs to uid {}, not to root",
                path.display(),
                meta.uid()
            ),
        );
    }
    if meta.mode() & 0o077 != 0 {
        report.add(
            Severity::Error,
            format!(
                "cluster.key_file: {} has mode {:o}: group and others must have no access (chmod 600)",
                path.display(),
                meta.mode() & 0o7777
            ),
        );
    }
}

/// Ports held by this node's own vmhad or vmha-fs processes.
#[derive(Debug, Default)]
struct OwnSockets {
    tcp: HashSet<u16>,
    udp: HashSet<u16>,
}

/// Socket inodes of `/proc/net/FILE` by local port (TCP: listening only).
fn sockets(file: &str, listen_only: bool) -> Vec<(u16, u64)> {
    let Ok(text) = std::fs::read_to_string(format!("/proc/net/{file}")) else {
        return Vec::new();
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let port = u16::from_str_radix(fields.get(1)?.rsplit(':').next()?, 16).ok()?;
            if listen_only && *fields.get(3)? != "0A" {
                return None;
            }
            let inode = fields.get(9)?.parse().ok()?;
            Some((port, inode))
        })
        .collect()
}

fn own_sockets() -> OwnSockets {
    let mut inodes: HashSet<u64> = HashSet::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return OwnSockets::default();
    };
    for entry in procs.flatten() {
        let pid = entry.file_name();
        if !pid.to_string_lossy().chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if !matches!(comm.trim(), "vmhad" | "vmha-fs") {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(link) = std::fs::read_link(fd.path()) {
                let link = link.to_string_lossy().to_string();
                if let Some(inode) = link
                    .strip_prefix("socket:[")
                    .and_then(|r| r.strip_suffix(']'))
                    .and_then(|n| n.parse().ok())
                {
                    inodes.insert(inode);
                }
            }
        }
    }
    let mut own = OwnSockets::default();
    for (file, listen, tcp) in [
        ("tcp", true, true),
        ("tcp6", true, true),
        ("udp", false, false),
        ("udp6", false, false),
    ] {
        for (port, inode) in sockets(file, listen) {
            if inodes.contains(&inode) {
                if tcp {
                    own.tcp.insert(port);
                } else {
                    own.udp.insert(port);
                }
            }
        }
    }
    own
}
