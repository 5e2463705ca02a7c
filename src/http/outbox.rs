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

/// Bytes that may wait in one outbox (as tungstenite's own write buffer allowed): past
/// them the dispatcher's frames make the connection too far behind, and the socket's
/// own writes (pongs) wait for the peer to read.
const MAX_PENDING_BYTES: usize = 4 * 1024 * 1024;

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
    pending_bytes: usize,
    /// when bytes last went out while some were waiting (or began to wait): the
    /// connection is stuck when this gets old
    progress_at: Option<Instant>,
    /// the connection is closing: frames offered from now on are dropped
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
                pending_bytes: 0,
                progress_at: None,
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
    /// written as they are offered. `Err` when the connection is already too far
    /// behind (its backlog is then let go, as [`Outbox::abandon`] does).
    pub fn release(&self) -> Result<(), SinkFull> {
        let mut state = self.lock();
        let held = state.held.take().unwrap_or_default();
        self.admit_and_write(&mut state, held.iter());
        self.within_capacity(&mut state)
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

    /// When bytes that still wait last made progress (`None`: nothing waits).
    pub fn progress_at(&self) -> Option<Instant> {
        self.lock().progress_at
    }

    /// Resolves when bytes may wait to be written (check [`Outbox::progress_at`]).
    pub async fn queued(&self) {
        self.wake.notified().await;
    }

    /// The connection is closing: no live frame is taken from now on, so none goes
    /// out after the close frame; what already waits is still written.
    pub fn closing(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.held = None;
    }

    /// The connection is being dropped: what waits is let go (but for the rest of a
    /// frame already partly written, so the close frame that follows is whole), and
    /// nothing more is taken.
    pub fn abandon(&self) {
        let mut state = self.lock();
        Self::let_go(&mut state);
    }

    fn let_go(state: &mut State) {
        state.closed = true;
        state.held = None;
        let keep = usize::from(state.written_of_first > 0).min(state.pending.len());
        state.pending.truncate(keep);
        state.pending_frames = state.pending.iter().map(|(_, frames)| frames).sum();
        state.pending_bytes = state.pending.iter().map(|(bytes, _)| bytes.len()).sum();
        if state.pending.is_empty() {
            state.progress_at = None;
            state.pending = VecDeque::new();
        }
    }

    /// Whether the socket's own writes must wait for the peer to read first.
    fn over_byte_cap(&self) -> bool {
        self.lock().pending_bytes > MAX_PENDING_BYTES
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
                        state.progress_at = None;
                        // a burst's backlog does not stay allocated
                        state.pending = VecDeque::new();
                        return Poll::Ready(Ok(()));
                    };
                    let (front, frames) = (front.clone(), *frames);
                    let rest = &front[state.written_of_first..];
                    match self.stream.try_write(rest) {
                        Ok(0) => break,
                        Ok(written) => {
                            state.progress_at = Some(Instant::now());
                            if written == rest.len() {
                                state.pending.pop_front();
                                state.written_of_first = 0;
                                state.pending_frames -= frames;
                                state.pending_bytes -= front.len();
                            } else {
                                state.written_of_first += written;
                            }
                        }
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

    /// `Err` (the backlog let go) when more waits than the connection may have.
    fn within_capacity(&self, state: &mut State) -> Result<(), SinkFull> {
        if state.pending_frames > self.capacity || state.pending_bytes > MAX_PENDING_BYTES {
            Self::let_go(state);
            Err(SinkFull)
        } else {
            Ok(())
        }
    }

    fn admit_and_write<'a>(&self, state: &mut State, frames: impl Iterator<Item = &'a Arc<Frame>>) {
        let admitted: Vec<&Arc<Frame>> = frames
            .filter(|frame| state.subscription.admit(frame))
            .collect();
        if admitted.is_empty() || state.broken {
            return;
        }
        if !state.pending.is_empty() {
            for frame in admitted {
                Self::queue(state, frame.wire.clone(), 1);
            }
            return;
        }
        // one write for all of them, from the shared frames (no copy)
        let slices: Vec<io::IoSlice<'_>> = admitted
            .iter()
            .map(|frame| io::IoSlice::new(&frame.wire))
            .collect();
        let mut written = match self.stream.try_write_vectored(&slices) {
            Ok(written) => written,
            Err(err) if would_block(&err) => 0,
            Err(_) => {
                state.broken = true;
                self.wake.notify_one();
                return;
            }
        };
        let mut queued = false;
        for frame in admitted {
            let len = frame.wire.len();
            if written >= len {
                written -= len;
                continue;
            }
            if !queued {
                state.written_of_first = written;
                written = 0;
                queued = true;
            }
            Self::queue(state, frame.wire.clone(), 1);
        }
        if queued {
            state.progress_at = Some(Instant::now());
            self.wake.notify_one();
        }
    }

    fn queue(state: &mut State, bytes: Bytes, frames: usize) {
        state.pending_bytes += bytes.len();
        state.pending_frames += frames;
        state.pending.push_back((bytes, frames));
    }

    /// Writes `bytes` now if nothing waits before them and the socket takes them,
    /// else queues them (waking the socket's task to write them later).
    fn push(&self, state: &mut State, bytes: Bytes, frames: usize) {
        if state.broken || bytes.is_empty() {
            return;
        }
        if !state.pending.is_empty() {
            Self::queue(state, bytes, frames);
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
        Self::queue(state, bytes, frames);
        state.progress_at = Some(Instant::now());
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
        let held_now = {
            let State {
                held, subscription, ..
            } = &mut *state;
            held.as_mut().map(|held| {
                // only what the connection will want counts against its limit: frames
                // the replay already starts past, and other projects', are left out
                held.extend(
                    frames
                        .iter()
                        .filter(|frame| {
                            frame.id > subscription.last_sent
                                && subscription.wants_project(&frame.project_id)
                        })
                        .cloned(),
                );
                held.len()
            })
        };
        if let Some(held) = held_now {
            if held > self.capacity {
                Self::let_go(&mut state);
                return Err(SinkFull);
            }
            return Ok(());
        }
        self.admit_and_write(&mut state, frames.iter());
        self.within_capacity(&mut state)
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
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // a peer that sends pings and never reads must not grow the outbox: past the
        // cap, tungstenite waits (and keeps only the latest pong meanwhile)
        if self.outbox.over_byte_cap() {
            ready!(self.outbox.poll_drain(cx))?;
        }
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
pub(super) mod tests;
