//! The peermesh wire protocol, version 1 (see `docs/PROTOCOL.md`).
//!
//! Two layers are defined here:
//!
//! * the **session layer** between a client and the server: JSON text frames ([`ClientMsg`],
//!   [`ServerMsg`]) and binary relay frames ([`RelayFrame`]) on one WebSocket;
//! * the **link layer** between two peers ([`LinkFrame`]): the same byte frames travel inside relay
//!   frames (server path) or as data channel messages (direct path), which is what lets a link move
//!   between paths without losing, duplicating or reordering reliable messages.
//!
//! The server only needs the session layer; clients need both. Everything here is plain data with
//! encoders and decoders that return typed errors for bad input and never panic.

use serde::{Deserialize, Serialize};

/// Protocol version spoken by this crate. Sent in `hello` and `welcome`.
pub const PROTOCOL_VERSION: u32 = 1;

/// A peer id, assigned by the server in `welcome`, unique per server run (never 0).
pub type PeerId = u32;

/// A link id, assigned by the server when two clients become co-members. A pair that stops
/// sharing a group and later shares one again gets a new link id, so stale frames are recognised.
pub type LinkId = u32;

/// Largest app payload carried by one link-layer fragment (bytes).
pub const MAX_FRAGMENT_PAYLOAD: usize = 16 * 1024;

/// Largest unreliable message (bytes).
pub const MAX_UNRELIABLE_PAYLOAD: usize = MAX_FRAGMENT_PAYLOAD;

/// Link protocol version this client speaks (`docs/PROTOCOL.md` §7.6, §8.8, §8.9). Version 1
/// peers send no version in their offer or answer; from version 3 (lanes) it is also announced
/// in band, with the VERSION link frame, so that server-path-only links learn it; version 4
/// adds the file lane.
pub const LINK_VERSION: u32 = 4;

/// Largest message a version 2 sender puts on a direct path's unreliable channel: it fits in
/// one SCTP DATA chunk at every known stack, so a lost one never leaves fragments in the
/// receiver's reassembly queue (`docs/PROTOCOL.md` §7.6).
pub const MAX_DIRECT_UNRELIABLE_FRAME: usize = 1024;

/// Header of an UNRELIABLE_PART frame: kind, msg u32, index u16, count u16.
pub const PART_HEADER_LEN: usize = 9;

/// Largest payload of one UNRELIABLE_PART frame.
pub const MAX_PART_PAYLOAD: usize = MAX_DIRECT_UNRELIABLE_FRAME - PART_HEADER_LEN;

/// Most parts an unreliable message is split into.
pub const MAX_PARTS: usize = MAX_UNRELIABLE_PAYLOAD.div_ceil(MAX_PART_PAYLOAD);

/// Byte length of a relay frame header (`kind`, `peer`, `link`).
pub const RELAY_HEADER_LEN: usize = 9;

/// Binary frame kind byte for relayed link data.
pub const RELAY_KIND_DATA: u8 = 0x01;

/// Byte range of the peer id inside a relay frame (the server rewrites it in place).
pub const RELAY_PEER_RANGE: std::ops::Range<usize> = 1..5;

/// WebSocket close codes the server uses.
pub mod close_code {
    /// Server shutting down, or the client was silent past the heartbeat timeout.
    pub const GOING_AWAY: u16 = 1001;
    /// `hello` asked for an unsupported protocol version, or the client broke the WebSocket
    /// protocol (unmasked frame, reserved bits, unknown opcode, ...).
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text frame was not valid UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// The client broke the server's rules: no `hello` in time or past the pre-`hello` budget,
    /// or it did not read the server's replies and events (its queue overflowed).
    pub const POLICY_VIOLATION: u16 = 1008;
    /// A frame exceeded the server's hard size cap.
    pub const TOO_BIG: u16 = 1009;
    /// The client did not read relayed frames fast enough.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// A newer session of the same user (token `sub`) replaced this one.
    pub const REPLACED: u16 = 4001;
    /// The app's backend ended this session (admin API `DELETE /v1/sessions/{user}`).
    pub const KICKED: u16 = 4002;
    /// The server is restarting (drain on SIGTERM): reconnect, with a fresh session (its state
    /// does not survive the restart).
    pub const SERVICE_RESTART: u16 = 1012;
    /// A resume of this session from another connection took it over.
    pub const RESUMED_ELSEWHERE: u16 = 4003;
}

/// Stable error codes carried in `error` frames. The string form (`as_str`) is what goes on the
/// wire; it never changes meaning once published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// A frame was not valid JSON / not a valid binary frame, or a field had the wrong type.
    BadFrame,
    /// A frame exceeded the server's `max_frame_bytes`.
    FrameTooLarge,
    /// A JSON frame had a `type` this server does not know.
    UnknownType,
    /// The `hello` asked for a protocol version the server does not speak. The server closes.
    UnsupportedVersion,
    /// A frame other than `hello` arrived before `hello`. (A second `hello` gets `bad_frame`.)
    HelloRequired,
    /// A group name was empty, too long or had forbidden characters.
    InvalidGroup,
    /// A name was empty, too long or had a forbidden code point (control, format or other
    /// invisible character; see [`validate_name`]).
    InvalidName,
    /// The client is already in the group named in `join`.
    AlreadyMember,
    /// The client is not a member of the group named in `leave`.
    NotMember,
    /// The target peer shares no group with the sender (signal or relay refused).
    NotCoMember,
    /// The link id in a signal or relay frame is not the pair's current link.
    StaleLink,
    /// The client is in `max_groups_per_client` groups already.
    TooManyGroups,
    /// The group has `max_members_per_group` members already.
    GroupFull,
    /// The client sends faster than the server forwards; the frame was not relayed.
    RateLimited,
    /// The server hit an internal problem handling this frame.
    Internal,
    /// The server requires a token in `hello` and this one was missing, malformed, expired or
    /// badly signed. The server closes the session (1008 `unauthorized`).
    Unauthorized,
    /// The session's token does not allow joining this group, or the group does not let
    /// clients join it by themselves (its members are added by the app's backend).
    Forbidden,
    /// The pair's direct-connectivity policy is `none`: the server does not forward `signal`
    /// between them (they stay on the server path).
    DirectNotAllowed,
    /// The group named in the request does not exist (a closed server does not create groups on
    /// `join`).
    NoSuchGroup,
    /// The target peer's session is suspended (its connection dropped; it may resume): the
    /// relay frame or `signal` was not forwarded. Its co-members got `member_suspended`.
    PeerSuspended,
    /// A `hello` asked to resume a session that does not exist (any more) or with a wrong
    /// token: start a new session with a plain `hello`.
    ResumeFailed,
}

