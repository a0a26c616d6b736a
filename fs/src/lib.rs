//! vmha-fs: a FUSE filesystem that replicates every mutation of a directory
//! synchronously to a peer node before acknowledging it.

pub mod apply;
pub mod buffer;
pub mod key;
pub mod op;
pub mod wire;
