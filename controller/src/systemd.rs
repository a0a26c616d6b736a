//! vmhad as a `Type=notify` systemd service (`packaging/systemd/vmhad.service`).
//!
//! systemd learns three things from vmhad over `NOTIFY_SOCKET` (the sd_notify
//! protocol, through the `sd-notify` crate):
//! - `READY=1` once the daemon started: its control socket answers and every
//!   module got its start event, so `systemctl start vmhad` returns when
//!   `vmctl` works, and units ordered after vmhad start after that;
//! - `STATUS=` a one-line summary of the modules (`systemctl status vmhad`),
//!   sent with READY and again whenever it changes;
//! - `WATCHDOG=1` at half of `WatchdogSec` (`WATCHDOG_USEC`), and only after
//!   the daemon answered a `status` request of its own through the same
//!   dispatcher the control socket uses: a vmhad whose runtime is stuck stops
//!   feeding the watchdog and systemd restarts it (`KillMode=process`: its
//!   vmha-fs and QEMU keep running).
//!
//! Without `NOTIFY_SOCKET` (not run by systemd) nothing is sent.

use std::time::Duration;

use crate::control::Request;
use crate::daemon::Daemon;
use crate::status::Status;

/// How often the summary is checked for changes when no watchdog asks for
/// more often.
const STATUS_PERIOD: Duration = Duration::from_secs(5);

/// Whether a service manager listens (`NOTIFY_SOCKET` is set).
pub fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// The one-line summary systemd shows: each module's state here and on the
/// peer, e.g. `vm1: PRIM, node2 SECOND resync 42%; vm2: WAIT, node2 unreachable`.
pub fn summary(status: &Status) -> String {
    if status.modules.is_empty() {
        return format!("{}: no modules", status.node);
    }
    let modules: Vec<String> = status
        .modules
        .iter()
        .map(|m| {
            let mut parts = Vec::new();
            for (name, node) in &m.nodes {
                let state = match node.state {
                    Some(role) => role.to_string(),
                    None if name == &status.node => "?".to_string(),
                    None => "unreachable".to_string(),
                };
                let mut part = if name == &status.node {
                    state
                } else {
                    format!("{name} {state}")
                };
                if let Some(resync) = node.resync {
                    part.push_str(&format!(" resync {}%", resync.percent()));
                }
                // This node first.
                if name == &status.node {
                    parts.insert(0, part);
                } else {
                    parts.push(part);
                }
            }
            format!("{}: {}", m.name, parts.join(", "))
        })
        .collect();
    modules.join("; ")
}

fn send(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// `READY=1` with the first summary.
pub fn ready(status: &Status) {
    let line = summary(status);
    send(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&line),
    ]);
}

/// `STOPPING=1`: vmhad is ending (its modules keep running).
pub fn stopping() {
    send(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("stopping"),
    ]);
}

/// Feeds the watchdog and refreshes the summary while `daemon` answers; never
/// returns (run it next to the signal handlers). Pending forever when systemd
/// does not listen.
pub async fn keep_alive(daemon: &Daemon, mut last: String) {
    if !enabled() {
        return std::future::pending().await;
    }
    let watchdog = sd_notify::watchdog_enabled();
    let period = watchdog.map_or(STATUS_PERIOD, |w| (w / 2).min(STATUS_PERIOD));
    let period = period.max(Duration::from_millis(10));
    if let Some(w) = watchdog {
        tracing::info!(
            watchdog_ms = u64::try_from(w.as_millis()).unwrap_or(u64::MAX),
            "systemd watchdog on"
        );
    }
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stuck = false;
    loop {
        ticks.tick().await;
        match tokio::time::timeout(period, daemon.request(Request::Status)).await {
            Ok(response) => {
                if stuck {
                    tracing::info!("vmhad answers its status requests again");
                    stuck = false;
                }
                if let Some(status) = response.status {
                    let line = summary(&status);
                    if line != last {
                        send(&[sd_notify::NotifyState::Status(&line)]);
                        last = line;
                    }
                }
                if watchdog.is_some() {
                    send(&[sd_notify::NotifyState::Watchdog]);
                }
            }
            Err(_) => {
                if !stuck {
                    tracing::error!(
                        "vmhad did not answer its own status request: the systemd watchdog is not fed"
                    );
                    stuck = true;
                }
            }
        }
    }
}
