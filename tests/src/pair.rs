//! A replicated pair on one machine: a `vmha-fs secondary` receiver and a
//! `vmha-fs primary` FUSE mount talking over loopback TCP, in a temp dir on disk.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bin::vmha_fs_bin;
use crate::mounts::{is_mount_point, lazy_unmount_all};
use crate::proc::Child;

/// How long a process gets to print `ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a process gets to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// Options of [`Pair::start`].
#[derive(Debug, Clone)]
pub struct PairOptions {
    /// `--lock-timeout-ms` of the primary.
    pub lock_timeout_ms: u64,
    /// Mount the primary over its backing directory (`--mount` = `--backing`).
    pub mount_over: bool,
    /// A directory to create the primary's backing dir in (e.g. a [`crate::loopfs::LoopFs`]
    /// whose disk a test fails or fills); default: the pair's temp dir.
    pub primary_backing_in: Option<PathBuf>,
    /// Likewise for the secondary's replica dir.
    pub secondary_backing_in: Option<PathBuf>,
    /// `--protocol` of the primary (`None`: not passed, the default C).
    pub protocol: Option<&'static str>,
    /// `--local-writes` of the primary (`None`: not passed, the default cached).
    pub local_writes: Option<&'static str>,
    /// The replication protocol versions the secondary advertises (its
    /// `VMHA_TEST_REPLICATION_VERSIONS`, e.g. `"5..=6"`: an older peer).
    pub secondary_versions: Option<&'static str>,
}

impl Default for PairOptions {
    fn default() -> Self {
        Self {
            lock_timeout_ms: 3000,
            mount_over: false,
            primary_backing_in: None,
            secondary_backing_in: None,
            protocol: None,
            local_writes: None,
            secondary_versions: None,
        }
    }
}

/// A running primary + secondary. Dropping it kills both, lazily unmounts what they
/// left and removes the temp dir.
#[derive(Debug)]
pub struct Pair {
    opts: PairOptions,
    bin: PathBuf,
    port: u16,
    key_file: PathBuf,
    pri_backing: PathBuf,
    pri_state: PathBuf,
    mount: PathBuf,
    sec_backing: PathBuf,
    sec_state: PathBuf,
    secondary: Option<Child>,
    primary: Option<Child>,
    // Last field: dropped (removed) after Drop::drop has unmounted everything.
    dir: tempfile::TempDir,
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Runs `vmha-fs keygen FILE` (bounded) and checks the file exists.
pub fn keygen(bin: &Path, file: &Path) -> Result<()> {
    let mut cmd = Command::new(bin);
    cmd.arg("keygen").arg(file);
    let mut c = Child::spawn("keygen", cmd)?;
    let st = c.wait_exit(Duration::from_secs(20))?;
    if !st.success() {
        bail!("vmha-fs keygen failed ({st}): {}", c.stderr_text());
    }
    if !file.is_file() {
        bail!(
            "vmha-fs keygen exited 0 but {} is not a file",
            file.display()
        );
    }
    Ok(())
}

impl Pair {
    /// Starts a secondary and a primary and waits until both are ready.
    pub fn start(opts: PairOptions) -> Result<Self> {
        let mut p = Self::start_secondary_only(opts)?;
        p.start_primary()?;
        Ok(p)
    }

    /// Creates the directories and key and starts only the secondary (for tests that
    /// talk to it themselves, or that prepare the primary's backing dir first and then
    /// call [`Pair::start_primary`]).
    pub fn start_secondary_only(opts: PairOptions) -> Result<Self> {
        let mut p = Self::prepare(opts)?;
        p.start_secondary()?;
        Ok(p)
    }

