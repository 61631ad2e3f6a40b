//! The transfers: one task per file being sent or received, each the only owner of its state.
//! Messages of the file lane reach a transfer through [`Files::deliver`], which the link task
//! awaits (a transfer that is busy writing holds the link's file lane back: the window then
//! holds the sender back, so nothing piles up in memory).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};

use super::name::safe_file_name;
use super::part::{Failure, PartFile, PERSIST_EVERY};
use super::wire::{FileErrorCode, FileMsg, Hash};
use super::{FileError, FileOffer, FileTransfer, Progress, ReceivedFile, SentFile, TransferId};
use crate::link::LinkHandle;
use crate::protocol::{LinkId, PeerId};
use crate::Event;

/// Most bytes a sender has sent and not seen VERIFIED (the receiver persists every 4 MiB).
const UNVERIFIED_MAX: u64 = 16 << 20;
/// Messages of one transfer queued towards its task. A receiving task gets chunks (so the link
/// task waits while a receiver writes: backpressure) and never waits for the link task itself
/// ([`Files::post`]). A sending task may wait for the link task (the window); what comes to it
/// (ACCEPT, a VERIFIED per 4 MiB, DONE, CANCEL) is far fewer than this while it is unverified
/// by at most `UNVERIFIED_MAX`, so the link task never waits on it for long.
const ROUTE_QUEUE: usize = 64;

/// The link a transfer talks on, looked up by peer when needed.
pub(crate) type LinkLookup = Arc<dyn Fn(PeerId) -> Option<LinkHandle> + Send + Sync>;

/// A file-lane message for one transfer, owned.
#[derive(Debug)]
enum Inbound {
    Accept(u64),
    Reject(FileErrorCode, String),
    Chunk(u64, Hash, Bytes),
    Verified(u64),
    End(Hash),
    Done,
    Cancel(FileErrorCode, String),
}

/// What every transfer of a client shares: where each transfer's messages go.
pub(crate) struct Files {
    routes: Mutex<HashMap<(PeerId, u64), Route>>,
    events: mpsc::Sender<Event>,
    links: LinkLookup,
    /// Offers above this size are refused (`too_large`) without asking the app.
    max_size: Option<u64>,
    /// The shared (resumable) partial files that a transfer is receiving into.
    parts: Mutex<HashSet<PathBuf>>,
}

/// Where one transfer's messages go.
#[derive(Clone)]
struct Route {
    tx: mpsc::Sender<Inbound>,
    /// The link the transfer runs on: it ends with that link, not with a later one to the
    /// same peer.
    link: LinkId,
    /// A transfer we send: it may be waiting for the link task, so the link task never waits
    /// for it (an honest receiver sends it far fewer messages than its queue holds).
    sending: bool,
}

/// A transfer's hold on a shared partial file; let go when dropped.
struct PartClaim {
    files: Arc<Files>,
    path: PathBuf,
}

impl Drop for PartClaim {
    fn drop(&mut self) {
        self.files
            .parts
            .lock()
            .expect("partial files lock")
            .remove(&self.path);
    }
}

/// Where the bytes of a file being sent come from.
pub(crate) enum Source {
    /// A file: hashed before the offer, so that a receiver can continue a partial copy.
    Path(PathBuf),
    /// A stream: its hash is known only at the end, so it cannot be resumed.
    Reader(Box<dyn AsyncRead + Send + Unpin>),
}

/// Where an accepted file goes.
pub(crate) enum Sink {
    /// A file in this directory (resumable).
    Dir(PathBuf),
    /// The app's writer.
    Writer(Box<dyn AsyncWrite + Send + Unpin>),
}

/// The app's answer to an offer.
pub(crate) enum Decision {
    Accept(Sink),
    Reject(String),
}

impl std::fmt::Debug for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Decision::Accept(Sink::Dir(dir)) => write!(f, "Accept({})", dir.display()),
            Decision::Accept(Sink::Writer(_)) => f.write_str("Accept(writer)"),
            Decision::Reject(reason) => write!(f, "Reject({reason:?})"),
        }
    }
}

