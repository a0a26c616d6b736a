//! The pass-through filesystem, independent of the transport: one backing
//! directory served flat (regular files only), just what fio and the bench
//! need. A request is answered at once ([`Action::Done`]) or, for the data
//! path (READ, WRITE, FSYNC), handed back as an [`Io`] that the transport runs:
//! synchronously on a /dev/fuse thread, or as an io_uring operation on the
//! queue's ring, so one ring thread keeps many requests in flight.

use crate::abi::{self, Fields, InHeader, Out};
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock};

/// Entry and attribute cache time (vmha-fs's TTL).
const TTL_SECS: u64 = 1;
/// Largest WRITE/READ (vmha-fs's MAX_WRITE).
pub const MAX_WRITE: u32 = 1 << 20;
/// vmha-fs's init: max_background 64, congestion threshold 48.
const MAX_BACKGROUND: u16 = 64;
const CONGESTION_THRESHOLD: u16 = 48;
/// O_DIRECT alignment of offsets, lengths and buffers.
const DIRECT_ALIGN: u64 = 512;

/// One request, whichever transport brought it: the in-header, the opcode's
/// fixed struct and what follows it (name, WRITE data).
#[derive(Debug)]
pub struct Request<'a> {
    pub h: InHeader,
    pub op: &'a [u8],
    pub payload: &'a [u8],
}

/// A reply body.
#[derive(Debug)]
pub enum Reply {
    /// Success with this body.
    Body(Vec<u8>),
    /// Success; the body is the first `n` bytes of the transport's I/O buffer
    /// (READ).
    InBuf(usize),
    /// An errno (positive).
    Err(i32),
    /// FORGET, INTERRUPT: no reply.
    None,
}

#[derive(Debug)]
pub enum Action {
    Done(Reply),
    Io(Io),
}

/// A backing-file operation of the data path.
#[derive(Debug)]
pub struct Io {
    pub handle: Arc<Handle>,
    pub kind: IoKind,
}

#[derive(Debug, Clone, Copy)]
pub enum IoKind {
    /// Write the request's payload (`len` bytes).
    Write {
        offset: u64,
        len: usize,
    },
    /// Read `len` bytes into the transport's I/O buffer.
    Read {
        offset: u64,
        len: usize,
    },
    Fsync {
        datasync: bool,
    },
}

impl Io {
    /// The descriptor for this I/O from/to a buffer at `addr`: the O_DIRECT one
    /// when everything is aligned, else the buffered twin (as vmha-fs does).
    pub fn fd(&self, addr: usize) -> RawFd {
        let (offset, len) = match self.kind {
            IoKind::Write { offset, len } | IoKind::Read { offset, len } => (offset, len as u64),
            IoKind::Fsync { .. } => return self.handle.file.as_raw_fd(),
        };
        match &self.handle.buffered {
            Some(b) if (offset | len | addr as u64) % DIRECT_ALIGN != 0 => b.as_raw_fd(),
            _ => self.handle.file.as_raw_fd(),
        }
    }

    /// The reply for the operation's result (bytes, or a negative errno).
    pub fn finish(&self, res: i64) -> Reply {
        if res < 0 {
            return Reply::Err(i32::try_from(-res).unwrap_or(libc::EIO));
        }
        let n = usize::try_from(res).unwrap_or(0);
        match self.kind {
            IoKind::Write { .. } => {
                let mut o = Out::with_capacity(8);
                o.u32(u32::try_from(n).unwrap_or(u32::MAX)).u32(0);
                Reply::Body(o.0)
            }
            IoKind::Read { .. } => Reply::InBuf(n),
            IoKind::Fsync { .. } => Reply::Body(Vec::new()),
        }
    }

