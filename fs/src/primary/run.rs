//! Running a primary (`vmha-fs primary`): the FUSE session over the replicated
//! directory, the link, the checkpointer, the link status, and the signals the
//! controller sends (SIGUSR1 go alone, SIGUSR2 attach the peer, SIGHUP verify,
//! SIGTERM/SIGINT unmount).
//!
//! **Standby** (`--standby`, the destination of a live swap): the mount is
//! served while this node's receiver (`vmha-fs secondary`, same backing and
//! state directories) still applies the old writer's changes underneath.
//! Opens and reads work, every change fails with EROFS, nothing is written to
//! the state directory the receiver owns (its lock is not even taken) and the
//! peer is not contacted. A signal activates it in place, handles opened in
//! standby stay valid and become writable: SIGUSR2 a connected writer (the
//! receiver here stopped after applying everything, the writer there exited:
//! the copies are identical, nothing is copied), SIGUSR1 an alone writer.
//! A failed activation leaves the mount in standby and says why in
//! `link.json` (`"activation": "failed: ..."`) and the log.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;

use super::checkpoint::Checkpointer;
use super::fuse::{Activation, ReplicatedFs};
use super::join::Joiner;
use super::metrics::PrimaryMetrics;
use super::status::publish_link_status;
use super::DiskHealth;
use crate::key::ClusterKey;
use crate::link::{LinkState, LinkThreads, PeerLink};
use crate::mounts;
use crate::resync::SyncProgress;
use crate::runtime::{existing_dir, open_dir, RunError};
use crate::statedir::StateDir;
use crate::status::{LinkCondition, LinkStatus, StatusFile};
use crate::track::Tracker;

/// What `vmha-fs primary` was asked to do.
#[derive(Debug, Clone)]
pub struct PrimaryConfig {
    pub backing: PathBuf,
    pub mount: PathBuf,
    pub peer: Option<SocketAddr>,
    pub module: String,
    /// Start writing alone (--peer, if given, is attached later on SIGUSR2).
    pub alone: bool,
    /// Start in standby (see the module doc); requires `peer`, excludes `alone`.
    pub standby: bool,
    pub generation: Option<crate::status::GenerationId>,
    pub state: PathBuf,
    pub key_file: PathBuf,
    pub lock_timeout: Duration,
    pub threads: usize,
    pub al_extents: usize,
    /// Resync bytes per second; None or 0 = unlimited.
    pub rate_limit: Option<u64>,
    /// Reader threads of a resync (`resync::Syncer::with_streams`).
    pub resync_streams: usize,
    /// When a write returns (see [`crate::link::Protocol`]).
    pub protocol: crate::link::Protocol,
    /// How a guest's O_DIRECT writes reach this copy (see
    /// [`crate::writeback::LocalWrites`]).
    pub local_writes: crate::writeback::LocalWrites,
}

/// The writer's machinery besides the FUSE session: started at mount, or at
/// the activation of a standby mount.
struct Writer {
    link: PeerLink,
    threads: LinkThreads,
    tracker: Arc<Tracker>,
    checkpoints: Checkpointer,
    checkpoint_thread: JoinHandle<()>,
    join: Joiner,
}

/// What starting a writer needs (shared by the start and the activation).
struct Context {
    args: PrimaryConfig,
    key: ClusterKey,
    activation: Activation,
    metrics: Arc<PrimaryMetrics>,
    disk: Arc<DiskHealth>,
    /// The state directory once this process writes (its lock taken).
    state: Arc<OnceLock<Arc<StateDir>>>,
    /// Standby: the state directory's lock, taken once the receiver exits.
    lock: Option<crate::statedir::LockWaiter>,
    checkpoint_root: Arc<OwnedFd>,
}

/// How a writer starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// Connected to --peer (the copies are identical).
    Connected,
    /// Without the peer, recorded as outdated first.
    Alone,
}

