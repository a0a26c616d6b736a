//! Fake drivers for tests: they record every call, keep a plausible state, and
//! fail on demand.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use super::{DriverError, FoundFs, FsDriver, FsHealth, Paused, ResyncState, VmDriver, VmState};
use crate::config::Module;

/// One recorded call: (call name, module name).
pub type Call = (&'static str, String);

#[derive(Debug, Default)]
struct VmInner {
    calls: Vec<Call>,
    states: HashMap<String, VmState>,
    failing: HashSet<&'static str>,
    start_delay: Duration,
    /// Why each paused domain is paused.
    paused: HashMap<String, Paused>,
    /// Where `migrate_live` moves a domain (the other node's fake).
    peer: Option<Weak<Mutex<VmInner>>>,
    /// The destination socket of each `migrate_live` call.
    migrated_to: Vec<std::path::PathBuf>,
    /// Calls that block (after being recorded) until released.
    holds: Holds,
}

/// A fake libvirt. Cloning shares the state (keep a clone to inspect it).
#[derive(Debug, Clone, Default)]
pub struct FakeVm(Arc<Mutex<VmInner>>);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Calls that block once recorded until released (a point where a test
/// kills a daemon mid-step), for both fakes.
#[derive(Debug, Default)]
struct Holds {
    held: HashSet<&'static str>,
    /// Held calls released with a failure, changing nothing.
    abandoned: HashSet<&'static str>,
}

impl Holds {
    fn hold(&mut self, call: &'static str) {
        self.held.insert(call);
    }

    fn release(&mut self, call: &'static str, fail: bool) {
        self.held.remove(call);
        if fail {
            self.abandoned.insert(call);
        }
    }
}

/// Blocks while `call` is held (the state unlocked meanwhile); an error if it
/// was released with a failure.
fn wait_held<'a, T>(
    m: &'a Mutex<T>,
    mut inner: MutexGuard<'a, T>,
    call: &'static str,
    holds: fn(&mut T) -> &mut Holds,
) -> Result<MutexGuard<'a, T>, DriverError> {
    if !holds(&mut inner).held.contains(call) {
        return Ok(inner);
    }
    while holds(&mut inner).held.contains(call) {
        drop(inner);
        std::thread::sleep(Duration::from_millis(10));
        inner = lock(m);
    }
    if holds(&mut inner).abandoned.remove(call) {
        return Err(DriverError::failed(call, "held, then abandoned"));
    }
    Ok(inner)
}

impl FakeVm {
    pub fn new() -> FakeVm {
        FakeVm::default()
    }

    pub fn calls(&self) -> Vec<Call> {
        lock(&self.0).calls.clone()
    }

    /// Calls of one kind ("define", "start", "stop", "state").
    pub fn count(&self, call: &str) -> usize {
        lock(&self.0)
            .calls
            .iter()
            .filter(|(c, _)| *c == call)
            .count()
    }

    pub fn vm_state(&self, module: &str) -> VmState {
        lock(&self.0)
            .states
            .get(module)
            .copied()
            .unwrap_or(VmState::Missing)
    }

    pub fn is_running(&self, module: &str) -> bool {
        self.vm_state(module) == VmState::Running
    }

    /// Makes every later call named `call` fail (`None`: heal).
    pub fn set_failing(&self, call: &'static str, failing: bool) {
        let mut inner = lock(&self.0);
        if failing {
            inner.failing.insert(call);
        } else {
            inner.failing.remove(call);
        }
    }

    /// The domain dies behind the controller's back (`virsh destroy`).
    pub fn kill(&self, module: &str) {
        lock(&self.0)
            .states
            .insert(module.to_string(), VmState::ShutOff);
    }

    /// `migrate_live` moves the domain to `peer` (the other node's fake
    /// libvirt): it shuts off here and arrives paused ([`Paused::User`])
    /// there. Without a peer the domain merely shuts off here.
    pub fn set_migration_peer(&self, peer: &FakeVm) {
        lock(&self.0).peer = Some(Arc::downgrade(&peer.0));
    }

