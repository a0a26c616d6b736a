//! Heartbeat format version 4: a small binary summary per round, the modules'
//! full announcements only when they change.
//!
//! Why: versions 2 and 3 carry every module's whole announcement (name,
//! hashes, generation history, 14 per-key configuration digests) as JSON in
//! every datagram. With 32 modules that is ≈ 25 KB, sent every 200 ms on every
//! network as ~17 IP fragments — losing any fragment loses the heartbeat of
//! every module — and both nodes serialise, authenticate and parse it five
//! times a second although nothing changed.
//!
//! A version-4 datagram carries one bincode-encoded [`Frame`] as its payload
//! (the header and MAC around it are those of every version):
//!
//! - [`Frame::Summary`], once per round and network: the node, session,
//!   round, configuration hash, software version and, per announced module, a
//!   64-bit id (of its name, [`module_id`]) and a 64-bit digest of its full
//!   [`ModuleBeat`] ([`beat_digest`]); the cluster key digests likewise as one
//!   digest. ≈ 20 bytes per module: 32 modules fit one unfragmented datagram
//!   (about 750 bytes, the test `a_summary_of_32_modules_fits_one_packet`).
//! - [`Frame::Beats`]: full [`ModuleBeat`]s, sent before the round's summary
//!   for the modules whose beat changed in the last [`FULL_REPEATS`] rounds
//!   and those the peer asked for; packed into datagrams of at most
//!   [`BEATS_BUDGET`] payload bytes (one module per datagram when a single
//!   beat is larger).
//!
//! The receiver ([`PeerBeats`]) keeps the last full beat of each of the
//! peer's modules with its digest. A summary resolves each module whose digest
//! matches a kept beat; a module it cannot resolve (the beat was lost, or the
//! receiver just started) is left out of that round — the module keeps its
//! previous view of the peer — and its id goes into the receiver's own next
//! summaries (`want`), so the peer sends it in full again: one round trip,
//! not a timeout. The cluster key digests travel the same way under the id
//! [`CONFIG_KEYS_ID`]. A new peer session (a restarted peer) drops everything
//! kept. Nothing here changes the freshness and replay rules (module docs of
//! [`super`]): every frame is a datagram of its own with its own counter.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{HeartbeatError, ModuleBeat, Payload, Rejection, MAX_DATAGRAM};
use crate::config::{Digest, KeyDigests};

/// A full beat is sent in the round it changed and this many rounds in all
/// (a lost datagram is usually made good by the next one, without a request).
pub const FULL_REPEATS: u8 = 3;
/// Payload bytes of a [`Frame::Beats`] datagram at most (with the 91 bytes of
/// header and MAC, and IPv6 + UDP headers, below a 1500-byte MTU).
pub const BEATS_BUDGET: usize = 1200;
/// The id under which the cluster key digests are asked for in `want`.
pub const CONFIG_KEYS_ID: u64 = 0;

/// One version-4 datagram's payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    Summary(Summary),
    Beats(Beats),
}

/// What every round says (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub node: String,
    pub session: u64,
    pub round: u64,
    pub config_hash: [u8; 32],
    pub software: Option<String>,
    /// Digest of the sender's cluster key digests.
    pub config_keys_digest: u64,
    /// The cluster key digests, in the rounds they changed or were asked for.
    pub config_keys: Option<KeyDigests>,
    /// (module id, beat digest) of every announced module.
    pub modules: Vec<(u64, u64)>,
    /// What the sender lacks of the receiver's: module ids, [`CONFIG_KEYS_ID`].
    pub want: Vec<u64>,
}

/// Full announcements (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Beats {
    pub node: String,
    pub session: u64,
    pub round: u64,
    pub beats: Vec<ModuleBeat>,
}

impl Frame {
    fn node(&self) -> &str {
        match self {
            Frame::Summary(s) => &s.node,
            Frame::Beats(b) => &b.node,
        }
    }

    fn session(&self) -> u64 {
        match self {
            Frame::Summary(s) => s.session,
            Frame::Beats(b) => b.session,
        }
    }
}

fn config() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_DATAGRAM>,
> {
    bincode::config::standard().with_limit::<MAX_DATAGRAM>()
}

