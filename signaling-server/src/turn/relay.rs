//! Relay sockets: a [`RelayAddressGenerator`] binding ports in the configured range, and the
//! relay [`Conn`] that counts relayed traffic and drops anything to or from a denied peer (the
//! second line of defence behind the listener guard).
//!
//! The relay [`Conn`] also carries the ChannelData fast path: a datagram from a peer with a live
//! channel binding (and permission) is framed as ChannelData and sent to the client right
//! here, without going through the turn crate's per-allocation loop (which copies each
//! datagram several times and takes async mutexes for it). Everything else is handed to the
//! turn crate as before.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::net::UdpSocket;

use turn::relay::RelayAddressGenerator;
use webrtc_util::Conn;

use super::batch::{BatchSlot, RecvBatch};
use super::socket::{bind_udp, ClosableUdp};
use super::{Shared, LOG, PERMISSION_LIFETIME};

/// Random ports tried before sweeping the whole range.
const RANDOM_TRIES: usize = 32;
/// Largest datagram from a peer that is relayed (bigger ones are dropped: they would not fit
/// a path MTU anyway, and the turn crate reads at most 1500 bytes).
const MAX_DATAGRAM: usize = 2048;
/// Datagrams received per system call on a relay socket.
const RELAY_BATCH: usize = 8;
/// ChannelData header: channel number and length, two bytes each.
pub(crate) const CHANNEL_HEADER: usize = 4;

/// The hash of the fast path's maps: a multiply–rotate mix with a random per-process seed.
/// SipHash (the std default) costs more than the rest of a lookup; these maps' keys (addresses,
/// channel numbers) only come from authenticated requests, and the seed keeps their buckets
/// unpredictable.
#[derive(Clone, Copy)]
pub(crate) struct FastHash(u64);

impl Default for FastHash {
    fn default() -> Self {
        static SEED: OnceLock<u64> = OnceLock::new();
        FastHash(*SEED.get_or_init(rand::random))
    }
}

impl BuildHasher for FastHash {
    type Hasher = FastHasher;
    fn build_hasher(&self) -> FastHasher {
        FastHasher(self.0)
    }
}

pub(crate) struct FastHasher(u64);

impl FastHasher {
    #[inline]
    fn mix(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl Hasher for FastHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.mix(u64::from_le_bytes(w));
        }
    }
    #[inline]
    fn write_u8(&mut self, v: u8) {
        self.mix(v.into());
    }
    #[inline]
    fn write_u16(&mut self, v: u16) {
        self.mix(v.into());
    }
    #[inline]
    fn write_u32(&mut self, v: u32) {
        self.mix(v.into());
    }
    #[inline]
    fn write_u64(&mut self, v: u64) {
        self.mix(v);
    }
    #[inline]
    fn write_usize(&mut self, v: usize) {
        self.mix(v as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        // The product's high bits are the well-mixed ones; the table indexes with low bits.
        self.0.rotate_left(26)
    }
}

/// A map of the fast path.
pub(crate) type FastMap<K, V> = HashMap<K, V, FastHash>;

/// A channel binding as the fast path knows it.
struct Channel {
    peer: SocketAddr,
    until: Instant,
}

/// What the ChannelData fast path knows about one allocation, learned from the requests and
/// success responses the guard sees (see `listener.rs`). The turn crate keeps its own copy
/// (behind async mutexes) for everything else; this one only ever lags it conservatively: each
/// lifetime counts from when the request arrived, before the turn crate acted on it.
#[derive(Default)]
struct FastState {
    /// The client's transport address, once its Allocate succeeded; `None` after the
    /// allocation ended.
    client: Option<SocketAddr>,
    /// End of the allocation's lifetime.
    alloc_until: Option<Instant>,
    channels: FastMap<u16, Channel>,
    /// Reverse index of `channels`.
    by_peer: FastMap<SocketAddr, u16>,
    /// Permissions by peer IP (RFC 8656 §9: the port does not matter).
    perms: FastMap<IpAddr, Instant>,
}

