//! Saving a split-brain loser's data aside before a resync overwrites it (design,
//! "Reintegration", **beyond**): nothing it wrote on its own is lost irretrievably.
//!
//! A receiver started with `--save-aside` copies, before applying an operation
//! that destroys local bytes (write, punch/zero/collapse, shrinking truncate,
//! removal), the bytes it is about to lose into
//! `STATEDIR/diverged/<UTC time>/`:
//!
//! - `blocks.bin`: the raw bytes, one region after the other;
//! - `manifest.tsv`: `path<TAB>offset<TAB>length<TAB>offset in blocks.bin`, one
//!   line per region, so `dd if=blocks.bin bs=1 skip=<4th> count=<3rd>` gives the
//!   bytes that were at `<offset>` of `<path>`;
//! - `removed/<path>`: whole files the resync removed;
//! - `journal`: this node's namespace journal (names it changed on its own);
//! - `README`: the above, for the operator.
//!
//! Each 4 KiB block is saved once per folder (its first overwrite is what the node
//! had). Everything is fsynced before the operation is applied; a failure to save
//! (a full disk) fails the operation, and with it the resync, with nothing lost.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{FileType, OFlags};

use crate::apply::{self, Errno};
use crate::op::{Name, NodeId, Op};

const BLOCK: u64 = 4096;
const README: &str = "This node lost a split brain: a resync from the other node replaced its data.\n\
Before any of its bytes were overwritten or removed they were saved here.\n\
manifest.tsv: path, offset, length, offset in blocks.bin (tab separated).\n\
  dd if=blocks.bin bs=1 skip=<4th column> count=<3rd column> gives what was at <offset> of <path>.\n\
removed/: whole files the resync removed. journal: names this node changed on its own.\n";

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
    manifest: File,
    blocks_len: u64,
    /// (backing inode, block) already saved.
    saved: HashSet<(u64, u64)>,
    removed: usize,
    root_path: Vec<u8>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AsideError + '_ {
    move |source| AsideError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl SaveAside {
    /// Creates `state/diverged/<now>/` (with the journal, if any) for data under
    /// the directory `root`.
    pub fn create(state: &Path, root: BorrowedFd<'_>) -> Result<SaveAside, AsideError> {
        let stamp = humantime_stamp();
        let dir = state.join("diverged").join(stamp);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io(&dir))?;
        let open = |name: &str| {
            let path = dir.join(name);
            OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&path)
                .map_err(io(&path))
        };
        let blocks = open("blocks.bin")?;
        let mut manifest = open("manifest.tsv")?;
        manifest
            .write_all(b"# path\toffset\tlength\toffset_in_blocks.bin\n")
            .map_err(io(&dir))?;
        std::fs::write(dir.join("README"), README).map_err(io(&dir))?;
        let journal = state.join("track").join("journal");
        if journal.exists() {
            std::fs::copy(&journal, dir.join("journal")).map_err(io(&journal))?;
        }
        let root_path = rustix::fs::readlinkat(rustix::fs::CWD, apply::proc_path(root), Vec::new())
            .map(|p| p.into_bytes())
            .unwrap_or_default();
        tracing::warn!(dir = %dir.display(), "saving this node's diverged data aside before the resync overwrites it");
        Ok(SaveAside {
            dir,
            blocks,
            manifest,
            blocks_len: 0,
            saved: HashSet::new(),
            removed: 0,
            root_path,
        })
    }

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

    /// Saves what `op` is about to destroy. `path_fd`/`data_fd` look up nodes.
    pub fn before(
        &mut self,
        op: &Op,
        path_fd: &dyn Fn(NodeId) -> Result<std::sync::Arc<std::os::fd::OwnedFd>, Errno>,
    ) -> Result<(), Errno> {
        let outcome = match op {
            Op::Write { id, offset, data } => {
                self.save_range(path_fd(*id)?.as_fd(), *offset, data.len() as u64)
            }
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
                let shifts = (libc::FALLOC_FL_COLLAPSE_RANGE | libc::FALLOC_FL_INSERT_RANGE) as u32;
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
            Op::Remove { parent, name } | Op::Unlink { parent, name } => {
                self.save_removed(path_fd(*parent)?.as_fd(), name)
            }
            _ => return Ok(()),
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

    /// Saves the bytes present in `[offset, offset + len)` of a regular file, block by
    /// block, each block once.
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
        let end = offset.saturating_add(len).min(size);
        if offset >= end {
            return Ok(());
        }
        let file = apply::reopen(path_fd, OFlags::RDONLY).map_err(|e| AsideError::Io {
            path: self.dir.clone(),
            source: e.into(),
        })?;
        let path = String::from_utf8_lossy(&self.relative(path_fd)).into_owned();
        let mut lines = String::new();
        let mut block = offset / BLOCK;
        while block * BLOCK < end {
            if !self.saved.insert((st.st_ino, block)) {
                block += 1;
                continue;
            }
            // A run of consecutive unsaved blocks becomes one manifest line.
            let run_start = block;
            block += 1;
            while block * BLOCK < end && !self.saved.contains(&(st.st_ino, block)) {
                self.saved.insert((st.st_ino, block));
                block += 1;
            }
            // Whole blocks: a block counts as saved for any later overwrite inside it.
            let (from, to) = (run_start * BLOCK, (block * BLOCK).min(size));
            let mut buf = vec![0u8; (to - from) as usize];
            let n = crate::fuse_fs::read_full(file.as_fd(), &mut buf, from).map_err(|e| {
                AsideError::Io {
                    path: self.dir.clone(),
                    source: e.into(),
                }
            })?;
            buf.truncate(n);
            self.blocks.write_all(&buf).map_err(io(&self.dir))?;
            lines.push_str(&format!("{path}\t{from}\t{n}\t{}\n", self.blocks_len));
            self.blocks_len += n as u64;
        }
        if lines.is_empty() {
            return Ok(());
        }
        self.blocks.sync_data().map_err(io(&self.dir))?;
        self.manifest
            .write_all(lines.as_bytes())
            .and_then(|()| self.manifest.sync_data())
            .map_err(io(&self.dir))
    }

    /// Copies a file (or every file beneath a directory) about to be removed.
    fn save_removed(&mut self, parent: BorrowedFd<'_>, name: &Name) -> Result<(), AsideError> {
        let Ok(child) = apply::lookup_beneath(parent, name) else {
            return Ok(());
        };
        let rel = crate::track::join(&self.relative(parent), name.as_bytes());
        self.copy_out(child.as_fd(), &rel)
    }

    fn copy_out(&mut self, fd: BorrowedFd<'_>, rel: &[u8]) -> Result<(), AsideError> {
        let Ok(st) = rustix::fs::fstat(fd) else {
            return Ok(());
        };
        let target = self
            .dir
            .join("removed")
            .join(String::from_utf8_lossy(rel).as_ref());
        match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile => {
                if let Some(dir) = target.parent() {
                    std::fs::create_dir_all(dir).map_err(io(dir))?;
                }
                let mut src =
                    File::from(
                        apply::reopen(fd, OFlags::RDONLY).map_err(|e| AsideError::Io {
                            path: target.clone(),
                            source: e.into(),
                        })?,
                    );
                let mut dst = File::create(&target).map_err(io(&target))?;
                std::io::copy(&mut src, &mut dst).map_err(io(&target))?;
                self.removed += 1;
                dst.sync_all().map_err(io(&target))
            }
            FileType::Directory => {
                for e in crate::track::walk_one(fd).map_err(|e| AsideError::Io {
                    path: target.clone(),
                    source: e.into(),
                })? {
                    let child = crate::track::join(rel, &e.path);
                    self.copy_out(e.fd.as_fd(), &child)?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// `20261126T024900Z`, from the system clock.
fn humantime_stamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = secs / 86400;
    let rem = secs % 86400;
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;

    #[test]
    fn dates_are_civil() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_418), (2025, 11, 26));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
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
        aside.before(&write(100, 50), &lookup).unwrap();
        // The same block again: already saved.
        aside.before(&write(200, 50), &lookup).unwrap();
        aside
            .before(&Op::Truncate { id: 2, size: 8192 }, &lookup)
            .unwrap();
        aside
            .before(
                &Op::Remove {
                    parent: 1,
                    name: Name::new(&b"sub"[..]).unwrap(),
                },
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
}
