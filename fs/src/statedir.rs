//! A node's persistent metadata directory: an exclusive lock, so that two vmha-fs
//! processes never serve the same state, and the markers that must survive a crash.
//!
//! What vmhad reads here is the contract of [`crate::status`] (file names and
//! content types, shared with the readers):
//! - `peer-outdated`: the peer's copy lacks changes made here (first reason kept);
//! - `self-outdated`: this node's own copy is behind (its disk failed while it
//!   wrote); a primary refuses to start on it, a secondary reports an unknown
//!   history (full compare) and removes it once in sync;
//! - `link.json`: `{"state", "reason"}` of the primary's link; `disk_failed` when
//!   this node's disk failed (the module must run on the peer); a standby mount
//!   writes `{"standby": true, "state": "standby"}` there (and `activation`
//!   after a failed one) without this type, since the receiver holds the lock
//!   until it exits ([`StateDir::wait_for_lock`] takes it over then);
//! - `sync.json`, `verify.json`, `changed_bytes`: progress and reports.
//!
//! Every file is replaced whole through [`crate::atomic`].

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};

use parking_lot::Mutex;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::FlockOperation;

pub use crate::status::SELF_OUTDATED;
use crate::status::{
    ChangedBytes, GenerationId, LinkStatus, StatusFile, SyncPhase, COMPARE_RESYNC, GENERATION,
    LOCK, PEER_OUTDATED,
};

/// Errors opening or writing the state directory.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot use state directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state directory {0} is in use by another vmha-fs process")]
    Locked(PathBuf),
}

/// The state directory's lock, awaited ([`StateDir::wait_for_lock`]).
#[derive(Debug)]
pub struct LockWaiter {
    path: PathBuf,
    held: Arc<std::sync::OnceLock<File>>,
}

impl LockWaiter {
    /// Whether the lock is held (the receiver exited).
    pub fn is_held(&self) -> bool {
        self.held.get().is_some()
    }

    /// The state directory, once the lock is held (it stays held by the
    /// waiter whatever becomes of the returned value); `Locked` before.
    pub fn open(&self) -> Result<StateDir, StateError> {
        let Some(lock) = self.held.get() else {
            return Err(StateError::Locked(self.path.clone()));
        };
        let lock = lock.try_clone().map_err(|source| StateError::Io {
            path: self.path.clone(),
            source,
        })?;
        Ok(StateDir {
            path: self.path.clone(),
            _lock: lock,
            writing: Mutex::new(()),
        })
    }
}

/// An opened, exclusively locked state directory.
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
    _lock: File,
    /// Serialises writers of the marker files.
    writing: Mutex<()>,
}

