//! The primary's counters for `STATEDIR/metrics.json` (see
//! [`crate::status::FsMetrics`]): relaxed atomics, so the write path pays an
//! add or two and never a lock; the status thread reads them once a second.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use crate::status::{latency_bucket, Latencies, Stages, LATENCY_BOUNDS_US};

/// A latency histogram with the fixed buckets of [`LATENCY_BOUNDS_US`].
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl LatencyHistogram {
    pub fn observe(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        if let Some(bucket) = self.buckets.get(latency_bucket(us)) {
            bucket.fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    pub fn snapshot(&self) -> Latencies {
        Latencies {
            buckets: self.buckets.iter().map(|b| b.load(Relaxed)).collect(),
            count: self.count.load(Relaxed),
            sum_us: self.sum_us.load(Relaxed),
        }
    }
}

/// What the primary counts on its write path.
#[derive(Debug, Default)]
pub struct PrimaryMetrics {
    replicated_bytes: AtomicU64,
    replicated_ops: AtomicU64,
    pub write_latency: LatencyHistogram,
    pub fsync_latency: LatencyHistogram,
    /// Per-stage sums of replicated writes and fsyncs.
    pub write_stages: StageSums,
    pub fsync_stages: StageSums,
    /// Early syncs started after a write (see [`crate::presync`]).
    pub early_syncs: AtomicU64,
    /// fdatasyncs answered here by an early sync.
    pub fsyncs_early: AtomicU64,
    /// fdatasyncs the peer's early sync answered too: before they were sent
    /// (no round trip) or in flight (its `Synced`, ahead of their ack).
    pub fsyncs_peer_early: AtomicU64,
    /// O_DIRECT writes applied here through the page cache.
    pub cached_writes: AtomicU64,
}

/// Per-stage duration sums of one kind of operation (see [`Stages`]).
#[derive(Debug, Default)]
pub struct StageSums {
    count: AtomicU64,
    peer_last: AtomicU64,
    record: AtomicU64,
    send: AtomicU64,
    local: AtomicU64,
    peer: AtomicU64,
    peer_busy: AtomicU64,
    reply: AtomicU64,
    total: AtomicU64,
}

impl StageSums {
    pub fn snapshot(&self) -> Stages {
        Stages {
            count: self.count.load(Relaxed),
            peer_last: self.peer_last.load(Relaxed),
            record_ns: self.record.load(Relaxed),
            send_ns: self.send.load(Relaxed),
            local_ns: self.local.load(Relaxed),
            peer_ns: self.peer.load(Relaxed),
            peer_busy_ns: self.peer_busy.load(Relaxed),
            reply_ns: self.reply.load(Relaxed),
            total_ns: self.total.load(Relaxed),
        }
    }
}

/// The timestamps of one replicated operation on its way through the writer,
/// in nanoseconds since the FUSE request arrived: a few relaxed stores per
/// operation, added to a [`StageSums`] when the reply is out.
#[derive(Debug)]
pub struct Trace {
    started: Instant,
    recorded: AtomicU64,
    sent: AtomicU64,
    local: AtomicU64,
    /// The last of the operation's acknowledgements.
    acked: AtomicU64,
    /// The receiver's own time on the operation, as its acknowledgements say.
    peer_busy: AtomicU64,
}

impl Trace {
    pub fn new(started: Instant) -> Self {
        Self {
            started,
            recorded: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            local: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            peer_busy: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    pub fn recorded(&self) {
        self.recorded.store(self.now(), Relaxed);
    }

    pub fn sent(&self) {
        self.sent.store(self.now(), Relaxed);
    }

    pub fn local_done(&self) {
        self.local.store(self.now(), Relaxed);
    }

    /// One of the peer's acknowledgements arrived; the receiver spent
    /// `busy_ns` on it.
    pub fn acked(&self, busy_ns: u64) {
        self.acked.fetch_max(self.now(), Relaxed);
        self.peer_busy.fetch_add(busy_ns, Relaxed);
    }

    /// The reply is out: adds this operation's stages to `sums`.
    pub fn replied(&self, sums: &StageSums) {
        let end = self.now();
        let recorded = self.recorded.load(Relaxed);
        let sent = self.sent.load(Relaxed).max(recorded);
        let local = self.local.load(Relaxed).max(sent);
        let acked = self.acked.load(Relaxed).max(sent);
        let both = local.max(acked);
        sums.count.fetch_add(1, Relaxed);
        if acked > local {
            sums.peer_last.fetch_add(1, Relaxed);
        }
        sums.record.fetch_add(recorded, Relaxed);
        sums.send.fetch_add(sent - recorded, Relaxed);
        sums.local.fetch_add(local - sent, Relaxed);
        sums.peer.fetch_add(acked - sent, Relaxed);
        sums.peer_busy
            .fetch_add(self.peer_busy.load(Relaxed), Relaxed);
        sums.reply.fetch_add(end.saturating_sub(both), Relaxed);
        sums.total.fetch_add(end, Relaxed);
    }
}

impl PrimaryMetrics {
    /// An operation carrying `bytes` of data went to a replicating peer.
    pub fn replicated(&self, bytes: u64) {
        self.replicated_ops.fetch_add(1, Relaxed);
        self.replicated_bytes.fetch_add(bytes, Relaxed);
    }

    /// The file's content; the tracker's counters come from the caller.
    pub fn snapshot(&self, activity_log_writes: u64, dirty_bytes: u64) -> crate::status::FsMetrics {
        crate::status::FsMetrics {
            activity_log_writes,
            dirty_bytes,
            fsync_latency: self.fsync_latency.snapshot(),
            replicated_bytes: self.replicated_bytes.load(Relaxed),
            replicated_ops: self.replicated_ops.load(Relaxed),
            write_latency: self.write_latency.snapshot(),
            write_stages: self.write_stages.snapshot(),
            fsync_stages: self.fsync_stages.snapshot(),
            early_syncs: self.early_syncs.load(Relaxed),
            fsyncs_early: self.fsyncs_early.load(Relaxed),
            fsyncs_peer_early: self.fsyncs_peer_early.load(Relaxed),
            cached_writes: self.cached_writes.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn histogram_counts_each_latency_in_its_bucket() {
        let h = LatencyHistogram::default();
        h.observe(Duration::from_micros(10));
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let s = h.snapshot();
        assert_eq!(s.buckets.len(), LATENCY_BOUNDS_US.len() + 1);
        assert_eq!(s.buckets[0], 2);
        // 3 ms: above 2.5 ms, at most 10 ms.
        assert_eq!(s.buckets[latency_bucket(10_000)], 1);
        assert_eq!(s.buckets[LATENCY_BOUNDS_US.len()], 1);
        assert_eq!(s.count, 4);
        assert_eq!(s.sum_us, 10 + 50 + 3_000 + 60_000_000);
        let m = PrimaryMetrics::default();
        m.replicated(4096);
        m.replicated(0);
        let f = m.snapshot(2, 8192);
        assert_eq!((f.replicated_ops, f.replicated_bytes), (2, 4096));
        assert_eq!((f.activity_log_writes, f.dirty_bytes), (2, 8192));
    }

    #[test]
    fn a_trace_adds_each_stage_once() {
        let sums = StageSums::default();
        let t = Trace::new(Instant::now());
        t.recorded();
        t.sent();
        std::thread::sleep(Duration::from_millis(2));
        t.local_done();
        std::thread::sleep(Duration::from_millis(2));
        t.acked(1000);
        t.replied(&sums);
        let s = sums.snapshot();
        assert_eq!((s.count, s.peer_last, s.peer_busy_ns), (1, 1, 1000));
        // The peer came last: total = record + send + peer + reply.
        assert_eq!(s.total_ns, s.record_ns + s.send_ns + s.peer_ns + s.reply_ns);
        assert!(s.peer_ns >= 4_000_000 && s.local_ns >= 2_000_000);
        assert!(s.local_ns < s.peer_ns);
    }
}
