//! A WebSocket connection's write side, shared by the hub's dispatcher and the
//! socket's own task. The dispatcher writes a user's new frames straight into each of
//! their sockets (one non-blocking write per socket per batch of events) instead of
//! queueing them for the socket's task and waking it: a wake-up per socket per event
//! cost far more than the write itself. Only what a socket cannot take at once waits
//! here, in order, for the socket's task to write as the peer drains it; past
//! `capacity` frames the connection is too far behind and the hub closes it (4008).
//!
//! Every byte of the connection goes through one [`Outbox`] under its lock — frames
//! from the dispatcher, the replay and tungstenite's own control frames (pongs, pings,
//! close) through [`ConnIo`] — so nothing interleaves or overtakes.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::hub::{Frame, FrameSink, SinkFull, Subscription};

pub struct Outbox {
    stream: TcpStream,
    state: Mutex<State>,
    /// wakes the socket's task: bytes wait to be written
    wake: Notify,
    /// frames that may wait before the connection counts as too far behind
    capacity: usize,
}

struct State {
    /// until the replay is written: live frames wait here, as offered
    held: Option<VecDeque<Arc<Frame>>>,
    /// which frames the connection still needs (set when the hub attached it)
    subscription: Subscription,
    /// bytes not yet written, oldest first, with the frames each holds; the first may
    /// be partly written
    pending: VecDeque<(Bytes, usize)>,
    written_of_first: usize,
    pending_frames: usize,
    /// when the oldest pending bytes were queued
    pending_since: Option<Instant>,
    /// the connection is ending: frames offered from now on are dropped
    closed: bool,
    /// a write failed: the connection is gone
    broken: bool,
}

impl Outbox {
    pub fn new(stream: TcpStream, capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            stream,
            state: Mutex::new(State {
                held: Some(VecDeque::new()),
                subscription: Subscription::new(0),
                pending: VecDeque::new(),
                written_of_first: 0,
                pending_frames: 0,
                pending_since: None,
                closed: false,
                broken: false,
            }),
            wake: Notify::new(),
            capacity: capacity.max(1),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // every step under the lock leaves the state whole
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The subscription the hub attached the connection with.
    pub fn start(&self, subscription: Subscription) {
        self.lock().subscription = subscription;
    }

    /// Frames of the replay, in order: each goes out if the subscription admits it.
    pub fn write_frames(&self, frames: &[Arc<Frame>]) {
        let mut state = self.lock();
        self.admit_and_write(&mut state, frames.iter());
    }

    /// The replay is written: the live frames held meanwhile go out (those the replay
    /// already carried are dropped by the subscription), and from now on frames are
    /// written as they are offered. `Err` when the connection is already too far behind.
    pub fn release(&self) -> Result<(), SinkFull> {
        let mut state = self.lock();
        let held = state.held.take().unwrap_or_default();
        self.admit_and_write(&mut state, held.iter());
        self.within_capacity(&state)
    }

    /// Bytes of the connection's own (control frames, the opening frames).
    pub fn write_bytes(&self, bytes: Bytes) -> io::Result<()> {
        let mut state = self.lock();
        if state.broken {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        self.push(&mut state, bytes, 0);
        Ok(())
    }

    pub fn narrow_to(&self, project_ids: Vec<String>) {
        self.lock().subscription.narrow_to(project_ids);
    }

    /// Whether bytes wait to be written, and since when.
    pub fn pending_since(&self) -> Option<Instant> {
        self.lock().pending_since
    }

    /// Resolves when bytes may wait to be written (check [`Outbox::pending_since`]).
    pub async fn queued(&self) {
        self.wake.notified().await;
    }

    /// The connection is being dropped: what waits is let go (but for the rest of a
    /// frame already partly written, so the close frame that follows is whole), and
    /// nothing more is taken.
    pub fn abandon(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.held = None;
        let keep = usize::from(state.written_of_first > 0).min(state.pending.len());
        state.pending.truncate(keep);
        state.pending_frames = state.pending.iter().map(|(_, frames)| frames).sum();
        if state.pending.is_empty() {
            state.pending_since = None;
        }
    }

    /// Writes what waits, as the socket takes it: `Ready(Ok)` once nothing waits.
    pub fn poll_drain(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            {
                let mut state = self.lock();
                loop {
                    if state.broken {
                        return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
                    }
                    let Some((front, frames)) = state.pending.front() else {
                        state.pending_since = None;
                        return Poll::Ready(Ok(()));
                    };
                    let (front, frames) = (front.clone(), *frames);
                    let rest = &front[state.written_of_first..];
                    match self.stream.try_write(rest) {
                        Ok(written) if written == rest.len() => {
                            state.pending.pop_front();
                            state.written_of_first = 0;
                            state.pending_frames -= frames;
                        }
                        Ok(written) => state.written_of_first += written,
                        Err(err) if would_block(&err) => break,
                        Err(err) => {
                            state.broken = true;
                            return Poll::Ready(Err(err));
                        }
                    }
                }
            }
            // registers the task for when the peer has read some
            ready!(self.stream.poll_write_ready(cx))?;
        }
    }

    fn within_capacity(&self, state: &State) -> Result<(), SinkFull> {
        if state.pending_frames > self.capacity {
            Err(SinkFull)
        } else {
            Ok(())
        }
    }

    fn admit_and_write<'a>(&self, state: &mut State, frames: impl Iterator<Item = &'a Arc<Frame>>) {
        let admitted: Vec<&Arc<Frame>> = frames
            .filter(|frame| state.subscription.admit(frame))
            .collect();
        match admitted.as_slice() {
            [] => {}
            [one] => self.push(state, one.wire.clone(), 1),
            many => {
                let mut joined =
                    Vec::with_capacity(many.iter().map(|frame| frame.wire.len()).sum());
                for frame in many {
                    joined.extend_from_slice(&frame.wire);
                }
                self.push(state, Bytes::from(joined), many.len());
            }
        }
    }

