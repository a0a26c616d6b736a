//! Saving a split-brain loser's data aside before a resync overwrites it (design,
//! "Reintegration", **beyond**): nothing it wrote on its own is lost irretrievably.
//!
//! A receiver started with `--save-aside` copies, before applying an operation
//! that destroys local bytes, the bytes it is about to lose into
//! `STATEDIR/diverged/<UTC time>/`. Every destructive operation a resync (or the
//! live stream during it) can carry is covered: writes, `CopyRange` into existing
//! data, punch/zero/collapse/insert, shrinking truncates, removals (`Remove`,
//! `Unlink`), a rename over an existing entry, and `Wipe` (a full sync emptying the
//! directory). The folder holds:
//!
//! - `blocks.bin`: the raw bytes, one region after the other (each region starts
//!   on a 4 KiB boundary); holes of the source stay holes here;
//! - `manifest.tsv`: `path<TAB>offset<TAB>length<TAB>offset in blocks.bin`, one
//!   line per region, so `dd if=blocks.bin bs=1 skip=<4th> count=<3rd>` gives the
//!   bytes that were at `<offset>` of `<path>`;
//! - `removed/<path>`: whole files (and symlinks) the resync removed or replaced,
//!   sparse like the originals; a second copy of the same path gets `.1`, `.2`, …;
//! - `journal`: this node's namespace journal (names it changed on its own);
//! - `README`: the above, for the operator.
//!
//! Files are created 0600 and folders 0700 whatever the process umask: the data
//! is the VMs' disks.
//!
//! Memory stays bounded whatever the size of the region or tree: bytes move with
//! `copy_file_range` (or a 1 MiB buffer where the kernel cannot), what was saved
//! is kept as merged byte ranges per file (not per block), and removed trees are
//! walked holding a few descriptors per directory level.
//!
//! Each 4 KiB block is saved once per folder (its first overwrite is what the node
//! had). Everything is durable before the operation is applied; a failure to save
//! (a full disk) fails the operation, and with it the resync, with nothing lost.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{FileType, OFlags, SeekFrom};

use crate::apply::{self, Errno};
use crate::op::{Control, Name, NodeId, Op, Request};

const BLOCK: u64 = 4096;
/// Largest piece one copy call moves (and the fallback buffer's size).
const PIECE_LEN: usize = 1 << 20;
const PIECE: u64 = PIECE_LEN as u64;
const README: &str = "This node lost a split brain: a resync from the other node replaced its data.\n\
Before any of its bytes were overwritten or removed they were saved here.\n\
manifest.tsv: path, offset, length, offset in blocks.bin (tab separated).\n\
  dd if=blocks.bin bs=1 skip=<4th column> count=<3rd column> gives what was at <offset> of <path>.\n\
  (holes of the original are holes in blocks.bin: they read as zeros)\n\
removed/: whole files the resync removed or replaced (a second copy of a path gets .1, .2, ...).\n\
journal: names this node changed on its own.\n";

