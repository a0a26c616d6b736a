//! A tiny two-node simulator: both nodes run `step`, exchange heartbeats,
//! crash, reboot from their persisted metadata, get partitioned; proptest
//! drives random sequences and checks the cluster-wide invariants.

use std::collections::BTreeSet;

use proptest::prelude::*;

use super::*;
use crate::generation::{compare, receiver_accepts, receiver_holds_current, GenerationId, History};

#[derive(Debug, Clone)]
struct Node {
    s: ModuleState,
    alive: bool,
    // Persisted.
    history: History,
    flag: bool,
    self_outdated: bool,
    maintenance: bool,
    /// The node left the cluster (the driver's node-wide file).
    left: bool,
    // Local facts the driver would own.
    changed: u64,
    writer: bool,
    receiver: bool,
    vm: bool,
    probing: bool,
    /// vmha-fs was told to write alone (`WriteAlone`) since the writer mount.
    writes_alone: bool,
    /// A `MarkPeerOutdated` waits for the peer's heartbeat showing it knows.
    marking: bool,
    /// The next `StopVm` fails (the VM keeps running).
    stop_fails: bool,
    /// The next `MountReceiver` fails (the receiver does not start).
    receiver_fails: bool,
    /// A `RetryReceiver` pause runs (its end is `ReceiverRetryDue`).
    receiver_retry: bool,
    /// Counter values on this node's disk.
    data: BTreeSet<u64>,
    /// The standby mount (live swap) is up.
    standby: bool,
    /// A migrated domain waits here, paused.
    incoming: bool,
    /// The next `MountStandby` fails.
    standby_fails: bool,
    /// The next `MigrateVm` fails (libvirt refuses or aborts it).
    migrate_fails: bool,
    /// The generation the receiver accepts (fencing), while it runs.
    accepts: Option<GenerationId>,
    /// The node dies after this many actions of its next step of a live
    /// swap's flip (`FlipGeneration`, `AdoptFlip`).
    crash_in_flip: Option<usize>,
    /// With `crash_in_flip`: only vmhad dies there, and a new one starts at
    /// once and adopts what runs (as [`Op::Restart`]).
    restart_in_flip: bool,
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Start(usize),
    Stop(usize),
    Swap(usize),
    Prim(usize),
    Exchange,
    /// One heartbeat, to one node only.
    Heartbeat(usize),
    Partition,
    Heal,
    Crash(usize),
    Boot(usize),
    /// vmhad alone dies and starts again (vmha-fs, VM and data untouched):
    /// the new one adopts what runs.
    Restart(usize),
    Lost(usize),
    StartWait(usize),
    Resync(usize),
    VmCrash(usize),
    FsFail(usize),
    /// The local disk under a running vmha-fs fails: its copy is lost.
    DiskFail(usize),
    /// `vmctl swap` whose VM stop fails.
    SwapStopFails(usize),
    Write(usize),
    /// A node's witness probe ends; `true`: it could not run this time.
    Witness(usize, bool),
    LinkDown,
    /// `vmctl resync --compare` on a node.
    Compare(usize),
    /// `vmctl invalidate` on a node.
    Invalidate(usize),
    Leave(usize),
    Join(usize),
    Maintenance(usize, bool),
    /// The node's next receiver start fails.
    ReceiverFails(usize),
    /// The node's `RetryReceiver` pause ends.
    ReceiverRetry(usize),
    /// `vmctl swap --live` on a node.
    SwapLive(usize),
    /// The node's next standby mount fails.
    StandbyFails(usize),
    /// The node's next migration fails.
    MigrateFails(usize),
    /// The node dies after this many actions of its next flip step.
    CrashInFlip(usize, usize),
    /// The node's vmhad dies after this many actions of its next flip step
    /// and starts again at once (as [`Op::Restart`]).
    RestartInFlip(usize, usize),
}

fn op() -> impl Strategy<Value = Op> {
    let node = 0usize..2;
    prop_oneof![
        1 => node.clone().prop_map(Op::Start),
        1 => node.clone().prop_map(Op::Stop),
        1 => node.clone().prop_map(Op::Swap),
        1 => node.clone().prop_map(Op::Prim),
        6 => Just(Op::Exchange),
        2 => node.clone().prop_map(Op::Heartbeat),
        1 => Just(Op::Partition),
        1 => Just(Op::Heal),
        1 => node.clone().prop_map(Op::Crash),
        1 => node.clone().prop_map(Op::Boot),
        1 => node.clone().prop_map(Op::Restart),
        2 => node.clone().prop_map(Op::Lost),
        1 => node.clone().prop_map(Op::StartWait),
        2 => node.clone().prop_map(Op::Resync),
        1 => node.clone().prop_map(Op::VmCrash),
        1 => node.clone().prop_map(Op::FsFail),
        1 => node.clone().prop_map(Op::DiskFail),
        1 => node.clone().prop_map(Op::SwapStopFails),
        4 => node.clone().prop_map(Op::Write),
        1 => (node.clone(), any::<bool>()).prop_map(|(i, fails)| Op::Witness(i, fails)),
        1 => Just(Op::LinkDown),
        1 => node.clone().prop_map(Op::Compare),
        1 => node.clone().prop_map(Op::Invalidate),
        1 => node.clone().prop_map(Op::Leave),
        1 => node.clone().prop_map(Op::Join),
        1 => (node.clone(), any::<bool>()).prop_map(|(i, on)| Op::Maintenance(i, on)),
        1 => node.clone().prop_map(Op::ReceiverFails),
        2 => node.clone().prop_map(Op::ReceiverRetry),
        2 => node.clone().prop_map(Op::SwapLive),
        1 => node.clone().prop_map(Op::StandbyFails),
        1 => node.clone().prop_map(Op::MigrateFails),
        2 => (node.clone(), 0usize..4).prop_map(|(i, k)| Op::CrashInFlip(i, k)),
        1 => (node.clone(), 0usize..4).prop_map(|(i, k)| Op::RestartInFlip(i, k)),
    ]
}

