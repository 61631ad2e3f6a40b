//! Reading a client's JSON frame without building a tree of it.
//!
//! [`peermesh::protocol::ClientMsg`] is an internally tagged enum: serde buffers the whole frame
//! into a generic tree before it looks at `type`, and some inputs cost over 100 bytes of memory
//! per input byte that way (`{"":{"":…}}`: about 8 MB for one 64 KiB frame). The server reads the
//! same frames in two passes over the text instead: the `type`, then the fields of that type,
//! skipping unknown fields without storing them. A `signal`'s `data` stays the raw JSON text
//! (the server only forwards it), so a frame costs about its own size.

use std::borrow::Cow;

use peermesh::protocol::{DirectPolicy, LinkId, PathKind, PeerId, Resume, WireCandidateType};
use serde::Deserialize;
use serde_json::value::RawValue;

/// A client frame the server understood.
#[derive(Debug)]
pub(crate) enum Request<'a> {
    Hello(Hello),
    Join {
        group: String,
    },
    Leave {
        group: String,
    },
    Signal {
        to: PeerId,
        link: LinkId,
        /// The `data` value exactly as the client wrote it.
        data: &'a RawValue,
    },
    Ping {
        id: u64,
    },
    Ack {
        group: String,
        change: u64,
    },
    Path {
        peer: PeerId,
        link: LinkId,
        path: PathKind,
        local: Option<WireCandidateType>,
        remote: Option<WireCandidateType>,
    },
    Drained,
}

impl Request<'_> {
    /// The frame's `type`.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Request::Hello(_) => "hello",
            Request::Join { .. } => "join",
            Request::Leave { .. } => "leave",
            Request::Signal { .. } => "signal",
            Request::Ping { .. } => "ping",
            Request::Ack { .. } => "ack",
            Request::Path { .. } => "path",
            Request::Drained => "drained",
        }
    }
}

/// Why a frame was not understood.
#[derive(Debug, PartialEq)]
pub(crate) enum BadRequest {
    /// Not JSON at all.
    InvalidJson(String),
    /// JSON, but not an object with a string `type` (`kind` absent), or a known `type` with a
    /// missing or wrongly typed field (`kind` is that type).
    BadFrame {
        kind: Option<&'static str>,
        error: String,
    },
    /// An object whose `type` is not one this server knows.
    UnknownType(String),
}

#[derive(Deserialize)]
struct Tag<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
}

/// The fields of a `hello`.
#[derive(Debug, Deserialize)]
pub(crate) struct Hello {
    pub(crate) version: u32,
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) token: Option<String>,
    #[serde(default)]
    pub(crate) direct: DirectPolicy,
    #[serde(default)]
    pub(crate) resumable: bool,
    #[serde(default)]
    pub(crate) resume: Option<Resume>,
}

#[derive(Deserialize)]
struct GroupFields {
    group: String,
}

#[derive(Deserialize)]
struct SignalFields<'a> {
    to: PeerId,
    link: LinkId,
    #[serde(borrow)]
    data: &'a RawValue,
}

#[derive(Deserialize)]
struct PingFields {
    id: u64,
}

#[derive(Deserialize)]
struct AckFields {
    group: String,
    change: u64,
}

#[derive(Deserialize)]
struct PathFields {
    peer: PeerId,
    link: LinkId,
    path: PathKind,
    #[serde(default)]
    local: Option<WireCandidateType>,
    #[serde(default)]
    remote: Option<WireCandidateType>,
}

