//! What every floor of a call shares, below both [`crate::transport`] and
//! [`crate::pull`]: the answer body type, trailers-only status answers,
//! reading a gRPC answer's final status, and [`Forward`], the way to the
//! upstream that the transport hands to `pull/` for each call.

use std::future::Future;
use std::path::Path;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::Body;
use http_body_util::BodyExt;

use crate::error::{error_chain, status_for, BoxError, ProxyError};

/// The one method whose request is read.
pub const PULL_IMAGE_PATH: &str = "/runtime.v1.ImageService/PullImage";

/// The body type of requests and answers the proxy builds itself or boxes
/// once.
pub type ProxyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// Boxes a body into the proxy's body type.
pub fn boxed<B>(body: B) -> ProxyBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// A trailers-only answer carrying `status`.
pub fn status_response(status: &tonic::Status) -> Response<ProxyBody> {
    status.clone().into_http()
}

/// The answer to a call that failed in the proxy, logged.
pub fn failed(method: &str, e: &ProxyError) -> Response<ProxyBody> {
    tracing::warn!(method, error = %error_chain(e), "call failed");
    status_response(&status_for(e))
}

/// The final status of a gRPC answer: in the trailers, or in the headers of
/// a trailers-only answer.
pub fn final_status(headers: &HeaderMap, trailers: Option<&HeaderMap>) -> Option<tonic::Status> {
    trailers
        .and_then(tonic::Status::from_header_map)
        .or_else(|| tonic::Status::from_header_map(headers))
}

/// The future [`Forward::forward`] returns: boxed and borrowing nothing,
/// so that a call's future is `Send` without the compiler having to look
/// through it.
pub type Forwarded =
    std::pin::Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, ProxyError>> + Send>>;

/// Sends a request to the upstream and gives back its answer, streamed.
/// The transport implements it (a cheap handle to one upstream
/// connection); `pull/` only calls it. `forward` takes the handle by value
/// so that its future borrows nothing.
pub trait Forward: Clone + Send + Sync + 'static {
    /// Sends `req` and returns the answer's head and body.
    fn forward(self, req: Request<ProxyBody>) -> Forwarded;
    /// The upstream socket, for error messages.
    fn path(&self) -> &Path;
}
