//! Machines beyond the first three run a leaf server: three real nats-server
//! sidecars form the JetStream cluster (the store at three replicas) and
//! accept leaf connections over IPv6 loopback; a fourth, rendered by
//! `NatsSidecarConfig` as a leaf, connects to all three with its own user, and
//! a `NatsStore` connected only to that leaf server does what a machine's
//! ployzd does with its store.
//!
//! What nats-server 2.15.1 showed by hand (and the tests below keep showing):
//! - nats-server denies `$JS.API.>`, `$KV.>` and `$OBJ.>` across every leaf
//!   connection of an ordinary account, whatever the domains (the log says
//!   "JetStream using domains: local \"\", remote \"\""). A client on a
//!   JetStream-less leaf with no hub domain gets "no responders" for every
//!   JetStream request. With `jetstream { domain: "ployz" }` on the core
//!   servers, `$JS.ployz.API.>` crosses, and the core maps it back onto
//!   `$JS.API.>` and `$JS.ployz.API.$KV.>` onto `$KV.>`. So the leaf's store
//!   uses `jetstream::with_domain("ployz")` (`NatsStoreConfig::jetstream_domain`):
//!   async-nats then also puts KV values on `$JS.ployz.API.$KV.<bucket>.<key>`,
//!   which is why every KV write works; a raw publish to `$KV.ployz.<key>` on
//!   the leaf still gets no responders. Event appends publish on plain
//!   subjects (`ployz.events.>`), which cross as they are.
//! - Core clients may use the domain or not: both answer, even before any
//!   leaf has connected.
//! - Users in the `leafnodes { authorization { users } }` block work, but a
//!   reload that changes them fails: "config reload not supported for
//!   LeafNode: field \"Users\"". Users in the main `authorization` block reload
//!   ("Reloaded: authorization users") and leaf connections are checked
//!   against them, so that is where leaf users live; the core's own clients
//!   then need a user too (async-nats 0.51 ignores credentials in the URL;
//!   `NatsStoreConfig::credentials`). `no_auth_user` is no way out: it also
//!   admitted a leaf that sent no credentials.
//! - A reload without the user refuses the leaf's next connection but leaves
//!   its live one open (nats-server re-checks only clients and routes). A
//!   system-account user closes it: `$SYS.REQ.SERVER.PING.LEAFZ` lists each
//!   server's leaf connections (by the leaf's server name, not its user), and
//!   `$SYS.REQ.SERVER.<id>.KICK` with `{"cid": <id>}` closes one.
//! - A leaf server connects within a few ms once a core server listens, and
//!   retries the next URL every second until one does.
//!
//! Each test kills whatever it started when it ends, even on failure.

mod common;

