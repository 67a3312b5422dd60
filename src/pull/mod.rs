//! What a `PullImage` becomes: the request collected (bounded) and read at
//! the wire level ([`wire`]), the image matched and credentials decided
//! ([`credentials`]) under the `existing_credentials` policy
//! (`fallback`/`keep`/`replace`), the rewritten request sent on, and the
//! per-pull log line and metrics.
//!
//! Nothing here reads a frame or knows about sockets: requests and answers
//! are `http` values, sent through the [`Forward`] the transport hands in,
//! and the message is read within the caller's [`ConnectionBudget`].

pub mod credentials;
pub mod wire;

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use tonic::Code;

pub use wire::{frame, read, unframe, with_credentials, Credentials, WireError, GRPC_HEADER_LEN};

use crate::budget::{ConnectionBudget, Held, MAX_PULL_MESSAGE_SIZE, PULL_MESSAGE_TIMEOUT};
use crate::call::{
    boxed, failed, final_status, status_response, Forward, ProxyBody, PULL_IMAGE_PATH,
};
use crate::config::{ExistingCredentials, MAX_MESSAGE_SIZE};
use crate::ecr::CacheOutcome;
use crate::error::{error_chain, status_for, BoxError, ProxyError};
use crate::logging::Escaped;
use crate::ops::metrics::{Metrics, PullLabels};
use credentials::{Resolver, Target};

/// The `registry` label of pulls that got no token from a configured rule
/// (no match, or a region no partition has).
pub const OTHER_REGISTRY: &str = "other";

/// How the credentials of a forwarded pull were decided, for logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialSourceKind {
    /// The proxy added an ECR token.
    Injected,
    /// The caller's own credentials were forwarded.
    Caller,
    /// The caller's credentials were refused and the ECR token was used.
    Fallback,
    /// The image matched no pattern; forwarded as it was.
    None,
    /// The image matched, but no token could be had: the pull failed in
    /// the proxy (its message says why).
    NoToken,
}

impl CredentialSourceKind {
    /// Lower-case name, for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Injected => "injected",
            Self::Caller => "caller",
            Self::Fallback => "fallback",
            Self::None => "none",
            Self::NoToken => "no-token",
        }
    }
}

/// What the per-pull log line says, filled in as the pull is handled and
/// written when the answer ends (the final status is in the trailers).
pub struct PullRecord {
    image: String,
    registry: String,
    /// The `registry` label: what the configuration decided (the token key:
    /// service, partition, region, endpoint variant, configured role), never
    /// the image's own host, which the caller chooses.
    label: String,
    credentials: CredentialSourceKind,
    cache: Option<CacheOutcome>,
}

impl PullRecord {
    fn new(
        image: &str,
        target: Option<&Target>,
        credentials: CredentialSourceKind,
        cache: Option<CacheOutcome>,
    ) -> Self {
        let label = match (credentials, target) {
            (CredentialSourceKind::None, _) | (_, None) => OTHER_REGISTRY.to_owned(),
            (_, Some(t)) => t.key.to_string(),
        };
        PullRecord {
            image: image.to_owned(),
            registry: target.map(|t| t.image_host.clone()).unwrap_or_default(),
            label,
            credentials,
            cache,
        }
    }

    /// Counts the pull and writes its log line. `outcome` is how the answer
    /// ended (`complete`, `cancelled`, `upstream-error`).
    pub fn finish(&self, metrics: &Metrics, outcome: &str, grpc_status: &str, elapsed: Duration) {
        let result = match (outcome, grpc_status) {
            ("complete", "0") => "ok",
            ("cancelled", _) => "cancelled",
            _ => "error",
        };
        metrics
            .pulls
            .get_or_create(&PullLabels {
                registry: self.label.clone(),
                result,
                credentials: self.credentials.as_str(),
            })
            .inc();
        tracing::info!(
            image = %Escaped(&self.image),
            registry = %self.registry,
            credentials = self.credentials.as_str(),
            cache = self.cache.map(CacheOutcome::as_str).unwrap_or("-"),
            duration_ms = elapsed.as_millis() as u64,
            result,
            grpc_status,
            "pull"
        );
    }
}

