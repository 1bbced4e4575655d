//! Routes with a certificate per server: three real nats-server sidecars over
//! IPv6 loopback, each with its own self-signed route certificate made by
//! `RouteCertificate::generate`, trusting and pinning each other's
//! (`NatsRouteTls`). A server that knows the route password but whose
//! certificate nobody pinned is refused; unpinning a server with
//! `NatsSidecar::set_route_peers` cuts its routes at once while the other two
//! keep the store.
//!
//! What nats-server 2.15.1 showed by hand:
//! - Without a shared CA, a route verifies against `ca_file` (a bundle of the
//!   peers' self-signed certificates), in both directions; `pinned_certs`
//!   alone fails ("certificate signed by unknown authority"), and `verify`
//!   need not be set. The pin is the hex SHA-256 of the DER
//!   SubjectPublicKeyInfo, not of the whole certificate.
//! - The dialling server checks the certificate's IP SAN against the route
//!   URL's host; the accepting one checks only trust and pin.
//! - Both can live in a file included inside `tls {}`; a reload that unpins a
//!   certificate disconnects that server's routes ("Disconnect N clients due
//!   to pinned certs reload"); one that only drops it from `ca_file` keeps
//!   them until they reconnect.
//!
//! Each test kills whatever it started when it ends, even on failure.

mod common;

