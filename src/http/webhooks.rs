//! Push webhooks: turning a project's webhook on and off (its secret is derived,
//! never stored) and the deliveries it signs, read within a budget before any body
//! byte is trusted.

use std::sync::Arc;

use bytes::Buf;
use futures_util::StreamExt;
use http::{HeaderMap, StatusCode};
use warp::filters::BoxedFilter;
use warp::{Filter, Reply};

use super::error::ApiError;
use super::extract::{AppState, Caller, Response, authed, owned_project, respond, with_state};
use super::projects::change;
use crate::domain::webhook::{self, Request};
use crate::domain::{ProjectId, now_rfc3339};
use crate::engine::{ProjectChange, WebhookKey};
use crate::protocol::{ErrorBody, SyncAccepted, Trigger, WebhookCreated, WebhookOutcome};

/// Turning a project's webhook on and off, and `/api/v1/webhooks/{project_id}`, which
/// takes no token: a delivery is authenticated by the project's webhook secret.
pub(super) fn routes(state: &Arc<AppState>) -> Vec<BoxedFilter<(Response,)>> {
    let project_webhook = warp::path!("api" / "v1" / "projects" / String / "webhook");
    let create = project_webhook.and(warp::post()).and(authed(state)).then(
        |id, state, principal| async move {
            respond(
                StatusCode::CREATED,
                create_webhook(state, principal, id).await,
            )
        },
    );
    let delete = project_webhook.and(warp::delete()).and(authed(state)).then(
        |id, state, principal| async move {
            match delete_webhook(state, principal, id).await {
                Ok(()) => StatusCode::NO_CONTENT.into_response(),
                Err(err) => err.into_response(),
            }
        },
    );
    let receive = warp::path!("api" / "v1" / "webhooks" / String)
        .and(warp::post())
        .and(with_state(state))
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<super::server::Peer>())
        .and(warp::body::stream())
        .then(
            |id,
             state: Arc<AppState>,
             headers: HeaderMap,
             peer: Option<super::server::Peer>,
             stream| async move {
                let metrics = Arc::clone(&state.metrics);
                let body = WebhookBody {
                    peer: peer.map(|peer| peer.0),
                    stream,
                };
                match receive_webhook(state, id, headers, body).await {
                    Ok((status, outcome)) => {
                        metrics.webhook(match outcome {
                            WebhookOutcome::Accepted(_) => "accepted",
                            WebhookOutcome::Throttled { .. } => "throttled",
                            WebhookOutcome::Duplicate { .. } => "duplicate",
                            WebhookOutcome::Ignored { .. } => "ignored",
                        });
                        respond(status, Ok(outcome))
                    }
                    Err(err) => {
                        metrics.webhook(err.code_and_status().0);
                        err.into_response()
                    }
                }
            },
        );
    vec![create.boxed(), delete.boxed(), receive.boxed()]
}

/// A webhook delivery's body, not yet read, and who sends it.
pub struct WebhookBody<S> {
    pub peer: Option<std::net::IpAddr>,
    pub stream: S,
}

/// How long a delivery's body may take to arrive: a sender trickling bytes holds one
/// of the few places deliveries have.
const WEBHOOK_READ_TIME: std::time::Duration = std::time::Duration::from_secs(30);

/// Webhook bodies up to this are read (GitHub caps its payloads at 25 MB, but a push
/// payload over a few MiB is a push of thousands of commits, and only `ref` is read).
pub const MAX_WEBHOOK_BODY: usize = 5 * 1024 * 1024;

