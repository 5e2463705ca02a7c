//! `GET /api/v1/ws`: the upgrade is done here rather than by `warp::ws()`, whose fixed
//! 128 KiB read buffer per socket would make 10k idle sockets cost over a gigabyte.
//! Live frames are written into the socket by the hub's dispatcher ([`super::outbox`]);
//! the socket's own loop writes the opening and the replay, writes what the socket
//! could not take at once as the peer reads, answers pings and `subscribe`, pings the
//! peer, and closes with 4008 when the hub kicks it or the peer stops reading.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warp::Reply;

use super::error::ApiError;
use super::extract::{AppState, Response};
use super::outbox::{ConnIo, Outbox};
use crate::engine::EngineError;
use crate::hub::Attachment;
use crate::protocol::{ClientFrame, ControlFrame, EventId};

pub use crate::protocol::{CLOSE_SLOW_CONSUMER, CLOSE_TOKEN_EXPIRED, WS_PATH};
/// How long one batch of writes may take before the peer counts as stuck.
const WRITE_TIMEOUT: Duration = Duration::from_secs(20);
/// Client frames are small; the read buffer grows for the rare larger one.
const READ_BUFFER: usize = 512;

fn socket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_write_buffer_size(4 * 1024 * 1024)
        .max_message_size(Some(64 * 1024))
        .max_frame_size(Some(64 * 1024))
}

