//! Sharded pub/sub on a Redis Cluster: the channels of the user groups a hub holds
//! sockets for, and the job shards' bells a worker sleeps on.
//!
//! One cluster connection speaking RESP3 carries every subscription; redis-rs
//! resubscribes each node's channels after a reconnect and moves them when the slot
//! map changes (a failover, a reshard). Each channel is subscribed once however many
//! callers want it (counted), and a confirmation the engine did not ask for (a
//! resubscription: messages may have been missed meanwhile) or an unsubscription it
//! did not ask for (the slot moved) is reported, so the engine can recover from the
//! histories.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use redis::cluster_async::ClusterConnection;
use redis::{PushInfo, PushKind};
use tokio::sync::broadcast;

use crate::engine::EngineError;

/// What the push reader hands on.
#[derive(Debug)]
pub(super) enum Push {
    /// a message on `channel`
    Message { channel: String, payload: Vec<u8> },
    /// `channel` was subscribed again without being asked: what was published on it
    /// while it was not may have been missed
    Resubscribed { channel: String },
    /// the server dropped `channel` (its slot moved) while it is still wanted
    Dropped { channel: String },
    /// a node's connection was lost (it is reconnected by the client)
    Disconnected,
}

#[derive(Default)]
struct Wanted {
    /// callers that want the channel
    count: usize,
    /// confirmations (of our own subscribe or unsubscribe calls) still to come
    expected_subscribes: usize,
    expected_unsubscribes: usize,
}

pub(super) struct ShardedPubSub {
    client: redis::cluster::ClusterClient,
    connection: tokio::sync::OnceCell<ClusterConnection>,
    /// bounded, and nothing is kept while no loop listens (a process that never reads
    /// its pushes does not accumulate them); a reader that falls behind learns it
    pushes: broadcast::Sender<PushInfo>,
    wanted: Mutex<HashMap<String, Wanted>>,
    /// one subscribe or unsubscribe of a channel at a time
    changing: Mutex<HashMap<String, Arc<tokio::sync::Mutex<bool>>>>,
}

impl ShardedPubSub {
    pub(super) fn new(nodes: &[&str]) -> Result<Self, EngineError> {
        let (sender, _) = broadcast::channel(16 * 1024);
        let client = redis::cluster::ClusterClientBuilder::new(nodes.to_vec())
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(sender.clone())
            .connection_timeout(std::time::Duration::from_secs(2))
            .response_timeout(std::time::Duration::from_secs(5))
            .retries(3)
            .max_retry_wait(500)
            .build()?;
        Ok(Self {
            client,
            connection: tokio::sync::OnceCell::new(),
            pushes: sender,
            wanted: Mutex::new(HashMap::new()),
            changing: Mutex::new(HashMap::new()),
        })
    }

    async fn connection(&self) -> Result<ClusterConnection, EngineError> {
        Ok(self
            .connection
            .get_or_try_init(|| self.client.get_async_connection())
            .await?
            .clone())
    }

    /// Connects (once; later calls return at once).
    pub(super) async fn connect(&self) -> Result<(), EngineError> {
        self.connection().await.map(drop)
    }

    /// The pushes of the subscription connection from now on.
    pub(super) fn pushes(&self) -> broadcast::Receiver<PushInfo> {
        self.pushes.subscribe()
    }

    fn gate(&self, channel: &str) -> Arc<tokio::sync::Mutex<bool>> {
        Arc::clone(
            self.changing
                .lock()
                .expect("pub/sub lock")
                .entry(channel.to_owned())
                .or_default(),
        )
    }

    /// Wants `channel`: subscribes on the first want, and returns once the server has
    /// confirmed the subscription (messages published after that arrive).
    pub(super) async fn subscribe(&self, channel: &str) -> Result<(), EngineError> {
        self.wanted
            .lock()
            .expect("pub/sub lock")
            .entry(channel.to_owned())
            .or_default()
            .count += 1;
        let gate = self.gate(channel);
        let mut subscribed = gate.lock().await;
        if *subscribed {
            return Ok(());
        }
        self.expect(channel, true);
        let outcome = async {
            let mut connection = self.connection().await?;
            connection.ssubscribe(channel).await?;
            Ok::<(), EngineError>(())
        }
        .await;
        match outcome {
            Ok(()) => {
                *subscribed = true;
                Ok(())
            }
            Err(err) => {
                drop(subscribed);
                self.unexpect(channel);
                self.forget(channel);
                Err(err)
            }
        }
    }

