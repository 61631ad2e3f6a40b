//! Small pieces of STUN wire handling the guard needs beyond what `stun` offers: walking raw
//! attributes (with offsets), decoding every XOR-PEER-ADDRESS, patching LIFETIME in place and
//! re-signing, building our own error responses, and answering classic RFC 3489 Binding requests.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ring::hmac;
use stun::agent::TransactionId;
use stun::attributes::*;
use stun::error_code::{ErrorCode, ErrorCodeAttribute};
use stun::fingerprint::fingerprint_value;
use stun::integrity::MessageIntegrity;
use stun::message::{Message, MessageType, Method, Setter, CLASS_ERROR_RESPONSE};
use stun::textattrs::TextAttribute;

pub(crate) const HEADER: usize = 20;
pub(crate) const MAGIC_COOKIE: u32 = 0x2112_A442;

/// `(type, value offset, value length)` of each attribute of a STUN message in `raw`.
pub(crate) fn attrs(raw: &[u8]) -> Vec<(u16, usize, usize)> {
    let mut out = Vec::new();
    if raw.len() < HEADER {
        return out;
    }
    let end = (HEADER + u16::from_be_bytes([raw[2], raw[3]]) as usize).min(raw.len());
    let mut off = HEADER;
    while off + 4 <= end {
        let typ = u16::from_be_bytes([raw[off], raw[off + 1]]);
        let len = u16::from_be_bytes([raw[off + 2], raw[off + 3]]) as usize;
        if off + 4 + len > end {
            break;
        }
        out.push((typ, off + 4, len));
        off += 4 + ((len + 3) & !3);
    }
    out
}

/// Address family values of XOR-*-ADDRESS (RFC 8489 §14.1).
const FAMILY_IPV4: u16 = 0x0001;
const FAMILY_IPV6: u16 = 0x0002;

/// Decodes an XOR-*-ADDRESS value (RFC 8489 §14.2). Strict: the value must be exactly 8 bytes
/// for IPv4 and 20 for IPv6, and the family (read as 16 bits, like the `stun` crate does, so a
/// non-zero reserved byte makes an unknown family) must be one of those two. `txid` is the
/// 12-byte transaction id.
pub(crate) fn xor_addr(value: &[u8], txid: &[u8]) -> Option<SocketAddr> {
    if value.len() < 4 || txid.len() != 12 {
        return None;
    }
    let family = u16::from_be_bytes([value[0], value[1]]);
    let port = u16::from_be_bytes([value[2], value[3]]) ^ (MAGIC_COOKIE >> 16) as u16;
    let cookie = MAGIC_COOKIE.to_be_bytes();
    match (family, value.len()) {
        (FAMILY_IPV4, 8) => {
            let mut ip = [0u8; 4];
            for i in 0..4 {
                ip[i] = value[4 + i] ^ cookie[i];
            }
            Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port))
        }
        (FAMILY_IPV6, 20) => {
            let mut key = [0u8; 16];
            key[..4].copy_from_slice(&cookie);
            key[4..].copy_from_slice(txid);
            let mut ip = [0u8; 16];
            for i in 0..16 {
                ip[i] = value[4 + i] ^ key[i];
            }
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port))
        }
        _ => None,
    }
}

/// All XOR-PEER-ADDRESS attributes of a STUN message, in order (empty if there is none);
/// `None` if one of them is malformed (see [`xor_addr`]) or `raw` is shorter than a header.
pub(crate) fn peer_addresses(raw: &[u8]) -> Option<Vec<SocketAddr>> {
    let txid = raw.get(8..HEADER)?;
    attrs(raw)
        .into_iter()
        .filter(|&(t, _, _)| t == ATTR_XOR_PEER_ADDRESS.0)
        .map(|(_, off, len)| xor_addr(&raw[off..off + len], txid))
        .collect()
}

/// The REQUESTED-ADDRESS-FAMILY of an Allocate (RFC 8656 §18.10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestedFamily {
    /// No such attribute: the client wants IPv4 (RFC 8656 §7.2).
    Absent,
    V4,
    V6,
    /// A family value other than 0x01 and 0x02 (answered 440, as the turn crate does).
    Unknown(u8),
    /// A value that is not 4 bytes long (answered 400).
    Malformed,
}

/// The first REQUESTED-ADDRESS-FAMILY of a STUN message.
pub(crate) fn requested_family(raw: &[u8]) -> RequestedFamily {
    match find(raw, ATTR_REQUESTED_ADDRESS_FAMILY) {
        None => RequestedFamily::Absent,
        Some((off, 4)) => match raw[off] {
            0x01 => RequestedFamily::V4,
            0x02 => RequestedFamily::V6,
            other => RequestedFamily::Unknown(other),
        },
        Some(_) => RequestedFamily::Malformed,
    }
}

/// The first attribute of type `typ`: `(value offset, length)`.
pub(crate) fn find(raw: &[u8], typ: AttrType) -> Option<(usize, usize)> {
    attrs(raw)
        .into_iter()
        .find(|&(t, _, _)| t == typ.0)
        .map(|(_, off, len)| (off, len))
}

