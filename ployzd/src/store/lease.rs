//! Leases and locks built only on the [`RecordStore`] compare-and-set contract,
//! so they behave the same on every backend. A lease is the record
//! `leases.<name>`; its revision is the fencing token: acquiring, renewing and
//! taking over all change it, and a holder proves it still holds the lease with
//! [`Leases::ensure_held`] right before it commits. Expiry compares wall clocks,
//! so the machines' clocks must agree to well within a TTL.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Key, Record, RecordStore, Revision, StoreError, encode};
use crate::time::{from_unix_ms, unix_ms};

/// Longest TTL a lease may have; longer ones are almost surely unit mistakes.
const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 60 * 60);
/// How many compare-and-set races `acquire` loses before it gives up.
const ACQUIRE_ATTEMPTS: usize = 8;

/// The wall clock leases are judged by. Clones share the same offset, so a test
/// can move the clock of a running [`Leases`] forward.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    /// Added to the system time, in milliseconds.
    offset_ms: Arc<AtomicU64>,
}

impl Clock {
    /// The system's wall clock.
    pub fn system() -> Self {
        Self::default()
    }

    /// The current time as this clock tells it.
    pub fn now(&self) -> SystemTime {
        SystemTime::now() + Duration::from_millis(self.offset_ms.load(Ordering::Relaxed))
    }

    /// Moves this clock (and its clones) forward by `by`, for tests.
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.offset_ms.fetch_add(by, Ordering::Relaxed);
    }
}

/// Acquires, renews and releases leases kept in a [`RecordStore`].
#[derive(Clone, Debug)]
pub struct Leases<S> {
    store: S,
    clock: Clock,
}

/// A lease this process holds, as of its last acquire or renew.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub name: String,
    pub holder: String,
    /// Revision of the lease record: the fencing token. It changes on every
    /// acquire, renew and takeover.
    pub revision: Revision,
    pub acquired_at: SystemTime,
    pub expires_at: SystemTime,
}

/// What the store says about a lease, expired or not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseInfo {
    pub name: String,
    pub holder: String,
    pub revision: Revision,
    pub acquired_at: SystemTime,
    pub expires_at: SystemTime,
}

impl LeaseInfo {
    /// True when the lease has expired at `now`: anyone may take it over.
    pub fn is_expired_at(&self, now: SystemTime) -> bool {
        self.expires_at <= now
    }
}

/// Why a lease operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("lease `{name}` is held by `{holder}` for another {expires_in:?}")]
    Held {
        name: String,
        holder: String,
        expires_in: Duration,
    },
    #[error("lease `{name}` was lost: it expired or another holder took it over")]
    Lost { name: String },
    #[error(
        "invalid lease name `{name}`: use dot-separated segments of letters, digits, `_`, `-`, `=`"
    )]
    InvalidName { name: String },
    #[error("invalid lease TTL {ttl:?}: it must be more than zero and at most {MAX_TTL:?}")]
    InvalidTtl { ttl: Duration },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl LeaseError {
    /// True when someone else holds the lease or won the race for it.
    pub fn is_conflict(&self) -> bool {
        match self {
            LeaseError::Held { .. } | LeaseError::Lost { .. } => true,
            LeaseError::Store(error) => error.is_conflict(),
            LeaseError::InvalidName { .. } | LeaseError::InvalidTtl { .. } => false,
        }
    }

    /// True when retrying the same call later may succeed for a reason other
    /// than the lease changing hands (the store was unreachable).
    pub fn is_retryable(&self) -> bool {
        matches!(self, LeaseError::Store(error) if error.is_retryable())
    }
}

/// The JSON a lease record holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct LeaseRecord {
    holder: String,
    expires_at_unix_ms: u64,
    acquired_at_unix_ms: u64,
}

impl LeaseRecord {
    fn new(holder: &str, acquired_at: SystemTime, expires_at: SystemTime) -> Self {
        Self {
            holder: holder.to_owned(),
            expires_at_unix_ms: unix_ms(expires_at),
            acquired_at_unix_ms: unix_ms(acquired_at),
        }
    }

