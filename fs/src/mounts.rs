//! Mount-table checks, the open-files check before a mount over the data
//! directory, and the secondary's read-only bind mount.

use std::collections::HashSet;
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

/// Undoes mountinfo's octal escapes (space, tab, newline and backslash are
/// written as `\ooo`).
pub fn unescape(field: &str) -> String {
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

/// One line of `/proc/self/mountinfo` (proc(5)). The one parser of the mount
/// table in the workspace: vmhad's driver, the tests and the benchmarks use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub id: String,
    pub parent: String,
    /// `major:minor` of the filesystem.
    pub dev: String,
    pub mount_point: PathBuf,
    pub read_only: bool,
    pub fs_type: String,
    /// The mount source (`vmha:<dir>` for vmha-fs).
    pub source: String,
}

/// The lines of a mountinfo text that parse, in mount order (lower mounts
/// first); others are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            Some(MountEntry {
                id: f.first()?.to_string(),
                parent: f.get(1)?.to_string(),
                dev: f.get(2)?.to_string(),
                mount_point: PathBuf::from(unescape(f.get(4)?)),
                read_only: f.get(5)?.split(',').any(|o| o == "ro"),
                fs_type: unescape(f.get(sep + 1)?),
                source: f.get(sep + 2).map(|x| unescape(x)).unwrap_or_default(),
            })
        })
        .collect()
}

/// This mount namespace's mount table.
pub fn mount_table() -> Result<Vec<MountEntry>, MountError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(MountError::MountTable)?;
    Ok(parse_mountinfo(&text))
}

/// Filesystem types mounted exactly at `path`, bottom to top.
pub fn mounts_at(path: &Path) -> Result<Vec<String>, MountError> {
    Ok(mount_table()?
        .into_iter()
        .filter(|m| m.mount_point == path)
        .map(|m| m.fs_type)
        .collect())
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
    /// What the process has open, as it names it (in its own mount namespace).
    pub path: PathBuf,
}

/// What one of a process's descriptors, its cwd or its root resolves to.
#[derive(Debug)]
struct Held {
    pid: u32,
    /// `/proc/PID/fd/N`, `/proc/PID/cwd` or `/proc/PID/root`.
    link: PathBuf,
    dev: u64,
    ino: u64,
}

/// Processes (other than this one) with a file, cwd or root beneath `dir`:
/// their writes would bypass a mount placed over it.
///
/// Compared by device and inode, not by path: `stat` through
/// `/proc/PID/{fd/N,cwd,root}` reaches the object itself whatever the
/// process's mount namespace, so a process of another namespace (a container,
/// a second node on the same host) holding a same-named path of another
/// filesystem does not count, and one holding a file of `dir` through another
/// path (a bind mount elsewhere) does. "Beneath" is membership in the set of
/// (device, inode) of `dir`'s tree (crossing into filesystems mounted in it),
/// walked only when some process holds something on `dir`'s filesystem or one
/// mounted beneath it. A hard link of a file of `dir` held from elsewhere
/// counts too: it is the same file.
pub fn open_beneath(dir: &Path) -> Vec<OpenBeneath> {
    use std::os::unix::fs::MetadataExt;

    let Ok(top) = std::fs::metadata(dir) else {
        return Vec::new();
    };
    let held = held_by_others();
    let mut devices: HashSet<u64> = submount_devices(dir);
    devices.insert(top.dev());
    if !held.iter().any(|h| devices.contains(&h.dev)) {
        return Vec::new();
    }
    let tree = tree_inodes(dir);
    let mut found: Vec<OpenBeneath> = Vec::new();
    for h in held {
        if found.last().is_some_and(|f| f.pid == h.pid) || !tree.contains(&(h.dev, h.ino)) {
            continue;
        }
        let base = Path::new("/proc").join(h.pid.to_string());
        let command = std::fs::read_to_string(base.join("comm"))
            .map(|c| c.trim().to_string())
            .unwrap_or_default();
        let path = std::fs::read_link(&h.link).unwrap_or(h.link);
        found.push(OpenBeneath {
            pid: h.pid,
            command,
            path,
        });
    }
    found
}

