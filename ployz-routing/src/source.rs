//! Where a routing process gets its table: the last good table on disk at
//! start, then the store. [`StoreFollower`] reads every namespace's latest
//! deploy commit from the NATS KV bucket, publishes a table only once it has
//! caught up with everything committed (never a half-read table), follows new
//! commits as they land, and saves each published table as the new last good
//! one. When NATS goes away the current table keeps being served; on return
//! the follower rebuilds from the store and publishes once caught up again.
//! It authenticates with the configured user and password, if any, and reaches
//! JetStream through the configured domain when its NATS server is a leaf node.

use std::{
    io::{self, Write as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    Origin, Snapshot,
    config::SourceConfig,
    now_unix_ms,
    table::{CommitView, RoutingTable, parse_commit_key},
};

/// The last good table's file in the state directory.
pub const LAST_GOOD_FILE: &str = "table.json";
const FORMAT_VERSION: u32 = 1;
const RECONNECT_MIN: Duration = Duration::from_millis(250);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on catching up after connecting: finding the stream, creating the
/// consumer and reading every commit it holds. A stalled catch-up (seen once
/// on a leaf server whose connection to the core came up meanwhile) is
/// retried on a new connection instead of waited for forever. Once caught up,
/// a quiet feed is normal and nothing is bounded.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the last good table could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read the last good table `{path}`")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the last good table `{path}` is not valid")]
    Decode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("the last good table `{path}` has format version {found}, expected {FORMAT_VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("cannot save the last good table in `{dir}`")]
    Write {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

#[derive(Serialize, Deserialize)]
struct LastGood {
    version: u32,
    saved_at_unix_ms: u64,
    table: RoutingTable,
}

/// Reads the last good table, `None` when none was ever saved.
pub fn load_last_good(state_dir: &Path) -> Result<Option<RoutingTable>, SourceError> {
    let path = state_dir.join(LAST_GOOD_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(SourceError::Read { path, source }),
    };
    let saved: LastGood = serde_json::from_slice(&bytes).map_err(|source| SourceError::Decode {
        path: path.clone(),
        source,
    })?;
    if saved.version != FORMAT_VERSION {
        return Err(SourceError::Version {
            path,
            found: saved.version,
        });
    }
    Ok(Some(saved.table))
}

/// Saves `table` as the last good one: written to a temporary file, synced,
/// then renamed over the old one, so a crash leaves either table whole.
pub fn save_last_good(state_dir: &Path, table: &RoutingTable) -> Result<(), SourceError> {
    let write = || -> io::Result<()> {
        std::fs::create_dir_all(state_dir)?;
        let saved = LastGood {
            version: FORMAT_VERSION,
            saved_at_unix_ms: now_unix_ms(),
            table: table.clone(),
        };
        let bytes = serde_json::to_vec(&saved).map_err(io::Error::other)?;
        let temporary = state_dir.join(format!("{LAST_GOOD_FILE}.tmp"));
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::rename(&temporary, state_dir.join(LAST_GOOD_FILE))?;
        std::fs::File::open(state_dir)?.sync_all()
    };
    write().map_err(|source| SourceError::Write {
        dir: state_dir.to_owned(),
        source,
    })
}

/// The first snapshot to serve: the last good table if there is one. A
/// corrupt file is reported and treated as absent; the store will refill it.
pub fn initial_snapshot(state_dir: &Path) -> Snapshot {
    match load_last_good(state_dir) {
        Ok(Some(table)) => Snapshot {
            table,
            origin: Origin::LastGood,
            loaded_at_unix_ms: now_unix_ms(),
        },
        Ok(None) => Snapshot::default(),
        Err(error) => {
            warn!(error = %crate::error_chain(&error), "ignoring the last good table");
            Snapshot::default()
        }
    }
}

/// How the follower stands with the store, for status answers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FollowerStatus {
    /// Whether the follower is caught up with the store right now.
    pub in_sync: bool,
    /// When it last caught up (unix ms).
    pub last_sync_unix_ms: Option<u64>,
    /// Why it is not in sync, if it knows.
    pub last_error: Option<String>,
}

/// Follows deploy commits in the store and publishes tables.
pub struct StoreFollower {
    config: SourceConfig,
    snapshots: watch::Sender<Arc<Snapshot>>,
    status: watch::Sender<FollowerStatus>,
}

impl StoreFollower {
    pub fn new(
        config: SourceConfig,
        snapshots: watch::Sender<Arc<Snapshot>>,
        status: watch::Sender<FollowerStatus>,
    ) -> Self {
        Self {
            config,
            snapshots,
            status,
        }
    }

    /// Runs until `shutdown` is cancelled. Without a NATS URL it only serves
    /// the last good table.
    pub async fn run(self, shutdown: CancellationToken) {
        let Some(url) = self.config.nats_url.clone() else {
            info!("no store configured; serving the last good table only");
            return;
        };
        let mut delay = RECONNECT_MIN;
        loop {
            let synced_before = self.status.borrow().last_sync_unix_ms;
            let outcome = tokio::select! {
                outcome = self.follow(&url) => outcome,
                () = shutdown.cancelled() => return,
            };
            let reason = match outcome {
                Ok(()) => "the store closed the commit feed".to_owned(),
                Err(reason) => reason,
            };
            self.status.send_modify(|status| {
                if status.in_sync || status.last_error.as_deref() != Some(reason.as_str()) {
                    warn!(%reason, "lost the store; serving the current table");
                }
                status.in_sync = false;
                status.last_error = Some(reason);
            });
            // A connection that caught up earns a quick retry; repeated
            // failures back off.
            if self.status.borrow().last_sync_unix_ms != synced_before {
                delay = RECONNECT_MIN;
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.cancelled() => return,
            }
            delay = (delay * 2).min(RECONNECT_MAX);
        }
    }

    /// One connection's worth of following: catch up, publish, follow.
    async fn follow(&self, url: &str) -> Result<(), String> {
        let options = match &self.config.credentials {
            Some(credentials) => async_nats::ConnectOptions::with_user_and_password(
                credentials.user.clone(),
                credentials.password.clone(),
            ),
            None => async_nats::ConnectOptions::new(),
        };
        let client = options
            .connection_timeout(CONNECT_TIMEOUT)
            .max_reconnects(Some(1))
            .name("ployz-routing")
            .connect(url)
            .await
            .map_err(|error| format!("cannot connect to {url}: {error}"))?;
        // Through a leaf node only the domain's API subjects reach JetStream.
        // Stored messages keep their `$KV.<bucket>.<key>` subjects either way,
        // so keys are read the same.
        let jetstream = match &self.config.jetstream_domain {
            Some(domain) => jetstream::with_domain(client, domain),
            None => jetstream::new(client),
        };
        let catch_up = tokio::time::Instant::now() + CATCH_UP_TIMEOUT;
        let stalled = |what: &str| format!("{what} did not finish within {CATCH_UP_TIMEOUT:?}");
        let stream_name = format!("KV_{}", self.config.bucket);
        let stream = tokio::time::timeout_at(catch_up, jetstream.get_stream(&stream_name))
            .await
            .map_err(|_| stalled("looking up the commit stream"))?
            .map_err(|error| {
            if !is_no_responders(&error) {
                return format!("no commits yet: stream `{stream_name}`: {error}");
            }
            // async-nats words this "requested JetStream resource does not
            // exist", which reads like a missing bucket; it is a missing JetStream.
            match &self.config.jetstream_domain {
                Some(domain) => format!(
                    "no JetStream answers in domain `{domain}` at {url} (stream `{stream_name}`)"
                ),
                None => format!(
                    "no JetStream answers at {url} (stream `{stream_name}`); \
                     a leaf node needs `jetstream_domain`"
                ),
            }
        })?;
        let subject_prefix = format!("$KV.{}.", self.config.bucket);
        let consumer = tokio::time::timeout_at(
            catch_up,
            stream.create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: format!("{subject_prefix}{}>", crate::table::COMMIT_KEY_PREFIX),
                deliver_policy: DeliverPolicy::LastPerSubject,
                ..Default::default()
            }),
        )
        .await
        .map_err(|_| stalled("creating the commit consumer"))?
        .map_err(|error| format!("cannot follow commits: {error}"))?;
        let mut pending = consumer.cached_info().num_pending;
        let mut messages = tokio::time::timeout_at(catch_up, consumer.messages())
            .await
            .map_err(|_| stalled("opening the commit feed"))?
            .map_err(|error| format!("cannot follow commits: {error}"))?;

        // A table built from the store alone; published only when caught up.
        let mut table = RoutingTable::default();
        let mut caught_up = false;
        if pending == 0 {
            self.publish(&table);
            caught_up = true;
        }
        loop {
            let next = if caught_up {
                messages.next().await
            } else {
                tokio::time::timeout_at(catch_up, messages.next())
                    .await
                    .map_err(|_| stalled(&format!("reading {pending} pending commit(s)")))?
            };
            let Some(message) = next else {
                break;
            };
            let message = message.map_err(|error| format!("commit feed failed: {error}"))?;
            if let Ok(info) = message.info() {
                pending = info.pending;
            }
            let key = message.subject.as_str().strip_prefix(&subject_prefix);
            let changed = match key.and_then(parse_commit_key) {
                Some(_) if is_delete(&message) => false,
                Some((namespace, seq)) => match CommitView::decode(&message.payload) {
                    Ok(view) if view.commit.namespace == namespace && view.commit.seq == seq => {
                        table.apply(&view)
                    }
                    Ok(_) => {
                        warn!(subject = %message.subject, "commit names another key; skipped");
                        false
                    }
                    Err(error) => {
                        warn!(subject = %message.subject, %error, "undecodable commit; skipped");
                        false
                    }
                },
                None => false,
            };
            if pending == 0 && (changed || !caught_up) {
                self.publish(&table);
                caught_up = true;
            }
        }
        Ok(())
    }

    fn publish(&self, table: &RoutingTable) {
        let now = now_unix_ms();
        let changed = self.snapshots.borrow().table != *table
            || self.snapshots.borrow().origin != Origin::Store;
        if changed {
            let commits: Vec<String> = table
                .commits()
                .map(|(namespace, seq)| format!("{namespace}/{seq}"))
                .collect();
            info!(?commits, "serving the routing table from the store");
            self.snapshots.send_replace(Arc::new(Snapshot {
                table: table.clone(),
                origin: Origin::Store,
                loaded_at_unix_ms: now,
            }));
            if let Err(error) = save_last_good(&self.config.state_dir, table) {
                warn!(error = %crate::error_chain(&error), "the last good table was not saved");
            }
        } else {
            debug!("caught up with the store; table unchanged");
        }
        self.status.send_modify(|status| {
            status.in_sync = true;
            status.last_sync_unix_ms = Some(now);
            status.last_error = None;
        });
    }
}

