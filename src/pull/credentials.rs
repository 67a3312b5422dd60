//! Which images get ECR credentials, and the credentials themselves.
//!
//! Sits between the proxy and the token cache: the proxy asks with an image
//! name, this module matches it (explicit `[[registries]]` entries first,
//! then the ECR patterns) and asks the cache for the right key.

use std::fmt;
use std::path::PathBuf;

use crate::config::{CredentialsConfig, ExistingCredentials};
use crate::ecr::Credentials;
use crate::ecr::{CacheOutcome, EcrHost, SourceError, TokenCache, TokenKey, ECR_PUBLIC_HOSTS};
use crate::image_ref::ImageRef;

/// Where an image's credentials come from.
#[derive(Clone, PartialEq, Eq)]
pub struct Target {
    /// The image's own registry host (with port), as the caller wrote it.
    pub image_host: String,
    /// The cache key (its region is the one asked).
    pub key: TokenKey,
    /// The account of the registry whose token is used (empty for ECR
    /// Public).
    pub account: String,
    /// The pattern that matched.
    pub pattern: String,
    /// When no token can be had, pull anonymously instead of failing (ECR
    /// Public serves anonymous pulls, with lower rate limits).
    pub anonymous_on_failure: bool,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("image_host", &self.image_host)
            .field("key", &self.key)
            .field("pattern", &self.pattern)
            .finish()
    }
}

/// Matches images and hands out credentials.
#[derive(Clone)]
pub struct Resolver {
    config: CredentialsConfig,
    /// containerd's config file: its `config_path` says where the
    /// `hosts.toml` files are that decide where a token may go.
    containerd_config: PathBuf,
    cache: TokenCache,
}

impl Resolver {
    /// A resolver for `config`, with tokens from `cache`, scoped by the
    /// `hosts.toml` files that containerd's config file `containerd_config`
    /// points at.
    pub fn new(config: CredentialsConfig, containerd_config: PathBuf, cache: TokenCache) -> Self {
        Resolver {
            config,
            containerd_config,
            cache,
        }
    }

    /// The policy for requests that already carry credentials.
    pub fn existing_credentials(&self) -> ExistingCredentials {
        self.config.existing_credentials
    }

    /// The token cache.
    pub fn cache(&self) -> &TokenCache {
        &self.cache
    }

    /// Which registry's token `image` gets, if any. Invalid references never
    /// match.
    pub fn target(&self, image: &str) -> Option<Target> {
        let r = ImageRef::parse(image)?;
        let name = match_name(&r);
        for rule in &self.config.registries {
            if let Some(p) = rule.patterns.iter().find(|p| p.matches(&name)) {
                return Some(Target {
                    image_host: r.domain.clone(),
                    key: TokenKey::for_host(&rule.registry, rule.role.clone()),
                    account: rule.registry.account.clone(),
                    pattern: p.as_str().to_owned(),
                    anonymous_on_failure: false,
                });
            }
        }
        // ECR Public: turned on by `ecr_public`, or by a kubelet
        // matchImages pattern that covers the host (EKS's default config
        // lists both hosts), since kubelet would ask for a token there.
        if ECR_PUBLIC_HOSTS.contains(&r.domain.as_str())
            && (self.config.ecr_public || self.config.ecr_patterns.iter().any(|p| p.matches(&name)))
        {
            return Some(Target {
                image_host: r.domain.clone(),
                key: TokenKey::public(),
                account: String::new(),
                pattern: r.domain.clone(),
                anonymous_on_failure: true,
            });
        }
        let p = self.config.ecr_patterns.iter().find(|p| p.matches(&name))?;
        // The glob decides coverage; the host must also be a real ECR host
        // (12-digit account, a region), which rules out look-alikes.
        let host = EcrHost::parse(r.host())?;
        Some(Target {
            image_host: r.domain.clone(),
            key: TokenKey::for_host(&host, None),
            account: host.account.clone(),
            pattern: p.as_str().to_owned(),
            anonymous_on_failure: false,
        })
    }

    /// Whether `target`'s region is one its partition has (or one
    /// `extra_regions` adds). A token is never asked for in another: the
    /// region is part of the cache key, the SDK client map and metric
    /// labels, and a caller could invent any number of them.
    pub fn region_known(&self, target: &Target) -> bool {
        target.key.service == crate::ecr::EcrService::Public
            || crate::ecr::host::is_known_region(
                target.key.partition,
                &target.key.region,
                &self.config.extra_regions,
            )
    }