/// The operations around a live swap: its steps, writes, and crashes at any
/// point of the flip, with what recovery needs (boots, resyncs, losses).
fn flip_op() -> impl Strategy<Value = Op> {
    let node = 0usize..2;
    prop_oneof![
        3 => node.clone().prop_map(Op::SwapLive),
        6 => Just(Op::Exchange),
        6 => node.clone().prop_map(Op::Heartbeat),
        3 => node.clone().prop_map(Op::Write),
        3 => (node.clone(), 0usize..4).prop_map(|(i, k)| Op::CrashInFlip(i, k)),
        2 => (node.clone(), 0usize..4).prop_map(|(i, k)| Op::RestartInFlip(i, k)),
        1 => node.clone().prop_map(Op::Crash),
        2 => node.clone().prop_map(Op::Boot),
        1 => node.clone().prop_map(Op::Restart),
        2 => node.clone().prop_map(Op::Lost),
        1 => node.clone().prop_map(Op::StartWait),
        2 => node.clone().prop_map(Op::Resync),
        1 => node.clone().prop_map(Op::MigrateFails),
        1 => node.clone().prop_map(Op::StandbyFails),
    ]
}

impl Node {
    /// The state a vmhad starting on this node builds from what it persisted.
    fn started(&self, policy: Policy) -> ModuleState {
        ModuleState::new(policy, self.history.current().is_some(), self.flag)
            .with_self_outdated(self.self_outdated)
            .with_maintenance(self.maintenance)
            .with_left(self.left)
    }
}

#[derive(Debug, Clone, Copy)]
struct Setup {
    failover: bool,
    witness: bool,
    /// What a probe that runs finds.
    witness_answer: WitnessOutcome,
    default_primary: Option<usize>,
    split_brain: u8,
    /// `swap = "live"`.
    live_swap: bool,
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        any::<bool>(),
        any::<bool>(),
        prop_oneof![
            Just(WitnessOutcome::Reachable),
            Just(WitnessOutcome::Unreachable),
            Just(WitnessOutcome::CouldNotProbe),
        ],
        prop::option::of(0usize..2),
        0u8..4,
        any::<bool>(),
    )
        .prop_map(
            |(failover, witness, witness_answer, default_primary, split_brain, live_swap)| Setup {
                failover,
                witness,
                witness_answer,
                default_primary,
                split_brain,
                live_swap,
            },
        )
}

/// The two nodes' policies from one shared configuration.
fn policy_of(setup: Setup, me: usize) -> Policy {
    let side = |n: usize| if n == me { Side::Local } else { Side::Peer };
    Policy {
        failover: setup.failover,
        witness: setup.witness,
        default_primary: setup.default_primary.map(side),
        wins_ties: setup.default_primary.unwrap_or(0) == me,
        split_brain: match setup.split_brain {
            0 => SplitBrainRule::Manual,
            1 => SplitBrainRule::Prefer(side(0)),
            2 => SplitBrainRule::Prefer(side(1)),
            _ => SplitBrainRule::DiscardLeastChanges,
        },
        maxloop: 2,
        loop_interval_ms: 1_000_000,
        live_swap: setup.live_swap,
    }
}

struct Sim {
    setup: Setup,
    nodes: [Node; 2],
    connected: bool,
    link_ok: bool,
    now: u64,
    counter: u64,
    /// Counters acknowledged to the guest.
    acked: BTreeSet<u64>,
    /// Generations started by a writer (`NewGeneration`), not by a flip.
    writer_started: BTreeSet<GenerationId>,
}

impl Sim {
    fn new(setup: Setup) -> Sim {
        let node = |me| Node {
            s: ModuleState::new(policy_of(setup, me), false, false),
            alive: true,
            history: History::empty(),
            flag: false,
            self_outdated: false,
            maintenance: false,
            left: false,
            changed: 0,
            writer: false,
            receiver: false,
            vm: false,
            probing: false,
            writes_alone: false,
            marking: false,
            stop_fails: false,
            receiver_fails: false,
            receiver_retry: false,
            data: BTreeSet::new(),
            standby: false,
            incoming: false,
            standby_fails: false,
            migrate_fails: false,
            accepts: None,
            crash_in_flip: None,
            restart_in_flip: false,
        };
        Sim {
            setup,
            nodes: [node(0), node(1)],
            connected: true,
            link_ok: true,
            now: 0,
            counter: 0,
            acked: BTreeSet::new(),
            writer_started: BTreeSet::new(),
        }
    }

    /// The node dies: its mounts, VM and everything in memory go.
    fn crash(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        n.alive = false;
        n.writer = false;
        n.receiver = false;
        n.vm = false;
        n.probing = false;
        n.writes_alone = false;
        n.marking = false;
        n.receiver_retry = false;
        n.standby = false;
        n.incoming = false;
        n.accepts = None;
        n.crash_in_flip = None;
        n.restart_in_flip = false;
    }

    /// vmhad alone dies and starts again (vmha-fs, VM and data untouched):
    /// the new one adopts what runs.
    fn restart(&mut self, i: usize) {
        if !self.nodes[i].alive {
            return;
        }
        let n = &mut self.nodes[i];
        n.crash_in_flip = None;
        n.restart_in_flip = false;
        let found = Found {
            writer: n.writer,
            settings_match: true,
            // The daemon's rule (`generation_is_ours`): a receiver at the
            // parent of an adopted flip holds the current data.
            generation_current: n.writer
                || n.accepts
                    .is_some_and(|g| receiver_holds_current(&n.history, g)),
            alone: n.writer && n.writes_alone,
            // A paused domain counts as running; beside a writer, a
            // migrated one not resumed yet is the swap's (`resume-pending`).
            vm_running: n.vm || (n.writer && n.incoming),
            paused_for_swap: n.writer && n.incoming,
        };
        let had = n.writer || n.receiver;
        n.probing = false;
        // A standby and a paused incoming instance are taken down by the
        // new vmhad's driver (no live swap runs), except beside a writer: a
        // standby activated, the VM not resumed yet.
        n.standby = false;
        n.incoming = n.incoming && n.writer;
        n.marking = false;
        n.s = n.started(policy_of(self.setup, i));
        self.deliver(
            i,
            if had {
                Event::Adopt(found)
            } else {
                Event::Start
            },
        );
    }

    fn see_each_other(&self) -> bool {
        self.connected && self.nodes.iter().all(|n| n.alive)
    }

