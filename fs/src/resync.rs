//! Bringing a newly attached peer up to date while the VM keeps writing, through the
//! same ordered stream as live mutations.
//!
//! **Incremental** (both nodes' records valid, see `track`): the peer's namespace is
//! reconciled in place (missing entries created, extra ones removed) and only the
//! regions that may differ travel — the union of the writer's dirty map and activity
//! log and the peer's own report. A file reached through a name either side's
//! journal recorded as changed, or new on the peer, is copied whole. Holes travel
//! as punched holes.
//!
//! Only what the resync acts on gets an id (an O_PATH descriptor on each side): a
//! file both copies have is bound only if a record names it (either node's ranges
//! or names), its attributes differ (the report carries both copies' owner, mode
//! and an xattr digest: attribute changes are not in the records), it has several
//! names, or the kernel holds it; a directory only if the kernel holds it, its
//! attributes differ, or something beneath it needs its id. A file is given back
//! (`Forget` on both sides unless the kernel took it meanwhile) as soon as its
//! data is done; the directories and metadata-only entries when the data phase
//! begins. A tree of a million clean files thus costs no descriptor per file.
//!
//! Why passing over a clean entry is safe: the reconcile runs under the namespace
//! lock, so no lookup runs (the kernel can learn no new node) and no name changes.
//! A clean entry the kernel does not hold cannot be written either: writing needs
//! an open file, and an open file is a node the kernel holds — those are all bound
//! and get a data job whose ranges are read only after `begin_data`, so writes made
//! while `Attaching` are covered. The link sends live operations (`begin_data`)
//! before the lock is released; from then on a lookup of a passed-over entry takes
//! a fresh id and queues its `Bind` under the inode-table lock, ordered after the
//! whole reconcile, so the peer resolves the same name to the same (equal) file,
//! and every later change of it travels live. Giving an id back races only with a
//! lookup of the same node: either the lookup finds the id (the count stays above
//! zero, no `Forget`), or it comes after the removal and takes a new id (ids are
//! never reused, and the receiver keys by id, so a `Forget` of the old id queued
//! after the new `Bind` harms nothing).
//!
//! **Full** (no valid history on either side):
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
//! **Data phase** (both kinds): `pipeline` sends the files' data with several
//! reader threads (`--resync-streams`), several files and regions in flight, and
//! retires durability steps of the records as the peer acknowledges them.
//!
//! Losing the peer at any point returns the link to writing alone; the peer stays
//! recorded as outdated. Files unlinked while open (no name to recreate) are not
//! copied: a later write to one makes the sync give up (never a silent gap).

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use rustix::fs::{FileType, OFlags, SeekFrom};

use crate::apply::{self, Errno};
use crate::buffer::{AlignedBuf, Payload};
use crate::compare;
use crate::inodes::{Inodes, Node};
use crate::link::PeerLink;
use crate::op::{
    Control, LinkTarget, Name, NewNode, NodeId, NodeKind, Op, Request, XattrValue, ROOT,
};
use crate::track::{self, EntryKind, Report, Tracker};

mod pipeline;
pub use pipeline::{DEFAULT_STREAMS, MAX_STREAMS};

const CHUNK: u64 = 1 << 20;
/// How far ahead scattered regions are read ahead.
const READ_AHEAD: u64 = 32 << 20;

/// Errors of a full sync.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("reading {what}: {errno}")]
    Local { what: String, errno: Errno },
    #[error("the peer was lost or refused an operation; writing alone")]
    PeerGone,
    #[error("verify needs a replicating link (it is {0:?})")]
    NotConnected(crate::link::LinkState),
}

pub use crate::status::SyncProgress;

/// Runs one full sync; see the module documentation.
#[derive(Debug)]
pub struct Syncer {
    inodes: Arc<Inodes>,
    namespace: Arc<RwLock<()>>,
    link: PeerLink,
    progress: Arc<SyncProgress>,
    /// An operation of the sync failed on the peer.
    failed: Arc<AtomicBool>,
    tracker: Arc<Tracker>,
    /// Resync data rate limit (bytes/s), and the bytes sent since this start.
    rate_limit: Option<u64>,
    paced: parking_lot::Mutex<(std::time::Instant, u64)>,
    /// Reader threads of the data phase (`pipeline`).
    streams: usize,
}

/// Data sent between two durability points of a resync: marks of what came before
/// are cleared then, so an interrupted resync resumes instead of starting over.
const RESUME_STEP: u64 = 64 << 20;

