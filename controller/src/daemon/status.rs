//! The `status` answer, built from what the module tasks publish and what
//! the dispatcher knows of the peer. Read-only: it takes no decision and
//! waits on nothing, so `vmctl status` answers even while a module is busy.

use std::net::IpAddr;
use std::time::Instant;

use super::{ms, Shared};
use crate::state::{Colour, Readiness, Role};
use crate::status::{Controller, DataPath, ModuleStatus, NodeStatus, Status, WitnessStatus};
use crate::witness;

pub(super) fn colour_of(role: Role, readiness: Readiness) -> Colour {
    match (role, readiness) {
        (Role::Stop | Role::Wait, _) => Colour::Red,
        (_, Readiness::Ready) => Colour::Green,
        _ => Colour::Orange,
    }
}

pub(super) fn build_status(shared: &Shared) -> Status {
    let config = shared.config();
    let differences = super::dispatch::config_differences(shared);
    let local_name = config.node(shared.node).name.clone();
    let peer_node = config.node(shared.node.peer());
    let now = Instant::now();
    let peer = shared.peer();
    let reachable = peer.networks.latest().is_some() && !peer.lost;
    let last_seen = peer
        .networks
        .latest()
        .map(|t| ms(now.saturating_duration_since(t)));
    let heartbeats: std::collections::BTreeMap<String, Option<u64>> = peer_node
        .addresses
        .iter()
        .zip(peer.networks.ages_ms(now))
        .map(|(ip, age): (&IpAddr, Option<u64>)| (ip.to_string(), age))
        .collect();
    let config_match = peer.config_hash.map(|h| h == config.hash());
    let modules = shared
        .modules()
        .iter()
        .map(|handle| {
            let view = handle.view.borrow().clone();
            let role = view.announce.role;
            let local = NodeStatus {
                reachable: true,
                state: Some(role),
                ready: view.announce.readiness == Readiness::Ready,
                readiness: Some(view.announce.readiness),
                colour: Some(colour_of(role, view.announce.readiness)),
                disk: Some(view.announce.disk),
                maintenance: view.announce.maintenance,
                left: view.announce.left,
                swap_phase: view.announce.swap_phase,
                generation: view.history.current().map(|g| g.to_string()),
                resync: view.resync,
                since_ms: Some(ms(now.saturating_duration_since(view.since))),
                last_seen_ms: None,
                heartbeats: None,
                last_known_state: None,
                config_match: None,
                module_config_match: None,
                controller: None,
                data_path: None,
            };
            let beat = peer.modules.get(&handle.module.name);
            let module_match = beat.map(|b| Some(b.module_hash) == handle.module_hash);
            let peer = match beat {
                Some(beat) if reachable => NodeStatus {
                    reachable: true,
                    state: Some(beat.announce.role),
                    ready: beat.announce.readiness == Readiness::Ready,
                    readiness: Some(beat.announce.readiness),
                    colour: Some(colour_of(beat.announce.role, beat.announce.readiness)),
                    disk: Some(beat.announce.disk),
                    maintenance: beat.announce.maintenance,
                    left: beat.announce.left,
                    swap_phase: beat.announce.swap_phase,
                    generation: beat.history.current().map(|g| g.to_string()),
                    resync: beat.resync,
                    since_ms: peer
                        .role_since
                        .get(&handle.module.name)
                        .map(|(_, at)| ms(now.saturating_duration_since(*at))),
                    last_seen_ms: Some(last_seen),
                    heartbeats: Some(heartbeats.clone()),
                    last_known_state: None,
                    config_match: Some(config_match),
                    module_config_match: Some(module_match),
                    controller: Some(Controller::Up),
                    data_path: Some(None),
                },
                _ => NodeStatus {
                    reachable,
                    state: None,
                    ready: false,
                    readiness: None,
                    colour: None,
                    disk: beat.map(|b| b.announce.disk),
                    maintenance: beat.is_some_and(|b| b.announce.maintenance),
                    left: beat.is_some_and(|b| b.announce.left),
                    swap_phase: None,
                    generation: beat
                        .and_then(|b| b.history.current())
                        .map(|g| g.to_string()),
                    resync: None,
                    since_ms: None,
                    last_seen_ms: Some(last_seen),
                    heartbeats: Some(heartbeats.clone()),
                    last_known_state: Some(beat.map(|b| b.announce.role)),
                    config_match: Some(config_match),
                    module_config_match: Some(module_match),
                    controller: Some(if reachable {
                        Controller::Up
                    } else {
                        Controller::Down
                    }),
                    data_path: Some((!reachable).then_some(if view.peer_controller_down {
                        DataPath::Alive
                    } else {
                        DataPath::Down
                    })),
                },
            };
            let primary = if role.is_writer() {
                Some(local_name.clone())
            } else if peer.state.is_some_and(Role::is_writer) {
                Some(peer_node.name.clone())
            } else {
                None
            };
            ModuleStatus {
                name: handle.module.name.clone(),
                domain: handle.module.domain.clone(),
                primary,
                nodes: [(local_name.clone(), local), (peer_node.name.clone(), peer)]
                    .into_iter()
                    .collect(),
            }
        })
        .collect();
    let witness = (!config.cluster.witness.is_empty()).then(|| {
        let last = shared
            .witness
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        WitnessStatus {
            addresses: config.cluster.witness.iter().map(witness::name).collect(),
            last_probe: last.as_ref().map(|l| l.outcome),
            last_probe_ms: last
                .as_ref()
                .map(|l| ms(now.saturating_duration_since(l.at))),
            errors: last.map(|l| l.errors).unwrap_or_default(),
        }
    });
    Status {
        node: local_name,
        config_hash: config.hash().to_string(),
        heartbeats_rejected: shared.rejections.counts(),
        modules,
        split_brain: Some(split_brain_name(&config)),
        config_differences: differences,
        witness,
        protocols: Some(protocols(shared, peer.software.clone())),
    }
}

/// `peer_software` from the peer state the caller holds locked.
fn protocols(shared: &Shared, peer_software: Option<String>) -> crate::status::Protocols {
    use crate::status::ProtocolStatus;
    let hb = &shared.heartbeat_versions;
    let peer = hb.peer();
    crate::status::Protocols {
        replication: ProtocolStatus::ours(vmha_fs::wire::replication_versions()),
        heartbeat: ProtocolStatus {
            ours: hb.ours().to_string(),
            peer: peer.map(|p| p.to_string()),
            in_use: peer.map(|_| u16::from(hb.in_use())),
            peer_software,
        },
        channel: ProtocolStatus::ours(crate::channel::advertised()),
    }
}

/// The split-brain policy as written in the configuration.
fn split_brain_name(config: &crate::config::Config) -> String {
    use crate::config::SplitBrainPolicy;
    match &config.cluster.split_brain {
        SplitBrainPolicy::DiscardLeastChanges => "discard-least-changes".into(),
        SplitBrainPolicy::Manual => "manual".into(),
        SplitBrainPolicy::Prefer(node) => format!("prefer:{}", config.node(*node).name),
    }
}
