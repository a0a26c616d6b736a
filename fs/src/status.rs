//! The contract between vmha-fs and whoever reads its state directory (vmhad,
//! the tests, the benchmarks): the files' names and their content as types.
//! vmha-fs encodes with these types, the readers decode with them, so the two
//! sides cannot drift apart.
//!
//! The files (`STATEDIR` is vmha-fs's `--state`; the README documents them):
//! - [`PEER_OUTDATED`]: text, the first reason the peer's copy lacks changes made here;
//! - [`SELF_OUTDATED`]: text, why this node's own copy is behind (its disk failed);
//! - [`GENERATION`]: the controller's current [`GenerationId`], one line;
//! - [`SYNC`]: [`SyncStatus`], where the last full sync (attach) stands;
//! - [`LINK`]: [`LinkStatus`], where the primary's replication link stands;
//! - [`VERIFY`]: [`VerifyStatus`], the outcome of a compare with the peer;
//! - [`CHANGED_BYTES`]: [`ChangedBytes`], a decimal count, refreshed every second;
//! - [`METRICS`]: [`FsMetrics`], the primary's counters and latency histograms
//!   since it started, at most once a second and only when they changed;
//! - [`DIVERGED`]: a directory of data saved aside before a resync overwrote it;
//! - [`HEARD`]: [`WriterHeard`], when the secondary last received a frame (an
//!   operation or the writer's ping) from its writer, refreshed several times a
//!   second (not synced to disk: it is about liveness, not durable state).
//!
//! Typing them changes nothing on disk: the JSON keys are declared in the
//! order `serde_json::json!` wrote them (alphabetical), `null` stays `null`.
//! Decoding is lenient where the readers always were (missing counters are 0,
//! an unknown link state is [`LinkCondition::Unknown`]); additions to a file
//! must stay additions.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The state directory's exclusive lock (held by the running vmha-fs).
pub const LOCK: &str = "lock";
/// The peer's copy lacks changes made here; the content is the first reason.
pub const PEER_OUTDATED: &str = "peer-outdated";
/// This node's own copy is behind (its disk failed while it wrote): written by
/// the primary, honoured by the receiver (full compare), removed when a resync
/// made the copy identical again.
pub const SELF_OUTDATED: &str = "self-outdated";
/// The operator asked for a compare resync (`vmctl resync --compare`, `vmctl
/// invalidate`): the primary's next attach compares every block with the peer,
/// whatever both nodes' records say, and removes the file once that resync
/// finished (an interrupted one compares again). Written by the controller or
/// by hand; its content is the reason, for the log.
pub const COMPARE_RESYNC: &str = "compare-resync";
/// The current data generation, written by the controller (`<hex>\n`).
pub const GENERATION: &str = "generation";
/// [`SyncStatus`].
pub const SYNC: &str = "sync.json";
/// [`LinkStatus`].
pub const LINK: &str = "link.json";
/// [`VerifyStatus`].
pub const VERIFY: &str = "verify.json";
/// [`ChangedBytes`].
pub const CHANGED_BYTES: &str = "changed_bytes";
/// [`FsMetrics`].
pub const METRICS: &str = "metrics.json";
/// Data saved aside before a resync overwrote it: `diverged/<UTC time>/`.
pub const DIVERGED: &str = "diverged";
/// [`WriterHeard`].
pub const HEARD: &str = "heard.json";

/// Milliseconds of `CLOCK_MONOTONIC`: a clock every process of the host shares
/// and that no wall-clock step moves (the unit of [`WriterHeard`]).
pub fn monotonic_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists
    // on Linux, so the call cannot fail (ts stays zero if it somehow did).
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1000).saturating_add(nanos / 1_000_000)
}

/// `STATEDIR/heard.json` of a secondary: when it last heard its writer. The
/// controller of that node tells a writer whose controller went quiet but whose
/// data path is alive (never failed over) from a dead or frozen one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriterHeard {
    /// A writer's session is open.
    pub connected: bool,
    /// [`monotonic_ms`] of the last frame received from a writer (0: never).
    pub last_frame_ms: u64,
}

