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
