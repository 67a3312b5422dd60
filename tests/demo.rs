//! The README's demo: a local containerd, a registry that accepts only ECR's
//! password, the ECR API emulator, and an ECR image pulled through the proxy
//! twice with no credentials. Prints each step; exits non-zero if any step
//! does not do what it says.

mod support;

use ecr_pull_proxy::cri::{self, image_service_client::ImageServiceClient};
use support::real::{Containerd, Moto, Registry, MOTO_PASSWORD};
use support::{ProxyOptions, ProxyProcess};
use tonic::transport::Channel;

const HOST: &str = "123456789012.dkr.ecr.us-east-1.amazonaws.com";

async fn pull(channel: Channel, image: &str) -> Result<String, tonic::Status> {
    let req = cri::PullImageRequest {
        image: Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    ImageServiceClient::new(channel)
        .pull_image(req)
        .await
        .map(|r| r.into_inner().image_ref)
}

async fn remove(channel: Channel, image: &str) {
    let spec = cri::ImageSpec {
        image: image.into(),
        ..Default::default()
    };
    ImageServiceClient::new(channel)
        .remove_image(cri::RemoveImageRequest { image: Some(spec) })
        .await
        .unwrap();
}

fn step(text: &str) {
    println!("\n==> {text}");
}

fn pull_lines(proxy: &ProxyProcess, seen: &mut usize) {
    let logs = proxy.logs();
    for line in logs
        .lines()
        .filter(|l| {
            l.contains(" pull ") || l.contains("fetched ECR token") || l.contains("arrived expired")
        })
        .skip(*seen)
    {
        println!(
            "    proxy log: {}",
            line.split_once("  ").map_or(line, |(_, rest)| rest.trim())
        );
        *seen += 1;
    }
}

#[tokio::main]
async fn main() {
    let dir = support::short_tempdir();
    println!(
        "ecr-pull-proxy demo (everything runs on loopback under {})",
        dir.path().display()
    );

    step("starting the ECR API emulator (moto_server)");
    let moto = Moto::start(dir.path());
    println!(
        "    ECR API at http://{} — its tokens decode to AWS:{MOTO_PASSWORD}",
        moto.addr
    );

    step("starting a registry that accepts only user AWS with that password");
    let registry = Registry::start(dir.path(), "AWS", MOTO_PASSWORD);
    let digest = registry.push_image("demo/app", &["v1"]);
    println!(
        "    registry at {}; pushed demo/app:v1 ({digest})",
        registry.addr
    );

    step(&format!(
        "starting containerd; hosts.toml sends {HOST} to that registry"
    ));
    let containerd = Containerd::start(dir.path(), &[(HOST, registry.addr.as_str())]);
    println!("    containerd CRI socket: {}", containerd.socket.display());

    let image = format!("{HOST}/demo/app:v1");
    step(&format!(
        "pulling {image} straight from containerd, with no credentials"
    ));
    match pull(support::channel(&containerd.socket), &image).await {
        Ok(r) => panic!("direct pull should have been refused, got {r}"),
        Err(e) => println!("    refused, as expected: {}", e.message()),
    }

    step("starting ecr-pull-proxy in front of containerd");
    let proxy = ProxyProcess::start(
        dir.path(),
        &containerd.socket,
        ProxyOptions {
            env: moto.env(),
            args: vec!["--log-level", "info"],
            ..Default::default()
        },
    );
    println!("    listening on {}", proxy.socket.display());
    let mut seen = 0;

    step("pull #1 through the proxy, still with no credentials");
    let image_ref = pull(proxy.channel(), &image)
        .await
        .expect("pull through the proxy");
    println!("    pulled: {image_ref}");
    pull_lines(&proxy, &mut seen);

    remove(support::channel(&containerd.socket), &image).await;
    step("pull #2 through the proxy (image removed first, so containerd fetches again)");
    let image_ref = pull(proxy.channel(), &image)
        .await
        .expect("second pull through the proxy");
    println!("    pulled: {image_ref}");
    pull_lines(&proxy, &mut seen);

    let calls = moto.calls("GetAuthorizationToken", "us-east-1");
    step(&format!("ECR GetAuthorizationToken calls made: {calls}"));
    assert_eq!(
        calls, 1,
        "the second pull must be served from the token cache"
    );
    let logs = proxy.logs();
    assert!(
        logs.contains("cache=\"miss\"") && logs.contains("cache=\"hit\""),
        "{logs}"
    );
    println!("\ndemo passed: the token was fetched once and served from cache the second time.");
}
