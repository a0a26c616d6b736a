//! The cluster configuration: one TOML file, identical on both nodes
//! (design, "Interfaces"), parsed strictly and validated before anything runs.
//!
//! An unknown key is a warning with its line and column ([`unknown_keys`],
//! logged by [`Config::load`] and printed by `--check-config`), not an error:
//! a file written for a newer release (which added a key with a default)
//! still starts an older vmhad during a rolling upgrade. [`check_text`] reports
//! every problem at once, each a [`ConfigError`] variant naming the node, module
//! or key, with its [`KeyPath`] and position (`FILE:LINE:COLUMN`): every syntax
//! error (`toml::de::DeTable::parse_recoverable`), every refused key (each
//! section is deserialized on its own; a failing key is taken out and the
//! section tried again), then every semantic check. [`Config::from_toml_str`]
//! and [`Config::load`] return the first.
//! [`Config::cluster_key_digests`] / [`Config::module_key_digests`] give a short
//! digest per key, carried in heartbeats so that the nodes name the keys that
//! differ.
//!
//! Choices where the design is silent:
//! - Required keys: `cluster.name`, every node's `name` and `addresses`, every
//!   module's `name`, `replicated` and `port`. Everything else defaults to the
//!   value shown in the design's example (`domain` defaults to the module name,
//!   `replication_network` to the last network). A port is required rather
//!   than derived, so that reordering modules never moves a port.
//! - Module names become file names in the state directory, so they are limited
//!   to `[A-Za-z0-9_.-]`, not starting with a dot.
//! - Replicated paths must be absolute, without `..`, and no two of them (in the
//!   same module or across modules) may be equal or nested: each is mounted over
//!   by exactly one module's filesystem.
//! - Directory `i` of a module replicates on `port + i`: these ranges may not
//!   overlap (between modules, or with the heartbeat port) nor pass 65535.
//! - Two modules may not drive the same libvirt domain on the same URI.
//! - A witness is `IP` (ICMP echo) or `IP:PORT` (TCP connect).
//! - Zero modules is valid (a pair that only exchanges heartbeats).
//! - [`Config::hash`] covers the whole validated configuration with defaults
//!   filled in, so comments, key order and spelled-out defaults do not change it.
//!   [`Config::module_hash`] covers one module plus the cluster settings its
//!   failover decisions depend on (nodes, heartbeat timing, witnesses,
//!   split-brain policy), so a change to another module does not block this
//!   one's failover.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The reference product's limit, kept: a pair serves at most this many modules.
pub const MAX_MODULES: usize = 32;
/// The longest failover timeout accepted (a day): beyond it a dead peer is never
/// noticed in practice, and sums with it could overflow.
pub const MAX_FAILOVER_TIMEOUT_MS: u64 = 86_400_000;
/// The longest ACPI shutdown wait accepted (a day).
pub const MAX_STOP_TIMEOUT_S: u64 = 86_400;

/// Problems loading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("[web]: cert_file and key_file go together (neither = a self-signed certificate)")]
    WebCertPair,
    #[error("cannot read configuration {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid configuration: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("expected exactly 2 [[node]] sections, found {0}")]
    NodeCount(usize),
    #[error("node name `{0}` is empty or used twice")]
    DuplicateNode(String),
    #[error("node `{0}` has no addresses")]
    NoAddresses(String),
    #[error(
        "node `{node}`: address `{address}` is neither an IP address nor a host name that resolves"
    )]
    BadAddress { node: String, address: String },
    #[error("node `{first}` has {first_count} addresses but node `{second}` has {second_count}: one per network on both")]
    AddressCountMismatch {
        first: String,
        first_count: usize,
        second: String,
        second_count: usize,
    },
    #[error("node `{name}` is not in the configuration (nodes: {known})")]
    UnknownLocalNode { name: String, known: String },
    #[error("cluster.heartbeat_interval_ms = {interval_ms} must be above 0 and below failover_timeout_ms = {failover_ms}")]
    HeartbeatInterval { interval_ms: u64, failover_ms: u64 },
    #[error("cluster.split_brain = `{0}`: expected \"discard-least-changes\", \"manual\" or \"prefer:NODE\"")]
    BadSplitBrain(String),
    #[error("cluster.split_brain = `prefer:{0}` names an unknown node")]
    UnknownPreferredNode(String),
    #[error("cluster.witness `{0}` is neither IP, HOST, IP:PORT nor HOST:PORT (a host name must resolve)")]
    BadWitness(String),
    #[error("{count} modules configured, at most {MAX_MODULES} are supported")]
    TooManyModules { count: usize },
    #[error(
        "module name `{0}` is invalid: use letters, digits, `_`, `-`, `.`, not starting with `.`"
    )]
    BadModuleName(String),
    #[error("module `{0}` is defined twice")]
    DuplicateModule(String),
    #[error("module `{0}` has no `replicated` directories")]
    NoReplicated(String),
    #[error("module `{module}`: replicated path `{path}` must be absolute and without `..`")]
    RelativeReplicated { module: String, path: PathBuf },
    #[error("replicated path `{path}` of module `{module}` overlaps `{other_path}` of module `{other_module}`")]
    OverlappingReplicated {
        module: String,
        path: PathBuf,
        other_module: String,
        other_path: PathBuf,
    },
    #[error("module `{0}` has no `port`")]
    NoPort(String),
    #[error("{owner}: port 0 is not allowed")]
    ZeroPort { owner: String },
    #[error("port {port} is used by both {first} and {second}")]
    DuplicatePort {
        port: u16,
        first: String,
        second: String,
    },
    #[error("module `{module}`: {dirs} replicated directories need ports {port} to {port} + {dirs} - 1, beyond 65535")]
    PortRange {
        module: String,
        port: u16,
        dirs: usize,
    },
    #[error("modules `{first}` and `{second}` drive the same libvirt domain `{domain}`")]
    DuplicateDomain {
        domain: String,
        first: String,
        second: String,
    },
    #[error(
        "module `{module}`: replication_network = {index} but nodes have {networks} addresses"
    )]
    ReplicationNetwork {
        module: String,
        index: usize,
        networks: usize,
    },
    #[error("module `{module}`: default_primary = `{node}` names an unknown node")]
    UnknownDefaultPrimary { module: String, node: String },
    #[error("module `{module}`: lock_timeout_ms = {lock_timeout_ms} must exceed failover_timeout_ms + heartbeat_interval_ms = {minimum}")]
    LockTimeout {
        module: String,
        lock_timeout_ms: u64,
        minimum: u64,
    },
    #[error("module `{0}`: maxloop must be at least 1")]
    ZeroMaxloop(String),
    #[error("module `{0}`: loop_interval_s must be at least 1")]
    ZeroLoopInterval(String),
    #[error("cluster.state_dir = `{0}` must be an absolute path")]
    RelativeStateDir(PathBuf),
    #[error("cluster.state_dir = `{state_dir}` is inside replicated path `{path}` of module `{module}`: each node keeps its own state")]
    StateDirReplicated {
        state_dir: PathBuf,
        module: String,
        path: PathBuf,
    },
    #[error("cluster.control_socket = `{0}` must be an absolute path")]
    RelativeControlSocket(PathBuf),
    #[error("cluster.control_socket = `{socket}`: its directory `{dir}` is world-writable (anyone could put their own socket there)")]
    ControlSocketDir { socket: PathBuf, dir: PathBuf },
    #[error("address {address} is on both node `{first}` and node `{second}`")]
    SameAddress {
        address: IpAddr,
        first: String,
        second: String,
    },
    #[error("cluster.failover_timeout_ms = {failover_timeout_ms} is too large (at most {MAX_FAILOVER_TIMEOUT_MS}, a day)")]
    FailoverTimeout { failover_timeout_ms: u64 },
    #[error("module `{module}`: stop_timeout_s = {stop_timeout_s} is too large (at most {MAX_STOP_TIMEOUT_S}, a day)")]
    StopTimeout { module: String, stop_timeout_s: u64 },
    #[error("module `{0}`: lock_timeout_ms must be above 0")]
    ZeroLockTimeout(String),
    #[error("module `{module}`: resync_streams = {resync_streams} is too large (at most {max})")]
    ResyncStreams {
        module: String,
        resync_streams: u32,
        max: usize,
    },
    #[error("unknown top-level key `{0}` (expected [cluster], [[node]], [[module]], [web])")]
    UnknownTopLevel(String),
    #[error("the [cluster] section is missing")]
    NoCluster,
    #[error("`{0}` must be [[{0}]] tables")]
    NotTables(String),
    #[error("cannot serialise the configuration for hashing: {0}")]
    Canonical(#[from] serde_json::Error),
}

/// Which of the two `[[node]]` sections a node is (0 or 1, in file order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeIndex(u8);

impl NodeIndex {
    pub const FIRST: NodeIndex = NodeIndex(0);
    pub const SECOND: NodeIndex = NodeIndex(1);

    /// Position in [`Config::nodes`].
    pub fn get(self) -> usize {
        usize::from(self.0)
    }

    /// The other node of the pair.
    pub fn peer(self) -> NodeIndex {
        NodeIndex(1 - self.0)
    }
}

/// A blake3 digest, shown and serialised as hex (it travels in heartbeats).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    fn of_json<T: Serialize>(domain: &str, value: &T) -> Result<Digest, serde_json::Error> {
        let mut hasher = blake3::Hasher::new();
        // A domain separator: the cluster hash and a module hash never collide.
        hasher.update(domain.as_bytes());
        hasher.update(&[0]);
        serde_json::to_writer(&mut hasher, value)?;
        Ok(Digest(*hasher.finalize().as_bytes()))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let bad = || serde::de::Error::custom("expected 64 hex digits");
        if text.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            let pair = text.get(2 * i..2 * i + 2).ok_or_else(bad)?;
            *byte = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
        }
        Ok(Digest(out))
    }
}

/// How a split brain is resolved when the two sides meet again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum SplitBrainPolicy {
    /// The side that dirtied fewer bytes since the split is resynchronised.
    DiscardLeastChanges,
    /// Nothing is discarded automatically; `vmctl prim` on the side to keep.
    Manual,
    /// This node's data always wins.
    Prefer(NodeIndex),
}

/// A split-brain witness: reachable if it answers ("refused" counts as an answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Witness {
    Icmp(IpAddr),
    Tcp(SocketAddr),
}

/// The `[cluster]` section, validated, defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cluster {
    pub name: String,
    pub key_file: PathBuf,
    pub state_dir: PathBuf,
    pub control_socket: PathBuf,
    pub heartbeat_port: u16,
    /// TCP port of vmhad's daemon channel (`crate::channel`), on every address.
    pub channel_port: u16,
    pub heartbeat_interval_ms: u64,
    pub failover_timeout_ms: u64,
    pub start_wait_ms: u64,
    pub witness: Vec<Witness>,
    pub split_brain: SplitBrainPolicy,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// One `[[node]]`: its addresses, one per network, production first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Node {
    pub name: String,
    pub addresses: Vec<IpAddr>,
}

