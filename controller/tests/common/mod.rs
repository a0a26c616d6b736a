//! Helpers shared by the controller's integration tests.

// Each test crate includes this module and uses a part of it.
#![allow(dead_code)]

pub mod vmhad;

use std::time::{Duration, Instant};

use vmha_controller::control::Request;
use vmha_controller::daemon::Daemon;
use vmha_controller::state::Role;
use vmha_controller::status::Status;

/// Polls `daemon`'s status until `cond` holds; panics after `timeout` with the
/// status and the module's event log.
pub async fn wait_status(
    name: &str,
    daemon: &Daemon,
    what: &str,
    timeout: Duration,
    cond: impl Fn(&Status) -> bool,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let status = daemon.status();
        if cond(&status) {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "{name}: timed out waiting for {what}; status: {}\nlog:\n{}",
                serde_json::to_string_pretty(&status).unwrap(),
                daemon
                    .request(Request::Log { module: None })
                    .await
                    .lines
                    .join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `daemon` sees `node` in `role` (and ready, when asked).
pub async fn wait_role(
    name: &str,
    daemon: &Daemon,
    node: &str,
    role: Role,
    ready: bool,
    timeout: Duration,
) {
    let what = format!("{node} {role} ready={ready}");
    wait_status(name, daemon, &what, timeout, |s| {
        let n = &s.modules[0].nodes[node];
        n.state == Some(role) && (!ready || n.ready)
    })
    .await;
}
