//! FUSE over io_uring (kernel `fs/fuse/dev_uring.c`, Linux 6.14+): one queue
//! per possible CPU (the kernel picks the queue of the CPU the calling task
//! runs on), one thread per queue pinned to its CPU, each with its own SQE128
//! ring. Every entry is a header buffer (`struct fuse_uring_req_header`) and a
//! payload buffer registered with FUSE_IO_URING_CMD_REGISTER; a request
//! arrives as the completion of that command, and its reply goes back with
//! FUSE_IO_URING_CMD_COMMIT_AND_FETCH, which also waits for the next request:
//! one system call per request and reply, no copy of a read/write buffer
//! through `read`/`writev`.
//!
//! The backing file I/O of READ/WRITE/FSYNC goes through the same ring (its
//! completion then commits the reply), so one thread keeps up to `depth`
//! requests of its queue in flight; `--sync-io` does it inline instead, which
//! is what a synchronous filesystem (fuser-style handlers) would get.

use crate::abi::{self, Fields, InHeader};
use crate::fs::{Action, Event, Fs, InitState, Io, IoKind, Reply, Request};
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use vmha_fs::buffer::AlignedBuf;

/// user_data: the entry index, and this bit for its backing I/O (else its
/// FUSE command).
const IO_BIT: u64 = 1 << 32;

/// One ring entry. The kernel owns its buffers from the submission of its
/// command until that command's completion; we touch them only in between.
struct Ent {
    header: AlignedBuf,
    payload: AlignedBuf,
    /// iov[0] = header, iov[1] = payload: read by the kernel at REGISTER.
    iov: Box<[libc::iovec; 2]>,
    /// The command to resubmit on EAGAIN/EINTR.
    last_cmd: u32,
    commit_id: u64,
    unique: u64,
    /// The backing I/O in flight for this entry's request.
    io: Option<Io>,
    live: bool,
}

impl Ent {
    fn new(payload_len: usize) -> Self {
        let mut e = Self {
            header: AlignedBuf::zeroed(4096),
            payload: AlignedBuf::zeroed(payload_len),
            iov: Box::new(
                [libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                }; 2],
            ),
            last_cmd: abi::URING_CMD_REGISTER,
            commit_id: 0,
            unique: 0,
            io: None,
            live: true,
        };
        e.iov[0] = libc::iovec {
            iov_base: e.header.as_mut_slice().as_mut_ptr().cast(),
            iov_len: abi::URING_REQ_HEADER,
        };
        e.iov[1] = libc::iovec {
            iov_base: e.payload.as_mut_slice().as_mut_ptr().cast(),
            iov_len: payload_len,
        };
        e
    }
}

/// The 80-byte command area: `struct fuse_uring_cmd_req`.
fn cmd_req(commit_id: u64, qid: u16) -> [u8; 80] {
    let mut c = [0u8; 80];
    c[8..16].copy_from_slice(&commit_id.to_le_bytes());
    c[16..18].copy_from_slice(&qid.to_le_bytes());
    c
}

/// A FUSE command SQE. REGISTER also carries the iovec array in `addr`/`len`,
/// which the crate's `UringCmd80` builder does not expose: they are patched in.
fn cmd_sqe(dev: RawFd, op: u32, ent: &Ent, qid: u16, idx: usize) -> squeue::Entry128 {
    let commit_id = if op == abi::URING_CMD_REGISTER {
        0
    } else {
        ent.commit_id
    };
    let sqe = opcode::UringCmd80::new(types::Fd(dev), op)
        .cmd(cmd_req(commit_id, qid))
        .build()
        .user_data(idx as u64);
    if op != abi::URING_CMD_REGISTER {
        return sqe;
    }
    // SAFETY: `Entry128` is `#[repr(C)]` (a `#[repr(C)]` `io_uring_sqe` and
    // 64 bytes), 128 bytes of plain data without padding or invariants, so it
    // can be viewed as bytes and back.
    let mut raw = unsafe { std::mem::transmute::<squeue::Entry128, [u8; 128]>(sqe) };
    // struct io_uring_sqe: `addr` at byte 16, `len` at byte 24.
    raw[16..24].copy_from_slice(&(ent.iov.as_ptr() as u64).to_le_bytes());
    raw[24..28].copy_from_slice(&2u32.to_le_bytes());
    // SAFETY: as above; only the `addr` and `len` fields changed.
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(raw) }
}

