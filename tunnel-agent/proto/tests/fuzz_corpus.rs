//! The `decode` fuzz target on stable: replays the committed libFuzzer corpus, then a short
//! mutation run seeded from it (deterministic, so a failure reproduces). The coverage-guided run
//! itself is `fuzz/run.sh` (nightly + cargo-fuzz).

#![allow(clippy::unwrap_used)]

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

include!("../fuzz/check_decode.rs");

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/decode");
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("fuzz corpus {} missing: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    out.sort();
    out
}

#[test]
fn corpus_replays_clean() {
    let corpus = corpus();
    // The committed corpus is libFuzzer's minimised output plus the hand-written seeds; a handful
    // of files would mean it was lost.
    assert!(corpus.len() >= 100, "only {} corpus files", corpus.len());
    let mut decoded_some = 0;
    for (name, data) in &corpus {
        let result = std::panic::catch_unwind(|| check_decode(data));
        assert!(result.is_ok(), "corpus file {name} panics the decoder");
        let mut buf = bytes::BytesMut::from(&data[..]);
        if matches!(tunnel_proto::Decoder::new().decode(&mut buf), Ok(Some(_))) {
            decoded_some += 1;
        }
    }
    // The corpus must reach past the header checks into every payload decoder.
    assert!(
        decoded_some >= 20,
        "only {decoded_some} corpus files decode a frame"
    );
}

#[test]
fn short_mutation_run_from_corpus() {
    let corpus = corpus();
    let mut rng = StdRng::seed_from_u64(0x4655_5a5a);
    for _ in 0..20_000 {
        let (_, base) = &corpus[rng.random_range(0..corpus.len())];
        let mut input = base.clone();
        for _ in 0..rng.random_range(1..6) {
            match rng.random_range(0..4) {
                0 if !input.is_empty() => {
                    let i = rng.random_range(0..input.len());
                    input[i] = rng.random();
                }
                1 if !input.is_empty() => {
                    let i = rng.random_range(0..input.len());
                    input[i] ^= 1 << rng.random_range(0..8);
                }
                2 => {
                    let i = rng.random_range(0..=input.len());
                    input.insert(i, rng.random());
                }
                _ => {
                    // Splice a piece of another corpus entry: frames back to back.
                    let (_, other) = &corpus[rng.random_range(0..corpus.len())];
                    input.extend_from_slice(&other[..rng.random_range(0..=other.len())]);
                }
            }
        }
        check_decode(&input);
    }
}
