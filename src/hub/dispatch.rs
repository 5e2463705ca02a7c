//! Dispatch: the hub's per-core dispatchers, which take live events from the engine's
//! feed and write each user's frames into their connections, and the catch-up after a
//! break in the feed.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::{Frame, Hub, MAX_REPLAY};
use crate::engine::Live;
use crate::protocol::{Event, EventId};

/// Events a dispatcher takes from the live feed at once, when that many are waiting:
/// each socket gets all of its user's frames of them in one write, so a backlog (a
/// burst) costs a write per socket per batch, not per event.
const DISPATCH_BATCH: usize = 1024;

/// Under a backlog (more than one of its users' events waiting), a dispatcher waits
/// this long for more before it writes, again while each wait brings more, up to
/// [`LINGER_ROUNDS`] times (tokio's timer rounds each up to a millisecond tick): a
/// burst then costs one write per socket per batch instead of one per event. A lone
/// event of its users goes out at once.
const LINGER: std::time::Duration = std::time::Duration::from_millis(1);
const LINGER_ROUNDS: usize = 3;

/// Feed events (any dispatcher's) one batch reads at most.
const MAX_FEED_READ: usize = 16 * DISPATCH_BATCH;

/// Dispatchers at most, however many cores there are.
const MAX_DISPATCHERS: usize = 16;

/// Which users one dispatcher serves: those whose name hashes to `index` of `of`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Shard {
    pub(super) index: usize,
    pub(super) of: usize,
}

impl Shard {
    pub(super) fn holds(self, user: &str) -> bool {
        if self.of <= 1 {
            return true;
        }
        use std::hash::{Hash, Hasher};
        // SipHash with fixed keys: the same user lands on the same dispatcher for the
        // life of the process
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        user.hash(&mut hasher);
        hasher.finish() % self.of as u64 == self.index as u64
    }
}

impl Hub {
    /// Forwards every live event to the connections of its user until `shutdown`: one
    /// dispatcher per core, each for the users that hash to it, so the writes into
    /// sockets (most of a fan-out's cost) run on every core and not on one. A user's
    /// events stay in one dispatcher, in order. The dispatchers subscribe to the live
    /// feed when this is called, not when the future is first polled: an event
    /// published after the call reaches them however late the task starts.
    pub fn run_dispatch(
        self: Arc<Self>,
        shutdown: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let shards = std::thread::available_parallelism()
            .map_or(1, std::num::NonZeroUsize::get)
            .min(MAX_DISPATCHERS);
        self.run_dispatchers(shards, shutdown)
    }

    /// [`Hub::run_dispatch`] with `shards` dispatchers.
    pub(super) fn run_dispatchers(
        self: Arc<Self>,
        shards: usize,
        shutdown: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let shards = shards.max(1);
        // subscribed here, before any of them runs: none misses an event published
        // after this call
        let subscribed: Vec<(Shard, broadcast::Receiver<Live>)> = (0..shards)
            .map(|index| (Shard { index, of: shards }, self.events.live()))
            .collect();
        self.supervise_dispatchers(subscribed, shutdown)
    }

    /// Runs a dispatcher per subscription, and starts again any that panics.
    async fn supervise_dispatchers(
        self: Arc<Self>,
        subscribed: Vec<(Shard, broadcast::Receiver<Live>)>,
        shutdown: CancellationToken,
    ) {
        let mut dispatchers = tokio::task::JoinSet::new();
        let mut of_task = HashMap::new();
        for (shard, live) in subscribed {
            let task =
                dispatchers.spawn(Arc::clone(&self).dispatch_shard(shard, live, shutdown.clone()));
            of_task.insert(task.id(), shard);
        }
        while let Some(ended) = dispatchers.join_next_with_id().await {
            let Err(err) = ended else { continue };
            if !err.is_panic() || shutdown.is_cancelled() {
                continue;
            }
            // a dispatcher that panicked is started again, its users caught up from
            // their history first: their sockets must not sit silent
            let Some(shard) = of_task.remove(&err.id()) else {
                continue;
            };
            tracing::error!(
                dispatcher = shard.index,
                "a dispatcher panicked; starting it again"
            );
            let live = self.events.live();
            let hub = Arc::clone(&self);
            let stop = shutdown.clone();
            let task = dispatchers.spawn(async move {
                hub.catch_up(shard).await;
                hub.dispatch_shard(shard, live, stop).await;
            });
            of_task.insert(task.id(), shard);
        }
    }

