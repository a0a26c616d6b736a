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
//! - `RetryWitness` probes again [`WITNESS_RETRY`] later, if the module still
//!   wants the probe then. Every probe's outcome and errors are kept for
//!   `status` (`witness`); a probe that could not run is logged in the event
//!   log when its errors change, and with `tracing` at error level each time.
//!   The witnesses are also probed once when the daemon starts, so that a
//!   witness that cannot be probed shows before a failover needs it.
//! - `MarkPeerOutdated` completes once the peer's heartbeat shows our newer
//!   generation, or the peer is lost, or shows data that is not behind ours,
//!   or after `failover_timeout_ms` (logged). Only the first outcome lets a
//!   PRIM's vmha-fs write alone (SIGUSR1); otherwise its writes keep waiting
//!   for the state machine (PeerLost, stepping down), bounded by the lock
//!   timeout.
//!
//! Choices where the design is silent:
//! - A failure to persist metadata, to mount, or to start a resync aborts the
//!   rest of the step and feeds `FsFailed` (the local disk or vmha-fs failed:
//!   the module fails over); VM start failures feed `VmStartFailed`; stop and
//!   unmount failures are logged and the step goes on. Every `StopVm` reports
//!   `VmStopDone` or `VmStopFailed` (a swap hands over only after the first).
//!   Persisting "self outdated" (`SetSelfOutdated(true)`) may fail when the
//!   state directory shares the failed disk: logged, the step goes on, the
//!   fact stays in memory.
//! - vmha-fs reporting a local disk failure (`link.json` `disk_failed`, see
//!   [`crate::driver::vmha_fs`]) feeds `DiskFailed`, checked before the VM's
//!   state so a guest failing on that disk is not restarted there. The node's
//!   `disk` is carried in its heartbeats' announcement (`status --json`).
//! - Modules are started (`Start`) when the daemon starts.
//! - A graceful shutdown (SIGTERM) stops every module (a PRIM hands over),
//!   announces it for a few heartbeat intervals, then exits; [`Daemon::kill`]
//!   simulates a crash (tasks aborted, nothing stopped).
//! - A module the peer does not announce at all is treated as if the peer were
//!   not seen for it (its status shows `module_config_match: false`).
//! - Replication link down (vmha-fs reports its link lost, stalled or failed)
//!   on a PRIM: `ReplicationLinkDown` only while the peer's heartbeats still
//!   arrive (last round within 3 intervals) and on fresh first-hand knowledge that
//!   the peer is our SECOND (the dispatcher has been observing without a stall
//!   of its own for the failover timeout, the peer's latest heartbeat shows a
//!   SECOND with our data): a frozen PRIM waking up must not fork the history
//!   from heartbeats queued while it slept. If the peer already shows it is
//!   outdated, vmha-fs just writes alone.
//! - "Fenced" from vmha-fs (the receiver refused our generation) while the
//!   peer's heartbeat shows our data or an older state of it is not a fence: its
//!   receiver still accepts an older generation of ours, and a SECOND restarts
//!   its receiver for the writer's current generation when the writer's data
//!   descends from its own ([`crate::driver::FsDriver::follow_writer`]).
//! - A SECOND whose receiver died restarts it in place (at most once per
//!   30 s, else `FsFailed`): what it received is intact, and the writer makes
//!   it outdated before writing without it.
//! - A connected writer start (after a swap) that fails falls back to starting
//!   alone: new generation, the SECOND marked outdated (it must acknowledge),
//!   then the usual attach with a full copy.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use vmha_fs::key::ClusterKey;

use crate::clock::WallClock;
use crate::config::{Config, Digest, Module, NodeIndex, Witness};
use crate::control::{self, Call, ControlError, Request, Response};
use crate::driver::{FsDriver, FsHealth, ResyncState, VmDriver};
use crate::eventlog::EventLog;
use crate::generation::{compare, GenerationError, History, Metadata};
use crate::heartbeat::{
    Endpoint, EndpointSpec, HeartbeatError, Liveness, ModuleBeat, Payload, Received, Rejections,
};
use crate::state::{
    step, Action, Announce, Colour, Event, ModuleState, Peer, Policy, Readiness, Role,
    WitnessOutcome,
};
use crate::status::{ModuleStatus, NodeStatus, ResyncStatus, Status, WitnessStatus};
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
    /// The wall clock, for display only (event log timestamps); tests offset
    /// it to show that nothing else depends on it.
    pub clock: WallClock,
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
    /// `vmctl verify`: compare the peer's copy, report only.
    Verify(oneshot::Sender<Result<Vec<String>, String>>),
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

