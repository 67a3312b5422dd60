//! Load through the proxy against real containerd: 1,000 concurrent calls of
//! mixed methods, then 200 concurrent pulls of 50 distinct ECR images in two
//! regions, in two identical rounds: the images are removed before each, so
//! both rounds download them (counted in the registry's log). Every call
//! must be answered correctly, each region must cost one token fetch, and
//! memory and file descriptors must return to their idle level. Figures are
//! printed (`--nocapture`) for the README.

mod support;

use std::time::{Duration, Instant};

use ecr_pull_proxy::cri;
use support::stack::*;
use tonic::transport::Channel;

const EU_HOST: &str = "123456789012.dkr.ecr.eu-west-1.amazonaws.com";
/// Allowed growth over idle after the load, for allocator slack.
const RSS_MARGIN_KIB: u64 = 16 * 1024;
/// Allowed extra descriptors after the load (the upstream connection).
const FD_MARGIN: usize = 2;

/// containerd lists images in no particular order.
fn sorted(mut list: cri::ListImagesResponse) -> cri::ListImagesResponse {
    list.images.sort_by(|a, b| a.id.cmp(&b.id));
    list
}

async fn mixed_call(
    channel: Channel,
    i: usize,
    expected_list: &cri::ListImagesResponse,
) -> Result<(), String> {
    let mut c = client(channel.clone());
    match i % 4 {
        0 => {
            let got = c
                .list_images(cri::ListImagesRequest::default())
                .await
                .map_err(|e| e.to_string())?
                .into_inner();
            if &sorted(got) != expected_list {
                return Err("ListImages differs from direct".into());
            }
        }
        1 => {
            let spec = cri::ImageSpec {
                image: format!("{ECR_HOST}/missing{i}:v1"),
                ..Default::default()
            };
            let got = c
                .image_status(cri::ImageStatusRequest {
                    image: Some(spec),
                    verbose: false,
                })
                .await
                .map_err(|e| e.to_string())?;
            if got.into_inner().image.is_some() {
                return Err("missing image reported present".into());
            }
        }
        2 => {
            let got = c
                .image_fs_info(cri::ImageFsInfoRequest {})
                .await
                .map_err(|e| e.to_string())?;
            if got.into_inner().image_filesystems.is_empty() {
                return Err("no image filesystem".into());
            }
        }
        _ => {
            let mut rt = cri::runtime_service_client::RuntimeServiceClient::new(channel);
            let v = rt
                .version(cri::VersionRequest {
                    version: "v1".into(),
                })
                .await
                .map_err(|e| e.to_string())?;
            if v.into_inner().runtime_name != "containerd" {
                return Err("Version: not containerd".into());
            }
        }
    }
    Ok(())
}

