//! The daemon's wall clock: for display only (event log timestamps).
//!
//! Nothing that decides anything reads the wall clock: ages, timeouts and
//! failover use [`std::time::Instant`] (monotonic), and heartbeat replay
//! protection uses per-boot sessions and counters ([`crate::heartbeat`]). A
//! node whose wall clock steps (an NTP step, a manual `date`) or disagrees with
//! its peer's therefore keeps its cluster; only its log timestamps move.
//!
//! Test hook: the environment variable [`OFFSET_ENV`]
//! (`VMHA_TEST_CLOCK_OFFSET_S`, a whole number of seconds, may be negative)
//! offsets `vmhad`'s wall clock, and [`WallClock::set_offset`] steps an
//! in-process daemon's clock while it runs. They exist so that tests can show
//! the property above without changing the machine's clock; operators have no
//! reason to set them.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Test only: offsets `vmhad`'s wall clock by this many seconds.
pub const OFFSET_ENV: &str = "VMHA_TEST_CLOCK_OFFSET_S";

/// Errors reading the test offset.
#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    #[error("{OFFSET_ENV} = `{0}` is not a whole number of seconds")]
    BadOffset(String),
}

/// A wall clock, possibly offset (test hook). Clones share the offset.
#[derive(Debug, Clone, Default)]
pub struct WallClock {
    offset_ms: Arc<AtomicI64>,
}

impl WallClock {
    /// The system clock, not offset.
    pub fn system() -> WallClock {
        WallClock::default()
    }

    /// The system clock offset by `offset_s` seconds.
    pub fn with_offset(offset_s: i64) -> WallClock {
        let clock = WallClock::default();
        clock.set_offset(offset_s);
        clock
    }

    /// The system clock, offset by [`OFFSET_ENV`] when it is set.
    pub fn from_env() -> Result<WallClock, ClockError> {
        match std::env::var(OFFSET_ENV) {
            Ok(text) => {
                let offset = text
                    .trim()
                    .parse::<i64>()
                    .map_err(|_| ClockError::BadOffset(text.clone()))?;
                Ok(WallClock::with_offset(offset))
            }
            Err(std::env::VarError::NotPresent) => Ok(WallClock::system()),
            Err(std::env::VarError::NotUnicode(raw)) => {
                Err(ClockError::BadOffset(raw.to_string_lossy().into_owned()))
            }
        }
    }

    /// Steps the clock to the system time plus `offset_s` seconds (test hook).
    pub fn set_offset(&self, offset_s: i64) {
        self.offset_ms
            .store(offset_s.saturating_mul(1000), Ordering::Relaxed);
    }

    /// The current offset in seconds.
    pub fn offset_s(&self) -> i64 {
        self.offset_ms.load(Ordering::Relaxed) / 1000
    }

    /// The current (offset) wall time.
    pub fn now(&self) -> SystemTime {
        let now = SystemTime::now();
        let offset = self.offset_ms.load(Ordering::Relaxed);
        let shift = Duration::from_millis(offset.unsigned_abs());
        let shifted = if offset >= 0 {
            now.checked_add(shift)
        } else {
            now.checked_sub(shift)
        };
        shifted.unwrap_or(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_moves_the_clock_both_ways_and_clones_share_it() {
        let clock = WallClock::with_offset(600);
        let shared = clock.clone();
        let ahead = clock.now().duration_since(SystemTime::now()).unwrap();
        assert!(ahead > Duration::from_secs(599), "{ahead:?}");
        shared.set_offset(-600);
        assert_eq!(clock.offset_s(), -600);
        let behind = SystemTime::now().duration_since(clock.now()).unwrap();
        assert!(behind > Duration::from_secs(599), "{behind:?}");
        assert_eq!(WallClock::system().offset_s(), 0);
    }
}