impl ErrorCode {
    /// The wire string of this code.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::HelloRequired => "hello_required",
            ErrorCode::InvalidGroup => "invalid_group",
            ErrorCode::InvalidName => "invalid_name",
            ErrorCode::AlreadyMember => "already_member",
            ErrorCode::NotMember => "not_member",
            ErrorCode::NotCoMember => "not_co_member",
            ErrorCode::StaleLink => "stale_link",
            ErrorCode::TooManyGroups => "too_many_groups",
            ErrorCode::GroupFull => "group_full",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Internal => "internal",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::DirectNotAllowed => "direct_not_allowed",
            ErrorCode::NoSuchGroup => "no_such_group",
            ErrorCode::PeerSuspended => "peer_suspended",
            ErrorCode::ResumeFailed => "resume_failed",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which direct paths a pair of members may use (`docs/PROTOCOL.md` §3.4). Ordered from the most
/// permissive to the strictest, so the policy of a pair is the `max` of every limit that applies.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum DirectPolicy {
    /// Direct paths of any kind (host, server reflexive, relay candidates).
    #[default]
    Any,
    /// TURN relay candidates only: neither end ever sends a host, server reflexive or peer
    /// reflexive address, in SDP or trickled.
    Relay,
    /// No direct path: the pair stays on the server path and the server does not forward
    /// `signal` between them.
    None,
}

impl DirectPolicy {
    /// `true` for [`DirectPolicy::Any`] (the default, omitted on the wire).
    pub fn is_any(&self) -> bool {
        *self == DirectPolicy::Any
    }

    /// The wire string: `any`, `relay`, `none`.
    pub fn as_str(self) -> &'static str {
        match self {
            DirectPolicy::Any => "any",
            DirectPolicy::Relay => "relay",
            DirectPolicy::None => "none",
        }
    }
}

impl std::fmt::Display for DirectPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for DirectPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "any" => Ok(DirectPolicy::Any),
            "relay" => Ok(DirectPolicy::Relay),
            "none" => Ok(DirectPolicy::None),
            other => Err(format!(
                "direct policy must be any, relay or none, not {other:?}"
            )),
        }
    }
}

/// A policy from a newer server that this crate does not know is read as the strictest.
fn lenient_policy<'de, D: serde::Deserializer<'de>>(d: D) -> Result<DirectPolicy, D::Error> {
    let s = String::deserialize(d)?;
    Ok(s.parse().unwrap_or(DirectPolicy::None))
}

/// The path a client reports for one of its links (`path` frame, for the app's backend).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PathKind {
    /// Relayed through the server.
    Server,
    /// The WebRTC data channels.
    Direct,
}

/// An ICE candidate type as reported in a `path` frame: `host`, `srflx`, `prflx`, `relay`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WireCandidateType {
    /// An address of the host itself.
    Host,
    /// Server reflexive.
    Srflx,
    /// Peer reflexive.
    Prflx,
    /// A TURN relay address.
    Relay,
}

/// One ICE server as handed to clients (same shape as the browser's `RTCIceServer`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct IceServer {
    /// `stun:host:port` / `turn:host:port?transport=udp` URLs.
    pub urls: Vec<String>,
    /// TURN username (absent for STUN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// TURN password (absent for STUN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// Limits the server enforces, announced in `welcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest WebSocket frame (text or binary) the server accepts, in bytes.
    pub max_frame_bytes: usize,
    /// Most groups one client may be in at once.
    pub max_groups_per_client: usize,
    /// Most members one group may have.
    pub max_members_per_group: usize,
}

/// A member of a group as seen by another member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    /// The member's peer id.
    pub peer: PeerId,
    /// The member's display name: from its token when the server requires tokens, else from its
    /// `hello`.
    pub name: String,
    /// The member's user id (the `sub` of its token) when the server requires tokens: stable,
    /// unique among live sessions, whatever the display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The pair's current link id.
    pub link: LinkId,
    /// `true` if the receiver of this frame makes the WebRTC offer for this link (the server
    /// decides, so there is no glare).
    pub initiator: bool,
    /// The pair's direct-connectivity policy (absent: `any`). Both ends get the same value; a
    /// value this crate does not know is read as the strictest, [`DirectPolicy::None`].
    #[serde(
        default,
        skip_serializing_if = "DirectPolicy::is_any",
        deserialize_with = "lenient_policy"
    )]
    pub direct: DirectPolicy,
}

