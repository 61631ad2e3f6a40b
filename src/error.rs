//! Errors returned by the client API.

use crate::protocol::{ErrorCode, PeerId};

/// Everything that can go wrong in the client API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file transfer could not start ([`crate::Client::send_file`]).
    #[error("file transfer: {0}")]
    File(#[from] crate::FileError),
    /// The server URL was not a `ws://` or `wss://` URL.
    #[error("invalid server url {0:?}: expected ws:// or wss://")]
    InvalidUrl(String),
    /// A [`crate::ClientConfig`] setting is unusable.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// Connecting the WebSocket or the hello/welcome exchange failed.
    #[error("could not connect to the server: {0}")]
    Connect(String),
    /// The server refused the connection because it is at one of its limits (HTTP 503:
    /// connections in total or from this address); try again later, after `retry_after` if the
    /// server said.
    #[error("server busy, try again later{}", match retry_after { Some(d) => format!(" (in {} s)", d.as_secs()), None => String::new() })]
    ServerBusy {
        /// The server's `Retry-After`.
        retry_after: Option<std::time::Duration>,
    },
    /// The server speaks another protocol version.
    #[error("server speaks protocol version {server}, this client speaks {client}")]
    VersionMismatch {
        /// The server's version.
        server: u32,
        /// Ours.
        client: u32,
    },
    /// The server refused a request with an error frame.
    #[error("server refused: {code}: {message}")]
    Server {
        /// Stable error code.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
    /// A group name is not 1–64 bytes of `[A-Za-z0-9._-]`.
    #[error("invalid group name {0:?}: 1-64 bytes of A-Z a-z 0-9 . _ -")]
    InvalidGroup(String),
    /// A display name is empty, longer than 64 bytes or has control, format or invisible
    /// characters (see [`crate::protocol::validate_name`]).
    #[error(
        "invalid name {0:?}: 1-64 bytes of UTF-8 without control, format or invisible characters"
    )]
    InvalidName(String),
    /// The peer is not (or no longer) a member of any group this client is in.
    #[error("peer {0} is not a co-member")]
    UnknownPeer(PeerId),
    /// The client is not in the named group.
    #[error("not a member of group {0:?}")]
    NotMember(String),
    /// A message is larger than this kind of message may be.
    #[error("message of {size} bytes is larger than the limit of {limit} bytes")]
    MessageTooLarge {
        /// Size of the message.
        size: usize,
        /// The limit that applies.
        limit: usize,
    },
    /// `try_send`: the link's send buffer is full; retry later or use `send`, which waits.
    #[error("send buffer to peer {0} is full")]
    WouldBlock(PeerId),
    /// The session with the server is closed.
    #[error("the client is closed")]
    Closed,
    /// The server did not answer in time.
    #[error("timed out waiting for the server")]
    Timeout,
}

/// Result alias for the client API.
pub type Result<T, E = Error> = std::result::Result<T, E>;
