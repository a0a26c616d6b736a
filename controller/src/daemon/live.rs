//! Live swap plumbing of a module task: how the source's libvirt reaches
//! the peer's for a migration (a forwarded socket over the daemon channel,
//! so operators configure no libvirt listener and no ssh), and the source
//! side of one migration. Kept apart from action execution so the stand-in
//! for the forwarder lives in one place.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::Duration;

use vmha_fs::key::ClusterKey;

use crate::config::{Config, Module, NodeIndex};
use crate::driver::VmDriver;

/// How often a running migration looks at its abort flag.
const ABORT_POLL: Duration = Duration::from_millis(50);

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
        LiveTarget {
            run_dir: crate::migrate::run_dir(config),
            peer: crate::migrate::peer_channel_addr(config, node.peer(), module),
            key: key.clone(),
        }
    }
}

/// Live-migrates the module's domain to the peer through a forwarded
/// libvirt socket ([`crate::migrate::Forwarder`]) that lives as long as the
/// migration. The driver checks the disks first (in the module's mount,
/// `cache='none'`). Setting `abort` cuts the forward: the migration fails
/// at once and the VM runs on here (a replication link gone silent must not
/// hold the module's task until libvirt's keepalive gives up).
pub(super) fn migrate(
    target: &LiveTarget,
    vm: &dyn VmDriver,
    module: &Module,
    abort: Arc<AtomicBool>,
) -> Result<(), String> {
    let peer = target.peer.ok_or_else(|| {
        format!(
            "no address of the peer on replication network {}",
            module.replication_network
        )
    })?;
    let forwarder =
        crate::migrate::Forwarder::start(&target.run_dir, peer, &target.key, &module.name)
            .map_err(|e| e.to_string())?;
    let cut = forwarder.cutter();
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let watcher = std::thread::Builder::new()
        .name("migrate-abort".into())
        .spawn(move || loop {
            if abort.load(Ordering::Relaxed) {
                cut.cut();
                return;
            }
            if finished.recv_timeout(ABORT_POLL) != Err(RecvTimeoutError::Timeout) {
                return;
            }
        })
        .map_err(|e| format!("cannot start the migration's abort watcher: {e}"))?;
    let result = vm.migrate_live(module, forwarder.socket());
    let _ = done.send(());
    let _ = watcher.join();
    drop(forwarder);
    result.map_err(|e| e.to_string())
}
