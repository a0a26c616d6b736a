//! A real [`FsDriver`]: one `vmha-fs` child per replicated directory.
//!
//! Choices where the design is silent:
//! - Directory `i` of a module uses replication port `port + i` (most modules
//!   have one directory, which uses `port`).
//! - The writer always starts alone: `vmha-fs primary --alone --peer <peer's
//!   replication address> --generation <current generation> --mount DIR
//!   --backing DIR` (mounted over). [`FsDriver::attach_peer`] writes
//!   `<state>/generation` and sends SIGUSR2: vmha-fs attaches the peer's
//!   receiver and copies everything to it while writes go on, reporting in
//!   `<state>/sync.json`. [`FsDriver::go_alone`] sends SIGUSR1 (the peer is
//!   declared dead: writes go on alone instead of failing after the lock
//!   timeout).
//! - The receiver runs `vmha-fs secondary --accept-generation <the writer's
//!   generation>` listening on the local address of the module's
//!   `replication_network` (fencing: a stale writer is refused). When the
//!   writer moves to a new generation, [`FsDriver::start_resync_from`]
//!   restarts the receiver accepting it; the copy itself is pushed by the
//!   writer, so the receiver's [`FsDriver::resync_state`] stays `Idle` and the
//!   daemon takes the progress from the writer's heartbeat.
//! - Both sides get `--module <name>`: the handshake binds the module name and
//!   the port, so a writer that reaches another module's receiver is refused as
//!   "wrong module" (a failed attach), never as a stale writer (fenced).
//! - vmha-fs state lives in `<state_dir>/<module>/fs<i>`. `sync.json` is
//!   removed before an attach and on `go_alone` so an old outcome is never
//!   read as the current one.
//! - Children are kept and stopped by PID with SIGTERM (vmha-fs unmounts on
//!   it), SIGKILL after [`STOP_TIMEOUT`]. Each runs in its own process group
//!   (a terminal's SIGINT does not reach it) and outlives vmhad: the driver
//!   made [`VmhaFsDriver::detached`] stops nothing when dropped.
//! - Each child is recorded in `<state>/process.json` ([`PROCESS_FILE`]: PID,
//!   start time, role, generation, a digest of its settings). A new vmhad's
//!   [`FsDriver::find_running`] reads them, takes the processes that still run
//!   in charge as adopted processes (watched by PID and start time, stopped by
//!   [`FsDriver::unmount`]) and reports whether they run with the settings
//!   this configuration gives them: the command line without the program, the
//!   generation and the start mode. The state machine decides (`Adopt`).
//! - [`FsDriver::data_path_alive`]: a receiver's `heard.json` shows a writer
//!   session and a frame within the window; a writer's `link.json` is
//!   connected, syncing or attaching.
//! - A writer publishes its replication link in `<state>/link.json` (removed
//!   before each start): `lost`, `stalled` (no acknowledgement for half the
//!   lock timeout) or `failed` is [`FsHealth::LinkDown`] (the
//!   controller marks the peer outdated, then sends SIGUSR1), `fenced` (the
//!   peer's receiver refused our generation) is [`FsHealth::Fenced`].
//! - What a killed vmha-fs leaves at a directory — its dead FUSE mount
//!   (ENOTCONN for everyone, QEMU and the next receiver alike), or the
//!   receiver's read-only bind of the directory over itself — is detached
//!   (lazy unmount) as soon as [`FsDriver::health`] finds the process gone,
//!   after each [`FsDriver::unmount`], and before the next start there; never
//!   while a vmha-fs still holds the state directory's lock (it may still serve
//!   the directory). The FUSE mount is known by its source `vmha:<dir>`.
//! - `resync --compare` writes `<state>/compare-resync` for the writer (its
//!   next SIGUSR2 compares every block; vmha-fs removes the file when that
//!   compare finished); `invalidate` writes `<state>/self-outdated` for the
//!   receiver (the receiver started for the resync invalidates its records;
//!   it removes the file once the copy is identical again).
//! - `link.json` `disk_failed` (vmha-fs found a media error on this node's own
//!   copy) is [`FsHealth::DiskFailed`], checked before the process's exit, and
//!   remembered for the running writer; so is a `link.json` that exists but
//!   cannot be read (its disk failed too).
//! - The files are read through vmha-fs's own types ([`::vmha_fs::status`]),
//!   generations cross to vmha-fs as [`GenerationId`] (validated here: an
//!   invalid one is a driver error, never a vmha-fs usage error).
//! - Live swap: the standby (`primary --standby`, one per directory, over the
//!   running receiver and with its state directory) is kept apart from the
//!   module's writer/receiver until activated: activation stops the receiver,
//!   writes the generation, signals (SIGUSR2 connected, SIGUSR1 alone) and
//!   waits for `link.json` to show the writer (or `activation: failed`); the
//!   activated processes then are the module's writer, recorded for adoption
//!   as a writer started so would be. `unmount` stops a standby first.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ::vmha_fs::status::{
    ChangedBytes, FsMetrics, GenerationId, LinkCondition, LinkStatus, StatusFile, SyncPhase,
    SyncStatus, VerifyPhase, VerifyStatus, COMPARE_RESYNC as COMPARE_RESYNC_FILE,
    LINK as LINK_FILE, PEER_OUTDATED as PEER_OUTDATED_FILE, SELF_OUTDATED, SYNC as SYNC_FILE,
    VERIFY as VERIFY_FILE,
};

use super::{Difference, DriverError, FoundFs, FsDriver, FsHealth, ResyncState, VerifyReport};
use crate::config::{Config, Module, NodeIndex};
use crate::state::Progress;

/// How long a child gets between SIGTERM and SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a writer may take to mount.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(10);
/// In each vmha-fs state directory: the [`ProcessRecord`] of the process this
/// driver started there (written by the controller, read by the next vmhad).
pub const PROCESS_FILE: &str = "process.json";
/// In each state directory while a standby mount (live swap) runs there:
/// its PID and start time ([`StandbyRecord`]), so that a vmhad started
/// after a crash of the one that mounted it stops it.
pub const STANDBY_FILE: &str = "standby-process.json";

#[derive(Debug)]
struct Running {
    writer: bool,
    /// Writer: the generation claimed; receiver: the generation accepted.
    generation: Option<GenerationId>,
    children: Vec<(PathBuf, Proc)>,
    /// Receiver started with `--save-aside`.
    save_aside: bool,
    /// Writer: vmha-fs reported a local disk failure (kept even if
    /// `link.json` can no longer be read).
    disk_failed: Option<String>,
}

/// What a vmha-fs child is started as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spawn {
    /// `primary --alone`: writes alone until the peer is attached (full copy).
    Writer,
    /// `primary --peer`: replicates synchronously from the first write.
    ConnectedWriter,
    Receiver,
    /// `secondary --save-aside`: this node lost a split brain (or its history is
    /// unknown); whatever the resync overwrites is saved first.
    LoserReceiver,
}

/// A generation as the daemon passes it, checked before it reaches vmha-fs.
fn generation_id(generation: Option<&str>) -> Result<Option<GenerationId>, DriverError> {
    generation
        .map(GenerationId::try_from)
        .transpose()
        .map_err(|e| DriverError::failed("generation", e))
}

/// Whether `running` holds `generation` (None: no generation).
fn same_generation(running: Option<&GenerationId>, generation: Option<&str>) -> bool {
    running.map(GenerationId::as_str) == generation
}

/// Spawns the `vmha-fs` binary.
#[derive(Debug)]
pub struct VmhaFsDriver {
    binary: PathBuf,
    config: Config,
    local: NodeIndex,
    running: Mutex<HashMap<String, Running>>,
    /// Children outlive this driver (vmhad): dropping it stops nothing.
    detached: bool,
    /// The last read of this namespace's mount table, shared by the health
    /// checks of every module (see [`VmhaFsDriver::fuse_mounted`]).
    mount_table: Mutex<Option<(Instant, Vec<vmha_fs::mounts::MountEntry>)>>,
    /// `link.json` health per state directory, re-read only when the file changed.
    links: StampCache<FsHealth>,
    /// `changed_bytes` per state directory, re-read only when the file changed.
    changed: StampCache<Option<Vec<u8>>>,
    /// Live swap: the standby mounts (`primary --standby`) over a module's
    /// receiving directories, until activated or dropped.
    standby: Mutex<HashMap<String, Vec<(PathBuf, Proc)>>>,
}

/// A file's version: vmha-fs replaces its status files by rename (a new
/// inode each time), so the same device, inode, size and mtime mean the same
/// content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        }
    }
}

