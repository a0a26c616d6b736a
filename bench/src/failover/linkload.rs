//! False failovers under load: the dedicated (replication) link shaped with
//! `tc tbf` on both ends and saturated by fio writing through node1's
//! replicated mount, while both nodes' `vmctl status` is polled.
//!
//! Scenarios, on one cluster in this order:
//! - `replication-saturated`: production link idle. Heartbeats still arrive
//!   over production, so this checks that the load itself (CPU, the FUSE and
//!   replication path, the guest's writes queued behind fio's) does not make
//!   a node lose its peer or the SECOND fall behind.
//! - `production-down`: the same with node1's production link down, so the
//!   heartbeats only travel over the saturated dedicated link, in the same
//!   queue as the replication traffic: the real stress test of detection.
//! - `cpu-loaded`: `production-down` with every core busy as well (`--cpu-hogs`
//!   busy-loop processes on the host, nice 0, like the guests' and
//!   vmha-fs's threads): heartbeats must not starve behind busy threads.
//!
//! Shaping production as well is not a separate case: with production down
//! its heartbeats are lost entirely, which is harsher than any shaping.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::Value;
use vmha_test_infra::cluster_vm::{Timing, VmCluster, REPLICATED};
use vmha_test_infra::guest::Console;
use vmha_test_infra::node::{run as run_cmd, Network, Node};
use vmha_test_infra::vmctl_status::{entry, primary, ready, state, status};

use super::{loadavg, ms, running_pair, Opts};

/// Status poll period during the load.
const POLL: Duration = Duration::from_millis(250);
/// Healthy polling before the load starts.
const BASELINE: Duration = Duration::from_secs(3);
/// Polling after fio ended: a failover triggered late still counts.
const TAIL: Duration = Duration::from_secs(5);
/// A guest pause worth listing (the counter normally advances every ~0.2 s).
const LONG_STALL: Duration = Duration::from_secs(1);
/// The fio file, written in full first.
const FIO_SIZE: &str = "256M";
/// fio's own start-up and JSON output, on top of its runtime.
const FIO_SLACK: Duration = Duration::from_secs(60);

/// One load scenario.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadRun {
    pub scenario: String,
    /// tbf on `ded0` of both nodes.
    pub tbf: String,
    /// The tbf rate as tc reports it, in Mbit/s.
    pub rate_mbit_s: Option<f64>,
    /// Busy-loop processes running during the scenario.
    pub cpu_hogs: usize,
    pub fio_job: String,
    pub fio_seconds: u64,
    pub fio_mib_s: Option<f64>,
    /// fio's throughput over the tbf rate (payload only, so a little under 1
    /// when the link is the bottleneck).
    pub fio_over_rate: Option<f64>,
    /// node1's `ded0` transmit rate during fio, in Mbit/s (all bytes: data,
    /// headers, heartbeats).
    pub link_tx_mbit_s: Option<f64>,
    /// Packets tbf on node1's `ded0` dropped / delayed (overlimits) during the run.
    pub tbf_drops: Option<u64>,
    pub tbf_overlimits: Option<u64>,
    /// Largest backlog of that tbf seen at the status polls, in bytes: what a
    /// heartbeat from node1 queues behind.
    pub tbf_max_backlog_bytes: Option<u64>,
    /// Status samples taken on each node.
    pub samples: usize,
    /// Healthy → unhealthy transitions seen on either node: any ALONE, the
    /// SECOND not ready or not SECOND, the peer unreachable, another primary.
    pub false_failovers: usize,
    /// Samples where some node was ALONE.
    pub alone_samples: usize,
    /// Every distinct problem seen, with its sample count.
    pub problems: Vec<(String, usize)>,
    /// `vmctl status` calls that failed (no answer is not a state change).
    pub status_errors: usize,
    /// Largest `last_seen_ms` of the peer seen by node2 (of node1) and by node1.
    pub max_last_seen_ms_node2: Option<u64>,
    pub max_last_seen_ms_node1: Option<u64>,
    /// Largest age of heartbeats on the dedicated link alone, node2's view.
    pub max_dedicated_hb_age_ms_node2: Option<u64>,
    /// The same on the production link (≈ the scenario's length when it is
    /// down, `null` if never heard: shows which links carried heartbeats).
    pub max_production_hb_age_ms_node2: Option<u64>,
    /// Counters the guest wrote on node1 during fio, and its longest pause
    /// without a new counter (its write latency behind fio's queue, at poll
    /// resolution).
    pub guest_counters: u64,
    pub guest_max_stall_ms: f64,
    /// Pauses of the guest's counter longer than [`LONG_STALL`]: (seconds
    /// after fio's start when the pause began, its length in ms).
    pub guest_long_stalls: Vec<(f64, f64)>,
    pub loadavg_start: String,
    pub loadavg_end: String,
    pub error: Option<String>,
}

