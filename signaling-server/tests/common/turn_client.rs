//! A minimal raw STUN/TURN client for the tests: a real UDP socket, real STUN messages (the
//! `stun` crate codec), long-term credentials with the 401 challenge.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use stun::agent::TransactionId;
use stun::attributes::*;
use stun::error_code::ErrorCodeAttribute;
use stun::integrity::MessageIntegrity;
use stun::message::*;
use stun::textattrs::TextAttribute;
use tokio::net::UdpSocket;
use turn::proto::chandata::ChannelData;
use turn::proto::channum::ChannelNumber;
use turn::proto::data::Data;
use turn::proto::lifetime::Lifetime;
use turn::proto::peeraddr::PeerAddress;
use turn::proto::relayaddr::RelayedAddress;
use turn::proto::reqtrans::RequestedTransport;
use turn::proto::PROTO_UDP;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

pub struct RawClient {
    pub sock: UdpSocket,
    pub server: SocketAddr,
    pub username: String,
    pub password: String,
    pub realm: String,
    pub nonce: String,
}

pub type Attrs = Vec<Box<dyn Setter>>;

pub fn error_code(m: &Message) -> Option<u16> {
    let mut e = ErrorCodeAttribute::default();
    e.get_from(m).ok().map(|_| e.code.0)
}

impl RawClient {
    pub async fn new(server: SocketAddr, username: &str, password: &str) -> RawClient {
        RawClient::new_on(LOCALHOST, server, username, password).await
    }

    /// A client whose socket binds `ip` (a loopback address).
    pub async fn new_on(
        ip: IpAddr,
        server: SocketAddr,
        username: &str,
        password: &str,
    ) -> RawClient {
        assert!(ip.is_loopback());
        RawClient {
            sock: UdpSocket::bind((ip, 0)).await.unwrap(),
            server,
            username: username.into(),
            password: password.into(),
            realm: String::new(),
            nonce: String::new(),
        }
    }

    pub fn key(&self) -> MessageIntegrity {
        MessageIntegrity::new_long_term_integrity(
            self.username.clone(),
            self.realm.clone(),
            self.password.clone(),
        )
    }

    pub fn build(
        &self,
        method: Method,
        class: MessageClass,
        mut attrs: Attrs,
        auth: bool,
    ) -> Message {
        let mut setters: Attrs = vec![
            Box::new(TransactionId::new()),
            Box::new(MessageType::new(method, class)),
        ];
        setters.append(&mut attrs);
        if auth {
            setters.push(Box::new(TextAttribute::new(
                ATTR_USERNAME,
                self.username.clone(),
            )));
            setters.push(Box::new(TextAttribute::new(ATTR_REALM, self.realm.clone())));
            setters.push(Box::new(TextAttribute::new(ATTR_NONCE, self.nonce.clone())));
            setters.push(Box::new(self.key()));
        }
        setters.push(Box::new(stun::fingerprint::FINGERPRINT));
        let mut m = Message::new();
        m.build(&setters).unwrap();
        m
    }

    /// Sends `m` (retransmitting) and returns the response with the same transaction id.
    pub async fn transact(&self, m: &Message) -> Option<Message> {
        let mut buf = vec![0u8; 2048];
        // Generous for a loaded machine: up to 6 × 700 ms.
        for _ in 0..6 {
            self.sock.send_to(&m.raw, self.server).await.unwrap();
            let deadline = tokio::time::Instant::now() + Duration::from_millis(700);
            while let Ok(Ok((n, _))) =
                tokio::time::timeout_at(deadline, self.sock.recv_from(&mut buf)).await
            {
                let mut r = Message::new();
                r.raw = buf[..n].to_vec();
                if r.decode().is_ok() && r.transaction_id == m.transaction_id {
                    return Some(r);
                }
            }
        }
        None
    }

