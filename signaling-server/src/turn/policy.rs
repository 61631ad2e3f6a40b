//! Peer-address policy: which addresses a TURN client may relay to.
//!
//! IPv6 forms that carry an IPv4 address are judged by that IPv4 address, since that is where
//! a translator or tunnel on the relay's network would deliver the traffic:
//!
//! | form                                  | prefix            | IPv4 in bits |
//! |---------------------------------------|-------------------|--------------|
//! | IPv4-mapped (RFC 4291)                | `::ffff:0:0/96`   | 96..128      |
//! | IPv4-translated (RFC 2765)            | `::ffff:0:0:0/96` | 96..128      |
//! | IPv4-compatible (RFC 4291, deprecated)| `::/96`           | 96..128      |
//! | NAT64 well-known prefix (RFC 6052)    | `64:ff9b::/96`    | 96..128      |
//! | 6to4 (RFC 3056)                       | `2002::/16`       | 16..48       |
//!
//! (`::` and `::1` are the unspecified and loopback addresses, not IPv4-compatible ones; both
//! are denied as such.)
//!
//! Two embedding forms are denied outright instead, because the IPv4 address they lead to cannot
//! be read off the address reliably:
//!
//! * `64:ff9b:1::/48`, the local-use NAT64 prefix (RFC 8215): the operator picks the prefix
//!   length (/48 to /96), which decides where the IPv4 address sits (RFC 6052 §2.2), and the
//!   translator is by definition one of the relay's own network;
//! * `2001::/32`, Teredo (RFC 4380): the client's IPv4 address is obfuscated and NAT-dependent,
//!   the server's is a Teredo server's, and Teredo is obsolete (no WebRTC peer needs it).
//!
//! The allow list (`TurnConfig::allow_peers`) is matched against the address as given and
//! against the IPv4 address it embeds (forms of the table above), so `127.0.0.0/8` also
//! exempts `::ffff:127.0.0.1`, `64:ff9b::7f00:1` or `2002:7f00:1::1`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// IPv4 ranges a client may not reach through the relay unless allowed explicitly.
///
/// Documentation (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24) and benchmarking
/// (198.18.0.0/15) ranges are deliberately absent: test labs use them as "public" addresses.
const DENIED_V4: &[(Ipv4Addr, u8)] = &[
    (Ipv4Addr::new(0, 0, 0, 0), 8),      // "this network"
    (Ipv4Addr::new(127, 0, 0, 0), 8),    // loopback
    (Ipv4Addr::new(10, 0, 0, 0), 8),     // RFC 1918
    (Ipv4Addr::new(100, 64, 0, 0), 10),  // CGNAT (RFC 6598)
    (Ipv4Addr::new(169, 254, 0, 0), 16), // link-local, cloud metadata
    (Ipv4Addr::new(172, 16, 0, 0), 12),  // RFC 1918
    (Ipv4Addr::new(192, 168, 0, 0), 16), // RFC 1918
    (Ipv4Addr::new(224, 0, 0, 0), 4),    // multicast
    (Ipv4Addr::new(240, 0, 0, 0), 4),    // reserved, includes 255.255.255.255
];

/// IPv6 ranges a client may not reach (on top of the IPv4-embedding forms judged by their IPv4
/// part, see the module docs).
///
/// Documentation (2001:db8::/32) is deliberately absent, as for IPv4.
const DENIED_V6: &[(Ipv6Addr, u8)] = &[
    (Ipv6Addr::UNSPECIFIED, 128),                          // ::/128
    (Ipv6Addr::LOCALHOST, 128),                            // ::1/128
    (Ipv6Addr::new(0x0064, 0xff9b, 1, 0, 0, 0, 0, 0), 48), // local-use NAT64 (RFC 8215)
    (Ipv6Addr::new(0x0100, 0, 0, 0, 0, 0, 0, 0), 64),      // discard-only (RFC 6666)
    (Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0), 32),      // Teredo (RFC 4380)
    (Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7),       // unique local
    (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10),      // link-local
    (Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0), 10),      // site-local (deprecated)
    (Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8),       // multicast
];

