//! ECR registry host names → account, region, partition and API endpoint
//! variant.
//!
//! The forms are those ECR documents for private registries and that
//! `ecr-credential-provider` accepts: `ACCOUNT.dkr.ecr.REGION.SUFFIX` (FIPS:
//! `dkr.ecr-fips`), and the dual-stack `ACCOUNT.dkr-ecr.REGION.SUFFIX` (FIPS:
//! `dkr-ecr-fips`). The account is exactly 12 digits and every label is
//! checked, so look-alikes such as `x123456789012.dkr.ecr...` or
//! `....amazonaws.com.evil.example` never parse.

use std::fmt;

/// Every ECR private host form, as kubelet `matchImages` globs. Matching also
/// requires [`EcrHost::parse`] to accept the host, which pins the account to
/// 12 digits and the region to a region name.
pub const DEFAULT_PATTERNS: &[&str] = &[
    "*.dkr.ecr.*.amazonaws.com",
    "*.dkr.ecr-fips.*.amazonaws.com",
    "*.dkr.ecr.*.amazonaws.com.cn",
    "*.dkr.ecr.*.amazonaws.eu",
    "*.dkr-ecr.*.on.aws",
    "*.dkr-ecr-fips.*.on.aws",
    "*.dkr-ecr.*.on.amazonwebservices.com.cn",
    "*.dkr.ecr.*.c2s.ic.gov",
    "*.dkr.ecr.*.sc2s.sgov.gov",
    "*.dkr.ecr.*.cloud.adc-e.uk",
    "*.dkr.ecr.*.csp.hci.ic.gov",
];

/// DNS suffix → partition, for the registry (not dual-stack) forms.
const SUFFIXES: &[(&str, &str)] = &[
    ("amazonaws.com", "aws"),
    ("amazonaws.com.cn", "aws-cn"),
    ("amazonaws.eu", "aws-eusc"),
    ("c2s.ic.gov", "aws-iso"),
    ("sc2s.sgov.gov", "aws-iso-b"),
    ("cloud.adc-e.uk", "aws-iso-e"),
    ("csp.hci.ic.gov", "aws-iso-f"),
];

/// DNS suffix → partition, for the dual-stack forms.
const DUAL_STACK_SUFFIXES: &[(&str, &str)] =
    &[("on.aws", "aws"), ("on.amazonwebservices.com.cn", "aws-cn")];

/// Which flavour of the ECR API endpoint serves a registry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointVariant {
    /// FIPS 140 endpoint (`ecr-fips`).
    pub fips: bool,
    /// Dual-stack (IPv4 + IPv6) endpoint.
    pub dual_stack: bool,
}

impl fmt::Display for EndpointVariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match (self.fips, self.dual_stack) {
            (false, false) => "standard",
            (true, false) => "fips",
            (false, true) => "dual-stack",
            (true, true) => "fips+dual-stack",
        })
    }
}

/// A parsed ECR private registry host.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EcrHost {
    /// The 12-digit AWS account that owns the registry.
    pub account: String,
    /// The AWS region, e.g. `us-east-1`.
    pub region: String,
    /// The AWS partition: `aws`, `aws-us-gov` (GovCloud: its regions share
    /// the commercial suffix), `aws-cn`, `aws-eusc`, `aws-iso`, ...
    pub partition: &'static str,
    /// Which API endpoint flavour to ask for a token.
    pub variant: EndpointVariant,
}

impl EcrHost {
    /// Parses `host` (no port, no path); `None` when it is not an ECR
    /// private registry host.
    pub fn parse(host: &str) -> Option<Self> {
        let host = host.to_ascii_lowercase();
        let (account, rest) = host.split_once('.')?;
        let (fips, dual_stack, rest) = if let Some(r) = rest.strip_prefix("dkr.ecr.") {
            (false, false, r)
        } else if let Some(r) = rest.strip_prefix("dkr.ecr-fips.") {
            (true, false, r)
        } else if let Some(r) = rest.strip_prefix("dkr-ecr.") {
            (false, true, r)
        } else if let Some(r) = rest.strip_prefix("dkr-ecr-fips.") {
            (true, true, r)
        } else {
            return None;
        };
        let (region, suffix) = rest.split_once('.')?;
        if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        if !is_region(region) {
            return None;
        }
        let table = if dual_stack {
            DUAL_STACK_SUFFIXES
        } else {
            SUFFIXES
        };
        let partition = table.iter().find(|(s, _)| *s == suffix).map(|(_, p)| *p)?;
        // GovCloud shares the commercial DNS suffix; its regions say which.
        let partition = if partition == "aws" && region.starts_with("us-gov-") {
            "aws-us-gov"
        } else {
            partition
        };
        // FIPS registry endpoints exist in the commercial and GovCloud
        // partitions only.
        if fips && !matches!(partition, "aws" | "aws-us-gov") {
            return None;
        }
        Some(EcrHost {
            account: account.to_owned(),
            region: region.to_owned(),
            partition,
            variant: EndpointVariant { fips, dual_stack },
        })
    }
}

