//! NATS JetStream store: records live in a KV bucket, whose revisions are the
//! sequence of the stream behind it (one counter for the whole bucket), and the
//! event log is a file-backed stream with one subject per topic. No async-nats
//! type leaves this module.

use std::{
    collections::BTreeMap,
    error::Error as StdError,
    fmt,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use async_nats::{
    Client, ConnectOptions, HeaderMap,
    jetstream::{
        self, ErrorCode,
        consumer::{AckPolicy, DeliverPolicy, pull},
        kv::{self, Operation},
        message::StreamMessage,
        stream::{self, StorageType},
    },
};
use bytes::Bytes;
use futures::StreamExt;
use tokio::{sync::mpsc, time::Instant};
use tokio_util::task::AbortOnDropHandle;

use super::{
    Event, EventLog, Key, KeyPrefix, Record, RecordStore, Revision, Sequence, StoreError,
    WatchEvent, WatchStream,
};
use crate::error_chain;

/// How many versions of each key the bucket keeps.
const HISTORY: i64 = 16;
/// The header JetStream KV uses to mark deletes and purges.
const KV_OPERATION_HEADER: &str = "KV-Operation";
/// How long a server keeps the consumer of an abandoned list or read.
const SCAN_CONSUMER_INACTIVE_THRESHOLD: Duration = Duration::from_secs(30);
/// Most messages asked for in one pull request while scanning.
const SCAN_BATCH: usize = 1024;
/// How many times a list or read tries before giving up on a transient failure.
const SCAN_ATTEMPTS: u32 = 5;
/// Longest wait for the next message of a pull while the consumer still
/// has messages pending. Longer means the pull or its answer was lost (seen
/// through a leaf server in its first seconds), and the scan starts over
/// with a new consumer instead of waiting out the whole scan timeout.
const SCAN_STALL: Duration = Duration::from_secs(2);
/// How many times `create` retries after losing a race against a delete.
const CREATE_ATTEMPTS: usize = 8;
/// Every server in the cluster answers this with its statistics, whether or
/// not it has connections of the asking account. The server imports it into
/// every account, so it needs no system-account credentials.
const SERVER_PING_SUBJECT: &str = "$SYS.REQ.ACCOUNT.PING.STATZ";
const SERVER_PING_BODY: &[u8] = br#"{"include_unused":true}"#;
/// How long [`NatsStore::cluster_peers`] waits for the next server's answer
/// before it counts what it has: all servers answer at once, so the gap
/// after the last one is about the slowest round trip over the overlay.
const SERVER_PING_QUIET: Duration = Duration::from_millis(500);
/// How long [`NatsStore::set_replicas`] waits for every copy to be current.
const REPLICAS_CURRENT_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on collecting the answers to one server ping.
const SERVER_PING_TIMEOUT: Duration = Duration::from_secs(3);

type BoxError = Box<dyn StdError + Send + Sync>;

/// Where and how to reach NATS, and the names of the bucket and stream to use.
#[derive(Clone, Debug)]
pub struct NatsStoreConfig {
    /// Server URL, e.g. `nats://127.0.0.1:4222`.
    pub url: String,
    /// KV bucket holding the records.
    pub bucket: String,
    /// Stream holding the event log.
    pub events_stream: String,
    /// Subject prefix of the event log: topic `deploy.app` is published on
    /// `<prefix>.deploy.app`. The stream captures `<prefix>.>`.
    pub events_subject_prefix: String,
    /// Copies JetStream keeps of the bucket and the stream.
    pub replicas: usize,
    /// Time allowed for one connection attempt.
    pub connect_timeout: Duration,
    /// Time allowed for every connection attempt and the bucket and stream setup
    /// together; retryable failures (a JetStream leader election) are retried
    /// until it runs out.
    pub startup_timeout: Duration,
    /// Time allowed for one list or read, which may take several round trips.
    pub scan_timeout: Duration,
    /// The JetStream domain to address, `None` for the connected server's
    /// own JetStream. A leaf server without JetStream of its own reaches the
    /// cluster's only through the cluster's domain: nats-server denies the
    /// plain `$JS.API.>` and `$KV.>` subjects across every leaf connection.
    pub jetstream_domain: Option<String>,
    /// Who to authenticate as; `None` connects anonymously.
    pub credentials: Option<NatsCredentials>,
}

/// A NATS user name and password. `Debug` leaves the password out, so
/// configs can be logged.
#[derive(Clone, PartialEq, Eq)]
pub struct NatsCredentials {
    /// The user name.
    pub user: String,
    /// The user's password.
    pub password: String,
}

impl fmt::Debug for NatsCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsCredentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl NatsStoreConfig {
    /// The defaults: bucket `ployz`, stream `PLOYZ_EVENTS` on `ployz.events.>`,
    /// one replica, retries for 10 s, the server's own JetStream, no credentials.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            bucket: "ployz".to_owned(),
            events_stream: "PLOYZ_EVENTS".to_owned(),
            events_subject_prefix: "ployz.events".to_owned(),
            replicas: 1,
            connect_timeout: Duration::from_secs(2),
            startup_timeout: Duration::from_secs(10),
            scan_timeout: Duration::from_secs(10),
            jetstream_domain: None,
            credentials: None,
        }
    }
}

/// The store on NATS JetStream. Cheap to clone: clones share one connection.
#[derive(Clone)]
pub struct NatsStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    jetstream: jetstream::Context,
    kv: kv::Store,
    events: stream::Stream,
    /// `<events_subject_prefix>.`, so that a topic's subject is this plus the topic.
    events_prefix: String,
    scan_timeout: Duration,
}