/// Answers the upgrade request and, once hyper hands over the connection, runs the
/// socket on `tracker` until it closes or `shutdown` fires.
pub async fn upgrade(
    state: Arc<AppState>,
    mut request: http::Request<Incoming>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) -> Response {
    let query = request.uri().query().unwrap_or_default().to_owned();
    let params = match super::query::parse_query(&query) {
        Ok(params) => params,
        Err(err) => return err.into_response(),
    };
    let header_token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let principal = match (&header_token, params.get("access_token")) {
        (Some(header), _) => state.principal(Some(header)),
        (None, Some(token)) => state.principal(Some(&format!("Bearer {token}"))),
        (None, None) => Err(ApiError::InvalidToken),
    };
    let principal = match principal {
        Ok(principal) => principal,
        Err(err) => return err.into_response(),
    };
    let token_expires = tokio::time::Instant::now()
        + Duration::from_secs(principal.expires_at.saturating_sub(unix_now()));
    // `?project_ids=a,b`: subscribed from the first frame on, replay included
    let projects: Option<Vec<String>> = params.get("project_ids").map(|list| {
        list.split(',')
            .filter(|id| !id.is_empty())
            .map(str::to_owned)
            .collect()
    });
    let resume_from: Option<EventId> = match params.get("last_event_id").map(|raw| raw.parse()) {
        None => None,
        Some(Ok(id)) => Some(id),
        Some(Err(_)) => {
            return ApiError::InvalidRequest("last_event_id must be an event id".into())
                .into_response();
        }
    };
    let accept = match handshake_accept(request.headers()) {
        Ok(accept) => accept,
        Err(err) => return err.into_response(),
    };
    // a place for the socket before it is accepted: held until its task ends
    let place = match state.sockets.take(&principal.user) {
        Ok(place) => place,
        Err(full) => {
            state.metrics.ws_rejected(full.as_str());
            let message = match full {
                super::slots::Full::User => format!(
                    "you hold {} WebSocket connections to this hub, the most one user may (HIVESYNC_WS_PER_USER); close one first",
                    state.config.ws_per_user
                ),
                super::slots::Full::Total => {
                    "this hub holds as many WebSocket connections as it may (HIVESYNC_WS_MAX); try again later"
                        .to_owned()
                }
            };
            return ApiError::TooManyConnections(message).into_response();
        }
    };
    let on_upgrade = hyper::upgrade::on(&mut request);
    let hub = Arc::clone(&state.hub);
    let idle_timeout = state.config.ws_idle_timeout;
    let state_for_task = Arc::clone(&state);
    tracker.spawn(async move {
        let _place = place;
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(err) => {
                tracing::debug!(error = %err, "websocket upgrade did not complete");
                return;
            }
        };
        // the TCP stream itself, so the dispatcher can write to it directly
        let (stream, prefix) = match upgraded
            .downcast::<TokioIo<super::reject::JsonRejects<tokio::net::TcpStream>>>()
        {
            Ok(parts) => (parts.io.into_inner().into_inner(), parts.read_buf),
            Err(_) => {
                tracing::error!("a websocket upgrade over something other than the server's TCP stream");
                return;
            }
        };
        let outbox = Outbox::new(stream, hub.queue_capacity());
        let io = ConnIo::new(Arc::clone(&outbox), prefix);
        let socket =
            WebSocketStream::from_raw_socket(io, Role::Server, Some(socket_config())).await;
        let sink: Arc<dyn crate::hub::FrameSink> = outbox.clone();
        let attachment = match hub.attach(&principal.user, resume_from, projects, sink).await {
            Ok(attachment) => attachment,
            Err(err) => {
                tracing::error!(error = %crate::error::error_chain(&err), "could not attach a websocket");
                let mut socket = socket;
                let _ = close(&mut socket, &outbox, CloseCode::Error, "backend_error").await;
                return;
            }
        };
        let metrics = &state_for_task.metrics;
        metrics.ws_connections_total.inc();
        let handle = attachment.handle();
        let connection_id = attachment.connection_id.clone();
        // a token of its own: the loop looks at it on every wake-up, and looking at
        // one token shared by every socket takes one lock shared by every socket
        let shutdown = shutdown.child_token();
        let end = drive(socket, &outbox, attachment, idle_timeout, token_expires, &shutdown).await;
        hub.detach(&handle);
        match end {
            End::SlowConsumer => metrics.kicked("slow_consumer"),
            End::Idle => metrics.kicked("idle"),
            End::TokenExpired => metrics.kicked("token_expired"),
            End::ProtocolError => metrics.kicked("protocol_error"),
            End::ClientClosed | End::Shutdown | End::Broken => {}
        }
        tracing::debug!(%connection_id, end = ?end, "websocket closed");
    });
    let reply = warp::reply::with_header(warp::reply(), header::UPGRADE, "websocket");
    let reply = warp::reply::with_header(reply, header::CONNECTION, "Upgrade");
    let reply = warp::reply::with_header(reply, header::SEC_WEBSOCKET_ACCEPT, accept);
    warp::reply::with_status(reply, StatusCode::SWITCHING_PROTOCOLS).into_response()
}

/// Checks the RFC 6455 handshake headers and derives `Sec-WebSocket-Accept`.
fn handshake_accept(headers: &HeaderMap) -> Result<String, ApiError> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|part| part.trim().eq_ignore_ascii_case(token))
            })
    };
    if !has_token(header::UPGRADE, "websocket") || !has_token(header::CONNECTION, "upgrade") {
        return Err(ApiError::InvalidRequest(
            "this endpoint only speaks WebSocket".into(),
        ));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .and_then(|v| v.to_str().ok())
        != Some("13")
    {
        return Err(ApiError::InvalidRequest(
            "Sec-WebSocket-Version must be 13".into(),
        ));
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or_else(|| ApiError::InvalidRequest("Sec-WebSocket-Key is missing".into()))?;
    Ok(tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes()))
}

/// How long a close waits for the peer's close reply.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, PartialEq, Eq)]
enum End {
    ClientClosed,
    SlowConsumer,
    Idle,
    Shutdown,
    TokenExpired,
    ProtocolError,
    Broken,
}

fn text(json: Bytes) -> Message {
    // every frame is serde_json output, so valid UTF-8
    Message::Text(Utf8Bytes::try_from(json).unwrap_or_else(|_| Utf8Bytes::from_static("{}")))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|since| since.as_secs())
        .unwrap_or_default()
}

