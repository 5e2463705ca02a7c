//! The fan-out's clients, made cheap so the machine's cores go to the servers under
//! test: a few threads, each polling its share of the sockets with mio (one
//! `epoll_wait` for all that are ready, then one `read` per socket, no task to wake),
//! and a WebSocket reader of their own that only parses frames (the servers' frames
//! are unmasked; ours, pongs and Socket.IO's replies, are masked as RFC 6455 asks).
//! Every client checks its sequence and times each event, and resumes from its last
//! id when the server closes it (4008), as the protocol says a client should.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use super::Target;
use super::tally::{Latencies, Tally, now_nanos};

/// The number after `key` in `text` (e.g. `"id":` → 42).
pub(super) fn number_after(text: &str, key: &str) -> Option<u64> {
    let start = text.find(key)? + key.len();
    let digits = text[start..].bytes().take_while(u8::is_ascii_digit).count();
    text[start..start + digits].parse().ok()
}

/// (sequence number, emit time in ns) of one event frame.
pub(super) fn parse_frame(target: Target, text: &str) -> Option<(u64, u64)> {
    match target {
        Target::Embedded | Target::Redis | Target::RedisCluster => Some((
            number_after(text, "{\"id\":")?,
            number_after(text, "\"sync_id\":\"t")?,
        )),
        Target::Socketio => {
            let body = text.strip_prefix("42")?;
            Some((number_after(body, "\"s\":")?, number_after(body, "\"t\":")?))
        }
    }
}

/// One client to run: where it connects, and whose events it gets.
pub(super) struct Spec {
    pub(super) url: String,
    pub(super) user: usize,
}

/// The loopback source address of the `index`th socket: one per 10,000, since each
/// source has only the ephemeral port range (28,232 ports here) to reach one server
/// from.
fn source_of(index: usize) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(127, 0, 0, 1 + (index / 10_000).min(250) as u8)
}

/// Sets `IP_BIND_ADDRESS_NO_PORT`; without it (not Linux) binds choose ports as usual.
fn bind_address_no_port(socket: &socket2::Socket) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let on: libc::c_int = 1;
        // SAFETY: a valid socket descriptor and a c_int option value of the right size
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = socket;
}

/// Frames of a socket this many bytes long at most are read whole at once.
const READ_CHUNK: usize = 4096;

struct Conn {
    stream: TcpStream,
    url: String,
    source: std::net::Ipv4Addr,
    /// bytes read and not yet parsed, from `start`
    buf: Vec<u8>,
    start: usize,
    last: u64,
    done: bool,
}

/// A WebSocket frame as read.
struct Frame<'a> {
    opcode: u8,
    fin: bool,
    payload: &'a [u8],
}

/// The frame at the head of `buf`, and its length; `None` until it is all there.
fn parse(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, String> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (fin, opcode) = (buf[0] & 0x80 != 0, buf[0] & 0x0f);
    if buf[1] & 0x80 != 0 {
        return Err("a masked frame from the server".into());
    }
    let (len, header) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(bytes) as usize, 10)
        }
        126 | 127 => return Ok(None),
        short => (short as usize, 2),
    };
    if buf.len() < header + len {
        return Ok(None);
    }
    Ok(Some((
        Frame {
            opcode,
            fin,
            payload: &buf[header..header + len],
        },
        header + len,
    )))
}

/// A masked client frame (`opcode` 1 text, 10 pong) carrying `payload`.
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(0x80 | opcode);
    match payload.len() {
        len @ 0..=125 => out.push(0x80 | len as u8),
        len @ 126..=0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// `ws://host:port/path?query` → (address, path and query).
fn split_url(url: &str) -> Result<(SocketAddr, String, String), String> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| format!("not a ws:// URL: {url}"))?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let addr = host
        .to_socket_addrs()
        .map_err(|e| format!("{host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host}: no address"))?;
    Ok((
        addr,
        host.to_owned(),
        if path.is_empty() {
            "/".into()
        } else {
            path.into()
        },
    ))
}

