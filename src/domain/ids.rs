//! Identifiers that end up in file paths and store keys, so they are parsed, never trusted.

use std::fmt;

macro_rules! uuid_id {
    ($name:ident, $doc:literal) => {
        #[doc = $doc]
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// A fresh, time-ordered id (UUID v7), so store keys sort by creation time.
            pub fn generate() -> Self {
                Self(uuid::Uuid::now_v7().hyphenated().to_string())
            }

            /// Accepts only the canonical hyphenated lowercase UUID form: that form is
            /// safe as a path component and a key.
            pub fn parse(input: &str) -> Option<Self> {
                let parsed = uuid::Uuid::try_parse(input).ok()?;
                let canonical = parsed.hyphenated().to_string();
                (canonical == input).then_some(Self(canonical))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

uuid_id!(ProjectId, "A project's id; names its mirror directory.");
uuid_id!(SyncId, "A sync's id; sorts by the time it was requested.");

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn generated_ids_round_trip_and_sort_by_time() {
        let first = SyncId::generate();
        let second = SyncId::generate();
        assert_eq!(SyncId::parse(first.as_str()), Some(first.clone()));
        assert!(first < second);
    }

    #[test]
    fn non_canonical_forms_are_refused() {
        let id = ProjectId::generate();
        assert!(ProjectId::parse(&id.as_str().to_uppercase()).is_none());
        assert!(ProjectId::parse(&id.as_str().replace('-', "")).is_none());
        assert!(ProjectId::parse("../etc").is_none());
        assert!(ProjectId::parse("").is_none());
    }

    proptest! {
        #[test]
        fn accepted_ids_are_safe_path_components(input in ".{0,64}") {
            if let Some(id) = ProjectId::parse(&input) {
                prop_assert!(id.as_str().chars().all(|c| c.is_ascii_hexdigit() || c == '-'));
                prop_assert_eq!(id.as_str().len(), 36);
            }
        }
    }
}
