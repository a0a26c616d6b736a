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
//! - `MountWriterConnected` that fails aborts the rest of its step and
//!   reports [`Event::ConnectedMountFailed`] (before any other event).
//! - `AttachPeer` that fails (or leaves no trace in vmha-fs), and a copy to
//!   the SECOND that fails later, report [`Event::AttachFailed`];
//!   `RetryAttach` reports `AttachRetryDue` after a pause (seconds).
//! - `MountReceiver` that fails aborts the rest of its step and reports
//!   [`Event::ReceiverFailed`] (before any other event); `RetryReceiver`
//!   reports `ReceiverRetryDue` after a pause (seconds, growing while the
//!   starts keep failing).
//! - Live swap: `MountStandby` reports `StandbyMounted` or `StandbyFailed`;
//!   `MigrateVm` reports `MigrateDone` (the VM left, paused on the peer) or
//!   `MigrateFailed` (it still runs here); it runs in the background, so the
//!   module's other events (heartbeats, link health, operator requests) are
//!   handled meanwhile. `AbortMigration` ends a running migration at once
//!   (libvirt's job aborted, the forwarded connection cut) and reports
//!   nothing: a late outcome of an aborted migration is never fed back (a
//!   VM that left after all shows as stopped to the checker and restarts
//!   here; the peer destroys its paused copy with its standby).
//!   `ActivateStandby { connected: true }`
//!   that fails aborts the rest of its step and reports
//!   `ConnectedMountFailed` (the standby stays); `ResumeVm` reports
//!   `VmStarted` or `VmStartFailed` (the paused instance destroyed);
//!   `DropStandby` also destroys a paused incoming instance of the domain;
//!   `FlipGeneration` and `AdoptFlip` persist before the next action runs
//!   (a failure is `FsFailed`); a receiver (`MountReceiver`,
//!   `RestartReceiver`) accepts [`crate::generation::receiver_accepts`]: the
//!   peer's current generation, or our own flip of it.
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
//! - **Connected start** (a swap: the SECOND holds all our data and is ready):
//!   the writer replicates to it from the first write
//!   ([`Action::MountWriterConnected`]). If its receiver does not take us
//!   (`ConnectedMountFailed`) the writer starts alone instead, but the SECOND
//!   counts as ready, so first it must learn it is outdated: a new
//!   generation and `MarkPeerOutdated`; only once acknowledged (or the peer is
//!   lost) is the writer mounted alone and the VM started, otherwise the
//!   module steps down as when vmha-fs fails.
//! - **Attaching a SECOND** that is not up to date (its receiver runs: it
//!   announces SECOND only once it does): the writer asks vmha-fs to attach it
//!   and copy what it lacks ([`Action::AttachPeer`]), once per episode; a
//!   failed attach is retried after a pause ([`Action::RetryAttach`]). The
//!   episode ends when the peer is no longer a SECOND behind us, and whenever
//!   vmha-fs is told to write alone (it drops the peer).
//! - **A receiver that does not start** (`ReceiverFailed`: becoming SECOND
//!   failed) steps down to WAIT as when vmha-fs fails, and holds: it follows
//!   a writer again only once the pause asked for by
//!   [`Action::RetryReceiver`] is over (`ReceiverRetryDue`), not at the next
//!   heartbeat. The operator's `start` or `stop` ends the pause.
//! - **A SECOND's receiver died** (`FsDied`): restarted in place
//!   ([`Action::RestartReceiver`]) at most once per
//!   [`RECEIVER_RESTART_INTERVAL_MS`], else the module steps down as for
//!   `FsFailed`.
//! - **Leave** (`vmctl leave`, also at host shutdown): every role hands over
//!   as `stop` does (a PRIM stops its VM and unmounts; its ready SECOND takes
//!   over), and the module stays STOP: `start` and `prim` are refused until
//!   `Join`, which starts it as the daemon does. The driver persists the
//!   node-wide leave and restores it with [`ModuleState::with_left`]. An ALONE
//!   module has nobody to hand over to: its VM is stopped.
//! - **Maintenance** (per module, persisted through [`Action::SetMaintenance`],
//!   announced in heartbeats): in effect when this node *or the peer* announces
//!   it ([`ModuleState::in_maintenance`]; the peer's last announcement counts
//!   even once it is lost, so a peer whose controller restarts during
//!   maintenance is never failed over; `vmctl prim` is the way out). While in
//!   effect nothing automatic happens: no VM restart (`VmStopped`,
//!   `VmStartFailed`), no step down on vmha-fs or disk failure or fencing, no
//!   failover (lost PRIM, PRIM stepped down), no start of a WAIT module, no
//!   witness, no swap-back; each is logged once ([`HeldBack`]). A PRIM that
//!   loses its peer keeps its VM and writes alone (ALONE, no witness: the peer
//!   does not take over either). Still done: operator commands (`stop`,
//!   `swap`, `prim`, `leave`, `join`), explicit hand-overs they cause on the
//!   peer (a SECOND takes over from a writer that announced STOP or asked
//!   `TakeOver`), following a writer as SECOND, two writers resolving, and the
//!   replication link handling (`LinkDown`), which keeps the VM's writes
//!   going. When it ends the module decides on what it knows now, and the
//!   checkers report again by themselves.
//! - **A new vmhad adopts** (`Adopt`, sent instead of `Start` when the
//!   previous vmhad's vmha-fs still runs): a writer claiming this node's
//!   current generation, with the settings this configuration gives it, is
//!   taken over as it is — PRIM (ALONE when it writes alone), same VM, no
//!   new generation, no resync (a VM a live swap left paused beside it,
//!   [`Found::paused_for_swap`], is resumed); a receiver becomes SECOND, up
//!   to date when it accepts this node's current generation (or the one a
//!   current live flip descends from: see [`Found::generation_current`]).
//!   Anything else is stopped (VM first) and the module starts as usual.
//! - **A peer whose controller is down** (`ControllerLost`: its heartbeats
//!   stopped, the replication link is alive) is not failed over and a PRIM
//!   does not go ALONE: the roles stay until the link dies too
//!   (`DataPathLost`, or a PRIM's `LinkDown`), then it is `PeerLost`.
//! - **Live swap** (`vmctl swap --live`, or `swap = "live"`): the PRIM of a
//!   ready, in-sync SECOND whose vmhad announces it can ([`Announce::live_swap`];
//!   older daemons never see the new requests) asks it to prepare
//!   ([`Request::PrepareLive`]); the SECOND mounts in standby beside its
//!   receiver ([`Action::MountStandby`]: reads only, changes fail with EROFS)
//!   and announces [`SwapPhase::Standby`]; the PRIM then live-migrates the VM
//!   ([`Action::MigrateVm`], the destination left paused). `MigrateDone` acts
//!   as a swap's `VmStopDone`: unmount (the writer drains everything
//!   acknowledged), persist the flip of the generation
//!   ([`Action::FlipGeneration`]: a new generation G' derived from G), start
//!   the receiver accepting only G', SECOND, [`Request::TakeOverLive`]. The
//!   SECOND seeing it adopts G' ([`Action::AdoptFlip`]), flips its standby
//!   into the writer claiming G' and replicating to the peer
//!   ([`Action::ActivateStandby`]) and only then resumes the VM
//!   ([`Action::ResumeVm`]): never two writers, and the old writer is fenced
//!   (its peer now accepts G' alone). No resync: a flip only one node knows
//!   counts as its parent ([`crate::generation::compare`]), so either node
//!   crashing between the two persists leaves the nodes in sync or one
//!   simply newer, never split. A failed activation takes the connected
//!   start's path (new generation, peer marked outdated, then activated
//!   alone: an incremental resync). Aborts: a
//!   refused or failed migration keeps the VM on the PRIM (with `swap =
//!   "live"` a plain swap then stops and starts it, logged), its SECOND drops
//!   the standby and any paused incoming instance ([`Action::DropStandby`])
//!   once the PRIM no longer asks; a SECOND that loses its PRIM mid-way drops
//!   them and fails over as usual. While the migration runs, anything that
//!   takes the PRIM out of it (the peer lost, the replication link down, the
//!   SECOND leaving its standby, a step down) aborts it first
//!   ([`Action::AbortMigration`]) and is then handled as usual (ALONE, link
//!   down, ...); a VM stop seen meanwhile is the migration's, not a crash.
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
    /// `swap = "live"`: a plain swap tries a live migration first.
    pub live_swap: bool,
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
            live_swap: module.swap == crate::config::SwapMode::Live,
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
    /// "Compare every block of my copy with yours and repair it" (`vmctl resync
    /// --compare` or `vmctl invalidate` on the SECOND).
    Compare,
    /// "Mount in standby: I am about to live-migrate the VM to you" (live
    /// swap, from the PRIM; sent only to a peer announcing `live_swap`).
    PrepareLive,
    /// "My VM migrated to you and I am your SECOND, drained: activate your
    /// standby and resume it" (live swap, from the old PRIM).
    TakeOverLive,
}

