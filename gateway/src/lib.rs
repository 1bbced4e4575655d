//! The Ployz gateway: a long-lived process that proxies traffic to services by
//! the routing table projected from committed deploys, and keeps serving the
//! last good table while ployzd or NATS is away. It must not depend on ployzd.
//!
//! - [`http`]: the HTTP/1.1 and HTTP/2 reverse proxy (Host and longest path
//!   prefix, load balancing, pooled upstream connections, passive health).
//! - [`tls`]: TLS termination, the certificate chosen by SNI.
//! - [`tcp`]: plain TCP routes.

pub mod fuzz;
pub mod http;
pub mod tcp;
pub mod tls;