    /// The `dest` socket of every `migrate_live` call, in order.
    pub fn migrated_to(&self) -> Vec<std::path::PathBuf> {
        lock(&self.0).migrated_to.clone()
    }

    /// The domain is paused here for `reason` (e.g. an incoming migration
    /// in progress).
    pub fn pause(&self, module: &str, reason: Paused) {
        let mut inner = lock(&self.0);
        inner.states.insert(module.to_string(), VmState::Paused);
        inner.paused.insert(module.to_string(), reason);
    }

    /// `start` takes this long.
    pub fn set_start_delay(&self, delay: Duration) {
        lock(&self.0).start_delay = delay;
    }

    /// Every later call named `call` blocks once recorded, until
    /// [`FakeVm::release`] (a point where a daemon is killed mid-step).
    pub fn hold(&self, call: &'static str) {
        lock(&self.0).holds.hold(call);
    }

    /// Ends [`FakeVm::hold`]: the blocked calls go on, or, with `fail`,
    /// return an error having changed nothing.
    pub fn release(&self, call: &'static str, fail: bool) {
        lock(&self.0).holds.release(call, fail);
    }

    fn call(&self, call: &'static str, module: &Module) -> Result<(), DriverError> {
        let mut inner = lock(&self.0);
        inner.calls.push((call, module.name.clone()));
        let inner = wait_held(&self.0, inner, call, |i| &mut i.holds)?;
        if inner.failing.contains(call) {
            return Err(DriverError::failed(call, "scripted failure"));
        }
        Ok(())
    }
}

impl VmDriver for FakeVm {
    fn define(&self, module: &Module) -> Result<(), DriverError> {
        self.call("define", module)?;
        let mut inner = lock(&self.0);
        let state = inner
            .states
            .entry(module.name.clone())
            .or_insert(VmState::ShutOff);
        if *state == VmState::Missing {
            *state = VmState::ShutOff;
        }
        Ok(())
    }

    fn start(&self, module: &Module) -> Result<(), DriverError> {
        self.call("start", module)?;
        let delay = lock(&self.0).start_delay;
        std::thread::sleep(delay);
        let mut inner = lock(&self.0);
        match inner.states.get(&module.name) {
            None | Some(VmState::Missing) => {
                Err(DriverError::failed("start", "domain not defined"))
            }
            _ => {
                // A paused domain is resumed, as by libvirt's driver.
                inner.states.insert(module.name.clone(), VmState::Running);
                inner.paused.remove(&module.name);
                Ok(())
            }
        }
    }

    fn stop(&self, module: &Module) -> Result<(), DriverError> {
        self.call("stop", module)?;
        let mut inner = lock(&self.0);
        inner.paused.remove(&module.name);
        if let Some(state) = inner.states.get_mut(&module.name) {
            if *state != VmState::Missing {
                *state = VmState::ShutOff;
            }
        }
        Ok(())
    }

    fn state(&self, module: &Module) -> Result<VmState, DriverError> {
        // Not recorded: the checker polls it constantly.
        let inner = lock(&self.0);
        if inner.failing.contains("state") {
            return Err(DriverError::failed("state", "scripted failure"));
        }
        Ok(inner
            .states
            .get(&module.name)
            .copied()
            .unwrap_or(VmState::Missing))
    }

    fn migrate_live(&self, module: &Module, dest: &std::path::Path) -> Result<(), DriverError> {
        self.call("migrate_live", module)?;
        let peer = {
            let mut inner = lock(&self.0);
            inner.migrated_to.push(dest.to_path_buf());
            if inner.states.get(&module.name) != Some(&VmState::Running) {
                return Err(DriverError::failed(
                    "live migration",
                    "the domain is not running here",
                ));
            }
            inner.peer.clone()
        };
        if let Some(peer) = peer.and_then(|p| p.upgrade()) {
            let mut there = lock(&peer);
            there.states.insert(module.name.clone(), VmState::Paused);
            there.paused.insert(module.name.clone(), Paused::User);
        }
        let mut inner = lock(&self.0);
        inner.states.insert(module.name.clone(), VmState::ShutOff);
        inner.paused.remove(&module.name);
        Ok(())
    }

