//! The outside world the state machine's actions touch, behind two small
//! traits: [`VmDriver`] (libvirt) and [`FsDriver`] (vmha-fs). The calls block;
//! the daemon runs them with `spawn_blocking`.
//!
//! Implementations: [`fake`] (recording, scriptable, for tests), [`vmha_fs`]
//! (spawns the `vmha-fs` binary), [`libvirt`] (libvirt through the `virt`
//! crate).

use crate::config::Module;
use crate::state::Progress;

pub mod fake;
pub mod libvirt;
pub mod vmha_fs;

/// Errors of a driver call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DriverError {
    #[error("{what} failed: {detail}")]
    Failed { what: String, detail: String },
    #[error("{what} timed out after {secs} s")]
    Timeout { what: String, secs: u64 },
    #[error("{0} is not supported by this driver")]
    Unsupported(String),
}

impl DriverError {
    pub fn failed(what: impl Into<String>, detail: impl std::fmt::Display) -> DriverError {
        DriverError::Failed {
            what: what.into(),
            detail: detail.to_string(),
        }
    }
}

/// A libvirt domain's state as the checker sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    Running,
    /// Paused or suspended: alive, not restarted.
    Paused,
    ShutOff,
    Crashed,
    /// Not defined on this node.
    Missing,
}

impl VmState {
    /// Whether the checker counts this as an unexpected stop.
    pub fn is_down(self) -> bool {
        matches!(self, VmState::ShutOff | VmState::Crashed | VmState::Missing)
    }
}

/// Why a domain is paused ([`VmDriver::paused`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Paused {
    /// An incoming migration is in progress here (libvirt's reason
    /// `migration`): this instance must not run until the migration ended.
    IncomingMigration,
    /// Paused on request (libvirt's reason `user`): among others, a domain
    /// that arrived by a live migration with `VIR_MIGRATE_PAUSED` and was not
    /// resumed yet.
    User,
    /// Any other reason (I/O error, watchdog, snapshot, ...).
    Other,
}

/// libvirt, per module (`module.domain` on `module.libvirt_uri`).
pub trait VmDriver: Send + Sync + std::fmt::Debug + 'static {
    /// Defines the domain from `<first replicated dir>/<domain>.xml`, autostart
    /// off, then (libvirt driver) redefines its snapshots from
    /// `<first replicated dir>/<domain>.snapshots/*.xml`.
    fn define(&self, module: &Module) -> Result<(), DriverError>;
    /// Starts the domain and waits (bounded) until it runs.
    fn start(&self, module: &Module) -> Result<(), DriverError>;
    /// ACPI shutdown, wait `stop_timeout_s`, then destroy. Ok if already off.
    fn stop(&self, module: &Module) -> Result<(), DriverError>;
    fn state(&self, module: &Module) -> Result<VmState, DriverError>;
    /// The checker's view of the state: may answer from what the driver
    /// already knows (libvirt's lifecycle events) instead of asking.
    fn watch_state(&self, module: &Module) -> Result<VmState, DriverError> {
        self.state(module)
    }
    /// Woken when the domain's state may have changed (a lifecycle event),
    /// so the checker looks at once; `None`: no such notice, the checker's
    /// period alone.
    fn state_changes(&self, _module: &Module) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        None
    }
    /// Writer: if libvirt's inactive XML of the domain differs from
    /// `<first replicated dir>/<domain>.xml` (the domain was redefined here,
    /// e.g. `virsh edit`), rewrites the file atomically so the peer defines
    /// the same; likewise the snapshots' XML (`<domain>.snapshots/`) when the
    /// domain's snapshots changed. `Ok(true)`: a file was rewritten.
    fn refresh_xml(&self, _module: &Module) -> Result<bool, DriverError> {
        Ok(false)
    }
    /// Live swap, on the source: checks that every disk of the running
    /// domain lies in the module's replicated directories with
    /// `cache='none'` (`crate::migrate::check_disks`), then live-migrates it
    /// peer-to-peer and tunnelled to the libvirt behind `dest` (the socket of
    /// a `crate::migrate::Forwarder`), treating the disks as shared storage
    /// (`VIR_MIGRATE_LIVE | PEER2PEER | TUNNELLED | PAUSED | UNSAFE`; never
    /// `NON_SHARED_*`, `PERSIST_DEST` or `UNDEFINE_SOURCE`: the domain stays
    /// defined on both nodes). On success the source's QEMU is gone and the
    /// destination's domain is paused ([`Paused::User`] there) until
    /// [`VmDriver::resume`]. Bounded: a migration still running after the
    /// driver's migration timeout is aborted (`virDomainAbortJob`) and the
    /// call fails with [`DriverError::Timeout`]; the domain then still runs
    /// here. Any failure leaves the domain running here.
    fn migrate_live(&self, _module: &Module, _dest: &std::path::Path) -> Result<(), DriverError> {
        Err(DriverError::Unsupported("live migration".into()))
    }
    /// Aborts the domain's running migration job (libvirt's
    /// `virDomainAbortJob`; from another thread while
    /// [`VmDriver::migrate_live`] runs, which then fails and leaves the
    /// domain running here unless it had already handed it over). Ok when
    /// no job runs.
    fn abort_migration(&self, _module: &Module) -> Result<(), DriverError> {
        Err(DriverError::Unsupported("aborting a live migration".into()))
    }
    /// Resumes a paused domain (the destination of a live swap once the
    /// write direction flipped). Ok if it already runs.
    fn resume(&self, _module: &Module) -> Result<(), DriverError> {
        Err(DriverError::Unsupported("resume".into()))
    }
    /// Why the domain here is paused; `None` when it is not paused (running,
    /// shut off, not defined). A paused instance that must not run (a live
    /// swap given up) is ended with [`VmDriver::stop`], which destroys a
    /// paused domain at once (no ACPI wait).
    fn paused(&self, _module: &Module) -> Result<Option<Paused>, DriverError> {
        Ok(None)
    }
}

