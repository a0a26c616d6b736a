//! The daemon runtime around the pure state machine: one task per module
//! feeding [`crate::state::step`] and executing its actions through the
//! drivers, one heartbeat sender, one receive task per network, a dispatcher
//! that tracks liveness, and the control socket.
//!
//! Driver contract of `state.rs`, as honoured here:
//! - a step's actions run in order, each blocking driver call in
//!   `spawn_blocking`; the module's announcement (role, readiness, request) is
//!   published for the heartbeats only after all of them finished. The
//!   generation history is published with it, and also right before
//!   `MarkPeerOutdated` waits (the peer must see the new generation to learn it
//!   is outdated);
//! - `PeerSeen` carries `compare(local history, peer history)` and whether the
//!   module's configuration hashes match; heartbeats arriving on several
//!   networks count once per send round;
//! - `PeerLost` is sent once when all networks have been silent for
//!   `failover_timeout_ms`;
//! - `StartWaitElapsed` comes `start_wait_ms` after entering WAIT and is
//!   repeated every `start_wait_ms` while the module stays WAIT;
//! - `MarkPeerOutdated` completes once the peer's heartbeat shows our newer
//!   generation, or the peer is lost, or after `failover_timeout_ms` (logged).
//!
//! Choices where the design is silent:
//! - A failure to persist metadata, to mount, or to start a resync aborts the
//!   rest of the step and feeds `FsFailed` (the local disk or vmha-fs failed:
//!   the module fails over); VM start failures feed `VmStartFailed`; stop and
//!   unmount failures are logged and the step goes on.
//! - Modules are started (`Start`) when the daemon starts.
//! - A graceful shutdown (SIGTERM) stops every module (a PRIM hands over),
//!   announces it for a few heartbeat intervals, then exits; [`Daemon::kill`]
//!   simulates a crash (tasks aborted, nothing stopped).
//! - A module the peer does not announce at all is treated as if the peer were
//!   not seen for it (its status shows `module_config_match: false`).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use vmha_fs::key::ClusterKey;

use crate::config::{Config, Digest, Module, NodeIndex, Witness};
use crate::control::{self, Call, ControlError, Request, Response};
use crate::driver::{FsDriver, FsHealth, ResyncState, VmDriver};
use crate::eventlog::EventLog;
use crate::generation::{compare, GenerationError, History, Metadata};
use crate::heartbeat::{
    Endpoint, EndpointSpec, HeartbeatError, Incoming, Liveness, ModuleBeat, Payload, Received,
};
use crate::state::{
    step, Action, Announce, Colour, Event, ModuleState, Peer, Policy, Readiness, Role,
};
use crate::status::{ModuleStatus, NodeStatus, ResyncStatus, Status};
use crate::witness;

/// Errors starting the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Heartbeat(#[from] HeartbeatError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("module `{module}`: {source}")]
    Generation {
        module: String,
        source: GenerationError,
    },
    #[error("background task failed: {0}")]
    Task(String),
}

/// Everything a daemon needs.
#[derive(Debug)]
pub struct DaemonSpec {
    pub config: Config,
    pub node: NodeIndex,
    pub key: ClusterKey,
    pub vm: Arc<dyn VmDriver>,
    pub fs: Arc<dyn FsDriver>,
    /// Tolerated clock difference between the nodes for heartbeats.
    pub max_clock_skew: Duration,
}

/// What a module task publishes (for heartbeats and status).
#[derive(Debug, Clone)]
struct ModuleView {
    announce: Announce,
    history: History,
    changed_bytes: u64,
    resync: Option<ResyncStatus>,
}

/// The peer as the dispatcher last saw it, for one module.
#[derive(Debug, Clone)]
enum PeerView {
    Unknown,
    Seen {
        beat: Box<ModuleBeat>,
        config_match: bool,
    },
    Lost,
}

#[derive(Debug)]
enum ModuleCommand {
    Event(Event, oneshot::Sender<Vec<String>>),
}

#[derive(Debug)]
struct ModuleHandle {
    module: Module,
    module_hash: Option<Digest>,
    commands: mpsc::Sender<ModuleCommand>,
    view: watch::Receiver<ModuleView>,
    peer: watch::Sender<PeerView>,
    log: Arc<EventLog>,
}

#[derive(Debug)]
struct LinkState {
    liveness: Liveness,
    lost: bool,
    peer_config_hash: Option<Digest>,
    /// (session, round) of the last payload dispatched.
    last_round: Option<(u64, u64)>,
    /// The latest beat per module, kept after the peer is lost.
    peer_modules: HashMap<String, ModuleBeat>,
    rejected: u64,
}

#[derive(Debug)]
struct Shared {
    config: Config,
    node: NodeIndex,
    modules: Vec<ModuleHandle>,
    link: Mutex<LinkState>,
}

