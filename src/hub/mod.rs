//! The hub: who is connected, which events each connection gets, and resume. Events are
//! serialized once and shared by every connection of their user; a connection whose
//! queue is full is kicked (it closes with 4008 and resumes without loss). Knows the
//! event log trait only: no warp, no storage types, and no socket: it builds each
//! event's WebSocket text frame once (the bytes), and a [`FrameSink`] of the socket
//! layer writes them.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::engine::{EngineError, EventLog};
use crate::protocol::{ControlFrame, Event, EventId};

mod dispatch;

/// Most events one read of a user's history returns: a catch-up or a resume replays
/// its gap in pages of this size (so memory stays bounded whatever the history
/// length), and a poll of `/api/v1/notifications` returns at most this many.
pub const MAX_REPLAY: usize = 10_000;
/// Events a resume reads from the history at a time.
const REPLAY_PAGE: usize = 500;

/// An event as it goes on the wire — a whole WebSocket text frame — serialized once
/// and shared by every connection that gets it.
#[derive(Debug)]
pub struct Frame {
    pub id: EventId,
    pub project_id: String,
    pub wire: Bytes,
}

impl Frame {
    pub fn from_event(event: &Event) -> Arc<Frame> {
        let json = serde_json::to_vec(event).expect("events always serialize");
        Arc::new(Frame {
            id: event.id,
            project_id: event.project_id().to_owned(),
            wire: text_frame(&json),
        })
    }
}

