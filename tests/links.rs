//! Links between real clients through the real server on loopback.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use peermesh::{CandidateType, ClientConfig, DirectPolicy, Error, Event, Path, Reliability};

const HOST_HOST: Path = Path::Direct {
    local: CandidateType::Host,
    remote: CandidateType::Host,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clients_every_pair_goes_direct_and_exchanges_both_kinds() {
    init_log();
    let server = server().await;
    let mut clients = Vec::new();
    for name in ["alice", "bob", "carol"] {
        let (c, e) = client(&server, name).await;
        c.join("lobby").await.unwrap();
        clients.push((c, e));
    }
    let ids: Vec<_> = clients.iter().map(|(c, _)| c.peer_id()).collect();

    // Every client sees both others go direct host/host.
    for (i, (c, events)) in clients.iter_mut().enumerate() {
        let mut waiting: Vec<_> = ids.iter().copied().filter(|&p| p != ids[i]).collect();
        while !waiting.is_empty() {
            let ev = wait_for(events, 10, |e| {
                matches!(
                    e,
                    Event::PathChanged {
                        path: Path::Direct { .. },
                        ..
                    }
                )
            })
            .await;
            if let Event::PathChanged { peer, path } = ev {
                assert_eq!(path, HOST_HOST);
                waiting.retain(|&p| p != peer);
            }
        }
        for &p in &ids {
            if p != ids[i] {
                assert_eq!(c.path(p).unwrap(), HOST_HOST);
            }
        }
    }

    // Every ordered pair: 5 reliable and 5 unreliable messages.
    for i in 0..3 {
        for j in 0..3 {
            if i == j {
                continue;
            }
            let to = ids[j];
            for k in 0..5 {
                clients[i]
                    .0
                    .send(to, format!("r{i}{j}{k}"), Reliability::Reliable)
                    .await
                    .unwrap();
                clients[i]
                    .0
                    .send(to, format!("u{i}{j}{k}"), Reliability::Unreliable)
                    .await
                    .unwrap();
            }
            let mut reliable = Vec::new();
            let mut unreliable = Vec::new();
            while reliable.len() < 5 || unreliable.len() < 5 {
                let (data, rel) = next_message(&mut clients[j].1, ids[i], 5).await;
                let text = String::from_utf8(data.to_vec()).unwrap();
                match rel {
                    Reliability::Reliable => reliable.push(text),
                    Reliability::Unreliable => unreliable.push(text),
                }
            }
            let want = |p: &str| (0..5).map(|k| format!("{p}{i}{j}{k}")).collect::<Vec<_>>();
            assert_eq!(reliable, want("r"), "reliable in order");
            unreliable.sort();
            assert_eq!(unreliable, want("u"));
        }
    }
    // Each link measured an RTT on its direct path.
    for (i, (c, _)) in clients.iter().enumerate() {
        for (j, &p) in ids.iter().enumerate() {
            if i != j {
                let mut rtt = None;
                for _ in 0..30 {
                    rtt = c.rtt(p).unwrap();
                    if rtt.is_some() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let rtt = rtt.expect("no RTT measured");
                assert!(rtt < Duration::from_secs(1), "{rtt:?}");
            }
        }
    }
    for (c, _) in &clients {
        c.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_reliable_messages_survive_the_switch_to_direct() {
    const N: u32 = 10_000;
    let server = server().await;
    let (a, mut ae) = client(&server, "sender").await;
    let (b, mut be) = client(&server, "receiver").await;
    a.join("g").await.unwrap();
    b.join("g").await.unwrap();
    wait_joined(&mut ae, b.peer_id()).await;
    let to = b.peer_id();

    // Send from the moment of join; slow down only while the link is still on the server path,
    // so the stream is guaranteed to straddle the switch.
    let sender = a.clone();
    let send_task = tokio::spawn(async move {
        let mut sent_before_direct = None;
        for i in 0..N {
            sender
                .send(to, i.to_be_bytes().to_vec(), Reliability::Reliable)
                .await
                .unwrap();
            let direct = matches!(sender.path(to).unwrap(), Path::Direct { .. });
            if direct && sent_before_direct.is_none() {
                sent_before_direct = Some(i);
            }
            if !direct && i % 10 == 9 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        sent_before_direct
    });

    let from = a.peer_id();
    for i in 0..N {
        let (data, rel) = next_message(&mut be, from, 20).await;
        assert_eq!(rel, Reliability::Reliable);
        assert_eq!(
            data.as_ref(),
            i.to_be_bytes(),
            "message {i} out of order or corrupt"
        );
    }
    let switched_at = send_task.await.unwrap().expect("link never went direct");
    assert!(
        switched_at > 0 && switched_at < N,
        "switch at {switched_at}"
    );

    // Both paths really carried part of the stream, and nothing extra was delivered.
    let stats = b.link_stats(from).unwrap();
    assert!(stats.recv_server > 0, "{stats:?}");
    assert!(stats.recv_direct > 0, "{stats:?}");
    let sstats = a.link_stats(to).unwrap();
    assert!(
        sstats.sent_server > 0 && sstats.sent_direct > 0,
        "{sstats:?}"
    );
    let extra =
        tokio::time::timeout(Duration::from_millis(300), next_message(&mut be, from, 1)).await;
    assert!(extra.is_err(), "duplicate delivered");
}

fn mib() -> Bytes {
    (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect::<Vec<u8>>()
        .into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mib_message_on_server_path_and_on_direct_path() {
    let server = server().await;
    let big = mib();

    // Server path only.
    let (a, mut ae) = client_with(&server, ClientConfig::new("a").with_direct(false)).await;
    let (b, mut be) = client_with(&server, ClientConfig::new("b").with_direct(false)).await;
    a.join("relay").await.unwrap();
    b.join("relay").await.unwrap();
    wait_joined(&mut ae, b.peer_id()).await;
    a.send(b.peer_id(), big.clone(), Reliability::Reliable)
        .await
        .unwrap();
    let (got, _) = next_message(&mut be, a.peer_id(), 10).await;
    assert_eq!(a.path(b.peer_id()).unwrap(), Path::Server);
    assert!(got == big, "1 MiB over the server path corrupted");

    // Direct path.
    let (c, mut ce) = client(&server, "c").await;
    let (d, mut de) = client(&server, "d").await;
    c.join("direct").await.unwrap();
    d.join("direct").await.unwrap();
    wait_direct(&mut ce, d.peer_id()).await;
    let before = d.link_stats(c.peer_id()).unwrap();
    c.send(d.peer_id(), big.clone(), Reliability::Reliable)
        .await
        .unwrap();
    let (got, _) = next_message(&mut de, c.peer_id(), 10).await;
    assert!(got == big, "1 MiB over the direct path corrupted");
    let after = d.link_stats(c.peer_id()).unwrap();
    assert_eq!(
        after.recv_server, before.recv_server,
        "went over the server"
    );
    assert_eq!(
        after.recv_direct - before.recv_direct,
        64,
        "64 fragments of 16 KiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_left_after_clean_close_and_after_silent_drop() {
    let server = server_with(peermesh_server::Config {
        heartbeat_timeout: Duration::from_secs(1),
        ..Default::default()
    })
    .await;
    let (watcher, mut we) = client(&server, "watcher").await;
    watcher.join("room").await.unwrap();

    // Clean close: seen within 2 s.
    let (leaver, _le) = client(&server, "leaver").await;
    leaver.join("room").await.unwrap();
    wait_joined(&mut we, leaver.peer_id()).await;
    let t = tokio::time::Instant::now();
    leaver.close().await;
    eprintln!("close took {:?}", t.elapsed());
    let ev = wait_for(&mut we, 2, |e| matches!(e, Event::MemberLeft { .. })).await;
    assert!(matches!(ev, Event::MemberLeft { ref name, .. } if name == "leaver"));
    assert!(t.elapsed() < Duration::from_secs(2));

    // A raw client that goes silent without closing its socket.
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let (mut ws, _) = tokio_tungstenite::connect_async(server.ws_url())
        .await
        .unwrap();
    ws.send(Message::Text(
        r#"{"type":"hello","version":1,"name":"ghost"}"#.into(),
    ))
    .await
    .unwrap();
    ws.send(Message::Text(r#"{"type":"join","group":"room"}"#.into()))
        .await
        .unwrap();
    let joined = wait_for(&mut we, 5, |e| matches!(e, Event::MemberJoined { .. })).await;
    let Event::MemberJoined { peer: ghost, .. } = joined else {
        unreachable!()
    };
    let t = tokio::time::Instant::now();
    let ev = wait_for(&mut we, 4, |e| matches!(e, Event::MemberLeft { .. })).await;
    assert!(matches!(ev, Event::MemberLeft { peer, .. } if peer == ghost));
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(700),
        "dropped too early: {waited:?}"
    );
    drop(ws);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_outside_a_group_cannot_reach_each_other() {
    let server = server().await;
    let (a, _ae) = client(&server, "a").await;
    let (b, _be) = client(&server, "b").await;
    a.join("one").await.unwrap();
    b.join("two").await.unwrap();
    let err = a
        .send(b.peer_id(), "hi", Reliability::Reliable)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::UnknownPeer(p) if p == b.peer_id()),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_client_input_gets_typed_errors() {
    let server = server().await;
    let err = peermesh::Client::connect("http://127.0.0.1:1/ws", ClientConfig::new("x"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidUrl(_)), "{err:?}");
    let err = peermesh::Client::connect(&server.ws_url(), ClientConfig::new(""))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidName(_)), "{err:?}");

    let (a, mut _ae) = client(&server, "a").await;
    let (b, mut be) = client(&server, "b").await;
    assert!(matches!(
        a.join("bad name!").await,
        Err(Error::InvalidGroup(_))
    ));
    assert!(matches!(a.leave("nowhere").await, Err(Error::NotMember(_))));
    a.join("g").await.unwrap();
    let err = a.join("g").await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Server {
                code: peermesh::protocol::ErrorCode::AlreadyMember,
                ..
            }
        ),
        "{err:?}"
    );
    b.join("g").await.unwrap();
    wait_joined(&mut _ae, b.peer_id()).await;
    let big = vec![0u8; 16 * 1024 + 1];
    let err = a
        .send(b.peer_id(), big, Reliability::Unreliable)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::MessageTooLarge { limit: 16384, .. }),
        "{err:?}"
    );
    let err = a
        .send(b.peer_id(), vec![0u8; (8 << 20) + 1], Reliability::Reliable)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::MessageTooLarge { .. }), "{err:?}");
    // The session still works.
    a.send(b.peer_id(), "still here", Reliability::Reliable)
        .await
        .unwrap();
    let (data, _) = next_message(&mut be, a.peer_id(), 5).await;
    assert_eq!(&data[..], b"still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pair_in_two_groups_shares_one_link() {
    let server = server().await;
    let (a, mut ae) = client(&server, "a").await;
    let (b, mut be) = client(&server, "b").await;
    for g in ["one", "two"] {
        a.join(g).await.unwrap();
        b.join(g).await.unwrap();
    }
    let (ia, ib) = (a.peer_id(), b.peer_id());
    wait_direct(&mut ae, ib).await;
    // Leaving one shared group keeps the link (same path, same counters); leaving both ends it.
    a.send(ib, "1", Reliability::Reliable).await.unwrap();
    assert_eq!(&next_message(&mut be, ia, 5).await.0[..], b"1");
    let before = a.link_stats(ib).unwrap();
    a.leave("one").await.unwrap();
    wait_for(
        &mut be,
        5,
        |e| matches!(e, Event::MemberLeft { group, .. } if group == "one"),
    )
    .await;
    assert!(matches!(a.path(ib).unwrap(), Path::Direct { .. }));
    a.send(ib, "2", Reliability::Reliable).await.unwrap();
    assert_eq!(&next_message(&mut be, ia, 5).await.0[..], b"2");
    assert_eq!(
        a.link_stats(ib).unwrap().sent_direct,
        before.sent_direct + 1
    );
    assert_eq!(a.link_stats(ib).unwrap().path_changes, before.path_changes);
    b.leave("two").await.unwrap();
    wait_for(
        &mut ae,
        5,
        |e| matches!(e, Event::MemberLeft { group, .. } if group == "two"),
    )
    .await;
    assert!(matches!(
        a.send(ib, "3", Reliability::Reliable).await,
        Err(Error::UnknownPeer(_))
    ));
    assert!(matches!(a.path(ib), Err(Error::UnknownPeer(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_send_window_pushes_back_and_drains() {
    let server = server().await;
    let window = 64 * 1024;
    let (a, mut ae) = client_with(
        &server,
        ClientConfig::new("a")
            .with_direct(false)
            .with_send_window(window),
    )
    .await;
    let (b, mut be) = client_with(&server, ClientConfig::new("b").with_direct(false)).await;
    a.join("g").await.unwrap();
    b.join("g").await.unwrap();
    wait_joined(&mut ae, b.peer_id()).await;
    let ib = b.peer_id();

    // try_send fills the window well within one round trip, before any ack can come back.
    let chunk = vec![7u8; 16 * 1024];
    let mut accepted = 0;
    let err = loop {
        match a.try_send(ib, chunk.clone(), Reliability::Reliable) {
            Ok(()) => accepted += 1,
            Err(e) => break e,
        }
        assert!(accepted * chunk.len() <= window, "window not enforced");
    };
    assert!(matches!(err, Error::WouldBlock(p) if p == ib), "{err:?}");
    // Each 16 KiB fragment costs its bytes plus 64 of window.
    assert_eq!(accepted, window / (chunk.len() + 64));
    // `send` waits for room instead, and everything arrives.
    a.send(ib, chunk.clone(), Reliability::Reliable)
        .await
        .unwrap();
    a.flush().await.unwrap();
    for _ in 0..=accepted {
        let (data, _) = next_message(&mut be, a.peer_id(), 5).await;
        assert_eq!(data.len(), chunk.len());
    }
    // A message larger than the window can never fit.
    let err = a
        .send(ib, vec![0u8; window + 1], Reliability::Reliable)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::MessageTooLarge { .. }), "{err:?}");
}

/// A peer with direct paths off (`with_direct(false)`: policy `none`, said in its `hello`) makes
/// the pair `none`: the server tells the joiner, which never tries a direct path (so it has no
/// failure to report), and messages flow on the server path. (A peer that declines offers
/// without saying so in `hello`: tests/policy.rs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_direct_paths_makes_the_pair_server_only() {
    init_log();
    let server = server().await;
    let (bob, mut be) = client_with(&server, ClientConfig::new("bob").with_direct(false)).await;
    bob.join("g").await.unwrap();
    // The joiner is the initiator: with any other policy, alice would offer.
    let (alice, mut ae) = client(&server, "alice").await;
    alice.join("g").await.unwrap();
    let ib = bob.peer_id();
    match wait_for(
        &mut ae,
        5,
        |e| matches!(e, Event::MemberJoined { peer, .. } if *peer == ib),
    )
    .await
    {
        Event::MemberJoined { direct, .. } => assert_eq!(direct, DirectPolicy::None),
        _ => unreachable!(),
    }
    alice
        .send(ib, "still here", Reliability::Reliable)
        .await
        .unwrap();
    let (got, _) = next_message(&mut be, alice.peer_id(), 10).await;
    assert_eq!(&got[..], b"still here");
    assert_eq!(alice.path(ib).unwrap(), Path::Server);
    // Nothing was tried, so nothing failed and the path never changed.
    let event = tokio::time::timeout(Duration::from_secs(3), async {
        while let Some(e) = ae.recv().await {
            if matches!(e, Event::DirectFailed { .. } | Event::PathChanged { .. }) {
                return e;
            }
        }
        std::future::pending().await
    })
    .await;
    assert!(event.is_err(), "{event:?}");
    alice.close().await;
    bob.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_at_its_connection_limit_is_a_typed_error() {
    let mut config = peermesh_server::Config::default();
    config.server_limits.max_connections_per_ip = 1;
    let server = common::server_with(config).await;
    let (_a, _a_events) = common::client(&server, "a").await;
    let busy = peermesh::Client::connect(
        &server.ws_url(),
        peermesh::ClientConfig::new("b").with_loopback_only(true),
    )
    .await
    .map(drop)
    .unwrap_err();
    match busy {
        peermesh::Error::ServerBusy { retry_after } => {
            assert_eq!(retry_after, Some(Duration::from_secs(5)))
        }
        other => panic!("expected ServerBusy, got {other}"),
    }
}

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// An app that stops reading its events while its peer floods it with the largest unreliable
/// messages on the direct path (which no send window limits): the receiving client's memory
/// stays bounded (what arrives waits in its bounded event queue, its link's bounded queue of
/// direct frames and SCTP's buffers; the sender drops what its congested channel cannot take)
/// and the link carries a reliable message once the app reads again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_stops_reading_holds_a_flooding_peer_back() {
    init_log();
    let server = server().await;
    let (a, mut ae) = client(&server, "a").await;
    let (b, mut be) = client(&server, "b").await;
    a.join("g").await.unwrap();
    b.join("g").await.unwrap();
    wait_direct(&mut ae, b.peer_id()).await;
    wait_direct(&mut be, a.peer_id()).await;
    let before = rss();
    // Bounded: at most 20 000 messages (320 MiB) or 4 s.
    let payload = Bytes::from(vec![7u8; 16 * 1024]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
    let mut sent = 0u64;
    while sent < 20_000 && tokio::time::Instant::now() < deadline {
        a.send(b.peer_id(), payload.clone(), Reliability::Unreliable)
            .await
            .unwrap();
        sent += 1;
        if sent.is_multiple_of(64) {
            tokio::task::yield_now().await;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grown = rss().saturating_sub(before);
    eprintln!(
        "{sent} unreliable messages of 16 KiB offered ({} MiB); memory grew {} MiB",
        sent * 16 / 1024,
        grown >> 20
    );
    // The event queue (16 KiB messages) and SCTP's buffers, not what was offered.
    assert!(grown < 96 << 20, "memory grew {} MiB", grown >> 20);
    // The app reads again: the link still carries reliable messages.
    a.send(b.peer_id(), b"still here".to_vec(), Reliability::Reliable)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let e = tokio::time::timeout_at(deadline, be.recv())
            .await
            .expect("the reliable message after the flood")
            .unwrap();
        if let Event::Message {
            data,
            reliability: Reliability::Reliable,
            ..
        } = e
        {
            assert_eq!(&data[..], b"still here");
            break;
        }
    }
}

/// An app sending unreliable messages as fast as `send` returns, on the server path, is paced by
/// the WebSocket (each `send` answers once its frame is handed to it): the client's memory stays
/// bounded, and meanwhile the link still delivers the peer's reliable messages, its own reliable
/// ones arrive and `flush` answers. (A first version of the hot send path answered at once and
/// lent the freed window again at once, so such a loop never waited and its frames piled up in
/// the link: about 100 MB here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreliable_flood_on_the_server_path_stays_bounded_and_leaves_the_link_working() {
    let server = server().await;
    let (a, mut ae) = client_with(&server, ClientConfig::new("a").with_direct(false)).await;
    let (b, mut be) = client_with(&server, ClientConfig::new("b").with_direct(false)).await;
    a.join("g").await.unwrap();
    b.join("g").await.unwrap();
    wait_joined(&mut ae, b.peer_id()).await;
    wait_joined(&mut be, a.peer_id()).await;
    let (ia, ib) = (a.peer_id(), b.peer_id());

    let before = rss();
    // Bounded: at most 100 000 messages of 1000 bytes, or 20 s.
    let flood = {
        let a = a.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            let (mut sent, mut peak) = (0u64, 0u64);
            let payload = Bytes::from(vec![1u8; 1000]);
            while sent < 100_000 && tokio::time::Instant::now() < deadline {
                a.send(ib, payload.clone(), Reliability::Unreliable)
                    .await
                    .unwrap();
                sent += 1;
                if sent.is_multiple_of(1000) {
                    peak = peak.max(rss());
                }
            }
            (sent, peak)
        })
    };
    // B reads everything (its event queue must not fill) and keeps A's reliable messages.
    let (marks_tx, mut marks) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        while let Some(e) = be.recv().await {
            if let Event::Message {
                from,
                data,
                reliability: Reliability::Reliable,
                ..
            } = e
            {
                if from == ia {
                    let _ = marks_tx.send(data);
                }
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;

    for i in 0..10u8 {
        b.send(ia, vec![i], Reliability::Reliable).await.unwrap();
        a.send(ib, vec![i], Reliability::Reliable).await.unwrap();
    }
    for i in 0..10u8 {
        let (data, reliability) = next_message(&mut ae, ib, 10).await;
        assert_eq!((&data[..], reliability), (&[i][..], Reliability::Reliable));
        let data = tokio::time::timeout(Duration::from_secs(10), marks.recv())
            .await
            .expect("A's reliable message during the flood")
            .unwrap();
        assert_eq!(&data[..], &[i][..]);
    }
    tokio::time::timeout(Duration::from_secs(10), a.flush())
        .await
        .expect("flush during the flood")
        .unwrap();
    let (sent, peak) = flood.await.unwrap();
    let grown = peak.saturating_sub(before);
    eprintln!(
        "{sent} unreliable messages of 1000 bytes sent; memory grew {} MiB",
        grown >> 20
    );
    // The send window (8 MiB), the WebSocket's queue and the server's relay queue (4 MiB), not
    // what was offered.
    assert!(grown < 48 << 20, "memory grew {} MiB", grown >> 20);
    reader.abort();
    a.close().await;
    b.close().await;
}

/// A burst of small unreliable messages that fills the direct path's unreliable queue gets its
/// excess dropped (§7.6), but once the queue has drained, unreliable messages go again at once:
/// the link learns that the queue drained, also when the burst's sends went out from the app's
/// task (the channel's writer is told to watch the queue then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreliable_messages_go_again_once_a_burst_has_drained() {
    init_log();
    let server = server().await;
    let mut p = direct_pair(&server, |n| {
        ClientConfig::new(n)
            .with_loopback_only(true)
            .with_direct_backend(backend())
    })
    .await;
    let (ia, ib) = (p.a.peer_id(), p.b.peer_id());
    // Bounded: 4000 messages of 1 KiB, offered as fast as `try_send` takes them.
    let mut offered = 0;
    for _ in 0..4000 {
        if p.a
            .try_send(ib, vec![9u8; 1024], Reliability::Unreliable)
            .is_ok()
        {
            offered += 1;
        }
    }
    let dropped = p.a.link_stats(ib).unwrap().unreliable_dropped;
    eprintln!("burst: {offered} taken, {dropped} dropped at the sender");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // After the burst, paced: 100 messages of 16 bytes, 2 ms apart.
    for n in 0..100u32 {
        p.a.send(ib, n.to_be_bytes().to_vec(), Reliability::Unreliable)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let dropped_after = p.a.link_stats(ib).unwrap().unreliable_dropped - dropped;
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Ok(Some(e)) = tokio::time::timeout_at(deadline, p.be.recv()).await {
        if let Event::Message { from, data, .. } = e {
            if from == ia && data.len() == 4 {
                got.push(u32::from_be_bytes(data[..].try_into().unwrap()));
                if got.len() == 100 {
                    break;
                }
            }
        }
    }
    eprintln!(
        "after the burst: {} of 100 arrived, {dropped_after} dropped at the sender",
        got.len()
    );
    assert_eq!(dropped_after, 0, "dropped after the queue drained");
    // Loopback loses nothing; each message whole and once (sent 2 ms apart, so in order too).
    got.sort_unstable();
    assert_eq!(got, (0..100).collect::<Vec<u32>>());
    // The burst's drops are the sender's choice, not a failed path.
    assert!(matches!(p.a.path(ib).unwrap(), Path::Direct { .. }));
    assert_eq!(p.a.link_stats(ib).unwrap().path_changes, 1);
    p.a.close().await;
    p.b.close().await;
}
