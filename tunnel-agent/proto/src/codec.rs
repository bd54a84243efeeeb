//! Frame codec: `type: u8 | length: u32 BE | payload`, sans-IO.
//!
//! Payload fields: strings and byte strings are `u16 BE length + bytes`, lists are a `u16 BE`
//! count followed by the items, integers are big-endian, booleans are one byte `0`/`1`. Header
//! lists are a `u16` count followed by `(name, value)` pairs. `Data` is the only frame whose
//! payload is raw (the body bytes themselves), so the decoder can hand it out zero-copy.
//!
//! Every frame type has a payload limit that the decoder checks as soon as the 5-byte frame
//! header has arrived, so a peer can never make us buffer more than the limit for one frame.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::frame::{EdgeEndpoint, Frame, Headers, RequestHead, ResponseHead};
use crate::{MAGIC, PREAMBLE_LEN, VERSION};

/// Length of the frame header: type byte + u32 length.
pub const FRAME_HEADER_LEN: usize = 5;

/// Payload limit for `Data` frames.
pub const MAX_DATA_PAYLOAD: usize = 256 * 1024;
/// Payload limit for head frames (`RequestHead`, `ResponseHead`, `TcpHead`) and `Trailers`.
pub const MAX_HEAD_PAYLOAD: usize = 64 * 1024;
/// Payload limit for every control frame (and `Error`, `End`).
pub const MAX_CONTROL_PAYLOAD: usize = 16 * 1024;

/// Wire type codes. Control frames live in 0x01..=0x0f, data-stream frames in 0x10..=0x1f.
mod code {
    pub(super) const HELLO: u8 = 0x01;
    pub(super) const WELCOME: u8 = 0x02;
    pub(super) const REJECT: u8 = 0x03;
    pub(super) const HEARTBEAT: u8 = 0x04;
    pub(super) const HEARTBEAT_ACK: u8 = 0x05;
    pub(super) const ORIGIN_HEALTH: u8 = 0x06;
    pub(super) const DRAIN: u8 = 0x07;
    pub(super) const GO_AWAY: u8 = 0x08;
    pub(super) const REQUEST_HEAD: u8 = 0x10;
    pub(super) const TCP_HEAD: u8 = 0x11;
    pub(super) const RESPONSE_HEAD: u8 = 0x12;
    pub(super) const ERROR: u8 = 0x13;
    pub(super) const DATA: u8 = 0x14;
    pub(super) const TRAILERS: u8 = 0x15;
    pub(super) const END: u8 = 0x16;
}

/// Payload limit for a wire type code, or `None` if the code is not a known frame type.
pub fn frame_type_limit(type_code: u8) -> Option<usize> {
    use code::*;
    match type_code {
        DATA => Some(MAX_DATA_PAYLOAD),
        REQUEST_HEAD | RESPONSE_HEAD | TCP_HEAD | TRAILERS => Some(MAX_HEAD_PAYLOAD),
        HELLO | WELCOME | REJECT | HEARTBEAT | HEARTBEAT_ACK | ORIGIN_HEALTH | DRAIN | GO_AWAY
        | ERROR | END => Some(MAX_CONTROL_PAYLOAD),
        _ => None,
    }
}

impl Frame {
    /// Wire type code of this frame.
    pub fn type_code(&self) -> u8 {
        match self {
            Self::Hello { .. } => code::HELLO,
            Self::Welcome { .. } => code::WELCOME,
            Self::Reject { .. } => code::REJECT,
            Self::Heartbeat { .. } => code::HEARTBEAT,
            Self::HeartbeatAck { .. } => code::HEARTBEAT_ACK,
            Self::OriginHealth { .. } => code::ORIGIN_HEALTH,
            Self::Drain => code::DRAIN,
            Self::GoAway { .. } => code::GO_AWAY,
            Self::RequestHead(_) => code::REQUEST_HEAD,
            Self::TcpHead { .. } => code::TCP_HEAD,
            Self::ResponseHead(_) => code::RESPONSE_HEAD,
            Self::Error { .. } => code::ERROR,
            Self::Data(_) => code::DATA,
            Self::Trailers(_) => code::TRAILERS,
            Self::End => code::END,
        }
    }

