//! Frame codec (placeholder: being written).
#![allow(unused)]
use bytes::BytesMut;

use crate::Frame;

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("placeholder")]
    Placeholder,
}

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("placeholder")]
    Placeholder,
}

#[derive(Debug, Default)]
pub struct Decoder;

pub fn encode(frame: &Frame, dst: &mut BytesMut) -> Result<(), EncodeError> {
    Err(EncodeError::Placeholder)
}

pub fn encode_preamble(dst: &mut BytesMut) {}

pub fn decode_preamble(src: &mut BytesMut) -> Result<Option<u8>, DecodeError> {
    Err(DecodeError::Placeholder)
}
