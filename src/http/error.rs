//! The one table from an API error to its contract code and HTTP status. Internal
//! causes are logged here with their chain and never shown to the client.

use std::time::Duration;

use http::StatusCode;
use warp::Reply;

use crate::auth::AuthError;
use crate::engine::EngineError;
use crate::error::error_chain;
use crate::mirror::read::ReadError;
use crate::protocol::ErrorBody;

/// What `Retry-After` tells a client when the engine is unreachable.
const UNAVAILABLE_RETRY_S: u64 = 2;
/// What `Retry-After` tells a client refused a WebSocket over a cap: a place frees
/// when one of its sockets closes, which it cannot see.
const SOCKETS_RETRY_S: u64 = 30;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    PathInvalid(String),
    #[error("missing or invalid bearer token")]
    InvalidToken,
    /// A well-formed token signed with another key: said, so a user whose token came
    /// from another data directory's dev secret knows what to fix.
    #[error(
        "the token's signature does not match this hub's key: it was minted with another secret (another HIVESYNC_JWT_SECRET, or `hivesync token` run where another data directory's dev secret was used)"
    )]
    TokenWrongKey,
    #[error("token expired")]
    TokenExpired,
    #[error("this project belongs to another user")]
    Forbidden,
    /// The credential policy refuses the caller this credential (or this host).
    #[error("{0}")]
    CredentialForbidden(String),
    #[error("mobile tokens read metadata only")]
    MobileMetadataOnly,
    #[error("no such project")]
    ProjectNotFound,
    #[error("no such sync")]
    SyncNotFound,
    #[error("{0}")]
    NotFound(String),
    #[error("request body is over 64 KiB")]
    PayloadTooLarge,
    #[error("webhook body is over 5 MiB")]
    WebhookTooLarge,
    #[error("{0}")]
    InvalidSignature(String),
    #[error("too many sync requests; retry in {} s", retry_after.as_secs().max(1))]
    RateLimited { retry_after: Duration },
    #[error("free space on the data volume is under the configured floor")]
    StorageFull,
    /// A WebSocket over the per-user or the hub's cap.
    #[error("{0}")]
    TooManyConnections(String),
    /// Over a per-user or the hub's limit on concurrent work (reads, webhook
    /// deliveries): the message names the limit; retry after `retry_after`.
    #[error("{message}")]
    Busy {
        message: String,
        retry_after: Duration,
    },
    /// Over a per-user quota (projects registered).
    #[error("{0}")]
    QuotaExceeded(String),
    #[error("internal error")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("service unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ApiError {
    pub fn code_and_status(&self) -> (&'static str, StatusCode) {
        match self {
            ApiError::InvalidRequest(_) => ("invalid_request", StatusCode::BAD_REQUEST),
            ApiError::PathInvalid(_) => ("path_invalid", StatusCode::BAD_REQUEST),
            ApiError::InvalidToken | ApiError::TokenWrongKey => {
                ("invalid_token", StatusCode::UNAUTHORIZED)
            }
            ApiError::TokenExpired => ("token_expired", StatusCode::UNAUTHORIZED),
            ApiError::Forbidden | ApiError::CredentialForbidden(_) => {
                ("forbidden", StatusCode::FORBIDDEN)
            }
            ApiError::MobileMetadataOnly => ("mobile_metadata_only", StatusCode::FORBIDDEN),
            ApiError::ProjectNotFound => ("project_not_found", StatusCode::NOT_FOUND),
            ApiError::SyncNotFound => ("sync_not_found", StatusCode::NOT_FOUND),
            ApiError::NotFound(_) => ("not_found", StatusCode::NOT_FOUND),
            ApiError::PayloadTooLarge | ApiError::WebhookTooLarge => {
                ("payload_too_large", StatusCode::PAYLOAD_TOO_LARGE)
            }
            ApiError::InvalidSignature(_) => ("invalid_signature", StatusCode::UNAUTHORIZED),
            ApiError::RateLimited { .. }
            | ApiError::Busy { .. }
            | ApiError::TooManyConnections(_) => ("rate_limited", StatusCode::TOO_MANY_REQUESTS),
            ApiError::StorageFull => ("storage_full", StatusCode::INSUFFICIENT_STORAGE),
            ApiError::QuotaExceeded(_) => ("quota_exceeded", StatusCode::FORBIDDEN),
            ApiError::Backend(_) => ("backend_error", StatusCode::INTERNAL_SERVER_ERROR),
            ApiError::Unavailable(_) => ("backend_error", StatusCode::SERVICE_UNAVAILABLE),
        }
    }

    pub fn into_response(self) -> warp::reply::Response {
        let (code, status) = self.code_and_status();
        if let ApiError::Backend(cause) | ApiError::Unavailable(cause) = &self {
            tracing::error!(error = %error_chain(cause.as_ref()), status = status.as_u16(), "request failed");
        }
        let body = ErrorBody {
            error: code.to_owned(),
            message: self.to_string(),
        };
        let reply = warp::reply::with_status(warp::reply::json(&body), status);
        match &self {
            ApiError::RateLimited { retry_after } | ApiError::Busy { retry_after, .. } => {
                let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                warp::reply::with_header(reply, "retry-after", seconds.max(1).to_string())
                    .into_response()
            }
            ApiError::Unavailable(_) => {
                warp::reply::with_header(reply, "retry-after", UNAVAILABLE_RETRY_S.to_string())
                    .into_response()
            }
            ApiError::TooManyConnections(_) => {
                warp::reply::with_header(reply, "retry-after", SOCKETS_RETRY_S.to_string())
                    .into_response()
            }
            _ => reply.into_response(),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(err: EngineError) -> Self {
        // each backend says when it cannot be reached; this layer only maps that
        let unreachable = matches!(err, EngineError::Closed | EngineError::Unavailable(_));
        match err {
            // a project deleted while the request ran
            EngineError::ProjectGone => ApiError::ProjectNotFound,
            // the engine cannot be reached now: try again shortly
            err if unreachable => ApiError::Unavailable(Box::new(err)),
            err => ApiError::Backend(Box::new(err)),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> Self {
        match err {
            AuthError::Invalid => ApiError::InvalidToken,
            AuthError::Expired => ApiError::TokenExpired,
            AuthError::WrongKey => ApiError::TokenWrongKey,
        }
    }
}

impl From<ReadError> for ApiError {
    fn from(err: ReadError) -> Self {
        match err {
            ReadError::NotFound(message) => ApiError::NotFound(message),
            ReadError::Invalid(message) => ApiError::InvalidRequest(message),
            ReadError::Git(cause) => ApiError::Backend(cause),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_contract_code_has_its_status() {
        let table = [
            (
                ApiError::InvalidRequest(String::new()),
                "invalid_request",
                400,
            ),
            (ApiError::PathInvalid(String::new()), "path_invalid", 400),
            (ApiError::InvalidToken, "invalid_token", 401),
            (ApiError::TokenWrongKey, "invalid_token", 401),
            (ApiError::TokenExpired, "token_expired", 401),
            (ApiError::Forbidden, "forbidden", 403),
            (
                ApiError::CredentialForbidden(String::new()),
                "forbidden",
                403,
            ),
            (ApiError::MobileMetadataOnly, "mobile_metadata_only", 403),
            (ApiError::ProjectNotFound, "project_not_found", 404),
            (ApiError::SyncNotFound, "sync_not_found", 404),
            (ApiError::NotFound(String::new()), "not_found", 404),
            (ApiError::PayloadTooLarge, "payload_too_large", 413),
            (ApiError::WebhookTooLarge, "payload_too_large", 413),
            (
                ApiError::InvalidSignature(String::new()),
                "invalid_signature",
                401,
            ),
            (
                ApiError::RateLimited {
                    retry_after: Duration::from_secs(1),
                },
                "rate_limited",
                429,
            ),
            (ApiError::StorageFull, "storage_full", 507),
            (
                ApiError::QuotaExceeded(String::new()),
                "quota_exceeded",
                403,
            ),
            (
                ApiError::TooManyConnections(String::new()),
                "rate_limited",
                429,
            ),
            (ApiError::Backend("x".into()), "backend_error", 500),
            (ApiError::Unavailable("x".into()), "backend_error", 503),
        ];
        for (error, code, status) in table {
            assert_eq!(
                error.code_and_status(),
                (code, StatusCode::from_u16(status).expect("valid"))
            );
        }
    }
}