impl Shared {
    fn link(&self) -> std::sync::MutexGuard<'_, LinkState> {
        self.link.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running `vmhad`.
#[derive(Debug)]
pub struct Daemon {
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    calls: mpsc::Sender<Call>,
    socket: PathBuf,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Daemon {
    /// Loads the modules' metadata, binds the heartbeat sockets and the control
    /// socket, and starts every module.
    pub async fn start(spec: DaemonSpec) -> Result<Daemon, DaemonError> {
        let config = spec.config;
        let node = spec.node;
        let cluster = &config.cluster;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let mut handles = Vec::new();
        let mut runners = Vec::new();
        let started = Instant::now();

        for module in &config.modules {
            let state_dir = cluster.state_dir.clone();
            let name = module.name.clone();
            let meta = tokio::task::spawn_blocking(move || Metadata::load(&state_dir, &name))
                .await
                .map_err(|e| DaemonError::Task(e.to_string()))?
                .map_err(|source| DaemonError::Generation {
                    module: module.name.clone(),
                    source,
                })?;
            let policy = Policy::new(&config, module, node);
            let state = ModuleState::new(
                policy,
                meta.history.current().is_some(),
                meta.peer_may_be_newer,
            );
            let log = Arc::new(EventLog::new(&cluster.state_dir, &module.name));
            let (view_tx, view_rx) = watch::channel(ModuleView {
                announce: state.announce(),
                history: meta.history.clone(),
                changed_bytes: 0,
                resync: None,
            });
            let (peer_tx, peer_rx) = watch::channel(PeerView::Unknown);
            let (cmd_tx, cmd_rx) = mpsc::channel(16);
            handles.push(ModuleHandle {
                module: module.clone(),
                module_hash: config.module_hash(&module.name),
                commands: cmd_tx,
                view: view_rx,
                peer: peer_tx,
                log: Arc::clone(&log),
            });
            runners.push((
                Runner {
                    module: module.clone(),
                    state,
                    meta,
                    state_dir: cluster.state_dir.clone(),
                    vm: Arc::clone(&spec.vm),
                    fs: Arc::clone(&spec.fs),
                    log,
                    view: view_tx,
                    peer_rx,
                    last_beat: None,
                    peer_lost_sent: false,
                    started,
                    start_wait: None,
                    start_wait_ms: cluster.start_wait_ms,
                    failover_timeout: Duration::from_millis(cluster.failover_timeout_ms),
                    witnesses: cluster.witness.clone(),
                    changed_bytes: 0,
                    resync_rate: ResyncRate::default(),
                    resync_unsupported_logged: false,
                    attached: None,
                    attach_unsupported: false,
                    writer_sync: None,
                    xml_refresh_failed: false,
                },
                cmd_rx,
            ));
        }

        let local = config.node(node);
        let peer = config.node(node.peer());
        let endpoint = Endpoint::bind(
            EndpointSpec {
                local: local.addresses.clone(),
                port: cluster.heartbeat_port,
                peer: peer.addresses.clone(),
                peer_port: cluster.heartbeat_port,
                peer_name: peer.name.clone(),
            },
            &spec.key,
        )
        .await?;
        endpoint.set_max_age(spec.max_clock_skew);
        let server = control::Server::bind(&cluster.control_socket)?;
        let socket = server.path().to_path_buf();

        let shared = Arc::new(Shared {
            link: Mutex::new(LinkState {
                liveness: Liveness::new(endpoint.networks()),
                lost: false,
                peer_config_hash: None,
                last_round: None,
                peer_modules: HashMap::new(),
                rejected: 0,
            }),
            config: config.clone(),
            node,
            modules: handles,
        });

        for (runner, commands) in runners {
            tasks.push(tokio::spawn(runner.run(
                commands,
                shutdown_rx.clone(),
                Duration::from_millis(cluster.heartbeat_interval_ms),
            )));
        }
        let (in_tx, in_rx) = mpsc::channel(256);
        tasks.extend(endpoint.spawn_receivers(in_tx));
        tasks.push(tokio::spawn(dispatch(
            Arc::clone(&shared),
            in_rx,
            shutdown_rx.clone(),
        )));
        tasks.push(tokio::spawn(send_heartbeats(
            Arc::clone(&shared),
            endpoint,
            shutdown_rx.clone(),
        )));
        let (calls_tx, calls_rx) = mpsc::channel(32);
        tasks.push(server.spawn(calls_tx.clone(), shutdown_rx.clone()));
        tasks.push(tokio::spawn(serve_calls(Arc::clone(&shared), calls_rx)));

        for handle in &shared.modules {
            let (reply, _) = oneshot::channel();
            let _ = handle
                .commands
                .send(ModuleCommand::Event(Event::Start, reply))
                .await;
        }
        tracing::info!(node = %local.name, modules = shared.modules.len(), "vmhad started");
        Ok(Daemon {
            shared,
            shutdown,
            tasks,
            calls: calls_tx,
            socket,
        })
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// Answers a request in-process, as the control socket would.
    pub async fn request(&self, request: Request) -> Response {
        let (reply, answer) = oneshot::channel();
        if self.calls.send(Call { request, reply }).await.is_err() {
            return Response::error("vmhad is shutting down");
        }
        answer
            .await
            .unwrap_or_else(|_| Response::error("vmhad is shutting down"))
    }

    /// The `status` answer.
    pub fn status(&self) -> Status {
        build_status(&self.shared)
    }

    /// Graceful shutdown: stops every module (a PRIM hands over), lets the
    /// peer hear it, then ends every task.
    pub async fn shutdown(self) {
        for handle in &self.shared.modules {
            let (reply, answer) = oneshot::channel();
            if handle
                .commands
                .send(ModuleCommand::Event(Event::Stop, reply))
                .await
                .is_ok()
            {
                let _ = answer.await;
            }
        }
        let interval = self.shared.config.cluster.heartbeat_interval_ms;
        tokio::time::sleep(Duration::from_millis(interval.saturating_mul(3))).await;
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            task.abort();
            let _ = task.await;
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    /// A crash: every task stops at once; nothing is stopped or unmounted and
    /// the control socket file stays behind.
    pub async fn kill(self) {
        for task in &self.tasks {
            task.abort();
        }
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

// ---- heartbeats ----

async fn send_heartbeats(
    shared: Arc<Shared>,
    endpoint: Endpoint,
    mut shutdown: watch::Receiver<bool>,
) {
    let interval = Duration::from_millis(shared.config.cluster.heartbeat_interval_ms.max(1));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let session: u64 = rand::random();
    let node = shared.config.node(shared.node).name.clone();
    let mut round = 0u64;
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = ticker.tick() => {}
        }
        round += 1;
        let modules = shared
            .modules
            .iter()
            .filter_map(|h| {
                let view = h.view.borrow();
                Some(ModuleBeat {
                    name: h.module.name.clone(),
                    module_hash: h.module_hash?,
                    announce: view.announce,
                    history: view.history.clone(),
                    changed_bytes: view.changed_bytes,
                    resync: view.resync,
                })
            })
            .collect();
        let payload = Payload {
            node: node.clone(),
            session,
            round,
            config_hash: shared.config.hash(),
            modules,
        };
        let errors = endpoint.send(&payload).await;
        // One log line per change of condition, not per interval.
        match (errors.is_empty(), failing) {
            (false, false) => {
                for e in &errors {
                    tracing::warn!(error = %e, "heartbeat send failed");
                }
                failing = true;
            }
            (true, true) => {
                tracing::info!("heartbeats sent on every network again");
                failing = false;
            }
            _ => {}
        }
    }
}

async fn dispatch(
    shared: Arc<Shared>,
    mut incoming: mpsc::Receiver<Incoming>,
    mut shutdown: watch::Receiver<bool>,
) {
    let cluster = &shared.config.cluster;
    let timeout = Duration::from_millis(cluster.failover_timeout_ms);
    let tick = Duration::from_millis((cluster.heartbeat_interval_ms / 2).max(5));
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The peer is judged only on what this daemon could observe: after a
    // stall of its own (SIGSTOP, a frozen VM or host), the heartbeats queued
    // meanwhile are not read yet, so the silence is ours, not the peer's; the
    // peer gets a full `timeout` from the resume to be heard again.
    let mut last_tick = Instant::now();
    let mut observing_since = last_tick;
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            message = incoming.recv() => match message {
                None => return,
                Some(Incoming::Beat(received)) => on_beat(&shared, *received),
                Some(Incoming::Rejected { network, from, reason }) => {
                    shared.link().rejected += 1;
                    tracing::warn!(network, %from, %reason, "heartbeat rejected");
                }
            },
            _ = ticker.tick() => {
                let now = Instant::now();
                if now.saturating_duration_since(last_tick) > timeout / 2 {
                    tracing::warn!(
                        stalled_ms = now.saturating_duration_since(last_tick).as_millis() as u64,
                        "this daemon was stalled; judging the peer from now on"
                    );
                    observing_since = now;
                }
                last_tick = now;
                let lost_now = {
                    let mut link = shared.link();
                    let silent = link.liveness.all_silent_for(now, timeout)
                        && now.saturating_duration_since(observing_since) >= timeout;
                    let newly = silent && !link.lost;
                    if newly {
                        link.lost = true;
                    }
                    newly
                };
                if lost_now {
                    tracing::warn!("peer lost: every network silent for {} ms", timeout.as_millis());
                    for handle in &shared.modules {
                        handle.peer.send_replace(PeerView::Lost);
                    }
                }
            }
        }
    }
}

fn on_beat(shared: &Shared, received: Received) {
    let payload = received.payload;
    let fresh = {
        let mut link = shared.link();
        link.liveness.record(received.network, received.at);
        if link.lost {
            tracing::info!(network = received.network, "peer heard again");
        }
        link.lost = false;
        link.peer_config_hash = Some(payload.config_hash);
        let fresh = match link.last_round {
            Some((session, round)) => session != payload.session || payload.round > round,
            None => true,
        };
        if fresh {
            link.last_round = Some((payload.session, payload.round));
            for beat in &payload.modules {
                link.peer_modules.insert(beat.name.clone(), beat.clone());
            }
        }
        fresh
    };
    if !fresh {
        return;
    }
    for handle in &shared.modules {
        if let Some(beat) = payload
            .modules
            .iter()
            .find(|b| b.name == handle.module.name)
        {
            let config_match = handle.module_hash == Some(beat.module_hash);
            handle.peer.send_replace(PeerView::Seen {
                beat: Box::new(beat.clone()),
                config_match,
            });
        }
    }
}

// ---- control requests ----

async fn serve_calls(shared: Arc<Shared>, mut calls: mpsc::Receiver<Call>) {
    while let Some(call) = calls.recv().await {
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let response = answer(&shared, call.request).await;
            let _ = call.reply.send(response);
        });
    }
}

