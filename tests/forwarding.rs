//! The transparent proxy against a scripted upstream: every call reaches the
//! upstream byte for byte and every answer comes back as the upstream gave it.

mod support;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use support::raw;
use support::scripted::{frame, ScriptedUpstream, ERROR_DETAILS, ERROR_MESSAGE};
use support::{ProxyOptions, ProxyProcess};
use tonic::metadata::MetadataValue;
use tonic::{Code, Request};

use ecr_pull_proxy::cri;

const IMAGE_METHODS: &[&str] = &[
    "ListImages",
    "ImageStatus",
    "PullImage",
    "RemoveImage",
    "ImageFsInfo",
];

struct Setup {
    _dir: tempfile::TempDir,
    upstream: ScriptedUpstream,
    proxy: ProxyProcess,
}

async fn setup() -> Setup {
    let dir = support::short_tempdir();
    let upstream = ScriptedUpstream::start(&dir.path().join("up.sock")).await;
    let proxy = ProxyProcess::start(dir.path(), &upstream.socket, ProxyOptions::default());
    Setup {
        _dir: dir,
        upstream,
        proxy,
    }
}

fn with_script(msg: Bytes, script: &str) -> Request<Bytes> {
    let mut req = Request::new(msg);
    req.metadata_mut()
        .insert("x-script", MetadataValue::try_from(script).unwrap());
    req
}

/// A request message with a field from a newer CRI (number 99) and the
/// known ones.
fn message_with_unknown_field(method: &str) -> Bytes {
    let spec = cri::ImageSpec {
        image: "registry.example/app:v1".into(),
        ..Default::default()
    };
    let mut msg = match method {
        "ListImages" => cri::ListImagesRequest {
            filter: Some(cri::ImageFilter { image: Some(spec) }),
        }
        .encode_to_vec(),
        "ImageStatus" => cri::ImageStatusRequest {
            image: Some(spec),
            verbose: true,
        }
        .encode_to_vec(),
        "PullImage" => cri::PullImageRequest {
            image: Some(spec),
            auth: None,
            sandbox_config: Some(cri::PodSandboxConfig {
                hostname: "node".into(),
                ..Default::default()
            }),
        }
        .encode_to_vec(),
        "RemoveImage" => cri::RemoveImageRequest { image: Some(spec) }.encode_to_vec(),
        _ => Vec::new(),
    };
    msg.extend_from_slice(&[0x9a, 0x06, 0x03, b'n', b'e', b'w']);
    msg.into()
}

/// An HTTP/2 upstream driven by hand on `sock`: `serve` gets each
/// connection once its handshake is done. (A caller that connects and
/// leaves makes the proxy open an upstream connection that closes before
/// its handshake; those are skipped.)
fn h2_upstream<F, Fut>(sock: &std::path::Path, serve: F)
where
    F: Fn(h2::server::Connection<tokio::net::UnixStream, Bytes>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::UnixListener::bind(sock).unwrap();
    let serve = std::sync::Arc::new(serve);
    tokio::spawn(async move {
        loop {
            let (io, _) = listener.accept().await.unwrap();
            let serve = serve.clone();
            tokio::spawn(async move {
                if let Ok(conn) = h2::server::handshake(io).await {
                    serve(conn).await;
                }
            });
        }
    });
}

/// Answers a call on a hand-driven upstream: OK, with an empty message.
fn answer_ok(mut respond: h2::server::SendResponse<Bytes>) {
    let head = http::Response::builder()
        .header("content-type", "application/grpc")
        .body(())
        .unwrap();
    let mut tx = respond.send_response(head, false).unwrap();
    tx.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), false)
        .unwrap();
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    tx.send_trailers(trailers).unwrap();
}

fn without_date(mut h: http::HeaderMap) -> http::HeaderMap {
    h.remove("date");
    h
}

#[tokio::test]
async fn every_image_method_is_forwarded_byte_for_byte() {
    let s = setup().await;
    for method in IMAGE_METHODS {
        let path = format!("/runtime.v1.ImageService/{method}");
        let msg = message_with_unknown_field(method);
        let mut req = Request::new(msg.clone());
        req.metadata_mut()
            .insert("x-caller", MetadataValue::from_static("kubelet"));
        req.metadata_mut().insert_bin(
            "x-bin-bin",
            tonic::metadata::MetadataValue::from_bytes(b"\x00\xff"),
        );
        let direct = raw::unary(support::channel(&s.upstream.socket), &path, clone_req(&req))
            .await
            .unwrap();
        let direct_seen = s.upstream.last();
        let proxied = raw::unary(s.proxy.channel(), &path, req).await.unwrap();
        let proxied_seen = s.upstream.last();

        assert_eq!(proxied_seen.path, path);
        assert_eq!(
            proxied_seen.body,
            frame(&msg),
            "{method}: request bytes changed"
        );
        assert_eq!(
            proxied_seen.headers, direct_seen.headers,
            "{method}: request headers changed"
        );
        assert_eq!(
            proxied.get_ref(),
            direct.get_ref(),
            "{method}: response bytes changed"
        );
        assert_eq!(proxied.get_ref(), &msg, "{method}: echo");
        assert_eq!(
            without_date(proxied.metadata().clone().into_headers()),
            without_date(direct.metadata().clone().into_headers()),
            "{method}: response headers changed"
        );
    }
}

fn clone_req(req: &Request<Bytes>) -> Request<Bytes> {
    let mut r = Request::new(req.get_ref().clone());
    *r.metadata_mut() = req.metadata().clone();
    r
}

