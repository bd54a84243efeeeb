//! The `answer` fuzz target on stable: replays the committed libFuzzer corpus, then mutations
//! of it, through the same checks (no panic over UDP or TCP; the answer cache agrees with the
//! normal path). The coverage-guided run itself is `fuzz/run.sh` (nightly + cargo-fuzz).

include!("../fuzz/check_answer.rs");

fn corpus() -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/answer");
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("fuzz corpus {} missing: {e}", dir.display()));
    entries
        .map(|e| {
            let path = e
                .unwrap_or_else(|e| panic!("reading the corpus: {e}"))
                .path();
            std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .collect()
}

#[test]
fn fuzz_corpus_replays_clean() {
    let corpus = corpus();
    assert!(corpus.len() >= 20, "corpus has {} inputs", corpus.len());
    for input in &corpus {
        check_answer(input);
    }
}

/// A few thousand deterministic mutations (byte flips, truncations, splices) of the corpus:
/// a stable-toolchain smoke run of what the fuzzer does.
#[test]
fn mutations_of_the_corpus_never_panic_or_disagree() {
    let corpus = corpus();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..5_000 {
        let mut input = corpus[(next() as usize) % corpus.len()].clone();
        match next() % 4 {
            0 if !input.is_empty() => {
                let at = (next() as usize) % input.len();
                input[at] ^= 1 << (next() % 8);
            }
            1 if !input.is_empty() => input.truncate((next() as usize) % input.len()),
            2 => {
                let other = &corpus[(next() as usize) % corpus.len()];
                let at = (next() as usize) % (other.len() + 1);
                input.extend_from_slice(&other[at..]);
            }
            _ => {
                let at = (next() as usize) % (input.len() + 1);
                input.insert(at, next() as u8);
            }
        }
        check_answer(&input);
    }
}
