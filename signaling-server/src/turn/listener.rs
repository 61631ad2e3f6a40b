//! The guard around the listening UDP socket.
//!
//! The turn crate's request handling is crate-private, so policy goes in front of it: the
//! guard is the [`Conn`] the turn server reads from and writes to. Inbound, it verifies the
//! long-term credentials itself (answering 401), enforces allocation quotas (486), the relay
//! address family (440), the peer policy (403), refuses malformed peer addresses (400) that
//! the turn crate would decode as garbage, drops what is not STUN or ChannelData, clamps
//! lifetimes, and answers 437 where the turn crate would stay silent.
//! Outbound, it learns which Allocate requests succeeded and counts data relayed to clients.
//!
//! It also runs the client → peer half of the ChannelData fast path: it remembers the
//! authenticated Allocate, Refresh, CreatePermission and ChannelBind requests it passes on and
//! applies them to the allocation's relay socket (`RelayConn`) when the turn crate's success
//! response goes out, and relays ChannelData on a live channel itself.

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
use super::batch::{BatchSlot, RecvBatch, MAX_BATCH};
use super::relay::{RelayConn, Route, CHANNEL_HEADER};
use super::socket::ClosableUdp;
use super::wire::{self, RequestedFamily};
use super::{IpKeys, Live, Pending, PendingOp, PendingReq, Shared, LOG};

