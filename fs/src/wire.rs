//! The replication protocol: a versioned, mutually authenticated handshake bound
//! to one module's directory, then length-prefixed frames, each with a keyed blake3
//! MAC over its direction's frame counter, so a frame cannot be forged, altered,
//! replayed, dropped or reordered.
//!
//! Handshake (fixed layout, little endian):
//!   primary  -> receiver: "VMHA" min:u16 max:u16 nonce_p:[32] binding
//!   receiver -> primary : "VMHA" version:u16 status:u8, then by status:
//!                         ok: nonce_r:[32] proof_r:[32]; wrong module: binding;
//!                         version: min:u16 max:u16 (the receiver's range)
//!   primary  -> receiver: proof_p:[32]
//! where min..=max is the range of protocol versions the primary speaks and
//! `version` the highest one both speak (see [`crate::version`]; no common one is
//! refused, naming both ranges), binding = port:u16 name_len:u8 name[name_len]
//! names the module and the replication port (one per replicated directory) the
//! primary means to reach, and proof_x = keyed_blake3(cluster_key, label_x ||
//! nonce_p || nonce_r || binding || min || max || version). The primary's range and
//! the chosen version are inside the proofs, so nobody in between can rewrite them
//! to force an older version.
//!
//! The same handshake authenticates vmhad's daemon channel (its own port, binding
//! and version range, `vmha_controller::channel`): [`client_handshake_versions`],
//! [`ServerHandshake::with_versions`], and frames read with
//! [`FrameReader::recv_raw`].
//! A receiver of another module (a port mix-up) answers "wrong module" instead of
//! proving itself, so the primary reports the mix-up rather than being fenced; and
//! because the binding is inside the proofs and session keys, nobody in between can
//! rewrite it to steer a primary into another module's directory. The first framed
//! message from the primary is `Claim` (which data generation it writes), the
//! receiver's answer `Welcome` or `Refused`. A `Welcome` that announces a report is
//! followed by any number of `ReportPart` frames and one `ReportEnd`: a report on a
//! million files streams in frames of bounded size (each with its own MAC) instead
//! of needing one frame for all of it.
//!
//! The receiver's side is a byte-driven state machine ([`ServerHandshake`]), so one
//! thread can multiplex many unauthenticated connections (see `preauth`).
//!
//! Frame: meta_len:u32 data_len:u32 meta[meta_len] data[data_len] mac:[32]
//! meta is a bincode-encoded `Message`; data is the payload of a `Write`.

use std::io::{IoSlice, Read, Write};

use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::buffer::{AlignedBuf, Payload};
use crate::key::ClusterKey;
use crate::op::{Control, NodeId, Op};
use crate::version::Versions;

/// The replication protocol versions this build speaks. History: 3: the handshake
/// binds the module and port; 4: the receiver's report streams in `ReportPart`
/// frames; 5: the sync's instructions travel as `Control`, apart from the replicated
/// `Op`s (and, from this release on, the handshake negotiates the version); 6: the
/// receiver names its software version first ([`Message::Software`]); 7:
/// `OpReceipt` / `Received` (protocol B); 8: `TimedAcks` (the receiver's time on
/// each operation, for the writer's per-stage metrics); 9: a frame's MAC covers
/// its payload's blake3 digest instead of the payload itself
/// ([`PAYLOAD_DIGEST_SINCE`]); 10: the receiver tells of its early syncs
/// ([`Message::Synced`]).
pub const REPLICATION: Versions = Versions { min: 5, max: 10 };
/// The newest replication protocol version.
pub const PROTOCOL_VERSION: u16 = REPLICATION.max;
/// The first version whose receiver sends [`Message::Software`].
pub const SOFTWARE_SINCE: u16 = 6;
/// The first version whose receiver confirms receipt (`OpReceipt` /
/// `Received`): with an older peer, protocol B runs as C.
pub const RECEIPT_SINCE: u16 = 7;
/// The first version whose receiver acknowledges with [`Message::TimedAcks`].
pub const TIMED_ACKS_SINCE: u16 = 8;
/// The first version whose frames are authenticated as
/// `keyed_blake3(key, counter || header || meta || blake3(data))` (the data part
/// only when there is data) instead of `keyed_blake3(key, counter || header ||
/// meta || data)`: the same strength (forging a frame means finding a blake3
/// collision or the key), and the payload is hashed from its first byte in
/// whole chunks, which blake3 hashes in parallel: a 4 KiB frame's MAC takes 1.6
/// instead of 3.5 µs (the meta before the data put every chunk of the payload
/// off blake3's chunk boundaries); a 1 MiB frame's the same.
pub const PAYLOAD_DIGEST_SINCE: u16 = 9;
/// The first version whose receiver sends [`Message::Synced`] (an older writer
/// would take it for garbage).
pub const SYNCED_SINCE: u16 = 10;
const MAGIC: &[u8; 4] = b"VMHA";
/// Largest encoded header (an xattr value of 64 KiB plus names fits).
pub const MAX_META_LEN: u32 = 128 * 1024;
/// Largest write payload in one frame (FUSE sends at most 1 MiB).
pub const MAX_DATA_LEN: u32 = 4 << 20;
const MAC_LEN: usize = 32;
/// A write payload from this size on is read into an aligned, recycled buffer
/// (smaller ones into a plain vector: they are not worth a page).
const ALIGNED_FROM: usize = 64 << 10;
/// A frame's payload at least this large is sent before it is authenticated
/// (the tag follows it), so that both sides hash it at the same time.
const HASH_AFTER_SEND_FROM: usize = 64 << 10;
/// The receiver hashes a large payload in pieces of at least this many bytes
/// as they arrive (smaller pieces cost blake3 its parallelism across chunks).
const HASH_STEP: usize = 64 << 10;
const STATUS_OK: u8 = 0;
const STATUS_VERSION: u8 = 1;
const STATUS_WRONG_MODULE: u8 = 2;
/// Longest module name a binding carries.
pub const MAX_MODULE_NAME: usize = 255;
/// The module name both sides use when none is given (standalone use).
pub const DEFAULT_MODULE: &str = "default";

/// Errors of the replication protocol.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection closed by peer")]
    Closed,
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a vmha peer (bad magic)")]
    BadMagic,
    /// The client's view: what listens there is not a vmha-fs secondary.
    #[error("not a vmha-fs secondary: {0}")]
    NotVmha(&'static str),
    #[error("no common protocol version: this side speaks {ours}, the peer {theirs} (upgrade the older node)")]
    Version { ours: Versions, theirs: Versions },
    #[error("wrong module: this side is {ours}, the peer is {theirs} (check the modules' ports)")]
    WrongModule { ours: Binding, theirs: Binding },
    #[error("authentication failed: the peer does not hold the cluster key")]
    AuthFailed,
    #[error("frame too large: {0} bytes")]
    TooLarge(u64),
    #[error("frame integrity check failed (corrupted, forged or replayed)")]
    BadMac,
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("session refused by receiver: {0}")]
    Refused(String),
    #[error("peer silent for {0} s")]
    Silent(u64),
    #[error("handshake not finished within {0} ms")]
    Deadline(u64),
}

impl WireError {
    /// A short, stable name of the kind of error (for rate-limited logs).
    pub fn kind(&self) -> &'static str {
        match self {
            WireError::Closed => "closed",
            WireError::Io(_) => "io",
            WireError::BadMagic | WireError::NotVmha(_) => "bad_magic",
            WireError::Version { .. } => "version",
            WireError::WrongModule { .. } => "wrong_module",
            WireError::AuthFailed => "auth_failed",
            WireError::TooLarge(_) => "too_large",
            WireError::BadMac => "bad_mac",
            WireError::Malformed(_) => "malformed",
            WireError::Refused(_) => "refused",
            WireError::Silent(_) => "silent",
            WireError::Deadline(_) => "deadline",
        }
    }
}

/// Which module's directory a session is for: the module's name and the
/// replication port of the directory (a module's directory `i` uses `port + i`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    module: String,
    port: u16,
}

impl Binding {
    /// `module` must be 1 to [`MAX_MODULE_NAME`] bytes.
    pub fn new(module: &str, port: u16) -> Result<Binding, WireError> {
        if module.is_empty() || module.len() > MAX_MODULE_NAME {
            return Err(WireError::Malformed(format!(
                "module name must be 1 to {MAX_MODULE_NAME} bytes"
            )));
        }
        Ok(Binding {
            module: module.to_string(),
            port,
        })
    }

