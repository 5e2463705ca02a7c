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
    let mut incoming = Incoming::begin(&header, secret)?;
    incoming.update(body);
    incoming.finish(header)
}

/// Body bytes a delivery keeps for reading its `ref` (every forge puts `ref` among
/// the first keys of a push): past them the body only feeds the signature.
pub const KEPT: usize = 64 * 1024;

/// A delivery whose body is streaming in: its signature scheme, chosen and checked
/// for form from the headers alone (GitLab's token compared outright), the MAC of
/// every byte so far, and the body's first [`KEPT`] bytes.
pub struct Incoming {
    forge: Forge,
    /// `None` for GitLab's token, which signs nothing
    check: Option<(HmacSha256, Vec<u8>)>,
    kept: Vec<u8>,
    len: usize,
}

impl Incoming {
    /// Starts a delivery from its headers: `Err` when no signature header is there,
    /// or the one that decides is malformed, or GitLab's token is not the secret, so
    /// such a delivery is refused before its body is read.
    pub fn begin<'h>(
        header: &impl Fn(&str) -> Option<&'h str>,
        secret: &str,
    ) -> Result<Self, WebhookError> {
        let secret = secret.as_bytes();
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
            let mac = HmacSha256::new_from_slice(secret).expect("HMAC takes a key of any length");
            return Ok(Self::new(forge, Some((mac, claimed))));
        }
        if let Some(token) = header("x-gitlab-token") {
            // the token is the secret itself: compared in constant time (the lengths are
            // not secret: every project's secret has the same length)
            return if bool::from(token.as_bytes().ct_eq(secret)) {
                Ok(Self::new(Forge::GitLab, None))
            } else {
                Err(WebhookError::BadSignature)
            };
        }
        Err(WebhookError::MissingSignature)
    }

    fn new(forge: Forge, check: Option<(HmacSha256, Vec<u8>)>) -> Self {
        Self {
            forge,
            check,
            kept: Vec::new(),
            len: 0,
        }
    }

    /// The next piece of the body.
    pub fn update(&mut self, chunk: &[u8]) {
        if let Some((mac, _)) = &mut self.check {
            mac.update(chunk);
        }
        let room = KEPT.saturating_sub(self.kept.len());
        self.kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
        self.len = self.len.saturating_add(chunk.len());
    }

    /// Body bytes seen so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole body is in: `Err` unless the signature holds (compared in constant
    /// time); then what the delivery asks for.
    pub fn finish<'h>(
        self,
        header: impl Fn(&str) -> Option<&'h str>,
    ) -> Result<Delivery, WebhookError> {
        if let Some((mac, claimed)) = self.check {
            mac.verify_slice(&claimed)
                .map_err(|_| WebhookError::BadSignature)?;
        }
        let forge = self.forge;
        let event = |name: &str| header(name).map(str::trim).map(str::to_owned);
        let named = match forge {
            Forge::GitHub => event("x-github-event"),
            Forge::Gitea => event("x-gitea-event"),
            Forge::Forgejo => event("x-forgejo-event").or_else(|| event("x-gitea-event")),
            Forge::GitLab => event("x-gitlab-event"),
            Forge::Generic => event("x-hivesync-event"),
        };
        let body = &self.kept;
        let whole = self.len <= KEPT;
        let request = match (forge, named.as_deref()) {
            (_, Some("ping")) => Request::Ping,
            (Forge::GitLab, Some("Push Hook")) | (Forge::Generic, None) | (_, Some("push")) => {
                let git_ref = if whole {
                    push_ref(body)
                } else {
                    leading_ref(body)
                };
                match git_ref.filter(|git_ref| git_ref.len() <= 1024) {
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
            !id.is_empty()
                && id.len() <= MAX_DELIVERY_ID
                && id.bytes().all(|b| b.is_ascii_graphic())
        })
        .map(str::to_owned);
        Ok(Delivery { forge, request, id })
    }
}

