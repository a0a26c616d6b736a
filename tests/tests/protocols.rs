//! The replication protocols (`vmha-fs primary --protocol C|B|flush`) keep their
//! guarantees when a node dies: with C and B every acknowledged write is on the
//! survivor, with flush every fsync-acknowledged write (fsync, fdatasync,
//! O_DSYNC) is; a flush write acknowledged before the peer had it is covered by
//! the activity log and resent by the resync after the peer is lost.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vmha_test_infra::fsctl::{
    attach_and_wait, go_alone_and_wait, last_sync_line, last_sync_was_incremental, signal,
};
use vmha_test_infra::pair::READY_TIMEOUT;
use vmha_test_infra::{assert_same_tree, lazy_unmount_all, Child, Pair, PairOptions};

const BLOCK: usize = 4096;
/// Blocks per phase.
const N: u64 = 64;

/// What the second round of writes puts at block `i` (unlike the first round).
const ROUND2: u64 = 1 << 20;

/// The content written at block `i` in a round (`salt`): unique per block and round.
fn content(i: u64, salt: u64) -> Vec<u8> {
    let i = i + salt;
    let mut b = vec![0u8; BLOCK];
    for (j, x) in b.iter_mut().enumerate() {
        *x = (i as usize * 31 + j / 64) as u8 ^ 0x5a;
    }
    b[..8].copy_from_slice(&i.to_le_bytes());
    b
}

fn write_blocks(f: &File, range: std::ops::Range<u64>) -> Result<()> {
    write_round(f, range, 0)
}

fn write_round(f: &File, range: std::ops::Range<u64>, salt: u64) -> Result<()> {
    for i in range {
        f.write_all_at(&content(i, salt), i * BLOCK as u64)
            .with_context(|| format!("write block {i}"))?;
    }
    Ok(())
}

/// Blocks of `range` whose content in `path` is not what was written.
fn missing(path: &Path, range: std::ops::Range<u64>) -> Result<Vec<u64>> {
    missing_round(path, range, 0)
}

fn missing_round(path: &Path, range: std::ops::Range<u64>, salt: u64) -> Result<Vec<u64>> {
    let f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut buf = vec![0u8; BLOCK];
    let mut out = Vec::new();
    for i in range {
        let n = f.read_at(&mut buf, i * BLOCK as u64)?;
        if n != BLOCK || buf != content(i, salt) {
            out.push(i);
        }
    }
    Ok(out)
}

/// Waits (bounded) until `path` holds `range`: the receiver may still be applying
/// what it received when the writer died.
fn expect_on_survivor(path: &Path, range: std::ops::Range<u64>, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let lost = missing(path, range.clone())?;
        if lost.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{what}: {} of {} blocks missing on the survivor (first {:?})",
                lost.len(),
                range.end - range.start,
                &lost[..lost.len().min(8)]
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Writes (phase 1) then fsync; writes without sync (phase 2); O_DSYNC writes
/// (phase 3); SIGKILL of the primary. Returns the pair for the checks.
fn write_then_kill_primary(protocol: &'static str) -> Result<Pair> {
    write_then_kill_primary_with(PairOptions {
        protocol: Some(protocol),
        ..PairOptions::default()
    })
}

/// `disk.img`, new and empty, in the pair's mount: its path and an open file.
fn create_image(pair: &Pair) -> Result<(std::path::PathBuf, File)> {
    let path = pair.mount().join("disk.img");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .with_context(|| format!("create {}", path.display()))?;
    Ok((path, f))
}

fn write_then_kill_primary_with(opts: PairOptions) -> Result<Pair> {
    let mut pair = Pair::start(opts)?;
    let (path, f) = create_image(&pair)?;
    write_blocks(&f, 0..N)?;
    f.sync_all().context("fsync")?;
    write_blocks(&f, N..2 * N)?;
    let dsync = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DSYNC)
        .open(&path)?;
    write_blocks(&dsync, 2 * N..3 * N)?;
    pair.kill_primary()?;
    Ok(pair)
}

fn primary_kill_keeps(protocol: &'static str, every_acknowledged: bool) -> Result<()> {
    let pair = write_then_kill_primary(protocol)?;
    let replica = pair.secondary_backing().join("disk.img");
    expect_on_survivor(&replica, 0..N, &format!("{protocol}: fsynced writes"))?;
    expect_on_survivor(
        &replica,
        2 * N..3 * N,
        &format!("{protocol}: O_DSYNC writes"),
    )?;
    if every_acknowledged {
        expect_on_survivor(
            &replica,
            N..2 * N,
            &format!("{protocol}: acknowledged writes"),
        )?;
    }
    Ok(())
}

#[test]
fn protocol_c_keeps_every_acknowledged_write_when_the_primary_dies() -> Result<()> {
    primary_kill_keeps("C", true)
}

#[test]
fn protocol_b_keeps_every_acknowledged_write_when_the_primary_dies() -> Result<()> {
    primary_kill_keeps("B", true)
}

