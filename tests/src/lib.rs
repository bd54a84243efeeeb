//! Shared helpers for the end-to-end suites: find and start the real `meridian` binary, and talk
//! to it with real HTTPS, QUIC and DNS clients.

// Test fixtures: a panic here is how a failed precondition reports itself to the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod clients;
pub mod dev;

use std::path::PathBuf;

/// The `meridian` binary cargo built next to this test executable (override with `MERIDIAN_BIN`).
pub fn meridian_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MERIDIAN_BIN") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<test-binary> → target/<profile>/meridian
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("meridian");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p meridian`",
        bin.display()
    );
    bin
}

/// Whether an external tool (a Debian package's binary) is on PATH. Suites that need one call
/// this: where it is missing, the suite fails under CI (which installs `.ci/packages`) and is
/// skipped, loudly, on a developer machine that lacks it.
pub fn have_tool(name: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(name).is_file()));
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{name} is missing; .ci/run installs it from .ci/packages"
        );
        eprintln!("SKIPPED: {name} is not installed (apt-get install it, or run .ci/run)");
    }
    found
}
