//! The operator's kit that ships with the package (systemd/monitoring/):
//! the alert rules parse and pass their unit tests under Prometheus's own
//! `promtool`, each alert has a case that fires it and one that must not,
//! every metric the rules and the dashboard query is one a running daemon
//! serves, so a renamed metric breaks the build, not the pager, and after
//! real failures the served series carry the label values the rules select
//! on.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use support::stack::{pull, Stack, ECR_HOST};

const RULES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/monitoring/alerts.yml");
const RULE_TESTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/monitoring/alerts_test.yml"
);
const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/systemd/monitoring/dashboard.json"
);

fn promtool() -> PathBuf {
    support::require("promtool", "the Debian package prometheus")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn rules() -> Vec<serde_yaml::Value> {
    let doc: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(RULES).unwrap()).unwrap();
    doc["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap().clone())
        .collect()
}

#[test]
fn the_rules_parse_under_promtool() {
    let out = run(Command::new(promtool()).args(["check", "rules", RULES]));
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn the_rules_pass_their_unit_tests_under_promtool() {
    let dir = Path::new(RULE_TESTS).parent().unwrap();
    let out = run(Command::new(promtool())
        .args(["test", "rules", "alerts_test.yml"])
        .current_dir(dir));
    assert!(out.contains("SUCCESS"), "{out}");
}

/// Each alert: a severity, a `for:` that waits out blips, a summary, a
/// description that says what to run next; and unit tests in which it
/// fires once and stays quiet once.
#[test]
fn every_alert_is_complete_and_tested_both_ways() {
    let tests: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(RULE_TESTS).unwrap()).unwrap();
    let cases: Vec<&serde_yaml::Value> = tests["tests"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_sequence().unwrap())
        .collect();
    let alerts = rules();
    assert!(alerts.len() >= 6, "{alerts:?}");
    for rule in &alerts {
        let name = rule["alert"].as_str().expect("an alerting rule");
        let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
        assert!(
            ["critical", "warning"].contains(&severity),
            "{name}: severity {severity:?}"
        );
        let wait = rule["for"].as_str().unwrap_or_default();
        assert!(
            wait.ends_with('m') && wait.trim_end_matches('m').parse::<u32>().unwrap_or(0) >= 5,
            "{name}: `for: {wait}` does not wait out a blip"
        );
        assert!(rule["annotations"]["summary"].as_str().is_some(), "{name}");
        let description = rule["annotations"]["description"]
            .as_str()
            .unwrap_or_default();
        assert!(
            [
                "`ecr-pull-proxy check",
                "`journalctl -u ecr-pull-proxy",
                "`systemctl status"
            ]
            .iter()
            .any(|c| description.contains(c)),
            "{name}: the description says what to run next: {description}"
        );
        let of_this: Vec<_> = cases
            .iter()
            .filter(|c| c["alertname"].as_str() == Some(name))
            .collect();
        assert!(
            of_this
                .iter()
                .any(|c| !c["exp_alerts"].as_sequence().unwrap().is_empty()),
            "{name}: no case where it fires"
        );
        assert!(
            of_this
                .iter()
                .any(|c| c["exp_alerts"].as_sequence().unwrap().is_empty()),
            "{name}: no case where it must not fire"
        );
    }
}

#[test]
fn the_aws_alerts_match_every_code_the_daemon_reports() {
    let alerts = rules();
    let expr = |name: &str| {
        alerts
            .iter()
            .find(|r| r["alert"].as_str() == Some(name))
            .and_then(|r| r["expr"].as_str())
            .unwrap_or_else(|| panic!("no alert {name}"))
            .to_owned()
    };
    let throttled = expr("EcrPullProxyAwsThrottled");
    for code in ecr_pull_proxy::ecr::aws::THROTTLING_CODES
        .iter()
        .chain(&["HTTP 429"])
    {
        assert!(throttled.contains(code), "{code} missing from {throttled}");
    }
    let denied = expr("EcrPullProxyAwsDenied");
    for code in ecr_pull_proxy::ecr::aws::ACCESS_DENIED_CODES
        .iter()
        .chain(&["NoCredentials", "CredentialsError"])
    {
        assert!(denied.contains(code), "{code} missing from {denied}");
    }
    // aws_calls_total's code label is bounded: every code a rule selects
    // on must pass through as it is, or the rule could never fire.
    for e in [&throttled, &denied] {
        let selected = e
            .split_once("code=~\"")
            .and_then(|(_, rest)| rest.split_once('"'))
            .map(|(codes, _)| codes)
            .unwrap_or_else(|| panic!("no code selector in {e}"));
        for code in selected.split('|') {
            assert_eq!(
                ecr_pull_proxy::ops::metrics::aws_code_label(code),
                code,
                "the code label turns {code} into something the rule misses"
            );
        }
    }
}

/// Every `ecr_pull_proxy_*` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("ecr_pull_proxy_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// The series names a running daemon serves once it has done its work (a
/// pull through it with an ECR token, and its pause image pulled from ECR:
/// families without a sample are not exported), from its `# TYPE` lines.
async fn served_names() -> BTreeSet<String> {
    let s = Stack::with_sandbox_image(&[ECR_HOST], &format!("{ECR_HOST}/eks/pause:3.9"));
    s.registry.push_image("app", &["v1"]);
    s.registry.push_image("eks/pause", &["3.9"]);
    let metrics = s.dir.path().join("m.sock");
    let proxy = s.proxy(
        "p",
        &format!(
            "sandbox_image = \"auto\"\nmetrics_listen = \"unix:{}\"",
            metrics.display()
        ),
    );
    pull(proxy.channel(), &format!("{ECR_HOST}/app:v1"), None)
        .await
        .expect("a pull with the ECR token");
    let scrape = || support::get_unix(&metrics, "/metrics");
    // The pause image is pulled beside the socket, soon after start.
    support::wait_until(
        std::time::Duration::from_secs(20),
        "the pause image pull",
        || {
            support::metrics::samples(&scrape())
                .iter()
                .any(|s| s.name == "ecr_pull_proxy_sandbox_pulls_total")
        },
    );
    let out = scrape();
    let mut names = BTreeSet::new();
    for line in out.lines() {
        let Some(decl) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut f = decl.split(' ');
        let (name, kind) = (f.next().unwrap(), f.next().unwrap_or_default());
        match kind {
            "counter" => {
                names.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
            "info" => {
                names.insert(format!("{name}_info"));
            }
            _ => {
                names.insert(name.to_owned());
            }
        }
    }
    // Every family the daemon declares is there after that work.
    for family in ecr_pull_proxy::ops::metrics::FAMILIES {
        assert!(
            names.iter().any(|n| n.starts_with(family)),
            "{family} not served after a pull:\n{out}"
        );
    }
    names
}

// Multi-threaded: the blocking scrape must not starve the scripted
// upstream, which runs on the test's runtime.
#[tokio::test(flavor = "multi_thread")]
async fn every_metric_the_rules_and_the_dashboard_query_is_served() {
    let served = served_names().await;
    let rules_text = std::fs::read_to_string(RULES).unwrap();
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            queries.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(q) = var["query"].as_str() {
            queries.push(q.to_owned());
        }
    }
    assert!(queries.len() >= 8, "{queries:?}");
    let used_by_rules = metric_names(&rules_text);
    let used_by_dashboard = metric_names(&queries.join("\n"));
    assert!(used_by_rules.len() >= 4 && used_by_dashboard.len() >= 8);
    for name in used_by_rules.iter().chain(&used_by_dashboard) {
        assert!(
            served.contains(name),
            "{name} is queried but the daemon serves only {served:?}"
        );
    }
}

#[test]
fn metric_names_are_found_in_queries() {
    assert_eq!(
        metric_names(
            "sum(rate(ecr_pull_proxy_calls_total{a=\"b\"}[5m])) / ecr_pull_proxy_upstream_up"
        ),
        ["ecr_pull_proxy_calls_total", "ecr_pull_proxy_upstream_up"]
            .map(String::from)
            .into_iter()
            .collect()
    );
}

/// A selector's matchers: label, operator, value.
type Matchers = Vec<(String, String, String)>;

/// Every `ecr_pull_proxy_*{…}` selector in `expr`, with its matchers.
fn selectors(expr: &str) -> Vec<(String, Matchers)> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("ecr_pull_proxy_") {
        rest = &rest[at..];
        let name_len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let name = rest[..name_len].to_owned();
        rest = &rest[name_len..];
        let Some(body) = rest.strip_prefix('{') else {
            continue;
        };
        let mut matchers = Vec::new();
        let mut b = body;
        loop {
            b = b.trim_start_matches([',', ' ']);
            if let Some(after) = b.strip_prefix('}') {
                rest = after;
                break;
            }
            let label_len = b
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap();
            let label = b[..label_len].to_owned();
            b = &b[label_len..];
            let op = ["=~", "!~", "!=", "="]
                .into_iter()
                .find(|op| b.starts_with(op))
                .unwrap_or_else(|| panic!("no operator after {label} in {expr}"));
            b = b[op.len()..].strip_prefix('"').unwrap();
            let end = b.find('"').unwrap();
            matchers.push((label, op.to_owned(), b[..end].to_owned()));
            b = &b[end + 1..];
        }
        out.push((name, matchers));
    }
    out
}