/// One `[[module]]`: a VM and its replicated directories.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Module {
    pub name: String,
    pub domain: String,
    pub libvirt_uri: String,
    pub replicated: Vec<PathBuf>,
    pub port: u16,
    pub replication_network: usize,
    pub default_primary: Option<NodeIndex>,
    pub failover: bool,
    pub lock_timeout_ms: u64,
    pub stop_timeout_s: u64,
    pub rate_limit_mb_s: u64,
    /// Reader threads of a resync (vmha-fs `--resync-streams`); 0 = vmha-fs's default.
    /// Left out of the digests when 0, so a node without this key hashes alike.
    #[serde(skip_serializing_if = "is_zero")]
    pub resync_streams: u32,
    /// When a write returns (vmha-fs `--protocol`): "C", "B" or "flush".
    pub protocol: vmha_fs::Protocol,
    /// How the guest's O_DIRECT writes reach the writer's copy (vmha-fs
    /// `--local-writes`): "cached" (default) or "direct". Left out of the
    /// hashes when "cached": the configurations of daemons that predate it
    /// still match.
    #[serde(skip_serializing_if = "is_cached")]
    pub local_writes: vmha_fs::LocalWrites,
    pub maxloop: u32,
    pub loop_interval_s: u64,
    /// What `vmctl swap` does: stop/start (default) or a live migration
    /// first. Left out of the hashes when `stop`: the configurations of
    /// daemons that predate it still match.
    #[serde(skip_serializing_if = "SwapMode::is_stop")]
    pub swap: SwapMode,
}

/// A module's `swap` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SwapMode {
    /// Stop the VM, start it on the peer.
    #[default]
    Stop,
    /// Live-migrate it; stop/start when the migration is refused (logged).
    Live,
}

impl SwapMode {
    pub fn is_stop(&self) -> bool {
        *self == SwapMode::Stop
    }
}

fn is_cached(w: &vmha_fs::LocalWrites) -> bool {
    *w == vmha_fs::LocalWrites::Cached
}

/// The `[web]` section: the HTTPS console and `/metrics` (see `crate::web`).
/// Absent means enabled on port [`Web::DEFAULT_PORT`] of every address of
/// this node, with a self-signed certificate kept in the state directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Web {
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    /// `ADDR:PORT` to listen on; empty = every address of this node, port 9010.
    #[serde(default)]
    pub listen: Vec<std::net::SocketAddr>,
    /// PEM certificate chain and key; both or neither (self-signed then).
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// `/metrics` requires a login (session cookie or basic auth).
    #[serde(default)]
    pub metrics_auth: bool,
}

impl Web {
    pub const DEFAULT_PORT: u16 = 9010;
}

impl Default for Web {
    fn default() -> Self {
        Web {
            enabled: true,
            listen: Vec::new(),
            cert_file: None,
            key_file: None,
            metrics_auth: false,
        }
    }
}

/// The whole validated configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Config {
    pub cluster: Cluster,
    pub nodes: [Node; 2],
    pub modules: Vec<Module>,
    /// The `[web]` section (console and metrics). Node-local (each node
    /// listens on its own addresses): not part of the hashes nor compared.
    #[serde(skip)]
    pub web: Web,
    #[serde(skip)]
    hash: Digest,
    #[serde(skip)]
    module_hashes: Vec<Digest>,
    #[serde(skip)]
    cluster_keys: KeyDigests,
    #[serde(skip)]
    module_keys: Vec<KeyDigests>,
}

/// Cluster keys that name paths on the node itself: not compared between
/// the nodes (each may have its own), still compared by a reload.
pub const NODE_LOCAL_KEYS: [&str; 3] = [
    "cluster.key_file",
    "cluster.state_dir",
    "cluster.control_socket",
];

/// Per-key short digests of a section (see [`Config::cluster_key_digests`]).
pub type KeyDigests = std::collections::BTreeMap<String, String>;

/// Short digest (8 bytes, hex) of each top-level field of `value`'s JSON form,
/// named `prefix` + field.
fn key_digests<T: Serialize>(
    prefix: &str,
    value: &T,
    out: &mut KeyDigests,
) -> Result<(), serde_json::Error> {
    if let serde_json::Value::Object(fields) = serde_json::to_value(value)? {
        for (key, field) in fields {
            let digest = Digest::of_json("vmha key v1", &field)?;
            let short: String = digest.to_string().chars().take(16).collect();
            out.insert(format!("{prefix}{key}"), short);
        }
    }
    Ok(())
}

/// The keys whose digests differ between two [`KeyDigests`] (or that only one
/// side has), each prefixed with `prefix`, sorted.
pub fn differing_keys(prefix: &str, local: &KeyDigests, peer: &KeyDigests) -> Vec<String> {
    let mut keys: Vec<String> = local
        .iter()
        .filter(|(k, v)| peer.get(*k) != Some(*v))
        .map(|(k, _)| format!("{prefix}{k}"))
        .chain(
            peer.keys()
                .filter(|k| !local.contains_key(*k))
                .map(|k| format!("{prefix}{k}")),
        )
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// The part of the cluster a module's failover decisions depend on.
#[derive(Serialize)]
struct ModuleScope<'a> {
    nodes: &'a [Node; 2],
    heartbeat_port: u16,
    heartbeat_interval_ms: u64,
    failover_timeout_ms: u64,
    witness: &'a [Witness],
    split_brain: &'a SplitBrainPolicy,
    module: &'a Module,
}

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config = Config::from_toml_str(&text)?;
        for unknown in unknown_keys(&text) {
            tracing::warn!(file = %path.display(), "{}:{unknown}", path.display());
        }
        Ok(config)
    }

    /// Parses and validates a configuration held in memory.
    /// The first problem is returned; [`check_text`] reports them all.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        check_text(text).map_err(|problems| match problems.into_iter().next() {
            Some(first) => first.error,
            None => ConfigError::NoCluster,
        })
    }

    /// The index of the node called `name` (the `--node` argument).
    pub fn local_node(&self, name: &str) -> Result<NodeIndex, ConfigError> {
        match self.nodes.iter().position(|n| n.name == name) {
            Some(0) => Ok(NodeIndex::FIRST),
            Some(_) => Ok(NodeIndex::SECOND),
            None => Err(ConfigError::UnknownLocalNode {
                name: name.to_string(),
                known: self
                    .nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    pub fn node(&self, index: NodeIndex) -> &Node {
        &self.nodes[index.get()]
    }

    pub fn module(&self, name: &str) -> Option<&Module> {
        self.modules.iter().find(|m| m.name == name)
    }

    /// Digest of the whole configuration, compared between nodes in heartbeats.
    pub fn hash(&self) -> Digest {
        self.hash
    }

    /// Digest of what one module's failover decisions depend on.
    pub fn module_hash(&self, module: &str) -> Option<Digest> {
        let index = self.modules.iter().position(|m| m.name == module)?;
        self.module_hashes.get(index).copied()
    }

    /// Short digests of each cluster-wide key, named `cluster.KEY` and
    /// `node[I].KEY` (without [`NODE_LOCAL_KEYS`]): carried in heartbeats so that the peers name the keys
    /// that differ, not only that something does.
    pub fn cluster_key_digests(&self) -> &KeyDigests {
        &self.cluster_keys
    }

    /// Short digests of each key of one module's section, named by the key
    /// alone (`lock_timeout_ms`, …).
    pub fn module_key_digests(&self, module: &str) -> Option<&KeyDigests> {
        let index = self.modules.iter().position(|m| m.name == module)?;
        self.module_keys.get(index)
    }

    fn with_hashes(mut self) -> Result<Config, ConfigError> {
        self.hash = Digest::of_json("vmha config v1", &self)?;
        let mut cluster_keys = KeyDigests::new();
        key_digests("cluster.", &self.cluster, &mut cluster_keys)?;
        // Paths on the node itself: each node may have its own.
        for local in NODE_LOCAL_KEYS {
            cluster_keys.remove(local);
        }
        for (i, node) in self.nodes.iter().enumerate() {
            key_digests(&format!("node[{i}]."), node, &mut cluster_keys)?;
        }
        self.cluster_keys = cluster_keys;
        self.module_keys = self
            .modules
            .iter()
            .map(|m| {
                let mut keys = KeyDigests::new();
                key_digests("", m, &mut keys).map(|()| keys)
            })
            .collect::<Result<_, _>>()?;
        self.module_hashes = self
            .modules
            .iter()
            .map(|module| {
                Digest::of_json(
                    "vmha module v1",
                    &ModuleScope {
                        nodes: &self.nodes,
                        heartbeat_port: self.cluster.heartbeat_port,
                        heartbeat_interval_ms: self.cluster.heartbeat_interval_ms,
                        failover_timeout_ms: self.cluster.failover_timeout_ms,
                        witness: &self.cluster.witness,
                        split_brain: &self.cluster.split_brain,
                        module,
                    },
                )
            })
            .collect::<Result<_, _>>()?;
        Ok(self)
    }
}

// ---- the file as written, before validation ----

/// The keys this release knows, per table (kept next to the `Raw*` structs below;
/// `the_design_example_has_no_unknown_keys` checks them against a full file).
const TOP_KEYS: &[&str] = &["cluster", "node", "module", "web"];
const CLUSTER_KEYS: &[&str] = &[
    "name",
    "key_file",
    "state_dir",
    "control_socket",
    "heartbeat_port",
    "channel_port",
    "heartbeat_interval_ms",
    "failover_timeout_ms",
    "start_wait_ms",
    "witness",
    "split_brain",
];
const NODE_KEYS: &[&str] = &["name", "addresses"];
const MODULE_KEYS: &[&str] = &[
    "name",
    "domain",
    "libvirt_uri",
    "replicated",
    "port",
    "replication_network",
    "default_primary",
    "failover",
    "lock_timeout_ms",
    "stop_timeout_s",
    "rate_limit_mb_s",
    "resync_streams",
    "protocol",
    "local_writes",
    "maxloop",
    "loop_interval_s",
    "swap",
];

/// A key this release does not know (ignored, with a warning).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownKey {
    /// Dotted path, e.g. `cluster.foo` or `module[1].bar`.
    pub key: String,
    /// 1-based line and column of the key in the file.
    pub line: usize,
    pub column: usize,
}

impl std::fmt::Display for UnknownKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}: unknown key `{}` ignored (written for a newer vmha, or a typo)",
            self.line, self.column, self.key
        )
    }
}

/// The keys of `text` this release does not know, in file order. A file that
/// does not parse has none (the parse error says what is wrong).
pub fn unknown_keys(text: &str) -> Vec<UnknownKey> {
    use toml::de::{DeTable, DeValue};
    let Ok(doc) = DeTable::parse(text) else {
        return Vec::new();
    };
    let position = |offset: usize| {
        let before = text.get(..offset).unwrap_or(text);
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        (line, column)
    };
    let mut out = Vec::new();
    let mut check = |table: &DeTable<'_>, known: &[&str], prefix: &str| {
        for (key, _) in table.iter() {
            if !known.contains(&key.get_ref().as_ref()) {
                let (line, column) = position(key.span().start);
                out.push(UnknownKey {
                    key: format!("{prefix}{}", key.get_ref()),
                    line,
                    column,
                });
            }
        }
    };
    let top = doc.get_ref();
    check(top, TOP_KEYS, "");
    for (key, value) in top.iter() {
        let known = match key.get_ref().as_ref() {
            "cluster" => CLUSTER_KEYS,
            "node" => NODE_KEYS,
            "module" => MODULE_KEYS,
            _ => continue,
        };
        match value.get_ref() {
            DeValue::Table(table) => check(table, known, &format!("{}.", key.get_ref())),
            DeValue::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    if let DeValue::Table(table) = item.get_ref() {
                        check(table, known, &format!("{}[{i}].", key.get_ref()));
                    }
                }
            }
            _ => {}
        }
    }
    out.sort_by_key(|u| (u.line, u.column));
    out
}

