//! FUSE over io_uring is switched on per kernel, by the fuse module's
//! `enable_uring` parameter (off by default): a guard that turns it on for a
//! benchmark or a test and puts the old value back when dropped, also on an
//! error path. Guards of one process nest (a count): the value goes back when
//! the last one is dropped. Only new FUSE connections look at the switch, and
//! only servers that ask for io_uring at INIT use it, so other mounts on the
//! machine are not affected.

use anyhow::{Context, Result};
use std::path::Path;
use std::sync::{Mutex, PoisonError};

/// The kernel's switch.
pub const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// Whether this kernel has FUSE over io_uring at all (on or off).
pub fn available() -> bool {
    Path::new(ENABLE_URING).exists()
}

/// Live guards of this process, and the value to restore after the last.
static STATE: Mutex<(usize, Option<String>)> = Mutex::new((0, None));

/// While alive, `enable_uring` is `Y`.
#[derive(Debug)]
pub struct EnableUring(());

impl EnableUring {
    /// Turns the switch on (needs root); errors if the kernel lacks it.
    pub fn new() -> Result<Self> {
        let mut st = STATE.lock().unwrap_or_else(PoisonError::into_inner);
        if st.0 == 0 {
            let old = std::fs::read_to_string(ENABLE_URING).with_context(|| {
                format!("read {ENABLE_URING} (kernel without FUSE over io_uring?)")
            })?;
            let old = old.trim().to_owned();
            if old != "Y" {
                std::fs::write(ENABLE_URING, "Y")
                    .with_context(|| format!("write Y to {ENABLE_URING}"))?;
                st.1 = Some(old);
            }
        }
        st.0 += 1;
        Ok(Self(()))
    }
}

impl Drop for EnableUring {
    fn drop(&mut self) {
        let mut st = STATE.lock().unwrap_or_else(PoisonError::into_inner);
        st.0 = st.0.saturating_sub(1);
        if st.0 == 0 {
            if let Some(old) = st.1.take() {
                if let Err(e) = std::fs::write(ENABLE_URING, &old) {
                    eprintln!("restoring {ENABLE_URING} to {old}: {e}");
                }
            }
        }
    }
}