/// What the dispatcher knows of the peer node as a whole, from its heartbeats
/// (not vmha-fs's replication link: that is [`FsHealth::LinkDown`]).
#[derive(Debug)]
struct PeerLiveness {
    /// When each network last carried a heartbeat.
    networks: Liveness,
    /// Every network silent for the failover timeout (`PeerLost` was sent).
    lost: bool,
    /// The peer's whole-configuration hash, from its latest heartbeat.
    config_hash: Option<Digest>,
    /// (session, round) of the last payload dispatched.
    last_round: Option<(u64, u64)>,
    /// The latest beat per module, kept after the peer is lost.
    modules: HashMap<String, ModuleBeat>,
}

#[derive(Debug)]
struct Shared {
    config: Config,
    node: NodeIndex,
    modules: Vec<ModuleHandle>,
    peer: Mutex<PeerLiveness>,
    witness: WitnessSlot,
    /// Heartbeat datagrams rejected, by kind (for `status`).
    rejections: Rejections,
}

/// The latest witness probe (of any module: they probe the same witnesses).
#[derive(Debug, Clone)]
struct WitnessView {
    outcome: WitnessOutcome,
    errors: Vec<String>,
    at: Instant,
}

type WitnessSlot = Arc<Mutex<Option<WitnessView>>>;

/// How long after a witness probe that could not run it is tried again.
pub const WITNESS_RETRY: Duration = Duration::from_secs(2);

/// Probes the witnesses off the async threads and keeps the result for `status`.
async fn probe_witnesses(witnesses: &[Witness], slot: &WitnessSlot) -> witness::Report {
    let list = witnesses.to_vec();
    let report = tokio::task::spawn_blocking(move || witness::probe(&list))
        .await
        .unwrap_or_else(|e| witness::Report {
            outcome: WitnessOutcome::CouldNotProbe,
            errors: vec![format!("the probe task failed: {e}")],
        });
    for e in &report.errors {
        tracing::error!(witness = %e, "a witness could not be probed");
    }
    *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(WitnessView {
        outcome: report.outcome,
        errors: report.errors.clone(),
        at: Instant::now(),
    });
    report
}

impl Shared {
    fn peer(&self) -> std::sync::MutexGuard<'_, PeerLiveness> {
        self.peer.lock().unwrap_or_else(|p| p.into_inner())
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

/// Waits for every receiver (whatever it answers).
async fn futures_join_all<T>(receivers: Vec<oneshot::Receiver<T>>) {
    for r in receivers {
        let _ = r.await;
    }
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
        let judging_since = Arc::new(Mutex::new(started));
        let witness_slot: WitnessSlot = Arc::new(Mutex::new(None));

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
            )
            .with_self_outdated(meta.self_outdated);
            let log = Arc::new(EventLog::with_clock(
                &cluster.state_dir,
                &module.name,
                spec.clock.clone(),
            ));
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
                    last_beat_at: None,
                    heartbeat_interval: Duration::from_millis(cluster.heartbeat_interval_ms),
                    peer_lost_sent: false,
                    started,
                    start_wait: None,
                    start_wait_ms: cluster.start_wait_ms,
                    failover_timeout: Duration::from_millis(cluster.failover_timeout_ms),
                    witnesses: cluster.witness.clone(),
                    witness_slot: Arc::clone(&witness_slot),
                    witness_retry: None,
                    witness_errors_logged: None,
                    changed_bytes: 0,
                    resync_rate: ResyncRate::default(),
                    resync_unsupported_logged: false,
                    attached: None,
                    attach_unsupported: false,
                    writer_sync: None,
                    went_alone: None,
                    receiver_restarted: None,
                    outdated: None,
                    judging_since: Arc::clone(&judging_since),
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
        let server = control::Server::bind(&cluster.control_socket)?;
        let socket = server.path().to_path_buf();

