//! ployz-routing: the routing domain. Deploy commits carry route facts; this
//! crate projects them into the [`RoutingTable`] the gateway and DNS serve
//! ([`table`]), follows the store for new commits while keeping the last good
//! table on disk ([`source`]), and lets ployzd and operators ask a running
//! gateway or DNS what it serves ([`admin`]).

pub mod admin;
pub mod config;
pub mod process;
pub mod source;
pub mod table;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
pub use table::{
    CommitView, HttpRoute, Instance, NamespaceTable, RouteRecord, RoutingTable, ServiceEntry,
    TcpRoute, TlsFiles, ZONE,
};

/// A table as served, with where it came from. Consumers hold it behind an
/// [`Arc`] from a `tokio::sync::watch` channel and swap it whole: a request is
/// routed by exactly one table.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub table: RoutingTable,
    pub origin: Origin,
    /// When this process took the table in (unix ms).
    pub loaded_at_unix_ms: u64,
}

/// Where a served table came from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// Nothing yet: no store answered and no last good table was on disk.
    #[default]
    Empty,
    /// The last good table saved on disk, served while the store is unreachable.
    LastGood,
    /// Read from the store.
    Store,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Empty => "empty",
            Origin::LastGood => "last-good",
            Origin::Store => "store",
        }
    }
}

/// The shared handle consumers read from.
pub type SnapshotReceiver = tokio::sync::watch::Receiver<Arc<Snapshot>>;

/// Milliseconds since the unix epoch.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

/// An error and its sources, joined with `: `, for one-line logs.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
