//! Latency of one replicated 1 MiB write's frame path alone, at queue depth 1:
//! the writer sends a `Write` frame, the receiver reads and verifies it and
//! answers with a `Ping`; the writer waits for that answer before the next.
//! This is the floor of the write's peer stage without a disk (the FUSE
//! handler's copy into an aligned buffer, both MACs, both socket copies).
//! Prints the mean and median round trip in µs and CPU µs per MiB.
//!
//! `cargo run --release -p vmha-fs --example frame_rtt [rounds] [KiB]`

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
    let mut args = std::env::args().skip(1);
    let rounds: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(2000);
    let kib: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1024);
    let keys = SessionKeys {
        send: [7u8; 32],
        recv: [7u8; 32],
        version: PROTOCOL_VERSION,
    };
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let receiver_keys = keys.clone();
    let receiver = std::thread::spawn(move || -> Result<(), String> {
        let (stream, _) = listener.accept().map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        let back = stream.try_clone().map_err(|e| e.to_string())?;
        let mut reader =
            FrameReader::for_session(BufReader::with_capacity(64 << 10, stream), &receiver_keys);
        let mut answer = FrameWriter::for_session(BufWriter::new(back), &receiver_keys);
        loop {
            match reader.recv() {
                Ok(Message::Op { .. }) => {
                    answer.send(&Message::Ping).map_err(|e| e.to_string())?;
                    answer.flush().map_err(|e| e.to_string())?;
                }
                Ok(Message::Ping) => return Ok(()),
                Ok(other) => return Err(format!("unexpected {}", other.kind())),
                Err(e) => return Err(e.to_string()),
            }
        }
    });
    let stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    let back = stream.try_clone()?;
    let mut writer = FrameWriter::for_session(BufWriter::with_capacity(1 << 18, stream), &keys);
    let mut answers = FrameReader::for_session(BufReader::new(back), &keys);
    let source: Vec<u8> = (0..(kib << 10) + 80).map(|i| (i % 251) as u8).collect();
    let mut times = Vec::with_capacity(rounds as usize);
    let cpu0 = cpu_us();
    for seq in 1..=rounds {
        let t = Instant::now();
        let data = Payload::Aligned(Arc::new(AlignedBuf::copy_from(&source[80..])));
        let op = Op::Write {
            id: 5,
            offset: (seq * kib as u64) << 10,
            data,
        };
        writer.send(&Message::Op { seq, op })?;
        writer.flush()?;
        match answers.recv()? {
            Message::Ping => {}
            other => return Err(format!("unexpected {}", other.kind()).into()),
        }
        times.push(t.elapsed().as_nanos() as u64);
    }
    let cpu = cpu_us() - cpu0;
    writer.send(&Message::Ping)?;
    writer.flush()?;
    receiver.join().map_err(|_| "receiver panicked")??;
    times.sort_unstable();
    let mean = times.iter().sum::<u64>() as f64 / times.len() as f64 / 1000.0;
    let p50 = times[times.len() / 2] as f64 / 1000.0;
    println!(
        "{rounds} × {kib} KiB: round trip mean {mean:.0} µs, p50 {p50:.0} µs; CPU {:.0} µs/MiB",
        cpu as f64 / (rounds as f64 * kib as f64 / 1024.0)
    );
    Ok(())
}
