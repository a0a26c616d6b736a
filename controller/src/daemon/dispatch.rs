//! Everything that comes from outside a module task: the heartbeat sender,
//! the dispatcher that records the peer's liveness ([`super::PeerLiveness`])
//! and hands each module its part of the peer's heartbeats, and the control
//! requests (`vmctl`) routed to the module they name. Separate from the
//! module tasks because it is shared by all modules and never blocks on one.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use super::status::build_status;
use super::{ModuleCommand, ModuleHandle, PeerView, Shared};
use crate::config::differing_keys;
use crate::control::{Call, Caller, ErrorKind, Request, Response, UnknownModule};
use crate::heartbeat::{Endpoint, ModuleBeat, Payload, Received};
use crate::state::{Event, Role};

// ---- heartbeats ----

pub(super) async fn send_heartbeats(
    shared: Arc<Shared>,
    endpoint: Endpoint,
    mut shutdown: watch::Receiver<bool>,
) {
    let interval_of = |shared: &Shared| {
        Duration::from_millis(shared.config().cluster.heartbeat_interval_ms.max(1))
    };
    let mut interval = interval_of(&shared);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let session = endpoint.session();
    let node = shared.config().node(shared.node).name.clone();
    let mut round = 0u64;
    let mut failing = false;
    let mut last_prompted: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = ticker.tick() => {}
            _ = endpoint.prompted() => {
                // One extra round per interval at most: replayed datagrams
                // must not turn into a flood of our own.
                if last_prompted.is_some_and(|t| t.elapsed() < interval) {
                    continue;
                }
                last_prompted = Some(Instant::now());
            }
        }
        // A reload may have changed the interval.
        if interval_of(&shared) != interval {
            interval = interval_of(&shared);
            ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        round += 1;
        let config = shared.config();
        let modules = shared
            .modules()
            .iter()
            .filter_map(|h| {
                let view = h.view.borrow();
                if !view.announced {
                    return None;
                }
                Some(ModuleBeat {
                    name: h.module.name.clone(),
                    module_hash: h.module_hash?,
                    announce: view.announce,
                    history: view.history.clone(),
                    changed_bytes: view.changed_bytes,
                    resync: view.resync,
                    keys: h.keys.clone(),
                })
            })
            .collect();
        let payload = Payload {
            node: node.clone(),
            session,
            round,
            config_hash: config.hash(),
            modules,
            config_keys: config.cluster_key_digests().clone(),
            software: Some(env!("CARGO_PKG_VERSION").to_string()),
        };
        let errors = endpoint.send(&payload).await;
        // One log line per change of condition, not per interval.
        match (errors.is_empty(), failing) {
            (false, false) => {
                for e in &errors {
                    tracing::warn!(error = %e, "heartbeat send failed");
                }
                failing = true;
            }
            (true, true) => {
                tracing::info!("heartbeats sent on every network again");
                failing = false;
            }
            _ => {}
        }
    }
}

pub(super) async fn dispatch(
    shared: Arc<Shared>,
    mut incoming: mpsc::Receiver<Received>,
    mut shutdown: watch::Receiver<bool>,
    judging_since: Arc<Mutex<Instant>>,
) {
    let timing = |shared: &Shared| {
        let config = shared.config();
        (
            Duration::from_millis(config.cluster.failover_timeout_ms),
            // A quarter interval: the judgement adds at most that to the timeout.
            Duration::from_millis((config.cluster.heartbeat_interval_ms / 4).max(5)),
        )
    };
    let (mut timeout, mut tick) = timing(&shared);
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The peer is judged only on what this daemon could observe: after a
    // stall of its own (SIGSTOP, a frozen VM or host), the heartbeats queued
    // meanwhile are not read yet, so the silence is ours, not the peer's; the
    // peer gets a full `timeout` from the resume to be heard again.
    let mut last_tick = Instant::now();
    let mut observing_since = last_tick;
    // Anyone can send datagrams to the heartbeat port: at most one line a second.
    let mut rejections = vmha_fs::ratelog::RateLog::new("heartbeat");
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            message = incoming.recv() => match message {
                None => return,
                Some(received) => on_beat(&shared, received),
            },
            _ = ticker.tick() => {
                // A reload may have changed the timing.
                if timing(&shared) != (timeout, tick) {
                    (timeout, tick) = timing(&shared);
                    ticker = tokio::time::interval(tick);
                    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                }
                rejections.tick();
                let now = Instant::now();
                if now.saturating_duration_since(last_tick) > timeout / 2 {
                    tracing::warn!(
                        stalled_ms = super::ms(now.saturating_duration_since(last_tick)),
                        "this daemon was stalled; judging the peer from now on"
                    );
                    observing_since = now;
                    *judging_since.lock().unwrap_or_else(|p| p.into_inner()) = now;
                }
                last_tick = now;
                let lost_now = {
                    let mut peer = shared.peer();
                    // Never heard since this daemon started counts as silent
                    // from the start (an adopted PRIM or SECOND must be able
                    // to lose a peer that died while no vmhad ran here).
                    let silent = (peer.networks.latest().is_none()
                        || peer.networks.all_silent_for(now, timeout))
                        && now.saturating_duration_since(observing_since) >= timeout;
                    let newly = silent && !peer.lost;
                    if newly {
                        peer.lost = true;
                    }
                    newly
                };
                if lost_now {
                    tracing::warn!("peer lost: every network silent for {} ms", timeout.as_millis());
                    for handle in shared.modules() {
                        handle.peer.send_replace(PeerView::Lost);
                    }
                }
            }
        }
    }
}

