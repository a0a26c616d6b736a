//! The checkers: what the module task polls from the drivers every
//! [`super::runner::check_period`] and when the VM driver reports a change
//! (VM state, vmha-fs health, resync progress, the
//! writer's copy to its SECOND) and the facts it reads from the peer's latest
//! heartbeat, turned into events for the state machine. Apart from the loop
//! and from action execution because they are the daemon's sensors: they
//! observe and report, the state machine decides.

use std::time::Instant;

use super::check_pass::{gather, CheckPlan, Findings};
use super::runner::{Runner, ATTACH_RETRY, GO_ALONE_SETTLE};
use super::PeerView;
use crate::driver::{FsHealth, ResyncState};
use crate::generation::compare;
use crate::state::{Event, Readiness, Role};
use crate::status::ResyncStatus;

/// The writer's copy to its peer as a heartbeat's `resync` field. Done is
/// `done_bytes == total_bytes`; a running copy always shows
/// `done_bytes < total_bytes` so the receiver never mistakes it for done.
pub(super) fn writer_resync_status(state: ResyncState, rate: u64) -> Option<ResyncStatus> {
    match state {
        ResyncState::Idle => None,
        ResyncState::Done => Some(ResyncStatus {
            done_bytes: 0,
            total_bytes: 0,
            rate_bytes_per_s: 0,
            eta_s: Some(0),
        }),
        ResyncState::Running(p) => {
            let total = p.total_bytes.max(p.done_bytes.saturating_add(1));
            Some(ResyncStatus {
                done_bytes: p.done_bytes,
                total_bytes: total,
                rate_bytes_per_s: rate,
                eta_s: (rate > 0).then(|| total.saturating_sub(p.done_bytes) / rate),
            })
        }
    }
}

/// What a SECOND learns from its writer's heartbeat `resync` field.
pub(super) fn resync_from_writer(status: &ResyncStatus) -> ResyncState {
    if status.done_bytes >= status.total_bytes {
        ResyncState::Done
    } else {
        ResyncState::Running(crate::state::Progress {
            done_bytes: status.done_bytes,
            total_bytes: status.total_bytes,
        })
    }
}

impl Runner {
    /// vmha-fs reports the replication link down (lost, stalled or failed):
    /// the state machine decides ([`Event::LinkDown`]) from first-hand facts
    /// about the peer gathered here.
    pub(super) async fn on_link_down(&mut self) {
        if self
            .went_alone
            .is_some_and(|at| at.elapsed() < GO_ALONE_SETTLE)
        {
            // vmha-fs has not published the state SIGUSR1 put it in yet.
            return;
        }
        // After a stall of this daemon (a frozen node), heartbeats queued
        // meanwhile still describe the past, and the peer may have taken
        // over since.
        let event = Event::LinkDown {
            heartbeats_fresh: self.judging_long_enough() && self.heartbeats_arriving(),
            peer_is_second: self.peer_is_our_second(),
            peer_knows_outdated: self.peer_knows_outdated(),
        };
        self.handle(event).await;
    }

    /// The dispatcher has been observing the peer without a stall of its own
    /// for the failover timeout.
    pub(super) fn judging_long_enough(&self) -> bool {
        let since = *self.judging_since.lock().unwrap_or_else(|p| p.into_inner());
        since.elapsed() >= self.failover_timeout
    }

