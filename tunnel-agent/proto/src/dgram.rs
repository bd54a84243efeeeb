//! QUIC packets over a byte stream: the TCP+TLS fallback for networks that block UDP.
//!
//! The fallback does not re-implement the tunnel over another multiplexer: it carries the very
//! same QUIC packets, each prefixed with its length (`u16` BE), over one TLS connection. The
//! edge and the agent run their unchanged QUIC code on top, so streams, flow control, drain and
//! heartbeats behave the same on both transports.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// TLS application protocol of the TCP fallback listener (the outer TLS; QUIC's own TLS inside
/// still uses [`crate::ALPN`]).
pub const TCP_ALPN: &[u8] = b"meridian-tunnel-tcp/1";
/// Bytes of the length prefix.
pub const DATAGRAM_HEADER_LEN: usize = 2;
/// Largest datagram a prefix can describe.
pub const MAX_DATAGRAM: usize = u16::MAX as usize;

/// A malformed datagram stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DatagramError {
    /// A zero-length datagram: no QUIC packet is empty, so the peer is broken.
    #[error("empty datagram in the TCP fallback stream")]
    Empty,
    /// Longer than [`MAX_DATAGRAM`] (encode side only).
    #[error("datagram of {0} bytes does not fit a u16 length prefix")]
    TooLarge(usize),
}

/// Appends `payload` with its length prefix.
pub fn encode_datagram(payload: &[u8], out: &mut BytesMut) -> Result<(), DatagramError> {
    if payload.is_empty() {
        return Err(DatagramError::Empty);
    }
    let len = u16::try_from(payload.len()).map_err(|_| DatagramError::TooLarge(payload.len()))?;
    out.reserve(DATAGRAM_HEADER_LEN + payload.len());
    out.put_u16(len);
    out.put_slice(payload);
    Ok(())
}

/// Takes the next whole datagram off the front of `buf`; `Ok(None)` if more bytes are needed.
/// The buffer never needs to hold more than one datagram plus what was read past it.
pub fn decode_datagram(buf: &mut BytesMut) -> Result<Option<Bytes>, DatagramError> {
    if buf.len() < DATAGRAM_HEADER_LEN {
        return Ok(None);
    }
    let len = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
    if len == 0 {
        return Err(DatagramError::Empty);
    }
    if buf.len() < DATAGRAM_HEADER_LEN + len {
        return Ok(None);
    }
    buf.advance(DATAGRAM_HEADER_LEN);
    Ok(Some(buf.split_to(len).freeze()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn round_trip_byte_by_byte() {
        let mut wire = BytesMut::new();
        encode_datagram(b"hello", &mut wire).unwrap();
        encode_datagram(&[7u8; 1500], &mut wire).unwrap();
        encode_datagram(&vec![1u8; MAX_DATAGRAM], &mut wire).unwrap();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in wire {
            buf.put_u8(b);
            while let Some(d) = decode_datagram(&mut buf).unwrap() {
                got.push(d);
            }
        }
        assert!(buf.is_empty());
        assert_eq!(got.len(), 3);
        assert_eq!(&got[0][..], b"hello");
        assert_eq!(got[1].len(), 1500);
        assert_eq!(got[2].len(), MAX_DATAGRAM);
    }

    #[test]
    fn refuses_empty_and_oversized() {
        let mut out = BytesMut::new();
        assert_eq!(encode_datagram(b"", &mut out), Err(DatagramError::Empty));
        assert_eq!(
            encode_datagram(&vec![0u8; MAX_DATAGRAM + 1], &mut out),
            Err(DatagramError::TooLarge(MAX_DATAGRAM + 1))
        );
        assert!(out.is_empty());
        let mut zero = BytesMut::from(&[0u8, 0, 1][..]);
        assert_eq!(decode_datagram(&mut zero), Err(DatagramError::Empty));
    }
}
