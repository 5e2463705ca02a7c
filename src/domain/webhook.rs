//! Push webhooks: whose signature a delivery carries, whether it holds (in constant
//! time, over the raw body), and what the delivery asks for. Pure: the HTTP layer
//! hands in the headers and body, the engine does the rest.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// Delivery ids longer than this, or with other than visible ASCII, are not used for
/// de-duplication (they are not what any forge sends).
const MAX_DELIVERY_ID: usize = 128;

/// A project's webhook secret: derived from the server's key, the project and a nonce
/// that rotation replaces, so the secret itself is stored nowhere.
pub fn derive_secret(key: &[u8], project_id: &str, nonce: &str) -> String {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(b"hivesync webhook secret v1\0");
    mac.update(project_id.as_bytes());
    mac.update(b"\0");
    mac.update(nonce.as_bytes());
    hex(&mac.finalize().into_bytes())
}

/// Which signature scheme a delivery was checked with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forge {
    GitHub,
    Gitea,
    Forgejo,
    GitLab,
    Generic,
}

/// What a delivery with a valid signature asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// a push to `refs/...`
    Push { git_ref: String },
    /// the forge checking the hook works
    Ping,
    /// any other event, by the name the forge gave it
    Other(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub forge: Forge,
    pub request: Request,
    /// the forge's id of this delivery, when it sent a usable one
    pub id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    #[error("no webhook signature header")]
    MissingSignature,
    #[error("the webhook signature does not match")]
    BadSignature,
}

/// Checks a delivery's signature against `secret` and reads what it asks for.
/// `header` looks a header up by lower-case name. The signature is checked before
/// the body is parsed at all.
pub fn verify<'h>(
    header: impl Fn(&str) -> Option<&'h str>,
    body: &[u8],
    secret: &str,
) -> Result<Delivery, WebhookError> {
    let forge = check_signature(&header, body, secret.as_bytes())?;
    let event = |name: &str| header(name).map(str::trim).map(str::to_owned);
    let named = match forge {
        Forge::GitHub => event("x-github-event"),
        Forge::Gitea => event("x-gitea-event"),
        Forge::Forgejo => event("x-forgejo-event").or_else(|| event("x-gitea-event")),
        Forge::GitLab => event("x-gitlab-event"),
        Forge::Generic => event("x-hivesync-event"),
    };
    let request = match (forge, named.as_deref()) {
        (_, Some("ping")) => Request::Ping,
        (Forge::GitLab, Some("Push Hook")) | (Forge::Generic, None) | (_, Some("push")) => {
            match push_ref(body) {
                Some(git_ref) => Request::Push { git_ref },
                None => Request::Other("push without a ref".to_owned()),
            }
        }
        (_, Some(other)) => Request::Other(other.chars().take(64).collect()),
        (_, None) => Request::Other("no event name".to_owned()),
    };
    let id = [
        "x-github-delivery",
        "x-gitlab-event-uuid",
        "x-gitea-delivery",
        "x-forgejo-delivery",
        "x-hivesync-delivery",
    ]
    .iter()
    .find_map(|name| header(name))
    .map(str::trim)
    .filter(|id| {
        !id.is_empty() && id.len() <= MAX_DELIVERY_ID && id.bytes().all(|b| b.is_ascii_graphic())
    })
    .map(str::to_owned);
    Ok(Delivery { forge, request, id })
}

/// The first signature header present decides the scheme; it must hold.
fn check_signature<'h>(
    header: &impl Fn(&str) -> Option<&'h str>,
    body: &[u8],
    secret: &[u8],
) -> Result<Forge, WebhookError> {
    let hmac_schemes = [
        ("x-hub-signature-256", Some("sha256="), Forge::GitHub),
        ("x-hivesync-signature", Some("sha256="), Forge::Generic),
        ("x-forgejo-signature", None, Forge::Forgejo),
        ("x-gitea-signature", None, Forge::Gitea),
    ];
    for (name, prefix, forge) in hmac_schemes {
        let Some(value) = header(name) else { continue };
        let value = value.trim();
        let hex_digest = match prefix {
            Some(prefix) => value
                .strip_prefix(prefix)
                .ok_or(WebhookError::BadSignature)?,
            None => value,
        };
        let claimed = unhex(hex_digest).ok_or(WebhookError::BadSignature)?;
        let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes a key of any length");
        mac.update(body);
        // `verify_slice` compares in constant time
        return mac
            .verify_slice(&claimed)
            .map(|()| forge)
            .map_err(|_| WebhookError::BadSignature);
    }
    if let Some(token) = header("x-gitlab-token") {
        // the token is the secret itself: compared in constant time (the lengths are
        // not secret: every project's secret has the same length)
        return if bool::from(token.as_bytes().ct_eq(secret)) {
            Ok(Forge::GitLab)
        } else {
            Err(WebhookError::BadSignature)
        };
    }
    Err(WebhookError::MissingSignature)
}

