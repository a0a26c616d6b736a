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
//! - **Live flip** (issue 14, the live swap's switch-over): the old PRIM,
//!   drained (every write of its generation G is on its peer), persists the
//!   *flip* of G, a child whose id is derived from G ([`GenerationId::flip_of`]),
//!   before its receiver starts accepting only that id; the new writer adopts
//!   it ([`History::adopt_flip`]) before it claims it. So a writer only ever
//!   writes under a flip generation when both nodes know it, and a flip
//!   generation that only one node knows was never written under: [`compare`]
//!   counts such a current generation as its parent (the one rule that makes a
//!   crash between the two persists neither a false split brain nor a resync).
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

    /// The generation a live swap's flip starts from `parent`: derived, not
    /// random, so that either node recognises it as "`parent`, flipped" from
    /// the ids alone (no new field in the history file nor the heartbeats).
    pub fn flip_of(parent: GenerationId) -> GenerationId {
        let key = blake3::derive_key("vmha generation: live swap flip", &parent.0.to_be_bytes());
        let mut id = [0u8; 16];
        id.copy_from_slice(&key[..16]);
        GenerationId(u128::from_be_bytes(id))
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

    /// Live swap, the old PRIM after its drain: starts the flip of the
    /// current generation (`None` without one).
    pub fn start_flip(&mut self) -> Option<GenerationId> {
        let id = GenerationId::flip_of(self.current?);
        self.push(id);
        Some(id)
    }

    /// Live swap, the new writer before it claims: takes the peer's flip of
    /// our current generation when `peer` shows exactly that (true then).
    /// Anything else changes nothing (an older peer keeps the generation).
    pub fn adopt_flip(&mut self, peer: &History) -> bool {
        if !flip_ahead(self, peer) {
            return false;
        }
        self.start_flip().is_some()
    }

    /// The current generation is the flip of the one before it.
    pub fn current_is_flip(&self) -> bool {
        match (self.current, self.previous.first()) {
            (Some(current), Some(parent)) => current == GenerationId::flip_of(*parent),
            _ => false,
        }
    }

    fn contains(&self, id: GenerationId) -> bool {
        self.current == Some(id) || self.previous.contains(&id)
    }

    /// This history as [`compare`] judges it against `other`: a current flip
    /// generation that `other` does not know stands for its parent (nothing
    /// was written under it, see the module docs).
    fn as_seen_by(&self, other: &History) -> std::borrow::Cow<'_, History> {
        match self.current {
            Some(current) if self.current_is_flip() && !other.contains(current) => {
                std::borrow::Cow::Owned(History {
                    current: self.previous.first().copied(),
                    previous: self.previous[1..].to_vec(),
                })
            }
            _ => std::borrow::Cow::Borrowed(self),
        }
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

/// Decides who is up to date from the two histories alone. A current flip
/// generation only one side knows counts as its parent (module docs): the
/// old PRIM that persisted it and crashed before its peer adopted it holds
/// the same data as its peer, in sync, not a branch of its own.
pub fn compare(local: &History, peer: &History) -> Relation {
    compare_exact(&local.as_seen_by(peer), &peer.as_seen_by(local))
}

/// `peer` is `local` plus exactly the flip of `local`'s current generation:
/// the old PRIM of a live swap whose flip the new writer adopts.
pub fn flip_ahead(local: &History, peer: &History) -> bool {
    match (local.current, peer.current) {
        (Some(l), Some(p)) => p == GenerationId::flip_of(l) && peer.previous.first() == Some(&l),
        _ => false,
    }
}

/// The generation a receiver on the `local` node accepts from a writer on the
/// peer: the peer's current one, or our own when it is the flip of the peer's
/// (the old PRIM of a live swap: the new writer adopts it before it claims).
pub fn receiver_accepts(local: &History, peer: &History) -> Option<GenerationId> {
    if flip_ahead(peer, local) {
        local.current
    } else {
        peer.current
    }
}

/// Whether a receiver on the node whose history is `local`, accepting
/// `accepted`, holds that node's current data: `accepted` is its current
/// generation, or its current generation is the live flip of `accepted`
/// (a live swap's destination adopted the flip, under which nothing was
/// written yet, and its vmhad died before the receiver stopped for the
/// standby's activation).
pub fn receiver_holds_current(local: &History, accepted: GenerationId) -> bool {
    local.current == Some(accepted)
        || (local.current_is_flip() && local.previous.first() == Some(&accepted))
}

fn compare_exact(local: &History, peer: &History) -> Relation {
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

    /// The live swap's flip, persisted by the old PRIM first, adopted by the
    /// new writer second: every state in between (either node crashing
    /// between the two persists) is judged without a split brain or a resync.
    #[test]
    fn a_live_flip_is_judged_right_at_every_point() {
        let g = GenerationId(7);
        let flip = GenerationId::flip_of(g);
        assert_ne!(flip, g);
        assert_eq!(flip, GenerationId::flip_of(GenerationId(7)), "derived");
        assert_ne!(flip, GenerationId::flip_of(GenerationId(8)));
        let base = history(&[7, 3]);
        // The old PRIM after its drain.
        let mut old = base.clone();
        assert_eq!(old.start_flip(), Some(flip));
        assert!(old.current_is_flip() && !base.current_is_flip());
        assert_eq!(old.previous()[..2], [g, GenerationId(3)]);
        // Only the old PRIM knows the flip: same data, in sync both ways,
        // and its receiver accepts the flip (the peer adopts it first).
        assert_eq!(compare(&old, &base), Relation::InSync);
        assert_eq!(compare(&base, &old), Relation::InSync);
        assert!(flip_ahead(&base, &old) && !flip_ahead(&old, &base));
        assert_eq!(receiver_accepts(&old, &base), Some(flip));
        assert_eq!(receiver_accepts(&base, &old), Some(flip));
        // The new writer adopts it: the very same generation, no resync.
        let mut new = base.clone();
        assert!(new.adopt_flip(&old));
        assert_eq!(new.current(), Some(flip));
        assert_eq!(compare(&new, &old), Relation::InSync);
        assert!(!new.adopt_flip(&old), "adopted once");
        // An older peer that kept the generation: nothing to adopt.
        let mut same = base.clone();
        assert!(!same.adopt_flip(&base));
        assert_eq!(same, base);
        // The old PRIM died before the adoption; the peer failed over: the
        // peer is newer, not a split brain (nothing was written under the
        // flip), and an incremental resync (a common ancestor).
        let mut failed_over = base.clone();
        failed_over.push(GenerationId(9));
        assert_eq!(compare(&old, &failed_over), Relation::PeerNewer);
        assert_eq!(compare(&failed_over, &old), Relation::LocalNewer);
        assert!(!needs_full_resync(&old, &failed_over));
        assert_eq!(receiver_accepts(&old, &failed_over), Some(GenerationId(9)));
        // The new writer died after the adoption (or after writing under
        // the flip, replicated): the old PRIM fails over from the flip.
        let mut took_over = old.clone();
        took_over.push(GenerationId(10));
        assert_eq!(compare(&took_over, &new), Relation::LocalNewer);
        assert_eq!(compare(&new, &took_over), Relation::PeerNewer);
        // The adopted flip activated alone (connected start failed): a new
        // generation on top, the old PRIM resyncs incrementally.
        let mut alone = new.clone();
        alone.push(GenerationId(11));
        assert_eq!(compare(&old, &alone), Relation::PeerNewer);
        // Both wrote after all (the flip's node forced later): a real split.
        let mut forced = old.clone();
        forced.push(GenerationId(12));
        assert_eq!(compare(&forced, &failed_over), Relation::SplitBrain);
        // A plain (random) child is no flip: still newer, as before.
        let mut child = base.clone();
        child.push(GenerationId(13));
        assert_eq!(compare(&base, &child), Relation::PeerNewer);
        assert!(!flip_ahead(&base, &child));
        assert_eq!(receiver_accepts(&child, &base), Some(g));
        // A receiver accepting the flip's parent on the node that adopted
        // the flip holds its current data (nothing was written under the
        // flip); on the node that merely has the parent, it is the parent.
        assert!(receiver_holds_current(&new, g));
        assert!(receiver_holds_current(&new, flip));
        assert!(receiver_holds_current(&base, g));
        assert!(!receiver_holds_current(&base, flip));
        assert!(!receiver_holds_current(&new, GenerationId(3)));
        // A plain child is no flip: a receiver at its parent is behind.
        assert!(!receiver_holds_current(&child, g));
        assert!(!receiver_holds_current(&History::empty(), g));
        // Two fresh nodes still know nothing.
        assert!(!History::empty().adopt_flip(&old));
        assert_eq!(History::empty().start_flip(), None);
    }

    proptest! {
        /// A flip only one node knows never changes the verdict: the node
        /// that persisted it judges (and is judged) as from its parent.
        #[test]
        fn an_unshared_flip_counts_as_its_parent(
            ids in lineage(40),
            common in 1usize..10,
            left in 0usize..10,
            right in 0usize..10,
        ) {
            let mut a = ids[..common].to_vec();
            a.extend_from_slice(&ids[10..10 + left]);
            let mut b = ids[..common].to_vec();
            b.extend_from_slice(&ids[20..20 + right]);
            let (a, b) = (through(&a), through(&b));
            let mut flipped = a.clone();
            flipped.start_flip();
            prop_assert_eq!(compare(&flipped, &b), compare(&a, &b));
            prop_assert_eq!(compare(&b, &flipped), compare(&b, &a));
            prop_assert_eq!(compare(&flipped, &b), compare(&b, &flipped).mirrored());
        }

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
