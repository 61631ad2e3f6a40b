//! Property tests: the decoders the guard runs on untrusted datagrams (and the `stun` / `turn`
//! decoders of what it passes on) must not panic, whatever the bytes.
//!
//! Two kinds of input: arbitrary bytes (some behind a valid STUN header), and STUN messages
//! built from random attributes (mostly of the types the guard and the turn crate read, with
//! random or almost-valid values) that are then optionally signed with valid long-term
//! credentials — so they get past authentication into the Allocate / CreatePermission /
//! ChannelBind / Refresh handling — and optionally mutated (truncated, a byte flipped, the
//! length field rewritten, junk appended).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, OnceLock};

use proptest::prelude::*;
use ring::hmac;
use stun::attributes::*;
use stun::error_code::ErrorCodeAttribute;
use stun::fingerprint::FINGERPRINT;
use stun::integrity::MessageIntegrity;
use stun::message::{Getter, Message};
use stun::textattrs::TextAttribute;
use stun::xoraddr::XorMappedAddress;
use turn::proto::chandata::ChannelData;
use turn::proto::channum::ChannelNumber;
use turn::proto::data::Data;
use turn::proto::evenport::EvenPort;
use turn::proto::lifetime::Lifetime;
use turn::proto::peeraddr::PeerAddress;
use turn::proto::relayaddr::RelayedAddress;
use turn::proto::reqfamily::RequestedAddressFamily;
use turn::proto::reqtrans::RequestedTransport;
use turn::proto::rsrvtoken::ReservationToken;

use super::auth::{self, now_unix, parse_rest_username, rest_password};
use super::listener::{self, Groups, GuardedListener};
use super::wire::{self, HEADER, MAGIC_COOKIE};
use super::{is_denied_peer, quota_ip, IpKeys, Live, Shared, TurnConfig};

const REALM: &str = "fuzz-realm";
const SECRET: &str = "fuzz-secret";
/// Holds a live allocation (so CreatePermission / ChannelBind / Refresh get past the 437 check).
const LIVE_SRC: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)), 40001);
/// Holds none (so Allocate gets past the 437 check).
const FRESH_SRC: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), 40002);

struct Harness {
    listener: GuardedListener,
    shared: Arc<Shared>,
    username: String,
    key: Vec<u8>,
    /// Keeps the listening socket's reactor alive. Nothing is ever sent: `inspect` only
    /// returns verdicts.
    _rt: tokio::runtime::Runtime,
}

/// The guard shared by the property tests.
fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(new_harness)
}

/// A guard of its own (for a test that counts what the guard did).
fn new_harness() -> Harness {
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let socket = rt
            .block_on(tokio::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)))
            .unwrap();
        let local = socket.local_addr().unwrap();
        let config = TurnConfig {
            listen: local,
            realm: REALM.into(),
            secret: SECRET.into(),
            // No quota refusals: the tests share this guard and run in parallel.
            total_quota: usize::MAX,
            user_quota: usize::MAX,
            ip_quota: usize::MAX,
            ..TurnConfig::default()
        };
        let shared = Arc::new(Shared::new(&config, local.ip()));
        let username = format!("{}:fuzz@203.0.113.5", now_unix() + 3600);
        let user = parse_rest_username(&username).unwrap().1.to_owned();
        let keys = IpKeys::new(LIVE_SRC.ip(), &user);
        {
            let mut book = shared.lock_book();
            book.count(&user, keys);
            book.live.insert(
                LIVE_SRC,
                Live {
                    user,
                    username: username.clone(),
                    relay: SocketAddr::new(local.ip(), 1),
                    keys,
                },
            );
        }
        let password = rest_password(SECRET, &username);
        let key = turn::auth::generate_auth_key(&username, REALM, &password);
        let listener = {
            let _guard = rt.enter();
            GuardedListener::new(socket, local, Arc::clone(&shared))
        };
        Harness {
            listener,
            shared,
            username,
            key,
            _rt: rt,
        }
    }
}

/// Attribute types worth hitting often: what the guard and the turn crate read.
const TYPES: &[AttrType] = &[
    ATTR_XOR_PEER_ADDRESS,
    ATTR_XOR_PEER_ADDRESS,
    ATTR_XOR_PEER_ADDRESS,
    ATTR_REQUESTED_ADDRESS_FAMILY,
    ATTR_LIFETIME,
    ATTR_CHANNEL_NUMBER,
    ATTR_REQUESTED_TRANSPORT,
    ATTR_DATA,
    ATTR_XOR_RELAYED_ADDRESS,
    ATTR_XORMAPPED_ADDRESS,
    ATTR_EVEN_PORT,
    ATTR_RESERVATION_TOKEN,
    ATTR_DONT_FRAGMENT,
    ATTR_CHANGE_REQUEST,
    ATTR_ERROR_CODE,
    ATTR_USERNAME,
    ATTR_REALM,
    ATTR_NONCE,
    ATTR_MESSAGE_INTEGRITY,
    ATTR_FINGERPRINT,
];

