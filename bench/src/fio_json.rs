//! Parsing fio's `--output-format=json` into the numbers we report.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Deserialize)]
struct Report {
    jobs: Vec<JobReport>,
}

#[derive(Debug, Deserialize)]
struct JobReport {
    jobname: String,
    error: i64,
    read: DirReport,
    write: DirReport,
    sync: Option<SyncReport>,
}

#[derive(Debug, Deserialize)]
struct DirReport {
    bw_bytes: f64,
    iops: f64,
    total_ios: u64,
    clat_ns: LatReport,
}

#[derive(Debug, Deserialize)]
struct SyncReport {
    lat_ns: LatReport,
}

#[derive(Debug, Deserialize)]
struct LatReport {
    #[serde(rename = "N", default)]
    n: u64,
    mean: f64,
    // Absent when no I/O happened in that direction.
    #[serde(default)]
    percentile: BTreeMap<String, f64>,
}

/// Latency summary in microseconds.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Lat {
    pub mean_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// What one fio run measured, for the direction the job does I/O in.
#[derive(Debug, Clone, Serialize)]
pub struct Metrics {
    pub mib_s: f64,
    pub iops: f64,
    pub total_ios: u64,
    /// Completion latency of the reads/writes.
    pub clat: Lat,
    /// fdatasync latency (jobs with fdatasync=1).
    pub sync: Option<Lat>,
    /// Mean write clat + mean fdatasync latency: the time a durable write takes.
    pub durable_write_us: Option<f64>,
}

fn percentile(lat: &LatReport, p: f64) -> Result<f64> {
    for (k, v) in &lat.percentile {
        let key: f64 = k.parse().with_context(|| format!("percentile key {k:?}"))?;
        if (key - p).abs() < 1e-6 {
            return Ok(*v);
        }
    }
    bail!("fio report has no p{p} percentile")
}

fn summarize(lat: &LatReport) -> Result<Lat> {
    Ok(Lat {
        mean_us: lat.mean / 1e3,
        p50_us: percentile(lat, 50.0)? / 1e3,
        p99_us: percentile(lat, 99.0)? / 1e3,
    })
}

/// Parses fio JSON output of a single-group job. `writes` selects the direction.
pub fn parse(text: &str, writes: bool) -> Result<Metrics> {
    // fio sometimes prints notes before the JSON document.
    let start = text.find('{').context("no JSON object in fio output")?;
    let report: Report =
        serde_json::from_str(&text[start..]).context("fio output is not the expected JSON")?;
    let [job] = report.jobs.as_slice() else {
        bail!(
            "expected one job (group_reporting) in fio output, got {}",
            report.jobs.len()
        );
    };
    if job.error != 0 {
        bail!("fio job {} reported error {}", job.jobname, job.error);
    }
    let dir = if writes { &job.write } else { &job.read };
    if dir.total_ios == 0 {
        bail!("fio job {} did no I/O", job.jobname);
    }
    let clat = summarize(&dir.clat_ns)?;
    let sync = match &job.sync {
        Some(s) if s.lat_ns.n > 0 => Some(summarize(&s.lat_ns)?),
        _ => None,
    };
    Ok(Metrics {
        mib_s: dir.bw_bytes / (1024.0 * 1024.0),
        iops: dir.iops,
        total_ios: dir.total_ios,
        clat,
        sync,
        durable_write_us: sync.filter(|_| writes).map(|s| clat.mean_us + s.mean_us),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured with fio 3.33 on a local dir (4 MiB file, 1 s runtime).
    const SYNC: &str = include_str!("testdata/fio-randwrite-sync.json");
    const READ: &str = include_str!("testdata/fio-randread-qd16.json");

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6 * b.abs().max(1.0)
    }

    #[test]
    fn parses_sync_write_job() -> Result<()> {
        let m = parse(SYNC, true)?;
        assert!(close(m.mib_s, 30_308_763.0 / 1048576.0));
        assert!(close(m.iops, 7399.6004));
        assert!(close(m.clat.mean_us, 45.071835561));
        assert!(close(m.clat.p50_us, 43.264));
        assert!(close(m.clat.p99_us, 84.48));
        let sync = m.sync.ok_or_else(|| anyhow::anyhow!("no sync section"))?;
        assert!(close(sync.mean_us, 87.118691196));
        assert!(close(sync.p50_us, 82.432));
        assert!(close(sync.p99_us, 156.672));
        let durable = m.durable_write_us.unwrap_or_default();
        assert!(close(durable, 45.071835561 + 87.118691196));
        Ok(())
    }

    #[test]
    fn parses_read_job_without_sync() -> Result<()> {
        let m = parse(READ, false)?;
        assert!(close(m.iops, 103635.364635));
        assert!(close(m.mib_s, 424_490_453.0 / 1048576.0));
        assert!(close(m.clat.p50_us, 136.192));
        assert!(close(m.clat.p99_us, 234.496));
        assert!(m.sync.is_none());
        assert!(m.durable_write_us.is_none());
        Ok(())
    }

    #[test]
    fn wrong_direction_is_an_error() {
        // The read job did no writes: reporting zeros would hide a broken run.
        assert!(parse(READ, true).is_err());
    }

    #[test]
    fn tolerates_leading_notes_and_rejects_garbage() -> Result<()> {
        let noisy = format!("fio: note: something\n{SYNC}");
        assert!(parse(&noisy, true).is_ok());
        assert!(parse("fio: no json here", true).is_err());
        let errored = SYNC.replacen("\"error\" : 0", "\"error\" : 5", 1);
        assert!(parse(&errored, true).is_err());
        Ok(())
    }
}
