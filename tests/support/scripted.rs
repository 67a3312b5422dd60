//! A scripted upstream: a real tonic server on a Unix socket that records the
//! raw bytes and headers of every call and answers as the `x-script` request
//! header says:
//!
//! - `echo` (default): the request message back, a response header and a trailer;
//! - `big:N`: one message of N bytes;
//! - `stream:N`: N messages `message-<i>`;
//! - `error`: NOT_FOUND with a non-ASCII message and binary details;
//! - `hang`: never answers (records whether the call was cancelled);
//! - `delay:MS`: echo after MS milliseconds;
//! - `trickle:N`: N messages, one every 20 ms (records a cancel mid-stream);
//! - `refuse`: UNKNOWN with containerd's "401 Unauthorized" wording.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderValue};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tonic::body::Body;
use tonic::server::NamedService;

/// Message of the `error` script (percent-encoded on the wire).
pub const ERROR_MESSAGE: &str = "image \"x\" not found: ☃ 100%";
/// Binary details of the `error` script.
pub const ERROR_DETAILS: &[u8] = b"\x00\x01details\xff";

/// One call as the upstream saw it.
#[derive(Clone)]
pub struct Recorded {
    /// `/service/method`.
    pub path: String,
    /// The `:authority` it arrived with.
    pub authority: Option<String>,
    /// Request headers (metadata, `grpc-timeout`, `content-type`, ...).
    pub headers: HeaderMap,
    /// The raw request body (gRPC frames).
    pub body: Bytes,
    /// Set when the call was dropped before it was answered.
    pub cancelled: Arc<AtomicBool>,
}

#[derive(Clone, Default)]
struct Recorder {
    calls: Arc<Mutex<Vec<Recorded>>>,
}

