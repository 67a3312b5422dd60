//! The real token source: ECR `GetAuthorizationToken` through the AWS SDK,
//! with the default credential chain and, per registry entry, STS
//! `AssumeRole`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_config::imds::client::ImdsResponseRetryClassifier;
use aws_config::meta::region::ProvideRegion;
use aws_config::{BehaviorVersion, SdkConfig};
use aws_sdk_ecr::config::Region;
use aws_sdk_ecr::error::{ProvideErrorMetadata, SdkError};
use aws_smithy_runtime_api::client::interceptors::context::InterceptorContext;
use aws_smithy_runtime_api::client::retries::classifiers::{
    ClassifyRetry, RetryAction, SharedRetryClassifier,
};
use aws_smithy_types::timeout::TimeoutConfig;
use base64::Engine;
use futures_util::future::BoxFuture;

use super::{CredentialSource, EcrService, ErrorKind, SourceError, Token, TokenKey};
use crate::ecr::Credentials;
use crate::ops::metrics::Metrics;

/// Pinned so that an SDK upgrade cannot change retry or timeout defaults
/// behind our back.
pub fn behavior_version() -> BehaviorVersion {
    BehaviorVersion::v2026_01_12()
}

/// Session name used for `AssumeRole`, visible in CloudTrail.
pub const ROLE_SESSION_NAME: &str = "ecr-pull-proxy";

/// The shared configuration's region when neither the environment, the
/// profile nor instance metadata names one. Token calls never use it (each
/// goes to its registry's region); the credential chain's own STS calls
/// (web identity, profile roles) and `check`'s `GetCallerIdentity` do.
pub const FALLBACK_REGION: &str = "us-east-1";

/// Loads the shared AWS configuration (environment, profile files, web
/// identity, container and instance-metadata credentials, endpoint
/// overrides such as `AWS_ENDPOINT_URL`).
///
/// The default region is resolved here, once. Left to the SDK, a node with
/// no region anywhere would have it looked up by each chain that wants one
/// (three times, each failure a warning with the whole error dump); one
/// line of ours says what was found instead.
///
/// Instance metadata is asked through one client of ours (see
/// [`imds_client`]) by the region chain and the credential chain alike,
/// which are otherwise the SDK's default chains, in the SDK's order.
pub async fn load_sdk_config(timeout: Duration) -> SdkConfig {
    let imds = imds_client();
    let region = match default_region_chain(imds.clone()).region().await {
        Some(region) => {
            tracing::debug!(region = %region, "default AWS region");
            region
        }
        None => {
            tracing::info!(
                fallback = FALLBACK_REGION,
                "no AWS region in the environment, the profile or instance metadata: token calls use each registry's region, the credential chain the fallback"
            );
            Region::from_static(FALLBACK_REGION)
        }
    };
    // What the SDK's loader gives its own default chain, but the IMDS client.
    let provider = aws_config::provider_config::ProviderConfig::default()
        .with_behavior_version(Some(behavior_version()))
        .with_region(Some(region.clone()))
        .with_retry_config(retry_config())
        .with_timeout_config(timeout_config(timeout));
    let credentials = aws_config::default_provider::credentials::DefaultCredentialsChain::builder()
        .imds_client(imds)
        .configure(provider)
        .region(region.clone())
        .build()
        .await;
    aws_config::defaults(behavior_version())
        .region(region)
        .credentials_provider(credentials)
        .timeout_config(timeout_config(timeout))
        .retry_config(retry_config())
        .load()
        .await
}

/// The SDK's default region chain (environment, profile, instance
/// metadata), with instance metadata asked through `imds`.
fn default_region_chain(imds: aws_config::imds::Client) -> impl ProvideRegion {
    aws_config::meta::region::RegionProviderChain::first_try(
        aws_config::environment::region::EnvironmentVariableRegionProvider::new(),
    )
    .or_else(aws_config::profile::region::ProfileFileRegionProvider::new())
    .or_else(
        aws_config::imds::region::ImdsRegionProvider::builder()
            .imds_client(imds)
            .build(),
    )
}

/// The instance-metadata client: the SDK's, with [`ImdsRetry`] deciding
/// which failures are tried again.
fn imds_client() -> aws_config::imds::Client {
    aws_config::imds::Client::builder()
        .retry_classifier(SharedRetryClassifier::new(ImdsRetry))
        .build()
}

