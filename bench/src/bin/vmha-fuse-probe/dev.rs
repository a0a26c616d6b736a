//! The classic transport, as fuser runs vmha-fs: N threads, each blocking in
//! `read` on its own clone of the /dev/fuse descriptor (FUSE_DEV_IOC_CLONE),
//! handling the request inline and replying with one `writev`.
//!
//! In the `uring` transport one such thread stays on the session descriptor:
//! INIT always arrives here, and so do FORGET and INTERRUPT (the kernel sends
//! those over /dev/fuse even when the ring is up).

use crate::abi::{self, InHeader, IN_HEADER, WRITE_IN};
use crate::fs::{Action, Event, Fs, Reply, Request, MAX_WRITE};
use rustix::io::Errno;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;
use vmha_fs::buffer::AlignedBuf;

/// Where a request is read to in the buffer: a WRITE's data (after the
/// in-header and `fuse_write_in`) then starts on a page boundary, so an
/// O_DIRECT `pwrite` takes it in place, as the ring's payload buffer allows.
const DATA_AT: usize = 4096;
const READ_AT: usize = DATA_AT - IN_HEADER - WRITE_IN;

/// A new descriptor on the same FUSE connection (`FUSE_DEV_IOC_CLONE`): the
/// kernel then queues replies per descriptor, as fuser's `clone_fd` does.
pub fn clone_fd(session: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let fd = rustix::fs::open(
        "/dev/fuse",
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    let id = u32::try_from(session.as_raw_fd()).map_err(|_| Errno::BADF)?;
    // SAFETY: FUSE_DEV_IOC_CLONE reads one u32 (the session's descriptor)
    // through the pointer, which points at a live local for the whole call.
    let r = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            abi::DEV_IOC_CLONE as libc::c_ulong,
            &id as *const u32,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Writes a reply; false if the kernel refused it (other than for an
/// interrupted request, which is normal).
fn send(fd: BorrowedFd<'_>, unique: u64, reply: &Reply, io_buf: &[u8]) -> bool {
    let (error, body): (i32, &[u8]) = match reply {
        Reply::Body(b) => (0, b),
        Reply::InBuf(n) => (0, &io_buf[..(*n).min(io_buf.len())]),
        Reply::Err(e) => (-e, &[]),
        Reply::None => return true,
    };
    let head = abi::out_header(unique, error, body.len());
    match rustix::io::writev(fd, &[IoSlice::new(&head), IoSlice::new(body)]) {
        Ok(_) | Err(Errno::NOENT) => true,
        Err(e) => {
            eprintln!("vmha-fuse-probe: reply to request {unique}: {e}");
            false
        }
    }
}

/// Serves requests from `fd` until the filesystem is unmounted.
pub fn serve(fs: &Fs, fd: BorrowedFd<'_>) {
    let mut buf = AlignedBuf::zeroed(DATA_AT + MAX_WRITE as usize + 4096);
    let mut io_buf = AlignedBuf::zeroed(MAX_WRITE as usize);
    loop {
        let n = match rustix::io::read(fd, &mut buf[READ_AT..]) {
            Ok(n) => n,
            // Interrupted before we read it, or a signal: read the next one.
            Err(Errno::NOENT | Errno::INTR | Errno::AGAIN) => continue,
            // Unmounted (ENODEV), or the connection was aborted.
            Err(Errno::NODEV | Errno::CONNABORTED) => break,
            Err(e) => {
                fs.fatal(format!("read /dev/fuse: {e}"));
                break;
            }
        };
        let msg = &buf[READ_AT..READ_AT + n];
        let Some(h) = InHeader::parse(msg) else {
            continue;
        };
        fs.dev_requests.fetch_add(1, Ordering::Relaxed);
        let end = (h.len as usize).clamp(IN_HEADER, n);
        let op_end = (IN_HEADER + abi::op_header_len(h.opcode)).min(end);
        let req = Request {
            h,
            op: &msg[IN_HEADER..op_end],
            payload: &msg[op_end..end],
        };
        let reply = match fs.dispatch(&req) {
            Action::Done(r) => r,
            Action::Io(io) => io.run_sync(req.payload, &mut io_buf),
        };
        let sent = send(fd, h.unique, &reply, &io_buf);
        if h.opcode == abi::INIT {
            fs.init_replied(sent && !matches!(reply, Reply::Err(_)));
        }
    }
    fs.send(Event::WorkerDone);
}
