//! `vmha-bench swap` (issue 14): the guest's downtime during a swap, live
//! (`vmctl swap --live`) against stop/start (`vmctl swap`), on two simulated
//! nodes running the counter guest (the end-to-end setup, TCG).
//!
//! Downtime is the time from the last counter the guest wrote on the source
//! to its first counter on the destination, both taken when the line shows
//! up in that node's console log (polled every 10 ms from the host). The
//! guest writes a counter every 200 ms, so a figure includes up to one
//! interval of idle waiting; swaps alternate direction in one cluster, each
//! starting once the new SECOND is ready again.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use vmha_test_infra::cluster_vm::{workspace_bin, Timing};
use vmha_test_infra::guest::Console;
use vmha_test_infra::scenario::{running_pair, STATE_TIMEOUT};
use vmha_test_infra::vmctl_status::{primary, ready, state, wait_status};

const NODES: [&str; 2] = ["node1", "node2"];
const POLL: Duration = Duration::from_millis(10);
/// A stop/start swap boots the TCG guest: generous on a loaded machine.
const SWAP_TIMEOUT: Duration = Duration::from_secs(300);

/// One swap.
#[derive(Debug, Clone, Serialize)]
pub struct SwapRun {
    pub kind: &'static str,
    pub from: &'static str,
    /// Last counter on the source to first counter on the destination.
    pub downtime_ms: f64,
    /// `vmctl swap` call to its answer.
    pub command_ms: f64,
    pub last_source_counter: u64,
    pub first_destination_counter: u64,
    /// The guest booted on the destination (always for stop/start, never live).
    pub rebooted: bool,
    pub loadavg: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct SwapResults {
    pub runs: Vec<SwapRun>,
    pub loadavg_start: String,
    pub cpus: usize,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs `runs` swaps of each kind, live first, and writes the JSON.
pub fn run(runs: usize, out: &PathBuf) -> Result<SwapResults> {
    crate::interrupt::install()?;
    let loadavg_start = crate::sysinfo::loadavg();
    let vc = running_pair(&Timing::default())?;
    let vmctl = workspace_bin("vmctl", "VMCTL_BIN")?;
    let mut results = Vec::new();
    let mut on = 0usize;
    for kind in ["live", "stop/start"] {
        for _ in 0..runs {
            crate::interrupt::check()?;
            let (from, to) = (on, 1 - on);
            // A few counters on the source first.
            let console_from = vc.console(from)?;
            let console_to = vc.console(to)?;
            let have = Console::read(&console_from)?.counters.len();
            let deadline = Instant::now() + Duration::from_secs(60);
            while Console::read(&console_from)?.counters.len() < have + 3 {
                if Instant::now() >= deadline {
                    bail!("the guest does not count on {}", NODES[from]);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let dst_before = Console::read(&console_to)?;
            let mut src_seen = Console::read(&console_from)?.counters.len();
            let mut src_last_at = Instant::now();
            let mut args = vec!["swap"];
            if kind == "live" {
                args.push("--live");
            }
            let loadavg = crate::sysinfo::loadavg();
            let t0 = Instant::now();
            let mut child = vc
                .node(from)
                .command(&vmctl)
                .arg("--config")
                .arg(vc.config())
                .args(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .context("spawn vmctl swap")?;
            let mut command_ms = None;
            let (first_dst, first_at) = loop {
                let now = Instant::now();
                let src = Console::read(&console_from)?;
                if src.counters.len() > src_seen {
                    src_seen = src.counters.len();
                    src_last_at = now;
                }
                let dst = Console::read(&console_to)?;
                if dst.counters.len() > dst_before.counters.len() {
                    break (dst.counters[dst_before.counters.len()], now);
                }
                if command_ms.is_none() {
                    if let Some(status) = child.try_wait()? {
                        command_ms = Some(ms(t0.elapsed()));
                        if !status.success() {
                            bail!("vmctl {args:?} on {} failed: {status}", NODES[from]);
                        }
                    }
                }
                if now - t0 > SWAP_TIMEOUT {
                    let _ = child.kill();
                    bail!("no counter on {} within {SWAP_TIMEOUT:?}", NODES[to]);
                }
                std::thread::sleep(POLL);
            };
            let status = child.wait()?;
            if !status.success() {
                bail!("vmctl {args:?} on {} failed: {status}", NODES[from]);
            }
            let command_ms = command_ms.unwrap_or_else(|| ms(t0.elapsed()));
            let src = Console::read(&console_from)?;
            let dst = Console::read(&console_to)?;
            let r = SwapRun {
                kind,
                from: NODES[from],
                downtime_ms: ms(first_at.saturating_duration_since(src_last_at)),
                command_ms,
                last_source_counter: src.last_counter().unwrap_or(0),
                first_destination_counter: first_dst,
                rebooted: dst.boots.len() > dst_before.boots.len(),
                loadavg,
            };
            eprintln!(
                "[swap] {kind} {} -> {}: downtime {:.0} ms (counter {} -> {}), command {:.0} ms, load {}",
                NODES[from], NODES[to], r.downtime_ms, r.last_source_counter, r.first_destination_counter, r.command_ms, r.loadavg
            );
            results.push(r);
            // The next swap starts from a ready SECOND.
            wait_status(&vc, to, "roles swapped, SECOND ready", STATE_TIMEOUT, |s| {
                state(s, NODES[to]) == Some("PRIM")
                    && primary(s) == Some(NODES[to])
                    && state(s, NODES[from]) == Some("SECOND")
                    && ready(s, NODES[from])
            })?;
            wait_status(
                &vc,
                from,
                "the PRIM sees its SECOND ready",
                STATE_TIMEOUT,
                |s| state(s, NODES[from]) == Some("SECOND") && ready(s, NODES[from]),
            )?;
            on = to;
        }
    }
    let results = SwapResults {
        runs: results,
        loadavg_start,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    std::fs::write(out, serde_json::to_vec_pretty(&results)?)
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(results)
}

impl SwapResults {
    /// Per kind: every downtime, median, min, max.
    pub fn markdown(&self) -> String {
        let mut s = String::from("| swap | runs | downtime median | min | max | all (ms) | guest rebooted |\n|---|---|---|---|---|---|---|\n");
        for kind in ["live", "stop/start"] {
            let mut d: Vec<f64> = self
                .runs
                .iter()
                .filter(|r| r.kind == kind)
                .map(|r| r.downtime_ms)
                .collect();
            if d.is_empty() {
                continue;
            }
            let all = d
                .iter()
                .map(|x| format!("{x:.0}"))
                .collect::<Vec<_>>()
                .join(", ");
            d.sort_by(f64::total_cmp);
            let reboots = self
                .runs
                .iter()
                .filter(|r| r.kind == kind && r.rebooted)
                .count();
            s.push_str(&format!(
                "| {kind} | {} | {:.0} ms | {:.0} | {:.0} | {all} | {reboots}/{} |\n",
                d.len(),
                d[d.len() / 2],
                d[0],
                d[d.len() - 1],
                d.len()
            ));
        }
        s
    }
}
