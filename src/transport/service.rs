//! The service every call goes through: `PullImage` to [`crate::pull`],
//! every other call to the upstream as it is (method, path, every header,
//! the body streamed as it arrives; the answer's headers, body and trailers
//! back as they arrive). The answer body is wrapped once, to count the call
//! and write its log lines when it ends.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::{Body, Frame};
use tokio::time::Instant;

use super::Upstream;
use crate::budget::{Budget, ConnectionBudget};
use crate::call::{boxed, failed, ProxyBody, PULL_IMAGE_PATH};
use crate::error::BoxError;
use crate::ops::metrics::Metrics;
use crate::pull::credentials::Resolver;
use crate::pull::PullRecord;

/// The proxy service. Cheap to clone.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

struct Inner {
    /// The daemon's own upstream connection, for its own calls.
    upstream: Arc<Upstream>,
    budget: Budget,
    /// The daemon's own share of the budget.
    own_budget: ConnectionBudget,
    /// Swapped whole on reload; a call keeps the one it started with.
    resolver: std::sync::RwLock<Arc<Resolver>>,
    metrics: Arc<Metrics>,
}

impl Proxy {
    /// A proxy forwarding to `upstream`, adding credentials from
    /// `resolver`, counting into `metrics`.
    pub fn new(upstream: Arc<Upstream>, resolver: Resolver, metrics: Arc<Metrics>) -> Self {
        let budget = Budget::default();
        Proxy {
            inner: Arc::new(Inner {
                upstream,
                own_budget: budget.connection(),
                budget,
                resolver: std::sync::RwLock::new(Arc::new(resolver)),
                metrics,
            }),
        }
    }

    /// The daemon's own upstream connection (the sandbox keeper's, and
    /// `/readyz`'s).
    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.inner.upstream
    }

    /// What a new client connection gets: an upstream connection of its own
    /// (dialled at its first call) and its share of the budget.
    pub fn client_connection(&self) -> ClientConnection {
        ClientConnection {
            upstream: self.inner.upstream.sibling(),
            budget: self.inner.budget.connection(),
        }
    }

    /// The budget for `PullImage` messages being read.
    pub fn budget(&self) -> &Budget {
        &self.inner.budget
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

    /// Handles one call of the daemon's own, on its own upstream
    /// connection.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<ObservedBody>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        self.handle_on(
            self.inner.upstream.clone(),
            self.inner.own_budget.clone(),
            req,
        )
        .await
    }

    /// Handles one call of a client connection. Never fails: errors become
    /// gRPC statuses.
    pub async fn handle_for<B>(
        &self,
        conn: &ClientConnection,
        req: Request<B>,
    ) -> Response<ObservedBody>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        self.handle_on(conn.upstream.clone(), conn.budget.clone(), req)
            .await
    }

    async fn handle_on<B>(
        &self,
        upstream: Arc<Upstream>,
        budget: ConnectionBudget,
        mut req: Request<B>,
    ) -> Response<ObservedBody>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        ensure_absolute_uri(&mut req);
        // Counts and logs the call even if the caller cancels it before
        // any answer exists (a pod deleted while its image pulls).
        let mut observer = Observer {
            method: req.uri().path().into(),
            started: Instant::now(),
            status: None,
            pull: None,
            metrics: self.inner.metrics.clone(),
            done: false,
        };
        let response = if &*observer.method == PULL_IMAGE_PATH {
            let resolver = self.resolver();
            crate::pull::pull_image(upstream, &budget, &resolver, req, &mut observer.pull).await
        } else {
            match upstream.send(req).await {
                Ok(r) => r.map(boxed),
                Err(e) => failed(&observer.method, &e),
            }
        };
        observer.status = grpc_status_of(response.headers()).map(str::to_owned);
        response.map(|inner| ObservedBody { inner, observer })
    }
}

/// What one client connection has of its own: its upstream connection
/// (so that a caller that stops reading stalls only itself) and its share
/// of the budget.
pub struct ClientConnection {
    upstream: Arc<Upstream>,
    budget: ConnectionBudget,
}

/// h2's client needs a scheme and an authority; kubelet sends `localhost`,
/// gRPC C-core the socket path, and a caller that sent none gets
/// `localhost`. Only the URI's form changes; `:authority` as sent is kept.
fn ensure_absolute_uri<B>(req: &mut Request<B>) {
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

// === per-call observation ===

/// What is known of a call while it runs; counted and logged once, when it
/// ends: one debug line per call (method, final gRPC status, duration) and,
/// for pulls, the pull line.
struct Observer {
    method: Arc<str>,
    started: Instant,
    status: Option<String>,
    pull: Option<PullRecord>,
    metrics: Arc<Metrics>,
    done: bool,
}

impl Observer {
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
            p.finish(&self.metrics, outcome, grpc_status, elapsed);
        }
    }
}

impl Drop for Observer {
    /// Dropped before an answer existed: the caller cancelled the call.
    fn drop(&mut self) {
        self.finish("cancelled");
    }
}

/// An answer body that counts and logs its call when it ends, however it
/// ends (complete, failed, or dropped because the caller went away).
pub struct ObservedBody {
    inner: ProxyBody,
    observer: Observer,
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
                    this.observer.status = grpc_status_of(t).map(str::to_owned);
                }
            }
            Poll::Ready(Some(Err(_))) => this.observer.finish("upstream-error"),
            Poll::Ready(None) => this.observer.finish("complete"),
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
        self.observer.finish(outcome);
    }
}
