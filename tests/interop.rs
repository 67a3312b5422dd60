//! Callers that are not built on the h2 crate, against real containerd,
//! registry and moto, direct and through the proxy:
//!
//! - grpc-go at the version kubelet pins (tests/support/go.mod),
//!   kubelet's and crictl's gRPC library, with the HPACK encoder, flow
//!   control and BDP pings of golang.org/x/net/http2, dialled every way a
//!   grpc-go caller dials (each sends another `:authority`);
//! - kubelet v1.30.14's own CRI client and crictl v1.37.0, the CRI clients
//!   before and after kubelet started sending `localhost` (1.31);
//! - gRPC C-core (PyPI `grpcio`), with its own HPACK encoder (dynamic
//!   table, Huffman), flow control and pings, with its default options and
//!   with kubelet's authority;
//! - a raw HTTP/2 caller (PyPI `h2`) sending no `:authority`, an empty one,
//!   8 KiB of junk, the socket path, raw or percent-encoded.

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use support::real::ContainerdVersion;
use support::stack::*;

const C_CORE_CLIENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/grpc_client.py");
/// The grpc-go caller, built once per run of this file (the tests run in
/// parallel; one build serves them all).
fn go_client() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| support::go::build("grpc_go_client", "grpc-go-client"))
        .clone()
}

/// Runs a caller (with `env`) against `socket`: call name → (code,
/// digest), and the concurrent run's "calls failed" line.
fn run_client_env(
    caller: &[PathBuf],
    env: &[(&str, &str)],
    socket: &Path,
    image: &str,
) -> (HashMap<String, (String, String)>, String) {
    let Lines(stdout) = run_mode_env(caller, env, socket, image, &[]);
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
    gets_what_it_gets_direct(caller, &[], ContainerdVersion::One, "localhost");
}

/// Every call `caller` (with `env`) makes through the proxy on containerd
/// `version` gets containerd's own answer (code and answer digest, or
/// message), except that its pull, refused direct, gets a token through
/// the proxy. The proxy's debug line says the caller's connection came
/// with `:authority` of `form`.
fn gets_what_it_gets_direct(
    caller: &[PathBuf],
    env: &[(&str, &str)],
    version: ContainerdVersion,
    form: &str,
) {
    let s = Stack::on(version, &[ECR_HOST]);
    s.registry.push_image("app", &["v1"]);
    let image = format!("{ECR_HOST}/app:v1");
    let proxy = s.proxy_with_env_args("p", "", s.moto.env(), vec!["--log-level", "debug"]);

    let (direct, _) = run_client_env(caller, env, &s.containerd.socket, &image);
    assert_eq!(direct["PullImage"].0, "UNKNOWN", "{direct:?}");
    assert!(refused(&direct["PullImage"].1), "{direct:?}");
    assert_eq!(direct["ImageFsInfo"].0, "OK", "{direct:?}");

    let (through, concurrent) = run_client_env(caller, env, &proxy.socket, &image);
    for name in [
        "ImageFsInfo",
        "ListImages",
        "ImageStatus",
        "ImageStatus-missing",
        "Unknown",
        "RemoveImage",
        "ImageStatus-after-remove",
    ] {
        if let Some(d) = direct.get(name) {
            assert_eq!(
                through.get(name),
                Some(d),
                "{name}: {through:?} vs {direct:?}"
            );
        }
    }
    if direct.contains_key("Unknown") {
        assert_eq!(through["Unknown"].0, "UNIMPLEMENTED");
    }
    assert_eq!(through["PullImage"].0, "OK", "{through:?}");
    assert_eq!(through["ImageStatus-after-pull"].0, "OK", "{through:?}");
    assert_ne!(
        through["ImageStatus-after-pull"], direct["ImageStatus"],
        "the image is there after the pull"
    );
    assert_eq!(
        through["ImageStatus-after-remove"], direct["ImageStatus"],
        "the image is gone after the remove"
    );
    if !concurrent.is_empty() {
        assert_eq!(concurrent, "620 0", "calls that failed: {concurrent}");
    }
    assert!(
        s.moto.calls("GetAuthorizationToken", "us-east-1") >= 1,
        "moto saw no GetAuthorizationToken"
    );

    let logs = proxy.logs();
    assert!(!logs.contains("closed a client connection"), "{logs}");
    assert!(!logs.contains("protocol error"), "{logs}");
    assert!(logs.contains("credentials=\"injected\""), "{logs}");
    assert!(
        logs.contains(&format!("authority_form=\"{form}\"")),
        "no connection logged with authority form {form}: {logs}"
    );
    assert_no_secrets(&logs);
}

