//! The daemon runtime around the pure state machine: one task per module
//! feeding [`crate::state::step`] and executing its actions through the
//! drivers, one heartbeat sender, one receive task per network, a dispatcher
//! that tracks liveness, and the control socket. The daemon runs the state
//! machine; it does not decide: what it observes becomes an event (with the
//! facts the decision needs, e.g. [`Event::LinkDown`]), what is to be done
//! comes back as actions.
//!
//! Layout:
//! - this file: [`Daemon`] start and stop, the types the tasks share;
//! - `runner`: the per-module event loop (events in, `step`, publish);
//! - `actions`: executing each [`crate::state::Action`] through the drivers
//!   and reporting its outcome as events;
//! - `checks`: the checkers that poll the drivers and read the peer's latest
//!   heartbeat, turning what they see into events;
//! - `dispatch`: heartbeat sending and receiving (`PeerLiveness`), control
//!   requests routed to their module;
//! - `status`: the `status` answer;
//! - `operations`: `leave` (with its wait), `join`, `maintenance`.
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
//!   networks count once per send round. A round is handed to a module's
//!   task only when the module's beat (or its configuration match) changed;
//!   while the task's last `PeerSeen` step on the latest beat may not have
//!   been its last (it changed something, or the module's state changed
//!   since), the task repeats it once per heartbeat interval by itself — so
//!   an idle module's task is not woken by the peer's rounds at all;
//! - `PeerLost` is sent once when all networks have been silent for
//!   `failover_timeout_ms`;
//! - `StartWaitElapsed` comes `start_wait_ms` after entering WAIT and is
//!   repeated every `start_wait_ms` while the module stays WAIT;
//! - `RetryWitness` probes again [`WITNESS_RETRY`] later (doubling while it
//!   keeps failing, up to [`WITNESS_RETRY_MAX`]), if the module still
//!   wants the probe then. Every probe's outcome and errors are kept for
//!   `status` (`witness`); a probe that could not run is logged in the event
//!   log when its errors change, and with `tracing` at error level each time.
//!   The witnesses are also probed once when the daemon starts, so that a
//!   witness that cannot be probed shows before a failover needs it.
//! - `MarkPeerOutdated` completes once the peer's heartbeat shows our newer
//!   generation, or the peer is lost, or shows data that is not behind ours,
//!   or after `failover_timeout_ms` (logged), and reports
//!   `PeerMarkedOutdated { acknowledged }` (the first outcome only). The state
//!   machine then lets a PRIM's vmha-fs write alone (`WriteAlone`: SIGUSR1);
//!   otherwise its writes keep waiting for it (PeerLost, stepping down),
//!   bounded by the lock timeout. It waits on the peer's heartbeats (a
//!   channel), not by polling.
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
//! - Modules are started (`Start`) when the daemon starts, or adopted
//!   (`Adopt`) when the vmha-fs a previous vmhad started still runs
//!   ([`FsDriver::find_running`]: its process record, PID and start time, the
//!   settings its command line carries, its generation; the VM's state).
//!   What a live swap interrupted by the previous vmhad's death left is
//!   settled first: beside a writer, a migration job of the domain is
//!   aborted and waited for (the VM is here or not, never in between);
//!   elsewhere a paused incoming instance is destroyed and an orphaned
//!   standby mount stopped (never resumed: the source keeps or restarts
//!   the VM, a hand-over that came meanwhile restarts it here). A receiver
//!   accepting the generation this node's current live flip descends from
//!   is current ([`generation_is_ours`]): the destination persisted the
//!   flip before its receiver stopped, and nothing was written under it.
//!   Beside a writer, a domain paused by request while [`RESUME_PENDING`]
//!   exists (the destination's vmhad died between activating the standby
//!   and resuming the VM) is reported `paused_for_swap`: an adopted writer
//!   resumes it; a domain paused otherwise (by an operator) stays paused.
//! - A live migration (`MigrateVm`) runs in the background
//!   ([`live::Migration`]): the module task handles heartbeats, the link's
//!   health and requests meanwhile, and `AbortMigration` ends it at once;
//!   the VM checker is paused while it runs.
//! - SIGTERM and SIGINT end vmhad alone ([`Daemon::shutdown`]): nothing is
//!   stopped, vmha-fs and the VMs run on; [`Daemon::kill`] simulates a crash
//!   (tasks aborted, nothing stopped, the socket file left).
//! - All networks silent for the failover timeout while the module's
//!   replication link is alive ([`FsDriver::data_path_alive`]: the receiver
//!   heard its writer within the failover timeout; the writer's link is
//!   connected) feeds `ControllerLost` instead of `PeerLost` to a PRIM or
//!   SECOND; the checker then feeds `DataPathLost` once the link is silent
//!   too. A peer never heard since this daemon started counts as silent from
//!   the start (an adopted module must be able to lose it).
//! - A module added by a reload (`reload.rs`) is not started (STOP until
//!   `vmctl start`). The configuration
//!   and the module list change at a reload, so the tasks read them through
//!   `Shared::config` and `Shared::modules` each time.
//! - A node that left
//!   (`state_dir/left.json`, see [`crate::leave`]) starts them left, so that
//!   `Start` is refused until `vmctl join`. `leave`, `join` and `maintenance`
//!   are node-wide requests sent to every module at once (`operations`).
//! - In maintenance the checkers keep polling and report as usual (the state
//!   machine holds the reaction back and logs it once); their own per-check
//!   event-log lines (disk failed, nothing mounted) are left out meanwhile.
//! - A module the peer does not announce at all is treated as if the peer were
//!   not seen for it (its status shows `module_config_match: false`).
//! - Replication link down (vmha-fs reports its link lost, stalled or failed)
//!   feeds `LinkDown` with: `heartbeats_fresh` (the peer's last round within 3
//!   intervals, and the dispatcher observing without a stall of its own for
//!   the failover timeout), `peer_is_second` (its latest heartbeat shows a
//!   SECOND with our data or an older state of it), `peer_knows_outdated`;
//!   not within 1 s of a `WriteAlone` (vmha-fs has not published its new
//!   state yet). The state machine decides (see `state.rs`).
//! - "Fenced" from vmha-fs feeds `Fenced { peer_follows_us }` (the peer's
//!   heartbeat shows our data or an older state of it); a SECOND restarts its
//!   receiver for the writer's current generation when the writer's data
//!   descends from its own ([`crate::driver::FsDriver::follow_writer`]).
//! - vmha-fs failing feeds `FsDied { now_ms, reason }` (`now_ms` since the
//!   daemon started); `RestartReceiver` remounts a SECOND's receiver
//!   accepting the writer's generation, a failure is `FsFailed`.
//! - `MountWriterConnected` that fails aborts the step and feeds
//!   `ConnectedMountFailed` first (the state machine then starts alone once
//!   the SECOND knows it is outdated). `AttachPeer` is SIGUSR2 through
//!   [`crate::driver::FsDriver::attach_peer`]; the checker follows the copy
//!   (progress in the heartbeats) and feeds `AttachFailed` when the attach or
//!   the copy failed, or the attach left no trace for 6 s; `RetryAttach`
//!   feeds `AttachRetryDue` after the attach back-off ([`ATTACH_RETRY`],
//!   doubling up to 60 s, reset once an attach works or the episode ends).
//! - `MountReceiver` that fails aborts the step and feeds `ReceiverFailed`
//!   first; `RetryReceiver` feeds `ReceiverRetryDue` after the receiver
//!   back-off (1 s doubling up to 60 s). A failing series is logged once: a
//!   retry's lines reach the event log only if it works (`Runner::quiet`).
//! - The checkers poll the drivers once per heartbeat interval (the VM's
//!   state from libvirt, vmha-fs's status files): observing only, every
//!   decision they lead to is an event.

