//! Prometheus/OpenMetrics families, and the small HTTP server that serves
//! them with `/healthz` and `/readyz`.
//!
//! Labels are low-cardinality by construction: CRI method names (anything
//! else is `other`), gRPC codes, the token key a pull's configured rule
//! decided (partition, a region its partition has, endpoint variant, a
//! configured role; anything else is `other`), credential sources, AWS API
//! names and error codes. Never an image name or host, never a secret.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// Prefix of every family.
pub const PREFIX: &str = "ecr_pull_proxy";

/// Every family, as exported (counters gain `_total` on the wire). The
/// README's metrics reference lists exactly these.
pub const FAMILIES: &[&str] = &[
    "ecr_pull_proxy_calls_total",
    "ecr_pull_proxy_call_duration_seconds",
    "ecr_pull_proxy_pulls_total",
    "ecr_pull_proxy_token_cache_hits_total",
    "ecr_pull_proxy_token_cache_misses_total",
    "ecr_pull_proxy_token_cache_refreshes_total",
    "ecr_pull_proxy_aws_calls_total",
    "ecr_pull_proxy_aws_call_duration_seconds",
    "ecr_pull_proxy_token_expiry_seconds",
    "ecr_pull_proxy_upstream_up",
    "ecr_pull_proxy_connections_total",
    "ecr_pull_proxy_connections_open",
    "ecr_pull_proxy_sandbox_image_present",
    "ecr_pull_proxy_sandbox_pulls_total",
    "ecr_pull_proxy_build_info",
];

/// Methods reported by name; anything else is `other`.
const KNOWN_METHODS: &[&str] = &[
    "/runtime.v1.ImageService/ListImages",
    "/runtime.v1.ImageService/StreamImages",
    "/runtime.v1.ImageService/ImageStatus",
    "/runtime.v1.ImageService/PullImage",
    "/runtime.v1.ImageService/RemoveImage",
    "/runtime.v1.ImageService/ImageFsInfo",
];

/// `method` (a known CRI method, `RuntimeService`, or `other`).
pub fn method_label(path: &str) -> &'static str {
    if let Some(m) = KNOWN_METHODS.iter().find(|m| **m == path) {
        return m.rsplit('/').next().unwrap_or("other");
    }
    if path.starts_with("/runtime.v1.RuntimeService/") {
        "RuntimeService"
    } else {
        "other"
    }
}

/// gRPC status code names, as the `code` label shows them.
pub fn code_label(status: Option<&str>) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "Cancelled",
        "Unknown",
        "InvalidArgument",
        "DeadlineExceeded",
        "NotFound",
        "AlreadyExists",
        "PermissionDenied",
        "ResourceExhausted",
        "FailedPrecondition",
        "Aborted",
        "OutOfRange",
        "Unimplemented",
        "Internal",
        "Unavailable",
        "DataLoss",
        "Unauthenticated",
    ];
    match status.and_then(|s| s.parse::<usize>().ok()) {
        Some(n) if n < NAMES.len() => NAMES[n],
        Some(_) => "invalid",
        None => "none",
    }
}

/// Labels of `calls_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// CRI method.
    pub method: &'static str,
    /// Final gRPC code, `cancelled` when the caller left first.
    pub code: &'static str,
}

/// Labels of `call_duration_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    /// CRI method.
    pub method: &'static str,
}

/// Labels of `pulls_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PullLabels {
    /// The token key the configuration decided for the pull
    /// (`aws/us-east-1/standard`, `ecr-public/aws/us-east-1/standard`, with
    /// ` as ROLE_ARN` for a `[[registries]]` role), or `other`: bounded by
    /// the configuration and the known regions, never by what a caller
    /// sends.
    pub registry: String,
    /// `ok`, `error` or `cancelled`.
    pub result: &'static str,
    /// `injected`, `caller`, `fallback`, `none` or `no-token`.
    pub credentials: &'static str,
}

/// Labels of `aws_calls_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AwsLabels {
    /// `ecr:GetAuthorizationToken`, `ecr-public:GetAuthorizationToken`, or
    /// `sts:AssumeRole` (a registry entry's `role_arn`).
    pub api: &'static str,
    /// `ok`, or the AWS error code (`ThrottlingException`, `HTTP 429`,
    /// `Timeout`, ...): a known code, an `HTTP NNN`, or `other`
    /// ([`aws_code_label`]), so an endpoint cannot grow the label set.
    pub code: String,
}

/// The AWS result codes `aws_calls_total` names as they are, besides the
/// throttling and refusal codes the daemon classifies (and the alert rules
/// select on: [`crate::ecr::aws::THROTTLING_CODES`],
/// [`crate::ecr::aws::ACCESS_DENIED_CODES`]): `ok`, other errors ECR, ECR
/// Public and STS document for these calls, and the daemon's own kinds for
/// errors without a code. Anything else is `other`.
pub const AWS_CODES: &[&str] = &[
    "ok",
    "NoCredentials",
    "CredentialsError",
    "InvalidParameterException",
    "ServerException",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "InternalFailure",
    "RegionDisabledException",
    "MalformedPolicyDocument",
    "PackedPolicyTooLarge",
    "IDPCommunicationError",
    // The daemon's kinds (`ErrorKind`) for errors without a code.
    "AccessDenied",
    "Network",
    "Timeout",
    "Throttled",
    "BadToken",
    "Other",
];

