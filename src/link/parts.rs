//! Reassembly of unreliable messages that were split into UNRELIABLE_PART frames to fit one
//! SCTP chunk each (`docs/PROTOCOL.md` §7.6). Sans-IO: time is passed in.
//!
//! A message is delivered once, whole, when all its parts have arrived; an incomplete one is
//! discarded `PART_EXPIRY` after its first part arrived, and at most `MAX_HELD` bytes of parts
//! are held in all (the oldest message goes first), so lost parts cost nothing for long.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::protocol::{MAX_PARTS, MAX_PART_PAYLOAD, MAX_UNRELIABLE_PAYLOAD};

/// An incomplete message is discarded this long after its first part arrived.
pub(crate) const PART_EXPIRY: Duration = Duration::from_secs(1);
/// Most bytes of parts held (each part costs its bytes + `PART_COST`).
pub(crate) const MAX_HELD: usize = 256 << 10;
/// Bookkeeping cost of a held part beyond its bytes, so that empty parts are bounded too.
const PART_COST: usize = 64;
/// How many discarded messages are remembered, so that a part arriving after its message was
/// discarded is dropped as part of it (not started over as a new message, which would be
/// discarded, and counted, again).
const DISCARDED_REMEMBERED: usize = 256;

/// Why a part was refused (the part is dropped; the message it belongs to is unaffected).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PartRefused {
    #[error("part {index} of {count}: bad index or count")]
    BadIndex { index: u16, count: u16 },
    #[error("part of {len} bytes is longer than {MAX_PART_PAYLOAD}")]
    TooLong { len: usize },
    #[error("message {msg}: part count {count} differs from its first part's {first}")]
    CountMismatch { msg: u32, count: u16, first: u16 },
    #[error("message {msg}: part {index} arrived twice")]
    Duplicate { msg: u32, index: u16 },
    #[error("message {msg} would be longer than {MAX_UNRELIABLE_PAYLOAD} bytes")]
    MessageTooLong { msg: u32 },
}

struct Partial {
    msg: u32,
    first: Instant,
    pieces: Vec<Option<Bytes>>,
    missing: usize,
    len: usize,
    cost: usize,
}

/// Messages being reassembled, oldest first.
#[derive(Default)]
pub(crate) struct Parts {
    msgs: VecDeque<Partial>,
    held: usize,
    /// Incomplete messages discarded (expired or evicted): `LinkStats::unreliable_incomplete`.
    pub(crate) discarded: u64,
    /// The ids of the last [`DISCARDED_REMEMBERED`] messages discarded, oldest first.
    recently_discarded: VecDeque<u32>,
}

impl Parts {
    /// Take one part; returns the whole message when this part completes it.
    pub(crate) fn push(
        &mut self,
        now: Instant,
        msg: u32,
        index: u16,
        count: u16,
        bytes: Bytes,
    ) -> Result<Option<Bytes>, PartRefused> {
        self.expire(now);
        if count < 2 || count as usize > MAX_PARTS || index >= count {
            return Err(PartRefused::BadIndex { index, count });
        }
        if bytes.len() > MAX_PART_PAYLOAD {
            return Err(PartRefused::TooLong { len: bytes.len() });
        }
        // Recent messages are at the back; there are rarely more than one or two.
        let pos = match self.msgs.iter().rposition(|p| p.msg == msg) {
            Some(pos) => pos,
            None if self.recently_discarded.contains(&msg) => {
                // A late part of a message already discarded (and counted) as incomplete.
                tracing::debug!(msg, index, "late part of a discarded unreliable message");
                return Ok(None);
            }
            None => {
                self.msgs.push_back(Partial {
                    msg,
                    first: now,
                    pieces: vec![None; count as usize],
                    missing: count as usize,
                    len: 0,
                    cost: 0,
                });
                self.msgs.len() - 1
            }
        };
        let p = &mut self.msgs[pos];
        if p.pieces.len() != count as usize {
            return Err(PartRefused::CountMismatch {
                msg,
                count,
                first: p.pieces.len() as u16,
            });
        }
        if p.pieces[index as usize].is_some() {
            return Err(PartRefused::Duplicate { msg, index });
        }
        if p.len + bytes.len() > MAX_UNRELIABLE_PAYLOAD {
            return Err(PartRefused::MessageTooLong { msg });
        }
        let cost = bytes.len() + PART_COST;
        p.len += bytes.len();
        p.cost += cost;
        p.missing -= 1;
        p.pieces[index as usize] = Some(bytes);
        self.held += cost;
        if p.missing == 0 {
            let p = self.msgs.remove(pos).expect("position found above");
            self.held -= p.cost;
            let mut out = BytesMut::with_capacity(p.len);
            for piece in p.pieces.into_iter().flatten() {
                out.extend_from_slice(&piece);
            }
            return Ok(Some(out.freeze()));
        }
        while self.held > MAX_HELD {
            let oldest = self
                .msgs
                .pop_front()
                .expect("held bytes belong to a message");
            self.held -= oldest.cost;
            self.discard(oldest.msg);
        }
        Ok(None)
    }