/// The close frame for a frame the client got wrong, by RFC 6455's codes; `None` for
/// a broken connection, which gets no close frame.
fn protocol_close(err: &WsError) -> Option<(CloseCode, &'static str)> {
    match err {
        WsError::Capacity(_) => Some((CloseCode::Size, "message too big")),
        WsError::Utf8(_) => Some((CloseCode::Invalid, "text frame is not valid UTF-8")),
        WsError::Protocol(_) => Some((CloseCode::Protocol, "protocol error")),
        _ => None,
    }
}

async fn drive(
    mut socket: WebSocketStream<ConnIo>,
    outbox: &Outbox,
    attachment: Attachment,
    idle_timeout: Duration,
    token_expires: tokio::time::Instant,
    shutdown: &CancellationToken,
) -> End {
    let Attachment {
        opening,
        mut replay,
        kicked,
        subscription,
        ..
    } = attachment;
    outbox.start(subscription);
    for frame in opening {
        if outbox.write_bytes(crate::hub::text_frame(&frame)).is_err() {
            return End::Broken;
        }
    }
    if replay.is_none() && outbox.release().is_err() {
        kicked.cancel();
    }

    let mut pinger = tokio::time::interval(idle_timeout / 3);
    pinger.tick().await;
    // a silent peer is dropped when its idle time is up, not at the next ping after
    let idle = tokio::time::sleep(idle_timeout);
    // made once: a cancellation future registers with its token when created, and
    // making them anew on every wake-up costs more than the wake-up's work
    let shutting_down = shutdown.cancelled();
    let kicked_out = kicked.cancelled();
    let expired = tokio::time::sleep_until(token_expires);
    tokio::pin!(shutting_down, kicked_out, expired, idle);
    loop {
        // frames the socket could not take at once wait in the outbox; when the peer
        // has read none of them for the write timeout, it counts as stuck (checked
        // here too: a busy select might not get to its timer)
        let waiting_since = outbox.progress_at();
        let stuck_at = waiting_since.map_or(token_expires, |since| since + WRITE_TIMEOUT);
        if waiting_since.is_some() && tokio::time::Instant::now() >= stuck_at {
            return kick(&mut socket, outbox).await;
        }
        tokio::select! {
            biased;
            _ = &mut shutting_down => {
                let _ = close(&mut socket, outbox, CloseCode::Away, "server shutting down").await;
                return End::Shutdown;
            }
            _ = &mut kicked_out => return kick(&mut socket, outbox).await,
            _ = &mut expired => {
                let _ = close(&mut socket, outbox, CloseCode::from(CLOSE_TOKEN_EXPIRED), "token expired; reconnect with a fresh token and last_event_id").await;
                return End::TokenExpired;
            }
            incoming = socket.next() => {
                let message = match incoming {
                    Some(Ok(message)) => message,
                    Some(Err(err)) => {
                        if let Some((code, reason)) = protocol_close(&err) {
                            let _ = close(&mut socket, outbox, code, reason).await;
                            return End::ProtocolError;
                        }
                        return End::Broken;
                    }
                    None => return End::Broken,
                };
                idle.as_mut().reset(tokio::time::Instant::now() + idle_timeout);
                match message {
                    Message::Text(raw) => {
                        match serde_json::from_str::<ClientFrame>(raw.as_str()) {
                            Ok(ClientFrame::Ping) => {
                                let pong = crate::hub::control_json(&ControlFrame::Pong);
                                if let Err(failed) = send_now(&mut socket, &kicked, text(pong)).await {
                                    return failed.end(&mut socket, outbox).await;
                                }
                            }
                            Ok(ClientFrame::Subscribe { project_ids }) => outbox.narrow_to(project_ids),
                            Err(_) => {
                                let error = serde_json::json!({"type": "error", "error": "invalid_request", "message": "unknown or malformed frame"});
                                if let Err(failed) = send_now(&mut socket, &kicked, text(Bytes::from(error.to_string()))).await {
                                    return failed.end(&mut socket, outbox).await;
                                }
                            }
                        }
                    }
                    Message::Close(_) => {
                        // tungstenite queued the reply (an echo, or 1002 for a close code
                        // the peer may not send): send it before going, and nothing after
                        outbox.closing();
                        let _ = tokio::time::timeout(WRITE_TIMEOUT, socket.flush()).await;
                        return End::ClientClosed;
                    }
                    // tungstenite answers pings itself; pongs and binary only prove liveness
                    _ => {}
                }
            }
            // missed events of a resume, a page at a time, each written before the
            // next is read; client frames are read first, so a subscribe applies to
            // the rest; live frames are held until the last page is out
            page = next_page(&mut replay), if replay.is_some() && waiting_since.is_none() => {
                match page {
                    Ok(Some(events)) => {
                        let frames: Vec<Arc<crate::hub::Frame>> =
                            events.iter().map(crate::hub::Frame::from_event).collect();
                        outbox.write_frames(&frames);
                    }
                    Ok(None) => {
                        replay = None;
                        if outbox.release().is_err() {
                            kicked.cancel();
                        }
                    }
                    Err(EngineError::ReplayGap) => {
                        // the history moved past this replay: the client must resync
                        let resync = crate::hub::control_json(&ControlFrame::ResyncRequired);
                        if let Err(failed) = send_now(&mut socket, &kicked, text(resync)).await {
                            return failed.end(&mut socket, outbox).await;
                        }
                        let _ = close(&mut socket, outbox, CloseCode::from(CLOSE_SLOW_CONSUMER), "history moved on; resync").await;
                        return End::SlowConsumer;
                    }
                    Err(err) => {
                        tracing::warn!(error = %crate::error::error_chain(&err), "replay read failed; the client resumes");
                        let _ = close(&mut socket, outbox, CloseCode::from(CLOSE_SLOW_CONSUMER), "replay interrupted; resume with last_event_id").await;
                        return End::SlowConsumer;
                    }
                }
            }
            drained = std::future::poll_fn(|cx| outbox.poll_drain(cx)), if waiting_since.is_some() => {
                if drained.is_err() {
                    return End::Broken;
                }
            }
            // the dispatcher queued what the socket could not take: look again
            _ = outbox.queued() => {}
            _ = tokio::time::sleep_until(stuck_at), if waiting_since.is_some() => {}
            _ = &mut idle => {
                let _ = close(&mut socket, outbox, CloseCode::Away, "no traffic from the client").await;
                return End::Idle;
            }
            _ = pinger.tick() => {
                if let Err(failed) = send_now(&mut socket, &kicked, Message::Ping(Bytes::new())).await {
                    return failed.end(&mut socket, outbox).await;
                }
            }
        }
    }
}