/// Whether a caller's message (spaces as underscores) is containerd's
/// word for the registry's refusal (1.6 says `401 Unauthorized`, 2.x
/// `no basic auth credentials`).
fn refused(message: &str) -> bool {
    let message = message.replace('_', " ").to_ascii_lowercase();
    ecr_pull_proxy::pull::REFUSAL_PHRASES
        .iter()
        .any(|p| message.contains(p))
}

#[test]
fn a_grpc_go_caller_gets_what_it_gets_direct_and_its_pulls_get_a_token() {
    gets_what_it_gets_direct_and_its_pulls_get_a_token(&[go_client()]);
}

#[test]
fn a_grpc_c_core_caller_gets_what_it_gets_direct_and_its_pulls_get_a_token() {
    gets_what_it_gets_direct(
        &[python(), C_CORE_CLIENT.into()],
        &[("GRPC_PY_AUTHORITY", "localhost")],
        ContainerdVersion::One,
        "localhost",
    );
}

// === every `:authority` containerd answers (hyperium/h2#487) ===

#[test]
fn grpc_go_with_its_unix_resolver_gets_what_it_gets_direct() {
    gets_what_it_gets_direct(
        &[go_client()],
        &[("GRPC_GO_DIAL", "unix")],
        ContainerdVersion::One,
        "localhost",
    );
}

#[test]
fn grpc_go_passthrough_without_authority_gets_what_it_gets_direct_on_containerd_1_6() {
    gets_what_it_gets_direct(
        &[go_client()],
        &[("GRPC_GO_DIAL", "passthrough")],
        ContainerdVersion::One,
        "percent-encoded-path",
    );
}

#[test]
fn grpc_go_passthrough_without_authority_gets_what_it_gets_direct_on_containerd_2() {
    gets_what_it_gets_direct(
        &[go_client()],
        &[("GRPC_GO_DIAL", "passthrough")],
        ContainerdVersion::Two,
        "percent-encoded-path",
    );
}

#[test]
fn grpc_go_dialling_a_bare_path_as_kubelet_1_30_gets_what_it_gets_direct() {
    gets_what_it_gets_direct(
        &[go_client()],
        &[("GRPC_GO_DIAL", "bare")],
        ContainerdVersion::One,
        "percent-encoded-path",
    );
}

#[test]
fn grpc_go_sending_the_raw_socket_path_gets_what_it_gets_direct() {
    gets_what_it_gets_direct(
        &[go_client()],
        &[("GRPC_GO_DIAL", "raw-path")],
        ContainerdVersion::One,
        "socket-path",
    );
}

#[test]
fn grpcio_with_default_options_gets_what_it_gets_direct_on_containerd_1_6() {
    gets_what_it_gets_direct(
        &[python(), C_CORE_CLIENT.into()],
        &[],
        ContainerdVersion::One,
        "percent-encoded-path",
    );
}

#[test]
fn grpcio_with_default_options_gets_what_it_gets_direct_on_containerd_2() {
    gets_what_it_gets_direct(
        &[python(), C_CORE_CLIENT.into()],
        &[],
        ContainerdVersion::Two,
        "percent-encoded-path",
    );
}

#[test]
fn kubelet_1_30s_cri_client_gets_what_it_gets_direct_on_containerd_1_6() {
    gets_what_it_gets_direct(
        &[support::kubelet_1_30_client()],
        &[],
        ContainerdVersion::One,
        "percent-encoded-path",
    );
}

#[test]
fn kubelet_1_30s_cri_client_gets_what_it_gets_direct_on_containerd_2() {
    gets_what_it_gets_direct(
        &[support::kubelet_1_30_client()],
        &[],
        ContainerdVersion::Two,
        "percent-encoded-path",
    );
}

const H2_CALLER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/h2_caller.py");

