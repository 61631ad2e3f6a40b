//! Relay-only pairs through the embedded TURN service, and TURN credential refresh.

mod common;

use std::time::Duration;

use common::*;
use peermesh::{CandidateType, ClientConfig, Path, Reliability};
use peermesh_server::Config;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_only_pair_through_our_turn_delivers_10000_in_order() {
    const N: u32 = 10_000;
    let server = server_with(embedded_turn((50300, 50399))).await;
    let turn = server.turn().expect("embedded TURN").clone();
    let cfg = |n: &str| {
        ClientConfig::new(n)
            .with_direct_backend(common::backend())
            .with_loopback_only(true)
            .with_relay_only(true)
    };
    let DirectPair {
        a,
        b,
        mut be,
        a_path,
        b_path,
        ..
    } = direct_pair(&server, cfg).await;
    // Every client got a turn: URL with credentials for our service.
    let servers = a.ice_servers();
    let turn_entry = servers
        .iter()
        .find(|s| s.urls.iter().any(|u| u.starts_with("turn:")))
        .expect("a turn: server in welcome");
    assert!(turn_entry.urls[0].contains(&turn.local_addr().port().to_string()));
    assert!(turn_entry.username.is_some() && turn_entry.credential.is_some());

    let (ia, ib) = (a.peer_id(), b.peer_id());
    let relay = Path::Direct {
        local: CandidateType::Relay,
        remote: CandidateType::Relay,
    };
    assert_eq!((a_path, b_path), (relay, relay));

    let before = b.link_stats(ia).unwrap();
    let sender = {
        let a = a.clone();
        tokio::spawn(async move {
            for i in 0..N {
                a.send(ib, i.to_be_bytes().to_vec(), Reliability::Reliable)
                    .await
                    .unwrap();
            }
        })
    };
    for i in 0..N {
        let (data, _) = next_message(&mut be, ia, 20).await;
        assert_eq!(data.as_ref(), i.to_be_bytes(), "message {i}");
    }
    sender.await.unwrap();
    let after = b.link_stats(ia).unwrap();
    assert_eq!(
        after.recv_server, before.recv_server,
        "nothing went through signaling"
    );
    assert!(after.recv_direct - before.recv_direct >= u64::from(N));
    let stats = turn.stats();
    // SCTP bundles small messages, so count bytes: at least the payloads went through TURN.
    assert!(stats.relayed_to_peer_bytes > 4 * u64::from(N), "{stats:?}");
    assert!(stats.relayed_to_client_packets > 0, "{stats:?}");
    assert!(stats.allocations >= 2, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turn_credentials_are_renewed_before_they_expire() {
    let server = server_with(Config {
        turn_credential_ttl: Duration::from_secs(2),
        ..embedded_turn((50400, 50409))
    })
    .await;
    let (a, _ae) = client(&server, "a").await;
    let username = |c: &peermesh::Client| {
        c.ice_servers()
            .into_iter()
            .find_map(|s| s.username)
            .expect("turn credentials")
    };
    let first = username(&a);
    let expiry = |u: &str| u.split(':').next().unwrap().parse::<u64>().unwrap();
    let mut renewed = first.clone();
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        renewed = username(&a);
        if renewed != first {
            break;
        }
    }
    assert_ne!(renewed, first, "no fresh credentials within 4 s");
    assert!(expiry(&renewed) > expiry(&first));
}
