//! The FUSE filesystem served on the primary: reads are local; every mutation is
//! applied locally and replicated through the `PeerLink`, and the kernel gets its reply
//! only when both are done.
//!
//! Ordering: namespace and metadata operations are applied and queued under one
//! namespace lock; data operations under per-file range locks. Either way the
//! sequence number is taken while the local change is ordered, so the peer, which
//! applies in sequence order, ends in the same state.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    FileAttr, FileHandle, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use parking_lot::{Mutex, RwLock};
use rustix::fs::{FileType, OFlags, SeekFrom};

use crate::apply::{self, Applied, Errno, NodeTable};
use crate::buffer::{AlignedBuf, Payload};
use crate::fdio::{fd_path, read_full, sync_fd};
use crate::inodes::{Inodes, Node};
use crate::link::PeerLink;
use crate::op::{LinkTarget, Name, NewNode, NodeId, NodeKind, Op, Time, XattrValue};
use crate::presync::Answered;
use crate::primary::{DiskHealth, Repair, Replicator};
use crate::track::Tracker;
use crate::writeback::{Flusher, LocalWrites};

const TTL: Duration = Duration::from_secs(1);
/// The xattrs where libvirt remembers a file's original owner.
const LIBVIRT_LABELS: &[u8] = b"trusted.libvirt.security.";
const MAX_WRITE: u32 = 1 << 20;
const DIRECT_ALIGN: u64 = 512;

fn fuse_err(e: Errno) -> fuser::Errno {
    fuser::Errno::from_i32(e.raw_os_error())
}

/// An open file.
#[derive(Debug)]
struct Handle {
    node: Arc<Node>,
    fd: OwnedFd,
    /// Opened with O_DIRECT: aligned I/O goes to `fd`, the rest to a buffered twin.
    direct: bool,
    /// Opened with O_SYNC/O_DSYNC: every write is also synced on the peer.
    sync: bool,
    /// Writes go through the buffered twin (opened with the handle), their
    /// writeback started by the flusher (`LocalWrites::Cached`): O_DIRECT, not
    /// O_SYNC/O_DSYNC.
    cached: bool,
    buffered: Mutex<Option<Arc<OwnedFd>>>,
    /// Where the last write through this handle ended: a write starting there
    /// is sequential (its next extents go into the activity log with it).
    write_end: AtomicU64,
}

impl Handle {
    fn buffered_fd(&self) -> Result<Arc<OwnedFd>, Errno> {
        let mut slot = self.buffered.lock();
        if let Some(fd) = slot.as_ref() {
            return Ok(fd.clone());
        }
        let fd = Arc::new(apply::reopen(self.node.fd.as_fd(), OFlags::RDWR)?);
        *slot = Some(fd.clone());
        Ok(fd)
    }

    fn io_fd(&self, offset: u64, len: usize) -> Result<IoFd<'_>, Errno> {
        let aligned = offset % DIRECT_ALIGN == 0 && len as u64 % DIRECT_ALIGN == 0;
        if !self.direct || aligned {
            Ok(IoFd::Main(self.fd.as_fd()))
        } else {
            Ok(IoFd::Buffered(self.buffered_fd()?))
        }
    }
}

/// Syncs every descriptor `h` wrote through, the main one opened with the
/// file first: a writeback error since then is reported there, never only to a
/// descriptor opened after it (the fsync-after-EIO trap).
fn sync_handle(h: &Handle, datasync: bool) -> Result<(), Errno> {
    if h.cached {
        // Every write went through the twin, opened with the file: its sync
        // writes and flushes them and reports every writeback error since
        // the open (one sync, one flush of the disk, not two).
        if let Some(twin) = h.buffered.lock().as_ref() {
            return sync_fd(twin.as_fd(), datasync);
        }
    }
    sync_fd(h.fd.as_fd(), datasync)?;
    match h.buffered.lock().as_ref() {
        Some(twin) => sync_fd(twin.as_fd(), datasync),
        None => Ok(()),
    }
}

enum IoFd<'a> {
    Main(BorrowedFd<'a>),
    Buffered(Arc<OwnedFd>),
}

impl IoFd<'_> {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            IoFd::Main(fd) => *fd,
            IoFd::Buffered(fd) => fd.as_fd(),
        }
    }
}

/// The kind of node a create-like request makes.
enum NewEntry {
    File { kind: NodeKind, rdev: u64 },
    Dir,
    Symlink(LinkTarget),
}

/// What a setattr request asks to change.
struct AttrChange {
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
    size: Option<u64>,
    atime: Option<TimeOrNow>,
    mtime: Option<TimeOrNow>,
}

#[derive(Debug)]
struct DirItem {
    name: Vec<u8>,
    ino: u64,
    kind: fuser::FileType,
}

/// An open directory: a snapshot of its entries (served by offset) and a descriptor
/// for fsyncdir.
type OpenDir = (Arc<Vec<DirItem>>, Arc<OwnedFd>);

/// The writer behind a mount, set once. Absent while the mount is in standby
/// (`vmha-fs primary --standby`: the destination of a live swap, whose
/// receiver still applies the old writer's changes underneath): then opens
/// and reads are served, and every change fails with EROFS.
pub type WriterSlot = Arc<OnceLock<Arc<Replicator>>>;

