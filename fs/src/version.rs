//! Protocol version ranges: how two nodes on different releases still talk.
//!
//! Every protocol between the nodes (replication here, vmhad's heartbeats and
//! its daemon channel in the controller) advertises the range of versions this
//! build speaks, `min..=max`, and both sides use the highest version in both
//! ranges. A release that changes a protocol adds a version and keeps the
//! previous one for at least one release, so a rolling upgrade (upgrade the
//! SECOND, swap, upgrade the other) never has a pair that cannot talk. Disjoint
//! ranges are refused with an error naming both ranges.
//!
//! Test hook: an environment variable per protocol (for replication
//! [`REPLICATION_ENV`], `VMHA_TEST_REPLICATION_VERSIONS`) narrows the advertised
//! range to a sub-range, written `MAX` or `MIN..=MAX`, so that a test can run a
//! pair whose sides advertise different versions without building an old tree.
//! Operators have no reason to set it; a value outside the supported range is
//! an error, never silently ignored.

use serde::{Deserialize, Serialize};

/// Test only: narrows the replication protocol range vmha-fs advertises.
pub const REPLICATION_ENV: &str = "VMHA_TEST_REPLICATION_VERSIONS";

/// Errors of version ranges and their test hook.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    #[error("{var} = `{value}` is not a version range (`MAX` or `MIN..=MAX`)")]
    Syntax { var: String, value: String },
    #[error("{var} = `{value}` is not within the supported versions {supported}")]
    Outside {
        var: String,
        value: String,
        supported: Versions,
    },
}

/// The versions of one protocol a side speaks, `min..=max` (never empty).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Versions {
    pub min: u16,
    pub max: u16,
}

impl std::fmt::Display for Versions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}..={}", self.min, self.max)
        }
    }
}

impl Versions {
    /// `min..=max`; `None` when empty.
    pub const fn new(min: u16, max: u16) -> Option<Versions> {
        if min <= max {
            Some(Versions { min, max })
        } else {
            None
        }
    }

    pub fn contains(self, version: u16) -> bool {
        self.min <= version && version <= self.max
    }

    /// The highest version both sides speak.
    pub fn highest_common(self, other: Versions) -> Option<u16> {
        let top = self.max.min(other.max);
        (top >= self.min.max(other.min)).then_some(top)
    }

    /// Parses `MAX` (keeps `self.min`, or `MAX` itself when lower) or
    /// `MIN..=MAX`; the result must lie within `self`.
    pub fn narrowed(self, var: &str, value: &str) -> Result<Versions, VersionError> {
        let syntax = || VersionError::Syntax {
            var: var.to_string(),
            value: value.to_string(),
        };
        let number = |s: &str| s.trim().parse::<u16>().map_err(|_| syntax());
        let range = match value.split_once("..=") {
            Some((min, max)) => Versions::new(number(min)?, number(max)?).ok_or_else(syntax)?,
            None => {
                let max = number(value)?;
                Versions {
                    min: self.min.min(max),
                    max,
                }
            }
        };
        if !(self.contains(range.min) && self.contains(range.max)) {
            return Err(VersionError::Outside {
                var: var.to_string(),
                value: value.to_string(),
                supported: self,
            });
        }
        Ok(range)
    }

    /// `self`, narrowed by the environment variable `var` when it is set.
    pub fn from_env(self, var: &str) -> Result<Versions, VersionError> {
        match std::env::var(var) {
            Ok(value) => self.narrowed(var, &value),
            Err(std::env::VarError::NotPresent) => Ok(self),
            Err(std::env::VarError::NotUnicode(raw)) => Err(VersionError::Syntax {
                var: var.to_string(),
                value: raw.to_string_lossy().into_owned(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(min: u16, max: u16) -> Versions {
        Versions::new(min, max).unwrap_or_else(|| panic!("empty {min}..={max}"))
    }

    #[test]
    fn the_highest_common_version_wins() {
        assert_eq!(v(5, 6).highest_common(v(5, 6)), Some(6));
        assert_eq!(v(5, 6).highest_common(v(4, 5)), Some(5));
        assert_eq!(v(5, 6).highest_common(v(6, 9)), Some(6));
        assert_eq!(v(5, 6).highest_common(v(7, 9)), None);
        assert_eq!(v(5, 6).highest_common(v(1, 4)), None);
        assert_eq!(Versions::new(3, 2), None);
        assert_eq!(v(5, 6).to_string(), "5..=6");
        assert_eq!(v(5, 5).to_string(), "5");
    }

    #[test]
    fn the_test_hook_narrows_and_never_widens() {
        let ours = v(5, 6);
        assert_eq!(ours.narrowed("X", "5"), Ok(v(5, 5)));
        assert_eq!(ours.narrowed("X", "6..=6"), Ok(v(6, 6)));
        assert_eq!(ours.narrowed("X", " 5 ..= 6 "), Ok(v(5, 6)));
        assert!(matches!(
            ours.narrowed("X", "7"),
            Err(VersionError::Outside { .. })
        ));
        assert!(matches!(
            ours.narrowed("X", "4..=6"),
            Err(VersionError::Outside { .. })
        ));
        let e = ours.narrowed("X", "six").err().map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("X = `six` is not a version range (`MAX` or `MIN..=MAX`)")
        );
        assert!(ours.narrowed("X", "6..=5").is_err());
    }
}
