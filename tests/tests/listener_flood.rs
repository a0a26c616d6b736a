//! A receiver facing a flood of unauthenticated connections (issue 8, item 5):
//! 2,000 connections that each trickle one byte every 3 s, plus bursts of
//! garbage, from loopback. A stranger must not be able to exhaust the listener:
//! - one handshake has at most 5 s in total, however slowly its bytes arrive;
//! - the real primary, retrying, mounts within 10 s while the flood goes on, and
//!   its writes replicate;
//! - the receiver stays under a few dozen threads whatever the connection count;
//! - rejections are logged at most once per second per kind, with counts.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::RngCore;
use vmha_fs::wire;
use vmha_test_infra::pair::{Pair, PairOptions, READY_TIMEOUT};
use vmha_test_infra::proc::strip_ansi;
use vmha_test_infra::proc::Child;

const CONNECTIONS: usize = 2_000;
const ATTACKERS: usize = 8;
const TRICKLE_EVERY: Duration = Duration::from_secs(3);
const FLOOD_FOR: Duration = Duration::from_secs(16);
/// What the design allows the whole handshake, plus scheduling slack.
const DEADLINE_LIMIT: Duration = Duration::from_millis(7_000);
const MOUNT_WITHIN: Duration = Duration::from_secs(10);
const MAX_THREADS: usize = 32;

/// The bytes a trickling client sends: a well-formed hello (never completed).
fn hello_prefix() -> Vec<u8> {
    let mut hello = b"VMHA".to_vec();
    hello.extend_from_slice(&wire::REPLICATION.min.to_le_bytes());
    hello.extend_from_slice(&wire::REPLICATION.max.to_le_bytes());
    hello.extend_from_slice(&[7u8; 32]);
    hello
}

fn raise_fd_limit() -> Result<()> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let want = (CONNECTIONS as u64) * 2 + 512;
    let max = limit.maximum.unwrap_or(u64::MAX);
    if max < want {
        bail!("RLIMIT_NOFILE hard limit {max} is below the {want} this test needs");
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(want.max(limit.current.unwrap_or(0))),
            maximum: limit.maximum,
        },
    )
    .context("raising RLIMIT_NOFILE")?;
    Ok(())
}

/// Whether the server closed `s` (non-blocking read: EOF or an error).
fn closed_by_server(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 256];
    match s.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != ErrorKind::WouldBlock,
    }
}

fn connect(addr: SocketAddr) -> Option<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_nonblocking(true).ok()?;
    Some(s)
}

