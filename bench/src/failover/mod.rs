//! `vmha-bench failover`: failover time after a node crash, and false
//! failovers while fio saturates the replication link (issue 3).
//!
//! Both parts run the end-to-end setup of the failover tests
//! (`vmha_test_infra::cluster_vm`: two simulated nodes, `vmhad` on both, the
//! counter guest as module `vm1`, its disk replicated by `vmha-fs`) with
//! vmhad's default timeouts ([`default_timing`]), not the tests' shorter ones;
//! `--heartbeat-interval-ms` / `--failover-timeout-ms` measure others (500 /
//! 3000, DESIGN.md's example, for a before/after comparison).

mod crash;
mod linkload;
mod report;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use vmha_test_infra::cluster_vm::{Timing, VmCluster};
use vmha_test_infra::guest::wait_console;
use vmha_test_infra::vmctl_status::{diag, primary, ready, state, wait_status};

pub use report::Results;

const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const STATE_TIMEOUT: Duration = Duration::from_secs(90);
/// The initial full copy of the guest's disk to node2.
const SYNC_TIMEOUT: Duration = Duration::from_secs(180);

/// What to run.
#[derive(Debug, Clone)]
pub struct Opts {
    pub out: PathBuf,
    /// Crash runs (0 = skip the failover-time part).
    pub runs: usize,
    /// fio seconds per link-load scenario (0 = skip the false-failover part).
    pub fio_seconds: u64,
    /// tbf rate on the dedicated link (tc syntax, e.g. "100mbit").
    pub rate: String,
    /// tbf burst (tc syntax).
    pub burst: String,
    /// tbf latency (tc syntax).
    pub latency: String,
    /// Also run the scenario with the production link down.
    pub production_down: bool,
    /// Busy-loop processes of the `cpu-loaded` scenario (0 = skip it).
    pub cpu_hogs: usize,
    /// The cluster's heartbeat interval and failover timeout.
    pub heartbeat_interval_ms: u64,
    pub failover_timeout_ms: u64,
}

/// DESIGN.md's configuration example ([cluster] and [[module]] defaults).
pub fn design_timing() -> Timing {
    Timing {
        heartbeat_interval_ms: 500,
        failover_timeout_ms: 3000,
        start_wait_ms: 10_000,
        lock_timeout_ms: 5000,
        stop_timeout_s: 60,
        maxloop: 3,
    }
}

/// vmhad's defaults (`[cluster]` 200 / 1500 ms since issue 11, the rest as in
/// DESIGN.md's configuration example).
pub fn default_timing(heartbeat_interval_ms: u64, failover_timeout_ms: u64) -> Timing {
    Timing {
        heartbeat_interval_ms,
        failover_timeout_ms,
        ..design_timing()
    }
}

/// Both daemons, `vmctl prim --yes` on node1: vm1 PRIM on node1 with the
/// guest counting, node2 SECOND ready after the initial copy.
fn running_pair(timing: &Timing) -> Result<VmCluster> {
    let t = Instant::now();
    let mut vc = VmCluster::new(timing)?;
    vc.start_vmhad(0)?;
    vc.start_vmhad(1)?;
    vc.vmctl(0, &["prim", "--yes"])?;
    wait_status(&vc, 0, "node1 PRIM", STATE_TIMEOUT, |s| {
        state(s, "node1") == Some("PRIM") && primary(s) == Some("node1")
    })?;
    let console1 = vc.console(0)?;
    diag(
        &vc,
        wait_console(&console1, BOOT_TIMEOUT, "counters on node1", |c| {
            c.counters.len() >= 3
        }),
    )?;
    let s = wait_status(&vc, 1, "node2 SECOND ready", SYNC_TIMEOUT, |s| {
        state(s, "node2") == Some("SECOND") && ready(s, "node2")
    })?;
    ensure!(
        state(&s, "node1") == Some("PRIM"),
        "node2 sees node1 as {:?}",
        state(&s, "node1")
    );
    // node1 learns node2's readiness from its next heartbeat.
    wait_status(
        &vc,
        0,
        "node1 sees node2 SECOND ready",
        STATE_TIMEOUT,
        |s| state(s, "node2") == Some("SECOND") && ready(s, "node2"),
    )?;
    eprintln!(
        "[failover] vm1 PRIM on node1, node2 SECOND ready ({:.1} s)",
        t.elapsed().as_secs_f64()
    );
    Ok(vc)
}

/// `/proc/loadavg`'s first three fields.
pub(crate) use crate::sysinfo::loadavg;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs the selected parts, writes the JSON, returns the results.
pub fn run(opts: &Opts) -> Result<Results> {
    crate::interrupt::install()?;
    let timing = default_timing(opts.heartbeat_interval_ms, opts.failover_timeout_ms);
    let mut results = Results::new(&timing);
    if opts.fio_seconds > 0 {
        // The false-failover part first: the crash runs are the long part and
        // a saturated-link problem should show early.
        results.load = linkload::run(opts, &timing)?;
        results.write(&opts.out)?;
    }
    if opts.runs > 0 {
        results.crash = Some(crash::run(opts.runs, &timing)?);
    }
    results.finish();
    results.write(&opts.out).context("writing the results")?;
    Ok(results)
}