/// Read one client frame.
pub(crate) fn parse(text: &str) -> Result<Request<'_>, BadRequest> {
    let tag = match serde_json::from_str::<Tag<'_>>(text) {
        Ok(tag) => tag,
        Err(e) => {
            return Err(match serde_json::from_str::<serde::de::IgnoredAny>(text) {
                Err(syntax) => BadRequest::InvalidJson(syntax.to_string()),
                Ok(_) => BadRequest::BadFrame {
                    kind: None,
                    error: e.to_string(),
                },
            })
        }
    };
    fn fields<'a, T: Deserialize<'a>>(text: &'a str, kind: &'static str) -> Result<T, BadRequest> {
        serde_json::from_str(text).map_err(|e| BadRequest::BadFrame {
            kind: Some(kind),
            error: e.to_string(),
        })
    }
    Ok(match tag.kind.as_ref() {
        "hello" => Request::Hello(fields(text, "hello")?),
        "join" => Request::Join {
            group: fields::<GroupFields>(text, "join")?.group,
        },
        "leave" => Request::Leave {
            group: fields::<GroupFields>(text, "leave")?.group,
        },
        "signal" => {
            let f: SignalFields<'_> = fields(text, "signal")?;
            Request::Signal {
                to: f.to,
                link: f.link,
                data: f.data,
            }
        }
        "ping" => Request::Ping {
            id: fields::<PingFields>(text, "ping")?.id,
        },
        "ack" => {
            let f: AckFields = fields(text, "ack")?;
            Request::Ack {
                group: f.group,
                change: f.change,
            }
        }
        "path" => {
            let f: PathFields = fields(text, "path")?;
            Request::Path {
                peer: f.peer,
                link: f.link,
                path: f.path,
                local: f.local,
                remote: f.remote,
            }
        }
        "drained" => Request::Drained,
        // (Echoed in the answer: at most 64 characters of it.)
        other => return Err(BadRequest::UnknownType(other.chars().take(64).collect())),
    })
}

/// The `signal` frame the receiver gets: `{"type":"signal","from":…,"link":…,"data":…}` with
/// `data` as the sender wrote it.
pub(crate) fn forwarded_signal(from: PeerId, link: LinkId, data: &RawValue) -> String {
    format!(
        "{{\"type\":\"signal\",\"from\":{from},\"link\":{link},\"data\":{}}}",
        data.get()
    )
}

/// What the server forwards of a `signal` between a pair whose policy is `relay`
/// (`docs/PROTOCOL.md` §3.13), whatever the sender's client does: only TURN relay candidates,
/// and no address of the sender's own. `None`: forward nothing (a host, server or peer reflexive
/// candidate). Otherwise the `data` text to forward: a relay candidate's related address
/// (`raddr`/`rport`, the sender's own address as the TURN server saw it) becomes
/// `0.0.0.0`/`0`, and in an `sdp` every `a=candidate` line that is not a relay candidate is
/// removed, relay ones are redacted the same way, and the `c=` and `a=rtcp` addresses become
/// `0.0.0.0` (`::` for IPv6). Data that is not an object is forwarded as it is.
pub(crate) fn relay_only(data: &RawValue) -> Option<String> {
    let mut value: serde_json::Value = match serde_json::from_str(data.get()) {
        Ok(v) => v,
        Err(_) => return Some(data.get().to_owned()),
    };
    let Some(obj) = value.as_object_mut() else {
        return Some(data.get().to_owned());
    };
    let mut changed = false;
    if let Some(serde_json::Value::String(c)) = obj.get_mut("candidate") {
        // An empty candidate is "end of candidates".
        if !c.trim().is_empty() {
            let redacted = redact_candidate(c.trim().trim_start_matches("a="))?;
            changed |= redacted != *c;
            *c = redacted;
        }
    }
    if let Some(serde_json::Value::String(sdp)) = obj.get_mut("sdp") {
        let redacted = redact_sdp(sdp);
        changed |= redacted != *sdp;
        *sdp = redacted;
    }
    Some(if changed {
        value.to_string()
    } else {
        data.get().to_owned()
    })
}

/// A relay candidate (`candidate:…`) with its related address zeroed; `None` for any other type.
fn redact_candidate(line: &str) -> Option<String> {
    let mut fields: Vec<&str> = line.split_ascii_whitespace().collect();
    let typ = fields.iter().position(|f| *f == "typ")?;
    if fields.get(typ + 1) != Some(&"relay") {
        return None;
    }
    for (key, zero) in [("raddr", "0.0.0.0"), ("rport", "0")] {
        if let Some(i) = fields.iter().position(|f| *f == key) {
            if i + 1 < fields.len() {
                fields[i + 1] = zero;
            }
        }
    }
    Some(fields.join(" "))
}

