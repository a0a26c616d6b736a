//! Taking the peer back (SIGUSR2: attach and resync) and verifying it (SIGHUP).
//!
//! A compare resync (the operator's repair of a copy changed behind vmha's back)
//! is an attach whose sync compares every block: `STATEDIR/compare-resync`
//! present at the attach. The writer goes alone first (SIGUSR1, after the
//! controller told the peer it is outdated), so the repair runs through the same
//! ordered stream and range locks as every resync while the VM writes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::status::Fenced;
use crate::key::ClusterKey;
use crate::link::{LinkError, PeerLink};
use crate::refusal::Refusal;
use crate::resync::{SyncProgress, Syncer};
use crate::statedir::StateDir;
use crate::status::{GenerationId, SyncPhase, VerifyPhase, VerifyStatus};
use crate::wire::WireError;

/// The receiver's reason when it refused us for claiming another generation.
fn stale_refusal(error: &LinkError) -> Option<String> {
    match error {
        LinkError::Protocol {
            source: WireError::Refused(reason),
            ..
        } if Refusal::parse(reason).is_stale_writer() => Some(reason.clone()),
        _ => None,
    }
}

/// Attaches the configured peer to a link that writes alone and copies everything to
/// it (SIGUSR2), reporting progress in `STATEDIR/sync.json`.
pub(crate) struct Joiner {
    pub(crate) link: PeerLink,
    pub(crate) syncer: Arc<Syncer>,
    pub(crate) progress: Arc<SyncProgress>,
    pub(crate) state: Arc<StateDir>,
    pub(crate) peer: Option<SocketAddr>,
    pub(crate) module: String,
    pub(crate) key: ClusterKey,
    pub(crate) generation: Option<GenerationId>,
    pub(crate) running: Arc<AtomicBool>,
    pub(crate) fenced: Fenced,
}

impl Joiner {
    /// Compares the peer's copy with ours (SIGHUP), changing nothing; the outcome
    /// goes to `STATEDIR/verify.json`.
    pub(crate) fn verify(&self) {
        if self.running.swap(true, Ordering::SeqCst) {
            tracing::warn!("SIGHUP: a sync or verify is already running");
            return;
        }
        let (syncer, progress, state, running) = (
            self.syncer.clone(),
            self.progress.clone(),
            self.state.clone(),
            self.running.clone(),
        );
        let write = move |phase: VerifyPhase,
                          differing: &[crate::resync::Difference],
                          error: Option<&str>| {
            state.write_status(&VerifyStatus {
                state: phase,
                done_bytes: progress.done_bytes.load(Ordering::Relaxed),
                total_bytes: progress.total_bytes.load(Ordering::Relaxed),
                read_bytes: progress.read_bytes.load(Ordering::Relaxed),
                differing: differing
                    .iter()
                    .map(|d| crate::status::Difference {
                        path: d.path.clone(),
                        offset: d.offset,
                        len: d.len,
                    })
                    .collect(),
                error: error.map(str::to_string),
            });
        };
        let spawned = std::thread::Builder::new()
            .name("verify".into())
            .spawn(move || {
                write(VerifyPhase::Running, &[], None);
                let outcome = syncer.verify();
                running.store(false, Ordering::SeqCst);
                match outcome {
                    Ok(differing) => {
                        if differing.is_empty() {
                            tracing::info!("verify: the peer's copy is identical");
                        } else {
                            tracing::error!(
                                regions = differing.len(),
                                "verify: the peer's copy differs"
                            );
                        }
                        write(VerifyPhase::Done, &differing, None);
                    }
                    Err(e) => {
                        tracing::error!("verify failed: {e}");
                        write(VerifyPhase::Failed, &[], Some(&e.to_string()));
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start the verify thread: {e}");
            self.running.store(false, Ordering::SeqCst);
        }
    }

    pub(crate) fn start(&self) {
        let Some(peer) = self.peer else {
            tracing::error!("SIGUSR2: no --peer to attach");
            return;
        };
        if self.running.swap(true, Ordering::SeqCst) {
            tracing::warn!("SIGUSR2: a sync is already running");
            return;
        }
        // A new sync never shows the previous one's counters.
        self.progress.done_bytes.store(0, Ordering::Relaxed);
        self.progress.total_bytes.store(0, Ordering::Relaxed);
        let module = self.module.clone();
        let (link, syncer, progress, state, key, running, fenced) = (
            self.link.clone(),
            self.syncer.clone(),
            self.progress.clone(),
            self.state.clone(),
            self.key.clone(),
            self.running.clone(),
            self.fenced.clone(),
        );
        *fenced.lock() = None;
        // The controller writes the current generation here when it changes.
        let generation = state.generation().or_else(|| self.generation.clone());
        let spawned = std::thread::Builder::new()
            .name("full-sync".into())
            .spawn(move || {
                let done = AtomicBool::new(false);
                // The final status is written once the progress writer has
                // stopped: it could otherwise overwrite it with "syncing".
                let outcome = std::thread::scope(|scope| {
                    scope.spawn(|| {
                        let mut written: Option<std::time::Instant> = None;
                        while !done.load(Ordering::SeqCst) {
                            if written.is_none_or(|at| at.elapsed() >= Duration::from_millis(500)) {
                                state.write_sync_status(SyncPhase::Syncing, &progress, None);
                                written = Some(std::time::Instant::now());
                            }
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    });
                    // Read before the attach: a request made later is served by
                    // the next one (the marker stays until a compare finished).
                    let compare = state.compare_requested();
                    if let Some(reason) = &compare {
                        tracing::warn!(reason = reason.trim(), "compare resync requested");
                    }
                    let outcome = match link.attach(peer, &key, &module, generation.map(String::from)) {
                        Ok(report) => syncer
                            .run_with(report, compare.is_some())
                            .map(|outcome| (outcome, compare.is_some()))
                            .map_err(|e| e.to_string()),
                        Err(e) => {
                            if let Some(reason) = stale_refusal(&e) {
                                tracing::error!(%peer, reason, "fenced: the peer refused our generation");
                                *fenced.lock() = Some(reason);
                            }
                            Err(e.to_string())
                        }
                    };
                    done.store(true, Ordering::SeqCst);
                    outcome
                });
                running.store(false, Ordering::SeqCst);
                match outcome {
                    Ok((outcome, compared)) => {
                        let (bytes, incremental) = (outcome.data_bytes, outcome.incremental);
                        if let Err(e) = state.clear_peer_outdated() {
                            tracing::error!("peer in sync, but the record says otherwise: {e}");
                        }
                        if compared {
                            if let Err(e) = state.clear_compare_request() {
                                tracing::error!("compare resync done, but its request stays: {e}");
                            }
                        }
                        tracing::info!(bytes, incremental, compared, %peer, "sync done: the peer is in sync");
                        state.write_sync_status(SyncPhase::InSync, &progress, None);
                    }
                    Err(e) => {
                        tracing::error!(%peer, "sync failed: {e}");
                        state.write_sync_status(SyncPhase::Alone, &progress, Some(&e));
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start the sync thread: {e}");
            self.running.store(false, Ordering::SeqCst);
        }
    }
}
