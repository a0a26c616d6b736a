//! vmha-fs: a FUSE filesystem that replicates every mutation of a directory
//! synchronously to a peer node before acknowledging it.
//!
//! Public: what the binary, vmhad, the tests and the benchmarks use — the two
//! roles ([`primary::run`], [`secondary::run`]), the wire protocol and the
//! operation type (for protocol tests), the typed state-directory contract
//! ([`status`], [`atomic`], [`refusal`]), keys, mounts, tracking records. The
//! machinery behind them (link, receiver, resync, apply, save-aside, ...) is
//! crate-private.

// Offsets, lengths and counts cross between u64 (wire, files), usize
// (memory) and u32 (FUSE): every narrowing is explicit and checked.
#![deny(clippy::cast_possible_truncation)]

pub(crate) mod apply;
pub(crate) mod aside;
pub mod atomic;
pub mod buffer;
pub(crate) mod compare;
mod fdio;
pub(crate) mod inodes;
pub mod key;
pub(crate) mod link;
pub mod mounts;
pub mod op;
pub mod preauth;
pub(crate) mod presync;
pub mod primary;
pub mod ratelog;
pub(crate) mod receiver;
pub mod refusal;
pub(crate) mod resync;
pub mod runtime;
pub mod secondary;
pub(crate) mod spin;
pub(crate) mod statedir;
pub mod status;
pub(crate) mod syncset;
pub mod track;
pub mod version;
pub mod wire;
pub mod writeback;

pub use link::Protocol;
pub use resync::{DEFAULT_STREAMS as DEFAULT_RESYNC_STREAMS, MAX_STREAMS as MAX_RESYNC_STREAMS};
pub use writeback::LocalWrites;
