//! Frames over quinn streams: `tunnel_proto::io::wire` (shared with the agent), plus the
//! stream error codes the edge uses.

pub(crate) use tunnel_proto::io::wire::{FrameReader, WireError, write_frame};

/// Stream error codes the edge uses when it abandons a stream.
pub(crate) mod code {
    /// The client went away or the request was abandoned.
    pub(crate) const CANCELLED: u32 = 0x1;
    /// The peer broke the protocol.
    pub(crate) const PROTOCOL: u32 = 0x2;
    /// From an agent: it did not start this request (draining), so retrying is always safe.
    pub(crate) const REFUSED: u32 = 0x3;
}
