//! The per-module event log (design, "Interfaces"): state changes with their
//! reasons, driver output and errors. Kept in a ring buffer for `vmctl log`
//! and appended to `<state_dir>/<module>/events.log` (mode 0600).

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use crate::clock::WallClock;

/// Lines kept in memory per module.
pub const RING_LINES: usize = 1000;

/// Errors writing the event log file.
#[derive(Debug, thiserror::Error)]
pub enum EventLogError {
    #[error("cannot write event log {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One module's event log.
#[derive(Debug)]
pub struct EventLog {
    path: PathBuf,
    ring: Mutex<VecDeque<String>>,
    clock: WallClock,
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` (RFC 3339, UTC, milliseconds).
pub fn timestamp(now: SystemTime) -> String {
    humantime::format_rfc3339_millis(now).to_string()
}

impl EventLog {
    /// The log of `module` under `state_dir` (the file is created on first write).
    pub fn new(state_dir: &Path, module: &str) -> EventLog {
        EventLog::with_clock(state_dir, module, WallClock::system())
    }

    /// [`EventLog::new`] with timestamps from `clock`.
    pub fn with_clock(state_dir: &Path, module: &str, clock: WallClock) -> EventLog {
        EventLog {
            path: state_dir.join(module).join("events.log"),
            ring: Mutex::new(VecDeque::with_capacity(RING_LINES)),
            clock,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records a line (timestamped) in memory and in the file. Blocking: call
    /// from `spawn_blocking` in async code. The line is kept in memory even
    /// when the file cannot be written.
    pub fn append(&self, line: &str) -> Result<(), EventLogError> {
        let line = format!("{} {}", timestamp(self.clock.now()), line.trim_end());
        {
            let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
            if ring.len() == RING_LINES {
                ring.pop_front();
            }
            ring.push_back(line.clone());
        }
        let err = |source| EventLogError::Write {
            path: self.path.clone(),
            source,
        };
        if let Some(dir) = self.path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(err)?;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)
            .map_err(err)?;
        writeln!(file, "{line}").map_err(err)
    }

    /// The lines in memory, oldest first.
    pub fn lines(&self) -> Vec<String> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn ring_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::new(dir.path(), "vm1");
        for i in 0..RING_LINES + 5 {
            log.append(&format!("line {i}")).unwrap();
        }
        let lines = log.lines();
        assert_eq!(lines.len(), RING_LINES);
        assert!(lines[0].ends_with(" line 5"));
        let file = std::fs::read_to_string(dir.path().join("vm1/events.log")).unwrap();
        assert_eq!(file.lines().count(), RING_LINES + 5);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(log.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn timestamps() {
        assert_eq!(timestamp(std::time::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = std::time::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(timestamp(t), "2023-11-14T22:13:20.123Z");
    }
}
