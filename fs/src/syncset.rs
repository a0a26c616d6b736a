//! What a checkpoint (the writer) or a `SyncAll` (the receiver) must make
//! durable: the files and directories this process changed since the last one.
//!
//! Why not `syncfs`: it waits for every dirty inode of the filesystem, other
//! programs' too. Measured on the shared dev machine: a writer stopped next to
//! 2 GiB of someone else's unsynced data (same filesystem) took 23 s to exit,
//! against 1 s without it; the checkpoint of a full activity log stalls the
//! writes that wait for room in it the same way. So each changed node is synced
//! itself (`fsync`), and `syncfs` stays the fallback where the set cannot say
//! what changed: what an earlier process or session left unsynced (one
//! `syncfs` in the background at start, [`SyncSet::start_baseline`], that the
//! first sync waits for if it is still running; without it the first sync is a
//! `syncfs`), past [`MAX_NODES`] changed nodes (one `syncfs` is cheaper than thousands of
//! `fsync`s), after a change the set does not name (a tree removed, a wipe), and
//! after a sync that failed (its nodes are not forgotten).
//!
//! Batches are synced in the order they were taken ([`SyncSet::take`]): a batch
//! is durable only once every earlier one is, so a later, smaller batch never
//! reports "all before me on disk" while an earlier one is still flushing.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};
use rustix::fs::{FileType, OFlags};

use crate::apply::{self, Errno};
use crate::op::{NodeId, Op};

/// More changed nodes than this between two syncs: `syncfs` instead.
pub const MAX_NODES: usize = 1024;

/// The nodes changed since the last [`SyncSet::take`].
#[derive(Debug)]
struct Pending {
    /// Keyed by descriptor number: unique while the descriptor is held here.
    nodes: HashMap<RawFd, Arc<OwnedFd>>,
    /// Something changed that `nodes` does not name: `syncfs`.
    whole: bool,
    /// The number the next batch gets.
    next: u64,
}

/// The changed nodes of one process (or receiver session); see the module doc.
#[derive(Debug)]
pub struct SyncSet {
    pending: Mutex<Pending>,
    /// The number of the next batch allowed to sync (all before it are done).
    turn: Mutex<u64>,
    turned: Condvar,
    /// The start's `syncfs` still runs.
    baseline: Mutex<bool>,
    baseline_done: Condvar,
}

impl Default for SyncSet {
    fn default() -> Self {
        Self::new()
    }
}

impl SyncSet {
    /// A set whose first sync is a `syncfs`: what was written before it existed
    /// is unknown.
    pub fn new() -> Self {
        Self {
            pending: Mutex::new(Pending {
                nodes: HashMap::new(),
                whole: true,
                next: 0,
            }),
            turn: Mutex::new(0),
            turned: Condvar::new(),
            baseline: Mutex::new(false),
            baseline_done: Condvar::new(),
        }
    }

    /// Syncs what was written before this set existed (`syncfs` of `root`'s
    /// filesystem) in a thread of its own, so the first sync need not: it only
    /// waits for this one if it is still running. Until called, or if it
    /// fails, the next sync is a `syncfs`.
    pub fn start_baseline(self: &Arc<Self>, root: Arc<OwnedFd>) {
        *self.baseline.lock() = true;
        let set = self.clone();
        let spawned = std::thread::Builder::new()
            .name("sync-baseline".into())
            .spawn(move || {
                let began = std::time::Instant::now();
                let result = rustix::fs::syncfs(&*root);
                match &result {
                    Ok(()) => tracing::debug!(
                        elapsed_ms = began.elapsed().as_millis(),
                        "synced what earlier processes left unsynced"
                    ),
                    Err(e) => tracing::warn!("start-up sync of the filesystem failed: {e}"),
                }
                set.end_baseline(result.is_ok());
            });
        match spawned {
            // The earlier state is synced by the thread: the set names the rest.
            Ok(_) => {
                let mut p = self.pending.lock();
                if p.next == 0 {
                    p.whole = false;
                }
            }
            Err(e) => {
                tracing::warn!("cannot start the start-up sync: {e}");
                self.end_baseline(false);
            }
        }
    }

    fn end_baseline(&self, ok: bool) {
        if !ok {
            self.add_whole();
        }
        *self.baseline.lock() = false;
        self.baseline_done.notify_all();
    }

    /// `fd` (any descriptor of the node: O_PATH or open for I/O) was changed:
    /// its content, its attributes or its entries.
    pub fn add(&self, fd: &Arc<OwnedFd>) {
        let mut p = self.pending.lock();
        if p.whole {
            return;
        }
        if p.nodes.len() >= MAX_NODES {
            p.whole = true;
            p.nodes.clear();
            return;
        }
        p.nodes.entry(fd.as_raw_fd()).or_insert_with(|| fd.clone());
    }

