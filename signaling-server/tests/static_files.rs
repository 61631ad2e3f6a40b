//! The browser client and the demo page are served from the binary, over real HTTP.

use peermesh_server::{Config, Server, STATIC_FILES};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Response {
    status: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

async fn get(addr: std::net::SocketAddr, path: &str) -> Response {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("read response");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of headers");
    let head = String::from_utf8(raw[..split].to_vec()).expect("UTF-8 headers");
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default().to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    Response {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

async fn server() -> peermesh_server::ServerHandle {
    Server::bind(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    })
    .await
    .expect("bind")
    .spawn()
}

#[tokio::test]
async fn serves_the_client_module_types_and_demo_page() {
    let server = server().await;
    let addr = server.local_addr();

    let js = get(addr, "/peermesh.js").await;
    assert_eq!(js.status, "HTTP/1.1 200 OK");
    assert_eq!(
        js.header("content-type"),
        Some("text/javascript; charset=utf-8")
    );
    assert_eq!(js.body, include_bytes!("../static/peermesh.js"));
    let text = String::from_utf8(js.body).unwrap();
    assert!(
        text.contains("export async function connect("),
        "not the module"
    );

    let dts = get(addr, "/peermesh.d.ts").await;
    assert_eq!(dts.status, "HTTP/1.1 200 OK");
    assert_eq!(dts.body, include_bytes!("../static/peermesh.d.ts"));

    let index = get(addr, "/").await;
    assert_eq!(index.status, "HTTP/1.1 200 OK");
    assert_eq!(
        index.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let html = String::from_utf8(index.body).unwrap();
    assert!(html.contains("<script type=\"module\" src=\"/demo.js\">"));
    assert!(html.contains("peermesh-server"));

    // Everything the page refers to is there, with a body.
    for &(path, content_type, body) in STATIC_FILES {
        let r = get(addr, path).await;
        assert_eq!(r.status, "HTTP/1.1 200 OK", "{path}");
        assert_eq!(r.header("content-type"), Some(content_type), "{path}");
        assert_eq!(r.body, body, "{path}");
        assert!(!body.is_empty(), "{path}");
    }
    for path in ["/demo.js", "/demo.css"] {
        assert!(html.contains(path), "index.html does not use {path}");
    }

    // Other paths are still 404, and the WebSocket endpoint is still where it was.
    assert!(get(addr, "/nope.js")
        .await
        .status
        .starts_with("HTTP/1.1 404"));
    assert!(get(addr, "/healthz").await.body == b"ok");
    server.shutdown().await;
}