/// The raw HTTP/2 caller sending `:authority` of `kind`: every call gets
/// containerd's own answer, as for the library callers above.
fn raw_authority_gets_what_it_gets_direct(kind: &str, version: ContainerdVersion, form: &str) {
    gets_what_it_gets_direct(
        &[python(), H2_CALLER.into()],
        &[("H2_AUTHORITY", kind)],
        version,
        form,
    );
}

#[test]
fn no_authority_gets_what_it_gets_direct() {
    raw_authority_gets_what_it_gets_direct("none", ContainerdVersion::One, "none");
}

#[test]
fn an_empty_authority_gets_what_it_gets_direct() {
    raw_authority_gets_what_it_gets_direct("empty", ContainerdVersion::One, "empty");
}

#[test]
fn eight_kib_of_junk_as_authority_gets_what_it_gets_direct_on_containerd_1_6() {
    raw_authority_gets_what_it_gets_direct("junk", ContainerdVersion::One, "other");
}

#[test]
fn eight_kib_of_junk_as_authority_gets_what_it_gets_direct_on_containerd_2() {
    raw_authority_gets_what_it_gets_direct("junk", ContainerdVersion::Two, "other");
}

/// The one `:authority` containerd answers and the proxy does not: bytes
/// that are no UTF-8. h2's HPACK decoder refuses them before the patched
/// check (a connection error: GOAWAY PROTOCOL_ERROR); no gRPC library
/// sends them (they percent-encode), and accepting them would be a second
/// patch inside HPACK (README "Limits"). The refusal stays on that
/// connection: the next caller is served.
#[test]
fn an_authority_that_is_no_utf_8_is_refused_on_its_connection_only() {
    let caller = [python(), H2_CALLER.into()];
    let s = Stack::on(ContainerdVersion::One, &[ECR_HOST]);
    let image = format!("{ECR_HOST}/app:v1");
    let proxy = s.proxy("p", "");
    let high = [("H2_AUTHORITY", "high")];
    let Lines(direct) = run_mode_env(&caller, &high, &s.containerd.socket, &image, &[]);
    assert!(
        direct.contains("ImageFsInfo OK"),
        "containerd answers it: {direct}"
    );
    let Lines(through) = run_mode_env(&caller, &high, &proxy.socket, &image, &[]);
    assert!(
        through.contains("ImageFsInfo GOAWAY_PROTOCOL_ERROR"),
        "{through}"
    );
    let path = [("H2_AUTHORITY", "path")];
    let Lines(next) = run_mode_env(&caller, &path, &proxy.socket, &image, &[]);
    assert!(next.contains("ImageFsInfo OK"), "{next}");
}

#[test]
fn the_raw_socket_path_as_authority_gets_what_it_gets_direct() {
    raw_authority_gets_what_it_gets_direct("path", ContainerdVersion::Two, "socket-path");
}

#[test]
fn a_percent_encoded_path_as_authority_gets_what_it_gets_direct() {
    raw_authority_gets_what_it_gets_direct(
        "percent",
        ContainerdVersion::One,
        "percent-encoded-path",
    );
}

#[test]
fn a_valid_authority_gets_what_it_gets_direct() {
    raw_authority_gets_what_it_gets_direct("localhost", ContainerdVersion::One, "localhost");
}

