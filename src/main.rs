//! Parse the command line, load the configuration, run. Exit codes: 0 after
//! a clean shutdown, 64 for usage and config errors, 1 for runtime failures.

use std::process::ExitCode;

use ecr_pull_proxy::config::{Cli, Command, Config};

/// `EX_USAGE`: bad usage or configuration; systemd does not restart on it.
const EXIT_USAGE: u8 = 64;

fn main() -> ExitCode {
    let cli = match Cli::try_parse_args(std::env::args_os()) {
        Ok(cli) => cli,
        Err(e) => {
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    let _ = e.print();
                    ExitCode::SUCCESS
                }
                _ => {
                    eprintln!("ecr-pull-proxy: {}", one_line(&e));
                    ExitCode::from(EXIT_USAGE)
                }
            };
        }
    };
    let config = match Config::load(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "ecr-pull-proxy: configuration error: {}",
                ecr_pull_proxy::error_chain(&e)
            );
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Some(Command::Check { image }) = &cli.command {
        return check(&config, image.as_deref());
    }
    ecr_pull_proxy::logging::init(config.log_level, config.log_format);
    // One thread: a call costs the proxy microseconds, and on one thread the
    // tasks of a call (client connection, call, upstream connection) hand
    // over without cross-thread wake-ups, which cost more than the work.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(
                error = &e as &dyn std::error::Error,
                "cannot start the runtime"
            );
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(ecr_pull_proxy::run(cli, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %ecr_pull_proxy::error_chain(&e), "ecr-pull-proxy stopped");
            ExitCode::FAILURE
        }
    }
}

/// clap's error on one line, as every other error is printed: its text
/// without the `error:` prefix and the usage block, plus where to look.
fn one_line(e: &clap::Error) -> String {
    let text = e.to_string();
    let mut parts = text
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more information")
        })
        .map(|l| l.strip_prefix("error: ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join(" ");
    parts.push_str("; see --help");
    parts
}

/// `ecr-pull-proxy check`: prints the report; exit 0 when nothing is wrong,
/// 1 otherwise.
fn check(config: &Config, image: Option<&str>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ecr-pull-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = runtime.block_on(ecr_pull_proxy::ops::check::run(config, image));
    print!("{}", report.render());
    if report.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
