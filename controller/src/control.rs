//! The control socket: a root-only unix socket (mode 0600 in a 0700
//! directory created if missing; peers must be root or the daemon's own user,
//! checked with SO_PEERCRED) speaking JSON lines — one [`Request`] per line,
//! one [`Response`] line back, several requests per connection allowed.
//!
//! The server only parses and forwards: each request goes to a channel as a
//! [`Call`] with a oneshot for the answer, so it is testable without a daemon.
//! [`Client`] is the blocking client `vmctl` uses.
//!
//! Bounded like every listener (issue 8): at most [`Limits::max_connections`]
//! connections at once (one more is closed at once), each request line must be
//! complete within [`Limits::request_deadline`] of the connection or of the
//! previous answer (in total, however slowly its bytes arrive; the command itself
//! may take as long as it needs), lines are read at most [`MAX_LINE`] bytes at a
//! time, and rejections are logged at most once per second per kind
//! (`vmha_fs::ratelog`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::BufReader as AsyncBufReader;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::JoinHandle;
use vmha_fs::ratelog::RateLog;

use crate::status::Status;

/// Longest request line accepted.
pub const MAX_LINE: usize = 64 * 1024;

/// Bounds of the control socket's connections.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; one more is closed at once.
    pub max_connections: usize,
    /// Time for a whole request line, from the connection or the previous answer.
    pub request_deadline: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 16,
            request_deadline: Duration::from_secs(5),
        }
    }
}

/// Decodes one request line (without or with its newline).
pub fn decode_request(line: &[u8]) -> Result<Request, String> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    serde_json::from_slice(line).map_err(|e| format!("bad request: {e}"))
}

/// Errors of the control socket (server and client).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot create socket directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("vmhad is already running (its control socket {0} answers)")]
    InUse(PathBuf),
    #[error(
        "control socket path {0} exists and is not a socket (a file is in the way; left as it is)"
    )]
    NotASocket(PathBuf),
    #[error("cannot listen on {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("vmhad is not running (no control socket at {0})")]
    NotRunning(PathBuf),
    #[error("vmhad is not running (control socket {0} refuses connections)")]
    Refused(PathBuf),
    #[error("permission denied on control socket {0} (vmctl must run as root)")]
    PermissionDenied(PathBuf),
    #[error("cannot talk to vmhad on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("vmhad closed the connection without answering")]
    NoAnswer,
    #[error("unexpected answer from vmhad: {0}")]
    BadAnswer(String),
}

/// A request line. `module` may be omitted when there is only one module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    Status,
    Start {
        #[serde(default)]
        module: Option<String>,
    },
    Stop {
        #[serde(default)]
        module: Option<String>,
    },
    Swap {
        #[serde(default)]
        module: Option<String>,
        /// `swap --live`: live-migrate, never fall back (absent: false; an
        /// older vmhad refuses the field rather than stop the VM).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        live: bool,
    },
    Prim {
        #[serde(default)]
        module: Option<String>,
    },
    Log {
        #[serde(default)]
        module: Option<String>,
    },
    /// `log` with bounds (`vmctl log -n N`, `-f`); a separate command so
    /// that `log` keeps its shape.
    #[serde(rename = "log_tail")]
    LogTail {
        #[serde(default)]
        module: Option<String>,
        /// Only the last N lines (`vmctl log -n N`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last: Option<usize>,
        /// Only lines numbered this or later (`log_next` of a previous
        /// answer: `vmctl log -f`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<u64>,
    },
    /// Compare the peer's copy block by block; report only.
    Verify {
        #[serde(default)]
        module: Option<String>,
    },
    /// `vmctl resync --compare`: compare both copies block by block and repair
    /// the SECOND from the PRIM while the VM writes (on the PRIM, or on a ready
    /// SECOND, which asks its PRIM). `compare` must be true: an incremental
    /// resync runs by itself whenever the SECOND is behind.
    Resync {
        #[serde(default)]
        module: Option<String>,
        #[serde(default)]
        compare: bool,
    },
    /// `vmctl invalidate` on a SECOND: discard its copy's records and take a
    /// full compare resync from the PRIM.
    Invalidate {
        #[serde(default)]
        module: Option<String>,
    },
    /// Re-read the configuration file vmhad was started with and apply it
    /// (`vmctl reload`, SIGHUP): `ok` once in effect, else every reason in
    /// `lines` and nothing changed.
    Reload,
    /// `vmctl config push`, peer side: check `text` as this node's
    /// configuration, write it over the file vmhad was started with
    /// (atomically) and reload. Refused, file untouched, when the reload
    /// would be.
    #[serde(rename = "config-apply")]
    ConfigApply {
        text: String,
    },
    /// The text of the configuration file vmhad was started with (in
    /// `text`): what `vmctl config push` compares and sends.
    #[serde(rename = "config-text")]
    ConfigText,
    /// Hand every module over to the peer and stay out until `join`
    /// (persisted; `until_boot`: only until the next boot, for host shutdown).
    /// With `wait_s`, answers once every module is handed over (the peer runs
    /// it, or it is stopped here and the peer will not), or fails after that
    /// many seconds.
    Leave {
        #[serde(default)]
        until_boot: bool,
        #[serde(default)]
        wait_s: Option<u64>,
    },
    /// End a leave: every module starts as at daemon start.
    Join,
    /// Maintenance of one module, or of every module when `module` is omitted.
    Maintenance {
        on: bool,
        #[serde(default)]
        module: Option<String>,
    },
}

