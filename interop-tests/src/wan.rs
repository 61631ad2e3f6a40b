//! A WAN link emulator, sans-IO: what one direction of a link does to the Ethernet frames put
//! into it (delay, jitter, random loss, a rate limit with a byte-limited queue), on a clock the
//! caller passes in. The kernel here has no netem, so `wan_link` (src/bin/wan_link.rs) moves
//! frames between two TAP devices through two [`Direction`]s; the tests of this module drive
//! them on a fake clock.
//!
//! The model follows netem's order: a frame is first lost at random (IPv4/IPv6 frames only, never
//! ARP, so a lossy link still resolves addresses), then tail-dropped if the bytes still waiting
//! for serialization would exceed the queue, then serialized at the rate (it departs when its
//! last bit has left: `depart = max(now, last_depart) + len·8/rate`), then delayed:
//! `release = depart + delay + U(-jitter, +jitter)`, and, unless `reorder`, never before the
//! previous frame's release (a FIFO, as a real path without reordering).
//!
//! `queue_bytes` bounds only what waits for serialization; frames in the delay line itself
//! (delay × rate of what passes) are held without a limit, as netem holds them up to its limit.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What one direction of a link does to the frames it carries.
#[derive(Debug, Clone, PartialEq)]
pub struct Impairment {
    /// One-way delay added to every frame (after serialization).
    pub delay: Duration,
    /// Uniform jitter: each frame's delay is `delay ± jitter` (never below zero).
    pub jitter: Duration,
    /// Probability (0..=1) that an IPv4/IPv6 frame is lost.
    pub loss: f64,
    /// Rate limit in bit/s; 0 means unlimited (frames depart when they arrive).
    pub rate_bps: u64,
    /// Bytes that may wait for serialization; a frame that would exceed it is dropped (tail drop).
    pub queue_bytes: usize,
    /// Let jitter reorder frames (otherwise a frame is never released before the previous one).
    pub reorder: bool,
    /// Seed of the loss and jitter random numbers (printed by `wan_link`, so a run replays).
    /// Give the two directions of a link different seeds when both lose: with the same seed
    /// their losses fall on the same frame numbers.
    pub seed: u64,
}

impl Default for Impairment {
    /// A perfect link: no delay, no loss, unlimited rate, a 1 MiB queue, seed 1.
    fn default() -> Impairment {
        Impairment {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            rate_bps: 0,
            queue_bytes: 1 << 20,
            reorder: false,
            seed: 1,
        }
    }
}

impl Impairment {
    /// The keys [`Impairment::set`] takes, as `wan_link` flags and `set` commands use them.
    pub const KEYS: [&'static str; 7] = [
        "delay-ms",
        "jitter-ms",
        "loss-pct",
        "rate-mbit",
        "queue-kib",
        "reorder",
        "seed",
    ];

    /// Set one parameter from its text form: `delay-ms`, `jitter-ms` (fractions allowed),
    /// `loss-pct` (0..=100), `rate-mbit` (0 = unlimited), `queue-kib`, `reorder` (`0`/`1`,
    /// `true`/`false`), `seed`.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let num = || -> Result<f64, String> {
            let v: f64 = value.parse().map_err(|e| format!("{key}={value}: {e}"))?;
            if v.is_finite() && v >= 0.0 {
                Ok(v)
            } else {
                Err(format!("{key}={value}: must be a number ≥ 0"))
            }
        };
        match key {
            "delay-ms" => self.delay = Duration::from_nanos((num()? * 1e6).round() as u64),
            "jitter-ms" => self.jitter = Duration::from_nanos((num()? * 1e6).round() as u64),
            "loss-pct" => {
                let p = num()?;
                if p > 100.0 {
                    return Err(format!("{key}={value}: more than 100 %"));
                }
                self.loss = p / 100.0;
            }
            "rate-mbit" => self.rate_bps = (num()? * 1e6).round() as u64,
            "queue-kib" => self.queue_bytes = (num()? * 1024.0).round() as usize,
            "reorder" => {
                self.reorder = match value {
                    "1" | "true" | "yes" => true,
                    "0" | "false" | "no" => false,
                    _ => return Err(format!("{key}={value}: want 0 or 1")),
                }
            }
            "seed" => self.seed = value.parse().map_err(|e| format!("{key}={value}: {e}"))?,
            _ => {
                return Err(format!(
                    "unknown key {key:?} (known: {})",
                    Impairment::KEYS.join(" ")
                ))
            }
        }
        Ok(())
    }

    /// The parameters as `key=value` words, in the form [`Impairment::set`] reads.
    pub fn to_words(&self) -> Vec<String> {
        vec![
            format!("delay-ms={}", self.delay.as_secs_f64() * 1e3),
            format!("jitter-ms={}", self.jitter.as_secs_f64() * 1e3),
            format!("loss-pct={}", self.loss * 100.0),
            format!("rate-mbit={}", self.rate_bps as f64 / 1e6),
            format!("queue-kib={}", self.queue_bytes as f64 / 1024.0),
            format!("reorder={}", u8::from(self.reorder)),
            format!("seed={}", self.seed),
        ]
    }
}

