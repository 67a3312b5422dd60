//! Errors of a call, and the one place they become the gRPC status a caller
//! sees. The message carries the whole cause chain, because kubelet shows
//! only the message in the pod's events; it never carries a secret.

use std::path::PathBuf;

use tonic::{Code, Status};

use crate::ecr::{ErrorKind, SourceError};

/// Error type of bodies flowing through the proxy.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Everything that can fail while the proxy handles a call. [`status_for`]
/// turns each into the gRPC status the caller gets.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The upstream socket could not be reached, or dropped the call.
    #[error("upstream {} unavailable", path.display())]
    Upstream {
        /// The upstream socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: BoxError,
    },
    /// The upstream reset this one call (the connection is fine).
    #[error("upstream {} reset the call ({reason})", path.display())]
    Reset {
        /// The upstream socket.
        path: PathBuf,
        /// The HTTP/2 error code it gave.
        reason: h2::Reason,
    },
    /// No ECR token could be had for a matching image.
    #[error(
        "cannot get ECR credentials for image {image:?} (registry {registry}, region {region})"
    )]
    Credentials {
        /// The image being pulled.
        image: String,
        /// Its registry host.
        registry: String,
        /// The region asked.
        region: String,
        /// What AWS said.
        #[source]
        source: SourceError,
    },
    /// The request message is larger than the limit.
    #[error("PullImage request is larger than {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// Reading the message would pass a buffering budget.
    #[error("PullImage messages in flight on {scope} would take more than the {limit} bytes allowed; try again")]
    Budget {
        /// What the budget covers.
        scope: &'static str,
        /// The budget, in bytes.
        limit: usize,
    },
    /// The message did not arrive in time.
    #[error("the PullImage message did not arrive within {}s", limit.as_secs())]
    SlowRequest {
        /// The time allowed.
        limit: std::time::Duration,
    },
    /// The request body could not be read from the caller.
    #[error("reading the PullImage request from the caller")]
    RequestBody {
        /// Why.
        #[source]
        source: BoxError,
    },
    /// The image's ECR host names a region its partition does not have.
    #[error(
        "image {image:?}: region {region:?} is not a region of AWS partition {partition} known to this release; if AWS opened it since, add it to extra_regions in the config"
    )]
    UnknownRegion {
        /// The image being pulled.
        image: String,
        /// The region its host names.
        region: String,
        /// The partition its host's DNS suffix says.
        partition: &'static str,
    },
    /// The upstream answer to a PullImage could not be read.
    #[error("reading the PullImage answer from upstream {}", path.display())]
    ResponseBody {
        /// The upstream socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: BoxError,
    },
}

/// Maps an error to the status the caller gets.
pub fn status_for(err: &ProxyError) -> Status {
    let code = match err {
        ProxyError::Upstream { .. } | ProxyError::ResponseBody { .. } => Code::Unavailable,
        ProxyError::Reset { reason, .. } => code_for_reset(*reason),
        ProxyError::Credentials { source, .. } => match source.kind {
            ErrorKind::AccessDenied => Code::PermissionDenied,
            ErrorKind::NoCredentials => Code::Unauthenticated,
            ErrorKind::Network | ErrorKind::Timeout | ErrorKind::Throttled => Code::Unavailable,
            ErrorKind::BadToken | ErrorKind::Other => Code::Unavailable,
        },
        ProxyError::TooLarge { .. } | ProxyError::Budget { .. } => Code::ResourceExhausted,
        ProxyError::SlowRequest { .. } => Code::DeadlineExceeded,
        ProxyError::RequestBody { .. } => Code::Cancelled,
        ProxyError::UnknownRegion { .. } => Code::InvalidArgument,
    };
    Status::new(code, format!("ecr-pull-proxy: {}", error_chain(err)))
}

/// The code a gRPC client gives a stream reset with `reason` (grpc-go's
/// `http2ErrConvTab`), so that a reset the upstream sent reads the same
/// through the proxy as direct.
pub fn code_for_reset(reason: h2::Reason) -> Code {
    match reason {
        h2::Reason::REFUSED_STREAM => Code::Unavailable,
        h2::Reason::CANCEL => Code::Cancelled,
        h2::Reason::ENHANCE_YOUR_CALM => Code::ResourceExhausted,
        h2::Reason::INADEQUATE_SECURITY => Code::PermissionDenied,
        _ => Code::Internal,
    }
}

/// `err: cause: cause` on one line, built from `Display` only (never
/// `Debug`, which for SDK errors can include whole HTTP exchanges). Used for
/// every error message and log field.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let text = e.to_string();
        // Some libraries repeat their source in their own message.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = e.source();
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("middle: inner\nsecond line")]
    struct Middle(#[source] std::io::Error);

    #[test]
    fn error_chain_is_one_line_of_display_texts() {
        let e = Outer(Middle(std::io::Error::other("inner\nsecond line")));
        assert_eq!(error_chain(&e), "outer: middle: inner second line");
    }

    #[test]
    fn credential_errors_map_to_codes_and_name_everything() {
        let err = |kind| ProxyError::Credentials {
            image: "123456789012.dkr.ecr.us-east-1.amazonaws.com/app:v1".into(),
            registry: "123456789012.dkr.ecr.us-east-1.amazonaws.com".into(),
            region: "us-east-1".into(),
            source: SourceError::new(kind, Some("AccessDeniedException".into()), "not allowed"),
        };
        let s = status_for(&err(ErrorKind::AccessDenied));
        assert_eq!(s.code(), Code::PermissionDenied);
        for needle in [
            "123456789012.dkr.ecr.us-east-1.amazonaws.com/app:v1",
            "us-east-1",
            "AccessDeniedException",
            "not allowed",
        ] {
            assert!(s.message().contains(needle), "{}", s.message());
        }
        for kind in [ErrorKind::Network, ErrorKind::Timeout, ErrorKind::Throttled] {
            assert_eq!(status_for(&err(kind)).code(), Code::Unavailable);
        }
        assert_eq!(
            status_for(&err(ErrorKind::NoCredentials)).code(),
            Code::Unauthenticated
        );
        assert_eq!(
            status_for(&ProxyError::TooLarge { limit: 1 }).code(),
            Code::ResourceExhausted
        );
    }

    #[test]
    fn upstream_resets_read_as_grpc_clients_read_them() {
        let reset = |reason| {
            status_for(&ProxyError::Reset {
                path: "/run/c.sock".into(),
                reason,
            })
        };
        assert_eq!(reset(h2::Reason::REFUSED_STREAM).code(), Code::Unavailable);
        assert_eq!(reset(h2::Reason::CANCEL).code(), Code::Cancelled);
        assert_eq!(reset(h2::Reason::INTERNAL_ERROR).code(), Code::Internal);
        assert!(reset(h2::Reason::CANCEL).message().contains("/run/c.sock"));
    }
}
