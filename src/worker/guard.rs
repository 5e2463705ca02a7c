//! The connect-time half of the private-host guard. Registration refuses private
//! addresses however they are spelled; here, before each attempt, the repo's host name
//! is resolved and every address it has is checked, so a name that resolves to
//! loopback or a private range (an `/etc/hosts` entry, a DNS record pointing inwards)
//! is refused too. The checked address is what the attempt connects to (handed to ssh
//! as the host to dial, and to the https client as the name's only address), so a
//! second lookup cannot be rebound to a private one.

use std::net::{IpAddr, SocketAddr};

use crate::domain::{Host, RepoUrl, is_public};
use crate::mirror::MirrorError;

/// Where an attempt may connect, after the check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Checked {
    /// The host as written in the URL (lowercase, no brackets).
    pub host: String,
    pub port: u16,
    /// The first address the host resolved to; every one of them passed the check.
    pub address: IpAddr,
}

/// Resolves the host of `url` and checks every address it has. `Ok(None)` for URLs
/// with no network host (`file://`) and when private hosts are allowed.
pub(super) async fn check_remote(
    url: &RepoUrl,
    allow_private_hosts: bool,
) -> Result<Option<Checked>, MirrorError> {
    if allow_private_hosts {
        return Ok(None);
    }
    let parsed = url.parsed();
    let Some(raw_host) = parsed.host() else {
        return Ok(None);
    };
    let port = parsed
        .port
        .unwrap_or_else(|| default_port(parsed.scheme.clone()));
    let refused = |address: IpAddr| {
        MirrorError::PrivateAddress(format!(
            "the repo host {raw_host} resolves to {address}, a loopback or private address this hub does not connect to (HIVESYNC_ALLOW_PRIVATE_HOSTS)"
        ))
    };
    let host = Host::parse(raw_host).map_err(|_| {
        MirrorError::PrivateAddress(format!("the repo host {raw_host} is not a valid host"))
    })?;
    let addresses: Vec<IpAddr> = match &host {
        Host::Ip(address) => vec![*address],
        Host::Name(name) if host.is_private() => {
            return Err(MirrorError::PrivateAddress(format!(
                "the repo host {name} is this machine, which this hub does not connect to"
            )));
        }
        Host::Name(name) => tokio::net::lookup_host((name.as_str(), port))
            .await
            .map_err(|err| MirrorError::Network(Box::new(err)))?
            .map(|socket: SocketAddr| socket.ip())
            .collect(),
    };
    let Some(first) = addresses.first().copied() else {
        return Err(MirrorError::Network(
            format!("the repo host {raw_host} has no address").into(),
        ));
    };
    if let Some(private) = addresses
        .iter()
        .copied()
        .find(|address| !is_public(*address))
    {
        return Err(refused(private));
    }
    Ok(Some(Checked {
        host: raw_host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase(),
        port,
        address: first,
    }))
}

fn default_port(scheme: gix::url::Scheme) -> u16 {
    match scheme {
        gix::url::Scheme::Ssh => 22,
        gix::url::Scheme::Http => 80,
        gix::url::Scheme::Git => 9418,
        _ => 443,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(url: &str) -> RepoUrl {
        RepoUrl::from_stored(url.to_owned()).expect("a url")
    }

    #[tokio::test]
    async fn loopback_by_any_spelling_or_name_is_refused() {
        for url in [
            "https://127.0.0.1/r.git",
            "https://127.1/r.git",
            "https://2130706433/r.git",
            "https://[::ffff:127.0.0.1]/r.git",
            "ssh://git@0x7f000001/r.git",
            "git@127.1:r.git",
            "https://localhost/r.git",
        ] {
            let checked = check_remote(&stored(url), false).await;
            assert!(
                matches!(checked, Err(MirrorError::PrivateAddress(_))),
                "{url}: {checked:?}"
            );
        }
    }

    #[tokio::test]
    async fn public_addresses_pass_and_are_pinned_and_allowing_skips_the_check() {
        let checked = check_remote(&stored("ssh://git@8.8.8.8:2222/r.git"), false)
            .await
            .expect("public")
            .expect("a network host");
        assert_eq!(checked.port, 2222);
        assert_eq!(checked.address, "8.8.8.8".parse::<IpAddr>().expect("ip"));
        assert_eq!(
            check_remote(&stored("https://127.0.0.1/r.git"), true)
                .await
                .expect("allowed"),
            None
        );
        assert_eq!(
            check_remote(&stored("file:///tmp/r"), false)
                .await
                .expect("local"),
            None
        );
    }
}