impl Context {
    /// Opens the state directory and the records, connects (or records the
    /// peer as outdated) and installs the writer in the filesystem.
    fn start(&self, how: Start, opened: Option<StateDir>) -> Result<Writer, RunError> {
        // A standby mount whose disk failed on a read must not become the writer.
        if let Some(failure) = self.disk.failure() {
            return Err(RunError::Other(format!(
                "this node's disk failed: {failure}"
            )));
        }
        let state = Arc::new(match (opened, &self.lock) {
            (Some(state), _) => state,
            (None, Some(lock)) => lock.open().map_err(|e| match e {
                crate::statedir::StateError::Locked(path) => RunError::Other(format!(
                    "this node's receiver still runs (it holds the lock of {})",
                    path.display()
                )),
                other => other.into(),
            })?,
            (None, None) => StateDir::open(&self.args.state)?,
        });
        // A copy recorded as behind must not write, whatever its disk says now.
        if let Some(reason) = state.self_outdated() {
            return Err(RunError::SelfOutdated {
                path: state.path().join(crate::status::SELF_OUTDATED),
                reason: reason.trim().to_string(),
            });
        }
        if let Some(reason) = state.peer_outdated() {
            tracing::warn!(
                reason,
                "the peer was marked outdated earlier; its copy needs a resync"
            );
        }
        let tracker = Tracker::open(state.path(), self.args.al_extents)?;
        if how == Start::Connected && !tracker.is_clean() {
            return Err(RunError::NotInSync(state.path().join("track")));
        }
        let marker = state.clone();
        let local_disk = self.disk.clone();
        let record_outdated: crate::link::DivergenceHook = Box::new(move |reason| {
            if let Some(failure) = local_disk.failure() {
                // The copy that is behind is ours, whatever the link saw afterwards.
                tracing::error!(
                    reason,
                    failure,
                    "not recording the peer as outdated: this node's own disk failed"
                );
                return;
            }
            if let Err(e) = marker.mark_peer_outdated(reason) {
                // Without the record, writing on would lose track of what the peer lacks.
                tracing::error!("cannot record that the peer is outdated: {e}; stopping");
                std::process::abort();
            }
        });
        let args = &self.args;
        // The controller writes the current generation there before it
        // signals a standby mount; at a plain start, --generation.
        let generation = match self.activation.is_standby() {
            true => state.generation().or_else(|| args.generation.clone()),
            false => args.generation.clone(),
        };
        let (link, threads) = match (how, args.peer) {
            (Start::Connected, Some(peer)) => PeerLink::connect(
                peer,
                &self.key,
                &args.module,
                generation.clone().map(String::from),
                args.lock_timeout,
                record_outdated,
            )?,
            _ => PeerLink::alone(args.lock_timeout, record_outdated)?,
        };
        link.set_protocol(args.protocol);
        tracing::info!(protocol = %args.protocol, "replication protocol");
        tracing::info!(local_writes = %args.local_writes, "local writes");
        let repl = match self
            .activation
            .install(link.clone(), tracker.clone(), self.disk.clone())
        {
            Ok(repl) => repl,
            Err(e) => {
                link.shutdown(threads);
                return Err(RunError::Other(format!(
                    "cannot read the backing directory: {e}"
                )));
            }
        };
        let _ = self.state.set(state.clone());
        // What an earlier process left unsynced, synced meanwhile: checkpoints
        // then sync only what this one changes.
        repl.changed.start_baseline(self.checkpoint_root.clone());
        let checkpoints = Checkpointer {
            tracker: tracker.clone(),
            link: link.clone(),
            disk: self.disk.clone(),
            root: self.checkpoint_root.clone(),
            changed: repl.changed.clone(),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let checkpoint_thread = {
            let c = checkpoints.clone();
            std::thread::Builder::new()
                .name("checkpoint".into())
                .spawn(move || c.run())
                .map_err(|e| RunError::Other(format!("cannot start checkpoint thread: {e}")))?
        };
        let progress = Arc::new(SyncProgress::default());
        let syncer = self
            .activation
            .syncer(&repl, progress.clone())
            .with_rate_limit(args.rate_limit)
            .with_streams(args.resync_streams);
        let fenced = Arc::new(parking_lot::Mutex::new(None));
        publish_link_status(
            link.clone(),
            self.disk.clone(),
            state.clone(),
            fenced.clone(),
            args.lock_timeout,
            tracker.clone(),
            self.metrics.clone(),
        )?;
        let join = Joiner {
            link: link.clone(),
            syncer: Arc::new(syncer),
            progress,
            state,
            peer: args.peer,
            module: args.module.clone(),
            key: self.key.clone(),
            generation,
            running: Arc::new(AtomicBool::new(false)),
            fenced,
        };
        Ok(Writer {
            link,
            threads,
            tracker,
            checkpoints,
            checkpoint_thread,
            join,
        })
    }

    /// `link.json` of a mount in standby (written without the state
    /// directory's lock: the receiver holds it, and never writes this file).
    fn write_standby_status(&self, activation: Option<String>) {
        let status = LinkStatus {
            activation,
            reason: None,
            standby: true,
            state: LinkCondition::Standby,
        };
        let path = self.args.state.join(LinkStatus::FILE);
        if let Err(e) = crate::atomic::write_report(&path, &status.encode()) {
            tracing::warn!("cannot write {}: {e}", path.display());
        }
    }

    /// Activates a standby mount (SIGUSR2: connected, SIGUSR1: alone); on
    /// failure it stays in standby and says why.
    fn activate(&self, how: Start, writer: &Mutex<Option<Writer>>) {
        let mut slot = writer.lock();
        if slot.is_some() {
            return;
        }
        tracing::info!(?how, "activating the standby mount");
        let began = std::time::Instant::now();
        match self.start(how, None) {
            Ok(w) => {
                tracing::info!(
                    ?how,
                    link = ?w.link.state(),
                    elapsed_ms = began.elapsed().as_millis(),
                    "standby mount activated: writing"
                );
                *slot = Some(w);
            }
            Err(e) => {
                tracing::error!(?how, "activation failed, still in standby: {e}");
                self.write_standby_status(Some(format!("failed: {e}")));
            }
        }
    }
}

/// Serves the mount until SIGTERM or SIGINT, then unmounts.
pub fn run(args: PrimaryConfig) -> Result<(), RunError> {
    let key = ClusterKey::load(&args.key_file)?;
    if args.standby && (args.alone || args.peer.is_none()) {
        return Err(RunError::Other(
            "--standby needs --peer and excludes --alone".into(),
        ));
    }
    let state_slot: Arc<OnceLock<Arc<StateDir>>> = Arc::default();
    // A normal start takes the state directory first (its lock, the
    // self-outdated check); a standby mount only when it is activated.
    let started_state = if args.standby {
        let marker = args.state.join(crate::status::SELF_OUTDATED);
        if let Ok(reason) = std::fs::read_to_string(&marker) {
            return Err(RunError::SelfOutdated {
                path: marker,
                reason: reason.trim().to_string(),
            });
        }
        None
    } else {
        let state = StateDir::open(&args.state)?;
        if let Some(reason) = state.self_outdated() {
            return Err(RunError::SelfOutdated {
                path: state.path().join(crate::status::SELF_OUTDATED),
                reason: reason.trim().to_string(),
            });
        }
        Some(state)
    };
    // After the state's verdict: a copy recorded as not up to date is refused
    // as such even when its disk no longer answers at all.
    let backing = existing_dir("backing", &args.backing)?;
    let mount = existing_dir("mount", &args.mount)?;
    if args.standby && mount != backing {
        // Mounted elsewhere, the receiver's directory would stay open to
        // everyone's writes, or (read-only) not writable after activation.
        return Err(RunError::Other(
            "--standby mounts over the receiver's directory: --mount must equal --backing".into(),
        ));
    }
    if mounts::is_fuse_mounted(&mount)? {
        return Err(RunError::AlreadyMounted(mount));
    }
    // In standby the receiver holds files beneath on purpose (it writes there
    // until the activation): it is this node's own, not a bypass.
    if mount == backing && !args.standby {
        if let Some(o) = mounts::open_beneath(&backing).into_iter().next() {
            return Err(RunError::OpenBeneath {
                dir: backing,
                pid: o.pid,
                command: o.command,
                path: o.path,
            });
        }
    }
    // Standby: the state directory's lock is taken over when the receiver
    // releases it (never a moment with nobody holding the directory).
    let lock = match args.standby {
        true => Some(StateDir::wait_for_lock(&args.state)?),
        false => None,
    };
    let took_over = args.standby && mounts::take_over_read_only(&backing)?;
    if took_over {
        tracing::info!(backing = %backing.display(), "took over from the receiver's read-only bind");
    }
    let root = open_dir("backing", &backing)?;
    let checkpoint_root = root
        .try_clone()
        .map_err(|e| RunError::Other(format!("cannot duplicate the backing descriptor: {e}")))?;
    let marker = state_slot.clone();
    let disk = Arc::new(DiskHealth::new(Box::new(move |reason| {
        match marker.get() {
            Some(state) => {
                if let Err(e) = state.mark_self_outdated(reason) {
                    // Its disk may be the failed one: the status still says it.
                    tracing::error!("cannot record that this copy is outdated: {e}");
                }
            }
            // Standby: the state directory is the receiver's until activation,
            // which then refuses (the disk failed).
            None => tracing::error!(reason, "local disk failed in standby"),
        }
    })));
    let fs = ReplicatedFs::standby(root, args.local_writes)
        .map_err(|e| RunError::Other(format!("cannot read backing directory: {e}")))?;
    let ctx = Arc::new(Context {
        key,
        activation: fs.activation(),
        metrics: fs.metrics(),
        disk: disk.clone(),
        state: state_slot,
        lock,
        checkpoint_root: Arc::new(checkpoint_root),
        args,
    });
    let writer: Arc<Mutex<Option<Writer>>> = Arc::default();
    if ctx.args.standby {
        ctx.write_standby_status(None);
    } else {
        let how = if ctx.args.alone {
            Start::Alone
        } else {
            Start::Connected
        };
        *writer.lock() = Some(ctx.start(how, started_state)?);
    }
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(format!("vmha:{}", backing.display())),
        fuser::MountOption::Subtype("vmha".into()),
        fuser::MountOption::DefaultPermissions,
    ];
    config.acl = fuser::SessionACL::All;
    config.n_threads = Some(ctx.args.threads);
    config.clone_fd = true;
    let mut session = match fuser::Session::new(fs, &mount, &config) {
        Ok(s) => s,
        Err(source) => {
            if let Some(w) = writer.lock().take() {
                w.checkpoints.stop.store(true, Ordering::SeqCst);
                w.link.shutdown(w.threads);
            } else if took_over {
                give_back_read_only(&backing, &ctx);
            }
            return Err(RunError::Fuse {
                path: mount,
                source,
            });
        }
    };
    let mut unmounter = session.unmount_callable();
    let mount_path = mount.clone();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGUSR1,
        signal_hook::consts::SIGUSR2,
        signal_hook::consts::SIGHUP,
    ])
    .map_err(|e| RunError::Other(format!("cannot install signal handler: {e}")))?;
    let signal_ctx = ctx.clone();
    let signal_writer = writer.clone();
    let signal_thread = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                let is_term =
                    signal == signal_hook::consts::SIGTERM || signal == signal_hook::consts::SIGINT;
                if !is_term {
                    handle_signal(&signal_ctx, &signal_writer, signal);
                    continue;
                }
                tracing::info!("signal received, unmounting");
                if let Err(e) = unmounter.unmount() {
                    unmount_busy(&mount_path, &e);
                }
                break;
            }
        })
        .map_err(|e| RunError::Other(format!("cannot start signal thread: {e}")))?;
    drop(signal_thread);
    tracing::info!(
        backing = %backing.display(),
        mount = %mount.display(),
        peer = ?ctx.args.peer,
        mount_over = mount == backing,
        standby = ctx.args.standby,
        "primary ready"
    );
    let served = session.run();
    // A standby mount never activated stops here, having written nothing; the
    // receiver it covered gets its read-only protection back.
    match writer.lock().take() {
        Some(w) => stop_writer(w),
        None if took_over => give_back_read_only(&backing, &ctx),
        None => {}
    }
    served.map_err(|e| RunError::Other(format!("FUSE session failed: {e}")))?;
    tracing::info!("primary stopped");
    Ok(())
}

