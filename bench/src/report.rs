//! Results: the JSON document and the markdown tables.

use crate::diskstats::Traffic;
use crate::fio_json::{Lat, Metrics};
use crate::jobs::Job;
use crate::targets::{Kind, Usage};
use serde::Serialize;
use std::fmt::Write as _;

#[derive(Debug, Serialize)]
pub struct Meta {
    pub fio_version: String,
    pub date_utc: String,
    pub unix_time: u64,
    pub kernel: String,
    pub nproc: usize,
    pub mem_total_bytes: u64,
    pub size: String,
    pub size_bytes: u64,
    pub runtime_s: u64,
    pub targets: Vec<Kind>,
    pub jobs: Vec<String>,
    pub scratch_dir: String,
    pub vmha_fs_bin: Option<String>,
    /// Which build of vmha-fs ran (the fs crate changes under us).
    pub vmha_fs_mtime_unix: Option<u64>,
    pub elapsed_s: f64,
}

/// The buffered 1 MiB sequential write that lays the file out.
#[derive(Debug, Clone, Serialize)]
pub struct Prefill {
    pub secs: f64,
    pub mib_s: f64,
}

/// Relative to `local`, same job.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    /// IOPS / local IOPS (same block size, so also the bandwidth ratio).
    pub throughput: f64,
    /// Durable write time / local's: how many times slower a durable write is.
    pub durable_write_time: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub job: &'static str,
    pub target: Kind,
    pub spec: Job,
    pub prefill: Option<Prefill>,
    pub metrics: Option<Metrics>,
    pub vs_local: Option<Ratio>,
    /// Relative to `two-copies` (the limit of any two-copy system on this disk),
    /// same job, same run.
    pub vs_two_copies: Option<Ratio>,
    /// vmha only: secondary's copy compared with the primary's backing file.
    pub replica_check: Option<String>,
    /// Block-device traffic during the measured run (device-wide).
    pub disk: Option<Traffic>,
    /// vmha only: where the time of the replicated writes and fsyncs of the
    /// measured run went, stage by stage (the primary's `metrics.json`
    /// `write_stages` / `fsync_stages`, difference over the run).
    pub stages: Option<StageReport>,
    /// CPU time and context switches of the target's daemons (every FUSE
    /// target: vmha both nodes, bindfs, vmha-fuse-probe) during the measured run.
    pub daemon_cpu: Option<crate::targets::Usage>,
    pub error: Option<String>,
}

/// Per-stage sums of one run (see `vmha_fs::status::Stages`).
#[derive(Debug, Clone, Serialize)]
pub struct StageReport {
    pub write: vmha_fs::status::Stages,
    pub fsync: vmha_fs::status::Stages,
    /// CPU time and context switches of both daemons during the measured run.
    pub daemons: Option<crate::targets::Usage>,
}

#[derive(Debug, Serialize)]
pub struct Results {
    pub meta: Meta,
    pub runs: Vec<RunResult>,
    /// Unclean daemon shutdowns and other observations.
    pub notes: Vec<String>,
}