    fn deliver(&mut self, i: usize, event: Event) {
        if !self.nodes[i].alive {
            return;
        }
        let (next, actions) = step(&self.nodes[i].s, event.clone());
        for action in &actions {
            if matches!(action, Action::MountWriter | Action::MountWriterConnected) {
                assert!(
                    !next.peer_is_writer(),
                    "node {i} mounts as writer beside a writer\n{event:?}\n{next:?}"
                );
            }
        }
        self.nodes[i].s = next;
        let mut started = false;
        let mut stopped = None;
        let mut failed = None;
        let mut later = Vec::new();
        let peer_receives = self.see_each_other() && self.link_ok && self.nodes[1 - i].receiver;
        let peer_takes_vm = peer_receives && self.nodes[1 - i].standby;
        let peer_vm = self.nodes[1 - i].vm;
        let peer_accepts = self.nodes[1 - i].accepts;
        let flip_step = actions
            .iter()
            .any(|a| matches!(a, Action::FlipGeneration | Action::AdoptFlip));
        let (crash_at, restart) = if flip_step {
            let n = &mut self.nodes[i];
            (
                n.crash_in_flip.take(),
                std::mem::take(&mut n.restart_in_flip),
            )
        } else {
            (None, false)
        };
        let end = |sim: &mut Sim| {
            if restart {
                sim.restart(i);
            } else {
                sim.crash(i);
            }
        };
        let mut done = 0;
        for action in actions {
            if matches!(action, Action::Log(_)) {
                continue;
            }
            if crash_at == Some(done) {
                end(self);
                return;
            }
            done += 1;
            let peer_history = self.nodes[1 - i].history.clone();
            let peer_data = self.nodes[1 - i].data.clone();
            let n = &mut self.nodes[i];
            // A connected writer's claim: the peer's receiver runs and
            // accepts exactly our generation.
            let claim_taken = peer_receives && peer_accepts == n.history.current();
            match action {
                Action::MountWriter => {
                    assert!(!n.receiver && !n.writer, "node {i}: double mount");
                    n.writer = true;
                }
                Action::MountWriterConnected => {
                    assert!(!n.receiver && !n.writer, "node {i}: double mount");
                    if !claim_taken {
                        // The driver aborts the rest of the step.
                        failed = Some(Event::ConnectedMountFailed);
                        break;
                    }
                    n.writer = true;
                }
                Action::MountReceiver => {
                    assert!(!n.receiver && !n.writer, "node {i}: double mount");
                    if std::mem::take(&mut n.receiver_fails) {
                        // The driver aborts the rest of the step.
                        failed = Some(Event::ReceiverFailed);
                        break;
                    }
                    n.receiver = true;
                    n.accepts = receiver_accepts(&n.history, &peer_history);
                }
                Action::RetryReceiver => n.receiver_retry = true,
                Action::Unmount => {
                    n.writer = false;
                    n.receiver = false;
                    n.accepts = None;
                    n.standby = false;
                    n.writes_alone = false;
                }
                Action::MountStandby => {
                    assert!(
                        n.receiver && !n.standby,
                        "node {i}: standby without receiver"
                    );
                    if std::mem::take(&mut n.standby_fails) {
                        later.push(Event::StandbyFailed);
                    } else {
                        n.standby = true;
                        later.push(Event::StandbyMounted);
                    }
                }
                Action::DropStandby => {
                    n.standby = false;
                    n.incoming = false;
                }
                Action::MigrateVm => {
                    assert!(n.writer && n.vm, "node {i}: migrates a VM it does not run");
                    if std::mem::take(&mut n.migrate_fails) || !peer_takes_vm {
                        later.push(Event::MigrateFailed {
                            reason: "refused".into(),
                        });
                    } else {
                        n.vm = false;
                        self.nodes[1 - i].incoming = true;
                        later.push(Event::MigrateDone);
                    }
                }
                // (The simulated migration ends within its step: nothing
                // runs any more to abort.)
                Action::AbortMigration => {}
                Action::ActivateStandby { connected } => {
                    assert!(n.standby && !n.writer, "node {i}: activates no standby");
                    // The receiver stops first.
                    n.receiver = false;
                    n.accepts = None;
                    if connected && !claim_taken {
                        failed = Some(Event::ConnectedMountFailed);
                        break;
                    }
                    n.standby = false;
                    n.writer = true;
                }
                Action::ResumeVm => {
                    assert!(n.writer, "node {i}: VM resumed without the writer mount");
                    assert!(!peer_vm, "node {i}: VM resumed while the peer runs it");
                    if std::mem::take(&mut n.incoming) {
                        n.vm = true;
                        started = true;
                    } else {
                        later.push(Event::VmStartFailed { now_ms: 0 });
                    }
                }
                Action::WriteAlone => {
                    assert!(n.writer, "node {i}: writes alone without the writer mount");
                    n.writes_alone = true;
                }
                Action::RestartReceiver { .. } => {
                    assert!(n.receiver, "node {i}: restarts a receiver it does not run");
                    n.accepts = receiver_accepts(&n.history, &peer_history);
                }
                Action::MarkPeerOutdated => n.marking = true,
                Action::StartVm => {
                    assert!(n.writer, "node {i}: VM started without the writer mount");
                    n.vm = true;
                    started = true;
                }
                Action::StopVm => {
                    let failed = std::mem::take(&mut n.stop_fails);
                    // A paused incoming instance is destroyed at once.
                    n.incoming = false;
                    if !failed {
                        n.vm = false;
                    }
                    stopped = Some(failed);
                }
                Action::NewGeneration => {
                    let id = n.history.start_new();
                    self.writer_started.insert(id);
                    n.changed = 0;
                }
                Action::FlipGeneration => {
                    // After the drain (the writer gone), before the receiver.
                    assert!(!n.writer && !n.receiver, "node {i}: flips while mounted");
                    assert!(!n.vm, "node {i}: flips while running the VM");
                    n.history.start_flip();
                    n.changed = 0;
                }
                Action::AdoptFlip => {
                    if n.history.adopt_flip(&peer_history) {
                        n.changed = 0;
                    }
                }
                Action::AdoptPeerHistory => {
                    n.history.adopt(&peer_history);
                    n.data = peer_data;
                    n.changed = 0;
                }
                Action::SetPeerMayBeNewer(b) => n.flag = b,
                Action::SetSelfOutdated(b) => n.self_outdated = b,
                Action::SetMaintenance(b) => n.maintenance = b,
                Action::ProbeWitness | Action::RetryWitness => n.probing = true,
                Action::DefineDomain
                | Action::StartResync { .. }
                | Action::AttachPeer
                | Action::RetryAttach
                | Action::RequestCompare
                | Action::InvalidateCopy
                | Action::Log(_) => {}
            }
        }
        if crash_at.is_some() {
            // After the whole step (or what ran of it).
            end(self);
            return;
        }
        if let Some(event) = failed {
            self.deliver(i, event);
            return;
        }
        if started {
            self.deliver(i, Event::VmStarted);
        }
        match stopped {
            Some(false) => self.deliver(i, Event::VmStopDone),
            Some(true) => self.deliver(i, Event::VmStopFailed),
            None => {}
        }
        for event in later {
            self.deliver(i, event);
        }
    }