const METHODS: &[u16] = &[0x001, 0x003, 0x004, 0x006, 0x007, 0x008, 0x009];

fn attr_type() -> impl Strategy<Value = u16> {
    prop_oneof![
        4 => prop::sample::select(TYPES).prop_map(|t| t.0),
        1 => any::<u16>(),
    ]
}

/// An attribute value: random bytes, or an XOR address whose family byte and length may or
/// may not match.
fn attr_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..40),
        (
            any::<u8>(),
            prop::sample::select(&[0u8, 1, 2, 3, 0xff][..]),
            prop::sample::select(&[0usize, 1, 3, 4, 5, 6, 7, 8, 9, 12, 19, 20, 21, 24][..]),
            any::<[u8; 24]>()
        )
            .prop_map(|(reserved, family, len, bytes)| {
                let mut v = bytes[..len].to_vec();
                if len > 0 {
                    v[0] = if reserved % 4 == 0 { reserved } else { 0 };
                }
                if len > 1 {
                    v[1] = family;
                }
                v
            }),
        (0u8..4).prop_map(|f| vec![f, 0, 0, 0]),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    None,
    Truncate(usize),
    Flip(usize, u8),
    Length(u16),
    Append(Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => Just(Mutation::None),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        1 => (any::<usize>(), 1u8..).prop_map(|(i, x)| Mutation::Flip(i, x)),
        1 => any::<u16>().prop_map(Mutation::Length),
        1 => prop::collection::vec(any::<u8>(), 1..8).prop_map(Mutation::Append),
    ]
}

#[derive(Debug, Clone)]
struct Spec {
    method: u16,
    class: u8,
    txid: [u8; 12],
    attrs: Vec<(u16, Vec<u8>)>,
    /// Leave out the padding of the last attribute.
    unpadded_tail: bool,
    sign: bool,
    fingerprint: bool,
    fresh_src: bool,
    mutation: Mutation,
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        prop_oneof![4 => prop::sample::select(METHODS), 1 => 0u16..0x1000],
        prop_oneof![3 => Just(0u8), 1 => 0u8..4],
        any::<[u8; 12]>(),
        prop::collection::vec((attr_type(), attr_value()), 0..8),
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.7),
        any::<bool>(),
        any::<bool>(),
        mutation(),
    )
        .prop_map(
            |(
                method,
                class,
                txid,
                attrs,
                unpadded_tail,
                sign,
                fingerprint,
                fresh_src,
                mutation,
            )| {
                Spec {
                    method,
                    class,
                    txid,
                    attrs,
                    unpadded_tail,
                    sign,
                    fingerprint,
                    fresh_src,
                    mutation,
                }
            },
        )
}

/// The STUN message type of `method` (12 bits) and `class` (2 bits), RFC 8489 §5.
fn msg_type(method: u16, class: u8) -> u16 {
    let m = method & 0x0fff;
    let c = u16::from(class & 3);
    (m & 0x000f) | ((m & 0x0070) << 1) | ((m & 0x0f80) << 2) | ((c & 1) << 4) | ((c >> 1) << 8)
}

fn push_attr(raw: &mut Vec<u8>, typ: u16, value: &[u8], pad: bool) {
    raw.extend_from_slice(&typ.to_be_bytes());
    raw.extend_from_slice(&(value.len() as u16).to_be_bytes());
    raw.extend_from_slice(value);
    if pad {
        raw.resize(raw.len() + (4 - value.len() % 4) % 4, 0);
    }
}

/// Sets the header's length field as if `extra` more bytes followed.
fn set_len(raw: &mut [u8], extra: usize) {
    let len = (raw.len() + extra - HEADER) as u16;
    raw[2..4].copy_from_slice(&len.to_be_bytes());
}

