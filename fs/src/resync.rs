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
//! **Bounded descriptors**: a file created on the peer (or to be compared) that the
//! kernel does not hold and that has one name gives its id back at once, in the
//! sync's own stream (`Forget` right after its creation), and is kept as a path
//! and inode number (~50 bytes). Its data phase binds it again by name, as a
//! lookup would (under the namespace lock, the `Bind` live), copies it and gives it
//! back: one file at a time. A file renamed before its turn (the name leads
//! elsewhere) is searched for by inode number once the rest is done, under the
//! namespace write lock. Directories hold their id while the walk is beneath them.
//!
//! **Full** (no report from the peer):
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
use crate::syncset::SyncSet;
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
    /// What this writer changed and has not synced yet (the replicator's set):
    /// synced before the records are cleared.
    changed: Arc<SyncSet>,
    /// Resync data rate limit (bytes/s), and the bytes sent since this start.
    rate_limit: Option<u64>,
    paced: parking_lot::Mutex<(std::time::Instant, u64)>,
    /// Reader threads of the data phase (`pipeline`).
    streams: usize,
}

/// Files a verify names to the peer before comparing them (ids held at once).
const VERIFY_BATCH: usize = 256;

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
    /// Already given back by [`Bound::give_back_in_stream`].
    given: bool,
}

impl Bound {
    /// Takes over a reference the caller already took (`Inodes::reference`).
    fn adopt(syncer: &Syncer, node: Arc<Node>) -> Bound {
        Bound {
            node,
            inodes: syncer.inodes.clone(),
            link: syncer.link.clone(),
            given: false,
        }
    }

    /// Gives the reference back while the link is `Attaching`: the `Forget` goes
    /// in the sync's own stream (a live one would not be sent yet).
    fn give_back_in_stream(mut self, syncer: &Syncer) -> Result<(), SyncError> {
        self.given = true;
        syncer.give_back_in_stream(self.node.id)
    }
}

