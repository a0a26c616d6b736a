//! Start and stop: SIGTERM unmounts and exits 0; after SIGKILL the harness
//! removes what the processes left mounted.

use anyhow::{bail, Context, Result};
use vmha_test_infra::{is_mount_point, Pair, PairOptions};

#[test]
fn sigterm_unmounts_and_exits_zero() -> Result<()> {
    let mut pair = Pair::start(PairOptions::default())?;
    if !is_mount_point(pair.secondary_backing())? {
        bail!("the secondary did not bind-mount its backing dir read-only");
    }
    std::fs::write(pair.mount().join("f"), b"data")?;
    pair.stop().context("SIGTERM both")?;
    for p in [pair.mount(), pair.secondary_backing()] {
        if is_mount_point(p)? {
            bail!("{} still mounted after SIGTERM", p.display());
        }
    }
    // The replica is an ordinary writable directory again, with the data.
    if std::fs::read(pair.secondary_backing().join("f"))? != b"data" {
        bail!("replicated file missing after stop");
    }
    std::fs::write(pair.secondary_backing().join("local"), b"x")
        .context("secondary dir still read-only after stop")?;
    Ok(())
}

#[test]
fn killed_processes_leave_mounts_that_the_harness_removes() -> Result<()> {
    let mut pair = Pair::start(PairOptions::default())?;
    pair.kill_primary()?;
    pair.kill_secondary()?;
    // A dead FUSE mount answers ENOTCONN; the read-only bind stays too.
    let e = std::fs::metadata(pair.mount().join("x"))
        .err()
        .and_then(|e| e.raw_os_error());
    if e != Some(libc::ENOTCONN) {
        bail!("expected ENOTCONN from a dead FUSE mount, got {e:?}");
    }
    if !is_mount_point(pair.mount())? || !is_mount_point(pair.secondary_backing())? {
        bail!("expected the dead mounts to remain after SIGKILL");
    }
    pair.cleanup_mounts()?;
    if is_mount_point(pair.mount())? || is_mount_point(pair.secondary_backing())? {
        bail!("cleanup_mounts left something mounted");
    }
    Ok(())
}

/// The cluster key is private and nothing in a state dir is writable by other
/// users (the daemons run with umask 0 for exact file modes in the replicas; their
/// own metadata must not inherit that).
#[test]
fn key_and_state_files_are_not_world_writable() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut pair = Pair::start(PairOptions::default())?;
    // Produce some state beyond start-up.
    std::fs::write(pair.mount().join("f"), b"x")?;
    let key_mode = std::fs::metadata(pair.key_file())?.permissions().mode() & 0o777;
    let mut problems = Vec::new();
    if key_mode & 0o077 != 0 {
        problems.push(format!("key file mode {key_mode:04o}, expected 0600"));
    }
    pair.stop()?;
    for dir in [pair.primary_state(), pair.secondary_state()] {
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let mode = e.metadata()?.permissions().mode() & 0o7777;
            if mode & 0o022 != 0 {
                problems.push(format!(
                    "{} has mode {mode:04o} (writable by group/others)",
                    e.path().display()
                ));
            }
        }
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    Ok(())
}