    /// Writes `bytes` now if nothing waits before them and the socket takes them,
    /// else queues them (waking the socket's task to write them later).
    fn push(&self, state: &mut State, bytes: Bytes, frames: usize) {
        if state.broken || bytes.is_empty() {
            return;
        }
        if !state.pending.is_empty() {
            state.pending.push_back((bytes, frames));
            state.pending_frames += frames;
            return;
        }
        let written = match self.stream.try_write(&bytes) {
            Ok(written) if written == bytes.len() => return,
            Ok(written) => written,
            Err(err) if would_block(&err) => 0,
            Err(_) => {
                state.broken = true;
                self.wake.notify_one();
                return;
            }
        };
        state.written_of_first = written;
        state.pending.push_back((bytes, frames));
        state.pending_frames += frames;
        state.pending_since = Some(Instant::now());
        self.wake.notify_one();
    }
}

fn would_block(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

impl FrameSink for Outbox {
    fn offer(&self, frames: &[Arc<Frame>]) -> Result<(), SinkFull> {
        let mut state = self.lock();
        if state.closed || state.broken {
            return Ok(());
        }
        if let Some(held) = &mut state.held {
            held.extend(frames.iter().cloned());
            return if held.len() > self.capacity {
                Err(SinkFull)
            } else {
                Ok(())
            };
        }
        self.admit_and_write(&mut state, frames.iter());
        self.within_capacity(&state)
    }
}

/// The connection as tungstenite reads and writes it: reads straight from the socket
/// (after what hyper had already read past the upgrade request), writes through the
/// [`Outbox`], so its control frames keep their place among the dispatcher's frames.
pub struct ConnIo {
    outbox: Arc<Outbox>,
    /// bytes hyper read past the upgrade request, read before the socket
    prefix: Bytes,
}

impl ConnIo {
    pub fn new(outbox: Arc<Outbox>, prefix: Bytes) -> Self {
        Self {
            outbox,
            prefix: own(prefix),
        }
    }
}

/// `bytes` in a buffer of their own: a slice of hyper's read buffer, even an empty
/// one, would keep all of that buffer (kilobytes) alive for the socket's life.
fn own(bytes: Bytes) -> Bytes {
    if bytes.is_empty() {
        Bytes::new()
    } else {
        Bytes::copy_from_slice(&bytes)
    }
}

impl AsyncRead for ConnIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let count = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(count);
            buf.put_slice(&head);
            if self.prefix.is_empty() {
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        loop {
            ready!(self.outbox.stream.poll_read_ready(cx))?;
            match self.outbox.stream.try_read(buf.initialize_unfilled()) {
                Ok(count) => {
                    buf.advance(count);
                    return Poll::Ready(Ok(()));
                }
                Err(err) if would_block(&err) => continue,
                Err(err) => return Poll::Ready(Err(err)),
            }
        }
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.outbox.write_bytes(Bytes::copy_from_slice(buf))?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.outbox.poll_drain(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.outbox.poll_drain(cx)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use futures_util::StreamExt;
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::Role;

    /// A connected pair of loopback TCP streams: (server side, client side).
    pub(crate) async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (accepted.expect("accept").0, client.expect("connect"))
    }

    fn frame(id: u64, payload: &str) -> Arc<Frame> {
        Arc::new(Frame {
            id,
            project_id: "p".into(),
            wire: crate::hub::text_frame(payload.as_bytes()),
        })
    }

    async fn client_of(stream: TcpStream) -> WebSocketStream<TcpStream> {
        WebSocketStream::from_raw_socket(stream, Role::Client, None).await
    }

    async fn next_text(client: &mut WebSocketStream<TcpStream>) -> String {
        loop {
            match tokio::time::timeout(std::time::Duration::from_secs(10), client.next())
                .await
                .expect("a frame in time")
                .expect("open")
                .expect("a valid frame")
            {
                Message::Text(text) => return text.to_string(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn live_frames_wait_for_the_replay_and_none_goes_out_twice() {
        let (server, client) = tcp_pair().await;
        let outbox = Outbox::new(server, 100);
        let mut client = client_of(client).await;
        outbox.start(Subscription::new(2));
        // live frames 4 and 5 arrive while the replay (3, 4) is being written
        outbox
            .offer(&[frame(4, "four"), frame(5, "five")])
            .expect("held");
        outbox.write_frames(&[frame(1, "old"), frame(3, "three"), frame(4, "four")]);
        outbox.release().expect("released");
        outbox.offer(&[frame(6, "six")]).expect("written");
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(next_text(&mut client).await);
        }
        assert_eq!(seen, ["three", "four", "five", "six"]);
    }

    #[tokio::test]
    async fn frames_of_every_length_encoding_arrive_whole_and_in_order() {
        let (server, client) = tcp_pair().await;
        let outbox = Outbox::new(server, 100);
        let mut client = client_of(client).await;
        outbox.start(Subscription::new(0));
        outbox.release().expect("released");
        let lengths = [0usize, 5, 125, 126, 200, 65_535, 65_536, 70_000];
        let frames: Vec<Arc<Frame>> = lengths
            .iter()
            .enumerate()
            .map(|(at, len)| frame(at as u64 + 1, &"x".repeat(*len)))
            .collect();
        // one batch: written as one buffer
        outbox.offer(&frames).expect("offered");
        // the socket may not take 200 KiB at once: the rest waits for the drain
        let drain = {
            let outbox = Arc::clone(&outbox);
            tokio::spawn(async move { std::future::poll_fn(|cx| outbox.poll_drain(cx)).await })
        };
        let mut seen = Vec::new();
        for _ in &lengths {
            seen.push(next_text(&mut client).await.len());
        }
        drain.await.expect("drain task").expect("drained");
        assert_eq!(seen, lengths);
    }

    /// A peer that does not read: what the kernel will not take waits in the outbox,
    /// in order behind a partly written frame; past the capacity the offer says the
    /// connection is too far behind; once the peer reads, everything arrives in order,
    /// a control frame written meanwhile in its place.
    #[tokio::test]
    async fn a_peer_that_stops_reading_fills_the_outbox_then_gets_everything_in_order() {
        let (server, client) = tcp_pair().await;
        let outbox = Outbox::new(server, 64);
        outbox.start(Subscription::new(0));
        outbox.release().expect("released");
        let payload = "y".repeat(16 * 1024);
        let mut id = 0;
        let full = loop {
            id += 1;
            if outbox.offer(&[frame(id, &payload)]).is_err() {
                break id;
            }
            assert!(id < 100_000, "the outbox never filled");
        };
        assert!(outbox.pending_since().is_some(), "bytes wait");
        outbox
            .write_bytes(crate::hub::text_frame(b"control"))
            .expect("queued");
        let mut client = client_of(client).await;
        let drain = {
            let outbox = Arc::clone(&outbox);
            tokio::spawn(async move { std::future::poll_fn(|cx| outbox.poll_drain(cx)).await })
        };
        for expected in 1..=full {
            let text = next_text(&mut client).await;
            assert_eq!(text.len(), payload.len(), "frame {expected} whole");
        }
        assert_eq!(next_text(&mut client).await, "control");
        drain.await.expect("drain task").expect("drained");
        assert!(outbox.pending_since().is_none());
    }

    /// Abandoning a connection lets its backlog go but finishes a frame already begun,
    /// so the close frame written after it is read as a close, not as garbage.
    #[tokio::test]
    async fn an_abandoned_backlog_ends_on_a_whole_frame() {
        let (server, client) = tcp_pair().await;
        let outbox = Outbox::new(server, 1_000_000);
        outbox.start(Subscription::new(0));
        outbox.release().expect("released");
        let payload = "z".repeat(100_000);
        for id in 1..=50 {
            outbox.offer(&[frame(id, &payload)]).expect("queued");
        }
        outbox.abandon();
        let mut io = ConnIo::new(Arc::clone(&outbox), Bytes::new());
        {
            use tokio::io::AsyncWriteExt;
            // a close frame with code 4008, as tungstenite would write it
            io.write_all(&[0x88, 0x02, 0x0f, 0xa8])
                .await
                .expect("queued");
        }
        let mut client = client_of(client).await;
        let drain = {
            let outbox = Arc::clone(&outbox);
            tokio::spawn(async move { std::future::poll_fn(|cx| outbox.poll_drain(cx)).await })
        };
        let mut texts = 0;
        loop {
            match client
                .next()
                .await
                .expect("open")
                .expect("valid frames only")
            {
                Message::Text(text) => {
                    assert_eq!(text.len(), payload.len());
                    texts += 1;
                }
                Message::Close(Some(close)) => {
                    assert_eq!(u16::from(close.code), 4008);
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(texts < 50, "the backlog was let go ({texts} of 50 arrived)");
        drain.await.expect("drain task").expect("drained");
    }
}
