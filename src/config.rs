//! Configuration: CLI flags, the TOML file, defaults and validation.
//!
//! Everything is validated before anything is bound or dialled. Errors name
//! the key and say what is accepted; `main` maps them to exit code 64.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[allow(unused_imports)]
use clap::CommandFactory;
use clap::{Parser, ValueEnum};
use serde::Deserialize;

use crate::ecr::host::{EcrHost, DEFAULT_PATTERNS};
use crate::matcher::{Pattern, PatternError};

/// Config file read when `--config` is not given (a missing file means
/// defaults).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/ecr-pull-proxy/config.toml";
/// Where the proxy listens, as kubelet's `imageServiceEndpoint`.
pub const DEFAULT_LISTEN: &str = "/run/ecr-pull-proxy/ecr-pull-proxy.sock";
/// containerd's CRI socket.
pub const DEFAULT_UPSTREAM: &str = "/run/containerd/containerd.sock";
/// Mode of the listening socket: owner and group only.
pub const DEFAULT_SOCKET_MODE: u32 = 0o660;
/// How long in-flight calls may run after SIGTERM.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Timeout for each AWS call (credentials and token).
pub const DEFAULT_AWS_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a pull waits while a token fetch that failed for a passing
/// reason (throttling, network, timeout) is retried.
pub const DEFAULT_TOKEN_WAIT: Duration = Duration::from_secs(120);
/// Log level when neither flag nor file sets one.
pub const DEFAULT_LOG_LEVEL: LogLevel = LogLevel::Info;
/// Log format when neither flag nor file sets one.
pub const DEFAULT_LOG_FORMAT: LogFormat = LogFormat::Text;
/// What to do with a pull that already carries credentials.
pub const DEFAULT_EXISTING_CREDENTIALS: ExistingCredentials = ExistingCredentials::Fallback;
/// Whether `public.ecr.aws` pulls get an ECR Public token.
pub const DEFAULT_ECR_PUBLIC: bool = false;
/// Whether the default ECR host patterns apply (`default_patterns`).
pub const DEFAULT_DEFAULT_PATTERNS: bool = true;
/// Largest gRPC message read (a PullImage request); kubelet's own limit.
pub const MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;
/// Which sandbox (pause) image the daemon keeps present: learned from
/// containerd.
pub const DEFAULT_SANDBOX_IMAGE: &str = "auto";
/// containerd's own config file, read for its sandbox image when its CRI
/// status does not say (containerd 2.x), and for its registry
/// `config_path` (the `hosts.toml` files that decide where a token goes).
pub const DEFAULT_CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";
/// k3s's containerd socket.
pub const K3S_UPSTREAM: &str = "/run/k3s/containerd/containerd.sock";
/// The config file k3s renders for its containerd: the default
/// `containerd_config` when `upstream` is [`K3S_UPSTREAM`].
pub const K3S_CONTAINERD_CONFIG: &str = "/var/lib/rancher/k3s/agent/etc/containerd/config.toml";
/// How often the sandbox image's presence is checked (a cheap
/// `ImageStatus`) besides at start and when containerd comes back.
pub const DEFAULT_SANDBOX_CHECK_INTERVAL: Duration = Duration::from_secs(5 * 60);
/// Name of the provider taken from a kubelet `CredentialProviderConfig`.
pub const ECR_PROVIDER_NAME: &str = "ecr-credential-provider";

/// Every key the config file accepts (`registries.*` are the keys of each
/// `[[registries]]` entry). The README's reference lists exactly these; a
/// test holds the two and the parser together.
pub const CONFIG_KEYS: &[&str] = &[
    "listen",
    "upstream",
    "socket_mode",
    "socket_group",
    "shutdown_grace",
    "log_level",
    "log_format",
    "existing_credentials",
    "default_patterns",
    "credential_provider_config",
    "aws_timeout",
    "token_wait",
    "ecr_public",
    "extra_regions",
    "metrics_listen",
    "sandbox_image",
    "containerd_config",
    "sandbox_check_interval",
    "registries",
    "registries.patterns",
    "registries.registry",
    "registries.role_arn",
    "registries.external_id",
];

/// Command line.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "ecr-pull-proxy",
    version,
    about = "CRI image-service proxy that adds Amazon ECR credentials to PullImage calls"
)]
pub struct Cli {
    /// What to do; without one, run the daemon.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// TOML config file
    #[arg(long, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// Unix socket to listen on, as a path or unix://PATH
    #[arg(long, value_name = "PATH")]
    pub listen: Option<String>,
    /// containerd CRI socket to forward to, as a path or unix://PATH
    #[arg(long, value_name = "PATH", global = true)]
    pub upstream: Option<String>,
    /// Log level
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<LogLevel>,
    /// Log format
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Serve /metrics, /healthz and /readyz on a TCP address or unix:PATH
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
}

/// Subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Check the configuration, the AWS identity, the upstream socket and,
    /// with --image, whether an image gets a token. Exits 0 when everything
    /// needed would work.
    Check {
        /// An image reference to match and fetch a token for
        #[arg(long, value_name = "REF")]
        image: Option<String>,
    },
}

impl Cli {
    /// The command line definition, with help texts that state the defaults
    /// from the constants above (so help, code and README cannot drift).
    pub fn command() -> clap::Command {
        <Cli as clap::CommandFactory>::command()
            .mut_arg("config", |a| a.help(format!("TOML config file [default: {DEFAULT_CONFIG_PATH}, if present]")))
            .mut_arg("listen", |a| a.help(format!("Unix socket to listen on, as a path or unix://PATH [default: {DEFAULT_LISTEN}]")))
            .mut_arg("upstream", |a| a.help(format!("containerd CRI socket to forward to, as a path or unix://PATH [default: {DEFAULT_UPSTREAM}]")))
            .mut_arg("log_level", |a| a.help(format!("Log level [default: {}]", DEFAULT_LOG_LEVEL.as_str())))
            .mut_arg("log_format", |a| a.help(format!("Log format [default: {}]", DEFAULT_LOG_FORMAT.as_str())))
            .mut_arg("metrics_listen", |a| {
                a.help("Serve /metrics, /healthz and /readyz on a TCP address (127.0.0.1:9464) or unix:PATH [default: off]")
            })
    }

    /// Parses `args` (the program name first).
    pub fn try_parse_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = Self::command().try_get_matches_from(args)?;
        <Cli as clap::FromArgMatches>::from_arg_matches(&matches)
    }
}

/// Where `/metrics`, `/healthz` and `/readyz` are served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetricsListen {
    /// A TCP address.
    Tcp(std::net::SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl std::fmt::Display for MetricsListen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetricsListen::Tcp(a) => write!(f, "{a}"),
            MetricsListen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Log verbosity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Errors and warnings.
    Warn,
    /// One line per pull, plus warnings and errors.
    Info,
    /// One line per call.
    Debug,
    /// Everything the proxy logs (libraries still log warnings only).
    Trace,
}

impl LogLevel {
    /// The level's name.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// The format's name.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// Policy for a `PullImage` that already carries credentials.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExistingCredentials {
    /// Forward as it is; if the registry refuses them, retry once with ECR's.
    Fallback,
    /// Forward as it is, always.
    Keep,
    /// Use the ECR token instead, always.
    Replace,
}

impl std::fmt::Display for ExistingCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Fallback => "fallback",
            Self::Keep => "keep",
            Self::Replace => "replace",
        })
    }
}

/// The config file as written. Every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    upstream: Option<String>,
    socket_mode: Option<String>,
    socket_group: Option<String>,
    #[serde(default, with = "humantime_serde")]
    shutdown_grace: Option<Duration>,
    log_level: Option<LogLevel>,
    log_format: Option<LogFormat>,
    existing_credentials: Option<ExistingCredentials>,
    default_patterns: Option<bool>,
    credential_provider_config: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    aws_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    token_wait: Option<Duration>,
    ecr_public: Option<bool>,
    #[serde(default)]
    extra_regions: Vec<String>,
    metrics_listen: Option<String>,
    sandbox_image: Option<String>,
    containerd_config: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    sandbox_check_interval: Option<Duration>,
    #[serde(default)]
    registries: Vec<FileRegistry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRegistry {
    patterns: Vec<String>,
    registry: String,
    role_arn: Option<String>,
    external_id: Option<String>,
}

/// A role to assume before asking ECR for a token (cross-account).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Role {
    /// `arn:aws:iam::ACCOUNT:role/NAME`.
    pub arn: String,
    /// The external ID the role's trust policy requires, if any. A shared
    /// secret of sorts (it guards against the confused deputy): never
    /// printed, `Debug` included.
    pub external_id: Option<String>,
}