pub fn run(opts: &Opts, timing: &Timing) -> Result<Vec<LoadRun>> {
    let mut scenarios = vec!["replication-saturated"];
    if opts.production_down {
        scenarios.push("production-down");
    }
    if opts.cpu_hogs > 0 {
        scenarios.push("cpu-loaded");
    }
    let mut out = Vec::new();
    let vc = match running_pair(timing) {
        Ok(vc) => vc,
        Err(e) => {
            return Ok(scenarios
                .iter()
                .map(|s| LoadRun {
                    scenario: (*s).to_string(),
                    error: Some(format!("setup: {e:#}")),
                    ..LoadRun::default()
                })
                .collect())
        }
    };
    let tbf = format!(
        "rate {} burst {} latency {}",
        opts.rate, opts.burst, opts.latency
    );
    for n in 0..2 {
        shape(vc.node(n), &tbf)?;
    }
    for s in scenarios {
        crate::interrupt::check()?;
        let mut r = LoadRun {
            scenario: s.to_string(),
            tbf: tbf.clone(),
            fio_seconds: opts.fio_seconds,
            ..LoadRun::default()
        };
        eprintln!("[failover] load scenario {s} (load {})", loadavg());
        if let Err(e) = scenario(&vc, opts, &mut r) {
            eprintln!("[failover] load scenario {s} failed: {e:#}");
            r.error = Some(format!("{e:#}"));
        }
        eprintln!(
            "[failover] {s}: fio {:?} MiB/s, link {:?} Mbit/s, false failovers {}, problems {:?}, max last_seen node2 {:?} ms",
            r.fio_mib_s, r.link_tx_mbit_s, r.false_failovers, r.problems, r.max_last_seen_ms_node2
        );
        let unhealthy = r.error.is_some() || r.false_failovers > 0;
        out.push(r);
        if unhealthy {
            break; // the next scenario would start from a broken state
        }
    }
    Ok(out)
}

/// `tc qdisc replace dev ded0 root tbf …` in the node's network namespace.
fn shape(node: &Node, tbf: &str) -> Result<()> {
    let mut cmd = Command::new("tc");
    cmd.args(["-n", node.netns(), "qdisc", "replace", "dev"])
        .arg(Network::Dedicated.ifname())
        .args(["root", "tbf"])
        .args(tbf.split_whitespace());
    run_cmd(&mut cmd).context("shaping the dedicated link (tc tbf)")?;
    Ok(())
}

/// Counters of the tbf on a node's `ded0`.
#[derive(Debug, Clone, Copy)]
struct Tbf {
    /// Bytes per second.
    rate: Option<u64>,
    drops: u64,
    overlimits: u64,
    /// Bytes queued now.
    backlog: u64,
}

fn tbf_stats(node: &Node) -> Result<Tbf> {
    let out = run_cmd(Command::new("tc").args([
        "-s",
        "-j",
        "-n",
        node.netns(),
        "qdisc",
        "show",
        "dev",
        Network::Dedicated.ifname(),
    ]))?;
    let v: Value = serde_json::from_slice(&out.stdout).context("tc -j output")?;
    let q = v
        .as_array()
        .and_then(|a| a.iter().find(|q| q["kind"] == "tbf"))
        .context("no tbf qdisc on ded0")?;
    Ok(Tbf {
        rate: q["options"]["rate"].as_u64(),
        drops: q["drops"].as_u64().unwrap_or(0),
        overlimits: q["overlimits"].as_u64().unwrap_or(0),
        backlog: q["backlog"].as_u64().unwrap_or(0),
    })
}