/// The health of a module's vmha-fs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsHealth {
    Healthy,
    /// Nothing is mounted for this module.
    Idle,
    /// The replication link failed while the process and mount are fine.
    LinkDown,
    /// The peer's receiver refused our writes: our generation is stale.
    Fenced,
    /// The process died or the mount stopped answering.
    Failed(String),
    /// The local disk failed under vmha-fs (a media error on this node's copy):
    /// the copy can no longer be trusted.
    DiskFailed(String),
}

/// A module's vmha-fs that a previous vmhad started and that still runs
/// ([`FsDriver::find_running`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundFs {
    pub writer: bool,
    /// Every directory runs with the settings this configuration gives it.
    pub settings_match: bool,
    /// The generation claimed (writer) or accepted (receiver), if any.
    pub generation: Option<String>,
    /// Writer: it writes alone (not replicating to the peer).
    pub alone: bool,
}

/// The state of a resync this node receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncState {
    Idle,
    Running(Progress),
    Done,
}

/// A region where the peer's copy differs from ours (`len` = `u64::MAX`: it
/// lacks the file), as vmha-fs reports it in `verify.json`.
pub use ::vmha_fs::status::Difference;

/// What `verify` found, per replicated directory.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VerifyReport {
    pub dirs: Vec<(std::path::PathBuf, Vec<Difference>)>,
}

impl VerifyReport {
    /// One line per directory and per difference (`differs …` lines mark them).
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (dir, diffs) in &self.dirs {
            if diffs.is_empty() {
                out.push(format!("identical: {}", dir.display()));
            }
            for d in diffs {
                if d.len == u64::MAX {
                    out.push(format!(
                        "differs: {}/{}: missing on the peer",
                        dir.display(),
                        d.path
                    ));
                } else {
                    out.push(format!(
                        "differs: {}/{}: {} bytes at offset {}",
                        dir.display(),
                        d.path,
                        d.len,
                        d.offset
                    ));
                }
            }
        }
        out
    }
}

