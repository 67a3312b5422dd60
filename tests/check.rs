//! `ecr-pull-proxy check` against the moto-backed stack: exit 0 when all is
//! well, and one clear line per problem otherwise.

mod support;

use std::time::Duration;

use support::real::MOTO_PASSWORD;
use support::run_with_env;
use support::stack::*;

const TIMEOUT: Duration = Duration::from_secs(60);

/// `ecr-pull-proxy check` with no config file, against `upstream`, for
/// `image`, in `env`.
fn check(upstream: &str, image: &str, env: &[(&str, String)]) -> (Option<i32>, String) {
    let args = [
        "check",
        "--config",
        "/dev/null",
        "--upstream",
        upstream,
        "--image",
        image,
    ];
    run_with_env(&args, env, TIMEOUT)
}

#[test]
fn check_passes_on_a_working_node_and_explains_the_image() {
    let s = Stack::start(&[ECR_HOST]);
    let upstream = s.containerd.socket.to_str().unwrap().to_owned();
    let image = format!("{ECR_HOST}/app:v1");
    let (code, out) = check(&upstream, &image, &s.moto.env());
    assert_eq!(code, Some(0), "{out}");
    for needle in [
        "answers ImageFsInfo",
        "arn:aws:sts::123456789012:user/moto",
        "credentials from Environment",
        "matches \"*.dkr.ecr.*.amazonaws.com\"",
        "account 123456789012",
        "fetched for region us-east-1",
        "already expired on arrival",
        "ok: everything needed would work",
    ] {
        assert!(
            out.contains(needle),
            "check output should mention {needle:?}:\n{out}"
        );
    }
    assert_no_secret_in(&out);
    assert!(!out.contains(MOTO_PASSWORD));

    // containerd 1.6's own pause image: named in its CRI status, no ECR.
    assert!(
        out.contains("sandbox image")
            && out.contains("registry.k8s.io/pause:3.6 (from containerd's CRI status)")
            && out.contains("matches no pattern"),
        "{out}"
    );

    // An image that gets no token: the line says why, and it is not a problem.
    let other = format!("{ECR_HOST}.evil.example/app:v1");
    let (code, out) = check(&upstream, &other, &s.moto.env());
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("no token: host 123456789012.dkr.ecr.us-east-1.amazonaws.com.evil.example matches no pattern"), "{out}");
}

#[test]
fn check_names_each_problem_on_one_line() {
    let s = Stack::start(&[ECR_HOST]);
    let image = format!("{ECR_HOST}/app:v1");

    // An unreachable upstream.
    let (code, out) = check("/nonexistent/c.sock", &image, &s.moto.env());
    assert_eq!(code, Some(1), "{out}");
    let problems: Vec<&str> = out.lines().filter(|l| l.starts_with("problem: ")).collect();
    assert_eq!(problems.len(), 1, "{out}");
    assert!(
        problems[0].contains("/nonexistent/c.sock")
            && problems[0].contains("is containerd running"),
        "{out}"
    );

    // An identity that cannot get a token: no credentials at all.
    let upstream = s.containerd.socket.to_str().unwrap().to_owned();
    let env = vec![("AWS_ENDPOINT_URL", format!("http://{}", s.moto.addr))];
    let (code, out) = check(&upstream, &image, &env);
    assert_eq!(code, Some(1), "{out}");
    let problems: Vec<&str> = out.lines().filter(|l| l.starts_with("problem: ")).collect();
    assert_eq!(problems.len(), 2, "{out}");
    assert!(
        problems[0].contains("AWS credential chain")
            && problems[0].contains("no credentials found"),
        "{out}"
    );
    assert!(
        problems[1].contains("cannot get an ECR token for")
            && problems[1].contains("NoCredentials"),
        "{out}"
    );

    // A bad config: exit 64, the key named, nothing else tried.
    let dir = support::short_tempdir();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "existing_credentials = \"always\"\n").unwrap();
    let (code, out) = run_with_env(
        &["check", "--config", bad.to_str().unwrap()],
        &s.moto.env(),
        TIMEOUT,
    );
    assert_eq!(code, Some(64), "{out}");
    assert!(
        out.contains("existing_credentials") && out.contains("fallback"),
        "{out}"
    );
    assert_eq!(out.lines().count(), 1, "{out}");
}

/// `check` shows a pause image in ECR: where it came from, that it gets a
/// token, and whether containerd has it.
#[test]
fn check_shows_the_sandbox_image_its_source_and_presence() {
    let pause = format!("{ECR_HOST}/eks/pause:3.9");
    let s = Stack::with_sandbox_image(&[ECR_HOST], &pause);
    let upstream = s.containerd.socket.to_str().unwrap().to_owned();
    let (code, out) = check(&upstream, &format!("{ECR_HOST}/app:v1"), &s.moto.env());
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!(
            "{pause} (from containerd's CRI status); gets an ECR token"
        )) && out.contains("not present"),
        "{out}"
    );
    assert_no_secret_in(&out);
}

