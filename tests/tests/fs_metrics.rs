//! The primary's `STATEDIR/metrics.json`, which vmhad exports on `/metrics`:
//! writes and fsyncs through a connected primary grow the replicated bytes and
//! operations, the latency histograms, the per-stage sums and the activity-log
//! writes; once the primary writes alone, the dirty bytes count what the peer
//! lacks.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

use anyhow::{anyhow, bail, Result};
use vmha_test_infra::{Pair, PairOptions};

#[test]
fn metrics_json_counts_what_the_primary_replicates() -> Result<()> {
    let mut pair = Pair::start(PairOptions::default())?;
    let path = pair.mount().join("disk.img");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    const MIB: u64 = 1 << 20;
    for i in 0..16u64 {
        f.write_all_at(&[7u8; 65536], i * 65536)?;
    }
    f.sync_all()?;
    let connected = pair.wait_metrics("the replicated MiB and an fsync", |m| {
        m.replicated_bytes >= MIB && m.fsync_latency.count >= 1
    })?;
    eprintln!("[fs_metrics] connected: {connected:?}");
    assert!(
        connected.replicated_ops >= 17,
        "16 writes and an fsync: {connected:?}"
    );
    assert!(connected.write_latency.count >= 16, "{connected:?}");
    assert_eq!(
        connected.write_latency.buckets.iter().sum::<u64>(),
        connected.write_latency.count,
        "every write in a bucket"
    );
    assert!(connected.write_latency.sum_us > 0);
    assert!(
        connected.activity_log_writes >= 1,
        "writes while connected go through the activity log: {connected:?}"
    );
    assert_eq!(connected.dirty_bytes, 0, "nothing written alone yet");
    // Where the time went, stage by stage: every replicated write and fsync
    // is counted, the stages add up to no more than the total, and the
    // receiver reports its own time in its acknowledgements.
    let (w, s) = (&connected.write_stages, &connected.fsync_stages);
    assert!(w.count >= 16 && s.count >= 1, "{connected:?}");
    for st in [w, s] {
        assert!(st.total_ns > 0 && st.peer_ns > 0, "{st:?}");
        assert!(
            st.peer_busy_ns > 0,
            "the receiver's time is reported: {st:?}"
        );
        assert!(st.peer_busy_ns <= st.peer_ns, "{st:?}");
        // Per operation, total = record + send + max(local, peer) + reply:
        // summed, the total lies between the sums with the larger of local and
        // peer and with both.
        let serial = st.record_ns + st.send_ns + st.reply_ns;
        assert!(
            st.total_ns >= serial + st.local_ns.max(st.peer_ns),
            "{st:?}"
        );
        assert!(st.total_ns <= serial + st.local_ns + st.peer_ns, "{st:?}");
        assert!(st.peer_last <= st.count);
    }

    // Alone: the controller declared the peer dead. What is written now is
    // marked dirty and no longer counted as replicated.
    pair.kill_secondary()?;
    let pid = pair.primary_pid().ok_or_else(|| anyhow!("no primary"))?;
    // SAFETY: signalling a child process we started, by PID.
    if unsafe { libc::kill(pid as libc::pid_t, libc::SIGUSR1) } != 0 {
        bail!("kill -USR1 {pid}: {}", std::io::Error::last_os_error());
    }
    f.write_all_at(&[9u8; 8192], 0)?;
    f.sync_all()?;
    let alone = pair.wait_metrics("dirty bytes", |m| m.dirty_bytes >= 8192)?;
    eprintln!("[fs_metrics] alone: {alone:?}");
    assert_eq!(
        alone.replicated_bytes, connected.replicated_bytes,
        "nothing is replicated while alone"
    );
    assert!(alone.write_latency.count > connected.write_latency.count);
    Ok(())
}