/// Whether nothing answered the JetStream request: no JetStream on the server,
/// or, through a leaf node, none in the domain asked.
fn is_no_responders(error: &jetstream::context::GetStreamError) -> bool {
    std::error::Error::source(error)
        .and_then(|source| source.downcast_ref::<jetstream::context::RequestError>())
        .is_some_and(|source| source.kind() == jetstream::context::RequestErrorKind::NoResponders)
}

fn is_delete(message: &async_nats::jetstream::Message) -> bool {
    message
        .headers
        .as_ref()
        .and_then(|headers| headers.get("KV-Operation"))
        .is_some_and(|operation| matches!(operation.as_str(), "DEL" | "PURGE"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::NamespaceTable;

    #[test]
    fn last_good_round_trips_and_absent_is_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(load_last_good(dir.path()).expect("absent is fine"), None);
        let mut table = RoutingTable::default();
        table.namespaces.insert(
            "shop".to_owned(),
            NamespaceTable {
                seq: 4,
                committed_at_unix_ms: 1,
                services: Default::default(),
                http: Vec::new(),
                tcp: Vec::new(),
            },
        );
        save_last_good(dir.path(), &table).expect("saved");
        assert_eq!(
            load_last_good(dir.path()).expect("read"),
            Some(table.clone())
        );
        let snapshot = initial_snapshot(dir.path());
        assert_eq!(snapshot.origin, Origin::LastGood);
        assert_eq!(snapshot.table, table);
    }

    #[test]
    fn a_corrupt_last_good_table_is_an_error_and_serves_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(LAST_GOOD_FILE), b"{not json").expect("write");
        assert!(matches!(
            load_last_good(dir.path()),
            Err(SourceError::Decode { .. })
        ));
        assert_eq!(initial_snapshot(dir.path()).origin, Origin::Empty);
    }
}