/// One final, unmasked WebSocket text frame carrying `payload` (RFC 6455 §5.2; a
/// server's frames are never masked).
pub fn text_frame(payload: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(payload.len() + 10);
    // FIN, opcode 1 (text)
    out.push(0x81);
    match payload.len() {
        len @ 0..=125 => out.push(len as u8),
        len @ 126..=0xFFFF => {
            out.push(126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            out.push(127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
    Bytes::from(out)
}

/// Where a connection's live frames go. The socket layer's sink writes them to the
/// connection at once when it can take them and queues the rest (bounded).
pub trait FrameSink: Send + Sync {
    /// `frames` (the user's, in id order) for this connection; `Err` when it is too
    /// far behind to take more: the hub then kicks it (it resumes without loss).
    fn offer(&self, frames: &[Arc<Frame>]) -> Result<(), SinkFull>;
}

/// A connection fell too far behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SinkFull;

pub fn control_json(frame: &ControlFrame) -> Bytes {
    Bytes::from(serde_json::to_vec(frame).expect("control frames always serialize"))
}

struct Connection {
    id: u64,
    sink: Arc<dyn FrameSink>,
    kicked: CancellationToken,
}

/// The connections of one user, and the newest event id the hub knows they have been
/// offered: where a catch-up after a break in the live feed starts.
#[derive(Default)]
struct UserConnections {
    list: Vec<Connection>,
    known: AtomicU64,
    /// connections still reading where the user's ids stand; `known` is not settled
    /// while any is
    attaching: AtomicU64,
}

pub struct Hub {
    events: Arc<dyn EventLog>,
    connections: RwLock<HashMap<String, UserConnections>>,
    next_connection: AtomicU64,
    queue_capacity: usize,
    node: String,
}

impl Hub {
    /// Frames a connection may have waiting before it counts as too far behind.
    pub fn queue_capacity(&self) -> usize {
        self.queue_capacity
    }
}

/// What a new connection starts with.
pub struct Attachment {
    pub connection_id: String,
    internal_id: u64,
    user: String,
    /// fires when the connection fell too far behind; close it with 4008
    pub kicked: CancellationToken,
    /// the frames to send first, in order: hello, then resync_required if the resume
    /// point is older than the history
    pub opening: Vec<Bytes>,
    /// the missed events to send after the opening, read page by page
    pub replay: Option<Replay>,
    /// which frames the connection still needs: the sink filters live frames by it
    /// once the replay is out
    pub subscription: Subscription,
}

/// The missed events of a resume, read from the user's history a page at a time.
pub struct Replay {
    events: Arc<dyn EventLog>,
    user: String,
    /// the first page, read to tell a complete resume from one past the history
    first: Option<Vec<Event>>,
    next_after: EventId,
    until: EventId,
}

impl Replay {
    /// The next page of missed events, oldest first; `None` when the resume has
    /// caught up with where the live stream took over. `Err(Gap)`-like ends (the
    /// history was trimmed under a slow replay) come back as an empty `Some`.
    pub async fn next_page(&mut self) -> Result<Option<Vec<Event>>, EngineError> {
        if let Some(first) = self.first.take() {
            self.advance(&first);
            return Ok(Some(first));
        }
        if self.next_after >= self.until {
            return Ok(None);
        }
        let page = self
            .events
            .after(&self.user, self.next_after, REPLAY_PAGE)
            .await?;
        if page.gap || page.events.is_empty() {
            return Err(EngineError::ReplayGap);
        }
        self.advance(&page.events);
        Ok(Some(page.events))
    }

    fn advance(&mut self, page: &[Event]) {
        if let Some(last) = page.last() {
            self.next_after = last.id;
        }
    }
}

impl Hub {
    pub fn new(events: Arc<dyn EventLog>, queue_capacity: usize) -> Arc<Self> {
        let node = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        Arc::new(Self {
            events,
            connections: RwLock::new(HashMap::new()),
            next_connection: AtomicU64::new(1),
            queue_capacity: queue_capacity.max(1),
            node,
        })
    }

    /// Registers a connection of `user` and prepares what it sees first. With
    /// `resume_from`, every event after it that is still kept is replayed (however
    /// many: page by page) and the live stream continues with no gap and no
    /// duplicate. With `projects`, the connection starts subscribed to those only,
    /// replay included.
    /// Live frames go to `sink` from the moment it is registered, before the opening
    /// is read: it holds them until the replay is out.
    pub async fn attach(
        &self,
        user: &str,
        resume_from: Option<EventId>,
        projects: Option<Vec<String>>,
        sink: Arc<dyn FrameSink>,
    ) -> Result<Attachment, EngineError> {
        // the user's events reach this node from here on (a no-op but on a cluster,
        // where it subscribes their group's channel); undone by the detach
        self.events.watch(user).await?;
        let internal_id = self.next_connection.fetch_add(1, Ordering::Relaxed);
        let kicked = CancellationToken::new();
        // registered before history is read: an event published meanwhile is in the
        // history, the sink or both, and the subscription drops the second copy
        {
            let mut connections = self
                .connections
                .write()
                .expect("hub lock is never poisoned");
            let of_user = connections.entry(user.to_owned()).or_default();
            of_user.attaching.fetch_add(1, Ordering::AcqRel);
            of_user.list.push(Connection {
                id: internal_id,
                sink,
                kicked: kicked.clone(),
            });
        }
        let connection_id = format!("{}-{internal_id}", self.node);
        let attachment = self.opening(user, &connection_id, resume_from).await;
        // what this connection is covered up to: its replay runs to where the live
        // stream took over
        let covered = attachment.as_ref().ok().map(|(_, replay, subscription)| {
            replay
                .as_ref()
                .map_or(subscription.last_sent, |replay| replay.until)
        });
        if let Some(of_user) = self
            .connections
            .read()
            .expect("hub lock is never poisoned")
            .get(user)
        {
            // `known` is what the user's live connections were handed. Only with no
            // other live connection does this one's opening settle it; beside others
            // it stays theirs, or a break in the feed before they were handed what
            // this opening covered would be caught up from past it
            let others_live = (of_user.list.len() as u64)
                .saturating_sub(of_user.attaching.load(Ordering::Acquire));
            if let Some(covered) = covered
                && others_live == 0
            {
                of_user.known.fetch_max(covered, Ordering::AcqRel);
            }
            of_user.attaching.fetch_sub(1, Ordering::AcqRel);
        }
        let (opening, replay, mut subscription) = match attachment {
            Ok(parts) => parts,
            Err(err) => {
                self.detach_internal(user, internal_id);
                return Err(err);
            }
        };
        if let Some(projects) = projects {
            subscription.narrow_to(projects);
        }
        Ok(Attachment {
            connection_id,
            internal_id,
            user: user.to_owned(),
            kicked,
            opening,
            replay,
            subscription,
        })
    }

    async fn opening(
        &self,
        user: &str,
        connection_id: &str,
        resume_from: Option<EventId>,
    ) -> Result<(Vec<Bytes>, Option<Replay>, Subscription), EngineError> {
        let latest = self.events.latest(user).await?;
        let hello = |last_event_id| {
            control_json(&ControlFrame::Hello {
                connection_id: connection_id.to_owned(),
                last_event_id,
            })
        };
        match resume_from {
            Some(from) if from < latest => {
                let first = self.events.after(user, from, REPLAY_PAGE).await?;
                let starts_right = first
                    .events
                    .first()
                    .is_some_and(|event| event.id == from + 1);
                if first.gap || !starts_right {
                    return Ok((
                        vec![hello(latest), control_json(&ControlFrame::ResyncRequired)],
                        None,
                        Subscription::new(latest),
                    ));
                }
                let replay = Replay {
                    events: Arc::clone(&self.events),
                    user: user.to_owned(),
                    first: Some(first.events),
                    next_after: from,
                    until: latest,
                };
                Ok((vec![hello(from)], Some(replay), Subscription::new(from)))
            }
            Some(from) if from > latest => {
                // the client saw ids this history never had: it was lost (Redis
                // without persistence restarted); numbering starts again below them
                Ok((
                    vec![hello(latest), control_json(&ControlFrame::ResyncRequired)],
                    None,
                    Subscription::new(latest),
                ))
            }
            _ => Ok((vec![hello(latest)], None, Subscription::new(latest))),
        }
    }

    pub fn detach(&self, handle: &AttachmentHandle) {
        self.detach_internal(&handle.user, handle.internal_id);
    }

    fn detach_internal(&self, user: &str, internal_id: u64) {
        let mut connections = self
            .connections
            .write()
            .expect("hub lock is never poisoned");
        if let Some(of_user) = connections.get_mut(user) {
            let before = of_user.list.len();
            of_user
                .list
                .retain(|connection| connection.id != internal_id);
            if of_user.list.len() < before {
                self.events.unwatch(user);
            }
            if of_user.list.is_empty() {
                connections.remove(user);
            }
        }
    }

    pub fn connection_count(&self) -> usize {
        self.connections
            .read()
            .expect("hub lock is never poisoned")
            .values()
            .map(|of_user| of_user.list.len())
            .sum()
    }
}

/// Identifies an attached connection, to detach it when the socket ends.
#[derive(Debug, Clone)]
pub struct AttachmentHandle {
    user: String,
    internal_id: u64,
}

impl Attachment {
    pub fn handle(&self) -> AttachmentHandle {
        AttachmentHandle {
            user: self.user.clone(),
            internal_id: self.internal_id,
        }
    }
}

/// Which live frames a connection still needs: newer than the last one it got, and of
/// a project it subscribed to (all of the user's by default).
#[derive(Debug, Clone)]
pub struct Subscription {
    pub last_sent: EventId,
    projects: Option<HashSet<String>>,
}

impl Subscription {
    pub fn new(last_sent: EventId) -> Self {
        Self {
            last_sent,
            projects: None,
        }
    }

    pub fn narrow_to(&mut self, project_ids: Vec<String>) {
        self.projects = Some(project_ids.into_iter().collect());
    }

    /// Whether `frame` goes out; advances the position when it does. Frames filtered
    /// out still advance it, so a resume after them does not replay them.
    pub fn admit(&mut self, frame: &Frame) -> bool {
        if frame.id <= self.last_sent {
            return false;
        }
        self.last_sent = frame.id;
        self.projects
            .as_ref()
            .is_none_or(|projects| projects.contains(&frame.project_id))
    }

    pub fn wants_project(&self, project_id: &str) -> bool {
        self.projects
            .as_ref()
            .is_none_or(|projects| projects.contains(project_id))
    }
}

#[cfg(test)]
mod tests;