    fn abort_migration(&self, module: &Module) -> Result<(), DriverError> {
        self.call("abort_migration", module)
    }

    fn resume(&self, module: &Module) -> Result<(), DriverError> {
        self.call("resume", module)?;
        let mut inner = lock(&self.0);
        match inner.states.get(&module.name) {
            Some(VmState::Paused) | Some(VmState::Running) => {
                inner.states.insert(module.name.clone(), VmState::Running);
                inner.paused.remove(&module.name);
                Ok(())
            }
            _ => Err(DriverError::failed("resume", "the domain is not active")),
        }
    }

    fn paused(&self, module: &Module) -> Result<Option<Paused>, DriverError> {
        let inner = lock(&self.0);
        if inner.states.get(&module.name) != Some(&VmState::Paused) {
            return Ok(None);
        }
        Ok(Some(
            inner
                .paused
                .get(&module.name)
                .copied()
                .unwrap_or(Paused::User),
        ))
    }
}

/// What a fake vmha-fs has mounted for a module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mounted {
    Writer,
    Receiver,
}

#[derive(Debug, Default)]
struct FsInner {
    calls: Vec<Call>,
    mounted: HashMap<String, Mounted>,
    failing: HashSet<&'static str>,
    health: HashMap<String, FsHealth>,
    resync: HashMap<String, ResyncState>,
    /// Resyncs stay `Running` until `finish_resync`.
    manual_resync: bool,
    /// The generation each mount claims (writer) or accepts (receiver).
    generations: HashMap<String, Option<String>>,
    /// Modules with a standby mount (live swap).
    standby: HashSet<String>,
    /// `mount_standby` works (else it is unsupported, as by default).
    live_swap: bool,
    /// `find_running` reports what is mounted: a daemon started again on
    /// this fake adopts it (else it finds nothing, as by default).
    adoptable: bool,
    /// Calls that block (after being recorded) until released.
    holds: Holds,
}

/// A fake vmha-fs. Cloning shares the state.
#[derive(Debug, Clone, Default)]
pub struct FakeFs(Arc<Mutex<FsInner>>);

impl FakeFs {
    pub fn new() -> FakeFs {
        FakeFs::default()
    }

    pub fn calls(&self) -> Vec<Call> {
        lock(&self.0).calls.clone()
    }

    pub fn count(&self, call: &str) -> usize {
        lock(&self.0)
            .calls
            .iter()
            .filter(|(c, _)| *c == call)
            .count()
    }

    pub fn mounted(&self, module: &str) -> Option<Mounted> {
        lock(&self.0).mounted.get(module).copied()
    }

    pub fn set_failing(&self, call: &'static str, failing: bool) {
        let mut inner = lock(&self.0);
        if failing {
            inner.failing.insert(call);
        } else {
            inner.failing.remove(call);
        }
    }

    /// Overrides the health reported for a module (`None`: derived from mounts).
    pub fn set_health(&self, module: &str, health: Option<FsHealth>) {
        let mut inner = lock(&self.0);
        match health {
            Some(h) => inner.health.insert(module.to_string(), h),
            None => inner.health.remove(module),
        };
    }

    /// Resyncs report progress until [`FakeFs::finish_resync`] (default: done at once).
    pub fn set_manual_resync(&self, manual: bool) {
        lock(&self.0).manual_resync = manual;
    }

    pub fn finish_resync(&self, module: &str) {
        lock(&self.0)
            .resync
            .insert(module.to_string(), ResyncState::Done);
    }