/// The raw message `s` describes.
fn build(s: &Spec, h: &Harness) -> Vec<u8> {
    let typ = msg_type(s.method, s.class);
    let mut raw = Vec::with_capacity(256);
    raw.extend_from_slice(&typ.to_be_bytes());
    raw.extend_from_slice(&[0, 0]);
    raw.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
    raw.extend_from_slice(&s.txid);
    let n = s.attrs.len();
    for (i, (t, v)) in s.attrs.iter().enumerate() {
        let last = i + 1 == n && !s.sign && !s.fingerprint;
        push_attr(&mut raw, *t, v, !(last && s.unpadded_tail));
    }
    if s.sign {
        for (t, v) in [
            (ATTR_USERNAME, h.username.as_str()),
            (ATTR_REALM, REALM),
            (ATTR_NONCE, "fuzz-nonce"),
        ] {
            push_attr(&mut raw, t.0, v.as_bytes(), true);
        }
        // RFC 8489 §14.5: HMAC over everything before MESSAGE-INTEGRITY, with the header
        // length covering it.
        set_len(&mut raw, 24);
        let k = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &h.key);
        let tag = hmac::sign(&k, &raw);
        push_attr(&mut raw, ATTR_MESSAGE_INTEGRITY.0, tag.as_ref(), true);
    }
    if s.fingerprint {
        set_len(&mut raw, 8);
        let v = stun::fingerprint::fingerprint_value(&raw);
        push_attr(&mut raw, ATTR_FINGERPRINT.0, &v.to_be_bytes(), true);
    }
    set_len(&mut raw, 0);
    match &s.mutation {
        Mutation::None => {}
        Mutation::Truncate(at) => raw.truncate(at % (raw.len() + 1)),
        Mutation::Flip(i, x) => {
            let i = i % raw.len();
            raw[i] ^= x;
        }
        Mutation::Length(l) => raw[2..4].copy_from_slice(&l.to_be_bytes()),
        Mutation::Append(junk) => raw.extend_from_slice(junk),
    }
    raw
}

