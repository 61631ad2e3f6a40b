//! Sessions that survive a dropped connection (issue "Sessions that survive", server side):
//! a resumable session is suspended when its connection is lost, its co-members are told, and
//! it resumes with its secret on a new connection — same peer id, groups and links, no
//! `member_left`. Real server, real WebSockets on 127.0.0.1, the protocol spoken by hand.

mod common;

use std::time::Duration;

use common::raw_ws::*;
use futures_util::{SinkExt, StreamExt};
use peermesh::protocol::{close_code, ErrorCode, PeerId, ServerMsg};
use peermesh_server::admin::ServerEvent;
use peermesh_server::{Config, Server, ServerHandle};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

async fn server(grace: Duration) -> ServerHandle {
    Server::bind(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        resume_grace: grace,
        ..Config::default()
    })
    .await
    .expect("bind")
    .spawn()
}

/// A resumable session: (socket, peer id, resume token).
async fn resumable(url: &str, name: &str) -> (Ws, PeerId, String) {
    match hello_with(url, None, json!({"name": name, "resumable": true})).await {
        (
            ws,
            Seen::Msg(ServerMsg::Welcome {
                peer,
                resume_token: Some(token),
                resume_grace_ms: Some(_),
                resumed: false,
                ..
            }),
        ) => (ws, peer, token),
        (_, other) => panic!("expected a welcome with a resume token, got {other:?}"),
    }
}

fn relay_frame(to: PeerId, link: u32, payload: &[u8]) -> Message {
    let mut f = vec![0x01];
    f.extend_from_slice(&to.to_be_bytes());
    f.extend_from_slice(&link.to_be_bytes());
    f.extend_from_slice(payload);
    Message::Binary(f.into())
}

/// The next binary frame's payload (skipping text frames).
async fn next_binary(ws: &mut Ws) -> Vec<u8> {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => return b[9..].to_vec(),
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected a relay frame, got {other:?}"),
        }
    }
}

/// Drop the TCP connection without a close frame (what a lost network looks like to the server
/// once the socket errors or ends).
fn lose(ws: Ws) {
    let stream = ws.into_inner();
    drop(stream);
}

#[tokio::test]
async fn a_dropped_connection_resumes_with_the_same_peer_groups_and_links() {
    let server = server(Duration::from_secs(30)).await;
    let url = server.ws_url();
    let mut events = server.admin().events();
    let (mut alice, alice_peer, token) = resumable(&url, "alice").await;
    let (mut bob, bob_peer, _) = resumable(&url, "bob").await;
    join(&mut alice, "room").await.unwrap();
    let members = join(&mut bob, "room").await.unwrap();
    let link = members[0].link;
    assert!(matches!(
        next_msg(&mut alice).await,
        ServerMsg::MemberJoined { .. }
    ));

    lose(alice);
    match next_msg(&mut bob).await {
        ServerMsg::MemberSuspended { peer } => assert_eq!(peer, alice_peer),
        other => panic!("{other:?}"),
    }
    // Frames to a suspended peer are refused, so the sender keeps them for after the resume.
    bob.send(relay_frame(alice_peer, link, b"while away"))
        .await
        .unwrap();
    match next_msg(&mut bob).await {
        ServerMsg::Error { code, peer, .. } => {
            assert_eq!((code, peer), (ErrorCode::PeerSuspended, Some(alice_peer)))
        }
        other => panic!("{other:?}"),
    }

    // A wrong token is refused and changes nothing; the right one resumes.
    let (mut thief, seen) = hello_with(
        &url,
        None,
        json!({"name": "alice", "resume": {"peer": alice_peer, "token": "guess"}}),
    )
    .await;
    match seen {
        Seen::Msg(ServerMsg::Error { code, .. }) => assert_eq!(code, ErrorCode::ResumeFailed),
        other => panic!("{other:?}"),
    }
    // The refused connection may still start a session of its own.
    send(
        &mut thief,
        json!({"type": "hello", "version": 1, "name": "thief"}),
    )
    .await;
    match next_msg(&mut thief).await {
        ServerMsg::Welcome { peer, .. } => assert_ne!(peer, alice_peer),
        other => panic!("{other:?}"),
    }

    let (mut alice, seen) = hello_with(
        &url,
        None,
        json!({"name": "alice", "resume": {"peer": alice_peer, "token": token}}),
    )
    .await;
    match seen {
        Seen::Msg(ServerMsg::Welcome {
            peer,
            resumed,
            resume_token,
            groups,
            ..
        }) => {
            assert_eq!(peer, alice_peer);
            assert!(resumed);
            assert_eq!(groups, Some(vec!["room".to_string()]));
            assert_eq!(resume_token.as_deref(), Some(token.as_str()));
        }
        other => panic!("{other:?}"),
    }
    match next_msg(&mut alice).await {
        ServerMsg::Joined {
            group,
            members,
            change,
        } => {
            assert_eq!((group.as_str(), change), ("room", Some(2)));
            assert_eq!(members.len(), 1);
            assert_eq!((members[0].peer, members[0].link), (bob_peer, link));
        }
        other => panic!("{other:?}"),
    }
    match next_msg(&mut bob).await {
        ServerMsg::MemberResumed { peer } => assert_eq!(peer, alice_peer),
        other => panic!("{other:?}"),
    }
    bob.send(relay_frame(alice_peer, link, b"back"))
        .await
        .unwrap();
    assert_eq!(next_binary(&mut alice).await, b"back");
    alice
        .send(relay_frame(bob_peer, link, b"hi bob"))
        .await
        .unwrap();
    assert_eq!(next_binary(&mut bob).await, b"hi bob");

    // Bob never saw alice leave or join again.
    assert!(maybe_next(&mut bob, Duration::from_millis(200))
        .await
        .is_none());
    let mut seen = Vec::new();
    while let Ok(e) = events.try_recv() {
        seen.push(e);
    }
    assert!(seen.contains(&ServerEvent::SessionSuspended {
        peer: alice_peer,
        user: None
    }));
    assert!(seen.contains(&ServerEvent::SessionResumed {
        peer: alice_peer,
        user: None
    }));
    assert!(
        !seen
            .iter()
            .any(|e| matches!(e, ServerEvent::MemberLeft { .. })),
        "{seen:?}"
    );
}