#[tokio::test]
async fn trailers_come_back_unchanged() {
    let s = setup().await;
    let path = "/runtime.v1.ImageService/ImageStatus";
    let resp = raw::server_streaming(
        s.proxy.channel(),
        path,
        Request::new(Bytes::from_static(b"\x0a\x00")),
    )
    .await
    .unwrap();
    let mut stream = resp.into_inner();
    while stream.message().await.unwrap().is_some() {}
    let trailers = stream.trailers().await.unwrap().unwrap();
    assert_eq!(trailers.get("x-upstream-trailer").unwrap(), "t");
}

#[tokio::test]
async fn runtime_service_calls_are_forwarded() {
    let s = setup().await;
    let msg: Bytes = cri::VersionRequest {
        version: "v1".into(),
    }
    .encode_to_vec()
    .into();
    let resp = raw::unary(
        s.proxy.channel(),
        "/runtime.v1.RuntimeService/Version",
        Request::new(msg.clone()),
    )
    .await
    .unwrap();
    assert_eq!(resp.get_ref(), &msg);
    assert_eq!(s.upstream.last().path, "/runtime.v1.RuntimeService/Version");
}

#[tokio::test]
async fn unknown_methods_reach_upstream_which_answers_unimplemented() {
    let s = setup().await;
    let err = raw::unary(
        s.proxy.channel(),
        "/runtime.v1.NoSuchService/Nothing",
        Request::new(Bytes::new()),
    )
    .await
    .unwrap_err();
    let direct = raw::unary(
        support::channel(&s.upstream.socket),
        "/runtime.v1.NoSuchService/Nothing",
        Request::new(Bytes::new()),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    assert_eq!(err.message(), direct.message());
}

#[tokio::test]
async fn stream_images_streams_many_messages() {
    let s = setup().await;
    let req = with_script(Bytes::new(), "stream:5000");
    let mut stream = raw::stream_images(s.proxy.channel(), req).await;
    let mut n = 0;
    while let Some(m) = stream.message().await.unwrap() {
        assert_eq!(m, format!("message-{n}").as_bytes());
        n += 1;
    }
    assert_eq!(n, 5000);
}

#[tokio::test]
async fn error_status_message_and_details_arrive_unchanged() {
    let s = setup().await;
    let err = raw::unary(
        s.proxy.channel(),
        "/runtime.v1.ImageService/ImageStatus",
        with_script(Bytes::new(), "error"),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), ERROR_MESSAGE);
    assert_eq!(err.details(), ERROR_DETAILS);
    assert_eq!(err.metadata().get("x-upstream-trailer").unwrap(), "t");
}

#[tokio::test]
async fn twelve_mib_response_passes() {
    let s = setup().await;
    let n = 12 * 1024 * 1024;
    let resp = raw::unary(
        s.proxy.channel(),
        "/runtime.v1.ImageService/ListImages",
        with_script(Bytes::new(), &format!("big:{n}")),
    )
    .await
    .unwrap();
    assert_eq!(resp.get_ref().len(), n);
    assert!(resp.get_ref().iter().all(|b| *b == b'x'));
}

#[tokio::test]
async fn sixteen_mib_request_passes() {
    let s = setup().await;
    // Just under kubelet's 16 MiB limit (the frame header counts too).
    let msg = Bytes::from(vec![7u8; 16 * 1024 * 1024 - 64]);
    let resp = raw::unary(
        s.proxy.channel(),
        "/runtime.v1.ImageService/ListImages",
        Request::new(msg.clone()),
    )
    .await
    .unwrap();
    assert_eq!(resp.get_ref().len(), msg.len());
    assert_eq!(s.upstream.last().body.len(), msg.len() + 5);
}

#[tokio::test]
async fn client_deadline_reaches_upstream_as_grpc_timeout() {
    let s = setup().await;
    let mut req = Request::new(Bytes::from_static(b"\x0a\x00"));
    req.set_timeout(Duration::from_secs(7));
    raw::unary(
        s.proxy.channel(),
        "/runtime.v1.ImageService/ImageStatus",
        req,
    )
    .await
    .unwrap();
    let seen = s.upstream.last();
    let timeout = seen
        .headers
        .get("grpc-timeout")
        .expect("grpc-timeout forwarded")
        .to_str()
        .unwrap();
    assert!(timeout.starts_with('7'), "{timeout}");
}

