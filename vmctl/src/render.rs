//! The human form of `vmctl status` (and of each `--watch` frame): a header
//! with the split-brain policy and the witness, then one row per module and
//! node. Pure functions of the status (and of whether to colour), so the
//! output is tested without a terminal.

use std::time::Duration;

use vmha_controller::state::{Colour, Disk, WitnessOutcome};
use vmha_controller::status::{NodeStatus, ResyncStatus, Status};

/// ANSI colours, used only on a terminal (and without `NO_COLOR`).
const GREEN: &str = "\x1b[32m";
const ORANGE: &str = "\x1b[33m";
const RED: &str = "\x1b[31m";
const BOLD: &str = "\x1b[1m";
const RESET: &str = "\x1b[0m";

/// `n` bytes in IEC units with one decimal ("1.5 GiB").
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A duration for people, to the second ("1h 2m 5s"), "0s" below a second.
pub fn age(ms: u64) -> String {
    let secs = ms / 1000;
    if secs == 0 {
        return "0s".into();
    }
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

/// "37% 1.2 GiB/3.2 GiB 110.0 MiB/s eta 18s".
pub fn resync(r: &ResyncStatus) -> String {
    let mut out = format!(
        "{}% {}/{}",
        r.percent(),
        bytes(r.done_bytes),
        bytes(r.total_bytes)
    );
    if r.rate_bytes_per_s > 0 {
        out.push_str(&format!(" {}/s", bytes(r.rate_bytes_per_s)));
    }
    match r.eta_s {
        Some(eta) => out.push_str(&format!(" eta {}", age(eta.saturating_mul(1000)))),
        None => out.push_str(" eta ?"),
    }
    out
}

fn word<T: serde::Serialize>(value: T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn state_cell(node: &NodeStatus) -> String {
    match (node.state, node.last_known_state.flatten()) {
        (Some(state), _) => state.to_string(),
        (None, Some(last)) => format!("? (was {last})"),
        (None, None) => "?".to_string(),
    }
}

fn readiness_cell(node: &NodeStatus) -> String {
    if node.reachable || node.state.is_some() {
        let readiness = node.readiness.map(word).unwrap_or_else(|| "-".to_string());
        // A live swap in progress shows its phase.
        match node.swap_phase {
            Some(phase) => format!("{readiness} (live swap: {phase})"),
            None => readiness,
        }
    } else if node.data_path == Some(Some(vmha_controller::status::DataPath::Alive)) {
        // Its vmhad is down, its vmha-fs and VM run on: not failed over.
        "controller down, data path alive".to_string()
    } else {
        "unreachable".to_string()
    }
}

fn heartbeats(node: &NodeStatus) -> String {
    match &node.heartbeats {
        None => String::new(),
        Some(map) => map
            .iter()
            .map(|(addr, age)| match age {
                Some(ms) => format!("{addr} {ms}ms"),
                None => format!("{addr} never"),
            })
            .collect::<Vec<_>>()
            .join(", "),
    }
}

fn paint(text: &str, code: Option<&str>, colour: bool) -> String {
    match code {
        Some(code) if colour => format!("{code}{text}{RESET}"),
        _ => text.to_string(),
    }
}

/// The header: this node, the split-brain policy, the witness.
fn header(status: &Status, colour: bool, warnings: &mut Vec<String>) -> String {
    let mut out = format!(
        "node {} (this node)",
        paint(&status.node, Some(BOLD), colour)
    );
    if let Some(policy) = &status.split_brain {
        out.push_str(&format!("   split brain: {policy}"));
    }
    out.push('\n');
    match &status.witness {
        None => out.push_str("witness: none\n"),
        Some(w) => {
            let (last, code) = match (w.last_probe, w.last_probe_ms) {
                (Some(outcome), Some(ms)) => {
                    let (word, code) = match outcome {
                        WitnessOutcome::Reachable => ("reachable", GREEN),
                        WitnessOutcome::Unreachable => ("unreachable", RED),
                        WitnessOutcome::CouldNotProbe => ("could not be probed", RED),
                    };
                    (format!("{word} ({} ago)", age(ms)), Some(code))
                }
                _ => ("not probed yet".to_string(), None),
            };
            out.push_str(&format!(
                "witness {}: {}\n",
                w.addresses.join(", "),
                paint(&last, code, colour)
            ));
            for e in &w.errors {
                warnings.push(format!(
                    "error: witness {e} (a failover waits until it can be probed)"
                ));
            }
        }
    }
    out
}

/// The whole status for people; `colour` adds ANSI colours.
pub fn render(status: &Status, colour: bool) -> String {
    let mut warnings = Vec::new();
    let mut out = header(status, colour, &mut warnings);
    const COLUMNS: usize = 9;
    let head = [
        "MODULE",
        "NODE",
        "STATE",
        "READINESS",
        "SINCE",
        "COLOUR",
        "GENERATION",
        "RESYNC",
        "HEARTBEATS",
    ];
    let mut rows: Vec<([String; COLUMNS], Option<&str>)> = vec![(head.map(str::to_string), None)];
    let mut banners: Vec<String> = Vec::new();
    for module in &status.modules {
        for (i, (name, node)) in module.nodes.iter().enumerate() {
            let marker = if module.primary.as_deref() == Some(name) {
                " *"
            } else {
                ""
            };
            let code = match node.colour {
                Some(Colour::Green) => Some(GREEN),
                Some(Colour::Orange) => Some(ORANGE),
                Some(Colour::Red) => Some(RED),
                None => None,
            };
            rows.push((
                [
                    if i == 0 {
                        module.name.clone()
                    } else {
                        String::new()
                    },
                    format!("{name}{marker}"),
                    {
                        let mut state = state_cell(node);
                        if node.maintenance {
                            state.push_str(" MAINT");
                        }
                        if node.left {
                            state.push_str(" LEFT");
                        }
                        state
                    },
                    readiness_cell(node),
                    node.since_ms.map(age).unwrap_or_else(|| "-".to_string()),
                    node.colour.map(word).unwrap_or_else(|| "-".to_string()),
                    node.generation
                        .as_deref()
                        .map(|g| g.get(..8).unwrap_or(g).to_string())
                        .unwrap_or_else(|| "-".to_string()),
                    node.resync
                        .as_ref()
                        .map(resync)
                        .unwrap_or_else(|| "-".to_string()),
                    heartbeats(node),
                ],
                code,
            ));
            if node.maintenance {
                banners.push(format!(
                    "!!! MAINTENANCE: module {} on {name}: no failover, no restart, no checker reaction on either node (`vmctl maintenance off` on {name})",
                    module.name
                ));
            }
            if node.left {
                banners.push(format!(
                    "!!! {name} LEFT the cluster: it runs no module until `vmctl join` there"
                ));
            }
            if node.disk == Some(Disk::Failed) {
                warnings.push(format!(
                    "warning: {name}'s disk failed (module {}): it waits; after the repair run `vmctl start` there",
                    module.name
                ));
            }
            if node.config_match.flatten() == Some(false) {
                warnings.push(format!(
                    "warning: the configuration differs from {name}'s (module {}: {})",
                    module.name,
                    if node.module_config_match.flatten() == Some(false) {
                        "differs, automatic failover blocked"
                    } else {
                        "same"
                    }
                ));
            }
        }
    }
    // Loud, first: the operator must not miss that the controller is held.
    banners.dedup();
    for b in &banners {
        out.push_str(&paint(b, Some(RED), colour));
        out.push('\n');
    }
    let widths: Vec<usize> = (0..COLUMNS)
        .map(|c| rows.iter().map(|r| r.0[c].len()).max().unwrap_or(0))
        .collect();
    for (row, code) in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (text, w))| {
                let padded = format!("{text:<w$}");
                // State, readiness and colour carry the node's colour.
                if (2..=5).contains(&c) && c != 4 {
                    paint(&padded, *code, colour)
                } else {
                    padded
                }
            })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    if status.modules.is_empty() {
        out.push_str("(no module configured)\n");
    }
    out.push_str("* = runs the VM\n");
    if !status.config_differences.is_empty() {
        warnings.push(format!(
            "warning: configuration keys that differ from the peer's: {}",
            status.config_differences.join(", ")
        ));
    }
    warnings.dedup();
    for w in warnings {
        out.push_str(&paint(&w, Some(RED), colour));
        out.push('\n');
    }
    out
}

