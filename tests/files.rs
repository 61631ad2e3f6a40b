//! File transfer end to end (`docs/PROTOCOL.md` §8.9): real server, real clients, real files
//! in a temporary directory of this test.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use peermesh::{
    Client, ClientConfig, Event, Events, FileError, FileErrorCode, FileOffer, ReceivedFile,
};
use peermesh_interop_tests::UdpCut;
use peermesh_server::ServerHandle;
use sha2::{Digest, Sha256};

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("peermesh-files-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write_file(path: &Path, len: usize) -> [u8; 32] {
    let data: Vec<u8> = (0..len).map(|i| (i * 131 % 251) as u8).collect();
    std::fs::write(path, &data).unwrap();
    Sha256::digest(&data).into()
}

fn config(name: &str) -> ClientConfig {
    ClientConfig::new(name)
        .with_direct_backend(common::backend())
        .with_loopback_only(true)
}

/// Two clients in group "g" that stay on the server path and have seen each other join.
async fn server_path_pair(server: &ServerHandle) -> (Client, Events, Client, Events) {
    let (a, mut ae) = client_with(server, config("a").with_direct(false)).await;
    let (b, mut be) = client_with(server, config("b").with_direct(false)).await;
    a.join("g").await.unwrap();
    b.join("g").await.unwrap();
    wait_joined(&mut ae, b.peer_id()).await;
    wait_joined(&mut be, a.peer_id()).await;
    (a, ae, b, be)
}

/// The received file has the bytes of `src`.
fn assert_same_bytes(received: &ReceivedFile, src: &Path) {
    let path = received.path.as_ref().expect("received into a directory");
    assert!(
        std::fs::read(path).unwrap() == std::fs::read(src).unwrap(),
        "{} differs from {}",
        path.display(),
        src.display()
    );
}

/// The next offer among `events`.
async fn next_offer(events: &mut Events) -> FileOffer {
    match wait_for(events, 30, |e| matches!(e, Event::FileOffered(_))).await {
        Event::FileOffered(offer) => offer,
        _ => unreachable!(),
    }
}

