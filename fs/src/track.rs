//! A node's persistent record of what its peer may lack (design, "Degraded mode and
//! dirty tracking"). The one place that owns it; everything lives in
//! `STATEDIR/track/`:
//!
//! - **Dirty maps** (`map-<ino>`): one bit per 4 KiB block of a backing file, set
//!   before a write that the peer does not receive is applied here (degraded mode).
//!   The bit is durable before the caller goes on (write-ahead); concurrent callers
//!   share one flush (group commit), and a write to blocks already marked costs
//!   nothing. Pages (128 MiB of file) marked whole are kept as runs instead
//!   (`runs-<ino>`), so the cost of a mark is bounded by the pages at its two ends
//!   and the runs it meets, never by its length: a `truncate` to a petabyte is one
//!   run. Offsets are capped at 2^63 (the kernel's largest file).
//! - **Journal** (`journal`): names whose binding changed without the peer (create,
//!   unlink, rename, link…). A file reached through such a name is compared whole at
//!   reintegration: its dirty map says nothing about what the peer has at that name.
//! - **Activity log** (`activity`): while connected, the 4 MiB extents with recent
//!   writes (and names with recent namespace changes). An extent enters before its
//!   first write goes out and leaves only after a checkpoint made both nodes' copies
//!   durable, so after a crash of either node the regions that may differ are known
//!   and bounded by `capacity × 4 MiB`: a crashed primary never needs a full resync.
//! - **valid**: the records are complete since the last time both copies were
//!   identical (`clear_all` at the end of a resync). Without it, reintegration has to
//!   compare everything.
//!
//! Keys are backing inode numbers (stable while the file exists); a reused number
//! only inherits extra marks, which costs a few blocks, never a missed one.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use rustix::fs::{FileType, OFlags};
use serde::{Deserialize, Serialize};

use crate::apply::{self, Errno};
use crate::op::Name;

/// Granularity of the dirty maps.
pub const BLOCK: u64 = 4096;
/// Granularity of the activity log.
pub const EXTENT: u64 = 4 << 20;
/// Default number of activity-log extents (a crashed primary resends at most this
/// many × 4 MiB, plus what was written degraded).
pub const DEFAULT_AL_EXTENTS: usize = 256;
/// The activity-log extent index that stands for a whole file.
const WHOLE: u64 = u64::MAX;
/// Bytes of bitmap per in-memory page (covers 128 MiB of file).
const PAGE: usize = 4096;
const BLOCKS_PER_PAGE: u64 = PAGE as u64 * 8;
/// A range change wider than this many extents is logged as a name (compared whole)
/// rather than flooding the activity log.
const MAX_EXTENTS_PER_CHANGE: u64 = 8;
/// The most ranges one report entry carries before nearby ranges are merged (an
/// entry travels whole in one frame header; more is copied then, never less).
const MAX_ENTRY_RANGES: usize = 2048;
/// Encoded size a report part aims at: with one largest entry on top it stays well
/// under a frame header's limit (`wire::MAX_META_LEN`).
const REPORT_PART_BYTES: usize = 48 << 10;

const VALID: &str = "valid";
const JOURNAL: &str = "journal";
const ACTIVITY: &str = "activity";
const MAP_PREFIX: &str = "map-";
const RUNS_PREFIX: &str = "runs-";
const WHOLE_PREFIX: &str = "whole-";

/// What a mutation changes, as tracking sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Bytes `[start, end)` of the file with backing inode `ino`.
    Range { ino: u64, start: u64, end: u64 },
    /// A name (relative to the replicated directory) whose binding changes: it and
    /// everything beneath it are compared whole at reintegration.
    Name(Vec<u8>),
}

/// Errors of the tracking metadata.
#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    #[error("tracking metadata {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tracking metadata cannot be written ({0}); refusing unrecorded writes")]
    Broken(String),
}

impl From<TrackError> for Errno {
    fn from(_: TrackError) -> Errno {
        Errno::IO
    }
}

/// The block a marked run of whole pages may not reach past: offsets are capped at
/// 2^63 (no file is larger: the kernel's `MAX_LFS_FILESIZE`), so every page and byte
/// number below fits in a `u64`.
const MAX_OFFSET: u64 = 1 << 63;
/// In a set of changed page numbers: the runs of whole pages changed.
const RUNS: u64 = u64::MAX;

fn zero_page() -> Box<[u8]> {
    vec![0u8; PAGE].into_boxed_slice()
}

fn ones(page: &[u8]) -> u64 {
    page.iter().map(|b| u64::from(b.count_ones())).sum()
}

/// A sparse bitmap of blocks. Pages partly marked are kept as bits; pages wholly
/// marked are kept as runs of page numbers, so marking or clearing a range costs
/// O(pages at its two ends + runs it meets), never O(its length): a `truncate` to a
/// petabyte marks one run, not 2^38 bits.
///
/// A page number is either in `pages` or inside a run, never both. On disk the map
/// file holds the `pages` (a page absorbed into a run is zeroed there once the run is
/// durable) and `runs-<ino>` holds the runs; the marks are their union.
#[derive(Debug, Default, Clone)]
struct Bitmap {
    pages: BTreeMap<u64, Box<[u8]>>,
    /// Runs of wholly marked pages: first page → end page (exclusive); disjoint.
    runs: BTreeMap<u64, u64>,
    /// Blocks set.
    count: u64,
}

impl Bitmap {
    /// Sets the blocks covering bytes `[start, end)`; returns the pages that changed
    /// ([`RUNS`] for the runs).
    fn set(&mut self, start: u64, end: u64) -> Vec<u64> {
        let mut changed = Vec::new();
        let end = end.min(MAX_OFFSET);
        if end <= start {
            return changed;
        }
        let (first, last) = (start / BLOCK, end.div_ceil(BLOCK));
        let (full_from, full_to) = (first.div_ceil(BLOCKS_PER_PAGE), last / BLOCKS_PER_PAGE);
        if full_from < full_to {
            self.set_bits(first, full_from * BLOCKS_PER_PAGE, &mut changed);
            self.add_run(full_from, full_to, &mut changed);
            self.set_bits(full_to * BLOCKS_PER_PAGE, last, &mut changed);
        } else {
            self.set_bits(first, last, &mut changed);
        }
        changed
    }

    /// Clears the blocks lying wholly inside `[start, end)`; returns changed pages.
    fn clear(&mut self, start: u64, end: u64) -> Vec<u64> {
        let mut changed = Vec::new();
        let end = end.min(MAX_OFFSET);
        let (first, last) = (start.div_ceil(BLOCK), end / BLOCK);
        if first >= last {
            return changed;
        }
        let (full_from, full_to) = (first.div_ceil(BLOCKS_PER_PAGE), last / BLOCKS_PER_PAGE);
        if full_from < full_to {
            self.clear_bits(first, full_from * BLOCKS_PER_PAGE, &mut changed);
            self.cut_runs(full_from, full_to, &mut changed);
            // Zeroed on disk by the flush (absent pages are written as zeros).
            let gone: Vec<u64> = self
                .pages
                .range(full_from..full_to)
                .map(|(&k, _)| k)
                .collect();
            for no in gone {
                if let Some(page) = self.pages.remove(&no) {
                    self.count -= ones(&page);
                    changed.push(no);
                }
            }
            self.clear_bits(full_to * BLOCKS_PER_PAGE, last, &mut changed);
        } else {
            self.clear_bits(first, last, &mut changed);
        }
        changed
    }

    /// The run containing page `no`, if any.
    fn run_of(&self, no: u64) -> Option<(u64, u64)> {
        self.runs
            .range(..=no)
            .next_back()
            .map(|(&s, &e)| (s, e))
            .filter(|&(_, e)| no < e)
    }

    /// Sets blocks `[from, to)`, which span at most two pages.
    fn set_bits(&mut self, from: u64, to: u64, changed: &mut Vec<u64>) {
        let mut block = from;
        while block < to {
            let no = block / BLOCKS_PER_PAGE;
            let page_end = ((no + 1) * BLOCKS_PER_PAGE).min(to);
            if self.run_of(no).is_none() {
                let page = self.pages.entry(no).or_insert_with(zero_page);
                let mut any = false;
                for b in block..page_end {
                    let bit = (b % BLOCKS_PER_PAGE) as usize;
                    let (byte, mask) = (bit / 8, 1u8 << (bit % 8));
                    if page[byte] & mask == 0 {
                        page[byte] |= mask;
                        any = true;
                        self.count += 1;
                    }
                }
                if any {
                    changed.push(no);
                }
            }
            block = page_end;
        }
    }

