//! Everything about Amazon ECR: which hosts are ECR registries, where tokens
//! come from, and how long they are kept. Nothing here knows about gRPC.

pub mod aws;
pub mod cache;
pub mod host;

use std::fmt;
use std::time::SystemTime;

use futures_util::future::BoxFuture;

pub use cache::{CacheOutcome, RetryPolicy, TokenCache};
pub use host::{EcrHost, EndpointVariant};

use crate::config::Role;

/// Registry credentials to put into a request. `Debug` never shows the
/// password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The registry user name (`AWS` for ECR).
    pub username: String,
    /// The registry password (the ECR token's second half).
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// The ECR Public registry host.
pub const ECR_PUBLIC_HOST: &str = "public.ecr.aws";
/// Every host ECR Public serves images from (both are in the EKS default
/// credential-provider config and ecr-credential-provider's own pattern).
pub const ECR_PUBLIC_HOSTS: &[&str] = &[ECR_PUBLIC_HOST, "ecr-public.aws.com"];
/// ECR Public issues its tokens in this region only.
pub const ECR_PUBLIC_REGION: &str = "us-east-1";

/// Which ECR service issues a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EcrService {
    /// Amazon ECR private registries.
    Private,
    /// Amazon ECR Public (`public.ecr.aws`).
    Public,
}

/// What one token serves: ECR tokens are per (partition, region, identity),
/// so every account's registry in that region shares one.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TokenKey {
    /// Private ECR or ECR Public.
    pub service: EcrService,
    /// AWS partition.
    pub partition: &'static str,
    /// AWS region.
    pub region: String,
    /// API endpoint flavour.
    pub variant: EndpointVariant,
    /// Role assumed before asking, if any.
    pub role: Option<Role>,
}

impl TokenKey {
    /// The key for a registry host, with an optional role.
    pub fn for_host(host: &EcrHost, role: Option<Role>) -> Self {
        TokenKey {
            service: EcrService::Private,
            partition: host.partition,
            region: host.region.clone(),
            variant: host.variant,
            role,
        }
    }
}

impl TokenKey {
    /// The key for ECR Public tokens.
    pub fn public() -> Self {
        TokenKey {
            service: EcrService::Public,
            partition: "aws",
            region: ECR_PUBLIC_REGION.to_owned(),
            variant: EndpointVariant::default(),
            role: None,
        }
    }
}

// The external ID is a shared secret between accounts; it is never printed.
impl fmt::Display for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.service == EcrService::Public {
            f.write_str("ecr-public/")?;
        }
        write!(f, "{}/{}/{}", self.partition, self.region, self.variant)?;
        if let Some(role) = &self.role {
            write!(f, " as {}", role.arn)?;
        }
        Ok(())
    }
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenKey({self})")
    }
}

/// A registry token and when ECR says it expires.
#[derive(Clone, Debug)]
pub struct Token {
    /// User name and password for the registry (`Debug` is redacted).
    pub credentials: Credentials,
    /// ECR's `expiresAt`.
    pub expires_at: SystemTime,
}

/// The kind of failure, which decides the gRPC code a pull gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The endpoint could not be reached.
    Network,
    /// The call took longer than the configured timeout.
    Timeout,
    /// AWS throttled the call.
    Throttled,
    /// The identity may not get a token (or assume the role).
    AccessDenied,
    /// No credentials were found anywhere in the chain.
    NoCredentials,
    /// AWS answered with something that is not a usable token.
    BadToken,
    /// Anything else.
    Other,
}

impl ErrorKind {
    /// Whether the failure may pass by itself (throttling, network,
    /// timeout), so that retrying soon makes sense.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            ErrorKind::Network | ErrorKind::Timeout | ErrorKind::Throttled
        )
    }
}

/// Why a token could not be had. Cloneable because errors are cached and
/// handed to every caller that asks during the backoff.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{}{message}", code.as_deref().map(|c| format!("{c}: ")).unwrap_or_default())]
pub struct SourceError {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// The AWS error code, when AWS answered (`AccessDeniedException`, ...).
    pub code: Option<String>,
    /// What happened, with its cause chain; never a secret.
    pub message: String,
}

impl SourceError {
    /// A new error.
    pub fn new(kind: ErrorKind, code: Option<String>, message: impl Into<String>) -> Self {
        SourceError {
            kind,
            code,
            message: message.into(),
        }
    }
}

/// Where tokens come from. The proxy only sees this trait, so tests can plug
/// in a source of their own and the proxy never names the AWS SDK.
pub trait CredentialSource: Send + Sync + 'static {
    /// Fetches a fresh token for `key`.
    fn fetch(&self, key: &TokenKey) -> BoxFuture<'static, Result<Token, SourceError>>;
}