/// One round: 1,000 mixed calls, then 200 pulls of the 50 images, spread
/// over `channels`. Returns how long each half took.
async fn round(
    channels: &[Channel],
    expected_list: &cri::ListImagesResponse,
    images: &[String],
) -> (Duration, Duration) {
    let started = Instant::now();
    let calls: Vec<_> = (0..1000)
        .map(|i| {
            let (ch, expected) = (channels[i % channels.len()].clone(), expected_list.clone());
            tokio::spawn(async move { mixed_call(ch, i, &expected).await })
        })
        .collect();
    let mut failures = Vec::new();
    for c in calls {
        if let Err(e) = c.await.unwrap() {
            failures.push(e);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 1000 calls failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let mixed = started.elapsed();

    let started = Instant::now();
    let pulls: Vec<_> = (0..200)
        .map(|i| {
            let (ch, image) = (
                channels[i % channels.len()].clone(),
                images[i % images.len()].clone(),
            );
            tokio::spawn(async move {
                pull(ch, &image, None)
                    .await
                    .map_err(|e| format!("{image}: {e}"))
            })
        })
        .collect();
    for p in pulls {
        let image_ref = p.await.unwrap().expect("pull");
        assert!(image_ref.starts_with("sha256:"));
    }
    (mixed, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousand_mixed_calls_and_two_hundred_pulls_leave_no_trace() {
    let s = Stack::start(&[ECR_HOST, EU_HOST]);
    let repos: Vec<String> = (0..25).map(|i| format!("img{i}")).collect();
    for r in &repos {
        s.registry.push_image(r, &["v1"]);
    }
    let images: Vec<String> = [ECR_HOST, EU_HOST]
        .iter()
        .flat_map(|h| repos.iter().map(move |r| format!("{h}/{r}:v1")))
        .collect();
    assert_eq!(images.len(), 50);
    let proxy = s.proxy_with_env_args("p", "", s.moto.env(), vec!["--log-level", "info"]);
    // Idle means warmed up: the AWS SDK loaded, one token cached, one pull
    // and one call of each kind done, no client connected.
    {
        let ch = proxy.channel();
        pull(ch.clone(), &images[0], None)
            .await
            .expect("warm-up pull");
        pull(ch.clone(), &images[images.len() - 1], None)
            .await
            .expect("warm-up pull");
        let list = sorted(
            client(s.direct())
                .list_images(cri::ListImagesRequest::default())
                .await
                .unwrap()
                .into_inner(),
        );
        for i in 0..4 {
            mixed_call(ch.clone(), i, &list).await.unwrap();
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle_fds = proxy.fds();
    let idle_rss = proxy.rss_kib().0;

    let mut after = Vec::new();
    for n in 1..=2 {
        // Each round starts with none of the 50 images on the node, so
        // that both rounds download them all (round 2 is round 1 again).
        for image in &images {
            remove(s.direct(), image).await;
        }
        let downloaded_before = s.registry.blob_downloads();
        let expected_list = sorted(
            client(s.direct())
                .list_images(cri::ListImagesRequest::default())
                .await
                .unwrap()
                .into_inner(),
        );
        let channels: Vec<Channel> = (0..10).map(|_| proxy.channel()).collect();
        let (mixed, pulls) = round(&channels, &expected_list, &images).await;
        // Every image came from the registry: the config and layer of
        // each of the 25 repositories at least (both hosts' images of a
        // repository are the same one, which containerd fetches once).
        let downloaded = s.registry.blob_downloads() - downloaded_before;
        assert!(
            downloaded >= 2 * repos.len(),
            "round {n} downloaded {downloaded} blobs for {} repositories",
            repos.len()
        );
        let busy_fds = proxy.fds();
        drop(channels);
        support::eventually(
            Duration::from_secs(5),
            "client connections to close",
            || proxy.fds() <= idle_fds + FD_MARGIN,
        )
        .await;
        let (rss, peak) = proxy.rss_kib();
        let fds = proxy.fds();
        println!(
            "load round {n}: 1000 mixed calls in {mixed:?}, 200 pulls of 50 absent images ({downloaded} blobs downloaded) in {pulls:?}; RSS idle {idle_rss} KiB, peak {peak} KiB, after {rss} KiB; fds idle {idle_fds}, busy {busy_fds}, after {fds}"
        );
        after.push(rss);

        // Both regions' tokens were fetched once, in the first round.
        assert_eq!(s.moto.calls("GetAuthorizationToken", "us-east-1"), 1);
        assert_eq!(s.moto.calls("GetAuthorizationToken", "eu-west-1"), 1);
    }
    // The allocator keeps what the first round's peak needed; a second,
    // identical round must not need more: no growth per call.
    assert!(
        after[1] <= after[0] + RSS_MARGIN_KIB / 4,
        "RSS grew between identical rounds: {after:?} KiB"
    );
    assert!(
        after[1] <= idle_rss + RSS_MARGIN_KIB,
        "RSS: idle {idle_rss} KiB, after {} KiB",
        after[1]
    );
}
