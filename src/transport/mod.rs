//! The transport: the listening Unix socket, hyper's HTTP/2 server towards
//! callers, the shared h2 connection to containerd, and the service that
//! forwards every call between them (handing `PullImage` to
//! [`crate::pull`]).
//!
//! HTTP/2 is terminated on both sides by h2; nothing here reads or writes
//! a frame. Its limits are set once, here, as named constants.

pub mod server;
pub mod service;
pub mod socket;
pub mod upstream;

pub use service::{Proxy, ProxyBody};
pub use upstream::Upstream;

/// HTTP/2 flow-control window per stream, both sides. Large enough that a
/// multi-megabyte `ListImages` answer is not throttled by window updates.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// HTTP/2 flow-control window per connection, both sides.
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
