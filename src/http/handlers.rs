//! Request handlers: plain async fns from extracted values to `Result<_, ApiError>`.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use warp::Reply;

use super::{ApiError, AppState, Caller, Response, parse_json};
use crate::auth::Principal;
use crate::config::Config;
use crate::domain::{ProjectId, RepoUrl, SyncId};
use crate::engine::{Engine, Project};
use crate::hub::MAX_REPLAY;
use crate::protocol::{
    ControlFrame, CreateProjectRequest, ErrorBody, Health, MobileProject, ProjectView, ServerFrame,
    SyncAccepted, SyncRecord, SyncRequest, Trigger,
};

const DEFAULT_SYNC_LIST: usize = 20;
const MAX_SYNC_LIST: usize = 100;
const DEFAULT_NOTIFICATIONS: usize = 100;

fn query_map(query: &str) -> Result<HashMap<String, String>, ApiError> {
    super::query::parse_query(query)
}

/// Loads a project of the caller: unknown or malformed ids and someone else's
/// project are all `project_not_found` (v1.2), so ids cannot be probed.
pub(super) async fn owned_project(
    state: &AppState,
    principal: &Principal,
    id: &str,
) -> Result<Project, ApiError> {
    let id = ProjectId::parse(id).ok_or(ApiError::ProjectNotFound)?;
    let project = state
        .engine
        .store
        .project(&id)
        .await?
        .ok_or(ApiError::ProjectNotFound)?;
    if project.owner != principal.user {
        return Err(ApiError::ProjectNotFound);
    }
    Ok(project)
}

#[utoipa::path(
    get,
    path = "/api/v1/projects",
    tag = "projects",
    responses(
        (status = 200, description = "the caller's projects", body = [ProjectView]),
    ),
    security(("bearer" = []))
)]
pub async fn list_projects(
    state: Arc<AppState>,
    principal: Caller,
) -> Result<Vec<ProjectView>, ApiError> {
    let principal = principal?;
    let projects = state.engine.store.projects_of(&principal.user).await?;
    Ok(projects.iter().map(Project::view).collect())
}

#[utoipa::path(
    post,
    path = "/api/v1/projects",
    tag = "projects",
    request_body = CreateProjectRequest,
    responses(
        (status = 201, description = "registered", body = ProjectView),
        (status = 400, description = "a malformed or invalid request (invalid_request)", body = ErrorBody),
        (status = 403, description = "the credential is not the caller's to use (forbidden), a mobile token, or the caller has HIVESYNC_MAX_PROJECTS projects (quota_exceeded)", body = ErrorBody),
        (status = 413, description = "the body is over 64 KiB (payload_too_large)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create_project(
    state: Arc<AppState>,
    principal: Caller,
    body: Result<Bytes, ApiError>,
) -> Result<ProjectView, ApiError> {
    let principal = principal?;
    let request: CreateProjectRequest = parse_json(body)?;
    let name = request.name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(ApiError::InvalidRequest(
            "name must be 1 to 200 characters".into(),
        ));
    }
    validate_branch(&request.branch)?;
    validate_interval(&state, request.sync_interval_s)?;
    let url = RepoUrl::parse(&request.repo_url, &state.config.url_policy())
        .map_err(|err| ApiError::InvalidRequest(err.to_string()))?;
    if let Some(credential) = &request.credential {
        check_credential(&state, &principal.user, credential, url.expose_secret())?;
    }
    let project = Project::new(
        ProjectId::generate().to_string(),
        name.to_owned(),
        url.expose_secret().to_owned(),
        request.branch,
        principal.user,
        request.credential,
        request.sync_interval_s,
    );
    {
        // one registration at a time on this hub, so a burst cannot pass the quota
        // between its count and its insert (hubs side by side may each let one by)
        let _one_at_a_time = state.registering.lock().await;
        let owned = state.engine.store.projects_of(&project.owner).await?.len();
        if owned >= state.config.max_projects_per_user {
            return Err(ApiError::QuotaExceeded(format!(
                "you have {owned} projects, the most one user may register (HIVESYNC_MAX_PROJECTS); delete one first"
            )));
        }
        state.engine.store.insert_project(&project).await?;
    }
    // the stored project carries its first due time
    let project_id = ProjectId::parse(&project.project_id).ok_or(ApiError::ProjectNotFound)?;
    let project = state
        .engine
        .store
        .project(&project_id)
        .await?
        .unwrap_or(project);
    tracing::info!(project_id = %project.project_id, repo_url = %url, "project registered");
    Ok(project.view())
}

fn validate_branch(branch: &str) -> Result<(), ApiError> {
    let full = format!("refs/heads/{branch}");
    let valid = !branch.is_empty()
        && branch.len() <= 255
        && !branch.starts_with('-')
        && gix::refs::FullName::try_from(full.as_str()).is_ok();
    if valid {
        Ok(())
    } else {
        Err(ApiError::InvalidRequest(format!(
            "'{branch}' is not a valid branch name"
        )))
    }
}

