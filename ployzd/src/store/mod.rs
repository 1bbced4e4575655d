//! store: the durable cluster facts Ployz keeps — versioned records with
//! compare-and-set, watches, an append-only event log, and leases built on CAS.
//!
//! Two backends implement the same contract: [`nats::NatsStore`] (JetStream KV
//! buckets and streams) and [`memory::MemoryStore`] (unit tests). Domains depend
//! on the traits here, never on async-nats types.

pub mod lease;
pub mod memory;
pub mod nats;

use std::{fmt, future::Future, pin::Pin, time::SystemTime};

use futures::Stream;
use serde::{Serialize, de::DeserializeOwned};

/// Revision of a record. Revisions increase strictly across the whole store,
/// so a later write always has a larger revision than an earlier one.
pub type Revision = u64;

/// Position of an event in the event log; increases strictly with each append.
pub type Sequence = u64;

/// A record key: dot-separated segments of `[A-Za-z0-9_=-]`, e.g. `machines.m-1a2b`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(String);

impl Key {
    /// Validates `key` and wraps it.
    pub fn new(key: impl Into<String>) -> Result<Self, StoreError> {
        let key = key.into();
        validate_segments(&key)?;
        Ok(Self(key))
    }

    /// Joins validated segments with dots.
    pub fn from_segments<'a>(
        segments: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self, StoreError> {
        Self::new(segments.into_iter().collect::<Vec<_>>().join("."))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when this key lies under `prefix` (whole segments only).
    pub fn has_prefix(&self, prefix: &KeyPrefix) -> bool {
        self.0.len() > prefix.0.len()
            && self.0.starts_with(&prefix.0)
            && self.0.as_bytes()[prefix.0.len()] == b'.'
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A prefix of whole key segments, e.g. `machines` matches `machines.m-1` and
/// `machines.m-1.disk` but not `machinesx` or `machines` itself.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KeyPrefix(String);

impl KeyPrefix {
    pub fn new(prefix: impl Into<String>) -> Result<Self, StoreError> {
        let prefix = prefix.into();
        validate_segments(&prefix)?;
        Ok(Self(prefix))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn validate_segments(key: &str) -> Result<(), StoreError> {
    let valid_segment = |segment: &str| {
        !segment.is_empty()
            && segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'='))
    };
    if key.len() > 255 || !key.split('.').all(valid_segment) {
        return Err(StoreError::InvalidKey {
            key: key.to_owned(),
        });
    }
    Ok(())
}

/// One version of a record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub key: Key,
    pub value: Vec<u8>,
    pub revision: Revision,
}

impl Record {
    /// Decodes the value as JSON.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, StoreError> {
        serde_json::from_slice(&self.value).map_err(|source| StoreError::Decode {
            key: self.key.to_string(),
            source,
        })
    }
}

/// Encodes a value as the JSON bytes a record holds.
pub fn encode<T: Serialize>(key: &Key, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|source| StoreError::Encode {
        key: key.to_string(),
        source,
    })
}

/// A change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    Put(Record),
    Delete { key: Key, revision: Revision },
}

impl WatchEvent {
    pub fn revision(&self) -> Revision {
        match self {
            WatchEvent::Put(record) => record.revision,
            WatchEvent::Delete { revision, .. } => *revision,
        }
    }
}

/// Every change under a prefix made after the watch started, in revision order.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, StoreError>> + Send>>;

/// One entry of the append-only event log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub topic: Key,
    pub sequence: Sequence,
    pub payload: Vec<u8>,
    pub time: SystemTime,
}

impl Event {
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, StoreError> {
        serde_json::from_slice(&self.payload).map_err(|source| StoreError::Decode {
            key: self.topic.to_string(),
            source,
        })
    }
}

