//! Counted places per user and in total (WebSocket connections): a place is held by
//! a [`Slot`] and given back when it drops, however its holder ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Which cap refused a place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// the user holds `per_user` places already
    User,
    /// the process holds `total` places already
    Total,
}

impl Full {
    pub fn as_str(self) -> &'static str {
        match self {
            Full::User => "per_user",
            Full::Total => "global",
        }
    }
}

#[derive(Debug)]
pub struct UserSlots {
    per_user: usize,
    total: usize,
    held: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    by_user: HashMap<String, usize>,
    total: usize,
}

/// One place, given back on drop.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<UserSlots>,
    user: String,
}

impl UserSlots {
    pub fn new(per_user: usize, total: usize) -> Arc<Self> {
        Arc::new(Self {
            per_user,
            total,
            held: Mutex::default(),
        })
    }

    pub fn take(self: &Arc<Self>, user: &str) -> Result<Slot, Full> {
        let mut held = self.held.lock().expect("slot counts are never poisoned");
        if held.total >= self.total {
            return Err(Full::Total);
        }
        let mine = held.by_user.get(user).copied().unwrap_or(0);
        if mine >= self.per_user {
            return Err(Full::User);
        }
        held.by_user.insert(user.to_owned(), mine + 1);
        held.total += 1;
        Ok(Slot {
            slots: Arc::clone(self),
            user: user.to_owned(),
        })
    }

    /// Places held now, in total.
    pub fn held(&self) -> usize {
        self.held
            .lock()
            .expect("slot counts are never poisoned")
            .total
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self
            .slots
            .held
            .lock()
            .expect("slot counts are never poisoned");
        held.total = held.total.saturating_sub(1);
        if let Some(count) = held.by_user.get_mut(&self.user) {
            *count -= 1;
            if *count == 0 {
                held.by_user.remove(&self.user);
            }
        }
    }
}

/// The hub's socket cap when none is configured: three quarters of the open-file
/// limit (raised to its hard limit first, see [`raise_file_limit`]) less 256, so the
/// store, the workers, Redis and plain HTTP keep descriptors whatever sockets do.
pub fn default_socket_cap() -> usize {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(1 << 20);
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    (limit / 4 * 3).saturating_sub(256).max(16)
}

/// Raises the soft open-file limit to the hard one (what Go's runtime does at start):
/// the default soft limit of 1,024 is far under what a hub of sockets needs.
pub fn raise_file_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(err) = setrlimit(Resource::Nofile, raised) {
            tracing::debug!(error = %err, "could not raise the open-file limit");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_counted_per_user_and_in_total_and_given_back_on_drop() {
        let slots = UserSlots::new(2, 3);
        let a1 = slots.take("alice").expect("free");
        let _a2 = slots.take("alice").expect("free");
        assert_eq!(slots.take("alice").err(), Some(Full::User));
        let _b1 = slots.take("bob").expect("free");
        assert_eq!(slots.take("carol").err(), Some(Full::Total));
        drop(a1);
        assert_eq!(slots.held(), 2);
        let _c1 = slots.take("carol").expect("a place was given back");
    }
}
