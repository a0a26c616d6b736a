//! The per-module cluster state machine (design, "Controller"), as a pure
//! function: [`step`]`(state, event) -> (state, actions)`. A thin driver feeds it
//! heartbeats, timeouts, operator commands and checker results, executes the
//! actions in order, and persists what they ask for.
//!
//! # Driver contract
//! - Actions of one step run in order. What a node announces in its heartbeats
//!   ([`ModuleState::announce`]) is updated only once all of them have completed:
//!   a node never claims SECOND or STOP while its VM or writer mount is still up.
//! - `PeerSeen` carries [`Relation`] computed with [`crate::generation::compare`]
//!   from the persisted local history and the one in the peer's heartbeat, and
//!   whether the module's configuration hashes match.
//! - `PeerLost` means all networks silent for `failover_timeout_ms`.
//! - `StartWaitElapsed` comes `start_wait_ms` after `Start`; the driver may
//!   repeat it (e.g. to retry a witness that did not answer).
//! - `MarkPeerOutdated` completes once the peer's heartbeat shows it knows
//!   (it reports a newer generation than its own, i.e. not up to date) or the
//!   peer is lost, and reports [`Event::PeerMarkedOutdated`]; the writer holds
//!   degraded writes until the state machine says [`Action::WriteAlone`].
//! - `LinkDown` comes from vmha-fs reporting its replication link down
//!   (lost, stalled or failed), with the driver's first-hand facts about the
//!   peer; `FsDied` from vmha-fs reporting it failed (its reason is logged).
//! - `RetryWitness` probes again after a pause (seconds), and only while
//!   [`ModuleState::probing`] still says the probe is wanted.
//! - `Unmount` takes down whatever the module has mounted (writer or receiver)
//!   and with it any resync in progress.
//!
//! # Choices where the design is silent
//! - **Peer may be newer** is persisted *true* whenever the peer writes or may
//!   take over without us: as SECOND, as PRIM (the SECOND may fail over after
//!   we crash — a crash gives no chance to set it at loss time), and in
//!   WAIT/STOP while the peer is seen writing. It is cleared only when this
//!   node becomes the writer without a peer (ALONE). It is raised before the
//!   other actions of the step and lowered after them, so a crash in between
//!   errs on the safe side. Consequently a PRIM that reboots alone waits for its
//!   peer (or `vmctl prim`); only the last node that ran ALONE restarts alone.
//! - **Hand-over**: `stop` on the PRIM stops the VM, unmounts and goes STOP; a
//!   ready SECOND seeing its writer STOP takes over (also with
//!   `failover = false`: it is the operator's decision, not a failover). A
//!   writer that goes WAIT (gave up restarting, vmha-fs failed, fenced) is
//!   taken over only with `failover = true`.
//! - **Swap** uses a request in the heartbeat: the PRIM stops its VM, becomes a
//!   ready SECOND and asks [`Request::TakeOver`]; a SECOND asked by the operator
//!   sends [`Request::HandOver`] and the PRIM performs the swap. The
//!   `default_primary` swap-back is the PRIM doing the same on its own once the
//!   default node is SECOND, ready and in sync.
//! - **Hold**: a node that stepped down (gave up, fenced, vmha-fs failed,
//!   witness unreachable) stays WAIT and only follows a writer peer (as
//!   SECOND); it never promotes itself until `start` or `prim`. On a split
//!   brain it follows the writer even when the policy would let its data win
//!   (unless `manual`): it would never take over, so nobody else would.
//! - **Witness**: probed before any ALONE decided without seeing the peer (PRIM
//!   or SECOND losing the peer, WAIT after the start-up wait). While probing a
//!   PRIM keeps its VM (writes wait in vmha-fs, bounded by the lock timeout).
//!   A peer heartbeat arriving meanwhile cancels the probe. A probe that
//!   could not run ([`WitnessOutcome::CouldNotProbe`]: no ICMP socket allowed,
//!   ...) decides nothing: not ALONE (the peer may be alive), not a step down
//!   (the peer may be unable to decide as well: total outage); the node keeps
//!   its role and the probe is retried ([`Action::RetryWitness`]).
//! - **Two writers that see each other** (after a partition without witness,
//!   or a frozen PRIM waking up): the one with older data (by generation) steps
//!   down; on a split brain the policy picks the loser, which steps down and
//!   resynchronises from the winner (a full compare; vmha-fs saves the
//!   diverged blocks). A *waiting* node facing a writer on a split brain follows
//!   it whatever the policy says of the data (its changes are saved aside): it
//!   never preempts a running VM, which would then run twice, and a writer only
//!   steps down for another writer. `prim` on a node marks its data as the winner. With
//!   `manual`, the node that loses the start tie-break steps down but keeps its
//!   data: it waits until `prim` on the other node says which data wins.
//! - **Restart loop**: an unexpected VM stop or a failed start counts as one
//!   restart; after `maxloop` within `loop_interval_s` a PRIM steps down to WAIT
//!   (the SECOND fails over), an ALONE goes STOP (nobody to fail over to).
//! - **Configuration mismatch** (module hash differs): blocks the automatic
//!   decisions that depend on the peer's configuration — failover from SECOND,
//!   takeover of a writer that went WAIT, the start tie-break, swap-back.
//! - **Deferring to the peer**: a WAIT node that sees its peer and does not
//!   start (the peer wins the tie, or is newer) raises "peer may be newer" and
//!   no longer counts itself up to date: the peer may start and write, then
//!   vanish before we hear of it.
//! - **Nothing automatic without data**: a node with an empty history never
//!   goes ALONE on its own; the first start is `prim`.
//! - **Local disk failure** (`DiskFailed`: vmha-fs found a media error on this
//!   node's own copy): the node records *itself* as not up to date (persisted
//!   first, [`Action::SetSelfOutdated`]), stops its VM, unmounts and stays WAIT
//!   (hold). It never promotes itself, never starts a generation, never marks
//!   its peer outdated, and does not even follow a writer peer: its disk is not
//!   touched until the operator says it is repaired (`start`). The peer takes
//!   over as from any writer that steps down (`failover = true`). A node whose
//!   copy is self-outdated (across restarts too) is never promoted
//!   automatically and rejoins with a full compare (`StartResync { full: true
//!   }`); the flag is lowered once that resync completes. `prim` is refused
//!   while the disk is failed (after `start` it forces this copy as usual).
//! - **vmha-fs died** (`FsFailed`): its mount is detached by the driver and the
//!   copy is intact (what was acknowledged was applied, the activity log bounds
//!   the rest): the node steps down and rejoins with an incremental resync.
//! - **Swap** stops the VM first and hands over only once it stopped
//!   (`VmStopDone`); a failed stop (`VmStopFailed`) aborts the swap: the VM
//!   stays where it runs, and no automatic or requested swap is tried again
//!   until the operator asks on this node (`swap` or `start`).
//! - **Degraded while connected**: the replication link down while heartbeats
//!   arrive → the PRIM starts a new generation and marks the peer outdated; it
//!   stays PRIM, and its writes go on without the peer ([`Action::WriteAlone`])
//!   only once the peer acknowledged (`PeerMarkedOutdated`), as they do at
//!   PRIM → ALONE. Only on fresh first-hand knowledge that the peer is our
//!   SECOND (`LinkDown` facts): a frozen PRIM waking up must not fork the
//!   history from heartbeats queued while it slept. A peer that already shows
//!   it is outdated is not marked again: the writer just writes alone. The
//!   SECOND sees the newer generation, becomes not up to date and asks for a
//!   resync (which resumes when the link returns).
//! - **Fenced** (the peer's receiver refused our generation) while the peer's
//!   heartbeat shows our data or an older state of it is not a fence: its
//!   receiver still accepts an older generation of ours.
//! - **A SECOND's receiver died** (`FsDied`): restarted in place
//!   ([`Action::RestartReceiver`]) at most once per
//!   [`RECEIVER_RESTART_INTERVAL_MS`], else the module steps down as for
//!   `FsFailed`.
//! - **A new vmhad adopts** (`Adopt`, sent instead of `Start` when the
//!   previous vmhad's vmha-fs still runs): a writer claiming this node's
//!   current generation, with the settings this configuration gives it, is
//!   taken over as it is — PRIM (ALONE when it writes alone), same VM, no
//!   new generation, no resync; a receiver becomes SECOND, up to date when it
//!   accepts this node's current generation. Anything else is stopped (VM
//!   first) and the module starts as usual.
//! - **A peer whose controller is down** (`ControllerLost`: its heartbeats
//!   stopped, the replication link is alive) is not failed over and a PRIM
//!   does not go ALONE: the roles stay until the link dies too
//!   (`DataPathLost`, or a PRIM's `LinkDown`), then it is `PeerLost`.
//! - **Never heard since this daemon started**: `PeerLost` then matters only to
//!   an adopted PRIM (goes ALONE) or SECOND (fails over when up to date).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::config::{Config, Module, NodeIndex, SplitBrainPolicy};
use crate::generation::Relation;

