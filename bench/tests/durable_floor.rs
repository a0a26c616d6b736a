//! `vmha-bench durable-floor` measures what it says: every pattern runs and
//! is compared with the same round's one-copy run, every durable write reaches
//! the device as a flush (the two-copy patterns flush both copies: the floor is
//! not a page-cache number), and bad arguments are refused with a message.

use anyhow::{ensure, Context, Result};
use std::process::Command;

const BENCH: &str = env!("CARGO_BIN_EXE_vmha-bench");

/// A scratch directory on the disk (not a tmpfs: the files take O_DIRECT and
/// their syncs reach the device).
fn scratch() -> Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new()
        .prefix("vmha-durable-floor-test.")
        .tempdir_in("/var/tmp")?)
}

#[test]
fn every_pattern_runs_and_each_durable_write_is_flushed() -> Result<()> {
    let dir = scratch()?;
    let out = dir.path().join("floor.json");
    let run = Command::new(BENCH)
        .args([
            "durable-floor",
            "--size-mib",
            "8",
            "--seconds",
            "1",
            "--rounds",
            "1",
        ])
        .arg("--dir")
        .arg(dir.path())
        .arg("--out")
        .arg(&out)
        .output()
        .context("run vmha-bench durable-floor")?;
    ensure!(
        run.status.success(),
        "durable-floor failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let table = String::from_utf8_lossy(&run.stdout);
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&out)?)?;
    let samples = json["samples"].as_array().context("samples")?;
    for pattern in ["local", "lockstep-direct", "lockstep-buffered"] {
        let s = samples
            .iter()
            .find(|s| s["pattern"] == pattern)
            .with_context(|| format!("no {pattern} sample in {json}"))?;
        let ops = s["ops"].as_u64().context("ops")?;
        ensure!(ops > 0, "{pattern}: no operation in a second: {s}");
        let flushes = s["flushes_per_op"].as_f64().context("flushes_per_op")?;
        ensure!(
            flushes >= 0.9,
            "{pattern}: {flushes} device flushes per durable write: the syncs did not reach the disk"
        );
        ensure!(
            table.contains(pattern),
            "{pattern} missing from the table:\n{table}"
        );
    }
    let local = samples
        .iter()
        .find(|s| s["pattern"] == "local")
        .context("local")?;
    ensure!(local["vs_local"].as_f64() == Some(1.0), "{local}");
    // The scratch files are gone with the run.
    ensure!(
        std::fs::read_dir(dir.path())?.count() == 1,
        "durable-floor left files behind in {}",
        dir.path().display()
    );
    Ok(())
}

#[test]
fn zero_rounds_are_refused_with_a_message() -> Result<()> {
    let dir = scratch()?;
    let run = Command::new(BENCH)
        .args(["durable-floor", "--rounds", "0", "--size-mib", "1"])
        .arg("--dir")
        .arg(dir.path())
        .arg("--out")
        .arg(dir.path().join("floor.json"))
        .output()?;
    let err = String::from_utf8_lossy(&run.stderr);
    ensure!(!run.status.success(), "accepted --rounds 0");
    ensure!(err.contains("--rounds"), "no reason given: {err}");
    Ok(())
}
