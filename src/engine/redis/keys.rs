//! Every key the Redis engine uses, under the configured prefix: one builder each, so
//! a key's shape is found by name.

/// Every key the engine uses, under the prefix.
#[derive(Debug, Clone)]
pub(super) struct Keys {
    pub prefix: String,
}

impl Keys {
    pub(super) fn project(&self, id: &str) -> String {
        format!("{}:project:{id}", self.prefix)
    }
    pub(super) fn owner(&self, owner: &str) -> String {
        format!("{}:owner:{owner}", self.prefix)
    }
    pub(super) fn sync(&self, id: &str) -> String {
        format!("{}:sync:{id}", self.prefix)
    }
    pub(super) fn project_syncs(&self, project: &str) -> String {
        format!("{}:project-syncs:{project}", self.prefix)
    }
    pub(super) fn rate(&self, user: &str) -> String {
        format!("{}:rate:{user}", self.prefix)
    }
    pub(super) fn jobs(&self) -> String {
        format!("{}:jobs", self.prefix)
    }
    pub(super) fn lock(&self, project: &str) -> String {
        format!("{}:lock:{project}", self.prefix)
    }
    pub(super) fn fence(&self, project: &str) -> String {
        format!("{}:fence:{project}", self.prefix)
    }
    pub(super) fn event_seq(&self, user: &str) -> String {
        format!("{}:event-seq:{user}", self.prefix)
    }
    pub(super) fn events(&self, user: &str) -> String {
        format!("{}:events:{user}", self.prefix)
    }
    pub(super) fn channel(&self) -> String {
        format!("{}:events", self.prefix)
    }
    /// The pattern of every project hash, for SCAN.
    pub(super) fn projects_pattern(&self) -> String {
        format!("{}:project:*", self.prefix)
    }
    /// projects with a schedule, scored by due time (ms)
    pub(super) fn due(&self) -> String {
        format!("{}:due", self.prefix)
    }
    pub(super) fn delivery(&self, project: &str, delivery: &str) -> String {
        format!("{}:delivery:{project}:{delivery}", self.prefix)
    }
    pub(super) fn webhook_rate(&self, project: &str) -> String {
        format!("{}:webhook-rate:{project}", self.prefix)
    }
    pub(super) fn watchdog(&self) -> String {
        format!("{}:watchdog", self.prefix)
    }
}
