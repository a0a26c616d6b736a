//! Mounting over the directory that holds the data (the usual VM layout).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use vmha_test_infra::proc::contains_word;
use vmha_test_infra::{is_mount_point, Child, Pair, PairOptions};

fn over() -> PairOptions {
    PairOptions {
        mount_over: true,
        ..PairOptions::default()
    }
}

/// The same pre-existing content in both replicas, as after an initial sync.
fn populate(dir: &Path) -> Result<()> {
    std::fs::write(dir.join("existing"), b"was here before")?;
    std::fs::create_dir(dir.join("sub"))?;
    std::fs::write(dir.join("sub/inner"), b"inner")?;
    Ok(())
}

#[test]
fn existing_files_visible_and_writes_land_in_the_dir() -> Result<()> {
    let mut pair = Pair::prepare(over())?;
    let dir = pair.primary_backing().to_path_buf();
    populate(&dir)?;
    populate(pair.secondary_backing())?;
    pair.start_secondary()?;
    pair.start_primary()?;
    if pair.mount() != dir || !is_mount_point(&dir)? {
        bail!("{} is not mounted over", dir.display());
    }

    let seen =
        std::fs::read(dir.join("existing")).context("pre-existing file through the mount")?;
    if seen != b"was here before" {
        bail!("pre-existing file reads {seen:?} through the mount");
    }
    if std::fs::read(dir.join("sub/inner"))? != b"inner" {
        bail!("pre-existing nested file wrong through the mount");
    }
    std::fs::write(dir.join("new"), b"written through the mount")?;
    std::fs::create_dir(dir.join("newdir"))?;
    std::fs::write(dir.join("newdir/f"), b"nested new")?;

    let sec = pair.secondary_backing();
    if std::fs::read(sec.join("new"))? != b"written through the mount" {
        bail!("new file not replicated");
    }
    if std::fs::read(sec.join("newdir/f"))? != b"nested new" {
        bail!("new nested file not replicated");
    }

    pair.stop().context("stopping the pair")?;
    if is_mount_point(&dir)? {
        bail!("{} still mounted after stop", dir.display());
    }
    // Now looking at the directory itself, not through FUSE.
    if std::fs::read(dir.join("new"))? != b"written through the mount" {
        bail!("the write through the mount did not land in the underlying dir");
    }
    if std::fs::read(dir.join("newdir/f"))? != b"nested new" {
        bail!("the nested write did not land in the underlying dir");
    }
    if std::fs::read(dir.join("existing"))? != b"was here before" {
        bail!("the pre-existing file changed");
    }
    Ok(())
}

/// Starts the primary expecting a refusal that names the holder (`names` are
/// alternatives: a pid or a command name). Nothing may stay mounted.
fn expect_refusal(pair: &Pair, names: &[String]) -> Result<()> {
    let mut cmd = pair.primary_command();
    cmd.env("RUST_BACKTRACE", "0");
    let mut child = Child::spawn("primary (refused)", cmd)?;
    let status = child.wait_exit(Duration::from_secs(10))?;
    let err = child.stderr_text();
    if status.success() {
        bail!("primary started although a process holds a file beneath the dir:\n{err}");
    }
    if err.contains("panicked") {
        bail!("primary panicked:\n{err}");
    }
    if !names.iter().any(|n| contains_word(&err, n)) {
        bail!("the refusal names none of {names:?}:\n{err}");
    }
    if is_mount_point(pair.mount())? {
        bail!("refused primary left {} mounted", pair.mount().display());
    }
    Ok(())
}

#[test]
fn refuses_while_this_process_holds_a_file_open() -> Result<()> {
    let mut pair = Pair::start_secondary_only(over())?;
    let dir = pair.primary_backing().to_path_buf();
    std::fs::create_dir(dir.join("sub"))?;
    let held = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("sub/held"))?;
    let comm = std::fs::read_to_string("/proc/self/comm")?
        .trim()
        .to_string();
    expect_refusal(&pair, &[std::process::id().to_string(), comm])?;
    drop(held);
    // With the file closed, the same start succeeds: the refusal was about it.
    pair.start_primary()
        .context("starting once nothing is open beneath the dir")?;
    Ok(())
}

#[test]
fn refuses_while_a_process_has_its_cwd_beneath() -> Result<()> {
    let mut pair = Pair::start_secondary_only(over())?;
    let dir = pair.primary_backing().to_path_buf();
    std::fs::create_dir(dir.join("cwd"))?;
    let mut cmd = Command::new("sleep");
    cmd.arg("120").current_dir(dir.join("cwd"));
    let mut sleeper = Child::spawn("sleep", cmd)?;
    expect_refusal(&pair, &[sleeper.pid().to_string(), "sleep".to_string()])?;
    sleeper.kill()?;
    pair.start_primary()
        .context("starting once the process is gone")?;
    Ok(())
}