impl Results {
    /// Fills `vs_local` and `vs_two_copies` from the local and two-copies runs
    /// of the same job.
    pub fn compute_ratios(&mut self) {
        let bases = |kind: Kind| -> Vec<(&'static str, Metrics)> {
            self.runs
                .iter()
                .filter(|r| r.target == kind)
                .filter_map(|r| Some((r.job, r.metrics.clone()?)))
                .collect()
        };
        let (locals, twos) = (bases(Kind::Local), bases(Kind::TwoCopies));
        let ratio = |m: &Metrics, job: &str, bases: &[(&'static str, Metrics)]| {
            let (_, base) = bases.iter().find(|(j, _)| *j == job)?;
            if base.iops <= 0.0 {
                return None;
            }
            let durable_write_time = match (m.durable_write_us, base.durable_write_us) {
                (Some(d), Some(b)) if b > 0.0 => Some(d / b),
                _ => None,
            };
            Some(Ratio {
                throughput: m.iops / base.iops,
                durable_write_time,
            })
        };
        for r in &mut self.runs {
            let Some(m) = &r.metrics else { continue };
            if r.target != Kind::Local {
                r.vs_local = ratio(m, r.job, &locals);
            }
            if !matches!(r.target, Kind::Local | Kind::TwoCopies) {
                r.vs_two_copies = ratio(m, r.job, &twos);
            }
        }
    }

    fn run(&self, job: &str, target: Kind) -> Option<&RunResult> {
        self.runs
            .iter()
            .find(|r| r.job == job && r.target == target)
    }

    pub fn markdown(&self) -> String {
        let m = &self.meta;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "### fio: {} (size {}, runtime {} s, direct=1; {}, kernel {}, {} CPUs, {:.0} GiB)\n",
            m.targets
                .iter()
                .map(|k| k.name())
                .collect::<Vec<_>>()
                .join(" vs "),
            m.size,
            m.runtime_s,
            m.fio_version,
            m.kernel,
            m.nproc,
            m.mem_total_bytes as f64 / f64::from(1u32 << 30),
        );
        self.main_table(&mut s);
        if self.runs.iter().any(|r| r.spec.fdatasync) {
            self.durable_table(&mut s);
        }
        if self.runs.iter().any(|r| r.disk.is_some()) {
            self.disk_table(&mut s);
        }
        if self.runs.iter().any(|r| r.stages.is_some()) {
            self.stage_table(&mut s);
        }
        if self.runs.iter().any(|r| r.daemon_cpu.is_some()) {
            self.daemon_cpu_table(&mut s);
        }
        let extra: Vec<String> = self
            .runs
            .iter()
            .filter_map(|r| {
                let mut parts = Vec::new();
                if let Some(e) = &r.error {
                    parts.push(format!("ERROR: {e}"));
                }
                if let Some(c) = &r.replica_check {
                    if c != "identical" {
                        parts.push(format!("replica check: {c}"));
                    }
                }
                (!parts.is_empty())
                    .then(|| format!("- {} / {}: {}", r.job, r.target.name(), parts.join("; ")))
            })
            .chain(self.notes.iter().map(|n| format!("- {n}")))
            .collect();
        let checked = self
            .runs
            .iter()
            .filter(|r| r.replica_check.as_deref() == Some("identical"))
            .count();
        if checked > 0 {
            let _ = writeln!(
                s,
                "\nReplica check: secondary file identical to primary's after {checked} run(s)."
            );
        }
        if !extra.is_empty() {
            let _ = writeln!(s, "\nProblems:\n{}", extra.join("\n"));
        }
        s
    }

    fn main_table(&self, s: &mut String) {
        let mut head = vec!["job".to_owned()];
        for k in &self.meta.targets {
            let n = k.name();
            head.extend([
                format!("{n} MiB/s"),
                format!("{n} IOPS"),
                format!("{n} p50 µs"),
                format!("{n} p99 µs"),
            ]);
            if *k != Kind::Local {
                head.push(format!("{n} ×local"));
            }
            if self.has_two_copies() && !matches!(k, Kind::Local | Kind::TwoCopies) {
                head.push(format!("{n} ×two-copies"));
            }
        }
        table_row(s, &head);
        table_row(s, &vec!["---".to_owned(); head.len()]);
        for job in &self.meta.jobs {
            let mut row = vec![job.clone()];
            for k in &self.meta.targets {
                let r = self.run(job, *k);
                match r.and_then(|r| r.metrics.as_ref()) {
                    Some(m) => row.extend([
                        num(m.mib_s),
                        num(m.iops),
                        num(m.clat.p50_us),
                        num(m.clat.p99_us),
                    ]),
                    None => {
                        let why = if r.is_some_and(|r| r.error.is_some()) {
                            "ERR"
                        } else {
                            "–"
                        };
                        row.extend([why.to_owned(), "–".into(), "–".into(), "–".into()]);
                    }
                }
                let cell = |v: Option<&Ratio>| {
                    v.map_or("–".into(), |v| match v.durable_write_time {
                        Some(d) => format!("{:.2}× (durable {:.2}× slower)", v.throughput, d),
                        None => format!("{:.2}×", v.throughput),
                    })
                };
                if *k != Kind::Local {
                    row.push(cell(r.and_then(|r| r.vs_local.as_ref())));
                }
                if self.has_two_copies() && !matches!(k, Kind::Local | Kind::TwoCopies) {
                    row.push(cell(r.and_then(|r| r.vs_two_copies.as_ref())));
                }
            }
            table_row(s, &row);
        }
        let _ = writeln!(
            s,
            "\n×local = IOPS (= bandwidth) relative to local; ×two-copies = relative to two fio \
             jobs writing two files on the same disk at once (rates per copy: the best any two-copy \
             system reaches on this one disk); all from the same run. p50/p99 = fio completion \
             latency (clat)."
        );
    }

    fn has_two_copies(&self) -> bool {
        self.meta.targets.contains(&Kind::TwoCopies)
    }

