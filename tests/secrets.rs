//! No secret is ever written: not in `Debug` of the types that hold one,
//! not in the daemon's JSON log at trace level, not in `check`'s output
//! (passing or failing), not in `/metrics` after failures, not in a status
//! a caller gets. Every secret the stack issued is in the one list
//! (`support::secrets`), moto's STS keys and session tokens included.

mod support;

use std::time::{Duration, SystemTime};

use ecr_pull_proxy::config::{Cli, Config, Role};
use ecr_pull_proxy::cri;
use ecr_pull_proxy::ecr::{Credentials, Token};
use support::fake_ecr::FakeEcr;
use support::real::MOTO_PASSWORD;
use support::run_with_env;
use support::secrets;
use support::stack::*;

/// The external id of the tests below: registered as a secret by the
/// proxy harness (it reads the config) and by the `Debug` test itself.
const EXTERNAL_ID: &str = "ext-id-secret-4d7b";

fn debug_of(what: &str, text: String, secret: &str) {
    assert!(
        !text.contains(secret),
        "Debug of {what} shows a secret: {text}"
    );
    assert!(
        text.contains("<redacted>"),
        "Debug of {what} should say that something was left out: {text}"
    );
}

#[test]
fn debug_of_config_role_and_every_credential_type_shows_no_secret() {
    secrets::issued(EXTERNAL_ID);
    let text = format!(
        "[[registries]]\npatterns = [\"m.example\"]\n\
         registry = \"210987654321.dkr.ecr.eu-west-1.amazonaws.com\"\n\
         role_arn = \"arn:aws:iam::210987654321:role/pull\"\n\
         external_id = \"{EXTERNAL_ID}\"\n"
    );
    let cli = Cli::try_parse_args(["ecr-pull-proxy"]).unwrap();
    let config = Config::from_toml(&text, &cli).unwrap();
    let debug = format!("{config:?}");
    debug_of("Config", debug.clone(), EXTERNAL_ID);
    // The rest of the entry is there: it is redacted, not dropped.
    assert!(
        debug.contains("arn:aws:iam::210987654321:role/pull"),
        "{debug}"
    );
    let role = config.credentials.registries[0].role.clone().unwrap();
    assert_eq!(role.external_id.as_deref(), Some(EXTERNAL_ID));
    debug_of("Role", format!("{role:?}"), EXTERNAL_ID);
    let role = Role {
        arn: "arn:aws:iam::1:role/r".into(),
        external_id: None,
    };
    assert!(format!("{role:?}").contains("external_id: None"));

    let password = "registry-password-0c4f";
    let credentials = Credentials {
        username: "AWS".into(),
        password: password.into(),
    };
    debug_of("Credentials", format!("{credentials:?}"), password);
    let token = Token {
        credentials,
        expires_at: SystemTime::now() + Duration::from_secs(3600),
    };
    debug_of("Token", format!("{token:?}"), password);

    // What a caller sends: every credential field of AuthConfig, inside a
    // whole PullImageRequest as tonic or a log line would print it.
    let auth = cri::AuthConfig {
        username: "AWS".into(),
        password: "auth-password-8e21".into(),
        auth: "YXV0aC1maWVsZC0zYjdk".into(),
        server_address: ECR_HOST.into(),
        identity_token: "identity-token-51aa".into(),
        registry_token: "registry-token-a06e".into(),
    };
    let request = cri::PullImageRequest {
        image: Some(cri::ImageSpec {
            image: format!("{ECR_HOST}/app:v1"),
            ..Default::default()
        }),
        auth: Some(auth.clone()),
        sandbox_config: None,
    };
    for (what, debug) in [
        ("AuthConfig", format!("{auth:?}")),
        ("PullImageRequest", format!("{request:?}")),
        ("PullImageRequest ({:#?})", format!("{request:#?}")),
    ] {
        for secret in [
            &auth.password,
            &auth.auth,
            &auth.identity_token,
            &auth.registry_token,
        ] {
            debug_of(what, debug.clone(), secret);
        }
        // Which fields are set stays visible, and so do the ones that are
        // not secret.
        assert!(
            debug.contains(ECR_HOST) && debug.contains("\"AWS\""),
            "{debug}"
        );
    }
    let empty = format!("{:?}", cri::AuthConfig::default());
    assert!(!empty.contains("<redacted>"), "{empty}");

    // The SDK's own credential type, as the daemon holds the node's keys
    // and a role's session.
    let aws = aws_credential_types::Credentials::new(
        "ASIAEXAMPLEKEY",
        "aws-secret-key-9b3e",
        Some("aws-session-token-77f0".into()),
        None,
        "test",
    );
    let debug = format!("{aws:?}");
    for secret in ["aws-secret-key-9b3e", "aws-session-token-77f0"] {
        assert!(!debug.contains(secret), "{debug}");
    }
}