impl fmt::Display for Impairment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_words().join(" "))
    }
}

/// What happened to a frame pushed into a [`Direction`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It will come out of [`Direction::poll`] at `release`.
    Queued {
        /// When it is due.
        release: Instant,
    },
    /// Lost at random.
    Lost,
    /// Dropped: the queue was full.
    QueueFull,
}

/// Counters of one direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Frames pushed.
    pub frames_in: u64,
    /// Bytes pushed.
    pub bytes_in: u64,
    /// Frames lost at random.
    pub lost: u64,
    /// Frames dropped because the queue was full.
    pub queue_dropped: u64,
    /// Frames released by [`Direction::poll`].
    pub frames_out: u64,
    /// Bytes released.
    pub bytes_out: u64,
    /// Most bytes ever waiting for serialization (the frame being serialized included).
    pub max_queue_bytes: u64,
    /// Released frames the caller could not deliver ([`Direction::count_write_drop`]).
    pub write_dropped: u64,
}

impl Stats {
    /// Frames pushed but neither lost, dropped nor released yet.
    pub fn in_flight(&self) -> u64 {
        self.frames_in - self.lost - self.queue_dropped - self.frames_out
    }

    /// `key=value` words with `prefix` before each key (`ab.in=…`), as `wan_link stats` prints.
    pub fn words(&self, prefix: &str) -> Vec<String> {
        [
            ("in", self.frames_in),
            ("in_bytes", self.bytes_in),
            ("lost", self.lost),
            ("qdrop", self.queue_dropped),
            ("out", self.frames_out),
            ("out_bytes", self.bytes_out),
            ("maxq", self.max_queue_bytes),
            ("wdrop", self.write_dropped),
            ("inflight", self.in_flight()),
        ]
        .iter()
        .map(|(k, v)| format!("{prefix}{k}={v}"))
        .collect()
    }

    /// Read the words of [`Stats::words`] back (`fields` maps `<prefix>key` to its value).
    pub fn from_fields(
        fields: &std::collections::HashMap<String, String>,
        prefix: &str,
    ) -> Option<Stats> {
        let get = |k: &str| fields.get(&format!("{prefix}{k}"))?.parse::<u64>().ok();
        Some(Stats {
            frames_in: get("in")?,
            bytes_in: get("in_bytes")?,
            lost: get("lost")?,
            queue_dropped: get("qdrop")?,
            frames_out: get("out")?,
            bytes_out: get("out_bytes")?,
            max_queue_bytes: get("maxq")?,
            write_dropped: get("wdrop")?,
        })
    }
}

/// Whether an Ethernet frame carries IPv4 or IPv6 (the frames loss applies to).
pub fn is_ip_frame(frame: &[u8]) -> bool {
    matches!(frame.get(12..14), Some([0x08, 0x00]) | Some([0x86, 0xdd]))
}

/// One direction of an emulated link (see the module documentation for the model).
#[derive(Debug)]
pub struct Direction {
    imp: Impairment,
    loss_rng: StdRng,
    jitter_rng: StdRng,
    /// When the serializer is free again.
    busy_until: Option<Instant>,
    /// Frames still being serialized: (depart, len), oldest first.
    serializing: VecDeque<(Instant, usize)>,
    backlog: usize,
    last_release: Option<Instant>,
    /// Frames in the delay line, earliest release (then arrival order) first.
    line: BinaryHeap<Reverse<(Instant, u64, Vec<u8>)>>,
    seq: u64,
    stats: Stats,
}