    /// Runs the operation now. `data` is the WRITE payload; `buf` receives a
    /// READ (at least `len` bytes).
    pub fn run_sync(&self, data: &[u8], buf: &mut [u8]) -> Reply {
        let res = match self.kind {
            IoKind::Write { offset, len } => {
                let data = &data[..len.min(data.len())];
                let fd = self.fd(data.as_ptr() as usize);
                // SAFETY: fd belongs to self.handle, which outlives this call.
                let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
                rustix::io::pwrite(fd, data, offset).map(|n| n as i64)
            }
            IoKind::Read { offset, len } => {
                let buf_len = buf.len();
                let buf = &mut buf[..len.min(buf_len)];
                let fd = self.fd(buf.as_ptr() as usize);
                // SAFETY: fd belongs to self.handle, which outlives this call.
                let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
                rustix::io::pread(fd, buf, offset).map(|n| n as i64)
            }
            IoKind::Fsync { datasync } => {
                let fd = self.handle.file.as_fd();
                let synced = if datasync {
                    rustix::fs::fdatasync(fd)
                } else {
                    rustix::fs::fsync(fd)
                };
                synced.map(|()| 0)
            }
        };
        self.finish(res.unwrap_or_else(|e| -i64::from(e.raw_os_error())))
    }
}

/// An open file: the descriptor as asked (O_DIRECT kept), and for O_DIRECT a
/// buffered twin for unaligned requests.
#[derive(Debug)]
pub struct Handle {
    file: File,
    buffered: Option<File>,
}

#[derive(Debug, Default)]
struct Nodes {
    by_name: HashMap<OsString, u64>,
    /// nodeid → (name, lookup count).
    by_id: HashMap<u64, (OsString, u64)>,
    next: u64,
}

/// What INIT settled, for the transports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitState {
    Waiting,
    /// Replied; io_uring was negotiated (or not asked for).
    Ready,
    /// The kernel refused what we need; the reason is in the fatal event.
    Failed,
}

/// Something the main thread must know.
#[derive(Debug)]
pub enum Event {
    /// SIGTERM/SIGINT.
    Signal,
    /// The probe cannot go on.
    Fatal(String),
    /// A worker thread ended (unmounted, or an error it logged).
    WorkerDone,
    /// `dev`: INIT answered; `uring`: one queue registered its entries.
    Ready,
}

#[derive(Debug)]
pub struct Fs {
    root: PathBuf,
    /// Ask for FUSE_OVER_IO_URING at INIT.
    want_uring: bool,
    nodes: Mutex<Nodes>,
    handles: RwLock<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    init: Mutex<InitState>,
    init_cv: Condvar,
    /// The kernel's ring payload size for this connection (set at INIT):
    /// max(8 KiB, max_write, max_pages pages).
    max_payload: AtomicUsize,
    events: Mutex<std::sync::mpsc::Sender<Event>>,
    /// Requests served per transport (the exit line; the tests check that the
    /// ring carried the traffic).
    pub dev_requests: AtomicU64,
    pub ring_requests: AtomicU64,
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// A name argument: the bytes up to the NUL.
fn name_arg(payload: &[u8]) -> Option<&OsStr> {
    let end = payload.iter().position(|b| *b == 0)?;
    let name = &payload[..end];
    if name.is_empty() || name.contains(&b'/') || name == b"." || name == b".." {
        return None;
    }
    Some(OsStr::from_bytes(name))
}

fn attr_out(ino: u64, md: &std::fs::Metadata) -> Vec<u8> {
    let mut o = Out::with_capacity(104);
    o.u64(TTL_SECS).u32(0).u32(0);
    abi::put_attr(&mut o, ino, md);
    o.0
}

fn put_entry(o: &mut Out, ino: u64, md: &std::fs::Metadata) {
    o.u64(ino).u64(0).u64(TTL_SECS).u64(TTL_SECS).u32(0).u32(0);
    abi::put_attr(o, ino, md);
}

fn empty() -> Action {
    Action::Done(Reply::Body(Vec::new()))
}

fn fail(e: i32) -> Action {
    Action::Done(Reply::Err(e))
}

impl Fs {
    pub fn new(root: PathBuf, want_uring: bool, events: std::sync::mpsc::Sender<Event>) -> Self {
        Self {
            root,
            want_uring,
            nodes: Mutex::new(Nodes {
                next: abi::ROOT_ID + 1,
                ..Nodes::default()
            }),
            handles: RwLock::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            init: Mutex::new(InitState::Waiting),
            init_cv: Condvar::new(),
            max_payload: AtomicUsize::new(MAX_WRITE as usize),
            events: Mutex::new(events),
            dev_requests: AtomicU64::new(0),
            ring_requests: AtomicU64::new(0),
        }
    }

