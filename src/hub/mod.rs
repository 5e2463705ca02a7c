//! The hub: who is connected, which events each connection gets, and resume. Events are
//! serialized once and shared by every connection of their user; a connection whose
//! queue is full is kicked (it closes with 4008 and resumes without loss). Knows the
//! event log trait only: no warp, no sockets, no storage types.

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
mod tests {
    use super::dispatch::Shard;
    use super::*;
    use crate::engine::Live;
    use proptest::prelude::*;
    use tokio::sync::broadcast;

    fn frame(id: EventId, project: &str) -> Frame {
        Frame {
            id,
            project_id: project.into(),
            wire: Bytes::new(),
        }
    }

    /// A sink that hands every offered frame to the test.
    struct ChannelSink(tokio::sync::mpsc::UnboundedSender<Arc<Frame>>);

    impl FrameSink for ChannelSink {
        fn offer(&self, frames: &[Arc<Frame>]) -> Result<(), SinkFull> {
            for frame in frames {
                let _ = self.0.send(Arc::clone(frame));
            }
            Ok(())
        }
    }

    /// Panics on its first offer (a bug in the socket layer, say), then forwards.
    struct PanicsOnce(
        std::sync::atomic::AtomicBool,
        tokio::sync::mpsc::UnboundedSender<Arc<Frame>>,
    );

    impl FrameSink for PanicsOnce {
        fn offer(&self, frames: &[Arc<Frame>]) -> Result<(), SinkFull> {
            assert!(
                self.0.swap(true, Ordering::AcqRel),
                "a sink that fails once"
            );
            for frame in frames {
                let _ = self.1.send(Arc::clone(frame));
            }
            Ok(())
        }
    }

    fn channel_sink() -> (
        Arc<dyn FrameSink>,
        tokio::sync::mpsc::UnboundedReceiver<Arc<Frame>>,
    ) {
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        (Arc::new(ChannelSink(sender)), receiver)
    }

    /// An event log whose live feed loses the events `skip` names, as a feed does when
    /// a resubscription races a publish.
    struct Skipping {
        inner: Arc<crate::engine::embedded::EmbeddedEngine>,
        live: broadcast::Sender<Live>,
        /// while set, `latest` waits for it (holds an attach in its opening)
        hold_latest: std::sync::Mutex<Option<Arc<tokio::sync::Notify>>>,
    }

    #[async_trait::async_trait]
    impl EventLog for Skipping {
        async fn publish(
            &self,
            user: &str,
            body: crate::protocol::EventBody,
        ) -> Result<Event, EngineError> {
            self.inner.publish(user, body).await
        }
        fn live(&self) -> broadcast::Receiver<Live> {
            self.live.subscribe()
        }
        async fn after(
            &self,
            user: &str,
            after: EventId,
            limit: usize,
        ) -> Result<crate::engine::History, EngineError> {
            self.inner.after(user, after, limit).await
        }
        async fn latest(&self, user: &str) -> Result<EventId, EngineError> {
            let hold = self
                .hold_latest
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone();
            if let Some(hold) = hold {
                hold.notified().await;
            }
            self.inner.latest(user).await
        }
    }

    /// A hub dispatching from a [`Skipping`] log over an embedded engine that keeps
    /// `history` events per user; events reach the live feed only when the test sends
    /// them on the returned sender.
    fn skipping_hub(
        history: u64,
    ) -> (
        tempfile::TempDir,
        Arc<Skipping>,
        broadcast::Sender<Live>,
        Arc<Hub>,
        CancellationToken,
    ) {
        let dir = tempfile::tempdir().expect("temp dir");
        let inner = crate::engine::embedded::EmbeddedEngine::open(
            dir.path(),
            (100, std::time::Duration::from_secs(1)),
            history,
        )
        .expect("engine");
        let (live, _) = broadcast::channel(64);
        let log = Arc::new(Skipping {
            inner,
            live: live.clone(),
            hold_latest: std::sync::Mutex::new(None),
        });
        let hub = Hub::new(log.clone(), 64);
        let stop = CancellationToken::new();
        tokio::spawn(Arc::clone(&hub).run_dispatch(stop.clone()));
        (dir, log, live, hub, stop)
    }

    fn stage(n: u64) -> crate::protocol::EventBody {
        crate::protocol::EventBody::SyncStage {
            sync_id: format!("s{n}"),
            project_id: "p".into(),
            stage: crate::protocol::SyncStatus::Running,
            progress: None,
            at: crate::domain::now_rfc3339(),
            retry: None,
        }
    }

