//! Starting the writeback of what was just written through the page cache.
//!
//! Both copies apply writes through their page cache: the receiver always did
//! (its acknowledgement means "applied", not "on disk"), and the primary does
//! for a guest's O_DIRECT writes by default ([`LocalWrites::Cached`]). Nothing
//! is weaker for it: an fsync still returns only once both copies flushed, and
//! a write acknowledged but not yet flushed on a node that loses power is on
//! the other node and in the activity log, as any write between two fsyncs on
//! a disk with a volatile cache. What it saves is the O_DIRECT submission per
//! write on the writer's FUSE thread (randwrite 4k qd16, five alternated pairs:
//! 26.6k → 32.9k IOPS on the mean, 51–65 → 36–45 µs of CPU per write for both
//! daemons, the write's local stage ≈ 150 → 10–12 µs; `bench/RESULTS.md`
//! "Session 11").
//!
//! Left to the kernel, dirty pages would wait for its writeback timers, and the
//! next fsync would have to write them all. So the writer starts their
//! writeback soon after: [`Flusher`] collects the written ranges and starts them
//! in batches, one `sync_file_range(SYNC_FILE_RANGE_WRITE)` per file over the
//! span of its ranges ([`Writeback::start`]; the receiver calls it once its
//! input is drained). Idle, the flusher's thread sleeps until the next write.
//!
//! Once written out, the pages are dropped from the page cache
//! (`POSIX_FADV_DONTNEED` on each run of ranges [`Writeback::DROP_AGE`] after
//! its writeback started, at a later batch or when the writes stop): the page
//! cache is only a write buffer here. The guest asked for no caching
//! (`cache='none'`, O_DIRECT) and reads through O_DIRECT; the receiver never
//! reads what it applies. Kept, those pages cost more than the memory: a file
//! just written through the mount in large writes (an image copied in, a full
//! resync) sat in the cache as large folios, and every 4 KiB write into one
//! then paid for the whole folio in ext4's `block_write_begin` and its
//! writeback (randwrite 4k qd16 on such a file, alternated pairs: 14.1k–15.5k
//! IOPS kept, 27.0k–27.5k dropped; `bench/RESULTS.md` "Session 12").

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// A range just written: file, offset, length.
pub(crate) type Written = (Arc<OwnedFd>, u64, usize);

/// Ranges a batch holds at most before it is started: each entry keeps its
/// file open, and a stream of writes to many files (a resync) must not hold one
/// descriptor per file.
pub(crate) const MAX_BATCH: usize = 256;

/// How the primary writes a guest's O_DIRECT writes to its own copy (the
/// module's `local_writes`). Writes through O_SYNC/O_DSYNC descriptors and
/// buffered ones are not affected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LocalWrites {
    /// Through the page cache, their writeback started at once by a
    /// [`Flusher`], as the receiver applies them.
    #[default]
    Cached,
    /// Straight to the disk (O_DIRECT), the FUSE thread waiting for it.
    Direct,
}

impl LocalWrites {
    pub fn name(self) -> &'static str {
        match self {
            LocalWrites::Cached => "cached",
            LocalWrites::Direct => "direct",
        }
    }
}

impl std::fmt::Display for LocalWrites {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for LocalWrites {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cached" => Ok(LocalWrites::Cached),
            "direct" => Ok(LocalWrites::Direct),
            other => Err(format!(
                "unknown local writes {other:?}; expected cached or direct"
            )),
        }
    }
}

/// Starts the writeback of ranges just written and, once they are old enough
/// to be written out, drops them from the page cache (see the module doc).
#[derive(Debug, Default)]
pub(crate) struct Writeback {
    /// Runs started, oldest first: when, file, first byte, end.
    started: VecDeque<(Instant, Arc<OwnedFd>, u64, u64)>,
}

impl Writeback {
    /// How long after its writeback started a run is dropped: a 1 MiB write
    /// takes well under a millisecond on a disk that keeps up. A page still
    /// dirty or being written then stays cached (the kernel skips it).
    pub(crate) const DROP_AGE: Duration = Duration::from_millis(20);
    /// Runs held at most: each keeps its file open.
    const MAX_HELD: usize = 4096;

