//! `ecr-pull-proxy check`: what an operator runs when pulls fail. Validates
//! the configuration (already done by the caller), prints the effective
//! settings, probes the upstream socket, shows the AWS identity in use and
//! where it came from, and for `--image` says whether the image matches and
//! why, and fetches a token for it (printing region, account and expiry,
//! never the token).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_credential_types::provider::ProvideCredentials;

use crate::config::Config;
use crate::ecr::aws::{load_sdk_config, AwsSource};
use crate::ecr::CredentialSource;
use crate::ops::metrics::Metrics;
use crate::pull::credentials::Resolver;
use crate::transport::Upstream;

/// What `check` found: lines to print, and problems (one line each).
#[derive(Debug, Default)]
pub struct Report {
    /// `name: value` lines.
    pub lines: Vec<(String, String)>,
    /// Problems, each a line saying what to fix.
    pub problems: Vec<String>,
}

impl Report {
    fn line(&mut self, name: &str, value: impl Into<String>) {
        self.lines.push((name.to_owned(), value.into()));
    }

    /// The report as text: aligned lines, then one `problem:` line each.
    pub fn render(&self) -> String {
        let width = self.lines.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
        let mut out = String::new();
        for (n, v) in &self.lines {
            out.push_str(&format!("{n:width$}  {}\n", printable(v)));
        }
        for p in &self.problems {
            out.push_str(&format!("problem: {}\n", printable(p)));
        }
        if self.problems.is_empty() {
            out.push_str("ok: everything needed would work\n");
        }
        out
    }
}

/// Runs every check.
pub async fn run(config: &Config, image: Option<&str>) -> Report {
    let mut r = Report::default();
    let creds = &config.credentials;
    r.line(
        "config",
        config
            .source
            .as_ref()
            .map_or("(none: defaults)".to_owned(), |p| p.display().to_string()),
    );
    r.line("listen", config.listen.display().to_string());
    r.line(
        "existing_credentials",
        creds.existing_credentials.to_string(),
    );
    let patterns: Vec<&str> = creds.ecr_patterns.iter().map(|p| p.as_str()).collect();
    r.line(
        "ecr patterns",
        if patterns.is_empty() {
            "(none)".to_owned()
        } else {
            patterns.join(", ")
        },
    );
    for (i, e) in creds.registries.iter().enumerate() {
        let pats: Vec<&str> = e.patterns.iter().map(|p| p.as_str()).collect();
        let role = e
            .role
            .as_ref()
            .map(|r| format!(" as {}", r.arn))
            .unwrap_or_default();
        r.line(
            &format!("registries[{i}]"),
            format!(
                "{} -> {}.dkr.ecr.{} ({}){role}",
                pats.join(", "),
                e.registry.account,
                e.registry.region,
                e.registry.partition
            ),
        );
    }
    // What matching does, not only the key: an imported matchImages that
    // covers the ECR Public hosts turns its token on too.
    let public = matcher_only(config)
        .target(&format!("{}/x/y:z", crate::ecr::ECR_PUBLIC_HOST))
        .is_some();
    r.line(
        "ecr_public",
        match (creds.ecr_public, public) {
            (true, _) => "true".to_owned(),
            (false, true) => "true (an imported matchImages covers public.ecr.aws)".to_owned(),
            (false, false) => "false".to_owned(),
        },
    );
    r.line(
        "metrics",
        config
            .metrics_listen
            .as_ref()
            .map_or("off".to_owned(), ToString::to_string),
    );

    let upstream = Upstream::new(&config.upstream, Default::default());
    match upstream.probe().await {
        Ok(()) => {
            r.line(
                "upstream",
                format!("{}: answers ImageFsInfo", config.upstream.display()),
            );
            sandbox_check(&mut r, config, &upstream).await;
        }
        Err(e) => {
            r.line(
                "upstream",
                format!("{}: not answering", config.upstream.display()),
            );
            r.problems.push(format!(
                "{}; is containerd running, and is `upstream` its CRI socket?",
                crate::error::error_chain(&e)
            ));
        }
    }

    http_proxy(&mut r, |name| std::env::var(name).ok());
    identity(&mut r, config).await;

    if let Some(image) = image {
        image_check(&mut r, config, image).await;
    }
    r
}

