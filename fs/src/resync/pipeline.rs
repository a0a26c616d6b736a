//! The data phase of a resync with several files and regions in flight.
//!
//! Why: one thread that read one region after the other, and waited for the peer
//! to sync at every durability point (every 64 MiB and at the end of every file),
//! brought a returning peer up to date at about a tenth of the disk's and the
//! link's rate. Here the syncing thread (the dispatcher) walks the jobs in order,
//! cuts every file's regions into pieces (data at most one chunk, a hole whole),
//! asks the kernel to read a window ahead of them, and hands them to `streams`
//! reader threads. A reader reads and queues its piece chunk by chunk under the
//! chunk's range lock, so live writes are ordered around it exactly as with one
//! thread; the peer applies in the link's order. The reader that finishes a
//! file's last piece queues its size (under the whole-file lock).
//!
//! Durability: the regions of the dirty maps (`Job::Ranges`) are grouped into
//! steps of [`RESUME_STEP`] bytes across files. When every piece of a step and the
//! size of each of its files is queued, a `SyncAll` goes behind them; nobody waits
//! for it. The peer acknowledges a `SyncAll` only once everything before it is
//! applied, synced, and acknowledged; that acknowledgement retires the step: our
//! own copy is synced (`syncfs`), then the step's marks are cleared
//! (`Tracker::clear_synced`, which refuses once the link degraded since the
//! window began). Steps may retire in any order (each clears only its own
//! regions); at most [`MAX_STEPS`] are unretired at once. A crash or a lost peer
//! anywhere leaves the marks of every unretired step, so the next resync sends
//! them again, and the peer stays outdated until the final `InSync`.

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;
use rustix::fs::{OFlags, SeekFrom};

use super::{local, size_of, Bound, Holes, Job, SyncError, Syncer, CHUNK, READ_AHEAD, RESUME_STEP};
use crate::apply::{self, Errno};
use crate::op::{Control, ROOT};

/// Reader threads of a resync unless configured (`--resync-streams`).
pub const DEFAULT_STREAMS: usize = 4;
/// Upper bound of `--resync-streams`.
pub const MAX_STREAMS: usize = 64;
/// Durability steps queued but not yet acknowledged by the peer.
const MAX_STEPS: usize = 4;
/// Pieces read ahead of the readers (bounds descriptors held for small files).
const MAX_AHEAD_PIECES: usize = 256;

/// What a hole of a dirty region counts toward a step (it is one punch on the
/// peer, whatever its length).
const HOLE_WEIGHT: u64 = 64 << 10;

/// A file's inode (the key of its dirty map) and regions of it.
type Regions = (u64, Vec<(u64, u64)>);

/// One durability step: what its acknowledgement lets us clear.
struct Step {
    /// The regions brought up to date by this step.
    files: Mutex<Vec<Regions>>,
    /// Segments not yet fully queued, plus one while the dispatcher adds to it.
    open: AtomicUsize,
}

/// A file being sent: its id on both sides and a descriptor to read it.
struct File {
    bound: Bound,
    fd: OwnedFd,
}

/// Regions of one file within one step (or a whole job outside the steps).
struct Segment {
    file: Arc<File>,
    holes: Holes,
    /// Pieces not yet queued, plus one while the dispatcher adds pieces.
    remaining: AtomicUsize,
    step: Option<Arc<Step>>,
}

struct Piece {
    seg: Arc<Segment>,
    start: u64,
    end: u64,
    /// Data (read ahead), not a hole.
    data: bool,
}

type Retired = (Arc<Step>, Result<(), Errno>);

/// State shared by the dispatcher and the readers.
struct Run<'a> {
    syncer: &'a Syncer,
    sent: AtomicU64,
    /// Set on the first error: nothing more is queued, no step is closed.
    stop: AtomicBool,
    error: Mutex<Option<SyncError>>,
    /// `SyncAll`s queued (each sends one message on `retired`).
    queued_steps: AtomicUsize,
    retired: Sender<Retired>,
}