/// Every region of each partition, from the AWS SDK's partition metadata
/// (aws-sdk-ecr 1.138's endpoint rules). A host in any other region is
/// refused before any AWS call: a region is part of the token cache's key,
/// of the SDK client map and of metric labels, so one a caller invents
/// would grow all three. A region AWS opens after this release is accepted
/// by listing it in the `extra_regions` config key, without a new build.
pub const KNOWN_REGIONS: &[(&str, &[&str])] = &[
    (
        "aws",
        &[
            "af-south-1",
            "ap-east-1",
            "ap-east-2",
            "ap-northeast-1",
            "ap-northeast-2",
            "ap-northeast-3",
            "ap-south-1",
            "ap-south-2",
            "ap-southeast-1",
            "ap-southeast-2",
            "ap-southeast-3",
            "ap-southeast-4",
            "ap-southeast-5",
            "ap-southeast-6",
            "ap-southeast-7",
            "ca-central-1",
            "ca-west-1",
            "eu-central-1",
            "eu-central-2",
            "eu-north-1",
            "eu-south-1",
            "eu-south-2",
            "eu-west-1",
            "eu-west-2",
            "eu-west-3",
            "il-central-1",
            "me-central-1",
            "me-south-1",
            "mx-central-1",
            "sa-east-1",
            "us-east-1",
            "us-east-2",
            "us-west-1",
            "us-west-2",
        ],
    ),
    ("aws-cn", &["cn-north-1", "cn-northwest-1"]),
    ("aws-eusc", &["eusc-de-east-1"]),
    ("aws-iso", &["us-iso-east-1", "us-iso-west-1"]),
    ("aws-iso-b", &["us-isob-east-1", "us-isob-west-1"]),
    ("aws-iso-e", &["eu-isoe-west-1"]),
    ("aws-iso-f", &["us-isof-east-1", "us-isof-south-1"]),
    ("aws-us-gov", &["us-gov-east-1", "us-gov-west-1"]),
];

/// Whether `region` is one of `partition`'s in [`KNOWN_REGIONS`] or in
/// `extra` (the `extra_regions` config key).
pub fn is_known_region(partition: &str, region: &str, extra: &[String]) -> bool {
    extra.iter().any(|r| r == region)
        || KNOWN_REGIONS
            .iter()
            .any(|(p, regions)| *p == partition && regions.contains(&region))
}

