//! Reading `vmctl status --json` of a simulated node, for the end-to-end tests.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::cluster_vm::VmCluster;

/// `vmctl status --json` on node `i`.
pub fn status(vc: &VmCluster, i: usize) -> Result<Value> {
    let text = vc.vmctl(i, &["status", "--json"])?;
    serde_json::from_str(&text).with_context(|| format!("parsing status: {text}"))
}

/// The module's entry for `node` in a status document.
pub fn entry<'a>(s: &'a Value, node: &str) -> &'a Value {
    &s["modules"][0]["nodes"][node]
}

/// The node's state (PRIM, SECOND, …), None when unreachable.
pub fn state<'a>(s: &'a Value, node: &str) -> Option<&'a str> {
    entry(s, node)["state"].as_str()
}

/// Whether the node is ready (green).
pub fn ready(s: &Value, node: &str) -> bool {
    entry(s, node)["readiness"].as_str() == Some("ready")
}

/// The node running the module, if any.
pub fn primary(s: &Value) -> Option<&str> {
    s["modules"][0]["primary"].as_str()
}

/// Polls `vmctl status --json` on node `i` until `pred` holds; on timeout the
/// error carries the last status and the diagnostics of both nodes.
pub fn wait_status(
    vc: &VmCluster,
    i: usize,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match status(vc, i) {
            Ok(s) if pred(&s) => return Ok(s),
            Ok(s) => s.to_string(),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() >= deadline {
            bail!(
                "timed out after {timeout:?} on {} waiting for {what}; last status: {last}\n{}",
                vc.node(i).name(),
                vc.diagnostics()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Adds the diagnostics of both nodes to an error.
pub fn diag<T>(vc: &VmCluster, r: Result<T>) -> Result<T> {
    r.map_err(|e| e.context(format!("diagnostics:\n{}", vc.diagnostics())))
}

/// Module `name`'s entry in a status document.
pub fn module<'a>(s: &'a Value, name: &str) -> Option<&'a Value> {
    s["modules"].as_array()?.iter().find(|m| m["name"] == name)
}

/// Module `name`'s state on `node` (PRIM, SECOND, …), None when unreachable
/// or not listed.
pub fn module_state<'a>(s: &'a Value, name: &str, node: &str) -> Option<&'a str> {
    module(s, name)?["nodes"][node]["state"].as_str()
}

/// Whether module `name` is ready (green) on `node`.
pub fn module_ready(s: &Value, name: &str, node: &str) -> bool {
    module(s, name).is_some_and(|m| m["nodes"][node]["readiness"].as_str() == Some("ready"))
}

/// The node running module `name`, if any.
pub fn module_primary<'a>(s: &'a Value, name: &str) -> Option<&'a str> {
    module(s, name)?["primary"].as_str()
}