    /// Largest payload allowed for this frame's type (Data 256 KiB, heads and trailers 64 KiB,
    /// control frames 16 KiB).
    pub fn max_payload(&self) -> usize {
        match self {
            Self::Data(_) => MAX_DATA_PAYLOAD,
            Self::RequestHead(_)
            | Self::ResponseHead(_)
            | Self::TcpHead { .. }
            | Self::Trailers(_) => MAX_HEAD_PAYLOAD,
            _ => MAX_CONTROL_PAYLOAD,
        }
    }
}

/// Why bytes could not be decoded. After any error the stream is unusable: close it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("bad magic {0:02x?} (expected \"MRDN\"): not a Meridian tunnel stream")]
    BadMagic([u8; 4]),
    #[error("unsupported protocol version {0} (this build speaks {VERSION})")]
    UnsupportedVersion(u8),
    #[error("unknown frame type {0}")]
    UnknownFrameType(u8),
    #[error("frame too large: type {type_code} payload {len} > limit {limit}")]
    FrameTooLarge {
        type_code: u8,
        len: usize,
        limit: usize,
    },
    #[error("truncated or invalid field `{field}` in frame type {type_code}")]
    Truncated { type_code: u8, field: &'static str },
    #[error("invalid UTF-8 in field `{field}` of frame type {type_code}")]
    InvalidUtf8 { type_code: u8, field: &'static str },
    #[error("invalid boolean {value} in field `{field}` of frame type {type_code}")]
    InvalidBool {
        type_code: u8,
        field: &'static str,
        value: u8,
    },
    #[error("{extra} trailing bytes after the last field of frame type {type_code}")]
    TrailingBytes { type_code: u8, extra: usize },
}

/// Why a frame could not be encoded. Nothing is written to `dst` on error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("field `{field}` is {len} bytes, longer than the u16 length prefix allows (65535)")]
    FieldTooLong { field: &'static str, len: usize },
    #[error("list `{field}` has {len} items, more than the u16 count allows (65535)")]
    TooManyItems { field: &'static str, len: usize },
    #[error("frame too large: type {type_code} payload {len} > limit {limit}")]
    FrameTooLarge {
        type_code: u8,
        len: usize,
        limit: usize,
    },
}

/// Appends the data stream preamble (`MAGIC` + `VERSION`).
pub fn encode_preamble(dst: &mut BytesMut) {
    dst.reserve(PREAMBLE_LEN);
    dst.put_slice(&MAGIC);
    dst.put_u8(VERSION);
}

/// Reads the data stream preamble. `Ok(None)` until 5 bytes are buffered; then consumes them and
/// returns the version, or an error for bad magic or a version this build does not speak.
pub fn decode_preamble(src: &mut BytesMut) -> Result<Option<u8>, DecodeError> {
    if src.len() < PREAMBLE_LEN {
        // Fail fast on a wrong prefix even before all five bytes are here.
        let n = src.len().min(MAGIC.len());
        if src[..n] != MAGIC[..n] {
            let mut got = [0u8; 4];
            got[..n].copy_from_slice(&src[..n]);
            return Err(DecodeError::BadMagic(got));
        }
        return Ok(None);
    }
    let mut got = [0u8; 4];
    got.copy_from_slice(&src[..4]);
    if got != MAGIC {
        return Err(DecodeError::BadMagic(got));
    }
    let version = src[4];
    if version != VERSION {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    src.advance(PREAMBLE_LEN);
    Ok(Some(version))
}

/// Appends one frame to `dst`.
pub fn encode(frame: &Frame, dst: &mut BytesMut) -> Result<(), EncodeError> {
    let type_code = frame.type_code();
    let limit = frame.max_payload();
    if let Frame::Data(data) = frame {
        // Raw payload: no copy through a scratch buffer.
        check_limit(type_code, data.len(), limit)?;
        dst.reserve(FRAME_HEADER_LEN + data.len());
        dst.put_u8(type_code);
        put_len(dst, data.len());
        dst.put_slice(data);
        return Ok(());
    }
    // Write the header with a placeholder length, then patch it; roll back on error so `dst`
    // is untouched when encoding fails.
    let start = dst.len();
    dst.put_u8(type_code);
    dst.put_u32(0);
    let result = encode_payload(frame, dst).and_then(|()| {
        let len = dst.len() - start - FRAME_HEADER_LEN;
        check_limit(type_code, len, limit).map(|()| len)
    });
    match result {
        Ok(len) => {
            let len_bytes = u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes();
            dst[start + 1..start + FRAME_HEADER_LEN].copy_from_slice(&len_bytes);
            Ok(())
        }
        Err(e) => {
            dst.truncate(start);
            Err(e)
        }
    }
}

/// The 5-byte header of a `Data` frame whose payload is `len` bytes, for writers that send the
/// payload as its own buffer instead of copying it behind the header (what [`encode`] does): a
/// QUIC stream takes a list of buffers, so the body bytes need not be copied on the way out.
pub fn data_header(len: usize) -> Result<[u8; FRAME_HEADER_LEN], EncodeError> {
    check_limit(code::DATA, len, MAX_DATA_PAYLOAD)?;
    let mut header = [0u8; FRAME_HEADER_LEN];
    header[0] = code::DATA;
    // Checked against the limit above, far below u32::MAX.
    header[1..].copy_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    Ok(header)
}

/// Encodes one frame into a fresh buffer.
pub fn encode_to_bytes(frame: &Frame) -> Result<Bytes, EncodeError> {
    let mut buf = BytesMut::new();
    encode(frame, &mut buf)?;
    Ok(buf.freeze())
}

fn check_limit(type_code: u8, len: usize, limit: usize) -> Result<(), EncodeError> {
    if len > limit {
        return Err(EncodeError::FrameTooLarge {
            type_code,
            len,
            limit,
        });
    }
    Ok(())
}

fn put_len(dst: &mut BytesMut, len: usize) {
    // Callers checked `len` against a per-type limit far below u32::MAX.
    dst.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
}

fn put_bytes(dst: &mut BytesMut, field: &'static str, b: &[u8]) -> Result<(), EncodeError> {
    let len = u16::try_from(b.len()).map_err(|_| EncodeError::FieldTooLong {
        field,
        len: b.len(),
    })?;
    dst.put_u16(len);
    dst.put_slice(b);
    Ok(())
}

fn put_count(dst: &mut BytesMut, field: &'static str, n: usize) -> Result<(), EncodeError> {
    let n16 = u16::try_from(n).map_err(|_| EncodeError::TooManyItems { field, len: n })?;
    dst.put_u16(n16);
    Ok(())
}

fn put_headers(dst: &mut BytesMut, headers: &Headers) -> Result<(), EncodeError> {
    put_count(dst, "headers", headers.len())?;
    for (name, value) in headers {
        put_bytes(dst, "header name", name)?;
        put_bytes(dst, "header value", value)?;
    }
    Ok(())
}

fn encode_payload(frame: &Frame, dst: &mut BytesMut) -> Result<(), EncodeError> {
    match frame {
        Frame::Hello {
            version,
            token,
            agent_id,
            services,
        } => {
            dst.put_u8(*version);
            put_bytes(dst, "token", token.as_bytes())?;
            put_bytes(dst, "agent_id", agent_id.as_bytes())?;
            put_count(dst, "services", services.len())?;
            for s in services {
                put_bytes(dst, "service", s.as_bytes())?;
            }
        }
        Frame::Welcome {
            edge_id,
            region,
            other_edges,
        } => {
            put_bytes(dst, "edge_id", edge_id.as_bytes())?;
            put_bytes(dst, "region", region.as_bytes())?;
            put_count(dst, "other_edges", other_edges.len())?;
            for e in other_edges {
                put_bytes(dst, "edge_id", e.edge_id.as_bytes())?;
                put_bytes(dst, "region", e.region.as_bytes())?;
                put_bytes(dst, "addr", e.addr.as_bytes())?;
            }
        }
        Frame::Reject { reason } | Frame::GoAway { reason } => {
            put_bytes(dst, "reason", reason.as_bytes())?;
        }
        Frame::Heartbeat { seq } | Frame::HeartbeatAck { seq } => dst.put_u64(*seq),
        Frame::OriginHealth { service, healthy } => {
            put_bytes(dst, "service", service.as_bytes())?;
            dst.put_u8(u8::from(*healthy));
        }
        Frame::Drain | Frame::End => {}
        Frame::RequestHead(head) => {
            put_bytes(dst, "service", head.service.as_bytes())?;
            put_bytes(dst, "method", &head.method)?;
            put_bytes(dst, "uri", &head.uri)?;
            put_headers(dst, &head.headers)?;
        }
        Frame::TcpHead { service } => put_bytes(dst, "service", service.as_bytes())?,
        Frame::ResponseHead(head) => {
            dst.put_u16(head.status);
            put_headers(dst, &head.headers)?;
        }
        Frame::Error { code, message } => {
            dst.put_u16(*code);
            put_bytes(dst, "message", message.as_bytes())?;
        }
        Frame::Trailers(headers) => put_headers(dst, headers)?,
        // Handled in `encode` without the scratch header.
        Frame::Data(data) => dst.put_slice(data),
    }
    Ok(())
}

/// Incremental frame decoder: feed it the bytes read so far, get whole frames out.
#[derive(Debug, Default, Clone)]
pub struct Decoder {
    _private: (),
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Decodes one frame from the front of `src`, consuming exactly its bytes. `Ok(None)` means
    /// more bytes are needed (a frame header with an unknown type or an over-limit length is an
    /// error at once, before its payload arrives).
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        if src.is_empty() {
            return Ok(None);
        }
        let type_code = src[0];
        let limit = frame_type_limit(type_code).ok_or(DecodeError::UnknownFrameType(type_code))?;
        if src.len() < FRAME_HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[1], src[2], src[3], src[4]]) as usize;
        if len > limit {
            return Err(DecodeError::FrameTooLarge {
                type_code,
                len,
                limit,
            });
        }
        let total = FRAME_HEADER_LEN + len;
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        src.advance(FRAME_HEADER_LEN);
        let payload = src.split_to(len).freeze();
        decode_payload(type_code, payload).map(Some)
    }
}

