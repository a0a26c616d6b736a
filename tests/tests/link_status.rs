//! The primary's `STATEDIR/link.json`, which the controller reads to act while
//! heartbeats still arrive: `connected`; `stalled` once no acknowledgement came
//! for half the lock timeout with a write waiting (a frozen receiver: no error
//! reaches the primary); `degraded` after SIGUSR1 (the waiting write then
//! completes); `fenced` when an attach (SIGUSR2) is refused because the
//! receiver accepts another generation; `connected` again after a full sync to a
//! receiver accepting ours.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use vmha_fs::refusal::Refusal;
use vmha_fs::status::{LinkCondition, LinkStatus, StatusFile};
use vmha_test_infra::proc::Child;
use vmha_test_infra::{lazy_unmount_all, Pair, PairOptions};

const GENERATION: &str = "00c0ffee";
const LOCK_TIMEOUT_MS: u64 = 3000;

fn secondary_accepting(pair: &Pair, generation: &str) -> Result<Child> {
    let mut cmd = pair.secondary_command();
    cmd.arg("--accept-generation").arg(generation);
    let mut child = Child::spawn("secondary", cmd)?;
    child.wait_ready(Duration::from_secs(20))?;
    Ok(child)
}

fn link(pair: &Pair) -> Result<LinkStatus> {
    LinkStatus::read_from(pair.primary_state())
        .with_context(|| format!("reading {}", LinkStatus::FILE))?
        .with_context(|| format!("no {}", LinkStatus::FILE))
}

/// Waits until `link.json` shows `state`; returns it.
fn wait_link(pair: &Pair, state: LinkCondition, timeout: Duration) -> Result<LinkStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = link(pair);
        if let Ok(v) = &last {
            if v.state == state {
                return last;
            }
        }
        if Instant::now() >= deadline {
            bail!("link.json is not `{state:?}` after {timeout:?}: {last:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn link_json_follows_the_replication_link() -> Result<()> {
    let pair = Pair::prepare(PairOptions {
        lock_timeout_ms: LOCK_TIMEOUT_MS,
        ..PairOptions::default()
    })?;
    let mut secondary = secondary_accepting(&pair, GENERATION)?;
    let mut cmd: Command = pair.primary_command();
    cmd.arg("--generation").arg(GENERATION);
    let mut primary = Child::spawn("primary", cmd)?;
    primary.wait_ready(Duration::from_secs(20))?;
    wait_link(&pair, LinkCondition::Connected, Duration::from_secs(2))?;
    std::fs::write(pair.mount().join("a"), b"replicated")?;

    // A frozen receiver: the write waits, the stall is reported before the
    // lock timeout.
    secondary.send_signal(libc::SIGSTOP)?;
    let t = Instant::now();
    let target = pair.mount().join("b");
    let write = std::thread::spawn(move || std::fs::write(target, b"waits"));
    let v = wait_link(
        &pair,
        LinkCondition::Stalled,
        Duration::from_millis(LOCK_TIMEOUT_MS),
    )?;
    let after = t.elapsed();
    eprintln!("[link_status] stalled after {after:?}: {v:?}");
    ensure!(
        after >= Duration::from_millis(LOCK_TIMEOUT_MS / 2 - 100),
        "stalled reported after {after:?}, before half the lock timeout"
    );
    ensure!(!write.is_finished(), "the write did not wait for the peer");

    // The controller's answer: SIGUSR1, the write completes locally.
    primary.send_signal(libc::SIGUSR1)?;
    wait_link(&pair, LinkCondition::Degraded, Duration::from_secs(2))?;
    write
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    ensure!(
        t.elapsed() < Duration::from_millis(LOCK_TIMEOUT_MS),
        "the write waited {:?}",
        t.elapsed()
    );
    assert_eq!(std::fs::read(pair.primary_backing().join("b"))?, b"waits");
    secondary.kill()?;
    lazy_unmount_all(pair.secondary_backing())?;

    // A receiver accepting another generation refuses the attach: fenced.
    let mut other = secondary_accepting(&pair, "11111111")?;
    primary.send_signal(libc::SIGUSR2)?;
    let v = wait_link(&pair, LinkCondition::Fenced, Duration::from_secs(10))?;
    eprintln!("[link_status] {v:?}");
    ensure!(
        v.reason
            .as_deref()
            .is_some_and(|r| Refusal::parse(r).is_stale_writer()),
        "{v:?}"
    );
    let (status, _) = other.terminate(Duration::from_secs(15))?;
    ensure!(status.success(), "secondary exited with {status}");

    // A receiver accepting ours: attached, full copy, connected again.
    let mut secondary = secondary_accepting(&pair, GENERATION)?;
    primary.send_signal(libc::SIGUSR2)?;
    wait_link(&pair, LinkCondition::Connected, Duration::from_secs(20))?;
    std::fs::write(pair.mount().join("c"), b"again")?;
    for (name, data) in [("a", &b"replicated"[..]), ("b", b"waits"), ("c", b"again")] {
        assert_eq!(
            std::fs::read(pair.secondary_backing().join(name))?,
            data,
            "{name} on the secondary"
        );
    }
    let (status, _) = primary.terminate(Duration::from_secs(15))?;
    ensure!(status.success(), "primary exited with {status}");
    let (status, _) = secondary.terminate(Duration::from_secs(15))?;
    ensure!(status.success(), "secondary exited with {status}");
    Ok(())
}
