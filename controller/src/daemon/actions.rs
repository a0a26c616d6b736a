//! Action execution: what each [`Action`] of the state machine does
//! through the drivers and the metadata file, and which events it reports
//! back (VM started or not, stop done or failed, witness outcome, ...). The
//! only place that calls the drivers for a decision; it decides nothing
//! itself beyond how to carry an action out.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use super::probe_witnesses;
use super::runner::{Outdated, ResyncRate, Runner, RETRY_MAX};
use super::PeerView;
use crate::config::Module;
use crate::driver::{FsDriver, VmDriver};
use crate::generation::Metadata;
use crate::state::{Action, Event, WitnessOutcome};

/// Why the rest of a step's actions are skipped.
#[derive(Debug)]
pub(super) struct Abort;

impl Runner {
    /// Writer: vmha-fs stops waiting for the peer and writes alone (SIGUSR1).
    pub(super) async fn fs_go_alone(&mut self, lines: &mut Vec<String>) {
        self.writer_sync = None;
        self.went_alone = Some(Instant::now());
        match self.blocking(|_, fs, m| fs.go_alone(m)).await {
            Some(Ok(())) => self.record("vmha-fs writes alone".into(), lines).await,
            Some(Err(e)) => self.record(format!("error: go alone: {e}"), lines).await,
            None => {}
        }
    }

    /// Logs `line` (tracing and the event log, prefixed with the cause) and
    /// adds it to the command's answer.
    pub(super) async fn record(&self, line: String, lines: &mut Vec<String>) {
        let logged = format!("[{}] {line}", self.cause);
        {
            let mut quiet = self.quiet.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(held) = quiet.as_mut() {
                tracing::debug!(module = %self.module.name, cause = %self.cause, "{line}");
                held.push(logged);
                lines.push(line);
                return;
            }
        }
        tracing::info!(module = %self.module.name, cause = %self.cause, "{line}");
        let log = Arc::clone(&self.log);
        let copy = logged;
        match tokio::task::spawn_blocking(move || log.append(&copy)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(module = %self.module.name, error = %e, "event log"),
            Err(e) => tracing::warn!(module = %self.module.name, error = %e, "event log task"),
        }
        lines.push(line);
    }

