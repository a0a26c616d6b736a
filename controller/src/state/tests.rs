//! Scenarios of the design, and an exhaustive (state × event) table checked
//! against the invariants.

use super::*;

pub(super) fn policy() -> Policy {
    Policy {
        failover: true,
        witness: false,
        default_primary: None,
        wins_ties: true,
        split_brain: SplitBrainRule::DiscardLeastChanges,
        maxloop: 3,
        loop_interval_ms: 86_400_000,
    }
}

fn peer(role: Role, readiness: Readiness, relation: Relation) -> Peer {
    Peer {
        role,
        readiness,
        request: None,
        forced: false,
        relation,
        config_match: true,
        changed_bytes: 0,
    }
}

fn seen(p: Peer) -> Event {
    Event::PeerSeen {
        peer: p,
        local_changed_bytes: 0,
    }
}

/// Runs events in order; returns the final state and every non-log action.
/// Like the driver, a `StopVm` reports its outcome: `VmStopDone` (see
/// [`run_exact`] for a failing stop).
fn run(state: &ModuleState, events: &[Event]) -> (ModuleState, Vec<Action>) {
    let mut state = state.clone();
    let mut all = Vec::new();
    for event in events {
        let mut queue = vec![event.clone()];
        while let Some(event) = queue.pop() {
            let (next, actions) = step(&state, event.clone());
            check_invariants(&state, &event, &next, &actions);
            state = next;
            if actions.contains(&Action::StopVm) {
                queue.push(Event::VmStopDone);
            }
            all.extend(actions.into_iter().filter(|a| !matches!(a, Action::Log(_))));
        }
    }
    (state, all)
}

/// [`run`] without completing anything: events exactly as given.
fn run_exact(state: &ModuleState, events: &[Event]) -> (ModuleState, Vec<Action>) {
    let mut state = state.clone();
    let mut all = Vec::new();
    for event in events {
        let (next, actions) = step(&state, event.clone());
        check_invariants(&state, event, &next, &actions);
        state = next;
        all.extend(actions.into_iter().filter(|a| !matches!(a, Action::Log(_))));
    }
    (state, all)
}

fn fresh(has_data: bool, flag: bool) -> ModuleState {
    ModuleState::new(policy(), has_data, flag)
}

/// PRIM with a ready SECOND, VM running.
fn prim() -> ModuleState {
    let (s, _) = run(
        &fresh(true, false),
        &[
            Event::Start,
            Event::StartWaitElapsed,
            Event::VmStarted,
            seen(peer(Role::Second, Readiness::Ready, Relation::InSync)),
        ],
    );
    assert_eq!(s.role, Role::Prim);
    s
}

/// A ready SECOND of a PRIM.
fn second() -> ModuleState {
    let (s, _) = run(
        &fresh(true, true),
        &[
            Event::Start,
            seen(peer(Role::Prim, Readiness::Ready, Relation::PeerNewer)),
            Event::ResyncDone,
            seen(peer(Role::Prim, Readiness::Ready, Relation::InSync)),
        ],
    );
    assert_eq!((s.role, s.readiness()), (Role::Second, Readiness::Ready));
    s
}

fn with_policy(mut s: ModuleState, f: impl FnOnce(&mut Policy)) -> ModuleState {
    f(&mut s.policy);
    s
}

/// vmha-fs's link down, with fresh first-hand knowledge of our SECOND.
const LINK_DOWN: Event = Event::LinkDown {
    heartbeats_fresh: true,
    peer_is_second: true,
    peer_knows_outdated: false,
};

const FENCED: Event = Event::Fenced {
    peer_follows_us: false,
};

fn fs_died(now_ms: u64) -> Event {
    Event::FsDied {
        now_ms,
        reason: "the process died".into(),
    }
}

const WRITER_START: [Action; 4] = [
    Action::NewGeneration,
    Action::MountWriter,
    Action::DefineDomain,
    Action::StartVm,
];

#[test]
fn start_alone_with_up_to_date_data_after_the_start_wait() {
    let (s, actions) = run(&fresh(true, false), &[Event::Start]);
    assert_eq!(
        (s.role, s.readiness(), s.colour()),
        (Role::Wait, Readiness::Ready, Colour::Red)
    );
    assert!(actions.is_empty());
    let (s, actions) = run(&s, &[Event::StartWaitElapsed]);
    assert_eq!(actions, WRITER_START);
    assert_eq!(
        (s.role, s.readiness(), s.colour()),
        (Role::Alone, Readiness::Transient, Colour::Orange)
    );
    let (s, _) = run(&s, &[Event::VmStarted]);
    assert_eq!(
        (s.readiness(), s.colour()),
        (Readiness::Ready, Colour::Green)
    );
}

#[test]
fn data_not_known_up_to_date_waits_red_until_prim() {
    let (s, actions) = run(&fresh(true, true), &[Event::Start, Event::StartWaitElapsed]);
    assert!(actions.is_empty());
    assert_eq!(
        (s.role, s.readiness(), s.colour()),
        (Role::Wait, Readiness::NotUpToDate, Colour::Red)
    );
    let (s, actions) = run(&s, &[Event::PrimForced]);
    assert_eq!(s.role, Role::Alone);
    assert!(s.forced);
    assert_eq!(actions[..4], WRITER_START);
    assert_eq!(actions[4], Action::SetPeerMayBeNewer(false));
}

#[test]
fn a_node_without_data_never_starts_by_itself() {
    let (s, _) = run(
        &fresh(false, false),
        &[
            Event::Start,
            Event::StartWaitElapsed,
            seen(peer(
                Role::Wait,
                Readiness::NotUpToDate,
                Relation::Unrelated,
            )),
            Event::PeerLost,
            Event::StartWaitElapsed,
        ],
    );
    assert_eq!(s.role, Role::Wait);
    // The very first start: prim on the node holding the data.
    let (s, actions) = run(&s, &[Event::PrimForced]);
    assert_eq!(s.role, Role::Alone);
    assert!(actions.contains(&Action::NewGeneration));
}

#[test]
fn joining_a_prim_resyncs_then_is_ready() {
    let (s, actions) = run(
        &fresh(true, false),
        &[
            Event::Start,
            seen(peer(Role::Prim, Readiness::Ready, Relation::PeerNewer)),
        ],
    );
    // The flag is raised before the resync starts overwriting local data.
    assert_eq!(
        actions,
        [
            Action::SetPeerMayBeNewer(true),
            Action::MountReceiver,
            Action::StartResync { full: false }
        ]
    );
    assert_eq!(
        (s.role, s.readiness(), s.colour()),
        (Role::Second, Readiness::NotUpToDate, Colour::Orange)
    );
    let (s, _) = run(
        &s,
        &[Event::ResyncProgress(Progress {
            done_bytes: 1,
            total_bytes: 2,
        })],
    );
    assert_eq!(
        s.resync,
        Some(Progress {
            done_bytes: 1,
            total_bytes: 2
        })
    );
    let (s, actions) = run(&s, &[Event::ResyncDone]);
    assert_eq!(actions, [Action::AdoptPeerHistory]);
    assert_eq!(
        (s.readiness(), s.colour(), s.resync),
        (Readiness::Ready, Colour::Green, None)
    );
    // A node without data (or unrelated) gets a full compare.
    let (_, actions) = run(
        &fresh(false, false),
        &[
            Event::Start,
            seen(peer(Role::Alone, Readiness::Ready, Relation::PeerNewer)),
        ],
    );
    assert!(actions.contains(&Action::StartResync { full: true }));
}

