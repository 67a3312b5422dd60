//! The per-connection frame relay: the fast path for every call but
//! `PullImage`.
//!
//! Each client connection gets its own upstream connection, and HTTP/2
//! frames pass between the two as they are: DATA, SETTINGS, PING,
//! WINDOW_UPDATE and the rest are copied without being decoded, so a call
//! costs about what a byte relay such as `socat` costs. Three things are
//! done at the frame level:
//!
//! - The client's header blocks are decoded (HPACK) to learn each call's
//!   method, and sent on re-encoded with literals only. Re-encoding keeps
//!   the upstream's HPACK state ours, so a block can be left out.
//! - A `PullImage` stream is left out: its headers and message go to
//!   [`Proxy::handle`] (read, credentials added, sent upstream on the shared
//!   connection), and the answer is written back to the client as frames on
//!   the same stream. The flow-control windows stay exact: the client's
//!   request bytes are handed back with WINDOW_UPDATEs, and answer bytes
//!   the upstream does not know of are taken out of the client's next
//!   connection WINDOW_UPDATE; upstream DATA waits while those bytes leave
//!   the client's window short.
//! - The upstream's header blocks are decoded (not changed) to read each
//!   call's final `grpc-status`, for the per-call metrics and log line.
//!
//! Injected header blocks use only the static table and literals without
//! indexing, so they never change the client's HPACK state.
//!
//! When the upstream closes the connection, calls in flight on it are
//! answered `Unavailable` naming the socket on the client's connection,
//! which stays open. New calls on it go the way pulls go, through
//! [`Proxy::handle`] and the shared connection: `Unavailable` while the
//! upstream is down, served as soon as it is back. Once the upstream
//! answers an `ImageFsInfo` again, the client is asked to reconnect (so
//! that its calls take the relay again) with the two-step GOAWAY of RFC
//! 9113 §6.8 (highest stream id and a PING, then the last stream seen).
//! SIGTERM drains the same way. The upstream's own final GOAWAY reaches the
//! client with its last stream id raised to cover the pulls still in
//! flight (the upstream never saw them), and the upstream's streams in
//! between are refused with REFUSED_STREAM on its behalf.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, Request};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use tokio::io::unix::{AsyncFd, AsyncFdReadyGuard};
use tokio::io::Interest;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::hpack::Decoder;
use crate::metrics::{code_label, method_label};
use crate::proxy::{
    status_for, BoxError, Proxy, ProxyBody, ProxyError, MAX_HEADER_LIST_SIZE, PULL_IMAGE_PATH,
};

/// The client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
/// Largest frame payload HTTP/2 allows at all (2^24 - 1).
const MAX_FRAME_PAYLOAD: usize = (1 << 24) - 1;
/// Largest frame we send: the size every peer must accept.
const SEND_FRAME_SIZE: usize = 16_384;
/// The initial flow-control window of HTTP/2 (RFC 9113 §6.9.2).
const DEFAULT_WINDOW: i64 = 65_535;
/// Bytes read from a socket at once.
const READ_CHUNK: usize = 256 * 1024;
/// Room for reads a connection starts with; it doubles up to READ_CHUNK
/// while reads fill it. Zeroed room is resident memory, and a connection
/// making small calls needs little.
const FIRST_READ_CHUNK: usize = 16 * 1024;
/// Room for header frames allocated at once (see [`Relay::client_block`]).
const FRAMES_CHUNK: usize = 16 * 1024;
/// Method names a connection keeps for its calls to share.
const METHODS_KEPT: usize = 32;
/// Bytes queued for one side before the relay stops reading from the other.
const HIGH_WATER: usize = 1024 * 1024;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY_FLAG: u8 = 0x20;

const PING: u8 = 0x6;
const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
/// The payload of the PING that follows the first GOAWAY: its ACK means
/// every stream the client opened before it saw the GOAWAY has arrived.
const DRAIN_PING: [u8; 8] = *b"eppdrain";
/// How long to wait for that ACK before the final GOAWAY.
const DRAIN_PING_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
/// The highest stream id: a GOAWAY carrying it announces the end without
/// refusing anything yet (RFC 9113 §6.8).
const MAX_STREAM_ID: u32 = 0x7fff_ffff;
const REFUSED_STREAM: u32 = 0x7;
const CANCEL: u32 = 0x8;

/// Which end of the relay did something.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The caller (kubelet, crictl).
    Client,
    /// The upstream (containerd).
    Upstream,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Client => "the client",
            Side::Upstream => "the upstream",
        })
    }
}

/// Why a relayed connection was closed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The client does not speak HTTP/2.
    #[error("the client did not start with the HTTP/2 preface (not a gRPC client?)")]
    Preface,
    /// A frame broke the HTTP/2 rules the relay relies on.
    #[error("{side} broke the HTTP/2 protocol: {what}")]
    Protocol {
        /// Who sent it.
        side: Side,
        /// What was wrong.
        what: &'static str,
    },
    /// A header block did not decode.
    #[error("{side} sent a header block that does not decode")]
    Hpack {
        /// Who sent it.
        side: Side,
        /// The decoder's complaint.
        #[source]
        source: crate::hpack::HpackError,
    },
    /// Reading or writing a socket failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

fn protocol(side: Side, what: &'static str) -> RelayError {
    RelayError::Protocol { side, what }
}

#[derive(Clone, Copy, Debug)]
struct Head {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl Head {
    fn parse(b: &[u8]) -> Head {
        Head {
            len: (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }
}

fn put_head(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream: u32) {
    out.put_uint(len as u64, 3);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream);
}

fn window_update(stream: u32, increment: u32) -> Bytes {
    let mut out = BytesMut::with_capacity(FRAME_HEADER_LEN + 4);
    put_head(&mut out, 4, WINDOW_UPDATE, 0, stream);
    out.put_u32(increment);
    out.freeze()
}

fn rst_stream(stream: u32, code: u32) -> Bytes {
    let mut out = BytesMut::with_capacity(FRAME_HEADER_LEN + 4);
    put_head(&mut out, 4, RST_STREAM, 0, stream);
    out.put_u32(code);
    out.freeze()
}

fn ping(payload: [u8; 8]) -> Bytes {
    let mut out = BytesMut::with_capacity(FRAME_HEADER_LEN + 8);
    put_head(&mut out, 8, PING, 0, 0);
    out.put_slice(&payload);
    out.freeze()
}

fn goaway(last_stream: u32) -> Bytes {
    let mut out = BytesMut::with_capacity(FRAME_HEADER_LEN + 8);
    put_head(&mut out, 8, GOAWAY, 0, 0);
    out.put_u32(last_stream);
    out.put_u32(0);
    out.freeze()
}

/// The header block fragment of a HEADERS frame's payload, without padding
/// and priority fields.
fn headers_fragment(side: Side, flags: u8, payload: &[u8]) -> Result<&[u8], RelayError> {
    let mut p = payload;
    let mut pad = 0;
    if flags & PADDED != 0 {
        let (&n, rest) = p
            .split_first()
            .ok_or_else(|| protocol(side, "HEADERS frame too short for its padding"))?;
        pad = usize::from(n);
        p = rest;
    }
    if flags & PRIORITY_FLAG != 0 {
        p = p
            .get(5..)
            .ok_or_else(|| protocol(side, "HEADERS frame too short for its priority"))?;
    }
    p.get(..p.len().saturating_sub(pad))
        .filter(|_| pad <= p.len())
        .ok_or_else(|| protocol(side, "HEADERS padding longer than the frame"))
}

/// A DATA frame's payload without padding.
fn data_payload(flags: u8, payload: Bytes) -> Result<Bytes, RelayError> {
    if flags & PADDED == 0 {
        return Ok(payload);
    }
    let pad = usize::from(
        *payload
            .first()
            .ok_or_else(|| protocol(Side::Client, "DATA frame too short for its padding"))?,
    );
    if pad + 1 > payload.len() {
        return Err(protocol(Side::Client, "DATA padding longer than the frame"));
    }
    Ok(payload.slice(1..payload.len() - pad))
}

// === HPACK, literals only ===

fn put_int(out: &mut BytesMut, first: u8, prefix_bits: u8, value: usize) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.put_u8(first | value as u8);
        return;
    }
    out.put_u8(first | max as u8);
    let mut rest = value - max;
    while rest >= 0x80 {
        out.put_u8((rest as u8 & 0x7f) | 0x80);
        rest >>= 7;
    }
    out.put_u8(rest as u8);
}