    /// Clears blocks `[from, to)`, which span at most two pages. A page inside a run
    /// leaves it as bits first.
    fn clear_bits(&mut self, from: u64, to: u64, changed: &mut Vec<u64>) {
        let mut block = from;
        while block < to {
            let no = block / BLOCKS_PER_PAGE;
            let page_end = ((no + 1) * BLOCKS_PER_PAGE).min(to);
            if let Some((s, e)) = self.run_of(no) {
                self.runs.remove(&s);
                if s < no {
                    self.runs.insert(s, no);
                }
                if no + 1 < e {
                    self.runs.insert(no + 1, e);
                }
                self.pages.insert(no, vec![0xffu8; PAGE].into_boxed_slice());
                changed.push(RUNS);
                changed.push(no);
            }
            if let Some(page) = self.pages.get_mut(&no) {
                let mut any = false;
                for b in block..page_end {
                    let bit = (b % BLOCKS_PER_PAGE) as usize;
                    let (byte, mask) = (bit / 8, 1u8 << (bit % 8));
                    if page[byte] & mask != 0 {
                        page[byte] &= !mask;
                        any = true;
                        self.count -= 1;
                    }
                }
                if any {
                    changed.push(no);
                }
            }
            block = page_end;
        }
    }

    /// Marks pages `[from, to)` whole: merges the runs it meets or touches and
    /// absorbs the partial pages inside (to be zeroed on disk).
    fn add_run(&mut self, from: u64, to: u64, changed: &mut Vec<u64>) {
        let met: Vec<(u64, u64)> = self
            .runs
            .range(..=to)
            .rev()
            .take_while(|(_, &e)| e >= from)
            .map(|(&s, &e)| (s, e))
            .collect();
        let (mut lo, mut hi, mut covered) = (from, to, 0u64);
        for (s, e) in met {
            self.runs.remove(&s);
            lo = lo.min(s);
            hi = hi.max(e);
            covered += e.min(to).saturating_sub(s.max(from));
        }
        self.runs.insert(lo, hi);
        let new = (to - from) - covered;
        if new == 0 {
            return;
        }
        let absorbed: Vec<u64> = self.pages.range(from..to).map(|(&k, _)| k).collect();
        for no in absorbed {
            if let Some(page) = self.pages.remove(&no) {
                self.count -= ones(&page);
                changed.push(no);
            }
        }
        self.count += new * BLOCKS_PER_PAGE;
        changed.push(RUNS);
    }

    /// Unmarks whole pages `[from, to)` held as runs (their disk pages are zero).
    fn cut_runs(&mut self, from: u64, to: u64, changed: &mut Vec<u64>) {
        let met: Vec<(u64, u64)> = self
            .runs
            .range(..to)
            .rev()
            .take_while(|(_, &e)| e > from)
            .map(|(&s, &e)| (s, e))
            .collect();
        for &(s, e) in &met {
            self.runs.remove(&s);
            self.count -= (e.min(to) - s.max(from)) * BLOCKS_PER_PAGE;
            if s < from {
                self.runs.insert(s, from);
            }
            if to < e {
                self.runs.insert(to, e);
            }
        }
        if !met.is_empty() {
            changed.push(RUNS);
        }
    }

    fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The runs as stored in `runs-<ino>`: (first page, end page) little-endian.
    fn encode_runs(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.runs.len() * 16);
        for (&s, &e) in &self.runs {
            out.extend_from_slice(&s.to_le_bytes());
            out.extend_from_slice(&e.to_le_bytes());
        }
        out
    }

    /// Adds the runs of a `runs-<ino>` file; returns the pages absorbed (to zero).
    fn load_runs(&mut self, bytes: &[u8]) -> Vec<u64> {
        let max_page = MAX_OFFSET / BLOCK / BLOCKS_PER_PAGE;
        let mut changed = Vec::new();
        for rec in bytes.chunks_exact(16) {
            let mut s = [0u8; 8];
            let mut e = [0u8; 8];
            s.copy_from_slice(&rec[..8]);
            e.copy_from_slice(&rec[8..]);
            let (s, e) = (u64::from_le_bytes(s), u64::from_le_bytes(e).min(max_page));
            if s < e {
                self.add_run(s, e, &mut changed);
            }
        }
        changed.retain(|&no| no != RUNS);
        changed
    }

    /// The marked bytes as sorted, merged ranges.
    fn ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (&page_no, page) in &self.pages {
            for (i, &byte) in page.iter().enumerate() {
                if byte == 0 {
                    continue;
                }
                for bit in 0..8 {
                    if byte & (1 << bit) == 0 {
                        continue;
                    }
                    let block = page_no * BLOCKS_PER_PAGE + (i * 8 + bit) as u64;
                    let (s, e) = (block * BLOCK, (block + 1) * BLOCK);
                    match out.last_mut() {
                        Some(last) if last.1 == s => last.1 = e,
                        _ => out.push((s, e)),
                    }
                }
            }
        }
        let page_bytes = BLOCKS_PER_PAGE * BLOCK;
        out.extend(
            self.runs
                .iter()
                .map(|(&s, &e)| (s * page_bytes, e * page_bytes)),
        );
        merge_ranges(out)
    }
}

/// Sorts and merges overlapping or touching ranges (exactly: nothing is added).
pub fn merge_ranges(ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    coarsen(ranges, usize::MAX)
}

/// Like [`merge_ranges`], then also merges across gaps until at most `max` ranges
/// remain (marking more is always safe): keeps a report small on the wire.
pub fn coarsen(mut ranges: Vec<(u64, u64)>, max: usize) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut gap = 0u64;
    loop {
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for &(s, e) in &ranges {
            match out.last_mut() {
                Some(last) if s <= last.1.saturating_add(gap) => last.1 = last.1.max(e),
                _ => out.push((s, e)),
            }
        }
        if out.len() <= max.max(1) {
            return out;
        }
        gap = if gap == 0 { 1 << 20 } else { gap * 4 };
    }
}

#[derive(Debug, Clone, Copy)]
struct Active {
    inflight: u32,
    epoch: u64,
    /// The batch that writes this entry to disk.
    queued: u64,
    /// Recorded for a write the peer receives (connected): if the peer stops
    /// receiving, the whole extent may differ. Entries recorded only for degraded
    /// writes stand for exact bits kept in memory until a checkpoint writes them.
    coarse: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum AlEntry {
    Extent { ino: u64, index: u64 },
    Name(Vec<u8>),
}

#[derive(Debug, Default)]
struct Pending {
    /// Map pages to write, per inode.
    pages: BTreeMap<u64, BTreeSet<u64>>,
    journal: Vec<Vec<u8>>,
    whole: Vec<u64>,
    activity: Vec<AlEntry>,
    /// The activity log must be rewritten (compaction), not appended to.
    rewrite_activity: bool,
}

#[derive(Debug)]
struct State {
    valid: bool,
    maps: HashMap<u64, Bitmap>,
    journal: BTreeSet<Vec<u8>>,
    /// Files that may differ anywhere.
    whole: BTreeSet<u64>,
    active: HashMap<AlEntry, Active>,
    /// Dirty-map pages changed by degraded writes, written at the next checkpoint
    /// (until then their extents in the activity log cover them).
    lazy_pages: BTreeMap<u64, BTreeSet<u64>>,
    /// Checkpoint epoch: extents touched in this epoch are not retired by the
    /// checkpoint that began it.
    epoch: u64,
    pending: Pending,
    /// The batch being filled; `durable` is the last one on disk.
    batch: u64,
    durable: u64,
    flushing: bool,
    broken: Option<String>,
    /// Someone waits for room in the activity log.
    want_checkpoint: bool,
    /// [`Tracker::wake_checkpointer`] was called: the next wait returns at once.
    wake: bool,
    /// Something was recorded as degraded since `sync_window_begin`: the link
    /// stopped sending meanwhile, so no mark may be cleared.
    degraded_since_window: bool,
}

/// Dirty-map files kept open by the flushing thread at most (the others are
/// reopened when written again).
const MAX_OPEN_MAPS: usize = 256;

/// See the module documentation.
#[derive(Debug)]
pub struct Tracker {
    dir: PathBuf,
    capacity: usize,
    state: Mutex<State>,
    changed: Condvar,
    /// Open map files, used only by the flushing thread.
    files: Mutex<HashMap<u64, File>>,
    /// Activity-log updates written durably (for `metrics.json`).
    al_writes: std::sync::atomic::AtomicU64,
}

/// Keeps an activity-log entry from retiring while its write is in flight.
#[derive(Debug)]
pub struct InFlight {
    tracker: Option<Arc<Tracker>>,
    entries: Vec<AlEntry>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(t) = self.tracker.take() {
            let mut st = t.state.lock();
            for e in &self.entries {
                if let Some(a) = st.active.get_mut(e) {
                    a.inflight = a.inflight.saturating_sub(1);
                }
            }
        }
    }
}

