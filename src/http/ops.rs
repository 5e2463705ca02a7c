//! What operators and load balancers ask: liveness, readiness, metrics and the
//! OpenAPI document. No token: these say nothing about any user.

use std::sync::Arc;

use http::StatusCode;
use warp::filters::BoxedFilter;
use warp::{Filter, Reply};

use super::extract::{AppState, Response, with_state};
use crate::config::Config;
use crate::engine::Engine;
use crate::protocol::Health;

/// `/healthz`, `/readyz`, `/metrics` and `/api/v1/openapi.json`.
pub(super) fn routes(state: &Arc<AppState>) -> Vec<BoxedFilter<(Response,)>> {
    let health = warp::path!("healthz").and(warp::get()).then(healthz);
    let openapi_json = warp::path!("api" / "v1" / "openapi.json")
        .and(warp::get())
        .map(super::openapi::document_response);
    let ready = warp::path!("readyz")
        .and(warp::get())
        .and(with_state(state))
        .then(readyz);
    let counters = warp::path!("metrics")
        .and(warp::get())
        .and(with_state(state))
        .then(metrics);
    vec![
        health.boxed(),
        openapi_json.boxed(),
        ready.boxed(),
        counters.boxed(),
    ]
}

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses(
        (status = 200, description = "the process is up", body = Health),
    )
)]
pub async fn healthz() -> Response {
    let body = Health {
        status: "ok".to_owned(),
        engine: None,
        engine_kind: None,
        data_dir_writable: None,
        free_bytes: None,
        min_free_bytes: None,
    };
    warp::reply::json(&body).into_response()
}

#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "ready: the engine answers and DATA_DIR is writable above its floor", body = Health),
        (status = 503, description = "not ready", body = Health),
    )
)]
pub async fn readyz(state: Arc<AppState>) -> Response {
    readiness(&state.engine, &state.config).await
}

/// Ready when the engine answers and DATA_DIR is writable with room above the floor:
/// the hub's `/readyz` and the worker's.
pub async fn readiness(engine: &Engine, config: &Config) -> Response {
    let engine = engine.store.ping().await;
    let data_dir = config.data_dir.clone();
    let writable = tokio::task::spawn_blocking(move || {
        let probe = data_dir.join(format!(".readyz-{}", uuid::Uuid::new_v4().simple()));
        std::fs::write(&probe, b"ok").and_then(|()| std::fs::remove_file(&probe))
    })
    .await;
    let writable = matches!(writable, Ok(Ok(())));
    let free = {
        let data_dir = config.data_dir.clone();
        tokio::task::spawn_blocking(move || crate::mirror::layout::free_bytes(&data_dir))
            .await
            .ok()
            .flatten()
    };
    let space_ok = free.is_some_and(|free| free >= config.min_free_bytes);
    let ready = engine.is_ok() && writable && space_ok;
    if let Err(err) = &engine {
        tracing::warn!(error = %crate::error::error_chain(err), "engine not reachable");
    }
    let body = Health {
        status: if ready { "ready" } else { "not_ready" }.to_owned(),
        engine: Some(engine.is_ok()),
        engine_kind: Some(
            if config.redis_url.is_some() {
                "redis"
            } else {
                "embedded"
            }
            .to_owned(),
        ),
        data_dir_writable: Some(writable),
        free_bytes: free,
        min_free_bytes: Some(config.min_free_bytes),
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    warp::reply::with_status(warp::reply::json(&body), status).into_response()
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (status = 200, description = "Prometheus metrics (OpenMetrics text)", content_type = "application/openmetrics-text", body = String),
    )
)]
pub async fn metrics(state: Arc<AppState>) -> Response {
    state
        .metrics
        .ws_connections
        .set(i64::try_from(state.hub.connection_count()).unwrap_or(i64::MAX));
    state
        .metrics
        .reader_repositories
        .set(i64::try_from(state.reader.open_repositories()).unwrap_or(i64::MAX));
    render_metrics(&state.engine).await
}

/// The process's metrics, with the queue depth read from the engine now.
pub async fn render_metrics(engine: &Engine) -> Response {
    let metrics = &engine.metrics;
    // a queue that cannot be read keeps its last value; the scrape still answers
    if let Ok(depth) = engine.queue.depth().await {
        metrics
            .queue_depth
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
    }
    metrics.set_snapshot_watches(crate::mirror::watch::watched_directories());
    warp::reply::with_header(
        metrics.render(),
        "content-type",
        crate::metrics::CONTENT_TYPE,
    )
    .into_response()
}
