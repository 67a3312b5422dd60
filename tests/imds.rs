//! The instance role as the node's only AWS identity, through AWS's own
//! IMDS emulator (amazon-ec2-metadata-mock, IMDSv2 only) and real
//! containerd, registry and moto. The daemon runs with no keys, profile,
//! region or config file in its environment: only the endpoints of the
//! emulators. Which key signed each ECR call is read from moto's
//! recording of it.

mod support;

use std::time::{Duration, Instant, SystemTime};

use support::real::{Imds, RoleKeys};
use support::run_with_env;
use support::stack::*;
use tonic::Code;

/// A second registry host, in another region: a pull from it needs a
/// token fetch of its own, whatever the cache holds.
const WEST_HOST: &str = "123456789012.dkr.ecr.us-west-2.amazonaws.com";

/// What the emulator says the instance's region is.
const INSTANCE_REGION: &str = "eu-west-1";

/// The daemon's environment: moto's endpoint and the emulator's, nothing
/// about the identity.
fn env(s: &Stack, imds: &Imds) -> Vec<(&'static str, String)> {
    let mut env = vec![("AWS_ENDPOINT_URL", format!("http://{}", s.moto.addr))];
    env.extend(imds.env());
    env
}

/// No secret of the role, nor of the rest of the stack, in `text`.
fn assert_no_role_secret(text: &str, keys: &[&RoleKeys]) {
    assert_no_secret_in(text);
    for k in keys {
        for secret in [&k.secret, &k.session_token] {
            assert!(
                !text.contains(secret.as_str()),
                "a role secret was written: {text}"
            );
        }
    }
}

