//! ecr-pull-proxy: a CRI image-service proxy that adds Amazon ECR
//! credentials to `PullImage` calls on their way to containerd.
//!
//! Data goes one way: [`server`] (the socket) → [`relay`] (frames to the
//! upstream as they are) → for `PullImage`, [`proxy`] → [`pull`] +
//! [`credentials`] → [`ecr`] (token cache and source), then upstream.
// One line needs `unsafe`: registering a socket with tokio's epoll for
// reading only (relay.rs, `register`). Everything else stays safe.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod check;
pub mod config;
pub mod credentials;
pub mod ecr;
pub mod hpack;
pub mod image_ref;
pub mod logging;
pub mod matcher;
pub mod metrics;
pub mod proxy;
pub mod pull;
pub mod relay;
pub mod reload;
pub mod server;
pub mod signal;

/// The CRI `runtime.v1` types and clients, generated from `proto/api.proto`.
#[allow(missing_docs, clippy::all)]
pub mod cri {
    tonic::include_proto!("runtime.v1");
}

use std::sync::Arc;

use config::Config;

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

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The socket could not be set up.
    #[error(transparent)]
    Server(#[from] server::ServerError),
    /// The metrics endpoint could not be bound.
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers")]
    Signal(#[source] std::io::Error),
}

/// Runs the daemon until SIGTERM/SIGINT; SIGHUP reloads the configuration
/// `cli` points at.
pub async fn run(cli: config::Cli, config: Config) -> Result<(), RunError> {
    let metrics = Arc::new(metrics::Metrics::new());
    let source = Arc::new(ecr::aws::AwsSource::new(
        config.credentials.aws_timeout,
        metrics.clone(),
    ));
    let cache = ecr::TokenCache::new(source, config.credentials.max_token_age, metrics.clone());
    let resolver = credentials::Resolver::new(config.credentials.clone(), cache.clone());
    let upstream = proxy::Upstream::new(&config.upstream, metrics.upstream_up.clone());
    let proxy = proxy::Proxy::new(upstream, resolver, metrics.clone());
    let shutdown = signal::shutdown().map_err(RunError::Signal)?;
    // Installed before READY: SIGHUP's default action would end the process.
    let hangups = signal::hangups().map_err(RunError::Signal)?;
    tokio::spawn(reload::on_hangup(
        hangups,
        cli,
        config.clone(),
        proxy.clone(),
        cache,
    ));
    let admin = match &config.metrics_listen {
        Some(addr) => Some(admin::bind(addr).await?),
        None => None,
    };
    let listening = server::bind(&config.listen, config.socket_mode, config.socket_group)?;
    if let Some(admin) = admin {
        tokio::spawn(admin::serve(admin, proxy.clone(), metrics.clone()));
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
    server::notify_ready();
    server::serve(listening, proxy, shutdown, config.shutdown_grace).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::error_chain;

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
}