/// A receiver of the release before protocol B (replication protocol 6, no
/// receipts): the pair negotiates 6 and replicates, and B runs as C (every
/// acknowledged write is there when the primary dies).
#[test]
fn protocol_b_with_an_older_receiver_runs_at_its_version_as_c() -> Result<()> {
    let mut pair = write_then_kill_primary_with(PairOptions {
        protocol: Some("B"),
        secondary_versions: Some("5..=6"),
        ..PairOptions::default()
    })?;
    let log = pair.primary().map(|p| p.stderr_text()).unwrap_or_default();
    if !log.contains("replication session: protocol 6") {
        bail!("the pair did not settle on protocol 6:\n{log}");
    }
    let replica = pair.secondary_backing().join("disk.img");
    expect_on_survivor(&replica, 0..3 * N, "B with a protocol-6 receiver")?;
    Ok(())
}

/// A receiver of the release before the payload-digest MAC (replication
/// protocol 8): the pair settles on 8 and frames are authenticated the old way
/// (a 1 MiB write, sent before its tag, as well as 4 KiB ones); what was
/// acknowledged is on the receiver when the primary dies. The same pair of
/// this release settles on 9.
#[test]
fn a_protocol_8_receiver_is_sent_frames_it_can_authenticate() -> Result<()> {
    for (versions, expect) in [(Some("5..=8"), 8), (None, vmha_fs::wire::PROTOCOL_VERSION)] {
        let mut pair = Pair::start(PairOptions {
            secondary_versions: versions,
            ..PairOptions::default()
        })?;
        let (_, f) = create_image(&pair)?;
        write_blocks(&f, 0..N)?;
        let big: Vec<u8> = (0..1u32 << 20).map(|i| (i % 241) as u8).collect();
        f.write_all_at(&big, 1 << 20).context("1 MiB write")?;
        pair.kill_primary()?;
        let log = pair.primary().map(|p| p.stderr_text()).unwrap_or_default();
        if !log.contains(&format!("replication session: protocol {expect}")) {
            bail!("the pair did not settle on protocol {expect}:\n{log}");
        }
        let replica = pair.secondary_backing().join("disk.img");
        expect_on_survivor(&replica, 0..N, &format!("protocol {expect}"))?;
        let mut got = vec![0u8; big.len()];
        File::open(&replica)?
            .read_exact_at(&mut got, 1 << 20)
            .context("read the 1 MiB write on the receiver")?;
        if got != big {
            bail!("protocol {expect}: the 1 MiB write differs on the receiver");
        }
    }
    Ok(())
}

/// A file written and fdatasynced in turn (a database's commit) is synced
/// early on both nodes: each node starts the file's sync as soon as the write
/// is done there, and the fdatasync is answered by those syncs. With time
/// between the write and the fdatasync, the receiver's sync is done and said
/// (`Synced`, replication protocol 10) before the fdatasync comes, which then
/// needs no round trip; without the time, the fdatasync on its way is
/// answered by that `Synced`, not by its own later acknowledgement. Every
/// fdatasync-acknowledged write is on the survivor
/// when the primary dies. A protocol-9 receiver says nothing (the writer would
/// take it for garbage): every fdatasync asks it, and the link holds.
#[test]
fn a_file_written_and_synced_in_turn_is_synced_early_on_both_nodes() -> Result<()> {
    for (versions, expect) in [(None, vmha_fs::wire::PROTOCOL_VERSION), (Some("5..=9"), 9)] {
        let mut pair = Pair::start(PairOptions {
            secondary_versions: versions,
            ..PairOptions::default()
        })?;
        let (_, f) = create_image(&pair)?;
        for i in 0..N {
            f.write_all_at(&content(i, 0), i * BLOCK as u64)
                .with_context(|| format!("write block {i}"))?;
            std::thread::sleep(Duration::from_millis(5));
            f.sync_data()
                .with_context(|| format!("fdatasync after block {i}"))?;
        }
        let m = pair.wait_metrics("the fdatasyncs", |m| m.fsync_latency.count >= N)?;
        eprintln!("[early sync] protocol {expect}: {m:?}");
        // The first writes teach the pattern (the truncate at the open counts
        // as a change); every later one is synced early here.
        assert!(m.early_syncs >= N - 3, "protocol {expect}: {m:?}");
        assert!(m.fsyncs_early >= N - 3, "protocol {expect}: {m:?}");
        if expect >= vmha_fs::wire::SYNCED_SINCE {
            assert!(
                m.fsyncs_peer_early >= N / 2,
                "the receiver's early syncs spared the round trip of few fdatasyncs: {m:?}"
            );
        } else {
            assert_eq!(m.fsyncs_peer_early, 0, "{m:?}");
        }
        // Without the pause the fdatasync is on its way when the receiver's
        // sync ends: the receiver's `Synced`, ahead of the fdatasync's
        // acknowledgement, answers it (the writer does not wait for the ack).
        let before = m.fsyncs_peer_early;
        for i in N..2 * N {
            f.write_all_at(&content(i, 0), i * BLOCK as u64)
                .with_context(|| format!("write block {i}"))?;
            f.sync_data()
                .with_context(|| format!("fdatasync after block {i}"))?;
        }
        let m = pair.wait_metrics("the fdatasyncs without a pause", |m| {
            m.fsync_latency.count >= 2 * N
        })?;
        eprintln!("[early sync, no pause] protocol {expect}: {m:?}");
        if expect >= vmha_fs::wire::SYNCED_SINCE {
            assert!(
                m.fsyncs_peer_early - before >= N / 2,
                "the receiver's Synced answered few fdatasyncs in flight: {} of {N}",
                m.fsyncs_peer_early - before
            );
        } else {
            assert_eq!(m.fsyncs_peer_early, 0, "{m:?}");
        }
        pair.kill_primary()?;
        let log = pair.primary().map(|p| p.stderr_text()).unwrap_or_default();
        if !log.contains(&format!("replication session: protocol {expect}")) {
            bail!("the pair did not settle on protocol {expect}:\n{log}");
        }
        if log.contains("unexpected message") || log.contains("connection lost") {
            bail!("protocol {expect}: the link broke:\n{log}");
        }
        let replica = pair.secondary_backing().join("disk.img");
        expect_on_survivor(
            &replica,
            0..2 * N,
            &format!("early syncs, protocol {expect}"),
        )?;
    }
    Ok(())
}

