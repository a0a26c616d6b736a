//! Failover time: SIGKILL every process of node1 (the PRIM) and time node2's
//! takeover, on a fresh cluster per run.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use vmha_test_infra::cluster_vm::Timing;
use vmha_test_infra::guest::{wait_console, Console};
use vmha_test_infra::vmctl_status::{diag, state, status};

use super::report::Summary;
use super::{loadavg, ms, running_pair};

/// How often node2's `vmctl status` and console are polled after the kill.
const POLL: Duration = Duration::from_millis(50);
/// Give up on a run after this long without a counter on node2.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(240);

/// One crash run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CrashRun {
    pub run: usize,
    /// Processes of node1 SIGKILLed.
    pub killed: usize,
    /// From the first SIGKILL until no process of node1 was left.
    pub kill_ms: f64,
    /// Kill → the first `vmctl status` on node2 showing ALONE.
    pub to_alone_ms: Option<f64>,
    /// Time between that status call and the one before (the resolution).
    pub alone_resolution_ms: Option<f64>,
    /// Kill → node2's first event-log line after the kill (the takeover
    /// begins: a new data generation), i.e. the detection time.
    pub to_takeover_ms: Option<f64>,
    /// Kill → node2's event-log line `VM started` (`virsh start` returned).
    pub to_vm_started_ms: Option<f64>,
    /// Kill → `VMHA-BOOT` on node2's console (the guest read its disk).
    pub to_boot_ms: Option<f64>,
    /// Kill → the first `COUNTER` on node2's console (the guest writes again).
    pub to_counter_ms: Option<f64>,
    /// Last counter node1's guest printed (acknowledged by the disk).
    pub acked: Option<u64>,
    /// The counter node2's guest read from its disk at boot.
    pub boot: Option<u64>,
    pub first_counter: Option<u64>,
    /// An acknowledged counter lost (boot < acked) or the guest not resuming
    /// at boot + 1.
    pub violation: Option<String>,
    pub error: Option<String>,
    pub loadavg: String,
    /// node2's event log (`vmctl log`) from the kill on: (ms after the kill,
    /// event), for where the time goes.
    pub events: Vec<(i64, String)>,
}

/// All crash runs.
#[derive(Debug, Clone, Serialize)]
pub struct CrashResults {
    pub runs: Vec<CrashRun>,
    pub to_alone_ms: Option<Summary>,
    pub to_takeover_ms: Option<Summary>,
    pub to_vm_started_ms: Option<Summary>,
    pub to_boot_ms: Option<Summary>,
    pub to_counter_ms: Option<Summary>,
    pub violations: usize,
    pub errors: usize,
}

pub fn run(n: usize, timing: &Timing) -> Result<CrashResults> {
    let mut runs = Vec::with_capacity(n);
    for i in 1..=n {
        crate::interrupt::check()?;
        eprintln!("[failover] crash run {i}/{n} (load {})", loadavg());
        let mut r = CrashRun {
            run: i,
            ..CrashRun::default()
        };
        if let Err(e) = one(timing, &mut r) {
            eprintln!("[failover] crash run {i} failed: {e:#}");
            r.error = Some(format!("{e:#}"));
        }
        if let Some(v) = &r.violation {
            eprintln!("[failover] !!! crash run {i}: {v}");
        }
        eprintln!(
            "[failover] crash run {i}: kill->ALONE {:?} ms, kill->boot {:?} ms, kill->counter {:?} ms",
            r.to_alone_ms.map(f64::round),
            r.to_boot_ms.map(f64::round),
            r.to_counter_ms.map(f64::round)
        );
        runs.push(r);
    }
    let summary = |f: fn(&CrashRun) -> Option<f64>| Summary::of(runs.iter().filter_map(f));
    Ok(CrashResults {
        to_alone_ms: summary(|r| r.to_alone_ms),
        to_takeover_ms: summary(|r| r.to_takeover_ms),
        to_vm_started_ms: summary(|r| r.to_vm_started_ms),
        to_boot_ms: summary(|r| r.to_boot_ms),
        to_counter_ms: summary(|r| r.to_counter_ms),
        violations: runs.iter().filter(|r| r.violation.is_some()).count(),
        errors: runs.iter().filter(|r| r.error.is_some()).count(),
        runs,
    })
}

