//! Unreliable delivery on the direct path (link protocol version 2, PROTOCOL.md §7.6) and the
//! dead-path rule (§8.7), with real loss made by nft on loopback (root needed, as in CI). Each
//! test uses a UDP port range of its own, so its rules touch nothing else.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use peermesh::{ClientConfig, Event, Path, Reliability};
use peermesh_interop_tests::NftTable;
use tokio::time::Instant;

const LOSS_PORTS: (u16, u16) = (47400, 47419);
const LATENCY_PORTS: (u16, u16) = (47420, 47439);
const ONE_WAY_A: (u16, u16) = (47440, 47449);
const ONE_WAY_B: (u16, u16) = (47450, 47459);
const VERSION_PORTS: (u16, u16) = (47460, 47479);

fn in_range(ports: (u16, u16)) -> impl Fn(&str) -> ClientConfig {
    move |n: &str| {
        ClientConfig::new(n)
            .with_direct_backend(common::backend())
            .with_loopback_only(true)
            .with_udp_ports(ports.0, ports.1)
    }
}

fn payload(n: u32, len: usize) -> Vec<u8> {
    let mut v = vec![(n % 251) as u8; len];
    v[..4].copy_from_slice(&n.to_be_bytes());
    v
}

/// Reliable messages `0..count` from `from`, in order, each once, and at least
/// `want_unreliable` unreliable ones (each checked whole). Returns (time of the first reliable
/// one, unreliable received).
async fn expect_messages(
    events: &mut peermesh::Events,
    from: peermesh::PeerId,
    count: u32,
    (unreliable_len, want_unreliable): (usize, u32),
    secs: u64,
) -> (Instant, u32) {
    let mut next = 0;
    let mut first = None;
    let mut unreliable = 0;
    while next < count || unreliable < want_unreliable {
        let (data, rel) = next_message(events, from, secs).await;
        match rel {
            Reliability::Reliable => {
                let n = u32::from_be_bytes(data[..4].try_into().unwrap());
                assert_eq!(n, next, "reliable message lost, duplicated or reordered");
                first.get_or_insert_with(Instant::now);
                next += 1;
            }
            Reliability::Unreliable => {
                assert_eq!(data.len(), unreliable_len, "partial unreliable message");
                let n = u32::from_be_bytes(data[..4].try_into().unwrap());
                assert_eq!(&data[..], &payload(n, unreliable_len)[..], "corrupt");
                unreliable += 1;
            }
        }
    }
    (first.unwrap_or_else(Instant::now), unreliable)
}

/// Unreliable messages of `len` bytes still queued in `events` (arrived after the reliable
/// ones), each checked whole.
async fn late_unreliable(events: &mut peermesh::Events, len: usize) -> u32 {
    let mut n = 0;
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(50), events.recv()).await {
        if let Event::Message {
            data,
            reliability: Reliability::Unreliable,
            ..
        } = e
        {
            assert_eq!(data.len(), len, "partial unreliable message");
            n += 1;
        }
    }
    n
}