    pub fn module(&self) -> &str {
        &self.module
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(3 + self.module.len());
        out.extend_from_slice(&self.port.to_le_bytes());
        // `new` keeps the name at most 255 bytes.
        out.push(u8::try_from(self.module.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(self.module.as_bytes());
        out
    }

    /// Decodes a binding from its port and name bytes (the name need not be UTF-8
    /// on the wire; it is shown lossily).
    fn decode(port: [u8; 2], name: &[u8]) -> Binding {
        Binding {
            module: String::from_utf8_lossy(name).into_owned(),
            port: u16::from_le_bytes(port),
        }
    }
}

impl std::fmt::Display for Binding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "module `{}` port {}", self.module, self.port)
    }
}

/// A receiver's acknowledgement of one operation: 0 or the errno it failed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub seq: u64,
    pub errno: i32,
}

/// An [`Ack`] with the receiver's own time on the operation (applying it, or
/// syncing), in nanoseconds: the writer's `peer_busy` stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimedAck {
    pub seq: u64,
    pub errno: i32,
    pub busy_ns: u64,
}

/// Everything that travels in a frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// The primary's first frame: the data generation it writes (set by its
    /// controller), so that a receiver can refuse a stale writer.
    Claim { generation: Option<String> },
    /// The receiver accepts this primary. With `report`, its report on its copy
    /// (namespace and the regions its own records say may differ, for an
    /// incremental resync) follows: `ReportPart`s, then `ReportEnd`.
    Welcome { report: bool },
    /// The receiver refuses this primary (for example: it already serves one).
    Refused { reason: String },
    /// The next operation of the ordered stream.
    Op { seq: u64, op: Op },
    /// The next entry of the same ordered stream, when it is an instruction of the
    /// sync rather than a replicated mutation (shares `seq` and acks with `Op`).
    Control { seq: u64, control: Control },
    /// Operations the receiver finished.
    Acks(Vec<Ack>),
    /// The receiver's answer to `Control::Compare` number `seq` (sent before its ack):
    /// the indexes of the blocks whose content differs.
    Differ { seq: u64, blocks: Vec<u32> },
    /// Keeps an idle session alive.
    Ping,
    /// One piece of the report a `Welcome` announced.
    ReportPart(crate::track::ReportPart),
    /// The end of the report: whether the records are valid, and whether the
    /// report is complete (false: the receiver could not list its copy, so the
    /// parts say nothing); `entries` counts the entries of all parts.
    ReportEnd {
        valid: bool,
        complete: bool,
        entries: u64,
    },
    /// Protocol 6 on: the receiver's first frame, naming its software version
    /// (logged by the primary, so a mixed pair during an upgrade shows who runs what).
    Software { version: String },
    /// Like `Op`, and the receiver confirms receipt (`Received`) before it
    /// applies it: a write of protocol B.
    OpReceipt { seq: u64, op: Op },
    /// The receiver has read every operation up to `upto` (it applies them
    /// whatever happens to the connection now).
    Received { upto: u64 },
    /// Protocol 8 on: `Acks`, each with the receiver's time on the operation.
    TimedAcks(Vec<TimedAck>),
    /// Protocol 10 on, unasked: the receiver synced file `id` (fdatasync)
    /// after applying every operation up to `upto`; it covers each of them
    /// that changed the file (an early sync, see `presync`).
    Synced { id: NodeId, upto: u64 },
}

/// Per-direction MAC keys of an authenticated session.
#[derive(Clone)]
pub struct SessionKeys {
    pub send: [u8; 32],
    pub recv: [u8; 32],
    /// The protocol version both sides chose (the highest common one).
    pub version: u16,
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKeys(..)")
    }
}

fn mac(key: &[u8; 32], parts: &[&[u8]]) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new_keyed(key);
    for part in parts {
        hasher.update(part);
    }
    hasher.finalize()
}

/// The nonces and binding of one handshake, from which proofs and keys derive.
struct Transcript {
    nonce_p: [u8; 32],
    nonce_r: [u8; 32],
    binding: Vec<u8>,
    /// The primary's range and the chosen version: min, max, version.
    versions: [u8; 6],
}

impl Transcript {
    fn derive(&self, key: &ClusterKey, label: &[u8]) -> [u8; 32] {
        *mac(
            key.as_bytes(),
            &[
                label,
                &self.nonce_p,
                &self.nonce_r,
                &self.binding,
                &self.versions,
            ],
        )
        .as_bytes()
    }
}

fn transcript_versions(client: Versions, chosen: u16) -> [u8; 6] {
    let mut out = [0u8; 6];
    out[..2].copy_from_slice(&client.min.to_le_bytes());
    out[2..4].copy_from_slice(&client.max.to_le_bytes());
    out[4..].copy_from_slice(&chosen.to_le_bytes());
    out
}

/// The replication versions this process advertises: [`REPLICATION`], narrowed by
/// the test hook [`crate::version::REPLICATION_ENV`] when it is set and valid
/// (`vmha-fs` refuses to start on an invalid value).
pub fn replication_versions() -> Versions {
    static VERSIONS: std::sync::OnceLock<Versions> = std::sync::OnceLock::new();
    *VERSIONS.get_or_init(|| {
        REPLICATION
            .from_env(crate::version::REPLICATION_ENV)
            .unwrap_or(REPLICATION)
    })
}

fn random_nonce() -> [u8; 32] {
    let mut nonce = [0u8; 32];
    rand::rng().fill_bytes(&mut nonce);
    nonce
}

fn read_exact_or_closed(r: &mut impl Read, buf: &mut [u8]) -> Result<(), WireError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => WireError::Closed,
        _ => WireError::Io(e),
    })
}

/// A frame's MAC up to its payload: keyed over its counter, header and meta
/// (the writer and the reader both start here).
fn frame_hasher(key: &[u8; 32], counter: u64, header: &[u8; 8], meta: &[u8]) -> blake3::Hasher {
    let mut hasher = blake3::Hasher::new_keyed(key);
    hasher.update(&counter.to_le_bytes());
    hasher.update(header);
    hasher.update(meta);
    hasher
}

/// Adds a frame's payload to its MAC: itself, or (`digest`) its blake3 digest.
fn hash_data(hasher: &mut blake3::Hasher, data: &[u8], digest: bool) {
    if digest {
        hasher.update(blake3::hash(data).as_bytes());
    } else {
        hasher.update(data);
    }
}

/// Fills `buf` from `r`, hashing what has arrived in steps of at least
/// [`HASH_STEP`] bytes while the rest is still on its way: a large payload's
/// hash is done (but for the last step) when its last byte is read.
fn read_hashing(
    r: &mut impl Read,
    buf: &mut [u8],
    hasher: &mut blake3::Hasher,
) -> Result<(), WireError> {
    let (mut filled, mut hashed) = (0, 0);
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => return Err(WireError::Closed),
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(WireError::Io(e)),
        }
        if filled - hashed >= HASH_STEP || filled == buf.len() {
            hasher.update(&buf[hashed..filled]);
            hashed = filled;
        }
    }
    Ok(())
}