    fn expires_at(&self) -> SystemTime {
        from_unix_ms(self.expires_at_unix_ms)
    }

    fn acquired_at(&self) -> SystemTime {
        from_unix_ms(self.acquired_at_unix_ms)
    }

    fn into_lease(self, name: &str, revision: Revision) -> Lease {
        Lease {
            name: name.to_owned(),
            revision,
            acquired_at: self.acquired_at(),
            expires_at: self.expires_at(),
            holder: self.holder,
        }
    }
}

fn lease_key(name: &str) -> Result<Key, LeaseError> {
    Key::new(format!("leases.{name}")).map_err(|_| LeaseError::InvalidName {
        name: name.to_owned(),
    })
}

fn check_ttl(ttl: Duration) -> Result<(), LeaseError> {
    if ttl.is_zero() || ttl > MAX_TTL {
        return Err(LeaseError::InvalidTtl { ttl });
    }
    Ok(())
}

impl<S: RecordStore> Leases<S> {
    /// Leases in `store`, judged by the system clock.
    pub fn new(store: S) -> Self {
        Self::with_clock(store, Clock::system())
    }

    /// Leases in `store`, judged by `clock`.
    pub fn with_clock(store: S, clock: Clock) -> Self {
        Self { store, clock }
    }

    /// Takes lease `name` for `holder` for `ttl`: creates it when absent, takes it
    /// over when expired, renews it when `holder` already holds it.
    /// [`LeaseError::Held`] when another holder's lease is live.
    pub async fn acquire(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Lease, LeaseError> {
        let key = lease_key(name)?;
        check_ttl(ttl)?;
        let mut last_conflict = None;
        for _ in 0..ACQUIRE_ATTEMPTS {
            let now = self.clock.now();
            let expires_at = now + ttl;
            let written = match self.store.get(&key).await? {
                None => {
                    let record = LeaseRecord::new(holder, now, expires_at);
                    let value = encode(&key, &record)?;
                    self.store
                        .create(&key, value)
                        .await
                        .map(|revision| (record, revision))
                }
                Some(current) => {
                    let existing: LeaseRecord = current.decode()?;
                    let live = existing.expires_at() > now;
                    if live && existing.holder != holder {
                        return Err(LeaseError::Held {
                            name: name.to_owned(),
                            expires_in: existing
                                .expires_at()
                                .duration_since(now)
                                .unwrap_or_default(),
                            holder: existing.holder,
                        });
                    }
                    // Renewing a live lease keeps its start; a takeover starts anew.
                    let acquired_at = if live { existing.acquired_at() } else { now };
                    let record = LeaseRecord::new(holder, acquired_at, expires_at);
                    let value = encode(&key, &record)?;
                    self.store
                        .update(&key, value, current.revision)
                        .await
                        .map(|revision| (record, revision))
                }
            };
            match written {
                Ok((record, revision)) => return Ok(record.into_lease(name, revision)),
                // Someone wrote the lease between our read and write: look again.
                Err(error) if error.is_conflict() => last_conflict = Some(error),
                Err(error) => return Err(error.into()),
            }
        }
        Err(last_conflict.map_or_else(
            || LeaseError::Lost {
                name: name.to_owned(),
            },
            LeaseError::Store,
        ))
    }

    /// Extends `lease` to `ttl` from now, if nobody has taken it over. Succeeds
    /// even after expiry as long as nobody took the lease meanwhile: the
    /// compare-and-set on its revision decides. The returned lease carries the
    /// new revision.
    pub async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease, LeaseError> {
        let key = lease_key(&lease.name)?;
        check_ttl(ttl)?;
        let record = LeaseRecord::new(&lease.holder, lease.acquired_at, self.clock.now() + ttl);
        let value = encode(&key, &record)?;
        match self.store.update(&key, value, lease.revision).await {
            Ok(revision) => Ok(record.into_lease(&lease.name, revision)),
            Err(error) if error.is_conflict() => Err(LeaseError::Lost {
                name: lease.name.clone(),
            }),
            Err(error) => Err(error.into()),
        }
    }

    /// Proof, right before committing, that `lease` is still held: the record
    /// still has the lease's revision and has not expired.
    pub async fn ensure_held(&self, lease: &Lease) -> Result<(), LeaseError> {
        let key = lease_key(&lease.name)?;
        let lost = || LeaseError::Lost {
            name: lease.name.clone(),
        };
        let record = self.store.get(&key).await?.ok_or_else(lost)?;
        if record.revision != lease.revision {
            return Err(lost());
        }
        let current: LeaseRecord = record.decode()?;
        if current.expires_at() <= self.clock.now() {
            return Err(lost());
        }
        Ok(())
    }

    /// Gives `lease` up so another holder can take it at once.
    /// [`LeaseError::Lost`] when it was taken over or renewed elsewhere meanwhile.
    pub async fn release(&self, lease: &Lease) -> Result<(), LeaseError> {
        let key = lease_key(&lease.name)?;
        match self.store.delete(&key, Some(lease.revision)).await {
            Ok(()) => Ok(()),
            Err(error) if error.is_conflict() => Err(LeaseError::Lost {
                name: lease.name.clone(),
            }),
            Err(error) => Err(error.into()),
        }
    }

    /// The lease `name` as the store has it, expired or not; `None` when nobody
    /// has taken it or it was released.
    pub async fn get(&self, name: &str) -> Result<Option<LeaseInfo>, LeaseError> {
        let key = lease_key(name)?;
        let Some(record) = self.store.get(&key).await? else {
            return Ok(None);
        };
        Ok(Some(lease_info(name, &record)?))
    }

    /// Renews the lease in `current` every third of `ttl` until `shutdown` is
    /// cancelled, publishing each renewed lease (and so its new fencing token)
    /// through `current`. Returns [`LeaseError::Lost`] when the lease is taken
    /// over, or the store error when the store stayed unreachable until the
    /// lease expired. Run it in a task its owner joins.
    pub async fn keep_alive(
        &self,
        current: &watch::Sender<Lease>,
        ttl: Duration,
        shutdown: CancellationToken,
    ) -> Result<(), LeaseError> {
        check_ttl(ttl)?;
        let period = ttl / 3;
        let mut wait = period;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(wait) => {}
            }
            let lease = current.borrow().clone();
            match self.renew(&lease, ttl).await {
                Ok(renewed) => {
                    current.send_replace(renewed);
                    wait = period;
                }
                Err(error) if error.is_retryable() && lease.expires_at > self.clock.now() => {
                    tracing::warn!(lease = %lease.name, error = %error, "cannot renew lease, retrying");
                    wait = (period / 4).max(Duration::from_millis(50));
                }
                Err(error) => return Err(error),
            }
        }
    }
}