/// Everything a stack with a role, ECR Public and a caller with its own
/// credentials can make the daemon write, with failures of every kind,
/// in the JSON log format at trace level: no secret in any of it.
#[tokio::test(flavor = "multi_thread")]
async fn json_trace_logs_check_output_metrics_and_statuses_carry_no_secret() {
    // The registry opens only to the assumed role's token (moto derives the
    // password from the account that asks); ECR Public's token is the same
    // password, from the stand-in ECR Public.
    let mirror = "ecr-mirror.internal";
    let role_password = "210987654321-auth-token";
    let s = Stack::with_password(&[mirror, ECR_HOST, "public.ecr.aws"], role_password);
    s.registry.push_image("team/app", &["v1"]);
    let public = FakeEcr::start(role_password);
    let metrics = s.dir.path().join("m.sock");
    let config = format!(
        "ecr_public = true\n\
         token_wait = \"0s\"\n\
         existing_credentials = \"fallback\"\n\
         metrics_listen = \"unix:{}\"\n\
         [[registries]]\n\
         patterns = [\"{mirror}/team\"]\n\
         registry = \"210987654321.dkr.ecr.eu-west-1.amazonaws.com\"\n\
         role_arn = \"arn:aws:iam::210987654321:role/pull\"\n\
         external_id = \"{EXTERNAL_ID}\"\n",
        metrics.display(),
    );
    let mut env = s.moto.env();
    env.push(("AWS_ENDPOINT_URL_ECR_PUBLIC", public.endpoint.clone()));
    let proxy = s.proxy_with_env_args("p", &config, env.clone(), vec!["--log-format", "json"]);

    // 1. The role's token, injected (AssumeRole with the external id).
    pull(proxy.channel(), &format!("{mirror}/team/app:v1"), None)
        .await
        .expect("pull through the role");
    // 2. ECR Public's token.
    pull(proxy.channel(), "public.ecr.aws/team/app:v1", None)
        .await
        .expect("pull with an ECR Public token");
    // 3. The node's own token does not open this registry: refused.
    assert_refused(pull(proxy.channel(), &format!("{ECR_HOST}/team/app:v1"), None).await);
    // 4. A caller's own wrong credentials: refused, then retried with the
    // node's token (fallback), refused again.
    let auth = cri::AuthConfig {
        username: "AWS".into(),
        password: CALLER_PASSWORD.into(),
        server_address: ECR_HOST.into(),
        ..Default::default()
    };
    assert_refused(
        pull(
            proxy.channel(),
            &format!("{ECR_HOST}/team/app:v2"),
            Some(auth),
        )
        .await,
    );
    // 5. An image that does not exist under a token that works.
    let err = pull(proxy.channel(), &format!("{mirror}/team/missing:v1"), None)
        .await
        .unwrap_err();
    secrets::assert_none_in("a PullImage status", err.message());
    // moto issued the role's session: its keys are in the list now, read
    // from moto itself, so the scans below cover them.
    let issued = secrets::moto_issued(&s.moto.addr);
    assert!(
        issued
            .iter()
            .any(|t| t.starts_with(secrets::MOTO_SESSION_TOKEN_PREFIX)),
        "moto issued no session token the scan knows of: {issued:?}"
    );
    let all = secrets::all();
    for secret in issued.iter().chain(
        [EXTERNAL_ID, role_password, CALLER_PASSWORD]
            .map(String::from)
            .iter(),
    ) {
        assert!(all.contains(secret), "{secret} is not in the list");
    }

    // /metrics after all those failures.
    let body = support::get_unix(&metrics, "/metrics");
    assert!(
        body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200"),
        "{body}"
    );
    assert!(body.contains("result=\"error\""), "{body}");
    secrets::assert_none_in("/metrics", &body);

    // The log: JSON, at trace level, and about the calls above.
    let logs = proxy.logs();
    let mut levels = std::collections::BTreeSet::new();
    for line in logs.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        levels.insert(v["level"].as_str().unwrap_or("").to_owned());
    }
    // Started at trace (the harness's default): the debug lines are there.
    assert!(levels.contains("DEBUG"), "{levels:?}");
    for needle in [
        "as arn:aws:iam::210987654321:role/pull",
        r#""registry":"public.ecr.aws","credentials":"injected""#,
        r#""credentials":"fallback""#,
        r#""result":"error""#,
    ] {
        assert!(
            logs.contains(needle),
            "the log should mention {needle}:\n{logs}"
        );
    }
    secrets::assert_none_in("the JSON log", &logs);

    // check, passing and failing, with the same config and environment.
    let upstream = s.containerd.socket.to_str().unwrap().to_owned();
    let cfg = s.dir.path().join("check.toml");
    std::fs::write(&cfg, config.replace("metrics_listen", "# metrics_listen")).unwrap();
    let check = |image: &str, env: &[(&str, String)]| {
        run_with_env(
            &[
                "check",
                "--config",
                cfg.to_str().unwrap(),
                "--upstream",
                &upstream,
                "--image",
                image,
            ],
            env,
            Duration::from_secs(60),
        )
    };
    let (code, out) = check(&format!("{mirror}/team/app:v1"), &env);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("fetched for region eu-west-1, account 210987654321"),
        "check should have fetched the role's token:\n{out}"
    );
    secrets::assert_none_in("check's output", &out);
    // AWS unreachable: a failing check.
    let mut down = env.clone();
    down.retain(|(k, _)| !k.starts_with("AWS_ENDPOINT_URL"));
    down.push(("AWS_ENDPOINT_URL", "http://127.0.0.1:1".into()));
    let (code, out) = check(&format!("{mirror}/team/app:v1"), &down);
    assert_ne!(code, Some(0), "{out}");
    assert!(out.contains("problem: "), "{out}");
    secrets::assert_none_in("check's output", &out);
    assert!(!out.contains(MOTO_PASSWORD));
}