    fn durable_table(&self, s: &mut String) {
        let _ = writeln!(
            s,
            "\n#### randwrite-sync: durable 4k write = write + fdatasync, qd1 (µs)\n"
        );
        let head: Vec<String> = [
            "target",
            "write mean",
            "write p50",
            "write p99",
            "fdatasync mean",
            "fdatasync p50",
            "fdatasync p99",
            "durable write (mean)",
            "×local time",
            "×two-copies time",
        ]
        .map(str::to_owned)
        .to_vec();
        table_row(s, &head);
        table_row(s, &vec!["---".to_owned(); head.len()]);
        for r in self.runs.iter().filter(|r| r.spec.fdatasync) {
            let Some(m) = &r.metrics else { continue };
            let lat = |l: Option<Lat>| match l {
                Some(l) => [num(l.mean_us), num(l.p50_us), num(l.p99_us)],
                None => ["–".into(), "–".into(), "–".into()],
            };
            let mut row = vec![r.target.name().to_owned()];
            row.extend(lat(Some(m.clat)));
            row.extend(lat(m.sync));
            row.push(m.durable_write_us.map_or("–".into(), num));
            row.push(if r.target == Kind::Local {
                "1.00×".into()
            } else {
                r.vs_local
                    .as_ref()
                    .and_then(|v| v.durable_write_time)
                    .map_or("–".into(), |d| format!("{d:.2}×"))
            });
            row.push(
                r.vs_two_copies
                    .as_ref()
                    .and_then(|v| v.durable_write_time)
                    .map_or("–".into(), |d| format!("{d:.2}×")),
            );
            table_row(s, &row);
        }
    }
}

impl Results {
    fn disk_table(&self, s: &mut String) {
        let _ = writeln!(
            s,
            "\n#### Disk traffic during the measured run (device-wide: MiB read / MiB written / flushes)\n"
        );
        let mut head = vec!["job".to_owned()];
        head.extend(self.meta.targets.iter().map(|k| k.name().to_owned()));
        table_row(s, &head);
        table_row(s, &vec!["---".to_owned(); head.len()]);
        for job in &self.meta.jobs {
            let mut row = vec![job.clone()];
            for k in &self.meta.targets {
                row.push(
                    self.run(job, *k)
                        .and_then(|r| r.disk)
                        .map_or("–".into(), |d| {
                            format!(
                                "{} / {} / {}",
                                num(d.read_mib),
                                num(d.written_mib),
                                d.flushes
                            )
                        }),
                );
            }
            table_row(s, &row);
        }
    }
}

impl Results {
    /// Mean µs per operation of each stage of vmha's write path, per job and
    /// target (writes, then fsyncs).
    fn stage_table(&self, s: &mut String) {
        let _ = writeln!(
            s,
            "\n#### vmha write path, mean µs per operation by stage (record → send → max(local, peer) → reply; peer_busy = receiver's own time; peer last = share of ops that waited for the peer)\n"
        );
        let head = [
            "job / target / op",
            "ops",
            "record",
            "send",
            "local",
            "peer",
            "peer_busy",
            "reply",
            "total",
            "peer last",
        ];
        table_row(s, &head.map(str::to_owned));
        table_row(s, &vec!["---".to_owned(); head.len()]);
        for r in &self.runs {
            let Some(st) = &r.stages else { continue };
            for (op, stages) in [("write", &st.write), ("fsync", &st.fsync)] {
                if stages.count == 0 {
                    continue;
                }
                let mut row = vec![
                    format!("{} / {} / {op}", r.job, r.target.name()),
                    stages.count.to_string(),
                ];
                row.extend(
                    stages
                        .means_us()
                        .into_iter()
                        .map(|(_, us)| format!("{us:.1}")),
                );
                row.push(format!(
                    "{:.0} %",
                    100.0 * stages.peer_last as f64 / stages.count as f64
                ));
                table_row(s, &row);
            }
        }
        let rows: Vec<_> = self
            .runs
            .iter()
            .filter_map(|r| {
                let st = r.stages.as_ref()?;
                let ops = st.write.count + st.fsync.count;
                Some((format!("{} / {}", r.job, r.target.name()), ops, st.daemons?))
            })
            .collect();
        usage_table(
            s,
            "Both daemons together, per replicated operation (writes + fsyncs) of the run: CPU µs, voluntary / involuntary context switches.",
            "ops",
            &rows,
            0,
        );
    }

    /// The FUSE daemons' CPU per fio operation (reads or writes of the job;
    /// the fsyncs of randwrite-sync ride along).
    fn daemon_cpu_table(&self, s: &mut String) {
        let rows: Vec<_> = self
            .runs
            .iter()
            .filter_map(|r| {
                let ops = r.metrics.as_ref()?.total_ios;
                Some((
                    format!("{} / {}", r.job, r.target.name()),
                    ops,
                    r.daemon_cpu?,
                ))
            })
            .collect();
        usage_table(
            s,
            "FUSE daemon(s) per fio operation of the run: CPU µs, voluntary / involuntary context switches.",
            "fio ops",
            &rows,
            1,
        );
    }
}