/// `Write::write_all` for several slices (the std one is not stable yet).
fn write_all_vectored(w: &mut impl Write, mut bufs: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The primary's side of the handshake, for the receiver of `binding`, offering
/// [`replication_versions`].
pub fn client_handshake(
    stream: &mut (impl Read + Write),
    key: &ClusterKey,
    binding: &Binding,
) -> Result<SessionKeys, WireError> {
    client_handshake_versions(stream, key, binding, replication_versions())
}

/// The client's side of the handshake offering `versions` (the replication
/// primary's, or vmhad's daemon channel with its own range).
pub fn client_handshake_versions(
    stream: &mut (impl Read + Write),
    key: &ClusterKey,
    binding: &Binding,
    versions: Versions,
) -> Result<SessionKeys, WireError> {
    let nonce_p = random_nonce();
    let encoded = binding.encode();
    let mut hello = Vec::with_capacity(40 + encoded.len());
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&versions.min.to_le_bytes());
    hello.extend_from_slice(&versions.max.to_le_bytes());
    hello.extend_from_slice(&nonce_p);
    hello.extend_from_slice(&encoded);
    // Whatever listens there but is not a receiver (a web server, a socket
    // that closes) is named as such, not as a raw read error.
    let not_vmha = |e: WireError| match e {
        WireError::Closed => {
            WireError::NotVmha("it closed the connection without answering the vmha handshake")
        }
        WireError::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            WireError::NotVmha("it accepted the connection but did not answer the vmha handshake")
        }
        WireError::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ) =>
        {
            WireError::NotVmha("it reset the connection without answering the vmha handshake")
        }
        other => other,
    };
    stream
        .write_all(&hello)
        .and_then(|()| stream.flush())
        .map_err(|e| not_vmha(e.into()))?;
    let mut head = [0u8; 7];
    read_exact_or_closed(stream, &mut head).map_err(not_vmha)?;
    if &head[..4] != MAGIC {
        return Err(WireError::NotVmha(
            "it answered something else than the vmha handshake",
        ));
    }
    let chosen = u16::from_le_bytes([head[4], head[5]]);
    if head[6] == STATUS_VERSION {
        let mut range = [0u8; 4];
        read_exact_or_closed(stream, &mut range)?;
        let (min, max) = (
            u16::from_le_bytes([range[0], range[1]]),
            u16::from_le_bytes([range[2], range[3]]),
        );
        return Err(WireError::Version {
            ours: versions,
            theirs: Versions::new(min, max).ok_or_else(|| {
                WireError::Malformed(format!("empty version range {min}..={max}"))
            })?,
        });
    }
    match head[6] {
        STATUS_OK => {}
        STATUS_WRONG_MODULE => {
            let mut fixed = [0u8; 3];
            read_exact_or_closed(stream, &mut fixed)?;
            let mut name = vec![0u8; usize::from(fixed[2])];
            read_exact_or_closed(stream, &mut name)?;
            return Err(WireError::WrongModule {
                ours: binding.clone(),
                theirs: Binding::decode([fixed[0], fixed[1]], &name),
            });
        }
        other => {
            return Err(WireError::Malformed(format!(
                "unknown handshake status {other}"
            )))
        }
    }
    if !versions.contains(chosen) {
        return Err(WireError::Malformed(format!(
            "the peer chose protocol version {chosen}, not among ours ({versions})"
        )));
    }
    let mut rest = [0u8; 64];
    read_exact_or_closed(stream, &mut rest)?;
    let mut nonce_r = [0u8; 32];
    nonce_r.copy_from_slice(&rest[..32]);
    let transcript = Transcript {
        nonce_p,
        nonce_r,
        binding: encoded,
        versions: transcript_versions(versions, chosen),
    };
    let expected = blake3::Hash::from(transcript.derive(key, b"vmha receiver proof"));
    let mut proof_r = [0u8; 32];
    proof_r.copy_from_slice(&rest[32..]);
    // blake3::Hash compares in constant time.
    if expected != blake3::Hash::from(proof_r) {
        return Err(WireError::AuthFailed);
    }
    stream.write_all(&transcript.derive(key, b"vmha primary proof"))?;
    stream.flush()?;
    Ok(SessionKeys {
        send: transcript.derive(key, b"vmha frames to receiver"),
        recv: transcript.derive(key, b"vmha frames to primary"),
        version: chosen,
    })
}

/// What the receiver's handshake asks for after a piece of input.
#[derive(Debug)]
pub enum Progress {
    /// More input is needed: at most [`ServerHandshake::wants`] bytes.
    More,
    /// Send these bytes to the primary, then read on.
    Send(Vec<u8>),
    /// Send these bytes (best effort), then close: the handshake failed.
    Refuse(Vec<u8>, WireError),
    /// The primary is authenticated.
    Done(SessionKeys),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Magic and version.
    Head,
    /// nonce_p, port and name length.
    Fixed,
    /// The module name.
    Name,
    /// The primary's proof.
    Proof,
    Finished,
}

/// The receiver's side of the handshake, fed bytes as they arrive. It never asks
/// for more than the handshake holds, so what follows the proof (the primary's first
/// frame) stays in the socket for the session.
pub struct ServerHandshake {
    key: ClusterKey,
    binding: Binding,
    versions: Versions,
    /// The client's range and the version chosen, once known.
    client: Versions,
    chosen: u16,
    stage: Stage,
    /// The current piece, filled up to `need` bytes.
    piece: Vec<u8>,
    need: usize,
    nonce_p: [u8; 32],
    port: [u8; 2],
    transcript: Option<Transcript>,
}

impl std::fmt::Debug for ServerHandshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServerHandshake({:?}, {})", self.stage, self.binding)
    }
}

impl ServerHandshake {
    /// A handshake for the receiver of `binding`, speaking [`replication_versions`].
    pub fn new(key: ClusterKey, binding: Binding) -> Self {
        Self::with_versions(key, binding, replication_versions())
    }

    /// A handshake for the server of `binding` speaking `versions`.
    pub fn with_versions(key: ClusterKey, binding: Binding, versions: Versions) -> Self {
        Self {
            key,
            binding,
            versions,
            client: versions,
            chosen: versions.max,
            stage: Stage::Head,
            piece: Vec::with_capacity(64),
            need: 8,
            nonce_p: [0; 32],
            port: [0; 2],
            transcript: None,
        }
    }

    /// How many more bytes the handshake needs now (0 once finished).
    pub fn wants(&self) -> usize {
        self.need - self.piece.len()
    }

    /// Whether the primary's hello arrived complete (a connection still sending
    /// it is a first candidate for eviction).
    pub fn hello_done(&self) -> bool {
        matches!(self.stage, Stage::Proof | Stage::Finished)
    }

    /// Takes the next bytes of input (at most `wants()`; more is an error).
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Progress, WireError> {
        if bytes.len() > self.wants() || self.stage == Stage::Finished {
            return Err(WireError::Malformed("handshake input overrun".into()));
        }
        self.piece.extend_from_slice(bytes);
        if self.wants() > 0 {
            return Ok(Progress::More);
        }
        let piece = std::mem::take(&mut self.piece);
        match self.stage {
            Stage::Head => {
                if &piece[..4] != MAGIC {
                    return Err(WireError::BadMagic);
                }
                let (min, max) = (
                    u16::from_le_bytes([piece[4], piece[5]]),
                    u16::from_le_bytes([piece[6], piece[7]]),
                );
                let theirs = Versions::new(min, max).ok_or_else(|| {
                    WireError::Malformed(format!("empty version range {min}..={max}"))
                })?;
                let Some(chosen) = self.versions.highest_common(theirs) else {
                    self.stage = Stage::Finished;
                    self.need = 0;
                    let mut reply = self.reply_head(STATUS_VERSION);
                    reply.extend_from_slice(&self.versions.min.to_le_bytes());
                    reply.extend_from_slice(&self.versions.max.to_le_bytes());
                    return Ok(Progress::Refuse(
                        reply,
                        WireError::Version {
                            ours: self.versions,
                            theirs,
                        },
                    ));
                };
                self.client = theirs;
                self.chosen = chosen;
                self.next(Stage::Fixed, 35);
                Ok(Progress::More)
            }
            Stage::Fixed => {
                self.nonce_p.copy_from_slice(&piece[..32]);
                self.port = [piece[32], piece[33]];
                let len = usize::from(piece[34]);
                if len == 0 {
                    return Err(WireError::Malformed("empty module name".into()));
                }
                self.next(Stage::Name, len);
                Ok(Progress::More)
            }
            Stage::Name => {
                let theirs = Binding::decode(self.port, &piece);
                if theirs != self.binding {
                    self.stage = Stage::Finished;
                    self.need = 0;
                    let mut reply = self.reply_head(STATUS_WRONG_MODULE);
                    reply.extend_from_slice(&self.binding.encode());
                    return Ok(Progress::Refuse(
                        reply,
                        WireError::WrongModule {
                            ours: self.binding.clone(),
                            theirs,
                        },
                    ));
                }
                let transcript = Transcript {
                    nonce_p: self.nonce_p,
                    nonce_r: random_nonce(),
                    binding: self.binding.encode(),
                    versions: transcript_versions(self.client, self.chosen),
                };
                let mut reply = self.reply_head(STATUS_OK);
                reply.extend_from_slice(&transcript.nonce_r);
                reply.extend_from_slice(&transcript.derive(&self.key, b"vmha receiver proof"));
                self.transcript = Some(transcript);
                self.next(Stage::Proof, 32);
                Ok(Progress::Send(reply))
            }
            Stage::Proof => {
                self.stage = Stage::Finished;
                self.need = 0;
                let transcript = self.transcript.take().ok_or(WireError::AuthFailed)?;
                let expected =
                    blake3::Hash::from(transcript.derive(&self.key, b"vmha primary proof"));
                let mut proof_p = [0u8; 32];
                proof_p.copy_from_slice(&piece);
                if expected != blake3::Hash::from(proof_p) {
                    return Err(WireError::AuthFailed);
                }
                Ok(Progress::Done(SessionKeys {
                    send: transcript.derive(&self.key, b"vmha frames to primary"),
                    recv: transcript.derive(&self.key, b"vmha frames to receiver"),
                    version: self.chosen,
                }))
            }
            Stage::Finished => Err(WireError::Malformed("handshake input overrun".into())),
        }
    }

    fn next(&mut self, stage: Stage, need: usize) {
        self.stage = stage;
        self.need = need;
        self.piece.clear();
    }

    fn reply_head(&self, status: u8) -> Vec<u8> {
        let mut reply = Vec::with_capacity(71);
        reply.extend_from_slice(MAGIC);
        reply.extend_from_slice(&self.chosen.to_le_bytes());
        reply.push(status);
        reply
    }
}

