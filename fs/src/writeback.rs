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
//! span of its ranges ([`start`]; the receiver calls it once its input is
//! drained). Idle, the flusher's thread sleeps until the next write.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

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

/// Starts writing out `written` (then empties it): one call per file over the
/// span of its ranges, not one per range. The kernel writes the span's dirty
/// pages under one block plug, so a batch of scattered 4 KiB writes reaches the
/// disk's queue in one go (one doorbell) instead of one request and one system
/// call each. Only a hint: the fsync that matters reports real errors.
pub(crate) fn start(written: &mut Vec<Written>) {
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
    written.clear();
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
        loop {
            {
                let mut pending = self.pending.lock();
                while pending.is_empty() && !self.stop.load(Ordering::SeqCst) {
                    self.wake.wait(&mut pending);
                }
                if pending.is_empty() {
                    return;
                }
                if pending.len() < MAX_BATCH && !self.stop.load(Ordering::SeqCst) {
                    // Collect the writes that follow this one.
                    self.wake.wait_for(&mut pending, Flusher::DELAY);
                }
                std::mem::swap(&mut batch, &mut *pending);
            }
            start(&mut batch);
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
        // The flusher no longer holds the file.
        assert_eq!(Arc::strong_count(&fd), 1);
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
    fn local_writes_parse_and_print() {
        for w in [LocalWrites::Cached, LocalWrites::Direct] {
            assert_eq!(w.name().parse::<LocalWrites>(), Ok(w));
        }
        assert!("Direct".parse::<LocalWrites>().is_err());
        assert_eq!(LocalWrites::default(), LocalWrites::Cached);
    }
}
