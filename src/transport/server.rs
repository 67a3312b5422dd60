//! hyper's HTTP/2 server on the listening socket: the accept loop, the
//! limits that keep one careless or hostile local client from hurting the
//! others, and the drain on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::UnixStream;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use super::connections::{Activity, CallGuard, Peer, Registered, Registry, Room};
use super::socket::Listening;
use super::Proxy;
use crate::error::error_chain;

// What the daemon may hold for one client connection, whatever the caller
// sends or fails to read, is bounded by these limits (README "Memory
// budget" adds them up): what h2 buffers of its requests
// ([`CALLER_CONNECTION_WINDOW`]), of its answers
// ([`MAX_SEND_BUFFER_PER_STREAM`] per stream, [`MAX_CONCURRENT_STREAMS`]
// streams, and its own upstream connection's window,
// [`super::upstream::UPSTREAM_CONNECTION_WINDOW`]), and its header blocks;
// `PullImage` messages being read have a budget of their own
// ([`crate::budget`]). [`MAX_CONNECTIONS`] bounds the sum.

/// Most client connections served at once. kubelet keeps one; crictl opens
/// one per command; a node has a few more callers at most. At the limit, a
/// new connection is served in place of the longest-idle connection of the
/// process that holds the most ([`super::connections`]); only when every
/// connection has a call in flight does it wait (in the socket's backlog).
pub const MAX_CONNECTIONS: usize = 32;
/// Most concurrent calls per client connection. kubelet makes a handful at
/// a time on one connection (pulls are serialised by default); a caller
/// that opens more waits for a free slot (gRPC clients honour the limit),
/// and h2 refuses streams beyond it.
pub const MAX_CONCURRENT_STREAMS: u32 = 64;
/// HTTP/2 receive window per stream towards callers: what a caller may
/// send of a request before the proxy reads it. CRI requests are a few
/// KiB; larger ones still flow, at the pace the proxy reads them.
pub const CALLER_STREAM_WINDOW: u32 = 1024 * 1024;
/// HTTP/2 receive window per client connection: the most request data h2
/// holds for one connection.
pub const CALLER_CONNECTION_WINDOW: u32 = 1024 * 1024;
/// Largest request header block accepted from a caller (hyper's default,
/// named here because the memory budget counts it once per call). CRI
/// callers send a few hundred bytes; h2 refuses a header block (or a flood
/// of CONTINUATION frames) that grows past this.
pub const MAX_REQUEST_HEADER_LIST_SIZE: u32 = 16 * 1024;
/// Streams a caller may reset before the server has accepted them, before
/// h2 closes the connection with `ENHANCE_YOUR_CALM` (the "rapid reset"
/// defence). h2's default, named because the abuse tests rely on it.
pub const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// Streams the server may reset for a caller's protocol errors before h2
/// closes the connection with `ENHANCE_YOUR_CALM` (hyper's default).
pub const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;
/// Answer bytes h2 buffers per stream for a caller that reads slowly
/// (hyper's default is 400 KiB); beyond it the answer waits in the
/// upstream connection's window (flow control), nothing grows. Two HTTP/2
/// frames: a caller that reads gets its answer at full speed.
pub const MAX_SEND_BUFFER_PER_STREAM: usize = 32 * 1024;
/// How long accepting pauses after an accept error (EMFILE and friends).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// At most one "connection limit reached" warning per this long: a daemon
/// held at the limit waits again each time a freed slot is taken, and a
/// client that reconnects in a loop must not flood the log. The warning
/// says how many times the limit was reached since the last one
/// (`connections_open` shows it without pause).
pub const CONNECTION_LIMIT_WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// The HTTP/2 server settings every client connection gets.
fn builder() -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .initial_stream_window_size(CALLER_STREAM_WINDOW)
        .initial_connection_window_size(CALLER_CONNECTION_WINDOW)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_REQUEST_HEADER_LIST_SIZE)
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(MAX_LOCAL_ERROR_RESET_STREAMS)
        .max_send_buf_size(MAX_SEND_BUFFER_PER_STREAM)
        // Byte for byte: containerd's answers reach the caller without a
        // `date` header of ours.
        .auto_date_header(false);
    builder
}

