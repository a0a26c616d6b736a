//! `vmhad --config FILE --node NAME`: the vmha controller daemon.
//! `vmhad --check-config [--config FILE] [--node NAME]`: check the file and
//! this host, print every problem, exit 0 only when there is no error.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{CommandFactory, Parser};
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
    /// This node's name, as in a `[[node]]` section (required to run; for
    /// --check-config the running vmhad's, or the node whose addresses are here).
    #[arg(long, value_name = "NAME")]
    node: Option<String>,
    /// Check the configuration file (every error with file:line:column and
    /// key) and this host (addresses, directories, ports, libvirt, witness,
    /// key file), then exit: 0 only when no error remains.
    #[arg(long)]
    check_config: bool,
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
    #[error("--node NAME is required (this node's name, as in a [[node]] section)")]
    NoNode,
    #[error("the configuration check found {0} error(s)")]
    Check(usize),
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

fn check_config(args: &Args) -> Result<(), MainError> {
    let report = vmha_controller::check::check_file(&args.config, args.node.as_deref());
    for line in &report.lines {
        println!("{line}");
    }
    println!("{}", report.summary());
    match report.errors {
        0 => Ok(()),
        n => Err(MainError::Check(n)),
    }
}

fn run(args: Args) -> Result<(), MainError> {
    if args.check_config {
        return check_config(&args);
    }
    let node_name = args.node.clone().ok_or(MainError::NoNode)?;
    // Absolute: what a reload re-reads does not depend on the working directory.
    let config_file = std::path::absolute(&args.config).unwrap_or_else(|_| args.config.clone());
    let config = Config::load(&args.config)?;
    let node = config.local_node(&node_name)?;
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
            // vmha-fs outlives vmhad: the next vmhad adopts it.
            Arc::new(VmhaFsDriver::new(binary, config.clone(), node).detached()),
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
        // Installed before the daemon runs: a SIGHUP never kills vmhad.
        let mut hup = signal(SignalKind::hangup()).map_err(MainError::Signal)?;
        let peer_key = key.clone();
        let daemon = Daemon::start(DaemonSpec {
            config,
            node,
            key,
            vm,
            fs,
            clock,
        })
        .await?;
        daemon.set_config_file(&config_file);
        // The console is not needed for HA: a failure to serve it is logged.
        // The peer's view comes over the daemon channel.
        let peer: Arc<dyn vmha_controller::web::PeerSource> =
            if daemon.handle().config().web.enabled {
                match vmha_controller::web::ChannelPeer::start(daemon.handle(), peer_key) {
                    Some(p) => Arc::new(p),
                    None => Arc::new(vmha_controller::web::NoPeer),
                }
            } else {
                Arc::new(vmha_controller::web::NoPeer)
            };
        let _web = match vmha_controller::web::start(daemon.handle(), peer).await {
            Ok(web) => web,
            Err(e) => {
                tracing::error!("web console not started: {e}");
                None
            }
        };
        // The control socket answers and every module got its start: ready.
        let status = daemon.status();
        vmha_controller::systemd::ready(&status);
        let summary = vmha_controller::systemd::summary(&status);
        let signal = {
            let keep_alive = vmha_controller::systemd::keep_alive(&daemon, summary);
            tokio::pin!(keep_alive);
            let mut kept = false;
            loop {
                tokio::select! {
                    _ = term.recv() => break "SIGTERM",
                    _ = int.recv() => break "SIGINT",
                    _ = hup.recv() => {
                        tracing::info!("SIGHUP: reloading {}", config_file.display());
                        let answer = daemon.reload().await;
                        if answer.ok {
                            for line in &answer.lines {
                                tracing::info!("{line}");
                            }
                        } else {
                            tracing::error!("{}", answer.error.unwrap_or_default());
                        }
                    }
                    () = &mut keep_alive, if !kept => kept = true,
                }
            }
        };
        // vmhad ends alone: vmha-fs and the VMs keep running (`vmctl stop`
        // hands a module over, `vmctl leave` every module of the node).
        tracing::info!("{signal}: vmhad stops; vmha-fs and the VMs keep running");
        vmha_controller::systemd::stopping();
        daemon.shutdown(signal).await;
        tracing::info!("vmhad stopped");
        Ok(())
    })
}

fn main() -> ExitCode {
    if let Some(code) = vmha_cli::docs::run_if_asked(Args::command) {
        return code;
    }
    let args = Args::parse();
    vmha_cli::logging::init(vmha_cli::logging::Fields {
        node: args.node.as_deref(),
        module: None,
    });
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmhad: {e}");
            ExitCode::FAILURE
        }
    }
}
