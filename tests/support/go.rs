//! Go programs the tests and the benchmark build, all packages of one Go
//! module (`tests/support/go.mod`, its dependencies pinned in `go.sum` and
//! fetched from the Go module proxy): the grpc-go caller and transparent
//! proxy, kubelet's matcher and distribution's reference parser
//! (tests/matching.rs), and the pause binary of the tests' pod sandboxes.

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