/// Accept the next offer into `dir`, then wait for its end.
async fn receive_into(events: &mut Events, dir: &Path) -> Result<ReceivedFile, FileError> {
    let offer = next_offer(events).await;
    assert!(offer.accept_into(dir));
    match wait_for(events, 120, |e| {
        matches!(e, Event::FileReceived(_) | Event::FileFailed { .. })
    })
    .await
    {
        Event::FileReceived(f) => Ok(f),
        Event::FileFailed { error, .. } => Err(error),
        _ => unreachable!(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_goes_to_a_co_member_on_the_direct_path_and_its_hash_matches() {
    init_log();
    let server = server().await;
    let dir = temp_dir("direct");
    let (out, inbox) = (dir.join("out"), dir.join("in"));
    std::fs::create_dir_all(&out).unwrap();
    std::fs::create_dir_all(&inbox).unwrap();
    let src = out.join("photo.jpg");
    let sha = write_file(&src, (8 << 20) + 12345);
    let mut pair = direct_pair(&server, config).await;
    let t = Instant::now();
    let transfer = pair.a.send_file(pair.b.peer_id(), &src).await.unwrap();
    let progress = transfer.progress();
    let (sent, received) = tokio::join!(transfer.outcome(), receive_into(&mut pair.be, &inbox));
    let (sent, received) = (sent.unwrap(), received.unwrap());
    eprintln!("8 MiB on the direct path in {:?}", t.elapsed());
    assert_eq!(sent.sha256, sha);
    assert_eq!(sent.resumed_from, 0);
    assert_eq!(received.sha256, sha);
    assert_eq!(received.name, "photo.jpg");
    assert_eq!(received.path, Some(inbox.join("photo.jpg")));
    assert_same_bytes(&received, &src);
    assert_eq!(progress.borrow().done, (8 << 20) + 12345);
    // No partial files left behind.
    let names: Vec<_> = std::fs::read_dir(&inbox)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("photo.jpg")]);

    // The same name again: a new file next to it, never overwritten.
    let transfer = pair.a.send_file(pair.b.peer_id(), &src).await.unwrap();
    let (sent, received) = tokio::join!(transfer.outcome(), receive_into(&mut pair.be, &inbox));
    sent.unwrap();
    assert_eq!(received.unwrap().path, Some(inbox.join("photo (1).jpg")));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_offer_and_a_hostile_name() {
    init_log();
    let server = server().await;
    let dir = temp_dir("reject");
    let (a, _ae, b, mut be) = server_path_pair(&server).await;
    let src = dir.join("..evil");
    write_file(&src, 1000);
    let transfer = a.send_file(b.peer_id(), &src).await.unwrap();
    let offer = next_offer(&mut be).await;
    assert_eq!(offer.name, "_.evil", "no hidden files");
    assert_eq!(offer.size, 1000);
    assert!(offer.reject("not now"));
    assert!(!offer.accept_into(&dir), "answered already");
    match tokio::time::timeout(Duration::from_secs(30), transfer.outcome())
        .await
        .unwrap()
    {
        Err(FileError::Rejected { reason }) => assert_eq!(reason, "not now"),
        other => panic!("{other:?}"),
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_went_away_continues_from_the_verified_offset() {
    init_log();
    let server = server().await;
    let dir = temp_dir("resume");
    let inbox = dir.join("in");
    std::fs::create_dir_all(&inbox).unwrap();
    let src = dir.join("movie.mkv");
    let size = 64 << 20;
    let sha = write_file(&src, size);
    let (a, mut ae) = client_with(&server, config("a").with_direct(false)).await;
    a.join("g").await.unwrap();
    let (b, mut be) = client_with(&server, config("b").with_direct(false)).await;
    b.join("g").await.unwrap();
    wait_joined(&mut be, a.peer_id()).await;
    wait_joined(&mut ae, b.peer_id()).await;
    let transfer = a.send_file(b.peer_id(), &src).await.unwrap();
    let offer = next_offer(&mut be).await;
    offer.accept_into(&inbox);
    // The receiving process goes away once 8 MiB are in (as a killed process: no goodbye to
    // the transfer).
    wait_for(
        &mut be,
        60,
        |e| matches!(e, Event::FileProgress { done, .. } if *done >= 8 << 20),
    )
    .await;
    b.close().await;
    drop(be);
    match tokio::time::timeout(Duration::from_secs(30), transfer.outcome())
        .await
        .unwrap()
    {
        Err(FileError::PeerGone(_)) => {}
        other => panic!("{other:?}"),
    }
    assert!(!inbox.join("movie.mkv").exists());

    // It comes back (a new session) and the same file is sent again: only the rest goes.
    let (b2, mut be2) = client_with(&server, config("b").with_direct(false)).await;
    b2.join("g").await.unwrap();
    wait_joined(&mut be2, a.peer_id()).await;
    wait_joined(&mut ae, b2.peer_id()).await;
    let transfer = a.send_file(b2.peer_id(), &src).await.unwrap();
    let (sent, received) = tokio::join!(transfer.outcome(), receive_into(&mut be2, &inbox));
    let (sent, received) = (sent.unwrap(), received.unwrap());
    eprintln!(
        "resumed from {} MiB: {} MiB sent the second time",
        sent.resumed_from >> 20,
        (size as u64 - sent.resumed_from) >> 20
    );
    assert!(sent.resumed_from >= 8 << 20, "{}", sent.resumed_from);
    // What was checked when the session closed (the partial file is persisted then too).
    assert_eq!(sent.resumed_from % (256 << 10), 0, "a chunk boundary");
    assert_eq!(received.resumed_from, sent.resumed_from);
    assert_eq!(received.sha256, sha);
    assert_eq!(received.path, Some(inbox.join("movie.mkv")));
    assert_same_bytes(&received, &src);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A tmpfs of `mib` MiB mounted on a fresh directory, unmounted (and removed) when dropped.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(tag: &str, mib: usize) -> Option<SmallDisk> {
        let dir = temp_dir(tag);
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = std::fs::remove_dir_all(&dir);
            return None;
        }
        Some(SmallDisk(dir))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_ends_the_transfer_with_disk_full_on_both_sides() {
    init_log();
    // Root mounts a 4 MiB tmpfs (CI is root); anywhere else this test cannot run.
    let Some(disk) = SmallDisk::mount("full", 4) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "mounting a tmpfs failed in CI (root is needed)"
        );
        eprintln!("skipped: cannot mount a tmpfs here (not root)");
        return;
    };
    let server = server().await;
    let dir = temp_dir("full-src");
    let src = dir.join("too-big.bin");
    write_file(&src, 8 << 20);
    let (a, _ae, b, mut be) = server_path_pair(&server).await;
    let transfer = a.send_file(b.peer_id(), &src).await.unwrap();
    let (sent, received) = tokio::join!(transfer.outcome(), receive_into(&mut be, &disk.0));
    match received {
        Err(FileError::Failed { code, .. }) => assert_eq!(code, FileErrorCode::DiskFull),
        other => panic!("{other:?}"),
    }
    match sent {
        Err(FileError::Failed { code, .. }) => assert_eq!(code, FileErrorCode::DiskFull),
        other => panic!("{other:?}"),
    }
    assert!(!disk.0.join("too-big.bin").exists());
    drop(disk);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sender_cancels_and_the_receiver_hears_it() {
    cancel_mid_transfer(false).await;
}

/// The receiver cancels an accepted transfer: the sender hears it, nothing is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_receiver_cancels_and_the_sender_hears_it() {
    cancel_mid_transfer(true).await;
}

/// A 64 MiB transfer on the server path, cancelled by one side once the receiver has some of
/// it: both hear it, and nothing of the file is left in place.
async fn cancel_mid_transfer(receiver_cancels: bool) {
    init_log();
    let server = server().await;
    let dir = temp_dir(if receiver_cancels {
        "rcancel"
    } else {
        "cancel"
    });
    let (a, _ae, b, mut be) = server_path_pair(&server).await;
    let src = dir.join("big.bin");
    write_file(&src, 64 << 20);
    let inbox = dir.join("in");
    std::fs::create_dir_all(&inbox).unwrap();
    let transfer = a.send_file(b.peer_id(), &src).await.unwrap();
    let offer = next_offer(&mut be).await;
    offer.accept_into(&inbox);
    wait_for(&mut be, 30, |e| matches!(e, Event::FileProgress { .. })).await;
    if receiver_cancels {
        offer.cancel();
    } else {
        transfer.cancel();
    }
    match tokio::time::timeout(Duration::from_secs(30), transfer.outcome())
        .await
        .unwrap()
    {
        Err(FileError::Cancelled { by_peer, .. }) => assert_eq!(by_peer, receiver_cancels),
        other => panic!("{other:?}"),
    }
    match wait_for(&mut be, 30, |e| matches!(e, Event::FileFailed { .. })).await {
        Event::FileFailed {
            error: FileError::Cancelled { by_peer, .. },
            ..
        } => assert_eq!(by_peer, !receiver_cancels),
        other => panic!("{other:?}"),
    }
    assert!(
        !inbox.join("big.bin").exists(),
        "an incomplete file is never in place"
    );
    if receiver_cancels {
        let left: Vec<_> = std::fs::read_dir(&inbox)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "a cancelled file leaves nothing: {left:?}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A stream with no file behind it, received into the app's writer; a stream that ends early
/// fails on both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_into_a_writer_and_a_stream_that_ends_early() {
    init_log();
    let server = server().await;
    let dir = temp_dir("stream");
    let (a, _ae, b, mut be) = server_path_pair(&server).await;
    let len = (5 << 20) + 7;
    let data: Vec<u8> = (0..len).map(|i| (i * 7 % 253) as u8).collect();
    let sha: [u8; 32] = Sha256::digest(&data).into();
    let transfer = a
        .send_reader(
            b.peer_id(),
            "notes.txt",
            len as u64,
            std::io::Cursor::new(data.clone()),
        )
        .await
        .unwrap();
    let offer = next_offer(&mut be).await;
    assert_eq!((offer.name.as_str(), offer.size), ("notes.txt", len as u64));
    let out = dir.join("written");
    let file = tokio::fs::File::create(&out).await.unwrap();
    assert!(offer.accept_into_writer(file));
    let received = match wait_for(&mut be, 60, |e| {
        matches!(e, Event::FileReceived(_) | Event::FileFailed { .. })
    })
    .await
    {
        Event::FileReceived(f) => f,
        other => panic!("{other:?}"),
    };
    let sent = transfer.outcome().await.unwrap();
    assert_eq!(sent.sha256, sha, "the sender hashed the stream on the way");
    assert_eq!(received.sha256, sha);
    assert_eq!(received.path, None);
    assert_eq!(std::fs::read(&out).unwrap(), data);

    // Promised 1 MiB, gives 1000 bytes.
    let transfer = a
        .send_reader(
            b.peer_id(),
            "short.bin",
            1 << 20,
            std::io::Cursor::new(vec![b'x'; 1000]),
        )
        .await
        .unwrap();
    let offer = next_offer(&mut be).await;
    offer.accept_into(&dir);
    match transfer.outcome().await {
        Err(FileError::Io(reason)) => assert!(reason.contains("short.bin"), "{reason}"),
        other => panic!("{other:?}"),
    }
    match wait_for(&mut be, 30, |e| matches!(e, Event::FileFailed { .. })).await {
        Event::FileFailed {
            error: FileError::Failed { code, .. },
            ..
        } => assert_eq!(code, FileErrorCode::Io),
        other => panic!("{other:?}"),
    }
    assert!(!dir.join("short.bin").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A receiver's size cap refuses larger offers by itself, and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_caps_the_size_it_takes() {
    init_log();
    let server = server().await;
    let dir = temp_dir("cap");
    let (a, mut ae) = client_with(&server, config("a").with_direct(false)).await;
    let (b, mut be) = client_with(
        &server,
        config("b").with_direct(false).with_max_file_size(1 << 20),
    )
    .await;
    a.join("g").await.unwrap();
    b.join("g").await.unwrap();
    wait_joined(&mut ae, b.peer_id()).await;
    wait_joined(&mut be, a.peer_id()).await;
    let src = dir.join("huge.iso");
    write_file(&src, (1 << 20) + 1);
    let transfer = a.send_file(b.peer_id(), &src).await.unwrap();
    match transfer.outcome().await {
        Err(FileError::Failed { code, reason }) => {
            assert_eq!(code, FileErrorCode::TooLarge);
            assert!(reason.contains("1048576"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    match wait_for(&mut be, 30, |e| {
        matches!(e, Event::FileFailed { .. } | Event::FileOffered(_))
    })
    .await
    {
        Event::FileFailed {
            error: FileError::Failed { code, .. },
            ..
        } => assert_eq!(code, FileErrorCode::TooLarge),
        other => panic!("{other:?}"),
    }
    // At the cap is fine.
    let ok = dir.join("ok.iso");
    write_file(&ok, 1 << 20);
    let inbox = dir.join("in");
    std::fs::create_dir_all(&inbox).unwrap();
    let transfer = a.send_file(b.peer_id(), &ok).await.unwrap();
    let (sent, received) = tokio::join!(transfer.outcome(), receive_into(&mut be, &inbox));
    sent.unwrap();
    received.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// 64 MiB on the direct path, cut (nft) mid-transfer: the link falls back to the server, the
/// transfer goes on and completes there or back on the direct path, and the hash matches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_mib_file_survives_a_cut_of_the_direct_path() {
    const PORTS: (u16, u16) = (47500, 47519);
    init_log();
    let server = server().await;
    let dir = temp_dir("cut");
    let inbox = dir.join("in");
    std::fs::create_dir_all(&inbox).unwrap();
    let src = dir.join("video.mp4");
    let size = 64 << 20;
    let t0 = Instant::now();
    let sha = write_file(&src, size);
    eprintln!("written in {:?}", t0.elapsed());
    let cfg = |n: &str| config(n).with_udp_ports(PORTS.0, PORTS.1);
    let DirectPair {
        a,
        mut ae,
        b,
        mut be,
        ..
    } = direct_pair(&server, cfg).await;
    let (ia, ib) = (a.peer_id(), b.peer_id());
    tokio::spawn(async move { while ae.recv().await.is_some() {} });
    let transfer = a.send_file(ib, &src).await.unwrap();
    let progress = transfer.progress();
    let outcome = tokio::spawn(transfer.outcome());
    let offer = next_offer(&mut be).await;
    eprintln!("offered at {:?}", t0.elapsed());
    offer.accept_into(&inbox);
    wait_for(
        &mut be,
        60,
        |e| matches!(e, Event::FileProgress { done, .. } if *done >= 8 << 20),
    )
    .await;
    eprintln!("8 MiB at {:?}", t0.elapsed());
    assert!(matches!(a.path(ib).unwrap(), peermesh::Path::Direct { .. }));
    let cut = UdpCut::new("files", PORTS);
    let at_cut = progress.borrow().done;
    wait_path(&a, ib, false, 10).await;
    wait_path(&b, ia, false, 10).await;
    // Some of it goes on the server path while the direct path is cut.
    let t = Instant::now();
    while progress.borrow().done < (at_cut + (8 << 20)).min(size as u64)
        && t.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let on_server = progress.borrow().done - at_cut;
    eprintln!("cut ends at {:?}", t0.elapsed());
    drop(cut);
    let received = match wait_for(&mut be, 120, |e| {
        matches!(e, Event::FileReceived(_) | Event::FileFailed { .. })
    })
    .await
    {
        Event::FileReceived(f) => f,
        other => panic!("{other:?}"),
    };
    let sent = outcome.await.unwrap().unwrap();
    eprintln!("done at {:?}", t0.elapsed());
    eprintln!(
        "cut at {} MiB, {} MiB sent during the cut; {:?}",
        at_cut >> 20,
        on_server >> 20,
        a.link_stats(ib).unwrap()
    );
    assert!(on_server > 0, "nothing moved on the server path");
    assert_eq!(sent.sha256, sha);
    assert_eq!(received.sha256, sha);
    assert_same_bytes(&received, &src);
    assert!(a.link_stats(ib).unwrap().path_changes >= 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Two files at once to the same peer share the link: when the first is complete, the second
/// is at least half way (the same size, offered at the same time), and both hashes match.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_transfers_at_once_share_the_link() {
    init_log();
    let server = server().await;
    let dir = temp_dir("two");
    let inbox = dir.join("in");
    std::fs::create_dir_all(&inbox).unwrap();
    let (one, two) = (dir.join("one.bin"), dir.join("two.bin"));
    let size = 16 << 20;
    let sha_one = write_file(&one, size);
    let sha_two = {
        let data: Vec<u8> = (0..size).map(|i| (i * 17 % 241) as u8).collect();
        std::fs::write(&two, &data).unwrap();
        <[u8; 32]>::from(Sha256::digest(&data))
    };
    let (a, _ae, b, mut be) = server_path_pair(&server).await;
    let t1 = a.send_file(b.peer_id(), &one).await.unwrap();
    let t2 = a.send_file(b.peer_id(), &two).await.unwrap();
    let (o1, o2) = (tokio::spawn(t1.outcome()), tokio::spawn(t2.outcome()));
    // Both offers are accepted together, so that neither starts first.
    let mut offers = Vec::new();
    while offers.len() < 2 {
        offers.push(next_offer(&mut be).await);
    }
    for offer in &offers {
        offer.accept_into(&inbox);
    }
    let mut received = Vec::new();
    let mut other_at_first_done = None;
    // What the receiver has written and checked, per transfer.
    let mut done = std::collections::HashMap::new();
    while received.len() < 2 {
        match wait_for(&mut be, 120, |e| {
            matches!(
                e,
                Event::FileProgress { .. } | Event::FileReceived(_) | Event::FileFailed { .. }
            )
        })
        .await
        {
            Event::FileProgress {
                transfer, done: d, ..
            } => {
                done.insert(transfer, d);
            }
            Event::FileReceived(f) => {
                if received.is_empty() {
                    let other = done
                        .iter()
                        .find(|(t, _)| **t != f.transfer)
                        .map_or(0, |(_, d)| *d);
                    other_at_first_done = Some(other);
                }
                received.push(f);
            }
            other => panic!("{other:?}"),
        }
    }
    let (s1, s2) = (o1.await.unwrap().unwrap(), o2.await.unwrap().unwrap());
    assert_eq!((s1.sha256, s2.sha256), (sha_one, sha_two));
    for f in &received {
        let want = if f.name == "one.bin" {
            sha_one
        } else {
            sha_two
        };
        assert_eq!(f.sha256, want);
    }
    let other = other_at_first_done.unwrap();
    eprintln!(
        "when the first was complete the other was at {} of {} MiB",
        other >> 20,
        size >> 20
    );
    assert!(other >= size as u64 / 2, "{other} of {size}: not shared");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The sender's signaling connection is cut silently (a proxy stops forwarding) while a file
/// goes on the server path: the session resumes, and the same transfer completes, from where it
/// was (nothing sent twice from the start, the hash matches).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_on_the_server_path_survives_a_session_resume() {
    use common::proxy::Proxy;
    init_log();
    let server = server_with(peermesh_server::Config {
        heartbeat_timeout: Duration::from_secs(3),
        ..Default::default()
    })
    .await;
    let dir = temp_dir("resume-session");
    let inbox = dir.join("in");
    std::fs::create_dir_all(&inbox).unwrap();
    let src = dir.join("album.zip");
    let size = 24 << 20;
    let sha = write_file(&src, size);
    let proxy = Proxy::start("127.0.0.1:0".parse().unwrap(), server.local_addr()).await;
    let cfg = |name: &str| {
        config(name)
            .with_direct(false)
            .with_reconnect(Some(peermesh::Reconnect {
                initial_delay: Duration::from_millis(100),
                max_delay: Duration::from_millis(500),
                max_attempts: None,
            }))
    };
    let (a, mut ae) = Client::connect(&proxy.url(), cfg("a")).await.unwrap();
    let (b, mut be) = client_with(&server, cfg("b")).await;
    a.join("g").await.unwrap();
    b.join("g").await.unwrap();
    wait_joined(&mut ae, b.peer_id()).await;
    wait_joined(&mut be, a.peer_id()).await;
    let ia = a.peer_id();
    let transfer = a.send_file(b.peer_id(), &src).await.unwrap();
    let outcome = tokio::spawn(transfer.outcome());
    let offer = next_offer(&mut be).await;
    offer.accept_into(&inbox);
    wait_for(
        &mut be,
        60,
        |e| matches!(e, Event::FileProgress { done, .. } if *done >= 4 << 20),
    )
    .await;
    proxy.cut();
    wait_for(
        &mut ae,
        30,
        |e| matches!(e, Event::Reconnected { resumed: true, peer } if *peer == ia),
    )
    .await;
    let received = match wait_for(&mut be, 120, |e| {
        matches!(
            e,
            Event::FileReceived(_) | Event::FileFailed { .. } | Event::MemberLeft { .. }
        )
    })
    .await
    {
        Event::FileReceived(f) => f,
        other => panic!("{other:?}"),
    };
    let sent = outcome.await.unwrap().unwrap();
    assert_eq!(sent.resumed_from, 0, "the same transfer went on");
    assert_eq!((sent.sha256, received.sha256), (sha, sha));
    assert_same_bytes(&received, &src);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Two different files of the same name from two members, received into one directory at the
/// same time (as the chat example does): each keeps its own bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_files_of_the_same_name_at_once_stay_apart() {
    init_log();
    let server = server().await;
    let dir = temp_dir("same-name");
    let inbox = dir.join("in");
    std::fs::create_dir_all(dir.join("a")).unwrap();
    std::fs::create_dir_all(dir.join("c")).unwrap();
    std::fs::create_dir_all(&inbox).unwrap();
    let (from_a, from_c) = (dir.join("a/photo.jpg"), dir.join("c/photo.jpg"));
    let size = 12 << 20;
    let sha_a = write_file(&from_a, size);
    let data_c: Vec<u8> = (0..size).map(|i| (i * 29 % 239) as u8).collect();
    std::fs::write(&from_c, &data_c).unwrap();
    let sha_c: [u8; 32] = Sha256::digest(&data_c).into();
    let (a, mut ae, b, mut be) = server_path_pair(&server).await;
    let (c, mut ce) = client_with(&server, config("c").with_direct(false)).await;
    c.join("g").await.unwrap();
    wait_joined(&mut be, c.peer_id()).await;
    wait_joined(&mut ce, b.peer_id()).await;
    tokio::spawn(async move { while ae.recv().await.is_some() {} });
    let ta = a.send_file(b.peer_id(), &from_a).await.unwrap();
    let tc = c.send_file(b.peer_id(), &from_c).await.unwrap();
    let mut offers = Vec::new();
    while offers.len() < 2 {
        offers.push(next_offer(&mut be).await);
    }
    for offer in &offers {
        assert_eq!(offer.name, "photo.jpg");
        offer.accept_into(&inbox);
    }
    let mut received = Vec::new();
    while received.len() < 2 {
        match wait_for(&mut be, 120, |e| {
            matches!(e, Event::FileReceived(_) | Event::FileFailed { .. })
        })
        .await
        {
            Event::FileReceived(f) => received.push(f),
            other => panic!("{other:?}"),
        }
    }
    let (sa, sc) = tokio::join!(ta.outcome(), tc.outcome());
    assert_eq!((sa.unwrap().sha256, sc.unwrap().sha256), (sha_a, sha_c));
    for f in &received {
        let want = if f.from == a.peer_id() {
            std::fs::read(&from_a).unwrap()
        } else {
            data_c.clone()
        };
        let sha = if f.from == a.peer_id() { sha_a } else { sha_c };
        assert_eq!(f.sha256, sha);
        assert!(
            std::fs::read(f.path.as_ref().unwrap()).unwrap() == want,
            "{} has the other file's bytes",
            f.name
        );
    }
    let mut names: Vec<_> = received.iter().map(|f| f.name.clone()).collect();
    names.sort();
    assert_eq!(names, ["photo (1).jpg", "photo.jpg"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A sender whose largest message is smaller than a chunk sends smaller chunks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_max_message_size_makes_small_chunks() {
    init_log();
    let server = server().await;
    let dir = temp_dir("small-msgs");
    let (a, mut ae) = client_with(
        &server,
        config("a")
            .with_direct(false)
            .with_max_message_size(16 << 10),
    )
    .await;
    let (b, mut be) = client_with(&server, config("b").with_direct(false)).await;
    a.join("g").await.unwrap();
    b.join("g").await.unwrap();
    wait_joined(&mut ae, b.peer_id()).await;
    wait_joined(&mut be, a.peer_id()).await;
    let src = dir.join("small.bin");
    let sha = write_file(&src, (1 << 20) + 3);
    let inbox = dir.join("in");
    std::fs::create_dir_all(&inbox).unwrap();
    let transfer = a.send_file(b.peer_id(), &src).await.unwrap();
    let (sent, received) = tokio::join!(transfer.outcome(), receive_into(&mut be, &inbox));
    assert_eq!(sent.unwrap().sha256, sha);
    assert_eq!(received.unwrap().sha256, sha);
    std::fs::remove_dir_all(&dir).unwrap();
}
