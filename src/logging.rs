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

/// A caller-supplied string as a log field value: backslashes, control
/// characters (`\n`, `\r`, …) and spaces are escaped (`\\`, `\n`, `\u{20}`),
/// so that a value (an image name crictl passes through unchecked) can
/// neither forge a second log line nor a `key=value` field of the text
/// format. Valid image references print unchanged.
pub struct Escaped<'a>(pub &'a str);

impl std::fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write;
        for c in self.0.chars() {
            match c {
                '\\' => f.write_str("\\\\")?,
                ' ' => f.write_str("\\u{20}")?,
                c if c.is_control() || c.is_whitespace() => write!(f, "{}", c.escape_default())?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Escaped;

    #[test]
    fn caller_supplied_values_cannot_forge_lines_or_fields() {
        let e = |s: &str| Escaped(s).to_string();
        assert_eq!(
            e("123456789012.dkr.ecr.us-east-1.amazonaws.com/app:v1@sha256:ab"),
            "123456789012.dkr.ecr.us-east-1.amazonaws.com/app:v1@sha256:ab"
        );
        assert_eq!(e("a\nb"), "a\\nb");
        assert_eq!(e("a\r\nlevel=ERROR b"), "a\\r\\nlevel=ERROR\\u{20}b");
        assert_eq!(e("a\\nb"), "a\\\\nb");
        assert_eq!(e("\u{1b}[31m\u{2028}"), "\\u{1b}[31m\\u{2028}");
    }
}
