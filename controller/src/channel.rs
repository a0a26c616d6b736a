//! The daemon channel: one authenticated TCP connection kind between the two
//! vmhad (and `vmctl --node NAME`), on `cluster.channel_port` of every address.
//!
//! Why a channel of its own: heartbeats are small UDP datagrams that must stay
//! cheap and loss-tolerant; the control socket is local. What one node needs
//! from the other beyond liveness — its full status view, running an operator
//! command there, pushing a configuration file, later the console's peer view
//! and live-swap coordination — needs a reliable, authenticated request/answer
//! path of bounded frames.
//!
//! Security and bounds are the replication port's, reused rather than copied:
//! - the handshake is vmha-fs's mutual challenge-response with the cluster key
//!   (`vmha_fs::wire::client_handshake_versions`), bound to the reserved binding
//!   `@vmhad` + the channel port (module names cannot start with `@`), so a
//!   replication session can never be mistaken for a channel one;
//! - the unauthenticated phase runs in `vmha_fs::preauth::serve_door` (at most 64
//!   handshakes at once, each within 5 s, rejections logged at most once per
//!   second per kind under `listener="channel"`);
//! - frames are vmha-fs's (length-prefixed, keyed-blake3 MAC per frame over a
//!   counter): a message travels as JSON in the frame's data section, at most
//!   [`MAX_MESSAGE`] bytes, refused before it is read when longer.
//!
//! JSON rather than bincode: the messages carry `status` and `control`
//! types whose JSON form is the stable contract (`skip_serializing_if`, tags), and
//! an unknown message from a newer peer decodes to an error the session can
//! answer ([`Message::Error`]) instead of breaking the stream.
//!
//! Versions ([`CHANNEL`], negotiated in the handshake like replication): 1 has
//! status and remote commands; 2 adds [`Message::ConfigPush`]; 3 adds
//! [`Message::CommandAs`] (a command logged in the peer's event log with the
//! user who asked: the web console) and [`Message::Report`] (the peer's part
//! of `vmctl report`); 4 adds [`Message::LibvirtStream`]: the session becomes
//! a byte stream to the serving node's local libvirt socket (live swap: the
//! source's libvirtd reaches the destination's through this authenticated
//! channel, see `crate::migrate`). A client asks for
//! a feature only when the session's version has it, and says which version the
//! peer speaks otherwise. Test hook: [`CHANNEL_ENV`]
//! (`VMHA_TEST_CHANNEL_VERSIONS`, see `vmha_fs::version`) narrows the advertised
//! range.
//!
//! The daemon side is the [`PeerHandler`] trait: vmhad implements it with
//! [`CallHandler`] (commands go through the same queue as the control socket's);
//! a session runs on its own thread (at most [`MAX_SESSIONS`]), so a handler may
//! block.

use std::io::{BufReader, BufWriter};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use vmha_fs::key::ClusterKey;
use vmha_fs::preauth::{self, Door};
use vmha_fs::version::{VersionError, Versions};
use vmha_fs::wire::{self, Binding, FrameReader, FrameWriter, WireError};

use crate::control::{Call, Request, Response};
use crate::status::Status;