/// The samples of a scrape: name and labels.
fn series(scraped: &str) -> Vec<(String, std::collections::BTreeMap<String, String>)> {
    support::metrics::samples(scraped)
        .into_iter()
        .map(|s| (s.name, s.labels))
        .collect()
}

/// The one metrics parser the tests share matches whole names and label
/// values: `x_total 1` is not `x_total 10`, nor `x` a prefix of `x_more`.
#[test]
fn the_tests_metrics_parser_matches_whole_names_and_label_values() {
    use support::metrics::{samples, value};
    let scraped = "HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\n\
        # HELP x calls.\n\
        # TYPE x counter\n\
        x_total 10\n\
        x_total_more 3\n\
        y_total{method=\"PullImage\",code=\"OK\"} 2\n\
        y_total{method=\"PullImage\",code=\"Unknown\"} 1\n\
        g -1.5\n";
    assert_eq!(value(scraped, "x_total", &[]), Some(10.0));
    assert_eq!(value(scraped, "x_tot", &[]), None);
    assert_eq!(value(scraped, "y_total", &[("code", "Unknown")]), Some(1.0));
    assert_eq!(
        value(scraped, "y_total", &[("method", "PullImage")]),
        Some(2.0)
    );
    assert_eq!(value(scraped, "y_total", &[("code", "Unk")]), None);
    assert_eq!(value(scraped, "g", &[]), Some(-1.5));
    assert_eq!(samples(scraped).len(), 5);
}

