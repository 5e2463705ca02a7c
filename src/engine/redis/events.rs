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

use super::{PUBSUB_PING, RedisEngine};
use crate::backoff::Backoff;
use crate::engine::{EngineError, EventLog, History, Live};
use crate::error::error_chain;
use crate::protocol::{Event, EventBody, EventId};

#[async_trait]
impl EventLog for RedisEngine {
    async fn publish(&self, user: &str, body: EventBody) -> Result<Event, EngineError> {
        let json = serde_json::to_string(&body)?;
        let mut conn = self.conn().await?;
        let id: u64 = self
            .scripts
            .publish
            .key(self.keys.event_seq(user))
            .key(self.keys.events(user))
            .key(self.keys.channel())
            .arg(json)
            .arg(channel_prefix(user))
            .arg(self.settings.history_len.max(1))
            .invoke_async(&mut conn)
            .await?;
        Ok(Event {
            id,
            user: user.to_owned(),
            body,
        })
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
}

impl RedisEngine {
    /// Starts the pub/sub subscription (once) that feeds [`EventLog::live`]. Only hub
    /// nodes need it; workers publish but never listen.
    pub fn start_subscriber(self: &Arc<Self>) {
        let engine = Arc::clone(self);
        self.subscriber.get_or_init(|| {
            let stop = CancellationToken::new();
            tokio::spawn(Arc::clone(&engine).subscribe_loop(stop.clone()));
            stop
        });
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
        let pubsub = tokio::time::timeout(Duration::from_secs(3), self.client.get_async_pubsub())
            .await
            .map_err(|_| EngineError::Pool("pub/sub connect timed out".into()))??;
        let (mut sink, mut stream) = pubsub.split();
        sink.subscribe(self.keys.channel()).await?;
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
                        return Err(EngineError::Pool("pub/sub connection closed".into()));
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
                        .map_err(|_| EngineError::Pool("pub/sub ping timed out".into()))??;
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