async fn next_page(
    replay: &mut Option<crate::hub::Replay>,
) -> Result<Option<Vec<crate::protocol::Event>>, EngineError> {
    match replay {
        Some(replay) => replay.next_page().await,
        None => Ok(None),
    }
}

/// Why a write of the socket's own did not go out.
enum SendFailed {
    /// the connection is gone
    Broken,
    /// the peer has not read for the write timeout, or the hub kicked it meanwhile
    Stuck,
}

impl SendFailed {
    async fn end(self, socket: &mut WebSocketStream<ConnIo>, outbox: &Outbox) -> End {
        match self {
            SendFailed::Broken => End::Broken,
            SendFailed::Stuck => kick(socket, outbox).await,
        }
    }
}

/// Writes `message` and waits until it is out (behind whatever waited before it),
/// giving up when the hub kicks the connection meanwhile or the write times out.
async fn send_now(
    socket: &mut WebSocketStream<ConnIo>,
    kicked: &CancellationToken,
    message: Message,
) -> Result<(), SendFailed> {
    tokio::select! {
        biased;
        _ = kicked.cancelled() => Err(SendFailed::Stuck),
        sent = tokio::time::timeout(WRITE_TIMEOUT, socket.send(message)) => match sent {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(SendFailed::Broken),
            Err(_) => Err(SendFailed::Stuck),
        },
    }
}

