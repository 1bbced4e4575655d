//! In-memory store for tests: the same contract as [`super::nats::NatsStore`] with
//! the same semantics as a JetStream KV bucket — one revision counter shared by
//! every key, delete markers that take a revision, watches that never drop a
//! change. Holds nothing durable and depends on no backend crate.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::SystemTime,
};

use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::{
    Event, EventLog, Key, KeyPrefix, Record, RecordStore, Revision, Sequence, StoreError,
    WatchEvent, WatchStream,
};

/// A store held in process memory; clones share the same data.
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
}

impl MemoryStore {
    /// An empty store: no records, no events, revisions and sequences start at 1.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every mutation below completes without panicking, so a poisoned lock
        // (a panic elsewhere while holding it) still guards consistent data.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Debug, Default)]
struct State {
    /// The last revision handed out. Shared by all keys, like the sequence of
    /// the stream behind a JetStream KV bucket.
    revision: Revision,
    /// The latest version of every key ever written, delete markers included.
    slots: BTreeMap<Key, Slot>,
    watchers: Vec<Watcher>,
    /// The event log; the event with sequence `n` sits at index `n - 1`.
    events: Vec<Event>,
}

#[derive(Debug)]
struct Slot {
    revision: Revision,
    /// `None` for a delete marker.
    value: Option<Vec<u8>>,
}

#[derive(Debug)]
struct Watcher {
    prefix: KeyPrefix,
    sender: mpsc::UnboundedSender<Result<WatchEvent, StoreError>>,
}

impl State {
    /// The revision of the live (not deleted) record at `key`.
    fn live_revision(&self, key: &Key) -> Option<Revision> {
        self.slots
            .get(key)
            .filter(|slot| slot.value.is_some())
            .map(|slot| slot.revision)
    }

    /// The revision of the last write to `key`, delete markers included; 0 if
    /// the key was never written. This is what JetStream compares an expected
    /// last-subject-sequence against.
    fn last_revision(&self, key: &Key) -> Revision {
        self.slots.get(key).map_or(0, |slot| slot.revision)
    }

    /// Records a put (`Some`) or a delete marker (`None`) and tells the watchers.
    fn write(&mut self, key: &Key, value: Option<Vec<u8>>) -> Revision {
        self.revision += 1;
        let revision = self.revision;
        let event = match &value {
            Some(value) => WatchEvent::Put(Record {
                key: key.clone(),
                value: value.clone(),
                revision,
            }),
            None => WatchEvent::Delete {
                key: key.clone(),
                revision,
            },
        };
        self.slots.insert(key.clone(), Slot { revision, value });
        // Sending under the lock keeps every watcher's stream in revision order;
        // the channels are unbounded, so a slow watcher never loses a change.
        self.watchers.retain(|watcher| {
            if !key.has_prefix(&watcher.prefix) {
                return !watcher.sender.is_closed();
            }
            watcher.sender.send(Ok(event.clone())).is_ok()
        });
        revision
    }
}

impl RecordStore for MemoryStore {
    async fn get(&self, key: &Key) -> Result<Option<Record>, StoreError> {
        let state = self.lock();
        Ok(state.slots.get(key).and_then(|slot| {
            slot.value.as_ref().map(|value| Record {
                key: key.clone(),
                value: value.clone(),
                revision: slot.revision,
            })
        }))
    }

    async fn create(&self, key: &Key, value: Vec<u8>) -> Result<Revision, StoreError> {
        let mut state = self.lock();
        if state.live_revision(key).is_some() {
            return Err(StoreError::AlreadyExists {
                key: key.to_string(),
            });
        }
        Ok(state.write(key, Some(value)))
    }

    async fn update(
        &self,
        key: &Key,
        value: Vec<u8>,
        expected: Revision,
    ) -> Result<Revision, StoreError> {
        let mut state = self.lock();
        let found = state.live_revision(key);
        if found != Some(expected) {
            return Err(StoreError::RevisionMismatch {
                key: key.to_string(),
                expected,
                found,
            });
        }
        Ok(state.write(key, Some(value)))
    }

