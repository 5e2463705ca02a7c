//! Credentials by name, read at run time only: file `HIVESYNC_SECRETS_DIR/<name>`, else
//! the environment variable `HIVESYNC_SECRET_<NAME>`. A secret never reaches a log, an
//! error or an event; its `Debug` is redacted.

use std::path::Path;

pub struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CredentialError {
    #[error(
        "credential '{0}' is not configured (no file in HIVESYNC_SECRETS_DIR and no HIVESYNC_SECRET_{1})"
    )]
    Missing(String, String),
}

/// The environment variable a credential name maps to: upper case, anything other
/// than letters and digits as `_`.
pub fn env_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

pub fn resolve(name: &str, secrets_dir: Option<&Path>) -> Result<Secret, CredentialError> {
    if let Some(dir) = secrets_dir
        && let Ok(value) = std::fs::read_to_string(dir.join(name))
    {
        return Ok(Secret(value));
    }
    let variable = env_name(name);
    std::env::var(format!("HIVESYNC_SECRET_{variable}"))
        .map(Secret)
        .map_err(|_| CredentialError::Missing(name.to_owned(), variable))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_come_first_and_names_map_to_env_variables() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("deploy-key"), "from file").expect("write");
        assert_eq!(
            resolve("deploy-key", Some(dir.path()))
                .expect("found")
                .expose(),
            "from file"
        );
        assert_eq!(env_name("deploy-key.v2"), "DEPLOY_KEY_V2");
        let missing = resolve("absent-credential-name", Some(dir.path())).expect_err("missing");
        assert!(
            missing
                .to_string()
                .contains("HIVESYNC_SECRET_ABSENT_CREDENTIAL_NAME")
        );
        assert_eq!(format!("{:?}", Secret("x".into())), "Secret(***)");
    }
}
