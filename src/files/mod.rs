//! File transfer between members (`docs/PROTOCOL.md` §8.9): [`Client::send_file`] and
//! [`Event::FileOffered`], streamed on the link's file lane with a SHA-256 per chunk and for the
//! whole file, resumable, into names that overwrite nothing.
//!
//! [`Client::send_file`]: crate::Client::send_file
//! [`Event::FileOffered`]: crate::Event::FileOffered

pub(crate) mod name;
pub(crate) mod part;
mod transfer;
pub(crate) mod wire;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, watch};

pub(crate) use self::transfer::{Decision, Files, Sink};
pub use self::wire::FileErrorCode;
use crate::protocol::PeerId;

/// A transfer's id: chosen by the sender, unique among its transfers to one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TransferId(pub u64);

impl std::fmt::Display for TransferId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// How far a transfer is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Bytes sent (sender) so far, counting what an earlier transfer of the same file left.
    pub done: u64,
    /// The file's size.
    pub total: u64,
    /// Bytes per second since this transfer started.
    pub rate: f64,
    /// Time left at that rate, once there is a rate.
    pub eta: Option<Duration>,
}

impl Progress {
    fn new(total: u64) -> Self {
        Progress {
            done: 0,
            total,
            rate: 0.0,
            eta: None,
        }
    }

    fn at(done: u64, total: u64, from: u64, elapsed: Duration) -> Self {
        let secs = elapsed.as_secs_f64();
        let rate = if secs > 0.0 {
            (done - from) as f64 / secs
        } else {
            0.0
        };
        let eta = (rate > 0.0).then(|| Duration::from_secs_f64((total - done) as f64 / rate));
        Progress {
            done,
            total,
            rate,
            eta,
        }
    }
}

/// Why a transfer ended without the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    /// The peer's client does not take files (link protocol below version 4).
    #[error("peer {0} does not take file transfers")]
    Unsupported(PeerId),
    /// The receiver said no.
    #[error("rejected: {reason}")]
    Rejected {
        /// Its reason.
        reason: String,
    },
    /// Cancelled, by this side or the peer.
    #[error("cancelled by {}: {reason}", if *by_peer { "the peer" } else { "this side" })]
    Cancelled {
        /// Whether the peer cancelled.
        by_peer: bool,
        /// Why.
        reason: String,
    },
    /// The transfer failed here or at the peer (`code` says how: `io`, `disk_full`,
    /// `too_large`, `hash_mismatch`, `protocol`).
    #[error("{code}: {reason}")]
    Failed {
        /// What failed.
        code: FileErrorCode,
        /// For people.
        reason: String,
    },
    /// Reading the file to send failed.
    #[error("reading the file: {0}")]
    Io(String),
    /// The link to the peer ended (it left, or the session ended).
    #[error("peer {0} is gone")]
    PeerGone(PeerId),
}

impl FileError {
    fn from_peer(code: FileErrorCode, reason: String) -> Self {
        match code {
            FileErrorCode::Cancelled => FileError::Cancelled {
                by_peer: true,
                reason,
            },
            FileErrorCode::Rejected => FileError::Rejected { reason },
            code => FileError::Failed { code, reason },
        }
    }

    /// This side's app cancelled.
    fn cancelled_here() -> Self {
        FileError::Cancelled {
            by_peer: false,
            reason: "cancelled".into(),
        }
    }

    fn protocol(reason: String) -> Self {
        FileError::Failed {
            code: FileErrorCode::Protocol,
            reason,
        }
    }

    /// The CANCEL to tell the peer, unless the peer ended it or is gone.
    fn to_send(&self) -> Option<(FileErrorCode, String)> {
        match self {
            FileError::Cancelled { by_peer: false, .. } => {
                Some((FileErrorCode::Cancelled, "cancelled".into()))
            }
            FileError::Failed { code, reason } => Some((*code, reason.clone())),
            FileError::Io(reason) => Some((FileErrorCode::Io, reason.clone())),
            _ => None,
        }
    }
}

/// A file sent to the peer, complete: the receiver checked its hash and has it in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentFile {
    /// Its name as offered.
    pub name: String,
    /// Its size.
    pub size: u64,
    /// SHA-256 of the whole file.
    pub sha256: [u8; 32],
    /// Bytes the receiver already had from an earlier transfer of the same file: only the
    /// rest (`size - resumed_from`) was sent this time.
    pub resumed_from: u64,
}

/// A file being sent ([`Client::send_file`](crate::Client::send_file)). Dropping it does not
/// stop the transfer (use [`FileTransfer::cancel`]).
#[derive(Debug)]
pub struct FileTransfer {
    id: TransferId,
    peer: PeerId,
    progress: watch::Receiver<Progress>,
    cancel: watch::Sender<bool>,
    outcome: oneshot::Receiver<Result<SentFile, FileError>>,
}

impl FileTransfer {
    /// Its id (the receiver's [`FileOffer::transfer`]).
    pub fn id(&self) -> TransferId {
        self.id
    }