/// What kind of failure (or notable outcome) an answer reports, for scripts
/// and for `vmctl`'s exit status (`vmctl/src/exit.rs` maps each to one code).
/// JSON: `"kind": "refused"` etc. next to `"error"`. An answer without `kind`
/// (an older daemon) counts as `failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// vmhad would not do it in the module's present state (nothing done):
    /// "swap refused: ...", "prim refused: ...", an aborted swap.
    Refused,
    /// No such module, none configured, or several and none named.
    UnknownModule,
    /// The command ran and found the two copies different (`verify`,
    /// compares). Comes with `ok: true`: the command itself worked.
    Differs,
    /// vmhad is shutting down (as good as not running).
    ShuttingDown,
    /// The request line was not understood, or not allowed.
    BadRequest,
    /// Anything else that failed (a driver, the disk, ...).
    Failed,
    /// A kind this client does not know (a newer daemon).
    #[serde(other)]
    Other,
}

impl ErrorKind {
    /// The kind of an error message given without one: how every
    /// [`Response::error`] gets its kind, so request handlers that only have
    /// a message still answer with the right kind. Recognises the messages of
    /// [`UnknownModule`], the state machine's refusals ("refused",
    /// "aborted") and "shutting down".
    pub fn of_message(message: &str) -> ErrorKind {
        if UnknownModule::matches(message) {
            ErrorKind::UnknownModule
        } else if message.contains("shutting down") {
            ErrorKind::ShuttingDown
        } else if message.contains("refused") || message.contains("aborted") {
            ErrorKind::Refused
        } else if message.starts_with("bad request") || message == "permission denied" {
            ErrorKind::BadRequest
        } else {
            ErrorKind::Failed
        }
    }
}

/// A request named no module that exists (or named none when several do):
/// the one source of these messages, so [`ErrorKind::of_message`] knows them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnknownModule {
    #[error("unknown module `{name}` (modules: {known})")]
    Unknown { name: String, known: String },
    #[error("no module is configured")]
    NoneConfigured,
    #[error("several modules are configured ({known}): name one")]
    NotNamed { known: String },
}

impl UnknownModule {
    fn matches(message: &str) -> bool {
        message.starts_with("unknown module `")
            || message == "no module is configured"
            || (message.starts_with("several modules are configured (")
                && message.ends_with("): name one"))
    }
}

impl From<UnknownModule> for String {
    fn from(e: UnknownModule) -> String {
        e.to_string()
    }
}

/// The answer line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Machine-readable kind of `error` (and `differs` on a successful
    /// compare); absent on plain success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ErrorKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// Event-log lines produced by a command, or the whole log for `log`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lines: Vec<String>,
    /// `log` only: the number of the next line, for `after` (following).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_next: Option<u64>,
    /// `config-text`: the configuration file's text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