/// The measurement, both ways at once: 300 max-size unreliable messages each way under
/// 5 % UDP loss, then reliable ones. Lost parts must not eat either receiver's SCTP window:
/// every reliable message arrives, in order, without the link ever leaving the direct path, the
/// receivers discard the incomplete messages, and the link is still direct and working once the
/// loss is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_unreliable_parts_never_stall_reliable_delivery() {
    init_log();
    let server = server().await;
    let DirectPair {
        a,
        mut ae,
        b,
        mut be,
        ..
    } = direct_pair(&server, |n| {
        // The dead-path rule gets more room than its 3 s default here: a reliable chunk lost
        // twice keeps a webrtc-sctp association silent for its 1 s minimum RTO and then 2 s
        // (seen in CI: once 3.19 s, once a fall-back at 3 s), and the rule then rightly falls
        // back. This test is about the window never stalling, which no interval would mend;
        // `one_way_dead_path_falls_back_within_the_interval_and_returns` tests the rule.
        in_range(LOSS_PORTS)(n).with_dead_path_timeout(Duration::from_secs(8))
    })
    .await;
    let (ia, ib) = (a.peer_id(), b.peer_id());
    const N: u32 = 300;
    const LEN: usize = peermesh::protocol::MAX_UNRELIABLE_PAYLOAD;
    let loss = NftTable::udp_loss("unrel", LOSS_PORTS, 5);
    let mut sent_reliable_at = Vec::new();
    let mut senders = Vec::new();
    for (c, to) in [(a.clone(), ib), (b.clone(), ia)] {
        senders.push(tokio::spawn(async move {
            // Paced (16 KiB per 2 ms each way), so that most of them reach the wire rather
            // than being dropped at the sender as congestion.
            for n in 0..N {
                c.send(to, payload(n, LEN), Reliability::Unreliable)
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let t = Instant::now();
            for n in 0..50u32 {
                c.send(to, payload(n, 100), Reliability::Reliable)
                    .await
                    .unwrap();
            }
            t
        }));
    }
    for s in senders {
        sent_reliable_at.push(s.await.unwrap());
    }
    let ((first_b, unrel_b), (first_a, unrel_a)) = tokio::join!(
        expect_messages(&mut be, ia, 50, (LEN, 0), 30),
        expect_messages(&mut ae, ib, 50, (LEN, 0), 30)
    );
    let wait_b = first_b.saturating_duration_since(sent_reliable_at[0]);
    let wait_a = first_a.saturating_duration_since(sent_reliable_at[1]);
    let (sa, sb) = (a.link_stats(ib).unwrap(), b.link_stats(ia).unwrap());
    eprintln!(
        "under 5 % loss: unreliable delivered {unrel_b}/{N} to b ({} dropped at a as \
         congestion), {unrel_a}/{N} to a ({} dropped at b); first reliable after {wait_b:?} / \
         {wait_a:?}",
        sa.unreliable_dropped, sb.unreliable_dropped
    );
    // Nothing stalled: the link never left the direct path (no dead-path reset), and the first
    // reliable message took only SCTP's own loss recovery. The browser and aiortc senders'
    // tests hold that to 2 s; webrtc-sctp (this sender) retransmits no sooner than its 1 s
    // minimum RTO, doubled after a timeout while the loss goes on (measured here: 44 ms to
    // 2.08 s; once in CI 3.19 s: the first retransmission lost too, 1 in 20 at 5 % loss, makes
    // it 1 s + 2 s and more), so 4 s — a stall would be the whole test.
    assert_eq!(
        (sa.path_changes, sb.path_changes),
        (1, 1),
        "a path change under loss: {sa:?} {sb:?}"
    );
    for (to, wait) in [("b", wait_b), ("a", wait_a)] {
        assert!(
            wait < Duration::from_secs(4),
            "first reliable to {to} after {wait:?}"
        );
    }
    assert!(
        unrel_b < N && unrel_a < N,
        "5 % loss lost no unreliable part?"
    );
    // Every unreliable message is accounted for: delivered whole, dropped at the sender as
    // congestion, or (some part lost) discarded by the receiver after 1 s — none held, none
    // delivered twice or in part.
    // (Counted when the receivers' expiry timers have run: 1 s after a message's first part,
    // later on a loaded machine, so the accounts are read until they add up, for up to 10 s.)
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (mut late_b, mut late_a) = (0, 0);
    let settle_by = Instant::now() + Duration::from_secs(10);
    let (to_b, to_a) = loop {
        late_b += late_unreliable(&mut be, LEN).await;
        late_a += late_unreliable(&mut ae, LEN).await;
        let (sa, sb) = (a.link_stats(ib).unwrap(), b.link_stats(ia).unwrap());
        let to_b = (
            unrel_b + late_b,
            sa.unreliable_dropped,
            sb.unreliable_incomplete,
        );
        let to_a = (
            unrel_a + late_a,
            sb.unreliable_dropped,
            sa.unreliable_incomplete,
        );
        let settled = [to_b, to_a]
            .iter()
            .all(|&(delivered, dropped, incomplete)| {
                delivered as u64 + dropped + incomplete == N as u64
            });
        if settled || Instant::now() > settle_by {
            break (to_b, to_a);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "(delivered, dropped at the sender, discarded incomplete): to b {to_b:?}, to a {to_a:?}"
    );
    for (delivered, dropped, incomplete) in [to_b, to_a] {
        assert!(incomplete > 0, "no incomplete message discarded under loss");
        assert_eq!(delivered as u64 + dropped + incomplete, N as u64);
    }
    drop(loss);

    // The link still works, directly, both ways.
    assert!(matches!(a.path(ib).unwrap(), Path::Direct { .. }));
    let stats_before = a.link_stats(ib).unwrap();
    for n in 50..60u32 {
        a.send(ib, payload(n, 100), Reliability::Reliable)
            .await
            .unwrap();
        b.send(ia, payload(n, 100), Reliability::Reliable)
            .await
            .unwrap();
    }
    for (events, from) in [(&mut be, ia), (&mut ae, ib)] {
        for n in 50..60u32 {
            let (data, rel) = next_message(events, from, 10).await;
            assert_eq!(rel, Reliability::Reliable);
            assert_eq!(u32::from_be_bytes(data[..4].try_into().unwrap()), n);
        }
    }
    let stats = a.link_stats(ib).unwrap();
    assert!(
        stats.sent_direct > stats_before.sent_direct,
        "not sent directly after the loss: {stats:?}"
    );
    // Unreliable messages flow again too (nothing is stuck in a send queue), whole.
    for n in 0..10u32 {
        a.send(ib, payload(n, LEN), Reliability::Unreliable)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    a.send(ib, payload(0, 100), Reliability::Reliable)
        .await
        .unwrap();
    let (_, after) = expect_messages(&mut be, ia, 1, (LEN, 10), 10).await;
    assert_eq!(after, 10);
}

/// Unreliable messages on the direct path are really unreliable: under 5 % loss some are lost,
/// and a lost one does not hold up later ones (no retransmission, no head-of-line blocking), so
/// one-way latency stays close to the loss-free run's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreliable_messages_are_not_retransmitted_or_held_up() {
    init_log();
    let server = server().await;
    let DirectPair { a, b, mut be, .. } = direct_pair(&server, in_range(LATENCY_PORTS)).await;
    let (ia, ib) = (a.peer_id(), b.peer_id());

    async fn run(
        a: &peermesh::Client,
        be: &mut peermesh::Events,
        ia: peermesh::PeerId,
        ib: peermesh::PeerId,
        base: u32,
    ) -> (u32, Duration, Duration) {
        const N: u32 = 1000;
        let mut sent_at = HashMap::new();
        let mut latencies = Vec::new();
        let start = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(2));
        let mut n = 0;
        // Send every 2 ms and collect arrivals as they come.
        while n < N || start.elapsed() < Duration::from_millis(2 * N as u64 + 1500) {
            tokio::select! {
                _ = tick.tick(), if n < N => {
                    sent_at.insert(base + n, Instant::now());
                    a.try_send(ib, payload(base + n, 200), Reliability::Unreliable).unwrap();
                    n += 1;
                }
                e = be.recv() => match e {
                    Some(Event::Message { from, data, reliability: Reliability::Unreliable, .. })
                        if from == ia =>
                    {
                        let k = u32::from_be_bytes(data[..4].try_into().unwrap());
                        if let Some(t) = sent_at.remove(&k) {
                            latencies.push(t.elapsed());
                        }
                    }
                    Some(_) => {}
                    None => panic!("events ended"),
                },
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        latencies.sort();
        let p =
            |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
        (latencies.len() as u32, p(0.5), p(0.99))
    }

    let (clean_n, clean_p50, clean_p99) = run(&a, &mut be, ia, ib, 0).await;
    let loss = NftTable::udp_loss("lat", LATENCY_PORTS, 5);
    let (lossy_n, lossy_p50, lossy_p99) = run(&a, &mut be, ia, ib, 1_000_000).await;
    drop(loss);
    eprintln!(
        "unreliable one-way latency: no loss {clean_n}/1000 p50 {clean_p50:?} p99 {clean_p99:?}; \
         5 % loss {lossy_n}/1000 p50 {lossy_p50:?} p99 {lossy_p99:?}"
    );
    assert!(matches!(a.path(ib).unwrap(), Path::Direct { .. }));
    assert!(
        clean_n >= 990,
        "loss-free run lost {} messages",
        1000 - clean_n
    );
    assert!(
        lossy_n < 1000,
        "nothing lost under 5 % loss: retransmitted?"
    );
    // An SCTP retransmission (fast retransmit or the 1 s RTO) would add tens to hundreds of ms
    // to more than 1 % of the messages.
    assert!(
        lossy_p99 < clean_p99 + Duration::from_millis(40),
        "p99 {lossy_p99:?} under loss vs {clean_p99:?} without: lost messages hold up later ones"
    );
}

/// One direction of the direct path dies for everything but STUN, so ICE consent still passes
/// both ways and ICE stays connected: the dead-path rule alone must notice (no frame for 3 s),
/// fall back without losing, duplicating or reordering a reliable message, and the link goes
/// direct again once the path is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_way_dead_path_falls_back_within_the_interval_and_returns() {
    init_log();
    let server = server().await;
    let cfg = |n: &str| {
        let ports = if n == "a" { ONE_WAY_A } else { ONE_WAY_B };
        ClientConfig::new(n)
            .with_direct_backend(common::backend())
            .with_loopback_only(true)
            .with_udp_ports(ports.0, ports.1)
    };
    let DirectPair {
        a,
        mut ae,
        b,
        mut be,
        ..
    } = direct_pair(&server, cfg).await;
    let (ia, ib) = (a.peer_id(), b.peer_id());

    // Both ways: numbered reliable messages every 5 ms, bounded in count.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut senders = Vec::new();
    for (c, to) in [(a.clone(), ib), (b.clone(), ia)] {
        let stop = stop.clone();
        senders.push(tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 10_000 {
                c.send(to, payload(n, 64), Reliability::Reliable)
                    .await
                    .unwrap();
                n += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            n
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cut = NftTable::one_way_non_stun("oneway", ONE_WAY_B, ONE_WAY_A);
    let t = Instant::now();
    let a_fell = wait_path(&a, ib, false, 10).await;
    let b_fell = wait_path(&b, ia, false, 10).await;
    eprintln!("one-way cut: a on the server path after {a_fell:?}, b after {b_fell:?}");
    assert!(
        a_fell < Duration::from_millis(4500),
        "a noticed the silent direct path only after {a_fell:?}"
    );
    tokio::time::sleep(
        Duration::from_secs(2).saturating_sub(t.elapsed().min(Duration::from_secs(2))),
    )
    .await;
    drop(cut);
    let back = wait_path(&a, ib, true, 25).await;
    wait_path(&b, ia, true, 25).await;
    eprintln!("direct again {back:?} after the restore");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent_a = senders.remove(0).await.unwrap();
    let sent_b = senders.remove(0).await.unwrap();
    let (_, _) = expect_messages(&mut be, ia, sent_a, (0, 0), 20).await;
    let (_, _) = expect_messages(&mut ae, ib, sent_b, (0, 0), 20).await;
    let failed = a.link_stats(ib).unwrap();
    assert!(failed.path_changes >= 3, "{failed:?}");
}

/// A version 2 client and a version 1 peer (no in-band channel, no parts) still exchange
/// max-size unreliable and reliable messages over the direct path, both ways; two version 2
/// clients do the same through UNRELIABLE_PART frames.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_versions_1_and_2_interoperate() {
    init_log();
    let server = server().await;
    for b_version in [1, 2] {
        let cfg = move |n: &str| {
            let c = ClientConfig::new(n)
                .with_direct_backend(common::backend())
                .with_loopback_only(true)
                .with_udp_ports(VERSION_PORTS.0, VERSION_PORTS.1);
            if n == "b" {
                c.with_link_version(b_version)
            } else {
                c
            }
        };
        let DirectPair {
            a,
            mut ae,
            b,
            mut be,
            ..
        } = direct_pair(&server, cfg).await;
        let (ia, ib) = (a.peer_id(), b.peer_id());
        const LEN: usize = peermesh::protocol::MAX_UNRELIABLE_PAYLOAD;
        // Paced: a burst beyond 256 KiB queued would be dropped at the sender (congestion).
        for n in 0..20u32 {
            a.send(ib, payload(n, LEN), Reliability::Unreliable)
                .await
                .unwrap();
            b.send(ia, payload(n, LEN), Reliability::Unreliable)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for n in 0..5u32 {
            a.send(ib, payload(n, 3000), Reliability::Reliable)
                .await
                .unwrap();
            b.send(ia, payload(n, 3000), Reliability::Reliable)
                .await
                .unwrap();
        }
        let (_, to_b) = expect_messages(&mut be, ia, 5, (LEN, 20), 10).await;
        let (_, to_a) = expect_messages(&mut ae, ib, 5, (LEN, 20), 10).await;
        eprintln!("b version {b_version}: unreliable {to_b}/20 to b, {to_a}/20 to a");
        // No loss on loopback: every unreliable message arrives, whole.
        assert_eq!((to_b, to_a), (20, 20), "b version {b_version}");
        assert!(matches!(a.path(ib).unwrap(), Path::Direct { .. }));
        a.close().await;
        b.close().await;
    }
}
