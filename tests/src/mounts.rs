//! Mount table queries (`/proc/self/mountinfo`) and lazy unmounting.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rustix::mount::{unmount, UnmountFlags};

/// One line of `/proc/self/mountinfo`, the parts tests care about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub source: String,
}

/// Undoes mountinfo's octal escapes (`\040` for space and so on).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let oct = std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(oct, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every mount of this mount namespace, in mountinfo order (lower mounts first).
pub fn mount_table() -> Result<Vec<MountEntry>> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let mut out = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (Some(mp), Some(fs_type), Some(source)) =
            (fields.get(4), fields.get(sep + 1), fields.get(sep + 2))
        else {
            continue;
        };
        out.push(MountEntry {
            mount_point: PathBuf::from(unescape(mp)),
            fs_type: unescape(fs_type),
            source: unescape(source),
        });
    }
    Ok(out)
}

/// Absolute form of `path` without touching `path` itself (a dead FUSE mount
/// answers ENOTCONN to stat): canonicalise the parent, then append the name.
pub fn absolute(path: &Path) -> Result<PathBuf> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    };
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => {
            let parent = parent
                .canonicalize()
                .with_context(|| format!("canonicalize {}", parent.display()))?;
            Ok(parent.join(name))
        }
        _ => Ok(abs),
    }
}

/// The mounts stacked exactly at `path` (0 if it is not a mount point).
pub fn mounts_at(path: &Path) -> Result<Vec<MountEntry>> {
    let p = absolute(path)?;
    Ok(mount_table()?
        .into_iter()
        .filter(|m| m.mount_point == p)
        .collect())
}

/// The mounts at `path` or anywhere beneath it.
pub fn mounts_at_or_under(path: &Path) -> Result<Vec<MountEntry>> {
    let p = absolute(path)?;
    Ok(mount_table()?
        .into_iter()
        .filter(|m| m.mount_point.starts_with(&p))
        .collect())
}

/// Whether something is mounted exactly at `path`.
pub fn is_mount_point(path: &Path) -> Result<bool> {
    Ok(!mounts_at(path)?.is_empty())
}

/// Lazily unmounts (MNT_DETACH) every mount stacked exactly at `path`, topmost first,
/// until `path` is no longer a mount point. Use only on paths that were plain
/// directories before the test mounted something there.
pub fn lazy_unmount_all(path: &Path) -> Result<()> {
    let p = absolute(path)?;
    for _ in 0..64 {
        if !is_mount_point(&p)? {
            return Ok(());
        }
        if let Err(e) = unmount(&p, UnmountFlags::DETACH | UnmountFlags::NOFOLLOW) {
            // EINVAL: raced with another unmount; re-check the table.
            if e != rustix::io::Errno::INVAL {
                return Err(std::io::Error::from(e))
                    .with_context(|| format!("umount2({}, MNT_DETACH)", p.display()));
            }
        }
    }
    if is_mount_point(&p)? {
        bail!("{} is still a mount point after 64 unmounts", p.display());
    }
    Ok(())
}

/// Lazily unmounts everything at `path` when dropped.
#[derive(Debug)]
pub struct MountGuard {
    path: PathBuf,
}

impl MountGuard {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if let Err(e) = lazy_unmount_all(&self.path) {
            eprintln!("MountGuard: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescape_octal() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/x\\134y"), "/x\\y");
        assert_eq!(unescape("/end\\"), "/end\\");
    }

    #[test]
    fn root_is_a_mount_point() -> Result<()> {
        assert!(is_mount_point(Path::new("/proc"))?);
        let d = tempfile::tempdir_in("/var/tmp")?;
        assert!(!is_mount_point(d.path())?);
        lazy_unmount_all(d.path())?;
        Ok(())
    }

    #[test]
    fn bind_mount_is_detached() -> Result<()> {
        use rustix::mount::{mount_bind, mount_remount, MountFlags};
        let d = tempfile::tempdir_in("/var/tmp")?;
        let target = d.path().join("t");
        std::fs::create_dir(&target)?;
        let guard = MountGuard::new(&target);
        mount_bind(&target, &target)?;
        mount_remount(&target, MountFlags::BIND | MountFlags::RDONLY, "")?;
        mount_bind(&target, &target)?;
        assert_eq!(mounts_at(&target)?.len(), 2);
        assert_eq!(mounts_at_or_under(d.path())?.len(), 2);
        drop(guard);
        assert!(!is_mount_point(&target)?);
        Ok(())
    }
}
