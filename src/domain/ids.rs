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

impl SyncId {
    /// A fresh id for a sync of `project`: a UUID v7 whose last byte (random in v7) is
    /// the project id's last byte, so a store partitioned by that byte (the Redis
    /// engine on a cluster) finds the sync beside its project from the id alone.
    pub fn generate_for(project: &str) -> Self {
        let mut bytes = *uuid::Uuid::now_v7().as_bytes();
        bytes[15] = partition_byte(project);
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
        let first = SyncId::generate_for(project.as_str());
        let second = SyncId::generate_for(project.as_str());
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
