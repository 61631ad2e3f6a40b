//! Sessions that survive (issue "Sessions that survive"): a client whose signaling connection
//! is cut silently resumes the same session without losing, duplicating or reordering a
//! reliable message; a server restart leaves direct links working and the clients join their
//! groups again by themselves. Real server, real sockets on 127.0.0.1; the cut is a TCP proxy
//! in the test that stops forwarding without closing anything.

mod common;

use std::time::Duration;

use common::proxy::Proxy;
use common::*;
use peermesh::{Client, ClientConfig, Event, Events, PeerId, Reconnect, Reliability};
use peermesh_server::{Config, Server};

fn fast_reconnect(c: ClientConfig) -> ClientConfig {
    c.with_reconnect(Some(Reconnect {
        initial_delay: Duration::from_millis(100),
        max_delay: Duration::from_millis(500),
        max_attempts: None,
    }))
}

/// Two members of "g" on the server path, `a` connected through a [`Proxy`] that can cut it.
async fn pair_behind_a_proxy(
    server: &peermesh_server::ServerHandle,
) -> (Proxy, (Client, Events), (Client, Events)) {
    let proxy = Proxy::start("127.0.0.1:0".parse().unwrap(), server.local_addr()).await;
    let cfg = |name: &str| fast_reconnect(ClientConfig::new(name).with_direct(false));
    let (a, mut ae) = Client::connect(&proxy.url(), cfg("a")).await.unwrap();
    let (b, mut be) = client_with(server, cfg("b")).await;
    a.join("g").await.unwrap();
    b.join("g").await.unwrap();
    wait_joined(&mut ae, b.peer_id()).await;
    wait_joined(&mut be, a.peer_id()).await;
    (proxy, (a, ae), (b, be))
}

/// Wait for a new session (`Reconnected { resumed: false }`) and the rejoin of "g"; the client
/// took the new session's peer id (a restarted server's ids start again, so it may equal the
/// old one).
async fn new_session_rejoins(events: &mut Events, c: &Client) {
    let peer = match wait_for(events, 10, |e| {
        matches!(e, Event::Reconnected { resumed: false, .. })
    })
    .await
    {
        Event::Reconnected { peer, .. } => peer,
        _ => unreachable!(),
    };
    wait_for(
        events,
        5,
        |e| matches!(e, Event::Rejoined { group } if group == "g"),
    )
    .await;
    assert_eq!(
        c.peer_id(),
        peer,
        "the client took the new session's peer id"
    );
}

