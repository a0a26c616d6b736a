//! A receiver facing clients that are not its primary: no key, garbage, a second
//! primary, and a key holder sending names and symlinks that lead out of the
//! directory. None of them may change anything outside the secondary's directory or
//! stop it from serving the real primary. And the other way round, a primary facing
//! a key-holding receiver that answers oddly (invalid error numbers, long pings).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use vmha_fs::key::ClusterKey;
use vmha_fs::op::{Name, NewNode, NodeKind, Op, ROOT};
use vmha_fs::wire::{self, FrameReader, FrameWriter, Message, WireError};
use vmha_test_infra::pair::{Pair, PairOptions};

fn connect(pair: &Pair) -> Result<TcpStream> {
    let s = TcpStream::connect(("127.0.0.1", pair.port())).context("connect to secondary")?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

/// The binding of the pair's receiver (standalone: the default module).
fn binding(pair: &Pair) -> Result<wire::Binding> {
    Ok(wire::Binding::new(wire::DEFAULT_MODULE, pair.port())?)
}

/// An authenticated session speaking the real protocol.
struct Session {
    writer: FrameWriter<TcpStream>,
    reader: FrameReader<TcpStream>,
    seq: u64,
}

impl Session {
    fn open(pair: &Pair) -> Result<Result<Session, WireError>> {
        let mut stream = connect(pair)?;
        let key = ClusterKey::load(pair.key_file())?;
        let keys = match wire::client_handshake(&mut stream, &key, &binding(pair)?) {
            Ok(k) => k,
            Err(e) => return Ok(Err(e)),
        };
        let mut writer = FrameWriter::for_session(stream.try_clone()?, &keys);
        writer.send(&Message::Claim { generation: None })?;
        writer.flush()?;
        let mut reader = FrameReader::for_session(stream, &keys);
        // Protocol 6 on, the receiver names its software first.
        if keys.version >= wire::SOFTWARE_SINCE {
            match reader.recv() {
                Ok(Message::Software { .. }) => {}
                Ok(other) => bail!("expected Software, got {other:?}"),
                Err(e) => return Ok(Err(e)),
            }
        }
        match reader.recv() {
            Ok(Message::Welcome { report: false }) => {}
            // The report on the receiver's copy streams after the welcome.
            Ok(Message::Welcome { report: true }) => {
                if let Err(e) = wire::read_report(&mut reader) {
                    return Ok(Err(e));
                }
            }
            Ok(Message::Refused { reason }) => return Ok(Err(WireError::Refused(reason))),
            Ok(other) => bail!("unexpected {other:?}"),
            Err(e) => return Ok(Err(e)),
        }
        Ok(Ok(Session {
            writer,
            reader,
            seq: 0,
        }))
    }

    /// Sends one op and returns the receiver's errno for it (0 = applied).
    fn apply(&mut self, op: Op) -> Result<i32> {
        self.seq += 1;
        self.writer.send(&Message::Op { seq: self.seq, op })?;
        self.writer.flush()?;
        loop {
            match self.reader.recv()? {
                Message::Acks(acks) => {
                    if let Some(a) = acks.iter().find(|a| a.seq == self.seq) {
                        return Ok(a.errno);
                    }
                }
                // Replication version 8 on: the same, with the receiver's time.
                Message::TimedAcks(acks) => {
                    if let Some(a) = acks.iter().find(|a| a.seq == self.seq) {
                        return Ok(a.errno);
                    }
                }
                Message::Ping => {}
                other => bail!("unexpected {other:?}"),
            }
        }
    }

    /// True when the receiver closed the connection.
    fn is_dropped(&mut self) -> bool {
        self.reader.recv().is_err()
    }
}

fn name(s: &str) -> Result<Name> {
    Ok(Name::new(s.as_bytes())?)
}

fn new_node(id: u64) -> NewNode {
    NewNode {
        id,
        mode: 0o644,
        uid: 0,
        gid: 0,
    }
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The same enum shapes as `Message::Op { op: Op::Bind { .. } }`, with a raw name, so
/// the test can send what the validating `Name` type refuses to represent.
#[derive(Serialize)]
enum RawMessage {
    _Claim,
    _Welcome,
    _Refused { reason: String },
    Op { seq: u64, op: RawOp },
}
#[derive(Serialize)]
enum RawOp {
    Bind { id: u64, parent: u64, name: Vec<u8> },
}

#[test]
fn hostile_clients_change_nothing_outside_and_the_primary_keeps_working() -> Result<()> {
    let mut pair = Pair::prepare(PairOptions::default())?;
    let root = pair.root().to_path_buf();
    let outside = root.join("outside");
    std::fs::create_dir(&outside)?;
    // Symlinks already replicated into the secondary's directory, pointing out of it.
    std::os::unix::fs::symlink(&outside, pair.secondary_backing().join("abs"))?;
    std::os::unix::fs::symlink("../../outside", pair.secondary_backing().join("rel"))?;
    pair.start_secondary()?;

    // 1. A key holder sends names that would leave the directory: dropped, nothing applied.
    for bad in [
        &b"../../outside/x"[..],
        b"..",
        b"/etc/passwd",
        b"a/b",
        b"x\0y",
    ] {
        let mut s = Session::open(&pair)?.context("handshake with the right key")?;
        let meta = bincode::serde::encode_to_vec(
            RawMessage::Op {
                seq: 1,
                op: RawOp::Bind {
                    id: 7,
                    parent: ROOT,
                    name: bad.to_vec(),
                },
            },
            bincode::config::standard(),
        )?;
        s.writer.send_raw(&meta, &[])?;
        s.writer.flush()?;
        assert!(s.is_dropped(), "receiver kept a session that sent {bad:?}");
    }

    // 2. A key holder going through replicated symlinks: every operation fails.
    {
        let mut s = Session::open(&pair)?.context("handshake")?;
        for (id, link) in [(10, "abs"), (11, "rel")] {
            assert_eq!(
                s.apply(Op::Bind {
                    id,
                    parent: ROOT,
                    name: name(link)?
                })?,
                0
            );
            let create = Op::Create {
                parent: id,
                name: name("x")?,
                node: new_node(id + 100),
                kind: NodeKind::Regular,
                rdev: 0,
            };
            assert_ne!(
                s.apply(create)?,
                0,
                "create beneath symlink {link} succeeded"
            );
            let mkdir = Op::Mkdir {
                parent: id,
                name: name("d")?,
                node: new_node(id + 200),
            };
            assert_ne!(s.apply(mkdir)?, 0, "mkdir beneath symlink {link} succeeded");
            let bind = Op::Bind {
                id: id + 300,
                parent: id,
                name: name("x")?,
            };
            assert_ne!(s.apply(bind)?, 0, "lookup beneath symlink {link} succeeded");
            let write = Op::Write {
                id,
                offset: 0,
                data: vmha_fs::buffer::Payload::default(),
            };
            assert_ne!(s.apply(write)?, 0, "write to symlink {link} succeeded");
            let trunc = Op::Truncate { id, size: 0 };
            assert_ne!(
                s.apply(trunc)?,
                0,
                "truncate through symlink {link} succeeded"
            );
            let xattr = Op::SetXattr {
                id,
                name: name("user.x")?,
                value: vmha_fs::op::XattrValue::new(b"v".to_vec()).unwrap(),
                flags: 0,
            };
            assert_ne!(s.apply(xattr)?, 0, "xattr through symlink {link} succeeded");
        }
        // An id it never bound.
        assert_ne!(s.apply(Op::Truncate { id: 999, size: 0 })?, 0);
    }
    assert!(
        entries(&outside).is_empty(),
        "outside changed: {:?}",
        entries(&outside)
    );

    // 3. The real primary connects and replicates while hostile clients keep trying.
    pair.start_primary()?;
    std::fs::write(pair.mount().join("before"), b"1")?;

    let mut no_key = connect(&pair)?;
    let wrong = ClusterKey::generate();
    assert!(matches!(
        wire::client_handshake(&mut no_key, &wrong, &binding(&pair)?),
        Err(WireError::AuthFailed)
    ));
    let mut garbage = connect(&pair)?;
    let _ = garbage.write_all(&[0x55u8; 4096]);
    let mut sink = Vec::new();
    let _ = garbage.read_to_end(&mut sink); // the receiver closes it
    match Session::open(&pair)? {
        Err(WireError::Refused(_)) => {}
        Err(e) => bail!("second primary: unexpected error {e}"),
        Ok(_) => bail!("a second primary was accepted while one is connected"),
    }

    // Through the mount: a symlink out of the directory, then a write "through" it.
    // The primary's own kernel follows it locally; the secondary must not.
    std::os::unix::fs::symlink("../pri-outside", pair.mount().join("esc"))?;
    std::fs::create_dir_all(root.join("pri/pri-outside"))?;
    std::fs::write(pair.mount().join("esc/x"), b"local only")?;
    assert!(
        !root.join("sec/pri-outside").exists(),
        "secondary followed a symlink"
    );

    std::fs::write(pair.mount().join("after"), b"2")?;
    assert_eq!(
        std::fs::read(pair.secondary_backing().join("before"))?,
        b"1"
    );
    assert_eq!(std::fs::read(pair.secondary_backing().join("after"))?, b"2");
    assert_eq!(
        std::fs::read_link(pair.secondary_backing().join("esc"))?,
        Path::new("../pri-outside")
    );
    assert!(
        entries(&outside).is_empty(),
        "outside changed: {:?}",
        entries(&outside)
    );
    pair.stop()?;
    Ok(())
}

/// A receiver of the pair's port that holds the key, accepts the primary's claim
/// and then lets `serve` answer its frames (in a thread: join it after the pair
/// is gone).
fn fake_receiver(
    pair: &Pair,
    serve: impl FnOnce(FrameReader<TcpStream>, FrameWriter<TcpStream>) -> Result<()> + Send + 'static,
) -> Result<std::thread::JoinHandle<Result<()>>> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", pair.port()))?;
    let key = ClusterKey::load(pair.key_file())?;
    let bind = binding(pair)?;
    Ok(std::thread::spawn(move || -> Result<()> {
        let (mut stream, _) = listener.accept()?;
        let keys = wire::server_handshake(&mut stream, &key, &bind)?;
        let mut reader = FrameReader::for_session(stream.try_clone()?, &keys);
        let mut writer = FrameWriter::for_session(stream, &keys);
        match reader.recv()? {
            Message::Claim { .. } => {}
            other => bail!("expected Claim, got {other:?}"),
        }
        if keys.version >= wire::SOFTWARE_SINCE {
            writer.send(&Message::Software {
                version: "fake".into(),
            })?;
        }
        writer.send(&Message::Welcome { report: false })?;
        writer.flush()?;
        serve(reader, writer)
    }))
}

/// A receiver that holds the key but answers with error numbers no kernel has
/// (peer-provided numbers are checked before use): the primary drops the link
/// and fails the write after the lock timeout, logged, never a panic.
#[test]
fn a_receiver_answering_an_invalid_errno_is_dropped_not_a_panic() -> Result<()> {
    let mut pair = Pair::prepare(PairOptions::default())?;
    // Every operation "failed" with an error number outside 1..4095.
    let fake = fake_receiver(&pair, |mut reader, mut writer| {
        while let Ok(msg) = reader.recv() {
            if let Message::Op { seq, .. } = msg {
                writer.send(&Message::Acks(vec![wire::Ack { seq, errno: 99_999 }]))?;
                writer.flush()?;
            }
        }
        Ok(())
    })?;
    pair.start_primary()?;
    let created = std::fs::write(pair.mount().join("f"), b"data");
    let err = created.expect_err("a create acknowledged with an invalid errno succeeded");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let primary = pair.primary().context("no primary")?;
    assert!(primary.try_status()?.is_none(), "the primary exited");
    let log = primary.stderr_text();
    assert!(!log.contains("panicked"), "the primary panicked:\n{log}");
    assert!(
        log.contains("invalid error number 99999"),
        "the invalid answer is not logged:\n{log}"
    );
    drop(pair);
    let _ = fake.join();
    Ok(())
}

/// A receiver busy with one long operation (saving a split brain's tree aside,
/// removing 100,000 files) pings instead of acknowledging. The pings are progress:
/// the primary keeps waiting well past its lock timeout instead of failing the write
/// with EIO. And they acknowledge nothing: the write completes only when its
/// acknowledgement comes.
#[test]
fn a_receivers_pings_keep_a_long_operation_alive_and_acknowledge_nothing() -> Result<()> {
    let opts = PairOptions::default();
    let hold = Duration::from_millis(opts.lock_timeout_ms * 3);
    let mut pair = Pair::prepare(opts)?;
    let fake = fake_receiver(&pair, move |mut reader, mut writer| {
        let mut held = false;
        while let Ok(msg) = reader.recv() {
            let Message::Op { seq, op } = msg else {
                continue;
            };
            if matches!(op, Op::Write { .. }) && !held {
                // The first write takes "long": a ping a second, then its ack.
                held = true;
                let began = Instant::now();
                while began.elapsed() < hold {
                    std::thread::sleep(Duration::from_secs(1));
                    writer.send(&Message::Ping)?;
                    writer.flush()?;
                }
            }
            writer.send(&Message::Acks(vec![wire::Ack { seq, errno: 0 }]))?;
            writer.flush()?;
        }
        Ok(())
    })?;
    pair.start_primary()?;
    let began = Instant::now();
    let written = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(pair.mount().join("f"))?;
        f.write_all(b"data")?;
        f.sync_all()
    })();
    let took = began.elapsed();
    let primary = pair.primary().context("no primary")?;
    let log = primary.stderr_text();
    written.with_context(|| format!("the write failed while the receiver pinged:\n{log}"))?;
    assert!(
        took >= hold,
        "the write completed after {took:?}, before its acknowledgement ({hold:?})"
    );
    assert!(
        !log.contains("no acknowledgement"),
        "the primary took the pinging receiver for stalled:\n{log}"
    );
    assert_eq!(std::fs::read(pair.mount().join("f"))?, b"data");
    drop(pair);
    let _ = fake.join();
    Ok(())
}
