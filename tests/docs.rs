//! The README and the systemd unit say what the code does: every config key
//! and default named in the README exists in the code and the reverse, and
//! the unit verifies with the hardening score the README states.

mod support;

use std::process::Command;

use ecr_pull_proxy::config::{self, CONFIG_KEYS};
use ecr_pull_proxy::ecr::{cache, host::DEFAULT_PATTERNS};

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap()
}

/// The cells (trimmed) of each body row of the first table under
/// `heading`.
fn table_rows(readme: &str, heading: &str) -> Vec<Vec<String>> {
    let section = readme
        .split(heading)
        .nth(1)
        .unwrap_or_else(|| panic!("README has no {heading}"));
    section
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .map(|l| l.split('|').map(|c| c.trim().to_owned()).collect())
        .collect()
}

/// The backticked first cells of the first table under `heading`.
fn first_column(readme: &str, heading: &str) -> Vec<String> {
    table_rows(readme, heading)
        .into_iter()
        .map(|cells| cells[1].trim_matches('`').to_owned())
        .collect()
}

#[test]
fn readme_lists_exactly_the_config_keys() {
    let mut documented = first_column(&readme(), "### Config file keys");
    let mut keys: Vec<String> = CONFIG_KEYS.iter().map(|k| k.to_string()).collect();
    documented.sort();
    keys.sort();
    assert_eq!(documented, keys);
}

#[test]
fn readme_lists_exactly_the_metric_families() {
    let mut documented = first_column(&readme(), "## Metrics and health");
    let mut families: Vec<String> = ecr_pull_proxy::ops::metrics::FAMILIES
        .iter()
        .map(|f| f.to_string())
        .collect();
    documented.sort();
    families.sort();
    assert_eq!(documented, families);
}

#[test]
fn install_snippets_name_the_default_socket() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/examples");
    for name in [
        "kubelet-config.yaml",
        "kubelet-dropin.conf",
        "k3s-config.yaml",
        "nodeadm-nodeconfig.yaml",
    ] {
        let text = std::fs::read_to_string(format!("{dir}/{name}")).unwrap();
        assert!(
            text.contains(&format!("unix://{}", config::DEFAULT_LISTEN)),
            "{name} should point at the default socket"
        );
    }
    // The shipped default config parses and changes nothing.
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/config.toml"))
        .unwrap();
    let cli = config::Cli::try_parse_args(["x"]).unwrap();
    let c = config::Config::from_toml(&text, &cli).unwrap();
    assert_eq!(c.listen, std::path::Path::new(config::DEFAULT_LISTEN));
    for key in CONFIG_KEYS.iter().filter(|k| !k.starts_with("registries")) {
        assert!(
            text.contains(&format!("# {key} = ")),
            "the default config should show {key}"
        );
    }
}

/// `(key, default cell)` of each row of the config keys table.
fn default_cells(readme: &str) -> Vec<(String, String)> {
    table_rows(readme, "### Config file keys")
        .into_iter()
        .map(|cells| (cells[1].trim_matches('`').to_owned(), cells[2].clone()))
        .collect()
}

/// Each key's default, in its own cell of the config keys table, is the
/// constant the code uses (a value that merely appears somewhere in the
/// README, as `30s` or `2m` do in prose, does not count).
#[test]
fn each_default_is_the_constant_in_its_table_cell() {
    use config::*;
    let quoted = |s: &str| format!("`\"{s}\"`");
    let duration = |d: std::time::Duration| quoted(&humantime::format_duration(d).to_string());
    let plain = |s: &str| format!("`{s}`");
    let expected = [
        ("listen", plain(DEFAULT_LISTEN)),
        ("upstream", plain(DEFAULT_UPSTREAM)),
        (
            "socket_mode",
            quoted(&format!("{:04o}", DEFAULT_SOCKET_MODE)),
        ),
        ("shutdown_grace", duration(DEFAULT_SHUTDOWN_GRACE)),
        ("log_level", quoted(DEFAULT_LOG_LEVEL.as_str())),
        ("log_format", quoted(DEFAULT_LOG_FORMAT.as_str())),
        (
            "existing_credentials",
            quoted(&DEFAULT_EXISTING_CREDENTIALS.to_string()),
        ),
        ("aws_timeout", duration(DEFAULT_AWS_TIMEOUT)),
        ("token_wait", duration(DEFAULT_TOKEN_WAIT)),
        ("ecr_public", plain(&DEFAULT_ECR_PUBLIC.to_string())),
        (
            "default_patterns",
            plain(&DEFAULT_DEFAULT_PATTERNS.to_string()),
        ),
        ("sandbox_image", quoted(DEFAULT_SANDBOX_IMAGE)),
        ("containerd_config", plain(DEFAULT_CONTAINERD_CONFIG)),
        (
            "sandbox_check_interval",
            duration(DEFAULT_SANDBOX_CHECK_INTERVAL),
        ),
    ];
    let cells = default_cells(&readme());
    for (key, want) in &expected {
        let cell = cells
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, c)| c.as_str())
            .unwrap_or_else(|| panic!("README's config keys table has no row for {key}"));
        assert_eq!(cell, want, "README's default for {key}");
    }
}

