//! Thin async glue between quinn streams and the sans-IO tunnel codec.

use bytes::BytesMut;
use tunnel_proto::{DecodeError, Decoder, EncodeError, Frame, MAGIC};

/// Largest chunk pulled from QUIC at once; the codec bounds each frame, so the read buffer stays
/// below one frame limit plus one chunk.
const READ_CHUNK: usize = 64 * 1024;

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

/// Reads whole frames from a QUIC receive stream.
pub(crate) struct FrameReader {
    recv: quinn::RecvStream,
    decoder: Decoder,
    buf: BytesMut,
    /// Still willing to skip an optional `MRDN`+version preamble at the very start.
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

    /// Next frame; `Ok(None)` on a clean end of stream between frames. Cancel-safe: bytes read are
    /// kept in the buffer if the future is dropped.
    pub(crate) async fn next(&mut self) -> Result<Option<Frame>, WireError> {
        loop {
            if self.at_start && !self.buf.is_empty() {
                // A peer may prefix any stream with the data-stream preamble; frame type codes
                // never collide with the first magic byte, so one byte tells them apart.
                if self.buf[0] == MAGIC[0]
                    && tunnel_proto::decode_preamble(&mut self.buf)?.is_none()
                {
                    if !self.fill().await? {
                        return Err(WireError::Truncated);
                    }
                    continue;
                }
                self.at_start = false;
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

    /// Reads one more chunk into the buffer; `false` at end of stream.
    async fn fill(&mut self) -> Result<bool, WireError> {
        match self.recv.read_chunk(READ_CHUNK, true).await? {
            Some(chunk) => {
                self.buf.extend_from_slice(&chunk.bytes);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// The stream and any bytes already read past the last frame (raw bytes after a `101`).
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

/// Stream error codes the edge uses when it abandons a stream.
pub(crate) mod code {
    /// The client went away or the request was abandoned.
    pub(crate) const CANCELLED: u32 = 0x1;
    /// The peer broke the protocol.
    pub(crate) const PROTOCOL: u32 = 0x2;
    /// From an agent: it did not start this request (draining), so retrying is always safe.
    pub(crate) const REFUSED: u32 = 0x3;
}