    /// Why `image` gets no token (for `check`), or `None` when it does.
    pub fn why_not(&self, image: &str) -> Option<String> {
        if self.target(image).is_some() {
            return None;
        }
        let Some(r) = ImageRef::parse(image) else {
            return Some("not a valid image reference; containerd will reject it".into());
        };
        if ECR_PUBLIC_HOSTS.contains(&r.domain.as_str()) {
            return Some(format!(
                "{} gets a token only with ecr_public = true (or an imported matchImages that covers it)",
                r.domain
            ));
        }
        let name = match_name(&r);
        if let Some(p) = self.config.ecr_patterns.iter().find(|p| p.matches(&name)) {
            return Some(format!(
                "host {} matches pattern {:?} but is not an ECR registry host (a 12-digit account, dkr.ecr, a region)",
                r.domain,
                p.as_str()
            ));
        }
        Some(format!(
            "host {} matches no pattern ({} ECR patterns, {} [[registries]] entries)",
            r.domain,
            self.config.ecr_patterns.len(),
            self.config.registries.len()
        ))
    }

    /// The one host containerd may give `target`'s token to, as a URL with
    /// its scheme: where containerd sends the pull in the end (the `server`
    /// of the image host's `hosts.toml` under containerd's `config_path`,
    /// else the image's host). Mirrors tried before it get no token; a
    /// mirror that serves the image serves it without one.
    ///
    /// Read at every pull, as containerd reads `hosts.toml` at every pull,
    /// so that a changed file is followed without a restart; on the
    /// blocking pool, since it reads files.
    pub async fn destination(&self, target: &Target) -> String {
        let main = self.containerd_config.clone();
        let host = target.image_host.clone();
        let fallback = host.clone();
        tokio::task::spawn_blocking(move || {
            let roots = crate::containerd_config::registry_config_path(&main);
            crate::containerd_config::final_server(&roots, &host)
        })
        .await
        .unwrap_or_else(|_| crate::containerd_config::default_server(&fallback))
    }

    /// Credentials for `target`. A pull that may go on anonymously does
    /// not wait for retries; others wait up to `token_wait`.
    pub async fn credentials(
        &self,
        target: &Target,
    ) -> Result<(Credentials, CacheOutcome), SourceError> {
        let wait = if target.anonymous_on_failure {
            std::time::Duration::ZERO
        } else {
            self.config.token_wait
        };
        self.cache.get(&target.key, wait).await
    }
}

