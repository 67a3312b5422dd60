//! The pod sandbox (pause) image. containerd pulls it itself inside
//! `RunPodSandbox`, outside CRI and with no credentials but its own, so a
//! node whose pause image lives in private ECR cannot start a pod whatever
//! kubelet has. The daemon makes sure it is there: it learns the reference
//! from containerd (or `sandbox_image`), and when the image matches a
//! pattern it checks its presence at start, whenever containerd answers
//! again, and every `sandbox_check_interval`, pulling it through its own
//! service (the ECR token, the pull line and metrics as for kubelet's
//! pulls) when it is missing. Failures back off and are retried; they
//! never stop the daemon or delay its socket.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use prost::Message;

use crate::call::final_status;
use crate::config::{SandboxConfig, SandboxImage};
use crate::containerd_config::{self, CriSetting};
use crate::cri;
use crate::ops::metrics::SandboxLabels;
use crate::transport::{Proxy, Upstream};

/// First wait after a failed check or pull.
pub const RETRY_MIN: Duration = Duration::from_secs(10);
/// Longest wait after repeated failures.
pub const RETRY_MAX: Duration = Duration::from_secs(5 * 60);

/// Where the sandbox image reference came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// `sandbox_image` in the daemon's config.
    Setting,
    /// containerd's CRI status (`config.sandboxImage`, containerd 1.x).
    CriStatus,
    /// containerd's config file.
    ConfigFile(PathBuf),
    /// containerd's built-in default for its version.
    BuiltIn(String),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Setting => f.write_str("sandbox_image in the config"),
            Source::CriStatus => f.write_str("containerd's CRI status"),
            Source::ConfigFile(p) => write!(f, "containerd's config file {}", p.display()),
            Source::BuiltIn(v) => write!(f, "containerd {v}'s built-in default"),
        }
    }
}

/// containerd's built-in sandbox image for its version (its CRI config's
/// default), for a containerd that names none.
pub fn builtin_default(containerd_version: &str) -> Option<&'static str> {
    let v = containerd_version.trim_start_matches('v');
    let image = if v.starts_with("1.6") {
        "registry.k8s.io/pause:3.6"
    } else if v.starts_with("1.7") {
        "registry.k8s.io/pause:3.8"
    } else if v.starts_with("2.") {
        "registry.k8s.io/pause:3.10"
    } else {
        return None;
    };
    Some(image)
}

