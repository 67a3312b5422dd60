//! The daemon as an operator meets it: the socket, readiness, the command
//! line and configuration mistakes.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use support::scripted::ScriptedUpstream;
use support::{raw, run_proxy_to_exit, ProxyOptions, ProxyProcess};

const EXIT_USAGE: i32 = 64;

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[tokio::test]
async fn socket_is_created_0660_in_a_new_directory() {
    let dir = support::short_tempdir();
    let upstream = ScriptedUpstream::start(&dir.path().join("up.sock")).await;
    let nested = dir.path().join("run/epp");
    std::fs::create_dir_all(&nested).unwrap();
    std::fs::remove_dir(&nested).unwrap();
    let proxy = ProxyProcess::start(dir.path(), &upstream.socket, ProxyOptions::default());
    assert_eq!(mode(&proxy.socket), 0o660);

    // A listen path in a directory that does not exist yet.
    let sock = nested.join("p.sock");
    let p2 = ProxyProcess::start(
        dir.path(),
        &upstream.socket,
        ProxyOptions {
            listen: Some(sock),
            ..Default::default()
        },
    );
    let _ = p2;
    assert!(nested.is_dir());
    assert_eq!(
        mode(&nested) & 0o002,
        0,
        "socket directory must not be world-writable"
    );
}

#[tokio::test]
async fn socket_mode_and_group_are_configurable() {
    let dir = support::short_tempdir();
    let upstream = ScriptedUpstream::start(&dir.path().join("up.sock")).await;
    let proxy = ProxyProcess::start(
        dir.path(),
        &upstream.socket,
        ProxyOptions {
            config: Some("socket_mode = \"0600\"\nsocket_group = \"12345\""),
            ..Default::default()
        },
    );
    assert_eq!(mode(&proxy.socket), 0o600);
    assert_eq!(std::fs::metadata(&proxy.socket).unwrap().gid(), 12345);
}

