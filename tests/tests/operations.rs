//! Planned maintenance and host shutdown (issue 10, item 2) on two simulated
//! nodes with the counter guest: the stop command of
//! `packaging/systemd/vmha-shutdown.service` (read from the unit file) hands
//! vm1 over and keeps node1 out across a vmhad restart until `vmctl join`;
//! then, with vm1 on node2, maintenance there: the guest killed behind the
//! controller's back is neither restarted nor failed over until `vmctl
//! maintenance off`. One cluster start serves both scenarios (each starts from
//! the state the previous one leaves, which it checks first).
//!
//! Also, without a cluster: the unit passes `systemd-analyze verify` with the
//! command path pointing at the binary just built, and is ordered as the
//! shutdown needs.
//!
//! Needs root, /dev/fuse, the packages of `.ci/install-deps` and the
//! workspace binaries (`cargo build --workspace --bins`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use vmha_test_infra::cluster_vm::{workspace_bin, Timing, VmCluster};
use vmha_test_infra::guest::Console;
use vmha_test_infra::scenario::{
    boots_on, more_counters, qemu_pids, running_pair, runs_vm, STATE_TIMEOUT, SYNC_TIMEOUT,
};
use vmha_test_infra::vmctl_status::{entry, primary, ready, state, status, wait_status};

const UNIT: &str = "vmha-shutdown.service";
/// Where the unit calls vmctl (the package installs it there).
const VMCTL_IN_UNIT: &str = "/usr/bin/vmctl";

fn unit_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging/systemd")
        .join(UNIT)
}

/// The values of `key=` in the unit (each line, in order).
fn unit_values(text: &str, key: &str) -> Vec<String> {
    let prefix = format!("{key}=");
    text.lines()
        .filter_map(|l| l.trim().strip_prefix(&prefix))
        .map(str::to_string)
        .collect()
}

/// The unit's `ExecStop=` as vmctl arguments (after the program).
fn exec_stop_args() -> Result<Vec<String>> {
    let text = std::fs::read_to_string(unit_path())?;
    let stops = unit_values(&text, "ExecStop");
    ensure!(stops.len() == 1, "ExecStop lines: {stops:?}");
    let mut words = stops[0].split_whitespace().map(str::to_string);
    let program = words.next().context("empty ExecStop")?;
    ensure!(program == VMCTL_IN_UNIT, "ExecStop runs {program}");
    Ok(words.collect())
}

fn writer(st: Option<&str>) -> bool {
    matches!(st, Some("PRIM" | "ALONE"))
}

