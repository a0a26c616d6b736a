//! `vmha-fuse-probe`: a minimal FUSE pass-through server written against the
//! kernel ABI (no fuser, no libfuse), to measure the FUSE transport itself
//! (issue 11, item 2): does FUSE over io_uring lift the ceiling that vmha-fs's
//! /dev/fuse path (fuser, 16 threads on cloned descriptors) hits on this
//! machine?
//!
//! It serves one backing directory flat (regular files: what fio and the
//! bench need), with vmha-fs's INIT settings (max_write 1 MiB, max_pages to
//! match, max_background 64, async DIO, O_DIRECT kept on the backing file), over
//! one of two transports chosen at start:
//!
//! - `dev`: `--threads` threads each reading its own clone of /dev/fuse and
//!   replying with `writev`, as fuser runs vmha-fs;
//! - `uring`: FUSE_IO_URING, one queue per CPU with one pinned thread and
//!   `--queue-depth` entries each; the backing I/O goes through the same ring
//!   unless `--sync-io`.
//!
//! It mounts with mount(2) (`fuse.vmhaprobe`, allow_other, default_permissions)
//! and on SIGTERM/SIGINT detaches the mount (lazy unmount) and exits once the
//! workers saw the connection end. When io_uring is refused (the `enable_uring`
//! module parameter off, a kernel without it, a failed REGISTER) it exits
//! non-zero with the reason.

#[path = "vmha-fuse-probe/abi.rs"]
mod abi;
#[path = "vmha-fuse-probe/dev.rs"]
mod dev;
#[path = "vmha-fuse-probe/fs.rs"]
mod fs;
#[path = "vmha-fuse-probe/uring.rs"]
mod uring;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use fs::{Event, Fs};
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

/// The kernel's switch for FUSE over io_uring.
const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";
/// How long the workers get to see the connection end after the unmount.
const EXIT_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Transport {
    /// Threads reading cloned /dev/fuse descriptors.
    Dev,
    /// FUSE over io_uring.
    Uring,
}

#[derive(Debug, Parser)]
#[command(name = "vmha-fuse-probe", version, about)]
struct Cli {
    /// The directory served.
    #[arg(long)]
    backing: PathBuf,
    /// Where to mount it (an existing directory).
    #[arg(long)]
    mount: PathBuf,
    #[arg(long, value_enum, default_value = "dev")]
    transport: Transport,
    /// /dev/fuse threads of the `dev` transport (vmha-fs's default).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
    /// Ring entries per queue (`uring`): requests of one CPU in flight at once.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    queue_depth: u16,
    /// `uring`: do the backing I/O inline in the queue thread (as a synchronous
    /// filesystem would) instead of on the ring.
    #[arg(long)]
    sync_io: bool,
    /// `uring`: leave the queue threads unpinned (the scheduler may run a
    /// queue's thread on another CPU than the one whose requests it serves).
    #[arg(long)]
    no_pin: bool,
}

/// Why FUSE over io_uring cannot run here, checked before mounting.
fn uring_unavailable() -> Option<String> {
    match std::fs::read_to_string(ENABLE_URING) {
        Err(e) => Some(format!(
            "io_uring refused: this kernel has no FUSE over io_uring ({ENABLE_URING}: {e})"
        )),
        Ok(v) if v.trim() != "Y" => Some(format!(
            "io_uring refused: FUSE over io_uring is disabled ({ENABLE_URING} is {}; \
             `echo Y > {ENABLE_URING}` as root)",
            v.trim()
        )),
        Ok(_) => None,
    }
}

/// Opens /dev/fuse and mounts it at `mnt`.
fn mount(mnt: &Path) -> Result<OwnedFd> {
    let dev = rustix::fs::open(
        "/dev/fuse",
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .context("open /dev/fuse")?;
    let opts = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions",
        dev.as_raw_fd()
    );
    let opts = CString::new(opts)?;
    rustix::mount::mount(
        "vmhaprobe",
        mnt,
        "fuse.vmhaprobe",
        rustix::mount::MountFlags::NOSUID | rustix::mount::MountFlags::NODEV,
        opts.as_c_str(),
    )
    .with_context(|| format!("mount fuse.vmhaprobe at {}", mnt.display()))?;
    Ok(dev)
}