/// Which session a `hello` resumes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    /// The session's peer id.
    pub peer: PeerId,
    /// The `resume_token` of its `welcome`.
    pub token: String,
}

/// JSON text frames a client sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMsg {
    /// First frame of a session.
    Hello {
        /// Protocol version the client speaks.
        version: u32,
        /// Display name shown to co-members (a server that requires tokens uses the token's).
        name: String,
        /// Identity token (a JWT minted by the app's backend), required by servers run with an
        /// auth secret.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
        /// This client's own limit on direct paths (absent: `any`). The server applies the
        /// strictest of this, the token's `direct` and the group's policy to each pair.
        #[serde(default, skip_serializing_if = "DirectPolicy::is_any")]
        direct: DirectPolicy,
        /// The client can resume this session after its connection drops: the server then
        /// keeps it suspended for the grace period instead of ending it (`docs/PROTOCOL.md`
        /// §3.14).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        resumable: bool,
        /// Resume this suspended session instead of starting a new one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume: Option<Resume>,
    },
    /// Join a group by name (created on first join).
    Join {
        /// Group name.
        group: String,
    },
    /// Leave a group.
    Leave {
        /// Group name.
        group: String,
    },
    /// Forward opaque signaling data to a co-member.
    Signal {
        /// Target peer.
        to: PeerId,
        /// The pair's current link id.
        link: LinkId,
        /// Opaque to the server (see `docs/PROTOCOL.md` for what peers put here).
        data: serde_json::Value,
    },
    /// Heartbeat; the server answers `pong` with the same id.
    Ping {
        /// Echoed back.
        id: u64,
    },
    /// The client has processed a membership change (`joined`, `left`, `member_joined`,
    /// `member_left` carrying `change`).
    Ack {
        /// The group.
        group: String,
        /// The `change` number of that frame.
        change: u64,
    },
    /// The path of one of the client's links now (for the app's backend and operators).
    Path {
        /// The other end of the link.
        peer: PeerId,
        /// The link id.
        link: LinkId,
        /// Server or direct.
        path: PathKind,
        /// On a direct path: this client's candidate type in the selected pair.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        local: Option<WireCandidateType>,
        /// On a direct path: the peer's candidate type in the selected pair.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        remote: Option<WireCandidateType>,
    },
    /// Answer to `drain`: every reliable link frame this client sent is acknowledged, and it
    /// holds new ones until it reconnects (`docs/PROTOCOL.md` §3.15).
    Drained,
}

/// JSON text frames the server sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    /// Answer to `hello`.
    Welcome {
        /// Protocol version the server speaks.
        version: u32,
        /// The client's peer id.
        peer: PeerId,
        /// ICE servers the client should use.
        ice_servers: Vec<IceServer>,
        /// How often the client should send `ping` (ms).
        heartbeat_interval_ms: u64,
        /// Silence after which the server drops the client (ms).
        heartbeat_timeout_ms: u64,
        /// Limits enforced by the server.
        limits: Limits,
        /// The secret to resume this session with, when the client said it is `resumable`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume_token: Option<String>,
        /// How long a suspended session waits for its resume (ms).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume_grace_ms: Option<u64>,
        /// `true`: this is a resumed session (same peer id, groups and links); a `joined` for
        /// each of its groups follows with the members now.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        resumed: bool,
        /// With `resumed`: the groups the session is in now (a `joined` follows for each).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        groups: Option<Vec<String>>,
    },
    /// Answer to `join`: the group's other members.
    Joined {
        /// Group name.
        group: String,
        /// Members other than the client.
        members: Vec<MemberInfo>,
        /// The group's membership change number, to `ack` once processed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        change: Option<u64>,
    },
    /// Answer to `leave`, or the app's backend removed the client from the group (or destroyed
    /// it).
    Left {
        /// Group name.
        group: String,
        /// The group's membership change number, to `ack` once processed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        change: Option<u64>,
    },
    /// Another client joined a group the receiver is in.
    MemberJoined {
        /// Group name.
        group: String,
        /// The new member.
        member: MemberInfo,
        /// The group's membership change number, to `ack` once processed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        change: Option<u64>,
    },
    /// A member left a group the receiver is in (leave, close or heartbeat timeout).
    MemberLeft {
        /// Group name.
        group: String,
        /// The member that left.
        peer: PeerId,
        /// The group's membership change number, to `ack` once processed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        change: Option<u64>,
    },
    /// A co-member's connection dropped; its session is suspended and may resume. Frames to it
    /// are refused (`peer_suspended`) meanwhile.
    MemberSuspended {
        /// The suspended peer.
        peer: PeerId,
    },
    /// A suspended co-member resumed its session (same peer id and links). Reliable frames it
    /// has not acknowledged should be sent again on the server path.
    MemberResumed {
        /// The resumed peer.
        peer: PeerId,
    },
    /// Signaling data from a co-member.
    Signal {
        /// Sender.
        from: PeerId,
        /// The pair's link id.
        link: LinkId,
        /// Opaque data as sent.
        data: serde_json::Value,
    },
    /// Fresh ICE servers (TURN credentials are short-lived; the server sends new ones before the
    /// old expire). They replace the `welcome` list for PeerConnections created from now on.
    IceServers {
        /// The new list.
        ice_servers: Vec<IceServer>,
    },
    /// Answer to `ping`.
    Pong {
        /// Echoed id.
        id: u64,
    },
    /// The server is about to restart (`docs/PROTOCOL.md` §3.15): hold new reliable link frames,
    /// answer `drained` once every one sent is acknowledged, then reconnect when the server
    /// closes the connection (1012), to `reconnect_url` if given.
    Drain {
        /// Where to reconnect instead of the current URL (another instance), if set.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reconnect_url: Option<String>,
        /// How long the server waits for `drained` before it closes anyway (ms).
        timeout_ms: u64,
    },
    /// A request failed. The session stays up unless the code says otherwise.
    Error {
        /// Stable error code.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
        /// The `type` of the frame that caused it (`"relay"` for binary frames), if known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request: Option<String>,
        /// The group concerned, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group: Option<String>,
        /// The peer concerned, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        peer: Option<PeerId>,
    },
}