impl WriterHeard {
    /// Milliseconds since the last frame at `now_ms` ([`monotonic_ms`]); None
    /// when no writer was ever heard.
    pub fn age_ms(&self, now_ms: u64) -> Option<u64> {
        (self.last_frame_ms > 0).then(|| now_ms.saturating_sub(self.last_frame_ms))
    }
}

impl StatusFile for WriterHeard {
    const FILE: &'static str = HEARD;
}

/// Reads `heard.json` from `state` until two reads agree (at most 4 reads):
/// the secondary overwrites it in place, so one read may meet a write half
/// done. None when absent, unreadable or never stable.
pub fn read_heard(state: &Path) -> Option<WriterHeard> {
    let mut previous = WriterHeard::read_from(state).ok().flatten();
    for _ in 0..3 {
        let again = WriterHeard::read_from(state).ok().flatten();
        if again.is_some() && again == previous {
            return again;
        }
        previous = again;
    }
    None
}

/// Errors decoding a state-directory file.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("{file} does not parse: {source}")]
    Json {
        file: &'static str,
        source: serde_json::Error,
    },
    #[error("{file} is not a decimal count of bytes")]
    NotACount { file: &'static str },
    #[error("not a generation id (expected 1 to 64 hexadecimal digits): {0:?}")]
    Generation(String),
}

/// A data generation as vmha-fs takes it (`--generation`,
/// `--accept-generation`, `STATEDIR/generation`) and claims it in the
/// handshake: 1 to 64 hexadecimal digits, kept in lowercase. Validated where it
/// enters ([`TryFrom<&str>`]), so everything past the boundary holds a valid one.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GenerationId(String);

/// Longest generation id, in hexadecimal digits.
pub const MAX_GENERATION_DIGITS: usize = 64;

impl GenerationId {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The content of a `generation` file: the id on the first line (surrounding
    /// white space ignored); None when it is not a valid id.
    pub fn from_file(bytes: &[u8]) -> Option<GenerationId> {
        let text = std::str::from_utf8(bytes).ok()?;
        GenerationId::try_from(text.trim()).ok()
    }

    /// The bytes of a `generation` file holding this id.
    pub fn to_file(&self) -> Vec<u8> {
        format!("{}\n", self.0).into_bytes()
    }
}

impl TryFrom<&str> for GenerationId {
    type Error = StatusError;

    /// Uppercase digits are accepted and stored in lowercase.
    fn try_from(text: &str) -> Result<Self, Self::Error> {
        if (1..=MAX_GENERATION_DIGITS).contains(&text.len())
            && text.bytes().all(|b| b.is_ascii_hexdigit())
        {
            Ok(GenerationId(text.to_ascii_lowercase()))
        } else {
            Err(StatusError::Generation(text.chars().take(80).collect()))
        }
    }
}

impl std::str::FromStr for GenerationId {
    type Err = StatusError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        GenerationId::try_from(text)
    }
}

/// A 128-bit id (the controller's) as 32 lowercase hexadecimal digits.
impl From<u128> for GenerationId {
    fn from(id: u128) -> GenerationId {
        GenerationId(format!("{id:032x}"))
    }
}

impl From<GenerationId> for String {
    fn from(id: GenerationId) -> String {
        id.0
    }
}

impl AsRef<str> for GenerationId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for GenerationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for GenerationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GenerationId({})", self.0)
    }
}

/// One JSON status file: encoded as one line, decoded from any bytes.
pub trait StatusFile: Serialize + for<'de> Deserialize<'de> {
    /// The file's name in the state directory.
    const FILE: &'static str;

    /// The file's content: the JSON object and a newline.
    fn encode(&self) -> Vec<u8> {
        // A struct of strings and integers always serializes.
        let mut bytes = serde_json::to_vec(self).unwrap_or_default();
        bytes.push(b'\n');
        bytes
    }

