//! Frames over quinn streams: `tunnel_proto::io::wire` (shared with the edge), plus the agent's
//! zero-copy `Data` writer and stream error codes.

use bytes::{BufMut, Bytes, BytesMut};
use tunnel_proto::{FRAME_HEADER_LEN, Frame};

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

/// Writes `data` as `Data` frames of at most `max` bytes each, without copying the payload.
pub(crate) async fn write_data(
    send: &mut quinn::SendStream,
    mut data: Bytes,
    max: usize,
) -> Result<(), WireError> {
    let type_code = Frame::Data(Bytes::new()).type_code();
    while !data.is_empty() {
        let chunk = data.split_to(data.len().min(max));
        let mut header = BytesMut::with_capacity(FRAME_HEADER_LEN);
        header.put_u8(type_code);
        // `max` is far below u32::MAX (a frame limit).
        header.put_u32(u32::try_from(chunk.len()).unwrap_or(u32::MAX));
        send.write_chunk(header.freeze()).await?;
        send.write_chunk(chunk).await?;
    }
    Ok(())
}

/// Resets a send stream with `code`, ignoring "already closed".
pub(crate) fn reset(send: &mut quinn::SendStream, code: u32) {
    let _ = send.reset(quinn::VarInt::from_u32(code));
}