/// `discard-least-changes`: counts closer than this (or 10 %) are a tie.
pub const SPLIT_BRAIN_TIE_BYTES: u64 = 64 << 20;

/// A SECOND's receiver that dies again within this is not restarted in place
/// (it keeps failing: the module steps down).
pub const RECEIVER_RESTART_INTERVAL_MS: u64 = 30_000;

/// Module states, as operators know them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Role {
    Stop,
    Wait,
    Alone,
    Prim,
    Second,
}

impl Role {
    /// Whether this role holds the writer mount and runs the VM.
    pub fn is_writer(self) -> bool {
        matches!(self, Role::Alone | Role::Prim)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Stop => "STOP",
            Role::Wait => "WAIT",
            Role::Alone => "ALONE",
            Role::Prim => "PRIM",
            Role::Second => "SECOND",
        })
    }
}

/// Sub-state shown next to the role (`status --json` `readiness`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Readiness {
    Ready,
    Transient,
    #[serde(rename = "not_uptodate")]
    NotUpToDate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Colour {
    Green,
    Orange,
    Red,
}

/// One of the two nodes, from the local node's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    Local,
    Peer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitBrainRule {
    DiscardLeastChanges,
    Manual,
    Prefer(Side),
}

/// The module's configuration as it matters to the state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub failover: bool,
    /// Witness addresses are configured: probe before going ALONE.
    pub witness: bool,
    pub default_primary: Option<Side>,
    /// This node wins when both are equally up to date: it is the
    /// `default_primary`, or there is none and it is the first `[[node]]`.
    pub wins_ties: bool,
    pub split_brain: SplitBrainRule,
    pub maxloop: u32,
    pub loop_interval_ms: u64,
}

impl Policy {
    pub fn new(config: &Config, module: &Module, local: NodeIndex) -> Policy {
        let side = |node: NodeIndex| {
            if node == local {
                Side::Local
            } else {
                Side::Peer
            }
        };
        let default_primary = module.default_primary.map(side);
        Policy {
            failover: module.failover,
            witness: !config.cluster.witness.is_empty(),
            default_primary,
            wins_ties: side(module.default_primary.unwrap_or(NodeIndex::FIRST)) == Side::Local,
            split_brain: match config.cluster.split_brain {
                SplitBrainPolicy::DiscardLeastChanges => SplitBrainRule::DiscardLeastChanges,
                SplitBrainPolicy::Manual => SplitBrainRule::Manual,
                SplitBrainPolicy::Prefer(node) => SplitBrainRule::Prefer(side(node)),
            },
            maxloop: module.maxloop,
            loop_interval_ms: module.loop_interval_s.saturating_mul(1000),
        }
    }
}

/// The state of a node's own disk for a module (`status --json` `disk`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Disk {
    #[default]
    Ok,
    /// Running without a local copy (reserved: not produced in fallback mode).
    Diskless,
    /// The local disk failed; the node waits until `vmctl start` after repair.
    Failed,
}

/// A request carried in heartbeats to swap the roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Request {
    /// "I stopped my VM and am your SECOND: become PRIM" (swap from the PRIM).
    TakeOver,
    /// "Let me be PRIM" (swap asked on the SECOND).
    HandOver,
}

/// What a node puts in its heartbeats about one module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announce {
    pub role: Role,
    pub readiness: Readiness,
    pub request: Option<Request>,
    /// The operator forced this node primary: its data wins a split brain.
    pub forced: bool,
    /// The node's own disk (absent in heartbeats of older daemons: ok).
    #[serde(default)]
    pub disk: Disk,
}

/// The peer as seen in its latest heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub role: Role,
    pub readiness: Readiness,
    pub request: Option<Request>,
    pub forced: bool,
    /// `compare(local history, peer history)`.
    pub relation: Relation,
    /// The module's configuration hashes are equal.
    pub config_match: bool,
    /// Bytes the peer wrote since its current generation began.
    pub changed_bytes: u64,
}

impl Peer {
    /// The peer described by its announcement and what the driver computed.
    pub fn from_announce(
        announce: Announce,
        relation: Relation,
        config_match: bool,
        changed_bytes: u64,
    ) -> Peer {
        Peer {
            role: announce.role,
            readiness: announce.readiness,
            request: announce.request,
            forced: announce.forced,
            relation,
            config_match,
            changed_bytes,
        }
    }
}

/// The local node's latest knowledge of its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerKnowledge {
    /// Not seen since this process started.
    Unknown,
    Seen(Peer),
    /// All networks silent for the failover timeout; the last heartbeat.
    Lost(Peer),
}

/// Resync progress, for `vmctl status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub done_bytes: u64,
    pub total_bytes: u64,
}

