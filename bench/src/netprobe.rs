//! Helpers shared by the veth benchmarks (`vmha-bench-resync`, `vmha-bench-bigdata`):
//! the TCP goodput of the veth of a [`HostLink`] and per-file page-cache eviction.
//! Included with `#[path]` (the bench binaries share no library crate).

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vmha_test_infra::hostlink::HostLink;

/// Port of the probe's sink inside the fresh namespace (nothing else listens there).
const PROBE_PORT: u16 = 5001;

/// TCP goodput host → namespace, MB/s: `bytes` sent to a sink thread that lives in
/// the namespace (setns of that thread only).
pub fn probe_link(link: &HostLink, bytes: u64) -> Result<f64> {
    let ns = File::open(format!("/run/netns/{}", link.netns())).context("open netns")?;
    let addr = SocketAddr::new(link.ns_addr.into(), PROBE_PORT);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
    let sink = std::thread::spawn(move || -> Result<(u64, Instant)> {
        let setup = || -> Result<TcpListener> {
            rustix::thread::move_into_link_name_space(
                ns.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .context("setns")?;
            TcpListener::bind(addr).with_context(|| format!("bind {addr}"))
        };
        let listener = match setup() {
            Ok(l) => {
                let _ = ready_tx.send(Ok(()));
                l
            }
            Err(e) => {
                let _ = ready_tx.send(Err(anyhow::anyhow!("{e:#}")));
                return Err(e);
            }
        };
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            let r = s.read(&mut buf)?;
            if r == 0 {
                return Ok((n, Instant::now()));
            }
            n += r as u64;
        }
    });
    ready_rx.recv().context("probe sink thread")??;
    let mut s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    let mut buf = vec![0u8; 1 << 20];
    StdRng::seed_from_u64(7).fill(&mut buf[..]);
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(buf.len() as u64) as usize;
        s.write_all(&buf[..n])?;
        sent += n as u64;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let (got, end) = match sink.join() {
        Ok(r) => r?,
        Err(_) => bail!("probe sink thread panicked"),
    };
    if got != bytes {
        bail!("probe: sent {bytes}, received {got}");
    }
    Ok(bytes as f64 / (end - start).as_secs_f64() / 1e6)
}

/// Drops `path` from the page cache (after making it clean), so the next read
/// comes from the disk.
pub fn evict(path: &Path) -> Result<()> {
    let f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    // Dirty pages stay cached; flush first (may fail on a read-only bind: then the
    // receiver already synced it).
    let _ = rustix::fs::fdatasync(f.as_fd());
    rustix::fs::fadvise(f.as_fd(), 0, None, rustix::fs::Advice::DontNeed)
        .with_context(|| format!("fadvise {}", path.display()))?;
    Ok(())
}