    /// Discard incomplete messages whose first part is older than `PART_EXPIRY`.
    pub(crate) fn expire(&mut self, now: Instant) {
        while let Some(p) = self.msgs.front() {
            if now.saturating_duration_since(p.first) < PART_EXPIRY {
                break;
            }
            self.held -= p.cost;
            let msg = p.msg;
            self.discard(msg);
            self.msgs.pop_front();
        }
    }

    fn discard(&mut self, msg: u32) {
        self.discarded += 1;
        if self.recently_discarded.len() == DISCARDED_REMEMBERED {
            self.recently_discarded.pop_front();
        }
        self.recently_discarded.push_back(msg);
    }

    /// When the oldest incomplete message expires ([`Parts::expire`]), if any is held.
    pub(crate) fn next_expiry(&self) -> Option<Instant> {
        self.msgs.front().map(|p| p.first + PART_EXPIRY)
    }

    /// Bytes (plus per-part cost) held now.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.held
    }
}

/// Split an unreliable message longer than `MAX_PART_PAYLOAD` into UNRELIABLE_PART payloads:
/// `MAX_PART_PAYLOAD` bytes each, the last one shorter.
pub(crate) fn split(data: &Bytes) -> Vec<Bytes> {
    debug_assert!(data.len() > MAX_PART_PAYLOAD);
    let mut out = Vec::with_capacity(data.len().div_ceil(MAX_PART_PAYLOAD));
    let mut rest = data.clone();
    while !rest.is_empty() {
        out.push(rest.split_to(rest.len().min(MAX_PART_PAYLOAD)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn msg(len: usize, seed: u8) -> Bytes {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect::<Vec<u8>>()
            .into()
    }

    #[test]
    fn split_fills_parts_and_keeps_every_byte() {
        for len in [1024, 1030, 2000, 2030, 16384] {
            let m = msg(len, 1);
            let parts = split(&m);
            assert!(parts.len() >= 2 && parts.len() <= MAX_PARTS, "{len}");
            assert!(parts.iter().all(|p| p.len() <= MAX_PART_PAYLOAD));
            assert_eq!(parts.concat(), m.to_vec());
        }
        assert_eq!(split(&msg(2000, 0))[0].len(), MAX_PART_PAYLOAD);
        assert_eq!(split(&msg(16384, 0)).len(), 17);
    }

    #[test]
    fn a_part_after_its_message_expired_is_dropped_with_it() {
        let now = Instant::now();
        let parts = split(&msg(3000, 5));
        let count = parts.len() as u16;
        let mut p = Parts::default();
        assert_eq!(p.push(now, 9, 0, count, parts[0].clone()), Ok(None));
        p.expire(now + PART_EXPIRY);
        assert_eq!(p.discarded, 1);
        // The rest arrives late: nothing is delivered, held or counted again.
        for (i, part) in parts.iter().enumerate().skip(1) {
            let later = now + PART_EXPIRY * 3;
            assert_eq!(p.push(later, 9, i as u16, count, part.clone()), Ok(None));
        }
        p.expire(now + PART_EXPIRY * 10);
        assert_eq!((p.discarded, p.held()), (1, 0));
        // Another message goes on as usual.
        let m = msg(2500, 6);
        let parts = split(&m);
        let count = parts.len() as u16;
        let mut got = None;
        for (i, part) in parts.iter().enumerate() {
            got = p.push(now, 10, i as u16, count, part.clone()).unwrap();
        }
        assert_eq!(got, Some(m));
    }

    #[test]
    fn reassembles_out_of_order_once() {
        let now = Instant::now();
        let m = msg(5000, 3);
        let parts = split(&m);
        let count = parts.len() as u16;
        let mut asm = Parts::default();
        let mut order: Vec<usize> = (0..parts.len()).rev().collect();
        let last = order.pop().unwrap();
        for i in order {
            assert_eq!(
                asm.push(now, 9, i as u16, count, parts[i].clone()),
                Ok(None)
            );
        }
        let whole = asm.push(now, 9, last as u16, count, parts[last].clone());
        assert_eq!(whole, Ok(Some(m)));
        assert_eq!(asm.held(), 0);
        // A late duplicate starts a new message that never completes and expires.
        assert_eq!(asm.push(now, 9, 0, count, parts[0].clone()), Ok(None));
        asm.expire(now + PART_EXPIRY);
        assert_eq!(asm.held(), 0);
    }

    #[test]
    fn refuses_bad_parts() {
        let now = Instant::now();
        let mut asm = Parts::default();
        let b = Bytes::from_static(b"x");
        assert!(matches!(
            asm.push(now, 1, 2, 2, b.clone()),
            Err(PartRefused::BadIndex { .. })
        ));
        assert!(matches!(
            asm.push(now, 1, 0, 1, b.clone()),
            Err(PartRefused::BadIndex { .. })
        ));
        assert!(matches!(
            asm.push(now, 1, 0, 18, b.clone()),
            Err(PartRefused::BadIndex { .. })
        ));
        assert!(matches!(
            asm.push(now, 1, 0, 2, Bytes::from(vec![0; MAX_PART_PAYLOAD + 1])),
            Err(PartRefused::TooLong { .. })
        ));
        assert_eq!(asm.push(now, 1, 0, 3, b.clone()), Ok(None));
        assert!(matches!(
            asm.push(now, 1, 1, 4, b.clone()),
            Err(PartRefused::CountMismatch { .. })
        ));
        assert!(matches!(
            asm.push(now, 1, 0, 3, b.clone()),
            Err(PartRefused::Duplicate { .. })
        ));
        // 17 full parts are 17255 bytes: more than an unreliable message may be.
        let full = Bytes::from(vec![0; MAX_PART_PAYLOAD]);
        let mut refused = false;
        for i in 0..17 {
            if let Err(e) = asm.push(now, 2, i, 17, full.clone()) {
                assert!(matches!(e, PartRefused::MessageTooLong { .. }));
                refused = true;
            }
        }
        assert!(refused);
    }

    #[test]
    fn incomplete_messages_expire() {
        let t0 = Instant::now();
        let mut asm = Parts::default();
        asm.push(t0, 1, 0, 2, msg(1000, 0)).unwrap();
        asm.push(t0 + Duration::from_millis(500), 2, 0, 2, msg(1000, 0))
            .unwrap();
        asm.expire(t0 + PART_EXPIRY);
        assert_eq!(asm.discarded, 1);
        // Message 1 is gone: its second part starts over and does not complete it.
        assert_eq!(asm.push(t0 + PART_EXPIRY, 1, 1, 2, msg(1000, 0)), Ok(None));
        // Message 2 still completes.
        assert!(asm
            .push(t0 + PART_EXPIRY, 2, 1, 2, msg(10, 0))
            .unwrap()
            .is_some());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Arbitrary parts (ids, indexes, counts, sizes, times): memory stays within the cap,
        /// and every message delivered is exactly one that was sent, whole, at most once.
        #[test]
        fn arbitrary_parts_stay_bounded_and_never_deliver_garbage(
            sent in proptest::collection::vec((1024usize..=16384, any::<u8>()), 1..12),
            noise in proptest::collection::vec(
                (0u32..20, 0u16..20, 0u16..20, 0usize..1100, 0u64..3000), 0..300),
            order_seed in any::<u64>(),
            drop_one in any::<bool>(),
        ) {
            let t0 = Instant::now();
            // Parts of the real messages (ids 100..), shuffled and mixed with noise.
            let mut frames: Vec<(u32, u16, u16, Bytes, u64)> = Vec::new();
            let mut originals = std::collections::HashMap::new();
            for (k, (len, seed)) in sent.iter().enumerate() {
                let m = msg(*len, *seed);
                let parts = split(&m);
                let count = parts.len() as u16;
                originals.insert(100 + k as u32, m);
                for (i, p) in parts.into_iter().enumerate() {
                    if drop_one && k == 0 && i == 0 {
                        continue;
                    }
                    frames.push((100 + k as u32, i as u16, count, p, k as u64));
                }
            }
            for (id, index, count, len, at) in noise {
                frames.push((id, index, count, Bytes::from(vec![7u8; len]), at));
            }
            let mut rng = order_seed;
            for i in (1..frames.len()).rev() {
                rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                frames.swap(i, (rng >> 33) as usize % (i + 1));
            }
            let mut asm = Parts::default();
            let mut delivered = std::collections::HashSet::new();
            for (id, index, count, bytes, at) in frames {
                let now = t0 + Duration::from_millis(at.min(900));
                if let Ok(Some(m)) = asm.push(now, id, index, count, bytes) {
                    if let Some(orig) = originals.get(&id) {
                        prop_assert_eq!(&m, orig);
                        prop_assert!(delivered.insert(id), "message {} delivered twice", id);
                    } else {
                        prop_assert!(id < 20);
                    }
                }
                prop_assert!(asm.held() <= MAX_HELD + MAX_PART_PAYLOAD + PART_COST);
            }
            if drop_one {
                prop_assert!(!delivered.contains(&100));
            }
        }
    }
}
