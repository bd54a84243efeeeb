//! Feeds arbitrary bytes to the preamble and frame decoders; any panic is a bug.
//! Run: `cargo +nightly fuzz run decode` from tunnel-agent/proto.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tunnel_proto::{Decoder, decode_preamble, encode_to_bytes};

fuzz_target!(|data: &[u8]| {
    let _ = decode_preamble(&mut BytesMut::from(data));

    let mut buf = BytesMut::from(data);
    let mut dec = Decoder::new();
    loop {
        let before = buf.len();
        match dec.decode(&mut buf) {
            Ok(Some(frame)) => {
                assert!(buf.len() < before, "decode made no progress");
                // Whatever decodes must re-encode to something that decodes to the same frame.
                let bytes = encode_to_bytes(&frame).expect("decoded frame re-encodes");
                let mut again = BytesMut::from(&bytes[..]);
                assert_eq!(Decoder::new().decode(&mut again).ok().flatten(), Some(frame));
            }
            Ok(None) | Err(_) => break,
        }
    }
});