/// Every descriptor, cwd and root of the other processes, in PID order.
fn held_by_others() -> Vec<Held> {
    use std::os::unix::fs::MetadataExt;

    let me = std::process::id();
    let mut held = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return held;
    };
    let mut pids: Vec<u32> = procs
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .filter(|pid| *pid != me)
        .collect();
    pids.sort_unstable();
    for pid in pids {
        let base = Path::new("/proc").join(pid.to_string());
        let mut links = vec![base.join("cwd"), base.join("root")];
        if let Ok(fds) = std::fs::read_dir(base.join("fd")) {
            links.extend(fds.flatten().map(|fd| fd.path()));
        }
        for link in links {
            // Follows the magic link to the object itself (a process that
            // exited meanwhile, or a closed descriptor, is simply skipped).
            if let Ok(meta) = std::fs::metadata(&link) {
                held.push(Held {
                    pid,
                    link,
                    dev: meta.dev(),
                    ino: meta.ino(),
                });
            }
        }
    }
    held
}

/// Devices of the filesystems mounted beneath `dir` (in this namespace).
fn submount_devices(dir: &Path) -> HashSet<u64> {
    use std::os::unix::fs::MetadataExt;

    let Ok(table) = mount_table() else {
        return HashSet::new();
    };
    table
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|point| point != dir && point.starts_with(dir))
        .filter_map(|point| std::fs::metadata(point).ok())
        .map(|meta| meta.dev())
        .collect()
}

/// (device, inode) of `dir` and everything beneath it, symlinks not followed.
fn tree_inodes(dir: &Path) -> HashSet<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;

    let mut seen = HashSet::new();
    let Ok(top) = std::fs::symlink_metadata(dir) else {
        return seen;
    };
    seen.insert((top.dev(), top.ino()));
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            // DirEntry::metadata does not follow symlinks (lstat).
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if seen.insert((meta.dev(), meta.ino())) && meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    seen
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

/// A standby mount (`vmha-fs primary --standby`) takes the directory over from
/// this node's receiver, which still runs: the receiver's read-only bind at
/// `path` (the topmost mount there, read-only, not FUSE) is removed, so the
/// standby opens the directory writable (for after its activation) and its own
/// mount, which refuses every change while in standby, covers it instead.
/// Returns whether a bind was removed.
///
/// A standby mount that stops without having been activated puts the bind
/// back ([`restore_read_only`]): the receiver goes on, still protected.
pub fn take_over_read_only(path: &Path) -> Result<bool, MountError> {
    let top = mount_table()?.into_iter().rfind(|m| m.mount_point == path);
    match top {
        Some(m) if m.read_only && !m.fs_type.starts_with("fuse") => {
            rustix::mount::unmount(path, UnmountFlags::empty()).map_err(|e| {
                MountError::ReadOnly {
                    path: path.to_path_buf(),
                    source: std::io::Error::other(format!(
                        "cannot remove the receiver's read-only bind: {e}"
                    )),
                }
            })?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Puts back the read-only bind a standby mount took over (it stops without
/// having been activated); the receiver removes it when it stops.
pub fn restore_read_only(path: &Path) -> Result<(), MountError> {
    std::mem::forget(ReadOnlyBind::new(path)?);
    Ok(())
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
        // Only a read-only bind that is the topmost mount there: a standby
        // mount over the directory (a live swap) removed ours and must not be
        // unmounted in its place (mount ids are reused at once: no use). A
        // bind a standby mount put back when it stopped unactivated
        // (`restore_read_only`) is this receiver's too.
        let top = mount_table()
            .ok()
            .and_then(|t| t.into_iter().rfind(|m| m.mount_point == self.path));
        let ours = top
            .as_ref()
            .is_some_and(|m| m.read_only && !m.fs_type.starts_with("fuse"));
        if !ours {
            tracing::info!(path = %self.path.display(), "read-only bind gone or covered (a standby mount took over): left alone");
            return;
        }
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
        assert_eq!(unescape("/plain\\"), "/plain\\");
    }

    #[test]
    fn mountinfo_lines_parse() {
        let text = "22 1 252:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
                    42 27 0:39 / /var/tmp/a\\040b ro,nosuid - fuse vmha:/x rw,user_id=0\n\
                    garbage\n";
        let got = parse_mountinfo(text);
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].mount_point, PathBuf::from("/var/tmp/a b"));
        assert_eq!(
            (got[1].fs_type.as_str(), got[1].source.as_str()),
            ("fuse", "vmha:/x")
        );
        assert!(got[1].read_only && !got[0].read_only);
        assert_eq!((got[1].id.as_str(), got[1].parent.as_str()), ("42", "27"));
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
