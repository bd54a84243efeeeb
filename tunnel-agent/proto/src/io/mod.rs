//! Async glue shared by the edge and the agent (feature `io`; the codec itself stays sans-IO).

pub mod fallback;
pub mod udp;
pub mod wire;
