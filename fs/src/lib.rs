//! vmha-fs: a FUSE filesystem that replicates every mutation of a directory
//! synchronously to a peer node before acknowledging it.

pub mod apply;
pub mod aside;
pub mod atomic;
pub mod buffer;
pub mod compare;
mod fdio;
pub mod inodes;
pub mod key;
pub mod link;
pub mod mounts;
pub mod op;
pub mod preauth;
pub mod primary;
pub mod ratelog;
pub mod receiver;
pub mod refusal;
pub mod resync;
pub mod runtime;
pub mod secondary;
pub mod statedir;
pub mod status;
pub mod track;
pub mod wire;