/// Daemon CPU and context switches per operation, one row per (label, ops,
/// usage); rows without operations are left out.
fn usage_table(
    s: &mut String,
    intro: &str,
    ops_head: &str,
    rows: &[(String, u64, Usage)],
    cpu_digits: usize,
) {
    let _ = writeln!(s, "\n{intro}\n");
    let head = [
        "job / target",
        ops_head,
        "CPU µs/op",
        "voluntary/op",
        "involuntary/op",
    ];
    table_row(s, &head.map(str::to_owned));
    table_row(s, &vec!["---".to_owned(); head.len()]);
    for (label, ops, u) in rows.iter().filter(|(_, ops, _)| *ops > 0) {
        let per = |v: u64| format!("{:.2}", v as f64 / *ops as f64);
        table_row(
            s,
            &[
                label.clone(),
                ops.to_string(),
                format!("{:.*}", cpu_digits, u.cpu_us as f64 / *ops as f64),
                per(u.voluntary_switches),
                per(u.involuntary_switches),
            ],
        );
    }
}

fn table_row(s: &mut String, cells: &[String]) {
    let _ = writeln!(s, "| {} |", cells.join(" | "));
}

/// Three significant-ish digits without noise.
fn num(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::ALL;

    fn metrics(iops: f64, durable: Option<f64>) -> Metrics {
        let lat = Lat {
            mean_us: 10.0,
            p50_us: 9.0,
            p99_us: 20.0,
        };
        Metrics {
            mib_s: iops * 4.0 / 1024.0,
            iops,
            total_ios: 1,
            clat: lat,
            sync: durable.map(|_| lat),
            durable_write_us: durable,
        }
    }

    fn run(target: Kind, m: Metrics) -> RunResult {
        RunResult {
            job: ALL[2].name,
            target,
            spec: ALL[2],
            prefill: None,
            metrics: Some(m),
            vs_local: None,
            vs_two_copies: None,
            replica_check: None,
            disk: None,
            stages: None,
            daemon_cpu: None,
            error: None,
        }
    }

    #[test]
    fn ratios_are_relative_to_local() {
        let mut res = Results {
            meta: Meta {
                fio_version: "fio-3.33".into(),
                date_utc: String::new(),
                unix_time: 0,
                kernel: String::new(),
                nproc: 2,
                mem_total_bytes: 0,
                size: "1G".into(),
                size_bytes: 1 << 30,
                runtime_s: 20,
                targets: vec![Kind::Local, Kind::TwoCopies, Kind::Vmha],
                jobs: vec![ALL[2].name.into()],
                scratch_dir: String::new(),
                vmha_fs_bin: None,
                vmha_fs_mtime_unix: None,
                elapsed_s: 0.0,
            },
            runs: vec![
                run(Kind::Local, metrics(1000.0, Some(100.0))),
                run(Kind::TwoCopies, metrics(500.0, Some(200.0))),
                run(Kind::Vmha, metrics(250.0, Some(400.0))),
            ],
            notes: vec![],
        };
        res.compute_ratios();
        let two = res.runs[2].vs_two_copies.clone();
        assert!(two.is_some_and(
            |v| (v.throughput - 0.5).abs() < 1e-9 && v.durable_write_time == Some(2.0)
        ));
        assert!(res.runs[1].vs_two_copies.is_none());
        let v = res.runs[2].vs_local.clone();
        assert!(v
            .as_ref()
            .is_some_and(|v| (v.throughput - 0.25).abs() < 1e-9));
        assert!(v.is_some_and(|v| v.durable_write_time == Some(4.0)));
        assert!(res.runs[0].vs_local.is_none());
        let md = res.markdown();
        assert!(md.contains("0.25× (durable 4.00× slower)"));
        // No daemon usage measured: no CPU table.
        assert!(!md.contains("FUSE daemon(s) per fio operation"));
        if let Some(m) = res.runs[2].metrics.as_mut() {
            m.total_ios = 400;
        }
        res.runs[2].daemon_cpu = Some(Usage {
            cpu_us: 10_000,
            voluntary_switches: 800,
            involuntary_switches: 4,
        });
        let md = res.markdown();
        assert!(md.contains("FUSE daemon(s) per fio operation"), "{md}");
        assert!(
            md.contains("| randwrite-sync / vmha | 400 | 25.0 | 2.00 | 0.01 |"),
            "{md}"
        );
        assert!(md.contains("0.50× (durable 2.00× slower)"));
        assert!(md.contains("vmha ×two-copies"));
        assert!(md.contains("| vmha | 10.0 | 9.00 | 20.0 |"));
    }
}
