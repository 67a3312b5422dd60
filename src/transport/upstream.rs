//! An HTTP/2 connection to containerd: dialled on first use, dialled again
//! after containerd restarts. Each client connection gets one of its own
//! (as containerd gives each caller its own), so that a caller that stops
//! reading holds only its own connection's flow-control window, never
//! another caller's; the daemon has one more for its own calls (the
//! sandbox keeper, `/readyz`). HTTP/2 itself (framing, HPACK, flow
//! control) is h2's.
//!
//! It speaks through `h2::client` rather than hyper's client wrapper: a
//! request's headers and the body frames already received (all of a unary
//! call, in practice) are queued together and leave in one write, and no
//! task is spawned for a unary call.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use prometheus_client::metrics::gauge::Gauge;
use tokio::time::Instant;
use tonic::Code;

use crate::call::{boxed, final_status, Forward, Forwarded, ProxyBody};
use crate::error::{code_for_reset, error_chain, BoxError, ProxyError};

/// How long dialling the upstream socket (connect + HTTP/2 handshake) may take.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// After a dial that timed out (a hung containerd), calls get
/// `Unavailable` at once for this long instead of dialling again, so that
/// calls do not queue behind one [`DIAL_TIMEOUT`] after another. A dial
/// refused at once (containerd not running) is not held against the next
/// call: it is tried again, so calls work the moment containerd is back.
pub const HUNG_DIAL_BACKOFF: Duration = Duration::from_secs(1);
/// Largest header block accepted from the upstream (containerd's error
/// details can be large; containerd is trusted).
pub const UPSTREAM_MAX_HEADER_LIST_SIZE: u32 = 16 * 1024 * 1024;
/// HTTP/2 receive window per stream towards the upstream: what containerd
/// may send of one answer before we hand it on to the caller. Over a Unix
/// socket a window update costs microseconds, so a multi-megabyte
/// `ListImages` still arrives at full speed.
pub const UPSTREAM_STREAM_WINDOW: u32 = 1024 * 1024;
/// HTTP/2 receive window per upstream connection: the most answer data
/// held for one client connection whose caller does not read. One client
/// connection's calls share it; no other caller's do.
pub const UPSTREAM_CONNECTION_WINDOW: u32 = 1024 * 1024;
/// Framing overhead of small DATA frames h2 may hold per upstream
/// connection before it closes it as a flood (`too_many_data_frames`):
/// each frame under 256 bytes costs 256 minus its size until the caller
/// reads it. h2's default is half the connection window (512 KiB here),
/// which a slow reader of `StreamImages` (thousands of small messages)
/// exceeds; this allows about 8,000 such frames waiting. containerd is
/// trusted; what it holds for one caller is bounded by this.
pub const UPSTREAM_DATA_FRAME_BUDGET: usize = 2 * 1024 * 1024;

/// The shared upstream connection and how to get a new one.
pub struct Upstream {
    path: PathBuf,
    state: Mutex<State>,
    dialling: tokio::sync::Mutex<()>,
    generation: AtomicU64,
    /// Shared by the daemon's upstream connections (its own and each
    /// client connection's).
    health: Arc<Health>,
}

#[derive(Default)]
struct State {
    conn: Option<Connection>,
    /// The last dial that timed out: when, and why.
    hung: Option<(Instant, String)>,
}

/// Whether containerd answers, tracked once for the daemon: every upstream
/// connection (the daemon's own and each client connection's) reports to
/// it, so that the `up` gauge has one writer's meaning, a restart of
/// containerd is logged once (not once per client connection), and
/// [`Upstream::answers_again`] wakes only on a down → up transition, not on
/// every client connection's first dial.
struct Health {
    reach: Mutex<Reach>,
    up: Gauge,
    back: tokio::sync::Notify,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// Nothing dialled yet.
    Unknown,
    Up,
    Down,
}

