//! Call handling at the HTTP/2 request level: `PullImage` (read through
//! [`crate::pull`], credentials added, sent on), the shared upstream
//! connection it is sent on, and the one place errors become gRPC statuses.
//!
//! [`crate::relay`] hands PullImage streams here and relays every other
//! call itself, frame by frame. A client connection that could not get an
//! upstream connection of its own is served by hyper's HTTP/2 server with
//! every call through [`Proxy::handle`], which forwards requests (path,
//! headers including `grpc-timeout`, body frames) and answers (headers,
//! body, trailers) as they are.
//!
//! Nothing here knows about the listening socket.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Collected, Full, Limited};
use tokio::time::Instant;
use tonic::{Code, Status};

use crate::config::{ExistingCredentials, MAX_MESSAGE_SIZE};
use crate::credentials::{Resolver, Target};
use crate::ecr::{CacheOutcome, ErrorKind, SourceError};
use crate::metrics::{Metrics, PullLabels};
use crate::pull::{self, GRPC_HEADER_LEN};

/// The one method whose request is read.
pub const PULL_IMAGE_PATH: &str = "/runtime.v1.ImageService/PullImage";
/// HTTP/2 flow-control window per stream, both sides. Large enough that a
/// multi-megabyte `ListImages` answer is not throttled by window updates.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// HTTP/2 flow-control window per connection, both sides.
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest header block accepted, both sides (containerd's error details can
/// be large).
pub const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024 * 1024;
/// How long dialling the upstream socket (connect + HTTP/2 handshake) may take.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a client connection whose upstream went away checks whether
/// the upstream answers again.
pub const UPSTREAM_RECHECK: Duration = Duration::from_secs(1);
/// The least time between two such checks when calls prompt them.
pub const RECHECK_MIN_GAP: Duration = Duration::from_millis(100);

/// Error type of bodies flowing through the proxy.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of requests and responses flowing through the proxy.
pub type ProxyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// Everything that can fail inside the proxy. [`status_for`] turns each into
/// the gRPC status the caller sees.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The upstream socket could not be reached or dropped the call.
    #[error("upstream {} unavailable", path.display())]
    Upstream {
        /// The upstream socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: BoxError,
    },
    /// No ECR token could be had for a matching image.
    #[error(
        "cannot get ECR credentials for image {image:?} (registry {registry}, region {region})"
    )]
    Credentials {
        /// The image being pulled.
        image: String,
        /// Its registry host.
        registry: String,
        /// The region asked.
        region: String,
        /// What AWS said.
        #[source]
        source: SourceError,
    },
    /// The request message is larger than the limit.
    #[error("PullImage request is larger than {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// The request body could not be read from the caller.
    #[error("reading the PullImage request from the caller")]
    RequestBody {
        /// Why.
        #[source]
        source: BoxError,
    },
    /// The upstream answer to a PullImage could not be read.
    #[error("reading the PullImage answer from upstream {}", path.display())]
    ResponseBody {
        /// The upstream socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: BoxError,
    },
}

/// Maps an error to the status the caller gets. The message carries the
/// whole cause chain, because kubelet shows only the message in pod events.
pub fn status_for(err: &ProxyError) -> Status {
    let code = match err {
        ProxyError::Upstream { .. } | ProxyError::ResponseBody { .. } => Code::Unavailable,
        ProxyError::Credentials { source, .. } => match source.kind {
            ErrorKind::AccessDenied => Code::PermissionDenied,
            ErrorKind::NoCredentials => Code::Unauthenticated,
            ErrorKind::Network | ErrorKind::Timeout | ErrorKind::Throttled => Code::Unavailable,
            ErrorKind::BadToken | ErrorKind::Other => Code::Unavailable,
        },
        ProxyError::TooLarge { .. } => Code::ResourceExhausted,
        ProxyError::RequestBody { .. } => Code::Cancelled,
    };
    Status::new(code, format!("ecr-pull-proxy: {}", error_chain(err)))
}

pub use crate::error_chain;

fn status_response(status: &Status) -> Response<ProxyBody> {
    status.clone().into_http()
}

