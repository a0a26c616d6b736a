//! Applying an `Op` to a directory. The primary and the receiver both call `apply`, so
//! the two replicas cannot disagree about what an operation means.
//!
//! Every name is resolved as a single component beneath its parent's descriptor with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`; symlinks are created and replicated
//! as links and never followed.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use rustix::fs::{
    AtFlags, FallocateFlags, FileType, Mode, OFlags, RenameFlags, ResolveFlags, Timespec,
    Timestamps, XattrFlags, CWD,
};
pub use rustix::io::Errno;

use crate::op::{LinkTarget, Name, NewNode, NodeId, NodeKind, Op, Time};

/// Where `apply` finds the descriptors behind node ids.
pub trait NodeTable {
    /// The O_PATH descriptor of node `id`.
    fn path_fd(&self, id: NodeId) -> Result<Arc<OwnedFd>, Errno>;
    /// A descriptor for reading and writing the content of node `id`.
    fn data_fd(&self, id: NodeId) -> Result<Arc<OwnedFd>, Errno>;
    /// From now on `id` names the node behind the O_PATH descriptor `fd`.
    fn bind(&self, id: NodeId, fd: OwnedFd) -> Result<(), Errno>;
    /// `id` is no longer used.
    fn forget(&self, id: NodeId);
}

/// What a successful `apply` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Done,
    Written(usize),
    Copied(u64),
}

const BENEATH: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

/// Opens `name` in `parent` as an O_PATH descriptor, never following a symlink.
pub fn lookup_beneath(parent: BorrowedFd<'_>, name: &Name) -> Result<OwnedFd, Errno> {
    rustix::fs::openat2(
        parent,
        name.as_os_str(),
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        BENEATH,
    )
}