/// Encodes a frame (a datagram's payload).
pub fn encode(frame: &Frame) -> Result<Vec<u8>, HeartbeatError> {
    bincode::serde::encode_to_vec(frame, config())
        .map_err(|e| HeartbeatError::Compact(e.to_string()))
}

/// Decodes a datagram's payload: the whole of it, nothing left over.
pub fn decode(bytes: &[u8]) -> Result<Frame, Rejection> {
    let (frame, used): (Frame, usize) =
        bincode::serde::decode_from_slice(bytes, config()).map_err(|_| Rejection::Payload)?;
    if used != bytes.len() {
        return Err(Rejection::Payload);
    }
    Ok(frame)
}

/// Checks a decoded frame against the datagram's header and the peer's name.
pub fn accept(bytes: &[u8], session: u64, peer_name: &str) -> Result<Frame, Rejection> {
    let frame = decode(bytes)?;
    if frame.session() != session {
        return Err(Rejection::Payload);
    }
    if frame.node() != peer_name {
        return Err(Rejection::WrongNode(frame.node().to_string()));
    }
    Ok(frame)
}

fn first_u64(hash: blake3::Hash) -> u64 {
    let mut eight = [0u8; 8];
    eight.copy_from_slice(&hash.as_bytes()[..8]);
    u64::from_le_bytes(eight)
}

/// A module's id in summaries: 64 bits of a hash of its name (never
/// [`CONFIG_KEYS_ID`]). Two of 32 names colliding: about 3·10⁻¹⁷.
pub fn module_id(name: &str) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(b"vmha heartbeat module id\0");
    h.update(name.as_bytes());
    first_u64(h.finalize()).max(1)
}

/// 64 bits of a hash of a beat's encoding.
pub fn beat_digest(beat: &ModuleBeat) -> Result<u64, HeartbeatError> {
    let bytes = bincode::serde::encode_to_vec(beat, config())
        .map_err(|e| HeartbeatError::Compact(e.to_string()))?;
    Ok(first_u64(blake3::hash(&bytes)))
}

fn keys_digest(keys: &KeyDigests) -> Result<u64, HeartbeatError> {
    let bytes = bincode::serde::encode_to_vec(keys, config())
        .map_err(|e| HeartbeatError::Compact(e.to_string()))?;
    Ok(first_u64(blake3::hash(&bytes)))
}

/// What the sender remembers of one module's beat.
#[derive(Debug)]
struct Sent {
    beat: ModuleBeat,
    id: u64,
    digest: u64,
    /// Rounds left in which the full beat goes out unasked.
    repeat: u8,
}

/// The sender's side: the beats last sent and how often to repeat them.
#[derive(Debug, Default)]
pub struct SendState {
    modules: HashMap<String, Sent>,
    config_keys: Option<(KeyDigests, u64, u8)>,
}