/// The connection fell too far behind (or stopped reading): what waits for it is let
/// go and it is closed with 4008; it resumes from the last id it got.
async fn kick(socket: &mut WebSocketStream<ConnIo>, outbox: &Outbox) -> End {
    outbox.abandon();
    let _ = close(
        socket,
        outbox,
        CloseCode::from(CLOSE_SLOW_CONSUMER),
        "client too slow; resume with last_event_id",
    )
    .await;
    End::SlowConsumer
}

/// Sends a close frame (after what already waits, and with no live frame after it)
/// and waits briefly for the peer's.
async fn close(
    socket: &mut WebSocketStream<ConnIo>,
    outbox: &Outbox,
    code: CloseCode,
    reason: &'static str,
) -> Result<(), ()> {
    outbox.closing();
    let frame = CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    };
    let closing = async {
        socket.close(Some(frame)).await.map_err(|_| ())?;
        // wait briefly for the peer's close reply, so the close handshake completes
        while let Some(Ok(message)) = socket.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
        Ok(())
    };
    tokio::time::timeout(CLOSE_WAIT, closing)
        .await
        .map_err(|_| ())?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::embedded::EmbeddedEngine;
    use crate::hub::Hub;

    /// On a paused clock (timers fire exactly when due): a peer that sends one frame
    /// and then stays silent is dropped `idle` after that frame, not at the next ping
    /// tick after it (which would be up to a third of `idle` later).
    #[tokio::test(flavor = "current_thread")]
    async fn a_silent_peer_is_dropped_exactly_at_the_idle_timeout_after_its_last_frame() {
        let dir = tempfile::tempdir().expect("temp dir");
        let engine =
            EmbeddedEngine::open(dir.path(), (100, Duration::from_secs(60)), 10).expect("engine");
        let hub = Hub::new(engine, 16);
        let (server_stream, client_stream) = super::super::outbox::tests::tcp_pair().await;
        let outbox = Outbox::new(server_stream, 16);
        let server = WebSocketStream::from_raw_socket(
            ConnIo::new(Arc::clone(&outbox), Bytes::new()),
            Role::Server,
            None,
        )
        .await;
        let mut client = WebSocketStream::from_raw_socket(client_stream, Role::Client, None).await;
        let attachment = hub
            .attach("alice", None, None, outbox.clone())
            .await
            .expect("attach");

        tokio::time::pause();
        let idle = Duration::from_secs(3);
        let far = tokio::time::Instant::now() + Duration::from_secs(3600);
        let driver = tokio::spawn(async move {
            let shutdown = CancellationToken::new();
            drive(server, &outbox, attachment, idle, far, &shutdown).await
        });
        // half-way through the first idle period the peer speaks once, then never again
        // (it does not read either, so it answers none of the server's pings)
        tokio::time::sleep(idle / 2).await;
        client
            .send(Message::Text(r#"{"type":"ping"}"#.into()))
            .await
            .expect("send");
        let spoke = tokio::time::Instant::now();
        let end = tokio::time::timeout(Duration::from_secs(60), driver)
            .await
            .expect("the peer was dropped at all")
            .expect("driver");
        assert_eq!(end, End::Idle);
        // the close frame went out `idle` after the last frame; then the server waited
        // CLOSE_WAIT for a close reply that a silent peer never sends
        let dropped = tokio::time::Instant::now() - spoke - CLOSE_WAIT;
        assert!(
            dropped >= idle && dropped < idle + Duration::from_millis(20),
            "dropped {dropped:?} after the last frame, idle timeout {idle:?}"
        );
    }
}
