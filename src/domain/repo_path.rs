//! A path inside a repository as a client names it: relative, `/`-separated, no `..`,
//! no `.` or empty components, no NUL, backslash or control characters. Anything else
//! is refused, so an accepted path can never name something outside the tree.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct RepoPathError(&'static str);

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RepoPath(String);

impl RepoPath {
    /// `""` and `"/"` are the root; one trailing `/` is allowed.
    pub fn parse(input: &str) -> Result<Self, RepoPathError> {
        if input.len() > 4096 {
            return Err(RepoPathError("path is too long"));
        }
        if input
            .chars()
            .any(|c| c == '\0' || c == '\\' || c.is_control())
        {
            return Err(RepoPathError(
                "path contains NUL, a backslash or a control character",
            ));
        }
        if input.is_empty() || input == "/" {
            return Ok(Self::default());
        }
        if input.starts_with('/') {
            return Err(RepoPathError(
                "path must be relative to the repository root",
            ));
        }
        let trimmed = input.strip_suffix('/').unwrap_or(input);
        for component in trimmed.split('/') {
            match component {
                "" => return Err(RepoPathError("path has an empty component")),
                "." | ".." => return Err(RepoPathError("path may not contain '.' or '..'")),
                _ => {}
            }
        }
        Ok(Self(trimmed.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// `self/name`, or `name` at the root.
    pub fn join(&self, name: &str) -> String {
        if self.is_root() {
            name.to_owned()
        } else {
            format!("{}/{name}", self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn traversal_and_absolute_paths_are_refused() {
        for bad in [
            "..",
            "../x",
            "a/../b",
            "a/..",
            "/etc/passwd",
            "a//b",
            "./a",
            "a/./b",
            "a\\..\\b",
            "a\0b",
            "C:\\x",
            "a\nb",
        ] {
            assert!(RepoPath::parse(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn ordinary_paths_are_kept() {
        assert_eq!(
            RepoPath::parse("src/lib.rs").expect("valid").as_str(),
            "src/lib.rs"
        );
        assert_eq!(RepoPath::parse("src/").expect("valid").as_str(), "src");
        assert!(RepoPath::parse("").expect("root").is_root());
        assert!(RepoPath::parse("/").expect("root").is_root());
        assert_eq!(
            RepoPath::parse("..hidden/a...b")
                .expect("dots inside names are fine")
                .as_str(),
            "..hidden/a...b"
        );
        assert_eq!(RepoPath::parse("").expect("root").join("a"), "a");
    }

    proptest! {
        /// Whatever is accepted resolves inside the root: joined onto a base directory
        /// and normalized lexically, it never climbs above the base.
        #[test]
        fn no_accepted_path_escapes(input in "[a-z./\\\\\\x00]{0,24}") {
            if let Ok(path) = RepoPath::parse(&input) {
                let mut depth: i64 = 0;
                for component in path.as_str().split('/').filter(|c| !c.is_empty()) {
                    prop_assert!(component != "." && component != "..");
                    depth += 1;
                }
                prop_assert!(depth >= 0);
                prop_assert!(!path.as_str().starts_with('/'));
                prop_assert!(!path.as_str().contains('\0') && !path.as_str().contains('\\'));
            }
        }

        #[test]
        fn arbitrary_unicode_never_panics(input in any::<String>()) {
            let _ = RepoPath::parse(&input);
        }
    }
}