#[test]
fn prim_losing_its_peer_goes_alone_and_keeps_the_vm() {
    let (s, actions) = run(&prim(), &[Event::PeerLost]);
    assert_eq!(s.role, Role::Alone);
    assert_eq!(
        actions,
        [
            Action::NewGeneration,
            Action::SetPeerMayBeNewer(false),
            Action::WriteAlone
        ]
    );
}

#[test]
fn ready_second_fails_over() {
    let (s, actions) = run(&second(), &[Event::PeerLost]);
    assert_eq!(s.role, Role::Alone);
    assert_eq!(
        actions,
        [
            Action::Unmount,
            Action::NewGeneration,
            Action::MountWriter,
            Action::DefineDomain,
            Action::StartVm,
            Action::SetPeerMayBeNewer(false)
        ]
    );
}

#[test]
fn no_failover_when_disabled_stale_or_configs_differ() {
    let disabled = with_policy(second(), |p| p.failover = false);
    assert_eq!(run(&disabled, &[Event::PeerLost]).0.role, Role::Wait);
    let (resyncing, _) = run(
        &fresh(true, false),
        &[
            Event::Start,
            seen(peer(Role::Prim, Readiness::Ready, Relation::PeerNewer)),
        ],
    );
    let (s, actions) = run(&resyncing, &[Event::PeerLost, Event::StartWaitElapsed]);
    assert_eq!(
        (s.role, s.readiness()),
        (Role::Wait, Readiness::NotUpToDate)
    );
    assert!(!actions.contains(&Action::MountWriter));
    let mut mismatch = peer(Role::Prim, Readiness::Ready, Relation::InSync);
    mismatch.config_match = false;
    let (s, _) = run(&second(), &[seen(mismatch), Event::PeerLost]);
    assert_eq!(s.role, Role::Wait);
}

#[test]
fn witness_decides_before_alone() {
    let s = with_policy(second(), |p| p.witness = true);
    let (probing, actions) = run(&s, &[Event::PeerLost]);
    assert_eq!(actions, [Action::ProbeWitness]);
    assert_eq!(
        (probing.role, probing.readiness()),
        (Role::Second, Readiness::Transient)
    );
    assert_eq!(
        run(&probing, &[Event::WitnessResult(WitnessOutcome::Reachable)])
            .0
            .role,
        Role::Alone
    );
    let (s, actions) = run(
        &probing,
        &[Event::WitnessResult(WitnessOutcome::Unreachable)],
    );
    assert_eq!((s.role, s.hold), (Role::Wait, true));
    assert_eq!(actions, [Action::Unmount]);
    // PRIM: the VM stops when the witness is unreachable.
    let p = with_policy(prim(), |p| p.witness = true);
    let (s, actions) = run(
        &p,
        &[
            Event::PeerLost,
            Event::WitnessResult(WitnessOutcome::Unreachable),
        ],
    );
    assert_eq!(s.role, Role::Wait);
    assert_eq!(
        actions,
        [Action::ProbeWitness, Action::StopVm, Action::Unmount]
    );
    // The peer heard again cancels the probe.
    let (s, _) = run(
        &p,
        &[
            Event::PeerLost,
            seen(peer(Role::Second, Readiness::Ready, Relation::InSync)),
            Event::WitnessResult(WitnessOutcome::Unreachable),
        ],
    );
    assert_eq!((s.role, s.readiness()), (Role::Prim, Readiness::Ready));
}

/// A witness that could not be probed (no ICMP socket allowed...) is no
/// evidence of a partition: no ALONE, no step down (with both nodes unable to
/// probe, that was a total outage), the probe is retried until it runs.
#[test]
fn witness_that_cannot_be_probed_decides_nothing() {
    let failed = Event::WitnessResult(WitnessOutcome::CouldNotProbe);
    for start in [second(), prim()] {
        let s = with_policy(start, |p| p.witness = true);
        let role = s.role;
        let (s, actions) = run(&s, &[Event::PeerLost, failed.clone()]);
        assert_eq!(actions, [Action::ProbeWitness, Action::RetryWitness]);
        assert_eq!((s.role, s.hold, s.probing()), (role, false, true));
        assert_eq!(s.readiness(), Readiness::Transient);
        // Failing again: still nothing decided, retried again, logged once.
        let (again, actions) = step(&s, failed.clone());
        assert_eq!(actions, [Action::RetryWitness]);
        assert_eq!(again, s);
        // Once the probe runs, its answer decides as usual.
        let (alone, _) = run(&s, &[Event::WitnessResult(WitnessOutcome::Reachable)]);
        assert_eq!(alone.role, Role::Alone);
        let (held, _) = run(&s, &[Event::WitnessResult(WitnessOutcome::Unreachable)]);
        assert_eq!((held.role, held.hold), (Role::Wait, true));
        // The peer heard again ends the retries.
        let (back, actions) = run(
            &s,
            &[seen(peer(Role::Second, Readiness::Ready, Relation::InSync))],
        );
        assert!(!back.probing(), "{back:?}");
        assert!(!actions.contains(&Action::RetryWitness));
    }
    // WAIT after the start-up wait: stays WAIT, not held, and the periodic
    // start-up wait does not start a second probe beside the retries.
    let w = with_policy(fresh(true, false), |p| p.witness = true);
    let (s, actions) = run(&w, &[Event::Start, Event::StartWaitElapsed, failed]);
    assert_eq!(actions, [Action::ProbeWitness, Action::RetryWitness]);
    assert_eq!((s.role, s.hold, s.probing()), (Role::Wait, false, true));
    let (_, actions) = run(&s, &[Event::StartWaitElapsed]);
    assert_eq!(actions, []);
}

#[test]
fn stop_on_prim_hands_over() {
    let (s, actions) = run(&prim(), &[Event::Stop]);
    assert_eq!(s.role, Role::Stop);
    assert_eq!(actions, [Action::StopVm, Action::Unmount]);
    assert!(s.peer_may_be_newer);
    // Even with failover = false: the operator asked for it.
    let sec = with_policy(second(), |p| p.failover = false);
    let (s, _) = run(
        &sec,
        &[seen(peer(Role::Stop, Readiness::Ready, Relation::InSync))],
    );
    assert_eq!(s.role, Role::Alone);
    // The PRIM whose SECOND stops writes alone, in a new generation.
    let (s, actions) = run(
        &prim(),
        &[seen(peer(Role::Stop, Readiness::Ready, Relation::InSync))],
    );
    assert_eq!(s.role, Role::Alone);
    assert!(actions.contains(&Action::NewGeneration));
}

#[test]
fn swap_from_either_side() {
    let (old, actions) = run(&prim(), &[Event::Swap]);
    assert_eq!(
        (old.role, old.request),
        (Role::Second, Some(Request::TakeOver))
    );
    assert_eq!(
        actions,
        [Action::StopVm, Action::Unmount, Action::MountReceiver]
    );
    let mut take = peer(Role::Second, Readiness::Ready, Relation::InSync);
    take.request = Some(Request::TakeOver);
    let (new, actions) = run(&second(), &[seen(take)]);
    assert_eq!(new.role, Role::Prim);
    assert_eq!(
        actions,
        [
            Action::Unmount,
            Action::MountWriter,
            Action::DefineDomain,
            Action::StartVm
        ]
    );
    // The old PRIM sees the new one: request done.
    let (old, _) = run(
        &old,
        &[seen(peer(Role::Prim, Readiness::Ready, Relation::InSync))],
    );
    assert_eq!((old.role, old.request), (Role::Second, None));
    // Asked on the SECOND: it requests, the PRIM performs.
    let (sec, _) = run(&second(), &[Event::Swap]);
    assert_eq!(sec.request, Some(Request::HandOver));
    let mut hand = peer(Role::Second, Readiness::Ready, Relation::InSync);
    hand.request = Some(Request::HandOver);
    assert_eq!(
        run(&prim(), &[seen(hand)]).0.request,
        Some(Request::TakeOver)
    );
    // Refused without a ready SECOND.
    let (alone, actions) = run(&prim(), &[Event::PeerLost, Event::Swap]);
    assert_eq!(alone.role, Role::Alone);
    assert!(!actions.contains(&Action::StopVm));
}