/// Whether `value` passes one matcher (the rules' regexes are
/// alternations of literals: checked below).
fn passes(value: &str, op: &str, want: &str) -> bool {
    let alternatives = || want.split('|').any(|alt| alt == value);
    match op {
        "=" => value == want,
        "!=" => value != want,
        "=~" => alternatives(),
        "!~" => !alternatives(),
        _ => unreachable!(),
    }
}

/// After real failures (a pull refused with the injected token, one
/// refused with the caller's own credentials and then the token, one that
/// got no token because the node has no AWS identity, calls while
/// containerd is down), the series the daemon really serves carry the
/// exact label values the alert rules select on: every selector of a rule
/// about pulls, calls or AWS failures matches a scraped series, and every
/// alternative of a `credentials=~` matcher is seen. (Throttling and
/// denial codes that moto cannot produce are checked against the code
/// lists above.)
#[tokio::test(flavor = "multi_thread")]
async fn scraped_series_after_real_failures_carry_the_labels_the_rules_select_on() {
    use ecr_pull_proxy::cri;
    use support::stack::{assert_refused, client, CALLER_PASSWORD};
    // The registry wants another password than moto's token: every pull
    // is refused by the registry itself.
    let mut s = Stack::with_password(&[ECR_HOST], "registry-wants-another-password");
    s.registry.push_image("app", &["v1"]);
    let image = format!("{ECR_HOST}/app:v1");
    let metrics = s.dir.path().join("m.sock");
    let proxy = s.proxy(
        "p",
        &format!("metrics_listen = \"unix:{}\"", metrics.display()),
    );
    assert_refused(pull(proxy.channel(), &image, None).await);
    let auth = cri::AuthConfig {
        username: "AWS".into(),
        password: CALLER_PASSWORD.into(),
        server_address: ECR_HOST.into(),
        ..Default::default()
    };
    assert_refused(pull(proxy.channel(), &image, Some(auth)).await);

    // A node with no AWS identity at all: no token.
    let bare_metrics = s.dir.path().join("bare.sock");
    let bare = s.proxy_with_env(
        "bare",
        &format!(
            "metrics_listen = \"unix:{}\"\ntoken_wait = \"0s\"",
            bare_metrics.display()
        ),
        vec![("AWS_ENDPOINT_URL", format!("http://{}", s.moto.addr))],
    );
    let err = pull(bare.channel(), &image, None).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");

    // containerd down under the first proxy.
    s.containerd.kill();
    let err = client(proxy.channel())
        .image_fs_info(cri::ImageFsInfoRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    support::wait_until(
        std::time::Duration::from_secs(10),
        "upstream_up to say containerd is down",
        || support::metrics::read(&metrics, "ecr_pull_proxy_upstream_up", &[]) == 0.0,
    );

    let mut served = series(&support::get_unix(&metrics, "/metrics"));
    served.extend(series(&support::get_unix(&bare_metrics, "/metrics")));
    let mut checked = 0;
    for rule in rules() {
        let (alert, expr) = (
            rule["alert"].as_str().unwrap(),
            rule["expr"].as_str().unwrap(),
        );
        for (name, matchers) in selectors(expr) {
            let produced_here = matches!(
                name.as_str(),
                "ecr_pull_proxy_pulls_total" | "ecr_pull_proxy_calls_total"
            ) || matchers
                .iter()
                .any(|(l, op, v)| l == "code" && op == "!=" && v == "ok")
                || alert == "EcrPullProxyAwsDenied";
            if !produced_here {
                continue;
            }
            for (_, op, v) in &matchers {
                if op.ends_with('~') {
                    assert!(
                        v.chars()
                            .all(|c| c.is_ascii_alphanumeric() || " _|-".contains(c)),
                        "{alert}: {v} is more than an alternation of literals"
                    );
                }
            }
            let matching: Vec<_> = served
                .iter()
                .filter(|(n, labels)| {
                    *n == name
                        && matchers.iter().all(|(l, op, v)| {
                            passes(labels.get(l).map_or("", String::as_str), op, v)
                        })
                })
                .collect();
            assert!(
                !matching.is_empty(),
                "{alert}: no served series matches {name}{matchers:?}; served: {served:?}"
            );
            // Each alternative a rule names for `credentials` is a value the
            // daemon really writes.
            for (l, op, v) in &matchers {
                if l == "credentials" && op == "=~" {
                    for alt in v.split('|') {
                        assert!(
                            matching.iter().any(|(_, labels)| labels[l] == alt),
                            "{alert}: no failed pull was labelled credentials=\"{alt}\": {matching:?}"
                        );
                    }
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 4, "only {checked} selectors checked");
    drop(bare);
}
