//! The HTTP edge, and the only module that imports warp: REST routes, the WebSocket
//! upgrade, the dashboard's files and the accept loop. Filters only extract; handlers
//! are plain async fns returning `Result<_, ApiError>`, and every failure — including a
//! route that does not match — leaves as the same JSON error body.

pub mod budget;
mod error;
mod freshness;
pub mod gate;
mod handlers;
pub mod openapi;
mod outbox;
mod query;
mod read;
mod reject;
mod server;
pub mod slots;
mod ws;

pub use error::ApiError;
pub use query::parse_query;
pub use read::{SearchSlots, TreeCursor};
pub use server::{serve, serve_ops};
pub use ws::WS_PATH;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::{Buf, Bytes};
use futures_util::{Stream, StreamExt};
use http::StatusCode;
use warp::{Filter, Rejection, Reply};

use crate::auth::{Authenticator, Principal};
use crate::config::Config;
use crate::engine::Engine;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::mirror::Layout;
use crate::mirror::read::Reader;
use crate::protocol::WebhookOutcome;

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
    pub deferred_webhooks: std::sync::Mutex<std::collections::HashSet<String>>,
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

type Response = warp::reply::Response;
type ReadFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send>>;

/// Every REST route the server answers, as (method, path template): the
/// `http_requests_total` route label, and what the OpenAPI document is checked against.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/api/v1/openapi.json"),
    ("GET", "/api/v1/projects"),
    ("POST", "/api/v1/projects"),
    ("GET", "/api/v1/projects/{project_id}"),
    ("PATCH", "/api/v1/projects/{project_id}"),
    ("DELETE", "/api/v1/projects/{project_id}"),
    ("POST", "/api/v1/projects/{project_id}/resume"),
    ("POST", "/api/v1/projects/{project_id}/webhook"),
    ("DELETE", "/api/v1/projects/{project_id}/webhook"),
    ("POST", "/api/v1/webhooks/{project_id}"),
    ("GET", "/api/v1/repo/metadata"),
    ("POST", "/api/v1/repo/sync"),
    ("GET", "/api/v1/repo/sync"),
    ("GET", "/api/v1/repo/sync/{sync_id}"),
    ("GET", "/api/v1/notifications"),
    ("GET", "/api/v1/mobile/projects"),
    ("GET", "/api/v1/repo/tree"),
    ("GET", "/api/v1/repo/file"),
    ("GET", "/api/v1/repo/search"),
    ("GET", "/api/v1/repo/diff"),
];

/// The `method` label of a request: the standard methods by name, anything else
/// (hyper accepts any token as a method) as `other`, so clients cannot grow the
/// label set.
pub(crate) fn method_label(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::PATCH => "PATCH",
        http::Method::DELETE => "DELETE",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// The route template a request path matches (any method), `/api/v1/ws` for the
/// socket, `static` for the dashboard's files under `/`, else `unmatched`: a label
/// with a bounded set of values, whatever paths clients send.
pub fn route_of(path: &str) -> &'static str {
    if path == ws::WS_PATH {
        return ws::WS_PATH;
    }
    // every request passes here: segment by segment, no allocation
    let fits = |template: &str| {
        let (mut parts, mut segments) = (template.split('/'), path.split('/'));
        loop {
            match (parts.next(), segments.next()) {
                (None, None) => return true,
                (Some(part), Some(segment)) if part.starts_with('{') || part == segment => {}
                _ => return false,
            }
        }
    };
    match ROUTES.iter().find(|(_, template)| fits(template)) {
        Some((_, template)) => template,
        None if !path.starts_with("/api/") => "static",
        None => "unmatched",
    }
}

/// Turns a handler's result into the response: the value as JSON with `status`, or the
/// error's JSON body and status.
fn respond<T: serde::Serialize>(status: StatusCode, result: Result<T, ApiError>) -> Response {
    match result {
        Ok(value) => warp::reply::with_status(warp::reply::json(&value), status).into_response(),
        Err(err) => err.into_response(),
    }
}