impl StateDir {
    pub fn open(path: &Path) -> Result<Self, StateError> {
        let io = |source| StateError::Io {
            path: path.to_path_buf(),
            source,
        };
        // Explicit private modes (a umask can only narrow them).
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(io)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(path.join(LOCK))
            .map_err(io)?;
        match rustix::fs::flock(lock.as_fd(), FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => return Err(StateError::Locked(path.into())),
            Err(e) => return Err(io(e.into())),
        }
        Ok(Self {
            path: path.to_path_buf(),
            _lock: lock,
            writing: Mutex::new(()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits in a thread of its own for the state directory's lock (held by
    /// this node's receiver while a standby mount serves the directory): taken
    /// as soon as the receiver exits, and kept until this process ends, so the
    /// directory is never without a vmha-fs holding it (the controller cleans
    /// up a mount only when nobody holds the lock). Opening the lock file
    /// writes nothing.
    pub fn wait_for_lock(path: &Path) -> Result<LockWaiter, StateError> {
        let io = |source| StateError::Io {
            path: path.to_path_buf(),
            source,
        };
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(path.join(LOCK))
            .map_err(io)?;
        let held: Arc<std::sync::OnceLock<File>> = Arc::default();
        let slot = held.clone();
        let shown = path.display().to_string();
        std::thread::Builder::new()
            .name("state-lock".into())
            .spawn(
                move || match rustix::fs::flock(lock.as_fd(), FlockOperation::LockExclusive) {
                    Ok(()) => {
                        tracing::info!(
                            state = shown,
                            "the receiver released the state directory; holding its lock"
                        );
                        let _ = slot.set(lock);
                    }
                    Err(e) => tracing::error!(
                        state = shown,
                        "cannot wait for the state directory's lock: {e}"
                    ),
                },
            )
            .map_err(io)?;
        Ok(LockWaiter {
            path: path.to_path_buf(),
            held,
        })
    }

    /// Records durably that the peer's copy can no longer be trusted, and why.
    /// The first reason is kept: later ones are consequences of it.
    pub fn mark_peer_outdated(&self, reason: &str) -> Result<(), StateError> {
        let _one_writer = self.writing.lock();
        if self.peer_outdated().is_some() {
            return Ok(());
        }
        self.write_atomically(PEER_OUTDATED, reason.as_bytes())
    }

    /// The peer is a replica again (a full sync finished).
    pub fn clear_peer_outdated(&self) -> Result<(), StateError> {
        self.remove_marker(PEER_OUTDATED)
    }

    /// Records durably that this node's own copy is not up to date, and why (the
    /// first reason is kept). Fails when the state directory's disk fails too:
    /// the caller keeps the fact in memory and in its status then.
    pub fn mark_self_outdated(&self, reason: &str) -> Result<(), StateError> {
        let _one_writer = self.writing.lock();
        if self.self_outdated().is_some() {
            return Ok(());
        }
        self.write_atomically(SELF_OUTDATED, reason.as_bytes())
    }

    /// The reason recorded by `mark_self_outdated`, if any.
    pub fn self_outdated(&self) -> Option<String> {
        std::fs::read_to_string(self.path.join(SELF_OUTDATED)).ok()
    }

    /// This copy is identical to the writer's again (a resync finished).
    pub fn clear_self_outdated(&self) -> Result<(), StateError> {
        self.remove_marker(SELF_OUTDATED)
    }

    /// Why the next attach must compare every block (`COMPARE_RESYNC`), if asked.
    pub fn compare_requested(&self) -> Option<String> {
        std::fs::read_to_string(self.path.join(COMPARE_RESYNC)).ok()
    }

    /// A compare resync finished: later attaches trust the records again.
    pub fn clear_compare_request(&self) -> Result<(), StateError> {
        self.remove_marker(COMPARE_RESYNC)
    }

    fn remove_marker(&self, name: &str) -> Result<(), StateError> {
        let _one_writer = self.writing.lock();
        let path = self.path.join(name);
        crate::atomic::remove(&path).map_err(|source| StateError::Io { path, source })
    }

    /// The data generation the controller wrote for this node, if any (an
    /// invalid file counts as none).
    pub fn generation(&self) -> Option<GenerationId> {
        let bytes = std::fs::read(self.path.join(GENERATION)).ok()?;
        GenerationId::from_file(&bytes)
    }

    /// `sync.json`: where a full sync stands, for the controller.
    pub fn write_sync_status(
        &self,
        state: SyncPhase,
        progress: &crate::status::SyncProgress,
        error: Option<&str>,
    ) {
        self.write_status(&progress.status(state, error));
    }

    /// `link.json`: where the replication link stands, for the controller (it acts
    /// on `lost`/`failed` while heartbeats still arrive, and on `fenced`). Written
    /// whenever the state changes; the last state wins.
    pub fn write_link_status(&self, status: &LinkStatus) {
        self.write_status(status);
    }

    /// Writes one of the JSON status files durably (a failure is logged: the
    /// reader keeps the previous state).
    pub fn write_status<T: StatusFile>(&self, status: &T) {
        if let Err(e) = self.write_atomically(T::FILE, &status.encode()) {
            tracing::warn!("cannot write {}: {e}", T::FILE);
        }
    }

    /// A JSON status file that is a report (`metrics.json`): replaced by
    /// rename, never half-written, not fsynced (a failure is logged).
    pub fn write_report<T: StatusFile>(&self, status: &T) {
        let path = self.path.join(T::FILE);
        if let Err(e) = crate::atomic::write_report(&path, &status.encode()) {
            tracing::warn!("cannot write {}: {e}", path.display());
        }
    }

    /// `changed_bytes`: bytes the dirty records mark as differing from the peer.
    /// Replaced by rename (never half-written); not fsynced: it is a report.
    pub fn write_changed_bytes(&self, bytes: u64) {
        let path = self.path.join(ChangedBytes::FILE);
        if let Err(e) = crate::atomic::write_report(&path, &ChangedBytes(bytes).encode()) {
            tracing::warn!("cannot write {}: {e}", path.display());
        }
    }

    /// The reason recorded by `mark_peer_outdated`, if any.
    pub fn peer_outdated(&self) -> Option<String> {
        std::fs::read_to_string(self.path.join(PEER_OUTDATED)).ok()
    }

    fn write_atomically(&self, name: &str, content: &[u8]) -> Result<(), StateError> {
        let path = self.path.join(name);
        crate::atomic::write(&path, content).map_err(|source| StateError::Io { path, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_open_is_refused_and_markers_persist() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        assert!(matches!(
            StateDir::open(dir.path()),
            Err(StateError::Locked(_))
        ));
        assert_eq!(state.peer_outdated(), None);
        state
            .mark_peer_outdated("lost with 3 writes in flight")
            .unwrap();
        state.mark_peer_outdated("a later consequence").unwrap();
        let mode = |name: &str| {
            std::os::unix::fs::PermissionsExt::mode(
                &std::fs::metadata(dir.path().join(name))
                    .unwrap()
                    .permissions(),
            ) & 0o777
        };
        assert_eq!(mode("lock"), 0o600);
        assert_eq!(mode("peer-outdated"), 0o600);
        drop(state);
        let again = StateDir::open(dir.path()).unwrap();
        assert_eq!(
            again.peer_outdated().as_deref(),
            Some("lost with 3 writes in flight")
        );
    }
}