/// The daemon-channel versions this build speaks.
pub const CHANNEL: Versions = Versions { min: 1, max: 4 };
/// The first version with [`Message::ConfigPush`].
pub const CONFIG_PUSH_SINCE: u16 = 2;
/// The first version with [`Message::CommandAs`] and [`Message::Report`].
pub const CONSOLE_SINCE: u16 = 3;
/// The first version with [`Message::LibvirtStream`] (live swap).
pub const LIBVIRT_STREAM_SINCE: u16 = 4;
/// Largest chunk of a libvirt stream in one frame.
const STREAM_CHUNK: u32 = 64 * 1024;
/// Test only: narrows the advertised channel versions (`MAX` or `MIN..=MAX`).
pub const CHANNEL_ENV: &str = "VMHA_TEST_CHANNEL_VERSIONS";
/// Largest message (JSON bytes) either side accepts.
pub const MAX_MESSAGE: u32 = 1 << 20;
/// Authenticated sessions served at once; more are closed at once.
pub const MAX_SESSIONS: usize = 8;
/// An authenticated session idle this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// The binding name of the channel in the handshake (not a valid module name).
const BINDING_NAME: &str = "@vmhad";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of the daemon channel.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("cannot listen on the daemon channel {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot connect to the daemon channel of {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("daemon channel of {addr}: {source}")]
    Wire { addr: SocketAddr, source: WireError },
    #[error("daemon channel of {addr}: cannot encode or decode a message: {0}", .source)]
    Json {
        addr: SocketAddr,
        source: serde_json::Error,
    },
    #[error("the peer's vmhad speaks daemon-channel version {version}; {what} needs version {needs} or newer (upgrade it)")]
    Unsupported {
        what: &'static str,
        version: u16,
        needs: u16,
    },
    #[error("peer vmhad too old for live swap: it speaks daemon-channel version {version}, live swap needs version {needs} (upgrade it)")]
    TooOldForLiveSwap { version: u16, needs: u16 },
    #[error("daemon channel of {addr}: libvirt stream: {source}")]
    Stream {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the peer's vmhad answered: {0}")]
    Peer(String),
    #[error("unexpected answer from the peer's vmhad: {0}")]
    Unexpected(String),
    #[error(transparent)]
    Version(#[from] VersionError),
}

/// Everything that travels on the channel. Requests (client to server) and
/// answers (server to client) alternate; new kinds are added at the end with
/// the channel version that introduced them (an older peer answers
/// [`Message::Error`] to a kind it does not know).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// v1. Asks for the peer's full status view (as its `vmctl status --json`).
    Status,
    /// v1. Answer to `Status`.
    StatusView { status: Box<Status> },
    /// v1. Runs a control request on the peer, as its local `vmctl` would.
    Command { request: Request },
    /// v1. Answer to `Command` (and to `ConfigPush`).
    Reply { response: Box<Response> },
    /// v2. The sender's configuration file: the peer writes it in place of its
    /// own and reloads (`vmctl config push`).
    ConfigPush { text: String },
    /// v1. The request could not be served (unknown kind, undecodable, ...).
    Error { message: String },
    /// v3. As `Command`, written to the peer's event log with `user` (who
    /// asked, e.g. `web:admin from 10.0.0.5:51234 on node1's console`) and
    /// the outcome. Answered with `Reply`.
    CommandAs { request: Request, user: String },
    /// v3. Asks for the peer's part of the diagnostic report.
    Report,
    /// v3. Answer to `Report`: the files, bounded so the message fits in
    /// [`MAX_MESSAGE`].
    ReportPart {
        files: Vec<crate::report::ReportFile>,
    },
    /// v4. Connect to this node's local libvirt socket, the one of `module`'s
    /// `libvirt_uri`, and turn the session into a byte stream to it.
    LibvirtStream { module: String },
    /// v4. Answer to `LibvirtStream`: connected. From here on every frame in
    /// either direction is raw bytes of the libvirt connection (still
    /// authenticated frame by frame); an empty frame or the end of the
    /// connection closes it.
    StreamReady,
}

impl Message {
    fn kind(&self) -> &'static str {
        match self {
            Message::Status => "status",
            Message::StatusView { .. } => "status_view",
            Message::Command { .. } => "command",
            Message::Reply { .. } => "reply",
            Message::ConfigPush { .. } => "config_push",
            Message::Error { .. } => "error",
            Message::CommandAs { .. } => "command_as",
            Message::Report => "report",
            Message::ReportPart { .. } => "report_part",
            Message::LibvirtStream { .. } => "libvirt_stream",
            Message::StreamReady => "stream_ready",
        }
    }
}