impl InFlight {
    pub fn none() -> InFlight {
        InFlight {
            tracker: None,
            entries: Vec::new(),
        }
    }
}

/// What one node reports about its copy when a writer attaches it: the namespace it
/// has and the regions its own records say may differ.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The records are complete since the last time both copies were identical.
    pub valid: bool,
    pub entries: Vec<ReportEntry>,
    /// Names (and everything beneath) to compare whole.
    pub names: Vec<Vec<u8>>,
}

impl Report {
    /// Appends one part of a streamed report.
    pub fn add(&mut self, part: ReportPart) {
        self.entries.extend(part.entries);
        self.names.extend(part.names);
    }
}

/// A piece of a streamed report (`wire::Message::ReportPart`), small enough for
/// one frame.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportPart {
    pub entries: Vec<ReportEntry>,
    /// Names (and everything beneath) to compare whole.
    pub names: Vec<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportEntry {
    /// Relative path, components joined by `/`.
    pub path: Vec<u8>,
    pub kind: EntryKind,
    /// Byte ranges of a regular file that may differ.
    pub dirty: Vec<(u64, u64)>,
    /// Owner, permissions and extended attributes (files and directories).
    pub attrs: Attrs,
}

/// What a resync compares to tell whether an entry's metadata differs without
/// taking an id for it: attribute changes are not in the records (only ranges and
/// names are), so both copies' attributes are compared instead.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attrs {
    /// Permission bits (07777).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Digest of the extended attributes' names and values (0: none readable).
    pub xattrs: u64,
}

impl Attrs {
    /// The attributes of the file or directory behind the O_PATH descriptor `fd`
    /// (`st` its status); other kinds have none that a resync compares.
    pub fn of(fd: BorrowedFd<'_>, st: &rustix::fs::Stat) -> Attrs {
        if !matches!(EntryKind::of(st.st_mode), EntryKind::File | EntryKind::Dir) {
            return Attrs::default();
        }
        let path = apply::proc_path(fd);
        let list = apply::read_sized(|buf| rustix::fs::listxattr(&path, buf)).unwrap_or_default();
        let mut names: Vec<&[u8]> = list.split(|&b| b == 0).filter(|n| !n.is_empty()).collect();
        let xattrs = if names.is_empty() {
            0
        } else {
            names.sort_unstable();
            let mut h = blake3::Hasher::new();
            for name in names {
                let key: &std::ffi::OsStr = std::os::unix::ffi::OsStrExt::from_bytes(name);
                let value = apply::read_sized(|buf| rustix::fs::getxattr(&path, key, buf))
                    .unwrap_or_default();
                h.update(&(name.len() as u64).to_le_bytes());
                h.update(name);
                h.update(&(value.len() as u64).to_le_bytes());
                h.update(&value);
            }
            let mut first = [0u8; 8];
            first.copy_from_slice(&h.finalize().as_bytes()[..8]);
            u64::from_le_bytes(first) | 1
        };
        Attrs {
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            xattrs,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Other,
}

impl EntryKind {
    pub fn of(mode: u32) -> EntryKind {
        match FileType::from_raw_mode(mode) {
            FileType::RegularFile => EntryKind::File,
            FileType::Directory => EntryKind::Dir,
            FileType::Symlink => EntryKind::Symlink,
            _ => EntryKind::Other,
        }
    }
}

/// One entry of a directory walk.
#[derive(Debug)]
pub struct WalkEntry {
    pub path: Vec<u8>,
    pub st: rustix::fs::Stat,
    /// O_PATH descriptor of the entry.
    pub fd: std::os::fd::OwnedFd,
}

/// One directory being listed by [`walk_each`].
struct Level {
    /// O_PATH descriptor of the directory (children are looked up beneath it).
    dir: OwnedFd,
    entries: rustix::fs::Dir,
    prefix: Vec<u8>,
}

impl Level {
    fn open(dir: OwnedFd, prefix: Vec<u8>) -> Result<Level, Errno> {
        let listing = apply::reopen(dir.as_fd(), OFlags::RDONLY | OFlags::DIRECTORY)?;
        Ok(Level {
            dir,
            entries: rustix::fs::Dir::new(listing)?,
            prefix,
        })
    }
}

/// Calls `visit` on every entry beneath `root` (not the root itself), depth first,
/// parents before children, never following a symlink. Holds two descriptors per
/// level of depth (plus the visited entry's), never one per entry: a tree of a
/// million files walks within any descriptor limit, in memory bounded by its depth.
pub fn walk_each<E: From<Errno>>(
    root: BorrowedFd<'_>,
    mut visit: impl FnMut(&WalkEntry) -> Result<(), E>,
) -> Result<(), E> {
    let mut stack = vec![Level::open(apply::reopen(root, OFlags::PATH)?, Vec::new())?];
    while let Some(level) = stack.last_mut() {
        let Some(entry) = level.entries.read() else {
            stack.pop();
            continue;
        };
        let entry = entry?;
        let raw = entry.file_name().to_bytes();
        if raw == b"." || raw == b".." {
            continue;
        }
        let Ok(name) = Name::new(raw) else {
            continue;
        };
        let fd = match apply::lookup_beneath(level.dir.as_fd(), &name) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => continue,
            Err(e) => return Err(e.into()),
        };
        let st = rustix::fs::fstat(fd.as_fd())?;
        let e = WalkEntry {
            path: join(&level.prefix, raw),
            st,
            fd,
        };
        visit(&e)?;
        if FileType::from_raw_mode(e.st.st_mode) == FileType::Directory {
            stack.push(Level::open(e.fd, e.path)?);
        }
    }
    Ok(())
}

/// The entries of one directory (`path` = the name), sorted, never following a
/// symlink.
pub fn walk_one(dir: BorrowedFd<'_>) -> Result<Vec<WalkEntry>, Errno> {
    let mut names = apply::dir_names(dir)?;
    names.sort();
    let mut out = Vec::new();
    for raw in names {
        let Ok(name) = Name::new(raw.clone()) else {
            continue;
        };
        let fd = match apply::lookup_beneath(dir, &name) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => continue,
            Err(e) => return Err(e),
        };
        let st = rustix::fs::fstat(fd.as_fd())?;
        out.push(WalkEntry { path: raw, st, fd });
    }
    Ok(out)
}

/// `prefix/name` (or `name` at the top).
pub fn join(prefix: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = prefix.to_vec();
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// Whether `path` is `name` or beneath it.
pub fn is_beneath(path: &[u8], name: &[u8]) -> bool {
    name.is_empty()
        || path == name
        || (path.len() > name.len() && path.starts_with(name) && path[name.len()] == b'/')
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrackError + '_ {
    move |source| TrackError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads length-prefixed records; a torn tail (crash in mid-append) is ignored: it
/// was never reported durable.
fn read_records(path: &Path) -> Result<Vec<Vec<u8>>, TrackError> {
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut f) => {
            f.read_to_end(&mut bytes).map_err(io(path))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(path)(e)),
    }
    let mut out = Vec::new();
    let mut rest = &bytes[..];
    while rest.len() >= 4 {
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if rest.len() < 4 + len {
            break;
        }
        out.push(rest[4..4 + len].to_vec());
        rest = &rest[4 + len..];
    }
    Ok(out)
}

