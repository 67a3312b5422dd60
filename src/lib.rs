//! ecr-pull-proxy: a CRI image-service proxy that adds Amazon ECR
//! credentials to `PullImage` calls on their way to containerd.
//!
//! Data goes one way: [`transport`] (the socket, hyper's HTTP/2 server, the
//! service every call goes through, an h2 connection to containerd per
//! client connection) → for `PullImage`, [`pull`] (wire-level read and rewrite,
//! credential policy, matching through [`image_ref`] and [`matcher`]) →
//! [`ecr`] (token cache and source) → back to the upstream. [`sandbox`]
//! keeps containerd's pause image present through the same service. [`ops`]
//! is the operator's side (metrics, health, `check`, reload); [`config`] is
//! read and validated before anything is bound. Below them all, [`call`]
//! (what every floor of a call shares) and [`budget`] (the memory budget
//! for `PullImage` messages).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod budget;
pub mod call;
pub mod config;
pub mod containerd_config;
pub mod ecr;
pub mod error;
pub mod image_ref;
pub mod logging;
pub mod matcher;
pub mod ops;
pub mod pull;
pub mod sandbox;
pub mod signal;
pub mod transport;

/// The CRI `runtime.v1` types and clients, generated from `proto/api.proto`.
#[allow(missing_docs, clippy::all)]
pub mod cri {
    tonic::include_proto!("runtime.v1");

    /// Shows which credential fields are set, never their values (the
    /// generated `Debug` would print the password, `auth` and tokens of
    /// every `PullImageRequest` it met).
    impl std::fmt::Debug for AuthConfig {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            let set = |v: &str| if v.is_empty() { "" } else { "<redacted>" };
            f.debug_struct("AuthConfig")
                .field("username", &self.username)
                .field("password", &set(&self.password))
                .field("auth", &set(&self.auth))
                .field("server_address", &self.server_address)
                .field("identity_token", &set(&self.identity_token))
                .field("registry_token", &set(&self.registry_token))
                .finish()
        }
    }
}

use std::sync::Arc;

use config::Config;

pub use error::error_chain;

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The socket could not be set up.
    #[error(transparent)]
    Socket(#[from] transport::socket::SocketError),
    /// The metrics endpoint could not be bound.
    #[error(transparent)]
    Admin(#[from] ops::admin::AdminError),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers")]
    Signal(#[source] std::io::Error),
}

/// Runs the daemon until SIGTERM/SIGINT; SIGHUP reloads the configuration
/// `cli` points at.
pub async fn run(cli: config::Cli, config: Config) -> Result<(), RunError> {
    let metrics = Arc::new(ops::metrics::Metrics::new());
    let source = Arc::new(ecr::aws::AwsSource::new(
        config.credentials.aws_timeout,
        metrics.clone(),
    ));
    let cache = ecr::TokenCache::new(source, config.credentials.max_token_age, metrics.clone());
    let resolver = pull::credentials::Resolver::new(
        config.credentials.clone(),
        config.sandbox.containerd_config.clone(),
        cache.clone(),
    );
    let upstream = transport::Upstream::new(&config.upstream, metrics.upstream_up.clone());
    let proxy = transport::Proxy::new(upstream, resolver, metrics.clone());
    let shutdown = signal::shutdown().map_err(RunError::Signal)?;
    // Installed before READY: SIGHUP's default action would end the process.
    let hangups = signal::hangups().map_err(RunError::Signal)?;
    tokio::spawn(ops::reload::on_hangup(
        hangups,
        cli,
        config.clone(),
        proxy.clone(),
        cache,
    ));
    let admin = match &config.metrics_listen {
        Some(addr) => Some(ops::admin::bind(addr).await?),
        None => None,
    };
    let listening =
        transport::socket::bind(&config.listen, config.socket_mode, config.socket_group)?;
    if let Some(admin) = admin {
        tokio::spawn(ops::admin::serve(admin, proxy.clone(), metrics.clone()));
    }
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        listen = %config.listen.display(),
        upstream = %config.upstream.display(),
        existing_credentials = %config.credentials.existing_credentials,
        patterns = config.credentials.ecr_patterns.len(),
        registries = config.credentials.registries.len(),
        metrics = %config.metrics_listen.as_ref().map(ToString::to_string).unwrap_or_else(|| "off".into()),
        "listening"
    );
    transport::socket::notify_ready();
    // The socket serves first; the sandbox image is looked after beside it.
    tokio::spawn(sandbox::keep_present(proxy.clone(), config.sandbox.clone()));
    transport::server::serve(listening, proxy, shutdown, config.shutdown_grace).await;
    Ok(())
}
