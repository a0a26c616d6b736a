//! The health of this node's own disk, as the primary's local I/O reports it.
//!
//! Why a place of its own: a local failure must never be read as "the peer is
//! outdated" (the old rule in the joint, which made a node with a broken disk
//! carry on alone and later copy its bad copy over the good one). Which side is
//! behind is decided here: a media error (EIO, or EROFS from a filesystem that
//! shut down) means this node's copy can no longer be trusted. From the first one
//! on, this node records **itself** as not up to date (the hook writes
//! `STATEDIR/self-outdated` when that disk still takes writes; the status shows it
//! either way), every later mutation and fsync fails with EIO (no fsync is ever
//! answered on the strength of a disk that lost pages: the fsync-after-EIO trap),
//! and the controller fails the module over to the peer, which holds every
//! acknowledged write.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use crate::apply::Errno;

/// True for the errors that mean the local disk failed (not a full disk, not a
/// request the filesystem refuses).
pub fn is_media_error(e: Errno) -> bool {
    e == Errno::IO || e == Errno::ROFS
}

/// True for the errors of a full disk or quota: one side may fail them alone
/// and the copies are then made equal again instead of declaring either dead.
pub fn is_space_error(e: Errno) -> bool {
    e == Errno::NOSPC || e == Errno::DQUOT
}

/// Called once, with the reason, when the local disk is found failed.
pub type FailureHook = Box<dyn Fn(&str) + Send + Sync>;

/// Whether this node's disk failed; set once, never cleared (a repaired disk
/// comes back through a new process that joins as the secondary).
pub struct DiskHealth {
    failed: OnceLock<String>,
    reported: AtomicBool,
    on_failure: FailureHook,
}

impl std::fmt::Debug for DiskHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskHealth")
            .field("failed", &self.failed.get())
            .finish()
    }
}

impl Default for DiskHealth {
    fn default() -> Self {
        Self::new(Box::new(|_| {}))
    }
}

impl DiskHealth {
    pub fn new(on_failure: FailureHook) -> Self {
        Self {
            failed: OnceLock::new(),
            reported: AtomicBool::new(false),
            on_failure,
        }
    }

    /// The reason the disk failed, if it did.
    pub fn failure(&self) -> Option<&str> {
        self.failed.get().map(String::as_str)
    }

    pub fn is_failed(&self) -> bool {
        self.failed.get().is_some()
    }

    /// EIO once the disk failed: nothing may be changed or synced on it any more.
    pub fn check(&self) -> Result<(), Errno> {
        if self.is_failed() {
            Err(Errno::IO)
        } else {
            Ok(())
        }
    }

    /// Records that the local disk failed `what` with `e`. The first reason is
    /// kept; the hook runs once.
    pub fn fail(&self, what: &str, e: Errno) {
        let reason = format!("local disk failed: {what}: {e}");
        let first = self.failed.set(reason).is_ok();
        if first && !self.reported.swap(true, Ordering::SeqCst) {
            let reason = self.failure().unwrap_or_default();
            tracing::error!(
                reason,
                "this node's copy is no longer up to date; every change fails until the module runs elsewhere"
            );
            (self.on_failure)(reason);
        }
    }

    /// Passes `result` through, recording a media error as a disk failure.
    pub fn watch<T>(&self, what: &str, result: Result<T, Errno>) -> Result<T, Errno> {
        if let Err(e) = &result {
            if is_media_error(*e) {
                self.fail(what, *e);
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    #[test]
    fn a_media_error_fails_the_disk_once_and_blocks_changes() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let disk = DiskHealth::new(Box::new(move |_| {
            c.fetch_add(1, Ordering::SeqCst);
        }));
        assert_eq!(disk.check(), Ok(()));
        assert_eq!(
            disk.watch("write", Err::<(), _>(Errno::NOSPC)),
            Err(Errno::NOSPC)
        );
        assert!(!disk.is_failed(), "a full disk is not a failed disk");
        assert_eq!(disk.watch("write", Err::<(), _>(Errno::IO)), Err(Errno::IO));
        assert_eq!(
            disk.watch("fsync", Err::<(), _>(Errno::ROFS)),
            Err(Errno::ROFS)
        );
        assert!(disk.failure().is_some_and(|r| r.contains("write")));
        assert_eq!(disk.check(), Err(Errno::IO));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
