//! One WebSocket client of the fan-out: connects to its target, reads frames, checks
//! its sequence per user (lost, duplicated), times each event and resumes after a
//! slow-consumer close.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::Target;
use super::tally::{Phase, Tally, now_nanos};

/// The number after `key` in `text` (e.g. `"id":` → 42).
pub(super) fn number_after(text: &str, key: &str) -> Option<u64> {
    let start = text.find(key)? + key.len();
    let digits = text[start..].bytes().take_while(u8::is_ascii_digit).count();
    text[start..start + digits].parse().ok()
}

/// (sequence number, emit time in ns) of one event frame.
pub(super) fn parse_frame(target: Target, text: &str) -> Option<(u64, u64)> {
    match target {
        Target::Embedded | Target::Redis | Target::RedisCluster => Some((
            number_after(text, "{\"id\":")?,
            number_after(text, "\"sync_id\":\"t")?,
        )),
        Target::Socketio => {
            let body = text.strip_prefix("42")?;
            Some((number_after(body, "\"s\":")?, number_after(body, "\"t\":")?))
        }
    }
}

pub(super) type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens one client and returns it with the last sequence number it has seen.
pub(super) async fn open_client(target: Target, url: &str) -> Result<(Socket, u64), String> {
    // tungstenite zero-fills the free part of its read buffer before every read, so a
    // large one costs a memset per frame: 4 KiB holds a dozen events
    let config = WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0);
    let request = url.into_client_request().map_err(|e| e.to_string())?;
    let (mut socket, _) = tokio_tungstenite::connect_async_with_config(request, Some(config), true)
        .await
        .map_err(|e| format!("connect {url}: {e}"))?;
    let first = next_text(&mut socket).await?;
    match target {
        Target::Embedded | Target::Redis | Target::RedisCluster => {
            let hello: Value = serde_json::from_str(&first).map_err(|e| e.to_string())?;
            let last = hello["last_event_id"]
                .as_u64()
                .ok_or("hello without last_event_id")?;
            Ok((socket, last))
        }
        Target::Socketio => {
            // Engine.IO open packet, then the Socket.IO connect handshake
            if !first.starts_with('0') {
                return Err(format!("unexpected engine.io open: {first}"));
            }
            socket
                .send(Message::Text("40".into()))
                .await
                .map_err(|e| e.to_string())?;
            loop {
                let reply = next_text(&mut socket).await?;
                if reply.starts_with("40") {
                    return Ok((socket, 0));
                }
                if reply == "2" {
                    socket
                        .send(Message::Text("3".into()))
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
        }
    }
}

pub(super) async fn next_text(socket: &mut Socket) -> Result<String, String> {
    loop {
        match socket.next().await {
            Some(Ok(Message::Text(text))) => return Ok(text.to_string()),
            Some(Ok(Message::Close(frame))) => return Err(format!("closed: {frame:?}")),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("closed".into()),
        }
    }
}

/// Reads events until `stop`, checking the sequence and timing each one. A socket
/// the server closes (4008 when it falls behind) resumes from its last id, as the
/// protocol says a client should; Socket.IO has no resume, so its losses stand.
pub(super) async fn run_client(
    target: Target,
    url: String,
    mut socket: Socket,
    mut last: u64,
    shard: usize,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) -> u64 {
    // latencies go to the shared histograms in batches; a histogram per client would
    // cost more memory than the hub under test
    let mut steady: Vec<u64> = Vec::with_capacity(256);
    let mut burst: Vec<u64> = Vec::with_capacity(256);
    // one timer for the client's life, reset when it fires: a new one per frame cost
    // a timer-wheel insert and removal per event
    let check_stop = tokio::time::sleep(Duration::from_millis(200));
    tokio::pin!(check_stop);
    loop {
        let message = tokio::select! {
            message = socket.next() => message,
            _ = &mut check_stop => {
                if stop.load(Ordering::Relaxed) { break; }
                check_stop.as_mut().reset(tokio::time::Instant::now() + Duration::from_millis(200));
                continue;
            }
        };
        let text = match message {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                if stop.load(Ordering::Relaxed) || target == Target::Socketio {
                    break;
                }
                match open_client(target, &format!("{url}&last_event_id={last}")).await {
                    Ok((resumed, from)) => {
                        tally.resumed.fetch_add(1, Ordering::Relaxed);
                        if from > last {
                            // resync_required: the gap is gone for good
                            tally.lost.fetch_add(from - last, Ordering::Relaxed);
                            last = from;
                        }
                        socket = resumed;
                        continue;
                    }
                    Err(_) => break,
                }
            }
            Some(Ok(_)) => continue,
        };
        if target == Target::Socketio && text.as_str() == "2" {
            let _ = socket.send(Message::Text("3".into())).await;
            continue;
        }
        let received_at = now_nanos();
        let Some((seq, emitted)) = parse_frame(target, text.as_str()) else {
            continue;
        };
        if seq <= last {
            tally.duplicated.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if seq > last + 1 {
            tally.lost.fetch_add(seq - last - 1, Ordering::Relaxed);
        }
        last = seq;
        // burst events are stamped with the burst's start; the Socket.IO peer carries
        // the stamp as a JavaScript number (a double), which rounds nanoseconds by up
        // to 128, so the boundary gets 1 µs of slack (steady events are ≥ 1 ms apart)
        let in_burst = emitted.saturating_add(1_000) >= tally.burst_start.load(Ordering::Relaxed);
        let (phase, local) = if in_burst {
            (&tally.burst, &mut burst)
        } else {
            (&tally.steady, &mut steady)
        };
        phase.received.fetch_add(1, Ordering::Relaxed);
        phase
            .first_receipt
            .fetch_min(received_at, Ordering::Relaxed);
        phase.last_receipt.fetch_max(received_at, Ordering::Relaxed);
        local.push((received_at.saturating_sub(emitted) / 1000).max(1));
        if local.len() >= 256 {
            flush_latencies(phase, shard, local).await;
        }
    }
    flush_latencies(&tally.steady, shard, &mut steady).await;
    flush_latencies(&tally.burst, shard, &mut burst).await;
    last
}

pub(super) async fn flush_latencies(phase: &Phase, shard: usize, local: &mut Vec<u64>) {
    let mut histogram = phase.latency[shard % phase.latency.len()].lock().await;
    for micros in local.drain(..) {
        histogram.saturating_record(micros);
    }
}
