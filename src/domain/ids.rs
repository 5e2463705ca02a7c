//! Identifiers that end up in file paths and store keys, so they are parsed, never trusted.

use std::fmt;

macro_rules! uuid_id {
    ($name:ident, $doc:literal) => {
        #[doc = $doc]
        ///
        /// (De)serializes as its string; a string that does not parse is refused, so a
        /// record that holds one was checked when it was read.
        #[derive(
            Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
        )]
        #[serde(try_from = "String", into = "String")]
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

        impl TryFrom<String> for $name {
            type Error = InvalidId;

            fn try_from(input: String) -> Result<Self, InvalidId> {
                Self::parse(&input).ok_or(InvalidId(stringify!($name)))
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }

        impl PartialEq<$name> for String {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }

        impl PartialEq<$name> for &str {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }
    };
}

/// A string that is not an id's canonical form.
#[derive(Debug, thiserror::Error)]
#[error("not a canonical {0} (a lowercase hyphenated UUID)")]
pub struct InvalidId(&'static str);

uuid_id!(ProjectId, "A project's id; names its mirror directory.");
uuid_id!(SyncId, "A sync's id; sorts by the time it was requested.");

impl SyncId {
    /// A fresh id for a sync of `project`: a UUID v7 whose last byte (random in v7) is
    /// the project id's last byte, so a store partitioned by that byte (the Redis
    /// engine on a cluster) finds the sync beside its project from the id alone.
    pub fn generate_for(project: &ProjectId) -> Self {
        let mut bytes = *uuid::Uuid::now_v7().as_bytes();
        bytes[15] = partition_byte(project.as_str());
        Self(uuid::Uuid::from_bytes(bytes).hyphenated().to_string())
    }
}

/// The byte an id is partitioned by: the last byte of a canonical UUID, else (ids
/// that did not come from here) a hash of the whole string.
pub fn partition_byte(id: &str) -> u8 {
    let tail = id.get(id.len().saturating_sub(2)..).unwrap_or("");
    match (id.len(), u8::from_str_radix(tail, 16)) {
        (36, Ok(byte)) if !tail.starts_with('+') => byte,
        _ => id
            .bytes()
            .fold(0x811c_9dc5_u32, |hash, byte| {
                (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
            })
            .to_le_bytes()[0],
    }
}

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
    fn a_sync_id_carries_its_projects_partition_byte_and_still_sorts_by_time() {
        let project = ProjectId::generate();
        let first = SyncId::generate_for(&project);
        let second = SyncId::generate_for(&project);
        assert_eq!(SyncId::parse(first.as_str()), Some(first.clone()));
        assert!(first < second);
        assert_eq!(
            partition_byte(first.as_str()),
            partition_byte(project.as_str())
        );
        let parsed = uuid::Uuid::parse_str(first.as_str()).expect("a uuid");
        assert_eq!(parsed.get_version_num(), 7);
        // ids of another shape still get a stable byte
        assert_eq!(partition_byte("alice"), partition_byte("alice"));
        assert_ne!(partition_byte("alice"), partition_byte("bob"));
    }

    #[test]
    fn non_canonical_forms_are_refused() {
        let id = ProjectId::generate();
        assert!(ProjectId::parse(&id.as_str().to_uppercase()).is_none());
        assert!(ProjectId::parse(&id.as_str().replace('-', "")).is_none());
        assert!(ProjectId::parse("../etc").is_none());
        assert!(ProjectId::parse("").is_none());
    }

    #[test]
    fn an_id_reads_back_from_json_only_in_its_canonical_form() {
        let id = ProjectId::generate();
        let json = serde_json::to_string(&id).expect("serializes");
        assert_eq!(json, format!("\"{id}\""));
        let back: ProjectId = serde_json::from_str(&json).expect("reads back");
        assert_eq!(back, id);
        let upper = json.to_uppercase();
        let refused = serde_json::from_str::<ProjectId>(&upper).expect_err("not canonical");
        assert!(refused.to_string().contains("ProjectId"), "{refused}");
        assert!(serde_json::from_str::<SyncId>("\"../x\"").is_err());
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