impl ServerMsg {
    /// Shorthand for an `error` frame.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        ServerMsg::Error {
            code,
            message: message.into(),
            request: None,
            group: None,
            peer: None,
        }
    }
}

/// Why a binary frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The frame is shorter than its header.
    #[error("frame truncated: {0} bytes")]
    Truncated(usize),
    /// The kind byte is not known.
    #[error("unknown frame kind 0x{0:02x}")]
    UnknownKind(u8),
}

/// A binary relay frame. Client→server: `peer` is the destination. Server→client: `peer` is the
/// source. `payload` is a link-layer frame, opaque to the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayFrame<'a> {
    /// Destination (client→server) or source (server→client).
    pub peer: PeerId,
    /// The pair's link id.
    pub link: LinkId,
    /// Link-layer bytes.
    pub payload: &'a [u8],
}

impl<'a> RelayFrame<'a> {
    /// Encode into a fresh buffer: `[0x01][peer u32 BE][link u32 BE][payload]`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(RELAY_HEADER_LEN + self.payload.len());
        out.push(RELAY_KIND_DATA);
        out.extend_from_slice(&self.peer.to_be_bytes());
        out.extend_from_slice(&self.link.to_be_bytes());
        out.extend_from_slice(self.payload);
        out
    }

    /// Decode a binary WebSocket frame.
    pub fn decode(buf: &'a [u8]) -> Result<Self, FrameError> {
        if buf.len() < RELAY_HEADER_LEN {
            return Err(FrameError::Truncated(buf.len()));
        }
        if buf[0] != RELAY_KIND_DATA {
            return Err(FrameError::UnknownKind(buf[0]));
        }
        Ok(RelayFrame {
            peer: u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]),
            link: u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]),
            payload: &buf[RELAY_HEADER_LEN..],
        })
    }
}

/// Link-layer frame kinds.
pub mod link_kind {
    /// Reliable fragment: `[0x10][flags u8][seq u64 BE][bytes]`.
    pub const DATA: u8 = 0x10;
    /// Cumulative ack: `[0x11][seq u64 BE]`.
    pub const ACK: u8 = 0x11;
    /// Unreliable message: `[0x12][bytes]`.
    pub const UNRELIABLE: u8 = 0x12;
    /// RTT probe: `[0x13][id u64 BE]`.
    pub const PING: u8 = 0x13;
    /// RTT probe answer: `[0x14][id u64 BE]`.
    pub const PONG: u8 = 0x14;
    /// Direct path ready: `[0x15][gen u32 BE]`, sent on the server path once both data channels
    /// of PeerConnection generation `gen` are open locally.
    pub const READY: u8 = 0x15;
    /// Part of an unreliable message split to fit one SCTP chunk (version 2, direct path):
    /// `[0x16][msg u32 BE][index u16 BE][count u16 BE][bytes]`.
    pub const UNRELIABLE_PART: u8 = 0x16;
    /// Reliable fragment of lane 1..7 (version 3, §8.8):
    /// `[0x17][flags u8][lane u8][seq u64 BE][bytes]`.
    pub const DATA_LANE: u8 = 0x17;
    /// Cumulative ack of lane 1..7 (version 3): `[0x18][lane u8][seq u64 BE]`.
    pub const ACK_LANE: u8 = 0x18;
    /// Sequenced unreliable message, or one part of it (version 3):
    /// `[0x19][lane u8][seq u32 BE][index u8][count u8][bytes]`.
    pub const UNRELIABLE_SEQ: u8 = 0x19;
    /// The sender's link protocol version, in band (version 3): `[0x1a][version u32 BE]`.
    pub const VERSION: u8 = 0x1a;
}

/// Lanes of a link (`docs/PROTOCOL.md` §8.8): 0 to 7.
pub const MAX_LANES: usize = 8;

/// The file lane (link version 4, `docs/PROTOCOL.md` §8.9): DATA_LANE / ACK_LANE with this
/// lane carry file-transfer messages between two version 4 ends; app lanes are 0 to 7.
pub const FILE_LANE: u8 = 8;

/// Header of an UNRELIABLE_SEQ frame: kind, lane, seq u32, index, count.
pub const SEQ_HEADER_LEN: usize = 8;

/// Largest payload of one UNRELIABLE_SEQ frame on a version 2 direct path (one SCTP chunk).
pub const MAX_SEQ_PART_PAYLOAD: usize = MAX_DIRECT_UNRELIABLE_FRAME - SEQ_HEADER_LEN;

/// `flags` bit of a DATA fragment: this is the last fragment of its message.
pub const FLAG_FIN: u8 = 0x01;

