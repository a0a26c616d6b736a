//! Block hashes for comparing two copies without sending their data (full compare
//! when the history is unknown, and `verify`): both sides hash the same blocks with
//! blake3, only the indexes of differing blocks come back.

use std::os::fd::BorrowedFd;

use crate::apply::Errno;

/// Block size of a compare.
pub const BLOCK: u32 = 64 << 10;
/// Blocks per `Control::Compare` (its hashes fit a frame header comfortably).
pub const MAX_BLOCKS: usize = 2048;

/// Hashes `count` blocks of `block` bytes from `offset`: the bytes present (short at
/// the end of the file, none past it), so a missing tail differs from zeros.
pub fn hash_blocks(
    fd: BorrowedFd<'_>,
    offset: u64,
    block: u32,
    count: usize,
) -> Result<Vec<[u8; 32]>, Errno> {
    let mut buf = vec![0u8; block as usize];
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let at = offset + i as u64 * u64::from(block);
        let n = crate::fdio::read_full(fd, &mut buf, at)?;
        let mut h = blake3::Hasher::new();
        // The length is part of the hash: a short block never equals a full one.
        h.update(&(n as u64).to_le_bytes());
        h.update(&buf[..n]);
        out.push(*h.finalize().as_bytes());
    }
    Ok(out)
}

/// The receiver's side of `Control::Compare`: which of `theirs` differ from our blocks.
pub fn differing(
    fd: BorrowedFd<'_>,
    offset: u64,
    block: u32,
    theirs: &[[u8; 32]],
) -> Result<Vec<u32>, Errno> {
    if block == 0 || block > (1 << 20) || theirs.len() > MAX_BLOCKS {
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
}
