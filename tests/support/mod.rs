//! Shared helpers for the integration tests: the proxy binary, a raw gRPC
//! client, a scripted upstream, and the real parts (containerd, registry,
//! moto). A missing prerequisite fails the test with a message saying how to
//! install it; nothing is ever skipped.
#![allow(dead_code)]

pub mod fake_ecr;
pub mod flood;
pub mod go;
pub mod metrics;
pub mod pod;
pub mod raw;
pub mod real;
pub mod scripted;
pub mod secrets;
pub mod stack;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// The largest message the test clients accept, as kubelet's.
pub const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// A short temporary directory: Unix socket paths must fit in 107 bytes.
pub fn short_tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("epp")
        .tempdir_in("/tmp")
        .expect("tempdir")
}

/// crictl v1.37.0, as `.ci/install` builds it.
pub const CRICTL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/target/test-tools/crictl-v1.37.0/crictl"
);

/// [`CRICTL`], failing with the install hint when it is missing.
pub fn crictl() -> &'static str {
    assert!(
        Path::new(CRICTL).is_file(),
        "crictl not found at {CRICTL}: run .ci/install (it builds crictl v1.37.0 from the Go module proxy)"
    );
    CRICTL
}

/// kubelet v1.30.14's CRI client (tests/support/kubelet130/cri_caller: what
/// kubelet and crictl 1.30 dial with), built once per test binary.
pub fn kubelet_1_30_client() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| go::build_module("kubelet130", "cri_caller", "kubelet-1.30-cri"))
        .clone()
}

