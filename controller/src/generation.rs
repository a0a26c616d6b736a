//! Who is up to date (design, "Generations"): each node persists, per module,
//! the generation of its data and the generations before it, plus the flag
//! "the peer may be newer than me". Comparing two histories decides the
//! direction of a resync, or detects a split brain.
//!
//! Choices where the design is silent:
//! - A generation id is a random 128-bit number, shown as 32 hex digits.
//! - A node that never held data has an empty history (no current generation):
//!   it is behind any peer that has one, and two empty nodes are
//!   [`Relation::Unrelated`] — nobody is known up to date, which is why the very
//!   first start is `vmctl prim`.
//! - The history keeps the last [`HISTORY_LEN`] generations before the current
//!   one. A peer whose current generation has fallen out of the window is
//!   indistinguishable from an unrelated one: treated as such (full compare,
//!   split-brain rules), never as in sync.
//! - The file is `<state_dir>/<module>/generation.json`, mode 0600, written
//!   with write + fsync + rename + fsync(dir). A missing file means a fresh
//!   node; a corrupt one is an error (never silently "fresh").

use std::fmt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Generations remembered before the current one.
pub const HISTORY_LEN: usize = 16;

const FILE_NAME: &str = "generation.json";

/// Errors reading or writing a module's generation file.
#[derive(Debug, thiserror::Error)]
pub enum GenerationError {
    #[error("cannot access generation file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("generation file {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// One data generation: begun whenever a node starts writing without its peer.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GenerationId(pub u128);

impl GenerationId {
    pub fn random() -> GenerationId {
        GenerationId(rand::random())
    }
}

impl fmt::Display for GenerationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for GenerationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Gen({self})")
    }
}

impl Serialize for GenerationId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for GenerationId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text.len() != 32 {
            return Err(serde::de::Error::custom("expected 32 hex digits"));
        }
        u128::from_str_radix(&text, 16)
            .map(GenerationId)
            .map_err(serde::de::Error::custom)
    }
}

/// The same id as vmha-fs takes it (`--generation`, `STATEDIR/generation`).
impl From<GenerationId> for vmha_fs::status::GenerationId {
    fn from(id: GenerationId) -> Self {
        id.0.into()
    }
}

/// A node's generations for one module: the current one and its predecessors,
/// newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct History {
    current: Option<GenerationId>,
    #[serde(default)]
    previous: Vec<GenerationId>,
}

impl History {
    /// The history of a node that never held data.
    pub fn empty() -> History {
        History::default()
    }

    pub fn current(&self) -> Option<GenerationId> {
        self.current
    }

    /// Predecessors of the current generation, newest first.
    pub fn previous(&self) -> &[GenerationId] {
        &self.previous
    }

    /// Starts a new random generation descending from the current one.
    pub fn start_new(&mut self) -> GenerationId {
        let id = GenerationId::random();
        self.push(id);
        id
    }

    /// Makes `id` the current generation (the old one becomes history).
    pub fn push(&mut self, id: GenerationId) {
        if let Some(old) = self.current.replace(id) {
            self.previous.insert(0, old);
            self.previous.truncate(HISTORY_LEN);
        }
    }

    /// After a completed resync the target holds exactly the source's data.
    pub fn adopt(&mut self, source: &History) {
        *self = source.clone();
    }

    fn contains(&self, id: GenerationId) -> bool {
        self.current == Some(id) || self.previous.contains(&id)
    }

    /// The newest generation both histories know, if any.
    pub fn common_ancestor(&self, other: &History) -> Option<GenerationId> {
        self.current
            .iter()
            .chain(&self.previous)
            .copied()
            .find(|id| other.contains(*id))
    }
}

/// How two nodes' data relate (from the local node's point of view).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Relation {
    /// Same generation: same data once in-flight operations are applied.
    InSync,
    /// The peer's data is an ancestor of ours: we sync to it.
    LocalNewer,
    /// Ours is an ancestor of the peer's: it syncs to us.
    PeerNewer,
    /// Both wrote after a common ancestor.
    SplitBrain,
    /// No common generation known (never joined, or histories too far apart).
    Unrelated,
}

impl Relation {
    /// The same relation seen from the peer.
    pub fn mirrored(self) -> Relation {
        match self {
            Relation::LocalNewer => Relation::PeerNewer,
            Relation::PeerNewer => Relation::LocalNewer,
            other => other,
        }
    }
}