/// One `--watch` frame: on a terminal the screen is cleared first so the
/// frame replaces the previous one; elsewhere frames follow each other.
pub fn watch_frame(status: &Status, terminal: bool, now: &str) -> String {
    let body = render(status, terminal);
    if terminal {
        format!("\x1b[H\x1b[2J{now}  (vmctl status --watch, Ctrl-C ends)\n{body}")
    } else {
        format!("{now}\n{body}\n")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::collections::BTreeMap;
    use vmha_controller::state::{Readiness, Role};
    use vmha_controller::status::{ModuleStatus, WitnessStatus};

    fn node(role: Role, readiness: Readiness, colour: Colour) -> NodeStatus {
        NodeStatus {
            reachable: true,
            state: Some(role),
            ready: readiness == Readiness::Ready,
            readiness: Some(readiness),
            colour: Some(colour),
            disk: Some(Disk::Ok),
            maintenance: false,
            left: false,
            swap_phase: None,
            generation: Some("0123456789abcdef0123456789abcdef".into()),
            resync: None,
            since_ms: Some(192_000),
            last_seen_ms: None,
            heartbeats: None,
            last_known_state: None,
            config_match: None,
            module_config_match: None,
            controller: None,
            data_path: None,
        }
    }

    fn status() -> Status {
        let mut second = node(Role::Second, Readiness::NotUpToDate, Colour::Orange);
        second.resync = Some(ResyncStatus {
            done_bytes: 3 << 30,
            total_bytes: 8 << 30,
            rate_bytes_per_s: 100 << 20,
            eta_s: Some(3725),
        });
        second.since_ms = Some(4_000);
        Status {
            node: "node1".into(),
            config_hash: "h".into(),
            heartbeats_rejected: BTreeMap::new(),
            protocols: None,
            modules: vec![ModuleStatus {
                name: "vm1".into(),
                domain: "vm1".into(),
                primary: Some("node1".into()),
                nodes: BTreeMap::from([
                    (
                        "node1".to_string(),
                        node(Role::Prim, Readiness::Ready, Colour::Green),
                    ),
                    ("node2".to_string(), second),
                ]),
            }],
            split_brain: Some("discard-least-changes".into()),
            config_differences: vec![],
            witness: Some(WitnessStatus {
                addresses: vec!["10.0.0.9".into()],
                last_probe: Some(WitnessOutcome::Reachable),
                last_probe_ms: Some(2_500),
                errors: vec![],
            }),
        }
    }

    #[test]
    fn header_since_and_resync_for_people() {
        let text = render(&status(), false);
        assert!(
            text.starts_with("node node1 (this node)   split brain: discard-least-changes\n"),
            "{text}"
        );
        assert!(
            text.contains("witness 10.0.0.9: reachable (2s ago)"),
            "{text}"
        );
        assert!(text.contains("3m 12s"), "{text}");
        assert!(
            text.contains("37% 3.0 GiB/8.0 GiB 100.0 MiB/s eta 1h 2m 5s"),
            "{text}"
        );
        assert!(!text.contains('\x1b'), "{text}");
    }

    #[test]
    fn colour_only_when_asked_and_frames() {
        let text = render(&status(), true);
        assert!(text.contains(GREEN) && text.contains(ORANGE), "{text}");
        let frame = watch_frame(&status(), true, "2026-01-01T00:00:00Z");
        assert!(frame.starts_with("\x1b[H\x1b[2J"));
        let plain = watch_frame(&status(), false, "2026-01-01T00:00:00Z");
        assert!(!plain.contains('\x1b'));
        assert!(plain.starts_with("2026-01-01T00:00:00Z\nnode node1"));
    }

    #[test]
    fn units() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(age(999), "0s");
        assert_eq!(age(61_000), "1m 1s");
    }
}