impl SendState {
    /// The frames of one round, in sending order (full beats first, the
    /// summary last). `peer_wants` is the peer's latest `want`, `our_wants`
    /// what we lack of the peer's.
    pub fn frames(
        &mut self,
        payload: &Payload,
        peer_wants: &[u64],
        our_wants: Vec<u64>,
    ) -> Result<Vec<Vec<u8>>, HeartbeatError> {
        // The cluster key digests: changed, or asked for.
        let keys_digest = match &mut self.config_keys {
            Some((keys, digest, repeat)) if *keys == payload.config_keys => {
                if peer_wants.contains(&CONFIG_KEYS_ID) {
                    *repeat = (*repeat).max(1);
                }
                *digest
            }
            slot => {
                let digest = keys_digest(&payload.config_keys)?;
                *slot = Some((payload.config_keys.clone(), digest, FULL_REPEATS));
                digest
            }
        };
        let config_keys = match &mut self.config_keys {
            Some((keys, _, repeat)) if *repeat > 0 => {
                *repeat -= 1;
                Some(keys.clone())
            }
            _ => None,
        };
        let mut summary = Vec::with_capacity(payload.modules.len());
        let mut full: Vec<&ModuleBeat> = Vec::new();
        self.modules
            .retain(|name, _| payload.modules.iter().any(|b| &b.name == name));
        for beat in &payload.modules {
            let sent = match self.modules.get_mut(&beat.name) {
                Some(sent) if sent.beat == *beat => sent,
                _ => {
                    let sent = Sent {
                        beat: beat.clone(),
                        id: module_id(&beat.name),
                        digest: beat_digest(beat)?,
                        repeat: FULL_REPEATS,
                    };
                    self.modules.insert(beat.name.clone(), sent);
                    match self.modules.get_mut(&beat.name) {
                        Some(sent) => sent,
                        None => continue,
                    }
                }
            };
            if peer_wants.contains(&sent.id) {
                sent.repeat = sent.repeat.max(1);
            }
            if sent.repeat > 0 {
                sent.repeat -= 1;
                full.push(beat);
            }
            summary.push((sent.id, sent.digest));
        }
        let mut frames = Vec::new();
        let mut batch: Vec<ModuleBeat> = Vec::new();
        let beats_frame = |beats: Vec<ModuleBeat>| {
            encode(&Frame::Beats(Beats {
                node: payload.node.clone(),
                session: payload.session,
                round: payload.round,
                beats,
            }))
        };
        for beat in full {
            batch.push(beat.clone());
            if batch.len() > 1 && beats_frame(batch.clone())?.len() > BEATS_BUDGET {
                // This one does not fit: the others go, it starts the next.
                let last = batch.pop();
                frames.push(beats_frame(std::mem::take(&mut batch))?);
                batch.extend(last);
            }
        }
        if !batch.is_empty() {
            frames.push(beats_frame(batch)?);
        }
        frames.push(encode(&Frame::Summary(Summary {
            node: payload.node.clone(),
            session: payload.session,
            round: payload.round,
            config_hash: payload.config_hash.0,
            software: payload.software.clone(),
            config_keys_digest: keys_digest,
            config_keys,
            modules: summary,
            want: our_wants,
        }))?);
        Ok(frames)
    }
}

/// The receiver's side: the peer's last full beats (module docs).
#[derive(Debug, Default)]
pub struct PeerBeats {
    session: Option<u64>,
    beats: HashMap<u64, (u64, Arc<ModuleBeat>)>,
    config_keys: Option<(u64, KeyDigests)>,
    /// The peer's latest summary's `want` (what to send it in full).
    peer_wants: Vec<u64>,
    /// What the latest summary could not resolve (for our next summary).
    our_wants: Vec<u64>,
    /// A new session was accepted by a frame that delivered no payload.
    new_session_pending: bool,
}

impl PeerBeats {
    /// The peer's latest `want`.
    pub fn peer_wants(&self) -> &[u64] {
        &self.peer_wants
    }

    /// What we lack of the peer's, to ask for in our next summary.
    pub fn our_wants(&self) -> Vec<u64> {
        self.our_wants.clone()
    }

