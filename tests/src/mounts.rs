//! Mount table queries (`/proc/self/mountinfo`) and lazy unmounting.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rustix::mount::{unmount, UnmountFlags};

/// One line of `/proc/self/mountinfo`: vmha-fs's parser, the one of the workspace.
pub use vmha_fs::mounts::MountEntry;

/// Every mount of this mount namespace, in mountinfo order (lower mounts first).
pub fn mount_table() -> Result<Vec<MountEntry>> {
    vmha_fs::mounts::mount_table().context("reading /proc/self/mountinfo")
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
/// directories before the test mounted something there. Returns how many mounts
/// were detached.
pub fn lazy_unmount_all(path: &Path) -> Result<usize> {
    let p = absolute(path)?;
    let mut detached = 0;
    for _ in 0..64 {
        if !is_mount_point(&p)? {
            return Ok(detached);
        }
        detached += 1;
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
    Ok(detached)
}

/// A writable view of `dir` as it is underneath whatever is mounted on it (the
/// receiver's read-only bind of its replica over itself), at `at`: the parent of
/// `dir` bind-mounted there without its submounts. For tests that change a copy
/// behind vmha's back, as an operator (root) can. The guard unmounts it.
pub fn beneath_mounts(dir: &Path, at: &Path) -> Result<(MountGuard, PathBuf)> {
    let dir = absolute(dir)?;
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        bail!("{} has no parent to bind", dir.display());
    };
    std::fs::create_dir_all(at).with_context(|| format!("mkdir {}", at.display()))?;
    let guard = MountGuard::new(at);
    // Not recursive: the mounts beneath `parent` (the read-only bind) stay out.
    rustix::mount::mount_bind(parent, at)
        .with_context(|| format!("bind {} at {}", parent.display(), at.display()))?;
    Ok((guard, at.join(name)))
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
        match lazy_unmount_all(&self.path) {
            Ok(0) => {}
            Ok(n) => eprintln!(
                "MountGuard: {} was still mounted; detached {n} mount(s)",
                self.path.display()
            ),
            Err(e) => eprintln!("MountGuard: {e:#}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
