//! Mount-table checks and the secondary's read-only bind mount.

use std::path::{Path, PathBuf};

use rustix::mount::{MountFlags, UnmountFlags};

/// Errors of mount handling.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot read the mount table: {0}")]
    MountTable(std::io::Error),
    #[error("cannot make {path} read-only: {source}")]
    ReadOnly {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn unescape(field: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            if let Some(v) = std::str::from_utf8(&bytes[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Filesystem types mounted exactly at `path`, bottom to top.
pub fn mounts_at(path: &Path) -> Result<Vec<String>, MountError> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").map_err(MountError::MountTable)?;
    let want = path.to_string_lossy();
    let mut found = Vec::new();
    for line in table.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if fields.len() > sep + 1 && fields.len() > 4 && unescape(fields[4]) == want {
            found.push(fields[sep + 1].to_string());
        }
    }
    Ok(found)
}

/// True when the topmost mount at `path` is a FUSE filesystem.
pub fn is_fuse_mounted(path: &Path) -> Result<bool, MountError> {
    Ok(mounts_at(path)?
        .last()
        .is_some_and(|fstype| fstype.starts_with("fuse")))
}

/// A process holding something open beneath a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenBeneath {
    pub pid: u32,
    pub command: String,
    pub path: PathBuf,
}

/// Processes (other than this one) with a file, cwd or root beneath `dir`: their
/// writes would bypass a mount placed over it.
pub fn open_beneath(dir: &Path) -> Vec<OpenBeneath> {
    let me = std::process::id();
    let mut found = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let base = entry.path();
        let mut links = vec![base.join("cwd"), base.join("root")];
        if let Ok(fds) = std::fs::read_dir(base.join("fd")) {
            links.extend(fds.flatten().map(|fd| fd.path()));
        }
        for link in links {
            let Ok(target) = std::fs::read_link(&link) else {
                continue;
            };
            if target.starts_with(dir) && !(link.ends_with("root") && target == Path::new("/")) {
                let command = std::fs::read_to_string(base.join("comm"))
                    .map(|c| c.trim().to_string())
                    .unwrap_or_default();
                found.push(OpenBeneath {
                    pid,
                    command,
                    path: target,
                });
                break;
            }
        }
    }
    found
}

/// The directory bind-mounted read-only over itself; unmounted on drop. Descriptors
/// opened before the bind keep writing to the underlying (writable) mount.
///
/// A bind remount sets the mount's flags to exactly those given: the flags of the
/// mount beneath (`nosuid`, `nodev`, `noexec`, atime handling…) are read and given
/// again, or a hardened `nosuid,nodev,noexec` directory would lose them while it is a
/// secondary.
#[derive(Debug)]
pub struct ReadOnlyBind {
    path: PathBuf,
}

impl ReadOnlyBind {
    pub fn new(path: &Path) -> Result<Self, MountError> {
        let err = |source: rustix::io::Errno| MountError::ReadOnly {
            path: path.to_path_buf(),
            source: source.into(),
        };
        rustix::mount::mount_bind(path, path).map_err(err)?;
        let guard = Self {
            path: path.to_path_buf(),
        };
        let kept = kept_flags(&rustix::fs::statvfs(path).map_err(err)?.f_flag);
        rustix::mount::mount_remount(path, MountFlags::BIND | MountFlags::RDONLY | kept, "")
            .map_err(err)?;
        Ok(guard)
    }
}

/// The per-mount flags of a mount (as `statvfs` reports them) that a bind remount
/// must repeat to keep.
fn kept_flags(has: &rustix::fs::StatVfsMountFlags) -> MountFlags {
    use rustix::fs::StatVfsMountFlags as S;
    [
        (S::NOSUID, MountFlags::NOSUID),
        (S::NODEV, MountFlags::NODEV),
        (S::NOEXEC, MountFlags::NOEXEC),
        (S::NOATIME, MountFlags::NOATIME),
        (S::NODIRATIME, MountFlags::NODIRATIME),
        (S::RELATIME, MountFlags::RELATIME),
    ]
    .into_iter()
    .filter(|(s, _)| has.contains(*s))
    .fold(MountFlags::empty(), |all, (_, m)| all | m)
}

impl Drop for ReadOnlyBind {
    fn drop(&mut self) {
        if let Err(e) = rustix::mount::unmount(&self.path, UnmountFlags::DETACH) {
            tracing::warn!(path = %self.path.display(), "cannot remove read-only bind: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/x\\134y"), "/x\\y");
    }

    /// The per-mount options of the topmost mount at `path` (mountinfo field 6).
    fn top_mount_options(path: &Path) -> Vec<String> {
        let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let want = path.to_string_lossy();
        table
            .lines()
            .rev()
            .find_map(|line| {
                let f: Vec<&str> = line.split(' ').collect();
                (f.len() > 5 && unescape(f[4]) == want).then(|| f[5].to_string())
            })
            .unwrap_or_default()
            .split(',')
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn the_read_only_bind_keeps_nosuid_nodev_noexec() {
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = rustix::mount::unmount(&self.0, UnmountFlags::DETACH);
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().canonicalize().unwrap();
        // A hardened directory: a mount of its own with nosuid,nodev,noexec.
        rustix::mount::mount(
            "vmha-test",
            &path,
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
            c"size=1m",
        )
        .unwrap();
        let _tmpfs = Unmount(path.clone());
        let ro = ReadOnlyBind::new(&path).unwrap();
        let opts = top_mount_options(&path);
        for want in ["ro", "nosuid", "nodev", "noexec"] {
            assert!(opts.iter().any(|o| o == want), "{want} missing: {opts:?}");
        }
        assert!(std::fs::write(path.join("x"), b"x").is_err());
        drop(ro);
        assert!(top_mount_options(&path).iter().any(|o| o == "rw"));
    }

    #[test]
    fn root_is_a_mount_point_and_not_fuse() {
        assert!(!mounts_at(Path::new("/")).unwrap().is_empty());
        assert!(!is_fuse_mounted(Path::new("/")).unwrap());
    }

    #[test]
    fn an_open_file_beneath_is_found_in_another_process() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .current_dir(dir.path())
            .spawn()
            .unwrap();
        let canonical = dir.path().canonicalize().unwrap();
        let mut found = Vec::new();
        for _ in 0..50 {
            found = open_beneath(&canonical);
            if !found.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        assert!(found.iter().any(|o| o.pid == child.id()), "{found:?}");
    }
}
