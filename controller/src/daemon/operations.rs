//! Node-wide operator requests: `leave` (also run at host shutdown), `join`
//! and `maintenance`. Each becomes one event per module for the state machine
//! ([`Event::Leave`], [`Event::Join`], [`Event::Maintenance`]), sent to every
//! module task at once so that modules hand over in parallel. What is
//! node-wide is persisted here: the leave (`crate::leave`, written before the
//! modules act, removed before they start again). Maintenance is per module
//! and persisted by the module task (`Action::SetMaintenance`).
//!
//! `leave` with a wait answers once every module is handed over: stopped
//! here, and the peer either runs it or has settled without it (not SECOND
//! any more: a SECOND that was not up to date goes WAIT), or is unreachable.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{ModuleCommand, ModuleHandle, Shared};
use crate::control::Response;
use crate::leave;
use crate::state::{Event, Readiness, Role};

/// Sends `event` to every handle at once and gathers their log lines.
async fn to_modules(
    handles: &[&ModuleHandle],
    event: &Event,
    cause: &str,
) -> Result<Vec<String>, String> {
    let mut waiting = Vec::new();
    for handle in handles {
        let (reply, answer) = oneshot::channel();
        handle
            .commands
            .send(ModuleCommand::Caused(
                event.clone(),
                cause.to_string(),
                reply,
            ))
            .await
            .map_err(|_| "vmhad is shutting down".to_string())?;
        waiting.push((handle.module.name.clone(), answer));
    }
    let mut lines = Vec::new();
    for (name, answer) in waiting {
        let got = answer
            .await
            .map_err(|_| "vmhad is shutting down".to_string())?;
        lines.extend(got.into_iter().map(|l| format!("{name}: {l}")));
    }
    Ok(lines)
}

fn state_dir(shared: &Shared) -> PathBuf {
    shared.config().cluster.state_dir.clone()
}

pub(super) async fn leave(
    shared: &Shared,
    until_boot: bool,
    wait_s: Option<u64>,
    cause: &str,
) -> Response {
    let dir = state_dir(shared);
    // Persisted first: a daemon restarted from here on keeps the node out.
    let saved = tokio::task::spawn_blocking(move || {
        let boot = if until_boot {
            Some(leave::current_boot_id()?)
        } else {
            None
        };
        leave::save(&dir, until_boot, boot.as_deref())
    })
    .await;
    let record = match saved {
        Ok(Ok(record)) => record,
        Ok(Err(e)) => return Response::error(format!("leave refused: {e}")),
        Err(e) => return Response::error(format!("leave refused: {e}")),
    };
    let how = match (&record.boot_id, until_boot) {
        (Some(_), _) => "until the next boot",
        (None, true) => "until `vmctl join` (an operator's leave was already recorded)",
        (None, false) => "until `vmctl join`",
    };
    tracing::warn!("this node leaves the cluster {how}");
    shared
        .factory
        .left
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let modules = shared.modules();
    let handles: Vec<&ModuleHandle> = modules.iter().map(|h| h.as_ref()).collect();
    let mut lines = vec![format!("this node leaves the cluster {how}")];
    match to_modules(&handles, &Event::Leave, cause).await {
        Ok(more) => lines.extend(more),
        Err(e) => return Response::error(e),
    }
    let Some(wait_s) = wait_s else {
        return Response::lines(true, lines);
    };
    let deadline = Instant::now() + Duration::from_secs(wait_s);
    let tick = Duration::from_millis(shared.config().cluster.heartbeat_interval_ms.max(10));
    loop {
        let (pending, done) = handed_over(shared);
        if pending.is_empty() {
            lines.extend(done);
            return Response::lines(true, lines);
        }
        if Instant::now() >= deadline {
            return Response {
                ok: false,
                error: Some(format!(
                    "leave: not every module was handed over within {wait_s} s: {} (the node stays out; `vmctl status` shows where they are)",
                    pending.join("; ")
                )),
                lines,
                ..Response::default()
            };
        }
        tokio::time::sleep(tick).await;
    }
}

/// (modules not handed over yet, a line per module handed over).
fn handed_over(shared: &Shared) -> (Vec<String>, Vec<String>) {
    let config = shared.config();
    let peer_name = &config.node(shared.node.peer()).name;
    let peer = shared.peer();
    let mut pending = Vec::new();
    let mut done = Vec::new();
    for handle in shared.modules() {
        let name = &handle.module.name;
        let role = handle.view.borrow().announce.role;
        if role != Role::Stop {
            pending.push(format!("{name} is still {role} here"));
            continue;
        }
        let beat = peer.modules.get(name).filter(|_| !peer.lost);
        // A writer announces its role once it is mounted, before `virsh
        // start` returns (readiness transient meanwhile): it runs the VM
        // only after that.
        match beat.map(|b| (b.announce.role, b.announce.readiness)) {
            None => done.push(format!(
                "{name}: stopped here; {peer_name} is not reachable: nobody runs it"
            )),
            Some((Role::Second, _)) => {
                pending.push(format!("{name}: {peer_name} is still SECOND"));
            }
            Some((r, Readiness::Transient)) if r.is_writer() => {
                pending.push(format!("{name}: {peer_name} is {r}, starting the VM"));
            }
            Some((r, _)) if r.is_writer() => {
                done.push(format!("{name}: handed over, {peer_name} runs it ({r})"))
            }
            Some((r, _)) => done.push(format!(
                "{name}: stopped here; {peer_name} is {r}: nobody runs it"
            )),
        }
    }
    (pending, done)
}

pub(super) async fn join(shared: &Shared, cause: &str) -> Response {
    let dir = state_dir(shared);
    match tokio::task::spawn_blocking(move || leave::remove(&dir)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Response::error(format!("join refused: {e}")),
        Err(e) => return Response::error(format!("join refused: {e}")),
    }
    tracing::info!("this node joins the cluster");
    shared
        .factory
        .left
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let modules = shared.modules();
    let handles: Vec<&ModuleHandle> = modules.iter().map(|h| h.as_ref()).collect();
    match to_modules(&handles, &Event::Join, cause).await {
        Ok(lines) => Response::lines(true, lines),
        Err(e) => Response::error(e),
    }
}

pub(super) async fn maintenance(
    shared: &Shared,
    on: bool,
    module: Option<&str>,
    cause: &str,
) -> Response {
    let modules: Vec<Arc<ModuleHandle>> = match module {
        Some(_) => match super::dispatch::resolve(shared, module) {
            Ok(h) => vec![h],
            Err(e) => return Response::error(e),
        },
        None => shared.modules(),
    };
    let handles: Vec<&ModuleHandle> = modules.iter().map(|h| h.as_ref()).collect();
    if handles.is_empty() {
        return Response::error("no module is configured");
    }
    match to_modules(&handles, &Event::Maintenance(on), cause).await {
        Ok(lines) => Response::lines(true, lines),
        Err(e) => Response::error(e),
    }
}
