//! A qcow2 image written by QEMU's own tools with cache=none (O_DIRECT) through
//! the mount is byte-identical and consistent on the secondary.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use vmha_test_infra::{assert_same_tree, Pair, PairOptions};

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("{cmd:?} failed ({}):\n{text}", out.status);
    }
    Ok(text)
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn file_hash(p: &Path) -> Result<blake3::Hash> {
    let f = std::fs::File::open(p).with_context(|| format!("open {}", p.display()))?;
    let mut h = blake3::Hasher::new();
    h.update_reader(&f)?;
    Ok(h.finalize())
}

#[test]
fn qcow2_written_with_cache_none_replicates() -> Result<()> {
    for tool in ["qemu-img", "qemu-io"] {
        if !have(tool) {
            bail!("{tool} not found: install qemu-utils");
        }
    }
    let pair = Pair::start(PairOptions::default())?;
    let img = pair.mount().join("vm.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("256M"))?;
    let io = run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-t", "none"])
        .args(["-c", "write -P 0xab 0 4M"])
        .args(["-c", "write -P 0xcd 100M 8M"])
        .args(["-c", "discard 0 1M"])
        .args(["-c", "flush"])
        .arg(&img))?;
    eprintln!("qemu-io:\n{io}");
    // qemu-io reports failed commands on stderr but still exits 0.
    if io.to_ascii_lowercase().contains("failed") || io.contains("error") {
        bail!("qemu-io reported an error:\n{io}");
    }
    // Check the data is there through the mount before comparing replicas.
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-r", "-t", "none"])
        .args(["-c", "read -P 0xab 1M 3M"])
        .args(["-c", "read -P 0xcd 100M 8M"])
        .args(["-c", "read -P 0 0 1M"])
        .arg(&img))
    .and_then(|out| {
        if out.contains("Pattern verification failed") || out.contains("failed") {
            bail!("pattern check through the mount failed:\n{out}");
        }
        Ok(())
    })?;

    let pri = pair.primary_backing().join("vm.qcow2");
    let sec = pair.secondary_backing().join("vm.qcow2");
    if file_hash(&pri)? != file_hash(&sec)? {
        bail!("primary and secondary image files differ byte-wise");
    }
    run(Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "qcow2", "-U"])
        .arg(&pri)
        .arg(&sec))
    .context("qemu-img compare primary vs secondary")?;
    let check = run(Command::new("qemu-img")
        .args(["check", "-f", "qcow2", "-U"])
        .arg(&sec))
    .context("qemu-img check on the secondary copy")?;
    eprintln!("qemu-img check (secondary):\n{check}");
    assert_same_tree(pair.primary_backing(), pair.secondary_backing())?;
    Ok(())
}