impl Run<'_> {
    fn fail(&self, e: SyncError) {
        self.stop.store(true, Ordering::SeqCst);
        let mut slot = self.error.lock();
        if slot.is_none() {
            *slot = Some(e);
        }
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn reader(&self, pieces: Receiver<Piece>) {
        for p in pieces {
            if self.stopped() {
                continue;
            }
            let node = &p.seg.file.bound.node;
            match self
                .syncer
                .copy_piece(node, &p.seg.file.fd, p.start, p.end, p.seg.holes)
            {
                Ok(n) => {
                    self.sent.fetch_add(n, Ordering::Relaxed);
                    self.piece_done(&p.seg);
                }
                Err(e) => self.fail(e),
            }
        }
    }

    /// One piece of `seg` (or the dispatcher's own count) is queued; the last
    /// queues the file's size and closes its share of the step.
    fn piece_done(&self, seg: &Segment) {
        if seg.remaining.fetch_sub(1, Ordering::AcqRel) != 1 || self.stopped() {
            return;
        }
        if let Err(e) = self.syncer.send_size(&seg.file.bound.node, &seg.file.fd) {
            self.fail(e);
            return;
        }
        if let Some(step) = &seg.step {
            self.step_done(step);
        }
    }

    /// One segment of `step` (or the dispatcher's own count) is queued; the last
    /// queues the step's `SyncAll`, whose acknowledgement retires it.
    fn step_done(&self, step: &Arc<Step>) {
        if step.open.fetch_sub(1, Ordering::AcqRel) != 1 || self.stopped() {
            return;
        }
        let tx = self.retired.clone();
        let mine = step.clone();
        let queued = self.syncer.link.enqueue_sync(
            Control::SyncAll,
            Box::new(move |r| {
                let _ = tx.send((mine, r));
            }),
        );
        match queued {
            Ok(()) => {
                self.queued_steps.fetch_add(1, Ordering::SeqCst);
            }
            Err(_) => self.fail(SyncError::PeerGone),
        }
    }
}

/// The dispatcher's side: pieces read ahead, steps being filled, steps in flight.
struct Dispatch<'r, 'a> {
    run: &'r Run<'a>,
    /// None once every piece is handed out (the readers then end).
    pieces: Option<Sender<Piece>>,
    retired: Receiver<Retired>,
    ahead: VecDeque<Piece>,
    ahead_bytes: u64,
    step: Arc<Step>,
    step_bytes: u64,
    closed_steps: usize,
    retired_steps: usize,
}

fn new_step() -> Arc<Step> {
    Arc::new(Step {
        files: Mutex::new(Vec::new()),
        open: AtomicUsize::new(1),
    })
}

impl Dispatch<'_, '_> {
    /// Queues one segment: `ranges` of `file`, cut into pieces.
    fn segment(
        &mut self,
        file: &Arc<File>,
        ranges: &[(u64, u64)],
        holes: Holes,
        step: bool,
    ) -> Result<(), SyncError> {
        let step = step.then(|| self.step.clone());
        if let Some(step) = &step {
            step.open.fetch_add(1, Ordering::AcqRel);
            step.files
                .lock()
                .push((file.bound.node.ino(), ranges.to_vec()));
        }
        let seg = Arc::new(Segment {
            file: file.clone(),
            holes,
            remaining: AtomicUsize::new(1),
            step,
        });
        for &(start, end) in ranges {
            let mut pos = start;
            while pos < end {
                // Where data and holes are now (the reader looks again under the lock).
                let data_at = match rustix::fs::seek(file.fd.as_fd(), SeekFrom::Data(pos)) {
                    Ok(p) => p.min(end),
                    Err(Errno::NXIO) => end,
                    Err(e) => return Err(local("a file")(e)),
                };
                if data_at > pos {
                    if holes == Holes::Punch {
                        self.piece(&seg, pos, data_at, false)?;
                    }
                    pos = data_at;
                    continue;
                }
                let hole_at = rustix::fs::seek(file.fd.as_fd(), SeekFrom::Hole(pos))
                    .map_err(local("a file"))?
                    .min(end);
                while pos < hole_at {
                    let piece_end = (pos + CHUNK).min(hole_at);
                    self.piece(&seg, pos, piece_end, true)?;
                    pos = piece_end;
                }
            }
        }
        self.run.piece_done(&seg);
        Ok(())
    }

    fn piece(
        &mut self,
        seg: &Arc<Segment>,
        start: u64,
        end: u64,
        data: bool,
    ) -> Result<(), SyncError> {
        seg.remaining.fetch_add(1, Ordering::AcqRel);
        if data {
            // Scattered regions read one by one would wait for the disk each time.
            let _ = rustix::fs::fadvise(
                seg.file.fd.as_fd(),
                start,
                std::num::NonZeroU64::new(end - start),
                rustix::fs::Advice::WillNeed,
            );
            self.ahead_bytes += end - start;
        }
        self.ahead.push_back(Piece {
            seg: seg.clone(),
            start,
            end,
            data,
        });
        while self.ahead_bytes > READ_AHEAD || self.ahead.len() > MAX_AHEAD_PIECES {
            self.hand_out()?;
        }
        Ok(())
    }