/// What turns a standby mount into a writer in place ([`Activation::install`]):
/// the filesystem's own inode table, namespace lock and writer slot, shared
/// with the FUSE session, so handles opened in standby stay valid.
#[derive(Debug, Clone)]
pub struct Activation {
    inodes: Arc<Inodes>,
    namespace: Arc<RwLock<()>>,
    writer: WriterSlot,
    metrics: Arc<super::metrics::PrimaryMetrics>,
    root_path: Vec<u8>,
    max_size: u64,
}

/// The replicated filesystem.
#[derive(Debug)]
pub struct ReplicatedFs {
    inodes: Arc<Inodes>,
    /// Where every mutation goes (order, record, send, apply, join, settle);
    /// empty while in standby.
    writer: WriterSlot,
    /// The write path's counters (the replicator's, kept from the start).
    metrics: Arc<super::metrics::PrimaryMetrics>,
    namespace: Arc<RwLock<()>>,
    root_path: Vec<u8>,
    max_size: u64,
    handles: RwLock<HashMap<u64, Arc<Handle>>>,
    dirs: Mutex<HashMap<u64, OpenDir>>,
    next_fh: AtomicU64,
    /// Starts the writeback of cached writes (`LocalWrites::Cached`).
    flusher: Option<Flusher>,
}

/// A count FUSE carries in 32 bits. Writes and copies are bounded far below
/// (the kernel caps a request at `UINT_MAX & PAGE_MASK`); sizes the kernel
/// would not take saturate rather than wrap.
fn clamp_u32<T: TryInto<u32>>(v: T) -> u32 {
    v.try_into().unwrap_or(u32::MAX)
}

fn to_system_time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec.unsigned_abs(), u32::try_from(nsec).unwrap_or(0))
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + Duration::from_nanos(nsec as u64)
    }
}

fn to_time(t: SystemTime) -> Time {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Time {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            let (sec, nsec) = if d.subsec_nanos() == 0 {
                (-(d.as_secs() as i64), 0)
            } else {
                (-(d.as_secs() as i64) - 1, 1_000_000_000 - d.subsec_nanos())
            };
            Time { sec, nsec }
        }
    }
}

fn fuse_kind(kind: FileType) -> fuser::FileType {
    match kind {
        FileType::Directory => fuser::FileType::Directory,
        FileType::Symlink => fuser::FileType::Symlink,
        FileType::Fifo => fuser::FileType::NamedPipe,
        FileType::Socket => fuser::FileType::Socket,
        FileType::CharacterDevice => fuser::FileType::CharDevice,
        FileType::BlockDevice => fuser::FileType::BlockDevice,
        _ => fuser::FileType::RegularFile,
    }
}

fn attr_of(id: NodeId, st: &rustix::fs::Stat) -> FileAttr {
    FileAttr {
        ino: INodeNo(id),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: to_system_time(st.st_atime, st.st_atime_nsec as i64),
        mtime: to_system_time(st.st_mtime, st.st_mtime_nsec as i64),
        ctime: to_system_time(st.st_ctime, st.st_ctime_nsec as i64),
        crtime: UNIX_EPOCH,
        kind: fuse_kind(FileType::from_raw_mode(st.st_mode)),
        perm: u16::try_from(st.st_mode & 0o7777).unwrap_or(0),
        nlink: clamp_u32(st.st_nlink),
        uid: st.st_uid,
        gid: st.st_gid,
        // The kernel's dev_t is 32 bits (12-bit major, 20-bit minor), and for
        // those glibc's 64-bit encoding keeps the same low 32 bits.
        rdev: u32::try_from(st.st_rdev & 0xffff_ffff).unwrap_or(0),
        blksize: clamp_u32(st.st_blksize),
        flags: 0,
    }
}

fn name_of(name: &OsStr) -> Result<Name, Errno> {
    Name::new(name.as_bytes()).map_err(|_| Errno::INVAL)
}

/// How a fallocate one side alone refused is undone: data modes (punch, zero)
/// by zeroing the range on both sides, allocation by equal sizes; modes that
/// shift data (collapse, insert) cannot be, so the failed side is behind.
fn fallocate_repair(id: NodeId, mode: i32, offset: u64, len: u64) -> Repair {
    let shifts = libc::FALLOC_FL_COLLAPSE_RANGE | libc::FALLOC_FL_INSERT_RANGE;
    let data = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
    if mode & shifts != 0 {
        Repair::None
    } else if mode & data != 0 {
        Repair::Range { id, offset, len }
    } else {
        Repair::Size { id }
    }
}

impl Activation {
    /// Whether the mount is still in standby.
    pub fn is_standby(&self) -> bool {
        self.writer.get().is_none()
    }

    /// Makes the mount a writer through `link` (connected or alone), in place.
    /// Connected, every node the kernel holds is first named to the peer's
    /// receiver (`Bind`, top down) under the namespace lock, so operations on
    /// handles opened in standby name the same files there; nothing else is
    /// sent (the copies are identical: the caller guarantees it). Returns the
    /// writer, or the one installed before.
    pub fn install(
        &self,
        link: PeerLink,
        tracker: Arc<Tracker>,
        disk: Arc<DiskHealth>,
    ) -> Result<Arc<Replicator>, Errno> {
        let _no_lookups = self.namespace.write();
        if let Some(writer) = self.writer.get() {
            return Ok(writer.clone());
        }
        let repl = Replicator::new(
            self.inodes.clone(),
            link.clone(),
            tracker,
            disk,
            self.root_path.clone(),
            self.max_size,
            self.metrics.clone(),
        );
        if link.state().replicates() {
            let bound = self.bind_held(&link)?;
            let held = self.inodes.len().saturating_sub(1);
            if bound < held {
                // Unlinked while open, or renamed underneath: not reachable by
                // a name, so the peer cannot resolve it; a change to one fails
                // there (the peer is then outdated, as for any divergence).
                tracing::warn!(
                    bound,
                    held,
                    "some nodes the kernel holds have no name to bind"
                );
            }
            tracing::info!(bound, "named the nodes the kernel holds to the peer");
        }
        let _ = self.writer.set(repl.clone());
        Ok(repl)
    }