/// A request for `method` that the scripted upstream never answers.
fn hanging(method: &str) -> http::Request<()> {
    http::Request::post(format!("http://localhost/runtime.v1.ImageService/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-script", "hang")
        .body(())
        .unwrap()
}

/// One call reset by its caller (RST_STREAM, no `grpc-timeout`) on a
/// connection that stays open, as kubelet cancels a pull when its pod is
/// deleted: the upstream sees that call cancelled, and a second call on the
/// same connection, running meanwhile, completes.
async fn a_reset_call_is_cancelled_upstream_and_its_neighbour_completes(method: &str) {
    let s = setup().await;
    let client = raw_h2_client(&s.proxy.socket).await;
    let mut send = client.send.clone().ready().await.unwrap();
    let (hung, mut hung_body) = send.send_request(hanging(method), false).unwrap();
    hung_body
        .send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .unwrap();
    support::eventually(
        Duration::from_secs(5),
        "the upstream to see the call",
        || !s.upstream.calls().is_empty(),
    )
    .await;
    let seen = s.upstream.last();
    assert!(seen.headers.get("grpc-timeout").is_none());
    // The neighbour: an answer that trickles for a while.
    let neighbour = {
        let req = http::Request::post("http://localhost/runtime.v1.ImageService/ListImages")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("x-script", "delay:500")
            .body(())
            .unwrap();
        let (resp, mut body) = send.send_request(req, false).unwrap();
        body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true)
            .unwrap();
        resp
    };
    hung_body.send_reset(h2::Reason::CANCEL);
    drop(hung);
    let reset_at = std::time::Instant::now();
    support::eventually(
        Duration::from_secs(2),
        "the upstream to see the cancel",
        || seen.cancelled.load(Ordering::SeqCst),
    )
    .await;
    println!(
        "{method}: cancel reached the upstream in {:?}",
        reset_at.elapsed()
    );
    let resp = tokio::time::timeout(Duration::from_secs(10), neighbour)
        .await
        .expect("the neighbour is answered")
        .expect("the neighbour is answered, not reset");
    let mut body = resp.into_body();
    while let Some(chunk) = body.data().await {
        chunk.unwrap();
    }
    let trailers = body.trailers().await.unwrap().expect("trailers");
    assert_eq!(trailers["grpc-status"], "0");
    assert!(!client_saw_goaway(&client).await);
    assert_eq!(raw_call(&client, "ImageFsInfo").await.0, "0");
}

#[tokio::test]
async fn a_reset_pull_is_cancelled_upstream_and_its_neighbour_completes() {
    a_reset_call_is_cancelled_upstream_and_its_neighbour_completes("PullImage").await;
}

#[tokio::test]
async fn a_reset_image_status_is_cancelled_upstream_and_its_neighbour_completes() {
    a_reset_call_is_cancelled_upstream_and_its_neighbour_completes("ImageStatus").await;
}

/// The same with tonic: a call dropped by its caller while other clones of
/// the channel (the connection) live on.
#[tokio::test]
async fn a_dropped_tonic_call_is_cancelled_upstream_on_a_live_channel() {
    let s = setup().await;
    let channel = s.proxy.channel();
    raw::image_fs_info(channel.clone()).await.unwrap();
    let call = tokio::spawn(raw::unary(
        channel.clone(),
        "/runtime.v1.ImageService/PullImage",
        with_script(Bytes::new(), "hang"),
    ));
    support::eventually(Duration::from_secs(5), "upstream to see the call", || {
        s.upstream
            .calls()
            .iter()
            .any(|c| c.path.ends_with("/PullImage"))
    })
    .await;
    call.abort();
    let seen = s.upstream.last();
    support::eventually(Duration::from_secs(2), "upstream to see the cancel", || {
        seen.cancelled.load(Ordering::SeqCst)
    })
    .await;
    raw::image_fs_info(channel)
        .await
        .expect("the channel still works");
}

#[tokio::test]
async fn upstream_down_is_unavailable_naming_the_socket_and_recovers() {
    let dir = support::short_tempdir();
    let up = dir.path().join("up.sock");
    let proxy = ProxyProcess::start(dir.path(), &up, ProxyOptions::default());
    let err = raw::image_fs_info(proxy.channel()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message().contains(up.to_str().unwrap()),
        "{}",
        err.message()
    );

    let upstream = ScriptedUpstream::start(&up).await;
    raw::image_fs_info(proxy.channel()).await.unwrap();
    // Upstream restarts: the proxy re-dials.
    upstream.stop().await;
    let err = raw::image_fs_info(proxy.channel()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    let _upstream = ScriptedUpstream::start(&up).await;
    raw::image_fs_info(proxy.channel()).await.unwrap();
}

#[tokio::test]
async fn sigterm_lets_in_flight_calls_finish_then_exits_zero() {
    let mut s = setup().await;
    let channel = s.proxy.channel();
    let call = tokio::spawn(raw::unary(
        channel,
        "/runtime.v1.ImageService/ImageStatus",
        with_script(Bytes::from_static(b"\x0a\x00"), "delay:1500"),
    ));
    support::eventually(Duration::from_secs(5), "upstream to see the call", || {
        !s.upstream.calls().is_empty()
    })
    .await;
    s.proxy.signal(nix::sys::signal::Signal::SIGTERM);
    let resp = call.await.unwrap().expect("in-flight call finishes");
    assert_eq!(resp.get_ref(), &Bytes::from_static(b"\x0a\x00"));
    let status = s.proxy.wait(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{}", s.proxy.logs());
    assert!(!s.proxy.socket.exists(), "socket removed on exit");
}

/// SIGTERM while a pull is in flight: the socket stops accepting at once
/// (it is removed, so a new caller is refused), the pull completes during
/// the drain, and the daemon exits 0.
#[tokio::test]
async fn sigterm_stops_accepting_while_a_pull_in_flight_completes() {
    let mut s = setup().await;
    let channel = s.proxy.channel();
    let pull = tokio::spawn(raw::unary(
        channel,
        "/runtime.v1.ImageService/PullImage",
        with_script(message_with_unknown_field("PullImage"), "delay:2000"),
    ));
    support::eventually(Duration::from_secs(5), "upstream to see the pull", || {
        !s.upstream.calls().is_empty()
    })
    .await;
    s.proxy.signal(nix::sys::signal::Signal::SIGTERM);
    support::eventually(Duration::from_secs(1), "the socket to go", || {
        !s.proxy.socket.exists()
    })
    .await;
    assert!(
        std::os::unix::net::UnixStream::connect(&s.proxy.socket).is_err(),
        "a new caller is refused while the pull drains"
    );
    assert!(!pull.is_finished(), "the pull is still in flight");
    let resp = pull
        .await
        .unwrap()
        .expect("the pull completes during the drain");
    assert_eq!(resp.get_ref(), &message_with_unknown_field("PullImage"));
    let status = s.proxy.wait(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{}", s.proxy.logs());
    let logs = s.proxy.logs();
    assert!(logs.contains("draining in-flight calls"), "{logs}");
    assert!(logs.contains("drained"), "{logs}");
}

#[tokio::test]
async fn garbage_and_http1_close_only_that_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = setup().await;
    let inputs: [&[u8]; 3] = [
        b"\x00\x01\x02garbage\xff\xfe",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n\x00\x00",
    ];
    for input in inputs {
        let mut conn = tokio::net::UnixStream::connect(&s.proxy.socket)
            .await
            .unwrap();
        conn.write_all(input).await.unwrap();
        let mut buf = Vec::new();
        // The proxy closes the connection (possibly after a GOAWAY).
        tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut buf))
            .await
            .expect("connection closed")
            .ok();
        // And keeps serving everyone else.
        raw::image_fs_info(s.proxy.channel()).await.unwrap();
    }
    let logs = s.proxy.logs();
    assert_eq!(
        logs.matches("closed a client connection").count(),
        3,
        "{logs}"
    );
    assert!(!logs.contains("panicked"), "{logs}");
}