/// Boxes a body into the proxy's body type.
pub fn boxed<B>(body: B) -> ProxyBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

// === impl Upstream ===

/// The upstream connection: dialled on first use, re-dialled after it closes
/// (containerd restarted), shared by all calls.
///
/// It speaks HTTP/2 through the `h2` crate directly rather than through
/// hyper's client: a request's headers and its body (already whole when a
/// unary call reaches us) are queued together, so they leave in one write,
/// and no task is spawned per call.
pub struct Upstream {
    path: PathBuf,
    sender: Mutex<Option<Connection>>,
    dial: tokio::sync::Mutex<()>,
    up: prometheus_client::metrics::gauge::Gauge,
}

/// One established upstream connection.
#[derive(Clone)]
struct Connection {
    send: h2::client::SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
}

impl Upstream {
    /// An upstream at `path`; nothing is dialled yet. `up` is set to 1
    /// while a connection is established.
    pub fn new(path: impl Into<PathBuf>, up: prometheus_client::metrics::gauge::Gauge) -> Self {
        Upstream {
            path: path.into(),
            sender: Mutex::new(None),
            dial: tokio::sync::Mutex::new(()),
            up,
        }
    }

    /// The upstream socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn cached(&self) -> Option<Connection> {
        let guard = self.sender.lock().expect("upstream lock");
        guard
            .as_ref()
            .filter(|c| !c.closed.load(Ordering::Acquire))
            .cloned()
    }

    async fn connection(&self) -> Result<Connection, ProxyError> {
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        let _dialling = self.dial.lock().await;
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        let conn = tokio::time::timeout(DIAL_TIMEOUT, self.dial())
            .await
            .map_err(|_| {
                self.unavailable(
                    format!("no HTTP/2 handshake within {}s", DIAL_TIMEOUT.as_secs()).into(),
                )
            })??;
        *self.sender.lock().expect("upstream lock") = Some(conn.clone());
        Ok(conn)
    }

    async fn dial(&self) -> Result<Connection, ProxyError> {
        let stream = tokio::net::UnixStream::connect(&self.path)
            .await
            .map_err(|e| self.unavailable(e.into()))?;
        let (send, conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_header_list_size(MAX_HEADER_LIST_SIZE)
            .handshake::<_, Bytes>(stream)
            .await
            .map_err(|e| self.unavailable(e.into()))?;
        let closed = Arc::new(AtomicBool::new(false));
        let (path, up, flag) = (self.path.clone(), self.up.clone(), closed.clone());
        up.set(1);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(upstream = %path.display(), error = &e as &dyn std::error::Error, "upstream connection closed");
            }
            flag.store(true, Ordering::Release);
            up.set(0);
        });
        tracing::debug!(upstream = %self.path.display(), "dialled upstream");
        Ok(Connection { send, closed })
    }

    /// Records that a connection to the upstream was established (the
    /// per-connection relays dial their own).
    pub fn mark_up(&self) {
        self.up.set(1);
    }

    /// Records that a connection to the upstream failed.
    pub fn mark_down(&self) {
        self.up.set(0);
    }

    fn unavailable(&self, source: BoxError) -> ProxyError {
        self.up.set(0);
        ProxyError::Upstream {
            path: self.path.clone(),
            source,
        }
    }

    /// Sends one request and returns the upstream's response head and body.
    pub async fn send(
        &self,
        req: Request<ProxyBody>,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        let conn = self.connection().await?;
        let mut send = conn
            .send
            .ready()
            .await
            .map_err(|e| self.unavailable(e.into()))?;
        let (parts, body) = req.into_parts();
        let end = body.is_end_stream();
        let (response, stream) = send
            .send_request(Request::from_parts(parts, ()), end)
            .map_err(|e| self.call_failed(e))?;
        if !end {
            send_body(body, stream);
        }
        let response = response.await.map_err(|e| self.call_failed(e))?;
        Ok(response.map(UpstreamBody::new))
    }

    /// A call failed. Only a failure of the connection (I/O, GOAWAY) marks
    /// the upstream down; a reset of this one stream leaves it up.
    fn call_failed(&self, e: h2::Error) -> ProxyError {
        if e.is_io() || e.is_go_away() {
            return self.unavailable(e.into());
        }
        ProxyError::Upstream {
            path: self.path.clone(),
            source: e.into(),
        }
    }

    /// Whether the upstream answers a CRI call now: an `ImageFsInfo` (the
    /// call kubelet makes first) must come back OK within [`DIAL_TIMEOUT`].
    pub async fn probe(&self) -> Result<(), ProxyError> {
        let req = Request::builder()
            .method(http::Method::POST)
            .uri("http://localhost/runtime.v1.ImageService/ImageFsInfo")
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
            .body(boxed(Full::new(pull::frame(&[]))))
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

    /// Resolves once the upstream answers a [`probe`](Self::probe) again,
    /// for a client connection that saw it go away (at `since`). A probe
    /// starts [`UPSTREAM_RECHECK`] after the last one started (or after
    /// `since`), or sooner when `nudge` is notified (a call arrived), but
    /// never closer than [`RECHECK_MIN_GAP`] to it.
    pub async fn answers_again(&self, since: Instant, nudge: &tokio::sync::Notify) {
        recheck(since, nudge, || async { self.probe().await.is_ok() }).await;
    }
}

