//! Relay sockets: a [`RelayAddressGenerator`] binding ports in the configured range, and the
//! relay [`Conn`] that counts relayed traffic and drops anything to or from a denied peer (the
//! second line of defence behind the listener guard).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_trait::async_trait;

use turn::relay::RelayAddressGenerator;
use webrtc_util::Conn;

use super::socket::{bind_udp, ClosableUdp};
use super::{Shared, LOG};

/// Random ports tried before sweeping the whole range.
const RANDOM_TRIES: usize = 32;

/// The relay socket of one allocation.
pub(crate) struct RelayConn {
    socket: ClosableUdp,
    local: SocketAddr,
    shared: Arc<Shared>,
}

impl RelayConn {
    /// Closes the socket; pending and later receives fail (which ends the allocation's
    /// packet handler in the turn crate).
    pub(crate) fn shut(&self) {
        self.socket.shut();
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
        loop {
            let (n, src) = self.socket.recv_from(buf).await?;
            if !self.shared.denied(src.ip()) {
                return Ok((n, src));
            }
            self.shared
                .counters
                .refused_peer
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(target: LOG, relay = %self.local, peer = %src,
                "dropped {n} bytes from a denied peer");
        }
    }

    async fn send(&self, _buf: &[u8]) -> webrtc_util::Result<usize> {
        Err(webrtc_util::Error::Other(
            "relay sockets are not connected".into(),
        ))
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        if self.shared.denied(target.ip()) {
            self.shared
                .counters
                .refused_peer
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(target: LOG, relay = %self.local, peer = %target,
                "dropped {} bytes to a denied peer", buf.len());
            // Pretend success: the turn crate would only log an error.
            return Ok(buf.len());
        }
        let n = self.socket.get()?.send_to(buf, target).await?;
        let c = &self.shared.counters;
        c.to_peer_packets.fetch_add(1, Ordering::Relaxed);
        c.to_peer_bytes.fetch_add(n as u64, Ordering::Relaxed);
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