fn resolve<'a>(shared: &'a Shared, module: Option<&str>) -> Result<&'a ModuleHandle, String> {
    let names = || {
        shared
            .modules
            .iter()
            .map(|h| h.module.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match module {
        Some(name) => shared
            .modules
            .iter()
            .find(|h| h.module.name == name)
            .ok_or_else(|| format!("unknown module `{name}` (modules: {})", names())),
        None => match shared.modules.as_slice() {
            [only] => Ok(only),
            [] => Err("no module is configured".to_string()),
            _ => Err(format!(
                "several modules are configured ({}): name one",
                names()
            )),
        },
    }
}

async fn answer(shared: &Shared, request: Request) -> Response {
    let (event, module) = match request {
        Request::Status => {
            return Response {
                ok: true,
                status: Some(build_status(shared)),
                ..Response::default()
            }
        }
        Request::Log { module } => {
            return match resolve(shared, module.as_deref()) {
                Ok(handle) => Response::lines(true, handle.log.lines()),
                Err(e) => Response::error(e),
            }
        }
        Request::Start { module } => (Event::Start, module),
        Request::Stop { module } => (Event::Stop, module),
        Request::Swap { module } => (Event::Swap, module),
        Request::Prim { module } => (Event::PrimForced, module),
    };
    let handle = match resolve(shared, module.as_deref()) {
        Ok(h) => h,
        Err(e) => return Response::error(e),
    };
    let (reply, lines) = oneshot::channel();
    if handle
        .commands
        .send(ModuleCommand::Event(event, reply))
        .await
        .is_err()
    {
        return Response::error("vmhad is shutting down");
    }
    match lines.await {
        Ok(lines) => match lines.iter().find(|l| l.contains("refused")) {
            Some(refusal) => Response {
                ok: false,
                error: Some(refusal.clone()),
                lines,
                status: None,
            },
            None => Response::lines(true, lines),
        },
        Err(_) => Response::error("vmhad is shutting down"),
    }
}

fn colour_of(role: Role, readiness: Readiness) -> Colour {
    match (role, readiness) {
        (Role::Stop | Role::Wait, _) => Colour::Red,
        (_, Readiness::Ready) => Colour::Green,
        _ => Colour::Orange,
    }
}

fn build_status(shared: &Shared) -> Status {
    let config = &shared.config;
    let local_name = config.node(shared.node).name.clone();
    let peer_node = config.node(shared.node.peer());
    let now = Instant::now();
    let link = shared.link();
    let reachable = link.liveness.latest().is_some() && !link.lost;
    let last_seen = link
        .liveness
        .latest()
        .map(|t| ms(now.saturating_duration_since(t)));
    let heartbeats: std::collections::BTreeMap<String, Option<u64>> = peer_node
        .addresses
        .iter()
        .zip(link.liveness.ages_ms(now))
        .map(|(ip, age): (&IpAddr, Option<u64>)| (ip.to_string(), age))
        .collect();
    let config_match = link.peer_config_hash.map(|h| h == config.hash());
    let modules = shared
        .modules
        .iter()
        .map(|handle| {
            let view = handle.view.borrow().clone();
            let role = view.announce.role;
            let local = NodeStatus {
                reachable: true,
                state: Some(role),
                ready: view.announce.readiness == Readiness::Ready,
                readiness: Some(view.announce.readiness),
                colour: Some(colour_of(role, view.announce.readiness)),
                generation: view.history.current().map(|g| g.to_string()),
                resync: view.resync,
                last_seen_ms: None,
                heartbeats: None,
                last_known_state: None,
                config_match: None,
                module_config_match: None,
            };
            let beat = link.peer_modules.get(&handle.module.name);
            let module_match = beat.map(|b| Some(b.module_hash) == handle.module_hash);
            let peer = match beat {
                Some(beat) if reachable => NodeStatus {
                    reachable: true,
                    state: Some(beat.announce.role),
                    ready: beat.announce.readiness == Readiness::Ready,
                    readiness: Some(beat.announce.readiness),
                    colour: Some(colour_of(beat.announce.role, beat.announce.readiness)),
                    generation: beat.history.current().map(|g| g.to_string()),
                    resync: beat.resync,
                    last_seen_ms: Some(last_seen),
                    heartbeats: Some(heartbeats.clone()),
                    last_known_state: None,
                    config_match: Some(config_match),
                    module_config_match: Some(module_match),
                },
                _ => NodeStatus {
                    reachable,
                    state: None,
                    ready: false,
                    readiness: None,
                    colour: None,
                    generation: beat
                        .and_then(|b| b.history.current())
                        .map(|g| g.to_string()),
                    resync: None,
                    last_seen_ms: Some(last_seen),
                    heartbeats: Some(heartbeats.clone()),
                    last_known_state: Some(beat.map(|b| b.announce.role)),
                    config_match: Some(config_match),
                    module_config_match: Some(module_match),
                },
            };
            let primary = if role.is_writer() {
                Some(local_name.clone())
            } else if peer.state.is_some_and(Role::is_writer) {
                Some(peer_node.name.clone())
            } else {
                None
            };
            ModuleStatus {
                name: handle.module.name.clone(),
                domain: handle.module.domain.clone(),
                primary,
                nodes: [(local_name.clone(), local), (peer_node.name.clone(), peer)]
                    .into_iter()
                    .collect(),
            }
        })
        .collect();
    Status {
        node: local_name,
        config_hash: config.hash().to_string(),
        modules,
    }
}

// ---- module task ----

/// Resync rate from successive progress samples.
#[derive(Debug, Default)]
struct ResyncRate {
    last: Option<(Instant, u64)>,
    rate: u64,
}

impl ResyncRate {
    fn sample(&mut self, done: u64) {
        let now = Instant::now();
        if let Some((at, before)) = self.last {
            let dt = now.saturating_duration_since(at).as_secs_f64();
            if dt > 0.0 && done >= before {
                let instant = (done - before) as f64 / dt;
                // Smoothed: a momentary stall does not zero the ETA.
                self.rate = if self.rate == 0 {
                    instant as u64
                } else {
                    (0.7 * self.rate as f64 + 0.3 * instant) as u64
                };
            }
        }
        self.last = Some((now, done));
    }
}

/// Why the rest of a step's actions are skipped.
#[derive(Debug)]
struct Abort;

#[derive(Debug)]
struct Runner {
    module: Module,
    state: ModuleState,
    meta: Metadata,
    state_dir: PathBuf,
    vm: Arc<dyn VmDriver>,
    fs: Arc<dyn FsDriver>,
    log: Arc<EventLog>,
    view: watch::Sender<ModuleView>,
    peer_rx: watch::Receiver<PeerView>,
    last_beat: Option<ModuleBeat>,
    peer_lost_sent: bool,
    started: Instant,
    start_wait: Option<tokio::time::Instant>,
    start_wait_ms: u64,
    failover_timeout: Duration,
    witnesses: Vec<Witness>,
    changed_bytes: u64,
    resync_rate: ResyncRate,
    resync_unsupported_logged: bool,
    /// Writer: when `attach_peer` was last called for the current peer
    /// episode (reset when the peer is no longer a SECOND behind us).
    attached: Option<Instant>,
    attach_unsupported: bool,
    /// Writer: the copy to the peer, as published in heartbeats.
    writer_sync: Option<ResyncStatus>,
    /// The last `refresh_xml` failed (logged once).
    xml_refresh_failed: bool,
}

/// How long a failed attach waits before the writer tries again.
const ATTACH_RETRY: Duration = Duration::from_secs(3);

/// The writer's copy to its peer as a heartbeat's `resync` field. Done is
/// `done_bytes == total_bytes`; a running copy always shows
/// `done_bytes < total_bytes` so the receiver never mistakes it for done.
fn writer_resync_status(state: ResyncState, rate: u64) -> Option<ResyncStatus> {
    match state {
        ResyncState::Idle => None,
        ResyncState::Done => Some(ResyncStatus {
            done_bytes: 0,
            total_bytes: 0,
            rate_bytes_per_s: 0,
            eta_s: Some(0),
        }),
        ResyncState::Running(p) => {
            let total = p.total_bytes.max(p.done_bytes.saturating_add(1));
            Some(ResyncStatus {
                done_bytes: p.done_bytes,
                total_bytes: total,
                rate_bytes_per_s: rate,
                eta_s: (rate > 0).then(|| total.saturating_sub(p.done_bytes) / rate),
            })
        }
    }
}

/// What a SECOND learns from its writer's heartbeat `resync` field.
fn resync_from_writer(status: &ResyncStatus) -> ResyncState {
    if status.done_bytes >= status.total_bytes {
        ResyncState::Done
    } else {
        ResyncState::Running(crate::state::Progress {
            done_bytes: status.done_bytes,
            total_bytes: status.total_bytes,
        })
    }
}

impl Runner {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<ModuleCommand>,
        mut shutdown: watch::Receiver<bool>,
        check_every: Duration,
    ) {
        let mut checks = tokio::time::interval(check_every.max(Duration::from_millis(10)));
        checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let start_wait = self.start_wait;
            tokio::select! {
                _ = shutdown.changed() => return,
                command = commands.recv() => match command {
                    None => return,
                    Some(ModuleCommand::Event(event, reply)) => {
                        let lines = self.handle(event).await;
                        let _ = reply.send(lines);
                    }
                },
                changed = self.peer_rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    self.on_peer_view().await;
                }
                _ = sleep_until(start_wait), if start_wait.is_some() => {
                    self.start_wait = None;
                    self.handle(Event::StartWaitElapsed).await;
                }
                _ = checks.tick() => self.check().await,
            }
        }
    }

    async fn on_peer_view(&mut self) {
        let view = self.peer_rx.borrow_and_update().clone();
        match view {
            PeerView::Unknown => {}
            PeerView::Seen { beat, config_match } => {
                self.peer_lost_sent = false;
                let relation = compare(&self.meta.history, &beat.history);
                let peer =
                    Peer::from_announce(beat.announce, relation, config_match, beat.changed_bytes);
                self.last_beat = Some(*beat);
                self.handle(Event::PeerSeen {
                    peer,
                    local_changed_bytes: self.changed_bytes,
                })
                .await;
            }
            PeerView::Lost => {
                if !self.peer_lost_sent {
                    self.peer_lost_sent = true;
                    self.handle(Event::PeerLost).await;
                }
            }
        }
    }

    fn now_ms(&self) -> u64 {
        ms(self.started.elapsed())
    }

    /// Runs `first` and the events its actions produce; returns the log lines.
    async fn handle(&mut self, first: Event) -> Vec<String> {
        let mut queue = VecDeque::from([first]);
        let mut lines = Vec::new();
        while let Some(event) = queue.pop_front() {
            tracing::debug!(module = %self.module.name, ?event, "event");
            let before = self.state.role;
            let (next, actions) = step(&self.state, event);
            self.state = next;
            for action in actions {
                if self.execute(action, &mut queue, &mut lines).await.is_err() {
                    break;
                }
            }
            if before == Role::Prim && self.state.role == Role::Alone {
                // The peer is dead: writes go on alone instead of waiting for it.
                self.attached = None;
                self.writer_sync = None;
                match self.blocking(|_, fs, m| fs.go_alone(m)).await {
                    Some(Ok(())) => self.record("vmha-fs writes alone".into(), &mut lines).await,
                    Some(Err(e)) => {
                        self.record(format!("error: go alone: {e}"), &mut lines)
                            .await
                    }
                    None => {}
                }
            }
            if !self.state.role.is_writer() {
                self.attached = None;
                self.writer_sync = None;
            }
            if self.state.role == Role::Wait {
                if self.start_wait.is_none() {
                    self.start_wait = Some(
                        tokio::time::Instant::now() + Duration::from_millis(self.start_wait_ms),
                    );
                }
            } else {
                self.start_wait = None;
            }
            self.publish();
        }
        lines
    }

    fn publish(&mut self) {
        let resync = self.state.resync.map(|p| {
            let rate = self.resync_rate.rate;
            ResyncStatus {
                done_bytes: p.done_bytes,
                total_bytes: p.total_bytes,
                rate_bytes_per_s: rate,
                eta_s: (rate > 0).then(|| p.total_bytes.saturating_sub(p.done_bytes) / rate),
            }
        });
        let resync = if self.state.role.is_writer() {
            self.writer_sync
        } else {
            resync
        };
        self.view.send_replace(ModuleView {
            announce: self.state.announce(),
            history: self.meta.history.clone(),
            changed_bytes: self.changed_bytes,
            resync,
        });
    }

    async fn record(&self, line: String, lines: &mut Vec<String>) {
        tracing::info!(module = %self.module.name, "{line}");
        let log = Arc::clone(&self.log);
        let copy = line.clone();
        match tokio::task::spawn_blocking(move || log.append(&copy)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(module = %self.module.name, error = %e, "event log"),
            Err(e) => tracing::warn!(module = %self.module.name, error = %e, "event log task"),
        }
        lines.push(line);
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn VmDriver, &dyn FsDriver, &Module) -> T + Send + 'static,
    ) -> Option<T> {
        let (vm, fs, module) = (
            Arc::clone(&self.vm),
            Arc::clone(&self.fs),
            self.module.clone(),
        );
        match tokio::task::spawn_blocking(move || f(vm.as_ref(), fs.as_ref(), &module)).await {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::error!(module = %self.module.name, error = %e, "driver call panicked");
                None
            }
        }
    }

    async fn persist(&mut self, change: impl FnOnce(&mut Metadata)) -> Result<(), String> {
        let before = self.meta.clone();
        change(&mut self.meta);
        let meta = self.meta.clone();
        let dir = self.state_dir.clone();
        let name = self.module.name.clone();
        let result = tokio::task::spawn_blocking(move || meta.save(&dir, &name)).await;
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.meta = before;
                Err(e.to_string())
            }
            Err(e) => {
                self.meta = before;
                Err(e.to_string())
            }
        }
    }

    async fn fail_step(
        &mut self,
        what: &str,
        error: String,
        queue: &mut VecDeque<Event>,
        lines: &mut Vec<String>,
    ) -> Result<(), Abort> {
        self.record(format!("error: {what}: {error}"), lines).await;
        queue.push_front(Event::FsFailed);
        Err(Abort)
    }

    async fn execute(
        &mut self,
        action: Action,
        queue: &mut VecDeque<Event>,
        lines: &mut Vec<String>,
    ) -> Result<(), Abort> {
        tracing::debug!(module = %self.module.name, ?action, "action");
        match action {
            Action::Log(line) => self.record(line, lines).await,
            Action::MountWriter | Action::MountReceiver => {
                let writer = action == Action::MountWriter;
                let what = if writer {
                    "mount as writer"
                } else {
                    "start the receiver"
                };
                // The writer claims its generation; the receiver accepts only
                // the writer's (fencing).
                let generation = if writer {
                    self.meta.history.current().map(|g| g.to_string())
                } else {
                    self.peer_generation()
                };
                // A ready SECOND with our generation (a swap) has all our data: the
                // writer replicates to it from the first write instead of starting
                // alone, which would leave it unattached while it counts as ready.
                let connected = writer && self.peer_is_ready_second_in_sync();
                let result = self
                    .blocking(move |_, fs, m| {
                        if connected {
                            fs.mount_writer_connected(m, generation.as_deref())
                        } else if writer {
                            fs.mount_writer_at(m, generation.as_deref())
                        } else {
                            fs.mount_receiver_accepting(m, generation.as_deref())
                        }
                    })
                    .await;
                match result {
                    Some(Ok(())) => self.record(format!("{what}: done"), lines).await,
                    Some(Err(e)) => return self.fail_step(what, e.to_string(), queue, lines).await,
                    None => return self.fail_step(what, "panicked".into(), queue, lines).await,
                }
            }
            Action::Unmount => {
                if let Some(Err(e)) = self.blocking(|_, fs, m| fs.unmount(m)).await {
                    self.record(format!("error: unmount: {e}"), lines).await;
                }
            }
            Action::DefineDomain => match self.blocking(|vm, _, m| vm.define(m)).await {
                Some(Ok(())) => self.record("domain defined".into(), lines).await,
                Some(Err(e)) => self.record(format!("error: define: {e}"), lines).await,
                None => {}
            },
            Action::StartVm => match self.blocking(|vm, _, m| vm.start(m)).await {
                Some(Ok(())) => {
                    self.record("VM started".into(), lines).await;
                    queue.push_back(Event::VmStarted);
                }
                other => {
                    let e = match other {
                        Some(Err(e)) => e.to_string(),
                        _ => "panicked".to_string(),
                    };
                    self.record(format!("error: start VM: {e}"), lines).await;
                    queue.push_back(Event::VmStartFailed {
                        now_ms: self.now_ms(),
                    });
                }
            },
            Action::StopVm => match self.blocking(|vm, _, m| vm.stop(m)).await {
                Some(Ok(())) => self.record("VM stopped".into(), lines).await,
                Some(Err(e)) => self.record(format!("error: stop VM: {e}"), lines).await,
                None => self.record("error: stop VM: panicked".into(), lines).await,
            },
            Action::NewGeneration => {
                let mut id = None;
                let result = self.persist(|m| id = Some(m.history.start_new())).await;
                match (result, id) {
                    (Ok(()), Some(id)) => self.record(format!("new generation {id}"), lines).await,
                    (Err(e), _) => {
                        return self.fail_step("persist generation", e, queue, lines).await
                    }
                    (Ok(()), None) => {}
                }
            }
            Action::AdoptPeerHistory => {
                let Some(history) = self.last_beat.as_ref().map(|b| b.history.clone()) else {
                    self.record("error: no peer history to adopt".into(), lines)
                        .await;
                    return Ok(());
                };
                if let Err(e) = self.persist(|m| m.history.adopt(&history)).await {
                    return self.fail_step("persist generation", e, queue, lines).await;
                }
            }
            Action::SetPeerMayBeNewer(flag) => {
                if let Err(e) = self.persist(|m| m.peer_may_be_newer = flag).await {
                    return self
                        .fail_step("persist peer-may-be-newer", e, queue, lines)
                        .await;
                }
            }
            Action::StartResync { full } => {
                self.resync_rate = ResyncRate::default();
                let generation = self.peer_generation();
                match self
                    .blocking(move |_, fs, m| fs.start_resync_from(m, full, generation.as_deref()))
                    .await
                {
                    Some(Ok(())) => {
                        let kind = if full { "full" } else { "incremental" };
                        self.record(format!("{kind} resync started"), lines).await;
                    }
                    Some(Err(crate::driver::DriverError::Unsupported(what))) => {
                        if !self.resync_unsupported_logged {
                            self.resync_unsupported_logged = true;
                            self.record(
                                format!("{what} is not available: this node stays not up to date"),
                                lines,
                            )
                            .await;
                        }
                    }
                    Some(Err(e)) => {
                        return self.fail_step("resync", e.to_string(), queue, lines).await
                    }
                    None => {
                        return self
                            .fail_step("resync", "panicked".into(), queue, lines)
                            .await
                    }
                }
            }
            Action::MarkPeerOutdated => self.mark_peer_outdated(lines).await,
            Action::ProbeWitness => {
                let witnesses = self.witnesses.clone();
                let reachable = tokio::task::spawn_blocking(move || witness::probe(&witnesses))
                    .await
                    .unwrap_or(false);
                let word = if reachable {
                    "reachable"
                } else {
                    "unreachable"
                };
                self.record(format!("witness {word}"), lines).await;
                queue.push_back(Event::WitnessResult { reachable });
            }
        }
        Ok(())
    }

    /// A SECOND's resync as its writer's heartbeat reports it.
    fn resync_from_peer(&self) -> ResyncState {
        match &*self.peer_rx.borrow() {
            PeerView::Seen { beat, .. } if beat.announce.role.is_writer() => beat
                .resync
                .as_ref()
                .map_or(ResyncState::Idle, resync_from_writer),
            _ => ResyncState::Idle,
        }
    }

    /// The peer is a ready SECOND whose current generation is ours.
    fn peer_is_ready_second_in_sync(&self) -> bool {
        let ready_second = matches!(
            &*self.peer_rx.borrow(),
            PeerView::Seen { beat, .. }
                if beat.announce.role == Role::Second
                    && beat.announce.readiness == Readiness::Ready
        );
        let mine = self.meta.history.current().map(|g| g.to_string());
        ready_second && mine.is_some() && self.peer_generation() == mine
    }

    /// The peer's current generation as its last heartbeat showed it.
    fn peer_generation(&self) -> Option<String> {
        self.last_beat
            .as_ref()
            .and_then(|b| b.history.current())
            .map(|g| g.to_string())
    }

    /// Writer: attaches a SECOND that is not up to date (its receiver runs:
    /// it announces SECOND only once it does) and follows the copy to it.
    async fn writer_attach(&mut self) {
        let peer_behind = matches!(
            &*self.peer_rx.borrow(),
            PeerView::Seen { beat, .. }
                if beat.announce.role == Role::Second
                    && beat.announce.readiness == Readiness::NotUpToDate
        );
        if !peer_behind {
            if self.attached.take().is_some() || self.writer_sync.is_some() {
                self.writer_sync = None;
                self.publish();
            }
            return;
        }
        if self.attached.is_none() && !self.attach_unsupported {
            let generation = self.meta.history.current().map(|g| g.to_string());
            let mut lines = Vec::new();
            match self
                .blocking(move |_, fs, m| fs.attach_peer(m, generation.as_deref()))
                .await
            {
                Some(Ok(())) => {
                    self.attached = Some(Instant::now());
                    self.resync_rate = ResyncRate::default();
                    self.record("attaching the SECOND: full copy started".into(), &mut lines)
                        .await;
                }
                Some(Err(crate::driver::DriverError::Unsupported(_))) => {
                    self.attach_unsupported = true;
                }
                Some(Err(e)) => {
                    self.attached = Some(Instant::now());
                    self.record(format!("error: attach the SECOND: {e}"), &mut lines)
                        .await;
                }
                None => {}
            }
            return;
        }
        let Some(since) = self.attached else {
            return;
        };
        let state = self.blocking(|_, fs, m| fs.writer_sync_state(m)).await;
        let idle = matches!(state, Some(Ok(ResyncState::Idle)));
        let sync = match state {
            Some(Ok(ResyncState::Running(p))) => {
                self.resync_rate.sample(p.done_bytes);
                writer_resync_status(ResyncState::Running(p), self.resync_rate.rate)
            }
            Some(Ok(ResyncState::Done)) => writer_resync_status(ResyncState::Done, 0),
            Some(Ok(ResyncState::Idle)) | None => None,
            Some(Err(e)) => {
                if since.elapsed() >= ATTACH_RETRY {
                    let mut lines = Vec::new();
                    self.record(
                        format!("sync to the SECOND failed: {e}; retrying"),
                        &mut lines,
                    )
                    .await;
                    self.attached = None;
                }
                None
            }
        };
        if self.attached.is_some() && idle && since.elapsed() >= ATTACH_RETRY * 2 {
            // SIGUSR2 left no trace: try again.
            self.attached = None;
        }
        if sync != self.writer_sync {
            self.writer_sync = sync;
            self.publish();
        }
    }

    /// Publishes the new generation and waits until the peer shows it knows
    /// it is outdated, or is lost, bounded by the failover timeout.
    async fn mark_peer_outdated(&mut self, lines: &mut Vec<String>) {
        self.view
            .send_modify(|v| v.history = self.meta.history.clone());
        let deadline = Instant::now() + self.failover_timeout;
        loop {
            let done = match &*self.peer_rx.borrow() {
                PeerView::Seen { beat, .. } => {
                    compare(&self.meta.history, &beat.history)
                        == crate::generation::Relation::LocalNewer
                        && beat.announce.readiness != Readiness::Ready
                }
                PeerView::Lost | PeerView::Unknown => true,
            };
            if done {
                self.record("the peer knows it is outdated".into(), lines)
                    .await;
                return;
            }
            if Instant::now() >= deadline {
                self.record(
                    "the peer did not acknowledge being outdated within the failover timeout"
                        .into(),
                    lines,
                )
                .await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Logs what [`VmDriver::refresh_xml`] did: a rewrite in the event log, a
    /// failure once until it succeeds again.
    async fn on_xml_refresh(&mut self, result: Option<Result<bool, crate::driver::DriverError>>) {
        match result {
            Some(Ok(rewritten)) => {
                if self.xml_refresh_failed {
                    self.xml_refresh_failed = false;
                    tracing::info!(module = %self.module.name, "domain XML refresh works again");
                }
                if rewritten {
                    let mut lines = Vec::new();
                    self.record(
                        "domain XML rewritten from libvirt's definition".into(),
                        &mut lines,
                    )
                    .await;
                }
            }
            Some(Err(e)) if !self.xml_refresh_failed => {
                self.xml_refresh_failed = true;
                tracing::warn!(module = %self.module.name, error = %e, "domain XML refresh failed");
            }
            Some(Err(_)) | None => {}
        }
    }

    /// The checkers: VM state, vmha-fs health, resync progress.
    async fn check(&mut self) {
        let role = self.state.role;
        let check_vm = role.is_writer() && !self.state.vm_starting;
        let check_fs = role.is_writer() || role == Role::Second;
        let check_resync = role == Role::Second && !self.state.uptodate;
        if role.is_writer() {
            self.writer_attach().await;
        }
        let Some((vm, fs, resync, changed, xml)) = self
            .blocking(move |vm, fs, m| {
                (
                    check_vm.then(|| vm.state(m)),
                    check_fs.then(|| fs.health(m)),
                    check_resync.then(|| fs.resync_state(m)),
                    fs.changed_bytes(m),
                    // The writer keeps `<dir>/<domain>.xml` current.
                    check_vm.then(|| vm.refresh_xml(m)),
                )
            })
            .await
        else {
            return;
        };
        self.changed_bytes = changed;
        self.on_xml_refresh(xml).await;
        if let Some(Ok(state)) = vm {
            if state.is_down() {
                let now_ms = self.now_ms();
                let lines = self.handle(Event::VmStopped { now_ms }).await;
                drop(lines);
                return;
            }
        }
        match fs {
            Some(FsHealth::Failed(reason)) => {
                let mut lines = Vec::new();
                self.record(format!("vmha-fs failed: {reason}"), &mut lines)
                    .await;
                self.handle(Event::FsFailed).await;
                return;
            }
            Some(FsHealth::Idle) => {
                let mut lines = Vec::new();
                self.record("vmha-fs failed: nothing is mounted".into(), &mut lines)
                    .await;
                self.handle(Event::FsFailed).await;
                return;
            }
            Some(FsHealth::LinkDown) => {
                if role == Role::Prim && !self.state.peer_outdated {
                    self.handle(Event::ReplicationLinkDown).await;
                    return;
                }
            }
            Some(FsHealth::Fenced) => {
                self.handle(Event::Fenced).await;
                return;
            }
            Some(FsHealth::Healthy) | None => {}
        }
        // The receiver of vmha-fs does not know how far the copy is: the
        // writer says so in its heartbeat.
        let resync = match resync {
            Some(Ok(ResyncState::Idle)) => Some(Ok(self.resync_from_peer())),
            other => other,
        };
        match resync {
            Some(Ok(ResyncState::Running(progress))) => {
                self.resync_rate.sample(progress.done_bytes);
                if self.state.resync != Some(progress) {
                    self.handle(Event::ResyncProgress(progress)).await;
                }
            }
            Some(Ok(ResyncState::Done)) => {
                self.handle(Event::ResyncDone).await;
            }
            Some(Ok(ResyncState::Idle)) | None => {}
            Some(Err(e)) => {
                tracing::warn!(module = %self.module.name, error = %e, "resync state");
            }
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod writer_sync_tests {
    use super::*;
    use crate::state::Progress;

    #[test]
    fn writer_progress_round_trips_through_the_heartbeat_field() {
        assert_eq!(writer_resync_status(ResyncState::Idle, 0), None);
        let done = writer_resync_status(ResyncState::Done, 0);
        assert_eq!(
            done.as_ref().map(resync_from_writer),
            Some(ResyncState::Done)
        );
        for (d, t) in [(0, 0), (5, 5), (3, 10)] {
            let running = ResyncState::Running(Progress {
                done_bytes: d,
                total_bytes: t,
            });
            let beat = writer_resync_status(running, 0);
            // A running copy is never read as done, even at 100 %.
            assert!(matches!(
                beat.as_ref().map(resync_from_writer),
                Some(ResyncState::Running(_))
            ));
        }
    }
}