/// Runs `probe` on the schedule [`Upstream::answers_again`] describes
/// until it answers true.
async fn recheck<F, Fut>(since: Instant, nudge: &tokio::sync::Notify, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut last = since;
    loop {
        // A nudge given while a probe runs is kept by Notify and moves the
        // next one forward.
        let nudged = async {
            nudge.notified().await;
            tokio::time::sleep_until(last + RECHECK_MIN_GAP).await;
        };
        tokio::select! {
            () = nudged => {}
            () = tokio::time::sleep_until(last + UPSTREAM_RECHECK) => {}
        }
        last = Instant::now();
        if probe().await {
            return;
        }
    }
}

/// Sends a request body upstream. The frames already received (all of a
/// unary request, in practice) are queued at once, behind the headers, so
/// they share one write; the rest, if any, follows from a task that waits
/// for flow-control capacity before reading more from the caller.
fn send_body(mut body: ProxyBody, mut tx: h2::SendStream<Bytes>) {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    loop {
        match Pin::new(&mut body).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    let end = body.is_end_stream();
                    if tx.send_data(data, end).is_err() || end {
                        return;
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        let _ = tx.send_trailers(trailers);
                    }
                    return;
                }
            },
            Poll::Ready(Some(Err(_))) => return tx.send_reset(h2::Reason::CANCEL),
            Poll::Ready(None) => {
                let _ = tx.send_data(Bytes::new(), true);
                return;
            }
            Poll::Pending => break,
        }
    }
    tokio::spawn(pump_body(body, tx));
}

async fn pump_body(mut body: ProxyBody, mut tx: h2::SendStream<Bytes>) {
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(_) => return tx.send_reset(h2::Reason::CANCEL),
        };
        let mut data = match frame.into_data() {
            Ok(d) => d,
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let _ = tx.send_trailers(trailers);
                }
                return;
            }
        };
        while !data.is_empty() {
            tx.reserve_capacity(data.len());
            match std::future::poll_fn(|cx| tx.poll_capacity(cx)).await {
                Some(Ok(0)) => tokio::task::yield_now().await,
                Some(Ok(n)) => {
                    let part = data.split_to(n.min(data.len()));
                    if tx.send_data(part, false).is_err() {
                        return;
                    }
                }
                // The upstream reset the stream or the connection is gone.
                _ => return,
            }
        }
    }
    let _ = tx.send_data(Bytes::new(), true);
}

/// An upstream answer's body: data frames (returning flow-control capacity
/// as each is handed on), then trailers.
pub struct UpstreamBody {
    rx: h2::RecvStream,
    data_done: bool,
    done: bool,
}

impl UpstreamBody {
    fn new(rx: h2::RecvStream) -> Self {
        UpstreamBody {
            rx,
            data_done: false,
            done: false,
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
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => this.data_done = true,
                Poll::Pending => return Poll::Pending,
            }
        }
        let trailers = std::task::ready!(this.rx.poll_trailers(cx));
        this.done = true;
        match trailers {
            Ok(Some(t)) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.rx.is_end_stream()
    }
}

