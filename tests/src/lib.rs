//! Test infrastructure for vmha: a replicated pair (primary FUSE mount + secondary
//! receiver) on one machine, process and mount guards, and tree snapshots to compare
//! the two replicas; a writer/receiver pair across a veth for resync tests and the
//! resync benchmark ([`resync`]); simulated libvirt nodes in namespaces ([`node`]) and the tiny
//! counter guest ([`guest`]).

pub mod aligned;
pub mod bin;
pub mod browser;
pub mod cluster_vm;
pub mod console_demo;
pub mod forward;
pub mod fsctl;
pub mod fsops;
pub mod fuse_uring;
pub mod guest;
pub mod hostlink;
pub mod loopfs;
pub mod mounts;
pub mod node;
pub mod pair;
pub mod ports;
pub mod proc;
pub mod resync;
pub mod scenario;
pub mod tree;
pub mod vmctl_status;

pub use aligned::AlignedBuf;
pub use bin::vmha_fs_bin;
pub use loopfs::LoopFs;
pub use mounts::{is_mount_point, lazy_unmount_all, mounts_at_or_under, MountGuard};
pub use pair::{Pair, PairOptions};
pub use proc::Child;
pub use tree::{assert_same_tree, diff, snapshot, Tree};
