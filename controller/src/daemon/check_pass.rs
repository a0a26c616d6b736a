//! One pass of the checkers for every module of the node.
//!
//! Why: the checkers poll the drivers every [`super::runner::check_period`]
//! (500 ms). Run by each module's task on its own timer, through tokio's
//! blocking pool, a check woke three threads per module (the task's timer,
//! a blocking-pool thread, the task again with the result): with 32 idle
//! modules on each node about 400 wake-ups a second for the pair, most of
//! vmhad's idle CPU (issue 12's budget: 5 % of a core for 32 modules). Here
//! one timer per node runs one blocking pass over every module and wakes a
//! module's task only when what it found needs handling: the VM is down,
//! vmha-fs is not healthy, the changed-bytes counter moved, the domain XML
//! was rewritten or its refresh failed or works again, the receiver was
//! restarted for a new writer generation, or the module has work at every
//! check (a resync or an attach being followed, the peer's controller down).
//! An idle healthy node costs two wake-ups per period, whatever the number
//! of modules.
//!
//! A module's task publishes what its checks are to look at (its
//! [`CheckPlan`]) before it waits, with an epoch that every handled event
//! advances: findings gathered under an older epoch (the task handled
//! something meanwhile) are not acted on as they are; the task checks again
//! itself ([`super::runner::Runner::on_pass`]). The pass and the task never
//! call the drivers for the same module at once ([`Slot::task_busy`]): a
//! check never overlapped an action before either. A driver call that hangs
//! holds only its own module: the module is marked in flight and the next
//! passes skip it.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::{watch, Notify};

use crate::config::Module;
use crate::driver::{DriverError, FsDriver, FsHealth, ResyncState, VmDriver, VmState};

/// What a module's checks look at, as its task last published it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(super) struct CheckPlan {
    /// The VM's state and the domain XML refresh (a writer whose VM is not
    /// being started or migrated).
    pub(super) check_vm: bool,
    /// vmha-fs's health (a writer or a SECOND).
    pub(super) check_fs: bool,
    /// The receiver's resync state (a SECOND not up to date).
    pub(super) check_resync: bool,
    /// The task has work at every check (the peer's controller is down, an
    /// attach is being followed, a resync runs): every finding is delivered.
    pub(super) every: bool,
    /// SECOND: the writer generation its receiver is to accept.
    pub(super) follow: Option<String>,
    /// The last domain XML refresh failed (a success is news).
    pub(super) xml_failed: bool,
    /// The changed-bytes counter as the task last saw it.
    pub(super) changed: u64,
}

/// What one look of the checkers found: the driver calls of a check.
#[derive(Debug)]
pub(super) struct Findings {
    pub(super) vm: Option<Result<VmState, DriverError>>,
    pub(super) fs: Option<FsHealth>,
    pub(super) resync: Option<Result<ResyncState, DriverError>>,
    pub(super) changed: u64,
    pub(super) xml: Option<Result<bool, DriverError>>,
    /// SECOND with a healthy vmha-fs: the receiver already told to follow
    /// [`CheckPlan::follow`] (`Ok(true)`: it was restarted for it).
    pub(super) followed: Option<Result<bool, DriverError>>,
}

/// The driver calls of a check under `plan`. `follow`: also have the
/// receiver follow the writer's generation when vmha-fs is healthy (the
/// pass does; a task checking itself follows after handling the health).
pub(super) fn gather(
    plan: &CheckPlan,
    vm: &dyn VmDriver,
    fs: &dyn FsDriver,
    module: &Module,
    follow: bool,
) -> Findings {
    let health = plan.check_fs.then(|| fs.health(module));
    let followed = match (&plan.follow, &health) {
        (Some(generation), Some(FsHealth::Healthy)) if follow => {
            Some(fs.follow_writer(module, Some(generation)))
        }
        _ => None,
    };
    Findings {
        vm: plan.check_vm.then(|| vm.watch_state(module)),
        fs: health,
        resync: plan.check_resync.then(|| fs.resync_state(module)),
        changed: fs.changed_bytes(module),
        // The writer keeps `<dir>/<domain>.xml` current.
        xml: plan.check_vm.then(|| vm.refresh_xml(module)),
        followed,
    }
}

/// Whether the module's task must see `found`: anything but a healthy,
/// unchanged module.
pub(super) fn needs_task(plan: &CheckPlan, found: &Findings) -> bool {
    let vm_down = matches!(&found.vm, Some(Ok(state)) if state.is_down());
    let fs_news = !matches!(&found.fs, None | Some(FsHealth::Healthy));
    let xml_news = match &found.xml {
        Some(Ok(rewritten)) => *rewritten || plan.xml_failed,
        Some(Err(_)) => !plan.xml_failed,
        None => false,
    };
    let followed_news = matches!(&found.followed, Some(Ok(true) | Err(_)));
    plan.every
        || vm_down
        || fs_news
        || xml_news
        || followed_news
        || found.resync.is_some()
        || found.changed != plan.changed
}

