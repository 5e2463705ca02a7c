//! The OpenAPI 3.1 document at `GET /api/v1/openapi.json`: every operation comes from
//! the `#[utoipa::path]` on its handler, every schema from the wire type's
//! `ToSchema`. What is the same for every operation is added here: the error answers
//! any authenticated operation can give (401, and 500/503 when the backend fails) and
//! the security schemes. `tests/api/operating.rs` checks the document against the
//! routes the server answers, both ways.

use std::sync::OnceLock;

use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi as Document, RefOr, Response, ResponseBuilder};
use utoipa::{Modify, OpenApi, ToSchema};
use warp::Reply;

use super::{ops, projects, reads, syncs, webhooks};
use crate::protocol::ErrorBody;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "HiveSync Hub",
        description = "Authoritative git mirrors with live sync progress. Live events are \
            pushed over the WebSocket at /api/v1/ws (not described here: see API.md); every \
            REST operation is below.",
        license(name = "MIT")
    ),
    paths(
        ops::healthz,
        ops::readyz,
        ops::metrics,
        document,
        projects::list_projects,
        projects::create_project,
        projects::get_project,
        projects::patch_project,
        projects::delete_project,
        projects::resume,
        webhooks::create_webhook,
        webhooks::delete_webhook,
        webhooks::receive_webhook,
        reads::metadata,
        syncs::request_sync,
        syncs::list_syncs,
        syncs::get_sync,
        syncs::notifications,
        projects::mobile_projects,
        reads::tree,
        reads::file,
        reads::search,
        reads::diff,
    ),
    components(schemas(ErrorBody)),
    modifiers(&Common),
    tags(
        (name = "projects", description = "registering repos and their schedule"),
        (name = "syncs", description = "requesting syncs and reading their records"),
        (name = "events", description = "polling the events the socket pushes"),
        (name = "reads", description = "reading the mirror"),
        (name = "webhooks", description = "push webhooks from forges"),
        (name = "operations", description = "health, readiness, metrics, this document"),
    )
)]
struct Api;

/// This document.
#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    tag = "operations",
    responses(
        (status = 200, description = "the OpenAPI 3.1 document of every REST operation", content_type = "application/json", body = Object),
    )
)]
fn document() -> &'static Document {
    static DOCUMENT: OnceLock<Document> = OnceLock::new();
    DOCUMENT.get_or_init(Api::openapi)
}

/// The document as JSON, for tests and tools.
pub fn document_json() -> String {
    document()
        .to_pretty_json()
        .unwrap_or_else(|err| format!("{{\"error\":\"{err}\"}}"))
}

pub(super) fn document_response() -> super::extract::Response {
    warp::reply::with_header(document_json(), "content-type", "application/json").into_response()
}

struct Common;

impl Modify for Common {
    fn modify(&self, openapi: &mut Document) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "An HS256 or RS256/ES256 JWT: `sub` is the user, `client` one of desktop, ide, mobile",
                    ))
                    .build(),
            ),
        );
        let signature = |header: &str, what: &str| {
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(header, what)))
        };
        components.add_security_scheme(
            "github_signature",
            signature(
                "X-Hub-Signature-256",
                "GitHub: sha256=HMAC-SHA256(secret, body) in hex",
            ),
        );
        components.add_security_scheme(
            "gitea_signature",
            signature(
                "X-Gitea-Signature",
                "Gitea and Forgejo (also X-Forgejo-Signature): HMAC-SHA256(secret, body) in hex",
            ),
        );
        components.add_security_scheme(
            "gitlab_token",
            signature("X-Gitlab-Token", "GitLab: the secret itself"),
        );
        components.add_security_scheme(
            "hivesync_signature",
            signature(
                "X-HiveSync-Signature",
                "Any sender: sha256=HMAC-SHA256(secret, body) in hex",
            ),
        );

        let error = |description: &str| -> RefOr<Response> {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                            ErrorBody::name(),
                        ))))
                        .build(),
                )
                .build()
                .into()
        };
        for item in openapi.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.post,
                &mut item.patch,
                &mut item.delete,
                &mut item.put,
            ];
            for operation in operations.into_iter().flatten() {
                let authenticated = operation
                    .security
                    .as_ref()
                    .is_some_and(|requirements| !requirements.is_empty());
                let responses = &mut operation.responses.responses;
                if authenticated {
                    responses.entry("401".into()).or_insert_with(|| {
                        error(
                            "no token, or an invalid or expired one (invalid_token, token_expired)",
                        )
                    });
                }
                let never_fails = matches!(
                    operation.operation_id.as_deref(),
                    Some("healthz" | "document" | "metrics")
                );
                if !never_fails {
                    responses.entry("500".into()).or_insert_with(|| {
                        error("the backend failed (backend_error); the cause is in the hub's log")
                    });
                    responses.entry("503".into()).or_insert_with(|| {
                        error("the engine is unreachable (backend_error); retry")
                    });
                }
            }
        }
    }
}
