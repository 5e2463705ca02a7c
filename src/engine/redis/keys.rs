//! Every key the Redis engine uses, under the configured prefix: one builder each, so
//! a key's shape is found by name.
//!
//! On one Redis the keys are `P:project:<id>`, `P:jobs`, `P:events:<user>`, … as they
//! have always been. On a cluster every key carries a hash tag so that what one Lua
//! script touches shares a slot:
//!
//! - `{sN}`, the project's **shard** (`N` = the project id's partition byte mod
//!   [`SHARDS`]): the project hash, its syncs and their index, its lock, fence, webhook
//!   deliveries and rate, and the shard's own job stream, due set and project set. A
//!   sync's id carries its project's partition byte, so its record is found from the
//!   id alone.
//! - `{uN}`, the user's **group** (`N` = a hash of the user id mod [`USER_GROUPS`]):
//!   the user's event sequence and history, the once keys of their events, the sharded
//!   pub/sub channel their events go out on (shared by the group), their project list
//!   and their rate limit.
//!
//! Both counts are fixed: changing one moves every key.

use crate::domain::partition_byte;

/// Job shards on a cluster (a power of two, at most 256: the shard is taken from one
/// byte). Each is one stream, one due set and one slot.
pub const SHARDS: u16 = 16;
/// User groups on a cluster: the sharded pub/sub channels, and the slots user keys
/// spread over.
pub const USER_GROUPS: u16 = 128;

/// Every key the engine uses, under the prefix.
#[derive(Debug, Clone)]
pub(super) struct Keys {
    pub prefix: String,
    pub cluster: bool,
}

impl Keys {
    /// How many job shards there are: one on a single Redis.
    pub(super) fn shards(&self) -> u16 {
        if self.cluster { SHARDS } else { 1 }
    }

    /// The shard of a project or sync id.
    pub(super) fn shard_of(&self, id: impl AsRef<str>) -> u16 {
        if self.cluster {
            u16::from(partition_byte(id.as_ref())) % SHARDS
        } else {
            0
        }
    }