struct Queue<'a> {
    fs: &'a Fs,
    dev: RawFd,
    qid: u16,
    sync_io: bool,
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    /// Moving an entry moves none of what the kernel points at (its buffers
    /// and iovecs are separate heap blocks).
    ents: Vec<Ent>,
}

impl Queue<'_> {
    fn push(&mut self, sqe: squeue::Entry128) -> std::io::Result<()> {
        loop {
            // SAFETY: every buffer an SQE points at (entry buffers, iovecs,
            // backing descriptors held by `Ent::io`) lives in `self.ents`
            // until the completion of that SQE has been reaped.
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    fn submit_cmd(&mut self, idx: usize, op: u32) -> std::io::Result<()> {
        let sqe = cmd_sqe(self.dev, op, &self.ents[idx], self.qid, idx);
        self.ents[idx].last_cmd = op;
        self.push(sqe)
    }

    /// The reply into the entry's buffers, then COMMIT_AND_FETCH.
    fn commit(&mut self, idx: usize, reply: Reply) -> std::io::Result<()> {
        let ent = &mut self.ents[idx];
        let (error, len) = match reply {
            Reply::Body(b) => {
                let n = b.len().min(ent.payload.len());
                ent.payload[..n].copy_from_slice(&b[..n]);
                (0, n)
            }
            Reply::InBuf(n) => (0, n.min(ent.payload.len())),
            Reply::Err(e) => (-e, 0),
            // Never sent over the ring (FORGET/INTERRUPT come on /dev/fuse);
            // an empty success still hands the entry back.
            Reply::None => (0, 0),
        };
        let hdr = &mut ent.header[..abi::URING_REQ_HEADER];
        hdr[..abi::OUT_HEADER].copy_from_slice(&abi::out_header(ent.unique, error, len));
        let at = abi::URING_ENT_IN_OUT + 16;
        hdr[at..at + 4].copy_from_slice(&u32::try_from(len).unwrap_or(0).to_le_bytes());
        self.submit_cmd(idx, abi::URING_CMD_COMMIT_AND_FETCH)
    }

    /// A request arrived in entry `idx`.
    fn on_request(&mut self, idx: usize) -> std::io::Result<()> {
        let ent = &mut self.ents[idx];
        let hdr = &ent.header[..abi::URING_REQ_HEADER];
        let Some(h) = InHeader::parse(&hdr[..abi::IN_HEADER]) else {
            return Ok(());
        };
        self.fs.ring_requests.fetch_add(1, Ordering::Relaxed);
        let ring_ent = Fields(&hdr[abi::URING_ENT_IN_OUT..]);
        ent.commit_id = ring_ent.u64(8);
        ent.unique = h.unique;
        let payload_len = (ring_ent.u32(16) as usize).min(ent.payload.len());
        let op_in = &hdr[abi::URING_IN_OUT_HEADER_SZ..abi::URING_ENT_IN_OUT];
        // A name-only request (LOOKUP, UNLINK) has an empty arg 0 since 6.14,
        // so its name is in the payload; a kernel that put it in `op_in`
        // instead is served too.
        let payload = if abi::op_header_len(h.opcode) == 0 && payload_len == 0 {
            op_in
        } else {
            &ent.payload[..payload_len]
        };
        let req = Request {
            h,
            op: op_in,
            payload,
        };
        let action = self.fs.dispatch(&req);
        match action {
            Action::Done(reply) => self.commit(idx, reply),
            Action::Io(io) if self.sync_io => {
                let ent = &mut self.ents[idx];
                let reply = match io.kind {
                    IoKind::Read { .. } => io.run_sync(&[], &mut ent.payload),
                    _ => io.run_sync(&ent.payload[..payload_len], &mut []),
                };
                self.commit(idx, reply)
            }
            Action::Io(io) => self.submit_io(idx, io),
        }
    }

    fn submit_io(&mut self, idx: usize, io: Io) -> std::io::Result<()> {
        let ent = &mut self.ents[idx];
        let buf = ent.payload.as_mut_slice().as_mut_ptr();
        let fd = types::Fd(io.fd(buf as usize));
        let sqe = match io.kind {
            IoKind::Write { offset, len } => {
                opcode::Write::new(fd, buf, u32::try_from(len).unwrap_or(0))
                    .offset(offset)
                    .build()
            }
            IoKind::Read { offset, len } => {
                opcode::Read::new(fd, buf, u32::try_from(len).unwrap_or(0))
                    .offset(offset)
                    .build()
            }
            IoKind::Fsync { datasync } => {
                let flags = if datasync {
                    types::FsyncFlags::DATASYNC
                } else {
                    types::FsyncFlags::empty()
                };
                opcode::Fsync::new(fd).flags(flags).build()
            }
        };
        // The handle (and so the descriptor) stays open until the completion.
        ent.io = Some(io);
        self.push(squeue::Entry128::from(sqe.user_data(IO_BIT | idx as u64)))
    }

    fn run(&mut self) -> Result<(), String> {
        for idx in 0..self.ents.len() {
            self.submit_cmd(idx, abi::URING_CMD_REGISTER)
                .map_err(|e| format!("queue {}: submit REGISTER: {e}", self.qid))?;
        }
        self.ring
            .submit()
            .map_err(|e| format!("io_uring refused: queue {}: submit REGISTER: {e}", self.qid))?;
        self.fs.send(Event::Ready);
        let mut done = Vec::new();
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(format!("queue {}: io_uring_enter: {e}", self.qid)),
            }
            done.clear();
            done.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            for &(ud, res) in &done {
                let idx = (ud & (IO_BIT - 1)) as usize;
                if idx >= self.ents.len() {
                    continue;
                }
                let step = if ud & IO_BIT != 0 {
                    let reply = match self.ents[idx].io.take() {
                        Some(io) => io.finish(i64::from(res)),
                        None => Reply::Err(libc::EIO),
                    };
                    self.commit(idx, reply)
                } else if res >= 0 {
                    self.on_request(idx)
                } else if res == -libc::EAGAIN || res == -libc::EINTR {
                    let op = self.ents[idx].last_cmd;
                    self.submit_cmd(idx, op)
                } else if [libc::ENOTCONN, libc::ECONNABORTED, libc::ECANCELED].contains(&-res) {
                    // Unmounted: the kernel hands every entry back.
                    self.ents[idx].live = false;
                    Ok(())
                } else {
                    let what = if self.ents[idx].last_cmd == abi::URING_CMD_REGISTER {
                        "io_uring refused: FUSE_IO_URING_CMD_REGISTER"
                    } else {
                        "FUSE_IO_URING_CMD_COMMIT_AND_FETCH"
                    };
                    return Err(format!(
                        "queue {}: {what} failed: {}",
                        self.qid,
                        std::io::Error::from_raw_os_error(-res)
                    ));
                };
                step.map_err(|e| format!("queue {}: submit: {e}", self.qid))?;
            }
            if self.ents.iter().all(|e| !e.live) {
                return Ok(());
            }
        }
    }
}

