//! Child processes owned by the benchmark: output logged to a file, stopped
//! by PID (SIGTERM, then SIGKILL) when dropped.

use crate::interrupt;
use anyhow::{bail, Context, Result};
use rustix::process::{kill_process, Pid, Signal};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long a child gets to exit after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(15);
/// How long to wait for a SIGKILLed child to be reaped.
pub const KILL_WAIT: Duration = Duration::from_secs(10);

/// A running child. Dropping it stops it.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    ready: Receiver<()>,
    readers: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

/// Copies one output stream into the shared log, line by line, and reports
/// lines containing "ready".
fn pump(stream: impl Read, log: Arc<Mutex<File>>, ready: Sender<()>) {
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { break };
        if let Ok(mut f) = log.lock() {
            let _ = writeln!(f, "{line}");
        }
        if line.contains("ready") {
            let _ = ready.send(());
        }
    }
}

impl Proc {
    /// Starts `cmd` with stdout and stderr going to `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Self> {
        let file = Arc::new(Mutex::new(
            File::create(log).with_context(|| format!("create {}", log.display()))?,
        ));
        // Own process group: a Ctrl-C at the terminal reaches only us, and we
        // stop the children in order (primary before secondary, then unmount).
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("start {name}: {cmd:?}"))?;
        let (tx, rx) = mpsc::channel();
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            let (f, tx) = (file.clone(), tx.clone());
            readers.push(thread::spawn(move || pump(out, f, tx)));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(thread::spawn(move || pump(err, file, tx)));
        }
        Ok(Self {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
            ready: rx,
            readers,
            status: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The last lines of the log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let from = all.len().saturating_sub(lines);
        all[from..].join("\n")
    }

    /// Exit status if the child has exited.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait().context("waitpid")?;
        }
        Ok(self.status)
    }

    /// Errors if the child has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        if let Some(st) = self.try_status()? {
            bail!(
                "{} exited unexpectedly ({st}); log tail:\n{}",
                self.name,
                self.log_tail(20)
            );
        }
        Ok(())
    }

    /// Waits for an output line containing "ready".
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.ready.recv_timeout(Duration::from_millis(100)) {
                Ok(()) => return Ok(()),
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {}
            }
            self.ensure_running()?;
            interrupt::check()?;
            if Instant::now() > deadline {
                bail!(
                    "{} not ready after {timeout:?}; log tail:\n{}",
                    self.name,
                    self.log_tail(20)
                );
            }
        }
    }

    /// Waits for exit up to `timeout`; `None` if still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_status()? {
                return Ok(Some(st));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal by PID, unless the child was already reaped.
    pub fn signal(&mut self, sig: Signal) -> Result<()> {
        if self.try_status()?.is_none() {
            kill_process(Pid::from_child(&self.child), sig)
                .with_context(|| format!("kill {} ({sig:?})", self.name))?;
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL after `grace`. Returns the exit status and
    /// whether SIGKILL was needed.
    pub fn stop(&mut self, grace: Duration) -> Result<(ExitStatus, bool)> {
        if let Some(st) = self.try_status()? {
            return Ok((st, false));
        }
        self.signal(Signal::TERM)?;
        if let Some(st) = self.wait_timeout(grace)? {
            return Ok((st, false));
        }
        Ok((self.kill()?, true))
    }

    /// Kills without grace (the child is hung or we are aborting). Bounded:
    /// a process stuck in a FUSE request may not die until the FUSE daemon
    /// does, and we must not block forever on it.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        self.signal(Signal::KILL)?;
        match self.wait_timeout(KILL_WAIT)? {
            Some(st) => Ok(st),
            None => bail!("{} did not die within {KILL_WAIT:?} of SIGKILL", self.name),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        match self.stop(STOP_GRACE) {
            // Readers end once the child's pipes close.
            Ok(_) => {
                for r in self.readers.drain(..) {
                    let _ = r.join();
                }
            }
            Err(e) => eprintln!("vmha-bench: stopping {}: {e:#}", self.name),
        }
    }
}