    /// The group of a user.
    pub(super) fn group_of(&self, user: &str) -> u16 {
        if self.cluster {
            let hash = user.bytes().fold(0x811c_9dc5_u32, |hash, byte| {
                (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
            });
            (hash % u32::from(USER_GROUPS)) as u16
        } else {
            0
        }
    }

    /// `P` on one Redis, `P:{sN}` on a cluster.
    fn in_shard(&self, shard: u16) -> String {
        if self.cluster {
            format!("{}:{{s{shard}}}", self.prefix)
        } else {
            self.prefix.clone()
        }
    }

    fn of_project(&self, id: impl AsRef<str>) -> String {
        self.in_shard(self.shard_of(id))
    }

    fn of_user(&self, user: &str) -> String {
        self.in_group(self.group_of(user))
    }

    fn in_group(&self, group: u16) -> String {
        if self.cluster {
            format!("{}:{{u{group}}}", self.prefix)
        } else {
            self.prefix.clone()
        }
    }

    pub(super) fn project(&self, id: impl AsRef<str>) -> String {
        let id = id.as_ref();
        format!("{}:project:{id}", self.of_project(id))
    }
    pub(super) fn owner(&self, owner: &str) -> String {
        format!("{}:owner:{owner}", self.of_user(owner))
    }
    /// A sync's record; the id's partition byte is its project's.
    pub(super) fn sync(&self, id: impl AsRef<str>) -> String {
        let id = id.as_ref();
        format!("{}:sync:{id}", self.of_project(id))
    }
    pub(super) fn project_syncs(&self, project: impl AsRef<str>) -> String {
        let project = project.as_ref();
        format!("{}:project-syncs:{project}", self.of_project(project))
    }
    pub(super) fn rate(&self, user: &str) -> String {
        format!("{}:rate:{user}", self.of_user(user))
    }
    /// The job stream of a shard.
    pub(super) fn jobs(&self, shard: u16) -> String {
        format!("{}:jobs", self.in_shard(shard))
    }
    /// The job stream a project's jobs go on.
    pub(super) fn jobs_of(&self, project: impl AsRef<str>) -> String {
        self.jobs(self.shard_of(project))
    }
    /// The sharded channel a cluster shard's job stream rings when a job is added.
    pub(super) fn bell(&self, shard: u16) -> String {
        format!("{}:jobs-bell", self.in_shard(shard))
    }
    pub(super) fn bell_of(&self, project: impl AsRef<str>) -> String {
        self.bell(self.shard_of(project))
    }
    pub(super) fn lock(&self, project: impl AsRef<str>) -> String {
        let project = project.as_ref();
        format!("{}:lock:{project}", self.of_project(project))
    }
    pub(super) fn fence(&self, project: impl AsRef<str>) -> String {
        let project = project.as_ref();
        format!("{}:fence:{project}", self.of_project(project))
    }
    pub(super) fn event_seq(&self, user: &str) -> String {
        format!("{}:event-seq:{user}", self.of_user(user))
    }
    /// Marks that the event of `user` with the caller's `once` key was published (the
    /// user's length first: names and keys may hold `:` and still never collide).
    pub(super) fn event_once(&self, user: &str, once: &str) -> String {
        format!(
            "{}:event-once:{}:{user}:{once}",
            self.of_user(user),
            user.len()
        )
    }
    pub(super) fn events(&self, user: &str) -> String {
        format!("{}:events:{user}", self.of_user(user))
    }
    /// The channel a user's events are published on: one for all on a single Redis,
    /// the group's sharded channel on a cluster.
    pub(super) fn channel(&self, user: &str) -> String {
        self.group_channel(self.group_of(user))
    }
    pub(super) fn group_channel(&self, group: u16) -> String {
        if self.cluster {
            format!("{}:events-of-group", self.in_group(group))
        } else {
            format!("{}:events", self.prefix)
        }
    }
    /// The SCAN pattern of every project hash on one Redis (the prefix's glob
    /// characters escaped).
    pub(super) fn projects_pattern(&self) -> String {
        let mut pattern = String::new();
        for c in self.prefix.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern.push_str(":project:*");
        pattern
    }
    /// Every project of a shard, for the watchdog.
    pub(super) fn projects(&self, shard: u16) -> String {
        format!("{}:projects", self.in_shard(shard))
    }
    /// projects with a schedule, scored by due time (ms)
    pub(super) fn due(&self, shard: u16) -> String {
        format!("{}:due", self.in_shard(shard))
    }
    pub(super) fn due_of(&self, project: impl AsRef<str>) -> String {
        self.due(self.shard_of(project))
    }
    pub(super) fn delivery(&self, project: impl AsRef<str>, delivery: &str) -> String {
        let project = project.as_ref();
        format!("{}:delivery:{project}:{delivery}", self.of_project(project))
    }
    pub(super) fn webhook_rate(&self, project: impl AsRef<str>) -> String {
        let project = project.as_ref();
        format!("{}:webhook-rate:{project}", self.of_project(project))
    }
    /// The jobs workers run, for fair shares by owner: a sorted set of
    /// `<owner length>:<owner><project> <lease token>` scored by when it lapses (ms since the
    /// epoch) unless its heartbeat renews it. One key for all shards (its own slot on
    /// a cluster): the choice between owners is one decision over every shard.
    pub(super) fn running(&self) -> String {
        if self.cluster {
            format!("{}:{{fair}}:running", self.prefix)
        } else {
            format!("{}:running", self.prefix)
        }
    }
    /// When each owner last had a job started (ms since the epoch, by owner), so
    /// owners running equally take turns; beside [`Keys::running`].
    pub(super) fn served(&self) -> String {
        if self.cluster {
            format!("{}:{{fair}}:served", self.prefix)
        } else {
            format!("{}:served", self.prefix)
        }
    }
    pub(super) fn watchdog(&self) -> String {
        format!("{}:watchdog", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{ProjectId, SyncId};

    /// The part of a key Redis Cluster hashes.
    fn hashed(key: &str) -> &str {
        match key.find('{') {
            Some(open) => match key[open + 1..].find('}') {
                Some(len) if len > 0 => &key[open + 1..open + 1 + len],
                _ => key,
            },
            None => key,
        }
    }

    #[test]
    fn one_redis_keeps_the_old_layout() {
        let keys = Keys {
            prefix: "hs".into(),
            cluster: false,
        };
        assert_eq!(keys.project("p"), "hs:project:p");
        assert_eq!(keys.jobs_of("p"), "hs:jobs");
        assert_eq!(keys.events("u"), "hs:events:u");
        assert_eq!(keys.event_once("u", "k"), "hs:event-once:1:u:k");
        assert_ne!(
            keys.event_once("org", "alice:k"),
            keys.event_once("org:alice", "k"),
            "a `:` in a name or key makes no collision"
        );
        assert_eq!(keys.channel("u"), "hs:events");
        assert_eq!(keys.due_of("p"), "hs:due");
        assert_eq!(keys.shards(), 1);
    }

    #[test]
    fn on_a_cluster_what_a_script_touches_shares_one_tag() {
        let keys = Keys {
            prefix: "hs".into(),
            cluster: true,
        };
        let project = ProjectId::generate();
        let sync = SyncId::generate_for(&project);
        let project = project.as_str();
        let tag = hashed(&keys.project(project)).to_owned();
        assert!(tag.starts_with('s'), "{tag}");
        for key in [
            keys.sync(sync.as_str()),
            keys.project_syncs(project),
            keys.jobs_of(project),
            keys.bell_of(project),
            keys.due_of(project),
            keys.lock(project),
            keys.fence(project),
            keys.projects(keys.shard_of(project)),
            keys.delivery(project, "d"),
            keys.webhook_rate(project),
        ] {
            assert_eq!(hashed(&key), tag, "{key}");
        }
        let user = "org:alice";
        let tag = hashed(&keys.events(user)).to_owned();
        assert!(tag.starts_with('u'), "{tag}");
        for key in [
            keys.event_seq(user),
            keys.event_once(user, "k"),
            keys.channel(user),
            keys.owner(user),
            keys.rate(user),
        ] {
            assert_eq!(hashed(&key), tag, "{key}");
        }
    }

    #[test]
    fn projects_spread_over_every_shard_and_users_over_every_group() {
        let keys = Keys {
            prefix: "hs".into(),
            cluster: true,
        };
        let mut shards = std::collections::HashSet::new();
        let mut groups = std::collections::HashSet::new();
        for n in 0..4000 {
            shards.insert(keys.shard_of(ProjectId::generate().as_str()));
            groups.insert(keys.group_of(&format!("user-{n}")));
        }
        assert_eq!(shards.len(), usize::from(SHARDS));
        assert_eq!(groups.len(), usize::from(USER_GROUPS));
    }
}