    fn heartbeat(&mut self, to: usize) {
        let from = &self.nodes[1 - to];
        let relation = compare(&self.nodes[to].history, &from.history);
        // The driver's `follow_writer`: a receiver accepts the generation of
        // a writer whose data descends from ours.
        let follows =
            from.s.role.is_writer() && matches!(relation, Relation::PeerNewer | Relation::InSync);
        let writer_generation = from.history.current();
        if self.nodes[to].receiver && follows {
            self.nodes[to].accepts = writer_generation;
        }
        let from = &self.nodes[1 - to];
        let peer = Peer::from_announce(from.s.announce(), relation, true, from.changed);
        let local_changed_bytes = self.nodes[to].changed;
        self.deliver(
            to,
            Event::PeerSeen {
                peer,
                local_changed_bytes,
            },
        );
        // The peer's heartbeat shows it knows it is outdated.
        let knows = relation == Relation::LocalNewer && peer.readiness != Readiness::Ready;
        if self.nodes[to].marking && knows {
            self.nodes[to].marking = false;
            self.deliver(
                to,
                Event::PeerMarkedOutdated {
                    acknowledged: true,
                    peer_lost: false,
                },
            );
        }
    }

    fn apply(&mut self, op: Op) {
        self.now += 1000;
        match op {
            Op::Start(i) => self.deliver(i, Event::Start),
            Op::Stop(i) => self.deliver(i, Event::Stop),
            Op::Swap(i) => self.deliver(i, Event::Swap),
            Op::Prim(i) => self.deliver(i, Event::PrimForced),
            Op::Compare(i) => self.deliver(i, Event::ResyncCompare),
            Op::Invalidate(i) => self.deliver(i, Event::Invalidate),
            Op::Exchange => {
                if self.see_each_other() {
                    self.heartbeat(0);
                    // (Unless node 0 died of what it heard.)
                    if self.see_each_other() {
                        self.heartbeat(1);
                    }
                    let [a, b] = &self.nodes;
                    assert!(
                        !(a.writer && b.writer),
                        "two writers that see each other\n{:?}\n{:?}",
                        a.s,
                        b.s
                    );
                }
            }
            Op::Heartbeat(i) => {
                if self.see_each_other() {
                    self.heartbeat(i);
                }
            }
            Op::Partition => self.connected = false,
            Op::Heal => {
                self.connected = true;
                self.link_ok = true;
            }
            Op::Crash(i) => self.crash(i),
            Op::CrashInFlip(i, k) => {
                if self.nodes[i].alive {
                    self.nodes[i].crash_in_flip = Some(k);
                    self.nodes[i].restart_in_flip = false;
                }
            }
            Op::Boot(i) => {
                if !self.nodes[i].alive {
                    let n = &mut self.nodes[i];
                    n.alive = true;
                    n.s = n.started(policy_of(self.setup, i));
                    self.deliver(i, Event::Start);
                }
            }
            Op::Restart(i) => self.restart(i),
            Op::RestartInFlip(i, k) => {
                if self.nodes[i].alive {
                    self.nodes[i].crash_in_flip = Some(k);
                    self.nodes[i].restart_in_flip = true;
                }
            }
            Op::Lost(i) => {
                if !self.see_each_other() {
                    if std::mem::take(&mut self.nodes[i].marking) {
                        self.deliver(
                            i,
                            Event::PeerMarkedOutdated {
                                acknowledged: false,
                                peer_lost: true,
                            },
                        );
                    }
                    self.deliver(i, Event::PeerLost);
                }
            }
            Op::StartWait(i) => self.deliver(i, Event::StartWaitElapsed),
            Op::Resync(i) => {
                let src = &self.nodes[1 - i];
                // Only a PRIM replicates (an ALONE writer's vmha-fs has no peer), so
                // only a PRIM can bring its SECOND up to date.
                let replicating = src.writer && src.s.role == Role::Prim;
                if self.see_each_other() && self.link_ok && replicating && self.nodes[i].receiver {
                    // The copy done, the writer's vmha-fs replicates again
                    // (it was attached to the SECOND for it).
                    self.nodes[1 - i].writes_alone = false;
                    self.deliver(i, Event::ResyncDone);
                }
            }
            Op::VmCrash(i) => {
                if self.nodes[i].vm && self.nodes[i].alive {
                    self.nodes[i].vm = false;
                    let now_ms = self.now;
                    self.deliver(i, Event::VmStopped { now_ms });
                }
            }
            Op::FsFail(i) => {
                let n = &self.nodes[i];
                if n.writer || n.receiver {
                    let now_ms = self.now;
                    let reason = "vmha-fs died".to_string();
                    self.deliver(i, Event::FsDied { now_ms, reason });
                }
            }
            Op::DiskFail(i) => {
                let n = &mut self.nodes[i];
                if n.alive && (n.writer || n.receiver) {
                    // Nothing on this disk can be trusted any more.
                    n.data.clear();
                    self.deliver(i, Event::DiskFailed);
                }
            }
            Op::SwapStopFails(i) => {
                self.nodes[i].stop_fails = true;
                self.deliver(i, Event::Swap);
                self.nodes[i].stop_fails = false;
            }
            Op::Write(i) => self.write(i),
            Op::Leave(i) => {
                if self.nodes[i].alive {
                    // The driver persists the leave before the modules act.
                    self.nodes[i].left = true;
                    self.deliver(i, Event::Leave);
                }
            }
            Op::Join(i) => {
                if self.nodes[i].alive {
                    self.nodes[i].left = false;
                    self.deliver(i, Event::Join);
                }
            }
            Op::Maintenance(i, on) => self.deliver(i, Event::Maintenance(on)),
            Op::ReceiverFails(i) => self.nodes[i].receiver_fails = true,
            Op::SwapLive(i) => self.deliver(i, Event::SwapLive),
            Op::StandbyFails(i) => self.nodes[i].standby_fails = true,
            Op::MigrateFails(i) => self.nodes[i].migrate_fails = true,
            Op::ReceiverRetry(i) => {
                if std::mem::take(&mut self.nodes[i].receiver_retry) {
                    self.deliver(i, Event::ReceiverRetryDue);
                }
            }
            Op::Witness(i, fails) => {
                if self.nodes[i].probing {
                    self.nodes[i].probing = false;
                    let outcome = if fails {
                        WitnessOutcome::CouldNotProbe
                    } else {
                        self.setup.witness_answer
                    };
                    self.deliver(i, Event::WitnessResult(outcome));
                }
            }
            Op::LinkDown => {
                if self.link_ok && self.see_each_other() {
                    self.link_ok = false;
                    for i in 0..2 {
                        // First-hand: the nodes see each other right now.
                        let relation = compare(&self.nodes[i].history, &self.nodes[1 - i].history);
                        let peer = self.nodes[1 - i].s.announce();
                        let follows = matches!(relation, Relation::LocalNewer | Relation::InSync);
                        self.deliver(
                            i,
                            Event::LinkDown {
                                heartbeats_fresh: true,
                                peer_is_second: peer.role == Role::Second && follows,
                                peer_knows_outdated: relation == Relation::LocalNewer
                                    && peer.readiness != Readiness::Ready,
                            },
                        );
                    }
                }
            }
        }
        self.check();
    }