/// Errors saving aside.
#[derive(Debug, thiserror::Error)]
pub enum AsideError {
    #[error("saving diverged data to {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where one resync's overwritten data goes.
#[derive(Debug)]
pub struct SaveAside {
    dir: PathBuf,
    blocks: File,
    manifest: BufWriter<File>,
    /// End of the data in `blocks.bin`.
    blocks_len: u64,
    /// Per backing inode: the byte ranges already saved (sorted, disjoint).
    saved: HashMap<u64, Vec<(u64, u64)>>,
    removed: usize,
    root_path: Vec<u8>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AsideError + '_ {
    move |source| AsideError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn errno(path: &Path) -> impl FnOnce(Errno) -> AsideError + '_ {
    move |e| AsideError::Io {
        path: path.to_path_buf(),
        source: e.into(),
    }
}

/// A new private file (0600), never replacing one.
fn create_private(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// Creates `path` (0700) and any missing parent beneath an existing one (0700).
fn create_private_dirs(path: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

fn round_up(x: u64) -> u64 {
    x.div_ceil(BLOCK) * BLOCK
}

/// The parts of `[from, to)` not in `set` (sorted, disjoint).
fn gaps(set: &[(u64, u64)], from: u64, to: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut pos = from;
    let first = set.partition_point(|&(_, e)| e <= from);
    for &(s, e) in &set[first..] {
        if s >= to {
            break;
        }
        if s > pos {
            out.push((pos, s));
        }
        pos = pos.max(e);
        if pos >= to {
            break;
        }
    }
    if pos < to {
        out.push((pos, to));
    }
    out
}

/// Adds `[from, to)` to `set`, merging neighbours.
fn insert(set: &mut Vec<(u64, u64)>, from: u64, to: u64) {
    let lo = set.partition_point(|&(_, e)| e < from);
    let hi = set.partition_point(|&(s, _)| s <= to);
    let (mut s, mut e) = (from, to);
    if lo < hi {
        s = s.min(set[lo].0);
        e = e.max(set[hi - 1].1);
    }
    set.splice(lo..hi, [(s, e)]);
}

/// Copies `len` bytes from `src` at `from` to `dst` at `to`, in the kernel where it
/// can (`copy_file_range`), else through a 1 MiB buffer. Stops early at the end of
/// `src`; returns the bytes copied.
fn copy_bytes(
    src: BorrowedFd<'_>,
    from: u64,
    dst: BorrowedFd<'_>,
    to: u64,
    len: u64,
) -> Result<u64, Errno> {
    let (mut off_in, mut off_out) = (from, to);
    let end = from + len;
    let mut buf: Vec<u8> = Vec::new();
    while off_in < end {
        let want = (end - off_in).min(PIECE) as usize;
        if buf.is_empty() {
            match rustix::fs::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), want)
            {
                Ok(0) => break,
                Ok(_) => continue,
                Err(Errno::XDEV | Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) => {
                    buf = vec![0u8; PIECE_LEN];
                }
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e),
            }
        }
        let n = crate::fdio::read_full(src, &mut buf[..want], off_in)?;
        if n == 0 {
            break;
        }
        apply::write_all_at(dst, &buf[..n], off_out)?;
        off_in += n as u64;
        off_out += n as u64;
    }
    Ok(off_in - from)
}

/// Copies `[from, to)` of `src` to `dst` at `at`, data only: holes of `src` are
/// left untouched in `dst` (holes there when `dst` is new there).
fn copy_sparse(
    src: BorrowedFd<'_>,
    from: u64,
    to: u64,
    dst: BorrowedFd<'_>,
    at: u64,
) -> Result<(), Errno> {
    let mut pos = from;
    while pos < to {
        let data = match rustix::fs::seek(src, SeekFrom::Data(pos)) {
            Ok(p) => p,
            Err(Errno::NXIO) => break,
            Err(e) => return Err(e),
        };
        if data >= to {
            break;
        }
        let hole = match rustix::fs::seek(src, SeekFrom::Hole(data)) {
            Ok(p) => p.min(to),
            Err(Errno::NXIO) => to,
            Err(e) => return Err(e),
        };
        copy_bytes(src, data, dst, at + (data - from), hole - data)?;
        pos = hole;
    }
    Ok(())
}