/// Where a live swap stands on this node (`status --json` `swap_phase`,
/// announced in heartbeats).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SwapPhase {
    /// PRIM: the SECOND was asked to mount in standby.
    Preparing,
    /// PRIM: the VM is being live-migrated to the SECOND.
    Migrating,
    /// SECOND: mounting in standby.
    StandbyMounting,
    /// SECOND: in standby, ready for the incoming VM.
    Standby,
    /// SECOND: the standby mount failed (the PRIM gives the live swap up).
    StandbyFailed,
    /// New PRIM: the standby was activated (or is being); resuming the VM.
    Resuming,
}

impl fmt::Display for SwapPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SwapPhase::Preparing => "preparing",
            SwapPhase::Migrating => "migrating",
            SwapPhase::StandbyMounting => "standby_mounting",
            SwapPhase::Standby => "standby",
            SwapPhase::StandbyFailed => "standby_failed",
            SwapPhase::Resuming => "resuming",
        })
    }
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
    /// The module is in maintenance on this node: no automatic reaction on
    /// either node (absent in heartbeats of older daemons: false).
    #[serde(default)]
    pub maintenance: bool,
    /// This node left the cluster (`vmctl leave`): it runs nothing until
    /// `vmctl join` (absent in heartbeats of older daemons: false).
    #[serde(default)]
    pub left: bool,
    /// This vmhad takes part in live swaps (absent in heartbeats of older
    /// daemons: false; they are never sent the live swap requests).
    #[serde(default)]
    pub live_swap: bool,
    /// Where a live swap stands on this node (absent: none).
    // Never skipped when `None`: heartbeat version 4 encodes announcements
    // with bincode, which has no field names to tell a skipped field.
    #[serde(default)]
    pub swap_phase: Option<SwapPhase>,
}