/// What the daemon does for the peer. Called on the session's own thread: may
/// block.
pub trait PeerHandler: Send + Sync {
    /// The full status view (`vmctl status --json` of this node).
    fn status(&self) -> Result<Status, String>;
    /// Runs `request` as the local control socket would.
    fn command(&self, request: Request) -> Response;
    /// Writes `text` as this node's configuration file and reloads.
    fn config_push(&self, text: String) -> Response;
    /// Runs `request` with `user` written to the event log (who asked).
    fn command_as(&self, request: Request, user: String) -> Response {
        let _ = user;
        self.command(request)
    }
    /// This node's part of the diagnostic report (bounded).
    fn report(&self) -> Result<Vec<crate::report::ReportFile>, String> {
        Err("this vmhad cannot make a report".into())
    }
    /// The local libvirt unix socket of `module`'s `libvirt_uri` (live swap).
    fn libvirt_socket(&self, module: &str) -> Result<std::path::PathBuf, String> {
        Err(format!(
            "this vmhad does not forward libvirt (module `{module}`)"
        ))
    }
}

/// The channel versions this process advertises: [`CHANNEL`] narrowed by
/// [`CHANNEL_ENV`] (vmhad refuses to start on an invalid value; see
/// [`check_env`]).
pub fn advertised() -> Versions {
    static VERSIONS: std::sync::OnceLock<Versions> = std::sync::OnceLock::new();
    *VERSIONS.get_or_init(|| CHANNEL.from_env(CHANNEL_ENV).unwrap_or(CHANNEL))
}

/// Validates the channel's test hook (for a one-line error at start).
pub fn check_env() -> Result<Versions, VersionError> {
    CHANNEL.from_env(CHANNEL_ENV)
}

fn binding(port: u16) -> Result<Binding, WireError> {
    Binding::new(BINDING_NAME, port)
}

/// [`PeerHandler`] for a daemon whose control requests go through a queue of
/// [`Call`]s (vmhad's: the control socket uses the same one).
#[derive(Debug, Clone)]
pub struct CallHandler {
    calls: mpsc::Sender<Call>,
    /// The daemon (event logs with the user, report) and its runtime; without
    /// it `command_as` is `command` and there is no report.
    daemon: Option<(crate::daemon::DaemonHandle, tokio::runtime::Handle)>,
}

impl CallHandler {
    pub fn new(calls: mpsc::Sender<Call>) -> CallHandler {
        CallHandler {
            calls,
            daemon: None,
        }
    }

    /// With the daemon behind `calls`: `command_as` logs who asked, `report`
    /// collects this node's part.
    pub fn with_daemon(
        mut self,
        daemon: crate::daemon::DaemonHandle,
        runtime: tokio::runtime::Handle,
    ) -> CallHandler {
        self.daemon = Some((daemon, runtime));
        self
    }
}

impl PeerHandler for CallHandler {
    fn status(&self) -> Result<Status, String> {
        let response = self.command(Request::Status);
        match response.status {
            Some(status) if response.ok => Ok(status),
            _ => Err(response
                .error
                .unwrap_or_else(|| "no status in the answer".into())),
        }
    }

    fn command(&self, request: Request) -> Response {
        let (reply, answer) = oneshot::channel();
        let caller = Some(crate::control::Caller::Peer);
        if self
            .calls
            .blocking_send(Call {
                request,
                reply,
                caller,
            })
            .is_err()
        {
            return Response::error("vmhad is shutting down");
        }
        answer
            .blocking_recv()
            .unwrap_or_else(|_| Response::error("vmhad is shutting down"))
    }

    /// Checks `text` as this node's configuration, writes it over the file
    /// vmhad was started with and reloads (`Request::ConfigApply`).
    fn config_push(&self, text: String) -> Response {
        self.command(Request::ConfigApply { text })
    }

    fn command_as(&self, request: Request, user: String) -> Response {
        match &self.daemon {
            // A session thread is not a runtime thread: blocking on it is fine.
            Some((daemon, runtime)) => runtime.block_on(daemon.request_as(request, &user)),
            None => self.command(request),
        }
    }

