//! Snapshots of a directory tree for comparing replicas: everything replication must
//! preserve (kind, size, permission bits, owner, link targets, content, data/hole map,
//! hard-link groups, `user.` xattrs) and nothing it need not (timestamps, inode
//! numbers, directory sizes).

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{File, Metadata};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use anyhow::{Context, Result};
use rustix::fs::SeekFrom;
use rustix::io::Errno;

/// Granularity of the data/hole map.
pub const EXTENT_GRANULE: u64 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

/// What is recorded about one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    /// Size for regular files and symlinks (directory sizes are filesystem-specific).
    pub size: Option<u64>,
    /// Permission bits including setuid, setgid and sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Device number of device nodes.
    pub rdev: Option<u64>,
    pub symlink_target: Option<String>,
    /// blake3 of a regular file's content, hex.
    pub blake3: Option<String>,
    /// Data extents `[start, end)` of a regular file, widened to 4 KiB granules and merged.
    pub data: Option<Vec<(u64, u64)>>,
    /// `user.*` extended attributes.
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

/// A snapshot of a directory tree. The root is the path ".".
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tree {
    pub entries: BTreeMap<String, Entry>,
    /// Paths sharing an inode (each group sorted, groups sorted).
    pub hard_links: Vec<Vec<String>>,
}

impl Tree {
    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries.get(path)
    }
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn kind_of(m: &Metadata) -> Kind {
    let t = m.file_type();
    if t.is_symlink() {
        Kind::Symlink
    } else if t.is_dir() {
        Kind::Dir
    } else if t.is_fifo() {
        Kind::Fifo
    } else if t.is_socket() {
        Kind::Socket
    } else if t.is_char_device() {
        Kind::CharDev
    } else if t.is_block_device() {
        Kind::BlockDev
    } else {
        Kind::File
    }
}

/// Data extents of an open file via SEEK_DATA / SEEK_HOLE, widened to
/// [`EXTENT_GRANULE`] and merged.
pub fn data_extents(f: &File) -> Result<Vec<(u64, u64)>> {
    let size = f.metadata()?.len();
    let mut raw = Vec::new();
    let mut off = 0;
    while off < size {
        let start = match rustix::fs::seek(f, SeekFrom::Data(off)) {
            Ok(d) => d,
            Err(Errno::NXIO) => break,
            Err(e) => return Err(std::io::Error::from(e)).context("lseek SEEK_DATA"),
        };
        if start >= size {
            break;
        }
        let end = rustix::fs::seek(f, SeekFrom::Hole(start))
            .map_err(std::io::Error::from)
            .context("lseek SEEK_HOLE")?
            .min(size);
        if end <= start {
            break;
        }
        raw.push((start, end));
        off = end;
    }
    Ok(normalise_extents(&raw))
}

