//! HTTP client of the coordinator API (placeholder: being written).
#![allow(missing_docs)]

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("placeholder")]
    Placeholder,
}

#[derive(Clone, Debug)]
pub struct Client;