// === impl Proxy ===

/// How the credentials of a forwarded pull were decided, for logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialSourceKind {
    /// The proxy added an ECR token.
    Injected,
    /// The caller's own credentials were forwarded.
    Caller,
    /// The caller's credentials were refused and the ECR token was used.
    Fallback,
    /// The image matched no pattern; forwarded as it was.
    None,
}

impl CredentialSourceKind {
    /// Lower-case name, for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Injected => "injected",
            Self::Caller => "caller",
            Self::Fallback => "fallback",
            Self::None => "none",
        }
    }
}

/// The proxy service. Cheap to clone.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

struct Inner {
    upstream: Upstream,
    /// Swapped whole on reload; a call keeps the one it started with.
    resolver: std::sync::RwLock<Arc<Resolver>>,
    metrics: Arc<Metrics>,
}

impl Proxy {
    /// A proxy forwarding to `upstream`, adding credentials from
    /// `resolver`, counting into `metrics`.
    pub fn new(upstream: Upstream, resolver: Resolver, metrics: Arc<Metrics>) -> Self {
        Proxy {
            inner: Arc::new(Inner {
                upstream,
                resolver: std::sync::RwLock::new(Arc::new(resolver)),
                metrics,
            }),
        }
    }

    /// The upstream.
    pub fn upstream(&self) -> &Upstream {
        &self.inner.upstream
    }

    /// The resolver in force now.
    pub fn resolver(&self) -> Arc<Resolver> {
        self.inner.resolver.read().expect("resolver lock").clone()
    }

    /// Puts `resolver` in force for the calls that start from now on.
    pub fn replace_resolver(&self, resolver: Resolver) {
        *self.inner.resolver.write().expect("resolver lock") = Arc::new(resolver);
    }

