//! Fencing by generation: a receiver started for the current data generation refuses
//! a primary that claims another one (a writer frozen past a failover that wakes up
//! stale), before it can change anything, and serves the current one.

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Result};
use vmha_test_infra::proc::Child;
use vmha_test_infra::{Pair, PairOptions};

fn primary_claiming(pair: &Pair, generation: &str) -> Command {
    let mut cmd = pair.primary_command();
    cmd.arg("--generation").arg(generation);
    cmd
}

#[test]
fn a_stale_writer_is_refused_and_the_current_one_served() -> Result<()> {
    let pair = Pair::prepare(PairOptions::default())?;
    let mut secondary_cmd = pair.secondary_command();
    secondary_cmd.arg("--accept-generation").arg("00c0ffee");
    let mut secondary = Child::spawn("secondary", secondary_cmd)?;
    secondary.wait_ready(Duration::from_secs(20))?;

    // Stale: refused at connect, exits non-zero, changes nothing, mounts nothing.
    let out = primary_claiming(&pair, "0badbeef").output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        bail!("a stale writer was served: {err}");
    }
    assert!(err.contains("stale writer"), "{err}");
    assert!(!vmha_test_infra::is_mount_point(pair.mount())?);

    // No claim at all: refused as well.
    let out = pair.primary_command().output()?;
    assert!(
        !out.status.success(),
        "a writer without a generation was served"
    );

    // Current: served and replicating.
    let mut primary = Child::spawn("primary", primary_claiming(&pair, "00C0FFEE"))?;
    primary.wait_ready(Duration::from_secs(20))?;
    std::fs::write(pair.mount().join("f"), b"current")?;
    assert_eq!(
        std::fs::read(pair.secondary_backing().join("f"))?,
        b"current"
    );
    let (status, _) = primary.terminate(Duration::from_secs(15))?;
    assert!(status.success());
    let (status, _) = secondary.terminate(Duration::from_secs(15))?;
    assert!(status.success());
    Ok(())
}