/// The magic /proc path that reopens an O_PATH descriptor.
pub fn proc_path(fd: BorrowedFd<'_>) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

/// Reopens the node behind an O_PATH descriptor with real access `flags`. The magic
/// link names exactly that inode (it is not a path walk), so following it is safe.
pub fn reopen(path_fd: BorrowedFd<'_>, flags: OFlags) -> Result<OwnedFd, Errno> {
    rustix::fs::openat(
        CWD,
        proc_path(path_fd),
        flags | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// The names in the directory behind O_PATH descriptor `dir`, without `.` and
/// `..`, in the order the directory gives them.
pub fn dir_names(dir: BorrowedFd<'_>) -> Result<Vec<Vec<u8>>, Errno> {
    let listing = reopen(dir, OFlags::RDONLY | OFlags::DIRECTORY)?;
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(listing.as_fd())? {
        let entry = entry?;
        let raw = entry.file_name().to_bytes();
        if raw != b"." && raw != b".." {
            names.push(raw.to_vec());
        }
    }
    Ok(names)
}

/// The largest file size the filesystem of directory `dir` accepts (its
/// `s_maxbytes`: 16 TiB on ext4 with 4 KiB blocks, 8 EiB on XFS), found by growing an
/// unnamed temporary file there (`O_TMPFILE`, gone when closed; nothing is written).
/// Without `O_TMPFILE`, the kernel's limit for any file (2^63 − 1).
pub fn max_file_size(dir: BorrowedFd<'_>) -> u64 {
    const ANY: u64 = i64::MAX as u64;
    let Ok(dir) = reopen(dir, OFlags::RDONLY | OFlags::DIRECTORY) else {
        return ANY;
    };
    let Ok(tmp) = rustix::fs::openat(
        dir.as_fd(),
        ".",
        OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    ) else {
        return ANY;
    };
    // Invariant: `ok` is accepted, `ok < bad` and `bad` is refused (or past any).
    let (mut ok, mut bad) = (0u64, ANY + 1);
    while bad - ok > 1 {
        let mid = ok + (bad - ok) / 2;
        match rustix::fs::ftruncate(tmp.as_fd(), mid) {
            Ok(()) => ok = mid,
            Err(Errno::FBIG) | Err(Errno::INVAL) => bad = mid,
            Err(_) => return ANY,
        }
    }
    let _ = rustix::fs::ftruncate(tmp.as_fd(), 0);
    ok
}

/// One directory on the way down of [`remove_beneath`].
struct Level {
    /// Device and inode, checked when coming back up through `..`.
    id: (u64, u64),
    /// Its name in its parent (None for the top, which stays).
    name: Option<Name>,
    /// Subdirectories not removed yet.
    subdirs: Vec<Name>,
}

impl Level {
    /// Lists `dir`: removes its non-directories at once, notes its subdirectories.
    fn enter(dir: BorrowedFd<'_>, name: Option<Name>) -> Result<Level, Errno> {
        let st = rustix::fs::fstat(dir)?;
        let listing = reopen(dir, OFlags::RDONLY | OFlags::DIRECTORY)?;
        let mut names = Vec::new();
        let mut entries = rustix::fs::Dir::read_from(listing.as_fd())?;
        while let Some(entry) = entries.read() {
            let entry = entry?;
            let raw = entry.file_name().to_bytes();
            if raw != b"." && raw != b".." {
                names.push(Name::new(raw).map_err(|_| Errno::INVAL)?);
            }
        }
        let mut subdirs = Vec::new();
        for name in names {
            let child = match lookup_beneath(dir, &name) {
                Ok(fd) => fd,
                Err(Errno::NOENT) => continue,
                Err(e) => return Err(e),
            };
            if FileType::from_raw_mode(rustix::fs::fstat(child.as_fd())?.st_mode)
                == FileType::Directory
            {
                subdirs.push(name);
            } else {
                rustix::fs::unlinkat(dir, name.as_os_str(), AtFlags::empty())?;
            }
        }
        Ok(Level {
            id: (st.st_dev, st.st_ino),
            name,
            subdirs,
        })
    }
}

/// Removes everything beneath the directory `dir` (an O_PATH descriptor is fine),
/// never following a symlink: links are removed as links.
///
/// Iterative, with one directory descriptor open at a time: a tree of any depth (a
/// peer or a guest can make one 100,000 levels deep) neither overflows the stack nor
/// runs out of descriptors. It goes back up through `..`, checked against the device
/// and inode noted on the way down (ESTALE if a directory was moved meanwhile).
pub fn remove_beneath(dir: BorrowedFd<'_>) -> Result<(), Errno> {
    let mut cur = reopen(dir, OFlags::PATH | OFlags::DIRECTORY)?;
    let mut levels = vec![Level::enter(cur.as_fd(), None)?];
    while let Some(top) = levels.last_mut() {
        if let Some(name) = top.subdirs.pop() {
            let child = match lookup_beneath(cur.as_fd(), &name) {
                Ok(fd) => fd,
                Err(Errno::NOENT) => continue,
                Err(e) => return Err(e),
            };
            if FileType::from_raw_mode(rustix::fs::fstat(child.as_fd())?.st_mode)
                != FileType::Directory
            {
                rustix::fs::unlinkat(cur.as_fd(), name.as_os_str(), AtFlags::empty())?;
                continue;
            }
            levels.push(Level::enter(child.as_fd(), Some(name))?);
            cur = child;
            continue;
        }
        // Empty now: up to the parent (unless it is the top), and remove it there.
        let Some(Level {
            name: Some(name), ..
        }) = levels.pop()
        else {
            break;
        };
        let parent = rustix::fs::openat(
            cur.as_fd(),
            "..",
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let st = rustix::fs::fstat(parent.as_fd())?;
        if levels.last().map(|l| l.id) != Some((st.st_dev, st.st_ino)) {
            return Err(Errno::STALE);
        }
        rustix::fs::unlinkat(parent.as_fd(), name.as_os_str(), AtFlags::REMOVEDIR)?;
        cur = parent;
    }
    Ok(())
}

/// `pwrite` until everything is written.
pub fn write_all_at(fd: BorrowedFd<'_>, mut data: &[u8], mut offset: u64) -> Result<usize, Errno> {
    let total = data.len();
    while !data.is_empty() {
        match rustix::io::pwrite(fd, data, offset) {
            Ok(0) => return Err(Errno::IO),
            Ok(n) => {
                data = &data[n..];
                offset += n as u64;
            }
            Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(total)
}

/// `copy_file_range` of up to `len` bytes; returns how many were copied (short at EOF).
pub fn copy_range(
    src: BorrowedFd<'_>,
    mut src_offset: u64,
    dst: BorrowedFd<'_>,
    mut dst_offset: u64,
    len: u64,
) -> Result<u64, Errno> {
    let mut done = 0u64;
    while done < len {
        let chunk = usize::try_from(len - done)
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        match rustix::fs::copy_file_range(
            src,
            Some(&mut src_offset),
            dst,
            Some(&mut dst_offset),
            chunk,
        ) {
            Ok(0) => break,
            Ok(n) => done += n as u64,
            Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

fn set_owner_and_mode(fd: BorrowedFd<'_>, node: &NewNode, is_symlink: bool) -> Result<(), Errno> {
    // Owner first: chown clears set-id bits that chmod then sets.
    rustix::fs::chownat(
        fd,
        "",
        Some(rustix::fs::Uid::from_raw(node.uid)),
        Some(rustix::fs::Gid::from_raw(node.gid)),
        AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
    )?;
    if !is_symlink {
        rustix::fs::chmodat(
            CWD,
            proc_path(fd),
            Mode::from_raw_mode(node.mode & 0o7777),
            AtFlags::empty(),
        )?;
    }
    Ok(())
}

fn to_timestamp(time: Option<Time>) -> Timespec {
    match time {
        Some(t) => Timespec {
            tv_sec: t.sec,
            tv_nsec: i64::from(t.nsec),
        },
        None => Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        },
    }
}

fn create_node(
    table: &dyn NodeTable,
    parent: NodeId,
    name: &Name,
    node: &NewNode,
    kind: NodeKind,
    rdev: u64,
) -> Result<(), Errno> {
    let dir = table.path_fd(parent)?;
    let mode = Mode::from_raw_mode(node.mode & 0o7777);
    match kind {
        NodeKind::Regular => {
            rustix::fs::openat2(
                dir.as_fd(),
                name.as_os_str(),
                OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                mode,
                BENEATH,
            )?;
        }
        other => {
            let file_type = match other {
                NodeKind::Fifo => FileType::Fifo,
                NodeKind::Socket => FileType::Socket,
                NodeKind::CharDevice => FileType::CharacterDevice,
                NodeKind::BlockDevice => FileType::BlockDevice,
                NodeKind::Regular => FileType::RegularFile,
            };
            rustix::fs::mknodat(dir.as_fd(), name.as_os_str(), file_type, mode, rdev)?;
        }
    }
    bind_new(table, dir.as_fd(), name, node, false)
}

fn bind_new(
    table: &dyn NodeTable,
    dir: BorrowedFd<'_>,
    name: &Name,
    node: &NewNode,
    is_symlink: bool,
) -> Result<(), Errno> {
    let fd = lookup_beneath(dir, name)?;
    set_owner_and_mode(fd.as_fd(), node, is_symlink)?;
    table.bind(node.id, fd)
}

fn symlink(
    table: &dyn NodeTable,
    parent: NodeId,
    name: &Name,
    node: &NewNode,
    target: &LinkTarget,
) -> Result<(), Errno> {
    let dir = table.path_fd(parent)?;
    rustix::fs::symlinkat(target.as_os_str(), dir.as_fd(), name.as_os_str())?;
    bind_new(table, dir.as_fd(), name, node, true)
}

fn is_symlink(fd: BorrowedFd<'_>) -> Result<bool, Errno> {
    let st = rustix::fs::fstat(fd)?;
    Ok(FileType::from_raw_mode(st.st_mode) == FileType::Symlink)
}

/// The node for an xattr change, reached through its magic /proc link. That link would
/// lead on through a symlink, so symlinks are refused (Linux allows no user xattrs on
/// them anyway).
fn xattr_target(table: &dyn NodeTable, id: NodeId) -> Result<Arc<OwnedFd>, Errno> {
    let fd = table.path_fd(id)?;
    if is_symlink(fd.as_fd())? {
        return Err(Errno::PERM);
    }
    Ok(fd)
}

/// Calls a size-probing syscall (getxattr, listxattr) twice: size, then content.
pub fn read_sized(call: impl Fn(&mut [u8]) -> Result<usize, Errno>) -> Result<Vec<u8>, Errno> {
    loop {
        let size = call(&mut [])?;
        let mut buf = vec![0u8; size];
        match call(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            // Grew between the two calls.
            Err(Errno::RANGE) => {}
            Err(e) => return Err(e),
        }
    }
}

/// Applies one operation to the directory behind `table`.
pub fn apply(table: &dyn NodeTable, op: &Op) -> Result<Applied, Errno> {
    match op {
        Op::Bind { id, parent, name } => {
            let dir = table.path_fd(*parent)?;
            table.bind(*id, lookup_beneath(dir.as_fd(), name)?)?;
        }
        Op::Forget { id } => table.forget(*id),
        Op::Create {
            parent,
            name,
            node,
            kind,
            rdev,
        } => create_node(table, *parent, name, node, *kind, *rdev)?,
        Op::Mkdir { parent, name, node } => {
            let dir = table.path_fd(*parent)?;
            rustix::fs::mkdirat(dir.as_fd(), name.as_os_str(), Mode::from_raw_mode(0o700))?;
            bind_new(table, dir.as_fd(), name, node, false)?;
        }
        Op::Symlink {
            parent,
            name,
            node,
            target,
        } => symlink(table, *parent, name, node, target)?,
        Op::Link { id, parent, name } => {
            let node = table.path_fd(*id)?;
            let dir = table.path_fd(*parent)?;
            rustix::fs::linkat(
                node.as_fd(),
                "",
                dir.as_fd(),
                name.as_os_str(),
                AtFlags::EMPTY_PATH,
            )?;
        }
        Op::Unlink { parent, name } => {
            let dir = table.path_fd(*parent)?;
            rustix::fs::unlinkat(dir.as_fd(), name.as_os_str(), AtFlags::empty())?;
        }
        Op::Rmdir { parent, name } => {
            let dir = table.path_fd(*parent)?;
            rustix::fs::unlinkat(dir.as_fd(), name.as_os_str(), AtFlags::REMOVEDIR)?;
        }
        Op::Rename {
            parent,
            name,
            new_parent,
            new_name,
            flags,
        } => {
            let flags = RenameFlags::from_bits(*flags).ok_or(Errno::INVAL)?;
            let dir = table.path_fd(*parent)?;
            let new_dir = table.path_fd(*new_parent)?;
            rustix::fs::renameat_with(
                dir.as_fd(),
                name.as_os_str(),
                new_dir.as_fd(),
                new_name.as_os_str(),
                flags,
            )?;
        }
        Op::SetAttr {
            id,
            mode,
            uid,
            gid,
            atime,
            mtime,
        } => {
            let fd = table.path_fd(*id)?;
            if uid.is_some() || gid.is_some() {
                rustix::fs::chownat(
                    fd.as_fd(),
                    "",
                    uid.map(rustix::fs::Uid::from_raw),
                    gid.map(rustix::fs::Gid::from_raw),
                    AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
                )?;
            }
            if let Some(mode) = mode {
                if is_symlink(fd.as_fd())? {
                    return Err(Errno::OPNOTSUPP);
                }
                rustix::fs::chmodat(
                    CWD,
                    proc_path(fd.as_fd()),
                    Mode::from_raw_mode(mode & 0o7777),
                    AtFlags::empty(),
                )?;
            }
            if atime.is_some() || mtime.is_some() {
                let times = Timestamps {
                    last_access: to_timestamp(*atime),
                    last_modification: to_timestamp(*mtime),
                };
                rustix::fs::utimensat(
                    fd.as_fd(),
                    "",
                    &times,
                    AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
                )?;
            }
        }
        Op::Truncate { id, size } => rustix::fs::ftruncate(table.data_fd(*id)?.as_fd(), *size)?,
        Op::Write { id, offset, data } => {
            let fd = table.data_fd(*id)?;
            return Ok(Applied::Written(write_all_at(fd.as_fd(), data, *offset)?));
        }
        Op::Fallocate {
            id,
            mode,
            offset,
            len,
        } => {
            let fd = table.data_fd(*id)?;
            rustix::fs::fallocate(
                fd.as_fd(),
                FallocateFlags::from_bits_retain(*mode),
                *offset,
                *len,
            )?;
        }
        Op::CopyRange {
            src,
            src_offset,
            dst,
            dst_offset,
            len,
        } => {
            let src = table.data_fd(*src)?;
            let dst = table.data_fd(*dst)?;
            let copied = copy_range(src.as_fd(), *src_offset, dst.as_fd(), *dst_offset, *len)?;
            return Ok(Applied::Copied(copied));
        }
        Op::SetXattr {
            id,
            name,
            value,
            flags,
        } => {
            let fd = xattr_target(table, *id)?;
            rustix::fs::setxattr(
                proc_path(fd.as_fd()),
                name.as_os_str(),
                value.as_bytes(),
                XattrFlags::from_bits(*flags).ok_or(Errno::INVAL)?,
            )?;
        }
        Op::RemoveXattr { id, name } => {
            let fd = xattr_target(table, *id)?;
            rustix::fs::removexattr(proc_path(fd.as_fd()), name.as_os_str())?;
        }
        Op::Fsync { id, datasync } => {
            let fd = table.data_fd(*id)?;
            if *datasync {
                rustix::fs::fdatasync(fd.as_fd())?;
            } else {
                rustix::fs::fsync(fd.as_fd())?;
            }
        }
    }
    Ok(Applied::Done)
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_file_size_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let fd = rustix::fs::open(dir.path(), OFlags::PATH, Mode::empty()).unwrap();
        let max = max_file_size(fd.as_fd());
        // Accepted, and one byte more is not (unless it is the kernel's limit).
        let f = tempfile::tempfile_in(dir.path()).unwrap();
        f.set_len(max).unwrap();
        if max < i64::MAX as u64 {
            assert!(f.set_len(max + 1).is_err());
        }
        f.set_len(0).unwrap();
    }

    /// A chain of `depth` directories `d/d/d…` under `top`, made holding one
    /// descriptor at a time.
    fn deep_chain(top: &std::path::Path, depth: usize) {
        let mut cur =
            rustix::fs::open(top, OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).unwrap();
        for _ in 0..depth {
            rustix::fs::mkdirat(cur.as_fd(), "d", Mode::from_raw_mode(0o700)).unwrap();
            cur = rustix::fs::openat(
                cur.as_fd(),
                "d",
                OFlags::PATH | OFlags::DIRECTORY,
                Mode::empty(),
            )
            .unwrap();
        }
        rustix::fs::symlinkat("/etc/passwd", cur.as_fd(), "link").unwrap();
    }

    #[test]
    fn a_very_deep_tree_is_removed_without_recursion() {
        // tmpfs where there is one: 100,000 directories on a disk take long.
        let dir = tempfile::tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .unwrap();
        let top = dir.path().join("top");
        std::fs::create_dir(&top).unwrap();
        deep_chain(&top, 100_000);
        // Something wide next to it, and a symlink to a directory (removed as a link).
        std::fs::create_dir_all(top.join("w/x/y")).unwrap();
        for i in 0..300 {
            std::fs::write(top.join(format!("w/f{i}")), b"x").unwrap();
            std::fs::create_dir(top.join(format!("w/x/d{i}"))).unwrap();
        }
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), b"keep").unwrap();
        std::os::unix::fs::symlink(&outside, top.join("w/to-outside")).unwrap();
        let fd = rustix::fs::open(&top, OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).unwrap();
        // A small stack: the old recursive removal overflowed it (and ran out of
        // descriptors, two per level).
        let worker = std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || remove_beneath(fd.as_fd()))
            .unwrap();
        worker.join().unwrap().unwrap();
        assert_eq!(std::fs::read_dir(&top).unwrap().count(), 0);
        assert_eq!(std::fs::read(outside.join("keep")).unwrap(), b"keep");
    }
}
