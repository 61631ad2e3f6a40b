//! What every backend shares about SDP and ICE candidates, as plain strings.

use super::Candidates;
use crate::CandidateType;

/// A local candidate in the browser's `RTCIceCandidateInit` shape. Stacks may leave `sdpMid`
/// empty; browsers and aiortc drop candidates without a usable mid, so name the one media
/// section (the data channel's, mid "0", index 0) explicitly.
pub(super) fn candidate_json(
    candidate: String,
    sdp_mid: Option<String>,
    sdp_mline_index: Option<u16>,
    username_fragment: Option<String>,
) -> serde_json::Value {
    let mut v = serde_json::json!({
        "candidate": candidate,
        "sdpMid": sdp_mid.filter(|m| !m.is_empty()).unwrap_or_else(|| "0".into()),
        "sdpMLineIndex": sdp_mline_index.unwrap_or(0),
    });
    if let Some(ufrag) = username_fragment.filter(|u| !u.is_empty()) {
        v["usernameFragment"] = ufrag.into();
    }
    v
}

/// Whether an end with `candidates` must ignore a remote candidate (`parsed` by
/// [`parse_candidate`]): a relay-only pair exchanges relay addresses only; a peer that sends
/// another kind (or one that does not parse) breaks the pair's policy, and using it would reveal
/// our relay to that address.
pub(super) fn refused_remote(
    candidates: Candidates,
    parsed: Option<&((String, u16), CandidateType)>,
) -> bool {
    candidates == Candidates::RelayOnly && !parsed.is_some_and(|(_, t)| *t == CandidateType::Relay)
}

/// Address, port and type of an SDP candidate line
/// (`candidate:<foundation> <component> <proto> <priority> <addr> <port> typ <type> ...`).
pub(crate) fn parse_candidate(line: &str) -> Option<((String, u16), CandidateType)> {
    let mut it = line.split_whitespace().skip(4);
    let addr = it.next()?.to_string();
    let port = it.next()?.parse().ok()?;
    if it.next()? != "typ" {
        return None;
    }
    let typ = match it.next()? {
        "host" => CandidateType::Host,
        "srflx" => CandidateType::Srflx,
        "prflx" => CandidateType::Prflx,
        "relay" => CandidateType::Relay,
        _ => return None,
    };
    Some(((addr, port), typ))
}

/// A relay candidate (`candidate:…`, with or without `a=`) as it may leave a relay-only end: its
/// related address (`raddr`/`rport`, this end's own address as the TURN server saw it) becomes
/// `0.0.0.0`/`0`. `None` for a candidate of any other type, or one that does not parse.
pub(crate) fn relay_candidate(line: &str) -> Option<String> {
    if parse_candidate(line)?.1 != CandidateType::Relay {
        return None;
    }
    // `<foundation> <component> <proto> <priority> <addr> <port> typ relay`, then name/value
    // pairs.
    const PAIRS_AT: usize = 8;
    let words: Vec<&str> = line.split_whitespace().collect();
    let mut out: Vec<&str> = words.iter().take(PAIRS_AT).copied().collect();
    for pair in words[PAIRS_AT.min(words.len())..].chunks(2) {
        out.push(pair[0]);
        let value = match pair[0] {
            "raddr" => "0.0.0.0",
            "rport" => "0",
            _ => pair.get(1).copied().unwrap_or_default(),
        };
        if pair.len() == 2 {
            out.push(value);
        }
    }
    Some(out.join(" "))
}

/// The unspecified address of an SDP address type (`IP4` or `IP6`).
fn unspecified(addrtype: &str) -> &'static str {
    if addrtype == "IP6" {
        "::"
    } else {
        "0.0.0.0"
    }
}

