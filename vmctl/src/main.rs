//! `vmctl`: the operator's CLI for the local `vmhad`, over its control socket.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vmha_controller::config::Config;
use vmha_controller::control::{Client, ControlError, Request, Response};
use vmha_controller::state::WitnessOutcome;
use vmha_controller::status::{NodeStatus, Status};

/// The configuration read when `--config` is not given.
const DEFAULT_CONFIG: &str = "/etc/vmha/vmha.toml";
/// The socket used when there is no configuration file at all.
const DEFAULT_SOCKET: &str = "/run/vmha/vmhad.sock";

#[derive(Parser, Debug)]
#[command(
    name = "vmctl",
    version,
    about = "Control the vmha controller on this node"
)]
struct Cli {
    /// The cluster configuration (for the control socket path).
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// The control socket (overrides the configuration).
    #[arg(long, value_name = "PATH", global = true)]
    socket: Option<PathBuf>,
    /// Run the command on node NAME (as in a [[node]] section), through the
    /// authenticated daemon channel to its vmhad instead of the local socket.
    #[arg(long, value_name = "NAME", global = true)]
    node: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Both nodes' state of every module.
    Status {
        /// Machine-readable output (stable for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Start the module on this node.
    Start { module: Option<String> },
    /// Stop the module on this node (a PRIM hands over to its SECOND).
    Stop { module: Option<String> },
    /// Move the module to the other node.
    Swap { module: Option<String> },
    /// Force this node to run the module with its local data.
    Prim {
        module: Option<String>,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Print the module's event log.
    Log { module: Option<String> },
    /// Compare both nodes' copies online, block by block; changes nothing and
    /// reports the regions that differ (exit status 1 if any do).
    Verify { module: Option<String> },
}

/// Everything that makes vmctl exit non-zero (each printed as one line).
#[derive(Debug, thiserror::Error)]
enum VmctlError {
    #[error(transparent)]
    Config(#[from] vmha_controller::config::ConfigError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("{0}")]
    Daemon(String),
    #[error("`prim` discards the other node's newer changes if there are any: confirm on a terminal or pass --yes")]
    NeedsConfirmation,
    #[error("not confirmed: nothing done")]
    NotConfirmed,
    #[error("cannot read the answer: {0}")]
    Input(std::io::Error),
    #[error("cannot print: {0}")]
    Output(std::io::Error),
    #[error("the two copies differ")]
    Differs,
    #[error(transparent)]
    Channel(#[from] vmha_controller::channel::ChannelError),
    #[error(transparent)]
    Key(#[from] vmha_fs::key::KeyError),
    #[error("no node `{0}` in the configuration")]
    UnknownNode(String),
}

/// Where a command runs: the local vmhad, or another node's over the channel.
enum Target {
    Local(PathBuf),
    Node {
        addr: std::net::SocketAddr,
        key: vmha_fs::key::ClusterKey,
    },
}

fn target(cli: &Cli) -> Result<Target, VmctlError> {
    let Some(name) = &cli.node else {
        return Ok(Target::Local(socket_path(cli)?));
    };
    let path = cli
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    let config = Config::load(&path)?;
    let node = config
        .nodes
        .iter()
        .find(|n| &n.name == name)
        .ok_or_else(|| VmctlError::UnknownNode(name.clone()))?;
    let ip = *node
        .addresses
        .first()
        .ok_or_else(|| VmctlError::UnknownNode(name.clone()))?;
    Ok(Target::Node {
        addr: std::net::SocketAddr::new(ip, config.cluster.channel_port),
        key: vmha_fs::key::ClusterKey::load(&config.cluster.key_file)?,
    })
}

fn socket_path(cli: &Cli) -> Result<PathBuf, VmctlError> {
    if let Some(socket) = &cli.socket {
        return Ok(socket.clone());
    }
    match &cli.config {
        Some(path) => Ok(Config::load(path)?.cluster.control_socket),
        None if Path::new(DEFAULT_CONFIG).exists() => Ok(Config::load(Path::new(DEFAULT_CONFIG))?
            .cluster
            .control_socket),
        None => Ok(PathBuf::from(DEFAULT_SOCKET)),
    }
}

fn call(target: &Target, request: &Request) -> Result<Response, VmctlError> {
    let response = match target {
        Target::Local(socket) => Client::connect(socket)?.call(request)?,
        Target::Node { addr, key } => {
            vmha_controller::channel::Client::connect(*addr, key)?.command(request.clone())?
        }
    };
    if response.ok {
        Ok(response)
    } else {
        Err(VmctlError::Daemon(
            response
                .error
                .unwrap_or_else(|| "vmhad refused the request".to_string()),
        ))
    }
}

fn confirm(module: Option<&str>) -> Result<(), VmctlError> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(VmctlError::NeedsConfirmation);
    }
    let name = module.map_or_else(|| "the module".to_string(), |m| format!("module `{m}`"));
    eprint!(
        "Force {name} to run on this node with its local data?\n\
         Changes the other node made since they were last in sync would be discarded.\n\
         Type `yes` to go on: "
    );
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    stdin
        .lock()
        .read_line(&mut answer)
        .map_err(VmctlError::Input)?;
    if answer.trim() == "yes" {
        Ok(())
    } else {
        Err(VmctlError::NotConfirmed)
    }
}

fn cell(node: &NodeStatus) -> [String; 4] {
    let state = match (node.state, node.last_known_state.flatten()) {
        (Some(state), _) => state.to_string(),
        (None, Some(last)) => format!("? (was {last})"),
        (None, None) => "?".to_string(),
    };
    let readiness = if node.reachable || node.state.is_some() {
        node.readiness
            .map(|r| {
                serde_json::to_value(r)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            })
            .unwrap_or_else(|| "-".to_string())
    } else {
        "unreachable".to_string()
    };
    let colour = node
        .colour
        .and_then(|c| serde_json::to_value(c).ok())
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "-".to_string());
    let generation = node
        .generation
        .as_deref()
        .map(|g| g.get(..8).unwrap_or(g).to_string())
        .unwrap_or_else(|| "-".to_string());
    [state, readiness, colour, generation]
}

fn heartbeats(node: &NodeStatus) -> String {
    match &node.heartbeats {
        None => String::new(),
        Some(map) => map
            .iter()
            .map(|(addr, age)| match age {
                Some(ms) => format!("{addr} {ms}ms"),
                None => format!("{addr} never"),
            })
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// The human status table.
fn render(status: &Status) -> String {
    let mut out = format!("node {} (this node)\n", status.node);
    let header = [
        "MODULE",
        "NODE",
        "STATE",
        "READINESS",
        "COLOUR",
        "GENERATION",
        "RESYNC",
        "HEARTBEATS",
    ];
    let mut rows: Vec<[String; 8]> = vec![header.map(str::to_string)];
    let mut warnings = Vec::new();
    for module in &status.modules {
        for (i, (name, node)) in module.nodes.iter().enumerate() {
            let [state, readiness, colour, generation] = cell(node);
            let resync = node
                .resync
                .map(|r| match r.eta_s {
                    Some(eta) => format!("{}% eta {eta}s", r.percent()),
                    None => format!("{}%", r.percent()),
                })
                .unwrap_or_else(|| "-".to_string());
            let marker = if module.primary.as_deref() == Some(name) {
                " *"
            } else {
                ""
            };
            rows.push([
                if i == 0 {
                    module.name.clone()
                } else {
                    String::new()
                },
                format!("{name}{marker}"),
                state,
                readiness,
                colour,
                generation,
                resync,
                heartbeats(node),
            ]);
            if node.disk == Some(vmha_controller::state::Disk::Failed) {
                warnings.push(format!(
                    "warning: {name}'s disk failed (module {}): it waits; after the repair run `vmctl start` there",
                    module.name
                ));
            }
            if node.config_match.flatten() == Some(false) {
                warnings.push(format!(
                    "warning: the configuration differs from {name}'s (module {}: {})",
                    module.name,
                    if node.module_config_match.flatten() == Some(false) {
                        "differs, automatic failover blocked"
                    } else {
                        "same"
                    }
                ));
            }
        }
    }
    let widths: Vec<usize> = (0..8)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(text, w)| format!("{text:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    if status.modules.is_empty() {
        out.push_str("(no module configured)\n");
    }
    out.push_str("* = runs the VM\n");
    if let Some(w) = &status.witness {
        let last = match (w.last_probe, w.last_probe_ms) {
            (Some(outcome), Some(age)) => {
                let word = match outcome {
                    WitnessOutcome::Reachable => "reachable",
                    WitnessOutcome::Unreachable => "unreachable",
                    WitnessOutcome::CouldNotProbe => "could not be probed",
                };
                format!("{word} ({}s ago)", age / 1000)
            }
            _ => "not probed yet".to_string(),
        };
        out.push_str(&format!("witness {}: {last}\n", w.addresses.join(", ")));
        for e in &w.errors {
            warnings.push(format!(
                "error: witness {e} (a failover waits until it can be probed)"
            ));
        }
    }
    warnings.dedup();
    for w in warnings {
        out.push_str(&w);
        out.push('\n');
    }
    out
}

fn print(text: &str) -> Result<(), VmctlError> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .map_err(VmctlError::Output)?;
    stdout.flush().map_err(VmctlError::Output)
}

fn print_lines(response: &Response) -> Result<(), VmctlError> {
    let mut text = response.lines.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    print(&text)
}

fn run(cli: Cli) -> Result<(), VmctlError> {
    let target = target(&cli)?;
    match cli.command {
        Command::Status { json } => {
            let response = call(&target, &Request::Status)?;
            let status = response
                .status
                .ok_or_else(|| VmctlError::Daemon("vmhad sent no status".to_string()))?;
            if json {
                let text = serde_json::to_string_pretty(&status)
                    .map_err(|e| VmctlError::Daemon(e.to_string()))?;
                print(&format!("{text}\n"))
            } else {
                print(&render(&status))
            }
        }
        Command::Start { module } => print_lines(&call(&target, &Request::Start { module })?),
        Command::Stop { module } => print_lines(&call(&target, &Request::Stop { module })?),
        Command::Swap { module } => print_lines(&call(&target, &Request::Swap { module })?),
        Command::Prim { module, yes } => {
            if !yes {
                confirm(module.as_deref())?;
            }
            print_lines(&call(&target, &Request::Prim { module })?)
        }
        Command::Log { module } => print_lines(&call(&target, &Request::Log { module })?),
        Command::Verify { module } => {
            let response = call(&target, &Request::Verify { module })?;
            print_lines(&response)?;
            if response.lines.iter().any(|l| l.starts_with("differs")) {
                return Err(VmctlError::Differs);
            }
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmctl: {e}");
            ExitCode::FAILURE
        }
    }
}
