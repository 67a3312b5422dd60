//! Faults provoked for real: containerd dying mid-pull, the ECR API slow,
//! throttling, failing or unreachable. Each test asserts what the daemon does.

mod support;

use std::time::{Duration, Instant};

use support::fake_ecr::{Behaviour, FakeEcr};
use support::real::{Containerd, Moto, Registry, Relay};
use support::stack::*;
use support::{ProxyOptions, ProxyProcess};
use tonic::Code;

const PASSWORD: &str = "fake-ecr-pass-91c";

/// `assert_no_secrets`, plus the fake ECR's own password and token.
fn assert_no_fake_ecr_secret(logs: &str) {
    use base64::Engine;
    assert_no_secrets(logs);
    let token = base64::engine::general_purpose::STANDARD.encode(format!("AWS:{PASSWORD}"));
    for secret in [PASSWORD, token.as_str()] {
        assert!(!logs.contains(secret), "a fake ECR secret is in the logs");
    }
}

/// The stack's AWS environment, with ECR itself answered by `fake`.
fn env_with(s: &Stack, endpoint: &str) -> Vec<(&'static str, String)> {
    let mut env = s.moto.env();
    env.push(("AWS_ENDPOINT_URL_ECR", endpoint.to_owned()));
    env
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cached_token_keeps_pulls_working_while_ecr_misbehaves() {
    let s = Stack::with_password(&[ECR_HOST], PASSWORD);
    s.registry.push_image("app", &["v1"]);
    let fake = FakeEcr::start(PASSWORD);
    let proxy = s.proxy_with_env("p", "aws_timeout = \"2s\"", env_with(&s, &fake.endpoint));
    let image = format!("{ECR_HOST}/app:v1");
    pull(proxy.channel(), &image, None)
        .await
        .expect("first pull");
    assert_eq!(fake.calls(), 1);
    for b in [
        Behaviour::Throttle400,
        Behaviour::Throttle429,
        Behaviour::ServerError,
        Behaviour::Slow(20),
    ] {
        fake.set(b);
        remove(s.direct(), &image).await;
        let started = Instant::now();
        pull(proxy.channel(), &image, None)
            .await
            .unwrap_or_else(|e| panic!("{b:?}: {e:?}"));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{b:?}: pull waited on AWS"
        );
    }
    assert_eq!(fake.calls(), 1, "a fresh cached token needs no call");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_token_wait_zero_ecr_faults_fail_fast_naming_the_cause_and_calls_stay_bounded() {
    let s = Stack::with_password(&[ECR_HOST], PASSWORD);
    let image = format!("{ECR_HOST}/app:v1");
    let cases: [(Behaviour, Code, &str); 4] = [
        (
            Behaviour::Throttle400,
            Code::Unavailable,
            "ThrottlingException",
        ),
        (Behaviour::Throttle429, Code::Unavailable, "429"),
        (Behaviour::ServerError, Code::Unavailable, "ServerException"),
        (
            Behaviour::Slow(20),
            Code::Unavailable,
            "no answer within 2s",
        ),
    ];
    for (i, (b, code, cause)) in cases.into_iter().enumerate() {
        let fake = FakeEcr::start(PASSWORD);
        fake.set(b);
        let proxy = s.proxy_with_env(
            &format!("p{i}"),
            "aws_timeout = \"2s\"\ntoken_wait = \"0s\"",
            env_with(&s, &fake.endpoint),
        );
        let started = Instant::now();
        let err = pull(proxy.channel(), &image, None).await.unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{b:?}: took {:?}",
            started.elapsed()
        );
        assert_eq!(err.code(), code, "{b:?}: {err:?}");
        assert!(err.message().contains(cause), "{b:?}: {}", err.message());
        assert!(
            err.message().contains(&image) && err.message().contains("us-east-1"),
            "{}",
            err.message()
        );

        // Pull at kubelet's worst rate for 4 s: the calls to AWS back off.
        let until = Instant::now() + Duration::from_secs(4);
        let mut pulls = 0;
        while Instant::now() < until {
            let _ = pull(proxy.channel(), &image, None).await;
            pulls += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Between operations the cache backs off 1, 2, 4 s, each wait drawn
        // from the whole of it, and within each the SDK's standard retries
        // (3 attempts) back off too: about three operations in these ~6 s,
        // five only when nearly every draw comes up near zero.
        let calls = fake.calls();
        assert!(calls <= 15, "{b:?}: {calls} calls to AWS for {pulls} pulls");
        assert!(pulls >= 20, "{b:?}: only {pulls} pulls");
    }

    // An endpoint nobody listens on.
    let metrics = s.dir.path().join("closed-metrics.sock");
    let metrics_arg: &'static str =
        Box::leak(format!("unix:{}", metrics.display()).into_boxed_str());
    let proxy = s.proxy_with_env_args(
        "closed",
        "aws_timeout = \"2s\"\ntoken_wait = \"0s\"",
        env_with(&s, "http://127.0.0.1:1"),
        vec!["--metrics-listen", metrics_arg],
    );
    let started = Instant::now();
    let err = pull(proxy.channel(), &image, None).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message().contains("Connection refused"),
        "{}",
        err.message()
    );
    // The pull line and the series say no token was had, with the label
    // values the PullsFailing alert selects on.
    let logs = proxy.logs();
    assert!(
        logs.contains("credentials=\"no-token\" cache=\"-\""),
        "{logs}"
    );
    assert!(!logs.contains("credentials=\"injected\""), "{logs}");
    assert_eq!(
        support::metrics::read(
            &metrics,
            "ecr_pull_proxy_pulls_total",
            &[
                ("registry", "aws/us-east-1/standard"),
                ("result", "error"),
                ("credentials", "no-token")
            ]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_throttled_pull_waits_while_the_proxy_retries_once_per_window() {
    let s = Stack::with_password(&[ECR_HOST], PASSWORD);
    s.registry.push_image("app", &["v1"]);
    let image = format!("{ECR_HOST}/app:v1");
    let fake = FakeEcr::start(PASSWORD);
    fake.set(Behaviour::Throttle400);
    let proxy = s.proxy_with_env(
        "wait",
        "aws_timeout = \"2s\"\ntoken_wait = \"150s\"",
        env_with(&s, &fake.endpoint),
    );
    let pulling = tokio::spawn({
        let (ch, image) = (proxy.channel(), image.clone());
        async move { pull(ch, &image, None).await }
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let throttled = fake.calls();
    // One attempt per fetch (no SDK retries within the second), and the
    // cache's retry at a random moment of its 5-minute first window: at
    // most one in these seconds.
    assert!(
        (1..=2).contains(&throttled),
        "calls while throttled: {throttled}"
    );
    assert!(!pulling.is_finished(), "the pull waits instead of failing");
    // Pulls at kubelet's pace do not add calls: the retry is the cache's.
    for _ in 0..4 {
        let ch = proxy.channel();
        let image = image.clone();
        let _ = tokio::time::timeout(Duration::from_secs(1), async move {
            pull(ch, &image, None).await
        })
        .await;
    }
    assert!(fake.calls() <= 3, "{} calls in all", fake.calls());
    assert!(!pulling.is_finished(), "still waiting for the retry");
    assert!(proxy.logs().contains("retrying while pulls wait"));
    assert_no_fake_ecr_secret(&proxy.logs());
    // That the first retry after ECR answers again serves the waiting pull
    // is shown on virtual time in the cache's tests: for real it would take
    // up to the whole window.
    pulling.abort();

    // Throttled for longer than token_wait: the pull fails after the wait,
    // naming the cause.
    let fake = FakeEcr::start(PASSWORD);
    fake.set(Behaviour::Throttle400);
    let proxy = s.proxy_with_env(
        "short",
        "aws_timeout = \"2s\"\ntoken_wait = \"2s\"",
        env_with(&s, &fake.endpoint),
    );
    remove(s.direct(), &image).await;
    let started = Instant::now();
    let err = pull(proxy.channel(), &image, None).await.unwrap_err();
    let waited = started.elapsed();
    assert!(
        (Duration::from_secs(2)..Duration::from_secs(8)).contains(&waited),
        "failed after {waited:?}"
    );
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message().contains("ThrottlingException"),
        "{}",
        err.message()
    );
    assert_no_fake_ecr_secret(&proxy.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn containerd_killed_mid_pull_fails_that_pull_and_the_next_succeeds() {
    let dir = support::short_tempdir();
    let moto = Moto::start(dir.path());
    let registry = Registry::start(dir.path(), "AWS", support::real::MOTO_PASSWORD);
    registry.push_image_sized("big", &["v1"], 1024 * 1024);
    let relay = Relay::start(&registry.addr);
    let mut containerd = Containerd::start(dir.path(), &[(ECR_HOST, relay.addr.as_str())]);
    let proxy = ProxyProcess::start(
        dir.path(),
        &containerd.socket,
        ProxyOptions {
            env: moto.env(),
            ..Default::default()
        },
    );
    let pid = proxy.pid();
    let image = format!("{ECR_HOST}/big:v1");

    relay.stall(true);
    let call = {
        let (channel, image) = (proxy.channel(), image.clone());
        tokio::spawn(async move { pull(channel, &image, None).await })
    };
    support::eventually(
        Duration::from_secs(20),
        "the layer download to stall",
        || relay.stalled() > 0,
    )
    .await;
    containerd.kill();
    let err = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("pull answered")
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains(containerd.socket.to_str().unwrap()),
        "{}",
        err.message()
    );

    relay.stall(false);
    containerd.restart();
    pull(proxy.channel(), &image, None)
        .await
        .expect("the next pull succeeds");
    assert_eq!(proxy.pid(), pid, "no proxy restart");
    assert_no_secrets(&proxy.logs());
}
