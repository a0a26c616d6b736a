//! A guard around a spawned process: stderr captured line by line (and forwarded
//! to ours with a prefix), readiness detection, bounded termination, kill on drop.
//! Processes are only ever signalled by their own PID, never by name.

use std::io::{BufRead, BufReader};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

#[derive(Debug, Default)]
struct Captured {
    lines: Vec<String>,
    eof: bool,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<Captured>,
    cond: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Captured> {
        // A poisoned lock only means a forwarding thread panicked; the data is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A child process owned by a test. Dropping it SIGKILLs (by PID) and reaps it.
#[derive(Debug)]
pub struct Child {
    name: String,
    child: std::process::Child,
    status: Option<ExitStatus>,
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
}

/// True if `line` contains `word` (ASCII case-insensitive) delimited by
/// non-alphanumeric characters (so "already" does not count as "ready", nor a pid
/// as part of a longer number).
pub fn contains_word(line: &str, word: &str) -> bool {
    let lower = line.to_ascii_lowercase();
    let word = word.to_ascii_lowercase();
    lower.match_indices(&word).any(|(i, _)| {
        let before = lower[..i].chars().next_back();
        let after = lower[i + word.len()..].chars().next();
        !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
            && !after.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

impl Child {
    /// Spawns `cmd` with stdin from /dev/null, stdout inherited and stderr captured.
    /// `name` prefixes the forwarded stderr lines.
    pub fn spawn(name: &str, mut cmd: Command) -> Result<Self> {
        cmd.stdin(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {name}: {cmd:?}"))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| anyhow!("{name}: no stderr pipe"))?;
        let shared = Arc::new(Shared::default());
        let reader = {
            let shared = Arc::clone(&shared);
            let prefix = format!("[{name} {}]", child.id());
            std::thread::Builder::new()
                .name(format!("stderr-{name}"))
                .spawn(move || {
                    let mut r = BufReader::new(stderr);
                    let mut buf = Vec::new();
                    loop {
                        buf.clear();
                        match r.read_until(b'\n', &mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {
                                let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                                eprintln!("{prefix} {line}");
                                shared.lock().lines.push(line);
                                shared.cond.notify_all();
                            }
                        }
                    }
                    shared.lock().eof = true;
                    shared.cond.notify_all();
                })
                .context("spawning the stderr thread")?
        };
        Ok(Self {
            name: name.to_string(),
            child,
            status: None,
            shared,
            reader: Some(reader),
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// All stderr lines captured so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.shared.lock().lines.clone()
    }

    /// Captured stderr joined with newlines.
    pub fn stderr_text(&self) -> String {
        self.stderr_lines().join("\n")
    }

    /// Exit status if the process has exited (reaps it).
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait().context("try_wait")?;
        }
        Ok(self.status)
    }

    /// Waits until a stderr line contains the word `ready`. Fails with the captured
    /// stderr if the process exits first or `timeout` passes.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut seen = 0;
        loop {
            {
                let st = self.shared.lock();
                if st.lines[seen..].iter().any(|l| contains_word(l, "ready")) {
                    return Ok(());
                }
                seen = st.lines.len();
            }
            if let Some(status) = self.try_status()? {
                // Let the reader drain what the process wrote before exiting.
                self.wait_stderr_eof(Duration::from_secs(2));
                let st = self.shared.lock();
                if st.lines.iter().any(|l| contains_word(l, "ready")) {
                    bail!(
                        "{} printed ready but exited ({status}); stderr:\n{}",
                        self.name,
                        st.lines.join("\n")
                    );
                }
                bail!(
                    "{} exited ({status}) before it was ready; stderr:\n{}",
                    self.name,
                    st.lines.join("\n")
                );
            }
            let now = Instant::now();
            if now >= deadline {
                bail!(
                    "{} not ready after {timeout:?}; stderr:\n{}",
                    self.name,
                    self.stderr_text()
                );
            }
            let st = self.shared.lock();
            if st.lines.len() == seen && !st.eof {
                let slice = (deadline - now).min(Duration::from_millis(50));
                drop(self.shared.cond.wait_timeout(st, slice));
            } else if st.eof {
                drop(st);
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    fn wait_stderr_eof(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        while !st.eof {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            st = match self.shared.cond.wait_timeout(st, deadline - now) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
    }

    /// Waits at most `timeout` for the process to exit on its own. On timeout the
    /// process is SIGKILLed and an error returned.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_status()? {
                self.wait_stderr_eof(Duration::from_secs(2));
                return Ok(s);
            }
            if Instant::now() >= deadline {
                self.kill()?;
                bail!(
                    "{} did not exit within {timeout:?} (killed); stderr:\n{}",
                    self.name,
                    self.stderr_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `sig` by PID (e.g. SIGSTOP / SIGCONT to freeze a process). No-op once
    /// the process has been reaped.
    pub fn send_signal(&mut self, sig: libc::c_int) -> Result<()> {
        if self.try_status()?.is_some() {
            return Ok(());
        }
        self.signal(sig)
    }

    fn signal(&self, sig: libc::c_int) -> Result<()> {
        let pid = libc::pid_t::try_from(self.child.id()).context("pid out of range")?;
        // SAFETY: plain syscall; the pid is our own unreaped child, so it cannot have
        // been reused by another process.
        let r = unsafe { libc::kill(pid, sig) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(e).with_context(|| format!("kill({pid}, {sig})"));
            }
        }
        Ok(())
    }

    /// SIGKILL by PID and reap. No-op if already exited.
    pub fn kill(&mut self) -> Result<()> {
        if self.try_status()?.is_some() {
            return Ok(());
        }
        self.signal(libc::SIGKILL)?;
        self.status = Some(self.child.wait().context("wait after SIGKILL")?);
        Ok(())
    }

    /// Sends SIGTERM (no wait).
    pub fn sigterm(&mut self) -> Result<()> {
        if self.try_status()?.is_some() {
            return Ok(());
        }
        self.signal(libc::SIGTERM)
    }

    /// SIGTERM, wait up to `timeout`, then SIGKILL. Returns the exit status and
    /// whether the process had to be killed.
    pub fn terminate(&mut self, timeout: Duration) -> Result<(ExitStatus, bool)> {
        if let Some(s) = self.try_status()? {
            return Ok((s, false));
        }
        self.signal(libc::SIGTERM)?;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.try_status()? {
                self.wait_stderr_eof(Duration::from_secs(2));
                return Ok((s, false));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill()?;
        let s = self
            .status
            .ok_or_else(|| anyhow!("{}: no status after kill", self.name))?;
        Ok((s, true))
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            eprintln!("[{}] kill on drop failed: {e:#}", self.name);
        }
        // The reader ends at EOF; only join if it already has (a grandchild could
        // keep the pipe open, and a drop must never hang).
        if self.shared.lock().eof {
            if let Some(r) = self.reader.take() {
                let _ = r.join();
            }
        }
    }
}

/// `text` without terminal colour sequences (`ESC [ … m`).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_match() {
        assert!(contains_word(
            "INFO secondary ready on 127.0.0.1:5",
            "ready"
        ));
        assert!(contains_word("ready", "ready"));
        assert!(contains_word("mount ready.", "ready"));
        assert!(!contains_word("error: /x is already mounted", "ready"));
        assert!(!contains_word("not_ready", "ready"));
    }

    #[test]
    fn ready_and_exit() -> Result<()> {
        let mut c = Command::new("sh");
        c.args(["-c", "echo starting >&2; echo 'now READY' >&2; sleep 30"]);
        let mut ch = Child::spawn("sh", c)?;
        ch.wait_ready(Duration::from_secs(5))?;
        let (st, killed) = ch.terminate(Duration::from_secs(5))?;
        assert!(!killed);
        assert!(!st.success());
        Ok(())
    }

    #[test]
    fn exit_before_ready_is_error() -> Result<()> {
        let mut c = Command::new("sh");
        c.args(["-c", "echo 'boom: already mounted' >&2; exit 3"]);
        let mut ch = Child::spawn("sh", c)?;
        let e = ch
            .wait_ready(Duration::from_secs(5))
            .err()
            .ok_or_else(|| anyhow!("expected an error"))?;
        assert!(format!("{e:#}").contains("already mounted"), "{e:#}");
        Ok(())
    }

    #[test]
    fn ready_timeout() -> Result<()> {
        let mut c = Command::new("sleep");
        c.arg("30");
        let mut ch = Child::spawn("sleep", c)?;
        assert!(ch.wait_ready(Duration::from_millis(200)).is_err());
        ch.kill()?;
        assert!(ch.try_status()?.is_some());
        Ok(())
    }
}