/// The `code` label for an AWS result code: itself when it is one of
/// [`AWS_CODES`], a throttling or refusal code, or `HTTP` and three
/// digits; else `other`.
pub fn aws_code_label(code: &str) -> String {
    use crate::ecr::aws::{ACCESS_DENIED_CODES, THROTTLING_CODES};
    let http_status = code
        .strip_prefix("HTTP ")
        .is_some_and(|s| s.len() == 3 && s.bytes().all(|b| b.is_ascii_digit()));
    let known = [AWS_CODES, THROTTLING_CODES, ACCESS_DENIED_CODES]
        .iter()
        .any(|codes| codes.contains(&code));
    if http_status || known {
        code.to_owned()
    } else {
        "other".to_owned()
    }
}

/// Labels of `sandbox_pulls_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SandboxLabels {
    /// `ok` or `error`.
    pub result: &'static str,
}

/// Labels of `aws_call_duration_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    /// As in [`AwsLabels`].
    pub api: &'static str,
}

/// Labels of `token_expiry_seconds`: a token cache key.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    /// `ecr` or `ecr-public`.
    pub service: &'static str,
    /// AWS partition.
    pub partition: &'static str,
    /// AWS region.
    pub region: String,
    /// Endpoint variant (`standard`, `fips`, ...).
    pub variant: String,
    /// Assumed role ARN, or empty.
    pub role: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 100 µs … ~52 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 20))
}

/// Every family the daemon exports. Cheap to clone (all handles share).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Calls by method and gRPC code.
    pub calls: Family<CallLabels, Counter>,
    /// Call latency by method, as the proxy saw it (upstream time included).
    pub call_duration: HistogramFamily<MethodLabels>,
    /// Pulls by registry host, result and credential source.
    pub pulls: Family<PullLabels, Counter>,
    /// Token lookups answered from the cache.
    pub cache_hits: Counter,
    /// Token lookups that waited for a fetch.
    pub cache_misses: Counter,
    /// Background token refreshes started.
    pub cache_refreshes: Counter,
    /// Calls to AWS by API and result code.
    pub aws_calls: Family<AwsLabels, Counter>,
    /// AWS call latency by API.
    pub aws_duration: HistogramFamily<ApiLabels>,
    /// Seconds until each cached token expires (negative: already expired).
    pub token_expiry: Family<TokenLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// 1 while the upstream connection is up.
    pub upstream_up: Gauge,
    /// Client connections accepted.
    pub connections: Counter,
    /// Client connections open now.
    pub connections_open: Gauge,
    /// 1 while the sandbox image the daemon looks after is present.
    pub sandbox_present: Gauge,
    /// Pulls of the sandbox image the daemon made, by result.
    pub sandbox_pulls: Family<SandboxLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every family.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        let calls = Family::<CallLabels, Counter>::default();
        let call_duration: HistogramFamily<MethodLabels> =
            Family::new_with_constructor(latency_histogram);
        let pulls = Family::<PullLabels, Counter>::default();
        let (cache_hits, cache_misses, cache_refreshes) =
            (Counter::default(), Counter::default(), Counter::default());
        let aws_calls = Family::<AwsLabels, Counter>::default();
        let aws_duration: HistogramFamily<ApiLabels> =
            Family::new_with_constructor(latency_histogram);
        let token_expiry =
            Family::<TokenLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        let upstream_up = Gauge::default();
        registry.register(
            "calls",
            "CRI calls by method and final gRPC code",
            calls.clone(),
        );
        registry.register(
            "call_duration_seconds",
            "CRI call latency through the proxy",
            call_duration.clone(),
        );
        registry.register(
            "pulls",
            "PullImage calls by registry host, result and credential source",
            pulls.clone(),
        );
        registry.register(
            "token_cache_hits",
            "Token lookups answered from the cache",
            cache_hits.clone(),
        );
        registry.register(
            "token_cache_misses",
            "Token lookups that waited for a fetch",
            cache_misses.clone(),
        );
        registry.register(
            "token_cache_refreshes",
            "Background token refreshes started",
            cache_refreshes.clone(),
        );
        registry.register(
            "aws_calls",
            "Calls to AWS by API and result code",
            aws_calls.clone(),
        );
        registry.register(
            "aws_call_duration_seconds",
            "AWS call latency",
            aws_duration.clone(),
        );
        registry.register(
            "token_expiry_seconds",
            "Seconds until each cached token expires",
            token_expiry.clone(),
        );
        registry.register(
            "upstream_up",
            "1 while the last connection made to the upstream socket is up",
            upstream_up.clone(),
        );
        let connections = Counter::default();
        registry.register(
            "connections",
            "Client connections accepted on the listening socket",
            connections.clone(),
        );
        let connections_open = Gauge::default();
        registry.register(
            "connections_open",
            "Client connections open now",
            connections_open.clone(),
        );
        let sandbox_present = Gauge::default();
        registry.register(
            "sandbox_image_present",
            "1 while the sandbox (pause) image the daemon looks after is present in containerd",
            sandbox_present.clone(),
        );
        let sandbox_pulls = Family::<SandboxLabels, Counter>::default();
        registry.register(
            "sandbox_pulls",
            "Pulls of the sandbox (pause) image the daemon made, by result",
            sandbox_pulls.clone(),
        );
        registry.register(
            "build",
            "Build information",
            Info::new(BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            }),
        );
        Metrics {
            registry: Arc::new(registry),
            calls,
            call_duration,
            pulls,
            cache_hits,
            cache_misses,
            cache_refreshes,
            aws_calls,
            aws_duration,
            token_expiry,
            upstream_up,
            connections,
            connections_open,
            sandbox_present,
            sandbox_pulls,
        }
    }

    /// The counter and latency histogram of calls to `method` (a
    /// [`method_label`]) that ended with `code` (a [`code_label`] or
    /// `cancelled`), to keep: a kept handle counts without a lookup.
    pub fn call_handles(&self, method: &'static str, code: &'static str) -> (Counter, Histogram) {
        (
            self.calls
                .get_or_create(&CallLabels { method, code })
                .clone(),
            self.call_duration
                .get_or_create(&MethodLabels { method })
                .clone(),
        )
    }

    /// Records one finished call.
    pub fn observe_call(
        &self,
        path: &str,
        grpc_status: Option<&str>,
        cancelled: bool,
        elapsed: Duration,
    ) {
        let method = method_label(path);
        let code = if cancelled {
            "cancelled"
        } else {
            code_label(grpc_status)
        };
        let (calls, duration) = self.call_handles(method, code);
        calls.inc();
        duration.observe(elapsed.as_secs_f64());
    }

    /// Records one AWS call.
    pub fn observe_aws(&self, api: &'static str, code: String, elapsed: Duration) {
        let code = aws_code_label(&code);
        self.aws_calls.get_or_create(&AwsLabels { api, code }).inc();
        self.aws_duration
            .get_or_create(&ApiLabels { api })
            .observe(elapsed.as_secs_f64());
    }

    /// The OpenMetrics text of every family.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}