fn detach(mnt: &Path) {
    if let Err(e) = rustix::mount::unmount(mnt, rustix::mount::UnmountFlags::DETACH) {
        if e != rustix::io::Errno::INVAL {
            eprintln!("vmha-fuse-probe: unmount {}: {e}", mnt.display());
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let backing = cli
        .backing
        .canonicalize()
        .with_context(|| format!("backing directory {}", cli.backing.display()))?;
    if !backing.is_dir() {
        bail!("{} is not a directory", backing.display());
    }
    if !cli.mount.is_dir() {
        bail!("mount point {} is not a directory", cli.mount.display());
    }
    let uring = cli.transport == Transport::Uring;
    if uring {
        if let Some(why) = uring_unavailable() {
            bail!("{why}");
        }
    }
    let (tx, rx) = mpsc::channel();
    let fs = Arc::new(Fs::new(backing, uring, tx.clone()));
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .context("signal handlers")?;
    let sig_tx = tx.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if signals.forever().next().is_some() {
                let _ = sig_tx.send(Event::Signal);
            }
        })?;
    drop(tx);

    let dev = Arc::new(mount(&cli.mount)?);
    let mut workers = 0usize;
    let spawned = (|| -> Result<()> {
        let dev_threads = if uring { 1 } else { usize::from(cli.threads) };
        for i in 0..dev_threads {
            let fd = if i == 0 {
                Arc::clone(&dev)
            } else {
                Arc::new(dev::clone_fd(dev.as_fd()).context("FUSE_DEV_IOC_CLONE")?)
            };
            let fs = Arc::clone(&fs);
            std::thread::Builder::new()
                .name(format!("fuse-dev-{i}"))
                .spawn(move || dev::serve(&fs, fd.as_fd()))?;
            workers += 1;
        }
        if uring {
            let queues = possible_cpus()?;
            for qid in 0..queues {
                let (fs, dev) = (Arc::clone(&fs), Arc::clone(&dev));
                let qid = u16::try_from(qid)?;
                let opts = uring::QueueOpts {
                    depth: usize::from(cli.queue_depth),
                    sync_io: cli.sync_io,
                    pin: !cli.no_pin,
                };
                std::thread::Builder::new()
                    .name(format!("fuse-ring-{qid}"))
                    .spawn(move || uring::serve_queue(&fs, dev.as_raw_fd(), qid, opts))?;
                workers += 1;
            }
        }
        Ok(())
    })();
    if let Err(e) = spawned {
        detach(&cli.mount);
        return Err(e);
    }
    let ready_needed = if uring { possible_cpus()? } else { 1 };
    let (mut ready, mut failure, mut done) = (0usize, None, 0usize);
    while done < workers {
        match rx.recv() {
            Ok(Event::Signal) => break,
            Ok(Event::Fatal(msg)) => {
                failure = Some(msg);
                break;
            }
            Ok(Event::WorkerDone) => done += 1,
            Ok(Event::Ready) => {
                ready += 1;
                if ready == ready_needed {
                    eprintln!(
                        "vmha-fuse-probe: ready: serving {} at {} over {}",
                        cli.backing.display(),
                        cli.mount.display(),
                        if uring { "io_uring" } else { "/dev/fuse" }
                    );
                }
            }
            Err(_) => break,
        }
    }
    detach(&cli.mount);
    // Let the workers see the end of the connection (bounded: a worker stuck in
    // a backing-file call must not keep us).
    let deadline = std::time::Instant::now() + EXIT_GRACE;
    while done < workers {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(Event::WorkerDone) => done += 1,
            Ok(Event::Fatal(msg)) => {
                failure.get_or_insert(msg);
            }
            Ok(Event::Signal | Event::Ready) => {}
            Err(_) => break,
        }
    }
    eprintln!(
        "vmha-fuse-probe: served {} requests over /dev/fuse, {} over io_uring",
        fs.dev_requests.load(Ordering::Relaxed),
        fs.ring_requests.load(Ordering::Relaxed)
    );
    match failure {
        Some(msg) => bail!("{msg}"),
        None => Ok(()),
    }
}

/// The kernel makes one ring queue per possible CPU (`num_possible_cpus`).
fn possible_cpus() -> Result<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .context("read /sys/devices/system/cpu/possible")?;
    let mut max = 0usize;
    for part in text.trim().split(',') {
        let last = part.rsplit('-').next().unwrap_or(part);
        max = max.max(last.parse::<usize>().context("parse possible CPUs")? + 1);
    }
    Ok(max)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmha-fuse-probe: {e:#}");
            ExitCode::FAILURE
        }
    }
}
