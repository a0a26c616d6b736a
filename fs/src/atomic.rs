//! The one way vmha-fs and vmhad replace a small file whole: write a temporary
//! file next to it, fsync it, rename it over the target, fsync the directory.
//! After a crash the file is either the old or the new one, never a mix, and a
//! reader never sees it half-written.
//!
//! Every metadata file goes through here (state-directory markers and status
//! files, the tracker's records, the controller's generation metadata and
//! domain XML). One flavour skips both fsyncs: [`write_report`], for files
//! that are rewritten every second and only inform (`changed_bytes`); losing
//! the last one in a crash costs nothing, fsyncing it every second would.

use std::fs::{File, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Whether the new content must survive a crash once the call returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durability {
    /// fsync of the file before the rename and of the directory after it.
    Durable,
    /// Rename only: readers never see a partial file, a crash may lose it.
    Report,
}

/// The mode of a newly created file: metadata may hold secrets (domain XML) or
/// steer failover, and the processes run with umask 0.
const NEW_FILE_MODE: u32 = 0o600;

/// Replaces `path` with `content` durably (mode 0600).
pub fn write(path: &Path, content: &[u8]) -> std::io::Result<()> {
    replace(path, content, Durability::Durable, NEW_FILE_MODE)
}

/// Replaces `path` with `content` durably, keeping the mode of the file it
/// replaces (0600 for a new one): for files an operator may have opened up.
pub fn write_keeping_mode(path: &Path, content: &[u8]) -> std::io::Result<()> {
    let mode = std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(NEW_FILE_MODE);
    replace(path, content, Durability::Durable, mode)
}

/// Replaces `path` with `content` (mode 0600) by rename, without fsync: a
/// frequently rewritten report whose loss in a crash costs nothing.
pub fn write_report(path: &Path, content: &[u8]) -> std::io::Result<()> {
    replace(path, content, Durability::Report, NEW_FILE_MODE)
}

/// Removes `path` if present and makes the removal durable (fsync of the
/// directory). Absent already is success.
pub fn remove(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    File::open(parent(path))?.sync_all()
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// The temporary file of `path`: hidden, in the same directory (the rename
/// stays within one filesystem).
fn temporary(path: &Path) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    parent(path).join(format!(".{name}.vmha-tmp"))
}

fn replace(path: &Path, content: &[u8], durability: Durability, mode: u32) -> std::io::Result<()> {
    let dir = parent(path);
    let tmp = temporary(path);
    let result = (|| {
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(mode)
            .open(&tmp)?;
        // `mode` at creation is filtered by the umask and ignored for an old
        // temporary file: set it explicitly.
        file.set_permissions(Permissions::from_mode(mode))?;
        file.write_all(content)?;
        if durability == Durability::Durable {
            file.sync_all()?;
        }
        drop(file);
        std::fs::rename(&tmp, path)?;
        if durability == Durability::Durable {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn replaces_whole_with_mode_0600_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sync.json");
        write(&path, b"one").unwrap();
        write(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(mode(&path), 0o600);
        write_report(&dir.path().join("changed_bytes"), b"5\n").unwrap();
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with("-tmp")), "{names:?}");
    }

    #[test]
    fn keeping_mode_keeps_the_old_files_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.xml");
        write_keeping_mode(&path, b"<a/>").unwrap();
        assert_eq!(mode(&path), 0o600);
        std::fs::set_permissions(&path, Permissions::from_mode(0o644)).unwrap();
        write_keeping_mode(&path, b"<b/>").unwrap();
        assert_eq!(mode(&path), 0o644);
        assert_eq!(std::fs::read(&path).unwrap(), b"<b/>");
    }

    #[test]
    fn a_failed_write_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("generation");
        write(&path, b"ab\n").unwrap();
        // The target is a non-empty directory now: the rename fails.
        let blocked = dir.path().join("blocked");
        std::fs::create_dir(&blocked).unwrap();
        std::fs::write(blocked.join("x"), b"").unwrap();
        assert!(write(&blocked, b"new").is_err());
        assert!(!dir.path().join(".blocked.vmha-tmp").exists());
        assert_eq!(std::fs::read(&path).unwrap(), b"ab\n");
        remove(&path).unwrap();
        remove(&path).unwrap();
        assert!(!path.exists());
    }
}