pub(super) fn on_beat(shared: &Shared, received: Received) {
    let payload = received.payload;
    let modules = received.modules;
    let (fresh, keys_changed) = {
        let mut peer = shared.peer();
        peer.networks.record(received.network, received.at);
        if received.new_session {
            tracing::info!(
                network = received.network,
                session = format_args!("{:016x}", payload.session),
                peer_software = payload.software.as_deref().unwrap_or("unknown"),
                heartbeat_version = shared.heartbeat_versions.in_use(),
                "peer heartbeat session accepted (the peer or this daemon started)"
            );
        }
        peer.software.clone_from(&payload.software);
        if peer.lost {
            tracing::info!(network = received.network, "peer heard again");
        }
        peer.lost = false;
        peer.config_hash = Some(payload.config_hash);
        let mut keys_changed = false;
        let fresh = match peer.last_round {
            Some((session, round)) => session != payload.session || payload.round > round,
            None => true,
        };
        if fresh {
            peer.last_round = Some((payload.session, payload.round));
            if peer.config_keys != payload.config_keys {
                peer.config_keys = payload.config_keys.clone();
                keys_changed = true;
            }
            for beat in &modules {
                let role = beat.announce.role;
                match peer.role_since.get(&beat.name) {
                    Some((known, _)) if *known == role => {}
                    _ => {
                        peer.role_since
                            .insert(beat.name.clone(), (role, received.at));
                    }
                }
                match peer.modules.get(&beat.name) {
                    Some(known) if Arc::ptr_eq(known, beat) || known == beat => {}
                    known => {
                        keys_changed |= known.is_none_or(|k| k.keys != beat.keys);
                        peer.modules.insert(beat.name.clone(), Arc::clone(beat));
                    }
                }
            }
            let ours = shared.config().hash();
            if peer.differences_for != Some(ours) {
                peer.differences_for = Some(ours);
                keys_changed = true;
            }
        }
        (fresh, keys_changed)
    };
    if !fresh {
        return;
    }
    if keys_changed {
        // Only when something they depend on changed: not per heartbeat.
        log_differences(shared);
    }
    let beats: std::collections::HashMap<&str, &Arc<ModuleBeat>> =
        modules.iter().map(|b| (b.name.as_str(), b)).collect();
    for handle in shared.modules() {
        if let Some(beat) = beats.get(handle.module.name.as_str()).copied() {
            *handle.heard.lock().unwrap_or_else(|p| p.into_inner()) = Some(received.at);
            let config_match = handle.module_hash == Some(beat.module_hash);
            handle
                .peer
                .send_if_modified(|view| see(view, beat, config_match));
        }
    }
}

/// Makes `view` show `beat`; false (the module's task is not woken) when it
/// already shows the same beat and configuration match: the task's last
/// `PeerSeen` step stands (`Runner::on_peer_view` repeats it by itself while
/// it still changes something).
fn see(view: &mut PeerView, beat: &Arc<ModuleBeat>, config_match: bool) -> bool {
    if let PeerView::Seen {
        beat: known,
        config_match: known_match,
    } = view
    {
        if *known_match == config_match && (Arc::ptr_eq(known, beat) || **known == **beat) {
            return false;
        }
    }
    *view = PeerView::Seen {
        beat: Arc::clone(beat),
        config_match,
    };
    true
}