/// Starts `caller` in watch mode on `socket`: it calls until
/// [`stop_watching`] closes its standard input (two minutes at most).
fn start_watching(caller: &[PathBuf], socket: &Path) -> std::process::Child {
    Command::new(&caller[0])
        .args(&caller[1..])
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

/// What a caller in watch mode saw: its calls as (unix milliseconds,
/// code), how many times its connection became ready, and its output.
struct Watched {
    calls: Vec<(u64, String)>,
    ready: u32,
    stdout: String,
}

/// Lets a caller in watch mode run for `after` more, stops it, and returns
/// what it saw.
fn stop_watching(mut watch: std::process::Child, after: std::time::Duration) -> Watched {
    std::thread::sleep(after);
    drop(watch.stdin.take());
    let out = watch.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ready = stdout
        .lines()
        .find_map(|l| l.strip_prefix("# ready "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no `# ready` line: {stdout}"));
    let calls = stdout
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let mut f = l.split(' ');
            let at = f.next().unwrap_or_default().parse().unwrap_or(0);
            (at, f.next().unwrap_or_default().to_owned())
        })
        .collect();
    Watched {
        calls,
        ready,
        stdout,
    }
}

/// A caller that connects while containerd is not running (a node
/// booting) and keeps calling on one connection, as kubelet does, while
/// containerd starts, is killed and starts again: its calls answer
/// UNAVAILABLE naming containerd's socket (never a stream reset or another
/// code), then OK, then UNAVAILABLE, then OK again within a few seconds of
/// containerd being back, and all of it on the one connection it opened
/// first (the proxy never makes it reconnect because of containerd).
fn rides_out_containerd_absent_then_restarted(caller: &[PathBuf]) {
    use std::time::Duration;
    let mut s = Stack::start(&[ECR_HOST]);
    s.containerd.kill();
    let metrics = s.dir.path().join("m.sock");
    let proxy = s.proxy(
        "p",
        &format!("metrics_listen = \"unix:{}\"", metrics.display()),
    );
    let accepted_before = accepted_so_far(&metrics);
    let watch = start_watching(caller, &proxy.socket);
    std::thread::sleep(Duration::from_millis(1500));
    s.containerd.restart();
    std::thread::sleep(Duration::from_millis(1500));
    s.containerd.kill();
    std::thread::sleep(Duration::from_millis(1500));
    // Returns once containerd's CRI service answers.
    s.containerd.restart();
    let back = unix_ms();
    let w = stop_watching(watch, Duration::from_secs(4));
    let stdout = &w.stdout;
    assert_eq!(
        phases(&w.calls),
        ["UNAVAILABLE", "OK", "UNAVAILABLE", "OK"],
        "{stdout}"
    );
    let socket = s.containerd.socket.to_str().unwrap();
    for line in stdout.lines().filter(|l| l.contains(" UNAVAILABLE ")) {
        assert!(line.contains(socket), "names containerd's socket: {line}");
    }
    let first_ok_again = w
        .calls
        .iter()
        .skip_while(|(at, _)| *at < back)
        .find(|(_, code)| code == "OK")
        .map(|(at, _)| *at)
        .unwrap();
    assert!(
        first_ok_again <= back + 3000,
        "calls worked again {} ms after containerd was back: {stdout}",
        first_ok_again.saturating_sub(back)
    );
    assert_eq!(w.ready, 1, "the caller had to reconnect: {stdout}");
    // Counted where it happens too: the proxy accepted one connection from
    // the caller in all (a client's quick reconnect shows no ready-state
    // change).
    assert_eq!(
        metric(&metrics, "ecr_pull_proxy_connections_total"),
        accepted_before + 1,
        "the proxy accepted more than the caller's one connection: {stdout}"
    );
    let logs = proxy.logs();
    assert!(!logs.contains("closed a client connection"), "{logs}");
    assert!(logs.contains("upstream answers again"), "{logs}");
    assert_no_secrets(&logs);
}

#[test]
fn a_grpc_go_caller_rides_out_containerd_absent_then_restarted() {
    rides_out_containerd_absent_then_restarted(&[go_client()]);
}

#[test]
fn a_grpc_c_core_caller_rides_out_containerd_absent_then_restarted() {
    rides_out_containerd_absent_then_restarted(&[python(), C_CORE_CLIENT.into()]);
}

/// The value of the proxy's metric `name` (a counter or gauge with no
/// labels), scraped from its metrics socket.
fn metric(metrics: &Path, name: &str) -> u64 {
    support::metrics::read(metrics, name, &[]) as u64
}

/// Connections the proxy has accepted before a test's caller connects: the
/// harness's readiness probe (`ProxyProcess::start` connects once), waited
/// for so that it is counted before the caller's.
fn accepted_so_far(metrics: &Path) -> u64 {
    support::wait_until(
        std::time::Duration::from_secs(5),
        "the readiness probe's connection to be counted",
        || metric(metrics, "ecr_pull_proxy_connections_total") >= 1,
    );
    metric(metrics, "ecr_pull_proxy_connections_total")
}

fn python() -> PathBuf {
    support::require(
        "python3",
        "python3 (Debian) with grpcio (`.ci/install` adds it to target/test-tools/venv)",
    )
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
    let watch = start_watching(&[caller], &socket);
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
    let Watched { calls, stdout, .. } = stop_watching(watch, Duration::from_secs(6));
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

/// Runs `caller` on `socket` for `image`, in `mode` if one is given
/// (`cancel:MS`, `echo`), and returns its output; each line starts with a
/// name.
fn run_mode(caller: &[PathBuf], socket: &Path, image: &str, mode: &[&str]) -> Lines {
    run_mode_env(caller, &[], socket, image, mode)
}

/// As [`run_mode`], with `env` set for the caller.
fn run_mode_env(
    caller: &[PathBuf],
    env: &[(&str, &str)],
    socket: &Path,
    image: &str,
    mode: &[&str],
) -> Lines {
    let out = Command::new(&caller[0])
        .args(&caller[1..])
        .envs(env.iter().copied())
        .arg(socket)
        .arg(image)
        .args(mode)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{caller:?} {mode:?} failed: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    Lines(stdout)
}

/// A caller's output.
struct Lines(String);

impl Lines {
    /// The rest of the line that starts with `name`.
    fn get(&self, name: &str) -> String {
        self.0
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no `{name}` line: {}", self.0))
            .to_owned()
    }
}

/// A pull cancelled mid-download by its caller (a pod deleted while its
/// image pulls: kubelet cancels that one call, no deadline involved), on a
/// connection the caller keeps open: containerd stops the pull (the
/// registry sees containerd close its connection) while the caller still
/// holds its connection, so the stream reset did it, not a connection's
/// teardown; the caller's other calls on that connection go on, and the
/// proxy accepted that one connection only.
struct Cancel {
    _dir: tempfile::TempDir,
    _moto: support::real::Moto,
    _registry: support::real::Registry,
    relay: support::real::Relay,
    _containerd: support::real::Containerd,
    proxy: support::ProxyProcess,
    metrics: PathBuf,
    /// Connections accepted before the caller's (the harness's probe).
    accepted_before: u64,
    image: String,
}

impl Cancel {
    /// containerd `version` reaching the registry through a relay that
    /// freezes the layer download, and the proxy in front of it.
    fn start(version: ContainerdVersion) -> Cancel {
        use support::real::{Containerd, Moto, Registry, Relay, MOTO_PASSWORD};
        let dir = support::short_tempdir();
        let moto = Moto::start(dir.path());
        let registry = Registry::start(dir.path(), "AWS", MOTO_PASSWORD);
        registry.push_image_sized("big", &["v1"], 1024 * 1024);
        let relay = Relay::start(&registry.addr);
        let containerd = Containerd::start_version(
            dir.path(),
            &[(ECR_HOST, relay.addr.as_str())],
            None,
            version,
        );
        let metrics = dir.path().join("m.sock");
        let config = format!("metrics_listen = \"unix:{}\"", metrics.display());
        let proxy = support::ProxyProcess::start(
            dir.path(),
            &containerd.socket,
            support::ProxyOptions {
                config: Some(&config),
                env: moto.env(),
                ..Default::default()
            },
        );
        relay.stall(true);
        let accepted_before = accepted_so_far(&metrics);
        Cancel {
            _dir: dir,
            _moto: moto,
            _registry: registry,
            relay,
            _containerd: containerd,
            proxy,
            metrics,
            accepted_before,
            image: format!("{ECR_HOST}/big:v1"),
        }
    }

    /// The pull reached the registry and froze there; nothing gave it up.
    fn wait_stalled(&self, timeout: std::time::Duration) {
        support::wait_until(timeout, "the layer download to stall", || {
            self.relay.stalled() > 0
        });
        assert_eq!(
            self.relay.closed(),
            0,
            "no download given up before the cancel"
        );
    }

    /// With the caller's connection still open (`holding` says so from the
    /// caller's side, the proxy's gauge from its own), containerd gives up
    /// the download: its connection to the registry closes, though the
    /// registry is still frozen mid-layer.
    fn assert_stopped_while_held(&self, who: &str, mut holding: impl FnMut() -> bool) {
        use std::time::{Duration, Instant};
        let cancelled_at = Instant::now();
        support::wait_until(
            Duration::from_secs(10),
            "containerd to close its registry connection while the caller holds its connection",
            || self.relay.closed() > 0,
        );
        assert!(
            holding(),
            "{who} let go of its connection before containerd stopped"
        );
        assert_eq!(
            metric(&self.metrics, "ecr_pull_proxy_connections_open"),
            1,
            "the proxy should still have the caller's connection"
        );
        assert_eq!(
            metric(&self.metrics, "ecr_pull_proxy_connections_total"),
            self.accepted_before + 1,
            "the caller used one connection throughout"
        );
        println!(
            "{who}: containerd closed the frozen download {:?} after the cancel was reported, the connection still open",
            cancelled_at.elapsed()
        );
        let logs = self.proxy.logs();
        assert!(logs.contains("result=\"cancelled\""), "{logs}");
        assert_no_secrets(&logs);
    }
}

/// A grpc-go or grpcio caller (`cancel:MS` mode, see its source): cancels,
/// reports, then holds its connection until its standard input closes.
fn a_callers_cancelled_pull_stops_in_containerd(caller: &[PathBuf], version: ContainerdVersion) {
    use std::io::BufRead;
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let c = Cancel::start(version);
    let mut child = Command::new(&caller[0])
        .args(&caller[1..])
        .arg(&c.proxy.socket)
        .arg(&c.image)
        .arg("cancel:5000")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    c.wait_stalled(Duration::from_secs(5));
    // Its report, up to `# holding`.
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut report = String::new();
    while !report.contains("# holding") {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("{caller:?} did not report its cancel: {report}"));
        report.push_str(&line);
        report.push('\n');
    }
    let out = Lines(report.clone());
    let line = |name: &str| out.get(name);
    // (grpc-go spells it CANCELED.)
    assert!(
        ["CANCELLED", "CANCELED"].contains(&line("pull").as_str()),
        "{report}"
    );
    assert_eq!(line("during"), "OK", "a call beside the pull: {report}");
    assert_eq!(line("after"), "OK", "a call after the cancel: {report}");
    assert_eq!(
        line("# ready"),
        "1",
        "the caller kept its connection: {report}"
    );
    let who = caller[caller.len() - 1].display().to_string();
    c.assert_stopped_while_held(&who, || child.try_wait().unwrap().is_none());
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
}

#[test]
fn a_grpc_go_callers_cancelled_pull_stops_in_containerd_1_6() {
    a_callers_cancelled_pull_stops_in_containerd(&[go_client()], ContainerdVersion::One);
}

#[test]
fn a_grpc_go_callers_cancelled_pull_stops_in_containerd_2() {
    a_callers_cancelled_pull_stops_in_containerd(&[go_client()], ContainerdVersion::Two);
}

#[test]
fn a_grpc_c_core_callers_cancelled_pull_stops_in_containerd_1_6() {
    a_callers_cancelled_pull_stops_in_containerd(
        &[python(), C_CORE_CLIENT.into()],
        ContainerdVersion::One,
    );
}

#[test]
fn a_grpc_c_core_callers_cancelled_pull_stops_in_containerd_2() {
    a_callers_cancelled_pull_stops_in_containerd(
        &[python(), C_CORE_CLIENT.into()],
        ContainerdVersion::Two,
    );
}

/// A tonic caller: the pull's future dropped (its task aborted), the
/// channel kept.
async fn a_tonic_callers_cancelled_pull_stops_in_containerd(version: ContainerdVersion) {
    use std::time::Duration;
    let c = Cancel::start(version);
    let channel = support::channel(&c.proxy.socket);
    let pulling = tokio::spawn({
        let (channel, image) = (channel.clone(), c.image.clone());
        async move { pull(channel, &image, None).await }
    });
    tokio::task::block_in_place(|| c.wait_stalled(Duration::from_secs(10)));
    pulling.abort();
    assert!(pulling.await.unwrap_err().is_cancelled());
    client(channel.clone())
        .image_fs_info(ecr_pull_proxy::cri::ImageFsInfoRequest {})
        .await
        .expect("a call after the cancel, on the same channel");
    tokio::task::block_in_place(|| c.assert_stopped_while_held("tonic", || true));
    drop(channel);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tonic_callers_cancelled_pull_stops_in_containerd_1_6() {
    a_tonic_callers_cancelled_pull_stops_in_containerd(ContainerdVersion::One).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tonic_callers_cancelled_pull_stops_in_containerd_2() {
    a_tonic_callers_cancelled_pull_stops_in_containerd(ContainerdVersion::Two).await;
}

/// A raw HTTP/2 caller (the h2 crate, no gRPC library): `RST_STREAM`
/// with `CANCEL` on the pull's stream, the connection kept.
async fn a_raw_h2_callers_cancelled_pull_stops_in_containerd(version: ContainerdVersion) {
    use bytes::Bytes;
    use prost::Message;
    use std::time::Duration;
    let c = Cancel::start(version);
    let io = tokio::net::UnixStream::connect(&c.proxy.socket)
        .await
        .unwrap();
    let (send, connection) = h2::client::handshake(io).await.unwrap();
    let connection = tokio::spawn(connection);
    let request = |method: &str| {
        http::Request::post(format!("http://localhost/runtime.v1.ImageService/{method}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap()
    };
    let message = ecr_pull_proxy::cri::PullImageRequest {
        image: Some(ecr_pull_proxy::cri::ImageSpec {
            image: c.image.clone(),
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec();
    let mut send = send.ready().await.unwrap();
    let (answer, mut stream) = send.send_request(request("PullImage"), false).unwrap();
    stream
        .send_data(ecr_pull_proxy::pull::wire::frame(&message), true)
        .unwrap();
    tokio::task::block_in_place(|| c.wait_stalled(Duration::from_secs(10)));
    stream.send_reset(h2::Reason::CANCEL);
    assert!(answer.await.is_err(), "the reset pull should not answer");
    // Another call on the same connection answers.
    let mut send = send.ready().await.unwrap();
    let (answer, mut stream) = send.send_request(request("ImageFsInfo"), false).unwrap();
    stream
        .send_data(ecr_pull_proxy::pull::wire::frame(&[]), true)
        .unwrap();
    let mut body = answer.await.unwrap().into_body();
    while let Some(data) = body.data().await {
        let data: Bytes = data.unwrap();
        body.flow_control().release_capacity(data.len()).unwrap();
    }
    let trailers = body.trailers().await.unwrap().unwrap_or_default();
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"0"[..]),
        "a call after the reset: {trailers:?}"
    );
    tokio::task::block_in_place(|| {
        c.assert_stopped_while_held("raw h2", || !connection.is_finished())
    });
    drop(send);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_raw_h2_callers_cancelled_pull_stops_in_containerd_1_6() {
    a_raw_h2_callers_cancelled_pull_stops_in_containerd(ContainerdVersion::One).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_raw_h2_callers_cancelled_pull_stops_in_containerd_2() {
    a_raw_h2_callers_cancelled_pull_stops_in_containerd(ContainerdVersion::Two).await;
}

/// Runs `caller` in echo mode against `socket`: its `echo` and `stream`
/// lines.
fn run_echo(caller: &[PathBuf], socket: &Path) -> (String, String) {
    let out = run_mode(caller, socket, "registry.example/app:v1", &["echo"]);
    (out.get("echo"), out.get("stream"))
}

/// A message with a field no CRI version defines comes back byte for byte
/// through the proxy, and a 5,000-message StreamImages streams through,
/// for a caller not built on h2 (the upstream is the scripted echo).
fn forwards_unknown_fields_and_streams(caller: &[PathBuf]) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = support::short_tempdir();
    let upstream = rt.block_on(support::scripted::ScriptedUpstream::start(
        &dir.path().join("up.sock"),
    ));
    let proxy = support::ProxyProcess::start(
        dir.path(),
        &upstream.socket,
        support::ProxyOptions::default(),
    );
    let direct = run_echo(caller, &upstream.socket);
    assert_eq!(direct, ("same".into(), "5000 OK".into()));
    assert_eq!(run_echo(caller, &proxy.socket), direct);
    let status = upstream
        .calls()
        .into_iter()
        .rfind(|c| c.path.ends_with("/ImageStatus"))
        .unwrap();
    assert!(
        status.body.ends_with(b"\x9a\x06\x03new"),
        "the unknown field reached the upstream as sent"
    );
}

#[test]
fn a_grpc_go_caller_gets_unknown_fields_and_streams_through() {
    forwards_unknown_fields_and_streams(&[go_client()]);
}

#[test]
fn a_grpc_c_core_caller_gets_unknown_fields_and_streams_through() {
    forwards_unknown_fields_and_streams(&[python(), C_CORE_CLIENT.into()]);
}

/// containerd 1.6 (Debian 12's) does not implement StreamImages: it answers
/// Unimplemented, and the proxy passes that through as it is.
#[test]
fn stream_images_against_real_containerd_gets_what_it_gets_direct() {
    let s = Stack::start(&[ECR_HOST]);
    let proxy = s.proxy("p", "");
    let version = Command::new("containerd")
        .arg("--version")
        .output()
        .unwrap();
    let version = String::from_utf8_lossy(&version.stdout).into_owned();
    assert!(
        version.contains(" 1.6"),
        "this test states what containerd 1.6 answers; found {version}"
    );
    for caller in [vec![go_client()], vec![python(), C_CORE_CLIENT.into()]] {
        let (_, direct) = run_echo(&caller, &s.containerd.socket);
        let (_, through) = run_echo(&caller, &proxy.socket);
        assert_eq!(direct, "0 UNIMPLEMENTED", "{caller:?}");
        assert_eq!(through, direct, "{caller:?}");
    }
}

// === crictl ===

/// Runs `crictl ARGS` against `socket`: (exit code, stdout, stderr).
fn crictl(socket: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(support::crictl())
        .arg("--image-endpoint")
        .arg(format!("unix://{}", socket.display()))
        .arg("--runtime-endpoint")
        .arg(format!("unix://{}", socket.display()))
        .arg("--timeout=60s")
        .args(args)
        .output()
        .unwrap();
    // crictl's log lines carry the second they were written: two runs a
    // moment apart differ there and nowhere else.
    let untimed = |text: &str| {
        text.lines()
            .map(|l| match (l.find("time=\""), l.find("\" level=")) {
                (Some(a), Some(b)) if a < b => format!("{}time=T{}", &l[..a], &l[b + 1..]),
                _ => l.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        untimed(&String::from_utf8_lossy(&out.stderr)),
    )
}

/// crictl's image commands give through the proxy what they give direct;
/// its pull, refused direct, gets a token.
fn crictl_gets_what_it_gets_direct(version: ContainerdVersion) {
    let s = Stack::on(version, &[ECR_HOST]);
    s.registry.push_image("app", &["v1"]);
    let image = format!("{ECR_HOST}/app:v1");
    let proxy = s.proxy_with_env_args("p", "", s.moto.env(), vec!["--log-level", "debug"]);
    let (ctd, via) = (s.containerd.socket.as_path(), proxy.socket.as_path());

    let (code, _, err) = crictl(ctd, &["pull", &image]);
    assert_ne!(code, 0, "the pull needs a token: {err}");
    assert!(refused(&err), "{err}");
    for args in [
        &["images", "-o", "json"][..],
        &["inspecti", &image],
        &["inspecti", "docker.io/library/nope:v1"],
    ] {
        assert_eq!(crictl(via, args), crictl(ctd, args), "crictl {args:?}");
    }
    let (code, fs, err) = crictl(via, &["imagefsinfo"]);
    assert_eq!(code, 0, "{err}");
    assert!(fs.contains("\"fsId\""), "{fs}");

    let (code, out, err) = crictl(via, &["pull", &image]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("Image is up to date for sha256:"), "{out}");
    let (code, listed, _) = crictl(ctd, &["images", "-o", "json"]);
    assert_eq!(code, 0);
    assert!(
        listed.contains(&image),
        "containerd has the image: {listed}"
    );
    for args in [&["images", "-o", "json"][..], &["inspecti", &image]] {
        assert_eq!(crictl(via, args), crictl(ctd, args), "crictl {args:?}");
    }
    assert_eq!(crictl(via, &["rmi", &image]).0, 0);
    let (_, listed, _) = crictl(ctd, &["images", "-o", "json"]);
    assert!(!listed.contains(&image), "removed at containerd: {listed}");

    let logs = proxy.logs();
    assert!(logs.contains("credentials=\"injected\""), "{logs}");
    assert!(logs.contains("authority_form=\"localhost\""), "{logs}");
    assert!(!logs.contains("closed a client connection"), "{logs}");
    assert_no_secrets(&logs);
}

#[test]
fn crictl_1_37_gets_what_it_gets_direct_on_containerd_1_6() {
    crictl_gets_what_it_gets_direct(ContainerdVersion::One);
}

#[test]
fn crictl_1_37_gets_what_it_gets_direct_on_containerd_2() {
    crictl_gets_what_it_gets_direct(ContainerdVersion::Two);
}