impl SaveAside {
    /// Creates `state/diverged/<now>/` (0700, with the journal, if any) for data
    /// under the directory `root`.
    pub fn create(state: &Path, root: BorrowedFd<'_>) -> Result<SaveAside, AsideError> {
        let parent = state.join(crate::status::DIVERGED);
        create_private_dirs(&parent).map_err(io(&parent))?;
        let stamp = humantime_stamp();
        // Two resyncs within one second get two folders.
        let mut dir = parent.join(&stamp);
        for n in 1.. {
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    dir = parent.join(format!("{stamp}.{n}"));
                }
                Err(e) => return Err(io(&dir)(e)),
            }
        }
        let open = |name: &str| {
            let path = dir.join(name);
            create_private(&path).map_err(io(&path))
        };
        let blocks = open("blocks.bin")?;
        let mut manifest = BufWriter::new(open("manifest.tsv")?);
        manifest
            .write_all(b"# path\toffset\tlength\toffset_in_blocks.bin\n")
            .map_err(io(&dir))?;
        open("README")?
            .write_all(README.as_bytes())
            .map_err(io(&dir))?;
        let journal = state.join("track").join("journal");
        if journal.exists() {
            let mut src = File::open(&journal).map_err(io(&journal))?;
            let mut dst = open("journal")?;
            std::io::copy(&mut src, &mut dst).map_err(io(&journal))?;
        }
        let root_path = rustix::fs::readlinkat(rustix::fs::CWD, apply::proc_path(root), Vec::new())
            .map(|p| p.into_bytes())
            .unwrap_or_default();
        tracing::warn!(dir = %dir.display(), "saving this node's diverged data aside before the resync overwrites it");
        let aside = SaveAside {
            dir,
            blocks,
            manifest,
            blocks_len: 0,
            saved: HashMap::new(),
            removed: 0,
            root_path,
        };
        aside.sync()?;
        Ok(aside)
    }

    /// Where this save goes (the tests read it back).
    #[cfg(test)]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The resync finished. Returns the folder, or None (and removes it) when
    /// nothing had to be saved.
    pub fn finish(self) -> Option<PathBuf> {
        if self.blocks_len > 0 || self.removed > 0 {
            return Some(self.dir);
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!("removing empty {}: {e}", self.dir.display());
        }
        None
    }

    /// Saves what `request` is about to destroy (a mutation, or a sync's `Remove` or
    /// `Wipe`). `path_fd` looks up nodes.
    pub fn before(
        &mut self,
        request: &Request,
        path_fd: &dyn Fn(NodeId) -> Result<std::sync::Arc<OwnedFd>, Errno>,
    ) -> Result<(), Errno> {
        let outcome = match request {
            Request::Control(Control::Remove { parent, name }) => {
                self.save_removed(path_fd(*parent)?.as_fd(), name)
            }
            Request::Control(Control::Wipe) => self.save_tree(path_fd(crate::op::ROOT)?.as_fd()),
            Request::Control(_) => return Ok(()),
            Request::Op(op) => match op {
                Op::Write { id, offset, data } => {
                    self.save_range(path_fd(*id)?.as_fd(), *offset, data.len() as u64)
                }
                Op::CopyRange {
                    dst,
                    dst_offset,
                    len,
                    ..
                } => self.save_range(path_fd(*dst)?.as_fd(), *dst_offset, *len),
                Op::Fallocate {
                    id,
                    mode,
                    offset,
                    len,
                } => {
                    let destroys = (libc::FALLOC_FL_PUNCH_HOLE
                        | libc::FALLOC_FL_ZERO_RANGE
                        | libc::FALLOC_FL_COLLAPSE_RANGE
                        | libc::FALLOC_FL_INSERT_RANGE) as u32;
                    if mode & destroys == 0 {
                        return Ok(());
                    }
                    let fd = path_fd(*id)?;
                    // Collapse/insert shift the rest of the file: save all of it.
                    let shifts =
                        (libc::FALLOC_FL_COLLAPSE_RANGE | libc::FALLOC_FL_INSERT_RANGE) as u32;
                    let len = if mode & shifts != 0 {
                        u64::MAX - offset
                    } else {
                        *len
                    };
                    self.save_range(fd.as_fd(), *offset, len)
                }
                Op::Truncate { id, size } => {
                    let fd = path_fd(*id)?;
                    self.save_range(fd.as_fd(), *size, u64::MAX - size)
                }
                Op::Unlink { parent, name } => self.save_removed(path_fd(*parent)?.as_fd(), name),
                Op::Rename {
                    parent,
                    name,
                    new_parent,
                    new_name,
                    flags,
                } => {
                    // Exchange keeps both entries; no-replace fails rather than replace.
                    if flags & (libc::RENAME_EXCHANGE | libc::RENAME_NOREPLACE) != 0 {
                        return Ok(());
                    }
                    self.save_replaced(
                        path_fd(*parent)?.as_fd(),
                        name,
                        path_fd(*new_parent)?.as_fd(),
                        new_name,
                    )
                }
                _ => return Ok(()),
            },
        };
        outcome.map_err(|e| {
            tracing::error!("{e}");
            Errno::IO
        })
    }

    fn relative(&self, fd: BorrowedFd<'_>) -> Vec<u8> {
        let path = rustix::fs::readlinkat(rustix::fs::CWD, apply::proc_path(fd), Vec::new())
            .map(|p| p.into_bytes())
            .unwrap_or_default();
        match path.strip_prefix(self.root_path.as_slice()) {
            Some(rest) => rest.strip_prefix(b"/").unwrap_or(rest).to_vec(),
            None => path,
        }
    }

    /// Makes everything saved so far durable.
    fn sync(&self) -> Result<(), AsideError> {
        rustix::fs::syncfs(self.blocks.as_fd()).map_err(errno(&self.dir))
    }

    /// Saves the bytes present in `[offset, offset + len)` of a regular file, whole
    /// 4 KiB blocks, each once.
    fn save_range(
        &mut self,
        path_fd: BorrowedFd<'_>,
        offset: u64,
        len: u64,
    ) -> Result<(), AsideError> {
        let st = match rustix::fs::fstat(path_fd) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::RegularFile => st,
            _ => return Ok(()),
        };
        let size = st.st_size as u64;
        if offset >= offset.saturating_add(len).min(size) {
            return Ok(());
        }
        // Whole blocks: a block counts as saved for any later overwrite inside it.
        let from = offset / BLOCK * BLOCK;
        let to = round_up(offset.saturating_add(len).min(size));
        let todo = gaps(
            self.saved.get(&st.st_ino).map_or(&[][..], |v| v.as_slice()),
            from,
            to,
        );
        if todo.is_empty() {
            return Ok(());
        }
        let file = apply::reopen(path_fd, OFlags::RDONLY).map_err(errno(&self.dir))?;
        let path = String::from_utf8_lossy(&self.relative(path_fd)).into_owned();
        for (start, end) in todo {
            let end_data = end.min(size);
            let at = round_up(self.blocks_len);
            copy_sparse(file.as_fd(), start, end_data, self.blocks.as_fd(), at)
                .map_err(errno(&self.dir))?;
            writeln!(self.manifest, "{path}\t{start}\t{}\t{at}", end_data - start)
                .map_err(io(&self.dir))?;
            self.blocks_len = at + (end_data - start);
            insert(self.saved.entry(st.st_ino).or_default(), start, end);
        }
        // Trailing holes count too: the file ends where the saved data ends.
        self.blocks
            .set_len(self.blocks_len)
            .map_err(io(&self.dir))?;
        self.manifest.flush().map_err(io(&self.dir))?;
        self.blocks.sync_data().map_err(io(&self.dir))?;
        self.manifest.get_ref().sync_data().map_err(io(&self.dir))
    }

    /// Copies a file (or every file beneath a directory) about to be removed.
    fn save_removed(&mut self, parent: BorrowedFd<'_>, name: &Name) -> Result<(), AsideError> {
        let Ok(child) = apply::lookup_beneath(parent, name) else {
            return Ok(());
        };
        let rel = crate::track::join(&self.relative(parent), name.as_bytes());
        self.copy_out(child.as_fd(), &rel)?;
        self.sync()
    }

    /// A rename is about to replace `new_parent/new_name` (if it exists and is not
    /// the entry being renamed).
    fn save_replaced(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &Name,
        new_parent: BorrowedFd<'_>,
        new_name: &Name,
    ) -> Result<(), AsideError> {
        let Ok(target) = apply::lookup_beneath(new_parent, new_name) else {
            return Ok(());
        };
        let same = match (
            apply::lookup_beneath(parent, name).and_then(|s| rustix::fs::fstat(s.as_fd())),
            rustix::fs::fstat(target.as_fd()),
        ) {
            (Ok(a), Ok(b)) => a.st_dev == b.st_dev && a.st_ino == b.st_ino,
            _ => false,
        };
        if same {
            return Ok(());
        }
        self.save_removed(new_parent, new_name)
    }

    /// Full sync: the whole tree is about to go.
    fn save_tree(&mut self, root: BorrowedFd<'_>) -> Result<(), AsideError> {
        let base = self.dir.join("removed");
        create_private_dirs(&base).map_err(io(&base))?;
        self.copy_children(root, &base)?;
        self.sync()
    }

    /// Copies the entry `fd` to `removed/<rel>`.
    fn copy_out(&mut self, fd: BorrowedFd<'_>, rel: &[u8]) -> Result<(), AsideError> {
        let Ok(st) = rustix::fs::fstat(fd) else {
            return Ok(());
        };
        let target = self
            .dir
            .join("removed")
            .join(String::from_utf8_lossy(rel).as_ref());
        if let Some(parent) = target.parent() {
            create_private_dirs(parent).map_err(io(parent))?;
        }
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => {
                let target = unique(&target, |p| {
                    std::fs::DirBuilder::new().mode(0o700).create(p)
                })?
                .1;
                self.copy_children(fd, &target)
            }
            _ => self.copy_entry(fd, &st, &target),
        }
    }

    /// Copies everything beneath the directory `dir` into the existing `target`.
    fn copy_children(&mut self, dir: BorrowedFd<'_>, target: &Path) -> Result<(), AsideError> {
        crate::track::walk_each(dir, |e: &crate::track::WalkEntry| {
            let path = target.join(String::from_utf8_lossy(&e.path).as_ref());
            if FileType::from_raw_mode(e.st.st_mode) == FileType::Directory {
                create_private_dirs(&path).map_err(io(&path))?;
            } else {
                self.copy_entry(e.fd.as_fd(), &e.st, &path)?;
            }
            Ok::<(), WalkError>(())
        })
        .map_err(|e: WalkError| match e {
            WalkError::Walk(e) => errno(target)(e),
            WalkError::Aside(e) => e,
        })
    }

    /// Copies one non-directory entry to `target` (or `target.N` if taken).
    fn copy_entry(
        &mut self,
        fd: BorrowedFd<'_>,
        st: &rustix::fs::Stat,
        target: &Path,
    ) -> Result<(), AsideError> {
        match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile => {
                let src = apply::reopen(fd, OFlags::RDONLY).map_err(errno(target))?;
                let (dst, path) = unique(target, create_private)?;
                let size = st.st_size as u64;
                copy_sparse(src.as_fd(), 0, size, dst.as_fd(), 0).map_err(errno(&path))?;
                dst.set_len(size).map_err(io(&path))?;
                self.removed += 1;
                Ok(())
            }
            FileType::Symlink => {
                let link = rustix::fs::readlinkat(fd, "", Vec::new()).map_err(errno(target))?;
                let link = std::ffi::OsStr::from_bytes(link.as_bytes());
                unique(target, |p| std::os::unix::fs::symlink(link, p))?;
                self.removed += 1;
                Ok(())
            }
            // Fifos, sockets, devices hold no data.
            _ => Ok(()),
        }
    }
}

