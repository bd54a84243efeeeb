//! Wire types and the HTTP client of Meridian's control plane.
//!
//! Every role (edge, GeoDNS, `meridian ctl`) talks to the coordinator through this crate, so it
//! depends on nothing else of ours and carries no server code.

pub mod client;
pub mod delta;
pub mod subscriber;
pub mod token;
pub mod types;

pub use client::{Client, ClientError};
pub use delta::{Delta, DeltaError, DeltaOp, ObservedState};
pub use subscriber::{Subscriber, SubscriberConfig};
pub use types::*;
