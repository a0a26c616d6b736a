//! The web console in a real browser: headless Chromium (driven over the
//! DevTools protocol, `vmha_test_infra::browser`) inside node2's network
//! namespace opens node2's console on its node address, port 9010, logs in
//! with the password set by `vmctl web-password --stdin`, sees both nodes'
//! states, clicks swap and watches vm1 move to node1 live, then node1 crashes
//! and the failover (node2 ALONE, node1 greyed) appears live on the same page,
//! without a reload. The page must raise no JavaScript error on the way.
//!
//! Screenshots (PNG) go to `target/web-console/` (or `$VMHA_SCREENSHOT_DIR`);
//! docs/console.png in the README is one of them.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use serde_json::Value;

use vmha_test_infra::browser::Browser;
use vmha_test_infra::cluster_vm::{default_module, ClusterModule, Timing, VmCluster, MODULE};
use vmha_test_infra::console_demo::set_web_password;
use vmha_test_infra::guest::{wait_console, Console};
use vmha_test_infra::node::Network;
use vmha_test_infra::scenario::{BOOT_TIMEOUT, STATE_TIMEOUT, SYNC_TIMEOUT};
use vmha_test_infra::vmctl_status::{diag, primary, ready, state, wait_status};

const PASSWORD: &str = "correct horse battery staple";
/// How long the page may take to show what the daemons already report
/// (SSE pushes within a second; generous for a loaded machine).
const PAGE_TIMEOUT: Duration = Duration::from_secs(30);

fn screenshot_dir() -> PathBuf {
    std::env::var_os("VMHA_SCREENSHOT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/web-console"))
}

/// The state cell's text of `node`'s row in vm1's table (None: no such row yet).
fn page_state(b: &mut Browser, node: &str) -> Result<Option<String>> {
    let v = b.eval(&format!(
        "(() => {{ const c = document.querySelector('table[data-module=\"{MODULE}\"] tr[data-node=\"{node}\"] .state-cell'); \
         return c ? c.innerText.trim() : null; }})()"
    ))?;
    Ok(v.as_str().map(str::to_string))
}

/// Whether `node`'s row is shown greyed (an unreachable peer).
fn page_row_stale(b: &mut Browser, node: &str) -> Result<bool> {
    let v = b.eval(&format!(
        "(() => {{ const r = document.querySelector('table[data-module=\"{MODULE}\"] tr[data-node=\"{node}\"]'); \
         return r ? r.classList.contains('stale') : false; }})()"
    ))?;
    Ok(v == Value::Bool(true))
}

/// Waits until the page shows node1 as `s1` and node2 as `s2`.
fn wait_page_states(b: &mut Browser, s1: &str, s2: &str) -> Result<()> {
    let t = Instant::now();
    b.wait_for(
        &format!("the page to show node1 {s1}, node2 {s2}"),
        PAGE_TIMEOUT,
        |b| {
            Ok(page_state(b, "node1")?.as_deref() == Some(s1)
                && page_state(b, "node2")?.as_deref() == Some(s2))
        },
    )?;
    eprintln!(
        "[web] page shows node1 {s1}, node2 {s2} ({:?})",
        t.elapsed()
    );
    Ok(())
}

/// The page was not reloaded since `mark_page` (the live updates came over SSE).
fn page_not_reloaded(b: &mut Browser) -> Result<()> {
    let v = b.eval("window.__vmhaTestMark === 42")?;
    ensure!(v == Value::Bool(true), "the page was reloaded");
    Ok(())
}

