//! Joining the two halves of a replicated operation: the local outcome and the
//! peer's acknowledgement(s). The reply goes to the kernel only when both are in,
//! whichever comes last.
//!
//! This is the one place that judges outcomes that disagree ([`judge`], a pure
//! function, unit-tested for every combination). Which side is behind decides
//! what happens:
//! - the local disk failed (EIO, EROFS): **this node** is behind — it records
//!   itself as not up to date ([`super::disk::DiskHealth`]), never the peer;
//! - a byte range changed on one side only (a full disk, a file size one
//!   filesystem refuses): the copies are made equal again before the error goes
//!   to the writer ([`Repair`]); only if that fails is the failed side behind;
//! - applied here, refused by the peer: the peer is behind (the link records it
//!   outdated and decides whether writing goes on alone).

use std::sync::Arc;

use parking_lot::Mutex;

use super::disk::is_media_error;
use super::replicator::Replicator;
use crate::apply::Errno;
use crate::link::Completion;
use crate::op::NodeId;

/// What happened locally.
#[derive(Debug)]
pub enum Local<T> {
    Applied(Result<T, Errno>),
    /// Not attempted (the op could not be queued for the peer).
    NotApplied(Errno),
}

/// How the two copies are made equal when one side failed a change the other
/// made. Chosen by the kind of operation, before it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// Data of a range (write, copy, punch, zero range): punch the range on
    /// both sides and give the peer this side's file size. The writer got an
    /// error for that range, so its content is undefined to it; zeros on both
    /// sides are a state both copies can reach without allocating.
    Range { id: NodeId, offset: u64, len: u64 },
    /// Only the size or the allocation differs (truncate, fallocate that
    /// allocates): give the peer this side's size; contents are equal.
    Size { id: NodeId },
    /// Nothing to repair with (namespace, metadata, fsync).
    None,
}

/// What to do with the two outcomes of one operation.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict<T> {
    /// Both sides agree; reply with this.
    Agreed(Result<T, Errno>),
    /// The local disk failed: this node is behind; reply EIO.
    LocalDiskFailed(Errno),
    /// Failed here, applied on the peer, and nothing can make them equal: this
    /// node is behind (the failed side); reply with the local error.
    LocalBehind(Errno),
    /// Applied here, failed on the peer: the peer is behind.
    PeerBehind { value: T, errno: Errno },
    /// Both failed, differently, and the peer's disk failed: the peer is behind;
    /// reply with the local error.
    BothFailedPeerBehind(Errno),
    /// One side changed a range the other did not: make them equal, then reply
    /// with this error.
    MakeEqual(Errno),
}

/// Judges the local outcome against the peer's (`None` = applied there).
pub fn judge<T>(local: Local<T>, remote: Option<Errno>, repair: Repair) -> Verdict<T> {
    let repairable = repair != Repair::None;
    match (local, remote) {
        (Local::NotApplied(e), _) => Verdict::Agreed(Err(e)),
        (Local::Applied(Err(e)), _) if is_media_error(e) => Verdict::LocalDiskFailed(e),
        (Local::Applied(Ok(v)), None) => Verdict::Agreed(Ok(v)),
        (Local::Applied(Ok(_)), Some(r)) if repairable && !is_media_error(r) => {
            Verdict::MakeEqual(r)
        }
        (Local::Applied(Ok(value)), Some(errno)) => Verdict::PeerBehind { value, errno },
        (Local::Applied(Err(e)), None) if repairable => Verdict::MakeEqual(e),
        (Local::Applied(Err(e)), None) => Verdict::LocalBehind(e),
        (Local::Applied(Err(e)), Some(r)) if is_media_error(r) => Verdict::BothFailedPeerBehind(e),
        // Both failed: a partial change may differ between them.
        (Local::Applied(Err(e)), Some(_)) if repairable => Verdict::MakeEqual(e),
        (Local::Applied(Err(e)), Some(_)) => Verdict::Agreed(Err(e)),
    }
}

type Finish<T> = Box<dyn FnOnce(Result<T, Errno>) + Send>;

struct State<T> {
    local: Option<Local<T>>,
    remote_left: usize,
    remote_error: Option<Errno>,
    finish: Option<Finish<T>>,
}

/// One reply waiting for its local half and `remotes` peer acknowledgements.
pub struct Joint<T> {
    state: Arc<Mutex<State<T>>>,
    core: Arc<Replicator>,
    what: &'static str,
    repair: Repair,
}

impl<T> std::fmt::Debug for Joint<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Joint({})", self.what)
    }
}