/// The SDK's IMDS retry rules (answers 401 and 5xx are tried again), and
/// one more: a request whose connection broke before any answer came back.
///
/// The SDK's IMDS client tries again only on answers, so that a machine
/// without instance metadata fails fast instead of waiting out timeouts.
/// But its requests go over pooled connections, and an HTTP proxy between
/// the node and instance metadata (one that `NO_PROXY` leaves out) closes
/// idle ones: a request sent on a connection the proxy is closing fails
/// with "connection closed before message completed" and, not tried again,
/// fails the pull that needed credentials. IMDS requests are idempotent
/// (a token `PUT` and `GET`s), so one whose connection broke is sent again.
/// A connection that could not be made (refused, timed out) is not: that is
/// the machine without instance metadata, which must still fail fast.
#[derive(Debug)]
struct ImdsRetry;

impl ClassifyRetry for ImdsRetry {
    fn name(&self) -> &'static str {
        "ecr-pull-proxy IMDS"
    }

    fn classify_retry(&self, ctx: &InterceptorContext) -> RetryAction {
        if ctx.response().is_some() {
            return ImdsResponseRetryClassifier::default().classify_retry(ctx);
        }
        let Some(Err(err)) = ctx.output_or_error() else {
            return RetryAction::NoActionIndicated;
        };
        match err.as_connector_error() {
            Some(c) if connection_broke(c) => RetryAction::transient_error(),
            _ => RetryAction::NoActionIndicated,
        }
    }
}

/// Whether a connector error is a connection that broke under a request
/// (closed before the answer, reset, cut short), not one never made.
fn connection_broke(err: &aws_smithy_runtime_api::client::result::ConnectorError) -> bool {
    use std::io::ErrorKind as Io;
    if err.is_timeout() || err.is_user() {
        return false;
    }
    // hyper's IncompleteMessage ("connection closed before message
    // completed"), as aws-smithy-http-client classifies it.
    if err.as_other() == Some(aws_smithy_types::retry::ErrorKind::TransientError) {
        return true;
    }
    match find_source::<std::io::Error>(err) {
        Some(io) => matches!(
            io.kind(),
            Io::ConnectionReset | Io::ConnectionAborted | Io::BrokenPipe | Io::UnexpectedEof
        ),
        None => false,
    }
}

/// One attempt per AWS call: the token cache retries a failed fetch itself
/// (throttling on a long backoff with full jitter, other passing failures
/// from 1 s), while pulls wait for it. The SDK's standard mode would also
/// retry a throttled call twice within a second, on every node at once:
/// in the fleet simulation (tests/fleet.rs) that alone roughly triples the
/// calls a booting fleet makes into the account's shared quota.
fn retry_config() -> aws_config::retry::RetryConfig {
    aws_config::retry::RetryConfig::standard().with_max_attempts(RETRY_MAX_ATTEMPTS)
}

/// Attempts per AWS call (the token cache does the retrying).
pub const RETRY_MAX_ATTEMPTS: u32 = 1;

fn timeout_config(timeout: Duration) -> TimeoutConfig {
    TimeoutConfig::builder()
        .operation_timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(3)))
        .build()
}

/// A client for the service a key names.
#[derive(Clone)]
enum Client {
    Private(aws_sdk_ecr::Client),
    Public(aws_sdk_ecrpublic::Client),
}

type Clients = Arc<Mutex<HashMap<TokenKey, Client>>>;

/// ECR (and ECR Public) through the AWS SDK. The shared configuration is
/// loaded on the first fetch (so start-up never waits on instance metadata),
/// and one client per token key is built on first use.
pub struct AwsSource {
    base: Arc<tokio::sync::OnceCell<SdkConfig>>,
    timeout: Duration,
    clients: Clients,
    metrics: Arc<Metrics>,
}

impl AwsSource {
    /// A source with `timeout` on every call. The `AssumeRole` calls the
    /// SDK makes for a registry entry's role are counted in `metrics`
    /// (`GetAuthorizationToken` is counted by the token cache).
    pub fn new(timeout: Duration, metrics: Arc<Metrics>) -> Self {
        AwsSource {
            base: Arc::default(),
            timeout,
            clients: Arc::default(),
            metrics,
        }
    }

