//! Go programs the tests and the benchmark build from Debian's sources
//! (GOPATH mode, no Go module proxy needed): the grpc-go caller and
//! transparent proxy, kubelet's matcher and distribution's reference parser
//! (tests/matching.rs), and the pause binary of the tests' pod sandboxes.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::require;

/// Where Debian's golang-*-dev packages put their sources.
const DEBIAN_GOPATH: &str = "/usr/share/gocode";

/// Builds the Go program in `tests/support/<dir>` into the target's temp
/// directory as `name` (a few seconds; Go caches the rest).
pub fn build(dir: &str, name: &str) -> PathBuf {
    let go = require("go", "golang-go and golang-google-grpc-dev (Debian)");
    assert!(
        Path::new(DEBIAN_GOPATH)
            .join("src/google.golang.org/grpc")
            .is_dir(),
        "grpc-go sources not found under {DEBIAN_GOPATH}: install golang-google-grpc-dev (`.ci/install` does this)"
    );
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/support")
        .join(dir);
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let binary = out_dir.join(name);
    let out = Command::new(go)
        .args(["build", "-o"])
        .arg(&binary)
        .arg(".")
        .current_dir(source)
        .env("GO111MODULE", "off")
        // Static binaries: the pause binary runs in an image with nothing
        // else in it.
        .env("CGO_ENABLED", "0")
        .env("GOPATH", DEBIAN_GOPATH)
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