#[test]
fn restart_loop_is_bounded_then_fails_over() {
    let (s, actions) = run(
        &prim(),
        &[
            Event::VmStopped { now_ms: 1000 },
            Event::VmStarted,
            Event::VmStartFailed { now_ms: 2000 },
            Event::VmStopped { now_ms: 3000 },
        ],
    );
    assert_eq!(s.role, Role::Prim);
    assert_eq!(actions, [Action::StartVm, Action::StartVm, Action::StartVm]);
    let (gave_up, actions) = run(&s, &[Event::VmStopped { now_ms: 4000 }]);
    assert_eq!((gave_up.role, gave_up.hold), (Role::Wait, true));
    assert_eq!(actions, [Action::StopVm, Action::Unmount]);
    // Old restarts leave the window.
    let (s, _) = run(
        &s,
        &[Event::VmStopped {
            now_ms: 1000 + 86_400_000,
        }],
    );
    assert_eq!(s.role, Role::Prim);
    // ALONE has nobody to fail over to.
    let (alone, _) = run(&prim(), &[Event::PeerLost]);
    let stops: Vec<_> = (0..4).map(|i| Event::VmStopped { now_ms: i }).collect();
    assert_eq!(run(&alone, &stops).0.role, Role::Stop);
    // The SECOND takes over from the PRIM that gave up.
    let (s, _) = run(
        &second(),
        &[seen(peer(Role::Wait, Readiness::Ready, Relation::InSync))],
    );
    assert_eq!(s.role, Role::Alone);
}

#[test]
fn fs_failure_on_prim_steps_down() {
    let (s, actions) = run(&prim(), &[Event::FsFailed]);
    assert_eq!((s.role, s.hold, s.uptodate), (Role::Wait, true, false));
    assert_eq!(actions, [Action::StopVm, Action::Unmount]);
    // Held: it follows the new writer with a full resync, never promotes itself.
    let (s2, _) = run(
        &s,
        &[seen(peer(Role::Second, Readiness::Ready, Relation::InSync))],
    );
    assert_eq!(s2.role, Role::Wait);
    let (s3, actions) = run(
        &s,
        &[seen(peer(
            Role::Alone,
            Readiness::Ready,
            Relation::PeerNewer,
        ))],
    );
    assert_eq!(s3.role, Role::Second);
    // Only a process died: the copy is intact, the resync incremental.
    assert!(actions.contains(&Action::StartResync { full: false }));
}

#[test]
fn swap_aborts_when_the_vm_does_not_stop() {
    let (s, actions) = run_exact(&prim(), &[Event::Swap]);
    // The hand-over waits for the VM to be off.
    assert_eq!((s.role, s.swapping), (Role::Prim, true));
    assert_eq!(actions, [Action::StopVm]);
    let (s, actions) = run_exact(&s, &[Event::VmStopFailed]);
    assert_eq!((s.role, s.request, s.swapping), (Role::Prim, None, false));
    assert!(actions.is_empty(), "{actions:?}: nothing unmounted");
    assert_eq!(s.readiness(), Readiness::Ready);
    // No retry on the SECOND's request or the swap-back: only the operator's.
    let mut hand = peer(Role::Second, Readiness::Ready, Relation::InSync);
    hand.request = Some(Request::HandOver);
    let (s, actions) = run_exact(&s, &[seen(hand)]);
    assert_eq!(s.role, Role::Prim);
    assert!(actions.is_empty(), "{actions:?}");
    let back = with_policy(s.clone(), |p| p.default_primary = Some(Side::Peer));
    let (_, actions) = run_exact(
        &back,
        &[seen(peer(Role::Second, Readiness::Ready, Relation::InSync))],
    );
    assert!(actions.is_empty(), "{actions:?}");
    // The operator asks again: it works this time.
    let (s, actions) = run(&s, &[Event::Swap]);
    assert_eq!((s.role, s.request), (Role::Second, Some(Request::TakeOver)));
    assert_eq!(
        actions,
        [Action::StopVm, Action::Unmount, Action::MountReceiver]
    );
}

#[test]
fn local_disk_failure_hands_over_and_touches_nothing_until_start() {
    let (s, actions) = run(&prim(), &[Event::DiskFailed]);
    // Recorded first, then the VM stops and the mount goes; never a new
    // generation, never the peer marked outdated, never alone.
    assert_eq!(
        actions,
        [
            Action::SetSelfOutdated(true),
            Action::StopVm,
            Action::Unmount
        ]
    );
    assert_eq!(
        (s.role, s.hold, s.uptodate, s.disk_failed, s.self_outdated),
        (Role::Wait, true, false, true, true)
    );
    assert_eq!(s.announce().disk, Disk::Failed);
    assert_eq!(s.readiness(), Readiness::NotUpToDate);
    // The SECOND (failover = true) takes over from the writer that stepped down.
    let (taker, _) = run(
        &second(),
        &[seen(peer(
            Role::Wait,
            Readiness::NotUpToDate,
            Relation::InSync,
        ))],
    );
    assert_eq!(taker.role, Role::Alone);
    // The failed node follows nobody and never promotes itself.
    let (s, actions) = run(
        &s,
        &[
            seen(peer(Role::Alone, Readiness::Ready, Relation::PeerNewer)),
            Event::StartWaitElapsed,
            Event::PeerLost,
            Event::StartWaitElapsed,
            Event::PrimForced,
        ],
    );
    assert_eq!(s.role, Role::Wait);
    assert!(actions.is_empty(), "{actions:?}");
    // A restart of vmhad: the persisted flag keeps it from promoting itself.
    let restarted = ModuleState::new(policy(), true, false).with_self_outdated(true);
    let (r, actions) = run(
        &restarted,
        &[
            Event::Start,
            Event::StartWaitElapsed,
            seen(peer(Role::Wait, Readiness::Ready, Relation::InSync)),
            seen(peer(Role::Stop, Readiness::Ready, Relation::LocalNewer)),
        ],
    );
    assert_eq!((r.role, r.uptodate), (Role::Wait, false));
    assert!(!actions.contains(&Action::MountWriter), "{actions:?}");
    // `vmctl start` after the repair: it joins the writer with a full compare.
    let (s, actions) = run(
        &s,
        &[
            seen(peer(Role::Prim, Readiness::Ready, Relation::PeerNewer)),
            Event::Start,
        ],
    );
    assert_eq!((s.role, s.disk_failed), (Role::Second, false));
    assert_eq!(
        actions,
        [Action::MountReceiver, Action::StartResync { full: true }]
    );
    assert_eq!(s.announce().disk, Disk::Ok);
    let (s, actions) = run(&s, &[Event::ResyncDone]);
    assert_eq!(
        actions,
        [Action::AdoptPeerHistory, Action::SetSelfOutdated(false)]
    );
    assert_eq!((s.readiness(), s.self_outdated), (Readiness::Ready, false));
    // An ALONE writer whose disk fails stops too: nobody runs the module.
    let (alone, _) = run(&prim(), &[Event::PeerLost]);
    let (s, actions) = run(&alone, &[Event::DiskFailed]);
    assert_eq!(s.role, Role::Wait);
    assert!(!actions.contains(&Action::NewGeneration));
}

