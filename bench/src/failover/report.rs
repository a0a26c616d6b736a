//! Results of `vmha-bench failover`: JSON and markdown.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;
use vmha_test_infra::cluster_vm::Timing;

use super::crash::CrashResults;
use super::linkload::LoadRun;
use super::loadavg;
use crate::sysinfo;

/// p50 and max of a set of times.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub min: f64,
    /// The median (mean of the two middle values for an even count).
    pub p50: f64,
    pub max: f64,
}

impl Summary {
    pub fn of(values: impl Iterator<Item = f64>) -> Option<Self> {
        let mut v: Vec<f64> = values.collect();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let (&min, &max) = (v.first()?, v.last()?);
        let p50 = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Self { n, min, p50, max })
    }
}

/// The timeouts in effect (DESIGN.md's example).
#[derive(Debug, Clone, Serialize)]
pub struct TimingOut {
    pub heartbeat_interval_ms: u64,
    pub failover_timeout_ms: u64,
    pub lock_timeout_ms: u64,
    pub start_wait_ms: u64,
}

#[derive(Debug, Serialize)]
pub struct Results {
    pub date_utc: String,
    pub kernel: String,
    pub nproc: usize,
    pub loadavg_start: String,
    pub loadavg_end: String,
    pub elapsed_s: f64,
    pub timing: TimingOut,
    pub load: Vec<LoadRun>,
    pub crash: Option<CrashResults>,
    #[serde(skip)]
    started: Option<Instant>,
}

impl Results {
    pub fn new(t: &Timing) -> Self {
        Self {
            date_utc: sysinfo::utc_rfc3339(sysinfo::unix_now()),
            kernel: sysinfo::kernel(),
            nproc: sysinfo::nproc(),
            loadavg_start: loadavg(),
            loadavg_end: String::new(),
            elapsed_s: 0.0,
            timing: TimingOut {
                heartbeat_interval_ms: t.heartbeat_interval_ms,
                failover_timeout_ms: t.failover_timeout_ms,
                lock_timeout_ms: t.lock_timeout_ms,
                start_wait_ms: t.start_wait_ms,
            },
            load: Vec::new(),
            crash: None,
            started: Some(Instant::now()),
        }
    }

    pub fn finish(&mut self) {
        self.loadavg_end = loadavg();
        if let Some(t) = self.started {
            self.elapsed_s = t.elapsed().as_secs_f64();
        }
    }

    pub fn write(&self, out: &Path) -> Result<()> {
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        let json = serde_json::to_string_pretty(self)?;
        std::fs::write(out, json + "\n").with_context(|| format!("write {}", out.display()))
    }

    /// Whether everything ran and nothing failed: no error, no lost write,
    /// no false failover.
    pub fn ok(&self) -> bool {
        let load_ok = self
            .load
            .iter()
            .all(|r| r.error.is_none() && r.false_failovers == 0);
        let crash_ok = self
            .crash
            .as_ref()
            .is_none_or(|c| c.violations == 0 && c.errors == 0);
        load_ok && crash_ok
    }