/// The request body, read up to [`MAX_BODY`]: larger bodies are refused as soon as
/// the header or the stream shows it, so a client cannot make the server buffer more.
fn capped_body() -> impl Filter<Extract = (Result<Bytes, ApiError>,), Error = Rejection> + Clone {
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
async fn collect_capped<S, B>(
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
fn raw_query() -> impl Filter<Extract = (String,), Error = Infallible> + Clone {
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

/// All REST routes and the dashboard, with one recovery that renders any rejection as
/// the contract's JSON error.
pub fn routes(
    state: Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
    let static_dir = state.config.static_dir.clone();
    let with_state = {
        let state = Arc::clone(&state);
        warp::any().map(move || Arc::clone(&state))
    };
    // the state and the caller, for every route that needs a token
    let authed = with_state.clone().and(with_principal(Arc::clone(&state)));

    let healthz = warp::path!("healthz")
        .and(warp::get())
        .then(handlers::healthz);
    let openapi_json = warp::path!("api" / "v1" / "openapi.json")
        .and(warp::get())
        .map(openapi::document_response);
    let readyz = warp::path!("readyz")
        .and(warp::get())
        .and(with_state.clone())
        .then(handlers::readyz);
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(with_state.clone())
        .then(handlers::metrics);

    let projects = warp::path!("api" / "v1" / "projects");
    let list_projects =
        projects
            .and(warp::get())
            .and(authed.clone())
            .then(|state, principal| async move {
                respond(
                    StatusCode::OK,
                    handlers::list_projects(state, principal).await,
                )
            });
    let create_project = projects
        .and(warp::post())
        .and(authed.clone())
        .and(capped_body())
        .then(|state, principal, body| async move {
            respond(
                StatusCode::CREATED,
                handlers::create_project(state, principal, body).await,
            )
        });
    let project = warp::path!("api" / "v1" / "projects" / String);
    let get_project =
        project
            .and(warp::get())
            .and(authed.clone())
            .then(|id, state, principal| async move {
                respond(
                    StatusCode::OK,
                    handlers::get_project(state, principal, id).await,
                )
            });
    let delete_project =
        project
            .and(warp::delete())
            .and(authed.clone())
            .then(|id, state, principal| async move {
                match handlers::delete_project(state, principal, id).await {
                    Ok(()) => StatusCode::NO_CONTENT.into_response(),
                    Err(err) => err.into_response(),
                }
            });

    let patch_project = project
        .and(warp::patch())
        .and(authed.clone())
        .and(capped_body())
        .then(|id, state, principal, body| async move {
            respond(
                StatusCode::OK,
                freshness::patch_project(state, principal, id, body).await,
            )
        });
    let resume = warp::path!("api" / "v1" / "projects" / String / "resume")
        .and(warp::post())
        .and(authed.clone())
        .then(|id, state, principal| async move {
            respond(
                StatusCode::OK,
                freshness::resume(state, principal, id).await,
            )
        });
    let project_webhook = warp::path!("api" / "v1" / "projects" / String / "webhook");
    let create_webhook = project_webhook.and(warp::post()).and(authed.clone()).then(
        |id, state, principal| async move {
            respond(
                StatusCode::CREATED,
                freshness::create_webhook(state, principal, id).await,
            )
        },
    );
    let delete_webhook = project_webhook
        .and(warp::delete())
        .and(authed.clone())
        .then(|id, state, principal| async move {
            match freshness::delete_webhook(state, principal, id).await {
                Ok(()) => StatusCode::NO_CONTENT.into_response(),
                Err(err) => err.into_response(),
            }
        });
    // no token: a delivery is authenticated by the project's webhook secret
    let receive_webhook = warp::path!("api" / "v1" / "webhooks" / String)
        .and(warp::post())
        .and(with_state.clone())
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<server::Peer>())
        .and(warp::body::stream())
        .then(
            |id,
             state: Arc<AppState>,
             headers: http::HeaderMap,
             peer: Option<server::Peer>,
             stream| async move {
                let metrics = Arc::clone(&state.metrics);
                let body = freshness::WebhookBody {
                    peer: peer.map(|peer| peer.0),
                    stream,
                };
                match freshness::receive_webhook(state, id, headers, body).await {
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
    let metadata = warp::path!("api" / "v1" / "repo" / "metadata")
        .and(warp::get())
        .and(authed.clone())
        .and(raw_query())
        .then(|state, principal, query| async move {
            respond(
                StatusCode::OK,
                freshness::metadata(state, principal, query).await,
            )
        });

    let sync = warp::path!("api" / "v1" / "repo" / "sync");
    let request_sync = sync
        .and(warp::post())
        .and(authed.clone())
        .and(capped_body())
        .then(|state, principal, body| async move {
            match handlers::request_sync(state, principal, body).await {
                Ok((status, accepted)) => respond(status, Ok(accepted)),
                Err(err) => err.into_response(),
            }
        });
    let list_syncs = sync
        .and(warp::get())
        .and(authed.clone())
        .and(raw_query())
        .then(|state, principal, query| async move {
            respond(
                StatusCode::OK,
                handlers::list_syncs(state, principal, query).await,
            )
        });
    let get_sync = warp::path!("api" / "v1" / "repo" / "sync" / String)
        .and(warp::get())
        .and(authed.clone())
        .then(|id, state, principal| async move {
            respond(
                StatusCode::OK,
                handlers::get_sync(state, principal, id).await,
            )
        });

    let notifications = warp::path!("api" / "v1" / "notifications")
        .and(warp::get())
        .and(authed.clone())
        .and(raw_query())
        .then(|state, principal, query| async move {
            respond(
                StatusCode::OK,
                handlers::notifications(state, principal, query).await,
            )
        });
    let mobile = warp::path!("api" / "v1" / "mobile" / "projects")
        .and(warp::get())
        .and(authed.clone())
        .then(|state, principal| async move {
            respond(
                StatusCode::OK,
                handlers::mobile_projects(state, principal).await,
            )
        });

    type ReadFn = fn(Arc<AppState>, Caller, String, Option<String>) -> ReadFuture;
    let read_route = |name: &'static str, handler: ReadFn| {
        warp::path("api")
            .and(warp::path("v1"))
            .and(warp::path("repo"))
            .and(warp::path(name))
            .and(warp::path::end())
            .and(warp::get())
            .and(authed.clone())
            .and(raw_query())
            .and(warp::header::optional::<String>("if-none-match"))
            .then(handler)
    };
    let reads = read_route("tree", |s, p, q, e| Box::pin(read::tree(s, p, q, e)))
        .or(read_route("file", |s, p, q, e| {
            Box::pin(read::file(s, p, q, e))
        }))
        .unify()
        .or(read_route("search", |s, p, q, e| {
            Box::pin(read::search(s, p, q, e))
        }))
        .unify()
        .or(read_route("diff", |s, p, q, e| {
            Box::pin(read::diff(s, p, q, e))
        }))
        .unify();

    let dashboard = warp::get()
        .and(warp::fs::dir(static_dir))
        .map(Reply::into_response);

    // each route boxed: one long chain of `or`s makes a type rustc takes minutes over
    let routes: Vec<warp::filters::BoxedFilter<(Response,)>> = vec![
        healthz.boxed(),
        openapi_json.boxed(),
        readyz.boxed(),
        metrics.boxed(),
        list_projects.boxed(),
        create_project.boxed(),
        get_project.boxed(),
        delete_project.boxed(),
        patch_project.boxed(),
        resume.boxed(),
        create_webhook.boxed(),
        delete_webhook.boxed(),
        receive_webhook.boxed(),
        metadata.boxed(),
        request_sync.boxed(),
        list_syncs.boxed(),
        get_sync.boxed(),
        notifications.boxed(),
        mobile.boxed(),
        reads.boxed(),
        dashboard.boxed(),
    ];
    routes
        .into_iter()
        .reduce(|all, next| all.or(next).unify().boxed())
        .expect("there are routes")
        .recover(recover)
        .unify()
}

/// What no route matched, as JSON: an unknown path, or a known path with another method.
async fn recover(rejection: Rejection) -> Result<Response, Infallible> {
    let error = if rejection.is_not_found() {
        ApiError::NotFound("no such route".to_owned())
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        ApiError::NotFound("no such route for this method".to_owned())
    } else if rejection.find::<warp::reject::PayloadTooLarge>().is_some() {
        ApiError::PayloadTooLarge
    } else {
        ApiError::InvalidRequest("malformed request".to_owned())
    };
    Ok(error.into_response())
}