/// Cursor over one frame's payload; every read checks bounds.
struct Reader {
    type_code: u8,
    buf: Bytes,
}

impl Reader {
    fn truncated(&self, field: &'static str) -> DecodeError {
        DecodeError::Truncated {
            type_code: self.type_code,
            field,
        }
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        if self.buf.remaining() < 1 {
            return Err(self.truncated(field));
        }
        Ok(self.buf.get_u8())
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        if self.buf.remaining() < 2 {
            return Err(self.truncated(field));
        }
        Ok(self.buf.get_u16())
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        if self.buf.remaining() < 8 {
            return Err(self.truncated(field));
        }
        Ok(self.buf.get_u64())
    }

    fn bool(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(DecodeError::InvalidBool {
                type_code: self.type_code,
                field,
                value,
            }),
        }
    }

    fn bytes(&mut self, field: &'static str) -> Result<Bytes, DecodeError> {
        let len = usize::from(self.u16(field)?);
        if self.buf.remaining() < len {
            return Err(self.truncated(field));
        }
        Ok(self.buf.split_to(len))
    }

    fn string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let b = self.bytes(field)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::InvalidUtf8 {
            type_code: self.type_code,
            field,
        })
    }

    fn headers(&mut self) -> Result<Headers, DecodeError> {
        let n = usize::from(self.u16("headers")?);
        // Each pair takes at least 4 bytes; don't trust the count for the allocation.
        let mut headers = Vec::with_capacity(n.min(self.buf.remaining() / 4));
        for _ in 0..n {
            let name = self.bytes("header name")?;
            let value = self.bytes("header value")?;
            headers.push((name, value));
        }
        Ok(headers)
    }

    fn finish(self) -> Result<(), DecodeError> {
        if self.buf.has_remaining() {
            return Err(DecodeError::TrailingBytes {
                type_code: self.type_code,
                extra: self.buf.remaining(),
            });
        }
        Ok(())
    }
}