    /// Starts writing out `written` (then empties it): one call per file over
    /// the span of its ranges, not one per range. The kernel writes the span's
    /// dirty pages under one block plug, so a batch of scattered 4 KiB writes
    /// reaches the disk's queue in one go (one doorbell) instead of one request
    /// and one system call each. Only a hint: the fsync that matters reports
    /// real errors. Then drops the runs started [`Self::DROP_AGE`] ago or more.
    pub(crate) fn start(&mut self, written: &mut Vec<Written>) {
        written.sort_unstable_by_key(|(fd, offset, _)| (Arc::as_ptr(fd) as usize, *offset));
        for file in written.chunk_by(|a, b| Arc::ptr_eq(&a.0, &b.0)) {
            let (fd, first, _) = &file[0];
            let end = file
                .iter()
                .map(|(_, offset, len)| offset.saturating_add(*len as u64))
                .max()
                .unwrap_or(*first);
            // SAFETY: plain syscall on a valid descriptor; no memory is passed.
            let rc = unsafe {
                libc::sync_file_range(
                    fd.as_raw_fd(),
                    *first as libc::off64_t,
                    end.saturating_sub(*first) as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                )
            };
            if rc != 0 {
                tracing::debug!("sync_file_range: {}", std::io::Error::last_os_error());
            }
        }
        let now = Instant::now();
        if let Some(before) = now.checked_sub(Self::DROP_AGE) {
            self.drop_older_than(before);
        }
        // Adjacent and overlapping ranges are one run: a sequential stream is
        // dropped in one call, scattered writes one range each (never the span
        // between them, whose newer dirty pages would make the kernel drain
        // every CPU's LRU cache to retry).
        let first_new = self.started.len();
        for (fd, offset, len) in written.drain(..) {
            let end = offset.saturating_add(len as u64);
            let joins = self.started.len() > first_new;
            match self.started.back_mut() {
                Some((_, last, _, last_end))
                    if joins && Arc::ptr_eq(last, &fd) && offset <= *last_end =>
                {
                    *last_end = (*last_end).max(end);
                }
                _ => self.started.push_back((now, fd, offset, end)),
            }
        }
        while self.started.len() > Self::MAX_HELD {
            self.drop_oldest();
        }
    }

    /// Whether runs started are still to be dropped.
    pub(crate) fn holds(&self) -> bool {
        !self.started.is_empty()
    }

    /// Drops the runs started before `before`.
    fn drop_older_than(&mut self, before: Instant) {
        while self
            .started
            .front()
            .is_some_and(|(when, ..)| *when <= before)
        {
            self.drop_oldest();
        }
    }

    /// Drops every run started (the writes stopped, or the session ends).
    pub(crate) fn drop_all(&mut self) {
        while !self.started.is_empty() {
            self.drop_oldest();
        }
    }

    /// Drops the pages of the oldest run from the page cache: the clean ones;
    /// a page dirtied again or still being written stays.
    fn drop_oldest(&mut self) {
        let Some((_, fd, first, end)) = self.started.pop_front() else {
            return;
        };
        // Never a zero length: that would mean up to the end of the file.
        let Some(len) = std::num::NonZeroU64::new(end.saturating_sub(first)) else {
            return;
        };
        if let Err(e) = rustix::fs::fadvise(&*fd, first, Some(len), rustix::fs::Advice::DontNeed) {
            tracing::debug!("fadvise(DONTNEED): {e}");
        }
    }
}

/// `cachestat(2)`'s counters (pages) for a whole file: what of it the page
/// cache holds (tests and diagnostics check the writeback with it).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct CacheStat {
    pub nr_cache: u64,
    pub nr_dirty: u64,
    pub nr_writeback: u64,
    pub nr_evicted: u64,
    pub nr_recently_evicted: u64,
}

/// `cachestat`'s system call number (the same on every architecture; libc
/// does not name it for x86_64 glibc yet).
const SYS_CACHESTAT: libc::c_long = 451;

/// The page-cache state of the whole file `fd` (Linux 6.5+).
pub fn cachestat(fd: impl std::os::fd::AsFd) -> std::io::Result<CacheStat> {
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    let range = Range { off: 0, len: 0 };
    let mut stat = CacheStat::default();
    // SAFETY: cachestat only reads `range` and writes `stat`, both live
    // `repr(C)` values of the kernel's layout.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            fd.as_fd().as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut CacheStat,
            0,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stat)
}

/// Collects the primary's cached writes and starts their writeback in batches
/// on its own thread, [`Flusher::DELAY`] after the first write of a batch (or
/// at once when a batch is full). Dropping it stops the thread (once the
/// batch it holds, if any, is started).
#[derive(Debug)]
pub(crate) struct Flusher {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    pending: Mutex<Vec<Written>>,
    wake: Condvar,
    stop: AtomicBool,
    /// Batches started (for tests).
    batches: AtomicU64,
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _guard = self.shared.pending.lock();
        self.shared.wake.notify_all();
    }
}

impl Flusher {
    /// How long a batch collects writes: at 40k writes a second, ~80 per call.
    pub(crate) const DELAY: Duration = Duration::from_millis(2);
    /// How long after the last batch its pages are dropped when no write
    /// follows (written out by then; more than [`Writeback::DROP_AGE`]).
    pub(crate) const DROP_AFTER: Duration = Duration::from_millis(50);

    pub(crate) fn start() -> std::io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("writeback".into())
            .spawn(move || thread_shared.run())?;
        Ok(Self { shared })
    }

    /// `len` bytes at `offset` of `fd` were just written through the page cache.
    pub(crate) fn written(&self, fd: Arc<OwnedFd>, offset: u64, len: usize) {
        let mut pending = self.shared.pending.lock();
        pending.push((fd, offset, len));
        // The thread sleeps while nothing is pending: one wake-up per batch.
        if pending.len() == 1 || pending.len() >= MAX_BATCH {
            self.shared.wake.notify_one();
        }
    }

    #[cfg(test)]
    fn batches(&self) -> u64 {
        self.shared.batches.load(Ordering::SeqCst)
    }
}

