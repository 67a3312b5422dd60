//! Go programs the tests and the benchmark build, all packages of one Go
//! module (`tests/support/go.mod`, its dependencies pinned in `go.sum` and
//! fetched from the Go module proxy): the grpc-go caller and transparent
//! proxy, kubelet's matcher and distribution's reference parser
//! (tests/matching.rs), and the pause binary of the tests' pod sandboxes.
//! Modules of their own beside it pin what must not share its graph:
//! kubelet130 and kubelet137 (kubelet builds, kubelet's own matcher) and
//! ecr_provider (ecr-credential-provider's source).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::require;

/// Builds the Go program in `tests/support/<dir>` into the target's temp
/// directory as `name` (a few seconds; Go caches the rest).
pub fn build(dir: &str, name: &str) -> PathBuf {
    build_module(".", dir, name)
}

/// Builds the Go program in `tests/support/<module>/<dir>`, a package of
/// the Go module `tests/support/<module>` (its own go.mod and go.sum), as
/// `name`. The first build of a module downloads its dependencies.
pub fn build_module(module: &str, dir: &str, name: &str) -> PathBuf {
    let go = require(
        "go",
        "Go 1.26 or newer (`.ci/install` fetches it if missing)",
    );
    let module = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/support")
        .join(module);
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let binary = out_dir.join(name);
    let out = Command::new(go)
        .args(["build", "-o"])
        .arg(&binary)
        .arg(format!("./{dir}"))
        .current_dir(module)
        // go.sum is the pin: a build never edits go.mod or go.sum.
        .env("GOFLAGS", "-mod=readonly")
        // Static binaries: the pause binary runs in an image with nothing
        // else in it.
        .env("CGO_ENABLED", "0")
        .env("GOCACHE", out_dir.join("go-build"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "building {dir} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    binary
}

/// Where the Go module `path`, a requirement of `tests/support/<module>`
/// pinned in its go.sum, is unpacked (downloaded and checked against go.sum
/// first if it is not yet in the module cache).
pub fn module_dir(module: &str, path: &str) -> PathBuf {
    let go = require(
        "go",
        "Go 1.26 or newer (`.ci/install` fetches it if missing)",
    );
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/support")
        .join(module);
    let out = Command::new(go)
        .args(["mod", "download", "-json", path])
        .current_dir(dir)
        .env("GOFLAGS", "-mod=readonly")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "go mod download {path} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Download {
        dir: PathBuf,
    }
    let download: Download = serde_json::from_slice(&out.stdout).unwrap();
    download.dir
}
