//! Bad input makes `vmha-fs` exit non-zero quickly with a short error naming the
//! problem, without panicking and without leaving anything mounted.

use std::ffi::OsString;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use vmha_test_infra::mounts::{mounts_at_or_under, MountEntry};
use vmha_test_infra::pair::{free_port, keygen};
use vmha_test_infra::{vmha_fs_bin, Child, Pair, PairOptions};

const EXIT_WITHIN: Duration = Duration::from_secs(5);

/// A directory with a key, a data dir and a state dir for one process.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("vmha-cli-")
            .tempdir_in("/var/tmp")?;
        for d in ["data", "state", "mnt"] {
            std::fs::create_dir(dir.path().join(d))?;
        }
        keygen(&vmha_fs_bin()?, &dir.path().join("key"))?;
        Ok(Self { dir })
    }
    fn p(&self, s: &str) -> PathBuf {
        self.dir.path().join(s)
    }
}

fn secondary_args(backing: &Path, port: u16, state: &Path, key: &Path) -> Vec<OsString> {
    vec![
        "secondary".into(),
        "--backing".into(),
        backing.into(),
        "--listen".into(),
        format!("127.0.0.1:{port}").into(),
        "--state".into(),
        state.into(),
        "--key-file".into(),
        key.into(),
    ]
}

fn primary_args(
    backing: &Path,
    mount: &Path,
    port: u16,
    state: &Path,
    key: &Path,
) -> Vec<OsString> {
    vec![
        "primary".into(),
        "--backing".into(),
        backing.into(),
        "--mount".into(),
        mount.into(),
        "--peer".into(),
        format!("127.0.0.1:{port}").into(),
        "--state".into(),
        state.into(),
        "--key-file".into(),
        key.into(),
        "--lock-timeout-ms".into(),
        "2000".into(),
    ]
}

/// Mounts at or under any of `roots`, to compare before and after.
fn mounts_under(roots: &[&Path]) -> Result<Vec<MountEntry>> {
    let mut all = Vec::new();
    for r in roots {
        all.extend(mounts_at_or_under(r)?);
    }
    Ok(all)
}

/// Runs `vmha-fs args`, which must fail: non-zero exit (not a panic, not a signal)
/// within [`EXIT_WITHIN`], a short stderr containing one of `words`, and the mounts
/// under `roots` unchanged.
fn expect_failure(what: &str, args: Vec<OsString>, words: &[&str], roots: &[&Path]) -> Result<()> {
    expect_failure_within(what, args, words, roots, EXIT_WITHIN)
}

fn expect_failure_within(
    what: &str,
    args: Vec<OsString>,
    words: &[&str],
    roots: &[&Path],
    within: Duration,
) -> Result<()> {
    let before = mounts_under(roots)?;
    let mut cmd = Command::new(vmha_fs_bin()?);
    cmd.args(&args).env("RUST_BACKTRACE", "0");
    let mut child = Child::spawn(what, cmd)?;
    let status = child
        .wait_exit(within)
        .with_context(|| format!("{what}: must exit on its own"))?;
    let err = child.stderr_text();
    let after = mounts_under(roots)?;
    let mut problems = Vec::new();
    match status.code() {
        None => problems.push(format!("killed by a signal ({status})")),
        Some(0) => problems.push("exit status 0".to_string()),
        Some(101) => problems.push("exit status 101 (a Rust panic)".to_string()),
        Some(_) => {}
    }
    if err.contains("panicked") {
        problems.push("stderr shows a panic".to_string());
    }
    let lower = err.to_lowercase();
    if !words.iter().any(|w| lower.contains(w)) {
        problems.push(format!("stderr names none of {words:?}"));
    }
    let lines = err.lines().filter(|l| !l.trim().is_empty()).count();
    if lines == 0 || lines > 10 {
        problems.push(format!("{lines} lines on stderr; expected a short error"));
    }
    if before != after {
        problems.push(format!(
            "mounts changed: before {before:?}, after {after:?}"
        ));
    }
    if !problems.is_empty() {
        bail!("{what}: {}\nstderr:\n{err}", problems.join("; "));
    }
    Ok(())
}

#[test]
fn unknown_flag() -> Result<()> {
    let fx = Fixture::new()?;
    let mut args = secondary_args(&fx.p("data"), free_port()?, &fx.p("state"), &fx.p("key"));
    args.push("--no-such-flag".into());
    expect_failure("unknown flag", args, &["no-such-flag"], &[fx.dir.path()])
}