    /// The guest writes the next counter; acknowledged once on both disks, or
    /// on the writer's alone when it writes without its peer (ALONE, or the
    /// peer marked outdated).
    fn write(&mut self, i: usize) {
        if !(self.nodes[i].alive && self.nodes[i].vm) {
            return;
        }
        let peer = &self.nodes[1 - i];
        let me = &self.nodes[i].s;
        let replicated =
            me.role == Role::Prim && self.see_each_other() && self.link_ok && peer.receiver;
        let degraded_ok = me.role == Role::Alone || self.nodes[i].writes_alone;
        if !replicated && !degraded_ok {
            // vmha-fs holds the write until the controller decides.
            return;
        }
        self.counter += 1;
        let value = self.counter;
        self.nodes[i].data.insert(value);
        self.nodes[i].changed += 1;
        if replicated {
            self.nodes[1 - i].data.insert(value);
        }
        self.acked.insert(value);
    }

    /// No false split brain: the histories diverge only when both branches
    /// above their common generation hold one a writer started (a flip
    /// generation alone is no branch: nothing was written under it without
    /// both nodes knowing it).
    fn check_split_brain(&self) {
        let [a, b] = [&self.nodes[0].history, &self.nodes[1].history];
        if compare(a, b) != Relation::SplitBrain {
            return;
        }
        let Some(common) = a.common_ancestor(b) else {
            return;
        };
        for h in [a, b] {
            let branch: Vec<_> = h
                .current()
                .iter()
                .chain(h.previous())
                .take_while(|g| **g != common)
                .copied()
                .collect();
            assert!(
                branch.iter().any(|g| self.writer_started.contains(g)),
                "false split brain: {a:?} vs {b:?}\n{:?}\n{:?}",
                self.nodes[0].s,
                self.nodes[1].s
            );
        }
    }

    /// Every acknowledged counter is on the node that runs the VM.
    fn check_no_lost_write(&self) {
        for n in &self.nodes {
            if n.alive && n.vm {
                let missing: Vec<_> = self.acked.difference(&n.data).collect();
                assert!(missing.is_empty(), "lost {:?} on {:?}", missing, n.s);
            }
        }
    }