fn put_string(out: &mut BytesMut, s: &[u8]) {
    put_int(out, 0, 7, s.len());
    out.put_slice(s);
}

/// One header as a literal without indexing (RFC 7541 §6.2.2), new name.
fn put_literal(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.put_u8(0);
    put_string(out, name);
    put_string(out, value);
}

/// A header block as HEADERS + CONTINUATION frames on `stream`.
fn header_frames(out: &mut BytesMut, stream: u32, end_stream: bool, block: &[u8]) {
    let mut chunks = block.chunks(SEND_FRAME_SIZE).peekable();
    let mut first = true;
    if block.is_empty() {
        let flags = END_HEADERS | if end_stream { END_STREAM } else { 0 };
        put_head(out, 0, HEADERS, flags, stream);
        return;
    }
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        let kind = if first { HEADERS } else { CONTINUATION };
        let mut flags = if last { END_HEADERS } else { 0 };
        if first && end_stream {
            flags |= END_STREAM;
        }
        put_head(out, chunk.len(), kind, flags, stream);
        out.put_slice(chunk);
        first = false;
    }
}

/// A decoded header list, in order.
type Fields = Vec<(Bytes, Bytes)>;

/// Decodes `block`, handing each field to `field`.
fn decode_each(
    decoder: &mut Decoder,
    side: Side,
    block: &[u8],
    field: impl FnMut(&[u8], &[u8]),
) -> Result<(), RelayError> {
    decoder
        .decode(block, field)
        .map_err(|source| RelayError::Hpack { side, source })
}

/// Decodes `block` into owned fields.
fn decode(decoder: &mut Decoder, side: Side, block: &[u8]) -> Result<Fields, RelayError> {
    let mut fields = Vec::new();
    decode_each(decoder, side, block, |n, v| {
        fields.push((Bytes::copy_from_slice(n), Bytes::copy_from_slice(v)))
    })?;
    Ok(fields)
}

// === the relay ===

/// One side's socket, watched by epoll for reading only.
///
/// tokio's `UnixStream` asks epoll about both directions, and a Unix socket
/// reports itself writable each time its peer reads what was written to
/// it: one wake-up of the relay for nothing after every request and every
/// answer it passes on (`socat`, with `select`, asks about writing only
/// while it has bytes waiting). Here the socket is registered for reading
/// only; while bytes wait for room, a duplicate of it is registered for
/// writing, and dropped again once they are out.
struct Socket {
    io: AsyncFd<StdUnixStream>,
    write_wait: Option<AsyncFd<StdUnixStream>>,
}

impl Socket {
    fn new(stream: UnixStream) -> io::Result<Socket> {
        let stream = stream.into_std()?;
        Ok(Socket {
            io: register(stream, Interest::READABLE)?,
            write_wait: None,
        })
    }

    /// Readable, through the socket's single reader slot: unlike
    /// `AsyncFd::readable`, nothing is added to (and taken from) a list of
    /// waiters each turn of the relay's loop. The relay is the only reader.
    async fn readable(&self) -> io::Result<AsyncFdReadyGuard<'_, StdUnixStream>> {
        std::future::poll_fn(|cx| self.io.poll_read_ready(cx)).await
    }

    fn write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.io.get_ref().write_vectored(bufs)
    }

    /// Watches for room to write while `waiting`; stops watching otherwise.
    fn watch_writes(&mut self, waiting: bool) -> io::Result<()> {
        if !waiting {
            self.write_wait = None;
        } else if self.write_wait.is_none() {
            let dup = self.io.get_ref().try_clone()?;
            self.write_wait = Some(register(dup, Interest::WRITABLE)?);
        }
        Ok(())
    }

    /// Room to write, once [`Socket::watch_writes`] asked for it.
    async fn writable(&self) -> io::Result<()> {
        let Some(wait) = &self.write_wait else {
            return std::future::pending().await;
        };
        // Cleared before the write it allows: room made after this wakes
        // the relay again, so a write that finds none is not stuck.
        std::future::poll_fn(|cx| wait.poll_write_ready(cx))
            .await?
            .clear_ready();
        Ok(())
    }
}

/// Sleeps until `at`; never ends without one. Nothing is done before the
/// first poll, so a disabled `select!` branch costs nothing (building a
/// `Sleep` looks up the runtime and the clock).
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Per-stream state. Stream ids are small numbers chosen by the client, so
/// a fast hash serves (std's SipHash was 6 % of the relay's instructions).
type StreamMap<V> = foldhash::HashMap<u32, V>;

/// A method name a connection keeps: the `:path`, the name, its label.
type Method = (Box<[u8]>, Arc<str>, &'static str);

/// The metric handles of one method and code.
struct CallMetrics {
    method: &'static str,
    code: &'static str,
    calls: Counter,
    duration: Histogram,
}

/// A `grpc-status` value; the usual ones without an allocation.
fn grpc_status(value: &[u8]) -> Cow<'static, str> {
    const CODES: [&str; 17] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    ];
    match CODES.iter().find(|c| c.as_bytes() == value) {
        Some(c) => Cow::Borrowed(c),
        None => Cow::Owned(String::from_utf8_lossy(value).into_owned()),
    }
}

/// Registers `stream` with tokio's epoll for `interest` only (tokio's own
/// socket types always register for both).
#[allow(unsafe_code)]
fn register(stream: StdUnixStream, interest: Interest) -> io::Result<AsyncFd<StdUnixStream>> {
    // SAFETY: the AsyncFd takes the stream, which owns its descriptor: it
    // stays open and the same until the AsyncFd is dropped.
    unsafe { AsyncFd::register_with_interest(stream, interest) }.map_err(io::Error::from)
}

/// Bytes waiting to be written to one side.
#[derive(Default)]
struct Outbound {
    queue: VecDeque<Bytes>,
    queued: usize,
}