    /// The metrics calls are counted into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Handles one call. Never fails: errors become gRPC statuses.
    pub async fn handle(&self, req: Request<ProxyBody>) -> Response<ProxyBody> {
        let started = Instant::now();
        let method: Arc<str> = req.uri().path().into();
        let (response, pull) = if &*method == PULL_IMAGE_PATH {
            self.pull_image(req).await
        } else {
            let response = match self.forward(req).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(method = %method, error = %error_chain(&e), "call failed");
                    status_response(&status_for(&e))
                }
            };
            (response, None)
        };
        observe(response, method, started, pull, self.inner.metrics.clone())
    }

    async fn forward(&self, req: Request<ProxyBody>) -> Result<Response<ProxyBody>, ProxyError> {
        Ok(self.send_upstream(req).await?.map(boxed))
    }

    /// Sends to the upstream as it is, but with the absolute URI hyper's
    /// HTTP/2 client needs.
    async fn send_upstream(
        &self,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        ensure_absolute_uri(&mut req);
        self.inner.upstream.send(req).await
    }

    /// Reads the request, decides on credentials and forwards it. Returns
    /// the answer and, for a readable request, what to log once the answer
    /// has ended.
    async fn pull_image(
        &self,
        req: Request<ProxyBody>,
    ) -> (Response<ProxyBody>, Option<PullRecord>) {
        let (parts, body) = req.into_parts();
        let (body, request_trailers) =
            match read_limited(body, MAX_MESSAGE_SIZE + GRPC_HEADER_LEN).await {
                Ok(v) => v,
                Err(err) => {
                    tracing::warn!(error = %error_chain(&err), "PullImage refused");
                    return (status_response(&status_for(&err)), None);
                }
            };
        let parsed = pull::unframe(&body).and_then(|m| pull::read(m).map(|info| (m, info)));
        let (message, info) = match parsed {
            Ok(v) => v,
            Err(e) => {
                // Not ours to judge: containerd answers malformed requests
                // with its own error.
                tracing::debug!(error = %e, "PullImage request not readable; forwarding it unchanged");
                return (self.send_bytes(&parts, body, request_trailers).await, None);
            }
        };
        let resolver = self.resolver();
        let Some(target) = resolver.target(&info.image) else {
            let record = PullRecord::new(&info.image, None, CredentialSourceKind::None, None);
            return (
                self.send_bytes(&parts, body, request_trailers).await,
                Some(record),
            );
        };
        let policy = resolver.existing_credentials();
        if info.has_credentials && policy == ExistingCredentials::Keep {
            let record = PullRecord::new(
                &info.image,
                Some(&target),
                CredentialSourceKind::Caller,
                None,
            );
            return (
                self.send_bytes(&parts, body, request_trailers).await,
                Some(record),
            );
        }
        if info.has_credentials && policy == ExistingCredentials::Fallback {
            let first = self
                .send_bytes_buffered(&parts, body.clone(), request_trailers.clone())
                .await;
            let refused = match &first {
                Ok((head, collected)) => is_registry_refusal(&head.headers, collected.trailers()),
                Err(_) => false,
            };
            if !refused {
                let resp = match first {
                    Ok((head, collected)) => Response::from_parts(head, boxed(collected)),
                    Err(e) => status_response(&status_for(&e)),
                };
                let record = PullRecord::new(
                    &info.image,
                    Some(&target),
                    CredentialSourceKind::Caller,
                    None,
                );
                return (resp, Some(record));
            }
            tracing::info!(
                image = %info.image,
                registry = %target.image_host,
                "registry refused the caller's credentials; retrying once with the ECR token"
            );
            let kind = CredentialSourceKind::Fallback;
            return self
                .pull_with_token(&resolver, &parts, message, &info.image, &target, kind)
                .await;
        }
        // No credentials, or policy `replace`.
        let kind = CredentialSourceKind::Injected;
        self.pull_with_token(&resolver, &parts, message, &info.image, &target, kind)
            .await
    }

    async fn pull_with_token(
        &self,
        resolver: &Resolver,
        parts: &http::request::Parts,
        message: &[u8],
        image: &str,
        target: &Target,
        kind: CredentialSourceKind,
    ) -> (Response<ProxyBody>, Option<PullRecord>) {
        let (credentials, outcome) = match resolver.credentials(target).await {
            Ok(v) => v,
            Err(source) => {
                let err = ProxyError::Credentials {
                    image: image.to_owned(),
                    registry: target.image_host.clone(),
                    region: target.key.region.clone(),
                    source,
                };
                if target.anonymous_on_failure {
                    tracing::warn!(
                        image = %image,
                        registry = %target.image_host,
                        error = %error_chain(&err),
                        "no token; forwarding the pull without one (anonymous unless the caller sent credentials)"
                    );
                    let record =
                        PullRecord::new(image, Some(target), CredentialSourceKind::None, None);
                    return (
                        self.send_bytes(parts, pull::frame(message), None).await,
                        Some(record),
                    );
                }
                tracing::warn!(
                    image = %image,
                    registry = %target.image_host,
                    key = %target.key,
                    error = %error_chain(&err),
                    "no ECR token for this pull"
                );
                let record = PullRecord::new(image, Some(target), kind, None);
                return (status_response(&status_for(&err)), Some(record));
            }
        };
        let record = PullRecord::new(image, Some(target), kind, Some(outcome));
        let body = match pull::with_credentials(message, &credentials) {
            Ok(m) => pull::frame(&m),
            Err(e) => {
                // `read` accepted these bytes, and the rewrite walks them the
                // same way; if that ever fails, forward unchanged, never panic.
                tracing::error!(error = %e, "PullImage rewrite failed; forwarding unchanged");
                pull::frame(message)
            }
        };
        (self.send_bytes(parts, body, None).await, Some(record))
    }

    /// Rebuilds a request from its head and a (possibly rewritten) body. A
    /// `content-length` the caller sent is corrected; none is added when the
    /// caller sent none, so the upstream sees the same headers.
    fn request_from(
        parts: &http::request::Parts,
        body: Bytes,
        trailers: Option<HeaderMap>,
    ) -> Request<ProxyBody> {
        let mut headers = parts.headers.clone();
        if headers.contains_key(http::header::CONTENT_LENGTH) {
            headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        let full = Full::new(body);
        let body = match trailers {
            None => boxed(NoLength(full)),
            Some(t) => boxed(NoLength(
                full.with_trailers(std::future::ready(Some(Ok(t)))),
            )),
        };
        let mut req = Request::builder()
            .method(parts.method.clone())
            .uri(parts.uri.clone())
            .version(parts.version)
            .body(body)
            .expect("parts of a valid request");
        *req.headers_mut() = headers;
        req
    }

    async fn send_bytes(
        &self,
        parts: &http::request::Parts,
        body: Bytes,
        trailers: Option<HeaderMap>,
    ) -> Response<ProxyBody> {
        match self
            .forward(Self::request_from(parts, body, trailers))
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(method = PULL_IMAGE_PATH, error = %error_chain(&e), "call failed");
                status_response(&status_for(&e))
            }
        }
    }

    /// Sends and reads the whole answer, so that it can be inspected before
    /// the caller sees it (the `fallback` policy).
    async fn send_bytes_buffered(
        &self,
        parts: &http::request::Parts,
        body: Bytes,
        trailers: Option<HeaderMap>,
    ) -> Result<(http::response::Parts, Collected<Bytes>), ProxyError> {
        let resp = self
            .send_upstream(Self::request_from(parts, body, trailers))
            .await?;
        let (head, body) = resp.into_parts();
        let collected = Limited::new(body, MAX_MESSAGE_SIZE + GRPC_HEADER_LEN)
            .collect()
            .await
            .map_err(|source| ProxyError::ResponseBody {
                path: self.inner.upstream.path().to_owned(),
                source,
            })?;
        Ok((head, collected))
    }
}

