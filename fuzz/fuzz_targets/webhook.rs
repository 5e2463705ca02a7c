//! Feeds arbitrary headers and bodies to the webhook verifier: nothing may panic; a
//! delivery is accepted only when it carries a correct signature of its body (or
//! GitLab's token equal to the secret); and one signed here is always accepted.
#![no_main]

use hivesync::domain::webhook::{Forge, sign, verify};
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const NAMES: [&str; 12] = [
    "x-hub-signature-256",
    "x-hivesync-signature",
    "x-gitea-signature",
    "x-forgejo-signature",
    "x-gitlab-token",
    "x-github-event",
    "x-gitea-event",
    "x-gitlab-event",
    "x-hivesync-event",
    "x-github-delivery",
    "x-gitlab-event-uuid",
    "x-hivesync-delivery",
];

fuzz_target!(|data: &[u8]| {
    // layout: a header count, then per header a name index and a value up to a NUL,
    // then the body
    let Some((&count, mut rest)) = data.split_first() else { return };
    let mut headers: Vec<(&str, String)> = Vec::new();
    for _ in 0..(count % 6) {
        let Some((&name, tail)) = rest.split_first() else { return };
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        headers.push((
            NAMES[usize::from(name) % NAMES.len()],
            String::from_utf8_lossy(&tail[..end]).into_owned(),
        ));
        rest = tail.get(end + 1..).unwrap_or_default();
    }
    let body = rest;
    let lookup = |list: &[(&str, String)], name: &str| {
        list.iter()
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value.clone())
    };
    let owned = headers.clone();
    let found = verify(|name| owned.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str()), body, SECRET);
    if let Ok(delivery) = &found {
        // accepted: the deciding header really holds the signature or the token
        let expected = sign(SECRET, body);
        let ok = match delivery.forge {
            // hex digits in either case
            Forge::GitHub => lookup(&headers, "x-hub-signature-256")
                .map(|v| v.trim().strip_prefix("sha256=").map(str::to_ascii_lowercase)
                    == expected.strip_prefix("sha256=").map(str::to_owned)),
            Forge::Generic => lookup(&headers, "x-hivesync-signature")
                .map(|v| v.trim().strip_prefix("sha256=").map(str::to_ascii_lowercase)
                    == expected.strip_prefix("sha256=").map(str::to_owned)),
            Forge::Forgejo => lookup(&headers, "x-forgejo-signature")
                .map(|v| format!("sha256={}", v.trim().to_ascii_lowercase()) == expected),
            Forge::Gitea => lookup(&headers, "x-gitea-signature")
                .map(|v| format!("sha256={}", v.trim().to_ascii_lowercase()) == expected),
            Forge::GitLab => lookup(&headers, "x-gitlab-token").map(|v| v == SECRET),
        };
        assert_eq!(ok, Some(true), "accepted without a valid signature: {headers:?}");
    }
    // the same body signed correctly is always accepted
    let signed = [("x-hub-signature-256", sign(SECRET, body))];
    assert!(
        verify(|name| signed.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str()), body, SECRET).is_ok()
    );
});