impl fmt::Debug for NatsStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsStore")
            .field("bucket", &self.inner.kv.name)
            .field(
                "events_stream",
                &self.inner.events.cached_info().config.name,
            )
            .finish_non_exhaustive()
    }
}

impl NatsStore {
    /// Connects to NATS and makes sure the bucket and the event stream exist,
    /// creating them if absent and reusing them otherwise. Retryable failures are
    /// retried until `config.startup_timeout` runs out.
    pub async fn connect(config: NatsStoreConfig) -> Result<Self, StoreError> {
        let deadline = Instant::now() + config.startup_timeout;
        let mut delay = Duration::from_millis(100);
        loop {
            let attempt = tokio::time::timeout_at(deadline, Self::connect_once(&config))
                .await
                .unwrap_or_else(|elapsed| {
                    Err(StoreError::Unavailable {
                        context: format!(
                            "NATS at {} is not ready after {:?}",
                            config.url, config.startup_timeout
                        ),
                        source: Some(Box::new(elapsed)),
                    })
                });
            match attempt {
                Ok(store) => return Ok(store),
                Err(error) if error.is_retryable() && Instant::now() + delay < deadline => {
                    tracing::debug!(error = %error_chain(&error), ?delay, "NATS store not ready, retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Err(error) => return Err(error),
            }
        }
    }

    async fn connect_once(config: &NatsStoreConfig) -> Result<Self, StoreError> {
        let events_prefix = KeyPrefix::new(config.events_subject_prefix.clone())?;
        if let Some(domain) = &config.jetstream_domain
            && (domain.is_empty() || domain.contains(['.', '*', '>', ' ']))
        {
            // It becomes a subject token: `$JS.<domain>.API`.
            return Err(StoreError::Backend {
                context: format!("JetStream domain `{domain}` is not a single subject token"),
                source: None,
            });
        }
        let options = match &config.credentials {
            Some(credentials) => ConnectOptions::with_user_and_password(
                credentials.user.clone(),
                credentials.password.clone(),
            ),
            None => ConnectOptions::new(),
        };
        let client = options
            .name("ployzd")
            .connection_timeout(config.connect_timeout)
            .connect(config.url.as_str())
            .await
            .map_err(|source| {
                store_error(format!("cannot connect to NATS at {}", config.url), source)
            })?;
        let jetstream = match &config.jetstream_domain {
            Some(domain) => jetstream::with_domain(client.clone(), domain.as_str()),
            None => jetstream::new(client.clone()),
        };
        let kv = ensure_bucket(&jetstream, config).await?;
        let events = ensure_events_stream(&jetstream, config, &events_prefix).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                jetstream,
                kv,
                events,
                events_prefix: format!("{events_prefix}."),
                scan_timeout: config.scan_timeout,
            }),
        })
    }

    /// Time for one JetStream request and its answer.
    pub async fn ping(&self) -> Result<Duration, StoreError> {
        let start = Instant::now();
        self.inner
            .jetstream
            .query_account()
            .await
            .map_err(|source| store_error("JetStream did not answer", source))?;
        Ok(start.elapsed())
    }

    /// How many copies JetStream keeps of the records (the bucket's stream),
    /// read from the server, not from this store's config.
    pub async fn replicas(&self) -> Result<usize, StoreError> {
        let name = self.inner.kv.stream_name.clone();
        let stream = self
            .inner
            .jetstream
            .get_stream(&name)
            .await
            .map_err(|source| store_error(format!("cannot read stream `{name}`"), source))?;
        Ok(stream.cached_info().config.num_replicas)
    }

    /// Keeps `replicas` copies of the records and of the event log; streams
    /// that have them already are not changed. Refuses, as
    /// [`StoreError::Unavailable`], while fewer JetStream servers answer
    /// [`Self::cluster_peers`] than `replicas`: JetStream would place a copy
    /// on a server that is down, and a copy nobody holds protects nothing.
    ///
    /// Returns once both streams have a leader and every copy is current, so
    /// losing any one server right after loses nothing; fails retryably when
    /// that takes longer than [`REPLICAS_CURRENT_TIMEOUT`] (a copy's server
    /// is down, or catching up is slow).
    pub async fn set_replicas(&self, replicas: usize) -> Result<(), StoreError> {
        if replicas == 0 {
            return Err(StoreError::Backend {
                context: "a stream needs at least one replica".to_owned(),
                source: None,
            });
        }
        let names = [
            self.inner.kv.stream_name.clone(),
            self.inner.events.cached_info().config.name.clone(),
        ];
        let mut checked_peers = false;
        for name in &names {
            let what = || format!("cannot set stream `{name}` to {replicas} replicas");
            let stream = self
                .inner
                .jetstream
                .get_stream(&name)
                .await
                .map_err(|source| store_error(what(), source))?;
            let mut config = stream.cached_info().config.clone();
            if config.num_replicas == replicas {
                continue;
            }
            if replicas > 1 && !checked_peers {
                let peers = self.cluster_peers().await?;
                if peers < replicas {
                    return Err(StoreError::Unavailable {
                        context: format!(
                            "{}: {peers} JetStream server(s) in the cluster answer, \
                             {replicas} replicas need as many",
                            what()
                        ),
                        source: None,
                    });
                }
                checked_peers = true;
            }
            config.num_replicas = replicas;
            self.inner
                .jetstream
                .update_stream(config)
                .await
                .map_err(|source| StoreError::Unavailable {
                    context: what(),
                    source: Some(Box::new(source)),
                })?;
        }
        let deadline = Instant::now() + REPLICAS_CURRENT_TIMEOUT;
        for name in &names {
            self.wait_until_current(name, replicas, deadline).await?;
        }
        Ok(())
    }

    /// Waits until stream `name` has a leader and `replicas - 1` current
    /// followers. Right after a change of replicas the new copies are still
    /// catching up; JetStream elects no leader among copies that never
    /// caught up, so losing the old holder then leaves the stream without one.
    async fn wait_until_current(
        &self,
        name: &str,
        replicas: usize,
        deadline: Instant,
    ) -> Result<(), StoreError> {
        loop {
            let last = match self.inner.jetstream.get_stream(name).await {
                Ok(stream) => {
                    let cluster = stream.cached_info().cluster.as_ref();
                    let leader = cluster.and_then(|cluster| cluster.leader.as_deref());
                    let followers = cluster.map_or(&[][..], |cluster| &cluster.replicas[..]);
                    let lagging: Vec<&str> = followers
                        .iter()
                        .filter(|peer| !peer.current || peer.offline)
                        .map(|peer| peer.name.as_str())
                        .collect();
                    // A standalone server reports no cluster: its one copy leads.
                    let led = leader.is_some() || (cluster.is_none() && replicas == 1);
                    if led && lagging.is_empty() && followers.len() + 1 >= replicas {
                        return Ok(());
                    }
                    format!(
                        "leader {leader:?}, {} of {} followers current, lagging {lagging:?}",
                        followers.len() - lagging.len(),
                        replicas - 1
                    )
                }
                Err(error) => error_chain(&error),
            };
            if Instant::now() >= deadline {
                return Err(StoreError::Unavailable {
                    context: format!(
                        "stream `{name}` has no {replicas} current copies after \
                         {REPLICAS_CURRENT_TIMEOUT:?}: {last}"
                    ),
                    source: None,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// How many JetStream servers the cluster has right now: every server
    /// reachable over routes answers a ping (a standalone server: 1). The
    /// count is observed, not recorded: a server that is down is not counted,
    /// although the JetStream meta group still lists it as an offline peer.
    /// Takes [`SERVER_PING_QUIET`] after the last answer.
    pub async fn cluster_peers(&self) -> Result<usize, StoreError> {
        let client = &self.inner.client;
        let what = "cannot ping the cluster's servers";
        let inbox = client.new_inbox();
        let mut answers = client
            .subscribe(inbox.clone())
            .await
            .map_err(|source| store_error(what, source))?;
        client
            .publish_with_reply(
                SERVER_PING_SUBJECT,
                inbox,
                Bytes::from_static(SERVER_PING_BODY),
            )
            .await
            .map_err(|source| store_error(what, source))?;
        let deadline = Instant::now() + SERVER_PING_TIMEOUT;
        let mut servers = std::collections::BTreeSet::new();
        loop {
            let wait = if servers.is_empty() {
                deadline
            } else {
                deadline.min(Instant::now() + SERVER_PING_QUIET)
            };
            let Ok(Some(answer)) = tokio::time::timeout_at(wait, answers.next()).await else {
                break;
            };
            // Status messages (no responders) carry no JSON and are skipped.
            if let Ok(ServerPingAnswer { server }) = serde_json::from_slice(&answer.payload)
                && server.jetstream
            {
                servers.insert(server.id);
            }
        }
        if let Err(error) = answers.unsubscribe().await {
            tracing::debug!(%error, "cannot unsubscribe from server ping answers");
        }
        if servers.is_empty() {
            return Err(StoreError::Unavailable {
                context: format!(
                    "{what}: no JetStream server answered within {SERVER_PING_TIMEOUT:?}"
                ),
                source: None,
            });
        }
        Ok(servers.len())
    }

    /// Everything the store holds: each record's current value and every
    /// event, in order. For moving the store into a new JetStream (a machine
    /// whose server becomes clustered starts with an empty one).
    pub async fn export(&self) -> Result<StoreExport, StoreError> {
        let kv = &self.inner.kv;
        let messages = self
            .scan(
                &kv.stream,
                vec![format!("{}>", kv.prefix)],
                DeliverPolicy::LastPerSubject,
                usize::MAX,
            )
            .await?;
        let mut records = BTreeMap::new();
        for message in messages {
            let Some(name) = message.subject.as_str().strip_prefix(kv.prefix.as_str()) else {
                continue;
            };
            if is_delete(message.headers.as_ref()) {
                records.remove(name);
            } else {
                records.insert(name.to_owned(), message.payload.to_vec());
            }
        }
        let events = self
            .scan(
                &self.inner.events,
                vec![format!("{}>", self.inner.events_prefix)],
                DeliverPolicy::All,
                usize::MAX,
            )
            .await?
            .into_iter()
            .map(|message| (message.subject.to_string(), message.payload.to_vec()))
            .collect();
        Ok(StoreExport {
            records: records.into_iter().collect(),
            events,
        })
    }

    /// Writes an [`export`](Self::export) into this store: records put,
    /// events appended in their order. Revisions and sequences are new.
    pub async fn import(&self, export: &StoreExport) -> Result<(), StoreError> {
        for (key, value) in &export.records {
            self.inner
                .kv
                .put(key.as_str(), Bytes::from(value.clone()))
                .await
                .map_err(|source| store_error(format!("cannot import record `{key}`"), source))?;
        }
        for (subject, payload) in &export.events {
            let what = || format!("cannot import event on `{subject}`");
            self.inner
                .jetstream
                .publish(subject.clone(), Bytes::from(payload.clone()))
                .await
                .map_err(|source| store_error(what(), source))?
                .await
                .map_err(|source| store_error(what(), source))?;
        }
        Ok(())
    }

    /// The version of the NATS server this store is connected to.
    pub fn server_version(&self) -> String {
        self.inner.client.server_info().version
    }

    fn subject(&self, key: &Key) -> String {
        format!("{}{key}", self.inner.kv.prefix)
    }

    /// The last message for `key`, delete markers included, read from the
    /// stream leader (a direct get may be answered by a lagging replica).
    async fn last_message(&self, key: &Key) -> Result<Option<StreamMessage>, StoreError> {
        match self
            .inner
            .kv
            .stream
            .get_last_raw_message_by_subject(&self.subject(key))
            .await
        {
            Ok(message) => Ok(Some(message)),
            Err(error) if error.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                Ok(None)
            }
            Err(source) => Err(store_error(format!("cannot read record `{key}`"), source)),
        }
    }

    /// Writes `value` if the last message for `key` has sequence `expected`
    /// (0: no message at all). JetStream checks this atomically.
    async fn write_if_last(
        &self,
        key: &Key,
        value: Vec<u8>,
        expected: Revision,
    ) -> Result<Revision, CasError> {
        self.inner
            .kv
            .update(key.as_str(), Bytes::from(value), expected)
            .await
            .map_err(|error| match error.kind() {
                kv::UpdateErrorKind::WrongLastRevision => CasError::Lost,
                kv::UpdateErrorKind::InvalidKey
                | kv::UpdateErrorKind::TimedOut
                | kv::UpdateErrorKind::Other => {
                    CasError::Store(store_error(format!("cannot write record `{key}`"), error))
                }
            })
    }

    /// [`Self::scan_once`], retried a few times on transient failures: right
    /// after a stream moved or changed its replicas, a new consumer's first
    /// pull can find no responder on another server until interest spreads.
    async fn scan(
        &self,
        stream: &stream::Stream,
        subjects: Vec<String>,
        deliver_policy: DeliverPolicy,
        limit: usize,
    ) -> Result<Vec<jetstream::Message>, StoreError> {
        let mut attempt = 1;
        loop {
            match self
                .scan_once(stream, subjects.clone(), deliver_policy, limit)
                .await
            {
                Err(error) if error.is_retryable() && attempt < SCAN_ATTEMPTS => {
                    tracing::debug!(attempt, error = %error_chain(&error), "scan failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200) * attempt).await;
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    /// Creates a consumer over `subjects` and pulls what it has pending when it
    /// is created, at most `limit` messages. Ends when the backlog is delivered,
    /// never waits for new messages.
    async fn scan_once(
        &self,
        stream: &stream::Stream,
        subjects: Vec<String>,
        deliver_policy: DeliverPolicy,
        limit: usize,
    ) -> Result<Vec<jetstream::Message>, StoreError> {
        let what = format!(
            "cannot scan {subjects:?} in stream `{}`",
            stream.cached_info().config.name
        );
        let consumer = stream
            .create_consumer(pull::Config {
                deliver_policy,
                filter_subjects: subjects,
                ack_policy: AckPolicy::None,
                inactive_threshold: SCAN_CONSUMER_INACTIVE_THRESHOLD,
                memory_storage: true,
                num_replicas: 1,
                ..Default::default()
            })
            .await
            .map_err(|source| store_error(what.clone(), source))?;
        let pending = usize::try_from(consumer.cached_info().num_pending).unwrap_or(usize::MAX);
        let target = pending.min(limit);
        let drained = tokio::time::timeout(self.inner.scan_timeout, async {
            let mut messages = Vec::with_capacity(target.min(SCAN_BATCH));
            while messages.len() < target {
                let mut batch = consumer
                    .fetch()
                    .max_messages((target - messages.len()).min(SCAN_BATCH))
                    .messages()
                    .await
                    .map_err(|source| store_error(what.clone(), source))?;
                let before = messages.len();
                loop {
                    let next = tokio::time::timeout(SCAN_STALL, batch.next())
                        .await
                        .map_err(|elapsed| StoreError::Unavailable {
                            context: format!(
                                "{what}: no message within {SCAN_STALL:?} with {} pending",
                                target - messages.len()
                            ),
                            source: Some(Box::new(elapsed)),
                        })?;
                    let Some(message) = next else {
                        break;
                    };
                    messages.push(message.map_err(|source| store_error(what.clone(), source))?);
                }
                if messages.len() == before {
                    // Pending messages can vanish before delivery (limits, purges).
                    break;
                }
            }
            Ok(messages)
        })
        .await;
        // Best effort: an abandoned consumer expires on its own anyway.
        let name = consumer.cached_info().name.clone();
        if let Err(error) = stream.delete_consumer(&name).await {
            tracing::debug!(%error, consumer = %name, "cannot delete scan consumer");
        }
        drained.map_err(|elapsed| StoreError::Unavailable {
            context: format!("{what}: timed out after {:?}", self.inner.scan_timeout),
            source: Some(Box::new(elapsed)),
        })?
    }
}

/// A copy of everything a store holds; see [`NatsStore::export`].
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoreExport {
    /// Key and current value of every record.
    pub records: Vec<(String, Vec<u8>)>,
    /// Subject and payload of every event, oldest first.
    pub events: Vec<(String, Vec<u8>)>,
}

/// Opens the bucket, creating it when absent.
async fn ensure_bucket(
    jetstream: &jetstream::Context,
    config: &NatsStoreConfig,
) -> Result<kv::Store, StoreError> {
    let what = || format!("cannot create or open KV bucket `{}`", config.bucket);
    match jetstream.get_key_value(config.bucket.as_str()).await {
        Ok(store) => return Ok(store),
        Err(error) if !is_stream_not_found(&error) => return Err(store_error(what(), error)),
        Err(_) => {}
    }
    let created = jetstream
        .create_key_value(kv::Config {
            bucket: config.bucket.clone(),
            description: "Ployz records".to_owned(),
            history: HISTORY,
            storage: StorageType::File,
            num_replicas: config.replicas,
            ..Default::default()
        })
        .await;
    match created {
        Ok(store) => Ok(store),
        // Another process may have created it meanwhile, maybe with other settings.
        Err(create_error) => jetstream
            .get_key_value(config.bucket.as_str())
            .await
            .map_err(|_| store_error(what(), create_error)),
    }
}

/// Opens the event stream, creating it when absent. An existing stream is
/// used as it is: on a cluster another machine may have created it, or
/// raised its replicas since, and `config.replicas` must not undo that.
async fn ensure_events_stream(
    jetstream: &jetstream::Context,
    config: &NatsStoreConfig,
    events_prefix: &KeyPrefix,
) -> Result<stream::Stream, StoreError> {
    let what = || {
        format!(
            "cannot create or open event stream `{}`",
            config.events_stream
        )
    };
    match jetstream.get_stream(config.events_stream.as_str()).await {
        Ok(stream) => return Ok(stream),
        Err(error) if !is_stream_not_found(&error) => return Err(store_error(what(), error)),
        Err(_) => {}
    }
    let created = jetstream
        .create_stream(stream::Config {
            name: config.events_stream.clone(),
            description: Some("Ployz event log".to_owned()),
            subjects: vec![format!("{events_prefix}.>")],
            storage: StorageType::File,
            num_replicas: config.replicas,
            ..Default::default()
        })
        .await;
    match created {
        Ok(stream) => Ok(stream),
        // Another process may have created it meanwhile, maybe with other settings.
        Err(create_error) => jetstream
            .get_stream(config.events_stream.as_str())
            .await
            .map_err(|_| store_error(what(), create_error)),
    }
}

/// The part of a server's answer to [`SERVER_PING_SUBJECT`] that
/// [`NatsStore::cluster_peers`] reads.
#[derive(serde::Deserialize)]
struct ServerPingAnswer {
    server: PingedServer,
}

#[derive(serde::Deserialize)]
struct PingedServer {
    id: String,
    #[serde(default)]
    jetstream: bool,
}

fn is_stream_not_found(error: &(dyn StdError + 'static)) -> bool {
    sources(error).any(|error| {
        error
            .downcast_ref::<jetstream::Error>()
            .is_some_and(|error| error.error_code() == ErrorCode::STREAM_NOT_FOUND)
            || error
                .downcast_ref::<jetstream::context::GetStreamError>()
                .is_some_and(|error| match error.kind() {
                    jetstream::context::GetStreamErrorKind::JetStream(error) => {
                        error.error_code() == ErrorCode::STREAM_NOT_FOUND
                    }
                    jetstream::context::GetStreamErrorKind::EmptyName
                    | jetstream::context::GetStreamErrorKind::Request
                    | jetstream::context::GetStreamErrorKind::InvalidStreamName => false,
                })
    })
}

/// Outcome of a failed compare-and-set write.
enum CasError {
    /// Another write came first.
    Lost,
    Store(StoreError),
}

fn is_delete(headers: Option<&HeaderMap>) -> bool {
    headers
        .and_then(|headers| headers.get(KV_OPERATION_HEADER))
        .is_some_and(|operation| matches!(operation.as_str(), "DEL" | "PURGE"))
}

fn parse_key(key: &str) -> Result<Key, StoreError> {
    Key::new(key).map_err(|source| StoreError::Backend {
        context: format!("bucket holds key `{key}`, which is not a Ployz key"),
        source: Some(Box::new(source)),
    })
}

impl RecordStore for NatsStore {
    async fn get(&self, key: &Key) -> Result<Option<Record>, StoreError> {
        Ok(self
            .last_message(key)
            .await?
            .filter(|message| !is_delete(Some(&message.headers)))
            .map(|message| Record {
                key: key.clone(),
                value: message.payload.to_vec(),
                revision: message.sequence,
            }))
    }

    async fn create(&self, key: &Key, value: Vec<u8>) -> Result<Revision, StoreError> {
        // A deleted key still has a last message (the delete marker), so creating
        // it means writing on top of exactly that marker.
        let mut expected = 0;
        for _ in 0..CREATE_ATTEMPTS {
            match self.write_if_last(key, value.clone(), expected).await {
                Ok(revision) => return Ok(revision),
                Err(CasError::Store(error)) => return Err(error),
                Err(CasError::Lost) => {}
            }
            match self.last_message(key).await? {
                Some(message) if is_delete(Some(&message.headers)) => expected = message.sequence,
                Some(_) => break,
                None => expected = 0,
            }
        }
        Err(StoreError::AlreadyExists {
            key: key.to_string(),
        })
    }

    async fn update(
        &self,
        key: &Key,
        value: Vec<u8>,
        expected: Revision,
    ) -> Result<Revision, StoreError> {
        // JetStream would accept `expected` 0 on an absent key, or the revision of
        // a delete marker, and so recreate the key; the contract says those are
        // mismatches. A marker's revision never becomes a record's, so checking
        // first and then writing atomically against `expected` stays correct.
        let found = self
            .last_message(key)
            .await?
            .filter(|message| !is_delete(Some(&message.headers)))
            .map(|message| message.sequence);
        if found != Some(expected) {
            return Err(StoreError::RevisionMismatch {
                key: key.to_string(),
                expected,
                found,
            });
        }
        self.write_if_last(key, value, expected)
            .await
            .map_err(|error| match error {
                CasError::Lost => StoreError::RevisionMismatch {
                    key: key.to_string(),
                    expected,
                    found: None,
                },
                CasError::Store(error) => error,
            })
    }

    async fn put(&self, key: &Key, value: Vec<u8>) -> Result<Revision, StoreError> {
        self.inner
            .kv
            .put(key.as_str(), Bytes::from(value))
            .await
            .map_err(|source| store_error(format!("cannot write record `{key}`"), source))
    }

    async fn delete(&self, key: &Key, expected: Option<Revision>) -> Result<(), StoreError> {
        self.inner
            .kv
            .delete_expect_revision(key.as_str(), expected)
            .await
            .map_err(|error| match error.kind() {
                kv::UpdateErrorKind::WrongLastRevision => StoreError::RevisionMismatch {
                    key: key.to_string(),
                    expected: expected.unwrap_or_default(),
                    found: None,
                },
                kv::UpdateErrorKind::InvalidKey
                | kv::UpdateErrorKind::TimedOut
                | kv::UpdateErrorKind::Other => {
                    store_error(format!("cannot delete record `{key}`"), error)
                }
            })
    }

    async fn list(&self, prefix: &KeyPrefix) -> Result<Vec<Record>, StoreError> {
        let kv = &self.inner.kv;
        let messages = self
            .scan(
                &kv.stream,
                vec![format!("{}{prefix}.>", kv.prefix)],
                DeliverPolicy::LastPerSubject,
                usize::MAX,
            )
            .await?;
        // Later messages win: a key written during the scan shows its newest value.
        let mut records = BTreeMap::new();
        for message in messages {
            let revision = message
                .info()
                .map_err(|source| store_error("cannot parse JetStream message metadata", source))?
                .stream_sequence;
            let Some(name) = message.subject.as_str().strip_prefix(kv.prefix.as_str()) else {
                continue;
            };
            let key = parse_key(name)?;
            if is_delete(message.headers.as_ref()) {
                records.remove(&key);
            } else {
                records.insert(
                    key.clone(),
                    Record {
                        key,
                        value: message.payload.to_vec(),
                        revision,
                    },
                );
            }
        }
        Ok(records.into_values().collect())
    }

    async fn watch(&self, prefix: &KeyPrefix) -> Result<WatchStream, StoreError> {
        // An ordered push consumer delivering only what is written after it
        // exists; it recreates itself from the last sequence it saw when it
        // detects a gap.
        let mut entries = self
            .inner
            .kv
            .watch(format!("{prefix}.>"))
            .await
            .map_err(|source| store_error(format!("cannot watch `{prefix}`"), source))?;
        // The bucket keeps only `HISTORY` versions per key, and the server stops
        // pushing to a consumer that does not answer flow control, so a reader
        // that lags could find superseded versions trimmed before they reach it.
        // A forwarder drains the consumer as fast as the server sends into an
        // unbounded channel; the returned stream owns it and aborts it on drop.
        let (sender, events) = mpsc::unbounded_channel();
        let forwarder = tokio::spawn(async move {
            while let Some(entry) = entries.next().await {
                if sender.send(watch_event(entry)).is_err() {
                    break;
                }
            }
        });
        Ok(Box::pin(ForwardedWatch {
            events,
            _forwarder: AbortOnDropHandle::new(forwarder),
        }))
    }
}

fn watch_event(entry: Result<kv::Entry, kv::WatcherError>) -> Result<WatchEvent, StoreError> {
    let entry = entry.map_err(|source| store_error("watch failed", source))?;
    let key = parse_key(&entry.key)?;
    Ok(match entry.operation {
        Operation::Put => WatchEvent::Put(Record {
            key,
            value: entry.value.to_vec(),
            revision: entry.revision,
        }),
        Operation::Delete | Operation::Purge => WatchEvent::Delete {
            key,
            revision: entry.revision,
        },
    })
}

/// The events a forwarding task drained from a KV watch; dropping it stops
/// the task and with it the consumer.
struct ForwardedWatch {
    events: mpsc::UnboundedReceiver<Result<WatchEvent, StoreError>>,
    _forwarder: AbortOnDropHandle<()>,
}

impl futures::Stream for ForwardedWatch {
    type Item = Result<WatchEvent, StoreError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.events.poll_recv(cx)
    }
}

impl EventLog for NatsStore {
    async fn append(&self, topic: &Key, payload: Vec<u8>) -> Result<Sequence, StoreError> {
        let what = || format!("cannot append event to `{topic}`");
        let ack = self
            .inner
            .jetstream
            .publish(
                format!("{}{topic}", self.inner.events_prefix),
                Bytes::from(payload),
            )
            .await
            .map_err(|source| store_error(what(), source))?
            .await
            .map_err(|source| store_error(what(), source))?;
        Ok(ack.sequence)
    }

    async fn read(
        &self,
        topic: &KeyPrefix,
        from: Sequence,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let prefix = self.inner.events_prefix.as_str();
        let subject = format!("{prefix}{topic}");
        let messages = self
            .scan(
                &self.inner.events,
                vec![subject.clone(), format!("{subject}.>")],
                DeliverPolicy::ByStartSequence {
                    start_sequence: from.max(1),
                },
                limit,
            )
            .await?;
        messages
            .into_iter()
            .map(|message| {
                let info = message.info().map_err(|source| {
                    store_error("cannot parse JetStream message metadata", source)
                })?;
                let (sequence, time) = (info.stream_sequence, SystemTime::from(info.published));
                let name = message
                    .subject
                    .as_str()
                    .strip_prefix(prefix)
                    .unwrap_or_default();
                Ok(Event {
                    topic: parse_key(name)?,
                    sequence,
                    payload: message.payload.to_vec(),
                    time,
                })
            })
            .collect()
    }
}

/// Wraps an async-nats failure: [`StoreError::Unavailable`] when it is
/// transient (connection, timeout, no JetStream leader), [`StoreError::Backend`]
/// otherwise.
/// One leaf connection, as a server's system account reports it.
struct LeafConnection {
    /// The id of the server the leaf is connected to.
    server: String,
    /// The connection's id on that server.
    cid: u64,
    /// The leaf server's name.
    name: String,
}

/// A client of the server at `url` as `system`, a user of its system account.
async fn system_client(
    url: &str,
    system: &NatsCredentials,
    wait: Duration,
) -> Result<Client, StoreError> {
    ConnectOptions::with_user_and_password(system.user.clone(), system.password.clone())
        .name("ployzd-system")
        .connection_timeout(wait)
        .connect(url)
        .await
        .map_err(|source| {
            store_error(
                format!("cannot connect to NATS at {url} as the system user"),
                source,
            )
        })
}

/// Every leaf connection of every server of the cluster:
/// `$SYS.REQ.SERVER.PING.LEAFZ`, whose answers arrive within `wait`.
async fn leaf_connections(
    client: &Client,
    wait: Duration,
) -> Result<Vec<LeafConnection>, StoreError> {
    let inbox = client.new_inbox();
    let mut answers = client
        .subscribe(inbox.clone())
        .await
        .map_err(|source| store_error("cannot subscribe for LEAFZ answers", source))?;
    client
        .publish_with_reply("$SYS.REQ.SERVER.PING.LEAFZ", inbox, Bytes::new())
        .await
        .map_err(|source| {
            store_error("cannot ask the servers for their leaf connections", source)
        })?;
    let mut found = Vec::new();
    let deadline = Instant::now() + wait;
    while let Ok(Some(answer)) = tokio::time::timeout_at(deadline, answers.next()).await {
        let Ok(answer) = serde_json::from_slice::<serde_json::Value>(&answer.payload) else {
            continue;
        };
        let server = answer["server"]["id"].as_str().unwrap_or_default();
        let Some(leafs) = answer["data"]["leafs"].as_array() else {
            continue;
        };
        for leaf in leafs {
            if let (Some(cid), Some(name)) = (leaf["id"].as_u64(), leaf["name"].as_str()) {
                found.push(LeafConnection {
                    server: server.to_owned(),
                    cid,
                    name: name.to_owned(),
                });
            }
        }
    }
    Ok(found)
}

/// The names of the leaf servers connected to any server of the cluster
/// behind `url`, asked through the system account (`system` must be one of
/// its users); answers arrive from every server within `wait`.
pub async fn connected_leaves(
    url: &str,
    system: &NatsCredentials,
    wait: Duration,
) -> Result<Vec<String>, StoreError> {
    let client = system_client(url, system, wait).await?;
    let mut names: Vec<String> = leaf_connections(&client, wait)
        .await?
        .into_iter()
        .map(|connection| connection.name)
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// Closes every leaf connection of the server at `url` whose leaf server is
/// not named in `admitted` (`$SYS.REQ.SERVER.<id>.KICK`), and answers the
/// names closed. A reload that removes a leaf's user only refuses its next
/// connection; this ends the one it has.
pub async fn close_leaves_except(
    url: &str,
    system: &NatsCredentials,
    admitted: &[String],
    wait: Duration,
) -> Result<Vec<String>, StoreError> {
    let client = system_client(url, system, wait).await?;
    let own = client.server_info().server_id;
    let mut closed = Vec::new();
    for connection in leaf_connections(&client, wait).await? {
        if connection.server != own || admitted.contains(&connection.name) {
            continue;
        }
        let body = serde_json::json!({ "cid": connection.cid }).to_string();
        let answer = client
            .request(format!("$SYS.REQ.SERVER.{own}.KICK"), body.into())
            .await
            .map_err(|source| {
                store_error(
                    format!("cannot close the leaf connection of {}", connection.name),
                    source,
                )
            })?;
        let answer: serde_json::Value = serde_json::from_slice(&answer.payload).unwrap_or_default();
        if let Some(error) = answer.get("error") {
            return Err(StoreError::Backend {
                context: format!(
                    "the server refused to close the leaf connection of {}: {error}",
                    connection.name
                ),
                source: None,
            });
        }
        closed.push(connection.name);
    }
    Ok(closed)
}

fn store_error(context: impl Into<String>, source: impl Into<BoxError>) -> StoreError {
    let context = context.into();
    let source = source.into();
    if sources(source.as_ref()).any(is_transient) {
        StoreError::Unavailable {
            context,
            source: Some(source),
        }
    } else {
        StoreError::Backend {
            context,
            source: Some(source),
        }
    }
}

fn sources<'a>(
    error: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(Some(error), |&error| error.source())
}

/// The kind of an async-nats error, if `error` is one with kind type `K`.
fn kind<K>(error: &(dyn StdError + 'static)) -> Option<K>
where
    K: Clone + fmt::Debug + fmt::Display + PartialEq + 'static,
{
    error
        .downcast_ref::<async_nats::error::Error<K>>()
        .map(async_nats::error::Error::kind)
}

/// True for a JetStream API error that says the cluster cannot serve the
/// request right now, e.g. during a leader election.
fn is_transient_jetstream(error: &jetstream::Error) -> bool {
    error.code() == 503
        || [
            ErrorCode::CLUSTER_NOT_AVAILABLE,
            ErrorCode::CLUSTER_NOT_ACTIVE,
            ErrorCode::CLUSTER_NOT_LEADER,
            ErrorCode::CLUSTER_INCOMPLETE,
        ]
        .contains(&error.error_code())
}

/// True when `error` itself (not its sources) is a failure that retrying may cure.
fn is_transient(error: &(dyn StdError + 'static)) -> bool {
    use async_nats::{
        ConnectErrorKind, RequestErrorKind,
        jetstream::{
            consumer::StreamErrorKind,
            context::{
                AccountErrorKind, CreateKeyValueErrorKind, CreateStreamErrorKind, PublishErrorKind,
                RequestErrorKind as JetStreamRequestErrorKind,
            },
            kv::{EntryErrorKind, UpdateErrorKind, WatchErrorKind},
            stream::{ConsumerErrorKind, DirectGetErrorKind, LastRawMessageErrorKind},
        },
    };

    if error.is::<std::io::Error>() || error.is::<tokio::time::error::Elapsed>() {
        return true;
    }
    if let Some(error) = error.downcast_ref::<jetstream::Error>() {
        return is_transient_jetstream(error);
    }
    if let Some(kind) = kind::<ConnectErrorKind>(error) {
        return matches!(
            kind,
            ConnectErrorKind::Io
                | ConnectErrorKind::TimedOut
                | ConnectErrorKind::Dns
                | ConnectErrorKind::MaxReconnects
        );
    }
    if let Some(kind) = kind::<RequestErrorKind>(error) {
        return matches!(
            kind,
            RequestErrorKind::TimedOut | RequestErrorKind::NoResponders
        );
    }
    if let Some(kind) = kind::<JetStreamRequestErrorKind>(error) {
        return matches!(
            kind,
            JetStreamRequestErrorKind::TimedOut | JetStreamRequestErrorKind::NoResponders
        );
    }
    if let Some(kind) = kind::<PublishErrorKind>(error) {
        // `StreamNotFound` is "no responders": the stream has no leader right now.
        return matches!(
            kind,
            PublishErrorKind::TimedOut
                | PublishErrorKind::BrokenPipe
                | PublishErrorKind::StreamNotFound
                | PublishErrorKind::MaxAckPending
        );
    }
    if let Some(kind) = kind::<AccountErrorKind>(error) {
        return match kind {
            AccountErrorKind::TimedOut | AccountErrorKind::JetStreamUnavailable => true,
            AccountErrorKind::JetStream(error) => is_transient_jetstream(&error),
            AccountErrorKind::Other => false,
        };
    }
    if let Some(kind) = kind::<CreateStreamErrorKind>(error) {
        return match kind {
            CreateStreamErrorKind::TimedOut | CreateStreamErrorKind::JetStreamUnavailable => true,
            CreateStreamErrorKind::JetStream(error) => is_transient_jetstream(&error),
            CreateStreamErrorKind::EmptyStreamName
            | CreateStreamErrorKind::InvalidStreamName
            | CreateStreamErrorKind::DomainAndExternalSet
            | CreateStreamErrorKind::Response
            | CreateStreamErrorKind::NotFound
            | CreateStreamErrorKind::ResponseParse => false,
        };
    }
    if let Some(kind) = kind::<ConsumerErrorKind>(error) {
        return match kind {
            ConsumerErrorKind::TimedOut => true,
            ConsumerErrorKind::JetStream(error) => is_transient_jetstream(&error),
            ConsumerErrorKind::Request
            | ConsumerErrorKind::InvalidConsumerType
            | ConsumerErrorKind::InvalidName
            | ConsumerErrorKind::Other => false,
        };
    }
    if let Some(kind) = kind::<LastRawMessageErrorKind>(error) {
        return match kind {
            LastRawMessageErrorKind::JetStream(error) => is_transient_jetstream(&error),
            LastRawMessageErrorKind::NoMessageFound
            | LastRawMessageErrorKind::InvalidSubject
            | LastRawMessageErrorKind::Other => false,
        };
    }
    kind::<CreateKeyValueErrorKind>(error) == Some(CreateKeyValueErrorKind::TimedOut)
        || kind::<UpdateErrorKind>(error) == Some(UpdateErrorKind::TimedOut)
        || kind::<EntryErrorKind>(error) == Some(EntryErrorKind::TimedOut)
        || kind::<WatchErrorKind>(error) == Some(WatchErrorKind::TimedOut)
        || kind::<StreamErrorKind>(error) == Some(StreamErrorKind::TimedOut)
        || kind::<DirectGetErrorKind>(error) == Some(DirectGetErrorKind::TimedOut)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_and_missing_responders_are_retryable() {
        let timed_out =
            jetstream::context::PublishError::new(jetstream::context::PublishErrorKind::TimedOut);
        assert!(store_error("publish", timed_out).is_retryable());
        let no_responders =
            async_nats::RequestError::new(async_nats::RequestErrorKind::NoResponders);
        let wrapped = kv::UpdateError::with_source(kv::UpdateErrorKind::Other, no_responders);
        assert!(store_error("update", wrapped).is_retryable());
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(store_error("connect", refused).is_retryable());
    }

    #[test]
    fn invalid_input_is_not_retryable() {
        let invalid = kv::UpdateError::new(kv::UpdateErrorKind::InvalidKey);
        let error = store_error("update", invalid);
        assert!(matches!(error, StoreError::Backend { .. }));
        assert!(!error.is_retryable());
    }

    #[tokio::test]
    async fn an_empty_jetstream_domain_is_refused_before_connecting() {
        let mut config = NatsStoreConfig::new("nats://127.0.0.1:1");
        config.jetstream_domain = Some(String::new());
        let error = NatsStore::connect(config)
            .await
            .expect_err("an empty domain names no JetStream");
        assert!(matches!(error, StoreError::Backend { .. }), "{error:?}");
    }

    #[tokio::test]
    async fn connect_to_a_closed_port_fails_as_unavailable() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        let port = listener.local_addr().expect("local address").port();
        drop(listener);
        let mut config = NatsStoreConfig::new(format!("nats://127.0.0.1:{port}"));
        config.startup_timeout = Duration::from_millis(300);
        let error = NatsStore::connect(config)
            .await
            .expect_err("nothing listens there");
        assert!(error.is_retryable(), "{error:?}");
    }
}
