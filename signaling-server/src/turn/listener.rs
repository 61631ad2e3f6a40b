//! The guard around the listening UDP socket.
//!
//! The turn crate's request handling is crate-private, so policy goes in front of it: the
//! guard is the [`Conn`] the turn server reads from and writes to. Inbound, it verifies the
//! long-term credentials itself (answering 401), enforces allocation quotas (486), the peer
//! policy (403), clamps lifetimes, and answers 437 where the turn crate would stay silent.
//! Outbound, it learns which Allocate requests succeeded and counts data relayed to clients.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use stun::attributes::*;
use stun::error_code::*;
use stun::integrity::MessageIntegrity;
use stun::message::*;
use stun::textattrs::TextAttribute;
use tokio::net::UdpSocket;

use webrtc_util::Conn;

use super::auth::{now_unix, parse_rest_username, rest_key};
use super::socket::ClosableUdp;
use super::wire;
use super::{Live, Pending, Shared, LOG};

/// RFC 8656 default allocation/refresh lifetime.
pub(crate) const DEFAULT_LIFETIME_SECS: u32 = 600;
/// Longest lifetime we grant. RFC 8656 recommends 3600 s, but turn 0.17.2 replaces any
/// requested value `>= 3600` by its 600 s default (`allocation_lifetime`, request.rs:1004), so
/// the guard clamps requests to one second less.
pub(crate) const MAX_LIFETIME_SECS: u32 = 3599;
/// How long an Allocate may wait for the turn crate's answer before its quota slot is freed.
const PENDING_TIMEOUT: Duration = Duration::from_secs(10);

/// What to do with an inbound datagram.
enum Verdict {
    /// Hand it to the turn server (possibly rewritten in place).
    Pass,
    /// Swallow it.
    Drop,
    /// Answer it ourselves and swallow it.
    Reply(Vec<u8>),
}

/// The listening socket as seen by the turn server.
pub(crate) struct GuardedListener {
    socket: ClosableUdp,
    local: SocketAddr,
    shared: Arc<Shared>,
}

impl GuardedListener {
    pub(crate) fn new(socket: UdpSocket, local: SocketAddr, shared: Arc<Shared>) -> Self {
        GuardedListener {
            socket: ClosableUdp::new(socket, format!("listener {local}")),
            local,
            shared,
        }
    }

    /// Really closes the listener (the turn crate's `close` is ignored, see [`Conn::close`]).
    pub(crate) fn shut(&self) {
        self.socket.shut();
    }

    fn inspect(&self, buf: &mut [u8], src: SocketAddr) -> Verdict {
        if buf.is_empty() || buf[0] & 0xC0 == 0x40 {
            // ChannelData: only reaches peers through an existing (vetted) channel binding.
            return Verdict::Pass;
        }
        if wire::is_classic_binding_request(buf) {
            return match wire::classic_binding_response(buf, src) {
                Some(r) => Verdict::Reply(r),
                None => Verdict::Drop,
            };
        }
        if !is_message(buf) {
            return Verdict::Pass;
        }
        let mut m = Message::new();
        m.raw = buf.to_vec();
        if m.decode().is_err() {
            return Verdict::Pass;
        }
        let (method, class) = (m.typ.method, m.typ.class);

        if class == CLASS_INDICATION && method == METHOD_SEND {
            if let Some(peers) = wire::peer_addresses(buf) {
                if let Some(p) = peers.iter().find(|p| self.shared.denied(p.ip())) {
                    self.shared
                        .counters
                        .refused_peer
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(target: LOG, client = %src, peer = %p,
                        "dropped Send indication to a denied peer");
                    return Verdict::Drop;
                }
            }
            return Verdict::Pass;
        }
        if class != CLASS_REQUEST || method == METHOD_BINDING || !m.contains(ATTR_MESSAGE_INTEGRITY)
        {
            // Binding needs no credentials; unauthenticated requests get the turn crate's
            // 401 challenge (with a nonce it knows).
            return Verdict::Pass;
        }
        let (Ok(nonce), Ok(username), Ok(realm)) = (
            TextAttribute::get_from_as(&m, ATTR_NONCE),
            TextAttribute::get_from_as(&m, ATTR_USERNAME),
            TextAttribute::get_from_as(&m, ATTR_REALM),
        ) else {
            return Verdict::Pass; // the turn crate answers 400
        };
        let (nonce, username, realm) = (nonce.text, username.text, realm.text);
        let txid = m.transaction_id;

        // turn 0.17.2 answers a failed AuthHandler or a bad MESSAGE-INTEGRITY with 400
        // (request.rs:210-225); RFC 8489 wants 401, so answer those here. The echoed nonce came
        // from the turn crate, so a corrected retry is accepted.
        let refuse_auth = |why: String| {
            self.shared
                .counters
                .refused_auth
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(target: LOG, client = %src, %username, method = %method,
                "refused (401): {why}");
            reply(wire::error_response(
                txid,
                method,
                CODE_UNAUTHORIZED,
                "Unauthorized",
                wire::realm_nonce(&self.shared.realm, &nonce),
                None,
            ))
        };
        if realm != self.shared.realm {
            return refuse_auth(format!("unknown realm {realm:?}"));
        }
        let renewing = method != METHOD_ALLOCATE && self.shared.owns_allocation(src, &username);
        let key = match rest_key(&self.shared.secret, &username, &realm, now_unix(), renewing) {
            Ok(k) => k,
            Err(e) => return refuse_auth(e.to_string()),
        };
        if MessageIntegrity(key.clone()).check(&mut m).is_err() {
            return refuse_auth("MESSAGE-INTEGRITY mismatch (wrong password)".into());
        }
        let user = parse_rest_username(&username)
            .map(|(_, u)| u.to_owned())
            .unwrap_or_default();

        match method {
            METHOD_ALLOCATE => self.on_allocate(buf, &m, src, &username, user, &key),
            METHOD_REFRESH => self.on_refresh(buf, &m, src, &key),
            METHOD_CREATE_PERMISSION | METHOD_CHANNEL_BIND => {
                self.on_peer_request(buf, &m, src, &username, &key)
            }
            _ => Verdict::Pass,
        }
    }