#[derive(Deserialize)]

/// The sections as written (each deserialized on its own, see [`check_text`]).
struct RawConfig {
    cluster: RawCluster,
    nodes: Vec<RawNode>,
    modules: Vec<RawModule>,
    web: Web,
}

#[derive(Deserialize)]
struct RawCluster {
    name: String,
    #[serde(default = "defaults::key_file")]
    key_file: PathBuf,
    #[serde(default = "defaults::state_dir")]
    state_dir: PathBuf,
    #[serde(default = "defaults::control_socket")]
    control_socket: PathBuf,
    #[serde(default = "defaults::heartbeat_port")]
    heartbeat_port: u16,
    /// Default: `heartbeat_port - 1` (7099 with the default heartbeat port).
    #[serde(default)]
    channel_port: Option<u16>,
    #[serde(default = "defaults::heartbeat_interval_ms")]
    heartbeat_interval_ms: u64,
    #[serde(default = "defaults::failover_timeout_ms")]
    failover_timeout_ms: u64,
    #[serde(default = "defaults::start_wait_ms")]
    start_wait_ms: u64,
    #[serde(default)]
    witness: Vec<String>,
    #[serde(default = "defaults::split_brain")]
    split_brain: String,
}

impl RawCluster {
    /// The channel's port: as written, else next to the heartbeat port.
    fn channel_port(&self) -> u16 {
        self.channel_port
            .unwrap_or_else(|| self.heartbeat_port.saturating_sub(1))
    }
}

#[derive(Deserialize)]
struct RawNode {
    name: String,
    addresses: Vec<String>,
}

#[derive(Deserialize)]
struct RawModule {
    name: String,
    domain: Option<String>,
    #[serde(default = "defaults::libvirt_uri")]
    libvirt_uri: String,
    // Optional here so that its absence is reported with the module's name.
    replicated: Option<Vec<PathBuf>>,
    port: Option<u16>,
    replication_network: Option<usize>,
    default_primary: Option<String>,
    #[serde(default = "defaults::failover")]
    failover: bool,
    #[serde(default = "defaults::lock_timeout_ms")]
    lock_timeout_ms: u64,
    #[serde(default = "defaults::stop_timeout_s")]
    stop_timeout_s: u64,
    #[serde(default)]
    rate_limit_mb_s: u64,
    #[serde(default)]
    resync_streams: u32,
    #[serde(default)]
    protocol: vmha_fs::Protocol,
    #[serde(default)]
    local_writes: vmha_fs::LocalWrites,
    #[serde(default = "defaults::maxloop")]
    maxloop: u32,
    #[serde(default = "defaults::loop_interval_s")]
    loop_interval_s: u64,
    #[serde(default)]
    swap: SwapMode,
}

/// Defaults: the values of the design's example.
mod defaults {
    use std::path::PathBuf;

    pub fn yes() -> bool {
        true
    }

    pub fn key_file() -> PathBuf {
        "/etc/vmha/cluster.key".into()
    }
    pub fn state_dir() -> PathBuf {
        "/var/lib/vmha".into()
    }
    pub fn control_socket() -> PathBuf {
        "/run/vmha/vmhad.sock".into()
    }
    pub fn heartbeat_port() -> u16 {
        7100
    }
    /// 200 / 1500 ms (DESIGN.md: 500 / 3000): a failover in about 2 s, with
    /// the heartbeat path isolated from load (`heartbeat` module docs).
    pub fn heartbeat_interval_ms() -> u64 {
        200
    }
    pub fn failover_timeout_ms() -> u64 {
        1500
    }
    pub fn start_wait_ms() -> u64 {
        10_000
    }
    pub fn split_brain() -> String {
        "discard-least-changes".into()
    }
    pub fn libvirt_uri() -> String {
        "qemu:///system".into()
    }
    pub fn failover() -> bool {
        true
    }
    pub fn lock_timeout_ms() -> u64 {
        5000
    }
    pub fn stop_timeout_s() -> u64 {
        60
    }
    pub fn maxloop() -> u32 {
        3
    }
    pub fn loop_interval_s() -> u64 {
        86_400
    }
}

// ---- where a problem is ----

/// One step of a [`KeyPath`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySeg {
    Key(String),
    Index(usize),
}

/// Where a problem is in the file: keys and array indices (from 0, in file
/// order), shown as `module[1].port`. Empty: the file as a whole.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyPath(pub Vec<KeySeg>);

impl KeyPath {
    pub fn key(mut self, key: &str) -> KeyPath {
        self.0.push(KeySeg::Key(key.to_string()));
        self
    }
    pub fn index(mut self, index: usize) -> KeyPath {
        self.0.push(KeySeg::Index(index));
        self
    }
    fn cluster(key: &str) -> KeyPath {
        KeyPath::default().key("cluster").key(key)
    }
    fn node(index: usize) -> KeyPath {
        KeyPath::default().key("node").index(index)
    }
    fn module(index: usize) -> KeyPath {
        KeyPath::default().key("module").index(index)
    }
}

/// An IP address, or a host name resolved once, when the file is read (its
/// first address, IPv4 first: the one a peer is most likely configured to
/// use). Names that do not resolve are errors, not skipped.
fn resolve_host(text: &str) -> Option<IpAddr> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip);
    }
    if text.is_empty() || text.contains(':') {
        return None;
    }
    use std::net::ToSocketAddrs;
    let all: Vec<IpAddr> = (text, 0u16)
        .to_socket_addrs()
        .ok()?
        .map(|a| a.ip())
        .collect();
    all.iter()
        .copied()
        .find(IpAddr::is_ipv4)
        .or_else(|| all.first().copied())
}

/// `HOST:PORT` with a host name, resolved as [`resolve_host`].
fn resolve_host_port(text: &str) -> Option<SocketAddr> {
    let (host, port) = text.rsplit_once(':')?;
    let port = port.parse::<u16>().ok()?;
    Some(SocketAddr::new(resolve_host(host)?, port))
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("(file)");
        }
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                KeySeg::Key(k) if i == 0 => f.write_str(k)?,
                KeySeg::Key(k) => write!(f, ".{k}")?,
                KeySeg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// One problem of a configuration file, with the key it concerns and, when
/// known, the byte range in the text (of the value, else of the nearest
/// enclosing item that exists).
#[derive(Debug)]
pub struct Problem {
    pub error: ConfigError,
    pub key: KeyPath,
    pub span: Option<std::ops::Range<usize>>,
}

impl Problem {
    /// The message without the position (a TOML error's own text, not its
    /// multi-line excerpt).
    pub fn message(&self) -> String {
        match &self.error {
            ConfigError::Parse(e) => e.message().trim().to_string(),
            other => other.to_string(),
        }
    }

    /// 1-based line and column (in characters) of the problem in `text`.
    pub fn line_column(&self, text: &str) -> Option<(usize, usize)> {
        let start = self.span.as_ref()?.start.min(text.len());
        let before = text.get(..start)?;
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before.get(line_start..)?.chars().count() + 1;
        Some((line, column))
    }

    /// `FILE:LINE:COLUMN: KEY: MESSAGE`, as `--check-config` prints it.
    pub fn render(&self, file: &str, text: &str) -> String {
        let at = match self.line_column(text) {
            Some((line, column)) => format!("{file}:{line}:{column}"),
            None => file.to_string(),
        };
        format!("{at}: {}: {}", self.key, self.message())
    }
}

/// Collects problems while validation goes on (every error is reported, not
/// the first).
#[derive(Debug, Default)]
struct Problems(Vec<(ConfigError, KeyPath)>);

impl Problems {
    fn push(&mut self, error: ConfigError, key: KeyPath) {
        self.0.push((error, key));
    }
    fn len(&self) -> usize {
        self.0.len()
    }
}

// ---- parsing: syntax, then each section on its own ----

type DeTable<'i> = toml::de::DeTable<'i>;
type DeValue<'i> = toml::de::DeValue<'i>;
type Spanned<T> = toml::Spanned<T>;

fn overlaps(a: &std::ops::Range<usize>, b: &std::ops::Range<usize>) -> bool {
    a.start <= b.start && b.start < a.end.max(a.start + 1)
}

/// Deserializes one section. A key the section refuses (unknown, wrong type)
/// is reported and taken out, and the section tried again, so that every bad
/// key of it is reported, not only the first.
fn section<T: serde::de::DeserializeOwned>(
    mut value: Spanned<DeValue<'_>>,
    path: &KeyPath,
    out: &mut Vec<Problem>,
) -> Option<T> {
    use serde::de::IntoDeserializer;
    let mut removed: Vec<String> = Vec::new();
    let mut failed = false;
    let whole = value.span();
    for _ in 0..256 {
        let error = match T::deserialize(value.clone().into_deserializer()) {
            Ok(t) => return (!failed).then_some(t),
            Err(e) => e,
        };
        failed = true;
        let span = error.span();
        let DeValue::Table(table) = value.get_mut() else {
            out.push(Problem {
                span: span.or(Some(whole)),
                error: ConfigError::Parse(error),
                key: path.clone(),
            });
            return None;
        };
        let hit = span.as_ref().and_then(|s| {
            table
                .iter()
                .find(|(k, v)| overlaps(&k.span(), s) || overlaps(&v.span(), s))
                .map(|(k, _)| k.clone())
        });
        match hit {
            Some(key) => {
                let name = key.get_ref().to_string();
                table.remove(&key);
                out.push(Problem {
                    span,
                    error: ConfigError::Parse(error),
                    key: path.clone().key(&name),
                });
                removed.push(name);
            }
            None => {
                // A required key taken out above is not "missing" as well.
                let consequence = removed
                    .iter()
                    .any(|k| error.message().contains(&format!("`{k}`")));
                if !consequence {
                    out.push(Problem {
                        span: span.or(Some(whole)),
                        error: ConfigError::Parse(error),
                        key: path.clone(),
                    });
                }
                return None;
            }
        }
    }
    None
}

/// The `[[name]]` tables of the document, each deserialized on its own.
fn tables<T: serde::de::DeserializeOwned>(
    value: Option<&Spanned<DeValue<'_>>>,
    name: &str,
    out: &mut Vec<Problem>,
) -> Option<Vec<T>> {
    let Some(value) = value else {
        return Some(Vec::new());
    };
    let DeValue::Array(items) = value.get_ref() else {
        out.push(Problem {
            error: ConfigError::NotTables(name.to_string()),
            key: KeyPath::default().key(name),
            span: Some(value.span()),
        });
        return None;
    };
    let mut all = Some(Vec::new());
    for (i, item) in items.iter().enumerate() {
        match section::<T>(item.clone(), &KeyPath::default().key(name).index(i), out) {
            Some(t) => {
                if let Some(all) = all.as_mut() {
                    all.push(t);
                }
            }
            None => all = None,
        }
    }
    all
}

