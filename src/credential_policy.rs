//! Who may send which named credential to which host (`HIVESYNC_CREDENTIAL_SCOPES`):
//! the one check that registration, a settings change and every sync make. The file
//! is read on every use, so an edit takes effect without a restart. No secret is read
//! here; only names, users and hosts.

use std::path::Path;

use crate::domain::{CredentialScopes, RepoUrl};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    /// The policy file is named but cannot be read or parsed: nothing is allowed.
    #[error("{0}")]
    Unreadable(String),
    /// The policy does not let this user send this credential to this host.
    #[error("{0}")]
    Refused(String),
}

/// The credential policy as the file says now. No file: no credential is usable.
pub fn load(path: Option<&Path>) -> Result<CredentialScopes, String> {
    let Some(path) = path else {
        return Ok(CredentialScopes::default());
    };
    let text = std::fs::read_to_string(path).map_err(|err| {
        format!(
            "cannot read HIVESYNC_CREDENTIAL_SCOPES ({}): {err}",
            path.display()
        )
    })?;
    CredentialScopes::parse(&text).map_err(|err| err.to_string())
}

/// Whether `owner` may send the credential `name` to the host of `url`, by the policy
/// at `path`.
pub fn check(
    path: Option<&Path>,
    name: &str,
    owner: &str,
    url: &RepoUrl,
) -> Result<(), PolicyError> {
    let scopes = load(path).map_err(PolicyError::Unreadable)?;
    let host = url.host().unwrap_or_default();
    scopes
        .check(name, owner, &host)
        .map_err(|refusal| PolicyError::Refused(refusal.to_string()))
}