    pub fn set_resync(&self, module: &str, state: ResyncState) {
        lock(&self.0).resync.insert(module.to_string(), state);
    }

    /// Standby mounts work (live swap): `mount_standby` beside a receiver,
    /// `activate_standby` turns it into the writer.
    pub fn set_live_swap(&self, on: bool) {
        lock(&self.0).live_swap = on;
    }

    /// A daemon started on this fake finds what is mounted running
    /// (`find_running`), as the real driver finds a previous vmhad's vmha-fs.
    pub fn set_adoptable(&self, on: bool) {
        lock(&self.0).adoptable = on;
    }

    /// Every later call named `call` blocks once recorded, until
    /// [`FakeFs::release`] (a point where a daemon is killed mid-step).
    pub fn hold(&self, call: &'static str) {
        lock(&self.0).holds.hold(call);
    }

    /// Ends [`FakeFs::hold`]: the blocked calls go on, or, with `fail`,
    /// return an error having changed nothing.
    pub fn release(&self, call: &'static str, fail: bool) {
        lock(&self.0).holds.release(call, fail);
    }

    /// The generation the module's mount claims (writer) or accepts
    /// (receiver), as the daemon passed it.
    pub fn generation(&self, module: &str) -> Option<String> {
        lock(&self.0).generations.get(module).cloned().flatten()
    }

    /// A standby mount runs for the module.
    pub fn has_standby(&self, module: &str) -> bool {
        lock(&self.0).standby.contains(module)
    }

    fn call(
        &self,
        call: &'static str,
        module: &Module,
    ) -> Result<MutexGuard<'_, FsInner>, DriverError> {
        let mut inner = lock(&self.0);
        inner.calls.push((call, module.name.clone()));
        let inner = wait_held(&self.0, inner, call, |i| &mut i.holds)?;
        if inner.failing.contains(call) {
            return Err(DriverError::failed(call, "scripted failure"));
        }
        Ok(inner)
    }
}

impl FsDriver for FakeFs {
    fn mount_writer(&self, module: &Module) -> Result<(), DriverError> {
        let mut inner = self.call("mount_writer", module)?;
        inner.mounted.insert(module.name.clone(), Mounted::Writer);
        Ok(())
    }

    fn mount_writer_connected(
        &self,
        module: &Module,
        generation: Option<&str>,
    ) -> Result<(), DriverError> {
        let mut inner = self.call("mount_writer_connected", module)?;
        inner.mounted.insert(module.name.clone(), Mounted::Writer);
        inner
            .generations
            .insert(module.name.clone(), generation.map(str::to_string));
        Ok(())
    }

    fn mount_writer_at(
        &self,
        module: &Module,
        generation: Option<&str>,
    ) -> Result<(), DriverError> {
        self.mount_writer(module)?;
        lock(&self.0)
            .generations
            .insert(module.name.clone(), generation.map(str::to_string));
        Ok(())
    }

    fn mount_receiver_accepting(
        &self,
        module: &Module,
        generation: Option<&str>,
    ) -> Result<(), DriverError> {
        self.mount_receiver(module)?;
        lock(&self.0)
            .generations
            .insert(module.name.clone(), generation.map(str::to_string));
        Ok(())
    }

    fn start_resync_from(
        &self,
        module: &Module,
        full: bool,
        generation: Option<&str>,
    ) -> Result<(), DriverError> {
        self.start_resync(module, full)?;
        if generation.is_some() {
            lock(&self.0)
                .generations
                .insert(module.name.clone(), generation.map(str::to_string));
        }
        Ok(())
    }

