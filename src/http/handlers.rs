//! Request handlers: plain async fns from extracted values to `Result<_, ApiError>`.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use warp::Reply;

use super::{ApiError, AppState, Caller, Response, parse_json};
use crate::auth::Principal;
use crate::domain::{ProjectId, RepoUrl, SyncId};
use crate::engine::Project;
use crate::hub::MAX_REPLAY;
use crate::metrics::Metrics;
use crate::protocol::{
    ControlFrame, CreateProjectRequest, MobileProject, ProjectView, SyncAccepted, SyncRecord,
    SyncRequest, Trigger,
};

const DEFAULT_SYNC_LIST: usize = 20;
const MAX_SYNC_LIST: usize = 100;
const DEFAULT_NOTIFICATIONS: usize = 100;

fn query_map(query: &str) -> Result<HashMap<String, String>, ApiError> {
    super::query::parse_query(query)
}

fn parse_limit(value: Option<&String>, default: usize, max: usize) -> Result<usize, ApiError> {
    match value {
        None => Ok(default),
        Some(raw) => raw
            .parse::<usize>()
            .ok()
            .filter(|limit| (1..=max).contains(limit))
            .ok_or_else(|| {
                ApiError::InvalidRequest(format!("limit must be a number from 1 to {max}"))
            }),
    }
}

/// Loads a project of the caller: unknown or malformed ids are `project_not_found`,
/// someone else's project is `forbidden`.
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
        return Err(ApiError::Forbidden);
    }
    Ok(project)
}

pub async fn list_projects(
    state: Arc<AppState>,
    principal: Caller,
) -> Result<Vec<ProjectView>, ApiError> {
    let principal = principal?;
    let projects = state.engine.store.projects_of(&principal.user).await?;
    Ok(projects.iter().map(Project::view).collect())
}

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
    state.engine.store.insert_project(&project).await?;
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

pub async fn get_project(
    state: Arc<AppState>,
    principal: Caller,
    id: String,
) -> Result<ProjectView, ApiError> {
    let principal = principal?;
    Ok(owned_project(&state, &principal, &id).await?.view())
}

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
pub async fn request_sync(
    state: Arc<AppState>,
    principal: Caller,
    body: Result<Bytes, ApiError>,
) -> Result<(StatusCode, SyncAccepted), ApiError> {
    let principal = principal?;
    let request: SyncRequest = parse_json(body)?;
    let project = owned_project(&state, &principal, &request.project_id).await?;
    Metrics::bump(&state.metrics.sync_requests);
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
        Metrics::bump(&state.metrics.syncs_coalesced);
    }
    let status = if created {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        SyncAccepted {
            sync_id: record.sync_id,
            project_id: record.project_id,
            status: record.status,
            coalesced: !created,
        },
    ))
}

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
        return Err(ApiError::Forbidden);
    }
    Ok(record)
}

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
    let limit = parse_limit(query.get("limit"), DEFAULT_SYNC_LIST, MAX_SYNC_LIST)?;
    let project = owned_project(&state, &principal, project_id).await?;
    let id = ProjectId::parse(&project.project_id).ok_or(ApiError::ProjectNotFound)?;
    Ok(state.engine.store.syncs_of(&id, limit).await?)
}

/// The caller's events after `after`, exactly as the socket sends them; a resume point
/// older than the kept history comes back as a lone `resync_required` frame first.
pub async fn notifications(
    state: Arc<AppState>,
    principal: Caller,
    query: String,
) -> Result<Vec<serde_json::Value>, ApiError> {
    let principal = principal?;
    let query = query_map(&query)?;
    let after = match query.get("after") {
        None => 0,
        Some(raw) => raw
            .parse()
            .map_err(|_| ApiError::InvalidRequest("after must be an event id".into()))?,
    };
    let limit = parse_limit(query.get("limit"), DEFAULT_NOTIFICATIONS, MAX_REPLAY)?;
    let history = state
        .engine
        .events
        .after(&principal.user, after, limit)
        .await?;
    let mut frames = Vec::with_capacity(history.events.len() + 1);
    if history.gap && after > 0 {
        frames.push(
            serde_json::to_value(ControlFrame::ResyncRequired)
                .map_err(|err| ApiError::Backend(Box::new(err)))?,
        );
    }
    for event in &history.events {
        frames.push(serde_json::to_value(event).map_err(|err| ApiError::Backend(Box::new(err)))?);
    }
    Ok(frames)
}

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

pub async fn readyz(state: Arc<AppState>) -> Response {
    let engine = state.engine.store.ping().await;
    let data_dir = state.config.data_dir.clone();
    let writable = tokio::task::spawn_blocking(move || {
        let probe = data_dir.join(format!(".readyz-{}", uuid::Uuid::new_v4().simple()));
        std::fs::write(&probe, b"ok").and_then(|()| std::fs::remove_file(&probe))
    })
    .await;
    let writable = matches!(writable, Ok(Ok(())));
    let free = crate::mirror::layout::free_bytes(&state.config.data_dir);
    let space_ok = free.is_some_and(|free| free >= state.config.min_free_bytes);
    let ready = engine.is_ok() && writable && space_ok;
    if let Err(err) = &engine {
        tracing::warn!(error = %crate::error::error_chain(err), "engine not reachable");
    }
    let body = serde_json::json!({
        "status": if ready { "ready" } else { "not_ready" },
        "engine": engine.is_ok(),
        "engine_kind": if state.config.redis_url.is_some() { "redis" } else { "embedded" },
        "data_dir_writable": writable,
        "free_bytes": free,
        "min_free_bytes": state.config.min_free_bytes,
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    warp::reply::with_status(warp::reply::json(&body), status).into_response()
}

pub async fn metrics(state: Arc<AppState>) -> Response {
    let text = state.metrics.render(state.hub.connection_count());
    warp::reply::with_header(text, "content-type", "text/plain; version=0.0.4").into_response()
}