mod actions;
mod check_pass;
mod checks;
mod dispatch;
mod live;
mod operations;
mod reload;
mod runner;
mod status;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use vmha_fs::key::ClusterKey;

use self::dispatch::{dispatch, send_heartbeats, serve_calls};
pub use self::runner::ATTACH_RETRY;
use self::runner::{ResyncRate, Runner, RECEIVER_RETRY_FIRST, RETRY_MAX};
use self::status::build_status;
use crate::backoff::Backoff;
use crate::clock::WallClock;
use crate::config::{Config, Digest, KeyDigests, Module, NodeIndex, Witness};
use crate::control::{self, Call, ControlError, Request, Response};
use crate::driver::{FsDriver, VmDriver};
use crate::eventlog::EventLog;
use crate::generation::{GenerationError, History, Metadata};
use crate::heartbeat::{Endpoint, EndpointSpec, HeartbeatError, Liveness, ModuleBeat, Rejections};
use crate::state::{Announce, Event, Found, ModuleState, Policy, WitnessOutcome};
use crate::status::{ResyncStatus, Status};
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
    #[error(transparent)]
    Leave(#[from] crate::leave::LeaveError),
    #[error(transparent)]
    Channel(#[from] crate::channel::ChannelError),
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
    /// When the module entered its present role.
    since: Instant,
    history: History,
    changed_bytes: u64,
    resync: Option<ResyncStatus>,
    /// The peer's controller is down while its data path is alive.
    peer_controller_down: bool,
    /// The last live swap started here: its number and, when it failed, why.
    live_outcome: (u32, Option<String>),
    /// The module's first event (`Start` or `Adopt`) was handled: until then
    /// it is not in our heartbeats (its initial STOP would make a SECOND take
    /// over a writer that is about to be adopted).
    announced: bool,
}

/// When the peer's heartbeats last carried a module's beat: set by the
/// dispatcher at every round, read by the module task's checkers. Apart from
/// [`PeerView`] because a round that changes nothing for the module must not
/// wake its task (32 modules × 5 rounds a second on an idle node).
type HeardAt = Arc<Mutex<Option<Instant>>>;

/// The peer as the dispatcher last saw it, for one module. Changed (and the
/// module's task woken) only when the module's beat or its configuration
/// match changes, the peer is lost, or it is seen again.
#[derive(Debug, Clone)]
enum PeerView {
    Unknown,
    Seen {
        beat: Arc<ModuleBeat>,
        config_match: bool,
    },
    Lost,
}

#[derive(Debug)]
enum ModuleCommand {
    /// An event caused by vmhad itself.
    #[allow(dead_code)]
    Event(Event, oneshot::Sender<Vec<String>>),
    /// An event with what caused it, for the event log ("vmctl stop by
    /// root (uid 0)", "vmhad start"); plain `Event` says "vmhad".
    Caused(Event, String, oneshot::Sender<Vec<String>>),
    /// A reload changed this module's settings: use them from now on.
    Reconfigure(Box<runner::Settings>, oneshot::Sender<()>),
    /// `vmctl verify`: compare the peer's copy, report only.
    Verify(oneshot::Sender<Result<Vec<String>, String>>),
}

/// What happened to a module since the daemon started, counted by its task
/// for `/metrics` (see `crate::web::metrics`).
#[derive(Debug, Default)]
pub struct ModuleCounters {
    /// This node took the module over from a lost peer (SECOND → ALONE).
    pub failovers: AtomicU64,
    /// Heartbeats showed a split brain (counted once per episode).
    pub split_brains: AtomicU64,
    /// A checker reported a failure: the VM stopped unexpectedly or failed
    /// to start, vmha-fs failed or died, the local disk failed.
    pub checker_failures: AtomicU64,
    /// The last `PeerSeen` was a split brain (for counting episodes).
    in_split_brain: std::sync::atomic::AtomicBool,
}

impl ModuleCounters {
    /// Counts what `event` and the role change `before` → `after` mean.
    fn count(&self, event: &Event, before: crate::state::Role, after: crate::state::Role) {
        use crate::state::Role;
        match event {
            Event::PeerSeen { peer, .. } => {
                let split = peer.relation == crate::generation::Relation::SplitBrain;
                if split && !self.in_split_brain.swap(true, Ordering::Relaxed) {
                    self.split_brains.fetch_add(1, Ordering::Relaxed);
                } else if !split {
                    self.in_split_brain.store(false, Ordering::Relaxed);
                }
            }
            Event::VmStopped { .. }
            | Event::VmStartFailed { .. }
            | Event::FsFailed
            | Event::DiskFailed
            | Event::FsDied { .. } => {
                self.checker_failures.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        if before == Role::Second && after == Role::Alone {
            self.failovers.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A module as the shared tasks see it. Immutable: a reload that changes
/// the module's settings replaces the handle (same channels, same task).
#[derive(Debug)]
struct ModuleHandle {
    module: Module,
    module_hash: Option<Digest>,
    /// [`Config::module_key_digests`], for the heartbeats.
    keys: KeyDigests,
    commands: mpsc::Sender<ModuleCommand>,
    view: watch::Receiver<ModuleView>,
    peer: Arc<watch::Sender<PeerView>>,
    /// When the peer last carried this module's beat.
    heard: HeardAt,
    log: Arc<EventLog>,
    counters: Arc<ModuleCounters>,
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
    modules: HashMap<String, Arc<ModuleBeat>>,
    /// Per module: the role the peer announces and since when we see it.
    role_since: HashMap<String, (crate::state::Role, Instant)>,
    /// The peer's per-key cluster digests, from its latest heartbeat.
    config_keys: KeyDigests,
    /// The differing keys last written to each module's event log.
    differences_logged: HashMap<String, Vec<String>>,
    /// Our configuration hash when the differences were last computed: they
    /// are computed again only when it or the peer's key digests change.
    differences_for: Option<Digest>,
    /// The peer's vmhad version (heartbeat version 3 on).
    software: Option<String>,
}

/// What the tasks share. The configuration and the module list change at a
/// reload (`reload.rs`): readers take a snapshot ([`Shared::config`],
/// [`Shared::modules`]) and never hold the lock across an await.
#[derive(Debug)]
struct Shared {
    config: RwLock<Arc<Config>>,
    node: NodeIndex,
    modules: RwLock<Vec<Arc<ModuleHandle>>>,
    peer: Mutex<PeerLiveness>,
    witness: WitnessSlot,
    /// Heartbeat datagrams rejected, by kind (for `status`).
    rejections: Rejections,
    /// Heartbeat versions: ours, the peer's, in use (for `status`).
    heartbeat_versions: crate::heartbeat::VersionView,
    /// What building a module's task needs (at start and at a reload).
    factory: Factory,
    /// Each module's task, by name (aborted by [`Daemon::kill`]).
    module_tasks: Mutex<HashMap<String, JoinHandle<()>>>,
    /// One reload at a time.
    reloading: tokio::sync::Mutex<()>,
    /// The file vmhad was started with (what `reload` re-reads).
    config_path: Mutex<Option<PathBuf>>,
}

/// Everything needed to build a module's task besides its configuration.
#[derive(Debug, Clone)]
struct Factory {
    vm: Arc<dyn VmDriver>,
    fs: Arc<dyn FsDriver>,
    clock: WallClock,
    started: Instant,
    judging_since: Arc<Mutex<Instant>>,
    witness_slot: WitnessSlot,
    shutdown: watch::Receiver<bool>,
    /// The node left the cluster (`vmctl leave`): modules built now, at start
    /// or added by a reload, start left too.
    left: Arc<std::sync::atomic::AtomicBool>,
    /// The cluster key (a live swap's forwarded libvirt rides the channel).
    key: ClusterKey,
    /// The node's check pass (every module's checkers, one timer).
    checks: check_pass::CheckPass,
}

impl Factory {
    /// Loads the module's metadata and builds its task (not spawned) and
    /// its handle.
    async fn build(
        &self,
        config: &Config,
        module: &Module,
        node: NodeIndex,
        // In heartbeats from the start: a module added by a reload is STOP
        // in truth; at daemon start a module is announced only once its
        // first `Start` or `Adopt` was handled (a previous vmhad's module may
        // still run).
        announced: bool,
    ) -> Result<(Runner, mpsc::Receiver<ModuleCommand>, ModuleHandle), DaemonError> {
        let cluster = &config.cluster;
        let state_dir = cluster.state_dir.clone();
        let name = module.name.clone();
        let meta = tokio::task::spawn_blocking(move || Metadata::load(&state_dir, &name))
            .await
            .map_err(|e| DaemonError::Task(e.to_string()))?
            .map_err(|source| DaemonError::Generation {
                module: module.name.clone(),
                source,
            })?;
        let policy = Policy::new(config, module, node);
        let state = ModuleState::new(
            policy,
            meta.history.current().is_some(),
            meta.peer_may_be_newer,
        )
        .with_self_outdated(meta.self_outdated)
        .with_maintenance(meta.maintenance)
        .with_left(self.left.load(std::sync::atomic::Ordering::SeqCst));
        let log = Arc::new(EventLog::with_clock(
            &cluster.state_dir,
            &module.name,
            self.clock.clone(),
        ));
        let (view_tx, view_rx) = watch::channel(ModuleView {
            announce: state.announce(),
            since: Instant::now(),
            history: meta.history.clone(),
            changed_bytes: 0,
            resync: None,
            peer_controller_down: false,
            live_outcome: (0, None),
            announced,
        });
        let (peer_tx, peer_rx) = watch::channel(PeerView::Unknown);
        let (cmd_tx, cmd_rx) = mpsc::channel(16);
        let counters = Arc::new(ModuleCounters::default());
        let heard: HeardAt = Arc::new(Mutex::new(None));
        let handle = ModuleHandle {
            module: module.clone(),
            module_hash: config.module_hash(&module.name),
            keys: config
                .module_key_digests(&module.name)
                .cloned()
                .unwrap_or_default(),
            commands: cmd_tx,
            view: view_rx,
            peer: Arc::new(peer_tx),
            heard: Arc::clone(&heard),
            log: Arc::clone(&log),
            counters: Arc::clone(&counters),
        };
        let runner = Runner {
            module: module.clone(),
            state,
            meta,
            state_dir: cluster.state_dir.clone(),
            vm: Arc::clone(&self.vm),
            fs: Arc::clone(&self.fs),
            log,
            view: view_tx,
            peer_rx,
            last_beat: None,
            peer_heard: heard,
            idle_peer_seen: None,
            peer_seen_again: None,
            heartbeat_interval: Duration::from_millis(cluster.heartbeat_interval_ms),
            peer_lost_sent: false,
            started: self.started,
            start_wait: None,
            start_wait_ms: cluster.start_wait_ms,
            failover_timeout: Duration::from_millis(cluster.failover_timeout_ms),
            witnesses: cluster.witness.clone(),
            witness_slot: Arc::clone(&self.witness_slot),
            witness_retry: None,
            witness_errors_logged: None,
            changed_bytes: 0,
            resync_rate: ResyncRate::default(),
            resync_unsupported_logged: false,
            attached_at: None,
            attach_retry: None,
            attach_unsupported: false,
            writer_sync: None,
            went_alone: None,
            judging_since: Arc::clone(&self.judging_since),
            xml_refresh_failed: false,
            cause: "vmhad".into(),
            quiet: Mutex::new(None),
            receiver_retry: None,
            receiver_backoff: Backoff::new(RECEIVER_RETRY_FIRST, RETRY_MAX),
            attach_backoff: Backoff::new(ATTACH_RETRY, RETRY_MAX),
            witness_backoff: Backoff::new(WITNESS_RETRY, WITNESS_RETRY_MAX),
            announced,
            counters,
            live_target: live::LiveTarget::of(config, module, node, &self.key),
            migration: None,
            checks: self.checks.clone(),
            check_slot: self.checks.register(module),
            check_epoch: 0,
        };
        Ok((runner, cmd_rx, handle))
    }

    /// Runs a module's task.
    fn spawn(&self, runner: Runner, commands: mpsc::Receiver<ModuleCommand>) -> JoinHandle<()> {
        tokio::spawn(runner.run(commands, self.shutdown.clone()))
    }
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
/// The longest pause between two probes that could not run (the probe is
/// what a failover waits for: the pause stays short).
pub const WITNESS_RETRY_MAX: Duration = Duration::from_secs(10);

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

    /// The configuration in effect.
    fn config(&self) -> Arc<Config> {
        Arc::clone(&self.config.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The modules in effect, in configuration order.
    fn modules(&self) -> Vec<Arc<ModuleHandle>> {
        self.modules
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
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
    /// The daemon channel's listener (`crate::channel`).
    channel: Arc<crate::channel::Server>,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The first event of a module at daemon start: [`Event::Adopt`] when a
/// previous vmhad's vmha-fs still runs for it (the facts the state machine
/// decides on), else [`Event::Start`].
async fn find_running(
    vm: &Arc<dyn VmDriver>,
    fs: &Arc<dyn FsDriver>,
    module: &Module,
    history: &History,
    state_dir: &Path,
    log: &mut Vec<String>,
) -> Event {
    let (vm, fs, m) = (Arc::clone(vm), Arc::clone(fs), module.clone());
    let pending = resume_pending_path(state_dir, &module.name);
    let found = tokio::task::spawn_blocking(move || {
        let found = fs.find_running(&m);
        let mut lines = Vec::new();
        let writer = matches!(&found, Ok(Some(f)) if f.writer);
        if writer {
            // A live swap's source whose vmhad died mid-migration: the
            // migration ends now (failed, the VM running here, or done, the
            // VM gone), so the decision below sees where the VM is.
            settle_migration(vm.as_ref(), &m, &mut lines);
        } else {
            // A live swap's destination whose vmhad died mid-way: its
            // paused incoming instance never runs here (the PRIM keeps or
            // restarts the VM; a swap handed over meanwhile restarts it
            // here), and the standby mount goes, after it.
            drop_live_leftovers(
                vm.as_ref(),
                fs.as_ref(),
                &m,
                matches!(&found, Ok(Some(f)) if !f.writer),
                &mut lines,
            );
        }
        // A live swap's destination whose vmhad died between activating the
        // standby and resuming the VM: the domain is paused for the swap.
        let resume_pending = pending.exists();
        if resume_pending {
            if let Err(e) = std::fs::remove_file(&pending) {
                lines.push(format!("error: clear {}: {e}", pending.display()));
            }
        }
        let paused_for_swap = writer
            && resume_pending
            && matches!(vm.paused(&m), Ok(Some(crate::driver::Paused::User)));
        let vm_running = writer
            && vm.state(&m).is_ok_and(|s| {
                s == crate::driver::VmState::Running || s == crate::driver::VmState::Paused
            });
        (found, (vm_running, paused_for_swap), lines)
    })
    .await;
    let found = match found {
        Ok((found, vm, lines)) => {
            for line in lines {
                tracing::warn!(module = %module.name, "{line}");
                log.push(line);
            }
            Ok((found, vm))
        }
        Err(e) => Err(e),
    };
    match found {
        Ok((Ok(Some(f)), (vm_running, paused_for_swap))) => {
            let generation_current = f
                .generation
                .as_deref()
                .is_some_and(|g| generation_is_ours(history, f.writer, g));
            // Current without being the current generation: the flip's parent.
            if !f.writer
                && generation_current
                && history.current().map(|g| g.to_string()) != f.generation
            {
                let line = "the receiver accepts the generation this node's live flip descends \
                     from (vmhad restarted during a live swap's hand-over): up to date, the \
                     hand-over goes on";
                tracing::info!(module = %module.name, "{line}");
                log.push(line.to_string());
            }
            tracing::info!(
                module = %module.name,
                writer = f.writer,
                settings_match = f.settings_match,
                generation_current,
                vm_running,
                paused_for_swap,
                "found the vmha-fs a previous vmhad started"
            );
            Event::Adopt(Found {
                writer: f.writer,
                settings_match: f.settings_match,
                generation_current,
                alone: f.alone,
                vm_running,
                paused_for_swap,
            })
        }
        Ok((Ok(None), _)) => Event::Start,
        Ok((Err(e), _)) => {
            tracing::warn!(module = %module.name, error = %e, "looking for a running vmha-fs");
            Event::Start
        }
        Err(e) => {
            tracing::warn!(module = %module.name, error = %e, "looking for a running vmha-fs");
            Event::Start
        }
    }
}

/// Whether the generation a previous vmhad's vmha-fs claims (`writer`) or
/// accepts (receiver) stands for this node's current data
/// ([`Found::generation_current`]). A writer keeps the generation it started
/// with until it attaches the peer (going ALONE persists a new one without
/// restarting it): any generation of this node's line is ours. A receiver
/// holds the current data when it accepts the current generation, or the one
/// a current live flip descends from: a live swap's destination persists the
/// flip (`AdoptFlip`) before its receiver stops for the standby's activation,
/// and nothing is written under the flip before that
/// ([`crate::generation::receiver_holds_current`]). Without the latter a
/// vmhad restarted between the two took its copy for outdated and the VM
/// restarted on the old PRIM.
fn generation_is_ours(history: &History, writer: bool, generation: &str) -> bool {
    let is = |id: &crate::generation::GenerationId| id.to_string() == generation;
    if writer {
        history.current().iter().chain(history.previous()).any(is)
    } else {
        history
            .current()
            .iter()
            .chain(history.previous().first())
            .find(|id| is(id))
            .is_some_and(|id| crate::generation::receiver_holds_current(history, *id))
    }
}

/// In `<state_dir>/<module>/` from a live swap's standby activation until
/// the migrated VM resumed (or the standby was dropped): a vmhad started in
/// between knows the writer's paused domain is paused for the swap, not by
/// an operator ([`Found::paused_for_swap`]), and resumes it.
pub const RESUME_PENDING: &str = "resume-pending";

fn resume_pending_path(state_dir: &Path, module: &str) -> PathBuf {
    state_dir.join(module).join(RESUME_PENDING)
}

/// How long a restarted vmhad waits for an aborted migration of the
/// domain to end (the domain paused for it) before deciding on it.
const MIGRATION_SETTLE: Duration = Duration::from_secs(15);

/// At daemon start on a writer's node: aborts a live migration of the
/// domain that a killed vmhad left running (its forwarded connection died
/// with it, so it fails anyway) and waits until the domain is no longer
/// paused for it.
fn settle_migration(vm: &dyn VmDriver, module: &Module, lines: &mut Vec<String>) {
    if vm.abort_migration(module).is_err() {
        // No libvirt job API (the fake driver) or no domain: nothing runs.
        return;
    }
    let deadline = Instant::now() + MIGRATION_SETTLE;
    let mut waited = false;
    while matches!(
        vm.paused(module),
        Ok(Some(crate::driver::Paused::IncomingMigration))
    ) {
        if Instant::now() >= deadline {
            lines.push(format!(
                "the VM is still paused for a migration after {} s",
                MIGRATION_SETTLE.as_secs()
            ));
            return;
        }
        waited = true;
        std::thread::sleep(Duration::from_millis(200));
    }
    if waited {
        lines.push(
            "a live migration a previous vmhad left running was aborted (vmhad restarted mid-way)"
                .into(),
        );
    }
}

/// At daemon start on a node that is not the writer: destroys a paused
/// incoming instance of the domain (only beside a receiver: a live swap's
/// destination) and stops a standby mount a previous vmhad left.
fn drop_live_leftovers(
    vm: &dyn VmDriver,
    fs: &dyn FsDriver,
    module: &Module,
    receiver: bool,
    lines: &mut Vec<String>,
) {
    let paused = vm.paused(module);
    let incoming = match paused {
        Ok(Some(crate::driver::Paused::IncomingMigration)) => true,
        Ok(Some(_)) => receiver,
        Ok(None) | Err(_) => false,
    };
    if incoming {
        match vm.stop(module) {
            Ok(()) => lines.push(
                "destroyed the paused incoming VM a live swap left (vmhad restarted mid-way)"
                    .into(),
            ),
            Err(e) => lines.push(format!(
                "error: destroy the paused incoming VM a live swap left: {e}"
            )),
        }
    }
    match fs.drop_orphan_standby(module) {
        Ok(0) => {}
        Ok(n) => lines.push(format!(
            "stopped the standby mount a live swap left ({n} directories; vmhad restarted mid-way)"
        )),
        Err(e) => lines.push(format!(
            "error: stop the standby mount a live swap left: {e}"
        )),
    }
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
        let left = {
            let dir = cluster.state_dir.clone();
            tokio::task::spawn_blocking(move || {
                let boot = crate::leave::current_boot_id();
                if let Err(e) = &boot {
                    tracing::warn!("{e}: a leave at shutdown is taken as still in effect");
                }
                crate::leave::load(&dir, boot.ok().as_deref())
            })
            .await
            .map_err(|e| DaemonError::Task(e.to_string()))??
        };
        let left = match left {
            crate::leave::Leave::In => false,
            crate::leave::Leave::EndedAtBoot => {
                tracing::info!("the leave done at the last shutdown ended with the reboot");
                false
            }
            crate::leave::Leave::Out { until_boot } => {
                tracing::warn!(
                    until_boot,
                    "this node left the cluster: no module starts until `vmctl join`"
                );
                true
            }
        };

        let factory = Factory {
            vm: Arc::clone(&spec.vm),
            fs: Arc::clone(&spec.fs),
            clock: spec.clock.clone(),
            started,
            judging_since: Arc::clone(&judging_since),
            witness_slot: Arc::clone(&witness_slot),
            shutdown: shutdown_rx.clone(),
            left: Arc::new(std::sync::atomic::AtomicBool::new(left)),
            key: spec.key.clone(),
            checks: check_pass::CheckPass::new(runner::check_period(Duration::from_millis(
                config.cluster.heartbeat_interval_ms,
            ))),
        };
        let mut first_events = Vec::new();
        for module in &config.modules {
            let (runner, commands, handle) = factory.build(&config, module, node, false).await?;
            let mut lines = Vec::new();
            first_events.push(
                find_running(
                    &spec.vm,
                    &spec.fs,
                    module,
                    &runner.meta.history,
                    &cluster.state_dir,
                    &mut lines,
                )
                .await,
            );
            for line in lines {
                runner.append_log(&format!("[vmhad start] {line}"));
            }
            handles.push(Arc::new(handle));
            runners.push((runner, commands));
        }

        let local = config.node(node);
        let peer = config.node(node.peer());
        // The control socket first: a second vmhad is told "already running",
        // not that the heartbeat port is in use.
        let server = control::Server::bind(&cluster.control_socket)?;
        let socket = server.path().to_path_buf();
        let endpoint = match Endpoint::bind(
            EndpointSpec {
                local: local.addresses.clone(),
                port: cluster.heartbeat_port,
                peer: peer.addresses.clone(),
                peer_port: cluster.heartbeat_port,
                peer_name: peer.name.clone(),
            },
            &spec.key,
        )
        .await
        {
            Ok(endpoint) => endpoint,
            Err(e) => {
                drop(server);
                let _ = std::fs::remove_file(&socket);
                return Err(e.into());
            }
        };

        let shared = Arc::new(Shared {
            peer: Mutex::new(PeerLiveness {
                networks: Liveness::new(endpoint.networks()),
                lost: false,
                config_hash: None,
                last_round: None,
                modules: HashMap::new(),
                role_since: HashMap::new(),
                config_keys: KeyDigests::new(),
                differences_logged: HashMap::new(),
                differences_for: None,
                software: None,
            }),
            rejections: endpoint.rejections(),
            heartbeat_versions: endpoint.version_view(),
            config: RwLock::new(Arc::new(config.clone())),
            node,
            modules: RwLock::new(handles),
            witness: Arc::clone(&witness_slot),
            factory,
            module_tasks: Mutex::new(HashMap::new()),
            reloading: tokio::sync::Mutex::new(()),
            config_path: Mutex::new(None),
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

        tasks.push(tokio::spawn(shared.factory.checks.clone().run(
            Arc::clone(&spec.vm),
            Arc::clone(&spec.fs),
            shutdown_rx.clone(),
        )));
        for (runner, commands) in runners {
            let name = runner.module.name.clone();
            let task = shared.factory.spawn(runner, commands);
            shared
                .module_tasks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name, task);
        }
        let (in_tx, in_rx) = mpsc::channel(256);
        // The whole heartbeat path (receive, judge, send) on the heartbeat
        // runtime: never queued behind module work (`heartbeat` module docs).
        let heartbeat_runtime = endpoint.runtime().clone();
        tasks.extend(endpoint.spawn_receivers(in_tx));
        tasks.push(heartbeat_runtime.spawn(dispatch(
            Arc::clone(&shared),
            in_rx,
            shutdown_rx.clone(),
            judging_since,
        )));
        tasks.push(heartbeat_runtime.spawn(send_heartbeats(
            Arc::clone(&shared),
            endpoint,
            shutdown_rx.clone(),
        )));
        let (calls_tx, calls_rx) = mpsc::channel(32);
        tasks.push(server.spawn(calls_tx.clone(), shutdown_rx.clone()));
        tasks.push(tokio::spawn(serve_calls(Arc::clone(&shared), calls_rx)));
        // The peer's requests go through the same queue as the control socket's.
        let channel = crate::channel::Server::spawn(
            &local.addresses,
            cluster.channel_port,
            &spec.key,
            Arc::new(
                crate::channel::CallHandler::new(calls_tx.clone()).with_daemon(
                    DaemonHandle {
                        shared: Arc::clone(&shared),
                        calls: calls_tx.clone(),
                    },
                    tokio::runtime::Handle::current(),
                ),
            ),
        )?;

        // Started before this returns: `status` right after start shows each
        // module's first state (WAIT), never the STOP it had before `start`.
        let mut started = Vec::new();
        for (handle, first) in shared.modules().into_iter().zip(first_events) {
            let (reply, done) = oneshot::channel();
            let _ = handle
                .commands
                .send(ModuleCommand::Caused(first, "vmhad start".into(), reply))
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
        tracing::info!(node = %local.name, modules = shared.modules().len(), "vmhad started");
        Ok(Daemon {
            shared,
            shutdown,
            tasks,
            calls: calls_tx,
            socket,
            channel: Arc::new(channel),
        })
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The configuration file this daemon was started with: what `reload`
    /// (SIGHUP, `vmctl reload`) re-reads. Without it, `reload` is refused.
    pub fn set_config_file(&self, path: &Path) {
        *self
            .shared
            .config_path
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(path.to_path_buf());
    }

    /// Re-reads the configuration file and applies it (see `reload.rs`):
    /// the lines say what changed, or every reason nothing did.
    pub async fn reload(&self) -> Response {
        reload::reload_file(&self.shared).await
    }

    /// Answers a request in-process, as the control socket would.
    pub async fn request(&self, request: Request) -> Response {
        let (reply, answer) = oneshot::channel();
        let call = Call {
            request,
            reply,
            caller: None,
        };
        if self.calls.send(call).await.is_err() {
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

    /// A cheap handle for other tasks (the web console): status, requests,
    /// counters and event logs, valid while the daemon runs.
    pub fn handle(&self) -> DaemonHandle {
        DaemonHandle {
            shared: Arc::clone(&self.shared),
            calls: self.calls.clone(),
        }
    }

    /// Ends this vmhad alone (SIGTERM, SIGINT): every module's vmha-fs and VM
    /// keep running, for the next vmhad to adopt; the peer sees this
    /// controller go quiet while its data path stays alive, and fails nothing
    /// over. `why` goes to each module's event log. Handing a module over is
    /// `vmctl stop` (or leaving the node), not this.
    pub async fn shutdown(self, why: &str) {
        for handle in self.shared.modules() {
            let line = format!(
                "vmhad stopping ({why}): the module's vmha-fs and VM keep running (was {})",
                handle.view.borrow().announce.role
            );
            tracing::info!(module = %handle.module.name, "{line}");
            let log = Arc::clone(&handle.log);
            let _ = tokio::task::spawn_blocking(move || log.append(&line)).await;
        }
        let channel = Arc::clone(&self.channel);
        let _ = tokio::task::spawn_blocking(move || channel.stop()).await;
        let _ = self.shutdown.send(true);
        for task in self
            .tasks
            .into_iter()
            .chain(take_module_tasks(&self.shared))
        {
            task.abort();
            let _ = task.await;
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    /// A crash: every task stops at once; nothing is stopped or unmounted and
    /// the control socket file stays behind.
    pub async fn kill(self) {
        let channel = Arc::clone(&self.channel);
        let _ = tokio::task::spawn_blocking(move || channel.stop()).await;
        let tasks: Vec<_> = self
            .tasks
            .into_iter()
            .chain(take_module_tasks(&self.shared))
            .collect();
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            let _ = task.await;
        }
    }
}

/// What the web console needs of the daemon (see [`Daemon::handle`]).
#[derive(Debug, Clone)]
pub struct DaemonHandle {
    shared: Arc<Shared>,
    calls: mpsc::Sender<Call>,
}

/// A snapshot of one module's [`ModuleCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterValues {
    pub failovers: u64,
    pub split_brains: u64,
    pub checker_failures: u64,
}

impl DaemonHandle {
    /// The `status` answer.
    pub fn status(&self) -> Status {
        build_status(&self.shared)
    }

    /// Answers a request as the control socket would. `who` (e.g.
    /// `web:admin from 10.0.0.5:51234`) is written to the module's event log
    /// (every module's for node-wide requests) with the request, and the
    /// outcome after it.
    pub async fn request_as(&self, request: Request, who: &str) -> Response {
        let what = serde_json::to_string(&request).unwrap_or_default();
        let logs = self.logs_for(&request);
        let first = format!("{who} asked {what}");
        tracing::info!("{first}");
        let append = |logs: Vec<Arc<EventLog>>, line: String| async move {
            let _ = tokio::task::spawn_blocking(move || {
                for log in logs {
                    if let Err(e) = log.append(&line) {
                        tracing::warn!("{e}");
                    }
                }
            })
            .await;
        };
        append(logs.clone(), first).await;
        let (reply, answer) = oneshot::channel();
        // Not a local process: the cause names the principal itself.
        let caller = Some(crate::control::Caller::Named(who.to_string()));
        let call = Call {
            request,
            reply,
            caller,
        };
        let response = if self.calls.send(call).await.is_err() {
            Response::error("vmhad is shutting down")
        } else {
            answer
                .await
                .unwrap_or_else(|_| Response::error("vmhad is shutting down"))
        };
        let outcome = match (&response.ok, &response.error) {
            (true, _) => format!("{who}: done"),
            (false, e) => format!("{who}: refused: {}", e.clone().unwrap_or_default()),
        };
        append(logs, outcome).await;
        response
    }

    /// Writes `line` to `module`'s event log (every module's when `None`).
    pub async fn log_event(&self, module: Option<&str>, line: String) {
        tracing::info!("{line}");
        let logs: Vec<Arc<EventLog>> = self
            .shared
            .modules()
            .iter()
            .filter(|h| module.is_none_or(|m| m == h.module.name))
            .map(|h| Arc::clone(&h.log))
            .collect();
        let _ = tokio::task::spawn_blocking(move || {
            for log in logs {
                if let Err(e) = log.append(&line) {
                    tracing::warn!("{e}");
                }
            }
        })
        .await;
    }

    fn logs_for(&self, request: &Request) -> Vec<Arc<EventLog>> {
        let module = match request {
            Request::Start { module }
            | Request::Stop { module }
            | Request::Swap { module, .. }
            | Request::Prim { module }
            | Request::Verify { module }
            | Request::Maintenance { module, .. } => module.clone(),
            _ => None,
        };
        self.shared
            .modules()
            .iter()
            .filter(|h| module.as_deref().is_none_or(|m| m == h.module.name))
            .map(|h| Arc::clone(&h.log))
            .collect()
    }

    /// The configuration file this daemon was started with, if known.
    pub fn config_file(&self) -> Option<PathBuf> {
        self.shared
            .config_path
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The latest event-log lines of a module (oldest first), if it exists.
    pub fn log_lines(&self, module: &str) -> Option<Vec<String>> {
        self.shared
            .modules()
            .iter()
            .find(|h| h.module.name == module)
            .map(|h| h.log.lines())
    }

    /// Each module's counters, in configuration order.
    pub fn counters(&self) -> Vec<(String, CounterValues)> {
        self.shared
            .modules()
            .iter()
            .map(|h| {
                let c = &h.counters;
                (
                    h.module.name.clone(),
                    CounterValues {
                        failovers: c.failovers.load(Ordering::Relaxed),
                        split_brains: c.split_brains.load(Ordering::Relaxed),
                        checker_failures: c.checker_failures.load(Ordering::Relaxed),
                    },
                )
            })
            .collect()
    }

    /// The vmha-fs counters of each module whose writer runs on this node
    /// (`metrics.json`, for `/metrics`).
    pub fn fs_metrics(&self) -> Vec<(String, ::vmha_fs::status::FsMetrics)> {
        self.shared
            .modules()
            .iter()
            .filter_map(|h| {
                let m = self.shared.factory.fs.fs_metrics(&h.module)?;
                Some((h.module.name.clone(), m))
            })
            .collect()
    }

    /// The configuration in effect.
    pub fn config(&self) -> Arc<Config> {
        self.shared.config()
    }

    /// This node.
    pub fn node(&self) -> NodeIndex {
        self.shared.node
    }
}

fn take_module_tasks(shared: &Shared) -> Vec<JoinHandle<()>> {
    shared
        .module_tasks
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain()
        .map(|(_, task)| task)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::generation_is_ours;
    use crate::generation::{GenerationId, History};

    /// The start-up decision of a restarted vmhad: what the vmha-fs it finds
    /// running claims or accepts, against this node's persisted history.
    #[test]
    fn a_receiver_at_the_parent_of_the_adopted_flip_is_ours() {
        let (old, g) = (GenerationId(3), GenerationId(7));
        let mut base = History::empty();
        base.push(old);
        base.push(g);
        let hex = |id: GenerationId| id.to_string();
        // In sync at G: a receiver accepting G is current, one at an older
        // generation is behind; a writer may claim any of this node's line.
        assert!(generation_is_ours(&base, false, &hex(g)));
        assert!(!generation_is_ours(&base, false, &hex(old)));
        assert!(generation_is_ours(&base, true, &hex(old)));
        assert!(!generation_is_ours(&base, true, &hex(GenerationId(9))));
        // The live swap's destination adopted the flip G' of G, then its
        // vmhad died before the receiver (accepting G) stopped: ours.
        let mut adopted = base.clone();
        let mut peer = base.clone();
        let flip = peer.start_flip();
        assert!(adopted.adopt_flip(&peer));
        assert_eq!(adopted.current(), flip);
        assert!(generation_is_ours(&adopted, false, &hex(g)));
        assert!(flip.is_some_and(|f| generation_is_ours(&adopted, false, &hex(f))));
        // Two generations back is still behind.
        assert!(!generation_is_ours(&adopted, false, &hex(old)));
        // A plain (random) new generation on top of G is no flip: a receiver
        // still at G is behind it.
        let mut moved = base.clone();
        moved.push(GenerationId(11));
        assert!(!generation_is_ours(&moved, false, &hex(g)));
        assert!(!generation_is_ours(&History::empty(), false, &hex(g)));
    }
}
