//! The primary's inode table: FUSE inode numbers are the stable node ids of the
//! replication stream. Each node holds an O_PATH descriptor of its backing file, so a
//! rename or unlink never changes which file an id names, and the backing inode number
//! cannot be reused while the kernel still knows the node.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex, RwLock};
use rustix::fs::{FileType, OFlags};

use crate::apply::{self, Errno, NodeTable};
use crate::op::{NodeId, ROOT};
use crate::presync::PreSync;

/// Byte ranges of one file with a mutation being ordered; overlapping mutations take
/// turns so that both replicas apply them in the same order.
#[derive(Debug, Default)]
pub struct RangeLocks {
    held: Mutex<Vec<(u64, u64)>>,
    released: Condvar,
}

/// A held range; released on drop.
#[derive(Debug)]
pub struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    range: (u64, u64),
}

impl RangeLocks {
    /// Locks `[start, end)`.
    pub fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        let end = end.max(start.saturating_add(1));
        let mut held = self.held.lock();
        while held.iter().any(|&(s, e)| s < end && start < e) {
            self.released.wait(&mut held);
        }
        held.push((start, end));
        RangeGuard {
            locks: self,
            range: (start, end),
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock();
        if let Some(i) = held.iter().position(|r| *r == self.range) {
            held.swap_remove(i);
        }
        drop(held);
        self.locks.released.notify_all();
    }
}

/// One node known to the kernel.
#[derive(Debug)]
pub struct Node {
    pub id: NodeId,
    pub fd: Arc<OwnedFd>,
    pub kind: FileType,
    pub ranges: RangeLocks,
    /// Its changes here and the syncs that cover them (early syncs).
    pub presync: PreSync,
    key: (u64, u64),
}

impl Node {
    /// The backing file's inode number (the key of its dirty map).
    pub fn ino(&self) -> u64 {
        self.key.1
    }
}

#[derive(Debug, Default)]
struct Maps {
    by_id: HashMap<NodeId, (Arc<Node>, u64)>,
    by_key: HashMap<(u64, u64), NodeId>,
    next_id: NodeId,
}

/// All nodes the kernel holds a reference to.
#[derive(Debug)]
pub struct Inodes {
    maps: RwLock<Maps>,
}

fn key_of(fd: &OwnedFd) -> Result<((u64, u64), FileType), Errno> {
    let st = rustix::fs::fstat(fd.as_fd())?;
    Ok(((st.st_dev, st.st_ino), FileType::from_raw_mode(st.st_mode)))
}

impl Inodes {
    pub fn new(root: OwnedFd) -> Result<Self, Errno> {
        let (key, kind) = key_of(&root)?;
        let node = Arc::new(Node {
            id: ROOT,
            fd: Arc::new(root),
            kind,
            ranges: RangeLocks::default(),
            presync: PreSync::default(),
            key,
        });
        let mut maps = Maps {
            next_id: ROOT + 1,
            ..Maps::default()
        };
        maps.by_id.insert(ROOT, (node, 1));
        maps.by_key.insert(key, ROOT);
        Ok(Self {
            maps: RwLock::new(maps),
        })
    }

    pub fn get(&self, id: NodeId) -> Result<Arc<Node>, Errno> {
        self.maps
            .read()
            .by_id
            .get(&id)
            .map(|(node, _)| node.clone())
            .ok_or(Errno::STALE)
    }

    /// A fresh id for a node about to be created.
    pub fn allocate_id(&self) -> NodeId {
        let mut maps = self.maps.write();
        let id = maps.next_id;
        maps.next_id += 1;
        id
    }

    /// Takes one kernel reference on the node behind `fd`. A node seen for the first
    /// time gets a new id, and `on_new` runs before anyone else can see that id (so
    /// the peer learns which file it names before any operation uses it).
    pub fn reference(&self, fd: OwnedFd, on_new: impl FnOnce(NodeId)) -> Result<Arc<Node>, Errno> {
        let (key, kind) = key_of(&fd)?;
        let mut maps = self.maps.write();
        if let Some(&id) = maps.by_key.get(&key) {
            if let Some((node, count)) = maps.by_id.get_mut(&id) {
                *count += 1;
                return Ok(node.clone());
            }
        }
        let id = maps.next_id;
        maps.next_id += 1;
        on_new(id);
        Ok(Self::insert(&mut maps, id, fd, key, kind))
    }

    fn insert(
        maps: &mut Maps,
        id: NodeId,
        fd: OwnedFd,
        key: (u64, u64),
        kind: FileType,
    ) -> Arc<Node> {
        let node = Arc::new(Node {
            id,
            fd: Arc::new(fd),
            kind,
            ranges: RangeLocks::default(),
            presync: PreSync::default(),
            key,
        });
        maps.by_id.insert(id, (node.clone(), 1));
        maps.by_key.insert(key, id);
        node
    }

    /// Whether the node with status `st` has an id now (the kernel, an open file or
    /// a sync holds a reference to it).
    pub fn knows(&self, st: &rustix::fs::Stat) -> bool {
        self.maps
            .read()
            .by_key
            .contains_key(&(st.st_dev, st.st_ino))
    }

    /// How many nodes have an id (the root included).
    pub fn len(&self) -> usize {
        self.maps.read().by_id.len()
    }

    /// Takes one more kernel reference on a known node (hard link).
    pub fn add_reference(&self, id: NodeId) {
        if let Some((_, count)) = self.maps.write().by_id.get_mut(&id) {
            *count += 1;
        }
    }

    /// Drops `n` kernel references; returns true when the node is gone.
    pub fn release_refs(&self, id: NodeId, n: u64) -> bool {
        if id == ROOT {
            return false;
        }
        let mut maps = self.maps.write();
        let Some((node, count)) = maps.by_id.get_mut(&id) else {
            return false;
        };
        *count = count.saturating_sub(n);
        if *count > 0 {
            return false;
        }
        let key = node.key;
        maps.by_id.remove(&id);
        if maps.by_key.get(&key) == Some(&id) {
            maps.by_key.remove(&key);
        }
        true
    }
}

impl NodeTable for Inodes {
    fn path_fd(&self, id: NodeId) -> Result<Arc<OwnedFd>, Errno> {
        Ok(self.get(id)?.fd.clone())
    }

    fn data_fd(&self, id: NodeId) -> Result<Arc<OwnedFd>, Errno> {
        let node = self.get(id)?;
        let flags = match node.kind {
            FileType::Directory => OFlags::RDONLY | OFlags::DIRECTORY,
            _ => OFlags::RDWR,
        };
        Ok(Arc::new(apply::reopen(node.fd.as_fd(), flags)?))
    }

    fn bind(&self, id: NodeId, fd: OwnedFd) -> Result<(), Errno> {
        let (key, kind) = key_of(&fd)?;
        Self::insert(&mut self.maps.write(), id, fd, key, kind);
        Ok(())
    }

    fn forget(&self, id: NodeId) {
        self.release_refs(id, u64::MAX);
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn overlapping_ranges_wait_and_disjoint_ones_do_not() {
        let locks = Arc::new(RangeLocks::default());
        let a = locks.lock(0, 4096);
        let _b = locks.lock(4096, 8192); // disjoint: no wait
        let entered = Arc::new(AtomicBool::new(false));
        let (l, e) = (locks.clone(), entered.clone());
        let t = std::thread::spawn(move || {
            let _c = l.lock(100, 200);
            e.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(!entered.load(Ordering::SeqCst), "overlapping range entered");
        drop(a);
        t.join().unwrap();
        assert!(entered.load(Ordering::SeqCst));
    }
}