#[test]
fn fenced_writer_stops_and_resyncs() {
    let (alone, _) = run(&prim(), &[Event::PeerLost]);
    let (s, actions) = run(&alone, &[FENCED]);
    assert_eq!(s.role, Role::Wait);
    assert_eq!(
        actions,
        [
            Action::SetPeerMayBeNewer(true),
            Action::StopVm,
            Action::Unmount
        ]
    );
    // A frozen PRIM waking up sees the newer ALONE directly.
    let (s, actions) = run(
        &prim(),
        &[seen(peer(
            Role::Alone,
            Readiness::Ready,
            Relation::PeerNewer,
        ))],
    );
    assert_eq!(s.role, Role::Second);
    assert_eq!(
        actions,
        [
            Action::StopVm,
            Action::Unmount,
            Action::MountReceiver,
            Action::StartResync { full: false }
        ]
    );
}

#[test]
fn default_primary_swaps_back_once_ready() {
    let p = with_policy(prim(), |p| {
        p.default_primary = Some(Side::Peer);
        p.wins_ties = false;
    });
    let (s, _) = run(
        &p,
        &[seen(peer(
            Role::Second,
            Readiness::NotUpToDate,
            Relation::PeerNewer,
        ))],
    );
    // Not ready yet (and PeerNewer means the SECOND is ahead: that PRIM steps down).
    assert_eq!(s.role, Role::Wait);
    let (s, _) = run(
        &p,
        &[seen(peer(
            Role::Second,
            Readiness::NotUpToDate,
            Relation::LocalNewer,
        ))],
    );
    assert_eq!(s.role, Role::Prim);
    let (s, _) = run(
        &s,
        &[seen(peer(Role::Second, Readiness::Ready, Relation::InSync))],
    );
    assert_eq!((s.role, s.request), (Role::Second, Some(Request::TakeOver)));
}

#[test]
fn equal_generations_at_start_tie_break() {
    let both_wait = seen(peer(Role::Wait, Readiness::Ready, Relation::InSync));
    let (winner, _) = run(&fresh(true, true), &[Event::Start, both_wait.clone()]);
    assert_eq!(winner.role, Role::Alone);
    let loser = with_policy(fresh(true, true), |p| p.wins_ties = false);
    let (loser, _) = run(&loser, &[Event::Start, both_wait]);
    assert_eq!(loser.role, Role::Wait);
    assert!(!loser.uptodate && loser.peer_may_be_newer);
    // The winner starting then vanishing does not make the loser start stale.
    let (loser, _) = run(&loser, &[Event::PeerLost, Event::StartWaitElapsed]);
    assert_eq!(loser.role, Role::Wait);
    // The newer one starts regardless of the tie-break.
    let newer = with_policy(fresh(true, true), |p| p.wins_ties = false);
    let (s, _) = run(
        &newer,
        &[
            Event::Start,
            seen(peer(Role::Wait, Readiness::Ready, Relation::LocalNewer)),
        ],
    );
    assert_eq!(s.role, Role::Alone);
}

#[test]
fn split_brain_least_changes_loses() {
    let (alone, _) = run(&prim(), &[Event::PeerLost]);
    const MIB: u64 = 1 << 20;
    let mut other = peer(Role::Alone, Readiness::Ready, Relation::SplitBrain);
    other.changed_bytes = 1000 * MIB;
    let meet = |local: u64| Event::PeerSeen {
        peer: other,
        local_changed_bytes: local,
    };
    let (s, actions) = run(&alone, &[meet(10 * MIB)]);
    assert_eq!(s.role, Role::Second);
    assert_eq!(
        actions,
        [
            Action::SetPeerMayBeNewer(true),
            Action::StopVm,
            Action::Unmount,
            Action::MountReceiver,
            Action::StartResync { full: true }
        ]
    );
    let (s, _) = run(&alone, &[meet(5000 * MIB)]);
    assert_eq!(s.role, Role::Alone);
    // Near-equal counts (they move while the nodes compare) are a tie: decided by
    // the tie-break, the same way on both nodes.
    let near = |wins: bool, local: u64| {
        let s = with_policy(alone.clone(), |p| p.wins_ties = wins);
        run(&s, &[meet(local)]).0.role
    };
    assert_eq!(near(true, 950 * MIB), Role::Alone);
    assert_eq!(near(false, 1050 * MIB), Role::Second);
    // Manual: the tie-break loser steps down but keeps its data until `prim`.
    let manual = with_policy(alone.clone(), |p| {
        p.split_brain = SplitBrainRule::Manual;
        p.wins_ties = false;
    });
    let (s, _) = run(&manual, &[meet(1000)]);
    assert_eq!(s.role, Role::Wait);
    let mut forced = other;
    forced.forced = true;
    let (s, _) = run(&s, &[seen(forced)]);
    assert_eq!(s.role, Role::Second);
    // Prefer: the preferred node wins whatever the counts.
    let prefer = with_policy(alone, |p| {
        p.split_brain = SplitBrainRule::Prefer(Side::Local)
    });
    assert_eq!(run(&prefer, &[meet(0)]).0.role, Role::Alone);
}

/// The e2e witness scenario: the PRIM's replication link drops just before its
/// heartbeats time out (a new generation nobody saw), the witness is
/// unreachable, it steps down; the SECOND goes ALONE. At the heal the histories
/// differ (split brain) and the held node's data would win the tie, but it never
/// takes over: it must follow the writer, not wait for it forever.
#[test]
fn a_waiting_node_follows_the_writer_even_when_its_split_data_wins() {
    let p = with_policy(prim(), |p| p.witness = true);
    let (held, _) = run(
        &p,
        &[
            LINK_DOWN,
            Event::PeerLost,
            Event::WitnessResult(WitnessOutcome::Unreachable),
        ],
    );
    assert_eq!((held.role, held.hold), (Role::Wait, true));
    let writer = peer(Role::Alone, Readiness::Ready, Relation::SplitBrain);
    let (s, actions) = run(&held, &[seen(writer)]);
    assert_eq!(s.role, Role::Second);
    assert_eq!(
        actions,
        [Action::MountReceiver, Action::StartResync { full: true }]
    );
    // Not held (e.g. rebooted after writing alone during the partition): it does
    // not preempt the writer either (the VM would run twice): it follows.
    let mut free = held.clone();
    free.hold = false;
    assert_eq!(run(&free, &[seen(writer)]).0.role, Role::Second);
    // Manual: the operator decides, held or not.
    let manual = with_policy(held, |p| p.split_brain = SplitBrainRule::Manual);
    assert_eq!(run(&manual, &[seen(writer)]).0.role, Role::Wait);
}

#[test]
fn replication_link_down_degrades_without_promotion() {
    let (s, actions) = run(&prim(), &[LINK_DOWN]);
    assert_eq!(s.role, Role::Prim);
    assert_eq!(actions, [Action::NewGeneration, Action::MarkPeerOutdated]);
    let (sec, actions) = run(
        &second(),
        &[seen(peer(
            Role::Prim,
            Readiness::Ready,
            Relation::PeerNewer,
        ))],
    );
    assert_eq!(
        (sec.role, sec.readiness()),
        (Role::Second, Readiness::NotUpToDate)
    );
    assert_eq!(actions, [Action::StartResync { full: false }]);
    assert_eq!(run(&sec, &[Event::PeerLost]).0.role, Role::Wait);
}

