//! End to end (issue 10, item 3): a module added to a running pair with
//! `vmctl reload` on both nodes, while vm1's guest runs on node1. vm2 shows
//! up (STOP) on both, starts and runs on node1; vm1's QEMU is the same
//! process throughout and its event log gains not one line.
//!
//! Needs root, /dev/fuse, the packages of `.ci/install-deps` and the
//! workspace binaries (`cargo build --workspace --bins`). Guests run as
//! `type='qemu'` (TCG).

use std::fs;
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use vmha_test_infra::cluster_vm::{host_side, Timing};
use vmha_test_infra::guest::{create_disk, domain_xml, DomainSpec};
use vmha_test_infra::scenario::{more_counters, qemu_pids, running_pair, STATE_TIMEOUT};
use vmha_test_infra::vmctl_status::wait_status;

const VM2_DIR: &str = "/var/lib/libvirt/images/vm2";
const VM2_CONSOLE: &str = "/var/log/libvirt/vm2-console.log";

/// The module `name`'s entry for `node`.
fn module_state<'a>(s: &'a Value, name: &str, node: &str) -> Option<&'a str> {
    s["modules"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == name)?["nodes"][node]["state"]
        .as_str()
}

fn add_module_while_vm1_runs() -> Result<()> {
    let vc = running_pair(&Timing::default())?;
    let vm1_qemu = qemu_pids(&vc, 0)?;
    ensure!(vm1_qemu.len() == 1, "node1 runs {vm1_qemu:?}");
    let vm1_log = [vc.vmctl(0, &["log", "vm1"])?, vc.vmctl(1, &["log", "vm1"])?];

    // vm2: its own disk and XML in node1's replicated directory, an empty
    // directory on node2, and a section in the (shared) configuration file.
    for i in 0..2 {
        fs::create_dir_all(host_side(vc.node(i), VM2_DIR)?)?;
    }
    let dir1 = host_side(vc.node(0), VM2_DIR)?;
    let disk = Path::new(VM2_DIR).join("vm2.qcow2");
    create_disk(&dir1.join("vm2.qcow2"), 64)?;
    fs::write(
        dir1.join("vm2.xml"),
        domain_xml(vc.image(), &DomainSpec::new("vm2", &disk, VM2_CONSOLE)),
    )?;
    let mut text = fs::read_to_string(vc.config())?;
    text.push_str(&format!(
        "\n[[module]]\nname = \"vm2\"\nreplicated = [\"{VM2_DIR}\"]\nport = 7103\nreplication_network = 1\nlock_timeout_ms = 3000\nstop_timeout_s = 30\n"
    ));
    fs::write(vc.config(), text)?;

    for i in 0..2 {
        let out = vc.vmctl(i, &["reload"]).context("vmctl reload")?;
        ensure!(out.contains("vm2: added"), "reload on node{}: {out}", i + 1);
    }
    for i in 0..2 {
        let name = format!("node{}", i + 1);
        wait_status(
            &vc,
            i,
            "vm2 listed, configurations equal",
            STATE_TIMEOUT,
            |s| {
                module_state(s, "vm2", &name) == Some("STOP")
                    && s["config_differences"]
                        .as_array()
                        .is_some_and(Vec::is_empty)
            },
        )?;
    }

    // vm2 starts like any module: WAIT on both, then `prim` on node1.
    vc.vmctl(0, &["start", "vm2"])?;
    vc.vmctl(1, &["start", "vm2"])?;
    vc.vmctl(0, &["prim", "vm2", "--yes"])?;
    wait_status(&vc, 0, "vm2 PRIM on node1", STATE_TIMEOUT, |s| {
        module_state(s, "vm2", "node1") == Some("PRIM")
    })?;
    wait_status(&vc, 1, "vm2 SECOND on node2", STATE_TIMEOUT, |s| {
        module_state(s, "vm2", "node2") == Some("SECOND")
    })?;
    let running = vc.node(0).virsh(&["list", "--name"])?;
    ensure!(
        running.lines().any(|l| l.trim() == "vm2"),
        "libvirt on node1 runs: {running}"
    );

    // vm1 untouched: the same QEMU, still counting, not one event.
    let now = qemu_pids(&vc, 0)?;
    ensure!(
        vm1_qemu.iter().all(|p| now.contains(p)),
        "vm1's qemu {vm1_qemu:?} gone: {now:?}"
    );
    more_counters(&vc, 0, 3, Duration::from_secs(60))?;
    let after = [vc.vmctl(0, &["log", "vm1"])?, vc.vmctl(1, &["log", "vm1"])?];
    ensure!(after == vm1_log, "vm1's event log changed: {after:?}");
    let s = wait_status(&vc, 0, "vm1 still PRIM", STATE_TIMEOUT, |s| {
        module_state(s, "vm1", "node1") == Some("PRIM")
    })?;
    ensure!(module_state(&s, "vm1", "node2") == Some("SECOND"), "{s}");
    Ok(())
}

#[test]
fn reload_adds_a_module_while_vm1_runs_untouched() {
    let _one = vmha_test_infra::node::one_cluster_at_a_time();
    if let Err(e) = add_module_while_vm1_runs() {
        panic!("{e:#}");
    }
}