fn console_in_chromium() -> Result<()> {
    let shots = screenshot_dir();
    std::fs::create_dir_all(&shots)?;
    // vm1's disk on node2: the first `prim` goes there, so a swap moves it to
    // node1 and node1's crash fails it over back to node2.
    let module = ClusterModule {
        data_on: 1,
        ..default_module()
    };
    let mut vc = VmCluster::with_modules(&Timing::default(), vec![module])?;
    vc.start_vmhad(0)?;
    vc.start_vmhad(1)?;
    set_web_password(&vc, 1, PASSWORD)?;
    vc.vmctl(1, &["prim", "--yes"])?;
    wait_status(&vc, 1, "node2 PRIM", STATE_TIMEOUT, |s| {
        state(s, "node2") == Some("PRIM") && primary(s) == Some("node2")
    })?;
    diag(
        &vc,
        wait_console(&vc.console(1)?, BOOT_TIMEOUT, "counters on node2", |c| {
            !c.counters.is_empty()
        }),
    )?;
    wait_status(&vc, 0, "node1 SECOND ready", SYNC_TIMEOUT, |s| {
        state(s, "node1") == Some("SECOND") && ready(s, "node1")
    })?;

    let t = Instant::now();
    let mut b = Browser::launch(Some(vc.node(1).holder_pid()))?;
    let base = format!("https://{}:9010", vc.node(1).address(Network::Production));
    eprintln!(
        "[web] chromium {} up in {:?}, opening {base}/",
        b.pid(),
        t.elapsed()
    );

    // Anonymous: the login form, nothing of the cluster.
    b.navigate(&format!("{base}/"))?;
    b.wait_selector("input[type=password]", PAGE_TIMEOUT)?;
    let text = b.text()?;
    ensure!(
        !text.contains(MODULE) && !text.contains("swap"),
        "the login page shows the cluster: {text}"
    );
    b.screenshot(&shots.join("01-login.png"))?;

    // A wrong password is refused.
    b.type_into("input[type=password]", "wrong")?;
    b.click("button[type=submit]")?;
    b.wait_for("the refusal", PAGE_TIMEOUT, |b| {
        Ok(b.eval("document.readyState === 'complete' && !!document.querySelector('input[type=password]') && document.querySelector('.message') && document.querySelector('.message').innerText.trim().length > 0")? == Value::Bool(true))
    })?;

    // Log in: both nodes' states, live.
    b.type_into("input[type=password]", PASSWORD)?;
    b.click("button[type=submit]")?;
    b.wait_selector(&format!("table[data-module=\"{MODULE}\"]"), PAGE_TIMEOUT)?;
    b.wait_for("the live indicator", PAGE_TIMEOUT, |b| {
        Ok(b.eval("document.getElementById('live').innerText")?
            .as_str()
            == Some("live"))
    })?;
    wait_page_states(&mut b, "SECOND", "PRIM")?;
    let text = b.text()?;
    ensure!(
        text.contains("primary: node2"),
        "the page does not name node2 as vm1's primary: {text}"
    );
    b.eval("window.__vmhaTestMark = 42")?;
    b.screenshot(&shots.join("02-both-nodes.png"))?;

    // Swap from the page: vm1 moves to node1 and the page follows.
    let t = Instant::now();
    // The button of node2's row: this console's own node, the PRIM.
    b.click(&format!(
        "button[data-action=\"swap\"][data-module=\"{MODULE}\"][data-node=\"node2\"]"
    ))?;
    b.wait_for("the swap's result", PAGE_TIMEOUT, |b| {
        Ok(b
            .eval("(() => { const r = document.getElementById('result'); return !r.hidden && r.innerText.includes('swap'); })()")?
            == Value::Bool(true))
    })?;
    let result = b.eval("document.getElementById('result').innerText")?;
    ensure!(
        result.as_str().is_some_and(|r| r.contains("done")),
        "swap refused: {result}"
    );
    wait_page_states(&mut b, "PRIM", "SECOND")?;
    b.wait_for("vm1's primary node1 on the page", PAGE_TIMEOUT, |b| {
        Ok(b.text()?.contains("primary: node1"))
    })?;
    eprintln!("[web] swap shown on the page after {:?}", t.elapsed());
    page_not_reloaded(&mut b)?;
    // The VM really moved: it boots and counts on node1.
    diag(
        &vc,
        wait_console(&vc.console(0)?, BOOT_TIMEOUT, "counters on node1", |c| {
            !c.counters.is_empty()
        }),
    )?;
    wait_status(&vc, 1, "node2 SECOND ready", SYNC_TIMEOUT, |s| {
        state(s, "node2") == Some("SECOND") && ready(s, "node2")
    })?;
    b.screenshot(&shots.join("03-swapped.png"))?;

    // node1 crashes: node2's page shows the failover live.
    let boots_before = Console::read(&vc.console(1)?)?.boots.len();
    let t = Instant::now();
    let killed = vc.crash(0)?;
    eprintln!("[web] node1 crashed ({killed} processes killed)");
    b.wait_for(
        "node2 ALONE and node1 greyed on the page",
        Duration::from_secs(60),
        |b| Ok(page_state(b, "node2")?.as_deref() == Some("ALONE") && page_row_stale(b, "node1")?),
    )?;
    b.wait_for("vm1's primary node2 on the page", PAGE_TIMEOUT, |b| {
        Ok(b.text()?.contains("primary: node2"))
    })?;
    eprintln!("[web] failover shown on the page after {:?}", t.elapsed());
    page_not_reloaded(&mut b)?;
    diag(
        &vc,
        wait_console(
            &vc.console(1)?,
            BOOT_TIMEOUT,
            "vm1 boots again on node2",
            |c| c.boots.len() > boots_before,
        ),
    )?;
    b.screenshot(&shots.join("04-failover.png"))?;

    let errors = b.js_errors();
    ensure!(
        errors.is_empty(),
        "JavaScript errors in the console page: {errors:#?}"
    );
    eprintln!("[web] screenshots in {}", shots.display());
    b.close()?;
    Ok(())
}

#[test]
fn web_console_in_chromium_login_swap_and_failover_live() {
    let _one = vmha_test_infra::node::one_cluster_at_a_time();
    if let Err(e) = console_in_chromium() {
        panic!("{e:#}");
    }
}

/// The harness itself: a page's uncaught exception is reported, so the check
/// above cannot pass vacuously.
#[test]
fn browser_reports_page_exceptions() {
    let run = || -> Result<()> {
        let mut b = Browser::launch(None)?;
        b.navigate("data:text/html,<p id=x>hi</p><script>setTimeout(() => { throw new Error('boom') }, 0)</script>")?;
        b.wait_for("the exception", Duration::from_secs(10), |b| {
            Ok(b.js_errors().iter().any(|e| e.contains("boom")))
        })?;
        ensure!(b.text()? == "hi", "page text");
        b.close()
    };
    if let Err(e) = run() {
        panic!("{e:#}");
    }
}
