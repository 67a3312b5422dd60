//! A broken or hostile local client against the daemon, one attack per
//! test, while another client keeps calling `ImageFsInfo`: the daemon's
//! memory stays bounded, the other client's calls keep answering, the
//! abusive connection is closed with the GOAWAY code HTTP/2 prescribes
//! (where the attack is a protocol violation), and `upstream_up` does not
//! move, because a client's misdeeds say nothing about containerd.
//!
//! The attacker writes HTTP/2 frames by hand: no client library would send
//! these.

mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::raw;
use support::scripted::ScriptedUpstream;
use support::{ProxyOptions, ProxyProcess};

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
/// The daemon's peak resident memory during any attack stays under this.
const RSS_LIMIT_KIB: u64 = 64 * 1024;
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
    _dir: tempfile::TempDir,
    _upstream: ScriptedUpstream,
    proxy: ProxyProcess,
    metrics: std::path::PathBuf,
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
        _dir: dir,
        _upstream: upstream,
        proxy,
        metrics,
    }
}

impl Bench {
    fn upstream_up(&self) -> String {
        let out = support::get_unix(&self.metrics, "/metrics");
        out.lines()
            .find(|l| l.starts_with("ecr_pull_proxy_upstream_up "))
            .unwrap_or_else(|| panic!("no upstream_up in\n{out}"))
            .to_owned()
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
        assert_eq!(self.upstream_up(), "ecr_pull_proxy_upstream_up 1");
        let (idle_rss, _) = self.proxy.rss_kib();

        let stop = Arc::new(AtomicBool::new(false));
        let other = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut calls, mut slowest) = (0u32, Duration::ZERO);
                // At least a few calls, even when the attack is over in
                // a millisecond.
                while !stop.load(Ordering::SeqCst) || calls < 3 {
                    let started = Instant::now();
                    raw::image_fs_info(channel.clone())
                        .await
                        .expect("the other client's call");
                    slowest = slowest.max(started.elapsed());
                    calls += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                (calls, slowest)
            })
        };
        let socket = self.proxy.socket.clone();
        let pid = self.proxy.pid();
        let peak = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let sampler = {
            let (stop, peak) = (stop.clone(), peak.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                        let rss: u64 = status
                            .lines()
                            .find_map(|l| l.strip_prefix("VmRSS:"))
                            .and_then(|v| v.split_whitespace().next())
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
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
        let (calls, slowest) = other.await.unwrap();
        sampler.join().unwrap();
        let (_, hwm) = self.proxy.rss_kib();
        println!(
            "{name}: {frames} frames in {took:.1?}; GOAWAY {code:?}; daemon RSS idle {idle_rss} KiB, peak {} KiB (VmHWM {hwm} KiB); other client: {calls} calls, slowest {slowest:.1?}",
            peak.load(Ordering::SeqCst)
        );
        assert!(hwm < RSS_LIMIT_KIB, "{name}: the daemon grew to {hwm} KiB");
        assert!(calls > 0, "{name}: the other client made no call");
        assert!(
            slowest < SLOWEST_OTHER_CALL,
            "{name}: the other client waited {slowest:?}"
        );
        assert_eq!(
            self.upstream_up(),
            "ecr_pull_proxy_upstream_up 1",
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

#[tokio::test(flavor = "multi_thread")]
async fn a_ping_flood_without_reading_is_held_back_not_buffered() {
    let b = start().await;
    // h2 answers one PING at a time and reads no more while the answer
    // waits: the flood stops at the socket buffer (backpressure). HTTP/2
    // has no error for it; the connection is simply not read.
    b.run("PING flood", |s| {
        flood(s, |n| Some(frame(PING, 0, 0, &n.to_be_bytes())))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tiny_data_frames_on_an_open_call_stay_bounded() {
    let b = start().await;
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

#[tokio::test(flavor = "multi_thread")]
async fn data_on_an_idle_stream_is_a_protocol_error() {
    let b = start().await;
    let code = b
        .run("DATA on idle streams", |s| {
            flood(s, |n| Some(frame(DATA, 0, 2 * n as u32 + 1, &[0; 64])))
        })
        .await;
    assert_eq!(code, Some(PROTOCOL_ERROR));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_settings_flood_without_reading_is_held_back() {
    let b = start().await;
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

#[tokio::test(flavor = "multi_thread")]
async fn a_continuation_flood_closes_the_connection() {
    let b = start().await;
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

#[tokio::test(flavor = "multi_thread")]
async fn a_frame_announcing_sixteen_mib_is_a_frame_size_error() {
    let b = start().await;
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

#[tokio::test(flavor = "multi_thread")]
async fn rapid_reset_is_bounded() {
    let b = start().await;
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

#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_streams_at_once_are_refused_past_the_limit() {
    let b = start().await;
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
    let calls = b._upstream.calls();
    assert_eq!(calls.len(), 2);
    for c in calls {
        assert_eq!(c.authority.as_deref(), Some("localhost"));
    }
}