#[test]
fn readme_states_the_defaults_the_code_uses() {
    let readme = readme();
    let secs = |d: std::time::Duration| format!("\"{}\"", humantime::format_duration(d));
    let expected = [
        config::DEFAULT_LISTEN.to_owned(),
        config::DEFAULT_UPSTREAM.to_owned(),
        config::DEFAULT_CONFIG_PATH.to_owned(),
        format!("\"{:04o}\"", config::DEFAULT_SOCKET_MODE),
        secs(config::DEFAULT_SHUTDOWN_GRACE),
        secs(config::DEFAULT_AWS_TIMEOUT),
        secs(config::DEFAULT_TOKEN_WAIT),
        format!(
            "within the last {} minutes",
            cache::RETRY_WHILE_WANTED.as_secs() / 60
        ),
        format!("`\"{}\"`", config::DEFAULT_EXISTING_CREDENTIALS),
        format!("`\"{}\"`", config::DEFAULT_SANDBOX_IMAGE),
        format!("`{}`", config::DEFAULT_CONTAINERD_CONFIG),
        secs(config::DEFAULT_SANDBOX_CHECK_INTERVAL),
        format!(
            "from {} s doubling to {} minutes",
            ecr_pull_proxy::sandbox::RETRY_MIN.as_secs(),
            ecr_pull_proxy::sandbox::RETRY_MAX.as_secs() / 60
        ),
        format!("{} bytes", ecr_pull_proxy::budget::MAX_PULL_MESSAGE_SIZE),
        format!("{} minutes", cache::EXPIRY_MARGIN.as_secs() / 60),
        format!("at most {} s", cache::EXPIRED_ON_ARRIVAL_TTL.as_secs()),
        format!(
            "from {} s to {} s",
            cache::ERROR_BACKOFF_MIN.as_secs(),
            cache::ERROR_BACKOFF_MAX.as_secs()
        ),
        format!(
            "within {} s when AWS throttled, then within {} s",
            cache::THROTTLED_FIRST_WINDOW.as_secs(),
            cache::THROTTLED_RETRY_WINDOW.as_secs()
        ),
    ];
    for e in &expected {
        assert!(readme.contains(e.as_str()), "README should state {e}");
    }
    // The memory budget table: each row's bound is its constant's value.
    use ecr_pull_proxy::budget as b;
    use ecr_pull_proxy::transport::{server as srv, upstream as up};
    let rows = [
        format!("| client connections | {} | `MAX_CONNECTIONS` |", srv::MAX_CONNECTIONS),
        format!(
            "| metrics endpoint connections (past it a new one is closed at once) | {} | `MAX_ADMIN_CONNECTIONS` |",
            ecr_pull_proxy::ops::admin::MAX_ADMIN_CONNECTIONS
        ),
        format!(
            "| time a metrics endpoint client has to send its request headers (and an idle keep-alive connection is kept) | {} s | `ADMIN_HEADER_READ_TIMEOUT` |",
            ecr_pull_proxy::ops::admin::ADMIN_HEADER_READ_TIMEOUT.as_secs()
        ),
        format!(
            "| calls per connection | {} (gRPC clients queue beyond it) | `MAX_CONCURRENT_STREAMS` |",
            srv::MAX_CONCURRENT_STREAMS
        ),
        format!(
            "| request data h2 holds per connection | {} | `CALLER_CONNECTION_WINDOW` |",
            size(srv::CALLER_CONNECTION_WINDOW as usize)
        ),
        format!(
            "| answer data h2 holds per call for a slow reader | {} (plus one frame) | `MAX_SEND_BUFFER_PER_STREAM` |",
            size(srv::MAX_SEND_BUFFER_PER_STREAM)
        ),
        format!(
            "| answer data waiting in a connection's own upstream window | {} | `UPSTREAM_CONNECTION_WINDOW` |",
            size(up::UPSTREAM_CONNECTION_WINDOW as usize)
        ),
        format!(
            "| framing overhead of small answer frames waiting there | {} | `UPSTREAM_DATA_FRAME_BUDGET` |",
            size(up::UPSTREAM_DATA_FRAME_BUDGET)
        ),
        format!(
            "| request header block, per call | {} | `MAX_REQUEST_HEADER_LIST_SIZE` |",
            size(srv::MAX_REQUEST_HEADER_LIST_SIZE as usize)
        ),
        format!(
            "| one `PullImage` message | {} | `MAX_PULL_MESSAGE_SIZE` |",
            size(b::MAX_PULL_MESSAGE_SIZE)
        ),
        format!(
            "| `PullImage` messages being read | {} per connection, {} in all | `PULL_BUFFER_PER_CONNECTION`, `PULL_BUFFER_TOTAL` |",
            size(b::PULL_BUFFER_PER_CONNECTION),
            size(b::PULL_BUFFER_TOTAL)
        ),
        format!(
            "| of which each connection has to itself, whatever others send | {} (a hundred real messages) | `PULL_BUFFER_RESERVED` |",
            size(b::PULL_BUFFER_RESERVED)
        ),
        format!(
            "| time for a `PullImage` message to arrive | {} s | `PULL_MESSAGE_TIMEOUT` |",
            b::PULL_MESSAGE_TIMEOUT.as_secs()
        ),
    ];
    for row in &rows {
        assert!(
            readme.contains(row.as_str()),
            "README's memory budget should have the row\n{row}"
        );
    }
    for p in DEFAULT_PATTERNS {
        assert!(
            readme.contains(&format!("`{p}`")),
            "README should list the default pattern {p}"
        );
    }
}