    fn on_allocate(
        &self,
        buf: &mut [u8],
        m: &Message,
        src: SocketAddr,
        username: &str,
        user: String,
        key: &[u8],
    ) -> Verdict {
        let txid = m.transaction_id;
        {
            let mut book = self.shared.lock_book();
            if book.live.contains_key(&src) {
                // A retransmission or a second Allocate on the same 5-tuple: the turn crate
                // answers 437.
                return Verdict::Pass;
            }
            let now = Instant::now();
            book.pending
                .retain(|id, p| *id == txid.0 || now.duration_since(p.at) < PENDING_TIMEOUT);
            book.pending.remove(&txid.0);
            let total = book.live.len() + book.pending.len();
            let for_user = book.per_user.get(&user).copied().unwrap_or(0)
                + book.pending.values().filter(|p| p.user == user).count();
            let refusal = if total >= self.shared.total_quota {
                self.shared
                    .counters
                    .refused_total_quota
                    .fetch_add(1, Ordering::Relaxed);
                Some(format!(
                    "total quota reached ({total}/{})",
                    self.shared.total_quota
                ))
            } else if for_user >= self.shared.user_quota {
                self.shared
                    .counters
                    .refused_user_quota
                    .fetch_add(1, Ordering::Relaxed);
                Some(format!(
                    "user quota reached ({for_user}/{})",
                    self.shared.user_quota
                ))
            } else {
                None
            };
            if let Some(why) = refusal {
                drop(book);
                tracing::info!(target: LOG, client = %src, username, "allocation refused (486): {why}");
                return reply(wire::error_response(
                    txid,
                    METHOD_ALLOCATE,
                    CODE_ALLOC_QUOTA_REACHED,
                    "Allocation Quota Reached",
                    Vec::new(),
                    Some(key),
                ));
            }
            book.pending.insert(
                txid.0,
                Pending {
                    src,
                    user,
                    username: username.to_owned(),
                    at: now,
                },
            );
        }
        clamp_lifetime(buf, m, key, false);
        Verdict::Pass
    }

    fn on_refresh(&self, buf: &mut [u8], m: &Message, src: SocketAddr, key: &[u8]) -> Verdict {
        let requested = lifetime_of(m);
        if requested != Some(0) && !self.shared.lock_book().live.contains_key(&src) {
            // The turn crate would not answer at all (request.rs:640).
            return mismatch(m, key);
        }
        clamp_lifetime(buf, m, key, true);
        Verdict::Pass
    }

    fn on_peer_request(
        &self,
        buf: &[u8],
        m: &Message,
        src: SocketAddr,
        username: &str,
        key: &[u8],
    ) -> Verdict {
        if !self.shared.lock_book().live.contains_key(&src) {
            // The turn crate would not answer at all (request.rs:694, 821).
            return mismatch(m, key);
        }
        let Some(peers) = wire::peer_addresses(buf) else {
            return Verdict::Pass; // malformed: the turn crate answers 400
        };
        if let Some(p) = peers.iter().find(|p| self.shared.denied(p.ip())) {
            self.shared
                .counters
                .refused_peer
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(target: LOG, client = %src, username, peer = %p, method = %m.typ.method,
                "refused (403): peer address denied by policy");
            return reply(wire::error_response(
                m.transaction_id,
                m.typ.method,
                CODE_FORBIDDEN,
                "Forbidden",
                Vec::new(),
                Some(key),
            ));
        }
        Verdict::Pass
    }

