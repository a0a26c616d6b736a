//! Child processes owned by the benchmark: output logged to a file, stopped
//! by PID (SIGTERM, then SIGKILL) when dropped.

use crate::interrupt;
use anyhow::{bail, Context, Result};
use rustix::process::{kill_process, kill_process_group, test_kill_process_group, Pid, Signal};
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

/// Removes ANSI escape sequences (tracing colours its stderr output).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters... final byte in '@'..='~'.
            if chars.next() == Some('[') {
                for f in chars.by_ref() {
                    if ('@'..='~').contains(&f) {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
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

    /// The last lines of the log, for error messages (colours stripped).
    pub fn log_tail(&self, lines: usize) -> String {
        let text = strip_ansi(&std::fs::read_to_string(&self.log).unwrap_or_default());
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

    /// Gives the log pumps a moment to copy the last lines after an exit.
    /// Not a plain join: a grandchild holding the pipes must not block us.
    pub fn settle_readers(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline && !self.readers.iter().all(|r| r.is_finished()) {
            thread::sleep(Duration::from_millis(10));
        }
        self.readers.retain(|r| !r.is_finished());
    }

    /// Errors if the child has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        if let Some(st) = self.try_status()? {
            self.settle_readers();
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

    /// SIGKILLs the child's whole process group (fio forks its jobs, which
    /// would otherwise live on as orphans) and waits until every member is
    /// gone. Errors if some survive: they are stuck in the kernel, e.g. in a
    /// FUSE request nobody answers.
    pub fn kill_group(&mut self) -> Result<()> {
        let pgid = Pid::from_child(&self.child);
        // The group outlives a reaped leader, so always signal it.
        let _ = kill_process_group(pgid, Signal::KILL);
        let _ = self.wait_timeout(KILL_WAIT)?;
        let deadline = Instant::now() + KILL_WAIT;
        while test_kill_process_group(pgid).is_ok() {
            if Instant::now() > deadline {
                bail!("{}: process group survives SIGKILL", self.name);
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(())
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
        if let Err(e) = self.stop(STOP_GRACE) {
            eprintln!("vmha-bench: stopping {}: {e:#}", self.name);
        }
        self.settle_readers();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_colours() {
        let line = "\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m secondary ready";
        assert_eq!(strip_ansi(line), "2026  INFO secondary ready");
    }
}