    fn find_running(&self, module: &Module) -> Result<Option<FoundFs>, DriverError> {
        let mut inner = lock(&self.0);
        if !inner.adoptable {
            return Ok(None);
        }
        // A resync the previous daemon followed is not reported again: as
        // from the real driver, whose receiver's resync state stays idle
        // (the writer pushes the copy).
        inner.resync.remove(&module.name);
        Ok(inner.mounted.get(&module.name).map(|m| FoundFs {
            writer: *m == Mounted::Writer,
            settings_match: true,
            generation: inner.generations.get(&module.name).cloned().flatten(),
            alone: false,
        }))
    }

    fn mount_standby(&self, module: &Module) -> Result<(), DriverError> {
        if !lock(&self.0).live_swap {
            return Err(DriverError::Unsupported("standby mount".into()));
        }
        let mut inner = self.call("mount_standby", module)?;
        if inner.mounted.get(&module.name) != Some(&Mounted::Receiver) {
            return Err(DriverError::failed(
                "standby mount",
                "no receiver runs for this module",
            ));
        }
        inner.standby.insert(module.name.clone());
        Ok(())
    }

    fn activate_standby(
        &self,
        module: &Module,
        generation: Option<&str>,
        _connected: bool,
    ) -> Result<(), DriverError> {
        let mut inner = self.call("activate_standby", module)?;
        if !inner.standby.remove(&module.name) {
            return Err(DriverError::failed(
                "standby activation",
                "no standby mount runs",
            ));
        }
        inner.mounted.insert(module.name.clone(), Mounted::Writer);
        inner
            .generations
            .insert(module.name.clone(), generation.map(str::to_string));
        Ok(())
    }

    fn drop_standby(&self, module: &Module) -> Result<(), DriverError> {
        let mut inner = self.call("drop_standby", module)?;
        inner.standby.remove(&module.name);
        Ok(())
    }

    fn drop_orphan_standby(&self, module: &Module) -> Result<usize, DriverError> {
        let mut inner = lock(&self.0);
        Ok(usize::from(inner.standby.remove(&module.name)))
    }

    fn mount_receiver(&self, module: &Module) -> Result<(), DriverError> {
        let mut inner = self.call("mount_receiver", module)?;
        inner.mounted.insert(module.name.clone(), Mounted::Receiver);
        Ok(())
    }

    fn unmount(&self, module: &Module) -> Result<(), DriverError> {
        let mut inner = self.call("unmount", module)?;
        inner.mounted.remove(&module.name);
        inner.resync.remove(&module.name);
        inner.generations.remove(&module.name);
        inner.standby.remove(&module.name);
        Ok(())
    }

    fn health(&self, module: &Module) -> FsHealth {
        let inner = lock(&self.0);
        if let Some(h) = inner.health.get(&module.name) {
            return h.clone();
        }
        if inner.mounted.contains_key(&module.name) {
            FsHealth::Healthy
        } else {
            FsHealth::Idle
        }
    }

    fn start_resync(&self, module: &Module, full: bool) -> Result<(), DriverError> {
        let name = if full { "resync_full" } else { "resync" };
        let mut inner = self.call(name, module)?;
        let state = if inner.manual_resync {
            ResyncState::Running(crate::state::Progress {
                done_bytes: 0,
                total_bytes: 1 << 20,
            })
        } else {
            ResyncState::Done
        };
        inner.resync.insert(module.name.clone(), state);
        Ok(())
    }

    fn request_compare(&self, module: &Module, _reason: &str) -> Result<(), DriverError> {
        let inner = self.call("request_compare", module)?;
        match inner.mounted.get(&module.name) {
            Some(Mounted::Writer) => Ok(()),
            _ => Err(DriverError::failed(
                "resync --compare",
                "no writer is running",
            )),
        }
    }

    fn invalidate(&self, module: &Module, _reason: &str) -> Result<(), DriverError> {
        let mut inner = self.call("invalidate", module)?;
        match inner.mounted.get(&module.name) {
            Some(Mounted::Receiver) => {
                // The copy is discarded: no earlier resync counts any more.
                inner.resync.remove(&module.name);
                Ok(())
            }
            _ => Err(DriverError::failed("invalidate", "no receiver is running")),
        }
    }

