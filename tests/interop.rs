//! Callers that are not built on the h2 crate, against real containerd,
//! registry and moto, direct and through the proxy:
//!
//! - grpc-go (Debian's golang-google-grpc-dev), kubelet's and crictl's gRPC
//!   library, with the HPACK encoder, flow control and BDP pings of
//!   golang.org/x/net/http2;
//! - gRPC C-core (PyPI `grpcio`), with its own HPACK encoder (dynamic
//!   table, Huffman), flow control and pings.

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use support::stack::*;

const C_CORE_CLIENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/grpc_client.py");
const GO_CLIENT_SOURCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/grpc_go_client");
/// Where Debian's golang-*-dev packages put their sources (GOPATH mode).
const DEBIAN_GOPATH: &str = "/usr/share/gocode";

/// The grpc-go caller, built once per run of this file (the tests run in
/// parallel; one build serves them all).
fn go_client() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT.get_or_init(build_go_client).clone()
}

/// Builds the grpc-go caller (a few seconds; Go caches the rest).
fn build_go_client() -> PathBuf {
    let go = support::require("go", "golang-go and golang-google-grpc-dev (Debian)");
    assert!(
        Path::new(DEBIAN_GOPATH)
            .join("src/google.golang.org/grpc")
            .is_dir(),
        "grpc-go sources not found under {DEBIAN_GOPATH}: install golang-google-grpc-dev (`.ci/install` does this)"
    );
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let binary = out_dir.join("grpc-go-client");
    let out = Command::new(go)
        .args(["build", "-o"])
        .arg(&binary)
        .arg(".")
        .current_dir(GO_CLIENT_SOURCE)
        .env("GO111MODULE", "off")
        .env("GOPATH", DEBIAN_GOPATH)
        .env("GOCACHE", out_dir.join("go-build"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "building the grpc-go caller failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    binary
}

/// Runs a caller against `socket`: call name → (code, digest), and the
/// concurrent run's "calls failed" line.
fn run_client(
    caller: &[PathBuf],
    socket: &Path,
    image: &str,
) -> (HashMap<String, (String, String)>, String) {
    let out = Command::new(&caller[0])
        .args(&caller[1..])
        .arg(socket)
        .arg(image)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{caller:?} failed: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut calls = HashMap::new();
    let mut concurrent = String::new();
    for line in stdout.lines() {
        let mut parts = line.splitn(3, ' ');
        let (name, code, rest) = (
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
        );
        if name == "concurrent" {
            concurrent = format!("{code} {rest}");
        } else {
            calls.insert(name.to_owned(), (code.to_owned(), rest.to_owned()));
        }
    }
    (calls, concurrent)
}

/// The caller gets through the proxy what it gets direct, and its pulls
/// (which fail direct: containerd has no credentials) get a token.
fn gets_what_it_gets_direct_and_its_pulls_get_a_token(caller: &[PathBuf]) {
    let s = Stack::start(&[ECR_HOST]);
    s.registry.push_image("app", &["v1"]);
    let image = format!("{ECR_HOST}/app:v1");
    let proxy = s.proxy("p", "");

    let (direct, _) = run_client(caller, &s.containerd.socket, &image);
    assert_eq!(direct["PullImage"].0, "UNKNOWN", "{direct:?}");
    assert!(direct["PullImage"].1.contains("401"), "{direct:?}");

    let (through, concurrent) = run_client(caller, &proxy.socket, &image);
    for name in [
        "ListImages",
        "ImageStatus",
        "ImageStatus-missing",
        "Unknown",
    ] {
        assert_eq!(
            through[name], direct[name],
            "{name}: {through:?} vs {direct:?}"
        );
    }
    assert_eq!(through["Unknown"].0, "UNIMPLEMENTED");
    assert_eq!(through["PullImage"].0, "OK", "{through:?}");
    assert_eq!(through["ImageStatus-after-pull"].0, "OK", "{through:?}");
    assert_ne!(
        through["ImageStatus-after-pull"], direct["ImageStatus"],
        "the image is there after the pull"
    );
    assert_eq!(concurrent, "620 0", "calls that failed: {concurrent}");

    let logs = proxy.logs();
    assert!(!logs.contains("closed a client connection"), "{logs}");
    assert!(!logs.contains("protocol error"), "{logs}");
    assert!(logs.contains("credentials=\"injected\""), "{logs}");
    assert_no_secrets(&logs);
}

#[test]
fn a_grpc_go_caller_gets_what_it_gets_direct_and_its_pulls_get_a_token() {
    gets_what_it_gets_direct_and_its_pulls_get_a_token(&[go_client()]);
}

#[test]
fn a_grpc_c_core_caller_gets_what_it_gets_direct_and_its_pulls_get_a_token() {
    let python = support::require(
        "python3",
        "python3 (Debian) with grpcio (`.ci/install` adds it to target/test-tools/venv)",
    );
    gets_what_it_gets_direct_and_its_pulls_get_a_token(&[python, C_CORE_CLIENT.into()]);
}

/// Starts the grpc-go caller in watch mode on `socket`: it calls until
/// [`stop_watching`] closes its standard input (two minutes at most).
fn start_watching(caller: &Path, socket: &Path) -> std::process::Child {
    Command::new(caller)
        .arg(socket)
        .arg("-")
        .arg("watch:120")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Now, on the clock the caller stamps its calls with.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The codes of `calls`, each run of one code counted once.
fn phases(calls: &[(u64, String)]) -> Vec<&str> {
    let mut phases: Vec<&str> = calls.iter().map(|(_, code)| code.as_str()).collect();
    phases.dedup();
    phases
}

/// Lets a caller in watch mode run for `after` more, stops it, and returns
/// its calls as (unix milliseconds, code), and its output.
fn stop_watching(
    mut watch: std::process::Child,
    after: std::time::Duration,
) -> (Vec<(u64, String)>, String) {
    std::thread::sleep(after);
    drop(watch.stdin.take());
    let out = watch.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let calls = stdout
        .lines()
        .map(|l| {
            let mut f = l.split(' ');
            let at = f.next().unwrap_or_default().parse().unwrap_or(0);
            (at, f.next().unwrap_or_default().to_owned())
        })
        .collect();
    (calls, stdout)
}

/// containerd killed and started again under a grpc-go caller that keeps
/// calling on one connection, as kubelet does: its calls answer OK, then
/// only UNAVAILABLE while containerd is away, then OK again for good, on
/// the caller's own reconnect, within a few seconds of containerd being
/// back.
#[test]
fn a_grpc_go_caller_rides_out_a_containerd_restart() {
    use std::time::Duration;
    let caller = go_client();
    let mut s = Stack::start(&[ECR_HOST]);
    let proxy = s.proxy("p", "");
    let watch = start_watching(&caller, &proxy.socket);
    std::thread::sleep(Duration::from_millis(1500));
    s.containerd.kill();
    std::thread::sleep(Duration::from_secs(2));
    // Returns once containerd's CRI service answers.
    s.containerd.restart();
    let back = unix_ms();
    let (calls, stdout) = stop_watching(watch, Duration::from_secs(6));
    // OK+ UNAVAILABLE+ OK+, and nothing else.
    let phases = phases(&calls);
    assert_eq!(phases, ["OK", "UNAVAILABLE", "OK"], "{stdout}");
    let socket = s.containerd.socket.to_str().unwrap();
    for line in stdout.lines().filter(|l| l.contains(" UNAVAILABLE ")) {
        assert!(line.contains(socket), "names containerd's socket: {line}");
    }
    let first_ok_again = calls
        .iter()
        .skip_while(|(_, code)| code == "OK")
        .find(|(_, code)| code == "OK")
        .map(|(at, _)| *at)
        .unwrap();
    assert!(
        first_ok_again <= back + 3000,
        "calls worked again {} ms after containerd was back: {stdout}",
        first_ok_again.saturating_sub(back)
    );
    let logs = proxy.logs();
    assert!(!logs.contains("closed a client connection"), "{logs}");
    assert!(
        logs.contains("upstream answers again; asking a client served without it to reconnect"),
        "{logs}"
    );
    assert_no_secrets(&logs);
}

/// The proxy restarted under a grpc-go caller (a package upgrade:
/// SIGTERM, then a new process on the same socket): calls answer OK, then
/// at most UNAVAILABLE while no proxy listens (never a hang or another
/// code), then OK again within a few seconds of the new proxy listening.
#[test]
fn a_grpc_go_caller_rides_out_a_proxy_restart() {
    use std::time::Duration;
    let caller = go_client();
    let s = Stack::start(&[ECR_HOST]);
    let mut old = s.proxy("old", "");
    let socket = old.socket.clone();
    let watch = start_watching(&caller, &socket);
    std::thread::sleep(Duration::from_millis(1500));
    old.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        old.wait(Duration::from_secs(30)).success(),
        "{}",
        old.logs()
    );
    let new_dir = s.dir.path().join("new");
    std::fs::create_dir_all(&new_dir).unwrap();
    let new = support::ProxyProcess::start(
        &new_dir,
        &s.containerd.socket,
        support::ProxyOptions {
            env: s.moto.env(),
            listen: Some(socket),
            ..Default::default()
        },
    );
    let listening = unix_ms();
    let (calls, stdout) = stop_watching(watch, Duration::from_secs(6));
    let phases = phases(&calls);
    assert!(
        phases == ["OK"] || phases == ["OK", "UNAVAILABLE", "OK"],
        "{stdout}"
    );
    let last_failure = calls
        .iter()
        .rposition(|(_, code)| code != "OK")
        .map_or(0, |i| calls[i].0);
    assert!(
        last_failure <= listening + 5000,
        "calls failed until {} ms after the new proxy listened: {stdout}",
        last_failure.saturating_sub(listening)
    );
    for logs in [old.logs(), new.logs()] {
        assert!(!logs.contains("closed a client connection"), "{logs}");
        assert_no_secrets(&logs);
    }
}
