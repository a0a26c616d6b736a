//! The one guard around a spawned process, for the tests and the benchmarks: output
//! captured line by line, readiness detection (a `ready` line), bounded termination,
//! stop on drop. Processes are only ever signalled by their own PID (or, with
//! [`SpawnOptions::own_process_group`], by the process group they lead), never by
//! name.
//!
//! Two output modes, because the two users need different things:
//! - default ([`Child::spawn`]): stdout inherited, stderr captured in memory and
//!   forwarded to ours with a `[name pid]` prefix, so a failing test shows the
//!   daemon's log next to its own;
//! - [`SpawnOptions::log_file`]: stdout and stderr written to a file (a benchmark's
//!   daemons log for hours and their output would drown the progress lines), still
//!   captured so readiness and errors work the same; error messages then quote the
//!   file's last lines ([`Child::log_tail`]).
//!
//! The benchmarks also need a child in its own process group (Ctrl-C at the terminal
//! reaches only the benchmark, which stops its children in order, and fio's forked
//! jobs can be killed with their parent: [`Child::kill_group`]), a bounded wait after
//! SIGKILL (a process stuck in a FUSE request may not die until its daemon does),
//! SIGTERM-then-SIGKILL on drop (daemons unmount on SIGTERM), and an interruption
//! check while waiting for `ready` (their own SIGINT flag). All of it is opt-in
//! through [`SpawnOptions`]; [`Child::spawn`] behaves as it always did.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rustix::process::{kill_process_group, test_kill_process_group, Pid, Signal};

/// How long [`Child::kill_group`] waits for the group to vanish when
/// [`SpawnOptions::kill_wait`] is not set.
pub const DEFAULT_KILL_WAIT: Duration = Duration::from_secs(10);
/// How many log lines the error messages of a [`SpawnOptions::log_file`] child quote.
const ERROR_TAIL_LINES: usize = 20;

#[derive(Debug, Default)]
struct Captured {
    lines: Vec<String>,
    /// Every output stream has reached EOF.
    eof: bool,
    /// Output streams not at EOF yet.
    open: usize,
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

/// A function [`Child::wait_ready`] calls while it waits; an error from it ends the
/// wait with that error (e.g. "interrupted by signal").
pub type InterruptCheck = fn() -> Result<()>;

/// How [`Child::spawn_with`] starts and stops a process. `SpawnOptions::default()`
/// is what [`Child::spawn`] does.
#[derive(Debug, Clone, Default)]
pub struct SpawnOptions {
    log_file: Option<PathBuf>,
    own_process_group: bool,
    kill_wait: Option<Duration>,
    stop_grace_on_drop: Option<Duration>,
    interrupt: Option<InterruptCheck>,
}

impl SpawnOptions {
    /// The defaults: see [`Child::spawn`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Write stdout and stderr (line by line, as printed) to `path` (created or
    /// truncated) instead of inheriting stdout and forwarding stderr. The lines are
    /// still captured ([`Child::stderr_lines`] then holds stdout's lines too).
    pub fn log_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.log_file = Some(path.into());
        self
    }

    /// Start the process as the leader of a new process group: a Ctrl-C at the
    /// terminal does not reach it, and [`Child::kill_group`] can kill what it forked.
    pub fn own_process_group(mut self) -> Self {
        self.own_process_group = true;
        self
    }

    /// Wait at most `limit` for the process to die after SIGKILL (then
    /// [`Child::kill`] and [`Child::terminate`] fail instead of blocking; the process
    /// stays unreaped). Default: wait as long as it takes.
    pub fn kill_wait(mut self, limit: Duration) -> Self {
        self.kill_wait = Some(limit);
        self
    }

    /// On drop, SIGTERM and wait up to `grace` before SIGKILL (as
    /// [`Child::terminate`]), instead of SIGKILL at once.
    pub fn stop_on_drop(mut self, grace: Duration) -> Self {
        self.stop_grace_on_drop = Some(grace);
        self
    }

    /// Call `check` while [`Child::wait_ready`] waits; its error ends the wait.
    pub fn interrupt_check(mut self, check: InterruptCheck) -> Self {
        self.interrupt = Some(check);
        self
    }
}