impl Files {
    pub(crate) fn new(
        events: mpsc::Sender<Event>,
        links: LinkLookup,
        max_size: Option<u64>,
    ) -> Arc<Files> {
        Arc::new(Files {
            routes: Mutex::new(HashMap::new()),
            events,
            links,
            max_size,
            parts: Mutex::new(HashSet::new()),
        })
    }

    /// A route for a new transfer with `peer`: `None` if the id is taken (CANCEL names only
    /// the id, so one id is never used by two transfers with one peer at once).
    fn route(
        &self,
        peer: PeerId,
        link: LinkId,
        transfer: u64,
        sending: bool,
    ) -> Option<mpsc::Receiver<Inbound>> {
        let (tx, rx) = mpsc::channel(ROUTE_QUEUE);
        let mut routes = self.routes.lock().expect("file routes lock");
        if routes.contains_key(&(peer, transfer)) {
            return None;
        }
        routes.insert((peer, transfer), Route { tx, link, sending });
        Some(rx)
    }

    fn unroute(&self, peer: PeerId, link: LinkId, transfer: u64) {
        let mut routes = self.routes.lock().expect("file routes lock");
        if routes
            .get(&(peer, transfer))
            .is_some_and(|r| r.link == link)
        {
            routes.remove(&(peer, transfer));
        }
    }

    /// The link `link` to `peer` ended: its transfers' message streams end.
    pub(crate) fn link_gone(&self, peer: PeerId, link: LinkId) {
        self.routes
            .lock()
            .expect("file routes lock")
            .retain(|(p, _), r| *p != peer || r.link != link);
    }

