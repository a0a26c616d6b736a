//! Waiting for the next frame by polling, briefly, while frames are flowing.
//!
//! Why: a thread asleep in `read` on a socket is woken by the peer's send
//! through the scheduler, and on a virtual machine that wake-up is the largest
//! cost of a round trip: a 4 KiB request and its answer between two threads
//! over loopback take 52 µs when both sleep and 9 µs when both poll
//! (`examples/loopback_rtt.rs` on the 2-vCPU test machine; waking a thread on
//! an idle vCPU is an IPI, a VM exit).
//! A replicated write meets two such waits (the receiver's for the write, the
//! writer's for its acknowledgement), an fdatasync two more.
//!
//! When: only while the stream is busy (the last frame came less than
//! [`ACTIVE`] ago), for at most [`LIMIT`], yielding the CPU between polls so a
//! runnable thread (the FUSE thread whose disk write completed, the
//! application) is never kept waiting; after [`MISSES`] polls in a row that
//! found nothing it stops for the next [`BACKOFF`] waits. An idle link never
//! polls, and a link whose frames come further apart than the limit soon
//! stops trying.

use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags};

/// Frames closer together than this count as a busy stream.
pub const ACTIVE: Duration = Duration::from_micros(1000);
/// The longest one wait polls before it sleeps.
pub const LIMIT: Duration = Duration::from_micros(150);
/// Polls in a row that found nothing before polling pauses.
pub const MISSES: u32 = 4;
/// Waits without polling after [`MISSES`] misses.
pub const BACKOFF: u32 = 64;

/// One reader's polling state.
#[derive(Debug)]
pub struct Spinner {
    last_frame: Instant,
    misses: u32,
    paused: u32,
}

impl Default for Spinner {
    fn default() -> Self {
        Self::new()
    }
}

impl Spinner {
    pub fn new() -> Self {
        Self {
            last_frame: Instant::now(),
            misses: 0,
            paused: 0,
        }
    }

    /// A frame was read.
    pub fn frame(&mut self) {
        self.last_frame = Instant::now();
    }

    /// Before a read that would block: polls `fd` for input while the stream
    /// is busy. True if input arrived (the read will not sleep).
    pub fn wait(&mut self, fd: BorrowedFd<'_>) -> bool {
        if self.paused > 0 {
            self.paused -= 1;
            return false;
        }
        let start = Instant::now();
        if start.duration_since(self.last_frame) > ACTIVE {
            return false;
        }
        loop {
            if readable(fd) {
                self.misses = 0;
                return true;
            }
            if start.elapsed() >= LIMIT {
                self.misses += 1;
                if self.misses >= MISSES {
                    self.misses = 0;
                    self.paused = BACKOFF;
                }
                return false;
            }
            std::thread::yield_now();
        }
    }
}

/// Whether `fd` has input (or an error or hang-up) now.
fn readable(fd: BorrowedFd<'_>) -> bool {
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    let now = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(poll(&mut fds, Some(&now)), Ok(n) if n > 0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_busy_stream_polls_until_input_arrives() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut s = Spinner::new();
        s.frame();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_micros(20));
            b.write_all(b"x").unwrap();
            b
        });
        // Polls up to LIMIT; the byte comes within it (or the poll gave up).
        let got = s.wait(a.as_fd());
        let _b = writer.join().unwrap();
        assert!(got || readable(a.as_fd()));
        assert!(readable(a.as_fd()));
    }

    #[test]
    fn an_idle_stream_never_polls() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut s = Spinner::new();
        s.last_frame = Instant::now() - ACTIVE * 2;
        let start = Instant::now();
        assert!(!s.wait(a.as_fd()));
        assert!(start.elapsed() < LIMIT, "polled an idle stream");
    }

    #[test]
    fn polls_that_keep_missing_pause() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut s = Spinner::new();
        for _ in 0..MISSES {
            s.frame();
            assert!(!s.wait(a.as_fd()));
        }
        // Paused: the next waits return at once even on a busy stream.
        s.frame();
        let start = Instant::now();
        assert!(!s.wait(a.as_fd()));
        assert!(start.elapsed() < LIMIT);
        assert_eq!(s.paused, BACKOFF - 1);
    }
}