impl Drop for Bound {
    fn drop(&mut self) {
        if !self.given && self.inodes.release_refs(self.node.id, 1) {
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

/// Regular files a full copy created on the peer without keeping their ids: their
/// path and inode number (about 50 bytes each), and their allocated bytes in all.
#[derive(Debug, Default)]
struct Listed {
    /// Path, inode number, and whether it is new on the peer (else its data
    /// goes by the records, or compared).
    files: Vec<(Vec<u8>, u64, bool)>,
    bytes: u64,
}

/// One directory of a depth-first walk that holds its id: its node, its path and
/// the names still to visit (listed at once; no descriptor stays open for them).
struct Walked {
    node: Arc<Node>,
    prefix: Vec<u8>,
    names: std::vec::IntoIter<Name>,
}

impl Walked {
    fn list(node: Arc<Node>, prefix: Vec<u8>) -> Result<Walked, SyncError> {
        let names = names_in(node.fd.as_fd()).map_err(local("a directory"))?;
        Ok(Walked {
            node,
            prefix,
            names: names.into_iter(),
        })
    }
}

/// The names in a directory (O_PATH descriptor `dir`), without `.` and `..`.
fn names_in(dir: std::os::fd::BorrowedFd<'_>) -> Result<Vec<Name>, Errno> {
    Ok(apply::dir_names(dir)?
        .into_iter()
        .filter_map(|raw| Name::new(raw).ok())
        .collect())
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
    /// The walk's reference when it created the directory on the peer: given
    /// back (in the sync's stream) once the walk leaves it.
    own: Option<Bound>,
}

/// What a copy does where the file has a hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holes {
    /// The peer's region may hold data: punch it.
    Punch,
    /// The peer's file is new: nothing to do.
    Skip,
}

/// Files bound again by name (full copy) go through the pipeline this many at a
/// time: one descriptor each while in flight.
const LISTED_BATCH: usize = 256;

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
        changed: Arc<SyncSet>,
    ) -> Self {
        Self {
            inodes,
            namespace,
            link,
            progress,
            failed: Arc::new(AtomicBool::new(false)),
            tracker,
            changed,
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
        let data_bytes = self.copy_all(report.as_deref(), incremental)?;
        if self.failed.load(Ordering::SeqCst) {
            return Err(SyncError::PeerGone);
        }
        // Our copy must be on disk too before the records of what the peer lacked
        // are forgotten: after a power cut here it would differ from the peer's where
        // nothing says so. (Later writes are in the activity log.) Only what
        // this writer changed and has not synced (`syncfs` of the backing
        // filesystem waited for every other program's dirty data too, e.g. the
        // receivers of other modules on the same filesystem).
        let root = self.inodes.get(ROOT).map_err(local("the root"))?;
        self.changed
            .sync(root.fd.as_fd())
            .map_err(local("sync of this copy"))?;
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

    fn copy_all(&self, report: Option<&Report>, incremental: bool) -> Result<u64, SyncError> {
        // `listed`: files whose ids were given back, bound again by name later.
        let (plans, listed) = {
            let _no_namespace_changes = self.namespace.write();
            let (plans, walked, listed) = match report {
                Some(report) => self.reconcile_namespace(report, incremental)?,
                None => self.copy_namespace()?,
            };
            if !self.link.begin_data() {
                return Err(SyncError::PeerGone);
            }
            self.tracker.sync_window_begin();
            // The directories and metadata-only entries the walk bound: their
            // `Forget`s travel now that the link sends live operations.
            drop(walked);
            (plans, listed)
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
        let job_of = |plan: Plan| match plan {
            Plan::Whole(node) => Job::Copy(node),
            Plan::Dirty(node, path)
                if incremental && !suspect.iter().any(|n| track::is_beneath(&path, n)) =>
            {
                let mine = self.tracker.ranges_of(node.node.ino());
                if mine.whole {
                    Job::Compare(node)
                } else {
                    let mut ranges = mine.ranges;
                    ranges
                        .extend_from_slice(peer_dirty.get(path.as_slice()).copied().unwrap_or(&[]));
                    Job::Ranges(node, track::merge_ranges(ranges))
                }
            }
            Plan::Dirty(node, _) => Job::Compare(node),
        };
        let size_of_job = |job: &Job| match job {
            Job::Ranges(_, r) => r.iter().map(|(s, e)| e - s).sum(),
            Job::Copy(b) => allocated(&b.node),
            Job::Compare(b) => size_of(&b.node),
        };
        let mut work = Vec::new();
        let mut total = 0u64;
        for plan in plans {
            let job = job_of(plan);
            total += size_of_job(&job);
            work.push(job);
        }
        total += listed.bytes;
        self.progress.total_bytes.store(total, Ordering::Relaxed);
        // Each job's reference is given back as soon as its operations are queued
        // (when its pipeline segment is done): the sync holds one descriptor per
        // file in flight, not one per file of the tree.
        let mut bytes = self.pipeline(work)?;
        // The files whose ids were given back, bound again a batch at a time.
        bytes += self.copy_listed(listed, &|plan| {
            let job = job_of(plan);
            if !matches!(job, Job::Copy(_)) {
                // A new file's bytes are counted already.
                self.progress
                    .total_bytes
                    .fetch_add(size_of_job(&job), Ordering::Relaxed);
            }
            job
        })?;
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
    ) -> Result<(Vec<Plan>, Vec<Bound>, Listed), SyncError> {
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
        let mut listed = Listed::default();
        // Files with several names: the id their first name got.
        let mut links: std::collections::HashMap<(u64, u64), NodeId> =
            std::collections::HashMap::new();
        let mut passed = 0u64;
        let mut stack = Vec::new();
        let top = self.list(root.fd.clone(), None, Vec::new(), Some(root))?;
        self.enter(&mut stack, top, &their_children, &mut walked)?;
        while let Some(level) = stack.last_mut() {
            let Some(name) = level.names.next() else {
                // Its id (if it got one) is given back with the walk's, or now
                // if the walk created it.
                if let Some(own) = stack.pop().and_then(|done| done.own) {
                    own.give_back_in_stream(self)?;
                }
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
                if !known && !linked {
                    // Nobody else names it until the data phase: its id goes back
                    // now, its data follows by name.
                    if let Some(b) = walked.pop() {
                        b.give_back_in_stream(self)?;
                    }
                    if data {
                        listed.files.push((path, st.st_ino, false));
                    }
                    continue;
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
            let known = self.inodes.knows(&st);
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
                    let dir = node.fd.clone();
                    // New on the peer: nothing of theirs beneath it to remove.
                    let mut level = self.list(dir, Some(name), path, Some(node))?;
                    if known {
                        walked.push(bound);
                    } else {
                        level.own = Some(bound);
                    }
                    stack.push(level);
                }
                Some(_) if !known && !linked => {
                    listed.bytes += st.st_blocks as u64 * 512;
                    listed.files.push((path, st.st_ino, true));
                    bound.give_back_in_stream(self)?;
                }
                Some(_) => plans.push(Plan::Whole(bound)),
                None if !known && !linked => bound.give_back_in_stream(self)?,
                None => walked.push(bound),
            }
        }
        tracing::info!(
            bound = plans.len() + walked.len(),
            by_name = listed.files.len(),
            passed_over = passed,
            "namespace reconciled: ids taken only for what the resync acts on"
        );
        Ok((plans, walked, listed))
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
            own: None,
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
        self.verify_all()
    }

    /// Walks the tree depth first naming every entry to the peer as a lookup would
    /// (one entry at a time under the namespace lock) and compares the files in
    /// batches of [`VERIFY_BATCH`] once the peer answered their names: the walk
    /// holds one id per level of depth plus one per file of the batch, never one
    /// per file of the tree.
    fn verify_all(&self) -> Result<Vec<Difference>, SyncError> {
        let root = self.inodes.get(ROOT).map_err(local("the root"))?;
        let mut out = Vec::new();
        let mut missing = Vec::new();
        let mut batch = Vec::new();
        let mut stack = vec![Walked::list(root, Vec::new())?];
        // The directories' ids: given back when their walk is done.
        let mut dirs: Vec<Bound> = Vec::new();
        while let Some(level) = stack.last_mut() {
            let Some(name) = level.names.next() else {
                stack.pop();
                dirs.pop();
                continue;
            };
            let path = track::join(&level.prefix, name.as_bytes());
            let parent = level.node.id;
            let (bound, kind, answer) = {
                let _ns = self.namespace.read();
                let fd = match apply::lookup_beneath(level.node.fd.as_fd(), &name) {
                    Ok(fd) => fd,
                    Err(Errno::NOENT) => continue,
                    Err(e) => return Err(local(format!("{name:?}"))(e)),
                };
                let st = rustix::fs::fstat(fd.as_fd()).map_err(local(format!("{name:?}")))?;
                let mut answer = None;
                let node = self
                    .inodes
                    .reference(fd, |id| {
                        let (tx, rx) = crossbeam_channel::bounded(1);
                        answer = Some(rx);
                        let done: crate::link::Completion = Box::new(move |r| {
                            let _ = tx.send(r.is_ok());
                        });
                        let bind = Op::Bind {
                            id,
                            parent,
                            name: name.clone(),
                        };
                        if self.link.submit(bind, done).is_err() {
                            tracing::warn!("verify: the peer went away");
                        }
                    })
                    .map_err(local(format!("{name:?}")))?;
                (Bound::adopt(self, node), EntryKind::of(st.st_mode), answer)
            };
            match kind {
                EntryKind::Dir => {
                    // The peer lacking a directory lacks everything beneath it: the
                    // entries say so one by one, as before.
                    if answer
                        .as_ref()
                        .is_some_and(|rx| !rx.recv().unwrap_or(false))
                    {
                        missing.push(path.clone());
                    }
                    stack.push(Walked::list(bound.node.clone(), path)?);
                    dirs.push(bound);
                }
                EntryKind::File => {
                    self.progress
                        .total_bytes
                        .fetch_add(size_of(&bound.node), Ordering::Relaxed);
                    batch.push((bound, path, answer));
                    if batch.len() >= VERIFY_BATCH {
                        self.verify_batch(&mut batch, &mut out, &mut missing)?;
                    }
                }
                _ => {
                    if answer.is_some_and(|rx| !rx.recv().unwrap_or(false)) {
                        missing.push(path);
                    }
                }
            }
        }
        self.verify_batch(&mut batch, &mut out, &mut missing)?;
        drop(dirs);
        for path in missing {
            out.push(Difference {
                path: String::from_utf8_lossy(&path).into_owned(),
                offset: 0,
                len: u64::MAX,
            });
        }
        Ok(out)
    }

    /// Compares the files of a verify batch the peer has (their names answered).
    #[allow(clippy::type_complexity)]
    fn verify_batch(
        &self,
        batch: &mut Vec<(Bound, Vec<u8>, Option<crossbeam_channel::Receiver<bool>>)>,
        out: &mut Vec<Difference>,
        missing: &mut Vec<Vec<u8>>,
    ) -> Result<(), SyncError> {
        for (bound, path, answer) in batch.drain(..) {
            if answer.is_some_and(|rx| !rx.recv().unwrap_or(false)) {
                missing.push(path);
                continue;
            }
            for (start, end) in self.compare_file(&bound.node)? {
                out.push(Difference {
                    path: String::from_utf8_lossy(&path).into_owned(),
                    offset: start,
                    len: end - start,
                });
            }
        }
        Ok(())
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
            // Recycled: only the bytes read are sent.
            let mut buf = AlignedBuf::scratch(n_usize);
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

    /// Full sync: empties the peer's directory and recreates our namespace there,
    /// depth first. Returns the plans of the files whose ids stay taken (the kernel
    /// holds them, or they have several names), the other references to keep until
    /// the link sends live operations (hard-linked non-files), and the regular files
    /// whose ids were given back right after their creation (`Forget` in the same
    /// stream): their data follows by name ([`Syncer::copy_listed`]). The walk holds
    /// one directory id and descriptor per level of depth, never one per file.
    fn copy_namespace(&self) -> Result<(Vec<Plan>, Vec<Bound>, Listed), SyncError> {
        self.send(Control::Wipe)?;
        let root = self.inodes.get(ROOT).map_err(local("the root"))?;
        self.copy_attrs(&root)?;
        let mut plans = Vec::new();
        let mut pinned = Vec::new();
        let mut listed = Listed::default();
        // Files with several names: the id their first name got (kept taken).
        let mut links: HashMap<(u64, u64), NodeId> = HashMap::new();
        let mut stack = vec![Walked::list(root, Vec::new())?];
        while let Some(level) = stack.last_mut() {
            let Some(name) = level.names.next() else {
                if let Some(done) = stack.pop() {
                    self.give_back_in_stream(done.node.id)?;
                }
                continue;
            };
            let dir = level.node.clone();
            let path = track::join(&level.prefix, name.as_bytes());
            let fd = match apply::lookup_beneath(dir.fd.as_fd(), &name) {
                Ok(fd) => fd,
                Err(Errno::NOENT) => continue,
                Err(e) => return Err(local(format!("{name:?}"))(e)),
            };
            let st = rustix::fs::fstat(fd.as_fd()).map_err(local(format!("{name:?}")))?;
            let key = (st.st_dev, st.st_ino);
            let linked = EntryKind::of(st.st_mode) != EntryKind::Dir && st.st_nlink > 1;
            if let Some(&id) = links.get(&key).filter(|_| linked) {
                // Another name of a node already created: a hard link.
                self.send(Op::Link {
                    id,
                    parent: dir.id,
                    name,
                })?;
                continue;
            }
            // The kernel holds it: live operations may name its id meanwhile.
            let known = self.inodes.knows(&st);
            let node = self
                .inodes
                .reference(fd, |_| {})
                .map_err(local(format!("{name:?}")))?;
            if linked {
                links.insert(key, node.id);
            }
            match self.create(&node, dir.id, name, &st)? {
                Some(node) if node.kind == FileType::Directory => {
                    stack.push(Walked::list(node, path)?);
                }
                Some(node) if known || linked => {
                    listed.bytes += st.st_blocks as u64 * 512;
                    plans.push(Plan::Whole(Bound::adopt(self, node)));
                }
                Some(node) => {
                    listed.bytes += st.st_blocks as u64 * 512;
                    listed.files.push((path, st.st_ino, true));
                    self.give_back_in_stream(node.id)?;
                }
                None if linked => pinned.push(Bound::adopt(self, node)),
                None => self.give_back_in_stream(node.id)?,
            }
        }
        tracing::info!(
            kept = plans.len() + pinned.len(),
            by_name = listed.files.len(),
            "namespace copied: ids kept only for what the kernel holds and hard links"
        );
        Ok((plans, pinned, listed))
    }

    /// Gives the walk's reference on `id` back while the link is `Attaching`: a
    /// `Forget` in the sync's own stream (a live one would not be sent yet).
    fn give_back_in_stream(&self, id: NodeId) -> Result<(), SyncError> {
        if self.inodes.release_refs(id, 1) {
            self.send(Op::Forget { id })?;
        }
        Ok(())
    }

    /// The data phase of the files [`Syncer::copy_namespace`] gave back: each is
    /// bound again by its name (under the namespace lock, so both sides resolve it
    /// to the same file), copied and given back, one at a time. A file renamed or
    /// replaced meanwhile (its name no longer leads to it) is searched for once the
    /// rest is done, with no namespace change running ([`Syncer::copy_lost`]).
    fn copy_listed(&self, listed: Listed, job_of: &dyn Fn(Plan) -> Job) -> Result<u64, SyncError> {
        let mut bytes = 0;
        let mut lost = HashSet::new();
        let mut chain = Vec::new();
        let mut batch = Vec::new();
        for (path, ino, whole) in listed.files {
            let found = {
                let _ns = self.namespace.read();
                self.bind_named(&mut chain, &path)?
            };
            let Some(file) = found else {
                lost.insert(ino);
                continue;
            };
            if file.node.ino() != ino {
                // Another file took the name (its own changes travel live; copying
                // it again harms nothing); ours is elsewhere.
                lost.insert(ino);
                let size = size_of(&file.node);
                batch.push(Job::Ranges(file, vec![(0, size)]));
            } else {
                batch.push(job_of(if whole {
                    Plan::Whole(file)
                } else {
                    Plan::Dirty(file, path)
                }));
            }
            if batch.len() >= LISTED_BATCH {
                bytes += self.pipeline(std::mem::take(&mut batch))?;
            }
        }
        if !batch.is_empty() {
            bytes += self.pipeline(batch)?;
        }
        drop(chain);
        if !lost.is_empty() {
            bytes += self.copy_lost(&lost)?;
        }
        Ok(bytes)
    }

    /// Copies the files of `lost` (inode numbers) wherever they are now, walking
    /// the tree under the namespace write lock (no rename can hide one again). Only
    /// after a rename during a full copy.
    fn copy_lost(&self, lost: &HashSet<u64>) -> Result<u64, SyncError> {
        tracing::info!(
            files = lost.len(),
            "full copy: files renamed meanwhile, searching for them"
        );
        let _no_namespace_changes = self.namespace.write();
        let root = self.inodes.get(ROOT).map_err(local("the root"))?;
        let mut paths = Vec::new();
        track::walk_each(root.fd.as_fd(), |e: &track::WalkEntry| {
            if EntryKind::of(e.st.st_mode) == EntryKind::File && lost.contains(&e.st.st_ino) {
                paths.push(e.path.clone());
            }
            Ok::<(), Errno>(())
        })
        .map_err(local("a directory"))?;
        let mut bytes = 0;
        let mut chain = Vec::new();
        let mut batch = Vec::new();
        for path in paths {
            if let Some(file) = self.bind_named(&mut chain, &path)? {
                // The peer's copy may hold anything (holes are punched).
                let size = size_of(&file.node);
                batch.push(Job::Ranges(file, vec![(0, size)]));
                if batch.len() >= LISTED_BATCH {
                    bytes += self.pipeline(std::mem::take(&mut batch))?;
                }
            }
        }
        if !batch.is_empty() {
            bytes += self.pipeline(batch)?;
        }
        Ok(bytes)
    }

    /// Binds the regular file at `path` (and the directories above it, kept in
    /// `chain` for the next file) as a lookup would: an id on both sides, the
    /// `Bind` sent live. None if the name leads to no regular file (any more).
    /// Called under the namespace lock.
    fn bind_named(
        &self,
        chain: &mut Vec<(Vec<u8>, Bound)>,
        path: &[u8],
    ) -> Result<Option<Bound>, SyncError> {
        let (parent, name) = match path.iter().rposition(|&b| b == b'/') {
            Some(i) => (&path[..i], &path[i + 1..]),
            None => (&path[..0], path),
        };
        while chain
            .last()
            .is_some_and(|(p, _)| !track::is_beneath(parent, p))
        {
            chain.pop();
        }
        let from = chain.last().map_or(0, |(p, _)| p.len() + 1);
        let mut names: Vec<&[u8]> = Vec::new();
        if from < parent.len() {
            names.extend(parent[from..].split(|&b| b == b'/'));
        }
        names.push(name);
        let last = names.len() - 1;
        for (i, raw) in names.into_iter().enumerate() {
            let dir = match chain.last() {
                Some((_, b)) => b.node.clone(),
                None => self.inodes.get(ROOT).map_err(local("the root"))?,
            };
            let Ok(name) = Name::new(raw) else {
                return Ok(None);
            };
            let fd = match apply::lookup_beneath(dir.fd.as_fd(), &name) {
                Ok(fd) => fd,
                Err(Errno::NOENT | Errno::NOTDIR) => return Ok(None),
                Err(e) => return Err(local(format!("{name:?}"))(e)),
            };
            let st = rustix::fs::fstat(fd.as_fd()).map_err(local(format!("{name:?}")))?;
            let want = if i == last {
                EntryKind::File
            } else {
                EntryKind::Dir
            };
            if EntryKind::of(st.st_mode) != want {
                return Ok(None);
            }
            let bound = self.bind_live(fd, dir.id, name)?;
            if i == last {
                return Ok(Some(bound));
            }
            let prefix = track::join(chain.last().map_or(&[][..], |(p, _)| p), raw);
            chain.push((prefix, bound));
        }
        Ok(None)
    }

    /// Takes an id for the entry behind `fd` as a lookup does: a new id is named
    /// to the peer (`parent/name`) by a live `Bind` queued under the inode table's
    /// lock, so it is ordered with every other operation naming it.
    fn bind_live(
        &self,
        fd: std::os::fd::OwnedFd,
        parent: NodeId,
        name: Name,
    ) -> Result<Bound, SyncError> {
        let mut gone = false;
        let node = self
            .inodes
            .reference(fd, |id| {
                let (failed, link) = (self.failed.clone(), self.link.clone());
                let what = format!("{name:?}");
                let done: crate::link::Completion = Box::new(move |r| {
                    if let Err(errno) = r {
                        failed.store(true, Ordering::SeqCst);
                        link.diverged(&format!("sync: peer failed to bind {what}: {errno}"));
                    }
                });
                gone = self
                    .link
                    .submit(Op::Bind { id, parent, name }, done)
                    .is_err();
            })
            .map_err(local("a file"))?;
        let bound = Bound::adopt(self, node);
        if gone {
            return Err(SyncError::PeerGone);
        }
        Ok(bound)
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