/// Turns webhooks on with a new secret (rotating any earlier one): the only response
/// that ever carries it.
#[utoipa::path(
    post,
    path = "/api/v1/projects/{project_id}/webhook",
    tag = "webhooks",
    params(("project_id" = String, Path, description = "the project's id")),
    responses(
        (status = 201, description = "the webhook URL and its secret, shown once; a second call rotates the secret", body = WebhookCreated),
        (status = 404, description = "no such project, or another user's: the two answer alike (project_not_found)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create_webhook(
    state: Arc<AppState>,
    principal: Caller,
    id: String,
) -> Result<WebhookCreated, ApiError> {
    let principal = principal?;
    let project = owned_project(&state, &principal, &id).await?;
    let mut nonce = [0u8; 16];
    getrandom::fill(&mut nonce).map_err(|err| ApiError::Backend(err.to_string().into()))?;
    let key = WebhookKey {
        nonce: nonce.iter().map(|b| format!("{b:02x}")).collect(),
        created_at: now_rfc3339(),
    };
    let secret =
        webhook::derive_secret(&state.webhook_key, project.project_id.as_str(), &key.nonce);
    let on = ProjectChange {
        webhook: Some(Some(key)),
        ..Default::default()
    };
    change(&state, &project, on).await?;
    tracing::info!(project_id = %project.project_id, "webhook secret created");
    Ok(WebhookCreated {
        url: format!("/api/v1/webhooks/{}", project.project_id),
        secret,
    })
}

#[utoipa::path(
    delete,
    path = "/api/v1/projects/{project_id}/webhook",
    tag = "webhooks",
    params(("project_id" = String, Path, description = "the project's id")),
    responses(
        (status = 204, description = "webhooks off: deliveries get 404"),
        (status = 404, description = "no such project, or another user's: the two answer alike (project_not_found)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn delete_webhook(
    state: Arc<AppState>,
    principal: Caller,
    id: String,
) -> Result<(), ApiError> {
    let principal = principal?;
    let project = owned_project(&state, &principal, &id).await?;
    let off = ProjectChange {
        webhook: Some(None),
        ..Default::default()
    };
    change(&state, &project, off).await?;
    Ok(())
}

/// A delivery from a forge. Unknown projects and projects with webhooks off get the
/// same 404, so project ids cannot be probed; the signature is checked before the body
/// is parsed; the sync runs after the answer.
/// `body` reads the request body when awaited.
#[utoipa::path(
    post,
    path = "/api/v1/webhooks/{project_id}",
    tag = "webhooks",
    params(("project_id" = String, Path, description = "the project's id")),
    request_body(content = Object, description = "the forge's push payload (GitHub, GitLab, Gitea/Forgejo, or any JSON with `ref`), up to 5 MiB", content_type = "application/json"),
    responses(
        (status = 202, description = "a push to the tracked branch: a sync was started or joined", body = WebhookOutcome),
        (status = 200, description = "a ping, another event or branch, or a delivery seen before", body = WebhookOutcome),
        (status = 400, description = "the body is not a delivery this hub reads (invalid_request)", body = ErrorBody),
        (status = 401, description = "missing or wrong signature (invalid_signature)", body = ErrorBody),
        (status = 404, description = "no such project, or its webhooks are off (not_found)", body = ErrorBody),
        (status = 413, description = "the body is over 5 MiB (payload_too_large)", body = ErrorBody),
        (status = 429, description = "over the project's webhook rate, too many wrong signatures lately from this project or address, or too many deliveries being read (rate_limited)", body = ErrorBody),
    ),
    security(("github_signature" = []), ("gitea_signature" = []), ("gitlab_token" = []), ("hivesync_signature" = []))
)]
pub async fn receive_webhook<S, B>(
    state: Arc<AppState>,
    project_id: String,
    headers: HeaderMap,
    body: WebhookBody<S>,
) -> Result<(StatusCode, WebhookOutcome), ApiError>
where
    S: futures_util::Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let not_found = || ApiError::NotFound("no such webhook".into());
    let id = ProjectId::parse(&project_id).ok_or_else(not_found)?;
    let project = state
        .engine
        .store
        .project(&id)
        .await?
        .ok_or_else(not_found)?;
    let key = project.webhook.as_ref().ok_or_else(not_found)?;
    // before a byte of the body: a peer or project whose signatures keep failing, or
    // too many deliveries already being read, are refused here
    let gate = &state.webhook_gate;
    let _in_progress = gate.admit(id.as_str(), body.peer)?;
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    let refused = |err: webhook::WebhookError| {
        gate.failed(id.as_str(), body.peer);
        tracing::info!(project_id = %project.project_id, error = %err, "webhook delivery refused");
        ApiError::InvalidSignature(err.to_string())
    };
    if header("content-length")
        .and_then(|len| len.trim().parse::<u64>().ok())
        .is_some_and(|len| len > MAX_WEBHOOK_BODY as u64)
    {
        return Err(ApiError::WebhookTooLarge);
    }
    let secret =
        webhook::derive_secret(&state.webhook_key, project.project_id.as_str(), &key.nonce);
    let mut incoming = webhook::Incoming::begin(&header, &secret).map_err(refused)?;
    // the body feeds the signature as it arrives; only its first KEPT bytes are kept
    let read = async {
        let mut stream = std::pin::pin!(body.stream);
        while let Some(chunk) = stream.next().await {
            let mut chunk = chunk.map_err(|err| {
                ApiError::InvalidRequest(format!("could not read the body: {err}"))
            })?;
            if incoming.len() + chunk.remaining() > MAX_WEBHOOK_BODY {
                return Err(ApiError::WebhookTooLarge);
            }
            while chunk.has_remaining() {
                let part = chunk.chunk();
                incoming.update(part);
                let advance = part.len();
                chunk.advance(advance);
            }
        }
        Ok(())
    };
    tokio::time::timeout(WEBHOOK_READ_TIME, read)
        .await
        .map_err(|_| {
            ApiError::InvalidRequest(format!(
                "the body did not arrive within {} s",
                WEBHOOK_READ_TIME.as_secs()
            ))
        })??;
    let delivery = incoming.finish(header).map_err(refused)?;
    if let Err(retry_after) = state.engine.store.admit_webhook(&id).await? {
        return Err(ApiError::RateLimited { retry_after });
    }
    if let Some(delivery_id) = &delivery.id
        && state.engine.store.seen_delivery(&id, delivery_id).await?
    {
        return Ok((
            StatusCode::OK,
            WebhookOutcome::Duplicate { duplicate: true },
        ));
    }
    let ignored = |reason: String| {
        tracing::debug!(project_id = %project.project_id, %reason, "webhook delivery ignored");
        Ok((StatusCode::OK, WebhookOutcome::Ignored { ignored: reason }))
    };
    let git_ref = match delivery.request {
        Request::Ping => return ignored("ping".into()),
        Request::Other(event) => return ignored(format!("event '{event}' is not a push")),
        Request::Push { git_ref } => git_ref,
    };
    if git_ref != format!("refs/heads/{}", project.branch) {
        return ignored(format!(
            "'{git_ref}' is not the tracked branch refs/heads/{}",
            project.branch
        ));
    }
    // a push spends its owner's sync budget, as a press of Sync does (half of it at
    // most); over it, the push is acknowledged and synced when the budget allows
    if let Err(wait) = state
        .engine
        .store
        .admit_background_sync(&project.owner)
        .await?
    {
        state.metrics.syncs_throttled.inc();
        defer_webhook_sync(&state, &project.project_id, wait);
        tracing::info!(project_id = %project.project_id, wait_ms = wait.as_millis() as u64, "webhook push over its owner's sync budget; syncing when it allows");
        return Ok((
            StatusCode::ACCEPTED,
            WebhookOutcome::Throttled {
                project_id: project.project_id,
                coalesced: true,
                throttled: true,
                retry_after_s: wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
            },
        ));
    }
    let (record, created) = state.engine.start_sync(&project, Trigger::Webhook).await?;
    tracing::info!(project_id = %project.project_id, sync_id = %record.sync_id, joined = !created, "webhook push");
    Ok((
        StatusCode::ACCEPTED,
        WebhookOutcome::Accepted(SyncAccepted::of(record, created)),
    ))
}