    /// Walks the tree from the root into the directories the kernel holds and
    /// binds every node it holds (its parent first). Called with the namespace
    /// lock held: no lookup, so no new node, meanwhile.
    fn bind_held(&self, link: &PeerLink) -> Result<usize, Errno> {
        use rustix::fs::{AtFlags, Mode};
        let mut bound = std::collections::HashSet::new();
        // Nodes, not ids: a directory the kernel forgets meanwhile is still
        // walked (its Bind went out before its Forget).
        let mut dirs = vec![self.inodes.get(crate::op::ROOT)?];
        while let Some(dir) = dirs.pop() {
            let dir_id = dir.id;
            let listing = apply::reopen(dir.fd.as_fd(), OFlags::RDONLY | OFlags::DIRECTORY)?;
            let mut names = Vec::new();
            let mut entries = rustix::fs::Dir::read_from(listing.as_fd())?;
            while let Some(entry) = entries.read() {
                let raw = entry?.file_name().to_bytes().to_vec();
                if raw != b"." && raw != b".." {
                    names.push(raw);
                }
            }
            for raw in names {
                let Ok(st) =
                    rustix::fs::statat(dir.fd.as_fd(), raw.as_slice(), AtFlags::SYMLINK_NOFOLLOW)
                else {
                    continue;
                };
                if !self.inodes.knows(&st) {
                    continue;
                }
                let Ok(name) = Name::new(raw.clone()) else {
                    continue;
                };
                let Ok(fd) = rustix::fs::openat(
                    dir.fd.as_fd(),
                    raw.as_slice(),
                    OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                ) else {
                    continue;
                };
                // A reference of our own while the Bind is queued: a forget
                // meanwhile cannot send its Forget before our Bind.
                let node = self.inodes.reference(fd, |_| {})?;
                if bound.insert(node.id) {
                    link.submit_nowait(Op::Bind {
                        id: node.id,
                        parent: dir_id,
                        name,
                    });
                    if node.kind == FileType::Directory {
                        dirs.push(node.clone());
                    }
                }
                if self.inodes.release_refs(node.id, 1) {
                    link.submit_nowait(Op::Forget { id: node.id });
                }
            }
        }
        Ok(bound.len())
    }

    /// A syncer (attach, resync, verify) for the installed writer.
    pub fn syncer(
        &self,
        repl: &Replicator,
        progress: Arc<crate::resync::SyncProgress>,
    ) -> crate::resync::Syncer {
        crate::resync::Syncer::new(
            self.inodes.clone(),
            self.namespace.clone(),
            repl.link.clone(),
            progress,
            repl.tracker.clone(),
            repl.changed.clone(),
        )
    }
}

impl ReplicatedFs {
    pub fn new(
        root: OwnedFd,
        link: PeerLink,
        tracker: Arc<Tracker>,
        disk: Arc<DiskHealth>,
        local_writes: LocalWrites,
    ) -> Result<Self, Errno> {
        let fs = Self::standby(root, local_writes)?;
        fs.activation().install(link, tracker, disk)?;
        Ok(fs)
    }

    /// A filesystem in standby: opens and reads are served from the backing
    /// directory (which the node's receiver keeps changing), every change
    /// fails with EROFS until [`Activation::install`].
    pub fn standby(root: OwnedFd, local_writes: LocalWrites) -> Result<Self, Errno> {
        let root_path = fd_path(root.as_fd())?;
        // The largest file the backing filesystem accepts: a change reaching past
        // it fails with EFBIG before anything is recorded.
        let max_size = apply::max_file_size(root.as_fd());
        tracing::debug!(max_size, "largest file the backing filesystem accepts");
        let inodes = Arc::new(Inodes::new(root)?);
        let flusher = match local_writes {
            LocalWrites::Cached => Some(Flusher::start().map_err(|e| {
                tracing::error!("cannot start the writeback thread: {e}");
                Errno::IO
            })?),
            LocalWrites::Direct => None,
        };
        Ok(Self {
            flusher,
            writer: Arc::default(),
            metrics: Arc::default(),
            inodes,
            root_path,
            max_size,
            namespace: Arc::new(RwLock::new(())),
            handles: RwLock::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
        })
    }

    /// The handle that activates this filesystem (shared with it).
    pub fn activation(&self) -> Activation {
        Activation {
            inodes: self.inodes.clone(),
            namespace: self.namespace.clone(),
            writer: self.writer.clone(),
            metrics: self.metrics.clone(),
            root_path: self.root_path.clone(),
            max_size: self.max_size,
        }
    }

    /// The write path's counters (published in `metrics.json`).
    pub(crate) fn metrics(&self) -> Arc<super::metrics::PrimaryMetrics> {
        self.metrics.clone()
    }