/// A link-layer frame, exchanged between the two ends of a link over either path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkFrame<'a> {
    /// A reliable fragment with its per-link sequence number (first is 1).
    Data {
        /// Sequence number.
        seq: u64,
        /// Last fragment of a message.
        fin: bool,
        /// Fragment bytes.
        bytes: &'a [u8],
    },
    /// Every fragment up to and including `seq` was delivered.
    Ack {
        /// Cumulative sequence number.
        seq: u64,
    },
    /// An unreliable message.
    Unreliable {
        /// Message bytes.
        bytes: &'a [u8],
    },
    /// RTT probe.
    Ping {
        /// Probe id (echoed).
        id: u64,
    },
    /// RTT probe answer.
    Pong {
        /// Probe id.
        id: u64,
    },
    /// The sender's data channels of PeerConnection generation `gen` are open: the receiver may
    /// now send on them. Nothing is sent on a direct path before this arrives, because data on a
    /// pre-negotiated channel the receiver has not opened yet would be refused.
    Ready {
        /// PeerConnection generation.
        gen: u32,
    },
    /// Part `index` of `count` of unreliable message `msg` (version 2: an unreliable message
    /// longer than one SCTP chunk, split for the direct path).
    UnreliablePart {
        /// Message number, per link and sender.
        msg: u32,
        /// Part number, `0..count`.
        index: u16,
        /// Number of parts of the message.
        count: u16,
        /// Part bytes.
        bytes: &'a [u8],
    },
    /// A reliable fragment of lane 1..7 (version 3), with the lane's sequence number.
    DataLane {
        /// Lane, 1..7.
        lane: u8,
        /// Sequence number within the lane.
        seq: u64,
        /// Last fragment of a message.
        fin: bool,
        /// Fragment bytes.
        bytes: &'a [u8],
    },
    /// Every fragment of `lane` (1..7) up to and including `seq` was delivered (version 3).
    AckLane {
        /// Lane, 1..7.
        lane: u8,
        /// Cumulative sequence number within the lane.
        seq: u64,
    },
    /// Part `index` of `count` of sequenced unreliable message `seq` of `lane` (version 3): the
    /// receiver drops it if it is not newer than the newest delivered on the lane.
    UnreliableSeq {
        /// Lane, 0..7.
        lane: u8,
        /// Message number within the lane (wrapping).
        seq: u32,
        /// Part number, `0..count`.
        index: u8,
        /// Parts of the message (1 for a whole one).
        count: u8,
        /// Part bytes.
        bytes: &'a [u8],
    },
    /// The sender's link protocol version (version 3 and later).
    Version {
        /// Link protocol version.
        version: u32,
    },
}

fn read_u64(buf: &[u8], at: usize) -> Result<u64, FrameError> {
    buf.get(at..at + 8)
        .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
        .ok_or(FrameError::Truncated(buf.len()))
}

impl<'a> LinkFrame<'a> {
    /// Encode into a fresh buffer.
    pub fn encode(&self) -> Vec<u8> {
        match *self {
            LinkFrame::Data { seq, fin, bytes } => {
                let mut out = Vec::with_capacity(10 + bytes.len());
                out.push(link_kind::DATA);
                out.push(if fin { FLAG_FIN } else { 0 });
                out.extend_from_slice(&seq.to_be_bytes());
                out.extend_from_slice(bytes);
                out
            }
            LinkFrame::Ack { seq } => Self::tagged_u64(link_kind::ACK, seq),
            LinkFrame::Ping { id } => Self::tagged_u64(link_kind::PING, id),
            LinkFrame::Pong { id } => Self::tagged_u64(link_kind::PONG, id),
            LinkFrame::Ready { gen } => {
                let mut out = Vec::with_capacity(5);
                out.push(link_kind::READY);
                out.extend_from_slice(&gen.to_be_bytes());
                out
            }
            LinkFrame::Unreliable { bytes } => {
                let mut out = Vec::with_capacity(1 + bytes.len());
                out.push(link_kind::UNRELIABLE);
                out.extend_from_slice(bytes);
                out
            }
            LinkFrame::UnreliablePart {
                msg,
                index,
                count,
                bytes,
            } => {
                let mut out = Vec::with_capacity(PART_HEADER_LEN + bytes.len());
                out.push(link_kind::UNRELIABLE_PART);
                out.extend_from_slice(&msg.to_be_bytes());
                out.extend_from_slice(&index.to_be_bytes());
                out.extend_from_slice(&count.to_be_bytes());
                out.extend_from_slice(bytes);
                out
            }
            LinkFrame::DataLane {
                lane,
                seq,
                fin,
                bytes,
            } => {
                let mut out = Vec::with_capacity(11 + bytes.len());
                out.push(link_kind::DATA_LANE);
                out.push(if fin { FLAG_FIN } else { 0 });
                out.push(lane);
                out.extend_from_slice(&seq.to_be_bytes());
                out.extend_from_slice(bytes);
                out
            }
            LinkFrame::AckLane { lane, seq } => {
                let mut out = Vec::with_capacity(10);
                out.push(link_kind::ACK_LANE);
                out.push(lane);
                out.extend_from_slice(&seq.to_be_bytes());
                out
            }
            LinkFrame::UnreliableSeq {
                lane,
                seq,
                index,
                count,
                bytes,
            } => {
                let mut out = Vec::with_capacity(SEQ_HEADER_LEN + bytes.len());
                out.push(link_kind::UNRELIABLE_SEQ);
                out.push(lane);
                out.extend_from_slice(&seq.to_be_bytes());
                out.push(index);
                out.push(count);
                out.extend_from_slice(bytes);
                out
            }
            LinkFrame::Version { version } => {
                let mut out = Vec::with_capacity(5);
                out.push(link_kind::VERSION);
                out.extend_from_slice(&version.to_be_bytes());
                out
            }
        }
    }

    fn tagged_u64(kind: u8, v: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(9);
        out.push(kind);
        out.extend_from_slice(&v.to_be_bytes());
        out
    }

