#!/usr/bin/env bash
# A real coverage-guided run of the `answer` target, then minimise the corpus back into git.
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). Usage: fuzz/run.sh [seconds]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
rustup toolchain list | grep -q nightly || { echo "needs a nightly toolchain (rustup toolchain install nightly)"; exit 2; }
command -v cargo-fuzz >/dev/null || { echo "needs cargo-fuzz (cargo install cargo-fuzz)"; exit 2; }
cargo +nightly fuzz run answer -- -max_total_time="$secs" -max_len=1024
cargo +nightly fuzz cmin answer
