//! The per-module task: one event loop that turns what happens (operator
//! requests, the peer's heartbeats, timers, the checkers) into events, feeds
//! them to [`crate::state::step`] one at a time, has the actions executed
//! ([`super::actions`]) and publishes the module's announcement. Kept apart
//! from action execution and the checkers so the loop and its ordering rules
//! (announce after a step's actions, events queued by actions run next) read
//! on one page.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use super::check_pass::{CheckPass, Slot};
use super::{ms, ModuleCommand, ModuleView, PeerView, WitnessSlot};
use crate::backoff::Backoff;
use crate::config::{Config, Module, NodeIndex, Witness};
use crate::driver::{FsDriver, VmDriver};
use crate::eventlog::EventLog;
use crate::generation::{compare, Metadata};
use crate::heartbeat::ModuleBeat;
use crate::state::{step, Action, Attach, Event, ModuleState, Peer, Policy, Readiness, Role};
use crate::status::ResyncStatus;

/// Resync rate from successive progress samples.
#[derive(Debug, Default)]
pub(super) struct ResyncRate {
    pub(super) last: Option<(Instant, u64)>,
    pub(super) rate: u64,
}

impl ResyncRate {
    pub(super) fn sample(&mut self, done: u64) {
        let now = Instant::now();
        if let Some((at, before)) = self.last {
            let dt = now.saturating_duration_since(at).as_secs_f64();
            if dt > 0.0 && done >= before {
                let instant = (done - before) as f64 / dt;
                // Smoothed: a momentary stall does not zero the ETA.
                let smoothed = if self.rate == 0 {
                    instant
                } else {
                    0.7 * self.rate as f64 + 0.3 * instant
                };
                // Float to integer `as` saturates (and maps NaN to 0).
                #[allow(clippy::cast_possible_truncation)]
                let rate = smoothed as u64;
                self.rate = rate;
            }
        }
        self.last = Some((now, done));
    }
}