// ---- control requests ----

/// How long `swap --live` waits for the migration's outcome.
const LIVE_SWAP_WAIT: Duration = Duration::from_secs(900);
/// After the migration, how long it waits for the peer to resume the VM.
const LIVE_RESUME_WAIT: Duration = Duration::from_secs(60);

/// `swap --live`: asks the module on this node (the PRIM) and answers once
/// the live swap ended: an error when it was refused or aborted (the VM
/// then runs where it ran), else once the peer runs the VM.
async fn live_swap(shared: &Shared, module: Option<&str>, cause: String) -> Response {
    let handle = match resolve(shared, module) {
        Ok(h) => h,
        Err(e) => return Response::error(e),
    };
    let mut view = handle.view.clone();
    let number = view.borrow_and_update().live_outcome.0;
    let (reply, answer) = oneshot::channel();
    if handle
        .commands
        .send(ModuleCommand::Caused(Event::SwapLive, cause, reply))
        .await
        .is_err()
    {
        return Response::error("vmhad is shutting down");
    }
    let Ok(mut lines) = answer.await else {
        return Response::error("vmhad is shutting down");
    };
    if let Some(refusal) = lines.iter().find(|l| l.contains("refused")).cloned() {
        return Response {
            error: Some(refusal),
            kind: Some(ErrorKind::Refused),
            ..Response::lines(false, lines)
        };
    }
    // The migration runs in later steps (when the SECOND shows its standby).
    let ended = tokio::time::timeout(LIVE_SWAP_WAIT, async {
        loop {
            {
                let v = view.borrow_and_update();
                if v.live_outcome.0 != number && v.announce.swap_phase.is_none() {
                    return v.live_outcome.1.clone();
                }
            }
            if view.changed().await.is_err() {
                return Some("the module is shutting down".to_string());
            }
        }
    })
    .await;
    let failure = match ended {
        Ok(failure) => failure,
        Err(_) => Some(format!(
            "no outcome within {} s (see `vmctl log`)",
            LIVE_SWAP_WAIT.as_secs()
        )),
    };
    if let Some(why) = failure {
        let error = format!("live swap aborted: {why}; the VM keeps running where it ran");
        lines.push(error.clone());
        return Response {
            error: Some(error),
            kind: Some(ErrorKind::Refused),
            ..Response::lines(false, lines)
        };
    }
    lines.push("the VM migrated to the peer".into());
    // The peer activates its standby and resumes the VM: shown in its
    // heartbeats as PRIM without a swap phase.
    let name = handle.module.name.clone();
    let deadline = tokio::time::Instant::now() + LIVE_RESUME_WAIT;
    loop {
        let resumed = shared
            .peer()
            .modules
            .get(&name)
            .is_some_and(|b| b.announce.role == Role::Prim && b.announce.swap_phase.is_none());
        if resumed {
            lines.push("live swap done: the peer runs the VM".into());
            return Response::lines(true, lines);
        }
        if tokio::time::Instant::now() >= deadline {
            lines.push(format!(
                "the peer did not show the VM resumed within {} s (see `vmctl status`)",
                LIVE_RESUME_WAIT.as_secs()
            ));
            return Response::lines(true, lines);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(super) async fn serve_calls(shared: Arc<Shared>, mut calls: mpsc::Receiver<Call>) {
    while let Some(call) = calls.recv().await {
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let response = answer(&shared, call.request, call.caller).await;
            let _ = call.reply.send(response);
        });
    }
}

/// The command word of a request, for the event log.
fn request_name(request: &Request) -> &'static str {
    match request {
        Request::Status => "status",
        Request::Start { .. } => "start",
        Request::Stop { .. } => "stop",
        Request::Swap { .. } => "swap",
        Request::Prim { .. } => "prim",
        Request::Log { .. } | Request::LogTail { .. } => "log",
        Request::Verify { .. } => "verify",
        Request::Reload => "reload",
        Request::ConfigApply { .. } => "config apply",
        Request::ConfigText => "config text",
        Request::Resync { .. } => "resync",
        Request::Invalidate { .. } => "invalidate",
        Request::Leave { .. } => "leave",
        Request::Join => "join",
        Request::Maintenance { .. } => "maintenance",
    }
}

