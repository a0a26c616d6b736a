//! The per-module event log (design, "Interfaces"): state changes with their
//! reasons, driver output and errors, each line prefixed with what caused it
//! (`[vmctl stop by root (uid 0) pid 12]`, `[peer lost]`, `[checker]`, ...).
//! Kept in a ring buffer for `vmctl log` and appended to
//! `<state_dir>/<module>/events.log` (mode 0600). The ring starts with the
//! file's last lines, so `vmctl log` shows what happened before a restart.
//! Lines are numbered (from the daemon's start) so `vmctl log -f` asks only
//! for the lines after the last one it printed.

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
    ring: Mutex<Ring>,
    clock: WallClock,
}

/// The lines in memory and the number the next one gets.
#[derive(Debug, Default)]
struct Ring {
    lines: VecDeque<String>,
    next: u64,
}

/// The lines asked for and the number to ask `after` next time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tail {
    pub lines: Vec<String>,
    pub next: u64,
}

/// The last `n` lines of the file at `path` (read from its end).
fn file_tail(path: &Path, n: usize) -> VecDeque<String> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return VecDeque::new();
    };
    // Lines are short: 256 bytes each is plenty for the ring.
    let want = u64::try_from(n).unwrap_or(u64::MAX).saturating_mul(256);
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(want);
    if file.seek(SeekFrom::Start(start)).is_err() {
        return VecDeque::new();
    }
    let mut bytes = Vec::new();
    if file.read_to_end(&mut bytes).is_err() {
        return VecDeque::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let mut lines: Vec<&str> = text.lines().collect();
    if start > 0 && !lines.is_empty() {
        lines.remove(0); // maybe cut in the middle
    }
    let skip = lines.len().saturating_sub(n);
    lines[skip..].iter().map(|l| l.to_string()).collect()
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
        let path = state_dir.join(module).join("events.log");
        let lines = file_tail(&path, RING_LINES);
        let next = u64::try_from(lines.len()).unwrap_or(0);
        EventLog {
            path,
            ring: Mutex::new(Ring { lines, next }),
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
            if ring.lines.len() == RING_LINES {
                ring.lines.pop_front();
            }
            ring.lines.push_back(line.clone());
            ring.next += 1;
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
        ring.lines.iter().cloned().collect()
    }

    /// The lines numbered `after` and later (all kept when `None`), at most
    /// the `last` of them.
    pub fn tail(&self, after: Option<u64>, last: Option<usize>) -> Tail {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let first = ring.next - ring.lines.len() as u64;
        let from = after.map_or(0, |a| a.saturating_sub(first));
        let from = usize::try_from(from)
            .unwrap_or(usize::MAX)
            .min(ring.lines.len());
        let mut lines: Vec<String> = ring.lines.iter().skip(from).cloned().collect();
        if let Some(n) = last {
            lines.drain(..lines.len().saturating_sub(n));
        }
        Tail {
            lines,
            next: ring.next,
        }
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
    fn tail_by_number_and_count_and_restart() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::new(dir.path(), "vm1");
        for i in 0..5 {
            log.append(&format!("line {i}")).unwrap();
        }
        let t = log.tail(None, Some(2));
        assert_eq!(t.next, 5);
        assert!(t.lines[0].ends_with("line 3") && t.lines[1].ends_with("line 4"));
        assert!(log.tail(Some(5), None).lines.is_empty());
        log.append("line 5").unwrap();
        let t = log.tail(Some(5), None);
        assert_eq!(t.lines.len(), 1);
        assert!(t.lines[0].ends_with("line 5"));
        // A new daemon starts with the file's lines.
        let again = EventLog::new(dir.path(), "vm1");
        assert_eq!(again.lines().len(), 6);
        assert!(again.lines()[0].ends_with("line 0"));
    }

    #[test]
    fn timestamps() {
        assert_eq!(timestamp(std::time::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = std::time::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(timestamp(t), "2023-11-14T22:13:20.123Z");
    }
}
