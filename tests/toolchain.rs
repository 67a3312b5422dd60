//! The minimum Rust version that `Cargo.toml` declares (and the README and
//! `.ci/install` repeat) is one that builds every locked dependency: a
//! dependency update that needs a newer Rust fails here, not on a
//! newcomer's machine.

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

#[test]
fn no_locked_dependency_needs_a_newer_rust_than_cargo_toml_declares() {
    let ours = declared();
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
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