fn normalise_extents(raw: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(s, e) in raw {
        let s = s / EXTENT_GRANULE * EXTENT_GRANULE;
        let e = e.div_ceil(EXTENT_GRANULE) * EXTENT_GRANULE;
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

fn user_xattrs(path: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut list = vec![0u8; 65536];
    let n = match rustix::fs::llistxattr(path, &mut list[..]) {
        Ok(n) => n,
        Err(Errno::NOTSUP) => return Ok(out),
        Err(e) => {
            return Err(std::io::Error::from(e))
                .with_context(|| format!("llistxattr {}", path.display()))
        }
    };
    let mut value = vec![0u8; 65536];
    for name in list[..n].split(|b| *b == 0).filter(|s| !s.is_empty()) {
        if !name.starts_with(b"user.") {
            continue;
        }
        let name = String::from_utf8_lossy(name).into_owned();
        let len = rustix::fs::lgetxattr(path, name.as_str(), &mut value[..])
            .map_err(std::io::Error::from)
            .with_context(|| format!("lgetxattr {} {name}", path.display()))?;
        out.insert(name, value[..len].to_vec());
    }
    Ok(out)
}

fn entry(path: &Path, m: &Metadata) -> Result<Entry> {
    let kind = kind_of(m);
    let (blake3, data) = if kind == Kind::File {
        let f = File::open(path).with_context(|| format!("open {}", path.display()))?;
        let mut h = blake3::Hasher::new();
        h.update_reader(&f)
            .with_context(|| format!("read {}", path.display()))?;
        // SEEK_DATA/SEEK_HOLE move the offset: only after reading.
        (
            Some(h.finalize().to_hex().to_string()),
            Some(data_extents(&f)?),
        )
    } else {
        (None, None)
    };
    let symlink_target = if kind == Kind::Symlink {
        Some(
            std::fs::read_link(path)
                .with_context(|| format!("readlink {}", path.display()))?
                .to_string_lossy()
                .into_owned(),
        )
    } else {
        None
    };
    Ok(Entry {
        kind,
        size: matches!(kind, Kind::File | Kind::Symlink).then(|| m.len()),
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        rdev: matches!(kind, Kind::CharDev | Kind::BlockDev).then(|| m.rdev()),
        symlink_target,
        blake3,
        data,
        xattrs: if kind == Kind::Symlink {
            // user.* xattrs are not permitted on symlinks.
            BTreeMap::new()
        } else {
            user_xattrs(path)?
        },
    })
}

/// Walks `dir` without following symlinks and records every path beneath it.
pub fn snapshot(dir: &Path) -> Result<Tree> {
    let mut tree = Tree::default();
    let mut inodes: BTreeMap<(u64, u64), Vec<String>> = BTreeMap::new();
    let root_meta =
        std::fs::symlink_metadata(dir).with_context(|| format!("lstat {}", dir.display()))?;
    tree.entries
        .insert(".".to_string(), entry(dir, &root_meta)?);
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((abs, rel)) = stack.pop() {
        let rd = std::fs::read_dir(&abs).with_context(|| format!("readdir {}", abs.display()))?;
        for de in rd {
            let de = de.with_context(|| format!("readdir {}", abs.display()))?;
            let name = de.file_name().to_string_lossy().into_owned();
            let child_rel = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let child_abs = de.path();
            let m = std::fs::symlink_metadata(&child_abs)
                .with_context(|| format!("lstat {}", child_abs.display()))?;
            let e = entry(&child_abs, &m)?;
            if e.kind == Kind::Dir {
                stack.push((child_abs, child_rel.clone()));
            } else if m.nlink() > 1 {
                inodes
                    .entry((m.dev(), m.ino()))
                    .or_default()
                    .push(child_rel.clone());
            }
            tree.entries.insert(child_rel, e);
        }
    }
    let mut groups: Vec<Vec<String>> = inodes
        .into_values()
        .filter(|g| g.len() > 1)
        .map(|mut g| {
            g.sort();
            g
        })
        .collect();
    groups.sort();
    tree.hard_links = groups;
    Ok(tree)
}

struct Extents<'a>(&'a Option<Vec<(u64, u64)>>);

impl fmt::Display for Extents<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => write!(f, "-"),
            Some(v) => {
                let parts: Vec<String> = v.iter().map(|(s, e)| format!("{s}..{e}")).collect();
                write!(f, "[{}]", parts.join(", "))
            }
        }
    }
}

fn fmt_xattrs(x: &BTreeMap<String, Vec<u8>>) -> String {
    let parts: Vec<String> = x
        .iter()
        .map(|(k, v)| format!("{k}={:?}", String::from_utf8_lossy(v)))
        .collect();
    format!("{{{}}}", parts.join(", "))
}

/// Human-readable differences from `a` (left) to `b` (right); empty if equal.
pub fn diff(a: &Tree, b: &Tree) -> Vec<String> {
    let mut out = Vec::new();
    for (path, ea) in &a.entries {
        let Some(eb) = b.entries.get(path) else {
            out.push(format!("{path}: only in left ({:?})", ea.kind));
            continue;
        };
        if ea.kind != eb.kind {
            out.push(format!("{path}: kind {:?} != {:?}", ea.kind, eb.kind));
            continue;
        }
        if ea.size != eb.size {
            out.push(format!("{path}: size {:?} != {:?}", ea.size, eb.size));
        }
        if ea.mode != eb.mode {
            out.push(format!("{path}: mode {:04o} != {:04o}", ea.mode, eb.mode));
        }
        if (ea.uid, ea.gid) != (eb.uid, eb.gid) {
            out.push(format!(
                "{path}: owner {}:{} != {}:{}",
                ea.uid, ea.gid, eb.uid, eb.gid
            ));
        }
        if ea.rdev != eb.rdev {
            out.push(format!("{path}: rdev {:?} != {:?}", ea.rdev, eb.rdev));
        }
        if ea.symlink_target != eb.symlink_target {
            out.push(format!(
                "{path}: symlink target {:?} != {:?}",
                ea.symlink_target, eb.symlink_target
            ));
        }
        if ea.blake3 != eb.blake3 {
            out.push(format!("{path}: content differs"));
        }
        if ea.data != eb.data {
            out.push(format!(
                "{path}: data map {} != {}",
                Extents(&ea.data),
                Extents(&eb.data)
            ));
        }
        if ea.xattrs != eb.xattrs {
            out.push(format!(
                "{path}: xattrs {} != {}",
                fmt_xattrs(&ea.xattrs),
                fmt_xattrs(&eb.xattrs)
            ));
        }
    }
    for (path, eb) in &b.entries {
        if !a.entries.contains_key(path) {
            out.push(format!("{path}: only in right ({:?})", eb.kind));
        }
    }
    if a.hard_links != b.hard_links {
        out.push(format!(
            "hard links {:?} != {:?}",
            a.hard_links, b.hard_links
        ));
    }
    out
}

