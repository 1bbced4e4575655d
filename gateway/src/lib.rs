//! The Ployz gateway and DNS: two long-lived processes that serve the routing
//! table projected from committed deploys, and keep serving the last good one
//! while ployzd or NATS is away.
//!
//! - [`http`]: the HTTP/1.1 and HTTP/2 reverse proxy (Host and longest path
//!   prefix, load balancing, pooled upstream connections, passive health).
//! - [`tls`]: TLS termination, the certificate chosen by SNI.
//! - [`tcp`]: plain TCP routes.
//! - [`dns`]: the `ployz.internal` zone, and forwarding of every other name.

pub mod dns;
pub mod http;
pub mod tcp;
pub mod tls;
