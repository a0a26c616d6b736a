//! Why a receiver turned a primary away, as a type.
//!
//! On the wire a refusal is a `Refused { reason }` frame whose text the
//! primary logs and publishes (`link.json` `reason`, `sync.json` `error`); a
//! wrong module is refused earlier, in the handshake. The primary must tell a
//! stale writer (fenced: the controller stops it) from every other refusal (a
//! failed attach). [`Refusal`] renders the reason text the receiver sends and
//! classifies what a primary received, so neither side matches on string
//! prefixes of its own.

use std::fmt;

use crate::link::LinkError;
use crate::wire::{Binding, WireError};

/// How a stale-writer refusal's text begins (the wire format since fencing exists).
const STALE_WRITER: &str = "stale writer";
const BUSY: &str = "this receiver already serves a primary";

/// A receiver's refusal of a primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The primary claimed another generation than the accepted one (fencing).
    /// `claimed`/`current` are empty when a peer worded the details otherwise.
    StaleWriter {
        claimed: Option<String>,
        current: String,
    },
    /// The primary's handshake was for another module's directory.
    WrongModule { ours: Binding, theirs: Binding },
    /// Another primary is connected already.
    Busy,
    /// A reason this side does not know (a newer peer).
    Other(String),
}

impl Refusal {
    /// Classifies the reason text of a `Refused` frame.
    pub fn parse(reason: &str) -> Refusal {
        if let Some(rest) = reason.strip_prefix(STALE_WRITER) {
            let details = rest
                .strip_prefix(": claims generation ")
                .and_then(|r| r.split_once(", current is "));
            let (claimed, current) = match details {
                Some((claimed, current)) => (
                    (claimed != "none").then(|| claimed.to_string()),
                    current.to_string(),
                ),
                None => (None, String::new()),
            };
            Refusal::StaleWriter { claimed, current }
        } else if reason == BUSY {
            Refusal::Busy
        } else {
            Refusal::Other(reason.to_string())
        }
    }

    /// The refusal in what a primary's attach failed with, if it was refused.
    pub fn of_link_error(error: &LinkError) -> Option<Refusal> {
        match error {
            LinkError::Protocol { source, .. } => Refusal::of_wire_error(source),
            _ => None,
        }
    }

    /// The refusal a protocol error carries, if any.
    pub fn of_wire_error(error: &WireError) -> Option<Refusal> {
        match error {
            WireError::Refused(reason) => Some(Refusal::parse(reason)),
            WireError::WrongModule { ours, theirs } => Some(Refusal::WrongModule {
                ours: ours.clone(),
                theirs: theirs.clone(),
            }),
            _ => None,
        }
    }

    /// Fenced: the controller must stop this writer, not retry the attach.
    pub fn is_stale_writer(&self) -> bool {
        matches!(self, Refusal::StaleWriter { .. })
    }
}

/// The reason text a receiver sends (and a primary reports).
impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::StaleWriter { claimed, current } => write!(
                f,
                "{STALE_WRITER}: claims generation {}, current is {current}",
                claimed.as_deref().unwrap_or("none")
            ),
            Refusal::WrongModule { ours, theirs } => {
                write!(f, "wrong module: this side is {ours}, the peer is {theirs}")
            }
            Refusal::Busy => f.write_str(BUSY),
            Refusal::Other(reason) => f.write_str(reason),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn reasons_round_trip_in_the_wire_wording() {
        let stale = Refusal::StaleWriter {
            claimed: Some("1".into()),
            current: "2".into(),
        };
        assert_eq!(
            stale.to_string(),
            "stale writer: claims generation 1, current is 2"
        );
        let none = Refusal::StaleWriter {
            claimed: None,
            current: "ab".into(),
        };
        for refusal in [stale, none, Refusal::Busy, Refusal::Other("x".into())] {
            assert_eq!(Refusal::parse(&refusal.to_string()), refusal);
        }
        assert!(Refusal::parse("stale writer (another wording)").is_stale_writer());
        assert!(!Refusal::parse("not a stale writer").is_stale_writer());
    }

    #[test]
    fn wrong_module_is_a_refusal_but_never_fencing() {
        let error = WireError::WrongModule {
            ours: Binding::new("vm1", 7000).unwrap(),
            theirs: Binding::new("vm2", 7000).unwrap(),
        };
        let refusal = Refusal::of_wire_error(&error).unwrap();
        assert!(!refusal.is_stale_writer());
        assert!(refusal.to_string().contains("wrong module"));
        assert_eq!(Refusal::of_wire_error(&WireError::Closed), None);
    }
}
