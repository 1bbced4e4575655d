//! The operation journal. An operation's record (`ops.<id>`) is the fact the
//! cluster keeps about it; its events (topic `ops.<id>`) tell how it got there.
//!
//! Life of an operation id:
//! - first request: a lease `op-<id>` is taken, the record is created `running`
//!   and the intent is appended;
//! - retry while it runs elsewhere: `InProgress` (conflict), nothing is touched;
//! - retry after its runner died (record `running`, lease expired): the lease is
//!   taken over and the operation resumes as attempt n+1; its steps are idempotent;
//! - retry after it finished: the recorded result or failure is replayed — a
//!   failed operation stays a fact, a retry never turns it into a success;
//! - the same id with a different request: `OperationIdReused` (usage).

use std::{future::Future, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    store::{
        Key, KeyPrefix, Revision, Store, StoreError, encode,
        lease::{Lease, LeaseError, Leases},
    },
    time::now_unix_ms,
};

/// How long a runner holds an operation without renewing its lease. A runner
/// renews at a step once a third of it has passed, so this bounds how long a
/// crashed runner blocks a retry.
const OPERATION_LEASE_TTL: Duration = Duration::from_secs(30);
/// At most this many events are read back for one operation.
const MAX_EVENTS: usize = 10_000;

/// A client-chosen operation id: 1–64 characters of `[A-Za-z0-9_-]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct OperationId(String);

impl OperationId {
    pub fn parse(id: &str) -> Result<Self, JournalError> {
        ployz_api::names::check_operation_id(id)
            .map_err(|reason| JournalError::InvalidOperationId { reason })?;
        Ok(Self(id.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn record_key(&self) -> Key {
        Key::new(format!("ops.{}", self.0)).expect("operation ids are valid key segments")
    }

    fn topic(&self) -> Key {
        self.record_key()
    }

    fn lease_name(&self) -> String {
        format!("op-{}", self.0)
    }
}

impl TryFrom<String> for OperationId {
    type Error = JournalError;

    fn try_from(id: String) -> Result<Self, Self::Error> {
        Self::parse(&id)
    }
}

impl From<OperationId> for String {
    fn from(id: OperationId) -> Self {
        id.0
    }
}

impl std::fmt::Display for OperationId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where an operation stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperationState {
    Running,
    Succeeded,
    Failed,
}

impl OperationState {
    pub fn as_str(self) -> &'static str {
        match self {
            OperationState::Running => "running",
            OperationState::Succeeded => "succeeded",
            OperationState::Failed => "failed",
        }
    }
}

/// A failure as the journal keeps it: class, stable code and sentence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedError {
    pub class: String,
    pub code: String,
    pub message: String,
}

/// The durable fact about one operation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OperationRecord {
    pub id: OperationId,
    pub kind: String,
    pub state: OperationState,
    pub request: serde_json::Value,
    /// SHA-256 of the request's JSON, to recognise a reused id.
    pub request_hash: String,
    pub started_at_unix_ms: u64,
    pub finished_at_unix_ms: Option<u64>,
    pub attempts: u32,
    /// Who ran the latest attempt.
    pub runner: String,
    pub result: Option<serde_json::Value>,
    pub error: Option<RecordedError>,
}

/// What happened to a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// The intent, recorded before anything else.
    Recorded,
    Started,
    Done,
    /// Nothing to do: the step's effect was already in place.
    Skipped,
    Failed,
    Succeeded,
}

impl StepStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Recorded => "recorded",
            StepStatus::Started => "started",
            StepStatus::Done => "done",
            StepStatus::Skipped => "skipped",
            StepStatus::Failed => "failed",
            StepStatus::Succeeded => "succeeded",
        }
    }
}

/// One entry of an operation's narrative in the event log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepEvent {
    /// Filled from the log when read back.
    #[serde(default)]
    pub sequence: u64,
    pub at_unix_ms: u64,
    pub attempt: u32,
    pub step: String,
    pub status: StepStatus,
    pub detail: String,
}

/// The outcome of [`Journal::begin`].
pub enum Begin<S: Store> {
    /// Run the operation: first attempt, or a resumed one after its runner died.
    Run(OperationRun<S>),
    /// The operation already finished: here is what was recorded.
    Replay(OperationRecord),
}

