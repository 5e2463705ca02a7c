//! Events: the one writer thread that numbers, stores (group commit) and sends them
//! in order, and reads of a user's history.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Durability, ReadableDatabase, ReadableTable};
use tokio::sync::broadcast;

use super::{Db, EVENT_SEQ, EVENTS, EmbeddedEngine, read_json};
use crate::engine::{EngineError, EventLog, History, Live};
use crate::protocol::{Event, EventBody, EventId};

pub(super) struct PublishRequest {
    pub user: String,
    pub body: EventBody,
    pub reply: tokio::sync::oneshot::Sender<Result<Event, EngineError>>,
}

/// Most events one transaction takes.
const GROUP_COMMIT_MAX: usize = 1024;

/// The one writer of events: takes every publish waiting, numbers and stores them in
/// one transaction (group commit: a burst of events costs one commit, not one each),
/// then sends them to the live feed in id order and answers each publisher. Being the
/// only writer, it also keeps each user's ids in order on the live feed.
pub(super) fn run_event_writer(
    db: Arc<Db>,
    requests: std::sync::mpsc::Receiver<PublishRequest>,
    live: broadcast::Sender<Live>,
    keep: u64,
) {
    while let Ok(first) = requests.recv() {
        let mut batch = vec![first];
        while batch.len() < GROUP_COMMIT_MAX {
            match requests.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        match write_events(&db, &batch, keep) {
            Ok(events) => {
                for (request, event) in batch.into_iter().zip(events) {
                    // no receiver is fine: nobody is connected
                    let _ = live.send(Live::Event(event.clone()));
                    let _ = request.reply.send(Ok(event));
                }
            }
            Err(err) => {
                let message = err.to_string();
                for request in batch {
                    let _ = request
                        .reply
                        .send(Err(EngineError::Embedded(redb::Error::Io(
                            std::io::Error::other(message.clone()),
                        ))));
                }
            }
        }
    }
}

fn write_events(db: &Db, batch: &[PublishRequest], keep: u64) -> Result<Vec<Event>, EngineError> {
    let mut tx = db.begin_write().map_err(redb::Error::from)?;
    if batch.iter().all(|request| request.body.is_progress_only()) {
        // progress ticks are re-sent by the next tick if lost in a crash; stage
        // changes and notifications are on disk before anyone hears of them
        let _ = tx.set_durability(Durability::None);
    }
    let mut out = Vec::with_capacity(batch.len());
    {
        let mut seq = tx.open_table(EVENT_SEQ).map_err(redb::Error::from)?;
        let mut events = tx.open_table(EVENTS).map_err(redb::Error::from)?;
        let mut latest: HashMap<&str, u64> = HashMap::new();
        for request in batch {
            let user = request.user.as_str();
            let previous = match latest.get(user) {
                Some(id) => *id,
                None => seq
                    .get(user)
                    .map_err(redb::Error::from)?
                    .map(|v| v.value())
                    .unwrap_or(0),
            };
            let id = previous + 1;
            latest.insert(user, id);
            let event = Event {
                id,
                user: request.user.clone(),
                body: request.body.clone(),
            };
            let raw = serde_json::to_string(&event)?;
            events
                .insert((user, id), raw.as_str())
                .map_err(redb::Error::from)?;
            if id > keep {
                events
                    .remove((user, id - keep))
                    .map_err(redb::Error::from)?;
            }
            out.push(event);
        }
        for (user, id) in latest {
            seq.insert(user, id).map_err(redb::Error::from)?;
        }
    }
    db.commit(tx)?;
    Ok(out)
}

#[async_trait]
impl EventLog for EmbeddedEngine {
    async fn publish(&self, user: &str, body: EventBody) -> Result<Event, EngineError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.writer
            .send(PublishRequest {
                user: user.to_owned(),
                body,
                reply,
            })
            .map_err(|_| EngineError::Closed)?;
        answer.await.map_err(|_| EngineError::Closed)?
    }

    /// The embedded publish commits or fails, and nothing resends it: there is no
    /// outcome to guess, so the key has nothing to guard.
    async fn publish_once(
        &self,
        user: &str,
        body: EventBody,
        _once: &str,
    ) -> Result<Event, EngineError> {
        self.publish(user, body).await
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
        let user = user.to_owned();
        let keep = self.history_len;
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(redb::Error::from)?;
            let seq = tx.open_table(EVENT_SEQ).map_err(redb::Error::from)?;
            let latest = seq
                .get(user.as_str())
                .map_err(redb::Error::from)?
                .map(|v| v.value())
                .unwrap_or(0);
            let oldest_kept = latest.saturating_sub(keep) + 1;
            // the client saw `after`; it needs `after + 1` onwards, which must still be kept
            // a resume point past the newest event means the history it belonged to
            // is gone (a wiped store): also a gap
            let gap = (after < latest && after + 1 < oldest_kept) || after > latest;
            let events_table = tx.open_table(EVENTS).map_err(redb::Error::from)?;
            let start = after.saturating_add(1).max(oldest_kept);
            let mut events = Vec::new();
            for entry in events_table
                .range((user.as_str(), start)..=(user.as_str(), u64::MAX))
                .map_err(redb::Error::from)?
                .take(limit)
            {
                let (_, raw) = entry.map_err(redb::Error::from)?;
                let mut event: Event = read_json(raw.value())?;
                event.user = user.clone();
                events.push(event);
            }
            Ok(History { events, gap })
        })
        .await
    }

    async fn latest(&self, user: &str) -> Result<EventId, EngineError> {
        // every socket's attach asks this: a point read, on the calling thread (a
        // storm of connections would otherwise start a blocking thread each)
        self.point_read(|db| {
            let tx = db.begin_read().map_err(redb::Error::from)?;
            let seq = tx.open_table(EVENT_SEQ).map_err(redb::Error::from)?;
            Ok(seq
                .get(user)
                .map_err(redb::Error::from)?
                .map(|v| v.value())
                .unwrap_or(0))
        })
    }
}