/// Reads a request body of at most `limit` bytes, and its trailers.
async fn read_limited(
    mut body: ProxyBody,
    limit: usize,
) -> Result<(Bytes, Option<HeaderMap>), ProxyError> {
    let mut data = bytes::BytesMut::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|source| ProxyError::RequestBody { source })?;
        match frame.into_data() {
            Ok(d) => {
                if data.len() + d.len() > limit {
                    return Err(ProxyError::TooLarge {
                        limit: MAX_MESSAGE_SIZE,
                    });
                }
                data.extend_from_slice(&d);
            }
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    Ok((data.freeze(), trailers))
}

/// The final status of a gRPC answer: in the trailers, or in the headers of
/// a trailers-only answer.
fn final_status(headers: &HeaderMap, trailers: Option<&HeaderMap>) -> Option<Status> {
    trailers
        .and_then(Status::from_header_map)
        .or_else(|| Status::from_header_map(headers))
}

/// Whether containerd's answer says the registry refused the credentials.
/// containerd reports this inside an `Unknown` status with wording that
/// differs across versions and code paths.
pub fn is_registry_refusal(headers: &HeaderMap, trailers: Option<&HeaderMap>) -> bool {
    let Some(status) = final_status(headers, trailers) else {
        return false;
    };
    if !matches!(
        status.code(),
        Code::Unknown | Code::Unauthenticated | Code::PermissionDenied
    ) {
        return false;
    }
    let message = status.message().to_ascii_lowercase();
    REFUSAL_PHRASES.iter().any(|p| message.contains(p))
}

/// How containerd words a registry's refusal, lower-cased.
pub const REFUSAL_PHRASES: &[&str] = &[
    "401 unauthorized",
    "403 forbidden",
    "authorization failed",
    "pull access denied",
    "no basic auth credentials",
];

/// hyper's HTTP/2 client needs scheme and authority; kubelet sends
/// `localhost`, and a caller that sent none gets the same.
fn ensure_absolute_uri(req: &mut Request<ProxyBody>) {
    let uri = req.uri();
    if uri.scheme().is_some() && uri.authority().is_some() {
        return;
    }
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    if let Ok(u) = http::Uri::builder()
        .scheme("http")
        .authority("localhost")
        .path_and_query(path)
        .build()
    {
        *req.uri_mut() = u;
    }
}

fn grpc_status_of(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("grpc-status")
        .and_then(|v: &HeaderValue| v.to_str().ok())
}

/// What the per-pull log line says, filled in as the pull is handled and
/// written when the answer ends (the final status is in the trailers).
pub struct PullRecord {
    image: String,
    registry: String,
    credentials: CredentialSourceKind,
    cache: Option<CacheOutcome>,
}