impl std::fmt::Debug for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Role")
            .field("arn", &self.arn)
            .field(
                "external_id",
                &self.external_id.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// A `[[registries]]` entry: images matching `patterns` get credentials for
/// `registry`.
#[derive(Clone, Debug)]
pub struct RegistryRule {
    /// kubelet `matchImages` globs.
    pub patterns: Vec<Pattern>,
    /// The ECR registry whose token is used.
    pub registry: EcrHost,
    /// The role to assume first, if any.
    pub role: Option<Role>,
}

/// Which images get ECR credentials, and how.
#[derive(Clone, Debug)]
pub struct CredentialsConfig {
    /// Patterns whose hosts are ECR hosts (default patterns, or those
    /// imported from a `CredentialProviderConfig`).
    pub ecr_patterns: Vec<Pattern>,
    /// Explicit entries, tried before `ecr_patterns`.
    pub registries: Vec<RegistryRule>,
    /// Policy for requests that already carry credentials.
    pub existing_credentials: ExistingCredentials,
    /// Timeout for each AWS call.
    pub aws_timeout: Duration,
    /// How long a pull waits while a failed token fetch is retried.
    pub token_wait: Duration,
    /// Upper bound on how long a token is cached (kubelet's
    /// `defaultCacheDuration`, when imported).
    pub max_token_age: Option<Duration>,
    /// Whether `public.ecr.aws` pulls get an ECR Public token.
    pub ecr_public: bool,
    /// Regions accepted besides [`crate::ecr::KNOWN_REGIONS`].
    pub extra_regions: Vec<String>,
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Listening socket path.
    pub listen: PathBuf,
    /// containerd socket path.
    pub upstream: PathBuf,
    /// Mode for the listening socket.
    pub socket_mode: u32,
    /// Group owning the listening socket, if set.
    pub socket_group: Option<u32>,
    /// Grace period for in-flight calls at shutdown.
    pub shutdown_grace: Duration,
    /// Log level.
    pub log_level: LogLevel,
    /// Log format.
    pub log_format: LogFormat,
    /// Where the metrics and health endpoints listen, if anywhere.
    pub metrics_listen: Option<MetricsListen>,
    /// Credential injection settings.
    pub credentials: CredentialsConfig,
    /// The sandbox (pause) image the daemon keeps present.
    pub sandbox: SandboxConfig,
    /// The file this was read from, if any.
    pub source: Option<PathBuf>,
}

/// `sandbox_image`: which image, if any, the daemon keeps present.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SandboxImage {
    /// Learn it from containerd (its CRI status, its config file, its
    /// built-in default).
    Auto,
    /// Do not look after the sandbox image.
    Off,
    /// This reference.
    Image(String),
}

/// Sandbox image settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxConfig {
    /// `sandbox_image`.
    pub image: SandboxImage,
    /// `containerd_config`: containerd's config file.
    pub containerd_config: PathBuf,
    /// `sandbox_check_interval`.
    pub check_interval: Duration,
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown keys or wrong types.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What toml says, with line and column.
        message: String,
    },
    /// A file that decides who gets the token is writable by every user.
    #[error("{} is world-writable: any local user could decide who receives the node's ECR token; run `chmod o-w {}`", path.display(), path.display())]
    WorldWritable {
        /// The file.
        path: PathBuf,
    },
    /// A key has a value that is not accepted.
    #[error("{key}: {message}")]
    Invalid {
        /// The key, e.g. `registries[0].patterns[1]`.
        key: String,
        /// What is wrong and what is accepted.
        message: String,
    },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

impl Config {
    /// Loads the file (if any) and applies the CLI on top.
    pub fn load(cli: &Cli) -> Result<Self, ConfigError> {
        let (file, source) = match &cli.config {
            Some(path) => (read_file(path)?, Some(path.clone())),
            None => {
                let path = Path::new(DEFAULT_CONFIG_PATH);
                if path.exists() {
                    (read_file(path)?, Some(path.to_owned()))
                } else {
                    (FileConfig::default(), None)
                }
            }
        };
        Self::build(file, cli, source)
    }

    /// Parses a config file's text (used by tests and `load`).
    pub fn from_toml(text: &str, cli: &Cli) -> Result<Self, ConfigError> {
        let file = parse(text, Path::new("<inline>"))?;
        Self::build(file, cli, None)
    }