/// `sdp` as it may be sent to (or taken from) a peer: for [`Candidates::RelayOnly`], without any
/// `a=candidate` line whose type is not `relay` (unparsable ones included), relay candidates
/// without their related address ([`relay_candidate`]), and the addresses of `c=` and `a=rtcp:`
/// lines unspecified (`0.0.0.0` or `::`). Every other line is kept as it is.
pub(crate) fn filter_sdp(sdp: &str, candidates: Candidates) -> String {
    if candidates == Candidates::All {
        return sdp.to_string();
    }
    let mut out = String::with_capacity(sdp.len());
    for line in sdp.split_inclusive('\n') {
        let body = line.trim_end_matches(['\r', '\n']);
        let end = &line[body.len()..];
        if let Some(c) = body.strip_prefix("a=candidate:") {
            if let Some(c) = relay_candidate(c) {
                out.push_str("a=candidate:");
                out.push_str(&c);
                out.push_str(end);
            }
            continue;
        }
        // `c=IN IP4 <addr>` and `a=rtcp:<port> IN IP4 <addr>`: the default candidate's address.
        let words: Vec<&str> = body.split_whitespace().collect();
        let address_at = match words.first() {
            Some(w) if w.starts_with("c=") => Some(2),
            Some(w) if w.starts_with("a=rtcp:") => Some(3),
            _ => None,
        };
        match address_at.filter(|&at| words.len() == at + 1) {
            Some(at) => {
                let mut words = words;
                words[at] = unspecified(words[at - 1]);
                out.push_str(&words.join(" "));
                out.push_str(end);
            }
            None => out.push_str(line),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_candidate_lines() {
        assert_eq!(
            parse_candidate("candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host"),
            Some((("127.0.0.1".to_string(), 5000), CandidateType::Host))
        );
        assert_eq!(
            parse_candidate(
                "candidate:2 1 udp 1694498815 203.0.113.5 6000 typ srflx raddr 0.0.0.0 rport 0"
            ),
            Some((("203.0.113.5".to_string(), 6000), CandidateType::Srflx))
        );
        assert_eq!(parse_candidate("garbage"), None);
    }

    #[test]
    fn relay_only_sdp_keeps_relay_candidates_only() {
        let sdp = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\n\
                   m=application 50000 UDP/DTLS/SCTP webrtc-datachannel\r\n\
                   c=IN IP4 203.0.113.5\r\na=rtcp:9 IN IP4 203.0.113.5\r\na=mid:0\r\n\
                   a=candidate:1 1 udp 2130706431 192.0.2.1 5000 typ host\r\n\
                   a=candidate:2 1 udp 1694498815 203.0.113.5 6000 typ srflx raddr 0.0.0.0 rport 0\r\n\
                   a=candidate:3 1 udp 16777215 198.51.100.7 7000 typ relay raddr 203.0.113.5 rport 6000 generation 0\r\n\
                   a=candidate:4 1 udp 1 198.51.100.8 7001 typ prflx\r\n\
                   a=candidate:garbage\r\n\
                   a=end-of-candidates\r\n";
        let relay = filter_sdp(sdp, Candidates::RelayOnly);
        assert_eq!(
            relay,
            "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\n\
             m=application 50000 UDP/DTLS/SCTP webrtc-datachannel\r\n\
             c=IN IP4 0.0.0.0\r\na=rtcp:9 IN IP4 0.0.0.0\r\na=mid:0\r\n\
             a=candidate:3 1 udp 16777215 198.51.100.7 7000 typ relay raddr 0.0.0.0 rport 0 generation 0\r\n\
             a=end-of-candidates\r\n"
        );
        assert_eq!(filter_sdp(sdp, Candidates::All), sdp);
        // Bare \n line ends, IPv6, a=rtcp without an address.
        assert_eq!(
            filter_sdp(
                "c=IN IP6 2001:db8::1\na=rtcp:9\na=candidate:1 1 udp 1 192.0.2.1 5 typ host\n",
                Candidates::RelayOnly
            ),
            "c=IN IP6 ::\na=rtcp:9\n"
        );
    }

    #[test]
    fn relay_candidates_lose_their_related_address() {
        assert_eq!(
            relay_candidate("candidate:3 1 udp 16777215 198.51.100.7 7000 typ relay raddr 203.0.113.5 rport 6000").as_deref(),
            Some("candidate:3 1 udp 16777215 198.51.100.7 7000 typ relay raddr 0.0.0.0 rport 0")
        );
        assert_eq!(
            relay_candidate("candidate:3 1 udp 16777215 198.51.100.7 7000 typ relay").as_deref(),
            Some("candidate:3 1 udp 16777215 198.51.100.7 7000 typ relay")
        );
        assert_eq!(
            relay_candidate("candidate:1 1 udp 2130706431 192.0.2.1 5000 typ host"),
            None
        );
        assert_eq!(relay_candidate("garbage"), None);
    }
}