    /// Decodes a file's content.
    fn decode(bytes: &[u8]) -> Result<Self, StatusError> {
        serde_json::from_slice(bytes).map_err(|source| StatusError::Json {
            file: Self::FILE,
            source,
        })
    }

    /// Reads the file from `state` (a state directory): None when it is absent.
    /// An unreadable file is an I/O error, one that does not decode is
    /// `InvalidData`.
    fn read_from(state: &Path) -> std::io::Result<Option<Self>> {
        match std::fs::read(state.join(Self::FILE)) {
            Ok(bytes) => Self::decode(&bytes)
                .map(Some)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Where a full sync (SIGUSR2: attach the peer and copy) stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncPhase {
    /// Copying; the counters move.
    Syncing,
    /// The peer is a replica.
    InSync,
    /// No peer attached: with `error`, the attach or the copy failed.
    Alone,
}

/// `STATEDIR/sync.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncStatus {
    #[serde(default)]
    pub done_bytes: u64,
    #[serde(default)]
    pub error: Option<String>,
    pub state: SyncPhase,
    #[serde(default)]
    pub total_bytes: u64,
}

/// A running sync's counters (shared by the copy threads); what `sync.json`
/// reports of them.
#[derive(Debug, Default)]
pub struct SyncProgress {
    pub done_bytes: std::sync::atomic::AtomicU64,
    pub total_bytes: std::sync::atomic::AtomicU64,
    /// Bytes the compares read from disk to hash them (holes are not read).
    pub read_bytes: std::sync::atomic::AtomicU64,
}

impl SyncProgress {
    /// The status file for this progress in `state`.
    pub fn status(&self, state: SyncPhase, error: Option<&str>) -> SyncStatus {
        use std::sync::atomic::Ordering::Relaxed;
        SyncStatus {
            state,
            done_bytes: self.done_bytes.load(Relaxed),
            total_bytes: self.total_bytes.load(Relaxed),
            error: error.map(str::to_string),
        }
    }
}

impl StatusFile for SyncStatus {
    const FILE: &'static str = SYNC;
}

/// Where the primary's replication link stands, as `link.json` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkCondition {
    Connected,
    /// Writing alone (no peer attached).
    Degraded,
    Attaching,
    Syncing,
    /// Connected, but no acknowledgement for half the lock timeout.
    Stalled,
    Lost,
    Failed,
    /// The peer's receiver refused our generation (see [`crate::refusal`]).
    Fenced,
    /// This node's own disk failed: the module must run on the peer.
    DiskFailed,
    /// A mount in standby (a live swap's destination): no writer, no link yet.
    Standby,
    /// A state this reader does not know (a newer vmha-fs): needs nothing.
    #[serde(other)]
    Unknown,
}

impl LinkCondition {
    /// The peer no longer receives our writes: the controller marks it outdated
    /// and sends SIGUSR1.
    pub fn is_down(self) -> bool {
        matches!(
            self,
            LinkCondition::Lost | LinkCondition::Stalled | LinkCondition::Failed
        )
    }
}

/// `STATEDIR/link.json` (written whenever the state changes; the last one wins).
///
/// A mount in standby (`vmha-fs primary --standby`, the destination of a live
/// swap) writes `{"standby": true, "state": "standby"}`, with `"activation":
/// "failed: <reason>"` after an activation (SIGUSR2) that failed; once it
/// writes, the file is a writer's like any other (`standby` absent = false).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkStatus {
    /// Set when the last activation of a standby mount failed (`failed: ...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
    /// The mount is in standby: opens and reads only, every change EROFS.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub standby: bool,
    pub state: LinkCondition,
}

impl LinkStatus {
    /// A writer's link status (not in standby).
    pub fn writer(state: LinkCondition, reason: Option<String>) -> Self {
        LinkStatus {
            activation: None,
            reason,
            standby: false,
            state,
        }
    }
}

impl StatusFile for LinkStatus {
    const FILE: &'static str = LINK;
}