fn top<'a, 'i>(root: &'a DeTable<'i>, key: &str) -> Option<&'a Spanned<DeValue<'i>>> {
    root.iter()
        .find(|(k, _)| k.get_ref() == key)
        .map(|(_, v)| v)
}

/// The span of `path` in the document, or of the deepest part of it present.
fn locate(root: &Spanned<DeTable<'_>>, path: &KeyPath) -> Option<std::ops::Range<usize>> {
    let mut best = None;
    let mut current: Option<&DeValue<'_>> = None;
    for (i, seg) in path.0.iter().enumerate() {
        let next = match (seg, current) {
            (KeySeg::Key(k), None) if i == 0 => top(root.get_ref(), k),
            (KeySeg::Key(k), Some(DeValue::Table(t))) => top(t, k),
            (KeySeg::Index(n), Some(DeValue::Array(a))) => a.get(*n),
            _ => None,
        };
        match next {
            Some(v) => {
                best = Some(v.span());
                current = Some(v.get_ref());
            }
            None => break,
        }
    }
    best
}

/// Parses `text` into the sections as written; every problem found goes to `out`.
fn parse_raw(text: &str, out: &mut Vec<Problem>) -> Option<RawConfig> {
    let (root, errors) = toml::de::DeTable::parse_recoverable(text);
    if !errors.is_empty() {
        // Positions in a document that does not parse are not worth guessing.
        for error in errors {
            out.push(Problem {
                span: error.span(),
                error: ConfigError::Parse(error),
                key: KeyPath::default(),
            });
        }
        return None;
    }
    let before = out.len();
    // Unknown keys and tables are warnings ([`unknown_keys`]), not problems.
    let cluster = match top(root.get_ref(), "cluster") {
        Some(value) => {
            section::<RawCluster>(value.clone(), &KeyPath::default().key("cluster"), out)
        }
        None => {
            out.push(Problem {
                error: ConfigError::NoCluster,
                key: KeyPath::default().key("cluster"),
                span: Some(0..0),
            });
            None
        }
    };
    let nodes = tables::<RawNode>(top(root.get_ref(), "node"), "node", out);
    let modules = tables::<RawModule>(top(root.get_ref(), "module"), "module", out);
    let web = match top(root.get_ref(), "web") {
        Some(value) => section::<Web>(value.clone(), &KeyPath::default().key("web"), out),
        None => Some(Web::default()),
    };
    if out.len() != before {
        return None;
    }
    Some(RawConfig {
        cluster: cluster?,
        nodes: nodes?,
        modules: modules?,
        web: web?,
    })
}

/// Parses and validates `text`, reporting every problem found (each with its
/// key and position). The configuration comes back only when there is none.
pub fn check_text(text: &str) -> Result<Config, Vec<Problem>> {
    let mut out = Vec::new();
    let Some(raw) = parse_raw(text, &mut out) else {
        return Err(out);
    };
    let mut problems = Problems::default();
    let config = raw.validate(&mut problems);
    if problems.len() == 0 {
        if let Some(config) = config {
            return config.with_hashes().map_err(|e| {
                vec![Problem {
                    error: e,
                    key: KeyPath::default(),
                    span: None,
                }]
            });
        }
    }
    // Positions come from the document again (it parsed above).
    let root = toml::de::DeTable::parse(text).ok();
    Err(problems
        .0
        .into_iter()
        .map(|(error, key)| Problem {
            span: root.as_ref().and_then(|r| locate(r, &key)),
            error,
            key,
        })
        .collect())
}

// ---- validation: every check runs, each problem is collected ----

impl RawConfig {
    fn validate(self, problems: &mut Problems) -> Option<Config> {
        let before = problems.len();
        let nodes = validate_nodes(self.nodes, problems);
        let names: Option<[String; 2]> = nodes
            .as_ref()
            .map(|n| [n[0].name.clone(), n[1].name.clone()]);
        // Without valid nodes, names are not checked (that would only repeat it).
        let node_index = |name: &str| -> Result<Option<NodeIndex>, ()> {
            match &names {
                None => Ok(None),
                Some(names) => match names.iter().position(|n| n == name) {
                    Some(0) => Ok(Some(NodeIndex::FIRST)),
                    Some(_) => Ok(Some(NodeIndex::SECOND)),
                    None => Err(()),
                },
            }
        };
        let timing = (
            self.cluster.failover_timeout_ms,
            self.cluster.heartbeat_interval_ms,
        );
        if self.web.cert_file.is_some() != self.web.key_file.is_some() {
            problems.push(ConfigError::WebCertPair, KeyPath::default().key("web"));
        }
        let (heartbeat_port, channel_port, state_dir) = (
            self.cluster.heartbeat_port,
            self.cluster.channel_port(),
            self.cluster.state_dir.clone(),
        );
        let cluster = validate_cluster(self.cluster, &node_index, problems);
        if self.modules.len() > MAX_MODULES {
            problems.push(
                ConfigError::TooManyModules {
                    count: self.modules.len(),
                },
                KeyPath::module(MAX_MODULES),
            );
        }
        let networks = nodes.as_ref().map(|n| n[0].addresses.len());
        let mut modules = Vec::with_capacity(self.modules.len());
        for (i, raw) in self.modules.into_iter().enumerate() {
            modules.push((i, raw.validate(i, timing, networks, &node_index, problems)));
        }
        check_uniqueness(heartbeat_port, channel_port, &state_dir, &modules, problems);
        if problems.len() != before {
            return None;
        }
        Some(Config {
            cluster: cluster?,
            nodes: nodes?,
            modules: modules.into_iter().map(|(_, m)| m).collect(),
            web: self.web,
            hash: Digest([0; 32]),
            module_hashes: Vec::new(),
            cluster_keys: KeyDigests::new(),
            module_keys: Vec::new(),
        })
    }
}

fn validate_nodes(raw: Vec<RawNode>, problems: &mut Problems) -> Option<[Node; 2]> {
    let count = raw.len();
    let before = problems.len();
    let mut nodes = Vec::with_capacity(count);
    for (i, node) in raw.into_iter().enumerate() {
        if node.addresses.is_empty() {
            problems.push(
                ConfigError::NoAddresses(node.name.clone()),
                KeyPath::node(i).key("addresses"),
            );
        }
        let mut addresses = Vec::new();
        for (j, a) in node.addresses.iter().enumerate() {
            match resolve_host(a) {
                Some(ip) => addresses.push(ip),
                None => problems.push(
                    ConfigError::BadAddress {
                        node: node.name.clone(),
                        address: a.clone(),
                    },
                    KeyPath::node(i).key("addresses").index(j),
                ),
            }
        }
        if node.name.is_empty() {
            problems.push(
                ConfigError::DuplicateNode(node.name.clone()),
                KeyPath::node(i).key("name"),
            );
        }
        nodes.push(Node {
            name: node.name,
            addresses,
        });
    }
    let Ok([first, second]) = <[Node; 2]>::try_from(nodes) else {
        problems.push(
            ConfigError::NodeCount(count),
            if count > 2 {
                KeyPath::node(2)
            } else {
                KeyPath::default().key("node")
            },
        );
        return None;
    };
    if first.name == second.name && !first.name.is_empty() {
        problems.push(
            ConfigError::DuplicateNode(first.name.clone()),
            KeyPath::node(1).key("name"),
        );
    }
    if let Some((j, address)) = second
        .addresses
        .iter()
        .enumerate()
        .find(|(_, a)| first.addresses.contains(a))
    {
        problems.push(
            ConfigError::SameAddress {
                address: *address,
                first: first.name.clone(),
                second: second.name.clone(),
            },
            KeyPath::node(1).key("addresses").index(j),
        );
    }
    if first.addresses.len() != second.addresses.len() && problems.len() == before {
        problems.push(
            ConfigError::AddressCountMismatch {
                first: first.name.clone(),
                first_count: first.addresses.len(),
                second: second.name.clone(),
                second_count: second.addresses.len(),
            },
            KeyPath::node(1).key("addresses"),
        );
    }
    (problems.len() == before).then_some([first, second])
}

fn validate_cluster(
    raw: RawCluster,
    node_index: &dyn Fn(&str) -> Result<Option<NodeIndex>, ()>,
    problems: &mut Problems,
) -> Option<Cluster> {
    let before = problems.len();
    if raw.failover_timeout_ms > MAX_FAILOVER_TIMEOUT_MS {
        problems.push(
            ConfigError::FailoverTimeout {
                failover_timeout_ms: raw.failover_timeout_ms,
            },
            KeyPath::cluster("failover_timeout_ms"),
        );
    } else if raw.heartbeat_interval_ms == 0 || raw.heartbeat_interval_ms >= raw.failover_timeout_ms
    {
        problems.push(
            ConfigError::HeartbeatInterval {
                interval_ms: raw.heartbeat_interval_ms,
                failover_ms: raw.failover_timeout_ms,
            },
            KeyPath::cluster("heartbeat_interval_ms"),
        );
    }
    if raw.heartbeat_port == 0 {
        problems.push(
            ConfigError::ZeroPort {
                owner: "cluster heartbeat_port".into(),
            },
            KeyPath::cluster("heartbeat_port"),
        );
    }
    if raw.channel_port() == 0 {
        problems.push(
            ConfigError::ZeroPort {
                owner: "cluster channel_port".into(),
            },
            KeyPath::cluster("channel_port"),
        );
    }
    let split_brain = match raw.split_brain.as_str() {
        "discard-least-changes" => Some(SplitBrainPolicy::DiscardLeastChanges),
        "manual" => Some(SplitBrainPolicy::Manual),
        other => match other.strip_prefix("prefer:") {
            Some(node) => match node_index(node) {
                Ok(Some(index)) => Some(SplitBrainPolicy::Prefer(index)),
                Ok(None) => None,
                Err(()) => {
                    problems.push(
                        ConfigError::UnknownPreferredNode(node.into()),
                        KeyPath::cluster("split_brain"),
                    );
                    None
                }
            },
            None => {
                problems.push(
                    ConfigError::BadSplitBrain(raw.split_brain.clone()),
                    KeyPath::cluster("split_brain"),
                );
                None
            }
        },
    };
    if !raw.state_dir.is_absolute() {
        problems.push(
            ConfigError::RelativeStateDir(raw.state_dir.clone()),
            KeyPath::cluster("state_dir"),
        );
    }
    if let Err(e) = check_control_socket(&raw.control_socket) {
        problems.push(e, KeyPath::cluster("control_socket"));
    }
    let mut witness = Vec::new();
    for (i, w) in raw.witness.iter().enumerate() {
        if let Ok(ip) = w.parse::<IpAddr>() {
            witness.push(Witness::Icmp(ip));
        } else if let Ok(sock) = w.parse::<SocketAddr>() {
            witness.push(Witness::Tcp(sock));
        } else if let Some(sock) = resolve_host_port(w) {
            witness.push(Witness::Tcp(sock));
        } else if let Some(ip) = resolve_host(w) {
            witness.push(Witness::Icmp(ip));
        } else {
            problems.push(
                ConfigError::BadWitness(w.clone()),
                KeyPath::cluster("witness").index(i),
            );
        }
    }
    if problems.len() != before {
        return None;
    }
    let channel_port = raw.channel_port();
    Some(Cluster {
        name: raw.name,
        key_file: raw.key_file,
        state_dir: raw.state_dir,
        control_socket: raw.control_socket,
        heartbeat_port: raw.heartbeat_port,
        channel_port,
        heartbeat_interval_ms: raw.heartbeat_interval_ms,
        failover_timeout_ms: raw.failover_timeout_ms,
        start_wait_ms: raw.start_wait_ms,
        witness,
        split_brain: split_brain?,
    })
}

