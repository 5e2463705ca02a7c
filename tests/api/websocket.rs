use std::time::Duration;

use hivesync::auth::ClientKind;
use hivesync::domain::now_rfc3339;
use hivesync::protocol::{EventBody, NotificationKind, SyncError, SyncErrorCode};
use serde_json::{Value, json};

use crate::helpers::{GitRepo, TestApp, WsRead, is_notification, token};

const STAGES: [&str; 6] = [
    "queued",
    "running",
    "updating_files",
    "cleaning",
    "finalizing",
    "completed",
];

/// The distinct stages in the order they first appeared.
fn stage_order(frames: &[Value], sync_id: &str) -> Vec<String> {
    let mut order: Vec<String> = Vec::new();
    for frame in frames
        .iter()
        .filter(|f| f["type"] == "sync.stage" && f["sync_id"] == sync_id)
    {
        let stage = frame["stage"].as_str().expect("stage").to_owned();
        if order.last() != Some(&stage) {
            order.push(stage);
        }
    }
    order
}

#[tokio::test]
async fn every_connection_of_the_user_sees_every_stage_then_success() {
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    repo.write("a.txt", "a");
    let commit = repo.commit("one");
    let id = app.register(&repo).await;

    let mut first = app.ws(&app.token, "").await;
    let mut second = app.ws(&app.token, "").await;
    let mut stranger = app.ws(&token("mallory", ClientKind::Desktop), "").await;
    for socket in [&mut first, &mut second, &mut stranger] {
        let hello = socket.next_json().await;
        assert_eq!(hello["type"], "hello");
        assert!(
            hello["connection_id"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
        );
        assert!(hello["last_event_id"].is_u64());
    }

    let sync_id = app.request_sync(&id).await["sync_id"]
        .as_str()
        .expect("id")
        .to_owned();
    for socket in [&mut first, &mut second] {
        let frames = socket
            .until(|f| is_notification(f, "repo_sync_success"))
            .await;
        assert_eq!(stage_order(&frames, &sync_id), STAGES);
        let ids: Vec<u64> = frames
            .iter()
            .map(|f| f["id"].as_u64().expect("every event has an id"))
            .collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
        let done = frames.last().expect("notification");
        assert_eq!(done["sync_id"], sync_id.as_str());
        assert_eq!(done["project_id"], id.as_str());
        assert_eq!(done["commit"], commit.as_str());
        assert_eq!(done["error"], Value::Null);
        assert!(done["at"].is_string());
        for stage in frames.iter().filter(|f| f["type"] == "sync.stage") {
            assert!(stage["at"].is_string());
            if stage["stage"] != "queued" {
                let progress = &stage["progress"];
                assert!(
                    progress["percent"].as_u64().is_some_and(|p| p <= 100),
                    "{stage}"
                );
                assert!(progress["objects"].is_u64() && progress["bytes"].is_u64());
            }
        }
        let completed = frames
            .iter()
            .find(|f| f["stage"] == "completed")
            .expect("completed stage");
        assert_eq!(completed["progress"]["percent"], 100);
    }
    assert!(
        stranger.is_silent_for(Duration::from_millis(300)).await,
        "another user's socket hears nothing"
    );
    app.stop().await;
}

#[tokio::test]
async fn failed_sync_ends_with_repo_sync_failed_carrying_the_code() {
    let app = TestApp::spawn().await;
    let missing = tempfile::tempdir().expect("temp dir");
    let url = format!("file://{}/absent", missing.path().display());
    let response = app
        .post(
            "/api/v1/projects",
            &app.token,
            json!({"name": "x", "repo_url": url}),
        )
        .await;
    let id = response.json::<Value>().await.expect("json")["project_id"]
        .as_str()
        .expect("id")
        .to_owned();
    let mut socket = app.ws(&app.token, "").await;
    socket.next_json().await;
    app.request_sync(&id).await;
    let frames = socket
        .until(|f| is_notification(f, "repo_sync_failed"))
        .await;
    let failed = frames.last().expect("notification");
    assert_eq!(failed["error"]["code"], "repo_not_found");
    assert!(
        failed["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
    assert!(
        frames
            .iter()
            .any(|f| f["type"] == "sync.stage" && f["stage"] == "failed")
    );
    app.stop().await;
}

#[tokio::test]
async fn subscribe_narrows_the_stream_and_ping_gets_pong() {
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    repo.commit("one");
    let watched = app.register(&repo).await;
    let ignored = app.register(&repo).await;
    let mut socket = app.ws(&app.token, "").await;
    socket.next_json().await;
    socket
        .send_json(json!({"type": "subscribe", "project_ids": [watched]}))
        .await;
    socket.send_json(json!({"type": "ping"})).await;
    assert_eq!(
        socket.next_json().await["type"],
        "pong",
        "subscribe is silent, ping answers"
    );

    let ignored_sync = app.sync_to_end(&ignored).await;
    assert_eq!(ignored_sync["status"], "completed");
    app.request_sync(&watched).await;
    let frames = socket
        .until(|f| is_notification(f, "repo_sync_success"))
        .await;
    assert!(
        frames.iter().all(|f| f["project_id"] == watched.as_str()),
        "only the subscribed project: {frames:?}"
    );
    socket.send_json(json!({"type": "bogus"})).await;
    assert_eq!(socket.next_json().await["type"], "error");
    app.stop().await;
}

#[tokio::test]
async fn resume_replays_every_missed_event_once_then_goes_live() {
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    repo.write("v", "1");
    repo.commit("one");
    let id = app.register(&repo).await;

    let mut socket = app.ws(&app.token, "").await;
    socket.next_json().await;
    app.request_sync(&id).await;
    let seen = socket
        .until(|f| is_notification(f, "repo_sync_success"))
        .await;
    let resume_from = seen.last().expect("frames")["id"].as_u64().expect("id");
    drop(socket);

    // two syncs happen while the client is away
    for round in 2..4 {
        repo.write("v", &round.to_string());
        repo.commit("next");
        assert_eq!(app.sync_to_end(&id).await["status"], "completed");
    }
    let polled: Vec<Value> = app
        .get(
            &format!("/api/v1/notifications?after={resume_from}"),
            &app.token,
        )
        .await
        .json()
        .await
        .expect("json");
    assert!(
        polled.len() >= 14,
        "two syncs' worth of events: {}",
        polled.len()
    );

    let mut resumed = app
        .ws(&app.token, &format!("?last_event_id={resume_from}"))
        .await;
    let hello = resumed.next_json().await;
    assert_eq!(hello["type"], "hello");
    let mut replayed = Vec::new();
    for _ in 0..polled.len() {
        replayed.push(resumed.next_json().await);
    }
    assert_eq!(
        replayed, polled,
        "the socket replays exactly what polling returns"
    );

    // then the live stream continues with no gap and no duplicate
    repo.write("v", "live");
    repo.commit("live");
    app.request_sync(&id).await;
    let live = resumed
        .until(|f| is_notification(f, "repo_sync_success"))
        .await;
    let mut ids: Vec<u64> = replayed
        .iter()
        .chain(live.iter())
        .map(|f| f["id"].as_u64().expect("id"))
        .collect();
    let expected: Vec<u64> = (resume_from + 1..=*ids.last().expect("some")).collect();
    assert_eq!(ids, expected, "contiguous ids after the resume point");
    ids.dedup();
    assert_eq!(ids.len(), expected.len());
    app.stop().await;
}

#[tokio::test]
async fn a_resume_point_older_than_the_history_gets_resync_required() {
    let app = TestApp::spawn_with(|config| config.event_history = 5).await;
    let repo = GitRepo::new();
    repo.commit("one");
    let id = app.register(&repo).await;
    assert_eq!(app.sync_to_end(&id).await["status"], "completed");
    // the notification follows the final record; wait for it so the history is settled
    crate::helpers::wait_until(crate::helpers::WAIT, || async {
        let events: Vec<Value> = app
            .get("/api/v1/notifications", &app.token)
            .await
            .json()
            .await
            .ok()?;
        events
            .iter()
            .any(|e| is_notification(e, "repo_sync_success"))
            .then_some(())
    })
    .await
    .expect("success notification");
    let mut socket = app.ws(&app.token, "?last_event_id=1").await;
    assert_eq!(socket.next_json().await["type"], "hello");
    assert_eq!(socket.next_json().await["type"], "resync_required");
    let polled: Vec<Value> = app
        .get("/api/v1/notifications?after=1", &app.token)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(polled[0]["type"], "resync_required");

    // a resume point the history never reached (it was lost, e.g. Redis restarted
    // without persistence): resync too, rather than dropping new ids as duplicates
    let mut socket = app.ws(&app.token, "?last_event_id=100000").await;
    let hello = socket.next_json().await;
    assert_eq!(hello["type"], "hello");
    assert!(hello["last_event_id"].as_u64().expect("id") < 100_000);
    assert_eq!(socket.next_json().await["type"], "resync_required");
    let polled: Vec<Value> = app
        .get("/api/v1/notifications?after=100000", &app.token)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(polled[0]["type"], "resync_required");
    app.stop().await;
}

#[tokio::test]
async fn a_client_that_cannot_keep_up_is_closed_with_4008_and_resumes_without_loss() {
    let app = TestApp::spawn_with(|config| config.ws_queue = 8).await;
    let mut socket = app.ws(&app.token, "").await;
    let start = socket.next_json().await["last_event_id"]
        .as_u64()
        .expect("id");

    // the client stops reading while large events pile up past the socket buffers
    let total = 400u64;
    let filler = "x".repeat(60 * 1024);
    for _ in 0..total {
        app.state
            .engine
            .events
            .publish(
                "alice",
                EventBody::Notification {
                    kind: NotificationKind::RepoSyncFailed,
                    sync_id: "s".into(),
                    project_id: "p".into(),
                    commit: None,
                    error: Some(SyncError {
                        code: SyncErrorCode::NetworkError,
                        message: filler.clone(),
                    }),
                    at: now_rfc3339(),
                    previous_commit: None,
                    changes: None,
                    trigger: None,
                },
            )
            .await
            .expect("publish");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut received = Vec::new();
    let close_code = loop {
        match socket.read(Duration::from_secs(30)).await {
            Some(WsRead::Json(frame)) => received.push(frame["id"].as_u64().expect("id")),
            Some(WsRead::Closed(code)) => break code,
            None => panic!("neither frames nor a close"),
        }
    };
    assert_eq!(close_code, Some(4008));
    assert!(
        (received.len() as u64) < total,
        "the slow client was cut off early"
    );

    let last = received.last().copied().unwrap_or(start);
    let mut resumed = app.ws(&app.token, &format!("?last_event_id={last}")).await;
    resumed.next_json().await;
    while received.len() < total as usize {
        received.push(resumed.next_json().await["id"].as_u64().expect("id"));
    }
    let expected: Vec<u64> = (start + 1..=start + total).collect();
    assert_eq!(received, expected, "every event exactly once, in order");
    let counted = crate::helpers::wait_until(crate::helpers::WAIT, || async {
        let metrics = app
            .http
            .get(format!("{}/metrics", app.base))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        metrics
            .contains("hivesync_ws_kicked_total{reason=\"slow_consumer\"} 1")
            .then_some(())
    })
    .await;
    assert!(counted.is_some(), "the slow consumer is counted");
    app.stop().await;
}

#[tokio::test]
async fn a_silent_peer_is_dropped() {
    let app = TestApp::spawn_with(|config| config.ws_idle_timeout = Duration::from_secs(1)).await;
    let mut socket = app.ws(&app.token, "").await;
    // not reading means never answering the server's pings
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut closed = false;
    while let Some(read) = socket.read(Duration::from_secs(5)).await {
        if let WsRead::Closed(_) = read {
            closed = true;
            break;
        }
    }
    assert!(closed, "the server closed a peer that stayed silent");
    let alive = crate::helpers::wait_until(Duration::from_secs(5), || async {
        (app.state.hub.connection_count() == 0).then_some(())
    })
    .await;
    assert!(alive.is_some(), "the hub forgot the connection");
    app.stop().await;
}

#[tokio::test]
async fn socket_auth_takes_a_header_or_access_token_and_refuses_bad_ones() {
    let app = TestApp::spawn().await;
    let url = format!("ws://{}/api/v1/ws?access_token={}", app.addr, app.token);
    let (mut socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("query token accepted");
    use futures_util::StreamExt;
    let hello = socket.next().await.expect("frame").expect("ok");
    assert!(hello.to_text().expect("text").contains("hello"));

    let refused =
        tokio_tungstenite::connect_async(format!("ws://{}/api/v1/ws?access_token=nope", app.addr))
            .await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 401)
        }
        other => panic!("expected 401, got {other:?}"),
    }
    let plain = app.get("/api/v1/ws", &app.token).await;
    assert_eq!(plain.status(), 400, "a plain GET is not an upgrade");
    app.stop().await;
}

/// The bar of a real sync only moves forward: percent, objects and bytes never drop
/// from one frame to the next (gix drops a finished step's counters; the stages after
/// the fetch carry what it counted), and the last frame says what was brought.
#[tokio::test]
async fn a_syncs_progress_only_moves_forward_and_ends_with_its_counts() {
    let app = TestApp::spawn().await;
    let repo = GitRepo::new();
    repo.commit_random_files(300, 64 * 1024);
    let id = app.register(&repo).await;
    let mut socket = app.ws(&app.token, "").await;
    let accepted = app.request_sync(&id).await;
    let sync_id = accepted["sync_id"].as_str().expect("sync_id").to_owned();
    let frames: Vec<Value> = socket
        .until(|frame| {
            frame["sync_id"] == sync_id.as_str()
                && frame["type"] == "sync.stage"
                && matches!(frame["stage"].as_str(), Some("completed" | "failed"))
        })
        .await
        .into_iter()
        .filter(|frame| frame["sync_id"] == sync_id.as_str() && frame["type"] == "sync.stage")
        .collect();
    let bars: Vec<(String, u64, u64, u64)> = frames
        .iter()
        .filter(|frame| frame["progress"].is_object())
        .map(|frame| {
            let progress = &frame["progress"];
            (
                frame["stage"].as_str().unwrap_or_default().to_owned(),
                progress["percent"].as_u64().expect("percent"),
                progress["objects"].as_u64().expect("objects"),
                progress["bytes"].as_u64().expect("bytes"),
            )
        })
        .collect();
    assert!(bars.len() >= 3, "progress frames: {bars:?}");
    for pair in bars.windows(2) {
        let ((_, p0, o0, b0), (_, p1, o1, b1)) = (&pair[0], &pair[1]);
        assert!(
            p1 >= p0 && o1 >= o0 && b1 >= b0,
            "the bar went backwards: {:?} → {:?} in {bars:?}",
            pair[0],
            pair[1]
        );
    }
    let (stage, percent, objects, bytes) = bars.last().expect("a last frame").clone();
    assert_eq!((stage.as_str(), percent), ("completed", 100));
    assert!(objects >= 300, "the objects brought: {objects}");
    assert!(bytes >= 300 * 64 * 1024, "the bytes brought: {bytes}");
    app.stop().await;
}