/// The longest interval a schedule may have: 30 days.
const MAX_SYNC_INTERVAL_S: u64 = 30 * 24 * 3600;

/// `sync_interval_s`: null, or from `HIVESYNC_MIN_SYNC_INTERVAL_S` to 30 days.
pub(super) fn validate_interval(state: &AppState, interval: Option<u64>) -> Result<(), ApiError> {
    let min = state.config.min_sync_interval.as_secs().max(1);
    match interval {
        Some(seconds) if !(min..=MAX_SYNC_INTERVAL_S).contains(&seconds) => {
            Err(ApiError::InvalidRequest(format!(
                "sync_interval_s must be null or from {min} to {MAX_SYNC_INTERVAL_S} seconds"
            )))
        }
        _ => Ok(()),
    }
}

/// A credential name is well-formed and the policy lets `user` send it to the host of
/// `repo_url` (403 otherwise).
pub(super) fn check_credential(
    state: &AppState,
    user: &str,
    credential: &str,
    repo_url: &str,
) -> Result<(), ApiError> {
    if !is_credential_name(credential) {
        return Err(ApiError::InvalidRequest(
            "credential must be a name of 1 to 64 letters, digits, '_', '-' or '.'".into(),
        ));
    }
    let host = RepoUrl::from_stored(repo_url.to_owned())
        .ok()
        .and_then(|url| url.host())
        .unwrap_or_default();
    let scopes = crate::worker::credentials::load_scopes(state.config.credential_scopes.as_deref())
        .map_err(|err| ApiError::Backend(err.into()))?;
    scopes
        .check(credential, user, &host)
        .map_err(|refusal| ApiError::CredentialForbidden(refusal.to_string()))
}

fn is_credential_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

#[utoipa::path(
    get,
    path = "/api/v1/projects/{project_id}",
    tag = "projects",
    params(("project_id" = String, Path, description = "the project's id")),
    responses(
        (status = 200, description = "the project", body = ProjectView),
        (status = 404, description = "no such project, or another user's: the two answer alike (project_not_found)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_project(
    state: Arc<AppState>,
    principal: Caller,
    id: String,
) -> Result<ProjectView, ApiError> {
    let principal = principal?;
    Ok(owned_project(&state, &principal, &id).await?.view())
}

#[utoipa::path(
    delete,
    path = "/api/v1/projects/{project_id}",
    tag = "projects",
    params(("project_id" = String, Path, description = "the project's id")),
    responses(
        (status = 204, description = "deleted, with its mirror and history"),
        (status = 404, description = "no such project, or another user's: the two answer alike (project_not_found)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn delete_project(
    state: Arc<AppState>,
    principal: Caller,
    id: String,
) -> Result<(), ApiError> {
    let principal = principal?;
    let project = owned_project(&state, &principal, &id).await?;
    let project_id = ProjectId::parse(&project.project_id).ok_or(ApiError::ProjectNotFound)?;
    state.engine.store.delete_project(&project_id).await?;
    state.reader.forget(&project_id);
    // the mirror goes under the project lock; while a worker holds it, that worker
    // removes the mirror when its job ends and finds the project gone
    crate::worker::remove_mirror(&state.engine, &state.layout, project_id).await?;
    Ok(())
}

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
    if crate::mirror::layout::free_bytes(&state.config.data_dir)
        .is_some_and(|free| free < state.config.min_free_bytes)
    {
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
    let project_id = ProjectId::parse(&record.project_id).ok_or(ApiError::SyncNotFound)?;
    let project = state
        .engine
        .store
        .project(&project_id)
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
    let id = ProjectId::parse(&project.project_id).ok_or(ApiError::ProjectNotFound)?;
    Ok(state.engine.store.syncs_of(&id, limit).await?)
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

#[utoipa::path(
    get,
    path = "/api/v1/mobile/projects",
    tag = "projects",
    responses(
        (status = 200, description = "the caller's projects, metadata only", body = [MobileProject]),
    ),
    security(("bearer" = []))
)]
pub async fn mobile_projects(
    state: Arc<AppState>,
    principal: Caller,
) -> Result<Vec<MobileProject>, ApiError> {
    let principal = principal?;
    let projects = state.engine.store.projects_of(&principal.user).await?;
    Ok(projects
        .into_iter()
        .map(|project| MobileProject {
            schedule: project.schedule_view(),
            project_id: project.project_id,
            name: project.name,
            branch: project.branch,
            last_status: project.last_status,
            last_synced_at: project.last_synced_at,
            commit: project.commit,
            sync_interval_s: project.sync_interval_s,
            last_attempt_at: project.last_attempt_at,
            last_success_at: project.last_success_at,
            last_error: project.last_error,
        })
        .collect())
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
    let free = crate::mirror::layout::free_bytes(&config.data_dir);
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
    warp::reply::with_header(
        metrics.render(),
        "content-type",
        crate::metrics::CONTENT_TYPE,
    )
    .into_response()
}
