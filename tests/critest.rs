//! critest (cri-tools' conformance suite, v1.36.0) gives the same results
//! through the proxy as direct, for its Image Manager and Runtime info
//! suites, on containerd 1.6 and 2.x. critest opens a new CRI client for
//! every spec and never closes the old ones: before idle connections gave
//! way at the limit, three specs failed through the proxy with "error
//! reading server preface" after 5 s.
//!
//! This machine reaches no public registry, so the specs that pull
//! critest's images fail, direct and through the proxy alike; what is
//! compared is each spec's outcome and why, spec by spec.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use support::real::ContainerdVersion;
use support::stack::*;

/// critest v1.36.0, as `.ci/install` builds it (tests/support/critest).
const CRITEST: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/target/test-tools/critest-v1.36.0/critest"
);

/// The suites compared.
const FOCUS: &str = r"\[k8s.io\] (Image Manager|Runtime info)";
/// Left out: "public image should timeout if requested" pulls with a 1 ms
/// deadline and expects `DeadlineExceeded`. With no registry reachable,
/// containerd's DNS failure comes back within that millisecond about as
/// often as the deadline fires (the proxy forwards `grpc-timeout` as sent,
/// so the hop only moves the odds): its outcome is scheduling, not CRI.
/// A caller's deadline reaching the upstream as `grpc-timeout` is covered
/// by tests/forwarding.rs.
const SKIP: &str = "should timeout if requested";

/// Each spec's outcome: its full name → its state, and for a failure the
/// first line of its message with addresses and times taken out.
fn run_critest(endpoint: &Path, report: &Path) -> BTreeMap<String, String> {
    assert!(
        Path::new(CRITEST).is_file(),
        "critest not found at {CRITEST}: run .ci/install (it builds cri-tools v1.36.0's critest from the Go module proxy)"
    );
    let endpoint = format!("unix://{}", endpoint.display());
    let out = Command::new(CRITEST)
        .args(["-runtime-endpoint", &endpoint, "-image-endpoint", &endpoint])
        .arg(format!("--ginkgo.focus={FOCUS}"))
        .arg(format!("--ginkgo.skip={SKIP}"))
        // Each failing spec three times (its clients opened anew each
        // time, the old ones kept): the proxy sees more connections than
        // MAX_CONNECTIONS, as a longer critest run would.
        .arg("--ginkgo.flake-attempts=3")
        .arg("--ginkgo.no-color")
        .arg(format!("--ginkgo.json-report={}", report.display()))
        .output()
        .unwrap();
    let text = std::fs::read_to_string(report).unwrap_or_else(|e| {
        panic!(
            "critest wrote no report ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let suites: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut specs = BTreeMap::new();
    for suite in suites.as_array().unwrap() {
        for spec in suite["SpecReports"].as_array().into_iter().flatten() {
            let state = spec["State"].as_str().unwrap_or("?");
            if state == "skipped" {
                continue;
            }
            let texts: Vec<&str> = spec["ContainerHierarchyTexts"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t.as_str())
                .chain(spec["LeafNodeText"].as_str())
                .collect();
            if texts.is_empty() {
                continue;
            }
            let why = spec["Failure"]["Message"]
                .as_str()
                .and_then(|m| m.lines().next())
                .map(normalise)
                .unwrap_or_default();
            specs.insert(texts.join(" "), format!("{state} {why}").trim().to_owned());
        }
    }
    specs
}

/// A failure line without what differs from run to run (socket paths,
/// numbers, times).
fn normalise(line: &str) -> String {
    line.split_whitespace()
        .map(|w| {
            if w.contains('/') && (w.contains(".sock") || w.starts_with("/tmp")) {
                "SOCKET"
            } else if w.chars().any(|c| c.is_ascii_digit()) {
                "N"
            } else {
                w
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn same_results_through_the_proxy(version: ContainerdVersion) {
    let stack = Stack::on(version, &[ECR_HOST]);
    let proxy = stack.proxy("p", "");
    let direct = run_critest(
        &stack.containerd.socket,
        &stack.dir.path().join("direct.json"),
    );
    let proxied = run_critest(&proxy.socket, &stack.dir.path().join("proxied.json"));
    assert!(
        direct.len() >= 10,
        "too few specs ran to compare: {direct:#?}"
    );
    assert!(
        direct.values().any(|s| s.starts_with("passed")),
        "no spec passed direct: {direct:#?}"
    );
    // Not vacuous: critest held more connections than the limit allows.
    let connections = proxy.logs().matches("new client connection").count();
    assert!(
        connections > ecr_pull_proxy::transport::server::MAX_CONNECTIONS,
        "critest opened only {connections} connections through the proxy"
    );
    assert_eq!(
        proxied, direct,
        "critest through the proxy (left) and direct (right)"
    );
    assert!(
        !proxied.values().any(|s| s.contains("server preface")),
        "{proxied:#?}"
    );
}

#[test]
fn critest_image_and_runtime_info_suites_match_direct_on_containerd_1_6() {
    same_results_through_the_proxy(ContainerdVersion::One);
}

#[test]
fn critest_image_and_runtime_info_suites_match_direct_on_containerd_2() {
    same_results_through_the_proxy(ContainerdVersion::Two);
}
