//! Block hashes for comparing two copies without sending their data (full compare
//! when the history is unknown, and `verify`): both sides hash the same blocks with
//! blake3, only the indexes of differing blocks come back.
//!
//! **Holes cost no reads.** A block with no data on a side (`SEEK_DATA` finds none
//! in it) hashes as the zeros a read would return, without reading: a hole on one
//! side and written zeros on the other compare equal, as they read the same. The
//! sender also plans its requests over its own holes with [`HOLE_BLOCK`]-sized
//! blocks (the largest a receiver accepts), so a hole costs 32 bytes of hash per
//! MiB on the link and nothing on either disk: a verify of a 2 TiB sparse image
//! costs what its data costs, plus 64 MiB of hashes. Which side has a hole only
//! picks the block size; both sides' answers stay byte-for-byte comparisons.

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use rustix::fs::SeekFrom;

use crate::apply::Errno;

/// Block size of a compare.
pub const BLOCK: u32 = 64 << 10;
/// Block size of a compare over a region that is a hole on the sender's side: the
/// largest a receiver accepts ([`differing`]).
pub const HOLE_BLOCK: u32 = 1 << 20;
/// Blocks per `Control::Compare` (its hashes fit a frame header comfortably).
pub const MAX_BLOCKS: usize = 2048;
/// The largest block a receiver hashes.
const MAX_BLOCK: u32 = 1 << 20;

/// Bytes this process read from disk to hash them (holes are not read), since it
/// started; reported by `verify.json` as the verify's `read_bytes` difference.
static READ_BYTES: AtomicU64 = AtomicU64::new(0);

/// Bytes read for hashing by this process so far.
pub fn read_bytes() -> u64 {
    READ_BYTES.load(Ordering::Relaxed)
}

/// The regions with data of `fd` within `[start, end)` (`SEEK_DATA`/`SEEK_HOLE`),
/// in order; empty if it is all hole (or past the end).
pub fn data_segments(fd: BorrowedFd<'_>, start: u64, end: u64) -> Result<Vec<(u64, u64)>, Errno> {
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        let data = match rustix::fs::seek(fd, SeekFrom::Data(pos)) {
            Ok(p) => p,
            Err(Errno::NXIO) => break,
            Err(e) => return Err(e),
        };
        if data >= end {
            break;
        }
        let hole = match rustix::fs::seek(fd, SeekFrom::Hole(data)) {
            Ok(h) => h,
            // Truncated meanwhile: nothing more.
            Err(Errno::NXIO) => break,
            Err(e) => return Err(e),
        };
        // A hole at or before `data` would loop: the file changed under us; treat
        // the rest as data (read), which is always correct.
        if hole <= data {
            out.push((data, end));
            break;
        }
        out.push((data, hole.min(end)));
        pos = hole;
    }
    Ok(out)
}

/// The hash of a block whose `n` bytes are present (the length is part of it: a
/// short block never equals a full one).
fn hash_of(bytes: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&(bytes.len() as u64).to_le_bytes());
    h.update(bytes);
    *h.finalize().as_bytes()
}

/// The hash of a full block of zeros; the two sizes in use are computed once per
/// process (hashing a MiB of zeros per request would cost 1/2048 of the holes).
fn zero_hash(block: u32) -> [u8; 32] {
    static SMALL: OnceLock<[u8; 32]> = OnceLock::new();
    static BIG: OnceLock<[u8; 32]> = OnceLock::new();
    let compute = || hash_of(&vec![0u8; block as usize]);
    match block {
        BLOCK => *SMALL.get_or_init(compute),
        HOLE_BLOCK => *BIG.get_or_init(compute),
        _ => compute(),
    }
}