/// The nonzero pages of a map file, reading only its data (a mark far into a huge
/// file leaves a sparse map file: its holes are not read).
fn load_pages(path: &Path) -> Result<BTreeMap<u64, Box<[u8]>>, TrackError> {
    let f = File::open(path).map_err(io(path))?;
    let len = f.metadata().map_err(io(path))?.len();
    let mut pages = BTreeMap::new();
    let mut pos = 0u64;
    while pos < len {
        let data = match rustix::fs::seek(&f, rustix::fs::SeekFrom::Data(pos)) {
            Ok(at) => at,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(io(path)(e.into())),
        };
        let no = data / PAGE as u64;
        let mut page = zero_page();
        let mut got = 0;
        while got < PAGE {
            match f.read_at(&mut page[got..], no * PAGE as u64 + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io(path)(e)),
            }
        }
        if page.iter().any(|&b| b != 0) {
            pages.insert(no, page);
        }
        pos = (no + 1) * PAGE as u64;
    }
    Ok(pages)
}

fn record(out: &mut Vec<u8>, body: &[u8]) {
    // A body is one path (bounded by the filesystem, far below 4 GiB); one that
    // is not representable is never framed wrongly.
    let Ok(len) = u32::try_from(body.len()) else {
        tracing::error!(len = body.len(), "journal record too large; not recorded");
        return;
    };
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(body);
}

fn encode_al(e: &AlEntry) -> Vec<u8> {
    let mut b = Vec::new();
    match e {
        AlEntry::Extent { ino, index } => {
            b.push(1);
            b.extend_from_slice(&ino.to_le_bytes());
            b.extend_from_slice(&index.to_le_bytes());
        }
        AlEntry::Name(name) => {
            b.push(2);
            b.extend_from_slice(name);
        }
    }
    b
}

fn decode_al(b: &[u8]) -> Option<AlEntry> {
    match b.split_first()? {
        (1, rest) if rest.len() == 16 => Some(AlEntry::Extent {
            ino: u64::from_le_bytes(rest[..8].try_into().ok()?),
            index: u64::from_le_bytes(rest[8..].try_into().ok()?),
        }),
        (2, rest) => Some(AlEntry::Name(rest.to_vec())),
        _ => None,
    }
}

fn append(path: &Path, bytes: &[u8]) -> Result<(), TrackError> {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_data().map_err(io(path))
}