/// The configuration keys that differ between this node and the peer (as
/// of its latest heartbeat): `cluster.KEY`, `node[I].KEY`,
/// `modules.NAME.KEY`, and `modules.NAME` for a module only one side has.
pub(super) fn config_differences(shared: &Shared) -> Vec<String> {
    let config = shared.config();
    let peer = shared.peer();
    if peer.last_round.is_none() {
        return Vec::new();
    }
    let mut keys = differing_keys("", config.cluster_key_digests(), &peer.config_keys);
    let local: Vec<String> = config.modules.iter().map(|m| m.name.clone()).collect();
    for name in &local {
        let ours = config.module_key_digests(name).cloned().unwrap_or_default();
        match peer.modules.get(name) {
            Some(beat) => keys.extend(differing_keys(
                &format!("modules.{name}."),
                &ours,
                &beat.keys,
            )),
            None => keys.push(format!("modules.{name}")),
        }
    }
    keys.extend(
        peer.modules
            .keys()
            .filter(|name| !local.contains(name))
            .map(|name| format!("modules.{name}")),
    );
    keys.sort();
    keys.dedup();
    keys
}

/// Writes the differing keys to the event log of each module they concern
/// (cluster keys: every module) when the set changes.
fn log_differences(shared: &Shared) {
    let now = config_differences(shared);
    for handle in shared.modules() {
        let own = format!("modules.{}", handle.module.name);
        let concern: Vec<String> = now
            .iter()
            .filter(|k| {
                !k.starts_with("modules.") || **k == own || k.starts_with(&format!("{own}."))
            })
            .cloned()
            .collect();
        {
            let mut peer = shared.peer();
            let logged = peer
                .differences_logged
                .entry(handle.module.name.clone())
                .or_default();
            if *logged == concern {
                continue;
            }
            *logged = concern.clone();
        }
        let line = if concern.is_empty() {
            "configuration now the same as the peer's".to_string()
        } else {
            format!(
                "configuration differs from the peer's: {}",
                concern.join(", ")
            )
        };
        tracing::warn!(module = %handle.module.name, "{line}");
        if let Err(e) = handle.log.append(&format!("[peer heartbeat] {line}")) {
            tracing::warn!("event log: {e}");
        }
    }
}

