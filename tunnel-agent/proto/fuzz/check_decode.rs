// The body of the `decode` fuzz target, shared by the libFuzzer harness (fuzz_targets/decode.rs,
// nightly + cargo-fuzz) and the stable corpus replay (tests/fuzz_corpus.rs), so both check the
// same properties. Included with `include!`; expects `bytes::BytesMut` and `tunnel_proto::*`.

/// Any panic here is a bug: decoding must never panic, must always make progress, and whatever
/// decodes must re-encode to bytes that decode to the same frame.
pub fn check_decode(data: &[u8]) {
    let _ = tunnel_proto::decode_preamble(&mut bytes::BytesMut::from(data));

    let mut buf = bytes::BytesMut::from(data);
    let mut dec = tunnel_proto::Decoder::new();
    loop {
        let before = buf.len();
        match dec.decode(&mut buf) {
            Ok(Some(frame)) => {
                assert!(buf.len() < before, "decode made no progress");
                let bytes = match tunnel_proto::encode_to_bytes(&frame) {
                    Ok(b) => b,
                    Err(e) => panic!("decoded frame {frame:?} does not re-encode: {e}"),
                };
                let mut again = bytes::BytesMut::from(&bytes[..]);
                assert_eq!(
                    tunnel_proto::Decoder::new()
                        .decode(&mut again)
                        .ok()
                        .flatten(),
                    Some(frame),
                    "re-encoded frame decodes differently"
                );
                assert!(again.is_empty(), "re-encoded frame has trailing bytes");
            }
            Ok(None) | Err(_) => break,
        }
    }
}
