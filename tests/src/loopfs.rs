//! An XFS filesystem of its own on a loop device, for power-loss tests (design,
//! "Testing on one machine"): [`LoopFs::shutdown`] stops the filesystem the way a
//! power cut does (`xfs_io -x -c shutdown`, no log flush: whatever was not yet on
//! the "disk" is gone), [`LoopFs::power_cycle`] unmounts and mounts it again, so its
//! caches are really lost and only what reached the device comes back.
//!
//! The image is a sparse file in `/var/tmp`. Dropping the guard lazily unmounts the
//! mount point and detaches the loop devices this guard attached — never another.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rustix::mount::{mount, unmount, MountFlags, UnmountFlags};

use crate::mounts::{is_mount_point, lazy_unmount_all};
use crate::node::run;

/// A mounted XFS on a loop device; see the module documentation.
#[derive(Debug)]
pub struct LoopFs {
    image: PathBuf,
    mountpoint: PathBuf,
    /// The device in use (`/dev/loopN`).
    device: String,
    /// Every device this guard attached (detached on drop).
    attached: Vec<String>,
    // Last field: removed after Drop::drop has unmounted and detached.
    dir: tempfile::TempDir,
}

impl LoopFs {
    /// A fresh XFS of `size` bytes (sparse; at least 300 MiB for mkfs.xfs), mounted
    /// at `<tempdir>/mnt`. `name` prefixes the temp dir.
    pub fn new(name: &str, size: u64) -> Result<LoopFs> {
        Self::with_mkfs(name, size, &[])
    }

    /// [`LoopFs::new`] with extra `mkfs.xfs` options (e.g. `-b size=1024` for a
    /// million small files in little space).
    pub fn with_mkfs(name: &str, size: u64, mkfs: &[&str]) -> Result<LoopFs> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("vmha-loopfs-{name}-"))
            .tempdir_in("/var/tmp")
            .context("creating a temp dir in /var/tmp")?;
        let image = dir.path().join("disk.img");
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir(&mountpoint)?;
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(size))
            .with_context(|| format!("creating {}", image.display()))?;
        let device = attach(&image)?;
        let mut fs = LoopFs {
            image,
            mountpoint,
            device: device.clone(),
            attached: vec![device],
            dir,
        };
        run(Command::new("mkfs.xfs")
            .arg("-q")
            .args(mkfs)
            .arg(&fs.device))?;
        fs.mount_device(false)?;
        Ok(fs)
    }

    /// Where the filesystem is mounted.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// The loop device currently holding the filesystem.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Power cut: the filesystem stops at once, without flushing its log
    /// (`xfs_io -x -c shutdown`, not `-f`). Every later access fails with EIO.
    pub fn shutdown(&self) -> Result<()> {
        run(Command::new("xfs_io")
            .args(["-x", "-c", "shutdown"])
            .arg(&self.mountpoint))?;
        Ok(())
    }

    /// Power back on: unmounts the (shut down) filesystem — the processes that had
    /// files open on it must be gone and mounts beneath it removed — and mounts it
    /// again, replaying its log from the device.
    pub fn power_cycle(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        // A real unmount, not a lazy one: a detached but living superblock would be
        // found again by the next mount, caches and all.
        loop {
            match unmount(&self.mountpoint, UnmountFlags::NOFOLLOW) {
                Ok(()) => break,
                Err(rustix::io::Errno::BUSY) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(e) => {
                    return Err(std::io::Error::from(e))
                        .with_context(|| format!("umount {}", self.mountpoint.display()))
                }
            }
        }
        // The superblock lives on while a copy of the mount exists in another mount
        // namespace (one created meanwhile by anyone on this machine). Then the image
        // comes back through a new loop device, so nothing cached is reused.
        if self.superblock_alive(Duration::from_secs(2)) {
            eprintln!(
                "[loopfs] {} is still in use elsewhere after the unmount; \
                 remounting {} through a new loop device",
                self.device,
                self.image.display()
            );
            detach(&self.device, &self.image);
            self.attached.retain(|d| *d != self.device);
            self.device = attach(&self.image)?;
            self.attached.push(self.device.clone());
            return self.mount_device(true);
        }
        self.mount_device(false)
    }

    /// Whether XFS still has a superblock for the current device (its sysfs
    /// directory exists) after waiting up to `wait` for it to go.
    fn superblock_alive(&self, wait: Duration) -> bool {
        let name = self.device.trim_start_matches("/dev/");
        let sys = Path::new("/sys/fs/xfs").join(name);
        let deadline = Instant::now() + wait;
        while sys.exists() {
            if Instant::now() >= deadline {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    fn mount_device(&mut self, nouuid: bool) -> Result<()> {
        let data = if nouuid { Some(c"nouuid") } else { None };
        mount(
            self.device.as_str(),
            &self.mountpoint,
            "xfs",
            MountFlags::empty(),
            data,
        )
        .map_err(std::io::Error::from)
        .with_context(|| format!("mount -t xfs {} {}", self.device, self.mountpoint.display()))?;
        if !is_mount_point(&self.mountpoint)? {
            bail!(
                "{} is not a mount point after mount",
                self.mountpoint.display()
            );
        }
        Ok(())
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        // Lazy: a process of a failed test may still hold files open; the device is
        // released when the last of them goes.
        let unmounted = match lazy_unmount_all(&self.mountpoint) {
            Ok(_) => true,
            Err(e) => {
                eprintln!("[loopfs] {e:#}");
                false
            }
        };
        for dev in &self.attached {
            detach(dev, &self.image);
        }
        if !unmounted {
            eprintln!("[loopfs] keeping {}", self.dir.path().display());
            self.dir.disable_cleanup(true);
        }
    }
}

/// `losetup --find --show --direct-io=on IMAGE`: the new device. Direct I/O: what
/// the filesystem writes goes to the host's disk, not into its page cache, so a
/// flush costs what it would on a disk (not a write-out of everything since the
/// last one, many seconds on a busy host).
fn attach(image: &Path) -> Result<String> {
    let out = run(Command::new("losetup")
        .args(["--find", "--show", "--direct-io=on"])
        .arg(image))?;
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !dev.starts_with("/dev/loop") {
        bail!("losetup printed {dev:?} for {}", image.display());
    }
    Ok(dev)
}

/// `losetup -d DEV` if DEV still serves `image` (a number freed meanwhile may have
/// gone to someone else). Still busy: the kernel detaches it when released.
fn detach(dev: &str, image: &Path) {
    let name = dev.trim_start_matches("/dev/");
    let backing =
        std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).unwrap_or_default();
    if Path::new(backing.trim()) != image {
        return;
    }
    if let Err(e) = run(Command::new("losetup").args(["-d", dev])) {
        eprintln!("[loopfs] {e:#}");
    }
}
