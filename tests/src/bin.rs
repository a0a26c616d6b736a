//! Locating the `vmha-fs` binary under test.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

/// Path of the `vmha-fs` binary: `$VMHA_FS_BIN` if set, else `vmha-fs` in the cargo
/// profile directory this test executable was built into (the parent of `deps/`).
pub fn vmha_fs_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("VMHA_FS_BIN") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("VMHA_FS_BIN={} is not a file", p.display());
        }
        return Ok(p);
    }
    let exe = std::env::current_exe().context("current_exe")?;
    let profile_dir = exe
        .ancestors()
        .find(|a| a.file_name().is_some_and(|n| n == "deps"))
        .and_then(|deps| deps.parent())
        .or_else(|| exe.parent())
        .with_context(|| format!("cannot find the profile dir above {}", exe.display()))?;
    let bin = profile_dir.join("vmha-fs");
    if !bin.is_file() {
        bail!(
            "{} does not exist: run `cargo build --workspace --bins` first (or set VMHA_FS_BIN)",
            bin.display()
        );
    }
    Ok(bin)
}