    fn libvirt_socket(&self, module: &str) -> Result<std::path::PathBuf, String> {
        let Some((daemon, _)) = &self.daemon else {
            return Err("this vmhad does not forward libvirt".into());
        };
        let config = daemon.config();
        let Some(m) = config.modules.iter().find(|m| m.name == module) else {
            return Err(format!("no module `{module}` on this node"));
        };
        crate::migrate::libvirt_socket(&m.libvirt_uri).map_err(|e| e.to_string())
    }

    fn report(&self) -> Result<Vec<crate::report::ReportFile>, String> {
        let Some((daemon, _)) = &self.daemon else {
            return Err("this vmhad cannot make a report".into());
        };
        let config = daemon.config();
        let node = config.node(daemon.node()).name.clone();
        let status = daemon.status();
        let mut budget = crate::report::PEER_BUDGET;
        loop {
            let files = crate::report::collect(&crate::report::Source {
                config: &config,
                config_file: daemon.config_file().as_deref(),
                node: &node,
                status: Some(&status),
                budget,
            });
            let size = serde_json::to_vec(&Message::ReportPart {
                files: files.clone(),
            })
            .map(|j| j.len())
            .unwrap_or(usize::MAX);
            if size <= MAX_MESSAGE as usize || budget < 4096 {
                return Ok(files);
            }
            budget /= 2;
        }
    }
}

fn send(
    writer: &mut FrameWriter<BufWriter<TcpStream>>,
    message: &Message,
) -> Result<(), WireError> {
    let json = serde_json::to_vec(message)
        .map_err(|e| WireError::Malformed(format!("cannot encode: {e}")))?;
    if json.len() > MAX_MESSAGE as usize {
        return Err(WireError::TooLarge(json.len() as u64));
    }
    writer.send_raw(&[], &json)?;
    writer.flush()
}

/// Reads one frame; `Ok(Err(text))` when the frame is authentic but its content
/// is not a message this side knows (the stream stays usable).
fn recv<R: std::io::Read>(
    reader: &mut FrameReader<R>,
) -> Result<Result<Message, String>, WireError> {
    let (_, json) = reader.recv_raw(0, MAX_MESSAGE)?;
    Ok(decode(&json))
}

/// Decodes one message's JSON (the channel's decoder; fuzzed below).
pub fn decode(json: &[u8]) -> Result<Message, String> {
    serde_json::from_slice(json).map_err(|e| format!("undecodable message: {e}"))
}

/// A running channel listener (every local address). Dropping it does not stop
/// it: call [`Server::stop`].
#[derive(Debug)]
pub struct Server {
    stop: Arc<AtomicBool>,
    addrs: Vec<SocketAddr>,
    /// The listener threads (each holds its socket until it ends).
    threads: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Server {
    /// Binds `port` on every address and serves `handler` until stopped.
    pub fn spawn(
        addresses: &[std::net::IpAddr],
        port: u16,
        key: &ClusterKey,
        handler: Arc<dyn PeerHandler>,
    ) -> Result<Server, ChannelError> {
        let stop = Arc::new(AtomicBool::new(false));
        let sessions = Arc::new(AtomicUsize::new(0));
        let mut addrs = Vec::new();
        let mut listeners = Vec::new();
        for ip in addresses {
            let addr = SocketAddr::new(*ip, port);
            let listener =
                TcpListener::bind(addr).map_err(|source| ChannelError::Bind { addr, source })?;
            addrs.push(listener.local_addr().unwrap_or(addr));
            listeners.push(listener);
        }
        let door = Door {
            name: "channel",
            key: key.clone(),
            binding: binding(port).map_err(|source| ChannelError::Wire {
                addr: SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), port),
                source,
            })?,
            versions: advertised(),
            limits: preauth::Limits::default(),
        };
        let mut threads = Vec::new();
        for listener in listeners {
            let (door, thread_stop, handler, sessions) = (
                door.clone(),
                Arc::clone(&stop),
                Arc::clone(&handler),
                Arc::clone(&sessions),
            );
            let spawned = std::thread::Builder::new()
                .name("channel".into())
                .spawn(move || {
                    let served = preauth::serve_door(
                        &listener,
                        &door,
                        &thread_stop,
                        |stream, peer, keys| start_session(stream, peer, keys, &handler, &sessions),
                    );
                    if let Err(e) = served {
                        tracing::error!("daemon channel listener failed: {e}");
                    }
                });
            match spawned {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    return Err(ChannelError::Bind {
                        addr: SocketAddr::new(addresses[0], port),
                        source: e,
                    });
                }
            }
        }
        tracing::info!(?addrs, versions = %advertised(), "daemon channel listening");
        Ok(Server {
            stop,
            addrs,
            threads: std::sync::Mutex::new(threads),
        })
    }

    /// The bound addresses.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Stops accepting and waits (at most the listener's poll interval) until
    /// the listening sockets are closed, so that a new vmhad may bind them at
    /// once. Sessions in progress end when their peer goes or idles. Blocks.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for thread in threads {
            let _ = thread.join();
        }
    }
}

