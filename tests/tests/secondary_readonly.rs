//! On the secondary, the replica is read-only for everyone but the receiver.

use anyhow::{bail, Context, Result};
use vmha_test_infra::{Pair, PairOptions};

#[test]
fn replica_is_erofs_but_replication_continues() -> Result<()> {
    let pair = Pair::start(PairOptions::default())?;
    std::fs::write(pair.mount().join("before"), b"one")?;

    let local = pair.secondary_backing().join("x");
    match std::fs::File::create(&local) {
        Ok(_) => bail!("creating {} on the secondary succeeded", local.display()),
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => {}
        Err(e) => bail!(
            "creating {} failed with {e}, expected EROFS",
            local.display()
        ),
    }
    let existing = pair.secondary_backing().join("before");
    match std::fs::OpenOptions::new().append(true).open(&existing) {
        Ok(_) => bail!("opening a replicated file for writing on the secondary succeeded"),
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => {}
        Err(e) => bail!(
            "appending to {} failed with {e}, expected EROFS",
            existing.display()
        ),
    }

    std::fs::write(pair.mount().join("after"), b"two").context("write through the mount")?;
    let got = std::fs::read(pair.secondary_backing().join("after"))
        .context("reading the replicated file on the secondary")?;
    if got != b"two" {
        bail!("secondary has {got:?}, expected \"two\"");
    }
    if pair.secondary_backing().join("x").exists() {
        bail!("the refused local create left a file behind");
    }
    Ok(())
}