impl Health {
    /// A connection was made.
    fn connected(&self, path: &Path) {
        let was = std::mem::replace(&mut *self.reach.lock().expect("health lock"), Reach::Up);
        self.up.set(1);
        match was {
            Reach::Down => {
                tracing::info!(upstream = %path.display(), "upstream answers again");
                self.back.notify_waiters();
            }
            Reach::Unknown => tracing::debug!(upstream = %path.display(), "dialled upstream"),
            Reach::Up => {}
        }
    }

    /// A connection broke or could not be made; `warn` says what, logged
    /// when containerd was not already known to be down.
    fn down(&self, warn: impl FnOnce()) {
        let was = std::mem::replace(&mut *self.reach.lock().expect("health lock"), Reach::Down);
        self.up.set(0);
        if was != Reach::Down {
            warn();
        }
    }
}

/// One established connection.
#[derive(Clone)]
struct Connection {
    send: h2::client::SendRequest<Bytes>,
    generation: u64,
}

impl Upstream {
    /// An upstream at `path`; nothing is dialled yet. `up` is 1 while a
    /// connection is established.
    pub fn new(path: impl Into<PathBuf>, up: Gauge) -> Arc<Self> {
        Arc::new(Upstream {
            path: path.into(),
            state: Mutex::new(State::default()),
            dialling: tokio::sync::Mutex::new(()),
            generation: AtomicU64::new(0),
            health: Arc::new(Health {
                reach: Mutex::new(Reach::Unknown),
                up,
                back: tokio::sync::Notify::new(),
            }),
        })
    }

    /// The upstream socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Another connection to the same upstream (a client connection's
    /// own), sharing the daemon's view of whether containerd answers (the
    /// `up` gauge and [`Upstream::answers_again`]).
    pub fn sibling(&self) -> Arc<Self> {
        Arc::new(Upstream {
            path: self.path.clone(),
            state: Mutex::new(State::default()),
            dialling: tokio::sync::Mutex::new(()),
            generation: AtomicU64::new(0),
            health: self.health.clone(),
        })
    }

