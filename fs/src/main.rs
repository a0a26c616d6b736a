//! `vmha-fs`: the replicating filesystem, standalone.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use rustix::fs::{Mode, OFlags};
use vmha_fs::fuse_fs::ReplicatedFs;
use vmha_fs::key::ClusterKey;
use vmha_fs::link::{LinkError, LinkState, PeerLink};
use vmha_fs::mounts::{self, ReadOnlyBind};
use vmha_fs::primary::DiskHealth;
use vmha_fs::receiver::ReceiverServer;
use vmha_fs::resync::{SyncProgress, Syncer};
use vmha_fs::statedir::StateDir;
use vmha_fs::track::Tracker;
use vmha_fs::wire::WireError;

#[derive(Parser, Debug)]
#[command(
    name = "vmha-fs",
    version,
    about = "Synchronously replicated directory for VM images"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write a new cluster key (mode 0600) to FILE.
    Keygen { file: PathBuf },
    /// Receive the primary's operations into DIR (made read-only for everyone else).
    Secondary {
        #[arg(long, value_name = "DIR")]
        backing: PathBuf,
        #[arg(long, value_name = "ADDR:PORT")]
        listen: SocketAddr,
        /// The module this directory belongs to (with the port, bound in the
        /// handshake: a primary of another module is refused as "wrong module").
        #[arg(long, value_name = "NAME", default_value = vmha_fs::wire::DEFAULT_MODULE,
              value_parser = parse_module)]
        module: String,
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
        #[arg(long, value_name = "FILE")]
        key_file: PathBuf,
        /// Fencing: serve only a primary claiming this data generation.
        #[arg(long, value_name = "HEX", value_parser = parse_generation)]
        accept_generation: Option<String>,
        /// This node lost a split brain: before the resync overwrites or removes
        /// anything, save it under STATEDIR/diverged/.
        #[arg(long)]
        save_aside: bool,
    },
    /// Serve DIR through a FUSE mount that replicates every change to the peer.
    Primary {
        #[arg(long, value_name = "DIR")]
        backing: PathBuf,
        /// Mount point; equal to --backing to mount over the directory itself.
        #[arg(long, value_name = "DIR")]
        mount: PathBuf,
        #[arg(long, value_name = "ADDR:PORT", required_unless_present = "alone")]
        peer: Option<SocketAddr>,
        /// The module this directory belongs to (with the port, bound in the
        /// handshake: a primary of another module is refused as "wrong module").
        #[arg(long, value_name = "NAME", default_value = vmha_fs::wire::DEFAULT_MODULE,
              value_parser = parse_module)]
        module: String,
        /// Write without a peer (the controller's ALONE state): the peer is recorded
        /// as outdated in --state before anything is written. With --peer, SIGUSR2
        /// later attaches that peer and brings it up to date with a full copy.
        #[arg(long)]
        alone: bool,
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
        #[arg(long, value_name = "FILE")]
        key_file: PathBuf,
        /// How long a write waits for a silent peer before failing with EIO (unless
        /// SIGUSR1 arrives first: the peer is declared dead, writing goes on alone).
        #[arg(long, value_name = "MS", default_value_t = 5000)]
        lock_timeout_ms: u64,
        /// The data generation this primary writes (claimed to the receiver).
        /// (`STATEDIR/generation`, when present, overrides it for later attaches.)
        #[arg(long, value_name = "HEX", value_parser = parse_generation)]
        generation: Option<String>,
        /// FUSE worker threads.
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=256))]
        threads: u16,
        /// Activity-log size in 4 MiB extents: after a crash of this node while
        /// connected, at most this many × 4 MiB are resent to the peer.
        #[arg(long, default_value_t = vmha_fs::track::DEFAULT_AL_EXTENTS as u32,
              value_parser = clap::value_parser!(u32).range(4..=65536))]
        al_extents: u32,
        /// Resync data rate limit in MB/s (0 = none); live writes are not limited.
        #[arg(long, value_name = "MB_S", default_value_t = 0)]
        rate_limit_mb_s: u64,
    },
}