/// The receiver's side of the handshake on a blocking stream (the receiver itself
/// multiplexes [`ServerHandshake`]s; this is for tests and simple tools).
pub fn server_handshake(
    stream: &mut (impl Read + Write),
    key: &ClusterKey,
    binding: &Binding,
) -> Result<SessionKeys, WireError> {
    let mut handshake = ServerHandshake::new(key.clone(), binding.clone());
    loop {
        let mut buf = vec![0u8; handshake.wants()];
        read_exact_or_closed(stream, &mut buf)?;
        match handshake.feed(&buf)? {
            Progress::More => {}
            Progress::Send(reply) => {
                stream.write_all(&reply)?;
                stream.flush()?;
            }
            Progress::Refuse(reply, error) => {
                let _ = stream.write_all(&reply).and_then(|()| stream.flush());
                return Err(error);
            }
            Progress::Done(keys) => return Ok(keys),
        }
    }
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ MAX_META_LEN as usize }>()
}

/// Writes authenticated frames.
pub struct FrameWriter<W: Write> {
    inner: W,
    key: [u8; 32],
    counter: u64,
    /// MAC over the payload's digest ([`PAYLOAD_DIGEST_SINCE`]).
    digest: bool,
}

impl<W: Write> std::fmt::Debug for FrameWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FrameWriter(counter {})", self.counter)
    }
}

impl<W: Write> FrameWriter<W> {
    /// A writer whose MAC covers the payload itself (versions before
    /// [`PAYLOAD_DIGEST_SINCE`], and vmhad's daemon channel).
    pub fn new(inner: W, key: [u8; 32]) -> Self {
        Self {
            inner,
            key,
            counter: 0,
            digest: false,
        }
    }

    /// The writer of a replication session: its send key, and the MAC of the
    /// negotiated version.
    pub fn for_session(inner: W, keys: &SessionKeys) -> Self {
        Self {
            digest: keys.version >= PAYLOAD_DIGEST_SINCE,
            ..Self::new(inner, keys.send)
        }
    }

    /// Queues one message; call `flush` to push buffered frames out.
    pub fn send(&mut self, msg: &Message) -> Result<(), WireError> {
        let meta = bincode::serde::encode_to_vec(msg, bincode_config())
            .map_err(|e| WireError::Malformed(format!("cannot encode: {e}")))?;
        let data: &[u8] = match msg {
            Message::Op {
                op: Op::Write { data, .. },
                ..
            }
            | Message::OpReceipt {
                op: Op::Write { data, .. },
                ..
            } => data,
            _ => &[],
        };
        self.send_raw(&meta, data)
    }

    /// Sends an arbitrary header and data under a valid MAC. Used by `send`, and by
    /// tests that check what the receiver does with well-authenticated garbage.
    pub fn send_raw(&mut self, meta: &[u8], data: &[u8]) -> Result<(), WireError> {
        let too_large = || WireError::TooLarge((meta.len() + data.len()) as u64);
        let (Ok(meta_len), Ok(data_len)) = (u32::try_from(meta.len()), u32::try_from(data.len()))
        else {
            return Err(too_large());
        };
        if meta_len > MAX_META_LEN || data_len > MAX_DATA_LEN {
            return Err(too_large());
        }
        let mut header = [0u8; 8];
        header[..4].copy_from_slice(&meta_len.to_le_bytes());
        header[4..].copy_from_slice(&data_len.to_le_bytes());
        let mut hasher = frame_hasher(&self.key, self.counter, &header, meta);
        let digest = self.digest && !data.is_empty();
        if data.len() >= HASH_AFTER_SEND_FROM {
            // A large payload goes out first and is authenticated after: the
            // receiver reads and hashes it while we hash it here, so a MiB's
            // two hashes (~170 µs each) overlap instead of following each
            // other on the write's path. The tag follows in the buffer (sent
            // with the next flush). Same bytes on the wire as below.
            let mut parts = [
                IoSlice::new(&header),
                IoSlice::new(meta),
                IoSlice::new(data),
            ];
            write_all_vectored(&mut self.inner, &mut parts)?;
            hash_data(&mut hasher, data, digest);
            self.inner.write_all(hasher.finalize().as_bytes())?;
        } else {
            hash_data(&mut hasher, data, digest);
            let tag = hasher.finalize();
            // One vectored write: a frame goes out in one system call (the
            // buffer holds small ones together), not header, data and tag apart
            // (three calls and three segments for a 1 MiB write before). Tried:
            // authenticating and writing 256 KiB pieces so each is hashed while
            // in the cache: more system calls and wake-ups, more CPU in total
            // (`examples/frame_cpu`: 790 against 700 µs per MiB).
            let mut parts = [
                IoSlice::new(&header),
                IoSlice::new(meta),
                IoSlice::new(data),
                IoSlice::new(tag.as_bytes()),
            ];
            write_all_vectored(&mut self.inner, &mut parts)?;
        }
        self.counter += 1;
        Ok(())
    }

    pub fn flush(&mut self) -> Result<(), WireError> {
        self.inner.flush()?;
        Ok(())
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }
}

/// Reads and verifies authenticated frames.
pub struct FrameReader<R: Read> {
    inner: R,
    key: [u8; 32],
    counter: u64,
    /// MAC over the payload's digest ([`PAYLOAD_DIGEST_SINCE`]).
    digest: bool,
}

impl<R: Read> std::fmt::Debug for FrameReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FrameReader(counter {})", self.counter)
    }
}

impl<R: Read> FrameReader<std::io::BufReader<R>> {
    /// Bytes already read from the socket and not yet decoded: zero means the next
    /// `recv` would block, so now is the time to send what we owe the peer.
    pub fn buffered(&self) -> usize {
        self.inner.buffer().len()
    }
}

impl<R: Read> FrameReader<R> {
    /// A reader whose MAC covers the payload itself (versions before
    /// [`PAYLOAD_DIGEST_SINCE`], and vmhad's daemon channel).
    pub fn new(inner: R, key: [u8; 32]) -> Self {
        Self {
            inner,
            key,
            counter: 0,
            digest: false,
        }
    }