    /// The peer's heartbeats still arrive (design: the replication link fails
    /// *while heartbeats still arrive*). When they stopped a few intervals ago
    /// the whole peer may be going away (a partition): `PeerLost` decides, maybe
    /// through the witness. A new generation here would fork the history even
    /// if this node then steps down without writing, and the heal would be
    /// taken for a split brain.
    pub(super) fn heartbeats_arriving(&self) -> bool {
        let fresh = (self.heartbeat_interval * 3).min(self.failover_timeout / 2);
        self.peer_heard
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|at| at.elapsed() <= fresh)
    }

    /// The peer's latest heartbeat shows a SECOND with our data or an older
    /// state of it.
    pub(super) fn peer_is_our_second(&self) -> bool {
        let second = matches!(
            &*self.peer_rx.borrow(),
            PeerView::Seen { beat, .. } if beat.announce.role == Role::Second
        );
        second && self.peer_follows_us()
    }

    /// The peer's latest heartbeat shows it is behind us and not ready: it
    /// knows it is outdated.
    pub(super) fn peer_knows_outdated(&self) -> bool {
        matches!(
            &*self.peer_rx.borrow(),
            PeerView::Seen { beat, .. }
                if compare(&self.meta.history, &beat.history)
                    == crate::generation::Relation::LocalNewer
                    && beat.announce.readiness != Readiness::Ready
        )
    }

    /// The peer's latest heartbeat shows our data or an older state of it: a
    /// receiver refusing our generation then merely accepts an older one of
    /// ours (it is being restarted for the current one), we are not stale.
    pub(super) fn peer_follows_us(&self) -> bool {
        matches!(
            &*self.peer_rx.borrow(),
            PeerView::Seen { beat, .. }
                if matches!(
                    compare(&self.meta.history, &beat.history),
                    crate::generation::Relation::LocalNewer | crate::generation::Relation::InSync
                )
        )
    }

    /// A SECOND's resync as its writer's heartbeat reports it.
    pub(super) fn resync_from_peer(&self) -> ResyncState {
        match &*self.peer_rx.borrow() {
            PeerView::Seen { beat, .. } if beat.announce.role.is_writer() => beat
                .resync
                .as_ref()
                .map_or(ResyncState::Idle, resync_from_writer),
            _ => ResyncState::Idle,
        }
    }

    /// Writer: follows the copy to the SECOND that `AttachPeer` attached
    /// (progress for the heartbeats); a copy that failed, or an attach that
    /// left no trace, is `AttachFailed` (the state machine retries).
    pub(super) async fn follow_attach(&mut self) {
        let Some(since) = self.attached_at else {
            return;
        };
        let state = self.blocking(|_, fs, m| fs.writer_sync_state(m)).await;
        let mut failed = None;
        let sync = match state {
            Some(Ok(ResyncState::Running(p))) => {
                self.resync_rate.sample(p.done_bytes);
                writer_resync_status(ResyncState::Running(p), self.resync_rate.rate)
            }
            Some(Ok(ResyncState::Done)) => writer_resync_status(ResyncState::Done, 0),
            Some(Ok(ResyncState::Idle)) => {
                if since.elapsed() >= ATTACH_RETRY * 2 {
                    failed = Some("the attach left no trace in vmha-fs".to_string());
                }
                None
            }
            None => None,
            Some(Err(e)) => {
                if since.elapsed() >= ATTACH_RETRY {
                    failed = Some(format!("sync to the SECOND failed: {e}"));
                }
                None
            }
        };
        if sync != self.writer_sync {
            self.writer_sync = sync;
            self.publish();
        }
        if let Some(why) = failed {
            // Logged when a series of failures starts; the state machine
            // retries after the back-off pause.
            if self.attach_backoff.fail(Instant::now()) {
                let mut lines = Vec::new();
                self.record(format!("{why}; retrying with back-off"), &mut lines)
                    .await;
            } else {
                tracing::debug!(module = %self.module.name, "{why}");
            }
            self.handle(Event::AttachFailed).await;
        }
    }

    /// SECOND: the writer generation the receiver is to accept: the
    /// writer's current one when the writer's data descends from ours (never
    /// a stale or diverged writer's: that is the fencing).
    pub(super) fn writer_to_follow(&self) -> Option<String> {
        let follows = match &*self.peer_rx.borrow() {
            PeerView::Seen { beat, .. } if beat.announce.role.is_writer() => matches!(
                compare(&self.meta.history, &beat.history),
                crate::generation::Relation::PeerNewer | crate::generation::Relation::InSync
            ),
            _ => false,
        };
        if follows {
            self.peer_generation()
        } else {
            None
        }
    }

    /// SECOND: the receiver accepts the writer's current generation when the
    /// writer's data descends from ours.
    pub(super) async fn follow_writer(&mut self) {
        let Some(generation) = self.writer_to_follow() else {
            return;
        };
        let shown = Some(generation.clone());
        let busy = self.check_slot.task_busy().await;
        let result = self
            .blocking(move |_, fs, m| fs.follow_writer(m, Some(&generation)))
            .await;
        drop(busy);
        if let Some(result) = result {
            self.on_followed(result, shown).await;
        }
    }

    /// What telling the receiver to follow the writer did.
    async fn on_followed(
        &mut self,
        result: Result<bool, crate::driver::DriverError>,
        shown: Option<String>,
    ) {
        let mut lines = Vec::new();
        match result {
            Ok(true) => {
                self.record(
                    format!(
                        "receiver restarted for the writer's generation {}",
                        shown.unwrap_or_default()
                    ),
                    &mut lines,
                )
                .await
            }
            Ok(false) => {}
            Err(e) => {
                self.record(format!("error: restart the receiver: {e}"), &mut lines)
                    .await;
                self.handle(Event::FsFailed).await;
            }
        }
    }

    /// Logs what [`VmDriver::refresh_xml`] did: a rewrite in the event log, a
    /// failure once until it succeeds again.
    pub(super) async fn on_xml_refresh(
        &mut self,
        result: Option<Result<bool, crate::driver::DriverError>>,
    ) {
        match result {
            Some(Ok(rewritten)) => {
                if self.xml_refresh_failed {
                    self.xml_refresh_failed = false;
                    tracing::info!(module = %self.module.name, "domain XML refresh works again");
                }
                if rewritten {
                    let mut lines = Vec::new();
                    self.record(
                        "domain XML rewritten from libvirt's definition".into(),
                        &mut lines,
                    )
                    .await;
                }
            }
            Some(Err(e)) if !self.xml_refresh_failed => {
                self.xml_refresh_failed = true;
                tracing::warn!(module = %self.module.name, error = %e, "domain XML refresh failed");
            }
            Some(Err(_)) | None => {}
        }
    }

    /// What this module's checks look at now.
    pub(super) fn check_plan(&self) -> CheckPlan {
        let role = self.state.role;
        // While a migration runs (or ends after its abort) the VM's state is
        // its outcome's to tell, and libvirt may hold calls on the domain
        // behind the migration job: the link's health must not wait for it.
        let check_vm = role.is_writer() && !self.state.vm_starting && self.migration.is_none();
        let check_resync = role == Role::Second && !self.state.uptodate;
        CheckPlan {
            check_vm,
            check_fs: role.is_writer() || role == Role::Second,
            check_resync,
            every: self.state.peer_controller_down
                || (role.is_writer() && self.attached_at.is_some())
                || check_resync,
            follow: if role == Role::Second {
                self.writer_to_follow()
            } else {
                None
            },
            xml_failed: self.xml_refresh_failed,
            changed: self.changed_bytes,
        }
    }

    /// The checkers: VM state, vmha-fs health, resync progress, and the data
    /// path of a peer whose controller is down.
    pub(super) async fn check(&mut self) {
        self.check_with(None).await;
    }

    /// The node's check pass left findings ([`super::check_pass`]): acted on
    /// when gathered under the current epoch; else (this task handled
    /// something meanwhile) the module is checked again here.
    pub(super) async fn on_pass(&mut self, epoch: u64, found: Findings) {
        if epoch == self.check_epoch {
            self.check_with(Some(found)).await;
            return;
        }
        // What the pass did stays done: say so.
        let mut lines = Vec::new();
        if matches!(found.xml, Some(Ok(true))) {
            self.record(
                "domain XML rewritten from libvirt's definition".into(),
                &mut lines,
            )
            .await;
        }
        if matches!(found.followed, Some(Ok(true))) {
            self.record(
                "receiver restarted for the writer's generation (checker pass)".into(),
                &mut lines,
            )
            .await;
        }
        self.check_with(None).await;
    }

    /// A check on `found` (from the node's pass), or on findings gathered
    /// now.
    async fn check_with(&mut self, found: Option<Findings>) {
        if self.state.peer_controller_down && !self.data_path_alive().await {
            self.handle(Event::DataPathLost).await;
        }
        let role = self.state.role;
        if role.is_writer() {
            self.follow_attach().await;
        }
        let found = match found {
            Some(found) => found,
            None => {
                let plan = self.check_plan();
                let busy = self.check_slot.task_busy().await;
                let found = self
                    .blocking(move |vm, fs, m| gather(&plan, vm, fs, m, false))
                    .await;
                drop(busy);
                match found {
                    Some(found) => found,
                    None => return,
                }
            }
        };
        let Findings {
            vm,
            fs,
            resync,
            changed,
            xml,
            followed,
        } = found;
        self.changed_bytes = changed;
        // Before the VM's state: a guest failing on the broken disk must not be
        // restarted on it.
        if let Some(FsHealth::DiskFailed(reason)) = &fs {
            // In maintenance the state machine holds it back and says so once:
            // no line per check.
            if !self.state.in_maintenance() {
                let mut lines = Vec::new();
                let reason = reason.strip_prefix("local disk failed: ").unwrap_or(reason);
                self.record(format!("local disk failed: {reason}"), &mut lines)
                    .await;
            }
            self.handle(Event::DiskFailed).await;
            return;
        }
        self.on_xml_refresh(xml).await;
        if let Some(Ok(state)) = vm {
            if state.is_down() {
                let now_ms = self.now_ms();
                let lines = self.handle(Event::VmStopped { now_ms }).await;
                drop(lines);
                return;
            }
        }
        match fs {
            Some(FsHealth::Failed(reason)) => {
                let now_ms = self.now_ms();
                self.handle(Event::FsDied { now_ms, reason }).await;
                return;
            }
            Some(FsHealth::Idle) => {
                if !self.state.in_maintenance() {
                    let mut lines = Vec::new();
                    self.record("vmha-fs failed: nothing is mounted".into(), &mut lines)
                        .await;
                }
                self.handle(Event::FsFailed).await;
                return;
            }
            Some(FsHealth::LinkDown) => self.on_link_down().await,
            Some(FsHealth::Fenced) => {
                let peer_follows_us = self.peer_follows_us();
                if peer_follows_us {
                    tracing::debug!(
                        module = %self.module.name,
                        "the peer's receiver accepts an older generation of ours: waiting for it"
                    );
                }
                self.handle(Event::Fenced { peer_follows_us }).await;
                if !peer_follows_us {
                    return;
                }
            }
            Some(FsHealth::Healthy | FsHealth::DiskFailed(_)) | None => {}
        }
        if role == Role::Second {
            match followed {
                Some(result) => self.on_followed(result, self.peer_generation()).await,
                None => self.follow_writer().await,
            }
        }
        // The receiver of vmha-fs does not know how far the copy is: the
        // writer says so in its heartbeat.
        let resync = match resync {
            Some(Ok(ResyncState::Idle)) => Some(Ok(self.resync_from_peer())),
            other => other,
        };
        match resync {
            Some(Ok(ResyncState::Running(progress))) => {
                self.resync_rate.sample(progress.done_bytes);
                if self.state.resync != Some(progress) {
                    self.handle(Event::ResyncProgress(progress)).await;
                }
            }
            Some(Ok(ResyncState::Done)) => {
                self.handle(Event::ResyncDone).await;
            }
            Some(Ok(ResyncState::Idle)) | None => {}
            Some(Err(e)) => {
                tracing::warn!(module = %self.module.name, error = %e, "resync state");
            }
        }
    }
}

#[cfg(test)]
mod writer_sync_tests {
    use super::*;
    use crate::state::Progress;

    #[test]
    fn writer_progress_round_trips_through_the_heartbeat_field() {
        assert_eq!(writer_resync_status(ResyncState::Idle, 0), None);
        let done = writer_resync_status(ResyncState::Done, 0);
        assert_eq!(
            done.as_ref().map(resync_from_writer),
            Some(ResyncState::Done)
        );
        for (d, t) in [(0, 0), (5, 5), (3, 10)] {
            let running = ResyncState::Running(Progress {
                done_bytes: d,
                total_bytes: t,
            });
            let beat = writer_resync_status(running, 0);
            // A running copy is never read as done, even at 100 %.
            assert!(matches!(
                beat.as_ref().map(resync_from_writer),
                Some(ResyncState::Running(_))
            ));
        }
    }
}
