//! Fetching the tracked branch into the mirror's repository: open (or create) it,
//! connect with the sync's credentials only, receive the pack.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use gix::progress::tree::Root;

use super::error::classify_connect;
use super::{HttpIdentity, MirrorError, SyncSpec};

/// Opens the mirror's repository, or creates it; a repository that will not open is
/// deleted and created again (`repaired`).
pub(crate) fn open_or_init(
    git_dir: &Path,
    overrides: &[String],
) -> Result<(gix::Repository, bool), MirrorError> {
    let options =
        || gix::open::Options::isolated().config_overrides(overrides.iter().map(String::as_str));
    let mut repaired = false;
    if git_dir.exists() {
        // a repository left bare by a first clone killed before it was set up (before
        // set-ups were made whole and renamed in): set it up now
        let config = git_dir.join("config");
        if let Ok(text) = std::fs::read_to_string(&config)
            && text.contains("bare = true")
        {
            std::fs::write(&config, text.replace("bare = true", "bare = false"))?;
        }
        match gix::open_opts(git_dir, options()) {
            Ok(repo) => return Ok((repo, false)),
            Err(_) => {
                std::fs::remove_dir_all(git_dir)?;
                repaired = true;
            }
        }
    }
    let parent = git_dir
        .parent()
        .ok_or_else(|| MirrorError::Io(std::io::Error::other("a mirror path has a parent")))?;
    std::fs::create_dir_all(parent)?;
    // made complete under a temporary name, then renamed into place: a sync killed
    // half-way leaves no repository that opens but is set up wrong
    let name = git_dir
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let staging = parent.join(format!(".{name}.init"));
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    gix::init_bare(&staging).map_err(|err| MirrorError::Corrupt(Box::new(err)))?;
    // not bare, so `git` run in a snapshot (whose .git points here) treats the snapshot
    // as the work tree; there is no worktree of its own
    let config = staging.join("config");
    let text = std::fs::read_to_string(&config)?;
    std::fs::write(
        &config,
        text.replace("bare = true", "bare = false") + "\tsymlinks = false\n",
    )?;
    std::fs::rename(&staging, git_dir)?;
    let repo =
        gix::open_opts(git_dir, options()).map_err(|err| MirrorError::Corrupt(Box::new(err)))?;
    Ok((repo, repaired))
}

/// The http(s) transport's options: what the repository's configuration says
/// (`http.followRedirects=false` among them), plus what only the reqwest client can be
/// told: the CA file in place of the system's roots, no proxy from the environment, and
/// the host pinned to the address the private-host guard checked, so a second lookup
/// cannot be rebound to a private one.
fn http_options(
    repo: &gix::Repository,
    url: &gix::Url,
    spec: &SyncSpec<'_>,
) -> Result<Box<dyn std::any::Any>, MirrorError> {
    use gix::protocol::transport::client::blocking_io::http;
    crate::tls::ensure_provider();
    let url_text = url.to_bstring();
    let url_text: &gix::bstr::BStr = url_text.as_ref();
    let mut options = repo
        .transport_options(url_text, None)
        .map_err(|err| MirrorError::Git(err.to_string().into()))?
        .and_then(|options| options.downcast::<http::Options>().ok())
        .map(|options| *options)
        .unwrap_or_default();
    let roots = match &spec.https_ca_file {
        Some(path) => {
            let pem = std::fs::read(path)?;
            let certificates = reqwest::Certificate::from_pem_bundle(&pem).map_err(|err| {
                MirrorError::Io(std::io::Error::other(format!(
                    "HIVESYNC_HTTPS_CA_FILE {} holds no usable certificate: {err}",
                    path.display()
                )))
            })?;
            Some(certificates)
        }
        None => None,
    };
    let pinned = spec.pinned.clone();
    let configure = move |mut builder: reqwest::blocking::ClientBuilder| {
        builder = builder.no_proxy();
        if let Some(roots) = roots.clone() {
            builder = builder.tls_certs_only(roots);
        }
        if let Some((host, address)) = &pinned {
            builder = builder.resolve(host, *address);
        }
        Ok(builder)
    };
    let backend = http::reqwest::Options {
        configure_client: Some(Box::new(configure)),
        configure_request: None,
    };
    options.backend = Some(std::sync::Arc::new(std::sync::Mutex::new(backend)));
    Ok(Box::new(options))
}

