//! A client that speaks the session protocol by hand over a real WebSocket, for tests that
//! check exactly what the server sends.
#![allow(dead_code)]

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use peermesh::protocol::{ErrorCode, MemberInfo, PeerId, ServerMsg, PROTOCOL_VERSION};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for the server's next frame.
pub const WAIT: Duration = Duration::from_secs(5);

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What a raw client saw next.
#[derive(Debug)]
pub enum Seen {
    Msg(ServerMsg),
    Close(Option<u16>, String),
    End,
}

pub async fn next(ws: &mut Ws) -> Seen {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Err(_) => panic!("nothing from the server within {WAIT:?}"),
            Ok(None) | Ok(Some(Err(_))) => return Seen::End,
            Ok(Some(Ok(Message::Text(t)))) => {
                return Seen::Msg(serde_json::from_str(&t).expect("server frame"))
            }
            Ok(Some(Ok(Message::Close(c)))) => {
                return Seen::Close(
                    c.as_ref().map(|c| u16::from(c.code)),
                    c.map(|c| c.reason.to_string()).unwrap_or_default(),
                )
            }
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// The next server message (panics on a close).
pub async fn next_msg(ws: &mut Ws) -> ServerMsg {
    match next(ws).await {
        Seen::Msg(m) => m,
        other => panic!("expected a message, got {other:?}"),
    }
}

/// `Some` frame within `within`, or `None` if the server sent nothing.
pub async fn maybe_next(ws: &mut Ws, within: Duration) -> Option<Seen> {
    match tokio::time::timeout(within, ws.next()).await {
        Err(_) => None,
        Ok(None) | Ok(Some(Err(_))) => Some(Seen::End),
        Ok(Some(Ok(Message::Text(t)))) => {
            Some(Seen::Msg(serde_json::from_str(&t).expect("server frame")))
        }
        Ok(Some(Ok(Message::Close(c)))) => Some(Seen::Close(
            c.as_ref().map(|c| u16::from(c.code)),
            c.map(|c| c.reason.to_string()).unwrap_or_default(),
        )),
        Ok(Some(Ok(_))) => Some(Seen::End),
    }
}

pub async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// Connect and say hello with `token` (and a hello name of its own, which a server with a secret
/// ignores), plus any `extra` fields.
pub async fn hello_with(url: &str, token: Option<&str>, extra: Value) -> (Ws, Seen) {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut h = json!({"type": "hello", "version": PROTOCOL_VERSION, "name": "whoever"});
    if let Some(t) = token {
        h["token"] = t.into();
    }
    if let (Some(h), Some(extra)) = (h.as_object_mut(), extra.as_object()) {
        h.extend(extra.clone());
    }
    send(&mut ws, h).await;
    let first = next(&mut ws).await;
    (ws, first)
}

pub async fn hello(url: &str, token: Option<&str>) -> (Ws, Seen) {
    hello_with(url, token, json!({})).await
}

pub async fn welcomed(url: &str, token: &str) -> (Ws, PeerId) {
    welcomed_with(url, Some(token), json!({})).await
}

pub async fn welcomed_with(url: &str, token: Option<&str>, extra: Value) -> (Ws, PeerId) {
    match hello_with(url, token, extra).await {
        (ws, Seen::Msg(ServerMsg::Welcome { peer, .. })) => (ws, peer),
        (_, other) => panic!("expected welcome, got {other:?}"),
    }
}

pub async fn join(ws: &mut Ws, group: &str) -> Result<Vec<MemberInfo>, ErrorCode> {
    send(ws, json!({"type": "join", "group": group})).await;
    loop {
        match next(ws).await {
            Seen::Msg(ServerMsg::Joined {
                group: g, members, ..
            }) if g == group => return Ok(members),
            Seen::Msg(ServerMsg::Error { code, .. }) => return Err(code),
            Seen::Msg(_) => continue,
            other => panic!("join {group}: {other:?}"),
        }
    }
}