    /// Creates the directories and the key; starts nothing (fill the backing dirs,
    /// then [`Pair::start_secondary`] and [`Pair::start_primary`]).
    pub fn prepare(opts: PairOptions) -> Result<Self> {
        let bin = vmha_fs_bin()?;
        // /var/tmp, not /tmp: /tmp may be tmpfs, and the backing dirs should sit on
        // a real disk filesystem like in production.
        let dir = tempfile::Builder::new()
            .prefix("vmha-test-")
            .tempdir_in("/var/tmp")
            .context("creating a temp dir in /var/tmp")?;
        let root = dir.path().to_path_buf();
        let pri_backing = match &opts.primary_backing_in {
            Some(dir) => dir.join("pri-data"),
            None => root.join("pri/data"),
        };
        let sec_backing = match &opts.secondary_backing_in {
            Some(dir) => dir.join("sec-data"),
            None => root.join("sec/data"),
        };
        let mount = if opts.mount_over {
            pri_backing.clone()
        } else {
            root.join("pri/mnt")
        };
        let p = Self {
            opts,
            port: free_port()?,
            key_file: root.join("cluster.key"),
            pri_state: root.join("pri/state"),
            sec_backing,
            sec_state: root.join("sec/state"),
            pri_backing,
            mount,
            bin,
            secondary: None,
            primary: None,
            dir,
        };
        for d in [
            &p.pri_backing,
            &p.pri_state,
            &p.mount,
            &p.sec_backing,
            &p.sec_state,
        ] {
            std::fs::create_dir_all(d).with_context(|| format!("mkdir {}", d.display()))?;
        }
        keygen(&p.bin, &p.key_file)?;
        Ok(p)
    }

    /// Starts the secondary and waits for `ready`.
    pub fn start_secondary(&mut self) -> Result<()> {
        if self.secondary.is_some() {
            bail!("secondary already started");
        }
        let mut sec = Child::spawn("secondary", self.secondary_command())?;
        let ready = sec.wait_ready(READY_TIMEOUT);
        self.secondary = Some(sec);
        ready
    }

    /// The command line of this pair's secondary.
    pub fn secondary_command(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("secondary")
            .arg("--backing")
            .arg(&self.sec_backing)
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--state")
            .arg(&self.sec_state)
            .arg("--key-file")
            .arg(&self.key_file);
        if let Some(versions) = self.opts.secondary_versions {
            c.env(vmha_fs::version::REPLICATION_ENV, versions);
        }
        c
    }

    /// The command line of this pair's primary.
    pub fn primary_command(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("primary")
            .arg("--backing")
            .arg(&self.pri_backing)
            .arg("--mount")
            .arg(&self.mount)
            .arg("--peer")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--state")
            .arg(&self.pri_state)
            .arg("--key-file")
            .arg(&self.key_file)
            .arg("--lock-timeout-ms")
            .arg(self.opts.lock_timeout_ms.to_string());
        if let Some(protocol) = self.opts.protocol {
            c.args(["--protocol", protocol]);
        }
        if let Some(local_writes) = self.opts.local_writes {
            c.args(["--local-writes", local_writes]);
        }
        c
    }

    /// Starts the primary, waits for `ready` and checks the mount is in place.
    /// `vmha-fs primary --alone --peer <this pair's secondary>`: writes alone from the
    /// start; SIGUSR2 later attaches the secondary with a full sync.
    pub fn alone_primary_command(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("primary")
            .arg("--backing")
            .arg(&self.pri_backing)
            .arg("--mount")
            .arg(&self.mount)
            .arg("--alone")
            .arg("--peer")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--state")
            .arg(&self.pri_state)
            .arg("--key-file")
            .arg(&self.key_file);
        c
    }

    pub fn start_primary(&mut self) -> Result<()> {
        if self.primary.is_some() {
            bail!("primary already started");
        }
        let mut pri = Child::spawn("primary", self.primary_command())?;
        let ready = pri.wait_ready(READY_TIMEOUT);
        self.primary = Some(pri);
        ready?;
        if !is_mount_point(&self.mount)? {
            bail!(
                "primary printed ready but {} is not a mount point",
                self.mount.display()
            );
        }
        Ok(())
    }

