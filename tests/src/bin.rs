//! Locating the workspace binaries under test.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

/// Path of the `vmha-fs` binary: `$VMHA_FS_BIN` if set, else `vmha-fs` in the cargo
/// profile directory this test executable was built into.
pub fn vmha_fs_bin() -> Result<PathBuf> {
    workspace_bin("vmha-fs", "VMHA_FS_BIN")
}

/// A binary of the workspace: `$<env>` if set, else `name` in the cargo profile
/// directory this executable was built into (the parent of `deps/`).
pub fn workspace_bin(name: &str, env: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("{env}={} is not a file", p.display());
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
    let bin = profile_dir.join(name);
    if !bin.is_file() {
        bail!(
            "{} does not exist: run `cargo build --workspace --bins` first (or set {env})",
            bin.display()
        );
    }
    Ok(bin)
}