    /// Resolves when containerd answers again after it was down (a
    /// connection lost or a dial failed): the first dial by this upstream
    /// or a sibling that succeeds after that. A client connection's first
    /// dial while containerd is up does not wake it.
    pub fn answers_again(&self) -> tokio::sync::futures::Notified<'_> {
        self.health.back.notified()
    }

    fn unavailable(&self, source: BoxError) -> ProxyError {
        ProxyError::Upstream {
            path: self.path.clone(),
            source,
        }
    }

    fn current(&self) -> Option<Connection> {
        self.state.lock().expect("upstream lock").conn.clone()
    }

    /// Forgets connection `generation` (it said GOAWAY or broke), so the
    /// next call dials.
    fn forget(&self, generation: u64, why: &str) {
        let mut state = self.state.lock().expect("upstream lock");
        if state.conn.as_ref().map(|c| c.generation) == Some(generation) {
            state.conn = None;
            self.health.down(|| {
                tracing::warn!(
                    upstream = %self.path.display(),
                    reason = why,
                    "upstream connection lost; calls answer Unavailable until it is back"
                )
            });
        }
    }

    async fn connection(self: &Arc<Self>) -> Result<Connection, ProxyError> {
        if let Some(c) = self.current() {
            return Ok(c);
        }
        let _dialling = self.dialling.lock().await;
        {
            let state = self.state.lock().expect("upstream lock");
            if let Some(c) = &state.conn {
                return Ok(c.clone());
            }
            if let Some((at, why)) = &state.hung {
                if at.elapsed() < HUNG_DIAL_BACKOFF {
                    return Err(self.unavailable(why.clone().into()));
                }
            }
        }
        let (dialled, hung) = match tokio::time::timeout(DIAL_TIMEOUT, self.dial()).await {
            Ok(r) => (r, false),
            Err(_) => (
                Err(format!("no HTTP/2 handshake within {}s", DIAL_TIMEOUT.as_secs()).into()),
                true,
            ),
        };
        let mut state = self.state.lock().expect("upstream lock");
        match dialled {
            Ok(conn) => {
                state.conn = Some(conn.clone());
                state.hung = None;
                self.health.connected(&self.path);
                Ok(conn)
            }
            Err(e) => {
                let why = error_chain(&*e);
                self.health.down(|| {
                    tracing::warn!(
                        upstream = %self.path.display(),
                        error = %why,
                        "cannot reach the upstream; calls answer Unavailable until it is back"
                    )
                });
                state.hung = hung.then(|| (Instant::now(), why.clone()));
                Err(self.unavailable(why.into()))
            }
        }
    }

    async fn dial(self: &Arc<Self>) -> Result<Connection, BoxError> {
        let stream = tokio::net::UnixStream::connect(&self.path).await?;
        let (send, conn) = h2::client::Builder::new()
            .initial_window_size(UPSTREAM_STREAM_WINDOW)
            .initial_connection_window_size(UPSTREAM_CONNECTION_WINDOW)
            .data_frame_budget(UPSTREAM_DATA_FRAME_BUDGET)
            .max_header_list_size(UPSTREAM_MAX_HEADER_LIST_SIZE)
            .handshake::<_, Bytes>(stream)
            .await?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let connection = Connection { send, generation };
        // The task holds no `SendRequest`: when this `Upstream` (and with it
        // its client connection) is gone, the connection closes.
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let why = match conn.await {
                Ok(()) => "closed by the upstream".to_owned(),
                Err(e) => error_chain(&e),
            };
            if let Some(me) = me.upgrade() {
                me.forget(generation, &why);
            }
        });
        Ok(connection)
    }

    /// Sends one request and returns the upstream's answer head and body.
    /// The body is streamed to the upstream as the caller sends it.
    pub async fn send<B>(
        self: &Arc<Self>,
        req: Request<B>,
    ) -> Result<Response<UpstreamBody>, ProxyError>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
    {
        // A connection that has said GOAWAY (containerd restarting) refuses
        // new streams before anything is sent: forget it and dial once more.
        let mut send = None;
        for _ in 0..2 {
            let conn = self.connection().await?;
            match conn.send.clone().ready().await {
                Ok(s) => {
                    send = Some((conn, s));
                    break;
                }
                Err(e) => self.forget(conn.generation, &error_chain(&e)),
            }
        }
        let Some((conn, mut send)) = send else {
            return Err(self.unavailable("the connection closed as it was dialled".into()));
        };
        let (parts, body) = req.into_parts();
        let end = body.is_end_stream();
        let (response, stream) = send
            .send_request(Request::from_parts(parts, ()), end)
            .map_err(|e| self.call_failed(&conn, e))?;
        if !end {
            send_body(body, stream);
        }
        let response = response.await.map_err(|e| self.call_failed(&conn, e))?;
        let path: Arc<Path> = Arc::from(self.path.as_path());
        Ok(response.map(|rx| UpstreamBody::new(rx, path)))
    }

    /// A call failed. Only a failure of the connection (I/O, GOAWAY)
    /// retires it; a reset of this one stream, by the upstream or by us
    /// (the caller went away), leaves it serving every other call.
    fn call_failed(&self, conn: &Connection, e: h2::Error) -> ProxyError {
        if e.is_io() || e.is_go_away() {
            self.forget(conn.generation, &error_chain(&e));
            return self.unavailable(e.into());
        }
        match e.reason() {
            Some(reason) if e.is_reset() && e.is_remote() => ProxyError::Reset {
                path: self.path.clone(),
                reason,
            },
            _ => self.unavailable(e.into()),
        }
    }

    /// Whether the upstream answers a CRI call now: an `ImageFsInfo` (the
    /// call kubelet makes first) must come back OK within [`DIAL_TIMEOUT`].
    pub async fn probe(self: &Arc<Self>) -> Result<(), ProxyError> {
        let req = Request::builder()
            .method(http::Method::POST)
            .uri("http://localhost/runtime.v1.ImageService/ImageFsInfo")
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
            .body(Full::new(crate::pull::frame(&[])))
            .expect("static request");
        let call = async {
            let resp = self.send(req).await?;
            let (head, body) = resp.into_parts();
            let collected = body
                .collect()
                .await
                .map_err(|e| self.unavailable(e.into()))?;
            match final_status(&head.headers, collected.trailers()) {
                Some(s) if s.code() == Code::Ok => Ok(()),
                Some(s) => Err(self.unavailable(
                    format!("ImageFsInfo answered {:?}: {}", s.code(), s.message()).into(),
                )),
                None => Err(self.unavailable("ImageFsInfo answered without a gRPC status".into())),
            }
        };
        tokio::time::timeout(DIAL_TIMEOUT, call)
            .await
            .map_err(|_| {
                self.unavailable(
                    format!("ImageFsInfo took longer than {}s", DIAL_TIMEOUT.as_secs()).into(),
                )
            })?
    }
}