    /// Takes an authentic frame of `session` (accepted by the opener, so not
    /// replayed); returns the round's payload for a summary, in the shape of
    /// versions 2 and 3: the modules it could resolve, the cluster key
    /// digests last received (its `modules` empty: the resolved beats come
    /// apart, shared, not copied); and whether this or an earlier frame since
    /// the last summary opened a new peer session.
    pub fn apply(
        &mut self,
        frame: Frame,
        session: u64,
        new_session: bool,
    ) -> Option<(Payload, Vec<Arc<ModuleBeat>>, bool)> {
        if self.session != Some(session) {
            *self = PeerBeats {
                session: Some(session),
                ..PeerBeats::default()
            };
        }
        self.new_session_pending |= new_session;
        match frame {
            Frame::Beats(b) => {
                for beat in b.beats {
                    // A beat that does not encode is not kept (never asked
                    // for again in vain: the summary's digest cannot match).
                    if let Ok(digest) = beat_digest(&beat) {
                        self.beats
                            .insert(module_id(&beat.name), (digest, Arc::new(beat)));
                    }
                }
                None
            }
            Frame::Summary(s) => {
                let mut want = Vec::new();
                if let Some(keys) = &s.config_keys {
                    if let Ok(digest) = keys_digest(keys) {
                        self.config_keys = Some((digest, keys.clone()));
                    }
                }
                if self.config_keys.as_ref().map(|(d, _)| *d) != Some(s.config_keys_digest) {
                    want.push(CONFIG_KEYS_ID);
                }
                let mut modules = Vec::with_capacity(s.modules.len());
                for (id, digest) in &s.modules {
                    match self.beats.get(id) {
                        Some((d, beat)) if d == digest => modules.push(Arc::clone(beat)),
                        _ => want.push(*id),
                    }
                }
                // Beats of modules the peer no longer announces are dropped.
                self.beats
                    .retain(|id, _| s.modules.iter().any(|(m, _)| m == id));
                want.dedup();
                self.our_wants = want;
                self.peer_wants = s.want;
                let config_keys = self
                    .config_keys
                    .as_ref()
                    .map(|(_, k)| k.clone())
                    .unwrap_or_default();
                let new_session = std::mem::take(&mut self.new_session_pending);
                Some((
                    Payload {
                        node: s.node,
                        session: s.session,
                        round: s.round,
                        config_hash: Digest(s.config_hash),
                        modules: Vec::new(),
                        config_keys,
                        software: s.software,
                    },
                    modules,
                    new_session,
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generation::{GenerationId, History};
    use crate::state::{Announce, Readiness, Role};
    use proptest::prelude::*;

    /// A beat as large as a real one gets: 16 earlier generations, 14 key
    /// digests.
    fn beat(name: &str, role: Role) -> ModuleBeat {
        let mut history = History::empty();
        for i in 0..=crate::generation::HISTORY_LEN as u128 {
            history.push(GenerationId(i * 0x1234_5678_9abc_def0_1234_5678 + 1));
        }
        ModuleBeat {
            name: name.to_string(),
            module_hash: Digest([7; 32]),
            announce: Announce {
                role,
                readiness: Readiness::Ready,
                request: None,
                forced: false,
                disk: Default::default(),
                maintenance: false,
                left: false,
                live_swap: true,
                swap_phase: Some(crate::state::SwapPhase::Standby),
            },
            history,
            changed_bytes: 12_345,
            resync: None,
            keys: (0..14)
                .map(|k| (format!("some_module_key_{k}"), format!("{k:016x}")))
                .collect(),
        }
    }

    fn payload(modules: usize, round: u64) -> Payload {
        Payload {
            node: "node1".into(),
            session: 42,
            round,
            config_hash: Digest([3; 32]),
            modules: (0..modules)
                .map(|i| beat(&format!("a-rather-long-module-name-{i:02}"), Role::Prim))
                .collect(),
            config_keys: (0..13)
                .map(|k| (format!("cluster.key_{k}"), format!("{k:016x}")))
                .collect(),
            software: Some("0.1.0".into()),
        }
    }

    /// Sends `frames` to `rx` (all of them, or those `keep` lets through);
    /// the round's payload if the summary arrived.
    fn deliver(
        rx: &mut PeerBeats,
        frames: Vec<Vec<u8>>,
        keep: impl Fn(usize) -> bool,
    ) -> Option<Payload> {
        let mut out = None;
        for (i, bytes) in frames.into_iter().enumerate() {
            if !keep(i) {
                continue;
            }
            let frame = accept(&bytes, 42, "node1").unwrap();
            if let Some((mut p, modules, _)) = rx.apply(frame, 42, false) {
                p.modules = modules.iter().map(|b| (**b).clone()).collect();
                out = Some(p);
            }
        }
        out
    }

    /// IPv6 + UDP headers, the datagram's header and MAC around a payload.
    fn packet_len(payload: usize) -> usize {
        40 + 8 + super::super::HEADER_LEN + payload + super::super::MAC_LEN
    }

    #[test]
    fn a_summary_of_32_modules_fits_one_packet() {
        let mut tx = SendState::default();
        let mut rx = PeerBeats::default();
        let p = payload(32, 1);
        let first = tx.frames(&p, &[], Vec::new()).unwrap();
        // The first rounds carry every full beat, in packets below the MTU.
        assert!(first.len() > 1);
        for f in &first {
            assert!(packet_len(f.len()) <= 1500, "{} bytes", f.len());
        }
        assert_eq!(deliver(&mut rx, first, |_| true).unwrap(), p);
        for round in 2..=FULL_REPEATS as u64 {
            tx.frames(&payload(32, round), &[], Vec::new()).unwrap();
        }
        // Then nothing changed: one summary, one packet.
        let p = payload(32, 10);
        let steady = tx.frames(&p, &[], rx.our_wants()).unwrap();
        assert_eq!(steady.len(), 1);
        eprintln!(
            "summary of 32 modules: {} bytes payload, {} bytes on the wire",
            steady[0].len(),
            packet_len(steady[0].len())
        );
        assert!(packet_len(steady[0].len()) <= 1500);
        assert!(steady[0].len() < 900, "{} bytes", steady[0].len());
        assert_eq!(deliver(&mut rx, steady, |_| true).unwrap(), p);
        assert!(rx.our_wants().is_empty());
    }

    #[test]
    fn a_change_travels_in_full_and_a_lost_one_is_asked_for() {
        let mut tx = SendState::default();
        let mut rx = PeerBeats::default();
        let mut p = payload(4, 1);
        deliver(&mut rx, tx.frames(&p, &[], Vec::new()).unwrap(), |_| true).unwrap();
        for round in 2..=5 {
            p.round = round;
            tx.frames(&p, &[], Vec::new()).unwrap();
        }
        // Module 2 changes; every datagram with its full beat is lost.
        p.modules[2].announce.role = Role::Alone;
        for round in 6..6 + u64::from(FULL_REPEATS) {
            p.round = round;
            let frames = tx.frames(&p, rx.peer_wants(), rx.our_wants()).unwrap();
            let last = frames.len() - 1;
            let got = deliver(&mut rx, frames, |i| i == last).unwrap();
            // The module is left out (it keeps its previous view), the others
            // are there.
            assert_eq!(got.modules.len(), 3);
            assert!(got.modules.iter().all(|b| b.name != p.modules[2].name));
        }
        assert_eq!(rx.our_wants(), vec![module_id(&p.modules[2].name)]);
        // Our next summary asks for it; the peer's next round carries it.
        let mut back = SendState::default();
        let ours = Payload {
            node: "node2".into(),
            ..payload(0, 1)
        };
        let request = back.frames(&ours, &[], rx.our_wants()).unwrap();
        let mut at_sender = PeerBeats::default();
        for bytes in request {
            at_sender.apply(accept(&bytes, 42, "node2").unwrap(), 42, false);
        }
        p.round = 20;
        let frames = tx.frames(&p, at_sender.peer_wants(), Vec::new()).unwrap();
        assert_eq!(frames.len(), 2);
        assert_eq!(deliver(&mut rx, frames, |_| true).unwrap(), p);
        assert!(rx.our_wants().is_empty());
    }

    #[test]
    fn a_new_peer_session_forgets_the_old_beats_and_asks_for_all() {
        let mut tx = SendState::default();
        let mut rx = PeerBeats::default();
        let p = payload(3, 1);
        deliver(&mut rx, tx.frames(&p, &[], Vec::new()).unwrap(), |_| true).unwrap();
        for _ in 1..FULL_REPEATS {
            tx.frames(&p, &[], Vec::new()).unwrap();
        }
        // Same content under another session: nothing kept applies.
        let summary_only = tx.frames(&p, &[], Vec::new()).unwrap();
        let last = summary_only.last().unwrap();
        let Frame::Summary(mut s) = decode(last).unwrap() else {
            panic!("not a summary")
        };
        s.session = 43;
        let (_, got, new_session) = rx.apply(Frame::Summary(s), 43, true).unwrap();
        assert!(new_session);
        assert!(got.is_empty());
        assert_eq!(rx.our_wants().len(), 4, "3 modules and the cluster keys");
    }

    #[test]
    fn cluster_keys_travel_when_changed_and_are_kept() {
        let mut tx = SendState::default();
        let mut rx = PeerBeats::default();
        let mut p = payload(1, 1);
        for round in 1..=5 {
            p.round = round;
            let got = deliver(&mut rx, tx.frames(&p, &[], Vec::new()).unwrap(), |_| true);
            assert_eq!(got.unwrap().config_keys, p.config_keys);
        }
        p.config_keys.insert("cluster.new".into(), "0".into());
        p.round = 6;
        let frames = tx.frames(&p, &[], Vec::new()).unwrap();
        let Frame::Summary(s) = decode(frames.last().unwrap()).unwrap() else {
            panic!("not a summary")
        };
        assert!(s.config_keys.is_some());
        assert_eq!(deliver(&mut rx, frames, |_| true).unwrap(), p);
    }

    #[test]
    fn trailing_bytes_and_another_node_are_refused() {
        let mut tx = SendState::default();
        let mut frames = tx.frames(&payload(1, 1), &[], Vec::new()).unwrap();
        let mut summary = frames.pop().unwrap();
        assert_eq!(
            accept(&summary, 42, "node9"),
            Err(Rejection::WrongNode("node1".into()))
        );
        assert_eq!(accept(&summary, 41, "node1"), Err(Rejection::Payload));
        summary.push(0);
        assert_eq!(accept(&summary, 42, "node1"), Err(Rejection::Payload));
    }

    fn arb_beat() -> impl Strategy<Value = ModuleBeat> {
        (
            "[a-z0-9-]{1,40}",
            any::<u64>(),
            prop::sample::select(vec![
                Role::Stop,
                Role::Wait,
                Role::Alone,
                Role::Prim,
                Role::Second,
            ]),
            any::<bool>(),
            proptest::collection::vec(any::<u128>(), 0..4),
            proptest::collection::btree_map("[a-z_]{1,20}", "[0-9a-f]{16}", 0..4),
        )
            .prop_map(|(name, changed, role, forced, gens, keys)| {
                let mut b = beat(&name, role);
                b.changed_bytes = changed;
                b.announce.forced = forced;
                b.history = History::empty();
                for g in gens {
                    b.history.push(GenerationId(g));
                }
                b.keys = keys;
                b
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// Arbitrary bytes never panic the decoder.
        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(
            bytes in proptest::collection::vec(any::<u8>(), 0..2048),
        ) {
            let _ = decode(&bytes);
        }

        /// A valid frame with any byte changed, cut short or extended never
        /// panics the decoder, and what decodes re-encodes to the same bytes.
        #[test]
        fn mutated_frames_never_panic_the_decoder(
            beats in proptest::collection::vec(arb_beat(), 0..4),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
            cut in any::<prop::sample::Index>(),
        ) {
            let p = Payload { modules: beats, ..payload(0, 1) };
            for mut bytes in SendState::default().frames(&p, &[1, 2], vec![3]).unwrap() {
                let i = at.index(bytes.len());
                bytes[i] = byte;
                if let Ok(frame) = decode(&bytes) {
                    // (Map keys may come back in another order: compare frames.)
                    prop_assert_eq!(decode(&encode(&frame).unwrap()).unwrap(), frame);
                }
                let _ = decode(&bytes[..cut.index(bytes.len())]);
                bytes.extend_from_slice(&[0xff; 9]);
                prop_assert!(decode(&bytes).is_err());
            }
        }

        /// Whatever is sent arrives whole (every frame delivered), in rounds
        /// of changing beats.
        #[test]
        fn every_round_arrives_whole(
            rounds in proptest::collection::vec(proptest::collection::vec(arb_beat(), 0..5), 1..6),
        ) {
            let mut tx = SendState::default();
            let mut rx = PeerBeats::default();
            for (r, mut beats) in rounds.into_iter().enumerate() {
                beats.sort_by(|a, b| a.name.cmp(&b.name));
                beats.dedup_by(|a, b| a.name == b.name);
                let p = Payload { modules: beats, round: r as u64 + 1, ..payload(0, 1) };
                let frames = tx.frames(&p, rx.peer_wants(), Vec::new()).unwrap();
                prop_assert_eq!(deliver(&mut rx, frames, |_| true).unwrap(), p);
            }
        }
    }
}
