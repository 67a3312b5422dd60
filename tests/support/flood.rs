//! Floods a hostile local client makes, through h2 itself (which honours
//! flow control, so a flood goes as fast as the daemon lets it): shared by
//! tests/abuse.rs, which asserts on them, and the benchmark, which prints
//! the daemon's memory under them.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;

/// An HTTP/2 client connection from h2 itself: it honours flow control,
/// so a flood through it goes as fast as the daemon lets it, no faster.
pub async fn h2_connect(socket: &Path) -> h2::client::SendRequest<Bytes> {
    let io = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (send, conn) = h2::client::handshake(io).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send.ready().await.unwrap()
}

pub fn grpc_request(method: &str, script: Option<&str>) -> http::Request<()> {
    let mut b = http::Request::builder()
        .method("POST")
        .uri(format!("http://localhost/runtime.v1.ImageService/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(s) = script {
        b = b.header("x-script", s);
    }
    b.body(()).unwrap()
}

/// Writes a gRPC header announcing `announced` bytes, then `send` bytes of
/// message as flow control allows, ending the stream if `end`.
pub async fn feed(mut tx: h2::SendStream<Bytes>, announced: u32, send: usize, end: bool) {
    let mut head = vec![0u8];
    head.extend_from_slice(&announced.to_be_bytes());
    if tx.send_data(Bytes::from(head), false).is_err() {
        return;
    }
    let chunk = Bytes::from(vec![b'm'; 16 * 1024]);
    let mut left = send;
    while left > 0 {
        tx.reserve_capacity(chunk.len().min(left));
        match std::future::poll_fn(|cx| tx.poll_capacity(cx)).await {
            Some(Ok(n)) if n > 0 => {
                let n = n.min(left);
                if tx.send_data(chunk.slice(..n), false).is_err() {
                    return;
                }
                left -= n;
            }
            Some(Ok(_)) => continue,
            _ => return,
        }
    }
    if end {
        let _ = tx.send_data(Bytes::new(), true);
    } else {
        // Never finished: held open until the daemon answers.
        let _ = std::future::poll_fn(|cx| tx.poll_reset(cx)).await;
    }
}

/// The gRPC status code of an answer (trailers-only or with trailers).
pub async fn grpc_code(resp: h2::client::ResponseFuture) -> Option<String> {
    let resp = resp.await.ok()?;
    if let Some(s) = resp.headers().get("grpc-status") {
        return Some(s.to_str().unwrap().to_owned());
    }
    let mut body = resp.into_body();
    while let Some(d) = body.data().await {
        let d = d.ok()?;
        let _ = body.flow_control().release_capacity(d.len());
    }
    let t = body.trailers().await.ok()??;
    Some(t.get("grpc-status")?.to_str().unwrap().to_owned())
}

/// The `PullImage` message flood: on each of `connections` connections,
/// `streams` streams, each announcing a message as the pattern says
/// (stream `s` of connection `c` by `(c + s) % 3`: 16 MiB announced and
/// 1 MiB sent, never finished; `max_message` announced and sent, never
/// finished; 1 KiB announced and `max_message` + 1 MiB sent, finished).
/// Returns each stream's gRPC code (`none` when it got no status), once
/// every stream is answered or `timeout` passes.
pub async fn pull_message_flood(
    socket: &Path,
    connections: usize,
    streams: usize,
    max_message: usize,
    timeout: Duration,
) -> std::collections::BTreeMap<String, usize> {
    let mut answers = Vec::new();
    for c in 0..connections {
        let mut send = h2_connect(socket).await;
        for s in 0..streams {
            send = send.ready().await.unwrap();
            let (resp, tx) = send
                .send_request(grpc_request("PullImage", None), false)
                .unwrap();
            let (announced, size, end) = match (c + s) % 3 {
                0 => (16 * 1024 * 1024, 1024 * 1024, false),
                1 => (max_message as u32, max_message, false),
                _ => (1024, max_message + 1024 * 1024, true),
            };
            tokio::spawn(feed(tx, announced, size, end));
            answers.push(tokio::spawn(grpc_code(resp)));
        }
    }
    let mut codes = std::collections::BTreeMap::<String, usize>::new();
    for a in answers {
        let code = tokio::time::timeout(timeout, a)
            .await
            .expect("every flooding stream is answered")
            .unwrap()
            .unwrap_or_else(|| "none".into());
        *codes.entry(code).or_default() += 1;
    }
    codes
}

/// Callers that ask for an answer and never read it: `streams` calls of
/// `method` (with the scripted upstream's `script`, if any) on each of
/// `connections` connections; the answers' heads are awaited, their
/// bodies never read. The calls stay open until the handles are aborted.
pub async fn stalled_readers(
    socket: &Path,
    connections: usize,
    streams: usize,
    method: &str,
    script: Option<&str>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut held = Vec::new();
    for _ in 0..connections {
        let mut send = h2_connect(socket).await;
        for _ in 0..streams {
            send = send.ready().await.unwrap();
            let (resp, mut tx) = send
                .send_request(grpc_request(method, script), false)
                .unwrap();
            tx.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true)
                .unwrap();
            held.push(tokio::spawn(async move {
                let r = resp.await;
                tokio::time::sleep(Duration::from_secs(3600)).await;
                drop(r);
            }));
        }
        held.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(send);
        }));
    }
    held
}