/// RFC 8656 default allocation/refresh lifetime.
pub(crate) const DEFAULT_LIFETIME_SECS: u32 = 600;
/// Longest lifetime we grant. RFC 8656 recommends 3600 s, but turn 0.17.2 replaces any
/// requested value `>= 3600` by its 600 s default (`allocation_lifetime`, request.rs:1004), so
/// the guard clamps requests to one second less.
pub(crate) const MAX_LIFETIME_SECS: u32 = 3599;
/// How long an Allocate may wait for the turn crate's answer before its quota slot is freed.
const PENDING_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest datagram from a client that is handled (STUN and ChannelData; bigger ones are
/// dropped, the turn crate reads at most 1500 bytes).
const LISTENER_MAX_DATAGRAM: usize = 2048;
/// Most Refresh / CreatePermission / ChannelBind requests awaiting an answer that are tracked
/// for the fast path (beyond that, new ones simply do not reach it).
const MAX_PENDING_REQS: usize = 4096;

/// What to do with an inbound datagram.
pub(crate) enum Verdict {
    /// Hand it to the turn server (possibly rewritten in place).
    Pass,
    /// Swallow it.
    Drop,
    /// Answer it ourselves and swallow it.
    Reply(Vec<u8>),
}

/// ChannelData payloads of one received batch for one relay socket and peer:
/// (batch slot, payload length).
struct Group {
    relay: Arc<RelayConn>,
    peer: SocketAddr,
    items: [(usize, usize); MAX_BATCH],
    count: usize,
}

/// The fast path's ChannelData of one received batch, by relay socket and peer (each in
/// arrival order).
#[derive(Default)]
pub(crate) struct Groups {
    list: Vec<Group>,
    len: usize,
}

impl Groups {
    fn push(&mut self, relay: &Arc<RelayConn>, peer: SocketAddr, item: (usize, usize)) {
        let found = self.list[..self.len]
            .iter()
            .position(|g| g.peer == peer && Arc::ptr_eq(&g.relay, relay));
        let g = match found {
            Some(k) => &mut self.list[k],
            None => {
                let g = Group {
                    relay: Arc::clone(relay),
                    peer,
                    items: [(0, 0); MAX_BATCH],
                    count: 0,
                };
                if self.len < self.list.len() {
                    self.list[self.len] = g;
                } else {
                    self.list.push(g);
                }
                self.len += 1;
                &mut self.list[self.len - 1]
            }
        };
        g.items[g.count] = item;
        g.count += 1;
    }

    fn clear(&mut self) {
        self.list.clear();
        self.len = 0;
    }
}

/// The listening socket as seen by the turn server.
pub(crate) struct GuardedListener {
    socket: Arc<ClosableUdp>,
    local: SocketAddr,
    shared: Arc<Shared>,
    /// Received datagrams not yet handled (kept between calls).
    batch: BatchSlot,
}

impl GuardedListener {
    pub(crate) fn new(socket: UdpSocket, local: SocketAddr, shared: Arc<Shared>) -> Self {
        GuardedListener {
            socket: Arc::new(ClosableUdp::new(socket, format!("listener {local}"))),
            local,
            shared,
            batch: BatchSlot::new(MAX_BATCH, LISTENER_MAX_DATAGRAM, 0),
        }
    }

    /// The listening socket (relay sockets send ChannelData to clients through it).
    pub(crate) fn socket(&self) -> Arc<ClosableUdp> {
        Arc::clone(&self.socket)
    }

    /// Receives until a datagram is for the turn crate (copied into `buf`). ChannelData on a
    /// live channel is relayed here; what the guard answers or drops never reaches the turn
    /// crate.
    async fn recv_loop(
        &self,
        socket: &UdpSocket,
        batch: &mut RecvBatch,
        buf: &mut [u8],
    ) -> (usize, SocketAddr) {
        let mut groups = Groups::default();
        loop {
            while let Some((i, n, src, truncated)) = batch.pop() {
                if truncated {
                    tracing::debug!(target: LOG, client = %src,
                        "dropped a datagram over {LISTENER_MAX_DATAGRAM} bytes");
                    continue;
                }
                if self.channel_data(batch.data(i, n), i, src, &mut groups) {
                    continue;
                }
                // What went before leaves first.
                self.flush(batch, &mut groups).await;
                let n = n.min(buf.len());
                buf[..n].copy_from_slice(&batch.data(i, n)[..n]);
                match self.inspect(&mut buf[..n], src) {
                    Verdict::Pass => return (n, src),
                    Verdict::Drop => {}
                    Verdict::Reply(r) => {
                        if let Err(e) = self.socket.send_to(&r, src).await {
                            tracing::debug!(target: LOG, client = %src, "sending answer: {e}");
                        }
                    }
                }
            }
            self.flush(batch, &mut groups).await;
            self.socket.refill(socket, batch).await;
        }
    }

    /// The fast path, client → peer: whether ChannelData in `d` (slot `slot` of the batch)
    /// goes on a live channel (with a live permission); if so it joins `groups`, to be sent from
    /// the allocation's relay socket by [`GuardedListener::flush`]. `false`: the turn crate
    /// decides.
    pub(crate) fn channel_data(
        &self,
        d: &[u8],
        slot: usize,
        src: SocketAddr,
        groups: &mut Groups,
    ) -> bool {
        if d.len() < CHANNEL_HEADER || d[0] & 0xC0 != 0x40 {
            return false;
        }
        let number = u16::from_be_bytes([d[0], d[1]]);
        let len = usize::from(u16::from_be_bytes([d[2], d[3]]));
        // RFC 8656 §12.5: a datagram shorter than the length it claims is discarded (the turn
        // crate does that); padding after the payload is ignored.
        if CHANNEL_HEADER + len > d.len() {
            return false;
        }
        let now = Instant::now();
        let item = (slot, len);
        let next =
            self.shared
                .with_fast_relay(src, |relay| match relay.route_to_peer(src, number, now) {
                    Route::Pass => false,
                    Route::NoPermission => {
                        tracing::debug!(target: LOG, client = %src, channel = number,
                        "dropped ChannelData: the permission for the peer has expired");
                        true
                    }
                    Route::Relay(peer) => {
                        groups.push(relay, peer, item);
                        true
                    }
                });
        next.unwrap_or(false)
    }

    /// Sends the ChannelData payloads collected in `groups`.
    async fn flush(&self, batch: &RecvBatch, groups: &mut Groups) {
        for g in &groups.list[..groups.len] {
            let mut slices: [&[u8]; MAX_BATCH] = [&[]; MAX_BATCH];
            for (slice, &(slot, len)) in slices.iter_mut().zip(&g.items[..g.count]) {
                *slice = &batch.data(slot, CHANNEL_HEADER + len)[CHANNEL_HEADER..];
            }
            g.relay.send_batch_to_peer(&slices[..g.count], g.peer).await;
        }
        groups.clear();
    }

    /// Remembers a request passed to the turn crate until its answer goes out.
    fn track(&self, txid: [u8; 12], src: SocketAddr, op: PendingOp) {
        let now = Instant::now();
        let mut book = self.shared.lock_book();
        if book.pending_reqs.len() >= MAX_PENDING_REQS {
            book.pending_reqs
                .retain(|_, p| now.duration_since(p.at) < PENDING_TIMEOUT);
        }
        if book.pending_reqs.len() < MAX_PENDING_REQS {
            book.pending_reqs
                .insert(txid, PendingReq { src, op, at: now });
        }
    }

    /// The turn crate answered a tracked request to `dst`; on success, tell the fast path.
    fn settle(&self, buf: &[u8], dst: SocketAddr, success: bool) {
        let mut txid = [0u8; 12];
        txid.copy_from_slice(&buf[8..20]);
        let Some(p) = self.shared.lock_book().pending_reqs.remove(&txid) else {
            return;
        };
        if !success || p.src != dst {
            return;
        }
        let Some(relay) = self.shared.fast_relay(dst) else {
            return;
        };
        match p.op {
            PendingOp::ChannelBind { number, peer } => {
                relay.bind_channel(number, peer, p.at, self.shared.channel_lifetime)
            }
            PendingOp::CreatePermission { peers } => relay.permit(&peers, p.at),
            PendingOp::Refresh => match lifetime_in(buf) {
                Some(0) => self.shared.fast_detach(dst, None),
                Some(secs) => relay.refresh(p.at, Duration::from_secs(u64::from(secs))),
                None => {}
            },
        }
    }

    /// Really closes the listener (the turn crate's `close` is ignored, see [`Conn::close`]).
    pub(crate) fn shut(&self) {
        self.socket.shut();
    }

    pub(crate) fn inspect(&self, buf: &mut [u8], src: SocketAddr) -> Verdict {
        if buf.is_empty() {
            self.shared.refuse_malformed();
            return Verdict::Drop;
        }
        if buf[0] & 0xC0 == 0x40 {
            // ChannelData: only reaches peers through an existing (vetted) channel binding.
            return Verdict::Pass;
        }
        if wire::is_classic_binding_request(buf) {
            return match wire::classic_binding_response(buf, src) {
                Some(r) => Verdict::Reply(r),
                None => Verdict::Drop,
            };
        }
        // Neither ChannelData nor STUN (the turn crate would fail to decode it and drop it).
        let m = if is_message(buf) {
            let mut m = Message::new();
            m.raw = buf.to_vec();
            m.decode().is_ok().then_some(m)
        } else {
            None
        };
        let Some(mut m) = m else {
            self.shared.refuse_malformed();
            tracing::trace!(target: LOG, client = %src, len = buf.len(),
                "dropped a datagram that is neither STUN nor ChannelData");
            return Verdict::Drop;
        };
        let (method, class) = (m.typ.method, m.typ.class);

        if class == CLASS_INDICATION && method == METHOD_SEND {
            let peers = wire::peer_addresses(buf).unwrap_or_default();
            if peers.is_empty() {
                self.shared.refuse_malformed();
                tracing::debug!(target: LOG, client = %src,
                    "dropped Send indication with a malformed or missing XOR-PEER-ADDRESS");
                return Verdict::Drop;
            }
            if let Some(p) = peers.iter().find(|p| self.shared.denied(p.ip())) {
                self.shared.refuse_peer(1);
                tracing::debug!(target: LOG, client = %src, peer = %p,
                    "dropped Send indication to a denied peer");
                return Verdict::Drop;
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
        let answer = |code: ErrorCode, reason: &str| {
            reply(wire::error_response(
                txid,
                METHOD_ALLOCATE,
                code,
                reason,
                Vec::new(),
                Some(key),
            ))
        };
        if self.shared.lock_book().live.contains_key(&src) {
            // A retransmission or a second Allocate on the same 5-tuple: the turn crate
            // answers 437.
            return Verdict::Pass;
        }
        // RFC 8656 §7.2 / RFC 6156 §4.2: without REQUESTED-ADDRESS-FAMILY the client wants an
        // IPv4 relayed address; a family the relay sockets do not have gets 440 (the turn crate
        // would answer 508).
        let wants_v4 = match wire::requested_family(buf) {
            RequestedFamily::Absent | RequestedFamily::V4 => Some(true),
            RequestedFamily::V6 => Some(false),
            RequestedFamily::Unknown(_) => None,
            RequestedFamily::Malformed => {
                self.shared.refuse_malformed();
                tracing::debug!(target: LOG, client = %src, username,
                    "refused (400): malformed REQUESTED-ADDRESS-FAMILY");
                return answer(CODE_BAD_REQUEST, "Bad Request");
            }
        };
        if wants_v4 != Some(self.shared.relay_v4) {
            tracing::debug!(target: LOG, client = %src, username,
                family = ?wire::requested_family(buf), relay_v4 = self.shared.relay_v4,
                "refused (440): address family not served");
            return answer(
                CODE_ADDR_FAMILY_NOT_SUPPORTED,
                "Address Family not Supported",
            );
        }
        let keys = IpKeys::new(src.ip(), &user);
        // The per-user quota counts the identity, whatever the session and address.
        let user = super::auth::quota_user(&user).to_owned();
        {
            let mut book = self.shared.lock_book();
            if book.live.contains_key(&src) {
                return Verdict::Pass;
            }
            let now = Instant::now();
            book.pending
                .retain(|id, p| *id == txid.0 || now.duration_since(p.at) < PENDING_TIMEOUT);
            book.pending.remove(&txid.0);
            let total = book.live.len() + book.pending.len();
            let for_user = book.per_user.get(&user).copied().unwrap_or(0)
                + book.pending.values().filter(|p| p.user == user).count();
            let for_src = book.per_src_ip.get(&keys.src).copied().unwrap_or(0)
                + book
                    .pending
                    .values()
                    .filter(|p| p.keys.src == keys.src)
                    .count();
            let for_cred = keys.cred.map(|k| {
                book.per_cred_ip.get(&k).copied().unwrap_or(0)
                    + book
                        .pending
                        .values()
                        .filter(|p| p.keys.cred == Some(k))
                        .count()
            });
            let ip_quota = self.shared.ip_quota;
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
            } else if for_src >= ip_quota {
                self.shared
                    .counters
                    .refused_ip_quota
                    .fetch_add(1, Ordering::Relaxed);
                Some(format!(
                    "source address quota reached for {} ({for_src}/{ip_quota})",
                    keys.src
                ))
            } else if let Some(n) = for_cred.filter(|&n| n >= ip_quota) {
                self.shared
                    .counters
                    .refused_ip_quota
                    .fetch_add(1, Ordering::Relaxed);
                Some(format!(
                    "source address quota reached for the user part's {} ({n}/{ip_quota})",
                    keys.cred.map(|k| k.to_string()).unwrap_or_default()
                ))
            } else {
                None
            };
            if let Some(why) = refusal {
                drop(book);
                tracing::info!(target: LOG, client = %src, username, "allocation refused (486): {why}");
                return answer(CODE_ALLOC_QUOTA_REACHED, "Allocation Quota Reached");
            }
            book.pending.insert(
                txid.0,
                Pending {
                    src,
                    user,
                    username: username.to_owned(),
                    keys,
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
        self.track(m.transaction_id.0, src, PendingOp::Refresh);
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
        // The turn crate decodes a truncated or over-long XOR-PEER-ADDRESS as some address
        // (`stun`'s XorMappedAddress only checks for overflow), and answers a CreatePermission
        // without one with a codeless error: answer 400 here.
        let peers = wire::peer_addresses(buf).unwrap_or_default();
        if peers.is_empty() {
            self.shared.refuse_malformed();
            tracing::debug!(target: LOG, client = %src, username, method = %m.typ.method,
                "refused (400): malformed or missing XOR-PEER-ADDRESS");
            return reply(wire::error_response(
                m.transaction_id,
                m.typ.method,
                CODE_BAD_REQUEST,
                "Bad Request",
                Vec::new(),
                Some(key),
            ));
        }
        if let Some(p) = peers.iter().find(|p| self.shared.denied(p.ip())) {
            self.shared.refuse_peer(1);
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
        let op = if m.typ.method == METHOD_CHANNEL_BIND {
            let number = m
                .get(ATTR_CHANNEL_NUMBER)
                .ok()
                .filter(|v| v.len() >= 2)
                .map(|v| u16::from_be_bytes([v[0], v[1]]));
            // The turn crate binds the first XOR-PEER-ADDRESS.
            match (number, peers.first()) {
                (Some(number), Some(&peer)) => Some(PendingOp::ChannelBind { number, peer }),
                _ => None, // the turn crate answers 400
            }
        } else {
            Some(PendingOp::CreatePermission { peers })
        };
        if let Some(op) = op {
            self.track(m.transaction_id.0, src, op);
        }
        Verdict::Pass
    }

    /// Watches what the turn server sends: Allocate outcomes and data towards clients.
    pub(crate) fn observe_outbound(&self, buf: &[u8], dst: SocketAddr) {
        if buf.len() >= 4 && buf[0] & 0xC0 == 0x40 {
            let c = &self.shared.counters.to_client;
            c.packets.fetch_add(1, Ordering::Relaxed);
            c.bytes.fetch_add(
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
                    let c = &self.shared.counters.to_client;
                    c.packets.fetch_add(1, Ordering::Relaxed);
                    c.bytes.fetch_add(len as u64, Ordering::Relaxed);
                }
            }
            // Refresh, CreatePermission, ChannelBind success / error responses
            0x0104 | 0x0108 | 0x0109 => self.settle(buf, dst, true),
            0x0114 | 0x0118 | 0x0119 => self.settle(buf, dst, false),
            // Allocate success response
            0x0103 => {
                let mut txid = [0u8; 12];
                txid.copy_from_slice(&buf[8..20]);
                let relay = wire::find(buf, ATTR_XOR_RELAYED_ADDRESS)
                    .and_then(|(off, len)| wire::xor_addr(&buf[off..off + len], &txid));
                let lifetime = lifetime_in(buf);
                let mut book = self.shared.lock_book();
                let Some(p) = book.pending.remove(&txid) else {
                    return;
                };
                let Some(relay) = relay else {
                    return;
                };
                book.count(&p.user, p.keys);
                let live = book.live.len() + 1;
                book.live.insert(
                    dst,
                    Live {
                        user: p.user,
                        username: p.username.clone(),
                        relay,
                        keys: p.keys,
                    },
                );
                drop(book);
                let secs = lifetime.unwrap_or(DEFAULT_LIFETIME_SECS);
                self.shared.fast_attach(
                    dst,
                    relay.port(),
                    p.at,
                    Duration::from_secs(u64::from(secs)),
                );
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

/// The LIFETIME of a raw STUN message.
pub(crate) fn lifetime_in(buf: &[u8]) -> Option<u32> {
    wire::find(buf, ATTR_LIFETIME)
        .filter(|&(_, len)| len == 4)
        .map(|(off, _)| u32::from_be_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]]))
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
        let socket = self.socket.get()?;
        let mut batch = self.batch.take();
        let r = (self.socket)
            .until_closed(self.recv_loop(&socket, &mut batch, buf))
            .await;
        self.batch.put(batch);
        r
    }

    async fn send(&self, _buf: &[u8]) -> webrtc_util::Result<usize> {
        Err(webrtc_util::Error::Other(
            "listener is not connected".into(),
        ))
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        self.socket.get()?;
        self.observe_outbound(buf, target);
        Ok(self.socket.send_to(buf, target).await?)
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