    /// Watches what the turn server sends: Allocate outcomes and data towards clients.
    fn observe_outbound(&self, buf: &[u8], dst: SocketAddr) {
        if buf.len() >= 4 && buf[0] & 0xC0 == 0x40 {
            let c = &self.shared.counters;
            c.to_client_packets.fetch_add(1, Ordering::Relaxed);
            c.to_client_bytes.fetch_add(
                u64::from(u16::from_be_bytes([buf[2], buf[3]])),
                Ordering::Relaxed,
            );
            return;
        }
        if !is_message(buf) {
            return;
        }
        match u16::from_be_bytes([buf[0], buf[1]]) {
            // Data indication
            0x0017 => {
                if let Some((_, len)) = wire::find(buf, ATTR_DATA) {
                    let c = &self.shared.counters;
                    c.to_client_packets.fetch_add(1, Ordering::Relaxed);
                    c.to_client_bytes.fetch_add(len as u64, Ordering::Relaxed);
                }
            }
            // Allocate success response
            0x0103 => {
                let mut txid = [0u8; 12];
                txid.copy_from_slice(&buf[8..20]);
                let relay = wire::find(buf, ATTR_XOR_RELAYED_ADDRESS)
                    .and_then(|(off, len)| wire::xor_addr(&buf[off..off + len], &txid));
                let lifetime = wire::find(buf, ATTR_LIFETIME)
                    .filter(|&(_, len)| len == 4)
                    .map(|(off, _)| {
                        u32::from_be_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]])
                    });
                let mut book = self.shared.lock_book();
                let Some(p) = book.pending.remove(&txid) else {
                    return;
                };
                let Some(relay) = relay else {
                    return;
                };
                *book.per_user.entry(p.user.clone()).or_insert(0) += 1;
                let live = book.live.len() + 1;
                book.live.insert(
                    dst,
                    Live {
                        user: p.user,
                        username: p.username.clone(),
                        relay,
                    },
                );
                drop(book);
                self.shared
                    .counters
                    .allocations_total
                    .fetch_add(1, Ordering::Relaxed);
                debug_assert_eq!(p.src, dst);
                tracing::info!(target: LOG, client = %dst, username = %p.username, %relay,
                    lifetime_s = lifetime.unwrap_or(0), live, "allocation created");
            }
            // Allocate error response
            0x0113 => {
                let mut txid = [0u8; 12];
                txid.copy_from_slice(&buf[8..20]);
                self.shared.lock_book().pending.remove(&txid);
            }
            _ => {}
        }
    }
}

fn reply(r: Option<Vec<u8>>) -> Verdict {
    r.map(Verdict::Reply).unwrap_or(Verdict::Drop)
}

fn mismatch(m: &Message, key: &[u8]) -> Verdict {
    reply(wire::error_response(
        m.transaction_id,
        m.typ.method,
        CODE_ALLOC_MISMATCH,
        "Allocation Mismatch",
        Vec::new(),
        Some(key),
    ))
}

fn lifetime_of(m: &Message) -> Option<u32> {
    let v = m.get(ATTR_LIFETIME).ok()?;
    (v.len() == 4).then(|| u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
}

/// RFC 8656 §7.2/§7.3: lifetime = max(default, min(requested, maximum)); a Refresh with 0
/// deletes the allocation and stays as it is. Requests without LIFETIME get the default anyway.
fn clamp_lifetime(buf: &mut [u8], m: &Message, key: &[u8], refresh: bool) {
    let Some(requested) = lifetime_of(m) else {
        return;
    };
    if refresh && requested == 0 {
        return;
    }
    let granted = requested.clamp(DEFAULT_LIFETIME_SECS, MAX_LIFETIME_SECS);
    if granted != requested && !wire::rewrite_lifetime(buf, key, granted) {
        tracing::debug!(target: LOG, "could not rewrite LIFETIME {requested}");
    }
}

#[async_trait]
impl Conn for GuardedListener {
    async fn connect(&self, _addr: SocketAddr) -> webrtc_util::Result<()> {
        Err(webrtc_util::Error::Other(
            "listener is not connected".into(),
        ))
    }

    async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        self.recv_from(buf).await.map(|(n, _)| n)
    }

    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        loop {
            let (n, src) = self.socket.recv_from(buf).await?;
            match self.inspect(&mut buf[..n], src) {
                Verdict::Pass => return Ok((n, src)),
                Verdict::Drop => {}
                Verdict::Reply(r) => {
                    if let Err(e) = self.socket.get()?.send_to(&r, src).await {
                        tracing::debug!(target: LOG, client = %src, "sending answer: {e}");
                    }
                }
            }
        }
    }

    async fn send(&self, _buf: &[u8]) -> webrtc_util::Result<usize> {
        Err(webrtc_util::Error::Other(
            "listener is not connected".into(),
        ))
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        let socket = self.socket.get()?;
        self.observe_outbound(buf, target);
        Ok(socket.send_to(buf, target).await?)
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.local)
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        None
    }

    /// Ignored: turn 0.17.2 calls `close` on the shared listening socket whenever any single
    /// allocation closes (allocation/mod.rs:255). [`GuardedListener::shut`] really closes it.
    async fn close(&self) -> webrtc_util::Result<()> {
        Ok(())
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}