    /// Decode a link-layer frame.
    pub fn decode(buf: &'a [u8]) -> Result<Self, FrameError> {
        let kind = *buf.first().ok_or(FrameError::Truncated(0))?;
        match kind {
            link_kind::DATA => {
                if buf.len() < 10 {
                    return Err(FrameError::Truncated(buf.len()));
                }
                Ok(LinkFrame::Data {
                    fin: buf[1] & FLAG_FIN != 0,
                    seq: read_u64(buf, 2)?,
                    bytes: &buf[10..],
                })
            }
            link_kind::ACK => Ok(LinkFrame::Ack {
                seq: read_u64(buf, 1)?,
            }),
            link_kind::PING => Ok(LinkFrame::Ping {
                id: read_u64(buf, 1)?,
            }),
            link_kind::PONG => Ok(LinkFrame::Pong {
                id: read_u64(buf, 1)?,
            }),
            link_kind::UNRELIABLE => Ok(LinkFrame::Unreliable { bytes: &buf[1..] }),
            link_kind::READY => match buf.get(1..5) {
                Some(b) => Ok(LinkFrame::Ready {
                    gen: u32::from_be_bytes(b.try_into().expect("4 bytes")),
                }),
                None => Err(FrameError::Truncated(buf.len())),
            },
            link_kind::UNRELIABLE_PART => {
                if buf.len() < PART_HEADER_LEN {
                    return Err(FrameError::Truncated(buf.len()));
                }
                Ok(LinkFrame::UnreliablePart {
                    msg: u32::from_be_bytes(buf[1..5].try_into().expect("4 bytes")),
                    index: u16::from_be_bytes([buf[5], buf[6]]),
                    count: u16::from_be_bytes([buf[7], buf[8]]),
                    bytes: &buf[PART_HEADER_LEN..],
                })
            }
            link_kind::DATA_LANE => {
                if buf.len() < 11 {
                    return Err(FrameError::Truncated(buf.len()));
                }
                Ok(LinkFrame::DataLane {
                    fin: buf[1] & FLAG_FIN != 0,
                    lane: buf[2],
                    seq: read_u64(buf, 3)?,
                    bytes: &buf[11..],
                })
            }
            link_kind::ACK_LANE => Ok(LinkFrame::AckLane {
                lane: *buf.get(1).ok_or(FrameError::Truncated(buf.len()))?,
                seq: read_u64(buf, 2)?,
            }),
            link_kind::UNRELIABLE_SEQ => {
                if buf.len() < SEQ_HEADER_LEN {
                    return Err(FrameError::Truncated(buf.len()));
                }
                Ok(LinkFrame::UnreliableSeq {
                    lane: buf[1],
                    seq: u32::from_be_bytes(buf[2..6].try_into().expect("4 bytes")),
                    index: buf[6],
                    count: buf[7],
                    bytes: &buf[SEQ_HEADER_LEN..],
                })
            }
            link_kind::VERSION => match buf.get(1..5) {
                Some(b) => Ok(LinkFrame::Version {
                    version: u32::from_be_bytes(b.try_into().expect("4 bytes")),
                }),
                None => Err(FrameError::Truncated(buf.len())),
            },
            k => Err(FrameError::UnknownKind(k)),
        }
    }
}

/// Validate a group name: 1–64 bytes of `[A-Za-z0-9._-]`.
pub fn validate_group(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Validate a display name: 1–64 bytes of UTF-8 without a forbidden code point
/// (`docs/PROTOCOL.md` §3.3).
///
/// The rule: refuse every code point that is invisible by design or changes how the text
/// around it is laid out, so that a name cannot pass for another name, hide, or reorder the text
/// it is shown next to:
///
/// * general category **Cc** (controls) and **Cf** (format characters: bidi embeddings,
///   overrides and isolates U+202A–U+202E, U+2066–U+2069, marks U+200E/U+200F/U+061C,
///   zero-width space/joiners U+200B–U+200D, word joiner U+2060, BOM U+FEFF, soft hyphen U+00AD,
///   tag characters U+E0001, U+E0020–U+E007F, …);
/// * **Zl** and **Zp** (U+2028 line and U+2029 paragraph separator): line breaks, like `\n`;
/// * the other code points Unicode lists as *Default_Ignorable_Code_Point* (rendered as nothing)
///   that are not Cf: U+034F combining grapheme joiner, U+115F/U+1160/U+3164/U+FFA0 Hangul
///   fillers, U+17B4/U+17B5 Khmer inherent vowels, and the ranges Unicode reserves as
///   default-ignorable for future use (U+2065, U+FFF0–U+FFF8, U+E0000–U+E0FFF) — **except** the
///   variation selectors U+FE00–U+FE0F, U+E0100–U+E01EF and Mongolian U+180B–U+180D, U+180F,
///   which emoji (U+2764 U+FE0F, the red heart most emoji keyboards insert), Mongolian and CJK names
///   need.
///
/// Everything else is allowed: letters, marks, digits, punctuation and symbols of every script,
/// emoji, spaces (Zs), private-use and unassigned code points (refusing unassigned ones would make
/// validity depend on the Unicode version of each implementation and refuse newer emoji).
/// Consequences of refusing all of Cf: emoji ZWJ sequences (family, rainbow flag: emoji joined
/// by U+200D), subdivision flags (U+1F3F4 + tag characters) and ZWNJ/ZWJ in Persian and Indic
/// spellings are refused; single emoji, skin-tone modifiers and regional-indicator flags are
/// fine.
pub fn validate_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && !name.chars().any(name_char_forbidden)
}

