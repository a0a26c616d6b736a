//! The shape of `vmctl status --json` (design, "Interfaces"), shared by the
//! daemon that builds it and `vmctl` that prints it.
//!
//! Additions to the design's example (choices where it is silent):
//! - `config_hash` at the top level (this node's [`crate::config::Config::hash`]);
//! - `heartbeats_rejected` at the top level: rejected heartbeat datagrams by
//!   kind since the daemon started (`{}` when none);
//! - per peer node `config_match`: whether the peer's whole-configuration hash
//!   equals ours (`null` until the peer has been heard), and per module node
//!   `module_config_match` for that module's hash;
//! - an unreachable peer keeps `generation` (last known), `last_seen_ms`
//!   (`null` if never heard since this daemon started) and `heartbeats`
//!   (`null` per address never heard); its `ready` is false and `readiness` /
//!   `colour` are null;
//! - `witness` at the top level, present only when witnesses are configured:
//!   `addresses`, the latest probe's outcome `last_probe` (`"reachable"`,
//!   `"unreachable"` or `"could_not_probe"`, `null` before the first probe),
//!   `last_probe_ms` (its age) and `errors` (`"WITNESS: error"` per witness
//!   that could not be probed: a failover waits until it can be).
//! - per node `disk` (`ok`, `failed`, `diskless`), carried in heartbeats.
//! - per node `since_ms`: how long it has been in its present state (this
//!   node: since its state machine entered it; the peer: since this daemon
//!   saw its heartbeats announce it; `null` while unknown).
//! - `split_brain` at the top level: the configured policy as written in the
//!   file (`"discard-least-changes"`, `"manual"`, `"prefer:NODE"`).
//! - `ready` is true only for a copy known current, in every state: a STOP
//!   node without data or behind its peer is `not_uptodate` too.
//! - `config_differences` at the top level: the configuration keys whose
//!   values differ between this node and the peer (its latest heartbeat), as
//!   `cluster.KEY`, `node[I].KEY`, `modules.NAME.KEY`, or `modules.NAME` for
//!   a module only one node has; `[]` when equal or the peer was never heard.
//! - per node `maintenance` (`vmctl maintenance on`: no automatic reaction
//!   for the module, on either node) and `left` (`vmctl leave`: the node runs
//!   nothing until `vmctl join`), carried in heartbeats; an unreachable
//!   peer's are its last known (false if never heard).
//! - per peer node `controller`: `"up"` while its heartbeats arrive, `"down"`
//!   otherwise; and `data_path`: `"alive"` while its controller is down but the
//!   module's replication link still carries its frames or pings (its vmha-fs
//!   and VM run on: it is not failed over), `"down"` when the controller is
//!   down and the link is not known alive, `null` while the controller is up.
//! - `protocols` at the top level: per protocol between the nodes
//!   (`replication`, `heartbeat`, `channel`) the range this node advertises
//!   (`"ours": "5..=7"`); for heartbeats also the peer's range once heard
//!   (`"peer"`, else `null`), the version in use (`"in_use"`) and the peer's
//!   vmhad version (`"peer_software"`, heartbeat version 3 on).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::state::{Colour, Disk, Readiness, Role, WitnessOutcome};

/// The whole answer of `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The local node's name.
    pub node: String,
    pub config_hash: String,
    /// Heartbeat datagrams this daemon rejected since it started, by kind
    /// (`forged`, `replayed`, `unproven`, …; see `heartbeat::Rejection`).
    #[serde(default)]
    pub heartbeats_rejected: BTreeMap<String, u64>,
    pub modules: Vec<ModuleStatus>,
    /// The split-brain policy, as configured.
    #[serde(default)]
    pub split_brain: Option<String>,
    /// Configuration keys that differ from the peer's (see the module docs).
    #[serde(default)]
    pub config_differences: Vec<String>,
    /// The split-brain witness, when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub witness: Option<WitnessStatus>,
    /// Protocol versions between the nodes (absent from older daemons).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocols: Option<Protocols>,
}

/// The protocol versions a node advertises and uses (rolling upgrades).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Protocols {
    pub replication: ProtocolStatus,
    pub heartbeat: ProtocolStatus,
    pub channel: ProtocolStatus,
}

/// One protocol: ranges as `MIN..=MAX` (or one number).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtocolStatus {
    pub ours: String,
    /// The peer's range, when this node knows it.
    #[serde(default)]
    pub peer: Option<String>,
    /// The version this node sends in now, when known.
    #[serde(default)]
    pub in_use: Option<u16>,
    /// The peer's software version, when it said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_software: Option<String>,
}

impl ProtocolStatus {
    /// Only this node's range known.
    pub fn ours(versions: vmha_fs::version::Versions) -> ProtocolStatus {
        ProtocolStatus {
            ours: versions.to_string(),
            peer: None,
            in_use: None,
            peer_software: None,
        }
    }
}

/// The witnesses and what this node's latest probe of them found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WitnessStatus {
    /// As configured (`IP` or `IP:PORT`).
    pub addresses: Vec<String>,
    /// `null` before the first probe.
    pub last_probe: Option<WitnessOutcome>,
    /// Milliseconds since that probe.
    pub last_probe_ms: Option<u64>,
    /// `"WITNESS: error"` for each witness that could not be probed.
    pub errors: Vec<String>,
}

/// One module on both nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleStatus {
    pub name: String,
    pub domain: String,
    /// The node running the VM (PRIM or ALONE), `null` when none does.
    pub primary: Option<String>,
    /// Keyed by node name; both nodes are always present.
    pub nodes: BTreeMap<String, NodeStatus>,
}