/// A module's place in the pass: the task publishes its plan here and
/// takes the findings the pass leaves for it.
#[derive(Debug)]
pub(super) struct Slot {
    inner: Mutex<SlotInner>,
    /// Wakes the module's task when findings wait in the slot.
    pub(super) delivered: Notify,
}

#[derive(Debug)]
struct SlotInner {
    module: Module,
    /// The plan and the epoch it was published in; `None`: not checked
    /// (the task has not published yet).
    plan: Option<(u64, CheckPlan)>,
    /// A pass is running this module's driver calls.
    in_flight: bool,
    /// The module's task is calling its drivers itself (handling an event,
    /// checking): the pass leaves the module alone meanwhile, as the task's
    /// own checks never overlapped its actions.
    task_busy: u32,
    /// Findings not yet taken, with the epoch of their plan.
    pending: Option<(u64, Findings)>,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, SlotInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The module's plan from now on (unchanged plans cost a compare).
    pub(super) fn publish(&self, epoch: u64, plan: &CheckPlan) {
        let mut inner = self.lock();
        let same = matches!(&inner.plan, Some((e, p)) if *e == epoch && p == plan);
        if !same {
            inner.plan = Some((epoch, plan.clone()));
        }
    }

    /// A reload changed the module's settings.
    pub(super) fn set_module(&self, module: &Module) {
        self.lock().module = module.clone();
    }

    /// The task is about to call its drivers: once a pass running this
    /// module's check finished, no pass touches the module until the guard
    /// drops. Nests (an event handled during a check).
    pub(super) async fn task_busy(self: &Arc<Self>) -> TaskBusy {
        self.lock().task_busy += 1;
        let guard = TaskBusy(Arc::clone(self));
        // A pass's driver calls for one module are short (cached state,
        // small files); a hung one holds the task as its own call would.
        while self.lock().in_flight {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        guard
    }

    /// The findings the pass left, with the epoch they were gathered in.
    pub(super) fn take(&self) -> Option<(u64, Findings)> {
        self.lock().pending.take()
    }

    /// Runs the module's check if its plan is published and no other pass
    /// is at it; leaves the findings when the task must see them.
    fn run(&self, vm: &dyn VmDriver, fs: &dyn FsDriver) {
        let (module, epoch, plan) = {
            let mut inner = self.lock();
            let Some((epoch, plan)) = inner.plan.clone() else {
                return;
            };
            if inner.in_flight || inner.task_busy > 0 {
                return;
            }
            inner.in_flight = true;
            (inner.module.clone(), epoch, plan)
        };
        let found =
            std::panic::catch_unwind(AssertUnwindSafe(|| gather(&plan, vm, fs, &module, true)));
        let deliver = {
            let mut inner = self.lock();
            inner.in_flight = false;
            match found {
                Ok(found) if needs_task(&plan, &found) => {
                    inner.pending = Some((epoch, found));
                    true
                }
                Ok(_) => false,
                Err(_) => {
                    tracing::error!(module = %module.name, "a driver call of the checkers panicked");
                    false
                }
            }
        };
        if deliver {
            self.delivered.notify_one();
        }
    }
}

/// While alive, the pass leaves the module alone ([`Slot::task_busy`]).
#[derive(Debug)]
pub(super) struct TaskBusy(Arc<Slot>);

impl Drop for TaskBusy {
    fn drop(&mut self) {
        let mut inner = self.0.lock();
        inner.task_busy = inner.task_busy.saturating_sub(1);
    }
}

/// The node's check pass: its modules' slots and its period.
#[derive(Debug, Clone)]
pub(super) struct CheckPass {
    slots: Arc<Mutex<Vec<Weak<Slot>>>>,
    period: Arc<watch::Sender<Duration>>,
}

impl CheckPass {
    pub(super) fn new(period: Duration) -> CheckPass {
        CheckPass {
            slots: Arc::new(Mutex::new(Vec::new())),
            period: Arc::new(watch::Sender::new(period)),
        }
    }

    /// A new module's slot; the pass forgets it when the task drops it.
    pub(super) fn register(&self, module: &Module) -> Arc<Slot> {
        let slot = Arc::new(Slot {
            inner: Mutex::new(SlotInner {
                module: module.clone(),
                plan: None,
                in_flight: false,
                task_busy: 0,
                pending: None,
            }),
            delivered: Notify::new(),
        });
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.retain(|s| s.strong_count() > 0);
        slots.push(Arc::downgrade(&slot));
        slot
    }

    /// A reload changed the heartbeat interval.
    pub(super) fn set_period(&self, period: Duration) {
        self.period.send_if_modified(|p| {
            let changed = *p != period;
            *p = period;
            changed
        });
    }

    fn live_slots(&self) -> Vec<Arc<Slot>> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.retain(|s| s.strong_count() > 0);
        slots.iter().filter_map(Weak::upgrade).collect()
    }

    /// One pass over every module, on the calling (blocking) thread.
    pub(super) fn pass(&self, vm: &dyn VmDriver, fs: &dyn FsDriver) {
        for slot in self.live_slots() {
            slot.run(vm, fs);
        }
    }