    /// The reader of a replication session: its receive key, and the MAC of
    /// the negotiated version.
    pub fn for_session(inner: R, keys: &SessionKeys) -> Self {
        Self {
            digest: keys.version >= PAYLOAD_DIGEST_SINCE,
            ..Self::new(inner, keys.recv)
        }
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// Reads the next message. Any error leaves the stream unusable: drop the connection.
    /// A large write payload is read straight into a (recycled) aligned buffer.
    pub fn recv(&mut self) -> Result<Message, WireError> {
        let (meta, data) = self.recv_frame(MAX_META_LEN, MAX_DATA_LEN, ALIGNED_FROM)?;
        decode_frame(&meta, data)
    }

    /// Reads the next authenticated frame's header and data sections, refusing
    /// (before reading them) sections longer than the given bounds (at most the
    /// protocol's [`MAX_META_LEN`] and [`MAX_DATA_LEN`]). For protocols that carry
    /// their own messages in these frames (vmhad's daemon channel).
    pub fn recv_raw(
        &mut self,
        max_meta: u32,
        max_data: u32,
    ) -> Result<(Vec<u8>, Vec<u8>), WireError> {
        let (meta, data) = self.recv_frame(max_meta, max_data, usize::MAX)?;
        match data {
            FrameData::Vec(data) => Ok((meta, data)),
            FrameData::Aligned(data) => Ok((meta, data.to_vec())),
        }
    }

    /// [`Self::recv_raw`]; a data section of at least `aligned_from` bytes is
    /// read into an [`AlignedBuf`].
    fn recv_frame(
        &mut self,
        max_meta: u32,
        max_data: u32,
        aligned_from: usize,
    ) -> Result<(Vec<u8>, FrameData), WireError> {
        let mut header = [0u8; 8];
        read_exact_or_closed(&mut self.inner, &mut header)?;
        let meta_len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let data_len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if meta_len > max_meta.min(MAX_META_LEN) || data_len > max_data.min(MAX_DATA_LEN) {
            return Err(WireError::TooLarge(
                u64::from(meta_len) + u64::from(data_len),
            ));
        }
        let mut meta = vec![0u8; meta_len as usize];
        read_exact_or_closed(&mut self.inner, &mut meta)?;
        let mut hasher = frame_hasher(&self.key, self.counter, &header, &meta);
        // The payload's own hasher under the digest MAC.
        let mut data_hasher = (self.digest && data_len > 0).then(blake3::Hasher::new);
        let data = if data_len as usize >= aligned_from {
            // Straight into a recycled aligned buffer (no zeroing, no fresh pages).
            let mut data = AlignedBuf::scratch(data_len as usize);
            read_hashing(
                &mut self.inner,
                data.as_mut_slice(),
                data_hasher.as_mut().unwrap_or(&mut hasher),
            )?;
            FrameData::Aligned(data)
        } else {
            // Read into spare capacity: the payload is not zeroed first.
            let mut data = Vec::with_capacity(data_len as usize);
            let read = (&mut self.inner)
                .take(u64::from(data_len))
                .read_to_end(&mut data)?;
            if read != data_len as usize {
                return Err(WireError::Closed);
            }
            data_hasher.as_mut().unwrap_or(&mut hasher).update(&data);
            FrameData::Vec(data)
        };
        if let Some(data_hasher) = data_hasher {
            hasher.update(data_hasher.finalize().as_bytes());
        }
        let mut tag = [0u8; MAC_LEN];
        read_exact_or_closed(&mut self.inner, &mut tag)?;
        // blake3::Hash compares in constant time.
        if hasher.finalize() != blake3::Hash::from(tag) {
            return Err(WireError::BadMac);
        }
        self.counter += 1;
        Ok((meta, data))
    }
}

/// A frame's data section as read.
#[derive(Debug)]
enum FrameData {
    Vec(Vec<u8>),
    Aligned(AlignedBuf),
}

impl FrameData {
    fn as_slice(&self) -> &[u8] {
        match self {
            FrameData::Vec(v) => v,
            FrameData::Aligned(a) => a,
        }
    }
}

/// The writer's side of a report a `Welcome { report: true }` announced: reads it
/// part by part (each part a bounded frame) until `ReportEnd`. `None`: the receiver
/// could not complete it (the writer then compares everything).
pub fn read_report<R: Read>(
    reader: &mut FrameReader<R>,
) -> Result<Option<Box<crate::track::Report>>, WireError> {
    let mut report = crate::track::Report::default();
    loop {
        match reader.recv()? {
            Message::ReportPart(part) => report.add(part),
            Message::ReportEnd {
                valid,
                complete,
                entries,
            } => {
                if !complete {
                    return Ok(None);
                }
                if entries != report.entries.len() as u64 {
                    return Err(WireError::Malformed(format!(
                        "report announced {entries} entries, carried {}",
                        report.entries.len()
                    )));
                }
                report.valid = valid;
                return Ok(Some(Box::new(report)));
            }
            other => {
                return Err(WireError::Malformed(format!(
                    "expected a report part, got {}",
                    other.kind()
                )))
            }
        }
    }
}

impl Message {
    /// The message's name, for errors (a report part's Debug can be large).
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Claim { .. } => "Claim",
            Message::Welcome { .. } => "Welcome",
            Message::Refused { .. } => "Refused",
            Message::Op { .. } => "Op",
            Message::Control { .. } => "Control",
            Message::Acks(_) => "Acks",
            Message::Differ { .. } => "Differ",
            Message::Ping => "Ping",
            Message::ReportPart(_) => "ReportPart",
            Message::ReportEnd { .. } => "ReportEnd",
            Message::Software { .. } => "Software",
            Message::OpReceipt { .. } => "OpReceipt",
            Message::Received { .. } => "Received",
            Message::TimedAcks(_) => "TimedAcks",
            Message::Synced { .. } => "Synced",
        }
    }
}

/// Decodes an authenticated frame's header and attaches its data section.
pub fn decode_message(meta: &[u8], data: Vec<u8>) -> Result<Message, WireError> {
    decode_frame(meta, FrameData::Vec(data))
}

