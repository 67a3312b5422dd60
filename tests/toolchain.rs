//! The toolchain and the dependency graph: the minimum Rust version that
//! `Cargo.toml` declares (and the README and `.ci/install` repeat) builds
//! every locked dependency, so a dependency update that needs a newer Rust
//! fails here, not on a newcomer's machine; and the one patched dependency,
//! h2, is exactly its crates.io release plus `third_party/h2-authority.patch`.

use std::process::Command;

/// `1.94.1` → (1, 94, 1); a missing patch counts as 0.
fn version(v: &str) -> (u32, u32, u32) {
    let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}

fn declared() -> String {
    let manifest =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap();
    let table: toml::Table = manifest.parse().unwrap();
    table["package"]["rust-version"]
        .as_str()
        .expect("Cargo.toml declares rust-version")
        .to_owned()
}

/// `cargo metadata` of the whole locked graph. Not `--offline`: that needs
/// every locked crate (Windows-only ones too) in the local cache, which a
/// fresh machine does not have; cargo fetches what is missing.
fn metadata() -> serde_json::Value {
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn no_locked_dependency_needs_a_newer_rust_than_cargo_toml_declares() {
    let ours = declared();
    let meta = metadata();
    let packages = meta["packages"].as_array().unwrap();
    assert!(packages.len() > 100, "the whole locked graph is listed");
    let newer: Vec<String> = packages
        .iter()
        .filter_map(|p| {
            let needs = p["rust_version"].as_str()?;
            (version(needs) > version(&ours))
                .then(|| format!("{} {} needs {needs}", p["name"], p["version"]))
        })
        .collect();
    assert!(
        newer.is_empty(),
        "Cargo.toml says rust-version = {ours}, but:\n{}",
        newer.join("\n")
    );
}

#[test]
fn the_readme_and_the_installer_state_the_declared_minimum() {
    let ours = declared();
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    assert!(
        readme.contains(&format!("Rust {ours} or newer")),
        "README must say `Rust {ours} or newer`"
    );
    let install =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/install")).unwrap();
    assert!(
        install.contains(&format!("Rust {ours} or newer")),
        ".ci/install must say `Rust {ours} or newer`"
    );
}

#[test]
fn versions_compare_numerically() {
    assert!(version("1.94.1") > version("1.94"));
    assert!(version("1.100") > version("1.94.1"));
    assert_eq!(version("1.85"), (1, 85, 0));
}

#[test]
fn h2_is_the_only_patched_dependency_and_comes_from_third_party() {
    let meta = metadata();
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/");
    // Packages without a registry source are path packages: ours, and the
    // patched h2.
    let mut local: Vec<(String, String)> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["source"].is_null())
        .map(|p| {
            let manifest = p["manifest_path"].as_str().unwrap();
            (
                p["name"].as_str().unwrap().to_owned(),
                manifest.strip_prefix(root).unwrap_or(manifest).to_owned(),
            )
        })
        .collect();
    local.sort();
    assert_eq!(
        local,
        [
            ("ecr-pull-proxy".to_owned(), "Cargo.toml".to_owned()),
            ("h2".to_owned(), "third_party/h2/Cargo.toml".to_owned()),
        ]
    );
    // Every h2 in the graph is that one: no registry h2 beside it.
    let registry_h2 = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] == "h2" && !p["source"].is_null())
        .count();
    assert_eq!(registry_h2, 0, "a second, unpatched h2 is in the graph");
}

#[test]
fn vendored_h2_is_the_crates_io_release_plus_the_patch() {
    // Fetches the release named in the script, checks its SHA-256 against
    // the crates.io index, applies the patch and compares with the copy.
    let out = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/third_party/vendor-h2"
    ))
    .arg("--check")
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