    /// Runs a pass every period until `shutdown`. A pass does not wait for
    /// the one before: a hung driver call holds only its own module.
    pub(super) async fn run(
        self,
        vm: Arc<dyn VmDriver>,
        fs: Arc<dyn FsDriver>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut period = self.period.subscribe();
        let mut ticks = timer(*period.borrow_and_update());
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                changed = period.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    ticks = timer(*period.borrow_and_update());
                }
                _ = ticks.tick() => {
                    let (pass, vm, fs) = (self.clone(), Arc::clone(&vm), Arc::clone(&fs));
                    // Not awaited: its findings reach the tasks through their slots.
                    drop(tokio::task::spawn_blocking(move || pass.pass(vm.as_ref(), fs.as_ref())));
                }
            }
        }
    }
}

fn timer(period: Duration) -> tokio::time::Interval {
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::fake::{config_with_modules, FakeFs, FakeVm};

    fn healthy() -> Findings {
        Findings {
            vm: Some(Ok(VmState::Running)),
            fs: Some(FsHealth::Healthy),
            resync: None,
            changed: 0,
            xml: Some(Ok(false)),
            followed: None,
        }
    }

    #[test]
    fn a_healthy_unchanged_module_is_not_woken() {
        let plan = CheckPlan {
            check_vm: true,
            check_fs: true,
            ..CheckPlan::default()
        };
        assert!(!needs_task(&plan, &healthy()));
        assert!(!needs_task(
            &plan,
            &Findings {
                followed: Some(Ok(false)),
                ..healthy()
            }
        ));
        // A VM state call that failed is not acted on by the checkers.
        assert!(!needs_task(
            &plan,
            &Findings {
                vm: Some(Err(DriverError::failed("state", "libvirt busy"))),
                ..healthy()
            }
        ));
    }

    #[test]
    fn what_needs_handling_wakes_the_task() {
        let plan = CheckPlan {
            check_vm: true,
            check_fs: true,
            ..CheckPlan::default()
        };
        let cases = [
            Findings {
                vm: Some(Ok(VmState::ShutOff)),
                ..healthy()
            },
            Findings {
                fs: Some(FsHealth::LinkDown),
                ..healthy()
            },
            Findings {
                fs: Some(FsHealth::Idle),
                ..healthy()
            },
            Findings {
                changed: 4096,
                ..healthy()
            },
            Findings {
                xml: Some(Ok(true)),
                ..healthy()
            },
            Findings {
                xml: Some(Err(DriverError::failed("dumpxml", "gone"))),
                ..healthy()
            },
            Findings {
                followed: Some(Ok(true)),
                ..healthy()
            },
            Findings {
                resync: Some(Ok(ResyncState::Idle)),
                ..healthy()
            },
        ];
        for found in &cases {
            assert!(needs_task(&plan, found), "{found:?}");
        }
        // A refresh that works again after a failure is news; a failure
        // already known is not.
        let failed = CheckPlan {
            xml_failed: true,
            ..plan.clone()
        };
        assert!(needs_task(&failed, &healthy()));
        assert!(!needs_task(
            &failed,
            &Findings {
                xml: Some(Err(DriverError::failed("dumpxml", "gone"))),
                ..healthy()
            }
        ));
        let every = CheckPlan {
            every: true,
            ..plan
        };
        assert!(needs_task(&every, &healthy()));
    }

    #[test]
    fn a_pass_leaves_findings_only_where_needed_and_skips_unpublished_modules() {
        let config = config_with_modules(&["vm1", "vm2"]);
        let (vm1, vm2) = (config.modules[0].clone(), config.modules[1].clone());
        let (vm, fs) = (FakeVm::new(), FakeFs::new());
        fs.set_health("vm1", Some(FsHealth::Healthy));
        fs.set_health("vm2", Some(FsHealth::LinkDown));
        let pass = CheckPass::new(Duration::from_millis(500));
        let quiet = pass.register(&vm1);
        let down = pass.register(&vm2);
        pass.pass(&vm, &fs);
        assert!(
            quiet.take().is_none() && down.take().is_none(),
            "unpublished plans are not checked"
        );
        let plan = CheckPlan {
            check_fs: true,
            ..CheckPlan::default()
        };
        quiet.publish(1, &plan);
        down.publish(7, &plan);
        pass.pass(&vm, &fs);
        assert!(quiet.take().is_none(), "a healthy idle module is not woken");
        let (epoch, found) = down
            .take()
            .expect("findings for the module whose link is down");
        assert_eq!(
            epoch, 7,
            "findings carry the epoch of the plan they were gathered under"
        );
        assert_eq!(found.fs, Some(FsHealth::LinkDown));
        assert!(down.take().is_none(), "taken once");
        // While the task calls its drivers itself, the pass leaves it alone.
        let busy = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
            .block_on(down.task_busy());
        pass.pass(&vm, &fs);
        assert!(down.take().is_none(), "a busy task's module is skipped");
        drop(busy);
        pass.pass(&vm, &fs);
        assert!(down.take().is_some(), "checked again once the task is done");
        // Dropped slots leave the pass.
        drop(down);
        assert_eq!(pass.live_slots().len(), 1);
    }
}
