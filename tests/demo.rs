//! The README's demo: a local containerd, a registry that accepts only ECR's
//! password, the ECR API emulator, and an ECR image pulled through the proxy
//! twice with no credentials. Prints each step; exits non-zero if any step
//! does not do what it says, or if its transcript in the README is not
//! what it printed (but for paths, ports, digests and durations).

mod support;

use ecr_pull_proxy::cri::{self, image_service_client::ImageServiceClient};
use std::sync::Mutex;
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

/// Everything the demo printed, line by line.
static PRINTED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Prints and records a line of the transcript.
macro_rules! say {
    ($($arg:tt)*) => {{
        let text = format!($($arg)*);
        println!("{text}");
        PRINTED.lock().unwrap().extend(text.split('\n').map(String::from));
    }};
}

fn step(text: &str) {
    say!("\n==> {text}");
}

/// A transcript line with what differs from run to run (the temporary
/// directory, ports, digests, durations) in the README's placeholders.
fn normalised(line: &str, tmp: &str) -> String {
    let line = line.replace(tmp, "/tmp/eppXXXX");
    let mut out = String::new();
    let mut rest = line.as_str();
    loop {
        let next = ["127.0.0.1:", "sha256:", "duration_ms="]
            .iter()
            .filter_map(|m| rest.find(m).map(|i| (i, *m)))
            .min();
        let Some((i, marker)) = next else {
            out.push_str(rest);
            break;
        };
        out.push_str(&rest[..i + marker.len()]);
        rest = &rest[i + marker.len()..];
        let (len, placeholder) = match marker {
            "127.0.0.1:" => (rest.find(|c: char| !c.is_ascii_digit()), "PORT"),
            "sha256:" => (rest.find(|c: char| !c.is_ascii_hexdigit()), "…"),
            _ => (rest.find(|c: char| !c.is_ascii_digit()), "N"),
        };
        let len = len.unwrap_or(rest.len());
        if len > 0 {
            out.push_str(placeholder);
            rest = &rest[len..];
            rest = rest.strip_prefix('…').unwrap_or(rest);
        }
    }
    out.trim_end().to_owned()
}

/// The README's transcript is this run's, line for line.
fn compare_with_readme(tmp: &str) {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let sample: Vec<String> = readme
        .split("```\necr-pull-proxy demo (")
        .nth(1)
        .and_then(|r| r.split("\n```").next())
        .map(|r| format!("ecr-pull-proxy demo ({r}"))
        .expect("README has the demo's transcript")
        .lines()
        .map(|l| normalised(l, tmp))
        .collect();
    let printed: Vec<String> = PRINTED
        .lock()
        .unwrap()
        .iter()
        .map(|l| normalised(l, tmp))
        .collect();
    assert_eq!(
        sample,
        printed,
        "README's demo transcript differs from this run's:\nREADME:\n{}\nthis run:\n{}",
        sample.join("\n"),
        printed.join("\n")
    );
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
        say!(
            "    proxy log: {}",
            line.split_once("  ").map_or(line, |(_, rest)| rest.trim())
        );
        *seen += 1;
    }
}

#[tokio::main]
async fn main() {
    let dir = support::short_tempdir();
    say!(
        "ecr-pull-proxy demo (everything runs on loopback under {})",
        dir.path().display()
    );

    step("starting the ECR API emulator (moto_server)");
    let moto = Moto::start(dir.path());
    say!(
        "    ECR API at http://{} — its tokens decode to AWS:{MOTO_PASSWORD}",
        moto.addr
    );

    step("starting a registry that accepts only user AWS with that password");
    let registry = Registry::start(dir.path(), "AWS", MOTO_PASSWORD);
    let digest = registry.push_image("demo/app", &["v1"]);
    say!(
        "    registry at {}; pushed demo/app:v1 ({digest})",
        registry.addr
    );

    step(&format!(
        "starting containerd; hosts.toml sends {HOST} to that registry"
    ));
    let containerd = Containerd::start(dir.path(), &[(HOST, registry.addr.as_str())]);
    say!("    containerd CRI socket: {}", containerd.socket.display());

    let image = format!("{HOST}/demo/app:v1");
    step(&format!(
        "pulling {image} straight from containerd, with no credentials"
    ));
    match pull(support::channel(&containerd.socket), &image).await {
        Ok(r) => panic!("direct pull should have been refused, got {r}"),
        Err(e) => say!("    refused, as expected: {}", e.message()),
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
    say!("    listening on {}", proxy.socket.display());
    let mut seen = 0;

    step("pull #1 through the proxy, still with no credentials");
    let image_ref = pull(proxy.channel(), &image)
        .await
        .expect("pull through the proxy");
    say!("    pulled: {image_ref}");
    pull_lines(&proxy, &mut seen);

    remove(support::channel(&containerd.socket), &image).await;
    step("pull #2 through the proxy (image removed first, so containerd fetches again)");
    let image_ref = pull(proxy.channel(), &image)
        .await
        .expect("second pull through the proxy");
    say!("    pulled: {image_ref}");
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
    // The README's transcript ends with this line too: compared before it
    // is printed, so that "passed" is never followed by a failure.
    let passed = "\ndemo passed: the token was fetched once and served from cache the second time.";
    PRINTED
        .lock()
        .unwrap()
        .extend(passed.split('\n').map(String::from));
    compare_with_readme(&dir.path().display().to_string());
    println!("{passed}");
}