impl Tracker {
    /// Opens (creating) `state/track`. An activity log left by a previous run is
    /// folded into the dirty maps: whether its writes reached the peer is unknown.
    pub fn open(state: &Path, capacity: usize) -> Result<Arc<Tracker>, TrackError> {
        let dir = state.join("track");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io(&dir))?;
        let mut maps: HashMap<u64, Bitmap> = HashMap::new();
        let mut whole = BTreeSet::new();
        let mut runs = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let entry = entry.map_err(io(&dir))?;
            let name = entry.file_name();
            let numbered = |prefix: &str| {
                name.to_str()
                    .and_then(|n| n.strip_prefix(prefix))
                    .and_then(|n| n.parse::<u64>().ok())
            };
            if let Some(ino) = numbered(WHOLE_PREFIX) {
                whole.insert(ino);
            } else if let Some(ino) = numbered(RUNS_PREFIX) {
                runs.push((ino, entry.path()));
            } else if let Some(ino) = numbered(MAP_PREFIX) {
                let map = maps.entry(ino).or_default();
                map.pages = load_pages(&entry.path())?;
                map.count = map.pages.values().map(|p| ones(p)).sum();
            }
        }
        // Pages inside a run are stale (a crash came between the run and their
        // zeroing): dropped here, zeroed on disk below.
        let mut absorbed: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
        for (ino, path) in runs {
            let bytes = std::fs::read(&path).map_err(io(&path))?;
            let stale = maps.entry(ino).or_default().load_runs(&bytes);
            if !stale.is_empty() {
                absorbed.entry(ino).or_default().extend(stale);
            }
        }
        let journal = read_records(&dir.join(JOURNAL))?.into_iter().collect();
        let leftover: Vec<AlEntry> = read_records(&dir.join(ACTIVITY))?
            .iter()
            .filter_map(|r| decode_al(r))
            .collect();
        let tracker = Arc::new(Tracker {
            dir: dir.clone(),
            capacity: capacity.max(4),
            state: Mutex::new(State {
                valid: dir.join(VALID).exists(),
                maps,
                journal,
                whole,
                active: HashMap::new(),
                lazy_pages: BTreeMap::new(),
                epoch: 1,
                pending: Pending::default(),
                batch: 1,
                durable: 0,
                flushing: false,
                broken: None,
                want_checkpoint: false,
                wake: false,
                degraded_since_window: false,
            }),
            changed: Condvar::new(),
            files: Mutex::new(HashMap::new()),
            al_writes: std::sync::atomic::AtomicU64::new(0),
        });
        if !leftover.is_empty() || !absorbed.is_empty() {
            if !leftover.is_empty() {
                tracing::warn!(
                    entries = leftover.len(),
                    "activity log of an unclean stop: its regions may differ on the peer"
                );
            }
            let target = {
                let mut st = tracker.state.lock();
                st.pending.pages = absorbed;
                for e in leftover {
                    Self::fold(&mut st, &e);
                }
                st.pending.rewrite_activity = true;
                st.batch
            };
            tracker.flush_until(target)?;
        }
        Ok(tracker)
    }

    /// Adds an activity-log entry to the dirty records (pending, not yet durable).
    fn fold(st: &mut State, e: &AlEntry) {
        match e {
            AlEntry::Extent { ino, index: WHOLE } => {
                if st.whole.insert(*ino) {
                    st.pending.whole.push(*ino);
                }
            }
            AlEntry::Extent { ino, index } => {
                let pages = st.maps.entry(*ino).or_default().set(
                    index.saturating_mul(EXTENT),
                    index.saturating_add(1).saturating_mul(EXTENT),
                );
                st.pending.pages.entry(*ino).or_default().extend(pages);
            }
            AlEntry::Name(name) => {
                if st.journal.insert(name.clone()) {
                    st.pending.journal.push(name.clone());
                }
            }
        }
    }

    pub fn is_valid(&self) -> bool {
        self.state.lock().valid
    }

    /// Bytes marked as differing from the peer (the split-brain rule
    /// `discard-least-changes` compares this between the nodes).
    pub fn changed_bytes(&self) -> u64 {
        self.state
            .lock()
            .maps
            .values()
            .fold(0u64, |sum, m| sum.saturating_add(m.count))
            .saturating_mul(BLOCK)
    }

    /// Activity-log updates written durably since the tracker opened.
    pub fn activity_log_writes(&self) -> u64 {
        self.al_writes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Nothing is recorded: the peer lacks nothing this node knows of.
    pub fn is_clean(&self) -> bool {
        let st = self.state.lock();
        st.journal.is_empty()
            && st.whole.is_empty()
            && st.active.is_empty()
            && st.maps.values().all(|m| m.is_empty())
    }

    /// Degraded mode: records `changes` durably before returning (write-ahead). A
    /// range's exact blocks are marked in memory and written at the next checkpoint;
    /// what is durable at once is its 4 MiB extents in the activity log (DRBD's
    /// scheme): a write into an extent already logged costs no disk write at all.
    pub fn record_degraded(self: &Arc<Self>, changes: &[Change]) -> Result<(), TrackError> {
        let mut ranges = Vec::new();
        let target = {
            let mut st = self.state.lock();
            if let Some(why) = &st.broken {
                return Err(TrackError::Broken(why.clone()));
            }
            st.degraded_since_window = true;
            let mut named = false;
            for c in changes {
                match c {
                    Change::Range { ino, start, end } => {
                        let pages = st.maps.entry(*ino).or_default().set(*start, *end);
                        if !pages.is_empty() {
                            st.lazy_pages.entry(*ino).or_default().extend(pages);
                        }
                        ranges.push(c.clone());
                    }
                    Change::Name(name) => {
                        if st.journal.insert(name.clone()) {
                            st.pending.journal.push(name.clone());
                            named = true;
                        }
                    }
                }
            }
            // A name recorded by another writer may still be on its way to disk.
            if named {
                st.batch
            } else if st.flushing {
                st.batch - 1
            } else {
                st.durable
            }
        };
        if !ranges.is_empty() {
            // The guard is dropped at once: a degraded write waits for nobody.
            drop(self.log_extents(&ranges, false)?);
        }
        self.flush_until(target)
    }

    /// Connected: records the extents/names of `changes` in the activity log
    /// (durably, before returning) and keeps them from retiring until the returned
    /// guard is dropped (when the operation completed on both nodes).
    pub fn record_active(self: &Arc<Self>, changes: &[Change]) -> Result<InFlight, TrackError> {
        self.log_extents(changes, true)
    }

    /// Puts the extents/names of `changes` in the activity log, durably; `coarse`:
    /// for a write the peer receives.
    fn log_extents(
        self: &Arc<Self>,
        changes: &[Change],
        coarse: bool,
    ) -> Result<InFlight, TrackError> {
        let mut entries = Vec::new();
        for c in changes {
            match c {
                Change::Range { ino, start, end } if end > start => {
                    let (first, last) = (start / EXTENT, (end - 1) / EXTENT);
                    if last - first < MAX_EXTENTS_PER_CHANGE {
                        entries.extend(
                            (first..=last).map(|index| AlEntry::Extent { ino: *ino, index }),
                        );
                    } else {
                        // Too wide for the log: the whole file is suspect.
                        entries.push(AlEntry::Extent {
                            ino: *ino,
                            index: WHOLE,
                        });
                    }
                }
                Change::Range { .. } => {}
                Change::Name(name) => entries.push(AlEntry::Name(name.clone())),
            }
        }
        if entries.is_empty() {
            return Ok(InFlight::none());
        }
        let target = {
            let mut st = self.state.lock();
            loop {
                if let Some(why) = &st.broken {
                    return Err(TrackError::Broken(why.clone()));
                }
                let new = entries
                    .iter()
                    .filter(|e| !st.active.contains_key(e))
                    .count();
                // An empty log takes any one change (at most
                // MAX_EXTENTS_PER_CHANGE entries per range), even beyond a
                // smaller capacity: waiting could never make room for it.
                if new == 0 || st.active.len() + new <= self.capacity || st.active.is_empty() {
                    break;
                }
                // Full: the checkpointer makes room.
                st.want_checkpoint = true;
                self.changed.notify_all();
                self.changed.wait_for(&mut st, Duration::from_millis(200));
            }
            let (epoch, batch) = (st.epoch, st.batch);
            let mut added = false;
            // An entry already in the log may still be on its way to disk in a batch
            // another writer queued: wait for that batch, not only the one flushing.
            let mut target = st.durable;
            for e in &entries {
                let a = st.active.entry(e.clone()).or_insert_with(|| {
                    added = true;
                    Active {
                        inflight: 0,
                        epoch,
                        queued: batch,
                        coarse,
                    }
                });
                a.inflight += 1;
                a.epoch = epoch;
                a.coarse |= coarse;
                target = target.max(a.queued);
            }
            if added {
                for e in &entries {
                    st.pending.activity.push(e.clone());
                }
            }
            target
        };
        let guard = InFlight {
            tracker: Some(self.clone()),
            entries,
        };
        self.flush_until(target)?;
        Ok(guard)
    }

    /// A resync starts sending data: from now on `clear_synced` may forget marks of
    /// regions the peer has durably, unless something is recorded degraded meanwhile.
    pub fn sync_window_begin(&self) {
        self.state.lock().degraded_since_window = false;
    }

    /// The peer has `ranges` of `ino` durably (a resync sent them and a `SyncAll`
    /// after them was acknowledged): their marks go, so an interrupted resync
    /// resumes where it was. Refused (false) once the link stopped sending.
    pub fn clear_synced(&self, ino: u64, ranges: &[(u64, u64)]) -> Result<bool, TrackError> {
        let target = {
            let mut st = self.state.lock();
            if st.degraded_since_window {
                return Ok(false);
            }
            let Some(map) = st.maps.get_mut(&ino) else {
                return Ok(true);
            };
            let mut pages = Vec::new();
            for &(s, e) in ranges {
                pages.extend(map.clear(s, e));
            }
            if pages.is_empty() {
                return Ok(true);
            }
            st.pending.pages.entry(ino).or_default().extend(pages);
            st.batch
        };
        self.flush_until(target).map(|()| true)
    }

    /// The link stopped sending (degraded): everything in the activity log may be
    /// missing on the peer; it moves to the dirty records, durably.
    pub fn degrade(&self) -> Result<(), TrackError> {
        let target = {
            let mut st = self.state.lock();
            st.degraded_since_window = true;
            // Entries of degraded writes stay: their exact blocks are in memory.
            let entries: Vec<AlEntry> = st
                .active
                .iter()
                .filter(|(_, a)| a.coarse)
                .map(|(e, _)| e.clone())
                .collect();
            if entries.is_empty() {
                return Ok(());
            }
            for e in &entries {
                st.active.remove(e);
            }
            for e in &entries {
                Self::fold(&mut st, e);
            }
            st.pending.rewrite_activity = true;
            st.batch
        };
        self.changed.notify_all();
        self.flush_until(target)
    }

    /// Starts a checkpoint; `Some(epoch)` if the activity log has anything to retire.
    /// Between `checkpoint_begin` and `checkpoint_end` the caller makes everything
    /// written so far durable on both nodes.
    pub fn checkpoint_begin(&self) -> Result<Option<(u64, Vec<AlEntryId>)>, TrackError> {
        let (epoch, idle, target) = {
            let mut st = self.state.lock();
            if st.active.is_empty() {
                st.want_checkpoint = false;
                return Ok(None);
            }
            let epoch = st.epoch;
            st.epoch += 1;
            let idle: Vec<AlEntryId> = st
                .active
                .iter()
                .filter(|(_, a)| a.inflight == 0)
                .map(|(e, _)| AlEntryId(e.clone()))
                .collect();
            // The exact blocks of degraded writes reach the disk before the extents
            // that cover them can leave the log.
            let lazy = std::mem::take(&mut st.lazy_pages);
            let target = if lazy.is_empty() {
                st.durable
            } else {
                st.batch
            };
            for (ino, pages) in lazy {
                st.pending.pages.entry(ino).or_default().extend(pages);
            }
            (epoch, idle, target)
        };
        self.flush_until(target)?;
        Ok(Some((epoch, idle)))
    }

    /// Retires the entries that were idle at `checkpoint_begin` and not written since.
    pub fn checkpoint_end(&self, epoch: u64, idle: Vec<AlEntryId>) -> Result<(), TrackError> {
        let target = {
            let mut st = self.state.lock();
            let before = st.active.len();
            for AlEntryId(e) in idle {
                if st
                    .active
                    .get(&e)
                    .is_some_and(|a| a.inflight == 0 && a.epoch <= epoch)
                {
                    st.active.remove(&e);
                }
            }
            st.want_checkpoint = false;
            if st.active.len() == before {
                return Ok(());
            }
            st.pending.rewrite_activity = true;
            st.batch
        };
        self.changed.notify_all();
        self.flush_until(target)
    }

    /// Whether a checkpoint is due now (the log is full and someone waits).
    pub fn wait_checkpoint_request(&self, timeout: Duration) -> bool {
        let mut st = self.state.lock();
        if !st.want_checkpoint && !st.wake {
            self.changed.wait_for(&mut st, timeout);
        }
        st.wake = false;
        st.want_checkpoint
    }

    /// Ends the current (or next) [`Self::wait_checkpoint_request`] at once: the
    /// checkpointer is stopping and should not sleep out its timeout first.
    pub fn wake_checkpointer(&self) {
        self.state.lock().wake = true;
        self.changed.notify_all();
    }

    pub fn activity_len(&self) -> usize {
        self.state.lock().active.len()
    }

    /// Both copies are identical (a resync finished): forget every record and
    /// declare them complete from here on.
    pub fn clear_all(&self) -> Result<(), TrackError> {
        let mut st = self.state.lock();
        while st.flushing {
            self.changed.wait(&mut st);
        }
        let mut files = self.files.lock();
        files.clear();
        for entry in std::fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let entry = entry.map_err(io(&self.dir))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(MAP_PREFIX)
                || name.starts_with(RUNS_PREFIX)
                || name.starts_with(WHOLE_PREFIX)
                || name == JOURNAL
            {
                std::fs::remove_file(entry.path()).map_err(io(&entry.path()))?;
            }
        }
        st.maps.clear();
        st.journal.clear();
        st.whole.clear();
        // The activity log stays: it covers writes the peer received but may not
        // have made durable yet, a separate matter.
        st.pending.pages.clear();
        st.pending.journal.clear();
        st.pending.whole.clear();
        st.lazy_pages.clear();
        crate::atomic::write(&self.dir.join(VALID), b"").map_err(io(&self.dir))?;
        st.valid = true;
        Ok(())
    }

    /// This copy is being replaced wholesale (full sync): its records say nothing.
    pub fn invalidate(&self) -> Result<(), TrackError> {
        let mut st = self.state.lock();
        let path = self.dir.join(VALID);
        crate::atomic::remove(&path).map_err(io(&path))?;
        st.valid = false;
        Ok(())
    }

    /// Dirty ranges of backing inode `ino` (dirty map and activity log).
    pub fn ranges_of(&self, ino: u64) -> FileDirt {
        let st = self.state.lock();
        let mut ranges = st.maps.get(&ino).map(Bitmap::ranges).unwrap_or_default();
        let mut whole = st.whole.contains(&ino);
        // Degraded writes' entries add nothing: their exact blocks are in the map.
        for (e, _) in st.active.iter().filter(|(_, a)| a.coarse) {
            if let AlEntry::Extent { ino: i, index } = e {
                if *i == ino {
                    if *index == WHOLE {
                        whole = true;
                    } else {
                        ranges.push((
                            index.saturating_mul(EXTENT),
                            index.saturating_add(1).saturating_mul(EXTENT),
                        ));
                    }
                }
            }
        }
        FileDirt {
            whole,
            ranges: merge_ranges(ranges),
        }
    }

    /// Names recorded in the journal and the activity log.
    pub fn names(&self) -> Vec<Vec<u8>> {
        let st = self.state.lock();
        let mut names: Vec<Vec<u8>> = st.journal.iter().cloned().collect();
        for e in st.active.keys() {
            if let AlEntry::Name(n) = e {
                names.push(n.clone());
            }
        }
        names
    }

    /// Streams this node's report on the copy beneath `root` in parts of about
    /// [`REPORT_PART_BYTES`] encoded bytes (each fits one frame), walking the tree
    /// with a bounded number of descriptors; returns whether the records are
    /// valid (read last: records invalidated during the walk say so).
    pub fn report_each<E: From<Errno>>(
        &self,
        root: BorrowedFd<'_>,
        mut emit: impl FnMut(ReportPart) -> Result<(), E>,
    ) -> Result<bool, E> {
        let mut part = ReportPart::default();
        let mut bytes = 0usize;
        walk_each(root, |e: &WalkEntry| {
            let kind = EntryKind::of(e.st.st_mode);
            let dirty = if kind == EntryKind::File {
                let d = self.ranges_of(e.st.st_ino);
                if d.whole {
                    bytes += e.path.len() + 10;
                    part.names.push(e.path.clone());
                }
                if d.ranges.len() > MAX_ENTRY_RANGES {
                    coarsen(d.ranges, MAX_ENTRY_RANGES)
                } else {
                    d.ranges
                }
            } else {
                Vec::new()
            };
            // Upper bound of the entry's bincode size (varints of at most 10 bytes).
            bytes += e.path.len() + 21 + 25 + dirty.len() * 20;
            part.entries.push(ReportEntry {
                path: e.path.clone(),
                kind,
                dirty,
                attrs: Attrs::of(e.fd.as_fd(), &e.st),
            });
            if bytes >= REPORT_PART_BYTES {
                bytes = 0;
                emit(std::mem::take(&mut part))?;
            }
            Ok::<(), E>(())
        })?;
        for name in self.names() {
            bytes += name.len() + 10;
            part.names.push(name);
            if bytes >= REPORT_PART_BYTES {
                bytes = 0;
                emit(std::mem::take(&mut part))?;
            }
        }
        if !part.entries.is_empty() || !part.names.is_empty() {
            emit(part)?;
        }
        Ok(self.is_valid())
    }

    /// This node's whole report on the copy beneath `root` (see [`Tracker::report_each`]).
    pub fn report(&self, root: BorrowedFd<'_>) -> Result<Report, Errno> {
        let mut report = Report::default();
        report.valid = self.report_each(root, |part| {
            report.add(part);
            Ok::<(), Errno>(())
        })?;
        Ok(report)
    }

    /// Waits until batch `target` is durable, flushing it ourselves if nobody is.
    fn flush_until(&self, target: u64) -> Result<(), TrackError> {
        let mut st = self.state.lock();
        loop {
            if let Some(why) = &st.broken {
                return Err(TrackError::Broken(why.clone()));
            }
            if st.durable >= target {
                return Ok(());
            }
            if st.flushing {
                self.changed.wait(&mut st);
                continue;
            }
            st.flushing = true;
            let batch = st.batch;
            st.batch += 1;
            if st.pending.rewrite_activity {
                // Entries may leave the log in this batch: the blocks they cover too.
                let lazy = std::mem::take(&mut st.lazy_pages);
                for (ino, pages) in lazy {
                    st.pending.pages.entry(ino).or_default().extend(pages);
                }
            }
            let pending = std::mem::take(&mut st.pending);
            let pages: Vec<MapWrite> = pending
                .pages
                .iter()
                .filter_map(|(&ino, nos)| {
                    let map = st.maps.get(&ino)?;
                    let mut w = MapWrite {
                        ino,
                        pages: Vec::new(),
                        runs: None,
                        zeros: Vec::new(),
                    };
                    for &no in nos {
                        if no == RUNS {
                            w.runs = Some(map.encode_runs());
                        } else if let Some(p) = map.pages.get(&no) {
                            w.pages.push((no, p.clone()));
                        } else {
                            w.zeros.push(no);
                        }
                    }
                    // A page absorbed into a run is zeroed only after the run.
                    if !w.zeros.is_empty() && w.runs.is_none() {
                        w.runs = Some(map.encode_runs());
                    }
                    Some(w)
                })
                .collect();
            let activity = if pending.rewrite_activity {
                Some(st.active.keys().cloned().collect::<Vec<_>>())
            } else {
                None
            };
            drop(st);
            let outcome = self.write_batch(&pages, &pending, activity.as_deref());
            st = self.state.lock();
            st.flushing = false;
            match outcome {
                Ok(()) => st.durable = batch,
                Err(e) => {
                    tracing::error!("{e}");
                    st.broken = Some(e.to_string());
                }
            }
            self.changed.notify_all();
        }
    }

    fn write_batch(
        &self,
        pages: &[MapWrite],
        pending: &Pending,
        activity: Option<&[AlEntry]>,
    ) -> Result<(), TrackError> {
        let mut files = self.files.lock();
        let mut created = false;
        for w in pages {
            let ino = w.ino;
            let path = self.dir.join(format!("{MAP_PREFIX}{ino}"));
            if files.len() >= MAX_OPEN_MAPS && !files.contains_key(&ino) {
                // A bounded cache: a degraded run over many files must not hold
                // one descriptor per file changed.
                if let Some(&old) = files.keys().next() {
                    files.remove(&old);
                }
            }
            let f = match files.entry(ino) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    created |= !path.exists();
                    e.insert(
                        OpenOptions::new()
                            .create(true)
                            .truncate(false)
                            .read(true)
                            .write(true)
                            .mode(0o600)
                            .open(&path)
                            .map_err(io(&path))?,
                    )
                }
            };
            // Marks added (or exact pages replacing a run) first, then the runs,
            // then the zeroing of pages a durable run now covers: a crash between
            // any two steps loses no mark.
            for (no, page) in &w.pages {
                f.write_all_at(page, no * PAGE as u64).map_err(io(&path))?;
            }
            f.sync_data().map_err(io(&path))?;
            if let Some(runs) = &w.runs {
                let runs_path = self.dir.join(format!("{RUNS_PREFIX}{ino}"));
                if runs.is_empty() {
                    match std::fs::remove_file(&runs_path) {
                        Ok(()) => created = true,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(io(&runs_path)(e)),
                    }
                } else {
                    crate::atomic::write(&runs_path, runs).map_err(io(&runs_path))?;
                }
            }
            if !w.zeros.is_empty() {
                let len = f.metadata().map_err(io(&path))?.len();
                let zero = zero_page();
                for no in &w.zeros {
                    // Beyond the end the file reads as zeros already.
                    if no * (PAGE as u64) < len {
                        f.write_all_at(&zero, no * PAGE as u64).map_err(io(&path))?;
                    }
                }
                f.sync_data().map_err(io(&path))?;
            }
        }
        for ino in &pending.whole {
            let path = self.dir.join(format!("{WHOLE_PREFIX}{ino}"));
            created = true;
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(&path)
                .map_err(io(&path))?;
        }
        if !pending.journal.is_empty() {
            let mut bytes = Vec::new();
            for name in &pending.journal {
                record(&mut bytes, name);
            }
            let path = self.dir.join(JOURNAL);
            created |= !path.exists();
            append(&path, &bytes)?;
        }
        let al_path = self.dir.join(ACTIVITY);
        if let Some(all) = activity {
            // Compaction: the current set, atomically. Appends of this batch are in it.
            let mut bytes = Vec::new();
            for e in all {
                record(&mut bytes, &encode_al(e));
            }
            crate::atomic::write(&al_path, &bytes).map_err(io(&al_path))?;
            self.al_writes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        } else if !pending.activity.is_empty() {
            let mut bytes = Vec::new();
            for e in &pending.activity {
                record(&mut bytes, &encode_al(e));
            }
            created |= !al_path.exists();
            append(&al_path, &bytes)?;
            self.al_writes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if created {
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(io(&self.dir))?;
        }
        Ok(())
    }
}

