//! The part of the kernel's FUSE ABI (`include/uapi/linux/fuse.h`, protocol
//! 7.42+ for FUSE over io_uring) the probe speaks, written out by hand: the
//! point of the probe is to measure the bare transport, without fuser's or
//! libfuse's layers. Fields are read from and written to byte slices (little
//! endian, as on every Linux target this runs on), so no `unsafe` is needed for
//! the protocol itself.

/// `struct fuse_in_header`.
pub const IN_HEADER: usize = 40;
/// `struct fuse_out_header`.
pub const OUT_HEADER: usize = 16;
/// `struct fuse_write_in`: a WRITE's data follows it on /dev/fuse.
pub const WRITE_IN: usize = 40;

pub const ROOT_ID: u64 = 1;
pub const KERNEL_MAJOR: u32 = 7;
/// The oldest minor whose structs the probe's parser assumes (fuse_init_in with
/// flags2, INIT_EXT).
pub const MIN_MINOR: u32 = 36;

// Opcodes (`enum fuse_opcode`).
pub const LOOKUP: u32 = 1;
pub const FORGET: u32 = 2;
pub const GETATTR: u32 = 3;
pub const SETATTR: u32 = 4;
pub const UNLINK: u32 = 10;
pub const OPEN: u32 = 14;
pub const READ: u32 = 15;
pub const WRITE: u32 = 16;
pub const STATFS: u32 = 17;
pub const RELEASE: u32 = 18;
pub const FSYNC: u32 = 20;
pub const FLUSH: u32 = 25;
pub const INIT: u32 = 26;
pub const OPENDIR: u32 = 27;
pub const READDIR: u32 = 28;
pub const RELEASEDIR: u32 = 29;
pub const ACCESS: u32 = 34;
pub const CREATE: u32 = 35;
pub const INTERRUPT: u32 = 36;
pub const DESTROY: u32 = 38;
pub const BATCH_FORGET: u32 = 42;
pub const FALLOCATE: u32 = 43;

// INIT flags (bits 32.. travel in `flags2`).
pub const ASYNC_READ: u64 = 1 << 0;
pub const BIG_WRITES: u64 = 1 << 5;
pub const ASYNC_DIO: u64 = 1 << 15;
pub const PARALLEL_DIROPS: u64 = 1 << 18;
pub const MAX_PAGES: u64 = 1 << 22;
pub const INIT_EXT: u64 = 1 << 30;
pub const DIRECT_IO_ALLOW_MMAP: u64 = 1 << 36;
pub const OVER_IO_URING: u64 = 1 << 41;

// fuse_setattr_in.valid
pub const FATTR_MODE: u32 = 1 << 0;
pub const FATTR_SIZE: u32 = 1 << 3;
pub const FATTR_FH: u32 = 1 << 6;

// OPEN/CREATE reply flags.
pub const FOPEN_DIRECT_IO: u32 = 1 << 0;
pub const FOPEN_PARALLEL_DIRECT_WRITES: u32 = 1 << 6;

pub const FSYNC_FDATASYNC: u32 = 1 << 0;

// FUSE over io_uring (`struct fuse_uring_req_header`, `enum fuse_uring_cmd`).
pub const URING_IN_OUT_HEADER_SZ: usize = 128;
pub const URING_OP_IN_OUT_SZ: usize = 128;
/// `ring_ent_in_out` follows `in_out` and `op_in`.
pub const URING_ENT_IN_OUT: usize = URING_IN_OUT_HEADER_SZ + URING_OP_IN_OUT_SZ;
/// sizeof(struct fuse_uring_req_header).
pub const URING_REQ_HEADER: usize = URING_ENT_IN_OUT + 32;
pub const URING_CMD_REGISTER: u32 = 1;
pub const URING_CMD_COMMIT_AND_FETCH: u32 = 2;

/// `FUSE_DEV_IOC_CLONE` = `_IOR(229, 0, uint32_t)`.
pub const DEV_IOC_CLONE: u64 = 0x8004_e500;

