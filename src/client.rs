//! The reference Rust client of the hub's API: REST calls with typed bodies, and a
//! WebSocket event stream that resumes from the last event it saw when the socket
//! drops. `hivesync sync` and `hivesync projects` are built on it.
//!
//! The token travels in the `Authorization` header, on the socket too, never in a URL.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use crate::protocol::{
    ErrorBody, EventBody, EventId, ProjectView, ServerFrame, SyncAccepted, SyncRecord, SyncStatus,
};

/// Reconnects of a dropped socket are given up after this long without success.
const RECONNECT_PATIENCE: Duration = Duration::from_secs(30);
/// With no frame for this long, the sync's record is read over REST in case an end
/// was missed (a resync, an event history trimmed under a long outage).
const QUIET_CHECK: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server URL or token is unusable.
    #[error("{0}")]
    Usage(String),
    /// The server could not be reached, or the connection broke for good.
    #[error("cannot reach the hub: {0}")]
    Connect(String),
    /// The server answered with an error body.
    #[error("{}: {}", .body.error, .body.message)]
    Api { status: u16, body: ErrorBody },
}

/// A hub and the token to call it with.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    /// `http(s)://host:port`, no trailing slash
    base: String,
    token: String,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
            .field("token", &"<redacted>")
            .finish()
    }
}

impl Client {
    pub fn new(server: &str, token: &str) -> Result<Self, ClientError> {
        let base = server.trim().trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ClientError::Usage(format!(
                "the server must be an http:// or https:// URL, not '{base}'"
            )));
        }
        let token = token.trim().to_owned();
        if token.is_empty() {
            return Err(ClientError::Usage(
                "a token is needed: --token or HIVESYNC_TOKEN".into(),
            ));
        }
        crate::tls::ensure_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|err| ClientError::Usage(format!("cannot set up HTTP: {err}")))?;
        Ok(Self { http, base, token })
    }

    pub async fn projects(&self) -> Result<Vec<ProjectView>, ClientError> {
        self.call(self.http.get(self.url("/api/v1/projects"))).await
    }

    /// Registers a project: `name` (default: the URL's last component), `repo_url`,
    /// `branch` (default: the hub's, `main`).
    pub async fn register(
        &self,
        name: &str,
        repo_url: &str,
        branch: Option<&str>,
    ) -> Result<ProjectView, ClientError> {
        let mut body = serde_json::json!({ "name": name, "repo_url": repo_url });
        if let Some(branch) = branch {
            body["branch"] = branch.into();
        }
        self.call(self.http.post(self.url("/api/v1/projects")).json(&body))
            .await
    }

    /// Requests a sync (or joins the one waiting).
    pub async fn request_sync(&self, project_id: &str) -> Result<SyncAccepted, ClientError> {
        let body = serde_json::json!({ "project_id": project_id });
        self.call(self.http.post(self.url("/api/v1/repo/sync")).json(&body))
            .await
    }

    pub async fn sync_record(&self, sync_id: &str) -> Result<SyncRecord, ClientError> {
        // sync ids are uuids; anything else is refused before it reaches a URL
        if !sync_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(ClientError::Usage(format!("'{sync_id}' is not a sync id")));
        }
        self.call(
            self.http
                .get(self.url(&format!("/api/v1/repo/sync/{sync_id}"))),
        )
        .await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let response = request
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|err| ClientError::Connect(crate::error::error_chain(&err)))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|err| ClientError::Connect(crate::error::error_chain(&err)))?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|err| {
                ClientError::Connect(format!("the hub's answer did not parse: {err}"))
            });
        }
        let body = serde_json::from_slice::<ErrorBody>(&bytes).unwrap_or_else(|_| ErrorBody {
            error: format!("http_{}", status.as_u16()),
            message: String::from_utf8_lossy(&bytes).chars().take(200).collect(),
        });
        Err(ClientError::Api {
            status: status.as_u16(),
            body,
        })
    }

    /// Opens the event stream of `project_ids` (every project when empty).
    pub async fn events(&self, project_ids: &[&str]) -> Result<EventStream, ClientError> {
        let mut stream = EventStream {
            client: self.clone(),
            projects: project_ids.iter().map(|id| (*id).to_owned()).collect(),
            socket: None,
            last_event_id: None,
            reconnects: 0,
        };
        stream.connect().await?;
        Ok(stream)
    }

    /// Requests a sync of `project_id` and follows it to its end, calling `on_update`
    /// with every stage and progress event of it. Returns the final record.
    pub async fn sync_and_follow(
        &self,
        project_id: &str,
        mut on_update: impl FnMut(Update<'_>),
    ) -> Result<SyncRecord, ClientError> {
        // the stream is open once the hub said hello, which it does after the socket
        // is subscribed: not one event of the sync can be missed
        let mut events = self.events(&[project_id]).await?;
        let accepted = self.request_sync(project_id).await?;
        on_update(Update::Accepted(&accepted));
        let sync_id = accepted.sync_id;
        loop {
            let check = match events.next_within(Some(QUIET_CHECK)).await? {
                Next::Quiet => true,
                Next::Resumed => {
                    on_update(Update::Reconnected(events.reconnects));
                    true
                }
                Next::Frame(frame) => match &*frame {
                    ServerFrame::Control(_) => true,
                    ServerFrame::Event(event) => match &event.body {
                        EventBody::SyncStage {
                            sync_id: id,
                            stage,
                            progress,
                            retry,
                            ..
                        } if *id == sync_id => {
                            on_update(Update::Stage {
                                stage: *stage,
                                progress: *progress,
                                retry: retry.as_ref(),
                            });
                            stage.is_terminal()
                        }
                        _ => false,
                    },
                },
            };
            if check {
                match self.sync_record(sync_id.as_str()).await {
                    Ok(record) if record.status.is_terminal() => return Ok(record),
                    Ok(_) => {}
                    // the hub is away: the stream's reconnecting decides when to give up
                    Err(ClientError::Connect(_)) => {}
                    Err(err) => return Err(err),
                }
            }
        }
    }
}