#[tokio::test]
async fn past_the_grace_the_session_ends_and_cannot_resume() {
    let server = server(Duration::from_millis(300)).await;
    let url = server.ws_url();
    let (mut alice, alice_peer, token) = resumable(&url, "alice").await;
    let (mut bob, _, _) = resumable(&url, "bob").await;
    join(&mut alice, "room").await.unwrap();
    join(&mut bob, "room").await.unwrap();
    lose(alice);
    assert!(matches!(
        next_msg(&mut bob).await,
        ServerMsg::MemberSuspended { .. }
    ));
    // Ended by the server's housekeeping (every second) once the grace is over.
    match next_msg(&mut bob).await {
        ServerMsg::MemberLeft { peer, .. } => assert_eq!(peer, alice_peer),
        other => panic!("{other:?}"),
    }
    let (_, seen) = hello_with(
        &url,
        None,
        json!({"name": "alice", "resume": {"peer": alice_peer, "token": token}}),
    )
    .await;
    match seen {
        Seen::Msg(ServerMsg::Error { code, message, .. }) => {
            assert_eq!(code, ErrorCode::ResumeFailed);
            assert!(message.contains("no such session"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

/// Clients that did not say they can resume, and clients that close on purpose, leave at once
/// as before.
#[tokio::test]
async fn only_lost_resumable_sessions_are_kept() {
    let server = server(Duration::from_secs(30)).await;
    let url = server.ws_url();
    let (mut bob, _, _) = resumable(&url, "bob").await;
    join(&mut bob, "room").await.unwrap();

    let (mut old, old_peer) = welcomed_with(&url, None, json!({"name": "old"})).await;
    join(&mut old, "room").await.unwrap();
    assert!(matches!(
        next_msg(&mut bob).await,
        ServerMsg::MemberJoined { .. }
    ));
    lose(old);
    match next_msg(&mut bob).await {
        ServerMsg::MemberLeft { peer, .. } => assert_eq!(peer, old_peer),
        other => panic!("{other:?}"),
    }

    let (mut tidy, tidy_peer, _) = resumable(&url, "tidy").await;
    join(&mut tidy, "room").await.unwrap();
    assert!(matches!(
        next_msg(&mut bob).await,
        ServerMsg::MemberJoined { .. }
    ));
    tidy.close(None).await.unwrap();
    match next_msg(&mut bob).await {
        ServerMsg::MemberLeft { peer, .. } => assert_eq!(peer, tidy_peer),
        other => panic!("{other:?}"),
    }
}

/// A resume while the server still thinks the old connection is alive takes the session over;
/// the old connection is closed with 4003.
#[tokio::test]
async fn a_resume_takes_over_a_connection_not_yet_seen_dead() {
    let server = server(Duration::from_secs(30)).await;
    let url = server.ws_url();
    let (mut first, peer, token) = resumable(&url, "alice").await;
    let (_second, seen) = hello_with(
        &url,
        None,
        json!({"name": "alice", "resume": {"peer": peer, "token": token}}),
    )
    .await;
    assert!(
        matches!(seen, Seen::Msg(ServerMsg::Welcome { resumed: true, .. })),
        "{seen:?}"
    );
    loop {
        match next(&mut first).await {
            Seen::Close(code, _) => {
                assert_eq!(code, Some(close_code::RESUMED_ELSEWHERE));
                break;
            }
            Seen::Msg(_) => continue,
            Seen::End => panic!("closed without a close frame"),
        }
    }
}

/// Suspended sessions hold no connection, so they are bounded like connections: past
/// `max_connections_per_ip` suspended sessions from one address, a lost session ends at once.
#[tokio::test]
async fn suspended_sessions_are_bounded_per_address() {
    let server = Server::bind(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        resume_grace: Duration::from_secs(30),
        server_limits: peermesh_server::ServerLimits {
            max_connections_per_ip: 5,
            ..Default::default()
        },
        ..Config::default()
    })
    .await
    .expect("bind")
    .spawn();
    let url = server.ws_url();
    let (mut witness, _, _) = resumable(&url, "witness").await;
    join(&mut witness, "room").await.unwrap();
    let mut kept = 0;
    for batch in [4, 2] {
        let mut lost = Vec::new();
        for i in 0..batch {
            let (mut ws, peer, _) = resumable(&url, &format!("c{i}")).await;
            join(&mut ws, "room").await.unwrap();
            assert!(matches!(
                next_msg(&mut witness).await,
                ServerMsg::MemberJoined { .. }
            ));
            lost.push((ws, peer));
        }
        for (ws, peer) in lost {
            lose(ws);
            match next_msg(&mut witness).await {
                ServerMsg::MemberSuspended { peer: p } => {
                    assert_eq!(p, peer);
                    kept += 1;
                }
                ServerMsg::MemberLeft { peer: p, .. } => {
                    assert_eq!(p, peer);
                    assert_eq!(kept, 5, "ended although only {kept} were suspended");
                }
                other => panic!("{other:?}"),
            }
        }
    }
    assert_eq!(kept, 5);
}

async fn draining_server(timeout: Duration) -> ServerHandle {
    Server::bind(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        drain_timeout: timeout,
        reconnect_url: Some("ws://127.0.0.1:9/ws".into()),
        ..Config::default()
    })
    .await
    .expect("bind")
    .spawn()
}

async fn expect_restart_close(ws: &mut Ws) {
    match next(ws).await {
        Seen::Close(Some(code), _) => assert_eq!(code, close_code::SERVICE_RESTART),
        other => panic!("expected a close (1012), got {other:?}"),
    }
}

/// Shutdown drains: every session gets `drain` (with the reconnect URL), the listener is closed,
/// relaying goes on, and the server closes the sessions (1012) once every resumable one
/// answered `drained` — not before, and without waiting for sessions that cannot reconnect.
#[tokio::test]
async fn shutdown_drains_until_every_resumable_session_answers() {
    let server = draining_server(Duration::from_secs(20)).await;
    let url = server.ws_url();
    let addr = server.local_addr();
    let (mut alice, alice_peer, _) = resumable(&url, "alice").await;
    let (mut bob, _, _) = resumable(&url, "bob").await;
    let (mut carol, _) = welcomed_with(&url, None, json!({"name": "carol"})).await;
    join(&mut alice, "g").await.unwrap();
    let link = join(&mut bob, "g").await.unwrap()[0].link;
    join(&mut carol, "g").await.unwrap();
    let started = std::time::Instant::now();
    let stopping = tokio::spawn(server.shutdown());
    for ws in [&mut alice, &mut bob, &mut carol] {
        loop {
            match next_msg(ws).await {
                ServerMsg::Drain {
                    reconnect_url,
                    timeout_ms,
                } => {
                    assert_eq!(reconnect_url.as_deref(), Some("ws://127.0.0.1:9/ws"));
                    assert_eq!(timeout_ms, 20_000);
                    break;
                }
                ServerMsg::MemberJoined { .. } => {}
                other => panic!("expected drain, got {other:?}"),
            }
        }
    }
    // No new connections while draining.
    let deadline = std::time::Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(std::time::Instant::now() < deadline, "still accepting");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Relaying goes on (what was sent gets acknowledged).
    bob.send(relay_frame(alice_peer, link, b"ack"))
        .await
        .unwrap();
    assert_eq!(next_binary(&mut alice).await, b"ack");
    send(&mut alice, json!({"type": "drained"})).await;
    assert!(
        maybe_next(&mut bob, Duration::from_millis(300))
            .await
            .is_none(),
        "closed before bob answered"
    );
    send(&mut bob, json!({"type": "drained"})).await;
    for ws in [&mut alice, &mut bob, &mut carol] {
        expect_restart_close(ws).await;
    }
    tokio::time::timeout(WAIT, stopping)
        .await
        .expect("server stopped")
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "waited for the drain timeout"
    );
}

/// A session that never answers `drain` holds the shutdown for the drain timeout only.
#[tokio::test]
async fn a_silent_session_holds_the_drain_for_its_timeout_only() {
    let server = draining_server(Duration::from_millis(500)).await;
    let url = server.ws_url();
    let (mut alice, _, _) = resumable(&url, "alice").await;
    let stopping = tokio::spawn(server.shutdown());
    assert!(matches!(
        next_msg(&mut alice).await,
        ServerMsg::Drain { .. }
    ));
    expect_restart_close(&mut alice).await;
    tokio::time::timeout(WAIT, stopping)
        .await
        .expect("server stopped")
        .unwrap();
}