/// A child process owned by a test or benchmark. Dropping it SIGKILLs (by PID) and
/// reaps it (or stops it gracefully: [`SpawnOptions::stop_on_drop`]).
#[derive(Debug)]
pub struct Child {
    name: String,
    child: std::process::Child,
    status: Option<ExitStatus>,
    shared: Arc<Shared>,
    readers: Vec<JoinHandle<()>>,
    // Boxed: a `Child` stays small in the enums and structs that hold one.
    opts: Box<SpawnOptions>,
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

/// Whether an output line announces readiness (colour codes ignored).
fn is_ready_line(line: &str) -> bool {
    contains_word(&strip_ansi(line), "ready")
}

/// Where a reader thread puts each line besides the capture.
struct Sink {
    /// Forward to our stderr with this prefix.
    forward: Option<String>,
    log: Option<Arc<Mutex<File>>>,
}

/// Copies one output stream line by line into the capture (and the sink) until EOF.
fn pump(stream: impl Read, sink: Sink, shared: Arc<Shared>) {
    let mut r = BufReader::new(stream);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                if let Some(prefix) = &sink.forward {
                    eprintln!("{prefix} {line}");
                }
                if let Some(log) = &sink.log {
                    // A poisoned lock only means another pump panicked mid-line.
                    let mut f = log.lock().unwrap_or_else(|e| e.into_inner());
                    let _ = writeln!(f, "{line}");
                }
                shared.lock().lines.push(line);
                shared.cond.notify_all();
            }
        }
    }
    let mut st = shared.lock();
    st.open = st.open.saturating_sub(1);
    st.eof = st.open == 0;
    drop(st);
    shared.cond.notify_all();
}

impl Child {
    /// Spawns `cmd` with stdin from /dev/null, stdout inherited and stderr captured.
    /// `name` prefixes the forwarded stderr lines.
    pub fn spawn(name: &str, cmd: Command) -> Result<Self> {
        Self::spawn_with(name, cmd, SpawnOptions::default())
    }