/// Frees a session slot however the session ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn start_session(
    stream: TcpStream,
    peer: SocketAddr,
    keys: wire::SessionKeys,
    handler: &Arc<dyn PeerHandler>,
    sessions: &Arc<AtomicUsize>,
) {
    if sessions.fetch_add(1, Ordering::SeqCst) >= MAX_SESSIONS {
        sessions.fetch_sub(1, Ordering::SeqCst);
        tracing::warn!(%peer, "daemon channel: {MAX_SESSIONS} sessions open, closed a new one");
        return;
    }
    let slot = Slot(Arc::clone(sessions));
    let handler = Arc::clone(handler);
    let spawned = std::thread::Builder::new()
        .name(format!("channel-{peer}"))
        .spawn(move || {
            let _slot = slot;
            tracing::info!(%peer, version = keys.version, "daemon channel session opened (version {})", keys.version);
            match serve_session(stream, &keys, handler.as_ref()) {
                Ok(()) => tracing::info!(%peer, "daemon channel session closed"),
                Err(e) => tracing::warn!(%peer, "daemon channel session dropped: {e}"),
            }
        });
    if let Err(e) = spawned {
        tracing::error!(%peer, "cannot start a daemon channel session: {e}");
    }
}

fn serve_session(
    stream: TcpStream,
    keys: &wire::SessionKeys,
    handler: &dyn PeerHandler,
) -> Result<(), WireError> {
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    let _ = stream.set_nodelay(true);
    let mut writer = FrameWriter::new(BufWriter::new(stream.try_clone()?), keys.send);
    let mut reader = FrameReader::new(BufReader::new(stream), keys.recv);
    loop {
        let request = match recv(&mut reader) {
            Ok(r) => r,
            Err(WireError::Closed) => return Ok(()),
            Err(e) => return Err(e),
        };
        let answer = match request {
            Err(message) => Message::Error { message },
            Ok(Message::Status) => match handler.status() {
                Ok(status) => Message::StatusView {
                    status: Box::new(status),
                },
                Err(message) => Message::Error { message },
            },
            Ok(Message::Command { request }) => Message::Reply {
                response: Box::new(handler.command(request)),
            },
            Ok(Message::ConfigPush { text }) if keys.version >= CONFIG_PUSH_SINCE => {
                Message::Reply {
                    response: Box::new(handler.config_push(text)),
                }
            }
            Ok(Message::CommandAs { request, user }) if keys.version >= CONSOLE_SINCE => {
                Message::Reply {
                    response: Box::new(handler.command_as(request, user)),
                }
            }
            Ok(Message::Report) if keys.version >= CONSOLE_SINCE => match handler.report() {
                Ok(files) => Message::ReportPart { files },
                Err(message) => Message::Error { message },
            },
            Ok(Message::LibvirtStream { module }) if keys.version >= LIBVIRT_STREAM_SINCE => {
                let socket = match handler.libvirt_socket(&module) {
                    Ok(socket) => socket,
                    Err(message) => {
                        send(&mut writer, &Message::Error { message })?;
                        continue;
                    }
                };
                let unix = match UnixStream::connect(&socket) {
                    Ok(unix) => unix,
                    Err(e) => {
                        let message =
                            format!("cannot connect to libvirt at {}: {e}", socket.display());
                        send(&mut writer, &Message::Error { message })?;
                        continue;
                    }
                };
                tracing::info!(%module, socket = %socket.display(), "daemon channel session becomes a libvirt stream");
                send(&mut writer, &Message::StreamReady)?;
                // libvirt's keepalive keeps an open stream busy; no idle limit.
                reader.get_ref().get_ref().set_read_timeout(None)?;
                return pump(reader, writer, unix);
            }
            Ok(other) => Message::Error {
                message: format!(
                    "`{}` is not a request of daemon-channel version {}",
                    other.kind(),
                    keys.version
                ),
            },
        };
        send(&mut writer, &answer)?;
    }
}

