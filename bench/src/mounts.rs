//! Mount table lookups and lazy unmounts.

use anyhow::{Context, Result};
use rustix::mount::{unmount, UnmountFlags};
use std::path::{Path, PathBuf};

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let oct = bytes.get(i + 1..i + 4);
        match oct {
            Some(d) if bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)) => {
                out.push(
                    d.iter()
                        .fold(0u8, |acc, c| acc.wrapping_mul(8) + (c - b'0')),
                );
                i += 4;
            }
            _ => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// (mount point, fstype) pairs of `mountinfo` text, in mount order.
fn parse_mountinfo(text: &str) -> Vec<(PathBuf, String)> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mnt = left.split_whitespace().nth(4)?;
            let fstype = right.split_whitespace().next()?;
            Some((PathBuf::from(unescape(mnt)), fstype.to_owned()))
        })
        .collect()
}

/// The filesystem type of the topmost mount at exactly `path`, if any.
pub fn fstype_at(path: &Path) -> Result<Option<String>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").context("read mountinfo")?;
    Ok(parse_mountinfo(&text)
        .into_iter()
        .rev()
        .find(|(mnt, _)| mnt == path)
        .map(|(_, fstype)| fstype))
}

/// Detaches every mount stacked at `path`; returns how many there were.
pub fn lazy_unmount_all(path: &Path) -> Result<usize> {
    let mut n = 0;
    // Bounded: a mount that will not go away must not loop forever.
    while n < 8 && fstype_at(path)?.is_some() {
        unmount(path, UnmountFlags::DETACH)
            .with_context(|| format!("umount2({}, MNT_DETACH)", path.display()))?;
        n += 1;
    }
    Ok(n)
}

/// Lazily unmounts its path on drop if something is still mounted there.
#[derive(Debug)]
pub struct UnmountGuard(pub PathBuf);

impl Drop for UnmountGuard {
    fn drop(&mut self) {
        match lazy_unmount_all(&self.0) {
            Ok(0) => {}
            Ok(n) => eprintln!(
                "vmha-bench: {} was still mounted; detached {n} mount(s)",
                self.0.display()
            ),
            Err(e) => eprintln!("vmha-bench: {e:#}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_lines() {
        let text = "22 1 252:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
                    42 27 0:39 / /var/tmp/a\\040b rw,nosuid - fuse.vmha-fs vmha rw,user_id=0\n";
        let got = parse_mountinfo(text);
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].0, PathBuf::from("/var/tmp/a b"));
        assert_eq!(got[1].1, "fuse.vmha-fs");
        assert_eq!(got[0].1, "ext4");
    }
}
