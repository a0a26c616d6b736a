//! Block-device counters around a run: how much really reached the disk
//! (page-cache hits, write amplification, flushes per fdatasync).
//! Device-wide, so other activity on the disk is included.

use anyhow::{Context, Result};
use serde::Serialize;
use std::path::Path;

/// The block device (major, minor) holding `path`, if it is a real one.
pub fn device_of(path: &Path) -> Result<(u32, u32)> {
    let st = rustix::fs::stat(path).with_context(|| format!("stat {}", path.display()))?;
    Ok((rustix::fs::major(st.st_dev), rustix::fs::minor(st.st_dev)))
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    sectors_read: u64,
    sectors_written: u64,
    flushes: u64,
}

/// Counters of device `dev` from /proc/diskstats; `None` if not listed
/// (e.g. an overlay or tmpfs: no block device).
pub fn read(dev: (u32, u32)) -> Option<Counters> {
    let text = std::fs::read_to_string("/proc/diskstats").ok()?;
    parse(&text, dev)
}

fn parse(text: &str, dev: (u32, u32)) -> Option<Counters> {
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
        if num(0)? != u64::from(dev.0) || num(1)? != u64::from(dev.1) {
            return None;
        }
        Some(Counters {
            sectors_read: num(5)?,
            sectors_written: num(9)?,
            // Flush counters exist since Linux 5.5.
            flushes: num(18).unwrap_or(0),
        })
    })
}

/// Disk traffic between two snapshots.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Traffic {
    pub read_mib: f64,
    pub written_mib: f64,
    pub flushes: u64,
}

pub fn delta(before: Counters, after: Counters) -> Traffic {
    let mib = |sectors: u64| sectors as f64 * 512.0 / (1024.0 * 1024.0);
    Traffic {
        read_mib: mib(after.sectors_read.saturating_sub(before.sectors_read)),
        written_mib: mib(after.sectors_written.saturating_sub(before.sectors_written)),
        flushes: after.flushes.saturating_sub(before.flushes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "   7       0 loop0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n \
        254       0 vda 3039872 107233 144556641 1117535 2197551 114074 188831897 3395156 0 345028 4659418 15342 69 36443080 67006 295663 79719\n";

    #[test]
    fn parses_and_diffs() {
        let before = parse(SAMPLE, (254, 0)).unwrap_or_default();
        assert_eq!(before.sectors_read, 144_556_641);
        assert_eq!(before.sectors_written, 188_831_897);
        assert_eq!(before.flushes, 295_663);
        assert!(parse(SAMPLE, (8, 0)).is_none());
        let after = Counters {
            sectors_read: before.sectors_read + 2048,
            sectors_written: before.sectors_written + 4096,
            flushes: before.flushes + 3,
        };
        let t = delta(before, after);
        assert_eq!((t.read_mib, t.written_mib, t.flushes), (1.0, 2.0, 3));
    }
}