/// Rewrites the LIFETIME value of an authenticated request in place and recomputes its
/// MESSAGE-INTEGRITY (with `key`) and FINGERPRINT, so the turn crate accepts it unchanged.
/// Returns `false` (and leaves `raw` alone) if the layout is not the expected one.
pub(crate) fn rewrite_lifetime(raw: &mut [u8], key: &[u8], secs: u32) -> bool {
    let list = attrs(raw);
    let Some(&(_, l_off, l_len)) = list.iter().find(|a| a.0 == ATTR_LIFETIME.0) else {
        return false;
    };
    let Some(&(_, mi_off, mi_len)) = list.iter().find(|a| a.0 == ATTR_MESSAGE_INTEGRITY.0) else {
        return false;
    };
    if l_len != 4 || mi_len != 20 || l_off > mi_off {
        return false;
    }
    let fp = list
        .iter()
        .find(|a| a.0 == ATTR_FINGERPRINT.0 && a.1 > mi_off)
        .copied();
    let total_len = [raw[2], raw[3]];
    raw[l_off..l_off + 4].copy_from_slice(&secs.to_be_bytes());

    // MESSAGE-INTEGRITY covers the message up to the attribute, with the header length set as
    // if MESSAGE-INTEGRITY were the last attribute.
    let mi_attr_start = mi_off - 4;
    let len_for_mi = (mi_off + 20 - HEADER) as u16;
    raw[2..4].copy_from_slice(&len_for_mi.to_be_bytes());
    let k = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, key);
    let tag = hmac::sign(&k, &raw[..mi_attr_start]);
    raw[mi_off..mi_off + 20].copy_from_slice(tag.as_ref());
    raw[2..4].copy_from_slice(&total_len);

    if let Some((_, fp_off, 4)) = fp {
        // The header length already covers FINGERPRINT (it is the last attribute);
        // `fingerprint_value` applies the 0x5354554e XOR itself.
        let v = fingerprint_value(&raw[..fp_off - 4]);
        raw[fp_off..fp_off + 4].copy_from_slice(&v.to_be_bytes());
    }
    true
}

/// An error response to a request: ERROR-CODE plus `extra`, then MESSAGE-INTEGRITY if `key`.
pub(crate) fn error_response(
    txid: TransactionId,
    method: Method,
    code: ErrorCode,
    reason: &str,
    extra: Vec<Box<dyn Setter>>,
    key: Option<&[u8]>,
) -> Option<Vec<u8>> {
    let mut setters: Vec<Box<dyn Setter>> = vec![
        Box::new(Message {
            transaction_id: txid,
            ..Default::default()
        }),
        Box::new(MessageType::new(method, CLASS_ERROR_RESPONSE)),
        Box::new(ErrorCodeAttribute {
            code,
            reason: reason.as_bytes().to_vec(),
        }),
    ];
    setters.extend(extra);
    if let Some(key) = key {
        setters.push(Box::new(MessageIntegrity(key.to_vec())));
    }
    let mut m = Message::new();
    m.build(&setters).ok()?;
    Some(m.raw)
}

/// REALM and NONCE attributes for a 401 answer.
pub(crate) fn realm_nonce(realm: &str, nonce: &str) -> Vec<Box<dyn Setter>> {
    vec![
        Box::new(TextAttribute::new(ATTR_REALM, realm.to_owned())),
        Box::new(TextAttribute::new(ATTR_NONCE, nonce.to_owned())),
    ]
}

/// A classic RFC 3489 Binding request (no magic cookie): type 0x0001, whole message present.
pub(crate) fn is_classic_binding_request(raw: &[u8]) -> bool {
    raw.len() >= HEADER
        && raw[0] == 0
        && raw[1] == 1
        && u32::from_be_bytes([raw[4], raw[5], raw[6], raw[7]]) != MAGIC_COOKIE
        && HEADER + u16::from_be_bytes([raw[2], raw[3]]) as usize == raw.len()
}

/// Answer to a classic RFC 3489 Binding request: MAPPED-ADDRESS of `src`, or `None` if the
/// request asks for a changed address/port (we have only one address, so we stay silent as a
/// server that cannot honour CHANGE-REQUEST would be unreachable for that test).
pub(crate) fn classic_binding_response(raw: &[u8], src: SocketAddr) -> Option<Vec<u8>> {
    if let Some((off, 4)) = find(raw, ATTR_CHANGE_REQUEST) {
        if raw[off + 3] & 0x06 != 0 {
            return None;
        }
    }
    let mut value = vec![0u8, 0];
    match src.ip() {
        IpAddr::V4(v4) => {
            value[1] = 0x01;
            value.extend_from_slice(&src.port().to_be_bytes());
            value.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                value[1] = 0x01;
                value.extend_from_slice(&src.port().to_be_bytes());
                value.extend_from_slice(&v4.octets());
            } else {
                return None;
            }
        }
    }
    let mut out = Vec::with_capacity(HEADER + 4 + value.len());
    out.extend_from_slice(&[0x01, 0x01]);
    out.extend_from_slice(&((4 + value.len()) as u16).to_be_bytes());
    out.extend_from_slice(&raw[4..20]);
    out.extend_from_slice(&ATTR_MAPPED_ADDRESS.0.to_be_bytes());
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(&value);
    Some(out)
}
