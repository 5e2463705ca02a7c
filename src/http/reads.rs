//! Read endpoints: tree, file, search and diff of the last completed sync's commit.
//! Metadata-only (mobile) tokens are refused before any work; responses carry an ETag
//! derived from the commit and the request, and `If-None-Match` gets a 304.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use http::StatusCode;
use serde::Serialize;
use serde_json::json;
use utoipa::ToSchema;
use warp::filters::BoxedFilter;
use warp::{Filter, Reply};

use super::budget::blocking;
use super::error::ApiError;
use super::extract::{AppState, Caller, Response, authed, owned_project, raw_query, respond};
use super::query::TreeCursor;
use crate::domain::{ProjectId, RepoPath};
use crate::mirror::read::{FileContent, FileDiff, TreeEntry};
use crate::mirror::search::{SearchMatch, SearchQuery};
use crate::protocol::{ErrorBody, Metadata};

type ReadFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send>>;

/// `/api/v1/repo/{tree,file,search,diff}` and `/api/v1/repo/metadata`.
pub(super) fn routes(state: &Arc<AppState>) -> Vec<BoxedFilter<(Response,)>> {
    type ReadFn = fn(Arc<AppState>, Caller, String, Option<String>) -> ReadFuture;
    let read_route = |name: &'static str, handler: ReadFn| {
        warp::path("api")
            .and(warp::path("v1"))
            .and(warp::path("repo"))
            .and(warp::path(name))
            .and(warp::path::end())
            .and(warp::get())
            .and(authed(state))
            .and(raw_query())
            .and(warp::header::optional::<String>("if-none-match"))
            .then(handler)
    };
    let reads = read_route("tree", |s, p, q, e| Box::pin(tree(s, p, q, e)))
        .or(read_route("file", |s, p, q, e| Box::pin(file(s, p, q, e))))
        .unify()
        .or(read_route("search", |s, p, q, e| {
            Box::pin(search(s, p, q, e))
        }))
        .unify()
        .or(read_route("diff", |s, p, q, e| Box::pin(diff(s, p, q, e))))
        .unify();
    let head = warp::path!("api" / "v1" / "repo" / "metadata")
        .and(warp::get())
        .and(authed(state))
        .and(raw_query())
        .then(|state, principal, query| async move {
            respond(StatusCode::OK, metadata(state, principal, query).await)
        });
    vec![reads.boxed(), head.boxed()]
}

/// One search may run this long before it returns what it found as `truncated`.
const SEARCH_BUDGET: Duration = Duration::from_secs(5);
const DEFAULT_SEARCH_LIMIT: usize = 100;
const MAX_SEARCH_LIMIT: usize = 1000;
/// Entries of a directory listing per page, unless asked otherwise, and at most.
const DEFAULT_TREE_LIMIT: usize = 1000;
const MAX_TREE_LIMIT: usize = 10_000;

/// Sets the flag when dropped — when the request's future is, because the client
/// went away — or when the server starts shutting down, so a scan nobody waits for
/// stops at its next check.
struct CancelOnDrop {
    flag: Arc<AtomicBool>,
    watcher: tokio::task::JoinHandle<()>,
}

impl CancelOnDrop {
    fn new(shutdown: tokio_util::sync::CancellationToken) -> Self {
        let flag = Arc::new(AtomicBool::new(false));
        let watcher = {
            let flag = Arc::clone(&flag);
            tokio::spawn(async move {
                shutdown.cancelled().await;
                flag.store(true, Ordering::Relaxed);
            })
        };
        Self { flag, watcher }
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.flag.store(true, Ordering::Relaxed);
        self.watcher.abort();
    }
}

#[derive(Debug, Clone, Copy)]
pub enum ReadKind {
    Tree,
    File,
    Search,
    Diff,
}

