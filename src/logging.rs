//! Log setup. `--log-level` applies to the proxy's own lines; libraries
//! (hyper, h2, the AWS SDK) log warnings only, so no level can make them
//! print request bodies or HTTP exchanges with AWS.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogLevel};

/// Installs the global subscriber, writing to stderr.
pub fn init(level: LogLevel, format: LogFormat) {
    let filter = EnvFilter::new(filter_directives(level));
    // Colours only on a terminal: journald and log files get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
}

/// Libraries at warn, the proxy at `level`. The SDK's "failed to load
/// region from IMDS" warning (the whole error, once per lookup) is left to
/// debug and trace: at the levels a node runs at, the one line
/// `load_sdk_config` logs says the same.
fn filter_directives(level: LogLevel) -> String {
    let imds_region = match level {
        LogLevel::Debug | LogLevel::Trace => "warn",
        _ => "error",
    };
    format!(
        "warn,aws_config::imds::region={imds_region},ecr_pull_proxy={}",
        level.as_str()
    )
}
