//! Events on Redis: numbered, kept and published by one Lua script; the pub/sub
//! subscription that feeds this node's live feed, with reconnects and catch-up marks.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::AsyncCommands;
use redis::streams::StreamRangeReply;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::cluster::Push;
use super::{PUBSUB_PING, RedisEngine};
use crate::backoff::Backoff;
use crate::engine::{EngineError, EventLog, History, Live};
use crate::error::error_chain;
use crate::protocol::{Event, EventBody, EventId};

#[async_trait]
impl EventLog for RedisEngine {
    async fn publish(&self, user: &str, body: EventBody) -> Result<Event, EngineError> {
        self.publish_keyed(user, body, None).await
    }

    async fn publish_once(
        &self,
        user: &str,
        body: EventBody,
        once: &str,
    ) -> Result<Event, EngineError> {
        self.publish_keyed(user, body, Some(once)).await
    }

    fn live(&self) -> broadcast::Receiver<Live> {
        self.live.subscribe()
    }

    async fn after(
        &self,
        user: &str,
        after: EventId,
        limit: usize,
    ) -> Result<History, EngineError> {
        let mut conn = self.conn().await?;
        let (latest, range): (Option<u64>, StreamRangeReply) = redis::pipe()
            .get(self.keys.event_seq(user))
            .cmd("XRANGE")
            .arg(self.keys.events(user))
            .arg(format!("0-{}", after.saturating_add(1)))
            .arg("+")
            .arg("COUNT")
            .arg(limit.max(1))
            .query_async(&mut conn)
            .await?;
        let latest = latest.unwrap_or(0);
        let mut events = Vec::with_capacity(range.ids.len());
        for entry in range.ids.into_iter().take(limit) {
            let raw: Option<String> = entry.get("e");
            let (Some(raw), Some(id)) = (raw, event_id_of(&entry.id)) else {
                continue;
            };
            let mut event: Event = serde_json::from_str(&raw)?;
            event.id = id;
            event.user = user.to_owned();
            events.push(event);
        }
        // ids are contiguous per user: a missing `after + 1` was trimmed away
        // and one past the newest event means Redis lost the history it belonged to
        let gap = (after < latest && events.first().is_none_or(|first| first.id != after + 1))
            || after > latest;
        Ok(History { events, gap })
    }

    async fn latest(&self, user: &str) -> Result<EventId, EngineError> {
        let mut conn = self.conn().await?;
        let latest: Option<u64> = conn.get(self.keys.event_seq(user)).await?;
        Ok(latest.unwrap_or(0))
    }

    async fn watch(&self, user: &str) -> Result<(), EngineError> {
        match self.sharded() {
            Some(pubsub) => {
                pubsub
                    .subscribe(&self.keys.group_channel(self.keys.group_of(user)))
                    .await
            }
            None => Ok(()),
        }
    }

    fn unwatch(&self, user: &str) {
        if let Some(pubsub) = self.sharded() {
            pubsub.unsubscribe(&self.keys.group_channel(self.keys.group_of(user)));
        }
    }
}

impl RedisEngine {
    /// Runs the publish script; with `once`, a repeat of a publish that went through
    /// returns its id and publishes nothing.
    async fn publish_keyed(
        &self,
        user: &str,
        body: EventBody,
        once: Option<&str>,
    ) -> Result<Event, EngineError> {
        let json = serde_json::to_string(&body)?;
        let kept = crate::engine::once_kept(&body);
        let mut conn = self.conn().await?;
        let mut call = self.scripts.publish.prepare_invoke();
        call.key(self.keys.event_seq(user))
            .key(self.keys.events(user))
            .key(self.keys.channel(user));
        if let Some(once) = once {
            call.key(self.keys.event_once(user, once));
        }
        call.arg(json)
            .arg(channel_prefix(user))
            .arg(self.settings.history_len.max(1))
            .arg(if self.keys.cluster {
                "SPUBLISH"
            } else {
                "PUBLISH"
            })
            .arg(kept.as_secs());
        let id: u64 = call.invoke_async(&mut conn).await?;
        Ok(Event {
            id,
            user: user.to_owned(),
            body,
        })
    }

    /// Starts the pub/sub subscription (once) that feeds [`EventLog::live`]. Only hub
    /// nodes need it; workers publish but never listen.
    pub fn start_subscriber(self: &Arc<Self>) {
        let engine = Arc::clone(self);
        self.subscriber.get_or_init(|| {
            let stop = CancellationToken::new();
            if engine.sharded().is_some() {
                tokio::spawn(Arc::clone(&engine).sharded_loop(stop.clone()));
            } else {
                tokio::spawn(Arc::clone(&engine).subscribe_loop(stop.clone()));
            }
            stop
        });
    }
}

/// How long after a resubscription the engine waits for more before recovering the
/// gap once (a failover resubscribes every channel of a node at once).
const RESUBSCRIBE_SETTLE: Duration = Duration::from_millis(30);
/// How often each wanted channel's node is touched, so a dead one is noticed.
const PROBE_EVERY: Duration = Duration::from_secs(1);

