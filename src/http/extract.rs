//! What every route extracts before its handler runs: the shared state, the caller
//! from the bearer token, a body read up to a cap, JSON parsed strictly, the raw query,
//! and the caller's own project. Handlers take these values and return
//! `Result<_, ApiError>`; [`respond`] turns that into the answer.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::{Buf, Bytes};
use futures_util::{Stream, StreamExt};
use http::StatusCode;
use warp::{Filter, Rejection, Reply};

use super::budget::SearchSlots;
use super::error::ApiError;
use super::{budget, gate, slots};
use crate::auth::{Authenticator, Principal};
use crate::config::Config;
use crate::domain::ProjectId;
use crate::engine::{Engine, Project};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::mirror::Layout;
use crate::mirror::read::Reader;

/// Bodies over this are refused with 413, before they are read in full.
pub const MAX_BODY: usize = 64 * 1024;

/// Everything a request handler may touch.
pub struct AppState {
    pub engine: Engine,
    pub hub: Arc<Hub>,
    pub auth: Authenticator,
    pub config: Arc<Config>,
    pub layout: Layout,
    pub reader: Arc<Reader>,
    pub metrics: Arc<Metrics>,
    /// searches running per user
    pub searches: SearchSlots,
    /// every read's place: per user and in the whole process
    pub reads: budget::ReadBudget,
    /// failed signatures and deliveries in progress, before a webhook body is read
    pub webhook_gate: gate::WebhookGate,
    /// cancelled when shutdown begins: reads still scanning stop at their next check
    pub read_stop: tokio_util::sync::CancellationToken,
    /// what webhook secrets are derived from (never logged)
    pub webhook_key: Vec<u8>,
    /// held while a project is counted against its owner's quota and registered
    pub registering: tokio::sync::Mutex<()>,
    /// WebSocket connections per user and in total (`HIVESYNC_WS_PER_USER`,
    /// `HIVESYNC_WS_MAX`)
    pub sockets: Arc<slots::UserSlots>,
    /// projects with a webhook sync held back by their owner's budget
    pub deferred_webhooks: std::sync::Mutex<std::collections::HashSet<crate::domain::ProjectId>>,
}

impl AppState {
    /// Checks a bearer token from the `Authorization` header.
    pub fn principal(&self, authorization: Option<&str>) -> Result<Principal, ApiError> {
        let token = authorization
            .and_then(|value| {
                value
                    .strip_prefix("Bearer ")
                    .or_else(|| value.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .ok_or(ApiError::InvalidToken)?;
        Ok(self.auth.verify(token)?)
    }
}

pub type Response = warp::reply::Response;

/// Turns a handler's result into the response: the value as JSON with `status`, or the
/// error's JSON body and status.
pub(super) fn respond<T: serde::Serialize>(
    status: StatusCode,
    result: Result<T, ApiError>,
) -> Response {
    match result {
        Ok(value) => warp::reply::with_status(warp::reply::json(&value), status).into_response(),
        Err(err) => err.into_response(),
    }
}

/// The request body, read up to [`MAX_BODY`]: larger bodies are refused as soon as
/// the header or the stream shows it, so a client cannot make the server buffer more.
pub(super) fn capped_body()
-> impl Filter<Extract = (Result<Bytes, ApiError>,), Error = Rejection> + Clone {
    warp::header::optional::<String>("content-length")
        .and(warp::body::stream())
        .then(|declared: Option<String>, stream| async move {
            if declared
                .and_then(|len| len.trim().parse::<u64>().ok())
                .is_some_and(|len| len > MAX_BODY as u64)
            {
                return Err(ApiError::PayloadTooLarge);
            }
            collect_capped(stream, MAX_BODY, || ApiError::PayloadTooLarge).await
        })
}

/// Reads a body stream up to `max` bytes; over it, `too_large()`.
pub(super) async fn collect_capped<S, B>(
    stream: S,
    max: usize,
    too_large: fn() -> ApiError,
) -> Result<Bytes, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let mut stream = std::pin::pin!(stream);
    let mut collected = Vec::new();
    while let Some(chunk) = stream.next().await {
        let mut chunk = chunk
            .map_err(|err| ApiError::InvalidRequest(format!("could not read the body: {err}")))?;
        if collected.len() + chunk.remaining() > max {
            return Err(too_large());
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            collected.extend_from_slice(part);
            let advance = part.len();
            chunk.advance(advance);
        }
    }
    Ok(Bytes::from(collected))
}

/// Parses a JSON body into `T`; any failure is `invalid_request` naming what was wrong.
pub fn parse_json<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, ApiError>,
) -> Result<T, ApiError> {
    let body = body?;
    // every request body is an object; serde would also take a struct as an array of
    // its fields in order, which no client means
    let value: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|err| ApiError::InvalidRequest(format!("invalid JSON body: {err}")))?;
    if !value.is_object() {
        return Err(ApiError::InvalidRequest(
            "the body must be a JSON object".into(),
        ));
    }
    serde_json::from_value(value)
        .map_err(|err| ApiError::InvalidRequest(format!("invalid JSON body: {err}")))
}

/// The raw query string, empty when there is none (warp's own filter rejects that).
pub(super) fn raw_query() -> impl Filter<Extract = (String,), Error = Infallible> + Clone {
    warp::query::raw().or(warp::any().map(String::new)).unify()
}

/// Who is calling, from the `Authorization: Bearer` header: checked once here, and
/// handed to the handler as the principal or the error that refuses the request (so
/// the handler decides when to refuse: a bad body and a bad token answer alike).
pub type Caller = Result<Principal, ApiError>;

fn with_principal(
    state: Arc<AppState>,
) -> impl Filter<Extract = (Caller,), Error = Infallible> + Clone {
    // read raw: a header that is not visible ASCII (a pasted token with a `…` in it)
    // is a bad token, not a route that does not match
    warp::header::headers_cloned().map(move |headers: http::HeaderMap| {
        match headers.get(http::header::AUTHORIZATION) {
            None => state.principal(None),
            Some(value) => match value.to_str() {
                Ok(value) => state.principal(Some(value)),
                Err(_) => Err(ApiError::InvalidToken),
            },
        }
    })
}

/// The shared state, for every route.
pub(super) fn with_state(
    state: &Arc<AppState>,
) -> impl Filter<Extract = (Arc<AppState>,), Error = Infallible> + Clone + use<> {
    let state = Arc::clone(state);
    warp::any().map(move || Arc::clone(&state))
}

/// The state and the caller, for every route that needs a token.
pub(super) fn authed(
    state: &Arc<AppState>,
) -> impl Filter<Extract = (Arc<AppState>, Caller), Error = Infallible> + Clone + use<> {
    with_state(state).and(with_principal(Arc::clone(state)))
}

pub(super) fn query_map(query: &str) -> Result<HashMap<String, String>, ApiError> {
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