/// What a walk of a removed tree failed on.
enum WalkError {
    Walk(Errno),
    Aside(AsideError),
}

impl From<Errno> for WalkError {
    fn from(e: Errno) -> Self {
        WalkError::Walk(e)
    }
}

impl From<AsideError> for WalkError {
    fn from(e: AsideError) -> Self {
        WalkError::Aside(e)
    }
}

/// Creates `path` with `make`, or `path.1`, `path.2`, … when it exists: an earlier
/// saved copy is never replaced.
fn unique<T>(
    path: &Path,
    make: impl Fn(&Path) -> std::io::Result<T>,
) -> Result<(T, PathBuf), AsideError> {
    let mut candidate = path.to_path_buf();
    for n in 1u32.. {
        match make(&candidate) {
            Ok(t) => return Ok((t, candidate)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let mut name = path.as_os_str().to_owned();
                name.push(format!(".{n}"));
                candidate = PathBuf::from(name);
            }
            Err(e) => return Err(io(&candidate)(e)),
        }
    }
    Err(io(path)(std::io::ErrorKind::AlreadyExists.into()))
}

/// `20261126T024900Z`, from the system clock (RFC 3339 without separators:
/// a folder name that sorts by time).
fn humantime_stamp() -> String {
    stamp_of(std::time::SystemTime::now())
}

