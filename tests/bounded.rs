//! What a local caller controls is bounded by the configuration, not by
//! what it sends: image hosts with invented accounts and invented regions
//! grow neither metric series nor AWS calls. The daemon runs against a
//! scripted upstream (answers at once) and moto (the ECR API emulator,
//! where every token call is counted).

mod support;

use std::collections::BTreeSet;

use support::metrics::samples;
use support::real::Moto;
use support::scripted::ScriptedUpstream;
use support::stack::pull;
use support::{ProxyOptions, ProxyProcess};

/// The series of `name` in a scrape, each as its sorted labels.
fn series(scraped: &str, name: &str) -> BTreeSet<String> {
    samples(scraped)
        .into_iter()
        .filter(|s| s.name == name)
        .map(|s| format!("{:?}", s.labels))
        .collect()
}

/// A region-shaped name no partition has: `zz-<letters of i>-1`.
fn invented_region(i: usize) -> String {
    let mut n = i;
    let mut word = String::new();
    loop {
        word.push((b'a' + (n % 26) as u8) as char);
        n /= 26;
        if n == 0 {
            break;
        }
    }
    format!("zz-{word}test-1")
}

#[tokio::test(flavor = "multi_thread")]
async fn invented_accounts_and_regions_grow_no_series_and_no_aws_calls() {
    let dir = support::short_tempdir();
    let moto = Moto::start(dir.path());
    let upstream = ScriptedUpstream::start(&dir.path().join("up.sock")).await;
    let metrics = dir.path().join("m.sock");
    let config = format!("metrics_listen = \"unix:{}\"", metrics.display());
    let proxy = ProxyProcess::start(
        dir.path(),
        &dir.path().join("up.sock"),
        ProxyOptions {
            config: Some(&config),
            env: moto.env(),
            ..Default::default()
        },
    );
    let scrape = || support::get_unix(&metrics, "/metrics");
    let channel = proxy.channel();

    // 1,000 invented accounts in a real region: one token key, one token
    // call, one series.
    for i in 0..1000u64 {
        let image = format!(
            "{:012}.dkr.ecr.us-east-1.amazonaws.com/app:v1",
            100_000_000_000 + i
        );
        pull(channel.clone(), &image, None).await.expect("the pull");
    }
    let after_accounts = scrape();
    assert_eq!(moto.calls("GetAuthorizationToken", "us-east-1"), 1);
    let pulls = series(&after_accounts, "ecr_pull_proxy_pulls_total");
    assert_eq!(pulls.len(), 1, "{pulls:#?}");
    assert!(
        pulls
            .iter()
            .next()
            .unwrap()
            .contains("aws/us-east-1/standard"),
        "{pulls:#?}"
    );
    let expiry = series(&after_accounts, "ecr_pull_proxy_token_expiry_seconds");
    assert_eq!(expiry.len(), 1, "{expiry:#?}");

    // 1,000 invented regions: a clear status each, no AWS call at all, and
    // one more series (`other`, no-token) whatever their number.
    // AWS API calls moto saw (the tests' own reads of moto's state, made at
    // each status a pull returns, name no action).
    let api_calls = || {
        moto.requests()
            .into_iter()
            .filter(|(action, _, _)| !action.is_empty())
            .count()
    };
    let requests_before = api_calls();
    for i in 0..1000 {
        let image = format!(
            "123456789012.dkr.ecr.{}.amazonaws.com/app:v1",
            invented_region(i)
        );
        let status = pull(channel.clone(), &image, None)
            .await
            .expect_err("an invented region is refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(
            status
                .message()
                .contains("is not a region of AWS partition aws")
                && status.message().contains("extra_regions"),
            "{status:?}"
        );
    }
    assert_eq!(
        api_calls(),
        requests_before,
        "invented regions reached the ECR API"
    );
    let after_regions = scrape();
    let pulls = series(&after_regions, "ecr_pull_proxy_pulls_total");
    assert_eq!(pulls.len(), 2, "{pulls:#?}");
    assert_eq!(
        series(&after_regions, "ecr_pull_proxy_token_expiry_seconds"),
        expiry
    );
    // Every family of the whole scrape: none grew by more than the one
    // series of the new outcome (pulls `other`, calls `InvalidArgument`).
    let families = |scraped: &str| {
        let mut counts = std::collections::BTreeMap::<String, usize>::new();
        for s in samples(scraped) {
            *counts.entry(s.name).or_default() += 1;
        }
        counts
    };
    let (before, after) = (families(&after_accounts), families(&after_regions));
    for (name, n) in &after {
        let was = before.get(name).copied().unwrap_or(0);
        assert!(*n <= was + 1, "{name}: {was} series, then {n}");
    }
    // None of them reached containerd either: the refusal is the daemon's.
    assert_eq!(upstream.calls().len(), 1000);
}

/// A region AWS opened after this release works once `extra_regions` names
/// it, with no new build.
#[tokio::test(flavor = "multi_thread")]
async fn extra_regions_admits_a_region_this_release_does_not_know() {
    let dir = support::short_tempdir();
    let moto = Moto::start(dir.path());
    let _upstream = ScriptedUpstream::start(&dir.path().join("up.sock")).await;
    let proxy = ProxyProcess::start(
        dir.path(),
        &dir.path().join("up.sock"),
        ProxyOptions {
            config: Some("extra_regions = [\"zz-newtest-1\"]"),
            env: moto.env(),
            ..Default::default()
        },
    );
    pull(
        proxy.channel(),
        "123456789012.dkr.ecr.zz-newtest-1.amazonaws.com/app:v1",
        None,
    )
    .await
    .expect("a region named in extra_regions");
    assert_eq!(moto.calls("GetAuthorizationToken", "zz-newtest-1"), 1);
}