    /// One dispatcher: the live events of the users of `shard`, in batches.
    pub(super) async fn dispatch_shard(
        self: Arc<Self>,
        shard: Shard,
        mut live: broadcast::Receiver<Live>,
        shutdown: CancellationToken,
    ) {
        let mut next = None;
        loop {
            let received = match next.take() {
                Some(received) => received,
                None => tokio::select! {
                    _ = shutdown.cancelled() => return,
                    received = live.recv() => received,
                },
            };
            match received {
                Ok(Live::Event(event)) => {
                    // what else is waiting goes out with it: one write per socket
                    let mut batch = Vec::new();
                    if shard.holds(&event.user) {
                        batch.push(event);
                    }
                    // the feed carries every dispatcher's events: the batch and
                    // the backlog count this one's, the read cap all of them
                    let mut read = 1;
                    let mut lingered = 0;
                    let mut before_linger = 0;
                    while batch.len() < DISPATCH_BATCH && read < MAX_FEED_READ {
                        match live.try_recv() {
                            Ok(Live::Event(event)) => {
                                read += 1;
                                if shard.holds(&event.user) {
                                    batch.push(event);
                                }
                            }
                            Ok(other) => {
                                next = Some(Ok(other));
                                break;
                            }
                            // more than one of ours was waiting, and the last wait
                            // (if any) brought more: events come faster than this
                            // dispatcher writes them, and a moment more lets each
                            // socket take several in one write
                            Err(broadcast::error::TryRecvError::Empty)
                                if batch.len() > 1
                                    && lingered < LINGER_ROUNDS
                                    && (lingered == 0 || batch.len() > before_linger) =>
                            {
                                lingered += 1;
                                before_linger = batch.len();
                                tokio::time::sleep(LINGER).await;
                            }
                            Err(broadcast::error::TryRecvError::Empty) => break,
                            Err(broadcast::error::TryRecvError::Lagged(missed)) => {
                                next = Some(Err(broadcast::error::RecvError::Lagged(missed)));
                                break;
                            }
                            Err(broadcast::error::TryRecvError::Closed) => {
                                next = Some(Err(broadcast::error::RecvError::Closed));
                                break;
                            }
                        }
                    }
                    if !batch.is_empty() {
                        self.deliver(batch).await;
                    }
                }
                Ok(Live::Reconnected) => self.catch_up(shard).await,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(
                        missed,
                        dispatcher = shard.index,
                        "hub fell behind the event stream; catching up"
                    );
                    self.catch_up(shard).await;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// Hands a batch of live events to their users' connections, in order. Ids are
    /// contiguous per user: one past the next expected means the feed skipped some (a
    /// resubscription raced a publish); they are in the history, and go out first
    /// (see [`Hub::known_of`] for when the check applies).
    pub(super) async fn deliver(&self, batch: Vec<Event>) {
        let mut run: Vec<Event> = Vec::with_capacity(batch.len());
        let mut in_run: HashMap<String, EventId> = HashMap::new();
        for event in batch {
            if let Some(known) = self.known_of(&event.user) {
                let known = in_run.get(&event.user).copied().unwrap_or(0).max(known);
                if event.id > known + 1 {
                    self.dispatch_all(&run);
                    run.clear();
                    in_run.clear();
                    self.fill_gap(&event.user, known).await;
                }
            }
            in_run.insert(event.user.clone(), event.id);
            run.push(event);
        }
        self.dispatch_all(&run);
    }

    /// After a break in the live feed (the hub lagged, or the engine's subscription
    /// was re-established), sends every connected user what they missed from their
    /// history, before any later live event. Subscriptions drop what a connection
    /// already has; a user whose gap is past the kept history is kicked to resume,
    /// which ends in `resync_required`. No socket is dropped for a recoverable break.
    pub(super) async fn catch_up(&self, shard: Shard) {
        let users: Vec<(String, EventId)> = {
            let connections = self.connections.read().expect("hub lock is never poisoned");
            connections
                .iter()
                .filter(|(user, _)| shard.holds(user))
                .map(|(user, of_user)| (user.clone(), of_user.known.load(Ordering::Acquire)))
                .collect()
        };
        let mut recovered = 0usize;
        for (user, known) in users {
            match self.events.after(&user, known, MAX_REPLAY).await {
                Ok(history) if !history.gap && history.events.len() < MAX_REPLAY => {
                    recovered += history.events.len();
                    self.dispatch_all(&history.events);
                }
                Ok(_) => self.kick_user(&user),
                Err(err) => {
                    tracing::warn!(error = %crate::error::error_chain(&err), "catch-up read failed; the user's connections will resume");
                    self.kick_user(&user);
                }
            }
        }
        if recovered > 0 {
            tracing::info!(
                recovered,
                "delivered events missed during a break in the live feed"
            );
        }
    }

    /// The newest event id this node has handed to `user`'s connections (None when
    /// none of theirs is attached yet: a first connection's opening covers what came
    /// before it, and `known` is set when it is done). A connection still attaching
    /// beside live ones does not turn the check off for those.
    pub(super) fn known_of(&self, user: &str) -> Option<EventId> {
        self.connections
            .read()
            .expect("hub lock is never poisoned")
            .get(user)
            .filter(|of_user| of_user.list.len() as u64 > of_user.attaching.load(Ordering::Acquire))
            .map(|of_user| of_user.known.load(Ordering::Acquire))
    }

    /// Sends `user` what their history holds after `known` (see [`Hub::catch_up`]).
    pub(super) async fn fill_gap(&self, user: &str, known: EventId) {
        match self.events.after(user, known, MAX_REPLAY).await {
            Ok(history) if !history.gap && history.events.len() < MAX_REPLAY => {
                tracing::info!(
                    user,
                    recovered = history.events.len(),
                    "the live feed skipped events; delivered them from the history"
                );
                self.dispatch_all(&history.events);
            }
            Ok(_) => self.kick_user(user),
            Err(err) => {
                tracing::warn!(error = %crate::error::error_chain(&err), "gap read failed; the user's connections will resume");
                self.kick_user(user);
            }
        }
    }

    pub(super) fn kick_user(&self, user: &str) {
        let connections = self.connections.read().expect("hub lock is never poisoned");
        if let Some(of_user) = connections.get(user) {
            of_user
                .list
                .iter()
                .for_each(|connection| connection.kicked.cancel());
        }
    }

    /// Offers `events` (in order) to the connections of their users: each event
    /// serialized once, each connection offered all of its user's frames of the batch
    /// at once. A connection too far behind is kicked.
    pub(super) fn dispatch_all(&self, events: &[Event]) {
        if events.is_empty() {
            return;
        }
        let connections = self.connections.read().expect("hub lock is never poisoned");
        // each user's frames in the order of their events
        let mut by_user: Vec<(&str, Vec<Arc<Frame>>)> = Vec::new();
        let mut slot: HashMap<&str, usize> = HashMap::new();
        for event in events {
            if !connections.contains_key(&event.user) {
                continue;
            }
            let frame = Frame::from_event(event);
            match slot.get(event.user.as_str()) {
                Some(&at) => by_user[at].1.push(frame),
                None => {
                    slot.insert(event.user.as_str(), by_user.len());
                    by_user.push((event.user.as_str(), vec![frame]));
                }
            }
        }
        for (user, frames) in by_user {
            let Some(of_user) = connections.get(user) else {
                continue;
            };
            if let Some(last) = frames.last() {
                of_user.known.fetch_max(last.id, Ordering::AcqRel);
            }
            for connection in &of_user.list {
                // a sink that panics (a bug in the socket layer) fails its offer like
                // a full one: its connection is kicked and resumes from the last id
                // its client has, so it loses nothing, and the dispatcher, this
                // user's other connections and the rest of the batch go on
                let offered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    connection.sink.offer(&frames)
                }));
                match offered {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => connection.kicked.cancel(),
                    Err(_) => {
                        tracing::error!(user, "a connection's sink panicked; kicking it");
                        connection.kicked.cancel();
                    }
                }
            }
        }
    }
}
