//! A caller that is not built on the h2 crate: gRPC C-core (PyPI `grpcio`),
//! with its own HPACK encoder (dynamic table, Huffman), flow control and
//! pings, against real containerd, registry and moto. kubelet's grpc-go
//! cannot be installed here; C-core is the other gRPC implementation that
//! can.

mod support;

use std::collections::HashMap;
use std::process::Command;

use support::stack::*;

const CLIENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/grpc_client.py");

/// Runs the C-core client against `socket`: call name → (code, digest).
fn run_client(
    socket: &std::path::Path,
    image: &str,
) -> (HashMap<String, (String, String)>, String) {
    let python = support::require(
        "python3",
        "python3 (Debian) with grpcio (`.ci/install` adds it to target/test-tools/venv)",
    );
    let out = Command::new(python)
        .arg(CLIENT)
        .arg(socket)
        .arg(image)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "grpc_client.py failed (is grpcio installed? `.ci/install` adds it): {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut calls = HashMap::new();
    let mut concurrent = String::new();
    for line in stdout.lines() {
        let mut parts = line.splitn(3, ' ');
        let (name, code, rest) = (
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
        );
        if name == "concurrent" {
            concurrent = format!("{code} {rest}");
        } else {
            calls.insert(name.to_owned(), (code.to_owned(), rest.to_owned()));
        }
    }
    (calls, concurrent)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grpc_c_core_caller_gets_what_it_gets_direct_and_its_pulls_get_a_token() {
    let s = Stack::start(&[ECR_HOST]);
    s.registry.push_image("app", &["v1"]);
    let image = format!("{ECR_HOST}/app:v1");
    let proxy = s.proxy("p", "");

    let (direct, _) = run_client(&s.containerd.socket, &image);
    // Direct, containerd has no credentials for the registry.
    assert_eq!(direct["PullImage"].0, "UNKNOWN", "{direct:?}");
    assert!(direct["PullImage"].1.contains("401"), "{direct:?}");

    let (through, concurrent) = run_client(&proxy.socket, &image);
    for name in [
        "ListImages",
        "ImageStatus",
        "ImageStatus-missing",
        "Unknown",
    ] {
        assert_eq!(
            through[name], direct[name],
            "{name}: {through:?} vs {direct:?}"
        );
    }
    assert_eq!(through["Unknown"].0, "UNIMPLEMENTED");
    assert_eq!(through["PullImage"].0, "OK", "{through:?}");
    assert_eq!(through["ImageStatus-after-pull"].0, "OK", "{through:?}");
    assert_ne!(
        through["ImageStatus-after-pull"], direct["ImageStatus"],
        "the image is there after the pull"
    );
    assert_eq!(concurrent, "620 0", "calls that failed: {concurrent}");

    let logs = proxy.logs();
    assert!(!logs.contains("closed a client connection"), "{logs}");
    assert!(!logs.contains("protocol error"), "{logs}");
    assert!(logs.contains("credentials=\"injected\""), "{logs}");
    assert_no_secrets(&logs);
}