/// The running upstream.
pub struct ScriptedUpstream {
    /// Its socket.
    pub socket: PathBuf,
    calls: Arc<Mutex<Vec<Recorded>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ScriptedUpstream {
    /// Starts serving on `socket`.
    pub async fn start(socket: &Path) -> Self {
        let _ = std::fs::remove_file(socket);
        let listener = tokio::net::UnixListener::bind(socket).unwrap();
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        let recorder = Recorder::default();
        let calls = recorder.calls.clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(Image(recorder.clone()))
                .add_service(Runtime(recorder))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        ScriptedUpstream {
            socket: socket.to_owned(),
            calls,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Recorded> {
        self.calls.lock().unwrap().clone()
    }

    /// The last call.
    pub fn last(&self) -> Recorded {
        self.calls().pop().expect("upstream saw a call")
    }

    /// Stops serving and removes the socket.
    pub async fn stop(mut self) {
        self.shutdown().await;
    }

    async fn shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for ScriptedUpstream {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

#[derive(Clone)]
struct Image(Recorder);
#[derive(Clone)]
struct Runtime(Recorder);

impl NamedService for Image {
    const NAME: &'static str = "runtime.v1.ImageService";
}
impl NamedService for Runtime {
    const NAME: &'static str = "runtime.v1.RuntimeService";
}

macro_rules! recorder_service {
    ($t:ty) => {
        impl tower::Service<http::Request<Body>> for $t {
            type Response = http::Response<Body>;
            type Error = Infallible;
            type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;
            fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
                Poll::Ready(Ok(()))
            }
            fn call(&mut self, req: http::Request<Body>) -> Self::Future {
                let rec = self.0.clone();
                Box::pin(async move { Ok(rec.handle(req).await) })
            }
        }
    };
}
recorder_service!(Image);
recorder_service!(Runtime);

struct CancelGuard(Arc<AtomicBool>, bool);
impl Drop for CancelGuard {
    fn drop(&mut self) {
        if self.1 {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

/// Frames one message.
pub fn frame(msg: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(msg.len() + 5);
    v.push(0);
    v.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    v.extend_from_slice(msg);
    v.into()
}

/// A framed message of `n` bytes, made once per size and shared, so that
/// thousands of large answers cost the test process one buffer.
fn big_message(n: usize) -> Bytes {
    static MADE: std::sync::OnceLock<Mutex<std::collections::HashMap<usize, Bytes>>> =
        std::sync::OnceLock::new();
    MADE.get_or_init(Default::default)
        .lock()
        .unwrap()
        .entry(n)
        .or_insert_with(|| frame(&vec![b'x'; n]))
        .clone()
}

fn respond(data: Vec<Bytes>, trailers: HeaderMap) -> http::Response<Body> {
    let mut frames: Vec<Result<Frame<Bytes>, Infallible>> =
        data.into_iter().map(|d| Ok(Frame::data(d))).collect();
    frames.push(Ok(Frame::trailers(trailers)));
    let body = Body::new(StreamBody::new(futures_util::stream::iter(frames)));
    http::Response::builder()
        .header("content-type", "application/grpc")
        .header("x-upstream-header", "h")
        .body(body)
        .unwrap()
}

fn ok_trailers() -> HeaderMap {
    let mut t = HeaderMap::new();
    t.insert("grpc-status", HeaderValue::from_static("0"));
    t.insert("x-upstream-trailer", HeaderValue::from_static("t"));
    t
}

impl Recorder {
    async fn handle(&self, req: http::Request<Body>) -> http::Response<Body> {
        let (parts, body) = req.into_parts();
        let cancelled = Arc::new(AtomicBool::new(false));
        let mut guard = CancelGuard(cancelled.clone(), true);
        let script = parts
            .headers
            .get("x-script")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("echo")
            .to_owned();
        let body = body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        self.calls.lock().unwrap().push(Recorded {
            path: parts.uri.path().to_owned(),
            authority: parts.uri.authority().map(|a| a.to_string()),
            headers: parts.headers.clone(),
            body: body.clone(),
            cancelled,
        });
        let (verb, arg) = script.split_once(':').unwrap_or((script.as_str(), ""));
        let resp = match verb {
            "big" => {
                let n: usize = arg.parse().unwrap();
                respond(vec![big_message(n)], ok_trailers())
            }
            "stream" => {
                let n: usize = arg.parse().unwrap();
                let msgs = (0..n)
                    .map(|i| frame(format!("message-{i}").as_bytes()))
                    .collect();
                respond(msgs, ok_trailers())
            }
            "error" => {
                let status = tonic::Status::with_details(
                    tonic::Code::NotFound,
                    ERROR_MESSAGE,
                    Bytes::from_static(ERROR_DETAILS),
                );
                let mut t = status.into_http::<Body>().headers().clone();
                t.remove("content-type");
                t.insert("x-upstream-trailer", HeaderValue::from_static("t"));
                respond(vec![], t)
            }
            "refuse" => {
                let status = tonic::Status::unknown(
                    "failed to pull and unpack image: failed to resolve reference: unexpected status from HEAD request: 401 Unauthorized",
                );
                let mut t = status.into_http::<Body>().headers().clone();
                t.remove("content-type");
                respond(vec![], t)
            }
            "hang" => std::future::pending().await,
            "trickle" => {
                let n: usize = arg.parse().unwrap();
                // The guard moves into the stream: dropping the response
                // body before its end records the cancel.
                let stream_guard = CancelGuard(guard.0.clone(), true);
                let stream = futures_util::stream::unfold(
                    (0usize, Some(stream_guard)),
                    move |(i, mut guard)| async move {
                        if i > n {
                            return None;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        let frame = if i == n {
                            if let Some(g) = guard.as_mut() {
                                g.1 = false;
                            }
                            Frame::trailers(ok_trailers())
                        } else {
                            Frame::data(frame(format!("message-{i}").as_bytes()))
                        };
                        Some((Ok::<_, Infallible>(frame), (i + 1, guard)))
                    },
                );
                guard.1 = false;
                return http::Response::builder()
                    .header("content-type", "application/grpc")
                    .body(Body::new(StreamBody::new(stream)))
                    .unwrap();
            }
            "delay" => {
                tokio::time::sleep(Duration::from_millis(arg.parse().unwrap())).await;
                respond(vec![body], ok_trailers())
            }
            _ => respond(vec![body], ok_trailers()),
        };
        guard.1 = false;
        resp
    }
}
