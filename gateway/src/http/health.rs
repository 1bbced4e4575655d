//! Passive health: an upstream whose TCP connect was refused or timed out is
//! avoided for a cooldown. The state is in memory only and keyed by address,
//! so it survives table swaps; the HTTP proxy and TCP routes both use it.

use std::{collections::HashMap, net::SocketAddr, sync::Mutex, time::Duration};

use tokio::time::Instant;

/// Upstreams in cooldown, with when each cooldown ends.
#[derive(Debug)]
pub struct Cooldowns {
    period: Duration,
    until: Mutex<HashMap<SocketAddr, Instant>>,
}

impl Cooldowns {
    pub fn new(period: Duration) -> Self {
        Self {
            period,
            until: Mutex::new(HashMap::new()),
        }
    }

    /// Records a failed connect: the upstream is avoided for the period.
    pub fn failed(&self, upstream: SocketAddr) {
        let until = Instant::now() + self.period;
        self.lock().insert(upstream, until);
    }

    /// Records a successful connect: the upstream is healthy again.
    pub fn succeeded(&self, upstream: SocketAddr) {
        let mut map = self.lock();
        if !map.is_empty() {
            map.remove(&upstream);
        }
    }

    /// Orders candidates for one attempt sequence: those not cooling down
    /// first, in the given order, then the cooling ones, so that a route whose
    /// upstreams all failed recently is still tried rather than refused.
    pub fn order(&self, candidates: Vec<SocketAddr>) -> Vec<SocketAddr> {
        let now = Instant::now();
        let mut map = self.lock();
        if map.is_empty() {
            return candidates;
        }
        map.retain(|_, until| *until > now);
        let (cooling, healthy): (Vec<_>, Vec<_>) = candidates
            .into_iter()
            .partition(|upstream| map.contains_key(upstream));
        healthy.into_iter().chain(cooling).collect()
    }

    /// Upstreams whose cooldown has not ended, sorted.
    pub fn cooling(&self) -> Vec<SocketAddr> {
        let now = Instant::now();
        let mut cooling: Vec<SocketAddr> = self
            .lock()
            .iter()
            .filter(|(_, until)| **until > now)
            .map(|(upstream, _)| *upstream)
            .collect();
        cooling.sort_unstable();
        cooling
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Instant>> {
        // A panic while holding this lock cannot leave the map inconsistent
        // (every critical section is a single map operation), so recover.
        self.until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[tokio::test(start_paused = true)]
    async fn cooling_upstreams_go_last_until_the_period_ends() {
        let cooldowns = Cooldowns::new(Duration::from_secs(10));
        cooldowns.failed(addr(1));
        assert_eq!(
            cooldowns.order(vec![addr(1), addr(2)]),
            vec![addr(2), addr(1)]
        );
        assert_eq!(cooldowns.cooling(), vec![addr(1)]);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(
            cooldowns.order(vec![addr(1), addr(2)]),
            vec![addr(1), addr(2)]
        );
        assert!(cooldowns.cooling().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn success_ends_a_cooldown() {
        let cooldowns = Cooldowns::new(Duration::from_secs(10));
        cooldowns.failed(addr(1));
        cooldowns.succeeded(addr(1));
        assert!(cooldowns.cooling().is_empty());
    }
}