#[tokio::test]
async fn pull_image_over_the_limit_is_resource_exhausted_and_never_forwarded() {
    let s = setup().await;
    let msg = message_with_unknown_field("PullImage");
    // Pad with an unknown bytes field to just over the limit.
    let limit = ecr_pull_proxy::budget::MAX_PULL_MESSAGE_SIZE;
    let msg = padded(&msg, limit + 1 - msg.len());
    let err = raw::unary_unlimited(
        s.proxy.channel(),
        "/runtime.v1.ImageService/PullImage",
        Request::new(msg),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message()
            .contains(&format!("larger than {limit} bytes")),
        "{}",
        err.message()
    );
    // The daemon keeps serving; once this later call has reached the
    // upstream, a forwarded pull would have too: the upstream saw only it.
    raw::image_fs_info(s.proxy.channel()).await.unwrap();
    let paths: Vec<String> = s.upstream.calls().into_iter().map(|c| c.path).collect();
    assert_eq!(paths, ["/runtime.v1.ImageService/ImageFsInfo"]);
}

#[tokio::test]
async fn malformed_pull_image_is_forwarded_unchanged() {
    let s = setup().await;
    let cases: [&[u8]; 4] = [
        b"\xff\xff\xff",         // truncated varint
        b"\x0a\x05abc",          // length past the end
        b"\x0b\x0c",             // group wire type
        b"\x0a\x03\x0a\x01\xff", // image name not UTF-8
    ];
    for msg in cases {
        let msg = Bytes::from_static(msg);
        let resp = raw::unary(
            s.proxy.channel(),
            "/runtime.v1.ImageService/PullImage",
            Request::new(msg.clone()),
        )
        .await
        .unwrap();
        assert_eq!(resp.get_ref(), &msg);
        assert_eq!(s.upstream.last().body, frame(&msg));
    }
}

#[tokio::test]
async fn client_leaving_mid_stream_cancels_the_upstream_stream() {
    let s = setup().await;
    let req = with_script(Bytes::new(), "trickle:1000");
    let mut stream = raw::stream_images(s.proxy.channel(), req).await;
    for i in 0..3 {
        assert_eq!(
            stream.message().await.unwrap().unwrap(),
            format!("message-{i}").as_bytes()
        );
    }
    drop(stream);
    let seen = s.upstream.last();
    support::eventually(Duration::from_secs(5), "upstream to see the cancel", || {
        seen.cancelled.load(Ordering::SeqCst)
    })
    .await;
}