/// Who signed the `GetAuthorizationToken` calls moto got.
fn token_signers(s: &Stack) -> Vec<(String, Option<String>)> {
    s.moto.signers("GetAuthorizationToken")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pull_is_signed_with_the_instance_roles_keys_and_check_names_the_source() {
    let s = Stack::start(&[ECR_HOST]);
    s.registry.push_image("team/app", &["v1"]);
    let role = RoleKeys::tagged("one");
    let expires = SystemTime::now() + Duration::from_secs(6 * 3600);
    let imds = Imds::start(s.dir.path(), &role, expires, INSTANCE_REGION);
    assert!(imds.refuses_v1(), "the emulator should be IMDSv2 only");

    let proxy = s.proxy_with_env("p", "", env(&s, &imds));
    let image = format!("{ECR_HOST}/team/app:v1");
    pull(proxy.channel(), &image, None)
        .await
        .expect("a pull with the instance role's token");
    // containerd has it: the registry took the token.
    let status = client(s.direct())
        .image_status(ecr_pull_proxy::cri::ImageStatusRequest {
            image: Some(ecr_pull_proxy::cri::ImageSpec {
                image: image.clone(),
                ..Default::default()
            }),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(status.image.is_some(), "containerd should hold {image}");
    assert_eq!(
        token_signers(&s),
        vec![(role.access_key.clone(), Some(role.session_token.clone()))],
        "one token call, signed with the role's key and session token"
    );
    assert_no_role_secret(&proxy.logs(), &[&role]);

    // `check` on the same node: the identity comes from instance metadata,
    // and so does the region STS is asked in.
    let before = s.moto.calls("GetCallerIdentity", INSTANCE_REGION);
    let args = [
        "check",
        "--config",
        "/dev/null",
        "--upstream",
        s.containerd.socket.to_str().unwrap(),
        "--image",
        &image,
    ];
    let (code, out) = run_with_env(&args, &env(&s, &imds), Duration::from_secs(60));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("(credentials from IMDSv2)"), "{out}");
    assert_eq!(
        s.moto.calls("GetCallerIdentity", INSTANCE_REGION),
        before + 1,
        "check should ask STS in the instance's region"
    );
    assert!(
        s.moto
            .signers("GetCallerIdentity")
            .contains(&(role.access_key.clone(), Some(role.session_token.clone()))),
        "check's STS call should be signed with the role's key"
    );
    assert_no_role_secret(&out, &[&role]);
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_rotated_by_instance_metadata_are_used_once_the_old_ones_expire() {
    let s = Stack::start(&[ECR_HOST, WEST_HOST]);
    s.registry.push_image("team/app", &["v1"]);
    let (one, two) = (RoleKeys::tagged("one"), RoleKeys::tagged("two"));
    // Short-lived, as the SDK would see keys just before EC2 rotates them.
    let first_expiry = SystemTime::now() + Duration::from_secs(25);
    let imds = Imds::start(s.dir.path(), &one, first_expiry, INSTANCE_REGION);
    let proxy = s.proxy_with_env("p", "", env(&s, &imds));

    pull(proxy.channel(), &format!("{ECR_HOST}/team/app:v1"), None)
        .await
        .expect("the first pull");
    assert_eq!(
        token_signers(&s),
        vec![(one.access_key.clone(), Some(one.session_token.clone()))]
    );

    // EC2 rotates the role's keys; the old ones run out.
    imds.rotate(&two, SystemTime::now() + Duration::from_secs(6 * 3600));
    if let Ok(left) = first_expiry.duration_since(SystemTime::now()) {
        // A wall-clock expiry, not a synchronisation: nothing to wait on.
        std::thread::sleep(left + Duration::from_secs(1));
    }

    // A pull that needs a fresh ECR token (another region) gets it signed
    // with the new keys, not the expired ones.
    pull(proxy.channel(), &format!("{WEST_HOST}/team/app:v1"), None)
        .await
        .expect("the pull after the rotation");
    assert_eq!(
        token_signers(&s),
        vec![
            (one.access_key.clone(), Some(one.session_token.clone())),
            (two.access_key.clone(), Some(two.session_token.clone())),
        ],
        "the second token call should be signed with the rotated key"
    );
    assert_eq!(s.moto.calls("GetAuthorizationToken", "us-west-2"), 1);
    assert_no_role_secret(&proxy.logs(), &[&one, &two]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_started_while_instance_metadata_is_down_recovers_when_it_returns() {
    let s = Stack::start(&[ECR_HOST]);
    s.registry.push_image("team/app", &["v1"]);
    let role = RoleKeys::tagged("one");
    let mut imds = Imds::start(
        s.dir.path(),
        &role,
        SystemTime::now() + Duration::from_secs(6 * 3600),
        INSTANCE_REGION,
    );
    imds.stop();
    // token_wait 0: each pull says at once what stands.
    let proxy = s.proxy_with_env("p", "token_wait = \"0s\"", env(&s, &imds));
    let image = format!("{ECR_HOST}/team/app:v1");

    let err = pull(proxy.channel(), &image, None).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::Unauthenticated | Code::Unavailable),
        "{err:?}"
    );
    assert!(err.message().contains(&image), "{}", err.message());
    assert!(token_signers(&s).is_empty(), "no token call without keys");
    // Still serving.
    client(proxy.channel())
        .image_fs_info(ecr_pull_proxy::cri::ImageFsInfoRequest {})
        .await
        .unwrap();

    // The SDK looked for a region once (its warning at trace, once), and
    // the daemon said so in one line.
    let logs = proxy.logs();
    assert_eq!(
        logs.matches("failed to load region from IMDS").count(),
        1,
        "{logs}"
    );
    assert_eq!(
        logs.matches("no AWS region in the environment").count(),
        1,
        "{logs}"
    );

    imds.start_again();
    assert_eq!(imds.served_key().as_deref(), Some(role.access_key.as_str()));
    // The cache retries on its backoff (1 s, doubling, jittered); each pull
    // meanwhile is answered at once from the last failure.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match pull(proxy.channel(), &image, None).await {
            Ok(_) => break,
            Err(e) => assert!(
                Instant::now() < deadline,
                "no recovery within 30 s of instance metadata returning: {e:?}\n{}",
                proxy.logs()
            ),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        token_signers(&s),
        vec![(role.access_key.clone(), Some(role.session_token.clone()))]
    );
    assert_no_role_secret(&proxy.logs(), &[&role]);
}

/// At the level a node runs at, a daemon that finds no AWS region says so
/// in one line of its own, not in the SDK's error dumps (one per chain
/// that looks, three before).
#[tokio::test(flavor = "multi_thread")]
async fn no_region_anywhere_is_one_info_line_not_the_sdks_warnings() {
    let s = Stack::start(&[ECR_HOST]);
    let mut imds = Imds::start(
        s.dir.path(),
        &RoleKeys::tagged("one"),
        SystemTime::now() + Duration::from_secs(6 * 3600),
        INSTANCE_REGION,
    );
    imds.stop();
    let proxy = s.proxy_with_env_args(
        "p",
        "token_wait = \"0s\"",
        env(&s, &imds),
        vec!["--log-level", "info"],
    );
    for _ in 0..2 {
        pull(proxy.channel(), &format!("{ECR_HOST}/app:v1"), None)
            .await
            .unwrap_err();
    }
    let logs = proxy.logs();
    let summary: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("no AWS region in the environment"))
        .collect();
    assert_eq!(summary.len(), 1, "{logs}");
    assert!(
        summary[0].contains("INFO") && summary[0].contains("fallback=\"us-east-1\""),
        "{logs}"
    );
    assert!(!logs.contains("failed to load region from IMDS"), "{logs}");
    assert!(!logs.contains("FailedToLoadToken"), "{logs}");
}

/// A `check` output line reduced to its shape: the label column, and the
/// value with what differs from node to node (ARNs, paths, timestamps,
/// quoted patterns, numbers) replaced by a placeholder.
fn check_shape(line: &str) -> (String, String) {
    let (label, value) = match line.split_once(": ") {
        // `ok: …` and `problem: …` have no label column.
        Some((l @ ("ok" | "problem"), v)) => (l.to_owned(), v.to_owned()),
        _ => (
            line.get(..CHECK_LABEL_WIDTH)
                .unwrap_or(line)
                .trim()
                .to_owned(),
            line.get(CHECK_LABEL_WIDTH..).unwrap_or("").to_owned(),
        ),
    };
    let mut out = String::new();
    let mut rest = value.as_str();
    while let Some(c) = rest.chars().next() {
        let token_end = |r: &str, stop: &[char]| r.find(|c| stop.contains(&c)).unwrap_or(r.len());
        let skip = if rest.starts_with("arn:") {
            out.push_str("ARN");
            token_end(rest, &[' ', ')'])
        } else if c == '/' && (out.is_empty() || out.ends_with([' ', '('])) {
            out.push_str("PATH");
            token_end(rest, &[' ', ':', ';', ')'])
        } else if c == '"' {
            out.push('Q');
            rest[1..].find('"').map_or(rest.len(), |i| i + 2)
        } else if c.is_ascii_digit() {
            // A number, or a timestamp (2026-11-29T04:00:00Z).
            let end = token_end(rest, &[' ', ',', ';', ')', '.', '/', ':', 'h', 'm', 's']).max(1);
            let end = if rest[..end].contains('-') && rest[end..].starts_with(':') {
                token_end(rest, &[' ', ',', ';', ')'])
            } else {
                end
            };
            out.push('N');
            end
        } else {
            out.push(c);
            c.len_utf8()
        };
        rest = &rest[skip..];
    }
    (label, out)
}

/// Where `check` starts its values.
const CHECK_LABEL_WIDTH: usize = 22;

/// README's `check` sample is a real run's output, line for line, on a
/// node whose identity is its instance role: the same lines in the same
/// order, each the same but for ARNs, paths, times, patterns and numbers.
#[test]
fn the_readmes_check_sample_has_the_shape_of_a_real_run() {
    let s = Stack::start(&[ECR_HOST]);
    let role = RoleKeys::tagged("sample");
    let expires = SystemTime::now() + Duration::from_secs(6 * 3600);
    let imds = Imds::start(s.dir.path(), &role, expires, INSTANCE_REGION);
    // A token with a real lifetime (moto's expired in 2015).
    let ecr = support::fake_ecr::FakeEcr::start("sample-password-1e9d");
    let mut env = env(&s, &imds);
    env.push(("AWS_ENDPOINT_URL_ECR", ecr.endpoint.clone()));
    let config = s.dir.path().join("config.toml");
    std::fs::write(&config, "").unwrap();
    let args = [
        "check",
        "--config",
        config.to_str().unwrap(),
        "--upstream",
        s.containerd.socket.to_str().unwrap(),
        "--image",
        &format!("{ECR_HOST}/app:v1"),
    ];
    let (code, out) = run_with_env(&args, &env, Duration::from_secs(60));
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(ecr.calls(), 1, "check should have fetched a token");

    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let sample: Vec<&str> = readme
        .split("ecr-pull-proxy check --image <the image that fails>")
        .nth(1)
        .and_then(|r| r.split("```\n").nth(1))
        .expect("README Troubleshooting has a check sample")
        .lines()
        .collect();
    let real: Vec<&str> = out.lines().collect();
    let shapes = |lines: &[&str]| lines.iter().map(|l| check_shape(l)).collect::<Vec<_>>();
    assert_eq!(
        shapes(&sample),
        shapes(&real),
        "README's check sample:\n{}\nreal:\n{out}",
        sample.join("\n")
    );
}