impl FastState {
    fn prune(&mut self, now: Instant) {
        self.channels.retain(|_, c| c.until > now);
        let channels = &self.channels;
        self.by_peer
            .retain(|_, n| channels.get(n).is_some_and(|c| c.until > now));
        self.perms.retain(|_, until| *until > now);
    }

    fn live(&self, now: Instant) -> bool {
        self.alloc_until.is_some_and(|t| t > now)
    }
}

/// Where a datagram goes, according to the fast path.
pub(crate) enum Route<T> {
    /// Relay it ourselves.
    Relay(T),
    /// A channel is bound but the permission for the peer has expired: RFC 8656 §9 says
    /// discard (the turn crate would still relay it).
    NoPermission,
    /// Not ours to decide: hand it to the turn crate.
    Pass,
}

/// ChannelData frames of one received batch waiting to go to the client: (slot, payload length).
struct Outgoing {
    client: Option<SocketAddr>,
    frames: [(usize, usize); RELAY_BATCH],
    len: usize,
}

/// The relay socket of one allocation.
pub(crate) struct RelayConn {
    socket: ClosableUdp,
    local: SocketAddr,
    shared: Arc<Shared>,
    /// The listening socket, for ChannelData to the client.
    listener: Arc<ClosableUdp>,
    fast: RwLock<FastState>,
    /// Received datagrams not yet handled (kept between calls), each with room for the
    /// ChannelData header in front.
    batch: BatchSlot,
}

impl RelayConn {
    /// Closes the socket; pending and later receives fail (which ends the allocation's
    /// packet handler in the turn crate).
    pub(crate) fn shut(&self) {
        self.detach();
        self.socket.shut();
    }

    pub(crate) fn local(&self) -> SocketAddr {
        self.local
    }