/// Runs every decoder on `raw`; the property is that none of them panics.
fn decode_everything(raw: &[u8], src: SocketAddr) {
    let h = harness();

    // Our own wire helpers.
    let list = wire::attrs(raw);
    for &(_, off, len) in &list {
        assert!(off + len <= raw.len());
    }
    let _ = wire::peer_addresses(raw);
    let _ = wire::requested_family(raw);
    let _ = wire::find(raw, ATTR_LIFETIME);
    let _ = listener::lifetime_in(raw);
    if wire::is_classic_binding_request(raw) {
        let _ = wire::classic_binding_response(raw, src);
        let _ = wire::classic_binding_response(raw, "[2001:db8::1]:9".parse().unwrap());
        let _ = wire::classic_binding_response(raw, "[::ffff:1.2.3.4]:9".parse().unwrap());
    }
    let mut copy = raw.to_vec();
    let _ = wire::rewrite_lifetime(&mut copy, &h.key, 1200);
    for txid_len in [0, 11, 12] {
        let txid = &raw[raw.len().min(8)..raw.len().min(8 + txid_len)];
        let _ = wire::xor_addr(raw, txid);
    }

    // The `stun` decoder, and the getters the guard and the turn crate call on what decodes.
    let mut m = Message::new();
    m.raw = raw.to_vec();
    if m.decode().is_ok() {
        for t in [ATTR_USERNAME, ATTR_REALM, ATTR_NONCE] {
            if let Ok(text) = TextAttribute::get_from_as(&m, t) {
                let _ = parse_rest_username(&text.text);
                let _ = auth::user_ip(&text.text);
            }
        }
        let _ = MessageIntegrity(h.key.clone()).check(&mut m.clone());
        let _ = FINGERPRINT.check(&m);
        let _ = PeerAddress::default().get_from(&m);
        let _ = RelayedAddress::default().get_from(&m);
        let _ = XorMappedAddress::default().get_from(&m);
        let _ = ChannelNumber::default().get_from(&m);
        let _ = Lifetime::default().get_from(&m);
        let _ = RequestedTransport::default().get_from(&m);
        let _ = RequestedAddressFamily::default().get_from(&m);
        let _ = EvenPort::default().get_from(&m);
        let _ = ReservationToken::default().get_from(&m);
        let _ = Data::default().get_from(&m);
        let _ = ErrorCodeAttribute::default().get_from(&m);
    }
    let mut c = ChannelData {
        raw: raw.to_vec(),
        ..Default::default()
    };
    if ChannelData::is_channel_data(raw) {
        let _ = c.decode();
    }

    // The guard itself: inbound inspection (may answer, never sends here), the ChannelData
    // fast-path check, and the outbound observer.
    let mut buf = raw.to_vec();
    let _ = h.listener.inspect(&mut buf, src);
    let _ = h.listener.channel_data(raw, 0, src, &mut Groups::default());
    h.listener.observe_outbound(raw, src);
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 2000,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_do_not_panic(raw in prop::collection::vec(any::<u8>(), 0..300)) {
        decode_everything(&raw, LIVE_SRC);
    }

    #[test]
    fn arbitrary_bodies_behind_a_stun_header_do_not_panic(
        method in prop::sample::select(METHODS),
        class in 0u8..4,
        declared in prop_oneof![Just(None), any::<u16>().prop_map(Some)],
        body in prop::collection::vec(any::<u8>(), 0..200),
        fresh in any::<bool>(),
    ) {
        let typ = msg_type(method, class);
        let mut raw = Vec::with_capacity(HEADER + body.len());
        raw.extend_from_slice(&typ.to_be_bytes());
        raw.extend_from_slice(&declared.unwrap_or(body.len() as u16).to_be_bytes());
        raw.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        raw.extend_from_slice(&[7; 12]);
        raw.extend_from_slice(&body);
        decode_everything(&raw, if fresh { FRESH_SRC } else { LIVE_SRC });
    }

    #[test]
    fn mutated_turn_messages_do_not_panic(s in spec()) {
        let h = harness();
        let raw = build(&s, h);
        decode_everything(&raw, if s.fresh_src { FRESH_SRC } else { LIVE_SRC });
    }

    #[test]
    fn address_helpers_do_not_panic(bits in any::<u128>(), v4 in any::<u32>(), user in ".{0,40}") {
        let v6 = IpAddr::V6(bits.into());
        let v4 = IpAddr::V4(v4.into());
        let allow = ["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
        for ip in [v6, v4] {
            let _ = is_denied_peer(ip, &[]);
            let _ = is_denied_peer(ip, &allow);
            let _ = quota_ip(ip);
        }
        let _ = auth::user_ip(&user);
        let _ = parse_rest_username(&user);
    }
}

fn reply_code(v: listener::Verdict) -> Option<u16> {
    let listener::Verdict::Reply(r) = v else {
        return None;
    };
    let mut m = Message::new();
    m.raw = r;
    m.decode().unwrap();
    let mut e = ErrorCodeAttribute::default();
    e.get_from(&m).ok().map(|_| e.code.0)
}

fn signed(method: u16, attrs: Vec<(AttrType, Vec<u8>)>) -> Spec {
    Spec {
        method,
        class: 0,
        txid: rand::random(),
        attrs: attrs.into_iter().map(|(t, v)| (t.0, v)).collect(),
        unpadded_tail: false,
        sign: true,
        fingerprint: true,
        fresh_src: false,
        mutation: Mutation::None,
    }
}

/// The harness really reaches the authenticated handlers: signed requests with malformed
/// attributes are answered by the guard (400, 440) and counted, not passed on.
#[test]
fn harness_reaches_authenticated_handlers() {
    // Not the shared guard: the property tests running in parallel would move its counters.
    let h = &new_harness();
    let malformed = || {
        h.shared
            .counters
            .refused_malformed
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let before = malformed();
    let udp = (ATTR_REQUESTED_TRANSPORT, vec![17, 0, 0, 0]);
    let cases = [
        // CreatePermission with a truncated XOR-PEER-ADDRESS (5 bytes, "127.0.0.0").
        (
            LIVE_SRC,
            signed(
                0x008,
                vec![(ATTR_XOR_PEER_ADDRESS, vec![0, 1, 0x21, 0x12, 0x5e])],
            ),
            Some(400),
        ),
        // ChannelBind without XOR-PEER-ADDRESS.
        (
            LIVE_SRC,
            signed(0x009, vec![(ATTR_CHANNEL_NUMBER, vec![0x40, 0, 0, 0])]),
            Some(400),
        ),
        // Allocate with a 3-byte REQUESTED-ADDRESS-FAMILY.
        (
            FRESH_SRC,
            signed(
                0x003,
                vec![udp.clone(), (ATTR_REQUESTED_ADDRESS_FAMILY, vec![1, 0, 0])],
            ),
            Some(400),
        ),
        // Allocate asking for IPv6 or an unknown family from an IPv4 relay.
        (
            FRESH_SRC,
            signed(
                0x003,
                vec![
                    udp.clone(),
                    (ATTR_REQUESTED_ADDRESS_FAMILY, vec![2, 0, 0, 0]),
                ],
            ),
            Some(440),
        ),
        (
            FRESH_SRC,
            signed(
                0x003,
                vec![
                    udp.clone(),
                    (ATTR_REQUESTED_ADDRESS_FAMILY, vec![9, 0, 0, 0]),
                ],
            ),
            Some(440),
        ),
        // A fine Allocate is passed on.
        (FRESH_SRC, signed(0x003, vec![udp]), None),
    ];
    for (src, spec, want) in cases {
        let mut raw = build(&spec, h);
        assert_eq!(
            reply_code(h.listener.inspect(&mut raw, src)),
            want,
            "{spec:?}"
        );
    }
    assert_eq!(malformed(), before + 3);
}
