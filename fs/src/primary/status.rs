//! `STATEDIR/link.json`: where the primary's link stands, for the controller;
//! and, from the same thread, `changed_bytes` and `metrics.json` (the write
//! path's counters, for `/metrics`) at most once a second.

use std::sync::Arc;
use std::time::Duration;

use super::metrics::PrimaryMetrics;
use super::DiskHealth;
use crate::link::{LinkState, PeerLink};
use crate::runtime::RunError;
use crate::statedir::StateDir;
use crate::status::{LinkCondition, LinkStatus};
use crate::track::Tracker;

/// Set when the peer's receiver refused our generation (fencing); cleared by the
/// next attach.
pub(crate) type Fenced = Arc<parking_lot::Mutex<Option<String>>>;

/// The link's state as `STATEDIR/link.json` names it; `stalled` when connected
/// without any acknowledgement for `stall` while work waits (the replication
/// network may be down: no error reaches us, writes just wait); `fenced` while
/// the last attach was refused for a stale generation and the link writes alone.
fn link_status(link: &PeerLink, disk: &DiskHealth, fenced: &Fenced, stall: Duration) -> LinkStatus {
    let status = LinkStatus::writer;
    if let Some(failure) = disk.failure() {
        return status(LinkCondition::DiskFailed, Some(failure.to_string()));
    }
    match link.state() {
        LinkState::Connected if link.stalled_for().is_some_and(|d| d >= stall) => status(
            LinkCondition::Stalled,
            Some(format!(
                "no acknowledgement for over {} ms",
                stall.as_millis()
            )),
        ),
        LinkState::Connected => status(LinkCondition::Connected, None),
        LinkState::Lost => status(LinkCondition::Lost, None),
        LinkState::Failed(reason) => status(LinkCondition::Failed, Some(reason)),
        LinkState::Degraded => match fenced.lock().clone() {
            Some(reason) => status(LinkCondition::Fenced, Some(reason)),
            None => status(LinkCondition::Degraded, None),
        },
        LinkState::Attaching => status(LinkCondition::Attaching, None),
        LinkState::Syncing => status(LinkCondition::Syncing, None),
    }
}

const LINK_STATUS_BUSY: Duration = Duration::from_millis(25);
const LINK_STATUS_IDLE: Duration = Duration::from_millis(1000);

/// How long the write path's counters must stand still before the allocator's
/// free memory is returned to the system.
const TRIM_AFTER_IDLE: Duration = Duration::from_secs(10);

/// Returns the allocator's free memory to the system: glibc keeps what the
/// replication window's buffers (up to `MAX_INFLIGHT_BYTES` of written data, in
/// per-thread arenas) used, so a writer stays at its peak resident size after a
/// burst of writes. On an idle writer that costs ~130 MiB per module for nothing.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes no pointers; it only walks the allocator's own
        // free lists under their locks.
        let released = unsafe { libc::malloc_trim(0) };
        tracing::debug!(released, "idle: free memory returned to the system");
    }
}

/// Writes `link.json` now and on every change after (polled: the link's hot
/// path stays free of file writes). A stall is reported after half the lock
/// timeout, leaving the controller the other half to mark the peer outdated
/// and send SIGUSR1. The thread ends with the process.
pub(crate) fn publish_link_status(
    link: PeerLink,
    disk: Arc<DiskHealth>,
    state: Arc<StateDir>,
    fenced: Fenced,
    lock_timeout: Duration,
    tracker: Arc<Tracker>,
    metrics: Arc<PrimaryMetrics>,
) -> Result<(), RunError> {
    let stall = lock_timeout / 2;
    let mut last = link_status(&link, &disk, &fenced, stall);
    state.write_link_status(&last);
    let mut changed = (u64::MAX, std::time::Instant::now());
    let mut published: Option<crate::status::FsMetrics> = None;
    // When the write path's counters last moved; whether memory was trimmed since.
    let mut moved = (std::time::Instant::now(), false);
    std::thread::Builder::new()
        .name("link-status".into())
        .spawn(move || loop {
            // Woken by every change of the link; idle, about once a second. While
            // work is outstanding, often enough to report a stall on time, and
            // never more than every 25 ms.
            let started = std::time::Instant::now();
            let busy = link.stalled_for().is_some();
            // A stall begins without a wake-up (work is queued silently): the
            // idle wait is short enough to see it well before it is reported.
            link.wait_changed(if busy {
                LINK_STATUS_BUSY
            } else {
                LINK_STATUS_IDLE.min(stall / 4)
            });
            std::thread::sleep(LINK_STATUS_BUSY.saturating_sub(started.elapsed()));
            let now = link_status(&link, &disk, &fenced, stall);
            if now != last {
                state.write_link_status(&now);
                last = now;
            }
            // Bytes changed without the peer, for the controller (at most once a
            // second; informational, not fsynced).
            if changed.1.elapsed() >= Duration::from_secs(1) {
                let bytes = tracker.changed_bytes();
                if bytes != changed.0 {
                    state.write_changed_bytes(bytes);
                }
                changed = (bytes, std::time::Instant::now());
                // The write path's counters, only when they moved (a report:
                // replaced by rename, not fsynced).
                let now = metrics.snapshot(tracker.activity_log_writes(), bytes);
                if published.as_ref() != Some(&now) {
                    state.write_report(&now);
                    published = Some(now);
                    moved = (std::time::Instant::now(), false);
                }
                // Idle for a while after writing: give the allocator's free memory
                // back (the replication window's buffers, ~130 MiB after a burst),
                // once per idle period.
                if !moved.1 && moved.0.elapsed() >= TRIM_AFTER_IDLE {
                    release_free_memory();
                    moved.1 = true;
                }
            }
        })
        .map(drop)
        .map_err(|e| RunError::Other(format!("cannot start link status thread: {e}")))
}