fn lease_info(name: &str, record: &Record) -> Result<LeaseInfo, StoreError> {
    let current: LeaseRecord = record.decode()?;
    Ok(LeaseInfo {
        name: name.to_owned(),
        revision: record.revision,
        acquired_at: current.acquired_at(),
        expires_at: current.expires_at(),
        holder: current.holder,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    const TTL: Duration = Duration::from_secs(10);

    fn leases() -> (Leases<MemoryStore>, Clock) {
        let clock = Clock::system();
        (Leases::with_clock(MemoryStore::new(), clock.clone()), clock)
    }

    #[tokio::test]
    async fn expired_lease_is_taken_over_and_the_old_holder_loses_it() {
        let (leases, clock) = leases();
        let first = leases
            .acquire("deploy", "a", TTL)
            .await
            .expect("free lease");
        let held = leases
            .acquire("deploy", "b", TTL)
            .await
            .expect_err("live lease");
        assert!(
            matches!(&held, LeaseError::Held { holder, .. } if holder == "a"),
            "{held:?}"
        );
        assert!(held.is_conflict());

        clock.advance(TTL + Duration::from_millis(1));
        let second = leases
            .acquire("deploy", "b", TTL)
            .await
            .expect("expired lease");
        assert!(second.revision > first.revision);
        assert!(matches!(
            leases.ensure_held(&first).await,
            Err(LeaseError::Lost { .. })
        ));
        assert!(matches!(
            leases.renew(&first, TTL).await,
            Err(LeaseError::Lost { .. })
        ));
        assert!(matches!(
            leases.release(&first).await,
            Err(LeaseError::Lost { .. })
        ));
        leases.ensure_held(&second).await.expect("b holds it");
    }

    #[tokio::test]
    async fn ensure_held_fails_once_expired_even_without_a_takeover() {
        let (leases, clock) = leases();
        let lease = leases
            .acquire("deploy", "a", TTL)
            .await
            .expect("free lease");
        clock.advance(TTL);
        assert!(matches!(
            leases.ensure_held(&lease).await,
            Err(LeaseError::Lost { .. })
        ));
    }

    #[tokio::test]
    async fn reacquiring_a_live_lease_keeps_its_start() {
        let (leases, clock) = leases();
        let first = leases
            .acquire("deploy", "a", TTL)
            .await
            .expect("free lease");
        clock.advance(Duration::from_secs(1));
        let again = leases.acquire("deploy", "a", TTL).await.expect("own lease");
        assert_eq!(again.acquired_at, first.acquired_at);
        assert!(again.expires_at > first.expires_at);
        assert!(again.revision > first.revision);
    }

    #[tokio::test]
    async fn names_and_ttls_are_validated() {
        let (leases, _) = leases();
        for name in ["", "a b", "a.>", "a..b"] {
            assert!(
                matches!(
                    leases.acquire(name, "a", TTL).await,
                    Err(LeaseError::InvalidName { .. })
                ),
                "{name}"
            );
        }
        for ttl in [Duration::ZERO, MAX_TTL + Duration::from_secs(1)] {
            assert!(matches!(
                leases.acquire("deploy", "a", ttl).await,
                Err(LeaseError::InvalidTtl { .. })
            ));
        }
    }

    #[tokio::test]
    async fn the_record_is_the_documented_json() {
        let (leases, _) = leases();
        let lease = leases
            .acquire("deploy", "a", TTL)
            .await
            .expect("free lease");
        let record = leases
            .store
            .get(&Key::new("leases.deploy").expect("valid key"))
            .await
            .expect("get")
            .expect("lease record");
        let json: serde_json::Value = serde_json::from_slice(&record.value).expect("JSON");
        assert_eq!(json["holder"], "a");
        assert_eq!(json["expires_at_unix_ms"], unix_ms(lease.expires_at));
        assert_eq!(json["acquired_at_unix_ms"], unix_ms(lease.acquired_at));
    }

    #[tokio::test(start_paused = true)]
    async fn keep_alive_renews_until_shutdown() {
        let (leases, _) = leases();
        let lease = leases
            .acquire("deploy", "a", TTL)
            .await
            .expect("free lease");
        let (sender, receiver) = watch::channel(lease.clone());
        let shutdown = CancellationToken::new();
        let keeper = {
            let leases = leases.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move { leases.keep_alive(&sender, TTL, shutdown).await })
        };
        tokio::time::sleep(TTL).await;
        let renewed = receiver.borrow().clone();
        assert!(renewed.revision > lease.revision);
        leases.ensure_held(&renewed).await.expect("still held");
        shutdown.cancel();
        keeper.await.expect("keeper task").expect("clean shutdown");
    }

    #[tokio::test(start_paused = true)]
    async fn keep_alive_reports_a_takeover() {
        let (leases, clock) = leases();
        let lease = leases
            .acquire("deploy", "a", TTL)
            .await
            .expect("free lease");
        clock.advance(TTL * 2);
        leases
            .acquire("deploy", "b", TTL)
            .await
            .expect("expired lease");
        let (sender, _receiver) = watch::channel(lease);
        let result = leases
            .keep_alive(&sender, TTL, CancellationToken::new())
            .await;
        assert!(matches!(result, Err(LeaseError::Lost { .. })), "{result:?}");
    }
}