/// Connects from `source` and upgrades, blocking; returns the socket, the bytes read
/// past the response, and the last event id the server says the user has (0 for
/// Socket.IO).
fn open(
    target: Target,
    url: &str,
    source: std::net::Ipv4Addr,
) -> Result<(std::net::TcpStream, Vec<u8>, u64), String> {
    let (addr, host, path) = split_url(url)?;
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .map_err(|e| e.to_string())?;
    // the port is chosen at connect, for this destination: a port a socket of an
    // earlier run left in TIME_WAIT (to that run's server) stays usable, where a
    // bind to port 0 would skip it and run out of the range after a few runs
    bind_address_no_port(&socket);
    socket
        .bind(&SocketAddr::from((source, 0)).into())
        .map_err(|e| format!("bind {source}: {e}"))?;
    socket
        .connect_timeout(&addr.into(), Duration::from_secs(30))
        .map_err(|e| format!("connect {url}: {e}"))?;
    let mut stream: std::net::TcpStream = socket.into();
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::with_capacity(READ_CHUNK);
    let head_end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        read_more(&mut stream, &mut buf)?;
    };
    if !buf.starts_with(b"HTTP/1.1 101") {
        return Err(format!(
            "upgrade refused: {}",
            String::from_utf8_lossy(&buf[..head_end.min(80)])
        ));
    }
    buf.drain(..head_end);
    let next_text =
        |stream: &mut std::net::TcpStream, buf: &mut Vec<u8>| -> Result<String, String> {
            loop {
                if let Some((frame, used)) = parse(buf)? {
                    let (opcode, text) = (
                        frame.opcode,
                        String::from_utf8_lossy(frame.payload).into_owned(),
                    );
                    buf.drain(..used);
                    match opcode {
                        1 => return Ok(text),
                        8 => return Err("closed during the handshake".into()),
                        _ => continue,
                    }
                }
                read_more(stream, buf)?;
            }
        };
    let last = match target {
        Target::Socketio => {
            let first = next_text(&mut stream, &mut buf)?;
            if !first.starts_with('0') {
                return Err(format!("unexpected engine.io open: {first}"));
            }
            stream
                .write_all(&client_frame(1, b"40"))
                .map_err(|e| e.to_string())?;
            loop {
                let reply = next_text(&mut stream, &mut buf)?;
                if reply.starts_with("40") {
                    break 0;
                }
                if reply == "2" {
                    stream
                        .write_all(&client_frame(1, b"3"))
                        .map_err(|e| e.to_string())?;
                }
            }
        }
        _ => {
            let hello = next_text(&mut stream, &mut buf)?;
            number_after(&hello, "\"last_event_id\":")
                .ok_or_else(|| format!("hello without last_event_id: {hello}"))?
        }
    };
    Ok((stream, buf, last))
}