    fn resync_state(&self, module: &Module) -> Result<ResyncState, DriverError> {
        Ok(lock(&self.0)
            .resync
            .get(&module.name)
            .copied()
            .unwrap_or(ResyncState::Idle))
    }
}

/// A two-node cluster config with `names` as modules (each replicating
/// `/tmp/<name>`), for the crate's unit tests on the fakes.
#[cfg(test)]
pub(crate) fn config_with_modules(names: &[&str]) -> crate::config::Config {
    let mut text = String::from(
        "[cluster]\nname = \"t\"\n[[node]]\nname = \"a\"\naddresses = [\"127.0.0.1\"]\n\
         [[node]]\nname = \"b\"\naddresses = [\"127.0.0.2\"]\n",
    );
    for (i, name) in names.iter().enumerate() {
        text.push_str(&format!(
            "[[module]]\nname = \"{name}\"\nreplicated = [\"/tmp/{name}\"]\nport = {}\n",
            7101 + i
        ));
    }
    match crate::config::Config::from_toml_str(&text) {
        Ok(config) => config,
        Err(e) => panic!("test config: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module() -> Module {
        config_with_modules(&["vm1"]).modules[0].clone()
    }

    #[test]
    fn fake_vm_records_and_fails() {
        let vm = FakeVm::new();
        let m = module();
        assert!(vm.start(&m).is_err(), "not defined yet");
        vm.define(&m).unwrap();
        vm.start(&m).unwrap();
        assert!(vm.is_running("vm1"));
        vm.kill("vm1");
        assert_eq!(vm.state(&m).unwrap(), VmState::ShutOff);
        vm.set_failing("start", true);
        assert!(vm.start(&m).is_err());
        assert_eq!(vm.count("start"), 3);
    }

    #[test]
    fn fake_vm_migrates_to_its_peer_paused() {
        let (a, b) = (FakeVm::new(), FakeVm::new());
        a.set_migration_peer(&b);
        let m = module();
        let dest = std::path::Path::new("/run/vmha/x/libvirt.sock");
        assert!(a.migrate_live(&m, dest).is_err(), "not running");
        a.define(&m).unwrap();
        b.define(&m).unwrap();
        a.start(&m).unwrap();
        a.migrate_live(&m, dest).unwrap();
        assert_eq!(a.vm_state("vm1"), VmState::ShutOff);
        assert_eq!(b.paused(&m).unwrap(), Some(Paused::User));
        b.resume(&m).unwrap();
        assert!(b.is_running("vm1"));
        assert_eq!(b.paused(&m).unwrap(), None);
        assert_eq!(a.migrated_to(), vec![dest.to_path_buf(); 2]);
        b.pause("vm1", Paused::IncomingMigration);
        assert_eq!(b.paused(&m).unwrap(), Some(Paused::IncomingMigration));
        b.stop(&m).unwrap();
        assert_eq!(b.paused(&m).unwrap(), None);
    }

    #[test]
    fn fake_fs_mounts_and_resyncs() {
        let fs = FakeFs::new();
        let m = module();
        assert_eq!(fs.health(&m), FsHealth::Idle);
        fs.mount_receiver(&m).unwrap();
        assert_eq!(fs.mounted("vm1"), Some(Mounted::Receiver));
        fs.set_manual_resync(true);
        fs.start_resync(&m, true).unwrap();
        assert!(matches!(
            fs.resync_state(&m).unwrap(),
            ResyncState::Running(_)
        ));
        fs.finish_resync("vm1");
        assert_eq!(fs.resync_state(&m).unwrap(), ResyncState::Done);
        fs.set_failing("mount_writer", true);
        assert!(fs.mount_writer(&m).is_err());
        fs.unmount(&m).unwrap();
        assert_eq!(fs.mounted("vm1"), None);
    }
}