    pub fn send(&self, ev: Event) {
        let tx = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        // The main thread gone means we are exiting anyway.
        let _ = tx.send(ev);
    }

    pub fn fatal(&self, msg: String) {
        self.set_init(InitState::Failed);
        self.send(Event::Fatal(msg));
    }

    fn set_init(&self, st: InitState) {
        let mut s = self.init.lock().unwrap_or_else(PoisonError::into_inner);
        if *s == InitState::Waiting {
            *s = st;
        }
        self.init_cv.notify_all();
    }

    /// Called by the /dev/fuse thread once the INIT reply is written: the
    /// connection is initialized, rings may register now.
    pub fn init_replied(&self, ok: bool) {
        self.set_init(if ok {
            InitState::Ready
        } else {
            InitState::Failed
        });
        if ok && !self.want_uring {
            self.send(Event::Ready);
        }
    }

    /// Blocks until INIT was answered.
    pub fn wait_init(&self) -> InitState {
        let mut s = self.init.lock().unwrap_or_else(PoisonError::into_inner);
        while *s == InitState::Waiting {
            s = self.init_cv.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        *s
    }

    /// Bytes a ring entry's payload buffer must hold (valid after INIT).
    pub fn max_payload(&self) -> usize {
        self.max_payload.load(Ordering::Relaxed)
    }

    fn name_of(&self, nodeid: u64) -> Option<OsString> {
        let n = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        n.by_id.get(&nodeid).map(|(name, _)| name.clone())
    }

    /// The nodeid of `name`, counting one more kernel reference.
    fn reference(&self, name: &OsStr) -> u64 {
        let mut n = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        let id = match n.by_name.get(name) {
            Some(id) => *id,
            None => {
                let id = n.next;
                n.next += 1;
                n.by_name.insert(name.to_owned(), id);
                n.by_id.insert(id, (name.to_owned(), 0));
                id
            }
        };
        if let Some(e) = n.by_id.get_mut(&id) {
            e.1 += 1;
        }
        id
    }

    fn forget(&self, id: u64, count: u64) {
        let mut n = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        let gone = match n.by_id.get_mut(&id) {
            Some(e) => {
                e.1 = e.1.saturating_sub(count);
                (e.1 == 0).then(|| e.0.clone())
            }
            None => None,
        };
        if let Some(name) = gone {
            n.by_id.remove(&id);
            if n.by_name.get(&name) == Some(&id) {
                n.by_name.remove(&name);
            }
        }
    }

    fn handle(&self, fh: u64) -> Option<Arc<Handle>> {
        let h = self.handles.read().unwrap_or_else(PoisonError::into_inner);
        h.get(&fh).cloned()
    }

    fn metadata(&self, nodeid: u64) -> Result<std::fs::Metadata, i32> {
        let path = if nodeid == abi::ROOT_ID {
            self.root.clone()
        } else {
            self.root.join(self.name_of(nodeid).ok_or(libc::ENOENT)?)
        };
        std::fs::symlink_metadata(path).map_err(|e| errno(&e))
    }

    /// Opens `name` as the kernel asked: O_DIRECT and the sync flags kept.
    fn open_file(&self, name: &OsStr, flags: u32, create: Option<u32>) -> Result<u64, i32> {
        let flags = flags as i32;
        let mut oo = OpenOptions::new();
        oo.read(true);
        if flags & libc::O_ACCMODE != libc::O_RDONLY {
            oo.write(true);
        }
        if let Some(mode) = create {
            if flags & libc::O_EXCL != 0 {
                oo.create_new(true);
            } else {
                oo.create(true);
            }
            oo.mode(mode & 0o7777);
            if flags & libc::O_TRUNC != 0 {
                oo.truncate(true);
            }
        }
        let keep = flags & (libc::O_DIRECT | libc::O_SYNC | libc::O_DSYNC);
        let direct = flags & libc::O_DIRECT != 0;
        let path = self.root.join(name);
        let file = oo.custom_flags(keep).open(&path).map_err(|e| errno(&e))?;
        let buffered = if direct {
            let mut twin = OpenOptions::new();
            twin.read(true)
                .write(flags & libc::O_ACCMODE != libc::O_RDONLY);
            Some(
                twin.custom_flags(keep & !libc::O_DIRECT)
                    .open(&path)
                    .map_err(|e| errno(&e))?,
            )
        } else {
            None
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(fh, Arc::new(Handle { file, buffered }));
        Ok(fh)
    }

    fn put_open(o: &mut Out, fh: u64, direct: bool) {
        let flags = if direct {
            abi::FOPEN_DIRECT_IO | abi::FOPEN_PARALLEL_DIRECT_WRITES
        } else {
            0
        };
        o.u64(fh).u32(flags).u32(0);
    }

    /// INIT: vmha-fs's settings (fuser's defaults plus what vmha-fs adds), and
    /// FUSE_OVER_IO_URING when the ring transport runs.
    fn init(&self, op: &[u8]) -> Action {
        let f = Fields(op);
        let (major, minor, max_readahead) = (f.u32(0), f.u32(4), f.u32(8));
        let offered = u64::from(f.u32(12)) | (u64::from(f.u32(16)) << 32);
        if major != abi::KERNEL_MAJOR || minor < abi::MIN_MINOR {
            self.fatal(format!(
                "kernel FUSE protocol {major}.{minor} is too old (need 7.{} or later)",
                abi::MIN_MINOR
            ));
            return fail(libc::EPROTO);
        }
        let mut want = abi::ASYNC_READ
            | abi::BIG_WRITES
            | abi::MAX_PAGES
            | abi::INIT_EXT
            | abi::ASYNC_DIO
            | abi::PARALLEL_DIROPS
            | abi::DIRECT_IO_ALLOW_MMAP;
        if self.want_uring {
            if offered & abi::OVER_IO_URING == 0 {
                self.fatal(
                    "io_uring refused: the kernel did not offer FUSE_OVER_IO_URING at INIT \
                     (/sys/module/fuse/parameters/enable_uring is N, or the kernel lacks \
                     CONFIG_FUSE_IO_URING)"
                        .to_owned(),
                );
                return fail(libc::EPROTO);
            }
            want |= abi::OVER_IO_URING;
        }
        let flags = want & offered;
        // fuser: max_pages covers max(max_write, max_readahead).
        let page = 4096u32;
        let max_pages = (MAX_WRITE.max(max_readahead) - 1) / page + 1;
        self.max_payload.store(
            (max_pages * page).max(MAX_WRITE).max(8192) as usize,
            Ordering::Relaxed,
        );
        let mut o = Out::with_capacity(64);
        o.u32(abi::KERNEL_MAJOR)
            .u32(minor)
            .u32(max_readahead)
            .u32(flags as u32)
            .u16(MAX_BACKGROUND)
            .u16(CONGESTION_THRESHOLD)
            .u32(MAX_WRITE)
            .u32(1)
            .u16(u16::try_from(max_pages).unwrap_or(u16::MAX))
            .u16(0)
            .u32((flags >> 32) as u32)
            // max_stack_depth, request_timeout, unused[11]
            .zeroes(28);
        Action::Done(Reply::Body(o.0))
    }

    /// Answers one request (see [`Action`]).
    pub fn dispatch(&self, req: &Request<'_>) -> Action {
        let h = req.h;
        if req.op.len() < abi::op_header_len(h.opcode) {
            return fail(libc::EINVAL);
        }
        let f = Fields(req.op);
        match h.opcode {
            abi::INIT => self.init(req.op),
            abi::DESTROY | abi::FLUSH | abi::ACCESS | abi::RELEASEDIR => empty(),
            abi::FORGET => {
                self.forget(h.nodeid, f.u64(0));
                Action::Done(Reply::None)
            }
            abi::BATCH_FORGET => {
                let count = f.u32(0) as usize;
                for one in req.payload.chunks_exact(16).take(count) {
                    let one = Fields(one);
                    self.forget(one.u64(0), one.u64(8));
                }
                Action::Done(Reply::None)
            }
            abi::INTERRUPT => Action::Done(Reply::None),
            abi::LOOKUP => self.lookup(h.nodeid, req.payload),
            abi::GETATTR => match self.metadata(h.nodeid) {
                Ok(md) => Action::Done(Reply::Body(attr_out(h.nodeid, &md))),
                Err(e) => fail(e),
            },
            abi::SETATTR => self.setattr(h.nodeid, f),
            abi::OPEN => {
                let Some(name) = self.name_of(h.nodeid) else {
                    return fail(libc::ENOENT);
                };
                let flags = f.u32(0);
                match self.open_file(&name, flags, None) {
                    Ok(fh) => {
                        let mut o = Out::with_capacity(16);
                        Self::put_open(&mut o, fh, flags as i32 & libc::O_DIRECT != 0);
                        Action::Done(Reply::Body(o.0))
                    }
                    Err(e) => fail(e),
                }
            }
            abi::CREATE => self.create(h.nodeid, f, req.payload),
            abi::UNLINK => {
                if h.nodeid != abi::ROOT_ID {
                    return fail(libc::ENOENT);
                }
                let Some(name) = name_arg(req.payload) else {
                    return fail(libc::EINVAL);
                };
                match std::fs::remove_file(self.root.join(name)) {
                    Ok(()) => {
                        let mut n = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
                        n.by_name.remove(name);
                        empty()
                    }
                    Err(e) => fail(errno(&e)),
                }
            }
            abi::READ | abi::WRITE => {
                let Some(handle) = self.handle(f.u64(0)) else {
                    return fail(libc::EBADF);
                };
                let (offset, len) = (f.u64(8), f.u32(16) as usize);
                if len > MAX_WRITE as usize {
                    return fail(libc::EINVAL);
                }
                let kind = if h.opcode == abi::READ {
                    IoKind::Read { offset, len }
                } else {
                    if req.payload.len() < len {
                        return fail(libc::EINVAL);
                    }
                    IoKind::Write { offset, len }
                };
                Action::Io(Io { handle, kind })
            }
            abi::FSYNC => match self.handle(f.u64(0)) {
                Some(handle) => Action::Io(Io {
                    handle,
                    kind: IoKind::Fsync {
                        datasync: f.u32(8) & abi::FSYNC_FDATASYNC != 0,
                    },
                }),
                None => fail(libc::EBADF),
            },
            abi::RELEASE => {
                self.handles
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&f.u64(0));
                empty()
            }
            abi::FALLOCATE => {
                let Some(handle) = self.handle(f.u64(0)) else {
                    return fail(libc::EBADF);
                };
                let mode = rustix::fs::FallocateFlags::from_bits_retain(f.u32(24));
                match rustix::fs::fallocate(&handle.file, mode, f.u64(8), f.u64(16)) {
                    Ok(()) => empty(),
                    Err(e) => fail(e.raw_os_error()),
                }
            }
            abi::STATFS => self.statfs(),
            abi::OPENDIR => {
                if h.nodeid != abi::ROOT_ID {
                    return fail(libc::ENOTDIR);
                }
                let mut o = Out::with_capacity(16);
                Self::put_open(&mut o, 0, false);
                Action::Done(Reply::Body(o.0))
            }
            abi::READDIR => self.readdir(f.u64(8), f.u32(16) as usize),
            _ => fail(libc::ENOSYS),
        }
    }

    fn lookup(&self, parent: u64, payload: &[u8]) -> Action {
        if parent != abi::ROOT_ID {
            return fail(libc::ENOENT);
        }
        let Some(name) = name_arg(payload) else {
            return fail(libc::ENOENT);
        };
        match self.entry(name) {
            Ok(o) => Action::Done(Reply::Body(o.0)),
            Err(e) => fail(e),
        }
    }

    /// `struct fuse_entry_out` of `name`, counting one more kernel reference.
    fn entry(&self, name: &OsStr) -> Result<Out, i32> {
        let md = std::fs::symlink_metadata(self.root.join(name)).map_err(|e| errno(&e))?;
        let id = self.reference(name);
        let mut o = Out::with_capacity(144);
        put_entry(&mut o, id, &md);
        Ok(o)
    }

    fn setattr(&self, nodeid: u64, f: Fields<'_>) -> Action {
        let valid = f.u32(0);
        let path = match self.name_of(nodeid) {
            Some(name) => self.root.join(name),
            None if nodeid == abi::ROOT_ID => self.root.clone(),
            None => return fail(libc::ENOENT),
        };
        if valid & abi::FATTR_SIZE != 0 {
            let size = f.u64(16);
            let res = match self.handle(f.u64(8)).filter(|_| valid & abi::FATTR_FH != 0) {
                Some(h) => h.file.set_len(size),
                None => OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|file| file.set_len(size)),
            };
            if let Err(e) = res {
                return fail(errno(&e));
            }
        }
        if valid & abi::FATTR_MODE != 0 {
            let perm = std::fs::Permissions::from_mode(f.u32(68) & 0o7777);
            if let Err(e) = std::fs::set_permissions(&path, perm) {
                return fail(errno(&e));
            }
        }
        // Owners and times are not needed by fio: the attributes as they are.
        match std::fs::symlink_metadata(&path) {
            Ok(md) => Action::Done(Reply::Body(attr_out(nodeid, &md))),
            Err(e) => fail(errno(&e)),
        }
    }