/// The per-opcode fixed struct that precedes the variable part of a request
/// (`in_args[0]`; the kernel puts it in `op_in` on io_uring, right after the
/// in-header on /dev/fuse). Zero for requests whose only argument is a name.
pub fn op_header_len(opcode: u32) -> usize {
    match opcode {
        LOOKUP | UNLINK | STATFS | DESTROY => 0,
        FORGET => 8,
        GETATTR => 16,
        SETATTR => 88,
        OPEN | OPENDIR => 8,
        READ | READDIR => 40,
        WRITE => WRITE_IN,
        RELEASE | RELEASEDIR => 24,
        FSYNC => 16,
        FLUSH => 24,
        INIT => 64,
        ACCESS => 8,
        CREATE => 16,
        INTERRUPT => 8,
        BATCH_FORGET => 8,
        FALLOCATE => 32,
        // Not parsed: answered with ENOSYS.
        _ => 0,
    }
}

/// Little-endian field reads from a struct's bytes; short input reads zeroes
/// (the caller checked the length once).
#[derive(Debug, Clone, Copy)]
pub struct Fields<'a>(pub &'a [u8]);

impl Fields<'_> {
    fn bytes<const N: usize>(&self, at: usize) -> [u8; N] {
        let mut b = [0u8; N];
        if let Some(s) = self.0.get(at..at + N) {
            b.copy_from_slice(s);
        }
        b
    }
    pub fn u32(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.bytes(at))
    }
    pub fn u64(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.bytes(at))
    }
}

/// `struct fuse_in_header`.
#[derive(Debug, Clone, Copy)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
}

impl InHeader {
    pub fn parse(b: &[u8]) -> Option<Self> {
        if b.len() < IN_HEADER {
            return None;
        }
        let f = Fields(b);
        Some(Self {
            len: f.u32(0),
            opcode: f.u32(4),
            unique: f.u64(8),
            nodeid: f.u64(16),
        })
    }
}

/// `struct fuse_out_header`.
pub fn out_header(unique: u64, error: i32, body_len: usize) -> [u8; OUT_HEADER] {
    let mut h = [0u8; OUT_HEADER];
    let len = u32::try_from(OUT_HEADER + body_len).unwrap_or(u32::MAX);
    h[0..4].copy_from_slice(&len.to_le_bytes());
    h[4..8].copy_from_slice(&error.to_le_bytes());
    h[8..16].copy_from_slice(&unique.to_le_bytes());
    h
}

/// Appends little-endian fields to a reply body.
#[derive(Debug, Default)]
pub struct Out(pub Vec<u8>);

impl Out {
    pub fn with_capacity(n: usize) -> Self {
        Self(Vec::with_capacity(n))
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn zeroes(&mut self, n: usize) -> &mut Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
}

/// `struct fuse_attr` (88 bytes) from a file's metadata.
pub fn put_attr(o: &mut Out, ino: u64, md: &std::fs::Metadata) {
    use std::os::unix::fs::MetadataExt;
    let secs = |s: i64| u64::try_from(s).unwrap_or(0);
    let nsec = |n: i64| u32::try_from(n).unwrap_or(0);
    o.u64(ino)
        .u64(md.size())
        .u64(md.blocks())
        .u64(secs(md.atime()))
        .u64(secs(md.mtime()))
        .u64(secs(md.ctime()))
        .u32(nsec(md.atime_nsec()))
        .u32(nsec(md.mtime_nsec()))
        .u32(nsec(md.ctime_nsec()))
        .u32(md.mode())
        .u32(u32::try_from(md.nlink()).unwrap_or(u32::MAX))
        .u32(md.uid())
        .u32(md.gid())
        .u32(u32::try_from(md.rdev()).unwrap_or(0))
        .u32(u32::try_from(md.blksize()).unwrap_or(4096))
        .u32(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = out_header(7, -2, 8);
        let f = Fields(&h);
        assert_eq!(f.u32(0), 24);
        assert_eq!(f.u32(4) as i32, -2);
        assert_eq!(f.u64(8), 7);
        assert_eq!(URING_REQ_HEADER, 288);
    }
}
