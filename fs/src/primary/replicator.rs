//! Submitting one mutation on the primary: order it, record it, send it, apply it
//! locally, join both outcomes, settle a disagreement. Every mutation the FUSE
//! layer serves goes through one of three doors, chosen by when the local effect
//! can be known:
//! - [`Replicator::send_then_apply`] (writes, fsync): queued for the peer first,
//!   applied here while it travels; the reply waits for both (a [`Joint`]).
//! - [`Replicator::apply_then_send`] (namespace and metadata): applied here first
//!   (an EEXIST or ENOTEMPTY then never reaches the peer), queued while the lock
//!   that orders it is still held, then the peer's outcome is awaited.
//! - [`Replicator::send_applied`] (copy_file_range): the local effect decides
//!   what is sent (the byte count copied).
//!
//! Whatever the door, the two outcomes are judged by [`super::joint::judge`] and
//! settled here ([`Replicator::settle`]): the one place that decides what a
//! disagreement means.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Instant;

use rustix::fs::FallocateFlags;

use super::disk::{is_media_error, DiskHealth};
use super::joint::{judge, Joint, Local, Repair, Settled, Verdict};
use super::metrics::Trace;
use crate::apply::{self, Applied, Errno, NodeTable};
use crate::inodes::Inodes;
use crate::link::{Completion, LinkState, PeerLink, Protocol};
use crate::op::{Name, NodeId, Op};
use crate::syncset::SyncSet;
use crate::track::{Change, InFlight, Tracker};

type Finish<T> = Box<dyn FnOnce(Result<T, Errno>) + Send>;

/// Which side a repair failed on.
#[derive(Debug)]
enum Side {
    Local(Errno),
    Peer(Errno),
}

/// Bytes of data `op` carries to the peer (a write's payload; 0 for the others).
fn op_bytes(op: &Op) -> u64 {
    match op {
        Op::Write { data, .. } => data.len() as u64,
        _ => 0,
    }
}

/// Extents a sequential writer is given ahead in the activity log (see
/// [`with_lookahead`]).
const LOOKAHEAD_EXTENTS: u64 = 4;

/// A sequential write (it starts where the previous write through its handle
/// ended) reaching into the last quarter of an extent that ends a group of
/// [`LOOKAHEAD_EXTENTS`] also puts the next group, as far as the file's `size`
/// goes, in the activity log, in the same durable update. A sequential stream
/// overwriting a file then pays one activity-log update (a flush) per group
/// instead of one per extent (measured: 1 MiB sequential writes spent 121 µs
/// each on average recording, one flush every 4 writes). Random writes never
/// look ahead (tried: over a working set the size of the log, the extra
/// extents made it churn, 4 → 434 µs per write), nor do appends (nothing
/// ahead). Only for the activity log: an extent recorded that was not written
/// costs a resync of it after a failure, never a lost change.
fn with_lookahead(mut changes: Vec<Change>, size: u64) -> Vec<Change> {
    use crate::track::EXTENT;
    let group = EXTENT * LOOKAHEAD_EXTENTS;
    let ahead = changes.iter().find_map(|c| match c {
        Change::Range { ino, start, end } if end > start => {
            let last = end - 1;
            let in_last_quarter = last % EXTENT >= EXTENT / 4 * 3;
            let ends_group = last % group >= group - EXTENT;
            let next = (last / group + 1).checked_mul(group)?;
            (in_last_quarter && ends_group && next < size).then_some(Change::Range {
                ino: *ino,
                start: next,
                end: next.checked_add(group)?.min(size),
            })
        }
        _ => None,
    });
    changes.extend(ahead);
    changes
}

/// The primary's submission pipeline (see the module doc).
#[derive(Debug)]
pub struct Replicator {
    pub(crate) inodes: Arc<Inodes>,
    pub(crate) link: PeerLink,
    pub(crate) tracker: Arc<Tracker>,
    pub(crate) disk: Arc<DiskHealth>,
    /// Counters for `metrics.json`.
    pub(crate) metrics: Arc<super::metrics::PrimaryMetrics>,
    /// The backing directory's path, to name journal entries relative to it.
    root_path: Vec<u8>,
    /// The largest file the backing filesystem accepts: a change reaching past it
    /// fails with EFBIG before anything is recorded.
    max_size: u64,
    /// The nodes changed here since the last checkpoint (what it syncs).
    pub(crate) changed: Arc<SyncSet>,
}

