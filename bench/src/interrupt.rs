//! SIGINT/SIGTERM/SIGHUP set a flag instead of killing us, so the normal
//! error path stops the children and unmounts.

use anyhow::{bail, Context, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();

pub fn install() -> Result<()> {
    let flag = FLAG.get_or_init(|| Arc::new(AtomicBool::new(false)));
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        signal_hook::flag::register(sig, flag.clone()).context("install signal handler")?;
    }
    Ok(())
}

/// Errors once a stop signal arrived.
pub fn check() -> Result<()> {
    if FLAG.get().is_some_and(|f| f.load(Ordering::Relaxed)) {
        bail!("interrupted by signal");
    }
    Ok(())
}
