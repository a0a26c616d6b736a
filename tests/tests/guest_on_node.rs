//! The test infrastructure itself: simulated nodes (network + mount + PID
//! namespaces with their own libvirtd) and the tiny counter guest.
//!
//! Needs root, the packages of `.ci/install-deps`, and /dev/kvm is not used
//! (guests run as `type='qemu'`, TCG).

use std::fs;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use vmha_test_infra::guest::{
    build_guest, create_disk, domain_xml, read_disk_counter, wait_console, Console, DomainSpec,
};
use vmha_test_infra::node::{process_state, Cluster, Network};

const LIBVIRT_TIMEOUT: Duration = Duration::from_secs(30);
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

fn wait_shut_off(node: &vmha_test_infra::node::Node, dom: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let state = node.virsh(&["domstate", dom])?;
        if state.trim() == "shut off" {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{dom} still '{}' after {timeout:?}", state.trim());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn guest_lifecycle() -> Result<()> {
    let t = Instant::now();
    let image = build_guest()?;
    eprintln!(
        "guest build (cached if warm): {:?} kernel {}",
        t.elapsed(),
        image.kernel_version
    );

    let mut cluster = Cluster::new(1)?;
    let t = Instant::now();
    cluster.start_libvirt(LIBVIRT_TIMEOUT)?;
    eprintln!("libvirt up in {:?}", t.elapsed());
    let vmdir = cluster.dir().join("vm1");
    fs::create_dir_all(&vmdir)?;
    let disk = vmdir.join("vm1.qcow2");
    let console = vmdir.join("console.log");
    create_disk(&disk, 64)?;
    let xml_path = vmdir.join("vm1.xml");
    fs::write(
        &xml_path,
        domain_xml(&image, &DomainSpec::new("vm1", &disk, &console)),
    )?;
    let node = cluster.node(0);
    node.virsh(&["define", &xml_path.to_string_lossy()])?;

    // First boot: counters start at 1 and increase.
    let t = Instant::now();
    node.virsh(&["start", "vm1"])?;
    wait_console(&console, BOOT_TIMEOUT, "the first COUNTER", |c| {
        !c.counters.is_empty()
    })?;
    eprintln!("boot to first counter: {:?}", t.elapsed());
    let c = wait_console(&console, Duration::from_secs(60), "10 counters", |c| {
        c.counters.len() >= 10
    })?;
    ensure!(
        c.boots == vec![0],
        "first boot read {:?} from a fresh disk",
        c.boots
    );
    ensure!(c.errors.is_empty(), "guest errors: {:?}", c.errors);
    ensure!(c.counters[0] == 1, "first counter {}", c.counters[0]);
    c.check_monotonic()?;
    let live = read_disk_counter(&disk)?.context("no counter on the disk of a running guest")?;
    ensure!(
        live >= c.counters[9],
        "disk {live} behind console {}",
        c.counters[9]
    );

    // ACPI shutdown is prompt.
    let t = Instant::now();
    node.virsh(&["shutdown", "vm1"])?;
    wait_shut_off(node, "vm1", SHUTDOWN_TIMEOUT)?;
    eprintln!("virsh shutdown to shut off: {:?}", t.elapsed());
    let c1 = Console::read(&console)?;
    ensure!(
        c1.poweroffs == 1,
        "no VMHA-POWEROFF: the ACPI button was not handled"
    );
    let last = c1.last_counter().context("no counter")?;
    let on_disk = read_disk_counter(&disk)?.context("no counter on disk")?;
    ensure!(
        on_disk == last || on_disk == last + 1,
        "disk holds {on_disk}, console acknowledged {last}"
    );

    // Second boot resumes from the disk: counters never go back.
    let t = Instant::now();
    node.virsh(&["start", "vm1"])?;
    let c2 = wait_console(&console, BOOT_TIMEOUT, "counters after restart", |c| {
        c.boots.len() == 2 && c.counters.len() >= c1.counters.len() + 5
    })?;
    eprintln!("second boot to 5 counters: {:?}", t.elapsed());
    ensure!(
        c2.boots[1] == on_disk,
        "boot read {} but disk had {on_disk}",
        c2.boots[1]
    );
    let resumed = c2.first_after_boot(1);
    ensure!(resumed == Some(on_disk + 1), "resumed at {resumed:?}");
    c2.check_monotonic()?;

    // Node crash while the guest writes: every process SIGKILLed (qemu too),
    // nothing acknowledged is lost, and the node's libvirtd can start again.
    let killed = cluster.node_mut(0).kill_all()?;
    let c3 = Console::read(&console)?;
    let acked = c3.last_counter().context("no counter")?;
    let on_disk = read_disk_counter(&disk)?.context("no counter on disk")?;
    eprintln!("crash: {killed} processes killed, console {acked}, disk {on_disk}");
    ensure!(
        on_disk >= acked,
        "disk {on_disk} lost acknowledged counter {acked}"
    );
    ensure!(
        cluster.node(0).pids()?.is_empty(),
        "node1 processes survive"
    );
    cluster.node_mut(0).start_libvirt(LIBVIRT_TIMEOUT)?;
    let node = cluster.node(0);
    wait_shut_off(node, "vm1", Duration::from_secs(10))?;
    node.virsh(&["start", "vm1"])?;
    let c4 = wait_console(&console, BOOT_TIMEOUT, "counters after the crash", |c| {
        c.boots.len() == 3 && c.counters.len() > c3.counters.len()
    })?;
    ensure!(
        c4.boots[2] == on_disk,
        "boot read {} but disk had {on_disk}",
        c4.boots[2]
    );
    c4.check_monotonic()?;

    node.virsh(&["destroy", "vm1"])?;
    node.virsh(&["undefine", "vm1"])?;
    Ok(())
}

#[test]
fn guest_counts_shuts_down_and_resumes_from_disk() {
    let _one = vmha_test_infra::node::one_cluster_at_a_time();
    if let Err(e) = guest_lifecycle() {
        panic!("{e:#}");
    }
}

fn two_nodes() -> Result<()> {
    let image = build_guest()?;
    let mut cluster = Cluster::new(2)?;
    cluster.start_libvirt(LIBVIRT_TIMEOUT)?;

    // The same domain name on both nodes at once (separate libvirtds).
    for node in cluster.nodes() {
        let dir = cluster.dir().join(format!("vm1-{}", node.name()));
        fs::create_dir_all(&dir)?;
        let disk = dir.join("vm1.qcow2");
        create_disk(&disk, 16)?;
        let xml = dir.join("vm1.xml");
        fs::write(
            &xml,
            domain_xml(&image, &DomainSpec::new("vm1", &disk, dir.join("c.log"))),
        )?;
        node.virsh(&["define", &xml.to_string_lossy()])?;
    }
    for node in cluster.nodes() {
        let list = node.virsh(&["list", "--all", "--name"])?;
        ensure!(
            list.lines().any(|l| l.trim() == "vm1"),
            "{}: {list}",
            node.name()
        );
        let info = node.virsh(&["domblklist", "vm1"])?;
        ensure!(
            info.contains(&format!("vm1-{}", node.name())),
            "{}: {info}",
            node.name()
        );
    }

    // Each node's /run is its own: the host reaches it through the holder.
    for node in cluster.nodes() {
        let pidfile = node.host_path("/run/libvirtd.pid");
        let pid = fs::read_to_string(&pidfile)
            .with_context(|| format!("reading {}", pidfile.display()))?;
        ensure!(
            !pid.trim().is_empty(),
            "{}: empty libvirtd.pid",
            node.name()
        );
        ensure!(
            node.dir().join("run/libvirt/libvirt-sock").exists(),
            "{}: libvirt socket not in the node's run directory",
            node.name()
        );
    }

    // Both networks work, each independently of the other.
    let (a, b) = (cluster.node(0), cluster.node(1));
    for net in Network::ALL {
        ensure!(
            a.ping(b.address(net))?,
            "node1 cannot ping node2 on {net:?}"
        );
        ensure!(
            b.ping(a.address(net))?,
            "node2 cannot ping node1 on {net:?}"
        );
    }
    for (cut, other) in [
        (Network::Production, Network::Dedicated),
        (Network::Dedicated, Network::Production),
    ] {
        a.set_link(cut, false)?;
        ensure!(!a.ping(b.address(cut))?, "{cut:?} still up after the cut");
        ensure!(
            !b.ping(a.address(cut))?,
            "{cut:?} still up after the cut (reverse)"
        );
        ensure!(
            a.ping(b.address(other))?,
            "{other:?} broken by cutting {cut:?}"
        );
        a.set_link(cut, true)?;
        // A veth needs a moment before it carries traffic again.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !a.ping(b.address(cut))? {
            ensure!(Instant::now() < deadline, "{cut:?} not back after link up");
        }
    }

    // Freeze and thaw node1: every process stopped, then running again.
    let frozen = cluster.node(0).freeze()?;
    ensure!(!frozen.is_empty(), "nothing to freeze on node1");
    for p in &frozen {
        let st = process_state(*p);
        ensure!(
            st.is_none() || st == Some('T'),
            "pid {p} in state {st:?} after freeze"
        );
    }
    cluster.node(0).thaw()?;
    cluster.node(0).virsh(&["list", "--all"])?;

    // Crash node1: nothing of it is left, node2 unaffected, node1 can restart.
    let killed = cluster.node_mut(0).kill_all()?;
    ensure!(killed >= 2, "killed only {killed} processes");
    ensure!(
        cluster.node(0).pids()?.is_empty(),
        "node1 processes survive"
    );
    ensure!(
        cluster.node(0).virsh(&["list"]).is_err(),
        "node1 libvirtd still answers"
    );
    cluster.node(1).virsh(&["dominfo", "vm1"])?;
    cluster.node_mut(0).start_libvirt(LIBVIRT_TIMEOUT)?;
    let list = cluster.node(0).virsh(&["list", "--all", "--name"])?;
    ensure!(
        list.lines().any(|l| l.trim() == "vm1"),
        "vm1 gone after restart: {list}"
    );
    Ok(())
}

#[test]
fn two_nodes_same_domain_name_and_independent_networks() {
    let _one = vmha_test_infra::node::one_cluster_at_a_time();
    if let Err(e) = two_nodes() {
        panic!("{e:#}");
    }
}