impl RawModule {
    /// `timing`: the cluster's (failover_timeout_ms, heartbeat_interval_ms) as
    /// written; `networks`: the nodes' address count, when the nodes are valid.
    fn validate(
        self,
        index: usize,
        timing: (u64, u64),
        networks: Option<usize>,
        node_index: &dyn Fn(&str) -> Result<Option<NodeIndex>, ()>,
        problems: &mut Problems,
    ) -> Module {
        let at = |key: &str| KeyPath::module(index).key(key);
        let name = self.name;
        let valid_name = !name.is_empty()
            && !name.starts_with('.')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
        if !valid_name {
            problems.push(ConfigError::BadModuleName(name.clone()), at("name"));
        }
        let replicated = self.replicated.unwrap_or_default();
        if replicated.is_empty() {
            problems.push(ConfigError::NoReplicated(name.clone()), at("replicated"));
        }
        for (i, path) in replicated.iter().enumerate() {
            let clean = path.is_absolute()
                && path
                    .components()
                    .all(|c| !matches!(c, Component::ParentDir | Component::CurDir));
            if !clean {
                problems.push(
                    ConfigError::RelativeReplicated {
                        module: name.clone(),
                        path: path.clone(),
                    },
                    at("replicated").index(i),
                );
            }
        }
        let port = match self.port {
            Some(0) => {
                problems.push(
                    ConfigError::ZeroPort {
                        owner: format!("module `{name}`"),
                    },
                    at("port"),
                );
                0
            }
            Some(port) => port,
            None => {
                problems.push(ConfigError::NoPort(name.clone()), at("port"));
                0
            }
        };
        let mut replication_network = self.replication_network.unwrap_or(0);
        if let Some(networks) = networks {
            replication_network = self
                .replication_network
                .unwrap_or(networks.saturating_sub(1));
            if replication_network >= networks {
                problems.push(
                    ConfigError::ReplicationNetwork {
                        module: name.clone(),
                        index: replication_network,
                        networks,
                    },
                    at("replication_network"),
                );
            }
        }
        let default_primary = match self.default_primary {
            None => None,
            Some(node) => match node_index(&node) {
                Ok(index) => index,
                Err(()) => {
                    problems.push(
                        ConfigError::UnknownDefaultPrimary {
                            module: name.clone(),
                            node,
                        },
                        at("default_primary"),
                    );
                    None
                }
            },
        };
        if self.resync_streams as usize > vmha_fs::MAX_RESYNC_STREAMS {
            problems.push(
                ConfigError::ResyncStreams {
                    module: name.clone(),
                    resync_streams: self.resync_streams,
                    max: vmha_fs::MAX_RESYNC_STREAMS,
                },
                at("resync_streams"),
            );
        }
        if self.lock_timeout_ms == 0 {
            problems.push(
                ConfigError::ZeroLockTimeout(name.clone()),
                at("lock_timeout_ms"),
            );
        } else {
            let minimum = timing.0.saturating_add(timing.1);
            if self.lock_timeout_ms <= minimum {
                problems.push(
                    ConfigError::LockTimeout {
                        module: name.clone(),
                        lock_timeout_ms: self.lock_timeout_ms,
                        minimum,
                    },
                    at("lock_timeout_ms"),
                );
            }
        }
        if self.stop_timeout_s > MAX_STOP_TIMEOUT_S {
            problems.push(
                ConfigError::StopTimeout {
                    module: name.clone(),
                    stop_timeout_s: self.stop_timeout_s,
                },
                at("stop_timeout_s"),
            );
        }
        if self.maxloop == 0 {
            problems.push(ConfigError::ZeroMaxloop(name.clone()), at("maxloop"));
        }
        if self.loop_interval_s == 0 {
            problems.push(
                ConfigError::ZeroLoopInterval(name.clone()),
                at("loop_interval_s"),
            );
        }
        // Returned even when invalid: the checks across modules still see it.
        Module {
            domain: self.domain.unwrap_or_else(|| name.clone()),
            name,
            libvirt_uri: self.libvirt_uri,
            replicated,
            port,
            replication_network,
            default_primary,
            failover: self.failover,
            lock_timeout_ms: self.lock_timeout_ms,
            stop_timeout_s: self.stop_timeout_s,
            rate_limit_mb_s: self.rate_limit_mb_s,
            resync_streams: self.resync_streams,
            protocol: self.protocol,
            local_writes: self.local_writes,
            maxloop: self.maxloop,
            loop_interval_s: self.loop_interval_s,
            swap: self.swap,
        }
    }
}

/// The control socket's path is absolute and its directory, if it exists already,
/// not world-writable (vmhad creates a missing one itself, 0755).
fn check_control_socket(socket: &Path) -> Result<(), ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    if !socket.is_absolute() {
        return Err(ConfigError::RelativeControlSocket(socket.to_path_buf()));
    }
    let Some(dir) = socket.parent() else {
        return Ok(());
    };
    if let Ok(meta) = std::fs::metadata(dir) {
        if meta.permissions().mode() & 0o002 != 0 {
            return Err(ConfigError::ControlSocketDir {
                socket: socket.to_path_buf(),
                dir: dir.to_path_buf(),
            });
        }
    }
    Ok(())
}