#[test]
fn swapped_second_outdated_before_the_new_writer_starts_resyncs_once_it_writes() {
    // node1 was PRIM and handed over (swap): a ready SECOND asking TakeOver.
    let (old_prim, _) = run(&prim(), &[Event::Swap]);
    assert_eq!(old_prim.request, Some(Request::TakeOver));
    // The new writer's connected start failed: it starts alone under a new
    // generation, announced while it still shows SECOND.
    let (s, actions) = run(
        &old_prim,
        &[seen(peer(
            Role::Second,
            Readiness::Ready,
            Relation::PeerNewer,
        ))],
    );
    assert_eq!(
        (s.role, s.readiness()),
        (Role::Second, Readiness::NotUpToDate)
    );
    assert!(actions.is_empty(), "{actions:?}");
    let (s, actions) = run(
        &s,
        &[seen(peer(
            Role::Prim,
            Readiness::Ready,
            Relation::PeerNewer,
        ))],
    );
    assert_eq!(actions, [Action::StartResync { full: false }]);
    // Once only.
    let (s, actions) = run(
        &s,
        &[seen(peer(
            Role::Prim,
            Readiness::Ready,
            Relation::PeerNewer,
        ))],
    );
    assert!(actions.is_empty(), "{actions:?}");
    let (s, _) = run(&s, &[Event::ResyncDone]);
    assert_eq!((s.role, s.readiness()), (Role::Second, Readiness::Ready));
}

#[test]
fn prim_is_refused_while_the_peer_writes() {
    let (s, actions) = run(&second(), &[Event::PrimForced]);
    assert_eq!(s.role, Role::Second);
    assert!(actions.is_empty());
}

#[test]
fn status_serialisation_matches_the_json_schema() {
    assert_eq!(
        serde_json::to_string(&Readiness::NotUpToDate).unwrap(),
        "\"not_uptodate\""
    );
    assert_eq!(
        serde_json::to_string(&Readiness::Ready).unwrap(),
        "\"ready\""
    );
    assert_eq!(
        serde_json::to_string(&Colour::Orange).unwrap(),
        "\"orange\""
    );
    assert_eq!(serde_json::to_string(&Role::Second).unwrap(), "\"SECOND\"");
}

// ---- exhaustive table ----

const ROLES: [Role; 5] = [
    Role::Stop,
    Role::Wait,
    Role::Alone,
    Role::Prim,
    Role::Second,
];
const RELATIONS: [Relation; 5] = [
    Relation::InSync,
    Relation::LocalNewer,
    Relation::PeerNewer,
    Relation::SplitBrain,
    Relation::Unrelated,
];

/// Every role × relation × readiness, plus the variants that matter:
/// requests (from a SECOND), configuration mismatch, forced primary.
fn peers() -> Vec<Peer> {
    let mut out = Vec::new();
    for role in ROLES {
        for readiness in [Readiness::Ready, Readiness::NotUpToDate] {
            for relation in RELATIONS {
                let base = Peer {
                    role,
                    readiness,
                    request: None,
                    forced: false,
                    relation,
                    config_match: true,
                    changed_bytes: 5,
                };
                out.push(base);
                match relation {
                    Relation::InSync => {
                        out.push(Peer {
                            config_match: false,
                            ..base
                        });
                        if role == Role::Second {
                            out.push(Peer {
                                request: Some(Request::TakeOver),
                                ..base
                            });
                            out.push(Peer {
                                request: Some(Request::HandOver),
                                ..base
                            });
                        }
                    }
                    Relation::SplitBrain => {
                        out.push(Peer {
                            forced: true,
                            ..base
                        });
                        out.push(Peer {
                            changed_bytes: 1,
                            ..base
                        });
                    }
                    _ => {}
                }
            }
        }
    }
    out
}

fn states() -> Vec<ModuleState> {
    let mut knowledge = vec![PeerKnowledge::Unknown];
    for p in peers() {
        knowledge.push(PeerKnowledge::Seen(p));
        if p.request.is_none() && !p.forced && p.readiness == Readiness::Ready {
            knowledge.push(PeerKnowledge::Lost(p));
        }
    }
    let policies =
        [(true, false), (false, false), (true, true)].map(|(failover, witness)| Policy {
            failover,
            witness,
            ..policy()
        });
    let mut out = Vec::new();
    for policy in &policies {
        for role in ROLES {
            for bits in 0u8..32 {
                let bit = |i: u8| bits & (1 << i) != 0;
                let (uptodate, has_data, flag, hold, wait_over) =
                    (bit(0), bit(1), bit(2), bit(3), bit(4));
                // Writers have data known up to date, as the machine keeps them.
                let consistent = has_data || !uptodate;
                if !consistent || (role.is_writer() && !uptodate) {
                    continue;
                }
                for k in &knowledge {
                    let mut s = ModuleState::new(policy.clone(), has_data, flag);
                    s.role = role;
                    s.uptodate = uptodate;
                    s.hold = hold && role == Role::Wait;
                    s.start_wait_over = wait_over;
                    s.peer = *k;
                    s.changed_bytes = 5;
                    // Probing (maybe after a probe that could not run), as
                    // `go_alone` starts it: up to date, peer not in view.
                    let probes = match role {
                        Role::Prim | Role::Second => matches!(k, PeerKnowledge::Lost(_)),
                        Role::Wait => !hold && wait_over && !matches!(k, PeerKnowledge::Seen(_)),
                        Role::Alone | Role::Stop => false,
                    };
                    if policy.witness && probes && has_data && uptodate {
                        for failed in [false, true] {
                            let mut probing = s.clone();
                            probing.probe = Some(Probe { failed });
                            out.push(probing);
                        }
                    }
                    // The variants the machine reaches: a self-outdated copy
                    // (never up to date), its failed disk (WAIT hold or STOP),
                    // a swap waiting for its stop, a swap that failed.
                    if !uptodate && !role.is_writer() {
                        let mut o = s.clone();
                        o.self_outdated = true;
                        out.push(o.clone());
                        if matches!(role, Role::Stop) || (role == Role::Wait && hold) {
                            o.disk_failed = true;
                            out.push(o);
                        }
                    }
                    if role == Role::Prim {
                        let mut m = s.clone();
                        m.peer_outdated = true;
                        out.push(m);
                        let mut w = s.clone();
                        w.swapping = true;
                        out.push(w);
                        let mut r = s.clone();
                        r.swap_refused = true;
                        out.push(r);
                    }
                    if role == Role::Second {
                        // Its receiver was restarted in place at 0 ms.
                        let mut r = s.clone();
                        r.receiver_restarted_ms = Some(0);
                        out.push(r);
                    }
                    out.push(s);
                }
            }
        }
    }
    out
}

fn events() -> Vec<Event> {
    let mut out = vec![
        Event::Start,
        Event::Stop,
        Event::Swap,
        Event::PrimForced,
        Event::PeerLost,
        Event::StartWaitElapsed,
        Event::ResyncProgress(Progress {
            done_bytes: 1,
            total_bytes: 2,
        }),
        Event::ResyncDone,
        Event::VmStarted,
        Event::VmStopped { now_ms: 7 },
        Event::VmStartFailed { now_ms: 7 },
        Event::FsFailed,
        Event::DiskFailed,
        Event::VmStopDone,
        Event::VmStopFailed,
        Event::PeerMarkedOutdated { acknowledged: true },
        Event::PeerMarkedOutdated {
            acknowledged: false,
        },
        Event::Fenced {
            peer_follows_us: true,
        },
        FENCED,
        fs_died(7),
        fs_died(RECEIVER_RESTART_INTERVAL_MS + 7),
        Event::WitnessResult(WitnessOutcome::Reachable),
        Event::WitnessResult(WitnessOutcome::Unreachable),
        Event::WitnessResult(WitnessOutcome::CouldNotProbe),
    ];
    for bits in 0u8..8 {
        out.push(Event::LinkDown {
            heartbeats_fresh: bits & 1 != 0,
            peer_is_second: bits & 2 != 0,
            peer_knows_outdated: bits & 4 != 0,
        });
    }
    out.push(Event::ControllerLost);
    out.push(Event::DataPathLost);
    for bits in 0u8..32 {
        out.push(Event::Adopt(found(bits)));
    }
    for p in peers() {
        out.push(Event::PeerSeen {
            peer: p,
            local_changed_bytes: 5,
        });
    }
    out
}