#[tokio::test]
async fn stale_socket_is_replaced() {
    let dir = support::short_tempdir();
    let upstream = ScriptedUpstream::start(&dir.path().join("up.sock")).await;
    let path = dir.path().join("proxy.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let proxy = ProxyProcess::start(dir.path(), &upstream.socket, ProxyOptions::default());
    raw::image_fs_info(proxy.channel()).await.unwrap();
    assert!(proxy.logs().contains("removing stale socket"));
}

#[test]
fn a_live_socket_or_a_file_is_never_taken_over() {
    let dir = support::short_tempdir();
    let live = dir.path().join("live.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&live).unwrap();
    let (code, out) = run_proxy_to_exit(
        &["--listen", live.to_str().unwrap(), "--config", "/dev/null"],
        Duration::from_secs(10),
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("in use by a running process"), "{out}");
    assert!(live.exists());

    let open_dir = dir.path().join("open");
    std::fs::create_dir(&open_dir).unwrap();
    std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let (code, out) = run_proxy_to_exit(
        &[
            "--listen",
            open_dir.join("p.sock").to_str().unwrap(),
            "--config",
            "/dev/null",
        ],
        Duration::from_secs(10),
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("world-writable"), "{out}");
    assert!(!open_dir.join("p.sock").exists());

    let file = dir.path().join("file");
    std::fs::write(&file, "keep me").unwrap();
    let (code, out) = run_proxy_to_exit(
        &["--listen", file.to_str().unwrap(), "--config", "/dev/null"],
        Duration::from_secs(10),
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("is not a socket"), "{out}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
}

#[test]
fn ready_is_sent_to_systemd_once_listening() {
    let dir = support::short_tempdir();
    let notify = dir.path().join("notify.sock");
    let rx = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let sock = dir.path().join("p.sock");
    let mut child = support::bare_proxy(&sock)
        .env("NOTIFY_SOCKET", &notify)
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = rx.recv(&mut buf).expect("a notification");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    // The socket must already accept connections when READY=1 arrives.
    let connected = std::os::unix::net::UnixStream::connect(&sock).is_ok();
    let _ = child.kill();
    let _ = child.wait();
    assert!(msg.contains("READY=1"), "{msg}");
    assert!(connected);
}

#[test]
fn config_mistakes_refuse_to_start_with_exit_64_naming_the_key() {
    let dir = support::short_tempdir();
    let cases: &[(&str, &[&str])] = &[
        ("colour = \"blue\"\n", &["unknown field `colour`"]),
        (
            "existing_credentials = \"sometimes\"\n",
            &["sometimes", "fallback", "keep", "replace"],
        ),
        ("shutdown_grace = \"forever\"\n", &["shutdown_grace"]),
        ("socket_mode = \"0777\"\n", &["socket_mode"]),
        (
            "[[registries]]\npatterns = [\"m.example\"]\nregistry = \"not-ecr.example\"\n",
            &["registries[0].registry"],
        ),
        ("listen = [\n", &["config file", "line 1, column", ": "]),
        ("\n\nlisten = 5\n", &["listen", "invalid type", "line 3, column 10"]),
        ("[[registries]]\npatterns = [\"bad[\"]\nregistry = \"123456789012.dkr.ecr.us-east-1.amazonaws.com\"\n", &["registries[0].patterns[0]", "invalid IP-literal"]),
        ("aws_timeout = \"10 parsecs\"\n", &["aws_timeout"]),
        // A pattern kubelet refuses too, named with Go's reason.
        ("[[registries]]\npatterns = [\"reg^stry.example\"]\nregistry = \"123456789012.dkr.ecr.us-east-1.amazonaws.com\"\n", &["registries[0].patterns[0]", "reg^stry.example", "not a URL kubelet accepts", "invalid character \"^\" in host name"]),
        // The matchImages of a kubelet CredentialProviderConfig are checked
        // the same way.
        ("credential_provider_config = \"tests/matching/bad-provider-config.yaml\"\n", &["credential_provider_config", "matchImages", "[1.2.3.4]:5000", "not an IPv6 address"]),
    ];
    for (i, (text, needles)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("c{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let (code, out) = run_proxy_to_exit(
            &[
                "--config",
                path.to_str().unwrap(),
                "--listen",
                "/tmp/epp-never.sock",
            ],
            Duration::from_secs(10),
        );
        assert_eq!(code, Some(EXIT_USAGE), "{text}: {out}");
        for n in *needles {
            assert!(out.contains(n), "{text}: {out} should mention {n}");
        }
        assert_eq!(
            out.lines().filter(|l| !l.trim().is_empty()).count(),
            1,
            "one clear line: {out}"
        );
    }
    assert!(!std::path::Path::new("/tmp/epp-never.sock").exists());

    // A config path that cannot be read, and a world-writable config file.
    let world = dir.path().join("world.toml");
    std::fs::write(&world, "").unwrap();
    std::fs::set_permissions(&world, std::fs::Permissions::from_mode(0o666)).unwrap();
    for (path, needle) in [
        (dir.path().to_path_buf(), "cannot read"),
        (world, "world-writable"),
    ] {
        let (code, out) = run_proxy_to_exit(
            &["--config", path.to_str().unwrap()],
            Duration::from_secs(10),
        );
        assert_eq!(code, Some(EXIT_USAGE), "{out}");
        assert!(out.contains(needle), "{out}");
        assert_eq!(
            out.lines().filter(|l| !l.trim().is_empty()).count(),
            1,
            "one clear line: {out}"
        );
    }
}

#[test]
fn usage_errors_exit_64_and_help_shows_the_defaults() {
    // Each usage error: exit 64 and one line, prefixed like every other
    // error, naming the flag and what it accepts.
    for (args, needles) in [
        (&["--no-such-flag"][..], &["--no-such-flag"][..]),
        (
            &["--log-format", "xml"],
            &["xml", "--log-format", "text", "json"],
        ),
        (&["--log-level", "loud"], &["loud", "--log-level", "info"]),
        (&["check", "--listen", "/x.sock"], &["--listen"]),
    ] {
        let (code, out) = run_proxy_to_exit(args, Duration::from_secs(10));
        assert_eq!(code, Some(EXIT_USAGE), "{args:?}: {out}");
        assert_eq!(out.lines().count(), 1, "{args:?}: one line: {out}");
        assert!(out.starts_with("ecr-pull-proxy: "), "{args:?}: {out}");
        for n in needles {
            assert!(out.contains(n), "{args:?}: {out} should mention {n}");
        }
    }
    // `check --help` lists what `check` uses, and nothing else.
    let (code, out) = run_proxy_to_exit(&["check", "--help"], Duration::from_secs(10));
    assert_eq!(code, Some(0), "{out}");
    for used in ["--config", "--upstream", "--image"] {
        assert!(out.contains(used), "check --help should list {used}: {out}");
    }
    for unused in [
        "--listen",
        "--log-level",
        "--log-format",
        "--metrics-listen",
    ] {
        assert!(!out.contains(unused), "check --help lists {unused}: {out}");
    }
    let (code, out) = run_proxy_to_exit(&["--help"], Duration::from_secs(10));
    assert_eq!(code, Some(0));
    for default in [
        ecr_pull_proxy::config::DEFAULT_LISTEN,
        ecr_pull_proxy::config::DEFAULT_UPSTREAM,
        ecr_pull_proxy::config::DEFAULT_CONFIG_PATH,
    ] {
        assert!(out.contains(default), "--help should show {default}: {out}");
    }
    let (code, out) = run_proxy_to_exit(&["--version"], Duration::from_secs(10));
    assert_eq!(code, Some(0));
    assert!(out.contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = support::short_tempdir();
    let sock = dir.path().join("p.sock");
    let log = dir.path().join("log");
    let mut child = support::bare_proxy(&sock)
        .args(["--log-format", "json"])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    support::wait_until(Duration::from_secs(10), "socket", || sock.exists());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.lines().count() >= 2, "{text}");
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        assert!(
            v.get("message").is_some() && v.get("level").is_some(),
            "{line}"
        );
    }
}

// Multi-threaded: the blocking reads below must not starve the scripted
// upstream, which runs on the test's runtime.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_endpoint_on_a_unix_socket_is_private_and_answers() {
    let dir = support::short_tempdir();
    let upstream = ScriptedUpstream::start(&dir.path().join("up.sock")).await;
    let metrics = dir.path().join("m.sock");
    let arg = format!("unix:{}", metrics.display());
    let _proxy = ProxyProcess::start(
        dir.path(),
        &upstream.socket,
        ProxyOptions {
            args: vec!["--metrics-listen", &arg],
            ..Default::default()
        },
    );
    assert_eq!(mode(&metrics), 0o660);
    let get = |path: &str| support::get_unix(&metrics, path);
    assert!(
        get("/healthz").starts_with("HTTP/1.0 200"),
        "{}",
        get("/healthz")
    );
    assert!(
        get("/readyz").starts_with("HTTP/1.0 200"),
        "{}",
        get("/readyz")
    );
    assert_eq!(
        support::metrics::value(&get("/metrics"), "ecr_pull_proxy_build_info", &[]),
        Some(1.0)
    );
    assert!(get("/nothing").starts_with("HTTP/1.0 404"));
}