impl Shared {
    fn run(&self) {
        let mut batch = Vec::new();
        let mut writeback = Writeback::default();
        loop {
            {
                let mut pending = self.pending.lock();
                while pending.is_empty() && !self.stop.load(Ordering::SeqCst) {
                    if writeback.holds() {
                        // The writes stopped: the last batch is dropped once
                        // written out, then the thread sleeps.
                        let idle = self.wake.wait_for(&mut pending, Flusher::DROP_AFTER);
                        if idle.timed_out() && pending.is_empty() {
                            drop(pending);
                            writeback.drop_all();
                            pending = self.pending.lock();
                        }
                    } else {
                        self.wake.wait(&mut pending);
                    }
                }
                if pending.is_empty() {
                    drop(pending);
                    writeback.drop_all();
                    return;
                }
                if pending.len() < MAX_BATCH && !self.stop.load(Ordering::SeqCst) {
                    // Collect the writes that follow this one.
                    self.wake.wait_for(&mut pending, Flusher::DELAY);
                }
                std::mem::swap(&mut batch, &mut *pending);
            }
            writeback.start(&mut batch);
            self.batches.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;
    use std::time::Instant;

    use super::*;

    fn file() -> (tempfile::TempDir, Arc<OwnedFd>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = std::fs::File::create(dir.path().join("f")).expect("create");
        f.write_all_at(&[7u8; 8192], 0).expect("write");
        (dir, Arc::new(OwnedFd::from(f)))
    }

    fn wait_batches(f: &Flusher, n: u64) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if f.batches() >= n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    #[test]
    fn writes_close_together_are_started_as_one_batch() {
        let flusher = Flusher::start().expect("flusher");
        let (_dir, fd) = file();
        for i in 0..10 {
            flusher.written(fd.clone(), i * 512, 512);
        }
        assert!(wait_batches(&flusher, 1), "the batch was never started");
        std::thread::sleep(Flusher::DELAY * 5);
        assert_eq!(
            flusher.batches(),
            1,
            "ten writes within the delay are one batch"
        );
        assert!(flusher.shared.pending.lock().is_empty());
        // Once the batch's pages are dropped the flusher no longer holds the file.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&fd) > 1 {
            assert!(Instant::now() < deadline, "the flusher kept the file");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn an_idle_flusher_starts_nothing_and_its_thread_stops_when_it_is_dropped() {
        let flusher = Flusher::start().expect("flusher");
        std::thread::sleep(Flusher::DELAY * 5);
        assert_eq!(flusher.batches(), 0);
        let shared = flusher.shared.clone();
        drop(flusher);
        let deadline = Instant::now() + Duration::from_secs(5);
        // Only this test's reference is left once the thread has returned.
        while Arc::strong_count(&shared) > 1 {
            assert!(
                Instant::now() < deadline,
                "the flusher's thread did not stop"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn ranges_written_out_are_dropped_from_the_page_cache_once_old_enough() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join("f"))
            .expect("create");
        let fd = Arc::new(OwnedFd::from(f));
        let file = std::fs::File::from(fd.try_clone().expect("dup"));
        // A sequential run (one range) and scattered blocks (one each).
        file.write_all_at(&[1u8; 1 << 20], 0).expect("write");
        for block in [300u64, 302, 310] {
            file.write_all_at(&[2u8; 4096], block * 4096)
                .expect("write");
        }
        let mut writeback = Writeback::default();
        let mut batch: Vec<Written> = vec![(fd.clone(), 0, 1 << 20)];
        batch.extend([300u64, 302, 310].map(|b| (fd.clone(), b * 4096, 4096)));
        writeback.start(&mut batch);
        assert!(batch.is_empty());
        assert_eq!(
            writeback.started.len(),
            4,
            "one run each, the span between kept out"
        );
        file.sync_data().expect("fdatasync");
        assert_eq!(cachestat(&file).expect("cachestat").nr_cache, 259);
        // Not old enough: a second batch leaves them.
        writeback.start(&mut Vec::new());
        assert!(writeback.holds());
        std::thread::sleep(Writeback::DROP_AGE * 2);
        writeback.start(&mut Vec::new());
        assert!(!writeback.holds());
        let stat = cachestat(&file).expect("cachestat");
        assert_eq!(stat.nr_cache, 0, "{stat:?}");
        // Dropped from the cache, not from the file.
        let mut back = vec![0u8; 4096];
        file.read_exact_at(&mut back, 302 * 4096).expect("read");
        assert!(back.iter().all(|b| *b == 2));
        assert_eq!(Arc::strong_count(&fd), 1, "no run holds the file any more");
    }

    #[test]
    fn local_writes_parse_and_print() {
        for w in [LocalWrites::Cached, LocalWrites::Direct] {
            assert_eq!(w.name().parse::<LocalWrites>(), Ok(w));
        }
        assert!("Direct".parse::<LocalWrites>().is_err());
        assert_eq!(LocalWrites::default(), LocalWrites::Cached);
    }
}