/// What one dirty map's flush writes, in this order: changed pages (copies), its
/// runs, then zeros over pages a run absorbed.
#[derive(Debug)]
struct MapWrite {
    ino: u64,
    pages: Vec<(u64, Box<[u8]>)>,
    runs: Option<Vec<u8>>,
    zeros: Vec<u64>,
}

/// An activity-log entry noted by `checkpoint_begin`.
#[derive(Debug, Clone)]
pub struct AlEntryId(AlEntry);

/// What tracking knows may differ in one file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileDirt {
    /// The whole file may differ.
    pub whole: bool,
    pub ranges: Vec<(u64, u64)>,
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn range(ino: u64, start: u64, end: u64) -> Change {
        Change::Range { ino, start, end }
    }

    fn checkpoint(t: &Tracker) {
        if let Some((epoch, idle)) = t.checkpoint_begin().unwrap() {
            t.checkpoint_end(epoch, idle).unwrap();
        }
    }

    #[test]
    fn degraded_marks_are_exact_in_memory_and_covered_by_extents_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        {
            let t = Tracker::open(dir.path(), 16).unwrap();
            t.record_degraded(&[range(7, 4096 * 3 + 10, 4096 * 5)])
                .unwrap();
            t.record_degraded(&[range(7, 1 << 30, (1 << 30) + 1)])
                .unwrap();
            // Exact while running (what a resync sends).
            assert_eq!(
                t.ranges_of(7).ranges,
                vec![(4096 * 3, 4096 * 5), (1 << 30, (1 << 30) + 4096)]
            );
            // Crash: the blocks were not written yet, only their extents.
        }
        let t = Tracker::open(dir.path(), 16).unwrap();
        assert_eq!(
            t.ranges_of(7).ranges,
            vec![(0, EXTENT), (1 << 30, (1 << 30) + EXTENT)]
        );
    }

    #[test]
    fn degraded_marks_survive_reopen_at_block_granularity() {
        let dir = tempfile::tempdir().unwrap();
        {
            let t = Tracker::open(dir.path(), 16).unwrap();
            assert!(!t.is_valid());
            t.record_degraded(&[range(7, 4096 * 3 + 10, 4096 * 5)])
                .unwrap();
            t.record_degraded(&[range(7, 1 << 30, (1 << 30) + 1)])
                .unwrap();
            t.record_degraded(&[Change::Name(b"a/b".to_vec())]).unwrap();
            // A clean stop (or any checkpoint) writes the blocks.
            checkpoint(&t);
            assert_eq!(t.activity_len(), 0);
        }
        let t = Tracker::open(dir.path(), 16).unwrap();
        assert_eq!(
            t.ranges_of(7).ranges,
            vec![(4096 * 3, 4096 * 5), (1 << 30, (1 << 30) + 4096)]
        );
        assert_eq!(t.names(), vec![b"a/b".to_vec()]);
        assert!(t.ranges_of(8).ranges.is_empty());
        assert_eq!(t.changed_bytes(), 3 * 4096);
        t.clear_all().unwrap();
        assert!(t.is_clean());
        drop(t);
        let t = Tracker::open(dir.path(), 16).unwrap();
        assert!(t.is_valid() && t.is_clean());
    }

    #[test]
    fn activity_log_of_an_unclean_stop_becomes_dirty() {
        let dir = tempfile::tempdir().unwrap();
        {
            let t = Tracker::open(dir.path(), 16).unwrap();
            let g = t
                .record_active(&[range(3, EXTENT + 5, EXTENT + 9)])
                .unwrap();
            drop(g);
            // No checkpoint: the process "crashes" here.
        }
        let t = Tracker::open(dir.path(), 16).unwrap();
        assert_eq!(t.ranges_of(3).ranges, vec![(EXTENT, 2 * EXTENT)]);
        assert_eq!(t.activity_len(), 0);
    }

    #[test]
    fn checkpoint_retires_only_idle_entries_not_written_since() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tracker::open(dir.path(), 16).unwrap();
        let busy = t.record_active(&[range(1, 0, 10)]).unwrap();
        drop(t.record_active(&[range(2, 0, 10)]).unwrap());
        drop(t.record_active(&[range(4, 0, 10)]).unwrap());
        let (epoch, idle) = t.checkpoint_begin().unwrap().unwrap();
        // Written again after the checkpoint began: not covered by it.
        drop(t.record_active(&[range(4, 0, 10)]).unwrap());
        t.checkpoint_end(epoch, idle).unwrap();
        assert_eq!(t.activity_len(), 2);
        assert_eq!(t.ranges_of(1).ranges, vec![(0, EXTENT)]);
        assert!(t.ranges_of(2).ranges.is_empty());
        drop(busy);
        drop(t);
        // What was left in the log comes back as dirty after a restart.
        let t = Tracker::open(dir.path(), 16).unwrap();
        assert_eq!(t.ranges_of(1).ranges, vec![(0, EXTENT)]);
        assert_eq!(t.ranges_of(4).ranges, vec![(0, EXTENT)]);
        assert!(t.ranges_of(2).ranges.is_empty());
    }

    #[test]
    fn an_entry_queued_by_another_writer_is_durable_before_returning() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tracker::open(dir.path(), 16).unwrap();
        let wait_for = |what: &dyn Fn(&State) -> bool| {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !what(&t.state.lock()) {
                assert!(std::time::Instant::now() < deadline);
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        // A first batch is being written (held up here)...
        let files = t.files.lock();
        let first = {
            let t = t.clone();
            std::thread::spawn(move || drop(t.record_active(&[range(1, 0, 10)]).unwrap()))
        };
        wait_for(&|st| st.flushing);
        // ...when one writer queues a new extent for the next batch...
        let queued = {
            let t = t.clone();
            std::thread::spawn(move || drop(t.record_active(&[range(2, 0, 10)]).unwrap()))
        };
        wait_for(&|st| !st.pending.activity.is_empty());
        // ...and another writes to the same extent: it must not go on before the
        // extent is on disk.
        let second = {
            let t = t.clone();
            std::thread::spawn(move || {
                drop(t.record_active(&[range(2, 20, 30)]).unwrap());
                // The batch that carries the extent (the second) is on disk.
                t.state.lock().durable >= 2
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        drop(files);
        assert!(
            second.join().unwrap(),
            "returned before its extent was durable"
        );
        first.join().unwrap();
        queued.join().unwrap();
    }

    #[test]
    fn degrade_moves_the_activity_log_to_dirty_maps() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tracker::open(dir.path(), 16).unwrap();
        let g = t
            .record_active(&[
                range(9, 3 * EXTENT, 3 * EXTENT + 1),
                Change::Name(b"x".to_vec()),
            ])
            .unwrap();
        t.degrade().unwrap();
        drop(g);
        assert_eq!(t.activity_len(), 0);
        assert_eq!(t.ranges_of(9).ranges, vec![(3 * EXTENT, 4 * EXTENT)]);
        assert_eq!(t.names(), vec![b"x".to_vec()]);
    }

    #[test]
    fn a_full_log_waits_for_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tracker::open(dir.path(), 4).unwrap();
        for i in 0..4 {
            drop(
                t.record_active(&[range(1, i * EXTENT, i * EXTENT + 1)])
                    .unwrap(),
            );
        }
        let t2 = t.clone();
        let checkpointer = std::thread::spawn(move || {
            assert!(t2.wait_checkpoint_request(Duration::from_secs(10)));
            let (epoch, idle) = t2.checkpoint_begin().unwrap().unwrap();
            t2.checkpoint_end(epoch, idle).unwrap();
        });
        drop(
            t.record_active(&[range(1, 9 * EXTENT, 9 * EXTENT + 1)])
                .unwrap(),
        );
        checkpointer.join().unwrap();
        assert_eq!(t.activity_len(), 1);
    }

    #[test]
    fn synced_marks_clear_durably_unless_degraded_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tracker::open(dir.path(), 16).unwrap();
        t.record_degraded(&[range(5, 0, 10 * BLOCK)]).unwrap();
        t.sync_window_begin();
        assert!(t.clear_synced(5, &[(0, 4 * BLOCK)]).unwrap());
        assert_eq!(t.ranges_of(5).ranges, vec![(4 * BLOCK, 10 * BLOCK)]);
        // The link dropped and a write was recorded: nothing more is cleared.
        t.record_degraded(&[range(5, 0, 1)]).unwrap();
        assert!(!t.clear_synced(5, &[(0, 10 * BLOCK)]).unwrap());
        checkpoint(&t);
        drop(t);
        let t = Tracker::open(dir.path(), 16).unwrap();
        assert_eq!(
            t.ranges_of(5).ranges,
            vec![(0, BLOCK), (4 * BLOCK, 10 * BLOCK)]
        );
    }

    #[test]
    fn too_many_ranges_are_merged_conservatively() {
        let ranges: Vec<(u64, u64)> = (0..10_000u64)
            .map(|i| (i * 8192, i * 8192 + 4096))
            .collect();
        assert_eq!(merge_ranges(ranges.clone()), ranges);
        let merged = coarsen(ranges.clone(), MAX_ENTRY_RANGES);
        assert!(merged.len() <= MAX_ENTRY_RANGES);
        for (s, e) in ranges {
            assert!(merged.iter().any(|&(ms, me)| ms <= s && e <= me));
        }
    }

    const PB: u64 = 1 << 50;

    #[test]
    fn a_petabyte_range_is_marked_and_cleared_at_once_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let started = std::time::Instant::now();
        {
            let t = Tracker::open(dir.path(), 16).unwrap();
            // A write, then a truncate to 1 PiB (both unaligned), while alone.
            t.record_degraded(&[range(7, 10, 20)]).unwrap();
            t.record_degraded(&[range(7, 4096 * 3 + 1, PB + 5)])
                .unwrap();
            assert_eq!(
                t.ranges_of(7).ranges,
                vec![(0, BLOCK), (3 * BLOCK, PB + BLOCK)]
            );
            assert_eq!(t.changed_bytes(), BLOCK + PB + BLOCK - 3 * BLOCK);
            checkpoint(&t);
            // A resync sent a part in the middle (not page aligned) and the start.
            t.sync_window_begin();
            assert!(t.clear_synced(7, &[(0, 3 * BLOCK)]).unwrap());
            assert!(t
                .clear_synced(7, &[(5 << 30, (7 << 30) + 3 * BLOCK)])
                .unwrap());
        }
        let t = Tracker::open(dir.path(), 16).unwrap();
        let expected = vec![(3 * BLOCK, 5 << 30), ((7 << 30) + 3 * BLOCK, PB + BLOCK)];
        assert_eq!(t.ranges_of(7).ranges, expected);
        assert_eq!(
            t.changed_bytes(),
            expected.iter().map(|(s, e)| e - s).sum::<u64>()
        );
        // The map files stay small (a run, not 2^38 bits).
        let on_disk: u64 = std::fs::read_dir(dir.path().join("track"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().blocks() * 512)
            .sum();
        assert!(on_disk < 1 << 20, "{on_disk} bytes of tracking metadata");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        // Past any file size: capped, no overflow.
        t.record_degraded(&[range(8, u64::MAX - 5, u64::MAX)])
            .unwrap();
        t.record_degraded(&[range(8, 0, u64::MAX)]).unwrap();
        assert_eq!(t.ranges_of(8).ranges, vec![(0, MAX_OFFSET)]);
        let _ = t.changed_bytes();
    }

    #[test]
    fn stale_pages_under_a_run_are_dropped_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let t = Tracker::open(dir.path(), 16).unwrap();
            t.record_degraded(&[range(3, 200 * BLOCK, 201 * BLOCK)])
                .unwrap();
            checkpoint(&t);
        }
        // A crash after a run covering that page became durable, before the page
        // was zeroed.
        let page_bytes = BLOCKS_PER_PAGE * BLOCK;
        std::fs::write(
            dir.path().join("track/runs-3"),
            [0u64.to_le_bytes(), 2u64.to_le_bytes()].concat(),
        )
        .unwrap();
        let t = Tracker::open(dir.path(), 16).unwrap();
        assert_eq!(t.ranges_of(3).ranges, vec![(0, 2 * page_bytes)]);
        t.sync_window_begin();
        assert!(t.clear_synced(3, &[(0, 2 * page_bytes)]).unwrap());
        drop(t);
        let t = Tracker::open(dir.path(), 16).unwrap();
        assert!(t.ranges_of(3).ranges.is_empty());
        assert!(t.is_clean());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Marks and clears agree with one bit per block, in memory and after a
        /// reopen, whatever mix of partial pages and runs they make.
        #[test]
        fn marks_equal_a_bit_per_block(
            ops in proptest::collection::vec(
                (proptest::bool::ANY, 0u64..5 * BLOCKS_PER_PAGE * BLOCK, 0u64..3 * BLOCKS_PER_PAGE * BLOCK),
                1..12,
            )
        ) {
            let blocks = 8 * BLOCKS_PER_PAGE as usize;
            let mut model = vec![false; blocks];
            let mut map = Bitmap::default();
            for &(set, start, len) in &ops {
                let end = start + len;
                if set {
                    map.set(start, end);
                    if end > start {
                        for b in start / BLOCK..end.div_ceil(BLOCK) {
                            model[b as usize] = true;
                        }
                    }
                } else {
                    map.clear(start, end);
                    for b in start.div_ceil(BLOCK)..end / BLOCK {
                        model[b as usize] = false;
                    }
                }
                for &no in map.pages.keys() {
                    proptest::prop_assert!(map.run_of(no).is_none(), "page {} in a run", no);
                }
            }
            let mut expected = Vec::new();
            for (b, &on) in model.iter().enumerate() {
                if on {
                    expected.push((b as u64 * BLOCK, (b as u64 + 1) * BLOCK));
                }
            }
            let expected = merge_ranges(expected);
            proptest::prop_assert_eq!(map.ranges(), expected.clone());
            proptest::prop_assert_eq!(map.count, model.iter().filter(|&&b| b).count() as u64);
            // The same through the tracker and its files.
            let dir = tempfile::tempdir().unwrap();
            {
                let t = Tracker::open(dir.path(), 16).unwrap();
                t.sync_window_begin();
                for &(set, start, len) in &ops {
                    if set {
                        // What the primary's checkpointer does when the log is
                        // full (this test has no checkpointer thread).
                        checkpoint(&t);
                        t.record_degraded(&[range(1, start, start + len)]).unwrap();
                    } else {
                        checkpoint(&t);
                        t.sync_window_begin();
                        t.clear_synced(1, &[(start, start + len)]).unwrap();
                    }
                }
                checkpoint(&t);
            }
            let t = Tracker::open(dir.path(), 16).unwrap();
            proptest::prop_assert_eq!(t.ranges_of(1).ranges, expected);
        }
    }

    #[test]
    fn a_change_wider_than_the_whole_log_is_taken_by_an_empty_log() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tracker::open(dir.path(), 4).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let writer = t.clone();
        std::thread::spawn(move || {
            // Eight extents, twice the capacity: no checkpoint can make room.
            let guard = writer.record_active(&[range(1, 0, 8 * EXTENT)]);
            let _ = tx.send(guard.is_ok());
        });
        assert_eq!(rx.recv_timeout(Duration::from_secs(20)), Ok(true));
    }

    #[test]
    fn beneath_is_by_component() {
        assert!(is_beneath(b"a/b", b"a"));
        assert!(is_beneath(b"a", b"a"));
        assert!(!is_beneath(b"ab", b"a"));
        assert!(is_beneath(b"anything", b""));
    }
}