/// A node the sync took one reference on (an id on both sides). Dropping it gives
/// the reference back: when nobody else holds the node (the kernel did not look it
/// up meanwhile) the id is forgotten on both sides. Dropped only once the link
/// sends live operations (`Syncing`): a `Forget` queued while `Attaching` would
/// not reach the peer, which would keep the descriptor.
#[derive(Debug)]
struct Bound {
    node: Arc<Node>,
    inodes: Arc<Inodes>,
    link: PeerLink,
}

impl Bound {
    /// Takes over a reference the caller already took (`Inodes::reference`).
    fn adopt(syncer: &Syncer, node: Arc<Node>) -> Bound {
        Bound {
            node,
            inodes: syncer.inodes.clone(),
            link: syncer.link.clone(),
        }
    }
}

impl Drop for Bound {
    fn drop(&mut self) {
        if self.inodes.release_refs(self.node.id, 1) {
            self.link.submit_nowait(Op::Forget { id: self.node.id });
        }
    }
}

/// How one file's data reaches the peer.
#[derive(Debug)]
enum Plan {
    /// Everything allocated (new on the peer, or its binding is in doubt).
    Whole(Bound),
    /// The regions both nodes' records name (`path` keys the peer's report).
    Dirty(Bound, Vec<u8>),
}

/// One directory of the reconcile walk.
struct Level {
    /// O_PATH descriptor of our directory (children are looked up beneath it).
    dir: Arc<std::os::fd::OwnedFd>,
    /// Its name in its parent (none for the root).
    name: Option<Name>,
    prefix: Vec<u8>,
    /// Entries still to visit.
    names: std::vec::IntoIter<Name>,
    /// Its id on both sides, once something beneath it needed one.
    node: Option<Arc<Node>>,
}

/// What a copy does where the file has a hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holes {
    /// The peer's region may hold data: punch it.
    Punch,
    /// The peer's file is new: nothing to do.
    Skip,
}

/// How one file's data is brought up to date.
#[derive(Debug)]
enum Job {
    Ranges(Bound, Vec<(u64, u64)>),
    Copy(Bound),
    Compare(Bound),
}

/// A region where the peer's copy differs (`len` = u64::MAX: the peer lacks the file).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Difference {
    pub path: String,
    pub offset: u64,
    pub len: u64,
}

