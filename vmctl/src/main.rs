//! `vmctl`: the operator's CLI for the local `vmhad`, over its control socket.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
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
    /// Compare both copies block by block and repair the SECOND from the PRIM
    /// while the VM runs (after a copy was changed outside vmha, or to be sure).
    /// On the PRIM, or on a ready SECOND (which asks its PRIM). The SECOND is
    /// not up to date until the repair ends; progress shows in `status`.
    Resync {
        module: Option<String>,
        /// Compare every block whatever the records say (required: an
        /// incremental resync runs by itself whenever the SECOND is behind).
        #[arg(long, required = true)]
        compare: bool,
    },
    /// On a SECOND: discard this node's copy (its records) and take a full
    /// compare resync from the PRIM. Refused on a PRIM, STOP, WAIT or ALONE node.
    Invalidate { module: Option<String> },
    /// Re-read vmhad's configuration file and apply it on this node (exit 0
    /// once in effect; with errors nothing changes and every reason is shown).
    Reload,
    /// The configuration file.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Hand every module of this node over to the peer (as `stop` on a PRIM)
    /// and keep this node out, across vmhad restarts, until `vmctl join`.
    Leave {
        /// Return only once every module is handed over (the peer runs it, or
        /// it is stopped here and the peer will not run it).
        #[arg(long)]
        wait: bool,
        /// With --wait: give up (exit status 1) after this many seconds.
        #[arg(long, value_name = "SECONDS", default_value_t = 120)]
        timeout: u64,
        /// The leave ends at the next boot (host shutdown, see
        /// vmha-shutdown.service) instead of at `vmctl join`.
        #[arg(long)]
        until_boot: bool,
    },
    /// End `vmctl leave`: every module starts again on this node.
    Join,
    /// Set the web console's admin password (stored as an argon2 hash in the
    /// state directory, mode 0600). Asks on the terminal (twice), or reads
    /// one line from standard input with --stdin. vmhad need not run.
    WebPassword {
        /// Read the password from standard input (one line).
        #[arg(long)]
        stdin: bool,
    },
    /// Maintenance: the controller takes no automatic action for the module
    /// (no failover, no VM restart, no checker reaction) on either node, while
    /// the VM and the replication keep running. Every module when MODULE is
    /// omitted. Kept across vmhad restarts.
    Maintenance {
        #[arg(value_enum)]
        mode: OnOff,
        module: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Check the file (every error with file:line:column and key) and this
    /// host; exit 0 only when no error remains.
    Check {
        /// This node's name (default: the running vmhad's, else the node
        /// whose addresses are here).
        #[arg(long, value_name = "NAME")]
        node: Option<String>,
    },
    /// Send vmhad's configuration file to the peer and reload both, after
    /// showing the differences and asking.
    Push {
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnOff {
    On,
    Off,
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
    #[error("the configuration check found {0} error(s)")]
    Check(usize),
    #[error(
        "`config push` replaces the peer's configuration: confirm on a terminal or pass --yes"
    )]
    PushNeedsConfirmation,
    #[error(transparent)]
    Diff(#[from] vmha_controller::config_diff::DiffError),
    #[error("cannot reach the peer's vmhad: {0}")]
    Peer(String),
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

fn call(socket: &Path, request: &Request) -> Result<Response, VmctlError> {
    let response = Client::connect(socket)?.call(request)?;
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

/// Runs `request` on the peer's vmhad. The transport is the authenticated
/// daemon channel between the two vmhad (issue 10, item 5); until it exists
/// this is where it plugs in, and `config push` stops here with a clear error.
fn peer_call(_socket: &Path, request: &Request) -> Result<Response, VmctlError> {
    let _ = request;
    Err(VmctlError::Peer(
        "the daemon channel between the two vmhad is not available in this build: copy the file to the peer and run `vmctl reload` there".to_string(),
    ))
}

/// `config push`: this node's vmhad file to the peer, then both reload.
fn config_push(socket: &Path, yes: bool) -> Result<(), VmctlError> {
    let ours = call(socket, &Request::ConfigText)?
        .text
        .ok_or_else(|| VmctlError::Daemon("vmhad sent no configuration text".into()))?;
    let theirs = peer_call(socket, &Request::ConfigText)?
        .text
        .ok_or_else(|| VmctlError::Peer("the peer sent no configuration text".into()))?;
    let lines = vmha_controller::config_diff::diff(&theirs, &ours)?;
    if lines.is_empty() {
        print("the peer's configuration says the same: reloading both\n")?;
    } else {
        print(&format!(
            "the peer's configuration will change (- removed, + added, ~ changed):\n{}\n",
            lines.join("\n")
        ))?;
        if !yes {
            let stdin = std::io::stdin();
            if !stdin.is_terminal() {
                return Err(VmctlError::PushNeedsConfirmation);
            }
            eprint!(
                "Replace the peer's configuration and reload both nodes? Type `yes` to go on: "
            );
            let _ = std::io::stderr().flush();
            let mut answer = String::new();
            stdin
                .lock()
                .read_line(&mut answer)
                .map_err(VmctlError::Input)?;
            if answer.trim() != "yes" {
                return Err(VmctlError::NotConfirmed);
            }
        }
    }
    // This node first: a file its own vmhad refuses is sent nowhere.
    print_lines(&call(socket, &Request::Reload)?)?;
    let applied = peer_call(socket, &Request::ConfigApply { text: ours })?;
    if !applied.ok {
        return Err(VmctlError::Peer(applied.error.unwrap_or_default()));
    }
    print_lines(&applied)
}

fn config_check(cli: &Cli, node: Option<&str>) -> Result<(), VmctlError> {
    let path = cli
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    let report = vmha_controller::check::check_file(&path, node);
    let mut text = report.lines.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    text.push_str(&report.summary());
    text.push('\n');
    print(&text)?;
    match report.errors {
        0 => Ok(()),
        n => Err(VmctlError::Check(n)),
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
    let mut banners: Vec<String> = Vec::new();
    for module in &status.modules {
        for (i, (name, node)) in module.nodes.iter().enumerate() {
            let [mut state, readiness, colour, generation] = cell(node);
            if node.maintenance {
                state.push_str(" MAINT");
            }
            if node.left {
                state.push_str(" LEFT");
            }
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
            if node.maintenance {
                banners.push(format!(
                    "!!! MAINTENANCE: module {} on {name}: no failover, no restart, no checker reaction on either node (`vmctl maintenance off` on {name})",
                    module.name
                ));
            }
            if node.left {
                banners.push(format!(
                    "!!! {name} LEFT the cluster: it runs no module until `vmctl join` there"
                ));
            }
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
    // Loud, first: the operator must not miss that the controller is held.
    banners.dedup();
    for b in &banners {
        out.push_str(b);
        out.push('\n');
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
    if !status.config_differences.is_empty() {
        warnings.push(format!(
            "warning: configuration keys that differ from the peer's: {}",
            status.config_differences.join(", ")
        ));
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
    if let Command::Config(ConfigCommand::Check { node }) = &cli.command {
        // Reports a file that does not load instead of failing on it.
        return config_check(&cli, node.as_deref());
    }
    if let Command::WebPassword { stdin } = &cli.command {
        return web_password(&cli, *stdin);
    }
    let socket = socket_path(&cli)?;
    match cli.command {
        Command::Status { json } => {
            let response = call(&socket, &Request::Status)?;
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
        Command::Start { module } => print_lines(&call(&socket, &Request::Start { module })?),
        Command::Stop { module } => print_lines(&call(&socket, &Request::Stop { module })?),
        Command::Swap { module } => print_lines(&call(&socket, &Request::Swap { module })?),
        Command::Prim { module, yes } => {
            if !yes {
                confirm(module.as_deref())?;
            }
            print_lines(&call(&socket, &Request::Prim { module })?)
        }
        Command::Log { module } => print_lines(&call(&socket, &Request::Log { module })?),
        Command::Resync { module, compare } => {
            print_lines(&call(&socket, &Request::Resync { module, compare })?)
        }
        Command::Invalidate { module } => {
            print_lines(&call(&socket, &Request::Invalidate { module })?)
        }
        Command::Leave {
            wait,
            timeout,
            until_boot,
        } => {
            let request = Request::Leave {
                until_boot,
                wait_s: wait.then_some(timeout),
            };
            let response = Client::connect(&socket)?.call(&request)?;
            print_lines(&response)?;
            if response.ok {
                Ok(())
            } else {
                Err(VmctlError::Daemon(
                    response
                        .error
                        .unwrap_or_else(|| "vmhad refused the request".to_string()),
                ))
            }
        }
        // Answered above, before the socket is looked for.
        Command::WebPassword { .. } => Ok(()),
        Command::Join => print_lines(&call(&socket, &Request::Join)?),
        Command::Maintenance { mode, module } => print_lines(&call(
            &socket,
            &Request::Maintenance {
                on: mode == OnOff::On,
                module,
            },
        )?),
        Command::Verify { module } => {
            let response = call(&socket, &Request::Verify { module })?;
            print_lines(&response)?;
            if response.lines.iter().any(|l| l.starts_with("differs")) {
                return Err(VmctlError::Differs);
            }
            Ok(())
        }
        Command::Reload => print_lines(&call(&socket, &Request::Reload)?),
        Command::Config(ConfigCommand::Push { yes }) => config_push(&socket, yes),
        Command::Config(ConfigCommand::Check { .. }) => Ok(()),
    }
}

/// `vmctl web-password`: the state directory comes from the configuration.
fn web_password(cli: &Cli, from_stdin: bool) -> Result<(), VmctlError> {
    let path = cli
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    let config = Config::load(&path)?;
    let password = if from_stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(VmctlError::Input)?;
        line.trim_end_matches(['\n', '\r']).to_string()
    } else {
        if !std::io::stdin().is_terminal() {
            return Err(VmctlError::Daemon(
                "no terminal to ask the password on: pass --stdin".to_string(),
            ));
        }
        let first = read_hidden("New web console password: ")?;
        let second = read_hidden("Again: ")?;
        if first != second {
            return Err(VmctlError::Daemon(
                "the passwords differ: nothing changed".to_string(),
            ));
        }
        first
    };
    let written = vmha_controller::web::set_password(&config.cluster.state_dir, &password)
        .map_err(|e| VmctlError::Daemon(e.to_string()))?;
    print(&format!(
        "web console password set ({}); log in as `admin`\n",
        written.display()
    ))
}

/// Reads a line from the terminal without echoing it.
fn read_hidden(prompt: &str) -> Result<String, VmctlError> {
    use rustix::termios::{tcgetattr, tcsetattr, LocalModes, OptionalActions};
    eprint!("{prompt}");
    let stdin = std::io::stdin();
    let saved = tcgetattr(&stdin).map_err(|e| VmctlError::Input(e.into()))?;
    let mut quiet = saved.clone();
    quiet.local_modes.remove(LocalModes::ECHO);
    tcsetattr(&stdin, OptionalActions::Now, &quiet).map_err(|e| VmctlError::Input(e.into()))?;
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    let _ = tcsetattr(&stdin, OptionalActions::Now, &saved);
    eprintln!();
    read.map_err(VmctlError::Input)?;
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}

fn main() -> ExitCode {
    if let Some(code) = vmha_cli::docs::run_if_asked(Cli::command) {
        return code;
    }
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmctl: {e}");
            ExitCode::FAILURE
        }
    }
}
