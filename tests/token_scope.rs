//! The token reaches only the registry it is for. A `hosts.toml` mirror in
//! front of the "ECR" host (a recording relay before a real registry)
//! keeps the head of every request it receives; containerd 1.6 and 2.x
//! pull through the daemon, and the mirror must never see a credential:
//! - a mirror that serves the image without asking serves the pull;
//! - a mirror that wants credentials of its own (a registry with another
//!   htpasswd user) challenges, gets none, and containerd goes on to the
//!   server, which gets the token;
//! - the same for a `[[registries]]` alias host;
//! - a changed `hosts.toml` is followed at the next pull, without a restart.
//!
//! With `server_address` left empty (the behaviour before), containerd
//! hands the token to every host it tries: the challenging mirror receives
//! it, and these tests fail.

mod support;

use std::time::Duration;

use support::real::{ContainerdVersion, Recorder, Registry};
use support::run_with_env;
use support::stack::*;

const IMAGE_REPO: &str = "team/app";
const ALIAS_HOST: &str = "ecr-alias.internal";
const ALIAS_CONFIG: &str = r#"
[[registries]]
patterns = ["ecr-alias.internal/team"]
registry = "123456789012.dkr.ecr.us-east-1.amazonaws.com"
"#;

/// `hosts.toml` for a host: `mirror` tried first, then `server`.
fn hosts_toml(mirror: &str, server: &str) -> String {
    format!(
        "server = \"http://{server}\"\n\n[host.\"http://{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
    )
}

/// A mirror that serves `team/app:v1` to anyone, behind a recorder.
fn open_mirror(stack: &Stack) -> (Registry, Recorder) {
    let registry = Registry::start_named(stack.dir.path(), "open-mirror", None);
    registry.push_image(IMAGE_REPO, &["v1"]);
    let recorder = Recorder::start(&registry.addr);
    (registry, recorder)
}

/// A mirror that wants credentials of its own (user `mirror`), behind a
/// recorder: it challenges every request without them.
fn challenging_mirror(stack: &Stack) -> (Registry, Recorder) {
    let registry = Registry::start_named(
        stack.dir.path(),
        "auth-mirror",
        Some(("mirror", "mirror-own-password-7c1e")),
    );
    let recorder = Recorder::start(&registry.addr);
    (registry, recorder)
}

fn assert_no_credential_reached(mirror: &Recorder) {
    let requests = mirror.requests();
    assert!(
        !requests.is_empty(),
        "containerd never tried the mirror: the test proves nothing"
    );
    assert_eq!(
        mirror.authorizations(),
        0,
        "the mirror received credentials; its requests: {requests:#?}"
    );
}