#[test]
fn missing_key_file() -> Result<()> {
    let fx = Fixture::new()?;
    expect_failure(
        "secondary, missing key file",
        secondary_args(
            &fx.p("data"),
            free_port()?,
            &fx.p("state"),
            &fx.p("no-such-key"),
        ),
        &["key"],
        &[fx.dir.path()],
    )?;
    // The primary checks its key before mounting anything.
    let sec = Pair::start_secondary_only(PairOptions::default())?;
    expect_failure(
        "primary, missing key file",
        primary_args(
            &fx.p("data"),
            &fx.p("mnt"),
            sec.port(),
            &fx.p("state"),
            &fx.p("no-such-key"),
        ),
        &["key"],
        &[fx.dir.path()],
    )
}

#[test]
fn unreadable_key_file() -> Result<()> {
    let fx = Fixture::new()?;
    std::fs::create_dir(fx.p("keydir"))?;
    expect_failure(
        "key file is a directory",
        secondary_args(&fx.p("data"), free_port()?, &fx.p("state"), &fx.p("keydir")),
        &["key"],
        &[fx.dir.path()],
    )
}

#[test]
fn nonexistent_backing_dir() -> Result<()> {
    let fx = Fixture::new()?;
    expect_failure(
        "secondary, missing backing dir",
        secondary_args(
            &fx.p("no-such-dir"),
            free_port()?,
            &fx.p("state"),
            &fx.p("key"),
        ),
        &["backing", "no-such-dir"],
        &[fx.dir.path()],
    )?;
    let sec = Pair::start_secondary_only(PairOptions::default())?;
    expect_failure(
        "primary, missing backing dir",
        primary_args(
            &fx.p("no-such-dir"),
            &fx.p("mnt"),
            sec.port(),
            &fx.p("state"),
            sec.key_file(),
        ),
        &["backing", "no-such-dir"],
        &[fx.dir.path(), sec.root()],
    )
}

#[test]
fn mount_point_already_mounted() -> Result<()> {
    let a = Pair::start(PairOptions::default())?;
    let b = Pair::start_secondary_only(PairOptions::default())?;
    expect_failure(
        "second primary onto a live FUSE mount",
        primary_args(
            b.primary_backing(),
            a.mount(),
            b.port(),
            b.primary_state(),
            b.key_file(),
        ),
        &["mounted", "mount point"],
        &[a.root(), b.root()],
    )?;
    // The first pair is unharmed.
    std::fs::write(a.mount().join("still"), b"works").context("write through the first mount")?;
    let got = std::fs::read(a.secondary_backing().join("still"))?;
    if got != b"works" {
        bail!("the first pair no longer replicates");
    }
    Ok(())
}

#[test]
fn listen_port_in_use() -> Result<()> {
    let fx = Fixture::new()?;
    let taken = TcpListener::bind("127.0.0.1:0")?;
    let port = taken.local_addr()?.port();
    expect_failure(
        "secondary on a port in use",
        secondary_args(&fx.p("data"), port, &fx.p("state"), &fx.p("key")),
        &["address", "in use"],
        &[fx.dir.path()],
    )?;
    drop(taken);
    Ok(())
}

/// A primary pointed at something that is not a vmha-fs secondary (a server
/// that waits for more, like a web server; a socket that closes at once)
/// says so, instead of a raw "Resource temporarily unavailable".
#[test]
fn peer_that_is_not_a_vmha_secondary() -> Result<()> {
    for closes in [false, true] {
        let fx = Fixture::new()?;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        listener.set_nonblocking(true)?;
        let server = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) if !closes => held.push(conn),
                    Ok((conn, _)) => drop(conn),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        // The silent one is given up after the handshake timeout.
        let outcome = expect_failure_within(
            "primary whose peer is not vmha",
            primary_args(
                &fx.p("data"),
                &fx.p("mnt"),
                port,
                &fx.p("state"),
                &fx.p("key"),
            ),
            &["not a vmha-fs secondary"],
            &[fx.dir.path()],
            Duration::from_secs(20),
        );
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = server.join();
        outcome?;
    }
    Ok(())
}

/// Host names are accepted where addresses are (`--listen`, `--peer`); one
/// that does not resolve is a clear usage error.
#[test]
fn host_names_where_addresses_go() -> Result<()> {
    let fx = Fixture::new()?;
    let port = free_port()?;
    let mut args = secondary_args(&fx.p("data"), port, &fx.p("state"), &fx.p("key"));
    let listen = args
        .iter()
        .position(|a| a == "--listen")
        .context("--listen")?;
    args[listen + 1] = format!("localhost:{port}").into();
    let mut cmd = Command::new(vmha_fs_bin()?);
    cmd.args(&args);
    let mut child = Child::spawn("secondary on localhost", cmd)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if std::time::Instant::now() > deadline {
            bail!(
                "the secondary never listened on localhost:{port}: {}",
                child.stderr_text()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.terminate(Duration::from_secs(5))?;

    args[listen + 1] = format!("nohost.invalid:{port}").into();
    expect_failure(
        "secondary on a name that does not resolve",
        args,
        &["nor host:port with a host name that resolves"],
        &[fx.dir.path()],
    )
}