    async fn client(
        base: &tokio::sync::OnceCell<SdkConfig>,
        timeout: Duration,
        clients: &Clients,
        metrics: &Arc<Metrics>,
        key: &TokenKey,
    ) -> Client {
        if let Some(c) = clients.lock().expect("clients lock").get(key) {
            return c.clone();
        }
        let base = base.get_or_init(|| load_sdk_config(timeout)).await;
        let region = Region::new(key.region.clone());
        let role = match &key.role {
            Some(role) => {
                let mut builder = aws_config::sts::AssumeRoleProvider::builder(role.arn.clone())
                    .session_name(ROLE_SESSION_NAME)
                    .region(region.clone())
                    .configure(base);
                if let Some(id) = &role.external_id {
                    builder = builder.external_id(id.clone());
                }
                Some(ObservedRole {
                    inner: builder.build().await,
                    metrics: metrics.clone(),
                })
            }
            None => None,
        };
        let client = match key.service {
            EcrService::Private => {
                let mut conf = aws_sdk_ecr::config::Builder::from(base)
                    .retry_config(retry_config())
                    .region(region)
                    .use_fips(key.variant.fips)
                    .use_dual_stack(key.variant.dual_stack)
                    .timeout_config(timeout_config(timeout));
                if let Some(role) = role {
                    conf = conf.credentials_provider(role);
                }
                Client::Private(aws_sdk_ecr::Client::from_conf(conf.build()))
            }
            EcrService::Public => {
                let mut conf = aws_sdk_ecrpublic::config::Builder::from(base)
                    .retry_config(retry_config())
                    .region(region)
                    .timeout_config(timeout_config(timeout));
                if let Some(role) = role {
                    conf = conf.credentials_provider(role);
                }
                Client::Public(aws_sdk_ecrpublic::Client::from_conf(conf.build()))
            }
        };
        clients
            .lock()
            .expect("clients lock")
            .insert(key.clone(), client.clone());
        client
    }

    /// One `GetAuthorizationToken` call: the token and its expiry.
    async fn call(
        client: Client,
    ) -> Result<(String, Option<aws_smithy_types::DateTime>), SourceError> {
        let missing = || {
            SourceError::new(
                ErrorKind::BadToken,
                None,
                "GetAuthorizationToken returned no token",
            )
        };
        match client {
            Client::Private(c) => {
                let out = c
                    .get_authorization_token()
                    .send()
                    .await
                    .map_err(|e| classify(&e))?;
                let data = out.authorization_data().first().ok_or_else(missing)?;
                let token = data.authorization_token().ok_or_else(missing)?;
                Ok((token.to_owned(), data.expires_at().copied()))
            }
            Client::Public(c) => {
                let out = c
                    .get_authorization_token()
                    .send()
                    .await
                    .map_err(|e| classify(&e))?;
                let data = out.authorization_data().ok_or_else(missing)?;
                let token = data.authorization_token().ok_or_else(missing)?;
                Ok((token.to_owned(), data.expires_at().copied()))
            }
        }
    }
}

impl CredentialSource for AwsSource {
    fn fetch(&self, key: &TokenKey) -> BoxFuture<'static, Result<Token, SourceError>> {
        let (base, timeout, clients, metrics, key) = (
            self.base.clone(),
            self.timeout,
            self.clients.clone(),
            self.metrics.clone(),
            key.clone(),
        );
        Box::pin(async move {
            let call = async {
                let client = Self::client(&base, timeout, &clients, &metrics, &key).await;
                Self::call(client).await
            };
            // The SDK's operation timeout covers the call; this one also
            // covers credential resolution (an instance-metadata endpoint
            // that never answers), so a pull never waits longer.
            let (token, expires_at) = match tokio::time::timeout(timeout, call).await {
                Ok(result) => result?,
                Err(_) => {
                    return Err(SourceError::new(
                        ErrorKind::Timeout,
                        None,
                        format!(
                            "no answer within {} (credential chain or ECR API)",
                            humantime::format_duration(timeout)
                        ),
                    ))
                }
            };
            let credentials = decode_token(&token)?;
            let expires_at = expires_at
                .and_then(|t| SystemTime::try_from(t).ok())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            Ok(Token {
                credentials,
                expires_at,
            })
        })
    }
}

/// The metric name of the SDK's `AssumeRole` calls.
pub const ASSUME_ROLE_API: &str = "sts:AssumeRole";

/// A registry entry's role: the SDK's `AssumeRoleProvider`, each of whose
/// calls (the SDK caches the credentials it returns until shortly before
/// they expire) is counted as [`ASSUME_ROLE_API`].
struct ObservedRole {
    inner: aws_config::sts::AssumeRoleProvider,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for ObservedRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObservedRole").finish_non_exhaustive()
    }
}

