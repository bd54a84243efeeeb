//! Meridian's tunnel wire protocol, sans-IO: bytes in, frames out.
//!
//! One QUIC connection per (agent, edge). The agent opens the first bidirectional stream, the
//! *control stream*: `Hello` → `Welcome` | `Reject`, then heartbeats, origin health, `Drain`,
//! `GoAway`. Every other stream is a *data stream* opened by the edge, one per request: the
//! preamble (`MRDN` + version byte), a head frame (`RequestHead` or `TcpHead`), then body frames
//! (`Data`*, optional `Trailers`, `End`). The agent answers with `ResponseHead` (or `Error`), then
//! body frames. After a `101` response head, both directions carry raw bytes (WebSocket and other
//! upgrades); a `TcpHead` stream carries raw bytes both ways from the start.
//!
//! Frame layout: `type: u8 | length: u32 BE | payload`. Each frame type has a size limit
//! ([`Frame::max_payload`]); a longer frame is an error, never a large allocation.

mod codec;
mod dgram;
mod frame;
#[cfg(feature = "io")]
pub mod io;

pub use codec::{
    DecodeError, Decoder, EncodeError, FRAME_HEADER_LEN, MAX_CONTROL_PAYLOAD, MAX_DATA_PAYLOAD,
    MAX_HEAD_PAYLOAD, data_header, decode_preamble, encode, encode_preamble, encode_to_bytes,
    frame_type_limit,
};
pub use dgram::{
    DATAGRAM_HEADER_LEN, DatagramError, MAX_DATAGRAM, TCP_ALPN, decode_datagram, encode_datagram,
};
pub use frame::{EdgeEndpoint, Frame, Headers, RequestHead, ResponseHead};

/// QUIC/TLS application protocol name.
pub const ALPN: &[u8] = b"meridian-tunnel/1";
/// Protocol version carried in `Hello` and in every data stream preamble.
pub const VERSION: u8 = 1;
/// First bytes of every data stream.
pub const MAGIC: [u8; 4] = *b"MRDN";
/// Length of the data stream preamble (`MAGIC` + version).
pub const PREAMBLE_LEN: usize = 5;
