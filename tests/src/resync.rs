//! Two `vmha-fs` nodes for resync tests and the resync benchmark: node "a" writes
//! on the host, node "b" receives inside a network namespace joined by a veth
//! ([`HostLink`]), so the bytes of a resync are counted on a real interface (and the
//! benchmark can shape the link). Either node can play either role: a test fails
//! one, lets the other write alone and re-attaches it.
//!
//! One setup for `tests/tests/incremental_resync.rs` and `vmha-bench-resync`, so the
//! benchmark measures exactly what the tests check. Unlike [`crate::Pair`] it owns
//! no processes: the caller holds the [`Child`]ren it starts (declared after the
//! setup, so they are dropped first), kills and restarts them at will; dropping the
//! setup then detaches what they left mounted, removes the namespace and the
//! directories.

use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::bin::vmha_fs_bin;
use crate::hostlink::HostLink;
use crate::mounts::lazy_unmount_all;
use crate::pair::{free_port, keygen, READY_TIMEOUT};
use crate::proc::Child;

/// One node's directories under the setup's root.
#[derive(Debug)]
pub struct NodeDirs {
    /// The backing directory (`--backing`).
    pub data: PathBuf,
    /// `--state`.
    pub state: PathBuf,
    /// The writer's FUSE mount (`--mount`).
    pub mnt: PathBuf,
}

impl NodeDirs {
    fn new(root: &Path, name: &str) -> Result<NodeDirs> {
        let d = NodeDirs {
            data: root.join(name).join("data"),
            state: root.join(name).join("state"),
            mnt: root.join(name).join("mnt"),
        };
        for p in [&d.data, &d.state, &d.mnt] {
            std::fs::create_dir_all(p).with_context(|| format!("mkdir {}", p.display()))?;
        }
        Ok(d)
    }
}

/// The key, the namespace link and both nodes' directories. See the module docs.
#[derive(Debug)]
pub struct ResyncSetup {
    pub bin: PathBuf,
    pub key: PathBuf,
    pub link: HostLink,
    /// The receiver's port inside the namespace.
    pub port: u16,
    pub a: NodeDirs,
    pub b: NodeDirs,
    /// The hard (and soft) RLIMIT_NOFILE the processes start with, if lowered.
    pub nofile: Option<u64>,
    // Last field: removed after Drop::drop has detached the mounts (and after the
    // namespace is gone).
    root: tempfile::TempDir,
}

impl ResyncSetup {
    /// A setup in a fresh temp dir under /var/tmp (a disk, not a tmpfs).
    pub fn new() -> Result<ResyncSetup> {
        Self::in_dir(Path::new("/var/tmp"), "vmha-incr-")
    }

    /// A setup in a fresh temp dir `prefix…` under `dir`.
    pub fn in_dir(dir: &Path, prefix: &str) -> Result<ResyncSetup> {
        let bin = vmha_fs_bin()?;
        let root = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(dir)
            .with_context(|| format!("temp dir in {}", dir.display()))?;
        let key = root.path().join("cluster.key");
        keygen(&bin, &key)?;
        Ok(ResyncSetup {
            a: NodeDirs::new(root.path(), "a")?,
            b: NodeDirs::new(root.path(), "b")?,
            link: HostLink::new()?,
            port: free_port()?,
            nofile: None,
            bin,
            key,
            root,
        })
    }

    /// The temp dir holding everything (room for the caller's own files too).
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// Where the receiver listens (inside the namespace).
    pub fn peer(&self) -> SocketAddr {
        SocketAddr::new(self.link.ns_addr.into(), self.port)
    }