/// Where a verify (SIGHUP: compare with the peer, change nothing) stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerifyPhase {
    Running,
    Done,
    Failed,
}

/// A region where the peer's copy differs (`len` = `u64::MAX`: the peer lacks
/// the file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Difference {
    pub len: u64,
    pub offset: u64,
    pub path: String,
}

/// `STATEDIR/verify.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyStatus {
    #[serde(default)]
    pub differing: Vec<Difference>,
    #[serde(default)]
    pub done_bytes: u64,
    #[serde(default)]
    pub error: Option<String>,
    /// Bytes this node read from its disk to hash them (holes are not read): a
    /// verify of a sparse image reads its data, not its size.
    #[serde(default)]
    pub read_bytes: u64,
    pub state: VerifyPhase,
    #[serde(default)]
    pub total_bytes: u64,
}

impl StatusFile for VerifyStatus {
    const FILE: &'static str = VERIFY;
}

/// `STATEDIR/changed_bytes`: bytes the primary's dirty records mark as
/// differing from the peer, as a decimal line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangedBytes(pub u64);

impl ChangedBytes {
    pub const FILE: &'static str = CHANGED_BYTES;

    pub fn encode(self) -> Vec<u8> {
        format!("{}\n", self.0).into_bytes()
    }

    /// A decimal count, surrounding white space ignored.
    pub fn decode(bytes: &[u8]) -> Result<ChangedBytes, StatusError> {
        std::str::from_utf8(bytes)
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
            .map(ChangedBytes)
            .ok_or(StatusError::NotACount {
                file: CHANGED_BYTES,
            })
    }
}

/// Upper bounds (inclusive, microseconds) of the latency histograms' buckets;
/// a last, unbounded bucket takes what is slower than 5 s.
pub const LATENCY_BOUNDS_US: [u64; 12] = [
    50, 100, 250, 500, 1_000, 2_500, 10_000, 50_000, 100_000, 500_000, 1_000_000, 5_000_000,
];

/// The bucket of [`LATENCY_BOUNDS_US`] (or the last, unbounded one) a latency
/// of `us` microseconds falls in.
pub fn latency_bucket(us: u64) -> usize {
    LATENCY_BOUNDS_US.partition_point(|&bound| bound < us)
}

/// A latency histogram as `metrics.json` carries it: per-bucket counts (not
/// cumulative), one per [`LATENCY_BOUNDS_US`] and a last for the slower ones.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Latencies {
    #[serde(default)]
    pub buckets: Vec<u64>,
    #[serde(default)]
    pub count: u64,
    /// Sum of the observed latencies, microseconds.
    #[serde(default)]
    pub sum_us: u64,
}

impl Latencies {
    /// Adds `other`'s observations (another directory of the same module);
    /// saturates rather than overflow.
    pub fn add(&mut self, other: &Latencies) {
        if self.buckets.len() < other.buckets.len() {
            self.buckets.resize(other.buckets.len(), 0);
        }
        for (mine, theirs) in self.buckets.iter_mut().zip(&other.buckets) {
            *mine = mine.saturating_add(*theirs);
        }
        self.count = self.count.saturating_add(other.count);
        self.sum_us = self.sum_us.saturating_add(other.sum_us);
    }
}