    fn create(&self, parent: u64, f: Fields<'_>, payload: &[u8]) -> Action {
        if parent != abi::ROOT_ID {
            return fail(libc::ENOENT);
        }
        let Some(name) = name_arg(payload) else {
            return fail(libc::EINVAL);
        };
        let (flags, mode, umask) = (f.u32(0), f.u32(4), f.u32(8));
        let fh = match self.open_file(name, flags, Some(mode & !umask)) {
            Ok(fh) => fh,
            Err(e) => return fail(e),
        };
        match self.entry(name) {
            Ok(mut o) => {
                Self::put_open(&mut o, fh, flags as i32 & libc::O_DIRECT != 0);
                Action::Done(Reply::Body(o.0))
            }
            Err(e) => fail(e),
        }
    }

    fn statfs(&self) -> Action {
        match rustix::fs::statvfs(&self.root) {
            Ok(s) => {
                let u32_of = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
                let mut o = Out::with_capacity(80);
                o.u64(s.f_blocks)
                    .u64(s.f_bfree)
                    .u64(s.f_bavail)
                    .u64(s.f_files)
                    .u64(s.f_ffree)
                    .u32(u32_of(s.f_bsize))
                    .u32(u32_of(s.f_namemax))
                    .u32(u32_of(s.f_frsize))
                    .u32(0)
                    .zeroes(24);
                Action::Done(Reply::Body(o.0))
            }
            Err(e) => fail(e.raw_os_error()),
        }
    }

