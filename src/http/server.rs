//! The accept loop: hyper's HTTP/1 server, routing the WebSocket path to our own
//! upgrade and everything else to the warp routes.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;

use super::reject::JsonRejects;
use super::{AppState, routes, ws};

/// Serves on `listener` until `shutdown`: then stops accepting, lets in-flight requests
/// finish, and (through the same token) has every socket send its close frame. Socket
/// and connection tasks run on `tracker`, so the caller can wait for them.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let rest = warp::service(routes(Arc::clone(&state)));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                // out of file descriptors and the like: back off instead of spinning
                tracing::warn!(error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = Arc::clone(&state);
        let rest = rest.clone();
        let shutdown = shutdown.clone();
        let socket_tracker = tracker.clone();
        let connection_shutdown = shutdown.clone();
        tracker.spawn(async move {
            let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
                let state = Arc::clone(&state);
                let mut rest = rest.clone();
                let shutdown = shutdown.clone();
                let tracker = socket_tracker.clone();
                async move {
                    if request.uri().path() == ws::WS_PATH {
                        return Ok::<_, Infallible>(
                            ws::upgrade(state, request, shutdown, tracker).await,
                        );
                    }
                    rest.call(request).await
                }
            });
            let connection = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(JsonRejects::new(stream)), service)
                .with_upgrades();
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(err) = result {
                        tracing::debug!(error = %err, "http connection ended with an error");
                    }
                }
                _ = connection_shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(10), connection).await;
                }
            }
        });
    }
}