fn tx_bytes(node: &Node) -> Result<u64> {
    let out = node.ip(&[
        "-s",
        "-j",
        "link",
        "show",
        "dev",
        Network::Dedicated.ifname(),
    ])?;
    let v: Value = serde_json::from_str(&out).context("ip -j output")?;
    v[0]["stats64"]["tx"]["bytes"]
        .as_u64()
        .context("no tx bytes for ded0")
}

/// Tracks the health of the pair across samples.
#[derive(Debug, Default)]
struct Health {
    healthy: bool,
    episodes: usize,
    alone: usize,
    problems: std::collections::BTreeMap<String, usize>,
}

impl Health {
    fn new() -> Self {
        Self {
            healthy: true,
            ..Self::default()
        }
    }

    fn sample(&mut self, problems: Vec<String>) {
        if problems.iter().any(|p| p.contains("ALONE")) {
            self.alone += 1;
        }
        if problems.is_empty() {
            self.healthy = true;
        } else {
            if self.healthy {
                self.episodes += 1;
                eprintln!("[failover] !!! unhealthy: {problems:?}");
            }
            self.healthy = false;
        }
        for p in problems {
            *self.problems.entry(p).or_default() += 1;
        }
    }
}

/// What is wrong in `viewer`'s status: vm1 must be PRIM on node1 and SECOND
/// ready on node2, both nodes reachable.
fn problems(viewer: &str, s: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for (node, want) in [("node1", "PRIM"), ("node2", "SECOND")] {
        let e = entry(s, node);
        if e["reachable"] != Value::Bool(true) {
            out.push(format!("{viewer}: {node} unreachable"));
            continue;
        }
        match state(s, node) {
            Some(st) if st == want => {}
            other => out.push(format!("{viewer}: {node} {}", other.unwrap_or("no state"))),
        }
    }
    if !ready(s, "node2") && entry(s, "node2")["reachable"] == Value::Bool(true) {
        out.push(format!(
            "{viewer}: node2 not ready ({})",
            entry(s, "node2")["readiness"]
        ));
    }
    if primary(s) != Some("node1") {
        out.push(format!("{viewer}: primary {:?}", primary(s)));
    }
    out
}

/// The peer's `last_seen_ms` and its heartbeat ages on its dedicated and
/// production addresses, in `s`.
fn ages(s: &Value, peer: &str, ded: &str, prod: &str) -> [Option<u64>; 3] {
    let e = entry(s, peer);
    [
        e["last_seen_ms"].as_u64(),
        e["heartbeats"][ded].as_u64(),
        e["heartbeats"][prod].as_u64(),
    ]
}

struct Poller<'a> {
    vc: &'a VmCluster,
    health: Health,
    samples: usize,
    errors: usize,
    max_seen: [Option<u64>; 2],
    max_ded_node2: Option<u64>,
    max_prod_node2: Option<u64>,
}

impl<'a> Poller<'a> {
    fn new(vc: &'a VmCluster) -> Self {
        Self {
            vc,
            health: Health::new(),
            samples: 0,
            errors: 0,
            max_seen: [None, None],
            max_ded_node2: None,
            max_prod_node2: None,
        }
    }