/// The sandbox image reference from containerd 1.x's verbose CRI status:
/// its `config` entry is JSON with `sandboxImage`.
pub fn from_cri_status(info: &std::collections::HashMap<String, String>) -> Option<String> {
    let config: serde_json::Value = serde_json::from_str(info.get("config")?).ok()?;
    config
        .get("sandboxImage")?
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// Why the sandbox image could not be learned or looked after.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SandboxError(String);

/// One unary CRI call straight to the upstream: the answer's message.
async fn unary(
    upstream: &Arc<Upstream>,
    path: &str,
    message: Vec<u8>,
) -> Result<Bytes, SandboxError> {
    let req = Request::builder()
        .method(http::Method::POST)
        .uri(format!("http://localhost{path}"))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(Full::new(crate::pull::frame(&message)))
        .expect("static request");
    let resp = upstream
        .send(req)
        .await
        .map_err(|e| SandboxError(crate::error_chain(&e)))?;
    let (head, body) = resp.into_parts();
    let collected = body
        .collect()
        .await
        .map_err(|e| SandboxError(format!("{path}: {e}")))?;
    let status = final_status(&head.headers, collected.trailers());
    match status {
        Some(s) if s.code() == tonic::Code::Ok => {}
        Some(s) => {
            return Err(SandboxError(format!(
                "{path}: {:?}: {}",
                s.code(),
                s.message()
            )))
        }
        None => return Err(SandboxError(format!("{path}: no gRPC status"))),
    }
    let body = collected.to_bytes();
    crate::pull::unframe(&body)
        .map(Bytes::copy_from_slice)
        .map_err(|e| SandboxError(format!("{path}: {e}")))
}

/// Which sandbox image to look after, and where that came from; `None` for
/// `sandbox_image = "off"`.
pub async fn discover(
    upstream: &Arc<Upstream>,
    config: &SandboxConfig,
) -> Result<Option<(String, Source)>, SandboxError> {
    match &config.image {
        SandboxImage::Off => return Ok(None),
        SandboxImage::Image(r) => return Ok(Some((r.clone(), Source::Setting))),
        SandboxImage::Auto => {}
    }
    let status = unary(
        upstream,
        "/runtime.v1.RuntimeService/Status",
        cri::StatusRequest { verbose: true }.encode_to_vec(),
    )
    .await?;
    if let Some(image) = cri::StatusResponse::decode(status)
        .ok()
        .and_then(|s| from_cri_status(&s.info))
    {
        return Ok(Some((image, Source::CriStatus)));
    }
    // File reads, off the runtime thread.
    let main = config.containerd_config.clone();
    let from_file = tokio::task::spawn_blocking(move || {
        containerd_config::cri_setting_from_files(&main, CriSetting::SandboxImage)
    })
    .await
    .map_err(|e| SandboxError(format!("reading containerd's config: {e}")))?;
    if let Some((image, file)) = from_file {
        return Ok(Some((image, Source::ConfigFile(file))));
    }
    let version = unary(
        upstream,
        "/runtime.v1.RuntimeService/Version",
        cri::VersionRequest::default().encode_to_vec(),
    )
    .await?;
    let version = cri::VersionResponse::decode(version)
        .map(|v| v.runtime_version)
        .unwrap_or_default();
    match builtin_default(&version) {
        Some(image) => Ok(Some((image.to_owned(), Source::BuiltIn(version)))),
        None => Err(SandboxError(format!(
            "containerd {version:?} names no sandbox image in its CRI status or {}, and its default is not known; set sandbox_image",
            config.containerd_config.display()
        ))),
    }
}

/// Whether containerd has `image` (an `ImageStatus` that names an image).
pub async fn present(upstream: &Arc<Upstream>, image: &str) -> Result<bool, SandboxError> {
    let answer = unary(
        upstream,
        "/runtime.v1.ImageService/ImageStatus",
        cri::ImageStatusRequest {
            image: Some(cri::ImageSpec {
                image: image.to_owned(),
                ..Default::default()
            }),
            verbose: false,
        }
        .encode_to_vec(),
    )
    .await?;
    let status = cri::ImageStatusResponse::decode(answer)
        .map_err(|e| SandboxError(format!("ImageStatus answer: {e}")))?;
    Ok(status.image.is_some())
}

/// Pulls `image` through the proxy's own service: the ECR token is added
/// exactly as for kubelet's pulls, and the pull is logged and counted.
async fn pull(proxy: &Proxy, image: &str) -> Result<(), SandboxError> {
    let message = cri::PullImageRequest {
        image: Some(cri::ImageSpec {
            image: image.to_owned(),
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec();
    let req = Request::builder()
        .method(http::Method::POST)
        .uri("http://localhost/runtime.v1.ImageService/PullImage")
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(Full::new(crate::pull::frame(&message)))
        .expect("static request");
    let resp = proxy.handle(req).await;
    let (head, body) = resp.into_parts();
    let collected = body
        .collect()
        .await
        .map_err(|e| SandboxError(format!("PullImage: {e}")))?;
    match final_status(&head.headers, collected.trailers()) {
        Some(s) if s.code() == tonic::Code::Ok => Ok(()),
        Some(s) => Err(SandboxError(format!("{:?}: {}", s.code(), s.message()))),
        None => Err(SandboxError("PullImage: no gRPC status".into())),
    }
}

/// Looks after the sandbox image until the process ends (spawned once the
/// socket listens).
pub async fn keep_present(proxy: Proxy, config: SandboxConfig) {
    let upstream = proxy.upstream().clone();
    let metrics = proxy.metrics().clone();
    let mut backoff = RETRY_MIN;
    // What the last check learned: the image, and whether it gets a token.
    // Learned again at every check, so a containerd reconfigured to another
    // pause image, or a reload that changes the patterns, is followed; the
    // log speaks when either changes.
    let mut known: Option<(String, bool)> = None;
    loop {
        tracing::debug!("learning the sandbox image");
        let next = match discover(&upstream, &config).await {
            Ok(None) => return,
            // containerd may not answer yet at boot, or be down for a while.
            Err(e) => {
                if known.is_none() {
                    tracing::warn!(error = %e, retry_in_s = backoff.as_secs(), "cannot learn the sandbox image yet");
                } else {
                    tracing::debug!(error = %e, retry_in_s = backoff.as_secs(), "cannot learn the sandbox image");
                }
                let wait = backoff;
                backoff = (backoff * 2).min(RETRY_MAX);
                wait
            }
            Ok(Some((image, source))) => {
                let matched = proxy.resolver().target(&image).is_some();
                if known.as_ref() != Some(&(image.clone(), matched)) {
                    if matched {
                        tracing::info!(image = %image, source = %source, "looking after the sandbox image");
                        backoff = RETRY_MIN;
                    } else {
                        tracing::info!(image = %image, source = %source, "sandbox image matches no pattern; containerd pulls it with its own credentials");
                        metrics.sandbox_present.set(0);
                    }
                    known = Some((image.clone(), matched));
                }
                if matched {
                    check_and_pull(&proxy, &image, &mut backoff, config.check_interval).await
                } else {
                    config.check_interval
                }
            }
        };
        wait(&upstream, next).await;
    }
}

/// One check of `image`, pulling it when it is missing; how long to wait
/// before the next.
async fn check_and_pull(
    proxy: &Proxy,
    image: &str,
    backoff: &mut Duration,
    check_interval: Duration,
) -> Duration {
    let metrics = proxy.metrics();
    let failed = |backoff: &mut Duration| {
        let wait = *backoff;
        *backoff = (*backoff * 2).min(RETRY_MAX);
        wait
    };
    match present(proxy.upstream(), image).await {
        Ok(true) => {
            metrics.sandbox_present.set(1);
            *backoff = RETRY_MIN;
            check_interval
        }
        Ok(false) => {
            metrics.sandbox_present.set(0);
            tracing::info!(image = %image, "sandbox image missing; pulling it");
            let result = pull(proxy, image).await;
            let labels = SandboxLabels {
                result: if result.is_ok() { "ok" } else { "error" },
            };
            metrics.sandbox_pulls.get_or_create(&labels).inc();
            match result {
                Ok(()) => {
                    metrics.sandbox_present.set(1);
                    *backoff = RETRY_MIN;
                    check_interval
                }
                Err(e) => {
                    tracing::warn!(image = %image, error = %e, retry_in_s = backoff.as_secs(), "sandbox image pull failed");
                    failed(backoff)
                }
            }
        }
        Err(e) => {
            tracing::debug!(image = %image, error = %e, "cannot check the sandbox image");
            failed(backoff)
        }
    }
}

/// Waits `d`, or until containerd answers again after it was unreachable.
async fn wait(upstream: &Upstream, d: Duration) {
    tokio::select! {
        () = tokio::time::sleep(d) => {}
        () = upstream.answers_again() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_defaults_follow_containerd_versions() {
        assert_eq!(
            builtin_default("1.6.20~ds1"),
            Some("registry.k8s.io/pause:3.6")
        );
        assert_eq!(
            builtin_default("v1.7.13"),
            Some("registry.k8s.io/pause:3.8")
        );
        assert_eq!(builtin_default("2.0.0"), Some("registry.k8s.io/pause:3.10"));
        assert_eq!(builtin_default("1.5.0"), None);
    }

    #[test]
    fn cri_status_names_the_sandbox_image_of_containerd_one() {
        let mut info = std::collections::HashMap::new();
        info.insert(
            "config".to_owned(),
            r#"{"sandboxImage":"602401143452.dkr.ecr.us-west-2.amazonaws.com/eks/pause:3.5","registry":{}}"#.to_owned(),
        );
        assert_eq!(
            from_cri_status(&info).as_deref(),
            Some("602401143452.dkr.ecr.us-west-2.amazonaws.com/eks/pause:3.5")
        );
        info.insert("config".into(), "{}".into());
        assert_eq!(from_cri_status(&info), None);
        assert_eq!(from_cri_status(&Default::default()), None);
    }
}
