//! # peermesh
//!
//! Peer-to-peer groups for games, chat and collaboration apps. Clients connect to a
//! `peermesh-server`, join groups by name, and message any co-member at once: messages go through
//! the server first while a direct WebRTC path is set up in the background; the link then moves to
//! the direct path, and back to the server if the direct path dies, without losing, duplicating or
//! reordering a reliable message.
//!
//! A complete program: a server in-process (normally you run `peermesh-server`), two clients
//! in a group, one message.
//!
//! ```
//! use peermesh::{Client, ClientConfig, Event, Reliability};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let server = peermesh_server::Server::bind(peermesh_server::Config {
//! #     listen: "127.0.0.1:0".parse()?, ..Default::default() }).await?.spawn();
//! # let url = server.ws_url();
//! let (alice, mut alice_events) = Client::connect(&url, ClientConfig::new("alice")).await?;
//! let (bob, mut bob_events) = Client::connect(&url, ClientConfig::new("bob").with_direct(false)).await?;
//! alice.join("lobby").await?;
//! let members = bob.join("lobby").await?; // [alice]
//! bob.send(members[0].peer, "hello", Reliability::Reliable).await?;
//!
//! while let Some(event) = alice_events.recv().await {
//!     match event {
//!         Event::MemberJoined { name, .. } => println!("joined {name}"),
//!         Event::PathChanged { peer, path } => println!("path {peer} {path}"),
//!         Event::Message { from, data, .. } => {
//!             assert_eq!(&data[..], b"hello");
//!             assert_eq!(from, bob.peer_id());
//!             break;
//!         }
//!         _ => {}
//!     }
//! }
//! alice.close().await;
//! bob.close().await;
//! # Ok(()) }
//! ```
//!
//! The wire protocol is in [`protocol`] and `docs/PROTOCOL.md`. Without the default `client`
//! feature only [`protocol`] is built (the server uses it that way).
#![warn(missing_docs)]

pub mod protocol;

#[cfg(feature = "client")]
mod client;
#[cfg(feature = "client")]
mod error;
#[cfg(feature = "client")]
mod files;
#[cfg(feature = "client")]
mod link;

#[cfg(feature = "client")]
pub use client::{Client, ClientConfig, DirectBackend, Events, Member, Reconnect, Reliability};
#[cfg(feature = "client")]
pub use error::{Error, Result};
#[cfg(feature = "client")]
pub use files::{
    FileError, FileErrorCode, FileOffer, FileTransfer, Progress, ReceivedFile, SentFile, TransferId,
};
#[cfg(feature = "client")]
pub use link::LinkStats;
pub use protocol::{DirectPolicy, PeerId};

/// The type of an ICE candidate, as in the selected candidate pair of a direct path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CandidateType {
    /// An address of the host itself.
    Host,
    /// Server reflexive: the host's address as a STUN server saw it (behind a NAT).
    Srflx,
    /// Peer reflexive: an address learnt from the peer's connectivity checks.
    Prflx,
    /// A TURN relay address.
    Relay,
}

impl CandidateType {
    /// The name used in SDP and in peermesh's output: `host`, `srflx`, `prflx`, `relay`.
    pub fn as_str(self) -> &'static str {
        match self {
            CandidateType::Host => "host",
            CandidateType::Srflx => "srflx",
            CandidateType::Prflx => "prflx",
            CandidateType::Relay => "relay",
        }
    }
}

impl From<CandidateType> for protocol::WireCandidateType {
    fn from(t: CandidateType) -> Self {
        match t {
            CandidateType::Host => protocol::WireCandidateType::Host,
            CandidateType::Srflx => protocol::WireCandidateType::Srflx,
            CandidateType::Prflx => protocol::WireCandidateType::Prflx,
            CandidateType::Relay => protocol::WireCandidateType::Relay,
        }
    }
}

/// The selected ICE candidate pair of a direct path: which addresses it runs between.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CandidatePair {
    /// Our address (for a `Relay` candidate, the TURN server's relayed address).
    pub local: std::net::SocketAddr,
    /// The peer's address as we send to it.
    pub remote: std::net::SocketAddr,
    /// Type of our candidate.
    pub local_type: CandidateType,
    /// Type of the peer's candidate.
    pub remote_type: CandidateType,
}

impl CandidatePair {
    /// The [`Path::Direct`] this pair makes.
    pub fn path(&self) -> Path {
        Path::Direct {
            local: self.local_type,
            remote: self.remote_type,
        }
    }
}

/// The path a link's messages take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Path {
    /// Relayed through the signaling server's WebSocket.
    #[default]
    Server,
    /// The WebRTC data channels, over the selected ICE candidate pair (a `Relay` candidate means
    /// the direct path itself goes through a TURN server).
    Direct {
        /// Type of our candidate in the selected pair.
        local: CandidateType,
        /// Type of the peer's candidate in the selected pair.
        remote: CandidateType,
    },
}

impl std::fmt::Display for Path {
    /// `server` or `direct <local>/<remote>`, e.g. `direct host/host`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Path::Server => f.write_str("server"),
            Path::Direct { local, remote } => {
                write!(f, "direct {}/{}", local.as_str(), remote.as_str())
            }
        }
    }
}