    /// Gives up one want of `channel`; the last one unsubscribes (in the background).
    pub(super) fn unsubscribe(self: &Arc<Self>, channel: &str) {
        if !self.forget(channel) {
            return;
        }
        let this = Arc::clone(self);
        let channel = channel.to_owned();
        tokio::spawn(async move {
            let gate = this.gate(&channel);
            let mut subscribed = gate.lock().await;
            let still_unwanted = this
                .wanted
                .lock()
                .expect("pub/sub lock")
                .get(&channel)
                .is_none_or(|wanted| wanted.count == 0);
            if !*subscribed || !still_unwanted {
                return;
            }
            this.expect(&channel, false);
            let outcome = async {
                let mut connection = this.connection().await?;
                connection.sunsubscribe(&channel).await?;
                Ok::<(), EngineError>(())
            }
            .await;
            match outcome {
                Ok(()) => *subscribed = false,
                Err(err) => {
                    tracing::debug!(%channel, error = %err, "sharded unsubscribe failed; the channel stays subscribed")
                }
            }
        });
    }

    /// Drops one want; true when it was the last.
    fn forget(&self, channel: &str) -> bool {
        let mut wanted = self.wanted.lock().expect("pub/sub lock");
        match wanted.get_mut(channel) {
            Some(entry) if entry.count > 1 => {
                entry.count -= 1;
                false
            }
            Some(entry) => {
                entry.count = 0;
                true
            }
            None => false,
        }
    }

    fn expect(&self, channel: &str, subscribe: bool) {
        let mut wanted = self.wanted.lock().expect("pub/sub lock");
        let entry = wanted.entry(channel.to_owned()).or_default();
        if subscribe {
            entry.expected_subscribes += 1;
        } else {
            entry.expected_unsubscribes += 1;
        }
    }

    fn unexpect(&self, channel: &str) {
        if let Some(entry) = self.wanted.lock().expect("pub/sub lock").get_mut(channel) {
            entry.expected_subscribes = entry.expected_subscribes.saturating_sub(1);
        }
    }

    /// Reads one push from the connection as the engine should see it (`None` for the
    /// confirmations of its own calls and anything else it need not act on).
    pub(super) fn classify(&self, push: PushInfo) -> Option<Push> {
        let channel = || push.data.first().and_then(string_of);
        match push.kind {
            PushKind::SMessage => Some(Push::Message {
                channel: channel()?,
                payload: push.data.get(1).and_then(bytes_of)?,
            }),
            PushKind::SSubscribe => {
                let channel = channel()?;
                let mut wanted = self.wanted.lock().expect("pub/sub lock");
                let entry = wanted.entry(channel.clone()).or_default();
                if entry.expected_subscribes > 0 {
                    entry.expected_subscribes -= 1;
                    None
                } else {
                    Some(Push::Resubscribed { channel })
                }
            }
            PushKind::SUnsubscribe => {
                let channel = channel()?;
                let mut wanted = self.wanted.lock().expect("pub/sub lock");
                let entry = wanted.entry(channel.clone()).or_default();
                if entry.expected_unsubscribes > 0 {
                    entry.expected_unsubscribes -= 1;
                    None
                } else if entry.count > 0 {
                    Some(Push::Dropped { channel })
                } else {
                    None
                }
            }
            PushKind::Disconnection => Some(Push::Disconnected),
            _ => None,
        }
    }

    /// Subscribes `channel` again after the server dropped it; its confirmation comes
    /// back as [`Push::Resubscribed`].
    pub(super) async fn resubscribe(&self, channel: &str) -> Result<(), EngineError> {
        let mut connection = self.connection().await?;
        connection.ssubscribe(channel).await?;
        Ok(())
    }

    /// The channels wanted now.
    pub(super) fn wanted_channels(&self) -> Vec<String> {
        self.wanted
            .lock()
            .expect("pub/sub lock")
            .iter()
            .filter(|(_, wanted)| wanted.count > 0)
            .map(|(channel, _)| channel.clone())
            .collect()
    }

    /// Touches the node that owns `channel`'s slot, so that a dead node is noticed (and
    /// the slot map re-read) even when nothing is being published.
    pub(super) async fn probe(&self, channel: &str) -> Result<(), EngineError> {
        let mut connection = self.connection().await?;
        redis::cmd("EXISTS")
            .arg(channel)
            .query_async::<i64>(&mut connection)
            .await?;
        Ok(())
    }
}

fn string_of(value: &redis::Value) -> Option<String> {
    bytes_of(value).and_then(|bytes| String::from_utf8(bytes).ok())
}

fn bytes_of(value: &redis::Value) -> Option<Vec<u8>> {
    match value {
        redis::Value::BulkString(bytes) => Some(bytes.clone()),
        redis::Value::SimpleString(text) => Some(text.clone().into_bytes()),
        _ => None,
    }
}