    async fn put(&self, key: &Key, value: Vec<u8>) -> Result<Revision, StoreError> {
        Ok(self.lock().write(key, Some(value)))
    }

    async fn delete(&self, key: &Key, expected: Option<Revision>) -> Result<(), StoreError> {
        let mut state = self.lock();
        if let Some(expected) = expected
            && state.last_revision(key) != expected
        {
            return Err(StoreError::RevisionMismatch {
                key: key.to_string(),
                expected,
                found: state.live_revision(key),
            });
        }
        // Like JetStream KV, a delete always writes a marker, even for a key that
        // is absent: it takes a revision and watchers see it.
        state.write(key, None);
        Ok(())
    }

    async fn list(&self, prefix: &KeyPrefix) -> Result<Vec<Record>, StoreError> {
        let state = self.lock();
        Ok(state
            .slots
            .iter()
            .filter(|(key, _)| key.has_prefix(prefix))
            .filter_map(|(key, slot)| {
                slot.value.as_ref().map(|value| Record {
                    key: key.clone(),
                    value: value.clone(),
                    revision: slot.revision,
                })
            })
            .collect())
    }

    async fn watch(&self, prefix: &KeyPrefix) -> Result<WatchStream, StoreError> {
        let (sender, receiver) = mpsc::unbounded_channel();
        self.lock().watchers.push(Watcher {
            prefix: prefix.clone(),
            sender,
        });
        Ok(Box::pin(UnboundedReceiverStream::new(receiver)))
    }
}

impl EventLog for MemoryStore {
    async fn append(&self, topic: &Key, payload: Vec<u8>) -> Result<Sequence, StoreError> {
        let mut state = self.lock();
        let sequence = Sequence::try_from(state.events.len()).map_or(Sequence::MAX, |len| len + 1);
        state.events.push(Event {
            topic: topic.clone(),
            sequence,
            payload,
            time: SystemTime::now(),
        });
        Ok(sequence)
    }

    async fn read(
        &self,
        topic: &KeyPrefix,
        from: Sequence,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let state = self.lock();
        let skip = usize::try_from(from.saturating_sub(1)).unwrap_or(usize::MAX);
        Ok(state
            .events
            .iter()
            .skip(skip)
            .filter(|event| event.topic.as_str() == topic.as_str() || event.topic.has_prefix(topic))
            .take(limit)
            .cloned()
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    fn key(key: &str) -> Key {
        Key::new(key).expect("valid key")
    }

    #[tokio::test]
    async fn dropped_watchers_are_forgotten_on_the_next_write() {
        let store = MemoryStore::new();
        let prefix = KeyPrefix::new("a").expect("valid prefix");
        let watch = store.watch(&prefix).await.expect("watch");
        let other = store
            .watch(&KeyPrefix::new("b").expect("valid prefix"))
            .await
            .expect("watch");
        drop(watch);
        drop(other);
        store.put(&key("c.1"), b"x".to_vec()).await.expect("put");
        assert!(store.lock().watchers.is_empty());
    }

    #[tokio::test]
    async fn delete_of_an_absent_key_writes_a_marker_like_jetstream() {
        let store = MemoryStore::new();
        let prefix = KeyPrefix::new("a").expect("valid prefix");
        let mut watch = store.watch(&prefix).await.expect("watch");
        store.delete(&key("a.1"), None).await.expect("delete");
        let event = watch.next().await.expect("an event").expect("no error");
        assert_eq!(
            event,
            WatchEvent::Delete {
                key: key("a.1"),
                revision: 1
            }
        );
        // A marker's revision is what an expected-revision delete compares against.
        store
            .delete(&key("a.1"), Some(1))
            .await
            .expect("delete at the marker's revision");
    }

    #[tokio::test]
    async fn read_from_zero_starts_at_the_first_event() {
        let store = MemoryStore::new();
        let topic = key("t");
        assert_eq!(store.append(&topic, vec![]).await.expect("append"), 1);
        let events = store
            .read(&KeyPrefix::new("t").expect("valid prefix"), 0, 10)
            .await
            .expect("read");
        assert_eq!(events.len(), 1);
    }
}
