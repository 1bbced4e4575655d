//! NATS JetStream store.