    fn state(&self) -> std::sync::RwLockReadGuard<'_, FastState> {
        self.fast.read().unwrap_or_else(|e| e.into_inner())
    }

    fn state_mut(&self) -> std::sync::RwLockWriteGuard<'_, FastState> {
        self.fast.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The allocation of `client` was granted at `at` for `lifetime`.
    pub(crate) fn attach(&self, client: SocketAddr, at: Instant, lifetime: Duration) {
        let mut st = self.state_mut();
        *st = FastState::default();
        st.client = Some(client);
        st.alloc_until = Some(at + lifetime);
    }

    /// Live (permissions, channel bindings) of this allocation at `now` (none once it has
    /// expired).
    pub(crate) fn live_counts(&self, now: Instant) -> (usize, usize) {
        let st = self.state();
        if !st.live(now) {
            return (0, 0);
        }
        let perms = st.perms.values().filter(|t| **t > now).count();
        let channels = st.channels.values().filter(|c| c.until > now).count();
        (perms, channels)
    }

    /// The allocation ended: the fast path forgets it.
    pub(crate) fn detach(&self) {
        *self.state_mut() = FastState::default();
    }

    /// A Refresh received at `at` succeeded with `lifetime` (not 0).
    pub(crate) fn refresh(&self, at: Instant, lifetime: Duration) {
        let mut st = self.state_mut();
        if st.client.is_some() {
            st.alloc_until = Some(at + lifetime);
            st.prune(Instant::now());
        }
    }

    /// A CreatePermission received at `at` succeeded for `peers`.
    pub(crate) fn permit(&self, peers: &[SocketAddr], at: Instant) {
        let mut st = self.state_mut();
        if st.client.is_none() {
            return;
        }
        st.prune(Instant::now());
        for p in peers {
            st.perms.insert(p.ip(), at + PERMISSION_LIFETIME);
        }
    }

    /// A ChannelBind received at `at` succeeded: `number` is bound to `peer` for `lifetime`,
    /// and the permission for the peer's IP is installed or refreshed (RFC 8656 §12.2).
    pub(crate) fn bind_channel(
        &self,
        number: u16,
        peer: SocketAddr,
        at: Instant,
        lifetime: Duration,
    ) {
        let mut st = self.state_mut();
        if st.client.is_none() {
            return;
        }
        st.prune(Instant::now());
        if let Some(old) = st.channels.insert(
            number,
            Channel {
                peer,
                until: at + lifetime,
            },
        ) {
            if old.peer != peer {
                st.by_peer.remove(&old.peer);
            }
        }
        if let Some(other) = st.by_peer.insert(peer, number) {
            if other != number {
                st.channels.remove(&other);
            }
        }
        st.perms.insert(peer.ip(), at + PERMISSION_LIFETIME);
    }

    /// Client → peer: the peer of channel `number`, if `client` owns this allocation and the
    /// allocation, the channel and the peer's permission are all live.
    pub(crate) fn route_to_peer(
        &self,
        client: SocketAddr,
        number: u16,
        now: Instant,
    ) -> Route<SocketAddr> {
        let st = self.state();
        if st.client != Some(client) || !st.live(now) {
            return Route::Pass;
        }
        let Some(c) = st.channels.get(&number).filter(|c| c.until > now) else {
            return Route::Pass;
        };
        if st.perms.get(&c.peer.ip()).is_some_and(|t| *t > now) {
            Route::Relay(c.peer)
        } else {
            Route::NoPermission
        }
    }

    /// Peer → client: the client and channel number for a datagram from `peer`.
    fn route_to_client(&self, peer: SocketAddr, now: Instant) -> Route<(SocketAddr, u16)> {
        let st = self.state();
        let Some(client) = st.client.filter(|_| st.live(now)) else {
            return Route::Pass;
        };
        let Some(&number) = st.by_peer.get(&peer) else {
            return Route::Pass;
        };
        if !st
            .channels
            .get(&number)
            .is_some_and(|c| c.until > now && c.peer == peer)
        {
            return Route::Pass;
        }
        if st.perms.get(&peer.ip()).is_some_and(|t| *t > now) {
            Route::Relay((client, number))
        } else {
            Route::NoPermission
        }
    }

    /// Fast path, client → peer: sends `payloads` from this relay socket to `peer`, in one
    /// system call if there is room (else the rest one by one, waiting for room). The peer
    /// passed the policy when the channel was bound; checked again here.
    pub(crate) async fn send_batch_to_peer(&self, payloads: &[&[u8]], peer: SocketAddr) {
        if self.shared.denied(peer.ip()) {
            self.shared.refuse_peer(payloads.len() as u64);
            return;
        }
        let sent = match self.socket.try_send_batch(payloads, peer) {
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => {
                tracing::debug!(target: LOG, relay = %self.local, %peer, "relaying ChannelData: {e}");
                return;
            }
        };
        for p in &payloads[..sent] {
            self.count_fast_to_peer(p.len());
        }
        for p in &payloads[sent..] {
            match self.socket.send_to(p, peer).await {
                Ok(n) => self.count_fast_to_peer(n),
                Err(e) => {
                    tracing::debug!(target: LOG, relay = %self.local, %peer,
                        "relaying ChannelData: {e}");
                }
            }
        }
    }

    fn count_fast_to_peer(&self, n: usize) {
        let c = &self.shared.counters.to_peer;
        c.packets.fetch_add(1, Ordering::Relaxed);
        c.bytes.fetch_add(n as u64, Ordering::Relaxed);
        c.fast.fetch_add(1, Ordering::Relaxed);
    }

    /// Receives until a datagram needs the turn crate (copied into `buf`); datagrams from
    /// peers with a live channel binding go straight to the client as ChannelData.
    async fn recv_loop(
        &self,
        socket: &UdpSocket,
        batch: &mut RecvBatch,
        buf: &mut [u8],
    ) -> (usize, SocketAddr) {
        let mut out = Outgoing {
            client: None,
            frames: [(0, 0); RELAY_BATCH],
            len: 0,
        };
        loop {
            while let Some((i, n, src, truncated)) = batch.pop() {
                if truncated {
                    tracing::debug!(target: LOG, relay = %self.local, peer = %src,
                        "dropped a datagram over {MAX_DATAGRAM} bytes");
                    continue;
                }
                if self.shared.denied(src.ip()) {
                    self.shared.refuse_peer(1);
                    tracing::debug!(target: LOG, relay = %self.local, peer = %src,
                        "dropped {n} bytes from a denied peer");
                    continue;
                }
                let (client, number) = match self.route_to_client(src, Instant::now()) {
                    Route::Pass => {
                        // What went before leaves first.
                        self.flush(batch, &mut out).await;
                        let m = n.min(buf.len());
                        buf[..m].copy_from_slice(&batch.data(i, n)[..m]);
                        return (m, src);
                    }
                    Route::NoPermission => {
                        tracing::debug!(target: LOG, relay = %self.local, peer = %src,
                            "dropped {n} bytes: the permission for the peer has expired");
                        continue;
                    }
                    Route::Relay(r) => r,
                };
                // RFC 8656 §12.5: over UDP the padding to a multiple of four is optional; none.
                let frame = batch.frame_mut(i, n);
                frame[..2].copy_from_slice(&number.to_be_bytes());
                frame[2..4].copy_from_slice(&(n as u16).to_be_bytes());
                if out.client != Some(client) {
                    self.flush(batch, &mut out).await;
                    out.client = Some(client);
                }
                out.frames[out.len] = (i, n);
                out.len += 1;
            }
            self.flush(batch, &mut out).await;
            self.socket.refill(socket, batch).await;
        }
    }

    /// Sends the ChannelData frames collected in `out` to their client, all in one system call
    /// if there is room (else the rest one by one, waiting for room).
    async fn flush(&self, batch: &RecvBatch, out: &mut Outgoing) {
        let Some(client) = out.client else {
            return;
        };
        let mut slices: [&[u8]; RELAY_BATCH] = [&[]; RELAY_BATCH];
        let mut bytes = 0;
        for (slice, &(i, n)) in slices.iter_mut().zip(&out.frames[..out.len]) {
            *slice = batch.frame(i, n);
            bytes += n;
        }
        let frames = &slices[..out.len];
        out.len = 0;
        let mut sent = match self.listener.try_send_batch(frames, client) {
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => {
                tracing::debug!(target: LOG, relay = %self.local, %client,
                    "relaying ChannelData to the client: {e}");
                return;
            }
        };
        let mut failed_bytes = 0;
        for f in &frames[sent..] {
            match self.listener.send_to(f, client).await {
                Ok(_) => sent += 1,
                Err(e) => {
                    failed_bytes += f.len() - CHANNEL_HEADER;
                    tracing::debug!(target: LOG, relay = %self.local, %client,
                        "relaying ChannelData to the client: {e}");
                }
            }
        }
        let c = &self.shared.counters.to_client;
        c.packets.fetch_add(sent as u64, Ordering::Relaxed);
        c.bytes
            .fetch_add((bytes - failed_bytes) as u64, Ordering::Relaxed);
        c.fast.fetch_add(sent as u64, Ordering::Relaxed);
    }
}

