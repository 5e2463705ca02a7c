//! Events: the one writer thread that numbers, stores (group commit) and sends them
//! in order, and reads of a user's history.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Durability, ReadableDatabase, ReadableTable};
use tokio::sync::broadcast;

use super::{Db, EVENT_ONCE, EVENT_ONCE_AGE, EVENT_SEQ, EVENTS, EmbeddedEngine, read_json};
use crate::domain::now_epoch_ms;
use crate::engine::schedule::Rules;
use crate::engine::{EngineError, EventLog, History, Live, Put};
use crate::protocol::{Event, EventBody, EventId, Job, SyncRecord};

pub(super) struct PublishRequest {
    pub user: String,
    pub body: EventBody,
    /// a key that makes a repeat of this publish return the first one's event and
    /// publish nothing ([`EventLog::publish_once`])
    pub once: Option<String>,
    pub reply: tokio::sync::oneshot::Sender<Result<Event, EngineError>>,
}

/// A sync's record and the events that announce it, written in one transaction
/// ([`crate::engine::Store::put_sync_with_events`]).
pub(super) struct EndRequest {
    pub record: SyncRecord,
    pub rules: Rules,
    pub user: String,
    pub events: Vec<(EventBody, String)>,
    pub if_paused: Vec<(EventBody, String)>,
    pub reply: tokio::sync::oneshot::Sender<Result<EndWritten, EngineError>>,
}

/// What a sync's end wrote: the put, the follow-up job to queue, the events.
pub(super) type EndWritten = (Put, Option<Job>, Vec<Event>);

/// What the event writer is asked to do.
pub(super) enum WriterRequest {
    Publish(Box<PublishRequest>),
    End(Box<EndRequest>),
}

/// Most events one transaction takes.
const GROUP_COMMIT_MAX: usize = 1024;
/// Once keys forgotten per write, oldest first, once they have expired: the tables
/// stay bounded by the keys of one retention period.
const ONCE_SWEEP: usize = 16;

/// The one writer of events: takes every publish waiting, numbers and stores them in
/// one transaction (group commit: a burst of events costs one commit, not one each),
/// then sends them to the live feed in id order and answers each publisher. Being the
/// only writer, it also keeps each user's ids in order on the live feed. A sync's end
/// with its events is a transaction of its own, numbered and sent in the same order.
pub(super) fn run_event_writer(
    db: Arc<Db>,
    requests: std::sync::mpsc::Receiver<WriterRequest>,
    live: broadcast::Sender<Live>,
    keep: u64,
) {
    let mut next: Option<WriterRequest> = None;
    loop {
        let first = match next.take() {
            Some(request) => request,
            None => match requests.recv() {
                Ok(request) => request,
                Err(_) => return,
            },
        };
        let first = match first {
            WriterRequest::End(end) => {
                write_end(&db, *end, &live, keep);
                continue;
            }
            WriterRequest::Publish(first) => *first,
        };
        let mut batch = vec![first];
        while batch.len() < GROUP_COMMIT_MAX {
            match requests.try_recv() {
                Ok(WriterRequest::Publish(more)) => batch.push(*more),
                Ok(end) => {
                    next = Some(end);
                    break;
                }
                Err(_) => break,
            }
        }
        match write_events(&db, &batch, keep) {
            Ok(events) => {
                for (request, (event, fresh)) in batch.into_iter().zip(events) {
                    // no receiver is fine: nobody is connected
                    if fresh {
                        let _ = live.send(Live::Event(event.clone()));
                    }
                    let _ = request.reply.send(Ok(event));
                }
            }
            Err(err) => {
                let message = err.to_string();
                for request in batch {
                    let _ = request.reply.send(Err(failed(&message)));
                }
            }
        }
    }
}

fn failed(message: &str) -> EngineError {
    EngineError::from(redb::Error::Io(std::io::Error::other(message.to_owned())))
}

fn write_events(
    db: &Db,
    batch: &[PublishRequest],
    keep: u64,
) -> Result<Vec<(Event, bool)>, EngineError> {
    let mut tx = db.begin_write().map_err(redb::Error::from)?;
    if batch.iter().all(|request| request.body.is_progress_only()) {
        // progress ticks are re-sent by the next tick if lost in a crash; stage
        // changes and notifications are on disk before anyone hears of them
        let _ = tx.set_durability(Durability::None);
    }
    let items: Vec<(&str, &EventBody, Option<&str>)> = batch
        .iter()
        .map(|request| {
            (
                request.user.as_str(),
                &request.body,
                request.once.as_deref(),
            )
        })
        .collect();
    let out = append_events(&tx, &items, keep)?;
    db.commit(tx)?;
    Ok(out)
}

