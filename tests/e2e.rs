//! End to end with real parts: containerd, a registry with htpasswd auth
//! (user `AWS`, moto's password), and moto as the ECR API. `hosts.toml`
//! sends ECR host names to the local registry over plain HTTP.

mod support;

use std::time::Duration;

use ecr_pull_proxy::cri;
use support::fake_ecr::FakeEcr;
use support::metrics::value as sample;
use support::real::{ContainerdVersion, MOTO_PASSWORD};
use support::stack::*;
use tonic::Code;

#[tokio::test(flavor = "multi_thread")]
async fn pull_without_credentials_for_ecr_image_gets_token() {
    let s = Stack::start(&[ECR_HOST]);
    s.registry.push_image("app", &["v1"]);
    let image = format!("{ECR_HOST}/app:v1");

    // Direct, containerd has no credentials: the registry refuses.
    assert_refused(pull(s.direct(), &image, None).await);

    let proxy = s.proxy("p", "");
    let image_ref = pull(proxy.channel(), &image, None)
        .await
        .expect("pull through the proxy");
    assert!(image_ref.starts_with("sha256:"), "{image_ref}");
    // Again, from cache.
    remove(s.direct(), &image).await;
    pull(proxy.channel(), &image, None)
        .await
        .expect("second pull through the proxy");
    assert_eq!(s.moto.calls("GetAuthorizationToken", "us-east-1"), 1);

    let logs = proxy.logs();
    assert!(
        logs.contains("credentials=\"injected\" cache=\"miss\""),
        "{logs}"
    );
    assert!(
        logs.contains("credentials=\"injected\" cache=\"hit\""),
        "{logs}"
    );
    assert!(
        logs.contains("arrived expired"),
        "moto's expired token is logged: {logs}"
    );
    assert_no_secrets(&logs);
}