/// Copies a libvirt connection both ways over an authenticated session until
/// either side closes: frames from the channel to `unix` on a thread of its
/// own, `unix` to frames here. An empty frame says "closed" (half-close is not
/// needed by libvirt's RPC: either end closing ends the connection).
fn pump(
    mut reader: FrameReader<BufReader<TcpStream>>,
    mut writer: FrameWriter<BufWriter<TcpStream>>,
    unix: UnixStream,
) -> Result<(), WireError> {
    let tcp = reader.get_ref().get_ref().try_clone()?;
    let mut unix_in = unix.try_clone()?;
    let unix_out = unix;
    let inbound = std::thread::Builder::new()
        .name("channel-stream".into())
        .spawn(move || -> Result<(), WireError> {
            let mut out = &unix_out;
            let result = loop {
                match reader.recv_raw(0, STREAM_CHUNK) {
                    Ok((_, data)) if data.is_empty() => break Ok(()),
                    Ok((_, data)) => {
                        if let Err(e) = out.write_all(&data) {
                            break Err(e.into());
                        }
                    }
                    Err(WireError::Closed) => break Ok(()),
                    Err(e) => break Err(e),
                }
            };
            // The channel side ended: so does the libvirt side (wakes the reader below).
            let _ = unix_out.shutdown(Shutdown::Both);
            result
        })?;
    let mut buf = vec![0u8; STREAM_CHUNK as usize];
    let outbound = loop {
        match unix_in.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                if let Err(e) = writer
                    .send_raw(&[], &buf[..n])
                    .and_then(|()| writer.flush())
                {
                    break Err(e);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => break Err(e.into()),
        }
    };
    // Tell the other end, then close: its reader and ours both wake.
    let _ = writer.send_raw(&[], &[]).and_then(|()| writer.flush());
    let _ = tcp.shutdown(Shutdown::Both);
    let _ = unix_in.shutdown(Shutdown::Both);
    let inbound = inbound
        .join()
        .unwrap_or_else(|_| Err(WireError::Malformed("stream thread panicked".into())));
    outbound.and(inbound)
}

/// A client session (the peer's vmhad, or `vmctl --node NAME`).
#[derive(Debug)]
pub struct Client {
    addr: SocketAddr,
    version: u16,
    reader: FrameReader<BufReader<TcpStream>>,
    writer: FrameWriter<BufWriter<TcpStream>>,
}

impl Client {
    /// Connects and authenticates, offering [`advertised`] versions.
    pub fn connect(addr: SocketAddr, key: &ClusterKey) -> Result<Client, ChannelError> {
        Client::connect_versions(addr, key, advertised())
    }

    /// Connects and authenticates offering `versions`.
    pub fn connect_versions(
        addr: SocketAddr,
        key: &ClusterKey,
        versions: Versions,
    ) -> Result<Client, ChannelError> {
        let wire_err = |source| ChannelError::Wire { addr, source };
        let mut stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
            .map_err(|source| ChannelError::Connect { addr, source })?;
        let _ = stream.set_nodelay(true);
        stream
            .set_read_timeout(Some(CONNECT_TIMEOUT))
            .map_err(|e| wire_err(e.into()))?;
        let keys = wire::client_handshake_versions(
            &mut stream,
            key,
            &binding(addr.port()).map_err(wire_err)?,
            versions,
        )
        .map_err(wire_err)?;
        // Commands may take long (a stop waits for the VM): no read timeout now.
        stream
            .set_read_timeout(None)
            .map_err(|e| wire_err(e.into()))?;
        let read_half = stream.try_clone().map_err(|e| wire_err(e.into()))?;
        Ok(Client {
            addr,
            version: keys.version,
            reader: FrameReader::new(BufReader::new(read_half), keys.recv),
            writer: FrameWriter::new(BufWriter::new(stream), keys.send),
        })
    }