use std::{
    fs,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use common::{SETTLE, wait_for_peers};
use ployz_tests::{free_addr, kill, processes_under};
use ployzd::{
    services::nats::{
        NatsClusterConfig, NatsRoutePeer, NatsRouteTls, NatsSidecar, NatsSidecarConfig, NatsUser,
        RouteCertificate, find_binary,
    },
    store::{
        Key, RecordStore,
        nats::{NatsStore, NatsStoreConfig},
    },
};
use tempfile::TempDir;
use tokio::time::{Instant, sleep};

/// The route password every server presents, the intruder included.
const ROUTE_SECRET: &str = "shared-route-credential";

/// Four servers' places and route certificates; the fourth is the intruder.
struct Servers {
    dir: TempDir,
    client: Vec<SocketAddr>,
    route: Vec<SocketAddr>,
    certificates: Vec<RouteCertificate>,
}

impl Servers {
    fn new(count: usize) -> Self {
        let host = IpAddr::V6(Ipv6Addr::LOCALHOST);
        let dir = tempfile::tempdir().expect("temp dir");
        let certificates = (0..count)
            .map(|index| {
                RouteCertificate::generate(&format!("server-{index}"), host)
                    .expect("a route certificate")
            })
            .collect();
        Self {
            dir,
            client: (0..count).map(|_| free_addr(host)).collect(),
            route: (0..count).map(|_| free_addr(host)).collect(),
            certificates,
        }
    }

    fn name(index: usize) -> String {
        format!("server-{index}")
    }

    fn peer(&self, index: usize) -> NatsRoutePeer {
        NatsRoutePeer {
            name: Self::name(index),
            certificate_pem: self.certificates[index].certificate_pem.clone(),
            pin: self.certificates[index].pin.clone(),
        }
    }

    fn peers(&self, indexes: &[usize]) -> Vec<NatsRoutePeer> {
        indexes.iter().map(|&index| self.peer(index)).collect()
    }

    /// Server `index`, routing to `routes`, trusting and pinning `pinned`.
    fn config(&self, index: usize, routes: &[usize], pinned: &[usize]) -> NatsSidecarConfig {
        let name = Self::name(index);
        let dir = self.dir.path().join(&name);
        fs::create_dir_all(&dir).expect("server dir");
        let certificate_file = dir.join("route.crt");
        let key_file = dir.join("route.key");
        fs::write(&certificate_file, &self.certificates[index].certificate_pem)
            .expect("write the certificate");
        fs::write(&key_file, &self.certificates[index].key_pem).expect("write the key");
        let binary = find_binary(None).expect("nats-server is installed (cargo xtask setup)");
        let mut config = NatsSidecarConfig::new(binary, dir, name);
        config.listen = self.client[index];
        config.stop_grace = Duration::from_secs(5);
        config.cluster = Some(NatsClusterConfig {
            name: "tls-cluster".to_owned(),
            listen: self.route[index],
            routes: routes.iter().map(|&peer| self.route[peer]).collect(),
            authorization: Some(NatsUser::new("ployz-route", ROUTE_SECRET)),
            tls: Some(NatsRouteTls {
                certificate_file,
                key_file,
                peers: self.peers(pinned),
            }),
        });
        config
    }

    async fn start(&self, index: usize, routes: &[usize], pinned: &[usize]) -> NatsSidecar {
        NatsSidecar::ensure(self.config(index, routes, pinned))
            .await
            .expect("nats-server starts")
    }

    fn file(&self, index: usize, file: &str) -> String {
        fs::read_to_string(self.path(index, file)).unwrap_or_default()
    }

    fn path(&self, index: usize, file: &str) -> PathBuf {
        self.dir.path().join(Self::name(index)).join(file)
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for index in 0..self.client.len() {
                let text = self.file(index, "nats.log");
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                eprintln!("--- server-{index} log (last lines) ---");
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

/// Retries a put until the store takes it (it may elect leaders meanwhile).
async fn put_eventually(store: &NatsStore, key: &Key, value: &[u8]) {
    let started = Instant::now();
    loop {
        match store.put(key, value.to_vec()).await {
            Ok(_) => return,
            Err(error) if error.is_retryable() && started.elapsed() < SETTLE => {
                sleep(Duration::from_millis(200)).await;
            }
            Err(error) => panic!("put failed after {:?}: {error:?}", started.elapsed()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_server_routes_with_its_own_pinned_certificate_and_unpinning_one_cuts_it_off() {
    let servers = Servers::new(4);
    let core = [0, 1, 2];
    let mut running = Vec::new();
    for index in core {
        let routes: Vec<usize> = core.iter().copied().filter(|&i| i != index).collect();
        running.push(servers.start(index, &routes, &core).await);
    }
    let rendered = servers.file(0, "nats.conf");
    assert!(
        rendered.contains("  tls {\n")
            && rendered.contains("    include \"route-peers.conf\"\n")
            && !rendered.contains("BEGIN CERTIFICATE"),
        "the peers stay out of the identity-bearing config:\n{rendered}"
    );
    let pinned = servers.file(0, "route-peers.conf");
    for index in core {
        assert!(
            pinned.contains(&format!(
                "\"{}\"  # server-{index}\n",
                servers.certificates[index].pin
            )),
            "server {index} is not pinned:\n{pinned}"
        );
    }
    assert_eq!(
        servers
            .file(0, "route-peers.pem")
            .matches("BEGIN CERTIFICATE")
            .count(),
        3
    );

    let mut config = NatsStoreConfig::new(running[0].client_url());
    config.startup_timeout = SETTLE;
    let store = NatsStore::connect(config).await.expect("store on server 0");
    let formed = wait_for_peers(&store, 3).await;
    println!("three servers routed over pinned TLS within {formed:?}");
    store.set_replicas(3).await.expect("three replicas");
    let record = Key::new("machines.m-1").expect("key");
    put_eventually(&store, &record, b"one").await;

    // The intruder knows the route password and has a certificate of its
    // own, which no core server pinned: it never becomes a route.
    let intruder = servers.start(3, &core, &[0, 1, 2, 3]).await;
    sleep(Duration::from_secs(3)).await;
    assert_eq!(
        store.cluster_peers().await.expect("cluster peers"),
        3,
        "the intruder joined the cluster"
    );
    let refused = (0..3).any(|index| {
        servers
            .file(index, "nats.log")
            .contains("TLS route handshake error")
    });
    assert!(refused, "no core server logged refusing the intruder");
    intruder.stop().await.expect("stop the intruder");

    // Revoke server 2: servers 0 and 1 unpin it and reload in place.
    let pids: Vec<Option<u32>> = running.iter().map(|server| server.status().pid).collect();
    let revoked = Instant::now();
    for server in &running[..2] {
        assert!(
            server
                .set_route_peers(servers.peers(&[0, 1]))
                .expect("reload"),
            "the peers changed"
        );
        assert!(
            !server
                .set_route_peers(servers.peers(&[0, 1]))
                .expect("reload"),
            "the same peers again change nothing"
        );
    }
    let cut = wait_for_peers(&store, 2).await;
    println!(
        "server 2 cut off {:?} after the reloads ({cut:?} of polling)",
        revoked.elapsed()
    );
    assert!(
        servers
            .file(0, "nats.log")
            .contains("due to pinned certs reload"),
        "{}",
        servers.file(0, "nats.log")
    );
    for (server, pid) in running.iter().zip(&pids) {
        assert_eq!(server.status().pid, *pid, "reloaded, not restarted");
    }
    // The two others keep the store, and server 2 stays out.
    put_eventually(&store, &record, b"two").await;
    let found = store.get(&record).await.expect("get").expect("record");
    assert_eq!(found.value, b"two");
    sleep(Duration::from_secs(3)).await;
    assert_eq!(
        store.cluster_peers().await.expect("cluster peers"),
        2,
        "the revoked server got back in"
    );
}