/// Snapshots `left` and `right` and fails with the readable differences (at most
/// 60 lines) if they differ. Returns the left snapshot.
pub fn assert_same_tree(left: &Path, right: &Path) -> Result<Tree> {
    let a = snapshot(left)?;
    let b = snapshot(right)?;
    let d = diff(&a, &b);
    if !d.is_empty() || a != b {
        let shown: Vec<&str> = d.iter().map(String::as_str).take(60).collect();
        anyhow::bail!(
            "trees differ: left {} / right {} ({} differences):\n{}",
            left.display(),
            right.display(),
            d.len(),
            shown.join("\n")
        );
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    #[test]
    fn extents_normalised() {
        assert_eq!(
            normalise_extents(&[(0, 100), (4096, 5000), (16384, 16385)]),
            vec![(0, 8192), (16384, 20480)]
        );
        assert_eq!(normalise_extents(&[]), vec![]);
    }

    fn sample(dir: &Path) -> Result<()> {
        std::fs::create_dir(dir.join("d"))?;
        std::fs::set_permissions(dir.join("d"), std::fs::Permissions::from_mode(0o755))?;
        std::fs::write(dir.join("d/f"), b"hello")?;
        std::fs::hard_link(dir.join("d/f"), dir.join("g"))?;
        symlink("d/f", dir.join("s"))?;
        let f = File::create(dir.join("sparse"))?;
        f.set_len(1 << 20)?;
        std::os::unix::fs::FileExt::write_all_at(&f, &[1u8; 10], 512 * 1024)?;
        rustix::fs::setxattr(
            dir.join("g"),
            "user.k",
            b"v",
            rustix::fs::XattrFlags::empty(),
        )?;
        Ok(())
    }

    #[test]
    fn equal_trees_and_differences() -> Result<()> {
        let a = tempfile::tempdir_in("/var/tmp")?;
        let b = tempfile::tempdir_in("/var/tmp")?;
        sample(a.path())?;
        sample(b.path())?;
        let ta = snapshot(a.path())?;
        let tb = snapshot(b.path())?;
        assert_eq!(diff(&ta, &tb), Vec::<String>::new());
        assert_eq!(ta, tb);
        assert_eq!(
            ta.hard_links,
            vec![vec!["d/f".to_string(), "g".to_string()]]
        );
        assert_eq!(
            ta.get("sparse").and_then(|e| e.data.clone()),
            Some(vec![(512 * 1024, 512 * 1024 + 4096)])
        );
        assert_eq!(
            ta.get("s").and_then(|e| e.symlink_target.clone()),
            Some("d/f".to_string())
        );

        // Each kind of change is noticed.
        std::fs::set_permissions(b.path().join("d"), std::fs::Permissions::from_mode(0o700))?;
        std::fs::write(b.path().join("d/f"), b"hellO")?;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(b.path().join("sparse"))?;
        std::os::unix::fs::FileExt::write_all_at(&f, &[0u8; 10], 0)?;
        std::fs::remove_file(b.path().join("g"))?;
        std::fs::write(b.path().join("g"), b"hello")?;
        rustix::fs::chownat(
            rustix::fs::CWD,
            b.path().join("s"),
            Some(rustix::fs::Uid::from_raw_unchecked(1000)),
            None,
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )?;
        let d = diff(&ta, &snapshot(b.path())?);
        let all = d.join("\n");
        assert!(all.contains("d: mode 0755 != 0700"), "{all}");
        assert!(all.contains("d/f: content differs"), "{all}");
        assert!(all.contains("sparse: data map"), "{all}");
        assert!(all.contains("hard links"), "{all}");
        assert!(all.contains("g: xattrs"), "{all}");
        assert!(all.contains("s: owner 0:0 != 1000:0"), "{all}");
        Ok(())
    }
}
