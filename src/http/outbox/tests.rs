use super::*;
use futures_util::StreamExt;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

/// A connected pair of loopback TCP streams: (server side, client side).
pub(crate) async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (accepted.expect("accept").0, client.expect("connect"))
}

fn frame(id: u64, payload: &str) -> Arc<Frame> {
    Arc::new(Frame {
        id,
        project_id: "p".into(),
        wire: crate::hub::text_frame(payload.as_bytes()),
    })
}

async fn client_of(stream: TcpStream) -> WebSocketStream<TcpStream> {
    WebSocketStream::from_raw_socket(stream, Role::Client, None).await
}

async fn next_text(client: &mut WebSocketStream<TcpStream>) -> String {
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(10), client.next())
            .await
            .expect("a frame in time")
            .expect("open")
            .expect("a valid frame")
        {
            Message::Text(text) => return text.to_string(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn live_frames_wait_for_the_replay_and_none_goes_out_twice() {
    let (server, client) = tcp_pair().await;
    let outbox = Outbox::new(server, 100);
    let mut client = client_of(client).await;
    outbox.start(Subscription::new(2));
    // live frames 4 and 5 arrive while the replay (3, 4) is being written
    outbox
        .offer(&[frame(4, "four"), frame(5, "five")])
        .expect("held");
    outbox.write_frames(&[frame(1, "old"), frame(3, "three"), frame(4, "four")]);
    outbox.release().expect("released");
    outbox.offer(&[frame(6, "six")]).expect("written");
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(next_text(&mut client).await);
    }
    assert_eq!(seen, ["three", "four", "five", "six"]);
}

#[tokio::test]
async fn frames_of_every_length_encoding_arrive_whole_and_in_order() {
    let (server, client) = tcp_pair().await;
    let outbox = Outbox::new(server, 100);
    let mut client = client_of(client).await;
    outbox.start(Subscription::new(0));
    outbox.release().expect("released");
    let lengths = [0usize, 5, 125, 126, 200, 65_535, 65_536, 70_000];
    let frames: Vec<Arc<Frame>> = lengths
        .iter()
        .enumerate()
        .map(|(at, len)| frame(at as u64 + 1, &"x".repeat(*len)))
        .collect();
    // one batch: written as one buffer
    outbox.offer(&frames).expect("offered");
    // the socket may not take 200 KiB at once: the rest waits for the drain
    let drain = {
        let outbox = Arc::clone(&outbox);
        tokio::spawn(async move { std::future::poll_fn(|cx| outbox.poll_drain(cx)).await })
    };
    let mut seen = Vec::new();
    for _ in &lengths {
        seen.push(next_text(&mut client).await.len());
    }
    drain.await.expect("drain task").expect("drained");
    assert_eq!(seen, lengths);
}

/// A peer that does not read: what the kernel will not take waits in the outbox,
/// in order behind a partly written frame; once the peer reads, everything
/// arrives in order, a control frame written meanwhile in its place.
#[tokio::test]
async fn a_peer_that_stops_reading_gets_what_waited_in_order_once_it_reads() {
    let (server, client) = tcp_pair().await;
    let outbox = Outbox::new(server, 100_000);
    outbox.start(Subscription::new(0));
    outbox.release().expect("released");
    let payload = "y".repeat(16 * 1024);
    let mut id = 0;
    // until the kernel's buffers are full and frames wait, then a few more
    while outbox.progress_at().is_none() {
        id += 1;
        outbox.offer(&[frame(id, &payload)]).expect("taken");
        assert!(id < 100_000, "the socket never filled");
    }
    for _ in 0..5 {
        id += 1;
        outbox.offer(&[frame(id, &payload)]).expect("taken");
    }
    outbox
        .write_bytes(crate::hub::text_frame(b"control"))
        .expect("queued");
    let mut client = client_of(client).await;
    let drain = {
        let outbox = Arc::clone(&outbox);
        tokio::spawn(async move { std::future::poll_fn(|cx| outbox.poll_drain(cx)).await })
    };
    for expected in 1..=id {
        let text = next_text(&mut client).await;
        assert_eq!(text.len(), payload.len(), "frame {expected} whole");
    }
    assert_eq!(next_text(&mut client).await, "control");
    drain.await.expect("drain task").expect("drained");
    assert!(outbox.progress_at().is_none());
}

/// Past its capacity a connection is too far behind: the offer says so, the
/// backlog is let go at once (memory does not grow while the socket's task gets to
/// the kick), and later frames are not taken.
#[tokio::test]
async fn past_the_capacity_the_backlog_is_let_go_and_nothing_more_is_taken() {
    let (server, _client) = tcp_pair().await;
    let outbox = Outbox::new(server, 8);
    outbox.start(Subscription::new(0));
    outbox.release().expect("released");
    let payload = "w".repeat(64 * 1024);
    let mut id = 0;
    let refused = loop {
        id += 1;
        if outbox.offer(&[frame(id, &payload)]).is_err() {
            break id;
        }
        assert!(id < 100_000, "never refused");
    };
    assert!(refused > 8);
    let waiting = outbox.lock().pending_frames;
    assert!(waiting <= 1, "{waiting} frames kept after the refusal");
    outbox.offer(&[frame(id + 1, &payload)]).expect("ignored");
    assert!(outbox.lock().pending_frames <= 1, "nothing more taken");
}

/// A peer that sends pings and never reads cannot grow the outbox without bound:
/// past the byte cap the socket's own writes wait.
#[tokio::test]
async fn the_sockets_own_writes_wait_past_the_byte_cap() {
    use tokio::io::AsyncWriteExt;
    let (server, _client) = tcp_pair().await;
    let outbox = Outbox::new(server, 1_000_000);
    let mut io = ConnIo::new(Arc::clone(&outbox), Bytes::new());
    let pong = [0x8a, 0x00];
    let mut accepted = 0usize;
    loop {
        match futures_util::FutureExt::now_or_never(io.write_all(&pong)) {
            Some(Ok(())) => accepted += pong.len(),
            Some(Err(err)) => panic!("write failed: {err}"),
            None => break,
        }
        assert!(accepted < 64 * 1024 * 1024, "the writes never waited");
    }
    let waiting = outbox.lock().pending_bytes;
    assert!(
        waiting <= MAX_PENDING_BYTES + pong.len(),
        "{waiting} bytes wait"
    );
}

/// Once the connection is closing, no live frame goes out after the close frame.
#[tokio::test]
async fn nothing_is_taken_after_the_close_begins() {
    let (server, client) = tcp_pair().await;
    let outbox = Outbox::new(server, 100);
    outbox.start(Subscription::new(0));
    outbox.release().expect("released");
    outbox.offer(&[frame(1, "before")]).expect("written");
    outbox.closing();
    outbox
        .write_bytes(Bytes::from_static(&[0x88, 0x02, 0x03, 0xe9]))
        .expect("close frame");
    outbox.offer(&[frame(2, "after")]).expect("ignored");
    let mut client = client_of(client).await;
    assert_eq!(next_text(&mut client).await, "before");
    match client.next().await.expect("open").expect("valid") {
        Message::Close(Some(close)) => assert_eq!(u16::from(close.code), 1001),
        other => panic!("expected the close, got {other:?}"),
    }
}

/// Abandoning a connection lets its backlog go but finishes a frame already begun,
/// so the close frame written after it is read as a close, not as garbage.
#[tokio::test]
async fn an_abandoned_backlog_ends_on_a_whole_frame() {
    let (server, client) = tcp_pair().await;
    let outbox = Outbox::new(server, 1_000);
    outbox.start(Subscription::new(0));
    outbox.release().expect("released");
    let payload = "z".repeat(100_000);
    // until frames wait beyond what the kernel took, then a few more
    let mut total = 0;
    while outbox.progress_at().is_none() {
        total += 1;
        outbox.offer(&[frame(total, &payload)]).expect("queued");
        assert!(total < 10_000, "the socket never filled");
    }
    for _ in 0..20 {
        total += 1;
        outbox.offer(&[frame(total, &payload)]).expect("queued");
    }
    outbox.abandon();
    let mut io = ConnIo::new(Arc::clone(&outbox), Bytes::new());
    {
        use tokio::io::AsyncWriteExt;
        // a close frame with code 4008, as tungstenite would write it
        io.write_all(&[0x88, 0x02, 0x0f, 0xa8])
            .await
            .expect("queued");
    }
    let mut client = client_of(client).await;
    let drain = {
        let outbox = Arc::clone(&outbox);
        tokio::spawn(async move { std::future::poll_fn(|cx| outbox.poll_drain(cx)).await })
    };
    let mut texts = 0;
    loop {
        match client
            .next()
            .await
            .expect("open")
            .expect("valid frames only")
        {
            Message::Text(text) => {
                assert_eq!(text.len(), payload.len());
                texts += 1;
            }
            Message::Close(Some(close)) => {
                assert_eq!(u16::from(close.code), 4008);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        texts < total,
        "the backlog was let go ({texts} of {total} arrived)"
    );
    drain.await.expect("drain task").expect("drained");
}
