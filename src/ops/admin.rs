//! The operator's HTTP endpoint: `/metrics` (OpenMetrics text), `/healthz`
//! (the process answers) and `/readyz` (the CRI socket is served and the
//! upstream answers). Off unless `metrics_listen` is set.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};

use crate::config::MetricsListen;
use crate::ops::metrics::Metrics;
use crate::transport::Proxy;

/// Mode of a Unix metrics socket.
pub const METRICS_SOCKET_MODE: u32 = 0o660;

/// Most connections the endpoint serves at once. A Prometheus scraper and a
/// probe or two use it; past this, a new connection is closed at once (and
/// said so at most once per [`ADMIN_REFUSED_WARNING_INTERVAL`]), so no
/// caller can grow what the endpoint holds.
pub const MAX_ADMIN_CONNECTIONS: usize = 16;
/// How long a client has to send a request's headers, and how long an idle
/// keep-alive connection is kept: a connection that sends nothing, or
/// trickles its headers, is closed after this.
pub const ADMIN_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// At most one "connection refused" warning per this long.
pub const ADMIN_REFUSED_WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// Content type of `/metrics`.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A bound admin endpoint.
pub enum AdminListener {
    /// On TCP.
    Tcp(tokio::net::TcpListener),
    /// On a Unix socket.
    Unix(tokio::net::UnixListener),
}

/// Why the endpoint could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The TCP address could not be bound.
    #[error("cannot listen for metrics on {addr}")]
    Tcp {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The Unix socket could not be set up (same rules as the CRI socket).
    #[error("cannot listen for metrics")]
    Unix(#[source] crate::transport::socket::SocketError),
}

/// Binds `addr`.
pub async fn bind(addr: &MetricsListen) -> Result<AdminListener, AdminError> {
    match addr {
        MetricsListen::Tcp(a) => tokio::net::TcpListener::bind(a)
            .await
            .map(AdminListener::Tcp)
            .map_err(|source| AdminError::Tcp {
                addr: addr.to_string(),
                source,
            }),
        // The same care as the CRI socket: stale sockets replaced, live ones
        // and other files left alone, created with its final mode.
        MetricsListen::Unix(p) => crate::transport::socket::bind(p, METRICS_SOCKET_MODE, None)
            .map(|l| AdminListener::Unix(l.into_listener()))
            .map_err(AdminError::Unix),
    }
}

/// Serves until the process ends.
pub async fn serve(listener: AdminListener, proxy: Proxy, metrics: Arc<Metrics>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
    let mut refused: u64 = 0;
    let mut warned: Option<Instant> = None;
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(ADMIN_HEADER_READ_TIMEOUT);
    loop {
        let accepted: std::io::Result<Box<dyn IoStream>> = match &listener {
            AdminListener::Tcp(l) => l
                .accept()
                .await
                .map(|(s, _)| Box::new(s) as Box<dyn IoStream>),
            AdminListener::Unix(l) => l
                .accept()
                .await
                .map(|(s, _)| Box::new(s) as Box<dyn IoStream>),
        };
        let stream = match accepted {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    "metrics endpoint: accept failed"
                );
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refused += 1;
            if warned.is_none_or(|at| at.elapsed() >= ADMIN_REFUSED_WARNING_INTERVAL) {
                tracing::warn!(
                    limit = MAX_ADMIN_CONNECTIONS,
                    refused,
                    "metrics endpoint: connection limit reached; closing new connections until one ends"
                );
                warned = Some(Instant::now());
                refused = 0;
            }
            drop(stream);
            continue;
        };
        let (proxy, metrics, builder) = (proxy.clone(), metrics.clone(), builder.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let svc = service_fn(move |req| {
                let (proxy, metrics) = (proxy.clone(), metrics.clone());
                async move { Ok::<_, Infallible>(route(req, &proxy, &metrics).await) }
            });
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

trait IoStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> IoStream for T {}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts")
}

async fn route(req: Request<Incoming>, proxy: &Proxy, metrics: &Metrics) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    match req.uri().path() {
        "/metrics" => {
            proxy.resolver().cache().export_expiries();
            text(StatusCode::OK, OPENMETRICS, metrics.encode())
        }
        "/healthz" => text(StatusCode::OK, PLAIN, "ok\n".into()),
        "/readyz" => match proxy.upstream().probe().await {
            Ok(()) => text(StatusCode::OK, PLAIN, "ready\n".into()),
            Err(e) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                PLAIN,
                format!("not ready: {}\n", crate::error::error_chain(&e)),
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}
