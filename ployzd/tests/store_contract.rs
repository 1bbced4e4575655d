//! The store contract: one suite of generic assertions, run against
//! `MemoryStore` and against `NatsStore` on a real nats-server (JetStream on,
//! free loopback port, temporary store directory) that each test starts for
//! itself and tears down on drop, so the fake cannot drift from the real thing.

use std::{
    collections::HashMap,
    env,
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant, SystemTime},
};

use futures::StreamExt;
use ployzd::store::{
    EventLog, Key, KeyPrefix, Record, RecordStore, Revision, Store, StoreError, WatchEvent,
    WatchStream,
    lease::{LeaseError, Leases},
    nats::{NatsStore, NatsStoreConfig},
};
use tokio::task::JoinSet;

/// Stamps out one `#[tokio::test]` per backend for every generic case.
macro_rules! contract {
    ($($case:ident),+ $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(ployzd::store::memory::MemoryStore::new()).await;
                }
            )+
        }

        mod nats {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let server = super::NatsServer::start();
                    super::$case(server.connect().await).await;
                }
            )+
        }
    };
}

contract!(
    create_succeeds_only_when_absent,
    update_succeeds_only_at_the_current_revision,
    concurrent_updates_from_one_revision_have_one_winner,
    concurrent_creates_have_one_winner,
    delete_with_and_without_expected_revision,
    create_after_delete_starts_a_new_record,
    update_at_a_delete_marker_revision_fails,
    list_returns_whole_segment_matches_sorted,
    revisions_strictly_increase_across_keys,
    watch_sees_every_change_under_the_prefix_in_order,
    watch_sees_deletes,
    watch_keeps_every_change_for_a_reader_that_falls_behind,
    event_log_reads_in_order_by_topic_and_window,
    lease_is_exclusive_until_released,
    concurrent_lease_acquires_have_one_winner,
    dead_holders_lease_is_taken_over_after_its_ttl,
    renew_extends_the_lease_and_changes_its_token,
);

const WATCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Moving the store into a new JetStream (what a machine does when its NATS
/// becomes clustered): an export imported elsewhere holds the same live
/// records and the same events in the same order; deleted records stay gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_imported_into_another_server_keeps_records_and_event_order() {
    let (from_server, to_server) = (NatsServer::start(), NatsServer::start());
    let (from, to) = (from_server.connect().await, to_server.connect().await);
    let revision = from
        .create(&key("machines.a"), b"a1".to_vec())
        .await
        .expect("create");
    from.update(&key("machines.a"), b"a2".to_vec(), revision)
        .await
        .expect("update");
    from.create(&key("machines.b"), b"b1".to_vec())
        .await
        .expect("create");
    from.create(&key("subnets.0001"), b"s1".to_vec())
        .await
        .expect("create");
    from.delete(&key("machines.b"), None).await.expect("delete");
    for (topic, payload) in [("ops.x", "one"), ("ops.y", "two"), ("ops.x", "three")] {
        from.append(&key(topic), payload.as_bytes().to_vec())
            .await
            .expect("append");
    }

    let export = from.export().await.expect("export");
    to.import(&export).await.expect("import");

    let values = |records: Vec<Record>| -> Vec<(String, Vec<u8>)> {
        records
            .into_iter()
            .map(|record| (record.key.to_string(), record.value))
            .collect()
    };
    assert_eq!(
        values(to.list(&prefix("machines")).await.expect("list")),
        vec![("machines.a".to_owned(), b"a2".to_vec())]
    );
    assert_eq!(
        values(to.list(&prefix("subnets")).await.expect("list")),
        values(from.list(&prefix("subnets")).await.expect("list"))
    );
    let events = |store: &NatsStore| {
        let store = store.clone();
        async move {
            store
                .read(&prefix("ops"), 1, 100)
                .await
                .expect("read")
                .into_iter()
                .map(|event| (event.topic.to_string(), event.payload))
                .collect::<Vec<_>>()
        }
    };
    let moved = events(&to).await;
    assert_eq!(moved, events(&from).await);
    assert_eq!(moved.len(), 3);
    // The imported store is a working store, not a copy frozen in place.
    let current = to
        .get(&key("machines.a"))
        .await
        .expect("get")
        .expect("present");
    to.update(&key("machines.a"), b"a3".to_vec(), current.revision)
        .await
        .expect("update after import");
}

