//! [`ChannelPeer`]: the console's view of the peer through the daemon
//! channel (issue 13 item 2).
//!
//! Why it looks like this:
//! - One background thread keeps one channel session to the peer's vmhad and
//!   asks for its status every [`POLL`]; the console reads the last answer
//!   without waiting, so a slow or dead peer never slows the page.
//! - A failed session is dropped and reconnected with bounded back-off
//!   ([`crate::backoff::Backoff`], 0.5 s up to [`MAX_BACKOFF`]); the last
//!   status answered stays, with its age, so the page shows the peer's last
//!   known state greyed.
//! - Commands, logs and the report use a session of their own (on a
//!   blocking thread): a `stop` that waits for a VM does not hold up the
//!   status poll.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use vmha_fs::key::ClusterKey;

use super::{BoxFuture, PeerSource};
use crate::channel::Client;
use crate::control::{Request, Response};
use crate::daemon::DaemonHandle;
use crate::report::ReportFile;
use crate::status::Status;

/// How often the peer's status is asked for.
pub const POLL: Duration = Duration::from_secs(1);
/// Longest wait between two connection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// What the page knows of the peer's link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerLink {
    /// The peer's node name.
    pub node: String,
    /// Its last status answer is fresh (the session works).
    pub reachable: bool,
    /// Milliseconds since its last status answer (`None`: never answered).
    pub age_ms: Option<u64>,
    /// Why it is not reachable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Default)]
struct Known {
    status: Option<Status>,
    at: Option<Instant>,
    reachable: bool,
    error: Option<String>,
}

#[derive(Debug)]
struct Inner {
    daemon: DaemonHandle,
    key: ClusterKey,
    peer: String,
    known: Mutex<Known>,
    stop: AtomicBool,
}

/// The peer's own view over the daemon channel (see the module docs).
/// Dropping it stops the poll thread (within one poll).
#[derive(Debug)]
pub struct ChannelPeer {
    inner: Arc<Inner>,
}

impl Drop for ChannelPeer {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Relaxed);
    }
}

impl Inner {
    /// The peer's channel addresses, from the configuration in effect.
    fn addresses(&self) -> Vec<SocketAddr> {
        let config = self.daemon.config();
        config
            .nodes
            .iter()
            .filter(|n| n.name == self.peer)
            .flat_map(|n| n.addresses.iter())
            .map(|ip| SocketAddr::new(*ip, config.cluster.channel_port))
            .collect()
    }

    fn connect(&self) -> Result<Client, String> {
        let mut last = format!("{} has no address", self.peer);
        for addr in self.addresses() {
            match Client::connect(addr, &self.key) {
                Ok(c) => return Ok(c),
                Err(e) => last = e.to_string(),
            }
        }
        Err(last)
    }

    fn poll_loop(self: Arc<Inner>) {
        let mut backoff = crate::backoff::Backoff::new(Duration::from_millis(500), MAX_BACKOFF);
        let mut client: Option<Client> = None;
        while !self.stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if client.is_none() && backoff.ready(now) {
                match self.connect() {
                    Ok(c) => client = Some(c),
                    Err(e) => {
                        if backoff.fail(now) {
                            tracing::warn!(peer = %self.peer, "console: the peer's vmhad cannot be reached: {e}");
                        }
                        self.failed(e);
                    }
                }
            }
            if let Some(c) = &mut client {
                match c.status() {
                    Ok(status) => {
                        if backoff.succeed().is_some() {
                            tracing::info!(peer = %self.peer, "console: the peer's vmhad answers again");
                        }
                        let mut k = self.known.lock().unwrap_or_else(|p| p.into_inner());
                        *k = Known {
                            status: Some(status),
                            at: Some(Instant::now()),
                            reachable: true,
                            error: None,
                        };
                    }
                    Err(e) => {
                        client = None;
                        backoff.fail(Instant::now());
                        self.failed(e.to_string());
                    }
                }
            }
            std::thread::sleep(POLL);
        }
    }

    fn failed(&self, error: String) {
        let mut k = self.known.lock().unwrap_or_else(|p| p.into_inner());
        k.reachable = false;
        k.error = Some(error);
    }
}

impl ChannelPeer {
    /// Starts polling the peer of the node `daemon` runs (the other
    /// `[[node]]`); `None` when the configuration has no other node or the
    /// thread cannot start.
    pub fn start(daemon: DaemonHandle, key: ClusterKey) -> Option<ChannelPeer> {
        let config = daemon.config();
        let local = config.node(daemon.node()).name.clone();
        let peer = config.nodes.iter().find(|n| n.name != local)?.name.clone();
        let inner = Arc::new(Inner {
            daemon,
            key,
            peer,
            known: Mutex::new(Known::default()),
            stop: AtomicBool::new(false),
        });
        let thread = Arc::clone(&inner);
        std::thread::Builder::new()
            .name("console-peer".into())
            .spawn(move || thread.poll_loop())
            .map_err(|e| tracing::error!("console: cannot start the peer poll: {e}"))
            .ok()?;
        Some(ChannelPeer { inner })
    }

    /// Runs `f` with a fresh session on a blocking thread.
    fn with_session<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T, crate::channel::ChannelError> + Send + 'static,
    ) -> BoxFuture<'_, Result<T, String>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let mut client = inner.connect()?;
                f(&mut client).map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| e.to_string())?
        })
    }
}

impl PeerSource for ChannelPeer {
    fn peer_status(&self) -> BoxFuture<'_, Option<Status>> {
        let k = self.inner.known.lock().unwrap_or_else(|p| p.into_inner());
        let status = k.status.clone();
        Box::pin(async move { status })
    }

    fn peer_link(&self) -> Option<PeerLink> {
        let k = self.inner.known.lock().unwrap_or_else(|p| p.into_inner());
        Some(PeerLink {
            node: self.inner.peer.clone(),
            reachable: k.reachable,
            age_ms: k
                .at
                .map(|t| u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)),
            error: k.error.clone(),
        })
    }

    fn peer_name(&self) -> Option<String> {
        Some(self.inner.peer.clone())
    }

    fn command(&self, request: Request, user: String) -> BoxFuture<'_, Result<Response, String>> {
        self.with_session(move |c| c.command_as(request, &user))
    }

    fn log(&self, module: String, last: usize) -> BoxFuture<'_, Result<Vec<String>, String>> {
        self.with_session(move |c| {
            let r = c.command(Request::LogTail {
                module: Some(module),
                last: Some(last),
                after: None,
            })?;
            if r.ok {
                Ok(r.lines)
            } else {
                Err(crate::channel::ChannelError::Peer(
                    r.error.unwrap_or_default(),
                ))
            }
        })
    }

    fn report(&self) -> BoxFuture<'_, Result<Vec<ReportFile>, String>> {
        self.with_session(Client::report)
    }
}
