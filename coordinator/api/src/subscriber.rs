//! Watch-stream subscriber (placeholder: being written).

#[derive(Clone, Debug)]
pub struct SubscriberConfig;

#[derive(Debug)]
pub struct Subscriber;
