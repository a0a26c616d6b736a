//! Mount table lookups for the benchmarks: vmha-fs's parser and the test
//! crate's lazy unmounts and guards (one implementation of each).

use std::path::Path;

use anyhow::{Context, Result};
pub use vmha_test_infra::mounts::{lazy_unmount_all, MountGuard};

/// The filesystem type of the topmost mount at exactly `path`, if any.
pub fn fstype_at(path: &Path) -> Result<Option<String>> {
    Ok(vmha_fs::mounts::mounts_at(path)
        .context("read mountinfo")?
        .pop())
}