/// Handles one `PullImage`: reads it, decides on credentials and forwards
/// it. `record` is filled in as soon as the image is known, so that a pull
/// the caller cancels is still logged.
pub async fn pull_image<B, F: Forward>(
    upstream: F,
    budget: &ConnectionBudget,
    resolver: &Resolver,
    req: Request<B>,
    record: &mut Option<PullRecord>,
) -> Response<ProxyBody>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let pull = Pull { upstream };
    let (parts, body) = req.into_parts();
    // Given back when the pull has been forwarded (this function returns).
    let mut held = Held::default();
    let reading = read_limited(body, budget, &mut held);
    let received = match tokio::time::timeout(PULL_MESSAGE_TIMEOUT, reading).await {
        Ok(r) => r,
        Err(_) => Err(ProxyError::SlowRequest {
            limit: PULL_MESSAGE_TIMEOUT,
        }),
    };
    let (body, request_trailers) = match received {
        Ok(v) => v,
        Err(err) => {
            tracing::warn!(error = %error_chain(&err), "PullImage refused");
            return status_response(&status_for(&err));
        }
    };
    let parsed = unframe(&body).and_then(|m| read(m).map(|info| (m, info)));
    let (message, info) = match parsed {
        Ok(v) => v,
        Err(e) => {
            // Not ours to judge: containerd answers malformed requests with
            // its own error.
            tracing::debug!(error = %e, "PullImage request not readable; forwarding it unchanged");
            return pull.send(&parts, body, request_trailers).await;
        }
    };
    let Some(target) = resolver.target(&info.image) else {
        *record = Some(PullRecord::new(
            &info.image,
            None,
            CredentialSourceKind::None,
            None,
        ));
        return pull.send(&parts, body, request_trailers).await;
    };
    if !resolver.region_known(&target) {
        let err = ProxyError::UnknownRegion {
            image: info.image.clone(),
            region: target.key.region.clone(),
            partition: target.key.partition,
        };
        tracing::warn!(registry = %Escaped(&target.image_host), error = %error_chain(&err), "PullImage refused");
        *record = Some(PullRecord::new(
            &info.image,
            None,
            CredentialSourceKind::NoToken,
            None,
        ));
        return status_response(&status_for(&err));
    }
    let policy = resolver.existing_credentials();
    if info.has_credentials && policy == ExistingCredentials::Keep {
        *record = Some(PullRecord::new(
            &info.image,
            Some(&target),
            CredentialSourceKind::Caller,
            None,
        ));
        return pull.send(&parts, body, request_trailers).await;
    }
    // No credentials, policy `replace`, or `fallback` after a refusal.
    let kind = if info.has_credentials && policy == ExistingCredentials::Fallback {
        *record = Some(PullRecord::new(
            &info.image,
            Some(&target),
            CredentialSourceKind::Caller,
            None,
        ));
        let first = pull
            .send_buffered(&parts, body.clone(), request_trailers.clone())
            .await;
        let refused = match &first {
            Ok((head, collected)) => is_registry_refusal(&head.headers, collected.trailers()),
            Err(_) => false,
        };
        if !refused {
            return match first {
                Ok((head, answer)) => Response::from_parts(head, answer.into_body()),
                Err(e) => failed(PULL_IMAGE_PATH, &e),
            };
        }
        tracing::info!(
            image = %Escaped(&info.image),
            registry = %target.image_host,
            "registry refused the caller's credentials; retrying once with the ECR token"
        );
        CredentialSourceKind::Fallback
    } else {
        CredentialSourceKind::Injected
    };
    pull.with_token(
        resolver,
        &parts,
        message,
        &info.image,
        &target,
        kind,
        record,
    )
    .await
}

/// One pull's way to the upstream.
struct Pull<F> {
    upstream: F,
}

impl<F: Forward> Pull<F> {
    #[allow(clippy::too_many_arguments)]
    async fn with_token(
        &self,
        resolver: &Resolver,
        parts: &http::request::Parts,
        message: &[u8],
        image: &str,
        target: &Target,
        kind: CredentialSourceKind,
        record: &mut Option<PullRecord>,
    ) -> Response<ProxyBody> {
        *record = Some(PullRecord::new(image, Some(target), kind, None));
        let (credentials, outcome) = match resolver.credentials(target).await {
            Ok(v) => v,
            Err(source) => {
                let err = ProxyError::Credentials {
                    image: image.to_owned(),
                    registry: target.image_host.clone(),
                    region: target.key.region.clone(),
                    source,
                };
                if target.anonymous_on_failure {
                    tracing::warn!(
                        image = %Escaped(image),
                        registry = %target.image_host,
                        error = %error_chain(&err),
                        "no token; forwarding the pull without one (anonymous unless the caller sent credentials)"
                    );
                    *record = Some(PullRecord::new(
                        image,
                        Some(target),
                        CredentialSourceKind::None,
                        None,
                    ));
                    return self.send(parts, frame(message), None).await;
                }
                tracing::warn!(
                    image = %Escaped(image),
                    registry = %target.image_host,
                    key = %target.key,
                    error = %error_chain(&err),
                    "no ECR token for this pull"
                );
                *record = Some(PullRecord::new(
                    image,
                    Some(target),
                    CredentialSourceKind::NoToken,
                    None,
                ));
                return status_response(&status_for(&err));
            }
        };
        *record = Some(PullRecord::new(image, Some(target), kind, Some(outcome)));
        let destination = resolver.destination(target).await;
        tracing::debug!(image = %Escaped(image), token_to = %destination, "token scoped to the host containerd pulls from");
        let body = match with_credentials(message, &credentials, &destination) {
            Ok(m) => frame(&m),
            Err(e) => {
                // `read` accepted these bytes, and the rewrite walks them the
                // same way; if that ever fails, forward unchanged, never panic.
                tracing::error!(error = %e, "PullImage rewrite failed; forwarding unchanged");
                frame(message)
            }
        };
        self.send(parts, body, None).await
    }