#[cfg(test)]
mod aws_code_tests {
    use super::*;

    #[test]
    fn aws_codes_outside_the_known_set_are_other() {
        for (code, label) in [
            ("ok", "ok"),
            ("ThrottlingException", "ThrottlingException"),
            ("HTTP 429", "HTTP 429"),
            ("Timeout", "Timeout"),
            ("HTTP 4290", "other"),
            ("HTTP abc", "other"),
            ("SomethingAnEndpointMadeUp", "other"),
            ("AKIA-looking-secret", "other"),
            ("", "other"),
        ] {
            assert_eq!(aws_code_label(code), label, "{code}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_stay_low_cardinality() {
        assert_eq!(
            method_label("/runtime.v1.ImageService/PullImage"),
            "PullImage"
        );
        assert_eq!(
            method_label("/runtime.v1.RuntimeService/Version"),
            "RuntimeService"
        );
        assert_eq!(method_label("/x.y/anything-a-client-invents"), "other");
        assert_eq!(code_label(Some("0")), "OK");
        assert_eq!(code_label(Some("14")), "Unavailable");
        assert_eq!(code_label(Some("99")), "invalid");
        assert_eq!(code_label(Some("abc")), "none");
    }

    #[test]
    fn every_family_is_exported() {
        let m = Metrics::new();
        m.observe_call(
            "/runtime.v1.ImageService/PullImage",
            Some("0"),
            false,
            Duration::from_millis(3),
        );
        m.observe_aws(
            "ecr:GetAuthorizationToken",
            "ok".into(),
            Duration::from_millis(30),
        );
        m.pulls
            .get_or_create(&PullLabels {
                registry: "r".into(),
                result: "ok",
                credentials: "injected",
            })
            .inc();
        m.cache_hits.inc();
        m.sandbox_pulls
            .get_or_create(&SandboxLabels { result: "ok" })
            .inc();
        m.token_expiry
            .get_or_create(&TokenLabels {
                service: "ecr",
                partition: "aws",
                region: "us-east-1".into(),
                variant: "standard".into(),
                role: String::new(),
            })
            .set(60.0);
        let text = m.encode();
        let exported: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| l.split(['{', ' ']).next().unwrap())
            .map(|n| {
                n.trim_end_matches("_bucket")
                    .trim_end_matches("_sum")
                    .trim_end_matches("_count")
            })
            .collect();
        for family in FAMILIES {
            assert!(exported.contains(family), "{family} missing:\n{text}");
        }
        for name in &exported {
            assert!(
                FAMILIES.contains(name),
                "{name} is exported but not in FAMILIES"
            );
        }
        assert!(
            text.contains("ecr_pull_proxy_calls_total{method=\"PullImage\",code=\"OK\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "ecr_pull_proxy_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
    }
}
