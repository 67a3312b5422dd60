//! Micro-benchmarks for the code on every PullImage: reading the request,
//! rewriting its auth field, and matching the image against the patterns.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use ecr_pull_proxy::config::{Cli, Config};
use ecr_pull_proxy::cri;
use ecr_pull_proxy::ecr::{CredentialSource, SourceError, Token, TokenCache, TokenKey};
use ecr_pull_proxy::pull::credentials::Resolver;
use ecr_pull_proxy::pull::{self, Credentials};
use futures_util::future::BoxFuture;
use prost::Message;

/// A kubelet-sized request: image, sandbox config with labels and
/// annotations.
fn kubelet_request() -> Vec<u8> {
    let labels = (0..8)
        .map(|i| (format!("label-{i}"), format!("value-{i}")))
        .collect();
    let annotations = (0..8)
        .map(|i| (format!("kubernetes.io/annotation-{i}"), "x".repeat(64)))
        .collect();
    cri::PullImageRequest {
        image: Some(cri::ImageSpec {
            image: "123456789012.dkr.ecr.us-east-1.amazonaws.com/team/app:v1.2.3".into(),
            ..Default::default()
        }),
        auth: None,
        sandbox_config: Some(cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: "app-7d9f8b6c5-x2x9k".into(),
                uid: "2f1c".into(),
                namespace: "prod".into(),
                attempt: 0,
            }),
            hostname: "app-7d9f8b6c5-x2x9k".into(),
            log_directory: "/var/log/pods/prod_app".into(),
            labels,
            annotations,
        }),
    }
    .encode_to_vec()
}

struct Never;
impl CredentialSource for Never {
    fn fetch(&self, _: &TokenKey) -> BoxFuture<'static, Result<Token, SourceError>> {
        Box::pin(std::future::pending())
    }
}

fn bench(c: &mut Criterion) {
    let msg = kubelet_request();
    let framed = pull::frame(&msg);
    let creds = Credentials {
        username: "AWS".into(),
        password: "x".repeat(2000),
    };
    c.bench_function("pull: unframe + read", |b| {
        b.iter(|| pull::read(pull::unframe(std::hint::black_box(&framed)).unwrap()).unwrap())
    });
    c.bench_function("pull: rewrite + frame", |b| {
        b.iter(|| {
            pull::frame(
                &pull::with_credentials(std::hint::black_box(&msg), &creds, "https://r.example")
                    .unwrap(),
            )
        })
    });

    let cli = Cli::try_parse_args(["x"]).unwrap();
    let config = Config::from_toml("", &cli).unwrap();
    let resolver = Resolver::new(
        config.credentials,
        config.sandbox.containerd_config,
        TokenCache::new(Arc::new(Never), None, Arc::default()),
    );
    c.bench_function("match: ECR image (default patterns)", |b| {
        b.iter(|| {
            resolver
                .target(std::hint::black_box(
                    "123456789012.dkr.ecr.us-east-1.amazonaws.com/team/app:v1.2.3",
                ))
                .unwrap()
        })
    });
    c.bench_function("match: docker.io image (no match)", |b| {
        b.iter(|| resolver.target(std::hint::black_box("docker.io/library/nginx:1.27")))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
