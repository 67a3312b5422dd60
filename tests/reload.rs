//! SIGHUP reloads the configuration: a changed pattern list changes what
//! gets credentials without dropping a pull in flight; a broken file changes
//! nothing.

mod support;

use std::time::Duration;

use nix::sys::signal::Signal;
use support::real::{Containerd, Moto, Registry, Relay, MOTO_PASSWORD};
use support::stack::*;
use support::{ProxyOptions, ProxyProcess};

const ONE: &str = "mirror-one.internal";
const TWO: &str = "mirror-two.internal";

fn config_for(mirror: &str) -> String {
    format!(
        "default_patterns = false\n[[registries]]\npatterns = [\"{mirror}\"]\nregistry = \"{ECR_HOST}\"\n"
    )
}

struct Setup {
    dir: tempfile::TempDir,
    _registry: Registry,
    relay: Relay,
    _containerd: Containerd,
    moto: Moto,
    proxy: ProxyProcess,
}

impl Setup {
    fn start() -> Self {
        let dir = support::short_tempdir();
        let moto = Moto::start(dir.path());
        let registry = Registry::start(dir.path(), "AWS", MOTO_PASSWORD);
        registry.push_image("app", &["v1"]);
        registry.push_image_sized("big", &["v1"], 1024 * 1024);
        let relay = Relay::start(&registry.addr);
        let containerd = Containerd::start(
            dir.path(),
            &[(ONE, relay.addr.as_str()), (TWO, registry.addr.as_str())],
        );
        let proxy = ProxyProcess::start(
            dir.path(),
            &containerd.socket,
            ProxyOptions {
                config: Some(&config_for(ONE)),
                env: moto.env(),
                ..Default::default()
            },
        );
        Setup {
            dir,
            _registry: registry,
            relay,
            _containerd: containerd,
            moto,
            proxy,
        }
    }

    fn rewrite_config(&self, text: &str) {
        // ProxyProcess writes its config next to the socket, named after it.
        std::fs::write(self.dir.path().join("proxy.sock.toml"), text).unwrap();
    }

    async fn hangup_and_wait(&self, log_line: &str) {
        let before = self.proxy.logs().matches(log_line).count();
        self.proxy.signal(Signal::SIGHUP);
        support::eventually(Duration::from_secs(10), log_line, || {
            self.proxy.logs().matches(log_line).count() > before
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_changes_what_gets_credentials_without_dropping_an_in_flight_pull() {
    let s = Setup::start();
    pull(s.proxy.channel(), &format!("{ONE}/app:v1"), None)
        .await
        .expect("mirror one gets credentials");
    assert_refused(pull(s.proxy.channel(), &format!("{TWO}/app:v1"), None).await);

    // A pull in flight: its layer download is frozen by the relay.
    s.relay.stall(true);
    let in_flight = {
        let ch = s.proxy.channel();
        tokio::spawn(async move { pull(ch, &format!("{ONE}/big:v1"), None).await })
    };
    support::eventually(Duration::from_secs(20), "the download to stall", || {
        s.relay.stalled() > 0
    })
    .await;

    s.rewrite_config(&config_for(TWO));
    s.hangup_and_wait("configuration reloaded").await;
    pull(s.proxy.channel(), &format!("{TWO}/app:v1"), None)
        .await
        .expect("mirror two gets credentials now");
    assert_refused(pull(s.proxy.channel(), &format!("{ONE}/app:v1"), None).await);

    s.relay.stall(false);
    in_flight
        .await
        .unwrap()
        .expect("the pull in flight finished");
    // The cached token survived the reload: the key (aws/us-east-1) still applies.
    assert_eq!(s.moto.calls("GetAuthorizationToken", "us-east-1"), 1);
    assert_no_secrets(&s.proxy.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_with_a_broken_file_changes_nothing() {
    let s = Setup::start();
    let pid = s.proxy.pid();
    s.rewrite_config("default_patterns = \"maybe\"\n");
    s.hangup_and_wait("configuration not reloaded").await;
    let logs = s.proxy.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("configuration not reloaded"))
        .unwrap();
    assert!(line.contains("default_patterns"), "{line}");
    assert_eq!(s.proxy.pid(), pid);
    pull(s.proxy.channel(), &format!("{ONE}/app:v1"), None)
        .await
        .expect("old settings still apply");
    assert_refused(pull(s.proxy.channel(), &format!("{TWO}/app:v1"), None).await);

    // A change that needs a restart is applied where it can be and named.
    s.rewrite_config(&format!("aws_timeout = \"3s\"\n{}", config_for(TWO)));
    s.hangup_and_wait("configuration reloaded").await;
    assert!(
        s.proxy.logs().contains("key=\"aws_timeout\""),
        "{}",
        s.proxy.logs()
    );
    pull(s.proxy.channel(), &format!("{TWO}/app:v1"), None)
        .await
        .expect("new patterns apply");
}

/// A reload stuck in a blocking read (the config path is a FIFO no one
/// writes) holds no CRI call back: the reload runs on the blocking pool, and
/// ImageStatus keeps answering within 100 ms. Once the FIFO is written, the
/// reload completes.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_stuck_reading_its_file_holds_no_call_back() {
    let s = Setup::start();
    let path = s.dir.path().join("proxy.sock.toml");
    std::fs::remove_file(&path).unwrap();
    nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    s.proxy.signal(Signal::SIGHUP);
    // Give the reload time to block in open(2).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut c = client(s.proxy.channel());
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let started = std::time::Instant::now();
        let call = c.image_status(ecr_pull_proxy::cri::ImageStatusRequest {
            image: Some(ecr_pull_proxy::cri::ImageSpec {
                image: "busybox".into(),
                ..Default::default()
            }),
            verbose: false,
        });
        tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .expect("ImageStatus held back by the stuck reload")
            .expect("ImageStatus while a reload is stuck");
        slowest = slowest.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        slowest < Duration::from_millis(100),
        "an ImageStatus took {slowest:?} while the reload was stuck"
    );
    assert!(!s.proxy.logs().contains("configuration reloaded"));
    // The writer arrives: the stuck reload reads the file and applies it.
    let writer = {
        let path = path.clone();
        std::thread::spawn(move || std::fs::write(path, config_for(TWO)).unwrap())
    };
    support::eventually(Duration::from_secs(10), "the reload", || {
        s.proxy.logs().contains("configuration reloaded")
    })
    .await;
    writer.join().unwrap();
    pull(s.proxy.channel(), &format!("{TWO}/app:v1"), None)
        .await
        .expect("the reloaded patterns apply");
}