/// Wait (up to 5 s) until `a` and `b` each see the other as the only other member of "g".
async fn see_each_other(a: &Client, b: &Client) {
    let other = |c: &Client| -> Vec<PeerId> {
        c.members("g")
            .unwrap_or_default()
            .iter()
            .map(|m| m.peer)
            .collect()
    };
    for _ in 0..50 {
        if other(a) == [b.peer_id()] && other(b) == [a.peer_id()] {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("members: a sees {:?}, b sees {:?}", other(a), other(b));
}

fn numbered(n: u32) -> Vec<u8> {
    format!("{n:05} {}", "x".repeat(200)).into_bytes()
}

/// Receive `count` numbered messages from `from` and check they came in order, once each;
/// collects other events into `seen`.
async fn receive_all(events: &mut Events, from: PeerId, count: u32, seen: &mut Vec<Event>) {
    let mut next = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while next < count {
        let e = tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap_or_else(|_| panic!("only {next} of {count} messages within 60 s"))
            .expect("event stream");
        match e {
            Event::Message {
                from: f,
                data,
                reliability: Reliability::Reliable,
                ..
            } if f == from => {
                assert_eq!(data, numbered(next), "message {next} out of order or twice");
                next += 1;
            }
            other => seen.push(other),
        }
    }
}

/// Cut one client's signaling connection silently while both stream reliable messages on the
/// server path: it notices (no answer to its pings), reconnects and resumes the same session;
/// every message arrives once, in order, and the other member never sees it leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_cut_connection_resumes_without_losing_a_message() {
    init_log();
    let server = server_with(Config {
        heartbeat_timeout: Duration::from_secs(3),
        ..Config::default()
    })
    .await;
    let (proxy, (a, mut ae), (b, mut be)) = pair_behind_a_proxy(&server).await;
    let (ia, ib) = (a.peer_id(), b.peer_id());

    const N: u32 = 2000;
    let sender = |c: Client, to: PeerId| {
        tokio::spawn(async move {
            for n in 0..N {
                c.send(to, numbered(n), Reliability::Reliable)
                    .await
                    .unwrap();
                if n % 100 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        })
    };
    let (sa, sb) = (sender(a.clone(), ib), sender(b.clone(), ia));
    tokio::time::sleep(Duration::from_millis(150)).await;
    let cut_at = tokio::time::Instant::now();
    proxy.cut();

    let (mut seen_a, mut seen_b) = (Vec::new(), Vec::new());
    tokio::join!(
        receive_all(&mut ae, ib, N, &mut seen_a),
        receive_all(&mut be, ia, N, &mut seen_b)
    );
    sa.await.unwrap();
    sb.await.unwrap();
    eprintln!(
        "all {N} messages each way within {:?} of the cut",
        cut_at.elapsed()
    );
    assert!(
        seen_a
            .iter()
            .any(|e| matches!(e, Event::Reconnecting { .. })),
        "{seen_a:?}"
    );
    assert!(
        seen_a.iter().any(|e| matches!(
            e,
            Event::Reconnected {
                resumed: true,
                peer
            } if *peer == ia
        )),
        "{seen_a:?}"
    );
    assert_eq!(a.peer_id(), ia, "same session, same peer id");
    for e in seen_a.iter().chain(&seen_b) {
        assert!(
            !matches!(
                e,
                Event::MemberLeft { .. } | Event::MemberJoined { .. } | Event::Disconnected { .. }
            ),
            "{e:?}"
        );
    }
    let stats = a.link_stats(ib).unwrap();
    eprintln!("a's link after the resume: {stats:?}");
    // The resume went through the link layer's re-send: what was in flight was sent again.
    assert!(stats.resent > 0, "{stats:?}");
}

/// The server goes away: direct links keep carrying messages; the clients reconnect once it is
/// back (a new process: nothing to resume), join their group again by themselves and find each
/// other, and a newcomer sees them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_server_restart_clients_rejoin_and_direct_links_keep_working() {
    init_log();
    let first = server().await;
    let addr = first.local_addr();
    let url = first.ws_url();
    let cfg = |name: &str| fast_reconnect(ClientConfig::new(name).with_loopback_only(true));
    let (a, mut ae) = Client::connect(&url, cfg("a")).await.unwrap();
    let (b, mut be) = Client::connect(&url, cfg("b")).await.unwrap();
    a.join("g").await.unwrap();
    b.join("g").await.unwrap();
    let (ia, ib) = (a.peer_id(), b.peer_id());
    wait_direct(&mut ae, ib).await;
    wait_direct(&mut be, ia).await;

    first.shutdown().await;
    wait_for(&mut ae, 5, |e| matches!(e, Event::Reconnecting { .. })).await;
    // The direct path does not need the server.
    for n in 0..300 {
        a.send(ib, numbered(n), Reliability::Reliable)
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    receive_all(&mut be, ia, 300, &mut seen).await;
    assert!(
        !seen.iter().any(|e| matches!(e, Event::MemberLeft { .. })),
        "{seen:?}"
    );

    // The server is back on the same address.
    let second = Server::bind(Config {
        listen: addr,
        ..Config::default()
    })
    .await
    .expect("bind the same address again")
    .spawn();
    let back = tokio::time::Instant::now();
    new_session_rejoins(&mut ae, &a).await;
    new_session_rejoins(&mut be, &b).await;
    // Whoever rejoined second sees the first; then both see each other.
    let (na, nb) = (a.peer_id(), b.peer_id());
    see_each_other(&a, &b).await;
    eprintln!("both members again {:?} after the restart", back.elapsed());
    assert!(back.elapsed() < Duration::from_secs(5));
    let (c, _ce) = Client::connect(&second.ws_url(), cfg("c")).await.unwrap();
    let members = c.join("g").await.unwrap();
    let mut peers: Vec<PeerId> = members.iter().map(|m| m.peer).collect();
    peers.sort();
    let mut want = vec![na, nb];
    want.sort();
    assert_eq!(peers, want);
    // And the new links carry messages.
    a.send(nb, b"after the restart".to_vec(), Reliability::Reliable)
        .await
        .unwrap();
    let (data, _) = next_message(&mut be, na, 10).await;
    assert_eq!(&data[..], b"after the restart");
}

/// Cut for longer than the resume grace: the server ends the session (the other member sees it
/// leave); the client comes back with a new session, joins its group again, and reports the
/// reliable messages that were not acknowledged instead of losing them silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_grace_a_new_session_rejoins_and_reports_what_was_not_acknowledged() {
    init_log();
    let server = server_with(Config {
        heartbeat_timeout: Duration::from_secs(1),
        resume_grace: Duration::from_millis(500),
        ..Config::default()
    })
    .await;
    let (proxy, (a, mut ae), (b, mut be)) = pair_behind_a_proxy(&server).await;
    let (ia, ib) = (a.peer_id(), b.peer_id());

    proxy.block(true);
    proxy.cut();
    // Sent into the cut: never acknowledged.
    for n in 0..20 {
        a.send(ib, numbered(n), Reliability::Reliable)
            .await
            .unwrap();
    }
    // The server notices the silence (1 s), suspends the session, ends it after the grace.
    wait_for(
        &mut be,
        10,
        |e| matches!(e, Event::MemberLeft { peer, .. } if *peer == ia),
    )
    .await;
    proxy.block(false);
    wait_for(&mut ae, 10, |e| {
        matches!(e, Event::Reconnected { resumed: false, .. })
    })
    .await;
    let na = a.peer_id();
    assert_ne!(na, ia, "a new session");
    let mut undelivered = 0;
    let mut rejoined = false;
    while !rejoined {
        match wait_for(&mut ae, 10, |e| {
            matches!(e, Event::Undelivered { .. } | Event::Rejoined { .. })
        })
        .await
        {
            Event::Undelivered { peer, messages } => {
                assert_eq!(peer, ib);
                undelivered += messages;
            }
            Event::Rejoined { group } => {
                assert_eq!(group, "g");
                rejoined = true;
            }
            _ => unreachable!(),
        }
    }
    assert_eq!(
        undelivered, 20,
        "every message sent into the cut is reported"
    );
    wait_joined(&mut be, na).await;
    wait_joined(&mut ae, ib).await;
    a.send(ib, b"again".to_vec(), Reliability::Reliable)
        .await
        .unwrap();
    let (data, _) = next_message(&mut be, na, 10).await;
    assert_eq!(&data[..], b"again");
}

/// A draining server can send its clients to another instance (`reconnect_url`): they start new
/// sessions there by themselves, join their group again and reach each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_sends_clients_to_the_reconnect_url() {
    init_log();
    let second = server().await;
    let first = server_with(Config {
        reconnect_url: Some(second.ws_url()),
        ..Config::default()
    })
    .await;
    let cfg = |name: &str| fast_reconnect(ClientConfig::new(name).with_direct(false));
    let (a, mut ae) = client_with(&first, cfg("a")).await;
    let (b, mut be) = client_with(&first, cfg("b")).await;
    a.join("g").await.unwrap();
    b.join("g").await.unwrap();
    wait_joined(&mut ae, b.peer_id()).await;
    // The first server stays down: only the other instance can take the clients.
    first.shutdown().await;
    new_session_rejoins(&mut ae, &a).await;
    new_session_rejoins(&mut be, &b).await;
    see_each_other(&a, &b).await;
    let mut peers: Vec<String> = second
        .admin()
        .group("g")
        .expect("the group on the other instance")
        .members
        .into_iter()
        .map(|m| m.name)
        .collect();
    peers.sort();
    assert_eq!(peers, ["a", "b"]);
    a.send(
        b.peer_id(),
        b"on the other instance".to_vec(),
        Reliability::Reliable,
    )
    .await
    .unwrap();
    let (data, _) = next_message(&mut be, a.peer_id(), 10).await;
    assert_eq!(&data[..], b"on the other instance");
}
