//! The traffic flip: after a commit, the old instances keep serving until the
//! routing processes confirm they serve the new commit, so no request lands on
//! a stopped container. The deploy domain states what it needs as
//! [`RouteServing`]; the daemon implements it by asking the gateway and DNS.

use std::{future::Future, pin::Pin, time::Duration};

use super::record::CommitId;

/// How long cleanup waits for the routing processes to take a commit in.
pub const SERVE_WAIT: Duration = Duration::from_secs(10);
/// Time given to requests already on their way to an old instance when the
/// flip is confirmed, before it is stopped.
pub const DRAIN: Duration = Duration::from_millis(500);

/// What the routing processes said about a commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Served {
    /// Every routing process serves the commit (or a later one).
    Confirmed { by: Vec<String> },
    /// Nothing on this machine routes traffic; there is nothing to wait for.
    NoRouting,
    /// Not confirmed within the wait: why, in words.
    Unconfirmed { detail: String },
}

/// Answers whether this machine's routing serves a commit.
pub trait RouteServing: Send + Sync {
    /// Waits up to `within` for every routing process to serve `commit`.
    fn wait_served<'a>(
        &'a self,
        commit: &'a CommitId,
        within: Duration,
    ) -> Pin<Box<dyn Future<Output = Served> + Send + 'a>>;
}

/// For a machine (or a test) without routing processes.
pub struct NoRouting;

impl RouteServing for NoRouting {
    fn wait_served<'a>(
        &'a self,
        _commit: &'a CommitId,
        _within: Duration,
    ) -> Pin<Box<dyn Future<Output = Served> + Send + 'a>> {
        Box::pin(async { Served::NoRouting })
    }
}