    /// Gives the oldest piece read ahead to a reader.
    fn hand_out(&mut self) -> Result<(), SyncError> {
        let Some(p) = self.ahead.pop_front() else {
            return Ok(());
        };
        if p.data {
            self.ahead_bytes = self.ahead_bytes.saturating_sub(p.end - p.start);
        }
        if self.run.stopped() {
            return Err(SyncError::PeerGone);
        }
        match &self.pieces {
            Some(tx) => tx.send(p).map_err(|_| SyncError::PeerGone),
            None => Err(SyncError::PeerGone),
        }
    }

    fn flush_ahead(&mut self) -> Result<(), SyncError> {
        while !self.ahead.is_empty() {
            self.hand_out()?;
        }
        Ok(())
    }

    /// Closes the step being filled; waits while too many are unacknowledged.
    fn close_step(&mut self) -> Result<(), SyncError> {
        if self.step.files.lock().is_empty() {
            return Ok(());
        }
        let step = std::mem::replace(&mut self.step, new_step());
        self.step_bytes = 0;
        self.closed_steps += 1;
        self.run.step_done(&step);
        self.retire(false)?;
        while self.closed_steps - self.retired_steps >= MAX_STEPS {
            // The readers must get every piece of the steps waited for.
            self.flush_ahead()?;
            self.retire(true)?;
        }
        Ok(())
    }

    /// Retires the steps the peer acknowledged (`wait`: at least one).
    fn retire(&mut self, wait: bool) -> Result<(), SyncError> {
        let mut block = wait;
        loop {
            let got = if block {
                loop {
                    if self.run.stopped() {
                        return Err(SyncError::PeerGone);
                    }
                    match self
                        .retired
                        .recv_timeout(std::time::Duration::from_millis(100))
                    {
                        Ok(r) => break Some(r),
                        Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                        Err(_) => return Err(SyncError::PeerGone),
                    }
                }
            } else {
                self.retired.try_recv().ok()
            };
            let Some((step, result)) = got else {
                return Ok(());
            };
            block = false;
            self.retired_steps += 1;
            self.run.syncer.retire_step(&step.files.lock(), result)?;
        }
    }
}

impl Syncer {
    /// Sends the data of every job; see the module documentation. Returns the data
    /// bytes sent.
    pub(super) fn pipeline(&self, work: Vec<Job>) -> Result<u64, SyncError> {
        let streams = self.streams.clamp(1, MAX_STREAMS);
        let (piece_tx, piece_rx) = crossbeam_channel::bounded::<Piece>(streams * 2);
        let (retired_tx, retired_rx) = crossbeam_channel::unbounded();
        let run = Run {
            syncer: self,
            sent: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            error: Mutex::new(None),
            queued_steps: AtomicUsize::new(0),
            retired: retired_tx,
        };
        let mut d = Dispatch {
            run: &run,
            pieces: Some(piece_tx),
            retired: retired_rx,
            ahead: VecDeque::new(),
            ahead_bytes: 0,
            step: new_step(),
            step_bytes: 0,
            closed_steps: 0,
            retired_steps: 0,
        };
        let dispatched = std::thread::scope(|scope| {
            for i in 0..streams {
                let rx = piece_rx.clone();
                let run = &run;
                let spawned = std::thread::Builder::new()
                    .name(format!("resync-{i}"))
                    .spawn_scoped(scope, move || run.reader(rx));
                if let Err(e) = spawned {
                    tracing::warn!("resync: cannot start reader thread {i}: {e}");
                    if i == 0 {
                        run.fail(SyncError::Local {
                            what: "a reader thread".into(),
                            errno: Errno::AGAIN,
                        });
                    }
                    break;
                }
            }
            drop(piece_rx);
            let r = self.dispatch(&mut d, work);
            if r.is_err() {
                // Nothing more is queued, no step closes.
                run.stop.store(true, Ordering::SeqCst);
            }
            // The readers end once every piece is taken.
            d.pieces = None;
            r
        });
        // A reader's error is the cause when the dispatcher only saw the stop.
        if let Some(e) = run.error.lock().take() {
            return Err(e);
        }
        dispatched?;
        // Every step's `SyncAll` is queued now: retire them all.
        while d.retired_steps < run.queued_steps.load(Ordering::SeqCst) {
            d.retire(true)?;
        }
        Ok(run.sent.load(Ordering::Relaxed))
    }