impl Direction {
    /// An empty direction with these impairments.
    pub fn new(imp: Impairment) -> Direction {
        Direction {
            loss_rng: StdRng::seed_from_u64(imp.seed),
            // Its own stream, so the loss sequence does not depend on the jitter setting.
            jitter_rng: StdRng::seed_from_u64(imp.seed ^ 0x9e37_79b9_7f4a_7c15),
            imp,
            busy_until: None,
            serializing: VecDeque::new(),
            backlog: 0,
            last_release: None,
            line: BinaryHeap::new(),
            seq: 0,
            stats: Stats::default(),
        }
    }

    /// The current impairments.
    pub fn impairment(&self) -> &Impairment {
        &self.imp
    }

    /// Change the impairments from now on; frames already accepted keep their release times. A
    /// new seed restarts the random streams.
    pub fn set_impairment(&mut self, imp: Impairment) {
        if imp.seed != self.imp.seed {
            self.loss_rng = StdRng::seed_from_u64(imp.seed);
            self.jitter_rng = StdRng::seed_from_u64(imp.seed ^ 0x9e37_79b9_7f4a_7c15);
        }
        self.imp = imp;
    }

    /// The counters so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Count a released frame the caller could not deliver (e.g. a full TAP).
    pub fn count_write_drop(&mut self) {
        self.stats.write_dropped += 1;
    }

    /// Put a frame in at `now`.
    pub fn push(&mut self, now: Instant, frame: Vec<u8>) -> Verdict {
        let len = frame.len();
        self.stats.frames_in += 1;
        self.stats.bytes_in += len as u64;

        if self.imp.loss > 0.0
            && is_ip_frame(&frame)
            && self.loss_rng.random_bool(self.imp.loss.min(1.0))
        {
            self.stats.lost += 1;
            return Verdict::Lost;
        }

        // Bytes still waiting for (or in) serialization at `now`.
        while let Some(&(depart, l)) = self.serializing.front() {
            if depart > now {
                break;
            }
            self.serializing.pop_front();
            self.backlog -= l;
        }
        if self.backlog + len > self.imp.queue_bytes {
            self.stats.queue_dropped += 1;
            return Verdict::QueueFull;
        }

        let start = self.busy_until.map_or(now, |b| b.max(now));
        let depart = if self.imp.rate_bps == 0 {
            now
        } else {
            let ns = (len as u128 * 8 * 1_000_000_000).div_ceil(self.imp.rate_bps as u128);
            start + Duration::from_nanos(ns as u64)
        };
        self.busy_until = Some(depart);
        if depart > now {
            self.serializing.push_back((depart, len));
            self.backlog += len;
        }
        self.stats.max_queue_bytes = self
            .stats
            .max_queue_bytes
            .max((self.backlog.max(len)) as u64);

        let mut release = depart + self.imp.delay;
        if !self.imp.jitter.is_zero() {
            let j = self.imp.jitter.as_nanos() as i64;
            let offset = self.jitter_rng.random_range(-j..=j);
            release = if offset >= 0 {
                release + Duration::from_nanos(offset as u64)
            } else {
                // Never before the frame has departed.
                release
                    .checked_sub(Duration::from_nanos(offset.unsigned_abs()))
                    .unwrap_or(depart)
                    .max(depart)
            };
        }
        if !self.imp.reorder {
            if let Some(last) = self.last_release {
                release = release.max(last);
            }
        }
        self.last_release = Some(self.last_release.map_or(release, |l| l.max(release)));
        self.seq += 1;
        self.line.push(Reverse((release, self.seq, frame)));
        Verdict::Queued { release }
    }

    /// The next frame due at `now`, if any.
    pub fn poll(&mut self, now: Instant) -> Option<Vec<u8>> {
        if self.next_deadline()? > now {
            return None;
        }
        let Reverse((_, _, frame)) = self.line.pop()?;
        self.stats.frames_out += 1;
        self.stats.bytes_out += frame.len() as u64;
        Some(frame)
    }

    /// When the next frame is due (`None`: nothing in flight).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.line.peek().map(|Reverse((t, _, _))| *t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// An IPv4 Ethernet frame of `len` bytes, tagged with `tag` in its payload.
    fn ip_frame(len: usize, tag: u32) -> Vec<u8> {
        let mut f = vec![0u8; len];
        f[12] = 0x08;
        f[13] = 0x00;
        f[20..24].copy_from_slice(&tag.to_be_bytes());
        f
    }

    fn arp_frame() -> Vec<u8> {
        let mut f = vec![0u8; 60];
        f[12] = 0x08;
        f[13] = 0x06;
        f
    }