/// An SDP with only redacted relay candidates and no connection address (see [`relay_only`]).
fn redact_sdp(sdp: &str) -> String {
    let crlf = sdp.contains("\r\n");
    let mut out = String::with_capacity(sdp.len());
    for line in sdp.lines() {
        let line = if let Some(c) = line.strip_prefix("a=") {
            if c.starts_with("candidate:") {
                match redact_candidate(c) {
                    Some(r) => format!("a={r}"),
                    None => continue,
                }
            } else if let Some(rtcp) = c.strip_prefix("rtcp:") {
                let port = rtcp.split_ascii_whitespace().next().unwrap_or("9");
                let v6 = rtcp.contains("IP6");
                format!(
                    "a=rtcp:{port} IN {}",
                    if v6 { "IP6 ::" } else { "IP4 0.0.0.0" }
                )
            } else {
                line.to_owned()
            }
        } else if line.starts_with("c=") {
            if line.contains("IP6") {
                "c=IN IP6 ::".to_owned()
            } else {
                "c=IN IP4 0.0.0.0".to_owned()
            }
        } else {
            line.to_owned()
        };
        out.push_str(&line);
        out.push_str(if crlf { "\r\n" } else { "\n" });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use peermesh::protocol::{ClientMsg, ServerMsg};
    use proptest::prelude::*;

    /// What `ClientMsg` makes of the same text, as a `Request` would carry it.
    fn via_client_msg(text: &str) -> Option<((), String)> {
        let msg = serde_json::from_str::<ClientMsg>(text).ok()?;
        Some(((), serde_json::to_string(&msg).ok()?))
    }

    fn as_client_msg(r: &Request<'_>) -> ClientMsg {
        match r {
            Request::Hello(h) => ClientMsg::Hello {
                version: h.version,
                name: h.name.clone(),
                token: h.token.clone(),
                direct: h.direct,
                resumable: h.resumable,
                resume: h.resume.clone(),
            },
            Request::Join { group } => ClientMsg::Join {
                group: group.clone(),
            },
            Request::Leave { group } => ClientMsg::Leave {
                group: group.clone(),
            },
            Request::Signal { to, link, data } => ClientMsg::Signal {
                to: *to,
                link: *link,
                data: serde_json::from_str(data.get()).unwrap(),
            },
            Request::Ping { id } => ClientMsg::Ping { id: *id },
            Request::Ack { group, change } => ClientMsg::Ack {
                group: group.clone(),
                change: *change,
            },
            Request::Path {
                peer,
                link,
                path,
                local,
                remote,
            } => ClientMsg::Path {
                peer: *peer,
                link: *link,
                path: *path,
                local: *local,
                remote: *remote,
            },
            Request::Drained => ClientMsg::Drained,
        }
    }

    #[test]
    fn reads_every_frame_type_and_classifies_bad_ones() {
        let ok = [
            r#"{"type":"hello","version":1,"name":"alice"}"#,
            r#"{"name":"bob","version":1,"type":"hello","extra":{"x":[1,2]}}"#,
            r#"{"type":"join","group":"g"}"#,
            r#"{"type":"leave","group":"g"}"#,
            r#"{"type":"signal","to":2,"link":3,"data":{"sdp":"v=0\r\n","n":[1,null]}}"#,
            r#"{"type":"signal","to":2,"link":3,"data":null}"#,
            r#"{"type":"ping","id":18446744073709551615}"#,
            r#"{"type":"p\u0069ng","id":1}"#,
            r#"{"type":"hello","version":1,"name":"a","direct":"relay"}"#,
            r#"{"type":"hello","version":1,"name":"a","resumable":true}"#,
            r#"{"type":"hello","version":1,"name":"a","resume":{"peer":3,"token":"x"}}"#,
            r#"{"type":"ack","group":"g","change":7}"#,
            r#"{"type":"path","peer":2,"link":3,"path":"server"}"#,
            r#"{"type":"path","peer":2,"link":3,"path":"direct","local":"relay","remote":"host"}"#,
            r#"{"type":"drained"}"#,
        ];
        for text in ok {
            let r = parse(text).unwrap_or_else(|e| panic!("{text}: {e:?}"));
            let want: ClientMsg = serde_json::from_str(text).unwrap();
            assert_eq!(as_client_msg(&r), want, "{text}");
        }
        let bad_frame = |kind: Option<&'static str>| move |r: Result<Request<'_>, BadRequest>| matches!(r, Err(BadRequest::BadFrame { kind: k, .. }) if k == kind);
        assert!(matches!(parse("{"), Err(BadRequest::InvalidJson(_))));
        assert!(matches!(parse(""), Err(BadRequest::InvalidJson(_))));
        assert!(bad_frame(None)(parse("[1]")));
        assert!(bad_frame(None)(parse(r#"{"type":1}"#)));
        assert!(bad_frame(None)(parse(r#"{"group":"g"}"#)));
        assert!(bad_frame(Some("join"))(parse(r#"{"type":"join"}"#)));
        assert!(bad_frame(Some("hello"))(parse(
            r#"{"type":"hello","version":4294967296,"name":"a"}"#
        )));
        assert!(bad_frame(Some("signal"))(parse(
            r#"{"type":"signal","to":2,"link":3}"#
        )));
        assert!(
            matches!(parse(r#"{"type":"nope","x":1}"#), Err(BadRequest::UnknownType(t)) if t == "nope")
        );
    }

    fn raw(text: &str) -> &'static RawValue {
        serde_json::from_str::<Box<RawValue>>(text)
            .map(|b| &*Box::leak(b))
            .unwrap()
    }

    #[test]
    fn relay_pairs_get_no_address_but_the_relays() {
        let host = r#"{"kind":"candidate","gen":1,"candidate":"candidate:1 1 udp 2130706431 198.51.100.7 5000 typ host","sdpMid":"0"}"#;
        assert_eq!(relay_only(raw(host)), None);
        let srflx = r#"{"kind":"candidate","candidate":"a=candidate:2 1 udp 1694498815 203.0.113.9 5001 typ srflx raddr 198.51.100.7 rport 5000"}"#;
        assert_eq!(relay_only(raw(srflx)), None);
        let relay = r#"{"kind":"candidate","candidate":"candidate:3 1 udp 16777215 192.0.2.1 60000 typ relay raddr 203.0.113.9 rport 5001 generation 0"}"#;
        let out: serde_json::Value =
            serde_json::from_str(&relay_only(raw(relay)).unwrap()).unwrap();
        assert_eq!(
            out["candidate"],
            "candidate:3 1 udp 16777215 192.0.2.1 60000 typ relay raddr 0.0.0.0 rport 0 generation 0"
        );
        let end = r#"{"kind":"candidate","candidate":""}"#;
        assert!(relay_only(raw(end)).is_some());
        let sdp = "v=0
o=- 1 2 IN IP4 127.0.0.1
m=application 5000 UDP/DTLS/SCTP webrtc-datachannel
c=IN IP4 198.51.100.7
a=rtcp:5000 IN IP4 198.51.100.7
a=candidate:1 1 udp 2130706431 198.51.100.7 5000 typ host
a=candidate:3 1 udp 16777215 192.0.2.1 60000 typ relay raddr 203.0.113.9 rport 5001
a=mid:0
";
        let offer = serde_json::json!({"kind": "offer", "gen": 1, "sdp": sdp}).to_string();
        let out: serde_json::Value =
            serde_json::from_str(&relay_only(raw(&offer)).unwrap()).unwrap();
        let got = out["sdp"].as_str().unwrap();
        assert!(!got.contains("198.51.100.7"), "{got}");
        assert!(!got.contains("203.0.113.9"), "{got}");
        assert!(
            got.contains(
                "a=candidate:3 1 udp 16777215 192.0.2.1 60000 typ relay raddr 0.0.0.0 rport 0
"
            ),
            "{got}"
        );
        assert!(
            got.contains(
                "c=IN IP4 0.0.0.0
a=rtcp:5000 IN IP4 0.0.0.0
"
            ),
            "{got}"
        );
        assert!(
            got.ends_with(
                "a=mid:0
"
            ),
            "{got}"
        );
        assert_eq!(out["kind"], "offer");
        // Anything else goes through as it is.
        assert_eq!(relay_only(raw("null")).as_deref(), Some("null"));
        assert_eq!(
            relay_only(raw(r#"{"kind":"decline","gen":2}"#)).as_deref(),
            Some(r#"{"kind":"decline","gen":2}"#)
        );
    }

    #[test]
    fn forwarded_signal_is_the_server_msg() {
        let data: &RawValue = serde_json::from_str(r#"{"candidate": "a b", "n": [1, 2.5]}"#)
            .map(|b: Box<RawValue>| Box::leak(b) as &RawValue)
            .unwrap();
        let text = forwarded_signal(7, 9, data);
        let msg: ServerMsg = serde_json::from_str(&text).unwrap();
        assert_eq!(
            msg,
            ServerMsg::Signal {
                from: 7,
                link: 9,
                data: serde_json::json!({"candidate": "a b", "n": [1, 2.5]}),
            }
        );
    }

    /// Counts the heap bytes live on the measuring thread (a test binary's allocator).
    mod counting {
        use std::alloc::{GlobalAlloc, Layout, System};
        use std::cell::Cell;

        pub(super) struct Counting;

        thread_local! {
            static ACTIVE: Cell<bool> = const { Cell::new(false) };
            static LIVE: Cell<isize> = const { Cell::new(0) };
            static PEAK: Cell<isize> = const { Cell::new(0) };
        }

        fn note(delta: isize) {
            // `try_with`: thread-local storage may be gone while a thread exits.
            let _ = ACTIVE.try_with(|a| {
                if a.get() {
                    let live = LIVE.with(|l| {
                        l.set(l.get() + delta);
                        l.get()
                    });
                    PEAK.with(|p| p.set(p.get().max(live)));
                }
            });
        }

        // SAFETY: every call is passed on to `System` unchanged; only counters are kept.
        unsafe impl GlobalAlloc for Counting {
            unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
                note(layout.size() as isize);
                unsafe { System.alloc(layout) }
            }
            unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
                note(-(layout.size() as isize));
                unsafe { System.dealloc(ptr, layout) }
            }
        }

        /// Peak bytes allocated on this thread while `f` runs.
        pub(super) fn peak<R>(f: impl FnOnce() -> R) -> (usize, R) {
            LIVE.with(|l| l.set(0));
            PEAK.with(|p| p.set(0));
            ACTIVE.with(|a| a.set(true));
            let r = f();
            ACTIVE.with(|a| a.set(false));
            (PEAK.with(|p| p.get()).max(0) as usize, r)
        }
    }

    #[global_allocator]
    static ALLOC: counting::Counting = counting::Counting;

    /// The frames that cost `ClientMsg` the most (over 100 bytes per input byte) cost the
    /// server's reader next to nothing.
    #[test]
    fn heavy_frames_cost_about_their_size() {
        let n = 60_000;
        let nested = |open: &str, close: &str, inner: &str| {
            let depth = 120; // below serde_json's recursion limit
            format!("{}{inner}{}", open.repeat(depth), close.repeat(depth))
        };
        let many = |item: &str| vec![item; n / (item.len() + 1)].join(",");
        let frames = [
            format!(
                r#"{{"type":"signal","to":1,"link":1,"data":[{}]}}"#,
                many(r#"{"":{"":0}}"#)
            ),
            format!(
                r#"{{"type":"signal","to":1,"link":1,"data":[{}]}}"#,
                many("0")
            ),
            format!(
                r#"{{"type":"hello","version":1,"name":"a","x":[{}],"y":{}}}"#,
                many(r#"{"":[0]}"#),
                nested(r#"{"":"#, "}", "0")
            ),
            format!(r#"{{"type":"nope","x":[{}]}}"#, many(r#"{"":0}"#)),
            format!(r#"{{"x":[{}]}}"#, many(r#"{"":0}"#)),
        ];
        for (i, text) in frames.iter().enumerate() {
            let (peak, r) = counting::peak(|| parse(text).map(|r| r.kind()).map_err(drop));
            assert!(
                peak <= 4096,
                "{peak} bytes to read a {}-byte frame ({r:?})",
                text.len()
            );
            // The known types, for comparison (an unknown `type` first stops `ClientMsg` early).
            if i < 3 {
                let (tree, _) = counting::peak(|| serde_json::from_str::<ClientMsg>(text).is_ok());
                assert!(tree > 20 * text.len(), "ClientMsg: only {tree} bytes");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Any text: no panic, and whatever `ClientMsg` accepts is read the same way.
        #[test]
        fn agrees_with_client_msg(text in prop_oneof![
            ".{0,200}",
            r#"\{"type":"(hello|join|leave|signal|ping|ack|path|x)"(,"(version|name|group|to|link|data|id|change|path|direct)":(1|"a"|null|\[\]|\{\}|-1|4294967296)){0,4}\}"#,
        ]) {
            let r = parse(&text);
            if let Some((_, json)) = via_client_msg(&text) {
                let req = r.map_err(|e| TestCaseError::fail(format!("{text}: {e:?}")))?;
                prop_assert_eq!(serde_json::to_string(&as_client_msg(&req)).unwrap(), json);
            }
        }
    }
}