impl PullRecord {
    fn new(
        image: &str,
        target: Option<&Target>,
        credentials: CredentialSourceKind,
        cache: Option<CacheOutcome>,
    ) -> Self {
        PullRecord {
            image: image.to_owned(),
            registry: target.map(|t| t.image_host.clone()).unwrap_or_default(),
            credentials,
            cache,
        }
    }
}

/// A body that does not announce its length, so that hyper adds no
/// `content-length` the caller did not send.
struct NoLength<B>(B);

impl<B: Body + Unpin> Body for NoLength<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.0).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }
}

// === per-call observation ===

/// Wraps the response body to log when the call ends: one debug line per
/// call (method, final gRPC status, duration) and, for pulls, one info line.
fn observe(
    resp: Response<ProxyBody>,
    method: Arc<str>,
    started: Instant,
    pull: Option<PullRecord>,
    metrics: Arc<Metrics>,
) -> Response<ProxyBody> {
    let status = grpc_status_of(resp.headers()).map(str::to_owned);
    resp.map(|body| {
        ObservedBody {
            inner: body,
            method,
            started,
            status,
            pull,
            metrics,
            done: false,
        }
        .boxed_unsync()
    })
}

struct ObservedBody {
    inner: ProxyBody,
    method: Arc<str>,
    started: Instant,
    status: Option<String>,
    pull: Option<PullRecord>,
    metrics: Arc<Metrics>,
    done: bool,
}

impl ObservedBody {
    fn finish(&mut self, outcome: &str) {
        if self.done {
            return;
        }
        self.done = true;
        let grpc_status = self.status.as_deref().unwrap_or("-");
        let elapsed = self.started.elapsed();
        let cancelled = outcome == "cancelled";
        self.metrics
            .observe_call(&self.method, self.status.as_deref(), cancelled, elapsed);
        tracing::debug!(
            method = %self.method,
            grpc_status,
            outcome,
            duration_us = elapsed.as_micros() as u64,
            "call"
        );
        if let Some(p) = &self.pull {
            let result = match (outcome, grpc_status) {
                ("complete", "0") => "ok",
                ("complete", _) => "error",
                ("cancelled", _) => "cancelled",
                _ => "error",
            };
            // Only hosts that matched a configured pattern become label
            // values, so a client cannot grow the label set at will.
            let registry = match p.credentials {
                CredentialSourceKind::None => "other".to_owned(),
                _ => p.registry.clone(),
            };
            self.metrics
                .pulls
                .get_or_create(&PullLabels {
                    registry,
                    result,
                    credentials: p.credentials.as_str(),
                })
                .inc();
            tracing::info!(
                image = %p.image,
                registry = %p.registry,
                credentials = p.credentials.as_str(),
                cache = p.cache.map(CacheOutcome::as_str).unwrap_or("-"),
                duration_ms = elapsed.as_millis() as u64,
                result,
                grpc_status,
                "pull"
            );
        }
    }
}