impl Replicator {
    pub fn new(
        inodes: Arc<Inodes>,
        link: PeerLink,
        tracker: Arc<Tracker>,
        disk: Arc<DiskHealth>,
        root_path: Vec<u8>,
        max_size: u64,
        metrics: Arc<super::metrics::PrimaryMetrics>,
    ) -> Arc<Self> {
        link.track(tracker.clone());
        Arc::new(Self {
            inodes,
            link,
            tracker,
            disk,
            metrics,
            root_path,
            max_size,
            changed: Arc::new(SyncSet::new()),
        })
    }

    /// Queues `ops` for the peer while `order` (the lock that orders them) is
    /// held, runs `local` meanwhile, and calls `finish` once both are in. The
    /// first op says what is recorded (activity log or dirty records).
    ///
    /// What "in" means for the peer depends on the link's [`Protocol`]: with C a
    /// write waits until the peer applied it; with B until the peer received it;
    /// with flush only until it is queued. Under B and flush the activity-log
    /// record stays until the peer applied the write (a peer lost meanwhile
    /// moves it to the dirty records), a peer's refusal of a write already
    /// answered makes the peer outdated, and an fsync waits for every earlier
    /// operation's acknowledgement (a barrier).
    ///
    /// `sequential`: the write continues where the previous one through the same
    /// handle ended (see [`with_lookahead`]).
    ///
    /// `started` is when the FUSE request arrived: the operation's stages are
    /// added to the metrics' stage sums of `what` (writes and fsyncs) when it
    /// replicates.
    #[allow(clippy::too_many_arguments)]
    pub fn send_then_apply<T: Send + 'static, G>(
        self: &Arc<Self>,
        what: &'static str,
        ops: Vec<Op>,
        repair: Repair,
        order: G,
        started: Instant,
        sequential: bool,
        local: impl FnOnce() -> Result<T, Errno>,
        finish: Finish<T>,
    ) {
        if let Err(e) = self.disk.check() {
            drop(order);
            return finish(Err(e));
        }
        let replicates = self.link.state().replicates();
        let trace = match what {
            "write" | "fsync" if replicates => Some(Arc::new(Trace::new(started))),
            _ => None,
        };
        let recorded = ops.first().map(|op| self.record_with(op, sequential));
        let mut inflight = match recorded.transpose() {
            Ok(inflight) => inflight,
            Err(e) => {
                drop(order);
                return finish(Err(e));
            }
        };
        if let Some(t) = &trace {
            t.recorded();
        }
        let protocol = self.link.protocol();
        // Under B and flush a write's record outlives the reply: it goes with
        // the peer's acknowledgement of the write.
        let early_write = protocol != Protocol::C && matches!(ops.first(), Some(Op::Write { .. }));
        let write_record = if early_write { inflight.take() } else { None };
        let replied = trace.clone().map(|t| (t, self.metrics.clone()));
        let joint = Joint::new(
            self,
            what,
            ops.len(),
            repair,
            Box::new(move |r| {
                // Covered by the record until the reply is out.
                drop(inflight);
                finish(r);
                if let Some((t, metrics)) = replied {
                    let sums = if what == "write" {
                        &metrics.write_stages
                    } else {
                        &metrics.fsync_stages
                    };
                    t.replied(sums);
                }
            }),
        );
        let mut write_record = write_record;
        // The peer's outcome, timed.
        let remote = || -> Completion {
            let remote = joint.remote();
            match &trace {
                Some(t) => {
                    let t = t.clone();
                    let metrics = self.metrics.clone();
                    Box::new(move |result| {
                        t.acked(crate::link::acked_busy_ns());
                        if crate::link::answered_by_synced() {
                            metrics
                                .fsyncs_peer_early
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        remote(result)
                    })
                }
                None => remote,
            }
        };
        for op in ops {
            let sent = replicates.then(|| op_bytes(&op));
            let queued = match (&op, protocol) {
                (Op::Write { .. }, Protocol::B | Protocol::Flush) => {
                    let record = write_record.take();
                    let link = self.link.clone();
                    let applied: Completion = Box::new(move |result| {
                        if let Err(errno) = result {
                            // Already answered: the copies differ, the peer is behind.
                            link.diverged(&format!(
                                "{what} acknowledged before the peer applied it failed there: {errno}"
                            ));
                        }
                        drop(record);
                    });
                    if protocol == Protocol::B {
                        self.link.submit_received(op, remote(), applied)
                    } else {
                        let queued = self.link.submit(op, applied);
                        if queued.is_ok() {
                            (remote())(Ok(()));
                        }
                        queued
                    }
                }
                (Op::Fsync { .. }, Protocol::B | Protocol::Flush) => {
                    let link = self.link.clone();
                    let remote = remote();
                    self.link.submit_barrier(
                        op,
                        Box::new(move |result| {
                            // An earlier write refused by the peer stopped the link:
                            // this sync does not cover it.
                            let result = match result {
                                Ok(()) if matches!(link.state(), LinkState::Failed(_)) => {
                                    Err(Errno::IO)
                                }
                                other => other,
                            };
                            remote(result)
                        }),
                    )
                }
                _ => self.link.submit(op, remote()),
            };
            if let Err(e) = queued {
                drop(order);
                return joint.local(Local::NotApplied(e));
            }
            if let Some(bytes) = sent {
                self.metrics.replicated(bytes);
            }
        }
        if let Some(t) = &trace {
            t.sent();
        }
        let result = local();
        if let Some(t) = &trace {
            t.local_done();
        }
        drop(order);
        joint.local(Local::Applied(result));
    }

    /// Applies `op` here, queues it for the peer while `order` is still held,
    /// then waits for the peer.
    pub fn apply_then_send<G>(
        &self,
        what: &'static str,
        op: Op,
        repair: Repair,
        order: G,
    ) -> Result<Applied, Errno> {
        self.disk.check()?;
        self.link.wait_usable()?;
        let _inflight = self.record(&op)?;
        let applied = apply::apply(self.inodes.as_ref(), &op);
        if let Some(id) = crate::syncset::created_node(&op) {
            self.note_changed(id);
        }
        let applied = match applied {
            Ok(applied) => applied,
            // Not sent: the peer never sees a change that failed here.
            Err(e) if is_media_error(e) => {
                self.disk.fail(what, e);
                return Err(Errno::IO);
            }
            Err(e) => return Err(e),
        };
        self.send_and_settle(what, op, repair, order, applied)
    }

    /// Replicates an op that was already applied here (its local effect decided
    /// what it says, like the byte count of a copy).
    pub fn send_applied<G>(
        &self,
        what: &'static str,
        op: Op,
        repair: Repair,
        order: G,
    ) -> Result<(), Errno> {
        self.send_and_settle(what, op, repair, order, ())
    }

    /// Queues `op` (applied here with outcome `applied`) while `order` is held,
    /// releases it, waits for the peer and settles the two outcomes.
    fn send_and_settle<T, G>(
        &self,
        what: &'static str,
        op: Op,
        repair: Repair,
        order: G,
        applied: T,
    ) -> Result<T, Errno> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let sent = self.link.state().replicates().then(|| op_bytes(&op));
        let queued = self.link.submit(
            op,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        // Before any repair, which takes the whole file's lock.
        drop(order);
        if queued.is_err() {
            let _ = self
                .link
                .diverged(&format!("{what} applied locally, could not be replicated"));
            return Err(Errno::IO);
        }
        if let Some(bytes) = sent {
            self.metrics.replicated(bytes);
        }
        let remote = rx.recv().unwrap_or(Err(Errno::IO)).err();
        self.settle_blocking(
            judge(Local::Applied(Ok(applied)), remote, repair),
            what,
            repair,
        )
    }

    /// Whether the peer's early syncs cover every change to `id`'s data sent
    /// to it: an fdatasync of `id` need not ask it (protocol C only).
    pub fn peer_synced(&self, id: NodeId) -> bool {
        self.link.protocol() == Protocol::C && self.link.peer_synced(id)
    }

    /// Queues a bookkeeping op (no data) if the link sends to the peer; never waits.
    pub fn bookkeeping(&self, op: Op) {
        self.link.submit_nowait(op);
    }

    /// Guards a local change that is not replicated by itself but must not happen
    /// on a failed disk or while the peer is lost (the replicated op follows).
    pub fn ready_for_change(&self) -> Result<(), Errno> {
        self.disk.check()?;
        self.link.wait_usable()
    }

    /// Passes a local result through, recording a media error as a disk failure.
    pub fn watch<T>(&self, what: &str, result: Result<T, Errno>) -> Result<T, Errno> {
        self.disk.watch(what, result)
    }

    fn settle_blocking<T>(
        &self,
        verdict: Verdict<T>,
        what: &'static str,
        repair: Repair,
    ) -> Result<T, Errno> {
        match self.settle(verdict, what) {
            Settled::Now(r) => r,
            Settled::AfterRepair(e) => self.make_equal(repair, e, what),
        }
    }

    /// What a verdict does: the one place a disagreement is acted on.
    pub(crate) fn settle<T>(&self, verdict: Verdict<T>, what: &'static str) -> Settled<T> {
        match verdict {
            Verdict::Agreed(r) => Settled::Now(r),
            Verdict::LocalDiskFailed(e) => {
                self.disk.fail(what, e);
                Settled::Now(Err(Errno::IO))
            }
            Verdict::LocalBehind(e) => {
                self.disk.fail(
                    &format!("{what} failed here but was applied on the peer"),
                    e,
                );
                Settled::Now(Err(e))
            }
            Verdict::PeerBehind { value, errno } => {
                let why = format!("{what} applied locally but failed on the peer: {errno}");
                if self.link.diverged(&why) {
                    // The peer is recorded as outdated: the local result stands.
                    Settled::Now(Ok(value))
                } else {
                    Settled::Now(Err(Errno::IO))
                }
            }
            Verdict::BothFailedPeerBehind(e) => {
                let _ = self.link.diverged(&format!(
                    "{what} failed on both nodes, the peer's disk failed"
                ));
                Settled::Now(Err(e))
            }
            Verdict::MakeEqual(e) => Settled::AfterRepair(e),
        }
    }

    /// Makes the copies equal after a change one side made alone, then answers
    /// with the error the writer gets. Blocks on the peer: never call it on the
    /// thread that reads acknowledgements.
    pub(crate) fn make_equal<T>(
        &self,
        repair: Repair,
        errno: Errno,
        what: &str,
    ) -> Result<T, Errno> {
        match self.equalize(repair) {
            Ok(()) => {
                tracing::warn!(
                    what,
                    %errno,
                    "one node refused a change the other made; the copies were made equal again"
                );
                Err(errno)
            }
            Err(Side::Local(e)) => {
                self.disk.fail(
                    &format!("{what}: cannot make this copy equal to the peer's after {errno}"),
                    e,
                );
                Err(Errno::IO)
            }
            Err(Side::Peer(e)) => {
                let why = format!("{what}: the peer cannot be made equal after {errno}: {e}");
                if self.link.diverged(&why) {
                    Err(errno)
                } else {
                    Err(Errno::IO)
                }
            }
        }
    }

    /// Under the whole file's range lock (every earlier change of it has been
    /// applied here and queued for the peer, no later one starts): punch the range
    /// on both sides when its data differs, then give the peer this side's size.
    fn equalize(&self, repair: Repair) -> Result<(), Side> {
        let (id, range) = match repair {
            Repair::Range { id, offset, len } => (id, Some((offset, len))),
            Repair::Size { id } => (id, None),
            Repair::None => return Ok(()),
        };
        let node = self.inodes.get(id).map_err(Side::Local)?;
        let _whole_file = node.ranges.lock(0, u64::MAX);
        let fd = self.inodes.data_fd(id).map_err(Side::Local)?;
        let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        if let Some((offset, len)) = range {
            if len > 0 {
                rustix::fs::fallocate(fd.as_fd(), punch, offset, len).map_err(Side::Local)?;
            }
        }
        let size = rustix::fs::fstat(fd.as_fd()).map_err(Side::Local)?.st_size as u64;
        if let Some((offset, len)) = range {
            if len > 0 {
                self.link
                    .submit_wait(Op::Fallocate {
                        id,
                        mode: punch.bits(),
                        offset,
                        len,
                    })
                    .map_err(Side::Peer)?;
            }
        }
        self.link
            .submit_wait(Op::Truncate { id, size })
            .map_err(Side::Peer)
    }

    /// Records what `op` is about to change where the peer may not get it (design,
    /// "Degraded mode"): in the dirty records while writing alone, in the activity
    /// log while the peer receives. Durable before this returns; call it before the
    /// local change.
    pub fn record(&self, op: &Op) -> Result<InFlight, Errno> {
        self.record_with(op, false)
    }

    /// [`Self::record`]; `sequential`: a sequential writer's write, whose next
    /// extents go into the activity log with it ([`with_lookahead`]).
    fn record_with(&self, op: &Op, sequential: bool) -> Result<InFlight, Errno> {
        let changes = self.changes_of(op)?;
        for id in crate::syncset::changed_nodes(op) {
            self.note_changed(id);
        }
        if changes.is_empty() {
            return Ok(InFlight::none());
        }
        if self.link.state().writes_alone() {
            self.tracker.record_degraded(&changes)?;
            return Ok(InFlight::none());
        }
        let inflight = match op {
            Op::Write { id, .. } if sequential => {
                let size = self
                    .inodes
                    .get(*id)
                    .and_then(|node| Ok(rustix::fs::fstat(node.fd.as_fd())?.st_size as u64))
                    .unwrap_or(0);
                self.tracker
                    .record_active(&with_lookahead(changes.clone(), size))?
            }
            _ => self.tracker.record_active(&changes)?,
        };
        // The link may have stopped sending meanwhile, after the activity log moved
        // to the dirty records: then this change belongs there too.
        if self.link.state().writes_alone() {
            self.tracker.record_degraded(&changes)?;
        }
        Ok(inflight)
    }

    /// Node `id` is changed here: the next checkpoint syncs it.
    fn note_changed(&self, id: NodeId) {
        match self.inodes.get(id) {
            Ok(node) => self.changed.add(&node.fd),
            // Not known (the change then fails): sync everything, never less.
            Err(_) => self.changed.add_whole(),
        }
    }

    fn changes_of(&self, op: &Op) -> Result<Vec<Change>, Errno> {
        let range = |id: NodeId, start: u64, len: u64| -> Result<Vec<Change>, Errno> {
            let end = start.checked_add(len).ok_or(Errno::FBIG)?;
            if end > self.max_size {
                return Err(Errno::FBIG);
            }
            let ino = self.inodes.get(id)?.ino();
            Ok(vec![Change::Range { ino, start, end }])
        };
        let name = |parent: NodeId, name: &Name| -> Result<Change, Errno> {
            let dir = self.inodes.get(parent)?;
            let path = crate::fdio::fd_path(dir.fd.as_fd()).unwrap_or_default();
            let root = self.root_path.as_slice();
            let full = if path == root {
                name.as_bytes().to_vec()
            } else {
                match path.strip_prefix(root).and_then(|r| r.strip_prefix(b"/")) {
                    Some(prefix) => crate::track::join(prefix, name.as_bytes()),
                    // Outside the root (a removed directory): everything is suspect.
                    None => Vec::new(),
                }
            };
            Ok(Change::Name(full))
        };
        Ok(match op {
            Op::Write { id, offset, data } => range(*id, *offset, data.len() as u64)?,
            Op::Fallocate {
                id, offset, len, ..
            } => range(*id, *offset, *len)?,
            Op::CopyRange {
                dst,
                dst_offset,
                len,
                ..
            } => range(*dst, *dst_offset, *len)?,
            Op::Truncate { id, size } => {
                let node = self.inodes.get(*id)?;
                let old = rustix::fs::fstat(node.fd.as_fd())?.st_size as u64;
                let (lo, hi) = (old.min(*size), old.max(*size));
                range(*id, lo, hi - lo)?
            }
            Op::Create {
                parent, name: n, ..
            }
            | Op::Mkdir {
                parent, name: n, ..
            }
            | Op::Symlink {
                parent, name: n, ..
            }
            | Op::Link {
                parent, name: n, ..
            }
            | Op::Unlink { parent, name: n }
            | Op::Rmdir { parent, name: n } => vec![name(*parent, n)?],
            Op::Rename {
                parent,
                name: n,
                new_parent,
                new_name,
                ..
            } => vec![name(*parent, n)?, name(*new_parent, new_name)?],
            _ => Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::track::EXTENT;

    fn range(start: u64, end: u64) -> Change {
        Change::Range { ino: 9, start, end }
    }

    #[test]
    fn a_sequential_writer_gets_the_next_group_of_extents_at_the_end_of_a_group() {
        let group = EXTENT * LOOKAHEAD_EXTENTS;
        let size = 10 * group;
        // Inside a group, or early in its last extent: nothing added.
        assert_eq!(with_lookahead(vec![range(0, 1 << 20)], size).len(), 1);
        assert_eq!(
            with_lookahead(
                vec![range(group - EXTENT, group - EXTENT + (1 << 20))],
                size
            )
            .len(),
            1
        );
        // The last MiB of the group: the next group comes along.
        let got = with_lookahead(vec![range(group - (1 << 20), group)], size);
        assert_eq!(got.len(), 2);
        assert!(
            matches!(got[1], Change::Range { ino: 9, start, end } if start == group && end == 2 * group)
        );
        // Never past the end of the file.
        let got = with_lookahead(vec![range(group - (1 << 20), group)], group + 5);
        assert!(matches!(got[1], Change::Range { end, .. } if end == group + 5));
        assert_eq!(
            with_lookahead(vec![range(group - (1 << 20), group)], group).len(),
            1
        );
        // Names are left alone.
        assert_eq!(
            with_lookahead(vec![Change::Name(b"a".to_vec())], size).len(),
            1
        );
    }
}
