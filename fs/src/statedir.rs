//! A node's persistent metadata directory: an exclusive lock, so that two vmha-fs
//! processes never serve the same state, and the markers that must survive a crash.
//!
//! What vmhad reads here (the contract between the two processes):
//! - `peer-outdated`: the peer's copy lacks changes made here (first reason kept);
//! - `self-outdated`: this node's own copy is behind (its disk failed while it
//!   wrote); a primary refuses to start on it, a secondary reports an unknown
//!   history (full compare) and removes it once in sync;
//! - `link.json`: `{"state", "reason"}` of the primary's link; `disk_failed` when
//!   this node's disk failed (the module must run on the peer);
//! - `sync.json`, `verify.json`, `changed_bytes`: progress and reports.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};

use parking_lot::Mutex;
use std::path::{Path, PathBuf};

use rustix::fs::FlockOperation;

const LOCK_FILE: &str = "lock";
const PEER_OUTDATED: &str = "peer-outdated";
/// This node's own copy is not up to date (its disk failed while it wrote):
/// written by the primary, honoured by the receiver (full compare), removed when
/// a resync made the copy identical again.
pub const SELF_OUTDATED: &str = "self-outdated";
const LINK_STATUS: &str = "link.json";

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
            .open(path.join(LOCK_FILE))
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

    fn remove_marker(&self, name: &str) -> Result<(), StateError> {
        let _one_writer = self.writing.lock();
        let path = self.path.join(name);
        let io = |source| StateError::Io {
            path: path.clone(),
            source,
        };
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io(e)),
        }
        File::open(&self.path)
            .and_then(|d| d.sync_all())
            .map_err(io)
    }

    /// The data generation the controller wrote for this node, if any.
    pub fn generation(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.path.join("generation")).ok()?;
        let text = text.trim();
        (!text.is_empty() && text.len() <= 64 && text.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| text.to_ascii_lowercase())
    }

    /// `sync.json`: where a full sync stands, for the controller.
    pub fn write_sync_status(
        &self,
        state: &str,
        progress: &crate::resync::SyncProgress,
        error: Option<&str>,
    ) {
        use std::sync::atomic::Ordering::Relaxed;
        let json = serde_json::json!({
            "state": state,
            "done_bytes": progress.done_bytes.load(Relaxed),
            "total_bytes": progress.total_bytes.load(Relaxed),
            "error": error,
        });
        if let Err(e) = self.write_atomically("sync.json", format!("{json}\n").as_bytes()) {
            tracing::warn!("cannot write sync status: {e}");
        }
    }

    /// `link.json`: where the replication link stands, for the controller (it acts
    /// on `lost`/`failed` while heartbeats still arrive, and on `fenced`). Written
    /// whenever the state changes; the last state wins.
    pub fn write_link_status(&self, state: &str, reason: Option<&str>) {
        let json = serde_json::json!({ "state": state, "reason": reason });
        if let Err(e) = self.write_atomically(LINK_STATUS, format!("{json}\n").as_bytes()) {
            tracing::warn!("cannot write link status: {e}");
        }
    }

    /// `changed_bytes`: bytes the dirty records mark as differing from the peer.
    /// Replaced by rename (never half-written); not fsynced: it is a report.
    pub fn write_changed_bytes(&self, bytes: u64) {
        let (tmp, path) = (
            self.path.join(".changed_bytes.tmp"),
            self.path.join("changed_bytes"),
        );
        let written = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| f.write_all(format!("{bytes}\n").as_bytes()))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::warn!("cannot write {}: {e}", path.display());
        }
    }

    /// The reason recorded by `mark_peer_outdated`, if any.
    pub fn peer_outdated(&self) -> Option<String> {
        std::fs::read_to_string(self.path.join(PEER_OUTDATED)).ok()
    }

    fn write_atomically(&self, name: &str, content: &[u8]) -> Result<(), StateError> {
        let path = self.path.join(name);
        write_file_atomically(&path, content).map_err(|source| StateError::Io { path, source })
    }
}

/// The one way node metadata reaches the disk: write a temporary file (mode 0600),
/// fsync it, rename it over `path`, fsync the directory. After a crash the file is
/// either the old or the new one, never a mix.
pub fn write_file_atomically(path: &Path, content: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(content)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
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
