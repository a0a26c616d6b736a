//! Descriptor helpers every layer uses (the FUSE layer, the resync, the compare,
//! save-aside). A leaf: it imports nothing of this crate but `apply`'s path
//! helper, so no module needs the FUSE layer for a read loop.

use std::os::fd::BorrowedFd;

use crate::apply::{self, Errno};

/// `fsync` or `fdatasync`.
pub(crate) fn sync_fd(fd: BorrowedFd<'_>, datasync: bool) -> Result<(), Errno> {
    if datasync {
        rustix::fs::fdatasync(fd)
    } else {
        rustix::fs::fsync(fd)
    }
}

/// The path the kernel gives for a descriptor (`/proc/self/fd/N`), as bytes.
pub(crate) fn fd_path(fd: BorrowedFd<'_>) -> Result<Vec<u8>, Errno> {
    let link = rustix::fs::readlinkat(rustix::fs::CWD, apply::proc_path(fd), Vec::new())?;
    Ok(link.into_bytes())
}

/// `pread` until `buf` is full or end of file; the number of bytes read.
pub(crate) fn read_full(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> Result<usize, Errno> {
    let mut done = 0;
    while done < buf.len() {
        match rustix::io::pread(fd, &mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}
