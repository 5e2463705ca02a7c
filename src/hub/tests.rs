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
    /// while set, the next `after` panics (a bug in a dispatcher's history read)
    panic_in_after: std::sync::atomic::AtomicBool,
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
    async fn publish_once(
        &self,
        user: &str,
        body: crate::protocol::EventBody,
        once: &str,
    ) -> Result<Event, EngineError> {
        self.inner.publish_once(user, body, once).await
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
        assert!(
            !self.panic_in_after.swap(false, Ordering::AcqRel),
            "a history read that fails once"
        );
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
        panic_in_after: std::sync::atomic::AtomicBool::new(false),
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

/// Takes frames from `queue` until `attachment` has admitted `want` of them (or 10 s
/// pass), and returns the admitted ids.
async fn admitted(
    queue: &mut tokio::sync::mpsc::UnboundedReceiver<Arc<Frame>>,
    attachment: &mut Attachment,
    want: usize,
) -> Vec<EventId> {
    let mut ids = Vec::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while ids.len() < want {
        match tokio::time::timeout_at(deadline, queue.recv()).await {
            Ok(Some(frame)) => {
                if attachment.subscription.admit(&frame) {
                    ids.push(frame.id);
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatcher_that_panicked_is_started_again_and_catches_its_users_up() {
    let (_dir, log, live, _hub, stop) = skipping_hub(100);
    let hub = Hub::new(log.clone(), 64);
    tokio::spawn(Arc::clone(&hub).run_dispatchers(1, stop.child_token()));
    let (sink_u, mut queue_u) = channel_sink();
    let mut attached_u = hub.attach("u", None, None, sink_u).await.expect("attach");
    let (sink_v, mut queue_v) = channel_sink();
    let mut attached_v = hub.attach("v", None, None, sink_v).await.expect("attach");
    // the feed skips u's first event; the gap it leaves sends the only dispatcher to
    // the history, and that read panics
    log.panic_in_after.store(true, Ordering::Release);
    log.publish("u", stage(1)).await.expect("publish");
    for user in ["v", "u"] {
        let event = log.publish(user, stage(1)).await.expect("publish");
        let _ = live.send(Live::Event(event));
    }
    // the restarted dispatcher catches each user up from their history: nothing the
    // panic cut short is lost
    assert_eq!(
        admitted(&mut queue_u, &mut attached_u, 2).await,
        vec![1, 2],
        "u's events after the dispatcher panicked"
    );
    assert_eq!(
        admitted(&mut queue_v, &mut attached_v, 1).await,
        vec![1],
        "v's event after the dispatcher panicked"
    );
    assert!(
        !log.panic_in_after.load(Ordering::Acquire),
        "the history read panicked"
    );
    // and it takes the live feed again
    let event = log.publish("u", stage(3)).await.expect("publish");
    let _ = live.send(Live::Event(event));
    assert_eq!(admitted(&mut queue_u, &mut attached_u, 1).await, vec![3]);
    assert!(!attached_u.kicked.is_cancelled() && !attached_v.kicked.is_cancelled());
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_that_panics_has_its_connection_kicked_and_the_batch_goes_on() {
    let (_dir, log, live, hub, stop) = skipping_hub(100);
    let (sender, _panicked_queue) = tokio::sync::mpsc::unbounded_channel();
    let panicking: Arc<dyn FrameSink> = Arc::new(PanicsOnce(
        std::sync::atomic::AtomicBool::new(false),
        sender,
    ));
    let broken = hub
        .attach("u", None, None, panicking)
        .await
        .expect("attach");
    let (sink_u, mut queue_u) = channel_sink();
    let mut attached_u = hub.attach("u", None, None, sink_u).await.expect("attach");
    let (sink_v, mut queue_v) = channel_sink();
    let mut attached_v = hub.attach("v", None, None, sink_v).await.expect("attach");
    for user in ["u", "v", "u"] {
        let event = log.publish(user, stage(1)).await.expect("publish");
        let _ = live.send(Live::Event(event));
    }
    // u's other connection and v have everything, whatever the batches were
    assert_eq!(admitted(&mut queue_u, &mut attached_u, 2).await, vec![1, 2]);
    assert_eq!(admitted(&mut queue_v, &mut attached_v, 1).await, vec![1]);
    // the connection whose sink panicked is kicked: its client resumes from the last
    // id it has and loses nothing
    tokio::time::timeout(std::time::Duration::from_secs(5), broken.kicked.cancelled())
        .await
        .expect("the connection whose sink panicked is kicked");
    assert!(!attached_u.kicked.is_cancelled() && !attached_v.kicked.is_cancelled());
    // the same dispatcher goes on with the live feed
    let event = log.publish("v", stage(2)).await.expect("publish");
    let _ = live.send(Live::Event(event));
    assert_eq!(admitted(&mut queue_v, &mut attached_v, 1).await, vec![2]);
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
