//! A broken or hostile local client against the daemon, one attack per
//! test, while another client keeps calling `ImageFsInfo`: the daemon's
//! memory stays bounded, the other client's calls keep answering, the
//! abusive connection is closed with the GOAWAY code HTTP/2 prescribes
//! (where the attack is a protocol violation), and `upstream_up` does not
//! move, because a client's misdeeds say nothing about containerd.
//!
//! The attacker writes HTTP/2 frames by hand: no client library would send
//! these. Each flood runs against the scripted upstream and again against
//! real containerd 1.6, where the other client also pulls an image from
//! private ECR (token injected) while the flood goes on.

mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::flood::{self, grpc_code, grpc_request, h2_connect};
use support::raw;
use support::real::ContainerdVersion;
use support::scripted::ScriptedUpstream;
use support::stack::{Stack, ECR_HOST};
use support::{ProxyOptions, ProxyProcess};
use tonic::transport::Channel;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const CONTINUATION: u8 = 9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

const PROTOCOL_ERROR: u32 = 0x1;
const FRAME_SIZE_ERROR: u32 = 0x6;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// How long an attack may go on at most.
const ATTACK_TIME: Duration = Duration::from_secs(5);
/// How much the daemon's peak resident memory (VmHWM) may exceed its RSS
/// before an attack of one connection: a growth, so that it means the
/// same whatever the daemon held before (the AWS SDK, a cached token).
/// The attacks below grow it by 5 MiB at most.
const ATTACK_GROWTH_LIMIT_KIB: u64 = 32 * 1024;
/// The other client's slowest call during an attack stays under this: a
/// generous bound for a loaded 2-core machine; a stalled daemon misses it
/// by far.
const SLOWEST_OTHER_CALL: Duration = Duration::from_secs(2);

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A request header block for `method` (HPACK: static-table indices and
/// literals without indexing, so every block stands alone).
fn request_headers(method: &str) -> Vec<u8> {
    request_headers_with_authority(method, "localhost")
}

/// As [`request_headers`], with `authority` as `:authority`.
fn request_headers_with_authority(method: &str, authority: &str) -> Vec<u8> {
    let mut b = vec![0x83, 0x86]; // :method POST, :scheme http
    let mut literal = |index: u8, value: &str| {
        b.push(index);
        b.push(value.len() as u8);
        b.extend_from_slice(value.as_bytes());
    };
    literal(0x04, &format!("/runtime.v1.ImageService/{method}")); // :path
    literal(0x01, authority); // :authority
    b.extend_from_slice(&[0x0f, 0x10]); // content-type
    b.push(16);
    b.extend_from_slice(b"application/grpc");
    b.extend_from_slice(&[0x00, 2]);
    b.extend_from_slice(b"te");
    b.push(8);
    b.extend_from_slice(b"trailers");
    b
}

/// Connects and opens the HTTP/2 connection (preface, empty SETTINGS).
fn connect(socket: &Path) -> UnixStream {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(PREFACE).unwrap();
    s.write_all(&frame(SETTINGS, 0, 0, &[])).unwrap();
    s
}

/// Writes `frames` until the attack time is over, the daemon stops
/// reading (a write blocks for two seconds: backpressure) or it closes the
/// connection. Returns how many were written.
fn flood(s: &mut UnixStream, mut next: impl FnMut(u64) -> Option<Vec<u8>>) -> u64 {
    let started = Instant::now();
    let mut n = 0;
    while started.elapsed() < ATTACK_TIME {
        let Some(bytes) = next(n) else { break };
        if s.write_all(&bytes).is_err() {
            break;
        }
        n += 1;
    }
    n
}

/// Reads the frames the daemon sends, handing each to `on_frame` (type,
/// flags, stream, payload) until it returns false, the daemon closes the
/// connection, or 10 s pass without a byte.
fn read_frames(s: &mut UnixStream, mut on_frame: impl FnMut(u8, u8, u32, &[u8]) -> bool) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    loop {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        // Whole frames; a partial one waits for the next read.
        let mut at = 0;
        while buf.len() - at >= 9 {
            let len = (usize::from(buf[at]) << 16)
                | (usize::from(buf[at + 1]) << 8)
                | usize::from(buf[at + 2]);
            if buf.len() - at < 9 + len {
                break;
            }
            let stream = u32::from_be_bytes([buf[at + 5], buf[at + 6], buf[at + 7], buf[at + 8]])
                & 0x7fff_ffff;
            if !on_frame(buf[at + 3], buf[at + 4], stream, &buf[at + 9..at + 9 + len]) {
                return;
            }
            at += 9 + len;
        }
        buf.drain(..at);
    }
}

