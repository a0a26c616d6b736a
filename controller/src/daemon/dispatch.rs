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
use crate::control::{Call, Request, Response};
use crate::heartbeat::{Endpoint, ModuleBeat, Payload, Received};
use crate::state::Event;

// ---- heartbeats ----

pub(super) async fn send_heartbeats(
    shared: Arc<Shared>,
    endpoint: Endpoint,
    mut shutdown: watch::Receiver<bool>,
) {
    let interval = Duration::from_millis(shared.config.cluster.heartbeat_interval_ms.max(1));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let session = endpoint.session();
    let node = shared.config.node(shared.node).name.clone();
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
        round += 1;
        let modules = shared
            .modules
            .iter()
            .filter_map(|h| {
                let view = h.view.borrow();
                Some(ModuleBeat {
                    name: h.module.name.clone(),
                    module_hash: h.module_hash?,
                    announce: view.announce,
                    history: view.history.clone(),
                    changed_bytes: view.changed_bytes,
                    resync: view.resync,
                })
            })
            .collect();
        let payload = Payload {
            node: node.clone(),
            session,
            round,
            config_hash: shared.config.hash(),
            modules,
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
    let cluster = &shared.config.cluster;
    let timeout = Duration::from_millis(cluster.failover_timeout_ms);
    let tick = Duration::from_millis((cluster.heartbeat_interval_ms / 2).max(5));
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
                rejections.tick();
                let now = Instant::now();
                if now.saturating_duration_since(last_tick) > timeout / 2 {
                    tracing::warn!(
                        stalled_ms = now.saturating_duration_since(last_tick).as_millis() as u64,
                        "this daemon was stalled; judging the peer from now on"
                    );
                    observing_since = now;
                    *judging_since.lock().unwrap_or_else(|p| p.into_inner()) = now;
                }
                last_tick = now;
                let lost_now = {
                    let mut peer = shared.peer();
                    let silent = peer.networks.all_silent_for(now, timeout)
                        && now.saturating_duration_since(observing_since) >= timeout;
                    let newly = silent && !peer.lost;
                    if newly {
                        peer.lost = true;
                    }
                    newly
                };
                if lost_now {
                    tracing::warn!("peer lost: every network silent for {} ms", timeout.as_millis());
                    for handle in &shared.modules {
                        handle.peer.send_replace(PeerView::Lost);
                    }
                }
            }
        }
    }
}

pub(super) fn on_beat(shared: &Shared, received: Received) {
    let payload = received.payload;
    let fresh = {
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
        let fresh = match peer.last_round {
            Some((session, round)) => session != payload.session || payload.round > round,
            None => true,
        };
        if fresh {
            peer.last_round = Some((payload.session, payload.round));
            for beat in &payload.modules {
                peer.modules.insert(beat.name.clone(), beat.clone());
            }
        }
        fresh
    };
    if !fresh {
        return;
    }
    for handle in &shared.modules {
        if let Some(beat) = payload
            .modules
            .iter()
            .find(|b| b.name == handle.module.name)
        {
            let config_match = handle.module_hash == Some(beat.module_hash);
            handle.peer.send_replace(PeerView::Seen {
                beat: Box::new(beat.clone()),
                config_match,
            });
        }
    }
}

// ---- control requests ----

pub(super) async fn serve_calls(shared: Arc<Shared>, mut calls: mpsc::Receiver<Call>) {
    while let Some(call) = calls.recv().await {
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let response = answer(&shared, call.request).await;
            let _ = call.reply.send(response);
        });
    }
}

pub(super) fn resolve<'a>(
    shared: &'a Shared,
    module: Option<&str>,
) -> Result<&'a ModuleHandle, String> {
    let names = || {
        shared
            .modules
            .iter()
            .map(|h| h.module.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match module {
        Some(name) => shared
            .modules
            .iter()
            .find(|h| h.module.name == name)
            .ok_or_else(|| format!("unknown module `{name}` (modules: {})", names())),
        None => match shared.modules.as_slice() {
            [only] => Ok(only),
            [] => Err("no module is configured".to_string()),
            _ => Err(format!(
                "several modules are configured ({}): name one",
                names()
            )),
        },
    }
}

pub(super) async fn answer(shared: &Shared, request: Request) -> Response {
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
                Ok(handle) => Response::lines(true, handle.log.lines()),
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
                Ok(Ok(lines)) => Response::lines(true, lines),
                Ok(Err(e)) => Response::error(e),
                Err(_) => Response::error("the module is shutting down"),
            };
        }
        Request::Start { module } => (Event::Start, module),
        Request::Stop { module } => (Event::Stop, module),
        Request::Swap { module } => (Event::Swap, module),
        Request::Prim { module } => (Event::PrimForced, module),
    };
    let handle = match resolve(shared, module.as_deref()) {
        Ok(h) => h,
        Err(e) => return Response::error(e),
    };
    let (reply, lines) = oneshot::channel();
    if handle
        .commands
        .send(ModuleCommand::Event(event, reply))
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
                ok: false,
                error: Some(refusal.clone()),
                lines,
                status: None,
            },
            None => Response::lines(true, lines),
        },
        Err(_) => Response::error("vmhad is shutting down"),
    }
}