impl aws_credential_types::provider::ProvideCredentials for ObservedRole {
    fn provide_credentials<'a>(
        &'a self,
    ) -> aws_credential_types::provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        aws_credential_types::provider::future::ProvideCredentials::new(async move {
            let started = std::time::Instant::now();
            let result = self.inner.provide_credentials().await;
            let code = match &result {
                Ok(_) => "ok".to_owned(),
                Err(e) => assume_role_code(e),
            };
            self.metrics
                .observe_aws(ASSUME_ROLE_API, code, started.elapsed());
            result
        })
    }
}

/// The `code` label of a failed `AssumeRole`: STS's error code (or HTTP
/// status) when STS answered, else what kind of failure it was.
fn assume_role_code(err: &aws_credential_types::provider::error::CredentialsError) -> String {
    type StsError = SdkError<
        aws_sdk_sts::operation::assume_role::AssumeRoleError,
        aws_smithy_runtime_api::http::Response,
    >;
    let classified = match find_source::<StsError>(err) {
        Some(sts) => classify(sts),
        None if matches!(
            err,
            aws_credential_types::provider::error::CredentialsError::ProviderTimedOut(_)
        ) =>
        {
            SourceError::new(ErrorKind::Timeout, None, "")
        }
        None => SourceError::new(ErrorKind::NoCredentials, None, ""),
    };
    classified
        .code
        .unwrap_or_else(|| format!("{:?}", classified.kind))
}

/// Decodes an ECR authorization token: base64 of `AWS:<password>`.
pub fn decode_token(token: &str) -> Result<Credentials, SourceError> {
    let bad = |what: &str| {
        SourceError::new(
            ErrorKind::BadToken,
            None,
            format!("ECR authorization token {what}"),
        )
    };
    let raw = base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .map_err(|_| bad("is not valid base64"))?;
    let text = String::from_utf8(raw).map_err(|_| bad("is not UTF-8 text"))?;
    let (user, password) = text
        .split_once(':')
        .ok_or_else(|| bad("does not have the form user:password"))?;
    if user.is_empty() || password.is_empty() {
        return Err(bad("has an empty user or password"));
    }
    Ok(Credentials {
        username: user.to_owned(),
        password: password.to_owned(),
    })
}

/// AWS error codes that mean "this identity may not do that" (the
/// shipped alert rules match each; tests/monitoring.rs checks).
pub const ACCESS_DENIED_CODES: &[&str] = &[
    "AccessDenied",
    "AccessDeniedException",
    "UnrecognizedClientException",
    "InvalidClientTokenId",
    "InvalidSignatureException",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "ExpiredTokenException",
];

/// AWS error codes that mean "slow down" (the shipped alert rules match
/// each; tests/monitoring.rs checks).
pub const THROTTLING_CODES: &[&str] = &[
    "ThrottlingException",
    "Throttling",
    "TooManyRequestsException",
    "RequestLimitExceeded",
];

fn classify<E>(err: &SdkError<E, aws_smithy_runtime_api::http::Response>) -> SourceError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let message = crate::error::error_chain(err);
    // A credential chain that found nothing, or an AssumeRole that failed,
    // surfaces as a CredentialsError somewhere in the chain.
    if let Some(cred) = find_source::<aws_credential_types::provider::error::CredentialsError>(err)
    {
        let text = crate::error::error_chain(cred);
        let (kind, code) = if ACCESS_DENIED_CODES.iter().any(|c| text.contains(c)) {
            (ErrorKind::AccessDenied, Some("AccessDenied".to_owned()))
        } else if matches!(
            cred,
            aws_credential_types::provider::error::CredentialsError::CredentialsNotLoaded(_)
        ) {
            (ErrorKind::NoCredentials, Some("NoCredentials".to_owned()))
        } else {
            (
                ErrorKind::NoCredentials,
                Some("CredentialsError".to_owned()),
            )
        };
        return SourceError::new(kind, code, format!("AWS credential chain: {message}"));
    }
    match err {
        SdkError::ServiceError(service) => {
            let code = service.err().code().map(str::to_owned);
            let status = service.raw().status().as_u16();
            let kind = match code.as_deref() {
                Some(c) if ACCESS_DENIED_CODES.contains(&c) => ErrorKind::AccessDenied,
                Some(c) if THROTTLING_CODES.contains(&c) => ErrorKind::Throttled,
                _ if status == 429 => ErrorKind::Throttled,
                _ if status == 401 || status == 403 => ErrorKind::AccessDenied,
                _ if status >= 500 => ErrorKind::Network,
                _ => ErrorKind::Other,
            };
            // Without an AWS error code, the HTTP status is the best name
            // for the cause (a bare 429 from a proxy or a load balancer).
            let code = code.or_else(|| Some(format!("HTTP {status}")));
            SourceError::new(kind, code, message)
        }
        SdkError::TimeoutError(_) => SourceError::new(ErrorKind::Timeout, None, message),
        SdkError::DispatchFailure(d) if d.is_timeout() => {
            SourceError::new(ErrorKind::Timeout, None, message)
        }
        SdkError::DispatchFailure(_) => SourceError::new(ErrorKind::Network, None, message),
        SdkError::ResponseError(_) => SourceError::new(ErrorKind::Network, None, message),
        _ => SourceError::new(ErrorKind::Other, None, message),
    }
}

