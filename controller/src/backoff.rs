//! Bounded exponential back-off for vmhad's retry loops, so a condition
//! that keeps failing (a receiver that cannot start, a peer that cannot be
//! attached) is retried ever less often, up to a ceiling, and is logged when
//! it starts failing and when it recovers, not at every attempt.

use std::time::{Duration, Instant};

/// The back-off state of one retried operation.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    /// Failures in a row.
    failures: u32,
    /// No attempt before this.
    next: Option<Instant>,
}

impl Backoff {
    /// Waits `first` after the first failure, doubling up to `max`.
    pub fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            failures: 0,
            next: None,
        }
    }

    /// Whether an attempt may be made now.
    pub fn ready(&self, now: Instant) -> bool {
        self.next.is_none_or(|at| now >= at)
    }

    /// Failing at the moment (the last attempt failed).
    pub fn failing(&self) -> bool {
        self.failures > 0
    }

    /// Failures in a row so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The wait after the latest failure.
    pub fn delay(&self) -> Duration {
        let shift = self.failures.saturating_sub(1).min(20);
        self.first.saturating_mul(1 << shift).min(self.max)
    }

    /// Records a failure at `now`; true for the first of a series (log it).
    pub fn fail(&mut self, now: Instant) -> bool {
        self.failures = self.failures.saturating_add(1);
        self.next = Some(now + self.delay());
        self.failures == 1
    }

    /// Records a success; the failures it ends, if any (log the recovery).
    pub fn succeed(&mut self) -> Option<u32> {
        let failures = std::mem::take(&mut self.failures);
        self.next = None;
        (failures > 0).then_some(failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_ceiling_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(8));
        let t = Instant::now();
        assert!(b.ready(t) && !b.failing());
        assert!(b.fail(t));
        assert!(!b.ready(t + Duration::from_millis(999)));
        assert!(b.ready(t + Duration::from_secs(1)));
        let delays: Vec<u64> = (0..5)
            .map(|_| {
                assert!(!b.fail(t));
                b.delay().as_secs()
            })
            .collect();
        assert_eq!(delays, [2, 4, 8, 8, 8]);
        assert_eq!(b.succeed(), Some(6));
        assert!(b.ready(t) && !b.failing());
        assert_eq!(b.succeed(), None);
    }
}
