//! Headless Chromium driven over the DevTools protocol, for the web console's
//! end-to-end test.
//!
//! Why a pipe and not a websocket: Chromium's `--remote-debugging-pipe` speaks
//! the protocol over fds 3 (commands in) and 4 (replies and events out), one
//! JSON message per NUL-terminated frame. That needs no port (the browser runs
//! inside a node's network namespace, where a DevTools port would not be
//! reachable from the test) and no websocket or CDP crate: the few commands the
//! test needs (navigate, evaluate, mouse clicks, screenshots) are plain JSON.
//!
//! The browser is started in its own process group (its renderer and GPU
//! processes are its children) and the whole group is SIGKILLed by the
//! leader's PID when the [`Browser`] is dropped. Its profile lives in a
//! temporary directory removed at drop.
//!
//! Every page exception and `console.error` is recorded ([`Browser::js_errors`])
//! so a test can assert the page runs cleanly in a real browser.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use serde_json::{json, Value};

use crate::proc::{Child, SpawnOptions};

/// How long one protocol command may take (a navigation on a loaded machine).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// The Chromium executable: `$CHROMIUM_BIN`, else Debian's binary (not its
/// shell launcher, so the spawned PID is the browser itself), else `chromium`.
pub fn chromium_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("CHROMIUM_BIN") {
        return PathBuf::from(p);
    }
    let debian = Path::new("/usr/lib/chromium/chromium");
    if debian.exists() {
        return debian.to_path_buf();
    }
    PathBuf::from("chromium")
}