fn find_source<'a, T: std::error::Error + 'static>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(t) = e.downcast_ref::<T>() {
            return Some(t);
        }
        cur = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Instance-metadata requests whose connection broke under them are
    /// sent again; connections never made, and timeouts, are not (a machine
    /// without instance metadata must fail fast).
    #[test]
    fn imds_requests_are_retried_only_when_their_connection_broke() {
        use aws_smithy_runtime_api::client::result::ConnectorError;
        use std::io::{Error, ErrorKind as Io};
        let io = |kind| ConnectorError::io(Box::new(Error::new(kind, "x")));
        // hyper's IncompleteMessage, as aws-smithy-http-client reports it:
        // the failure of the tinyproxy flake.
        let incomplete = ConnectorError::other(
            "connection closed before message completed".into(),
            Some(aws_smithy_types::retry::ErrorKind::TransientError),
        );
        assert!(connection_broke(&incomplete));
        assert!(connection_broke(&io(Io::ConnectionReset)));
        assert!(connection_broke(&io(Io::BrokenPipe)));
        assert!(!connection_broke(&io(Io::ConnectionRefused)));
        assert!(!connection_broke(&ConnectorError::timeout("slow".into())));
        assert!(!connection_broke(&ConnectorError::other("?".into(), None)));
    }

    #[test]
    fn tokens_decode_to_user_and_password() {
        let c = decode_token("QVdTOjEyMzQ1Njc4OTAxMi1hdXRoLXRva2Vu").unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("AWS", "123456789012-auth-token")
        );
    }

    #[test]
    fn a_failed_assume_role_is_labelled_by_what_sts_said() {
        use aws_credential_types::provider::error::CredentialsError;
        use aws_sdk_sts::operation::assume_role::AssumeRoleError;
        use aws_smithy_types::error::ErrorMetadata;
        let refused = |code: Option<&str>, status: u16| {
            let mut meta = ErrorMetadata::builder();
            if let Some(code) = code {
                meta = meta.code(code);
            }
            let response = aws_smithy_runtime_api::http::Response::new(
                status.try_into().unwrap(),
                aws_smithy_types::body::SdkBody::empty(),
            );
            CredentialsError::provider_error(SdkError::service_error(
                AssumeRoleError::generic(meta.build()),
                response,
            ))
        };
        assert_eq!(
            assume_role_code(&refused(Some("AccessDenied"), 403)),
            "AccessDenied"
        );
        assert_eq!(
            assume_role_code(&refused(Some("Throttling"), 400)),
            "Throttling"
        );
        assert_eq!(assume_role_code(&refused(None, 503)), "HTTP 503");
        assert_eq!(
            assume_role_code(&CredentialsError::provider_timed_out(Duration::from_secs(
                5
            ))),
            "Timeout"
        );
        assert_eq!(
            assume_role_code(&CredentialsError::not_loaded("no base credentials")),
            "NoCredentials"
        );
    }

    #[test]
    fn malformed_tokens_are_clear_errors_without_the_token() {
        for bad in ["not base64!", "QVdT", "OnBhc3M=", "//79"] {
            let e = decode_token(bad).unwrap_err();
            assert_eq!(e.kind, ErrorKind::BadToken, "{bad}");
            assert!(!e.message.contains(bad), "{}", e.message);
        }
    }
}