    /// Starts `c` with the open-file limit lowered to `self.nofile` (vmha-fs raises
    /// its soft limit to the hard one, so the hard one is what counts).
    fn limit(&self, c: &mut Command) {
        if let Some(n) = self.nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; the closure touches nothing else
            // between fork and exec.
            unsafe {
                c.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
    }

    /// A receiver for `d`, inside the namespace, ready.
    pub fn secondary(&self, d: &NodeDirs) -> Result<Child> {
        self.secondary_with(d, &[])
    }

    /// A receiver for `d` with `extra` options, inside the namespace, ready.
    pub fn secondary_with(&self, d: &NodeDirs, extra: &[&str]) -> Result<Child> {
        let mut c = self.link.command(&self.bin);
        c.arg("secondary")
            .arg("--backing")
            .arg(&d.data)
            .arg("--listen")
            .arg(self.peer().to_string())
            .arg("--state")
            .arg(&d.state)
            .arg("--key-file")
            .arg(&self.key)
            .args(extra);
        self.limit(&mut c);
        let mut child = Child::spawn("secondary", c)?;
        child.wait_ready(READY_TIMEOUT)?;
        Ok(child)
    }

    /// A writer for `d` on the host, starting alone with `--peer` the namespace
    /// (SIGUSR2 attaches it), with `extra` options, ready.
    pub fn primary_alone(&self, d: &NodeDirs, extra: &[&str]) -> Result<Child> {
        let mut c = Command::new(&self.bin);
        c.arg("primary")
            .arg("--backing")
            .arg(&d.data)
            .arg("--mount")
            .arg(&d.mnt)
            .arg("--alone")
            .arg("--peer")
            .arg(self.peer().to_string())
            .arg("--state")
            .arg(&d.state)
            .arg("--key-file")
            .arg(&self.key)
            .args(extra);
        self.limit(&mut c);
        let mut child = Child::spawn("primary", c)?;
        child.wait_ready(READY_TIMEOUT)?;
        Ok(child)
    }
}

impl Drop for ResyncSetup {
    fn drop(&mut self) {
        // The processes are gone by now (held by the caller, dropped first): remove
        // what they left mounted, before the directories go.
        for d in [&self.a.mnt, &self.b.mnt, &self.a.data, &self.b.data] {
            if let Err(e) = lazy_unmount_all(d) {
                eprintln!("cleanup {}: {e:#}", d.display());
            }
        }
    }
}

/// Writes a `size`-byte image of distinct data at `path` (parents created): random
/// bytes (fixed seed) with every 4 KiB block carrying its offset in front, so no
/// two blocks are alike without generating `size` random bytes. `check` runs before
/// each 8 MiB write (a benchmark's interruption check; `|| Ok(())` otherwise).
pub fn fill_image(path: &Path, size: u64, mut check: impl FnMut() -> Result<()>) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
    }
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    let mut buf = vec![0u8; 8 << 20];
    StdRng::seed_from_u64(1).fill(&mut buf[..]);
    let mut off = 0;
    while off < size {
        check()?;
        let n = (size - off).min(buf.len() as u64) as usize;
        for (i, block) in buf[..n].chunks_mut(4096).enumerate() {
            let stamp = (off + i as u64 * 4096).to_le_bytes();
            let k = block.len().min(stamp.len());
            block[..k].copy_from_slice(&stamp[..k]);
        }
        f.write_all_at(&buf[..n], off)?;
        off += n as u64;
    }
    f.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_blocks_are_distinct_and_tail_is_written() -> Result<()> {
        let d = tempfile::tempdir_in("/var/tmp")?;
        let p = d.path().join("vm1/disk.img");
        let size = (8 << 20) + 3 * 4096 + 100;
        let mut calls = 0;
        fill_image(&p, size, || {
            calls += 1;
            Ok(())
        })?;
        assert_eq!(calls, 2);
        let data = std::fs::read(&p)?;
        assert_eq!(data.len() as u64, size);
        let mut seen = std::collections::HashSet::new();
        for (i, block) in data.chunks(4096).enumerate() {
            let off = u64::from_le_bytes(block[..8].try_into()?);
            assert_eq!(off, i as u64 * 4096);
            assert!(seen.insert(block.to_vec()), "block {i} repeats");
        }
        // An interruption stops the fill.
        let e = fill_image(&p, size, || anyhow::bail!("interrupted"));
        assert!(e.is_err());
        Ok(())
    }
}
