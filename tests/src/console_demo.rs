//! The demo's last step (`make demo`): the web console of a running node made
//! reachable from the host, with a fresh password, until the operator presses
//! Enter.
//!
//! Why here: the cluster lives only as long as the test process that owns it,
//! so the pause happens inside it. The node's console listens only inside its
//! network namespace; a [`PortForward`] on 127.0.0.1 (port 9010, or any free
//! port if 9010 is taken on the host) carries the HTTPS connections in. When
//! standard input is not a terminal (CI, a pipe) nothing waits.

use std::io::{BufRead, IsTerminal, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;

use anyhow::{ensure, Context, Result};
use rand::distr::{Alphanumeric, SampleString};

use crate::cluster_vm::{workspace_bin, VmCluster};
use crate::forward::PortForward;
use crate::node::Network;

/// The console's port on every node address.
pub const CONSOLE_PORT: u16 = 9010;

/// `vmctl web-password --stdin` inside node `i`.
pub fn set_web_password(vc: &VmCluster, i: usize, password: &str) -> Result<()> {
    let vmctl = workspace_bin("vmctl", "VMCTL_BIN")?;
    let mut child = vc
        .node(i)
        .command(&vmctl)
        .arg("--config")
        .arg(vc.config())
        .args(["web-password", "--stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning vmctl web-password")?;
    child
        .stdin
        .take()
        .context("no stdin for vmctl web-password")?
        .write_all(format!("{password}\n").as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "vmctl web-password: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Sets a random console password on node `i`, forwards a host port to its
/// console, prints the URL and the password, and waits for Enter when
/// standard input is a terminal.
pub fn console_until_enter(vc: &VmCluster, i: usize) -> Result<()> {
    let password = Alphanumeric.sample_string(&mut rand::rng(), 16);
    set_web_password(vc, i, &password)?;
    let node = vc.node(i);
    let target = SocketAddr::from((node.address(Network::Production), CONSOLE_PORT));
    let candidates = [
        SocketAddr::from((Ipv4Addr::LOCALHOST, CONSOLE_PORT)),
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
    ];
    let forward = PortForward::start(&candidates, node.holder_pid(), target)?;
    let url = format!("https://{}/", forward.local_addr());
    let mut out = std::io::stderr().lock();
    writeln!(
        out,
        "\n### web console of {} ({target} inside the node), from this machine:",
        node.name()
    )?;
    writeln!(
        out,
        "###   URL:      {url}   (self-signed certificate: accept it in the browser)"
    )?;
    writeln!(out, "###   user:     admin")?;
    writeln!(out, "###   password: {password}")?;
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        writeln!(out, "### press Enter to stop the cluster")?;
        drop(out);
        let mut line = String::new();
        stdin.lock().read_line(&mut line)?;
    } else {
        writeln!(out, "### (standard input is not a terminal: not waiting)")?;
    }
    drop(forward);
    Ok(())
}
