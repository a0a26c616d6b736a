//! The control socket: a root-only unix socket (mode 0600 in a 0700
//! directory created if missing; peers must be root or the daemon's own user,
//! checked with SO_PEERCRED) speaking JSON lines — one [`Request`] per line,
//! one [`Response`] line back, several requests per connection allowed.
//!
//! The server only parses and forwards: each request goes to a channel as a
//! [`Call`] with a oneshot for the answer, so it is testable without a daemon.
//! [`Client`] is the blocking client `vmctl` uses.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader as AsyncBufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::status::Status;

/// Longest request line accepted.
pub const MAX_LINE: usize = 64 * 1024;

/// Errors of the control socket (server and client).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot create socket directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("another vmhad is already listening on {0}")]
    InUse(PathBuf),
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
    },
    Prim {
        #[serde(default)]
        module: Option<String>,
    },
    Log {
        #[serde(default)]
        module: Option<String>,
    },
    /// Compare the peer's copy block by block; report only.
    Verify {
        #[serde(default)]
        module: Option<String>,
    },
}

/// The answer line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// Event-log lines produced by a command, or the whole log for `log`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lines: Vec<String>,
}

impl Response {
    pub fn error(message: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(message.into()),
            ..Response::default()
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
}

/// A bound control socket.
#[derive(Debug)]
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
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
        if path.exists() {
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
        })
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
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.changed() => break,
                    accepted = self.listener.accept() => match accepted {
                        Ok((stream, _)) => {
                            tokio::spawn(connection(stream, calls.clone()));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "control socket accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }
            let _ = std::fs::remove_file(&self.path);
        })
    }
}

fn allowed(stream: &UnixStream) -> bool {
    let me = rustix::process::geteuid().as_raw();
    match stream.peer_cred() {
        Ok(cred) => cred.uid() == 0 || cred.uid() == me,
        Err(_) => false,
    }
}

async fn connection(stream: UnixStream, calls: mpsc::Sender<Call>) {
    if !allowed(&stream) {
        let (_, mut write) = stream.into_split();
        let _ = write
            .write_all(b"{\"ok\":false,\"error\":\"permission denied\"}\n")
            .await;
        return;
    }
    let (read, mut write) = stream.into_split();
    let mut lines = AsyncBufReader::new(read).lines();
    loop {
        let line = match lines.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) | Err(_) => return,
        };
        let response = if line.len() > MAX_LINE {
            Response::error("request too long")
        } else {
            match serde_json::from_str::<Request>(&line) {
                Err(e) => Response::error(format!("bad request: {e}")),
                Ok(request) => {
                    let (reply, answer) = oneshot::channel();
                    if calls.send(Call { request, reply }).await.is_err() {
                        Response::error("vmhad is shutting down")
                    } else {
                        answer
                            .await
                            .unwrap_or_else(|_| Response::error("vmhad is shutting down"))
                    }
                }
            }
        };
        let mut out = match serde_json::to_vec(&response) {
            Ok(out) => out,
            Err(e) => format!("{{\"ok\":false,\"error\":\"{e}\"}}").into_bytes(),
        };
        out.push(b'\n');
        if write.write_all(&out).await.is_err() {
            return;
        }
    }
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

    #[test]
    fn request_wire_format() {
        let r: Request = serde_json::from_str(r#"{"cmd":"swap","module":"vm1"}"#).unwrap();
        assert_eq!(
            r,
            Request::Swap {
                module: Some("vm1".into())
            }
        );
        let r: Request = serde_json::from_str(r#"{"cmd":"status"}"#).unwrap();
        assert_eq!(r, Request::Status);
        let r: Request = serde_json::from_str(r#"{"cmd":"log"}"#).unwrap();
        assert_eq!(r, Request::Log { module: None });
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"reboot"}"#).is_err());
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
        // A second daemon on the same socket is refused.
        assert!(matches!(Server::bind(&path), Err(ControlError::InUse(_))));
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
