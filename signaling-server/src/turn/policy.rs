//! Peer-address policy: which addresses a TURN client may relay to.

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

/// IPv6 ranges a client may not reach (IPv4-mapped addresses are judged by their IPv4 part).
const DENIED_V6: &[(Ipv6Addr, u8)] = &[
    (Ipv6Addr::UNSPECIFIED, 128),                     // ::/128
    (Ipv6Addr::LOCALHOST, 128),                       // ::1/128
    (Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7),  // unique local
    (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10), // link-local
    (Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8),  // multicast
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

/// The default peer policy: `true` if `ip` lies in a denied range (loopback, private, link-local,
/// CGNAT, multicast, reserved, unspecified, their IPv6 counterparts, and IPv4-mapped IPv6
/// addresses whose IPv4 part is denied) and in none of the `allow` CIDRs.
///
/// `allow` is matched against the address as given and, for IPv4-mapped IPv6 addresses, also
/// against the embedded IPv4 address.
pub fn is_denied_peer(ip: IpAddr, allow: &[IpNet]) -> bool {
    let canonical = match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        IpAddr::V4(_) => ip,
    };
    if allow
        .iter()
        .any(|net| net.contains(&ip) || net.contains(&canonical))
    {
        return false;
    }
    match canonical {
        IpAddr::V4(v4) => DENIED_V4.iter().any(|&(net, len)| v4_in(v4, net, len)),
        IpAddr::V6(v6) => DENIED_V6.iter().any(|&(net, len)| v6_in(v6, net, len)),
    }
}
