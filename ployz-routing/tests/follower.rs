//! The store follower against a real nats-server (`.tools/nats/bin/nats-server`
//! from `cargo xtask setup`, or `PLOYZ_NATS_BIN`): it publishes a table only
//! once caught up, takes in new commits, ignores older ones, keeps serving when
//! NATS dies, saves the last good table, and catches up again when NATS returns.
//! It also authenticates against a server requiring a user and password, and
//! follows a hub's JetStream through a JetStream-less leaf node by its domain.

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
    config::{NatsCredentials, SourceConfig},
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

/// A nats-server on a loopback port; killed on drop, panics included.
struct Nats {
    child: Child,
}

impl Nats {
    /// JetStream on, its store in `dir`, no authorization.
    async fn start(dir: &Path, port: u16) -> Self {
        let mut command = Command::new(nats_binary());
        command
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir);
        Self::spawn(command, port).await
    }

    /// Runs the config `text`, written as `<dir>/<name>.conf`; `port` is the
    /// client port it listens on.
    async fn with_config(dir: &Path, name: &str, text: &str, port: u16) -> Self {
        std::fs::create_dir_all(dir).expect("config dir");
        let path = dir.join(format!("{name}.conf"));
        std::fs::write(&path, text).expect("write nats config");
        let mut command = Command::new(nats_binary());
        command.arg("-c").arg(&path);
        Self::spawn(command, port).await
    }

    async fn spawn(mut command: Command, port: u16) -> Self {
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        for _ in 0..100 {
            // Exited: the port was taken, or the config refused; whatever
            // answers on the port then is not this server.
            if let Ok(Some(status)) = child.try_wait() {
                panic!("nats-server for port {port} exited: {status}");
            }
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
    create_bucket(client).await
}

/// The deploy bucket on the server `client` is connected to, as ployzd writes it.
async fn create_bucket(client: async_nats::Client) -> kv::Store {
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

/// The source config of a follower of the server on `port`, without
/// credentials or JetStream domain.
fn source(port: u16, state_dir: &Path) -> SourceConfig {
    SourceConfig {
        nats_url: Some(format!("nats://127.0.0.1:{port}")),
        credentials: None,
        jetstream_domain: None,
        bucket: "ployz".to_owned(),
        state_dir: state_dir.to_owned(),
        admin_socket: state_dir.join("admin.sock"),
    }
}

fn follow(port: u16, state_dir: &Path) -> Following {
    follow_with(source(port, state_dir))
}

fn follow_with(config: SourceConfig) -> Following {
    let (snapshot_sender, snapshots) = watch::channel(Arc::new(Snapshot::default()));
    let (status_sender, status) = watch::channel(FollowerStatus::default());
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

/// The user every Ployz NATS client authenticates as in these tests.
const USER: &str = "ployzd";
const PASSWORD: &str = "ployzd-secret-1234";

fn credentials(password: &str) -> Option<NatsCredentials> {
    Some(NatsCredentials {
        user: USER.to_owned(),
        password: password.to_owned(),
    })
}

/// A client of the server on `port`, authenticated as [`USER`].
async fn authenticated_client(port: u16) -> async_nats::Client {
    async_nats::ConnectOptions::with_user_and_password(USER.to_owned(), PASSWORD.to_owned())
        .connect(format!("nats://127.0.0.1:{port}"))
        .await
        .expect("connect with the right password")
}

/// Waits long enough for the follower to retry a few times (250 ms, 500 ms,
/// 1 s backoff), then checks it never published nor saved a table.
async fn assert_never_synced(following: &Following, state_dir: &Path) {
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let status = following.status.borrow().clone();
    assert!(!status.in_sync, "{status:?}");
    assert_eq!(status.last_sync_unix_ms, None, "{status:?}");
    assert_eq!(following.snapshots.borrow().origin, Origin::Empty);
    assert!(following.snapshots.borrow().table.namespaces.is_empty());
    assert_eq!(load_last_good(state_dir).expect("readable"), None);
}

#[tokio::test]
async fn follows_with_credentials_and_reports_a_refused_password() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = format!(
        r#"
        listen: "127.0.0.1:{port}"
        jetstream {{ store_dir: "{store}" }}
        authorization {{ users = [ {{ user: "{USER}", password: "{PASSWORD}" }} ] }}
        "#,
        store = dir.path().join("store").display(),
    );
    let _nats = Nats::with_config(dir.path(), "server", &config, port).await;
    let store = create_bucket(authenticated_client(port).await).await;
    put(&store, "shop", 1, "auth.test").await;

    // The right password: caught up, then following.
    let mut following = follow_with(SourceConfig {
        credentials: credentials(PASSWORD),
        ..source(port, &dir.path().join("state"))
    });
    wait_for(&mut following.snapshots, "the table", |s| {
        s.origin == Origin::Store
    })
    .await;
    assert_eq!(
        served(&following.snapshots.borrow()),
        vec![("shop".to_owned(), 1, "auth.test".to_owned())]
    );
    assert!(following.status.borrow().in_sync);
    put(&store, "shop", 2, "auth-two.test").await;
    wait_for(&mut following.snapshots, "commit shop/2", |s| {
        s.table.namespaces.get("shop").is_some_and(|ns| ns.seq == 2)
    })
    .await;
    assert_eq!(
        served(&following.snapshots.borrow()),
        vec![("shop".to_owned(), 2, "auth-two.test".to_owned())]
    );

    // A wrong password, and none at all: refused, said so, never in sync.
    for (case, credentials) in [
        ("wrong-password", credentials("not-the-password")),
        ("no-credentials", None),
    ] {
        let state_dir = dir.path().join(case);
        let mut refused = follow_with(SourceConfig {
            credentials,
            ..source(port, &state_dir)
        });
        wait_for(&mut refused.status, "the refusal", |s| {
            s.last_error
                .as_deref()
                .is_some_and(|error| error.contains("authorization"))
        })
        .await;
        assert_never_synced(&refused, &state_dir).await;
        let error = refused.status.borrow().last_error.clone();
        assert!(
            error.as_deref().is_some_and(
                |error| error.contains("authorization") && !error.contains("not-the-password")
            ),
            "{case}: {error:?}"
        );
        refused.shutdown.cancel();
    }
    following.shutdown.cancel();
}

/// The hub's JetStream domain.
const DOMAIN: &str = "ployz";
/// The user the leaf server connects to the hub as.
const LEAF_USER: &str = "leafuser";
const LEAF_PASSWORD: &str = "leaf-secret-1234";

/// A hub with JetStream in [`DOMAIN`] and a JetStream-less leaf of it, as
/// config texts for `Nats::with_config`.
struct LeafTopology {
    hub_port: u16,
    leaf_port: u16,
    hub_config: String,
    leaf_config: String,
}

impl LeafTopology {
    fn new(dir: &Path) -> Self {
        let (hub_port, hub_leaf_port, leaf_port) = (free_port(), free_port(), free_port());
        let hub_config = format!(
            r#"
            server_name: "hub"
            listen: "127.0.0.1:{hub_port}"
            jetstream {{ store_dir: "{store}", domain: "{DOMAIN}" }}
            authorization {{
                users = [
                    {{ user: "{USER}", password: "{PASSWORD}" }}
                    {{ user: "{LEAF_USER}", password: "{LEAF_PASSWORD}" }}
                ]
            }}
            leafnodes {{ listen: "127.0.0.1:{hub_leaf_port}" }}
            "#,
            store = dir.join("hub-store").display(),
        );
        // The leaf has no JetStream; its clients authenticate too.
        let leaf_config = format!(
            r#"
            server_name: "leaf"
            listen: "127.0.0.1:{leaf_port}"
            authorization {{ users = [ {{ user: "{USER}", password: "{PASSWORD}" }} ] }}
            leafnodes {{
                remotes = [
                    {{ urls: ["nats-leaf://{LEAF_USER}:{LEAF_PASSWORD}@127.0.0.1:{hub_leaf_port}"] }}
                ]
            }}
            "#
        );
        Self {
            hub_port,
            leaf_port,
            hub_config,
            leaf_config,
        }
    }

    /// The hub's config without the leaf's user: it refuses the leaf.
    fn hub_config_without_leaf(&self) -> String {
        let without = self.hub_config.replace(
            &format!("{{ user: \"{LEAF_USER}\", password: \"{LEAF_PASSWORD}\" }}"),
            "",
        );
        assert_ne!(without, self.hub_config);
        without
    }
}

#[tokio::test]
async fn follows_the_hub_through_a_leaf_node_by_jetstream_domain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let LeafTopology {
        hub_port,
        leaf_port,
        hub_config,
        leaf_config,
    } = LeafTopology::new(dir.path());
    let _hub = Nats::with_config(dir.path(), "hub", &hub_config, hub_port).await;
    let _leaf = Nats::with_config(dir.path(), "leaf", &leaf_config, leaf_port).await;

    // Written on the hub, as ployzd on a core machine writes commits.
    let store = create_bucket(authenticated_client(hub_port).await).await;
    put(&store, "shop", 1, "leaf.test").await;

    let state_dir = dir.path().join("state");
    let mut following = follow_with(SourceConfig {
        credentials: credentials(PASSWORD),
        jetstream_domain: Some(DOMAIN.to_owned()),
        ..source(leaf_port, &state_dir)
    });
    wait_for(
        &mut following.snapshots,
        "the table through the leaf",
        |s| s.origin == Origin::Store,
    )
    .await;
    // The commit's key was read from the delivered subject: still `$KV.ployz.<key>`.
    assert_eq!(
        served(&following.snapshots.borrow()),
        vec![("shop".to_owned(), 1, "leaf.test".to_owned())]
    );
    assert!(following.status.borrow().in_sync);

    // New commits on the hub keep arriving through the leaf.
    put(&store, "shop", 2, "leaf-two.test").await;
    wait_for(
        &mut following.snapshots,
        "commit shop/2 through the leaf",
        |s| s.table.namespaces.get("shop").is_some_and(|ns| ns.seq == 2),
    )
    .await;
    assert_eq!(
        served(&following.snapshots.borrow()),
        vec![("shop".to_owned(), 2, "leaf-two.test".to_owned())]
    );
    let saved = load_last_good(&state_dir)
        .expect("readable")
        .expect("saved");
    assert_eq!(saved.namespaces["shop"].seq, 2);

    // Without the domain the leaf has no JetStream to offer: never in sync.
    let no_domain_dir = dir.path().join("no-domain");
    let mut no_domain = follow_with(SourceConfig {
        credentials: credentials(PASSWORD),
        ..source(leaf_port, &no_domain_dir)
    });
    wait_for(&mut no_domain.status, "the missing JetStream", |s| {
        s.last_error
            .as_deref()
            .is_some_and(|error| error.contains("needs `jetstream_domain`"))
    })
    .await;
    assert_never_synced(&no_domain, &no_domain_dir).await;

    no_domain.shutdown.cancel();
    following.shutdown.cancel();
}

/// A leaf machine's gateway and DNS start before its leaf server is admitted
/// by the hub: the follower must catch up once the leaf connection is up.
#[tokio::test]
async fn a_follower_started_before_the_leaf_connects_catches_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let topology = LeafTopology::new(dir.path());
    let (hub_port, leaf_port) = (topology.hub_port, topology.leaf_port);
    let (hub_config, leaf_config) = (&topology.hub_config, &topology.leaf_config);
    // The hub runs and holds a commit, but does not admit the leaf yet.
    let without_leaf = topology.hub_config_without_leaf();
    let hub = Nats::with_config(dir.path(), "hub", &without_leaf, hub_port).await;
    let store = create_bucket(authenticated_client(hub_port).await).await;
    put(&store, "shop", 1, "late.test").await;
    let _leaf = Nats::with_config(dir.path(), "leaf", leaf_config, leaf_port).await;
    let state_dir = dir.path().join("state");
    let mut following = follow_with(SourceConfig {
        credentials: credentials(PASSWORD),
        jetstream_domain: Some(DOMAIN.to_owned()),
        ..source(leaf_port, &state_dir)
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Admitted by a reload, as ployzd admits a new leaf machine.
    std::fs::write(dir.path().join("hub.conf"), hub_config).expect("write hub config");
    let sent = std::process::Command::new("kill")
        .args(["-HUP", &hub.child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success(), "SIGHUP the hub");
    wait_for(
        &mut following.snapshots,
        "the table through a leaf connected late",
        |s| s.table.namespaces.get("shop").is_some_and(|ns| ns.seq == 1),
    )
    .await;
    following.shutdown.cancel();
}