impl Announce {
    /// A node in `role`, ready, with nothing asked and nothing special.
    pub fn ready(role: Role) -> Announce {
        Announce {
            role,
            readiness: Readiness::Ready,
            request: None,
            forced: false,
            disk: Disk::default(),
            maintenance: false,
            left: false,
            live_swap: false,
            swap_phase: None,
        }
    }
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
    /// The peer announces the module in maintenance.
    pub maintenance: bool,
    /// The peer's vmhad takes part in live swaps.
    pub live_swap: bool,
    /// Where a live swap stands on the peer.
    pub swap_phase: Option<SwapPhase>,
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
            maintenance: announce.maintenance,
            live_swap: announce.live_swap,
            swap_phase: announce.swap_phase,
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
    /// `vmctl swap --live`: live-migrate, never fall back to stop/start.
    SwapLive,
    /// A `MountStandby` completed: the standby mount is up.
    StandbyMounted,
    /// A `MountStandby` failed: nothing was mounted.
    StandbyFailed,
    /// A `MigrateVm` completed: the VM runs (paused) on the peer, not here.
    MigrateDone,
    /// A `MigrateVm` failed or was refused: the VM still runs here.
    MigrateFailed {
        reason: String,
    },
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
    /// answer within the failover timeout); `peer_lost` when it was lost.
    PeerMarkedOutdated {
        acknowledged: bool,
        peer_lost: bool,
    },
    /// A `MountWriterConnected` failed (the SECOND's receiver is not there or
    /// refused us): nothing is mounted.
    ConnectedMountFailed,
    /// An `AttachPeer` failed or left no trace, or the copy to the SECOND
    /// failed.
    AttachFailed,
    /// The pause after `RetryAttach` is over.
    AttachRetryDue,
    /// A `MountReceiver` failed (the receiver did not start): nothing is
    /// mounted.
    ReceiverFailed,
    /// The pause after `RetryReceiver` is over.
    ReceiverRetryDue,
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
    /// `vmctl resync --compare`: compare both copies block by block and repair
    /// the SECOND from the PRIM while the VM writes.
    ResyncCompare,
    /// `vmctl invalidate` on a SECOND: discard this copy's records and take a
    /// full compare resync from the PRIM.
    Invalidate,
    /// `vmctl leave` (also at host shutdown): hand over what runs here and
    /// stay out (STOP, `Start` refused) until `Join`.
    Leave,
    /// `vmctl join`: the node is back; the module starts as at daemon start.
    Join,
    /// `vmctl maintenance on|off`: no automatic reaction while on.
    Maintenance(bool),
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
    /// completed: the copy is up to date), or the one this node's current
    /// live flip descends from (a live swap's destination adopted the flip,
    /// nothing was written under it yet).
    pub generation_current: bool,
    /// Writer: it writes alone (ALONE), not replicating to the peer (PRIM).
    pub alone: bool,
    /// Writer: the module's domain runs (paused counts).
    pub vm_running: bool,
    /// Writer: the domain is paused for a live swap that did not resume it
    /// (the previous vmhad died between activating the standby and
    /// resuming the VM): adopted, the VM is resumed ([`Action::ResumeVm`]);
    /// not adopted, it is stopped as a running one.
    pub paused_for_swap: bool,
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
    /// Mount the replicated directories with vmha-fs as the writer, alone
    /// (it replicates once the peer is attached).
    MountWriter,
    /// Mount as the writer replicating to the ready, in-sync SECOND from the
    /// first write; a failure reports `ConnectedMountFailed`.
    MountWriterConnected,
    /// Writer: attach the SECOND that is behind (vmha-fs copies what it lacks,
    /// writes going on); a failure reports `AttachFailed`.
    AttachPeer,
    /// Report `AttachRetryDue` after a pause.
    RetryAttach,
    /// Run the vmha-fs receiver (directories read-only locally); a failure
    /// reports `ReceiverFailed`.
    MountReceiver,
    /// Report `ReceiverRetryDue` after a pause.
    RetryReceiver,
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
    /// Live swap, the old PRIM after its drain: persist the flip of the
    /// current generation ([`crate::generation::GenerationId::flip_of`]),
    /// which the receiver started next accepts alone. A failure is
    /// `FsFailed`.
    FlipGeneration,
    /// Live swap, the new writer before it claims: persist the peer's flip
    /// of our current generation when its heartbeat shows exactly that
    /// (else nothing: an older peer keeps the generation). A failure is
    /// `FsFailed`.
    AdoptFlip,
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
    /// Writer: the next attach of the peer compares every block whatever the
    /// records say (`STATEDIR/compare-resync`).
    RequestCompare,
    /// Receiver: record this copy as not up to date so that its records are
    /// discarded when the receiver starts for the resync (`self-outdated`).
    InvalidateCopy,
    /// Persist the module's maintenance flag (survives daemon restarts).
    SetMaintenance(bool),
    /// SECOND: mount in standby beside the receiver (opens and reads work,
    /// changes fail with EROFS); reports `StandbyMounted` or `StandbyFailed`.
    MountStandby,
    /// SECOND: take the standby mount down and destroy any paused incoming
    /// instance of the domain (a live swap given up).
    DropStandby,
    /// PRIM: live-migrate the domain to the peer, left paused there, in the
    /// background; reports `MigrateDone` or `MigrateFailed` when it ends.
    MigrateVm,
    /// PRIM: abort the running live migration (libvirt's
    /// `virDomainAbortJob`, the forwarded libvirt connection cut); nothing
    /// is reported for it any more (the VM stays here, or, if it left all
    /// the same, the checker sees it stopped).
    AbortMigration,
    /// Turn the standby mount into the writer, replicating to the peer's
    /// receiver (`connected`; this node's receiver stops first) or alone.
    /// A connected activation that fails aborts the step and reports
    /// `ConnectedMountFailed`; the standby stays.
    ActivateStandby { connected: bool },
    /// Resume the migrated (paused) domain; reports `VmStarted`, or
    /// `VmStartFailed` (the paused instance is destroyed).
    ResumeVm,
    /// A line for the module's event log.
    Log(String),
}

/// An automatic reaction held back by maintenance, logged once per episode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldBack {
    /// The VM stopped or failed to start: not restarted.
    VmDown,
    /// vmha-fs failed or the local disk failed: no step down.
    FsFailed,
    /// Our writes were refused by the peer: no step down.
    Fenced,
    /// The peer was lost: no failover, no witness.
    PeerLost,
    /// The writer peer stepped down: no failover.
    Failover,
    /// WAIT would start the module here: not started.
    SelfStart,
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
    /// Where a live swap stands on this node.
    pub live: Option<SwapPhase>,
    /// PRIM: a live swap that fails falls back to stop/start (`swap = "live"`).
    pub live_fallback: bool,
    /// The outcome of the last live swap started here: its number (counted
    /// from 1 at each start) and, when it failed, why (`vmctl swap --live`
    /// waits for it).
    pub live_outcome: (u32, Option<String>),
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
    /// Writer: the connected start failed; the writer mounts alone once the
    /// SECOND knows it is outdated (`PeerMarkedOutdated`).
    pub pending_alone_mount: bool,
    /// Writer: attaching the SECOND that is behind.
    pub attach: Attach,
    /// Mirror of the persisted per-module maintenance flag of this node.
    pub maintenance: bool,
    /// This node left the cluster (node-wide, persisted by the driver): STOP
    /// and `Start` refused until `Join`.
    pub left: bool,
    /// What maintenance held back in this episode (logged once each).
    pub held_back: Vec<HeldBack>,
    /// WAIT: the receiver did not start; a writer is followed again only
    /// after `ReceiverRetryDue`.
    pub receiver_retry: bool,
    /// The peer's heartbeats stopped while its replication link is alive
    /// ([`Event::ControllerLost`]): its controller is down, the data path is
    /// alive. Cleared when it is heard again or the data path dies.
    pub peer_controller_down: bool,
    probe: Option<Probe>,
}

