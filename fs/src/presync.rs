//! Early syncs: a file that is written and then `fdatasync`ed in turn (a
//! database's commit, a `cache='none'` guest flushing after a write) gets its
//! sync started as soon as its write is done here, while the write's reply
//! travels to the application and its `fdatasync` travels back. When the
//! `fdatasync` arrives the disk has flushed, or is flushing, already: it waits
//! for the rest of that sync instead of starting its own after the round trip.
//!
//! Why it is safe: a sync started after a change completed covers that change
//! (the data of an `O_DIRECT` write is in the disk's cache, a buffered one is
//! dirty in the page cache; `fdatasync` writes both out and flushes). Each
//! file counts its completed data changes; an early sync records the count it
//! started at, and an `fdatasync` is answered by early syncs only if they
//! cover every change completed before it arrived. An early sync that fails
//! owes its error to the next sync of the file (the kernel reports a
//! writeback error to one sync per descriptor, and the early sync took it).
//! A full `fsync` (metadata too) always syncs for itself.
//!
//! Why it is cheap: [`Pattern`] predicts, per file, whether an fdatasync
//! follows each write: only when the last write was followed by one before any
//! other change. A stream of writes without syncs (or several writes per sync)
//! never starts one; a mispredicted write costs one flush.

use std::collections::HashMap;

use parking_lot::{Condvar, Mutex};

use crate::apply::Errno;
use crate::op::NodeId;

/// Files an early-sync record (the writer's of the peer, the receiver's) keeps
/// at most; past it the record starts over, which loses early answers only.
pub const MAX_FILES: usize = 4096;

/// Makes room for `id` in a per-file record bounded by [`MAX_FILES`]: when it
/// is full and `id` is new, empties it. True if it did.
pub fn make_room<V>(files: &mut HashMap<NodeId, V>, id: NodeId) -> bool {
    let full = files.len() >= MAX_FILES && !files.contains_key(&id);
    if full {
        files.clear();
    }
    full
}

/// Whether an `fdatasync` is expected after each change of one file.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pattern {
    changes_since_sync: u32,
    sync_follows: bool,
}

impl Pattern {
    /// A data change completed; true when a sync is expected next.
    pub fn changed(&mut self) -> bool {
        self.changes_since_sync = self.changes_since_sync.saturating_add(1);
        if self.changes_since_sync > 1 {
            self.sync_follows = false;
        }
        self.sync_follows
    }

    /// A sync of the file was asked for.
    pub fn synced(&mut self) {
        self.sync_follows = self.changes_since_sync == 1;
        self.changes_since_sync = 0;
    }
}

/// One file's completed changes and the syncs that cover them (the primary's
/// side; the receiver applies in one thread and keeps its own, see
/// `receiver::Early`).
#[derive(Debug)]
pub struct PreSync {
    state: Mutex<State>,
    done: Condvar,
}

#[derive(Debug)]
struct State {
    /// Data changes completed here.
    changes: u64,
    /// Changes covered by a finished, successful sync.
    synced: u64,
    /// An early sync in flight covers this many changes.
    running: Option<u64>,
    /// An early sync failed: its error is owed to the next sync.
    failed: Option<Errno>,
    pattern: Pattern,
}

impl Default for PreSync {
    fn default() -> Self {
        Self {
            state: Mutex::new(State {
                // What the file holds when it becomes known here (written by
                // the receiver before a promotion, say) is not known to be
                // synced: the first sync is a real one.
                changes: 1,
                synced: 0,
                running: None,
                failed: None,
                pattern: Pattern::default(),
            }),
            done: Condvar::new(),
        }
    }
}

/// How an fdatasync was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answered {
    /// By an early sync (finished, or waited for).
    Early,
    /// By a sync of its own.
    Synced,
}

impl PreSync {
    /// A change to the file's data completed here (`write`: by a write, the
    /// only change an early sync follows). True: start an early sync now
    /// ([`Self::early`]).
    pub fn changed(&self, write: bool) -> bool {
        let mut s = self.state.lock();
        s.changes += 1;
        let expected = s.pattern.changed();
        expected && write && s.running.is_none()
    }

    /// Runs `sync` as an early sync: it covers every change completed before
    /// now. Nothing if one is running already.
    pub fn early(&self, sync: impl FnOnce() -> Result<(), Errno>) {
        let upto = {
            let mut s = self.state.lock();
            if s.running.is_some() {
                return;
            }
            s.running = Some(s.changes);
            s.changes
        };
        let result = sync();
        let mut s = self.state.lock();
        s.running = None;
        match result {
            Ok(()) => s.synced = s.synced.max(upto),
            Err(e) => {
                s.failed.get_or_insert(e);
            }
        }
        drop(s);
        self.done.notify_all();
    }