/// Where instance metadata answers; an HTTP proxy must not be asked for it.
const IMDS_ADDRESSES: [&str; 2] = ["169.254.169.254", "fd00:ec2::254"];

/// The HTTP proxy the AWS SDK sends its calls through (`HTTPS_PROXY`,
/// `HTTP_PROXY`, `NO_PROXY`, upper or lower case, as the SDK reads them),
/// and a problem when instance metadata would go through it too: the
/// classic "Unable to locate credentials" behind a proxy.
fn http_proxy(r: &mut Report, env: impl Fn(&str) -> Option<String>) {
    let var = |name: &str| {
        env(name)
            .or_else(|| env(&name.to_ascii_lowercase()))
            .filter(|v| !v.is_empty())
    };
    let Some(proxy) = var("HTTPS_PROXY").or_else(|| var("HTTP_PROXY")) else {
        r.line("http proxy", "none (AWS calls go direct)");
        return;
    };
    let no_proxy = var("NO_PROXY").unwrap_or_default();
    r.line(
        "http proxy",
        format!(
            "{} for AWS calls; NO_PROXY {}",
            without_userinfo(&proxy),
            if no_proxy.is_empty() {
                "unset"
            } else {
                &no_proxy
            }
        ),
    );
    let bypassed: Vec<&str> = IMDS_ADDRESSES
        .into_iter()
        .filter(|a| !no_proxy_covers(&no_proxy, a))
        .collect();
    if !bypassed.is_empty() {
        r.problems.push(format!(
            "NO_PROXY does not cover instance metadata ({}): the instance role's credentials would be asked of the proxy; add {} to NO_PROXY",
            bypassed.join(", "),
            bypassed.join(",")
        ));
    }
}

/// A proxy URL without its `user:password@`.
fn without_userinfo(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let rest = match rest.split_once('/') {
        Some((authority, path)) => (authority, Some(path)),
        None => (rest, None),
    };
    let host = rest.0.rsplit_once('@').map_or(rest.0, |(_, h)| h);
    let shown = if rest.0.contains('@') {
        format!("<redacted>@{host}")
    } else {
        host.to_owned()
    };
    let mut out = if scheme.is_empty() {
        shown
    } else {
        format!("{scheme}://{shown}")
    };
    if let Some(path) = rest.1 {
        out.push('/');
        out.push_str(path);
    }
    out
}

