//! The transport: the listening Unix socket, hyper's HTTP/2 server towards
//! callers, an h2 connection to containerd per client connection, and the
//! service that forwards every call between them (handing `PullImage` to
//! [`crate::pull`]).
//!
//! HTTP/2 is terminated on both sides by h2; nothing here reads or writes
//! a frame. Its limits are named constants: towards callers in [`server`],
//! towards containerd in [`upstream`].

pub mod connections;
pub mod server;
pub mod service;
pub mod socket;
pub mod upstream;

pub use service::Proxy;
pub use upstream::Upstream;