        let shared = Arc::new(Shared {
            peer: Mutex::new(PeerLiveness {
                networks: Liveness::new(endpoint.networks()),
                lost: false,
                config_hash: None,
                last_round: None,
                modules: HashMap::new(),
            }),
            rejections: endpoint.rejections(),
            config: config.clone(),
            node,
            modules: handles,
            witness: Arc::clone(&witness_slot),
        });
        if !cluster.witness.is_empty() {
            // A witness that cannot be probed must show now, not at the failover.
            let witnesses = cluster.witness.clone();
            let slot = Arc::clone(&witness_slot);
            tasks.push(tokio::spawn(async move {
                let report = probe_witnesses(&witnesses, &slot).await;
                match report.outcome {
                    WitnessOutcome::Reachable => tracing::info!("witness reachable"),
                    WitnessOutcome::Unreachable => {
                        tracing::warn!("no witness answers: a failover would not go ALONE")
                    }
                    WitnessOutcome::CouldNotProbe => tracing::error!(
                        "witness could not be probed: a failover would wait until it can"
                    ),
                }
            }));
        }

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
            judging_since,
        )));
        tasks.push(tokio::spawn(send_heartbeats(
            Arc::clone(&shared),
            endpoint,
            shutdown_rx.clone(),
        )));
        let (calls_tx, calls_rx) = mpsc::channel(32);
        tasks.push(server.spawn(calls_tx.clone(), shutdown_rx.clone()));
        tasks.push(tokio::spawn(serve_calls(Arc::clone(&shared), calls_rx)));

        // Started before this returns: `status` right after start shows each
        // module's first state (WAIT), never the STOP it had before `start`.
        let mut started = Vec::new();
        for handle in &shared.modules {
            let (reply, done) = oneshot::channel();
            let _ = handle
                .commands
                .send(ModuleCommand::Event(Event::Start, reply))
                .await;
            started.push(done);
        }
        let all_started = futures_join_all(started);
        if tokio::time::timeout(Duration::from_secs(5), all_started)
            .await
            .is_err()
        {
            tracing::warn!("some modules are still starting");
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
    let session = endpoint.session();
    let node = shared.config.node(shared.node).name.clone();
    let mut round = 0u64;
    let mut failing = false;
    let mut last_prompted: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = ticker.tick() => {}
            _ = endpoint.prompted() => {
                // One extra round per interval at most: replayed datagrams
                // must not turn into a flood of our own.
                if last_prompted.is_some_and(|t| t.elapsed() < interval) {
                    continue;
                }
                last_prompted = Some(Instant::now());
            }
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
    mut incoming: mpsc::Receiver<Received>,
    mut shutdown: watch::Receiver<bool>,
    judging_since: Arc<Mutex<Instant>>,
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
    // Anyone can send datagrams to the heartbeat port: at most one line a second.
    let mut rejections = vmha_fs::ratelog::RateLog::new("heartbeat");
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            message = incoming.recv() => match message {
                None => return,
                Some(received) => on_beat(&shared, received),
            },
            _ = ticker.tick() => {
                rejections.tick();
                let now = Instant::now();
                if now.saturating_duration_since(last_tick) > timeout / 2 {
                    tracing::warn!(
                        stalled_ms = now.saturating_duration_since(last_tick).as_millis() as u64,
                        "this daemon was stalled; judging the peer from now on"
                    );
                    observing_since = now;
                    *judging_since.lock().unwrap_or_else(|p| p.into_inner()) = now;
                }
                last_tick = now;
                let lost_now = {
                    let mut peer = shared.peer();
                    let silent = peer.networks.all_silent_for(now, timeout)
                        && now.saturating_duration_since(observing_since) >= timeout;
                    let newly = silent && !peer.lost;
                    if newly {
                        peer.lost = true;
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
        let mut peer = shared.peer();
        peer.networks.record(received.network, received.at);
        if received.new_session {
            tracing::info!(
                network = received.network,
                session = format_args!("{:016x}", payload.session),
                "peer heartbeat session accepted (the peer or this daemon started)"
            );
        }
        if peer.lost {
            tracing::info!(network = received.network, "peer heard again");
        }
        peer.lost = false;
        peer.config_hash = Some(payload.config_hash);
        let fresh = match peer.last_round {
            Some((session, round)) => session != payload.session || payload.round > round,
            None => true,
        };
        if fresh {
            peer.last_round = Some((payload.session, payload.round));
            for beat in &payload.modules {
                peer.modules.insert(beat.name.clone(), beat.clone());
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
        Request::Verify { module } => {
            let handle = match resolve(shared, module.as_deref()) {
                Ok(h) => h,
                Err(e) => return Response::error(e),
            };
            let (reply, answer) = oneshot::channel();
            if handle
                .commands
                .send(ModuleCommand::Verify(reply))
                .await
                .is_err()
            {
                return Response::error("the module is shutting down");
            }
            return match answer.await {
                Ok(Ok(lines)) => Response::lines(true, lines),
                Ok(Err(e)) => Response::error(e),
                Err(_) => Response::error("the module is shutting down"),
            };
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
        Ok(lines) => match lines
            .iter()
            .find(|l| l.contains("refused") || l.contains("aborted"))
        {
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
    let peer = shared.peer();
    let reachable = peer.networks.latest().is_some() && !peer.lost;
    let last_seen = peer
        .networks
        .latest()
        .map(|t| ms(now.saturating_duration_since(t)));
    let heartbeats: std::collections::BTreeMap<String, Option<u64>> = peer_node
        .addresses
        .iter()
        .zip(peer.networks.ages_ms(now))
        .map(|(ip, age): (&IpAddr, Option<u64>)| (ip.to_string(), age))
        .collect();
    let config_match = peer.config_hash.map(|h| h == config.hash());
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
                disk: Some(view.announce.disk),
                generation: view.history.current().map(|g| g.to_string()),
                resync: view.resync,
                last_seen_ms: None,
                heartbeats: None,
                last_known_state: None,
                config_match: None,
                module_config_match: None,
            };
            let beat = peer.modules.get(&handle.module.name);
            let module_match = beat.map(|b| Some(b.module_hash) == handle.module_hash);
            let peer = match beat {
                Some(beat) if reachable => NodeStatus {
                    reachable: true,
                    state: Some(beat.announce.role),
                    ready: beat.announce.readiness == Readiness::Ready,
                    readiness: Some(beat.announce.readiness),
                    colour: Some(colour_of(beat.announce.role, beat.announce.readiness)),
                    disk: Some(beat.announce.disk),
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
                    disk: beat.map(|b| b.announce.disk),
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
    let witness = (!config.cluster.witness.is_empty()).then(|| {
        let last = shared
            .witness
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        WitnessStatus {
            addresses: config.cluster.witness.iter().map(witness::name).collect(),
            last_probe: last.as_ref().map(|l| l.outcome),
            last_probe_ms: last
                .as_ref()
                .map(|l| ms(now.saturating_duration_since(l.at))),
            errors: last.map(|l| l.errors).unwrap_or_default(),
        }
    });
    Status {
        node: local_name,
        config_hash: config.hash().to_string(),
        heartbeats_rejected: shared.rejections.counts(),
        modules,
        witness,
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
    /// When the latest heartbeat round of the peer arrived.
    last_beat_at: Option<Instant>,
    heartbeat_interval: Duration,
    peer_lost_sent: bool,
    started: Instant,
    start_wait: Option<tokio::time::Instant>,
    start_wait_ms: u64,
    failover_timeout: Duration,
    witnesses: Vec<Witness>,
    witness_slot: WitnessSlot,
    /// When to run the `RetryWitness` asked for.
    witness_retry: Option<tokio::time::Instant>,
    /// The witness errors last written to the event log.
    witness_errors_logged: Option<Vec<String>>,
    changed_bytes: u64,
    resync_rate: ResyncRate,
    resync_unsupported_logged: bool,
    /// Writer: when `attach_peer` was last called for the current peer
    /// episode (reset when the peer is no longer a SECOND behind us).
    attached: Option<Instant>,
    attach_unsupported: bool,
    /// Writer: the copy to the peer, as published in heartbeats.
    writer_sync: Option<ResyncStatus>,
    /// Writer: when vmha-fs was last told to write alone.
    went_alone: Option<Instant>,
    /// SECOND: when its dead receiver was last restarted in place.
    receiver_restarted: Option<Instant>,
    /// The outcome of the current step's `MarkPeerOutdated`, if any.
    outdated: Option<Outdated>,
    /// Since when the dispatcher observes the peer without a stall of its own.
    judging_since: Arc<Mutex<Instant>>,
    /// The last `refresh_xml` failed (logged once).
    xml_refresh_failed: bool,
}

/// How `MarkPeerOutdated` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outdated {
    /// The peer's heartbeat shows it is behind us and not ready.
    Acknowledged,
    PeerLost,
    /// The peer's heartbeat shows data that is not ours or older.
    PeerAhead,
    TimedOut,
}

/// How long a failed attach waits before the writer tries again.
const ATTACH_RETRY: Duration = Duration::from_secs(3);
/// After SIGUSR1, how long a link still reported down is taken for vmha-fs
/// not having published its new state yet (it does within tens of ms).
const GO_ALONE_SETTLE: Duration = Duration::from_secs(1);
/// A SECOND's receiver that dies again within this is not restarted in place.
const RECEIVER_RESTART_INTERVAL: Duration = Duration::from_secs(30);

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
            let witness_retry = self.witness_retry;
            tokio::select! {
                _ = shutdown.changed() => return,
                command = commands.recv() => match command {
                    None => return,
                    Some(ModuleCommand::Event(event, reply)) => {
                        let lines = self.handle(event).await;
                        let _ = reply.send(lines);
                    }
                    Some(ModuleCommand::Verify(reply)) => {
                        // May take long (it reads everything): off the runner's loop.
                        let (fs, module, log) =
                            (Arc::clone(&self.fs), self.module.clone(), Arc::clone(&self.log));
                        tokio::spawn(async move {
                            let outcome = tokio::task::spawn_blocking(move || fs.verify(&module))
                                .await
                                .map_err(|e| format!("verify panicked: {e}"))
                                .and_then(|r| r.map_err(|e| e.to_string()))
                                .map(|report| report.lines());
                            let record: Vec<String> = match &outcome {
                                Ok(lines) => lines.iter().map(|l| format!("verify: {l}")).collect(),
                                Err(e) => vec![format!("verify failed: {e}")],
                            };
                            for line in record {
                                if let Err(e) = log.append(&line) {
                                    tracing::warn!("event log: {e}");
                                }
                            }
                            let _ = reply.send(outcome);
                        });
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
                _ = sleep_until(witness_retry), if witness_retry.is_some() => {
                    self.witness_retry = None;
                    if self.state.probing() {
                        let mut lines = Vec::new();
                        let outcome = self.probe_witness(&mut lines).await;
                        self.handle(Event::WitnessResult(outcome)).await;
                    }
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
                self.last_beat_at = Some(Instant::now());
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
            // Losing readiness is announced at once, before the step's (maybe
            // slow) actions: claiming less is always safe, and a writer waiting
            // for us to know we are outdated must not wait on them.
            let downgrade = next.role == self.state.role
                && self.state.readiness() == Readiness::Ready
                && next.readiness() == Readiness::NotUpToDate;
            self.state = next;
            if downgrade {
                self.publish();
            }
            self.outdated = None;
            for action in actions {
                if self.execute(action, &mut queue, &mut lines).await.is_err() {
                    break;
                }
            }
            if before == Role::Prim && self.state.role == Role::Alone {
                // The peer is dead: writes go on alone instead of waiting for it.
                self.fs_go_alone(&mut lines).await;
            } else if self.outdated == Some(Outdated::Acknowledged) && self.state.role == Role::Prim
            {
                // Replication link down: the peer now knows it is outdated, so
                // writes go on without it (it is resynchronised when it asks).
                // Without its acknowledgement they keep waiting: a lost peer is
                // the state machine's (PeerLost, maybe through the witness), a
                // newer one makes this node step down.
                self.fs_go_alone(&mut lines).await;
            }
            if !self.state.role.is_writer() {
                self.attached = None;
                self.writer_sync = None;
            }
            if !self.state.probing() {
                self.witness_retry = None;
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

    /// Writer: vmha-fs stops waiting for the peer and writes alone (SIGUSR1).
    async fn fs_go_alone(&mut self, lines: &mut Vec<String>) {
        self.attached = None;
        self.writer_sync = None;
        self.went_alone = Some(Instant::now());
        match self.blocking(|_, fs, m| fs.go_alone(m)).await {
            Some(Ok(())) => self.record("vmha-fs writes alone".into(), lines).await,
            Some(Err(e)) => self.record(format!("error: go alone: {e}"), lines).await,
            None => {}
        }
    }

    /// The replication link is down (vmha-fs reports it lost or failed) while
    /// this node writes. Before vmha-fs may write alone, the peer must know it
    /// is outdated: through a new generation in the heartbeats (the state
    /// machine's `ReplicationLinkDown`), unless its heartbeat already shows it.
    /// Returns whether a step ran.
    async fn on_link_down(&mut self) -> bool {
        if self
            .went_alone
            .is_some_and(|at| at.elapsed() < GO_ALONE_SETTLE)
        {
            // vmha-fs has not published the state SIGUSR1 put it in yet.
            return false;
        }
        match self.state.role {
            Role::Alone => {
                let mut lines = Vec::new();
                self.fs_go_alone(&mut lines).await;
                false
            }
            // Only on fresh, first-hand knowledge that the peer is our SECOND:
            // after a stall of this daemon (a frozen node), heartbeats queued
            // meanwhile still describe the past, and the peer may have taken
            // over since; a new generation here would fork the history.
            Role::Prim
                if !self.judging_long_enough()
                    || !self.peer_is_our_second()
                    || !self.heartbeats_arriving() =>
            {
                false
            }
            Role::Prim if self.peer_knows_outdated() => {
                let mut lines = Vec::new();
                self.record(
                    "replication link down; the peer already knows it is outdated".into(),
                    &mut lines,
                )
                .await;
                self.fs_go_alone(&mut lines).await;
                false
            }
            // Otherwise a heartbeat clearing `peer_outdated` is on its way:
            // the next check decides.
            Role::Prim if !self.state.peer_outdated => {
                self.handle(Event::ReplicationLinkDown).await;
                true
            }
            _ => false,
        }
    }

    /// The dispatcher has been observing the peer without a stall of its own
    /// for the failover timeout.
    fn judging_long_enough(&self) -> bool {
        let since = *self.judging_since.lock().unwrap_or_else(|p| p.into_inner());
        since.elapsed() >= self.failover_timeout
    }

    /// The peer's heartbeats still arrive (design: the replication link fails
    /// *while heartbeats still arrive*). When they stopped a few intervals ago
    /// the whole peer may be going away (a partition): `PeerLost` decides, maybe
    /// through the witness. A new generation here would fork the history even
    /// if this node then steps down without writing, and the heal would be
    /// taken for a split brain.
    fn heartbeats_arriving(&self) -> bool {
        let fresh = (self.heartbeat_interval * 3).min(self.failover_timeout / 2);
        self.last_beat_at.is_some_and(|at| at.elapsed() <= fresh)
    }

    /// The peer's latest heartbeat shows a SECOND with our data or an older
    /// state of it.
    fn peer_is_our_second(&self) -> bool {
        let second = matches!(
            &*self.peer_rx.borrow(),
            PeerView::Seen { beat, .. } if beat.announce.role == Role::Second
        );
        second && self.peer_follows_us()
    }

    /// The peer's latest heartbeat shows it is behind us and not ready: it
    /// knows it is outdated.
    fn peer_knows_outdated(&self) -> bool {
        matches!(
            &*self.peer_rx.borrow(),
            PeerView::Seen { beat, .. }
                if compare(&self.meta.history, &beat.history)
                    == crate::generation::Relation::LocalNewer
                    && beat.announce.readiness != Readiness::Ready
        )
    }

    /// The peer's latest heartbeat shows our data or an older state of it: a
    /// receiver refusing our generation then merely accepts an older one of
    /// ours (it is being restarted for the current one), we are not stale.
    fn peer_follows_us(&self) -> bool {
        matches!(
            &*self.peer_rx.borrow(),
            PeerView::Seen { beat, .. }
                if matches!(
                    compare(&self.meta.history, &beat.history),
                    crate::generation::Relation::LocalNewer | crate::generation::Relation::InSync
                )
        )
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
                let result = match result {
                    Some(Err(e)) if connected => {
                        self.record(
                            format!("error: mount as writer replicating to the SECOND: {e}"),
                            lines,
                        )
                        .await;
                        self.mount_writer_alone_instead(lines).await
                    }
                    other => other,
                };
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
            Action::StopVm => {
                let outcome = match self.blocking(|vm, _, m| vm.stop(m)).await {
                    Some(Ok(())) => Ok(()),
                    Some(Err(e)) => Err(e.to_string()),
                    None => Err("panicked".to_string()),
                };
                match outcome {
                    Ok(()) => {
                        self.record("VM stopped".into(), lines).await;
                        queue.push_back(Event::VmStopDone);
                    }
                    Err(e) => {
                        self.record(format!("error: stop VM: {e}"), lines).await;
                        queue.push_back(Event::VmStopFailed);
                    }
                }
            }
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
            Action::SetSelfOutdated(flag) => {
                match self.persist(|m| m.self_outdated = flag).await {
                    Ok(()) if flag => {
                        self.record(
                            "recorded: this node's own copy is not up to date".into(),
                            lines,
                        )
                        .await
                    }
                    Ok(()) => {}
                    // The state directory may sit on the failed disk: the module
                    // still leaves this node (the fact stays in memory).
                    Err(e) if flag => {
                        self.record(
                            format!("error: persist self-outdated: {e} (kept in memory)"),
                            lines,
                        )
                        .await
                    }
                    Err(e) => {
                        return self
                            .fail_step("persist self-outdated", e, queue, lines)
                            .await
                    }
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
            Action::MarkPeerOutdated => {
                self.outdated = Some(self.mark_peer_outdated(lines).await);
            }
            Action::ProbeWitness => {
                let outcome = self.probe_witness(lines).await;
                queue.push_back(Event::WitnessResult(outcome));
            }
            Action::RetryWitness => {
                self.witness_retry = Some(tokio::time::Instant::now() + WITNESS_RETRY);
            }
        }
        Ok(())
    }

    /// Probes the witnesses; records the outcome, and the errors when they
    /// differ from the ones recorded last.
    async fn probe_witness(&mut self, lines: &mut Vec<String>) -> WitnessOutcome {
        let report = probe_witnesses(&self.witnesses, &self.witness_slot).await;
        let errors = (!report.errors.is_empty()).then(|| report.errors.join("; "));
        let new_errors =
            report.errors.is_empty() || self.witness_errors_logged.as_ref() != Some(&report.errors);
        let line = match (report.outcome, &errors) {
            (WitnessOutcome::Reachable, None) => Some("witness reachable".to_string()),
            (WitnessOutcome::Reachable, Some(e)) => Some(format!(
                "witness reachable (others could not be probed: {e})"
            )),
            (WitnessOutcome::Unreachable, _) => Some("witness unreachable".to_string()),
            (WitnessOutcome::CouldNotProbe, e) => new_errors.then(|| {
                format!(
                    "error: witness could not be probed: {}",
                    e.as_deref().unwrap_or("?")
                )
            }),
        };
        self.witness_errors_logged = Some(report.errors);
        if let Some(line) = line {
            self.record(line, lines).await;
        }
        report.outcome
    }

    /// The connected start failed (the SECOND's receiver is not there or refused
    /// us): start alone instead. The SECOND counts as ready, so it must first
    /// learn it is outdated (a new generation it sees in our heartbeats), as
    /// when the replication link goes down; it then asks for a resync and is
    /// attached with a full copy.
    async fn mount_writer_alone_instead(
        &mut self,
        lines: &mut Vec<String>,
    ) -> Option<Result<(), crate::driver::DriverError>> {
        let mut id = None;
        if let Err(e) = self.persist(|m| id = Some(m.history.start_new())).await {
            return Some(Err(crate::driver::DriverError::failed(
                "persist generation",
                e,
            )));
        }
        if let Some(id) = id {
            self.record(
                format!("new generation {id}: starting alone, the SECOND is outdated"),
                lines,
            )
            .await;
        }
        if let Outdated::TimedOut | Outdated::PeerAhead = self.mark_peer_outdated(lines).await {
            return Some(Err(crate::driver::DriverError::failed(
                "start alone",
                "the SECOND did not learn that it is outdated",
            )));
        }
        let generation = self.meta.history.current().map(|g| g.to_string());
        self.blocking(move |_, fs, m| fs.mount_writer_at(m, generation.as_deref()))
            .await
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
    async fn mark_peer_outdated(&mut self, lines: &mut Vec<String>) -> Outdated {
        self.view
            .send_modify(|v| v.history = self.meta.history.clone());
        let deadline = Instant::now() + self.failover_timeout;
        loop {
            let seen = matches!(&*self.peer_rx.borrow(), PeerView::Seen { .. });
            let outcome = if !seen {
                Some(Outdated::PeerLost)
            } else if self.peer_knows_outdated() {
                Some(Outdated::Acknowledged)
            } else if !self.peer_follows_us() {
                Some(Outdated::PeerAhead)
            } else {
                None
            };
            let line = match outcome {
                Some(Outdated::Acknowledged) => "the peer knows it is outdated",
                Some(Outdated::PeerLost) => "the peer is lost",
                Some(Outdated::PeerAhead) => {
                    "the peer is not behind this node: it does not take being outdated"
                }
                Some(Outdated::TimedOut) | None if Instant::now() >= deadline => {
                    self.record(
                        "the peer did not acknowledge being outdated within the failover timeout"
                            .into(),
                        lines,
                    )
                    .await;
                    return Outdated::TimedOut;
                }
                Some(Outdated::TimedOut) | None => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            self.record(line.into(), lines).await;
            return outcome.unwrap_or(Outdated::TimedOut);
        }
    }

    /// A SECOND's receiver may be restarted in place unless it was already
    /// restarted recently (then it keeps failing: the module steps down).
    fn may_restart_receiver(&self) -> bool {
        self.receiver_restarted
            .is_none_or(|at| at.elapsed() >= RECEIVER_RESTART_INTERVAL)
    }

    /// Restarts a SECOND's dead receiver, accepting the writer's generation.
    /// The data it received is intact (applied before each acknowledgement);
    /// the writer, whose link broke, makes this node outdated before writing
    /// without it. Returns whether the receiver runs again.
    async fn restart_receiver(&mut self, reason: &str) -> bool {
        self.receiver_restarted = Some(Instant::now());
        let generation = self.peer_generation();
        let mut lines = Vec::new();
        match self
            .blocking(move |_, fs, m| fs.mount_receiver_accepting(m, generation.as_deref()))
            .await
        {
            Some(Ok(())) => {
                self.record(
                    format!("vmha-fs receiver failed ({reason}): restarted"),
                    &mut lines,
                )
                .await;
                true
            }
            Some(Err(e)) => {
                self.record(format!("error: restart the receiver: {e}"), &mut lines)
                    .await;
                false
            }
            None => false,
        }
    }

    /// SECOND: the receiver accepts the writer's current generation when the
    /// writer's data descends from ours (never a stale or diverged writer's:
    /// that is the fencing).
    async fn follow_writer(&mut self) {
        let follows = match &*self.peer_rx.borrow() {
            PeerView::Seen { beat, .. } if beat.announce.role.is_writer() => matches!(
                compare(&self.meta.history, &beat.history),
                crate::generation::Relation::PeerNewer | crate::generation::Relation::InSync
            ),
            _ => false,
        };
        let generation = self.peer_generation();
        if !follows || generation.is_none() {
            return;
        }
        let shown = generation.clone();
        let mut lines = Vec::new();
        match self
            .blocking(move |_, fs, m| fs.follow_writer(m, generation.as_deref()))
            .await
        {
            Some(Ok(true)) => {
                self.record(
                    format!(
                        "receiver restarted for the writer's generation {}",
                        shown.unwrap_or_default()
                    ),
                    &mut lines,
                )
                .await
            }
            Some(Ok(false)) | None => {}
            Some(Err(e)) => {
                self.record(format!("error: restart the receiver: {e}"), &mut lines)
                    .await;
                self.handle(Event::FsFailed).await;
            }
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
        // Before the VM's state: a guest failing on the broken disk must not be
        // restarted on it.
        if let Some(FsHealth::DiskFailed(reason)) = &fs {
            let mut lines = Vec::new();
            let reason = reason.strip_prefix("local disk failed: ").unwrap_or(reason);
            self.record(format!("local disk failed: {reason}"), &mut lines)
                .await;
            self.handle(Event::DiskFailed).await;
            return;
        }
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
            Some(FsHealth::Failed(reason))
                if role == Role::Second && self.may_restart_receiver() =>
            {
                if self.restart_receiver(&reason).await {
                    return;
                }
                let mut lines = Vec::new();
                self.record(format!("vmha-fs failed: {reason}"), &mut lines)
                    .await;
                self.handle(Event::FsFailed).await;
                return;
            }
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
                if self.on_link_down().await {
                    return;
                }
            }
            Some(FsHealth::Fenced) if self.peer_follows_us() => {
                tracing::debug!(
                    module = %self.module.name,
                    "the peer's receiver accepts an older generation of ours: waiting for it"
                );
            }
            Some(FsHealth::Fenced) => {
                self.handle(Event::Fenced).await;
                return;
            }
            Some(FsHealth::Healthy | FsHealth::DiskFailed(_)) | None => {}
        }
        if role == Role::Second {
            self.follow_writer().await;
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