fn found(bits: u8) -> Found {
    Found {
        writer: bits & 1 != 0,
        settings_match: bits & 2 != 0,
        generation_current: bits & 4 != 0,
        alone: bits & 8 != 0,
        vm_running: bits & 16 != 0,
    }
}

const WRITER_FOUND: Found = Found {
    writer: true,
    settings_match: true,
    generation_current: true,
    alone: false,
    vm_running: true,
};

#[test]
fn a_new_vmhad_adopts_the_running_writer_without_touching_it() {
    // The metadata a PRIM persists: data, "peer may be newer" raised.
    let (s, actions) = run(&fresh(true, true), &[Event::Adopt(WRITER_FOUND)]);
    assert_eq!((s.role, s.readiness()), (Role::Prim, Readiness::Ready));
    // No mount, no VM start, no new generation, no resync.
    assert_eq!(actions, vec![]);
    // The SECOND is seen again: it stays PRIM, nothing else happens.
    let (s, actions) = run(
        &s,
        &[seen(peer(Role::Second, Readiness::Ready, Relation::InSync))],
    );
    assert_eq!(s.role, Role::Prim);
    assert_eq!(actions, vec![]);
    // Writing alone: ALONE.
    let alone = Found {
        alone: true,
        ..WRITER_FOUND
    };
    let (s, actions) = run(&fresh(true, true), &[Event::Adopt(alone)]);
    assert_eq!(s.role, Role::Alone);
    assert_eq!(actions, vec![Action::SetPeerMayBeNewer(false)]);
    // Its VM is gone: started again, nothing else.
    let no_vm = Found {
        vm_running: false,
        ..WRITER_FOUND
    };
    let (s, actions) = run(&fresh(true, true), &[Event::Adopt(no_vm)]);
    assert_eq!(s.role, Role::Prim);
    assert_eq!(actions, vec![Action::DefineDomain, Action::StartVm]);
}

#[test]
fn a_writer_that_is_not_the_expected_one_is_stopped_and_the_module_starts() {
    for found in [
        Found {
            settings_match: false,
            ..WRITER_FOUND
        },
        Found {
            generation_current: false,
            ..WRITER_FOUND
        },
    ] {
        let (s, actions) = run(&fresh(true, true), &[Event::Adopt(found)]);
        assert_eq!(s.role, Role::Wait, "{found:?}");
        assert_eq!(actions[..2], [Action::StopVm, Action::Unmount], "{found:?}");
        assert!(!actions.contains(&Action::MountWriter), "{found:?}");
    }
}

#[test]
fn a_new_vmhad_adopts_the_running_receiver() {
    let receiver = Found {
        writer: false,
        vm_running: false,
        ..WRITER_FOUND
    };
    let (s, actions) = run(&fresh(true, true), &[Event::Adopt(receiver)]);
    assert_eq!((s.role, s.readiness()), (Role::Second, Readiness::Ready));
    assert_eq!(actions, vec![]);
    let behind = Found {
        generation_current: false,
        ..receiver
    };
    let (s, actions) = run(&fresh(true, true), &[Event::Adopt(behind)]);
    assert_eq!(
        (s.role, s.readiness()),
        (Role::Second, Readiness::NotUpToDate)
    );
    assert_eq!(actions, vec![]);
    // Its writer is heard: it goes on as SECOND, no resync started.
    let (s, actions) = run(
        &s,
        &[seen(peer(
            Role::Prim,
            Readiness::Ready,
            Relation::PeerNewer,
        ))],
    );
    assert_eq!(s.role, Role::Second);
    assert!(!actions.contains(&Action::MountReceiver));
}

#[test]
fn a_peer_whose_controller_is_down_but_data_path_alive_is_not_failed_over() {
    let (s, actions) = run(&second(), &[Event::ControllerLost]);
    assert_eq!((s.role, s.readiness()), (Role::Second, Readiness::Ready));
    assert!(s.peer_controller_down);
    assert_eq!(actions, vec![]);
    // Its controller comes back: nothing happened.
    let (back, actions) = run(
        &s,
        &[seen(peer(Role::Prim, Readiness::Ready, Relation::InSync))],
    );
    assert_eq!(back.role, Role::Second);
    assert!(!back.peer_controller_down);
    assert_eq!(actions, vec![]);
    // The data path dies too (a dead or frozen writer): failover as today.
    let (s, actions) = run(&s, &[Event::DataPathLost]);
    assert_eq!(s.role, Role::Alone);
    assert!(actions.contains(&Action::StartVm));
    // A PRIM whose SECOND's controller is down keeps replicating to it.
    let (p, actions) = run(&prim(), &[Event::ControllerLost]);
    assert_eq!(p.role, Role::Prim);
    assert_eq!(actions, vec![]);
    // ... until its replication link goes down: ALONE, as at PeerLost.
    let (alone, actions) = run(
        &p,
        &[Event::LinkDown {
            heartbeats_fresh: false,
            peer_is_second: false,
            peer_knows_outdated: false,
        }],
    );
    assert_eq!(alone.role, Role::Alone);
    assert!(actions.contains(&Action::NewGeneration));
    assert!(actions.contains(&Action::WriteAlone));
}

#[test]
fn an_adopted_node_that_never_hears_its_peer_decides_at_peer_lost() {
    let (p, _) = run(&fresh(true, true), &[Event::Adopt(WRITER_FOUND)]);
    let (alone, actions) = run(&p, &[Event::PeerLost]);
    assert_eq!(alone.role, Role::Alone);
    assert!(actions.contains(&Action::WriteAlone));
    let receiver = Found {
        writer: false,
        ..WRITER_FOUND
    };
    let (sec, _) = run(&fresh(true, true), &[Event::Adopt(receiver)]);
    let (s, actions) = run(&sec, &[Event::PeerLost]);
    assert_eq!(s.role, Role::Alone);
    assert!(actions.contains(&Action::MountWriter));
}

fn index(actions: &[Action], wanted: &Action) -> Option<usize> {
    actions.iter().position(|a| a == wanted)
}