/// Inputs of the state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `vmctl start` (also sent by the driver when the daemon starts).
    Start,
    /// `vmctl stop`.
    Stop,
    /// `vmctl swap`.
    Swap,
    /// `vmctl prim`: force this node to run the module with its data.
    PrimForced,
    /// A heartbeat from the peer; `local_changed_bytes` are the bytes this node
    /// wrote since its current generation began (for the split-brain rule).
    PeerSeen {
        peer: Peer,
        local_changed_bytes: u64,
    },
    /// All networks silent for the failover timeout.
    PeerLost,
    StartWaitElapsed,
    ResyncProgress(Progress),
    ResyncDone,
    /// A `StartVm` completed: the domain runs.
    VmStarted,
    /// The domain stopped without us asking (checker).
    VmStopped {
        now_ms: u64,
    },
    /// A `StartVm` failed.
    VmStartFailed {
        now_ms: u64,
    },
    /// The module's vmha-fs died or its mount stopped answering.
    FsFailed,
    /// The local disk failed under vmha-fs (a media error on this node's copy).
    DiskFailed,
    /// A `StopVm` completed: the domain is off.
    VmStopDone,
    /// A `StopVm` failed: the domain may still run.
    VmStopFailed,
    /// vmha-fs reports its replication link down (lost, stalled or failed).
    /// Only a PRIM that knows first-hand and freshly that the peer is its
    /// SECOND marks it outdated: a frozen PRIM waking up must not fork the
    /// history from heartbeats queued while it slept.
    LinkDown {
        /// The peer's heartbeats still arrive (the last round within 3
        /// intervals) and this daemon has observed without a stall of its
        /// own for the failover timeout.
        heartbeats_fresh: bool,
        /// The peer's latest heartbeat shows a SECOND with our data or an
        /// older state of it.
        peer_is_second: bool,
        /// The peer's latest heartbeat shows data behind ours and not ready:
        /// it already knows it is outdated.
        peer_knows_outdated: bool,
    },
    /// The outcome of a `MarkPeerOutdated`: `acknowledged` when the peer's
    /// heartbeat shows it knows (not when it was lost, is ahead, or did not
    /// answer within the failover timeout).
    PeerMarkedOutdated {
        acknowledged: bool,
    },
    /// vmha-fs reports our writes refused: our generation is stale, unless
    /// the peer's heartbeat shows our data or an older state of it
    /// (`peer_follows_us`): its receiver then still accepts an older
    /// generation of ours and is being restarted for the current one.
    Fenced {
        peer_follows_us: bool,
    },
    /// vmha-fs reports it failed (its process died, its mount is gone); a
    /// SECOND's receiver is restarted in place at most once per
    /// [`RECEIVER_RESTART_INTERVAL_MS`].
    FsDied {
        now_ms: u64,
        reason: String,
    },
    /// The outcome of a `ProbeWitness` or `RetryWitness`.
    WitnessResult(WitnessOutcome),
    /// Every network silent for the failover timeout, but the replication
    /// link to the peer is alive (frames or pings within the failover
    /// timeout): its controller is down, its vmha-fs (and VM) run on.
    ControllerLost,
    /// After [`Event::ControllerLost`]: the replication link went silent too
    /// (nothing received within the failover timeout): the peer is lost.
    DataPathLost,
    /// At daemon start, before `Start`: the vmha-fs of this module that a
    /// previous vmhad started still runs ([`Found`]).
    Adopt(Found),
}

/// What a new vmhad found running of a module at its start (a previous vmhad
/// ended, or crashed, leaving its vmha-fs and VM running).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    /// The writer (`vmha-fs primary`), else the receiver.
    pub writer: bool,
    /// It runs with the settings this configuration gives it.
    pub settings_match: bool,
    /// Writer: it claims this node's current generation, or an earlier one of
    /// this node's history (a writer that went ALONE keeps its first claim
    /// until it attaches the peer with the current one). Receiver: it accepts
    /// this node's current generation (a resync to the writer's generation
    /// completed: the copy is up to date).
    pub generation_current: bool,
    /// Writer: it writes alone (ALONE), not replicating to the peer (PRIM).
    pub alone: bool,
    /// Writer: the module's domain runs.
    pub vm_running: bool,
}

/// What probing the witnesses found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WitnessOutcome {
    /// A witness answered: the network on this side works.
    Reachable,
    /// No witness answered (or the network reports no route to them).
    Unreachable,
    /// No witness answered and some could not be probed at all (no
    /// permission for an ICMP socket...): a fault of this node, no evidence
    /// of a partition. Decides nothing: the probe is retried.
    CouldNotProbe,
}

/// Outputs, executed in order by the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Mount the replicated directories with vmha-fs as the writer.
    MountWriter,
    /// Run the vmha-fs receiver (directories read-only locally).
    MountReceiver,
    /// Take down the writer or receiver (and any resync).
    Unmount,
    /// Define the libvirt domain from `<dir>/<domain>.xml`, autostart off.
    DefineDomain,
    /// Start the domain and wait until it runs; reports `VmStarted` or
    /// `VmStartFailed`.
    StartVm,
    /// ACPI shutdown, wait `stop_timeout_s`, destroy; reports `VmStopDone`
    /// or `VmStopFailed`.
    StopVm,
    /// Persist a new generation descending from the current one.
    NewGeneration,
    /// Persist the peer's history as ours: a resync from it completed.
    AdoptPeerHistory,
    /// Persist the "peer may be newer" flag.
    SetPeerMayBeNewer(bool),
    /// Persist "this node's own copy is not up to date" (its disk failed).
    SetSelfOutdated(bool),
    /// Receive a resync from the peer; `full`: compare everything.
    StartResync { full: bool },
    /// Tell the peer over the heartbeat channel its copy is outdated;
    /// reports `PeerMarkedOutdated`.
    MarkPeerOutdated,
    /// The writer's vmha-fs stops waiting for its peer and writes alone
    /// (SIGUSR1): the peer is lost, or knows it is outdated.
    WriteAlone,
    /// Restart a SECOND's dead receiver in place, accepting the writer's
    /// generation: what it received is intact (applied before each
    /// acknowledgement) and the writer makes it outdated before writing
    /// without it. A failure is `FsFailed`.
    RestartReceiver { reason: String },
    /// Probe the witnesses; reports `WitnessResult`.
    ProbeWitness,
    /// The last probe could not run: probe again after a pause, while the
    /// probe is still wanted ([`ModuleState::probing`]); reports
    /// `WitnessResult`.
    RetryWitness,
    /// A line for the module's event log.
    Log(String),
}

/// A witness probe in progress, before going ALONE without the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Probe {
    /// A probe of this episode could not run (already logged).
    failed: bool,
}

