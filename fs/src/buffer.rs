//! Write payloads: page-aligned on the primary (the backing file may be opened with
//! O_DIRECT) and on the receiver (a frame's data is read straight into one). One
//! copy of the data serves both the local write and the network send.
//!
//! Buffers of 4 KiB to 4 MiB are recycled through a small process-wide pool
//! instead of going back to the allocator: a fresh 1 MiB block cost up to 256 page
//! faults and a memset of zeroes before its first byte of data (an aligned
//! `alloc_zeroed` is `memalign` + `memset`), on both daemons for every replicated
//! 1 MiB write (issue 11: about 1.4 ms of CPU per replicated MiB in the two daemons
//! together before the pool). The pool holds at most [`POOL_BYTES`] of idle blocks.

use std::alloc::{alloc, dealloc, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::Arc;

use parking_lot::Mutex;

const ALIGN: usize = 4096;
/// The smallest recycled capacity.
const POOL_MIN: usize = ALIGN;
/// The largest recycled capacity (a frame's data is at most 4 MiB).
const POOL_MAX_BLOCK: usize = 4 << 20;
/// At most this many bytes of idle blocks are kept.
pub const POOL_BYTES: usize = 32 << 20;
/// Size classes: powers of two from `POOL_MIN` to `POOL_MAX_BLOCK`.
const CLASSES: usize = (POOL_MAX_BLOCK / POOL_MIN).trailing_zeros() as usize + 1;

/// A block of memory: `layout.size()` bytes at `ptr`, of which the first `init`
/// were written at least once (the rest may be uninitialized).
struct Block {
    ptr: NonNull<u8>,
    layout: Layout,
    init: usize,
}

// SAFETY: a block is owned memory with no aliases while it sits in the pool.
unsafe impl Send for Block {}

struct Pool {
    idle: [Vec<Block>; CLASSES],
    bytes: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    idle: [const { Vec::new() }; CLASSES],
    bytes: 0,
});

/// The size class of a capacity of `size` bytes, if it is recycled.
fn class_of(size: usize) -> Option<usize> {
    ((POOL_MIN..=POOL_MAX_BLOCK).contains(&size) && size.is_power_of_two())
        .then(|| (size / POOL_MIN).trailing_zeros() as usize)
}

/// A block of at least `len` bytes: recycled when one of its class is idle.
fn take_block(len: usize) -> Block {
    let mut size = len.max(1).next_multiple_of(ALIGN);
    if (POOL_MIN..=POOL_MAX_BLOCK).contains(&size) {
        size = size.next_power_of_two();
    }
    if let Some(class) = class_of(size) {
        let mut pool = POOL.lock();
        if let Some(block) = pool.idle[class].pop() {
            pool.bytes -= block.layout.size();
            return block;
        }
    }
    let Ok(layout) = Layout::from_size_align(size, ALIGN) else {
        std::alloc::handle_alloc_error(Layout::new::<u8>())
    };
    // SAFETY: layout has a non-zero size.
    let raw = unsafe { alloc(layout) };
    let Some(ptr) = NonNull::new(raw) else {
        std::alloc::handle_alloc_error(layout)
    };
    Block {
        ptr,
        layout,
        init: 0,
    }
}

/// Gives a block back: to the pool when its class is recycled and there is room.
fn give_block(block: Block) {
    if let Some(class) = class_of(block.layout.size()) {
        let mut pool = POOL.lock();
        if pool.bytes + block.layout.size() <= POOL_BYTES {
            pool.bytes += block.layout.size();
            pool.idle[class].push(block);
            return;
        }
    }
    // SAFETY: ptr was allocated with exactly this layout and is not used again.
    unsafe { dealloc(block.ptr.as_ptr(), block.layout) }
}

/// A heap buffer aligned to 4 KiB (for O_DIRECT). The one aligned buffer of the
/// workspace: the tests use it too.
pub struct AlignedBuf {
    block: Option<Block>,
    len: usize,
}

