//! What the NATS integration tests share.

use std::time::Duration;

use ployzd::store::nats::NatsStore;
use tokio::time::{Instant, sleep};

/// How long a cluster may take to agree on something a test waits for.
pub const SETTLE: Duration = Duration::from_secs(30);

/// Polls `store.cluster_peers()` until it reads `expected`; answers how long
/// that took. Panics after [`SETTLE`].
pub async fn wait_for_peers(store: &NatsStore, expected: usize) -> Duration {
    let started = Instant::now();
    loop {
        let peers = store.cluster_peers().await;
        if matches!(peers, Ok(count) if count == expected) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < SETTLE,
            "the cluster still has {peers:?} servers, not {expected}, after {SETTLE:?}"
        );
        sleep(Duration::from_millis(100)).await;
    }
}