/// The journal of operations, over any [`Store`].
#[derive(Clone)]
pub struct Journal<S> {
    store: S,
    leases: Leases<S>,
    runner: String,
    lease_ttl: Duration,
}

impl<S: Store> Journal<S> {
    /// `runner` names this participant in records and leases (e.g. `ployzd/<machine>/<pid>`).
    pub fn new(store: S, runner: impl Into<String>) -> Self {
        Self {
            leases: Leases::new(store.clone()),
            store,
            runner: runner.into(),
            lease_ttl: OPERATION_LEASE_TTL,
        }
    }

    /// Overrides how long a crashed runner blocks a retry (tests use short TTLs).
    pub fn with_lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// Starts, resumes or replays operation `id` of `kind` for `request`.
    pub async fn begin<R: Serialize>(
        &self,
        id: &OperationId,
        kind: &str,
        request: &R,
    ) -> Result<Begin<S>, JournalError> {
        let request = serde_json::to_value(request).map_err(JournalError::Encode)?;
        let request_hash = hash_request(&request)?;
        let key = id.record_key();

        // A lost race on `create` means another participant began the same id
        // between our read and our write: look again, once.
        for _ in 0..2 {
            let existing = self.store.get(&key).await?;
            let Some(found) = existing else {
                let lease = self.take_lease(id).await?;
                let record = OperationRecord {
                    id: id.clone(),
                    kind: kind.to_owned(),
                    state: OperationState::Running,
                    request: request.clone(),
                    request_hash: request_hash.clone(),
                    started_at_unix_ms: now_unix_ms(),
                    finished_at_unix_ms: None,
                    attempts: 1,
                    runner: self.runner.clone(),
                    result: None,
                    error: None,
                };
                match self.store.create(&key, encode(&key, &record)?).await {
                    Ok(revision) => {
                        let run = OperationRun::new(self.clone(), record, revision, lease);
                        run.append(
                            "intent",
                            StepStatus::Recorded,
                            serde_json::to_string(&run.record.request)
                                .map_err(JournalError::Encode)?,
                        )
                        .await?;
                        return Ok(Begin::Run(run));
                    }
                    Err(StoreError::AlreadyExists { .. }) => {
                        self.release_quietly(&lease).await;
                        continue;
                    }
                    Err(error) => {
                        self.release_quietly(&lease).await;
                        return Err(error.into());
                    }
                }
            };

            let mut record: OperationRecord = found.decode()?;
            if record.request_hash != request_hash || record.kind != kind {
                return Err(JournalError::OperationIdReused {
                    id: id.to_string(),
                    kind: record.kind,
                });
            }
            match record.state {
                OperationState::Succeeded | OperationState::Failed => {
                    return Ok(Begin::Replay(record));
                }
                OperationState::Running => {
                    let lease = self.take_lease(id).await?;
                    record.attempts += 1;
                    record.runner = self.runner.clone();
                    let revision = match self
                        .store
                        .update(&key, encode(&key, &record)?, found.revision)
                        .await
                    {
                        Ok(revision) => revision,
                        Err(error) => {
                            self.release_quietly(&lease).await;
                            return Err(error.into());
                        }
                    };
                    let run = OperationRun::new(self.clone(), record, revision, lease);
                    run.append(
                        "resume",
                        StepStatus::Started,
                        format!(
                            "attempt {} resumes after its previous runner stopped",
                            run.record.attempts
                        ),
                    )
                    .await?;
                    return Ok(Begin::Run(run));
                }
            }
        }
        Err(JournalError::InProgress {
            id: id.to_string(),
            runner: "another participant".to_owned(),
        })
    }

    /// The recorded operations, newest first, at most `limit`.
    pub async fn list(&self, limit: usize) -> Result<Vec<OperationRecord>, JournalError> {
        let prefix = KeyPrefix::new("ops").expect("static prefix is valid");
        let mut records = self
            .store
            .list(&prefix)
            .await?
            .iter()
            .map(|record| record.decode::<OperationRecord>())
            .collect::<Result<Vec<_>, _>>()?;
        records.sort_by(|a, b| {
            b.started_at_unix_ms
                .cmp(&a.started_at_unix_ms)
                .then_with(|| b.id.as_str().cmp(a.id.as_str()))
        });
        records.truncate(limit);
        Ok(records)
    }