    /// The writer; EROFS while in standby (no change may happen then).
    fn repl(&self) -> Result<&Arc<Replicator>, Errno> {
        self.writer.get().ok_or(Errno::ROFS)
    }

    /// How long the kernel may keep names and attributes: not at all in
    /// standby, where the receiver changes files underneath (sizes grow while
    /// the old writer writes).
    fn ttl(&self) -> Duration {
        if self.writer.get().is_some() {
            TTL
        } else {
            Duration::ZERO
        }
    }

    /// In standby, libvirt's remembered-owner attributes
    /// (`trusted.libvirt.security.*`, `remember_owner = 1`, Debian's default)
    /// are "not supported" (ENOTSUP): the destination's libvirt then skips
    /// remembering (its refcount would be a change, EROFS, and fail the
    /// incoming migration) and relabels to the owner the file already has.
    fn hide_libvirt_label(&self, name: &OsStr) -> Result<(), Errno> {
        if self.writer.get().is_none() && name.as_bytes().starts_with(LIBVIRT_LABELS) {
            Err(Errno::NOTSUP)
        } else {
            Ok(())
        }
    }

    /// A setattr in standby: allowed only when it changes nothing (libvirt
    /// relabels an image by chown/chmod to what it already is).
    fn standby_setattr(&self, node: &Node, change: &AttrChange) -> Result<FileAttr, Errno> {
        let st = rustix::fs::fstat(node.fd.as_fd())?;
        let same_time = |t: Option<TimeOrNow>, sec: i64, nsec: i64| match t {
            None => true,
            Some(TimeOrNow::Now) => false,
            Some(TimeOrNow::SpecificTime(t)) => {
                let t = to_time(t);
                t.sec == sec && i64::from(t.nsec) == nsec
            }
        };
        let unchanged = change
            .mode
            .is_none_or(|m| m & 0o7777 == st.st_mode & 0o7777)
            && change.uid.is_none_or(|u| u == st.st_uid)
            && change.gid.is_none_or(|g| g == st.st_gid)
            && change.size.is_none_or(|s| s == st.st_size as u64)
            && same_time(change.atime, st.st_atime, st.st_atime_nsec as i64)
            && same_time(change.mtime, st.st_mtime, st.st_mtime_nsec as i64);
        if unchanged {
            Ok(attr_of(node.id, &st))
        } else {
            Err(Errno::ROFS)
        }
    }

    fn handle(&self, fh: FileHandle) -> Result<Arc<Handle>, Errno> {
        self.handles.read().get(&fh.0).cloned().ok_or(Errno::BADF)
    }

    fn entry_attr(&self, node: &Node) -> Result<FileAttr, Errno> {
        let st = rustix::fs::fstat(node.fd.as_fd())?;
        Ok(attr_of(node.id, &st))
    }

    fn replicate_namespace(&self, what: &'static str, op: Op) -> Result<Applied, Errno> {
        let repl = self.repl()?;
        let guard = self.namespace.write();
        repl.apply_then_send(what, op, Repair::None, guard)
    }

    fn new_node(
        &self,
        req: &Request,
        parent: &Node,
        mode: u32,
        umask: u32,
        dir: bool,
    ) -> Result<NewNode, Errno> {
        let pst = rustix::fs::fstat(parent.fd.as_fd())?;
        let setgid_parent = pst.st_mode & libc::S_ISGID != 0;
        let mut mode = mode & !umask & 0o7777;
        if setgid_parent && dir {
            mode |= libc::S_ISGID;
        }
        Ok(NewNode {
            id: self.inodes.allocate_id(),
            mode,
            uid: req.uid(),
            gid: if setgid_parent { pst.st_gid } else { req.gid() },
        })
    }

    /// mknod, mkdir, symlink and create: one new node, replicated.
    fn create_entry(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        entry: NewEntry,
    ) -> Result<(Arc<Node>, FileAttr), Errno> {
        self.repl()?;
        let name = name_of(name)?;
        let dir = self.inodes.get(parent.0)?;
        let is_dir = matches!(entry, NewEntry::Dir);
        let mut node = self.new_node(req, &dir, mode, umask, is_dir)?;
        let parent = parent.0;
        let op = match entry {
            NewEntry::File { kind, rdev } => Op::Create {
                parent,
                name,
                node,
                kind,
                rdev,
            },
            NewEntry::Dir => Op::Mkdir { parent, name, node },
            NewEntry::Symlink(target) => {
                node.mode = 0o777;
                Op::Symlink {
                    parent,
                    name,
                    node,
                    target,
                }
            }
        };
        self.replicate_namespace("create", op)?;
        let node = self.inodes.get(node.id)?;
        let attr = self.entry_attr(&node)?;
        Ok((node, attr))
    }

