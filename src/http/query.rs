//! Query strings, decoded strictly: a `%` must start a two-digit hex escape and the
//! decoded bytes must be UTF-8. A lossy decoder would turn `path=%ff` into U+FFFD and
//! read a different path than the client sent; here it is `400 invalid_request`.

use std::collections::HashMap;

use super::error::ApiError;
use crate::domain::RepoPath;

/// Cursors longer than this were not made by this hub (a name is at most 4 KiB).
const MAX_CURSOR: usize = 8 * 1024;

/// Parses `a=1&b=two+words`; a key given twice keeps its last value.
pub fn parse_query(raw: &str) -> Result<HashMap<String, String>, ApiError> {
    let mut params = HashMap::new();
    for pair in raw.split('&').filter(|pair| !pair.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        params.insert(decode(key)?, decode(value)?);
    }
    Ok(params)
}

fn decode(text: &str) -> Result<String, ApiError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'+' => out.push(b' '),
            b'%' => {
                let escape = bytes
                    .get(index + 1..index + 3)
                    .and_then(|hex| std::str::from_utf8(hex).ok())
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                    .ok_or_else(|| {
                        ApiError::InvalidRequest(
                            "invalid query string: a '%' must start a two-digit hex escape".into(),
                        )
                    })?;
                out.push(escape);
                index += 2;
            }
            byte => out.push(byte),
        }
        index += 1;
    }
    String::from_utf8(out).map_err(|_| {
        ApiError::InvalidRequest("invalid query string: a parameter is not UTF-8".into())
    })
}

/// An optional `limit` from 1 to `max`, `default` when absent.
pub(super) fn parse_limit(
    raw: Option<&str>,
    default: usize,
    max: usize,
) -> Result<usize, ApiError> {
    match raw {
        None => Ok(default),
        Some(raw) => raw
            .parse::<usize>()
            .ok()
            .filter(|limit| (1..=max).contains(limit))
            .ok_or_else(|| {
                ApiError::InvalidRequest(format!("limit must be a number from 1 to {max}"))
            }),
    }
}

/// Where the next page of a directory listing starts: opaque to clients, bound to the
/// commit and directory it was given for.
pub struct TreeCursor;

impl TreeCursor {
    const VERSION: &'static str = "t1";

    pub fn encode(commit: &str, path: &RepoPath, after: &str) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(
            "{}\n{commit}\n{}\n{after}",
            Self::VERSION,
            path.as_str()
        ))
    }

    /// The name the page starts after; a cursor of another commit or directory (or
    /// none this hub made) is `invalid_request`.
    pub fn decode(cursor: &str, commit: &str, path: &RepoPath) -> Result<String, ApiError> {
        use base64::Engine as _;
        let invalid = |why: &str| ApiError::InvalidRequest(format!("cursor {why}"));
        if cursor.len() > MAX_CURSOR {
            return Err(invalid("is too long"));
        }
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(cursor)
            .ok()
            .and_then(|raw| String::from_utf8(raw).ok())
            .ok_or_else(|| invalid("is not one this hub gave"))?;
        let mut parts = raw.splitn(4, '\n');
        let (Some(Self::VERSION), Some(of_commit), Some(of_path), Some(after)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid("is not one this hub gave"));
        };
        if of_commit != commit {
            return Err(invalid(
                "is from another commit: the project synced since; list from the start",
            ));
        }
        if of_path != path.as_str() {
            return Err(invalid("is from another directory"));
        }
        Ok(after.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn escapes_and_plus_decode_and_bad_ones_are_refused() {
        let params = parse_query("q=two+words&path=src%2Flib.rs&empty=&flag").expect("valid");
        assert_eq!(params["q"], "two words");
        assert_eq!(params["path"], "src/lib.rs");
        assert_eq!(params["empty"], "");
        assert_eq!(params["flag"], "");
        assert_eq!(parse_query("q=%C3%A9").expect("utf-8")["q"], "é");
        for bad in ["path=%ff", "q=%zz", "q=%", "q=%4", "q=%C3", "%ff=x"] {
            assert!(
                matches!(parse_query(bad), Err(ApiError::InvalidRequest(_))),
                "{bad}"
            );
        }
        assert_eq!(parse_query("a=1&a=2").expect("valid")["a"], "2");
    }

    proptest! {
        #[test]
        fn what_form_urlencoding_writes_reads_back(value in "\\PC{0,40}") {
            let encoded = serde_urlencoded::to_string([("v", value.as_str())]).expect("encodes");
            prop_assert_eq!(&parse_query(&encoded).expect("decodes")["v"], &value);
        }
    }
}