    pub fn markdown(&self) -> String {
        let t = &self.timing;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "Timeouts: heartbeat_interval_ms {}, failover_timeout_ms {}, lock_timeout_ms {} \
             (vmhad's defaults unless given). {} UTC, {} CPUs, load average {} at the start, {} at the end.\n",
            t.heartbeat_interval_ms,
            t.failover_timeout_ms,
            t.lock_timeout_ms,
            self.date_utc,
            self.nproc,
            self.loadavg_start,
            self.loadavg_end
        );
        if let Some(c) = &self.crash {
            self.crash_table(&mut s, c);
        }
        if !self.load.is_empty() {
            self.load_table(&mut s);
        }
        s
    }

    fn crash_table(&self, s: &mut String, c: &CrashResults) {
        let t = &self.timing;
        let _ = writeln!(
            s,
            "### Failover after SIGKILL of every process of node1 ({} runs)\n",
            c.runs.len()
        );
        row(s, &["", "p50 ms", "max ms", "min ms", "runs"]);
        row(s, &["---", "---", "---", "---", "---"]);
        for (name, sum) in [
            (
                "kill → node2 takes over (first event in its log)",
                c.to_takeover_ms,
            ),
            (
                "kill → node2 ALONE (vmctl status: writer mounted, VM starting)",
                c.to_alone_ms,
            ),
            (
                "kill → `virsh start` returned on node2 (event log)",
                c.to_vm_started_ms,
            ),
            ("kill → guest booted on node2", c.to_boot_ms),
            ("kill → first COUNTER on node2", c.to_counter_ms),
        ] {
            match sum {
                Some(x) => row(
                    s,
                    &[
                        name.to_string(),
                        format!("{:.0}", x.p50),
                        format!("{:.0}", x.max),
                        format!("{:.0}", x.min),
                        x.n.to_string(),
                    ],
                ),
                None => row(s, &[name, "-", "-", "-", "0"]),
            }
        }
        row(
            s,
            &[
                "failover_timeout_ms / heartbeat_interval_ms".to_string(),
                t.failover_timeout_ms.to_string(),
                t.heartbeat_interval_ms.to_string(),
                String::new(),
                String::new(),
            ],
        );
        let _ = writeln!(
            s,
            "\nPer run (ms): {}",
            c.runs
                .iter()
                .map(|r| format!(
                    "#{} takeover {} / ALONE {} / boot {} / counter {} (acked {}, booted from {}){}",
                    r.run,
                    opt(r.to_takeover_ms),
                    opt(r.to_alone_ms),
                    opt(r.to_boot_ms),
                    opt(r.to_counter_ms),
                    r.acked.map_or("-".into(), |a| a.to_string()),
                    r.boot.map_or("-".into(), |a| a.to_string()),
                    r.error.as_ref().map_or(String::new(), |_| " ERROR".into())
                ))
                .collect::<Vec<_>>()
                .join("; ")
        );
        let _ = writeln!(
            s,
            "\nAcknowledged counters lost: **{}**; failed runs: {}.\n",
            c.violations, c.errors
        );
        if let Some(r) = c.runs.iter().find(|r| !r.events.is_empty()) {
            let _ = writeln!(
                s,
                "node2's event log after the kill, run {} (ms after the kill):\n",
                r.run
            );
            let _ = writeln!(s, "```");
            for (at, e) in &r.events {
                let _ = writeln!(s, "{at:>6} {e}");
            }
            let _ = writeln!(s, "```\n");
        }
        for r in &c.runs {
            if let Some(v) = &r.violation {
                let _ = writeln!(s, "- run {}: **{v}**", r.run);
            }
        }
    }

    fn load_table(&self, s: &mut String) {
        let _ = writeln!(
            s,
            "### False failovers with fio saturating the replication link\n"
        );
        row(
            s,
            &[
                "scenario",
                "tbf (ded0, both ends)",
                "fio MiB/s",
                "fio / rate",
                "link Mbit/s",
                "tbf drops (max backlog KiB)",
                "s",
                "samples",
                "false failovers",
                "max last_seen ms (node2 / node1)",
                "max hb age ms on dedicated / production (node2)",
                "guest counters (max stall ms)",
                "load avg start → end",
            ],
        );
        row(s, &["---"; 13]);
        for r in &self.load {
            row(
                s,
                &[
                    if r.cpu_hogs > 0 {
                        format!("{} ({} busy loops)", r.scenario, r.cpu_hogs)
                    } else {
                        r.scenario.clone()
                    },
                    r.tbf.clone(),
                    opt2(r.fio_mib_s),
                    opt2(r.fio_over_rate),
                    opt2(r.link_tx_mbit_s),
                    format!(
                        "{} ({})",
                        r.tbf_drops.map_or("-".into(), |d| d.to_string()),
                        r.tbf_max_backlog_bytes
                            .map_or("-".into(), |b| format!("{:.0}", b as f64 / 1024.0))
                    ),
                    r.fio_seconds.to_string(),
                    r.samples.to_string(),
                    if r.error.is_some() {
                        "ERROR".into()
                    } else {
                        format!("**{}**", r.false_failovers)
                    },
                    format!(
                        "{} / {}",
                        r.max_last_seen_ms_node2
                            .map_or("-".into(), |x| x.to_string()),
                        r.max_last_seen_ms_node1
                            .map_or("-".into(), |x| x.to_string())
                    ),
                    format!(
                        "{} / {}",
                        r.max_dedicated_hb_age_ms_node2
                            .map_or("-".into(), |x| x.to_string()),
                        r.max_production_hb_age_ms_node2
                            .map_or("-".into(), |x| x.to_string())
                    ),
                    format!("{} ({:.0})", r.guest_counters, r.guest_max_stall_ms),
                    format!("{} → {}", r.loadavg_start, r.loadavg_end),
                ],
            );
        }
        for r in &self.load {
            if !r.problems.is_empty() {
                let _ = writeln!(s, "\n{} problems: {:?}", r.scenario, r.problems);
            }
            if !r.guest_long_stalls.is_empty() {
                let _ = writeln!(
                    s,
                    "\n{} guest pauses > 1 s (s after fio start, ms): {:?}",
                    r.scenario, r.guest_long_stalls
                );
            }
            if let Some(e) = &r.error {
                let first = e.lines().next().unwrap_or_default();
                let _ = writeln!(s, "\n{} error: {first}", r.scenario);
            }
        }
        let _ = writeln!(s);
    }
}

fn row<S: AsRef<str>>(s: &mut String, cells: &[S]) {
    let cells: Vec<&str> = cells.iter().map(AsRef::as_ref).collect();
    let _ = writeln!(s, "| {} |", cells.join(" | "));
}

fn opt(x: Option<f64>) -> String {
    x.map_or("-".into(), |v| format!("{v:.0}"))
}

fn opt2(x: Option<f64>) -> String {
    x.map_or("-".into(), |v| {
        if v < 10.0 {
            format!("{v:.2}")
        } else {
            format!("{v:.1}")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_max() {
        let s = Summary::of([3.0, 1.0, 2.0].into_iter()).unwrap();
        assert_eq!((s.p50, s.max, s.min, s.n), (2.0, 3.0, 1.0, 3));
        let s = Summary::of([4.0, 1.0, 2.0, 3.0].into_iter()).unwrap();
        assert_eq!(s.p50, 2.5);
        assert_eq!(Summary::of(std::iter::empty()), None);
    }
}