    fn build(file: FileConfig, cli: &Cli, source: Option<PathBuf>) -> Result<Self, ConfigError> {
        let listen = socket_path(
            "listen",
            cli.listen
                .as_deref()
                .or(file.listen.as_deref())
                .unwrap_or(DEFAULT_LISTEN),
        )?;
        let upstream = socket_path(
            "upstream",
            cli.upstream
                .as_deref()
                .or(file.upstream.as_deref())
                .unwrap_or(DEFAULT_UPSTREAM),
        )?;
        let sandbox = sandbox_config(&file, &upstream)?;
        let socket_mode = match &file.socket_mode {
            Some(s) => parse_mode(s)?,
            None => DEFAULT_SOCKET_MODE,
        };
        let socket_group = file
            .socket_group
            .as_deref()
            .map(resolve_group)
            .transpose()?;
        let shutdown_grace = file.shutdown_grace.unwrap_or(DEFAULT_SHUTDOWN_GRACE);
        let aws_timeout = file.aws_timeout.unwrap_or(DEFAULT_AWS_TIMEOUT);
        if aws_timeout.is_zero() {
            return Err(invalid(
                "aws_timeout",
                "must be longer than 0s, e.g. \"10s\"",
            ));
        }

        let mut ecr_patterns = Vec::new();
        let mut max_token_age = None;
        if file.default_patterns.unwrap_or(DEFAULT_DEFAULT_PATTERNS) {
            ecr_patterns = DEFAULT_PATTERNS
                .iter()
                .map(|p| Pattern::new(p).expect("default patterns compile"))
                .collect();
        }
        if let Some(path) = &file.credential_provider_config {
            let imported = import_credential_provider_config(path)?;
            ecr_patterns = imported.patterns;
            max_token_age = imported.cache_duration;
        }

        for (i, region) in file.extra_regions.iter().enumerate() {
            if !crate::ecr::host::is_region(region) {
                return Err(invalid(
                    format!("extra_regions[{i}]"),
                    format!("{region:?} is not a region name like \"us-east-1\""),
                ));
            }
        }
        let mut registries = Vec::with_capacity(file.registries.len());
        for (i, r) in file.registries.iter().enumerate() {
            registries.push(registry_rule(i, r, &file.extra_regions)?);
        }

        let metrics_listen = cli
            .metrics_listen
            .as_deref()
            .or(file.metrics_listen.as_deref())
            .map(parse_metrics_listen)
            .transpose()?;

        Ok(Config {
            metrics_listen,
            listen,
            upstream,
            socket_mode,
            socket_group,
            shutdown_grace,
            log_level: cli
                .log_level
                .or(file.log_level)
                .unwrap_or(DEFAULT_LOG_LEVEL),
            log_format: cli
                .log_format
                .or(file.log_format)
                .unwrap_or(DEFAULT_LOG_FORMAT),
            credentials: CredentialsConfig {
                ecr_patterns,
                registries,
                existing_credentials: file
                    .existing_credentials
                    .unwrap_or(DEFAULT_EXISTING_CREDENTIALS),
                aws_timeout,
                token_wait: file.token_wait.unwrap_or(DEFAULT_TOKEN_WAIT),
                max_token_age,
                ecr_public: file.ecr_public.unwrap_or(DEFAULT_ECR_PUBLIC),
                extra_regions: file.extra_regions.clone(),
            },
            sandbox,
            source,
        })
    }
}

fn sandbox_config(file: &FileConfig, upstream: &Path) -> Result<SandboxConfig, ConfigError> {
    let image = match file.sandbox_image.as_deref() {
        None | Some("auto") => SandboxImage::Auto,
        Some("off") => SandboxImage::Off,
        Some(r) => {
            if crate::image_ref::ImageRef::parse(r).is_none() {
                return Err(invalid(
                    "sandbox_image",
                    format!("{r:?} is not an image reference; give one, \"auto\" or \"off\""),
                ));
            }
            SandboxImage::Image(r.to_owned())
        }
    };
    let check_interval = file
        .sandbox_check_interval
        .unwrap_or(DEFAULT_SANDBOX_CHECK_INTERVAL);
    if check_interval.is_zero() {
        return Err(invalid(
            "sandbox_check_interval",
            "must be longer than 0s, e.g. \"5m\"",
        ));
    }
    Ok(SandboxConfig {
        image,
        containerd_config: file.containerd_config.clone().unwrap_or_else(|| {
            PathBuf::from(if upstream == Path::new(K3S_UPSTREAM) {
                K3S_CONTAINERD_CONFIG
            } else {
                DEFAULT_CONTAINERD_CONFIG
            })
        }),
        check_interval,
    })
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let meta = std::fs::metadata(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    refuse_world_writable(path, &meta)?;
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, path)
}

/// The config file and an imported `CredentialProviderConfig` decide who
/// gets credentials; a file anyone can edit would let any local user send
/// the node's ECR token to a host of their choosing.
fn refuse_world_writable(path: &Path, meta: &std::fs::Metadata) -> Result<(), ConfigError> {
    if meta.is_file() && meta.permissions().mode() & 0o002 != 0 {
        return Err(ConfigError::WorldWritable {
            path: path.to_owned(),
        });
    }
    Ok(())
}

fn parse(text: &str, path: &Path) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: toml_message(text, &e),
    })
}