    #[tokio::test]
    async fn a_second_socket_attaching_does_not_hide_events_the_first_was_not_handed() {
        let (_dir, log, live, hub, stop) = skipping_hub(100);
        let (sink_a, mut queue_a) = channel_sink();
        let mut first = hub.attach("u", None, None, sink_a).await.expect("attach");
        // the feed loses ids 1-3 (a break before the first socket was handed them)
        for n in 1..=3 {
            log.publish("u", stage(n)).await.expect("publish");
        }
        // a second socket opens: its opening covers up to 3
        let (sink_b, _queue_b) = channel_sink();
        let _second = hub.attach("u", None, None, sink_b).await.expect("attach");
        let event = log.publish("u", stage(4)).await.expect("publish");
        let _ = live.send(Live::Event(event));
        let mut ids = Vec::new();
        while ids.len() < 4 {
            let frame = tokio::time::timeout(std::time::Duration::from_secs(5), queue_a.recv())
                .await
                .unwrap_or_else(|_| panic!("the first socket got only {ids:?}"))
                .expect("a frame");
            if first.subscription.admit(&frame) {
                ids.push(frame.id);
            }
        }
        assert_eq!(ids, vec![1, 2, 3, 4]);
        stop.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dispatcher_that_panicked_is_started_again_and_catches_its_users_up() {
        let (_dir, log, live, _hub, stop) = skipping_hub(100);
        let hub = Hub::new(log.clone(), 64);
        tokio::spawn(Arc::clone(&hub).run_dispatchers(1, stop.child_token()));
        let (sender, mut queue_u) = tokio::sync::mpsc::unbounded_channel();
        let sink_u: Arc<dyn FrameSink> = Arc::new(PanicsOnce(
            std::sync::atomic::AtomicBool::new(false),
            sender,
        ));
        let mut attached_u = hub.attach("u", None, None, sink_u).await.expect("attach");
        let (sink_v, mut queue_v) = channel_sink();
        let mut attached_v = hub.attach("v", None, None, sink_v).await.expect("attach");
        // u's first event makes the only dispatcher panic
        for user in ["u", "v", "u"] {
            let event = log.publish(user, stage(1)).await.expect("publish");
            let _ = live.send(Live::Event(event));
        }
        let first_admitted = |queue: &mut tokio::sync::mpsc::UnboundedReceiver<Arc<Frame>>,
                              attachment: &mut Attachment| {
            let mut admitted = None;
            while let Ok(frame) = queue.try_recv() {
                if attachment.subscription.admit(&frame) {
                    admitted.get_or_insert(frame.id);
                }
            }
            admitted
        };
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        let (mut got_v, mut got_u) = (None, None);
        while (got_v.is_none() || got_u.is_none()) && tokio::time::Instant::now() < deadline {
            got_v = got_v.or_else(|| first_admitted(&mut queue_v, &mut attached_v));
            got_u = got_u.or_else(|| first_admitted(&mut queue_u, &mut attached_u));
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // v's event was in the batch the panic cut short: the restarted dispatcher's
        // catch-up sends it; u's second event comes after
        assert_eq!(got_v, Some(1), "v's event after the dispatcher panicked");
        assert_eq!(
            got_u,
            Some(2),
            "u's next event after the dispatcher panicked"
        );
        stop.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn several_dispatchers_give_every_user_each_event_once_in_order_through_lags() {
        // a feed of 64 slots and 600 events sent at once: the four dispatchers each
        // lag, and each catches up its own users from the history
        let (_dir, log, live, _hub, stop) = skipping_hub(1_000);
        let hub = Hub::new(log.clone(), 1_000);
        let dispatchers = stop.child_token();
        tokio::spawn(Arc::clone(&hub).run_dispatchers(4, dispatchers.clone()));
        let users: Vec<String> = (0..12).map(|n| format!("user-{n}")).collect();
        let mut attached = Vec::new();
        for user in &users {
            let (sink, queue) = channel_sink();
            let attachment = hub.attach(user, None, None, sink).await.expect("attach");
            attached.push((attachment, queue));
        }
        let mut events = Vec::new();
        for n in 1..=50 {
            for user in &users {
                events.push(log.publish(user, stage(n)).await.expect("publish"));
            }
        }
        // all at once, faster than any dispatcher reads: the feed overflows
        for event in events {
            let _ = live.send(Live::Event(event));
        }
        for (user, (mut attachment, mut queue)) in users.iter().zip(attached) {
            let mut ids = Vec::new();
            while ids.len() < 50 {
                let frame = tokio::time::timeout(std::time::Duration::from_secs(10), queue.recv())
                    .await
                    .unwrap_or_else(|_| panic!("{user}: only {ids:?} in time"))
                    .expect("a frame");
                if attachment.subscription.admit(&frame) {
                    ids.push(frame.id);
                }
            }
            assert_eq!(ids, (1..=50).collect::<Vec<u64>>(), "{user}");
            // and nothing after the fiftieth but copies the subscription drops
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            while let Ok(frame) = queue.try_recv() {
                assert!(
                    !attachment.subscription.admit(&frame),
                    "{user}: extra {}",
                    frame.id
                );
            }
        }
        let served: std::collections::HashSet<usize> = users
            .iter()
            .map(|user| {
                (0..4)
                    .find(|&index| Shard { index, of: 4 }.holds(user))
                    .expect("a shard")
            })
            .collect();
        assert!(
            served.len() > 1,
            "the users spread over dispatchers: {served:?}"
        );
        stop.cancel();
    }

    #[tokio::test]
    async fn events_the_live_feed_skipped_are_sent_from_the_history_in_order() {
        let (_dir, log, live, hub, stop) = skipping_hub(100);
        log.publish("u", stage(1)).await.expect("publish");
        let (sink, mut queue) = channel_sink();
        let mut attachment = hub.attach("u", None, None, sink).await.expect("attach");
        for n in 2..=5 {
            let event = log.publish("u", stage(n)).await.expect("publish");
            // the feed loses ids 3 and 4
            if !(3..=4).contains(&event.id) {
                let _ = live.send(Live::Event(event));
            }
        }
        let mut ids = Vec::new();
        while ids.len() < 4 {
            let frame = tokio::time::timeout(std::time::Duration::from_secs(5), queue.recv())
                .await
                .expect("in time")
                .expect("a frame");
            if attachment.subscription.admit(&frame) {
                ids.push(frame.id);
            }
        }
        assert_eq!(ids, vec![2, 3, 4, 5]);
        stop.cancel();
    }

    /// A second connection attaching must not turn the gap check off for the first:
    /// an id the live feed skips meanwhile still reaches the connection already live.
    #[tokio::test]
    async fn a_skipped_id_reaches_a_live_connection_while_another_attaches() {
        let (_dir, log, live, hub, stop) = skipping_hub(100);
        log.publish("u", stage(1)).await.expect("publish");
        let (sink, mut first_queue) = channel_sink();
        let mut first = hub.attach("u", None, None, sink).await.expect("attach");
        // the second connection's attach waits inside its opening
        let gate = Arc::new(tokio::sync::Notify::new());
        *log.hold_latest.lock().expect("lock") = Some(Arc::clone(&gate));
        let (second_sink, _second_queue) = channel_sink();
        let attaching = {
            let hub = Arc::clone(&hub);
            tokio::spawn(async move { hub.attach("u", None, None, second_sink).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        for n in 2..=4 {
            let event = log.publish("u", stage(n)).await.expect("publish");
            // the feed loses id 3
            if event.id != 3 {
                let _ = live.send(Live::Event(event));
            }
        }
        let mut ids = Vec::new();
        while ids.len() < 3 {
            let frame = tokio::time::timeout(std::time::Duration::from_secs(5), first_queue.recv())
                .await
                .expect("in time: no id lost")
                .expect("a frame");
            if first.subscription.admit(&frame) {
                ids.push(frame.id);
            }
        }
        assert_eq!(ids, vec![2, 3, 4]);
        *log.hold_latest.lock().expect("lock") = None;
        gate.notify_one();
        attaching.await.expect("task").expect("attached");
        stop.cancel();
    }

    #[tokio::test]
    async fn a_resume_from_far_back_is_not_mistaken_for_a_gap_in_the_live_feed() {
        let (_dir, log, live, hub, stop) = skipping_hub(5000);
        for n in 1..=1500 {
            log.publish("u", stage(n)).await.expect("publish");
        }
        // resumes from the start: the replay covers 1..=1500, page by page
        let (sink, mut queue) = channel_sink();
        let attachment = hub.attach("u", Some(0), None, sink).await.expect("attach");
        assert!(attachment.replay.is_some());
        let event = log.publish("u", stage(1501)).await.expect("publish");
        let _ = live.send(Live::Event(event));
        let frame = tokio::time::timeout(std::time::Duration::from_secs(5), queue.recv())
            .await
            .expect("in time")
            .expect("a frame");
        assert_eq!(frame.id, 1501, "the live event, not a refill of the replay");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(queue.try_recv().is_err(), "nothing else queued");
        assert!(!attachment.kicked.is_cancelled());
        stop.cancel();
    }

    #[test]
    fn duplicates_and_other_projects_are_dropped() {
        let mut subscription = Subscription::new(3);
        assert!(!subscription.admit(&frame(2, "a")));
        assert!(!subscription.admit(&frame(3, "a")));
        assert!(subscription.admit(&frame(4, "a")));
        subscription.narrow_to(vec!["b".into()]);
        assert!(!subscription.admit(&frame(5, "a")));
        assert!(subscription.admit(&frame(6, "b")));
        assert_eq!(subscription.last_sent, 6);
    }

    proptest! {
        /// History and live stream overlap arbitrarily; the client sees each id once, in order.
        #[test]
        fn overlapping_history_and_live_yield_each_event_once(
            total in 1u64..60, resume in 0u64..60, overlap_start in 0u64..60
        ) {
            let resume = resume.min(total);
            let mut subscription = Subscription::new(resume);
            let history: Vec<_> = (resume + 1..=total).collect();
            let live: Vec<_> = (overlap_start.min(total) + 1..=total + 5).collect();
            let mut seen = Vec::new();
            for id in history.iter().chain(live.iter()) {
                if subscription.admit(&frame(*id, "p")) {
                    seen.push(*id);
                }
            }
            let expected: Vec<_> = (resume + 1..=total + 5).filter(|id| *id > resume && (*id <= total || live.contains(id))).collect();
            prop_assert_eq!(seen, expected);
        }
    }
}