    /// One operation and its narrative.
    pub async fn show(
        &self,
        id: &OperationId,
    ) -> Result<(OperationRecord, Vec<StepEvent>), JournalError> {
        let key = id.record_key();
        let record: OperationRecord = self
            .store
            .get(&key)
            .await?
            .ok_or_else(|| JournalError::NotFound { id: id.to_string() })?
            .decode()?;
        let topic = KeyPrefix::new(id.topic().as_str()).expect("a key is a valid prefix");
        let events = self
            .store
            .read(&topic, 1, MAX_EVENTS)
            .await?
            .into_iter()
            .filter(|event| event.topic == id.topic())
            .map(|event| {
                let mut step: StepEvent = event.decode()?;
                step.sequence = event.sequence;
                Ok(step)
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok((record, events))
    }

    async fn take_lease(&self, id: &OperationId) -> Result<Lease, JournalError> {
        self.leases
            // One holder per attempt: a lease re-acquired by its own holder is
            // renewed, so two requests in one daemon must not share a name.
            .acquire(
                &id.lease_name(),
                &format!("{}#{:08x}", self.runner, rand::random::<u32>()),
                self.lease_ttl,
            )
            .await
            .map_err(|error| match error {
                LeaseError::Held { holder, .. } => JournalError::InProgress {
                    id: id.to_string(),
                    runner: holder,
                },
                other @ (LeaseError::Lost { .. }
                | LeaseError::InvalidName { .. }
                | LeaseError::InvalidTtl { .. }
                | LeaseError::Store(_)) => JournalError::Lease(other),
            })
    }

    async fn release_quietly(&self, lease: &Lease) {
        if let Err(error) = self.leases.release(lease).await {
            tracing::warn!(lease = %lease.name, error = &error as &dyn std::error::Error, "could not release operation lease; it expires on its own");
        }
    }
}

/// A running attempt of an operation: records steps, then a result or a failure.
///
/// Its lease lasts the journal's lease TTL. An operation that may run longer
/// polls [`OperationRun::keep_alive`] alongside its work.
pub struct OperationRun<S: Store> {
    journal: Journal<S>,
    record: OperationRecord,
    revision: Revision,
    /// The current lease; `keep_alive` publishes each renewal here.
    lease: Arc<watch::Sender<Lease>>,
    /// Ends `keep_alive` when the run finishes or is dropped.
    finished: CancellationToken,
}

impl<S: Store> Drop for OperationRun<S> {
    fn drop(&mut self) {
        self.finished.cancel();
    }
}

impl<S: Store> OperationRun<S> {
    fn new(journal: Journal<S>, record: OperationRecord, revision: Revision, lease: Lease) -> Self {
        Self {
            journal,
            record,
            revision,
            lease: Arc::new(watch::channel(lease).0),
            finished: CancellationToken::new(),
        }
    }

    /// Renews the operation's lease until the run finishes (or is dropped).
    /// Poll it concurrently with the operation's work, e.g. with `tokio::join!`.
    pub fn keep_alive(&self) -> impl Future<Output = ()> + Send + 'static {
        let leases = self.journal.leases.clone();
        let lease = self.lease.clone();
        let ttl = self.journal.lease_ttl;
        let finished = self.finished.clone();
        async move {
            if let Err(error) = leases.keep_alive(&lease, ttl, finished).await {
                tracing::warn!(lease = %lease.borrow().name, error = %crate::error_chain(&error), "operation lease lost; the commit will refuse");
            }
        }
    }

    pub fn id(&self) -> &OperationId {
        &self.record.id
    }

    pub fn attempt(&self) -> u32 {
        self.record.attempts
    }

    /// Records a step's status.
    pub async fn step(
        &mut self,
        step: &str,
        status: StepStatus,
        detail: impl Into<String>,
    ) -> Result<(), JournalError> {
        self.append(step, status, detail.into()).await
    }

    /// Commits success: the lease is proven still held, then the record is
    /// written with `result`. This write is the operation's point of no return.
    pub async fn succeed<T: Serialize>(self, result: &T) -> Result<OperationRecord, JournalError> {
        let result = serde_json::to_value(result).map_err(JournalError::Encode)?;
        self.finish(OperationState::Succeeded, Some(result), None)
            .await
    }

    /// Commits failure: the operation stays failed; a retry replays this failure.
    pub async fn fail(self, error: RecordedError) -> Result<OperationRecord, JournalError> {
        self.finish(OperationState::Failed, None, Some(error)).await
    }

    async fn finish(
        mut self,
        state: OperationState,
        result: Option<serde_json::Value>,
        error: Option<RecordedError>,
    ) -> Result<OperationRecord, JournalError> {
        let lease = self.lease.borrow().clone();
        self.journal.leases.ensure_held(&lease).await?;
        let detail = match (&result, &error) {
            (Some(result), _) => serde_json::to_string(result).map_err(JournalError::Encode)?,
            (None, Some(error)) => format!("{} ({}): {}", error.class, error.code, error.message),
            (None, None) => String::new(),
        };
        let status = match state {
            OperationState::Succeeded => StepStatus::Succeeded,
            OperationState::Failed | OperationState::Running => StepStatus::Failed,
        };
        self.append("result", status, detail).await?;

        self.record.state = state;
        self.record.finished_at_unix_ms = Some(now_unix_ms());
        self.record.result = result;
        self.record.error = error;
        let key = self.record.id.record_key();
        self.revision = self
            .journal
            .store
            .update(&key, encode(&key, &self.record)?, self.revision)
            .await?;
        self.finished.cancel();
        let lease = self.lease.borrow().clone();
        self.journal.release_quietly(&lease).await;
        Ok(self.record.clone())
    }

    async fn append(
        &self,
        step: &str,
        status: StepStatus,
        detail: String,
    ) -> Result<(), JournalError> {
        let event = StepEvent {
            sequence: 0,
            at_unix_ms: now_unix_ms(),
            attempt: self.record.attempts,
            step: step.to_owned(),
            status,
            detail,
        };
        let topic = self.record.id.topic();
        self.journal
            .store
            .append(&topic, encode(&topic, &event)?)
            .await?;
        Ok(())
    }
}

fn hash_request(request: &serde_json::Value) -> Result<String, JournalError> {
    // serde_json's maps are sorted, so equal requests serialize identically.
    let bytes = serde_json::to_vec(request).map_err(JournalError::Encode)?;
    Ok(hex::encode(Sha256::digest(bytes)))
}

/// What can go wrong recording an operation.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// `reason` is a whole sentence naming the id and what is wrong with it.
    #[error("{reason}")]
    InvalidOperationId { reason: String },
    #[error("operation id `{id}` was already used for a different {kind} request; choose a new id")]
    OperationIdReused { id: String, kind: String },
    #[error("operation `{id}` is being run by {runner}; wait for it, then retry to get its result")]
    InProgress { id: String, runner: String },
    #[error("operation `{id}` is not recorded")]
    NotFound { id: String },
    #[error("operation lease")]
    Lease(#[from] LeaseError),
    #[error("operation journal store")]
    Store(#[from] StoreError),
    #[error("cannot encode operation request or result")]
    Encode(#[source] serde_json::Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    fn id(s: &str) -> OperationId {
        OperationId::parse(s).expect("valid id")
    }

    #[derive(Serialize)]
    struct Req {
        network: &'static str,
    }

    async fn run_to_success(journal: &Journal<MemoryStore>, op: &OperationId) -> OperationRecord {
        match journal
            .begin(op, "mesh_init", &Req { network: "prod" })
            .await
            .expect("begin")
        {
            Begin::Run(mut run) => {
                run.step("write_identity", StepStatus::Done, "m-1")
                    .await
                    .expect("step");
                run.succeed(&serde_json::json!({"machine": "m-1"}))
                    .await
                    .expect("succeed")
            }
            Begin::Replay(_) => panic!("first begin must run"),
        }
    }

    #[test]
    fn operation_ids_are_validated_as_the_cli_does() {
        assert!(OperationId::parse("0190f3a2-7b1c-7d2e-9f00-aa").is_ok());
        assert!(matches!(
            OperationId::parse("a.b"),
            Err(JournalError::InvalidOperationId { .. })
        ));
    }

    #[tokio::test]
    async fn a_retried_id_replays_the_recorded_result_without_running() {
        let journal = Journal::new(MemoryStore::new(), "runner-a");
        let op = id("op-1");
        let first = run_to_success(&journal, &op).await;
        assert_eq!(first.state, OperationState::Succeeded);

        match journal
            .begin(&op, "mesh_init", &Req { network: "prod" })
            .await
            .expect("begin")
        {
            Begin::Replay(record) => assert_eq!(record, first),
            Begin::Run(_) => panic!("a finished operation must not run again"),
        }
        let (_, events) = journal.show(&op).await.expect("show");
        let steps: Vec<_> = events.iter().map(|e| (e.step.as_str(), e.status)).collect();
        assert_eq!(
            steps,
            [
                ("intent", StepStatus::Recorded),
                ("write_identity", StepStatus::Done),
                ("result", StepStatus::Succeeded)
            ]
        );
    }

    #[tokio::test]
    async fn a_failed_operation_stays_failed_on_retry() {
        let journal = Journal::new(MemoryStore::new(), "runner-a");
        let op = id("op-2");
        let Begin::Run(run) = journal
            .begin(&op, "mesh_init", &Req { network: "prod" })
            .await
            .expect("begin")
        else {
            panic!("first begin must run");
        };
        let error = RecordedError {
            class: "precondition_failed".into(),
            code: "network_mismatch".into(),
            message: "no".into(),
        };
        run.fail(error.clone()).await.expect("fail");
        match journal
            .begin(&op, "mesh_init", &Req { network: "prod" })
            .await
            .expect("begin")
        {
            Begin::Replay(record) => {
                assert_eq!(record.state, OperationState::Failed);
                assert_eq!(record.error, Some(error));
            }
            Begin::Run(_) => panic!("a failed operation must not run again"),
        }
    }

    #[tokio::test]
    async fn the_same_id_with_another_request_is_refused() {
        let journal = Journal::new(MemoryStore::new(), "runner-a");
        let op = id("op-3");
        run_to_success(&journal, &op).await;
        let other = journal
            .begin(&op, "mesh_init", &Req { network: "staging" })
            .await;
        assert!(matches!(other, Err(JournalError::OperationIdReused { .. })));
    }

    #[tokio::test]
    async fn a_running_operation_is_not_run_twice_concurrently() {
        let store = MemoryStore::new();
        let a = Journal::new(store.clone(), "runner-a");
        // The same runner too: two requests inside one daemon must not share the lease.
        let b = Journal::new(store, "runner-a");
        let op = id("op-4");
        let Begin::Run(_run) = a
            .begin(&op, "mesh_init", &Req { network: "prod" })
            .await
            .expect("begin")
        else {
            panic!("first begin must run");
        };
        let second = b.begin(&op, "mesh_init", &Req { network: "prod" }).await;
        match second {
            Err(JournalError::InProgress { runner, .. }) => {
                assert!(runner.starts_with("runner-a#"), "{runner}")
            }
            Err(other) => panic!("expected InProgress, got {other}"),
            Ok(_) => panic!("expected InProgress, got a run"),
        }
    }

    #[tokio::test]
    async fn an_operation_whose_runner_died_resumes_as_the_next_attempt() {
        let store = MemoryStore::new();
        let ttl = Duration::from_millis(200);
        let a = Journal::new(store.clone(), "runner-a").with_lease_ttl(ttl);
        let b = Journal::new(store, "runner-b").with_lease_ttl(ttl);
        let op = id("op-5");
        let Begin::Run(run) = a
            .begin(&op, "mesh_init", &Req { network: "prod" })
            .await
            .expect("begin")
        else {
            panic!("first begin must run");
        };
        drop(run); // the runner dies without finishing
        tokio::time::sleep(ttl + Duration::from_millis(100)).await;

        let Begin::Run(run) = b
            .begin(&op, "mesh_init", &Req { network: "prod" })
            .await
            .expect("begin")
        else {
            panic!("an unfinished operation must resume");
        };
        assert_eq!(run.attempt(), 2);
        let record = run.succeed(&"done").await.expect("succeed");
        assert_eq!(record.runner, "runner-b");
        assert!(matches!(
            a.begin(&op, "mesh_init", &Req { network: "prod" })
                .await
                .expect("begin"),
            Begin::Replay(_)
        ));
    }

    #[tokio::test]
    async fn list_is_newest_first() {
        let journal = Journal::new(MemoryStore::new(), "runner-a");
        for n in 0..3 {
            run_to_success(&journal, &id(&format!("op-{n}"))).await;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let ids: Vec<String> = journal
            .list(2)
            .await
            .expect("list")
            .into_iter()
            .map(|r| r.id.to_string())
            .collect();
        assert_eq!(ids, ["op-2", "op-1"]);
    }
}
