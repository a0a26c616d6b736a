//! Live swap plumbing of a module task: how the source's libvirt reaches
//! the peer's for a migration (a forwarded socket over the daemon channel,
//! so operators configure no libvirt listener and no ssh), and the source
//! side of one migration, which runs in the background ([`Migration`]):
//! the module's task goes on handling heartbeats, link health and requests
//! meanwhile, and aborts it at once when the state machine says so. Kept
//! apart from action execution so the stand-in for the forwarder lives in
//! one place.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use vmha_fs::key::ClusterKey;

use crate::config::{Config, Module, NodeIndex};
use crate::driver::VmDriver;

/// How often a running migration looks at its abort flag.
const ABORT_POLL: Duration = Duration::from_millis(50);

/// After libvirt was asked to abort the job, how long before the forward is
/// cut all the same (libvirt then ends the job on the broken connection
/// instead of waiting for its keepalive on a silent link).
const CUT_AFTER_ABORT: Duration = Duration::from_millis(200);

/// A live migration running in the background (`Action::MigrateVm`).
#[derive(Debug)]
pub(super) struct Migration {
    abort: Arc<AtomicBool>,
    outcome: oneshot::Receiver<Result<(), String>>,
    pub(super) started: Instant,
    /// `AbortMigration` was executed: its outcome is logged, never reported.
    pub(super) aborted: bool,
}

impl Migration {
    /// Starts [`migrate`] on a blocking thread.
    pub(super) fn start(target: LiveTarget, vm: Arc<dyn VmDriver>, module: Module) -> Migration {
        let abort = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&abort);
        let (tx, outcome) = oneshot::channel();
        tokio::task::spawn_blocking(move || {
            let _ = tx.send(migrate(&target, vm, &module, flag));
        });
        Migration {
            abort,
            outcome,
            started: Instant::now(),
            aborted: false,
        }
    }

    /// Aborts it (libvirt's job, then the forward): it ends soon, failed
    /// unless it had already handed the VM over.
    pub(super) fn abort(&mut self) {
        self.aborted = true;
        self.abort.store(true, Ordering::Relaxed);
    }

    /// Waits for its outcome.
    pub(super) async fn ended(&mut self) -> Result<(), String> {
        (&mut self.outcome)
            .await
            .unwrap_or_else(|_| Err("the migration's task ended without an outcome".to_string()))
    }
}

/// Waits for the outcome of the running migration, or forever without one.
pub(super) async fn ended(migration: &mut Option<Migration>) -> Result<(), String> {
    match migration {
        Some(m) => m.ended().await,
        None => std::future::pending().await,
    }
}

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
/// `cache='none'`). Setting `abort` aborts libvirt's job
/// ([`VmDriver::abort_migration`]) and cuts the forward: the migration
/// fails at once and the VM runs on here (a replication link gone silent
/// must not leave it to libvirt's keepalive).
pub(super) fn migrate(
    target: &LiveTarget,
    vm: Arc<dyn VmDriver>,
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
    let (watched_vm, watched_module) = (Arc::clone(&vm), module.clone());
    let watcher = std::thread::Builder::new()
        .name("migrate-abort".into())
        .spawn(move || loop {
            if abort.load(Ordering::Relaxed) {
                abort_job(watched_vm, watched_module);
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

/// Asks libvirt to abort the domain's migration job, waiting at most
/// [`CUT_AFTER_ABORT`] for the answer (the call goes on in the background).
fn abort_job(vm: Arc<dyn VmDriver>, module: Module) {
    let (answered, answer) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("migrate-abort-job".into())
        .spawn(move || {
            let result = vm.abort_migration(&module);
            match &result {
                Ok(()) => {
                    tracing::info!(module = %module.name, "libvirt aborted the migration job")
                }
                Err(e) => tracing::info!(module = %module.name, "aborting the migration job: {e}"),
            }
            let _ = answered.send(());
        });
    if spawned.is_ok() {
        let _ = answer.recv_timeout(CUT_AFTER_ABORT);
    }
}