/// The state of one module on the local node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleState {
    pub policy: Policy,
    pub role: Role,
    pub peer: PeerKnowledge,
    /// Local data known to be up to date (the newest copy, or in sync with it).
    pub uptodate: bool,
    /// The local history has a current generation.
    pub has_data: bool,
    /// Mirror of the persisted flag (kept current through `SetPeerMayBeNewer`).
    pub peer_may_be_newer: bool,
    pub start_wait_over: bool,
    /// Stepped down: follow a writer peer, never promote automatically.
    pub hold: bool,
    pub vm_starting: bool,
    pub request: Option<Request>,
    pub forced: bool,
    /// We marked the peer outdated (replication link down while connected).
    pub peer_outdated: bool,
    /// Mirror of the persisted "this node's own copy is not up to date" (its
    /// disk failed): never promoted automatically, the next resync is full.
    pub self_outdated: bool,
    /// The local disk failed: WAIT, touching nothing, until `start`.
    pub disk_failed: bool,
    /// A swap stopped the VM and waits for the outcome (`VmStopDone`).
    pub swapping: bool,
    /// A swap could not stop the VM: no further swap until the operator asks.
    pub swap_refused: bool,
    /// Bytes this node wrote since its generation began (last `PeerSeen`).
    pub changed_bytes: u64,
    /// Times (ms) of local restarts within the current loop interval.
    pub restarts: Vec<u64>,
    pub resync: Option<Progress>,
    /// SECOND: learnt it is outdated from a peer that was not writing yet (its
    /// writer start after our swap fell back to a new generation): resync
    /// once it writes.
    pub resync_wanted: bool,
    /// When (ms) a SECOND's dead receiver was last restarted in place.
    pub receiver_restarted_ms: Option<u64>,
    /// The peer's heartbeats stopped while its replication link is alive
    /// ([`Event::ControllerLost`]): its controller is down, the data path is
    /// alive. Cleared when it is heard again or the data path dies.
    pub peer_controller_down: bool,
    probe: Option<Probe>,
}

impl ModuleState {
    /// A module at daemon start: STOP, with what its metadata file says.
    pub fn new(policy: Policy, has_data: bool, peer_may_be_newer: bool) -> ModuleState {
        ModuleState {
            policy,
            role: Role::Stop,
            peer: PeerKnowledge::Unknown,
            uptodate: has_data && !peer_may_be_newer,
            has_data,
            peer_may_be_newer,
            start_wait_over: false,
            hold: false,
            vm_starting: false,
            request: None,
            forced: false,
            peer_outdated: false,
            self_outdated: false,
            disk_failed: false,
            swapping: false,
            swap_refused: false,
            changed_bytes: 0,
            restarts: Vec::new(),
            resync: None,
            resync_wanted: false,
            receiver_restarted_ms: None,
            peer_controller_down: false,
            probe: None,
        }
    }

    /// A witness probe is wanted: its result decides whether to go ALONE.
    pub fn probing(&self) -> bool {
        self.probe.is_some()
    }

    /// With the persisted "self outdated" flag: never counted up to date.
    pub fn with_self_outdated(mut self, flag: bool) -> ModuleState {
        self.self_outdated = flag;
        self.uptodate = self.uptodate && !flag;
        self
    }

    pub fn readiness(&self) -> Readiness {
        match self.role {
            Role::Stop => Readiness::Ready,
            _ if self.probe.is_some() => Readiness::Transient,
            Role::Wait | Role::Second if !self.uptodate => Readiness::NotUpToDate,
            Role::Prim | Role::Alone if self.vm_starting => Readiness::Transient,
            _ => Readiness::Ready,
        }
    }

    pub fn colour(&self) -> Colour {
        match (self.role, self.readiness()) {
            (Role::Stop | Role::Wait, _) => Colour::Red,
            (_, Readiness::Ready) => Colour::Green,
            _ => Colour::Orange,
        }
    }

    /// What to put in heartbeats.
    pub fn announce(&self) -> Announce {
        Announce {
            role: self.role,
            readiness: self.readiness(),
            request: self.request,
            forced: self.forced,
            disk: if self.disk_failed {
                Disk::Failed
            } else {
                Disk::Ok
            },
        }
    }

    /// The peer is writing, as far as we last heard.
    pub fn peer_is_writer(&self) -> bool {
        matches!(self.peer, PeerKnowledge::Seen(p) if p.role.is_writer())
    }

    /// The latest peer heartbeat, even if the peer is now lost.
    pub fn last_peer(&self) -> Option<Peer> {
        match self.peer {
            PeerKnowledge::Unknown => None,
            PeerKnowledge::Seen(p) | PeerKnowledge::Lost(p) => Some(p),
        }
    }

    /// Who discards its data when the histories diverged; `None`: nobody
    /// automatically (manual policy).
    fn split_brain_loser(&self, peer: &Peer) -> Option<Side> {
        let local_bytes = self.changed_bytes;
        match (self.forced, peer.forced) {
            (true, false) => return Some(Side::Peer),
            (false, true) => return Some(Side::Local),
            _ => {}
        }
        let tie = if self.policy.wins_ties {
            Side::Peer
        } else {
            Side::Local
        };
        match self.policy.split_brain {
            SplitBrainRule::Manual => None,
            SplitBrainRule::Prefer(Side::Local) => Some(Side::Peer),
            SplitBrainRule::Prefer(Side::Peer) => Some(Side::Local),
            SplitBrainRule::DiscardLeastChanges => {
                // Both counts keep growing while the nodes compare (each sees the
                // other's a heartbeat late): near-equal counts are a tie, decided
                // the same way on both nodes. Since counts only grow, the two nodes
                // can never both lose; both winning lasts until fresher counts.
                let (a, b) = (local_bytes, peer.changed_bytes);
                let band = SPLIT_BRAIN_TIE_BYTES.max(a.max(b) / 10);
                // The loser is the node with fewer changes.
                Some(if a.saturating_add(band) < b {
                    Side::Local
                } else if b.saturating_add(band) < a {
                    Side::Peer
                } else {
                    tie
                })
            }
        }
    }
}

/// The transition function.
pub fn step(state: &ModuleState, event: Event) -> (ModuleState, Vec<Action>) {
    let mut t = Transition {
        s: state.clone(),
        actions: Vec::new(),
        from: state.role,
        reason: String::new(),
        raise_flag: false,
    };
    t.handle(event);
    t.finish()
}

/// One step under construction.
struct Transition {
    s: ModuleState,
    actions: Vec<Action>,
    from: Role,
    reason: String,
    /// Persist "peer may be newer" even in WAIT/STOP.
    raise_flag: bool,
}

impl Transition {
    fn act(&mut self, action: Action) {
        self.actions.push(action);
    }

    fn log(&mut self, line: impl Into<String>) {
        self.actions.push(Action::Log(line.into()));
    }