/// Hashes `count` blocks of `block` bytes from `offset`: the bytes present (short at
/// the end of the file, none past it), so a missing tail differs from zeros. Blocks
/// without data (holes) hash as zeros without being read.
pub fn hash_blocks(
    fd: BorrowedFd<'_>,
    offset: u64,
    block: u32,
    count: usize,
) -> Result<Vec<[u8; 32]>, Errno> {
    let step = u64::from(block);
    let end = offset.saturating_add(step.saturating_mul(count as u64));
    let size = rustix::fs::fstat(fd)?.st_size as u64;
    let data = data_segments(fd, offset, end.min(size))?;
    // Read ahead what will be read, in large requests: 64 KiB reads alone leave the
    // disk at the kernel's default read-ahead window. Advice only: a failure is no
    // error.
    for &(s, e) in &data {
        let _ = rustix::fs::fadvise(
            fd,
            s,
            std::num::NonZeroU64::new(e - s),
            rustix::fs::Advice::WillNeed,
        );
    }
    let mut buf = Vec::new();
    let mut zeros: Vec<u8> = Vec::new();
    let mut zero_full = None;
    let mut out = Vec::with_capacity(count);
    let mut seg = data.iter().peekable();
    for i in 0..count {
        let at = offset + i as u64 * step;
        let stop = at.saturating_add(step);
        while seg.next_if(|&&(_, e)| e <= at).is_some() {}
        let has_data = seg.peek().is_some_and(|&&(s, _)| s < stop);
        if has_data {
            if buf.is_empty() {
                buf = vec![0u8; block as usize];
            }
            let n = crate::fdio::read_full(fd, &mut buf, at)?;
            READ_BYTES.fetch_add(n as u64, Ordering::Relaxed);
            out.push(hash_of(&buf[..n]));
            continue;
        }
        // A hole: what a read returns, without reading it.
        let n = size.saturating_sub(at).min(step);
        if n == step {
            let h = *zero_full.get_or_insert_with(|| zero_hash(block));
            out.push(h);
        } else {
            // The short block at the end (at most one per request), or none past it.
            // n < block, a u32.
            let n = usize::try_from(n).unwrap_or(0);
            zeros.resize(n, 0);
            out.push(hash_of(&zeros[..n]));
        }
    }
    Ok(out)
}

/// One `Control::Compare` request of a plan: `count` blocks of `block` bytes from
/// `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub offset: u64,
    pub block: u32,
    pub count: usize,
}

impl Request {
    /// The bytes it covers (the last block may reach past the end of the file).
    pub fn len(&self) -> u64 {
        u64::from(self.block) * self.count as u64
    }
}

/// Bytes of a file planned at a time (one request of hole blocks): the sender
/// holds the data regions of one window, not of the whole file.
pub const WINDOW: u64 = HOLE_BLOCK as u64 * MAX_BLOCKS as u64;

/// The requests that compare `[start, size)` given the regions with data on this
/// side there (`data`, in order): [`BLOCK`]s over the data (widened to whole
/// blocks), up to [`HOLE_BLOCK`]s over the holes; at most [`MAX_BLOCKS`] blocks per
/// request. `start` is a multiple of [`BLOCK`] (or the requests of two calls
/// would not line up with the blocks of data).
pub fn plan(start: u64, size: u64, data: &[(u64, u64)]) -> Vec<Request> {
    let small = u64::from(BLOCK);
    let big = u64::from(HOLE_BLOCK);
    let mut out = Vec::new();
    let mut push = |mut offset: u64, end: u64, block: u32| {
        let step = u64::from(block);
        while offset < end {
            let count = (end - offset).div_ceil(step).min(MAX_BLOCKS as u64);
            out.push(Request {
                offset,
                block,
                // At most MAX_BLOCKS.
                count: usize::try_from(count).unwrap_or(MAX_BLOCKS),
            });
            offset += count * step;
        }
    };
    let mut pos = start;
    let mut segments = data.iter().peekable();
    while pos < size {
        // The next data region, widened to whole small blocks, merged with the
        // ones it then touches.
        let next = segments.next().map(|&(s, e)| {
            let mut e = e.next_multiple_of(small).min(size);
            while let Some(&&(s2, e2)) = segments.peek() {
                if s2 > e {
                    break;
                }
                e = e.max(e2.next_multiple_of(small).min(size));
                segments.next();
            }
            ((s / small * small).max(pos), e)
        });
        let (data_start, data_end) = next.unwrap_or((size, size));
        if data_start > pos {
            // A hole: big blocks, the rest (less than one) in small blocks.
            let whole = pos + (data_start - pos) / big * big;
            push(pos, whole, HOLE_BLOCK);
            push(whole, data_start, BLOCK);
        }
        if data_end > data_start {
            push(data_start, data_end, BLOCK);
        }
        pos = data_end.max(data_start);
    }
    out
}