    /// A message of the file lane from `peer`.
    pub(crate) async fn deliver(self: &Arc<Self>, peer: PeerId, link: LinkId, data: Bytes) {
        let msg = match FileMsg::decode(&data) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(peer, "dropping a file-lane message: {e}");
                return;
            }
        };
        let transfer = msg.transfer();
        let inbound = match msg {
            FileMsg::Offer {
                size, sha256, name, ..
            } => {
                self.offered(peer, link, transfer, size, sha256, name).await;
                return;
            }
            FileMsg::Accept { offset, .. } => Inbound::Accept(offset),
            FileMsg::Reject { code, reason, .. } => Inbound::Reject(code, reason.into()),
            FileMsg::Chunk {
                offset,
                sha256,
                bytes,
                ..
            } => Inbound::Chunk(offset, sha256, data.slice_ref(bytes)),
            FileMsg::Verified { offset, .. } => Inbound::Verified(offset),
            FileMsg::End { sha256, .. } => Inbound::End(sha256),
            FileMsg::Done { .. } => Inbound::Done,
            FileMsg::Cancel { code, reason, .. } => Inbound::Cancel(code, reason.into()),
        };
        let route = self
            .routes
            .lock()
            .expect("file routes lock")
            .get(&(peer, transfer))
            .filter(|r| r.link == link)
            .cloned();
        match route {
            // A sending transfer may be waiting for the link task: never wait for it.
            Some(Route {
                tx, sending: true, ..
            }) => {
                if let Err(mpsc::error::TrySendError::Full(m)) = tx.try_send(inbound) {
                    tracing::warn!(peer, transfer, "dropping {m:?}: the peer sends too much");
                }
            }
            // Awaited: a transfer busy on its disk holds the file lane back.
            Some(Route { tx, .. }) => {
                let _ = tx.send(inbound).await;
            }
            None => tracing::debug!(peer, transfer, "file message for no transfer"),
        }
    }

    // ---- sending ----

    /// Send the file at `path` to `peer` (`Client::send_file`).
    pub(crate) async fn send_path(
        self: &Arc<Self>,
        peer: PeerId,
        path: &Path,
    ) -> Result<FileTransfer, FileError> {
        let link = self.check_peer(peer).await?;
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| FileError::Io(format!("{}: no file name", path.display())))?
            .to_string();
        let size = tokio::fs::metadata(path)
            .await
            .map_err(|e| FileError::Io(format!("{}: {e}", path.display())))?
            .len();
        let p = path.to_path_buf();
        let sha256 = tokio::task::spawn_blocking(move || hash_file(&p))
            .await
            .map_err(|e| FileError::Io(e.to_string()))?
            .map_err(|e| FileError::Io(format!("{}: {e}", path.display())))?;
        Ok(self.start_sending(link, name, size, sha256, Source::Path(path.to_path_buf())))
    }

    /// Send `size` bytes read from `reader` as a file called `name` (`Client::send_reader`).
    pub(crate) async fn send_reader(
        self: &Arc<Self>,
        peer: PeerId,
        name: &str,
        size: u64,
        reader: Box<dyn AsyncRead + Send + Unpin>,
    ) -> Result<FileTransfer, FileError> {
        let link = self.check_peer(peer).await?;
        Ok(self.start_sending(
            link,
            name.to_string(),
            size,
            [0; 32],
            Source::Reader(reader),
        ))
    }

    /// The link to the peer, which takes files.
    async fn check_peer(&self, peer: PeerId) -> Result<LinkHandle, FileError> {
        let link = (self.links)(peer).ok_or(FileError::PeerGone(peer))?;
        if link
            .peer_files()
            .await
            .map_err(|_| FileError::PeerGone(peer))?
        {
            Ok(link)
        } else {
            Err(FileError::Unsupported(peer))
        }
    }

    fn start_sending(
        self: &Arc<Self>,
        link: LinkHandle,
        name: String,
        size: u64,
        sha256: Hash,
        source: Source,
    ) -> FileTransfer {
        let (peer, link_id) = (link.peer, link.link_id);
        // A fresh id (the peer's transfers to us included).
        let (transfer, rx) = loop {
            let id = rand::random::<u64>();
            if let Some(rx) = self.route(peer, link_id, id, true) {
                break (id, rx);
            }
        };
        let (progress_tx, progress) = watch::channel(Progress::new(size));
        let (cancel_tx, cancel) = watch::channel(false);
        let (outcome_tx, outcome) = oneshot::channel();
        let files = self.clone();
        tokio::spawn(async move {
            let sending = Sending {
                link,
                transfer,
                name,
                size,
                sha256,
                inbox: Inbox::new(peer, rx, cancel),
                progress: progress_tx,
            };
            let r = sending.run(source).await;
            files.unroute(peer, link_id, transfer);
            let _ = outcome_tx.send(r);
        });
        FileTransfer {
            id: TransferId(transfer),
            peer,
            progress,
            cancel: cancel_tx,
            outcome,
        }
    }

    // ---- receiving ----

    async fn offered(
        self: &Arc<Self>,
        peer: PeerId,
        link_id: LinkId,
        transfer: u64,
        size: u64,
        sha256: Hash,
        offered_name: &str,
    ) {
        let name = safe_file_name(offered_name);
        let Some(link) = (self.links)(peer).filter(|l| l.link_id == link_id) else {
            tracing::debug!(peer, transfer, "an OFFER on a link that is gone");
            return;
        };
        if let Some(max) = self.max_size.filter(|max| size > *max) {
            let reason = format!("{size} bytes; this receiver takes at most {max}");
            let _ = post(
                &link,
                FileMsg::Reject {
                    transfer,
                    code: FileErrorCode::TooLarge,
                    reason: &reason,
                },
            );
            tracing::info!(peer, transfer, "refused the offer of {name:?}: {reason}");
            let _ = self
                .events
                .send(Event::FileFailed {
                    transfer: TransferId(transfer),
                    peer,
                    error: FileError::Failed {
                        code: FileErrorCode::TooLarge,
                        reason: format!("{name}: {reason}"),
                    },
                })
                .await;
            return;
        }
        let Some(rx) = self.route(peer, link_id, transfer, false) else {
            tracing::warn!(
                peer,
                transfer,
                "an OFFER with the id of a transfer in progress"
            );
            let _ = post(
                &link,
                FileMsg::Reject {
                    transfer,
                    code: FileErrorCode::Protocol,
                    reason: "this id is in use",
                },
            );
            return;
        };
        let (decide, decision) = oneshot::channel();
        let (cancel_tx, cancel) = watch::channel(false);
        let offer = FileOffer::new(
            TransferId(transfer),
            peer,
            name.clone(),
            size,
            decide,
            cancel_tx,
        );
        let files = self.clone();
        tokio::spawn(async move {
            let receiving = Receiving {
                files: files.clone(),
                link,
                peer,
                transfer,
                name,
                size,
                sha256,
                inbox: Inbox::new(peer, rx, cancel),
            };
            receiving.run(decision).await;
            files.unroute(peer, link_id, transfer);
        });
        let _ = self.events.send(Event::FileOffered(offer)).await;
    }
}

