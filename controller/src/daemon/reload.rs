//! Live configuration (`vmctl reload`, SIGHUP, and the peer side of `vmctl
//! config push`): the file vmhad was started with is read again, checked
//! whole, compared with the configuration in effect, and applied only when
//! nothing in it is refused — a reload with errors changes nothing and names
//! every reason.
//!
//! What a reload does:
//! - a module that appears gets its task (STOP: it starts on `vmctl start`;
//!   its domain or XML need not exist yet, they are needed only at start);
//! - a module that disappears must be STOP on this node; its task ends;
//! - a module whose settings changed (its section, or the live cluster keys:
//!   heartbeat interval, failover timeout, start wait, witnesses, split-brain
//!   policy) gets them while its task, vmha-fs and VM keep running; what
//!   vmha-fs was started with (`lock_timeout_ms`, `rate_limit_mb_s`, `resync_streams`, `protocol`,
//!   `local_writes`) applies
//!   at its next start. The keys that say *what* is run (`domain`,
//!   `libvirt_uri`, `replicated`, `port`, `replication_network`) change only
//!   while the module is STOP here;
//! - a module whose settings did not change is not touched (no message, no
//!   event);
//! - cluster keys that cannot change in a running daemon (`name`,
//!   `key_file`, `state_dir`, `control_socket`, `heartbeat_port`, the nodes)
//!   are refused with a message saying a restart is needed.
//!
//! The heartbeat sender and the dispatcher read the configuration each
//! round, so they use the new module list and timing from the next one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::oneshot;

use super::runner::Settings;
use super::{ModuleCommand, ModuleHandle, Shared};
use crate::config::{check_text, differing_keys, Config, Module};
use crate::control::Response;
use crate::state::Role;

/// What a checked reload will do.
struct Plan {
    config: Config,
    added: Vec<Module>,
    removed: Vec<String>,
    /// Modules whose settings change, with the keys that changed.
    changed: Vec<(Module, Vec<String>)>,
    /// Live cluster keys that changed (for the answer).
    cluster_keys: Vec<String>,
}

/// The keys of a module that say what is run: they change only while STOP.
const STRUCTURAL: [&str; 5] = [
    "domain",
    "libvirt_uri",
    "replicated",
    "port",
    "replication_network",
];

/// Cluster keys a running daemon cannot take (its sockets, files, identity).
const RESTART_KEYS: [&str; 5] = [
    "cluster.name",
    "cluster.key_file",
    "cluster.state_dir",
    "cluster.control_socket",
    "cluster.heartbeat_port",
];

fn config_path(shared: &Shared) -> Option<PathBuf> {
    shared
        .config_path
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
}

fn refused(mut reasons: Vec<String>) -> Response {
    reasons.insert(0, "reload refused, nothing changed:".to_string());
    Response {
        ok: false,
        error: Some(reasons.join("\n  ")),
        lines: reasons,
        ..Response::default()
    }
}

/// `reload`: re-reads the file vmhad was started with and applies it.
pub(super) async fn reload_file(shared: &Shared) -> Response {
    let Some(path) = config_path(shared) else {
        return Response::error(
            "vmhad was not started from a configuration file: nothing to reload",
        );
    };
    let _one = shared.reloading.lock().await;
    let source = path.clone();
    let text = match tokio::task::spawn_blocking(move || std::fs::read_to_string(source)).await {
        Ok(Ok(text)) => text,
        Ok(Err(e)) => return refused(vec![format!("cannot read {}: {e}", path.display())]),
        Err(e) => return refused(vec![format!("cannot read {}: {e}", path.display())]),
    };
    let warnings = unknown_key_warnings(&path, &text);
    match plan(shared, &text, &path) {
        Err(reasons) => refused(warnings.into_iter().chain(reasons).collect()),
        Ok(plan) => with_warnings(warnings, apply(shared, plan).await),
    }
}

/// Keys this release does not know: ignored, each named with its place.
fn unknown_key_warnings(path: &Path, text: &str) -> Vec<String> {
    crate::config::unknown_keys(text)
        .into_iter()
        .map(|u| format!("warning: {}:{u}", path.display()))
        .collect()
}

fn with_warnings(warnings: Vec<String>, mut response: Response) -> Response {
    if !warnings.is_empty() {
        response.lines.splice(0..0, warnings);
    }
    response
}