fn key(key: &str) -> Key {
    Key::new(key).expect("valid key")
}

fn prefix(prefix: &str) -> KeyPrefix {
    KeyPrefix::new(prefix).expect("valid prefix")
}

fn keys(records: &[Record]) -> Vec<&str> {
    records.iter().map(|record| record.key.as_str()).collect()
}

async fn next_event(watch: &mut WatchStream) -> WatchEvent {
    tokio::time::timeout(WATCH_TIMEOUT, watch.next())
        .await
        .expect("a watch event in time")
        .expect("the watch is open")
        .expect("a watch event, not an error")
}

async fn assert_no_more_events(watch: &mut WatchStream) {
    if let Ok(extra) = tokio::time::timeout(Duration::from_millis(300), watch.next()).await {
        panic!("unexpected watch event: {extra:?}");
    }
}

async fn create_succeeds_only_when_absent<S: Store>(store: S) {
    let k = key("machines.m1");
    assert_eq!(store.get(&k).await.expect("get"), None);
    let revision = store
        .create(&k, b"one".to_vec())
        .await
        .expect("create an absent key");
    assert_eq!(
        store.get(&k).await.expect("get"),
        Some(Record {
            key: k.clone(),
            value: b"one".to_vec(),
            revision
        })
    );

    let error = store
        .create(&k, b"two".to_vec())
        .await
        .expect_err("second create");
    assert!(
        matches!(&error, StoreError::AlreadyExists { key } if key == "machines.m1"),
        "{error:?}"
    );
    assert!(error.is_conflict() && !error.is_retryable());
    let record = store.get(&k).await.expect("get").expect("record");
    assert_eq!((record.value, record.revision), (b"one".to_vec(), revision));
}

async fn update_succeeds_only_at_the_current_revision<S: Store>(store: S) {
    let k = key("machines.m1");
    let first = store.create(&k, b"v1".to_vec()).await.expect("create");
    let second = store
        .update(&k, b"v2".to_vec(), first)
        .await
        .expect("update at current");
    assert!(second > first);

    let error = store
        .update(&k, b"v3".to_vec(), first)
        .await
        .expect_err("stale revision");
    assert!(
        matches!(error, StoreError::RevisionMismatch { expected, found: Some(found), .. }
            if expected == first && found == second),
        "{error:?}"
    );
    assert!(error.is_conflict());
    let record = store.get(&k).await.expect("get").expect("record");
    assert_eq!((record.value, record.revision), (b"v2".to_vec(), second));

    let absent = key("machines.absent");
    for expected in [0, 1, second] {
        let error = store
            .update(&absent, b"x".to_vec(), expected)
            .await
            .expect_err("update of an absent key");
        assert!(
            matches!(error, StoreError::RevisionMismatch { found: None, .. }),
            "{error:?}"
        );
    }
    assert_eq!(store.get(&absent).await.expect("get"), None);
}

