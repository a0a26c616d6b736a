//! Heap buffers aligned for `O_DIRECT`: vmha-fs's own (one implementation, one
//! set of `unsafe` blocks), re-exported for the tests.

pub use vmha_fs::buffer::AlignedBuf;