/// One headless Chromium with one page attached.
#[derive(Debug)]
pub struct Browser {
    // Declared first: the browser dies before its profile directory goes.
    child: Child,
    to_browser: File,
    from_browser: Receiver<Value>,
    session: String,
    next_id: u64,
    /// Events received while waiting for replies (exceptions, console calls...).
    events: Vec<Value>,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts headless Chromium inside the network namespace of the process
    /// `netns_pid` (e.g. a node's holder; `None`: this machine's), with a
    /// 1280×900 window, self-signed certificates accepted, and opens a blank
    /// page.
    pub fn launch(netns_pid: Option<u32>) -> Result<Self> {
        let profile = tempfile::Builder::new()
            .prefix("vmha-chromium-")
            .tempdir()
            .context("creating the browser profile directory")?;
        let (cmd_read, cmd_write) = pipe()?;
        let (out_read, out_write) = pipe()?;
        let mut cmd = match netns_pid {
            Some(pid) => {
                let mut c = Command::new("nsenter");
                c.args(["-t", &pid.to_string(), "-n", "--"])
                    .arg(chromium_bin());
                c
            }
            None => Command::new(chromium_bin()),
        };
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--metrics-recording-only",
            "--ignore-certificate-errors",
            "--hide-scrollbars",
            "--window-size=1280,900",
            "--remote-debugging-pipe",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .env("HOME", profile.path());
        let (r, w) = (cmd_read.as_raw_fd(), out_write.as_raw_fd());
        // SAFETY: the closure runs in the forked child before exec and calls only
        // async-signal-safe functions (fcntl, dup2) on fds that are open in the
        // parent at fork time (`cmd_read`, `out_write` live until after spawn).
        // The copies to 10+ first keep dup2 from clobbering a source fd that
        // happens to be 3 or 4; dup2's targets have no CLOEXEC, the copies do.
        unsafe {
            cmd.pre_exec(move || {
                let r2 = libc::fcntl(r, libc::F_DUPFD_CLOEXEC, 10);
                let w2 = libc::fcntl(w, libc::F_DUPFD_CLOEXEC, 10);
                if r2 < 0 || w2 < 0 || libc::dup2(r2, 3) < 0 || libc::dup2(w2, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = Child::spawn_with(
            "chromium",
            cmd,
            SpawnOptions::new()
                .own_process_group()
                .log_file(profile.path().join("chromium.log"))
                .kill_wait(Duration::from_secs(10)),
        )?;
        drop(cmd_read);
        drop(out_write);
        let (tx, rx) = mpsc::channel();
        let reader = File::from(out_read);
        std::thread::Builder::new()
            .name("cdp-reader".into())
            .spawn(move || {
                let mut reader = BufReader::new(reader);
                let mut frame = Vec::new();
                loop {
                    frame.clear();
                    match reader.read_until(0, &mut frame) {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    if frame.last() == Some(&0) {
                        frame.pop();
                    }
                    if let Ok(v) = serde_json::from_slice::<Value>(&frame) {
                        if tx.send(v).is_err() {
                            return;
                        }
                    }
                }
            })
            .context("spawning the DevTools reader")?;
        let mut b = Self {
            child,
            to_browser: File::from(cmd_write),
            from_browser: rx,
            session: String::new(),
            next_id: 1,
            events: Vec::new(),
            _profile: profile,
        };
        let target = b
            .call_browser("Target.createTarget", json!({ "url": "about:blank" }))
            .context("Chromium does not answer on its DevTools pipe")?;
        let target_id = target["targetId"]
            .as_str()
            .ok_or_else(|| anyhow!("no targetId in {target}"))?
            .to_string();
        let attached = b.call_browser(
            "Target.attachToTarget",
            json!({ "targetId": target_id, "flatten": true }),
        )?;
        b.session = attached["sessionId"]
            .as_str()
            .ok_or_else(|| anyhow!("no sessionId in {attached}"))?
            .to_string();
        for domain in ["Page.enable", "Runtime.enable", "Log.enable"] {
            b.call(domain, json!({}))?;
        }
        Ok(b)
    }

    /// The browser's PID (the leader of its process group).
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    fn send(&mut self, method: &str, params: Value, session: Option<String>) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = Value::String(s);
        }
        let mut bytes = serde_json::to_vec(&msg)?;
        bytes.push(0);
        self.to_browser
            .write_all(&bytes)
            .with_context(|| format!("sending {method} to Chromium"))?;
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = match self.from_browser.recv_timeout(left) {
                Ok(v) => v,
                Err(RecvTimeoutError::Timeout) => {
                    bail!("{method}: no answer in {COMMAND_TIMEOUT:?}")
                }
                Err(RecvTimeoutError::Disconnected) => bail!(
                    "{method}: Chromium closed its DevTools pipe: {}",
                    self.child.log_tail(20)
                ),
            };
            if v.get("id").and_then(Value::as_u64) == Some(id) {
                if let Some(e) = v.get("error") {
                    bail!("{method}: {e}");
                }
                return Ok(v.get("result").cloned().unwrap_or(Value::Null));
            }
            if v.get("method").is_some() {
                self.events.push(v);
            }
        }
    }

    fn call_browser(&mut self, method: &str, params: Value) -> Result<Value> {
        self.send(method, params, None)
    }

    /// A protocol command on the page; its `result`.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        let s = self.session.clone();
        self.send(method, params, Some(s))
    }

    /// Moves the page to `url` and waits until the new document has loaded.
    pub fn navigate(&mut self, url: &str) -> Result<()> {
        let r = self.call("Page.navigate", json!({ "url": url }))?;
        if let Some(e) = r.get("errorText").and_then(Value::as_str) {
            bail!("navigating to {url}: {e}");
        }
        self.wait_for(&format!("{url} loaded"), Duration::from_secs(30), |b| {
            b.eval("document.readyState === 'complete' && location.href !== 'about:blank'")
                .map(|v| v == Value::Bool(true))
        })
    }

    /// Evaluates `expr` in the page (promises awaited); its value as JSON.
    pub fn eval(&mut self, expr: &str) -> Result<Value> {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": expr, "returnByValue": true, "awaitPromise": true }),
        )?;
        if let Some(e) = r.get("exceptionDetails") {
            bail!("evaluating {expr}: {e}");
        }
        Ok(r["result"].get("value").cloned().unwrap_or(Value::Null))
    }

