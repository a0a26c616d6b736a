//! A node's persistent metadata directory: an exclusive lock, so that two vmha-fs
//! processes never serve the same state, and the markers that must survive a crash.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};

use parking_lot::Mutex;
use std::path::{Path, PathBuf};

use rustix::fs::FlockOperation;

const LOCK_FILE: &str = "lock";
const PEER_OUTDATED: &str = "peer-outdated";

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
        // Explicit modes: the process runs with umask 0 (modes come from the kernel).
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

    /// The reason recorded by `mark_peer_outdated`, if any.
    pub fn peer_outdated(&self) -> Option<String> {
        std::fs::read_to_string(self.path.join(PEER_OUTDATED)).ok()
    }

    /// write + fsync + rename + fsync(dir): the file is either old or new after a crash.
    fn write_atomically(&self, name: &str, content: &[u8]) -> Result<(), StateError> {
        let io = |source| StateError::Io {
            path: self.path.join(name),
            source,
        };
        let tmp = self.path.join(format!(".{name}.tmp"));
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        file.write_all(content).map_err(io)?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&tmp, self.path.join(name)).map_err(io)?;
        File::open(&self.path)
            .and_then(|dir| dir.sync_all())
            .map_err(io)
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