    /// An authenticated request (fetching realm and nonce first when needed).
    pub async fn request(&mut self, method: Method, attrs: impl Fn() -> Attrs) -> Option<Message> {
        if self.nonce.is_empty() {
            let r = self
                .transact(&self.build(method, CLASS_REQUEST, attrs(), false))
                .await?;
            assert_eq!(error_code(&r), Some(401), "challenge expected");
            self.realm = TextAttribute::get_from_as(&r, ATTR_REALM).unwrap().text;
            self.nonce = TextAttribute::get_from_as(&r, ATTR_NONCE).unwrap().text;
        }
        for _ in 0..2 {
            let r = self
                .transact(&self.build(method, CLASS_REQUEST, attrs(), true))
                .await?;
            if error_code(&r) == Some(438) {
                self.nonce = TextAttribute::get_from_as(&r, ATTR_NONCE).unwrap().text;
                continue;
            }
            return Some(r);
        }
        None
    }

    pub async fn allocate_with(&mut self, lifetime: Option<u32>) -> Message {
        self.request(METHOD_ALLOCATE, || {
            let mut a: Attrs = vec![Box::new(RequestedTransport {
                protocol: PROTO_UDP,
            })];
            if let Some(l) = lifetime {
                a.push(Box::new(Lifetime(Duration::from_secs(l as u64))));
            }
            a
        })
        .await
        .expect("no answer to Allocate")
    }

    pub async fn allocate(&mut self) -> Message {
        self.allocate_with(None).await
    }

    pub async fn refresh(&mut self, lifetime: u32) -> Message {
        self.request(METHOD_REFRESH, || {
            vec![Box::new(Lifetime(Duration::from_secs(lifetime as u64)))]
        })
        .await
        .expect("no answer to Refresh")
    }

    pub async fn create_permission(&mut self, peer: SocketAddr) -> Message {
        self.request(METHOD_CREATE_PERMISSION, || {
            vec![Box::new(PeerAddress {
                ip: peer.ip(),
                port: peer.port(),
            })]
        })
        .await
        .expect("no answer to CreatePermission")
    }

    pub async fn channel_bind(&mut self, number: u16, peer: SocketAddr) -> Message {
        self.request(METHOD_CHANNEL_BIND, || {
            vec![
                Box::new(ChannelNumber(number)),
                Box::new(PeerAddress {
                    ip: peer.ip(),
                    port: peer.port(),
                }),
            ]
        })
        .await
        .expect("no answer to ChannelBind")
    }

    pub async fn send_indication(&self, peer: SocketAddr, data: &[u8]) {
        let m = self.build(
            METHOD_SEND,
            CLASS_INDICATION,
            vec![
                Box::new(PeerAddress {
                    ip: peer.ip(),
                    port: peer.port(),
                }),
                Box::new(Data(data.to_vec())),
            ],
            false,
        );
        self.sock.send_to(&m.raw, self.server).await.unwrap();
    }

    pub async fn send_channel_data(&self, number: u16, data: &[u8]) {
        let mut c = ChannelData {
            data: data.to_vec(),
            number: ChannelNumber(number),
            raw: vec![],
        };
        c.encode();
        self.sock.send_to(&c.raw, self.server).await.unwrap();
    }

    /// The next datagram from the server within `limit`.
    pub async fn recv(&self, limit: Duration) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 2048];
        match tokio::time::timeout(limit, self.sock.recv_from(&mut buf)).await {
            Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
            _ => None,
        }
    }
}

pub fn assert_success(m: &Message, what: &str) {
    assert_eq!(
        m.typ.class,
        CLASS_SUCCESS_RESPONSE,
        "{what}: {m} (error {:?})",
        error_code(m)
    );
}

pub fn relayed_addr(m: &Message) -> SocketAddr {
    let mut r = RelayedAddress::default();
    r.get_from(m).expect("XOR-RELAYED-ADDRESS");
    SocketAddr::new(r.ip, r.port)
}