/// What [`Client::sync_and_follow`] reports as it goes.
#[derive(Debug)]
pub enum Update<'a> {
    Accepted(&'a SyncAccepted),
    Stage {
        stage: SyncStatus,
        progress: Option<crate::protocol::Progress>,
        retry: Option<&'a crate::protocol::RetryWait>,
    },
    /// the socket dropped and was opened again, resuming after the last event seen
    Reconnected(u32),
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A user's live events, resumed after the last one seen whenever the socket drops.
pub struct EventStream {
    client: Client,
    projects: Vec<String>,
    socket: Option<Socket>,
    /// the newest event id received (or the first hello's, before any)
    last_event_id: Option<EventId>,
    /// how many times the socket was opened again
    pub reconnects: u32,
}

/// The next thing an [`EventStream`] has.
#[derive(Debug)]
pub enum Next {
    Frame(Box<ServerFrame>),
    /// the socket dropped and is open again; events missed meanwhile follow
    Resumed,
    /// no frame within the time asked for (the socket is open)
    Quiet,
}

impl EventStream {
    /// The newest event id seen.
    pub fn last_event_id(&self) -> Option<EventId> {
        self.last_event_id
    }

    async fn connect(&mut self) -> Result<(), ClientError> {
        let ws_base = match self.client.base.split_once("://") {
            Some(("https", rest)) => format!("wss://{rest}"),
            Some((_, rest)) => format!("ws://{rest}"),
            None => return Err(ClientError::Usage("the server URL has no scheme".into())),
        };
        let mut url = format!("{ws_base}{}", crate::protocol::WS_PATH);
        let mut query = Vec::new();
        if !self.projects.is_empty() {
            query.push(format!("project_ids={}", self.projects.join(",")));
        }
        if let Some(id) = self.last_event_id {
            query.push(format!("last_event_id={id}"));
        }
        if !query.is_empty() {
            url = format!("{url}?{}", query.join("&"));
        }
        let mut request = url
            .into_client_request()
            .map_err(|err| ClientError::Usage(format!("bad server URL: {err}")))?;
        let bearer = format!("Bearer {}", self.client.token)
            .parse()
            .map_err(|_| {
                ClientError::Usage("the token has characters a header cannot carry".into())
            })?;
        request.headers_mut().insert("authorization", bearer);
        let connector = if ws_base.starts_with("wss://") {
            let config = crate::tls::client_config()
                .map_err(|err| ClientError::Usage(format!("cannot set up TLS: {err}")))?;
            Some(Connector::Rustls(config))
        } else {
            None
        };
        let (socket, _) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async_tls_with_config(request, None, false, connector),
        )
        .await
        .map_err(|_| ClientError::Connect("the WebSocket did not open within 10 s".into()))?
        .map_err(|err| match err {
            tungstenite::Error::Http(response) => {
                let body = response
                    .body()
                    .as_deref()
                    .and_then(|bytes| serde_json::from_slice::<ErrorBody>(bytes).ok());
                match body {
                    Some(body) => ClientError::Api {
                        status: response.status().as_u16(),
                        body,
                    },
                    None => ClientError::Connect(format!(
                        "the WebSocket was refused with {}",
                        response.status()
                    )),
                }
            }
            other => ClientError::Connect(other.to_string()),
        })?;
        // the hub says hello once the socket is subscribed: from then on nothing
        // published for the user is missed
        let mut socket = socket;
        let hello = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match socket.next().await {
                    Some(Ok(Message::Text(text))) => {
                        if let Ok(ServerFrame::Control(crate::protocol::ControlFrame::Hello {
                            last_event_id,
                            ..
                        })) = serde_json::from_str::<ServerFrame>(text.as_str())
                        {
                            return Ok(last_event_id);
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(err)) => return Err(ClientError::Connect(err.to_string())),
                    None => {
                        return Err(ClientError::Connect(
                            "the hub closed the socket before its hello".into(),
                        ));
                    }
                }
            }
        })
        .await
        .map_err(|_| ClientError::Connect("no hello from the hub within 10 s".into()))??;
        self.last_event_id.get_or_insert(hello);
        self.socket = Some(socket);
        Ok(())
    }

    /// The next frame; a dropped socket is opened again (resuming after the last
    /// event seen) for up to 30 s before giving up.
    pub async fn next(&mut self) -> Result<Next, ClientError> {
        self.next_within(None).await
    }

    /// Like [`next`](Self::next), but `Next::Quiet` when the open socket brings no
    /// frame within `quiet`. Reconnecting is not cut short by it.
    pub async fn next_within(&mut self, quiet: Option<Duration>) -> Result<Next, ClientError> {
        loop {
            if self.socket.is_none() {
                self.reconnect().await?;
                return Ok(Next::Resumed);
            }
            let Some(socket) = self.socket.as_mut() else {
                continue;
            };
            let read = match quiet {
                Some(limit) => match tokio::time::timeout(limit, socket.next()).await {
                    Ok(read) => read,
                    Err(_) => return Ok(Next::Quiet),
                },
                None => socket.next().await,
            };
            match read {
                Some(Ok(Message::Text(text))) => {
                    let Ok(frame) = serde_json::from_str::<ServerFrame>(text.as_str()) else {
                        // a frame of a newer server: skipped, as the contract allows
                        continue;
                    };
                    if let ServerFrame::Event(event) = &frame {
                        self.last_event_id = Some(event.id);
                    }
                    return Ok(Next::Frame(Box::new(frame)));
                }
                Some(Ok(Message::Ping(payload))) => {
                    let _ = socket.send(Message::Pong(payload)).await;
                }
                Some(Ok(Message::Close(frame))) => {
                    // 4001: the token expired; a new socket with it would be refused too
                    if frame.as_ref().is_some_and(|frame| {
                        u16::from(frame.code) == crate::protocol::CLOSE_TOKEN_EXPIRED
                    }) {
                        return Err(ClientError::Usage(
                            "the token expired; get a fresh one".into(),
                        ));
                    }
                    self.socket = None;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => self.socket = None,
            }
        }
    }

    async fn reconnect(&mut self) -> Result<(), ClientError> {
        let started = tokio::time::Instant::now();
        let mut backoff =
            crate::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(3));
        loop {
            match self.connect().await {
                Ok(()) => {
                    self.reconnects += 1;
                    return Ok(());
                }
                Err(err @ (ClientError::Usage(_) | ClientError::Api { .. })) => return Err(err),
                Err(err) if started.elapsed() >= RECONNECT_PATIENCE => return Err(err),
                Err(_) => tokio::time::sleep(backoff.next_wait()).await,
            }
        }
    }
}