/// How a queue thread runs.
#[derive(Debug, Clone, Copy)]
pub struct QueueOpts {
    /// Ring entries (requests of this queue in flight).
    pub depth: usize,
    /// Backing I/O inline instead of on the ring.
    pub sync_io: bool,
    /// Pin the thread to the queue's CPU.
    pub pin: bool,
}

/// The thread of queue `qid`: pinned to CPU `qid` (unless told not to),
/// registers its entries once INIT is answered, then serves until unmount.
pub fn serve_queue(fs: &Fs, dev: RawFd, qid: u16, opts: QueueOpts) {
    let QueueOpts {
        depth,
        sync_io,
        pin,
    } = opts;
    let res = (|| -> Result<(), String> {
        if pin {
            let mut cpus = rustix::thread::CpuSet::new();
            cpus.set(usize::from(qid));
            rustix::thread::sched_setaffinity(None, &cpus)
                .map_err(|e| format!("queue {qid}: pin to CPU {qid}: {e}"))?;
        }
        let entries = u32::try_from(depth * 2).unwrap_or(u32::MAX);
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .build(entries)
            .map_err(|e| format!("io_uring refused: io_uring_setup (SQE128): {e}"))?;
        if fs.wait_init() != InitState::Ready {
            return Ok(());
        }
        let payload = fs.max_payload();
        let mut q = Queue {
            fs,
            dev,
            qid,
            sync_io,
            ring,
            ents: (0..depth).map(|_| Ent::new(payload)).collect(),
        };
        q.run()
    })();
    if let Err(msg) = res {
        fs.fatal(msg);
    }
    fs.send(Event::WorkerDone);
}
