//! The primary's counters for `STATEDIR/metrics.json` (see
//! [`crate::status::FsMetrics`]): relaxed atomics, so the write path pays an
//! add or two and never a lock; the status thread reads them once a second.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::status::{latency_bucket, Latencies, LATENCY_BOUNDS_US};

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
}
