//! `vmhad` as a child process (fake drivers) for the tests that run the real
//! binary: one configuration template and one process guard, so that the
//! tests differ only in what they test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use vmha_controller::control::{Client, Request, Response};

/// A node's `vmha.toml`: two nodes, one module `vm1`, fast heartbeats (50 ms,
/// failover after 400 ms), state directory and control socket in `dir`.
pub struct NodeConfig<'a> {
    /// The cluster's name (also names the module's replicated directory).
    pub cluster: &'a str,
    /// Where `vmha.toml`, `state/` and `vmhad.sock` go.
    pub dir: &'a Path,
    pub key: &'a Path,
    pub heartbeat_port: u16,
    pub channel_port: Option<u16>,
    /// The addresses of node1 and node2.
    pub addresses: [&'a str; 2],
    /// More lines in `[cluster]`.
    pub cluster_extra: &'a str,
    /// More lines in the module's section.
    pub module_extra: &'a str,
    /// Sections after the module (`[web]`, ...).
    pub sections: &'a str,
}

impl<'a> NodeConfig<'a> {
    /// A pair on 127.0.0.1 / 127.0.0.2 with nothing extra.
    pub fn new(cluster: &'a str, dir: &'a Path, key: &'a Path, heartbeat_port: u16) -> Self {
        NodeConfig {
            cluster,
            dir,
            key,
            heartbeat_port,
            channel_port: None,
            addresses: ["127.0.0.1", "127.0.0.2"],
            cluster_extra: "",
            module_extra: "",
            sections: "",
        }
    }

    /// Writes `dir/vmha.toml` (creating `dir`) and returns its path.
    pub fn write(&self) -> PathBuf {
        std::fs::create_dir_all(self.dir).unwrap();
        let channel = self
            .channel_port
            .map(|p| format!("channel_port = {p}\n"))
            .unwrap_or_default();
        let text = format!(
            r#"
[cluster]
name = "{cluster}"
key_file = "{key}"
state_dir = "{state}"
control_socket = "{socket}"
heartbeat_port = {hb}
{channel}heartbeat_interval_ms = 50
failover_timeout_ms = 400
start_wait_ms = 200
{cluster_extra}

[[node]]
name = "node1"
addresses = ["{a1}"]

[[node]]
name = "node2"
addresses = ["{a2}"]

[[module]]
name = "vm1"
replicated = ["/srv/{cluster}/vm1"]
port = 7101
lock_timeout_ms = 1000
{module_extra}
{sections}
"#,
            cluster = self.cluster,
            key = self.key.display(),
            state = self.dir.join("state").display(),
            socket = self.dir.join("vmhad.sock").display(),
            hb = self.heartbeat_port,
            cluster_extra = self.cluster_extra,
            a1 = self.addresses[0],
            a2 = self.addresses[1],
            module_extra = self.module_extra,
            sections = self.sections,
        );
        let path = self.dir.join("vmha.toml");
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// A `vmhad --fake-drivers` child; stopped on drop (SIGTERM, SIGKILL after
/// 10 s) and waited for, so nothing outlives the test's directory.
pub struct Vmhad {
    child: Child,
    config: PathBuf,
    log: PathBuf,
}

impl Vmhad {
    /// `vmhad --config CONFIG --node NODE --fake-drivers` with `env`, its
    /// stderr in `vmhad.log` beside the configuration.
    pub fn spawn(config: &Path, node: &str, env: &[(&str, &str)]) -> Vmhad {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmhad"));
        cmd.arg("--config")
            .arg(config)
            .args(["--node", node, "--fake-drivers"]);
        Self::spawn_command(cmd, config, env)
    }

    /// `cmd` (a vmhad command line, possibly wrapped) with `env`, its stderr
    /// in `vmhad.log` beside `config`.
    pub fn spawn_command(mut cmd: Command, config: &Path, env: &[(&str, &str)]) -> Vmhad {
        let log = config.with_file_name("vmhad.log");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        Vmhad {
            child: cmd.spawn().unwrap(),
            config: config.to_path_buf(),
            log,
        }
    }

    /// Its configuration file.
    pub fn config(&self) -> &Path {
        &self.config
    }

    /// Takes over `child`, a vmhad started by the test itself (its stderr
    /// meant to be in `vmhad.log` beside `config`).
    pub fn adopt(child: Child, config: &Path) -> Vmhad {
        Vmhad {
            child,
            config: config.to_path_buf(),
            log: config.with_file_name("vmhad.log"),
        }
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let pid = rustix::process::Pid::from_raw(i32::try_from(self.child.id()).unwrap()).unwrap();
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Vmhad {
    fn drop(&mut self) {
        if self.terminate(Duration::from_secs(10)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One request to the control socket at `socket` (None if it does not answer).
pub fn call(socket: &Path, request: &Request) -> Option<Response> {
    Client::connect(socket).ok()?.call(request).ok()
}
