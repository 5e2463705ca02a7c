//! The HTTP edge, and the only module that imports warp: REST routes, the WebSocket
//! upgrade, the dashboard's files and the accept loop. Routes are laid out by
//! resource, each file with its filters beside its handlers: [`projects`], [`syncs`],
//! [`webhooks`], [`reads`], [`ops`]; what they all extract is in [`extract`]. Handlers
//! are plain async fns returning `Result<_, ApiError>`, and every failure — including a
//! route that does not match — leaves as the same JSON error body.

pub mod budget;
mod error;
mod extract;
pub mod gate;
pub mod openapi;
mod ops;
mod outbox;
mod projects;
mod query;
mod reads;
mod reject;
mod server;
pub mod slots;
mod syncs;
mod webhooks;
mod ws;

pub use budget::SearchSlots;
pub use error::ApiError;
pub use extract::{AppState, Caller, MAX_BODY, parse_json};
pub use query::{TreeCursor, parse_query};
pub use server::{serve, serve_ops};

use std::convert::Infallible;

use warp::{Filter, Rejection, Reply};

use extract::Response;

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
    if path == crate::protocol::WS_PATH {
        return crate::protocol::WS_PATH;
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

/// All REST routes and the dashboard, with one recovery that renders any rejection as
/// the contract's JSON error.
pub fn routes(
    state: std::sync::Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
    let dashboard = warp::get()
        .and(warp::fs::dir(state.config.static_dir.clone()))
        .map(Reply::into_response)
        .boxed();
    // each route boxed: one long chain of `or`s makes a type rustc takes minutes over
    ops::routes(&state)
        .into_iter()
        .chain(projects::routes(&state))
        .chain(webhooks::routes(&state))
        .chain(syncs::routes(&state))
        .chain(reads::routes(&state))
        .chain([dashboard])
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