    fn dispatch(&self, d: &mut Dispatch<'_, '_>, work: Vec<Job>) -> Result<(), SyncError> {
        for job in work {
            if d.run.stopped() {
                return Err(SyncError::PeerGone);
            }
            let holes = match &job {
                Job::Copy(_) => Holes::Skip,
                Job::Ranges(..) | Job::Compare(_) => Holes::Punch,
            };
            match job {
                Job::Ranges(b, ranges) => {
                    let file = open(b)?;
                    if ranges.is_empty() {
                        d.segment(&file, &[], holes, true)?;
                    }
                    // Cut at step boundaries: a step is cleared as a whole. A step
                    // is RESUME_STEP bytes of data; a hole (one punch on the peer)
                    // weighs HOLE_WEIGHT whatever its length, so a terabyte marked
                    // but never written is a few steps, not one per 64 MiB.
                    let mut group = Vec::new();
                    for (mut start, end) in ranges {
                        while start < end {
                            let data_at =
                                match rustix::fs::seek(file.fd.as_fd(), SeekFrom::Data(start)) {
                                    Ok(p) => p.min(end),
                                    Err(Errno::NXIO) => end,
                                    Err(e) => return Err(local("a file")(e)),
                                };
                            let cut = if data_at > start {
                                d.step_bytes += HOLE_WEIGHT;
                                data_at
                            } else {
                                let hole_at =
                                    rustix::fs::seek(file.fd.as_fd(), SeekFrom::Hole(start))
                                        .map_err(local("a file"))?
                                        .min(end);
                                let room = RESUME_STEP.saturating_sub(d.step_bytes).max(1);
                                let cut = hole_at.min(start.saturating_add(room));
                                d.step_bytes += cut - start;
                                cut
                            };
                            group.push((start, cut));
                            start = cut;
                            if d.step_bytes >= RESUME_STEP {
                                d.segment(&file, &std::mem::take(&mut group), holes, true)?;
                                d.close_step()?;
                            }
                        }
                    }
                    if !group.is_empty() {
                        d.segment(&file, &group, holes, true)?;
                    }
                }
                Job::Copy(b) => {
                    let file = open(b)?;
                    let size = size_of(&file.bound.node);
                    d.segment(&file, &[(0, size)], holes, false)?;
                }
                Job::Compare(b) => {
                    let differing = self.compare_file(&b.node)?;
                    let extra: u64 = differing.iter().map(|(s, e)| e - s).sum();
                    self.progress
                        .total_bytes
                        .fetch_add(extra, Ordering::Relaxed);
                    let file = open(b)?;
                    d.segment(&file, &differing, holes, false)?;
                }
            }
            d.retire(false)?;
        }
        d.close_step()?;
        d.flush_ahead()
    }

    /// The peer acknowledged a step's `SyncAll`: once our copy is on disk too, its
    /// marks are cleared.
    fn retire_step(&self, files: &[Regions], result: Result<(), Errno>) -> Result<(), SyncError> {
        if result.is_err() || self.failed.load(Ordering::SeqCst) {
            return Err(SyncError::PeerGone);
        }
        // Our copy of the step must be on disk too before its marks go: after a
        // power cut it would differ from the peer's where nothing says so.
        let root = self.inodes.get(ROOT).map_err(local("the root"))?;
        rustix::fs::syncfs(root.fd.as_fd()).map_err(local("sync of this copy"))?;
        for (ino, ranges) in files {
            match self.tracker.clear_synced(*ino, ranges) {
                Ok(true) => {}
                Ok(false) => return Err(SyncError::PeerGone),
                Err(e) => tracing::warn!("resync: cannot clear synced marks: {e}"),
            }
        }
        Ok(())
    }
}

/// Opens a job's file for reading.
fn open(bound: Bound) -> Result<Arc<File>, SyncError> {
    let fd = apply::reopen(bound.node.fd.as_fd(), OFlags::RDONLY).map_err(local("a file"))?;
    Ok(Arc::new(File { bound, fd }))
}
