//! `vmhad --config FILE --node NAME`: the vmha controller daemon.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use vmha_controller::clock::WallClock;
use vmha_controller::config::Config;
use vmha_controller::daemon::{Daemon, DaemonSpec};
use vmha_controller::driver::fake::{FakeFs, FakeVm};
use vmha_controller::driver::libvirt::LibvirtDriver;
use vmha_controller::driver::vmha_fs::VmhaFsDriver;
use vmha_controller::driver::{FsDriver, VmDriver};
use vmha_fs::key::ClusterKey;

#[derive(Parser, Debug)]
#[command(
    name = "vmhad",
    version,
    about = "vmha controller: heartbeats, module states, failover"
)]
struct Args {
    /// The cluster configuration (identical on both nodes).
    #[arg(long, value_name = "FILE", default_value = "/etc/vmha/vmha.toml")]
    config: PathBuf,
    /// This node's name, as in a [[node]] section.
    #[arg(long, value_name = "NAME")]
    node: String,
    /// The vmha-fs binary (default: next to vmhad, else from PATH).
    #[arg(long, value_name = "PATH")]
    vmha_fs: Option<PathBuf>,
    /// Test only: fake VM and filesystem drivers (nothing is started).
    #[arg(long, hide = true)]
    fake_drivers: bool,
}

/// Errors of the command line front end (each printed as one line).
#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error(transparent)]
    Config(#[from] vmha_controller::config::ConfigError),
    #[error(transparent)]
    Key(#[from] vmha_fs::key::KeyError),
    #[error(transparent)]
    Clock(#[from] vmha_controller::clock::ClockError),
    #[error(transparent)]
    Daemon(#[from] vmha_controller::daemon::DaemonError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot install signal handlers: {0}")]
    Signal(std::io::Error),
    #[error(transparent)]
    Version(#[from] vmha_fs::version::VersionError),
}

fn default_vmha_fs() -> PathBuf {
    let sibling = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("vmha-fs")));
    match sibling {
        Some(path) if path.exists() => path,
        _ => PathBuf::from("vmha-fs"),
    }
}

fn run(args: Args) -> Result<(), MainError> {
    let config = Config::load(&args.config)?;
    let node = config.local_node(&args.node)?;
    let key = ClusterKey::load(Path::new(&config.cluster.key_file))?;
    let clock = WallClock::from_env()?;
    // Test hooks narrowing the advertised protocol versions: a bad value is an
    // error, never silently the full range (vmha-fs children inherit theirs).
    vmha_controller::channel::check_env()?;
    vmha_controller::heartbeat::check_env()?;
    vmha_fs::wire::REPLICATION.from_env(vmha_fs::version::REPLICATION_ENV)?;
    if clock.offset_s() != 0 {
        tracing::warn!(
            offset_s = clock.offset_s(),
            "test hook {}: the wall clock is offset",
            vmha_controller::clock::OFFSET_ENV
        );
    }
    let (vm, fs): (Arc<dyn VmDriver>, Arc<dyn FsDriver>) = if args.fake_drivers {
        (Arc::new(FakeVm::new()), Arc::new(FakeFs::new()))
    } else {
        let binary = args.vmha_fs.unwrap_or_else(default_vmha_fs);
        (
            Arc::new(LibvirtDriver::new()),
            Arc::new(VmhaFsDriver::new(binary, config.clone(), node)),
        )
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(MainError::Runtime)?;
    runtime.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).map_err(MainError::Signal)?;
        let mut int = signal(SignalKind::interrupt()).map_err(MainError::Signal)?;
        let daemon = Daemon::start(DaemonSpec {
            config,
            node,
            key,
            vm,
            fs,
            clock,
        })
        .await?;
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping the modules"),
            _ = int.recv() => tracing::info!("SIGINT: stopping the modules"),
        }
        daemon.shutdown().await;
        tracing::info!("vmhad stopped");
        Ok(())
    })
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours for a person at a terminal only: logs and journald get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmhad: {e}");
            ExitCode::FAILURE
        }
    }
}