/// A receiver's message: queued on the link without waiting for the link task.
fn post(link: &LinkHandle, msg: FileMsg<'_>) -> Result<(), FileError> {
    link.post_file_msg(Bytes::from(msg.encode()))
        .map_err(|e| link_error(link.peer, e))
}

/// A sender's message: waits for room in the window.
async fn send_msg(link: &LinkHandle, msg: FileMsg<'_>) -> Result<(), FileError> {
    link.send_file_msg(Bytes::from(msg.encode()))
        .await
        .map_err(|e| link_error(link.peer, e))
}

/// Why the link did not take a file message: gone, or (never from a reference peer) a peer
/// this end decided has no file lane, or a message the link refuses.
fn link_error(peer: PeerId, e: crate::Error) -> FileError {
    match e {
        crate::Error::UnknownPeer(_) => FileError::PeerGone(peer),
        e => FileError::Failed {
            code: FileErrorCode::Protocol,
            reason: format!("the link refused a file message: {e}"),
        },
    }
}

/// SHA-256 of a whole file (blocking).
fn hash_file(path: &Path) -> std::io::Result<Hash> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finalize().into());
        }
        h.update(&buf[..n]);
    }
}

struct Sending {
    /// The link it runs on (and ends with).
    link: LinkHandle,
    transfer: u64,
    name: String,
    size: u64,
    sha256: Hash,
    inbox: Inbox,
    progress: watch::Sender<Progress>,
}

/// What comes to one transfer: the peer's messages for it, and the app's cancel.
struct Inbox {
    peer: PeerId,
    rx: mpsc::Receiver<Inbound>,
    cancel: watch::Receiver<bool>,
    /// The peer's REJECT or CANCEL ended it: nothing to tell the peer.
    peer_ended: bool,
}

impl Inbox {
    fn new(peer: PeerId, rx: mpsc::Receiver<Inbound>, cancel: watch::Receiver<bool>) -> Self {
        Inbox {
            peer,
            rx,
            cancel,
            peer_ended: false,
        }
    }

    /// The peer's next message, or the app's cancel.
    async fn next(&mut self) -> Result<Inbound, FileError> {
        let m = tokio::select! {
            m = self.rx.recv() => m.ok_or(FileError::PeerGone(self.peer)),
            Ok(_) = self.cancel.wait_for(|c| *c) => Err(FileError::cancelled_here()),
        };
        if let Ok(m) = &m {
            self.noticed(m);
        }
        m
    }

    /// A message already waiting, if any.
    fn try_next(&mut self) -> Option<Inbound> {
        let m = self.rx.try_recv().ok()?;
        self.noticed(&m);
        Some(m)
    }

    fn noticed(&mut self, m: &Inbound) {
        self.peer_ended |= matches!(m, Inbound::Reject(..) | Inbound::Cancel(..));
    }