#[tokio::test(flavor = "multi_thread")]
async fn look_alike_hosts_get_no_credentials() {
    // Every host here is served by the same registry, so only the proxy's
    // matching stands between these pulls and the node's ECR token.
    let hosts = [
        LOOK_ALIKE,
        "x123456789012.dkr.ecr.us-east-1.amazonaws.com",
        "1234567890123.dkr.ecr.us-east-1.amazonaws.com",
        "123456789012.dkr.ecr.us-east-1.amazonaws.com:5000",
        "123456789012.dkr.ecr.us-east-1.evil.example",
        "evil.example",
    ];
    let s = Stack::start(&hosts);
    s.registry.push_image("app", &["v1"]);
    s.registry
        .push_image("123456789012.dkr.ecr.us-east-1.amazonaws.com/app", &["v1"]);
    let proxy = s.proxy("p", "");
    let mut images: Vec<String> = hosts.iter().map(|h| format!("{h}/app:v1")).collect();
    images.push("evil.example/123456789012.dkr.ecr.us-east-1.amazonaws.com/app:v1".into());
    for image in &images {
        assert_refused(pull(proxy.channel(), image, None).await);
    }
    assert_eq!(
        s.moto
            .requests()
            .iter()
            .filter(|(a, _, _)| a == "GetAuthorizationToken")
            .count(),
        0
    );
    let logs = proxy.logs();
    assert_eq!(
        logs.matches("credentials=\"none\"").count(),
        images.len(),
        "{logs}"
    );
    assert_no_secrets(&logs);
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_caller_password_succeeds_under_fallback_and_fails_under_keep() {
    let s = Stack::start(&[ECR_HOST]);
    s.registry.push_image("app", &["v1"]);
    let image = format!("{ECR_HOST}/app:v1");

    let keep = s.proxy("keep", "existing_credentials = \"keep\"");
    assert_refused(pull(keep.channel(), &image, creds("AWS", CALLER_PASSWORD)).await);

    let fallback = s.proxy("fallback", "");
    pull(fallback.channel(), &image, creds("AWS", CALLER_PASSWORD))
        .await
        .expect("fallback to the ECR token");
    let logs = fallback.logs();
    assert!(logs.contains("credentials=\"fallback\""), "{logs}");
    assert_no_secrets(&logs);
    assert_no_secrets(&keep.logs());

    // `replace` uses the ECR token straight away.
    remove(s.direct(), &image).await;
    let replace = s.proxy("replace", "existing_credentials = \"replace\"");
    pull(replace.channel(), &image, creds("AWS", CALLER_PASSWORD))
        .await
        .expect("replace");
    assert_no_secrets(&replace.logs());
}

/// Manifest requests the registry saw for one pull of `image` with `auth`
/// through `channel`, and the pull's result: what one pull costs the
/// registry.
async fn counted_pull(
    s: &Stack,
    channel: tonic::transport::Channel,
    repo: &str,
    image: &str,
    auth: Option<cri::AuthConfig>,
) -> (usize, Result<String, tonic::Status>) {
    let before = s.registry.manifest_requests(repo).len();
    let result = pull(channel, image, auth).await;
    (s.registry.manifest_requests(repo).len() - before, result)
}

/// [`counted_pull`] straight to containerd: what one attempt costs. The
/// image is removed again afterwards.
async fn one_direct_attempt(
    s: &Stack,
    repo: &str,
    image: &str,
    auth: Option<cri::AuthConfig>,
) -> (usize, Result<String, tonic::Status>) {
    let (requests, result) = counted_pull(s, s.direct(), repo, image, auth).await;
    if result.is_ok() {
        remove(s.direct(), image).await;
    }
    (requests, result)
}

/// `fallback` with credentials the registry accepts: forwarded as they
/// are, one attempt, and no ECR token is even fetched.
#[tokio::test(flavor = "multi_thread")]
async fn fallback_forwards_good_caller_credentials_and_fetches_no_token() {
    let s = Stack::start(&[ECR_HOST]);
    s.registry.push_image("app", &["v1"]);
    let image = format!("{ECR_HOST}/app:v1");
    let (per_attempt, direct) =
        one_direct_attempt(&s, "app", &image, creds("AWS", MOTO_PASSWORD)).await;
    direct.expect("good credentials pull direct");

    let proxy = s.proxy("fallback", "");
    let (requests, result) = counted_pull(
        &s,
        proxy.channel(),
        "app",
        &image,
        creds("AWS", MOTO_PASSWORD),
    )
    .await;
    result.expect("the caller's own credentials");
    assert_eq!(requests, per_attempt, "one attempt");
    assert_eq!(s.moto.calls("GetAuthorizationToken", "us-east-1"), 0);
    let logs = proxy.logs();
    assert!(logs.contains("credentials=\"caller\""), "{logs}");
    assert!(!logs.contains("retrying once with the ECR token"), "{logs}");
    assert_no_secrets(&logs);
}

/// `fallback` with credentials the registry refuses: exactly one more
/// attempt, with the ECR token (one token call), and no third.
#[tokio::test(flavor = "multi_thread")]
async fn fallback_retries_a_refusal_exactly_once_with_the_token() {
    let s = Stack::start(&[ECR_HOST]);
    s.registry.push_image("app", &["v1"]);
    let image = format!("{ECR_HOST}/app:v1");
    let (refused, direct) =
        one_direct_attempt(&s, "app", &image, creds("AWS", CALLER_PASSWORD)).await;
    assert_refused(direct);
    let (accepted, direct) =
        one_direct_attempt(&s, "app", &image, creds("AWS", MOTO_PASSWORD)).await;
    direct.expect("good credentials pull direct");

    let proxy = s.proxy("fallback", "");
    let (requests, result) = counted_pull(
        &s,
        proxy.channel(),
        "app",
        &image,
        creds("AWS", CALLER_PASSWORD),
    )
    .await;
    result.expect("fallback to the ECR token");
    assert_eq!(
        requests,
        refused + accepted,
        "one refused attempt, then one with the token"
    );
    assert_eq!(s.moto.calls("GetAuthorizationToken", "us-east-1"), 1);
    let logs = proxy.logs();
    assert_eq!(
        logs.matches("retrying once with the ECR token").count(),
        1,
        "{logs}"
    );
    assert!(logs.contains("credentials=\"fallback\""), "{logs}");
    assert_no_secrets(&logs);
}

/// `fallback` when the pull fails for another reason (the image does not
/// exist): the failure is the caller's answer; no retry, no token.
#[tokio::test(flavor = "multi_thread")]
async fn fallback_does_not_retry_a_failure_that_is_not_a_refusal() {
    let s = Stack::start(&[ECR_HOST]);
    s.registry.push_image("app", &["v1"]);
    let image = format!("{ECR_HOST}/app:missing");
    let (per_attempt, direct) =
        one_direct_attempt(&s, "app", &image, creds("AWS", MOTO_PASSWORD)).await;
    let direct = direct.expect_err("no such tag");

    let proxy = s.proxy("fallback", "");
    let (requests, result) = counted_pull(
        &s,
        proxy.channel(),
        "app",
        &image,
        creds("AWS", MOTO_PASSWORD),
    )
    .await;
    let err = result.expect_err("no such tag");
    assert_eq!(err.code(), direct.code(), "{err:?}");
    assert!(err.message().contains("not found"), "{err:?}");
    assert_eq!(requests, per_attempt, "one attempt");
    assert_eq!(s.moto.calls("GetAuthorizationToken", "us-east-1"), 0);
    let logs = proxy.logs();
    assert!(!logs.contains("retrying once with the ECR token"), "{logs}");
    assert_no_secrets(&logs);
}

#[tokio::test(flavor = "multi_thread")]
async fn sixteen_concurrent_cold_pulls_make_one_token_call() {
    let host = "123456789012.dkr.ecr.eu-central-1.amazonaws.com";
    let s = Stack::start(&[host]);
    let tags: Vec<String> = (0..16).map(|i| format!("t{i}")).collect();
    s.registry
        .push_image("app", &tags.iter().map(String::as_str).collect::<Vec<_>>());
    let proxy = s.proxy("p", "");
    let channel = proxy.channel();
    let pulls: Vec<_> = tags
        .iter()
        .map(|t| {
            let (channel, image) = (channel.clone(), format!("{host}/app:{t}"));
            tokio::spawn(async move { pull(channel, &image, None).await })
        })
        .map(|h| async move { h.await.unwrap() })
        .collect();
    for r in futures_util::future::join_all(pulls).await {
        r.expect("concurrent pull");
    }
    assert_eq!(s.moto.calls("GetAuthorizationToken", "eu-central-1"), 1);
    assert_no_secrets(&proxy.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn non_ecr_calls_return_what_containerd_returns_direct() {
    let s = Stack::start(&[]);
    s.registry.push_image("plain", &["v1"]);
    let image = format!("{}/plain:v1", s.registry.addr);
    let proxy = s.proxy("p", "");

    // Without credentials: containerd's own 401, unchanged.
    let direct_err = assert_refused(pull(s.direct(), &image, None).await);
    let proxied_err = assert_refused(pull(proxy.channel(), &image, None).await);
    assert_eq!(proxied_err.message(), direct_err.message());

    // With explicit credentials: succeeds through the proxy.
    pull(proxy.channel(), &image, creds("AWS", MOTO_PASSWORD))
        .await
        .expect("pull with credentials");

    let mut direct = client(s.direct());
    let mut proxied = client(proxy.channel());
    let list = cri::ListImagesRequest::default();
    assert_eq!(
        proxied
            .list_images(list.clone())
            .await
            .unwrap()
            .into_inner(),
        direct.list_images(list).await.unwrap().into_inner()
    );
    let status = cri::ImageStatusRequest {
        image: Some(cri::ImageSpec {
            image: image.clone(),
            ..Default::default()
        }),
        verbose: true,
    };
    let via = proxied
        .image_status(status.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(via.image.is_some());
    assert_eq!(
        via,
        direct
            .image_status(status.clone())
            .await
            .unwrap()
            .into_inner()
    );
    let strip = |mut r: cri::ImageFsInfoResponse| {
        for fs in r
            .image_filesystems
            .iter_mut()
            .chain(r.container_filesystems.iter_mut())
        {
            fs.timestamp = 0;
        }
        r
    };
    let fs_via = strip(
        proxied
            .image_fs_info(cri::ImageFsInfoRequest {})
            .await
            .unwrap()
            .into_inner(),
    );
    let fs_direct = strip(
        direct
            .image_fs_info(cri::ImageFsInfoRequest {})
            .await
            .unwrap()
            .into_inner(),
    );
    assert!(!fs_via.image_filesystems.is_empty());
    assert_eq!(
        fs_via.image_filesystems[0].fs_id,
        fs_direct.image_filesystems[0].fs_id
    );

    remove(proxy.channel(), &image).await;
    assert!(direct
        .image_status(status)
        .await
        .unwrap()
        .into_inner()
        .image
        .is_none());
    assert_eq!(s.moto.calls("GetAuthorizationToken", "us-east-1"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn containerd_restart_needs_no_proxy_restart() {
    let mut s = Stack::start(&[ECR_HOST]);
    s.registry.push_image("app", &["v1"]);
    let proxy = s.proxy("p", "");
    let mut c = client(proxy.channel());
    c.image_fs_info(cri::ImageFsInfoRequest {}).await.unwrap();

    s.containerd.kill();
    let err = c
        .image_fs_info(cri::ImageFsInfoRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message()
            .contains(s.containerd.socket.to_str().unwrap()),
        "{}",
        err.message()
    );

    s.containerd.restart();
    // Calls work again as soon as containerd answers (through the proxy's
    // own connection until the client reconnects); restart() returns once
    // it does, so this loop rarely turns.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match c.image_fs_info(cri::ImageFsInfoRequest {}).await {
            Ok(_) => break,
            Err(e) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = e;
            }
            Err(e) => panic!("no call works again without a proxy restart: {e:?}"),
        }
    }
    pull(proxy.channel(), &format!("{ECR_HOST}/app:v1"), None)
        .await
        .expect("pull after restart");
}

#[tokio::test(flavor = "multi_thread")]
async fn registries_entry_with_role_pulls_a_mirror_with_the_roles_token() {
    // moto derives the token from the caller's account: only the assumed
    // role's token (account 210987654321) opens this registry.
    let mirror = "ecr-mirror.internal";
    let s = Stack::with_password(&[mirror, ECR_HOST], "210987654321-auth-token");
    s.registry.push_image("team/app", &["v1"]);
    let config = r#"
[[registries]]
patterns = ["ecr-mirror.internal/team"]
registry = "210987654321.dkr.ecr.eu-west-1.amazonaws.com"
role_arn = "arn:aws:iam::210987654321:role/pull"
external_id = "ext-id-pull-5c8e"
"#;
    let port = support::real::free_port();
    let metrics = format!("127.0.0.1:{port}");
    let proxy = s.proxy("p", &format!("metrics_listen = \"{metrics}\"\n{config}"));
    pull(proxy.channel(), &format!("{mirror}/team/app:v1"), None)
        .await
        .expect("pull through the role");

    let requests = s.moto.requests();
    let assume: Vec<_> = requests
        .iter()
        .filter(|(a, _, _)| a == "AssumeRole")
        .collect();
    assert_eq!(assume.len(), 1, "{requests:?}");
    assert!(
        assume[0]
            .2
            .contains("RoleArn=arn%3Aaws%3Aiam%3A%3A210987654321%3Arole%2Fpull"),
        "{}",
        assume[0].2
    );
    assert!(
        assume[0].2.contains("ExternalId=ext-id-pull-5c8e"),
        "{}",
        assume[0].2
    );
    assert_eq!(s.moto.calls("GetAuthorizationToken", "eu-west-1"), 1);
    // Both AWS calls are counted, each under its own API.
    let (_, text) = scrape(&metrics, "/metrics");
    for api in ["sts:AssumeRole", "ecr:GetAuthorizationToken"] {
        assert_eq!(
            sample(
                &text,
                "ecr_pull_proxy_aws_calls_total",
                &[("api", api), ("code", "ok")]
            ),
            Some(1.0),
            "{text}"
        );
    }
    // The node's own identity (account 123456789012) does not open it.
    assert_refused(pull(proxy.channel(), &format!("{ECR_HOST}/team/app:v1"), None).await);
    assert_no_secrets(&proxy.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn no_aws_credentials_fails_the_pull_fast_naming_image_region_and_cause() {
    let s = Stack::start(&[ECR_HOST]);
    let env = vec![("AWS_ENDPOINT_URL", format!("http://{}", s.moto.addr))];
    let proxy = s.proxy_with_env("p", "aws_timeout = \"3s\"", env);
    let image = format!("{ECR_HOST}/app:v1");
    let started = std::time::Instant::now();
    let err = pull(proxy.channel(), &image, None).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    for needle in [image.as_str(), "us-east-1", "credential"] {
        assert!(
            err.message().contains(needle),
            "{} should name {needle}",
            err.message()
        );
    }
    // The daemon keeps serving: the next call is answered.
    client(proxy.channel())
        .image_fs_info(cri::ImageFsInfoRequest {})
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn instance_metadata_that_never_answers_fails_within_the_timeout() {
    let s = Stack::start(&[ECR_HOST]);
    // Accepts connections and never says a word.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let imds = format!("http://{}", silent.local_addr().unwrap());
    let env = vec![
        ("AWS_ENDPOINT_URL", format!("http://{}", s.moto.addr)),
        ("AWS_EC2_METADATA_DISABLED", "false".to_owned()),
        ("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds),
    ];
    // token_wait 0: the pull does not wait for the retries of the timeout.
    let proxy = s.proxy_with_env("p", "aws_timeout = \"2s\"\ntoken_wait = \"0s\"", env);
    let image = format!("{ECR_HOST}/app:v1");
    let started = std::time::Instant::now();
    let err = pull(proxy.channel(), &image, None).await.unwrap_err();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(4), "took {took:?}");
    assert!(
        matches!(err.code(), Code::Unavailable | Code::Unauthenticated),
        "{err:?}"
    );
    assert!(err.message().contains(&image), "{}", err.message());
    // A second pull inside the backoff does not wait again.
    let started = std::time::Instant::now();
    pull(proxy.channel(), &image, None).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "backoff should answer at once"
    );
    drop(silent);
}

#[tokio::test(flavor = "multi_thread")]
async fn ecr_public_gets_a_token_when_enabled_and_goes_anonymous_without_one() {
    let public = "public.ecr.aws";
    let s = Stack::with_password(&[public], "public-pass-7d1");
    s.registry.push_image("team/app", &["v1"]);
    let image = format!("{public}/team/app:v1");
    let fake = FakeEcr::start("public-pass-7d1");
    let env = |s: &Stack| {
        let mut env = s.moto.env();
        env.push(("AWS_ENDPOINT_URL_ECR_PUBLIC", fake.endpoint.clone()));
        env
    };

    // Off by default: forwarded as it is, and the registry refuses.
    let off = s.proxy_with_env("off", "", env(&s));
    assert_refused(pull(off.channel(), &image, None).await);
    assert_eq!(fake.calls(), 0);

    let on = s.proxy_with_env("on", "ecr_public = true", env(&s));
    pull(on.channel(), &image, None)
        .await
        .expect("pull with an ECR Public token");
    assert_eq!(fake.calls(), 1);
    assert_no_secrets(&on.logs());

    // No token to be had: the pull goes on anonymously, and containerd's own
    // answer (here the registry's refusal) reaches the caller.
    remove(s.direct(), &image).await;
    fake.fail();
    let failing = s.proxy_with_env("failing", "ecr_public = true", env(&s));
    let err = assert_refused(pull(failing.channel(), &image, None).await);
    assert!(
        !err.message().contains("ecr-pull-proxy"),
        "{}",
        err.message()
    );
    assert!(fake.calls() >= 2);
    assert!(
        failing.logs().contains("forwarding the pull without one"),
        "{}",
        failing.logs()
    );
}

fn scrape(addr: &str, path: &str) -> (u16, String) {
    let (status, _, body) = support::real::http(addr, "GET", path, &[], b"");
    let body = String::from_utf8(body).unwrap();
    support::secrets::assert_none_in(&format!("the answer to GET {path}"), &body);
    (status, body)
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_and_health_follow_pulls_and_containerd() {
    let mut s = Stack::start(&[ECR_HOST]);
    s.registry.push_image("app", &["v1"]);
    let port = support::real::free_port();
    let addr = format!("127.0.0.1:{port}");
    let proxy = s.proxy("p", &format!("metrics_listen = \"{addr}\""));
    let image = format!("{ECR_HOST}/app:v1");

    assert_eq!(scrape(&addr, "/healthz").0, 200);
    assert_eq!(scrape(&addr, "/readyz").0, 200);
    let (status, before) = scrape(&addr, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(
        sample(&before, "ecr_pull_proxy_upstream_up", &[]),
        Some(1.0),
        "{before}"
    );
    assert_eq!(sample(&before, "ecr_pull_proxy_build_info", &[]), Some(1.0));

    pull(proxy.channel(), &image, None).await.unwrap();
    remove(s.direct(), &image).await;
    pull(proxy.channel(), &image, None).await.unwrap();
    assert_refused(
        pull(
            proxy.channel(),
            &format!("{}/app:v1", s.registry.addr),
            None,
        )
        .await,
    );

    let (_, after) = scrape(&addr, "/metrics");
    let pulls = "ecr_pull_proxy_pulls_total";
    assert_eq!(
        sample(
            &after,
            pulls,
            &[
                ("registry", "aws/us-east-1/standard"),
                ("result", "ok"),
                ("credentials", "injected")
            ]
        ),
        Some(2.0),
        "{after}"
    );
    assert_eq!(
        sample(
            &after,
            pulls,
            &[
                ("registry", "other"),
                ("result", "error"),
                ("credentials", "none")
            ]
        ),
        Some(1.0),
        "{after}"
    );
    assert_eq!(
        sample(&after, "ecr_pull_proxy_token_cache_misses_total", &[]),
        Some(1.0),
        "{after}"
    );
    assert_eq!(
        sample(&after, "ecr_pull_proxy_token_cache_hits_total", &[]),
        Some(1.0),
        "{after}"
    );
    assert_eq!(
        sample(
            &after,
            "ecr_pull_proxy_aws_calls_total",
            &[("api", "ecr:GetAuthorizationToken"), ("code", "ok")]
        ),
        Some(1.0),
        "{after}"
    );
    assert_eq!(
        sample(
            &after,
            "ecr_pull_proxy_calls_total",
            &[("method", "PullImage"), ("code", "OK")]
        ),
        Some(2.0),
        "{after}"
    );
    assert_eq!(
        sample(
            &after,
            "ecr_pull_proxy_calls_total",
            &[("method", "PullImage"), ("code", "Unknown")]
        ),
        Some(1.0),
        "{after}"
    );
    // moto's tokens arrive expired: the gauge says so.
    let expiry = sample(
        &after,
        "ecr_pull_proxy_token_expiry_seconds",
        &[
            ("service", "ecr"),
            ("partition", "aws"),
            ("region", "us-east-1"),
        ],
    )
    .unwrap();
    assert!(expiry < 0.0, "{after}");
    assert!(!after.contains("app:v1"), "no image names in metrics");
    assert_no_secret_in(&after);

    s.containerd.kill();
    let (status, body) = scrape(&addr, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains(s.containerd.socket.to_str().unwrap()),
        "{body}"
    );
    assert_eq!(
        sample(
            &scrape(&addr, "/metrics").1,
            "ecr_pull_proxy_upstream_up",
            &[]
        ),
        Some(0.0)
    );
    assert_eq!(scrape(&addr, "/healthz").0, 200);
    s.containerd.restart();
    // containerd accepts on its socket a moment before its CRI service
    // answers; /readyz follows the answer, not the socket.
    support::eventually(Duration::from_secs(15), "/readyz to be ready again", || {
        scrape(&addr, "/readyz").0 == 200
    })
    .await;
    assert_eq!(
        sample(
            &scrape(&addr, "/metrics").1,
            "ecr_pull_proxy_upstream_up",
            &[]
        ),
        Some(1.0)
    );
}

/// The `key=value` pairs of a log line: each key, and whether its value is
/// quoted (tracing quotes strings recorded as values, not as `Display`).
fn shape(line: &str) -> Vec<(String, bool)> {
    line.split_whitespace()
        .filter_map(|t| t.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.starts_with('"')))
        .collect()
}

/// Every sample pull line in the README has the shape of a real one: the
/// same keys in the same order, quoted where the daemon quotes.
#[tokio::test(flavor = "multi_thread")]
async fn the_readmes_pull_lines_have_the_shape_of_real_ones() {
    let s = Stack::start(&[ECR_HOST]);
    s.registry.push_image("app", &["v1"]);
    let proxy = s.proxy("p", "");
    pull(proxy.channel(), &format!("{ECR_HOST}/app:v1"), None)
        .await
        .expect("pull");
    let logs = proxy.logs();
    let real = logs
        .lines()
        .find(|l| l.contains("INFO pull image="))
        .unwrap_or_else(|| panic!("no pull line in {logs}"));
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let samples: Vec<&str> = readme
        .lines()
        .filter(|l| l.contains("INFO pull image="))
        .collect();
    assert!(samples.len() >= 3, "{samples:?}");
    for sample in samples {
        assert_eq!(shape(sample), shape(real), "README: {sample}\nreal: {real}");
    }
}

/// containerd pulls its pause image itself, with no credentials: one in
/// private ECR never arrives on its own. The daemon learns it from
/// containerd's CRI status and keeps it present: at start, after it is
/// removed, after containerd restarts without it, and when containerd is
/// reconfigured to another one.
#[tokio::test(flavor = "multi_thread")]
async fn the_sandbox_image_in_private_ecr_is_kept_present() {
    use support::real::{Containerd, Moto, Registry};
    let dir = support::short_tempdir();
    let moto = Moto::start(dir.path());
    let registry = Registry::start(dir.path(), "AWS", MOTO_PASSWORD);
    registry.push_image("eks/pause", &["3.9"]);
    let pause = format!("{ECR_HOST}/eks/pause:3.9");
    let mut containerd = Containerd::start_with_sandbox_image(
        dir.path(),
        &[(ECR_HOST, registry.addr.as_str())],
        Some(&pause),
    );
    let socket = containerd.socket.clone();
    let direct = move || support::channel(&socket);
    let has_pause = |channel| image_present(channel, pause.clone());
    // containerd alone cannot get it: its pull is refused.
    assert_refused(pull(direct(), &pause, None).await);
    assert!(!has_pause(direct()).await);

    let metrics = dir.path().join("m.sock");
    let proxy = support::ProxyProcess::start(
        dir.path(),
        &containerd.socket,
        support::ProxyOptions {
            config: Some(&format!(
                "sandbox_image = \"auto\"\nsandbox_check_interval = \"2s\"\nmetrics_listen = \"unix:{}\"",
                metrics.display()
            )),
            env: moto.env(),
            ..Default::default()
        },
    );
    let socket = containerd.socket.clone();
    let pause_within = |what: &'static str| present_within(&socket, &pause, what, &proxy);
    pause_within("the pause image at start").await;
    let logs = proxy.logs();
    assert!(logs.contains("looking after the sandbox image"), "{logs}");
    assert!(logs.contains("containerd's CRI status"), "{logs}");

    // Removed while the daemon runs: back on the next check.
    remove(direct(), &pause).await;
    assert!(!has_pause(direct()).await);
    pause_within("the pause image after it was removed").await;

    // containerd restarted without it: back once containerd answers. The
    // image is removed and containerd killed right after one of the
    // keeper's checks (every 2 s), so that no check can pull it in between
    // (that pull, cut by the kill, would leave the image present after the
    // restart with no `ok` pull counted).
    let checks = || proxy.logs().matches("learning the sandbox image").count();
    let before = checks();
    support::eventually(Duration::from_secs(10), "a keeper check", || {
        checks() > before
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    remove(direct(), &pause).await;
    containerd.restart();
    // kubelet's calls reach containerd through the proxy as it comes back.
    let _ = client(proxy.channel())
        .image_fs_info(cri::ImageFsInfoRequest {})
        .await;
    pause_within("the pause image after containerd restarted").await;

    // containerd reconfigured to another pause image and restarted: the
    // daemon learns the new one and pulls it, no restart of its own.
    registry.push_image("eks/pause", &["3.10"]);
    let newer = format!("{ECR_HOST}/eks/pause:3.10");
    containerd.replace_in_config(&pause, &newer);
    restarted_then_present(
        &mut containerd,
        &proxy,
        &newer,
        "the new pause image after containerd was reconfigured",
    )
    .await;
    assert!(
        proxy
            .logs()
            .contains(&format!("looking after the sandbox image image={newer}")),
        "{}",
        proxy.logs()
    );

    let scrape = || support::get_unix(&metrics, "/metrics");
    // containerd lists the image a moment before the daemon's pull returns.
    let counted = |out: &str| {
        sample(out, "ecr_pull_proxy_sandbox_image_present", &[]) == Some(1.0)
            && sample(
                out,
                "ecr_pull_proxy_sandbox_pulls_total",
                &[("result", "ok")],
            )
            .unwrap_or(0.0)
                >= 4.0
    };
    support::eventually(Duration::from_secs(10), "four pulls counted", || {
        counted(&scrape())
    })
    .await;
    assert_no_secrets(&proxy.logs());
}

/// Whether containerd has `image` (an `ImageStatus` that names it).
async fn image_present(channel: tonic::transport::Channel, image: String) -> bool {
    client(channel)
        .image_status(cri::ImageStatusRequest {
            image: Some(cri::ImageSpec {
                image,
                ..Default::default()
            }),
            verbose: false,
        })
        .await
        .map(|r| r.into_inner().image.is_some())
        .unwrap_or(false)
}

/// Waits up to 20 s for containerd at `socket` to have `image`; failing,
/// names `what` and shows the daemon's log.
async fn present_within(
    socket: &std::path::Path,
    image: &str,
    what: &str,
    proxy: &support::ProxyProcess,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !image_present(support::channel(socket), image.to_owned()).await {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not there after 20 s; the daemon's log:\n{}",
            proxy.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Restarts containerd, makes a kubelet call reach it through the proxy
/// as it comes back, and waits for the daemon to have `image` there.
async fn restarted_then_present(
    containerd: &mut support::real::Containerd,
    proxy: &support::ProxyProcess,
    image: &str,
    what: &str,
) {
    containerd.restart();
    let _ = client(proxy.channel())
        .image_fs_info(cri::ImageFsInfoRequest {})
        .await;
    present_within(&containerd.socket, image, what, proxy).await;
}

/// What the pause image work is for: a node whose only pause image is in
/// private ECR starts pods with nothing but the daemon. kubelet's
/// `RunPodSandbox` goes to containerd directly, and containerd pulls the
/// pause image itself: without the daemon that pull is refused and no pod
/// starts; with it, the same call starts a pod whose pause process runs.
/// containerd 1.6 names its pause image in its CRI status.
#[tokio::test(flavor = "multi_thread")]
async fn a_pod_starts_when_its_only_pause_image_is_in_private_ecr() {
    pod_starts_with_only_a_private_pause_image(ContainerdVersion::One, "containerd's CRI status")
        .await;
}

/// The same with containerd 2.x (Debian unstable's), whose CRI status no
/// longer names the pause image: the daemon reads it from containerd's
/// schema-3 config file (`pinned_images.sandbox`).
#[tokio::test(flavor = "multi_thread")]
async fn a_pod_starts_on_containerd_2_when_its_only_pause_image_is_in_private_ecr() {
    pod_starts_with_only_a_private_pause_image(ContainerdVersion::Two, "containerd's config file")
        .await;
}

async fn pod_starts_with_only_a_private_pause_image(version: ContainerdVersion, source: &str) {
    use support::real::{Containerd, Moto, Registry};
    let pause_binary = std::fs::read(support::go::build("pause", "pause")).unwrap();
    let dir = support::short_tempdir();
    let moto = Moto::start(dir.path());
    let registry = Registry::start(dir.path(), "AWS", MOTO_PASSWORD);
    registry.push_files_image(
        "eks/pause",
        &["3.10"],
        &[("pause", &pause_binary, 0o755)],
        &["/pause"],
    );
    let pause = format!("{ECR_HOST}/eks/pause:3.10");
    let mut containerd = Containerd::start_version(
        dir.path(),
        &[(ECR_HOST, registry.addr.as_str())],
        Some(&pause),
        version,
    );
    let pod_logs = dir.path().join("pods");
    std::fs::create_dir_all(&pod_logs).unwrap();

    // Without the daemon: containerd's own pull of the pause image fails.
    let refused = support::pod::run(&containerd.socket, "without-daemon", &pod_logs)
        .await
        .expect_err("no pod can start without its pause image");
    assert!(
        refused.message().contains(&pause) && refused.message().contains("pull"),
        "the failure should be the pause image's pull: {refused:?}"
    );

    let config = format!(
        "sandbox_image = \"auto\"\ncontainerd_config = {:?}",
        containerd.config.display().to_string()
    );
    let proxy = support::ProxyProcess::start(
        dir.path(),
        &containerd.socket,
        support::ProxyOptions {
            config: Some(&config),
            env: moto.env(),
            ..Default::default()
        },
    );
    present_within(
        &containerd.socket,
        &pause,
        "the pause image at start",
        &proxy,
    )
    .await;
    let logs = proxy.logs();
    assert!(
        logs.contains("looking after the sandbox image") && logs.contains(source),
        "{logs}"
    );

    // The same call as before now starts a pod.
    let id = support::pod::run(&containerd.socket, "with-daemon", &pod_logs)
        .await
        .unwrap_or_else(|e| {
            let log = containerd.log();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            panic!(
                "the pod should start now: {e:?}\ncontainerd's log, last lines first:\n{}",
                tail.join("\n")
            )
        });
    assert_eq!(
        support::pod::state(&containerd.socket, &id).await.unwrap(),
        support::pod::SANDBOX_READY
    );
    support::pod::remove(&containerd.socket, &id).await.unwrap();

    // containerd restarted without the image: the daemon pulls it again as
    // soon as containerd answers (kubelet's calls through the proxy show
    // it), and pods start again.
    remove(support::channel(&containerd.socket), &pause).await;
    assert!(!image_present(support::channel(&containerd.socket), pause.clone()).await);
    restarted_then_present(
        &mut containerd,
        &proxy,
        &pause,
        "the pause image after containerd restarted",
    )
    .await;
    let id = support::pod::run(&containerd.socket, "after-restart", &pod_logs)
        .await
        .expect("a pod starts after containerd restarted");
    support::pod::remove(&containerd.socket, &id).await.unwrap();
    assert_no_secrets(&proxy.logs());
}

/// A test server whose port another process took between the pick and the
/// bind (seen under load on a fresh machine: moto "listening", then
/// `Connection refused`) is started again on another port, and the port
/// returned is the one *it* listens on, not merely one that answers.
#[test]
fn a_server_whose_port_was_taken_is_started_again_on_another() {
    let moto = support::require("moto_server", "moto[server] from PyPI");
    let dir = support::short_tempdir();
    let mut squatter = None;
    let (mut child, port) = support::real::start_on_free_port("moto_server", |port| {
        if squatter.is_none() {
            // Someone else binds the port first, and answers connects.
            squatter = Some((
                port,
                std::net::TcpListener::bind(("127.0.0.1", port)).unwrap(),
            ));
        }
        std::process::Command::new(&moto)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .current_dir(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    });
    let (taken, _listener) = squatter.unwrap();
    assert_ne!(port, taken, "moto is said to listen on the squatted port");
    let (status, _, _) = support::real::http(
        &format!("127.0.0.1:{port}"),
        "GET",
        "/?Action=GetCallerIdentity&Version=2011-06-15",
        &[],
        b"",
    );
    assert_eq!(status, 200);
    let _ = child.kill();
    let _ = child.wait();
}

/// The sandbox keeper learns the pause image again when containerd comes
/// back after it was down, and not when a client connection dials its own
/// upstream connection: 100 crictl commands (each a new connection) cause
/// no rediscovery, a containerd restart exactly one.
#[tokio::test(flavor = "multi_thread")]
async fn the_sandbox_keeper_wakes_on_a_containerd_restart_not_on_new_connections() {
    let mut stack = Stack::start(&[ECR_HOST]);
    let proxy = stack.proxy("p", "sandbox_image = \"auto\"");
    let discoveries =
        |proxy: &support::ProxyProcess| proxy.logs().matches("learning the sandbox image").count();
    support::wait_until(Duration::from_secs(20), "the keeper's first look", || {
        proxy.logs().contains("sandbox image matches no pattern")
    });
    let before = discoveries(&proxy);
    let crictl = support::crictl();
    let endpoint = format!("unix://{}", proxy.socket.display());
    for _ in 0..100 {
        let out = std::process::Command::new(crictl)
            .args([
                "--runtime-endpoint",
                &endpoint,
                "--image-endpoint",
                &endpoint,
            ])
            .args(["images", "-q"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        discoveries(&proxy),
        before,
        "new client connections woke the sandbox keeper"
    );

    stack.containerd.restart();
    // A call notices containerd is back (and the keeper's own retry would).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while client(proxy.channel())
        .image_fs_info(ecr_pull_proxy::cri::ImageFsInfoRequest {})
        .await
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no call answered through the restarted containerd"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    support::wait_until(Duration::from_secs(20), "the keeper to look again", || {
        discoveries(&proxy) > before
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        discoveries(&proxy),
        before + 1,
        "one containerd restart should wake the keeper once:\n{}",
        proxy.logs()
    );
    assert_eq!(
        proxy.logs().matches("upstream answers again").count(),
        1,
        "the restart should be logged once for the daemon"
    );
}

/// An image name is the caller's: crictl passes one with a newline as it
/// is (kubelet refuses such names). It must not forge a log line, in the
/// text format or in JSON.
#[tokio::test(flavor = "multi_thread")]
async fn an_image_name_with_a_newline_gives_one_log_line_in_text_and_json() {
    let stack = Stack::start(&[ECR_HOST]);
    let forged = "docker.io/library/busybox\n2026-01-01T00:00:00Z ERROR forged=1";
    for format in ["text", "json"] {
        let proxy = stack.proxy_with_env_args(
            format,
            "",
            stack.moto.env(),
            vec![
                "--log-format",
                if format == "text" { "text" } else { "json" },
            ],
        );
        pull(proxy.channel(), forged, None)
            .await
            .expect_err("containerd refuses the name");
        support::wait_until(Duration::from_secs(10), "the pull line", || {
            proxy.logs().contains("forged=1")
        });
        let logs = proxy.logs();
        let lines: Vec<&str> = logs.lines().filter(|l| l.contains("forged=1")).collect();
        assert_eq!(lines.len(), 1, "{format}: {lines:#?}");
        let line = lines[0];
        match format {
            "text" => assert!(
                line.contains(" pull ") && line.contains("busybox\\n2026"),
                "{line}"
            ),
            _ => {
                let v: serde_json::Value = serde_json::from_str(line).expect(line);
                assert_eq!(v["message"], "pull", "{line}");
            }
        }
        // No line begins with what the caller wrote after its newline.
        assert!(!logs
            .lines()
            .any(|l| l.starts_with("2026-01-01T00:00:00Z ERROR")));
    }
}