/// The invariants every transition keeps.
fn check_invariants(before: &ModuleState, event: &Event, after: &ModuleState, actions: &[Action]) {
    let ctx = || format!("{before:?}\n  --{event:?}-->\n{after:?}\n  actions {actions:?}");
    let mount_writer = index(actions, &Action::MountWriter);
    let promoted = !before.role.is_writer() && after.role.is_writer();
    // Never two writers: no writer mount while the peer is known to write.
    if mount_writer.is_some() {
        assert!(
            !after.peer_is_writer(),
            "writer mount beside a writer: {}",
            ctx()
        );
        assert!(after.role.is_writer(), "{}", ctx());
        assert!(!actions.contains(&Action::ProbeWitness), "{}", ctx());
    }
    // Adoption takes over a running writer: promoted without a mount.
    // `Adopt` found what a previous vmhad left: adopted as it runs, or stopped
    // (`Unmount`) and the module started as by `Start`.
    let adopting = matches!(event, Event::Adopt(_)) && before.role == Role::Stop;
    let adopted = adopting && !actions.contains(&Action::Unmount);
    if adopted {
        assert!(mount_writer.is_none(), "{}", ctx());
    } else {
        assert_eq!(
            promoted,
            mount_writer.is_some(),
            "promotion = writer mount: {}",
            ctx()
        );
    }
    if let (true, Event::Adopt(found)) = (adopted, event) {
        if after.role.is_writer() {
            assert!(found.writer && found.settings_match && found.generation_current);
            assert!(before.has_data && !before.self_outdated, "{}", ctx());
            assert!(!actions.contains(&Action::NewGeneration), "{}", ctx());
        }
        if after.role == Role::Second {
            assert!(!found.writer && found.settings_match, "{}", ctx());
            assert!(!actions.contains(&Action::MountReceiver), "{}", ctx());
        }
    }
    // StartVm only with the writer mount in place.
    if let Some(start) = index(actions, &Action::StartVm) {
        assert!(after.role.is_writer(), "{}", ctx());
        assert!(
            before.role.is_writer() || adopted || mount_writer.is_some_and(|m| m < start),
            "{}",
            ctx()
        );
    }
    // No promotion of data not known up to date, except by the operator.
    if promoted && *event != Event::PrimForced && !adopted {
        assert!(before.has_data, "promoted without data: {}", ctx());
        match (event, after.peer) {
            (Event::PeerSeen { peer, .. }, _) => {
                assert_ne!(
                    peer.relation,
                    Relation::PeerNewer,
                    "promoted older data: {}",
                    ctx()
                );
                assert!(before.uptodate || before.role == Role::Wait, "{}", ctx());
                assert!(
                    peer.config_match || before.role == Role::Second,
                    "{}",
                    ctx()
                );
            }
            // WAIT decides from the peer in view, or else (Start) the flag.
            (_, PeerKnowledge::Seen(peer))
                if !before.role.is_writer() && before.role != Role::Second =>
            {
                assert_ne!(
                    peer.relation,
                    Relation::PeerNewer,
                    "promoted older data: {}",
                    ctx()
                );
            }
            (Event::Start | Event::Adopt(_), _) => {
                assert!(!before.peer_may_be_newer, "{}", ctx())
            }
            _ => assert!(before.uptodate, "promoted stale data: {}", ctx()),
        }
        if *event == Event::PeerLost {
            assert!(
                before.policy.failover || before.role != Role::Second,
                "{}",
                ctx()
            );
            assert!(!before.policy.witness, "{}", ctx());
        }
    }
    // Leaving the writer role stops the VM first, then unmounts (a swap's VM
    // was stopped by the previous step, which reported `VmStopDone`).
    let swap_done = before.swapping && *event == Event::VmStopDone;
    if before.role.is_writer() && !after.role.is_writer() && !swap_done {
        let stop = index(actions, &Action::StopVm).unwrap_or_else(|| panic!("{}", ctx()));
        let unmount = index(actions, &Action::Unmount).unwrap_or_else(|| panic!("{}", ctx()));
        assert!(stop < unmount, "{}", ctx());
    }
    // A found writer that is not adopted is stopped: its VM, then its mount.
    if actions.contains(&Action::StopVm) {
        assert!(before.role.is_writer() || adopting, "{}", ctx());
    }
    if actions.contains(&Action::Unmount) {
        assert!(
            adopting || matches!(before.role, Role::Prim | Role::Alone | Role::Second),
            "{}",
            ctx()
        );
    }
    if actions.contains(&Action::NewGeneration) {
        assert!(after.role.is_writer(), "{}", ctx());
    }
    // A receiver only as SECOND, after the flag is raised.
    if let Some(recv) = index(actions, &Action::MountReceiver) {
        assert_eq!(after.role, Role::Second, "{}", ctx());
        assert!(
            before.peer_may_be_newer
                || index(actions, &Action::SetPeerMayBeNewer(true)).is_some_and(|f| f < recv),
            "{}",
            ctx()
        );
        if let Some(m) = mount_writer {
            assert!(
                index(actions, &Action::Unmount).is_some_and(|u| u < m.max(recv)),
                "{}",
                ctx()
            );
        }
    }
    // The flag mirror follows what was persisted.
    let persisted = actions.iter().rev().find_map(|a| match a {
        Action::SetPeerMayBeNewer(b) => Some(*b),
        _ => None,
    });
    assert_eq!(
        after.peer_may_be_newer,
        persisted.unwrap_or(before.peer_may_be_newer),
        "{}",
        ctx()
    );
    if matches!(after.role, Role::Prim | Role::Second) {
        assert!(after.peer_may_be_newer, "{}", ctx());
    }
    // A self-outdated copy is never up to date nor promoted but by the operator,
    // and resyncs in full; the flag mirror follows what was persisted.
    let persisted_self = actions.iter().rev().find_map(|a| match a {
        Action::SetSelfOutdated(b) => Some(*b),
        _ => None,
    });
    assert_eq!(
        after.self_outdated,
        persisted_self.unwrap_or(before.self_outdated),
        "{}",
        ctx()
    );
    if after.self_outdated {
        assert!(!after.uptodate, "{}", ctx());
    }
    if promoted && *event != Event::PrimForced {
        assert!(
            !before.self_outdated,
            "promoted a self-outdated copy: {}",
            ctx()
        );
    }
    if before.self_outdated && actions.contains(&Action::StartResync { full: false }) {
        panic!("incremental resync of a self-outdated copy: {}", ctx());
    }
    // A failed disk: the module leaves this node, which touches nothing more
    // and never blames its peer, until the operator's `start`.
    if *event == Event::DiskFailed {
        assert!(matches!(after.role, Role::Wait | Role::Stop), "{}", ctx());
        assert!(after.disk_failed && after.self_outdated, "{}", ctx());
        if !before.self_outdated {
            let set = index(actions, &Action::SetSelfOutdated(true));
            assert!(
                set.is_some_and(|i| index(actions, &Action::StopVm).is_none_or(|s| i < s)),
                "{}",
                ctx()
            );
        }
    }
    if before.disk_failed && *event != Event::Start {
        for a in actions {
            assert!(
                matches!(a, Action::Log(_) | Action::SetPeerMayBeNewer(_)),
                "a failed disk touched: {}",
                ctx()
            );
        }
        assert!(after.disk_failed, "{}", ctx());
    }
    if matches!(event, Event::DiskFailed) || before.disk_failed {
        assert!(!actions.contains(&Action::NewGeneration), "{}", ctx());
        assert!(!actions.contains(&Action::MarkPeerOutdated), "{}", ctx());
    }
    // A swap hands over only once its VM stopped; a failed stop keeps it here.
    if *event == Event::VmStopFailed && before.role == Role::Prim {
        assert_eq!(after.role, Role::Prim, "{}", ctx());
        assert!(!actions.contains(&Action::Unmount), "{}", ctx());
    }
    if after.role == Role::Second && before.role == Role::Prim && *event != Event::VmStopDone {
        assert!(actions.contains(&Action::StopVm), "{}", ctx());
    }
    // vmha-fs writes alone only for a writer whose peer is gone (PRIM ->
    // ALONE, or ALONE already) or knows it is outdated, and always then.
    if actions.contains(&Action::WriteAlone) {
        assert!(after.role.is_writer(), "{}", ctx());
        if after.role == Role::Prim {
            assert!(
                matches!(
                    event,
                    Event::PeerMarkedOutdated { acknowledged: true }
                        | Event::LinkDown {
                            heartbeats_fresh: true,
                            peer_is_second: true,
                            peer_knows_outdated: true,
                        }
                ),
                "PRIM writing alone with a peer not known outdated: {}",
                ctx()
            );
        }
    }
    if before.role == Role::Prim && after.role == Role::Alone {
        assert_eq!(actions.last(), Some(&Action::WriteAlone), "{}", ctx());
    }
    // The link down forks the history only on fresh first-hand knowledge
    // that the peer is our SECOND, and only once per episode.
    if let Event::LinkDown {
        heartbeats_fresh,
        peer_is_second,
        peer_knows_outdated,
    } = *event
    {
        let marks = actions.contains(&Action::MarkPeerOutdated);
        assert_eq!(
            marks,
            before.role == Role::Prim
                && heartbeats_fresh
                && peer_is_second
                && !peer_knows_outdated
                && !before.peer_outdated,
            "{}",
            ctx()
        );
        if marks {
            assert_eq!(
                actions
                    .iter()
                    .filter(|a| !matches!(a, Action::Log(_) | Action::SetPeerMayBeNewer(_)))
                    .collect::<Vec<_>>(),
                [&Action::NewGeneration, &Action::MarkPeerOutdated],
                "{}",
                ctx()
            );
        }
        // Except a PRIM whose peer's controller was down: its receiver is
        // gone too, the peer is lost.
        if !(before.role == Role::Prim && before.peer_controller_down) {
            assert_eq!(after.role, before.role, "{}", ctx());
        }
    }
    // A peer whose data path is alive is never failed over.
    if *event == Event::ControllerLost && matches!(before.role, Role::Prim | Role::Second) {
        assert_eq!(after.role, before.role, "{}", ctx());
        assert!(
            actions
                .iter()
                .all(|a| matches!(a, Action::Log(_) | Action::SetPeerMayBeNewer(_))),
            "{}",
            ctx()
        );
    }
    // A fence the peer's heartbeat explains away changes nothing.
    if *event
        == (Event::Fenced {
            peer_follows_us: true,
        })
    {
        assert_eq!(after.role, before.role, "{}", ctx());
        assert!(
            actions
                .iter()
                .all(|a| matches!(a, Action::SetPeerMayBeNewer(_))),
            "{}",
            ctx()
        );
    }
    // A SECOND's receiver is restarted in place at most once per interval;
    // else vmha-fs failing takes the module off this node.
    if let Event::FsDied { now_ms, .. } = *event {
        let restart = actions
            .iter()
            .any(|a| matches!(a, Action::RestartReceiver { .. }));
        let allowed = before
            .receiver_restarted_ms
            .is_none_or(|t| now_ms - t >= RECEIVER_RESTART_INTERVAL_MS);
        assert_eq!(restart, before.role == Role::Second && allowed, "{}", ctx());
        if restart {
            assert_eq!(after.role, Role::Second, "{}", ctx());
            assert_eq!(after.receiver_restarted_ms, Some(now_ms), "{}", ctx());
        } else if before.role != Role::Stop && before.role != Role::Wait {
            assert_eq!(after.role, Role::Wait, "{}", ctx());
        }
    }
    if actions
        .iter()
        .any(|a| matches!(a, Action::RestartReceiver { .. }))
    {
        assert!(matches!(event, Event::FsDied { .. }), "{}", ctx());
    }
    // Colours as operators know them.
    match after.role {
        Role::Stop | Role::Wait => assert_eq!(after.colour(), Colour::Red),
        _ => assert_eq!(
            after.colour() == Colour::Green,
            after.readiness() == Readiness::Ready
        ),
    }
    // A witness that could not be probed decides nothing: the role and the
    // probe stay, nothing is mounted, stopped or unmounted.
    if *event == Event::WitnessResult(WitnessOutcome::CouldNotProbe) {
        assert_eq!(after.role, before.role, "{}", ctx());
        assert_eq!(after.hold, before.hold, "{}", ctx());
        assert_eq!(after.probing(), before.probing(), "{}", ctx());
        let retry = before.probing().then_some(Action::RetryWitness);
        let acts: Vec<&Action> = actions
            .iter()
            .filter(|a| !matches!(a, Action::Log(_) | Action::SetPeerMayBeNewer(_)))
            .collect();
        assert_eq!(acts, retry.iter().collect::<Vec<_>>(), "{}", ctx());
    }
    // A ready SECOND that loses its PRIM fails over (no witness, failover on).
    if *event == Event::PeerLost
        && before.role == Role::Second
        && before.uptodate
        && before.policy.failover
        && !before.policy.witness
        && before.last_peer().is_some_and(|p| p.config_match)
    {
        assert_eq!(after.role, Role::Alone, "{}", ctx());
    }
}

