//! The node's leave (`vmctl leave`), persisted as `<state_dir>/left.json` so
//! that a restarted `vmhad` keeps the node out until `vmctl join`.
//!
//! Two kinds, because an operator's leave and a host shutdown mean different
//! things at the next start:
//! - an operator's leave (`{"boot_id": null}`) lasts until `vmctl join`,
//!   across daemon restarts and reboots;
//! - a leave at host shutdown (`vmctl leave --until-boot`, run by
//!   `vmha-shutdown.service`) records the kernel's boot id
//!   (`/proc/sys/kernel/random/boot_id`): it holds across daemon restarts in
//!   the same boot and ends at the next boot, where the node rejoins by itself.
//!
//! An operator's leave is never weakened into a shutdown one: a shutdown of a
//! node that an operator took out keeps it out after the reboot.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The file under the state directory.
pub const FILE_NAME: &str = "left.json";
/// Where the kernel says which boot this is.
pub const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// Errors reading or writing the leave file.
#[derive(Debug, thiserror::Error)]
pub enum LeaveError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a leave record ({source}); remove it or run `vmctl join`")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no boot id for a leave until the next boot: {0}")]
    NoBootId(String),
}

/// The record on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeftFile {
    /// `null`: until `vmctl join`; else the boot this leave ends after.
    pub boot_id: Option<String>,
}

/// What the file says at daemon start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leave {
    /// No leave: the node takes part.
    In,
    /// Out until `vmctl join`.
    Out { until_boot: bool },
    /// A leave at shutdown of an earlier boot: over (the file was removed).
    EndedAtBoot,
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE_NAME)
}

/// This boot's id (trimmed).
pub fn current_boot_id() -> Result<String, LeaveError> {
    std::fs::read_to_string(BOOT_ID_PATH)
        .map(|s| s.trim().to_string())
        .map_err(|e| LeaveError::NoBootId(format!("{BOOT_ID_PATH}: {e}")))
}

fn read(state_dir: &Path) -> Result<Option<LeftFile>, LeaveError> {
    let path = path(state_dir);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| LeaveError::Corrupt { path, source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(LeaveError::Read { path, source }),
    }
}

/// The leave in effect at a start in boot `boot_id`; a shutdown leave of
/// another boot is removed.
pub fn load(state_dir: &Path, boot_id: Option<&str>) -> Result<Leave, LeaveError> {
    match read(state_dir)? {
        None => Ok(Leave::In),
        Some(LeftFile { boot_id: None }) => Ok(Leave::Out { until_boot: false }),
        Some(LeftFile {
            boot_id: Some(then),
        }) if boot_id.is_none_or(|now| now == then) => Ok(Leave::Out { until_boot: true }),
        Some(_) => {
            remove(state_dir)?;
            Ok(Leave::EndedAtBoot)
        }
    }
}

/// Records a leave; `until_boot` names this boot unless an operator's leave
/// is already recorded (kept). Returns what is recorded.
pub fn save(
    state_dir: &Path,
    until_boot: bool,
    boot_id: Option<&str>,
) -> Result<LeftFile, LeaveError> {
    let existing = read(state_dir).ok().flatten();
    let record = match (until_boot, existing) {
        (_, Some(LeftFile { boot_id: None })) | (false, _) => LeftFile { boot_id: None },
        (true, _) => LeftFile {
            boot_id: Some(
                boot_id
                    .ok_or_else(|| LeaveError::NoBootId("not known".into()))?
                    .to_string(),
            ),
        },
    };
    let path = path(state_dir);
    let write = |source| LeaveError::Write {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(state_dir).map_err(write)?;
    let json = serde_json::to_vec(&record).map_err(|e| write(std::io::Error::other(e)))?;
    vmha_fs::atomic::write(&path, &json).map_err(write)?;
    Ok(record)
}

/// Ends the leave (`vmctl join`); no file is fine.
pub fn remove(state_dir: &Path) -> Result<(), LeaveError> {
    let path = path(state_dir);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(LeaveError::Write { path, source }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn operator_leave_lasts_until_join_and_a_shutdown_leave_until_the_next_boot() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(load(d, Some("a")).unwrap(), Leave::In);
        // At shutdown in boot "a": out for the rest of boot "a" only.
        save(d, true, Some("a")).unwrap();
        assert_eq!(load(d, Some("a")).unwrap(), Leave::Out { until_boot: true });
        assert_eq!(load(d, Some("b")).unwrap(), Leave::EndedAtBoot);
        assert_eq!(load(d, Some("b")).unwrap(), Leave::In);
        // An operator's leave: across boots, and a shutdown does not weaken it.
        save(d, false, Some("b")).unwrap();
        save(d, true, Some("b")).unwrap();
        assert_eq!(
            load(d, Some("c")).unwrap(),
            Leave::Out { until_boot: false }
        );
        remove(d).unwrap();
        assert_eq!(load(d, Some("c")).unwrap(), Leave::In);
        remove(d).unwrap();
        // A corrupt file is an error that names it, not a silent join.
        std::fs::write(path(d), b"{").unwrap();
        let e = load(d, Some("c")).unwrap_err().to_string();
        assert!(e.contains(FILE_NAME), "{e}");
    }

    #[test]
    fn this_boot_has_an_id() {
        assert!(!current_boot_id().unwrap().is_empty());
    }
}
