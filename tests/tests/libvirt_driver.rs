//! End to end: vmhad's libvirt driver (the `virt` crate) on two simulated
//! nodes (the setup of `failover.rs`). The domain XML kept in the replicated
//! directory follows a redefinition on the PRIM (`virsh define`) and reaches
//! the peer; a swap then starts the redefined domain there, replacing a stale
//! definition with another UUID. A restarted libvirtd does not wedge vmhad.
//!
//! Needs root, /dev/fuse, the packages of `.ci/install-deps` and the
//! workspace binaries (`cargo build --workspace --bins`).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use vmha_test_infra::cluster_vm::{Timing, VmCluster, MODULE, REPLICATED};
use vmha_test_infra::guest::{wait_console, Console};
use vmha_test_infra::scenario::{running_pair, BOOT_TIMEOUT, STATE_TIMEOUT};
use vmha_test_infra::vmctl_status::{diag, primary, state, wait_status};

/// How soon a redefinition on the PRIM must be in the replicated XML.
const XML_TIMEOUT: Duration = Duration::from_secs(10);

/// `xml` with `<description>text</description>` after the domain's name
/// (replacing any description).
fn with_description(xml: &str, text: &str) -> Result<String> {
    let mut xml = xml.to_string();
    if let (Some(a), Some(b)) = (xml.find("<description>"), xml.find("</description>")) {
        xml.replace_range(a..b + "</description>".len(), "");
    }
    let end = xml.find("</name>").context("no <name> in the XML")? + "</name>".len();
    xml.insert_str(end, &format!("\n  <description>{text}</description>"));
    Ok(xml)
}