    /// `struct fuse_dirent`s from entry `offset` on, up to `size` bytes.
    fn readdir(&self, offset: u64, size: usize) -> Action {
        let mut entries: Vec<(u64, u32, OsString)> = vec![
            (abi::ROOT_ID, libc::DT_DIR.into(), ".".into()),
            (abi::ROOT_ID, libc::DT_DIR.into(), "..".into()),
        ];
        let dir = match std::fs::read_dir(&self.root) {
            Ok(d) => d,
            Err(e) => return fail(errno(&e)),
        };
        for e in dir.flatten() {
            let kind = match e.file_type() {
                Ok(t) if t.is_dir() => libc::DT_DIR,
                Ok(t) if t.is_file() => libc::DT_REG,
                _ => libc::DT_UNKNOWN,
            };
            let ino = e.metadata().map(|m| m.ino()).unwrap_or(0);
            entries.push((ino, kind.into(), e.file_name()));
        }
        let mut o = Out::with_capacity(size.min(64 << 10));
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(skip) {
            let name = name.as_bytes();
            let rec = (24 + name.len()).next_multiple_of(8);
            if o.0.len() + rec > size {
                break;
            }
            let start = o.0.len();
            o.u64(*ino)
                .u64(i as u64 + 1)
                .u32(u32::try_from(name.len()).unwrap_or(0))
                .u32(*kind)
                .bytes(name);
            o.zeroes(rec - (o.0.len() - start));
        }
        Action::Done(Reply::Body(o.0))
    }
}