    /// The app's cancel, once it has come.
    async fn cancelled(&mut self) {
        if self.cancel.wait_for(|c| *c).await.is_err() {
            // The handle went away without cancelling: never.
            std::future::pending::<()>().await;
        }
    }
}

impl Sending {
    async fn run(mut self, source: Source) -> Result<SentFile, FileError> {
        let transfer = self.transfer;
        let r = self.exchange(source).await;
        if let Err(e) = &r {
            if let Some((code, reason)) = e.to_send().filter(|_| !self.inbox.peer_ended) {
                let _ = send_msg(
                    &self.link,
                    FileMsg::Cancel {
                        transfer,
                        code,
                        reason: &reason,
                    },
                )
                .await;
            }
        }
        r
    }

    async fn exchange(&mut self, source: Source) -> Result<SentFile, FileError> {
        let transfer = self.transfer;
        send_msg(
            &self.link,
            FileMsg::Offer {
                transfer,
                size: self.size,
                sha256: self.sha256,
                name: &self.name,
            },
        )
        .await?;
        let offset = match self.inbox.next().await? {
            Inbound::Accept(offset) if offset <= self.size => offset,
            Inbound::Reject(code, reason) => return Err(FileError::from_peer(code, reason)),
            Inbound::Cancel(code, reason) => return Err(FileError::from_peer(code, reason)),
            other => return Err(FileError::protocol(format!("{other:?} before ACCEPT"))),
        };
        // A stream has no hash up front: it is hashed as it goes, and never resumed.
        let (mut reader, what, mut streamed): (Box<dyn AsyncRead + Send + Unpin>, String, _) =
            match source {
                Source::Path(path) => {
                    let io = |e| FileError::Io(format!("{}: {e}", path.display()));
                    let mut file = tokio::fs::File::open(&path).await.map_err(io)?;
                    file.seek(std::io::SeekFrom::Start(offset))
                        .await
                        .map_err(io)?;
                    (Box::new(file), path.display().to_string(), None)
                }
                Source::Reader(_) if offset != 0 => {
                    return Err(FileError::protocol(format!(
                        "ACCEPT at {offset} of a stream (its OFFER had no hash)"
                    )))
                }
                Source::Reader(r) => (r, self.name.clone(), Some(Sha256::new())),
            };
        let started = Instant::now();
        let (mut sent, mut verified) = (offset, offset);
        let chunk_max = self.link.file_chunk_max();
        let mut buf = vec![0; chunk_max];
        while sent < self.size {
            // Bounded: the receiver persists what it has every few MiB and says so.
            while sent - verified > UNVERIFIED_MAX {
                match self.inbox.next().await? {
                    Inbound::Verified(v) if v <= sent => verified = verified.max(v),
                    Inbound::Cancel(code, reason) => {
                        return Err(FileError::from_peer(code, reason))
                    }
                    other => return Err(FileError::protocol(format!("{other:?} while sending"))),
                }
            }
            while let Some(m) = self.inbox.try_next() {
                match m {
                    Inbound::Verified(v) if v <= sent => verified = verified.max(v),
                    Inbound::Cancel(code, reason) => {
                        return Err(FileError::from_peer(code, reason))
                    }
                    other => return Err(FileError::protocol(format!("{other:?} while sending"))),
                }
            }
            if *self.inbox.cancel.borrow() {
                return Err(FileError::cancelled_here());
            }
            let n = (self.size - sent).min(chunk_max as u64) as usize;
            reader.read_exact(&mut buf[..n]).await.map_err(|e| {
                FileError::Io(format!("{what}: {e} (after {sent} of {} bytes)", self.size))
            })?;
            let chunk = &buf[..n];
            if let Some(h) = streamed.as_mut() {
                h.update(chunk);
            }
            let sha256: Hash = Sha256::digest(chunk).into();
            let msg = FileMsg::Chunk {
                transfer,
                offset: sent,
                sha256,
                bytes: chunk,
            };
            // The app's cancel is heard while the chunk waits for room (dropping the send
            // withdraws it).
            tokio::select! {
                r = send_msg(&self.link, msg) => r?,
                () = self.inbox.cancelled() => return Err(FileError::cancelled_here()),
            }
            sent += n as u64;
            self.progress
                .send_replace(Progress::at(sent, self.size, offset, started.elapsed()));
        }
        if let Some(h) = streamed {
            self.sha256 = h.finalize().into();
        }
        send_msg(
            &self.link,
            FileMsg::End {
                transfer,
                sha256: self.sha256,
            },
        )
        .await?;
        loop {
            match self.inbox.next().await? {
                Inbound::Verified(_) => {}
                Inbound::Done => {
                    return Ok(SentFile {
                        name: self.name.clone(),
                        size: self.size,
                        sha256: self.sha256,
                        resumed_from: offset,
                    })
                }
                Inbound::Cancel(code, reason) => return Err(FileError::from_peer(code, reason)),
                other => return Err(FileError::protocol(format!("{other:?} after END"))),
            }
        }
    }
}

