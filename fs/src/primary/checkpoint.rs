//! Retiring activity-log entries once both copies are durable.
//!
//! "Durable" means what this writer changed, not the whole filesystem: this
//! node's changed files and directories are synced ([`crate::syncset`]) while
//! the peer syncs its own (`SyncAll`), at the same time. A `syncfs` here made
//! every checkpoint, and the stop (SIGTERM: unmount, last checkpoint, drain),
//! wait for every other program's unsynced data on the same filesystem (the
//! bench's ~15 s exits after SIGTERM).

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::DiskHealth;
use crate::link::PeerLink;
use crate::syncset::SyncSet;
use crate::track::Tracker;

/// Retires activity-log entries once both copies are durable: when the log is full,
/// at a clean stop, and every few seconds while writing alone.
#[derive(Clone)]
pub(crate) struct Checkpointer {
    pub(crate) tracker: Arc<Tracker>,
    pub(crate) link: PeerLink,
    pub(crate) disk: Arc<DiskHealth>,
    pub(crate) root: Arc<std::os::fd::OwnedFd>,
    /// What this node changed since the last checkpoint (synced instead of the
    /// whole filesystem: see [`crate::syncset`]).
    pub(crate) changed: Arc<SyncSet>,
    pub(crate) stop: Arc<AtomicBool>,
}

impl Checkpointer {
    const INTERVAL: Duration = Duration::from_secs(5);
    const RETRY: Duration = Duration::from_millis(100);

    pub(crate) fn run(&self) {
        let mut last = std::time::Instant::now();
        while !self.stop.load(Ordering::SeqCst) {
            let full = self
                .tracker
                .wait_checkpoint_request(Duration::from_millis(1000));
            // Connected, extents leave the log only when it is full (DRBD's hot
            // set): retiring hot extents on a timer would make every write to them
            // log them again (measured: seqwrite 0.54× → 0.37× of local). Writing
            // alone, a timer also writes the exact blocks, so a crash folds little.
            let alone = self.link.state().writes_alone();
            if full || (alone && last.elapsed() >= Self::INTERVAL) {
                last = std::time::Instant::now();
                if !self.once() {
                    // A full log asks again at once: without a pause a failing disk
                    // or a lost peer would make this loop spin.
                    std::thread::sleep(Self::RETRY);
                }
            }
        }
    }

    /// One checkpoint; false if it could not complete. Connected, both copies are
    /// made durable first; writing alone, only the dirty maps' pending blocks.
    pub(crate) fn once(&self) -> bool {
        self.checkpoint(false)
    }

    /// The clean stop's checkpoint: as [`Self::once`], and what it waits for
    /// (each copy's flush of the data written since the last checkpoint) is
    /// logged with its duration.
    pub(crate) fn at_stop(&self) -> bool {
        self.checkpoint(true)
    }

    fn checkpoint(&self, visible: bool) -> bool {
        use crate::link::LinkState;
        // A failed sync is never retried into success: on a failed disk the
        // logged extents stay logged (the resync then compares everything anyway).
        if self.disk.is_failed() {
            return false;
        }
        let connected = match self.link.state() {
            LinkState::Connected | LinkState::Syncing => true,
            LinkState::Degraded | LinkState::Attaching => false,
            LinkState::Lost | LinkState::Failed(_) => return false,
        };
        let (epoch, idle) = match self.tracker.checkpoint_begin() {
            Ok(Some(begun)) => begun,
            Ok(None) => return true,
            Err(e) => {
                tracing::error!("checkpoint: {e}");
                return false;
            }
        };
        if connected && !self.sync_both(visible) {
            return false;
        }
        match self.tracker.checkpoint_end(epoch, idle) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!("checkpoint: {e}");
                false
            }
        }
    }

    /// Makes everything written so far durable on both nodes: this node's
    /// sync of what it changed and the peer's (a `SyncAll`) run at the same
    /// time, so a checkpoint costs the slower of the two flushes, not their sum.
    fn sync_both(&self, visible: bool) -> bool {
        use crate::link::LinkState;
        let began = Instant::now();
        if visible {
            tracing::info!(
                extents = self.tracker.activity_len(),
                "stopping: waiting for both copies to flush what was written since the last checkpoint"
            );
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        let submitted = self.link.submit(
            crate::op::Control::SyncAll,
            Box::new(move |result| {
                let _ = tx.send(result);
            }),
        );
        let (whole, nodes) = self.changed.pending();
        let local = self
            .disk
            .watch("checkpoint sync", self.changed.sync(self.root.as_fd()));
        let local_ms = began.elapsed().as_millis();
        if let Err(e) = local {
            tracing::warn!("checkpoint: local sync failed: {e}");
            return false;
        }
        let peer = submitted.and_then(|()| rx.recv().unwrap_or(Err(rustix::io::Errno::IO)));
        if let Err(e) = peer {
            tracing::debug!("checkpoint: the peer did not sync: {e}");
            return false;
        }
        // Still sending: the SyncAll really reached the peer (not completed locally).
        if !matches!(self.link.state(), LinkState::Connected | LinkState::Syncing) {
            return false;
        }
        let total_ms = began.elapsed().as_millis();
        if visible {
            tracing::info!(
                local_ms,
                total_ms,
                whole_filesystem = whole,
                nodes,
                "stopping: both copies flushed"
            );
        } else {
            tracing::debug!(
                local_ms,
                total_ms,
                whole_filesystem = whole,
                nodes,
                "checkpoint: both copies flushed"
            );
        }
        true
    }
}