    /// An `fsync` (`datasync`: `fdatasync`) of the file arrived: answered by
    /// the early syncs if they cover every change completed before now (waiting
    /// for the one in flight if it does), else by `sync` itself.
    pub fn sync(
        &self,
        datasync: bool,
        sync: impl FnOnce() -> Result<(), Errno>,
    ) -> (Result<(), Errno>, Answered) {
        let mut s = self.state.lock();
        s.pattern.synced();
        let target = s.changes;
        loop {
            if let Some(e) = s.failed.take() {
                return (Err(e), Answered::Early);
            }
            if datasync && s.synced >= target {
                return (Ok(()), Answered::Early);
            }
            match s.running {
                Some(upto) if datasync && upto >= target => self.done.wait(&mut s),
                _ => break,
            }
        }
        let upto = s.changes;
        drop(s);
        let result = sync();
        if result.is_ok() {
            let mut s = self.state.lock();
            s.synced = s.synced.max(upto);
        }
        (result, Answered::Synced)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn a_sync_is_expected_only_after_a_write_that_a_sync_followed_before() {
        let mut p = Pattern::default();
        // First write: nothing known yet.
        assert!(!p.changed());
        p.synced();
        // Write, sync, write: the pattern.
        assert!(p.changed());
        p.synced();
        assert!(p.changed());
        // Two writes in a row break it...
        assert!(!p.changed());
        p.synced();
        // ...until a single write is followed by a sync again.
        assert!(!p.changed());
        p.synced();
        assert!(p.changed());
        // A sync with no write before it says nothing about the next write.
        p.synced();
        p.synced();
        assert!(!p.changed());
    }

    fn counting() -> (Arc<AtomicUsize>, impl Fn() -> Result<(), Errno> + Clone) {
        let n = Arc::new(AtomicUsize::new(0));
        let m = n.clone();
        (n, move || {
            m.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
    }

    /// A file written and fdatasynced once, then written again: its pattern
    /// expects a sync next. One sync so far.
    fn taught() -> (
        PreSync,
        Arc<AtomicUsize>,
        impl Fn() -> Result<(), Errno> + Clone,
    ) {
        let p = PreSync::default();
        let (n, sync) = counting();
        p.changed(true);
        p.sync(true, sync.clone()).0.unwrap();
        assert!(p.changed(true), "write, sync, write: a sync is expected");
        (p, n, sync)
    }

    #[test]
    fn the_first_sync_of_a_file_is_a_real_one() {
        let p = PreSync::default();
        let (n, sync) = counting();
        assert_eq!(p.sync(true, sync), (Ok(()), Answered::Synced));
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn an_early_sync_answers_the_fdatasync_of_the_writes_before_it() {
        let (p, n, sync) = taught();
        p.early(sync.clone());
        assert_eq!(n.load(Ordering::SeqCst), 2);
        assert_eq!(p.sync(true, sync.clone()), (Ok(()), Answered::Early));
        assert_eq!(n.load(Ordering::SeqCst), 2, "no sync of its own");
    }

    #[test]
    fn a_change_after_the_early_sync_started_needs_a_sync_of_its_own() {
        let (p, n, sync) = taught();
        p.early(sync.clone());
        // A truncate (or a second write) completes after the early sync.
        p.changed(false);
        assert_eq!(p.sync(true, sync.clone()), (Ok(()), Answered::Synced));
        assert_eq!(n.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_full_fsync_always_syncs_for_itself() {
        let (p, n, sync) = taught();
        p.early(sync.clone());
        assert_eq!(p.sync(false, sync.clone()), (Ok(()), Answered::Synced));
        assert_eq!(n.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_failed_early_sync_owes_its_error_to_the_next_sync() {
        let (p, _, sync) = taught();
        p.early(|| Err(Errno::IO));
        assert_eq!(
            p.sync(true, sync.clone()),
            (Err(Errno::IO), Answered::Early)
        );
        // Owed once, as the kernel reports it once per descriptor.
        assert_eq!(p.sync(true, sync), (Ok(()), Answered::Synced));
    }

    #[test]
    fn an_fdatasync_waits_for_the_early_sync_in_flight_that_covers_it() {
        let (p, n, sync) = taught();
        let p = Arc::new(p);
        let (started_tx, started) = crossbeam_channel::bounded(0);
        let (release_tx, release) = crossbeam_channel::bounded::<()>(0);
        let early = {
            let (p, sync) = (p.clone(), sync.clone());
            std::thread::spawn(move || {
                p.early(|| {
                    started_tx.send(()).unwrap();
                    release.recv().unwrap();
                    sync()
                })
            })
        };
        started.recv().unwrap();
        let waiter = {
            let (p, sync) = (p.clone(), sync.clone());
            std::thread::spawn(move || p.sync(true, sync))
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(
            !waiter.is_finished(),
            "answered before the early sync finished"
        );
        release_tx.send(()).unwrap();
        early.join().unwrap();
        assert_eq!(waiter.join().unwrap(), (Ok(()), Answered::Early));
        assert_eq!(n.load(Ordering::SeqCst), 2);
    }
}