/// One node's view of a module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub reachable: bool,
    /// `null` for an unreachable peer (see `last_known_state`).
    pub state: Option<Role>,
    pub ready: bool,
    pub readiness: Option<Readiness>,
    pub colour: Option<Colour>,
    /// The node's own disk: `ok`, `failed` (it waits until `vmctl start`
    /// after repair) or `diskless` (reserved); an unreachable peer's last
    /// known, `null` if never heard.
    #[serde(default)]
    pub disk: Option<Disk>,
    /// The module is in maintenance on this node (`vmctl maintenance on`).
    #[serde(default)]
    pub maintenance: bool,
    /// The node left the cluster (`vmctl leave`) until `vmctl join`.
    #[serde(default)]
    pub left: bool,
    /// Where a live swap stands on this node (`preparing`, `migrating`,
    /// `standby_mounting`, `standby`, `standby_failed`, `resuming`); absent
    /// when none runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_phase: Option<crate::state::SwapPhase>,
    /// Current data generation (32 hex digits), `null` for a node without data.
    pub generation: Option<String>,
    pub resync: Option<ResyncStatus>,
    /// Milliseconds in the present state (`null` while unknown).
    #[serde(default)]
    pub since_ms: Option<u64>,
    /// Peer only: milliseconds since the last heartbeat on any network.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub last_seen_ms: Option<Option<u64>>,
    /// Peer only: per peer address, milliseconds since its last heartbeat.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub heartbeats: Option<BTreeMap<String, Option<u64>>>,
    /// Unreachable peer only: the state it last announced.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub last_known_state: Option<Option<Role>>,
    /// Peer only: the whole configuration hashes match.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub config_match: Option<Option<bool>>,
    /// Peer only: this module's configuration hashes match.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub module_config_match: Option<Option<bool>>,
    /// Peer only: whether its controller (vmhad) is heard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller: Option<Controller>,
    /// Peer only: the module's data path while its controller is down.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub data_path: Option<Option<DataPath>>,
}

/// The peer's controller as heard through its heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Controller {
    Up,
    Down,
}

/// A module's replication link with the peer, while the peer's controller is
/// down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataPath {
    /// Frames or pings within the failover timeout: not failed over.
    Alive,
    Down,
}

/// A key that is present (even `null`) is `Some`: `Some(None)` round-trips.
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// Resync progress as shown by `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncStatus {
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub rate_bytes_per_s: u64,
    /// `null` while the rate is unknown.
    pub eta_s: Option<u64>,
}

impl ResyncStatus {
    /// Percentage done (100 when there is nothing to copy).
    pub fn percent(&self) -> u64 {
        self.done_bytes
            .saturating_mul(100)
            .checked_div(self.total_bytes)
            .unwrap_or(100)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_node_has_no_peer_keys() {
        let node = NodeStatus {
            reachable: true,
            state: Some(Role::Prim),
            ready: true,
            readiness: Some(Readiness::Ready),
            colour: Some(Colour::Green),
            disk: Some(Disk::Ok),
            maintenance: false,
            left: false,
            swap_phase: None,
            generation: None,
            resync: None,
            since_ms: None,
            last_seen_ms: None,
            heartbeats: None,
            last_known_state: None,
            config_match: None,
            module_config_match: None,
            controller: None,
            data_path: None,
        };
        let json = serde_json::to_value(&node).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"reachable": true, "state": "PRIM", "ready": true,
                "readiness": "ready", "colour": "green", "disk": "ok", "maintenance": false,
                "left": false, "generation": null,
                "resync": null, "since_ms": null})
        );
    }

    #[test]
    fn unreachable_peer_shape() {
        let node = NodeStatus {
            reachable: false,
            state: None,
            ready: false,
            readiness: None,
            colour: None,
            disk: Some(Disk::Failed),
            maintenance: true,
            left: false,
            swap_phase: None,
            generation: None,
            resync: None,
            since_ms: None,
            last_seen_ms: Some(Some(5000)),
            heartbeats: Some(BTreeMap::from([("10.0.0.2".to_string(), None)])),
            last_known_state: Some(Some(Role::Prim)),
            config_match: Some(None),
            module_config_match: Some(None),
            controller: Some(Controller::Down),
            data_path: Some(Some(DataPath::Alive)),
        };
        let json = serde_json::to_value(&node).unwrap();
        assert_eq!(json["state"], serde_json::Value::Null);
        assert_eq!(json["controller"], "down");
        assert_eq!(json["data_path"], "alive");
        assert_eq!(json["last_known_state"], "PRIM");
        assert_eq!(json["disk"], "failed");
        assert_eq!(json["maintenance"], true);
        assert_eq!(json["heartbeats"]["10.0.0.2"], serde_json::Value::Null);
        let back: NodeStatus = serde_json::from_value(json).unwrap();
        assert_eq!(back, node);
        let mut never = node.clone();
        never.last_known_state = Some(None);
        let json = serde_json::to_value(&never).unwrap();
        assert_eq!(json["last_known_state"], serde_json::Value::Null);
        assert_eq!(serde_json::from_value::<NodeStatus>(json).unwrap(), never);
    }

    #[test]
    fn percent() {
        let r = ResyncStatus {
            done_bytes: 1,
            total_bytes: 4,
            rate_bytes_per_s: 0,
            eta_s: None,
        };
        assert_eq!(r.percent(), 25);
    }
}