/// Checks across modules: names, ports, domains, replicated paths. `modules`
/// are the valid ones, each with its index in the file.
fn check_uniqueness(
    heartbeat_port: u16,
    channel_port: u16,
    state_dir: &Path,
    modules: &[(usize, Module)],
    problems: &mut Problems,
) {
    let mut names = HashSet::new();
    let mut ports: HashMap<u16, String> = HashMap::new();
    ports.insert(heartbeat_port, "cluster heartbeat_port".into());
    if let Some(first) = ports.insert(channel_port, "cluster channel_port".into()) {
        problems.push(
            ConfigError::DuplicatePort {
                port: channel_port,
                first,
                second: "cluster channel_port".into(),
            },
            KeyPath::cluster("channel_port"),
        );
    }
    let mut domains: HashMap<(&str, &str), &str> = HashMap::new();
    let mut paths: Vec<(&Path, &str)> = Vec::new();
    for (index, module) in modules {
        let at = |key: &str| KeyPath::module(*index).key(key);
        if !names.insert(module.name.as_str()) {
            problems.push(
                ConfigError::DuplicateModule(module.name.clone()),
                at("name"),
            );
        }
        // Directory `i` of a module replicates on `port + i` (0: reported already).
        for i in 0..module.replicated.len() * usize::from(module.port != 0) {
            let Ok(port) = u16::try_from(usize::from(module.port) + i) else {
                problems.push(
                    ConfigError::PortRange {
                        module: module.name.clone(),
                        port: module.port,
                        dirs: module.replicated.len(),
                    },
                    at("port"),
                );
                break;
            };
            let owner = if i == 0 {
                format!("module `{}`", module.name)
            } else {
                format!(
                    "module `{}` (directory {}: port {} + {i})",
                    module.name,
                    i + 1,
                    module.port
                )
            };
            if let Some(first) = ports.insert(port, owner.clone()) {
                problems.push(
                    ConfigError::DuplicatePort {
                        port,
                        first,
                        second: owner,
                    },
                    at("port"),
                );
            }
        }
        let key = (module.libvirt_uri.as_str(), module.domain.as_str());
        if let Some(first) = domains.insert(key, &module.name) {
            problems.push(
                ConfigError::DuplicateDomain {
                    domain: module.domain.clone(),
                    first: first.into(),
                    second: module.name.clone(),
                },
                at("domain"),
            );
        }
        for (i, path) in module.replicated.iter().enumerate() {
            // Component-wise: /a/b is inside /a, /ab is not.
            if let Some((other_path, other_module)) = paths
                .iter()
                .find(|(other, _)| path.starts_with(other) || other.starts_with(path))
            {
                problems.push(
                    ConfigError::OverlappingReplicated {
                        module: module.name.clone(),
                        path: path.clone(),
                        other_module: (*other_module).into(),
                        other_path: other_path.to_path_buf(),
                    },
                    at("replicated").index(i),
                );
            }
            if state_dir.starts_with(path) {
                problems.push(
                    ConfigError::StateDirReplicated {
                        state_dir: state_dir.to_path_buf(),
                        module: module.name.clone(),
                        path: path.clone(),
                    },
                    at("replicated").index(i),
                );
            }
            paths.push((path, &module.name));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the design, verbatim.
    const DESIGN_EXAMPLE: &str = r#"
[cluster]
name = "pair1"
key_file = "/etc/vmha/cluster.key"
state_dir = "/var/lib/vmha"          # per-node metadata: generations, dirty maps
control_socket = "/run/vmha/vmhad.sock"
heartbeat_port = 7100                 # UDP, on every address of every node
heartbeat_interval_ms = 500
failover_timeout_ms = 3000           # all networks silent this long = peer dead
start_wait_ms = 10000                # at start, how long to look for the peer
witness = []                          # optional split-brain witness addresses
                                      # (ICMP echo or TCP connect; "refused" = reachable)
split_brain = "discard-least-changes" # or "manual", "prefer:NODE"
                                      # least changes = fewer bytes dirtied since the split

[[node]]
name = "node1"
addresses = ["10.0.0.1", "10.1.0.1"]  # one per network: production first, then dedicated links

[[node]]
name = "node2"
addresses = ["10.0.0.2", "10.1.0.2"]

[[module]]
name = "vm1"
domain = "vm1"                        # libvirt domain name
libvirt_uri = "qemu:///system"
replicated = ["/var/lib/libvirt/images/vm1"]   # mounted over
port = 7101                           # replication port of this module (all its dirs)
replication_network = 1               # index into addresses (default: the last)
default_primary = "node1"             # optional: swap back after reintegration
failover = true
lock_timeout_ms = 5000                # > failover_timeout_ms + heartbeat_interval_ms
stop_timeout_s = 60                   # ACPI shutdown wait before destroy
rate_limit_mb_s = 0                   # resync rate limit, 0 = none
resync_streams = 0                    # resync reader threads, 0 = vmha-fs default (4)
protocol = "C"                        # when a write returns: C, B or flush (README)
local_writes = "cached"               # guest O_DIRECT writes: cached or direct (README)
maxloop = 3
loop_interval_s = 86400
"#;

    /// The smallest valid file: everything else defaulted.
    const MINIMAL: &str = r#"
[cluster]
name = "pair1"

[[node]]
name = "node1"
addresses = ["10.0.0.1", "10.1.0.1"]

[[node]]
name = "node2"
addresses = ["10.0.0.2", "10.1.0.2"]

[[module]]
name = "vm1"
replicated = ["/var/lib/libvirt/images/vm1"]
port = 7101
default_primary = "node1"
"#;

    fn err(text: &str) -> ConfigError {
        match Config::from_toml_str(text) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e,
        }
    }

    /// MINIMAL with one line replaced (`from` must occur).
    fn edit(from: &str, to: &str) -> String {
        assert!(MINIMAL.contains(from), "{from}");
        MINIMAL.replacen(from, to, 1)
    }

    /// MINIMAL plus a second module.
    fn with_module(module: &str) -> String {
        format!("{MINIMAL}\n[[module]]\n{module}\n")
    }

    #[test]
    fn design_example_is_valid() {
        let config = Config::from_toml_str(DESIGN_EXAMPLE).unwrap();
        assert_eq!(config.cluster.name, "pair1");
        assert_eq!(config.cluster.heartbeat_port, 7100);
        assert_eq!(
            config.cluster.split_brain,
            SplitBrainPolicy::DiscardLeastChanges
        );
        assert!(config.cluster.witness.is_empty());
        assert_eq!(config.nodes[1].addresses[1].to_string(), "10.1.0.2");
        let vm1 = config.module("vm1").unwrap();
        assert_eq!(vm1.domain, "vm1");
        assert_eq!(
            vm1.replicated,
            vec![PathBuf::from("/var/lib/libvirt/images/vm1")]
        );
        assert_eq!(vm1.port, 7101);
        assert_eq!(vm1.replication_network, 1);
        assert_eq!(vm1.default_primary, Some(NodeIndex::FIRST));
        assert!(vm1.failover);
        assert_eq!((vm1.maxloop, vm1.loop_interval_s), (3, 86_400));
        assert_eq!(config.local_node("node2").unwrap(), NodeIndex::SECOND);
        assert_eq!(NodeIndex::SECOND.peer(), NodeIndex::FIRST);
    }

    #[test]
    fn protocol_is_per_module_defaults_to_c_and_rejects_unknown_names() {
        let vm2 = "name = \"vm2\"\nreplicated = [\"/srv/vm2\"]\nport = 7102";
        let config =
            Config::from_toml_str(&with_module(&format!("{vm2}\nprotocol = \"flush\""))).unwrap();
        assert_eq!(config.module("vm1").unwrap().protocol, vmha_fs::Protocol::C);
        assert_eq!(
            config.module("vm2").unwrap().protocol,
            vmha_fs::Protocol::Flush
        );
        let b = Config::from_toml_str(&with_module(&format!("{vm2}\nprotocol = \"B\""))).unwrap();
        assert_eq!(b.module("vm2").unwrap().protocol, vmha_fs::Protocol::B);
        let bad = with_module(&format!("{vm2}\nprotocol = \"A\""));
        assert_refused(&bad, "module[1].protocol", "flush");
    }

    /// `text` is refused with a problem naming `key` and the hint `expected`.
    fn assert_refused(text: &str, key: &str, expected: &str) {
        let problems = check_text(text).unwrap_err();
        let rendered: Vec<String> = problems
            .iter()
            .map(|p| p.render("vmha.toml", text))
            .collect();
        assert!(
            rendered
                .iter()
                .any(|l| l.contains(key) && l.contains(expected)),
            "{rendered:?}"
        );
    }

    #[test]
    fn local_writes_are_per_module_default_to_cached_and_reject_unknown_names() {
        let vm2 = "name = \"vm2\"\nreplicated = [\"/srv/vm2\"]\nport = 7102";
        let config =
            Config::from_toml_str(&with_module(&format!("{vm2}\nlocal_writes = \"direct\"")))
                .unwrap();
        assert_eq!(
            config.module("vm1").unwrap().local_writes,
            vmha_fs::LocalWrites::Cached
        );
        assert_eq!(
            config.module("vm2").unwrap().local_writes,
            vmha_fs::LocalWrites::Direct
        );
        // `cached` written out hashes as the key left out (older daemons).
        let plain = Config::from_toml_str(&with_module(vm2)).unwrap();
        let cached =
            Config::from_toml_str(&with_module(&format!("{vm2}\nlocal_writes = \"cached\"")))
                .unwrap();
        assert_eq!(cached.hash(), plain.hash());
        assert_ne!(config.hash(), plain.hash());
        let bad = with_module(&format!("{vm2}\nlocal_writes = \"buffered\""));
        assert_refused(&bad, "module[1].local_writes", "direct");
    }

    #[test]
    fn swap_is_per_module_defaults_to_stop_and_rejects_unknown_modes() {
        let vm2 = "name = \"vm2\"\nreplicated = [\"/srv/vm2\"]\nport = 7102";
        let plain = Config::from_toml_str(&with_module(vm2)).unwrap();
        let config =
            Config::from_toml_str(&with_module(&format!("{vm2}\nswap = \"live\""))).unwrap();
        assert_eq!(config.module("vm1").unwrap().swap, SwapMode::Stop);
        assert_eq!(config.module("vm2").unwrap().swap, SwapMode::Live);
        // `stop` written out hashes as the key left out (older daemons).
        let stop = Config::from_toml_str(&with_module(&format!("{vm2}\nswap = \"stop\""))).unwrap();
        assert_eq!(stop.hash(), plain.hash());
        assert_ne!(config.hash(), plain.hash());
        let bad = with_module(&format!("{vm2}\nswap = \"fast\""));
        assert_refused(&bad, "swap", "live");
    }

    #[test]
    fn defaults_equal_the_design_example_and_hash_alike() {
        // Except the failover timing (issue 11: 200 / 1500 ms, not 500 / 3000).
        let example = DESIGN_EXAMPLE
            .replace("heartbeat_interval_ms = 500", "heartbeat_interval_ms = 200")
            .replace("failover_timeout_ms = 3000", "failover_timeout_ms = 1500");
        let full = Config::from_toml_str(&example).unwrap();
        let minimal = Config::from_toml_str(MINIMAL).unwrap();
        assert_eq!(full, minimal);
        assert_eq!(full.hash(), minimal.hash());
        assert_eq!(full.module_hash("vm1"), minimal.module_hash("vm1"));
        assert_eq!(full.hash().to_string().len(), 64);
    }

    #[test]
    fn hashes_follow_what_changed() {
        let base = Config::from_toml_str(&with_module(
            "name = \"vm2\"\nreplicated = [\"/srv/vm2\"]\nport = 7102",
        ))
        .unwrap();
        let vm2_changed = Config::from_toml_str(&with_module(
            "name = \"vm2\"\nreplicated = [\"/srv/vm2\"]\nport = 7102\nmaxloop = 5",
        ))
        .unwrap();
        assert_ne!(base.hash(), vm2_changed.hash());
        assert_eq!(base.module_hash("vm1"), vm2_changed.module_hash("vm1"));
        assert_ne!(base.module_hash("vm2"), vm2_changed.module_hash("vm2"));
        // A cluster-wide timing change concerns every module.
        let timing = Config::from_toml_str(
            &with_module("name = \"vm2\"\nreplicated = [\"/srv/vm2\"]\nport = 7102").replace(
                "name = \"pair1\"",
                "name = \"pair1\"\nfailover_timeout_ms = 2000",
            ),
        )
        .unwrap();
        assert_ne!(base.module_hash("vm1"), timing.module_hash("vm1"));
        assert_eq!(base.module_hash("nope"), None);
    }

    #[test]
    fn digest_round_trips_through_json() {
        let hash = Config::from_toml_str(MINIMAL).unwrap().hash();
        let json = serde_json::to_string(&hash).unwrap();
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), hash);
        assert!(serde_json::from_str::<Digest>("\"abc\"").is_err());
    }

    #[test]
    fn load_reads_a_file_and_names_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmha.toml");
        std::fs::write(&path, MINIMAL).unwrap();
        assert!(Config::load(&path).is_ok());
        let missing = dir.path().join("nope.toml");
        let e = Config::load(&missing).unwrap_err();
        assert!(e.to_string().contains("nope.toml"), "{e}");
    }

    /// A key this release does not know is a warning naming it with its line and
    /// column, not a refusal (a file written for a newer vmha still loads).
    #[test]
    fn unknown_keys_are_warnings_with_their_position() {
        for (from, to, key) in [
            (
                "name = \"pair1\"",
                "name = \"pair1\"\nheartbeat_prot = 1",
                "cluster.heartbeat_prot",
            ),
            (
                "port = 7101",
                "port = 7101\nfailvoer = true",
                "module[0].failvoer",
            ),
            (
                "name = \"node1\"",
                "name = \"node1\"\naddress = []",
                "node[0].address",
            ),
            ("[cluster]", "[clutser]\n[cluster]", "clutser"),
        ] {
            let text = edit(from, to);
            assert!(Config::from_toml_str(&text).is_ok(), "{key}");
            let unknown = unknown_keys(&text);
            assert_eq!(unknown.len(), 1, "{unknown:?}");
            let u = &unknown[0];
            assert_eq!(u.key, key);
            let line = text.lines().nth(u.line - 1).unwrap_or_default();
            let name = key.rsplit(['.', ']']).next().unwrap_or(key);
            assert_eq!(&line[u.column - 1..u.column - 1 + name.len()], name, "{u}");
            assert!(u.to_string().contains("unknown key"), "{u}");
        }
    }

    /// The design's example sets nearly every key: none is reported unknown.
    #[test]
    fn the_design_example_has_no_unknown_keys() {
        assert_eq!(unknown_keys(DESIGN_EXAMPLE), Vec::new());
        let text = DESIGN_EXAMPLE.replacen(
            "heartbeat_port = 7100",
            "heartbeat_port = 7100\nchannel_port = 7099",
            1,
        );
        assert_eq!(unknown_keys(&text), Vec::new());
    }

    /// The field names a struct's `Deserialize` asks for (serde passes them to
    /// `deserialize_struct`): the known-key lists are checked against them.
    fn fields_of<T: serde::de::DeserializeOwned>() -> Vec<&'static str> {
        use serde::de::{self, Visitor};
        struct Introspect(Vec<&'static str>);
        impl<'de> de::Deserializer<'de> for &mut Introspect {
            type Error = de::value::Error;
            fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
                Err(de::Error::custom("not a struct"))
            }
            fn deserialize_struct<V: Visitor<'de>>(
                self,
                _: &'static str,
                fields: &'static [&'static str],
                _: V,
            ) -> Result<V::Value, Self::Error> {
                self.0.extend(fields);
                Err(de::Error::custom("introspected"))
            }
            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
                bytes byte_buf option unit unit_struct newtype_struct seq tuple
                tuple_struct map enum identifier ignored_any
            }
        }
        let mut introspect = Introspect(Vec::new());
        let _ = T::deserialize(&mut introspect);
        let mut fields = introspect.0;
        fields.sort_unstable();
        fields
    }

    /// A key added to a `Raw*` struct but not to its list would be warned about
    /// as unknown while it works; one only in the list would be silently ignored.
    #[test]
    fn the_known_key_lists_are_the_raw_structs_fields() {
        let sorted = |keys: &[&'static str]| {
            let mut keys = keys.to_vec();
            keys.sort_unstable();
            keys
        };
        assert_eq!(sorted(CLUSTER_KEYS), fields_of::<RawCluster>());
        assert_eq!(sorted(NODE_KEYS), fields_of::<RawNode>());
        assert_eq!(sorted(MODULE_KEYS), fields_of::<RawModule>());
        // The top level is read section by section: its keys are the file's
        // table names.
        assert_eq!(sorted(TOP_KEYS), vec!["cluster", "module", "node", "web"]);
        // [web] refuses unknown keys outright (deny_unknown_fields).
        assert!(!fields_of::<Web>().is_empty());
    }

    #[test]
    fn the_channel_port_defaults_and_may_not_collide() {
        let config = Config::from_toml_str(DESIGN_EXAMPLE).unwrap();
        assert_eq!(config.cluster.channel_port, 7099);
        let e = err(&edit(
            "name = \"pair1\"",
            "name = \"pair1\"\nchannel_port = 7101",
        ));
        assert!(
            matches!(&e, ConfigError::DuplicatePort { port: 7101, .. }),
            "{e}"
        );
        let e = err(&edit(
            "name = \"pair1\"",
            "name = \"pair1\"\nchannel_port = 0",
        ));
        assert!(matches!(e, ConfigError::ZeroPort { .. }), "{e}");
    }

    #[test]
    fn module_without_replicated_is_named() {
        let e = err(&edit(
            "replicated = [\"/var/lib/libvirt/images/vm1\"]\n",
            "",
        ));
        assert!(
            matches!(&e, ConfigError::NoReplicated(m) if m == "vm1"),
            "{e}"
        );
        let e = err(&edit("[\"/var/lib/libvirt/images/vm1\"]", "[]"));
        assert!(
            matches!(&e, ConfigError::NoReplicated(m) if m == "vm1"),
            "{e}"
        );
    }

    #[test]
    fn replicated_paths_must_be_absolute_and_clean() {
        for bad in ["images/vm1", "/var/lib/../vm1", "vm1"] {
            let e = err(&edit("/var/lib/libvirt/images/vm1", bad));
            assert!(
                matches!(&e, ConfigError::RelativeReplicated { module, .. } if module == "vm1"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn replicated_paths_may_not_overlap() {
        for other in [
            "/var/lib/libvirt/images/vm1",
            "/var/lib/libvirt/images/vm1/",
            "/var/lib/libvirt/images",
            "/var/lib/libvirt/images/vm1/disks",
        ] {
            let e = err(&with_module(&format!(
                "name = \"vm2\"\nreplicated = [\"{other}\"]\nport = 7102"
            )));
            assert!(
                matches!(&e, ConfigError::OverlappingReplicated { module, other_module, .. }
                    if module == "vm2" && other_module == "vm1"),
                "{other}: {e}"
            );
        }
        // A sibling with a common name prefix is fine.
        Config::from_toml_str(&with_module(
            "name = \"vm2\"\nreplicated = [\"/var/lib/libvirt/images/vm10\"]\nport = 7102",
        ))
        .unwrap();
        // Within one module too.
        let e = err(&edit(
            "[\"/var/lib/libvirt/images/vm1\"]",
            "[\"/srv/a\", \"/srv/a/b\"]",
        ));
        assert!(
            matches!(e, ConfigError::OverlappingReplicated { .. }),
            "{e}"
        );
    }

    #[test]
    fn duplicate_module_names() {
        let e = err(&with_module(
            "name = \"vm1\"\nreplicated = [\"/srv/vm2\"]\nport = 7102\ndomain = \"x\"",
        ));
        assert!(
            matches!(&e, ConfigError::DuplicateModule(m) if m == "vm1"),
            "{e}"
        );
    }

    #[test]
    fn bad_module_names() {
        for bad in ["", ".hidden", "a/b", "vm 1"] {
            let e = err(&edit("name = \"vm1\"", &format!("name = \"{bad}\"")));
            assert!(matches!(e, ConfigError::BadModuleName(_)), "{bad}: {e}");
        }
    }

    #[test]
    fn duplicate_ports() {
        let e = err(&with_module(
            "name = \"vm2\"\nreplicated = [\"/srv/vm2\"]\nport = 7101",
        ));
        assert!(
            matches!(&e, ConfigError::DuplicatePort { port: 7101, second, .. } if second.contains("vm2")),
            "{e}"
        );
        let e = err(&edit("port = 7101", "port = 7100"));
        assert!(
            matches!(&e, ConfigError::DuplicatePort { port: 7100, first, .. } if first.contains("heartbeat_port")),
            "{e}"
        );
        assert!(e.to_string().contains("vm1"), "{e}");
        let e = err(&edit("port = 7101", "port = 0"));
        assert!(matches!(e, ConfigError::ZeroPort { .. }), "{e}");
        // A module with N directories uses port .. port + N - 1: ranges may not overlap.
        let three = MINIMAL.replacen(
            "replicated = [\"/var/lib/libvirt/images/vm1\"]",
            "replicated = [\"/srv/vm1a\", \"/srv/vm1b\", \"/srv/vm1c\"]",
            1,
        );
        let e = err(&format!(
            "{three}\n[[module]]\nname = \"vm2\"\nreplicated = [\"/srv/vm2\"]\nport = 7103\n"
        ));
        assert!(
            matches!(&e, ConfigError::DuplicatePort { port: 7103, first, second } if first.contains("vm1") && first.contains("directory 3") && second.contains("vm2")),
            "{e}"
        );
        let e = err(&with_module(
            "name = \"vm2\"\nreplicated = [\"/srv/vm2a\", \"/srv/vm2b\"]\nport = 65535",
        ));
        assert!(matches!(e, ConfigError::PortRange { dirs: 2, .. }), "{e}");
        Config::from_toml_str(&with_module(
            "name = \"vm2\"\nreplicated = [\"/srv/vm2a\", \"/srv/vm2b\"]\nport = 7102",
        ))
        .unwrap();
        let e = err(&edit("port = 7101\n", ""));
        assert!(matches!(&e, ConfigError::NoPort(m) if m == "vm1"), "{e}");
    }

    #[test]
    fn duplicate_domains() {
        let e = err(&with_module(
            "name = \"vm2\"\ndomain = \"vm1\"\nreplicated = [\"/srv/vm2\"]\nport = 7102",
        ));
        assert!(matches!(e, ConfigError::DuplicateDomain { .. }), "{e}");
    }

    #[test]
    fn local_node_must_exist() {
        let config = Config::from_toml_str(MINIMAL).unwrap();
        assert_eq!(config.local_node("node1").unwrap(), NodeIndex::FIRST);
        let e = config.local_node("node3").unwrap_err();
        assert!(matches!(e, ConfigError::UnknownLocalNode { .. }));
        assert!(e.to_string().contains("node3") && e.to_string().contains("node1, node2"));
    }

    #[test]
    fn exactly_two_nodes() {
        let one = edit(
            "[[node]]\nname = \"node2\"\naddresses = [\"10.0.0.2\", \"10.1.0.2\"]\n",
            "",
        );
        assert!(matches!(err(&one), ConfigError::NodeCount(1)));
        let three = edit(
            "[[module]]",
            "[[node]]\nname = \"node3\"\naddresses = [\"10.0.0.3\", \"10.1.0.3\"]\n\n[[module]]",
        );
        assert!(matches!(err(&three), ConfigError::NodeCount(3)));
        let same = edit("name = \"node2\"", "name = \"node1\"");
        assert!(matches!(err(&same), ConfigError::DuplicateNode(_)));
    }

    #[test]
    fn node_addresses() {
        let e = err(&edit("[\"10.0.0.2\", \"10.1.0.2\"]", "[\"10.0.0.2\"]"));
        assert!(
            matches!(
                &e,
                ConfigError::AddressCountMismatch {
                    first_count: 2,
                    second_count: 1,
                    ..
                }
            ),
            "{e}"
        );
        let e = err(&edit("\"10.1.0.2\"", "\"node2.invalid\""));
        assert!(
            matches!(&e, ConfigError::BadAddress { node, address } if node == "node2" && address == "node2.invalid"),
            "{e}"
        );
        let e = err(&edit("[\"10.0.0.2\", \"10.1.0.2\"]", "[]"));
        assert!(
            matches!(&e, ConfigError::NoAddresses(n) if n == "node2"),
            "{e}"
        );
        // IPv6 is an IP too.
        Config::from_toml_str(&edit("\"10.1.0.2\"", "\"fd00::2\"")).unwrap();
    }

    #[test]
    fn replication_network_range_and_default() {
        let e = err(&edit("port = 7101", "port = 7101\nreplication_network = 2"));
        assert!(
            matches!(&e, ConfigError::ReplicationNetwork { module, index: 2, networks: 2 } if module == "vm1"),
            "{e}"
        );
        let first =
            Config::from_toml_str(&edit("port = 7101", "port = 7101\nreplication_network = 0"))
                .unwrap();
        assert_eq!(first.modules[0].replication_network, 0);
        let default = Config::from_toml_str(MINIMAL).unwrap();
        assert_eq!(default.modules[0].replication_network, 1);
    }

    #[test]
    fn default_primary_and_prefer_name_known_nodes() {
        let e = err(&edit(
            "default_primary = \"node1\"",
            "default_primary = \"node9\"",
        ));
        assert!(
            matches!(&e, ConfigError::UnknownDefaultPrimary { module, node } if module == "vm1" && node == "node9"),
            "{e}"
        );
        let e = err(&edit(
            "name = \"pair1\"",
            "name = \"pair1\"\nsplit_brain = \"prefer:node9\"",
        ));
        assert!(
            matches!(&e, ConfigError::UnknownPreferredNode(n) if n == "node9"),
            "{e}"
        );
        let ok = Config::from_toml_str(&edit(
            "name = \"pair1\"",
            "name = \"pair1\"\nsplit_brain = \"prefer:node2\"",
        ))
        .unwrap();
        assert_eq!(
            ok.cluster.split_brain,
            SplitBrainPolicy::Prefer(NodeIndex::SECOND)
        );
    }

    #[test]
    fn split_brain_forms() {
        let manual = Config::from_toml_str(&edit(
            "name = \"pair1\"",
            "name = \"pair1\"\nsplit_brain = \"manual\"",
        ))
        .unwrap();
        assert_eq!(manual.cluster.split_brain, SplitBrainPolicy::Manual);
        for bad in ["least-changes", "prefer", "Manual", ""] {
            let e = err(&edit(
                "name = \"pair1\"",
                &format!("name = \"pair1\"\nsplit_brain = \"{bad}\""),
            ));
            assert!(matches!(e, ConfigError::BadSplitBrain(_)), "{bad}: {e}");
        }
    }

    #[test]
    fn lock_timeout_must_exceed_failover_plus_interval() {
        // The defaults: failover 1500 + heartbeat 200.
        let e = err(&edit("port = 7101", "port = 7101\nlock_timeout_ms = 1700"));
        assert!(
            matches!(&e, ConfigError::LockTimeout { module, lock_timeout_ms: 1700, minimum: 1700 } if module == "vm1"),
            "{e}"
        );
        Config::from_toml_str(&edit("port = 7101", "port = 7101\nlock_timeout_ms = 1701")).unwrap();
    }

    #[test]
    fn resync_streams_bounds() {
        let c =
            Config::from_toml_str(&edit("port = 7101", "port = 7101\nresync_streams = 8")).unwrap();
        assert_eq!(c.modules[0].resync_streams, 8);
        let e = err(&edit("port = 7101", "port = 7101\nresync_streams = 65"));
        assert!(
            matches!(&e, ConfigError::ResyncStreams { module, resync_streams: 65, .. } if module == "vm1"),
            "{e}"
        );
    }

    #[test]
    fn heartbeat_interval_bounds() {
        for interval in ["0", "3000", "4000"] {
            let e = err(&edit(
                "name = \"pair1\"",
                &format!("name = \"pair1\"\nheartbeat_interval_ms = {interval}"),
            ));
            assert!(
                matches!(e, ConfigError::HeartbeatInterval { .. }),
                "{interval}: {e}"
            );
        }
    }

    #[test]
    fn too_many_modules() {
        let mut text = MINIMAL.to_string();
        for i in 2..=33 {
            text.push_str(&format!(
                "\n[[module]]\nname = \"vm{i}\"\nreplicated = [\"/srv/vm{i}\"]\nport = {}\n",
                7200 + i
            ));
        }
        assert!(matches!(
            err(&text),
            ConfigError::TooManyModules { count: 33 }
        ));
        // 32 is fine.
        let cut = text.rfind("\n[[module]]").unwrap();
        assert_eq!(
            Config::from_toml_str(&text[..cut]).unwrap().modules.len(),
            32
        );
    }

    #[test]
    fn maxloop_and_loop_interval_must_be_positive() {
        let e = err(&edit("port = 7101", "port = 7101\nmaxloop = 0"));
        assert!(
            matches!(&e, ConfigError::ZeroMaxloop(m) if m == "vm1"),
            "{e}"
        );
        let e = err(&edit("port = 7101", "port = 7101\nloop_interval_s = 0"));
        assert!(
            matches!(&e, ConfigError::ZeroLoopInterval(m) if m == "vm1"),
            "{e}"
        );
    }

    #[test]
    fn state_dir_must_be_absolute_and_outside_replicated_dirs() {
        let e = err(&edit(
            "name = \"pair1\"",
            "name = \"pair1\"\nstate_dir = \"var/lib/vmha\"",
        ));
        assert!(matches!(&e, ConfigError::RelativeStateDir(_)), "{e}");
        assert!(e.to_string().contains("state_dir"), "{e}");
        for inside in [
            "/var/lib/libvirt/images/vm1",
            "/var/lib/libvirt/images/vm1/.vmha",
        ] {
            let e = err(&edit(
                "name = \"pair1\"",
                &format!("name = \"pair1\"\nstate_dir = \"{inside}\""),
            ));
            assert!(
                matches!(&e, ConfigError::StateDirReplicated { module, .. } if module == "vm1"),
                "{inside}: {e}"
            );
            assert!(e.to_string().contains("state_dir"), "{e}");
        }
        // Next to it (a common name prefix) is fine.
        Config::from_toml_str(&edit(
            "name = \"pair1\"",
            "name = \"pair1\"\nstate_dir = \"/var/lib/libvirt/images/vm1-state\"",
        ))
        .unwrap();
    }

    #[test]
    fn control_socket_must_not_be_in_a_world_writable_directory() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let with_socket = |socket: &Path| {
            edit(
                "name = \"pair1\"",
                &format!(
                    "name = \"pair1\"\ncontrol_socket = \"{}\"",
                    socket.display()
                ),
            )
        };
        let socket = dir.path().join("vmhad.sock");
        Config::from_toml_str(&with_socket(&socket)).unwrap();
        for mode in [0o777, 0o1777, 0o733] {
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode)).unwrap();
            let e = err(&with_socket(&socket));
            assert!(
                matches!(&e, ConfigError::ControlSocketDir { .. }),
                "{mode:o}: {e}"
            );
            assert!(e.to_string().contains("control_socket"), "{e}");
        }
        let e = err(&with_socket(Path::new("run/vmhad.sock")));
        assert!(matches!(&e, ConfigError::RelativeControlSocket(_)), "{e}");
        assert!(e.to_string().contains("control_socket"), "{e}");
    }

    #[test]
    fn the_same_address_on_both_nodes_is_refused() {
        let e = err(&edit("\"10.1.0.2\"", "\"10.1.0.1\""));
        assert!(
            matches!(&e, ConfigError::SameAddress { address, .. } if address.to_string() == "10.1.0.1"),
            "{e}"
        );
        assert!(e.to_string().contains("10.1.0.1"), "{e}");
    }

    #[test]
    fn timeouts_have_bounds_named_by_their_keys() {
        let e = err(&edit("port = 7101", "port = 7101\nstop_timeout_s = 86401"));
        assert!(
            matches!(&e, ConfigError::StopTimeout { module, stop_timeout_s: 86401 } if module == "vm1"),
            "{e}"
        );
        assert!(e.to_string().contains("stop_timeout_s"), "{e}");
        Config::from_toml_str(&edit("port = 7101", "port = 7101\nstop_timeout_s = 86400")).unwrap();

        let e = err(&edit("port = 7101", "port = 7101\nlock_timeout_ms = 0"));
        assert!(
            matches!(&e, ConfigError::ZeroLockTimeout(m) if m == "vm1"),
            "{e}"
        );
        assert!(e.to_string().contains("lock_timeout_ms"), "{e}");

        for huge in [MAX_FAILOVER_TIMEOUT_MS + 1, u64::MAX / 2, i64::MAX as u64] {
            let e = err(&edit(
                "name = \"pair1\"",
                &format!("name = \"pair1\"\nfailover_timeout_ms = {huge}"),
            ));
            assert!(
                matches!(&e, ConfigError::FailoverTimeout { failover_timeout_ms } if *failover_timeout_ms == huge),
                "{huge}: {e}"
            );
            assert!(e.to_string().contains("failover_timeout_ms"), "{e}");
        }
        // Large but allowed: lock_timeout_ms is then the key to raise.
        let e = err(&edit(
            "name = \"pair1\"",
            &format!("name = \"pair1\"\nfailover_timeout_ms = {MAX_FAILOVER_TIMEOUT_MS}"),
        ));
        assert!(matches!(e, ConfigError::LockTimeout { .. }), "{e}");
    }

    #[test]
    fn host_names_where_addresses_go() {
        // `localhost` is in every /etc/hosts.
        let config = Config::from_toml_str(&edit("\"10.1.0.2\"", "\"localhost\"")).unwrap();
        assert!(config.nodes[1].addresses[1].is_loopback());
        let config = Config::from_toml_str(&edit(
            "name = \"pair1\"",
            "name = \"pair1\"\nwitness = [\"localhost\", \"localhost:22\"]",
        ))
        .unwrap();
        assert!(
            matches!(config.cluster.witness[0], Witness::Icmp(ip) if ip.is_loopback()),
            "{:?}",
            config.cluster.witness
        );
        assert!(
            matches!(config.cluster.witness[1], Witness::Tcp(s) if s.ip().is_loopback() && s.port() == 22),
            "{:?}",
            config.cluster.witness
        );
        let e = err(&edit("\"10.1.0.2\"", "\"no-such-host.invalid\""));
        assert!(
            e.to_string().contains("nor a host name that resolves"),
            "{e}"
        );
    }

    #[test]
    fn witnesses() {
        let config = Config::from_toml_str(&edit(
            "name = \"pair1\"",
            "name = \"pair1\"\nwitness = [\"10.0.0.254\", \"10.0.0.253:22\"]",
        ))
        .unwrap();
        assert_eq!(
            config.cluster.witness,
            vec![
                Witness::Icmp("10.0.0.254".parse().unwrap()),
                Witness::Tcp("10.0.0.253:22".parse().unwrap())
            ]
        );
        let e = err(&edit(
            "name = \"pair1\"",
            "name = \"pair1\"\nwitness = [\"router.invalid\"]",
        ));
        assert!(
            matches!(&e, ConfigError::BadWitness(w) if w == "router.invalid"),
            "{e}"
        );
    }
}

