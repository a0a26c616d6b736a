//! The primary's write pipeline: where a mutation's meaning is decided.
//!
//! - [`replicator`]: one type submits every mutation (order, record, send, apply
//!   locally, join, settle); [`fuse`] only translates FUSE requests into an
//!   [`crate::op::Op`] plus the lock that orders it.
//! - [`joint`]: joins the local and the peer's outcome and is the only place
//!   that judges a disagreement (a pure function with a test per combination).
//! - [`disk`]: this node's own disk; a local media error makes this node, never
//!   the peer, the one that is behind.
//! - the runtime around them: [`run`] (the FUSE session and the controller's
//!   signals; a standby mount, whose writer slot in [`fuse`] stays empty until
//!   a signal activates it in place), `checkpoint` (activity-log retirement), `join` (attach and resync
//!   the peer, verify), `status` (`link.json`, `metrics.json`), [`metrics`] (the counters
//!   behind `metrics.json`).

mod checkpoint;
pub mod disk;
pub mod fuse;
mod join;
pub mod joint;
pub mod metrics;
pub mod replicator;
mod run;
mod status;

pub use disk::DiskHealth;
pub use joint::Repair;
pub use replicator::Replicator;
pub use run::{run, PrimaryConfig};
