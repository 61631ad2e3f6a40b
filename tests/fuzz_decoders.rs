//! Property tests for every decoder in the `peermesh` crate that reads untrusted input:
//!
//! * session JSON: `ClientMsg` (the server decodes it), `ServerMsg` (the client decodes it) and
//!   `serde_json::Value` (the server re-parses a frame `ClientMsg` refused, to tell `bad_frame`
//!   from `unknown_type`);
//! * `RelayFrame::decode` (server and client);
//! * `LinkFrame::decode` (both ends of a link, on either path).
//!
//! They get arbitrary bytes, mutated valid frames and JSON token soup, plus targeted cases (deep
//! nesting, huge numbers, long strings, headers with extreme values). Each decode must return
//! (`Ok` or `Err`) without panicking, and its peak heap use must stay bounded:
//!
//! * `RelayFrame::decode` and `LinkFrame::decode` are zero-copy: they must not allocate at all.
//! * JSON decodes must stay below `JSON_PEAK_PER_BYTE * n + JSON_PEAK_CONST` = 160·n + 4096
//!   bytes for an input of `n` bytes. Every value that costs heap is spelled out in the input, so
//!   the peak grows linearly with `n`, but the factor is large: the worst input found is a chain
//!   of one-entry objects (`{"":{"":…0}}`), where each 5 input bytes become a `serde_json::Map`
//!   B-tree leaf node of about 630 bytes, ≈126 bytes per input byte; arrays of small elements
//!   cost 32-byte `Value`s plus serde's internally-tagged-enum buffer (`Content`) and up to twice
//!   their length in `Vec` capacity (≈80 per byte for `[0,0,…]`). At the server's default
//!   `max_frame_bytes` (65600) that is ≈8.3 MB for one frame (which is why the server reads its
//!   JSON frames without building a tree; see `signaling-server/src/request.rs`).
//!   `heavy_json_stays_within_bound` asserts the bound for the heaviest shapes found (worst
//!   measured 126.1 bytes per input byte with serde_json 1 on x86_64) at 100 bytes, 16 KiB and
//!   65600 bytes.
//!
//! Peak heap use is measured by a counting `#[global_allocator]` around `std::alloc::System`.
//! The counters are thread-local and only count while a measurement is running on that thread,
//! so tests running in parallel threads do not disturb each other.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use peermesh::protocol::{
    link_kind, ClientMsg, DirectPolicy, ErrorCode, IceServer, Limits, LinkFrame, MemberInfo,
    PathKind, RelayFrame, Resume, ServerMsg, WireCandidateType, FLAG_FIN, RELAY_HEADER_LEN,
    RELAY_KIND_DATA,
};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// Counting allocator

struct Counting;

