//! Our clients with coturn as their STUN and TURN server (the signaling server hands out coturn
//! REST credentials: `TurnMode::External`).

use std::time::Duration;

use peermesh::{CandidateType, Client, ClientConfig, Event, Events, Path, PeerId, Reliability};
use peermesh_interop_tests::{client_config, Coturn};
use peermesh_server::{Config, Server, ServerHandle, TurnMode};

async fn server_for(coturn: &Coturn) -> ServerHandle {
    Server::bind(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        turn: TurnMode::External {
            urls: vec![coturn.turn_url()],
            secret: coturn.secret.clone(),
        },
        ..Default::default()
    })
    .await
    .unwrap()
    .spawn()
}

async fn direct_path(events: &mut Events, peer: PeerId) -> Path {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(Event::PathChanged {
                peer: p,
                path: path @ Path::Direct { .. },
            })) if p == peer => return path,
            Ok(Some(_)) => {}
            Ok(None) => panic!("events ended"),
            Err(_) => panic!("no direct path within 20 s"),
        }
    }
}

async fn pair(
    server: &ServerHandle,
    config: impl Fn(&str) -> ClientConfig,
) -> ((Client, Events), (Client, Events)) {
    let a = Client::connect(&server.ws_url(), config("a"))
        .await
        .unwrap();
    let b = Client::connect(&server.ws_url(), config("b"))
        .await
        .unwrap();
    a.0.join("g").await.unwrap();
    b.0.join("g").await.unwrap();
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_gather_srflx_candidates_from_coturn() {
    let coturn = Coturn::start((50100, 50199));
    let server = server_for(&coturn).await;
    let ((a, mut ae), (b, _be)) =
        pair(&server, |n| client_config(n).with_loopback_only(true)).await;
    assert!(a
        .ice_servers()
        .iter()
        .any(|s| s.urls.iter().any(|u| u.starts_with("stun:"))));
    direct_path(&mut ae, b.peer_id()).await;
    // Gathering goes on after the path is up; give the STUN answer a moment.
    let mut stats = a.link_stats(b.peer_id()).unwrap();
    for _ in 0..50 {
        if stats.candidates_srflx > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        stats = a.link_stats(b.peer_id()).unwrap();
    }
    assert!(
        stats.candidates_srflx > 0,
        "no srflx candidate from coturn: {stats:?}"
    );
    assert!(
        stats.candidates_relay > 0,
        "no relay candidate from coturn: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_only_pair_connects_through_coturn() {
    let coturn = Coturn::start((50200, 50299));
    let server = server_for(&coturn).await;
    let relay_only = |n: &str| {
        client_config(n)
            .with_loopback_only(true)
            .with_relay_only(true)
    };
    let ((a, mut ae), (b, mut be)) = pair(&server, relay_only).await;
    let relay = Path::Direct {
        local: CandidateType::Relay,
        remote: CandidateType::Relay,
    };
    assert_eq!(direct_path(&mut ae, b.peer_id()).await, relay);
    assert_eq!(direct_path(&mut be, a.peer_id()).await, relay);
    let pair = a.candidate_pair(b.peer_id()).unwrap().unwrap();
    assert!(
        (50200..=50299).contains(&pair.local.port()),
        "not a coturn relay port: {pair:?}"
    );

    let before = b.link_stats(a.peer_id()).unwrap();
    for i in 0..100u32 {
        a.send(b.peer_id(), i.to_be_bytes().to_vec(), Reliability::Reliable)
            .await
            .unwrap();
    }
    let mut next = 0u32;
    while next < 100 {
        let event = tokio::time::timeout(Duration::from_secs(10), be.recv())
            .await
            .unwrap()
            .unwrap();
        if let Event::Message { data, .. } = event {
            assert_eq!(u32::from_be_bytes(data[..].try_into().unwrap()), next);
            next += 1;
        }
    }
    let after = b.link_stats(a.peer_id()).unwrap();
    assert_eq!(
        after.recv_direct - before.recv_direct,
        100,
        "not over the relayed direct path"
    );
    a.close().await;
    b.close().await;
}
