//! Thin async glue between quinn streams and the sans-IO codec.

use bytes::{BufMut, Bytes, BytesMut};
use tunnel_proto::{DecodeError, Decoder, EncodeError, FRAME_HEADER_LEN, Frame, MAGIC};

/// Largest chunk pulled from QUIC at once; the codec bounds each frame, so the buffer stays below
/// one frame limit plus one chunk.
const READ_CHUNK: usize = 64 * 1024;

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

#[derive(Debug, thiserror::Error)]
pub(crate) enum WireError {
    #[error("tunnel decode: {0}")]
    Decode(#[from] DecodeError),
    #[error("tunnel encode: {0}")]
    Encode(#[from] EncodeError),
    #[error("tunnel read: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("tunnel write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("tunnel stream ended in the middle of a frame")]
    Truncated,
}

/// Reads whole frames from a QUIC receive stream. Cancel-safe: bytes read stay buffered if a
/// `next()` future is dropped.
pub(crate) struct FrameReader {
    recv: quinn::RecvStream,
    decoder: Decoder,
    buf: BytesMut,
    /// The stream may start with the `MRDN`+version preamble; frame type codes never equal
    /// `MAGIC[0]`, so the first byte tells them apart.
    at_start: bool,
}

impl FrameReader {
    pub(crate) fn new(recv: quinn::RecvStream) -> Self {
        Self {
            recv,
            decoder: Decoder::new(),
            buf: BytesMut::new(),
            at_start: true,
        }
    }

    /// Next frame; `Ok(None)` on a clean end of stream between frames.
    pub(crate) async fn next(&mut self) -> Result<Option<Frame>, WireError> {
        loop {
            if self.at_start && !self.buf.is_empty() {
                if self.buf[0] == MAGIC[0] {
                    if tunnel_proto::decode_preamble(&mut self.buf)?.is_some() {
                        self.at_start = false;
                    }
                } else {
                    self.at_start = false;
                }
            }
            if !self.at_start
                && let Some(frame) = self.decoder.decode(&mut self.buf)?
            {
                return Ok(Some(frame));
            }
            if !self.fill().await? {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(WireError::Truncated)
                };
            }
        }
    }

    async fn fill(&mut self) -> Result<bool, WireError> {
        match self.recv.read_chunk(READ_CHUNK, true).await? {
            Some(chunk) => {
                self.buf.extend_from_slice(&chunk.bytes);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// The stream and any bytes read past the last frame (raw bytes after a `101`).
    pub(crate) fn into_parts(self) -> (quinn::RecvStream, BytesMut) {
        (self.recv, self.buf)
    }

    pub(crate) fn stop(&mut self, code: u32) {
        let _ = self.recv.stop(quinn::VarInt::from_u32(code));
    }
}

/// Encodes and writes one frame.
pub(crate) async fn write_frame(
    send: &mut quinn::SendStream,
    frame: &Frame,
) -> Result<(), WireError> {
    let mut buf = BytesMut::new();
    tunnel_proto::encode(frame, &mut buf)?;
    send.write_all(&buf).await?;
    Ok(())
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
