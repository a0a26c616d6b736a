//! The cost of a thread wake-up in a loopback round trip, which decided the
//! polling readers (`fs/src/spin.rs`): a 4 KiB request and a 32-byte answer
//! between two threads of one process over loopback TCP (`TCP_NODELAY`), with
//! both threads asleep in `read` between messages, then with both polling
//! (non-blocking reads in a loop). Prints the mean round trip of each.
//!
//! `cargo run --release -p vmha-fs --example loopback_rtt [round trips]`

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

fn read_exact(s: &mut TcpStream, buf: &mut [u8], poll: bool) -> std::io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if poll && e.kind() == ErrorKind::WouldBlock => std::hint::spin_loop(),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn round_trips(n: usize, poll: bool) -> std::io::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        s.set_nonblocking(poll)?;
        let mut req = vec![0u8; 4096];
        for _ in 0..n {
            read_exact(&mut s, &mut req, poll)?;
            s.write_all(&[1u8; 32])?;
        }
        Ok(())
    });
    let mut c = TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    c.set_nonblocking(poll)?;
    let (req, mut ans) = (vec![7u8; 4096], [0u8; 32]);
    let start = Instant::now();
    for _ in 0..n {
        c.write_all(&req)?;
        read_exact(&mut c, &mut ans, poll)?;
    }
    let mean_us = start.elapsed().as_secs_f64() * 1e6 / n as f64;
    server
        .join()
        .map_err(|_| std::io::Error::other("server thread panicked"))??;
    Ok(mean_us)
}

fn main() -> std::io::Result<()> {
    let n = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20_000);
    for poll in [false, true, false, true] {
        let what = if poll { "polling" } else { "asleep in read" };
        println!("{what:>15}: {:.1} µs per round trip", round_trips(n, poll)?);
    }
    Ok(())
}