    fn because(&mut self, reason: impl Into<String>) {
        self.reason = reason.into();
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Start => self.start(),
            Event::Stop => self.stop(),
            Event::Swap => self.swap(),
            Event::PrimForced => self.prim_forced(),
            Event::PeerSeen {
                peer,
                local_changed_bytes,
            } => {
                self.s.changed_bytes = local_changed_bytes;
                self.peer_seen(peer);
            }
            Event::PeerLost => self.peer_lost(),
            Event::StartWaitElapsed => {
                self.s.start_wait_over = true;
                if self.s.role == Role::Wait {
                    self.evaluate_wait();
                }
            }
            Event::ResyncProgress(progress) => {
                if self.s.role == Role::Second {
                    self.s.resync = Some(progress);
                }
            }
            Event::ResyncDone => self.resync_done(),
            Event::VmStarted => {
                if self.s.role.is_writer() {
                    self.s.vm_starting = false;
                }
            }
            Event::VmStopped { now_ms } => self.vm_failed(now_ms, "the VM stopped unexpectedly"),
            Event::VmStartFailed { now_ms } => self.vm_failed(now_ms, "the VM failed to start"),
            Event::FsFailed => self.fs_failed(),
            Event::DiskFailed => self.disk_failed(),
            Event::VmStopDone => self.vm_stop_done(),
            Event::VmStopFailed => self.vm_stop_failed(),
            Event::LinkDown {
                heartbeats_fresh,
                peer_is_second,
                peer_knows_outdated,
            } => self.link_down(heartbeats_fresh && peer_is_second, peer_knows_outdated),
            Event::PeerMarkedOutdated { acknowledged } => {
                // Replication link down: the peer now knows it is outdated, so
                // writes go on without it (it is resynchronised when it asks).
                // Without its acknowledgement they keep waiting: a lost peer is
                // `PeerLost`'s (maybe through the witness), a newer one makes
                // this node step down.
                if acknowledged && self.s.role == Role::Prim {
                    self.act(Action::WriteAlone);
                }
            }
            Event::FsDied { now_ms, reason } => self.fs_died(now_ms, reason),
            Event::Fenced { peer_follows_us } => {
                if self.s.role.is_writer() && !peer_follows_us {
                    self.s.uptodate = false;
                    self.raise_flag = true;
                    self.step_down(
                        Role::Wait,
                        "fenced: the peer refused our writes, its generation is newer",
                    );
                }
            }
            Event::WitnessResult(outcome) => self.witness_result(outcome),
            Event::ControllerLost => self.controller_lost(),
            Event::DataPathLost => {
                if std::mem::take(&mut self.s.peer_controller_down) {
                    self.log("the peer's replication link is silent too: the peer is lost");
                    self.peer_lost();
                }
            }
            Event::Adopt(found) => self.adopt(found),
        }
    }

    // ---- a new vmhad ----

    /// A previous vmhad left this module's vmha-fs (and VM) running: take it
    /// over as it is when it is what this configuration and the persisted
    /// generation expect, else stop it and start as usual.
    fn adopt(&mut self, found: Found) {
        // Only at daemon start (a fresh state: STOP, disk not failed).
        if self.s.role != Role::Stop || self.s.disk_failed {
            return;
        }
        let kind = if found.writer { "writer" } else { "receiver" };
        let refusal = if !found.settings_match {
            Some("its settings differ from this configuration's")
        } else if found.writer && !(found.generation_current && self.s.has_data) {
            Some("it does not claim this node's current generation")
        } else if found.writer && self.s.self_outdated {
            Some("this node's copy is recorded as not up to date")
        } else {
            None
        };
        if let Some(why) = refusal {
            self.log(format!(
                "found the {kind} a previous vmhad started, not adopted ({why}): stopping it"
            ));
            if found.writer && found.vm_running {
                self.act(Action::StopVm);
            }
            self.act(Action::Unmount);
            self.start();
            return;
        }
        self.s.hold = false;
        self.s.start_wait_over = true;
        self.s.restarts.clear();
        if found.writer {
            self.s.role = if found.alone { Role::Alone } else { Role::Prim };
            self.s.uptodate = true;
            if !found.vm_running {
                self.act(Action::DefineDomain);
                self.act(Action::StartVm);
                self.s.vm_starting = true;
            }
            self.because(if found.vm_running {
                "adopted the running writer and VM a previous vmhad started"
            } else {
                "adopted the running writer a previous vmhad started; its VM is not running: starting it"
            });
        } else {
            self.s.role = Role::Second;
            self.s.uptodate = found.generation_current && self.s.has_data && !self.s.self_outdated;
            self.because(if self.s.uptodate {
                "adopted the running receiver a previous vmhad started (up to date)"
            } else {
                "adopted the running receiver a previous vmhad started (not up to date)"
            });
        }
    }

    /// The peer's heartbeats stopped but its replication link is alive: its
    /// controller is down, not the node. A writer whose data path is alive is
    /// never failed over; the roles stay until the link dies too
    /// ([`Event::DataPathLost`]) or the peer is heard again.
    fn controller_lost(&mut self) {
        match self.s.role {
            Role::Prim | Role::Second => {
                if let PeerKnowledge::Seen(p) = self.s.peer {
                    self.s.peer = PeerKnowledge::Lost(p);
                }
                if !self.s.peer_controller_down {
                    self.s.peer_controller_down = true;
                    self.log(format!(
                        "the peer's controller is down (heartbeats silent), its data path is alive: staying {}",
                        self.s.role
                    ));
                }
            }
            _ => self.peer_lost(),
        }
    }

    // ---- operator commands ----

    fn start(&mut self) {
        if self.s.role == Role::Wait && self.s.disk_failed {
            // The operator says the disk is repaired: rejoin (full compare).
            self.s.disk_failed = false;
            self.s.hold = false;
            self.s.swap_refused = false;
            self.s.restarts.clear();
            self.log("start: the local disk is taken as repaired; rejoining with a full compare");
            self.evaluate_wait();
            return;
        }
        if self.s.role != Role::Stop {
            self.log(format!("start ignored: already {}", self.s.role));
            return;
        }
        self.s.role = Role::Wait;
        self.s.start_wait_over = false;
        self.s.hold = false;
        self.s.restarts.clear();
        self.s.swap_refused = false;
        self.s.disk_failed = false;
        self.s.uptodate = self.s.has_data && !self.s.peer_may_be_newer && !self.s.self_outdated;
        self.because("start");
        self.evaluate_wait();
    }

    fn stop(&mut self) {
        match self.s.role {
            Role::Stop => self.log("stop ignored: already STOP"),
            Role::Prim | Role::Alone | Role::Second => self.step_down(Role::Stop, "stop requested"),
            Role::Wait => {
                self.s.probe = None;
                self.s.role = Role::Stop;
                self.because("stop requested");
            }
        }
    }

    fn swap(&mut self) {
        // Asked again by the operator: a swap may be tried again.
        self.s.swap_refused = false;
        match (self.s.role, self.s.peer) {
            (Role::Prim, PeerKnowledge::Seen(p))
                if p.role == Role::Second && p.readiness == Readiness::Ready =>
            {
                self.do_swap("swap requested");
            }
            (Role::Second, PeerKnowledge::Seen(p)) if p.role == Role::Prim && self.s.uptodate => {
                self.s.request = Some(Request::HandOver);
                self.log("swap: asking the PRIM to hand over");
            }
            _ => self.log(format!(
                "swap refused: needs PRIM and a ready SECOND (this node is {})",
                self.s.role
            )),
        }
    }

    fn prim_forced(&mut self) {
        if self.s.disk_failed {
            self.log("prim refused: the local disk failed (repair it, then `vmctl start`)");
        } else if self.s.role.is_writer() {
            self.s.forced = true;
            self.log("prim: this node's data wins any split brain");
        } else if self.peer_is_writer() {
            self.log("prim refused: the peer runs the module (stop it or use swap)");
        } else {
            self.s.forced = true;
            self.s.has_data = true;
            self.set_self_outdated(false);
            self.become_writer(Role::Alone, true, "forced primary by the operator");
        }
    }

    fn peer_is_writer(&self) -> bool {
        self.s.peer_is_writer()
    }

    // ---- peer ----

    fn peer_seen(&mut self, peer: Peer) {
        self.s.peer = PeerKnowledge::Seen(peer);
        if std::mem::take(&mut self.s.peer_controller_down) {
            self.log("the peer's controller is back");
        }
        if self.s.probe.take().is_some() {
            self.log("peer heard again: witness probe abandoned");
        }
        match self.s.request {
            Some(Request::TakeOver) if peer.role.is_writer() => self.s.request = None,
            Some(Request::HandOver) if peer.role != Role::Prim => self.s.request = None,
            _ => {}
        }
        if self.s.forced && peer.relation == Relation::InSync && peer.role == Role::Second {
            self.s.forced = false;
        }
        if self.s.peer_outdated && peer.relation == Relation::InSync {
            self.s.peer_outdated = false;
        }
        match self.s.role {
            Role::Stop => {}
            Role::Wait => self.evaluate_wait(),
            Role::Second => self.second_sees(peer),
            Role::Prim | Role::Alone => self.writer_sees(peer),
        }
    }

    fn second_sees(&mut self, peer: Peer) {
        let behind = !matches!(peer.relation, Relation::InSync | Relation::LocalNewer);
        if self.s.uptodate && behind {
            // The writer went on without us (replication link down).
            self.s.uptodate = false;
            self.s.resync_wanted = true;
        }
        if self.s.resync_wanted && peer.role.is_writer() {
            self.s.resync_wanted = false;
            let full = peer.relation != Relation::PeerNewer || self.s.self_outdated;
            self.act(Action::StartResync { full });
            self.log("the writer has a newer generation: resynchronising");
        }
        match peer.role {
            Role::Prim | Role::Alone => {}
            Role::Second if peer.request == Some(Request::TakeOver) && self.s.uptodate => {
                self.become_writer(Role::Prim, false, "swap: the peer handed over");
            }
            Role::Second if self.s.request == Some(Request::TakeOver) => {
                // Our own swap request is on its way.
            }
            Role::Stop if self.s.uptodate => {
                self.become_writer(Role::Alone, true, "the PRIM stopped: taking over");
            }
            Role::Wait if self.s.uptodate && self.s.policy.failover && peer.config_match => {
                self.become_writer(Role::Alone, true, "the PRIM stepped down: failing over");
            }
            Role::Second | Role::Stop | Role::Wait => {
                self.step_down(Role::Wait, "no writer to follow");
                self.evaluate_wait();
            }
        }
    }

    fn writer_sees(&mut self, peer: Peer) {
        if peer.role.is_writer() {
            // Two writers that see each other: one steps down now.
            let local_loses = match peer.relation {
                Relation::PeerNewer => true,
                Relation::LocalNewer => false,
                Relation::InSync => !self.s.policy.wins_ties,
                Relation::SplitBrain | Relation::Unrelated => {
                    match self.s.split_brain_loser(&peer) {
                        Some(side) => side == Side::Local,
                        None => !self.s.policy.wins_ties,
                    }
                }
            };
            if local_loses {
                if peer.relation != Relation::InSync {
                    self.s.uptodate = false;
                }
                self.step_down(
                    Role::Wait,
                    format!(
                        "the peer is also writing ({:?}): stepping down",
                        peer.relation
                    ),
                );
                // Follow the winner right away when the rules say so.
                self.evaluate_wait();
            } else {
                self.log(format!(
                    "the peer is also writing ({:?}): it must step down",
                    peer.relation
                ));
            }
            return;
        }
        match peer.role {
            Role::Second if peer.relation == Relation::PeerNewer => {
                self.s.uptodate = false;
                self.step_down(Role::Wait, "the SECOND has newer data than this writer");
            }
            Role::Second => {
                if self.s.role == Role::Alone {
                    self.s.role = Role::Prim;
                    self.because("the peer is SECOND");
                }
                let in_sync_ready =
                    peer.readiness == Readiness::Ready && peer.relation == Relation::InSync;
                if self.s.swap_refused || self.s.swapping {
                    // A swap failed to stop the VM: only the operator retries.
                } else if in_sync_ready && peer.request == Some(Request::HandOver) {
                    self.do_swap("swap asked by the SECOND");
                } else if in_sync_ready
                    && peer.config_match
                    && self.s.request.is_none()
                    && self.s.policy.default_primary == Some(Side::Peer)
                {
                    self.do_swap("swap back to the default primary");
                }
            }
            _ => {
                if self.s.role == Role::Prim {
                    self.s.role = Role::Alone;
                    self.act(Action::NewGeneration);
                    self.because(format!("the peer is {}: writing alone", peer.role));
                }
            }
        }
    }

    fn peer_lost(&mut self) {
        self.s.peer_controller_down = false;
        let last = match self.s.peer {
            PeerKnowledge::Seen(p) | PeerKnowledge::Lost(p) => p,
            // Not heard since this daemon started: only an adopted PRIM or
            // SECOND has anything to decide (the peer may have died while
            // no controller ran here).
            PeerKnowledge::Unknown => {
                match self.s.role {
                    Role::Prim => self.go_alone("the peer was not heard since this vmhad started"),
                    Role::Second if self.s.uptodate && self.s.policy.failover => self
                        .go_alone("the PRIM was not heard since this vmhad started: failing over"),
                    Role::Second => self.step_down(
                        Role::Wait,
                        "the PRIM was not heard since this vmhad started",
                    ),
                    _ => {}
                }
                return;
            }
        };
        self.s.peer = PeerKnowledge::Lost(last);
        match self.s.role {
            Role::Prim => self.go_alone("lost the peer"),
            Role::Second => {
                if !self.s.uptodate {
                    self.step_down(Role::Wait, "lost the PRIM with data not up to date");
                } else if !self.s.policy.failover {
                    self.step_down(Role::Wait, "lost the PRIM; failover = false");
                } else if !last.config_match {
                    self.step_down(Role::Wait, "lost the PRIM; configurations differ");
                } else {
                    self.go_alone("lost the PRIM: failing over");
                }
            }
            Role::Wait => self.evaluate_wait(),
            Role::Alone | Role::Stop => {}
        }
    }

    fn witness_result(&mut self, outcome: WitnessOutcome) {
        let Some(probe) = self.s.probe.take() else {
            return;
        };
        match outcome {
            WitnessOutcome::Reachable => {
                self.become_writer(Role::Alone, true, "witness reachable");
                return;
            }
            WitnessOutcome::CouldNotProbe => {
                // Neither ALONE (the peer may be alive) nor a step down (the
                // peer may be unable to decide too: total outage): keep
                // probing until the probe runs or the peer is heard again.
                self.s.probe = Some(Probe { failed: true });
                self.act(Action::RetryWitness);
                if !probe.failed {
                    self.log(format!(
                        "witness could not be probed: not deciding, retrying (still {})",
                        self.s.role
                    ));
                }
                return;
            }
            WitnessOutcome::Unreachable => {}
        }
        match self.s.role {
            Role::Prim | Role::Second => {
                self.step_down(Role::Wait, "witness unreachable: not going ALONE")
            }
            _ => self.log("witness unreachable: staying WAIT"),
        }
    }

    /// ALONE without seeing the peer: through the witness when there is one.
    fn go_alone(&mut self, reason: &str) {
        if self.s.policy.witness {
            self.s.probe = Some(Probe { failed: false });
            self.act(Action::ProbeWitness);
            self.log(format!("{reason}: probing the witness"));
        } else {
            self.become_writer(Role::Alone, true, reason);
        }
    }

    /// The decisions of WAIT, from what is known of the peer.
    fn evaluate_wait(&mut self) {
        if self.s.disk_failed {
            // Nothing touches a failed disk until the operator's `start`.
            return;
        }
        match self.s.peer {
            PeerKnowledge::Seen(peer) if peer.role.is_writer() => {
                if peer.relation != Relation::LocalNewer {
                    self.s.uptodate = false;
                }
                match peer.relation {
                    Relation::InSync | Relation::PeerNewer => self.become_second(peer),
                    Relation::LocalNewer => self
                        .log("the peer writes older data than ours: waiting for it to step down"),
                    Relation::SplitBrain | Relation::Unrelated => {
                        match self.s.split_brain_loser(&peer) {
                            Some(Side::Local) => {
                                self.log("split brain: discarding this node's changes");
                                self.become_second(peer);
                            }
                            // A waiting node never preempts a writer that runs the VM
                            // (starting it here too would run it twice), and a writer
                            // only steps down for another writer: it follows, its
                            // diverged blocks saved aside (`vmctl prim` decides otherwise).
                            Some(Side::Peer) => {
                                self.log("split brain: the peer runs the VM; this node follows and saves its own changes aside");
                                self.become_second(peer);
                            }
                            None => self.log(
                                "split brain: manual policy; run `vmctl prim` on the node whose data must win",
                            ),
                        }
                    }
                }
            }
            // A SECOND without a writer is transient: it is taking over (we may have
            // just handed over to it, and this view predates that) or about to step
            // down. Deciding on it could make two writers; the next heartbeat says.
            PeerKnowledge::Seen(peer) if peer.role == Role::Second => {
                self.log("the peer is SECOND without a writer: waiting for it to settle");
            }
            PeerKnowledge::Seen(peer) => {
                match peer.relation {
                    Relation::InSync | Relation::LocalNewer => {
                        self.s.uptodate = self.s.has_data && !self.s.self_outdated
                    }
                    Relation::PeerNewer => self.s.uptodate = false,
                    Relation::SplitBrain | Relation::Unrelated => {}
                }
                let go = !self.s.hold
                    && self.s.has_data
                    && !self.s.self_outdated
                    && peer.config_match
                    && match peer.relation {
                        Relation::LocalNewer => true,
                        Relation::InSync => self.s.policy.wins_ties || peer.role == Role::Stop,
                        Relation::PeerNewer => false,
                        Relation::SplitBrain | Relation::Unrelated => {
                            self.s.split_brain_loser(&peer) == Some(Side::Peer)
                        }
                    };
                if go {
                    self.become_writer(Role::Alone, true, "the most up-to-date node starts");
                } else {
                    // The peer may start instead: if it vanishes later, it may
                    // have written first.
                    self.s.uptodate = false;
                    self.raise_flag = true;
                    if !peer.config_match {
                        self.log("configurations differ: not starting automatically");
                    }
                }
            }
            PeerKnowledge::Unknown | PeerKnowledge::Lost(_) => {
                let can_start = !self.s.hold
                    && self.s.has_data
                    && !self.s.self_outdated
                    && self.s.uptodate
                    && self.s.start_wait_over
                    && self.s.probe.is_none();
                if can_start {
                    self.go_alone("no peer; local data up to date");
                }
            }
        }
    }

    // ---- checkers ----

    fn vm_failed(&mut self, now_ms: u64, what: &str) {
        if !self.s.role.is_writer() {
            return;
        }
        let window = self.s.policy.loop_interval_ms;
        self.s
            .restarts
            .retain(|t| now_ms.saturating_sub(*t) < window);
        if self.s.restarts.len() < self.s.policy.maxloop as usize {
            self.s.restarts.push(now_ms);
            self.s.vm_starting = true;
            self.act(Action::StartVm);
            self.log(format!(
                "{what}: restart {}/{}",
                self.s.restarts.len(),
                self.s.policy.maxloop
            ));
        } else if self.s.role == Role::Prim {
            self.step_down(Role::Wait, format!("{what}: maxloop reached, failing over"));
        } else {
            self.step_down(
                Role::Stop,
                format!("{what}: maxloop reached and no peer to fail over to"),
            );
        }
    }

    fn fs_failed(&mut self) {
        match self.s.role {
            Role::Prim | Role::Alone | Role::Second => {
                self.s.uptodate = false;
                self.step_down(Role::Wait, "vmha-fs failed");
            }
            Role::Wait | Role::Stop => {}
        }
    }

    /// This node's own copy can no longer be trusted: hand the module to the
    /// peer (which holds every acknowledged write) and touch nothing.
    fn disk_failed(&mut self) {
        let first = !self.s.disk_failed;
        // Persisted before anything else: a restart must not promote this copy.
        self.set_self_outdated(true);
        self.s.disk_failed = true;
        self.s.uptodate = false;
        self.s.forced = false;
        self.s.request = None;
        let reason = "the local disk failed: this node's copy is not up to date";
        match self.s.role {
            Role::Prim | Role::Alone | Role::Second => self.step_down(Role::Wait, reason),
            Role::Wait => {
                self.s.hold = true;
                self.s.probe = None;
                if first {
                    self.log(reason);
                }
            }
            Role::Stop => {
                if first {
                    self.log(reason);
                }
            }
        }
    }

    /// Swap, second half: the VM is off, hand over to the SECOND.
    fn vm_stop_done(&mut self) {
        if !std::mem::take(&mut self.s.swapping) || self.s.role != Role::Prim {
            return;
        }
        self.act(Action::Unmount);
        self.act(Action::MountReceiver);
        self.s.role = Role::Second;
        self.s.uptodate = true;
        self.s.vm_starting = false;
        self.s.request = Some(Request::TakeOver);
        self.because("swap: the VM stopped, the peer takes over");
    }

    fn vm_stop_failed(&mut self) {
        if std::mem::take(&mut self.s.swapping) && self.s.role == Role::Prim {
            self.s.swap_refused = true;
            self.log("swap aborted: the VM could not be stopped; it keeps running on this node");
        }
    }

    /// The replication link is down while this node writes. Before vmha-fs
    /// may write alone, the peer must know it is outdated: through a new
    /// generation in the heartbeats, unless its heartbeat already shows it.
    /// `our_second_now`: fresh, first-hand knowledge that the peer is our
    /// SECOND (see [`Event::LinkDown`]); without it the whole peer may be
    /// going away (`PeerLost` decides), or the view is stale.
    fn link_down(&mut self, our_second_now: bool, peer_knows_outdated: bool) {
        match self.s.role {
            // An ALONE writer has nobody to wait for.
            Role::Alone => self.act(Action::WriteAlone),
            // The peer's controller is down and now its receiver too.
            Role::Prim if self.s.peer_controller_down => {
                self.s.peer_controller_down = false;
                self.log("the peer's replication link is down too: the peer is lost");
                self.peer_lost();
            }
            Role::Prim if !our_second_now => {}
            Role::Prim if peer_knows_outdated => {
                self.log("replication link down; the peer already knows it is outdated");
                self.act(Action::WriteAlone);
            }
            // Otherwise (marked already) a heartbeat clearing `peer_outdated`
            // is on its way: the next report decides.
            Role::Prim if !self.s.peer_outdated => {
                self.s.peer_outdated = true;
                self.act(Action::NewGeneration);
                self.act(Action::MarkPeerOutdated);
                self.log(
                    "replication link down: marking the SECOND outdated, then writing without it",
                );
            }
            _ => {}
        }
    }

    /// vmha-fs failed: a SECOND restarts its receiver in place unless it did
    /// so recently (then it keeps failing); anything else steps down.
    fn fs_died(&mut self, now_ms: u64, reason: String) {
        let restart_allowed = self
            .s
            .receiver_restarted_ms
            .is_none_or(|t| now_ms.saturating_sub(t) >= RECEIVER_RESTART_INTERVAL_MS);
        if self.s.role == Role::Second && restart_allowed {
            self.s.receiver_restarted_ms = Some(now_ms);
            self.act(Action::RestartReceiver { reason });
        } else if matches!(self.s.role, Role::Prim | Role::Alone | Role::Second) {
            self.log(format!("vmha-fs failed: {reason}"));
            self.fs_failed();
        }
    }

    fn resync_done(&mut self) {
        if self.s.role == Role::Second && !self.s.uptodate {
            self.s.uptodate = true;
            self.s.has_data = true;
            self.s.resync = None;
            self.act(Action::AdoptPeerHistory);
            self.set_self_outdated(false);
            self.log("resync done: SECOND up to date");
        }
    }

    /// Changes the persisted "self outdated" flag (and its mirror) if needed.
    fn set_self_outdated(&mut self, flag: bool) {
        if self.s.self_outdated != flag {
            self.s.self_outdated = flag;
            self.act(Action::SetSelfOutdated(flag));
        }
    }

    // ---- building blocks ----

    /// Becomes the writer; refused while the peer is known to write.
    fn become_writer(&mut self, role: Role, new_generation: bool, reason: &str) {
        if self.peer_is_writer() {
            self.log(format!("{reason}: refused, the peer is writing"));
            return;
        }
        let was_writer = self.s.role.is_writer();
        if self.s.role == Role::Second {
            self.act(Action::Unmount);
        }
        // Persisted before the first write without the peer.
        if new_generation {
            self.act(Action::NewGeneration);
            self.s.has_data = true;
        }
        if !was_writer {
            self.act(Action::MountWriter);
            self.act(Action::DefineDomain);
            self.act(Action::StartVm);
            self.s.vm_starting = true;
        }
        self.s.role = role;
        self.s.uptodate = true;
        self.s.hold = false;
        self.s.probe = None;
        self.s.request = None;
        self.s.resync = None;
        self.s.resync_wanted = false;
        self.because(reason);
    }

    fn become_second(&mut self, peer: Peer) {
        // Incremental only along one line of descent with intact local data.
        let full = self.s.self_outdated
            || !self.s.has_data
            || matches!(peer.relation, Relation::SplitBrain | Relation::Unrelated);
        self.act(Action::MountReceiver);
        self.act(Action::StartResync { full });
        self.s.role = Role::Second;
        self.s.uptodate = false;
        self.s.hold = false;
        self.s.resync = None;
        self.s.resync_wanted = false;
        self.because(format!("following the peer {}", peer.role));
    }

    /// Stops the VM and unmounts; `Wait` means stepping down (hold).
    fn step_down(&mut self, to: Role, reason: impl Into<String>) {
        if self.s.role.is_writer() {
            self.act(Action::StopVm);
        }
        if self.s.role != Role::Wait && self.s.role != Role::Stop {
            self.act(Action::Unmount);
        }
        self.s.role = to;
        self.s.hold = to == Role::Wait;
        self.s.peer_controller_down = false;
        self.s.vm_starting = false;
        self.s.swapping = false;
        self.s.swap_refused = false;
        self.s.probe = None;
        self.s.resync = None;
        self.s.resync_wanted = false;
        self.because(reason);
    }

    /// Swap, first half: stop the VM; the hand-over waits for `VmStopDone`.
    fn do_swap(&mut self, reason: &str) {
        self.act(Action::StopVm);
        self.s.swapping = true;
        self.log(format!("{reason}: stopping the VM"));
    }

    /// Persists the flag (raised first, lowered last) and logs the change.
    fn finish(mut self) -> (ModuleState, Vec<Action>) {
        let wanted = match self.s.role {
            Role::Prim | Role::Second => true,
            Role::Alone => false,
            Role::Wait | Role::Stop => {
                self.raise_flag || self.s.peer_is_writer() || self.s.peer_may_be_newer
            }
        };
        if wanted != self.s.peer_may_be_newer {
            self.s.peer_may_be_newer = wanted;
            if wanted {
                self.actions.insert(0, Action::SetPeerMayBeNewer(true));
            } else {
                self.actions.push(Action::SetPeerMayBeNewer(false));
            }
        }
        if self.s.role != self.from {
            let line = format!("{} -> {}: {}", self.from, self.s.role, self.reason);
            self.actions.push(Action::Log(line));
        }
        if self.from == Role::Prim && self.s.role == Role::Alone {
            // The peer is gone: writes go on alone instead of waiting for it.
            self.actions.push(Action::WriteAlone);
        }
        (self.s, self.actions)
    }
}

#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;