#[test]
fn protocol_flush_keeps_every_synced_write_when_the_primary_dies() -> Result<()> {
    primary_kill_keeps("flush", false)
}

#[test]
fn an_unknown_protocol_is_refused_with_a_clear_message() -> Result<()> {
    let pair = Pair::prepare(PairOptions::default())?;
    let out = pair
        .primary_command()
        .args(["--protocol", "A"])
        .output()
        .context("run vmha-fs primary")?;
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || !err.contains("expected C, B or flush") {
        bail!(
            "expected a refusal naming C, B, flush; got {}: {err}",
            out.status
        );
    }
    Ok(())
}

/// With flush, writes return while the peer is frozen (applied here, queued for
/// it); the peer then dies with them unacknowledged, the writer goes on alone,
/// and the resync after a new peer attaches resends them from the records (an
/// incremental resync, both copies identical afterwards).
#[test]
fn flush_writes_the_peer_never_got_are_resent_by_the_resync() -> Result<()> {
    let pair = Pair::prepare(PairOptions::default())?;
    let state = pair.primary_state().to_path_buf();
    let mut sec = Child::spawn("secondary", pair.secondary_command())?;
    sec.wait_ready(READY_TIMEOUT)?;
    let mut cmd = pair.alone_primary_command();
    // A lock timeout far beyond the test: the frozen peer must not fail the link.
    cmd.args(["--protocol", "flush", "--lock-timeout-ms", "120000"]);
    let mut pri = Child::spawn("primary", cmd)?;
    pri.wait_ready(READY_TIMEOUT)?;
    // A first attach gives both copies a complete common history.
    attach_and_wait(&pri, &state)?;
    let (_, f) = create_image(&pair)?;
    write_blocks(&f, 0..4 * N)?;
    f.sync_all().context("fsync")?;
    signal(sec.pid(), libc::SIGSTOP)?;
    // Answered although the peer applies nothing: queued for it, in order.
    let started = Instant::now();
    write_round(&f, N..2 * N, ROUND2)?;
    let took = started.elapsed();
    if took > Duration::from_secs(30) {
        bail!("flush writes waited for the frozen peer ({took:?})");
    }
    sec.kill()?;
    lazy_unmount_all(pair.secondary_backing())?;
    go_alone_and_wait(&pri, &state)?;
    // The old peer's copy lacks them: only the records can say so.
    let replica = pair.secondary_backing().join("disk.img");
    let lacking = missing_round(&replica, N..2 * N, ROUND2)?;
    if lacking.is_empty() {
        bail!("the frozen peer had the writes: the test proves nothing");
    }
    eprintln!(
        "{} of {N} acknowledged blocks were not on the peer when it died",
        lacking.len()
    );
    sec = Child::spawn("secondary-again", pair.secondary_command())?;
    sec.wait_ready(READY_TIMEOUT)?;
    let sync = attach_and_wait(&pri, &state)?;
    eprintln!("resync: {sync:?}");
    let line = last_sync_line(&pri)?;
    if !last_sync_was_incremental(&pri)? {
        bail!("the resync was not incremental: {line}");
    }
    expect_on_survivor(&replica, 0..N, "after the resync")?;
    expect_on_survivor(&replica, 2 * N..4 * N, "after the resync")?;
    let still = missing_round(&replica, N..2 * N, ROUND2)?;
    if !still.is_empty() {
        bail!(
            "the resync did not resend {} acknowledged flush writes (first {:?})",
            still.len(),
            &still[..still.len().min(8)]
        );
    }
    assert_same_tree(pair.primary_backing(), pair.secondary_backing())?;
    drop(f);
    Ok(())
}
