//! Write payloads: page-aligned on the primary (the backing file may be opened with
//! O_DIRECT), plain vectors when decoded from the wire. One copy of the data serves
//! both the local write and the network send.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::Arc;

const ALIGN: usize = 4096;

/// A heap buffer aligned to 4 KiB (for O_DIRECT). The one aligned buffer of the
/// workspace: the tests use it too.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: the buffer is owned memory, never aliased mutably after construction.
unsafe impl Send for AlignedBuf {}
// SAFETY: only shared (read) access is possible after construction.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Copies `data` into a new aligned buffer.
    pub fn copy_from(data: &[u8]) -> Self {
        let mut buf = Self::zeroed(data.len());
        buf.as_mut_slice().copy_from_slice(data);
        buf
    }

    /// A zero-filled aligned buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        let size = len.max(1).next_multiple_of(ALIGN);
        let Ok(layout) = Layout::from_size_align(size, ALIGN) else {
            std::alloc::handle_alloc_error(Layout::new::<u8>())
        };
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        Self { ptr, len, layout }
    }

    /// An aligned buffer of `len` bytes, each `byte`.
    pub fn filled(len: usize, byte: u8) -> Self {
        let mut buf = Self::zeroed(len);
        buf.as_mut_slice().fill(byte);
        buf
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for layout.size() >= len bytes and uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes for the lifetime of self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated with exactly this layout.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
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
}