    fn tag(f: &[u8]) -> u32 {
        u32::from_be_bytes(f[20..24].try_into().unwrap())
    }

    /// Every frame released up to `until`, polling at each deadline: (release time, tag).
    fn drain(d: &mut Direction, until: Instant) -> Vec<(Instant, u32)> {
        let mut out = Vec::new();
        while let Some(t) = d.next_deadline() {
            if t > until {
                break;
            }
            assert!(d.poll(t - Duration::from_nanos(1)).is_none());
            let f = d.poll(t).expect("due at its deadline");
            out.push((t, tag(&f)));
        }
        out
    }

    #[test]
    fn delay_and_rate_give_exact_release_times() {
        let t0 = Instant::now();
        // 8 Mbit/s: a 1000-byte frame takes exactly 1 ms to serialize.
        let mut d = Direction::new(Impairment {
            delay: 20 * MS,
            rate_bps: 8_000_000,
            queue_bytes: 10_000,
            ..Impairment::default()
        });
        let mut releases = Vec::new();
        for i in 0..5 {
            match d.push(t0, ip_frame(1000, i)) {
                Verdict::Queued { release } => releases.push(release - t0),
                v => panic!("frame {i}: {v:?}"),
            }
        }
        assert_eq!(
            releases,
            (1..=5).map(|k| 20 * MS + k * MS).collect::<Vec<_>>()
        );
        // A frame arriving after the queue has drained starts serializing when it arrives.
        match d.push(t0 + 100 * MS, ip_frame(500, 5)) {
            Verdict::Queued { release } => assert_eq!(
                release - t0,
                100 * MS + Duration::from_micros(500) + 20 * MS
            ),
            v => panic!("{v:?}"),
        }
        assert!(d.poll(t0 + 20 * MS).is_none(), "nothing before its time");
        let out = drain(&mut d, t0 + Duration::from_secs(1));
        assert_eq!(
            out.iter().map(|o| o.1).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4, 5]
        );
        assert_eq!(out[0].0 - t0, 21 * MS);
        assert_eq!(d.next_deadline(), None);
        let s = d.stats();
        assert_eq!(
            (s.frames_in, s.frames_out, s.lost, s.queue_dropped),
            (6, 6, 0, 0)
        );
        assert_eq!(s.bytes_in, 5500);
        assert_eq!(s.bytes_out, 5500);
        assert_eq!(s.max_queue_bytes, 5000);
        assert_eq!(s.in_flight(), 0);
    }

    #[test]
    fn unlimited_rate_is_pure_delay() {
        let t0 = Instant::now();
        let mut d = Direction::new(Impairment {
            delay: 7 * MS,
            ..Impairment::default()
        });
        for i in 0..3 {
            assert_eq!(
                d.push(t0 + i * MS, ip_frame(1500, i)),
                Verdict::Queued {
                    release: t0 + i * MS + 7 * MS
                }
            );
        }
        assert_eq!(d.stats().max_queue_bytes, 1500);
    }

    #[test]
    fn jitter_keeps_order_unless_reorder() {
        let t0 = Instant::now();
        let imp = Impairment {
            delay: 25 * MS,
            jitter: 5 * MS,
            seed: 42,
            ..Impairment::default()
        };
        let mut d = Direction::new(imp.clone());
        for i in 0..2000u32 {
            let now = t0 + Duration::from_micros(100) * i;
            match d.push(now, ip_frame(200, i)) {
                Verdict::Queued { release } => {
                    assert!(release >= now + 20 * MS, "frame {i} early");
                    assert!(release <= now + 30 * MS + 5 * MS, "frame {i} late");
                }
                v => panic!("{v:?}"),
            }
        }
        let out = drain(&mut d, t0 + Duration::from_secs(10));
        assert_eq!(out.len(), 2000);
        assert!(out.windows(2).all(|w| w[0].1 < w[1].1), "order kept");

        // With reorder allowed, the same jitter reorders 0.1 ms-spaced frames.
        let mut d = Direction::new(Impairment {
            reorder: true,
            ..imp
        });
        let mut spread = (Duration::MAX, Duration::ZERO);
        for i in 0..2000u32 {
            let now = t0 + Duration::from_micros(100) * i;
            if let Verdict::Queued { release } = d.push(now, ip_frame(200, i)) {
                spread = (spread.0.min(release - now), spread.1.max(release - now));
            }
        }
        let out = drain(&mut d, t0 + Duration::from_secs(10));
        assert_eq!(out.len(), 2000);
        assert!(
            out.windows(2).all(|w| w[0].0 <= w[1].0),
            "released in time order"
        );
        assert!(out.windows(2).any(|w| w[0].1 > w[1].1), "some reordered");
        assert!(spread.0 >= 20 * MS && spread.1 <= 30 * MS, "{spread:?}");
        assert!(
            spread.0 < 21 * MS && spread.1 > 29 * MS,
            "jitter spans ±5 ms: {spread:?}"
        );
    }

    #[test]
    fn tail_drop_at_queue_bytes() {
        let t0 = Instant::now();
        // 8 Mbit/s, room for exactly four 1000-byte frames.
        let mut d = Direction::new(Impairment {
            rate_bps: 8_000_000,
            queue_bytes: 4000,
            ..Impairment::default()
        });
        let verdicts: Vec<Verdict> = (0..6).map(|i| d.push(t0, ip_frame(1000, i))).collect();
        assert!(verdicts[..4]
            .iter()
            .all(|v| matches!(v, Verdict::Queued { .. })));
        assert_eq!(verdicts[4..], [Verdict::QueueFull, Verdict::QueueFull]);
        // After 1 ms the first frame has left the serializer: room for one more, not two.
        let now = t0 + MS;
        assert_eq!(
            d.push(now, ip_frame(1000, 6)),
            Verdict::Queued {
                release: t0 + 5 * MS
            }
        );
        assert_eq!(d.push(now, ip_frame(1000, 7)), Verdict::QueueFull);
        // ARP is dropped as well when the queue is full (loss spares it, the queue does not).
        assert_eq!(d.push(now, arp_frame()), Verdict::QueueFull);
        let s = d.stats();
        assert_eq!(
            (s.frames_in, s.queue_dropped, s.max_queue_bytes),
            (9, 4, 4000)
        );
        let out = drain(&mut d, t0 + Duration::from_secs(1));
        assert_eq!(out.iter().map(|o| o.1).collect::<Vec<_>>(), [0, 1, 2, 3, 6]);
        let s = d.stats();
        assert_eq!(s.frames_out + s.queue_dropped + s.lost, s.frames_in);
    }

    #[test]
    fn seeded_loss_replays_and_spares_arp() {
        let run = |seed: u64| -> Vec<bool> {
            let t0 = Instant::now();
            let mut d = Direction::new(Impairment {
                loss: 0.1,
                seed,
                ..Impairment::default()
            });
            let mut lost = Vec::new();
            for i in 0..10_000 {
                // ARP in between must neither be lost nor shift the sequence.
                assert!(matches!(d.push(t0, arp_frame()), Verdict::Queued { .. }));
                lost.push(d.push(t0, ip_frame(100, i)) == Verdict::Lost);
            }
            let s = d.stats();
            assert_eq!(s.lost, lost.iter().filter(|&&l| l).count() as u64);
            assert_eq!(s.frames_in, 20_000);
            lost
        };
        let a = run(7);
        assert_eq!(a, run(7), "same seed, same losses");
        assert_ne!(a, run(8), "another seed, other losses");
        let n = a.iter().filter(|&&l| l).count() as f64;
        // Binomial(10000, 0.1): mean 1000, σ 30.
        assert!((n - 1000.0).abs() < 150.0, "{n} lost");
    }

    #[test]
    fn set_parses_and_round_trips() {
        let mut imp = Impairment::default();
        for w in "delay-ms=25 jitter-ms=2.5 loss-pct=10 rate-mbit=20 queue-kib=64 reorder=1 seed=9"
            .split(' ')
        {
            let (k, v) = w.split_once('=').unwrap();
            imp.set(k, v).unwrap();
        }
        assert_eq!(imp.delay, 25 * MS);
        assert_eq!(imp.jitter, Duration::from_micros(2500));
        assert!((imp.loss - 0.1).abs() < 1e-12);
        assert_eq!((imp.rate_bps, imp.queue_bytes), (20_000_000, 65536));
        assert!(imp.reorder);
        let mut again = Impairment::default();
        for w in imp.to_words() {
            let (k, v) = w.split_once('=').unwrap();
            again.set(k, v).unwrap();
        }
        assert_eq!(again, imp);
        assert!(imp.set("loss-pct", "101").is_err());
        assert!(imp.set("delay-ms", "-1").is_err());
        assert!(imp.set("nope", "1").is_err());
    }
}