// SAFETY: the buffer is owned memory, never aliased mutably after construction.
unsafe impl Send for AlignedBuf {}
// SAFETY: only shared (read) access is possible through a shared reference.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A buffer of `len` bytes whose first `len` bytes are initialized, with
    /// unspecified contents (a recycled block's earlier bytes, or zeroes).
    fn initialized(len: usize) -> Self {
        let mut block = take_block(len);
        if block.init < len {
            // SAFETY: [init, len) lies inside the block (len <= layout.size()).
            unsafe {
                block
                    .ptr
                    .as_ptr()
                    .add(block.init)
                    .write_bytes(0, len - block.init);
            }
            block.init = len;
        }
        Self {
            block: Some(block),
            len,
        }
    }

    /// Copies `data` into a new aligned buffer (one pass: the block is not
    /// zeroed first).
    pub fn copy_from(data: &[u8]) -> Self {
        let mut block = take_block(data.len());
        // SAFETY: the block holds at least data.len() bytes and is not aliased;
        // data is a distinct allocation.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), block.ptr.as_ptr(), data.len());
        }
        block.init = block.init.max(data.len());
        Self {
            block: Some(block),
            len: data.len(),
        }
    }

    /// A zero-filled aligned buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        Self::filled(len, 0)
    }

    /// An aligned buffer of `len` bytes to read into: its contents before the
    /// read are unspecified (never another process's: this one's earlier
    /// buffers, or zeroes). Only what was read into it is to be used.
    pub fn scratch(len: usize) -> Self {
        Self::initialized(len)
    }

    /// An aligned buffer of `len` bytes, each `byte`.
    pub fn filled(len: usize, byte: u8) -> Self {
        let mut buf = Self::initialized(len);
        buf.as_mut_slice().fill(byte);
        buf
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match &self.block {
            // SAFETY: the block is valid and initialized for len bytes, and
            // uniquely borrowed through &mut self.
            Some(b) => unsafe { std::slice::from_raw_parts_mut(b.ptr.as_ptr(), self.len) },
            None => &mut [],
        }
    }

    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.block {
            // SAFETY: the block is valid and initialized for len bytes for the
            // lifetime of self.
            Some(b) => unsafe { std::slice::from_raw_parts(b.ptr.as_ptr(), self.len) },
            None => &[],
        }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Some(block) = self.block.take() {
            give_block(block);
        }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

/// The data of a write operation.
#[derive(Clone)]
pub enum Payload {
    Aligned(Arc<AlignedBuf>),
    Owned(Arc<Vec<u8>>),
}

impl Default for Payload {
    fn default() -> Self {
        Payload::Owned(Arc::new(Vec::new()))
    }
}

impl Deref for Payload {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Payload::Aligned(buf) => buf,
            Payload::Owned(vec) => vec,
        }
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Payload({} bytes)", self.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffer_is_aligned_and_keeps_data() {
        for len in [0usize, 1, 4095, 4096, 4097, 1 << 20] {
            let data: Vec<u8> = (0..len).map(|i| u8::try_from(i % 251).unwrap()).collect();
            let buf = AlignedBuf::copy_from(&data);
            assert_eq!(buf.as_ptr() as usize % ALIGN, 0);
            assert_eq!(&*buf, &data[..]);
        }
    }

    #[test]
    fn a_recycled_block_is_filled_as_asked_and_the_pool_stays_bounded() {
        let len = 1 << 20;
        // Many at once, then all dropped: the pool keeps at most POOL_BYTES.
        let dirty: Vec<AlignedBuf> = (0..48).map(|_| AlignedBuf::filled(len, 0xff)).collect();
        drop(dirty);
        assert!(POOL.lock().bytes <= POOL_BYTES);
        for _ in 0..4 {
            let zero = AlignedBuf::zeroed(len);
            assert_eq!(zero.as_ptr() as usize % ALIGN, 0);
            assert!(
                zero.iter().all(|b| *b == 0),
                "a recycled block was not zeroed"
            );
            drop(zero);
            let ones = AlignedBuf::filled(len - 4096, 1);
            assert!(ones.iter().all(|b| *b == 1));
            drop(ones);
            let data: Vec<u8> = (0..len + 1)
                .map(|i| u8::try_from(i % 7).unwrap_or(0))
                .collect();
            let copy = AlignedBuf::copy_from(&data);
            assert_eq!(&*copy, &data[..]);
        }
        // Odd sizes share a class; a scratch buffer has its full length.
        let mut scratch = AlignedBuf::scratch(100 << 10);
        assert_eq!(scratch.len(), 100 << 10);
        scratch.as_mut_slice()[..3].copy_from_slice(b"abc");
        scratch.truncate(3);
        assert_eq!(&*scratch, b"abc");
        assert_eq!(class_of(1 << 20), Some(8));
        assert_eq!(class_of(3 << 20), None);
        assert_eq!(class_of(4096), Some(0));
        assert_eq!(class_of(8 << 20), None);
    }
}