async fn concurrent_updates_from_one_revision_have_one_winner<S: Store>(store: S) {
    let k = key("counters.c");
    let mut revision = store.create(&k, b"start".to_vec()).await.expect("create");
    for round in 0..25 {
        let mut writers = JoinSet::new();
        for writer in 0..4 {
            let (store, k) = (store.clone(), k.clone());
            writers.spawn(async move {
                let value = format!("{round}-{writer}").into_bytes();
                (value.clone(), store.update(&k, value, revision).await)
            });
        }
        let mut winners = Vec::new();
        while let Some(joined) = writers.join_next().await {
            match joined.expect("writer task") {
                (value, Ok(new_revision)) => winners.push((value, new_revision)),
                (_, Err(error)) => assert!(
                    matches!(error, StoreError::RevisionMismatch { .. }),
                    "round {round}: {error:?}"
                ),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
        let (value, new_revision) = winners.remove(0);
        let record = store.get(&k).await.expect("get").expect("record");
        assert_eq!(
            (record.value, record.revision),
            (value, new_revision),
            "round {round}"
        );
        assert!(new_revision > revision);
        revision = new_revision;
    }
}

async fn concurrent_creates_have_one_winner<S: Store>(store: S) {
    for round in 0..20 {
        let k = key(&format!("jobs.j{round}"));
        if round % 2 == 1 {
            // Odd rounds race to recreate a deleted key.
            store.put(&k, b"old".to_vec()).await.expect("put");
            store.delete(&k, None).await.expect("delete");
        }
        let mut creators = JoinSet::new();
        for creator in 0..4 {
            let (store, k) = (store.clone(), k.clone());
            creators.spawn(async move {
                let value = format!("{creator}").into_bytes();
                (value.clone(), store.create(&k, value).await)
            });
        }
        let mut winners = Vec::new();
        while let Some(joined) = creators.join_next().await {
            match joined.expect("creator task") {
                (value, Ok(revision)) => winners.push((value, revision)),
                (_, Err(error)) => assert!(
                    matches!(error, StoreError::AlreadyExists { .. }),
                    "round {round}: {error:?}"
                ),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
        let record = store.get(&k).await.expect("get").expect("record");
        assert_eq!(
            (record.value, record.revision),
            winners.remove(0),
            "round {round}"
        );
    }
}

async fn delete_with_and_without_expected_revision<S: Store>(store: S) {
    let k = key("machines.m1");
    let first = store.put(&k, b"v1".to_vec()).await.expect("put");
    let second = store.put(&k, b"v2".to_vec()).await.expect("put");

    let error = store
        .delete(&k, Some(first))
        .await
        .expect_err("stale revision");
    assert!(
        matches!(error, StoreError::RevisionMismatch { .. }),
        "{error:?}"
    );
    assert_eq!(
        store.get(&k).await.expect("get").map(|r| r.revision),
        Some(second)
    );

    store
        .delete(&k, Some(second))
        .await
        .expect("delete at the current revision");
    assert_eq!(store.get(&k).await.expect("get"), None);
    assert!(
        store
            .list(&prefix("machines"))
            .await
            .expect("list")
            .is_empty()
    );

    let third = store
        .put(&k, b"v3".to_vec())
        .await
        .expect("put after delete");
    assert!(third > second);
    store.delete(&k, None).await.expect("unconditional delete");
    assert_eq!(store.get(&k).await.expect("get"), None);

    store
        .delete(&k, None)
        .await
        .expect("deleting a deleted key is not an error");
    store
        .delete(&key("machines.never"), None)
        .await
        .expect("deleting a never-written key is not an error");
    assert_eq!(store.get(&key("machines.never")).await.expect("get"), None);
}

async fn create_after_delete_starts_a_new_record<S: Store>(store: S) {
    let k = key("machines.m1");
    let first = store.create(&k, b"v1".to_vec()).await.expect("create");
    store.delete(&k, Some(first)).await.expect("delete");
    let second = store
        .create(&k, b"v2".to_vec())
        .await
        .expect("create after delete");
    assert!(second > first);
    assert_eq!(
        store.get(&k).await.expect("get"),
        Some(Record {
            key: k.clone(),
            value: b"v2".to_vec(),
            revision: second
        })
    );
    let error = store
        .update(&k, b"v3".to_vec(), first)
        .await
        .expect_err("pre-delete revision");
    assert!(
        matches!(error, StoreError::RevisionMismatch { .. }),
        "{error:?}"
    );
    let error = store
        .create(&k, b"v4".to_vec())
        .await
        .expect_err("live again");
    assert!(
        matches!(error, StoreError::AlreadyExists { .. }),
        "{error:?}"
    );
}

async fn update_at_a_delete_marker_revision_fails<S: Store>(store: S) {
    let k = key("machines.m1");
    let mut watch = store.watch(&prefix("machines")).await.expect("watch");
    let created = store.create(&k, b"v1".to_vec()).await.expect("create");
    store.delete(&k, None).await.expect("delete");
    assert!(
        matches!(next_event(&mut watch).await, WatchEvent::Put(record) if record.revision == created)
    );
    let WatchEvent::Delete {
        revision: marker, ..
    } = next_event(&mut watch).await
    else {
        panic!("expected the delete");
    };
    assert!(marker > created);

    let error = store
        .update(&k, b"v2".to_vec(), marker)
        .await
        .expect_err("a deleted key has no current revision");
    assert!(
        matches!(error, StoreError::RevisionMismatch { .. }),
        "{error:?}"
    );
    assert_eq!(store.get(&k).await.expect("get"), None);
    store
        .create(&k, b"v3".to_vec())
        .await
        .expect("create after delete");
}

async fn list_returns_whole_segment_matches_sorted<S: Store>(store: S) {
    let writes = [
        ("machines.b", "b"),
        ("machines.a", "a"),
        ("machines.a.disk", "disk"),
        ("machinesx.c", "x"),
        ("machines", "self"),
        ("other.machines.d", "other"),
        ("machines.c", "c"),
    ];
    for (k, value) in writes {
        store
            .put(&key(k), value.as_bytes().to_vec())
            .await
            .expect("put");
    }
    store
        .delete(&key("machines.c"), None)
        .await
        .expect("delete");
    let updated = store
        .put(&key("machines.b"), b"b2".to_vec())
        .await
        .expect("put");

    let listed = store.list(&prefix("machines")).await.expect("list");
    assert_eq!(
        keys(&listed),
        ["machines.a", "machines.a.disk", "machines.b"]
    );
    let values: Vec<&[u8]> = listed
        .iter()
        .map(|record| record.value.as_slice())
        .collect();
    assert_eq!(values, [&b"a"[..], b"disk", b"b2"]);
    assert_eq!(listed[2].revision, updated);
    for record in &listed {
        assert_eq!(
            store.get(&record.key).await.expect("get").as_ref(),
            Some(record)
        );
    }

    let nested = store.list(&prefix("machines.a")).await.expect("list");
    assert_eq!(keys(&nested), ["machines.a.disk"]);
    assert!(
        store
            .list(&prefix("nothing"))
            .await
            .expect("list")
            .is_empty()
    );
}

async fn revisions_strictly_increase_across_keys<S: Store>(store: S) {
    let mut last: Revision = 0;
    let mut current: HashMap<Key, Revision> = HashMap::new();
    for step in 0..30 {
        let k = key(&format!("r.k{}", step % 4));
        let value = format!("{step}").into_bytes();
        let revision = match (step % 3, current.get(&k)) {
            (0, _) => store.put(&k, value).await.expect("put"),
            (1, Some(&revision)) => store.update(&k, value, revision).await.expect("update"),
            (_, Some(&revision)) => {
                store.delete(&k, Some(revision)).await.expect("delete");
                store.create(&k, value).await.expect("create after delete")
            }
            (_, None) => store.create(&k, value).await.expect("create"),
        };
        assert!(revision > last, "step {step}: {revision} after {last}");
        last = revision;
        current.insert(k, revision);
    }
}

async fn watch_sees_every_change_under_the_prefix_in_order<S: Store>(store: S) {
    store
        .put(&key("w.before"), b"old".to_vec())
        .await
        .expect("put");
    let mut watch = store.watch(&prefix("w")).await.expect("watch");

    let mut writers = JoinSet::new();
    for writer in 0..4 {
        let store = store.clone();
        writers.spawn(async move {
            let mut written = Vec::new();
            let mut revisions: HashMap<Key, Revision> = HashMap::new();
            for step in 0..50 {
                let k = key(&format!("w.k{writer}.{}", step % 5));
                let value = format!("{writer}-{step}").into_bytes();
                let revision = match revisions.get(&k) {
                    Some(&revision) => store
                        .update(&k, value.clone(), revision)
                        .await
                        .expect("update"),
                    None => store.create(&k, value.clone()).await.expect("create"),
                };
                revisions.insert(k.clone(), revision);
                written.push(Record {
                    key: k,
                    value,
                    revision,
                });
                // Writes outside the prefix, which the watch must not show.
                store
                    .put(&key(&format!("wx.k{writer}")), b"outside".to_vec())
                    .await
                    .expect("put");
                if step % 10 == 0 {
                    store
                        .put(&key("w"), b"the prefix itself".to_vec())
                        .await
                        .expect("put");
                    store
                        .put(&key("other.w.k"), b"outside".to_vec())
                        .await
                        .expect("put");
                }
            }
            written
        });
    }
    let mut expected = Vec::new();
    while let Some(joined) = writers.join_next().await {
        expected.extend(joined.expect("writer task"));
    }
    expected.sort_by_key(|record| record.revision);
    assert_eq!(expected.len(), 200);

    for (index, record) in expected.into_iter().enumerate() {
        assert_eq!(
            next_event(&mut watch).await,
            WatchEvent::Put(record),
            "event {index}"
        );
    }
    assert_no_more_events(&mut watch).await;
}

async fn watch_keeps_every_change_for_a_reader_that_falls_behind<S: Store>(store: S) {
    // Far more versions per key than a bucket keeps (and megabytes of them),
    // all written before the reader looks at its watch.
    let mut watch = store.watch(&prefix("slow")).await.expect("watch");
    let value = vec![b'x'; 2048];
    let mut revisions = Vec::new();
    for step in 0..2000 {
        let k = key(&format!("slow.k{}", step % 2));
        revisions.push((k.clone(), store.put(&k, value.clone()).await.expect("put")));
    }
    for (index, (k, revision)) in revisions.into_iter().enumerate() {
        match next_event(&mut watch).await {
            WatchEvent::Put(record) => assert_eq!(
                (record.key, record.revision),
                (k, revision),
                "event {index}"
            ),
            other @ WatchEvent::Delete { .. } => panic!("event {index}: {other:?}"),
        }
    }
    assert_no_more_events(&mut watch).await;
}

async fn watch_sees_deletes<S: Store>(store: S) {
    let mut watch = store.watch(&prefix("d")).await.expect("watch");
    let (first, second) = (key("d.one"), key("d.two"));
    let put = store.put(&first, b"1".to_vec()).await.expect("put");
    store.delete(&first, Some(put)).await.expect("delete");
    let created = store.create(&second, b"2".to_vec()).await.expect("create");
    store.delete(&second, None).await.expect("delete");

    assert_eq!(
        next_event(&mut watch).await,
        WatchEvent::Put(Record {
            key: first.clone(),
            value: b"1".to_vec(),
            revision: put
        })
    );
    let deleted = next_event(&mut watch).await;
    assert!(
        matches!(&deleted, WatchEvent::Delete { key, revision } if *key == first && *revision > put),
        "{deleted:?}"
    );
    let recreated = next_event(&mut watch).await;
    assert!(
        matches!(&recreated, WatchEvent::Put(record) if record.key == second && record.revision == created),
        "{recreated:?}"
    );
    assert!(recreated.revision() > deleted.revision());
    let deleted_second = next_event(&mut watch).await;
    assert!(
        matches!(&deleted_second, WatchEvent::Delete { key, revision } if *key == second && *revision > created),
        "{deleted_second:?}"
    );
    assert_no_more_events(&mut watch).await;
}

async fn event_log_reads_in_order_by_topic_and_window<S: Store>(store: S) {
    let started = SystemTime::now();
    let appends = [
        ("deploy.app1", "a"),
        ("deploy.app2", "b"),
        ("deployx", "c"),
        ("deploy", "d"),
        ("machine.m1", "e"),
        ("deploy.app1.step", "f"),
        ("deploy.app1", "g"),
    ];
    let mut sequences = HashMap::new();
    let mut last = 0;
    for (topic, payload) in appends {
        let sequence = store
            .append(&key(topic), payload.as_bytes().to_vec())
            .await
            .expect("append");
        assert!(sequence > last, "{sequence} after {last}");
        last = sequence;
        sequences.insert(payload, sequence);
    }
    assert_eq!(sequences["a"], 1, "the log starts at 1");

    let read =
        |topic: &'static str, from, limit| read_pairs(&store, &sequences, topic, from, limit);
    let pairs = |expected: &[(&str, &str)]| {
        expected
            .iter()
            .map(|(topic, payload)| (topic.to_string(), payload.to_string()))
            .collect::<Vec<_>>()
    };

    assert_eq!(
        read("deploy", 1, 100).await,
        pairs(&[
            ("deploy.app1", "a"),
            ("deploy.app2", "b"),
            ("deploy", "d"),
            ("deploy.app1.step", "f"),
            ("deploy.app1", "g"),
        ])
    );
    assert_eq!(
        read("deploy.app1", 0, 100).await,
        pairs(&[
            ("deploy.app1", "a"),
            ("deploy.app1.step", "f"),
            ("deploy.app1", "g")
        ])
    );
    assert_eq!(
        read("deploy", sequences["d"], 100).await,
        pairs(&[
            ("deploy", "d"),
            ("deploy.app1.step", "f"),
            ("deploy.app1", "g")
        ])
    );
    assert_eq!(
        read("deploy", 1, 2).await,
        pairs(&[("deploy.app1", "a"), ("deploy.app2", "b")])
    );
    assert_eq!(
        read("deploy", sequences["d"] + 1, 1).await,
        pairs(&[("deploy.app1.step", "f")])
    );
    assert!(read("deploy", last + 1, 10).await.is_empty());
    assert!(read("deploy", 1, 0).await.is_empty());
    assert!(read("nothing", 1, 10).await.is_empty());

    let events = store.read(&prefix("machine"), 1, 10).await.expect("read");
    assert_eq!(events.len(), 1);
    let slack = Duration::from_secs(2);
    assert!(events[0].time + slack >= started && events[0].time <= SystemTime::now() + slack);
}

/// Reads `topic` and returns `(topic, payload)` pairs, checking that sequences
/// ascend and match what `append` returned.
async fn read_pairs<S: Store>(
    store: &S,
    sequences: &HashMap<&str, u64>,
    topic: &str,
    from: u64,
    limit: usize,
) -> Vec<(String, String)> {
    let events = store.read(&prefix(topic), from, limit).await.expect("read");
    for pair in events.windows(2) {
        assert!(pair[0].sequence < pair[1].sequence);
    }
    events
        .into_iter()
        .map(|event| {
            let payload = String::from_utf8(event.payload).expect("UTF-8 payload");
            assert_eq!(event.sequence, sequences[payload.as_str()]);
            (event.topic.to_string(), payload)
        })
        .collect()
}

const LEASE_TTL: Duration = Duration::from_secs(10);

async fn lease_is_exclusive_until_released<S: Store>(store: S) {
    let leases = Leases::new(store);
    let before = SystemTime::now();
    let alice = leases
        .acquire("deploy", "alice", LEASE_TTL)
        .await
        .expect("free lease");
    assert_eq!(
        (alice.name.as_str(), alice.holder.as_str()),
        ("deploy", "alice")
    );
    assert!(alice.expires_at > before + LEASE_TTL - Duration::from_secs(1));
    assert!(alice.expires_at <= SystemTime::now() + LEASE_TTL);

    let error = leases
        .acquire("deploy", "bob", LEASE_TTL)
        .await
        .expect_err("held");
    assert!(
        matches!(&error, LeaseError::Held { holder, expires_in, .. }
            if holder == "alice" && *expires_in <= LEASE_TTL && *expires_in > LEASE_TTL / 2),
        "{error:?}"
    );
    assert!(error.is_conflict());

    let renewed = leases
        .acquire("deploy", "alice", LEASE_TTL)
        .await
        .expect("the holder re-acquires its own live lease");
    assert!(renewed.revision > alice.revision);
    let info = leases.get("deploy").await.expect("get").expect("lease");
    assert_eq!(
        (info.holder.as_str(), info.revision),
        ("alice", renewed.revision)
    );
    leases.ensure_held(&renewed).await.expect("held");
    assert!(matches!(
        leases.ensure_held(&alice).await,
        Err(LeaseError::Lost { .. })
    ));

    leases.release(&renewed).await.expect("release");
    assert_eq!(leases.get("deploy").await.expect("get"), None);
    assert!(matches!(
        leases.ensure_held(&renewed).await,
        Err(LeaseError::Lost { .. })
    ));
    let bob = leases
        .acquire("deploy", "bob", LEASE_TTL)
        .await
        .expect("released lease");
    assert!(bob.revision > renewed.revision);
    assert!(matches!(
        leases.release(&renewed).await,
        Err(LeaseError::Lost { .. })
    ));
    leases.ensure_held(&bob).await.expect("bob holds it");
}

async fn concurrent_lease_acquires_have_one_winner<S: Store>(store: S) {
    let leases = Leases::new(store);
    for round in 0..10 {
        let name = format!("race{round}");
        if round % 2 == 1 {
            // Odd rounds race for a lease that was held and released.
            let lease = leases
                .acquire(&name, "earlier", LEASE_TTL)
                .await
                .expect("free lease");
            leases.release(&lease).await.expect("release");
        }
        let mut acquirers = JoinSet::new();
        for holder in 0..6 {
            let (leases, name) = (leases.clone(), name.clone());
            acquirers.spawn(async move {
                leases
                    .acquire(&name, &format!("holder-{holder}"), LEASE_TTL)
                    .await
            });
        }
        let mut winners = Vec::new();
        while let Some(joined) = acquirers.join_next().await {
            match joined.expect("acquirer task") {
                Ok(lease) => winners.push(lease),
                Err(error) => assert!(error.is_conflict(), "round {round}: {error:?}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
        let info = leases.get(&name).await.expect("get").expect("lease");
        assert_eq!(
            (&info.holder, info.revision),
            (&winners[0].holder, winners[0].revision)
        );
    }
}

async fn dead_holders_lease_is_taken_over_after_its_ttl<S: Store>(store: S) {
    let leases = Leases::new(store);
    let ttl = Duration::from_secs(1);
    let dead = leases
        .acquire("scheduler", "dead", ttl)
        .await
        .expect("free lease");
    let error = leases
        .acquire("scheduler", "live", ttl)
        .await
        .expect_err("held");
    assert!(matches!(error, LeaseError::Held { .. }), "{error:?}");

    // The dead holder never renews.
    tokio::time::sleep(ttl + Duration::from_millis(150)).await;
    let live = leases
        .acquire("scheduler", "live", LEASE_TTL)
        .await
        .expect("an expired lease is taken over");
    assert!(live.revision > dead.revision, "the fencing token moves on");

    assert!(matches!(
        leases.ensure_held(&dead).await,
        Err(LeaseError::Lost { .. })
    ));
    assert!(matches!(
        leases.renew(&dead, ttl).await,
        Err(LeaseError::Lost { .. })
    ));
    assert!(matches!(
        leases.release(&dead).await,
        Err(LeaseError::Lost { .. })
    ));
    leases
        .ensure_held(&live)
        .await
        .expect("the new holder holds it");
    let info = leases.get("scheduler").await.expect("get").expect("lease");
    assert_eq!(info.holder, "live");
}

async fn renew_extends_the_lease_and_changes_its_token<S: Store>(store: S) {
    let leases = Leases::new(store);
    // Each sleep is 60% of the TTL: wide margins, so slow round trips on a busy
    // machine cannot make the checks below race the clock.
    let ttl = Duration::from_millis(1500);
    let first = leases
        .acquire("gc", "alice", ttl)
        .await
        .expect("free lease");
    tokio::time::sleep(Duration::from_millis(900)).await;
    let renewed = leases.renew(&first, ttl).await.expect("renew");
    assert!(renewed.expires_at > first.expires_at);
    assert!(renewed.revision > first.revision);
    assert_eq!(renewed.acquired_at, first.acquired_at);

    // Past the first expiry, but within the renewed one.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let error = leases
        .acquire("gc", "bob", ttl)
        .await
        .expect_err("renewed lease is live");
    assert!(matches!(error, LeaseError::Held { .. }), "{error:?}");
    leases.ensure_held(&renewed).await.expect("held");
    assert!(
        matches!(
            leases.ensure_held(&first).await,
            Err(LeaseError::Lost { .. })
        ),
        "the old token no longer proves anything"
    );
}

/// A nats-server with JetStream on a free loopback port. Dropping it kills
/// the server and then removes its store directory.
struct NatsServer {
    child: Child,
    port: u16,
    /// Declared after `child` so it is removed after the server is dead.
    dir: tempfile::TempDir,
}

impl NatsServer {
    fn start() -> Self {
        let binary = nats_server_binary();
        let mut failures = Vec::new();
        // Another process may grab the free port before the server binds it.
        for _ in 0..3 {
            let dir = tempfile::tempdir().expect("temporary directory");
            let port = free_port();
            let child = Command::new(&binary)
                .args([
                    "--addr",
                    "127.0.0.1",
                    "--port",
                    &port.to_string(),
                    "--jetstream",
                ])
                .arg("--store_dir")
                .arg(dir.path().join("jetstream"))
                .arg("--log")
                .arg(dir.path().join("nats.log"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|error| panic!("cannot start {}: {error}", binary.display()));
            let mut server = Self { child, port, dir };
            match server.wait_until_listening(Duration::from_secs(10)) {
                Ok(()) => return server,
                Err(reason) => failures.push(reason),
            }
        }
        panic!("nats-server did not start:\n{}", failures.join("\n"));
    }

    fn wait_until_listening(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll nats-server") {
                return Err(format!("nats-server exited with {status}: {}", self.log()));
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "nats-server is not listening after {timeout:?}: {}",
                    self.log()
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }

    async fn connect(&self) -> NatsStore {
        let config = NatsStoreConfig::new(format!("nats://127.0.0.1:{}", self.port));
        let store = NatsStore::connect(config.clone())
            .await
            .expect("connect to nats-server");
        assert!(!store.server_version().is_empty());
        store.ping().await.expect("ping");
        // A second connect reuses the bucket and the stream.
        NatsStore::connect(config).await.expect("connect again");
        store
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        // Errors mean it is already gone, which is what we want.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port");
    listener.local_addr().expect("local address").port()
}

/// `PLOYZ_NATS_BIN`, else the one `cargo xtask setup` installs, else `PATH`.
fn nats_server_binary() -> PathBuf {
    if let Some(path) = env::var_os("PLOYZ_NATS_BIN") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "PLOYZ_NATS_BIN={} is not a file: point it at a nats-server binary, or unset it \
             and run `cargo xtask setup`",
            path.display()
        );
        return path;
    }
    let installed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/nats/bin/nats-server");
    if installed.is_file() {
        return installed;
    }
    env::var_os("PATH")
        .into_iter()
        .flat_map(|path| env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "nats-server not found: run `cargo xtask setup` (installs it in .tools/nats/bin), \
                 or set PLOYZ_NATS_BIN"
            )
        })
}