impl<T: Send + 'static> Joint<T> {
    pub(crate) fn new(
        core: &Arc<Replicator>,
        what: &'static str,
        remotes: usize,
        repair: Repair,
        finish: Finish<T>,
    ) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                local: None,
                remote_left: remotes,
                remote_error: None,
                finish: Some(finish),
            })),
            core: core.clone(),
            what,
            repair,
        }
    }

    /// A completion for one of the peer's acknowledgements.
    pub fn remote(&self) -> Completion {
        let state = self.state.clone();
        let core = self.core.clone();
        let (what, repair) = (self.what, self.repair);
        Box::new(move |result| {
            let mut s = state.lock();
            s.remote_left = s.remote_left.saturating_sub(1);
            if let Err(e) = result {
                s.remote_error.get_or_insert(e);
            }
            Self::maybe_finish(s, &core, what, repair);
        })
    }

    /// Records the local outcome.
    pub fn local(self, local: Local<T>) {
        let mut s = self.state.lock();
        s.local = Some(local);
        Self::maybe_finish(s, &self.core, self.what, self.repair);
    }

    fn maybe_finish(
        mut s: parking_lot::MutexGuard<'_, State<T>>,
        core: &Arc<Replicator>,
        what: &'static str,
        repair: Repair,
    ) {
        let local_done = matches!(s.local, Some(Local::NotApplied(_)));
        if s.local.is_none() || (s.remote_left > 0 && !local_done) {
            return;
        }
        let (Some(local), Some(finish)) = (s.local.take(), s.finish.take()) else {
            return;
        };
        let remote_error = s.remote_error;
        drop(s);
        let verdict = judge(local, remote_error, repair);
        match core.settle(verdict, what) {
            Settled::Now(result) => finish(result),
            // Making the copies equal waits for the peer: never on the thread
            // that reads its acknowledgements.
            Settled::AfterRepair(errno) => {
                let core = core.clone();
                let spawned = std::thread::Builder::new()
                    .name("repair".into())
                    .spawn(move || finish(core.make_equal(repair, errno, what)));
                if let Err(e) = spawned {
                    tracing::error!("cannot start a repair thread: {e}");
                }
            }
        }
    }
}

/// How a verdict ends.
#[derive(Debug)]
pub(crate) enum Settled<T> {
    Now(Result<T, Errno>),
    AfterRepair(Errno),
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    const RANGE: Repair = Repair::Range {
        id: 7,
        offset: 0,
        len: 4096,
    };

    fn applied(r: Result<u32, Errno>) -> Local<u32> {
        Local::Applied(r)
    }

    #[test]
    fn both_applied_is_success() {
        assert_eq!(judge(applied(Ok(5)), None, RANGE), Verdict::Agreed(Ok(5)));
        assert_eq!(
            judge(applied(Ok(5)), None, Repair::None),
            Verdict::Agreed(Ok(5))
        );
    }

    #[test]
    fn not_applied_here_is_the_local_error_whatever_the_peer_did() {
        for remote in [None, Some(Errno::IO)] {
            assert_eq!(
                judge(Local::<u32>::NotApplied(Errno::IO), remote, RANGE),
                Verdict::Agreed(Err(Errno::IO))
            );
        }
    }

    #[test]
    fn a_local_media_error_is_this_nodes_failure_never_the_peers() {
        for e in [Errno::IO, Errno::ROFS] {
            for remote in [None, Some(Errno::IO), Some(Errno::NOSPC)] {
                for repair in [RANGE, Repair::Size { id: 1 }, Repair::None] {
                    assert_eq!(
                        judge(applied(Err(e)), remote, repair),
                        Verdict::LocalDiskFailed(e)
                    );
                }
            }
        }
    }

    #[test]
    fn a_one_sided_full_disk_makes_the_copies_equal() {
        // Full here, applied there.
        assert_eq!(
            judge(applied(Err(Errno::NOSPC)), None, RANGE),
            Verdict::MakeEqual(Errno::NOSPC)
        );
        // Applied here, full there.
        assert_eq!(
            judge(applied(Ok(1)), Some(Errno::DQUOT), Repair::Size { id: 1 }),
            Verdict::MakeEqual(Errno::DQUOT)
        );
        // Both full: partial writes may differ.
        assert_eq!(
            judge(applied(Err(Errno::NOSPC)), Some(Errno::NOSPC), RANGE),
            Verdict::MakeEqual(Errno::NOSPC)
        );
    }

    #[test]
    fn without_a_repair_the_failed_side_is_behind() {
        assert_eq!(
            judge(applied(Err(Errno::NOSPC)), None, Repair::None),
            Verdict::LocalBehind(Errno::NOSPC)
        );
        assert_eq!(
            judge(applied(Ok(3)), Some(Errno::NOSPC), Repair::None),
            Verdict::PeerBehind {
                value: 3,
                errno: Errno::NOSPC
            }
        );
    }

    #[test]
    fn the_peers_media_error_makes_the_peer_behind() {
        assert_eq!(
            judge(applied(Ok(3)), Some(Errno::IO), RANGE),
            Verdict::PeerBehind {
                value: 3,
                errno: Errno::IO
            }
        );
        assert_eq!(
            judge(applied(Err(Errno::NOSPC)), Some(Errno::IO), RANGE),
            Verdict::BothFailedPeerBehind(Errno::NOSPC)
        );
    }

    #[test]
    fn the_same_refusal_on_both_sides_without_repair_is_just_the_error() {
        assert_eq!(
            judge(applied(Err(Errno::INVAL)), Some(Errno::INVAL), Repair::None),
            Verdict::Agreed(Err(Errno::INVAL))
        );
    }
}