/// `STATEDIR/metrics.json` of a primary: what only vmha-fs knows, for
/// `/metrics`. Counters run since the process started (a restart resets them,
/// as Prometheus counters may).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsMetrics {
    /// Activity-log updates written durably (appends and compactions).
    #[serde(default)]
    pub activity_log_writes: u64,
    /// Bytes the dirty records mark as written while alone (as `changed_bytes`).
    #[serde(default)]
    pub dirty_bytes: u64,
    /// Latency of fsync requests, as the application sees it.
    #[serde(default)]
    pub fsync_latency: Latencies,
    /// Bytes of written data sent to a replicating peer.
    #[serde(default)]
    pub replicated_bytes: u64,
    /// Operations sent to a replicating peer.
    #[serde(default)]
    pub replicated_ops: u64,
    /// Latency of write requests, as the application sees it.
    #[serde(default)]
    pub write_latency: Latencies,
    /// Where the time of replicated writes goes, stage by stage.
    #[serde(default)]
    pub write_stages: Stages,
    /// Where the time of replicated fsyncs goes, stage by stage.
    #[serde(default)]
    pub fsync_stages: Stages,
    /// Syncs started right after a write that an fdatasync was expected to
    /// follow (a file written and synced in turn).
    #[serde(default)]
    pub early_syncs: u64,
    /// fdatasyncs that such an early sync answered on this node.
    #[serde(default)]
    pub fsyncs_early: u64,
    /// fdatasyncs that the peer's early sync answered too: before they were
    /// sent (no round trip), or in flight by its `Synced` (not waiting for
    /// their acknowledgement).
    #[serde(default)]
    pub fsyncs_peer_early: u64,
    /// O_DIRECT writes applied to this copy through the page cache
    /// (`local_writes = "cached"`), their writeback started by vmha-fs.
    #[serde(default)]
    pub cached_writes: u64,
}

/// Sums of the per-stage durations (nanoseconds) of the replicated operations
/// of one kind, since the process started: divided by `count` (or the
/// difference of two snapshots), the mean time of each stage. The stages of
/// one operation, in the order it meets them on the writer:
/// - `record`: FUSE request received → its change recorded (activity log);
/// - `send`: recorded → queued and written to the replication socket (by
///   this thread, or by the one already writing);
/// - `local`: sent → applied on this node (runs while the peer works);
/// - `peer`: sent → the peer's acknowledgement read by the link thread
///   (network both ways + the peer's queueing and work);
/// - `peer_busy`: of `peer`, the time the receiver spent on the operation
///   itself (apply, or sync), as its acknowledgement reports it (0 from a
///   receiver older than replication protocol 8);
/// - `reply`: the later of local and peer → the reply written to the kernel;
/// - `total`: FUSE request received → reply written.
///
/// `total` ≈ record + send + max(local, peer) + reply; `peer_last` counts the
/// operations that waited for the peer (its acknowledgement came after the
/// local apply). Only operations that replicated while the link was
/// connected are counted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stages {
    #[serde(default)]
    pub count: u64,
    #[serde(default)]
    pub peer_last: u64,
    #[serde(default)]
    pub record_ns: u64,
    #[serde(default)]
    pub send_ns: u64,
    #[serde(default)]
    pub local_ns: u64,
    #[serde(default)]
    pub peer_ns: u64,
    #[serde(default)]
    pub peer_busy_ns: u64,
    #[serde(default)]
    pub reply_ns: u64,
    #[serde(default)]
    pub total_ns: u64,
}

impl Stages {
    /// Adds `other`'s sums; saturating.
    pub fn add(&mut self, other: &Stages) {
        for (mine, theirs) in self.fields_mut().into_iter().zip(other.fields()) {
            *mine = mine.saturating_add(theirs);
        }
    }

    /// What was added since `earlier` (a snapshot of the same process).
    pub fn since(&self, earlier: &Stages) -> Stages {
        let mut d = self.clone();
        for (mine, theirs) in d.fields_mut().into_iter().zip(earlier.fields()) {
            *mine = mine.saturating_sub(theirs);
        }
        d
    }

    fn fields(&self) -> [u64; 9] {
        [
            self.count,
            self.peer_last,
            self.record_ns,
            self.send_ns,
            self.local_ns,
            self.peer_ns,
            self.peer_busy_ns,
            self.reply_ns,
            self.total_ns,
        ]
    }

    fn fields_mut(&mut self) -> [&mut u64; 9] {
        [
            &mut self.count,
            &mut self.peer_last,
            &mut self.record_ns,
            &mut self.send_ns,
            &mut self.local_ns,
            &mut self.peer_ns,
            &mut self.peer_busy_ns,
            &mut self.reply_ns,
            &mut self.total_ns,
        ]
    }