impl Response {
    /// A failure; its kind is taken from the message
    /// ([`ErrorKind::of_message`]).
    pub fn error(message: impl Into<String>) -> Response {
        let message = message.into();
        Response::failure(ErrorKind::of_message(&message), message)
    }

    /// A failure of a known kind.
    pub fn failure(kind: ErrorKind, message: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(message.into()),
            kind: Some(kind),
            ..Response::default()
        }
    }

    /// The kind a client acts on: `kind`, or `failed` for a failure without
    /// one (older daemon), `None` for a plain success.
    pub fn effective_kind(&self) -> Option<ErrorKind> {
        match (self.ok, self.kind) {
            (_, Some(kind)) => Some(kind),
            (false, None) => Some(ErrorKind::Failed),
            (true, None) => None,
        }
    }

    pub fn lines(ok: bool, lines: Vec<String>) -> Response {
        Response {
            ok,
            lines,
            ..Response::default()
        }
    }
}

/// A request waiting for its answer.
#[derive(Debug)]
pub struct Call {
    pub request: Request,
    pub reply: oneshot::Sender<Response>,
    /// Who sent it (SO_PEERCRED), for the event log; `None` in-process.
    pub caller: Option<Caller>,
}

/// Who asked, for the event log: the cause of what a request does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A process on the control socket (SO_PEERCRED).
    Local {
        uid: u32,
        pid: Option<i32>,
        /// The user name of `uid` (from the password database), if known.
        user: Option<String>,
    },
    /// The peer node's vmctl over the authenticated daemon channel (only
    /// root reads the cluster key it authenticated with).
    Peer,
    /// A named principal vmhad answers for itself: a web console user
    /// (`web:admin from 10.0.0.5:51234`) or a request the peer relayed for
    /// one of its users.
    Named(String),
}

impl Caller {
    /// The credentials of `stream`'s peer.
    pub fn of(stream: &UnixStream) -> Option<Caller> {
        let cred = stream.peer_cred().ok()?;
        Some(Caller::Local {
            uid: cred.uid(),
            pid: cred.pid(),
            user: user_name(cred.uid()),
        })
    }
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Local { uid, pid, user } => {
                match user {
                    Some(user) => write!(f, "{user} (uid {uid})")?,
                    None => write!(f, "uid {uid}")?,
                }
                if let Some(pid) = pid {
                    write!(f, " pid {pid}")?;
                }
                Ok(())
            }
            Caller::Peer => f.write_str("the peer's vmctl over the daemon channel"),
            Caller::Named(who) => f.write_str(who),
        }
    }
}

/// `uid`'s name from `/etc/passwd` (local accounts: root and the operators
/// who may use the socket); `None` when it is not there.
pub fn user_name(uid: u32) -> Option<String> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd_name(&text, uid)
}

fn passwd_name(text: &str, uid: u32) -> Option<String> {
    text.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let id = fields.nth(1)?;
        (id.parse::<u32>().ok()? == uid && !name.is_empty()).then(|| name.to_string())
    })
}

/// A bound control socket.
#[derive(Debug)]
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
    limits: Limits,
}

