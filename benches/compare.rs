//! Side-by-side figures, interleaved in one run so machine noise hits all
//! alike: real containerd called direct, through `socat` relaying the same
//! socket byte for byte (the floor for any relay), and through the proxy;
//! then a fast scripted upstream for large answers, many concurrent callers
//! and PullImage interception; then memory and start-up time, and the
//! daemon's memory under the two floods a hostile local client can make.
//! Run with `.ci/bench` (release build). Prints Markdown tables.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ecr_pull_proxy::cri;
use prost::Message;
use support::raw;
use support::real::{Containerd, Moto, Registry, MOTO_PASSWORD};
use support::scripted::ScriptedUpstream;
use support::stack::ECR_HOST;
use support::{ProxyOptions, ProxyProcess};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::Request;

const ROUNDS: usize = 20;
const PER_ROUND: usize = 100;

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

async fn call(ch: Channel, path: &str, msg: &Bytes, script: Option<&str>) -> Duration {
    let mut req = Request::new(msg.clone());
    if let Some(s) = script {
        req.metadata_mut()
            .insert("x-script", MetadataValue::try_from(s).unwrap());
    }
    let started = Instant::now();
    raw::unary(ch, path, req).await.unwrap();
    started.elapsed()
}

/// Interleaved sequential calls: per round, PER_ROUND calls to each target.
async fn interleaved(
    targets: &[(&str, Channel)],
    path: &str,
    msg: &Bytes,
    script: Option<&str>,
    rounds: usize,
    per_round: usize,
) -> Vec<Vec<Duration>> {
    let mut out = vec![Vec::new(); targets.len()];
    for (_, ch) in targets {
        for _ in 0..20 {
            call(ch.clone(), path, msg, script).await;
        }
    }
    for _ in 0..rounds {
        for (i, (_, ch)) in targets.iter().enumerate() {
            for _ in 0..per_round {
                out[i].push(call(ch.clone(), path, msg, script).await);
            }
        }
    }
    out
}

/// CPU time a process has used so far (ns) and how many times it was put
/// on a CPU, all threads (from schedstat).
fn sched(pid: i32) -> (u64, u64) {
    let mut total = (0, 0);
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
    {
        let Some(stat) = task
            .ok()
            .and_then(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        else {
            continue;
        };
        let mut fields = stat
            .split_whitespace()
            .map(|f| f.parse::<u64>().unwrap_or(0));
        total.0 += fields.next().unwrap_or(0);
        total.1 += fields.nth(1).unwrap_or(0);
    }
    total
}

/// The processes socat forked for connections (one per connection).
fn children(pid: u32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// A proxy in `dir` (created if needed) in front of `upstream`, with the
/// AWS environment pointing at moto, logging only warnings.
fn bench_proxy(dir: &Path, upstream: &Path, moto: &Moto) -> ProxyProcess {
    std::fs::create_dir_all(dir).unwrap();
    ProxyProcess::start(
        dir,
        upstream,
        ProxyOptions {
            env: moto.env(),
            args: vec!["--log-level", "warn"],
            ..Default::default()
        },
    )
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap().trim().to_owned())
        })
        .unwrap_or_default();
    format!(
        "{} cores, {cpu}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    )
}

fn socat(dir: &Path, target: &Path) -> (std::process::Child, std::path::PathBuf) {
    let bin = support::require("socat", "the Debian package socat");
    let sock = dir.join("socat.sock");
    let child = Command::new(bin)
        // A backlog for the 8 connections opened at once (socat's default
        // of 5 refuses some).
        .arg(format!("UNIX-LISTEN:{},fork,backlog=64", sock.display()))
        .arg(format!("UNIX-CONNECT:{}", target.display()))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    support::wait_until(Duration::from_secs(5), "socat", || sock.exists());
    (child, sock)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes --bench; nothing else is expected. BENCH_ONLY
    // (`containerd` or `scripted`) runs one part, for quick before/after runs;
    // BENCH_BASELINE_BIN adds another build of the proxy beside this one.
    let only = std::env::var("BENCH_ONLY").ok();
    if let Some(part) = only.as_deref() {
        assert!(
            ["containerd", "scripted"].contains(&part),
            "BENCH_ONLY={part:?}: expected `containerd` or `scripted`"
        );
    }
    let wants = |part: &str| only.as_deref().is_none_or(|o| o == part);
    let dir = support::short_tempdir();
    println!(
        "# ecr-pull-proxy benchmark\n\nmachine: {}; proxy: {}\n",
        machine(),
        if cfg!(debug_assertions) {
            "debug build (a smoke run; figures come from `.ci/bench`)"
        } else {
            "release build"
        }
    );

    let moto = Moto::start(dir.path());
    if wants("containerd") {
        real_containerd(dir.path(), &moto).await;
    }
    if wants("scripted") {
        scripted(dir.path(), &moto).await;
    }
}