/// What a sync did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncOutcome {
    pub incremental: bool,
    pub data_bytes: u64,
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
        tracker: Arc<Tracker>,
    ) -> Self {
        Self {
            inodes,
            namespace,
            link,
            progress,
            failed: Arc::new(AtomicBool::new(false)),
            tracker,
            rate_limit: None,
            paced: parking_lot::Mutex::new((std::time::Instant::now(), 0)),
            streams: DEFAULT_STREAMS,
        }
    }

    /// Limits resync data to `bytes_per_s` (live replication is never limited).
    pub fn with_rate_limit(mut self, bytes_per_s: Option<u64>) -> Self {
        self.rate_limit = bytes_per_s.filter(|&r| r > 0);
        self
    }

    /// Reads and queues the data with `streams` threads (clamped to 1..=MAX_STREAMS).
    pub fn with_streams(mut self, streams: usize) -> Self {
        self.streams = streams.clamp(1, MAX_STREAMS);
        self
    }

    /// Waits, before taking any lock, until sending `len` more bytes keeps the
    /// resync under its rate limit.
    fn pace(&self, len: u64) {
        let Some(rate) = self.rate_limit else { return };
        let wait = {
            let mut p = self.paced.lock();
            p.1 += len;
            let due = std::time::Duration::from_secs_f64(p.1 as f64 / rate as f64);
            due.saturating_sub(p.0.elapsed())
        };
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }

    fn send(&self, op: impl Into<Request>) -> Result<(), SyncError> {
        let op = op.into();
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

    /// Brings the attached peer up to date, given its report on its copy.
    pub fn run(&self, report: Option<Box<Report>>) -> Result<SyncOutcome, SyncError> {
        self.run_with(report, false)
    }

    /// [`Syncer::run`]; `compare_all`: compare every block of every file whatever
    /// both nodes' records say (the operator's compare resync: a copy may have
    /// been changed behind vmha's back, where no record knows). The namespace is
    /// still reconciled from the peer's report.
    pub fn run_with(
        &self,
        report: Option<Box<Report>>,
        compare_all: bool,
    ) -> Result<SyncOutcome, SyncError> {
        self.failed.store(false, Ordering::SeqCst);
        self.progress.done_bytes.store(0, Ordering::Relaxed);
        self.progress.total_bytes.store(0, Ordering::Relaxed);
        *self.paced.lock() = (std::time::Instant::now(), 0);
        let incremental = !compare_all
            && report
                .as_ref()
                .is_some_and(|r| r.valid && self.tracker.is_valid());
        if compare_all {
            tracing::warn!("compare resync asked: comparing everything block by block");
        } else if !incremental {
            tracing::warn!(
                "no complete history of both copies: comparing everything block by block"
            );
        }
        let mut held = Vec::new();
        let outcome = self.copy_all(&mut held, report.as_deref(), incremental);
        // The sync's own references on nodes; the kernel's stay.
        for id in held {
            if self.inodes.release_refs(id, 1) {
                self.link.submit_nowait(Op::Forget { id });
            }
        }
        let data_bytes = outcome?;
        if self.failed.load(Ordering::SeqCst) {
            return Err(SyncError::PeerGone);
        }
        // Our copy must be on disk too before the records of what the peer lacked
        // are forgotten: after a power cut here it would differ from the peer's where
        // nothing says so. (Later writes are in the activity log.)
        let root = self.inodes.get(ROOT).map_err(local("the root"))?;
        rustix::fs::syncfs(root.fd.as_fd()).map_err(local("sync of this copy"))?;
        // Both copies are identical now: both nodes' records start afresh (the peer's
        // first: if we stop in between, ours still say more than needed, never less).
        self.send_wait(Control::InSync)?;
        if let Err(e) = self.tracker.clear_all() {
            tracing::error!("peer in sync, but clearing the records failed: {e}");
        }
        if !self.link.finish_sync() {
            return Err(SyncError::PeerGone);
        }
        Ok(SyncOutcome {
            incremental,
            data_bytes,
        })
    }

    /// Sends an op of the sync and waits for the peer's outcome.
    fn send_wait(&self, op: impl Into<Request>) -> Result<(), SyncError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.link
            .enqueue_sync(
                op,
                Box::new(move |r| {
                    let _ = tx.send(r);
                }),
            )
            .map_err(|_| SyncError::PeerGone)?;
        match rx.recv() {
            Ok(Ok(())) => Ok(()),
            _ => Err(SyncError::PeerGone),
        }
    }

    fn copy_all(
        &self,
        held: &mut Vec<NodeId>,
        report: Option<&Report>,
        incremental: bool,
    ) -> Result<u64, SyncError> {
        let plans = {
            let _no_namespace_changes = self.namespace.write();
            let (plans, walked) = match report {
                Some(report) => self.reconcile_namespace(report, incremental)?,
                None => {
                    let files = self.copy_namespace(held)?;
                    let plans = files
                        .into_iter()
                        .map(|node| {
                            // The plan's own reference (`held` keeps the walk's).
                            self.inodes.add_reference(node.id);
                            Plan::Whole(Bound::adopt(self, node))
                        })
                        .collect();
                    (plans, Vec::new())
                }
            };
            if !self.link.begin_data() {
                return Err(SyncError::PeerGone);
            }
            self.tracker.sync_window_begin();
            // The directories and metadata-only entries the walk bound: their
            // `Forget`s travel now that the link sends live operations.
            drop(walked);
            plans
        };
        // From here on live writes reach the peer; the records now hold everything
        // written without it.
        let mut suspect = self.tracker.names();
        let mut peer_dirty = std::collections::HashMap::new();
        if let Some(report) = report {
            suspect.extend(report.names.iter().cloned());
            for e in &report.entries {
                peer_dirty.insert(e.path.as_slice(), e.dirty.as_slice());
            }
        }
        // Per file: the regions to send, or None to compare every block (history
        // unknown, or the name's binding changed), or copy all (new on the peer).
        let mut work = Vec::new();
        let mut total = 0u64;
        for plan in plans {
            let job = match plan {
                Plan::Whole(node) => Job::Copy(node),
                Plan::Dirty(node, path)
                    if incremental && !suspect.iter().any(|n| track::is_beneath(&path, n)) =>
                {
                    let mine = self.tracker.ranges_of(node.node.ino());
                    if mine.whole {
                        Job::Compare(node)
                    } else {
                        let mut ranges = mine.ranges;
                        ranges.extend_from_slice(
                            peer_dirty.get(path.as_slice()).copied().unwrap_or(&[]),
                        );
                        Job::Ranges(node, track::merge_ranges(ranges))
                    }
                }
                Plan::Dirty(node, _) => Job::Compare(node),
            };
            total += match &job {
                Job::Ranges(_, r) => r.iter().map(|(s, e)| e - s).sum(),
                Job::Copy(b) => allocated(&b.node),
                Job::Compare(b) => size_of(&b.node),
            };
            work.push(job);
        }
        self.progress.total_bytes.store(total, Ordering::Relaxed);
        // Each job's reference is given back as soon as its operations are queued
        // (when its pipeline segment is done): the sync holds one descriptor per
        // file in flight, not one per file of the tree.
        let bytes = self.pipeline(work)?;
        // Barrier: acknowledged once everything before it is applied and synced.
        self.send_wait(Control::SyncAll)?;
        Ok(bytes)
    }

    /// Makes the peer's namespace equal to ours without recreating what it already
    /// has; returns how each file's data goes, and the references taken for
    /// entries with no data to send (dropped once the link sends live operations).
    ///
    /// Only what must be acted on gets an id (see the module documentation): a
    /// file or directory both copies have, that no record names, whose attributes
    /// are equal and that the kernel does not hold, is passed over; a directory
    /// is bound only when something beneath it needs its id. The walk holds one
    /// directory descriptor per level of depth, plus the ids it took.
    fn reconcile_namespace(
        &self,
        report: &Report,
        incremental: bool,
    ) -> Result<(Vec<Plan>, Vec<Bound>), SyncError> {
        let theirs: std::collections::HashMap<&[u8], &track::ReportEntry> = report
            .entries
            .iter()
            .map(|e| (e.path.as_slice(), e))
            .collect();
        let mut their_children: std::collections::HashMap<&[u8], Vec<&[u8]>> =
            std::collections::HashMap::new();
        for e in &report.entries {
            let (parent, name) = match e.path.iter().rposition(|&b| b == b'/') {
                Some(i) => (&e.path[..i], &e.path[i + 1..]),
                None => (&e.path[..0], e.path.as_slice()),
            };
            their_children.entry(parent).or_default().push(name);
        }
        // Names either side changed (no namespace change runs meanwhile: the
        // namespace lock is held).
        let mut suspect = self.tracker.names();
        suspect.extend(report.names.iter().cloned());
        let root = self.inodes.get(ROOT).map_err(local("the root"))?;
        self.copy_attrs(&root)?;
        let mut plans = Vec::new();
        let mut walked = Vec::new();
        // Files with several names: the id their first name got.
        let mut links: std::collections::HashMap<(u64, u64), NodeId> =
            std::collections::HashMap::new();
        let mut passed = 0u64;
        let mut stack = Vec::new();
        let top = self.list(root.fd.clone(), None, Vec::new(), Some(root))?;
        self.enter(&mut stack, top, &their_children, &mut walked)?;
        while let Some(level) = stack.last_mut() {
            let Some(name) = level.names.next() else {
                // Its id (if it got one) is given back with the walk's.
                stack.pop();
                continue;
            };
            let path = track::join(&level.prefix, name.as_bytes());
            let fd = match apply::lookup_beneath(level.dir.as_fd(), &name) {
                Ok(fd) => fd,
                Err(Errno::NOENT) => continue,
                Err(e) => return Err(local(format!("{name:?}"))(e)),
            };
            let st = rustix::fs::fstat(fd.as_fd()).map_err(local(format!("{name:?}")))?;
            let their = theirs.get(path.as_slice()).copied();
            let kind = EntryKind::of(st.st_mode);
            let linked = kind != EntryKind::Dir && st.st_nlink > 1;
            if linked {
                if let Some(&id) = links.get(&(st.st_dev, st.st_ino)) {
                    // Another name of a node already bound: a hard link.
                    let parent = self.bind_path(&mut stack, &mut walked)?;
                    if their.is_some() {
                        self.send(Control::Remove {
                            parent,
                            name: name.clone(),
                        })?;
                    }
                    self.send(Op::Link { id, parent, name })?;
                    continue;
                }
            }
            let keep = their.is_some_and(|t| t.kind == kind)
                && matches!(kind, EntryKind::File | EntryKind::Dir);
            if keep {
                let attrs_differ =
                    their.is_some_and(|t| t.attrs != track::Attrs::of(fd.as_fd(), &st));
                // The kernel holds it: live operations may name its id (and an open
                // file may be written until the data phase), so the peer must know it.
                let known = self.inodes.knows(&st);
                if kind == EntryKind::Dir {
                    let (dir, node) = if known || attrs_differ {
                        let parent = self.bind_path(&mut stack, &mut walked)?;
                        let node = self.bind(fd, parent, name.clone(), &mut walked)?;
                        self.copy_attrs(&node)?;
                        (node.fd.clone(), Some(node))
                    } else {
                        (Arc::new(fd), None)
                    };
                    let level = self.list(dir, Some(name), path, node)?;
                    self.enter(&mut stack, level, &their_children, &mut walked)?;
                    continue;
                }
                let dirty_here = || {
                    let mine = self.tracker.ranges_of(st.st_ino);
                    mine.whole
                        || !mine.ranges.is_empty()
                        || their.is_some_and(|t| !t.dirty.is_empty())
                        || suspect.iter().any(|n| track::is_beneath(&path, n))
                };
                let data = known || linked || !incremental || dirty_here();
                if !data && !attrs_differ {
                    // Clean and equal: no id; a later lookup binds it.
                    passed += 1;
                    continue;
                }
                let parent = self.bind_path(&mut stack, &mut walked)?;
                let node = self.bind(fd, parent, name, &mut walked)?;
                self.copy_attrs(&node)?;
                if linked {
                    links.insert((st.st_dev, st.st_ino), node.id);
                }
                if data {
                    // The walk's reference moves to the plan: it is given back as
                    // soon as the file's data is done.
                    if let Some(b) = walked.pop() {
                        plans.push(Plan::Dirty(b, path));
                    }
                }
                continue;
            }
            let parent = self.bind_path(&mut stack, &mut walked)?;
            if their.is_some() {
                self.send(Control::Remove {
                    parent,
                    name: name.clone(),
                })?;
            }
            let node = self
                .inodes
                .reference(fd, |_| {})
                .map_err(local(format!("{name:?}")))?;
            let bound = Bound::adopt(self, node.clone());
            if linked {
                links.insert((st.st_dev, st.st_ino), node.id);
            }
            match self.create(&node, parent, name.clone(), &st)? {
                Some(_) if kind == EntryKind::Dir => {
                    walked.push(bound);
                    let dir = node.fd.clone();
                    // New on the peer: nothing of theirs beneath it to remove.
                    stack.push(self.list(dir, Some(name), path, Some(node))?);
                }
                Some(_) => plans.push(Plan::Whole(bound)),
                None => walked.push(bound),
            }
        }
        tracing::info!(
            bound = plans.len() + walked.len(),
            passed_over = passed,
            "namespace reconciled: ids taken only for what the resync acts on"
        );
        Ok((plans, walked))
    }

    /// Lists our entries of directory `dir` (the walk visits them next).
    fn list(
        &self,
        dir: Arc<std::os::fd::OwnedFd>,
        name: Option<Name>,
        prefix: Vec<u8>,
        node: Option<Arc<Node>>,
    ) -> Result<Level, SyncError> {
        let listing = apply::reopen(dir.as_fd(), OFlags::RDONLY | OFlags::DIRECTORY)
            .map_err(local("a directory"))?;
        let mut names = Vec::new();
        let mut entries =
            rustix::fs::Dir::read_from(listing.as_fd()).map_err(local("a directory"))?;
        while let Some(entry) = entries.read() {
            let entry = entry.map_err(local("a directory"))?;
            let raw = entry.file_name().to_bytes();
            if raw != b"." && raw != b".." {
                if let Ok(name) = Name::new(raw) {
                    names.push(name);
                }
            }
        }
        Ok(Level {
            dir,
            name,
            prefix,
            names: names.into_iter(),
            node,
        })
    }

    /// Starts visiting a directory both copies have: what the peer has there and
    /// we do not is removed first (the directory gets an id for that).
    fn enter(
        &self,
        stack: &mut Vec<Level>,
        level: Level,
        their_children: &HashMap<&[u8], Vec<&[u8]>>,
        walked: &mut Vec<Bound>,
    ) -> Result<(), SyncError> {
        let ours: HashSet<&[u8]> = level
            .names
            .as_slice()
            .iter()
            .map(|n| n.as_bytes())
            .collect();
        let extras: Vec<Name> = their_children
            .get(level.prefix.as_slice())
            .into_iter()
            .flatten()
            .filter(|extra| !ours.contains(**extra))
            .filter_map(|extra| Name::new(*extra).ok())
            .collect();
        drop(ours);
        stack.push(level);
        if !extras.is_empty() {
            let parent = self.bind_path(stack, walked)?;
            for name in extras {
                self.send(Control::Remove { parent, name })?;
            }
        }
        Ok(())
    }

    /// Gives every directory of the walk's current path an id on both sides (from
    /// the top down: each `Bind` names its parent's id); returns the deepest one's.
    fn bind_path(&self, stack: &mut [Level], walked: &mut Vec<Bound>) -> Result<NodeId, SyncError> {
        let from = stack
            .iter()
            .rposition(|l| l.node.is_some())
            .map_or(0, |i| i + 1);
        for i in from..stack.len() {
            let parent = match i.checked_sub(1).and_then(|p| stack[p].node.as_ref()) {
                Some(p) => p.id,
                None => ROOT,
            };
            let name = stack[i].name.clone().ok_or(SyncError::Local {
                what: "the root".into(),
                errno: Errno::INVAL,
            })?;
            let fd = apply::reopen(stack[i].dir.as_fd(), OFlags::PATH)
                .map_err(local(format!("{name:?}")))?;
            let node = self.bind(fd, parent, name, walked)?;
            stack[i].node = Some(node);
        }
        Ok(stack
            .last()
            .and_then(|l| l.node.as_ref())
            .map_or(ROOT, |n| n.id))
    }

    /// Takes an id for the entry behind `fd` (ours, the kernel's if it has one) and
    /// names it to the peer as `parent/name`; the reference goes to `walked`.
    fn bind(
        &self,
        fd: std::os::fd::OwnedFd,
        parent: NodeId,
        name: Name,
        walked: &mut Vec<Bound>,
    ) -> Result<Arc<Node>, SyncError> {
        let node = self
            .inodes
            .reference(fd, |_| {})
            .map_err(local(format!("{name:?}")))?;
        walked.push(Bound::adopt(self, node.clone()));
        self.send(Op::Bind {
            id: node.id,
            parent,
            name,
        })?;
        Ok(node)
    }

    /// Creates `node` as `parent/name` on the peer, like ours (attributes, xattrs,
    /// size); returns it when it is a directory or a regular file (content follows).
    fn create(
        &self,
        node: &Arc<Node>,
        parent: NodeId,
        name: Name,
        st: &rustix::fs::Stat,
    ) -> Result<Option<Arc<Node>>, SyncError> {
        let new = NewNode {
            id: node.id,
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
        };
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => {
                self.send(Op::Mkdir {
                    parent,
                    name,
                    node: new,
                })?;
                self.copy_xattrs(node)?;
                Ok(Some(node.clone()))
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
                Ok(None)
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
                self.copy_xattrs(node)?;
                if kind != NodeKind::Regular {
                    return Ok(None);
                }
                self.send(Op::Truncate {
                    id: node.id,
                    size: st.st_size as u64,
                })?;
                Ok(Some(node.clone()))
            }
        }
    }

    /// Compares the peer's copy with ours while replicating, changing nothing
    /// (`vmctl verify`): every regular file, block by block. Returns the differing
    /// regions and the files the peer lacks.
    pub fn verify(&self) -> Result<Vec<Difference>, SyncError> {
        let state = self.link.state();
        if state != crate::link::LinkState::Connected {
            return Err(SyncError::NotConnected(state));
        }
        self.progress.done_bytes.store(0, Ordering::Relaxed);
        self.progress.total_bytes.store(0, Ordering::Relaxed);
        self.progress.read_bytes.store(0, Ordering::Relaxed);
        let mut held = Vec::new();
        let outcome = self.verify_all(&mut held);
        for id in held {
            if self.inodes.release_refs(id, 1) {
                self.link.submit_nowait(Op::Forget { id });
            }
        }
        outcome
    }

    fn verify_all(&self, held: &mut Vec<NodeId>) -> Result<Vec<Difference>, SyncError> {
        let missing = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let mut binds = Vec::new();
        // Name every file to the peer (as a lookup would), under the namespace lock.
        let files = {
            let _ns = self.namespace.read();
            let mut files = Vec::new();
            let root = self.inodes.get(ROOT).map_err(local("the root"))?;
            let mut dirs = VecDeque::from([(root, Vec::new())]);
            while let Some((dir, prefix)) = dirs.pop_front() {
                for entry in track::walk_one(dir.fd.as_fd()).map_err(local("a directory"))? {
                    let Ok(name) = Name::new(entry.path.clone()) else {
                        continue;
                    };
                    let path = track::join(&prefix, name.as_bytes());
                    let node = self
                        .inodes
                        .reference(entry.fd, |id| {
                            let (missing, what) = (missing.clone(), path.clone());
                            let bind = Op::Bind {
                                id,
                                parent: dir.id,
                                name: name.clone(),
                            };
                            let (tx, rx) = crossbeam_channel::bounded(1);
                            binds.push(rx);
                            let done: crate::link::Completion = Box::new(move |r| {
                                if r.is_err() {
                                    missing.lock().push(what);
                                }
                                let _ = tx.send(());
                            });
                            if self.link.submit(bind, done).is_err() {
                                tracing::warn!("verify: the peer went away");
                            }
                        })
                        .map_err(local(format!("{name:?}")))?;
                    held.push(node.id);
                    match EntryKind::of(entry.st.st_mode) {
                        EntryKind::Dir => dirs.push_back((node, path)),
                        EntryKind::File => files.push((node, path)),
                        _ => {}
                    }
                }
            }
            files
        };
        // Which names the peer lacks is known once it answered every one.
        for rx in binds {
            let _ = rx.recv();
        }
        let total = files.iter().map(|(n, _)| size_of(n)).sum();
        self.progress.total_bytes.store(total, Ordering::Relaxed);
        let mut out = Vec::new();
        for (node, path) in files {
            if missing.lock().contains(&path) {
                continue;
            }
            for (start, end) in self.compare_file(&node)? {
                out.push(Difference {
                    path: String::from_utf8_lossy(&path).into_owned(),
                    offset: start,
                    len: end - start,
                });
            }
        }
        for path in missing.lock().iter() {
            out.push(Difference {
                path: String::from_utf8_lossy(path).into_owned(),
                offset: 0,
                len: u64::MAX,
            });
        }
        Ok(out)
    }

    /// Compares every block of a file with the peer's (blake3; only hashes travel,
    /// several requests in flight); returns the differing regions. Each request is
    /// hashed and queued under its range lock, so live writes order around it.
    /// Holes are neither read nor hashed block by block ([`compare`]'s module docs):
    /// the cost is that of the data.
    pub(crate) fn compare_file(&self, node: &Node) -> Result<Vec<(u64, u64)>, SyncError> {
        let fd = apply::reopen(node.fd.as_fd(), OFlags::RDONLY).map_err(local("a file"))?;
        let size = rustix::fs::fstat(fd.as_fd())
            .map_err(local("a file"))?
            .st_size as u64;
        let read_before = compare::read_bytes();
        let mut inflight = VecDeque::new();
        let mut differing = Vec::new();
        let mut collect =
            |offset: u64, block: u32, q: crate::link::Query| -> Result<(), SyncError> {
                let block = u64::from(block);
                for i in q.wait().map_err(|_| SyncError::PeerGone)? {
                    let start = offset + u64::from(i) * block;
                    differing.push((start, start + block));
                }
                Ok(())
            };
        // The layout only picks the block sizes: a region that gains data meanwhile
        // is still read (hash_blocks looks again under the range lock). One window
        // at a time: a file with millions of extents is not listed whole.
        let mut window = 0;
        while window < size {
            let end = window.saturating_add(compare::WINDOW).min(size);
            let data = compare::data_segments(fd.as_fd(), window, end).map_err(local("a file"))?;
            for req in compare::plan(window, end, &data) {
                let query = {
                    let _order = node.ranges.lock(req.offset, req.offset + req.len());
                    let hashes = compare::hash_blocks(fd.as_fd(), req.offset, req.block, req.count)
                        .map_err(local("a file"))?;
                    self.link
                        .query(Control::Compare {
                            id: node.id,
                            offset: req.offset,
                            block: req.block,
                            hashes,
                        })
                        .map_err(|_| SyncError::PeerGone)?
                };
                self.progress
                    .done_bytes
                    .fetch_add(req.len().min(size - req.offset), Ordering::Relaxed);
                inflight.push_back((req.offset, req.block, query));
                if inflight.len() > 4 {
                    if let Some((at, block, q)) = inflight.pop_front() {
                        collect(at, block, q)?;
                    }
                }
            }
            window = end;
        }
        while let Some((at, block, q)) = inflight.pop_front() {
            collect(at, block, q)?;
        }
        self.progress.read_bytes.fetch_add(
            compare::read_bytes().saturating_sub(read_before),
            Ordering::Relaxed,
        );
        Ok(track::merge_ranges(differing))
    }

    /// Sends one piece `[start, end)` of a file as it is now: data as writes, holes
    /// as punched holes (or nothing, `Holes::Skip`), each chunk read and queued
    /// under its range lock so that live writes are ordered around it.
    fn copy_piece(
        &self,
        node: &Node,
        fd: &std::os::fd::OwnedFd,
        start: u64,
        end: u64,
        holes: Holes,
    ) -> Result<u64, SyncError> {
        let mut sent = 0u64;
        let mut pos = start;
        while pos < end {
            let len = CHUNK.min(end - pos);
            self.pace(len);
            let _order = node.ranges.lock(pos, pos + len);
            let data_at = match rustix::fs::seek(fd.as_fd(), SeekFrom::Data(pos)) {
                Ok(p) => p,
                Err(Errno::NXIO) => u64::MAX,
                Err(e) => return Err(local("a file")(e)),
            };
            if data_at > pos && holes == Holes::Skip {
                pos = data_at.min(end);
                continue;
            }
            if data_at > pos {
                // A hole (or past the end): the peer punches the same. A hole
                // longer than a chunk goes in one punch: a huge sparse region (a
                // truncate to terabytes) must not cost one round per MiB.
                let mut hole_end = data_at.min(pos + len);
                let _wide;
                if data_at > pos + len && end > pos + len {
                    drop(_order);
                    _wide = node.ranges.lock(pos, end);
                    hole_end = match rustix::fs::seek(fd.as_fd(), SeekFrom::Data(pos)) {
                        Ok(p) => p.min(end),
                        Err(Errno::NXIO) => end,
                        Err(e) => return Err(local("a file")(e)),
                    };
                    if hole_end <= pos {
                        continue;
                    }
                }
                let hole_len = hole_end - pos;
                self.send(Op::Fallocate {
                    id: node.id,
                    mode: (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u32,
                    offset: pos,
                    len: hole_len,
                })?;
                self.progress
                    .done_bytes
                    .fetch_add(hole_len, Ordering::Relaxed);
                pos += hole_len;
                continue;
            }
            let hole_at =
                rustix::fs::seek(fd.as_fd(), SeekFrom::Hole(pos)).map_err(local("a file"))?;
            // At most one CHUNK: fits a buffer on any target.
            let n = len.min(hole_at - pos);
            let Ok(n_usize) = usize::try_from(n) else {
                return Err(local("a file")(Errno::FBIG));
            };
            let mut buf = AlignedBuf::zeroed(n_usize);
            let got = crate::fdio::read_full(fd.as_fd(), buf.as_mut_slice(), pos)
                .map_err(local("a file"))?;
            if got == 0 {
                break;
            }
            buf.truncate(got);
            self.send(Op::Write {
                id: node.id,
                offset: pos,
                data: Payload::Aligned(Arc::new(buf)),
            })?;
            self.progress
                .done_bytes
                .fetch_add(got as u64, Ordering::Relaxed);
            sent += got as u64;
            pos += got as u64;
        }
        Ok(sent)
    }

    /// Sends the file's size as it is now, under the whole-file lock (after every
    /// piece of it was queued).
    fn send_size(&self, node: &Node, fd: &std::os::fd::OwnedFd) -> Result<(), SyncError> {
        let _whole = node.ranges.lock(0, u64::MAX);
        let st = rustix::fs::fstat(fd.as_fd()).map_err(local("a file"))?;
        self.send(Op::Truncate {
            id: node.id,
            size: st.st_size as u64,
        })
    }

    /// Full sync: empties the peer's directory and recreates our namespace there.
    fn copy_namespace(&self, held: &mut Vec<NodeId>) -> Result<Vec<Arc<Node>>, SyncError> {
        self.send(Control::Wipe)?;
        let root = self.inodes.get(ROOT).map_err(local("the root"))?;
        self.copy_attrs(&root)?;
        let mut files = Vec::new();
        let mut seen = HashSet::from([ROOT]);
        let mut dirs = VecDeque::from([root]);
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
                if let Some(node) = self.create(&node, dir.id, name, &st)? {
                    if node.kind == FileType::Directory {
                        dirs.push_back(node);
                    } else {
                        files.push(node);
                    }
                }
            }
        }
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
}

/// Size of a file (what a compare reads).
fn size_of(node: &Node) -> u64 {
    rustix::fs::fstat(node.fd.as_fd()).map_or(0, |st| st.st_size as u64)
}

/// Allocated bytes of a file (what a whole copy sends).
fn allocated(node: &Node) -> u64 {
    rustix::fs::fstat(node.fd.as_fd()).map_or(0, |st| st.st_blocks as u64 * 512)
}