/// The receiver's side of `Control::Compare`: which of `theirs` differ from our blocks.
pub fn differing(
    fd: BorrowedFd<'_>,
    offset: u64,
    block: u32,
    theirs: &[[u8; 32]],
) -> Result<Vec<u32>, Errno> {
    if block == 0 || block > MAX_BLOCK || theirs.len() > MAX_BLOCKS {
        return Err(Errno::INVAL);
    }
    let ours = hash_blocks(fd, offset, block, theirs.len())?;
    Ok(ours
        .iter()
        .zip(theirs)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        // An index into one frame's hashes (a few thousand at most).
        .map(|(i, _)| u32::try_from(i).unwrap_or(u32::MAX))
        .collect())
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;

    #[test]
    fn only_changed_blocks_and_tails_differ() {
        let dir = tempfile::tempdir().unwrap();
        let make = |name: &str, data: &[u8]| {
            let path = dir.path().join(name);
            std::fs::File::create(&path)
                .unwrap()
                .write_all(data)
                .unwrap();
            std::fs::File::open(path).unwrap()
        };
        let block = 4096u32;
        let mut data = vec![7u8; 4096 * 4 + 100];
        let a = make("a", &data);
        data[4096 * 2 + 5] = 8;
        let b = make("b", &data);
        let c = make("c", &data[..4096 * 4]);
        let mine = hash_blocks(a.as_fd(), 0, block, 6).unwrap();
        assert_eq!(differing(b.as_fd(), 0, block, &mine).unwrap(), vec![2]);
        // Shorter copy: the partial block differs; past the end both are empty.
        assert_eq!(differing(c.as_fd(), 0, block, &mine).unwrap(), vec![2, 4]);
        assert_eq!(
            differing(a.as_fd(), 4096, block, &mine[1..]).unwrap(),
            Vec::<u32>::new()
        );
        assert!(differing(a.as_fd(), 0, 0, &mine).is_err());
    }

    /// A hole reads as zeros: it compares equal to written zeros on the other side,
    /// different from data, and is not read (the 1 GiB hole costs no reads).
    #[test]
    fn holes_hash_as_zeros_without_being_read() {
        let dir = tempfile::tempdir().unwrap();
        let make = |name: &str, len: u64, writes: &[(u64, &[u8])]| {
            let path = dir.path().join(name);
            let f = std::fs::File::create(&path).unwrap();
            f.set_len(len).unwrap();
            for (at, data) in writes {
                std::os::unix::fs::FileExt::write_all_at(&f, data, *at).unwrap();
            }
            f.sync_all().unwrap();
            std::fs::File::open(path).unwrap()
        };
        let len = (1u64 << 30) + 12345;
        let mib = vec![9u8; 1 << 20];
        let zeros = vec![0u8; 1 << 20];
        let sparse = make("sparse", len, &[(5 << 20, &mib)]);
        // The same content with the first MiB and the tail written as zeros.
        let zeroed = make(
            "zeroed",
            len,
            &[(0, &zeros), (5 << 20, &mib), (len - 20000, &zeros[..20000])],
        );
        let other = make("other", len, &[(5 << 20, &mib), (700 << 20, &mib[..10])]);
        let before = read_bytes();
        let data = data_segments(sparse.as_fd(), 0, len).unwrap();
        assert!(data
            .iter()
            .all(|&(s, e)| s <= 5 << 20 && e >= 6 << 20 && e - s < 64 << 20));
        let reqs = plan(0, len, &data);
        let mut read_elsewhere = 0;
        for r in &reqs {
            let mine = hash_blocks(sparse.as_fd(), r.offset, r.block, r.count).unwrap();
            assert_eq!(
                differing(zeroed.as_fd(), r.offset, r.block, &mine).unwrap(),
                Vec::<u32>::new()
            );
            let diff = differing(other.as_fd(), r.offset, r.block, &mine).unwrap();
            let hit = r.offset <= 700 << 20 && 700 << 20 < r.offset + r.len();
            assert_eq!(diff.len(), usize::from(hit), "{r:?}");
            read_elsewhere += r.len();
        }
        assert!(read_elsewhere >= len);
        // Data: 1 MiB read on each of three files, plus the zeros written in
        // `zeroed`; never the GiB of holes (other tests may read a little meanwhile).
        let read = read_bytes() - before;
        assert!(
            read < 48 << 20,
            "read {read} bytes for a 1 GiB sparse compare"
        );
        // Past the end nothing; a short tail differs from a full block of zeros.
        let short = make("short", len - 1, &[]);
        let tail = hash_blocks(sparse.as_fd(), len - 12345, BLOCK, 2).unwrap();
        assert_eq!(
            differing(short.as_fd(), len - 12345, BLOCK, &tail).unwrap(),
            vec![0]
        );
    }

    #[test]
    fn plans_cover_the_file_with_big_blocks_over_holes() {
        let (small, big) = (u64::from(BLOCK), u64::from(HOLE_BLOCK));
        let check = |size: u64, data: &[(u64, u64)]| {
            let reqs = plan(0, size, data);
            let mut pos = 0;
            for r in &reqs {
                assert_eq!(r.offset, pos, "{reqs:?}");
                assert!(r.count >= 1 && r.count <= MAX_BLOCKS);
                pos += r.len();
            }
            assert!(pos >= size && pos < size + small.max(big), "{reqs:?}");
            // Every byte with data is in a small-block request.
            for &(s, e) in data {
                for r in &reqs {
                    if r.offset < e && s < r.offset + r.len() {
                        assert_eq!(r.block, BLOCK, "{reqs:?}");
                    }
                }
            }
            reqs
        };
        assert!(check(0, &[]).is_empty());
        // All hole: big blocks, the remainder small.
        let reqs = check(3 * big + 5, &[]);
        assert_eq!(
            reqs[0],
            Request {
                offset: 0,
                block: HOLE_BLOCK,
                count: 3
            }
        );
        assert_eq!(
            reqs[1],
            Request {
                offset: 3 * big,
                block: BLOCK,
                count: 1
            }
        );
        // 2 TiB of hole: 1024 requests of 2048 MiB.
        assert_eq!(check(2 << 40, &[]).len(), 1024);
        // Data in the middle, unaligned, and touching segments merged.
        let reqs = check(
            10 * big,
            &[(3 * big + 10, 3 * big + 20), (3 * big + small, 4 * big + 1)],
        );
        assert_eq!(
            reqs[0],
            Request {
                offset: 0,
                block: HOLE_BLOCK,
                count: 3
            }
        );
        assert_eq!(
            reqs[1],
            Request {
                offset: 3 * big,
                block: BLOCK,
                count: 17
            }
        );
        assert_eq!(
            reqs[2],
            Request {
                offset: 4 * big + small,
                block: HOLE_BLOCK,
                count: 5
            }
        );
        assert_eq!(reqs[3].block, BLOCK);
        // From a window's start (a later window of the same file).
        let reqs = plan(
            WINDOW,
            WINDOW + 2 * big,
            &[(WINDOW + big, WINDOW + big + 1)],
        );
        assert_eq!(
            reqs[0],
            Request {
                offset: WINDOW,
                block: HOLE_BLOCK,
                count: 1
            }
        );
        assert_eq!(
            reqs[1],
            Request {
                offset: WINDOW + big,
                block: BLOCK,
                count: 1
            }
        );
        assert_eq!(reqs[2].offset, WINDOW + big + small);
        // All data: small blocks only, up to MAX_BLOCKS each.
        let reqs = check(300 << 20, &[(0, 300 << 20)]);
        assert!(reqs.iter().all(|r| r.block == BLOCK));
        assert_eq!(reqs.len(), 3);
    }
}