struct Receiving {
    files: Arc<Files>,
    /// The link it runs on (and ends with).
    link: LinkHandle,
    peer: PeerId,
    transfer: u64,
    name: String,
    size: u64,
    sha256: Hash,
    inbox: Inbox,
}

impl Receiving {
    async fn run(mut self, decision: oneshot::Receiver<Decision>) {
        let (peer, transfer) = (self.peer, self.transfer);
        let sink = tokio::select! {
            d = decision => match d {
                Ok(Decision::Accept(sink)) => Ok(sink),
                Ok(Decision::Reject(reason)) => {
                    let _ = post(&self.link, FileMsg::Reject { transfer, code: FileErrorCode::Rejected, reason: &reason });
                    return;
                }
                // The offer was dropped unanswered: that is a no.
                Err(_) => {
                    let _ = post(&self.link, FileMsg::Reject { transfer, code: FileErrorCode::Rejected, reason: "not accepted" });
                    return;
                }
            },
            // The sender cancelled (or left) before the app answered.
            m = self.inbox.rx.recv() => match m {
                Some(Inbound::Cancel(code, reason)) => {
                    Err((FileError::from_peer(code, reason), true))
                }
                None => Err((FileError::PeerGone(peer), true)),
                Some(other) => Err((FileError::protocol(format!("{other:?} before ACCEPT")), false)),
            },
            Ok(_) = self.inbox.cancel.wait_for(|c| *c) => {
                let _ = post(&self.link, FileMsg::Reject { transfer, code: FileErrorCode::Rejected, reason: "cancelled" });
                return;
            }
        };
        let sink = match sink {
            Ok(sink) => sink,
            Err((e, from_peer)) => {
                if let Some((code, reason)) = e.to_send().filter(|_| !from_peer) {
                    let _ = post(
                        &self.link,
                        FileMsg::Cancel {
                            transfer,
                            code,
                            reason: &reason,
                        },
                    );
                }
                return self.failed(e).await;
            }
        };
        let r = match sink {
            Sink::Dir(dir) => self.receive(&dir).await,
            Sink::Writer(w) => self.receive_into(w).await,
        };
        match r {
            Ok(file) => {
                let _ = self.files.events.send(Event::FileReceived(file)).await;
            }
            Err(e) => {
                if let Some((code, reason)) = e.to_send().filter(|_| !self.inbox.peer_ended) {
                    let _ = post(
                        &self.link,
                        FileMsg::Cancel {
                            transfer,
                            code,
                            reason: &reason,
                        },
                    );
                }
                self.failed(e).await;
            }
        }
    }

    async fn failed(&self, error: FileError) {
        let _ = self
            .files
            .events
            .send(Event::FileFailed {
                transfer: TransferId(self.transfer),
                peer: self.peer,
                error,
            })
            .await;
    }