impl Forward for Arc<Upstream> {
    fn forward(self, req: Request<ProxyBody>) -> Forwarded {
        Box::pin(async move { Ok(self.send(req).await?.map(boxed)) })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

/// Most bytes of a caller's request body sent upstream in one DATA frame
/// when several of its frames have already arrived: a caller's tiny frames
/// leave as one, so that no caller can make the shared upstream connection
/// carry a flood of tiny frames (which the upstream's HTTP/2 stack may
/// punish by closing the connection, for every caller).
pub const COALESCE_LIMIT: usize = 64 * 1024;

/// What follows the data [`take_ready`] found.
enum Then {
    /// Nothing more has arrived yet.
    Wait,
    /// The body ended.
    End,
    /// The body ended with trailers.
    Trailers(HeaderMap),
    /// The caller reset its stream or went away.
    Failed,
}

/// Takes what `body` holds now, without waiting: every data frame already
/// arrived, merged (up to [`COALESCE_LIMIT`]), and what follows them.
fn take_ready<B>(body: &mut B, cx: &mut Context<'_>) -> (Option<Bytes>, Then)
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut data: Option<Bytes> = None;
    let mut merged: Option<bytes::BytesMut> = None;
    let then = loop {
        let size = data.as_ref().map_or(0, Bytes::len) + merged.as_ref().map_or(0, |m| m.len());
        if size >= COALESCE_LIMIT {
            break Then::Wait;
        }
        match Pin::new(&mut *body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(chunk) => {
                    if let Some(m) = &mut merged {
                        m.extend_from_slice(&chunk);
                    } else if let Some(first) = data.take() {
                        let mut m = bytes::BytesMut::with_capacity(first.len() + chunk.len());
                        m.extend_from_slice(&first);
                        m.extend_from_slice(&chunk);
                        merged = Some(m);
                    } else {
                        data = Some(chunk);
                    }
                    if body.is_end_stream() {
                        break Then::End;
                    }
                }
                Err(frame) => match frame.into_trailers() {
                    Ok(t) => break Then::Trailers(t),
                    Err(_) => continue,
                },
            },
            Poll::Ready(Some(Err(_))) => break Then::Failed,
            Poll::Ready(None) => break Then::End,
            Poll::Pending => break Then::Wait,
        }
    };
    (merged.map(bytes::BytesMut::freeze).or(data), then)
}

/// Sends what [`take_ready`] found. Returns false when the stream is done
/// (ended, reset or gone).
fn send_ready(tx: &mut h2::SendStream<Bytes>, data: Option<Bytes>, then: Then) -> bool {
    match then {
        Then::Failed => {
            tx.send_reset(h2::Reason::CANCEL);
            false
        }
        Then::End => {
            let _ = tx.send_data(data.unwrap_or_default(), true);
            false
        }
        Then::Trailers(t) => {
            if let Some(d) = data {
                if tx.send_data(d, false).is_err() {
                    return false;
                }
            }
            let _ = tx.send_trailers(t);
            false
        }
        Then::Wait => match data {
            Some(d) => tx.send_data(d, false).is_ok(),
            None => true,
        },
    }
}

/// Sends a request body upstream. What has already arrived (all of a
/// unary request, in practice) is queued at once, behind the headers, so
/// they share one write; the rest, if any, follows from a task that waits
/// for flow-control capacity before reading more from the caller.
fn send_body<B>(mut body: B, mut tx: h2::SendStream<Bytes>)
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
{
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let (data, then) = take_ready(&mut body, &mut cx);
    if send_ready(&mut tx, data, then) {
        tokio::spawn(pump_body(body, tx));
    }
}

async fn pump_body<B>(mut body: B, mut tx: h2::SendStream<Bytes>)
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
{
    loop {
        // Wait for the caller's next bytes, or for the upstream to reset
        // the stream (then stop at once, even while the caller is silent).
        let next = std::future::poll_fn(|cx| {
            if tx.poll_reset(cx).is_ready() {
                return Poll::Ready(None);
            }
            match take_ready(&mut body, cx) {
                (None, Then::Wait) => Poll::Pending,
                ready => Poll::Ready(Some(ready)),
            }
        });
        let Some((data, then)) = next.await else {
            return;
        };
        // Flow control: wait for room upstream before taking more.
        if let (Some(d), Then::Wait) = (&data, &then) {
            let mut d = d.clone();
            while !d.is_empty() {
                tx.reserve_capacity(d.len());
                match std::future::poll_fn(|cx| tx.poll_capacity(cx)).await {
                    Some(Ok(0)) => tokio::task::yield_now().await,
                    Some(Ok(n)) => {
                        let part = d.split_to(n.min(d.len()));
                        if tx.send_data(part, false).is_err() {
                            return;
                        }
                    }
                    // The upstream reset the stream or the connection is gone.
                    _ => return,
                }
            }
            continue;
        }
        if !send_ready(&mut tx, data, then) {
            return;
        }
    }
}

/// An upstream answer's body: data frames (returning flow-control capacity
/// as each is handed on), then trailers. If the upstream fails mid-answer
/// (containerd dies, or resets the stream), the body ends with trailers
/// carrying the status a gRPC client would give that failure, naming the
/// socket, rather than with a bare stream reset.
pub struct UpstreamBody {
    rx: h2::RecvStream,
    path: Arc<Path>,
    data_done: bool,
    done: bool,
}

impl UpstreamBody {
    fn new(rx: h2::RecvStream, path: Arc<Path>) -> Self {
        UpstreamBody {
            rx,
            path,
            data_done: false,
            done: false,
        }
    }