    /// Sends the (possibly rewritten) request and streams the answer back.
    // The futures of `send` and `send_buffered` own what they need and
    // borrow nothing of `self`.
    fn send(
        &self,
        parts: &http::request::Parts,
        body: Bytes,
        trailers: Option<HeaderMap>,
    ) -> impl std::future::Future<Output = Response<ProxyBody>> + Send + 'static {
        let forwarded = self
            .upstream
            .clone()
            .forward(request_from(parts, body, trailers));
        // The mutation .ci/test checks the cancellation tests against: the
        // call goes on in a task of its own when the caller's stream ends.
        #[cfg(feature = "mutation-detach-upstream")]
        let forwarded = {
            let detached = tokio::spawn(forwarded);
            async move { detached.await.expect("the detached upstream call") }
        };
        async move {
            match forwarded.await {
                Ok(r) => r,
                Err(e) => failed(PULL_IMAGE_PATH, &e),
            }
        }
    }

    /// Sends and reads the whole answer, so that it can be inspected before
    /// the caller sees it (the `fallback` policy).
    fn send_buffered(
        &self,
        parts: &http::request::Parts,
        body: Bytes,
        trailers: Option<HeaderMap>,
    ) -> impl std::future::Future<Output = Result<(http::response::Parts, Answer), ProxyError>>
           + Send
           + 'static {
        let path = self.upstream.path().to_owned();
        let forwarded = self
            .upstream
            .clone()
            .forward(request_from(parts, body, trailers));
        async move {
            let (head, mut body) = forwarded.await?.into_parts();
            let limit = MAX_MESSAGE_SIZE + GRPC_HEADER_LEN;
            let mut answer = Answer::default();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|source| ProxyError::ResponseBody {
                    path: path.clone(),
                    source,
                })?;
                match frame.into_data() {
                    Ok(d) if answer.data.len() + d.len() > limit => {
                        return Err(ProxyError::ResponseBody {
                            path,
                            source: format!("answer larger than {limit} bytes").into(),
                        })
                    }
                    Ok(d) => answer.data.extend_from_slice(&d),
                    Err(frame) => answer.trailers = frame.into_trailers().ok(),
                }
            }
            Ok((head, answer))
        }
    }
}

/// An upstream answer read whole (bounded): its data and trailers.
#[derive(Default)]
struct Answer {
    data: bytes::BytesMut,
    trailers: Option<HeaderMap>,
}

impl Answer {
    fn trailers(&self) -> Option<&HeaderMap> {
        self.trailers.as_ref()
    }

    /// The answer as a body again, for the caller.
    fn into_body(self) -> ProxyBody {
        let full = Full::new(self.data.freeze());
        match self.trailers {
            None => boxed(full),
            Some(t) => boxed(full.with_trailers(std::future::ready(Some(Ok(t))))),
        }
    }
}