    async fn receive(&mut self, dir: &Path) -> Result<ReceivedFile, FileError> {
        let (peer, transfer) = (self.peer, self.transfer);
        let (d, name, size, sha) = (dir.to_path_buf(), self.name.clone(), self.size, self.sha256);
        // One transfer at a time in a shared partial file: another transfer of the same file
        // into the same directory gets a partial file of its own (not resumable).
        let shared = dir.join(PartFile::part_name(&name, &sha));
        let claim = (sha != [0; 32])
            .then(|| {
                let fresh = self
                    .files
                    .parts
                    .lock()
                    .expect("partial files lock")
                    .insert(shared.clone());
                fresh.then(|| PartClaim {
                    files: self.files.clone(),
                    path: shared,
                })
            })
            .flatten();
        let unshared = sha != [0; 32] && claim.is_none();
        let _claim = claim;
        let mut part = blocking(move || {
            if unshared {
                PartFile::open_unshared(&d, &name, size, &sha)
            } else {
                PartFile::open(&d, &name, size, &sha)
            }
        })
        .await?;
        let resumed_from = part.offset();
        post(
            &self.link,
            FileMsg::Accept {
                transfer,
                offset: resumed_from,
            },
        )?;
        let mut last_report = Instant::now();
        loop {
            let m = match self.inbox.next().await {
                Ok(m) => m,
                Err(e) => {
                    // Cancelled here: the user wants no part of it. Otherwise (the peer
                    // left) the verified part stays for a later offer of the same file.
                    let own = matches!(e, FileError::Cancelled { by_peer: false, .. });
                    blocking(move || {
                        if own {
                            part.discard();
                        } else {
                            part.abandon();
                        }
                        Ok(())
                    })
                    .await?;
                    return Err(e);
                }
            };
            match m {
                Inbound::Chunk(offset, sha256, bytes) => {
                    let (p, persisted) = blocking(move || {
                        let persisted = part.write_chunk(offset, &sha256, &bytes);
                        Ok((part, persisted))
                    })
                    .await?;
                    part = p;
                    let persisted = match persisted {
                        Ok(p) => p,
                        Err(f) => {
                            blocking(move || {
                                part.abandon();
                                Ok(())
                            })
                            .await?;
                            return Err(FileError::Failed {
                                code: f.code,
                                reason: f.reason,
                            });
                        }
                    };
                    if persisted {
                        let offset = part.offset();
                        post(&self.link, FileMsg::Verified { transfer, offset })?;
                    }
                    if persisted || last_report.elapsed() >= Duration::from_millis(250) {
                        last_report = Instant::now();
                        let _ = self
                            .files
                            .events
                            .send(Event::FileProgress {
                                transfer: TransferId(transfer),
                                peer,
                                done: part.offset(),
                                total: part.size(),
                            })
                            .await;
                    }
                }
                Inbound::End(sha256) => {
                    let (path, hash) = blocking(move || part.finish(&sha256)).await?;
                    // The file is in place and checked: it is received, even if the sender
                    // can no longer be told.
                    let _ = post(&self.link, FileMsg::Done { transfer });
                    return Ok(ReceivedFile {
                        transfer: TransferId(transfer),
                        from: peer,
                        name: path
                            .file_name()
                            .and_then(|n| n.to_str())
                            .unwrap_or_default()
                            .to_string(),
                        path: Some(path),
                        size: self.size,
                        sha256: hash,
                        resumed_from,
                    });
                }
                Inbound::Cancel(code, reason) => {
                    blocking(move || {
                        part.abandon();
                        Ok(())
                    })
                    .await?;
                    return Err(FileError::from_peer(code, reason));
                }
                other => {
                    blocking(move || {
                        part.abandon();
                        Ok(())
                    })
                    .await?;
                    return Err(FileError::protocol(format!("{other:?} while receiving")));
                }
            }
        }
    }
}