    fn poll(&mut self) {
        let node1_ded = Network::Dedicated.address(0).to_string();
        let node2_ded = Network::Dedicated.address(1).to_string();
        let node1_prod = Network::Production.address(0).to_string();
        let node2_prod = Network::Production.address(1).to_string();
        let mut problems_now = Vec::new();
        for (i, viewer, peer, peer_ded, peer_prod) in [
            (0usize, "node1", "node2", &node2_ded, &node2_prod),
            (1, "node2", "node1", &node1_ded, &node1_prod),
        ] {
            match status(self.vc, i) {
                Ok(s) => {
                    problems_now.extend(problems(viewer, &s));
                    let [seen, ded, prod] = ages(&s, peer, peer_ded, peer_prod);
                    self.max_seen[i] = self.max_seen[i].max(seen);
                    if i == 1 {
                        self.max_ded_node2 = self.max_ded_node2.max(ded);
                        self.max_prod_node2 = self.max_prod_node2.max(prod);
                    }
                }
                Err(e) => {
                    self.errors += 1;
                    eprintln!("[failover] vmctl status on {viewer}: {e:#}");
                }
            }
        }
        self.samples += 1;
        self.health.sample(problems_now);
    }

    /// Polls for `d` (every [`POLL`]).
    fn poll_for(&mut self, d: Duration) -> Result<()> {
        let end = Instant::now() + d;
        while Instant::now() < end {
            crate::interrupt::check()?;
            self.poll();
            std::thread::sleep(POLL);
        }
        Ok(())
    }
}

/// Writes `file` in full through the mount (not measured, not polled).
fn lay_out(node: &Node, file: &str) -> Result<()> {
    let t = Instant::now();
    node.run(
        "fio",
        &[
            "--name=layout",
            &format!("--filename={file}"),
            "--rw=write",
            "--bs=1M",
            &format!("--size={FIO_SIZE}"),
            "--direct=1",
            "--fallocate=none",
        ],
    )
    .context("laying out the fio file")?;
    eprintln!(
        "[failover] {FIO_SIZE} fio file laid out in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn parse_fio(out: &std::process::Output) -> Result<f64> {
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "fio failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            text.trim()
        );
    }
    Ok(crate::fio_json::parse(&text, true)?.mib_s)
}

fn scenario(vc: &VmCluster, opts: &Opts, r: &mut LoadRun) -> Result<()> {
    let prod_down = matches!(r.scenario.as_str(), "production-down" | "cpu-loaded");
    if prod_down {
        vc.node(0).set_link(Network::Production, false)?;
    }
    let hogs = if r.scenario == "cpu-loaded" {
        r.cpu_hogs = opts.cpu_hogs;
        Some(Hogs::start(opts.cpu_hogs)?)
    } else {
        None
    };
    let res = load(vc, opts, r);
    drop(hogs);
    if prod_down {
        vc.node(0).set_link(Network::Production, true)?;
    }
    res
}

/// Busy-loop processes, killed (by PID) and reaped on drop.
struct Hogs(Vec<std::process::Child>);

impl Hogs {
    fn start(n: usize) -> Result<Hogs> {
        let mut hogs = Hogs(Vec::with_capacity(n));
        for _ in 0..n {
            let child = Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting a busy loop")?;
            hogs.0.push(child);
        }
        Ok(hogs)
    }
}

impl Drop for Hogs {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn load(vc: &VmCluster, opts: &Opts, r: &mut LoadRun) -> Result<()> {
    let mut poller = Poller::new(vc);
    // The pair must be healthy before the load (with production down too),
    // or whatever follows says nothing about the load.
    poller.poll_for(BASELINE)?;
    if poller.health.episodes > 0 || !poller.health.healthy {
        bail!(
            "unhealthy before the load: {:?}\n{}",
            poller.health.problems,
            vc.diagnostics()
        );
    }
    let mut poller = Poller::new(vc);
    let file = format!("{REPLICATED}/fio-linkload.dat");
    let job = [
        "--name=linkload".to_string(),
        format!("--filename={file}"),
        "--rw=write".into(),
        "--bs=1M".into(),
        "--iodepth=16".into(),
        "--ioengine=libaio".into(),
        "--direct=1".into(),
        format!("--size={FIO_SIZE}"),
        "--overwrite=1".into(),
        "--fallocate=none".into(),
        "--time_based".into(),
        format!("--runtime={}", opts.fio_seconds),
        "--output-format=json".into(),
    ];
    r.fio_job = job[2..job.len() - 1].join(" ");
    // Overwrites of a laid-out file for the whole measured run: FUSE makes
    // an extending O_DIRECT write synchronous, so fio writing a new file
    // would keep one write in flight instead of 16.
    lay_out(vc.node(0), &file)?;
    let console1 = vc.console(0)?;
    let counters_before = Console::read(&console1)?.counters.len();
    let tbf0 = tbf_stats(vc.node(0))?;
    let tx0 = tx_bytes(vc.node(0))?;
    r.loadavg_start = loadavg();

