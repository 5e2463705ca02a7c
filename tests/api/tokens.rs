//! Tokens past their time or short of their claims, and sockets that break the
//! protocol: each gets the answer the contract names, never a silent drop.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{GitRepo, SECRET, TestApp, WsRead};
use hivesync::auth::{Authenticator, ClientKind};

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn signed(claims: Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("encode")
}

#[tokio::test]
async fn tokens_not_yet_valid_issued_in_the_future_or_for_another_audience_are_refused() {
    let app = TestApp::spawn_with(|config| {
        config.jwt_audience = Some("hivesync".into());
        config.jwt_issuer = Some("https://id.example.com".into());
    })
    .await;
    let now = unix_now();
    let base = json!({"sub": "alice", "exp": now + 600, "client": "desktop",
                      "aud": "hivesync", "iss": "https://id.example.com"});
    let status = |token: String| {
        let app = &app;
        async move { app.get("/api/v1/projects", &token).await.status().as_u16() }
    };
    assert_eq!(status(signed(base.clone())).await, 200);
    for (field, value) in [
        ("nbf", json!(now + 300)),
        ("iat", json!(now + 300)),
        ("aud", json!("another-service")),
        ("iss", json!("https://evil.example.com")),
    ] {
        let mut claims = base.clone();
        claims[field] = value;
        assert_eq!(status(signed(claims)).await, 401, "{field}");
    }
    app.stop().await;
}

#[tokio::test]
async fn a_token_without_a_client_claim_reads_metadata_only() {
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    repo.write("README.md", "hello\n").commit("first");
    let id = app.register(&repo).await;
    app.sync_to_end(&id).await;
    let bare = signed(json!({"sub": "alice", "exp": unix_now() + 600}));
    let response = app
        .get(&format!("/api/v1/repo/tree?project_id={id}"), &bare)
        .await;
    assert_eq!(response.status(), 403);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"], "mobile_metadata_only");
    let listed = app.get("/api/v1/mobile/projects", &bare).await;
    assert_eq!(listed.status(), 200, "metadata is still readable");
    app.stop().await;
}

#[tokio::test]
async fn a_socket_is_closed_with_4001_when_its_token_expires() {
    let app = TestApp::spawn().await;
    let short = Authenticator::from_secret(SECRET.as_bytes())
        .mint("alice", ClientKind::Desktop, Duration::from_secs(2))
        .expect("mint");
    let mut socket = app.ws(&short, "").await;
    let hello = socket.next_json().await;
    assert_eq!(hello["type"], "hello");
    let closed = loop {
        match socket.read(Duration::from_secs(15)).await {
            Some(WsRead::Json(_)) => continue,
            other => break other,
        }
    };
    assert!(
        matches!(closed, Some(WsRead::Closed(Some(4001)))),
        "expected close 4001, got {closed:?}"
    );
    app.stop().await;
}

/// Opens a raw WebSocket to the hub and returns the stream after the 101.
async fn raw_socket(app: &TestApp) -> TcpStream {
    let mut stream = TcpStream::connect(app.addr).await.expect("connect");
    let request = format!(
        "GET /api/v1/ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Authorization: Bearer {}\r\n\r\n",
        app.addr, app.token
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).await.expect("response head");
        head.push(byte[0]);
    }
    assert!(
        String::from_utf8_lossy(&head).starts_with("HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    stream
}

/// A client frame: FIN, `opcode`, masked with a zero key (or unmasked), `payload`.
fn frame(opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = vec![0x80 | opcode];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        len if len < 126 => out.push(mask_bit | len as u8),
        len if len <= u16::MAX as usize => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    if masked {
        out.extend_from_slice(&[0, 0, 0, 0]);
    }
    out.extend_from_slice(payload);
    out
}

/// Reads server frames until a close frame; returns its code (`None`: the connection
/// ended without one).
async fn close_code(stream: &mut TcpStream) -> Option<u16> {
    let read = async {
        loop {
            let mut head = [0u8; 2];
            stream.read_exact(&mut head).await.ok()?;
            let mut len = u64::from(head[1] & 0x7f);
            if len == 126 {
                let mut ext = [0u8; 2];
                stream.read_exact(&mut ext).await.ok()?;
                len = u64::from(u16::from_be_bytes(ext));
            } else if len == 127 {
                let mut ext = [0u8; 8];
                stream.read_exact(&mut ext).await.ok()?;
                len = u64::from_be_bytes(ext);
            }
            let mut payload = vec![0u8; usize::try_from(len).ok()?];
            stream.read_exact(&mut payload).await.ok()?;
            if head[0] & 0x0f == 0x8 {
                return payload
                    .get(..2)
                    .map(|code| u16::from_be_bytes([code[0], code[1]]));
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .ok()
        .flatten()
}

#[tokio::test]
async fn protocol_errors_on_a_socket_get_their_close_codes() {
    let app = TestApp::spawn().await;
    let cases: [(&str, Vec<u8>, u16); 5] = [
        (
            "invalid UTF-8 in a text frame",
            frame(0x1, &[0xff, 0xfe, 0xfd], true),
            1007,
        ),
        ("an unmasked client frame", frame(0x1, b"{}", false), 1002),
        ("an unknown opcode", frame(0x3, b"x", true), 1002),
        (
            "a close frame with a reserved code",
            frame(0x8, &[0x03, 0xed], true),
            1002,
        ),
        (
            "a message over 64 KiB",
            frame(0x1, &vec![b'a'; 70 * 1024], true),
            1009,
        ),
    ];
    for (what, bytes, expected) in cases {
        let mut stream = raw_socket(&app).await;
        stream.write_all(&bytes).await.expect("write");
        assert_eq!(close_code(&mut stream).await, Some(expected), "{what}");
    }
    app.stop().await;
}