    /// Spawns `cmd` (stdin from /dev/null) as `opts` says.
    pub fn spawn_with(name: &str, mut cmd: Command, opts: SpawnOptions) -> Result<Self> {
        cmd.stdin(Stdio::null()).stderr(Stdio::piped());
        let log = match &opts.log_file {
            Some(path) => {
                cmd.stdout(Stdio::piped());
                let f = File::create(path).with_context(|| format!("create {}", path.display()))?;
                Some(Arc::new(Mutex::new(f)))
            }
            None => None,
        };
        if opts.own_process_group {
            cmd.process_group(0);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {name}: {cmd:?}"))?;
        let shared = Arc::new(Shared::default());
        let forward = log.is_none().then(|| format!("[{name} {}]", child.id()));
        let mut streams: Vec<(&str, Box<dyn Read + Send>)> = Vec::new();
        if log.is_some() {
            let stdout = child
                .stdout
                .take()
                .ok_or_else(|| anyhow!("{name}: no stdout pipe"))?;
            streams.push(("stdout", Box::new(stdout)));
        }
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| anyhow!("{name}: no stderr pipe"))?;
        streams.push(("stderr", Box::new(stderr)));
        shared.lock().open = streams.len();
        let mut me = Self {
            name: name.to_string(),
            child,
            status: None,
            shared,
            readers: Vec::new(),
            opts: Box::new(opts),
        };
        for (what, stream) in streams {
            let sink = Sink {
                forward: forward.clone(),
                log: log.clone(),
            };
            let shared = Arc::clone(&me.shared);
            let reader = std::thread::Builder::new()
                .name(format!("{what}-{name}"))
                .spawn(move || pump(stream, sink, shared))
                .with_context(|| format!("spawning the {what} thread"))?;
            me.readers.push(reader);
        }
        Ok(me)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// All stderr lines captured so far (with [`SpawnOptions::log_file`]: stdout's
    /// lines too, interleaved as they arrived).
    pub fn stderr_lines(&self) -> Vec<String> {
        self.shared.lock().lines.clone()
    }

    /// Captured stderr joined with newlines.
    pub fn stderr_text(&self) -> String {
        self.stderr_lines().join("\n")
    }

    /// The file the output goes to ([`SpawnOptions::log_file`]).
    pub fn log_path(&self) -> Option<&Path> {
        self.opts.log_file.as_deref()
    }

    /// The last `lines` lines of the output, colour codes removed: of the log file
    /// with [`SpawnOptions::log_file`], else of the captured stderr.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = match self.log_path() {
            Some(p) => std::fs::read_to_string(p).unwrap_or_default(),
            None => self.stderr_text(),
        };
        let text = strip_ansi(&text);
        let all: Vec<&str> = text.lines().collect();
        let from = all.len().saturating_sub(lines);
        all[from..].join("\n")
    }

    /// The output to quote in an error: all captured stderr, or the log's tail.
    fn output_for_error(&self) -> String {
        if self.opts.log_file.is_some() {
            format!("log tail:\n{}", self.log_tail(ERROR_TAIL_LINES))
        } else {
            format!("stderr:\n{}", self.stderr_text())
        }
    }

    /// Exit status if the process has exited (reaps it).
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait().context("try_wait")?;
        }
        Ok(self.status)
    }

    /// Errors (quoting the output) if the process has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        if let Some(st) = self.try_status()? {
            self.wait_stderr_eof(Duration::from_secs(1));
            bail!(
                "{} exited unexpectedly ({st}); {}",
                self.name,
                self.output_for_error()
            );
        }
        Ok(())
    }

    /// Waits until an output line contains the word `ready`. Fails with the captured
    /// output if the process exits first, `timeout` passes or the
    /// [`SpawnOptions::interrupt_check`] fails.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut seen = 0;
        loop {
            {
                let st = self.shared.lock();
                if st.lines[seen..].iter().any(|l| is_ready_line(l)) {
                    return Ok(());
                }
                seen = st.lines.len();
            }
            if let Some(status) = self.try_status()? {
                // Let the reader drain what the process wrote before exiting.
                self.wait_stderr_eof(Duration::from_secs(2));
                let printed_ready = self.shared.lock().lines.iter().any(|l| is_ready_line(l));
                if printed_ready {
                    bail!(
                        "{} printed ready but exited ({status}); {}",
                        self.name,
                        self.output_for_error()
                    );
                }
                bail!(
                    "{} exited ({status}) before it was ready; {}",
                    self.name,
                    self.output_for_error()
                );
            }
            if let Some(check) = self.opts.interrupt {
                check()?;
            }
            let now = Instant::now();
            if now >= deadline {
                bail!(
                    "{} not ready after {timeout:?}; {}",
                    self.name,
                    self.output_for_error()
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

    /// Polls for the exit up to `timeout`; `None` if still running.
    fn poll_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_status()? {
                return Ok(Some(s));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits at most `timeout` for the process to exit on its own; `None` (and the
    /// process left running) if it has not. After an exit, gives the output readers
    /// a moment to copy the last lines.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let st = self.poll_exit(timeout)?;
        if st.is_some() {
            self.wait_stderr_eof(Duration::from_secs(1));
        }
        Ok(st)
    }

    /// Waits at most `timeout` for the process to exit on its own. On timeout the
    /// process is SIGKILLed and an error returned.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        if let Some(s) = self.poll_exit(timeout)? {
            self.wait_stderr_eof(Duration::from_secs(2));
            return Ok(s);
        }
        self.kill()?;
        bail!(
            "{} did not exit within {timeout:?} (killed); {}",
            self.name,
            self.output_for_error()
        );
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

    /// SIGKILL by PID and reap. No-op if already exited. With
    /// [`SpawnOptions::kill_wait`], fails if the process is not dead within it.
    pub fn kill(&mut self) -> Result<()> {
        if self.try_status()?.is_some() {
            return Ok(());
        }
        self.signal(libc::SIGKILL)?;
        match self.opts.kill_wait {
            None => self.status = Some(self.child.wait().context("wait after SIGKILL")?),
            Some(limit) => {
                if self.poll_exit(limit)?.is_none() {
                    bail!("{} did not die within {limit:?} of SIGKILL", self.name);
                }
            }
        }
        Ok(())
    }

    /// SIGKILLs the whole process group this child leads (fio forks its jobs, which
    /// would otherwise live on as orphans) and waits until every member is gone.
    /// Errors if some survive (they are stuck in the kernel, e.g. in a FUSE request
    /// nobody answers), or if the child was not spawned with
    /// [`SpawnOptions::own_process_group`] (its group is ours).
    pub fn kill_group(&mut self) -> Result<()> {
        if !self.opts.own_process_group {
            bail!(
                "{}: not spawned in its own process group; refusing to kill the group",
                self.name
            );
        }
        let limit = self.opts.kill_wait.unwrap_or(DEFAULT_KILL_WAIT);
        let pgid = Pid::from_child(&self.child);
        // The group outlives a reaped leader, so always signal it.
        let _ = kill_process_group(pgid, Signal::KILL);
        let _ = self.poll_exit(limit)?;
        let deadline = Instant::now() + limit;
        while test_kill_process_group(pgid).is_ok() {
            if Instant::now() > deadline {
                bail!("{}: process group survives SIGKILL", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
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
        if let Some(s) = self.poll_exit(timeout)? {
            self.wait_stderr_eof(Duration::from_secs(2));
            return Ok((s, false));
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
        let stopped = match self.opts.stop_grace_on_drop {
            Some(grace) => self.terminate(grace).map(drop),
            None => self.kill(),
        };
        if let Err(e) = stopped {
            eprintln!("[{}] stopping on drop failed: {e:#}", self.name);
        }
        // The readers end at EOF; only join if they already have (a grandchild could
        // keep the pipe open, and a drop must never hang).
        if self.shared.lock().eof {
            for r in self.readers.drain(..) {
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
    fn strips_colours() {
        let line = "\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m secondary ready";
        assert_eq!(strip_ansi(line), "2026  INFO secondary ready");
        assert!(is_ready_line("\u{1b}[1mready\u{1b}[0m"));
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

    #[test]
    fn log_file_gets_both_streams_and_ready_on_stdout_counts() -> Result<()> {
        let d = tempfile::tempdir()?;
        let log = d.path().join("x.log");
        let mut c = Command::new("sh");
        c.args([
            "-c",
            "echo 'to stderr' >&2; printf '\\033[32mINFO\\033[0m out ready\\n'; \
             echo 'already mounted'; sleep 30",
        ]);
        let mut ch = Child::spawn_with("sh", c, SpawnOptions::new().log_file(&log))?;
        ch.wait_ready(Duration::from_secs(5))?;
        assert_eq!(ch.log_path(), Some(log.as_path()));
        ch.ensure_running()?;
        assert_eq!(ch.wait_timeout(Duration::from_millis(50))?, None);
        ch.sigterm()?;
        let st = ch
            .wait_timeout(Duration::from_secs(5))?
            .ok_or_else(|| anyhow!("sh ignored SIGTERM"))?;
        assert!(!st.success());
        let text = std::fs::read_to_string(&log)?;
        assert!(
            text.contains("to stderr") && text.contains("out ready"),
            "{text}"
        );
        // Colours kept in the file, stripped in the tail.
        assert!(text.contains('\u{1b}'));
        assert_eq!(ch.log_tail(2).lines().count(), 2);
        assert!(
            ch.log_tail(3).contains("INFO out ready"),
            "{}",
            ch.log_tail(3)
        );
        let e = ch
            .ensure_running()
            .err()
            .ok_or_else(|| anyhow!("expected an error"))?;
        assert!(format!("{e:#}").contains("log tail"), "{e:#}");
        Ok(())
    }

    #[test]
    fn interrupt_check_ends_the_wait() -> Result<()> {
        fn interrupted() -> Result<()> {
            bail!("interrupted by signal")
        }
        let mut c = Command::new("sleep");
        c.arg("30");
        let opts = SpawnOptions::new()
            .interrupt_check(interrupted)
            .kill_wait(Duration::from_secs(10));
        let mut ch = Child::spawn_with("sleep", c, opts)?;
        let e = ch
            .wait_ready(Duration::from_secs(30))
            .err()
            .ok_or_else(|| anyhow!("expected an error"))?;
        assert_eq!(format!("{e:#}"), "interrupted by signal");
        ch.kill()?;
        assert!(ch.try_status()?.is_some());
        Ok(())
    }

    #[test]
    fn kill_group_kills_what_the_leader_forked() -> Result<()> {
        let d = tempfile::tempdir()?;
        let mut c = Command::new("sh");
        // A grandchild that keeps running after the leader is gone.
        c.args(["-c", "sleep 60 & echo ready; wait"]);
        let opts = SpawnOptions::new()
            .log_file(d.path().join("g.log"))
            .own_process_group();
        let mut ch = Child::spawn_with("sh", c, opts)?;
        ch.wait_ready(Duration::from_secs(5))?;
        let pgid = Pid::from_raw(i32::try_from(ch.pid())?).ok_or_else(|| anyhow!("pid 0"))?;
        assert!(test_kill_process_group(pgid).is_ok());
        ch.kill_group()?;
        assert!(ch.try_status()?.is_some());
        assert!(test_kill_process_group(pgid).is_err());

        // Without its own group, the group is ours: refused.
        let mut c = Command::new("sleep");
        c.arg("30");
        let mut ch = Child::spawn("sleep", c)?;
        assert!(ch.kill_group().is_err());
        assert!(ch.try_status()?.is_none());
        Ok(())
    }

    #[test]
    fn stop_on_drop_sends_sigterm_first() -> Result<()> {
        let d = tempfile::tempdir()?;
        let mark = d.path().join("termed");
        let mut c = Command::new("sh");
        c.arg("-c").arg(format!(
            "trap 'touch {}; exit 0' TERM; echo ready >&2; while :; do sleep 0.1; done",
            mark.display()
        ));
        let mut ch = Child::spawn_with(
            "sh",
            c,
            SpawnOptions::new().stop_on_drop(Duration::from_secs(10)),
        )?;
        ch.wait_ready(Duration::from_secs(5))?;
        drop(ch);
        assert!(mark.exists(), "the drop did not SIGTERM first");
        Ok(())
    }
}