/// What patterns are matched against: the normalised repository name
/// without tag or digest (`docker.io/library/busybox`), as kubelet's image
/// manager looks it up (`Lookup(repoToPull)` after parsing the image).
fn match_name(r: &ImageRef) -> String {
    format!("{}/{}", r.domain, r.path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Cli, Config};
    use crate::ecr::{CredentialSource, Token};
    use futures_util::future::BoxFuture;
    use std::sync::Arc;

    struct Never;
    impl CredentialSource for Never {
        fn fetch(&self, _: &TokenKey) -> BoxFuture<'static, Result<Token, SourceError>> {
            Box::pin(std::future::pending())
        }
    }

    fn resolver(toml: &str) -> Resolver {
        let config = Config::from_toml(toml, &Cli::try_parse_args(["x"]).unwrap()).unwrap();
        Resolver::new(
            config.credentials,
            config.sandbox.containerd_config,
            TokenCache::new(Arc::new(Never), None, Arc::default()),
        )
    }

    #[test]
    fn default_patterns_match_ecr_and_nothing_that_looks_like_it() {
        let r = resolver("");
        let yes = [
            "123456789012.dkr.ecr.us-east-1.amazonaws.com/app:v1",
            "123456789012.dkr.ecr.us-east-1.amazonaws.com/team/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "123456789012.dkr.ecr-fips.us-gov-west-1.amazonaws.com/app",
            "123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn/app",
            "123456789012.dkr-ecr.eu-west-1.on.aws/app",
            "123456789012.dkr.ecr.us-isob-east-1.sc2s.sgov.gov/app",
        ];
        for image in yes {
            assert!(r.target(image).is_some(), "{image} should match");
        }
        let no = [
            "123456789012.dkr.ecr.us-east-1.amazonaws.com.evil.example/app",
            "evil.example/123456789012.dkr.ecr.us-east-1.amazonaws.com/app",
            "x123456789012.dkr.ecr.us-east-1.amazonaws.com/app",
            "123456789012.dkr.ecr.us-east-1.amazonaws.com:443/app",
            "123456789012.dkr.ecr.us-east-1.amazonaws.com/App",
            "1234567890123.dkr.ecr.us-east-1.amazonaws.com/app",
            "public.ecr.aws/nginx/nginx",
            "docker.io/library/busybox",
            "busybox",
            "",
            "not a reference",
        ];
        for image in no {
            assert!(r.target(image).is_none(), "{image} should not match");
        }
    }

    #[test]
    fn one_token_key_serves_every_account_in_a_region() {
        let r = resolver("");
        let a = r
            .target("111111111111.dkr.ecr.us-east-1.amazonaws.com/a")
            .unwrap();
        let b = r
            .target("222222222222.dkr.ecr.us-east-1.amazonaws.com/b")
            .unwrap();
        let c = r
            .target("222222222222.dkr.ecr.us-west-2.amazonaws.com/b")
            .unwrap();
        let d = r
            .target("222222222222.dkr.ecr-fips.us-east-1.amazonaws.com/b")
            .unwrap();
        assert_eq!(a.key, b.key);
        assert_ne!(a.key, c.key);
        assert_ne!(a.key, d.key);
    }

    #[test]
    fn ecr_public_matches_only_when_enabled_and_may_go_anonymous() {
        assert!(resolver("").target("public.ecr.aws/team/app:v1").is_none());
        let r = resolver("ecr_public = true");
        let t = r.target("public.ecr.aws/team/app:v1").unwrap();
        assert_eq!(t.key, TokenKey::public());
        assert!(t.anonymous_on_failure);
        // ECR Public's second host, as in EKS's default provider config.
        assert!(resolver("").target("ecr-public.aws.com/team/app").is_none());
        let t = r.target("ecr-public.aws.com/team/app:v1").unwrap();
        assert_eq!(t.key, TokenKey::public());
        assert!(r
            .target("ecr-public.aws.com.evil.example/team/app")
            .is_none());
        assert!(r.target("public.ecr.aws.evil.example/team/app").is_none());
        assert!(r.target("public.ecr.aws:8443/team/app").is_none());
        let private = r
            .target("123456789012.dkr.ecr.us-east-1.amazonaws.com/app")
            .unwrap();
        assert!(!private.anonymous_on_failure);
    }

    #[test]
    fn imported_match_images_that_cover_ecr_public_turn_it_on() {
        let dir = tempfile::tempdir().unwrap();
        let cp = dir.path().join("cp.yaml");
        std::fs::write(
            &cp,
            "providers:\n  - name: ecr-credential-provider\n    matchImages: [\"*.dkr.ecr.*.amazonaws.com\", \"public.ecr.aws\"]\n",
        )
        .unwrap();
        let r = resolver(&format!("credential_provider_config = {cp:?}"));
        let t = r.target("public.ecr.aws/team/app:v1").unwrap();
        assert_eq!(t.key, TokenKey::public());
        assert!(t.anonymous_on_failure);
        // The other host is not covered by that config.
        assert!(r.target("ecr-public.aws.com/team/app").is_none());
    }

    #[test]
    fn registries_entries_map_mirrors_to_ecr_and_come_first() {
        let r = resolver(
            "default_patterns = false\n[[registries]]\npatterns = [\"mirror.internal:5000/team\"]\nregistry = \"210987654321.dkr.ecr.eu-west-1.amazonaws.com\"\nrole_arn = \"arn:aws:iam::210987654321:role/pull\"",
        );
        let t = r.target("mirror.internal:5000/team/app:v1").unwrap();
        assert_eq!(t.key.region, "eu-west-1");
        assert_eq!(
            t.key.role.as_ref().unwrap().arn,
            "arn:aws:iam::210987654321:role/pull"
        );
        assert!(r.target("mirror.internal:5000/other/app").is_none());
        assert!(r.target("mirror.internal/team/app").is_none());
        // default_patterns = false turns the ECR patterns off.
        assert!(r
            .target("123456789012.dkr.ecr.us-east-1.amazonaws.com/app")
            .is_none());
    }

    /// Patterns see what kubelet's keyring sees: the normalised repository
    /// name, without tag or digest (kubelet's image manager looks up
    /// `repoToPull`).
    #[test]
    fn patterns_match_the_normalised_name_without_tag_or_digest() {
        let mirror = |pattern: &str| {
            resolver(&format!(
                "default_patterns = false\n[[registries]]\npatterns = [\"{pattern}\"]\nregistry = \"210987654321.dkr.ecr.eu-west-1.amazonaws.com\""
            ))
        };
        // `busybox` is docker.io/library/busybox.
        let r = mirror("docker.io/library");
        assert!(r.target("busybox").is_some());
        assert!(r.target("busybox:1.36").is_some());
        assert!(r.target("index.docker.io/library/busybox").is_some());
        assert!(r.target("docker.io/team/app").is_none());
        // index.docker.io is docker.io.
        let r = mirror("index.docker.io");
        assert!(r.target("index.docker.io/team/app").is_none());
        // A tag or digest never takes part in the path match.
        let r = mirror("reg.example/app:v1");
        assert!(r.target("reg.example/app:v1").is_none());
        let r = mirror("reg.example/app");
        assert!(r.target("reg.example/app:v1").is_some());
        assert!(r
            .target("reg.example/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
            .is_some());
        // A digest containerd would refuse is never matched.
        assert!(r
            .target("reg.example/app@sha256:0123456789abcdef0123456789abcdef")
            .is_none());
    }
}
