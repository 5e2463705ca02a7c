//! Projects: register, list, read, change, resume and delete them, and the mobile
//! list. Each route's filter sits beside its handler.

use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use warp::filters::BoxedFilter;
use warp::{Filter, Reply};

use super::error::ApiError;
use super::extract::{
    AppState, Caller, Response, authed, capped_body, owned_project, parse_json, respond,
};
use crate::credential_policy::PolicyError;
use crate::domain::{ProjectId, RepoUrl};
use crate::engine::{Project, ProjectChange};
use crate::protocol::{
    CreateProjectRequest, ErrorBody, MobileProject, PatchProjectRequest, ProjectView,
};

/// `/api/v1/projects` and one project, and `/api/v1/mobile/projects`.
pub(super) fn routes(state: &Arc<AppState>) -> Vec<BoxedFilter<(Response,)>> {
    let projects = warp::path!("api" / "v1" / "projects");
    let list = projects
        .and(warp::get())
        .and(authed(state))
        .then(|state, principal| async move {
            respond(StatusCode::OK, list_projects(state, principal).await)
        });
    let create = projects
        .and(warp::post())
        .and(authed(state))
        .and(capped_body())
        .then(|state, principal, body| async move {
            respond(
                StatusCode::CREATED,
                create_project(state, principal, body).await,
            )
        });
    let project = warp::path!("api" / "v1" / "projects" / String);
    let get = project
        .and(warp::get())
        .and(authed(state))
        .then(|id, state, principal| async move {
            respond(StatusCode::OK, get_project(state, principal, id).await)
        });
    let delete =
        project
            .and(warp::delete())
            .and(authed(state))
            .then(|id, state, principal| async move {
                match delete_project(state, principal, id).await {
                    Ok(()) => StatusCode::NO_CONTENT.into_response(),
                    Err(err) => err.into_response(),
                }
            });
    let patch = project
        .and(warp::patch())
        .and(authed(state))
        .and(capped_body())
        .then(|id, state, principal, body| async move {
            respond(
                StatusCode::OK,
                patch_project(state, principal, id, body).await,
            )
        });
    let resume = warp::path!("api" / "v1" / "projects" / String / "resume")
        .and(warp::post())
        .and(authed(state))
        .then(|id, state, principal| async move {
            respond(StatusCode::OK, resume(state, principal, id).await)
        });
    let mobile = warp::path!("api" / "v1" / "mobile" / "projects")
        .and(warp::get())
        .and(authed(state))
        .then(|state, principal| async move {
            respond(StatusCode::OK, mobile_projects(state, principal).await)
        });
    vec![
        list.boxed(),
        create.boxed(),
        get.boxed(),
        delete.boxed(),
        patch.boxed(),
        resume.boxed(),
        mobile.boxed(),
    ]
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
        check_credential(&state, &principal.user, credential, &url)?;
    }
    let project = Project::new(
        ProjectId::generate(),
        name.to_owned(),
        url.clone(),
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
    let project = state
        .engine
        .store
        .project(&project.project_id)
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
    repo_url: &RepoUrl,
) -> Result<(), ApiError> {
    if !is_credential_name(credential) {
        return Err(ApiError::InvalidRequest(
            "credential must be a name of 1 to 64 letters, digits, '_', '-' or '.'".into(),
        ));
    }
    crate::credential_policy::check(
        state.config.credential_scopes.as_deref(),
        credential,
        user,
        repo_url,
    )
    .map_err(|err| match err {
        PolicyError::Unreadable(why) => ApiError::Backend(why.into()),
        PolicyError::Refused(why) => ApiError::CredentialForbidden(why),
    })
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
    let project_id = project.project_id;
    state.engine.store.delete_project(&project_id).await?;
    state.reader.forget(&project_id);
    // the mirror goes under the project lock; while a worker holds it, that worker
    // removes the mirror when its job ends and finds the project gone
    state
        .engine
        .remove_mirror(&state.layout, project_id)
        .await?;
    Ok(())
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

pub(super) async fn change(
    state: &AppState,
    project: &Project,
    change: ProjectChange,
) -> Result<Project, ApiError> {
    state
        .engine
        .store
        .update_project(&project.project_id, change)
        .await?
        .ok_or(ApiError::ProjectNotFound)
}

#[utoipa::path(
    patch,
    path = "/api/v1/projects/{project_id}",
    tag = "projects",
    params(("project_id" = String, Path, description = "the project's id")),
    request_body = PatchProjectRequest,
    responses(
        (status = 200, description = "the changed project", body = ProjectView),
        (status = 400, description = "a malformed or invalid request (invalid_request)", body = ErrorBody),
        (status = 403, description = "a credential the caller may not use (forbidden)", body = ErrorBody),
        (status = 404, description = "no such project, or another user's: the two answer alike (project_not_found)", body = ErrorBody),
        (status = 413, description = "the body is over 64 KiB (payload_too_large)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn patch_project(
    state: Arc<AppState>,
    principal: Caller,
    id: String,
    body: Result<Bytes, ApiError>,
) -> Result<ProjectView, ApiError> {
    let principal = principal?;
    let request: PatchProjectRequest = parse_json(body)?;
    let project = owned_project(&state, &principal, &id).await?;
    let name = match &request.name {
        Some(name) => {
            let name = name.trim();
            if name.is_empty() || name.chars().count() > 200 {
                return Err(ApiError::InvalidRequest(
                    "name must be 1 to 200 characters".into(),
                ));
            }
            Some(name.to_owned())
        }
        None => None,
    };
    if let Some(Some(credential)) = &request.credential {
        check_credential(&state, &principal.user, credential, &project.repo_url)?;
    }
    if let Some(interval) = request.sync_interval_s {
        validate_interval(&state, interval)?;
    }
    let updated = change(
        &state,
        &project,
        ProjectChange {
            name,
            credential: request.credential,
            sync_interval_s: request.sync_interval_s,
            ..Default::default()
        },
    )
    .await?;
    Ok(updated.view())
}

#[utoipa::path(
    post,
    path = "/api/v1/projects/{project_id}/resume",
    tag = "projects",
    params(("project_id" = String, Path, description = "the project's id")),
    responses(
        (status = 200, description = "scheduled syncs resumed", body = ProjectView),
        (status = 404, description = "no such project, or another user's: the two answer alike (project_not_found)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn resume(
    state: Arc<AppState>,
    principal: Caller,
    id: String,
) -> Result<ProjectView, ApiError> {
    let principal = principal?;
    let project = owned_project(&state, &principal, &id).await?;
    let resume = ProjectChange {
        resume: true,
        ..Default::default()
    };
    Ok(change(&state, &project, resume).await?.view())
}