/// A standby mount stopped without activation: the receiver it covered gets
/// its read-only bind back, if it still runs (it holds the state directory's
/// lock). A receiver that stopped meanwhile gets none: it would remove only
/// its own, and the next process on the directory would open it read-only.
fn give_back_read_only(backing: &Path, ctx: &Context) {
    if ctx.lock.as_ref().is_some_and(|l| l.is_held()) {
        tracing::info!("the receiver stopped: no read-only bind to give back");
        return;
    }
    match mounts::restore_read_only(backing) {
        Ok(()) => tracing::info!("the receiver's read-only bind is back"),
        Err(e) => tracing::error!("cannot give the receiver its read-only bind back: {e}"),
    }
}

/// SIGUSR1, SIGUSR2, SIGHUP: for a standby mount, activations; for a writer,
/// go alone, attach the peer, verify.
fn handle_signal(ctx: &Context, writer: &Mutex<Option<Writer>>, signal: i32) {
    use signal_hook::consts::{SIGHUP, SIGUSR1, SIGUSR2};
    if ctx.activation.is_standby() {
        match signal {
            SIGUSR1 => ctx.activate(Start::Alone, writer),
            SIGUSR2 => ctx.activate(Start::Connected, writer),
            _ => tracing::warn!(signal, "ignored in standby"),
        }
        return;
    }
    let guard = writer.lock();
    let Some(w) = guard.as_ref() else {
        return;
    };
    match signal {
        SIGUSR1 => match ctx.disk.failure() {
            // Writing alone on a failed disk would make the bad copy
            // the only one that moves on.
            Some(failure) => tracing::error!(
                failure,
                "SIGUSR1 refused: this node's disk failed; the module must run on the peer"
            ),
            None => w.link.go_degraded("the controller declared the peer dead"),
        },
        SIGUSR2 => match ctx.disk.failure() {
            // A resync from a failed disk would copy a bad copy over
            // the good one.
            Some(failure) => tracing::error!(
                failure,
                "SIGUSR2 refused: this node's disk failed; it cannot be the source of a resync"
            ),
            None => w.join.start(),
        },
        SIGHUP => w.join.verify(),
        _ => {}
    }
}

