//! Frames over quinn streams: `tunnel_proto::io::wire` (shared with the edge), plus the agent's
//! zero-copy `Data` writer and stream error codes.

use bytes::Bytes;

pub(crate) use tunnel_proto::io::wire::{FrameReader, WireError, write_frame};

/// Stream error codes (QUIC application error codes on RESET_STREAM / STOP_SENDING).
pub(crate) mod code {
    /// Normal: we no longer need the rest of the peer's data.
    pub(crate) const DONE: u32 = 0x0;
    /// The request was abandoned.
    pub(crate) const CANCELLED: u32 = 0x1;
    /// The peer broke the protocol.
    pub(crate) const PROTOCOL: u32 = 0x2;
    /// The agent is draining and did not start this request: safe for the edge to retry it.
    pub(crate) const REFUSED: u32 = 0x3;
    /// The origin failed after the response head was sent (or, for raw TCP, could not be reached).
    pub(crate) const ORIGIN: u32 = 0x4;
    /// A raw TCP stream for a service this agent has no TCP origin for.
    pub(crate) const REFUSED_TCP: u32 = 0x5;
}

/// Writes `data` as `Data` frames of at most `max` bytes each, without copying the payload, in
/// one stream write (one lock of the connection and one wake-up of its driver, not two per frame).
pub(crate) async fn write_data(
    send: &mut quinn::SendStream,
    data: Bytes,
    max: usize,
) -> Result<(), WireError> {
    let mut chunks = data_chunks(data, max)?;
    send.write_all_chunks(&mut chunks).await?;
    Ok(())
}

/// `data` as `Data` frames of at most `max` bytes: header and payload buffers alternating, the
/// payloads sharing `data`'s memory. Nothing for empty `data`.
fn data_chunks(mut data: Bytes, max: usize) -> Result<Vec<Bytes>, WireError> {
    let max = max.max(1);
    let mut chunks = Vec::with_capacity(2 * data.len().div_ceil(max));
    while !data.is_empty() {
        let payload = data.split_to(data.len().min(max));
        let header = tunnel_proto::data_header(payload.len())?;
        chunks.push(Bytes::copy_from_slice(&header));
        chunks.push(payload);
    }
    Ok(chunks)
}

/// Resets a send stream with `code`, ignoring "already closed".
pub(crate) fn reset(send: &mut quinn::SendStream, code: u32) {
    let _ = send.reset(quinn::VarInt::from_u32(code));
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use bytes::{Bytes, BytesMut};
    use tunnel_proto::{Decoder, Frame};

    use super::data_chunks;

    #[test]
    fn data_chunks_are_frames_sharing_the_payload() {
        let data = Bytes::from((0..200_000u32).map(|i| i as u8).collect::<Vec<_>>());
        let chunks = data_chunks(data.clone(), 64 * 1024).unwrap();
        assert_eq!(chunks.len(), 8, "4 frames: 3 full, 1 partial");
        // Payloads point into `data`: nothing was copied.
        assert_eq!(chunks[1].as_ptr(), data.as_ptr());
        let mut wire = BytesMut::new();
        for c in &chunks {
            wire.extend_from_slice(c);
        }
        let mut decoder = Decoder::new();
        let mut back = Vec::new();
        while let Some(frame) = decoder.decode(&mut wire).unwrap() {
            let Frame::Data(d) = frame else {
                panic!("not a Data frame")
            };
            assert!(d.len() <= 64 * 1024);
            back.extend_from_slice(&d);
        }
        assert!(wire.is_empty());
        assert_eq!(back, data);
        assert!(data_chunks(Bytes::new(), 64 * 1024).unwrap().is_empty());
    }
}
