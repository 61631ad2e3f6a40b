//! Lanes end to end (PROTOCOL.md §8.8): a bulk transfer on lane 1 while lane 0 carries numbered
//! chat messages, on the server path and on the direct path, native to native. Every message of
//! both lanes arrives once and in order per lane. Lane 1 moves 64 MiB; the lane-0 delays idle
//! and during the transfer are printed (the release figures are `bench`'s lanes rows).

mod common;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use peermesh::{Client, ClientConfig, Event, Events, PeerId, Reliability};

const BULK: usize = 64 << 20;
const CHUNK: usize = 256 << 10;
const CHAT: u32 = 200;
/// Size of a chat message.
const CHAT_LEN: usize = 40;

fn numbered(lane: u8, n: u32, len: usize) -> Bytes {
    let mut v = vec![lane; len.max(5)];
    v[1..5].copy_from_slice(&n.to_be_bytes());
    v.into()
}

/// Lane 1: `bulk` bytes in `CHUNK` messages; lane 0: `CHAT` small messages, paced; the peer
/// checks that each lane's messages arrive once, in order, on their lane. Returns the chat
/// messages' one-way delays (median, max): both clients are in this process.
async fn transfer(
    a: &Client,
    b_id: PeerId,
    be: &mut Events,
    a_id: PeerId,
    bulk: usize,
) -> (Duration, Duration) {
    let sent_at = Mutex::new(HashMap::new());
    let mut delays = Vec::new();
    let bulk_task = async {
        for n in 0..(bulk / CHUNK) as u32 {
            a.send_on(b_id, 1, numbered(1, n, CHUNK), Reliability::Reliable)
                .await
                .unwrap();
        }
    };
    let chat = async {
        for n in 0..CHAT {
            sent_at.lock().unwrap().insert(n, Instant::now());
            a.send(b_id, numbered(0, n, CHAT_LEN), Reliability::Reliable)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    let receive = async {
        let mut next = [0u32; 2];
        let want = [CHAT, (bulk / CHUNK) as u32];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while next != want {
            let e = tokio::time::timeout_at(deadline, be.recv())
                .await
                .expect("every message within 120 s")
                .expect("events");
            let (from, data, lane) = match e {
                Event::Message {
                    from, data, lane, ..
                } => (from, data, lane),
                // The pair stays on the path it started on (server, or direct): a fallback
                // would be a different test.
                Event::PathChanged { peer, path } if peer == a_id => {
                    panic!("the path changed to {path} during the transfer")
                }
                _ => continue,
            };
            assert_eq!(from, a_id);
            let l = usize::from(lane);
            assert!(l < 2, "lane {lane}");
            assert_eq!(data[0], lane, "a lane {} message on lane {lane}", data[0]);
            let n = u32::from_be_bytes(data[1..5].try_into().unwrap());
            assert_eq!(n, next[l], "lane {lane}: out of order or twice");
            let len = if l == 0 { CHAT_LEN } else { CHUNK };
            assert!(
                data == numbered(lane, n, len),
                "lane {lane} message {n}: bytes differ"
            );
            next[l] += 1;
            if l == 0 {
                let at = sent_at.lock().unwrap().remove(&n).expect("sent");
                delays.push(at.elapsed());
            }
        }
    };
    tokio::join!(bulk_task, chat, receive);
    delays.sort();
    (delays[delays.len() / 2], delays[delays.len() - 1])
}

fn config(name: &str) -> ClientConfig {
    ClientConfig::new(name)
        .with_direct_backend(common::backend())
        .with_loopback_only(true)
        .with_lane(1, 0, 1)
        .with_send_window(16 << 20)
        .with_max_message_size(4 << 20)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_on_lane_1_and_chat_on_lane_0_on_the_server_path() {
    init_log();
    let server = server().await;
    let (a, mut ae) = client_with(&server, config("a").with_direct(false)).await;
    let (b, mut be) = client_with(&server, config("b").with_direct(false)).await;
    a.join("g").await.unwrap();
    b.join("g").await.unwrap();
    wait_joined(&mut ae, b.peer_id()).await;
    wait_joined(&mut be, a.peer_id()).await;
    let idle = transfer(&a, b.peer_id(), &mut be, a.peer_id(), 0).await;
    let t = Instant::now();
    let busy = transfer(&a, b.peer_id(), &mut be, a.peer_id(), BULK).await;
    eprintln!(
        "server path: {} MiB + {CHAT} chat in {:?}; lane-0 one-way delay (median, max) idle {idle:?}, during the transfer {busy:?}",
        BULK >> 20,
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_on_lane_1_and_chat_on_lane_0_on_the_direct_path() {
    init_log();
    let server = server().await;
    let DirectPair { a, b, mut be, .. } = direct_pair(&server, config).await;
    let idle = transfer(&a, b.peer_id(), &mut be, a.peer_id(), 0).await;
    let t = Instant::now();
    let busy = transfer(&a, b.peer_id(), &mut be, a.peer_id(), BULK).await;
    eprintln!(
        "direct path: {} MiB + {CHAT} chat in {:?}; lane-0 one-way delay (median, max) idle {idle:?}, during the transfer {busy:?}",
        BULK >> 20,
        t.elapsed()
    );
}

/// A peer without lanes (link version 2): lane 1 goes on lane 0, each lane still in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_2_peer_gets_every_lane_on_lane_0_in_order() {
    init_log();
    let server = server().await;
    let (a, mut ae) = client_with(&server, config("a").with_direct(false)).await;
    let (b, mut be) =
        client_with(&server, config("b").with_direct(false).with_link_version(2)).await;
    a.join("g").await.unwrap();
    b.join("g").await.unwrap();
    wait_joined(&mut ae, b.peer_id()).await;
    wait_joined(&mut be, a.peer_id()).await;
    let b_id = b.peer_id();
    for n in 0..50u32 {
        a.send_on(b_id, 1, numbered(1, n, 3000), Reliability::Reliable)
            .await
            .unwrap();
        a.send(b_id, numbered(0, n, CHAT_LEN), Reliability::Reliable)
            .await
            .unwrap();
    }
    let mut next = [0u32; 2];
    while next != [50, 50] {
        let (data, _) = next_message(&mut be, a.peer_id(), 10).await;
        let l = usize::from(data[0]);
        let n = u32::from_be_bytes(data[1..5].try_into().unwrap());
        assert_eq!(n, next[l], "lane {l}: out of order or twice");
        let len = if l == 0 { CHAT_LEN } else { 3000 };
        assert!(
            data == numbered(data[0], n, len),
            "lane {l} message {n}: bytes differ"
        );
        next[l] += 1;
    }
}