/// After the unmount: the drain. Every write acknowledged to a writer (under
/// protocol B and flush possibly still queued for the peer) is applied and
/// synced on the peer before this returns, when the peer is reachable: a
/// clean stop leaves an empty activity log, so a later start may replicate
/// at once (a swap: the peer's receiver stops next and this node's starts).
fn stop_writer(w: Writer) {
    let began = std::time::Instant::now();
    w.checkpoints.stop.store(true, Ordering::SeqCst);
    // Not a second of its idle wait: the checkpoint below is the stop's.
    w.tracker.wake_checkpointer();
    let _ = w.checkpoint_thread.join();
    for _ in 0..3 {
        if w.tracker.activity_len() == 0 || !w.checkpoints.at_stop() {
            break;
        }
    }
    // A last barrier whatever the log says: acknowledged only once the peer
    // applied and synced everything queued before it.
    if matches!(w.link.state(), LinkState::Connected | LinkState::Syncing) {
        match w.link.submit_wait(crate::op::Control::SyncAll) {
            Ok(()) => {
                tracing::info!(
                    elapsed_ms = began.elapsed().as_millis(),
                    "drained: the peer applied and synced every acknowledged write"
                )
            }
            Err(e) => tracing::error!("drain: the peer did not confirm the last writes: {e}"),
        }
    }
    w.link.shutdown(w.threads);
    tracing::info!(elapsed_ms = began.elapsed().as_millis(), "writer stopped");
}

/// The first unmount failed (typically EBUSY: a file released a moment ago, or a
/// process still using the mount): retry for a few seconds, then detach it so the
/// session ends once its last user is gone, rather than never.
fn unmount_busy(mount: &Path, first: &std::io::Error) {
    use rustix::mount::{unmount, UnmountFlags};
    tracing::warn!("unmount of {} failed: {first}; retrying", mount.display());
    // Only ever unmount our FUSE mount, never what it covers (mount over).
    const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;
    let ours = || rustix::fs::statfs(mount).is_ok_and(|s| s.f_type == FUSE_SUPER_MAGIC);
    for _ in 0..25 {
        std::thread::sleep(Duration::from_millis(200));
        if !ours() {
            return;
        }
        match unmount(mount, UnmountFlags::empty()) {
            Ok(()) => return,
            // Gone already: the session ends by itself.
            Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOENT) => return,
            Err(_) => {}
        }
    }
    if !ours() {
        return;
    }
    match unmount(mount, UnmountFlags::DETACH) {
        Ok(()) => tracing::warn!(
            "{} still busy: detached; vmha-fs exits when its last user closes it",
            mount.display()
        ),
        Err(e) => tracing::error!("cannot unmount {}: {e}", mount.display()),
    }
}