/// The `ref` of a push payload, without building the rest of it.
fn push_ref(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Push {
        #[serde(rename = "ref")]
        git_ref: String,
    }
    serde_json::from_slice::<Push>(body)
        .ok()
        .map(|push| push.git_ref)
        .filter(|git_ref| git_ref.len() <= 1024)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() != 64 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(text.get(at..at + 2)?, 16).ok())
        .collect()
}

/// `sha256=<hex>`: the generic scheme's header value for `body` (and GitHub's).
pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac =
        HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes a key of any length");
    mac.update(body);
    format!("sha256={}", hex(&mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<&'a str> {
        move |name| {
            pairs
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(name))
                .map(|(_, value)| *value)
        }
    }

    #[test]
    fn githubs_documented_test_vector_verifies() {
        // https://docs.github.com/en/webhooks/using-webhooks/validating-webhook-deliveries
        let secret = "It's a Secret to Everybody";
        let body = b"Hello, World!";
        let signature = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert_eq!(sign(secret, body), signature);
        let delivery = verify(
            headers(&[
                ("X-Hub-Signature-256", signature),
                ("X-GitHub-Event", "ping"),
            ]),
            body,
            secret,
        )
        .expect("the documented signature holds");
        assert_eq!(delivery.forge, Forge::GitHub);
        assert_eq!(delivery.request, Request::Ping);
        let tampered = verify(
            headers(&[("X-Hub-Signature-256", signature)]),
            b"Hello, World?",
            secret,
        );
        assert_eq!(tampered, Err(WebhookError::BadSignature));
    }

    #[test]
    fn each_forge_is_read_by_its_own_headers() {
        let secret = "s3cret";
        let body = br#"{"ref":"refs/heads/main","before":"x"}"#;
        let signed = sign(secret, body);
        let bare = signed.trim_start_matches("sha256=").to_owned();
        let cases: Vec<(Vec<(&str, &str)>, Forge)> = vec![
            (
                vec![("x-hub-signature-256", &signed), ("x-github-event", "push")],
                Forge::GitHub,
            ),
            (
                vec![("x-gitea-signature", &bare), ("x-gitea-event", "push")],
                Forge::Gitea,
            ),
            (
                vec![("x-forgejo-signature", &bare), ("x-forgejo-event", "push")],
                Forge::Forgejo,
            ),
            (
                vec![("x-gitlab-token", secret), ("x-gitlab-event", "Push Hook")],
                Forge::GitLab,
            ),
            (vec![("x-hivesync-signature", &signed)], Forge::Generic),
        ];
        for (pairs, forge) in cases {
            let delivery = verify(headers(&pairs), body, secret).expect("valid");
            assert_eq!(delivery.forge, forge);
            assert_eq!(
                delivery.request,
                Request::Push {
                    git_ref: "refs/heads/main".into()
                }
            );
        }
    }

    #[test]
    fn forgeries_and_missing_signatures_are_refused() {
        let body = br#"{"ref":"refs/heads/main"}"#;
        let wrong = sign("other", body);
        for pairs in [
            vec![("x-hub-signature-256", wrong.as_str())],
            vec![("x-hub-signature-256", "sha1=abc")],
            vec![("x-hub-signature-256", "sha256=zz")],
            vec![("x-gitea-signature", "")],
            vec![("x-gitlab-token", "s3cre")],
            vec![("x-gitlab-token", "s3cret ")],
        ] {
            assert_eq!(
                verify(headers(&pairs), body, "s3cret"),
                Err(WebhookError::BadSignature),
                "{pairs:?}"
            );
        }
        assert_eq!(
            verify(headers(&[("x-github-event", "push")]), body, "s3cret"),
            Err(WebhookError::MissingSignature)
        );
    }

    #[test]
    fn other_events_and_delivery_ids() {
        let secret = "k";
        let body = br#"{"ref":"refs/tags/v1"}"#;
        let signed = sign(secret, body);
        let delivery = verify(
            headers(&[
                ("x-hub-signature-256", &signed),
                ("x-github-event", "issues"),
                ("x-github-delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958"),
            ]),
            body,
            secret,
        )
        .expect("valid");
        assert_eq!(delivery.request, Request::Other("issues".into()));
        assert_eq!(
            delivery.id.as_deref(),
            Some("72d3162e-cc78-11e3-81ab-4c9367dc0958")
        );
        let long = "x".repeat(500);
        let delivery = verify(
            headers(&[
                ("x-hivesync-signature", &signed),
                ("x-hivesync-delivery", &long),
            ]),
            body,
            secret,
        )
        .expect("valid");
        assert_eq!(delivery.id, None, "an id no forge would send is not used");
        assert_eq!(
            delivery.request,
            Request::Push {
                git_ref: "refs/tags/v1".into()
            }
        );
    }

    #[test]
    fn secrets_differ_per_project_and_nonce() {
        let a = derive_secret(b"key", "p1", "n1");
        assert_eq!(a.len(), 64);
        assert_eq!(a, derive_secret(b"key", "p1", "n1"));
        assert_ne!(a, derive_secret(b"key", "p2", "n1"));
        assert_ne!(a, derive_secret(b"key", "p1", "n2"));
        assert_ne!(a, derive_secret(b"other", "p1", "n1"));
    }
}