    /// Something changed that no descriptor names: the next sync is a `syncfs`.
    pub fn add_whole(&self) {
        let mut p = self.pending.lock();
        p.whole = true;
        p.nodes.clear();
    }

    /// Whether the next sync will be a `syncfs`, and how many nodes it holds.
    pub fn pending(&self) -> (bool, usize) {
        let p = self.pending.lock();
        (p.whole, p.nodes.len())
    }

    /// Everything changed so far, to be synced with [`Batch::sync`] (in the
    /// order taken; a batch dropped unsynced hands its nodes to the next one).
    pub fn take(self: &Arc<Self>) -> Batch {
        let mut p = self.pending.lock();
        let number = p.next;
        p.next += 1;
        Batch {
            set: self.clone(),
            number,
            nodes: std::mem::take(&mut p.nodes).into_values().collect(),
            whole: std::mem::replace(&mut p.whole, false),
            done: false,
        }
    }

    /// Takes and syncs everything changed so far.
    pub fn sync(self: &Arc<Self>, root: BorrowedFd<'_>) -> Result<Synced, Errno> {
        self.take().sync(root)
    }

    /// Batch `number` finished (synced, failed or dropped): the next one's turn.
    fn finish(&self, number: u64) {
        let mut turn = self.turn.lock();
        *turn = (*turn).max(number + 1);
        drop(turn);
        self.turned.notify_all();
    }
}

/// What one sync did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synced {
    /// `syncfs` of the whole filesystem.
    Filesystem,
    /// `fsync` of this many changed nodes.
    Nodes(usize),
}

/// The nodes changed up to one point (see [`SyncSet::take`]).
#[derive(Debug)]
pub struct Batch {
    set: Arc<SyncSet>,
    number: u64,
    nodes: Vec<Arc<OwnedFd>>,
    whole: bool,
    done: bool,
}

impl Batch {
    /// Makes this batch (and every batch taken before it) durable; `root` is
    /// any descriptor on the filesystem, for the `syncfs` fallback. On failure
    /// the next sync is a `syncfs`.
    pub fn sync(mut self, root: BorrowedFd<'_>) -> Result<Synced, Errno> {
        {
            let mut turn = self.set.turn.lock();
            while *turn < self.number {
                self.set.turned.wait(&mut turn);
            }
        }
        {
            let mut running = self.set.baseline.lock();
            while *running {
                self.set.baseline_done.wait(&mut running);
            }
        }
        let result = self.sync_now(root);
        if result.is_err() {
            self.set.add_whole();
        }
        self.done = true;
        self.set.finish(self.number);
        result
    }

    fn sync_now(&self, root: BorrowedFd<'_>) -> Result<Synced, Errno> {
        if self.whole {
            rustix::fs::syncfs(root)?;
            return Ok(Synced::Filesystem);
        }
        let mut synced = 0;
        for fd in &self.nodes {
            match sync_node(fd.as_fd())? {
                true => synced += 1,
                // A node fsync cannot reach (a symlink, a device): all of it.
                false => {
                    rustix::fs::syncfs(root)?;
                    return Ok(Synced::Filesystem);
                }
            }
        }
        Ok(Synced::Nodes(synced))
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        if !self.done {
            // Never synced: its changes go to the next batch (as a syncfs), and
            // later batches must not wait for it.
            self.set.add_whole();
            self.set.finish(self.number);
        }
    }
}

/// `fsync` of one node; false if it is neither a regular file nor a directory.
/// A file without a name any more is skipped: its data is gone with its last
/// descriptor, and its removal is its directory's change.
fn sync_node(fd: BorrowedFd<'_>) -> Result<bool, Errno> {
    let st = rustix::fs::fstat(fd)?;
    let flags = match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile if st.st_nlink == 0 => return Ok(true),
        FileType::RegularFile => OFlags::RDONLY,
        FileType::Directory => OFlags::RDONLY | OFlags::DIRECTORY,
        _ => return Ok(false),
    };
    match rustix::fs::fsync(fd) {
        Ok(()) => Ok(true),
        // An O_PATH descriptor: fsync needs one opened for I/O.
        Err(Errno::BADF) => {
            let opened = apply::reopen(fd, flags)?;
            rustix::fs::fsync(&opened)?;
            Ok(true)
        }
        Err(e) => Err(e),
    }
}

