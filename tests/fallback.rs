//! The direct path dies mid-stream and comes back: a real cut of the link's UDP ports with nft
//! on loopback (root needed, as in CI). The clients use a private UDP port range, so nothing
//! else on the machine is affected.

mod common;

use peermesh_interop_tests::UdpCut;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use peermesh::{ClientConfig, Path, Reliability};
use tokio::time::Instant;

const PORTS: (u16, u16) = (47100, 47199);
const BULK_PORTS: (u16, u16) = (47200, 47299);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_path_cut_falls_back_to_server_and_returns_without_loss() {
    init_log();
    let server = server().await;
    let cfg = |n: &str| {
        ClientConfig::new(n)
            .with_direct_backend(common::backend())
            .with_loopback_only(true)
            .with_udp_ports(PORTS.0, PORTS.1)
    };
    let DirectPair {
        a,
        mut ae,
        b,
        mut be,
        ..
    } = direct_pair(&server, cfg).await;
    let (ia, ib) = (a.peer_id(), b.peer_id());
    let pair = a.candidate_pair(ib).unwrap().expect("direct pair");
    assert!((PORTS.0..=PORTS.1).contains(&pair.local.port()), "{pair:?}");
    // Nobody reads a's events from here on; keep its queue drained.
    tokio::spawn(async move { while ae.recv().await.is_some() {} });

    // A steady stream of numbered reliable messages, bounded in count and time.
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let (a, stop) = (a.clone(), stop.clone());
        tokio::spawn(async move {
            let t = Instant::now();
            let mut n: u32 = 0;
            while !stop.load(Ordering::Relaxed)
                && n < 20_000
                && t.elapsed() < Duration::from_secs(40)
            {
                a.send(ib, n.to_be_bytes().to_vec(), Reliability::Reliable)
                    .await
                    .unwrap();
                n += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            n
        })
    };
    // Checks every message as it arrives; ends once it has all the sender sent.
    let (total_tx, mut total_rx) = tokio::sync::watch::channel(None::<u32>);
    let receiver = tokio::spawn(async move {
        let mut next: u32 = 0;
        loop {
            if Some(next) == *total_rx.borrow() {
                return next;
            }
            tokio::select! {
                (data, rel) = next_message(&mut be, ia, 30) => {
                    assert_eq!(rel, Reliability::Reliable);
                    let got = u32::from_be_bytes(data[..].try_into().unwrap());
                    assert_eq!(got, next, "lost, duplicated or reordered");
                    next += 1;
                }
                _ = total_rx.changed() => {}
            }
        }
    });

    tokio::time::sleep(Duration::from_millis(500)).await;
    let cut = UdpCut::new("test", PORTS);
    let to_server = wait_path(&a, ib, false, 10).await;
    wait_path(&b, ia, false, 10).await;
    assert!(
        to_server < Duration::from_secs(5),
        "fallback took {to_server:?}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        a.path(ib).unwrap(),
        Path::Server,
        "no direct path can exist during the cut"
    );

    drop(cut);
    let back = wait_path(&a, ib, true, 15).await;
    wait_path(&b, ia, true, 15).await;
    assert!(
        back < Duration::from_secs(10),
        "return to direct took {back:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let sent = sender.await.unwrap();
    total_tx.send(Some(sent)).unwrap();
    let received = tokio::time::timeout(Duration::from_secs(20), receiver)
        .await
        .expect("receiver stuck")
        .unwrap();
    assert_eq!(received, sent);

    let stats = a.link_stats(ib).unwrap();
    assert!(
        stats.resent > 0,
        "nothing was in flight at the cut? {stats:?}"
    );
    assert!(stats.path_changes >= 3, "{stats:?}");
    eprintln!(
        "sent {sent}, fallback after {to_server:?}, direct again {back:?} after restore; {stats:?}"
    );
}

/// The direct path dies while more than a megabyte is queued in SCTP: senders blocked on the
/// data channel's flow control must move to the server path too, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_with_a_full_send_queue_loses_nothing() {
    init_log();
    let server = server().await;
    let cfg = |n: &str| {
        ClientConfig::new(n)
            .with_direct_backend(common::backend())
            .with_loopback_only(true)
            .with_udp_ports(BULK_PORTS.0, BULK_PORTS.1)
    };
    let DirectPair {
        a,
        mut ae,
        b,
        mut be,
        ..
    } = direct_pair(&server, cfg).await;
    let (ia, ib) = (a.peer_id(), b.peer_id());
    tokio::spawn(async move { while ae.recv().await.is_some() {} });

    const N: u32 = 1500; // 24 MiB of 16 KiB messages
    let sender = {
        let a = a.clone();
        tokio::spawn(async move {
            for i in 0..N {
                let mut msg = vec![(i % 251) as u8; 16 * 1024];
                msg[..4].copy_from_slice(&i.to_be_bytes());
                a.send(ib, msg, Reliability::Reliable).await.unwrap();
            }
        })
    };
    let mut cut = None;
    for i in 0..N {
        let (data, _) = next_message(&mut be, ia, 30).await;
        assert_eq!(data.len(), 16 * 1024);
        assert_eq!(
            u32::from_be_bytes(data[..4].try_into().unwrap()),
            i,
            "out of order"
        );
        assert!(data[4..].iter().all(|&x| x == (i % 251) as u8), "corrupt");
        if i % 100 == 0 {
            tracing::info!(i, "received");
        }
        if i == 200 {
            cut = Some(UdpCut::new("test", BULK_PORTS));
        }
        if i == 600 {
            assert_eq!(
                a.path(ib).unwrap(),
                Path::Server,
                "still direct across the cut"
            );
            drop(cut.take());
        }
    }
    tokio::time::timeout(Duration::from_secs(10), sender)
        .await
        .expect("sender stuck")
        .unwrap();
    let stats = a.link_stats(ib).unwrap();
    assert!(stats.resent > 0 && stats.sent_server > 0, "{stats:?}");
}