    /// Polls `check` every 100 ms until it is true; `what` names the wait in the error.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&mut Self) -> Result<bool>,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = check(self);
            if matches!(last, Ok(true)) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let text = self
                    .eval("document.body ? document.body.innerText : ''")
                    .unwrap_or(Value::Null);
                bail!("timed out after {timeout:?} waiting for {what} (last check: {last:?}); page text:\n{}", text.as_str().unwrap_or(""));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until `selector` matches an element.
    pub fn wait_selector(&mut self, selector: &str, timeout: Duration) -> Result<()> {
        let expr = format!("document.querySelector({}) !== null", json!(selector));
        self.wait_for(&format!("an element {selector}"), timeout, |b| {
            Ok(b.eval(&expr)? == Value::Bool(true))
        })
    }

    /// Clicks the middle of the first element matching `selector` with the
    /// mouse (pressed and released, as a user would), after scrolling it into view.
    pub fn click(&mut self, selector: &str) -> Result<()> {
        let expr = format!(
            "(() => {{ const e = document.querySelector({}); if (!e) return null; \
             e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect(); \
             return [r.x + r.width / 2, r.y + r.height / 2]; }})()",
            json!(selector)
        );
        let pos = self.eval(&expr)?;
        let (Some(x), Some(y)) = (pos[0].as_f64(), pos[1].as_f64()) else {
            bail!("no element {selector} to click");
        };
        for kind in ["mouseMoved", "mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({ "type": kind, "x": x, "y": y, "button": "left", "clickCount": 1 }),
            )?;
        }
        Ok(())
    }

    /// Focuses `selector` and types `text` into it.
    pub fn type_into(&mut self, selector: &str, text: &str) -> Result<()> {
        let focused = self.eval(&format!(
            "(() => {{ const e = document.querySelector({}); if (!e) return false; e.focus(); return true; }})()",
            json!(selector)
        ))?;
        if focused != Value::Bool(true) {
            bail!("no element {selector} to type into");
        }
        self.call("Input.insertText", json!({ "text": text }))?;
        Ok(())
    }

    /// The page's visible text.
    pub fn text(&mut self) -> Result<String> {
        Ok(self
            .eval("document.body ? document.body.innerText : ''")?
            .as_str()
            .unwrap_or("")
            .to_string())
    }

    /// Saves a PNG of the page (the whole page, not only the window) to `path`.
    pub fn screenshot(&mut self, path: &Path) -> Result<()> {
        let r = self.call(
            "Page.captureScreenshot",
            json!({ "format": "png", "captureBeyondViewport": true }),
        )?;
        let data = r["data"]
            .as_str()
            .ok_or_else(|| anyhow!("no screenshot data"))?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(data)
            .context("decoding the screenshot")?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))
    }

    /// Uncaught page exceptions, `console.error` calls and error log entries
    /// other than network ones seen so far (each
    /// as a one-line description), after draining the events already received.
    pub fn js_errors(&mut self) -> Vec<String> {
        while let Ok(v) = self.from_browser.try_recv() {
            if v.get("method").is_some() {
                self.events.push(v);
            }
        }
        let mut errors = Vec::new();
        for e in &self.events {
            let p = &e["params"];
            match e["method"].as_str() {
                Some("Runtime.exceptionThrown") => {
                    let d = &p["exceptionDetails"];
                    let desc = d["exception"]["description"]
                        .as_str()
                        .or(d["text"].as_str())
                        .unwrap_or("?");
                    errors.push(format!("exception: {desc} at {}", d["url"]));
                }
                Some("Runtime.consoleAPICalled") if p["type"] == "error" => {
                    errors.push(format!("console.error: {}", p["args"]));
                }
                // Network entries (a refused login's 401, the favicon's 404)
                // are the server's answers, not page errors.
                Some("Log.entryAdded")
                    if p["entry"]["level"] == "error" && p["entry"]["source"] != "network" =>
                {
                    errors.push(format!(
                        "log: {} ({})",
                        p["entry"]["text"], p["entry"]["url"]
                    ));
                }
                _ => {}
            }
        }
        errors
    }

    /// Closes the browser: SIGKILL to its whole process group (by the
    /// leader's PID) and waits until every member is gone.
    pub fn close(mut self) -> Result<()> {
        self.child.kill_group()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Err(e) = self.child.kill_group() {
            eprintln!("[chromium] stopping failed: {e:#}");
        }
    }
}

/// A pipe, both ends close-on-exec: (read, write).
fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).context("pipe")
}