pub(crate) fn fetch(
    repo: &gix::Repository,
    spec: &SyncSpec<'_>,
    progress: &Root,
    interrupt: &AtomicBool,
) -> Result<(gix::ObjectId, Transfer), MirrorError> {
    let tracking = format!("refs/remotes/origin/{}", spec.branch);
    let refspec = format!("+refs/heads/{}:{tracking}", spec.branch);
    let mut url = spec.url.parsed().clone();
    // over http(s), the login goes through the credentials callback only: from the
    // project's credential, else from the URL's userinfo, which is taken off the URL
    let mut identity = spec.http_identity.clone();
    let is_http = matches!(url.scheme, gix::url::Scheme::Http | gix::url::Scheme::Https);
    if is_http {
        if identity.is_none()
            && let (Some(user), Some(password)) = (url.user(), url.password())
        {
            identity = Some(HttpIdentity {
                username: user.to_owned(),
                password: password.to_owned(),
            });
        }
        url.set_user(None);
        url.set_password(None);
    }
    let transport_options = if is_http {
        Some(http_options(repo, &url, spec)?)
    } else {
        None
    };
    // an anonymous remote: the URL (and any credential in it) is never written to disk
    let remote = repo
        .remote_at(url)
        .map_err(|err| MirrorError::RepoNotFound(Box::new(err)))?
        .with_refspecs([refspec.as_str()], gix::remote::Direction::Fetch)
        .map_err(|err| MirrorError::Git(Box::new(err)))?
        .with_fetch_tags(gix::remote::fetch::Tags::None);
    let mut fetch_progress = progress.add_child("fetch");
    let mut connection = remote
        .connect(gix::remote::Direction::Fetch)
        .map_err(|err| classify_connect(Box::new(err)))?;
    if let Some(options) = transport_options {
        connection = connection.with_transport_options(options);
    }
    let connection = connection
        // never a prompt or a configured helper: the identity above, or none
        .with_credentials(move |action| {
            Ok(match action {
                gix::credentials::helper::Action::Get(context) => {
                    identity
                        .clone()
                        .map(|identity| gix::credentials::protocol::Outcome {
                            identity: gix::sec::identity::Account {
                                username: identity.username,
                                password: identity.password,
                                oauth_refresh_token: None,
                            },
                            next: context.into(),
                        })
                }
                _ => None,
            })
        });
    let prepared = connection
        .prepare_fetch(&mut fetch_progress, Default::default())
        .map_err(|err| classify_connect(Box::new(err)))?;
    // the server lists the refs our refspec asks for; no branch means nothing to fetch
    let branch_ref = format!("refs/heads/{}", spec.branch);
    let advertised = prepared.ref_map().remote_refs.iter().any(|remote_ref| {
        let (name, _, _) = remote_ref.unpack();
        name == branch_ref.as_bytes()
    });
    if !advertised {
        return Err(MirrorError::BranchNotFound(spec.branch.to_owned()));
    }
    let outcome = prepared
        .receive(&mut fetch_progress, interrupt)
        .map_err(|err| {
            if interrupt.load(std::sync::atomic::Ordering::Relaxed) {
                return MirrorError::Interrupted;
            }
            match remote_failure(progress) {
                Some(said) => MirrorError::RemoteAborted(said),
                None => classify_connect(Box::new(err)),
            }
        })?;
    let id = repo
        .find_reference(tracking.as_str())
        .map_err(|_| MirrorError::BranchNotFound(spec.branch.to_owned()))?
        .peel_to_id()
        .map_err(|err| MirrorError::Corrupt(Box::new(err)))?
        .detach();
    // gix drops its progress items when the transfer ends, so the totals come from
    // what was written
    let transfer = match &outcome.status {
        gix::remote::fetch::Status::Change {
            write_pack_bundle, ..
        } => Transfer {
            objects: u64::from(write_pack_bundle.index.num_objects),
            bytes: write_pack_bundle
                .data_path
                .as_ref()
                .and_then(|path| std::fs::metadata(path).ok())
                .map_or(0, |meta| meta.len()),
        },
        gix::remote::fetch::Status::NoPackReceived { .. } => Transfer::default(),
    };
    Ok((id, transfer))
}

/// What the remote said on git's error channel (side-band 3) during the transfer, if
/// anything: gix hands it to the progress tree as a failure of the "remote" task,
/// whose name holds the remote's last progress line (git's `fatal:` line from
/// pack-objects lands there). Control characters are dropped and the text is capped:
/// the remote chooses it.
fn remote_failure(progress: &Root) -> Option<String> {
    const CAP: usize = 400;
    let mut messages = Vec::new();
    progress.copy_messages(&mut messages);
    let said: Vec<String> = messages
        .iter()
        .filter(|message| message.level == gix::progress::prodash::messages::MessageLevel::Failure)
        .map(|message| format!("{}; {}", message.origin, message.message))
        .collect();
    if said.is_empty() {
        return None;
    }
    let text: String = said
        .join("; ")
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    Some(match text.char_indices().nth(CAP) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text,
    })
}

#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Transfer {
    pub objects: u64,
    pub bytes: u64,
}