impl Server {
    /// Binds `path` (0600). A stale socket file left by a dead daemon is
    /// replaced; a live one is an error.
    pub fn bind(path: &Path) -> Result<Server, ControlError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(|source| ControlError::Dir {
                        path: dir.to_path_buf(),
                        source,
                    })?;
            }
        }
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                // Never remove what is not a socket: it may be someone's file.
                return Err(ControlError::NotASocket(path.to_path_buf()));
            }
            if StdUnixStream::connect(path).is_ok() {
                return Err(ControlError::InUse(path.to_path_buf()));
            }
            let _ = std::fs::remove_file(path);
        }
        let bind_err = |source| ControlError::Bind {
            path: path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        Ok(Server {
            listener,
            path: path.to_path_buf(),
            limits: Limits::default(),
        })
    }

    /// Other bounds than the default ones (tests).
    pub fn with_limits(mut self, limits: Limits) -> Server {
        self.limits = limits;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves until `shutdown` turns true, then removes the socket file.
    pub fn spawn(
        self,
        calls: mpsc::Sender<Call>,
        mut shutdown: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        let slots = Arc::new(Semaphore::new(self.limits.max_connections));
        let log = Arc::new(Mutex::new(RateLog::new("control")));
        let deadline = self.limits.request_deadline;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = shutdown.changed() => break,
                    _ = tick.tick() => lock(&log).tick(),
                    accepted = self.listener.accept() => match accepted {
                        Ok((stream, _)) => match slots.clone().try_acquire_owned() {
                            Ok(slot) => {
                                let log = log.clone();
                                let calls = calls.clone();
                                tokio::spawn(async move {
                                    connection(stream, calls, deadline, &log).await;
                                    drop(slot);
                                });
                            }
                            Err(_) => {
                                // Dropping the stream closes it at once.
                                lock(&log).reject(
                                    "over_limit",
                                    &peer_name(&stream),
                                    "too many control connections at once",
                                );
                            }
                        },
                        Err(e) => {
                            lock(&log).reject("accept_failed", &"-", &e.to_string());
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }
            let _ = std::fs::remove_file(&self.path);
        })
    }
}

fn lock(log: &Mutex<RateLog>) -> std::sync::MutexGuard<'_, RateLog> {
    log.lock().unwrap_or_else(|p| p.into_inner())
}

/// The peer's pid and uid, for the log.
fn peer_name(stream: &UnixStream) -> String {
    match stream.peer_cred() {
        Ok(cred) => format!("pid {:?} uid {}", cred.pid(), cred.uid()),
        Err(_) => "unknown peer".into(),
    }
}

fn allowed(stream: &UnixStream) -> bool {
    let me = rustix::process::geteuid().as_raw();
    match stream.peer_cred() {
        Ok(cred) => cred.uid() == 0 || cred.uid() == me,
        Err(_) => false,
    }
}

/// One request line as read.
enum ReadLine {
    Eof,
    TooLong,
    Complete(Vec<u8>),
}

/// Reads up to a newline, never buffering more than [`MAX_LINE`] + 1 bytes.
async fn read_line(reader: &mut (impl AsyncBufRead + Unpin)) -> std::io::Result<ReadLine> {
    let mut buf = Vec::new();
    let n = reader
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut buf)
        .await?;
    if n == 0 {
        Ok(ReadLine::Eof)
    } else if buf.len() > MAX_LINE {
        Ok(ReadLine::TooLong)
    } else {
        Ok(ReadLine::Complete(buf))
    }
}

fn encode(response: &Response) -> Vec<u8> {
    let mut out = match serde_json::to_vec(response) {
        Ok(out) => out,
        Err(e) => format!("{{\"ok\":false,\"error\":\"{e}\"}}").into_bytes(),
    };
    out.push(b'\n');
    out
}

async fn connection(
    stream: UnixStream,
    calls: mpsc::Sender<Call>,
    deadline: Duration,
    log: &Mutex<RateLog>,
) {
    let peer = peer_name(&stream);
    let caller = Caller::of(&stream);
    if !allowed(&stream) {
        lock(log).reject("permission_denied", &peer, "not root nor the daemon's user");
        let (_, mut write) = stream.into_split();
        let _ = write
            .write_all(b"{\"ok\":false,\"error\":\"permission denied\",\"kind\":\"bad_request\"}\n")
            .await;
        return;
    }
    let (read, mut write) = stream.into_split();
    let mut reader = AsyncBufReader::new(read);
    loop {
        let line = match tokio::time::timeout(deadline, read_line(&mut reader)).await {
            Err(_) => {
                lock(log).reject(
                    "deadline",
                    &peer,
                    &format!("no complete request within {} ms", deadline.as_millis()),
                );
                return;
            }
            Ok(Err(_)) | Ok(Ok(ReadLine::Eof)) => return,
            Ok(Ok(ReadLine::TooLong)) => {
                lock(log).reject("too_long", &peer, "request line too long");
                let _ = write
                    .write_all(&encode(&Response::error("request too long")))
                    .await;
                return;
            }
            Ok(Ok(ReadLine::Complete(line))) => line,
        };
        let response = match decode_request(&line) {
            Err(e) => Response::error(e),
            Ok(request) => {
                let (reply, answer) = oneshot::channel();
                let call = Call {
                    request,
                    reply,
                    caller: caller.clone(),
                };
                if calls.send(call).await.is_err() {
                    Response::error("vmhad is shutting down")
                } else {
                    answer
                        .await
                        .unwrap_or_else(|_| Response::error("vmhad is shutting down"))
                }
            }
        };
        if write.write_all(&encode(&response)).await.is_err() {
            return;
        }
    }
}

