//! Syncs: request one, read one, list a project's, and the caller's events as the
//! socket would have sent them (the REST fallback for clients without a socket).

use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use warp::Filter;
use warp::filters::BoxedFilter;

use super::error::ApiError;
use super::extract::{
    AppState, Caller, Response, authed, capped_body, owned_project, parse_json, query_map,
    raw_query, respond,
};
use crate::domain::SyncId;
use crate::hub::MAX_REPLAY;
use crate::protocol::{
    ControlFrame, ErrorBody, ServerFrame, SyncAccepted, SyncRecord, SyncRequest, Trigger,
};

/// `/api/v1/repo/sync` (request, list), one sync, and `/api/v1/notifications`.
pub(super) fn routes(state: &Arc<AppState>) -> Vec<BoxedFilter<(Response,)>> {
    let sync = warp::path!("api" / "v1" / "repo" / "sync");
    let request = sync
        .and(warp::post())
        .and(authed(state))
        .and(capped_body())
        .then(|state, principal, body| async move {
            match request_sync(state, principal, body).await {
                Ok((status, accepted)) => respond(status, Ok(accepted)),
                Err(err) => err.into_response(),
            }
        });
    let list = sync
        .and(warp::get())
        .and(authed(state))
        .and(raw_query())
        .then(|state, principal, query| async move {
            respond(StatusCode::OK, list_syncs(state, principal, query).await)
        });
    let get = warp::path!("api" / "v1" / "repo" / "sync" / String)
        .and(warp::get())
        .and(authed(state))
        .then(|id, state, principal| async move {
            respond(StatusCode::OK, get_sync(state, principal, id).await)
        });
    let events = warp::path!("api" / "v1" / "notifications")
        .and(warp::get())
        .and(authed(state))
        .and(raw_query())
        .then(|state, principal, query| async move {
            respond(StatusCode::OK, notifications(state, principal, query).await)
        });
    vec![request.boxed(), list.boxed(), get.boxed(), events.boxed()]
}

const DEFAULT_SYNC_LIST: usize = 20;
const MAX_SYNC_LIST: usize = 100;
const DEFAULT_NOTIFICATIONS: usize = 100;