/// Starts `script` (sh, `$1` = `arg`) in a private mount namespace of its own
/// (it goes with the process: nothing to unmount); waits until the process
/// runs `sleep` with descriptor 3 open.
fn holder_in_own_mount_namespace(script: &str, arg: &Path) -> Result<Child> {
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        "sh",
    ])
    .arg(arg);
    let mut child = Child::spawn("holder", cmd)?;
    let proc_dir = Path::new("/proc").join(child.pid().to_string());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let comm = std::fs::read_to_string(proc_dir.join("comm")).unwrap_or_default();
        if comm.trim() == "sleep" && proc_dir.join("fd/3").exists() {
            return Ok(child);
        }
        if let Some(st) = child.try_status()? {
            bail!("holder exited ({st}): {}", child.stderr_text());
        }
        if std::time::Instant::now() >= deadline {
            bail!("holder not ready: {}", child.stderr_text());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A process of another mount namespace (a container, a second node on the
/// same host) that has a same-named path open, on another filesystem, does not
/// hold the data: it must not block the mount (and so the failover).
#[test]
fn a_same_named_file_in_another_mount_namespace_does_not_block() -> Result<()> {
    let mut pair = Pair::start_secondary_only(over())?;
    let dir = pair.primary_backing().to_path_buf();
    std::fs::create_dir(dir.join("sub"))?;
    std::fs::write(dir.join("sub/held"), b"the real one")?;
    // Its own tmpfs over the same path, the same names in it, cwd and a file
    // open there.
    let holder = holder_in_own_mount_namespace(
        r#"mount -t tmpfs other "$1" && mkdir "$1/sub" && cd "$1/sub" && exec sleep 120 3>"$1/sub/held""#,
        &dir,
    )?;
    let fd = std::fs::read_link(format!("/proc/{}/fd/3", holder.pid()))?;
    if fd != dir.join("sub/held") {
        bail!("the holder has {} open", fd.display());
    }
    pair.start_primary()
        .context("a same-named file of another mount namespace blocked the mount")?;
    if !is_mount_point(&dir)? {
        bail!("{} is not mounted over", dir.display());
    }
    drop(holder);
    Ok(())
}

/// A process that holds a file of the directory through another path (a bind
/// mount elsewhere) would write beside the replication: the mount is refused,
/// naming it.
#[test]
fn refuses_while_a_file_is_held_through_a_bind_mount_elsewhere() -> Result<()> {
    let mut pair = Pair::start_secondary_only(over())?;
    let dir = pair.primary_backing().to_path_buf();
    std::fs::create_dir(dir.join("sub"))?;
    std::fs::write(dir.join("sub/held"), b"data")?;
    let elsewhere = tempfile::tempdir_in("/var/tmp")?;
    // The bind mount lives in the holder's namespace only (gone with it).
    let script = format!(
        r#"mount --bind '{}' "$1" && exec sleep 120 3>>"$1/held""#,
        dir.join("sub").display()
    );
    let mut holder = holder_in_own_mount_namespace(&script, elsewhere.path())?;
    let fd = std::fs::read_link(format!("/proc/{}/fd/3", holder.pid()))?;
    if fd.starts_with(&dir) {
        bail!(
            "the holder names the file {} (not another path)",
            fd.display()
        );
    }
    expect_refusal(&pair, &[holder.pid().to_string()])?;
    holder.kill()?;
    pair.start_primary()
        .context("starting once the process is gone")?;
    Ok(())
}

/// Data only the primary has (no initial sync happened) must never be silently
/// skipped: each write through the mount either fails or reaches the secondary.
#[test]
fn file_missing_on_secondary_is_never_silently_skipped() -> Result<()> {
    let mut pair = Pair::prepare(over())?;
    let dir = pair.primary_backing().to_path_buf();
    populate(&dir)?;
    pair.start_secondary()?;
    pair.start_primary()?;
    let sec = pair.secondary_backing().to_path_buf();

    let mut outcomes = Vec::new();
    let r = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join("existing"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, b" and more"));
    outcomes.push(("append to a file only the primary has", r.is_ok()));
    if r.is_ok() {
        let got = std::fs::read(sec.join("existing")).unwrap_or_default();
        if got != b"was here before and more" {
            bail!("append acknowledged but the secondary has {got:?}");
        }
    }
    let r = std::fs::write(dir.join("sub/new"), b"new in a dir only the primary has");
    outcomes.push(("create in a dir only the primary has", r.is_ok()));
    if r.is_ok()
        && std::fs::read(sec.join("sub/new")).ok().as_deref()
            != Some(&b"new in a dir only the primary has"[..])
    {
        bail!("create in sub/ acknowledged but missing on the secondary");
    }
    let r = std::fs::write(dir.join("fresh"), b"fresh");
    outcomes.push(("create at the root", r.is_ok()));
    if r.is_ok() && std::fs::read(sec.join("fresh")).ok().as_deref() != Some(&b"fresh"[..]) {
        bail!("create at the root acknowledged but missing on the secondary");
    }
    eprintln!("outcomes (op, acknowledged): {outcomes:?}");
    Ok(())
}