    /// The negotiated channel version.
    pub fn version(&self) -> u16 {
        self.version
    }

    fn ask(&mut self, message: &Message) -> Result<Message, ChannelError> {
        let addr = self.addr;
        send(&mut self.writer, message).map_err(|source| ChannelError::Wire { addr, source })?;
        match recv(&mut self.reader).map_err(|source| ChannelError::Wire { addr, source })? {
            Ok(Message::Error { message }) => Err(ChannelError::Peer(message)),
            Ok(answer) => Ok(answer),
            Err(text) => Err(ChannelError::Unexpected(text)),
        }
    }

    /// The peer's full status view.
    pub fn status(&mut self) -> Result<Status, ChannelError> {
        match self.ask(&Message::Status)? {
            Message::StatusView { status } => Ok(*status),
            other => Err(ChannelError::Unexpected(other.kind().into())),
        }
    }

    /// Runs `request` on the peer and returns its answer.
    pub fn command(&mut self, request: Request) -> Result<Response, ChannelError> {
        match self.ask(&Message::Command { request })? {
            Message::Reply { response } => Ok(*response),
            other => Err(ChannelError::Unexpected(other.kind().into())),
        }
    }

    /// Runs `request` on the peer with `user` in its event log (channel
    /// version 3; an older peer runs it as `command`, without the user).
    pub fn command_as(&mut self, request: Request, user: &str) -> Result<Response, ChannelError> {
        if self.version < CONSOLE_SINCE {
            return self.command(request);
        }
        let message = Message::CommandAs {
            request,
            user: user.to_string(),
        };
        match self.ask(&message)? {
            Message::Reply { response } => Ok(*response),
            other => Err(ChannelError::Unexpected(other.kind().into())),
        }
    }

    /// The peer's part of the diagnostic report (channel version 3).
    pub fn report(&mut self) -> Result<Vec<crate::report::ReportFile>, ChannelError> {
        if self.version < CONSOLE_SINCE {
            return Err(ChannelError::Unsupported {
                what: "report",
                version: self.version,
                needs: CONSOLE_SINCE,
            });
        }
        match self.ask(&Message::Report)? {
            Message::ReportPart { files } => Ok(files),
            other => Err(ChannelError::Unexpected(other.kind().into())),
        }
    }

    /// Turns this session into a byte stream to the peer's local libvirt
    /// socket (the one of `module`'s `libvirt_uri` in the peer's
    /// configuration) and copies `local` to and from it until either side
    /// closes (blocks; channel version 4). A peer on an older version:
    /// [`ChannelError::TooOldForLiveSwap`].
    pub fn libvirt_stream(mut self, module: &str, local: UnixStream) -> Result<(), ChannelError> {
        let addr = self.addr;
        self.check_libvirt_stream()?;
        let message = Message::LibvirtStream {
            module: module.to_string(),
        };
        match self.ask(&message)? {
            Message::StreamReady => {}
            other => return Err(ChannelError::Unexpected(other.kind().into())),
        }
        pump(self.reader, self.writer, local).map_err(|source| match source {
            WireError::Io(source) => ChannelError::Stream { addr, source },
            source => ChannelError::Wire { addr, source },
        })
    }

    /// Whether the peer can serve [`Client::libvirt_stream`].
    pub fn check_libvirt_stream(&self) -> Result<(), ChannelError> {
        if self.version < LIBVIRT_STREAM_SINCE {
            return Err(ChannelError::TooOldForLiveSwap {
                version: self.version,
                needs: LIBVIRT_STREAM_SINCE,
            });
        }
        Ok(())
    }

