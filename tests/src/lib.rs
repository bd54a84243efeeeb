//! Shared helpers for the end-to-end suites: find and start the real `meridian` binary, and talk
//! to it with real HTTPS, QUIC and DNS clients.

// Test fixtures: a panic here is how a failed precondition reports itself to the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod clients;
pub mod dev;
pub mod durability;

use std::path::PathBuf;

/// The `meridian` binary, built from this workspace's sources (override with `MERIDIAN_BIN`).
///
/// `cargo test --workspace` does not build another package's binary for this one, so the first
/// call runs `cargo build -p meridian` (a no-op when it is fresh). That also means a suite can never
/// run against a binary older than the code under test.
pub fn meridian_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("MERIDIAN_BIN") {
            return PathBuf::from(p);
        }
        // target/<profile>/deps/<test-binary> → target/<profile>/meridian
        let exe = std::env::current_exe().expect("current_exe");
        let profile_dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = std::process::Command::new(cargo);
        build.args(["build", "-p", "meridian", "--bin", "meridian"]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        if let Some(target) = profile_dir.parent() {
            build.env("CARGO_TARGET_DIR", target);
        }
        let status = build.status().expect("run cargo build -p meridian");
        assert!(status.success(), "cargo build -p meridian failed");
        let bin = profile_dir.join("meridian");
        assert!(
            bin.exists(),
            "{} is missing after cargo build",
            bin.display()
        );
        bin
    })
    .clone()
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

/// Runs a command to completion (no stdin) and returns what it printed; for namespace and
/// firewall setup in the suites that need root.
pub fn sh(args: &[&str]) -> std::process::Output {
    std::process::Command::new(args[0])
        .args(&args[1..])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run command")
}

/// [`sh`], failing the test with the command's stderr unless it succeeds.
pub fn must(args: &[&str]) {
    let out = sh(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