/// Versioned records with compare-and-set and watches.
pub trait RecordStore: Clone + Send + Sync + 'static {
    /// The current version of `key`, or `None` when absent or deleted.
    fn get(&self, key: &Key) -> impl Future<Output = Result<Option<Record>, StoreError>> + Send;

    /// Writes `key` only if it is absent (or deleted); [`StoreError::AlreadyExists`] otherwise.
    fn create(
        &self,
        key: &Key,
        value: Vec<u8>,
    ) -> impl Future<Output = Result<Revision, StoreError>> + Send;

    /// Writes `key` only if its current revision is `expected`;
    /// [`StoreError::RevisionMismatch`] otherwise (also when the key is absent).
    fn update(
        &self,
        key: &Key,
        value: Vec<u8>,
        expected: Revision,
    ) -> impl Future<Output = Result<Revision, StoreError>> + Send;

    /// Writes `key` unconditionally.
    fn put(
        &self,
        key: &Key,
        value: Vec<u8>,
    ) -> impl Future<Output = Result<Revision, StoreError>> + Send;

    /// Deletes `key`; with `expected`, only if its current revision matches
    /// ([`StoreError::RevisionMismatch`] otherwise). Deleting an absent key is not an error.
    fn delete(
        &self,
        key: &Key,
        expected: Option<Revision>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The current records under `prefix`, sorted by key.
    fn list(
        &self,
        prefix: &KeyPrefix,
    ) -> impl Future<Output = Result<Vec<Record>, StoreError>> + Send;

    /// Every put and delete under `prefix` made after this call returns, in revision order.
    fn watch(
        &self,
        prefix: &KeyPrefix,
    ) -> impl Future<Output = Result<WatchStream, StoreError>> + Send;
}

/// The append-only event log: what operations did, in order.
pub trait EventLog: Clone + Send + Sync + 'static {
    /// Appends one event under `topic` and returns its sequence once it is durable.
    fn append(
        &self,
        topic: &Key,
        payload: Vec<u8>,
    ) -> impl Future<Output = Result<Sequence, StoreError>> + Send;

    /// Events whose topic is `topic` or lies under it, in sequence order, starting
    /// at `from` (inclusive), at most `limit` of them.
    fn read(
        &self,
        topic: &KeyPrefix,
        from: Sequence,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Event>, StoreError>> + Send;
}

/// Everything the daemon keeps: records plus the event log.
pub trait Store: RecordStore + EventLog {}

impl<T: RecordStore + EventLog> Store for T {}

/// What can go wrong talking to the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "invalid store key `{key}`: use dot-separated segments of letters, digits, `_`, `-`, `=`"
    )]
    InvalidKey { key: String },
    #[error("record `{key}` already exists")]
    AlreadyExists { key: String },
    #[error("record `{key}` changed: expected revision {expected}, found {found:?}")]
    RevisionMismatch {
        key: String,
        expected: Revision,
        /// The current revision, when the backend reports it (`None` if absent or unknown).
        found: Option<Revision>,
    },
    #[error("cannot encode record `{key}`")]
    Encode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot decode record `{key}`")]
    Decode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("store is unavailable: {context}")]
    Unavailable {
        context: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    #[error("store backend failed: {context}")]
    Backend {
        context: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl StoreError {
    /// True when retrying the same call later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }

    /// True for the two compare-and-set losses.
    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            StoreError::AlreadyExists { .. } | StoreError::RevisionMismatch { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_accept_dotted_segments() {
        for key in ["machines", "machines.m-1", "ops.0190a-b_c=", "a.b.c.d"] {
            assert!(Key::new(key).is_ok(), "{key}");
        }
    }

    #[test]
    fn keys_reject_empty_segments_wildcards_and_spaces() {
        for key in ["", ".", "a.", ".a", "a..b", "a.*", "a.>", "a b", "ä", "a/b"] {
            assert!(
                matches!(Key::new(key), Err(StoreError::InvalidKey { .. })),
                "{key}"
            );
        }
    }

    #[test]
    fn prefix_matches_whole_segments_only() {
        let prefix = KeyPrefix::new("machines").expect("valid prefix");
        let key = |k: &str| Key::new(k).expect("valid key");
        assert!(key("machines.m1").has_prefix(&prefix));
        assert!(key("machines.m1.disk").has_prefix(&prefix));
        assert!(!key("machines").has_prefix(&prefix));
        assert!(!key("machinesx.m1").has_prefix(&prefix));
    }
}