fn is_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// A blocking client (for `vmctl`).
#[derive(Debug)]
pub struct Client {
    path: PathBuf,
    stream: StdUnixStream,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Client, ControlError> {
        let stream = StdUnixStream::connect(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => ControlError::NotRunning(path.to_path_buf()),
            std::io::ErrorKind::ConnectionRefused if !is_socket(path) => {
                ControlError::NotASocket(path.to_path_buf())
            }
            std::io::ErrorKind::ConnectionRefused => ControlError::Refused(path.to_path_buf()),
            std::io::ErrorKind::PermissionDenied => {
                ControlError::PermissionDenied(path.to_path_buf())
            }
            _ => ControlError::Io {
                path: path.to_path_buf(),
                source,
            },
        })?;
        Ok(Client {
            path: path.to_path_buf(),
            stream,
        })
    }

    /// Sends one request and waits for its answer (commands may take as long
    /// as their actions, e.g. a VM shutdown).
    pub fn call(&mut self, request: &Request) -> Result<Response, ControlError> {
        let io = |source| ControlError::Io {
            path: self.path.clone(),
            source,
        };
        let mut line =
            serde_json::to_vec(request).map_err(|e| ControlError::BadAnswer(e.to_string()))?;
        line.push(b'\n');
        self.stream.write_all(&line).map_err(io)?;
        let mut answer = String::new();
        let read = BufReader::new(&self.stream)
            .read_line(&mut answer)
            .map_err(|source| ControlError::Io {
                path: self.path.clone(),
                source,
            })?;
        if read == 0 {
            return Err(ControlError::NoAnswer);
        }
        serde_json::from_str(&answer).map_err(|e| ControlError::BadAnswer(format!("{e}: {answer}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[test]
    fn request_wire_format() {
        let r: Request = serde_json::from_str(r#"{"cmd":"swap","module":"vm1"}"#).unwrap();
        assert_eq!(
            r,
            Request::Swap {
                module: Some("vm1".into()),
                live: false,
            }
        );
        let r: Request = serde_json::from_str(r#"{"cmd":"status"}"#).unwrap();
        assert_eq!(r, Request::Status);
        let r: Request = serde_json::from_str(r#"{"cmd":"log"}"#).unwrap();
        assert_eq!(r, Request::Log { module: None });
        let r: Request = serde_json::from_str(r#"{"cmd":"log_tail","last":3}"#).unwrap();
        assert_eq!(
            r,
            Request::LogTail {
                module: None,
                last: Some(3),
                after: None
            }
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"reboot"}"#).is_err());
        let r: Request = serde_json::from_str(r#"{"cmd":"leave"}"#).unwrap();
        assert_eq!(
            r,
            Request::Leave {
                until_boot: false,
                wait_s: None
            }
        );
        let r: Request =
            serde_json::from_str(r#"{"cmd":"leave","until_boot":true,"wait_s":90}"#).unwrap();
        assert_eq!(
            r,
            Request::Leave {
                until_boot: true,
                wait_s: Some(90)
            }
        );
        let r: Request = serde_json::from_str(r#"{"cmd":"join"}"#).unwrap();
        assert_eq!(r, Request::Join);
        let r: Request = serde_json::from_str(r#"{"cmd":"maintenance","on":true}"#).unwrap();
        assert_eq!(
            r,
            Request::Maintenance {
                on: true,
                module: None
            }
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"maintenance"}"#).is_err());
    }

    #[test]
    fn user_names_from_passwd() {
        let text = "root:x:0:0:root:/root:/bin/bash\nop:x:1000:1000::/home/op:/bin/sh\n";
        assert_eq!(passwd_name(text, 0).as_deref(), Some("root"));
        assert_eq!(passwd_name(text, 1000).as_deref(), Some("op"));
        assert_eq!(passwd_name(text, 7), None);
        let c = Caller::Local {
            uid: 0,
            pid: Some(42),
            user: Some("root".into()),
        };
        assert_eq!(c.to_string(), "root (uid 0) pid 42");
        assert_eq!(
            Caller::Named("web:admin from 10.0.0.5:51234".into()).to_string(),
            "web:admin from 10.0.0.5:51234"
        );
    }

    #[test]
    fn error_kinds_on_the_wire() {
        let unknown = UnknownModule::Unknown {
            name: "x".into(),
            known: "vm1".into(),
        };
        let r = Response::error(unknown);
        assert_eq!(r.kind, Some(ErrorKind::UnknownModule));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["kind"], "unknown_module");
        assert_eq!(
            Response::error(UnknownModule::NotNamed {
                known: "a, b".into()
            })
            .kind,
            Some(ErrorKind::UnknownModule)
        );
        assert_eq!(
            Response::error("swap refused: no peer").kind,
            Some(ErrorKind::Refused)
        );
        assert_eq!(
            Response::error("vmhad is shutting down").kind,
            Some(ErrorKind::ShuttingDown)
        );
        assert_eq!(
            Response::error("disk on fire").kind,
            Some(ErrorKind::Failed)
        );
        // Old daemons send no kind; new daemons may send kinds we do not know.
        let old: Response = serde_json::from_str(r#"{"ok":false,"error":"x"}"#).unwrap();
        assert_eq!(old.effective_kind(), Some(ErrorKind::Failed));
        let newer: Response =
            serde_json::from_str(r#"{"ok":false,"error":"x","kind":"martian"}"#).unwrap();
        assert_eq!(newer.kind, Some(ErrorKind::Other));
        let ok = Response::lines(true, vec![]);
        assert_eq!(ok.effective_kind(), None);
        assert!(serde_json::to_value(&ok).unwrap().get("kind").is_none());
    }

    #[tokio::test]
    async fn serves_over_a_temp_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/vmhad.sock");
        let server = Server::bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let parent = std::fs::metadata(dir.path().join("sub")).unwrap();
        assert_eq!(parent.permissions().mode() & 0o777, 0o700);
        // A second daemon on the same socket is refused: "already running".
        let second = Server::bind(&path).unwrap_err();
        assert!(matches!(second, ControlError::InUse(_)));
        assert!(second.to_string().contains("already running"), "{second}");
        let (tx, mut rx) = mpsc::channel::<Call>(4);
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = server.spawn(tx, stop_rx);
        tokio::spawn(async move {
            while let Some(call) = rx.recv().await {
                assert!(call.caller.is_some());
                let _ = call
                    .reply
                    .send(Response::lines(true, vec![format!("{:?}", call.request)]));
            }
        });
        let client_path = path.clone();
        let answers = tokio::task::spawn_blocking(move || {
            let mut client = Client::connect(&client_path).unwrap();
            let a = client.call(&Request::Status).unwrap();
            let b = client.call(&Request::Stop { module: None }).unwrap();
            (a, b)
        })
        .await
        .unwrap();
        assert_eq!(answers.0.lines, vec!["Status".to_string()]);
        assert_eq!(answers.1.lines, vec!["Stop { module: None }".to_string()]);
        stop_tx.send(true).unwrap();
        task.await.unwrap();
        assert!(!path.exists());
        assert!(matches!(
            Client::connect(&path),
            Err(ControlError::NotRunning(_))
        ));
    }

    /// A server with small bounds, answering every request with its debug form.
    fn small_server(dir: &Path, limits: Limits) -> (PathBuf, watch::Sender<bool>, JoinHandle<()>) {
        let path = dir.join("c.sock");
        let server = Server::bind(&path).unwrap().with_limits(limits);
        let (tx, mut rx) = mpsc::channel::<Call>(4);
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = server.spawn(tx, stop_rx);
        tokio::spawn(async move {
            while let Some(call) = rx.recv().await {
                let _ = call
                    .reply
                    .send(Response::lines(true, vec![format!("{:?}", call.request)]));
            }
        });
        (path, stop_tx, task)
    }

    /// Whether the server closes `s` within `within` (reading whatever it says).
    async fn closed_within(s: &mut UnixStream, within: Duration) -> bool {
        let mut buf = [0u8; 1024];
        let end = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(end, s.read(&mut buf)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
            }
        }
    }

    #[tokio::test]
    async fn connections_are_capped_and_requests_have_a_total_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_connections: 4,
            request_deadline: Duration::from_millis(1500),
        };
        let (path, stop, task) = small_server(dir.path(), limits);
        let mut idle = Vec::new();
        for _ in 0..4 {
            idle.push(UnixStream::connect(&path).await.unwrap());
        }
        // Let the server take them.
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Over the cap: closed at once.
        let mut extra = UnixStream::connect(&path).await.unwrap();
        assert!(closed_within(&mut extra, Duration::from_millis(500)).await);
        // A client trickling a byte every 300 ms (never a whole line) is closed by
        // the total deadline, as are the silent ones.
        let started = tokio::time::Instant::now();
        let trickler = &mut idle[0];
        let mut closed = false;
        for _ in 0..20 {
            if trickler.write_all(b" ").await.is_err() {
                closed = true;
                break;
            }
            if closed_within(trickler, Duration::from_millis(300)).await {
                closed = true;
                break;
            }
        }
        assert!(closed, "a trickling client was never closed");
        assert!(
            started.elapsed() < Duration::from_millis(2500),
            "{:?}",
            started.elapsed()
        );
        for s in &mut idle[1..] {
            assert!(closed_within(s, Duration::from_millis(1000)).await);
        }
        // The slots are free again: a real client is served.
        let client_path = path.clone();
        let answer = tokio::task::spawn_blocking(move || {
            Client::connect(&client_path)
                .unwrap()
                .call(&Request::Status)
        })
        .await
        .unwrap()
        .unwrap();
        assert!(answer.ok);
        // A request line longer than MAX_LINE is refused without being buffered whole.
        let mut long = UnixStream::connect(&path).await.unwrap();
        let _ = long.write_all(&vec![b'x'; MAX_LINE + 100]).await;
        let mut answer = String::new();
        let _ = tokio::io::BufReader::new(&mut long)
            .read_line(&mut answer)
            .await;
        assert!(answer.contains("request too long"), "{answer}");
        stop.send(true).unwrap();
        task.await.unwrap();
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Arbitrary bytes never panic the request decoder.
        #[test]
        fn random_request_lines_never_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
        ) {
            let _ = decode_request(&bytes);
        }

        /// Arbitrary JSON-ish text (a valid command name with random fields) never
        /// panics and is decoded or refused with a message.
        #[test]
        fn json_like_requests_never_panic(
            cmd in "(status|start|stop|swap|prim|log|verify|x)",
            module in proptest::option::of("[ -~]{0,20}"),
            extra in proptest::option::of("[a-z]{1,8}"),
        ) {
            let mut value = serde_json::json!({ "cmd": cmd });
            if let Some(m) = module {
                value["module"] = serde_json::Value::String(m);
            }
            if let Some(k) = extra {
                value[k] = serde_json::Value::Bool(true);
            }
            let line = serde_json::to_vec(&value).unwrap();
            match decode_request(&line) {
                Ok(_) => {}
                Err(e) => proptest::prop_assert!(e.starts_with("bad request")),
            }
        }
    }

    #[test]
    fn a_file_in_the_way_is_named_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmhad.sock");
        std::fs::write(&path, b"precious").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let err = rt.block_on(async { Server::bind(&path).unwrap_err() });
        assert!(matches!(err, ControlError::NotASocket(_)), "{err}");
        assert!(err.to_string().contains("is not a socket"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
        let err = Client::connect(&path).unwrap_err();
        assert!(matches!(err, ControlError::NotASocket(_)), "{err}");
    }

    #[test]
    fn stale_socket_is_refused_then_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(matches!(
            Client::connect(&path),
            Err(ControlError::Refused(_))
        ));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async { Server::bind(&path).unwrap() });
    }
}