/// `us-east-1`, `us-gov-west-1`, `cn-north-1`, `eusc-de-east-1`,
/// `us-isob-east-1`: lower-case words joined by '-', ending in a number.
pub fn is_region(region: &str) -> bool {
    let parts: Vec<&str> = region.split('-').collect();
    parts.len() >= 3
        && parts[..parts.len() - 1]
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase()))
        && parts
            .last()
            .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecr_hosts_parse_to_account_region_partition_variant() {
        let std = EndpointVariant::default();
        let fips = EndpointVariant {
            fips: true,
            dual_stack: false,
        };
        let ds = EndpointVariant {
            fips: false,
            dual_stack: true,
        };
        let ds_fips = EndpointVariant {
            fips: true,
            dual_stack: true,
        };
        let cases: &[(&str, &str, &str, EndpointVariant)] = &[
            (
                "123456789012.dkr.ecr.us-east-1.amazonaws.com",
                "us-east-1",
                "aws",
                std,
            ),
            (
                "123456789012.dkr.ecr.us-gov-west-1.amazonaws.com",
                "us-gov-west-1",
                "aws-us-gov",
                std,
            ),
            (
                "123456789012.dkr.ecr-fips.us-east-1.amazonaws.com",
                "us-east-1",
                "aws",
                fips,
            ),
            (
                "123456789012.dkr.ecr-fips.us-gov-west-1.amazonaws.com",
                "us-gov-west-1",
                "aws-us-gov",
                fips,
            ),
            (
                "123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn",
                "cn-north-1",
                "aws-cn",
                std,
            ),
            (
                "123456789012.dkr.ecr.eusc-de-east-1.amazonaws.eu",
                "eusc-de-east-1",
                "aws-eusc",
                std,
            ),
            (
                "123456789012.dkr-ecr.eu-west-1.on.aws",
                "eu-west-1",
                "aws",
                ds,
            ),
            (
                "123456789012.dkr-ecr-fips.us-east-1.on.aws",
                "us-east-1",
                "aws",
                ds_fips,
            ),
            (
                "123456789012.dkr-ecr.cn-northwest-1.on.amazonwebservices.com.cn",
                "cn-northwest-1",
                "aws-cn",
                ds,
            ),
            (
                "123456789012.dkr.ecr.us-iso-east-1.c2s.ic.gov",
                "us-iso-east-1",
                "aws-iso",
                std,
            ),
            (
                "123456789012.dkr.ecr.us-isob-east-1.sc2s.sgov.gov",
                "us-isob-east-1",
                "aws-iso-b",
                std,
            ),
            (
                "123456789012.dkr.ecr.eu-isoe-west-1.cloud.adc-e.uk",
                "eu-isoe-west-1",
                "aws-iso-e",
                std,
            ),
            (
                "123456789012.dkr.ecr.us-isof-south-1.csp.hci.ic.gov",
                "us-isof-south-1",
                "aws-iso-f",
                std,
            ),
            (
                "123456789012.DKR.ECR.US-EAST-1.AMAZONAWS.COM",
                "us-east-1",
                "aws",
                std,
            ),
        ];
        for (host, region, partition, variant) in cases {
            let h = EcrHost::parse(host).unwrap_or_else(|| panic!("{host} should parse"));
            assert_eq!(h.account, "123456789012", "{host}");
            assert_eq!(h.region, *region, "{host}");
            assert_eq!(h.partition, *partition, "{host}");
            assert_eq!(h.variant, *variant, "{host}");
        }
    }

    #[test]
    fn look_alikes_and_other_hosts_do_not_parse() {
        let cases = [
            "123456789012.dkr.ecr.us-east-1.amazonaws.com.evil.example",
            "x123456789012.dkr.ecr.us-east-1.amazonaws.com",
            "1234567890123.dkr.ecr.us-east-1.amazonaws.com",
            "12345678901.dkr.ecr.us-east-1.amazonaws.com",
            "123456789012.dkr.ecr.us-east-1.amazonaws.com.",
            "123456789012.dkr.ecr.us-east-1.evil.com",
            "123456789012.dkr.ecr.amazonaws.com",
            "123456789012.dkr.ecr..amazonaws.com",
            "123456789012.dkr.ecr.us_east_1.amazonaws.com",
            "123456789012.dkr.ecr.useast1.amazonaws.com",
            "123456789012.dkr.ecr.us-east-1.on.aws",
            "123456789012.dkr-ecr.us-east-1.amazonaws.com",
            "123456789012.dkr.ecr-fips.cn-north-1.amazonaws.com.cn",
            "123456789012.ecr.us-east-1.amazonaws.com",
            "api.ecr.us-east-1.amazonaws.com",
            "public.ecr.aws",
            "docker.io",
            "",
        ];
        for host in cases {
            assert_eq!(EcrHost::parse(host), None, "{host:?}");
        }
    }

    #[test]
    fn every_default_pattern_covers_a_parsable_host() {
        for p in DEFAULT_PATTERNS {
            let host = p
                .replacen('*', "123456789012", 1)
                .replacen('*', "us-east-1", 1);
            let pat = crate::matcher::Pattern::new(p).unwrap();
            assert!(pat.matches(&format!("{host}/app")), "{p}");
            assert!(EcrHost::parse(&host).is_some(), "{host}");
        }
    }
}
