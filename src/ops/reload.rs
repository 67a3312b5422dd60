//! SIGHUP: re-read the configuration with the same validation as at start.
//! A valid one replaces the credential settings atomically (calls in flight
//! finish with the settings they started with; cached tokens stay, since the
//! cache is shared and keyed by what a token serves). An invalid one is
//! logged, naming the key, and the running settings stay.
//!
//! Settings bound at start (sockets, logging, timeouts, the metrics
//! endpoint) are compared and, if changed, reported as needing a restart.

use tokio::signal::unix::Signal;

use crate::config::{Cli, Config};
use crate::ecr::TokenCache;
use crate::pull::credentials::Resolver;
use crate::transport::Proxy;

/// Reloads on every SIGHUP until the process ends.
pub async fn on_hangup(
    mut hangups: Signal,
    cli: Cli,
    mut current: Config,
    proxy: Proxy,
    cache: TokenCache,
) {
    // containerd_config takes effect after a restart, as reported below.
    let containerd_config = current.sandbox.containerd_config.clone();
    while hangups.recv().await.is_some() {
        // File reads, YAML and an NSS group lookup (which may ask sssd or
        // LDAP): on the blocking pool, never on the runtime thread every
        // CRI call needs. One reload at a time; SIGHUPs meanwhile coalesce.
        let reading = cli.clone();
        let loaded = match tokio::task::spawn_blocking(move || Config::load(&reading)).await {
            Ok(loaded) => loaded,
            Err(e) => {
                tracing::error!(error = %e, "configuration not reloaded: the reload task failed");
                continue;
            }
        };
        match loaded {
            Ok(new) => {
                for key in needs_restart(&current, &new) {
                    tracing::warn!(
                        key,
                        "changed in the config file; takes effect after a restart"
                    );
                }
                proxy.replace_resolver(Resolver::new(
                    new.credentials.clone(),
                    containerd_config.clone(),
                    cache.clone(),
                ));
                tracing::info!(
                    existing_credentials = %new.credentials.existing_credentials,
                    patterns = new.credentials.ecr_patterns.len(),
                    registries = new.credentials.registries.len(),
                    ecr_public = new.credentials.ecr_public,
                    "configuration reloaded"
                );
                current = new;
            }
            Err(e) => tracing::error!(
                error = %crate::error::error_chain(&e),
                "configuration not reloaded; the running one stays"
            ),
        }
    }
}

/// The keys whose change a reload cannot apply.
fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let mut diff = |key, changed: bool| {
        if changed {
            keys.push(key);
        }
    };
    diff("listen", old.listen != new.listen);
    diff("upstream", old.upstream != new.upstream);
    diff("socket_mode", old.socket_mode != new.socket_mode);
    diff("socket_group", old.socket_group != new.socket_group);
    diff("shutdown_grace", old.shutdown_grace != new.shutdown_grace);
    diff("log_level", old.log_level != new.log_level);
    diff("log_format", old.log_format != new.log_format);
    diff("metrics_listen", old.metrics_listen != new.metrics_listen);
    diff("sandbox_image", old.sandbox.image != new.sandbox.image);
    diff(
        "containerd_config",
        old.sandbox.containerd_config != new.sandbox.containerd_config,
    );
    diff(
        "sandbox_check_interval",
        old.sandbox.check_interval != new.sandbox.check_interval,
    );
    diff(
        "aws_timeout",
        old.credentials.aws_timeout != new.credentials.aws_timeout,
    );

    diff(
        "credential_provider_config (defaultCacheDuration)",
        old.credentials.max_token_age != new.credentials.max_token_age,
    );
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_only_keys_are_reported() {
        let cli = Cli::try_parse_args(["x"]).unwrap();
        let old = Config::from_toml("", &cli).unwrap();
        let same_sockets = Config::from_toml(
            "existing_credentials = \"keep\"\ndefault_patterns = false\ntoken_wait = \"1s\"",
            &cli,
        )
        .unwrap();
        assert!(needs_restart(&old, &same_sockets).is_empty());
        let moved =
            Config::from_toml("listen = \"/run/x.sock\"\naws_timeout = \"3s\"", &cli).unwrap();
        assert_eq!(needs_restart(&old, &moved), vec!["listen", "aws_timeout"]);
    }
}