/// Rebuilds a request from its head and a (possibly rewritten) body. A
/// `content-length` the caller sent is corrected; none is added when the
/// caller sent none, so the upstream sees the same headers.
fn request_from(
    parts: &http::request::Parts,
    body: Bytes,
    trailers: Option<HeaderMap>,
) -> Request<ProxyBody> {
    let mut headers = parts.headers.clone();
    if headers.contains_key(http::header::CONTENT_LENGTH) {
        headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    let full = Full::new(body);
    let body = match trailers {
        None => boxed(NoLength(full)),
        Some(t) => boxed(NoLength(
            full.with_trailers(std::future::ready(Some(Ok(t)))),
        )),
    };
    let mut req = Request::builder()
        .method(parts.method.clone())
        .uri(parts.uri.clone())
        .version(parts.version)
        .body(body)
        .expect("parts of a valid request");
    *req.headers_mut() = headers;
    req
}

/// Reads a `PullImage` request body (one gRPC message: at most
/// [`MAX_PULL_MESSAGE_SIZE`] plus its header) and its trailers, each chunk
/// taken from `budget` into `held` as it arrives.
async fn read_limited<B>(
    mut body: B,
    budget: &ConnectionBudget,
    held: &mut Held,
) -> Result<(Bytes, Option<HeaderMap>), ProxyError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let limit = MAX_PULL_MESSAGE_SIZE + GRPC_HEADER_LEN;
    let mut data = bytes::BytesMut::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ProxyError::RequestBody { source: e.into() })?;
        match frame.into_data() {
            Ok(d) => {
                if data.len() + d.len() > limit {
                    return Err(ProxyError::TooLarge {
                        limit: MAX_PULL_MESSAGE_SIZE,
                    });
                }
                budget.take(held, d.len()).map_err(|e| ProxyError::Budget {
                    scope: e.scope(),
                    limit: e.limit(),
                })?;
                data.extend_from_slice(&d);
                // The gRPC header announces the message's length: refuse an
                // oversized one before its bytes arrive.
                if let Some(announced) = data.get(1..GRPC_HEADER_LEN) {
                    let announced =
                        u32::from_be_bytes(announced.try_into().expect("4 bytes")) as usize;
                    if announced > MAX_PULL_MESSAGE_SIZE {
                        return Err(ProxyError::TooLarge {
                            limit: MAX_PULL_MESSAGE_SIZE,
                        });
                    }
                }
            }
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    Ok((data.freeze(), trailers))
}

/// Whether containerd's answer says the registry refused the credentials.
/// containerd reports this inside an `Unknown` status with wording that
/// differs across versions and code paths.
pub fn is_registry_refusal(headers: &HeaderMap, trailers: Option<&HeaderMap>) -> bool {
    let Some(status) = final_status(headers, trailers) else {
        return false;
    };
    if !matches!(
        status.code(),
        Code::Unknown | Code::Unauthenticated | Code::PermissionDenied
    ) {
        return false;
    }
    let message = status.message().to_ascii_lowercase();
    REFUSAL_PHRASES.iter().any(|p| message.contains(p))
}

/// How containerd words a registry's refusal, lower-cased.
pub const REFUSAL_PHRASES: &[&str] = &[
    "401 unauthorized",
    "403 forbidden",
    "authorization failed",
    "pull access denied",
    "no basic auth credentials",
];

/// A body that does not announce its length, so that h2 adds no
/// `content-length` the caller did not send.
struct NoLength<B>(B);

impl<B: Body + Unpin> Body for NoLength<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.0).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Status;

    fn trailers(code: i32, message: &str) -> HeaderMap {
        status_response(&Status::new(Code::from(code), message))
            .headers()
            .clone()
    }

    #[test]
    fn registry_refusals_are_recognised_in_every_wording() {
        let refusals = [
            "failed to pull and unpack image \"x\": failed to resolve reference \"x\": unexpected status from HEAD request to http://r/v2/app/manifests/v1: 401 Unauthorized",
            "failed to resolve reference: pulling from host r failed with status code [manifests v1]: 403 Forbidden",
            "failed to fetch anonymous token: authorization failed",
            "pull access denied, repository does not exist or may require authorization",
            "no basic auth credentials",
        ];
        for m in refusals {
            assert!(
                is_registry_refusal(&HeaderMap::new(), Some(&trailers(2, m))),
                "{m}"
            );
        }
    }

    #[test]
    fn other_failures_are_not_refusals() {
        let h = HeaderMap::new();
        assert!(!is_registry_refusal(
            &h,
            Some(&trailers(2, "failed to resolve reference: not found"))
        ));
        assert!(!is_registry_refusal(
            &h,
            Some(&trailers(2, "dial tcp: connection refused"))
        ));
        assert!(!is_registry_refusal(
            &h,
            Some(&trailers(14, "401 Unauthorized"))
        ));
        assert!(!is_registry_refusal(&h, Some(&trailers(0, ""))));
        assert!(!is_registry_refusal(&h, None));
        // Trailers-only answers carry the status in the headers.
        assert!(is_registry_refusal(&trailers(2, "401 Unauthorized"), None));
    }
}
