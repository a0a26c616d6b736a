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
use vmha_fs::link::PeerLink;
use vmha_fs::mounts::{self, ReadOnlyBind};
use vmha_fs::receiver::ReceiverServer;
use vmha_fs::resync::{SyncProgress, Syncer};
use vmha_fs::statedir::StateDir;
use vmha_fs::track::Tracker;

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
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
        #[arg(long, value_name = "FILE")]
        key_file: PathBuf,
        /// Fencing: serve only a primary claiming this data generation.
        #[arg(long, value_name = "HEX", value_parser = parse_generation)]
        accept_generation: Option<String>,
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
    // Modes arrive fully decided from the kernel or the primary.
    rustix::process::umask(Mode::empty());
    raise_fd_limit();
    let result = match cli.command {
        Command::Keygen { file } => ClusterKey::generate_file(&file)
            .map(|_| ())
            .map_err(CliError::from),
        Command::Secondary {
            backing,
            listen,
            state,
            key_file,
            accept_generation,
        } => run_secondary(&backing, listen, &state, &key_file, accept_generation),
        Command::Primary {
            backing,
            mount,
            peer,
            alone,
            state,
            key_file,
            lock_timeout_ms,
            generation,
            threads,
            al_extents,
        } => run_primary(PrimaryArgs {
            al_extents: al_extents as usize,
            alone,
            generation,
            backing,
            mount,
            peer,
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

fn run_secondary(
    backing: &Path,
    listen: SocketAddr,
    state: &Path,
    key_file: &Path,
    accept_generation: Option<String>,
) -> Result<(), CliError> {
    let key = ClusterKey::load(key_file)?;
    let backing = existing_dir("backing", backing)?;
    let state_dir = StateDir::open(state)?;
    let tracker = Tracker::open(state_dir.path(), vmha_fs::track::DEFAULT_AL_EXTENTS)?;
    let root = open_dir("backing", &backing)?;
    let server = ReceiverServer::bind(listen, root, key)?
        .accept_only_generation(accept_generation)
        .with_tracker(tracker);
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

struct PrimaryArgs {
    backing: PathBuf,
    mount: PathBuf,
    peer: Option<SocketAddr>,
    /// Start writing alone (--peer, if given, is attached later on SIGUSR2).
    alone: bool,
    generation: Option<String>,
    state: PathBuf,
    key_file: PathBuf,
    lock_timeout: Duration,
    threads: usize,
    al_extents: usize,
}

fn run_primary(args: PrimaryArgs) -> Result<(), CliError> {
    let key = ClusterKey::load(&args.key_file)?;
    let backing = existing_dir("backing", &args.backing)?;
    let mount = existing_dir("mount", &args.mount)?;
    let state = Arc::new(StateDir::open(&args.state)?);
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
    let record_outdated: vmha_fs::link::DivergenceHook = Box::new(move |reason| {
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
            args.generation.clone(),
            args.lock_timeout,
            record_outdated,
        )?,
        _ => PeerLink::alone(args.lock_timeout, record_outdated)?,
    };
    let checkpoint_root = root
        .try_clone()
        .map_err(|e| CliError::Other(format!("cannot duplicate the backing descriptor: {e}")))?;
    let fs = ReplicatedFs::new(root, link.clone(), tracker.clone())
        .map_err(|e| CliError::Other(format!("cannot read backing directory: {e}")))?;
    let checkpoints = Checkpointer {
        tracker: tracker.clone(),
        link: link.clone(),
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
    let syncer = fs.syncer(progress.clone());
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
    let degrade = link.clone();
    let join = Joiner {
        link: link.clone(),
        syncer: Arc::new(syncer),
        progress,
        state: state.clone(),
        peer: args.peer,
        key,
        generation: args.generation.clone(),
        running: Arc::new(AtomicBool::new(false)),
    };
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGUSR1,
        signal_hook::consts::SIGUSR2,
    ])
    .map_err(|e| CliError::Other(format!("cannot install signal handler: {e}")))?;
    let signal_thread = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if signal == signal_hook::consts::SIGUSR1 {
                    degrade.go_degraded("the controller declared the peer dead");
                    continue;
                }
                if signal == signal_hook::consts::SIGUSR2 {
                    join.start();
                    continue;
                }
                tracing::info!("signal received, unmounting");
                if let Err(e) = unmounter.unmount() {
                    tracing::error!("unmount failed: {e}");
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

/// Retires activity-log entries once both copies are durable: every few seconds while
/// the log is not empty, at once when it is full.
#[derive(Clone)]
struct Checkpointer {
    tracker: Arc<Tracker>,
    link: PeerLink,
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
                .wait_checkpoint_request(Duration::from_millis(250));
            if full || last.elapsed() >= Self::INTERVAL {
                last = std::time::Instant::now();
                if !self.once() {
                    // A full log asks again at once: without a pause a failing disk
                    // or a lost peer would make this loop spin.
                    std::thread::sleep(Self::RETRY);
                }
            }
        }
    }

    /// One checkpoint; false if it could not complete.
    fn once(&self) -> bool {
        use vmha_fs::link::LinkState;
        if !matches!(self.link.state(), LinkState::Connected | LinkState::Syncing) {
            return false;
        }
        let Some((epoch, idle)) = self.tracker.checkpoint_begin() else {
            return true;
        };
        if let Err(e) = rustix::fs::syncfs(&*self.root) {
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
    key: ClusterKey,
    generation: Option<String>,
    running: Arc<AtomicBool>,
}

impl Joiner {
    fn start(&self) {
        let Some(peer) = self.peer else {
            tracing::error!("SIGUSR2: no --peer to attach");
            return;
        };
        if self.running.swap(true, Ordering::SeqCst) {
            tracing::warn!("SIGUSR2: a sync is already running");
            return;
        }
        let (link, syncer, progress, state, key, running) = (
            self.link.clone(),
            self.syncer.clone(),
            self.progress.clone(),
            self.state.clone(),
            self.key.clone(),
            self.running.clone(),
        );
        // The controller writes the current generation here when it changes.
        let generation = state.generation().or_else(|| self.generation.clone());
        let spawned = std::thread::Builder::new()
            .name("full-sync".into())
            .spawn(move || {
                let done = AtomicBool::new(false);
                std::thread::scope(|scope| {
                    scope.spawn(|| {
                        while !done.load(Ordering::SeqCst) {
                            state.write_sync_status("syncing", &progress, None);
                            std::thread::sleep(Duration::from_millis(500));
                        }
                    });
                    let outcome = link
                        .attach(peer, &key, generation)
                        .map_err(|e| e.to_string())
                        .and_then(|report| syncer.run(report).map_err(|e| e.to_string()));
                    done.store(true, Ordering::SeqCst);
                    match outcome {
                        Ok(outcome) => {
                            let (bytes, incremental) =
                                (outcome.data_bytes, outcome.incremental);
                            if let Err(e) = state.clear_peer_outdated() {
                                tracing::error!("peer in sync, but the record says otherwise: {e}");
                            }
                            tracing::info!(bytes, incremental, %peer, "sync done: the peer is in sync");
                            state.write_sync_status("in_sync", &progress, None);
                        }
                        Err(e) => {
                            tracing::error!(%peer, "full sync failed: {e}; writing alone");
                            state.write_sync_status("alone", &progress, Some(&e));
                        }
                    }
                });
                running.store(false, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start the sync thread: {e}");
            self.running.store(false, Ordering::SeqCst);
        }
    }
}