/// Waits until `read()` holds `marker`; returns how long it took.
fn wait_contains(
    what: &str,
    marker: &str,
    timeout: Duration,
    read: impl Fn() -> Result<String>,
) -> Result<Duration> {
    let t = Instant::now();
    loop {
        let text = read();
        if let Ok(text) = &text {
            if text.contains(marker) {
                return Ok(t.elapsed());
            }
        }
        if t.elapsed() >= timeout {
            bail!("{what} does not contain {marker:?} after {timeout:?}: {text:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn uuid_of(vc: &VmCluster, i: usize) -> Result<String> {
    Ok(vc.node(i).virsh(&["domuuid", MODULE])?.trim().to_string())
}

fn redefine_then_swap() -> Result<()> {
    let vc = running_pair(&Timing::default())?;
    let file = format!("{REPLICATED}/{MODULE}.xml");
    let uuid1 = uuid_of(&vc, 0)?;
    let current = vc.node(0).virsh(&["dumpxml", "--inactive", MODULE])?;

    // A stale definition of vm1 on node2 with another UUID (an operator
    // re-created it there once): the swap must replace it, not start it.
    let other = "0badc0de-0000-4000-8000-000000000001";
    ensure!(uuid1 != other, "node1's vm1 has the test's UUID");
    let stale = with_description(&current.replace(&uuid1, other), "stale")?;
    let stale_path = vc.cluster().dir().join("vm1-stale.xml");
    std::fs::write(&stale_path, &stale)?;
    vc.node(1)
        .virsh(&["define", &stale_path.to_string_lossy()])?;
    ensure!(
        uuid_of(&vc, 1)? == other,
        "node2's stale vm1 has UUID {}",
        uuid_of(&vc, 1)?
    );

    // The operator redefines vm1 on the PRIM.
    let marker = "vmha-redefined-on-node1";
    let edited = with_description(&current, marker)?;
    let edited_path = vc.cluster().dir().join("vm1-edited.xml");
    std::fs::write(&edited_path, &edited)?;
    let t = Instant::now();
    vc.node(0)
        .virsh(&["define", &edited_path.to_string_lossy()])?;
    ensure!(
        uuid_of(&vc, 0)? == uuid1,
        "the redefinition changed the UUID"
    );
    let on_prim = wait_contains("node1's replicated vm1.xml", marker, XML_TIMEOUT, || {
        vc.node(0).run("cat", &[&file])
    });
    let on_prim = diag(&vc, on_prim)?;
    let backing2 = vc.backing(1)?.join(format!("{MODULE}.xml"));
    let on_peer = wait_contains("node2's copy of vm1.xml", marker, XML_TIMEOUT, || {
        Ok(std::fs::read_to_string(&backing2)?)
    });
    let on_peer = diag(&vc, on_peer)?;
    eprintln!(
        "[libvirt_driver] redefinition in node1's vm1.xml after {on_prim:?}, \
         in node2's copy after {on_peer:?} (since virsh define: {:?})",
        t.elapsed()
    );
    // The file is libvirt's definition: it names the domain's UUID, and it
    // is the same file on both nodes.
    let text1 = vc.node(0).run("cat", &[&file])?;
    ensure!(
        text1.contains(&format!("<uuid>{uuid1}</uuid>")),
        "vm1.xml on node1 does not name UUID {uuid1}:\n{text1}"
    );
    let text2 = std::fs::read_to_string(&backing2)?;
    ensure!(text1 == text2, "vm1.xml differs between the nodes");
    // Written once, not on every check.
    let mtime =
        |p: &Path| -> Result<std::time::SystemTime> { Ok(std::fs::metadata(p)?.modified()?) };
    let before = mtime(&backing2)?;
    std::thread::sleep(Duration::from_secs(2));
    ensure!(
        mtime(&backing2)? == before,
        "vm1.xml is rewritten although the definition did not change"
    );

    // Swap: node2 defines vm1 from the replicated XML and runs it.
    let c2 = Console::read(&vc.console(1)?)?;
    let t = Instant::now();
    let out = vc.vmctl(0, &["swap"])?;
    eprintln!("[libvirt_driver] vmctl swap on node1: {}", out.trim());
    wait_status(&vc, 1, "node2 PRIM", STATE_TIMEOUT, |s| {
        state(s, "node2") == Some("PRIM") && primary(s) == Some("node2")
    })?;
    diag(
        &vc,
        wait_console(&vc.console(1)?, BOOT_TIMEOUT, "counters on node2", |c| {
            c.boots.len() > c2.boots.len() && c.counters.len() > c2.counters.len()
        }),
    )?;
    eprintln!(
        "[libvirt_driver] guest counting on node2 {:?} after the swap",
        t.elapsed()
    );
    let domstate = vc.node(1).virsh(&["domstate", MODULE])?;
    ensure!(
        domstate.trim() == "running",
        "vm1 on node2: {}",
        domstate.trim()
    );
    let xml2 = vc.node(1).virsh(&["dumpxml", MODULE])?;
    ensure!(
        xml2.contains(marker),
        "node2 runs vm1 without the redefinition:\n{xml2}"
    );
    ensure!(
        uuid_of(&vc, 1)? == uuid1,
        "node2's vm1 has UUID {} instead of node1's {uuid1}: the stale definition stayed",
        uuid_of(&vc, 1)?
    );
    let info = vc.node(1).virsh(&["dominfo", MODULE])?;
    ensure!(
        info.lines()
            .any(|l| l.starts_with("Autostart:") && l.contains("disable")),
        "autostart on node2:\n{info}"
    );
    let list = vc.node(0).virsh(&["list", "--name"])?;
    ensure!(
        !list.lines().any(|l| l.trim() == MODULE),
        "vm1 still running on node1"
    );
    Ok(())
}

#[test]
fn redefinition_on_prim_reaches_the_peer_and_the_swap_runs_it() {
    let _one = vmha_test_infra::node::one_cluster_at_a_time();
    if let Err(e) = redefine_then_swap() {
        panic!("{e:#}");
    }
}

/// Waits until node `i`'s guest booted more than `boots` times and counts.
fn booted_again(vc: &VmCluster, i: usize, boots: usize) -> Result<Console> {
    diag(
        vc,
        wait_console(
            &vc.console(i)?,
            BOOT_TIMEOUT,
            &format!("a new boot on {}", vc.node(i).name()),
            |c| {
                c.boots.len() > boots
                    && c.counters
                        .last()
                        .zip(c.boots.last())
                        .is_some_and(|(n, b)| n > b)
            },
        ),
    )
}

fn libvirtd_restart() -> Result<()> {
    let mut vc = running_pair(&Timing::default())?;
    let t = Instant::now();
    vc.restart_libvirtd(0)?;
    eprintln!(
        "[libvirt_driver] libvirtd on node1 restarted in {:?}",
        t.elapsed()
    );
    // The guest survived the restart and goes on counting.
    let domstate = vc.node(0).virsh(&["domstate", MODULE])?;
    ensure!(
        domstate.trim() == "running",
        "vm1 on node1: {}",
        domstate.trim()
    );
    let before = Console::read(&vc.console(0)?)?;
    diag(
        &vc,
        wait_console(&vc.console(0)?, Duration::from_secs(30), "counters", |c| {
            c.counters.len() >= before.counters.len() + 3
        }),
    )?;
    // vmhad still watches the domain through libvirt: killed behind its back,
    // it is restarted on node1.
    let boots = Console::read(&vc.console(0)?)?.boots.len();
    let t = Instant::now();
    vc.node(0).virsh(&["destroy", MODULE])?;
    booted_again(&vc, 0, boots)?;
    eprintln!(
        "[libvirt_driver] guest destroyed after the libvirtd restart: counting again on node1 after {:?}",
        t.elapsed()
    );
    let s = wait_status(&vc, 0, "node1 PRIM", STATE_TIMEOUT, |s| {
        state(s, "node1") == Some("PRIM")
    })?;
    ensure!(primary(&s) == Some("node1"), "primary {:?}", primary(&s));
    Ok(())
}

#[test]
fn libvirtd_restart_on_the_prim_does_not_wedge_vmhad() {
    let _one = vmha_test_infra::node::one_cluster_at_a_time();
    if let Err(e) = libvirtd_restart() {
        panic!("{e:#}");
    }
}