#[tokio::test]
async fn calls_still_running_after_the_grace_period_are_cut_and_the_exit_is_clean() {
    let dir = support::short_tempdir();
    let upstream = ScriptedUpstream::start(&dir.path().join("up.sock")).await;
    let mut proxy = ProxyProcess::start(
        dir.path(),
        &upstream.socket,
        ProxyOptions {
            config: Some("shutdown_grace = \"1s\""),
            ..Default::default()
        },
    );
    let call = tokio::spawn(raw::unary(
        proxy.channel(),
        "/runtime.v1.ImageService/PullImage",
        with_script(Bytes::new(), "hang"),
    ));
    support::eventually(Duration::from_secs(5), "upstream to see the call", || {
        !upstream.calls().is_empty()
    })
    .await;
    let started = std::time::Instant::now();
    proxy.signal(nix::sys::signal::Signal::SIGTERM);
    let status = proxy.wait(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{}", proxy.logs());
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        call.await.unwrap().is_err(),
        "the hanging call cannot have succeeded"
    );
    let seen = upstream.last();
    support::eventually(Duration::from_secs(5), "upstream to see the cancel", || {
        seen.cancelled.load(Ordering::SeqCst)
    })
    .await;
    assert!(
        proxy.logs().contains("grace period over"),
        "{}",
        proxy.logs()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_stream_reset_fails_that_call_only() {
    let dir = support::short_tempdir();
    // An HTTP/2 upstream that refuses every ImageStatus stream with
    // RST_STREAM and answers everything else with an empty OK message.
    let sock = dir.path().join("up.sock");
    h2_upstream(&sock, |mut conn| async move {
        while let Some(Ok((req, mut respond))) = conn.accept().await {
            if req.uri().path().ends_with("/ImageStatus") {
                respond.send_reset(h2::Reason::REFUSED_STREAM);
                continue;
            }
            answer_ok(respond);
        }
    });
    let metrics = dir.path().join("m.sock");
    let arg = format!("unix:{}", metrics.display());
    let proxy = ProxyProcess::start(
        dir.path(),
        &sock,
        ProxyOptions {
            args: vec!["--metrics-listen", &arg],
            ..Default::default()
        },
    );
    let up = || support::metrics::read(&metrics, "ecr_pull_proxy_upstream_up", &[]);
    raw::image_fs_info(proxy.channel()).await.unwrap();
    assert_eq!(up(), 1.0);

    let err = raw::unary(
        proxy.channel(),
        "/runtime.v1.ImageService/ImageStatus",
        Request::new(Bytes::new()),
    )
    .await
    .unwrap_err();
    // The reset reaches the caller as the status a gRPC client gives a
    // refused stream (Unavailable, safe to retry), naming the socket and
    // the reason.
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains(sock.to_str().unwrap()), "{err:?}");
    assert!(err.message().contains("refused stream"), "{err:?}");
    // The connection is fine: still up, and the next call goes through on it.
    assert_eq!(up(), 1.0);
    raw::image_fs_info(proxy.channel()).await.unwrap();
}

/// `message` with an unknown bytes field of `pad` zeros appended.
fn padded(message: &[u8], pad: usize) -> Bytes {
    let mut msg = message.to_vec();
    msg.extend_from_slice(&[0xa2, 0x06]);
    let mut len = pad as u64;
    while len >= 0x80 {
        msg.push((len as u8) | 0x80);
        len >>= 7;
    }
    msg.push(len as u8);
    msg.extend(std::iter::repeat_n(0u8, pad));
    msg.into()
}

/// Pull answers and a big answer share a caller's connection with the
/// smallest windows HTTP/2 allows: nothing overruns the caller
/// (FLOW_CONTROL_ERROR) or starves the connection (a stall).
#[tokio::test]
async fn pull_answers_and_a_big_answer_share_a_small_client_window() {
    let s = setup().await;
    let socket = s.proxy.socket.clone();
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .initial_connection_window_size(65_535)
        .initial_stream_window_size(65_535)
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .unwrap();
    let n = 12 * 1024 * 1024;
    let big = tokio::spawn(raw::unary(
        channel.clone(),
        "/runtime.v1.ImageService/ListImages",
        with_script(Bytes::new(), &format!("big:{n}")),
    ));
    let pull = padded(&message_with_unknown_field("PullImage"), 50_000);
    let pulls: Vec<_> = (0..30)
        .map(|_| {
            tokio::spawn(raw::unary(
                channel.clone(),
                "/runtime.v1.ImageService/PullImage",
                Request::new(pull.clone()),
            ))
        })
        .collect();
    let all = async {
        for p in pulls {
            let resp = p.await.unwrap().expect("pull answered");
            assert_eq!(resp.get_ref(), &pull);
        }
        let resp = big.await.unwrap().expect("big answer");
        assert_eq!(resp.get_ref().len(), n);
    };
    tokio::time::timeout(Duration::from_secs(30), all)
        .await
        .expect("no stall");
    assert!(!s.proxy.logs().contains("closed a client connection"));
}

/// A socket whose reads wait until `until`: a caller that stops reading.
struct SlowReader {
    inner: tokio::net::UnixStream,
    until: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl tokio::io::AsyncRead for SlowReader {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::ready!(std::future::Future::poll(self.until.as_mut(), cx));
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for SlowReader {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// CPU time the process has used so far, all threads.
fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).unwrap();
    Duration::from_nanos(stat.split_whitespace().next().unwrap().parse().unwrap())
}

/// A caller that stops reading fills its socket; the daemon then waits (it
/// does not spin on the full socket: h2 holds the answer under flow
/// control) and passes the rest on once the caller reads again, nothing
/// lost.
#[tokio::test]
async fn a_caller_that_stops_reading_gets_the_whole_answer_when_it_reads_again() {
    let s = setup().await;
    let socket = s.proxy.socket.clone();
    let pause = Duration::from_secs(1);
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .initial_connection_window_size(64 * 1024 * 1024)
        .initial_stream_window_size(64 * 1024 * 1024)
        .connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(SlowReader {
                    inner: tokio::net::UnixStream::connect(socket).await?,
                    until: Box::pin(tokio::time::sleep(pause)),
                }))
            }
        }));
    let n = 12 * 1024 * 1024;
    let call = tokio::spawn(raw::unary(
        channel,
        "/runtime.v1.ImageService/ListImages",
        with_script(Bytes::new(), &format!("big:{n}")),
    ));
    // While the caller does not read, the answer fills its socket.
    tokio::time::sleep(pause / 4).await;
    let cpu_before = cpu_time(s.proxy.pid());
    tokio::time::sleep(pause / 2).await;
    let waiting = cpu_time(s.proxy.pid()) - cpu_before;
    assert!(
        waiting < pause / 10,
        "the daemon used {waiting:?} of CPU in {:?} waiting for a full socket",
        pause / 2
    );
    let resp = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("the answer arrives once the caller reads")
        .unwrap()
        .unwrap();
    assert_eq!(resp.get_ref().len(), n);
    assert!(resp.get_ref().iter().all(|b| *b == b'x'));
    assert!(!s.proxy.logs().contains("closed a client connection"));
}

