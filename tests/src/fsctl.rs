//! Driving a running `vmha-fs` as its controller does: signals, and the status
//! files it writes in its state directory (`sync.json`, `verify.json`), read
//! through vmha-fs's own types ([`vmha_fs::status`]).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use vmha_fs::status::{
    LinkCondition, LinkStatus, StatusFile, SyncPhase, SyncStatus, VerifyPhase, VerifyStatus,
};

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

/// Removes `state/T::FILE`, sends `sig` to `primary`, then waits until the file
/// (decoded with vmha-fs's own type) is `done` (returned) or `failed` (an error).
fn signal_and_wait<T: StatusFile + std::fmt::Debug>(
    primary: &Child,
    state: &Path,
    sig: libc::c_int,
    done: impl Fn(&T) -> bool,
    failed: impl Fn(&T) -> bool,
) -> Result<T> {
    let file = T::FILE;
    let _ = std::fs::remove_file(state.join(file));
    signal(primary.pid(), sig)?;
    let deadline = Instant::now() + SYNC_FILE_TIMEOUT;
    loop {
        // Absent until written, never half-written (replaced by rename).
        if let Ok(Some(s)) = T::read_from(state) {
            if done(&s) {
                return Ok(s);
            }
            if failed(&s) {
                bail!("{file}: {s:?}");
            }
        }
        if Instant::now() > deadline {
            bail!("{file} not done within {SYNC_FILE_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SIGUSR1 (the peer is declared dead: write alone) and wait until `link.json`
/// says so (signals that arrive together may be handled in any order: a SIGUSR2
/// sent right after must not overtake it).
pub fn go_alone_and_wait(primary: &Child, state: &Path) -> Result<()> {
    signal(primary.pid(), libc::SIGUSR1)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(link)) = LinkStatus::read_from(state) {
            if link.state == LinkCondition::Degraded {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("link.json not degraded 30 s after SIGUSR1");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGUSR2 (attach the peer and resync) and wait for `in_sync`; returns sync.json.
pub fn attach_and_wait(primary: &Child, state: &Path) -> Result<SyncStatus> {
    signal_and_wait(
        primary,
        state,
        libc::SIGUSR2,
        |s: &SyncStatus| s.state == SyncPhase::InSync,
        |s: &SyncStatus| s.state == SyncPhase::Alone,
    )
}

/// SIGHUP (compare with the peer, report only) and wait; returns verify.json.
pub fn verify(primary: &Child, state: &Path) -> Result<VerifyStatus> {
    signal_and_wait(
        primary,
        state,
        libc::SIGHUP,
        |s: &VerifyStatus| s.state == VerifyPhase::Done,
        |s: &VerifyStatus| s.state == VerifyPhase::Failed,
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

/// The primary's last `sync done` log line, colour codes removed.
pub fn last_sync_line(primary: &Child) -> Result<String> {
    primary
        .stderr_lines()
        .iter()
        .rev()
        .map(|l| crate::proc::strip_ansi(l))
        .find(|l| l.contains("sync done"))
        .ok_or_else(|| anyhow!("the primary logged no `sync done`"))
}

/// The primary's own word on the last resync: `incremental=true` or `=false`.
pub fn last_sync_was_incremental(primary: &Child) -> Result<bool> {
    let line = last_sync_line(primary)?;
    if line.contains("incremental=true") {
        Ok(true)
    } else if line.contains("incremental=false") {
        Ok(false)
    } else {
        bail!("cannot tell from {line:?}")
    }
}