/// A sync's end: its record (as `put_sync` writes it) and its events in one durable
/// transaction, then the new events on the live feed.
fn write_end(db: &Db, end: EndRequest, live: &broadcast::Sender<Live>, keep: u64) {
    let written = (|| {
        let tx = db.begin_write().map_err(redb::Error::from)?;
        let (put, promoted) = super::store::put_sync_in(&tx, &end.record, end.rules)?;
        if put == Put::Gone {
            // nothing written: the transaction is dropped
            return Ok((put, None, Vec::new()));
        }
        let mut items: Vec<(&str, &EventBody, Option<&str>)> = end
            .events
            .iter()
            .map(|(body, once)| (end.user.as_str(), body, Some(once.as_str())))
            .collect();
        if put == Put::StoredAndPaused {
            items.extend(
                end.if_paused
                    .iter()
                    .map(|(body, once)| (end.user.as_str(), body, Some(once.as_str()))),
            );
        }
        let events = append_events(&tx, &items, keep)?;
        db.commit(tx)?;
        Ok::<_, EngineError>((put, promoted, events))
    })();
    let reply = match written {
        Ok((put, promoted, events)) => {
            let mut out = Vec::with_capacity(events.len());
            for (event, fresh) in events {
                if fresh {
                    let _ = live.send(Live::Event(event.clone()));
                }
                out.push(event);
            }
            Ok((put, promoted, out))
        }
        Err(err) => Err(failed(&err.to_string())),
    };
    let _ = end.reply.send(reply);
}

/// Numbers and stores `items` (user, body, once key) in `tx`: each event with the
/// user's next id, except one whose once key was seen within its retention, which
/// answers with the event first published under it (`false`: not new, not to be sent).
fn append_events(
    tx: &redb::WriteTransaction,
    items: &[(&str, &EventBody, Option<&str>)],
    keep: u64,
) -> Result<Vec<(Event, bool)>, EngineError> {
    let now = now_epoch_ms();
    let mut out = Vec::with_capacity(items.len());
    let mut seq = tx.open_table(EVENT_SEQ).map_err(redb::Error::from)?;
    let mut events = tx.open_table(EVENTS).map_err(redb::Error::from)?;
    let mut once_table = tx.open_table(EVENT_ONCE).map_err(redb::Error::from)?;
    let mut once_age = tx.open_table(EVENT_ONCE_AGE).map_err(redb::Error::from)?;
    if items.iter().any(|(_, _, once)| once.is_some()) {
        let expired: Vec<(u64, String, String)> = once_age
            .range((0, "", "")..(now, "", ""))
            .map_err(redb::Error::from)?
            .take(ONCE_SWEEP)
            .filter_map(|entry| entry.ok())
            .map(|(key, _)| {
                let (at, user, once) = key.value();
                (at, user.to_owned(), once.to_owned())
            })
            .collect();
        for (at, user, once) in &expired {
            once_age
                .remove((*at, user.as_str(), once.as_str()))
                .map_err(redb::Error::from)?;
            once_table
                .remove((user.as_str(), once.as_str()))
                .map_err(redb::Error::from)?;
        }
    }
    let mut latest: HashMap<&str, u64> = HashMap::new();
    for (user, body, once) in items {
        let user = *user;
        if let Some(once) = once {
            let seen = once_table
                .get((user, *once))
                .map_err(redb::Error::from)?
                .map(|id| id.value());
            if let Some(id) = seen {
                let kept = events
                    .get((user, id))
                    .map_err(redb::Error::from)?
                    .map(|raw| read_json::<Event>(raw.value()))
                    .transpose()?;
                let event = kept.unwrap_or_else(|| Event {
                    id,
                    user: user.to_owned(),
                    body: (*body).clone(),
                });
                out.push((event, false));
                continue;
            }
        }
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
            user: user.to_owned(),
            body: (*body).clone(),
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
        if let Some(once) = once {
            let expires =
                now + u64::try_from(crate::engine::once_kept(body).as_millis()).unwrap_or(u64::MAX);
            once_table
                .insert((user, *once), id)
                .map_err(redb::Error::from)?;
            once_age
                .insert((expires, user, *once), ())
                .map_err(redb::Error::from)?;
        }
        out.push((event, true));
    }
    for (user, id) in latest {
        seq.insert(user, id).map_err(redb::Error::from)?;
    }
    Ok(out)
}

#[async_trait]
impl EventLog for EmbeddedEngine {
    async fn publish(&self, user: &str, body: EventBody) -> Result<Event, EngineError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.writer
            .send(WriterRequest::Publish(Box::new(PublishRequest {
                user: user.to_owned(),
                body,
                once: None,
                reply,
            })))
            .map_err(|_| EngineError::Closed)?;
        answer.await.map_err(|_| EngineError::Closed)?
    }

    /// Remembered in the store: a job run again after its worker stopped (an error
    /// after the end was published, a restart) republishes the end under the same
    /// keys, and nothing twice.
    async fn publish_once(
        &self,
        user: &str,
        body: EventBody,
        once: &str,
    ) -> Result<Event, EngineError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.writer
            .send(WriterRequest::Publish(Box::new(PublishRequest {
                user: user.to_owned(),
                body,
                once: Some(once.to_owned()),
                reply,
            })))
            .map_err(|_| EngineError::Closed)?;
        answer.await.map_err(|_| EngineError::Closed)?
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