/// Decides who is up to date from the two histories alone.
pub fn compare(local: &History, peer: &History) -> Relation {
    match (local.current, peer.current) {
        (None, None) => Relation::Unrelated,
        (None, Some(_)) => Relation::PeerNewer,
        (Some(_), None) => Relation::LocalNewer,
        (Some(l), Some(p)) if l == p => Relation::InSync,
        (Some(l), Some(p)) => {
            if peer.previous.contains(&l) {
                Relation::PeerNewer
            } else if local.previous.contains(&p) {
                Relation::LocalNewer
            } else if local.common_ancestor(peer).is_some() {
                Relation::SplitBrain
            } else {
                Relation::Unrelated
            }
        }
    }
}

/// Whether a resync between these histories must compare everything: nothing
/// is known about what differs without a common generation.
pub fn needs_full_resync(local: &History, peer: &History) -> bool {
    local.common_ancestor(peer).is_none()
}

/// What a node persists per module.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub history: History,
    /// Set when the peer may have written without us (design, "Generations"):
    /// a node that boots alone with this flag waits instead of starting.
    pub peer_may_be_newer: bool,
    /// This node's own copy is not up to date: its disk failed under vmha-fs.
    /// Such a node is never promoted automatically and rejoins with a full
    /// compare; cleared once that resync completes. Written only when set, so
    /// files stay readable by older daemons otherwise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub self_outdated: bool,
    /// The module is in maintenance on this node (`vmctl maintenance on`):
    /// kept across daemon restarts until `vmctl maintenance off`. Written only
    /// when set.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub maintenance: bool,
}

