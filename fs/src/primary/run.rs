//! Running a primary (`vmha-fs primary`): the FUSE session over the replicated
//! directory, the link, the checkpointer, the link status, and the signals the
//! controller sends (SIGUSR1 go alone, SIGUSR2 attach the peer, SIGHUP verify,
//! SIGTERM/SIGINT unmount).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::checkpoint::Checkpointer;
use super::fuse::ReplicatedFs;
use super::join::Joiner;
use super::status::publish_link_status;
use super::DiskHealth;
use crate::key::ClusterKey;
use crate::link::PeerLink;
use crate::mounts;
use crate::resync::SyncProgress;
use crate::runtime::{existing_dir, open_dir, RunError};
use crate::statedir::StateDir;
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
}

/// Serves the mount until SIGTERM or SIGINT, then unmounts.
pub fn run(args: PrimaryConfig) -> Result<(), RunError> {
    let key = ClusterKey::load(&args.key_file)?;
    let state = Arc::new(StateDir::open(&args.state)?);
    // First: a copy recorded as behind must not write, whatever its disk says now.
    if let Some(reason) = state.self_outdated() {
        return Err(RunError::SelfOutdated {
            path: state.path().join(crate::status::SELF_OUTDATED),
            reason: reason.trim().to_string(),
        });
    }
    let backing = existing_dir("backing", &args.backing)?;
    let mount = existing_dir("mount", &args.mount)?;
    if mounts::is_fuse_mounted(&mount)? {
        return Err(RunError::AlreadyMounted(mount));
    }
    if mount == backing {
        if let Some(o) = mounts::open_beneath(&backing).into_iter().next() {
            return Err(RunError::OpenBeneath {
                dir: backing,
                pid: o.pid,
                command: o.command,
                path: o.path,
            });
        }
    }
    if let Some(reason) = state.peer_outdated() {
        tracing::warn!(
            reason,
            "the peer was marked outdated earlier; its copy needs a resync"
        );
    }
    let root = open_dir("backing", &backing)?;
    let tracker = Tracker::open(state.path(), args.al_extents)?;
    if !args.alone && args.peer.is_some() && !tracker.is_clean() {
        return Err(RunError::NotInSync(state.path().join("track")));
    }
    let marker = state.clone();
    let disk = Arc::new(DiskHealth::new(Box::new(move |reason| {
        if let Err(e) = marker.mark_self_outdated(reason) {
            // Its disk may be the failed one: the status still says it.
            tracing::error!("cannot record that this copy is outdated: {e}");
        }
    })));
    let marker = state.clone();
    let local_disk = disk.clone();
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
    let (link, threads) = match (args.alone, args.peer) {
        (false, Some(peer)) => PeerLink::connect(
            peer,
            &key,
            &args.module,
            args.generation.clone().map(String::from),
            args.lock_timeout,
            record_outdated,
        )?,
        _ => PeerLink::alone(args.lock_timeout, record_outdated)?,
    };
    link.set_protocol(args.protocol);
    tracing::info!(protocol = %args.protocol, "replication protocol");
    let checkpoint_root = root
        .try_clone()
        .map_err(|e| RunError::Other(format!("cannot duplicate the backing descriptor: {e}")))?;
    let fs = ReplicatedFs::new(root, link.clone(), tracker.clone(), disk.clone())
        .map_err(|e| RunError::Other(format!("cannot read backing directory: {e}")))?;
    let checkpoints = Checkpointer {
        tracker: tracker.clone(),
        link: link.clone(),
        disk: disk.clone(),
        root: Arc::new(checkpoint_root),
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
    let syncer = fs
        .syncer(progress.clone())
        .with_rate_limit(args.rate_limit)
        .with_streams(args.resync_streams);
    let metrics = fs.metrics();
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(format!("vmha:{}", backing.display())),
        fuser::MountOption::Subtype("vmha".into()),
        fuser::MountOption::DefaultPermissions,
    ];
    config.acl = fuser::SessionACL::All;
    config.n_threads = Some(args.threads);
    config.clone_fd = true;
    let mut session = match fuser::Session::new(fs, &mount, &config) {
        Ok(s) => s,
        Err(source) => {
            link.shutdown(threads);
            return Err(RunError::Fuse {
                path: mount,
                source,
            });
        }
    };
    let mut unmounter = session.unmount_callable();
    let mount_path = mount.clone();
    let degrade = link.clone();
    let signal_disk = disk.clone();
    let fenced = Arc::new(parking_lot::Mutex::new(None));
    publish_link_status(
        link.clone(),
        disk.clone(),
        state.clone(),
        fenced.clone(),
        args.lock_timeout,
        tracker.clone(),
        metrics,
    )?;
    let join = Joiner {
        link: link.clone(),
        syncer: Arc::new(syncer),
        progress,
        state: state.clone(),
        peer: args.peer,
        module: args.module.clone(),
        key,
        generation: args.generation.clone(),
        running: Arc::new(AtomicBool::new(false)),
        fenced,
    };
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGUSR1,
        signal_hook::consts::SIGUSR2,
        signal_hook::consts::SIGHUP,
    ])
    .map_err(|e| RunError::Other(format!("cannot install signal handler: {e}")))?;
    let signal_thread = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if signal == signal_hook::consts::SIGUSR1 {
                    match signal_disk.failure() {
                        // Writing alone on a failed disk would make the bad copy
                        // the only one that moves on.
                        Some(failure) => tracing::error!(
                            failure,
                            "SIGUSR1 refused: this node's disk failed; the module must run on the peer"
                        ),
                        None => degrade.go_degraded("the controller declared the peer dead"),
                    }
                    continue;
                }
                if signal == signal_hook::consts::SIGUSR2 {
                    match signal_disk.failure() {
                        // A resync from a failed disk would copy a bad copy over
                        // the good one.
                        Some(failure) => tracing::error!(
                            failure,
                            "SIGUSR2 refused: this node's disk failed; it cannot be the source of a resync"
                        ),
                        None => join.start(),
                    }
                    continue;
                }
                if signal == signal_hook::consts::SIGHUP {
                    join.verify();
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
        peer = ?args.peer,
        mount_over = mount == backing,
        "primary ready"
    );
    let served = session.run();
    checkpoints.stop.store(true, Ordering::SeqCst);
    let _ = checkpoint_thread.join();
    // A clean stop leaves an empty activity log when the peer is reachable, so a
    // later start may replicate at once (after a swap, say).
    for _ in 0..3 {
        if tracker.activity_len() == 0 || !checkpoints.once() {
            break;
        }
    }
    link.shutdown(threads);
    served.map_err(|e| RunError::Other(format!("FUSE session failed: {e}")))?;
    tracing::info!("primary stopped");
    Ok(())
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