/// `line L, column C: message` for a TOML error: one line, pointing where
/// the problem is (toml's own rendering spans several lines of markers).
fn toml_message(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim_end().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
            // Name the key written on that line, as every other config
            // error does.
            let key = text
                .lines()
                .nth(line - 1)
                .and_then(|l| l.split_once('='))
                .map(|(k, _)| k.trim())
                .filter(|k| !k.is_empty() && !k.starts_with('['));
            match key {
                Some(key) => format!("line {line}, column {column}: {key}: {message}"),
                None => format!("line {line}, column {column}: {message}"),
            }
        }
        None => message,
    }
}

/// Accepts `PATH` or `unix://PATH`.
fn socket_path(key: &str, value: &str) -> Result<PathBuf, ConfigError> {
    let path = value.strip_prefix("unix://").unwrap_or(value);
    if let Some((scheme, _)) = path.split_once("://") {
        return Err(invalid(
            key,
            format!("scheme {scheme:?} is not supported; give a path or unix://PATH"),
        ));
    }
    if !path.starts_with('/') {
        return Err(invalid(
            key,
            format!(
                "{value:?} is not an absolute path; give /path/to.sock or unix:///path/to.sock"
            ),
        ));
    }
    // sockaddr_un holds 108 bytes including the terminating NUL.
    if path.len() > 107 {
        return Err(invalid(
            key,
            format!("{value:?} is longer than the 107 bytes a Unix socket path may have"),
        ));
    }
    Ok(PathBuf::from(path))
}

fn parse_metrics_listen(value: &str) -> Result<MetricsListen, ConfigError> {
    if let Some(path) = value.strip_prefix("unix:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        return socket_path("metrics_listen", path).map(MetricsListen::Unix);
    }
    value.parse().map(MetricsListen::Tcp).map_err(|_| {
        invalid(
            "metrics_listen",
            format!("{value:?} is neither an address like \"127.0.0.1:9464\" nor \"unix:/run/ecr-pull-proxy/metrics.sock\""),
        )
    })
}

fn parse_mode(s: &str) -> Result<u32, ConfigError> {
    let mode = u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| {
            invalid(
                "socket_mode",
                format!("{s:?} is not an octal mode like \"0660\""),
            )
        })?;
    if mode & 0o007 != 0 {
        return Err(invalid(
            "socket_mode",
            format!("{s:?} lets every local user reach the socket; use \"0660\" and socket_group instead"),
        ));
    }
    Ok(mode)
}

fn resolve_group(name: &str) -> Result<u32, ConfigError> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(invalid(
            "socket_group",
            format!("group {name:?} does not exist"),
        )),
        Err(e) => Err(invalid(
            "socket_group",
            format!("cannot look up group {name:?}: {e}"),
        )),
    }
}