    /// Mean microseconds per operation of each stage, named, in stage order
    /// (empty without operations).
    pub fn means_us(&self) -> Vec<(&'static str, f64)> {
        if self.count == 0 {
            return Vec::new();
        }
        let n = self.count as f64;
        let us = |ns: u64| ns as f64 / n / 1000.0;
        vec![
            ("record", us(self.record_ns)),
            ("send", us(self.send_ns)),
            ("local", us(self.local_ns)),
            ("peer", us(self.peer_ns)),
            ("peer_busy", us(self.peer_busy_ns)),
            ("reply", us(self.reply_ns)),
            ("total", us(self.total_ns)),
        ]
    }
}

impl FsMetrics {
    /// Adds `other` (another directory of the same module); saturating.
    pub fn add(&mut self, other: &FsMetrics) {
        self.activity_log_writes = self
            .activity_log_writes
            .saturating_add(other.activity_log_writes);
        self.dirty_bytes = self.dirty_bytes.saturating_add(other.dirty_bytes);
        self.replicated_bytes = self.replicated_bytes.saturating_add(other.replicated_bytes);
        self.replicated_ops = self.replicated_ops.saturating_add(other.replicated_ops);
        self.write_latency.add(&other.write_latency);
        self.fsync_latency.add(&other.fsync_latency);
        self.write_stages.add(&other.write_stages);
        self.fsync_stages.add(&other.fsync_stages);
        self.early_syncs = self.early_syncs.saturating_add(other.early_syncs);
        self.fsyncs_early = self.fsyncs_early.saturating_add(other.fsyncs_early);
        self.fsyncs_peer_early = self
            .fsyncs_peer_early
            .saturating_add(other.fsyncs_peer_early);
        self.cached_writes = self.cached_writes.saturating_add(other.cached_writes);
    }
}

impl StatusFile for FsMetrics {
    const FILE: &'static str = METRICS;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// What vmha-fs wrote with `json!` before these types: the same bytes now.
    #[test]
    fn encoding_is_what_json_macro_wrote() {
        let sync = SyncStatus {
            state: SyncPhase::InSync,
            done_bytes: 10,
            total_bytes: 10,
            error: None,
        };
        let old = serde_json::json!({
            "state": "in_sync", "done_bytes": 10, "total_bytes": 10, "error": null,
        });
        assert_eq!(sync.encode(), format!("{old}\n").into_bytes());
        let link = LinkStatus::writer(LinkCondition::DiskFailed, Some("EIO".into()));
        let old = serde_json::json!({ "state": "disk_failed", "reason": "EIO" });
        assert_eq!(link.encode(), format!("{old}\n").into_bytes());
        // A standby mount adds its fields; an old file reads as not in standby.
        let standby = LinkStatus {
            activation: Some("failed: connection refused".into()),
            reason: None,
            standby: true,
            state: LinkCondition::Standby,
        };
        let text = serde_json::json!({
            "activation": "failed: connection refused", "reason": null,
            "standby": true, "state": "standby",
        });
        assert_eq!(standby.encode(), format!("{text}\n").into_bytes());
        assert_eq!(LinkStatus::decode(&standby.encode()).unwrap(), standby);
        assert!(!LinkStatus::decode(&link.encode()).unwrap().standby);
        let verify = VerifyStatus {
            state: VerifyPhase::Done,
            done_bytes: 1,
            total_bytes: 2,
            differing: vec![Difference {
                path: "a".into(),
                offset: 3,
                len: u64::MAX,
            }],
            error: None,
            read_bytes: 5,
        };
        let old = serde_json::json!({
            "state": "done", "done_bytes": 1, "total_bytes": 2,
            "differing": [{"path": "a", "offset": 3, "len": u64::MAX}], "error": null,
            "read_bytes": 5,
        });
        assert_eq!(verify.encode(), format!("{old}\n").into_bytes());
        assert_eq!(ChangedBytes(7).encode(), b"7\n");
    }