/// The nodes `op` changes that exist before it is applied (its target, the
/// directories whose entries change); the node it creates is
/// [`Op::created_id`], bound only once it is applied.
pub fn changed_nodes(op: &Op) -> Vec<NodeId> {
    match op {
        Op::Bind { .. } | Op::Forget { .. } | Op::Fsync { .. } => vec![],
        Op::Create { parent, .. }
        | Op::Mkdir { parent, .. }
        | Op::Symlink { parent, .. }
        | Op::Unlink { parent, .. }
        | Op::Rmdir { parent, .. } => vec![*parent],
        Op::Link { id, parent, .. } => vec![*id, *parent],
        Op::Rename {
            parent, new_parent, ..
        } => vec![*parent, *new_parent],
        Op::SetAttr { id, .. }
        | Op::Truncate { id, .. }
        | Op::Write { id, .. }
        | Op::Fallocate { id, .. }
        | Op::SetXattr { id, .. }
        | Op::RemoveXattr { id, .. } => vec![*id],
        Op::CopyRange { dst, .. } => vec![*dst],
    }
}

/// The node `op` created, to sync once it is applied (its attributes are
/// set after its entry); a `Bind` only names a node that exists already.
pub fn created_node(op: &Op) -> Option<NodeId> {
    op.created_id().filter(|_| !matches!(op, Op::Bind { .. }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    fn open(path: &std::path::Path) -> Arc<OwnedFd> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open(path)
            .unwrap();
        Arc::new(OwnedFd::from(f))
    }

    /// The filesystem's descriptor for `syncfs` (not O_PATH: syncfs needs I/O).
    fn root(path: &std::path::Path) -> Arc<OwnedFd> {
        Arc::new(OwnedFd::from(std::fs::File::open(path).unwrap()))
    }

    #[test]
    fn the_first_sync_is_whole_then_only_the_changed_nodes() {
        let dir = tempfile::tempdir().unwrap();
        let root = root(dir.path());
        let file = dir.path().join("f");
        std::fs::File::create(&file)
            .unwrap()
            .write_all(b"x")
            .unwrap();
        let set = Arc::new(SyncSet::new());
        set.add(&open(&file));
        assert_eq!(set.sync(root.as_fd()).unwrap(), Synced::Filesystem);
        assert_eq!(set.sync(root.as_fd()).unwrap(), Synced::Nodes(0));
        let f = open(&file);
        set.add(&f);
        set.add(&f);
        set.add(&open(dir.path()));
        assert_eq!(set.sync(root.as_fd()).unwrap(), Synced::Nodes(2));
    }

    #[test]
    fn too_many_nodes_a_dropped_batch_or_a_symlink_mean_syncfs() {
        let dir = tempfile::tempdir().unwrap();
        let root = root(dir.path());
        let set = Arc::new(SyncSet::new());
        set.sync(root.as_fd()).unwrap();
        let mut held = Vec::new();
        for i in 0..=MAX_NODES {
            let p = dir.path().join(format!("f{i}"));
            std::fs::write(&p, b"x").unwrap();
            let fd = open(&p);
            set.add(&fd);
            held.push(fd);
        }
        assert_eq!(set.pending(), (true, 0));
        assert_eq!(set.sync(root.as_fd()).unwrap(), Synced::Filesystem);
        set.add(&root);
        drop(set.take());
        assert_eq!(set.sync(root.as_fd()).unwrap(), Synced::Filesystem);
        std::os::unix::fs::symlink("f0", dir.path().join("l")).unwrap();
        let link = Arc::new(
            rustix::fs::openat(
                rustix::fs::CWD,
                dir.path().join("l"),
                OFlags::PATH | OFlags::NOFOLLOW,
                rustix::fs::Mode::empty(),
            )
            .unwrap(),
        );
        set.add(&link);
        assert_eq!(set.sync(root.as_fd()).unwrap(), Synced::Filesystem);
    }

    #[test]
    fn after_the_start_up_sync_only_the_changed_nodes() {
        let dir = tempfile::tempdir().unwrap();
        let root = root(dir.path());
        let set = Arc::new(SyncSet::new());
        set.start_baseline(root.clone());
        set.add(&open(dir.path()));
        assert_eq!(set.sync(root.as_fd()).unwrap(), Synced::Nodes(1));
        assert!(!*set.baseline.lock());
    }

    #[test]
    fn a_later_batch_waits_for_an_earlier_one() {
        let dir = tempfile::tempdir().unwrap();
        let root = root(dir.path());
        let set = Arc::new(SyncSet::new());
        let first = set.take();
        let second = set.take();
        let (tx, rx) = std::sync::mpsc::channel();
        let r = root.clone();
        let t = std::thread::spawn(move || {
            let out = second.sync(r.as_fd());
            tx.send(()).unwrap();
            out
        });
        assert!(rx
            .recv_timeout(std::time::Duration::from_millis(200))
            .is_err());
        first.sync(root.as_fd()).unwrap();
        rx.recv().unwrap();
        assert_eq!(t.join().unwrap().unwrap(), Synced::Nodes(0));
    }
}
