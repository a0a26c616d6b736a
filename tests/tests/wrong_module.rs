//! The handshake binds the module (name and port): a primary that reaches another
//! module's receiver — here one that would also refuse its generation — is refused
//! as "wrong module", and is never taken for a fenced (stale) writer.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use vmha_fs::refusal::Refusal;
use vmha_fs::status::{LinkCondition, LinkStatus, StatusFile, SyncPhase, SyncStatus};
use vmha_test_infra::proc::Child;
use vmha_test_infra::{Pair, PairOptions};

#[test]
fn a_primary_of_another_module_is_refused_as_wrong_module_not_fenced() -> Result<()> {
    let pair = Pair::prepare(PairOptions::default())?;
    // Module vm2's receiver, accepting a generation the primary does not claim.
    let mut cmd = pair.secondary_command();
    cmd.args(["--module", "vm2", "--accept-generation", "11111111"]);
    let mut secondary = Child::spawn("secondary", cmd)?;
    secondary.wait_ready(Duration::from_secs(20))?;

    // A connecting primary of module vm1 fails to start, naming both modules.
    let mut cmd = pair.primary_command();
    cmd.args(["--module", "vm1", "--generation", "00c0ffee"]);
    let mut connected = Child::spawn("primary", cmd)?;
    let status = connected.wait_exit(Duration::from_secs(20))?;
    let stderr = connected.stderr_text();
    ensure!(
        !status.success(),
        "started against another module: {stderr}"
    );
    ensure!(
        stderr.contains("wrong module") && stderr.contains("vm1") && stderr.contains("vm2"),
        "{stderr}"
    );
    ensure!(!stderr.contains("stale writer"), "{stderr}");

    // A primary writing alone, asked to attach it: the attach fails as wrong
    // module; the link stays degraded, never fenced.
    let mut cmd = pair.alone_primary_command();
    cmd.args(["--module", "vm1", "--generation", "00c0ffee"]);
    let mut primary = Child::spawn("primary", cmd)?;
    primary.wait_ready(Duration::from_secs(20))?;
    primary.send_signal(libc::SIGUSR2)?;
    let state = pair.primary_state();
    let deadline = Instant::now() + Duration::from_secs(15);
    let sync = loop {
        let read = SyncStatus::read_from(state).ok().flatten();
        if let Some(v) = read.filter(|v| v.state != SyncPhase::Syncing) {
            break v;
        }
        if Instant::now() >= deadline {
            bail!(
                "no sync outcome in {}",
                state.join(SyncStatus::FILE).display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    ensure!(sync.state == SyncPhase::Alone, "{sync:?}");
    ensure!(
        sync.error
            .as_deref()
            .is_some_and(|e| e.contains("wrong module") && !Refusal::parse(e).is_stale_writer()),
        "{sync:?}"
    );
    // Give the status writer a few turns: it must keep saying degraded.
    std::thread::sleep(Duration::from_millis(300));
    let link = LinkStatus::read_from(state)?.context("no link.json")?;
    ensure!(link.state == LinkCondition::Degraded, "{link:?}");
    let (status, _) = primary.terminate(Duration::from_secs(15))?;
    ensure!(status.success(), "primary exited with {status}");
    let (status, _) = secondary.terminate(Duration::from_secs(15))?;
    ensure!(status.success(), "secondary exited with {status}");
    Ok(())
}