    #[test]
    fn decoding_is_lenient_where_readers_were() {
        let sync = SyncStatus::decode(br#"{"state":"syncing"}"#).unwrap();
        assert_eq!((sync.done_bytes, sync.error), (0, None));
        let link = LinkStatus::decode(br#"{"state":"from_the_future","x":1}"#).unwrap();
        assert_eq!(link.state, LinkCondition::Unknown);
        assert!(SyncStatus::decode(br#"{"state":"bogus"}"#).is_err());
        assert!(VerifyStatus::decode(b"{\"state\":\"done\"").is_err());
        assert_eq!(ChangedBytes::decode(b" 12\n").unwrap(), ChangedBytes(12));
        assert!(ChangedBytes::decode(b"-1").is_err());
    }

    #[test]
    fn latencies_fall_in_their_buckets() {
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(50), 0, "bounds are inclusive");
        assert_eq!(latency_bucket(51), 1);
        assert_eq!(latency_bucket(999), 4);
        assert_eq!(latency_bucket(1_000), 4);
        assert_eq!(latency_bucket(5_000_000), LATENCY_BOUNDS_US.len() - 1);
        assert_eq!(latency_bucket(5_000_001), LATENCY_BOUNDS_US.len());
        assert_eq!(latency_bucket(u64::MAX), LATENCY_BOUNDS_US.len());
    }

    #[test]
    fn metrics_round_trip_and_add_up() {
        let mut buckets = vec![0; LATENCY_BOUNDS_US.len() + 1];
        buckets[2] = 3;
        let m = FsMetrics {
            activity_log_writes: 4,
            dirty_bytes: 4096,
            replicated_bytes: 1 << 20,
            replicated_ops: 17,
            write_latency: Latencies {
                buckets,
                count: 3,
                sum_us: 600,
            },
            fsync_latency: Latencies::default(),
            write_stages: Stages {
                count: 2,
                peer_last: 1,
                record_ns: 10,
                send_ns: 20,
                local_ns: 30,
                peer_ns: 40,
                peer_busy_ns: 5,
                reply_ns: 6,
                total_ns: 100,
            },
            fsync_stages: Stages::default(),
            early_syncs: 5,
            fsyncs_early: 4,
            fsyncs_peer_early: 3,
            cached_writes: 2,
        };
        let back = FsMetrics::decode(&m.encode()).unwrap();
        assert_eq!(back, m);
        assert!(m.encode().ends_with(b"\n"));
        // Missing fields (an older writer) are zero.
        assert_eq!(FsMetrics::decode(b"{}").unwrap(), FsMetrics::default());
        let mut sum = m.clone();
        sum.add(&m);
        assert_eq!(sum.replicated_ops, 34);
        assert_eq!(sum.fsyncs_peer_early, 6);
        assert_eq!(sum.cached_writes, 4);
        assert_eq!(sum.write_latency.buckets[2], 6);
        assert_eq!(sum.write_stages.total_ns, 200);
        assert_eq!(sum.write_stages.since(&m.write_stages), m.write_stages);
        assert_eq!(m.write_stages.means_us()[6], ("total", 0.05));
        assert_eq!(sum.write_latency.sum_us, 1200);
        let mut empty = FsMetrics::default();
        empty.add(&m);
        assert_eq!(empty, m);
    }

    #[test]
    fn generation_ids_are_validated_and_lowercase() {
        assert_eq!(GenerationId::try_from("00AB").unwrap().as_str(), "00ab");
        for bad in ["", "xyz", " 1", &"a".repeat(65)] {
            assert!(GenerationId::try_from(bad).is_err(), "{bad:?}");
        }
        assert!(GenerationId::try_from("f".repeat(64).as_str()).is_ok());
        let id = GenerationId::from_file(b" 0F \n").unwrap();
        assert_eq!(id.to_file(), b"0f\n");
        assert_eq!(GenerationId::from_file(b"\n"), None);
    }
}