/// Writer: where attaching a SECOND that is behind stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Attach {
    /// No SECOND behind us, or not asked yet.
    #[default]
    Idle,
    /// vmha-fs was asked to attach it (and copies to it).
    Asked,
    /// The attach failed; `AttachRetryDue` asks again.
    Failed,
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
            live: None,
            live_fallback: false,
            live_outcome: (0, None),
            changed_bytes: 0,
            restarts: Vec::new(),
            resync: None,
            resync_wanted: false,
            receiver_restarted_ms: None,
            pending_alone_mount: false,
            attach: Attach::Idle,
            maintenance: false,
            left: false,
            held_back: Vec::new(),
            receiver_retry: false,
            peer_controller_down: false,
            probe: None,
        }
    }

    /// With the persisted maintenance flag.
    pub fn with_maintenance(mut self, flag: bool) -> ModuleState {
        self.maintenance = flag;
        self
    }

    /// With the node's persisted leave: the module stays STOP until `Join`.
    pub fn with_left(mut self, left: bool) -> ModuleState {
        self.left = left;
        self
    }

    /// Maintenance in effect for this module: on this node, or announced by
    /// the peer (its latest heartbeat, even once lost: a peer whose controller
    /// restarts during maintenance must not be failed over).
    pub fn in_maintenance(&self) -> bool {
        self.maintenance || self.last_peer().is_some_and(|p| p.maintenance)
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

    /// `ready` only for a copy known current: a STOP or WAIT node whose data
    /// is not known up to date (no data, behind its peer, its disk failed) is
    /// `not_uptodate`, as DRBD shows "Outdated" on a stopped resource.
    pub fn readiness(&self) -> Readiness {
        match self.role {
            Role::Stop if !self.uptodate => Readiness::NotUpToDate,
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
            maintenance: self.maintenance,
            left: self.left,
            live_swap: true,
            swap_phase: self.live,
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
        from_live: state.live,
        reason: String::new(),
        raise_flag: false,
        migration_reported: false,
        migration_aborted: false,
    };
    t.handle(event);
    t.finish()
}

/// One step under construction.
struct Transition {
    s: ModuleState,
    actions: Vec<Action>,
    from: Role,
    /// Where a live swap stood before the event.
    from_live: Option<SwapPhase>,
    reason: String,
    /// Persist "peer may be newer" even in WAIT/STOP.
    raise_flag: bool,
    /// The event is the running migration's own outcome (no abort then).
    migration_reported: bool,
    /// This step gave the running migration up: no swap starts in it.
    migration_aborted: bool,
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
        if self.s.in_maintenance() && self.held_back(&event) {
            return;
        }
        match event {
            Event::Start => self.start(),
            Event::Stop => self.stop(),
            Event::Swap => self.swap(),
            Event::SwapLive => self.swap_live(),
            Event::StandbyMounted => {
                if self.s.role == Role::Second && self.s.live == Some(SwapPhase::StandbyMounting) {
                    self.s.live = Some(SwapPhase::Standby);
                    self.log("live swap: standby mounted, ready for the incoming VM");
                }
            }
            Event::StandbyFailed => {
                if self.s.role == Role::Second && self.s.live == Some(SwapPhase::StandbyMounting) {
                    self.s.live = Some(SwapPhase::StandbyFailed);
                    self.log("live swap: the standby mount failed; the PRIM keeps the VM");
                }
            }
            Event::MigrateDone => {
                self.migration_reported = true;
                self.migrate_done();
            }
            Event::MigrateFailed { reason } => {
                self.migration_reported = true;
                if self.s.live == Some(SwapPhase::Migrating) {
                    self.live_abort(&format!("the migration failed: {reason}"));
                }
            }
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
                    if self.s.live == Some(SwapPhase::Resuming) {
                        self.s.live = None;
                        self.log("live swap done: the VM resumed on this node");
                    }
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
            Event::PeerMarkedOutdated {
                acknowledged,
                peer_lost,
            } => self.peer_marked_outdated(acknowledged, peer_lost),
            Event::ConnectedMountFailed => self.connected_mount_failed(),
            Event::AttachFailed => {
                if self.s.role.is_writer() && self.s.attach == Attach::Asked {
                    self.s.attach = Attach::Failed;
                    self.act(Action::RetryAttach);
                }
            }
            Event::AttachRetryDue => {
                if self.s.attach == Attach::Failed {
                    self.s.attach = Attach::Idle;
                    if let PeerKnowledge::Seen(peer) = self.s.peer {
                        if self.s.role.is_writer() {
                            self.attach_if_behind(peer);
                        }
                    }
                }
            }
            Event::ReceiverFailed => self.receiver_failed(),
            Event::ReceiverRetryDue => {
                if std::mem::take(&mut self.s.receiver_retry) && self.s.role == Role::Wait {
                    self.evaluate_wait();
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
            Event::ResyncCompare => self.resync_compare(),
            Event::Invalidate => self.invalidate(),
            Event::Leave => self.leave(),
            Event::Join => self.join(),
            Event::Maintenance(on) => self.set_maintenance(on),
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
        let refusal = if self.s.left {
            Some("this node left the cluster")
        } else if !found.settings_match && !self.s.in_maintenance() {
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
        if !found.settings_match {
            // Maintenance (an upgrade, say): the VM is not stopped for a
            // setting; the new one applies at its next start.
            self.log(format!(
                "maintenance: adopting the {kind} although its settings differ from this configuration's (they apply at its next start)"
            ));
        }
        self.s.hold = false;
        self.s.start_wait_over = true;
        self.s.restarts.clear();
        if found.writer {
            // (A writer peer, never known this early in the daemon, is left
            // to the two writers' rule first.)
            let resume = found.paused_for_swap && !self.peer_is_writer();
            self.s.role = if found.alone { Role::Alone } else { Role::Prim };
            if found.alone {
                // It writes without its peer: whatever the peer last showed,
                // it must count itself outdated and be copied to again.
                self.act(Action::NewGeneration);
                self.log(
                    "the adopted writer writes alone: new generation, the peer resynchronises",
                );
            }
            self.s.uptodate = true;
            if !found.vm_running {
                self.act(Action::DefineDomain);
                self.act(Action::StartVm);
                self.s.vm_starting = true;
            } else if resume {
                self.act(Action::ResumeVm);
                self.s.vm_starting = true;
            }
            self.because(if !found.vm_running {
                "adopted the running writer a previous vmhad started; its VM is not running: starting it"
            } else if resume {
                "adopted the running writer a previous vmhad started; the VM a live swap migrated here is still paused: resuming it"
            } else {
                "adopted the running writer and VM a previous vmhad started"
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

    // ---- maintenance and leave ----

    /// Logs what maintenance held back, once per kind and episode.
    fn note(&mut self, kind: HeldBack, line: &str) {
        if !self.s.held_back.contains(&kind) {
            self.s.held_back.push(kind);
            self.log(format!("maintenance: {line}"));
        }
    }

    /// In maintenance: the automatic reactions to checkers and to a lost peer
    /// are held back (true: the event was handled here).
    fn held_back(&mut self, event: &Event) -> bool {
        match event {
            Event::VmStopped { .. } | Event::VmStartFailed { .. } => {
                if self.s.role.is_writer() {
                    self.s.vm_starting = false;
                    self.note(HeldBack::VmDown, "the VM is down; not restarting it");
                }
                true
            }
            Event::FsFailed | Event::DiskFailed | Event::FsDied { .. } => {
                if !matches!(self.s.role, Role::Stop | Role::Wait) {
                    self.note(
                        HeldBack::FsFailed,
                        "vmha-fs or the local disk failed; not acting",
                    );
                }
                true
            }
            Event::Fenced {
                peer_follows_us: false,
            } => {
                if self.s.role.is_writer() {
                    self.note(HeldBack::Fenced, "the peer refused our writes; not acting");
                }
                true
            }
            Event::WitnessResult(_) => {
                // A probe decides a failover or a step down: dropped.
                if self.s.probe.take().is_some() && matches!(self.s.peer, PeerKnowledge::Lost(_)) {
                    self.maintenance_peer_lost();
                }
                true
            }
            Event::PeerLost => {
                if let Some(last) = self.s.last_peer() {
                    self.s.peer = PeerKnowledge::Lost(last);
                    self.maintenance_peer_lost();
                }
                true
            }
            _ => false,
        }
    }

    /// The peer is lost during maintenance: nobody fails over (the peer does
    /// not either: it knows of the maintenance); a PRIM keeps its VM running
    /// and writes alone, without the witness (a step down would stop the VM).
    fn maintenance_peer_lost(&mut self) {
        if self.s.live == Some(SwapPhase::Migrating) {
            self.migration_abort("the peer was lost");
        }
        match self.s.role {
            Role::Prim => self.become_writer(
                Role::Alone,
                true,
                "lost the peer during maintenance: writing alone, the VM keeps running",
            ),
            Role::Second | Role::Wait => {
                self.note(HeldBack::PeerLost, "lost the peer; not failing over")
            }
            Role::Alone | Role::Stop => {}
        }
    }

    fn set_maintenance(&mut self, on: bool) {
        if self.s.maintenance == on {
            self.log(format!(
                "maintenance already {}",
                if on { "on" } else { "off" }
            ));
            return;
        }
        self.s.maintenance = on;
        self.act(Action::SetMaintenance(on));
        if on {
            self.log("maintenance on: no failover, no restart, no checker reaction until `vmctl maintenance off`");
            // A witness probe decides a failover or a step down: dropped.
            if self.s.probe.take().is_some() && matches!(self.s.peer, PeerKnowledge::Lost(_)) {
                self.maintenance_peer_lost();
            }
        } else {
            self.s.held_back.clear();
            self.log("maintenance off: the controller acts again");
            if self.s.in_maintenance() {
                self.log(
                    "the peer is still in maintenance: no automatic reaction until it ends there",
                );
            } else {
                self.reconsider();
            }
        }
    }

    /// Maintenance ended: decide on what is known of the peer now (checkers
    /// report again by themselves).
    fn reconsider(&mut self) {
        match (self.s.peer, self.s.role) {
            (PeerKnowledge::Lost(_), _) => self.peer_lost(),
            (PeerKnowledge::Seen(_), Role::Stop) => {}
            (PeerKnowledge::Seen(_), Role::Wait) => self.evaluate_wait(),
            (PeerKnowledge::Seen(peer), Role::Second) => self.second_sees(peer),
            (PeerKnowledge::Seen(peer), Role::Prim | Role::Alone) => self.writer_sees(peer),
            (PeerKnowledge::Unknown, Role::Wait) => self.evaluate_wait(),
            (PeerKnowledge::Unknown, _) => {}
        }
    }

    /// Hands over what runs here (as `stop`) and stays out until `Join`.
    fn leave(&mut self) {
        if self.s.left {
            self.log("leave: this node is already out");
            return;
        }
        self.s.left = true;
        self.s.request = None;
        // Out of the cluster: no receiver start is pending any more.
        self.s.receiver_retry = false;
        match self.s.role {
            Role::Prim | Role::Alone | Role::Second => {
                self.step_down(Role::Stop, "this node leaves the cluster: handing over")
            }
            Role::Wait => {
                self.s.probe = None;
                self.s.role = Role::Stop;
                self.because("this node leaves the cluster");
            }
            Role::Stop => self.log("this node leaves the cluster"),
        }
    }

    fn join(&mut self) {
        if !self.s.left {
            self.log("join: this node is not out");
            return;
        }
        self.s.left = false;
        self.log("this node joins the cluster again");
        if self.s.role == Role::Stop {
            self.start();
        }
    }

    /// `resync --compare`: on the PRIM of a ready SECOND, the compare resync
    /// starts here; on a ready SECOND, the PRIM is asked in the heartbeats.
    fn resync_compare(&mut self) {
        match (self.s.role, self.s.peer) {
            (Role::Prim, PeerKnowledge::Seen(p))
                if p.role == Role::Second
                    && p.readiness == Readiness::Ready
                    && p.relation == Relation::InSync
                    && !self.s.peer_outdated =>
            {
                self.start_compare("resync --compare requested");
            }
            (Role::Prim, PeerKnowledge::Seen(p)) if p.role == Role::Second => self.log(
                "resync --compare refused: the SECOND is being resynchronised already (retry once it is ready)",
            ),
            (Role::Second, PeerKnowledge::Seen(p)) if p.role == Role::Prim && self.s.uptodate => {
                self.s.request = Some(Request::Compare);
                self.log("resync --compare: asking the PRIM to compare and repair this copy");
            }
            (Role::Second, _) => self.log(
                "resync --compare refused: this SECOND is not up to date or sees no PRIM (use `vmctl invalidate` to discard its copy)",
            ),
            (role, _) => self.log(format!(
                "resync --compare refused: needs a PRIM with its SECOND (this node is {role})"
            )),
        }
    }

    /// `invalidate` on a SECOND (DRBD's invalidate): this copy is not up to
    /// date from now on (persisted first), its records are discarded, and the
    /// PRIM is asked for a compare resync, which compares every block.
    fn invalidate(&mut self) {
        match self.s.role {
            Role::Second if self.peer_is_writer() => {
                self.set_self_outdated(true);
                self.act(Action::InvalidateCopy);
                self.s.uptodate = false;
                self.s.request = Some(Request::Compare);
                self.log("invalidate: this copy is discarded; asking the PRIM for a full compare resync");
            }
            Role::Second => self.log(
                "invalidate refused: no PRIM to resynchronise from is seen",
            ),
            role => self.log(format!(
                "invalidate refused: only a SECOND discards its copy (this node is {role}; on the PRIM use `vmctl resync --compare`)"
            )),
        }
    }

    /// The PRIM starts a compare resync of its SECOND: the next attach compares
    /// every block; the SECOND learns it is outdated (a new generation it must
    /// acknowledge, as when the replication link goes down) before the writer
    /// writes alone, then it is attached again and repaired while the VM writes.
    fn start_compare(&mut self, reason: &str) {
        self.s.peer_outdated = true;
        self.act(Action::RequestCompare);
        self.act(Action::NewGeneration);
        self.act(Action::MarkPeerOutdated);
        self.log(format!(
            "{reason}: marking the SECOND outdated, then comparing every block"
        ));
    }

    // ---- operator commands ----

    fn start(&mut self) {
        if self.s.left {
            self.log("start refused: this node left the cluster (`vmctl join` first)");
            return;
        }
        // The operator asks now: a receiver start is tried at once.
        self.s.receiver_retry = false;
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
        self.s.receiver_retry = false;
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
        if self.s.live.is_some() || self.s.swapping {
            self.log("swap refused: a swap is in progress");
            return;
        }
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

    /// `swap --live`: on the PRIM only, never falling back to stop/start.
    fn swap_live(&mut self) {
        self.s.swap_refused = false;
        match self.live_refusal() {
            Some(why) => self.log(format!("live swap refused: {why}")),
            None => self.start_live(false, "live swap requested"),
        }
    }

    /// Why a live swap cannot start now (`None`: it can).
    fn live_refusal(&self) -> Option<String> {
        if self.s.live.is_some() || self.s.swapping {
            return Some("a swap is in progress".into());
        }
        if self.s.role != Role::Prim {
            return Some(format!(
                "run it on the PRIM with a ready SECOND (this node is {})",
                self.s.role
            ));
        }
        let PeerKnowledge::Seen(p) = self.s.peer else {
            return Some("the peer is not in view".into());
        };
        if !(p.role == Role::Second
            && p.readiness == Readiness::Ready
            && p.relation == Relation::InSync)
            || self.s.peer_outdated
        {
            return Some("needs a ready SECOND in sync with this PRIM".into());
        }
        if !p.live_swap {
            return Some("the peer's vmhad does not take part in live swaps (upgrade it)".into());
        }
        if self.s.vm_starting {
            return Some("the VM is starting".into());
        }
        if self.s.in_maintenance() {
            return Some("the module is in maintenance".into());
        }
        None
    }

    /// Live swap, first half: the SECOND is asked to mount in standby.
    fn start_live(&mut self, fallback: bool, reason: &str) {
        self.s.live = Some(SwapPhase::Preparing);
        self.s.live_fallback = fallback;
        self.s.live_outcome = (self.s.live_outcome.0.wrapping_add(1), None);
        self.s.request = Some(Request::PrepareLive);
        self.log(format!(
            "{reason}: live swap, asking the SECOND to mount in standby"
        ));
    }

    /// The PRIM gives a live swap up: the VM stays here; the SECOND drops its
    /// standby once it no longer sees the request. With `swap = "live"` a
    /// plain swap then stops and starts the VM.
    fn live_abort(&mut self, why: &str) {
        let fallback = std::mem::take(&mut self.s.live_fallback);
        self.s.live = None;
        if self.s.request == Some(Request::PrepareLive) {
            self.s.request = None;
        }
        self.s.live_outcome.1 = Some(why.to_string());
        let can_fall_back = self.s.role == Role::Prim
            && matches!(self.s.peer, PeerKnowledge::Seen(p)
                if p.role == Role::Second && p.readiness == Readiness::Ready);
        // (Maintenance came meanwhile: nothing is stopped automatically.)
        if fallback && can_fall_back && !self.s.in_maintenance() {
            self.log(format!(
                "live swap aborted ({why}): falling back to stop/start"
            ));
            self.do_stop_swap("swap");
        } else {
            self.log(format!(
                "live swap aborted: {why}; the VM keeps running on this node"
            ));
        }
    }

    /// The running migration is given up for `why` (no fallback to
    /// stop/start: something else is wrong); [`Transition::finish`] adds
    /// the `AbortMigration`.
    fn migration_abort(&mut self, why: &str) {
        self.migration_aborted = true;
        self.s.live_fallback = false;
        self.live_abort(&format!("{why} during the migration"));
    }

    /// Live swap, second half on the PRIM: the VM left for the peer, paused
    /// there; hand over as after a swap's stop, asking for a live takeover.
    fn migrate_done(&mut self) {
        if self.s.live != Some(SwapPhase::Migrating) {
            return;
        }
        self.s.live = None;
        self.s.live_fallback = false;
        if self.s.role != Role::Prim {
            // The PRIM role was left meanwhile (never in the driver: leaving
            // it aborts the migration, whose outcome is then not reported):
            // the VM is not here any more.
            self.s.live_outcome.1 = Some("the peer was lost after the migration".into());
            self.s.vm_starting = false;
            self.step_down(
                Role::Wait,
                "live swap: the VM migrated to a peer that is now lost",
            );
            return;
        }
        self.become_ready_second(
            Request::TakeOverLive,
            "live swap: the VM migrated, the peer resumes it",
        );
    }

    /// Live swap on the SECOND: the standby becomes the writer replicating to
    /// the old PRIM (now our drained SECOND), then the migrated VM resumes.
    fn take_over_live(&mut self) {
        self.act(Action::AdoptFlip);
        self.act(Action::ActivateStandby { connected: true });
        self.act(Action::ResumeVm);
        self.s.live = Some(SwapPhase::Resuming);
        self.s.vm_starting = true;
        self.s.role = Role::Prim;
        self.s.uptodate = true;
        self.s.hold = false;
        self.s.probe = None;
        self.s.request = None;
        self.s.resync = None;
        self.s.resync_wanted = false;
        self.s.attach = Attach::Idle;
        self.s.receiver_retry = false;
        self.because("live swap: the peer handed over, the VM resumes here");
    }

    /// SECOND: a live swap is given up (the PRIM no longer asks, this copy
    /// fell behind): the standby and any paused incoming VM go.
    fn drop_standby(&mut self, why: &str) {
        if self.s.live.take().is_some() {
            self.act(Action::DropStandby);
            self.log(format!("live swap: dropping the standby ({why})"));
        }
    }

    fn prim_forced(&mut self) {
        if self.s.left {
            self.log("prim refused: this node left the cluster (`vmctl join` first)");
        } else if self.s.disk_failed {
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
            Some(Request::TakeOver | Request::TakeOverLive) if peer.role.is_writer() => {
                self.s.request = None
            }
            Some(Request::HandOver | Request::Compare) if peer.role != Role::Prim => {
                self.s.request = None
            }
            _ => {}
        }
        if self.s.forced && peer.relation == Relation::InSync && peer.role == Role::Second {
            self.s.forced = false;
        }
        if self.s.peer_outdated && peer.relation == Relation::InSync {
            self.s.peer_outdated = false;
        }
        if !self.s.in_maintenance() {
            self.s.held_back.clear();
        }
        match self.s.role {
            Role::Stop => {
                // Shown, not acted on: a stopped node behind its peer (or
                // beside a writer, which may write at any moment) is no longer
                // known current (`start` recomputes it from the persisted flag).
                if peer.role.is_writer()
                    || matches!(peer.relation, Relation::PeerNewer | Relation::SplitBrain)
                {
                    self.s.uptodate = false;
                }
            }
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
        if self.s.request == Some(Request::Compare)
            && peer.role.is_writer()
            && peer.relation == Relation::PeerNewer
        {
            // The PRIM started the compare resync we asked for.
            self.s.request = None;
            self.s.uptodate = false;
            self.s.resync_wanted = true;
        }
        // Live swap on the SECOND side. A standby given up goes before the
        // resync below: the receiver's restart would wait on the standby's
        // unmount, which the paused incoming VM's open files hold.
        let asks_prepare = peer.role == Role::Prim && peer.request == Some(Request::PrepareLive);
        let hands_over_live =
            peer.role == Role::Second && peer.request == Some(Request::TakeOverLive);
        if self.s.live.is_some() && !self.s.uptodate {
            self.drop_standby("this copy is no longer up to date");
        } else if self.s.live.is_some() && !asks_prepare && !hands_over_live {
            self.drop_standby("the PRIM no longer asks for a live swap");
        } else if asks_prepare
            && self.s.live.is_none()
            && self.s.uptodate
            && !self.s.in_maintenance()
        {
            self.s.live = Some(SwapPhase::StandbyMounting);
            self.act(Action::MountStandby);
            self.log("live swap asked by the PRIM: mounting in standby");
        }
        if self.s.resync_wanted && peer.role.is_writer() {
            self.s.resync_wanted = false;
            let full = peer.relation != Relation::PeerNewer || self.s.self_outdated;
            self.act(Action::StartResync { full });
            self.log("the writer has a newer generation: resynchronising");
        }
        match peer.role {
            Role::Prim | Role::Alone => {}
            Role::Second
                if hands_over_live
                    && self.s.uptodate
                    && self.s.live == Some(SwapPhase::Standby) =>
            {
                self.take_over_live();
            }
            Role::Second if hands_over_live && self.s.uptodate => {
                // No standby to activate (it failed or went): the paused
                // instance goes, the VM starts here as after a stop/start swap.
                self.drop_standby("it is not ready to take the VM over");
                // The old PRIM's receiver accepts only its flip.
                self.act(Action::AdoptFlip);
                self.become_writer(
                    Role::Prim,
                    false,
                    "swap: the peer handed over (the VM restarts)",
                );
            }
            Role::Second if peer.request == Some(Request::TakeOver) && self.s.uptodate => {
                self.become_writer(Role::Prim, false, "swap: the peer handed over");
            }
            Role::Second
                if matches!(
                    self.s.request,
                    Some(Request::TakeOver | Request::TakeOverLive)
                ) =>
            {
                // Our own swap request is on its way.
            }
            Role::Stop if self.s.uptodate => {
                self.become_writer(Role::Alone, true, "the PRIM stopped: taking over");
            }
            Role::Wait if self.s.in_maintenance() => {
                self.note(
                    HeldBack::Failover,
                    "the writer stepped down; not failing over",
                );
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
        if self.s.live == Some(SwapPhase::Migrating)
            && !(peer.role == Role::Second && peer.swap_phase == Some(SwapPhase::Standby))
        {
            // Its vmhad restarted, it stepped down or it took over: nothing
            // may arrive there any more.
            self.migration_abort("the SECOND is no longer in standby");
        }
        if self.s.live == Some(SwapPhase::Preparing) {
            let in_sync_ready = peer.role == Role::Second
                && peer.readiness == Readiness::Ready
                && peer.relation == Relation::InSync
                && !self.s.peer_outdated;
            if !in_sync_ready {
                self.live_abort("the SECOND is no longer ready and in sync");
            } else if peer.swap_phase == Some(SwapPhase::StandbyFailed) {
                self.live_abort("the SECOND could not mount in standby");
            } else if peer.swap_phase == Some(SwapPhase::Standby) && self.s.role == Role::Prim {
                self.s.live = Some(SwapPhase::Migrating);
                self.act(Action::MigrateVm);
                self.log("live swap: the SECOND is in standby; migrating the VM");
                return;
            }
        }
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
                if peer.request == Some(Request::Compare)
                    && self.s.role == Role::Prim
                    && peer.relation == Relation::InSync
                    && !self.s.peer_outdated
                {
                    self.start_compare("the SECOND asked for a compare resync");
                    return;
                }
                self.attach_if_behind(peer);
                let in_sync_ready =
                    peer.readiness == Readiness::Ready && peer.relation == Relation::InSync;
                if self.s.swap_refused
                    || self.s.swapping
                    || self.s.live.is_some()
                    || self.migration_aborted
                {
                    // A swap failed to stop the VM: only the operator retries
                    // (nor while a migration given up here is still ending).
                } else if in_sync_ready && peer.request == Some(Request::HandOver) {
                    self.do_swap("swap asked by the SECOND");
                } else if in_sync_ready
                    && peer.config_match
                    && self.s.request.is_none()
                    && self.s.policy.default_primary == Some(Side::Peer)
                    && !self.s.in_maintenance()
                {
                    self.do_swap("swap back to the default primary");
                }
            }
            _ => {
                self.s.attach = Attach::Idle;
                // (A writer mount still pending waits for the outcome of
                // marking the peer outdated: it mounts first.)
                if self.s.role == Role::Prim && !self.s.pending_alone_mount {
                    self.s.role = Role::Alone;
                    self.act(Action::NewGeneration);
                    self.because(format!("the peer is {}: writing alone", peer.role));
                }
            }
        }
    }

    /// Writer: a SECOND behind us is attached once per episode; the episode
    /// ends when the peer is no longer a SECOND behind us.
    fn attach_if_behind(&mut self, peer: Peer) {
        let behind = peer.role == Role::Second && peer.readiness == Readiness::NotUpToDate;
        match (behind, self.s.attach) {
            (true, Attach::Idle) if !self.s.pending_alone_mount => {
                self.s.attach = Attach::Asked;
                self.act(Action::AttachPeer);
            }
            (true, _) => {}
            // A failed attach keeps its retry; anything else ends the episode.
            (false, Attach::Failed) if peer.role == Role::Second => {}
            (false, _) => self.s.attach = Attach::Idle,
        }
    }

    /// vmha-fs is told to write alone: it drops the peer, whose next attach
    /// is a new episode.
    fn write_alone(&mut self) {
        self.s.attach = Attach::Idle;
        self.act(Action::WriteAlone);
    }

    fn peer_marked_outdated(&mut self, acknowledged: bool, peer_lost: bool) {
        if std::mem::take(&mut self.s.pending_alone_mount) {
            if self.s.role != Role::Prim {
                return;
            }
            if self.peer_is_writer() {
                self.step_down(Role::Wait, "the peer writes: not starting alone");
                self.evaluate_wait();
            } else if (acknowledged || peer_lost) && self.s.live == Some(SwapPhase::Resuming) {
                // Live swap: the standby becomes the writer alone, the
                // migrated VM resumes.
                self.act(Action::ActivateStandby { connected: false });
                self.act(Action::ResumeVm);
                self.s.vm_starting = true;
            } else if acknowledged || peer_lost {
                self.act(Action::MountWriter);
                self.act(Action::DefineDomain);
                self.act(Action::StartVm);
                self.s.vm_starting = true;
            } else {
                self.log("start alone: the SECOND did not learn that it is outdated");
                self.fs_failed();
            }
            return;
        }
        // Replication link down: the peer now knows it is outdated, so
        // writes go on without it (it is resynchronised when it asks).
        // Without its acknowledgement they keep waiting: a lost peer is
        // `PeerLost`'s (maybe through the witness), a newer one makes
        // this node step down.
        if acknowledged && self.s.role == Role::Prim {
            self.write_alone();
        }
    }

    /// The connected start failed: start alone, once the SECOND (which counts
    /// as ready) knows it is outdated.
    fn connected_mount_failed(&mut self) {
        if self.s.role != Role::Prim || self.s.pending_alone_mount {
            return;
        }
        self.s.pending_alone_mount = true;
        self.act(Action::NewGeneration);
        self.act(Action::MarkPeerOutdated);
        self.log("the SECOND did not take the connected start: new generation, starting alone once it knows it is outdated");
    }

    fn peer_lost(&mut self) {
        self.s.peer_controller_down = false;
        if self.s.live == Some(SwapPhase::Migrating) {
            self.migration_abort("the peer was lost");
        }
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
        if self.s.live == Some(SwapPhase::Preparing) {
            self.live_abort("the peer was lost");
        }
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
                if self.s.receiver_retry {
                    // The receiver did not start: `ReceiverRetryDue` follows.
                    return;
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
                if go && self.s.in_maintenance() {
                    self.note(HeldBack::SelfStart, "not starting the module here");
                } else if go {
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
                if can_start && self.s.in_maintenance() {
                    self.note(HeldBack::SelfStart, "not starting the module here");
                } else if can_start {
                    self.go_alone("no peer; local data up to date");
                }
            }
        }
    }

    // ---- checkers ----

    fn vm_failed(&mut self, now_ms: u64, what: &str) {
        if !self.s.role.is_writer() || self.s.live == Some(SwapPhase::Migrating) {
            // (While it migrates, its outcome says where the VM is.)
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

    /// Becoming SECOND failed (the receiver did not start): WAIT as when
    /// vmha-fs fails, following the writer again only after a pause.
    fn receiver_failed(&mut self) {
        if self.s.role != Role::Second {
            return;
        }
        self.s.uptodate = false;
        self.step_down(
            Role::Wait,
            "the receiver did not start: following the writer again after a pause",
        );
        self.s.receiver_retry = true;
        self.act(Action::RetryReceiver);
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
        self.become_ready_second(
            Request::TakeOver,
            "swap: the VM stopped, the peer takes over",
        );
    }

    /// A swap's hand-over once our VM is off this node (stopped or migrated):
    /// the writer goes (its unmount drains to the peer), this node becomes the
    /// peer's up-to-date SECOND and asks it, with `request`, to take over.
    fn become_ready_second(&mut self, request: Request, why: &str) {
        self.act(Action::Unmount);
        if request == Request::TakeOverLive {
            // Drained: the peer holds every write of our generation. The
            // flip is persisted before the receiver that accepts only it.
            self.act(Action::FlipGeneration);
        }
        self.act(Action::MountReceiver);
        self.s.attach = Attach::Idle;
        self.s.role = Role::Second;
        self.s.uptodate = true;
        self.s.vm_starting = false;
        self.s.request = Some(request);
        self.because(why);
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
        if self.s.live == Some(SwapPhase::Migrating) {
            // The migration goes over this link: it ends now, then the link's
            // loss is handled as always (before the writer's lock timeout).
            self.migration_abort("the replication link went down");
        }
        match self.s.role {
            // An ALONE writer has nobody to wait for.
            Role::Alone => self.write_alone(),
            // The peer's controller is down and now its receiver too.
            Role::Prim if self.s.peer_controller_down => {
                self.s.peer_controller_down = false;
                self.log("the peer's replication link is down too: the peer is lost");
                self.peer_lost();
            }
            Role::Prim if !our_second_now => {}
            Role::Prim if peer_knows_outdated => {
                self.log("replication link down; the peer already knows it is outdated");
                self.write_alone();
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
            self.drop_standby("this node takes over");
            self.act(Action::Unmount);
        }
        // Persisted before the first write without the peer.
        if new_generation {
            self.act(Action::NewGeneration);
            self.s.has_data = true;
        }
        if !was_writer {
            // A ready SECOND with our generation (a swap) has all our data: the
            // writer replicates to it from the first write instead of starting
            // alone, which would leave it unattached while it counts as ready.
            let connected = !new_generation
                && matches!(self.s.peer, PeerKnowledge::Seen(p)
                    if p.role == Role::Second
                        && p.readiness == Readiness::Ready
                        && p.relation == Relation::InSync);
            self.act(if connected {
                Action::MountWriterConnected
            } else {
                Action::MountWriter
            });
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
        self.s.attach = Attach::Idle;
        self.s.receiver_retry = false;
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
        if self.s.role == Role::Second {
            self.drop_standby("stepping down");
        }
        if self.s.live.take().is_some() || self.s.request == Some(Request::PrepareLive) {
            self.s.request = None;
            self.s.live_fallback = false;
            if self.s.live_outcome.1.is_none() {
                self.s.live_outcome.1 = Some("the module left this node's role".into());
            }
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
        self.s.pending_alone_mount = false;
        self.s.attach = Attach::Idle;
        self.because(reason);
    }

    /// Swap, first half: live when `swap = "live"` allows it now (falling
    /// back to stop/start if the migration fails), else stop the VM.
    fn do_swap(&mut self, reason: &str) {
        if self.s.policy.live_swap {
            match self.live_refusal() {
                None => return self.start_live(true, reason),
                Some(why) => self.log(format!(
                    "live swap not possible ({why}): stopping and starting the VM instead"
                )),
            }
        }
        self.do_stop_swap(reason);
    }

    /// Swap, first half: stop the VM; the hand-over waits for `VmStopDone`.
    fn do_stop_swap(&mut self, reason: &str) {
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
            self.s.attach = Attach::Idle;
            self.actions.push(Action::WriteAlone);
        }
        if self.from_live == Some(SwapPhase::Migrating)
            && self.s.live != Some(SwapPhase::Migrating)
            && !self.migration_reported
        {
            // Left the migration for any other reason: it is aborted before
            // anything else is done (a VM stop, an unmount, a new generation).
            self.actions.insert(0, Action::AbortMigration);
        }
        (self.s, self.actions)
    }
}

#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;
