//! `vmctl`: the operator's CLI for the local `vmhad`, over its control socket.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use exit::Exit;
use std::time::{Duration, SystemTime};
use vmha_controller::config::Config;
use vmha_controller::control::{Client, ControlError, ErrorKind, Request, Response};

mod exit;
mod render;

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
        /// Refresh every --interval seconds (in place on a terminal) until
        /// interrupted.
        #[arg(short, long, conflicts_with = "json")]
        watch: bool,
        /// Seconds between two refreshes of --watch.
        #[arg(long, value_name = "SECS", default_value_t = 1.0)]
        interval: f64,
        /// Also the peer's own full view, from its vmhad over the daemon
        /// channel (said when it cannot be reached). With --json: added as
        /// `peer_status` (or `peer_error`).
        #[arg(long, conflicts_with = "watch")]
        all: bool,
    },
    /// Write a diagnostic report of both nodes (configuration with key
    /// material redacted, versions, status, event logs, vmha-fs state files,
    /// domain XMLs, vmhad's journal, mounts, kernel) as one tar.gz; the
    /// peer's part comes over the daemon channel.
    Report {
        /// The archive to write (default: vmha-report-CLUSTER-TIME.tar.gz
        /// in the current directory).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Start the module on this node.
    Start { module: Option<String> },
    /// Stop the module on this node (a PRIM hands over to its SECOND).
    Stop { module: Option<String> },
    /// Move the module to the other node (stop/start, or live per the
    /// module's `swap` setting).
    Swap {
        module: Option<String>,
        /// Live-migrate the running VM (no reboot); refused (non-zero exit)
        /// rather than falling back to stop/start.
        #[arg(long)]
        live: bool,
    },
    /// Force this node to run the module with its local data.
    Prim {
        module: Option<String>,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Print the module's event log (each line says what caused it).
    Log {
        module: Option<String>,
        /// Only the last N events.
        #[arg(short = 'n', long = "lines", value_name = "N")]
        lines: Option<usize>,
        /// Only events since TIME: a duration ago ("10m", "1h 30m") or a
        /// UTC time ("2026-12-05 20:00:00").
        #[arg(long, value_name = "TIME", value_parser = parse_since)]
        since: Option<SystemTime>,
        /// Keep printing events as they happen (Ctrl-C ends).
        #[arg(short, long)]
        follow: bool,
    },
    /// Compare both nodes' copies online, block by block; changes nothing and
    /// reports the regions that differ (exit status 6 if any do).
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
    /// vmhad answered with a failure (its message and kind).
    #[error("{message}")]
    Daemon { kind: ErrorKind, message: String },
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
    #[error(transparent)]
    Channel(#[from] vmha_controller::channel::ChannelError),
    #[error(transparent)]
    Key(#[from] vmha_fs::key::KeyError),
    #[error("no node `{0}` in the configuration")]
    UnknownNode(String),
    #[error("{0}")]
    NeedsTerminal(&'static str),
    #[error("{0}")]
    NotConfirmedBecause(&'static str),
}

impl VmctlError {
    /// The exit status for this error (the table in `exit.rs`).
    fn exit(&self) -> Exit {
        match self {
            VmctlError::Config(_) | VmctlError::Input(_) | VmctlError::Output(_) => Exit::Failed,
            VmctlError::NotConfirmed
            | VmctlError::Check(_)
            | VmctlError::Diff(_)
            | VmctlError::Peer(_)
            | VmctlError::Key(_)
            | VmctlError::UnknownNode(_) => Exit::Failed,
            VmctlError::Channel(_) => Exit::NotRunning,
            VmctlError::NeedsConfirmation
            | VmctlError::PushNeedsConfirmation
            | VmctlError::NeedsTerminal(_) => Exit::Usage,
            VmctlError::NotConfirmedBecause(_) => Exit::Failed,
            VmctlError::Differs => Exit::Differs,
            VmctlError::Daemon { kind, .. } => Exit::of_kind(*kind),
            VmctlError::Control(e) => match e {
                ControlError::NotRunning(_)
                | ControlError::Refused(_)
                | ControlError::NotASocket(_)
                | ControlError::NoAnswer
                | ControlError::Io { .. } => Exit::NotRunning,
                _ => Exit::Failed,
            },
        }
    }

    fn daemon(message: impl Into<String>) -> VmctlError {
        VmctlError::Daemon {
            kind: ErrorKind::Failed,
            message: message.into(),
        }
    }
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
    match &cli.node {
        None => Ok(Target::Local(socket_path(cli)?)),
        Some(name) => node_target(cli, |n| n == name.as_str(), name),
    }
}

/// The daemon channel of the first node whose name `pick` accepts.
fn node_target(cli: &Cli, pick: impl Fn(&str) -> bool, what: &str) -> Result<Target, VmctlError> {
    let path = cli
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    let config = Config::load(&path)?;
    let node = config
        .nodes
        .iter()
        .find(|n| pick(&n.name))
        .ok_or_else(|| VmctlError::UnknownNode(what.to_string()))?;
    let ip = *node
        .addresses
        .first()
        .ok_or_else(|| VmctlError::UnknownNode(what.to_string()))?;
    Ok(Target::Node {
        addr: std::net::SocketAddr::new(ip, config.cluster.channel_port),
        key: vmha_fs::key::ClusterKey::load(&config.cluster.key_file)?,
    })
}

/// The peer of the node `local` reaches, over the daemon channel.
fn peer_target(cli: &Cli, local: &Target) -> Result<Target, VmctlError> {
    let status = call(local, &Request::Status)?
        .status
        .ok_or_else(|| VmctlError::daemon("vmhad sent no status"))?;
    let this = status.node.clone();
    node_target(cli, |n| n != this, &format!("peer of {this}"))
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

/// Sends `request` to `target` and returns its answer as it is.
fn ask(target: &Target, request: &Request) -> Result<Response, VmctlError> {
    Ok(match target {
        Target::Local(socket) => Client::connect(socket)?.call(request)?,
        Target::Node { addr, key } => {
            vmha_controller::channel::Client::connect(*addr, key)?.command(request.clone())?
        }
    })
}

fn call(target: &Target, request: &Request) -> Result<Response, VmctlError> {
    check(ask(target, request)?)
}

/// A failed answer as an error (with its kind, for the exit status).
fn check(response: Response) -> Result<Response, VmctlError> {
    if response.ok {
        Ok(response)
    } else {
        Err(VmctlError::Daemon {
            kind: response.effective_kind().unwrap_or(ErrorKind::Failed),
            message: response
                .error
                .unwrap_or_else(|| "vmhad refused the request".to_string()),
        })
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

/// `--since`: a duration ago, or a UTC time.
fn parse_since(text: &str) -> Result<SystemTime, String> {
    if let Ok(ago) = humantime::parse_duration(text) {
        return SystemTime::now()
            .checked_sub(ago)
            .ok_or_else(|| format!("`{text}` reaches before the epoch"));
    }
    humantime::parse_rfc3339_weak(text).map_err(|_| {
        format!(
            "`{text}` is neither a duration (\"10m\", \"1h 30m\") nor a time (\"2026-12-05 20:00:00\", UTC)"
        )
    })
}

/// Runs `request` on the peer's vmhad. The transport is the authenticated
/// daemon channel between the two vmhad (issue 10, item 5); until it exists
/// this is where it plugs in, and `config push` stops here with a clear error.
fn peer_call(peer: &Target, request: &Request) -> Result<Response, VmctlError> {
    ask(peer, request)
}

/// `config push`: this node's vmhad file to the peer, then both reload.
fn config_push(cli: &Cli, socket: &Target, yes: bool) -> Result<(), VmctlError> {
    let peer = peer_target(cli, socket)?;
    let ours = call(socket, &Request::ConfigText)?
        .text
        .ok_or_else(|| VmctlError::daemon("vmhad sent no configuration text"))?;
    let theirs = peer_call(&peer, &Request::ConfigText)?
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
    let applied = peer_call(&peer, &Request::ConfigApply { text: ours })?;
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

/// Event-log lines start with their UTC timestamp (`eventlog::timestamp`),
/// which sorts as text.
fn since_filter(since: Option<SystemTime>) -> impl Fn(&String) -> bool {
    let from = since.map(vmha_controller::eventlog::timestamp);
    move |line: &String| match &from {
        Some(from) => line.get(..from.len()).is_some_and(|t| t >= from.as_str()),
        None => true,
    }
}

fn log(
    socket: &Target,
    module: Option<String>,
    lines: Option<usize>,
    since: Option<SystemTime>,
    follow: bool,
) -> Result<(), VmctlError> {
    let keep = since_filter(since);
    let mut after = None;
    let mut last = lines;
    loop {
        let response = ask(
            socket,
            &Request::LogTail {
                module: module.clone(),
                last,
                after,
            },
        )?;
        let response = check(response)?;
        let shown: Vec<String> = response.lines.into_iter().filter(|l| keep(l)).collect();
        let mut text = shown.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        print(&text)?;
        if !follow {
            return Ok(());
        }
        let next = response.log_next.unwrap_or(0);
        // A restarted vmhad numbers from its start again: go on from there.
        after = Some(next);
        last = None;
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn watch(socket: &Target, interval: f64) -> Result<(), VmctlError> {
    let terminal = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let pause = Duration::try_from_secs_f64(interval.max(0.1)).unwrap_or(Duration::from_secs(1));
    loop {
        let status = call(socket, &Request::Status)?
            .status
            .ok_or_else(|| VmctlError::daemon("vmhad sent no status"))?;
        let now = vmha_controller::eventlog::timestamp(SystemTime::now());
        print(&render::watch_frame(&status, terminal, &now))?;
        std::thread::sleep(pause);
    }
}

/// The peer's own status over the daemon channel, or why not.
fn peer_status(
    cli: &Cli,
    target: &Target,
) -> Result<(String, vmha_controller::status::Status), String> {
    let peer = peer_target(cli, target).map_err(|e| e.to_string())?;
    let Target::Node { addr, key } = &peer else {
        return Err("no peer".into());
    };
    let status = vmha_controller::channel::Client::connect(*addr, key)
        .and_then(|mut c| c.status())
        .map_err(|e| e.to_string())?;
    Ok((status.node.clone(), status))
}

/// `status --all`: this node's view, then the peer's own.
fn status_all(cli: &Cli, target: &Target, json: bool) -> Result<(), VmctlError> {
    let status = call(target, &Request::Status)?
        .status
        .ok_or_else(|| VmctlError::daemon("vmhad sent no status"))?;
    let peer = peer_status(cli, target);
    if json {
        let mut value =
            serde_json::to_value(&status).map_err(|e| VmctlError::daemon(e.to_string()))?;
        if let Some(map) = value.as_object_mut() {
            match &peer {
                Ok((_, p)) => {
                    let p =
                        serde_json::to_value(p).map_err(|e| VmctlError::daemon(e.to_string()))?;
                    map.insert("peer_status".into(), p);
                }
                Err(e) => {
                    map.insert("peer_error".into(), serde_json::Value::String(e.clone()));
                }
            }
        }
        let text =
            serde_json::to_string_pretty(&value).map_err(|e| VmctlError::daemon(e.to_string()))?;
        return print(&format!("{text}\n"));
    }
    let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let mut text = format!("== {} (this node's view)\n", status.node);
    text.push_str(&render::render(&status, colour));
    match peer {
        Ok((name, p)) => {
            text.push_str(&format!(
                "\n== {name} (its own view, from its vmhad over the daemon channel)\n"
            ));
            text.push_str(&render::render(&p, colour));
        }
        Err(e) => text.push_str(&format!(
            "\nthe peer's own view is not available (its vmhad cannot be reached over the daemon channel: {e}); above is {}'s view of it\n",
            status.node
        )),
    }
    print(&text)
}

/// `report`: this node's part collected here, the peer's over the channel.
fn report(cli: &Cli, target: &Target, out: Option<PathBuf>) -> Result<(), VmctlError> {
    if cli.node.is_some() {
        return Err(VmctlError::daemon(
            "report: run it without --node (it covers both nodes: this one's part is read here)",
        ));
    }
    let config_file = cli
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    let config = Config::load(&config_file)?;
    let status = ask(target, &Request::Status).ok().and_then(|r| r.status);
    let mut notes = Vec::new();
    let node = match &status {
        Some(s) => s.node.clone(),
        None => {
            notes.push("this node's vmhad did not answer: no status, no peer part".to_string());
            cli.node.clone().unwrap_or_else(|| "local".to_string())
        }
    };
    let source = vmha_controller::report::Source {
        config: &config,
        config_file: Some(&config_file),
        node: &node,
        status: status.as_ref(),
        budget: vmha_controller::report::LOCAL_BUDGET,
    };
    let mut parts = vec![(node.clone(), vmha_controller::report::collect(&source))];
    if status.is_some() {
        match peer_target(cli, target) {
            Ok(Target::Node { addr, key }) => {
                let peer = config
                    .nodes
                    .iter()
                    .find(|n| n.name != node)
                    .map_or_else(|| "peer".to_string(), |n| n.name.clone());
                match vmha_controller::channel::Client::connect(addr, &key)
                    .and_then(|mut c| c.report())
                {
                    Ok(files) => parts.push((peer, files)),
                    Err(e) => notes.push(format!("{peer}: no part: {e}")),
                }
            }
            Ok(Target::Local(_)) => {}
            Err(e) => notes.push(format!("the peer: no part: {e}")),
        }
    }
    let path = out.unwrap_or_else(|| {
        let now = vmha_controller::eventlog::timestamp(SystemTime::now()).replace(':', "");
        PathBuf::from(format!("vmha-report-{}-{now}.tar.gz", config.cluster.name))
    });
    let file = std::fs::File::create(&path)
        .map_err(|e| VmctlError::daemon(format!("cannot write {}: {e}", path.display())))?;
    vmha_controller::report::write_tar_gz(std::io::BufWriter::new(file), &parts, &notes)
        .map_err(|e| VmctlError::daemon(format!("{}: {e}", path.display())))?;
    let nodes: Vec<&str> = parts.iter().map(|(n, _)| n.as_str()).collect();
    let mut text = format!("{} (nodes: {})\n", path.display(), nodes.join(", "));
    for n in &notes {
        text.push_str(&format!("note: {n}\n"));
    }
    print(&text)
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
    let target = target(&cli)?;
    match cli.command {
        Command::Status {
            watch: true,
            interval,
            ..
        } => watch(&target, interval),
        Command::Status {
            json, all: true, ..
        } => status_all(&cli, &target, json),
        Command::Report { ref out } => report(&cli, &target, out.clone()),
        Command::Status { json, .. } => {
            let response = call(&target, &Request::Status)?;
            let status = response
                .status
                .ok_or_else(|| VmctlError::daemon("vmhad sent no status"))?;
            if json {
                let text = serde_json::to_string_pretty(&status)
                    .map_err(|e| VmctlError::daemon(e.to_string()))?;
                print(&format!("{text}\n"))
            } else {
                let colour =
                    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
                print(&render::render(&status, colour))
            }
        }
        Command::Start { module } => print_lines(&call(&target, &Request::Start { module })?),
        Command::Stop { module } => print_lines(&call(&target, &Request::Stop { module })?),
        Command::Swap { module, live } => {
            print_lines(&call(&target, &Request::Swap { module, live })?)
        }
        Command::Prim { module, yes } => {
            if !yes {
                confirm(module.as_deref())?;
            }
            print_lines(&call(&target, &Request::Prim { module })?)
        }
        Command::Log {
            module,
            lines,
            since,
            follow,
        } => log(&target, module, lines, since, follow),
        Command::Resync { module, compare } => {
            print_lines(&call(&target, &Request::Resync { module, compare })?)
        }
        Command::Invalidate { module } => {
            print_lines(&call(&target, &Request::Invalidate { module })?)
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
            let response = ask(&target, &request)?;
            print_lines(&response)?;
            check(response).map(|_| ())
        }
        // Answered above, before the socket is looked for.
        Command::WebPassword { .. } => Ok(()),
        Command::Join => print_lines(&call(&target, &Request::Join)?),
        Command::Maintenance { mode, module } => print_lines(&call(
            &target,
            &Request::Maintenance {
                on: mode == OnOff::On,
                module,
            },
        )?),
        Command::Verify { module } => {
            let response = call(&target, &Request::Verify { module })?;
            print_lines(&response)?;
            if response.kind == Some(ErrorKind::Differs)
                || response.lines.iter().any(|l| l.starts_with("differs"))
            {
                return Err(VmctlError::Differs);
            }
            Ok(())
        }
        Command::Reload => print_lines(&call(&target, &Request::Reload)?),
        Command::Config(ConfigCommand::Push { yes }) => config_push(&cli, &target, yes),
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
            return Err(VmctlError::NeedsTerminal(
                "no terminal to ask the password on: pass --stdin",
            ));
        }
        let first = read_hidden("New web console password: ")?;
        let second = read_hidden("Again: ")?;
        if first != second {
            return Err(VmctlError::NotConfirmedBecause(
                "the passwords differ: nothing changed",
            ));
        }
        first
    };
    let written = vmha_controller::web::set_password(&config.cluster.state_dir, &password)
        .map_err(|e| VmctlError::daemon(e.to_string()))?;
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
            e.exit().into()
        }
    }
}