    fn open_handle(&self, node: Arc<Node>, flags: i32) -> Result<(u64, FopenFlags), Errno> {
        let direct = flags & libc::O_DIRECT != 0;
        let sync = flags & (libc::O_SYNC | libc::O_DSYNC) != 0;
        let mut oflags = match flags & libc::O_ACCMODE {
            libc::O_RDONLY => OFlags::RDONLY,
            _ => OFlags::RDWR,
        };
        if direct {
            oflags |= OFlags::DIRECT;
        }
        if sync {
            oflags |= OFlags::DSYNC;
        }
        let fd = apply::reopen(node.fd.as_fd(), oflags)?;
        // Cached writes go through a buffered twin opened now, with the file,
        // so its sync reports every writeback error since the open.
        let cached = direct && !sync && self.flusher.is_some() && oflags.contains(OFlags::RDWR);
        let twin = if cached {
            Some(Arc::new(apply::reopen(node.fd.as_fd(), OFlags::RDWR)?))
        } else {
            None
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let handle = Arc::new(Handle {
            node,
            fd,
            direct,
            sync,
            cached,
            buffered: Mutex::new(twin),
            write_end: AtomicU64::new(0),
        });
        self.handles.write().insert(fh, handle);
        let open_flags = if direct {
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES
        } else if self.writer.get().is_none() {
            // Standby: no page cache, every read sees what the receiver applied.
            FopenFlags::FOPEN_DIRECT_IO
        } else {
            FopenFlags::empty()
        };
        Ok((fh, open_flags))
    }

    fn do_lookup(&self, parent: INodeNo, name: &OsStr) -> Result<FileAttr, Errno> {
        let name = name_of(name)?;
        let _ns = self.namespace.read();
        let dir = self.inodes.get(parent.0)?;
        let fd = apply::lookup_beneath(dir.fd.as_fd(), &name)?;
        let st = rustix::fs::fstat(fd.as_fd())?;
        let node = self.inodes.reference(fd, |id| {
            // In standby nobody receives it: the activation binds what the
            // kernel holds then.
            if let Some(repl) = self.writer.get() {
                repl.bookkeeping(Op::Bind {
                    id,
                    parent: parent.0,
                    name: name.clone(),
                })
            }
        })?;
        Ok(attr_of(node.id, &st))
    }

    fn do_setattr(&self, ino: INodeNo, change: AttrChange) -> Result<FileAttr, Errno> {
        let node = self.inodes.get(ino.0)?;
        let Some(repl) = self.writer.get() else {
            return self.standby_setattr(&node, &change);
        };
        let AttrChange {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
        } = change;
        if let Some(size) = size {
            let whole_file = node.ranges.lock(0, u64::MAX);
            let truncated = repl.apply_then_send(
                "truncate",
                Op::Truncate { id: node.id, size },
                Repair::Size { id: node.id },
                whole_file,
            );
            node.presync.changed(false);
            truncated?;
        }
        if mode.is_some() || uid.is_some() || gid.is_some() || atime.is_some() || mtime.is_some() {
            let now = SystemTime::now();
            let resolve = |t: Option<TimeOrNow>| {
                t.map(|t| match t {
                    TimeOrNow::SpecificTime(t) => to_time(t),
                    TimeOrNow::Now => to_time(now),
                })
            };
            self.replicate_namespace(
                "setattr",
                Op::SetAttr {
                    id: node.id,
                    mode,
                    uid,
                    gid,
                    atime: resolve(atime),
                    mtime: resolve(mtime),
                },
            )?;
        }
        self.entry_attr(&node)
    }

    fn do_write(&self, fh: FileHandle, offset: u64, data: &[u8], reply: ReplyWrite) {
        let started = std::time::Instant::now();
        let repl = match self.repl() {
            Ok(r) => r,
            Err(e) => return reply.error(fuse_err(e)),
        };
        let handle = match self.handle(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(fuse_err(e)),
        };
        let buf = Payload::Aligned(Arc::new(AlignedBuf::copy_from(data)));
        let len = data.len() as u64;
        let id = handle.node.id;
        let mut ops = vec![Op::Write {
            id,
            offset,
            data: buf.clone(),
        }];
        if handle.sync {
            ops.push(Op::Fsync { id, datasync: true });
        }
        let end = offset.saturating_add(len);
        let sequential = handle.write_end.swap(end, Ordering::Relaxed) == offset && offset > 0;
        let order = handle.node.ranges.lock(offset, end);
        let metrics = self.metrics.clone();
        let early = std::cell::Cell::new(false);
        let local = || {
            let written = if handle.cached {
                handle.buffered_fd().and_then(|twin| {
                    let written = apply::write_all_at(twin.as_fd(), &buf, offset);
                    if let (Ok(n), Some(flusher)) = (&written, &self.flusher) {
                        flusher.written(twin, offset, *n);
                        self.metrics.cached_writes.fetch_add(1, Ordering::Relaxed);
                    }
                    written
                })
            } else {
                handle.io_fd(offset, buf.len()).and_then(|io| {
                    match apply::write_all_at(io.fd(), &buf, offset) {
                        Err(Errno::INVAL) if handle.direct => {
                            apply::write_all_at(handle.buffered_fd()?.as_fd(), &buf, offset)
                        }
                        other => other,
                    }
                })
            };
            // Counted done or not: a failed write may have changed some of the range.
            early.set(handle.node.presync.changed(!handle.sync) && written.is_ok());
            written
        };
        repl.send_then_apply(
            "write",
            ops,
            Repair::Range { id, offset, len },
            order,
            started,
            sequential,
            local,
            Box::new(move |r: Result<usize, Errno>| {
                metrics.write_latency.observe(started.elapsed());
                match r {
                    Ok(n) => reply.written(clamp_u32(n)),
                    Err(e) => reply.error(fuse_err(e)),
                }
            }),
        );
        // The fdatasync expected next finds the disk flushed or flushing.
        if early.get() {
            self.metrics.early_syncs.fetch_add(1, Ordering::Relaxed);
            handle.node.presync.early(|| sync_handle(&handle, true));
        }
    }

    fn do_read(&self, fh: FileHandle, offset: u64, size: u32) -> Result<AlignedBuf, Errno> {
        let handle = self.handle(fh)?;
        // Aligned, so an O_DIRECT descriptor can read straight into it.
        // Recycled: only the bytes read are replied.
        let mut buf = AlignedBuf::scratch(size as usize);
        let io = handle.io_fd(offset, buf.len())?;
        let n = match read_full(io.fd(), buf.as_mut_slice(), offset) {
            Err(Errno::INVAL) if handle.direct => {
                read_full(handle.buffered_fd()?.as_fd(), buf.as_mut_slice(), offset)
            }
            other => other,
        };
        // Reads are served here only: a media error on one is the disk failing.
        let n = match self.writer.get() {
            Some(repl) => repl.watch("read", n)?,
            None => n?,
        };
        buf.truncate(n);
        Ok(buf)
    }

    /// Both nodes sync at the same time; the reply waits for the slower one.
    /// A file's fdatasync is answered by the early syncs (see
    /// [`crate::presync`]) where they cover it: this node's, and the peer's
    /// (then without a round trip).
    fn do_fsync(
        &self,
        node: Option<&Node>,
        id: NodeId,
        datasync: bool,
        sync: impl FnOnce() -> Result<(), Errno>,
        reply: ReplyEmpty,
    ) {
        let Some(repl) = self.writer.get() else {
            // Standby: not a change; this copy's own sync (the receiver's data).
            return match sync() {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(fuse_err(e)),
            };
        };
        let started = std::time::Instant::now();
        let sync_here = || match node {
            Some(node) => {
                let (result, answered) = node.presync.sync(datasync, sync);
                if answered == Answered::Early {
                    self.metrics.fsyncs_early.fetch_add(1, Ordering::Relaxed);
                }
                result
            }
            None => sync(),
        };
        type LocalSync<'a> = Box<dyn FnOnce() -> Result<(), Errno> + 'a>;
        let local: LocalSync = if datasync && node.is_some() && repl.peer_synced(id) {
            match sync_here() {
                Ok(()) => {
                    self.metrics
                        .fsyncs_peer_early
                        .fetch_add(1, Ordering::Relaxed);
                    self.metrics.fsync_latency.observe(started.elapsed());
                    reply.ok();
                    // Still told, unwaited: the peer learns from it that this
                    // file is synced after each write (its next early sync),
                    // and answers it at once.
                    return repl.bookkeeping(Op::Fsync { id, datasync });
                }
                // Judged as any local failure, the peer asked too.
                Err(e) => Box::new(move || Err(e)),
            }
        } else {
            Box::new(sync_here)
        };
        let metrics = self.metrics.clone();
        repl.send_then_apply(
            "fsync",
            vec![Op::Fsync { id, datasync }],
            Repair::None,
            (),
            started,
            false,
            local,
            Box::new(move |r: Result<(), Errno>| {
                metrics.fsync_latency.observe(started.elapsed());
                match r {
                    Ok(()) => reply.ok(),
                    Err(e) => reply.error(fuse_err(e)),
                }
            }),
        );
    }

    fn do_opendir(&self, ino: INodeNo) -> Result<u64, Errno> {
        let node = self.inodes.get(ino.0)?;
        let fd = apply::reopen(node.fd.as_fd(), OFlags::RDONLY | OFlags::DIRECTORY)?;
        let mut items = Vec::new();
        let mut dir = rustix::fs::Dir::read_from(fd.as_fd())?;
        while let Some(entry) = dir.read() {
            let entry = entry?;
            items.push(DirItem {
                name: entry.file_name().to_bytes().to_vec(),
                ino: entry.ino(),
                kind: fuse_kind(entry.file_type()),
            });
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.dirs.lock().insert(fh, (Arc::new(items), Arc::new(fd)));
        Ok(fh)
    }

    fn xattr_reply(value: Result<Vec<u8>, Errno>, size: u32, reply: ReplyXattr) {
        match value {
            Ok(v) if size == 0 => reply.size(clamp_u32(v.len())),
            Ok(v) if v.len() > size as usize => reply.error(fuser::Errno::ERANGE),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(fuse_err(e)),
        }
    }

    fn node_proc_path(&self, ino: INodeNo) -> Result<String, Errno> {
        Ok(apply::proc_path(self.inodes.get(ino.0)?.fd.as_fd()))
    }
}

fn reply_entry(reply: ReplyEntry, ttl: Duration, result: Result<FileAttr, Errno>) {
    match result {
        Ok(attr) => reply.entry(&ttl, &attr, Generation(0)),
        Err(e) => reply.error(fuse_err(e)),
    }
}

macro_rules! reply_with {
    ($reply:ident, $result:expr, $ok:expr) => {
        match $result {
            Ok(v) => $ok($reply, v),
            Err(e) => $reply.error(fuse_err(e)),
        }
    };
}

impl fuser::Filesystem for ReplicatedFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        for cap in [
            InitFlags::FUSE_ASYNC_DIO,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP,
        ] {
            if config.add_capabilities(cap).is_err() {
                tracing::debug!(?cap, "kernel lacks FUSE capability");
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        reply_entry(reply, self.ttl(), self.do_lookup(parent, name));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        if self.inodes.release_refs(ino.0, nlookup) {
            if let Some(repl) = self.writer.get() {
                repl.bookkeeping(Op::Forget { id: ino.0 });
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let attr = self.inodes.get(ino.0).and_then(|n| self.entry_attr(&n));
        reply_with!(reply, attr, |r: ReplyAttr, a| r.attr(&self.ttl(), &a))
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let change = AttrChange {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
        };
        let attr = self.do_setattr(ino, change);
        reply_with!(reply, attr, |r: ReplyAttr, a| r.attr(&self.ttl(), &a))
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let target = self
            .inodes
            .get(ino.0)
            .and_then(|n| rustix::fs::readlinkat(n.fd.as_fd(), "", Vec::new()));
        reply_with!(reply, target, |r: ReplyData, t: std::ffi::CString| r
            .data(t.as_bytes()))
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let kind = match FileType::from_raw_mode(mode) {
            FileType::RegularFile => Ok(NodeKind::Regular),
            FileType::Fifo => Ok(NodeKind::Fifo),
            FileType::Socket => Ok(NodeKind::Socket),
            FileType::CharacterDevice => Ok(NodeKind::CharDevice),
            FileType::BlockDevice => Ok(NodeKind::BlockDevice),
            _ => Err(Errno::INVAL),
        };
        let result = kind.and_then(|kind| {
            let rdev = u64::from(rdev);
            let entry = NewEntry::File { kind, rdev };
            self.create_entry(req, parent, name, mode, umask, entry)
        });
        reply_entry(reply, self.ttl(), result.map(|(_, attr)| attr));
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let result = self.create_entry(req, parent, name, mode, umask, NewEntry::Dir);
        reply_entry(reply, self.ttl(), result.map(|(_, attr)| attr));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let result = name_of(name).and_then(|name| {
            self.replicate_namespace(
                "unlink",
                Op::Unlink {
                    parent: parent.0,
                    name,
                },
            )
        });
        reply_with!(reply, result, |r: ReplyEmpty, _| r.ok())
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let result = name_of(name).and_then(|name| {
            self.replicate_namespace(
                "rmdir",
                Op::Rmdir {
                    parent: parent.0,
                    name,
                },
            )
        });
        reply_with!(reply, result, |r: ReplyEmpty, _| r.ok())
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        let result = LinkTarget::new(target.as_os_str().as_bytes())
            .map_err(|_| Errno::INVAL)
            .and_then(|target| {
                let entry = NewEntry::Symlink(target);
                self.create_entry(req, parent, link_name, 0o777, 0, entry)
            });
        reply_entry(reply, self.ttl(), result.map(|(_, attr)| attr));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let result = (|| {
            self.replicate_namespace(
                "rename",
                Op::Rename {
                    parent: parent.0,
                    name: name_of(name)?,
                    new_parent: newparent.0,
                    new_name: name_of(newname)?,
                    flags: flags.bits(),
                },
            )
        })();
        reply_with!(reply, result, |r: ReplyEmpty, _| r.ok())
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let result = (|| {
            self.replicate_namespace(
                "link",
                Op::Link {
                    id: ino.0,
                    parent: newparent.0,
                    name: name_of(newname)?,
                },
            )?;
            self.inodes.add_reference(ino.0);
            let node = self.inodes.get(ino.0)?;
            self.entry_attr(&node)
        })();
        reply_entry(reply, self.ttl(), result);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let result = self
            .inodes
            .get(ino.0)
            .and_then(|node| self.open_handle(node, flags.0));
        reply_with!(reply, result, |r: ReplyOpen, (fh, f)| r
            .opened(FileHandle(fh), f))
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        reply_with!(
            reply,
            self.do_read(fh, offset, size),
            |r: ReplyData, d: AlignedBuf| r.data(&d)
        )
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        self.do_write(fh, offset, data, reply);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.handles.write().remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.handle(fh) {
            Ok(h) => self.do_fsync(
                Some(&h.node),
                h.node.id,
                datasync,
                || sync_handle(&h, datasync),
                reply,
            ),
            Err(e) => reply.error(fuse_err(e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply_with!(reply, self.do_opendir(ino), |r: ReplyOpen, fh| r
            .opened(FileHandle(fh), FopenFlags::empty()))
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some((items, _)) = self.dirs.lock().get(&fh.0).cloned() else {
            return reply.error(fuser::Errno::EBADF);
        };
        for (i, item) in items
            .iter()
            .enumerate()
            .skip(usize::try_from(offset).unwrap_or(usize::MAX))
        {
            if reply.add(
                INodeNo(item.ino),
                i as u64 + 1,
                item.kind,
                OsStr::from_bytes(&item.name),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dirs.lock().remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.dirs.lock().get(&fh.0).cloned() {
            Some((_, fd)) => self.do_fsync(
                None,
                ino.0,
                datasync,
                || sync_fd(fd.as_fd(), datasync),
                reply,
            ),
            None => reply.error(fuser::Errno::EBADF),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let stats = self
            .inodes
            .path_fd(crate::op::ROOT)
            .and_then(|fd| rustix::fs::fstatvfs(fd.as_fd()));
        reply_with!(reply, stats, |r: ReplyStatfs, s: rustix::fs::StatVfs| r
            .statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                clamp_u32(s.f_bsize),
                clamp_u32(s.f_namemax),
                clamp_u32(s.f_frsize)
            ))
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let result = (|| {
            self.hide_libvirt_label(name)?;
            self.replicate_namespace(
                "setxattr",
                Op::SetXattr {
                    id: ino.0,
                    name: name_of(name)?,
                    value: XattrValue::new(value).map_err(|_| Errno::TOOBIG)?,
                    flags: flags as u32,
                },
            )
        })();
        reply_with!(reply, result, |r: ReplyEmpty, _| r.ok())
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let value = self
            .hide_libvirt_label(name)
            .and_then(|()| self.node_proc_path(ino))
            .and_then(|p| apply::read_sized(|buf| rustix::fs::getxattr(&p, name, buf)));
        Self::xattr_reply(value, size, reply);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let value = self
            .node_proc_path(ino)
            .and_then(|p| apply::read_sized(|buf| rustix::fs::listxattr(&p, buf)));
        Self::xattr_reply(value, size, reply);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let result = self
            .hide_libvirt_label(name)
            .and_then(|()| name_of(name))
            .and_then(|name| {
                self.replicate_namespace("removexattr", Op::RemoveXattr { id: ino.0, name })
            });
        reply_with!(reply, result, |r: ReplyEmpty, _| r.ok())
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let entry = NewEntry::File {
            kind: NodeKind::Regular,
            rdev: 0,
        };
        let result = self
            .create_entry(req, parent, name, mode, umask, entry)
            .and_then(|(node, attr)| {
                let (fh, open_flags) = self.open_handle(node, flags)?;
                Ok((attr, fh, open_flags))
            });
        reply_with!(reply, result, |r: ReplyCreate, (a, fh, f)| r.created(
            &self.ttl(),
            &a,
            Generation(0),
            FileHandle(fh),
            f
        ))
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // No ioctl is meaningful here (and none may bypass replication).
        reply.error(fuser::Errno::ENOTTY);
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let result = self.repl().and_then(|repl| {
            let node = self.inodes.get(ino.0)?;
            let keeps_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
            let end = if keeps_size {
                offset.saturating_add(length)
            } else {
                u64::MAX
            };
            let order = node.ranges.lock(offset, end);
            let allocated = repl.apply_then_send(
                "fallocate",
                Op::Fallocate {
                    id: node.id,
                    mode: mode as u32,
                    offset,
                    len: length,
                },
                fallocate_repair(node.id, mode, offset, length),
                order,
            );
            node.presync.changed(false);
            allocated
        });
        reply_with!(reply, result, |r: ReplyEmpty, _| r.ok())
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let result = self.handle(fh).and_then(|h| {
            let pos = match whence {
                libc::SEEK_DATA => SeekFrom::Data(offset as u64),
                libc::SEEK_HOLE => SeekFrom::Hole(offset as u64),
                libc::SEEK_SET => SeekFrom::Start(offset as u64),
                libc::SEEK_END => SeekFrom::End(offset),
                _ => return Err(Errno::INVAL),
            };
            let fd = h.buffered_fd()?;
            rustix::fs::seek(fd.as_fd(), pos)
        });
        reply_with!(reply, result, |r: ReplyLseek, o: u64| r.offset(o as i64))
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        ino_in: INodeNo,
        _fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        _fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let result = (|| {
            let repl = self.repl()?;
            let src = self.inodes.get(ino_in.0)?;
            let dst = self.inodes.get(ino_out.0)?;
            let len = len.min(u64::from(u32::MAX));
            // Source and destination ranges are held so that no write slips between
            // the local copy and its place in the stream; one lock per file.
            let order = if src.id == dst.id {
                let start = offset_in.min(offset_out);
                let end = offset_in.max(offset_out).saturating_add(len);
                (Some(dst.ranges.lock(start, end)), None)
            } else if src.id < dst.id {
                let a = src.ranges.lock(offset_in, offset_in.saturating_add(len));
                (
                    Some(a),
                    Some(dst.ranges.lock(offset_out, offset_out.saturating_add(len))),
                )
            } else {
                let b = dst.ranges.lock(offset_out, offset_out.saturating_add(len));
                (
                    Some(src.ranges.lock(offset_in, offset_in.saturating_add(len))),
                    Some(b),
                )
            };
            // The peer copies exactly what was copied here.
            let src_fd = self.inodes.data_fd(src.id)?;
            let dst_fd = self.inodes.data_fd(dst.id)?;
            repl.ready_for_change()?;
            let _inflight = repl.record(&Op::CopyRange {
                src: src.id,
                src_offset: offset_in,
                dst: dst.id,
                dst_offset: offset_out,
                len,
            })?;
            let copied =
                apply::copy_range(src_fd.as_fd(), offset_in, dst_fd.as_fd(), offset_out, len);
            dst.presync.changed(false);
            let copied = repl.watch("copy_file_range", copied)?;
            if copied == 0 {
                return Ok(0);
            }
            repl.send_applied(
                "copy_file_range",
                Op::CopyRange {
                    src: src.id,
                    src_offset: offset_in,
                    dst: dst.id,
                    dst_offset: offset_out,
                    len: copied,
                },
                Repair::Range {
                    id: dst.id,
                    offset: offset_out,
                    len: copied,
                },
                order,
            )?;
            Ok(copied)
        })();
        reply_with!(reply, result, |r: ReplyWrite, n: u64| r
            .written(clamp_u32(n)))
    }
}