#[cfg(test)]
mod check_tests {
    use super::*;

    const SEVERAL: &str = r#"[cluster]
name = "pair1"
heartbeat_prot = 7100
witness = ["router"]

[[node]]
name = "node1"
addresses = ["10.0.0.1"]

[[node]]
name = "node2"
addresses = ["10.0.0.2"]

[[module]]
name = "vm1"
replicated = ["/srv/vm1"]
port = 7101
default_primary = "node9"

[[module]]
name = "vm2"
replicated = ["/srv/vm2"]
port = 7101
maxloop = "three"
rate_limit = 3
"#;

    #[test]
    fn every_problem_is_reported_with_its_key_and_position() {
        let problems = check_text(SEVERAL).unwrap_err();
        let rendered: Vec<String> = problems
            .iter()
            .map(|p| p.render("vmha.toml", SEVERAL))
            .collect();
        let text = rendered.join("\n");
        // Unknown keys are warnings with their position, not problems.
        let unknown: Vec<String> = unknown_keys(SEVERAL)
            .iter()
            .map(|u| u.to_string())
            .collect();
        assert_eq!(unknown.len(), 2, "{unknown:?}");
        assert!(
            unknown[0].starts_with("3:1: unknown key `cluster.heartbeat_prot`"),
            "{unknown:?}"
        );
        assert!(
            unknown[1].starts_with("25:1: unknown key `module[1].rate_limit`"),
            "{unknown:?}"
        );
        assert!(
            rendered
                .iter()
                .any(|l| l.starts_with("vmha.toml:24:11: module[1].maxloop: ")
                    && l.contains("invalid type")),
            "{text}"
        );
        // The syntax is fine but the sections are not: semantic checks wait
        // for them. Fix them and the semantic problems all show, located.
        let fixed = SEVERAL
            .replace("heartbeat_prot", "heartbeat_port")
            .replace("maxloop = \"three\"", "maxloop = 3")
            .replace("rate_limit = 3", "rate_limit_mb_s = 3");
        let problems = check_text(&fixed).unwrap_err();
        let rendered: Vec<String> = problems
            .iter()
            .map(|p| p.render("vmha.toml", &fixed))
            .collect();
        let text = rendered.join("\n");
        for (position, key, words) in [
            ("vmha.toml:4:12", "cluster.witness[0]", "router"),
            ("vmha.toml:18:19", "module[0].default_primary", "node9"),
            (
                "vmha.toml:23:8",
                "module[1].port",
                "port 7101 is used by both",
            ),
        ] {
            assert!(
                rendered
                    .iter()
                    .any(|l| l.starts_with(&format!("{position}: {key}: ")) && l.contains(words)),
                "{position} {key}:\n{text}"
            );
        }
        assert_eq!(problems.len(), 3, "{text}");
    }

    #[test]
    fn syntax_errors_are_all_reported() {
        let text = "[cluster]\nname = \"pair1\nport = = 3\n[[node]]\nname = 1 2\n";
        let problems = check_text(text).unwrap_err();
        assert!(problems.len() >= 2, "{problems:?}");
        assert!(problems.iter().all(|p| p.line_column(text).is_some()));
    }
}