fn decode_payload(type_code: u8, payload: Bytes) -> Result<Frame, DecodeError> {
    if type_code == code::DATA {
        return Ok(Frame::Data(payload));
    }
    let mut r = Reader {
        type_code,
        buf: payload,
    };
    let frame = match type_code {
        code::HELLO => {
            let version = r.u8("version")?;
            let token = r.string("token")?;
            let agent_id = r.string("agent_id")?;
            let n = usize::from(r.u16("services")?);
            let mut services = Vec::with_capacity(n.min(r.buf.remaining() / 2));
            for _ in 0..n {
                services.push(r.string("service")?);
            }
            Frame::Hello {
                version,
                token,
                agent_id,
                services,
            }
        }
        code::WELCOME => {
            let edge_id = r.string("edge_id")?;
            let region = r.string("region")?;
            let n = usize::from(r.u16("other_edges")?);
            let mut other_edges = Vec::with_capacity(n.min(r.buf.remaining() / 6));
            for _ in 0..n {
                other_edges.push(EdgeEndpoint {
                    edge_id: r.string("edge_id")?,
                    region: r.string("region")?,
                    addr: r.string("addr")?,
                });
            }
            Frame::Welcome {
                edge_id,
                region,
                other_edges,
            }
        }
        code::REJECT => Frame::Reject {
            reason: r.string("reason")?,
        },
        code::HEARTBEAT => Frame::Heartbeat { seq: r.u64("seq")? },
        code::HEARTBEAT_ACK => Frame::HeartbeatAck { seq: r.u64("seq")? },
        code::ORIGIN_HEALTH => Frame::OriginHealth {
            service: r.string("service")?,
            healthy: r.bool("healthy")?,
        },
        code::DRAIN => Frame::Drain,
        code::GO_AWAY => Frame::GoAway {
            reason: r.string("reason")?,
        },
        code::REQUEST_HEAD => Frame::RequestHead(RequestHead {
            service: r.string("service")?,
            method: r.bytes("method")?,
            uri: r.bytes("uri")?,
            headers: r.headers()?,
        }),
        code::TCP_HEAD => Frame::TcpHead {
            service: r.string("service")?,
        },
        code::RESPONSE_HEAD => Frame::ResponseHead(ResponseHead {
            status: r.u16("status")?,
            headers: r.headers()?,
        }),
        code::ERROR => Frame::Error {
            code: r.u16("code")?,
            message: r.string("message")?,
        },
        code::TRAILERS => Frame::Trailers(r.headers()?),
        code::END => Frame::End,
        other => return Err(DecodeError::UnknownFrameType(other)),
    };
    r.finish()?;
    Ok(frame)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn hdrs(pairs: &[(&str, &[u8])]) -> Headers {
        pairs
            .iter()
            .map(|(n, v)| {
                (
                    Bytes::copy_from_slice(n.as_bytes()),
                    Bytes::copy_from_slice(v),
                )
            })
            .collect()
    }

    /// One of every variant, with non-trivial contents.
    fn all_frames() -> Vec<Frame> {
        vec![
            Frame::Hello {
                version: VERSION,
                token: "tok-123".into(),
                agent_id: "a1b2c3d4e5f6".into(),
                services: vec!["shop".into(), "api".into()],
            },
            Frame::Welcome {
                edge_id: "edge-1".into(),
                region: "eu".into(),
                other_edges: vec![
                    EdgeEndpoint {
                        edge_id: "edge-2".into(),
                        region: "us".into(),
                        addr: "127.0.0.2:7844".into(),
                    },
                    EdgeEndpoint {
                        edge_id: "edge-3".into(),
                        region: "ap".into(),
                        addr: "[::1]:7844".into(),
                    },
                ],
            },
            Frame::Reject {
                reason: "bad token".into(),
            },
            Frame::Heartbeat { seq: 7 },
            Frame::HeartbeatAck { seq: u64::MAX },
            Frame::OriginHealth {
                service: "shop".into(),
                healthy: true,
            },
            Frame::OriginHealth {
                service: "shop".into(),
                healthy: false,
            },
            Frame::Drain,
            Frame::GoAway {
                reason: "restarting".into(),
            },
            Frame::RequestHead(RequestHead {
                service: "shop".into(),
                method: Bytes::from_static(b"POST"),
                uri: Bytes::from_static(b"/cart?id=1"),
                headers: hdrs(&[("host", b"example.com"), ("x-bin", &[0, 255, 10])]),
            }),
            Frame::TcpHead {
                service: "db".into(),
            },
            Frame::ResponseHead(ResponseHead {
                status: 200,
                headers: hdrs(&[("content-type", b"text/plain")]),
            }),
            Frame::Error {
                code: 502,
                message: "connection refused".into(),
            },
            Frame::Data(Bytes::from_static(b"hello world")),
            Frame::Data(Bytes::new()),
            Frame::Data(Bytes::from(vec![0xab; MAX_DATA_PAYLOAD])),
            Frame::Trailers(hdrs(&[("grpc-status", b"0")])),
            Frame::Trailers(Vec::new()),
            Frame::End,
        ]
    }

    #[test]
    fn round_trip_every_variant() {
        for frame in all_frames() {
            let mut buf = BytesMut::new();
            encode(&frame, &mut buf).unwrap();
            assert!(buf.len() - FRAME_HEADER_LEN <= frame.max_payload());
            let got = Decoder::new().decode(&mut buf).unwrap().unwrap();
            assert_eq!(got, frame);
            assert!(buf.is_empty(), "decoder must consume exactly one frame");
        }
    }

    #[test]
    fn back_to_back_frames_and_byte_at_a_time() {
        let frames = all_frames();
        let mut wire = BytesMut::new();
        encode_preamble(&mut wire);
        for f in &frames {
            encode(f, &mut wire).unwrap();
        }
        let mut buf = BytesMut::new();
        let mut dec = Decoder::new();
        let mut got = Vec::new();
        let mut preamble = None;
        for &b in wire.iter() {
            buf.put_u8(b);
            if preamble.is_none() {
                preamble = decode_preamble(&mut buf).unwrap();
                continue;
            }
            while let Some(f) = dec.decode(&mut buf).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(preamble, Some(VERSION));
        assert_eq!(got, frames);
        assert!(buf.is_empty());
    }

    #[test]
    fn data_is_zero_copy() {
        let mut buf = BytesMut::new();
        encode(&Frame::Data(Bytes::from_static(b"abcdef")), &mut buf).unwrap();
        let base = buf.as_ptr() as usize;
        let Some(Frame::Data(d)) = Decoder::new().decode(&mut buf).unwrap() else {
            panic!("expected data")
        };
        assert_eq!(d.as_ptr() as usize, base + FRAME_HEADER_LEN);
    }

    #[test]
    fn oversized_length_rejected_before_payload() {
        for (code, limit) in [
            (code::DATA, MAX_DATA_PAYLOAD),
            (code::REQUEST_HEAD, MAX_HEAD_PAYLOAD),
            (code::HELLO, MAX_CONTROL_PAYLOAD),
        ] {
            let mut buf = BytesMut::new();
            buf.put_u8(code);
            buf.put_u32(u32::try_from(limit + 1).unwrap());
            let err = Decoder::new().decode(&mut buf).unwrap_err();
            assert_eq!(
                err,
                DecodeError::FrameTooLarge {
                    type_code: code,
                    len: limit + 1,
                    limit
                }
            );
            assert!(err.to_string().contains("too large"));
        }
        // u32::MAX length: rejected, no allocation attempted.
        let mut buf = BytesMut::from(&[code::DATA, 0xff, 0xff, 0xff, 0xff][..]);
        assert!(Decoder::new().decode(&mut buf).is_err());
    }

    #[test]
    fn encode_rejects_oversized() {
        let mut buf = BytesMut::from(&b"keep"[..]);
        let err = encode(
            &Frame::Data(Bytes::from(vec![0; MAX_DATA_PAYLOAD + 1])),
            &mut buf,
        )
        .unwrap_err();
        assert!(matches!(err, EncodeError::FrameTooLarge { .. }));
        let err = encode(
            &Frame::Reject {
                reason: "x".repeat(70_000),
            },
            &mut buf,
        )
        .unwrap_err();
        assert!(matches!(err, EncodeError::FieldTooLong { .. }));
        // Within u16 but over the 16 KiB control limit.
        let err = encode(
            &Frame::Reject {
                reason: "x".repeat(20_000),
            },
            &mut buf,
        )
        .unwrap_err();
        assert!(matches!(err, EncodeError::FrameTooLarge { .. }));
        assert_eq!(&buf[..], b"keep", "failed encode leaves dst untouched");
    }

    #[test]
    fn unknown_type_is_an_error_immediately() {
        for t in [0u8, 0x09, 0x0f, 0x17, 0xff] {
            let mut buf = BytesMut::from(&[t][..]);
            let err = Decoder::new().decode(&mut buf).unwrap_err();
            assert_eq!(err, DecodeError::UnknownFrameType(t));
            assert_eq!(err.to_string(), format!("unknown frame type {t}"));
        }
    }

    #[test]
    fn truncated_payloads_are_errors() {
        for frame in all_frames() {
            let mut full = BytesMut::new();
            encode(&frame, &mut full).unwrap();
            let payload_len = full.len() - FRAME_HEADER_LEN;
            if matches!(frame, Frame::Data(_)) || payload_len == 0 {
                continue;
            }
            // Claim a shorter payload than the fields need.
            for cut in 0..payload_len {
                let mut buf = BytesMut::new();
                buf.put_u8(full[0]);
                buf.put_u32(u32::try_from(cut).unwrap());
                buf.put_slice(&full[FRAME_HEADER_LEN..FRAME_HEADER_LEN + cut]);
                let res = Decoder::new().decode(&mut buf);
                assert!(res.is_err(), "{frame:?} cut at {cut} decoded: {res:?}");
            }
            // And a longer one: trailing bytes.
            let mut buf = BytesMut::new();
            buf.put_u8(full[0]);
            buf.put_u32(u32::try_from(payload_len + 1).unwrap());
            buf.put_slice(&full[FRAME_HEADER_LEN..]);
            buf.put_u8(0);
            assert!(matches!(
                Decoder::new().decode(&mut buf),
                Err(DecodeError::TrailingBytes { extra: 1, .. })
            ));
        }
    }

    #[test]
    fn invalid_utf8_and_bool() {
        let mut buf = BytesMut::new();
        buf.put_u8(code::REJECT);
        buf.put_u32(4);
        buf.put_u16(2);
        buf.put_slice(&[0xff, 0xfe]);
        let err = Decoder::new().decode(&mut buf).unwrap_err();
        assert!(matches!(
            err,
            DecodeError::InvalidUtf8 {
                field: "reason",
                ..
            }
        ));
        assert!(err.to_string().contains("invalid UTF-8"));

        let mut buf = BytesMut::new();
        buf.put_u8(code::ORIGIN_HEALTH);
        buf.put_u32(4);
        buf.put_u16(1);
        buf.put_u8(b's');
        buf.put_u8(2);
        assert!(matches!(
            Decoder::new().decode(&mut buf),
            Err(DecodeError::InvalidBool { value: 2, .. })
        ));
    }

    #[test]
    fn preamble() {
        let mut buf = BytesMut::new();
        encode_preamble(&mut buf);
        assert_eq!(&buf[..], b"MRDN\x01");
        buf.put_u8(0x16);
        assert_eq!(decode_preamble(&mut buf).unwrap(), Some(VERSION));
        assert_eq!(&buf[..], &[0x16]);

        let mut short = BytesMut::from(&b"MRD"[..]);
        assert_eq!(decode_preamble(&mut short).unwrap(), None);
        assert_eq!(short.len(), 3);

        let mut bad = BytesMut::from(&b"GET /"[..]);
        assert!(matches!(
            decode_preamble(&mut bad),
            Err(DecodeError::BadMagic(_))
        ));
        let mut bad_early = BytesMut::from(&b"GE"[..]);
        assert!(matches!(
            decode_preamble(&mut bad_early),
            Err(DecodeError::BadMagic(_))
        ));

        let mut v2 = BytesMut::from(&b"MRDN\x02"[..]);
        let err = decode_preamble(&mut v2).unwrap_err();
        assert_eq!(err, DecodeError::UnsupportedVersion(2));
        assert_eq!(
            err.to_string(),
            "unsupported protocol version 2 (this build speaks 1)"
        );
    }

    #[test]
    fn pseudo_fuzz_random_bytes_never_panic() {
        let mut rng = StdRng::seed_from_u64(0x4d52_444e);
        let valid: Vec<Bytes> = all_frames()
            .iter()
            .filter(|f| !matches!(f, Frame::Data(d) if d.len() > 1024))
            .map(|f| encode_to_bytes(f).unwrap())
            .collect();
        for i in 0..5000 {
            let mut input = BytesMut::new();
            if i % 2 == 0 {
                // Pure garbage, sometimes starting with a plausible type byte.
                let len = rng.random_range(0..64);
                for _ in 0..len {
                    input.put_u8(rng.random());
                }
                if len > 0 && rng.random_bool(0.5) {
                    input[0] = rng.random_range(0x01..=0x16);
                }
            } else {
                // Mutated valid frames.
                let base = &valid[rng.random_range(0..valid.len())];
                input.put_slice(base);
                for _ in 0..rng.random_range(1..4) {
                    let idx = rng.random_range(0..input.len());
                    input[idx] = rng.random();
                }
                if rng.random_bool(0.3) {
                    let keep = rng.random_range(0..input.len());
                    input.truncate(keep);
                }
            }
            let _ = decode_preamble(&mut input.clone());
            let mut dec = Decoder::new();
            // Decode until error or need-more; each step must make progress.
            loop {
                let before = input.len();
                match dec.decode(&mut input) {
                    Ok(Some(_)) => assert!(input.len() < before),
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }

    /// Regenerates the fuzz seed corpus: `WRITE_FUZZ_SEEDS=1 cargo test -p tunnel-proto`.
    #[test]
    fn fuzz_seed_corpus() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/decode");
        let write = std::env::var_os("WRITE_FUZZ_SEEDS").is_some();
        if write {
            std::fs::create_dir_all(&dir).unwrap();
        }
        for (i, frame) in all_frames().iter().enumerate() {
            if matches!(frame, Frame::Data(d) if d.len() > 1024) {
                continue;
            }
            let bytes = encode_to_bytes(frame).unwrap();
            let path = dir.join(format!("seed-{i:02}"));
            if write {
                std::fs::write(&path, &bytes).unwrap();
            } else if let Ok(on_disk) = std::fs::read(&path) {
                // Committed seeds must still decode to the frame they were made from.
                let mut buf = BytesMut::from(&on_disk[..]);
                assert_eq!(
                    Decoder::new().decode(&mut buf).unwrap().as_ref(),
                    Some(frame)
                );
            }
        }
    }
    #[test]
    fn data_header_plus_payload_is_the_encoded_frame() {
        for len in [0usize, 1, 16, 64 * 1024, MAX_DATA_PAYLOAD] {
            let payload = Bytes::from(vec![0xab; len]);
            let mut whole = BytesMut::new();
            encode(&Frame::Data(payload.clone()), &mut whole).unwrap();
            let mut split = data_header(len).unwrap().to_vec();
            split.extend_from_slice(&payload);
            assert_eq!(&whole[..], &split[..], "len {len}");
            // And it decodes back to the same frame.
            let mut buf = BytesMut::from(&split[..]);
            assert_eq!(
                Decoder::new().decode(&mut buf).unwrap(),
                Some(Frame::Data(payload))
            );
        }
        assert!(matches!(
            data_header(MAX_DATA_PAYLOAD + 1),
            Err(EncodeError::FrameTooLarge { len, .. }) if len == MAX_DATA_PAYLOAD + 1
        ));
    }
}
