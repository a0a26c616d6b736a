//! CPU per replicated MiB of the frame path alone, without FUSE or a disk: what
//! the two daemons spend on a 1 MiB write between the FUSE handler's buffer and
//! the receiver's decoded operation (the copy into an aligned buffer, the frame's
//! MAC on both sides, the socket copies, the receiver's buffer), over loopback
//! TCP in one process. Prints CPU µs per MiB (process user + system time) and
//! MiB/s. Load on the machine moves wall time more than CPU time.
//!
//! `cargo run --release -p vmha-fs --example frame_cpu [MiB]`

use std::io::{BufReader, BufWriter};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Instant;

use vmha_fs::buffer::{AlignedBuf, Payload};
use vmha_fs::op::Op;
use vmha_fs::wire::{FrameReader, FrameWriter, Message, SessionKeys, PROTOCOL_VERSION};

mod common;
use common::cpu_us;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mib: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(2000);
    // This release's frames (its MAC), as a replication session has them.
    let keys = SessionKeys {
        send: [7u8; 32],
        recv: [7u8; 32],
        version: PROTOCOL_VERSION,
    };
    let receiver_keys = keys.clone();
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let receiver = std::thread::spawn(move || -> Result<u64, String> {
        let (stream, _) = listener.accept().map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        let mut reader =
            FrameReader::for_session(BufReader::with_capacity(64 << 10, stream), &receiver_keys);
        let mut bytes = 0u64;
        loop {
            match reader.recv() {
                Ok(Message::Op {
                    op: Op::Write { data, .. },
                    ..
                }) => bytes += data.len() as u64,
                Ok(Message::Ping) => return Ok(bytes),
                Ok(other) => return Err(format!("unexpected {}", other.kind())),
                Err(e) => return Err(e.to_string()),
            }
        }
    });
    let stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    let mut writer = FrameWriter::for_session(BufWriter::with_capacity(1 << 18, stream), &keys);
    // What FUSE hands the write handler (not aligned).
    let source: Vec<u8> = (0..(1usize << 20) + 80).map(|i| (i % 251) as u8).collect();
    let (cpu0, t0) = (cpu_us(), Instant::now());
    for seq in 1..=mib {
        let data = Payload::Aligned(Arc::new(AlignedBuf::copy_from(&source[80..])));
        let op = Op::Write {
            id: 5,
            offset: seq << 20,
            data,
        };
        writer.send(&Message::Op { seq, op })?;
        writer.flush()?;
    }
    writer.send(&Message::Ping)?;
    writer.flush()?;
    let got = receiver.join().map_err(|_| "receiver panicked")??;
    let (cpu, wall) = (cpu_us() - cpu0, t0.elapsed());
    assert_eq!(got, mib << 20);
    println!(
        "{mib} MiB: CPU {:.0} µs/MiB, {:.0} MiB/s",
        cpu as f64 / mib as f64,
        mib as f64 / wall.as_secs_f64()
    );
    Ok(())
}
