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
        live_swap: false,
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
        maintenance: false,
        live_swap: true,
        swap_phase: None,
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
fn ready_only_for_a_copy_known_current_even_in_stop_and_wait() {
    // STOP with current data: ready; without data or maybe behind: not.
    assert_eq!(fresh(true, false).readiness(), Readiness::Ready);
    assert_eq!(fresh(false, false).readiness(), Readiness::NotUpToDate);
    assert_eq!(fresh(true, true).readiness(), Readiness::NotUpToDate);
    // A stopped node that sees its peer writing newer data is outdated.
    let stopped = fresh(true, false);
    let (s, _) = run(
        &stopped,
        &[seen(peer(
            Role::Alone,
            Readiness::Ready,
            Relation::PeerNewer,
        ))],
    );
    assert_eq!(
        (s.role, s.readiness(), s.colour()),
        (Role::Stop, Readiness::NotUpToDate, Colour::Red)
    );
    // A stopped node whose own disk failed (self outdated).
    assert_eq!(
        fresh(true, false).with_self_outdated(true).readiness(),
        Readiness::NotUpToDate
    );
    // Whatever the state: a STOP or WAIT node is ready only when up to date.
    for st in states() {
        if matches!(st.role, Role::Stop | Role::Wait) && st.readiness() == Readiness::Ready {
            assert!(st.uptodate, "{st:?}");
        }
    }
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
            Action::MountWriterConnected,
            Action::DefineDomain,
            Action::StartVm
        ]
    );
    // Its receiver does not take the connected start: alone, once the old
    // PRIM knows it is outdated (never before).
    let (failed, actions) = run(&new, &[Event::ConnectedMountFailed]);
    assert_eq!(failed.role, Role::Prim);
    assert!(failed.pending_alone_mount);
    assert!(!actions.contains(&Action::MountWriter));
    assert_eq!(
        index(&actions, &Action::NewGeneration).map(|g| g + 1),
        index(&actions, &Action::MarkPeerOutdated)
    );
    let (alone, actions) = run(
        &failed,
        &[Event::PeerMarkedOutdated {
            acknowledged: true,
            peer_lost: false,
        }],
    );
    assert_eq!(
        (alone.role, actions),
        (
            Role::Prim,
            vec![Action::MountWriter, Action::DefineDomain, Action::StartVm]
        )
    );
    // The old PRIM shows up WAIT (it rebooted) before the marking ended:
    // the writer is not mounted yet, so it neither goes ALONE nor tells
    // vmha-fs to write alone; it mounts once the marking ends.
    let (waiting, actions) = run(
        &failed,
        &[seen(peer(
            Role::Wait,
            Readiness::NotUpToDate,
            Relation::LocalNewer,
        ))],
    );
    assert_eq!(waiting.role, Role::Prim);
    assert!(waiting.pending_alone_mount, "{actions:?}");
    assert!(!actions.contains(&Action::WriteAlone), "{actions:?}");
    let (_, actions) = run(
        &waiting,
        &[Event::PeerMarkedOutdated {
            acknowledged: true,
            peer_lost: false,
        }],
    );
    assert!(actions.contains(&Action::MountWriter), "{actions:?}");
    let (gave_up, actions) = run(
        &failed,
        &[Event::PeerMarkedOutdated {
            acknowledged: false,
            peer_lost: false,
        }],
    );
    assert_eq!(gave_up.role, Role::Wait);
    assert!(!actions.contains(&Action::MountWriter));
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
                    maintenance: false,
                    live_swap: true,
                    swap_phase: None,
                };
                out.push(base);
                match relation {
                    Relation::InSync => {
                        out.push(Peer {
                            maintenance: true,
                            ..base
                        });
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
                            // Live swap: the old PRIM hands over; the
                            // SECOND in standby, or whose standby failed;
                            // a peer of an older vmhad.
                            out.push(Peer {
                                request: Some(Request::TakeOverLive),
                                ..base
                            });
                            for phase in [SwapPhase::Standby, SwapPhase::StandbyFailed] {
                                out.push(Peer {
                                    swap_phase: Some(phase),
                                    ..base
                                });
                            }
                            out.push(Peer {
                                live_swap: false,
                                ..base
                            });
                        }
                        if role == Role::Prim {
                            out.push(Peer {
                                request: Some(Request::PrepareLive),
                                swap_phase: Some(SwapPhase::Preparing),
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
    let policies = [
        (true, false, false),
        (false, false, true),
        (true, true, true),
    ]
    .map(|(failover, witness, live_swap)| Policy {
        failover,
        witness,
        live_swap,
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
                    // (Never in maintenance: no probe starts, a running one is dropped.)
                    if policy.witness && probes && has_data && uptodate && !s.in_maintenance() {
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
                        // A connected start that failed, waiting for the
                        // SECOND to know it is outdated.
                        let mut p = s.clone();
                        p.pending_alone_mount = true;
                        p.vm_starting = true;
                        out.push(p);
                        let mut w = s.clone();
                        w.swapping = true;
                        out.push(w);
                        let mut r = s.clone();
                        r.swap_refused = true;
                        out.push(r);
                        // A live swap preparing (with or without the
                        // fallback to stop/start) or migrating; the new
                        // PRIM resuming (maybe after its connected
                        // activation failed).
                        for (phase, fallback) in [
                            (SwapPhase::Preparing, false),
                            (SwapPhase::Preparing, true),
                            (SwapPhase::Migrating, false),
                            (SwapPhase::Migrating, true),
                        ] {
                            let mut l = s.clone();
                            l.live = Some(phase);
                            l.live_fallback = fallback;
                            l.request = Some(Request::PrepareLive);
                            out.push(l);
                        }
                        let mut l = s.clone();
                        l.live = Some(SwapPhase::Resuming);
                        l.vm_starting = true;
                        out.push(l.clone());
                        l.pending_alone_mount = true;
                        out.push(l);
                    }
                    if role == Role::Second && uptodate {
                        for phase in [
                            SwapPhase::StandbyMounting,
                            SwapPhase::Standby,
                            SwapPhase::StandbyFailed,
                        ] {
                            let mut l = s.clone();
                            l.live = Some(phase);
                            out.push(l);
                        }
                        // The old PRIM, handed over live.
                        let mut l = s.clone();
                        l.request = Some(Request::TakeOverLive);
                        out.push(l);
                    }
                    if role.is_writer() {
                        for attach in [Attach::Asked, Attach::Failed] {
                            let mut a = s.clone();
                            a.attach = attach;
                            out.push(a);
                        }
                    }
                    if role == Role::Wait && hold {
                        // Its receiver did not start: the pause runs.
                        let mut r = s.clone();
                        r.receiver_retry = true;
                        out.push(r);
                    }
                    if role == Role::Second {
                        // Its receiver was restarted in place at 0 ms.
                        let mut r = s.clone();
                        r.receiver_restarted_ms = Some(0);
                        out.push(r);
                    }
                    // In maintenance on this node (some of it already held back),
                    // or out of the cluster (always STOP).
                    // (Not doubled where the peer's announcement already puts
                    // it in maintenance, nor without failover: kept fast.)
                    if policy.failover && !s.in_maintenance() {
                        let mut m = s.clone();
                        m.maintenance = true;
                        m.held_back = vec![HeldBack::VmDown];
                        out.push(m);
                    }
                    if role == Role::Stop {
                        let mut l = s.clone();
                        l.left = true;
                        out.push(l.clone());
                        l.maintenance = true;
                        out.push(l);
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
        Event::PeerMarkedOutdated {
            acknowledged: true,
            peer_lost: false,
        },
        Event::PeerMarkedOutdated {
            acknowledged: false,
            peer_lost: false,
        },
        Event::PeerMarkedOutdated {
            acknowledged: false,
            peer_lost: true,
        },
        Event::ConnectedMountFailed,
        Event::AttachFailed,
        Event::AttachRetryDue,
        Event::ReceiverFailed,
        Event::ReceiverRetryDue,
        Event::Fenced {
            peer_follows_us: true,
        },
        FENCED,
        fs_died(7),
        fs_died(RECEIVER_RESTART_INTERVAL_MS + 7),
        Event::WitnessResult(WitnessOutcome::Reachable),
        Event::WitnessResult(WitnessOutcome::Unreachable),
        Event::WitnessResult(WitnessOutcome::CouldNotProbe),
        Event::ResyncCompare,
        Event::Invalidate,
        Event::Leave,
        Event::Join,
        Event::Maintenance(true),
        Event::Maintenance(false),
        Event::SwapLive,
        Event::StandbyMounted,
        Event::StandbyFailed,
        Event::MigrateDone,
        Event::MigrateFailed {
            reason: "refused".into(),
        },
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
    for bits in 0u8..64 {
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
        paused_for_swap: bits & 32 != 0,
    }
}

const WRITER_FOUND: Found = Found {
    writer: true,
    settings_match: true,
    generation_current: true,
    alone: false,
    vm_running: true,
    paused_for_swap: false,
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
    // Writing alone: ALONE, under a new generation (the peer, however it
    // showed itself last, is outdated and is copied to again).
    let alone = Found {
        alone: true,
        ..WRITER_FOUND
    };
    let (s, actions) = run(&fresh(true, true), &[Event::Adopt(alone)]);
    assert_eq!(s.role, Role::Alone);
    assert!(actions.contains(&Action::NewGeneration), "{actions:?}");
    assert!(!actions.contains(&Action::StopVm), "{actions:?}");
    // Its VM is gone: started again, nothing else.
    let no_vm = Found {
        vm_running: false,
        ..WRITER_FOUND
    };
    let (s, actions) = run(&fresh(true, true), &[Event::Adopt(no_vm)]);
    assert_eq!(s.role, Role::Prim);
    assert_eq!(actions, vec![Action::DefineDomain, Action::StartVm]);
}

/// A new vmhad beside the writer a live swap activated, whose VM it had not
/// resumed yet (the previous vmhad died in between): adopted, the VM is
/// resumed (no start, no stop); not adopted, the paused VM is stopped first.
#[test]
fn a_new_vmhad_resumes_the_vm_a_live_swap_left_paused() {
    let paused = Found {
        paused_for_swap: true,
        ..WRITER_FOUND
    };
    let (s, actions) = run(&fresh(true, true), &[Event::Adopt(paused)]);
    assert_eq!(s.role, Role::Prim);
    assert_eq!(quiet(&actions), [&Action::ResumeVm]);
    assert_eq!(s.readiness(), Readiness::Transient, "the VM is starting");
    let (s, _) = run(&s, &[Event::VmStarted]);
    assert_eq!((s.role, s.readiness()), (Role::Prim, Readiness::Ready));
    let stale = Found {
        settings_match: false,
        ..paused
    };
    let (s, actions) = run(&fresh(true, true), &[Event::Adopt(stale)]);
    assert_eq!(s.role, Role::Wait);
    assert_eq!(actions[..2], [Action::StopVm, Action::Unmount]);
    assert!(!actions.contains(&Action::ResumeVm), "{actions:?}");
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
    let mount_writer = index(actions, &Action::MountWriter)
        .or_else(|| index(actions, &Action::MountWriterConnected))
        .or_else(|| index(actions, &Action::ActivateStandby { connected: true }))
        .or_else(|| index(actions, &Action::ActivateStandby { connected: false }));
    let promoted = !before.role.is_writer() && after.role.is_writer();
    // The writer mount after a failed connected start comes once the SECOND
    // knows it is outdated or is lost, never otherwise.
    let alone_after_connected = before.pending_alone_mount
        && after.role.is_writer()
        && matches!(
            event,
            Event::PeerMarkedOutdated { acknowledged, peer_lost } if *acknowledged || *peer_lost
        );
    if before.pending_alone_mount && !after.pending_alone_mount && after.role.is_writer() {
        assert!(alone_after_connected, "{}", ctx());
        assert!(mount_writer.is_some(), "{}", ctx());
    }
    // Connected only to a ready SECOND in sync with us.
    if actions.contains(&Action::MountWriterConnected) {
        assert!(
            matches!(after.peer, PeerKnowledge::Seen(p)
                if p.role == Role::Second
                    && p.readiness == Readiness::Ready
                    && p.relation == Relation::InSync),
            "{}",
            ctx()
        );
    }
    // Attach only a SECOND behind us, from a writer, once per episode.
    if actions.contains(&Action::AttachPeer) {
        assert!(after.role.is_writer(), "{}", ctx());
        assert_ne!(before.attach, Attach::Asked, "{}", ctx());
        assert_eq!(after.attach, Attach::Asked, "{}", ctx());
        assert!(
            matches!(after.peer, PeerKnowledge::Seen(p)
                if p.role == Role::Second && p.readiness == Readiness::NotUpToDate),
            "{}",
            ctx()
        );
    }
    // A receiver that did not start: WAIT, retried only after the pause
    // (or when the operator asks), and the pause only after a failure.
    if after.receiver_retry {
        assert_eq!(after.role, Role::Wait, "{}", ctx());
    }
    if before.receiver_retry && actions.contains(&Action::MountReceiver) {
        assert!(
            matches!(event, Event::ReceiverRetryDue | Event::Start),
            "{}",
            ctx()
        );
    }
    if actions.contains(&Action::RetryReceiver) {
        assert_eq!(*event, Event::ReceiverFailed, "{}", ctx());
        assert!(after.receiver_retry, "{}", ctx());
    }
    if *event == Event::ReceiverFailed && before.role == Role::Second {
        assert_eq!(after.role, Role::Wait, "{}", ctx());
        assert!(actions.contains(&Action::RetryReceiver), "{}", ctx());
        assert!(!after.uptodate, "{}", ctx());
    }
    if !after.role.is_writer() {
        assert_eq!(after.attach, Attach::Idle, "{}", ctx());
        assert!(!after.pending_alone_mount, "{}", ctx());
    }
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
            promoted || alone_after_connected,
            mount_writer.is_some(),
            "promotion = writer mount: {}",
            ctx()
        );
    }
    if let (true, Event::Adopt(found)) = (adopted, event) {
        if after.role.is_writer() {
            // Settings may differ only in maintenance (the VM is not stopped
            // for a setting then).
            assert!(found.writer && found.generation_current, "{}", ctx());
            assert!(found.settings_match || before.in_maintenance(), "{}", ctx());
            assert!(before.has_data && !before.self_outdated, "{}", ctx());
            // A writer writing alone is adopted under a new generation.
            assert_eq!(
                actions.contains(&Action::NewGeneration),
                found.alone,
                "{}",
                ctx()
            );
        }
        if after.role == Role::Second {
            assert!(!found.writer, "{}", ctx());
            assert!(found.settings_match || before.in_maintenance(), "{}", ctx());
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
            (Event::Start | Event::Join | Event::Adopt(_), _) => {
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
    let migrated = before.role == Role::Prim
        && before.live == Some(SwapPhase::Migrating)
        && *event == Event::MigrateDone;
    let swap_done = (before.swapping && *event == Event::VmStopDone) || migrated;
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
    if *event == Event::DiskFailed && !before.in_maintenance() {
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
    if before.disk_failed && *event != Event::Start && *event != Event::Join {
        for a in actions {
            assert!(
                matches!(
                    a,
                    Action::Log(_) | Action::SetPeerMayBeNewer(_) | Action::SetMaintenance(_)
                ),
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
    if after.role == Role::Second
        && before.role == Role::Prim
        && *event != Event::VmStopDone
        && !migrated
    {
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
                    Event::PeerMarkedOutdated {
                        acknowledged: true,
                        peer_lost: false
                    } | Event::LinkDown {
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
                    .filter(|a| {
                        !matches!(
                            a,
                            Action::Log(_) | Action::SetPeerMayBeNewer(_) | Action::AbortMigration
                        )
                    })
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
        let maintenance = before.in_maintenance();
        assert_eq!(
            restart,
            before.role == Role::Second && allowed && !maintenance,
            "{}",
            ctx()
        );
        if restart {
            assert_eq!(after.role, Role::Second, "{}", ctx());
            assert_eq!(after.receiver_restarted_ms, Some(now_ms), "{}", ctx());
        } else if before.role != Role::Stop && before.role != Role::Wait && !maintenance {
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
        && !before.in_maintenance()
    {
        assert_eq!(after.role, Role::Alone, "{}", ctx());
    }
    check_live_swap(before, event, after, actions);
    check_leave_and_maintenance(before, event, after, actions);
}

/// Live swap: the VM moves only to a SECOND in standby and in sync, resumes
/// only once the old writer handed over (never two writers), and every
/// abort leaves it running on one node.
fn check_live_swap(before: &ModuleState, event: &Event, after: &ModuleState, actions: &[Action]) {
    let ctx = || format!("{before:?}\n  --{event:?}-->\n{after:?}\n  actions {actions:?}");
    if actions.contains(&Action::MigrateVm) {
        assert_eq!(before.role, Role::Prim, "{}", ctx());
        assert_eq!(before.live, Some(SwapPhase::Preparing), "{}", ctx());
        assert_eq!(after.live, Some(SwapPhase::Migrating), "{}", ctx());
        assert!(
            matches!(after.peer, PeerKnowledge::Seen(p)
                if p.role == Role::Second
                    && p.readiness == Readiness::Ready
                    && p.relation == Relation::InSync
                    && p.swap_phase == Some(SwapPhase::Standby)),
            "migrating to a peer not in standby: {}",
            ctx()
        );
        assert!(!before.peer_outdated, "{}", ctx());
        // The VM keeps running here until the migration reports.
        assert!(!actions.contains(&Action::StopVm), "{}", ctx());
        assert!(!actions.contains(&Action::Unmount), "{}", ctx());
    }
    if actions.contains(&Action::MountStandby) {
        assert_eq!(after.role, Role::Second, "{}", ctx());
        assert!(after.uptodate, "{}", ctx());
        assert_eq!(after.live, Some(SwapPhase::StandbyMounting), "{}", ctx());
        assert!(
            matches!(after.peer, PeerKnowledge::Seen(p)
                if p.role == Role::Prim && p.request == Some(Request::PrepareLive)),
            "{}",
            ctx()
        );
    }
    // The standby becomes the writer only when the old PRIM handed over
    // (its writer unmounted, drained) with this node in standby and up to
    // date; the alone activation only after the peer knows it is outdated.
    if actions.contains(&Action::ActivateStandby { connected: true }) {
        assert_eq!(before.role, Role::Second, "{}", ctx());
        assert_eq!(before.live, Some(SwapPhase::Standby), "{}", ctx());
        assert!(before.uptodate, "{}", ctx());
        assert!(
            matches!(event, Event::PeerSeen { peer, .. }
                if peer.role == Role::Second && peer.request == Some(Request::TakeOverLive)),
            "{}",
            ctx()
        );
    }
    // The live flip: the new writer takes the old PRIM's flip (when it shows
    // one) right before it claims, connected, and only then; the old PRIM
    // persists it only between its drain and its receiver.
    if let Some(adopt) = index(actions, &Action::AdoptFlip) {
        let claim = index(actions, &Action::ActivateStandby { connected: true })
            .or_else(|| index(actions, &Action::MountWriterConnected))
            .or_else(|| index(actions, &Action::MountWriter));
        assert!(claim.is_some_and(|c| adopt < c), "{}", ctx());
        assert!(
            matches!(after.peer, PeerKnowledge::Seen(p)
                if p.role == Role::Second && p.request == Some(Request::TakeOverLive)),
            "{}",
            ctx()
        );
        assert!(!actions.contains(&Action::NewGeneration), "{}", ctx());
    }
    if actions.contains(&Action::ActivateStandby { connected: true }) {
        assert!(actions.contains(&Action::AdoptFlip), "{}", ctx());
    }
    if let Some(flip) = index(actions, &Action::FlipGeneration) {
        assert_eq!(*event, Event::MigrateDone, "{}", ctx());
        let u = index(actions, &Action::Unmount);
        let r = index(actions, &Action::MountReceiver);
        assert!(u.is_some_and(|u| u < flip), "{}", ctx());
        assert!(r.is_some_and(|r| flip < r), "{}", ctx());
        assert_eq!(after.request, Some(Request::TakeOverLive), "{}", ctx());
    }
    if actions.contains(&Action::ActivateStandby { connected: false }) {
        assert!(before.pending_alone_mount, "{}", ctx());
        assert_eq!(before.live, Some(SwapPhase::Resuming), "{}", ctx());
    }
    // Resumed only after the activation (or, by a new vmhad, beside the
    // activated writer it adopts), as the writer, beside no writer.
    if let Some(resume) = index(actions, &Action::ResumeVm) {
        let activate = index(actions, &Action::ActivateStandby { connected: true })
            .or_else(|| index(actions, &Action::ActivateStandby { connected: false }));
        let adopted = matches!(event, Event::Adopt(f) if f.writer && f.paused_for_swap);
        assert!(adopted || activate.is_some_and(|a| a < resume), "{}", ctx());
        assert!(after.role.is_writer(), "{}", ctx());
        assert!(!after.peer_is_writer(), "{}", ctx());
    }
    // A SECOND leaving its standby takes it down (or activates it), before
    // any unmount.
    if before.role == Role::Second
        && before.live.is_some()
        && (after.role != Role::Second || after.live.is_none())
    {
        let activated = actions.contains(&Action::ActivateStandby { connected: true });
        let dropped = index(actions, &Action::DropStandby);
        assert!(activated || dropped.is_some(), "standby left up: {}", ctx());
        if let (Some(d), Some(u)) = (dropped, index(actions, &Action::Unmount)) {
            assert!(d < u, "{}", ctx());
        }
    }
    // The standby (and its paused VM) goes before anything restarts the
    // receiver under it.
    if let (Some(d), Some(r)) = (
        index(actions, &Action::DropStandby),
        actions.iter().position(|a| {
            matches!(
                a,
                Action::StartResync { .. } | Action::RestartReceiver { .. }
            )
        }),
    ) {
        assert!(d < r, "{}", ctx());
    }
    if actions.contains(&Action::DropStandby) {
        assert_eq!(before.role, Role::Second, "{}", ctx());
        assert!(before.live.is_some(), "{}", ctx());
    }
    // The migration runs in the background: whatever ends it but its own
    // outcome aborts it first (before a stop, an unmount, a new generation),
    // and nothing else aborts anything.
    let reported = matches!(event, Event::MigrateDone | Event::MigrateFailed { .. });
    let left_migration = before.live == Some(SwapPhase::Migrating)
        && after.live != Some(SwapPhase::Migrating)
        && !reported;
    assert_eq!(
        actions.first() == Some(&Action::AbortMigration),
        left_migration,
        "{}",
        ctx()
    );
    assert!(
        actions
            .iter()
            .filter(|a| **a == Action::AbortMigration)
            .count()
            <= 1,
        "{}",
        ctx()
    );
    if left_migration {
        // Never a fallback to stop/start on an abort.
        assert!(after.live_outcome.1.is_some(), "{}", ctx());
        assert!(!after.swapping, "{}", ctx());
    }
    // The peer lost, the link down or the SECOND out of its standby: the
    // migration is given up at once.
    if before.live == Some(SwapPhase::Migrating) {
        let ends = match event {
            Event::PeerLost | Event::LinkDown { .. } => true,
            Event::PeerSeen { peer, .. } => {
                !(peer.role == Role::Second && peer.swap_phase == Some(SwapPhase::Standby))
            }
            _ => false,
        };
        if ends && !before.in_maintenance() {
            assert_ne!(after.live, Some(SwapPhase::Migrating), "{}", ctx());
        }
        // A VM stop meanwhile is the migration's: no restart, no step down.
        if matches!(event, Event::VmStopped { .. } | Event::VmStartFailed { .. }) {
            assert!(!actions.contains(&Action::StartVm), "{}", ctx());
            assert_eq!(after.role, before.role, "{}", ctx());
        }
    }
    // A failed or refused migration: the VM stays, so does the role.
    if matches!(event, Event::MigrateFailed { .. }) {
        assert_eq!(after.role, before.role, "{}", ctx());
        assert!(!actions.contains(&Action::Unmount), "{}", ctx());
        if before.live == Some(SwapPhase::Migrating) {
            assert_eq!(after.live, None, "{}", ctx());
            assert!(after.live_outcome.1.is_some(), "{}", ctx());
            // Falls back to stop/start only with `swap = "live"`'s swap.
            assert_eq!(
                actions.contains(&Action::StopVm),
                before.live_fallback
                    && before.role == Role::Prim
                    && !before.in_maintenance()
                    && matches!(before.peer, PeerKnowledge::Seen(p) if p.role == Role::Second && p.readiness == Readiness::Ready),
                "{}",
                ctx()
            );
        }
    }
    // The migration done: the old PRIM is a drained SECOND asking the peer
    // to resume (no stop, no new generation).
    if *event == Event::MigrateDone
        && before.live == Some(SwapPhase::Migrating)
        && before.role == Role::Prim
    {
        assert_eq!(after.role, Role::Second, "{}", ctx());
        assert_eq!(after.request, Some(Request::TakeOverLive), "{}", ctx());
        assert!(!actions.contains(&Action::StopVm), "{}", ctx());
        assert!(!actions.contains(&Action::NewGeneration), "{}", ctx());
        let u = index(actions, &Action::Unmount);
        let r = index(actions, &Action::MountReceiver);
        assert!(u.is_some() && u < r, "{}", ctx());
        assert!(actions.contains(&Action::FlipGeneration), "{}", ctx());
    }
    // Live requests only to a peer that takes part in live swaps.
    if after.request == Some(Request::PrepareLive) && before.request != Some(Request::PrepareLive) {
        assert!(
            matches!(
                event,
                Event::SwapLive | Event::Swap | Event::PeerSeen { .. } | Event::Maintenance(false)
            ),
            "{}",
            ctx()
        );
        if *event != Event::SwapLive {
            assert!(before.policy.live_swap, "{}", ctx());
        }
        assert!(
            matches!(after.peer, PeerKnowledge::Seen(p) if p.live_swap),
            "{}",
            ctx()
        );
    }
    if *event == Event::SwapLive && !matches!(after.live, Some(SwapPhase::Preparing)) {
        // Refused: nothing moves, and the answer says so.
        assert_eq!(after.role, before.role, "{}", ctx());
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::Log(l) if l.contains("refused"))),
            "{}",
            ctx()
        );
        assert!(!actions.contains(&Action::StopVm), "{}", ctx());
    }
}

/// Leave: the node hands over and runs nothing until it joins. Maintenance:
/// nothing automatic happens, only what an operator asked for.
fn check_leave_and_maintenance(
    before: &ModuleState,
    event: &Event,
    after: &ModuleState,
    actions: &[Action],
) {
    let ctx = || format!("{before:?}\n  --{event:?}-->\n{after:?}\n  actions {actions:?}");
    // (A running migration's abort comes first, checked by `check_live_swap`.)
    let acts: Vec<&Action> = actions
        .iter()
        .filter(|a| {
            !matches!(
                a,
                Action::Log(_) | Action::SetPeerMayBeNewer(_) | Action::AbortMigration
            )
        })
        .collect();
    // ---- leave ----
    if *event == Event::Leave {
        assert_eq!(after.role, Role::Stop, "{}", ctx());
        assert!(after.left, "{}", ctx());
        if before.role.is_writer() {
            assert_eq!(acts, [&Action::StopVm, &Action::Unmount], "{}", ctx());
        }
    }
    if after.left {
        assert_eq!(after.role, Role::Stop, "a node that left runs: {}", ctx());
        assert!(after.announce().left, "{}", ctx());
    }
    if before.left && *event != Event::Join {
        assert!(after.left, "{}", ctx());
        for a in &acts {
            // Recording facts is not acting (a disk failure, a maintenance).
            // A new vmhad of a node that left stops what it finds running.
            let stops_found =
                matches!(event, Event::Adopt(_)) && matches!(a, Action::StopVm | Action::Unmount);
            assert!(
                stops_found || matches!(a, Action::SetMaintenance(_) | Action::SetSelfOutdated(_)),
                "a node that left acted: {}",
                ctx()
            );
        }
    }
    if *event == Event::Join {
        assert!(!after.left, "{}", ctx());
    }
    // ---- maintenance ----
    if let Event::Maintenance(on) = *event {
        assert_eq!(after.maintenance, on, "{}", ctx());
        assert_eq!(after.announce().maintenance, on, "{}", ctx());
        let persisted = actions.contains(&Action::SetMaintenance(on));
        assert_eq!(persisted, before.maintenance != on, "{}", ctx());
        if on {
            assert!(!after.probing(), "{}", ctx());
            // Turning it on never stops, starts or moves anything.
            for a in &acts {
                assert!(
                    matches!(
                        a,
                        Action::SetMaintenance(_) | Action::NewGeneration | Action::WriteAlone
                    ),
                    "{}",
                    ctx()
                );
            }
        }
    } else {
        assert_eq!(after.maintenance, before.maintenance, "{}", ctx());
    }
    if !before.in_maintenance() {
        return;
    }
    let operator = matches!(
        event,
        Event::Start
            | Event::Stop
            | Event::Swap
            | Event::PrimForced
            | Event::Leave
            | Event::Join
            | Event::Maintenance(false)
    );
    // Checkers change nothing: no restart, no step down, no receiver restart.
    if matches!(
        event,
        Event::VmStopped { .. }
            | Event::VmStartFailed { .. }
            | Event::FsFailed
            | Event::DiskFailed
            | Event::FsDied { .. }
            | Event::Fenced { .. }
    ) {
        assert_eq!(after.role, before.role, "{}", ctx());
        assert!(acts.is_empty(), "maintenance acted on a checker: {}", ctx());
    }
    // A lost peer: nobody fails over, no witness; a PRIM keeps its VM alone.
    if *event == Event::PeerLost {
        let expected = if before.role == Role::Prim && before.last_peer().is_some() {
            Role::Alone
        } else {
            before.role
        };
        assert_eq!(after.role, expected, "{}", ctx());
        assert!(!acts.contains(&&Action::ProbeWitness), "{}", ctx());
        assert!(!acts.contains(&&Action::StopVm), "{}", ctx());
        assert!(!acts.contains(&&Action::MountWriter), "{}", ctx());
    }
    // Promotion only by the operator or an explicit hand-over of the peer.
    let promoted = !before.role.is_writer() && after.role.is_writer();
    if promoted && after.in_maintenance() && !operator {
        match event {
            Event::PeerSeen { peer, .. } => assert!(
                peer.role == Role::Stop
                    || matches!(
                        peer.request,
                        Some(Request::TakeOver | Request::TakeOverLive)
                    ),
                "maintenance promoted without a hand-over: {}",
                ctx()
            ),
            // A new vmhad takes over what runs: nothing changes for the VM.
            Event::Adopt(_) => {}
            _ => panic!("maintenance promoted: {}", ctx()),
        }
    }
    // No VM start but with the writer mount of an operator's or hand-over's promotion.
    // (A connected start that fell back to alone finishes its hand-over.)
    if actions.contains(&Action::StartVm) && !operator {
        assert!(
            promoted || before.pending_alone_mount,
            "maintenance restarted the VM: {}",
            ctx()
        );
    }
    // No automatic swap-back.
    // (A connected start whose fallback failed never started its VM.)
    // (A daemon start stops what it must not adopt: a stale writer.)
    let unadoptable = matches!(event, Event::Adopt(_)) && !after.role.is_writer();
    // (An operator's swap whose live migration failed falls back to
    // stop/start once maintenance is over.)
    let live_fallback = before.live_fallback && !after.in_maintenance();
    if actions.contains(&Action::StopVm)
        && !operator
        && !before.pending_alone_mount
        && !unadoptable
        && !live_fallback
    {
        assert!(
            matches!(event, Event::PeerSeen { peer, .. } if peer.request == Some(Request::HandOver) || peer.role.is_writer() || peer.relation == Relation::PeerNewer),
            "maintenance stopped the VM: {}",
            ctx()
        );
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
            peer_lost: false,
        }],
    );
    assert_eq!((s2.role, actions), (Role::Prim, vec![]));
    let (s2, actions) = run(
        &s,
        &[Event::PeerMarkedOutdated {
            acknowledged: true,
            peer_lost: false,
        }],
    );
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

// ---- operator repairs: resync --compare, invalidate ----

fn log_of(state: &ModuleState, event: Event) -> (ModuleState, Vec<Action>, String) {
    let (next, actions) = step(state, event);
    let log = actions
        .iter()
        .filter_map(|a| match a {
            Action::Log(l) => Some(l.clone()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("\n");
    (next, actions, log)
}

#[test]
fn resync_compare_on_the_prim_makes_the_second_outdated_then_compares() {
    let (s, actions, log) = log_of(&prim(), Event::ResyncCompare);
    let acts: Vec<_> = actions
        .into_iter()
        .filter(|a| !matches!(a, Action::Log(_)))
        .collect();
    assert_eq!(
        acts,
        vec![
            Action::RequestCompare,
            Action::NewGeneration,
            Action::MarkPeerOutdated
        ],
        "{log}"
    );
    assert!(!log.contains("refused"), "{log}");
    assert!(s.peer_outdated);
    assert_eq!(s.role, Role::Prim);
    // Writes go alone only once the SECOND knows; then it is attached again.
    let (s, acts) = run(
        &s,
        &[Event::PeerMarkedOutdated {
            acknowledged: true,
            peer_lost: false,
        }],
    );
    assert_eq!(acts, vec![Action::WriteAlone]);
    // A second request while the SECOND is behind is refused, not stacked.
    let behind = seen(peer(
        Role::Second,
        Readiness::NotUpToDate,
        Relation::LocalNewer,
    ));
    let (s, _) = run(&s, &[behind]);
    let (_, actions, log) = log_of(&s, Event::ResyncCompare);
    assert!(log.contains("refused"), "{log}");
    assert!(actions.iter().all(|a| matches!(a, Action::Log(_))));
}

#[test]
fn the_second_sees_the_compare_as_a_resync_and_is_ready_at_its_end() {
    let (s, acts) = run(
        &second(),
        &[seen(peer(
            Role::Prim,
            Readiness::Ready,
            Relation::PeerNewer,
        ))],
    );
    assert_eq!(s.readiness(), Readiness::NotUpToDate);
    assert!(
        acts.contains(&Action::StartResync { full: false }),
        "{acts:?}"
    );
    let (s, acts) = run(&s, &[Event::ResyncDone]);
    assert_eq!(s.readiness(), Readiness::Ready);
    assert!(acts.contains(&Action::AdoptPeerHistory));
}

#[test]
fn resync_compare_on_a_ready_second_asks_the_prim() {
    let (s, _, log) = log_of(&second(), Event::ResyncCompare);
    assert_eq!(s.request, Some(Request::Compare), "{log}");
    assert_eq!(s.announce().request, Some(Request::Compare));
    // The PRIM answers a SECOND's request like its own command.
    let asking = Peer {
        request: Some(Request::Compare),
        ..peer(Role::Second, Readiness::Ready, Relation::InSync)
    };
    let (p, acts) = run(&prim(), &[seen(asking)]);
    assert!(p.peer_outdated);
    assert!(
        acts.contains(&Action::RequestCompare) && acts.contains(&Action::MarkPeerOutdated),
        "{acts:?}"
    );
    // Once the PRIM's generation is newer, the SECOND's request is answered.
    let (s, acts) = run(
        &s,
        &[seen(peer(
            Role::Prim,
            Readiness::Ready,
            Relation::PeerNewer,
        ))],
    );
    assert_eq!(s.request, None);
    assert!(
        acts.contains(&Action::StartResync { full: false }),
        "{acts:?}"
    );
}

#[test]
fn invalidate_on_a_second_discards_its_copy_and_takes_a_full_compare() {
    let (s, actions, log) = log_of(&second(), Event::Invalidate);
    assert!(!log.contains("refused"), "{log}");
    // Persisted before the copy is touched.
    let first = actions
        .iter()
        .position(|a| *a == Action::SetSelfOutdated(true));
    let inval = actions.iter().position(|a| *a == Action::InvalidateCopy);
    assert!(first.is_some() && first < inval, "{actions:?}");
    assert_eq!(s.readiness(), Readiness::NotUpToDate);
    assert_eq!(s.request, Some(Request::Compare));
    // Not promoted if the PRIM dies now: the copy is discarded.
    let (lost, _) = run(&s, &[Event::PeerLost]);
    assert_eq!(lost.role, Role::Wait);
    // The PRIM starts the compare for a not-ready SECOND that asks.
    let asking = Peer {
        request: Some(Request::Compare),
        ..peer(Role::Second, Readiness::NotUpToDate, Relation::InSync)
    };
    let (_, acts) = run(&prim(), &[seen(asking)]);
    assert!(acts.contains(&Action::NewGeneration), "{acts:?}");
    // Its new generation starts a full resync here; the end makes it ready.
    let (s, acts) = run(
        &s,
        &[seen(peer(
            Role::Prim,
            Readiness::Ready,
            Relation::PeerNewer,
        ))],
    );
    assert!(
        acts.contains(&Action::StartResync { full: true }),
        "{acts:?}"
    );
    let (s, acts) = run(&s, &[Event::ResyncDone]);
    assert_eq!(s.readiness(), Readiness::Ready);
    assert!(!s.self_outdated);
    assert!(acts.contains(&Action::SetSelfOutdated(false)));
}

#[test]
fn invalidate_and_resync_compare_are_refused_where_they_make_no_sense() {
    let stop = fresh(true, false);
    let alone = run(
        &fresh(true, false),
        &[Event::Start, Event::StartWaitElapsed],
    )
    .0;
    assert_eq!(alone.role, Role::Alone);
    let wait = run(&fresh(false, false), &[Event::Start]).0;
    assert_eq!(wait.role, Role::Wait);
    for (name, state) in [
        ("PRIM", prim()),
        ("STOP", stop),
        ("ALONE", alone),
        ("WAIT", wait),
    ] {
        let (next, actions, log) = log_of(&state, Event::Invalidate);
        assert!(log.contains("invalidate refused"), "{name}: {log}");
        assert!(log.contains(name), "{name}: {log}");
        assert!(
            actions.iter().all(|a| matches!(a, Action::Log(_))),
            "{name}"
        );
        assert_eq!(next, state, "{name}");
        if name != "PRIM" {
            let (next, _, log) = log_of(&state, Event::ResyncCompare);
            assert!(log.contains("resync --compare refused"), "{name}: {log}");
            assert_eq!(next, state, "{name}");
        }
    }
}

/// A SECOND behind the writer is attached once per episode; a failed attach
/// is retried after a pause, not at every heartbeat; a ready SECOND ends the
/// episode, and writing alone starts a new one.
#[test]
fn a_second_behind_is_attached_once_and_retried_after_failure() {
    let behind = seen(peer(
        Role::Second,
        Readiness::NotUpToDate,
        Relation::LocalNewer,
    ));
    let (s, actions) = run(&prim(), std::slice::from_ref(&behind));
    assert_eq!(actions, [Action::AttachPeer]);
    assert_eq!(s.attach, Attach::Asked);
    // More heartbeats of the same episode: nothing more.
    assert!(run(&s, std::slice::from_ref(&behind)).1.is_empty());
    let (s, actions) = run(&s, &[Event::AttachFailed]);
    assert_eq!(
        (s.attach, actions),
        (Attach::Failed, vec![Action::RetryAttach])
    );
    assert!(run(&s, std::slice::from_ref(&behind)).1.is_empty());
    let (s, actions) = run(&s, &[Event::AttachRetryDue]);
    assert_eq!(
        (s.attach, actions),
        (Attach::Asked, vec![Action::AttachPeer])
    );
    // In sync and ready: episode over; behind again later: a new attach.
    let (s, _) = run(
        &s,
        &[seen(peer(Role::Second, Readiness::Ready, Relation::InSync))],
    );
    assert_eq!(s.attach, Attach::Idle);
    let (s, actions) = run(&s, std::slice::from_ref(&behind));
    assert_eq!(actions, [Action::AttachPeer]);
    // Writing alone drops the peer in vmha-fs: the next attach is new.
    let (s, actions) = run(&s, &[LINK_DOWN]);
    assert!(actions.contains(&Action::MarkPeerOutdated));
    let (s, actions) = run(
        &s,
        &[Event::PeerMarkedOutdated {
            acknowledged: true,
            peer_lost: false,
        }],
    );
    assert_eq!(
        (s.attach, actions),
        (Attach::Idle, vec![Action::WriteAlone])
    );
    // A retry that comes after the episode ended asks nothing.
    let mut ended = s.clone();
    ended.attach = Attach::Idle;
    assert!(run(&ended, &[Event::AttachRetryDue]).1.is_empty());
}

fn logs(actions: &[Action]) -> Vec<&str> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Log(l) => Some(l.as_str()),
            _ => None,
        })
        .collect()
}

#[test]
fn leave_hands_over_and_stays_out_until_join() {
    let (s, actions) = run(&prim(), &[Event::Leave]);
    assert_eq!((s.role, s.left), (Role::Stop, true));
    assert_eq!(actions, [Action::StopVm, Action::Unmount]);
    assert!(s.announce().left);
    // The ready SECOND sees the STOP and takes over, as after `vmctl stop`.
    let (peer_side, actions) = run(
        &second(),
        &[seen(peer(Role::Stop, Readiness::Ready, Relation::InSync))],
    );
    assert_eq!(peer_side.role, Role::Alone);
    assert!(actions.contains(&Action::StartVm));
    // Out: `start` (also the daemon's at restart) and `prim` are refused, and
    // neither the peer writing nor the peer lost brings the module back.
    for event in [Event::Start, Event::PrimForced] {
        let (after, actions) = step(&s, event);
        assert_eq!(after.role, Role::Stop);
        assert!(
            logs(&actions).iter().any(|l| l.contains("refused")),
            "{actions:?}"
        );
    }
    let writer = seen(peer(Role::Alone, Readiness::Ready, Relation::PeerNewer));
    let (after, actions) = run(
        &s,
        &[writer.clone(), Event::PeerLost, Event::StartWaitElapsed],
    );
    assert_eq!(after.role, Role::Stop);
    assert!(actions.is_empty(), "{actions:?}");
    // A restart keeps it out (the driver restores the persisted leave).
    let restarted = ModuleState::new(policy(), true, true).with_left(true);
    let (after, _) = run(&restarted, &[Event::Start, writer.clone()]);
    assert_eq!(after.role, Role::Stop);
    // `join`: starts as the daemon does and follows the writer.
    let (after, actions) = run(&s, &[Event::Join, writer]);
    assert!(!after.left);
    assert_eq!(after.role, Role::Second);
    assert!(actions.contains(&Action::MountReceiver));
    // Leave from every role ends STOP; an ALONE's VM is stopped (nobody to
    // hand over to), a SECOND's receiver is stopped.
    let (alone, _) = run(&prim(), &[Event::PeerLost]);
    assert_eq!(alone.role, Role::Alone);
    let (after, actions) = run(&alone, &[Event::Leave]);
    assert_eq!(
        (after.role, actions),
        (Role::Stop, vec![Action::StopVm, Action::Unmount])
    );
    let (after, actions) = run(&second(), &[Event::Leave]);
    assert_eq!((after.role, actions), (Role::Stop, vec![Action::Unmount]));
}

#[test]
fn maintenance_holds_back_every_automatic_reaction() {
    let (p, actions) = run(&prim(), &[Event::Maintenance(true)]);
    assert_eq!(actions, [Action::SetMaintenance(true)]);
    assert!(p.announce().maintenance);
    // The VM stops behind the controller's back: not restarted, logged once.
    let (after, actions) = run_exact(&p, &[Event::VmStopped { now_ms: 1 }]);
    assert_eq!(after.role, Role::Prim);
    assert!(actions.is_empty(), "{actions:?}");
    let (_, again) = step(&after, Event::VmStopped { now_ms: 2 });
    assert!(again.is_empty(), "logged twice: {again:?}");
    // vmha-fs or the disk failing, a fence: nothing.
    for event in [Event::FsFailed, Event::DiskFailed, fs_died(3), FENCED] {
        let (a, actions) = run_exact(&after, &[event]);
        assert_eq!(a.role, Role::Prim);
        assert!(actions.is_empty(), "{actions:?}");
    }
    // Off: the checker's next report restarts the VM.
    let (off, actions) = run(&after, &[Event::Maintenance(false)]);
    assert_eq!(actions, [Action::SetMaintenance(false)]);
    let (_, actions) = run_exact(&off, &[Event::VmStopped { now_ms: 4 }]);
    assert_eq!(actions, [Action::StartVm]);

    // A SECOND in maintenance does not fail over; once it ends, it does.
    let (s, _) = run(&second(), &[Event::Maintenance(true), Event::PeerLost]);
    assert_eq!(s.role, Role::Second);
    let (s, actions) = run(&s, &[Event::Maintenance(false)]);
    assert_eq!(s.role, Role::Alone);
    assert!(actions.contains(&Action::StartVm));
    // Nor does it take over from a writer that stepped down.
    let (s, _) = run(
        &second(),
        &[
            Event::Maintenance(true),
            seen(peer(Role::Wait, Readiness::Ready, Relation::InSync)),
        ],
    );
    assert_eq!(s.role, Role::Second);
    // An explicit hand-over (the peer's operator stopped it) is still taken.
    let (s, _) = run(
        &second(),
        &[
            Event::Maintenance(true),
            seen(peer(Role::Stop, Readiness::Ready, Relation::InSync)),
        ],
    );
    assert_eq!(s.role, Role::Alone);
}

#[test]
fn the_peers_maintenance_holds_this_node_back_too() {
    let in_maintenance = Peer {
        maintenance: true,
        ..peer(Role::Prim, Readiness::Ready, Relation::InSync)
    };
    // The PRIM's node is in maintenance: its SECOND does not fail over when
    // it goes silent (its controller may be restarting), only by `prim`.
    let (s, _) = run(&second(), &[seen(in_maintenance), Event::PeerLost]);
    assert_eq!(s.role, Role::Second);
    assert!(s.in_maintenance() && !s.maintenance);
    let (s, _) = run(&s, &[Event::PrimForced]);
    assert_eq!(s.role, Role::Alone);
    // The SECOND's node is in maintenance: the PRIM losing it keeps its VM and
    // writes alone without asking the witness (the SECOND does not take over).
    let p = with_policy(prim(), |p| p.witness = true);
    let second_in_maintenance = Peer {
        maintenance: true,
        ..peer(Role::Second, Readiness::Ready, Relation::InSync)
    };
    let (p, actions) = run(&p, &[seen(second_in_maintenance), Event::PeerLost]);
    assert_eq!(p.role, Role::Alone);
    assert!(!actions.contains(&Action::ProbeWitness), "{actions:?}");
    assert_eq!(actions.last(), Some(&Action::WriteAlone));
    // The peer ending its maintenance lets this node act again.
    let (s, _) = run(&second(), &[seen(in_maintenance)]);
    let back = peer(Role::Wait, Readiness::Ready, Relation::InSync);
    let (s, _) = run(&s, &[seen(back)]);
    assert_eq!(s.role, Role::Alone, "{s:?}");
}

/// A receiver that does not start: the node steps down to WAIT and holds —
/// the writer's heartbeats do not retry it — until the pause asked for by
/// `RetryReceiver` is over; then it follows the writer again. The operator's
/// `stop` ends the pause, and `start` follows at once.
#[test]
fn a_receiver_that_does_not_start_is_retried_after_a_pause() {
    let writer = seen(peer(Role::Prim, Readiness::Ready, Relation::PeerNewer));
    let (s, actions) = run(&fresh(true, false), &[Event::Start, writer.clone()]);
    assert!(actions.contains(&Action::MountReceiver));
    assert_eq!(s.role, Role::Second);
    let (s, actions) = run(&s, &[Event::ReceiverFailed]);
    assert_eq!(actions, [Action::Unmount, Action::RetryReceiver]);
    assert_eq!(
        (s.role, s.readiness(), s.receiver_retry),
        (Role::Wait, Readiness::NotUpToDate, true)
    );
    // Heartbeats meanwhile change nothing.
    let (held, actions) = run(&s, &[writer.clone(), writer.clone()]);
    assert!(actions.is_empty(), "{actions:?}");
    assert_eq!(held, s);
    let (s, actions) = run(&held, &[Event::ReceiverRetryDue]);
    assert_eq!(
        actions,
        [Action::MountReceiver, Action::StartResync { full: false }]
    );
    assert_eq!((s.role, s.receiver_retry), (Role::Second, false));
    // A late retry asks nothing; neither does a second failure elsewhere.
    assert!(run(&s, &[Event::ReceiverRetryDue]).1.is_empty());
    // The operator's stop ends the pause; start follows at once.
    let (s, _) = run(&held, &[Event::Stop]);
    assert_eq!((s.role, s.receiver_retry), (Role::Stop, false));
    let (s, actions) = run(&s, &[Event::Start, writer]);
    assert!(actions.contains(&Action::MountReceiver), "{actions:?}");
    assert_eq!(s.role, Role::Second);
}

/// In maintenance (an upgrade, say) a new vmhad adopts the running writer
/// even when its settings differ: the VM is not stopped for a setting. A
/// writer that does not claim the current generation is still stopped.
#[test]
fn maintenance_adopts_a_writer_whose_settings_differ() {
    let mut s = ModuleState::new(policy(), true, false).with_maintenance(true);
    s.changed_bytes = 0;
    let found = Found {
        writer: true,
        settings_match: false,
        generation_current: true,
        alone: false,
        vm_running: true,
        paused_for_swap: false,
    };
    let (a, actions) = run(&s, &[Event::Adopt(found)]);
    assert_eq!(a.role, Role::Prim, "{actions:?}");
    assert!(!actions.contains(&Action::StopVm), "{actions:?}");
    // Out of maintenance the same writer is stopped and started anew.
    let plain = ModuleState::new(policy(), true, false);
    let (_, actions) = run(&plain, &[Event::Adopt(found)]);
    assert!(actions.contains(&Action::StopVm), "{actions:?}");
    // A stale writer is stopped even in maintenance.
    let stale = Found {
        generation_current: false,
        settings_match: true,
        ..found
    };
    let (_, actions) = run(&s, &[Event::Adopt(stale)]);
    assert!(actions.contains(&Action::StopVm), "{actions:?}");
}

// ---- live swap ----

fn quiet(actions: &[Action]) -> Vec<&Action> {
    actions
        .iter()
        .filter(|a| !matches!(a, Action::Log(_) | Action::SetPeerMayBeNewer(_)))
        .collect()
}

/// The live swap's actions in order on both sides: prepare, standby,
/// migrate, hand over (drained), activate, resume; no stop, no new
/// generation.
#[test]
fn live_swap_moves_the_running_vm_in_order() {
    let (p, actions, line) = log_of(&prim(), Event::SwapLive);
    assert!(quiet(&actions).is_empty(), "{actions:?}");
    assert!(line.contains("live swap"), "{line}");
    assert_eq!(p.announce().request, Some(Request::PrepareLive));
    // The SECOND sees the request: standby.
    let asking = Peer {
        request: Some(Request::PrepareLive),
        ..peer(Role::Prim, Readiness::Ready, Relation::InSync)
    };
    let (s, actions) = run_exact(&second(), &[seen(asking)]);
    assert_eq!(actions, [Action::MountStandby]);
    let (s, _) = run_exact(&s, &[Event::StandbyMounted]);
    assert_eq!(s.announce().swap_phase, Some(SwapPhase::Standby));
    // The PRIM sees the standby: migrate; done: hand over.
    let standby = Peer {
        swap_phase: Some(SwapPhase::Standby),
        ..peer(Role::Second, Readiness::Ready, Relation::InSync)
    };
    let (p, actions) = run_exact(&p, &[seen(standby)]);
    assert_eq!(actions, [Action::MigrateVm]);
    let (p, actions) = run_exact(&p, &[Event::MigrateDone]);
    // Drained, then the flip persisted before the receiver accepting it.
    assert_eq!(
        actions,
        [
            Action::Unmount,
            Action::FlipGeneration,
            Action::MountReceiver
        ]
    );
    assert_eq!(
        (p.role, p.announce().request),
        (Role::Second, Some(Request::TakeOverLive))
    );
    // The SECOND takes over: activate, then resume.
    let handed = Peer {
        request: Some(Request::TakeOverLive),
        ..peer(Role::Second, Readiness::Ready, Relation::InSync)
    };
    let (s, actions) = run_exact(&s, &[seen(handed)]);
    // The flip adopted before the claim, then activate, then resume.
    assert_eq!(
        actions,
        [
            Action::AdoptFlip,
            Action::ActivateStandby { connected: true },
            Action::ResumeVm
        ]
    );
    assert_eq!(s.role, Role::Prim);
    let (s, _) = run_exact(&s, &[Event::VmStarted]);
    assert_eq!((s.live, s.readiness()), (None, Readiness::Ready));
}

/// The old PRIM hands over live to a SECOND whose standby is gone: the flip
/// is still adopted before the connected claim (the old PRIM's receiver
/// accepts only it), and the VM restarts here.
#[test]
fn live_hand_over_without_standby_adopts_the_flip_before_the_connected_start() {
    let handed = Peer {
        request: Some(Request::TakeOverLive),
        ..peer(Role::Second, Readiness::Ready, Relation::InSync)
    };
    let (s, actions) = run_exact(&second(), &[seen(handed)]);
    let adopt = index(&actions, &Action::AdoptFlip);
    let claim = index(&actions, &Action::MountWriterConnected);
    assert!(adopt.is_some() && adopt < claim, "{actions:?}");
    assert!(!actions.contains(&Action::NewGeneration), "{actions:?}");
    assert!(actions.contains(&Action::StartVm), "{actions:?}");
    assert_eq!(s.role, Role::Prim);
    // Its claim refused all the same (an old PRIM that flipped differently,
    // say): the connected start's fallback, a new generation on top.
    let (s, actions) = run_exact(&s, &[Event::ConnectedMountFailed]);
    assert_eq!(
        actions[..2],
        [Action::NewGeneration, Action::MarkPeerOutdated],
        "{actions:?}"
    );
    assert!(s.pending_alone_mount);
}

/// The migration runs in the background: the link going down, the peer
/// lost or the SECOND leaving its standby meanwhile aborts it first and is
/// then handled as always; its late outcome changes nothing (never a
/// hand-over), and a VM stop seen meanwhile is the migration's.
#[test]
fn a_running_migration_is_aborted_at_once() {
    let migrating = || {
        let (p, _) = run_exact(&prim(), &[Event::SwapLive]);
        let standby = Peer {
            swap_phase: Some(SwapPhase::Standby),
            ..peer(Role::Second, Readiness::Ready, Relation::InSync)
        };
        let (p, actions) = run_exact(&p, &[seen(standby)]);
        assert_eq!(actions, [Action::MigrateVm]);
        p
    };
    // The link down with the SECOND in view: aborted, then the usual marking.
    let down = Event::LinkDown {
        heartbeats_fresh: true,
        peer_is_second: true,
        peer_knows_outdated: false,
    };
    let (p, actions) = run_exact(&migrating(), &[down]);
    assert_eq!(
        actions.first(),
        Some(&Action::AbortMigration),
        "{actions:?}"
    );
    assert!(actions.contains(&Action::MarkPeerOutdated), "{actions:?}");
    assert_eq!((p.role, p.live, p.request), (Role::Prim, None, None));
    assert!(
        p.live_outcome
            .1
            .as_deref()
            .is_some_and(|w| w.contains("link")),
        "{:?}",
        p.live_outcome
    );
    // Its late outcome, whatever it is, changes nothing.
    for late in [
        Event::MigrateDone,
        Event::MigrateFailed {
            reason: "cut".into(),
        },
    ] {
        let (q, actions) = run_exact(&p, &[late]);
        assert!(actions.is_empty(), "{actions:?}");
        assert_eq!((q.role, q.request, q.live), (Role::Prim, None, None));
    }
    // The peer lost: aborted, then ALONE.
    let (p, actions) = run_exact(&migrating(), &[Event::PeerLost]);
    assert_eq!(
        actions.first(),
        Some(&Action::AbortMigration),
        "{actions:?}"
    );
    assert_eq!((p.role, p.live), (Role::Alone, None));
    // The SECOND's vmhad restarted (no standby any more): aborted.
    let (p, actions) = run_exact(
        &migrating(),
        &[seen(peer(Role::Second, Readiness::Ready, Relation::InSync))],
    );
    assert_eq!(actions, [Action::AbortMigration]);
    assert_eq!((p.role, p.live), (Role::Prim, None));
    // The VM stopped here meanwhile: the migration's outcome tells.
    let (p, actions) = run_exact(&migrating(), &[Event::VmStopped { now_ms: 5 }]);
    assert!(actions.is_empty(), "{actions:?}");
    assert_eq!(p.live, Some(SwapPhase::Migrating));
    // An operator's stop: aborted before the VM is stopped.
    let (_, actions) = run_exact(&migrating(), &[Event::Stop]);
    assert_eq!(
        actions.first(),
        Some(&Action::AbortMigration),
        "{actions:?}"
    );
    assert!(actions.contains(&Action::StopVm), "{actions:?}");
}

/// `swap --live` is refused (and says so) where it cannot run, and never
/// falls back; a peer whose vmhad predates live swaps is never asked.
#[test]
fn live_swap_is_refused_without_falling_back() {
    let old_peer = Peer {
        live_swap: false,
        ..peer(Role::Second, Readiness::Ready, Relation::InSync)
    };
    let (p, _) = run_exact(&prim(), &[seen(old_peer)]);
    let (p, actions, line) = log_of(&p, Event::SwapLive);
    assert!(quiet(&actions).is_empty() && line.contains("refused") && line.contains("upgrade"));
    assert_eq!((p.role, p.request), (Role::Prim, None));
    let (_, actions, line) = log_of(&second(), Event::SwapLive);
    assert!(
        quiet(&actions).is_empty() && line.contains("refused"),
        "{line}"
    );
    // A failed migration keeps the VM; the answer says it was aborted.
    let (p, _) = run_exact(&prim(), &[Event::SwapLive]);
    let standby = Peer {
        swap_phase: Some(SwapPhase::Standby),
        ..peer(Role::Second, Readiness::Ready, Relation::InSync)
    };
    let (p, _) = run_exact(&p, &[seen(standby)]);
    let (p, actions, line) = log_of(
        &p,
        Event::MigrateFailed {
            reason: "disk not cache=none".into(),
        },
    );
    assert!(quiet(&actions).is_empty(), "{actions:?}");
    assert!(
        line.contains("aborted") && line.contains("cache=none"),
        "{line}"
    );
    assert_eq!((p.role, p.live, p.request), (Role::Prim, None, None));
    assert_eq!(p.live_outcome.0, 1);
    // The SECOND drops its standby once the PRIM no longer asks.
    let (s, _) = run_exact(
        &second(),
        &[
            seen(Peer {
                request: Some(Request::PrepareLive),
                ..peer(Role::Prim, Readiness::Ready, Relation::InSync)
            }),
            Event::StandbyMounted,
        ],
    );
    let (s, actions) = run_exact(
        &s,
        &[seen(peer(Role::Prim, Readiness::Ready, Relation::InSync))],
    );
    assert_eq!(actions, [Action::DropStandby]);
    assert_eq!((s.role, s.live), (Role::Second, None));
}
