//! Live swap plumbing of a module task: how the source's libvirt reaches
//! the peer's for a migration (a forwarded socket over the daemon channel,
//! so operators configure no libvirt listener and no ssh), and the source
//! side of one migration. Kept apart from action execution so the stand-in
//! for the forwarder lives in one place.

use std::net::SocketAddr;
use std::path::PathBuf;

use vmha_fs::key::ClusterKey;

use crate::config::{Config, Module, NodeIndex};
use crate::driver::{DriverError, VmDriver};

/// Where the peer's libvirt is reached from this node for a module.
#[derive(Clone)]
pub(super) struct LiveTarget {
    /// vmhad's run directory (the forwarded sockets go there).
    pub(super) run_dir: PathBuf,
    /// The peer's daemon channel on the module's replication network.
    pub(super) peer: Option<SocketAddr>,
    pub(super) key: ClusterKey,
}

impl std::fmt::Debug for LiveTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveTarget")
            .field("run_dir", &self.run_dir)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl LiveTarget {
    pub(super) fn of(config: &Config, module: &Module, node: NodeIndex, key: &ClusterKey) -> Self {
        let run_dir = config
            .cluster
            .control_socket
            .parent()
            .map(std::path::Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/run/vmha"));
        let peer_node = config.node(node.peer());
        let peer = peer_node
            .addresses
            .get(module.replication_network)
            .or_else(|| peer_node.addresses.first())
            .map(|ip| SocketAddr::new(*ip, config.cluster.channel_port));
        LiveTarget {
            run_dir,
            peer,
            key: key.clone(),
        }
    }
}

/// Live-migrates the module's domain to the peer through a forwarded
/// libvirt socket that lives as long as the migration.
pub(super) fn migrate(
    target: &LiveTarget,
    vm: &dyn VmDriver,
    module: &Module,
) -> Result<(), DriverError> {
    let _ = (target, vm, module);
    Err(DriverError::Unsupported(
        "live migration through the daemon channel".into(),
    ))
}
