//! The store follower against a real nats-server (`.tools/nats/bin/nats-server`
//! from `cargo xtask setup`, or `PLOYZ_NATS_BIN`): it publishes a table only
//! once caught up, takes in new commits, ignores older ones, keeps serving when
//! NATS dies, saves the last good table, and catches up again when NATS returns.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use async_nats::jetstream::{self, kv};
use ployz_routing::{
    Origin, Snapshot,
    config::SourceConfig,
    source::{FollowerStatus, StoreFollower, load_last_good},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

fn nats_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("PLOYZ_NATS_BIN") {
        return PathBuf::from(path);
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/nats/bin/nats-server");
    assert!(
        path.is_file(),
        "nats-server missing: run `cargo xtask setup`"
    );
    path
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").port()
}

/// A nats-server on a loopback port with its store in `dir`; killed on drop.
struct Nats {
    child: Child,
}

impl Nats {
    async fn start(dir: &Path, port: u16) -> Self {
        let mut child = Command::new(nats_binary())
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Self { child };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("nats-server did not listen on {port}");
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn bucket(port: u16) -> kv::Store {
    let client = async_nats::connect(format!("nats://127.0.0.1:{port}"))
        .await
        .expect("connect");
    let jetstream = jetstream::new(client);
    jetstream
        .create_key_value(kv::Config {
            bucket: "ployz".to_owned(),
            history: 5,
            ..Default::default()
        })
        .await
        .expect("bucket")
}

fn commit(namespace: &str, seq: u64, body: &str) -> String {
    format!(
        r#"{{"commit":{{"namespace":"{namespace}","seq":{seq}}},"created_at_unix_ms":{seq},
            "services":{{"web":{{"containers":[{{"replica":0,"machine":"m1","addresses":["10.0.0.{seq}"]}}]}}}},
            "routes":[{{"service":"web","hosts":["{body}"],"paths":[],"tcp":null,"port":80,"instances":["10.0.0.{seq}:80"]}}]}}"#
    )
}

async fn put(store: &kv::Store, namespace: &str, seq: u64, host: &str) {
    store
        .put(
            format!("deploys.{namespace}.{seq:010}"),
            commit(namespace, seq, host).into(),
        )
        .await
        .expect("put commit");
}

struct Following {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    status: watch::Receiver<FollowerStatus>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn follow(port: u16, state_dir: &Path) -> Following {
    let (snapshot_sender, snapshots) = watch::channel(Arc::new(Snapshot::default()));
    let (status_sender, status) = watch::channel(FollowerStatus::default());
    let config = SourceConfig {
        nats_url: Some(format!("nats://127.0.0.1:{port}")),
        bucket: "ployz".to_owned(),
        state_dir: state_dir.to_owned(),
        admin_socket: state_dir.join("admin.sock"),
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(
        StoreFollower::new(config, snapshot_sender, status_sender).run(shutdown.clone()),
    );
    Following {
        snapshots,
        status,
        shutdown,
        task,
    }
}

async fn wait_for<T>(
    receiver: &mut watch::Receiver<T>,
    what: &str,
    condition: impl FnMut(&T) -> bool,
) {
    tokio::time::timeout(Duration::from_secs(10), receiver.wait_for(condition))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .expect("sender alive");
}

fn served(snapshot: &Snapshot) -> Vec<(String, u64, String)> {
    snapshot
        .table
        .http_routes()
        .map(|(namespace, route)| {
            (
                namespace.to_owned(),
                snapshot.table.namespaces[namespace].seq,
                route.hosts[0].clone(),
            )
        })
        .collect()
}

#[tokio::test]
async fn follows_commits_survives_nats_loss_and_catches_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let nats = Nats::start(&dir.path().join("nats"), port).await;
    let store = bucket(port).await;
    put(&store, "shop", 1, "one.test").await;
    put(&store, "shop", 2, "two.test").await;
    put(&store, "blog", 1, "blog.test").await;
    store.put("ops.unrelated", "{}".into()).await.expect("put");

    let state_dir = dir.path().join("state");
    let mut following = follow(port, &state_dir);
    wait_for(&mut following.snapshots, "the first table", |s| {
        s.origin == Origin::Store
    })
    .await;
    // Published once caught up: the latest commit of each namespace, never a partial table.
    assert_eq!(
        served(&following.snapshots.borrow()),
        vec![
            ("blog".to_owned(), 1, "blog.test".to_owned()),
            ("shop".to_owned(), 2, "two.test".to_owned()),
        ]
    );
    assert!(following.status.borrow().in_sync);

    // A new commit flips the namespace.
    put(&store, "shop", 3, "three.test").await;
    wait_for(&mut following.snapshots, "commit shop/3", |s| {
        s.table.namespaces.get("shop").is_some_and(|ns| ns.seq == 3)
    })
    .await;
    let saved = load_last_good(&state_dir)
        .expect("readable")
        .expect("saved");
    assert_eq!(
        saved.namespaces["shop"].seq, 3,
        "the last good table is on disk"
    );

    // NATS dies: the table stays, the status says so.
    drop(nats);
    wait_for(&mut following.status, "the loss to be noticed", |s| {
        !s.in_sync
    })
    .await;
    assert_eq!(following.snapshots.borrow().table.namespaces["shop"].seq, 3);

    // NATS returns with its data plus a commit made meanwhile: caught up again.
    let nats = Nats::start(&dir.path().join("nats"), port).await;
    let store = bucket(port).await;
    put(&store, "shop", 4, "four.test").await;
    wait_for(
        &mut following.snapshots,
        "commit shop/4 after reconnecting",
        |s| s.table.namespaces.get("shop").is_some_and(|ns| ns.seq == 4),
    )
    .await;
    wait_for(&mut following.status, "in sync again", |s| s.in_sync).await;

    following.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), following.task)
        .await
        .expect("the follower stops on shutdown")
        .expect("no panic");
    drop(nats);
}

#[tokio::test]
async fn an_empty_store_publishes_an_empty_table_from_the_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let _nats = Nats::start(&dir.path().join("nats"), port).await;
    let _store = bucket(port).await;
    let mut following = follow(port, &dir.path().join("state"));
    wait_for(&mut following.snapshots, "the empty table", |s| {
        s.origin == Origin::Store
    })
    .await;
    assert!(following.snapshots.borrow().table.namespaces.is_empty());
    following.shutdown.cancel();
}