fn stamp_of(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .replace(['-', ':'], "")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;

    #[test]
    fn stamps_are_utc_and_sortable() {
        let at = |s: u64| std::time::UNIX_EPOCH + std::time::Duration::from_secs(s);
        assert_eq!(stamp_of(at(0)), "19700101T000000Z");
        assert_eq!(stamp_of(at(1_764_125_340)), "20251126T024900Z");
        assert_eq!(stamp_of(at(1_709_164_800)), "20240229T000000Z");
    }

    #[test]
    fn overwritten_bytes_and_removed_files_are_saved_once() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(data.join("sub")).unwrap();
        let f = File::create(data.join("disk")).unwrap();
        f.write_all_at(&[1u8; 10000], 0).unwrap();
        std::fs::write(data.join("sub/gone"), b"bye").unwrap();
        let root = apply::reopen(
            rustix::fs::open(&data, OFlags::PATH, rustix::fs::Mode::empty())
                .unwrap()
                .as_fd(),
            OFlags::PATH,
        )
        .unwrap();
        let disk = Arc::new(
            apply::lookup_beneath(root.as_fd(), &Name::new(&b"disk"[..]).unwrap()).unwrap(),
        );
        let root = Arc::new(root);
        let lookup = |id: NodeId| -> Result<Arc<std::os::fd::OwnedFd>, Errno> {
            Ok(if id == 1 { root.clone() } else { disk.clone() })
        };
        let mut aside = SaveAside::create(&dir.path().join("state"), root.as_fd()).unwrap();
        let write = |offset: u64, len: usize| Op::Write {
            id: 2,
            offset,
            data: crate::buffer::Payload::Aligned(Arc::new(crate::buffer::AlignedBuf::zeroed(len))),
        };
        aside.before(&write(100, 50).into(), &lookup).unwrap();
        // The same block again: already saved.
        aside.before(&write(200, 50).into(), &lookup).unwrap();
        aside
            .before(&Op::Truncate { id: 2, size: 8192 }.into(), &lookup)
            .unwrap();
        aside
            .before(
                &Control::Remove {
                    parent: 1,
                    name: Name::new(&b"sub"[..]).unwrap(),
                }
                .into(),
                &lookup,
            )
            .unwrap();
        let manifest = std::fs::read_to_string(aside.dir().join("manifest.tsv")).unwrap();
        let lines: Vec<&str> = manifest.lines().skip(1).collect();
        assert_eq!(lines, vec!["disk\t0\t4096\t0", "disk\t8192\t1808\t4096"]);
        let blocks = std::fs::read(aside.dir().join("blocks.bin")).unwrap();
        assert_eq!(blocks, vec![1u8; 4096 + 1808]);
        assert_eq!(
            std::fs::read(aside.dir().join("removed/sub/gone")).unwrap(),
            b"bye"
        );
    }

    /// A backing directory with nodes bound by id, as a receiver's session has.
    struct Fixture {
        dir: tempfile::TempDir,
        ids: std::collections::HashMap<NodeId, Arc<OwnedFd>>,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(dir.path().join("data")).unwrap();
            let root = rustix::fs::open(
                dir.path().join("data"),
                OFlags::PATH,
                rustix::fs::Mode::empty(),
            )
            .unwrap();
            let mut ids = std::collections::HashMap::new();
            ids.insert(crate::op::ROOT, Arc::new(root));
            Fixture { dir, ids }
        }
        fn data(&self) -> PathBuf {
            self.dir.path().join("data")
        }
        fn bind(&mut self, id: NodeId, rel: &str) {
            let fd = rustix::fs::open(
                self.data().join(rel),
                OFlags::PATH,
                rustix::fs::Mode::empty(),
            )
            .unwrap();
            self.ids.insert(id, Arc::new(fd));
        }
        fn aside(&self) -> SaveAside {
            SaveAside::create(
                &self.dir.path().join("state"),
                self.ids[&crate::op::ROOT].as_fd(),
            )
            .unwrap()
        }
        fn before(&self, aside: &mut SaveAside, op: impl Into<Request>) {
            let ids = &self.ids;
            aside
                .before(&op.into(), &|id| ids.get(&id).cloned().ok_or(Errno::STALE))
                .unwrap();
        }
    }

    fn name(s: &str) -> Name {
        Name::new(s.as_bytes()).unwrap()
    }

    /// (path, offset, bytes) of every manifest line.
    fn manifest(aside: &SaveAside) -> Vec<(String, u64, Vec<u8>)> {
        let blocks = std::fs::read(aside.dir().join("blocks.bin")).unwrap();
        std::fs::read_to_string(aside.dir().join("manifest.tsv"))
            .unwrap()
            .lines()
            .skip(1)
            .map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                let (off, len, at): (u64, usize, usize) = (
                    f[1].parse().unwrap(),
                    f[2].parse().unwrap(),
                    f[3].parse().unwrap(),
                );
                (f[0].to_string(), off, blocks[at..at + len].to_vec())
            })
            .collect()
    }

    #[test]
    fn renames_over_copies_into_and_wipes_save_first() {
        let mut fx = Fixture::new();
        std::fs::create_dir_all(fx.data().join("d/e")).unwrap();
        std::fs::write(fx.data().join("d/src"), b"new").unwrap();
        std::fs::write(fx.data().join("d/victim"), b"old victim").unwrap();
        std::fs::write(fx.data().join("d/e/deep"), b"deep").unwrap();
        std::os::unix::fs::symlink("victim", fx.data().join("d/link")).unwrap();
        std::fs::write(fx.data().join("target"), vec![7u8; 20000]).unwrap();
        fx.bind(2, "d");
        fx.bind(3, "target");
        fx.bind(4, "d/src");
        let mut aside = fx.aside();
        // A rename over an existing file destroys it.
        let rename = |flags| Op::Rename {
            parent: 2,
            name: name("src"),
            new_parent: 2,
            new_name: name("victim"),
            flags,
        };
        fx.before(&mut aside, rename(libc::RENAME_EXCHANGE));
        assert!(
            !aside.dir().join("removed/d/victim").exists(),
            "exchange destroys nothing"
        );
        fx.before(&mut aside, rename(0));
        assert_eq!(
            std::fs::read(aside.dir().join("removed/d/victim")).unwrap(),
            b"old victim"
        );
        // Renaming a name onto another name of the same file destroys nothing.
        std::fs::hard_link(fx.data().join("d/src"), fx.data().join("d/alias")).unwrap();
        fx.before(
            &mut aside,
            Op::Rename {
                parent: 2,
                name: name("src"),
                new_parent: 2,
                new_name: name("alias"),
                flags: 0,
            },
        );
        assert!(!aside.dir().join("removed/d/alias").exists());
        // A copy into existing data.
        fx.before(
            &mut aside,
            Op::CopyRange {
                src: 4,
                src_offset: 0,
                dst: 3,
                dst_offset: 5000,
                len: 3,
            },
        );
        assert_eq!(
            manifest(&aside),
            vec![("target".into(), 4096, vec![7u8; 4096])]
        );
        // A full sync empties everything: all of it is saved, symlinks as symlinks.
        fx.before(&mut aside, Control::Wipe);
        let removed = aside.dir().join("removed");
        assert_eq!(std::fs::read(removed.join("d/e/deep")).unwrap(), b"deep");
        assert_eq!(
            std::fs::read(removed.join("target")).unwrap(),
            vec![7u8; 20000]
        );
        assert_eq!(
            std::fs::read_link(removed.join("d/link")).unwrap(),
            Path::new("victim")
        );
        // The victim saved earlier is kept; the wipe's copy of that path comes next to it.
        assert_eq!(
            std::fs::read(removed.join("d/victim")).unwrap(),
            b"old victim"
        );
        assert_eq!(
            std::fs::read(removed.join("d/victim.1")).unwrap(),
            b"old victim"
        );
    }

    #[test]
    fn saved_aside_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let mut fx = Fixture::new();
        std::fs::create_dir_all(fx.data().join("a/b")).unwrap();
        std::fs::write(fx.data().join("a/b/f"), b"x").unwrap();
        std::fs::write(fx.data().join("disk"), vec![1u8; 8192]).unwrap();
        fx.bind(2, "disk");
        let mut aside = fx.aside();
        fx.before(&mut aside, Op::Truncate { id: 2, size: 0 });
        fx.before(
            &mut aside,
            Control::Remove {
                parent: 1,
                name: name("a"),
            },
        );
        let mut seen = 0;
        crate::track::walk_each(
            rustix::fs::open(
                fx.dir.path().join("state/diverged"),
                OFlags::PATH,
                rustix::fs::Mode::empty(),
            )
            .unwrap()
            .as_fd(),
            |e: &crate::track::WalkEntry| {
                let mode = e.st.st_mode & 0o7777;
                let want = if FileType::from_raw_mode(e.st.st_mode) == FileType::Directory {
                    0o700
                } else {
                    0o600
                };
                assert_eq!(mode, want, "{}", String::from_utf8_lossy(&e.path));
                seen += 1;
                Ok::<(), Errno>(())
            },
        )
        .unwrap();
        assert!(seen >= 8, "only {seen} entries");
        let top = std::fs::metadata(fx.dir.path().join("state/diverged")).unwrap();
        assert_eq!(top.permissions().mode() & 0o7777, 0o700);
    }

    #[test]
    fn a_large_sparse_region_is_saved_sparse_and_in_ranges() {
        use std::os::unix::fs::MetadataExt;
        const GIB: u64 = 1 << 30;
        let mut fx = Fixture::new();
        let f = File::create(fx.data().join("disk")).unwrap();
        f.set_len(8 * GIB).unwrap();
        // Data at a few places of an 8 GiB sparse file.
        for (i, at) in [0u64, 3 * GIB + 12345, 8 * GIB - 4096].iter().enumerate() {
            f.write_all_at(&vec![u8::try_from(i).unwrap() + 1; 4096], *at)
                .unwrap();
        }
        fx.bind(2, "disk");
        let mut aside = fx.aside();
        // Punch all of it: 8 GiB would not fit a buffer; the holes stay holes.
        fx.before(
            &mut aside,
            Op::Fallocate {
                id: 2,
                mode: (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u32,
                offset: 0,
                len: 8 * GIB,
            },
        );
        let blocks = std::fs::metadata(aside.dir().join("blocks.bin")).unwrap();
        assert_eq!(blocks.len(), 8 * GIB);
        assert!(
            blocks.blocks() * 512 <= 64 << 10,
            "holes were filled: {}",
            blocks.blocks()
        );
        let bin = File::open(aside.dir().join("blocks.bin")).unwrap();
        let mut buf = vec![0u8; 4096];
        bin.read_exact_at(&mut buf, 3 * GIB + 12345).unwrap();
        assert_eq!(buf, vec![2u8; 4096]);
        // Saved once: as one range, not millions of blocks.
        assert_eq!(
            aside.saved[&f.metadata().unwrap().ino()],
            vec![(0, 8 * GIB)]
        );
        fx.before(&mut aside, Op::Truncate { id: 2, size: 0 });
        assert_eq!(
            std::fs::read_to_string(aside.dir().join("manifest.tsv"))
                .unwrap()
                .lines()
                .count(),
            2
        );
    }

    #[test]
    fn saved_ranges_merge_and_gaps_are_exact() {
        let mut set = Vec::new();
        insert(&mut set, 10, 20);
        insert(&mut set, 30, 40);
        assert_eq!(gaps(&set, 0, 50), vec![(0, 10), (20, 30), (40, 50)]);
        assert_eq!(gaps(&set, 12, 18), vec![]);
        assert_eq!(gaps(&set, 15, 35), vec![(20, 30)]);
        insert(&mut set, 20, 30);
        assert_eq!(set, vec![(10, 40)]);
        insert(&mut set, 0, 5);
        insert(&mut set, 45, 50);
        insert(&mut set, 4, 46);
        assert_eq!(set, vec![(0, 50)]);
    }
}