/// FNV-1a: a stable hash for ETags, the same on every node and every build.
fn fnv1a(parts: &[&str]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.bytes().chain(std::iter::once(0xff)) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

#[utoipa::path(
    get,
    path = "/api/v1/repo/tree",
    tag = "reads",
    params(
        ("project_id" = String, Query, description = "the project's id"),
        ("path" = Option<String>, Query, description = "a directory, relative to the root (default: the root)"),
        ("limit" = Option<u32>, Query, description = "at most this many entries (default 1000)", minimum = 1, maximum = 10000),
        ("cursor" = Option<String>, Query, description = "the `next_cursor` of the page before"),
        ("If-None-Match" = Option<String>, Header, description = "an ETag from an earlier answer: 304 when unchanged"),
    ),
    responses(
        (status = 200, description = "the directory's entries at the mirror's commit", body = TreeListing),
        (status = 304, description = "unchanged since the ETag given"),
        (status = 400, description = "a missing or invalid parameter (invalid_request, path_invalid)", body = ErrorBody),
        (status = 403, description = "a mobile token (mobile_metadata_only)", body = ErrorBody),
        (status = 404, description = "no such project, path or commit, or no completed sync yet", body = ErrorBody),
        (status = 429, description = "too many reads running for this user or the hub (rate_limited)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn tree(
    state: Arc<AppState>,
    principal: Caller,
    query: String,
    if_none_match: Option<String>,
) -> Response {
    handle(ReadKind::Tree, state, principal, query, if_none_match).await
}

#[utoipa::path(
    get,
    path = "/api/v1/repo/file",
    tag = "reads",
    params(
        ("project_id" = String, Query, description = "the project's id"),
        ("path" = String, Query, description = "a file, relative to the root"),
        ("If-None-Match" = Option<String>, Header, description = "an ETag from an earlier answer: 304 when unchanged"),
    ),
    responses(
        (status = 200, description = "the file's content (utf-8, or base64), capped", body = FileView),
        (status = 304, description = "unchanged since the ETag given"),
        (status = 400, description = "a missing or invalid parameter (invalid_request, path_invalid)", body = ErrorBody),
        (status = 403, description = "a mobile token (mobile_metadata_only)", body = ErrorBody),
        (status = 404, description = "no such project, path or commit, or no completed sync yet", body = ErrorBody),
        (status = 429, description = "too many reads running for this user or the hub (rate_limited)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn file(
    state: Arc<AppState>,
    principal: Caller,
    query: String,
    if_none_match: Option<String>,
) -> Response {
    handle(ReadKind::File, state, principal, query, if_none_match).await
}

#[utoipa::path(
    get,
    path = "/api/v1/repo/search",
    tag = "reads",
    params(
        ("project_id" = String, Query, description = "the project's id"),
        ("q" = String, Query, description = "the text (or, with regex=true, the pattern) to find"),
        ("regex" = Option<bool>, Query, description = "q is a regular expression"),
        ("path_prefix" = Option<String>, Query, description = "only paths under this directory"),
        ("limit" = Option<u32>, Query, description = "at most this many matches (default 100)", minimum = 1, maximum = 1000),
        ("If-None-Match" = Option<String>, Header, description = "an ETag from an earlier answer: 304 when unchanged"),
    ),
    responses(
        (status = 200, description = "matching lines; `timed_out` answers are partial", body = SearchResults),
        (status = 304, description = "unchanged since the ETag given"),
        (status = 400, description = "a missing or invalid parameter (invalid_request, path_invalid)", body = ErrorBody),
        (status = 403, description = "a mobile token (mobile_metadata_only)", body = ErrorBody),
        (status = 404, description = "no such project, path or commit, or no completed sync yet", body = ErrorBody),
        (status = 429, description = "too many searches running for this user (rate_limited)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn search(
    state: Arc<AppState>,
    principal: Caller,
    query: String,
    if_none_match: Option<String>,
) -> Response {
    handle(ReadKind::Search, state, principal, query, if_none_match).await
}

#[utoipa::path(
    get,
    path = "/api/v1/repo/diff",
    tag = "reads",
    params(
        ("project_id" = String, Query, description = "the project's id"),
        ("from" = String, Query, description = "the older commit (full or abbreviated id)"),
        ("to" = String, Query, description = "the newer commit"),
        ("If-None-Match" = Option<String>, Header, description = "an ETag from an earlier answer: 304 when unchanged"),
    ),
    responses(
        (status = 200, description = "the files changed between the two commits", body = DiffView),
        (status = 304, description = "unchanged since the ETag given"),
        (status = 400, description = "a missing or invalid parameter (invalid_request, path_invalid)", body = ErrorBody),
        (status = 403, description = "a mobile token (mobile_metadata_only)", body = ErrorBody),
        (status = 404, description = "no such project, path or commit, or no completed sync yet", body = ErrorBody),
        (status = 429, description = "too many reads running for this user or the hub (rate_limited)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn diff(
    state: Arc<AppState>,
    principal: Caller,
    query: String,
    if_none_match: Option<String>,
) -> Response {
    handle(ReadKind::Diff, state, principal, query, if_none_match).await
}

/// The head of the last completed sync: for every token class, mobile included.
#[utoipa::path(
    get,
    path = "/api/v1/repo/metadata",
    tag = "reads",
    params(("project_id" = String, Query, description = "the project's id")),
    responses(
        (status = 200, description = "the head of the last completed sync", body = Metadata),
        (status = 400, description = "a malformed or invalid request (invalid_request)", body = ErrorBody),
        (status = 404, description = "no such project (or another user's), or no completed sync yet", body = ErrorBody),
        (status = 429, description = "too many reads running for this user or the hub (rate_limited)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn metadata(
    state: Arc<AppState>,
    principal: Caller,
    query: String,
) -> Result<Metadata, ApiError> {
    let principal = principal?;
    let params = super::query::parse_query(&query)?;
    let id = params
        .get("project_id")
        .ok_or_else(|| ApiError::InvalidRequest("project_id is required".into()))?;
    let project = owned_project(&state, &principal, id).await?;
    let commit = project
        .commit
        .clone()
        .ok_or_else(|| ApiError::NotFound("the project has no completed sync yet".into()))?;
    let project_id = project.project_id.clone();
    let pass = state.reads.enter(&principal.user).await?;
    let reader = Arc::clone(&state.reader);
    let head_commit = commit.clone();
    let info =
        super::budget::blocking(pass, move || reader.head_info(&project_id, &head_commit)).await?;
    Ok(Metadata {
        project_id: project.project_id,
        commit,
        branch: project.branch,
        subject: info.subject,
        author: info.author,
        committed_at: info.committed_at,
        files: info.files,
        bytes: info.bytes,
        last_success_at: project.last_success_at,
    })
}

async fn handle(
    kind: ReadKind,
    state: Arc<AppState>,
    principal: Caller,
    query: String,
    if_none_match: Option<String>,
) -> Response {
    match read(kind, &state, principal, &query, if_none_match.as_deref()).await {
        Ok(response) => response,
        Err(err) => err.into_response(),
    }
}

async fn read(
    kind: ReadKind,
    state: &Arc<AppState>,
    principal: Caller,
    query: &str,
    if_none_match: Option<&str>,
) -> Result<Response, ApiError> {
    let principal = principal?;
    if !principal.may_read_contents() {
        return Err(ApiError::MobileMetadataOnly);
    }
    let params = super::query::parse_query(query)?;
    let param = |name: &str| params.get(name).map(String::as_str);
    let project_id = param("project_id")
        .ok_or_else(|| ApiError::InvalidRequest("project_id is required".into()))?;
    let path = RepoPath::parse(param("path").unwrap_or_default())
        .map_err(|err| ApiError::PathInvalid(err.to_string()))?;
    let project_id = ProjectId::parse(project_id).ok_or(ApiError::ProjectNotFound)?;
    let project = state
        .engine
        .store
        .project(&project_id)
        .await?
        .ok_or(ApiError::ProjectNotFound)?;
    if project.owner != principal.user {
        return Err(ApiError::ProjectNotFound);
    }
    let commit = match kind {
        ReadKind::Diff => String::new(),
        _ => project
            .commit
            .clone()
            .ok_or_else(|| ApiError::NotFound("the project has no completed sync yet".into()))?,
    };

    let etag = format!(
        "\"{}-{:016x}\"",
        if commit.is_empty() {
            "diff"
        } else {
            &commit[..commit.len().min(12)]
        },
        fnv1a(&[
            &commit,
            &format!("{kind:?}"),
            path.as_str(),
            param("q").unwrap_or_default(),
            param("regex").unwrap_or_default(),
            param("path_prefix").unwrap_or_default(),
            param("limit").unwrap_or_default(),
            param("from").unwrap_or_default(),
            param("to").unwrap_or_default(),
            param("cursor").unwrap_or_default(),
        ])
    );
    // an ETag this hub gave names a representation of one commit, which never
    // changes: 304 before any work. `*` matches only a representation that exists
    // (RFC 9110 §13.1.2), so it is answered once the read found one
    let tags = || {
        if_none_match
            .into_iter()
            .flat_map(|tags| tags.split(','))
            .map(str::trim)
    };
    if tags().any(|tag| tag == etag) {
        let reply = warp::reply::with_header(StatusCode::NOT_MODIFIED, "etag", etag);
        return Ok(reply.into_response());
    }
    let any = tags().any(|tag| tag == "*");

    let reader = Arc::clone(&state.reader);
    let body = match kind {
        ReadKind::Tree => {
            let limit =
                super::query::parse_limit(param("limit"), DEFAULT_TREE_LIMIT, MAX_TREE_LIMIT)?;
            let after = param("cursor")
                .map(|cursor| TreeCursor::decode(cursor, &commit, &path))
                .transpose()?;
            let pass = state.reads.enter(&principal.user).await?;
            let (id, at) = (project_id.clone(), commit.clone());
            let path_for_read = path.clone();
            let page = blocking(pass, move || {
                reader.tree(&id, &at, &path_for_read, after.as_deref(), limit)
            })
            .await?;
            let next_cursor = page
                .next_after
                .map(|after| TreeCursor::encode(&commit, &path, &after));
            to_json(TreeListing {
                commit,
                path: path.as_str().to_owned(),
                entries: page.entries,
                next_cursor,
            })?
        }
        ReadKind::File => {
            if path.is_root() {
                return Err(ApiError::InvalidRequest("path is required".into()));
            }
            let pass = state.reads.enter(&principal.user).await?;
            let (id, at) = (project_id.clone(), commit.clone());
            let path_for_read = path.clone();
            let file = blocking(pass, move || reader.file(&id, &at, &path_for_read)).await?;
            to_json(FileView {
                commit,
                path: path.as_str().to_owned(),
                file,
            })?
        }
        ReadKind::Search => {
            let pattern = param("q")
                .filter(|q| !q.is_empty())
                .ok_or_else(|| ApiError::InvalidRequest("q is required".into()))?;
            let regex = match param("regex") {
                None | Some("false") | Some("0") => false,
                Some("true") | Some("1") => true,
                Some(_) => {
                    return Err(ApiError::InvalidRequest(
                        "regex must be true or false".into(),
                    ));
                }
            };
            let prefix = RepoPath::parse(param("path_prefix").unwrap_or_default())
                .map_err(|err| ApiError::PathInvalid(err.to_string()))?;
            let limit =
                super::query::parse_limit(param("limit"), DEFAULT_SEARCH_LIMIT, MAX_SEARCH_LIMIT)?;
            // refused before any work: too long or too expensive to compile
            crate::mirror::search::matcher(pattern, regex)?;
            let _slot = state
                .searches
                .take(&principal.user)
                .ok_or(ApiError::RateLimited {
                    retry_after: Duration::from_secs(1),
                })?;
            let pass = state.reads.enter(&principal.user).await?;
            let cancel = CancelOnDrop::new(state.read_stop.clone());
            let flag = Arc::clone(&cancel.flag);
            let (id, at, pattern) = (project_id.clone(), commit.clone(), pattern.to_owned());
            let outcome = blocking(pass, move || {
                let query = SearchQuery {
                    pattern: &pattern,
                    regex,
                    path_prefix: &prefix,
                    limit,
                    deadline: Instant::now() + SEARCH_BUDGET,
                    cancel: &flag,
                };
                reader.search(&id, &at, &query)
            })
            .await?;
            to_json(SearchResults {
                commit,
                matches: outcome.matches,
                truncated: outcome.truncated,
                timed_out: outcome.timed_out,
            })?
        }
        ReadKind::Diff => {
            let from = param("from")
                .ok_or_else(|| ApiError::InvalidRequest("from is required".into()))?
                .to_owned();
            let to = param("to")
                .ok_or_else(|| ApiError::InvalidRequest("to is required".into()))?
                .to_owned();
            let pass = state.reads.enter(&principal.user).await?;
            let cancel = CancelOnDrop::new(state.read_stop.clone());
            let flag = Arc::clone(&cancel.flag);
            let (id, limits) = (project_id.clone(), state.config.diff);
            let (from_read, to_read) = (from.clone(), to.clone());
            let outcome = blocking(pass, move || {
                reader.diff(&id, &from_read, &to_read, &limits, &flag)
            })
            .await?;
            if outcome.truncated && flag_set(&cancel) {
                // nobody waits for a cancelled diff's answer: do not cache a part of it
                return Err(ApiError::Unavailable("the diff was cancelled".into()));
            }
            to_json(DiffView {
                from,
                to,
                files: outcome.files,
                truncated: outcome.truncated,
            })?
        }
    };
    if body["timed_out"] == json!(true) {
        // a partial answer must not be served again for the same request
        return Ok(warp::reply::json(&body).into_response());
    }
    if any {
        let reply = warp::reply::with_header(StatusCode::NOT_MODIFIED, "etag", etag);
        return Ok(reply.into_response());
    }
    let reply = warp::reply::with_header(warp::reply::json(&body), "etag", etag);
    Ok(reply.into_response())
}

fn flag_set(cancel: &CancelOnDrop) -> bool {
    cancel.flag.load(Ordering::Relaxed)
}

/// `GET /api/v1/repo/tree`: the entries of one directory at the mirror's commit.
#[derive(Debug, Serialize, ToSchema)]
pub struct TreeListing {
    pub commit: String,
    pub path: String,
    pub entries: Vec<TreeEntry>,
    /// where the next page starts (pass it as `cursor`); `null` on the last page
    pub next_cursor: Option<String>,
}

/// `GET /api/v1/repo/file`: one file's content (base64 when it is not UTF-8).
#[derive(Debug, Serialize, ToSchema)]
pub struct FileView {
    pub commit: String,
    pub path: String,
    #[serde(flatten)]
    pub file: FileContent,
}

/// `GET /api/v1/repo/search`: matching lines; `timed_out` answers are partial.
#[derive(Debug, Serialize, ToSchema)]
pub struct SearchResults {
    pub commit: String,
    pub matches: Vec<SearchMatch>,
    pub truncated: bool,
    pub timed_out: bool,
}

/// `GET /api/v1/repo/diff`: the files changed between two commits.
#[derive(Debug, Serialize, ToSchema)]
pub struct DiffView {
    pub from: String,
    pub to: String,
    pub files: Vec<FileDiff>,
    pub truncated: bool,
}

fn to_json(body: impl Serialize) -> Result<serde_json::Value, ApiError> {
    serde_json::to_value(body).map_err(|err| ApiError::Backend(Box::new(err)))
}
