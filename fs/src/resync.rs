//! Bringing a newly attached peer up to date while the VM keeps writing: a full copy
//! that travels through the same ordered stream as live mutations.
//!
//! 1. Under the namespace lock (no create/rename/unlink meanwhile) the receiver's
//!    directory is wiped and the whole tree is recreated there — directories, files
//!    with their size, symlinks, hard links, owners, modes, xattrs — with the same
//!    node ids the kernel uses, so live operations on open files name the right file.
//!    Until then live mutations are applied locally only (`Attaching`).
//! 2. The link starts sending every live mutation (`Syncing`); the data of every file
//!    is copied chunk by chunk, each chunk read and queued under that file's range
//!    lock, so a live write to the same range is ordered before or after it on both
//!    nodes. Holes are skipped; the final size is sent under the whole-file lock.
//! 3. A `SyncAll` barrier: when it is acknowledged, the receiver has applied and
//!    synced everything before it. The peer is a replica again (`finish_sync`).
//!
//! Losing the peer at any point returns the link to writing alone; the peer stays
//! recorded as outdated. Files unlinked while open (no name to recreate) are not
//! copied: a later write to one makes the sync give up (never a silent gap).

use std::collections::{HashSet, VecDeque};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use rustix::fs::{FileType, OFlags, SeekFrom};

use crate::apply::{self, Errno};
use crate::buffer::{AlignedBuf, Payload};
use crate::inodes::{Inodes, Node};
use crate::link::PeerLink;
use crate::op::{LinkTarget, Name, NewNode, NodeId, NodeKind, Op, XattrValue, ROOT};

const CHUNK: u64 = 1 << 20;

/// Errors of a full sync.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("reading {what}: {errno}")]
    Local { what: String, errno: Errno },
    #[error("the peer was lost or refused an operation; writing alone")]
    PeerGone,
}

/// Bytes copied so far and to copy in all (allocated bytes of the files).
#[derive(Debug, Default)]
pub struct SyncProgress {
    pub done_bytes: AtomicU64,
    pub total_bytes: AtomicU64,
}

/// Runs one full sync; see the module documentation.
#[derive(Debug)]
pub struct Syncer {
    inodes: Arc<Inodes>,
    namespace: Arc<RwLock<()>>,
    link: PeerLink,
    progress: Arc<SyncProgress>,
    /// An operation of the sync failed on the peer.
    failed: Arc<AtomicBool>,
}

fn local(what: impl Into<String>) -> impl FnOnce(Errno) -> SyncError {
    let what = what.into();
    move |errno| SyncError::Local { what, errno }
}

impl Syncer {
    pub(crate) fn new(
        inodes: Arc<Inodes>,
        namespace: Arc<RwLock<()>>,
        link: PeerLink,
        progress: Arc<SyncProgress>,
    ) -> Self {
        Self {
            inodes,
            namespace,
            link,
            progress,
            failed: Arc::new(AtomicBool::new(false)),
        }
    }

    fn send(&self, op: Op) -> Result<(), SyncError> {
        let failed = self.failed.clone();
        let link = self.link.clone();
        let what = format!("{op:?}");
        self.link
            .enqueue_sync(
                op,
                Box::new(move |result| {
                    if let Err(errno) = result {
                        failed.store(true, Ordering::SeqCst);
                        link.diverged(&format!("sync: peer failed {what}: {errno}"));
                    }
                }),
            )
            .map_err(|_| SyncError::PeerGone)
    }

    /// Copies everything to the attached peer; returns the data bytes sent.
    pub fn run(&self) -> Result<u64, SyncError> {
        self.failed.store(false, Ordering::SeqCst);
        self.progress.done_bytes.store(0, Ordering::Relaxed);
        self.progress.total_bytes.store(0, Ordering::Relaxed);
        let mut held = Vec::new();
        let outcome = self.copy_all(&mut held);
        // The sync's own references on nodes; the kernel's stay.
        for id in held {
            if self.inodes.release_refs(id, 1) {
                self.link.submit_nowait(Op::Forget { id });
            }
        }
        let bytes = outcome?;
        if self.failed.load(Ordering::SeqCst) || !self.link.finish_sync() {
            return Err(SyncError::PeerGone);
        }
        Ok(bytes)
    }

    fn copy_all(&self, held: &mut Vec<NodeId>) -> Result<u64, SyncError> {
        let files = {
            let _no_namespace_changes = self.namespace.write();
            let files = self.copy_namespace(held)?;
            if !self.link.begin_data() {
                return Err(SyncError::PeerGone);
            }
            files
        };
        let mut bytes = 0;
        for node in files {
            bytes += self.copy_data(&node)?;
        }
        // Barrier: acknowledged once everything before it is applied and synced.
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.link
            .enqueue_sync(
                Op::SyncAll,
                Box::new(move |r| {
                    let _ = tx.send(r);
                }),
            )
            .map_err(|_| SyncError::PeerGone)?;
        match rx.recv() {
            Ok(Ok(())) => Ok(bytes),
            _ => Err(SyncError::PeerGone),
        }
    }