/// Starts a webhook sync of `project_id` once its owner's budget allows, `wait` from
/// now: one per project however many pushes arrive meanwhile. Held in this process
/// (a restart before it runs drops it; the next push or scheduled sync brings the
/// mirror up to date).
fn defer_webhook_sync(state: &Arc<AppState>, project_id: &ProjectId, wait: std::time::Duration) {
    let fresh = state
        .deferred_webhooks
        .lock()
        .expect("deferred set is never poisoned")
        .insert(project_id.clone());
    if !fresh {
        return;
    }
    let state = Arc::clone(state);
    let project_id = project_id.clone();
    tokio::spawn(async move {
        let mut wait = wait;
        loop {
            tokio::select! {
                _ = state.read_stop.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
            let project = match state.engine.store.project(&project_id).await {
                Ok(Some(project)) => project,
                Ok(None) => break,
                Err(err) => {
                    tracing::warn!(%project_id, error = %crate::error::error_chain(&err), "a held-back webhook sync could not read its project; trying again");
                    wait = std::time::Duration::from_secs(5);
                    continue;
                }
            };
            match state
                .engine
                .store
                .admit_background_sync(&project.owner)
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(more)) => {
                    wait = more;
                    continue;
                }
                Err(_) => {
                    wait = std::time::Duration::from_secs(5);
                    continue;
                }
            }
            // taken off the set first: a push from now on is a new one
            state
                .deferred_webhooks
                .lock()
                .expect("deferred set is never poisoned")
                .remove(&project_id);
            if let Err(err) = state.engine.start_sync(&project, Trigger::Webhook).await {
                tracing::warn!(%project_id, error = %crate::error::error_chain(&err), "a held-back webhook sync could not start");
            }
            return;
        }
        state
            .deferred_webhooks
            .lock()
            .expect("deferred set is never poisoned")
            .remove(&project_id);
    });
}
