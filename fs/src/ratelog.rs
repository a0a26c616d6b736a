//! Rate-limited logging of rejections on a listener.
//!
//! Anyone who can reach a listening socket can make it reject connections or
//! datagrams as fast as the network allows; logging each one would let a stranger
//! fill the disk and drown the lines that matter. A [`RateLog`] logs each kind of
//! rejection at most once per second: the first one at once (with its detail), the
//! rest as a count (`suppressed`) in the next line of that kind, which
//! [`RateLog::tick`] also writes once the flood stops.
//!
//! Lines are `WARN` with the fields `listener`, `kind` and `suppressed` (how many of
//! that kind were not logged since the previous line of that kind).

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The least time between two lines of the same kind.
pub const INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
struct Kind {
    last: Option<Instant>,
    suppressed: u64,
    total: u64,
}

/// Rejection log of one listener.
#[derive(Debug)]
pub struct RateLog {
    listener: &'static str,
    kinds: HashMap<&'static str, Kind>,
}

impl RateLog {
    pub fn new(listener: &'static str) -> Self {
        Self {
            listener,
            kinds: HashMap::new(),
        }
    }

    /// Records one rejection of `kind` from `peer`; logs it unless a line of this
    /// kind was written less than [`INTERVAL`] ago.
    pub fn reject(&mut self, kind: &'static str, peer: &dyn std::fmt::Display, detail: &str) {
        self.reject_at(kind, peer, detail, Instant::now());
    }

    fn reject_at(
        &mut self,
        kind: &'static str,
        peer: &dyn std::fmt::Display,
        detail: &str,
        now: Instant,
    ) -> bool {
        let k = self.kinds.entry(kind).or_default();
        k.total += 1;
        if k.last
            .is_some_and(|t| now.saturating_duration_since(t) < INTERVAL)
        {
            k.suppressed += 1;
            return false;
        }
        let suppressed = std::mem::take(&mut k.suppressed);
        k.last = Some(now);
        tracing::warn!(
            listener = self.listener,
            kind,
            suppressed,
            total = k.total,
            %peer,
            "rejected: {detail}"
        );
        true
    }

    /// Writes the counts of rejections not logged yet, for kinds whose last line is
    /// at least [`INTERVAL`] old. Call it regularly (every second or more often).
    pub fn tick(&mut self) {
        self.tick_at(Instant::now());
    }

    fn tick_at(&mut self, now: Instant) -> usize {
        let mut written = 0;
        for (kind, k) in &mut self.kinds {
            let due = k
                .last
                .is_none_or(|t| now.saturating_duration_since(t) >= INTERVAL);
            if k.suppressed > 0 && due {
                let suppressed = std::mem::take(&mut k.suppressed);
                k.last = Some(now);
                written += 1;
                tracing::warn!(
                    listener = self.listener,
                    kind = *kind,
                    suppressed,
                    total = k.total,
                    "rejected {suppressed} more since the last report"
                );
            }
        }
        written
    }

    /// Rejections of `kind` so far.
    pub fn total(&self, kind: &str) -> u64 {
        self.kinds.get(kind).map_or(0, |k| k.total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_kind_per_second_and_counts_follow() {
        let mut log = RateLog::new("test");
        let t0 = Instant::now();
        let peer = "peer";
        assert!(log.reject_at("a", &peer, "x", t0));
        assert!(log.reject_at("b", &peer, "x", t0));
        for i in 1..100u64 {
            let at = t0 + Duration::from_millis(i * 5);
            assert!(!log.reject_at("a", &peer, "x", at));
        }
        assert_eq!(log.tick_at(t0 + Duration::from_millis(900)), 0);
        // The flood stopped: the next tick reports its count once.
        assert_eq!(log.tick_at(t0 + Duration::from_millis(1000)), 1);
        assert_eq!(log.tick_at(t0 + Duration::from_millis(3000)), 0);
        assert_eq!(log.total("a"), 100);
        // Next second: logged at once again.
        assert!(!log.reject_at("a", &peer, "x", t0 + Duration::from_millis(1500)));
        assert!(log.reject_at("a", &peer, "x", t0 + Duration::from_millis(2000)));
    }
}