/// The `ref` among the top-level keys of a JSON object of which `prefix` is the
/// beginning (the rest was not kept): keys are read in order until `ref`, the values
/// before it skipped; `None` when the prefix ends first or is not such an object.
pub fn leading_ref(prefix: &[u8]) -> Option<String> {
    let mut at = skip_space(prefix, 0);
    if prefix.get(at) != Some(&b'{') {
        return None;
    }
    at += 1;
    loop {
        at = skip_space(prefix, at);
        let end = string_end(prefix, at)?;
        let key: String = serde_json::from_slice(&prefix[at..end]).ok()?;
        at = skip_space(prefix, end);
        if prefix.get(at) != Some(&b':') {
            return None;
        }
        at = skip_space(prefix, at + 1);
        if key == "ref" {
            let end = string_end(prefix, at)?;
            return serde_json::from_slice(&prefix[at..end]).ok();
        }
        at = skip_space(prefix, value_end(prefix, at)?);
        match prefix.get(at) {
            Some(b',') => at += 1,
            _ => return None,
        }
    }
}

fn skip_space(bytes: &[u8], mut at: usize) -> usize {
    while bytes
        .get(at)
        .is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
    {
        at += 1;
    }
    at
}

/// Where the JSON string starting at `at` ends (one past its closing quote).
fn string_end(bytes: &[u8], at: usize) -> Option<usize> {
    if bytes.get(at) != Some(&b'"') {
        return None;
    }
    let mut i = at + 1;
    loop {
        match bytes.get(i)? {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
}

/// Where the JSON value starting at `at` ends: a string, an object or array (nested,
/// strings inside skipped whole), or a scalar up to the next delimiter.
fn value_end(bytes: &[u8], at: usize) -> Option<usize> {
    match bytes.get(at)? {
        b'"' => string_end(bytes, at),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = at;
            loop {
                match bytes.get(i)? {
                    b'"' => {
                        i = string_end(bytes, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth = depth.checked_sub(1)?;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        _ => {
            let len = bytes[at..]
                .iter()
                .position(|b| matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))?;
            (len > 0).then_some(at + len)
        }
    }
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

    #[test]
    fn a_ref_is_read_from_the_kept_prefix_of_a_long_body() {
        assert_eq!(
            leading_ref(br#" { "zen": "x\"}", "hook": {"a": [1, {"b": "]"}]}, "n": -1.5e3, "ok": true, "ref" : "refs/heads/m\u00e9" , "rest"#),
            Some("refs/heads/mé".to_owned())
        );
        assert_eq!(
            leading_ref(br#"{"before": "abc", "re"#),
            None,
            "cut before ref"
        );
        assert_eq!(leading_ref(br#"["ref", "x"]"#), None, "not an object");
        assert_eq!(leading_ref(br#"{"a": {"ref": "nested"}, "b"#), None);
        assert_eq!(leading_ref(br#"{"a": ]]]], "ref": "x"}"#), None);

        // a body far over what is kept: signed over all of it, its ref from the start
        let secret = "s3cret";
        let mut body = br#"{"ref": "refs/heads/main", "commits": ["#.to_vec();
        while body.len() < 3 * KEPT {
            body.extend_from_slice(br#"{"id": "0123456789abcdef", "message": "m"},"#);
        }
        body.extend_from_slice(br#"{}]}"#);
        let signature = sign(secret, &body);
        let pairs = [
            ("x-hub-signature-256", signature.as_str()),
            ("x-github-event", "push"),
        ];
        let header = headers(&pairs);
        let mut incoming = Incoming::begin(&header, secret).expect("a signature");
        for chunk in body.chunks(7_777) {
            incoming.update(chunk);
        }
        assert_eq!(incoming.len(), body.len());
        let delivery = incoming.finish(&header).expect("signed");
        assert_eq!(
            delivery.request,
            Request::Push {
                git_ref: "refs/heads/main".into()
            }
        );
        // one byte changed past what is kept still fails the signature
        let mut tampered = body.clone();
        let last = tampered.len() - 10;
        tampered[last] ^= 1;
        assert_eq!(
            verify(&header, &tampered, secret),
            Err(WebhookError::BadSignature)
        );
        // a ref only after what is kept is not guessed at
        let mut late = br#"{"commits": ["#.to_vec();
        late.extend(std::iter::repeat_n(b'1', 2 * KEPT));
        late.extend_from_slice(br#"], "ref": "refs/heads/main"}"#);
        let signature = sign(secret, &late);
        let pairs = [
            ("x-hub-signature-256", signature.as_str()),
            ("x-github-event", "push"),
        ];
        assert_eq!(
            verify(headers(&pairs), &late, secret).map(|d| d.request),
            Ok(Request::Other("push without a ref".into()))
        );
    }
}