/// Path of a binary the test needs; panics with the install hint if absent.
pub fn require(bin: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in
        std::env::split_paths(&path).chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
    {
        let candidate = dir.join(bin);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("prerequisite `{bin}` not found: install {package} (`.ci/install` does this)");
}

/// Waits until `f` is true or `timeout` passes.
pub fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `f` is true or `timeout` passes, without blocking the runtime.
pub async fn eventually(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `GET path` over HTTP/1.0 on a Unix socket (the metrics endpoint):
/// the whole answer, head and body.
pub fn get_unix(socket: &Path, path: &str) -> String {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    // Whatever the admin endpoint serves (`/metrics` after failures too).
    secrets::assert_none_in(&format!("the answer to GET {path}"), &out);
    out
}

/// Resident memory in KiB (`VmRSS`) and its peak (`VmHWM`) of process
/// `pid`; `None` once it is gone.
pub fn rss_kib_of(pid: i32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// A gRPC channel over a Unix socket, dialled lazily.
pub fn channel(path: &Path) -> Channel {
    let path = path.to_owned();
    Endpoint::from_static("http://localhost").connect_with_connector_lazy(tower::service_fn(
        move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        },
    ))
}

/// A running ecr-pull-proxy process.
pub struct ProxyProcess {
    child: Option<Child>,
    /// The socket it listens on.
    pub socket: PathBuf,
    log: PathBuf,
}

/// How to start the proxy.
#[derive(Default)]
pub struct ProxyOptions<'a> {
    /// Config file contents.
    pub config: Option<&'a str>,
    /// Extra environment.
    pub env: Vec<(&'a str, String)>,
    /// Extra arguments.
    pub args: Vec<&'a str>,
    /// The socket to listen on, instead of `proxy.sock` in the directory.
    pub listen: Option<PathBuf>,
}

impl ProxyProcess {
    /// Starts the proxy listening in `dir`, forwarding to `upstream`, and
    /// waits until the socket accepts connections.
    pub fn start(dir: &Path, upstream: &Path, opts: ProxyOptions<'_>) -> Self {
        let socket = opts
            .listen
            .clone()
            .unwrap_or_else(|| dir.join("proxy.sock"));
        let name = socket.file_name().unwrap().to_string_lossy().into_owned();
        let log = dir.join(format!("{name}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ecr-pull-proxy"));
        cmd.arg("--listen")
            .arg(&socket)
            .arg("--upstream")
            .arg(upstream);
        // The most verbose level unless the test asks for another.
        if !opts.args.contains(&"--log-level") {
            cmd.args(["--log-level", "trace"]);
        }
        let config = dir.join(format!("{name}.toml"));
        // The sandbox image keeper makes calls of its own at start (CRI
        // Status, Version, ImageStatus); tests about something else want
        // only their own calls upstream. A test about it sets the key.
        let text = opts.config.unwrap_or("");
        let text = if text.contains("sandbox_image") {
            text.to_owned()
        } else {
            format!("sandbox_image = \"off\"\n{text}")
        };
        // The test containerd's config (beside its socket) says where its
        // hosts.toml files are, which decide where a token may go; the
        // machine's /etc/containerd/config.toml is not the test's.
        let ctd_config = upstream.with_file_name("config.toml");
        let text = if !text.contains("containerd_config") && ctd_config.is_file() {
            format!(
                "containerd_config = {:?}\n{text}",
                ctd_config.display().to_string()
            )
        } else {
            text
        };
        // A role's external id is a secret the config hands the daemon.
        for line in text.lines() {
            if let Some(v) = line.trim().strip_prefix("external_id") {
                let v = v.trim_start().trim_start_matches('=').trim();
                secrets::issued(v.trim_matches('"'));
            }
        }
        std::fs::write(&config, text).unwrap();
        cmd.arg("--config").arg(&config);
        cmd.args(&opts.args);
        // A clean AWS environment: nothing from the machine leaks in.
        for (k, _) in std::env::vars() {
            if k.starts_with("AWS_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("AWS_EC2_METADATA_DISABLED", "true");
        std::fs::write(dir.join("aws-config"), "").unwrap();
        cmd.env("AWS_CONFIG_FILE", dir.join("aws-config"));
        cmd.env("AWS_SHARED_CREDENTIALS_FILE", dir.join("aws-config"));
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let logfile = std::fs::File::create(&log).unwrap();
        cmd.stdout(Stdio::null()).stderr(logfile);
        let child = cmd.spawn().expect("spawn ecr-pull-proxy");
        let mut p = ProxyProcess {
            child: Some(child),
            socket,
            log,
        };
        let sock = p.socket.clone();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
                break;
            }
            if let Some(status) = p.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("proxy exited with {status} before listening:\n{}", p.logs());
            }
            assert!(
                Instant::now() < deadline,
                "proxy did not listen:\n{}",
                p.logs()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        p
    }

    /// Everything the proxy has logged so far.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Resident memory in KiB (`VmRSS`) and its peak (`VmHWM`).
    pub fn rss_kib(&self) -> (u64, u64) {
        rss_kib_of(self.pid()).expect("the proxy's /proc status")
    }

    /// Open file descriptors.
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    /// Sends a signal.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// Waits for the process to exit, at most `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().unwrap();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "proxy did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A lazily dialled channel to the proxy.
    pub fn channel(&self) -> Channel {
        channel(&self.socket)
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The proxy binary listening on `sock` with no upstream and no config
/// file, stderr discarded: for daemon tests that spawn it by hand (to set a
/// notify socket, a umask, a log format). Add to it, then spawn.
pub fn bare_proxy(sock: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ecr-pull-proxy"));
    cmd.args([
        "--listen",
        sock.to_str().unwrap(),
        "--upstream",
        "/nonexistent.sock",
        "--config",
        "/dev/null",
    ])
    .stderr(Stdio::null());
    cmd
}

/// Runs the proxy binary with `args` to completion (for start-up failures).
pub fn run_proxy_to_exit(args: &[&str], timeout: Duration) -> (Option<i32>, String) {
    run_with_env(args, &[], timeout)
}

/// As [`run_proxy_to_exit`], with a clean AWS environment (no instance
/// metadata) plus `env`.
pub fn run_with_env(
    args: &[&str],
    env: &[(&str, String)],
    timeout: Duration,
) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ecr-pull-proxy"));
    for (k, _) in std::env::vars() {
        if k.starts_with("AWS_") {
            cmd.env_remove(k);
        }
    }
    // No instance metadata unless `env` turns it on.
    cmd.env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("AWS_EC2_METADATA_DISABLED", "true");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut out = String::new();
            child
                .stdout
                .take()
                .unwrap()
                .read_to_string(&mut out)
                .unwrap();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut out)
                .unwrap();
            // Every run's output, passing or failing (`check` above all).
            secrets::assert_none_in(&format!("the output of {args:?}"), &out);
            return (status.code(), out);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("proxy {args:?} did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