    /// Sends a configuration file for the peer to write and reload.
    pub fn config_push(&mut self, text: String) -> Result<Response, ChannelError> {
        if self.version < CONFIG_PUSH_SINCE {
            return Err(ChannelError::Unsupported {
                what: "config push",
                version: self.version,
                needs: CONFIG_PUSH_SINCE,
            });
        }
        match self.ask(&Message::ConfigPush { text })? {
            Message::Reply { response } => Ok(*response),
            other => Err(ChannelError::Unexpected(other.kind().into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn messages_round_trip_as_json() {
        for m in [
            Message::Status,
            Message::Command {
                request: Request::Stop {
                    module: Some("vm1".into()),
                },
            },
            Message::Reply {
                response: Box::new(Response::error("no")),
            },
            Message::ConfigPush {
                text: "[cluster]\nname = \"x\"\n".into(),
            },
            Message::Error {
                message: "x".into(),
            },
            Message::CommandAs {
                request: Request::Swap {
                    module: None,
                    live: false,
                },
                user: "web:admin from 10.0.0.5:1 on node1's console".into(),
            },
            Message::Report,
            Message::LibvirtStream {
                module: "vm1".into(),
            },
            Message::StreamReady,
            Message::ReportPart {
                files: vec![crate::report::ReportFile {
                    path: "status.json".into(),
                    text: "{}".into(),
                }],
            },
        ] {
            let json = serde_json::to_vec(&m).unwrap_or_default();
            assert_eq!(decode(&json), Ok(m));
        }
        // A kind from a newer peer is an error this side can answer.
        let e = decode(br#"{"type":"live_swap","module":"vm1"}"#);
        assert!(e.is_err_and(|e| e.contains("live_swap")));
    }

    fn frames(messages: &[Vec<u8>]) -> Vec<u8> {
        let mut w = FrameWriter::new(Vec::new(), [3; 32]);
        for m in messages {
            assert!(w.send_raw(&[], m).is_ok());
        }
        w.get_ref().clone()
    }

    #[test]
    fn an_oversized_message_is_refused_before_it_is_read() {
        let big = vec![b' '; MAX_MESSAGE as usize + 1];
        let mut r = FrameReader::new(std::io::Cursor::new(frames(&[big])), [3; 32]);
        assert!(matches!(recv(&mut r), Err(WireError::TooLarge(_))));
        // A header section is not part of a channel frame.
        let mut w = FrameWriter::new(Vec::new(), [3; 32]);
        assert!(w.send_raw(b"x", b"{}").is_ok());
        let mut r = FrameReader::new(std::io::Cursor::new(w.get_ref().clone()), [3; 32]);
        assert!(matches!(recv(&mut r), Err(WireError::TooLarge(_))));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Arbitrary bytes never panic the channel's frame reader and never
        /// yield a message without the key.
        #[test]
        fn random_bytes_are_rejected(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let mut r = FrameReader::new(std::io::Cursor::new(bytes), [3; 32]);
            prop_assert!(recv(&mut r).is_err());
        }

        /// Arbitrary content under a valid MAC never panics the decoder: it is
        /// a message or an answerable error.
        #[test]
        fn authenticated_random_content_never_panics(
            json in proptest::collection::vec(any::<u8>(), 0..2048),
            tagged in any::<bool>(),
        ) {
            let mut content = if tagged { br#"{"type":"command","request":"#.to_vec() } else { Vec::new() };
            content.extend_from_slice(&json);
            let mut r = FrameReader::new(std::io::Cursor::new(frames(&[content])), [3; 32]);
            prop_assert!(recv(&mut r).is_ok());
        }

        /// JSON-shaped garbage reaches the field decoders without panicking.
        #[test]
        fn json_shaped_garbage_never_panics(text in "\\{\"type\":\"(status|command|reply|config_push|status_view|error|command_as|report|report_part|libvirt_stream|stream_ready)\"\\PC{0,200}") {
            let _ = decode(text.as_bytes());
        }
    }
}