    let mut cmd = vc.node(0).command("fio");
    cmd.args(&job)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().context("starting fio")?;
    let t0 = Instant::now();
    // fio writes its JSON at the end: collect it on a thread while polling.
    let waiter = std::thread::spawn(move || child.wait_with_output());
    let deadline = t0 + Duration::from_secs(opts.fio_seconds) + FIO_SLACK;
    let mut counters_seen = counters_before;
    let mut last_new = Instant::now();
    let mut max_stall = Duration::ZERO;
    let mut max_backlog = 0u64;
    while !waiter.is_finished() {
        if Instant::now() > deadline {
            // The cluster's teardown kills fio with every process of node1.
            bail!("fio still running {:?} after its start", deadline - t0);
        }
        crate::interrupt::check()?;
        poller.poll();
        // What a heartbeat queues behind on the saturated side.
        if let Ok(t) = tbf_stats(vc.node(0)) {
            max_backlog = max_backlog.max(t.backlog);
        }
        let n = Console::read(&console1)?.counters.len();
        let now = Instant::now();
        max_stall = max_stall.max(now - last_new);
        if n > counters_seen {
            if now - last_new > LONG_STALL {
                r.guest_long_stalls.push((
                    last_new.saturating_duration_since(t0).as_secs_f64(),
                    ms(now - last_new),
                ));
            }
            counters_seen = n;
            last_new = now;
        }
        std::thread::sleep(POLL);
    }
    let fio_elapsed = t0.elapsed();
    let tx1 = tx_bytes(vc.node(0))?;
    let out = waiter
        .join()
        .map_err(|_| anyhow::anyhow!("fio waiter panicked"))?
        .context("waiting for fio")?;
    r.guest_counters = u64::try_from(counters_seen - counters_before)?;
    r.guest_max_stall_ms = ms(max_stall);
    let tbf1 = tbf_stats(vc.node(0))?;
    r.tbf_drops = Some(tbf1.drops.saturating_sub(tbf0.drops));
    r.tbf_overlimits = Some(tbf1.overlimits.saturating_sub(tbf0.overlimits));
    r.rate_mbit_s = tbf1.rate.map(|b| b as f64 * 8.0 / 1e6);
    r.tbf_max_backlog_bytes = Some(max_backlog);
    r.link_tx_mbit_s = Some(tx1.saturating_sub(tx0) as f64 * 8.0 / 1e6 / fio_elapsed.as_secs_f64());
    let fio = parse_fio(&out);
    poller.poll_for(TAIL)?;
    r.loadavg_end = loadavg();
    r.samples = poller.samples;
    r.false_failovers = poller.health.episodes;
    r.alone_samples = poller.health.alone;
    r.problems = poller.health.problems.into_iter().collect();
    r.status_errors = poller.errors;
    r.max_last_seen_ms_node1 = poller.max_seen[0];
    r.max_last_seen_ms_node2 = poller.max_seen[1];
    r.max_dedicated_hb_age_ms_node2 = poller.max_ded_node2;
    r.max_production_hb_age_ms_node2 = poller.max_prod_node2;
    let mib_s = fio?;
    r.fio_mib_s = Some(mib_s);
    r.fio_over_rate = r
        .rate_mbit_s
        .map(|m| mib_s * 1024.0 * 1024.0 * 8.0 / 1e6 / m);
    // Not left for the next scenario (and not in the SECOND's copy).
    vc.node(0).run("rm", &["-f", &file])?;
    Ok(())
}