impl Receiving {
    /// Receive into the app's writer: each chunk checked (offset, size, hash) before it is
    /// written, the writer flushed before each VERIFIED, the whole hash checked at END. Not
    /// resumable (the bytes are the app's), so always from offset 0. A failure after some
    /// bytes were written leaves them in the writer; the transfer is then never reported
    /// complete.
    async fn receive_into(
        &mut self,
        mut writer: Box<dyn AsyncWrite + Send + Unpin>,
    ) -> Result<ReceivedFile, FileError> {
        let (peer, transfer) = (self.peer, self.transfer);
        let failed = |code, reason: String| FileError::Failed { code, reason };
        let io = |e: std::io::Error| {
            let f = Failure::io("writing", &e);
            FileError::Failed {
                code: f.code,
                reason: f.reason,
            }
        };
        post(
            &self.link,
            FileMsg::Accept {
                transfer,
                offset: 0,
            },
        )?;
        let mut hasher = Sha256::new();
        let (mut written, mut verified) = (0u64, 0u64);
        let mut last_report = Instant::now();
        loop {
            let m = self.inbox.next().await?;
            match m {
                Inbound::Chunk(offset, sha256, bytes) => {
                    if offset != written || bytes.len() as u64 > self.size - written {
                        return Err(failed(
                            FileErrorCode::Protocol,
                            format!(
                                "a chunk of {} bytes at {offset}: expected one at {written} \
                                 within {} bytes",
                                bytes.len(),
                                self.size
                            ),
                        ));
                    }
                    if <[u8; 32]>::from(Sha256::digest(&bytes)) != sha256 {
                        return Err(failed(
                            FileErrorCode::HashMismatch,
                            format!("the chunk at {offset} does not match its hash"),
                        ));
                    }
                    writer.write_all(&bytes).await.map_err(io)?;
                    hasher.update(&bytes);
                    written += bytes.len() as u64;
                    let persisted = written - verified >= PERSIST_EVERY || written == self.size;
                    if persisted {
                        writer.flush().await.map_err(io)?;
                        verified = written;
                        post(
                            &self.link,
                            FileMsg::Verified {
                                transfer,
                                offset: verified,
                            },
                        )?;
                    }
                    if persisted || last_report.elapsed() >= Duration::from_millis(250) {
                        last_report = Instant::now();
                        let _ = self
                            .files
                            .events
                            .send(Event::FileProgress {
                                transfer: TransferId(transfer),
                                peer,
                                done: written,
                                total: self.size,
                            })
                            .await;
                    }
                }
                Inbound::End(sha256) => {
                    if written != self.size {
                        return Err(failed(
                            FileErrorCode::Protocol,
                            format!("END after {written} of {} bytes", self.size),
                        ));
                    }
                    let hash: Hash = hasher.finalize().into();
                    if hash != sha256 || (self.sha256 != [0; 32] && hash != self.sha256) {
                        return Err(failed(
                            FileErrorCode::HashMismatch,
                            "the file does not match its hash".into(),
                        ));
                    }
                    writer.flush().await.map_err(io)?;
                    // The file is in place and checked: it is received, even if the sender
                    // can no longer be told.
                    let _ = post(&self.link, FileMsg::Done { transfer });
                    return Ok(ReceivedFile {
                        transfer: TransferId(transfer),
                        from: peer,
                        name: self.name.clone(),
                        path: None,
                        size: self.size,
                        sha256: hash,
                        resumed_from: 0,
                    });
                }
                Inbound::Cancel(code, reason) => return Err(FileError::from_peer(code, reason)),
                other => {
                    return Err(FileError::protocol(format!("{other:?} while receiving")));
                }
            }
        }
    }
}

/// Run disk work on a blocking thread; its failure becomes the transfer's.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Failure> + Send + 'static,
) -> Result<T, FileError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(f)) => Err(FileError::Failed {
            code: f.code,
            reason: f.reason,
        }),
        Err(e) => Err(FileError::Io(e.to_string())),
    }
}
