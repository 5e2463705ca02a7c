//! Transport credentials. Secrets by name, read at run time only: file
//! `HIVESYNC_SECRETS_DIR/<name>`, else the environment variable `HIVESYNC_SECRET_<NAME>`;
//! and what a project's credential becomes for one attempt: an ssh command with a
//! private key file, or an https login. A secret never reaches a log, an error or an
//! event; its `Debug` is redacted.

use std::path::Path;

use super::WorkerSettings;
use super::guard::Checked;
use crate::engine::Project;
use crate::mirror::{self, MirrorError};

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

/// Whether `project`'s owner may send its credential `name` to the project's host;
/// checked before the secret is even read.
fn check_scope(
    project: &Project,
    name: &str,
    settings: &WorkerSettings,
) -> Result<(), MirrorError> {
    crate::credential_policy::check(
        settings.credential_scopes.as_deref(),
        name,
        &project.owner,
        &project.repo_url,
    )
    .map_err(|err| MirrorError::CredentialRefused(err.to_string()))
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

/// Private files of one ssh attempt, deleted when it ends: the credential's key, and
/// ssh's own log, the only place that tells a host-key rejection from a dropped line.
pub(super) struct SshFiles {
    _key: Option<tempfile::NamedTempFile>,
    log: tempfile::NamedTempFile,
}

pub(super) enum SshRefusal {
    HostKey,
    Credentials,
}

impl SshFiles {
    pub(super) fn refusal(&self) -> Option<SshRefusal> {
        let log = std::fs::read_to_string(self.log.path()).ok()?;
        if log.contains("Host key verification failed")
            || log.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
        {
            return Some(SshRefusal::HostKey);
        }
        log.contains("Permission denied")
            .then_some(SshRefusal::Credentials)
    }
}

/// For an ssh URL: the ssh command with the host-key policy and, when the project
/// names a credential, its key in a private temporary file.
pub(super) fn ssh_setup(
    project: &Project,
    settings: &WorkerSettings,
    pinned: Option<&Checked>,
) -> Result<(Option<String>, Option<SshFiles>), MirrorError> {
    let is_ssh = *project.repo_url.scheme() == gix::url::Scheme::Ssh;
    if !is_ssh {
        return Ok((None, None));
    }
    let log = tempfile::Builder::new()
        .prefix("hivesync-ssh-")
        .tempfile()
        .map_err(MirrorError::Io)?;
    let mut command = format!(
        "ssh -o BatchMode=yes -o ConnectTimeout=20 -E '{}'",
        log.path().display()
    );
    match &settings.ssh_known_hosts {
        Some(known_hosts) => command.push_str(&format!(
            " -o StrictHostKeyChecking=yes -o UserKnownHostsFile='{}'",
            known_hosts.display()
        )),
        None => command.push_str(" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"),
    }
    if let Some(pinned) = pinned {
        // connect to the address the guard checked, and look its key up under the
        // name (as known_hosts writes it), so a second lookup cannot be rebound
        let alias = if pinned.port == 22 {
            pinned.host.clone()
        } else {
            format!("[{}]:{}", pinned.host, pinned.port)
        };
        command.push_str(&format!(
            " -o HostName={} -o HostKeyAlias='{alias}'",
            pinned.address
        ));
    }
    let Some(name) = &project.credential else {
        return Ok((Some(command), Some(SshFiles { _key: None, log })));
    };
    check_scope(project, name, settings)?;
    let secret = resolve(name, settings.secrets_dir.as_deref())
        .map_err(|err| MirrorError::CredentialMissing(err.to_string()))?;
    let mut key = tempfile::Builder::new()
        .prefix("hivesync-key-")
        .tempfile()
        .map_err(MirrorError::Io)?;
    {
        use std::io::Write;
        let mut text = secret.expose().to_owned();
        if !text.ends_with('\n') {
            text.push('\n');
        }
        key.write_all(text.as_bytes()).map_err(MirrorError::Io)?;
        key.flush().map_err(MirrorError::Io)?;
    }
    command.push_str(&format!(
        " -o IdentitiesOnly=yes -i '{}'",
        key.path().display()
    ));
    Ok((
        Some(command),
        Some(SshFiles {
            _key: Some(key),
            log,
        }),
    ))
}

/// For an http(s) URL whose project names a credential: the login to present. The
/// secret is a token (sent with the URL's user name, else `x-access-token`, which
/// GitHub, Gitea and others accept with a token) or `username:token`.
pub(super) fn http_identity(
    project: &Project,
    settings: &WorkerSettings,
) -> Result<Option<mirror::HttpIdentity>, MirrorError> {
    let url = project.repo_url.parsed();
    if !matches!(url.scheme, gix::url::Scheme::Http | gix::url::Scheme::Https) {
        return Ok(None);
    }
    let Some(name) = &project.credential else {
        return Ok(None);
    };
    check_scope(project, name, settings)?;
    let secret = resolve(name, settings.secrets_dir.as_deref())
        .map_err(|err| MirrorError::CredentialMissing(err.to_string()))?;
    let secret = secret.expose().trim();
    let (username, password) = match secret.split_once(':') {
        Some((user, token)) if !user.is_empty() && !token.is_empty() => {
            (user.to_owned(), token.to_owned())
        }
        _ => (
            url.user().unwrap_or("x-access-token").to_owned(),
            secret.to_owned(),
        ),
    };
    Ok(Some(mirror::HttpIdentity { username, password }))
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

    fn settings() -> WorkerSettings {
        WorkerSettings {
            sync_timeout: std::time::Duration::from_secs(60),
            secrets_dir: None,
            credential_scopes: None,
            ssh_known_hosts: None,
            https_ca_file: None,
            retry_base: std::time::Duration::from_secs(1),
            retry_max: 1,
            allow_private_hosts: false,
            min_free_bytes: 0,
            housekeeping: Default::default(),
            quota: Default::default(),
            owner_max_running: None,
            file_roots: Default::default(),
        }
    }

    fn project(url: &str, credential: Option<&str>) -> Project {
        Project::new(
            crate::domain::ProjectId::generate(),
            "p".into(),
            crate::domain::RepoUrl::from_stored(url.into()).expect("a url"),
            "main".into(),
            "alice".into(),
            credential.map(str::to_owned),
            None,
        )
    }

    #[test]
    fn ssh_connects_to_the_checked_address_and_keeps_known_hosts_by_name() {
        let pinned = Checked {
            host: "git.example.com".into(),
            port: 2222,
            address: "203.0.114.7".parse().expect("ip"),
        };
        let project = project("ssh://git@git.example.com:2222/r.git", None);
        let (command, _files) = ssh_setup(&project, &settings(), Some(&pinned)).expect("ssh setup");
        let command = command.expect("an ssh command");
        assert!(command.contains("-o HostName=203.0.114.7"), "{command}");
        assert!(
            command.contains("-o HostKeyAlias='[git.example.com]:2222'"),
            "{command}"
        );
    }

    #[test]
    fn a_credential_outside_its_scope_is_refused_before_the_secret_is_read() {
        let project = project("https://git.example.com/r.git", Some("org-token"));
        let refused = http_identity(&project, &settings()).expect_err("no policy: refused");
        assert!(
            matches!(refused, MirrorError::CredentialRefused(_)),
            "{refused}"
        );
    }
}