/// When no direct path can be made (here: the pair's UDP is cut before it joins), both sides are
/// told "no direct path" within 10 s while messages keep flowing over the server path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_direct_path_is_reported_and_server_path_keeps_working() {
    init_log();
    const NO_UDP_PORTS: (u16, u16) = (47300, 47399);
    let _cut = UdpCut::new("test", NO_UDP_PORTS);
    let server = server().await;
    let cfg = |n: &str| {
        ClientConfig::new(n)
            .with_direct_backend(common::backend())
            .with_loopback_only(true)
            .with_udp_ports(NO_UDP_PORTS.0, NO_UDP_PORTS.1)
    };
    let (a, mut ae) = client_with(&server, cfg("a")).await;
    let (b, mut be) = client_with(&server, cfg("b")).await;
    a.join("g").await.unwrap();
    let t = Instant::now();
    b.join("g").await.unwrap();
    let (ia, ib) = (a.peer_id(), b.peer_id());
    wait_joined(&mut ae, ib).await;
    a.send(ib, "before", Reliability::Reliable).await.unwrap();
    let (got, _) = next_message(&mut be, ia, 10).await;
    assert_eq!(&got[..], b"before");
    for (events, peer) in [(&mut ae, ib), (&mut be, ia)] {
        match wait_for(
            events,
            10,
            |e| matches!(e, peermesh::Event::DirectFailed { peer: p, .. } if *p == peer),
        )
        .await
        {
            peermesh::Event::DirectFailed { reason, .. } => assert!(!reason.is_empty()),
            _ => unreachable!(),
        }
    }
    let told = t.elapsed();
    assert!(told < Duration::from_secs(10), "told after {told:?}");
    assert_eq!(a.path(ib).unwrap(), Path::Server);
    a.send(ib, "after", Reliability::Reliable).await.unwrap();
    let (got, _) = next_message(&mut be, ia, 10).await;
    assert_eq!(&got[..], b"after");
    assert_eq!(b.path(ia).unwrap(), Path::Server);
    a.close().await;
    b.close().await;
}