fn one(timing: &Timing, r: &mut CrashRun) -> Result<()> {
    let mut vc = running_pair(timing)?;
    let console1 = vc.console(0)?;
    let console2 = vc.console(1)?;
    // A few counters replicated while node2 is SECOND.
    let before = Console::read(&console1)?.counters.len();
    diag(
        &vc,
        wait_console(&console1, Duration::from_secs(60), "counters", |c| {
            c.counters.len() >= before + 5
        }),
    )?;
    r.loadavg = loadavg();

    let t_kill = Instant::now();
    let kill_unix_ms = unix_ms(std::time::SystemTime::now());
    r.killed = vc.crash(0)?;
    r.kill_ms = ms(t_kill.elapsed());
    // node1's console is final now: its last line is the last acknowledged write.
    let acked = Console::read(&console1)?
        .last_counter()
        .context("no counter on node1")?;
    r.acked = Some(acked);

    let mut last_poll = Instant::now();
    loop {
        crate::interrupt::check()?;
        if r.to_alone_ms.is_none() {
            // A failed call (vmhad busy) is just a missed sample.
            if let Ok(s) = status(&vc, 1) {
                let now = Instant::now();
                if state(&s, "node2") == Some("ALONE") {
                    r.to_alone_ms = Some(ms(now - t_kill));
                    r.alone_resolution_ms = Some(ms(now - last_poll));
                }
                last_poll = now;
            }
        }
        let c2 = Console::read(&console2)?;
        let now = Instant::now();
        if r.to_boot_ms.is_none() && !c2.boots.is_empty() {
            r.to_boot_ms = Some(ms(now - t_kill));
        }
        if let Some(&first) = c2.counters.first() {
            r.to_counter_ms = Some(ms(now - t_kill));
            r.first_counter = Some(first);
            r.boot = c2.boots.first().copied();
            // A boot and its first counter can land between two polls.
            r.to_boot_ms.get_or_insert(ms(now - t_kill));
            break;
        }
        if now - t_kill > TAKEOVER_TIMEOUT {
            anyhow::bail!(
                "no counter on node2 {TAKEOVER_TIMEOUT:?} after the kill\n{}",
                vc.diagnostics()
            );
        }
        std::thread::sleep(POLL);
    }
    check_counters(r, acked);
    if let Ok(log) = vc.vmctl(1, &["log"]) {
        r.events = log
            .lines()
            .filter_map(|l| {
                let (ts, text) = l.split_once(' ')?;
                let at = event_unix_ms(ts)?;
                let off = i64::try_from(at).ok()? - i64::try_from(kill_unix_ms).ok()?;
                (off >= 0).then(|| (off, text.to_string()))
            })
            .collect();
        r.to_takeover_ms = r.events.first().map(|(at, _)| *at as f64);
        r.to_vm_started_ms = r
            .events
            .iter()
            .find(|(_, e)| e.contains("VM started"))
            .map(|(at, _)| *at as f64);
    }
    if r.to_alone_ms.is_none() {
        // The guest ran before any status poll saw ALONE (cannot happen with a
        // 50 ms poll and a boot of seconds, but never report a made-up time).
        let s = status(&vc, 1)?;
        anyhow::bail!(
            "node2 runs the guest but no status showed ALONE; now: {:?}",
            state(&s, "node2")
        );
    }
    Ok(())
}

fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0))
}

/// Unix milliseconds of an event-log timestamp `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn event_unix_ms(ts: &str) -> Option<u64> {
    let ts = ts.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.splitn(3, '-').map(str::parse::<i64>);
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, milli) = time.split_once('.')?;
    let mut t = hms.splitn(3, ':').map(str::parse::<i64>);
    let (hh, mm, ss) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    let milli: i64 = milli.parse().ok()?;
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    u64::try_from(secs * 1000 + milli).ok()
}

/// Flags a lost acknowledged write or a guest that does not resume at its
/// disk's counter + 1.
fn check_counters(r: &mut CrashRun, acked: u64) {
    match (r.boot, r.first_counter) {
        (Some(boot), _) if boot < acked => {
            r.violation = Some(format!(
                "ACKNOWLEDGED WRITE LOST: node1 printed counter {acked}, node2 booted from {boot}"
            ));
        }
        (Some(boot), Some(first)) if first != boot + 1 => {
            r.violation = Some(format!(
                "node2 booted from {boot} but printed {first} first"
            ));
        }
        (None, Some(first)) if first <= acked => {
            r.violation = Some(format!(
                "ACKNOWLEDGED WRITE LOST: node1 printed counter {acked}, node2 printed {first} (no boot line)"
            ));
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(boot: Option<u64>, first: Option<u64>) -> CrashRun {
        CrashRun {
            boot,
            first_counter: first,
            ..CrashRun::default()
        }
    }

    #[test]
    fn event_timestamps() {
        assert_eq!(event_unix_ms("1970-01-01T00:00:01.250Z"), Some(1250));
        // 2026-11-26T02:12:02Z
        assert_eq!(
            event_unix_ms("2026-11-26T02:12:02.007Z"),
            Some(1_795_659_122_007)
        );
        assert_eq!(event_unix_ms("garbage"), None);
    }

    #[test]
    fn lost_counter_is_a_violation() {
        let mut r = with(Some(9), Some(10));
        check_counters(&mut r, 10);
        assert!(r.violation.is_some_and(|v| v.contains("LOST")));
        let mut r = with(None, Some(10));
        check_counters(&mut r, 10);
        assert!(r.violation.is_some());
    }

    #[test]
    fn resuming_after_the_acknowledged_counter_is_fine() {
        // The disk may hold one counter more than was printed (written, not yet echoed).
        for boot in [10, 11] {
            let mut r = with(Some(boot), Some(boot + 1));
            check_counters(&mut r, 10);
            assert_eq!(r.violation, None);
        }
        let mut r = with(Some(10), Some(13));
        check_counters(&mut r, 10);
        assert!(r.violation.is_some());
    }
}