pub(super) fn resolve(
    shared: &Shared,
    module: Option<&str>,
) -> Result<Arc<ModuleHandle>, UnknownModule> {
    let modules = shared.modules();
    let names = || {
        modules
            .iter()
            .map(|h| h.module.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match module {
        Some(name) => modules
            .iter()
            .find(|h| h.module.name == name)
            .cloned()
            .ok_or_else(|| UnknownModule::Unknown {
                name: name.to_string(),
                known: names(),
            }),
        None => match modules.as_slice() {
            [only] => Ok(Arc::clone(only)),
            [] => Err(UnknownModule::NoneConfigured),
            _ => Err(UnknownModule::NotNamed { known: names() }),
        },
    }
}

pub(super) async fn answer(shared: &Shared, request: Request, caller: Option<Caller>) -> Response {
    let cause = |cmd: &str| match &caller {
        Some(c @ Caller::Named(_)) => format!("{cmd} by {c}"),
        Some(c) => format!("vmctl {cmd} by {c}"),
        None => format!("{cmd} requested in-process"),
    };
    let command = request_name(&request);
    let (event, module) = match request {
        Request::Status => {
            return Response {
                ok: true,
                status: Some(build_status(shared)),
                ..Response::default()
            }
        }
        Request::Log { module } => {
            return match resolve(shared, module.as_deref()) {
                Ok(handle) => {
                    let tail = handle.log.tail(None, None);
                    Response {
                        log_next: Some(tail.next),
                        ..Response::lines(true, tail.lines)
                    }
                }
                Err(e) => Response::error(e),
            }
        }
        Request::LogTail {
            module,
            last,
            after,
        } => {
            return match resolve(shared, module.as_deref()) {
                Ok(handle) => {
                    let tail = handle.log.tail(after, last);
                    Response {
                        log_next: Some(tail.next),
                        ..Response::lines(true, tail.lines)
                    }
                }
                Err(e) => Response::error(e),
            }
        }
        Request::Verify { module } => {
            let handle = match resolve(shared, module.as_deref()) {
                Ok(h) => h,
                Err(e) => return Response::error(e),
            };
            let (reply, answer) = oneshot::channel();
            if handle
                .commands
                .send(ModuleCommand::Verify(reply))
                .await
                .is_err()
            {
                return Response::error("the module is shutting down");
            }
            return match answer.await {
                Ok(Ok(lines)) => {
                    let differs = lines.iter().any(|l| l.starts_with("differs"));
                    Response {
                        kind: differs.then_some(ErrorKind::Differs),
                        ..Response::lines(true, lines)
                    }
                }
                Ok(Err(e)) => Response::error(e),
                Err(_) => Response::error("the module is shutting down"),
            };
        }
        Request::Reload => return super::reload::reload_file(shared).await,
        Request::ConfigApply { text } => return super::reload::apply_text(shared, &text).await,
        Request::ConfigText => return super::reload::config_text(shared).await,
        Request::Leave { until_boot, wait_s } => {
            return super::operations::leave(shared, until_boot, wait_s, &cause("leave")).await
        }
        Request::Join => return super::operations::join(shared, &cause("join")).await,
        Request::Maintenance { on, module } => {
            return super::operations::maintenance(shared, on, module.as_deref(), &cause("maintenance"))
                .await
        }
        Request::Start { module } => (Event::Start, module),
        Request::Stop { module } => (Event::Stop, module),
        Request::Swap {
            module,
            live: false,
        } => (Event::Swap, module),
        Request::Swap { module, live: true } => {
            return live_swap(shared, module.as_deref(), cause(command)).await
        }
        Request::Prim { module } => (Event::PrimForced, module),
        Request::Resync {
            compare: false,
            module: _,
        } => {
            return Response::error(
                "resync: only `--compare` is available (an incremental resync runs by itself whenever the SECOND is behind)",
            )
        }
        Request::Resync {
            module,
            compare: true,
        } => (Event::ResyncCompare, module),
        Request::Invalidate { module } => (Event::Invalidate, module),
    };
    let handle = match resolve(shared, module.as_deref()) {
        Ok(h) => h,
        Err(e) => return Response::error(e),
    };
    let (reply, lines) = oneshot::channel();
    if handle
        .commands
        .send(ModuleCommand::Caused(event, cause(command), reply))
        .await
        .is_err()
    {
        return Response::error("vmhad is shutting down");
    }
    match lines.await {
        Ok(lines) => match lines
            .iter()
            .find(|l| l.contains("refused") || l.contains("aborted"))
        {
            Some(refusal) => Response {
                error: Some(refusal.clone()),
                kind: Some(ErrorKind::Refused),
                ..Response::lines(false, lines)
            },
            None => Response::lines(true, lines),
        },
        Err(_) => Response::error("vmhad is shutting down"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Digest;
    use crate::generation::History;
    use crate::state::Announce;

    fn beat(role: Role, changed_bytes: u64) -> Arc<ModuleBeat> {
        Arc::new(ModuleBeat {
            name: "m01".into(),
            module_hash: Digest([7; 32]),
            announce: Announce::ready(role),
            history: History::empty(),
            changed_bytes,
            resync: None,
            keys: Default::default(),
        })
    }

    /// The module's task is woken (its view changes) by a round only when
    /// the module's beat or configuration match changed, or the peer comes
    /// back: an idle module's task sleeps through the peer's 5 rounds a
    /// second (issue 12, item 2).
    #[test]
    fn a_round_wakes_the_module_only_when_its_beat_changed() {
        fn round(
            tx: &watch::Sender<PeerView>,
            rx: &mut watch::Receiver<PeerView>,
            b: &Arc<ModuleBeat>,
            config_match: bool,
        ) -> bool {
            tx.send_if_modified(|v| see(v, b, config_match));
            let changed = rx.has_changed().unwrap_or(false);
            rx.borrow_and_update();
            changed
        }
        let (tx, mut rx) = watch::channel(PeerView::Unknown);
        let mut woken =
            |b: &Arc<ModuleBeat>, config_match: bool| round(&tx, &mut rx, b, config_match);
        let first = beat(Role::Second, 0);
        assert!(woken(&first, true), "the first beat");
        assert!(!woken(&first, true), "the same beat again (shared)");
        assert!(!woken(&beat(Role::Second, 0), true), "an equal copy");
        assert!(
            woken(&beat(Role::Second, 0), false),
            "the configuration match changed"
        );
        assert!(woken(&beat(Role::Prim, 0), false), "the role changed");
        assert!(
            woken(&beat(Role::Prim, 4096), false),
            "the peer's changed bytes"
        );
        tx.send_replace(PeerView::Lost);
        rx.borrow_and_update();
        assert!(
            round(&tx, &mut rx, &beat(Role::Prim, 4096), false),
            "seen again after lost"
        );
    }
}