/// What was made of status files, by path, with the file's [`Stamp`] when it
/// was read. The health checks of 32 modules read and parsed `link.json` twice
/// and `changed_bytes` once per check each, though vmha-fs rewrites them only
/// when something changes: a `stat` now tells whether to read again.
#[derive(Debug)]
struct StampCache<T> {
    entries: Mutex<HashMap<PathBuf, (Stamp, T)>>,
}

impl<T> Default for StampCache<T> {
    fn default() -> Self {
        StampCache {
            entries: Mutex::new(HashMap::new()),
        }
    }
}

impl<T: Clone> StampCache<T> {
    /// `read(path)`, or its earlier result if the file is the same version
    /// as then. A file that cannot be stat'ed (absent) is read every time.
    fn get(&self, path: &Path, read: impl FnOnce(&Path) -> T) -> T {
        let lock = || {
            self.entries
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        };
        let stamp = match std::fs::metadata(path) {
            Ok(meta) => Stamp::of(&meta),
            Err(_) => {
                lock().remove(path);
                return read(path);
            }
        };
        if let Some((seen, value)) = lock().get(path) {
            if *seen == stamp {
                return value.clone();
            }
        }
        // Replaced between the stat and the read: the newer content is kept
        // under the older stamp, so the next call reads again.
        let value = read(path);
        lock().insert(path.to_path_buf(), (stamp, value.clone()));
        value
    }
}

/// How long one read of the mount table answers "still mounted" for the
/// health checks of every module. Each check read the whole table before:
/// with 32 modules, 64 reads of a table of 100+ mounts per second were a
/// fifth of an idle vmhad's CPU.
const MOUNT_TABLE_REUSE: Duration = Duration::from_millis(250);

/// Whether the topmost mount at `dir` in `table` is a FUSE filesystem.
fn topmost_is_fuse(table: &[vmha_fs::mounts::MountEntry], dir: &Path) -> bool {
    table
        .iter()
        .rev()
        .find(|m| m.mount_point == dir)
        .is_some_and(|m| m.fs_type.starts_with("fuse"))
}

impl VmhaFsDriver {
    pub fn new(binary: PathBuf, config: Config, local: NodeIndex) -> VmhaFsDriver {
        VmhaFsDriver {
            binary,
            config,
            local,
            running: Mutex::new(HashMap::new()),
            detached: false,
            mount_table: Mutex::new(None),
            links: StampCache::default(),
            changed: StampCache::default(),
            standby: Mutex::new(HashMap::new()),
        }
    }