thread_local! {
    /// Measuring on this thread.
    static ACTIVE: Cell<bool> = const { Cell::new(false) };
    /// Bytes allocated minus bytes freed since the measurement started (frees of older blocks
    /// can make it negative).
    static LIVE: Cell<isize> = const { Cell::new(0) };
    /// Highest `LIVE` seen since the measurement started.
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn account(delta: isize) {
    // `try_with`: the allocator also runs while thread-locals are being torn down.
    let _ = ACTIVE.try_with(|active| {
        if active.get() {
            let live = LIVE.get() + delta;
            LIVE.set(live);
            if live > PEAK.get() {
                PEAK.set(live);
            }
        }
    });
}

// SAFETY: every call is forwarded unchanged to `System`; the wrapper only updates plain
// thread-local counters (const-initialised `Cell`s, which never allocate).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            account(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            account(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        account(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            // A moving realloc holds both blocks while it copies: count the new block before
            // releasing the old one (an upper bound for in-place reallocs).
            account(new_size as isize);
            account(-(layout.size() as isize));
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Run `f` and return the peak heap bytes it had live at once (allocations made before `f`
/// and freed inside it do not lower the count below zero for the peak).
fn peak_heap(f: impl FnOnce()) -> usize {
    LIVE.set(0);
    PEAK.set(0);
    ACTIVE.set(true);
    f();
    ACTIVE.set(false);
    PEAK.get().max(0) as usize
}

#[test]
fn counter_measures_this_thread_only() {
    let peak = peak_heap(|| {
        let v = std::hint::black_box(vec![1u8; 100_000]);
        drop(v);
        let mut w = Vec::<u8>::new();
        for i in 0..50_000 {
            w.push(i as u8); // grows by realloc
        }
        std::hint::black_box(&w);
    });
    assert!((100_000..100_000 + 1024).contains(&peak), "{peak}");
    // Another thread's allocations are not counted.
    let peak = peak_heap(|| {
        std::thread::scope(|s| {
            s.spawn(|| std::hint::black_box(vec![1u8; 1 << 20]));
        })
    });
    assert!(peak < 64 << 10, "{peak}");
}

// ---------------------------------------------------------------------------------------------
// Decoders under test

/// Peak heap bytes per input byte allowed for one JSON decode (measured worst: 126; see the
/// module docs).
const JSON_PEAK_PER_BYTE: usize = 160;
/// Constant part of the JSON bound (error values, first small `Vec` capacities).
const JSON_PEAK_CONST: usize = 4096;

/// Decode `input` with every decoder, asserting no panic (a panic fails the test) and the
/// allocation bounds. Returns nothing: `Ok` and `Err` are both fine.
fn check_all(input: &[u8]) {
    check_binary(input);
    check_json(input);
}

fn check_binary(input: &[u8]) {
    let peak = peak_heap(|| {
        let _ = std::hint::black_box(RelayFrame::decode(input));
        let _ = std::hint::black_box(LinkFrame::decode(input));
    });
    assert_eq!(
        peak,
        0,
        "binary decoders must not allocate ({} bytes in)",
        input.len()
    );
    if let Ok(f) = RelayFrame::decode(input) {
        // The payload is the rest of the frame, and re-encoding gives the frame back.
        assert_eq!(f.payload.len(), input.len() - RELAY_HEADER_LEN);
        assert_eq!(f.encode(), input);
        let peak = peak_heap(|| {
            let _ = std::hint::black_box(LinkFrame::decode(f.payload));
        });
        assert_eq!(peak, 0);
    }
    if let Ok(f) = LinkFrame::decode(input) {
        // Re-encoding decodes to the same frame. Trailing bytes after fixed-size frames and
        // unknown flag bits are dropped, so only the length of variable-size frames is kept.
        let enc = f.encode();
        assert_eq!(LinkFrame::decode(&enc).as_ref(), Ok(&f));
        assert!(enc.len() <= input.len());
        if matches!(f, LinkFrame::Data { .. } | LinkFrame::Unreliable { .. }) {
            assert_eq!(enc.len(), input.len());
        }
    }
}

fn json_bound(n: usize) -> usize {
    JSON_PEAK_PER_BYTE * n + JSON_PEAK_CONST
}

/// Peak heap of each JSON decode of `input`, by decoder name.
fn json_peaks(input: &[u8]) -> [(&'static str, usize); 5] {
    let text = std::str::from_utf8(input).ok();
    [
        (
            "ClientMsg from_slice",
            peak_heap(|| {
                drop(std::hint::black_box(serde_json::from_slice::<ClientMsg>(
                    input,
                )))
            }),
        ),
        (
            "ServerMsg from_slice",
            peak_heap(|| {
                drop(std::hint::black_box(serde_json::from_slice::<ServerMsg>(
                    input,
                )))
            }),
        ),
        (
            "Value from_slice",
            peak_heap(|| {
                drop(std::hint::black_box(serde_json::from_slice::<
                    serde_json::Value,
                >(input)))
            }),
        ),
        // What the server and the client actually call on a WebSocket text frame.
        (
            "ClientMsg from_str",
            peak_heap(|| {
                if let Some(t) = text {
                    drop(std::hint::black_box(serde_json::from_str::<ClientMsg>(t)));
                }
            }),
        ),
        (
            "ServerMsg from_str",
            peak_heap(|| {
                if let Some(t) = text {
                    drop(std::hint::black_box(serde_json::from_str::<ServerMsg>(t)));
                }
            }),
        ),
    ]
}

fn check_json(input: &[u8]) {
    for (name, peak) in json_peaks(input) {
        assert!(
            peak <= json_bound(input.len()),
            "{name}: {peak} bytes peak for {} bytes in (bound {}): {}",
            input.len(),
            json_bound(input.len()),
            String::from_utf8_lossy(&input[..input.len().min(200)])
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Inputs

/// Valid session frames of every type, both directions.
fn valid_json_frames() -> Vec<Vec<u8>> {
    let member = MemberInfo {
        peer: 2,
        name: "bob".into(),
        user: Some("u-2".into()),
        link: 7,
        initiator: true,
        direct: DirectPolicy::Relay,
    };
    let ice = vec![
        IceServer {
            urls: vec!["stun:127.0.0.1:3478".into()],
            ..IceServer::default()
        },
        IceServer {
            urls: vec!["turn:127.0.0.1:3478?transport=udp".into()],
            username: Some("1795365342:peer1".into()),
            credential: Some("pWqrFTUVVsH+jn2YPZDXFQDblrw=".into()),
        },
    ];
    let client = [
        ClientMsg::Hello {
            version: 1,
            name: "alice".into(),
            token: None,
            direct: DirectPolicy::Any,
            resumable: true,
            resume: None,
        },
        ClientMsg::Hello {
            version: 1,
            name: "alice".into(),
            token: Some("eyJhbGciOiJIUzI1NiJ9.e30.sig".into()),
            direct: DirectPolicy::None,
            resumable: false,
            resume: Some(Resume {
                peer: 3,
                token: "3q2-xyz".into(),
            }),
        },
        ClientMsg::Join {
            group: "lobby".into(),
        },
        ClientMsg::Leave {
            group: "lobby".into(),
        },
        ClientMsg::Signal {
            to: 2,
            link: 7,
            data: serde_json::json!({"kind": "candidate", "gen": 1, "candidate": "candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host", "sdpMid": "0", "sdpMLineIndex": 0}),
        },
        ClientMsg::Ping { id: u64::MAX },
        ClientMsg::Drained,
        ClientMsg::Ack {
            group: "lobby".into(),
            change: 3,
        },
        ClientMsg::Path {
            peer: 2,
            link: 7,
            path: PathKind::Direct,
            local: Some(WireCandidateType::Relay),
            remote: Some(WireCandidateType::Host),
        },
    ];
    let server = [
        ServerMsg::Welcome {
            version: 1,
            peer: 1,
            ice_servers: ice.clone(),
            heartbeat_interval_ms: 5000,
            heartbeat_timeout_ms: 15000,
            limits: Limits {
                max_frame_bytes: 65600,
                max_groups_per_client: 32,
                max_members_per_group: 64,
            },
            resume_token: Some("3q2-xyz".into()),
            resume_grace_ms: Some(30_000),
            resumed: true,
            groups: Some(vec!["lobby".into()]),
        },
        ServerMsg::MemberSuspended { peer: 2 },
        ServerMsg::Drain {
            reconnect_url: Some("wss://b.example.com/ws".into()),
            timeout_ms: 10_000,
        },
        ServerMsg::MemberResumed { peer: 2 },
        ServerMsg::Joined {
            group: "lobby".into(),
            members: vec![member.clone(), member.clone()],
            change: Some(1),
        },
        ServerMsg::Left {
            group: "lobby".into(),
            change: None,
        },
        ServerMsg::MemberJoined {
            group: "lobby".into(),
            member,
            change: Some(2),
        },
        ServerMsg::MemberLeft {
            group: "lobby".into(),
            peer: 2,
            change: Some(4),
        },
        ServerMsg::Signal {
            from: 2,
            link: 7,
            data: serde_json::json!({"kind": "offer", "gen": 1, "sdp": "v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\n"}),
        },
        ServerMsg::IceServers { ice_servers: ice },
        ServerMsg::Pong { id: 3 },
        ServerMsg::Error {
            code: ErrorCode::StaleLink,
            message: "link 3 is not current (current is 7)".into(),
            request: Some("relay".into()),
            group: Some("lobby".into()),
            peer: Some(2),
        },
    ];
    let mut out: Vec<Vec<u8>> = client
        .iter()
        .map(|m| serde_json::to_vec(m).unwrap())
        .collect();
    out.extend(server.iter().map(|m| serde_json::to_vec(m).unwrap()));
    out
}

/// Valid binary frames: relay frames wrapping link frames, and bare link frames.
fn valid_binary_frames() -> Vec<Vec<u8>> {
    let links = [
        LinkFrame::Data {
            seq: 1,
            fin: true,
            bytes: b"hi",
        },
        LinkFrame::Data {
            seq: u64::MAX,
            fin: false,
            bytes: &[0xAB; 100],
        },
        LinkFrame::Ack { seq: 42 },
        LinkFrame::Unreliable { bytes: b"x" },
        LinkFrame::Ping { id: 1 },
        LinkFrame::Pong { id: 1 },
        LinkFrame::Ready { gen: 1 },
        LinkFrame::UnreliablePart {
            msg: 1,
            index: 0,
            count: 2,
            bytes: b"ab",
        },
    ];
    let mut out = Vec::new();
    for l in &links {
        let enc = l.encode();
        out.push(
            RelayFrame {
                peer: 2,
                link: 7,
                payload: &enc,
            }
            .encode(),
        );
        out.push(enc);
    }
    out
}

/// How to damage a valid frame.
#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, mask: u8 },
    Set { at: usize, byte: u8 },
    Insert { at: usize, bytes: Vec<u8> },
    Remove { at: usize, len: usize },
    Truncate { at: usize },
    Duplicate { at: usize, len: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let at = any::<usize>();
    prop_oneof![
        (at, 1u8..).prop_map(|(at, mask)| Mutation::Flip { at, mask }),
        (at, prop::sample::select(INTERESTING_BYTES))
            .prop_map(|(at, byte)| Mutation::Set { at, byte }),
        (at, prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (at, 1usize..16).prop_map(|(at, len)| Mutation::Remove { at, len }),
        at.prop_map(|at| Mutation::Truncate { at }),
        (at, 1usize..64).prop_map(|(at, len)| Mutation::Duplicate { at, len }),
    ]
}

const INTERESTING_BYTES: &[u8] = &[
    0x00, 0x01, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x7F, 0x80, 0xFF, b'"', b'\\', b'{', b'}',
    b'[', b']', b':', b',', b'-', b'0', b'9', b'e', b'.', b'u', b' ',
];

fn apply(frame: &mut Vec<u8>, m: &Mutation) {
    let len = frame.len();
    let pos = |at: usize| if len == 0 { 0 } else { at % (len + 1) };
    match m {
        Mutation::Flip { at, mask } if len > 0 => frame[at % len] ^= mask,
        Mutation::Set { at, byte } if len > 0 => frame[at % len] = *byte,
        Mutation::Insert { at, bytes } => {
            let p = pos(*at);
            frame.splice(p..p, bytes.iter().copied());
        }
        Mutation::Remove { at, len: n } => {
            let p = pos(*at);
            frame.drain(p..(p + n).min(len));
        }
        Mutation::Truncate { at } => frame.truncate(pos(*at)),
        Mutation::Duplicate { at, len: n } => {
            let p = pos(*at);
            let chunk = frame[p..(p + n).min(len)].to_vec();
            frame.splice(p..p, chunk);
        }
        _ => {}
    }
}

/// JSON fragments that, glued together at random, reach deeper into the parser and the serde
/// derives than random bytes do.
const JSON_TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ":",
    ",",
    "\"",
    " ",
    "null",
    "true",
    "false",
    "0",
    "-1",
    "1.5e3",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775809",
    "4294967296",
    "1e309",
    "-1e-400",
    "0.",
    "01",
    "\"type\"",
    "\"hello\"",
    "\"join\"",
    "\"leave\"",
    "\"signal\"",
    "\"ping\"",
    "\"welcome\"",
    "\"joined\"",
    "\"left\"",
    "\"member_joined\"",
    "\"member_left\"",
    "\"ice_servers\"",
    "\"pong\"",
    "\"error\"",
    "\"version\"",
    "\"name\"",
    "\"group\"",
    "\"to\"",
    "\"from\"",
    "\"link\"",
    "\"data\"",
    "\"id\"",
    "\"peer\"",
    "\"members\"",
    "\"member\"",
    "\"initiator\"",
    "\"urls\"",
    "\"username\"",
    "\"credential\"",
    "\"limits\"",
    "\"max_frame_bytes\"",
    "\"heartbeat_interval_ms\"",
    "\"code\"",
    "\"message\"",
    "\"request\"",
    "\"stale_link\"",
    "\"\\u0000\"",
    "\"\\ud800\"",
    "\"\\udc00\\ud800\"",
    "\"\\uD83D\\uDE00\"",
    "\"\\x\"",
    "\"\u{202E}\"",
    "\u{FEFF}",
    "\\",
];

fn json_soup() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop::sample::select(JSON_TOKENS), 0..200)
        .prop_map(|tokens| tokens.concat().into_bytes())
}

/// A valid frame with a few mutations.
fn mutated(frames: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(frames),
        prop::collection::vec(mutation(), 1..6),
    )
        .prop_map(|(mut frame, ms)| {
            for m in &ms {
                apply(&mut frame, m);
            }
            frame
        })
}

/// Binary frames with a known kind byte (so the decoders get past the first check) and
/// arbitrary rest.
fn kinded_bytes() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(
            &[
                RELAY_KIND_DATA,
                link_kind::DATA,
                link_kind::ACK,
                link_kind::UNRELIABLE,
                link_kind::PING,
                link_kind::PONG,
                link_kind::READY,
                link_kind::UNRELIABLE_PART,
            ][..],
        ),
        prop::collection::vec(any::<u8>(), 0..32),
    )
        .prop_map(|(kind, mut rest)| {
            rest.insert(0, kind);
            rest
        })
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes(input in prop::collection::vec(any::<u8>(), 0..2048)) {
        check_all(&input);
    }

    #[test]
    fn arbitrary_text(input in prop::collection::vec(any::<char>(), 0..512)) {
        check_all(input.into_iter().collect::<String>().as_bytes());
    }

    #[test]
    fn mutated_json(input in mutated(valid_json_frames())) {
        check_all(&input);
    }

    #[test]
    fn json_token_soup(input in json_soup()) {
        check_all(&input);
    }

    #[test]
    fn mutated_binary(input in mutated(valid_binary_frames())) {
        check_binary(&input);
    }

    #[test]
    fn binary_with_known_kind(input in kinded_bytes()) {
        check_binary(&input);
        // The same bytes as the payload of a relay frame.
        let relayed = RelayFrame { peer: 1, link: 1, payload: &input }.encode();
        check_binary(&relayed);
    }

    #[test]
    fn binary_roundtrip(
        peer in any::<u32>(),
        link in any::<u32>(),
        seq in any::<u64>(),
        fin in any::<bool>(),
        gen in any::<u32>(),
        bytes in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let frames = [
            LinkFrame::Data { seq, fin, bytes: &bytes },
            LinkFrame::Ack { seq },
            LinkFrame::Unreliable { bytes: &bytes },
            LinkFrame::Ping { id: seq },
            LinkFrame::Pong { id: seq },
            LinkFrame::Ready { gen },
            LinkFrame::UnreliablePart {
                msg: gen,
                index: seq as u16,
                count: (seq >> 16) as u16,
                bytes: &bytes,
            },
        ];
        for f in frames {
            let enc = f.encode();
            prop_assert_eq!(LinkFrame::decode(&enc), Ok(f.clone()));
            let relay = RelayFrame { peer, link, payload: &enc }.encode();
            let r = RelayFrame::decode(&relay).unwrap();
            prop_assert_eq!((r.peer, r.link, r.payload), (peer, link, &enc[..]));
            check_binary(&relay);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Targeted cases

/// `n` copies of `unit` between `open` and `close`, joined by `sep`.
fn repeat(open: &str, unit: &str, sep: &str, n: usize, close: &str) -> Vec<u8> {
    let mut s = String::from(open);
    for i in 0..n {
        if i > 0 {
            s.push_str(sep);
        }
        s.push_str(unit);
    }
    s.push_str(close);
    s.into_bytes()
}

/// `inner` as the `data` of a client `signal` and of a server `signal`.
fn in_signal(inner: &[u8]) -> [Vec<u8>; 2] {
    let inner = std::str::from_utf8(inner).unwrap();
    [
        format!(r#"{{"type":"signal","to":1,"link":1,"data":{inner}}}"#).into_bytes(),
        format!(r#"{{"type":"signal","from":1,"link":1,"data":{inner}}}"#).into_bytes(),
    ]
}

/// Inputs that make the JSON decoders allocate the most per input byte, about `n` bytes each.
fn heavy_json(n: usize) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let shapes: [(&str, &str, &str, &str, usize); 10] = [
        ("[0,0,…]", "[", "0", ",", 2),
        ("[[0],…]", "[", "[0]", ",", 4),
        ("[[],…]", "[", "[]", ",", 3),
        ("[{},…]", "[", "{}", ",", 3),
        ("[\"\",…]", "[", "\"\"", ",", 3),
        ("[[[0]],…]", "[", "[[0]]", ",", 6),
        ("[{\"a\":0},…]", "[", "{\"a\":0}", ",", 8),
        ("[{\"\":0},…]", "[", "{\"\":0}", ",", 7),
        ("[\"a\",…]", "[", "\"a\"", ",", 4),
        ("[\"\\u00e9\",…]", "[", "\"\\u00e9\"", ",", 9),
    ];
    for (label, open, unit, sep, per) in shapes {
        let v = repeat(open, unit, sep, n / per, "]");
        for (i, s) in in_signal(&v).into_iter().enumerate() {
            out.push((format!("signal{i} data {label}"), s));
        }
        out.push((format!("bare {label}"), v));
    }
    // Chains of one-entry objects: a B-tree node per 5 input bytes.
    for depth in [2, 8, 100] {
        let unit = format!("{}0{}", "{\"\":".repeat(depth), "}".repeat(depth));
        let v = repeat("[", &unit, ",", n / (unit.len() + 1), "]");
        for (i, s) in in_signal(&v).into_iter().enumerate() {
            out.push((format!("signal{i} data [{{\"\":{{…{depth}}}}},…]"), s));
        }
        out.push((format!("bare [{{\"\":{{…{depth}}}}},…]"), v));
    }
    // Objects with distinct keys.
    let mut obj = String::from("{");
    let mut i = 0;
    while obj.len() < n {
        if i > 0 {
            obj.push(',');
        }
        obj.push_str(&format!("\"{i:x}\":0"));
        i += 1;
    }
    obj.push('}');
    for (j, s) in in_signal(obj.as_bytes()).into_iter().enumerate() {
        out.push((format!("signal{j} data {{distinct keys}}"), s));
    }
    out.push(("bare {distinct keys}".into(), obj.into_bytes()));
    // Typed arrays of the server messages.
    out.push((
        "joined members".into(),
        repeat(
            r#"{"type":"joined","group":"g","members":["#,
            r#"{"peer":1,"name":"","link":1,"initiator":true}"#,
            ",",
            n / 48,
            "]}",
        ),
    ));
    out.push((
        "welcome ice_servers [{urls:[]}]".into(),
        repeat(
            r#"{"type":"welcome","version":1,"peer":1,"heartbeat_interval_ms":1,"heartbeat_timeout_ms":1,"limits":{"max_frame_bytes":1,"max_groups_per_client":1,"max_members_per_group":1},"ice_servers":["#,
            r#"{"urls":[]}"#,
            ",",
            n / 12,
            "]}",
        ),
    ));
    out.push((
        "ice_servers urls [\"\"]".into(),
        repeat(
            r#"{"type":"ice_servers","ice_servers":[{"urls":["#,
            r#""""#,
            ",",
            n / 3,
            "]}]}",
        ),
    ));
    out
}

#[test]
fn heavy_json_stays_within_bound() {
    for n in [100, 16 * 1024, 65600] {
        for (label, input) in heavy_json(n) {
            for (decoder, peak) in json_peaks(&input) {
                assert!(
                    peak <= json_bound(input.len()),
                    "{label} / {decoder}: {peak} bytes peak for {} bytes in",
                    input.len()
                );
            }
        }
    }
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    // serde_json refuses nesting deeper than 128 with "recursion limit exceeded".
    for depth in [129, 1_000, 100_000] {
        for (open, close) in [("[", "]"), ("{\"a\":", "}")] {
            let v = format!("{}0{}", open.repeat(depth), close.repeat(depth));
            let err = serde_json::from_str::<serde_json::Value>(&v).unwrap_err();
            assert!(err.to_string().contains("recursion limit"), "{err}");
            for input in in_signal(v.as_bytes()) {
                let err = serde_json::from_slice::<ClientMsg>(&input).unwrap_err();
                assert!(err.to_string().contains("recursion limit"), "{err}");
                let err = serde_json::from_slice::<ServerMsg>(&input).unwrap_err();
                assert!(err.to_string().contains("recursion limit"), "{err}");
                check_all(&input);
            }
            // Unclosed nesting too.
            check_all(open.repeat(depth).as_bytes());
        }
    }
    // Just inside the limit parses: 127 nested arrays as a bare value, 126 as `signal.data`
    // (below the frame object).
    let ok = format!("{}0{}", "[".repeat(127), "]".repeat(127));
    assert!(serde_json::from_str::<serde_json::Value>(&ok).is_ok());
    let ok = format!("{}0{}", "[".repeat(126), "]".repeat(126));
    let [client, server] = in_signal(ok.as_bytes());
    serde_json::from_slice::<ClientMsg>(&client).unwrap();
    serde_json::from_slice::<ServerMsg>(&server).unwrap();
}

#[test]
fn huge_numbers() {
    let digits = "9".repeat(100_000);
    for number in [
        digits.clone(),
        format!("-{digits}"),
        format!("0.{digits}"),
        format!("1{digits}e-100000"),
        "1e999999999999999999999".to_string(),
        "1e-999999999999999999999".to_string(),
        "-0".to_string(),
        "18446744073709551616".to_string(),
        "4294967296".to_string(),
    ] {
        for input in [
            format!(r#"{{"type":"hello","version":{number},"name":"a"}}"#),
            format!(r#"{{"type":"ping","id":{number}}}"#),
            format!(r#"{{"type":"pong","id":{number}}}"#),
            format!(r#"{{"type":"signal","to":{number},"link":1,"data":{number}}}"#),
            format!(r#"{{"type":"member_left","group":"g","peer":{number}}}"#),
        ] {
            check_all(input.as_bytes());
        }
        check_all(number.as_bytes());
    }
    // Out-of-range integers are errors, not wrapped values.
    assert!(serde_json::from_str::<ClientMsg>(
        r#"{"type":"hello","version":4294967296,"name":"a"}"#
    )
    .is_err());
    assert!(
        serde_json::from_str::<ClientMsg>(r#"{"type":"ping","id":18446744073709551616}"#).is_err()
    );
    assert!(serde_json::from_str::<ClientMsg>(r#"{"type":"ping","id":-1}"#).is_err());
    assert!(serde_json::from_str::<serde_json::Value>("1e400").is_err());
}

#[test]
fn long_strings() {
    let long = "a".repeat(256 << 10);
    let escaped = "\\u00e9".repeat(100_000);
    let surrogates = "\\ud83d\\ude00".repeat(50_000);
    for s in [&long, &escaped, &surrogates] {
        for input in [
            format!(r#"{{"type":"hello","version":1,"name":"{s}"}}"#),
            format!(r#"{{"type":"join","group":"{s}"}}"#),
            format!(r#"{{"type":"{s}"}}"#),
            format!(r#"{{"{s}":1}}"#),
            format!(r#"{{"type":"error","code":"internal","message":"{s}"}}"#),
            format!(r#"{{"type":"signal","to":1,"link":1,"data":"{s}"}}"#),
        ] {
            check_all(input.as_bytes());
        }
    }
    // Unterminated and badly escaped strings.
    check_all(format!(r#"{{"type":"hello","version":1,"name":"{long}"#).as_bytes());
    check_all(format!(r#"{{"type":"hello","version":1,"name":"{long}\ud800"}}"#).as_bytes());
    check_all(format!(r#"{{"type":"hello","version":1,"name":"{long}\"#).as_bytes());
    check_all(b"\"\\ud800\\u");
    check_all(b"\"\\u12");
}

#[test]
fn relay_headers_with_extreme_values() {
    // A relay frame has no length field: the payload is whatever follows the 9-byte header.
    for len in 0..RELAY_HEADER_LEN {
        let mut f = vec![0xFF; len];
        if len > 0 {
            f[0] = RELAY_KIND_DATA;
        }
        check_binary(&f);
        assert!(RelayFrame::decode(&f).is_err());
    }
    for (peer, link) in [(0, 0), (u32::MAX, u32::MAX), (1, u32::MAX)] {
        for payload_len in [0, 1, 16 * 1024, 1 << 20] {
            let payload = vec![0xFF; payload_len];
            let f = RelayFrame {
                peer,
                link,
                payload: &payload,
            }
            .encode();
            check_binary(&f);
            let d = RelayFrame::decode(&f).unwrap();
            assert_eq!((d.peer, d.link, d.payload.len()), (peer, link, payload_len));
        }
    }
    // Every unknown kind byte is refused.
    for kind in 0..=u8::MAX {
        let f = [kind; RELAY_HEADER_LEN + 4];
        check_binary(&f);
        assert_eq!(RelayFrame::decode(&f).is_ok(), kind == RELAY_KIND_DATA);
    }
}

#[test]
fn link_frames_with_extreme_headers() {
    // DATA headers carry a sequence number and flags but no length or message total: the
    // fragment is the rest of the frame, borrowed, and nothing is allocated for it, however
    // large the frame or the sequence number.
    for seq in [0, 1, u64::MAX / 2, u64::MAX - 1, u64::MAX] {
        for flags in [0, FLAG_FIN, 0xFE, 0xFF] {
            for len in [0, 1, 16 * 1024, 16 * 1024 + 1, 1 << 20] {
                let mut f = vec![link_kind::DATA, flags];
                f.extend_from_slice(&seq.to_be_bytes());
                f.resize(10 + len, 0xFF);
                check_binary(&f);
                match LinkFrame::decode(&f).unwrap() {
                    LinkFrame::Data { seq: s, fin, bytes } => {
                        assert_eq!((s, fin, bytes.len()), (seq, flags & FLAG_FIN != 0, len))
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
    }
    // Truncated fixed-size frames and every unknown kind byte are refused.
    for kind in 0..=u8::MAX {
        for len in 0..12 {
            let mut f = vec![0xFF; len];
            if len > 0 {
                f[0] = kind;
            }
            check_binary(&f);
            let need = match kind {
                link_kind::DATA => 10,
                link_kind::ACK | link_kind::PING | link_kind::PONG => 9,
                link_kind::READY => 5,
                link_kind::UNRELIABLE => 1,
                link_kind::UNRELIABLE_PART => 9,
                link_kind::DATA_LANE => 11,
                link_kind::ACK_LANE => 10,
                link_kind::UNRELIABLE_SEQ => 8,
                link_kind::VERSION => 5,
                _ => usize::MAX,
            };
            assert_eq!(
                LinkFrame::decode(&f).is_ok(),
                len >= need.max(1),
                "{kind:#x} {len}"
            );
        }
    }
}