/// The peer side of `vmctl config push`: `text` becomes this node's
/// configuration file (written atomically over the file vmhad was started
/// with) and is applied, only if the reload it makes is accepted; otherwise
/// the file is untouched and the answer says why.
pub(super) async fn apply_text(shared: &Shared, text: &str) -> Response {
    let Some(path) = config_path(shared) else {
        return Response::error(
            "vmhad was not started from a configuration file: cannot write one",
        );
    };
    let _one = shared.reloading.lock().await;
    let warnings = unknown_key_warnings(&path, text);
    let plan = match plan(shared, text, &path) {
        Err(reasons) => return refused(warnings.into_iter().chain(reasons).collect()),
        Ok(plan) => plan,
    };
    let (target, content) = (path.clone(), text.as_bytes().to_vec());
    let written =
        tokio::task::spawn_blocking(move || vmha_fs::atomic::write_keeping_mode(&target, &content))
            .await;
    match written {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return refused(vec![format!("cannot write {}: {e}", path.display())]),
        Err(e) => return refused(vec![format!("cannot write {}: {e}", path.display())]),
    }
    with_warnings(warnings, apply(shared, plan).await)
}

/// `config-text`: the file vmhad was started with, as it is now.
pub(super) async fn config_text(shared: &Shared) -> Response {
    let Some(path) = config_path(shared) else {
        return Response::error("vmhad was not started from a configuration file");
    };
    let source = path.clone();
    match tokio::task::spawn_blocking(move || std::fs::read_to_string(source)).await {
        Ok(Ok(text)) => Response {
            ok: true,
            text: Some(text),
            ..Response::default()
        },
        Ok(Err(e)) => Response::error(format!("cannot read {}: {e}", path.display())),
        Err(e) => Response::error(format!("cannot read {}: {e}", path.display())),
    }
}

/// Checks `text` against the configuration in effect: every reason it cannot
/// be applied, or what applying it does.
fn plan(shared: &Shared, text: &str, path: &Path) -> Result<Plan, Vec<String>> {
    let file = path.display().to_string();
    let new = check_text(text).map_err(|problems| {
        problems
            .iter()
            .map(|p| p.render(&file, text))
            .collect::<Vec<_>>()
    })?;
    let old = shared.config();
    let mut reasons = Vec::new();

    let cluster_changes = differing_keys("", old.cluster_key_digests(), new.cluster_key_digests());
    let (a, b) = (&old.cluster, &new.cluster);
    let local_changes = [
        ("cluster.key_file", a.key_file != b.key_file),
        ("cluster.state_dir", a.state_dir != b.state_dir),
        (
            "cluster.control_socket",
            a.control_socket != b.control_socket,
        ),
    ];
    let restart = cluster_changes
        .iter()
        .map(String::as_str)
        .filter(|k| RESTART_KEYS.contains(k) || k.starts_with("node["))
        .chain(local_changes.iter().filter(|(_, c)| *c).map(|(k, _)| *k));
    for key in restart {
        reasons.push(format!(
            "{key} changed: it cannot change in a running vmhad, restart vmhad to use it"
        ));
    }
    let modules = shared.modules();
    let role_of = |name: &str| -> Option<Role> {
        modules
            .iter()
            .find(|h| h.module.name == name)
            .map(|h| h.view.borrow().announce.role)
    };
    let mut removed = Vec::new();
    for module in &old.modules {
        if new.module(&module.name).is_some() {
            continue;
        }
        match role_of(&module.name) {
            Some(Role::Stop) | None => removed.push(module.name.clone()),
            Some(role) => reasons.push(format!(
                "module `{0}` is {role} on this node: stop it (`vmctl stop {0}`) before removing it from the configuration",
                module.name
            )),
        }
    }
    let mut added = Vec::new();
    let mut changed = Vec::new();
    for module in &new.modules {
        let Some(before) = old.module(&module.name) else {
            added.push(module.clone());
            continue;
        };
        let keys = differing_keys(
            "",
            old.module_key_digests(&module.name)
                .unwrap_or(&Default::default()),
            new.module_key_digests(&module.name)
                .unwrap_or(&Default::default()),
        );
        let role = role_of(&module.name).unwrap_or(Role::Stop);
        if role != Role::Stop {
            for key in keys.iter().filter(|k| STRUCTURAL.contains(&k.as_str())) {
                reasons.push(format!(
                    "modules.{0}.{key} changed while module `{0}` is {role} on this node: stop it (`vmctl stop {0}`) first",
                    module.name
                ));
            }
        }
        let settings_changed = Settings::of(&old, before, shared.node)
            != Settings::of(&new, module, shared.node)
            || old.module_hash(&module.name) != new.module_hash(&module.name);
        if settings_changed {
            let mut all: Vec<String> = keys;
            all.extend(cluster_changes.iter().cloned());
            changed.push((module.clone(), all));
        }
    }
    if !reasons.is_empty() {
        return Err(reasons);
    }
    Ok(Plan {
        config: new,
        added,
        removed,
        changed,
        cluster_keys: cluster_changes,
    })
}