/// vmha-fs, per module (all its replicated directories).
pub trait FsDriver: Send + Sync + std::fmt::Debug + 'static {
    /// Mounts the replicated directories as the writer (`vmha-fs primary`).
    fn mount_writer(&self, module: &Module) -> Result<(), DriverError>;
    /// Runs the receiver (`vmha-fs secondary`).
    fn mount_receiver(&self, module: &Module) -> Result<(), DriverError>;
    /// Takes down whatever is mounted (and any resync). Ok if nothing is.
    fn unmount(&self, module: &Module) -> Result<(), DriverError>;
    fn health(&self, module: &Module) -> FsHealth;
    /// Starts receiving a resync from the peer; `full`: compare everything.
    fn start_resync(&self, module: &Module, full: bool) -> Result<(), DriverError>;
    fn resync_state(&self, module: &Module) -> Result<ResyncState, DriverError>;
    /// Compares the peer's copy with ours while replicating; changes nothing.
    fn verify(&self, _module: &Module) -> Result<VerifyReport, DriverError> {
        Err(DriverError::Unsupported("verify".into()))
    }
    /// Bytes written since the current generation began (split-brain rule).
    fn changed_bytes(&self, _module: &Module) -> u64 {
        0
    }
    /// The running writer's counters and latency histograms (`metrics.json`),
    /// summed over the module's directories; None when no writer runs here.
    fn fs_metrics(&self, _module: &Module) -> Option<::vmha_fs::status::FsMetrics> {
        None
    }
    /// [`FsDriver::mount_writer`] claiming `generation` (hex) to the peer's
    /// receiver. The writer starts alone; [`FsDriver::attach_peer`] attaches
    /// the peer later.
    fn mount_writer_at(
        &self,
        module: &Module,
        _generation: Option<&str>,
    ) -> Result<(), DriverError> {
        self.mount_writer(module)
    }
    /// [`FsDriver::mount_writer_at`], but replicating synchronously from the first
    /// write: for a peer that is a ready SECOND with this node's generation (after a
    /// swap), whose data is already identical. Fails if its receiver is not there.
    fn mount_writer_connected(
        &self,
        module: &Module,
        generation: Option<&str>,
    ) -> Result<(), DriverError> {
        self.mount_writer_at(module, generation)
    }
    /// [`FsDriver::mount_receiver`] serving only a writer that claims
    /// `generation` (fencing); `None`: any writer.
    fn mount_receiver_accepting(
        &self,
        module: &Module,
        _generation: Option<&str>,
    ) -> Result<(), DriverError> {
        self.mount_receiver(module)
    }
    /// [`FsDriver::start_resync`] from a writer at `generation` (the receiver
    /// may have to accept that generation first).
    fn start_resync_from(
        &self,
        module: &Module,
        full: bool,
        _generation: Option<&str>,
    ) -> Result<(), DriverError> {
        self.start_resync(module, full)
    }
    /// SECOND: make the running receiver accept the writer's current
    /// `generation`, restarting it if it accepts another one (the writer moved
    /// on, e.g. after its replication link went down). Returns whether it did.
    fn follow_writer(
        &self,
        _module: &Module,
        _generation: Option<&str>,
    ) -> Result<bool, DriverError> {
        Ok(false)
    }
    /// Writer: attach the peer's receiver and bring it up to date with a full
    /// copy while writes go on, claiming `generation`. Progress:
    /// [`FsDriver::writer_sync_state`].
    fn attach_peer(&self, _module: &Module, _generation: Option<&str>) -> Result<(), DriverError> {
        Err(DriverError::Unsupported("attaching the peer".to_string()))
    }
    /// Writer: the peer is dead; writes go on alone instead of waiting for it.
    fn go_alone(&self, _module: &Module) -> Result<(), DriverError> {
        Ok(())
    }
    /// Writer: the next [`FsDriver::attach_peer`] compares every block of both
    /// copies whatever their records say (`vmctl resync --compare`); the request
    /// lasts until such a resync finished. `reason` is logged by vmha-fs.
    fn request_compare(&self, _module: &Module, _reason: &str) -> Result<(), DriverError> {
        Err(DriverError::Unsupported("resync --compare".to_string()))
    }
    /// Receiver (`vmctl invalidate`): record this copy as not up to date, so that
    /// the receiver discards its records when it starts for the next resync
    /// (which then compares every block); removed by vmha-fs once a resync made
    /// the copy identical.
    fn invalidate(&self, _module: &Module, _reason: &str) -> Result<(), DriverError> {
        Err(DriverError::Unsupported("invalidate".to_string()))
    }
    /// At daemon start: this module's vmha-fs that a previous vmhad started and
    /// that still runs, if any. The driver takes it in charge: `unmount` stops
    /// it, `health` watches it.
    fn find_running(&self, _module: &Module) -> Result<Option<FoundFs>, DriverError> {
        Ok(None)
    }
    /// The replication link with the peer is alive: a receiver heard its
    /// writer (an operation or a ping) within `within`; a writer's link is
    /// connected.
    fn data_path_alive(&self, _module: &Module, _within: std::time::Duration) -> bool {
        false
    }
    /// Writer: where the copy to the peer started by
    /// [`FsDriver::attach_peer`] stands. `Idle`: none running (or the peer is
    /// not attached); an error: the last attach failed.
    fn writer_sync_state(&self, _module: &Module) -> Result<ResyncState, DriverError> {
        Ok(ResyncState::Idle)
    }
    /// SECOND, live swap: mounts the replicated directories in standby
    /// (`vmha-fs primary --standby`) over the receiver, which keeps
    /// applying: opens and reads work, every change fails with EROFS.
    fn mount_standby(&self, _module: &Module) -> Result<(), DriverError> {
        Err(DriverError::Unsupported("standby mount".into()))
    }
    /// Live swap: turns the standby mount into the writer claiming
    /// `generation`: replicating to the peer's receiver (`connected`; this
    /// node's receiver is stopped first) or alone. On failure the standby
    /// stays (and nothing else is mounted).
    fn activate_standby(
        &self,
        _module: &Module,
        _generation: Option<&str>,
        _connected: bool,
    ) -> Result<(), DriverError> {
        Err(DriverError::Unsupported("standby activation".into()))
    }
    /// Takes the standby mount down (the receiver stays). Ok if none runs.
    fn drop_standby(&self, _module: &Module) -> Result<(), DriverError> {
        Ok(())
    }
    /// At daemon start: stops the standby mounts a previous vmhad started
    /// for a live swap and left behind (it was killed mid-way); how many.
    /// Called after any paused incoming instance was destroyed (its open
    /// files would hold the unmount).
    fn drop_orphan_standby(&self, _module: &Module) -> Result<usize, DriverError> {
        Ok(0)
    }
}