/// Accepts connections and serves each call with `proxy` until `shutdown`
/// resolves; then stops accepting, removes the socket, asks every client to
/// finish (GOAWAY) and lets in-flight calls run for at most `grace`.
pub async fn serve(
    listening: Listening,
    proxy: Proxy,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let builder = builder();
    let (drain, draining) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let registry = Arc::new(Registry::new());
    let mut limit_warned: Option<Instant> = None;
    let mut times_reached: u64 = 0;
    loop {
        let stream = tokio::select! {
            accepted = listening.listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::error!(error = &e as &dyn std::error::Error, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let peer = Peer::of(&stream);
        // A free slot, or one made free: a new connection is not the one
        // that waits while another sits idle.
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                times_reached += 1;
                let room = registry.make_room();
                if limit_warned.is_none_or(|at| at.elapsed() >= CONNECTION_LIMIT_WARNING_INTERVAL) {
                    match room {
                        Room::Closing {
                            peer: closed,
                            idle,
                            held,
                        } => tracing::warn!(
                            limit = MAX_CONNECTIONS,
                            times_reached,
                            closed = %closed,
                            closed_holds = held,
                            idle_s = idle.as_secs(),
                            new = %peer,
                            "client connection limit reached; closing the longest-idle connection of the process that holds the most"
                        ),
                        Room::NoneIdle => tracing::warn!(
                            limit = MAX_CONNECTIONS,
                            times_reached,
                            new = %peer,
                            "client connection limit reached and every connection has a call in flight; the new connection waits until one closes"
                        ),
                    }
                    limit_warned = Some(Instant::now());
                    times_reached = 0;
                } else {
                    tracing::debug!(room = ?room, new = %peer, "client connection limit reached");
                }
                tokio::select! {
                    slot = slots.clone().acquire_owned() => slot.expect("never closed"),
                    () = &mut shutdown => break,
                }
            }
        };
        proxy.metrics().connections.inc();
        tokio::spawn(serve_connection(
            stream,
            proxy.clone(),
            builder.clone(),
            draining.clone(),
            slot,
            registry.register(peer),
        ));
    }
    listening.remove();
    drop(listening);
    drop(draining);
    tracing::info!(
        grace_s = grace.as_secs(),
        "stopped accepting; draining in-flight calls"
    );
    // Every connection task holds a receiver: all gone means all drained.
    let _ = drain.send(true);
    match tokio::time::timeout(grace, drain.closed()).await {
        Ok(()) => tracing::info!("drained"),
        Err(_) => tracing::warn!("grace period over; cutting the calls still in flight"),
    }
}

/// Serves one client connection until the client leaves, or until
/// `draining` turns true and its calls in flight have finished.
async fn serve_connection(
    stream: UnixStream,
    proxy: Proxy,
    builder: hyper::server::conn::http2::Builder<TokioExecutor>,
    mut draining: watch::Receiver<bool>,
    _slot: OwnedSemaphorePermit,
    registered: Registered,
) {
    let open = proxy.metrics().connections_open.clone();
    open.inc();
    let _open = scopeguard(move || {
        open.dec();
    });
    let first = std::sync::Once::new();
    let client = Arc::new(proxy.client_connection());
    let activity: Arc<Activity> = registered.activity().clone();
    let calls = activity.clone();
    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        first.call_once(|| log_authority(&req));
        let (proxy, client) = (proxy.clone(), client.clone());
        // Active until the answer has been sent in full (or dropped).
        let call = calls.call();
        async move {
            let resp = proxy.handle_for(&client, req).await;
            Ok::<_, Infallible>(resp.map(|body| Active { body, _call: call }))
        }
    });
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    let mut conn = std::pin::pin!(conn);
    let mut closing = *draining.borrow_and_update();
    if closing {
        conn.as_mut().graceful_shutdown();
    }
    let result = loop {
        tokio::select! {
            result = conn.as_mut() => break result,
            _ = draining.changed(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            () = activity.closing(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    };
    if let Err(e) = result {
        if is_disconnect(&e) {
            tracing::debug!(error = %error_chain(&e), "client went away");
        } else {
            tracing::warn!(error = %error_chain(&e), "closed a client connection");
        }
    }
}

/// An answer's body, with its call counted active until it is dropped.
struct Active<B> {
    body: B,
    _call: CallGuard,
}

impl<B: http_body::Body + Unpin> http_body::Body for Active<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Runs `f` when dropped.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// Most bytes of a caller's `:authority` a log line shows.
const AUTHORITY_LOG_LIMIT: usize = 128;

/// Logs, once per connection (at its first call), which `:authority` form
/// the caller uses: kubelet and crictl >= 1.31 send `localhost`; older
/// ones, grpcio and grpc-java the socket path, raw or percent-encoded
/// (README "Which callers work"). Such values reach us only through the patched h2
/// (third_party/h2-authority.patch), as `UnparsedAuthority`.
fn log_authority<B>(req: &http::Request<B>) {
    let (form, value): (&str, &[u8]) = match (
        req.uri().authority(),
        req.extensions().get::<h2::ext::UnparsedAuthority>(),
    ) {
        (Some(a), _) if a.as_str() == "localhost" => ("localhost", b"localhost"),
        (Some(a), _) => ("host", a.as_str().as_bytes()),
        (None, Some(h2::ext::UnparsedAuthority(raw))) => (authority_form(raw), raw),
        (None, None) => ("none", b""),
    };
    let shown = &value[..value.len().min(AUTHORITY_LOG_LIMIT)];
    tracing::debug!(
        authority_form = form,
        authority = %shown.escape_ascii(),
        authority_len = value.len(),
        "new client connection"
    );
}

/// The form of an `:authority` that is no URI authority.
fn authority_form(raw: &[u8]) -> &'static str {
    if raw.is_empty() {
        "empty"
    } else if raw.starts_with(b"/") {
        "socket-path"
    } else if raw.windows(3).any(|w| w.eq_ignore_ascii_case(b"%2f")) {
        // grpc-go: `%2Frun%2F...`; grpcio: `run%2F...` (the path after
        // `unix:///`).
        "percent-encoded-path"
    } else {
        "other"
    }
}

/// A client that hangs up (a readiness probe that connects and leaves, a
/// killed kubelet) is normal; only protocol errors are worth a warning.
fn is_disconnect(err: &hyper::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::UnexpectedEof
            );
        }
        cur = e.source();
    }
    false
}