    fn standby_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<(PathBuf, Proc)>>> {
        self.standby
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The standby's command for directory `i`: `primary --standby` with
    /// the writer's settings and this node's receiver's state directory.
    fn standby_command(
        &self,
        module: &Module,
        i: usize,
        dir: &Path,
    ) -> Result<Command, DriverError> {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("primary")
            .arg("--standby")
            .arg("--backing")
            .arg(dir)
            .arg("--mount")
            .arg(dir)
            .arg("--peer")
            .arg(self.address(self.local.peer(), module, i)?.to_string())
            .arg("--lock-timeout-ms")
            .arg(module.lock_timeout_ms.to_string());
        if module.rate_limit_mb_s > 0 {
            cmd.arg("--rate-limit-mb-s")
                .arg(module.rate_limit_mb_s.to_string());
        }
        write_settings(&mut cmd, module);
        cmd.arg("--module")
            .arg(&module.name)
            .arg("--state")
            .arg(self.state_dir(module, i))
            .arg("--key-file")
            .arg(&self.config.cluster.key_file)
            .stdin(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        Ok(cmd)
    }

    /// Stops the module's standby mounts, if any.
    fn stop_standby(&self, module: &Module) {
        let children = self.standby_lock().remove(&module.name);
        for (dir, mut child) in children.into_iter().flatten() {
            child.terminate();
            tracing::info!(module = %module.name, dir = %dir.display(), "standby mount stopped");
        }
        self.remove_standby_records(module);
    }

    fn remove_standby_records(&self, module: &Module) {
        for i in 0..module.replicated.len() {
            let _ = remove_if_present(&self.state_dir(module, i).join(STANDBY_FILE));
        }
    }

    /// The children outlive the driver (and vmhad): dropping it leaves them
    /// running, for the next vmhad to adopt. Without it (tests running a
    /// daemon in-process) they are stopped when the driver is dropped.
    pub fn detached(mut self) -> VmhaFsDriver {
        self.detached = true;
        self
    }

    /// [`read_link`] of `state`, re-read only when `link.json` changed.
    fn link_health(&self, state: &Path) -> FsHealth {
        self.links.get(&state.join(LINK_FILE), |path| {
            read_link(path.parent().unwrap_or(state))
        })
    }

    /// Rewrites the records of the module's processes with `generation`.
    fn record_generation(&self, module: &Module, generation: Option<&GenerationId>) {
        for i in 0..module.replicated.len() {
            let state = self.state_dir(module, i);
            if let Some(mut record) = ProcessRecord::read(&state) {
                record.generation = generation.map(|g| g.as_str().to_string());
                if let Err(e) = record.write(&state) {
                    tracing::warn!(module = %module.name, error = %e, "process record");
                }
            }
        }
    }

    /// Whether a FUSE mount is at `dir`, for the periodic health check. A
    /// "mounted" answer from a table read less than [`MOUNT_TABLE_REUSE`] ago
    /// is reused (a mount that vanished is seen at most that much later); a
    /// "not mounted" one is always read afresh, so a mount made since the
    /// last read is never reported missing.
    fn fuse_mounted(&self, dir: &Path) -> bool {
        let lock = || {
            self.mount_table
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        };
        if let Some((at, table)) = &*lock() {
            if at.elapsed() < MOUNT_TABLE_REUSE && topmost_is_fuse(table, dir) {
                return true;
            }
        }
        match vmha_fs::mounts::mount_table() {
            Ok(table) => {
                let mounted = topmost_is_fuse(&table, dir);
                *lock() = Some((Instant::now(), table));
                mounted
            }
            Err(_) => false,
        }
    }

    fn address(
        &self,
        node: NodeIndex,
        module: &Module,
        dir: usize,
    ) -> Result<SocketAddr, DriverError> {
        let ip = self
            .config
            .node(node)
            .addresses
            .get(module.replication_network)
            .copied()
            .ok_or_else(|| DriverError::failed("address", "no replication network address"))?;
        let port = u16::try_from(usize::from(module.port) + dir)
            .map_err(|_| DriverError::failed("address", "replication port overflow"))?;
        Ok(SocketAddr::new(ip, port))
    }

    fn state_dir(&self, module: &Module, dir: usize) -> PathBuf {
        self.config
            .cluster
            .state_dir
            .join(&module.name)
            .join(format!("fs{dir}"))
    }

    /// The `vmha-fs` command for directory `i` of `module` in `role`.
    fn command(
        &self,
        module: &Module,
        i: usize,
        dir: &Path,
        role: Spawn,
        generation: Option<&GenerationId>,
    ) -> Result<Command, DriverError> {
        let state = self.state_dir(module, i);
        let mut cmd = Command::new(&self.binary);
        if !matches!(role, Spawn::Receiver | Spawn::LoserReceiver) {
            cmd.arg("primary")
                .arg("--backing")
                .arg(dir)
                .arg("--mount")
                .arg(dir);
            if role != Spawn::ConnectedWriter {
                cmd.arg("--alone");
            }
            cmd.arg("--peer")
                .arg(self.address(self.local.peer(), module, i)?.to_string())
                .arg("--lock-timeout-ms")
                .arg(module.lock_timeout_ms.to_string());
            if module.rate_limit_mb_s > 0 {
                cmd.arg("--rate-limit-mb-s")
                    .arg(module.rate_limit_mb_s.to_string());
            }
            if module.resync_streams > 0 {
                cmd.arg("--resync-streams")
                    .arg(module.resync_streams.to_string());
            }
            write_settings(&mut cmd, module);
            if let Some(generation) = generation {
                cmd.arg("--generation").arg(generation.as_str());
            }
        } else {
            cmd.arg("secondary")
                .arg("--backing")
                .arg(dir)
                .arg("--listen")
                .arg(self.address(self.local, module, i)?.to_string());
            if let Some(generation) = generation {
                cmd.arg("--accept-generation").arg(generation.as_str());
            }
            if role == Spawn::LoserReceiver {
                cmd.arg("--save-aside");
            }
        }
        // Bound in the handshake with the port: a port mix-up between
        // modules is refused as "wrong module", never taken for fencing.
        cmd.arg("--module")
            .arg(&module.name)
            .arg("--state")
            .arg(&state)
            .arg("--key-file")
            .arg(&self.config.cluster.key_file)
            .stdin(Stdio::null());
        Ok(cmd)
    }

    fn spawn(
        &self,
        module: &Module,
        role: Spawn,
        generation: Option<&str>,
    ) -> Result<(), DriverError> {
        let generation = generation_id(generation)?;
        let writer = !matches!(role, Spawn::Receiver | Spawn::LoserReceiver);
        self.unmount(module)?;
        let mut children = Vec::new();
        let result = (|| {
            for (i, dir) in module.replicated.iter().enumerate() {
                let state = self.state_dir(module, i);
                std::fs::create_dir_all(&state)
                    .map_err(|e| DriverError::failed(format!("mkdir {}", state.display()), e))?;
                remove_if_present(&state.join(SYNC_FILE))?;
                remove_if_present(&state.join(LINK_FILE))?;
                if !writer {
                    create_replica_dir(&module.name, dir)?;
                }
                remove_if_present(&state.join(PROCESS_FILE))?;
                clear_leftover_mounts(dir, &state)?;
                if writer {
                    // The state machine mounts a writer only on a copy it counts as
                    // current (never while this disk is failed; `prim` is the
                    // operator saying this copy wins): vmha-fs's own record of a
                    // past disk failure must not refuse it.
                    let own = state.join(SELF_OUTDATED);
                    if own.exists() {
                        tracing::warn!(
                            module = %module.name,
                            "this copy was recorded as behind after a disk failure; writing on it as decided"
                        );
                        remove_if_present(&own)?;
                    }
                    if role == Spawn::ConnectedWriter {
                        // The controller established that the peer has all our data.
                        remove_if_present(&state.join(PEER_OUTDATED_FILE))?;
                    }
                    if let Some(generation) = &generation {
                        write_generation(&state, generation)?;
                    }
                }
                let mut cmd = self.command(module, i, dir, role, generation.as_ref())?;
                let settings = settings_of(&cmd);
                // Its own process group: a terminal's SIGINT (or anything sent
                // to vmhad's group) does not reach it; it outlives vmhad.
                std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
                let child = cmd.spawn().map_err(|e| {
                    DriverError::failed(format!("spawn {}", self.binary.display()), e)
                })?;
                children.push((dir.clone(), Proc::Spawned(child)));
                let last = children
                    .last_mut()
                    .ok_or_else(|| DriverError::failed("spawn", "lost child"))?;
                wait_ready(&mut last.1, &last.0, writer)?;
                let record = ProcessRecord {
                    pid: last.1.id(),
                    start_time: start_time(last.1.id()).unwrap_or(0),
                    writer,
                    save_aside: role == Spawn::LoserReceiver,
                    generation: generation.as_ref().map(|g| g.as_str().to_string()),
                    settings,
                };
                record.write(&state)?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            for (_, child) in &mut children {
                child.terminate();
            }
            return Err(e);
        }
        self.lock().insert(
            module.name.clone(),
            Running {
                writer,
                generation,
                children,
                save_aside: role == Spawn::LoserReceiver,
                disk_failed: None,
            },
        );
        Ok(())
    }

    /// The PIDs of the module's vmha-fs children (diagnostics, tests).
    pub fn pids(&self, module: &str) -> Vec<u32> {
        self.lock()
            .get(module)
            .map(|r| r.children.iter().map(|(_, c)| c.id()).collect())
            .unwrap_or_default()
    }

    /// Sends `signal` to every writer child of `module`.
    fn signal_writer(
        &self,
        module: &Module,
        signal: rustix::process::Signal,
        what: &str,
    ) -> Result<(), DriverError> {
        let mut all = self.lock();
        let running = all
            .get_mut(&module.name)
            .filter(|r| r.writer)
            .ok_or_else(|| DriverError::failed(what, "no writer is running"))?;
        for (dir, child) in &mut running.children {
            child.signal(signal).map_err(|e| {
                DriverError::failed(what, format!("vmha-fs for {}: {e}", dir.display()))
            })?;
        }
        Ok(())
    }

    /// The module's state dirs, if a writer runs for it.
    fn writer_state_dirs(&self, module: &Module) -> Option<Vec<PathBuf>> {
        let all = self.lock();
        let running = all.get(&module.name).filter(|r| r.writer)?;
        Some(
            (0..running.children.len())
                .map(|i| self.state_dir(module, i))
                .collect(),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        self.running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Bound of one verify (it reads everything on both nodes).
const VERIFY_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

/// `<state>/verify.json` once vmha-fs finished (None while it runs: the file is
/// written atomically at the end, so it is absent until then).
fn read_verify(state: &Path) -> Result<Option<Vec<Difference>>, DriverError> {
    let path = state.join(VERIFY_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => parse_verify(&path, &bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(DriverError::failed(format!("read {}", path.display()), e)),
    }
}

/// The content of a `verify.json` (read from `path`).
fn parse_verify(path: &Path, bytes: &[u8]) -> Result<Option<Vec<Difference>>, DriverError> {
    let file = VerifyStatus::decode(bytes)
        .map_err(|e| DriverError::failed(format!("parse {}", path.display()), e))?;
    match file.state {
        VerifyPhase::Done => Ok(Some(file.differing)),
        VerifyPhase::Failed => Err(DriverError::failed(
            "verify",
            file.error.unwrap_or_else(|| "failed".into()),
        )),
        VerifyPhase::Running => Ok(None),
    }
}

fn remove_if_present(path: &Path) -> Result<(), DriverError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DriverError::failed(format!("remove {}", path.display()), e)),
    }
}

/// `<state>/generation`, written atomically (vmha-fs reads it at attach time).
fn write_generation(state: &Path, generation: &GenerationId) -> Result<(), DriverError> {
    let path = state.join(::vmha_fs::status::GENERATION);
    ::vmha_fs::atomic::write(&path, &generation.to_file())
        .map_err(|e| DriverError::failed(format!("write {}", path.display()), e))
}

/// The state of one directory's sync from `<state>/sync.json`.
fn read_sync(state: &Path) -> Result<ResyncState, DriverError> {
    let path = state.join(SYNC_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => parse_sync(&path, &bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ResyncState::Idle),
        Err(e) => Err(DriverError::failed(format!("read {}", path.display()), e)),
    }
}

/// The content of a `sync.json` (read from `path`).
fn parse_sync(path: &Path, bytes: &[u8]) -> Result<ResyncState, DriverError> {
    let sync = SyncStatus::decode(bytes)
        .map_err(|e| DriverError::failed(format!("parse {}", path.display()), e))?;
    let progress = Progress {
        done_bytes: sync.done_bytes,
        total_bytes: sync.total_bytes,
    };
    match (sync.state, sync.error) {
        (SyncPhase::Syncing, _) => Ok(ResyncState::Running(progress)),
        (SyncPhase::InSync, _) => Ok(ResyncState::Done),
        (SyncPhase::Alone, Some(error)) => Err(DriverError::failed("sync to the peer", error)),
        (SyncPhase::Alone, None) => Ok(ResyncState::Idle),
    }
}

/// A writer's health from `<state>/link.json`: not written yet, or a state that
/// needs nothing from the controller, is healthy.
fn read_link(state: &Path) -> FsHealth {
    let path = state.join(LINK_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return FsHealth::Healthy,
        Err(e) if e.raw_os_error() == Some(libc_eio()) => {
            return FsHealth::DiskFailed(format!("reading {}: {e}", path.display()))
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "unreadable link status");
            return FsHealth::Healthy;
        }
    };
    match parse_link(&path, &bytes) {
        Ok(health) => health,
        Err(e) => {
            tracing::warn!("unreadable link status: {e}");
            FsHealth::Healthy
        }
    }
}

/// The content of a `link.json` (read from `path`).
fn parse_link(path: &Path, bytes: &[u8]) -> Result<FsHealth, DriverError> {
    let link = LinkStatus::decode(bytes)
        .map_err(|e| DriverError::failed(format!("parse {}", path.display()), e))?;
    Ok(match link.state {
        state if state.is_down() => {
            tracing::debug!(?state, reason = ?link.reason, "replication link down");
            FsHealth::LinkDown
        }
        LinkCondition::Fenced => {
            tracing::warn!(reason = ?link.reason, "the peer's receiver refused our generation");
            FsHealth::Fenced
        }
        LinkCondition::DiskFailed => FsHealth::DiskFailed(
            link.reason
                .unwrap_or_else(|| "vmha-fs reports a local disk failure".into()),
        ),
        _ => FsHealth::Healthy,
    })
}

/// The content of a `changed_bytes` file: a decimal count of bytes.
fn parse_changed_bytes(bytes: &[u8]) -> Result<u64, DriverError> {
    ChangedBytes::decode(bytes)
        .map(|c| c.0)
        .map_err(|e| DriverError::failed("parse changed_bytes", e))
}

/// One module's metrics from its directories' `metrics.json`.
fn sum_fs_metrics(files: impl Iterator<Item = FsMetrics>) -> FsMetrics {
    files.fold(FsMetrics::default(), |mut sum, m| {
        sum.add(&m);
        sum
    })
}

/// The module's changed bytes from its directories' files (unreadable ones count
/// nothing; the sum saturates rather than overflow).
fn sum_changed_bytes(files: &[Vec<u8>]) -> u64 {
    files
        .iter()
        .filter_map(|b| parse_changed_bytes(b).ok())
        .fold(0u64, u64::saturating_add)
}

/// EIO: the file exists but its disk cannot deliver it.
fn libc_eio() -> i32 {
    rustix::io::Errno::IO.raw_os_error()
}

fn mount_table() -> Vec<vmha_fs::mounts::MountEntry> {
    vmha_fs::mounts::mount_table().unwrap_or_default()
}

/// `dir` made absolute without touching `dir` itself (a dead FUSE mount there
/// answers ENOTCONN).
fn absolute(dir: &Path) -> PathBuf {
    match (dir.parent(), dir.file_name()) {
        (Some(parent), Some(name)) => parent
            .canonicalize()
            .map(|p| p.join(name))
            .unwrap_or_else(|_| dir.to_path_buf()),
        _ => dir.to_path_buf(),
    }
}

/// Unmounts what a killed vmha-fs left at `dir`: its dead FUSE mount, or the
/// receiver's read-only bind of the directory over itself (same device as the
/// mount it sits on). Anything else is left alone; so is everything while a
/// vmha-fs holds the lock of `state` (it may still serve `dir`).
fn clear_leftover_mounts(dir: &Path, state: &Path) -> Result<(), DriverError> {
    let lock = match std::fs::File::open(state.join("lock")) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(DriverError::failed("open the vmha-fs state lock", e)),
    };
    if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        return Ok(());
    }
    let dir = absolute(dir);
    for _ in 0..8 {
        let table = mount_table();
        let Some(top) = table.iter().rev().find(|m| m.mount_point == dir) else {
            return Ok(());
        };
        // fuser mounts as type `fuse` (or `fuse.vmha`) with source `vmha:<dir>`.
        let fuse = top.fs_type == "fuse" || top.fs_type.starts_with("fuse.");
        let dead_fuse = top.fs_type == "fuse.vmha" || (fuse && top.source.starts_with("vmha:"));
        let read_only_bind = top.read_only
            && !top.fs_type.starts_with("fuse")
            && table.iter().any(|m| m.id == top.parent && m.dev == top.dev);
        if !dead_fuse && !read_only_bind {
            return Ok(());
        }
        tracing::warn!(dir = %dir.display(), fs_type = top.fs_type, "unmounting what a killed vmha-fs left");
        rustix::mount::unmount(&dir, rustix::mount::UnmountFlags::DETACH).map_err(|e| {
            DriverError::failed(format!("unmount the leftover at {}", dir.display()), e)
        })?;
    }
    Err(DriverError::failed(
        format!("unmount the leftovers at {}", dir.display()),
        "too many mounts",
    ))
}

/// The state of a module's sync from those of its directories: done when all
/// are, failed when any is, else running with the summed progress.
fn combine(states: Vec<Result<ResyncState, DriverError>>) -> Result<ResyncState, DriverError> {
    let mut total = Progress {
        done_bytes: 0,
        total_bytes: 0,
    };
    let (mut running, mut done, mut count) = (false, 0usize, 0usize);
    for state in states {
        count += 1;
        match state? {
            ResyncState::Idle => {}
            ResyncState::Done => done += 1,
            ResyncState::Running(p) => {
                running = true;
                total.done_bytes = total.done_bytes.saturating_add(p.done_bytes);
                total.total_bytes = total.total_bytes.saturating_add(p.total_bytes);
            }
        }
    }
    Ok(if count > 0 && done == count {
        ResyncState::Done
    } else if running || done > 0 {
        ResyncState::Running(total)
    } else {
        ResyncState::Idle
    })
}

/// A SECOND's replicated directory is a replica target: when missing it is
/// created (the resync fills it), not a reason to fail and retry forever. A
/// writer's missing directory stays an error (its data would be missing).
fn create_replica_dir(module: &str, dir: &Path) -> Result<(), DriverError> {
    match std::fs::symlink_metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(DriverError::failed(
            format!("replicated directory {}", dir.display()),
            "exists and is not a directory",
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .map_err(|e| DriverError::failed(format!("mkdir {}", dir.display()), e))?;
            tracing::info!(
                module,
                dir = %dir.display(),
                "replicated directory missing on this SECOND: created (the resync fills it)"
            );
            Ok(())
        }
        Err(e) => Err(DriverError::failed(format!("stat {}", dir.display()), e)),
    }
}

fn is_fuse_mount(dir: &Path) -> bool {
    vmha_fs::mounts::is_fuse_mounted(dir).unwrap_or(false)
}

fn wait_ready(child: &mut Proc, dir: &Path, writer: bool) -> Result<(), DriverError> {
    let deadline = Instant::now()
        + if writer {
            MOUNT_TIMEOUT
        } else {
            Duration::from_millis(300)
        };
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(DriverError::failed(
                "vmha-fs",
                format!("exited at start: {status}"),
            ));
        }
        if writer && is_fuse_mount(dir) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return if writer {
                Err(DriverError::Timeout {
                    what: format!("mount of {}", dir.display()),
                    secs: MOUNT_TIMEOUT.as_secs(),
                })
            } else {
                Ok(())
            };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the standby in `dir` reports its activation in `link.json`:
/// a writer (no longer `standby`), or `activation: failed: ...`.
fn wait_activated(child: &mut Proc, state: &Path, dir: &Path) -> Result<(), DriverError> {
    let what = "standby activation";
    let deadline = Instant::now() + MOUNT_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(DriverError::failed(
                what,
                format!("vmha-fs exited: {status}"),
            ));
        }
        if let Ok(bytes) = std::fs::read(state.join(LINK_FILE)) {
            if let Ok(link) = serde_json::from_slice::<LinkStatus>(&bytes) {
                if let Some(failed) = link.activation {
                    return Err(DriverError::failed(what, failed));
                }
                if !link.standby {
                    return Ok(());
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(DriverError::Timeout {
                what: format!("activation of the standby on {}", dir.display()),
                secs: MOUNT_TIMEOUT.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The record of a vmha-fs process this driver started, in its state directory
/// ([`PROCESS_FILE`]): what a later vmhad needs to find it and check it is the
/// one it expects before adopting it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct ProcessRecord {
    pid: u32,
    /// Field 22 of `/proc/PID/stat`: a reused PID is not this process.
    start_time: u64,
    writer: bool,
    save_aside: bool,
    /// Writer: the generation claimed; receiver: the one accepted.
    generation: Option<String>,
    /// [`settings_of`] its command line.
    settings: String,
}

impl ProcessRecord {
    fn write(&self, state: &Path) -> Result<(), DriverError> {
        write_record(&state.join(PROCESS_FILE), self)
    }

    /// None when absent or unreadable (then there is nothing to adopt).
    fn read(state: &Path) -> Option<ProcessRecord> {
        read_record(&state.join(PROCESS_FILE))
    }
}

/// Writes a process record as JSON, atomically.
fn write_record<T: serde::Serialize>(path: &Path, record: &T) -> Result<(), DriverError> {
    let bytes = serde_json::to_vec(record)
        .map_err(|e| DriverError::failed(format!("encode {}", path.display()), e))?;
    ::vmha_fs::atomic::write(path, &bytes)
        .map_err(|e| DriverError::failed(format!("write {}", path.display()), e))
}

/// A process record; None when absent or unreadable.
fn read_record<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// A standby mount's process ([`STANDBY_FILE`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct StandbyRecord {
    pid: u32,
    /// Field 22 of `/proc/PID/stat`: a reused PID is not this process.
    start_time: u64,
}

impl StandbyRecord {
    fn write(&self, state: &Path) -> Result<(), DriverError> {
        write_record(&state.join(STANDBY_FILE), self)
    }

    fn read(state: &Path) -> Option<StandbyRecord> {
        read_record(&state.join(STANDBY_FILE))
    }
}

/// A digest of the settings a vmha-fs runs with: its command line without the
/// program (an upgraded binary still adopts), the generation (compared on its
/// own) and the start mode (`--alone`, `--save-aside`). Keys of the
/// configuration that do not reach vmha-fs do not change it.
fn settings_of(cmd: &Command) -> String {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"vmha-fs settings v1\0");
    let mut args = cmd.get_args();
    while let Some(arg) = args.next() {
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(arg);
        match bytes {
            b"--generation" | b"--accept-generation" => {
                args.next();
            }
            b"--alone" | b"--save-aside" => {}
            _ => {
                hasher.update(bytes);
                hasher.update(&[0]);
            }
        }
    }
    hasher.finalize().to_hex().to_string()
}

/// State letter and start time (fields 3 and 22) of `/proc/PID/stat`.
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

fn start_time(pid: u32) -> Option<u64> {
    proc_stat(pid).map(|(_, start)| start)
}

/// The process `pid` started at `start` still runs (a zombie does not).
fn alive(pid: u32, start: u64) -> bool {
    matches!(proc_stat(pid), Some((state, t)) if t == start && state != 'Z' && state != 'X')
}

/// A vmha-fs process: started by this driver, or adopted from a previous
/// vmhad (not our child: known by PID and start time, never reaped here).
#[derive(Debug)]
enum Proc {
    Spawned(Child),
    Adopted { pid: u32, start_time: u64 },
}

impl Proc {
    fn id(&self) -> u32 {
        match self {
            Proc::Spawned(child) => child.id(),
            Proc::Adopted { pid, .. } => *pid,
        }
    }

    /// `Some(how)` once it exited.
    fn try_wait(&mut self) -> std::io::Result<Option<String>> {
        match self {
            Proc::Spawned(child) => Ok(child.try_wait()?.map(|s| s.to_string())),
            Proc::Adopted { pid, start_time } => {
                Ok((!alive(*pid, *start_time)).then(|| "exited (adopted process)".to_string()))
            }
        }
    }

    fn signal(&mut self, signal: rustix::process::Signal) -> Result<(), String> {
        if !matches!(self.try_wait(), Ok(None)) {
            return Err("not running".into());
        }
        let pid = i32::try_from(self.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .ok_or("bad pid")?;
        rustix::process::kill_process(pid, signal).map_err(|e| e.to_string())
    }

    /// SIGTERM, bounded wait, SIGKILL.
    fn terminate(&mut self) {
        if !matches!(self.try_wait(), Ok(None)) {
            return;
        }
        let _ = self.signal(rustix::process::Signal::TERM);
        // A stopped child (SIGSTOP) acts on SIGTERM only once continued.
        let _ = self.signal(rustix::process::Signal::CONT);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if !matches!(self.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.signal(rustix::process::Signal::KILL);
        if let Proc::Spawned(child) = self {
            let _ = child.wait();
        } else {
            let deadline = Instant::now() + Duration::from_secs(2);
            while matches!(self.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl FsDriver for VmhaFsDriver {
    fn mount_writer(&self, module: &Module) -> Result<(), DriverError> {
        self.spawn(module, Spawn::Writer, None)
    }

    fn mount_receiver(&self, module: &Module) -> Result<(), DriverError> {
        self.spawn(module, Spawn::Receiver, None)
    }

    fn mount_writer_at(
        &self,
        module: &Module,
        generation: Option<&str>,
    ) -> Result<(), DriverError> {
        self.spawn(module, Spawn::Writer, generation)
    }

    fn mount_writer_connected(
        &self,
        module: &Module,
        generation: Option<&str>,
    ) -> Result<(), DriverError> {
        self.spawn(module, Spawn::ConnectedWriter, generation)
    }

    fn mount_receiver_accepting(
        &self,
        module: &Module,
        generation: Option<&str>,
    ) -> Result<(), DriverError> {
        self.spawn(module, Spawn::Receiver, generation)
    }

    fn unmount(&self, module: &Module) -> Result<(), DriverError> {
        // The standby is mounted over the receiver's directory: first.
        self.stop_standby(module);
        let running = self.lock().remove(&module.name);
        if let Some(mut running) = running {
            for (i, (dir, child)) in running.children.iter_mut().enumerate() {
                child.terminate();
                let _ = remove_if_present(&self.state_dir(module, i).join(PROCESS_FILE));
                // A vmha-fs that could not unmount (killed, or its disk failed)
                // leaves its mount behind: detach it now, not at the next start.
                if let Err(e) = clear_leftover_mounts(dir, &self.state_dir(module, i)) {
                    tracing::warn!(dir = %dir.display(), error = %e, "leftover mount");
                }
            }
        }
        Ok(())
    }

    fn health(&self, module: &Module) -> FsHealth {
        let mut all = self.lock();
        let Some(running) = all.get_mut(&module.name) else {
            return FsHealth::Idle;
        };
        if running.writer {
            if let Some(reason) = &running.disk_failed {
                return FsHealth::DiskFailed(reason.clone());
            }
            for i in 0..running.children.len() {
                if let FsHealth::DiskFailed(reason) = self.link_health(&self.state_dir(module, i)) {
                    running.disk_failed = Some(reason.clone());
                    return FsHealth::DiskFailed(reason);
                }
            }
        }
        for (i, (dir, child)) in running.children.iter_mut().enumerate() {
            match child.try_wait() {
                Ok(None) => {}
                Ok(Some(status)) => {
                    // Before anything else: its dead mount answers ENOTCONN to
                    // everyone, the next receiver's start included.
                    if let Err(e) = clear_leftover_mounts(dir, &self.state_dir(module, i)) {
                        tracing::warn!(dir = %dir.display(), error = %e, "leftover mount");
                    }
                    return FsHealth::Failed(format!(
                        "vmha-fs for {} exited: {status}",
                        dir.display()
                    ));
                }
                Err(e) => return FsHealth::Failed(e.to_string()),
            }
            if running.writer && !self.fuse_mounted(dir) {
                return FsHealth::Failed(format!("{} is no longer mounted", dir.display()));
            }
        }
        if !running.writer {
            return FsHealth::Healthy;
        }
        let links: Vec<FsHealth> = (0..running.children.len())
            .map(|i| self.link_health(&self.state_dir(module, i)))
            .collect();
        if links.contains(&FsHealth::Fenced) {
            FsHealth::Fenced
        } else if links.contains(&FsHealth::LinkDown) {
            FsHealth::LinkDown
        } else {
            FsHealth::Healthy
        }
    }

    /// The writer pushes the copy ([`FsDriver::attach_peer`]): nothing to do
    /// on the receiver beyond running.
    fn start_resync(&self, module: &Module, _full: bool) -> Result<(), DriverError> {
        match self.lock().get(&module.name) {
            Some(running) if !running.writer => Ok(()),
            _ => Err(DriverError::failed("resync", "the receiver is not running")),
        }
    }

    /// Restarts the receiver when it accepts another generation than the
    /// writer's `generation`.
    fn start_resync_from(
        &self,
        module: &Module,
        full: bool,
        generation: Option<&str>,
    ) -> Result<(), DriverError> {
        // A full resync may overwrite what this node wrote on its own (split brain):
        // the receiver saves it aside first.
        let restart = match self.lock().get(&module.name) {
            Some(running) if !running.writer => {
                !same_generation(running.generation.as_ref(), generation)
                    || (full && !running.save_aside)
            }
            _ => return Err(DriverError::failed("resync", "the receiver is not running")),
        };
        if restart {
            let role = if full {
                Spawn::LoserReceiver
            } else {
                Spawn::Receiver
            };
            self.spawn(module, role, generation)?;
        }
        self.start_resync(module, full)
    }

    fn follow_writer(
        &self,
        module: &Module,
        generation: Option<&str>,
    ) -> Result<bool, DriverError> {
        let (restart, save_aside) = match self.lock().get(&module.name) {
            Some(running) if !running.writer => (
                !same_generation(running.generation.as_ref(), generation),
                running.save_aside,
            ),
            _ => (false, false),
        };
        if restart {
            let role = if save_aside {
                Spawn::LoserReceiver
            } else {
                Spawn::Receiver
            };
            self.spawn(module, role, generation)?;
        }
        Ok(restart)
    }

    /// The receiver does not know: the daemon reads the writer's heartbeat.
    fn resync_state(&self, _module: &Module) -> Result<ResyncState, DriverError> {
        Ok(ResyncState::Idle)
    }

    fn attach_peer(&self, module: &Module, generation: Option<&str>) -> Result<(), DriverError> {
        let generation = generation_id(generation)?;
        let dirs = self
            .writer_state_dirs(module)
            .ok_or_else(|| DriverError::failed("attach the peer", "no writer is running"))?;
        for state in &dirs {
            if let Some(generation) = &generation {
                write_generation(state, generation)?;
            }
            remove_if_present(&state.join(SYNC_FILE))?;
        }
        self.record_generation(module, generation.as_ref());
        if let Some(running) = self.lock().get_mut(&module.name) {
            running.generation = generation;
        }
        self.signal_writer(module, rustix::process::Signal::USR2, "attach the peer")
    }

    /// What the writer's dirty records mark as changed without the peer, over all
    /// the module's directories (`STATE/changed_bytes`, refreshed every second).
    fn changed_bytes(&self, module: &Module) -> u64 {
        let files: Vec<Vec<u8>> = self
            .writer_state_dirs(module)
            .unwrap_or_default()
            .iter()
            .filter_map(|state| {
                self.changed.get(&state.join(ChangedBytes::FILE), |path| {
                    std::fs::read(path).ok()
                })
            })
            .collect();
        sum_changed_bytes(&files)
    }

    /// The writer's `STATE/metrics.json` of every directory, summed (a
    /// directory whose file is missing or unreadable adds nothing).
    fn fs_metrics(&self, module: &Module) -> Option<FsMetrics> {
        let dirs = self.writer_state_dirs(module)?;
        Some(sum_fs_metrics(dirs.iter().filter_map(|state| {
            FsMetrics::read_from(state).ok().flatten()
        })))
    }

    /// SIGHUP to each writer: vmha-fs compares its directory with the peer's and
    /// writes `verify.json`; waits for every one.
    fn verify(&self, module: &Module) -> Result<VerifyReport, DriverError> {
        let dirs = self
            .writer_state_dirs(module)
            .ok_or_else(|| DriverError::failed("verify", "this node is not the writer"))?;
        for state in &dirs {
            remove_if_present(&state.join(VERIFY_FILE))?;
        }
        self.signal_writer(module, rustix::process::Signal::HUP, "verify")?;
        let mut report = VerifyReport::default();
        for (state, dir) in dirs.iter().zip(&module.replicated) {
            let deadline = Instant::now() + VERIFY_TIMEOUT;
            let diffs = loop {
                if let Some(v) = read_verify(state)? {
                    break v;
                }
                if Instant::now() > deadline {
                    return Err(DriverError::Timeout {
                        what: "verify".into(),
                        secs: VERIFY_TIMEOUT.as_secs(),
                    });
                }
                std::thread::sleep(Duration::from_millis(200));
            };
            report.dirs.push((dir.clone(), diffs));
        }
        Ok(report)
    }

    /// `<state>/compare-resync` in each writer state dir: read by vmha-fs at
    /// the next SIGUSR2 (attach), removed by it once that compare finished.
    fn request_compare(&self, module: &Module, reason: &str) -> Result<(), DriverError> {
        let dirs = self
            .writer_state_dirs(module)
            .ok_or_else(|| DriverError::failed("resync --compare", "no writer is running"))?;
        for state in &dirs {
            let path = state.join(COMPARE_RESYNC_FILE);
            ::vmha_fs::atomic::write(&path, format!("{reason}\n").as_bytes())
                .map_err(|e| DriverError::failed(format!("write {}", path.display()), e))?;
        }
        Ok(())
    }

    /// `<state>/self-outdated` in each of the module's state dirs: the receiver
    /// started for the resync (the writer's new generation restarts it)
    /// invalidates its records, so the writer compares every block; the
    /// receiver removes the file once the copy is identical again.
    fn invalidate(&self, module: &Module, reason: &str) -> Result<(), DriverError> {
        match self.lock().get(&module.name) {
            Some(running) if !running.writer => {}
            _ => return Err(DriverError::failed("invalidate", "no receiver is running")),
        }
        for i in 0..module.replicated.len() {
            let state = self.state_dir(module, i);
            let path = state.join(SELF_OUTDATED);
            ::vmha_fs::atomic::write(&path, format!("{reason}\n").as_bytes())
                .map_err(|e| DriverError::failed(format!("write {}", path.display()), e))?;
        }
        Ok(())
    }

    fn go_alone(&self, module: &Module) -> Result<(), DriverError> {
        self.signal_writer(module, rustix::process::Signal::USR1, "go alone")?;
        for state in self.writer_state_dirs(module).unwrap_or_default() {
            remove_if_present(&state.join(SYNC_FILE))?;
        }
        Ok(())
    }

    /// Reads each directory's [`ProcessRecord`]; when every directory has one
    /// whose process still runs, takes them in charge (as adopted processes,
    /// stopped by [`FsDriver::unmount`]) and says what they are. A partial set
    /// (some directory's process died) is taken in charge too, reported with
    /// `settings_match: false` so that it is stopped.
    fn find_running(&self, module: &Module) -> Result<Option<FoundFs>, DriverError> {
        let mut found: Vec<(PathBuf, ProcessRecord)> = Vec::new();
        for (i, dir) in module.replicated.iter().enumerate() {
            let state = self.state_dir(module, i);
            if let Some(record) = ProcessRecord::read(&state) {
                if alive(record.pid, record.start_time) {
                    found.push((dir.clone(), record));
                    continue;
                }
                tracing::info!(module = %module.name, pid = record.pid, "the vmha-fs recorded here is gone");
                let _ = remove_if_present(&state.join(PROCESS_FILE));
            }
        }
        let Some((_, first)) = found.first() else {
            return Ok(None);
        };
        let writer = first.writer;
        let generation = first.generation.clone();
        let save_aside = first.save_aside;
        let mut settings_match = found.len() == module.replicated.len();
        for (i, (dir, record)) in found.iter().enumerate() {
            let role = match (record.writer, record.save_aside) {
                (true, _) => Spawn::Writer,
                (false, true) => Spawn::LoserReceiver,
                (false, false) => Spawn::Receiver,
            };
            let expected = self
                .command(module, i, dir, role, None)
                .map(|c| settings_of(&c));
            settings_match &= record.writer == writer
                && record.generation == generation
                && expected.as_deref() == Ok(record.settings.as_str());
        }
        let alone = writer
            && (0..found.len()).all(|i| {
                LinkStatus::read_from(&self.state_dir(module, i))
                    .ok()
                    .flatten()
                    .is_some_and(|l| l.state == LinkCondition::Degraded)
            });
        let children = found
            .into_iter()
            .map(|(dir, r)| {
                (
                    dir,
                    Proc::Adopted {
                        pid: r.pid,
                        start_time: r.start_time,
                    },
                )
            })
            .collect();
        let generation_id = generation
            .as_deref()
            .map(GenerationId::try_from)
            .and_then(Result::ok);
        self.lock().insert(
            module.name.clone(),
            Running {
                writer,
                generation: generation_id,
                children,
                save_aside,
                disk_failed: None,
            },
        );
        Ok(Some(FoundFs {
            writer,
            settings_match,
            generation,
            alone,
        }))
    }

    /// Receiver: every directory's `heard.json` shows a writer's session and a
    /// frame within `within`. Writer: every directory's link is connected (or
    /// copying to the peer): a receiver that stops answering turns it
    /// `stalled` within half the lock timeout.
    fn data_path_alive(&self, module: &Module, within: Duration) -> bool {
        let writer = match self.lock().get(&module.name) {
            Some(running) => running.writer,
            None => return false,
        };
        let now = ::vmha_fs::status::monotonic_ms();
        let within = u64::try_from(within.as_millis()).unwrap_or(u64::MAX);
        (0..module.replicated.len()).all(|i| {
            let state = self.state_dir(module, i);
            if writer {
                LinkStatus::read_from(&state)
                    .ok()
                    .flatten()
                    .is_some_and(|l| {
                        matches!(
                            l.state,
                            LinkCondition::Connected
                                | LinkCondition::Syncing
                                | LinkCondition::Attaching
                        )
                    })
            } else {
                ::vmha_fs::status::read_heard(&state)
                    .is_some_and(|h| h.connected && h.age_ms(now).is_some_and(|age| age < within))
            }
        })
    }

    fn mount_standby(&self, module: &Module) -> Result<(), DriverError> {
        let receiving = self.lock().get(&module.name).is_some_and(|r| !r.writer);
        if !receiving {
            return Err(DriverError::failed(
                "standby mount",
                "no receiver runs for this module",
            ));
        }
        self.stop_standby(module);
        let mut children: Vec<(PathBuf, Proc)> = Vec::new();
        let result = (|| {
            for (i, dir) in module.replicated.iter().enumerate() {
                let mut cmd = self.standby_command(module, i, dir)?;
                let child = cmd.spawn().map_err(|e| {
                    DriverError::failed(format!("spawn {}", self.binary.display()), e)
                })?;
                let pid = child.id();
                children.push((dir.clone(), Proc::Spawned(child)));
                // Recorded at once: a vmhad killed from here on leaves it
                // to the next one to stop.
                StandbyRecord {
                    pid,
                    start_time: start_time(pid).unwrap_or(0),
                }
                .write(&self.state_dir(module, i))?;
                let last = children
                    .last_mut()
                    .ok_or_else(|| DriverError::failed("spawn", "lost child"))?;
                wait_ready(&mut last.1, &last.0, true)?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            for (_, child) in &mut children {
                child.terminate();
            }
            self.remove_standby_records(module);
            return Err(e);
        }
        self.standby_lock().insert(module.name.clone(), children);
        Ok(())
    }

    fn activate_standby(
        &self,
        module: &Module,
        generation: Option<&str>,
        connected: bool,
    ) -> Result<(), DriverError> {
        let what = "standby activation";
        let generation = generation_id(generation)?;
        let Some(mut children) = self.standby_lock().remove(&module.name) else {
            return Err(DriverError::failed(what, "no standby mount runs"));
        };
        // The receiver applied everything (the old writer drained before it
        // handed over): it stops, releasing the state directories.
        let receiver = self.lock().remove(&module.name).filter(|r| !r.writer);
        if let Some(mut receiver) = receiver {
            for (i, (_, child)) in receiver.children.iter_mut().enumerate() {
                child.terminate();
                let _ = remove_if_present(&self.state_dir(module, i).join(PROCESS_FILE));
            }
        }
        let signal = if connected {
            rustix::process::Signal::USR2
        } else {
            rustix::process::Signal::USR1
        };
        let result = (|| {
            for (i, (dir, child)) in children.iter_mut().enumerate() {
                let state = self.state_dir(module, i);
                if let Some(generation) = &generation {
                    write_generation(&state, generation)?;
                }
                if connected {
                    remove_if_present(&state.join(PEER_OUTDATED_FILE))?;
                }
                remove_if_present(&state.join(LINK_FILE))?;
                child.signal(signal).map_err(|e| {
                    DriverError::failed(what, format!("vmha-fs for {}: {e}", dir.display()))
                })?;
            }
            for (i, (dir, child)) in children.iter_mut().enumerate() {
                wait_activated(child, &self.state_dir(module, i), dir)?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            // The standby stays (refused activations leave it in standby);
            // the module's next step decides.
            self.standby_lock().insert(module.name.clone(), children);
            return Err(e);
        }
        self.remove_standby_records(module);
        for (i, (dir, child)) in children.iter().enumerate() {
            // Recorded as the writer it now is, so that a later vmhad adopts it.
            let role = if connected {
                Spawn::ConnectedWriter
            } else {
                Spawn::Writer
            };
            let settings = settings_of(&self.command(module, i, dir, role, generation.as_ref())?);
            let record = ProcessRecord {
                pid: child.id(),
                start_time: start_time(child.id()).unwrap_or(0),
                writer: true,
                save_aside: false,
                generation: generation.as_ref().map(|g| g.as_str().to_string()),
                settings,
            };
            record.write(&self.state_dir(module, i))?;
        }
        self.lock().insert(
            module.name.clone(),
            Running {
                writer: true,
                generation,
                children,
                save_aside: false,
                disk_failed: None,
            },
        );
        Ok(())
    }

    fn drop_standby(&self, module: &Module) -> Result<(), DriverError> {
        self.stop_standby(module);
        Ok(())
    }

    fn drop_orphan_standby(&self, module: &Module) -> Result<usize, DriverError> {
        let mut stopped = 0;
        for i in 0..module.replicated.len() {
            let state = self.state_dir(module, i);
            if let Some(record) = StandbyRecord::read(&state) {
                if alive(record.pid, record.start_time) {
                    Proc::Adopted {
                        pid: record.pid,
                        start_time: record.start_time,
                    }
                    .terminate();
                    stopped += 1;
                    tracing::info!(module = %module.name, pid = record.pid, "stopped the standby mount a previous vmhad left");
                }
                remove_if_present(&state.join(STANDBY_FILE))?;
            }
        }
        Ok(stopped)
    }

    fn writer_sync_state(&self, module: &Module) -> Result<ResyncState, DriverError> {
        let Some(dirs) = self.writer_state_dirs(module) else {
            return Ok(ResyncState::Idle);
        };
        combine(dirs.iter().map(|d| read_sync(d)).collect())
    }
}

impl Drop for VmhaFsDriver {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        for (_, children) in self.standby_lock().drain() {
            for (_, mut child) in children {
                child.terminate();
            }
        }
        let mut all = self.lock();
        for (_, mut running) in all.drain() {
            for (_, child) in &mut running.children {
                child.terminate();
            }
        }
    }
}

/// The writer's settings that go on its command line only when not the
/// default (`--protocol`, `--local-writes`): the command line is what adoption
/// compares, and a vmha-fs started before a setting existed runs its default.
fn write_settings(cmd: &mut Command, module: &Module) {
    if module.protocol != ::vmha_fs::Protocol::default() {
        cmd.arg("--protocol").arg(module.protocol.name());
    }
    if module.local_writes != ::vmha_fs::LocalWrites::default() {
        cmd.arg("--local-writes").arg(module.local_writes.name());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sync_in(dir: &Path, json: &str) -> Result<ResyncState, DriverError> {
        std::fs::write(dir.join(SYNC_FILE), json).unwrap();
        read_sync(dir)
    }

    #[test]
    fn sync_json_maps_to_resync_state() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_sync(dir.path()), Ok(ResyncState::Idle));
        let p = Progress {
            done_bytes: 5,
            total_bytes: 10,
        };
        assert_eq!(
            sync_in(
                dir.path(),
                r#"{"state":"syncing","done_bytes":5,"total_bytes":10,"error":null}"#
            ),
            Ok(ResyncState::Running(p))
        );
        assert_eq!(
            sync_in(
                dir.path(),
                r#"{"state":"in_sync","done_bytes":10,"total_bytes":10,"error":null}"#
            ),
            Ok(ResyncState::Done)
        );
        assert_eq!(
            sync_in(
                dir.path(),
                r#"{"state":"alone","done_bytes":0,"total_bytes":0,"error":null}"#
            ),
            Ok(ResyncState::Idle)
        );
        assert!(sync_in(
            dir.path(),
            r#"{"state":"alone","done_bytes":0,"total_bytes":0,"error":"refused"}"#
        )
        .is_err());
        assert!(sync_in(dir.path(), "not json").is_err());
    }

    #[test]
    fn directories_combine() {
        let run = |d, t| {
            Ok(ResyncState::Running(Progress {
                done_bytes: d,
                total_bytes: t,
            }))
        };
        assert_eq!(combine(vec![]), Ok(ResyncState::Idle));
        assert_eq!(
            combine(vec![Ok(ResyncState::Done), Ok(ResyncState::Done)]),
            Ok(ResyncState::Done)
        );
        assert_eq!(combine(vec![run(1, 4), run(2, 4)]), run(3, 8));
        assert_eq!(combine(vec![Ok(ResyncState::Done), run(2, 4)]), run(2, 4));
        assert!(combine(vec![
            Ok(ResyncState::Done),
            Err(DriverError::failed("x", "y"))
        ])
        .is_err());
    }

    /// A status file is read again only when vmha-fs replaced it.
    #[test]
    fn status_files_are_read_again_only_when_replaced() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("changed_bytes");
        let cache: StampCache<Option<Vec<u8>>> = StampCache::default();
        let reads = AtomicUsize::new(0);
        let get = || {
            cache.get(&path, |p| {
                reads.fetch_add(1, Ordering::SeqCst);
                std::fs::read(p).ok()
            })
        };
        assert_eq!(get(), None, "absent");
        assert_eq!(get(), None);
        assert_eq!(
            reads.load(Ordering::SeqCst),
            2,
            "an absent file is tried every time"
        );
        vmha_fs::atomic::write_report(&path, b"10").unwrap();
        assert_eq!(get().as_deref(), Some(&b"10"[..]));
        assert_eq!(get().as_deref(), Some(&b"10"[..]));
        assert_eq!(reads.load(Ordering::SeqCst), 3, "unchanged: not read again");
        // Same size, replaced by rename (as vmha-fs writes it): read again.
        vmha_fs::atomic::write_report(&path, b"20").unwrap();
        assert_eq!(get().as_deref(), Some(&b"20"[..]));
        assert_eq!(reads.load(Ordering::SeqCst), 4);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(get(), None, "removed: seen at once");
    }

    #[test]
    fn link_json_maps_to_health() {
        let dir = tempfile::tempdir().unwrap();
        let link = |json: &str| {
            std::fs::write(dir.path().join(LINK_FILE), json).unwrap();
            read_link(dir.path())
        };
        assert_eq!(read_link(dir.path()), FsHealth::Healthy);
        for healthy in ["connected", "degraded", "attaching", "syncing"] {
            let json = format!(r#"{{"state":"{healthy}","reason":null}}"#);
            assert_eq!(link(&json), FsHealth::Healthy, "{healthy}");
        }
        for down in ["lost", "stalled", "failed"] {
            let json = format!(r#"{{"state":"{down}","reason":"x"}}"#);
            assert_eq!(link(&json), FsHealth::LinkDown, "{down}");
        }
        assert_eq!(
            link(
                r#"{"state":"fenced","reason":"stale writer: claims generation 1, current is 2"}"#
            ),
            FsHealth::Fenced
        );
    }

    #[test]
    fn metrics_of_several_directories_add_up() {
        let mut one = FsMetrics {
            replicated_ops: 3,
            replicated_bytes: 4096,
            dirty_bytes: 1,
            ..FsMetrics::default()
        };
        one.write_latency.buckets = vec![1, 2];
        one.write_latency.count = 3;
        let sum = sum_fs_metrics([one.clone(), one.clone()].into_iter());
        assert_eq!((sum.replicated_ops, sum.replicated_bytes), (6, 8192));
        assert_eq!(sum.write_latency.buckets, vec![2, 4]);
        assert_eq!(sum.dirty_bytes, 2);
    }

    #[test]
    fn changed_bytes_of_several_directories_saturate() {
        let files = vec![
            format!("{}\n", u64::MAX).into_bytes(),
            b"12\n".to_vec(),
            b"garbage".to_vec(),
        ];
        assert_eq!(sum_changed_bytes(&files), u64::MAX);
        assert_eq!(sum_changed_bytes(&[b" 7\n".to_vec(), b"5".to_vec()]), 12);
    }

    #[test]
    fn verify_json_that_does_not_parse_is_an_error_not_a_wait() {
        let p = Path::new("verify.json");
        assert!(parse_verify(p, b"{\"state\":\"done\"").is_err());
        assert!(parse_verify(p, b"{\"state\":\"bogus\"}").is_err());
        assert_eq!(parse_verify(p, b"{\"state\":\"running\"}"), Ok(None));
        assert_eq!(
            parse_verify(p, b"{\"state\":\"done\",\"differing\":[]}"),
            Ok(Some(Vec::new()))
        );
    }

    /// A state file's bytes: arbitrary, or JSON-shaped with the keys vmha-fs writes
    /// (so that values of every type reach the field parsers), or a number.
    fn state_file_bytes() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let value = prop_oneof![
            any::<i64>().prop_map(|v| v.to_string()),
            any::<u64>().prop_map(|v| v.to_string()),
            "[a-z_]{0,12}".prop_map(|v| format!("\"{v}\"")),
            Just("null".to_string()),
            Just("[{\"path\":\"a\",\"offset\":1,\"len\":-1}]".to_string()),
            Just("1e999".to_string()),
            "\\PC{0,16}",
        ];
        let key = prop_oneof![
            Just("state"),
            Just("done_bytes"),
            Just("total_bytes"),
            Just("error"),
            Just("differing"),
            Just("reason"),
        ];
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..256),
            proptest::collection::vec((key, value), 0..6).prop_map(|kv| {
                let body: Vec<String> = kv.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
                format!("{{{}}}", body.join(",")).into_bytes()
            }),
            any::<u64>().prop_map(|v| format!("{v}\n").into_bytes()),
            "[0-9 +-]{0,30}".prop_map(String::into_bytes),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Whatever another process left in a state file, the parsers neither panic
        /// nor take it for a valid file unless it is one.
        #[test]
        fn state_file_parsers_take_any_bytes(
            bytes in state_file_bytes(),
            more in proptest::collection::vec(state_file_bytes(), 0..4),
        ) {
            let p = Path::new("state-file");
            let sync = parse_sync(p, &bytes);
            let link = parse_link(p, &bytes);
            let verify = parse_verify(p, &bytes);
            let is_json = serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_ok();
            let has_state = bytes.windows(7).any(|w| w == b"\"state\"");
            if !is_json || !has_state {
                proptest::prop_assert!(sync.is_err());
                proptest::prop_assert!(link.is_err());
                proptest::prop_assert!(verify.is_err());
            }
            let changed = parse_changed_bytes(&bytes);
            let text = std::str::from_utf8(&bytes).ok();
            proptest::prop_assert_eq!(
                changed.ok(),
                text.and_then(|t| t.trim().parse::<u64>().ok())
            );
            let mut all = more.clone();
            all.push(bytes.clone());
            let _ = sum_changed_bytes(&all);
            let _ = combine(vec![sync, parse_sync(p, &bytes)]);
            let _ = vmha_fs::mounts::parse_mountinfo(&String::from_utf8_lossy(&bytes));
            let _ = vmha_fs::mounts::unescape(&String::from_utf8_lossy(&bytes));
        }
    }

    proptest::proptest! {
        /// Whatever vmha-fs writes (its own types encode it), the controller
        /// reads with the meaning vmha-fs gave it.
        #[test]
        fn what_vmha_fs_writes_is_read_as_meant(
            done in proptest::prelude::any::<u64>(),
            total in proptest::prelude::any::<u64>(),
            error in proptest::option::of("\\PC{0,20}"),
            phase in 0..3usize,
            changed in proptest::prelude::any::<u64>(),
        ) {
            let p = Path::new("state-file");
            let state = [SyncPhase::Syncing, SyncPhase::InSync, SyncPhase::Alone][phase];
            let sync = SyncStatus { state, done_bytes: done, total_bytes: total, error: error.clone() };
            let read = parse_sync(p, &sync.encode());
            match (state, &error) {
                (SyncPhase::Syncing, _) => proptest::prop_assert_eq!(
                    read,
                    Ok(ResyncState::Running(Progress { done_bytes: done, total_bytes: total }))
                ),
                (SyncPhase::InSync, _) => proptest::prop_assert_eq!(read, Ok(ResyncState::Done)),
                (SyncPhase::Alone, None) => proptest::prop_assert_eq!(read, Ok(ResyncState::Idle)),
                (SyncPhase::Alone, Some(_)) => proptest::prop_assert!(read.is_err()),
            }
            let link = LinkStatus::writer(LinkCondition::DiskFailed, error.clone());
            proptest::prop_assert!(matches!(parse_link(p, &link.encode()), Ok(FsHealth::DiskFailed(_))));
            let verify = VerifyStatus {
                state: VerifyPhase::Done,
                done_bytes: done,
                total_bytes: total,
                differing: vec![Difference { path: error.unwrap_or_default(), offset: done, len: total }],
                error: None,
                read_bytes: done,
            };
            proptest::prop_assert_eq!(parse_verify(p, &verify.encode()), Ok(Some(verify.differing)));
            proptest::prop_assert_eq!(parse_changed_bytes(&ChangedBytes(changed).encode()), Ok(changed));
        }
    }

    #[test]
    fn controller_generations_cross_to_vmha_fs_as_32_digits() {
        let id = crate::generation::GenerationId(0xab);
        let theirs = ::vmha_fs::status::GenerationId::from(id);
        assert_eq!(theirs.as_str(), id.to_string());
        assert_eq!(generation_id(Some(&id.to_string())), Ok(Some(theirs)));
        assert!(generation_id(Some("not hex")).is_err());
        assert!(same_generation(None, None));
    }

    #[test]
    fn generation_file_is_written() {
        let dir = tempfile::tempdir().unwrap();
        write_generation(dir.path(), &GenerationId::try_from("00AB").unwrap()).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("generation")).unwrap(),
            "00ab\n"
        );
    }
}
