//! A node that reaches AWS only through an HTTP proxy: Debian's tinyproxy
//! in front of moto, the instance role from AWS's IMDS emulator on another
//! loopback address (127.0.0.2, so that `NO_PROXY` can tell the two
//! apart), real containerd and registry. Each call is counted where it
//! lands: in tinyproxy's log of what it forwarded, in the `Via` header
//! tinyproxy adds to what moto records, and in the emulator's own log.

mod support;

use std::time::{Duration, SystemTime};

use support::real::{Imds, RoleKeys, Tinyproxy};
use support::run_with_env;
use support::stack::*;

/// The address instance metadata listens on here; the real ones
/// (169.254.169.254, fd00:ec2::254) are what `check` looks for in
/// `NO_PROXY`.
const IMDS_HOST: &str = "127.0.0.2";

/// A registry entry whose token needs an `AssumeRole` first: the daemon
/// makes both an STS and an ECR call for it. Only the assumed role's
/// token (account 210987654321, moto's rule) opens the stack's registry.
const ROLE_CONFIG: &str = r#"
[[registries]]
patterns = ["ecr-mirror.internal/team"]
registry = "210987654321.dkr.ecr.eu-west-1.amazonaws.com"
role_arn = "arn:aws:iam::210987654321:role/pull"
"#;

struct Node {
    stack: Stack,
    imds: Imds,
    proxy: Tinyproxy,
    role: RoleKeys,
}

fn node() -> Node {
    let stack = Stack::with_password(
        &["ecr-mirror.internal", ECR_HOST],
        "210987654321-auth-token",
    );
    stack.registry.push_image("team/app", &["v1"]);
    let role = RoleKeys::tagged("proxy");
    let imds = Imds::start_on(
        IMDS_HOST,
        stack.dir.path(),
        &role,
        SystemTime::now() + Duration::from_secs(6 * 3600),
        "eu-west-1",
    );
    let proxy = Tinyproxy::start(stack.dir.path());
    Node {
        stack,
        imds,
        proxy,
        role,
    }
}

impl Node {
    /// The unit's environment behind the proxy, with `no_proxy`.
    fn env(&self, no_proxy: Option<&str>) -> Vec<(&'static str, String)> {
        let mut env = vec![
            (
                "AWS_ENDPOINT_URL",
                format!("http://{}", self.stack.moto.addr),
            ),
            ("HTTPS_PROXY", self.proxy.url()),
            ("HTTP_PROXY", self.proxy.url()),
        ];
        if let Some(n) = no_proxy {
            env.push(("NO_PROXY", n.to_owned()));
        }
        env.extend(self.imds.env());
        env
    }

    fn imds_authority(&self) -> String {
        format!("{}:{}", self.imds.host, self.imds.port)
    }

    /// moto's `action` requests: how many came through tinyproxy (its
    /// `Via` header on them), and how many came direct.
    fn proxied(&self, action: &str) -> (usize, usize) {
        let vias = self.stack.moto.vias(action);
        let through = vias
            .iter()
            .filter(|v| v.as_deref().is_some_and(|v| v.contains("tinyproxy")))
            .count();
        (through, vias.len() - through)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sts_and_ecr_calls_pass_the_proxy_and_instance_metadata_does_not_when_no_proxy_covers_it() {
    let n = node();
    let no_proxy = format!("{IMDS_HOST},169.254.169.254,fd00:ec2::254");
    let daemon = n
        .stack
        .proxy_with_env("p", ROLE_CONFIG, n.env(Some(&no_proxy)));
    pull(daemon.channel(), "ecr-mirror.internal/team/app:v1", None)
        .await
        .expect("a pull with the assumed role's token, through the proxy");

    // Both AWS calls went through tinyproxy: it logged them, and moto saw
    // its Via header on each.
    assert_eq!(n.proxied("AssumeRole"), (1, 0));
    assert_eq!(n.proxied("GetAuthorizationToken"), (1, 0));
    assert!(
        n.proxy.requests_to(&n.stack.moto.addr) >= 2,
        "{:?}",
        n.proxy.requests()
    );
    // Instance metadata was asked directly: the emulator answered the
    // credential requests, and none of them passed the proxy.
    assert!(
        n.imds
            .requests()
            .iter()
            .any(|p| p.starts_with("/latest/meta-data/iam/security-credentials")),
        "{:?}",
        n.imds.requests()
    );
    assert_eq!(
        n.proxy.requests_to(&n.imds_authority()),
        0,
        "{:?}",
        n.proxy.requests()
    );
    // The role's keys signed the AssumeRole.
    assert_eq!(
        n.stack.moto.signers("AssumeRole"),
        vec![(
            n.role.access_key.clone(),
            Some(n.role.session_token.clone())
        )]
    );

    // `check` names the proxy, finds nothing wrong, and its own STS call
    // passes the proxy too.
    let (code, out) = run_with_env(
        &[
            "check",
            "--config",
            "/dev/null",
            "--upstream",
            n.stack.containerd.socket.to_str().unwrap(),
        ],
        &n.env(Some(&no_proxy)),
        Duration::from_secs(60),
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!(
            "http proxy            {} for AWS calls; NO_PROXY {no_proxy}",
            n.proxy.url()
        )),
        "{out}"
    );
    assert!(out.contains("(credentials from IMDSv2)"), "{out}");
    // (The direct one is the test's own, made when moto started.)
    assert_eq!(n.proxied("GetCallerIdentity"), (1, 1));
    assert_eq!(n.proxy.requests_to(&n.imds_authority()), 0);
    for text in [daemon.logs(), out] {
        assert!(!text.contains(&n.role.secret), "{text}");
        assert!(!text.contains(&n.role.session_token), "{text}");
        assert_no_secret_in(&text);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn instance_metadata_left_out_of_no_proxy_is_asked_of_the_proxy_and_check_says_so() {
    let n = node();
    let daemon = n.stack.proxy_with_env("p", ROLE_CONFIG, n.env(None));
    // tinyproxy can reach this emulator, so the pull still works here; a
    // real proxy cannot reach 169.254.169.254 and the node finds no
    // credentials. What matters is where the requests went.
    pull(daemon.channel(), "ecr-mirror.internal/team/app:v1", None)
        .await
        .expect("the pull");
    let imds_via_proxy = n.proxy.requests_to(&n.imds_authority());
    assert!(
        imds_via_proxy >= 2,
        "the IMDSv2 token and credential requests should have passed the proxy: {:?}",
        n.proxy.requests()
    );

    let (code, out) = run_with_env(
        &[
            "check",
            "--config",
            "/dev/null",
            "--upstream",
            n.stack.containerd.socket.to_str().unwrap(),
        ],
        &n.env(None),
        Duration::from_secs(60),
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!(
            "http proxy            {} for AWS calls; NO_PROXY unset",
            n.proxy.url()
        )),
        "{out}"
    );
    assert!(
        out.contains(
            "problem: NO_PROXY does not cover instance metadata (169.254.169.254, fd00:ec2::254)"
        ),
        "{out}"
    );
    assert!(
        n.proxy.requests_to(&n.imds_authority()) > imds_via_proxy,
        "check's own instance-metadata requests should have passed the proxy too"
    );
}
