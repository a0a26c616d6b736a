//! `vmctl`: the operator's CLI for the local `vmhad`, over its control socket.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
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
}

impl VmctlError {
    /// The exit status for this error (the table in `exit.rs`).
    fn exit(&self) -> Exit {
        match self {
            VmctlError::Config(_) | VmctlError::Input(_) | VmctlError::Output(_) => Exit::Failed,
            VmctlError::NotConfirmed => Exit::Failed,
            VmctlError::NeedsConfirmation => Exit::Usage,
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
    check(Client::connect(socket)?.call(request)?)
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
    socket: &Path,
    module: Option<String>,
    lines: Option<usize>,
    since: Option<SystemTime>,
    follow: bool,
) -> Result<(), VmctlError> {
    let keep = since_filter(since);
    let mut client = Client::connect(socket)?;
    let mut after = None;
    let mut last = lines;
    loop {
        let response = client.call(&Request::LogTail {
            module: module.clone(),
            last,
            after,
        })?;
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

fn watch(socket: &Path, interval: f64) -> Result<(), VmctlError> {
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
    let socket = socket_path(&cli)?;
    match cli.command {
        Command::Status {
            watch: true,
            interval,
            ..
        } => watch(&socket, interval),
        Command::Status { json, .. } => {
            let response = call(&socket, &Request::Status)?;
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
        Command::Start { module } => print_lines(&call(&socket, &Request::Start { module })?),
        Command::Stop { module } => print_lines(&call(&socket, &Request::Stop { module })?),
        Command::Swap { module } => print_lines(&call(&socket, &Request::Swap { module })?),
        Command::Prim { module, yes } => {
            if !yes {
                confirm(module.as_deref())?;
            }
            print_lines(&call(&socket, &Request::Prim { module })?)
        }
        Command::Log {
            module,
            lines,
            since,
            follow,
        } => log(&socket, module, lines, since, follow),
        Command::Verify { module } => {
            let response = call(&socket, &Request::Verify { module })?;
            print_lines(&response)?;
            if response.kind == Some(ErrorKind::Differs)
                || response.lines.iter().any(|l| l.starts_with("differs"))
            {
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
            e.exit().into()
        }
    }
}
