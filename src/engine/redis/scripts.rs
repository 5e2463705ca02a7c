//! The engine's Lua scripts, one file each under `lua/` (each headed by its KEYS/ARGV
//! contract), compiled in and loaded by SHA on first use.

use redis::Script;

pub(super) struct Scripts {
    pub begin_sync: Script,
    pub put_sync: Script,
    pub delete_project: Script,
    pub update_project: Script,
    pub claim_due: Script,
    pub rate: Script,
    pub publish: Script,
    pub lock: Script,
    pub heartbeat: Script,
    pub unlock: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Self {
            begin_sync: Script::new(include_str!("lua/begin_sync.lua")),
            put_sync: Script::new(include_str!("lua/put_sync.lua")),
            delete_project: Script::new(include_str!("lua/delete_project.lua")),
            update_project: Script::new(include_str!("lua/update_project.lua")),
            claim_due: Script::new(include_str!("lua/claim_due.lua")),
            rate: Script::new(include_str!("lua/rate.lua")),
            publish: Script::new(include_str!("lua/publish.lua")),
            lock: Script::new(include_str!("lua/lock.lua")),
            heartbeat: Script::new(include_str!("lua/heartbeat.lua")),
            unlock: Script::new(include_str!("lua/unlock.lua")),
        }
    }
}
