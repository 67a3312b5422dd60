//! The operator's HTTP endpoint: `/metrics` (OpenMetrics text), `/healthz`
//! (the process answers) and `/readyz` (the CRI socket is served and the
//! upstream answers). Off unless `metrics_listen` is set.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use crate::config::MetricsListen;
use crate::metrics::Metrics;
use crate::proxy::Proxy;

/// Content type of `/metrics`.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A bound admin endpoint.
pub enum AdminListener {
    /// On TCP.
    Tcp(tokio::net::TcpListener),
    /// On a Unix socket (mode 0660, like the CRI socket).
    Unix(tokio::net::UnixListener, std::path::PathBuf),
}

/// Why the endpoint could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for metrics on {addr}")]
pub struct AdminError {
    addr: String,
    #[source]
    source: std::io::Error,
}

/// Binds `addr`.
pub async fn bind(addr: &MetricsListen) -> Result<AdminListener, AdminError> {
    let err = |source| AdminError {
        addr: addr.to_string(),
        source,
    };
    match addr {
        MetricsListen::Tcp(a) => tokio::net::TcpListener::bind(a)
            .await
            .map(AdminListener::Tcp)
            .map_err(err),
        MetricsListen::Unix(p) => {
            let _ = std::fs::remove_file(p);
            let l = tokio::net::UnixListener::bind(p).map_err(err)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
            Ok(AdminListener::Unix(l, p.clone()))
        }
    }
}

/// Serves until the process ends.
pub async fn serve(listener: AdminListener, proxy: Proxy, metrics: Arc<Metrics>) {
    loop {
        let accepted: std::io::Result<Box<dyn IoStream>> = match &listener {
            AdminListener::Tcp(l) => l
                .accept()
                .await
                .map(|(s, _)| Box::new(s) as Box<dyn IoStream>),
            AdminListener::Unix(l, _) => l
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
        let (proxy, metrics) = (proxy.clone(), metrics.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let (proxy, metrics) = (proxy.clone(), metrics.clone());
                async move { Ok::<_, Infallible>(route(req, &proxy, &metrics).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
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
                format!("not ready: {}\n", crate::error_chain(&e)),
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}