/// containerd going away with a call in flight: the caller gets
/// `Unavailable` naming the socket, not a bare connection reset.
#[tokio::test(flavor = "multi_thread")]
async fn upstream_closing_mid_call_is_unavailable_naming_the_socket() {
    let dir = support::short_tempdir();
    let sock = dir.path().join("up.sock");
    // Take one call, then close the connection under it.
    h2_upstream(&sock, |mut conn| async move {
        if let Some(Ok((_req, _respond))) = conn.accept().await {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let proxy = ProxyProcess::start(dir.path(), &sock, ProxyOptions::default());
    let err = raw::unary(
        proxy.channel(),
        "/runtime.v1.ImageService/ImageStatus",
        Request::new(Bytes::new()),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains(sock.to_str().unwrap()),
        "{}",
        err.message()
    );
    assert!(
        proxy.logs().contains("upstream connection lost"),
        "{}",
        proxy.logs()
    );
}

/// kubelet keeps its connection for days: one made while containerd was
/// down is answered Unavailable naming the socket, and works as soon as
/// containerd is back, on the same connection (the proxy never asks it to
/// reconnect because of containerd).
#[tokio::test]
async fn a_connection_made_while_upstream_was_down_works_once_it_is_back() {
    let dir = support::short_tempdir();
    let up = dir.path().join("up.sock");
    let proxy = ProxyProcess::start(dir.path(), &up, ProxyOptions::default());
    let client = raw_h2_client(&proxy.socket).await;
    let (code, message) = raw_call(&client, "ImageFsInfo").await;
    assert_eq!(code, "14", "{message}");
    assert!(message.contains(up.to_str().unwrap()), "{message}");

    let _upstream = ScriptedUpstream::start(&up).await;
    let (code, message) = raw_call(&client, "ImageFsInfo").await;
    assert_eq!(code, "0", "served on the same connection: {message}");
    assert!(!client_saw_goaway(&client).await);
    assert!(
        proxy.logs().contains("upstream answers again"),
        "{}",
        proxy.logs()
    );
}

/// containerd restarting under a caller's connection: its calls get
/// Unavailable naming the socket while containerd is away, and work again
/// on the same connection as soon as it is back.
#[tokio::test]
async fn a_connection_outlives_an_upstream_restart() {
    let dir = support::short_tempdir();
    let sock = dir.path().join("up.sock");
    // An upstream that answers every call OK while `up` is true; turning it
    // false closes every connection and drops new ones, as a containerd
    // that died would.
    let (up, watching) = tokio::sync::watch::channel(true);
    h2_upstream(&sock, move |mut conn| {
        let mut up = watching.clone();
        async move {
            if !*up.borrow_and_update() {
                return;
            }
            loop {
                tokio::select! {
                    next = conn.accept() => {
                        let Some(Ok((_req, respond))) = next else { return };
                        answer_ok(respond);
                    }
                    _ = up.changed() => return,
                }
            }
        }
    });
    let proxy = ProxyProcess::start(dir.path(), &sock, ProxyOptions::default());
    let client = raw_h2_client(&proxy.socket).await;
    assert_eq!(raw_call(&client, "ImageFsInfo").await.0, "0");

    up.send(false).unwrap();
    support::eventually(Duration::from_secs(5), "the proxy to see it go", || {
        proxy.logs().contains("upstream connection lost")
    })
    .await;
    let (code, message) = raw_call(&client, "ImageFsInfo").await;
    assert_eq!(code, "14", "{message}");
    assert!(message.contains(sock.to_str().unwrap()), "{message}");

    up.send(true).unwrap();
    let mut answered = String::new();
    for _ in 0..50 {
        answered = raw_call(&client, "ImageFsInfo").await.0;
        if answered == "0" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(answered, "0", "served again once the upstream is back");
    assert!(!client_saw_goaway(&client).await);
    assert!(!proxy.logs().contains("closed a client connection"));
}

/// A raw HTTP/2 client connection to `socket`. Unlike a gRPC channel it
/// never reconnects, so a test that keeps calling on it shows the proxy
/// kept the connection.
async fn raw_h2_client(socket: &std::path::Path) -> RawClient {
    let io = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (send, conn) = h2::client::handshake(io).await.unwrap();
    let (closed_tx, closed_rx) = tokio::sync::watch::channel(None);
    tokio::spawn(async move {
        let result = conn.await;
        let _ = closed_tx.send(Some(format!("{result:?}")));
    });
    RawClient {
        send,
        closed: closed_rx,
    }
}

struct RawClient {
    send: h2::client::SendRequest<Bytes>,
    closed: tokio::sync::watch::Receiver<Option<String>>,
}

/// Calls `method` with an empty message: (grpc-status, grpc-message).
async fn raw_call(client: &RawClient, method: &str) -> (String, String) {
    let req = http::Request::post(format!("http://localhost/runtime.v1.ImageService/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let mut send = client.send.clone().ready().await.expect("connection open");
    let (resp, mut body) = send.send_request(req, false).unwrap();
    // The daemon may answer (Unavailable) before the request body is sent,
    // which closes the stream: legal, and the answer is what counts.
    let _ = body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true);
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("an answer")
        .expect("an answer, not a reset");
    let (head, mut body) = resp.into_parts();
    let mut status = head.headers.clone();
    if !status.contains_key("grpc-status") {
        while let Some(chunk) = body.data().await {
            chunk.unwrap();
        }
        status = body.trailers().await.unwrap().expect("trailers");
    }
    let text = |k: &str| {
        status
            .get(k)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    (text("grpc-status"), text("grpc-message"))
}

/// Whether the proxy closed (or began closing) the connection.
async fn client_saw_goaway(client: &RawClient) -> bool {
    client.closed.borrow().is_some() || client.send.clone().ready().await.is_err()
}

/// containerd stopping gracefully (`systemctl restart containerd`) while a
/// pull is in flight: its GOAWAY lets the streams it accepted finish, so
/// the pull is answered, not refused, and the next call goes to a new
/// upstream connection.
#[tokio::test]
async fn a_pull_in_flight_survives_the_upstream_going_away_gracefully() {
    let dir = support::short_tempdir();
    let sock = dir.path().join("up.sock");
    let status_arrived = Arc::new(tokio::sync::Notify::new());
    let pull_arrived = Arc::new(tokio::sync::Notify::new());
    let (status_seen, pull_seen) = (status_arrived.clone(), pull_arrived.clone());
    // ImageStatus waits for the pull to arrive (on another connection),
    // answers, then shuts its connection down gracefully; the pull is
    // answered half a second later.
    h2_upstream(&sock, move |mut conn| {
        let (status_seen, pull_seen) = (status_seen.clone(), pull_seen.clone());
        async move {
            let (shut_tx, mut shut_rx) = tokio::sync::mpsc::channel::<()>(1);
            loop {
                tokio::select! {
                    next = conn.accept() => {
                        let Some(Ok((req, respond))) = next else { return };
                        let pull = req.uri().path().ends_with("/PullImage");
                        let goaway = req.uri().path().ends_with("/ImageStatus");
                        let (status_seen, pull_seen, shut) =
                            (status_seen.clone(), pull_seen.clone(), shut_tx.clone());
                        tokio::spawn(async move {
                            if pull {
                                pull_seen.notify_one();
                                tokio::time::sleep(Duration::from_millis(500)).await;
                            } else if goaway {
                                status_seen.notify_one();
                                pull_seen.notified().await;
                            }
                            answer_ok(respond);
                            if goaway {
                                let _ = shut.send(()).await;
                            }
                        });
                    }
                    Some(()) = shut_rx.recv() => conn.graceful_shutdown(),
                }
            }
        }
    });
    let proxy = ProxyProcess::start(dir.path(), &sock, ProxyOptions::default());
    let channel = proxy.channel();
    // Stream 1 reaches the upstream...
    let status = tokio::spawn(raw::unary(
        channel.clone(),
        "/runtime.v1.ImageService/ImageStatus",
        Request::new(Bytes::new()),
    ));
    tokio::time::timeout(Duration::from_secs(10), status_arrived.notified())
        .await
        .expect("ImageStatus reaches the upstream");
    // ...stream 3, the pull, follows on the same upstream connection.
    let pull = raw::unary(
        channel.clone(),
        "/runtime.v1.ImageService/PullImage",
        Request::new(message_with_unknown_field("PullImage")),
    )
    .await;
    status.await.unwrap().expect("ImageStatus");
    pull.expect("the pull is answered, not refused by the GOAWAY");
    let logs = proxy.logs();
    assert!(!logs.contains("closed a client connection"), "{logs}");
}

/// containerd ending a connection at once (an error, a hard stop) with
/// calls in flight: each gets Unavailable naming the socket (never a hang
/// or a bare reset), the caller's connection stays, and its next call is
/// served on a new upstream connection.
#[tokio::test]
async fn an_upstream_ending_abruptly_fails_calls_in_flight_and_the_next_call_works() {
    let dir = support::short_tempdir();
    let sock = dir.path().join("up.sock");
    let first = Arc::new(std::sync::atomic::AtomicBool::new(true));
    // Pulls the first connection holds, counted where they arrive.
    let held_pulls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let arrived = held_pulls.clone();
    h2_upstream(&sock, move |mut conn| {
        let first = first.swap(false, Ordering::SeqCst);
        let arrived = arrived.clone();
        async move {
            if !first {
                while let Some(Ok((_req, respond))) = conn.accept().await {
                    answer_ok(respond);
                }
                return;
            }
            // The first connection: hold a pull, then end everything at
            // once when an ImageStatus arrives.
            let mut held = Vec::new();
            while let Some(Ok((req, respond))) = conn.accept().await {
                if req.uri().path().ends_with("/ImageStatus") {
                    conn.abrupt_shutdown(h2::Reason::INTERNAL_ERROR);
                    held.push(respond);
                    while let Some(Ok(_)) = conn.accept().await {}
                    return;
                }
                held.push(respond);
                arrived.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    let proxy = ProxyProcess::start(dir.path(), &sock, ProxyOptions::default());
    let client = raw_h2_client(&proxy.socket).await;
    let pull = {
        let send = client.send.clone();
        let closed = client.closed.clone();
        tokio::spawn(async move { raw_call(&RawClient { send, closed }, "PullImage").await })
    };
    support::eventually(
        Duration::from_secs(5),
        "the pull to be held by the upstream",
        || held_pulls.load(Ordering::SeqCst) == 1,
    )
    .await;
    let (code, message) = raw_call(&client, "ImageStatus").await;
    assert_eq!(code, "14", "{message}");
    assert!(message.contains(sock.to_str().unwrap()), "{message}");
    let (code, message) = pull.await.unwrap();
    assert_eq!(code, "14", "{message}");
    assert!(message.contains(sock.to_str().unwrap()), "{message}");
    let (code, message) = raw_call(&client, "ImageFsInfo").await;
    assert_eq!(code, "0", "{message}");
    assert!(!client_saw_goaway(&client).await);
}

/// containerd closing an idle connection: the caller keeps its own, its
/// calls get Unavailable naming the socket until containerd answers, and
/// its pings are answered meanwhile (h2 answers them).
#[tokio::test(flavor = "multi_thread")]
async fn a_connection_the_upstream_closed_answers_unavailable_and_pings() {
    let dir = support::short_tempdir();
    let sock = dir.path().join("up.sock");
    // Shake hands, then close; and stop listening, as a dead containerd.
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let proxy = ProxyProcess::start(dir.path(), &sock, ProxyOptions::default());
    let io = tokio::net::UnixStream::connect(&proxy.socket)
        .await
        .unwrap();
    let (send, mut conn) = h2::client::handshake(io).await.unwrap();
    let mut pings = conn.ping_pong().expect("ping_pong taken once");
    let (closed_tx, closed) = tokio::sync::watch::channel(None);
    tokio::spawn(async move {
        let r = conn.await;
        let _ = closed_tx.send(Some(format!("{r:?}")));
    });
    let client = RawClient { send, closed };
    let upstream = std::thread::spawn(move || {
        let (io, _) = listener.accept().unwrap();
        drop(io);
        drop(listener);
    });
    let (code, message) = raw_call(&client, "ImageStatus").await;
    upstream.join().unwrap();
    assert_eq!(code, "14", "{message}");
    assert!(message.contains(sock.to_str().unwrap()), "{message}");
    std::fs::remove_file(&sock).unwrap();
    let (code, message) = raw_call(&client, "ImageStatus").await;
    assert_eq!(code, "14", "{message}");
    assert!(message.contains(sock.to_str().unwrap()), "{message}");

    tokio::time::timeout(Duration::from_secs(2), pings.ping(h2::Ping::opaque()))
        .await
        .expect("a pong")
        .unwrap();
    let logs = proxy.logs();
    assert!(!logs.contains("closed a client connection"), "{logs}");
    assert!(!client_saw_goaway(&client).await);
}

/// 1,000 client connections (25 at a time, within `MAX_CONNECTIONS`),
/// each dropped with a call in flight: every upstream call is cancelled
/// (so no task of the daemon still holds one), and the daemon's
/// descriptors, its upstream connections' included, are back to what they
/// were.
#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_connections_dropped_mid_call_leave_nothing_behind() {
    const CONNECTIONS: usize = 1000;
    const BATCHES: usize = 40;
    let s = setup().await;
    raw::image_fs_info(s.proxy.channel()).await.unwrap();
    let fds_before = s.proxy.fds();
    for batch in 0..BATCHES {
        let mut clients = Vec::new();
        for _ in 0..CONNECTIONS / BATCHES {
            let client = raw_h2_client(&s.proxy.socket).await;
            let mut send = client.send.clone().ready().await.unwrap();
            let (resp, mut body) = send.send_request(hanging("ImageStatus"), false).unwrap();
            body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true)
                .unwrap();
            clients.push((client, resp, body));
        }
        let want = (batch + 1) * CONNECTIONS / BATCHES;
        support::eventually(
            Duration::from_secs(20),
            "the calls to reach the upstream",
            || s.upstream.calls().len() > want,
        )
        .await;
        drop(clients);
    }
    let calls = s.upstream.calls();
    let hung: Vec<_> = calls
        .iter()
        .filter(|c| c.path.ends_with("/ImageStatus"))
        .collect();
    assert_eq!(hung.len(), CONNECTIONS);
    support::eventually(
        Duration::from_secs(20),
        "every upstream call cancelled",
        || hung.iter().all(|c| c.cancelled.load(Ordering::SeqCst)),
    )
    .await;
    support::eventually(Duration::from_secs(20), "descriptors back to idle", || {
        s.proxy.fds() <= fds_before
    })
    .await;
    raw::image_fs_info(s.proxy.channel())
        .await
        .expect("still serving");
}

/// An upstream that answers with malformed HTTP/2 (garbage after its
/// preface): the call gets Unavailable naming the socket, the caller's
/// connection stays, and once a sound upstream listens the same
/// connection is served.
#[tokio::test(flavor = "multi_thread")]
async fn malformed_frames_from_the_upstream_fail_that_call_not_the_connection() {
    let dir = support::short_tempdir();
    let sock = dir.path().join("up.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let broken = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut io, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4096];
        let _ = io.read(&mut buf);
        // An empty SETTINGS (a valid server preface), then a DATA frame on
        // stream 0: a connection error in HTTP/2.
        let _ = io.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        let _ = io.write_all(&[0, 0, 3, 0, 0, 0, 0, 0, 0, b'b', b'a', b'd']);
        std::thread::sleep(Duration::from_millis(500));
    });
    let proxy = ProxyProcess::start(dir.path(), &sock, ProxyOptions::default());
    let client = raw_h2_client(&proxy.socket).await;
    let (code, message) = raw_call(&client, "ImageFsInfo").await;
    assert_eq!(code, "14", "{message}");
    assert!(message.contains(sock.to_str().unwrap()), "{message}");
    broken.join().unwrap();
    std::fs::remove_file(&sock).unwrap();
    let _upstream = ScriptedUpstream::start(&sock).await;
    let (code, message) = raw_call(&client, "ImageFsInfo").await;
    assert_eq!(code, "0", "{message}");
    assert!(!client_saw_goaway(&client).await);
}