    pub(super) async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn VmDriver, &dyn FsDriver, &Module) -> T + Send + 'static,
    ) -> Option<T> {
        let (vm, fs, module) = (
            Arc::clone(&self.vm),
            Arc::clone(&self.fs),
            self.module.clone(),
        );
        match tokio::task::spawn_blocking(move || f(vm.as_ref(), fs.as_ref(), &module)).await {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::error!(module = %self.module.name, error = %e, "driver call panicked");
                None
            }
        }
    }

    /// Live swap: records (`true`) that the standby is being activated and
    /// the migrated VM is not resumed yet, or clears it
    /// ([`super::RESUME_PENDING`]). A failure is logged: a vmhad started in
    /// that window would then leave the VM paused, as before the record.
    pub(super) async fn set_resume_pending(&self, pending: bool, lines: &mut Vec<String>) {
        let path = super::resume_pending_path(&self.state_dir, &self.module.name);
        let result = tokio::task::spawn_blocking(move || {
            if pending {
                ::vmha_fs::atomic::write(&path, b"")
            } else {
                match std::fs::remove_file(&path) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    other => other,
                }
            }
        })
        .await;
        let error = match result {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        let what = if pending { "record" } else { "clear" };
        self.record(
            format!("error: {what} the pending resume of the migrated VM: {error}"),
            lines,
        )
        .await;
    }

    pub(super) async fn persist(
        &mut self,
        change: impl FnOnce(&mut Metadata),
    ) -> Result<(), String> {
        let before = self.meta.clone();
        change(&mut self.meta);
        let meta = self.meta.clone();
        let dir = self.state_dir.clone();
        let name = self.module.name.clone();
        let result = tokio::task::spawn_blocking(move || meta.save(&dir, &name)).await;
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.meta = before;
                Err(e.to_string())
            }
            Err(e) => {
                self.meta = before;
                Err(e.to_string())
            }
        }
    }

    pub(super) async fn fail_step(
        &mut self,
        what: &str,
        error: String,
        queue: &mut VecDeque<Event>,
        lines: &mut Vec<String>,
    ) -> Result<(), Abort> {
        self.record(format!("error: {what}: {error}"), lines).await;
        queue.push_front(Event::FsFailed);
        Err(Abort)
    }

    pub(super) async fn execute(
        &mut self,
        action: Action,
        queue: &mut VecDeque<Event>,
        lines: &mut Vec<String>,
    ) -> Result<(), Abort> {
        tracing::debug!(module = %self.module.name, ?action, "action");
        match action {
            Action::Log(line) => self.record(line, lines).await,
            Action::MountWriter | Action::MountWriterConnected | Action::MountReceiver => {
                let writer = action != Action::MountReceiver;
                let connected = action == Action::MountWriterConnected;
                let what = if connected {
                    "mount as writer replicating to the SECOND"
                } else if writer {
                    "mount as writer"
                } else {
                    "start the receiver"
                };
                // The writer claims its generation; the receiver accepts only
                // the writer's (fencing), or our own live flip of it.
                let generation = if writer {
                    self.meta.history.current().map(|g| g.to_string())
                } else {
                    self.receiver_generation()
                };
                let result = self
                    .blocking(move |_, fs, m| {
                        if connected {
                            fs.mount_writer_connected(m, generation.as_deref())
                        } else if writer {
                            fs.mount_writer_at(m, generation.as_deref())
                        } else {
                            fs.mount_receiver_accepting(m, generation.as_deref())
                        }
                    })
                    .await;
                let failed = match result {
                    Some(Err(e)) if connected => {
                        self.record(format!("error: {what}: {e}"), lines).await;
                        queue.push_front(Event::ConnectedMountFailed);
                        return Err(Abort);
                    }
                    Some(Ok(())) => None,
                    Some(Err(e)) => Some(e.to_string()),
                    None => Some("panicked".to_string()),
                };
                match failed {
                    None if writer => self.record(format!("{what}: done"), lines).await,
                    Some(e) if writer => return self.fail_step(what, e, queue, lines).await,
                    None => {
                        let after = self.receiver_backoff.succeed();
                        // The held lines of this retry are written after all.
                        self.set_quiet(false);
                        let line = match after {
                            Some(n) => format!("{what}: done, after {n} failed attempts"),
                            None => format!("{what}: done"),
                        };
                        self.record(line, lines).await;
                    }
                    Some(e) => {
                        // The state machine holds, then retries after the
                        // pause `RetryReceiver` asks for (`ReceiverRetryDue`).
                        if self.receiver_backoff.fail(Instant::now()) {
                            self.record(format!("error: {what}: {e}"), lines).await;
                            self.record(
                                format!(
                                    "{what} failed; retrying with back-off ({} s, doubling up to {} s), logged again once it works",
                                    self.receiver_backoff.delay().as_secs(),
                                    RETRY_MAX.as_secs()
                                ),
                                lines,
                            )
                            .await;
                        } else {
                            tracing::debug!(module = %self.module.name, error = %e, "{what}");
                        }
                        queue.push_front(Event::ReceiverFailed);
                        return Err(Abort);
                    }
                }
            }
            Action::Unmount => {
                if let Some(Err(e)) = self.blocking(|_, fs, m| fs.unmount(m)).await {
                    self.record(format!("error: unmount: {e}"), lines).await;
                }
            }
            Action::DefineDomain => match self.blocking(|vm, _, m| vm.define(m)).await {
                Some(Ok(())) => self.record("domain defined".into(), lines).await,
                Some(Err(e)) => self.record(format!("error: define: {e}"), lines).await,
                None => {}
            },
            Action::StartVm => {
                // The writer mount before it in the step succeeded (its
                // failure ends the step), so the new role is true now.
                // Shown at once, with readiness `transient` while `virsh
                // start` runs (0.5-2 s): a takeover is visible, and announced
                // to a returning peer, when the data is writable here.
                self.publish();
                match self.blocking(|vm, _, m| vm.start(m)).await {
                    Some(Ok(())) => {
                        self.record("VM started".into(), lines).await;
                        queue.push_back(Event::VmStarted);
                    }
                    other => {
                        let e = match other {
                            Some(Err(e)) => e.to_string(),
                            _ => "panicked".to_string(),
                        };
                        self.record(format!("error: start VM: {e}"), lines).await;
                        queue.push_back(Event::VmStartFailed {
                            now_ms: self.now_ms(),
                        });
                    }
                }
            }
            Action::StopVm => {
                let outcome = match self.blocking(|vm, _, m| vm.stop(m)).await {
                    Some(Ok(())) => Ok(()),
                    Some(Err(e)) => Err(e.to_string()),
                    None => Err("panicked".to_string()),
                };
                match outcome {
                    Ok(()) => {
                        self.record("VM stopped".into(), lines).await;
                        queue.push_back(Event::VmStopDone);
                    }
                    Err(e) => {
                        self.record(format!("error: stop VM: {e}"), lines).await;
                        queue.push_back(Event::VmStopFailed);
                    }
                }
            }
            Action::NewGeneration => {
                let mut id = None;
                let result = self.persist(|m| id = Some(m.history.start_new())).await;
                match (result, id) {
                    (Ok(()), Some(id)) => self.record(format!("new generation {id}"), lines).await,
                    (Err(e), _) => {
                        return self.fail_step("persist generation", e, queue, lines).await
                    }
                    (Ok(()), None) => {}
                }
            }
            Action::AdoptPeerHistory => {
                let Some(history) = self.last_beat.as_ref().map(|b| b.history.clone()) else {
                    self.record("error: no peer history to adopt".into(), lines)
                        .await;
                    return Ok(());
                };
                if let Err(e) = self.persist(|m| m.history.adopt(&history)).await {
                    return self.fail_step("persist generation", e, queue, lines).await;
                }
            }
            Action::FlipGeneration => {
                let mut id = None;
                let result = self.persist(|m| id = m.history.start_flip()).await;
                match (result, id) {
                    (Ok(()), Some(id)) => {
                        self.record(format!("live swap: new generation {id} (the flip)"), lines)
                            .await
                    }
                    (Err(e), _) => {
                        return self.fail_step("persist generation", e, queue, lines).await
                    }
                    (Ok(()), None) => {}
                }
            }
            Action::AdoptFlip => {
                let Some(peer) = self.last_beat.as_ref().map(|b| b.history.clone()) else {
                    return Ok(());
                };
                let mut adopted = false;
                let before = self.meta.history.current();
                let result = if crate::generation::flip_ahead(&self.meta.history, &peer) {
                    self.persist(|m| adopted = m.history.adopt_flip(&peer))
                        .await
                } else {
                    Ok(())
                };
                if let Err(e) = result {
                    return self.fail_step("persist generation", e, queue, lines).await;
                }
                match (adopted, self.meta.history.current()) {
                    (true, Some(id)) => {
                        self.record(
                            format!("live swap: took the peer's new generation {id} (the flip)"),
                            lines,
                        )
                        .await
                    }
                    // An older peer keeps the generation (the same on both).
                    _ if peer.current() == before => {}
                    _ => {
                        self.record(
                            "live swap: the peer's generation is not the flip of ours; claiming ours".into(),
                            lines,
                        )
                        .await
                    }
                }
            }
            Action::SetMaintenance(flag) => {
                if let Err(e) = self.persist(|m| m.maintenance = flag).await {
                    // In effect until vmhad restarts; the operator sees the line.
                    self.record(
                        format!(
                            "error: persist maintenance {}: {e} (in effect until vmhad restarts)",
                            if flag { "on" } else { "off" }
                        ),
                        lines,
                    )
                    .await;
                }
            }
            Action::SetSelfOutdated(flag) => {
                match self.persist(|m| m.self_outdated = flag).await {
                    Ok(()) if flag => {
                        self.record(
                            "recorded: this node's own copy is not up to date".into(),
                            lines,
                        )
                        .await
                    }
                    Ok(()) => {}
                    // The state directory may sit on the failed disk: the module
                    // still leaves this node (the fact stays in memory).
                    Err(e) if flag => {
                        self.record(
                            format!("error: persist self-outdated: {e} (kept in memory)"),
                            lines,
                        )
                        .await
                    }
                    Err(e) => {
                        return self
                            .fail_step("persist self-outdated", e, queue, lines)
                            .await
                    }
                }
            }
            Action::SetPeerMayBeNewer(flag) => {
                if let Err(e) = self.persist(|m| m.peer_may_be_newer = flag).await {
                    return self
                        .fail_step("persist peer-may-be-newer", e, queue, lines)
                        .await;
                }
            }
            Action::StartResync { full } => {
                self.resync_rate = ResyncRate::default();
                let generation = self.peer_generation();
                match self
                    .blocking(move |_, fs, m| fs.start_resync_from(m, full, generation.as_deref()))
                    .await
                {
                    Some(Ok(())) => {
                        let kind = if full { "full" } else { "incremental" };
                        self.record(format!("{kind} resync started"), lines).await;
                    }
                    Some(Err(crate::driver::DriverError::Unsupported(what))) => {
                        if !self.resync_unsupported_logged {
                            self.resync_unsupported_logged = true;
                            self.record(
                                format!("{what} is not available: this node stays not up to date"),
                                lines,
                            )
                            .await;
                        }
                    }
                    Some(Err(e)) => {
                        return self.fail_step("resync", e.to_string(), queue, lines).await
                    }
                    None => {
                        return self
                            .fail_step("resync", "panicked".into(), queue, lines)
                            .await
                    }
                }
            }
            Action::MarkPeerOutdated => {
                let outcome = self.mark_peer_outdated(lines).await;
                queue.push_back(Event::PeerMarkedOutdated {
                    acknowledged: outcome == Outdated::Acknowledged,
                    peer_lost: outcome == Outdated::PeerLost,
                });
            }
            Action::WriteAlone => self.fs_go_alone(lines).await,
            Action::AttachPeer => {
                let generation = self.meta.history.current().map(|g| g.to_string());
                match self
                    .blocking(move |_, fs, m| fs.attach_peer(m, generation.as_deref()))
                    .await
                {
                    Some(Ok(())) => {
                        self.attached_at = Some(Instant::now());
                        self.resync_rate = ResyncRate::default();
                        let line = match self.attach_backoff.succeed() {
                            Some(n) => format!(
                                "attaching the SECOND: full copy started (after {n} failed attempts)"
                            ),
                            None => "attaching the SECOND: full copy started".into(),
                        };
                        self.record(line, lines).await;
                    }
                    Some(Err(crate::driver::DriverError::Unsupported(what))) => {
                        // Nothing to retry: this driver cannot attach.
                        if !self.attach_unsupported {
                            self.attach_unsupported = true;
                            tracing::info!(module = %self.module.name, "{what} is not available");
                        }
                    }
                    other => {
                        let e = match other {
                            Some(Err(e)) => e.to_string(),
                            _ => "panicked".to_string(),
                        };
                        // Retried by the state machine after the back-off
                        // pause; logged when a series of failures starts.
                        if self.attach_backoff.fail(Instant::now()) {
                            self.record(
                                format!("error: attach the SECOND: {e} (retrying with back-off)"),
                                lines,
                            )
                            .await;
                        } else {
                            tracing::debug!(module = %self.module.name, error = %e, "attach the SECOND");
                        }
                        queue.push_back(Event::AttachFailed);
                    }
                }
            }
            Action::RetryAttach => {
                let pause = self.attach_backoff.delay();
                self.attach_retry = Some(tokio::time::Instant::now() + pause);
            }
            Action::RetryReceiver => {
                let pause = self.receiver_backoff.delay();
                self.receiver_retry = Some(tokio::time::Instant::now() + pause);
            }
            Action::RequestCompare => {
                let reason = "the operator asked for a compare resync";
                match self
                    .blocking(move |_, fs, m| fs.request_compare(m, reason))
                    .await
                {
                    Some(Ok(())) => {
                        self.record("the next resync compares every block".into(), lines)
                            .await
                    }
                    Some(Err(e)) => {
                        // The SECOND is still made outdated and resynced: an
                        // incremental resync, which the log says.
                        self.record(format!("error: resync --compare: {e}"), lines)
                            .await
                    }
                    None => {}
                }
            }
            Action::InvalidateCopy => {
                let reason = "invalidated by the operator (vmctl invalidate)";
                match self
                    .blocking(move |_, fs, m| fs.invalidate(m, reason))
                    .await
                {
                    Some(Ok(())) => {
                        self.record("this copy's records are discarded".into(), lines)
                            .await
                    }
                    Some(Err(e)) => self.record(format!("error: invalidate: {e}"), lines).await,
                    None => {}
                }
            }
            Action::RestartReceiver { reason } => {
                let generation = self.receiver_generation();
                let result = self
                    .blocking(move |_, fs, m| fs.mount_receiver_accepting(m, generation.as_deref()))
                    .await;
                match result {
                    Some(Ok(())) => {
                        self.record(
                            format!("vmha-fs receiver failed ({reason}): restarted"),
                            lines,
                        )
                        .await
                    }
                    other => {
                        let e = match other {
                            Some(Err(e)) => e.to_string(),
                            _ => "panicked".to_string(),
                        };
                        self.record(format!("error: restart the receiver: {e}"), lines)
                            .await;
                        self.record(format!("vmha-fs failed: {reason}"), lines)
                            .await;
                        queue.push_front(Event::FsFailed);
                        return Err(Abort);
                    }
                }
            }
            Action::MountStandby => match self.blocking(|_, fs, m| fs.mount_standby(m)).await {
                Some(Ok(())) => {
                    self.record("standby mounted".into(), lines).await;
                    queue.push_back(Event::StandbyMounted);
                }
                other => {
                    let e = match other {
                        Some(Err(e)) => e.to_string(),
                        _ => "panicked".to_string(),
                    };
                    self.record(format!("error: standby mount: {e}"), lines)
                        .await;
                    queue.push_back(Event::StandbyFailed);
                }
            },
            Action::DropStandby => {
                // A paused incoming instance (the migration completed or
                // still runs, the swap did not): it must never run here;
                // `stop` destroys a paused domain at once. First: its open
                // files would hold the standby mount's unmount.
                let paused = self.blocking(|vm, _, m| vm.paused(m)).await;
                if let Some(Err(e)) = &paused {
                    self.record(format!("error: look for a paused incoming VM: {e}"), lines)
                        .await;
                }
                if let Some(Ok(Some(_))) = paused {
                    match self.blocking(|vm, _, m| vm.stop(m)).await {
                        Some(Ok(())) => {
                            self.record("the paused incoming VM was destroyed".into(), lines)
                                .await
                        }
                        Some(Err(e)) => {
                            self.record(format!("error: destroy the paused VM: {e}"), lines)
                                .await
                        }
                        None => {}
                    }
                }
                if let Some(Err(e)) = self.blocking(|_, fs, m| fs.drop_standby(m)).await {
                    self.record(format!("error: drop the standby: {e}"), lines)
                        .await;
                }
                self.set_resume_pending(false, lines).await;
            }
            Action::MigrateVm => {
                // In the background: heartbeats, the link's health and
                // requests are handled meanwhile; its outcome comes back as
                // `MigrateDone`/`MigrateFailed` (`Runner::on_migration_end`).
                if self.migration.is_some() {
                    let reason = "an aborted migration is still ending".to_string();
                    self.record(format!("error: live migration: {reason}"), lines)
                        .await;
                    queue.push_back(Event::MigrateFailed { reason });
                } else {
                    self.migration = Some(super::live::Migration::start(
                        self.live_target.clone(),
                        Arc::clone(&self.vm),
                        self.module.clone(),
                    ));
                    self.record("live migration started".into(), lines).await;
                }
            }
            Action::AbortMigration => {
                let aborted = match self.migration.as_mut() {
                    Some(migration) if !migration.aborted => {
                        migration.abort();
                        Some(migration.started.elapsed().as_millis())
                    }
                    _ => None,
                };
                if let Some(ms) = aborted {
                    self.record(
                        format!(
                            "live migration aborted after {ms} ms (libvirt's job aborted, its connection cut)"
                        ),
                        lines,
                    )
                    .await;
                }
            }
            Action::ActivateStandby { connected } => {
                // Until the VM resumed: a vmhad started in between resumes it.
                self.set_resume_pending(true, lines).await;
                let generation = self.meta.history.current().map(|g| g.to_string());
                let result = self
                    .blocking(move |_, fs, m| {
                        fs.activate_standby(m, generation.as_deref(), connected)
                    })
                    .await;
                let what = if connected {
                    "activate the standby as writer replicating to the SECOND"
                } else {
                    "activate the standby as writer alone"
                };
                match result {
                    Some(Ok(())) => self.record(format!("{what}: done"), lines).await,
                    Some(Err(e)) if connected => {
                        self.record(format!("error: {what}: {e}"), lines).await;
                        queue.push_front(Event::ConnectedMountFailed);
                        return Err(Abort);
                    }
                    Some(Err(e)) => return self.fail_step(what, e.to_string(), queue, lines).await,
                    None => return self.fail_step(what, "panicked".into(), queue, lines).await,
                }
            }
            Action::ResumeVm => {
                // The writer is active (its failure ended the step): the new
                // role is true now.
                self.publish();
                let resumed = self.blocking(|vm, _, m| vm.resume(m)).await;
                self.set_resume_pending(false, lines).await;
                match resumed {
                    Some(Ok(())) => {
                        self.record("VM resumed".into(), lines).await;
                        queue.push_back(Event::VmStarted);
                    }
                    other => {
                        let e = match other {
                            Some(Err(e)) => e.to_string(),
                            _ => "panicked".to_string(),
                        };
                        self.record(format!("error: resume VM: {e}"), lines).await;
                        // The paused instance goes: the restart starts it anew.
                        if let Some(Err(e)) = self.blocking(|vm, _, m| vm.stop(m)).await {
                            self.record(format!("error: destroy the paused VM: {e}"), lines)
                                .await;
                        }
                        queue.push_back(Event::VmStartFailed {
                            now_ms: self.now_ms(),
                        });
                    }
                }
            }
            Action::ProbeWitness => {
                let outcome = self.probe_witness(lines).await;
                queue.push_back(Event::WitnessResult(outcome));
            }
            Action::RetryWitness => {
                self.witness_backoff.fail(Instant::now());
                let delay = self.witness_backoff.delay();
                self.witness_retry = Some(tokio::time::Instant::now() + delay);
            }
        }
        Ok(())
    }

    /// Probes the witnesses; records the outcome, and the errors when they
    /// differ from the ones recorded last.
    pub(super) async fn probe_witness(&mut self, lines: &mut Vec<String>) -> WitnessOutcome {
        let report = probe_witnesses(&self.witnesses, &self.witness_slot).await;
        let errors = (!report.errors.is_empty()).then(|| report.errors.join("; "));
        let new_errors =
            report.errors.is_empty() || self.witness_errors_logged.as_ref() != Some(&report.errors);
        let line = match (report.outcome, &errors) {
            (WitnessOutcome::Reachable, None) => Some("witness reachable".to_string()),
            (WitnessOutcome::Reachable, Some(e)) => Some(format!(
                "witness reachable (others could not be probed: {e})"
            )),
            (WitnessOutcome::Unreachable, _) => Some("witness unreachable".to_string()),
            (WitnessOutcome::CouldNotProbe, e) => new_errors.then(|| {
                format!(
                    "error: witness could not be probed: {}",
                    e.as_deref().unwrap_or("?")
                )
            }),
        };
        self.witness_errors_logged = Some(report.errors);
        if let Some(line) = line {
            self.record(line, lines).await;
        }
        report.outcome
    }

    /// What a receiver on this node accepts: the peer's current generation
    /// (its last heartbeat), or our own when it is the live flip of the
    /// peer's ([`crate::generation::receiver_accepts`]).
    pub(super) fn receiver_generation(&self) -> Option<String> {
        let peer = self.last_beat.as_ref()?;
        crate::generation::receiver_accepts(&self.meta.history, &peer.history)
            .map(|g| g.to_string())
    }

    /// The peer's current generation as its last heartbeat showed it.
    pub(super) fn peer_generation(&self) -> Option<String> {
        self.last_beat
            .as_ref()
            .and_then(|b| b.history.current())
            .map(|g| g.to_string())
    }

    /// Publishes the new generation and waits until the peer shows it knows
    /// it is outdated, or is lost, bounded by the failover timeout.
    pub(super) async fn mark_peer_outdated(&mut self, lines: &mut Vec<String>) -> Outdated {
        self.view
            .send_modify(|v| v.history = self.meta.history.clone());
        let deadline = Instant::now() + self.failover_timeout;
        // Its own cursor on the peer's heartbeats: the runner's loop still
        // sees every change it has not handled yet.
        let mut peer_beats = self.peer_rx.clone();
        loop {
            let seen = matches!(&*self.peer_rx.borrow(), PeerView::Seen { .. });
            let outcome = if !seen {
                Some(Outdated::PeerLost)
            } else if self.peer_knows_outdated() {
                Some(Outdated::Acknowledged)
            } else if !self.peer_follows_us() {
                Some(Outdated::PeerAhead)
            } else {
                None
            };
            let line = match outcome {
                Some(Outdated::Acknowledged) => "the peer knows it is outdated",
                Some(Outdated::PeerLost) => "the peer is lost",
                Some(Outdated::PeerAhead) => {
                    "the peer is not behind this node: it does not take being outdated"
                }
                Some(Outdated::TimedOut) | None if Instant::now() >= deadline => {
                    self.record(
                        "the peer did not acknowledge being outdated within the failover timeout"
                            .into(),
                        lines,
                    )
                    .await;
                    return Outdated::TimedOut;
                }
                Some(Outdated::TimedOut) | None => {
                    let until = tokio::time::Instant::from_std(deadline);
                    match tokio::time::timeout_at(until, peer_beats.changed()).await {
                        // A new heartbeat (or the peer lost): look again.
                        Ok(Ok(())) => {}
                        // The dispatcher is gone (shutting down): nothing
                        // more will come.
                        Ok(Err(_)) => tokio::time::sleep_until(until).await,
                        // Timed out: the next turn says so.
                        Err(_) => {}
                    }
                    continue;
                }
            };
            self.record(line.into(), lines).await;
            return outcome.unwrap_or(Outdated::TimedOut);
        }
    }
}