#[test]
fn every_state_and_event_keeps_the_invariants() {
    let states = states();
    let events = events();
    let mut transitions = 0usize;
    for s in &states {
        for e in &events {
            let (after, actions) = step(s, e.clone());
            check_invariants(s, e, &after, &actions);
            transitions += 1;
        }
    }
    assert!(transitions > 1_000_000, "{transitions}");
}

/// The PRIM whose replication link goes down writes alone only once its
/// SECOND acknowledged being outdated; a stale or second-hand view of the
/// peer forks nothing.
#[test]
fn link_down_writes_alone_only_once_the_second_knows() {
    let (s, actions) = run(&prim(), &[LINK_DOWN]);
    assert_eq!(actions, [Action::NewGeneration, Action::MarkPeerOutdated]);
    let (s2, actions) = run(
        &s,
        &[Event::PeerMarkedOutdated {
            acknowledged: false,
        }],
    );
    assert_eq!((s2.role, actions), (Role::Prim, vec![]));
    let (s2, actions) = run(&s, &[Event::PeerMarkedOutdated { acknowledged: true }]);
    assert_eq!((s2.role, actions), (Role::Prim, vec![Action::WriteAlone]));
    // Marked already: the next report waits for the heartbeat that clears it.
    assert!(run(&s, &[LINK_DOWN]).1.is_empty());
    for (fresh, second) in [(false, true), (true, false), (false, false)] {
        let stale = Event::LinkDown {
            heartbeats_fresh: fresh,
            peer_is_second: second,
            peer_knows_outdated: false,
        };
        assert!(run(&prim(), &[stale]).1.is_empty(), "{fresh} {second}");
    }
    // The peer already shows it is outdated: no new generation, write alone.
    let knows = Event::LinkDown {
        heartbeats_fresh: true,
        peer_is_second: true,
        peer_knows_outdated: true,
    };
    assert_eq!(run(&prim(), &[knows]).1, [Action::WriteAlone]);
    // PRIM -> ALONE (the peer is lost) writes alone, last.
    let (alone, actions) = run(&prim(), &[Event::PeerLost]);
    assert_eq!(alone.role, Role::Alone);
    assert_eq!(actions.last(), Some(&Action::WriteAlone));
    assert_eq!(run(&alone, &[LINK_DOWN]).1, [Action::WriteAlone]);
}

#[test]
fn a_fence_the_peer_explains_is_no_fence() {
    let (alone, _) = run(&prim(), &[Event::PeerLost]);
    let explained = Event::Fenced {
        peer_follows_us: true,
    };
    assert_eq!(run(&alone, &[explained]), (alone.clone(), vec![]));
    assert_eq!(run(&alone, &[FENCED]).0.role, Role::Wait);
}

#[test]
fn a_seconds_dead_receiver_is_restarted_once_per_interval() {
    let (s, actions) = run(&second(), &[fs_died(1_000)]);
    assert_eq!(s.role, Role::Second);
    assert_eq!(
        actions,
        [Action::RestartReceiver {
            reason: "the process died".into()
        }]
    );
    // Dying again within the interval: the module leaves this node.
    let (again, actions) = run(&s, &[fs_died(1_000 + RECEIVER_RESTART_INTERVAL_MS - 1)]);
    assert_eq!(again.role, Role::Wait);
    assert!(actions.contains(&Action::Unmount));
    // After the interval it is restarted again.
    let later = fs_died(1_000 + RECEIVER_RESTART_INTERVAL_MS);
    assert_eq!(run(&s, &[later]).0.role, Role::Second);
    // A writer's vmha-fs failing is never restarted in place.
    let (p, actions) = run(&prim(), &[fs_died(1_000)]);
    assert_eq!(p.role, Role::Wait);
    assert!(actions.contains(&Action::StopVm));
}