#[async_trait]
impl Conn for RelayConn {
    async fn connect(&self, _addr: SocketAddr) -> webrtc_util::Result<()> {
        Err(webrtc_util::Error::Other(
            "relay sockets are not connected".into(),
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
            "relay sockets are not connected".into(),
        ))
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        if self.shared.denied(target.ip()) {
            self.shared.refuse_peer(1);
            tracing::debug!(target: LOG, relay = %self.local, peer = %target,
                "dropped {} bytes to a denied peer", buf.len());
            // Pretend success: the turn crate would only log an error.
            return Ok(buf.len());
        }
        let n = self.socket.send_to(buf, target).await?;
        let c = &self.shared.counters.to_peer;
        c.packets.fetch_add(1, Ordering::Relaxed);
        c.bytes.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.local)
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        None
    }

    async fn close(&self) -> webrtc_util::Result<()> {
        self.shut();
        Ok(())
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

/// Binds relay sockets on `relay_ip` within `[min_port, max_port]`.
pub(crate) struct RelayGenerator {
    pub(crate) shared: Arc<Shared>,
    pub(crate) relay_ip: IpAddr,
    pub(crate) public_ip: Option<IpAddr>,
    pub(crate) min_port: u16,
    pub(crate) max_port: u16,
    pub(crate) buffer_bytes: usize,
    /// The listening socket (relay sockets send ChannelData to clients through it).
    pub(crate) listener: Arc<ClosableUdp>,
}

impl RelayGenerator {
    fn bind(&self, port: u16) -> std::io::Result<Arc<RelayConn>> {
        let bound = bind_udp(SocketAddr::new(self.relay_ip, port), self.buffer_bytes)?;
        let local = bound.socket.local_addr()?;
        if !self.shared.relay_buf_logged.swap(true, Ordering::Relaxed) {
            tracing::info!(target: LOG, requested = self.buffer_bytes, rcvbuf = bound.rcvbuf,
                sndbuf = bound.sndbuf, "relay socket buffers granted");
        } else {
            tracing::debug!(target: LOG, %local, rcvbuf = bound.rcvbuf, sndbuf = bound.sndbuf,
                "relay socket bound");
        }
        let conn = Arc::new(RelayConn {
            socket: ClosableUdp::new(bound.socket, format!("relay {local}")),
            local,
            shared: Arc::clone(&self.shared),
            listener: Arc::clone(&self.listener),
            fast: RwLock::new(FastState::default()),
            batch: BatchSlot::new(RELAY_BATCH, MAX_DATAGRAM, CHANNEL_HEADER),
        });
        self.shared.register_relay(&conn);
        Ok(conn)
    }

    fn bind_in_range(&self) -> Result<Arc<RelayConn>, turn::Error> {
        let span = u32::from(self.max_port) - u32::from(self.min_port) + 1;
        let try_port = |port: u16| -> Result<Option<Arc<RelayConn>>, turn::Error> {
            match self.bind(port) {
                Ok(c) => Ok(Some(c)),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Ok(None),
                Err(e) => Err(turn::Error::Other(format!(
                    "binding relay socket on {}:{port}: {e}",
                    self.relay_ip
                ))),
            }
        };
        for _ in 0..RANDOM_TRIES.min(span as usize) {
            let port = self.min_port as u32 + rand::random_range(0..span);
            if let Some(c) = try_port(port as u16)? {
                return Ok(c);
            }
        }
        // Random tries failed: the range is crowded. Sweep it once from a random start.
        let start = rand::random_range(0..span);
        for i in 0..span {
            let port = self.min_port as u32 + (start + i) % span;
            if let Some(c) = try_port(port as u16)? {
                return Ok(c);
            }
        }
        Err(turn::Error::ErrMaxRetriesExceeded)
    }
}

#[async_trait]
impl RelayAddressGenerator for RelayGenerator {
    fn validate(&self) -> Result<(), turn::Error> {
        if self.min_port == 0 || self.max_port < self.min_port {
            return Err(turn::Error::ErrMaxPortLessThanMinPort);
        }
        Ok(())
    }

    async fn allocate_conn(
        &self,
        use_ipv4: bool,
        requested_port: u16,
    ) -> Result<(Arc<dyn Conn + Send + Sync>, SocketAddr), turn::Error> {
        if use_ipv4 != self.relay_ip.is_ipv4() {
            return Err(turn::Error::Other(format!(
                "relay address family not available (relay ip {})",
                self.relay_ip
            )));
        }
        let conn = if requested_port != 0 {
            self.bind(requested_port).map_err(|e| {
                turn::Error::Other(format!("binding relay port {requested_port}: {e}"))
            })?
        } else {
            self.bind_in_range()?
        };
        let relay_addr =
            SocketAddr::new(self.public_ip.unwrap_or(conn.local.ip()), conn.local.port());
        Ok((conn, relay_addr))
    }
}