/// Real containerd called direct, through socat and through the proxy.
async fn real_containerd(dir: &Path, moto: &Moto) {
    let registry = Registry::start(dir, "AWS", MOTO_PASSWORD);
    let containerd = Containerd::start(dir, &[(ECR_HOST, registry.addr.as_str())]);
    let proxy = bench_proxy(dir, &containerd.socket, moto);
    for i in 0..20 {
        registry.push_image(&format!("bench{i}"), &["v1"]);
        let req = cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: format!("{ECR_HOST}/bench{i}:v1"),
                ..Default::default()
            }),
            ..Default::default()
        };
        cri::image_service_client::ImageServiceClient::new(proxy.channel())
            .pull_image(req)
            .await
            .unwrap();
    }
    let (mut socat_child, socat_sock) = socat(dir, &containerd.socket);
    // The peer: a transparent proxy on grpc-go, as other CRI proxies are.
    let peer_sock = dir.join("gp.sock");
    let mut peer_child = Command::new(support::go::build("grpc_go_proxy", "grpc-go-proxy"))
        .arg(&peer_sock)
        .arg(&containerd.socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    support::wait_until(Duration::from_secs(5), "the grpc-go proxy", || {
        peer_sock.exists()
    });
    let targets = [
        ("direct", support::channel(&containerd.socket)),
        ("socat", support::channel(&socat_sock)),
        ("proxy", proxy.channel()),
        ("grpc-go proxy", support::channel(&peer_sock)),
    ];
    let status = Bytes::from(
        cri::ImageStatusRequest {
            image: Some(cri::ImageSpec {
                image: format!("{ECR_HOST}/bench0:v1"),
                ..Default::default()
            }),
            verbose: false,
        }
        .encode_to_vec(),
    );
    // Connect through socat once, so that its per-connection child exists.
    raw::unary(
        targets[1].1.clone(),
        "/runtime.v1.ImageService/ImageFsInfo",
        Request::new(Bytes::new()),
    )
    .await
    .unwrap();
    let socat_children = children(socat_child.id());
    let peer_pid = peer_child.id() as i32;
    let relay_sched = || {
        let socat = socat_children.iter().map(|p| sched(*p));
        (
            socat.fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1)),
            sched(proxy.pid()),
            sched(peer_pid),
        )
    };
    let mut cpu_rows = Vec::new();
    println!("## Against real containerd ({ROUNDS} interleaved rounds of {PER_ROUND} sequential calls per path)\n");
    println!("| call | direct p50 / p99 | socat p50 / p99 | proxy p50 / p99 | grpc-go proxy p50 / p99 | proxy ÷ direct (p50) | proxy's added p50 ÷ socat's | proxy's added p50 ÷ grpc-go proxy's |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for (name, path, msg) in [
        (
            "ImageStatus",
            "/runtime.v1.ImageService/ImageStatus",
            status.clone(),
        ),
        (
            "ListImages (20 images)",
            "/runtime.v1.ImageService/ListImages",
            Bytes::new(),
        ),
        (
            "ImageFsInfo",
            "/runtime.v1.ImageService/ImageFsInfo",
            Bytes::new(),
        ),
    ] {
        let before = relay_sched();
        let mut r = interleaved(&targets, path, &msg, None, ROUNDS, PER_ROUND).await;
        let after = relay_sched();
        // Each path made 20 warm-up calls and ROUNDS * PER_ROUND measured ones.
        let calls = (20 + ROUNDS * PER_ROUND) as f64;
        let per_call = |a: u64, b: u64| (a - b) as f64 / calls;
        cpu_rows.push((
            name,
            per_call(after.0 .0, before.0 .0) / 1e3,
            per_call(after.1 .0, before.1 .0) / 1e3,
            per_call(after.0 .1, before.0 .1),
            per_call(after.1 .1, before.1 .1),
            per_call(after.2 .0, before.2 .0) / 1e3,
        ));
        let p50: Vec<Duration> = r.iter_mut().map(|v| pct(v, 0.5)).collect();
        let p99: Vec<Duration> = r.iter_mut().map(|v| pct(v, 0.99)).collect();
        let added = |i: usize| p50[i].as_secs_f64() - p50[0].as_secs_f64();
        println!(
            "| {name} | {} / {} | {} / {} | {} / {} | {} / {} | {:.2} | {:.2} | {:.2} |",
            us(p50[0]),
            us(p99[0]),
            us(p50[1]),
            us(p99[1]),
            us(p50[2]),
            us(p99[2]),
            us(p50[3]),
            us(p99[3]),
            p50[2].as_secs_f64() / p50[0].as_secs_f64(),
            added(2) / added(1).max(1e-9),
            added(2) / added(3).max(1e-9),
        );
    }
    println!("\nCPU time and wake-ups (times put on a CPU) per call of the relay itself (all its threads; same runs):\n");
    println!("| call | socat CPU | proxy CPU | grpc-go proxy CPU | proxy ÷ socat | socat wake-ups | proxy wake-ups |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (name, socat, proxy, socat_wakes, proxy_wakes, peer) in cpu_rows {
        println!(
            "| {name} | {socat:.1} µs | {proxy:.1} µs | {peer:.1} µs | {:.2} | {socat_wakes:.2} | {proxy_wakes:.2} |",
            proxy / socat.max(1e-9)
        );
    }
    let _ = socat_child.kill();
    let _ = peer_child.kill();
    let _ = peer_child.wait();

    // Instructions: what machine noise does not move at all.
    let (few, many) = if cfg!(debug_assertions) {
        (10, 30)
    } else {
        (200, 1000)
    };
    let target = containerd.socket.to_str().unwrap().to_owned();
    let socat_bin = support::require("socat", "the Debian package socat");
    let socat_instr = instructions_per_call(dir, "socat", few, many, &status, |sock| {
        vec![
            socat_bin.display().to_string(),
            format!("UNIX-LISTEN:{}", sock.display()),
            format!("UNIX-CONNECT:{target}"),
        ]
    })
    .await;
    let proxy_instr = instructions_per_call(dir, "proxy", few, many, &status, |sock| {
        [
            env!("CARGO_BIN_EXE_ecr-pull-proxy"),
            "--listen",
            sock.to_str().unwrap(),
            "--upstream",
            &target,
            "--config",
            "/dev/null",
            "--log-level",
            "warn",
        ]
        .map(str::to_owned)
        .to_vec()
    })
    .await;
    println!("\nUser-space instructions per ImageStatus of the relay (callgrind; the difference between {many} and {few} calls on one connection):\n");
    println!("| socat | proxy | proxy ÷ socat |\n| --- | --- | --- |");
    println!(
        "| {socat_instr:.0} | {proxy_instr:.0} | {:.2} |",
        proxy_instr / socat_instr
    );
    if let Ok(baseline) = std::env::var("BENCH_BASELINE_BIN") {
        against_baseline(dir, &containerd.socket, &baseline, &status, few, many).await;
    }
}