    /// The temp dir holding everything of this pair.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }
    /// Where the primary's FUSE filesystem is mounted.
    pub fn mount(&self) -> &Path {
        &self.mount
    }
    /// The primary's backing dir (equal to `mount()` when mounted over).
    pub fn primary_backing(&self) -> &Path {
        &self.pri_backing
    }
    /// The secondary's replica dir.
    pub fn secondary_backing(&self) -> &Path {
        &self.sec_backing
    }
    /// Waits (vmha-fs refreshes it at most once a second) until the
    /// primary's `metrics.json` satisfies `ok`; returns it.
    pub fn wait_metrics(
        &self,
        what: &str,
        ok: impl Fn(&vmha_fs::status::FsMetrics) -> bool,
    ) -> Result<vmha_fs::status::FsMetrics> {
        use vmha_fs::status::{FsMetrics, StatusFile};
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let last = FsMetrics::read_from(self.primary_state());
            if let Ok(Some(m)) = &last {
                if ok(m) {
                    return Ok(m.clone());
                }
            }
            if Instant::now() >= deadline {
                bail!("metrics.json never showed {what}: {last:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn primary_state(&self) -> &Path {
        &self.pri_state
    }
    pub fn secondary_state(&self) -> &Path {
        &self.sec_state
    }
    /// The secondary's replication port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }
    pub fn key_file(&self) -> &Path {
        &self.key_file
    }
    pub fn bin(&self) -> &Path {
        &self.bin
    }
    pub fn options(&self) -> &PairOptions {
        &self.opts
    }
    pub fn secondary_pid(&self) -> Option<u32> {
        self.secondary.as_ref().map(Child::pid)
    }
    pub fn primary_pid(&self) -> Option<u32> {
        self.primary.as_ref().map(Child::pid)
    }
    pub fn secondary(&mut self) -> Option<&mut Child> {
        self.secondary.as_mut()
    }
    pub fn primary(&mut self) -> Option<&mut Child> {
        self.primary.as_mut()
    }

    /// SIGKILLs the secondary (its read-only bind mount stays until drop).
    pub fn kill_secondary(&mut self) -> Result<()> {
        match self.secondary.as_mut() {
            Some(c) => c.kill(),
            None => Ok(()),
        }
    }

    /// SIGKILLs the primary (its dead FUSE mount stays until drop or
    /// [`Pair::cleanup_mounts`]).
    pub fn kill_primary(&mut self) -> Result<()> {
        match self.primary.as_mut() {
            Some(c) => c.kill(),
            None => Ok(()),
        }
    }

    /// Lazily unmounts whatever the processes left at the mount and the secondary's
    /// backing dir. Only meaningful once they are dead.
    pub fn cleanup_mounts(&self) -> Result<()> {
        let a = lazy_unmount_all(&self.mount);
        let b = lazy_unmount_all(&self.sec_backing);
        a.and(b).map(drop)
    }

    /// SIGTERM the primary, then the secondary; each must exit 0 within
    /// [`STOP_TIMEOUT`] and leave nothing mounted.
    pub fn stop(&mut self) -> Result<()> {
        let mut errors = Vec::new();
        if let Some(p) = self.primary.as_mut() {
            stop_child(p, "primary", &self.mount, &mut errors)?;
        }
        if let Some(s) = self.secondary.as_mut() {
            stop_child(s, "secondary", &self.sec_backing, &mut errors)?;
        }
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("{}", errors.join("; "))
        }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        // Primary first: while it lives, it may still be talking to the secondary.
        if let Some(mut p) = self.primary.take() {
            if let Err(e) = p.kill() {
                eprintln!("pair drop: killing primary: {e:#}");
            }
        }
        let mut clean = true;
        if let Err(e) = lazy_unmount_all(&self.mount) {
            eprintln!("pair drop: {e:#}");
            clean = false;
        }
        if let Some(mut s) = self.secondary.take() {
            if let Err(e) = s.kill() {
                eprintln!("pair drop: killing secondary: {e:#}");
            }
        }
        if let Err(e) = lazy_unmount_all(&self.sec_backing) {
            eprintln!("pair drop: {e:#}");
            clean = false;
        }
        if !clean {
            // Never recurse into something still mounted: leave the dir for a human.
            eprintln!("pair drop: keeping {}", self.dir.path().display());
            self.dir.disable_cleanup(true);
        }
        // `dir` (TempDir) is removed after this, with nothing mounted inside.
    }
}

/// SIGTERM `child`; it must exit 0 within [`STOP_TIMEOUT`] and leave `mounted`
/// unmounted. Problems are collected in `errors`.
fn stop_child(
    child: &mut Child,
    what: &str,
    mounted: &Path,
    errors: &mut Vec<String>,
) -> Result<()> {
    match child.terminate(STOP_TIMEOUT) {
        Ok((_, true)) => errors.push(format!("{what} ignored SIGTERM for {STOP_TIMEOUT:?}")),
        Ok((st, false)) if !st.success() => {
            errors.push(format!("{what} exited with {st} on SIGTERM"))
        }
        Ok(_) => {
            if is_mount_point(mounted)? {
                errors.push(format!(
                    "{what} exited 0 but {} is still mounted",
                    mounted.display()
                ));
            }
        }
        Err(e) => errors.push(format!("terminating {what}: {e:#}")),
    }
    Ok(())
}
