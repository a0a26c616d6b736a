//! A real [`FsDriver`]: one `vmha-fs` child per replicated directory.
//!
//! Choices where the design is silent:
//! - Directory `i` of a module uses replication port `port + i` (most modules
//!   have one directory, which uses `port`).
//! - The writer runs `vmha-fs primary --mount DIR --backing DIR` (mounted over),
//!   the receiver `vmha-fs secondary` listening on the local address of the
//!   module's `replication_network`; vmha-fs state lives in
//!   `<state_dir>/<module>/fs<i>`.
//! - Children are kept and stopped by PID with SIGTERM (vmha-fs unmounts on
//!   it), SIGKILL after [`STOP_TIMEOUT`].
//! - Resync is not implemented by vmha-fs yet: `start_resync` reports
//!   [`DriverError::Unsupported`], so a receiver never counts itself up to date
//!   (safe: no automatic failover to it) until vmha-fs provides one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{DriverError, FsDriver, FsHealth, ResyncState};
use crate::config::{Config, Module, NodeIndex};

/// How long a child gets between SIGTERM and SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a writer may take to mount.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Running {
    writer: bool,
    children: Vec<(PathBuf, Child)>,
}

/// Spawns the `vmha-fs` binary.
#[derive(Debug)]
pub struct VmhaFsDriver {
    binary: PathBuf,
    config: Config,
    local: NodeIndex,
    running: Mutex<HashMap<String, Running>>,
}

impl VmhaFsDriver {
    pub fn new(binary: PathBuf, config: Config, local: NodeIndex) -> VmhaFsDriver {
        VmhaFsDriver {
            binary,
            config,
            local,
            running: Mutex::new(HashMap::new()),
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

    fn spawn(&self, module: &Module, writer: bool) -> Result<(), DriverError> {
        self.unmount(module)?;
        let mut children = Vec::new();
        let result = (|| {
            for (i, dir) in module.replicated.iter().enumerate() {
                let state = self.state_dir(module, i);
                std::fs::create_dir_all(&state)
                    .map_err(|e| DriverError::failed(format!("mkdir {}", state.display()), e))?;
                let mut cmd = Command::new(&self.binary);
                if writer {
                    cmd.arg("primary")
                        .arg("--backing")
                        .arg(dir)
                        .arg("--mount")
                        .arg(dir)
                        .arg("--peer")
                        .arg(self.address(self.local.peer(), module, i)?.to_string())
                        .arg("--lock-timeout-ms")
                        .arg(module.lock_timeout_ms.to_string());
                } else {
                    cmd.arg("secondary")
                        .arg("--backing")
                        .arg(dir)
                        .arg("--listen")
                        .arg(self.address(self.local, module, i)?.to_string());
                }
                cmd.arg("--state")
                    .arg(&state)
                    .arg("--key-file")
                    .arg(&self.config.cluster.key_file)
                    .stdin(Stdio::null());
                let child = cmd.spawn().map_err(|e| {
                    DriverError::failed(format!("spawn {}", self.binary.display()), e)
                })?;
                children.push((dir.clone(), child));
                let last = children
                    .last_mut()
                    .ok_or_else(|| DriverError::failed("spawn", "lost child"))?;
                wait_ready(&mut last.1, &last.0, writer)?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            for (_, child) in &mut children {
                terminate(child);
            }
            return Err(e);
        }
        self.lock()
            .insert(module.name.clone(), Running { writer, children });
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        self.running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn is_fuse_mount(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let dir = dir.to_string_lossy();
    text.lines().any(|line| {
        let mut fields = line.split(' ');
        let mount_point = fields.nth(4);
        mount_point == Some(&*dir) && line.contains(" - fuse")
    })
}

fn wait_ready(child: &mut Child, dir: &Path, writer: bool) -> Result<(), DriverError> {
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

/// SIGTERM, bounded wait, SIGKILL.
fn terminate(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let pid = i32::try_from(child.id())
        .ok()
        .and_then(rustix::process::Pid::from_raw);
    if let Some(pid) = pid {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl FsDriver for VmhaFsDriver {
    fn mount_writer(&self, module: &Module) -> Result<(), DriverError> {
        self.spawn(module, true)
    }

    fn mount_receiver(&self, module: &Module) -> Result<(), DriverError> {
        self.spawn(module, false)
    }

    fn unmount(&self, module: &Module) -> Result<(), DriverError> {
        let running = self.lock().remove(&module.name);
        if let Some(mut running) = running {
            for (_, child) in &mut running.children {
                terminate(child);
            }
        }
        Ok(())
    }

    fn health(&self, module: &Module) -> FsHealth {
        let mut all = self.lock();
        let Some(running) = all.get_mut(&module.name) else {
            return FsHealth::Idle;
        };
        for (dir, child) in &mut running.children {
            match child.try_wait() {
                Ok(None) => {}
                Ok(Some(status)) => {
                    return FsHealth::Failed(format!(
                        "vmha-fs for {} exited: {status}",
                        dir.display()
                    ))
                }
                Err(e) => return FsHealth::Failed(e.to_string()),
            }
            if running.writer && !is_fuse_mount(dir) {
                return FsHealth::Failed(format!("{} is no longer mounted", dir.display()));
            }
        }
        FsHealth::Healthy
    }

    fn start_resync(&self, _module: &Module, _full: bool) -> Result<(), DriverError> {
        Err(DriverError::Unsupported("resync".to_string()))
    }

    fn resync_state(&self, _module: &Module) -> Result<ResyncState, DriverError> {
        Ok(ResyncState::Idle)
    }
}

impl Drop for VmhaFsDriver {
    fn drop(&mut self) {
        let mut all = self.lock();
        for (_, mut running) in all.drain() {
            for (_, child) in &mut running.children {
                terminate(child);
            }
        }
    }
}