/// Applies a checked plan. New modules are built first: if one cannot be
/// (its metadata does not load), nothing has changed yet.
async fn apply(shared: &Shared, plan: Plan) -> Response {
    let Plan {
        config,
        added,
        removed,
        changed,
        cluster_keys,
    } = plan;
    let mut built = Vec::new();
    for module in &added {
        match shared
            .factory
            .build(&config, module, shared.node, true)
            .await
        {
            Ok(parts) => built.push(parts),
            Err(e) => return refused(vec![e.to_string()]),
        }
    }
    let mut lines = Vec::new();
    let old_handles = shared.modules();
    let mut replaced: Vec<Arc<ModuleHandle>> = Vec::new();
    for (module, keys) in &changed {
        let Some(old) = old_handles.iter().find(|h| h.module.name == module.name) else {
            continue;
        };
        let (reply, done) = oneshot::channel();
        let settings = Box::new(Settings::of(&config, module, shared.node));
        if old
            .commands
            .send(ModuleCommand::Reconfigure(settings, reply))
            .await
            .is_ok()
        {
            let _ = done.await;
        }
        let line = format!("configuration reloaded: {} changed", keys.join(", "));
        if let Err(e) = old.log.append(&format!("[configuration reload] {line}")) {
            tracing::warn!("event log: {e}");
        }
        lines.push(format!("{}: {}", module.name, line));
        replaced.push(Arc::new(ModuleHandle {
            module: module.clone(),
            module_hash: config.module_hash(&module.name),
            keys: config
                .module_key_digests(&module.name)
                .cloned()
                .unwrap_or_default(),
            commands: old.commands.clone(),
            view: old.view.clone(),
            peer: Arc::clone(&old.peer),
            heard: Arc::clone(&old.heard),
            log: Arc::clone(&old.log),
            counters: Arc::clone(&old.counters),
        }));
    }
    let mut fresh = Vec::new();
    for (runner, commands, handle) in built {
        let line = "added by a configuration reload (STOP until `vmctl start`)".to_string();
        if let Err(e) = handle.log.append(&format!("[configuration reload] {line}")) {
            tracing::warn!("event log: {e}");
        }
        lines.push(format!("{}: {line}", handle.module.name));
        fresh.push((runner, commands, Arc::new(handle)));
    }
    for name in &removed {
        if let Some(old) = old_handles.iter().find(|h| &h.module.name == name) {
            if let Err(e) = old
                .log
                .append("[configuration reload] removed from the configuration by a reload")
            {
                tracing::warn!("event log: {e}");
            }
        }
        lines.push(format!("{name}: removed"));
    }
    if !cluster_keys.is_empty() {
        lines.push(format!("cluster: {} changed", cluster_keys.join(", ")));
    }

    // The new module list, in the file's order.
    let list: Vec<Arc<ModuleHandle>> = config
        .modules
        .iter()
        .filter_map(|m| {
            replaced
                .iter()
                .chain(fresh.iter().map(|(_, _, h)| h))
                .chain(old_handles.iter())
                .find(|h| h.module.name == m.name)
                .cloned()
        })
        .collect();
    *shared.config.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
    *shared.modules.write().unwrap_or_else(|p| p.into_inner()) = list;
    {
        let mut tasks = shared
            .module_tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for name in &removed {
            // STOP here: nothing runs for it, its task only waits.
            if let Some(task) = tasks.remove(name) {
                task.abort();
            }
        }
        for (runner, commands, handle) in fresh {
            tasks.insert(
                handle.module.name.clone(),
                shared.factory.spawn(runner, commands),
            );
        }
    }
    {
        let mut peer = shared.peer();
        for name in &removed {
            peer.differences_logged.remove(name);
        }
    }
    if lines.is_empty() {
        lines.push("configuration reloaded: no change".to_string());
    }
    for line in &lines {
        tracing::info!("reload: {line}");
    }
    Response::lines(true, lines)
}