fn registry_rule(
    i: usize,
    r: &FileRegistry,
    extra_regions: &[String],
) -> Result<RegistryRule, ConfigError> {
    let key = format!("registries[{i}]");
    if r.patterns.is_empty() {
        return Err(invalid(
            format!("{key}.patterns"),
            "needs at least one pattern, e.g. [\"mirror.internal:5000\"]",
        ));
    }
    let patterns = r
        .patterns
        .iter()
        .enumerate()
        .map(|(j, p)| {
            Pattern::new(p)
                .map_err(|e| invalid(format!("{key}.patterns[{j}]"), pattern_message(&e)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let registry = EcrHost::parse(&r.registry).ok_or_else(|| {
        invalid(
            format!("{key}.registry"),
            format!("{:?} is not an ECR registry host like \"123456789012.dkr.ecr.us-east-1.amazonaws.com\"", r.registry),
        )
    })?;
    if !crate::ecr::host::is_known_region(registry.partition, &registry.region, extra_regions) {
        return Err(invalid(
            format!("{key}.registry"),
            format!(
                "region {:?} is not a region of partition {} known to this release; if AWS opened it after, add it to extra_regions",
                registry.region, registry.partition
            ),
        ));
    }
    let role = match &r.role_arn {
        Some(arn) => {
            if !is_role_arn(arn) {
                return Err(invalid(format!("{key}.role_arn"), format!("{arn:?} is not an IAM role ARN like \"arn:aws:iam::123456789012:role/name\"")));
            }
            Some(Role {
                arn: arn.clone(),
                external_id: r.external_id.clone(),
            })
        }
        None if r.external_id.is_some() => {
            return Err(invalid(
                format!("{key}.external_id"),
                "is only used with role_arn; set role_arn or remove it",
            ));
        }
        None => None,
    };
    Ok(RegistryRule {
        patterns,
        registry,
        role,
    })
}

fn pattern_message(e: &PatternError) -> String {
    format!(
        "{e}; patterns look like \"*.dkr.ecr.*.amazonaws.com\" or \"mirror.internal:5000/team\""
    )
}

fn is_role_arn(arn: &str) -> bool {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    parts.len() == 6
        && parts[0] == "arn"
        && parts[1].starts_with("aws")
        && parts[2] == "iam"
        && parts[4].len() == 12
        && parts[4].bytes().all(|b| b.is_ascii_digit())
        && parts[5].starts_with("role/")
        && parts[5].len() > "role/".len()
}

// === kubelet CredentialProviderConfig import ===

struct Imported {
    patterns: Vec<Pattern>,
    cache_duration: Option<Duration>,
}

#[derive(Deserialize)]
struct ProviderConfigFile {
    #[serde(default)]
    providers: Vec<ProviderEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProviderEntry {
    name: String,
    #[serde(default)]
    match_images: Vec<String>,
    default_cache_duration: Option<String>,
}

/// Reads the `ecr-credential-provider` entry of a kubelet
/// `CredentialProviderConfig` (YAML or JSON, as kubelet accepts).
fn import_credential_provider_config(path: &Path) -> Result<Imported, ConfigError> {
    const KEY: &str = "credential_provider_config";
    if let Ok(meta) = std::fs::metadata(path) {
        refuse_world_writable(path, &meta)?;
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(KEY, format!("cannot read {}: {e}", path.display())))?;
    // YAML is a superset of JSON, so one parser reads both forms.
    let file: ProviderConfigFile = serde_yaml::from_str(&text).map_err(|e| {
        invalid(
            KEY,
            format!("{} is not a CredentialProviderConfig: {e}", path.display()),
        )
    })?;
    let entry = file
        .providers
        .into_iter()
        .find(|p| p.name == ECR_PROVIDER_NAME)
        .ok_or_else(|| {
            invalid(
                KEY,
                format!(
                    "{} has no provider named {ECR_PROVIDER_NAME:?}",
                    path.display()
                ),
            )
        })?;
    let patterns = entry
        .match_images
        .iter()
        .map(|p| {
            Pattern::new(p).map_err(|e| {
                invalid(
                    KEY,
                    format!("{}: matchImages: {}", path.display(), pattern_message(&e)),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if patterns.is_empty() {
        return Err(invalid(
            KEY,
            format!(
                "{}: the {ECR_PROVIDER_NAME} entry has no matchImages",
                path.display()
            ),
        ));
    }
    let cache_duration = entry
        .default_cache_duration
        .as_deref()
        .map(|d| {
            humantime::parse_duration(d).map_err(|e| {
                invalid(
                    KEY,
                    format!("{}: defaultCacheDuration {d:?}: {e}", path.display()),
                )
            })
        })
        .transpose()?;
    Ok(Imported {
        patterns,
        cache_duration,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli() -> Cli {
        Cli::try_parse_args(["ecr-pull-proxy"]).unwrap()
    }

    fn err(text: &str) -> String {
        Config::from_toml(text, &cli()).unwrap_err().to_string()
    }

    /// serde lists the accepted fields in its unknown-field error; they must
    /// be exactly `CONFIG_KEYS`.
    #[test]
    fn config_keys_are_exactly_what_the_parser_accepts() {
        fn expected(text: &str) -> Vec<String> {
            let e = err(text);
            let list = e
                .split("expected one of ")
                .nth(1)
                .unwrap_or_else(|| panic!("{e}"));
            list.split(',')
                .map(|k| {
                    k.trim()
                        .trim_matches(|c: char| c == '`' || !c.is_ascii_graphic())
                        .to_owned()
                })
                .filter(|k| !k.is_empty())
                .collect()
        }
        let mut parsed = expected("zzz = 1");
        let entry = "[[registries]]\npatterns = [\"m.example\"]\nregistry = \"123456789012.dkr.ecr.us-east-1.amazonaws.com\"\nzzz = 1";
        parsed.extend(
            expected(entry)
                .into_iter()
                .map(|k| format!("registries.{k}")),
        );
        parsed.sort();
        let mut keys: Vec<String> = CONFIG_KEYS.iter().map(|k| k.to_string()).collect();
        keys.sort();
        assert_eq!(parsed, keys);
    }

    #[test]
    fn defaults_apply_without_a_file() {
        let c = Config::from_toml("", &cli()).unwrap();
        assert_eq!(c.listen, Path::new(DEFAULT_LISTEN));
        assert_eq!(c.upstream, Path::new(DEFAULT_UPSTREAM));
        assert_eq!(c.socket_mode, DEFAULT_SOCKET_MODE);
        assert_eq!(c.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
        assert_eq!(
            c.credentials.existing_credentials,
            ExistingCredentials::Fallback
        );
        assert_eq!(c.credentials.ecr_patterns.len(), DEFAULT_PATTERNS.len());
        assert_eq!(c.credentials.token_wait, DEFAULT_TOKEN_WAIT);
    }

    #[test]
    fn token_wait_takes_a_duration_and_zero_means_no_wait() {
        let c = Config::from_toml("token_wait = \"45s\"", &cli()).unwrap();
        assert_eq!(c.credentials.token_wait, Duration::from_secs(45));
        let c = Config::from_toml("token_wait = \"0s\"", &cli()).unwrap();
        assert_eq!(c.credentials.token_wait, Duration::ZERO);
        let e = err("token_wait = 45");
        assert!(e.contains("token_wait"), "{e}");
    }

    #[test]
    fn flags_win_over_the_file() {
        let cli = Cli::try_parse_args([
            "x",
            "--listen",
            "unix:///tmp/a.sock",
            "--log-level",
            "debug",
        ])
        .unwrap();
        let c = Config::from_toml(
            "listen = \"/tmp/b.sock\"\nlog_level = \"warn\"\nupstream = \"unix:///tmp/c.sock\"",
            &cli,
        )
        .unwrap();
        assert_eq!(c.listen, Path::new("/tmp/a.sock"));
        assert_eq!(c.upstream, Path::new("/tmp/c.sock"));
        assert_eq!(c.log_level, LogLevel::Debug);
    }

    #[test]
    fn mistakes_name_the_key_and_what_is_accepted() {
        let cases: &[(&str, &[&str])] = &[
            ("colour = 1", &["unknown field", "colour"]),
            ("existing_credentials = \"maybe\"", &["maybe", "fallback", "keep", "replace"]),
            ("log_format = \"xml\"", &["xml", "text", "json"]),
            ("shutdown_grace = \"soon\"", &["shutdown_grace"]),
            ("shutdown_grace = 30", &["shutdown_grace"]),
            ("aws_timeout = \"0s\"", &["aws_timeout"]),
            ("socket_mode = \"0666\"", &["socket_mode", "every local user"]),
            ("socket_mode = \"rw\"", &["socket_mode", "octal"]),
            ("socket_group = \"no-such-group-here\"", &["socket_group", "does not exist"]),
            ("listen = \"relative.sock\"", &["listen", "absolute"]),
            ("upstream = \"tcp://1.2.3.4:1\"", &["upstream", "tcp"]),
            ("[[registries]]\npatterns = [\"ok.example\", \"bad[\"]\nregistry = \"123456789012.dkr.ecr.us-east-1.amazonaws.com\"", &["registries[0].patterns[1]"]),
            ("[[registries]]\npatterns = [\"m.example\"]\nregistry = \"docker.io\"", &["registries[0].registry", "ECR"]),
            ("[[registries]]\npatterns = []\nregistry = \"123456789012.dkr.ecr.us-east-1.amazonaws.com\"", &["registries[0].patterns"]),
            ("[[registries]]\npatterns = [\"m.example\"]\nregistry = \"123456789012.dkr.ecr.us-east-1.amazonaws.com\"\nrole_arn = \"role\"", &["registries[0].role_arn"]),
            ("[[registries]]\npatterns = [\"m.example\"]\nregistry = \"123456789012.dkr.ecr.us-east-1.amazonaws.com\"\nexternal_id = \"x\"", &["registries[0].external_id"]),
            ("[[registries]]\npatterns = [\"m.example\"]\nregistry = \"123456789012.dkr.ecr.us-east-1.amazonaws.com\"\nrole = \"x\"", &["unknown field", "role"]),
            ("credential_provider_config = \"/nonexistent/cp.yaml\"", &["credential_provider_config", "cannot read"]),
            ("listen = ", &["config file"]),
            ("metrics_listen = \"localhost\"", &["metrics_listen", "127.0.0.1:9464"]),
            ("metrics_listen = \"unix:relative\"", &["metrics_listen", "absolute"]),
        ];
        for (text, needles) in cases {
            let e = err(text);
            for n in *needles {
                assert!(e.contains(n), "{text:?}: {e:?} should mention {n:?}");
            }
        }
    }

    #[test]
    fn metrics_listen_takes_tcp_or_unix() {
        let c = Config::from_toml("metrics_listen = \"127.0.0.1:9464\"", &cli()).unwrap();
        assert_eq!(
            c.metrics_listen,
            Some(MetricsListen::Tcp("127.0.0.1:9464".parse().unwrap()))
        );
        let c = Config::from_toml("metrics_listen = \"unix:/run/m.sock\"", &cli()).unwrap();
        assert_eq!(
            c.metrics_listen,
            Some(MetricsListen::Unix("/run/m.sock".into()))
        );
        assert_eq!(Config::from_toml("", &cli()).unwrap().metrics_listen, None);
    }

    #[test]
    fn registries_entries_compile() {
        let c = Config::from_toml(
            "default_patterns = false\n[[registries]]\npatterns = [\"mirror.internal:5000\"]\nregistry = \"210987654321.dkr.ecr.eu-west-1.amazonaws.com\"\nrole_arn = \"arn:aws:iam::210987654321:role/pull\"\nexternal_id = \"ext\"",
            &cli(),
        )
        .unwrap();
        assert!(c.credentials.ecr_patterns.is_empty());
        let r = &c.credentials.registries[0];
        assert_eq!(r.registry.region, "eu-west-1");
        assert_eq!(r.role.as_ref().unwrap().external_id.as_deref(), Some("ext"));
        // Neither the role's nor the whole configuration's Debug shows it.
        let role_debug = format!("{:?}", r.role.as_ref().unwrap());
        assert!(role_debug.contains("<redacted>"), "{role_debug}");
        assert!(!role_debug.contains("\"ext\""), "{role_debug}");
        assert!(!format!("{c:?}").contains("\"ext\""));
    }

    #[test]
    fn credential_provider_config_is_imported_from_yaml_and_json() {
        let dir = tempfile::tempdir().unwrap();
        let yaml = dir.path().join("cp.yaml");
        std::fs::write(
            &yaml,
            "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n  - name: ecr-credential-provider\n    matchImages:\n      - \"*.dkr.ecr.*.amazonaws.com\"\n    defaultCacheDuration: \"12h\"\n    apiVersion: credentialprovider.kubelet.k8s.io/v1\n",
        )
        .unwrap();
        let json = dir.path().join("cp.json");
        std::fs::write(
            &json,
            r#"{"apiVersion":"kubelet.config.k8s.io/v1","kind":"CredentialProviderConfig","providers":[{"name":"ecr-credential-provider","matchImages":["*.dkr.ecr.*.amazonaws.com","*.dkr.ecr.*.amazonaws.com.cn"],"defaultCacheDuration":"1h30m","apiVersion":"credentialprovider.kubelet.k8s.io/v1"}]}"#,
        )
        .unwrap();
        let c =
            Config::from_toml(&format!("credential_provider_config = {:?}", yaml), &cli()).unwrap();
        assert_eq!(c.credentials.ecr_patterns.len(), 1);
        assert_eq!(
            c.credentials.max_token_age,
            Some(Duration::from_secs(12 * 3600))
        );
        let c =
            Config::from_toml(&format!("credential_provider_config = {:?}", json), &cli()).unwrap();
        assert_eq!(c.credentials.ecr_patterns.len(), 2);
        assert_eq!(c.credentials.max_token_age, Some(Duration::from_secs(5400)));

        let other = dir.path().join("other.yaml");
        std::fs::write(
            &other,
            "providers:\n  - name: something-else\n    matchImages: [\"x.example\"]\n",
        )
        .unwrap();
        let e = Config::from_toml(&format!("credential_provider_config = {:?}", other), &cli())
            .unwrap_err()
            .to_string();
        assert!(e.contains("ecr-credential-provider"), "{e}");
    }

    #[test]
    fn world_writable_config_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let cli = Cli::try_parse_args(["x", "--config", path.to_str().unwrap()]).unwrap();
        let e = Config::load(&cli).unwrap_err().to_string();
        assert!(
            e.contains("world-writable") && e.contains("chmod o-w"),
            "{e}"
        );
        assert!(matches!(
            Config::load(&cli).unwrap_err(),
            ConfigError::WorldWritable { .. }
        ));
        // An imported CredentialProviderConfig decides who gets the token
        // too.
        let provider = dir.path().join("provider.yaml");
        std::fs::write(
            &provider,
            "providers:\n  - name: ecr-credential-provider\n    matchImages: [\"*.dkr.ecr.*.amazonaws.com\"]\n",
        )
        .unwrap();
        std::fs::set_permissions(&provider, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = Config::from_toml(&format!("credential_provider_config = {provider:?}"), &cli)
            .unwrap_err();
        assert!(matches!(e, ConfigError::WorldWritable { .. }), "{e}");
        std::fs::set_permissions(&provider, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(
            Config::from_toml(&format!("credential_provider_config = {provider:?}"), &cli).is_ok()
        );
        let cli = Cli::try_parse_args(["x", "--config", "/nonexistent/config.toml"]).unwrap();
        assert!(Config::load(&cli)
            .unwrap_err()
            .to_string()
            .contains("cannot read"));
    }
}
