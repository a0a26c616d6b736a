//! The primary's write pipeline: where a mutation's meaning is decided.
//!
//! - [`replicator`]: one type submits every mutation (order, record, send, apply
//!   locally, join, settle); `fuse_fs` only translates FUSE requests into an
//!   [`crate::op::Op`] plus the lock that orders it.
//! - [`joint`]: joins the local and the peer's outcome and is the only place
//!   that judges a disagreement (a pure function with a test per combination).
//! - [`disk`]: this node's own disk; a local media error makes this node, never
//!   the peer, the one that is behind.

pub mod disk;
pub mod joint;
pub mod replicator;

pub use disk::DiskHealth;
pub use joint::Repair;
pub use replicator::Replicator;