    fn copy_namespace(&self, held: &mut Vec<NodeId>) -> Result<Vec<Arc<Node>>, SyncError> {
        self.send(Op::Wipe)?;
        let root = self.inodes.get(ROOT).map_err(local("the root"))?;
        self.copy_attrs(&root)?;
        let mut files = Vec::new();
        let mut seen = HashSet::from([ROOT]);
        let mut dirs = VecDeque::from([root]);
        let mut total = 0u64;
        while let Some(dir) = dirs.pop_front() {
            let dir_fd = apply::reopen(dir.fd.as_fd(), OFlags::RDONLY | OFlags::DIRECTORY)
                .map_err(local("a directory"))?;
            let mut entries =
                rustix::fs::Dir::read_from(dir_fd.as_fd()).map_err(local("a directory"))?;
            while let Some(entry) = entries.read() {
                let entry = entry.map_err(local("a directory"))?;
                let raw = entry.file_name().to_bytes();
                if raw == b"." || raw == b".." {
                    continue;
                }
                let Ok(name) = Name::new(raw) else { continue };
                let fd = match apply::lookup_beneath(dir.fd.as_fd(), &name) {
                    Ok(fd) => fd,
                    Err(Errno::NOENT) => continue,
                    Err(e) => return Err(local(format!("{name:?}"))(e)),
                };
                let st = rustix::fs::fstat(fd.as_fd()).map_err(local(format!("{name:?}")))?;
                let node = self
                    .inodes
                    .reference(fd, |_| {})
                    .map_err(local(format!("{name:?}")))?;
                held.push(node.id);
                if !seen.insert(node.id) {
                    // Another name of a node already created: a hard link.
                    self.send(Op::Link {
                        id: node.id,
                        parent: dir.id,
                        name,
                    })?;
                    continue;
                }
                let new = NewNode {
                    id: node.id,
                    mode: st.st_mode & 0o7777,
                    uid: st.st_uid,
                    gid: st.st_gid,
                };
                let parent = dir.id;
                match FileType::from_raw_mode(st.st_mode) {
                    FileType::Directory => {
                        self.send(Op::Mkdir {
                            parent,
                            name,
                            node: new,
                        })?;
                        self.copy_xattrs(&node)?;
                        dirs.push_back(node);
                    }
                    FileType::Symlink => {
                        let target = rustix::fs::readlinkat(node.fd.as_fd(), "", Vec::new())
                            .map_err(local("a symlink"))?;
                        let target = LinkTarget::new(target.into_bytes())
                            .map_err(|_| local("a symlink")(Errno::INVAL))?;
                        self.send(Op::Symlink {
                            parent,
                            name,
                            node: new,
                            target,
                        })?;
                    }
                    kind => {
                        let kind = match kind {
                            FileType::Fifo => NodeKind::Fifo,
                            FileType::Socket => NodeKind::Socket,
                            FileType::CharacterDevice => NodeKind::CharDevice,
                            FileType::BlockDevice => NodeKind::BlockDevice,
                            _ => NodeKind::Regular,
                        };
                        self.send(Op::Create {
                            parent,
                            name,
                            node: new,
                            kind,
                            rdev: st.st_rdev,
                        })?;
                        self.copy_xattrs(&node)?;
                        if kind == NodeKind::Regular {
                            let size = st.st_size as u64;
                            self.send(Op::Truncate { id: node.id, size })?;
                            total += st.st_blocks as u64 * 512;
                            files.push(node);
                        }
                    }
                }
            }
        }
        self.progress.total_bytes.store(total, Ordering::Relaxed);
        Ok(files)
    }

    fn copy_attrs(&self, node: &Node) -> Result<(), SyncError> {
        let st = rustix::fs::fstat(node.fd.as_fd()).map_err(local("attributes"))?;
        self.send(Op::SetAttr {
            id: node.id,
            mode: Some(st.st_mode & 0o7777),
            uid: Some(st.st_uid),
            gid: Some(st.st_gid),
            atime: None,
            mtime: None,
        })?;
        self.copy_xattrs(node)
    }

    fn copy_xattrs(&self, node: &Node) -> Result<(), SyncError> {
        let path = apply::proc_path(node.fd.as_fd());
        let names = apply::read_sized(|buf| rustix::fs::listxattr(&path, buf)).unwrap_or_default();
        for raw in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
            let Ok(name) = Name::new(raw) else { continue };
            let Ok(value) =
                apply::read_sized(|buf| rustix::fs::getxattr(&path, name.as_os_str(), buf))
            else {
                continue;
            };
            let Ok(value) = XattrValue::new(value) else {
                continue;
            };
            self.send(Op::SetXattr {
                id: node.id,
                name,
                value,
                flags: 0,
            })?;
        }
        Ok(())
    }

    fn copy_data(&self, node: &Node) -> Result<u64, SyncError> {
        let fd = apply::reopen(node.fd.as_fd(), OFlags::RDONLY).map_err(local("a file"))?;
        let mut sent = 0u64;
        let mut offset = 0u64;
        loop {
            let start = match rustix::fs::seek(fd.as_fd(), SeekFrom::Data(offset)) {
                Ok(pos) => pos,
                Err(Errno::NXIO) => break,
                Err(e) => return Err(local("a file")(e)),
            };
            let end =
                rustix::fs::seek(fd.as_fd(), SeekFrom::Hole(start)).map_err(local("a file"))?;
            let mut pos = start;
            while pos < end {
                let len = CHUNK.min(end - pos);
                let _order = node.ranges.lock(pos, pos + len);
                let mut buf = AlignedBuf::zeroed(len as usize);
                let n = crate::fuse_fs::read_full(fd.as_fd(), buf.as_mut_slice(), pos)
                    .map_err(local("a file"))?;
                if n == 0 {
                    break;
                }
                buf.truncate(n);
                self.send(Op::Write {
                    id: node.id,
                    offset: pos,
                    data: Payload::Aligned(Arc::new(buf)),
                })?;
                self.progress
                    .done_bytes
                    .fetch_add(n as u64, Ordering::Relaxed);
                sent += n as u64;
                pos += n as u64;
            }
            offset = end;
        }
        // The size as it is now, ordered with live truncates.
        let _whole = node.ranges.lock(0, u64::MAX);
        let st = rustix::fs::fstat(fd.as_fd()).map_err(local("a file"))?;
        self.send(Op::Truncate {
            id: node.id,
            size: st.st_size as u64,
        })?;
        Ok(sent)
    }
}
