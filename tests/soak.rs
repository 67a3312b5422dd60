//! A bounded soak on loopback: 16 callers making mixed CRI calls and one
//! puller removing and pulling ECR images, through the proxy, against real
//! containerd, registry and moto, for SOAK_SECONDS (default 15; `.ci/soak`
//! runs 300). Samples the proxy's RSS and descriptors every second, prints a
//! summary, and fails on any error, on descriptor growth, or on RSS that
//! grows from the first third of the run to the last (medians of each, so
//! that one sample does not decide).

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ecr_pull_proxy::cri;
use support::stack::*;

const CALLERS: usize = 16;
/// How much the median RSS of the last third may exceed the first third's:
/// allocator slack, not a leak (a leak of 1 KiB per call is ~1 MiB a
/// second here).
const RSS_GROWTH_LIMIT_KIB: u64 = 4 * 1024;

/// The median of `values` (not empty).
fn median(mut values: Vec<u64>) -> u64 {
    values.sort_unstable();
    values[values.len() / 2]
}

#[tokio::main]
async fn main() {
    let seconds: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let s = Stack::start(&[ECR_HOST]);
    let images: Vec<String> = (0..8)
        .map(|i| {
            s.registry.push_image(&format!("soak{i}"), &["v1"]);
            format!("{ECR_HOST}/soak{i}:v1")
        })
        .collect();
    let proxy = s.proxy_with_env_args("p", "", s.moto.env(), vec!["--log-level", "warn"]);
    let stop = Arc::new(AtomicBool::new(false));
    let (calls, call_errors, pulls, pull_errors) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    println!("soak: {seconds} s, {CALLERS} callers + 1 puller, loopback only");

    let mut tasks = Vec::new();
    for w in 0..CALLERS {
        let (ch, stop, calls, errors) = (
            proxy.channel(),
            stop.clone(),
            calls.clone(),
            call_errors.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut c = client(ch);
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                let ok = match i % 3 {
                    0 => c
                        .list_images(cri::ListImagesRequest::default())
                        .await
                        .is_ok(),
                    1 => c.image_fs_info(cri::ImageFsInfoRequest {}).await.is_ok(),
                    _ => {
                        let spec = cri::ImageSpec {
                            image: format!("{ECR_HOST}/soak0:v1"),
                            ..Default::default()
                        };
                        c.image_status(cri::ImageStatusRequest {
                            image: Some(spec),
                            verbose: false,
                        })
                        .await
                        .is_ok()
                    }
                };
                calls.fetch_add(1, Ordering::Relaxed);
                if !ok {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
        }));
    }
    {
        let (ch, direct, stop, pulls, errors, images) = (
            proxy.channel(),
            s.direct(),
            stop.clone(),
            pulls.clone(),
            pull_errors.clone(),
            images.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let image = &images[i % images.len()];
                let _ = client(direct.clone())
                    .remove_image(cri::RemoveImageRequest {
                        image: Some(cri::ImageSpec {
                            image: image.clone(),
                            ..Default::default()
                        }),
                    })
                    .await;
                if pull(ch.clone(), image, None).await.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                pulls.fetch_add(1, Ordering::Relaxed);
                i += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }));
    }

    let started = Instant::now();
    let mut samples = Vec::new();
    while started.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        samples.push((proxy.rss_kib().0, proxy.fds()));
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    // The kernel's high-water mark (VmHWM): the peak, even between samples.
    let (_, peak_rss) = proxy.rss_kib();
    assert!(samples.len() >= 6, "too short a soak to compare thirds");
    let third = samples.len() / 3;
    let first = median(samples[..third].iter().map(|s| s.0).collect());
    let last = median(
        samples[samples.len() - third..]
            .iter()
            .map(|s| s.0)
            .collect(),
    );
    let fds_start = samples[0].1;
    let fds_max = samples.iter().map(|s| s.1).max().unwrap();
    let fds_end = samples.last().unwrap().1;
    let (calls, call_errors, pulls, pull_errors) = (
        calls.load(Ordering::Relaxed),
        call_errors.load(Ordering::Relaxed),
        pulls.load(Ordering::Relaxed),
        pull_errors.load(Ordering::Relaxed),
    );
    println!("| figure | value |");
    println!("| --- | --- |");
    println!("| duration | {elapsed:.0} s |");
    println!(
        "| calls | {calls} ({:.0}/s), {call_errors} errors |",
        calls as f64 / elapsed
    );
    println!("| pulls | {pulls}, {pull_errors} errors |");
    println!(
        "| token fetches | {} |",
        s.moto.calls("GetAuthorizationToken", "us-east-1")
    );
    println!(
        "| RSS | peak {:.1} MiB; median {:.1} MiB in the first third, {:.1} MiB in the last |",
        peak_rss as f64 / 1024.0,
        first as f64 / 1024.0,
        last as f64 / 1024.0
    );
    println!("| fds | {fds_start} at start, {fds_max} max, {fds_end} at the end |");
    assert_eq!(call_errors + pull_errors, 0, "errors during the soak");
    assert!(calls > 0 && pulls > 0);
    assert!(
        fds_end <= fds_start + 2,
        "descriptors grew: {fds_start} → {fds_end}"
    );
    assert!(
        last <= first + RSS_GROWTH_LIMIT_KIB,
        "RSS grew: median {first} KiB in the first third, {last} KiB in the last"
    );
    println!("soak passed");
}