/// Whether `c` may not appear in a display name (the rule is documented on [`validate_name`]).
fn name_char_forbidden(c: char) -> bool {
    use unicode_properties::{GeneralCategory as Gc, UnicodeGeneralCategory};
    matches!(
        c.general_category(),
        Gc::Control | Gc::Format | Gc::LineSeparator | Gc::ParagraphSeparator
    ) || matches!(
        c,
        '\u{034F}'
            | '\u{115F}'
            | '\u{1160}'
            | '\u{17B4}'
            | '\u{17B5}'
            | '\u{2065}'
            | '\u{3164}'
            | '\u{FFA0}'
            | '\u{FFF0}'..='\u{FFF8}'
            | '\u{E0000}'..='\u{E00FF}'
            | '\u{E01F0}'..='\u{E0FFF}'
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_roundtrip() {
        let f = RelayFrame {
            peer: 7,
            link: 3,
            payload: b"hi",
        };
        let enc = f.encode();
        assert_eq!(RelayFrame::decode(&enc).unwrap(), f);
        assert_eq!(RelayFrame::decode(&enc[..4]), Err(FrameError::Truncated(4)));
        assert_eq!(
            RelayFrame::decode(&[9u8; 12]),
            Err(FrameError::UnknownKind(9))
        );
    }

    /// The UNRELIABLE_PART example of PROTOCOL.md §8.1, byte for byte.
    #[test]
    fn unreliable_part_matches_the_documented_bytes() {
        let f = LinkFrame::UnreliablePart {
            msg: 1,
            index: 0,
            count: 2,
            bytes: b"ab",
        };
        assert_eq!(
            f.encode(),
            [0x16, 0, 0, 0, 1, 0, 0, 0, 2, 0x61, 0x62].to_vec()
        );
        assert_eq!(MAX_PART_PAYLOAD, 1015);
        assert_eq!(MAX_PARTS, 17);
        assert!(LinkFrame::decode(&[0x16, 0, 0, 0, 1, 0, 0, 0]).is_err());
    }

    #[test]
    fn link_roundtrip() {
        for f in [
            LinkFrame::Data {
                seq: 42,
                fin: true,
                bytes: b"abc",
            },
            LinkFrame::Data {
                seq: 1,
                fin: false,
                bytes: b"",
            },
            LinkFrame::Ack { seq: 9 },
            LinkFrame::Unreliable { bytes: b"x" },
            LinkFrame::Ping { id: 5 },
            LinkFrame::Pong { id: 6 },
            LinkFrame::Ready { gen: 3 },
            LinkFrame::UnreliablePart {
                msg: 7,
                index: 1,
                count: 2,
                bytes: b"yz",
            },
        ] {
            assert_eq!(LinkFrame::decode(&f.encode()).unwrap(), f);
        }
        assert!(LinkFrame::decode(&[]).is_err());
        assert!(LinkFrame::decode(&[0x10, 0, 1]).is_err());
        assert!(LinkFrame::decode(&[0x99]).is_err());
    }

    /// The version 3 frames byte for byte, as in the examples of PROTOCOL.md §8.8.1.
    #[test]
    fn lane_frames_match_the_protocol_examples() {
        let hex =
            |f: LinkFrame| -> String { f.encode().iter().map(|b| format!("{b:02x}")).collect() };
        let cases = [
            (LinkFrame::Version { version: 3 }, "1a00000003"),
            (
                LinkFrame::DataLane {
                    lane: 1,
                    seq: 1,
                    fin: true,
                    bytes: b"hi",
                },
                concat!("17010100000000", "00000001", "6869"),
            ),
            (
                LinkFrame::DataLane {
                    lane: 7,
                    seq: 2,
                    fin: false,
                    bytes: b"",
                },
                "1700070000000000000002",
            ),
            (
                LinkFrame::AckLane { lane: 1, seq: 1 },
                "18010000000000000001",
            ),
            (
                LinkFrame::UnreliableSeq {
                    lane: 2,
                    seq: 7,
                    index: 0,
                    count: 1,
                    bytes: b"xy",
                },
                concat!("190200000007", "0001", "7879"),
            ),
            (
                LinkFrame::UnreliableSeq {
                    lane: 0,
                    seq: 8,
                    index: 1,
                    count: 2,
                    bytes: b"z",
                },
                concat!("1900000000080102", "7a"),
            ),
        ];
        for (f, want) in cases {
            assert_eq!(hex(f.clone()), want);
            assert_eq!(LinkFrame::decode(&f.encode()).unwrap(), f);
        }
        for short in [
            &[0x17u8, 1, 1, 0, 0, 0, 0, 0, 0, 0][..],
            &[0x18, 1],
            &[0x19, 0, 0, 0, 0, 1, 0],
            &[0x1a, 0, 0, 3],
        ] {
            assert!(LinkFrame::decode(short).is_err(), "{short:?}");
        }
    }

    #[test]
    fn names_accepted() {
        for name in [
            "alice",
            " ",
            "Ana María",
            "Zoë-Ünal",
            "Дмитрий",
            "Σωκράτης",
            "李小龙",
            "山田太郎",
            "김민수",
            "محمد",
            "דוד",
            "देवनागरी",
            "สมชาย",
            "ქართული",
            "Ἀθηνᾶ",
            "e\u{301}cole", // combining acute accent (Mn)
            "🎮 gamer",
            "🚀🚀🚀",
            "\u{1F44D}\u{1F3FD}",    // thumbs up + skin tone modifier
            "\u{1F1EB}\u{1F1F7}",    // regional indicator flag FR
            "\u{2764}\u{FE0F} love", // emoji presentation selector VS16
            "\u{845B}\u{E0100}",     // ideographic variation selector
            "\u{1820}\u{180B}",      // Mongolian free variation selector
            "\u{00A0}nbsp\u{3000}",  // Zs spaces are visible
            "\u{E000}",              // private use
            "\u{2800}",              // braille blank: a visible-width cell like a space
            "a\u{FFFC}",             // object replacement character (So)
        ] {
            assert!(validate_name(name), "{name:?} should be valid");
        }
        // Length is in bytes: 64 two-byte letters are too long, 32 are fine.
        assert!(validate_name(&"é".repeat(32)));
        assert!(!validate_name(&"é".repeat(33)));
        assert!(validate_name(&"x".repeat(64)));
        assert!(!validate_name(&"x".repeat(65)));
        assert!(!validate_name(""));
    }

    #[test]
    fn names_refused() {
        let refused: &[(&str, &[char])] = &[
            (
                "C0/C1 controls (Cc)",
                &[
                    '\0', '\u{7}', '\t', '\n', '\r', '\u{1B}', '\u{7F}', '\u{85}', '\u{9F}',
                ],
            ),
            (
                "bidi embeddings and overrides (Cf)",
                &['\u{202A}', '\u{202B}', '\u{202C}', '\u{202D}', '\u{202E}'],
            ),
            (
                "bidi isolates (Cf)",
                &['\u{2066}', '\u{2067}', '\u{2068}', '\u{2069}'],
            ),
            ("bidi marks (Cf)", &['\u{200E}', '\u{200F}', '\u{061C}']),
            (
                "zero-width space and joiners (Cf)",
                &['\u{200B}', '\u{200C}', '\u{200D}'],
            ),
            (
                "word joiner and invisible operators (Cf)",
                &['\u{2060}', '\u{2061}', '\u{2062}', '\u{2063}', '\u{2064}'],
            ),
            ("deprecated format controls (Cf)", &['\u{206A}', '\u{206F}']),
            ("byte order mark (Cf)", &['\u{FEFF}']),
            ("soft hyphen (Cf)", &['\u{00AD}']),
            ("Mongolian vowel separator (Cf)", &['\u{180E}']),
            (
                "Arabic number sign, interlinear annotation (Cf)",
                &['\u{0600}', '\u{FFF9}', '\u{FFFB}'],
            ),
            (
                "shorthand format controls, musical beams (Cf)",
                &['\u{1BCA0}', '\u{1D173}'],
            ),
            (
                "tag characters (Cf)",
                &['\u{E0001}', '\u{E0020}', '\u{E0041}', '\u{E007F}'],
            ),
            (
                "line and paragraph separators (Zl, Zp)",
                &['\u{2028}', '\u{2029}'],
            ),
            ("combining grapheme joiner", &['\u{034F}']),
            (
                "Hangul fillers",
                &['\u{115F}', '\u{1160}', '\u{3164}', '\u{FFA0}'],
            ),
            ("Khmer inherent vowels", &['\u{17B4}', '\u{17B5}']),
            (
                "reserved default-ignorables",
                &[
                    '\u{2065}',
                    '\u{FFF0}',
                    '\u{FFF8}',
                    '\u{E0000}',
                    '\u{E0080}',
                    '\u{E00FF}',
                    '\u{E01F0}',
                    '\u{E0FFF}',
                ],
            ),
        ];
        for (class, chars) in refused {
            for &c in *chars {
                for name in [
                    c.to_string(),
                    format!("ab{c}"),
                    format!("{c}ab"),
                    format!("a{c}b"),
                ] {
                    assert!(!validate_name(&name), "{class}: {name:?} should be refused");
                }
            }
        }
        // The spoofs the rule exists for.
        assert!(!validate_name("alice\u{202E}gpj.exe"));
        assert!(!validate_name("ali\u{200B}ce"));
        assert!(!validate_name("\u{3164}"));
        assert!(!validate_name("admin\u{2028}system: you are banned"));
        // Emoji ZWJ sequences contain U+200D (Cf) and are refused with it.
        assert!(!validate_name(
            "\u{1F468}\u{200D}\u{1F469}\u{200D}\u{1F467}"
        ));
    }

    #[test]
    fn an_unknown_direct_policy_reads_as_the_strictest() {
        let m: MemberInfo = serde_json::from_str(
            r#"{"peer":1,"name":"a","link":2,"initiator":true,"direct":"lan-only"}"#,
        )
        .unwrap();
        assert_eq!(m.direct, DirectPolicy::None);
        let m: MemberInfo =
            serde_json::from_str(r#"{"peer":1,"name":"a","link":2,"initiator":true}"#).unwrap();
        assert_eq!(m.direct, DirectPolicy::Any);
        let m: MemberInfo = serde_json::from_str(
            r#"{"peer":1,"name":"a","link":2,"initiator":true,"direct":"relay"}"#,
        )
        .unwrap();
        assert_eq!(m.direct, DirectPolicy::Relay);
    }

    #[test]
    fn json_shapes() {
        let m: ClientMsg =
            serde_json::from_str(r#"{"type":"hello","version":1,"name":"a"}"#).unwrap();
        assert_eq!(
            m,
            ClientMsg::Hello {
                version: 1,
                name: "a".into(),
                token: None,
                direct: DirectPolicy::Any,
                resumable: false,
                resume: None,
            }
        );
        let e = serde_json::to_string(&ServerMsg::error(ErrorCode::NotCoMember, "x")).unwrap();
        assert_eq!(
            e,
            r#"{"type":"error","code":"not_co_member","message":"x"}"#
        );
    }
}