/// Reads what the daemon sent until it closes the connection (or 10 s
/// pass) and returns the GOAWAY error code, if it sent one.
fn goaway_code(s: &mut UnixStream) -> Option<u32> {
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut code = None;
    read_frames(s, |kind, _, _, p| {
        if kind == GOAWAY && p.len() >= 8 {
            code = Some(u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
        }
        true
    });
    code
}

/// Frames on `stream` until it ends or is reset: their types, and the
/// RST_STREAM code if it was reset.
fn frames_of(s: &mut UnixStream, stream: u32) -> (Vec<u8>, Option<u32>) {
    let (mut kinds, mut reset, mut ended) = (Vec::new(), None, false);
    read_frames(s, |kind, flags, id, p| {
        if id != stream {
            return true;
        }
        kinds.push(kind);
        if kind == RST_STREAM {
            reset = Some(u32::from_be_bytes([p[0], p[1], p[2], p[3]]));
            return false;
        }
        ended = flags & END_STREAM != 0;
        !ended
    });
    assert!(
        ended || reset.is_some(),
        "connection closed; stream {stream} saw {kinds:?}"
    );
    (kinds, reset)
}

struct Bench {
    _dir: Option<tempfile::TempDir>,
    upstream: Upstream,
    proxy: ProxyProcess,
    metrics: std::path::PathBuf,
}

/// What the daemon forwards to.
enum Upstream {
    /// The scripted upstream, which records every call it gets.
    Scripted(ScriptedUpstream),
    /// Real containerd 1.6, with a registry holding an image in private
    /// "ECR" and moto for its token: the other client pulls it.
    Containerd(Box<Stack>),
}

/// The image the other client pulls from private ECR when the upstream is
/// real containerd.
fn ecr_image() -> String {
    format!("{ECR_HOST}/app:v1")
}

impl Bench {
    fn scripted(&self) -> &ScriptedUpstream {
        match &self.upstream {
            Upstream::Scripted(u) => u,
            Upstream::Containerd(_) => panic!("this test needs the scripted upstream"),
        }
    }
}

/// The daemon in front of real containerd 1.6 (registry and moto beside
/// it), metrics on a Unix socket.
async fn start_on_containerd() -> Bench {
    let stack = Stack::on(ContainerdVersion::One, &[ECR_HOST]);
    stack.registry.push_image("app", &["v1"]);
    let metrics = stack.dir.path().join("m.sock");
    let proxy = stack.proxy_with_env_args(
        "p",
        &format!("metrics_listen = \"unix:{}\"", metrics.display()),
        stack.moto.env(),
        vec!["--log-level", "info"],
    );
    Bench {
        _dir: None,
        upstream: Upstream::Containerd(Box::new(stack)),
        proxy,
        metrics,
    }
}

async fn start() -> Bench {
    let dir = support::short_tempdir();
    let upstream = ScriptedUpstream::start(&dir.path().join("up.sock")).await;
    let metrics = dir.path().join("m.sock");
    let arg = format!("unix:{}", metrics.display());
    let proxy = ProxyProcess::start(
        dir.path(),
        &upstream.socket,
        ProxyOptions {
            args: vec!["--metrics-listen", &arg, "--log-level", "info"],
            ..Default::default()
        },
    );
    Bench {
        _dir: Some(dir),
        upstream: Upstream::Scripted(upstream),
        proxy,
        metrics,
    }
}

impl Bench {
    fn upstream_up(&self) -> f64 {
        support::metrics::read(&self.metrics, "ecr_pull_proxy_upstream_up", &[])
    }

    /// Runs `attack` on its own connection while another client calls
    /// `ImageFsInfo` every 20 ms; checks memory, the other client and
    /// `upstream_up`, prints the figures, and returns the GOAWAY code the
    /// attacker got.
    async fn run(
        &self,
        name: &str,
        attack: impl FnOnce(&mut UnixStream) -> u64 + Send + 'static,
    ) -> Option<u32> {
        let channel = self.proxy.channel();
        raw::image_fs_info(channel.clone())
            .await
            .expect("a first call");
        if let Upstream::Containerd(_) = &self.upstream {
            // Idle means warmed up: the AWS SDK loaded and the token cached.
            support::stack::pull(channel.clone(), &ecr_image(), None)
                .await
                .expect("a first pull from private ECR");
        }
        assert_eq!(self.upstream_up(), 1.0);
        let (idle_rss, _) = self.proxy.rss_kib();

        let stop = Arc::new(AtomicBool::new(false));
        let direct = match &self.upstream {
            Upstream::Containerd(s) => Some(s.direct()),
            Upstream::Scripted(_) => None,
        };
        let other = {
            let stop = stop.clone();
            tokio::spawn(other_client(channel.clone(), direct, move || {
                !stop.load(Ordering::SeqCst)
            }))
        };
        let socket = self.proxy.socket.clone();
        let pid = self.proxy.pid();
        let peak = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let sampler = {
            let (stop, peak) = (stop.clone(), peak.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    if let Some((rss, _)) = support::rss_kib_of(pid) {
                        peak.fetch_max(rss, Ordering::SeqCst);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        let started = Instant::now();
        let (frames, code) = tokio::task::spawn_blocking(move || {
            let mut s = connect(&socket);
            let frames = attack(&mut s);
            (frames, goaway_code(&mut s))
        })
        .await
        .unwrap();
        let took = started.elapsed();
        stop.store(true, Ordering::SeqCst);
        let (calls, slowest, pulls) = other.await.unwrap();
        sampler.join().unwrap();
        let (_, hwm) = self.proxy.rss_kib();
        let upstream = match &self.upstream {
            Upstream::Scripted(_) => "scripted upstream",
            Upstream::Containerd(_) => "containerd 1.6",
        };
        println!(
            "{name} ({upstream}): {frames} frames in {took:.1?}; GOAWAY {code:?}; daemon RSS idle {idle_rss} KiB, peak {} KiB (VmHWM {hwm} KiB); other client: {calls} calls ({pulls} ECR pulls), slowest {slowest:.1?}",
            peak.load(Ordering::SeqCst)
        );
        if let Upstream::Containerd(s) = &self.upstream {
            assert!(pulls > 0, "{name}: the other client pulled nothing");
            // Each pull was the image from private ECR, with the token.
            assert_eq!(
                s.registry.manifest_requests("app").last(),
                Some(&200),
                "{name}: the registry did not serve the last pull"
            );
            let logs = self.proxy.logs();
            assert!(
                logs.matches("credentials=\"injected\"").count() >= pulls as usize,
                "{name}: {logs}"
            );
        }
        assert!(
            hwm.saturating_sub(idle_rss) < ATTACK_GROWTH_LIMIT_KIB,
            "{name}: the daemon grew from {idle_rss} KiB to {hwm} KiB"
        );
        assert!(calls > 0, "{name}: the other client made no call");
        assert!(
            slowest < SLOWEST_OTHER_CALL,
            "{name}: the other client waited {slowest:?}"
        );
        assert_eq!(
            self.upstream_up(),
            1.0,
            "{name}: a client's misdeeds moved upstream_up"
        );
        raw::image_fs_info(self.proxy.channel())
            .await
            .expect("a new connection is served after the attack");
        let logs = self.proxy.logs();
        assert!(!logs.contains("upstream connection lost"), "{logs}");
        code
    }
}

/// Two tests of one attack (`$attack`, given the bench): against the
/// scripted upstream, and against real containerd 1.6, where the other
/// client also pulls from private ECR and the daemon's upstream connection
/// must ride the attack out.
macro_rules! both_upstreams {
    ($scripted:ident, $containerd:ident, $attack:ident) => {
        #[tokio::test(flavor = "multi_thread")]
        async fn $scripted() {
            $attack(start().await).await;
        }

        #[tokio::test(flavor = "multi_thread")]
        async fn $containerd() {
            $attack(start_on_containerd().await).await;
        }
    };
}

both_upstreams!(
    a_ping_flood_without_reading_is_held_back_not_buffered,
    a_ping_flood_without_reading_is_held_back_not_buffered_on_containerd_1_6,
    a_ping_flood_without_reading_is_held_back_not_buffered_against
);
async fn a_ping_flood_without_reading_is_held_back_not_buffered_against(b: Bench) {
    // h2 answers one PING at a time and reads no more while the answer
    // waits: the flood stops at the socket buffer (backpressure). HTTP/2
    // has no error for it; the connection is simply not read.
    b.run("PING flood", |s| {
        flood(s, |n| Some(frame(PING, 0, 0, &n.to_be_bytes())))
    })
    .await;
}

both_upstreams!(
    tiny_data_frames_on_an_open_call_stay_bounded,
    tiny_data_frames_on_an_open_call_stay_bounded_on_containerd_1_6,
    tiny_data_frames_on_an_open_call_stay_bounded_against
);
async fn tiny_data_frames_on_an_open_call_stay_bounded_against(b: Bench) {
    // Legal, if silly: the call's body streams on to the upstream as it
    // comes, under flow control, and nothing piles up in the daemon (`run`
    // checks memory and the other client). HTTP/2 prescribes no error.
    let code = b
        .run("1-byte DATA flood", |s| {
            let block = request_headers("ImageFsInfo");
            s.write_all(&frame(HEADERS, END_HEADERS, 1, &block))
                .unwrap();
            flood(s, |_| Some(frame(DATA, 0, 1, &[0])))
        })
        .await;
    assert!(
        code.is_none() || code == Some(ENHANCE_YOUR_CALM),
        "{code:?}"
    );
}

both_upstreams!(
    data_on_an_idle_stream_is_a_protocol_error,
    data_on_an_idle_stream_is_a_protocol_error_on_containerd_1_6,
    data_on_an_idle_stream_is_a_protocol_error_against
);
async fn data_on_an_idle_stream_is_a_protocol_error_against(b: Bench) {
    let code = b
        .run("DATA on idle streams", |s| {
            flood(s, |n| Some(frame(DATA, 0, 2 * n as u32 + 1, &[0; 64])))
        })
        .await;
    assert_eq!(code, Some(PROTOCOL_ERROR));
}

both_upstreams!(
    a_settings_flood_without_reading_is_held_back,
    a_settings_flood_without_reading_is_held_back_on_containerd_1_6,
    a_settings_flood_without_reading_is_held_back_against
);
async fn a_settings_flood_without_reading_is_held_back_against(b: Bench) {
    b.run("SETTINGS flood", |s| {
        // SETTINGS_INITIAL_WINDOW_SIZE, again and again.
        flood(s, |n| {
            let mut p = vec![0, 4];
            p.extend_from_slice(&(65_535 + (n as u32 % 1000)).to_be_bytes());
            Some(frame(SETTINGS, 0, 0, &p))
        })
    })
    .await;
}

both_upstreams!(
    a_continuation_flood_closes_the_connection,
    a_continuation_flood_closes_the_connection_on_containerd_1_6,
    a_continuation_flood_closes_the_connection_against
);
async fn a_continuation_flood_closes_the_connection_against(b: Bench) {
    let code = b
        .run("CONTINUATION flood", |s| {
            let block = request_headers("ImageFsInfo");
            s.write_all(&frame(HEADERS, 0, 1, &block)).unwrap();
            let filler = [0x00u8, 1, b'x', 100]
                .iter()
                .copied()
                .chain([b'y'; 100])
                .collect::<Vec<_>>();
            flood(s, |_| Some(frame(CONTINUATION, 0, 1, &filler)))
        })
        .await;
    assert_eq!(code, Some(ENHANCE_YOUR_CALM));
}

both_upstreams!(
    a_frame_announcing_sixteen_mib_is_a_frame_size_error,
    a_frame_announcing_sixteen_mib_is_a_frame_size_error_on_containerd_1_6,
    a_frame_announcing_sixteen_mib_is_a_frame_size_error_against
);
async fn a_frame_announcing_sixteen_mib_is_a_frame_size_error_against(b: Bench) {
    let code = b
        .run("16 MiB frame header", |s| {
            let mut header = frame(HEADERS, END_HEADERS, 1, &[]);
            header[0] = 0xff;
            header[1] = 0xff;
            header[2] = 0xff;
            let _ = s.write_all(&header);
            flood(s, |n| (n < 256).then(|| vec![0u8; 64 * 1024]))
        })
        .await;
    assert_eq!(code, Some(FRAME_SIZE_ERROR));
}

both_upstreams!(
    rapid_reset_is_bounded,
    rapid_reset_is_bounded_on_containerd_1_6,
    rapid_reset_is_bounded_against
);
async fn rapid_reset_is_bounded_against(b: Bench) {
    let code = b
        .run("rapid reset", |s| {
            let block = request_headers("ImageFsInfo");
            flood(s, |n| {
                if n >= 10_000 {
                    return None;
                }
                let id = 2 * n as u32 + 1;
                let mut f = frame(HEADERS, END_HEADERS, id, &block);
                f.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
                Some(f)
            })
        })
        .await;
    // h2 either closes the connection (ENHANCE_YOUR_CALM) or keeps
    // resetting streams as they come; both keep the daemon whole, which
    // `run` checks. A GOAWAY, if any, is that one.
    assert!(
        code.is_none() || code == Some(ENHANCE_YOUR_CALM),
        "{code:?}"
    );
}

both_upstreams!(
    ten_thousand_streams_at_once_are_refused_past_the_limit,
    ten_thousand_streams_at_once_are_refused_past_the_limit_on_containerd_1_6,
    ten_thousand_streams_at_once_are_refused_past_the_limit_against
);
async fn ten_thousand_streams_at_once_are_refused_past_the_limit_against(b: Bench) {
    let code = b
        .run("10,000 streams", |s| {
            let block = request_headers("ImageFsInfo");
            flood(s, |n| {
                (n < 10_000).then(|| frame(HEADERS, END_HEADERS, 2 * n as u32 + 1, &block))
            })
        })
        .await;
    assert_eq!(code, Some(ENHANCE_YOUR_CALM));
}

/// The attacker's header block is a valid call: sent well, it is answered
/// (so the attacks above send the requests they claim to send).
#[tokio::test(flavor = "multi_thread")]
async fn the_attackers_request_is_a_valid_call() {
    let b = start().await;
    let socket = b.proxy.socket.clone();
    let (kinds, reset) = tokio::task::spawn_blocking(move || {
        let mut s = connect(&socket);
        let block = request_headers("ImageFsInfo");
        s.write_all(&frame(HEADERS, END_HEADERS, 1, &block))
            .unwrap();
        s.write_all(&frame(DATA, END_STREAM, 1, &[0; 5])).unwrap();
        frames_of(&mut s, 1)
    })
    .await
    .unwrap();
    assert_eq!(reset, None);
    // Headers, the answer's message, trailers.
    assert_eq!(kinds, [HEADERS, DATA, HEADERS]);
}

/// A caller that sends its socket path as `:authority` (kubelet and
/// crictl before 1.31, grpcio 1.57 and later, grpc-java) is served, as
/// containerd serves it (the patched h2, third_party/h2-authority.patch):
/// the call reaches the upstream with `localhost`, and so does the next
/// one on the connection.
#[tokio::test(flavor = "multi_thread")]
async fn a_socket_path_as_authority_is_served_and_reaches_the_upstream_as_localhost() {
    let b = start().await;
    let socket = b.proxy.socket.clone();
    let (first, second) = tokio::task::spawn_blocking(move || {
        let mut s = connect(&socket);
        let path = socket.to_str().unwrap().to_owned();
        let raw = request_headers_with_authority("ImageFsInfo", &path);
        s.write_all(&frame(HEADERS, END_HEADERS, 1, &raw)).unwrap();
        s.write_all(&frame(DATA, END_STREAM, 1, &[0; 5])).unwrap();
        let first = frames_of(&mut s, 1);
        s.write_all(&frame(
            HEADERS,
            END_HEADERS,
            3,
            &request_headers("ImageFsInfo"),
        ))
        .unwrap();
        s.write_all(&frame(DATA, END_STREAM, 3, &[0; 5])).unwrap();
        (first, frames_of(&mut s, 3))
    })
    .await
    .unwrap();
    assert_eq!(first, (vec![HEADERS, DATA, HEADERS], None));
    assert_eq!(second, (vec![HEADERS, DATA, HEADERS], None));
    let calls = b.scripted().calls();
    assert_eq!(calls.len(), 2);
    for c in calls {
        assert_eq!(c.authority.as_deref(), Some("localhost"));
    }
}

// === the memory budget and isolation (README "Memory budget") ===

use bytes::Bytes;
use ecr_pull_proxy::budget::{
    MAX_PULL_MESSAGE_SIZE, PULL_BUFFER_PER_CONNECTION, PULL_MESSAGE_TIMEOUT,
};
use ecr_pull_proxy::transport::server::{
    CONNECTION_LIMIT_WARNING_INTERVAL, MAX_CONCURRENT_STREAMS, MAX_CONNECTIONS,
    MAX_PENDING_ACCEPT_RESET_STREAMS, MAX_REQUEST_HEADER_LIST_SIZE,
};

/// Growth of the daemon's peak memory (VmHWM minus its RSS before the
/// attack) the floods below stay under.
const GROWTH_LIMIT_KIB: u64 = 200 * 1024;
/// The other client's slowest call during a flood stays under this.
const OTHER_CALL_LIMIT: Duration = Duration::from_secs(1);

/// The daemon's peak memory grew by less than the budget during a flood,
/// and the other client's slowest call stayed under its bound.
fn assert_within_budget(idle_kib: u64, hwm_kib: u64, slowest: Duration) {
    assert!(
        hwm_kib - idle_kib < GROWTH_LIMIT_KIB,
        "the daemon grew by {} KiB",
        hwm_kib - idle_kib
    );
    assert!(
        slowest < OTHER_CALL_LIMIT,
        "the other client waited {slowest:?}"
    );
}

/// Another client (its own connection) calling `ImageFsInfo` and
/// `PullImage` (answered by the scripted upstream) every 20 ms until
/// `stop`: (calls, slowest).
fn other_client_with_scripted_pulls(
    proxy: &ProxyProcess,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(u32, Duration)> {
    let channel = proxy.channel();
    tokio::spawn(async move {
        let (mut calls, mut slowest) = (0u32, Duration::ZERO);
        // PullImageRequest { image: { image: "registry.example/app:v1" } }:
        // no pattern matches it, so the scripted upstream's echo answers.
        let image = b"registry.example/app:v1";
        let mut pull = vec![0x0a, image.len() as u8 + 2, 0x0a, image.len() as u8];
        pull.extend_from_slice(image);
        while !stop.load(Ordering::SeqCst) || calls < 4 {
            let started = Instant::now();
            tokio::time::timeout(Duration::from_secs(30), raw::image_fs_info(channel.clone()))
                .await
                .expect("ImageFsInfo answered")
                .expect("ImageFsInfo OK");
            slowest = slowest.max(started.elapsed());
            let started = Instant::now();
            tokio::time::timeout(
                Duration::from_secs(30),
                raw::unary(
                    channel.clone(),
                    "/runtime.v1.ImageService/PullImage",
                    tonic::Request::new(Bytes::from(pull.clone())),
                ),
            )
            .await
            .expect("PullImage answered")
            .expect("PullImage OK");
            slowest = slowest.max(started.elapsed());
            calls += 2;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (calls, slowest)
    })
}

/// Floods of `PullImage` messages from `MAX_CONNECTIONS - 1` connections
/// (the other client has the last), each with every stream it may open:
/// announced 16 MiB; announced 2 MiB and fed as fast as flow control
/// allows, never finished; announced small and sent huge, finished. Every
/// stream is refused (`ResourceExhausted`), or ends `DeadlineExceeded`
/// after the message timeout; memory growth stays under the budget, and
/// the other client's calls, pulls included, answer within a second.
#[tokio::test(flavor = "multi_thread")]
async fn pull_message_floods_are_bounded_and_other_callers_are_answered() {
    let b = start().await;
    raw::image_fs_info(b.proxy.channel()).await.unwrap();
    let (idle, _) = b.proxy.rss_kib();
    let stop = Arc::new(AtomicBool::new(false));
    let other = other_client_with_scripted_pulls(&b.proxy, stop.clone());

    let codes = flood::pull_message_flood(
        &b.proxy.socket,
        MAX_CONNECTIONS - 1,
        MAX_CONCURRENT_STREAMS as usize,
        MAX_PULL_MESSAGE_SIZE,
        PULL_MESSAGE_TIMEOUT * 3,
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    let (calls, slowest) = other.await.unwrap();
    let (_, hwm) = b.proxy.rss_kib();
    println!(
        "PullImage flood: {} streams on {} connections; codes {codes:?}; daemon RSS idle {idle} KiB, VmHWM {hwm} KiB (+{} KiB); other client: {calls} calls, slowest {slowest:.1?}",
        (MAX_CONNECTIONS - 1) * MAX_CONCURRENT_STREAMS as usize,
        MAX_CONNECTIONS - 1,
        hwm - idle
    );
    // Refused at once (8, ResourceExhausted), or held until the message
    // timeout (4, DeadlineExceeded): none reached the upstream.
    assert!(codes.keys().all(|c| c == "8" || c == "4"), "{codes:?}");
    assert!(codes.get("8").copied().unwrap_or(0) > 0, "{codes:?}");
    assert!(codes.get("4").copied().unwrap_or(0) > 0, "{codes:?}");
    assert!(
        b.scripted()
            .calls()
            .iter()
            .all(|c| c.path.ends_with("ImageFsInfo") || c.body.len() < 1024),
        "a flooding pull reached the upstream"
    );
    assert_within_budget(idle, hwm, slowest);
    let logs = b.proxy.logs();
    assert!(
        logs.contains("PullImage request is larger than 2097152 bytes"),
        "{logs}"
    );
    assert!(
        logs.contains(&format!(
            "would take more than the {PULL_BUFFER_PER_CONNECTION} bytes allowed"
        )),
        "{logs}"
    );
    assert!(logs.contains("did not arrive within 10s"), "{logs}");
}

/// Callers that never read the 8 MiB answers they asked for, from every
/// connection the limits allow with every stream: each stalls only its
/// own connection (it has its own upstream connection), memory growth
/// stays under the budget, and the other client's calls answer within a
/// second. Against one shared upstream connection, eight such streams
/// stopped every other caller (issue #23).
#[tokio::test(flavor = "multi_thread")]
async fn callers_that_never_read_large_answers_stall_only_themselves() {
    let b = start().await;
    raw::image_fs_info(b.proxy.channel()).await.unwrap();
    let (idle, _) = b.proxy.rss_kib();
    let held = flood::stalled_readers(
        &b.proxy.socket,
        MAX_CONNECTIONS - 1,
        MAX_CONCURRENT_STREAMS as usize,
        "ListImages",
        Some("big:8388608"),
    )
    .await;
    // Let every stalled answer fill what it can.
    support::eventually(
        Duration::from_secs(60),
        "the stalled answers reach the upstream",
        || b.scripted().calls().len() > (MAX_CONNECTIONS - 1) * MAX_CONCURRENT_STREAMS as usize / 2,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let other = other_client_with_scripted_pulls(&b.proxy, stop.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    let (calls, slowest) = other.await.unwrap();
    let (_, hwm) = b.proxy.rss_kib();
    println!(
        "stalled readers: {} streams asking 8 MiB each on {} connections, upstream saw {}; daemon RSS idle {idle} KiB, VmHWM {hwm} KiB (+{} KiB); other client: {calls} calls, slowest {slowest:.1?}",
        (MAX_CONNECTIONS - 1) * MAX_CONCURRENT_STREAMS as usize,
        MAX_CONNECTIONS - 1,
        b.scripted().calls().len(),
        hwm - idle
    );
    assert_within_budget(idle, hwm, slowest);
    for h in held {
        h.abort();
    }
}

/// One process that opens connections and never closes them (as critest
/// does, a client per spec) cannot lock others out: at `MAX_CONNECTIONS`,
/// its own longest-idle connection gives way to each new one. It opens 64,
/// then 2,000; every one is served, `connections_open` never passes the
/// limit, crictl and kubelet 1.30's CRI client (other processes) connect
/// and call within a second, memory growth stays within the budget, and
/// the daemon says so once per `CONNECTION_LIMIT_WARNING_INTERVAL`, naming
/// the process whose connection it closed.
#[tokio::test(flavor = "multi_thread")]
async fn a_process_holding_connections_never_locks_out_another() {
    let b = start().await;
    raw::image_fs_info(b.proxy.channel()).await.unwrap();
    let (idle, _) = b.proxy.rss_kib();
    let kubelet_client = support::kubelet_1_30_client();
    let started = Instant::now();
    let mut held = Vec::new();
    for round in [64usize, 2000] {
        while held.len() < round {
            // Eight at a time, each served within 5 s.
            let batch = (round - held.len()).min(8);
            let opened = futures_util::future::join_all((0..batch).map(|_| {
                tokio::time::timeout(
                    Duration::from_secs(5),
                    served_connection(b.proxy.socket.clone()),
                )
            }))
            .await;
            for o in opened {
                let (send, code) =
                    o.unwrap_or_else(|_| panic!("a connection near {} waited", held.len() + 1));
                assert_eq!(code.as_deref(), Some("0"));
                held.push(send);
            }
        }
        let open = support::metrics::read(&b.metrics, "ecr_pull_proxy_connections_open", &[]);
        assert!(open <= MAX_CONNECTIONS as f64, "{open} connections open");
        // Other processes get in at once.
        let endpoint = format!("unix://{}", b.proxy.socket.display());
        let t = Instant::now();
        let out = std::process::Command::new(support::crictl())
            .args([
                "--runtime-endpoint",
                &endpoint,
                "--image-endpoint",
                &endpoint,
            ])
            .args(["imagefsinfo"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "crictl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "crictl took {:?}",
            t.elapsed()
        );
        let t = Instant::now();
        let out = std::process::Command::new(&kubelet_client)
            .args([b.proxy.socket.to_str().unwrap(), "registry.example/app:v1"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.lines().any(|l| l.starts_with("ImageFsInfo OK")),
            "kubelet 1.30's CRI client: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "kubelet 1.30's client took {:?}",
            t.elapsed()
        );
    }
    let (_, hwm) = b.proxy.rss_kib();
    println!(
        "held connections: 2,000 opened by one process; daemon RSS idle {idle} KiB, VmHWM {hwm} KiB (+{} KiB)",
        hwm - idle
    );
    assert_within_budget(idle, hwm, Duration::ZERO);
    let logs = b.proxy.logs();
    let warning = "client connection limit reached; closing the longest-idle connection";
    assert_eq!(logs.matches(warning).count(), 1, "{logs}");
    let me = format!("closed=pid {} uid 0", std::process::id());
    assert!(logs.contains(&me), "{logs}");
    assert!(started.elapsed() < CONNECTION_LIMIT_WARNING_INTERVAL);
}

/// When every connection has a call in flight, none is closed: the new
/// one waits until one closes (the bound the memory budget counts on).
#[tokio::test(flavor = "multi_thread")]
async fn when_every_connection_is_busy_a_new_one_waits() {
    let b = start().await;
    let mut busy = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        busy.push(hanging_call(b.proxy.socket.clone()).await);
    }
    support::eventually(
        Duration::from_secs(10),
        "every call reaches the upstream",
        || b.scripted().calls().len() == MAX_CONNECTIONS,
    )
    .await;
    let waiting = tokio::spawn(served_connection(b.proxy.socket.clone()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !waiting.is_finished(),
        "a connection past the limit was served"
    );
    assert!(
        b.proxy
            .logs()
            .contains("every connection has a call in flight"),
        "{}",
        b.proxy.logs()
    );
    drop(busy.pop());
    let (_send, code) = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("served once a connection closed")
        .unwrap();
    assert_eq!(code.as_deref(), Some("0"));
}

/// A connection with one call the scripted upstream never answers; both
/// end when the returned handles are dropped.
async fn hanging_call(
    socket: PathBuf,
) -> (
    h2::client::SendRequest<Bytes>,
    h2::SendStream<Bytes>,
    h2::client::ResponseFuture,
) {
    let mut send = h2_connect(&socket).await;
    send = send.ready().await.unwrap();
    let (resp, mut tx) = send
        .send_request(grpc_request("ImageFsInfo", Some("hang")), false)
        .unwrap();
    tx.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .unwrap();
    (send, tx, resp)
}

/// A new connection to the proxy with one `ImageFsInfo` answered: the
/// connection (open while it is held) and the call's grpc-status.
async fn served_connection(socket: PathBuf) -> (h2::client::SendRequest<Bytes>, Option<String>) {
    let mut send = h2_connect(&socket).await;
    send = send.ready().await.unwrap();
    let (resp, mut tx) = send
        .send_request(grpc_request("ImageFsInfo", None), false)
        .unwrap();
    tx.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .unwrap();
    let code = grpc_code(resp).await;
    (send, code)
}

/// Exactly `MAX_CONCURRENT_STREAMS` calls of one connection reach the
/// upstream at once; h2 refuses the streams past it.
#[tokio::test(flavor = "multi_thread")]
async fn exactly_max_concurrent_streams_calls_reach_the_upstream() {
    let b = start().await;
    let socket = b.proxy.socket.clone();
    let extra = 16u32;
    let refused = tokio::task::spawn_blocking(move || {
        let mut s = connect(&socket);
        let mut block = request_headers("ImageFsInfo");
        // x-script: hang (literal without indexing, new name).
        block.extend_from_slice(&[0x00, 8]);
        block.extend_from_slice(b"x-script");
        block.push(4);
        block.extend_from_slice(b"hang");
        for n in 0..MAX_CONCURRENT_STREAMS + extra {
            let id = 2 * n + 1;
            s.write_all(&frame(HEADERS, END_HEADERS, id, &block))
                .unwrap();
            s.write_all(&frame(DATA, END_STREAM, id, &[0; 5])).unwrap();
        }
        let mut refused = 0;
        read_frames(&mut s, |kind, _, _, _| {
            if kind == RST_STREAM {
                refused += 1;
            }
            refused < extra
        });
        (refused, s)
    })
    .await
    .unwrap();
    assert_eq!(refused.0, extra);
    support::eventually(
        Duration::from_secs(10),
        "the calls reach the upstream",
        || b.scripted().calls().len() == MAX_CONCURRENT_STREAMS as usize,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(b.scripted().calls().len(), MAX_CONCURRENT_STREAMS as usize);
}

/// A header block as HEADERS and CONTINUATION frames of at most 16 KiB.
fn header_frames(stream: u32, block: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let chunks: Vec<&[u8]> = block.chunks(16 * 1024).collect();
    for (i, c) in chunks.iter().enumerate() {
        let kind = if i == 0 { HEADERS } else { CONTINUATION };
        let flags = if i + 1 == chunks.len() {
            END_HEADERS
        } else {
            0
        };
        out.extend(frame(kind, flags, stream, c));
    }
    out
}

/// A request header block just under `MAX_REQUEST_HEADER_LIST_SIZE` is
/// served; just over, it is refused and never reaches the upstream.
#[tokio::test(flavor = "multi_thread")]
async fn header_blocks_past_the_limit_are_refused() {
    let b = start().await;
    let socket = b.proxy.socket.clone();
    let (under, over) = tokio::task::spawn_blocking(move || {
        let mut s = connect(&socket);
        // h2 counts each field as name + value + 32 bytes.
        let base = {
            let fields = [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", "/runtime.v1.ImageService/ImageFsInfo"),
                (":authority", "localhost"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ];
            fields
                .iter()
                .map(|(n, v)| n.len() + v.len() + 32)
                .sum::<usize>()
        };
        let with_padding = |total: usize| {
            let value_len = total - base - "x-pad".len() - 32;
            let mut block = request_headers("ImageFsInfo");
            block.extend_from_slice(&[0x00, 5]);
            block.extend_from_slice(b"x-pad");
            // HPACK length prefix (7-bit with continuation).
            let mut n = value_len - 127;
            block.push(0x7f);
            while n >= 128 {
                block.push((n % 128) as u8 | 0x80);
                n /= 128;
            }
            block.push(n as u8);
            block.extend(std::iter::repeat_n(b'p', value_len));
            block
        };
        let limit = MAX_REQUEST_HEADER_LIST_SIZE as usize;
        // h2 refuses a list that reaches the limit: one byte less is the
        // largest served.
        s.write_all(&header_frames(1, &with_padding(limit - 1)))
            .unwrap();
        s.write_all(&frame(DATA, END_STREAM, 1, &[0; 5])).unwrap();
        let under = frames_of(&mut s, 1);
        s.write_all(&header_frames(3, &with_padding(limit)))
            .unwrap();
        s.write_all(&frame(DATA, END_STREAM, 3, &[0; 5])).unwrap();
        let over = frames_of(&mut s, 3);
        (under, over)
    })
    .await
    .unwrap();
    assert_eq!(under, (vec![HEADERS, DATA, HEADERS], None));
    assert_ne!(over.0.first(), Some(&DATA), "{over:?}");
    assert_eq!(
        b.scripted().calls().len(),
        1,
        "only the one under the limit"
    );
}

/// `resets` streams opened and reset in one write (so that all of them
/// are reset before the daemon accepts any), then a valid `ImageFsInfo`
/// on the same connection: `Ok(())` when that call is answered, or the
/// GOAWAY code the connection was closed with.
fn resets_then_a_call(socket: &Path, resets: usize) -> Result<(), Option<u32>> {
    let mut s = connect(socket);
    let block = request_headers("ImageFsInfo");
    let mut burst = Vec::new();
    for n in 0..resets {
        let id = 2 * n as u32 + 1;
        burst.extend(frame(HEADERS, END_HEADERS, id, &block));
        burst.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
    }
    let call = 2 * resets as u32 + 1;
    burst.extend(frame(HEADERS, END_HEADERS, call, &block));
    burst.extend(frame(DATA, END_STREAM, call, &[0; 5]));
    s.write_all(&burst).unwrap();
    let (mut answered, mut goaway) = (false, None);
    read_frames(&mut s, |kind, flags, id, p| {
        if kind == GOAWAY && p.len() >= 8 {
            goaway = Some(u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
            return false;
        }
        if id == call && kind == HEADERS && flags & END_STREAM != 0 {
            answered = true;
            return false;
        }
        true
    });
    if answered {
        Ok(())
    } else {
        Err(goaway)
    }
}

/// Rapid reset at h2's limit, `MAX_PENDING_ACCEPT_RESET_STREAMS`: that
/// many streams reset before the daemon accepts them are taken, and the
/// connection then serves a call; one more closes the connection with
/// `ENHANCE_YOUR_CALM`. Five times each, as the limit must hold every
/// time.
#[tokio::test(flavor = "multi_thread")]
async fn rapid_reset_just_under_the_limit_is_served_and_one_more_is_refused() {
    let b = start().await;
    let socket = b.proxy.socket.clone();
    let results = tokio::task::spawn_blocking(move || {
        (0..5)
            .map(|_| {
                (
                    resets_then_a_call(&socket, MAX_PENDING_ACCEPT_RESET_STREAMS),
                    resets_then_a_call(&socket, MAX_PENDING_ACCEPT_RESET_STREAMS + 1),
                )
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for (at_limit, past_it) in results {
        assert_eq!(
            at_limit,
            Ok(()),
            "{MAX_PENDING_ACCEPT_RESET_STREAMS} resets"
        );
        assert_eq!(
            past_it,
            Err(Some(ENHANCE_YOUR_CALM)),
            "{} resets",
            MAX_PENDING_ACCEPT_RESET_STREAMS + 1
        );
    }
    raw::image_fs_info(b.proxy.channel())
        .await
        .expect("other connections are served");
}

/// Image names the node of the next test holds: the longest a reference
/// may be (an ECR host and a 210-character repository make the 255
/// characters a name may have, plus a 128-character tag), each in a
/// repository of its own, 20 to an image. containerd takes about 250 a
/// second (a synced write each).
const NODE_IMAGE_NAMES: usize = 7_000;

/// Real containerd 1.6 holding `NODE_IMAGE_NAMES` image names, so that its
/// `ListImages` answer is more than 2 MiB: callers that ask for it and never
/// read (8 streams on each of 8 connections; containerd marshals each
/// answer whole and holds it until it is sent, so more would be
/// containerd's memory, not the daemon's, that the test measures) stall
/// only themselves. The daemon's memory growth stays under
/// the budget, and another client's `ImageFsInfo` calls and pulls from
/// private ECR answer within a second, through the same daemon.
#[tokio::test(flavor = "multi_thread")]
async fn callers_that_never_read_containerds_multi_mib_list_stall_only_themselves() {
    use ecr_pull_proxy::cri;
    use prost::Message;
    let mut b = start_on_containerd().await;
    let Upstream::Containerd(stack) = &mut b.upstream else {
        unreachable!()
    };
    let repo = "r".repeat(255 - ECR_HOST.len() - 1 - 5);
    let names: Vec<String> = (0..NODE_IMAGE_NAMES)
        .map(|i| format!("{ECR_HOST}/{repo}{i:05}:{}", "t".repeat(128)))
        .collect();
    let imported = Instant::now();
    stack.containerd.import_names(&names, 20);
    stack.containerd.restart();
    println!(
        "containerd restarted {:.1?} after the import began",
        imported.elapsed()
    );
    let stack = &*stack;
    // What containerd answers, read in full, once it lists them all.
    let (size, listed) = loop {
        let list = support::stack::client(stack.direct())
            .list_images(cri::ListImagesRequest::default())
            .await
            .unwrap()
            .into_inner();
        let listed: usize = list.images.iter().map(|i| i.repo_tags.len()).sum();
        if listed >= NODE_IMAGE_NAMES {
            break (list.encoded_len(), listed);
        }
        assert!(
            imported.elapsed() < Duration::from_secs(300),
            "containerd lists {listed} of the {NODE_IMAGE_NAMES} names"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    println!(
        "containerd took the {NODE_IMAGE_NAMES} names in {:.1?}",
        imported.elapsed()
    );
    assert!(size > 2 * 1024 * 1024, "ListImages is only {size} bytes");

    support::stack::pull(b.proxy.channel(), &ecr_image(), None)
        .await
        .expect("a first pull from private ECR");
    let (idle, _) = b.proxy.rss_kib();
    let held = flood::stalled_readers(&b.proxy.socket, 8, 8, "ListImages", None).await;
    // Let every stalled answer fill what it can.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (calls, slowest, pulls) = other_client_on_containerd(&b, Duration::from_secs(3)).await;
    let (_, hwm) = b.proxy.rss_kib();
    println!(
        "stalled readers of containerd's {size}-byte ListImages ({listed} names): 64 streams on 8 connections; daemon RSS idle {idle} KiB, VmHWM {hwm} KiB (+{} KiB); other client: {calls} calls ({pulls} ECR pulls), slowest {slowest:.1?}",
        hwm - idle
    );
    assert!(pulls > 0);
    assert_within_budget(idle, hwm, slowest);
    for h in held {
        h.abort();
    }
}

/// Another client, while `go_on` says so (and for three calls at least,
/// even when an attack is over in a millisecond): `ImageFsInfo` every
/// 20 ms and, given `direct` (real containerd), a pull of the private ECR
/// image every tenth call, removed first so that containerd downloads it
/// again; each call within 30 s. Returns (calls, slowest, pulls).
async fn other_client(
    channel: Channel,
    direct: Option<Channel>,
    mut go_on: impl FnMut() -> bool,
) -> (u32, Duration, u32) {
    let (mut calls, mut slowest, mut pulls) = (0u32, Duration::ZERO, 0u32);
    while go_on() || calls < 3 {
        let at = Instant::now();
        tokio::time::timeout(Duration::from_secs(30), raw::image_fs_info(channel.clone()))
            .await
            .expect("the other client's ImageFsInfo answered")
            .expect("the other client's ImageFsInfo");
        slowest = slowest.max(at.elapsed());
        if let Some(direct) = direct.as_ref().filter(|_| calls % 10 == 0) {
            support::stack::remove(direct.clone(), &ecr_image()).await;
            let at = Instant::now();
            tokio::time::timeout(
                Duration::from_secs(30),
                support::stack::pull(channel.clone(), &ecr_image(), None),
            )
            .await
            .expect("the other client's pull answered")
            .expect("the other client's pull from private ECR");
            slowest = slowest.max(at.elapsed());
            pulls += 1;
        }
        calls += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (calls, slowest, pulls)
}

/// [`other_client`] against real containerd for `time`.
async fn other_client_on_containerd(b: &Bench, time: Duration) -> (u32, Duration, u32) {
    let Upstream::Containerd(stack) = &b.upstream else {
        unreachable!()
    };
    let started = Instant::now();
    other_client(b.proxy.channel(), Some(stack.direct()), move || {
        started.elapsed() < time
    })
    .await
}

/// The `PullImage` message flood of
/// `pull_message_floods_are_bounded_and_other_callers_are_answered`, with
/// real containerd 1.6 behind the daemon: meanwhile another client's
/// `ImageFsInfo` calls, and its pulls of an image in private ECR (removed
/// first, so that each downloads with the injected token), answer within a
/// second, and the daemon's growth stays under the budget.
#[tokio::test(flavor = "multi_thread")]
async fn pull_message_floods_leave_real_ecr_pulls_answering_within_a_second() {
    let b = start_on_containerd().await;
    support::stack::pull(b.proxy.channel(), &ecr_image(), None)
        .await
        .expect("a first pull from private ECR");
    let (idle, _) = b.proxy.rss_kib();
    let (codes, (calls, slowest, pulls)) = tokio::join!(
        flood::pull_message_flood(
            &b.proxy.socket,
            MAX_CONNECTIONS - 1,
            MAX_CONCURRENT_STREAMS as usize,
            MAX_PULL_MESSAGE_SIZE,
            PULL_MESSAGE_TIMEOUT * 3,
        ),
        other_client_on_containerd(&b, PULL_MESSAGE_TIMEOUT),
    );
    let (_, hwm) = b.proxy.rss_kib();
    println!(
        "PullImage flood (containerd 1.6): codes {codes:?}; daemon RSS idle {idle} KiB, VmHWM {hwm} KiB (+{} KiB); other client: {calls} calls ({pulls} ECR pulls), slowest {slowest:.1?}",
        hwm - idle
    );
    assert!(codes.keys().all(|c| c == "8" || c == "4"), "{codes:?}");
    assert!(pulls >= 5, "only {pulls} pulls");
    assert_within_budget(idle, hwm, slowest);
}

/// The metrics endpoint is bounded like the CRI side: at most
/// `MAX_ADMIN_CONNECTIONS` at once (past it a new connection is closed at
/// once), and a connection that sends nothing or trickles its headers is
/// closed after `ADMIN_HEADER_READ_TIMEOUT`; then it answers again.
#[tokio::test(flavor = "multi_thread")]
async fn the_metrics_endpoint_bounds_connections_and_header_time() {
    use ecr_pull_proxy::ops::admin::{ADMIN_HEADER_READ_TIMEOUT, MAX_ADMIN_CONNECTIONS};
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let b = start().await;
    let closed_within = |mut s: UnixStream, limit: Duration| {
        s.set_read_timeout(Some(limit)).unwrap();
        let mut buf = [0u8; 64];
        matches!(s.read(&mut buf), Ok(0) | Err(_)) && {
            // Not a timeout of ours: the daemon closed it.
            let mut again = [0u8; 1];
            matches!(s.read(&mut again), Ok(0))
        }
    };
    let started = Instant::now();
    let silent: Vec<UnixStream> = (0..MAX_ADMIN_CONNECTIONS - 1)
        .map(|_| UnixStream::connect(&b.metrics).unwrap())
        .collect();
    // The last slot: a client that sends one header byte a second, never
    // finishing; the daemon must close it after the header timeout too.
    let mut trickler = UnixStream::connect(&b.metrics).unwrap();
    let reader = trickler.try_clone().unwrap();
    std::thread::spawn(move || {
        for c in b"GET /metrics HTTP/1.1\r\nHost: x\r\n"
            .iter()
            .cycle()
            .take(60)
        {
            if trickler.write_all(&[*c]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    // Give the daemon time to take every one of them.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // One past the limit is closed at once.
    let extra = UnixStream::connect(&b.metrics).unwrap();
    assert!(
        closed_within(extra, Duration::from_secs(2)),
        "a connection past the limit was kept"
    );
    assert!(b
        .proxy
        .logs()
        .contains("metrics endpoint: connection limit reached"));
    assert!(
        closed_within(reader, ADMIN_HEADER_READ_TIMEOUT + Duration::from_secs(5)),
        "a client trickling its headers was kept past {ADMIN_HEADER_READ_TIMEOUT:?}"
    );
    // The silent ones are closed by the daemon after the header timeout.
    for s in silent {
        assert!(
            closed_within(s, ADMIN_HEADER_READ_TIMEOUT + Duration::from_secs(5)),
            "a silent connection was kept past {ADMIN_HEADER_READ_TIMEOUT:?}"
        );
    }
    assert!(started.elapsed() >= ADMIN_HEADER_READ_TIMEOUT);
    // And the endpoint answers again.
    support::eventually(Duration::from_secs(10), "/healthz answers", || {
        support::get_unix(&b.metrics, "/healthz").contains("ok")
    })
    .await;
}