fn v4_in(ip: Ipv4Addr, net: Ipv4Addr, len: u8) -> bool {
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    u32::from(ip) & mask == u32::from(net) & mask
}

fn v6_in(ip: Ipv6Addr, net: Ipv6Addr, len: u8) -> bool {
    let mask = if len == 0 {
        0
    } else {
        u128::MAX << (128 - len)
    };
    u128::from(ip) & mask == u128::from(net) & mask
}

/// The IPv4 address an IPv6 address embeds, for the forms of the module docs' table.
pub(crate) fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let bits = u128::from(ip);
    let low32 = Ipv4Addr::from(bits as u32);
    let s = ip.segments();
    match s {
        // ::ffff:a.b.c.d (mapped) and ::ffff:0:a.b.c.d (translated)
        [0, 0, 0, 0, 0, 0xffff, _, _] | [0, 0, 0, 0, 0xffff, 0, _, _] => Some(low32),
        // 64:ff9b::a.b.c.d (NAT64 well-known prefix)
        [0x0064, 0xff9b, 0, 0, 0, 0, _, _] => Some(low32),
        // ::a.b.c.d (IPv4-compatible), but not :: and ::1
        [0, 0, 0, 0, 0, 0, _, _] if bits > 1 => Some(low32),
        // 2002:aabb:ccdd::/48 (6to4)
        [0x2002, hi, lo, ..] => Some(Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo))),
        _ => None,
    }
}

fn v4_denied(v4: Ipv4Addr) -> bool {
    DENIED_V4.iter().any(|&(net, len)| v4_in(v4, net, len))
}

/// The default peer policy: `true` if `ip` lies in a denied range (loopback, private, link-local,
/// CGNAT, multicast, reserved, unspecified, their IPv6 counterparts, IPv6 forms embedding a
/// denied IPv4 address, local-use NAT64 and Teredo — see the module docs) and in none of the
/// `allow` CIDRs.
///
/// `allow` is matched against the address as given and, for IPv6 forms embedding an IPv4
/// address, also against that IPv4 address.
pub fn is_denied_peer(ip: IpAddr, allow: &[IpNet]) -> bool {
    let embedded = match ip {
        IpAddr::V6(v6) => embedded_v4(v6),
        IpAddr::V4(_) => None,
    };
    if allow
        .iter()
        .any(|net| net.contains(&ip) || embedded.is_some_and(|v4| net.contains(&IpAddr::V4(v4))))
    {
        return false;
    }
    match ip {
        IpAddr::V4(v4) => v4_denied(v4),
        IpAddr::V6(v6) => {
            embedded.is_some_and(v4_denied)
                || DENIED_V6.iter().any(|&(net, len)| v6_in(v6, net, len))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    #[test]
    fn embedded_forms() {
        let v4 = |s: &str| Some(s.parse::<Ipv4Addr>().unwrap());
        assert_eq!(embedded_v4(v6("::ffff:10.1.2.3")), v4("10.1.2.3"));
        assert_eq!(embedded_v4(v6("::ffff:0:10.1.2.3")), v4("10.1.2.3"));
        assert_eq!(embedded_v4(v6("::10.1.2.3")), v4("10.1.2.3"));
        assert_eq!(embedded_v4(v6("64:ff9b::10.1.2.3")), v4("10.1.2.3"));
        assert_eq!(embedded_v4(v6("2002:0a01:0203::1")), v4("10.1.2.3"));
        assert_eq!(embedded_v4(v6("::")), None);
        assert_eq!(embedded_v4(v6("::1")), None);
        assert_eq!(embedded_v4(v6("::2")), v4("0.0.0.2"));
        assert_eq!(embedded_v4(v6("64:ff9b:1::a01:203")), None);
        assert_eq!(embedded_v4(v6("2001:db8::1")), None);
    }
}