#[test]
fn the_shutdown_unit_verifies_and_is_ordered_before_libvirt_while_vmhad_runs() -> Result<()> {
    let text = std::fs::read_to_string(unit_path())?;
    // Stopped before these (stop order is the reverse of start order), and
    // never stopped along with vmhad (a vmhad restart must not hand over).
    let after: Vec<String> = unit_values(&text, "After")
        .iter()
        .flat_map(|v| v.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .collect();
    for unit in [
        "vmhad.service",
        "libvirtd.service",
        "libvirt-guests.service",
    ] {
        ensure!(
            after.iter().any(|a| a == unit),
            "not After={unit}: {after:?}"
        );
    }
    for key in ["Requires", "BindsTo", "PartOf", "Before"] {
        ensure!(unit_values(&text, key).is_empty(), "{key}= in the unit");
    }
    ensure!(unit_values(&text, "Type") == ["oneshot"]);
    ensure!(unit_values(&text, "RemainAfterExit") == ["yes"]);
    let args = exec_stop_args()?;
    for arg in ["leave", "--wait", "--until-boot"] {
        ensure!(
            args.iter().any(|a| a == arg),
            "ExecStop lacks {arg}: {args:?}"
        );
    }
    // The arguments are vmctl's: it parses them (`--help` after them would
    // print the help; an unknown flag fails).
    let vmctl = workspace_bin("vmctl", "VMCTL_BIN")?;
    let out = std::process::Command::new(&vmctl)
        .args(&args)
        .arg("--help")
        .output()?;
    ensure!(
        out.status.success(),
        "vmctl rejects the unit's arguments: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // systemd-analyze checks the commands exist: point it at the binary just
    // built (not whatever may be installed in /usr/bin), nothing else changed.
    let dir = tempfile::tempdir()?;
    let copy = dir.path().join(UNIT);
    let vmctl = vmctl.to_str().context("vmctl path")?;
    std::fs::write(&copy, text.replace(VMCTL_IN_UNIT, vmctl))?;
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .context("running systemd-analyze")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
    Ok(())
}

/// Runs the unit's stop command on node1 (PRIM): vm1 is handed over to node2,
/// node1 stays out across a vmhad restart, `vmctl join` brings it back.
fn shutdown_leave(vc: &mut VmCluster) -> Result<()> {
    more_counters(vc, 0, 2, Duration::from_secs(60))?;
    let args = exec_stop_args()?;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let t = Instant::now();
    let out = vc.vmctl(0, &args).context("the unit's ExecStop")?;
    eprintln!(
        "[operations] ExecStop on node1 returned after {:?}: {}",
        t.elapsed(),
        out.trim()
    );
    // --wait returned: node2 already runs vm1.
    let s = status(vc, 1)?;
    ensure!(
        writer(state(&s, "node2")) && primary(&s) == Some("node2"),
        "after the leave returned: {s}"
    );
    ensure!(runs_vm(vc, 1)?, "vm1 not running on node2");
    ensure!(!runs_vm(vc, 0)?, "vm1 still running on node1");
    ensure!(
        state(&s, "node1") == Some("STOP") && entry(&s, "node1")["left"] == true,
        "node1 after leaving: {s}"
    );
    let acked = Console::read(&vc.console(0)?)?
        .last_counter()
        .context("no counter on node1")?;
    boots_on(vc, 1, 0, acked)?;

    // A vmhad restart on node1 keeps it out (the leave is in its state dir).
    vc.stop_vmhad(0)?;
    vc.start_vmhad(0)?;
    let s = wait_status(vc, 0, "node1 hears node2", STATE_TIMEOUT, |s| {
        writer(state(s, "node2"))
    })?;
    ensure!(entry(&s, "node1")["left"] == true, "{s}");
    // Longer than the start-up wait: still STOP, nothing mounted or running.
    std::thread::sleep(Duration::from_secs(4));
    let s = status(vc, 0)?;
    ensure!(
        state(&s, "node1") == Some("STOP"),
        "node1 after restart: {s}"
    );
    ensure!(!runs_vm(vc, 0)?, "vm1 started on node1 while out");
    let start = vc.vmctl(0, &["start"]);
    ensure!(start.is_err(), "start accepted while out: {start:?}");

    // join: node1 comes back as SECOND and catches up.
    vc.vmctl(0, &["join"])?;
    let s = wait_status(vc, 0, "node1 SECOND ready", SYNC_TIMEOUT, |s| {
        state(s, "node1") == Some("SECOND") && ready(s, "node1")
    })?;
    ensure!(entry(&s, "node1")["left"] == false, "{s}");
    ensure!(runs_vm(vc, 1)?, "vm1 moved on join");
    eprintln!(
        "[operations] node1 joined as SECOND after {:?}",
        t.elapsed()
    );
    Ok(())
}

/// With vm1 PRIM on node2: maintenance there; the guest killed behind the
/// controller's back stays down and nothing moves; `maintenance off`: the
/// controller restarts it.
fn maintenance(vc: &mut VmCluster) -> Result<()> {
    vc.vmctl(1, &["maintenance", "on"])?;
    // Shown on both nodes, loudly.
    wait_status(
        vc,
        0,
        "node1 sees node2's maintenance",
        STATE_TIMEOUT,
        |s| entry(s, "node2")["maintenance"] == true,
    )?;
    for i in [0, 1] {
        let text = vc.vmctl(i, &["status"])?;
        ensure!(text.contains("MAINTENANCE"), "status on {i}:\n{text}");
    }
    let before = more_counters(vc, 1, 2, Duration::from_secs(60))?;
    let pids = qemu_pids(vc, 1)?;
    ensure!(!pids.is_empty(), "no qemu on node2");
    for pid in &pids {
        let pid = libc::pid_t::try_from(*pid)?;
        // SAFETY: plain syscall on a PID of node2's QEMU, read just above from
        // the node's own process list.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    // Several failover timeouts and check intervals: nothing reacts.
    std::thread::sleep(Duration::from_secs(10));
    let s = status(vc, 0)?;
    ensure!(
        state(&s, "node2") == Some("PRIM") && state(&s, "node1") == Some("SECOND"),
        "something moved in maintenance: {s}"
    );
    ensure!(!runs_vm(vc, 1)?, "vm1 restarted on node2 in maintenance");
    ensure!(!runs_vm(vc, 0)?, "vm1 failed over to node1 in maintenance");
    let log = vc.vmctl(1, &["log"])?;
    ensure!(
        log.contains("maintenance: the VM is down; not restarting it"),
        "{log}"
    );

    // Off: the checker's next report restarts it on node2.
    let acked = Console::read(&vc.console(1)?)?
        .last_counter()
        .context("no counter on node2")?;
    vc.vmctl(1, &["maintenance", "off"])?;
    let c = boots_on(vc, 1, before.boots.len(), acked)?;
    eprintln!(
        "[operations] maintenance off: vm1 restarted on node2 from {}",
        c.boots[before.boots.len()]
    );
    ensure!(!runs_vm(vc, 0)?, "vm1 also on node1");
    let s = status(vc, 1)?;
    ensure!(entry(&s, "node2")["maintenance"] == false, "{s}");
    Ok(())
}

#[test]
fn leave_at_shutdown_then_maintenance() {
    let _one = vmha_test_infra::node::one_cluster_at_a_time();
    let run = || -> Result<()> {
        let mut vc = running_pair(&Timing::default())?;
        shutdown_leave(&mut vc).context("leave at shutdown")?;
        maintenance(&mut vc).context("maintenance")?;
        Ok(())
    };
    if let Err(e) = run() {
        panic!("{e:#}");
    }
}