use std::{
    fs,
    future::Future,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use bytes::Bytes;
use common::{SETTLE, wait_for_peers};
use futures::StreamExt as _;
use ployz_tests::{free_addr, kill, processes_under};
use ployzd::{
    services::nats::{
        NatsClusterConfig, NatsHubConfig, NatsLeafConfig, NatsLeafnodes, NatsSidecar,
        NatsSidecarConfig, NatsUser, find_binary,
    },
    store::{
        EventLog, Key, KeyPrefix, RecordStore, StoreError, WatchEvent,
        lease::Leases,
        nats::{NatsCredentials, NatsStore, NatsStoreConfig, close_leaves_except},
    },
};
use tempfile::TempDir;
use tokio::time::{Instant, sleep, timeout};

/// The core's JetStream domain, through which leaf clients reach it.
const DOMAIN: &str = "ployz";
/// What the leaf server of the machine joining fourth is called.
const LEAF_NAME: &str = "leaf-4";

/// One core server's client, route and leaf listen addresses.
#[derive(Clone, Copy)]
struct CorePlace {
    client: SocketAddr,
    route: SocketAddr,
    leafnodes: SocketAddr,
}

/// Three core servers and any leaf servers in one temporary directory.
/// Dropping it SIGKILLs every process whose command line mentions the directory.
struct Network {
    dir: TempDir,
    core: [CorePlace; 3],
}

impl Network {
    fn new() -> Self {
        let place = || CorePlace {
            client: free_addr(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            route: free_addr(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            leafnodes: free_addr(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        };
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
            core: [place(), place(), place()],
        }
    }

    fn local_user() -> NatsUser {
        NatsUser::new("ployzd", "local-password-0123")
    }

    fn system_user() -> NatsUser {
        NatsUser::new("system", "system-password-4567")
    }

    /// Core server `index`, routing to the other two and accepting leaf servers.
    fn core_config(&self, index: usize) -> NatsSidecarConfig {
        let name = format!("core-{index}");
        let mut config = NatsSidecarConfig::new(binary(), self.dir.path().join(&name), name);
        config.listen = self.core[index].client;
        config.stop_grace = Duration::from_secs(5);
        config.cluster = Some(NatsClusterConfig {
            name: "test-cluster".to_owned(),
            listen: self.core[index].route,
            routes: self.core.iter().map(|place| place.route).collect(),
            authorization: Some(NatsUser::new("ployz-route", "route-credential-1234")),
            tls: None,
        });
        config.jetstream_domain = Some(DOMAIN.to_owned());
        config.leafnodes = Some(NatsLeafnodes::Hub(NatsHubConfig {
            listen: self.core[index].leafnodes,
            local_user: Self::local_user(),
            system_user: Self::system_user(),
        }));
        config
    }

    /// A leaf server called `name` connecting to all three core servers as `user`.
    fn leaf_config(&self, name: &str, user: NatsUser) -> NatsSidecarConfig {
        let mut config = NatsSidecarConfig::new(binary(), self.dir.path().join(name), name);
        config.listen = free_addr(IpAddr::V4(Ipv4Addr::LOCALHOST));
        config.stop_grace = Duration::from_secs(5);
        config.leafnodes = Some(NatsLeafnodes::Leaf(NatsLeafConfig {
            hubs: self.core.iter().map(|place| place.leafnodes).collect(),
            user,
        }));
        config
    }

    /// Starts the three core servers and spreads the store over them.
    async fn start_core(&self, leaf_users: &[NatsUser]) -> (Vec<NatsSidecar>, NatsStore) {
        let mut servers = Vec::new();
        for index in 0..self.core.len() {
            let server = NatsSidecar::ensure(self.core_config(index))
                .await
                .expect("core nats-server starts");
            server
                .set_leaf_users(leaf_users.to_vec())
                .expect("leaf users set");
            servers.push(server);
        }
        let mut config = NatsStoreConfig::new(servers[0].client_url());
        config.startup_timeout = SETTLE;
        config.credentials = Some(NatsCredentials {
            user: Self::local_user().name,
            password: Self::local_user().password,
        });
        let store = NatsStore::connect(config)
            .await
            .expect("store on core server 0");
        wait_for_peers(&store, 3).await;
        store.set_replicas(3).await.expect("three replicas");
        (servers, store)
    }

    fn log(&self, server: &str) -> String {
        fs::read_to_string(self.dir.path().join(server).join("nats.log")).unwrap_or_default()
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut servers: Vec<String> = (0..self.core.len())
                .map(|index| format!("core-{index}"))
                .collect();
            servers.push(LEAF_NAME.to_owned());
            for server in servers {
                let text = self.log(&server);
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                eprintln!("--- {server} log (last lines) ---");
                for line in tail.into_iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
        for pid in processes_under(self.dir.path()) {
            kill(pid, libc::SIGKILL);
        }
    }
}

fn binary() -> std::path::PathBuf {
    find_binary(None).expect("nats-server is installed (cargo xtask setup)")
}

/// A store on `leaf`'s client port, addressing the core's JetStream domain.
async fn leaf_store(
    leaf: &NatsSidecar,
    startup_timeout: Duration,
) -> Result<NatsStore, StoreError> {
    let mut config = NatsStoreConfig::new(leaf.client_url());
    config.startup_timeout = startup_timeout;
    config.jetstream_domain = Some(DOMAIN.to_owned());
    NatsStore::connect(config).await
}

fn key(key: &str) -> Key {
    Key::new(key).expect("valid key")
}

fn prefix(prefix: &str) -> KeyPrefix {
    KeyPrefix::new(prefix).expect("valid prefix")
}

/// Polls `check` every 200 ms until it holds or `SETTLE` runs out.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + SETTLE;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not after {SETTLE:?}");
        sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaf_machine_uses_the_core_store_through_its_own_leaf_server() {
    let network = Network::new();
    let leaf_user = NatsUser::new("m-4", "m4-password-89ab");
    let (_core, core_store) = network.start_core(std::slice::from_ref(&leaf_user)).await;

    let started = Instant::now();
    let leaf = NatsSidecar::ensure(network.leaf_config(LEAF_NAME, leaf_user))
        .await
        .expect("leaf nats-server starts");
    let rendered =
        fs::read_to_string(network.dir.path().join(LEAF_NAME).join("nats.conf")).expect("config");
    assert!(
        rendered.contains("\"nats-leaf://m-4:m4-password-89ab@[::1]:"),
        "{rendered}"
    );
    assert!(
        !rendered.contains("jetstream"),
        "a leaf runs no JetStream: {rendered}"
    );
    let store = leaf_store(&leaf, SETTLE).await.expect("store on the leaf");
    println!(
        "store on the leaf ready {:?} after starting it",
        started.elapsed()
    );
    assert_eq!(store.replicas().await.expect("replicas"), 3);

    // Records: written and read through the leaf, the same through the core.
    let machine = key("machines.m-4");
    let created = store
        .create(&machine, b"four".to_vec())
        .await
        .expect("create through the leaf");
    let found = core_store
        .get(&machine)
        .await
        .expect("get")
        .expect("record");
    assert_eq!(
        (found.value.as_slice(), found.revision),
        (&b"four"[..], created)
    );
    let conflict = store.create(&machine, b"again".to_vec()).await;
    assert!(
        matches!(conflict, Err(StoreError::AlreadyExists { .. })),
        "create of an existing key through the leaf: {conflict:?}"
    );
    let stale = store.update(&machine, b"stale".to_vec(), created - 1).await;
    assert!(
        matches!(stale, Err(StoreError::RevisionMismatch { found: Some(found), .. }) if found == created),
        "update with a stale revision through the leaf: {stale:?}"
    );
    let updated = store
        .update(&machine, b"four-bis".to_vec(), created)
        .await
        .expect("update with the current revision");
    let put = store
        .put(&key("machines.m-5"), b"five".to_vec())
        .await
        .expect("put through the leaf");
    assert!(put > updated, "revisions grow: {put} after {updated}");
    let found = store.get(&machine).await.expect("get").expect("record");
    assert_eq!(
        (found.value.as_slice(), found.revision),
        (&b"four-bis"[..], updated)
    );
    let listed = store.list(&prefix("machines")).await.expect("list");
    assert_eq!(listed.len(), 2, "{listed:?}");
    store
        .delete(&key("machines.m-5"), Some(put))
        .await
        .expect("delete through the leaf");
    assert_eq!(
        core_store.get(&key("machines.m-5")).await.expect("get"),
        None
    );

    // A watch through the leaf sees what the core writes.
    let mut watch = store.watch(&prefix("deploys")).await.expect("watch");
    let deploy = key("deploys.app");
    let written = core_store
        .put(&deploy, b"v1".to_vec())
        .await
        .expect("put through the core");
    let event = timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("the watch sees the core's write within 10 s")
        .expect("the watch goes on")
        .expect("a watch event");
    let WatchEvent::Put(record) = event else {
        panic!("expected a put, got {event:?}");
    };
    assert_eq!(
        (record.key, record.value.as_slice(), record.revision),
        (deploy, &b"v1"[..], written)
    );

    // Events: appended on either side, read on either side, in one order.
    let topic = key("deploy.app");
    let first = store
        .append(&topic, b"from the leaf".to_vec())
        .await
        .expect("append through the leaf");
    let second = core_store
        .append(&topic, b"from the core".to_vec())
        .await
        .expect("append through the core");
    let events = store
        .read(&prefix("deploy"), first, 10)
        .await
        .expect("read");
    let read: Vec<(u64, &[u8])> = events
        .iter()
        .map(|event| (event.sequence, event.payload.as_slice()))
        .collect();
    assert_eq!(
        read,
        [
            (first, &b"from the leaf"[..]),
            (second, &b"from the core"[..])
        ]
    );

    // Leases: one held through the leaf is held for the core as well.
    let lease = Leases::new(store.clone())
        .acquire("deploy.app", "m-4", Duration::from_secs(30))
        .await
        .expect("lease through the leaf");
    let taken = Leases::new(core_store.clone())
        .acquire("deploy.app", "m-1", Duration::from_secs(30))
        .await;
    assert!(
        matches!(&taken, Err(error) if error.is_conflict()),
        "a lease held through the leaf was taken through the core: {taken:?}"
    );
    Leases::new(store.clone())
        .release(&lease)
        .await
        .expect("release through the leaf");
}

/// Leaf connections `server`'s system account reports, by leaf server name:
/// (server id, connection id) of each.
async fn leaf_connections(system: &async_nats::Client, leaf_name: &str) -> Vec<(String, u64)> {
    let inbox = system.new_inbox();
    let mut answers = system.subscribe(inbox.clone()).await.expect("subscribe");
    system
        .publish_with_reply("$SYS.REQ.SERVER.PING.LEAFZ", inbox, Bytes::new())
        .await
        .expect("ping the servers");
    let mut found = Vec::new();
    while let Ok(Some(answer)) = timeout(Duration::from_millis(500), answers.next()).await {
        let answer: serde_json::Value =
            serde_json::from_slice(&answer.payload).expect("LEAFZ answers are JSON");
        let server = answer["server"]["id"].as_str().unwrap_or_default();
        let leafs = answer["data"]["leafs"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for leaf in leafs {
            if leaf["name"] == leaf_name
                && let Some(connection) = leaf["id"].as_u64()
            {
                found.push((server.to_owned(), connection));
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_refused_and_a_removed_user_is_cut_off() {
    let network = Network::new();
    let leaf_user = NatsUser::new("m-4", "m4-password-89ab");
    let other_user = NatsUser::new("m-5", "m5-password-cdef");
    let (core, core_store) = network
        .start_core(&[leaf_user.clone(), other_user.clone()])
        .await;

    // The right user with the wrong password never gets through.
    let impostor = NatsSidecar::ensure(network.leaf_config(
        "leaf-5",
        NatsUser::new(other_user.name.clone(), "not-the-password"),
    ))
    .await
    .expect("leaf nats-server starts");
    let refused = leaf_store(&impostor, Duration::from_secs(3)).await;
    assert!(
        matches!(&refused, Err(error) if error.is_retryable()),
        "a store through a leaf with the wrong password: {refused:?}"
    );
    assert!(
        network.log("leaf-5").contains("Authorization Violation"),
        "{}",
        network.log("leaf-5")
    );
    impostor.stop().await.expect("stop the impostor");

    let leaf = NatsSidecar::ensure(network.leaf_config(LEAF_NAME, leaf_user.clone()))
        .await
        .expect("leaf nats-server starts");
    let store = leaf_store(&leaf, SETTLE).await.expect("store on the leaf");
    let record = key("machines.m-4");
    store
        .put(&record, b"four".to_vec())
        .await
        .expect("put through the leaf");

    // Remove the user from every core server, which reloads in place.
    for server in &core {
        let pid = server.status().pid;
        assert!(
            server
                .set_leaf_users(vec![other_user.clone()])
                .expect("reload"),
            "the list changed"
        );
        assert!(
            !server
                .set_leaf_users(vec![other_user.clone()])
                .expect("reload"),
            "the same list again changes nothing"
        );
        assert_eq!(server.status().pid, pid, "reloaded, not replaced");
    }
    for index in 0..core.len() {
        let server = format!("core-{index}");
        eventually("the reload of the smaller user list", || async {
            network
                .log(&server)
                .contains("Reloaded: authorization users")
        })
        .await;
    }
    // The live connection outlives the reload: nats-server re-checks clients
    // and routes on reload, not leaf connections.
    store
        .get(&record)
        .await
        .expect("a reload alone leaves the leaf connected");

    // The system account closes it; every reconnect is then refused. Each
    // core server closes its own connections from leaves it no longer admits.
    let system = async_nats::ConnectOptions::with_user_and_password(
        Network::system_user().name,
        Network::system_user().password,
    )
    .connect(core[0].client_url())
    .await
    .expect("system user connects");
    let connections = leaf_connections(&system, LEAF_NAME).await;
    assert_eq!(
        connections.len(),
        1,
        "one connection per leaf: {connections:?}"
    );
    let credentials = NatsCredentials {
        user: Network::system_user().name,
        password: Network::system_user().password,
    };
    let mut closed = Vec::new();
    for server in &core {
        closed.extend(
            close_leaves_except(
                &server.client_url(),
                &credentials,
                std::slice::from_ref(&other_user.name),
                Duration::from_millis(500),
            )
            .await
            .expect("close the leaf connections no longer admitted"),
        );
    }
    assert_eq!(closed, [LEAF_NAME], "exactly the revoked leaf is closed");
    let cut_off = Instant::now();
    eventually("the revoked leaf loses the store", || async {
        matches!(store.get(&record).await, Err(error) if error.is_retryable())
    })
    .await;
    println!(
        "the revoked leaf lost the store {:?} after the kick",
        cut_off.elapsed()
    );
    // It stays out: several reconnects (one a second) are refused meanwhile.
    sleep(Duration::from_secs(3)).await;
    let still = store.get(&record).await;
    assert!(
        matches!(&still, Err(error) if error.is_retryable()),
        "the revoked leaf got back in: {still:?}"
    );
    assert!(
        leaf_connections(&system, LEAF_NAME).await.is_empty(),
        "the revoked leaf is connected again"
    );
    assert!(
        network.log(LEAF_NAME).contains("Authorization Violation"),
        "{}",
        network.log(LEAF_NAME)
    );
    // The core is unaffected.
    let found = core_store.get(&record).await.expect("get").expect("record");
    assert_eq!(found.value, b"four");
}

/// Right after a leaf server connects, its machine lists the membership
/// records (what `machine ls` does) again and again: every list answers
/// promptly, through whichever core server holds the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_through_a_fresh_leaf_answer_promptly() {
    let network = Network::new();
    let leaf_user = NatsUser::new("m-4", "m4-password-89ab");
    let (_core, core_store) = network.start_core(std::slice::from_ref(&leaf_user)).await;
    for index in 0..5 {
        core_store
            .put(&key(&format!("machines.m-{index}")), b"x".to_vec())
            .await
            .expect("put on the core");
    }
    let leaf = NatsSidecar::ensure(network.leaf_config(LEAF_NAME, leaf_user))
        .await
        .expect("leaf nats-server starts");
    let store = leaf_store(&leaf, SETTLE).await.expect("store on the leaf");
    let mut slowest = Duration::ZERO;
    for _ in 0..40 {
        let started = Instant::now();
        let listed = timeout(Duration::from_secs(7), store.list(&prefix("machines"))).await;
        let took = started.elapsed();
        slowest = slowest.max(took);
        let listed = listed
            .unwrap_or_else(|_| panic!("a list through the leaf took over 7 s"))
            .expect("list through the leaf");
        assert_eq!(listed.len(), 5);
    }
    println!("slowest of 40 lists through a fresh leaf: {slowest:?}");
}