impl RedisEngine {
    /// On a cluster: reads the sharded subscription's pushes until `stop`. Messages on
    /// a user group's channel feed [`EventLog::live`], a shard bell wakes the workers
    /// waiting for jobs, and after a resubscription (a node restarted or failed over)
    /// the hub is told to recover what it missed from the histories, once the
    /// resubscriptions have settled.
    async fn sharded_loop(self: Arc<Self>, stop: CancellationToken) {
        let Some(pubsub) = self.sharded() else { return };
        let mut pushes = pubsub.pushes();
        // connected, the feed is ready (nothing is subscribed before a user is watched)
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        while let Err(err) = pubsub.connect().await {
            let wait = backoff.next_wait();
            tracing::warn!(error = %error_chain(&err), retry_in_ms = wait.as_millis() as u64, "redis cluster pub/sub unreachable; retrying");
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        let _ = self.live.send(Live::Reconnected);
        let mut probe = tokio::time::interval(PROBE_EVERY);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut recover_at: Option<tokio::time::Instant> = None;
        // set when a node's connection dropped: the next probe subscribes every wanted
        // channel again (redis-rs resubscribes after a reconnect too, but not after
        // every node was down at once), until that succeeds
        let broken = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let is_bell =
            |channel: &str| (0..self.keys.shards()).any(|shard| channel == self.keys.bell(shard));
        loop {
            let settle = async {
                match recover_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                push = pushes.recv() => {
                    let push = match push {
                        Ok(push) => push,
                        Err(broadcast::error::RecvError::Lagged(missed)) => {
                            // pushes were dropped: subscriptions may have changed
                            // unseen, and messages were lost
                            tracing::warn!(missed, "fell behind the cluster pub/sub pushes; recovering");
                            broken.store(true, std::sync::atomic::Ordering::Release);
                            self.bell.notify_waiters();
                            let _ = self.live.send(Live::Reconnected);
                            continue;
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    };
                    tracing::trace!(kind = ?push.kind, "cluster pub/sub push");
                    match pubsub.classify(push) {
                        Some(Push::Message { channel, payload }) => {
                            if is_bell(&channel) {
                                self.bell.notify_waiters();
                            } else {
                                match parse_channel_payload(&payload) {
                                    Some(event) => {
                                        let _ = self.live.send(Live::Event(event));
                                    }
                                    None => tracing::warn!("dropping an unreadable event from redis"),
                                }
                            }
                        }
                        Some(Push::Resubscribed { channel }) => {
                            tracing::debug!(%channel, "resubscribed to a sharded channel");
                            if is_bell(&channel) {
                                self.bell.notify_waiters();
                            } else {
                                recover_at.get_or_insert_with(|| tokio::time::Instant::now() + RESUBSCRIBE_SETTLE);
                            }
                        }
                        Some(Push::Dropped { channel }) => {
                            tracing::info!(%channel, "a sharded channel's slot moved; subscribing again");
                            let engine = Arc::clone(&self);
                            let broken = Arc::clone(&broken);
                            tokio::spawn(async move {
                                if let Some(pubsub) = engine.sharded()
                                    && let Err(err) = pubsub.resubscribe(&channel).await
                                {
                                    tracing::warn!(%channel, error = %error_chain(&err), "could not subscribe again; retrying on the next probe");
                                    broken.store(true, std::sync::atomic::Ordering::Release);
                                }
                            });
                        }
                        Some(Push::Disconnected) => {
                            broken.store(true, std::sync::atomic::Ordering::Release);
                            if let Some(reconnects) = self.reconnects.get() {
                                reconnects.inc();
                            }
                            tracing::warn!("a redis cluster node's pub/sub connection dropped; reconnecting");
                        }
                        None => {}
                    }
                }
                _ = settle => {
                    recover_at = None;
                    tracing::info!("resubscribed to redis cluster events; recovering missed ones");
                    let _ = self.live.send(Live::Reconnected);
                }
                _ = probe.tick() => {
                    let engine = Arc::clone(&self);
                    let broken = Arc::clone(&broken);
                    tokio::spawn(async move {
                        if broken.swap(false, std::sync::atomic::Ordering::AcqRel) {
                            if !engine.resubscribe_all().await {
                                broken.store(true, std::sync::atomic::Ordering::Release);
                            }
                        } else {
                            engine.probe_channels().await;
                        }
                    });
                }
            }
        }
    }

    /// Subscribes every wanted channel again (after a connection dropped); their
    /// confirmations come back as resubscriptions, which start the recovery. False
    /// when one failed (the cluster is not back yet).
    async fn resubscribe_all(&self) -> bool {
        let Some(pubsub) = self.sharded() else {
            return true;
        };
        let mut all = true;
        for channel in pubsub.wanted_channels() {
            if let Err(err) = pubsub.resubscribe(&channel).await {
                tracing::debug!(%channel, error = %error_chain(&err), "could not subscribe again yet");
                all = false;
                break;
            }
        }
        all
    }

    /// Touches the node of every wanted channel (see [`cluster::ShardedPubSub::probe`]).
    async fn probe_channels(&self) {
        let Some(pubsub) = self.sharded() else { return };
        let channels = pubsub.wanted_channels();
        let probes = channels.iter().map(|channel| pubsub.probe(channel));
        for (channel, outcome) in channels
            .iter()
            .zip(futures_util::future::join_all(probes).await)
        {
            if let Err(err) = outcome {
                tracing::debug!(%channel, error = %error_chain(&err), "a sharded channel's node did not answer");
            }
        }
    }
}

impl RedisEngine {
    /// Counts the pub/sub subscription's reconnects in `counter` from now on.
    pub fn count_reconnects_in(&self, counter: prometheus_client::metrics::counter::Counter) {
        let _ = self.reconnects.set(counter);
    }

    /// Runs the pub/sub subscription until `stop`: connects, subscribes, forwards every
    /// message, pings to notice a dead link, and on any break reconnects with backoff and
    /// tells the hub (`Live::Reconnected`), which recovers the gap from the histories.
    async fn subscribe_loop(self: Arc<Self>, stop: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        let mut first = true;
        loop {
            let outcome = tokio::select! {
                _ = stop.cancelled() => return,
                outcome = self.subscribe_once(&mut first, &mut backoff) => outcome,
            };
            let wait = backoff.next_wait();
            if let Err(err) = outcome {
                tracing::warn!(error = %error_chain(&err), retry_in_ms = wait.as_millis() as u64, "redis pub/sub lost; resubscribing");
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn subscribe_once(
        &self,
        first: &mut bool,
        backoff: &mut Backoff,
    ) -> Result<(), EngineError> {
        let super::Topology::Single { client, .. } = &self.topology else {
            return Err(super::no_connection("plain pub/sub is for one Redis"));
        };
        let pubsub = tokio::time::timeout(Duration::from_secs(3), client.get_async_pubsub())
            .await
            .map_err(|_| super::no_connection("pub/sub connect timed out"))??;
        let (mut sink, mut stream) = pubsub.split();
        sink.subscribe(self.keys.group_channel(0)).await?;
        backoff.reset();
        if *first {
            *first = false;
            tracing::info!("subscribed to redis events");
        } else {
            if let Some(reconnects) = self.reconnects.get() {
                reconnects.inc();
            }
            tracing::info!("resubscribed to redis events; recovering missed ones");
        }
        // after a break, events published meanwhile exist only in the histories
        let _ = self.live.send(Live::Reconnected);
        let mut ping = tokio::time::interval(PUBSUB_PING);
        ping.tick().await;
        loop {
            tokio::select! {
                message = stream.next() => {
                    let Some(message) = message else {
                        return Err(super::no_connection("pub/sub connection closed"));
                    };
                    match parse_channel_payload(message.get_payload_bytes()) {
                        Some(event) => {
                            let _ = self.live.send(Live::Event(event));
                        }
                        None => tracing::warn!("dropping an unreadable event from redis"),
                    }
                }
                _ = ping.tick() => {
                    tokio::time::timeout(PUBSUB_PING, sink.ping::<()>())
                        .await
                        .map_err(|_| super::no_connection("pub/sub ping timed out"))??;
                }
            }
        }
    }
}

/// Channel payloads are `<user length>:<user><event json>`.
fn channel_prefix(user: &str) -> String {
    format!("{}:{user}", user.len())
}

fn parse_channel_payload(payload: &[u8]) -> Option<Event> {
    let colon = payload.iter().position(|b| *b == b':')?;
    let len: usize = std::str::from_utf8(&payload[..colon]).ok()?.parse().ok()?;
    let rest = &payload[colon + 1..];
    let user = std::str::from_utf8(rest.get(..len)?).ok()?;
    let mut event: Event = serde_json::from_slice(rest.get(len..)?).ok()?;
    event.user = user.to_owned();
    Some(event)
}

fn event_id_of(entry_id: &str) -> Option<EventId> {
    entry_id.strip_prefix("0-")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_payload_round_trips_users_with_colons() {
        let event = Event {
            id: 7,
            user: "org:team:alice".into(),
            body: EventBody::Notification {
                kind: crate::protocol::NotificationKind::RepoSyncSuccess,
                sync_id: "s".into(),
                project_id: "p".into(),
                commit: None,
                error: None,
                previous_commit: None,
                changes: None,
                trigger: None,
                at: "2026-01-01T00:00:00Z".into(),
            },
        };
        let json = serde_json::to_string(&event).expect("serializes");
        let payload = format!("{}{json}", channel_prefix(&event.user));
        assert_eq!(parse_channel_payload(payload.as_bytes()), Some(event));
        assert_eq!(
            parse_channel_payload(b"5:ab{}"),
            None,
            "length past the end"
        );
        assert_eq!(parse_channel_payload(b"x:ab"), None);
    }

    #[test]
    fn entry_ids_map_to_event_ids() {
        assert_eq!(event_id_of("0-42"), Some(42));
        assert_eq!(event_id_of("1700000000000-0"), None);
    }
}