#[derive(Debug)]
pub(super) struct Runner {
    pub(super) module: Module,
    pub(super) state: ModuleState,
    pub(super) meta: Metadata,
    pub(super) state_dir: PathBuf,
    pub(super) vm: Arc<dyn VmDriver>,
    pub(super) fs: Arc<dyn FsDriver>,
    pub(super) log: Arc<EventLog>,
    pub(super) view: watch::Sender<ModuleView>,
    pub(super) peer_rx: watch::Receiver<PeerView>,
    pub(super) last_beat: Option<Arc<ModuleBeat>>,
    /// When the latest heartbeat round of the peer carrying this module
    /// arrived (the dispatcher sets it at every round).
    pub(super) peer_heard: super::HeardAt,
    /// The last `PeerSeen` step that changed nothing (the state it met, the
    /// event): the state machine is a function of the two, so an identical
    /// repetition is skipped (`on_peer_view`), and the task is not woken
    /// for the peer's rounds while the step stands (`peer_seen_settled`).
    pub(super) idle_peer_seen: Option<(ModuleState, Event)>,
    /// When to take the peer's latest beat again (`PeerSeen`) although it
    /// did not change: while the last step on it may not have been the
    /// last one (it changed something, or our state changed since), once
    /// per heartbeat interval — what every round of the peer did before
    /// the dispatcher woke the task only on a change.
    pub(super) peer_seen_again: Option<tokio::time::Instant>,
    pub(super) heartbeat_interval: Duration,
    pub(super) peer_lost_sent: bool,
    pub(super) started: Instant,
    pub(super) start_wait: Option<tokio::time::Instant>,
    pub(super) start_wait_ms: u64,
    pub(super) failover_timeout: Duration,
    pub(super) witnesses: Vec<Witness>,
    pub(super) witness_slot: WitnessSlot,
    /// When to run the `RetryWitness` asked for.
    pub(super) witness_retry: Option<tokio::time::Instant>,
    /// The witness errors last written to the event log.
    pub(super) witness_errors_logged: Option<Vec<String>>,
    pub(super) changed_bytes: u64,
    pub(super) resync_rate: ResyncRate,
    pub(super) resync_unsupported_logged: bool,
    /// Writer: when vmha-fs last attached the SECOND (`AttachPeer`), while
    /// the state machine counts it attached.
    pub(super) attached_at: Option<Instant>,
    /// When to report `AttachRetryDue` (after `RetryAttach`, the pause from
    /// [`Runner::attach_backoff`]).
    pub(super) attach_retry: Option<tokio::time::Instant>,
    /// When to report `ReceiverRetryDue` (after `RetryReceiver`, the pause
    /// from [`Runner::receiver_backoff`]).
    pub(super) receiver_retry: Option<tokio::time::Instant>,
    pub(super) attach_unsupported: bool,
    /// Writer: the copy to the peer, as published in heartbeats.
    pub(super) writer_sync: Option<ResyncStatus>,
    /// Writer: when vmha-fs was last told to write alone.
    pub(super) went_alone: Option<Instant>,
    /// Since when the dispatcher observes the peer without a stall of its own.
    pub(super) judging_since: Arc<Mutex<Instant>>,
    /// The last `refresh_xml` failed (logged once).
    pub(super) xml_refresh_failed: bool,
    /// What caused the event being handled ("peer lost", "vmctl stop by
    /// root (uid 0)", ...): every event-log line says it.
    pub(super) cause: String,
    /// While a retry that failed before is attempted again: its lines, kept
    /// out of the event log unless it succeeds (a failing retry is logged
    /// once, when it starts failing).
    pub(super) quiet: Mutex<Option<Vec<String>>>,
    /// Starting the receiver (following a writer) failed: retried with back-off.
    pub(super) receiver_backoff: Backoff,
    /// Attaching the SECOND (or its sync) failed: retried with back-off.
    pub(super) attach_backoff: Backoff,
    /// A witness probe that could not run: retried with back-off (from
    /// [`super::WITNESS_RETRY`] up to [`super::WITNESS_RETRY_MAX`]).
    pub(super) witness_backoff: Backoff,
    /// The first `Start` or `Adopt` was handled: the module is in heartbeats.
    pub(super) announced: bool,
    /// Failovers, split brains, checker failures (for `/metrics`).
    pub(super) counters: Arc<super::ModuleCounters>,
    /// Where the peer's libvirt is reached for a live swap.
    pub(super) live_target: super::live::LiveTarget,
    /// The live migration running in the background (`MigrateVm`), until
    /// its outcome arrived (also after `AbortMigration`: a new one waits).
    pub(super) migration: Option<super::live::Migration>,
    /// The node's check pass, and this module's place in it.
    pub(super) checks: CheckPass,
    pub(super) check_slot: Arc<Slot>,
    /// Advanced by every handled event: the pass's findings gathered under
    /// an older one are not acted on as they are.
    pub(super) check_epoch: u64,
}

/// A module's settings that a reload may change while its task runs. What
/// vmha-fs was started with (lock timeout, rate limit) applies at its next
/// start; what the VM driver reads (stop timeout) at its next call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Settings {
    pub(super) module: Module,
    pub(super) policy: Policy,
    pub(super) heartbeat_interval: Duration,
    pub(super) start_wait_ms: u64,
    pub(super) failover_timeout: Duration,
    pub(super) witnesses: Vec<Witness>,
}

impl Settings {
    pub(super) fn of(config: &Config, module: &Module, node: NodeIndex) -> Settings {
        let cluster = &config.cluster;
        Settings {
            module: module.clone(),
            policy: Policy::new(config, module, node),
            heartbeat_interval: Duration::from_millis(cluster.heartbeat_interval_ms),
            start_wait_ms: cluster.start_wait_ms,
            failover_timeout: Duration::from_millis(cluster.failover_timeout_ms),
            witnesses: cluster.witness.clone(),
        }
    }
}

