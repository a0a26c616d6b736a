//! `vmha-fs`: the replicating filesystem, standalone. Arguments only: the work is
//! in the library ([`vmha_fs::primary::run`], [`vmha_fs::secondary::run`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use vmha_fs::key::ClusterKey;
use vmha_fs::primary::PrimaryConfig;
use vmha_fs::runtime::{raise_data_path_priority, raise_fd_limit, RunError};
use vmha_fs::secondary::SecondaryConfig;
use vmha_fs::status::GenerationId;

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
        #[arg(long, value_name = "ADDR:PORT", value_parser = parse_socket_addr)]
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
        accept_generation: Option<GenerationId>,
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
        #[arg(long, value_name = "ADDR:PORT", required_unless_present = "alone",
              value_parser = parse_socket_addr)]
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
        /// Live swap destination: mount over the directory while this node's
        /// receiver (`vmha-fs secondary`, same --backing and --state) still
        /// applies the writer's changes. Opens and reads work, every change
        /// fails with EROFS, nothing is written to --state and the peer is not
        /// contacted until SIGUSR2 (become a connected writer, nothing copied)
        /// or SIGUSR1 (write alone) activates it in place; SIGTERM unmounts.
        #[arg(long, requires = "peer", conflicts_with = "alone")]
        standby: bool,
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
        generation: Option<GenerationId>,
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
        /// Reader threads of a resync: how many files and regions are read and
        /// queued for the peer at once (the rate limit covers them together).
        #[arg(long, value_name = "N", default_value_t = vmha_fs::DEFAULT_RESYNC_STREAMS as u32,
              value_parser = clap::value_parser!(u32).range(1..=vmha_fs::MAX_RESYNC_STREAMS as i64))]
        resync_streams: u32,
        /// When a write returns: C = applied on both nodes; B = applied here and
        /// received by the peer; flush = applied here and queued for the peer
        /// (fsync, fdatasync and O_SYNC/O_DSYNC writes always return only once
        /// both nodes synced everything before them).
        #[arg(long, value_name = "C|B|flush", default_value = "C",
              value_parser = parse_protocol)]
        protocol: vmha_fs::Protocol,
        /// How a guest's O_DIRECT writes reach this copy: cached = through the
        /// page cache, their writeback started at once (as the peer applies
        /// them); direct = O_DIRECT. fsync is the same either way: it returns
        /// once both copies flushed.
        #[arg(long, value_name = "cached|direct", default_value = "cached",
              value_parser = parse_local_writes)]
        local_writes: vmha_fs::LocalWrites,
    },
}

/// `IP:PORT` or `HOST:PORT` (a host name is resolved once, IPv4 first).
fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    use std::net::ToSocketAddrs;
    let bad =
        || format!("`{text}` is neither IP:PORT nor HOST:PORT with a host name that resolves");
    let all: Vec<SocketAddr> = text.to_socket_addrs().map_err(|_| bad())?.collect();
    all.iter()
        .copied()
        .find(SocketAddr::is_ipv4)
        .or_else(|| all.first().copied())
        .ok_or_else(bad)
}

fn main() -> ExitCode {
    if let Some(code) = vmha_cli::docs::run_if_asked(Cli::command) {
        return code;
    }
    let cli = Cli::parse();
    let module = match &cli.command {
        Command::Primary { module, .. } | Command::Secondary { module, .. } => Some(module.clone()),
        Command::Keygen { .. } => None,
    };
    vmha_cli::logging::init(vmha_cli::logging::Fields {
        node: None,
        module: module.as_deref(),
    });
    // No umask games: replicated nodes get their exact mode by chmod after they
    // are created (apply), and files of our own (state, saved-aside data) are
    // created with explicit private modes, which a umask can only narrow.
    raise_fd_limit();
    if module.is_some() {
        // Before any thread of the data path starts: they inherit it.
        raise_data_path_priority();
    }
    // The test hook that narrows the advertised replication versions: a bad value
    // is one clear line, never silently the full range.
    if let Err(e) = vmha_fs::wire::REPLICATION.from_env(vmha_fs::version::REPLICATION_ENV) {
        eprintln!("vmha-fs: error: {e}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Keygen { file } => ClusterKey::generate_file(&file)
            .map(|_| ())
            .map_err(RunError::from),
        Command::Secondary {
            backing,
            listen,
            module,
            state,
            key_file,
            accept_generation,
            save_aside,
        } => vmha_fs::secondary::run(SecondaryConfig {
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
            standby,
            state,
            key_file,
            lock_timeout_ms,
            generation,
            threads,
            al_extents,
            rate_limit_mb_s,
            resync_streams,
            protocol,
            local_writes,
        } => vmha_fs::primary::run(PrimaryConfig {
            local_writes,
            resync_streams: resync_streams as usize,
            protocol,
            rate_limit: rate_limit_mb_s.checked_mul(1_000_000),
            al_extents: al_extents as usize,
            alone,
            standby,
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

/// A data generation id as the controller writes it: 1 to 64 hex digits.
fn parse_generation(text: &str) -> Result<GenerationId, String> {
    GenerationId::try_from(text).map_err(|_| "expected 1 to 64 hexadecimal digits".into())
}

fn parse_protocol(text: &str) -> Result<vmha_fs::Protocol, String> {
    text.parse()
}

fn parse_local_writes(text: &str) -> Result<vmha_fs::LocalWrites, String> {
    text.parse()
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