/// Whether a `NO_PROXY` list names `addr`: `*`, the address itself, or an
/// IPv4/IPv6 CIDR block that holds it.
fn no_proxy_covers(no_proxy: &str, addr: &str) -> bool {
    let Ok(ip) = addr.parse::<std::net::IpAddr>() else {
        return false;
    };
    no_proxy.split(',').map(str::trim).any(|entry| {
        let entry = entry.trim_start_matches('[').trim_end_matches(']');
        if entry == "*" || entry == addr {
            return true;
        }
        let Some((net, bits)) = entry.split_once('/') else {
            return entry.parse::<std::net::IpAddr>() == Ok(ip);
        };
        let (Ok(net), Ok(bits)) = (net.parse::<std::net::IpAddr>(), bits.parse::<u32>()) else {
            return false;
        };
        match (net, ip) {
            (std::net::IpAddr::V4(n), std::net::IpAddr::V4(a)) if bits <= 32 => {
                let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (std::net::IpAddr::V6(n), std::net::IpAddr::V6(a)) if bits <= 128 => {
                let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    })
}

/// The credential provider that answered and the identity's ARN.
async fn identity(r: &mut Report, config: &Config) {
    let timeout = config.credentials.aws_timeout;
    let sdk = load_sdk_config(timeout).await;
    let Some(provider) = sdk.credentials_provider() else {
        r.problems
            .push("AWS: no credential provider is configured".into());
        return;
    };
    let creds = match tokio::time::timeout(timeout, provider.provide_credentials()).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            r.line("AWS identity", "none");
            r.problems.push(format!(
                "AWS credential chain: {}",
                crate::error::error_chain(&e)
            ));
            return;
        }
        Err(_) => {
            r.line("AWS identity", "none");
            r.problems.push(format!(
                "AWS credential chain: no answer within {}",
                humantime::format_duration(timeout)
            ));
            return;
        }
    };
    let source = provider_name(&creds);
    let region = sdk
        .region()
        .map(ToString::to_string)
        .unwrap_or_else(|| crate::ecr::aws::FALLBACK_REGION.into());
    let sts = aws_sdk_sts::Client::from_conf(
        aws_sdk_sts::config::Builder::from(&sdk)
            .region(aws_sdk_sts::config::Region::new(region))
            .build(),
    );
    match tokio::time::timeout(timeout, sts.get_caller_identity().send()).await {
        Ok(Ok(out)) => r.line(
            "AWS identity",
            format!("{} (credentials from {source})", out.arn().unwrap_or("?")),
        ),
        Ok(Err(e)) => {
            // Whether STS said no, or could not be asked at all.
            let what = match &e {
                aws_sdk_sts::error::SdkError::DispatchFailure(_)
                | aws_sdk_sts::error::SdkError::TimeoutError(_) => "but STS could not be reached",
                aws_sdk_sts::error::SdkError::ServiceError(_) => "but STS does not accept them",
                _ => "but STS's answer could not be read",
            };
            r.line("AWS identity", format!("credentials from {source}, {what}"));
            r.problems.push(format!(
                "STS GetCallerIdentity: {}",
                crate::error::error_chain(&e)
            ));
        }
        Err(_) => {
            r.line("AWS identity", format!("credentials from {source}"));
            r.problems.push(format!(
                "STS GetCallerIdentity: no answer within {}",
                humantime::format_duration(timeout)
            ));
        }
    }
}

/// `text` with control characters escaped (`\n`, `\u{1b}`, ...): what
/// `check` prints comes partly from its arguments and from AWS, and must
/// not forge a line of the report or drive the terminal.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_debug().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// The SDK names the provider that produced credentials only in their
/// `Debug` form; take that one field and nothing else.
fn provider_name(creds: &aws_credential_types::Credentials) -> String {
    let debug = format!("{creds:?}");
    debug
        .split("provider_name: \"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .map(str::to_owned)
        .unwrap_or_else(|| "an unnamed provider".into())
}

/// A resolver for matching only (it never fetches).
fn matcher_only(config: &Config) -> Resolver {
    let cache = crate::ecr::TokenCache::new(Arc::new(NoSource), None, Arc::new(Metrics::new()));
    Resolver::new(
        config.credentials.clone(),
        config.sandbox.containerd_config.clone(),
        cache,
    )
}

/// The sandbox (pause) image: which, from where, whether it gets a token,
/// whether containerd has it.
async fn sandbox_check(r: &mut Report, config: &Config, upstream: &Arc<Upstream>) {
    match crate::sandbox::discover(upstream, &config.sandbox).await {
        Ok(None) => r.line(
            "sandbox image",
            "not looked after (sandbox_image = \"off\")",
        ),
        Ok(Some((image, source))) => {
            let matching = match matcher_only(config).target(&image) {
                Some(t) => format!("gets an ECR token (pattern {:?})", t.pattern),
                None => "matches no pattern: containerd pulls it with its own credentials".into(),
            };
            let present = match crate::sandbox::present(upstream, &image).await {
                Ok(true) => "present".to_owned(),
                Ok(false) => "not present".to_owned(),
                Err(e) => format!("presence unknown: {e}"),
            };
            r.line(
                "sandbox image",
                format!("{image} (from {source}); {matching}; {present}"),
            );
        }
        Err(e) => {
            r.line("sandbox image", "unknown");
            r.problems.push(format!("sandbox image: {e}"));
        }
    }
}

async fn image_check(r: &mut Report, config: &Config, image: &str) {
    let resolver = matcher_only(config);
    let Some(target) = resolver.target(image) else {
        let why = resolver.why_not(image).unwrap_or_default();
        r.line("image", format!("{image}: no token: {why}"));
        return;
    };
    let account = if target.account.is_empty() {
        "-".to_owned()
    } else {
        target.account.clone()
    };
    r.line(
        "image",
        format!(
            "{image}: matches {:?}; needs a token for {} (account {account})",
            target.pattern, target.key
        ),
    );
    r.line(
        "token goes to",
        format!(
            "{} only (where containerd sends the pull; hosts.toml mirrors get no token)",
            resolver.destination(&target).await
        ),
    );
    let source = AwsSource::new(
        config.credentials.aws_timeout,
        std::sync::Arc::new(crate::ops::metrics::Metrics::new()),
    );
    match source.fetch(&target.key).await {
        Ok(token) => {
            let expires = humantime::format_rfc3339_seconds(token.expires_at);
            let note = match token.expires_at.duration_since(SystemTime::now()) {
                Ok(left) => format!("in {}", humantime::format_duration(Duration::from_secs(left.as_secs()))),
                Err(_) => "already expired on arrival: clock skew, or an emulator; the proxy keeps such a token 60 s".into(),
            };
            r.line(
                "token",
                format!(
                    "fetched for region {}, account {account}; expires {expires} ({note})",
                    target.key.region
                ),
            );
        }
        Err(e) if target.anonymous_on_failure => {
            r.line(
                "token",
                format!("none ({e}); pulls of this image go on anonymously"),
            );
        }
        Err(e) => {
            r.line("token", "none");
            r.problems.push(format!(
                "cannot get an ECR token for {image} (region {}): {e}",
                target.key.region
            ));
        }
    }
}

/// `check` fetches through [`AwsSource`] directly; the resolver's cache is
/// only used for matching and never asked.
struct NoSource;

impl CredentialSource for NoSource {
    fn fetch(
        &self,
        _: &crate::ecr::TokenKey,
    ) -> futures_util::future::BoxFuture<'static, Result<crate::ecr::Token, crate::ecr::SourceError>>
    {
        Box::pin(async {
            Err(crate::ecr::SourceError::new(
                crate::ecr::ErrorKind::Other,
                None,
                "not used by check",
            ))
        })
    }
}

#[cfg(test)]
mod proxy_tests {
    use super::*;

    fn report(env: &[(&str, &str)]) -> Report {
        let mut r = Report::default();
        http_proxy(&mut r, |name| {
            env.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        });
        r
    }

    #[test]
    fn no_proxy_means_aws_calls_go_direct() {
        let r = report(&[]);
        assert_eq!(r.lines[0].1, "none (AWS calls go direct)");
        assert!(r.problems.is_empty());
    }

    #[test]
    fn a_proxy_without_imds_in_no_proxy_is_a_problem() {
        let r = report(&[("HTTPS_PROXY", "http://user:pw@proxy.internal:3128")]);
        assert_eq!(
            r.lines[0].1,
            "http://<redacted>@proxy.internal:3128 for AWS calls; NO_PROXY unset"
        );
        assert!(!format!("{:?}{:?}", r.lines, r.problems).contains("pw"));
        assert_eq!(r.problems.len(), 1);
        assert!(r.problems[0].contains("169.254.169.254, fd00:ec2::254"));
    }

    #[test]
    fn no_proxy_covering_imds_by_address_or_block_is_fine() {
        for no_proxy in [
            "169.254.169.254,fd00:ec2::254",
            "localhost, 169.254.0.0/16, [fd00:ec2::254]",
            "169.254.169.254/32,fd00:ec2::/32",
            "*",
        ] {
            let r = report(&[("https_proxy", "http://proxy:3128"), ("no_proxy", no_proxy)]);
            assert!(r.problems.is_empty(), "{no_proxy}: {:?}", r.problems);
        }
        let r = report(&[
            ("HTTPS_PROXY", "http://proxy:3128"),
            ("NO_PROXY", "169.254.169.254,.internal"),
        ]);
        assert_eq!(r.problems.len(), 1);
        assert!(
            r.problems[0].contains("(fd00:ec2::254)"),
            "{:?}",
            r.problems
        );
    }
}