/// What `check` prints of its argument cannot forge a line of the report
/// or reach the terminal as a control sequence.
#[test]
fn check_escapes_an_image_reference_with_control_characters() {
    let image = "x\nproblem: forged\u{1b}[31m";
    let (_, out) = check("/nonexistent/c.sock", image, &[]);
    assert!(
        !out.lines().any(|l| l.starts_with("problem: forged")),
        "{out}"
    );
    assert!(!out.contains('\u{1b}'), "{out:?}");
    assert!(out.contains("x\\nproblem: forged\\u{1b}[31m"), "{out}");
}

/// With credentials but no reachable STS, the identity line says STS
/// could not be reached, not that it refused them.
#[test]
fn check_tells_an_unreachable_sts_from_a_refusal() {
    let env = [
        ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "check-secret-key-77".to_owned()),
        ("AWS_REGION", "us-east-1".to_owned()),
        ("AWS_ENDPOINT_URL", "http://127.0.0.1:1".to_owned()),
        ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
    ];
    let (code, out) = check("/nonexistent/c.sock", &format!("{ECR_HOST}/app:v1"), &env);
    assert_ne!(code, Some(0));
    assert!(out.contains(", but STS could not be reached"), "{out}");
    assert!(!out.contains("does not accept"), "{out}");
    assert!(!out.contains("check-secret-key-77"), "{out}");
}

/// GovCloud registries are labelled with their partition; the image line
/// says which token it needs, not that it has one.
#[test]
fn check_names_govcloud_as_its_own_partition() {
    let (_, out) = check(
        "/nonexistent/c.sock",
        "123456789012.dkr.ecr.us-gov-west-1.amazonaws.com/app:v1",
        &[("AWS_EC2_METADATA_DISABLED", "true".to_owned())],
    );
    assert!(
        out.contains("needs a token for aws-us-gov/us-gov-west-1/standard"),
        "{out}"
    );
    assert!(out.contains("token                 none"), "{out}");
}

/// An imported kubelet CredentialProviderConfig whose matchImages covers
/// ECR Public turns its token on, and `check` says so.
#[test]
fn check_shows_ecr_public_on_through_an_imported_config() {
    let dir = support::short_tempdir();
    let provider = dir.path().join("cp.yaml");
    std::fs::write(
        &provider,
        "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n  - name: ecr-credential-provider\n    matchImages:\n      - \"*.dkr.ecr.*.amazonaws.com\"\n      - \"public.ecr.aws\"\n    defaultCacheDuration: \"12h\"\n    apiVersion: credentialprovider.kubelet.k8s.io/v1\n",
    )
    .unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!("credential_provider_config = \"{}\"\n", provider.display()),
    )
    .unwrap();
    let args = [
        "check",
        "--config",
        config.to_str().unwrap(),
        "--upstream",
        "/nonexistent/c.sock",
    ];
    let (_, out) = run_with_env(
        &args,
        &[("AWS_EC2_METADATA_DISABLED", "true".to_owned())],
        TIMEOUT,
    );
    assert!(
        out.contains("ecr_public            true (an imported matchImages covers public.ecr.aws)"),
        "{out}"
    );
}

/// Behind an HTTP proxy, `check` names the proxy AWS calls use (its
/// password redacted) and reports instance metadata left out of NO_PROXY.
#[test]
fn check_shows_the_http_proxy_and_warns_when_imds_would_use_it() {
    let env = [
        (
            "HTTPS_PROXY",
            "http://node:proxy-pw-31@127.0.0.1:1".to_owned(),
        ),
        ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
    ];
    let (code, out) = check("/nonexistent/c.sock", &format!("{ECR_HOST}/app:v1"), &env);
    assert_ne!(code, Some(0));
    assert!(
        out.contains(
            "http proxy            http://<redacted>@127.0.0.1:1 for AWS calls; NO_PROXY unset"
        ),
        "{out}"
    );
    assert!(
        out.contains(
            "problem: NO_PROXY does not cover instance metadata (169.254.169.254, fd00:ec2::254)"
        ),
        "{out}"
    );
    assert!(!out.contains("proxy-pw-31"), "{out}");

    let env = [
        ("HTTPS_PROXY", "http://127.0.0.1:1".to_owned()),
        ("NO_PROXY", "169.254.169.254,fd00:ec2::254".to_owned()),
        ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
    ];
    let (_, out) = check("/nonexistent/c.sock", &format!("{ECR_HOST}/app:v1"), &env);
    assert!(!out.contains("NO_PROXY does not cover"), "{out}");
}