/// This build beside another one (`BENCH_BASELINE_BIN`: an ecr-pull-proxy
/// binary, e.g. a release build of an older commit), on the same machine
/// in the same run: what a change costs the ordinary calls. Both run with
/// the same config (no sandbox keeper), started the same way.
async fn against_baseline(
    dir: &Path,
    upstream: &Path,
    baseline: &str,
    status: &Bytes,
    few: u64,
    many: u64,
) {
    let config = dir.join("baseline.toml");
    std::fs::write(&config, "sandbox_image = \"off\"\n").unwrap();
    let args = |bin: &str, sock: &Path| {
        [
            bin,
            "--listen",
            sock.to_str().unwrap(),
            "--upstream",
            upstream.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "--log-level",
            "warn",
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let this = env!("CARGO_BIN_EXE_ecr-pull-proxy");
    let mut children = Vec::new();
    let mut targets = Vec::new();
    for (name, bin) in [("this build", this), ("baseline", baseline)] {
        let sock = dir.join(format!("{}.sock", name.replace(' ', "-")));
        let a = args(bin, &sock);
        children.push(
            Command::new(&a[0])
                .args(&a[1..])
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        support::wait_until(Duration::from_secs(10), name, || {
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        });
        targets.push((name, support::channel(&sock)));
    }
    println!("\nThis build against the baseline `{baseline}` (real containerd, {ROUNDS} interleaved rounds of {PER_ROUND} calls per path):\n");
    println!("| call | this build p50 / p99 | baseline p50 / p99 | this ÷ baseline (p50) |");
    println!("| --- | --- | --- | --- |");
    for (name, path, msg) in [
        (
            "ImageStatus",
            "/runtime.v1.ImageService/ImageStatus",
            status.clone(),
        ),
        (
            "ImageFsInfo",
            "/runtime.v1.ImageService/ImageFsInfo",
            Bytes::new(),
        ),
    ] {
        let mut r = interleaved(&targets, path, &msg, None, ROUNDS, PER_ROUND).await;
        let p50: Vec<Duration> = r.iter_mut().map(|v| pct(v, 0.5)).collect();
        let p99: Vec<Duration> = r.iter_mut().map(|v| pct(v, 0.99)).collect();
        println!(
            "| {name} | {} / {} | {} / {} | {:.3} |",
            us(p50[0]),
            us(p99[0]),
            us(p50[1]),
            us(p99[1]),
            p50[0].as_secs_f64() / p50[1].as_secs_f64()
        );
    }
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    let this_instr = instructions_per_call(dir, "this-build", few, many, status, |sock| {
        args(this, sock)
    })
    .await;
    let base_instr = instructions_per_call(dir, "baseline", few, many, status, |sock| {
        args(baseline, sock)
    })
    .await;
    println!("\n| instructions per ImageStatus (callgrind) | this build | baseline | this ÷ baseline |\n| --- | --- | --- | --- |");
    println!(
        "| | {this_instr:.0} | {base_instr:.0} | {:.3} |",
        this_instr / base_instr
    );
}

/// User-space instructions per ImageStatus call of a relay under
/// callgrind: the difference between a run of `many` calls and one of
/// `few`, so that start-up and shut-down cancel out. `start` runs the
/// relay's command line, listening on the socket it is given.
async fn instructions_per_call(
    dir: &Path,
    name: &str,
    few: u64,
    many: u64,
    msg: &Bytes,
    command: impl Fn(&Path) -> Vec<String>,
) -> f64 {
    let valgrind = support::require("valgrind", "the Debian package valgrind");
    let mut totals = Vec::new();
    for calls in [few, many] {
        let sock = dir.join(format!("cg-{name}.sock"));
        let out = dir.join(format!("cg-{name}.out"));
        let _ = std::fs::remove_file(&sock);
        let _ = std::fs::remove_file(&out);
        let mut child = Command::new(&valgrind)
            .arg("--tool=callgrind")
            .arg(format!("--callgrind-out-file={}", out.display()))
            .args(command(&sock))
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        support::wait_until(Duration::from_secs(60), "relay under callgrind", || {
            sock.exists()
        });
        let ch = support::channel(&sock);
        // The socket file exists from bind(); under valgrind, listen()
        // can come noticeably later. A refused connection is not accepted,
        // so socat's single connection is still the one that follows.
        let deadline = Instant::now() + Duration::from_secs(60);
        while raw::unary(
            ch.clone(),
            "/runtime.v1.ImageService/ImageStatus",
            Request::new(msg.clone()),
        )
        .await
        .is_err()
        {
            assert!(Instant::now() < deadline, "{name} under callgrind answers");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for _ in 1..calls {
            call(
                ch.clone(),
                "/runtime.v1.ImageService/ImageStatus",
                msg,
                None,
            )
            .await;
        }
        drop(ch);
        // socat ends with its one connection; the proxy on SIGTERM.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        child.wait().unwrap();
        let text = std::fs::read_to_string(&out).expect("callgrind output");
        let total: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("summary: "))
            .and_then(|n| n.trim().parse().ok())
            .expect("callgrind summary line");
        totals.push(total);
    }
    (totals[1] as f64 - totals[0] as f64) / (many - few) as f64
}

/// A fast scripted upstream; then memory and start-up.
async fn scripted(dir: &Path, moto: &Moto) {
    let upstream = ScriptedUpstream::start(&dir.join("up.sock")).await;
    let pdir = dir.join("p2");
    let proxy2 = bench_proxy(&pdir, &upstream.socket, moto);
    let fast = [
        ("direct", support::channel(&upstream.socket)),
        ("proxy", proxy2.channel()),
    ];
    // socat in front of the same upstream: what any relay costs here.
    let (mut socat2, socat2_sock) = socat(&pdir, &upstream.socket);
    let with_socat = [
        fast[0].clone(),
        fast[1].clone(),
        ("socat", support::channel(&socat2_sock)),
    ];
    println!("\n## Against a fast scripted upstream\n");
    println!("| measure | direct | proxy | proxy ÷ direct | socat ÷ direct |");
    println!("| --- | --- | --- | --- | --- |");
    let mut r = interleaved(
        &with_socat,
        "/runtime.v1.ImageService/ListImages",
        &Bytes::new(),
        Some("big:10485760"),
        10,
        5,
    )
    .await;
    let (d, p, f) = (
        pct(&mut r[0], 0.5),
        pct(&mut r[1], 0.5),
        pct(&mut r[2], 0.5),
    );
    println!(
        "| 10 MiB ListImages, p50 | {:.2} ms | {:.2} ms | {:.3} | {:.3} |",
        d.as_secs_f64() * 1e3,
        p.as_secs_f64() * 1e3,
        p.as_secs_f64() / d.as_secs_f64(),
        f.as_secs_f64() / d.as_secs_f64()
    );

    // 256 concurrent callers over 8 connections, 3 s per turn, 2 turns each.
    let mut totals = [0u64; 3];
    // CPU time of the relay (proxy, socat) over the turns, in ns.
    let mut relay_cpu = [0u64; 3];
    let mut peak_rss = 0;
    for _turn in 0..2 {
        for (i, total) in totals.iter_mut().enumerate() {
            let chans: Vec<Channel> = (0..8)
                .map(|_| match i {
                    0 => support::channel(&upstream.socket),
                    1 => proxy2.channel(),
                    _ => support::channel(&socat2_sock),
                })
                .collect();
            let until = Instant::now() + Duration::from_secs(3);
            let tasks: Vec<_> = (0..256)
                .map(|c| {
                    let ch = chans[c % 8].clone();
                    tokio::spawn(async move {
                        let mut n = 0u64;
                        let msg = Bytes::from_static(b"\x0a\x00");
                        while Instant::now() < until {
                            raw::unary(
                                ch.clone(),
                                "/runtime.v1.ImageService/ImageStatus",
                                Request::new(msg.clone()),
                            )
                            .await
                            .unwrap();
                            n += 1;
                        }
                        n
                    })
                })
                .collect();
            let cpu_before = sched(proxy2.pid()).0;
            if i == 1 {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                peak_rss = peak_rss.max(proxy2.rss_kib().0);
            }
            for t in tasks {
                *total += t.await.unwrap();
            }
            relay_cpu[i] += match i {
                0 => 0,
                1 => sched(proxy2.pid()).0 - cpu_before,
                // socat forked a process per connection for this turn; the
                // channels (and so the processes) are still open.
                _ => children(socat2.id()).iter().map(|p| sched(*p).0).sum(),
            };
        }
    }
    let _ = socat2.kill();
    println!(
        "| 256 concurrent callers, calls/s | {:.0} | {:.0} | {:.3} | {:.3} |",
        totals[0] as f64 / 6.0,
        totals[1] as f64 / 6.0,
        totals[1] as f64 / totals[0] as f64,
        totals[2] as f64 / totals[0] as f64
    );
    println!(
        "| 256 concurrent callers, relay CPU per call (proxy / socat) | | {:.1} µs | | {:.1} µs |",
        relay_cpu[1] as f64 / totals[1] as f64 / 1e3,
        relay_cpu[2] as f64 / totals[2] as f64 / 1e3,
    );

    // PullImage with a cached token: the proxy reads and rewrites it.
    let pull = Bytes::from(
        cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: format!("{ECR_HOST}/bench0:v1"),
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec(),
    );
    call(
        fast[1].1.clone(),
        "/runtime.v1.ImageService/PullImage",
        &pull,
        None,
    )
    .await; // token now cached
    let mut r = interleaved(
        &fast,
        "/runtime.v1.ImageService/PullImage",
        &pull,
        None,
        10,
        200,
    )
    .await;
    let mut plain = interleaved(
        &fast[1..],
        "/runtime.v1.ImageService/ImageStatus",
        &Bytes::from_static(b"\x0a\x00"),
        None,
        10,
        200,
    )
    .await;
    // The work the PullImage rows name happened: every pull through the
    // proxy reached the upstream carrying the ECR token (moto's password),
    // every direct one without credentials, and moto issued the token.
    let (mut injected, mut bare) = (0usize, 0usize);
    for c in upstream.calls() {
        if !c.path.ends_with("/PullImage") {
            continue;
        }
        let req = cri::PullImageRequest::decode(&c.body[5..]).expect("a PullImageRequest");
        match req.auth {
            Some(a) if a.username == "AWS" && a.password == MOTO_PASSWORD => injected += 1,
            None => bare += 1,
            Some(_) => panic!("a pull reached the upstream with other credentials"),
        }
    }
    // Per path: 20 warm-up calls and 10 rounds of 200; one more through
    // the proxy to fill the cache.
    assert_eq!(
        (injected, bare),
        (20 + 10 * 200 + 1, 20 + 10 * 200),
        "pulls with and without the token"
    );
    assert!(moto.calls("GetAuthorizationToken", "us-east-1") >= 1);
    let (d50, p50, f50) = (
        pct(&mut r[0], 0.5),
        pct(&mut r[1], 0.5),
        pct(&mut plain[0], 0.5),
    );
    let (d99, p99, f99) = (
        pct(&mut r[0], 0.99),
        pct(&mut r[1], 0.99),
        pct(&mut plain[0], 0.99),
    );
    println!(
        "| PullImage, cached token, p50 / p99 | {} / {} | {} / {} | {:.2} | |",
        us(d50),
        us(d99),
        us(p50),
        us(p99),
        p50.as_secs_f64() / d50.as_secs_f64()
    );

    // Cold cache: a fresh proxy's first pull fetches a token from moto.
    let cold = bench_proxy(&dir.join("p3"), &upstream.socket, moto);
    let first = call(
        cold.channel(),
        "/runtime.v1.ImageService/PullImage",
        &pull,
        None,
    )
    .await;
    let second = call(
        cold.channel(),
        "/runtime.v1.ImageService/PullImage",
        &pull,
        None,
    )
    .await;
    println!(
        "| PullImage, cold cache (SDK start + moto call), first / second | | {} / {} | | |",
        us(first),
        us(second)
    );
    assert!(
        moto.calls("GetAuthorizationToken", "us-east-1") >= 2,
        "the cold proxy fetched its own token"
    );

    // Through the proxy only: what reading and rewriting a PullImage adds
    // to a call forwarded as it is.
    println!("\n| through the proxy | ImageStatus (forwarded as is) p50 / p99 | PullImage (read + token + rewrite) p50 / p99 | PullImage ÷ ImageStatus (p50) |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| scripted upstream | {} / {} | {} / {} | {:.2} |",
        us(f50),
        us(f99),
        us(p50),
        us(p99),
        p50.as_secs_f64() / f50.as_secs_f64()
    );

    // === memory and start-up ===
    let idle = proxy2.rss_kib().0;
    let mut starts = Vec::new();
    for i in 0..10 {
        let sdir = dir.join(format!("s{i}"));
        std::fs::create_dir_all(&sdir).unwrap();
        let sock = sdir.join("p.sock");
        let started = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_ecr-pull-proxy"))
            .args([
                "--listen",
                sock.to_str().unwrap(),
                "--upstream",
                upstream.socket.to_str().unwrap(),
                "--config",
                "/dev/null",
                "--log-level",
                "warn",
            ])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            std::thread::sleep(Duration::from_micros(200));
        }
        starts.push(started.elapsed());
        let _ = child.kill();
        let _ = child.wait();
    }
    let start_p50 = pct(&mut starts, 0.5);
    let fresh = ProxyProcess::start(
        &dir.join("s0"),
        &upstream.socket,
        ProxyOptions {
            args: vec!["--log-level", "warn"],
            listen: Some(dir.join("s0/f.sock")),
            ..Default::default()
        },
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    println!("\n## Memory and start-up\n");
    println!("| measure | value |\n| --- | --- |");
    println!(
        "| RSS idle, fresh start | {:.1} MiB |",
        fresh.rss_kib().0 as f64 / 1024.0
    );
    println!(
        "| RSS idle, after the runs above (SDK loaded, token cached) | {:.1} MiB |",
        idle as f64 / 1024.0
    );
    println!(
        "| RSS under 256 concurrent callers | {:.1} MiB |",
        peak_rss as f64 / 1024.0
    );
    println!(
        "| start to socket accepting, p50 of 10 | {:.1} ms |",
        start_p50.as_secs_f64() * 1e3
    );
    floods(dir, &upstream).await;
}

/// The daemon's memory under the two floods (tests/abuse.rs asserts the
/// bounds; this prints the figures): a fresh daemon for each, so that its
/// high-water mark is that flood's. Every connection the limits allow but
/// one, each with every stream it may open.
async fn floods(dir: &Path, upstream: &ScriptedUpstream) {
    use ecr_pull_proxy::budget::{MAX_PULL_MESSAGE_SIZE, PULL_MESSAGE_TIMEOUT};
    use ecr_pull_proxy::transport::server::{MAX_CONCURRENT_STREAMS, MAX_CONNECTIONS};
    let (connections, streams) = (MAX_CONNECTIONS - 1, MAX_CONCURRENT_STREAMS as usize);
    println!("\n## Memory under floods ({connections} connections × {streams} streams)\n");
    println!("| flood, twice | RSS idle before | peak (VmHWM) | growth | RSS after the first / the second, callers gone | other caller's ImageFsInfo p50 / max during |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for flood in ["PullImage messages", "stalled readers of 8 MiB ListImages"] {
        let fdir = dir.join(format!("flood{}", flood.len()));
        std::fs::create_dir_all(&fdir).unwrap();
        let proxy = ProxyProcess::start(
            &fdir,
            &upstream.socket,
            ProxyOptions {
                args: vec!["--log-level", "error"],
                ..Default::default()
            },
        );
        let ch = proxy.channel();
        raw::image_fs_info(ch.clone()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (idle, _) = proxy.rss_kib();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let other = {
            let (ch, stop) = (ch.clone(), stop.clone());
            tokio::spawn(async move {
                let mut times = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) || times.len() < 5 {
                    let started = Instant::now();
                    raw::image_fs_info(ch.clone()).await.unwrap();
                    times.push(started.elapsed());
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                times
            })
        };
        // The flood twice on the same daemon: what stays after the first
        // is either held, and grows with the second, or kept for reuse.
        let mut after = Vec::new();
        for _ in 0..2 {
            let held = if flood.starts_with("PullImage") {
                support::flood::pull_message_flood(
                    &proxy.socket,
                    connections,
                    streams,
                    MAX_PULL_MESSAGE_SIZE,
                    PULL_MESSAGE_TIMEOUT * 3,
                )
                .await;
                Vec::new()
            } else {
                let held = support::flood::stalled_readers(
                    &proxy.socket,
                    connections,
                    streams,
                    "ListImages",
                    Some("big:8388608"),
                )
                .await;
                tokio::time::sleep(Duration::from_secs(5)).await;
                held
            };
            for h in held {
                h.abort();
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            after.push(proxy.rss_kib().0);
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut times = other.await.unwrap();
        let (_, hwm) = proxy.rss_kib();
        let max = *times.iter().max().unwrap();
        println!(
            "| {flood} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} / {:.1} MiB | {} / {} |",
            idle as f64 / 1024.0,
            hwm as f64 / 1024.0,
            (hwm - idle) as f64 / 1024.0,
            after[0] as f64 / 1024.0,
            after[1] as f64 / 1024.0,
            us(pct(&mut times, 0.5)),
            us(max)
        );
    }
}