#[test]
fn systemd_unit_verifies_and_its_exposure_is_the_readmes() {
    let analyze = support::require("systemd-analyze", "the Debian package systemd");
    let dir = support::short_tempdir();
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/ecr-pull-proxy.service"
    ))
    .unwrap();
    for needle in [
        "Type=notify",
        "RestartPreventExitStatus=64",
        "Restart=always",
        "Before=kubelet.service k3s.service k3s-agent.service",
        "After=containerd.service",
        "RuntimeDirectory=ecr-pull-proxy",
    ] {
        assert!(unit.contains(needle), "unit should have {needle}");
    }
    // `verify` checks that ExecStart exists: point it at the built binary.
    let unit = unit.replace(
        "ExecStart=/usr/bin/ecr-pull-proxy",
        &format!("ExecStart={}", env!("CARGO_BIN_EXE_ecr-pull-proxy")),
    );
    let path = dir.path().join("ecr-pull-proxy.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new(&analyze)
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "systemd-analyze verify: {text}");
    assert!(
        !text.contains("ecr-pull-proxy.service:"),
        "warnings about the unit: {text}"
    );

    let out = Command::new(&analyze)
        .args(["security", "--offline=true"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let score = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for ecr-pull-proxy.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no exposure level in: {text}"))
        .to_owned();
    assert!(
        readme().contains(&format!("rates it {score} ")),
        "README should state the exposure level {score}"
    );
}

/// Every path the Development table names (backticked in its first
/// column; a name ending in `/` is a folder).
fn development_paths() -> Vec<String> {
    let readme = readme();
    let section = readme
        .split("## Development")
        .nth(1)
        .expect("README has a Development section");
    section
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .flat_map(|l| {
            let cell = l.split('|').nth(1).unwrap().to_owned();
            cell.split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Every file under `dir` (relative to the crate), recursively.
fn files_under(dir: &str) -> Vec<String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    let mut todo = vec![root.join(dir)];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    out
}

#[test]
fn the_development_table_names_every_source_file_and_nothing_else() {
    let named = development_paths();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for path in &named {
        assert!(
            root.join(path).exists(),
            "README names {path}, which does not exist"
        );
    }
    let mut files = files_under("src");
    files.extend(
        files_under("tests")
            .into_iter()
            .filter(|f| f.ends_with(".rs") && f.matches('/').count() == 1),
    );
    let unnamed: Vec<&String> = files
        .iter()
        .filter(|f| {
            !named
                .iter()
                .any(|n| *f == n || (n.ends_with('/') && f.starts_with(n.as_str())))
        })
        .collect();
    assert!(
        unnamed.is_empty(),
        "the README's Development table leaves out {unnamed:?}"
    );
}

/// `2 MiB`, `32 KiB`: how the README writes a size.
fn size(bytes: usize) -> String {
    if bytes.is_multiple_of(1024 * 1024) {
        format!("{} MiB", bytes / (1024 * 1024))
    } else {
        format!("{} KiB", bytes / 1024)
    }
}