impl Outbound {
    fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.queued += b.len();
            self.queue.push_back(b);
        }
    }

    fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Writes what the socket takes now.
    fn flush(&mut self, io: &Socket) -> io::Result<()> {
        while !self.queue.is_empty() {
            let mut slices = [IoSlice::new(&[]); 16];
            let mut n = 0;
            for (slice, b) in slices.iter_mut().zip(&self.queue) {
                *slice = IoSlice::new(b);
                n += 1;
            }
            match io.write_vectored(&slices[..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(mut n) => {
                    self.queued -= n;
                    while n > 0 {
                        let front = self.queue.front_mut().expect("written bytes were queued");
                        if front.len() <= n {
                            n -= front.len();
                            self.queue.pop_front();
                        } else {
                            front.advance(n);
                            n = 0;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Bytes read from one side, parsed frame by frame.
struct Inbound {
    /// Bytes read and not yet taken.
    buf: BytesMut,
    /// Zeroed room for the next reads, in the same allocation right after
    /// `buf` so that what is read joins it without a copy.
    room: BytesMut,
    /// How much room to make next time.
    chunk: usize,
    /// Payload bytes of a frame being passed through that are still to come.
    passing: usize,
    /// A header block waiting for its CONTINUATION frames: the stream, the
    /// first frame's flags, the raw frames and the fragments.
    block: Option<Block>,
    eof: bool,
}

struct Block {
    stream: u32,
    flags: u8,
    raw: Vec<Bytes>,
    /// The block: a slice of the HEADERS frame when it is whole there (the
    /// usual case, no copy), else the fragments gathered.
    fragment: Bytes,
}

impl Inbound {
    fn new() -> Self {
        Inbound {
            buf: BytesMut::new(),
            room: BytesMut::new(),
            chunk: FIRST_READ_CHUNK,
            passing: 0,
            block: None,
            eof: false,
        }
    }

    /// Reads what the socket has; false when it had nothing after all.
    ///
    /// A read shorter than the room given took everything the socket had,
    /// so the socket's readiness is cleared at once: that saves the read
    /// that would only return EAGAIN (one system call per wake-up). The
    /// guard carries the tick of the readiness it was taken at, so readiness
    /// set again since is not lost.
    fn read(&mut self, guard: &mut AsyncFdReadyGuard<'_, StdUnixStream>) -> io::Result<bool> {
        if self.room.len() < self.chunk / 4 {
            // The room is zeroed once here: reading needs initialized
            // memory, and the crate has no unsafe code to skip that.
            let mut fresh = BytesMut::with_capacity(self.buf.len() + self.chunk);
            fresh.extend_from_slice(&self.buf);
            fresh.resize(self.buf.len() + self.chunk, 0);
            self.room = fresh.split_off(self.buf.len());
            self.buf = fresh;
        }
        let room = self.room.len();
        match guard.get_inner().read(&mut self.room) {
            Ok(0) => {
                self.eof = true;
                Ok(true)
            }
            Ok(n) => {
                self.buf.unsplit(self.room.split_to(n));
                if n < room {
                    guard.clear_ready();
                } else {
                    self.chunk = (self.chunk * 2).min(READ_CHUNK);
                }
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                guard.clear_ready();
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// The next frame's header, once all nine bytes are here. Inside a
    /// header block only CONTINUATION frames may come (RFC 9113 §6.10).
    fn next_head(&self, side: Side) -> Result<Option<Head>, RelayError> {
        if self.buf.len() < FRAME_HEADER_LEN {
            return Ok(None);
        }
        let head = Head::parse(&self.buf);
        if head.len > MAX_FRAME_PAYLOAD {
            return Err(protocol(side, "frame larger than HTTP/2 allows"));
        }
        if self.block.is_some() && head.kind != CONTINUATION {
            return Err(protocol(side, "another frame inside a header block"));
        }
        Ok(Some(head))
    }

    /// Starts passing on the frame `head` describes: returns what is here
    /// of it, and [`Inbound::next_passing`] returns the rest as it comes.
    fn start_passing(&mut self, head: Head) -> Bytes {
        let n = (FRAME_HEADER_LEN + head.len).min(self.buf.len());
        self.passing = FRAME_HEADER_LEN + head.len - n;
        self.buf.split_to(n).freeze()
    }

    /// More of the frame being passed on, if any has arrived.
    fn next_passing(&mut self) -> Option<Bytes> {
        if self.buf.is_empty() {
            return None;
        }
        let n = self.passing.min(self.buf.len());
        self.passing -= n;
        Some(self.buf.split_to(n).freeze())
    }

    /// Gathers a header block from a HEADERS frame and its CONTINUATION
    /// frames; returns it once whole. With `keep_raw`, the frames are kept
    /// too, to be passed on as they are.
    fn gather(
        &mut self,
        side: Side,
        head: Head,
        frame: &Bytes,
        keep_raw: bool,
    ) -> Result<Option<Block>, RelayError> {
        let payload = &frame[FRAME_HEADER_LEN..];
        let raw = || {
            if keep_raw {
                vec![frame.clone()]
            } else {
                Vec::new()
            }
        };
        if head.kind == HEADERS {
            if head.stream == 0 {
                return Err(protocol(side, "HEADERS on stream 0"));
            }
            let fragment = headers_fragment(side, head.flags, payload)?;
            let block = Block {
                stream: head.stream,
                flags: head.flags,
                raw: raw(),
                fragment: frame.slice_ref(fragment),
            };
            if head.flags & END_HEADERS != 0 {
                return Ok(Some(block));
            }
            self.block = Some(block);
            return Ok(None);
        }
        let Some(block) = self.block.as_mut() else {
            return Err(protocol(side, "CONTINUATION without HEADERS"));
        };
        if block.stream != head.stream {
            return Err(protocol(side, "CONTINUATION on another stream"));
        }
        if block.fragment.len() + payload.len() > MAX_HEADER_LIST_SIZE as usize {
            return Err(protocol(side, "header block too large"));
        }
        let mut gathered = BytesMut::with_capacity(block.fragment.len() + payload.len());
        gathered.extend_from_slice(&block.fragment);
        gathered.extend_from_slice(payload);
        block.fragment = gathered.freeze();
        block.raw.extend(raw());
        if head.flags & END_HEADERS == 0 {
            return Ok(None);
        }
        Ok(self.block.take())
    }

    /// Whether the next bytes start a frame (nothing is half passed on).
    fn at_boundary(&self) -> bool {
        self.passing == 0 && self.block.is_none()
    }
}

/// A call forwarded to the upstream on this connection.
struct Call {
    method: Arc<str>,
    /// The method as the metrics name it.
    label: &'static str,
    started: Instant,
    status: Option<Cow<'static, str>>,
    /// The upstream has sent the answer's headers.
    answered: bool,
}

/// A `PullImage` stream answered by [`Proxy::handle`].
struct Diverted {
    body: Option<mpsc::UnboundedSender<Bytes>>,
    /// The client has sent all of its request (END_STREAM).
    client_done: bool,
    /// The whole answer has been written. The entry stays until the client
    /// is done too, so that its late frames are still recognised as ours.
    answered: bool,
    task: JoinHandle<()>,
    /// What the client lets us send on this stream.
    window: i64,
    pending: VecDeque<Out>,
}

/// Part of a diverted stream's answer.
enum Out {
    Head(http::response::Parts, bool),
    Data(Bytes),
    Trailers(HeaderMap),
    /// The answer ended without trailers.
    End,
    /// The answer broke off.
    Reset,
}

enum Event {
    /// Part of the answer to a diverted stream.
    Answer { stream: u32, out: Out },
    /// The daemon is shutting down: drain this connection.
    Drain,
}

/// A request body fed by the relay.
struct ChannelBody(mpsc::UnboundedReceiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0.poll_recv(cx).map(|d| d.map(|d| Ok(Frame::data(d))))
    }
}

/// Relays one client connection to `upstream` until either side closes,
/// or until `drain` turns true and the calls in flight have ended.
pub async fn relay(
    client: UnixStream,
    upstream: UnixStream,
    proxy: Proxy,
    drain: watch::Receiver<bool>,
) -> Result<(), RelayError> {
    let (events_tx, events) = mpsc::unbounded_channel();
    let mut relay = Relay {
        proxy,
        client: Socket::new(client)?,
        upstream: Socket::new(upstream)?,
        from_client: Inbound::new(),
        from_upstream: Inbound::new(),
        to_client: Outbound::default(),
        to_upstream: Outbound::default(),
        literal: BytesMut::new(),
        path: Vec::new(),
        frames: BytesMut::new(),
        methods: Vec::new(),
        call_metrics: Vec::new(),
        client_blocks: Decoder::new(),
        upstream_blocks: Decoder::new(),
        preface_seen: false,
        first_block: true,
        calls: StreamMap::default(),
        diverted: StreamMap::default(),
        window: DEFAULT_WINDOW,
        debt: 0,
        client_initial_window: DEFAULT_WINDOW,
        held: false,
        pending_control: Vec::new(),
        upstream_max_id: 0,
        upstream_spoke: true,
        last_stream: 0,
        draining: false,
        announced: None,
        gone: None,
        recovery: None,
        events_tx,
    };
    // The drain signal comes in as an event: a watch future polled on every
    // turn of the loop cost 5 % of a call's instructions. The receiver kept
    // here is what the server counts to know the connection has drained.
    let drain_events = relay.events_tx.clone();
    let mut drain_seen = drain.clone();
    let drain_watch = tokio::spawn(async move {
        let _ = drain_seen.wait_for(|d| *d).await;
        let _ = drain_events.send(Event::Drain);
    });
    let result = relay.run(events).await;
    drain_watch.abort();
    drop(drain);
    for d in relay.diverted.values() {
        d.task.abort();
    }
    let cut: Vec<Call> = relay.calls.drain().map(|(_, call)| call).collect();
    for call in cut {
        relay.observe(call.label, "cancelled", call.started.elapsed());
    }
    result
}

struct Relay {
    proxy: Proxy,
    client: Socket,
    upstream: Socket,
    from_client: Inbound,
    from_upstream: Inbound,
    to_client: Outbound,
    to_upstream: Outbound,
    /// The last client block re-encoded (kept for its capacity).
    literal: BytesMut,
    /// The last `:path` seen (kept for its capacity).
    path: Vec<u8>,
    /// Header frames on their way upstream, split off as they are sent.
    frames: BytesMut,
    /// Method names seen on this connection, with their metric labels
    /// (see [`Relay::method`]).
    methods: Vec<Method>,
    /// Metric handles by method and code, so that a call's metrics cost no
    /// lookup in the shared families.
    call_metrics: Vec<CallMetrics>,
    /// Mirrors the upstream's decoder of the client's blocks.
    client_blocks: Decoder,
    /// Mirrors the client's decoder of the upstream's blocks.
    upstream_blocks: Decoder,
    preface_seen: bool,
    /// No header block has been sent upstream yet.
    first_block: bool,
    calls: StreamMap<Call>,
    diverted: StreamMap<Diverted>,
    /// The client's connection window: what may still be sent to it.
    window: i64,
    /// Bytes of diverted answers not yet taken out of the client's
    /// connection WINDOW_UPDATEs (the upstream counts the window without them).
    debt: i64,
    client_initial_window: i64,
    /// Upstream DATA waits for the client's window.
    held: bool,
    /// Frames of our own waiting for a frame boundary towards the client.
    pending_control: Vec<Bytes>,
    /// The upstream sent HEADERS or DATA since the last PING passed to it
    /// (what resets containerd's ping strikes).
    upstream_spoke: bool,
    /// The highest stream the upstream has seen opened. Frames for streams
    /// above it (ours, or refused while draining) never reach the upstream,
    /// which would take them for a protocol error.
    upstream_max_id: u32,
    last_stream: u32,
    /// The final GOAWAY (ours, or the upstream's) has been sent to the
    /// client: new streams are refused and the connection ends once the
    /// calls in flight have.
    draining: bool,
    /// The first GOAWAY (highest stream id) and its PING went out; the final
    /// one follows the PING's ACK, or this deadline.
    announced: Option<Instant>,
    /// Once the upstream is gone: what the calls in flight were told. New
    /// calls are diverted from then on.
    gone: Option<tonic::Status>,
    /// Once the upstream is gone: the wait for it to answer again.
    recovery: Option<Recovery>,
    events_tx: mpsc::UnboundedSender<Event>,
}

/// A connection's wait for its upstream to answer again
/// ([`Upstream::answers_again`](crate::proxy::Upstream::answers_again)).
struct Recovery {
    answered: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    /// Told of each call that arrives meanwhile.
    nudge: std::sync::Arc<tokio::sync::Notify>,
}

impl Recovery {
    fn new(proxy: Proxy) -> Self {
        let nudge = std::sync::Arc::new(tokio::sync::Notify::new());
        let since = Instant::now();
        let told = nudge.clone();
        let answered = Box::pin(async move { proxy.upstream().answers_again(since, &told).await });
        Recovery { answered, nudge }
    }
}

impl Relay {
    async fn run(&mut self, mut events: mpsc::UnboundedReceiver<Event>) -> Result<(), RelayError> {
        loop {
            if self.gone.is_some() {
                self.to_upstream = Outbound::default();
            } else if let Err(e) = self
                .to_upstream
                .flush(&self.upstream)
                .and_then(|()| self.upstream.watch_writes(!self.to_upstream.is_empty()))
            {
                self.on_upstream_gone(Some(e));
            }
            self.to_client.flush(&self.client)?;
            self.client.watch_writes(!self.to_client.is_empty())?;
            if self.from_client.eof {
                return Ok(());
            }
            if self.draining
                && self.calls.is_empty()
                && self.diverted.is_empty()
                && self.to_client.is_empty()
            {
                return Ok(());
            }
            let read_client = self.to_upstream.queued < HIGH_WATER;
            let read_upstream =
                self.gone.is_none() && !self.held && self.to_client.queued < HIGH_WATER;
            let write_client = !self.to_client.is_empty();
            let write_upstream = self.gone.is_none() && !self.to_upstream.is_empty();
            tokio::select! {
                r = self.client.readable(), if read_client => {
                    if self.from_client.read(&mut r?)? {
                        let held = self.held;
                        self.on_client_bytes()?;
                        if held && !self.held {
                            self.on_upstream_bytes()?;
                        }
                    }
                }
                r = self.upstream.readable(), if read_upstream => {
                    let read = match r {
                        Ok(mut guard) => self.from_upstream.read(&mut guard),
                        Err(e) => Err(e),
                    };
                    match read {
                        Ok(true) if self.from_upstream.eof => self.on_upstream_gone(None),
                        Ok(true) => self.on_upstream_bytes()?,
                        Ok(false) => {}
                        Err(e) => self.on_upstream_gone(Some(e)),
                    }
                }
                r = self.client.writable(), if write_client => r?,
                r = self.upstream.writable(), if write_upstream => {
                    if let Err(e) = r {
                        self.on_upstream_gone(Some(e));
                    }
                }
                Some(event) = events.recv() => self.on_event(event),
                () = sleep_until(self.announced), if !self.draining => self.final_goaway(),
                () = async { self.recovery.as_mut().expect("guarded").answered.as_mut().await },
                    if self.recovery.is_some() && self.announced.is_none() && !self.draining => {
                    self.recovery = None;
                    tracing::info!(
                        upstream = %self.proxy.upstream().path().display(),
                        "upstream answers again; asking a client served without it to reconnect"
                    );
                    self.start_drain();
                }
            }
        }
    }

    /// Starts the two-step GOAWAY of RFC 9113 §6.8: first the highest
    /// stream id and a PING, so that streams the client opens meanwhile are
    /// still served; then, once the PING comes back, the last stream seen.
    fn start_drain(&mut self) {
        if self.announced.is_none() && !self.draining {
            self.announced = Some(Instant::now() + DRAIN_PING_WAIT);
            self.inject_control(goaway(MAX_STREAM_ID));
            self.inject_control(ping(DRAIN_PING));
        }
    }

    fn final_goaway(&mut self) {
        if !self.draining {
            self.draining = true;
            self.inject_control(goaway(self.last_stream));
        }
    }

    fn can_inject(&self) -> bool {
        self.from_upstream.at_boundary()
    }

    // --- client → upstream ---

    fn on_client_bytes(&mut self) -> Result<(), RelayError> {
        if !self.preface_seen {
            let have = self.from_client.buf.len().min(PREFACE.len());
            if self.from_client.buf[..have] != PREFACE[..have] {
                return Err(RelayError::Preface);
            }
            if have < PREFACE.len() {
                return Ok(());
            }
            let preface = self.from_client.buf.split_to(PREFACE.len()).freeze();
            self.to_upstream.push(preface);
            self.preface_seen = true;
        }
        loop {
            let inb = &mut self.from_client;
            if inb.passing > 0 {
                let Some(part) = inb.next_passing() else {
                    return Ok(());
                };
                self.to_upstream.push(part);
                continue;
            }
            let Some(head) = inb.next_head(Side::Client)? else {
                return Ok(());
            };
            let ours = head.stream != 0
                && (head.stream > self.upstream_max_id || self.diverted.contains_key(&head.stream));
            let inb = &mut self.from_client;
            if head.kind == DATA && !ours {
                let part = inb.start_passing(head);
                self.to_upstream.push(part);
                continue;
            }
            if inb.buf.len() < FRAME_HEADER_LEN + head.len {
                return Ok(());
            }
            let frame = inb.buf.split_to(FRAME_HEADER_LEN + head.len).freeze();
            self.client_frame(head, frame)?;
        }
    }

    fn client_frame(&mut self, head: Head, frame: Bytes) -> Result<(), RelayError> {
        let payload = frame.slice(FRAME_HEADER_LEN..);
        match head.kind {
            HEADERS | CONTINUATION => {
                if let Some(block) = self.from_client.gather(Side::Client, head, &frame, false)? {
                    self.client_block(block)?;
                }
            }
            DATA => {
                // Only diverted streams' DATA gets here.
                let len = payload.len();
                let data = data_payload(head.flags, payload)?;
                let end = head.flags & END_STREAM != 0;
                if let Some(d) = self.diverted.get_mut(&head.stream) {
                    if let Some(tx) = &d.body {
                        let _ = tx.send(data);
                    }
                    if end {
                        d.body = None;
                        d.client_done = true;
                        if d.answered {
                            self.diverted.remove(&head.stream);
                        }
                    }
                }
                // The upstream never sees these bytes: give the client its
                // window back.
                if len > 0 {
                    self.inject_window_update(0, len as u32);
                    if !end {
                        self.inject_window_update(head.stream, len as u32);
                    }
                }
            }
            RST_STREAM => {
                if let Some(d) = self.diverted.remove(&head.stream) {
                    d.task.abort();
                } else if self.is_ours(head.stream) {
                    // A stream we answered, or refused.
                } else {
                    if let Some(call) = self.calls.remove(&head.stream) {
                        self.finish(call, "cancelled");
                    }
                    self.to_upstream.push(frame);
                }
            }
            WINDOW_UPDATE => {
                if payload.len() != 4 {
                    return Err(protocol(Side::Client, "WINDOW_UPDATE of the wrong size"));
                }
                let inc = i64::from(
                    u32::from_be_bytes(payload[..4].try_into().expect("4 bytes")) & 0x7fff_ffff,
                );
                if head.stream == 0 {
                    self.window += inc;
                    let repay = inc.min(self.debt);
                    self.debt -= repay;
                    if repay == 0 {
                        self.to_upstream.push(frame);
                    } else if inc > repay {
                        self.to_upstream
                            .push(window_update(0, (inc - repay) as u32));
                    }
                    self.held = false;
                    self.send_pending();
                } else if let Some(d) = self.diverted.get_mut(&head.stream) {
                    d.window += inc;
                    self.send_pending();
                } else if self.is_ours(head.stream) {
                    // For an answer already sent in full.
                } else {
                    self.to_upstream.push(frame);
                }
            }
            SETTINGS => {
                if head.flags & ACK == 0 {
                    for s in payload.chunks_exact(6) {
                        if u16::from_be_bytes([s[0], s[1]]) == SETTINGS_INITIAL_WINDOW_SIZE {
                            let new = i64::from(u32::from_be_bytes([s[2], s[3], s[4], s[5]]));
                            let delta = new - self.client_initial_window;
                            self.client_initial_window = new;
                            for d in self.diverted.values_mut() {
                                d.window += delta;
                            }
                        }
                    }
                }
                self.to_upstream.push(frame);
                self.send_pending();
            }
            PING if head.flags & ACK != 0 && payload[..] == DRAIN_PING[..] => {
                self.final_goaway();
            }
            PING if head.flags & ACK == 0
                && payload.len() == 8
                && (self.gone.is_some() || !self.upstream_spoke) =>
            {
                // With the upstream gone, nobody else is there to answer it.
                // Otherwise: the upstream sent nothing since the last PING it
                // got, so to containerd (grpc-go) this one would be a strike
                // of its ping policy, and the third closes the connection
                // with ENHANCE_YOUR_CALM. A grpc-go caller sends one after
                // each burst of DATA it receives (BDP estimation), and
                // diverted answers are DATA containerd never sent.
                let mut out = BytesMut::with_capacity(FRAME_HEADER_LEN + 8);
                put_head(&mut out, 8, PING, ACK, 0);
                out.put_slice(&payload);
                self.inject_control(out.freeze());
            }
            PING if head.flags & ACK == 0 => {
                self.upstream_spoke = false;
                self.to_upstream.push(frame);
            }
            _ if self.is_ours(head.stream) => {}
            _ => self.to_upstream.push(frame),
        }
        Ok(())
    }

    /// Whether frames on `stream` are for the relay rather than the upstream.
    fn is_ours(&self, stream: u32) -> bool {
        stream != 0 && (stream > self.upstream_max_id || self.diverted.contains_key(&stream))
    }

    fn inject_window_update(&mut self, stream: u32, inc: u32) {
        self.inject_control(window_update(stream, inc));
    }

    /// A frame of our own for the client: now if the client-bound bytes are
    /// at a frame boundary, else as soon as they are.
    fn inject_control(&mut self, frame: Bytes) {
        if self.can_inject() {
            self.to_client.push(frame);
        } else {
            self.pending_control.push(frame);
        }
    }

    /// A complete header block from the client.
    fn client_block(&mut self, block: Block) -> Result<(), RelayError> {
        // Decoded and re-encoded in one pass, into a buffer kept for the
        // next block; its first byte is the size update the first block
        // sent upstream starts with.
        let mut literal = std::mem::take(&mut self.literal);
        literal.clear();
        literal.put_u8(0x20);
        let mut path = std::mem::take(&mut self.path);
        path.clear();
        decode_each(
            &mut self.client_blocks,
            Side::Client,
            &block.fragment,
            |name, value| {
                if name == b":path" {
                    path.extend_from_slice(value);
                }
                put_literal(&mut literal, name, value);
            },
        )?;
        let result = self.client_block_decoded(block, &literal, &path);
        self.literal = literal;
        self.path = path;
        result
    }

    fn client_block_decoded(
        &mut self,
        block: Block,
        literal: &[u8],
        path: &[u8],
    ) -> Result<(), RelayError> {
        let stream = block.stream;
        let end_stream = block.flags & END_STREAM != 0;
        if let Some(d) = self.diverted.get_mut(&stream) {
            // Request trailers: the message is complete.
            d.body = None;
            d.client_done = true;
            if d.answered {
                self.diverted.remove(&stream);
            }
            return Ok(());
        }
        if stream % 2 == 0 {
            return Err(protocol(Side::Client, "HEADERS on an even stream id"));
        }
        if stream <= self.last_stream && !self.calls.contains_key(&stream) {
            // Trailers after the answer ended: the upstream knows the
            // stream (as closed), unless it was one of ours.
            if stream > self.upstream_max_id {
                return Ok(());
            }
        } else if !self.calls.contains_key(&stream) {
            // A new stream.
            self.last_stream = stream;
            if self.draining {
                self.inject_control(rst_stream(stream, REFUSED_STREAM));
                return Ok(());
            }
            if path == PULL_IMAGE_PATH.as_bytes() || self.gone.is_some() {
                // Pulls go on the shared connection, which redials. So does
                // every call once this connection's upstream is gone: it is
                // answered Unavailable while containerd is down and served
                // as soon as it is back, before the client reconnects.
                // Literals decode without the connection's table.
                let fields = decode(&mut Decoder::new(), Side::Client, &literal[1..])?;
                self.divert(stream, fields, end_stream);
                // A call is a good moment to look again.
                if let Some(recovery) = &self.recovery {
                    recovery.nudge.notify_one();
                }
                return Ok(());
            }
            self.upstream_max_id = stream;
            let (method, label) = self.method(path);
            self.calls.insert(
                stream,
                Call {
                    label,
                    method,
                    started: Instant::now(),
                    status: None,
                    answered: false,
                },
            );
        }
        // We keep no dynamic table: the first block says so (size 0).
        let block = if std::mem::take(&mut self.first_block) {
            literal
        } else {
            &literal[1..]
        };
        // Many blocks share one allocation, split off as they go.
        let need = block.len() + 2 * FRAME_HEADER_LEN;
        if self.frames.capacity() < need {
            self.frames.reserve(need.max(FRAMES_CHUNK));
        }
        header_frames(&mut self.frames, stream, end_stream, block);
        self.to_upstream.push(self.frames.split().freeze());
        Ok(())
    }

    /// The method named by `path` and its metric label, shared between the
    /// calls of this connection (a caller uses a handful; a caller sending
    /// many distinct paths gets a copy each).
    fn method(&mut self, path: &[u8]) -> (Arc<str>, &'static str) {
        if let Some((_, m, label)) = self.methods.iter().find(|(p, ..)| **p == *path) {
            return (m.clone(), label);
        }
        let method: Arc<str> = String::from_utf8_lossy(path).into();
        let label = method_label(&method);
        if self.methods.len() < METHODS_KEPT {
            self.methods.push((path.into(), method.clone(), label));
        }
        (method, label)
    }

    fn divert(&mut self, stream: u32, fields: Fields, end_stream: bool) {
        let (body_tx, body_rx) = mpsc::unbounded_channel();
        let req = request_from(&fields, ChannelBody(body_rx));
        let proxy = self.proxy.clone();
        let events = self.events_tx.clone();
        let task = tokio::spawn(async move {
            let send = |out| {
                let _ = events.send(Event::Answer { stream, out });
            };
            let resp = match req {
                Some(req) => proxy.handle(req).await,
                None => {
                    tonic::Status::internal("ecr-pull-proxy: request headers unusable").into_http()
                }
            };
            let (parts, mut body) = resp.into_parts();
            let end = body.is_end_stream();
            send(Out::Head(parts, end));
            if end {
                return;
            }
            while let Some(frame) = body.frame().await {
                match frame.map(|f| f.into_data()) {
                    Ok(Ok(data)) => send(Out::Data(data)),
                    Ok(Err(frame)) => {
                        if let Ok(t) = frame.into_trailers() {
                            send(Out::Trailers(t));
                            return;
                        }
                    }
                    Err(_) => {
                        send(Out::Reset);
                        return;
                    }
                }
            }
            send(Out::End);
        });
        self.diverted.insert(
            stream,
            Diverted {
                body: (!end_stream).then_some(body_tx),
                client_done: end_stream,
                answered: false,
                task,
                window: self.client_initial_window,
                pending: VecDeque::new(),
            },
        );
    }

    // --- answers to diverted streams ---

    fn on_event(&mut self, event: Event) {
        let (stream, out) = match event {
            Event::Answer { stream, out } => (stream, out),
            Event::Drain => return self.start_drain(),
        };
        if let Some(d) = self.diverted.get_mut(&stream) {
            d.pending.push_back(out);
            self.send_pending();
        }
    }

    /// Sends what the diverted streams have ready and the windows allow.
    fn send_pending(&mut self) {
        if !self.can_inject() {
            return;
        }
        for frame in self.pending_control.drain(..) {
            self.to_client.push(frame);
        }
        let mut finished = Vec::new();
        for (&stream, d) in self.diverted.iter_mut() {
            while let Some(out) = d.pending.pop_front() {
                let mut buf = BytesMut::new();
                match out {
                    Out::Head(parts, end) => {
                        let block = header_block(Some(parts.status), &parts.headers);
                        header_frames(&mut buf, stream, end, &block);
                        if end {
                            finished.push(stream);
                        }
                    }
                    Out::Data(mut data) => {
                        let room = self.window.min(d.window).min(SEND_FRAME_SIZE as i64);
                        if room <= 0 && !data.is_empty() {
                            d.pending.push_front(Out::Data(data));
                            break;
                        }
                        let n = (room.max(0) as usize).min(data.len());
                        let part = data.split_to(n);
                        put_head(&mut buf, n, DATA, 0, stream);
                        buf.put_slice(&part);
                        self.window -= n as i64;
                        d.window -= n as i64;
                        self.debt += n as i64;
                        if !data.is_empty() {
                            d.pending.push_front(Out::Data(data));
                        }
                    }
                    Out::Trailers(trailers) => {
                        header_frames(&mut buf, stream, true, &header_block(None, &trailers));
                        finished.push(stream);
                    }
                    Out::End => {
                        put_head(&mut buf, 0, DATA, END_STREAM, stream);
                        finished.push(stream);
                    }
                    Out::Reset => {
                        buf.put_slice(&rst_stream(stream, CANCEL));
                        finished.push(stream);
                    }
                }
                self.to_client.push(buf.freeze());
            }
        }
        for stream in finished {
            if let Some(d) = self.diverted.get_mut(&stream) {
                d.answered = true;
                d.pending.clear();
                if d.client_done {
                    self.diverted.remove(&stream);
                }
            }
        }
    }

    // --- upstream → client ---

    fn on_upstream_bytes(&mut self) -> Result<(), RelayError> {
        loop {
            let inb = &mut self.from_upstream;
            if inb.passing > 0 {
                let Some(part) = inb.next_passing() else {
                    return Ok(());
                };
                self.to_client.push(part);
                if self.from_upstream.passing == 0 {
                    self.send_pending();
                }
                continue;
            }
            let Some(head) = inb.next_head(Side::Upstream)? else {
                return Ok(());
            };
            if head.kind == DATA {
                self.upstream_spoke = true;
                if self.window < head.len as i64 {
                    // Diverted answers used the client's window; wait for
                    // its WINDOW_UPDATE.
                    self.held = true;
                    return Ok(());
                }
                self.window -= head.len as i64;
                let part = inb.start_passing(head);
                self.to_client.push(part);
                if head.flags & END_STREAM != 0 {
                    if let Some(call) = self.calls.remove(&head.stream) {
                        self.finish(call, "complete");
                    }
                }
                if self.from_upstream.passing == 0 {
                    self.send_pending();
                }
                continue;
            }
            if inb.buf.len() < FRAME_HEADER_LEN + head.len {
                return Ok(());
            }
            let frame = inb.buf.split_to(FRAME_HEADER_LEN + head.len).freeze();
            self.upstream_frame(head, frame)?;
            self.send_pending();
        }
    }

    fn upstream_frame(&mut self, head: Head, frame: Bytes) -> Result<(), RelayError> {
        let payload = frame.slice(FRAME_HEADER_LEN..);
        match head.kind {
            HEADERS | CONTINUATION => {
                self.upstream_spoke = true;
                if let Some(block) =
                    self.from_upstream
                        .gather(Side::Upstream, head, &frame, true)?
                {
                    self.upstream_block(block)?;
                }
            }
            RST_STREAM => {
                if let Some(call) = self.calls.remove(&head.stream) {
                    self.finish(call, "reset-by-upstream");
                }
                self.to_client.push(frame);
            }
            GOAWAY => {
                // containerd is going away: no new calls on this connection.
                let code = payload
                    .get(4..8)
                    .map(|c| u32::from_be_bytes(c.try_into().expect("4 bytes")))
                    .unwrap_or(0);
                if code == 0 {
                    tracing::debug!("upstream sent GOAWAY");
                } else {
                    tracing::warn!(
                        h2_error_code = code,
                        upstream = %self.proxy.upstream().path().display(),
                        "upstream closed the connection for a protocol error"
                    );
                }
                let last = payload
                    .get(..4)
                    .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")) & MAX_STREAM_ID);
                match last {
                    Some(last) if last != MAX_STREAM_ID && payload.len() >= 8 => {
                        self.on_upstream_goaway(last, &payload);
                    }
                    // The first step of a graceful shutdown (or a frame the
                    // client will judge): the client stops opening streams,
                    // nothing is refused yet.
                    _ => self.to_client.push(frame),
                }
            }
            _ => self.to_client.push(frame),
        }
        Ok(())
    }

    /// The upstream's final GOAWAY: its streams above `last` were not and
    /// will not be processed. `last` counts the upstream's streams only, so
    /// the client is told the higher of it and the diverted streams in
    /// flight (which the upstream never saw and the proxy still answers);
    /// the upstream streams between the two are refused on its behalf.
    fn on_upstream_goaway(&mut self, last: u32, payload: &[u8]) {
        let keep = self.diverted.keys().copied().fold(last, u32::max);
        let mut refused: Vec<u32> = self.calls.keys().copied().filter(|&s| s > last).collect();
        refused.sort_unstable();
        for stream in refused {
            let call = self.calls.remove(&stream).expect("listed");
            self.to_client.push(rst_stream(stream, REFUSED_STREAM));
            self.finish(call, "refused-by-upstream");
        }
        let mut out = BytesMut::with_capacity(FRAME_HEADER_LEN + payload.len());
        put_head(&mut out, payload.len(), GOAWAY, 0, 0);
        out.put_u32(keep);
        out.put_slice(&payload[4..]);
        self.to_client.push(out.freeze());
        // Streams the client opens from here are refused, and the
        // connection ends once the calls in flight have.
        self.draining = true;
    }

    fn upstream_block(&mut self, block: Block) -> Result<(), RelayError> {
        let mut status = None;
        decode_each(
            &mut self.upstream_blocks,
            Side::Upstream,
            &block.fragment,
            |name, value| {
                if name == b"grpc-status" {
                    status = Some(grpc_status(value));
                }
            },
        )?;
        for raw in block.raw {
            self.to_client.push(raw);
        }
        if let Some(call) = self.calls.get_mut(&block.stream) {
            call.answered = true;
            if status.is_some() {
                call.status = status;
            }
            if block.flags & END_STREAM != 0 {
                let call = self.calls.remove(&block.stream).expect("present");
                self.finish(call, "complete");
            }
        }
        Ok(())
    }

    /// The upstream closed the connection: calls in flight on it, and calls
    /// made on this connection until the upstream is back, fail with
    /// `Unavailable` naming the upstream.
    fn on_upstream_gone(&mut self, error: Option<io::Error>) {
        let upstream = self.proxy.upstream();
        let source: BoxError = match error {
            Some(e) => e.into(),
            None => "connection closed".into(),
        };
        let reason = crate::error_chain(&*source);
        let status = status_for(&ProxyError::Upstream {
            path: upstream.path().to_owned(),
            source,
        });
        upstream.mark_down();
        let path = upstream.path().display();
        if !self.calls.is_empty() {
            tracing::warn!(upstream = %path, error = %reason, in_flight = self.calls.len(), "upstream connection lost");
        } else {
            tracing::info!(upstream = %path, error = %reason, "upstream closed an idle connection; calls on it answer Unavailable until it is back");
        }
        let can_inject = self.can_inject();
        let status = self.gone.insert(status).clone();
        if !can_inject {
            // Half a frame went out: nothing more can be said on this
            // connection.
            self.from_client.eof = true;
            return;
        }
        let code = (status.code() as i32).to_string();
        let calls: Vec<(u32, Call)> = self.calls.drain().collect();
        for (stream, mut call) in calls {
            let mut out = BytesMut::new();
            header_frames(
                &mut out,
                stream,
                true,
                &status_block(&status, call.answered),
            );
            self.to_client.push(out.freeze());
            call.status = Some(Cow::Owned(code.clone()));
            self.finish(call, "upstream-error");
        }
        // The client keeps this connection, and its new calls take the
        // shared connection (Unavailable until the upstream is back, served
        // from then on); once the upstream answers again the client is asked
        // to reconnect. (A GOAWAY now would fail the calls racing it in some
        // clients.)
        if self.recovery.is_none() {
            self.recovery = Some(Recovery::new(self.proxy.clone()));
        }
    }

    fn finish(&mut self, call: Call, outcome: &str) {
        let elapsed = call.started.elapsed();
        let code = if outcome == "cancelled" {
            "cancelled"
        } else {
            code_label(call.status.as_deref())
        };
        self.observe(call.label, code, elapsed);
        tracing::debug!(
            method = %call.method,
            grpc_status = call.status.as_deref().unwrap_or("-"),
            outcome,
            duration_us = elapsed.as_micros() as u64,
            "call"
        );
    }

    /// Counts a call in the metrics (see [`Metrics::observe_call`]).
    fn observe(&mut self, method: &'static str, code: &'static str, elapsed: std::time::Duration) {
        let i = match self
            .call_metrics
            .iter()
            .position(|m| m.method == method && m.code == code)
        {
            Some(i) => i,
            None => {
                let (calls, duration) = self.proxy.metrics().call_handles(method, code);
                self.call_metrics.push(CallMetrics {
                    method,
                    code,
                    calls,
                    duration,
                });
                self.call_metrics.len() - 1
            }
        };
        let m = &self.call_metrics[i];
        m.calls.inc();
        m.duration.observe(elapsed.as_secs_f64());
    }
}

/// A header block of literals: `:status` first when given (an answer's
/// head), then `headers`.
fn header_block(status: Option<http::StatusCode>, headers: &HeaderMap) -> BytesMut {
    let mut block = BytesMut::new();
    match status {
        Some(http::StatusCode::OK) => block.put_u8(0x88),
        Some(s) => put_literal(&mut block, b":status", s.as_str().as_bytes()),
        None => {}
    }
    for (name, value) in headers {
        put_literal(&mut block, name.as_str().as_bytes(), value.as_bytes());
    }
    block
}

/// The header block that ends a call with `status`: a trailers-only answer,
/// or trailers when the answer's headers already went out.
fn status_block(status: &tonic::Status, answered: bool) -> BytesMut {
    let answer = status.clone().into_http::<()>();
    if !answered {
        return header_block(Some(answer.status()), answer.headers());
    }
    let mut trailers = answer.headers().clone();
    trailers.remove(http::header::CONTENT_TYPE);
    header_block(None, &trailers)
}

/// An `http::Request` from a decoded request header block.
fn request_from(fields: &Fields, body: ChannelBody) -> Option<Request<ProxyBody>> {
    let mut builder = Request::builder().version(http::Version::HTTP_2);
    let (mut scheme, mut authority, mut path) = ("http", "localhost", "/");
    for (name, value) in fields {
        let value_str = std::str::from_utf8(value).ok();
        match name.as_ref() {
            b":method" => builder = builder.method(value.as_ref()),
            b":scheme" => scheme = value_str?,
            b":authority" => authority = value_str?,
            b":path" => path = value_str?,
            n if n.starts_with(b":") => {}
            _ => builder = builder.header(name.as_ref(), value.as_ref()),
        }
    }
    // gRPC C-core callers on a Unix socket send the socket path as
    // :authority, which is no URI authority; containerd ignores it anyway.
    let uri = http::Uri::builder()
        .scheme(scheme)
        .authority(authority)
        .path_and_query(path)
        .build()
        .or_else(|_| {
            http::Uri::builder()
                .scheme("http")
                .authority("localhost")
                .path_and_query(path)
                .build()
        })
        .ok()?;
    builder.uri(uri).body(body.boxed_unsync()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_blocks_decode_to_what_was_encoded() {
        let mut block = BytesMut::new();
        block.put_u8(0x20);
        block.put_u8(0x88);
        put_literal(&mut block, b"grpc-message", &vec![b'x'; 300]);
        let fields = decode(&mut Decoder::new(), Side::Client, &block).unwrap();
        assert_eq!(fields[0].0.as_ref(), b":status");
        assert_eq!(fields[0].1.as_ref(), b"200");
        assert_eq!(fields[1].1.len(), 300);
    }

    #[test]
    fn a_status_ends_a_call_as_trailers_only_or_as_trailers() {
        let status =
            tonic::Status::unavailable("ecr-pull-proxy: upstream /run/c.sock unavailable: 100%");
        let names = |answered| -> Vec<(String, String)> {
            let block = status_block(&status, answered);
            decode(&mut Decoder::new(), Side::Upstream, &block)
                .unwrap()
                .into_iter()
                .map(|(n, v)| {
                    (
                        String::from_utf8(n.to_vec()).unwrap(),
                        String::from_utf8(v.to_vec()).unwrap(),
                    )
                })
                .collect()
        };
        let only = names(false);
        assert_eq!(only[0], (":status".into(), "200".into()));
        assert!(only.contains(&("content-type".into(), "application/grpc".into())));
        assert!(only.contains(&("grpc-status".into(), "14".into())));
        // grpc-message is percent-encoded.
        assert!(only
            .iter()
            .any(|(n, v)| n == "grpc-message" && v.ends_with("100%25")));
        let trailers = names(true);
        assert!(
            trailers.iter().all(|(n, _)| n.starts_with("grpc-")),
            "{trailers:?}"
        );
        assert!(trailers.contains(&("grpc-status".into(), "14".into())));
    }

    #[test]
    fn long_blocks_are_split_into_continuations() {
        let block = vec![0u8; SEND_FRAME_SIZE * 2 + 1];
        let mut out = BytesMut::new();
        header_frames(&mut out, 3, true, &block);
        let heads: Vec<Head> = {
            let mut v = Vec::new();
            let mut b = &out[..];
            while !b.is_empty() {
                let h = Head::parse(b);
                b = &b[FRAME_HEADER_LEN + h.len..];
                v.push(h);
            }
            v
        };
        let kinds: Vec<(u8, u8)> = heads.iter().map(|h| (h.kind, h.flags)).collect();
        assert_eq!(
            kinds,
            vec![
                (HEADERS, END_STREAM),
                (CONTINUATION, 0),
                (CONTINUATION, END_HEADERS)
            ]
        );
    }

    #[test]
    fn a_socket_path_as_authority_still_makes_a_request() {
        // What gRPC C-core (grpcio) sends on a Unix socket.
        let fields: Fields = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", PULL_IMAGE_PATH),
            (":authority", "/run/ecr-pull-proxy/ecr-pull-proxy.sock"),
            ("content-type", "application/grpc"),
        ]
        .iter()
        .map(|(n, v)| {
            (
                Bytes::from_static(n.as_bytes()),
                Bytes::from_static(v.as_bytes()),
            )
        })
        .collect();
        let (_tx, rx) = mpsc::unbounded_channel();
        let req = request_from(&fields, ChannelBody(rx)).expect("a request");
        assert_eq!(req.uri().path(), PULL_IMAGE_PATH);
        assert_eq!(req.uri().authority().unwrap().as_str(), "localhost");
        assert_eq!(req.headers()["content-type"], "application/grpc");
    }

    #[test]
    fn padding_and_priority_are_stripped_from_headers() {
        let mut payload = vec![2u8]; // pad length
        payload.extend_from_slice(&[0, 0, 0, 1, 16]); // priority
        payload.extend_from_slice(b"abc");
        payload.extend_from_slice(&[0, 0]);
        let f = headers_fragment(Side::Client, PADDED | PRIORITY_FLAG, &payload).unwrap();
        assert_eq!(f, b"abc");
        assert!(headers_fragment(Side::Client, PADDED, &[9, 1]).is_err());
    }
}