/// `202` with a new sync, `200` when the request joined the one already active.
#[utoipa::path(
    post,
    path = "/api/v1/repo/sync",
    tag = "syncs",
    request_body = SyncRequest,
    responses(
        (status = 202, description = "a sync was queued (or a follow-up of a running one)", body = SyncAccepted),
        (status = 200, description = "joined the sync already waiting (`coalesced`)", body = SyncAccepted),
        (status = 400, description = "a malformed or invalid request (invalid_request)", body = ErrorBody),
        (status = 404, description = "no such project, or another user's: the two answer alike (project_not_found)", body = ErrorBody),
        (status = 413, description = "the body is over 64 KiB (payload_too_large)", body = ErrorBody),
        (status = 429, description = "over the per-user sync rate (rate_limited); Retry-After says when", body = ErrorBody),
        (status = 507, description = "the mirror volume is below its free-space floor (storage_full)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn request_sync(
    state: Arc<AppState>,
    principal: Caller,
    body: Result<Bytes, ApiError>,
) -> Result<(StatusCode, SyncAccepted), ApiError> {
    let principal = principal?;
    let request: SyncRequest = parse_json(body)?;
    let project = owned_project(&state, &principal, &request.project_id).await?;
    state.metrics.sync_requests.inc();
    if let Err(retry_after) = state
        .engine
        .store
        .admit_sync_request(&principal.user)
        .await?
    {
        return Err(ApiError::RateLimited { retry_after });
    }
    let data_dir = state.config.data_dir.clone();
    let free = tokio::task::spawn_blocking(move || crate::mirror::layout::free_bytes(&data_dir))
        .await
        .ok()
        .flatten();
    if free.is_some_and(|free| free < state.config.min_free_bytes) {
        return Err(ApiError::StorageFull);
    }
    let (record, created) = state.engine.start_sync(&project, Trigger::Api).await?;
    if !created {
        state.metrics.syncs_coalesced.inc();
    }
    let status = if created {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((status, SyncAccepted::of(record, created)))
}

#[utoipa::path(
    get,
    path = "/api/v1/repo/sync/{sync_id}",
    tag = "syncs",
    params(("sync_id" = String, Path, description = "the sync's id")),
    responses(
        (status = 200, description = "the sync record", body = SyncRecord),
        (status = 404, description = "no such sync, or another user's: the two answer alike (sync_not_found)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_sync(
    state: Arc<AppState>,
    principal: Caller,
    id: String,
) -> Result<SyncRecord, ApiError> {
    let principal = principal?;
    let id = SyncId::parse(&id).ok_or(ApiError::SyncNotFound)?;
    let record = state
        .engine
        .store
        .sync(&id)
        .await?
        .ok_or(ApiError::SyncNotFound)?;
    let project = state
        .engine
        .store
        .project(&record.project_id)
        .await?
        .ok_or(ApiError::SyncNotFound)?;
    if project.owner != principal.user {
        return Err(ApiError::SyncNotFound);
    }
    Ok(record)
}

#[utoipa::path(
    get,
    path = "/api/v1/repo/sync",
    tag = "syncs",
    params(("project_id" = String, Query, description = "the project's id"), ("limit" = Option<u32>, Query, description = "at most this many, newest first (default 20)", minimum = 1, maximum = 100)),
    responses(
        (status = 200, description = "the project's syncs, newest first", body = [SyncRecord]),
        (status = 400, description = "a malformed or invalid request (invalid_request)", body = ErrorBody),
        (status = 404, description = "no such project, or another user's: the two answer alike (project_not_found)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list_syncs(
    state: Arc<AppState>,
    principal: Caller,
    query: String,
) -> Result<Vec<SyncRecord>, ApiError> {
    let principal = principal?;
    let query = query_map(&query)?;
    let project_id = query
        .get("project_id")
        .ok_or_else(|| ApiError::InvalidRequest("project_id is required".into()))?;
    let limit = super::query::parse_limit(
        query.get("limit").map(String::as_str),
        DEFAULT_SYNC_LIST,
        MAX_SYNC_LIST,
    )?;
    let project = owned_project(&state, &principal, project_id).await?;
    Ok(state
        .engine
        .store
        .syncs_of(&project.project_id, limit)
        .await?)
}

/// The caller's events after `after`, exactly as the socket sends them; a resume point
/// older than the kept history comes back as a lone `resync_required` frame first.
#[utoipa::path(
    get,
    path = "/api/v1/notifications",
    tag = "events",
    params(("after" = Option<i64>, Query, description = "events after this id (default 0)", minimum = 0), ("limit" = Option<u32>, Query, description = "at most this many (default 100)", minimum = 1, maximum = 10000)),
    responses(
        (status = 200, description = "the caller's events after `after`, as the socket sends them", body = [ServerFrame]),
        (status = 400, description = "a malformed or invalid request (invalid_request)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn notifications(
    state: Arc<AppState>,
    principal: Caller,
    query: String,
) -> Result<Vec<ServerFrame>, ApiError> {
    let principal = principal?;
    let query = query_map(&query)?;
    // ids are signed 64-bit in Redis (INCR): a larger number is no event id
    let after = match query.get("after") {
        None => 0,
        Some(raw) => raw
            .parse::<i64>()
            .ok()
            .and_then(|id| u64::try_from(id).ok())
            .ok_or_else(|| ApiError::InvalidRequest("after must be an event id".into()))?,
    };
    let limit = super::query::parse_limit(
        query.get("limit").map(String::as_str),
        DEFAULT_NOTIFICATIONS,
        MAX_REPLAY,
    )?;
    let history = state
        .engine
        .events
        .after(&principal.user, after, limit)
        .await?;
    let mut frames = Vec::with_capacity(history.events.len() + 1);
    if history.gap && after > 0 {
        frames.push(ServerFrame::Control(ControlFrame::ResyncRequired));
    }
    frames.extend(history.events.into_iter().map(ServerFrame::Event));
    Ok(frames)
}