    /// The receiving peer.
    pub fn peer(&self) -> PeerId {
        self.peer
    }

    /// Progress, as it changes.
    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.clone()
    }

    /// Stop sending; the receiver is told, and [`FileTransfer::outcome`] ends with
    /// [`FileError::Cancelled`].
    pub fn cancel(&self) {
        let _ = self.cancel.send(true);
    }

    /// Wait for the end: the file complete at the receiver, or why not.
    pub async fn outcome(self) -> Result<SentFile, FileError> {
        self.outcome
            .await
            .unwrap_or(Err(FileError::PeerGone(self.peer)))
    }
}

/// A file a peer offers ([`Event::FileOffered`](crate::Event::FileOffered)): accept it into a
/// directory or reject it. Dropping every clone unanswered rejects it; once accepted, dropping
/// it does not stop the transfer (use [`FileOffer::cancel`]).
#[derive(Debug, Clone)]
pub struct FileOffer {
    /// The transfer.
    pub transfer: TransferId,
    /// The sender.
    pub from: PeerId,
    /// The name it will get (the offered name made safe: last path component only, no
    /// device names or control characters; `name (1).ext` … if it exists already).
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    decide: Arc<Mutex<Option<oneshot::Sender<Decision>>>>,
    cancel: Arc<watch::Sender<bool>>,
}

impl PartialEq for FileOffer {
    fn eq(&self, other: &Self) -> bool {
        (self.transfer, self.from) == (other.transfer, other.from)
    }
}

impl Eq for FileOffer {}

impl FileOffer {
    fn new(
        transfer: TransferId,
        from: PeerId,
        name: String,
        size: u64,
        decide: oneshot::Sender<Decision>,
        cancel: watch::Sender<bool>,
    ) -> Self {
        FileOffer {
            transfer,
            from,
            name,
            size,
            decide: Arc::new(Mutex::new(Some(decide))),
            cancel: Arc::new(cancel),
        }
    }

    fn answer(&self, d: Decision) -> bool {
        let tx = self.decide.lock().expect("offer lock").take();
        tx.is_some_and(|tx| tx.send(d).is_ok())
    }

    /// Receive it into `dir`: progress comes as [`Event::FileProgress`], the end as
    /// [`Event::FileReceived`] or [`Event::FileFailed`]. A partial file of the same name,
    /// size and hash left in `dir` by an earlier transfer is continued. `false` if the offer
    /// was answered already or has ended.
    ///
    /// [`Event::FileProgress`]: crate::Event::FileProgress
    /// [`Event::FileReceived`]: crate::Event::FileReceived
    /// [`Event::FileFailed`]: crate::Event::FileFailed
    pub fn accept_into(&self, dir: impl AsRef<Path>) -> bool {
        self.answer(Decision::Accept(Sink::Dir(dir.as_ref().to_path_buf())))
    }

    /// Receive it into `writer`, as it arrives: each chunk is checked against its hash before
    /// it is written, the writer is flushed every 4 MiB before the sender is told those bytes
    /// are in, and [`Event::FileReceived`] (with no path) comes only after the whole file's
    /// hash matched. Such a transfer is not resumable. If it fails, what was written stays in
    /// the writer: only [`Event::FileReceived`] says the bytes are the file. `false` if the
    /// offer was answered already or has ended.
    ///
    /// [`Event::FileReceived`]: crate::Event::FileReceived
    pub fn accept_into_writer(
        &self,
        writer: impl tokio::io::AsyncWrite + Send + Unpin + 'static,
    ) -> bool {
        self.answer(Decision::Accept(Sink::Writer(Box::new(writer))))
    }

    /// Say no; the sender's transfer ends with [`FileError::Rejected`].
    pub fn reject(&self, reason: &str) -> bool {
        self.answer(Decision::Reject(reason.to_string()))
    }

    /// Stop receiving an accepted file: the sender's transfer ends with
    /// [`FileError::Cancelled`], this side gets [`Event::FileFailed`] with it, and nothing of
    /// the file is kept. Before an answer it is a [`FileOffer::reject`].
    ///
    /// [`Event::FileFailed`]: crate::Event::FileFailed
    pub fn cancel(&self) {
        if !self.reject("cancelled") {
            let _ = self.cancel.send(true);
        }
    }
}

/// A file received completely; its hash matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedFile {
    /// The transfer.
    pub transfer: TransferId,
    /// The sender.
    pub from: PeerId,
    /// Its file name, as created (or as offered, made safe, for a writer).
    pub name: String,
    /// Where it is; `None` when it was received into a writer
    /// ([`FileOffer::accept_into_writer`]).
    pub path: Option<PathBuf>,
    /// Its size.
    pub size: u64,
    /// SHA-256 of the whole file.
    pub sha256: [u8; 32],
    /// Bytes that an earlier transfer of the same file had left here.
    pub resumed_from: u64,
}