impl Body for ObservedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(t) = frame.trailers_ref() {
                    this.status = grpc_status_of(t).map(str::to_owned);
                }
            }
            Poll::Ready(Some(Err(_))) => this.finish("upstream-error"),
            Poll::Ready(None) => this.finish("complete"),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        let outcome = if self.inner.is_end_stream() {
            "complete"
        } else {
            "cancelled"
        };
        self.finish(outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trailers(code: i32, message: &str) -> HeaderMap {
        status_response(&Status::new(Code::from(code), message))
            .headers()
            .clone()
    }

    /// Probes `answers` in turn and records when each one started,
    /// relative to `since`.
    async fn probes_of(
        since: Instant,
        nudge: &tokio::sync::Notify,
        answers: &[bool],
    ) -> Vec<Duration> {
        let started = Mutex::new(Vec::new());
        let mut answers = answers.iter();
        recheck(since, nudge, || {
            started.lock().unwrap().push(since.elapsed());
            let up = *answers.next().expect("no more probes than answers");
            async move {
                tokio::time::sleep(Duration::from_millis(30)).await;
                up
            }
        })
        .await;
        started.into_inner().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn upstream_is_probed_every_recheck_until_it_answers() {
        let nudge = tokio::sync::Notify::new();
        let probes = probes_of(Instant::now(), &nudge, &[false, false, true]).await;
        assert_eq!(
            probes,
            [1, 2, 3].map(|n| UPSTREAM_RECHECK * n),
            "one probe per UPSTREAM_RECHECK, counted from each probe's start"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_brings_the_next_probe_forward_but_not_closer_than_the_gap() {
        let nudge = std::sync::Arc::new(tokio::sync::Notify::new());
        let since = Instant::now();
        let calls = {
            let nudge = nudge.clone();
            tokio::spawn(async move {
                // A call at once: the first probe waits out the gap only.
                nudge.notify_one();
                // A call while that probe runs: the next one follows a gap
                // after the first started.
                tokio::time::sleep(RECHECK_MIN_GAP + Duration::from_millis(10)).await;
                nudge.notify_one();
                // No call: the third waits the full recheck.
            })
        };
        let probes = probes_of(since, &nudge, &[false, false, true]).await;
        calls.await.unwrap();
        assert_eq!(
            probes,
            [
                RECHECK_MIN_GAP,
                RECHECK_MIN_GAP * 2,
                RECHECK_MIN_GAP * 2 + UPSTREAM_RECHECK
            ]
        );
    }

    #[test]
    fn registry_refusals_are_recognised_in_every_wording() {
        let refusals = [
            "failed to pull and unpack image \"x\": failed to resolve reference \"x\": unexpected status from HEAD request to http://r/v2/app/manifests/v1: 401 Unauthorized",
            "failed to resolve reference: pulling from host r failed with status code [manifests v1]: 403 Forbidden",
            "failed to fetch anonymous token: authorization failed",
            "pull access denied, repository does not exist or may require authorization",
            "no basic auth credentials",
        ];
        for m in refusals {
            assert!(
                is_registry_refusal(&HeaderMap::new(), Some(&trailers(2, m))),
                "{m}"
            );
        }
    }

    #[test]
    fn other_failures_are_not_refusals() {
        let h = HeaderMap::new();
        assert!(!is_registry_refusal(
            &h,
            Some(&trailers(2, "failed to resolve reference: not found"))
        ));
        assert!(!is_registry_refusal(
            &h,
            Some(&trailers(2, "dial tcp: connection refused"))
        ));
        assert!(!is_registry_refusal(
            &h,
            Some(&trailers(14, "401 Unauthorized"))
        ));
        assert!(!is_registry_refusal(&h, Some(&trailers(0, ""))));
        assert!(!is_registry_refusal(&h, None));
        // Trailers-only answers carry the status in the headers.
        assert!(is_registry_refusal(&trailers(2, "401 Unauthorized"), None));
    }

    #[test]
    fn credential_errors_map_to_codes_and_name_everything() {
        let err = |kind| ProxyError::Credentials {
            image: "123456789012.dkr.ecr.us-east-1.amazonaws.com/app:v1".into(),
            registry: "123456789012.dkr.ecr.us-east-1.amazonaws.com".into(),
            region: "us-east-1".into(),
            source: SourceError::new(kind, Some("AccessDeniedException".into()), "not allowed"),
        };
        let s = status_for(&err(ErrorKind::AccessDenied));
        assert_eq!(s.code(), Code::PermissionDenied);
        for needle in [
            "123456789012.dkr.ecr.us-east-1.amazonaws.com/app:v1",
            "us-east-1",
            "AccessDeniedException",
            "not allowed",
        ] {
            assert!(s.message().contains(needle), "{}", s.message());
        }
        for kind in [ErrorKind::Network, ErrorKind::Timeout, ErrorKind::Throttled] {
            assert_eq!(status_for(&err(kind)).code(), Code::Unavailable);
        }
        assert_eq!(
            status_for(&err(ErrorKind::NoCredentials)).code(),
            Code::Unauthenticated
        );
        assert_eq!(
            status_for(&ProxyError::TooLarge { limit: 1 }).code(),
            Code::ResourceExhausted
        );
    }
}