/// Errors of the command-line front end (each one line).
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Key(#[from] vmha_fs::key::KeyError),
    #[error(transparent)]
    State(#[from] vmha_fs::statedir::StateError),
    #[error(transparent)]
    Mount(#[from] vmha_fs::mounts::MountError),
    #[error(transparent)]
    Receiver(#[from] vmha_fs::receiver::ReceiverError),
    #[error(transparent)]
    Link(#[from] vmha_fs::link::LinkError),
    #[error(transparent)]
    Track(#[from] vmha_fs::track::TrackError),
    #[error("refusing to start replicating at once: the records in {0} say the peer may lack changes made here; start with --alone and attach the peer (SIGUSR2) to resync them")]
    NotInSync(PathBuf),
    #[error("{what} directory {path}: {reason}")]
    Dir {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{0} is already mounted (a FUSE filesystem is mounted there)")]
    AlreadyMounted(PathBuf),
    #[error("refusing to mount over {dir}: process {pid} ({command}) has {path} open; its writes would bypass replication")]
    OpenBeneath {
        dir: PathBuf,
        pid: u32,
        command: String,
        path: PathBuf,
    },
    #[error("cannot mount {path}: {source}")]
    Fuse {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("refusing to write: this node's copy is recorded as not up to date ({reason}); it must first be resynced as the secondary (remove {path} only if you know this copy is the one to keep)")]
    SelfOutdated { path: PathBuf, reason: String },
    #[error("{0}")]
    Other(String),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    // No umask games: replicated nodes get their exact mode by chmod after they
    // are created (apply), and files of our own (state, saved-aside data) are
    // created with explicit private modes, which a umask can only narrow.
    raise_fd_limit();
    let result = match cli.command {
        Command::Keygen { file } => ClusterKey::generate_file(&file)
            .map(|_| ())
            .map_err(CliError::from),
        Command::Secondary {
            backing,
            listen,
            module,
            state,
            key_file,
            accept_generation,
            save_aside,
        } => run_secondary(SecondaryArgs {
            backing,
            listen,
            module,
            state,
            key_file,
            accept_generation,
            save_aside,
        }),
        Command::Primary {
            backing,
            mount,
            peer,
            module,
            alone,
            state,
            key_file,
            lock_timeout_ms,
            generation,
            threads,
            al_extents,
            rate_limit_mb_s,
        } => run_primary(PrimaryArgs {
            rate_limit: rate_limit_mb_s.checked_mul(1_000_000),
            al_extents: al_extents as usize,
            alone,
            generation,
            backing,
            mount,
            peer,
            module,
            state,
            key_file,
            lock_timeout: Duration::from_millis(lock_timeout_ms),
            threads: usize::from(threads),
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmha-fs: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn raise_fd_limit() {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    if let Some(max) = limit.maximum {
        let _ = rustix::process::setrlimit(
            rustix::process::Resource::Nofile,
            rustix::process::Rlimit {
                current: Some(max),
                maximum: Some(max),
            },
        );
    }
}

/// Checks that `path` is a directory and returns its canonical form.
fn existing_dir(what: &'static str, path: &Path) -> Result<PathBuf, CliError> {
    let dir_err = |reason: String| CliError::Dir {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| dir_err(e.to_string()))?;
    if !meta.is_dir() {
        return Err(dir_err("not a directory".into()));
    }
    path.canonicalize().map_err(|e| dir_err(e.to_string()))
}

fn open_dir(what: &'static str, path: &Path) -> Result<OwnedFd, CliError> {
    let fd = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| CliError::Dir {
        what,
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let vfs = rustix::fs::fstatvfs(&fd).map_err(|e| CliError::Other(e.to_string()))?;
    if vfs.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY) {
        return Err(CliError::Dir {
            what,
            path: path.to_path_buf(),
            reason: "is read-only (a read-only bind left by a killed secondary? `umount` it)"
                .into(),
        });
    }
    Ok(fd)
}

/// A data generation id as the controller writes it: 1 to 64 hex digits.
fn parse_generation(text: &str) -> Result<String, String> {
    if (1..=64).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(text.to_ascii_lowercase())
    } else {
        Err("expected 1 to 64 hexadecimal digits".into())
    }
}

/// A module name as the handshake carries it: 1 to 255 bytes.
fn parse_module(text: &str) -> Result<String, String> {
    if (1..=vmha_fs::wire::MAX_MODULE_NAME).contains(&text.len()) {
        Ok(text.to_string())
    } else {
        Err(format!(
            "expected 1 to {} bytes",
            vmha_fs::wire::MAX_MODULE_NAME
        ))
    }
}

struct SecondaryArgs {
    backing: PathBuf,
    listen: SocketAddr,
    module: String,
    state: PathBuf,
    key_file: PathBuf,
    accept_generation: Option<String>,
    save_aside: bool,
}

fn run_secondary(args: SecondaryArgs) -> Result<(), CliError> {
    let SecondaryArgs {
        backing,
        listen,
        module,
        state,
        key_file,
        accept_generation,
        save_aside,
    } = args;
    let (state, key_file) = (state.as_path(), key_file.as_path());
    let key = ClusterKey::load(key_file)?;
    let backing = existing_dir("backing", &backing)?;
    let state_dir = Arc::new(StateDir::open(state)?);
    let tracker = Tracker::open(state_dir.path(), vmha_fs::track::DEFAULT_AL_EXTENTS)?;
    if let Some(reason) = state_dir.self_outdated() {
        // This copy's records say nothing reliable any more (its disk failed while
        // it was the writer): the writer compares every block.
        tracing::warn!(
            reason = reason.trim(),
            "this copy is recorded as not up to date; the writer will compare it block by block"
        );
        tracker
            .invalidate()
            .map_err(|e| CliError::Other(format!("cannot invalidate the records: {e}")))?;
        clear_self_outdated_when_in_sync(state_dir.clone(), tracker.clone())?;
    }
    let root = open_dir("backing", &backing)?;
    let server = ReceiverServer::bind(listen, root, key, &module)?
        .accept_only_generation(accept_generation)
        .with_tracker(tracker);
    let server = if save_aside {
        server.save_aside_to(state_dir.path().to_path_buf())
    } else {
        server
    };
    // After the descriptor is open: only the receiver can write from now on.
    let _read_only = ReadOnlyBind::new(&backing)?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone())
            .map_err(|e| CliError::Other(format!("cannot install signal handler: {e}")))?;
    }
    let addr = server.local_addr().map_or(listen, |a| a);
    tracing::info!(backing = %backing.display(), %addr, "secondary ready");
    server
        .serve(&stop)
        .map_err(|e| CliError::Other(format!("receiver failed: {e}")))?;
    tracing::info!("secondary stopped");
    Ok(())
}

/// Removes `self-outdated` once a resync made this copy identical to the
/// writer's (the records become valid only then).
fn clear_self_outdated_when_in_sync(
    state: Arc<StateDir>,
    tracker: Arc<Tracker>,
) -> Result<(), CliError> {
    std::thread::Builder::new()
        .name("self-outdated".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_millis(250));
            if tracker.is_valid() {
                match state.clear_self_outdated() {
                    Ok(()) => tracing::info!("this copy is up to date again"),
                    Err(e) => tracing::error!("cannot clear the self-outdated record: {e}"),
                }
                return;
            }
        })
        .map(drop)
        .map_err(|e| CliError::Other(format!("cannot start a thread: {e}")))
}

struct PrimaryArgs {
    backing: PathBuf,
    mount: PathBuf,
    peer: Option<SocketAddr>,
    module: String,
    /// Start writing alone (--peer, if given, is attached later on SIGUSR2).
    alone: bool,
    generation: Option<String>,
    state: PathBuf,
    key_file: PathBuf,
    lock_timeout: Duration,
    threads: usize,
    al_extents: usize,
    /// Resync bytes per second; None or 0 = unlimited.
    rate_limit: Option<u64>,
}

fn run_primary(args: PrimaryArgs) -> Result<(), CliError> {
    let key = ClusterKey::load(&args.key_file)?;
    let state = Arc::new(StateDir::open(&args.state)?);
    // First: a copy recorded as behind must not write, whatever its disk says now.
    if let Some(reason) = state.self_outdated() {
        return Err(CliError::SelfOutdated {
            path: state.path().join(vmha_fs::statedir::SELF_OUTDATED),
            reason: reason.trim().to_string(),
        });
    }
    let backing = existing_dir("backing", &args.backing)?;
    let mount = existing_dir("mount", &args.mount)?;
    if mounts::is_fuse_mounted(&mount)? {
        return Err(CliError::AlreadyMounted(mount));
    }
    if mount == backing {
        if let Some(o) = mounts::open_beneath(&backing).into_iter().next() {
            return Err(CliError::OpenBeneath {
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
        return Err(CliError::NotInSync(state.path().join("track")));
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
    let record_outdated: vmha_fs::link::DivergenceHook = Box::new(move |reason| {
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
            args.generation.clone(),
            args.lock_timeout,
            record_outdated,
        )?,
        _ => PeerLink::alone(args.lock_timeout, record_outdated)?,
    };
    let checkpoint_root = root
        .try_clone()
        .map_err(|e| CliError::Other(format!("cannot duplicate the backing descriptor: {e}")))?;
    let fs = ReplicatedFs::new(root, link.clone(), tracker.clone(), disk.clone())
        .map_err(|e| CliError::Other(format!("cannot read backing directory: {e}")))?;
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
            .map_err(|e| CliError::Other(format!("cannot start checkpoint thread: {e}")))?
    };
    let progress = Arc::new(SyncProgress::default());
    let syncer = fs.syncer(progress.clone()).with_rate_limit(args.rate_limit);
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
            return Err(CliError::Fuse {
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
    .map_err(|e| CliError::Other(format!("cannot install signal handler: {e}")))?;
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
        .map_err(|e| CliError::Other(format!("cannot start signal thread: {e}")))?;
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
    served.map_err(|e| CliError::Other(format!("FUSE session failed: {e}")))?;
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

/// Set when the peer's receiver refused our generation (fencing); cleared by the
/// next attach.
type Fenced = Arc<parking_lot::Mutex<Option<String>>>;

/// The link's state as `STATEDIR/link.json` names it; `stalled` when connected
/// without any acknowledgement for `stall` while work waits (the replication
/// network may be down: no error reaches us, writes just wait); `fenced` while
/// the last attach was refused for a stale generation and the link writes alone.
fn link_status(
    link: &PeerLink,
    disk: &DiskHealth,
    fenced: &Fenced,
    stall: Duration,
) -> (&'static str, Option<String>) {
    if let Some(failure) = disk.failure() {
        return ("disk_failed", Some(failure.to_string()));
    }
    match link.state() {
        LinkState::Connected if link.stalled_for().is_some_and(|d| d >= stall) => (
            "stalled",
            Some(format!(
                "no acknowledgement for over {} ms",
                stall.as_millis()
            )),
        ),
        LinkState::Connected => ("connected", None),
        LinkState::Lost => ("lost", None),
        LinkState::Failed(reason) => ("failed", Some(reason)),
        LinkState::Degraded => match fenced.lock().clone() {
            Some(reason) => ("fenced", Some(reason)),
            None => ("degraded", None),
        },
        LinkState::Attaching => ("attaching", None),
        LinkState::Syncing => ("syncing", None),
    }
}

const LINK_STATUS_BUSY: Duration = Duration::from_millis(25);
const LINK_STATUS_IDLE: Duration = Duration::from_millis(1000);

/// Writes `link.json` now and on every change after (polled: the link's hot
/// path stays free of file writes). A stall is reported after half the lock
/// timeout, leaving the controller the other half to mark the peer outdated
/// and send SIGUSR1. The thread ends with the process.
fn publish_link_status(
    link: PeerLink,
    disk: Arc<DiskHealth>,
    state: Arc<StateDir>,
    fenced: Fenced,
    lock_timeout: Duration,
    tracker: Arc<Tracker>,
) -> Result<(), CliError> {
    let stall = lock_timeout / 2;
    let mut last = link_status(&link, &disk, &fenced, stall);
    state.write_link_status(last.0, last.1.as_deref());
    let mut changed = (u64::MAX, std::time::Instant::now());
    std::thread::Builder::new()
        .name("link-status".into())
        .spawn(move || loop {
            // Woken by every change of the link; idle, about once a second. While
            // work is outstanding, often enough to report a stall on time, and
            // never more than every 25 ms.
            let started = std::time::Instant::now();
            let busy = link.stalled_for().is_some();
            // A stall begins without a wake-up (work is queued silently): the
            // idle wait is short enough to see it well before it is reported.
            link.wait_changed(if busy {
                LINK_STATUS_BUSY
            } else {
                LINK_STATUS_IDLE.min(stall / 4)
            });
            std::thread::sleep(LINK_STATUS_BUSY.saturating_sub(started.elapsed()));
            let now = link_status(&link, &disk, &fenced, stall);
            if now != last {
                state.write_link_status(now.0, now.1.as_deref());
                last = now;
            }
            // Bytes changed without the peer, for the controller (at most once a
            // second; informational, not fsynced).
            if changed.1.elapsed() >= Duration::from_secs(1) {
                let bytes = tracker.changed_bytes();
                if bytes != changed.0 {
                    state.write_changed_bytes(bytes);
                }
                changed = (bytes, std::time::Instant::now());
            }
        })
        .map(drop)
        .map_err(|e| CliError::Other(format!("cannot start link status thread: {e}")))
}

/// The receiver's reason when it refused us for claiming another generation.
fn stale_refusal(error: &LinkError) -> Option<String> {
    match error {
        LinkError::Protocol {
            source: WireError::Refused(reason),
            ..
        } if reason.starts_with(vmha_fs::receiver::STALE_WRITER) => Some(reason.clone()),
        _ => None,
    }
}

/// Retires activity-log entries once both copies are durable: when the log is full,
/// at a clean stop, and every few seconds while writing alone.
#[derive(Clone)]
struct Checkpointer {
    tracker: Arc<Tracker>,
    link: PeerLink,
    disk: Arc<DiskHealth>,
    root: Arc<std::os::fd::OwnedFd>,
    stop: Arc<AtomicBool>,
}

impl Checkpointer {
    const INTERVAL: Duration = Duration::from_secs(5);
    const RETRY: Duration = Duration::from_millis(100);

    fn run(&self) {
        let mut last = std::time::Instant::now();
        while !self.stop.load(Ordering::SeqCst) {
            let full = self
                .tracker
                .wait_checkpoint_request(Duration::from_millis(1000));
            // Connected, extents leave the log only when it is full (DRBD's hot
            // set): retiring hot extents on a timer would make every write to them
            // log them again (measured: seqwrite 0.54× → 0.37× of local). Writing
            // alone, a timer also writes the exact blocks, so a crash folds little.
            let alone = self.link.state().writes_alone();
            if full || (alone && last.elapsed() >= Self::INTERVAL) {
                last = std::time::Instant::now();
                if !self.once() {
                    // A full log asks again at once: without a pause a failing disk
                    // or a lost peer would make this loop spin.
                    std::thread::sleep(Self::RETRY);
                }
            }
        }
    }

    /// One checkpoint; false if it could not complete. Connected, both copies are
    /// made durable first; writing alone, only the dirty maps' pending blocks.
    fn once(&self) -> bool {
        use vmha_fs::link::LinkState;
        // A failed sync is never retried into success: on a failed disk the
        // logged extents stay logged (the resync then compares everything anyway).
        if self.disk.is_failed() {
            return false;
        }
        let connected = match self.link.state() {
            LinkState::Connected | LinkState::Syncing => true,
            LinkState::Degraded | LinkState::Attaching => false,
            LinkState::Lost | LinkState::Failed(_) => return false,
        };
        let (epoch, idle) = match self.tracker.checkpoint_begin() {
            Ok(Some(begun)) => begun,
            Ok(None) => return true,
            Err(e) => {
                tracing::error!("checkpoint: {e}");
                return false;
            }
        };
        if connected {
            if let Err(e) = self
                .disk
                .watch("checkpoint sync", rustix::fs::syncfs(&*self.root))
            {
                tracing::warn!("checkpoint: local sync failed: {e}");
                return false;
            }
            if let Err(e) = self.link.submit_wait(vmha_fs::op::Op::SyncAll) {
                tracing::debug!("checkpoint: the peer did not sync: {e}");
                return false;
            }
            // Still sending: the SyncAll really reached the peer (not completed locally).
            if !matches!(self.link.state(), LinkState::Connected | LinkState::Syncing) {
                return false;
            }
        }
        match self.tracker.checkpoint_end(epoch, idle) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!("checkpoint: {e}");
                false
            }
        }
    }
}

/// Attaches the configured peer to a link that writes alone and copies everything to
/// it (SIGUSR2), reporting progress in `STATEDIR/sync.json`.
struct Joiner {
    link: PeerLink,
    syncer: Arc<Syncer>,
    progress: Arc<SyncProgress>,
    state: Arc<StateDir>,
    peer: Option<SocketAddr>,
    module: String,
    key: ClusterKey,
    generation: Option<String>,
    running: Arc<AtomicBool>,
    fenced: Fenced,
}

impl Joiner {
    /// Compares the peer's copy with ours (SIGHUP), changing nothing; the outcome
    /// goes to `STATEDIR/verify.json`.
    fn verify(&self) {
        if self.running.swap(true, Ordering::SeqCst) {
            tracing::warn!("SIGHUP: a sync or verify is already running");
            return;
        }
        let (syncer, progress, state, running) = (
            self.syncer.clone(),
            self.progress.clone(),
            self.state.clone(),
            self.running.clone(),
        );
        let write =
            move |status: &str, differing: &[vmha_fs::resync::Difference], error: Option<&str>| {
                let json = serde_json::json!({
                    "state": status,
                    "done_bytes": progress.done_bytes.load(Ordering::Relaxed),
                    "total_bytes": progress.total_bytes.load(Ordering::Relaxed),
                    "differing": differing,
                    "error": error,
                });
                if let Err(e) = vmha_fs::statedir::write_file_atomically(
                    &state.path().join("verify.json"),
                    format!("{json}\n").as_bytes(),
                ) {
                    tracing::warn!("cannot write verify.json: {e}");
                }
            };
        let spawned = std::thread::Builder::new()
            .name("verify".into())
            .spawn(move || {
                write("running", &[], None);
                let outcome = syncer.verify();
                running.store(false, Ordering::SeqCst);
                match outcome {
                    Ok(differing) => {
                        if differing.is_empty() {
                            tracing::info!("verify: the peer's copy is identical");
                        } else {
                            tracing::error!(
                                regions = differing.len(),
                                "verify: the peer's copy differs"
                            );
                        }
                        write("done", &differing, None);
                    }
                    Err(e) => {
                        tracing::error!("verify failed: {e}");
                        write("failed", &[], Some(&e.to_string()));
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start the verify thread: {e}");
            self.running.store(false, Ordering::SeqCst);
        }
    }

    fn start(&self) {
        let Some(peer) = self.peer else {
            tracing::error!("SIGUSR2: no --peer to attach");
            return;
        };
        if self.running.swap(true, Ordering::SeqCst) {
            tracing::warn!("SIGUSR2: a sync is already running");
            return;
        }
        // A new sync never shows the previous one's counters.
        self.progress.done_bytes.store(0, Ordering::Relaxed);
        self.progress.total_bytes.store(0, Ordering::Relaxed);
        let module = self.module.clone();
        let (link, syncer, progress, state, key, running, fenced) = (
            self.link.clone(),
            self.syncer.clone(),
            self.progress.clone(),
            self.state.clone(),
            self.key.clone(),
            self.running.clone(),
            self.fenced.clone(),
        );
        *fenced.lock() = None;
        // The controller writes the current generation here when it changes.
        let generation = state.generation().or_else(|| self.generation.clone());
        let spawned = std::thread::Builder::new()
            .name("full-sync".into())
            .spawn(move || {
                let done = AtomicBool::new(false);
                // The final status is written once the progress writer has
                // stopped: it could otherwise overwrite it with "syncing".
                let outcome = std::thread::scope(|scope| {
                    scope.spawn(|| {
                        let mut written: Option<std::time::Instant> = None;
                        while !done.load(Ordering::SeqCst) {
                            if written.is_none_or(|at| at.elapsed() >= Duration::from_millis(500)) {
                                state.write_sync_status("syncing", &progress, None);
                                written = Some(std::time::Instant::now());
                            }
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    });
                    let outcome = match link.attach(peer, &key, &module, generation) {
                        Ok(report) => syncer.run(report).map_err(|e| e.to_string()),
                        Err(e) => {
                            if let Some(reason) = stale_refusal(&e) {
                                tracing::error!(%peer, reason, "fenced: the peer refused our generation");
                                *fenced.lock() = Some(reason);
                            }
                            Err(e.to_string())
                        }
                    };
                    done.store(true, Ordering::SeqCst);
                    outcome
                });
                running.store(false, Ordering::SeqCst);
                match outcome {
                    Ok(outcome) => {
                        let (bytes, incremental) = (outcome.data_bytes, outcome.incremental);
                        if let Err(e) = state.clear_peer_outdated() {
                            tracing::error!("peer in sync, but the record says otherwise: {e}");
                        }
                        tracing::info!(bytes, incremental, %peer, "sync done: the peer is in sync");
                        state.write_sync_status("in_sync", &progress, None);
                    }
                    Err(e) => {
                        tracing::error!(%peer, "sync failed: {e}");
                        state.write_sync_status("alone", &progress, Some(&e));
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start the sync thread: {e}");
            self.running.store(false, Ordering::SeqCst);
        }
    }
}