impl Metadata {
    /// Reads `<state_dir>/<module>/generation.json`; a fresh node if absent.
    pub fn load(state_dir: &Path, module: &str) -> Result<Metadata, GenerationError> {
        let path = state_dir.join(module).join(FILE_NAME);
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Metadata::default()),
            Err(source) => return Err(GenerationError::Io { path, source }),
        };
        let mut metadata: Metadata = serde_json::from_slice(&text)
            .map_err(|source| GenerationError::Corrupt { path, source })?;
        metadata.history.previous.truncate(HISTORY_LEN);
        Ok(metadata)
    }

    /// Writes atomically: after a crash the file is either the old or the new one.
    pub fn save(&self, state_dir: &Path, module: &str) -> Result<(), GenerationError> {
        let dir = state_dir.join(module);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| GenerationError::Io { path, source }
        };
        // Explicit modes: do not depend on the daemon's umask.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io(&dir))?;
        let path = dir.join(FILE_NAME);
        let json = serde_json::to_vec_pretty(self).map_err(|source| GenerationError::Corrupt {
            path: path.clone(),
            source,
        })?;
        vmha_fs::atomic::write(&path, &json).map_err(io(&path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn history(newest_first: &[u128]) -> History {
        let mut h = History::empty();
        for id in newest_first.iter().rev() {
            h.push(GenerationId(*id));
        }
        h
    }

    #[test]
    fn basic_relations() {
        let a = history(&[1]);
        let b = history(&[2, 1]);
        let c = history(&[3, 1]);
        assert_eq!(compare(&a, &a), Relation::InSync);
        assert_eq!(compare(&a, &b), Relation::PeerNewer);
        assert_eq!(compare(&b, &a), Relation::LocalNewer);
        assert_eq!(compare(&b, &c), Relation::SplitBrain);
        assert_eq!(compare(&b, &history(&[9])), Relation::Unrelated);
        assert_eq!(compare(&History::empty(), &a), Relation::PeerNewer);
        assert_eq!(compare(&a, &History::empty()), Relation::LocalNewer);
        assert_eq!(
            compare(&History::empty(), &History::empty()),
            Relation::Unrelated
        );
        assert!(!needs_full_resync(&b, &c));
        assert!(needs_full_resync(&History::empty(), &a));
        assert_eq!(b.common_ancestor(&c), Some(GenerationId(1)));
    }

    #[test]
    fn history_is_bounded_and_forgets_the_oldest() {
        let mut h = History::empty();
        for id in 0..100 {
            h.push(GenerationId(id));
        }
        assert_eq!(h.current(), Some(GenerationId(99)));
        assert_eq!(h.previous().len(), HISTORY_LEN);
        assert_eq!(h.previous()[0], GenerationId(98));
        // The peer that stayed at generation 50 is out of the window.
        assert_eq!(compare(&h, &history(&[50])), Relation::Unrelated);
        let id = h.start_new();
        assert_eq!(h.current(), Some(id));
        assert_eq!(h.previous()[0], GenerationId(99));
    }

    #[test]
    fn metadata_round_trips_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            Metadata::load(dir.path(), "vm1").unwrap(),
            Metadata::default()
        );
        let mut meta = Metadata::default();
        meta.history.start_new();
        meta.history.start_new();
        meta.peer_may_be_newer = true;
        meta.save(dir.path(), "vm1").unwrap();
        assert_eq!(Metadata::load(dir.path(), "vm1").unwrap(), meta);
        let file = dir.path().join("vm1").join(FILE_NAME);
        let mode = |p: &Path| {
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions())
                & 0o777
        };
        assert_eq!(mode(&file), 0o600);
        assert_eq!(mode(&dir.path().join("vm1")), 0o700);
        // Hex in JSON, readable by people.
        let text = std::fs::read_to_string(&file).unwrap();
        let current = meta.history.current().unwrap().to_string();
        assert_eq!(current.len(), 32);
        assert!(text.contains(&current), "{text}");
        // Overwriting leaves no temporary behind.
        meta.peer_may_be_newer = false;
        meta.save(dir.path(), "vm1").unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path().join("vm1"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(FILE_NAME)]);
        assert!(!Metadata::load(dir.path(), "vm1").unwrap().peer_may_be_newer);
    }

    #[test]
    fn corrupt_metadata_is_an_error_not_a_fresh_node() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("vm1")).unwrap();
        std::fs::write(dir.path().join("vm1").join(FILE_NAME), b"{\"history\":").unwrap();
        assert!(matches!(
            Metadata::load(dir.path(), "vm1"),
            Err(GenerationError::Corrupt { .. })
        ));
        std::fs::write(
            dir.path().join("vm1").join(FILE_NAME),
            br#"{"history":{"current":"12"},"peer_may_be_newer":false}"#,
        )
        .unwrap();
        assert!(matches!(
            Metadata::load(dir.path(), "vm1"),
            Err(GenerationError::Corrupt { .. })
        ));
    }

    /// A lineage of distinct ids, oldest first.
    fn lineage(len: usize) -> impl Strategy<Value = Vec<u128>> {
        proptest::collection::hash_set(any::<u128>(), len).prop_map(|s| s.into_iter().collect())
    }

    /// The history of a node whose data went through `ids` (oldest first).
    fn through(ids: &[u128]) -> History {
        let mut h = History::empty();
        for id in ids {
            h.push(GenerationId(*id));
        }
        h
    }

    proptest! {
        /// Two points on one line of descent are ordered correctly; too far
        /// apart, they are unrelated, never in sync.
        #[test]
        fn descending_histories_are_ordered(
            ids in lineage(40),
            i in 1usize..40,
            j in 1usize..40,
        ) {
            let local = through(&ids[..i]);
            let peer = through(&ids[..j]);
            let expected = if i == j {
                Relation::InSync
            } else if j > i && j - i <= HISTORY_LEN {
                Relation::PeerNewer
            } else if i > j && i - j <= HISTORY_LEN {
                Relation::LocalNewer
            } else {
                Relation::Unrelated
            };
            prop_assert_eq!(compare(&local, &peer), expected);
            prop_assert_eq!(compare(&peer, &local), expected.mirrored());
        }

        /// Two branches from a common ancestor are a split brain as long as the
        /// ancestor is remembered by both; otherwise unrelated.
        #[test]
        fn diverged_histories_are_split_brain(
            ids in lineage(60),
            common in 1usize..20,
            left in 1usize..20,
            right in 1usize..20,
        ) {
            let base = &ids[..common];
            let mut a = base.to_vec();
            a.extend_from_slice(&ids[20..20 + left]);
            let mut b = base.to_vec();
            b.extend_from_slice(&ids[40..40 + right]);
            let (a, b) = (through(&a), through(&b));
            let expected = if left <= HISTORY_LEN && right <= HISTORY_LEN {
                Relation::SplitBrain
            } else {
                Relation::Unrelated
            };
            prop_assert_eq!(compare(&a, &b), expected);
            prop_assert_eq!(compare(&b, &a), expected);
            prop_assert_eq!(needs_full_resync(&a, &b), expected == Relation::Unrelated);
        }

        /// Adopting the source's history after a resync makes them in sync.
        #[test]
        fn adopt_means_in_sync(ids in lineage(10), cut in 1usize..10) {
            let source = through(&ids);
            let mut target = through(&ids[..cut]);
            target.adopt(&source);
            prop_assert_eq!(compare(&target, &source), Relation::InSync);
        }
    }
}
