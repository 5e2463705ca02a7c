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

use super::extract::AppState;
use super::reject::JsonRejects;
use super::{routes, ws};
use crate::metrics::HttpLabels;

/// The address a request's connection came from (no proxy's header believed).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub std::net::IpAddr);

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
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
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
            let service =
                hyper::service::service_fn(move |mut request: http::Request<Incoming>| {
                    request.extensions_mut().insert(Peer(peer.ip()));
                    let state = Arc::clone(&state);
                    let mut rest = rest.clone();
                    let shutdown = shutdown.clone();
                    let tracker = socket_tracker.clone();
                    async move {
                        let method = super::method_label(request.method());
                        let route = super::route_of(request.uri().path());
                        let metrics = Arc::clone(&state.metrics);
                        let response = if request.uri().path() == ws::WS_PATH {
                            ws::upgrade(state, request, shutdown, tracker).await
                        } else {
                            match rest.call(request).await {
                                Ok(response) => response,
                                Err(never) => match never {},
                            }
                        };
                        metrics
                            .http_requests
                            .get_or_create(&HttpLabels {
                                method,
                                route,
                                status: response.status().as_u16(),
                            })
                            .inc();
                        Ok::<_, Infallible>(response)
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

/// `hivesync worker`'s own listener: `/metrics`, `/healthz` and `/readyz` (the same
/// answers the hub gives), every other path a JSON 404; until `shutdown`.
pub async fn serve_ops(
    listener: TcpListener,
    engine: crate::engine::Engine,
    config: Arc<crate::config::Config>,
    shutdown: CancellationToken,
) {
    use warp::Filter;
    let healthz = warp::path!("healthz")
        .and(warp::get())
        .then(super::ops::healthz);
    let readyz = {
        let (engine, config) = (engine.clone(), Arc::clone(&config));
        warp::path!("readyz").and(warp::get()).then(move || {
            let (engine, config) = (engine.clone(), Arc::clone(&config));
            async move { super::ops::readiness(&engine, &config).await }
        })
    };
    let metrics = warp::path!("metrics").and(warp::get()).then(move || {
        let engine = engine.clone();
        async move { super::ops::render_metrics(&engine).await }
    });
    let routes = healthz
        .or(readyz)
        .unify()
        .or(metrics)
        .unify()
        .recover(super::recover)
        .unify();
    let service = warp::service(routes);
    let connections = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    tracing::warn!(error = %err, "metrics listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let service = service.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let mut service = service.clone();
                async move { service.call(request).await }
            });
            let connection = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(5), connection).await;
                }
            }
        });
    }
    connections.close();
    connections.wait().await;
}