    fn failed(&mut self, e: h2::Error) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        self.done = true;
        let (code, what) = match e.reason() {
            Some(reason) if e.is_remote() && !e.is_go_away() && !e.is_io() => {
                (code_for_reset(reason), format!("reset the call ({reason})"))
            }
            _ => (Code::Unavailable, "unavailable".to_owned()),
        };
        let status = tonic::Status::new(
            code,
            format!(
                "ecr-pull-proxy: upstream {} {what}: {}",
                self.path.display(),
                error_chain(&e)
            ),
        );
        let mut trailers = HeaderMap::new();
        match status.add_header(&mut trailers) {
            Ok(()) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Err(_) => Poll::Ready(Some(Err(e))),
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if !this.data_done {
            match this.rx.poll_data(cx) {
                Poll::Ready(Some(Ok(data))) => {
                    let _ = this.rx.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(e))) => return this.failed(e),
                Poll::Ready(None) => this.data_done = true,
                Poll::Pending => return Poll::Pending,
            }
        }
        let trailers = std::task::ready!(this.rx.poll_trailers(cx));
        match trailers {
            Ok(Some(t)) => {
                this.done = true;
                Poll::Ready(Some(Ok(Frame::trailers(t))))
            }
            Ok(None) => {
                this.done = true;
                Poll::Ready(None)
            }
            Err(e) => this.failed(e),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.rx.is_end_stream()
    }
}