    fn check(&self) {
        self.check_split_brain();
        // A paused instance never waits beside the running VM.
        for (i, n) in self.nodes.iter().enumerate() {
            assert!(!(n.vm && n.incoming), "node {i}: VM and a paused instance");
            // The standby only beside the receiver of a SECOND (or of a
            // PRIM whose connected activation failed and waits).
            if n.standby && n.alive {
                assert!(
                    n.s.live.is_some() && !n.writer,
                    "node {i}: standby outside a live swap {:?}",
                    n.s
                );
            }
            assert!(
                !(n.writer && n.receiver),
                "node {i} both writer and receiver"
            );
            assert!(
                !n.vm || n.writer,
                "node {i} runs the VM without the writer mount"
            );
            if n.alive {
                assert_eq!(n.s.peer_may_be_newer, n.flag, "node {i}: flag mirror");
                assert_eq!(
                    n.s.self_outdated, n.self_outdated,
                    "node {i}: self-outdated mirror"
                );
                assert_eq!(
                    n.s.maintenance, n.maintenance,
                    "node {i}: maintenance mirror"
                );
                // A node that left runs nothing until it joins.
                assert_eq!(n.s.left, n.left, "node {i}: left mirror");
                if n.left {
                    assert!(
                        n.s.role == Role::Stop && !n.writer && !n.receiver && !n.vm,
                        "node {i} left but {:?}",
                        n.s
                    );
                }
                // A failed disk is never written by a vmha-fs of this node.
                if n.s.disk_failed {
                    assert!(!n.writer && !n.receiver && !n.vm, "node {i}: {:?}", n.s);
                }
                // A SECOND runs its receiver; a pause after a failed
                // receiver start holds in WAIT, with its retry pending.
                if n.s.role == Role::Second {
                    assert!(
                        n.receiver,
                        "node {i}: SECOND without its receiver {:?}",
                        n.s
                    );
                }
                if n.s.receiver_retry {
                    assert!(
                        n.s.role == Role::Wait && n.receiver_retry,
                        "node {i}: {:?}",
                        n.s
                    );
                }
                // A writer whose connected start failed is mounted once
                // its SECOND knows it is outdated.
                assert_eq!(
                    n.writer,
                    n.s.role.is_writer() && !n.s.pending_alone_mount,
                    "node {i}: mount vs role {:?}",
                    n.s
                );
            }
            // The surviving up-to-date SECOND fails over when its PRIM is lost.
            let s = &n.s;
            if n.alive
                && s.role == Role::Second
                && s.readiness() == Readiness::Ready
                && s.policy.failover
                && !s.policy.witness
                && !s.in_maintenance()
            {
                let (after, _) = step(s, Event::PeerLost);
                assert_eq!(after.role, Role::Alone, "node {i}: no failover from {s:?}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// Two writers never see each other once heartbeats are exchanged, mounts
    /// and VMs follow the roles, and a ready SECOND always could fail over.
    #[test]
    fn two_nodes_never_both_write(
        setup in setup(),
        first in 0usize..2,
        ops in prop::collection::vec(op(), 1..80),
    ) {
        let mut sim = Sim::new(setup);
        // The very first start: prim on the node holding the data.
        sim.apply(Op::Start(0));
        sim.apply(Op::Start(1));
        sim.apply(Op::Prim(first));
        for op in ops {
            sim.apply(op);
        }
    }

    /// With crashes only (no partition, no forced start, no link failure), no
    /// acknowledged counter is ever missing from the node running the VM.
    #[test]
    fn crashes_never_lose_acknowledged_writes(
        setup in setup(),
        first in 0usize..2,
        ops in prop::collection::vec(op(), 1..100),
    ) {
        let mut sim = Sim::new(setup);
        sim.apply(Op::Start(0));
        sim.apply(Op::Start(1));
        sim.apply(Op::Prim(first));
        for op in ops {
            if matches!(op, Op::Partition | Op::Prim(_) | Op::LinkDown) {
                continue;
            }
            // In maintenance a failed disk is the operator's to handle: the VM
            // stays on it (vmha-fs fails its I/O, it never serves lost data).
            if matches!(op, Op::DiskFail(i) if sim.nodes[i].s.in_maintenance()) {
                continue;
            }
            sim.apply(op);
            sim.check_no_lost_write();
        }
    }

    /// Live swaps with either node crashing at any point of the flip (and
    /// what follows: boots, losses, resyncs, more swaps): no acknowledged
    /// write is lost, and no split brain is declared where only one node
    /// wrote (`check`, after every operation).
    #[test]
    fn live_swaps_crashing_anywhere_in_the_flip_lose_nothing(
        setup in setup(),
        ops in prop::collection::vec(flip_op(), 1..120),
    ) {
        let mut sim = pair_with(Setup { witness: false, ..setup });
        for op in ops {
            sim.apply(op);
            sim.check_no_lost_write();
        }
    }
}

/// A scripted run of the design's life cycle through the simulator.
#[test]
fn life_cycle_through_the_simulator() {
    let setup = Setup {
        failover: true,
        witness: false,
        witness_answer: WitnessOutcome::Reachable,
        default_primary: Some(0),
        split_brain: 3,
        live_swap: false,
    };
    let mut sim = Sim::new(setup);
    for op in [
        Op::Start(0),
        Op::Start(1),
        Op::Prim(0),
        Op::Exchange,
        Op::Exchange,
    ] {
        sim.apply(op);
    }
    let roles = |sim: &Sim| (sim.nodes[0].s.role, sim.nodes[1].s.role);
    assert_eq!(roles(&sim), (Role::Prim, Role::Second));
    sim.apply(Op::Write(0));
    sim.apply(Op::Resync(1));
    sim.apply(Op::Exchange);
    assert_eq!(sim.nodes[1].s.readiness(), Readiness::Ready);
    // node1 crashes: node2 fails over with every acknowledged counter.
    sim.apply(Op::Write(0));
    sim.apply(Op::Crash(0));
    sim.apply(Op::Lost(1));
    assert_eq!(sim.nodes[1].s.role, Role::Alone);
    assert!(sim.acked.is_subset(&sim.nodes[1].data));
    sim.apply(Op::Write(1));
    // node1 returns: it waits (flag), then follows node2 as SECOND.
    sim.apply(Op::Boot(0));
    sim.apply(Op::StartWait(0));
    assert_eq!(sim.nodes[0].s.role, Role::Wait);
    sim.apply(Op::Exchange);
    assert_eq!(roles(&sim), (Role::Second, Role::Prim));
    sim.apply(Op::Resync(0));
    // Swap back to the default primary once it is ready.
    sim.apply(Op::Exchange);
    sim.apply(Op::Exchange);
    assert_eq!(roles(&sim), (Role::Prim, Role::Second));
    assert!(sim.nodes[0].vm && !sim.nodes[1].vm);
    assert!(sim.acked.is_subset(&sim.nodes[0].data));
}

/// Both nodes rebooted (site power loss): the tie-break winner starts, writes
/// and dies before the loser hears of it; the loser must not start stale data.
#[test]
fn tie_break_winner_vanishing_loses_nothing() {
    let setup = Setup {
        failover: true,
        witness: false,
        witness_answer: WitnessOutcome::Reachable,
        default_primary: None,
        split_brain: 3,
        live_swap: false,
    };
    let mut sim = Sim::new(setup);
    for op in [
        Op::Start(0),
        Op::Start(1),
        Op::Prim(0),
        Op::Exchange,
        Op::Resync(1),
        Op::Exchange,
    ] {
        sim.apply(op);
    }
    for op in [
        Op::Crash(0),
        Op::Crash(1),
        Op::Boot(0),
        Op::Boot(1),
        Op::Heartbeat(1),
        Op::Heartbeat(0),
    ] {
        sim.apply(op);
    }
    assert_eq!(sim.nodes[0].s.role, Role::Alone);
    sim.apply(Op::Write(0));
    assert_eq!(sim.acked.len(), 1);
    for op in [Op::Crash(0), Op::Lost(1), Op::StartWait(1)] {
        sim.apply(op);
    }
    assert_eq!(sim.nodes[1].s.role, Role::Wait);
    assert!(!sim.nodes[1].vm);
}

/// Leave through the simulator: the PRIM hands over, stays out across a
/// reboot, and comes back as SECOND on `join`; maintenance holds a failover.
#[test]
fn leave_and_maintenance_through_the_simulator() {
    let setup = Setup {
        failover: true,
        witness: false,
        witness_answer: WitnessOutcome::Reachable,
        default_primary: None,
        split_brain: 3,
        live_swap: false,
    };
    let mut sim = Sim::new(setup);
    for op in [
        Op::Start(0),
        Op::Start(1),
        Op::Prim(0),
        Op::Exchange,
        Op::Exchange,
        Op::Write(0),
        Op::Resync(1),
        Op::Exchange,
    ] {
        sim.apply(op);
    }
    let roles = |sim: &Sim| (sim.nodes[0].s.role, sim.nodes[1].s.role);
    assert_eq!(roles(&sim), (Role::Prim, Role::Second));
    assert_eq!(sim.nodes[1].s.readiness(), Readiness::Ready);
    sim.apply(Op::Leave(0));
    sim.apply(Op::Exchange);
    assert_eq!(roles(&sim), (Role::Stop, Role::Alone));
    assert!(sim.acked.is_subset(&sim.nodes[1].data));
    sim.apply(Op::Write(1));
    for op in [
        Op::Crash(0),
        Op::Boot(0),
        Op::StartWait(0),
        Op::Exchange,
        Op::Exchange,
    ] {
        sim.apply(op);
    }
    assert_eq!(sim.nodes[0].s.role, Role::Stop, "a reboot ended the leave");
    sim.apply(Op::Join(0));
    sim.apply(Op::Exchange);
    sim.apply(Op::Resync(0));
    sim.apply(Op::Exchange);
    assert_eq!(roles(&sim), (Role::Second, Role::Prim));
    // Maintenance on the PRIM's node: its crash is not failed over.
    sim.apply(Op::Maintenance(1, true));
    sim.apply(Op::Exchange);
    sim.apply(Op::Crash(1));
    sim.apply(Op::Lost(0));
    assert_eq!(sim.nodes[0].s.role, Role::Second);
    assert!(!sim.nodes[0].vm);
}

/// PRIM and ready SECOND, node 0 PRIM, with one acknowledged write.
fn pair(live_swap: bool) -> Sim {
    let sim = pair_with(Setup {
        failover: true,
        witness: false,
        witness_answer: WitnessOutcome::Reachable,
        default_primary: None,
        split_brain: 3,
        live_swap,
    });
    assert_eq!(sim.nodes[1].s.readiness(), Readiness::Ready);
    sim
}

/// [`pair`] under `setup`.
fn pair_with(setup: Setup) -> Sim {
    let mut sim = Sim::new(setup);
    for op in [
        Op::Start(0),
        Op::Start(1),
        Op::Prim(0),
        Op::Exchange,
        Op::Exchange,
        Op::Write(0),
        Op::Resync(1),
        Op::Exchange,
        Op::Write(0),
    ] {
        sim.apply(op);
    }
    sim
}

fn roles(sim: &Sim) -> (Role, Role) {
    (sim.nodes[0].s.role, sim.nodes[1].s.role)
}

/// A live swap there and back: the VM moves without a restart, is never
/// resumed before the old writer is gone, and every acknowledged write is
/// on the node that runs it.
#[test]
fn live_swap_there_and_back_through_the_simulator() {
    let mut sim = pair(false);
    for (from, to) in [(0, 1), (1, 0)] {
        let before = sim.nodes[from].history.current().unwrap();
        sim.apply(Op::SwapLive(from));
        assert_eq!(sim.nodes[from].s.live, Some(SwapPhase::Preparing));
        // The SECOND mounts in standby; the PRIM migrates and hands over;
        // the SECOND activates and resumes.
        sim.apply(Op::Heartbeat(to));
        assert!(sim.nodes[to].standby);
        sim.apply(Op::Heartbeat(from));
        assert!(!sim.nodes[from].vm && sim.nodes[to].incoming);
        assert_eq!(sim.nodes[from].s.role, Role::Second);
        assert!(sim.nodes[from].receiver && !sim.nodes[from].writer);
        sim.apply(Op::Heartbeat(to));
        assert!(sim.nodes[to].vm && sim.nodes[to].writer && !sim.nodes[to].standby);
        assert_eq!(sim.nodes[to].s.role, Role::Prim);
        assert_eq!(sim.nodes[to].s.live, None);
        sim.apply(Op::Exchange);
        sim.apply(Op::Write(to));
        assert!(sim.acked.is_subset(&sim.nodes[to].data));
        assert!(sim.acked.is_subset(&sim.nodes[from].data));
        // A new generation on both, the flip of the one before: the same,
        // so no resync follows.
        assert_eq!(sim.nodes[0].history, sim.nodes[1].history);
        let h = &sim.nodes[to].history;
        assert!(h.current_is_flip(), "{h:?}");
        assert_eq!(h.previous()[0], before);
        assert_eq!(sim.nodes[from].s.readiness(), Readiness::Ready);
    }
    assert_eq!(roles(&sim), (Role::Prim, Role::Second));
}

/// Abort points: the migration refused, the standby mount failed, the
/// source lost after the migration, the destination lost in standby.
#[test]
fn live_swap_aborts_leave_the_vm_on_one_node_through_the_simulator() {
    // Migration refused: the VM stays on the PRIM, the SECOND drops its standby.
    let mut sim = pair(false);
    sim.apply(Op::MigrateFails(0));
    sim.apply(Op::SwapLive(0));
    sim.apply(Op::Heartbeat(1));
    sim.apply(Op::Heartbeat(0));
    assert!(sim.nodes[0].vm);
    assert_eq!(sim.nodes[0].s.live_outcome.0, 1);
    assert!(sim.nodes[0].s.live_outcome.1.is_some());
    sim.apply(Op::Exchange);
    assert_eq!(roles(&sim), (Role::Prim, Role::Second));
    assert!(!sim.nodes[1].standby && !sim.nodes[1].incoming);

    // With `swap = "live"`, a plain swap falls back to stop/start.
    let mut sim = pair(true);
    sim.apply(Op::MigrateFails(0));
    sim.apply(Op::Swap(0));
    sim.apply(Op::Heartbeat(1));
    sim.apply(Op::Heartbeat(0));
    sim.apply(Op::Exchange);
    sim.apply(Op::Exchange);
    assert_eq!(roles(&sim), (Role::Second, Role::Prim));
    assert!(sim.nodes[1].vm && !sim.nodes[1].standby);

    // The standby mount fails: the PRIM keeps the VM.
    let mut sim = pair(false);
    sim.apply(Op::StandbyFails(1));
    sim.apply(Op::SwapLive(0));
    sim.apply(Op::Exchange);
    sim.apply(Op::Exchange);
    assert_eq!(roles(&sim), (Role::Prim, Role::Second));
    assert!(sim.nodes[0].vm && sim.nodes[0].s.live.is_none());
    assert_eq!(sim.nodes[1].s.live, None);

    // The source dies once the VM left it: the destination drops the paused
    // instance and fails over with every acknowledged write.
    let mut sim = pair(false);
    sim.apply(Op::SwapLive(0));
    sim.apply(Op::Heartbeat(1));
    sim.apply(Op::Heartbeat(0));
    assert!(sim.nodes[1].incoming);
    sim.apply(Op::Crash(0));
    sim.apply(Op::Lost(1));
    assert_eq!(sim.nodes[1].s.role, Role::Alone);
    assert!(sim.nodes[1].vm && !sim.nodes[1].standby);
    assert!(sim.acked.is_subset(&sim.nodes[1].data));

    // The destination dies in standby: the PRIM's migration fails, it goes
    // ALONE and keeps the VM.
    let mut sim = pair(false);
    sim.apply(Op::SwapLive(0));
    sim.apply(Op::Heartbeat(1));
    sim.apply(Op::Crash(1));
    sim.apply(Op::Heartbeat(0));
    sim.apply(Op::Lost(0));
    assert_eq!(sim.nodes[0].s.role, Role::Alone);
    assert!(sim.nodes[0].vm);
    sim.apply(Op::Write(0));
    assert!(sim.acked.is_subset(&sim.nodes[0].data));
}

/// Either node crashing at each point of the flip (before or after the old
/// PRIM's drain, its flip persisted, its receiver started; before or after
/// the new writer adopted the flip, activated, resumed): the survivor runs
/// the VM with every acknowledged write, and the crashed node comes back as
/// its SECOND through an incremental resync (its data an ancestor of the
/// survivor's, never a split brain).
#[test]
fn live_swap_survives_a_crash_at_every_point_of_the_flip() {
    for victim in 0..2 {
        for k in 0..4 {
            let mut sim = pair(false);
            sim.apply(Op::CrashInFlip(victim, k));
            sim.apply(Op::SwapLive(0));
            sim.apply(Op::Heartbeat(1));
            sim.apply(Op::Heartbeat(0));
            sim.apply(Op::Heartbeat(1));
            let survivor = 1 - victim;
            let case = format!("victim {victim} after {k} actions");
            assert!(!sim.nodes[victim].alive, "{case}: no crash");
            sim.apply(Op::Lost(survivor));
            assert_eq!(sim.nodes[survivor].s.role, Role::Alone, "{case}");
            assert!(sim.nodes[survivor].vm, "{case}");
            sim.apply(Op::Write(survivor));
            sim.check_no_lost_write();
            sim.apply(Op::Boot(victim));
            let relation = compare(&sim.nodes[victim].history, &sim.nodes[survivor].history);
            assert_eq!(relation, Relation::PeerNewer, "{case}");
            for op in [
                Op::StartWait(victim),
                Op::Exchange,
                Op::Exchange,
                Op::Resync(victim),
                Op::Exchange,
            ] {
                sim.apply(op);
            }
            assert_eq!(sim.nodes[survivor].s.role, Role::Prim, "{case}");
            assert_eq!(
                (sim.nodes[victim].s.role, sim.nodes[victim].s.readiness()),
                (Role::Second, Readiness::Ready),
                "{case}"
            );
            assert!(sim.acked.is_subset(&sim.nodes[victim].data), "{case}");
        }
    }
}

/// A live swap from node 0 whose destination's vmhad dies after `k` actions
/// of the take-over step and starts again at once, adopting what runs.
fn restarted_mid_hand_over(k: usize, case: &str) -> Sim {
    let mut sim = pair(false);
    sim.apply(Op::RestartInFlip(1, k));
    sim.apply(Op::SwapLive(0));
    sim.apply(Op::Heartbeat(1));
    sim.apply(Op::Heartbeat(0));
    assert!(!sim.nodes[0].vm && sim.nodes[1].incoming, "{case}");
    // The hand-over asked: node 1 starts taking over, its vmhad dies
    // part-way and the new one adopts what it finds.
    sim.apply(Op::Heartbeat(1));
    assert!(sim.nodes[1].alive, "{case}");
    assert!(!sim.nodes[1].restart_in_flip, "{case}: no restart");
    sim
}

/// The destination's vmhad dies at each point of the hand-over (before or
/// after adopting the flip, after activating the standby, after resuming)
/// and starts again at once, adopting what runs: the VM ends on the
/// destination, never restarted on the old PRIM, with every acknowledged
/// write, and both nodes stay in sync (no resync). Before the activation
/// the new vmhad's driver takes the standby and the paused instance down
/// and the VM starts; after it, the writer is adopted and the VM, paused
/// for the swap, is resumed (the daemon's `resume-pending`). After the adoption of the
/// flip its receiver still accepts the generation before the flip: counted
/// up to date, it takes the hand-over; counted behind (the old rule), it
/// stepped down and the old PRIM failed over, restarting the VM there.
#[test]
fn a_destination_whose_vmhad_restarts_mid_hand_over_takes_the_vm() {
    for k in 0..4 {
        let case = format!("vmhad of node 1 restarted after {k} actions");
        let mut sim = restarted_mid_hand_over(k, &case);
        for _ in 0..3 {
            sim.apply(Op::Exchange);
        }
        assert_eq!(roles(&sim), (Role::Second, Role::Prim), "{case}");
        assert!(sim.nodes[1].vm && !sim.nodes[0].vm, "{case}");
        assert_eq!(sim.nodes[0].history, sim.nodes[1].history, "{case}");
        assert_eq!(sim.nodes[0].s.readiness(), Readiness::Ready, "{case}");
        sim.apply(Op::Write(1));
        assert!(sim.acked.is_subset(&sim.nodes[0].data), "{case}");
        assert!(sim.acked.is_subset(&sim.nodes[1].data), "{case}");
    }
}

/// The same restart of the destination's vmhad, the old PRIM lost meanwhile
/// (before it hears the new vmhad): the destination, up to date, fails over
/// and runs the VM with every acknowledged write; the old PRIM comes back as
/// its SECOND through an incremental resync. Counted behind (the old rule),
/// the destination did not fail over: the VM ran nowhere.
#[test]
fn a_destination_restarted_mid_hand_over_fails_over_when_the_old_prim_is_lost() {
    for k in 0..2 {
        let case = format!("vmhad of node 1 restarted after {k} actions");
        let mut sim = restarted_mid_hand_over(k, &case);
        sim.apply(Op::Crash(0));
        sim.apply(Op::Lost(1));
        assert_eq!(sim.nodes[1].s.role, Role::Alone, "{case}");
        assert!(sim.nodes[1].vm, "{case}");
        sim.apply(Op::Write(1));
        sim.check_no_lost_write();
        sim.apply(Op::Boot(0));
        let relation = compare(&sim.nodes[0].history, &sim.nodes[1].history);
        assert_eq!(relation, Relation::PeerNewer, "{case}");
        for op in [
            Op::StartWait(0),
            Op::Exchange,
            Op::Exchange,
            Op::Resync(0),
            Op::Exchange,
        ] {
            sim.apply(op);
        }
        assert_eq!(roles(&sim), (Role::Second, Role::Prim), "{case}");
        assert_eq!(sim.nodes[0].s.readiness(), Readiness::Ready, "{case}");
        assert!(sim.acked.is_subset(&sim.nodes[0].data), "{case}");
    }
}

/// Judged with the plain rule (no flip counted as its parent), the old PRIM
/// that crashed right after persisting its flip would be a split brain with
/// the SECOND that failed over: what the flip rule prevents.
#[test]
fn an_unshared_flip_is_no_split_brain() {
    let mut sim = pair(false);
    sim.apply(Op::CrashInFlip(0, 2));
    sim.apply(Op::SwapLive(0));
    sim.apply(Op::Heartbeat(1));
    sim.apply(Op::Heartbeat(0));
    assert!(!sim.nodes[0].alive);
    let old = sim.nodes[0].history.clone();
    assert!(old.current_is_flip(), "{old:?}");
    sim.apply(Op::Lost(1));
    let new = sim.nodes[1].history.clone();
    assert!(!new.previous().contains(&old.current().unwrap()));
    assert_eq!(new.previous()[0], old.previous()[0]);
    assert_eq!(compare(&old, &new), Relation::PeerNewer);
}