fn decode_frame(meta: &[u8], data: FrameData) -> Result<Message, WireError> {
    let (mut msg, used): (Message, usize) =
        bincode::serde::decode_from_slice(meta, bincode_config())
            .map_err(|e| WireError::Malformed(e.to_string()))?;
    if used != meta.len() {
        return Err(WireError::Malformed(format!(
            "{} trailing bytes after the message",
            meta.len() - used
        )));
    }
    match &mut msg {
        Message::Op {
            op: Op::Write { data: payload, .. },
            ..
        }
        | Message::OpReceipt {
            op: Op::Write { data: payload, .. },
            ..
        } => {
            *payload = match data {
                FrameData::Vec(data) => Payload::Owned(std::sync::Arc::new(data)),
                FrameData::Aligned(data) => Payload::Aligned(std::sync::Arc::new(data)),
            }
        }
        _ if !data.as_slice().is_empty() => {
            return Err(WireError::Malformed(
                "data section on a message that carries none".into(),
            ))
        }
        _ => {}
    }
    Ok(msg)
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::op::{Name, NewNode, NodeKind, Time, XattrValue};
    use crate::track::{EntryKind, Report, ReportEntry, ReportPart};
    use proptest::prelude::*;
    use std::io::Cursor;
    use std::sync::Arc;

    fn keys() -> ([u8; 32], [u8; 32]) {
        ([7u8; 32], [9u8; 32])
    }

    fn encode(msgs: &[Message], key: [u8; 32]) -> Vec<u8> {
        let mut w = FrameWriter::new(Vec::new(), key);
        for m in msgs {
            assert!(w.send(m).is_ok());
        }
        w.inner
    }

    fn name(s: &str) -> Name {
        match Name::new(s.as_bytes()) {
            Ok(n) => n,
            Err(e) => panic!("test name {s}: {e}"),
        }
    }

    fn sample_ops() -> Vec<Message> {
        vec![
            Message::Welcome { report: false },
            Message::Welcome { report: true },
            Message::ReportPart(ReportPart {
                entries: vec![ReportEntry {
                    path: b"vm1/disk.img".to_vec(),
                    kind: EntryKind::File,
                    dirty: vec![(0, 4096), (1 << 30, (1 << 30) + 65536)],
                    attrs: crate::track::Attrs::default(),
                }],
                names: vec![b"vm1/new".to_vec()],
            }),
            Message::ReportEnd {
                valid: true,
                complete: true,
                entries: 1,
            },
            Message::Claim {
                generation: Some("00c0ffee".into()),
            },
            Message::Op {
                seq: 1,
                op: Op::Create {
                    parent: 1,
                    name: name("disk.img"),
                    node: NewNode {
                        id: 5,
                        mode: 0o644,
                        uid: 0,
                        gid: 0,
                    },
                    kind: NodeKind::Regular,
                    rdev: 0,
                },
            },
            Message::Op {
                seq: 2,
                op: Op::Write {
                    id: 5,
                    offset: 4096,
                    data: Payload::Owned(Arc::new(vec![0xab; 10000])),
                },
            },
            Message::Op {
                seq: 3,
                op: Op::SetAttr {
                    id: 5,
                    mode: Some(0o600),
                    uid: None,
                    gid: Some(3),
                    atime: Some(Time { sec: 5, nsec: 6 }),
                    mtime: None,
                },
            },
            Message::Op {
                seq: 4,
                op: Op::SetXattr {
                    id: 5,
                    name: name("user.x"),
                    value: XattrValue::new(vec![1, 2, 3]).unwrap_or_else(|_| unreachable!()),
                    flags: 0,
                },
            },
            Message::Control {
                seq: 5,
                control: Control::Remove {
                    parent: 1,
                    name: name("stale"),
                },
            },
            Message::Control {
                seq: 6,
                control: Control::Compare {
                    id: 5,
                    offset: 0,
                    block: 65536,
                    hashes: vec![[3u8; 32], [4u8; 32]],
                },
            },
            Message::Control {
                seq: 7,
                control: Control::Wipe,
            },
            Message::Acks(vec![Ack { seq: 1, errno: 0 }, Ack { seq: 2, errno: 5 }]),
            Message::TimedAcks(vec![TimedAck {
                seq: 3,
                errno: 0,
                busy_ns: 12_345,
            }]),
            Message::Synced { id: 4, upto: 9 },
            Message::Ping,
        ]
    }

    /// A report of `n` entries as a receiver streams it: parts of bounded size.
    fn streamed(n: usize, key: [u8; 32]) -> (Report, Vec<u8>, usize) {
        let mut report = Report {
            valid: true,
            ..Report::default()
        };
        let mut w = FrameWriter::new(Vec::new(), key);
        assert!(w.send(&Message::Welcome { report: true }).is_ok());
        let mut part = ReportPart::default();
        let mut largest = 0;
        let mut flush = |part: ReportPart, w: &mut FrameWriter<Vec<u8>>| {
            let before = w.inner.len();
            assert!(w.send(&Message::ReportPart(part)).is_ok());
            largest = largest.max(w.inner.len() - before);
        };
        for i in 0..n {
            let e = ReportEntry {
                path: format!("dir{:03}/file{i:07}", i % 1000).into_bytes(),
                kind: EntryKind::File,
                dirty: (0..(i % 5) as u64)
                    .map(|j| (j << 20, (j << 20) + 4096))
                    .collect(),
                attrs: crate::track::Attrs::default(),
            };
            report.entries.push(e.clone());
            part.entries.push(e);
            if part.entries.len() == 1000 {
                flush(std::mem::take(&mut part), &mut w);
            }
        }
        report.names.push(b"dir000".to_vec());
        part.names.push(b"dir000".to_vec());
        flush(part, &mut w);
        assert!(w
            .send(&Message::ReportEnd {
                valid: true,
                complete: true,
                entries: n as u64
            })
            .is_ok());
        (report, w.inner, largest)
    }

    #[test]
    fn a_report_of_a_hundred_thousand_files_streams_in_bounded_frames() {
        let (k, _) = keys();
        let (report, bytes, largest) = streamed(100_000, k);
        assert!(
            bytes.len() > MAX_META_LEN as usize * 10,
            "not a large report"
        );
        assert!(largest <= MAX_META_LEN as usize);
        let mut r = FrameReader::new(Cursor::new(bytes), k);
        assert!(matches!(r.recv(), Ok(Message::Welcome { report: true })));
        let got = read_report(&mut r).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got.as_deref(), Some(&report));
    }

    #[test]
    fn an_incomplete_or_miscounted_report_is_not_used() {
        let (k, _) = keys();
        let encode_end = |complete: bool, entries: u64| {
            let mut w = FrameWriter::new(Vec::new(), k);
            assert!(w.send(&sample_ops()[2]).is_ok());
            assert!(w
                .send(&Message::ReportEnd {
                    valid: true,
                    complete,
                    entries
                })
                .is_ok());
            w.inner
        };
        let mut r = FrameReader::new(Cursor::new(encode_end(false, 1)), k);
        assert!(matches!(read_report(&mut r), Ok(None)));
        let mut r = FrameReader::new(Cursor::new(encode_end(true, 2)), k);
        assert!(matches!(read_report(&mut r), Err(WireError::Malformed(_))));
        // A stream cut short is an error, not a smaller report.
        let (_, bytes, _) = streamed(5000, k);
        let mut r = FrameReader::new(Cursor::new(bytes[..bytes.len() / 2].to_vec()), k);
        assert!(r.recv().is_ok());
        assert!(read_report(&mut r).is_err());
        // Anything else in the middle of a report is a protocol error.
        let mut r = FrameReader::new(Cursor::new(encode(&[Message::Ping], k)), k);
        assert!(matches!(read_report(&mut r), Err(WireError::Malformed(_))));
    }

    #[test]
    fn frames_round_trip() {
        let (k, _) = keys();
        let msgs = sample_ops();
        let bytes = encode(&msgs, k);
        let mut r = FrameReader::new(Cursor::new(bytes), k);
        for m in &msgs {
            assert_eq!(&r.recv().ok(), &Some(m.clone()));
        }
        assert!(matches!(r.recv(), Err(WireError::Closed)));
    }

    /// Takes at most 1000 bytes per call, like a socket with little room.
    struct Trickle(Vec<u8>);

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = buf.len().min(1000);
            self.0.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(1000 - n);
                self.0.extend_from_slice(&b[..take]);
                n += take;
                if n == 1000 {
                    break;
                }
            }
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn large_payloads_round_trip_through_partial_writes_into_aligned_buffers() {
        for digest in [false, true] {
            payloads_round_trip(digest);
        }
    }

    /// A writer and a reader of one session (`digest`: protocol 9's MAC).
    fn pair<W: Write, R: Read>(
        w: W,
        r: R,
        key: [u8; 32],
        digest: bool,
    ) -> (FrameWriter<W>, FrameReader<R>) {
        let keys = SessionKeys {
            send: key,
            recv: key,
            version: if digest {
                PAYLOAD_DIGEST_SINCE
            } else {
                PAYLOAD_DIGEST_SINCE - 1
            },
        };
        (
            FrameWriter::for_session(w, &keys),
            FrameReader::for_session(r, &keys),
        )
    }

    fn payloads_round_trip(digest: bool) {
        let (k, _) = keys();
        let sizes = [
            0usize,
            1,
            4096,
            ALIGNED_FROM - 1,
            ALIGNED_FROM,
            1 << 20,
            1 << 20,
            3 << 20,
        ];
        let msgs: Vec<Message> = sizes
            .iter()
            .enumerate()
            .map(|(i, &len)| Message::Op {
                seq: i as u64 + 1,
                op: Op::Write {
                    id: 5,
                    offset: 4096 * i as u64,
                    data: Payload::Owned(Arc::new((0..len).map(|j| (j % 253) as u8).collect())),
                },
            })
            .collect();
        let (mut w, _) = pair(Trickle(Vec::new()), std::io::empty(), k, digest);
        for m in &msgs {
            assert!(w.send(m).is_ok());
        }
        let (mut whole, _) = pair(Vec::new(), std::io::empty(), k, digest);
        for m in &msgs {
            assert!(whole.send(m).is_ok());
        }
        assert_eq!(w.inner.0, whole.inner, "partial writes changed the stream");
        // Each tag is the MAC of the whole frame (what a peer of any version
        // computes): of the payload itself, or from protocol 9 of its digest.
        let mut rest = &w.inner.0[..];
        let mut counter = 0u64;
        while !rest.is_empty() {
            let meta_len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let data_len = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
            let body = 8 + meta_len + data_len;
            let payload = &rest[8 + meta_len..body];
            let payload_digest = blake3::hash(payload);
            let covered: &[u8] = match (digest, payload.is_empty()) {
                (true, false) => payload_digest.as_bytes(),
                _ => payload,
            };
            let expected = mac(
                &k,
                &[
                    &counter.to_le_bytes(),
                    &rest[..8],
                    &rest[8..8 + meta_len],
                    covered,
                ],
            );
            assert_eq!(&rest[body..body + MAC_LEN], expected.as_bytes());
            rest = &rest[body + MAC_LEN..];
            counter += 1;
        }
        assert_eq!(counter, msgs.len() as u64);
        // Read back in odd pieces (a socket returns what has arrived): the
        // payload is hashed piece by piece as it comes in.
        let (_, mut r) = pair(
            std::io::sink(),
            Dribble(Cursor::new(w.inner.0.clone())),
            k,
            digest,
        );
        for m in &msgs {
            assert_eq!(&r.recv().unwrap_or_else(|e| panic!("{e}")), m);
        }
        assert!(matches!(r.recv(), Err(WireError::Closed)));
        // A reader of the other scheme refuses the first frame with data.
        let (_, mut other) = pair(std::io::sink(), Cursor::new(w.inner.0.clone()), k, !digest);
        assert!(other.recv().is_ok(), "no data: the same MAC");
        assert!(matches!(other.recv(), Err(WireError::BadMac)));
        let (_, mut r) = pair(std::io::sink(), Cursor::new(w.inner.0), k, digest);
        for (m, &len) in msgs.iter().zip(&sizes) {
            let got = r.recv().unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(&got, m);
            if let Message::Op {
                op: Op::Write { data, .. },
                ..
            } = &got
            {
                let aligned = matches!(data, Payload::Aligned(_));
                assert_eq!(aligned, len >= ALIGNED_FROM, "{len} bytes");
                if aligned {
                    assert_eq!(data.as_ptr() as usize % 4096, 0);
                }
            }
        }
        assert!(matches!(r.recv(), Err(WireError::Closed)));
    }

    /// Returns at most 7919 bytes per read.
    struct Dribble<R>(R);

    impl<R: Read> Read for Dribble<R> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(7919);
            self.0.read(&mut buf[..n])
        }
    }

    #[test]
    fn a_changed_byte_anywhere_in_a_large_payload_fails_authentication() {
        for digest in [false, true] {
            changed_byte_fails(digest);
        }
    }

    fn changed_byte_fails(digest: bool) {
        let (k, _) = keys();
        let data: Vec<u8> = (0..1usize << 20).map(|j| (j % 251) as u8).collect();
        let msg = Message::Op {
            seq: 1,
            op: Op::Write {
                id: 5,
                offset: 0,
                data: Payload::Owned(Arc::new(data)),
            },
        };
        let (mut w, _) = pair(Vec::new(), std::io::empty(), k, digest);
        assert!(w.send(&msg).is_ok());
        let bytes = w.inner;
        let (_, mut r) = pair(
            std::io::sink(),
            Dribble(Cursor::new(bytes.clone())),
            k,
            digest,
        );
        assert_eq!(r.recv().unwrap_or_else(|e| panic!("{e}")), msg);
        // First, middle and last payload byte, and the tag's last byte.
        let payload_end = bytes.len() - MAC_LEN;
        for at in [
            payload_end - (1 << 20),
            payload_end - (1 << 19),
            payload_end - 1,
            bytes.len() - 1,
        ] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x40;
            let (_, mut r) = pair(std::io::sink(), Dribble(Cursor::new(bad)), k, digest);
            assert!(
                matches!(r.recv(), Err(WireError::BadMac)),
                "byte {at} changed"
            );
        }
    }

    #[test]
    fn wrong_key_and_replayed_frames_are_rejected() {
        let (k, other) = keys();
        let bytes = encode(&[Message::Ping], k);
        let mut r = FrameReader::new(Cursor::new(bytes.clone()), other);
        assert!(matches!(r.recv(), Err(WireError::BadMac)));
        // The same frame twice: the second carries a stale counter.
        let mut twice = bytes.clone();
        twice.extend_from_slice(&bytes);
        let mut r = FrameReader::new(Cursor::new(twice), k);
        assert!(r.recv().is_ok());
        assert!(matches!(r.recv(), Err(WireError::BadMac)));
    }

    #[test]
    fn authenticated_but_escaping_names_are_malformed() {
        let (k, _) = keys();
        // Encode a Bind or Remove whose name is "../../etc/x" by hand: the validating
        // type refuses to represent it, so build the bincode of the same shape from raw
        // bytes.
        #[derive(Serialize)]
        enum RawMessage {
            _Claim { generation: Option<String> },
            _Welcome { report: bool },
            _Refused { reason: String },
            Op { seq: u64, op: RawOp },
            Control { seq: u64, control: RawControl },
        }
        #[derive(Serialize)]
        enum RawOp {
            Bind { id: u64, parent: u64, name: Vec<u8> },
        }
        #[derive(Serialize)]
        enum RawControl {
            _Wipe,
            _SyncAll,
            _Compare {
                id: u64,
                offset: u64,
                block: u32,
                hashes: Vec<[u8; 32]>,
            },
            Remove {
                parent: u64,
                name: Vec<u8>,
            },
        }
        let frame = |msg: &RawMessage| {
            let meta = bincode::serde::encode_to_vec(msg, bincode_config())
                .unwrap_or_else(|_| unreachable!());
            let mut w = FrameWriter::new(Vec::new(), k);
            assert!(w.send_raw(&meta, &[]).is_ok());
            FrameReader::new(Cursor::new(w.inner), k).recv()
        };
        // The raw shapes match the real ones: with a good name they decode.
        for good in [
            RawMessage::Op {
                seq: 1,
                op: RawOp::Bind {
                    id: 9,
                    parent: 1,
                    name: b"ok".to_vec(),
                },
            },
            RawMessage::Control {
                seq: 1,
                control: RawControl::Remove {
                    parent: 1,
                    name: b"ok".to_vec(),
                },
            },
        ] {
            assert!(matches!(
                frame(&good),
                Ok(Message::Op {
                    op: Op::Bind { .. },
                    ..
                } | Message::Control {
                    control: Control::Remove { .. },
                    ..
                })
            ));
        }
        let bad_names = [&b"../../etc/x"[..], b"..", b"/etc/passwd", b"a\0b", b""];
        let bind = bad_names.iter().map(|bad| RawMessage::Op {
            seq: 1,
            op: RawOp::Bind {
                id: 9,
                parent: 1,
                name: bad.to_vec(),
            },
        });
        let remove = bad_names.iter().map(|bad| RawMessage::Control {
            seq: 1,
            control: RawControl::Remove {
                parent: 1,
                name: bad.to_vec(),
            },
        });
        for msg in bind.chain(remove) {
            assert!(matches!(frame(&msg), Err(WireError::Malformed(_))));
        }
    }

    fn binding(module: &str, port: u16) -> Binding {
        Binding::new(module, port).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs a handshake over loopback TCP: (client's result, server's result).
    fn handshake_over_tcp(
        client_key: &ClusterKey,
        client_binding: &Binding,
        server_key: &ClusterKey,
        server_binding: &Binding,
    ) -> (
        Result<SessionKeys, WireError>,
        Result<SessionKeys, WireError>,
    ) {
        use std::net::{TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let (server_key, server_binding) = (server_key.clone(), server_binding.clone());
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().map_err(WireError::Io)?;
            server_handshake(&mut s, &server_key, &server_binding)
        });
        let mut c = TcpStream::connect(addr).unwrap_or_else(|e| panic!("{e}"));
        let client = client_handshake(&mut c, client_key, client_binding);
        drop(c);
        let server_result = server.join().unwrap_or_else(|_| panic!("server thread"));
        (client, server_result)
    }

    #[test]
    fn handshake_authenticates_both_ways() {
        let key = ClusterKey::from_bytes([1; 32]);
        let b = binding("vm1", 7789);
        for (client_key, ok) in [
            (key.clone(), true),
            (ClusterKey::from_bytes([2; 32]), false),
        ] {
            let (client, server_result) = handshake_over_tcp(&client_key, &b, &key, &b);
            if ok {
                let ck = client.unwrap_or_else(|e| panic!("{e}"));
                let sk = server_result.unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(ck.send, sk.recv);
                assert_eq!(ck.recv, sk.send);
            } else {
                // The receiver proves itself first, so a client with the wrong key
                // rejects it; the receiver never sees a valid proof either.
                assert!(matches!(client, Err(WireError::AuthFailed)));
                assert!(server_result.is_err());
            }
        }
    }

    /// Runs a handshake where each side speaks its own range.
    fn negotiate(
        client: Versions,
        server: Versions,
    ) -> (
        Result<SessionKeys, WireError>,
        Result<SessionKeys, WireError>,
    ) {
        use std::net::{TcpListener, TcpStream};
        let key = ClusterKey::from_bytes([1; 32]);
        let b = binding("vm1", 7789);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let (server_key, server_binding) = (key.clone(), b.clone());
        let server_thread = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().map_err(WireError::Io)?;
            let mut hs = ServerHandshake::with_versions(server_key, server_binding, server);
            loop {
                let mut buf = vec![0u8; hs.wants()];
                read_exact_or_closed(&mut s, &mut buf)?;
                match hs.feed(&buf)? {
                    Progress::More => {}
                    Progress::Send(reply) => s.write_all(&reply)?,
                    Progress::Refuse(reply, error) => {
                        let _ = s.write_all(&reply);
                        return Err(error);
                    }
                    Progress::Done(keys) => return Ok(keys),
                }
            }
        });
        let mut c = TcpStream::connect(addr).unwrap_or_else(|e| panic!("{e}"));
        let client_result = client_handshake_versions(&mut c, &key, &b, client);
        drop(c);
        let server_result = server_thread
            .join()
            .unwrap_or_else(|_| panic!("server thread"));
        (client_result, server_result)
    }

    fn v(min: u16, max: u16) -> Versions {
        Versions::new(min, max).unwrap_or_else(|| panic!("empty range"))
    }

    /// Both sides use the highest version they share, whichever side is newer.
    #[test]
    fn the_highest_common_version_is_used() {
        for (client, server, want) in [
            (v(5, 6), v(5, 6), 6),
            (v(5, 5), v(5, 6), 5),
            (v(5, 6), v(5, 5), 5),
            (v(6, 9), v(5, 6), 6),
        ] {
            let (c, s) = negotiate(client, server);
            let (c, s) = (
                c.unwrap_or_else(|e| panic!("{client} vs {server}: {e}")),
                s.unwrap_or_else(|e| panic!("{client} vs {server}: {e}")),
            );
            assert_eq!((c.version, s.version), (want, want));
            assert_eq!(c.send, s.recv);
        }
    }

    /// Disjoint ranges: both sides refuse, naming both ranges.
    #[test]
    fn disjoint_ranges_are_refused_naming_both() {
        let (c, s) = negotiate(v(5, 5), v(6, 6));
        let c = c.err().map(|e| e.to_string()).unwrap_or_default();
        let s = s.err().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(
            c,
            "no common protocol version: this side speaks 5, the peer 6 (upgrade the older node)"
        );
        assert_eq!(
            s,
            "no common protocol version: this side speaks 6, the peer 5 (upgrade the older node)"
        );
    }

    /// Someone in between who narrows the primary's range to force an older
    /// version breaks the proofs: the range is inside them.
    #[test]
    fn a_rewritten_range_fails_authentication() {
        let key = ClusterKey::from_bytes([1; 32]);
        let b = binding("vm1", 7789);
        let mut hs = ServerHandshake::with_versions(key, b.clone(), v(5, 6));
        let mut hello = valid_hello(&b);
        // The primary offered 5..=6; the hello now says 5..=5.
        hello[6..8].copy_from_slice(&5u16.to_le_bytes());
        let mut at = 0;
        let mut reply = Vec::new();
        while hs.wants() > 0 && at < hello.len() {
            let n = hs.wants().min(hello.len() - at);
            if let Ok(Progress::Send(r)) = hs.feed(&hello[at..at + n]) {
                reply = r;
            }
            at += n;
        }
        assert_eq!(u16::from_le_bytes([reply[4], reply[5]]), 5);
        // The primary (which offered 5..=6) checks the receiver's proof over
        // what it sent: it does not match.
        let transcript = Transcript {
            nonce_p: [5; 32],
            nonce_r: reply[7..39].try_into().unwrap_or([0; 32]),
            binding: b.encode(),
            versions: transcript_versions(v(5, 6), 5),
        };
        let expected = transcript.derive(&ClusterKey::from_bytes([1; 32]), b"vmha receiver proof");
        assert_ne!(&expected[..], &reply[39..71]);
    }

    /// A primary that reaches another module's receiver (or another directory's
    /// port of the same module) is told "wrong module" on both sides, naming both.
    #[test]
    fn another_modules_receiver_answers_wrong_module() {
        let key = ClusterKey::from_bytes([1; 32]);
        let receiver = binding("vm1", 7789);
        for primary in [binding("vm2", 7789), binding("vm1", 7790)] {
            let (client, server) = handshake_over_tcp(&key, &primary, &key, &receiver);
            match client {
                Err(WireError::WrongModule { ours, theirs }) => {
                    assert_eq!(ours, primary);
                    assert_eq!(theirs, receiver);
                }
                other => panic!("client: {other:?}"),
            }
            assert!(
                matches!(server, Err(WireError::WrongModule { ref theirs, .. }) if *theirs == primary),
                "server: {server:?}"
            );
        }
    }

    /// Session keys depend on the binding: the same nonces under another binding
    /// give other proofs (nobody in between can rewrite it).
    #[test]
    fn binding_is_inside_the_proofs() {
        let key = ClusterKey::from_bytes([1; 32]);
        let t = |b: &Binding| Transcript {
            nonce_p: [3; 32],
            nonce_r: [4; 32],
            binding: b.encode(),
            versions: transcript_versions(REPLICATION, 6),
        };
        let a = t(&binding("vm1", 7789)).derive(&key, b"vmha receiver proof");
        let b = t(&binding("vm1", 7790)).derive(&key, b"vmha receiver proof");
        let c = t(&binding("vm2", 7789)).derive(&key, b"vmha receiver proof");
        assert_ne!(a, b);
        assert_ne!(a, c);
    }

    /// A stream whose reads come from a fixed buffer and whose writes are dropped.
    struct Scripted(Cursor<Vec<u8>>);

    impl Read for Scripted {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.0.read(buf)
        }
    }

    impl Write for Scripted {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn valid_hello(b: &Binding) -> Vec<u8> {
        let mut hello = Vec::new();
        hello.extend_from_slice(MAGIC);
        hello.extend_from_slice(&REPLICATION.min.to_le_bytes());
        hello.extend_from_slice(&REPLICATION.max.to_le_bytes());
        hello.extend_from_slice(&[5; 32]);
        hello.extend_from_slice(&b.encode());
        hello
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Arbitrary bytes never panic the decoder and never yield a message
        /// without the key.
        #[test]
        fn random_bytes_are_rejected(
            bytes in proptest::collection::vec(any::<u8>(), 0..4096),
            digest in any::<bool>(),
        ) {
            let (k, _) = keys();
            let (_, mut r) = pair(std::io::sink(), Cursor::new(bytes), k, digest);
            prop_assert!(r.recv().is_err());
        }

        /// Arbitrary headers under a valid MAC never panic the decoder.
        #[test]
        fn authenticated_random_headers_never_panic(
            meta in proptest::collection::vec(any::<u8>(), 0..512),
            data in proptest::collection::vec(any::<u8>(), 0..64),
            // Some payloads large enough to be read into an aligned buffer,
            // hashed as they arrive, and sent before their tag.
            large in proptest::option::weighted(0.05, (ALIGNED_FROM - 8)..(ALIGNED_FROM + 8)),
            digest in any::<bool>(),
        ) {
            let (k, _) = keys();
            let data = match large {
                Some(len) => data.iter().copied().cycle().take(len).collect(),
                None => data,
            };
            let (mut w, _) = pair(Vec::new(), std::io::empty(), k, digest);
            prop_assert!(w.send_raw(&meta, &data).is_ok());
            let (_, mut r) = pair(std::io::sink(), Dribble(Cursor::new(w.inner)), k, digest);
            let _ = r.recv();
        }

        /// Arbitrary report parts under a valid MAC never panic the writer's
        /// report reader: they decode to a report, an incomplete one, or an error.
        #[test]
        fn authenticated_random_report_frames_never_panic(
            frames in proptest::collection::vec(
                (proptest::collection::vec(any::<u8>(), 0..600), any::<bool>()),
                0..6,
            ),
        ) {
            let (k, _) = keys();
            let mut w = FrameWriter::new(Vec::new(), k);
            for (meta, as_part) in &frames {
                // Half the frames start like a ReportPart / ReportEnd, so the fuzz
                // reaches their fields, not only the variant tag.
                let mut m = Vec::new();
                if *as_part {
                    m.push(if meta.first().is_some_and(|b| b & 1 == 1) { 8 } else { 7 });
                }
                m.extend_from_slice(meta);
                prop_assert!(w.send_raw(&m, &[]).is_ok());
            }
            let mut r = FrameReader::new(Cursor::new(w.inner), k);
            let _ = read_report(&mut r);
        }

        /// A streamed report of any shape reads back exactly.
        #[test]
        fn streamed_reports_round_trip(
            entries in proptest::collection::vec(
                (proptest::collection::vec(any::<u8>(), 1..40),
                 proptest::collection::vec((any::<u64>(), any::<u64>()), 0..8)),
                0..200,
            ),
            split in 1usize..50,
            valid in any::<bool>(),
        ) {
            let (k, _) = keys();
            let entries: Vec<ReportEntry> = entries
                .into_iter()
                .map(|(path, dirty)| ReportEntry {
                    path,
                    kind: EntryKind::File,
                    dirty,
                    attrs: crate::track::Attrs::default(),
                })
                .collect();
            let mut w = FrameWriter::new(Vec::new(), k);
            for chunk in entries.chunks(split) {
                let part = Message::ReportPart(ReportPart {
                    entries: chunk.to_vec(),
                    names: Vec::new(),
                });
                prop_assert!(w.send(&part).is_ok());
            }
            let end = Message::ReportEnd { valid, complete: true, entries: entries.len() as u64 };
            prop_assert!(w.send(&end).is_ok());
            let mut r = FrameReader::new(Cursor::new(w.inner), k);
            let got = read_report(&mut r);
            prop_assert!(got.is_ok());
            let want = Report { valid, entries, names: Vec::new() };
            let got = got.ok().flatten();
            prop_assert_eq!(got.as_deref(), Some(&want));
        }

        /// Arbitrary bytes, arriving in arbitrary pieces, never panic the
        /// receiver's handshake and never authenticate anyone.
        #[test]
        fn server_handshake_rejects_random_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
            cuts in proptest::collection::vec(1usize..64, 0..32),
            valid_prefix in any::<bool>(),
        ) {
            let b = binding("vm1", 7789);
            let mut input = if valid_prefix { valid_hello(&b) } else { Vec::new() };
            input.extend_from_slice(&bytes);
            let mut hs = ServerHandshake::new(ClusterKey::from_bytes([1; 32]), b);
            let mut at = 0;
            let mut cuts = cuts.into_iter().cycle();
            while at < input.len() {
                let n = cuts.next().unwrap_or(1).min(hs.wants()).min(input.len() - at);
                if n == 0 {
                    break;
                }
                match hs.feed(&input[at..at + n]) {
                    Ok(Progress::More) | Ok(Progress::Send(_)) => {}
                    Ok(Progress::Done(_)) => prop_assert!(false, "authenticated random bytes"),
                    Ok(Progress::Refuse(..)) | Err(_) => break,
                }
                at += n;
            }
        }

        /// Arbitrary replies never panic the primary's handshake and never
        /// authenticate a receiver without the key.
        #[test]
        fn client_handshake_rejects_random_replies(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
            valid_head in any::<bool>(),
        ) {
            let mut reply = Vec::new();
            if valid_head {
                reply.extend_from_slice(MAGIC);
                reply.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
                reply.push(bytes.first().map_or(0, |b| b % 3));
            }
            reply.extend_from_slice(&bytes);
            let mut stream = Scripted(Cursor::new(reply));
            let key = ClusterKey::from_bytes([1; 32]);
            prop_assert!(client_handshake(&mut stream, &key, &binding("vm1", 7789)).is_err());
        }

        /// Flipping any bit of a valid frame is detected.
        #[test]
        fn any_bit_flip_is_detected(which in 0usize..14, bit in any::<usize>()) {
            let (k, _) = keys();
            let msgs = sample_ops();
            let which = which % msgs.len();
            let mut bytes = encode(&msgs[which..which + 1], k);
            let bit = bit % (bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
            let mut r = FrameReader::new(Cursor::new(bytes), k);
            prop_assert!(r.recv().is_err());
        }
    }
}