/// How `MarkPeerOutdated` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outdated {
    /// The peer's heartbeat shows it is behind us and not ready.
    Acknowledged,
    PeerLost,
    /// The peer's heartbeat shows data that is not ours or older.
    PeerAhead,
    TimedOut,
}

/// How long a failed attach waits before the writer tries again (the
/// first pause of [`Runner::attach_backoff`], doubling up to [`RETRY_MAX`]).
pub const ATTACH_RETRY: Duration = Duration::from_secs(3);
/// After a failed receiver start, the first pause before following the
/// writer again (doubling up to [`RETRY_MAX`]).
pub(super) const RECEIVER_RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest pause between two attempts of a failing retry loop.
pub(super) const RETRY_MAX: Duration = Duration::from_secs(60);
/// After SIGUSR1, how long a link still reported down is taken for vmha-fs
/// not having published its new state yet (it does within tens of ms).
pub(super) const GO_ALONE_SETTLE: Duration = Duration::from_secs(1);

/// The shortest period of the checkers. Not the heartbeat interval itself:
/// the checks' cost (32 modules on a node) must not grow when heartbeats are
/// made more frequent for a faster failover. A VM's stop is seen at once
/// through the VM driver's change notice ([`VmDriver::state_changes`]); a
/// vmha-fs that died or lost its link within this.
pub const CHECK_EVERY_MIN: Duration = Duration::from_millis(500);

/// How often a module's checkers run: every heartbeat interval, but not
/// more often than [`CHECK_EVERY_MIN`].
pub fn check_period(heartbeat_interval: Duration) -> Duration {
    heartbeat_interval.max(CHECK_EVERY_MIN)
}

/// Waits for `notify`, or forever without one.
async fn notified(notify: Option<&Arc<tokio::sync::Notify>>) {
    match notify {
        Some(n) => n.notified().await,
        None => std::future::pending().await,
    }
}

