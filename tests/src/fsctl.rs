//! Driving a running `vmha-fs` as its controller does: signals, and the status
//! files it writes in its state directory (`sync.json`, `verify.json`).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::proc::Child;

/// How long a resync or a verify of the test images may take.
pub const SYNC_FILE_TIMEOUT: Duration = Duration::from_secs(300);

/// Sends `sig` to `pid` (a process the test started).
pub fn signal(pid: u32, sig: libc::c_int) -> Result<()> {
    // SAFETY: kill(2) on a PID of a child the test started; no memory is involved.
    if unsafe { libc::kill(pid as libc::pid_t, sig) } != 0 {
        bail!("kill {sig} {pid}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Removes `state/file`, sends `sig` to `primary`, then waits until the file says
/// `done_state` (returned) or `failed_state` (an error).
fn signal_and_wait(
    primary: &Child,
    state: &Path,
    sig: libc::c_int,
    file: &str,
    done_state: &str,
    failed_state: &str,
) -> Result<serde_json::Value> {
    let path = state.join(file);
    let _ = std::fs::remove_file(&path);
    signal(primary.pid(), sig)?;
    let deadline = Instant::now() + SYNC_FILE_TIMEOUT;
    loop {
        if let Ok(text) = std::fs::read_to_string(&path) {
            if let Ok(s) = serde_json::from_str::<serde_json::Value>(&text) {
                match s["state"].as_str() {
                    Some(x) if x == done_state => return Ok(s),
                    Some(x) if x == failed_state => bail!("{file}: {s}"),
                    _ => {}
                }
            }
        }
        if Instant::now() > deadline {
            bail!("{file} not `{done_state}` within {SYNC_FILE_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SIGUSR2 (attach the peer and resync) and wait for `in_sync`; returns sync.json.
pub fn attach_and_wait(primary: &Child, state: &Path) -> Result<serde_json::Value> {
    signal_and_wait(
        primary,
        state,
        libc::SIGUSR2,
        "sync.json",
        "in_sync",
        "alone",
    )
}

/// SIGHUP (compare with the peer, report only) and wait; returns verify.json.
pub fn verify(primary: &Child, state: &Path) -> Result<serde_json::Value> {
    signal_and_wait(
        primary,
        state,
        libc::SIGHUP,
        "verify.json",
        "done",
        "failed",
    )
}

/// SIGTERM and a clean exit within 30 s.
pub fn stop(child: &mut Child) -> Result<()> {
    signal(child.pid(), libc::SIGTERM)?;
    let st = child.wait_exit(Duration::from_secs(30))?;
    if !st.success() {
        bail!("{} exited {st}: {}", child.name(), child.stderr_text());
    }
    Ok(())
}
