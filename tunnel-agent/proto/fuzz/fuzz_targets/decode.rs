//! Feeds arbitrary bytes to the preamble and frame decoders; any panic is a bug.
//! Run: `fuzz/run.sh [seconds]` from tunnel-agent/proto (nightly + cargo-fuzz). The same body
//! replays the committed corpus on stable in `cargo test -p tunnel-proto --test fuzz_corpus`.
#![no_main]

use libfuzzer_sys::fuzz_target;

include!("../check_decode.rs");

fuzz_target!(|data: &[u8]| check_decode(data));