fn read_more(stream: &mut std::net::TcpStream, buf: &mut Vec<u8>) -> Result<(), String> {
    let mut chunk = [0u8; READ_CHUNK];
    match stream.read(&mut chunk) {
        Ok(0) => Err("closed by the server".into()),
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// What the threads started: the last id each socket's user had when it opened, and
/// the threads (each ends, once `stop` is set, with the last id of each of its
/// sockets, in the order of `specs`' indexes given to it).
pub(super) struct Started {
    pub(super) opened_last: Vec<(usize, u64)>,
    pub(super) threads: Vec<std::thread::JoinHandle<Vec<(usize, u64)>>>,
}

/// Opens every client of `specs` over `threads` threads and runs them until `stop`.
pub(super) fn start(
    target: Target,
    specs: Vec<Spec>,
    threads: usize,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) -> Result<Started, String> {
    let threads = threads.max(1);
    let total = specs.len();
    let (opened_tx, opened_rx) = std::sync::mpsc::channel::<Result<(usize, usize, u64), String>>();
    let mut shares: Vec<Vec<(usize, Spec)>> = (0..threads).map(|_| Vec::new()).collect();
    for (index, spec) in specs.into_iter().enumerate() {
        shares[index % threads].push((index, spec));
    }
    let mut handles = Vec::new();
    for (shard, share) in shares.into_iter().enumerate() {
        let (tally, stop, opened_tx) = (Arc::clone(&tally), Arc::clone(&stop), opened_tx.clone());
        handles.push(
            std::thread::Builder::new()
                .name(format!("fanout-client-{shard}"))
                .spawn(move || run_thread(target, share, shard, tally, stop, opened_tx))
                .map_err(|e| e.to_string())?,
        );
    }
    drop(opened_tx);
    let mut opened_last = Vec::with_capacity(total);
    while opened_last.len() < total {
        match opened_rx.recv() {
            Ok(Ok((_, user, last))) => {
                opened_last.push((user, last));
                if opened_last.len() % 250 == 0 {
                    eprint!("\r  sockets open: {:>6} / {total}", opened_last.len());
                }
            }
            Ok(Err(err)) => {
                stop.store(true, Ordering::Relaxed);
                return Err(err);
            }
            Err(_) => return Err("a client thread ended while opening".into()),
        }
    }
    eprintln!("\r  sockets open: {:>6} / {total}", opened_last.len());
    Ok(Started {
        opened_last,
        threads: handles,
    })
}

fn run_thread(
    target: Target,
    share: Vec<(usize, Spec)>,
    shard: usize,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
    opened: std::sync::mpsc::Sender<Result<(usize, usize, u64), String>>,
) -> Vec<(usize, u64)> {
    let mut poll = match Poll::new() {
        Ok(poll) => poll,
        Err(err) => {
            let _ = opened.send(Err(err.to_string()));
            return Vec::new();
        }
    };
    let mut conns: Vec<Conn> = Vec::with_capacity(share.len());
    let mut indexes = Vec::with_capacity(share.len());
    let mut latencies = Latencies::new(shard);
    let mut events = Events::with_capacity(1024);
    for (index, spec) in share {
        let source = source_of(index);
        match open(target, &spec.url, source).and_then(|(stream, buf, last)| {
            register(&poll, stream, conns.len()).map(|stream| (stream, buf, last))
        }) {
            Ok((stream, buf, last)) => {
                let _ = opened.send(Ok((index, spec.user, last)));
                let token = conns.len();
                conns.push(Conn {
                    stream,
                    url: spec.url,
                    source,
                    buf,
                    start: 0,
                    last,
                    done: false,
                });
                indexes.push(index);
                // frames that came with the handshake
                if let Some(conn) = conns.last_mut() {
                    consume(target, conn, token, &poll, &tally, &mut latencies);
                }
            }
            Err(err) => {
                let _ = opened.send(Err(err));
                return Vec::new();
            }
        }
        // the sockets already open are served while the rest open (on a slow machine
        // opening takes minutes, and a socket that answers no ping is dropped)
        if conns.len().is_multiple_of(64) {
            serve(
                target,
                &mut poll,
                &mut events,
                Duration::ZERO,
                &mut conns,
                &tally,
                &mut latencies,
                &stop,
            );
        }
    }
    drop(opened);
    while !stop.load(Ordering::Relaxed) {
        if !serve(
            target,
            &mut poll,
            &mut events,
            Duration::from_millis(100),
            &mut conns,
            &tally,
            &mut latencies,
            &stop,
        ) {
            break;
        }
    }
    latencies.flush(&tally);
    indexes
        .into_iter()
        .zip(conns)
        .map(|(index, conn)| (index, conn.last))
        .collect()
}

/// One wait for ready sockets (at most `timeout`) and a read of each; `false` when
/// polling failed.
#[allow(clippy::too_many_arguments)]
fn serve(
    target: Target,
    poll: &mut Poll,
    events: &mut Events,
    timeout: Duration,
    conns: &mut [Conn],
    tally: &Tally,
    latencies: &mut Latencies,
    stop: &AtomicBool,
) -> bool {
    if let Err(err) = poll.poll(events, Some(timeout)) {
        if err.kind() == io::ErrorKind::Interrupted {
            return true;
        }
        eprintln!("client poll failed: {err}");
        return false;
    }
    for event in events.iter() {
        let token = event.token().0;
        let Some(conn) = conns.get_mut(token) else {
            continue;
        };
        if conn.done {
            continue;
        }
        read_ready(target, conn, token, poll, tally, latencies, stop);
    }
    true
}

fn register(poll: &Poll, stream: std::net::TcpStream, token: usize) -> Result<TcpStream, String> {
    stream.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut stream = TcpStream::from_std(stream);
    poll.registry()
        .register(&mut stream, Token(token), Interest::READABLE)
        .map_err(|e| e.to_string())?;
    Ok(stream)
}

/// Reads what the socket has (mio is edge-triggered: until a read comes back short)
/// and handles every whole frame.
fn read_ready(
    target: Target,
    conn: &mut Conn,
    token: usize,
    poll: &Poll,
    tally: &Tally,
    latencies: &mut Latencies,
    stop: &AtomicBool,
) {
    loop {
        if conn.buf.len() - conn.start < READ_CHUNK && conn.start > 0 {
            conn.buf.drain(..conn.start);
            conn.start = 0;
        }
        let filled = conn.buf.len();
        conn.buf.resize(filled + READ_CHUNK, 0);
        let count = match conn.stream.read(&mut conn.buf[filled..]) {
            Ok(0) => None,
            Ok(count) => Some(count),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => Some(0),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {
                conn.buf.truncate(filled);
                continue;
            }
            Err(_) => None,
        };
        let Some(count) = count else {
            conn.buf.truncate(filled);
            closed(target, conn, token, poll, tally, latencies, stop);
            return;
        };
        conn.buf.truncate(filled + count);
        if !consume(target, conn, token, poll, tally, latencies) {
            closed(target, conn, token, poll, tally, latencies, stop);
            return;
        }
        // a short read emptied the socket: new bytes bring a new readiness edge
        if count < READ_CHUNK {
            return;
        }
    }
}

/// Handles every whole frame waiting in `conn.buf`; `false` when the server closed.
fn consume(
    target: Target,
    conn: &mut Conn,
    _token: usize,
    _poll: &Poll,
    tally: &Tally,
    latencies: &mut Latencies,
) -> bool {
    loop {
        let parsed = match parse(&conn.buf[conn.start..]) {
            Ok(parsed) => parsed,
            Err(_) => return false,
        };
        let Some((frame, used)) = parsed else {
            return true;
        };
        let reply = match frame.opcode {
            1 if frame.fin => {
                let text = std::str::from_utf8(frame.payload).unwrap_or("");
                if target == Target::Socketio && text == "2" {
                    Some(client_frame(1, b"3"))
                } else {
                    received(target, text, &mut conn.last, tally, latencies);
                    None
                }
            }
            8 => return false,
            9 => Some(client_frame(10, frame.payload)),
            // pongs, binary; the servers under test do not fragment their events
            _ => None,
        };
        conn.start += used;
        if let Some(reply) = reply {
            // a few bytes: the socket's send buffer takes them
            let _ = conn.stream.write_all(&reply);
        }
    }
}

/// One event frame: its sequence checked, its latency taken.
fn received(target: Target, text: &str, last: &mut u64, tally: &Tally, latencies: &mut Latencies) {
    let received_at = now_nanos();
    let Some((seq, emitted)) = parse_frame(target, text) else {
        return;
    };
    if seq <= *last {
        tally.duplicated.fetch_add(1, Ordering::Relaxed);
        return;
    }
    if seq > *last + 1 {
        tally.lost.fetch_add(seq - *last - 1, Ordering::Relaxed);
    }
    *last = seq;
    // burst events are stamped with the burst's start; the Socket.IO peer carries the
    // stamp as a JavaScript number (a double), which rounds nanoseconds by up to 128,
    // so the boundary gets 1 µs of slack (steady events are ≥ 1 ms apart)
    let in_burst = emitted.saturating_add(1_000) >= tally.burst_start.load(Ordering::Relaxed);
    let phase = if in_burst {
        &tally.burst
    } else {
        &tally.steady
    };
    phase.received.fetch_add(1, Ordering::Relaxed);
    phase
        .first_receipt
        .fetch_min(received_at, Ordering::Relaxed);
    phase.last_receipt.fetch_max(received_at, Ordering::Relaxed);
    let micros = (received_at.saturating_sub(emitted) / 1000).max(1);
    latencies.record(in_burst, micros, tally);
}

/// The server closed the socket: unless the run is over (or the target has no
/// resume), reconnect from the last id, as a real client does.
fn closed(
    target: Target,
    conn: &mut Conn,
    token: usize,
    poll: &Poll,
    tally: &Tally,
    latencies: &mut Latencies,
    stop: &AtomicBool,
) {
    let _ = poll.registry().deregister(&mut conn.stream);
    if stop.load(Ordering::Relaxed) || target == Target::Socketio {
        conn.done = true;
        return;
    }
    let url = format!("{}&last_event_id={}", conn.url, conn.last);
    match open(target, &url, conn.source).and_then(|(stream, buf, from)| {
        register(poll, stream, token).map(|stream| (stream, buf, from))
    }) {
        Ok((stream, buf, from)) => {
            tally.resumed.fetch_add(1, Ordering::Relaxed);
            if from > conn.last {
                // resync_required: the gap is gone for good
                tally.lost.fetch_add(from - conn.last, Ordering::Relaxed);
                conn.last = from;
            }
            conn.stream = stream;
            conn.buf = buf;
            conn.start = 0;
            consume(target, conn, token, poll, tally, latencies);
        }
        Err(_) => conn.done = true,
    }
}