/// Sends one byte every 2 s on a fresh connection and returns how long the
/// receiver kept it open.
fn time_to_close(addr: SocketAddr, hello: &[u8]) -> Result<Duration> {
    let mut s = connect(addr).context("probe connect")?;
    let start = Instant::now();
    let mut next_byte = start;
    let mut sent = 0;
    loop {
        if closed_by_server(&mut s) {
            return Ok(start.elapsed());
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("the receiver kept a trickling connection open for 30 s");
        }
        if Instant::now() >= next_byte && sent < hello.len() {
            if s.write_all(&hello[sent..sent + 1]).is_err() {
                return Ok(start.elapsed());
            }
            sent += 1;
            next_byte += Duration::from_secs(2);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Keeps `count` connections open, each sending the next byte of a hello every
/// [`TRICKLE_EVERY`]; a connection the receiver closed is opened again.
fn trickle(addr: SocketAddr, count: usize, stop: &AtomicBool, reopened: &AtomicU64) {
    let hello = hello_prefix();
    let mut conns: Vec<Option<(TcpStream, usize)>> = (0..count).map(|_| None).collect();
    while !stop.load(Ordering::Relaxed) {
        let tick = Instant::now();
        for slot in conns.iter_mut() {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let alive = match slot {
                Some((s, pos)) => {
                    if closed_by_server(s) {
                        false
                    } else {
                        let ok = s.write_all(&hello[*pos % hello.len()..][..1]).is_ok();
                        *pos += 1;
                        ok
                    }
                }
                None => false,
            };
            if !alive {
                if slot.is_some() {
                    reopened.fetch_add(1, Ordering::Relaxed);
                }
                *slot = connect(addr).map(|s| (s, 0));
            }
        }
        let spent = tick.elapsed();
        if spent < TRICKLE_EVERY {
            std::thread::sleep(TRICKLE_EVERY - spent);
        }
    }
}

/// Bursts of connections that send random bytes and hang up.
fn garbage(addr: SocketAddr, stop: &AtomicBool, sent: &AtomicU64) {
    let mut rng = rand::rng();
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..10 {
            if let Some(mut s) = connect(addr) {
                let mut junk = [0u8; 200];
                rng.fill_bytes(&mut junk);
                let _ = s.write_all(&junk);
                sent.fetch_add(1, Ordering::Relaxed);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn thread_count(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("/proc/{pid}/task"))?
        .count())
}

fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {name}="))?;
    let rest = &line[at + name.len() + 2..];
    let value = rest.split(' ').next()?;
    Some(value.trim_matches('"'))
}

/// Starts the primary again and again until it mounts; returns how long it took.
fn start_primary_retrying(pair: &Pair, slot: &mut Option<Child>) -> Result<Duration> {
    let start = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let left = (MOUNT_WITHIN + Duration::from_secs(10)).saturating_sub(start.elapsed());
        let mut child = Child::spawn("primary", pair.primary_command())?;
        match child.wait_ready(left.min(READY_TIMEOUT)) {
            Ok(()) => {
                *slot = Some(child);
                eprintln!("primary mounted after {attempts} attempt(s)");
                return Ok(start.elapsed());
            }
            Err(e) if start.elapsed() < MOUNT_WITHIN + Duration::from_secs(10) => {
                eprintln!("primary attempt {attempts} failed: {e:#}");
                drop(child);
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(e.context(format!("primary never mounted ({attempts} attempts)"))),
        }
    }
}

#[test]
fn flood_of_unauthenticated_connections_does_not_exhaust_the_receiver() -> Result<()> {
    raise_fd_limit()?;
    let mut pair = Pair::start_secondary_only(PairOptions::default())?;
    // Declared after `pair`: dropped (killed) first.
    let mut primary: Option<Child> = None;
    let pid = pair.secondary_pid().context("secondary pid")?;
    let addr: SocketAddr = ([127, 0, 0, 1], pair.port()).into();

    // 1. One handshake has one total deadline: a byte every 2 s does not renew it.
    let held = time_to_close(addr, &hello_prefix())?;
    eprintln!("a trickling connection was closed after {held:?}");

    // 2. The flood.
    let stop = Arc::new(AtomicBool::new(false));
    let reopened = Arc::new(AtomicU64::new(0));
    let junk = Arc::new(AtomicU64::new(0));
    let max_threads = Arc::new(Mutex::new(0usize));
    let mut workers = Vec::new();
    for _ in 0..ATTACKERS {
        let (stop, reopened) = (stop.clone(), reopened.clone());
        workers.push(std::thread::spawn(move || {
            trickle(addr, CONNECTIONS / ATTACKERS, &stop, &reopened)
        }));
    }
    {
        let (stop, junk) = (stop.clone(), junk.clone());
        workers.push(std::thread::spawn(move || garbage(addr, &stop, &junk)));
    }
    {
        let (stop, max_threads) = (stop.clone(), max_threads.clone());
        workers.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) = thread_count(pid) {
                    let mut max = max_threads.lock().unwrap_or_else(|e| e.into_inner());
                    *max = (*max).max(n);
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        }));
    }
    let flood_start = Instant::now();
    std::thread::sleep(Duration::from_secs(4));

    // 3. The real primary, retrying, gets through and replicates.
    let mounted = start_primary_retrying(&pair, &mut primary);
    let replicated = mounted.as_ref().ok().map(|_| -> Result<bool> {
        std::fs::write(pair.mount().join("through-the-flood"), b"payload")?;
        Ok(
            std::fs::read(pair.secondary_backing().join("through-the-flood"))
                .is_ok_and(|d| d == b"payload"),
        )
    });
    if let Some(left) = FLOOD_FOR.checked_sub(flood_start.elapsed()) {
        std::thread::sleep(left);
    }
    let flood_secs = flood_start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    let threads_during = *max_threads.lock().unwrap_or_else(|e| e.into_inner());
    // Let the last counts be reported.
    std::thread::sleep(Duration::from_millis(2_500));
    if let Some(mut p) = primary.take() {
        let _ = p.terminate(Duration::from_secs(15));
    }
    let lines = pair
        .secondary()
        .map(|s| s.stderr_lines())
        .unwrap_or_default();

    // 4. Rejection lines per kind.
    let mut per_kind: HashMap<String, usize> = HashMap::new();
    let mut reported = 0u64;
    for line in lines.iter().map(|l| strip_ansi(l)) {
        if !line.to_ascii_lowercase().contains("reject") {
            continue;
        }
        let kind = field(&line, "kind").unwrap_or("(no kind)").to_string();
        *per_kind.entry(kind).or_default() += 1;
        reported += 1 + field(&line, "suppressed")
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
    }
    let window = flood_secs + 4.0 + held.as_secs_f64();
    eprintln!(
        "flood: {flood_secs:.1} s, {} connections reopened, {} garbage connections; \
         receiver threads at most {threads_during}; primary mounted after {mounted:?}; \
         rejection lines per kind {per_kind:?}, rejections reported {reported}",
        reopened.load(Ordering::Relaxed),
        junk.load(Ordering::Relaxed),
    );

    let mut failures = Vec::new();
    if held > DEADLINE_LIMIT || held < Duration::from_secs(4) {
        failures.push(format!(
            "a connection trickling a byte every 2 s was held {held:?} (deadline 5 s in total)"
        ));
    }
    match &mounted {
        Ok(took) if *took <= MOUNT_WITHIN => {}
        Ok(took) => failures.push(format!("the primary mounted only after {took:?}")),
        Err(e) => failures.push(format!("the primary never mounted: {e:#}")),
    }
    match replicated {
        Some(Ok(true)) | None => {}
        Some(Ok(false)) => failures.push("a write under the flood did not replicate".into()),
        Some(Err(e)) => failures.push(format!("writing through the mount: {e:#}")),
    }
    if threads_during > MAX_THREADS {
        failures.push(format!(
            "the receiver ran {threads_during} threads (at most {MAX_THREADS})"
        ));
    }
    for (kind, count) in &per_kind {
        if *count as f64 > window + 2.0 {
            failures.push(format!(
                "{count} rejection lines of kind {kind} in {window:.0} s (at most one per second)"
            ));
        }
    }
    if reported < CONNECTIONS as u64 {
        failures.push(format!(
            "the log accounts for only {reported} rejections (counts missing)"
        ));
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("\n"));
    }
    pair.stop()
}