async fn a_mirror_that_serves_the_image_serves_it_without_the_token(version: ContainerdVersion) {
    let stack = Stack::on(version, &[ECR_HOST]);
    stack.registry.push_image(IMAGE_REPO, &["v1"]);
    let (mirror_registry, mirror) = open_mirror(&stack);
    stack
        .containerd
        .write_hosts(ECR_HOST, &hosts_toml(&mirror.addr, &stack.registry.addr));
    let served = stack.registry.manifest_requests(IMAGE_REPO).len();
    let proxy = stack.proxy("p", "");
    let image = format!("{ECR_HOST}/{IMAGE_REPO}:v1");
    pull(proxy.channel(), &image, None)
        .await
        .expect("the pull through the mirror");
    assert_no_credential_reached(&mirror);
    assert!(
        mirror_registry.manifest_requests(IMAGE_REPO).contains(&200),
        "the mirror should have served the manifest"
    );
    assert_eq!(
        stack.registry.manifest_requests(IMAGE_REPO).len(),
        served,
        "the server should not have been asked: the mirror had the image"
    );
    assert_eq!(stack.moto.calls("GetAuthorizationToken", "us-east-1"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mirror_that_serves_the_image_serves_it_without_the_token_on_containerd_1_6() {
    a_mirror_that_serves_the_image_serves_it_without_the_token(ContainerdVersion::One).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mirror_that_serves_the_image_serves_it_without_the_token_on_containerd_2() {
    a_mirror_that_serves_the_image_serves_it_without_the_token(ContainerdVersion::Two).await;
}

/// The mirror challenges and gets nothing; the server gets the token.
async fn a_challenging_mirror_gets_nothing_and_the_server_the_token(
    version: ContainerdVersion,
    host: &str,
    config: &str,
) {
    let stack = Stack::on(version, &[host]);
    stack.registry.push_image(IMAGE_REPO, &["v1"]);
    let (_mirror_registry, mirror) = challenging_mirror(&stack);
    stack
        .containerd
        .write_hosts(host, &hosts_toml(&mirror.addr, &stack.registry.addr));
    let proxy = stack.proxy("p", config);
    let image = format!("{host}/{IMAGE_REPO}:v1");
    // Direct, without the daemon, the pull is refused: the token is needed
    // (containerd 2.x reports the mirror's challenge, 1.6 the server's).
    let refused = pull(stack.direct(), &image, None)
        .await
        .expect_err("a direct pull without the token");
    let message = refused.message().to_ascii_lowercase();
    assert!(
        ecr_pull_proxy::pull::REFUSAL_PHRASES
            .iter()
            .any(|p| message.contains(p)),
        "{refused:?}"
    );
    let before = mirror.requests().len();
    let served = stack.registry.manifest_requests(IMAGE_REPO).len();
    if let Err(e) = pull(proxy.channel(), &image, None).await {
        panic!(
            "the pull, from the server after the mirror: {e}\nthe mirror's requests: {:#?}\ncontainerd's log:\n{}",
            mirror.requests(),
            stack.containerd.log()
        );
    }
    assert!(mirror.requests().len() > before, "the mirror was not tried");
    assert_no_credential_reached(&mirror);
    assert!(
        stack.registry.manifest_requests(IMAGE_REPO)[served..].contains(&200),
        "the server should have served the manifest with the token"
    );

    // What `check` says of the same image: the one host the token goes to.
    let mut env = stack.moto.env();
    env.push(("AWS_EC2_METADATA_DISABLED", "true".into()));
    let config_file = stack.dir.path().join("check.toml");
    std::fs::write(
        &config_file,
        format!(
            "containerd_config = {:?}\n{config}",
            stack.containerd.config.display().to_string()
        ),
    )
    .unwrap();
    let (_, out) = run_with_env(
        &[
            "check",
            "--config",
            config_file.to_str().unwrap(),
            "--upstream",
            stack.containerd.socket.to_str().unwrap(),
            "--image",
            &image,
        ],
        &env,
        Duration::from_secs(60),
    );
    let want = format!("token goes to         http://{} only", stack.registry.addr);
    assert!(out.contains(&want), "check should say {want:?}:\n{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_challenging_mirror_gets_nothing_and_the_server_the_token_on_containerd_1_6() {
    a_challenging_mirror_gets_nothing_and_the_server_the_token(
        ContainerdVersion::One,
        ECR_HOST,
        "",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_challenging_mirror_gets_nothing_and_the_server_the_token_on_containerd_2() {
    a_challenging_mirror_gets_nothing_and_the_server_the_token(
        ContainerdVersion::Two,
        ECR_HOST,
        "",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_alias_hosts_challenging_mirror_gets_nothing_on_containerd_1_6() {
    a_challenging_mirror_gets_nothing_and_the_server_the_token(
        ContainerdVersion::One,
        ALIAS_HOST,
        ALIAS_CONFIG,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_alias_hosts_challenging_mirror_gets_nothing_on_containerd_2() {
    a_challenging_mirror_gets_nothing_and_the_server_the_token(
        ContainerdVersion::Two,
        ALIAS_HOST,
        ALIAS_CONFIG,
    )
    .await;
}

/// `hosts.toml` is read at every pull: a server moved while the daemon runs
/// gets the token at the next pull.
#[tokio::test(flavor = "multi_thread")]
async fn a_changed_hosts_toml_is_followed_without_a_restart() {
    let stack = Stack::start(&[ECR_HOST]);
    stack.registry.push_image(IMAGE_REPO, &["v1"]);
    let proxy = stack.proxy("p", "");
    let image = format!("{ECR_HOST}/{IMAGE_REPO}:v1");
    pull(proxy.channel(), &image, None)
        .await
        .expect("first pull");
    remove(proxy.channel(), &image).await;
    // The same registry, now behind a relay at another address: the server
    // containerd contacts has changed, and only it may get the token.
    let relay = Recorder::start(&stack.registry.addr);
    stack.containerd.write_hosts(
        ECR_HOST,
        &format!(
            "server = \"http://{}\"\n\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            relay.addr, relay.addr
        ),
    );
    pull(proxy.channel(), &image, None)
        .await
        .expect("the pull after hosts.toml moved the server");
    assert!(
        relay.authorizations() > 0,
        "the new server should have received the token: {:#?}",
        relay.requests()
    );
}