impl Runner {
    pub(super) async fn run(
        mut self,
        mut commands: mpsc::Receiver<ModuleCommand>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut vm_changes = self.vm.state_changes(&self.module);
        let slot = Arc::clone(&self.check_slot);
        loop {
            slot.publish(self.check_epoch, &self.check_plan());
            let start_wait = self.start_wait;
            let witness_retry = self.witness_retry;
            let attach_retry = self.attach_retry;
            let receiver_retry = self.receiver_retry;
            self.arm_peer_seen_again();
            let peer_seen_again = self.peer_seen_again;
            tokio::select! {
                _ = shutdown.changed() => return,
                command = commands.recv() => match command {
                    None => return,
                    Some(ModuleCommand::Event(event, reply)) => {
                        self.cause = "vmhad".into();
                        let lines = self.handle(event).await;
                        let _ = reply.send(lines);
                    }
                    Some(ModuleCommand::Caused(event, cause, reply)) => {
                        self.cause = cause;
                        let lines = self.handle(event).await;
                        let _ = reply.send(lines);
                    }
                    Some(ModuleCommand::Reconfigure(settings, reply)) => {
                        self.checks.set_period(check_period(settings.heartbeat_interval));
                        slot.set_module(&settings.module);
                        self.reconfigure(*settings);
                        vm_changes = self.vm.state_changes(&self.module);
                        let _ = reply.send(());
                    }
                    Some(ModuleCommand::Verify(reply)) => {
                        // May take long (it reads everything): off the runner's loop.
                        let (fs, module, log) =
                            (Arc::clone(&self.fs), self.module.clone(), Arc::clone(&self.log));
                        tokio::spawn(async move {
                            let outcome = tokio::task::spawn_blocking(move || fs.verify(&module))
                                .await
                                .map_err(|e| format!("verify panicked: {e}"))
                                .and_then(|r| r.map_err(|e| e.to_string()))
                                .map(|report| report.lines());
                            let record: Vec<String> = match &outcome {
                                Ok(lines) => lines.iter().map(|l| format!("[vmctl verify] verify: {l}")).collect(),
                                Err(e) => vec![format!("[vmctl verify] verify failed: {e}")],
                            };
                            for line in record {
                                if let Err(e) = log.append(&line) {
                                    tracing::warn!("event log: {e}");
                                }
                            }
                            let _ = reply.send(outcome);
                        });
                    }
                },
                changed = self.peer_rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    self.on_peer_view().await;
                }
                _ = sleep_until(peer_seen_again), if peer_seen_again.is_some() => {
                    self.on_peer_view().await;
                }
                _ = sleep_until(start_wait), if start_wait.is_some() => {
                    self.start_wait = None;
                    self.cause = "start-up wait over".into();
                    self.handle(Event::StartWaitElapsed).await;
                }
                _ = sleep_until(witness_retry), if witness_retry.is_some() => {
                    self.witness_retry = None;
                    self.cause = "witness retry".into();
                    if self.state.probing() {
                        let mut lines = Vec::new();
                        let outcome = self.probe_witness(&mut lines).await;
                        self.handle(Event::WitnessResult(outcome)).await;
                    }
                }
                _ = sleep_until(attach_retry), if attach_retry.is_some() => {
                    self.attach_retry = None;
                    self.cause = "attach retry".into();
                    self.handle(Event::AttachRetryDue).await;
                }
                _ = sleep_until(receiver_retry), if receiver_retry.is_some() => {
                    self.receiver_retry = None;
                    self.cause = "receiver retry".into();
                    self.handle(Event::ReceiverRetryDue).await;
                }
                outcome = super::live::ended(&mut self.migration) => {
                    self.on_migration_end(outcome).await;
                }
                _ = slot.delivered.notified() => {
                    if let Some((epoch, found)) = slot.take() {
                        self.cause = "checker".into();
                        self.on_pass(epoch, found).await;
                    }
                }
                _ = notified(vm_changes.as_ref()) => {
                    // A lifecycle event of the domain: look now, not at the next tick.
                    self.cause = "checker".into();
                    self.check().await;
                }
            }
        }
    }

    /// The background migration ended: its outcome is the state machine's
    /// (`MigrateDone`, `MigrateFailed`), unless it was aborted: then it is
    /// only logged, and a VM that left all the same is seen stopped by the
    /// checker (restarted here; the peer destroys its paused copy when it
    /// drops its standby).
    async fn on_migration_end(&mut self, outcome: Result<(), String>) {
        let Some(migration) = self.migration.take() else {
            return;
        };
        let ms = migration.started.elapsed().as_millis();
        self.cause = "live migration".into();
        let mut lines = Vec::new();
        match (migration.aborted, outcome) {
            (true, Ok(())) => {
                self.record(
                    format!("the aborted live migration completed after all ({ms} ms): the VM left this node; it is not resumed on the peer"),
                    &mut lines,
                )
                .await;
                self.check().await;
            }
            (true, Err(e)) => {
                self.record(
                    format!("the aborted live migration ended after {ms} ms: {e}"),
                    &mut lines,
                )
                .await;
            }
            (false, Ok(())) => {
                self.record(
                    format!("VM migrated to the peer in {ms} ms (paused there)"),
                    &mut lines,
                )
                .await;
                self.handle(Event::MigrateDone).await;
            }
            (false, Err(reason)) => {
                self.record(format!("error: live migration: {reason}"), &mut lines)
                    .await;
                self.handle(Event::MigrateFailed { reason }).await;
            }
        }
    }

    /// Takes a reload's settings; the state (role, generation, counters) stays.
    fn reconfigure(&mut self, settings: Settings) {
        if settings.start_wait_ms != self.start_wait_ms && self.start_wait.is_some() {
            self.start_wait =
                Some(tokio::time::Instant::now() + Duration::from_millis(settings.start_wait_ms));
        }
        self.module = settings.module;
        self.state.policy = settings.policy;
        self.heartbeat_interval = settings.heartbeat_interval;
        self.start_wait_ms = settings.start_wait_ms;
        self.failover_timeout = settings.failover_timeout;
        self.witnesses = settings.witnesses;
        self.publish();
    }

    /// The `PeerSeen` event the peer's latest beat makes now.
    fn peer_seen_event(&self, beat: &ModuleBeat, config_match: bool) -> Event {
        let relation = compare(&self.meta.history, &beat.history);
        Event::PeerSeen {
            peer: Peer::from_announce(beat.announce, relation, config_match, beat.changed_bytes),
            local_changed_bytes: self.changed_bytes,
        }
    }

    /// The last `PeerSeen` step on the peer's latest beat changed nothing and
    /// would change nothing again (same state, same event): nothing to do
    /// until the peer's beat changes. True too without a beat to take.
    fn peer_seen_settled(&self) -> bool {
        let view = self.peer_rx.borrow();
        let PeerView::Seen { beat, config_match } = &*view else {
            return true;
        };
        let Some((state, event)) = &self.idle_peer_seen else {
            return false;
        };
        *state == self.state && *event == self.peer_seen_event(beat, *config_match)
    }

    /// Arms [`Runner::peer_seen_again`] one heartbeat interval ahead while
    /// the last `PeerSeen` may not have been the last step on the peer's
    /// beat; disarms it once it was.
    fn arm_peer_seen_again(&mut self) {
        if self.peer_seen_settled() {
            self.peer_seen_again = None;
        } else if self.peer_seen_again.is_none() {
            self.peer_seen_again = Some(tokio::time::Instant::now() + self.heartbeat_interval);
        }
    }

    pub(super) async fn on_peer_view(&mut self) {
        self.peer_seen_again = None;
        let view = self.peer_rx.borrow_and_update().clone();
        match view {
            PeerView::Unknown => {}
            PeerView::Seen { beat, config_match } => {
                self.cause = if self.peer_lost_sent {
                    "peer joined again".into()
                } else if self.last_beat.is_none() {
                    "peer joined".into()
                } else {
                    "peer heartbeat".into()
                };
                self.peer_lost_sent = false;
                let event = self.peer_seen_event(&beat, config_match);
                self.last_beat = Some(beat);
                if matches!(&self.idle_peer_seen, Some((s, e)) if *s == self.state && *e == event) {
                    // The same step changed nothing before: it would again
                    // (no action, no state change, nothing to publish).
                    return;
                }
                self.handle(event).await;
            }
            PeerView::Lost => {
                if !self.peer_lost_sent {
                    self.peer_lost_sent = true;
                    let event = if matches!(self.state.role, Role::Prim | Role::Second)
                        && self.data_path_alive().await
                    {
                        self.cause = "peer heartbeats silent, data path alive".into();
                        Event::ControllerLost
                    } else {
                        self.cause = "peer lost".into();
                        Event::PeerLost
                    };
                    self.handle(event).await;
                }
            }
        }
    }

    /// The module's replication link carried something within the failover
    /// timeout (see [`crate::driver::FsDriver::data_path_alive`]).
    pub(super) async fn data_path_alive(&self) -> bool {
        let within = self.failover_timeout;
        self.blocking(move |_, fs, m| fs.data_path_alive(m, within))
            .await
            .unwrap_or(false)
    }

    pub(super) fn now_ms(&self) -> u64 {
        ms(self.started.elapsed())
    }

    /// Runs `first` and the events its actions produce; returns the log lines.
    pub(super) async fn handle(&mut self, first: Event) -> Vec<String> {
        if matches!(first, Event::Start | Event::Adopt(_)) {
            self.announced = true;
        }
        self.check_epoch = self.check_epoch.wrapping_add(1);
        let _busy = self.check_slot.task_busy().await;
        let mut queue = VecDeque::from([first]);
        let mut lines = Vec::new();
        while let Some(event) = queue.pop_front() {
            tracing::debug!(module = %self.module.name, ?event, "event");
            let (next, actions) = step(&self.state, event.clone());
            self.counters.count(&event, self.state.role, next.role);
            if matches!(event, Event::PeerSeen { .. }) {
                // Other events leave it: a pure step on the same state and
                // event changes nothing again, whatever came between.
                self.idle_peer_seen = (actions.is_empty() && next == self.state)
                    .then(|| (next.clone(), event.clone()));
            }
            if actions.contains(&Action::MountReceiver) && self.receiver_backoff.failing() {
                // A retry of a receiver start that failed before: its lines
                // reach the event log only if it succeeds (the failure was
                // logged when it started). Every action still runs.
                self.set_quiet(true);
            }
            // Losing readiness is announced at once, before the step's (maybe
            // slow) actions: claiming less is always safe, and a writer waiting
            // for us to know we are outdated must not wait on them.
            let downgrade = next.role == self.state.role
                && self.state.readiness() == Readiness::Ready
                && next.readiness() == Readiness::NotUpToDate;
            self.state = next;
            if downgrade {
                self.publish();
            }
            for action in actions {
                if self.execute(action, &mut queue, &mut lines).await.is_err() {
                    break;
                }
            }
            if self.state.attach != Attach::Asked {
                self.attached_at = None;
                self.writer_sync = None;
            }
            if self.state.attach != Attach::Failed {
                self.attach_retry = None;
            }
            if self.state.attach == Attach::Idle {
                // The episode is over: the next SECOND behind us starts a
                // new series (its first failure is logged again).
                self.attach_backoff.succeed();
            }
            if !self.state.receiver_retry {
                self.receiver_retry = None;
                if self.state.role != Role::Second {
                    // Given up by the state machine (stopped, writing, or no
                    // writer to follow when the pause ended): a new series.
                    self.receiver_backoff.succeed();
                }
            }
            if !self.state.probing() {
                self.witness_retry = None;
                // The episode is over: the next one starts at the first delay.
                self.witness_backoff.succeed();
            }
            if self.state.role == Role::Wait {
                if self.start_wait.is_none() {
                    self.start_wait = Some(
                        tokio::time::Instant::now() + Duration::from_millis(self.start_wait_ms),
                    );
                }
            } else {
                self.start_wait = None;
            }
            self.publish();
        }
        self.set_quiet(false);
        lines
    }

    /// Turns quiet logging on, or off: the lines held meanwhile are written
    /// if the retry succeeded, else dropped (the failure was logged when it
    /// started).
    pub(super) fn set_quiet(&mut self, on: bool) {
        let held = {
            let mut quiet = self.quiet.lock().unwrap_or_else(|p| p.into_inner());
            if on {
                quiet.get_or_insert_with(Vec::new);
                return;
            }
            quiet.take()
        };
        if let Some(held) = held {
            if !self.receiver_backoff.failing() {
                for line in held {
                    self.append_log(&line);
                }
            }
        }
    }

    /// Writes one line (already prefixed with its cause) to the event log.
    pub(super) fn append_log(&self, line: &str) {
        if let Err(e) = self.log.append(line) {
            tracing::warn!(module = %self.module.name, error = %e, "event log");
        }
    }

    pub(super) fn publish(&mut self) {
        let resync = self.state.resync.map(|p| {
            let rate = self.resync_rate.rate;
            ResyncStatus {
                done_bytes: p.done_bytes,
                total_bytes: p.total_bytes,
                rate_bytes_per_s: rate,
                eta_s: (rate > 0).then(|| p.total_bytes.saturating_sub(p.done_bytes) / rate),
            }
        });
        let resync = if self.state.role.is_writer() {
            self.writer_sync
        } else {
            resync
        };
        let announce = self.state.announce();
        let since = {
            let view = self.view.borrow();
            if view.announce.role == announce.role {
                view.since
            } else {
                Instant::now()
            }
        };
        self.view.send_replace(ModuleView {
            since,
            announce,
            history: self.meta.history.clone(),
            changed_bytes: self.changed_bytes,
            resync,
            peer_controller_down: self.state.peer_controller_down,
            live_outcome: self.state.live_outcome.clone(),
            announced: self.announced,
        });
    }
}

pub(super) async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