/// How long a new direct-path attempt may take before it counts as failed
/// ([`Event::DirectFailed`]).
#[cfg(feature = "client")]
pub const CONNECT_TIMEOUT_SECS: u64 = 8;

/// What happens in a client's groups and links.
#[cfg(feature = "client")]
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A member is in a group with this client (also emitted for each member already there when
    /// this client joins).
    MemberJoined {
        /// The group.
        group: String,
        /// The member.
        peer: PeerId,
        /// Its display name.
        name: String,
        /// Its user id (the `sub` of its token) when the server requires tokens: tells users
        /// apart whatever their display names.
        user: Option<String>,
        /// Which direct paths this client and the member may use: the strictest of this
        /// client's own [`ClientConfig::with_direct_policy`] and what the server computed for
        /// the pair (group, tokens, the member's own setting).
        direct: DirectPolicy,
    },
    /// The connection to the server was lost (or the server is restarting): attempt `attempt`
    /// (from 1) to connect again starts after `delay`. Links on a direct path keep carrying
    /// messages meanwhile; reliable messages to peers on the server path wait.
    Reconnecting {
        /// Attempt number, from 1.
        attempt: u32,
        /// Back-off before this attempt.
        delay: std::time::Duration,
    },
    /// Connected again. `resumed`: the same session goes on (same peer id, groups and links;
    /// reliable messages in flight are sent again, nothing is lost or duplicated). Otherwise a
    /// new session started with a new `peer` id: its links start anew, the client joins its
    /// groups again ([`Event::Rejoined`]), and messages that may not have arrived are reported
    /// ([`Event::Undelivered`]).
    Reconnected {
        /// This client's peer id now.
        peer: PeerId,
        /// The session was resumed rather than started anew.
        resumed: bool,
    },
    /// After a new session (see [`Event::Reconnected`]), the client is in `group` again; a
    /// [`Event::MemberJoined`] follows for each member. If it cannot join again
    /// ([`Event::ServerError`]), [`Event::GroupLeft`] is emitted instead.
    Rejoined {
        /// The group.
        group: String,
    },
    /// Reliable messages to `peer` that the peer had not acknowledged when their link ended with
    /// the old session (the server restarted), or when the link broke on an internal error (a
    /// panic in it; later sends to `peer` fail with [`Error::UnknownPeer`]): they may or may not
    /// have arrived.
    Undelivered {
        /// The peer (its id in the old session).
        peer: PeerId,
        /// How many messages.
        messages: u64,
    },
    /// This client is now a member of a group: it joined, or the app's backend added it (then
    /// without a call to [`Client::join`]). A [`Event::MemberJoined`] follows for each member
    /// already there.
    GroupJoined {
        /// The group.
        group: String,
    },
    /// This client is no longer a member of a group: it left, or the app's backend removed it
    /// or destroyed the group. A [`Event::MemberLeft`] came first for each of its members.
    GroupLeft {
        /// The group.
        group: String,
    },
    /// A member left a group (left, closed, or timed out), or this client left the group.
    MemberLeft {
        /// The group.
        group: String,
        /// The member.
        peer: PeerId,
        /// Its display name.
        name: String,
    },
    /// The path to a peer changed.
    PathChanged {
        /// The peer.
        peer: PeerId,
        /// The new path.
        path: Path,
    },
    /// An attempt to make (or keep) the direct path to a peer failed: the link stays on (or
    /// went back to) the server path, where messages keep flowing. Emitted for each failed
    /// attempt, at most [`CONNECT_TIMEOUT_SECS`] after it started; the initiator retries with
    /// back-off unless the peer declined direct paths.
    DirectFailed {
        /// The peer.
        peer: PeerId,
        /// Why, for people (e.g. `not connected within 8s`, `ice failed`).
        reason: String,
    },
    /// A message from a co-member.
    Message {
        /// The sender.
        from: PeerId,
        /// The bytes as sent.
        data: bytes::Bytes,
        /// How it was sent.
        reliability: Reliability,
        /// The lane it came on ([`Client::send_on`]; 0 for [`Client::send`], for unreliable
        /// messages that are not sequenced, and for every message of a peer without lanes).
        lane: u8,
    },
    /// A co-member offers a file: [`FileOffer::accept_into`] or [`FileOffer::reject`].
    FileOffered(FileOffer),
    /// A file being received is this far (about every 4 MiB, and at most every 250 ms).
    FileProgress {
        /// The transfer.
        transfer: TransferId,
        /// The sender.
        peer: PeerId,
        /// Bytes written and checked.
        done: u64,
        /// The file's size.
        total: u64,
    },
    /// A file was received completely and its hash matched.
    FileReceived(ReceivedFile),
    /// A file being received ended without the file.
    FileFailed {
        /// The transfer.
        transfer: TransferId,
        /// The sender.
        peer: PeerId,
        /// Why.
        error: FileError,
    },
    /// The server reported an error not tied to a pending `join`/`leave`.
    ServerError {
        /// Stable error code.
        code: protocol::ErrorCode,
        /// Detail.
        message: String,
    },
    /// The session with the server ended without [`Client::close`].
    Disconnected {
        /// Why.
        reason: String,
    },
}
