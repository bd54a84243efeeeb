#![no_main]

include!("../check_answer.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| check_answer(data));
