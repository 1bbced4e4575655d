//! Fuzzing entry points: hostile bytes through one proxy connection. A fixed
//! small table routes to a closed local port, so no input waits on a network.
//! Used by `gateway/fuzz` (cargo-fuzz) and by a seeded unit test; it must not
//! depend on anything outside the proxy itself.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use ployz_routing::{HttpRoute, NamespaceTable, RoutingTable, Snapshot};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    runtime::Runtime,
};
use tokio_util::sync::CancellationToken;

use crate::http::{Proxy, ProxyOptions, Scheme};

/// How long one input may take before its connection is dropped.
const INPUT_DEADLINE: Duration = Duration::from_secs(2);

struct Harness {
    runtime: Runtime,
    proxy: Arc<Proxy>,
}

thread_local! {
    static HARNESS: Option<Harness> = harness();
}

fn harness() -> Option<Harness> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    let route = |service: &str, hosts: &[&str], paths: &[&str]| HttpRoute {
        service: service.to_owned(),
        hosts: hosts.iter().map(|host| (*host).to_owned()).collect(),
        paths: paths.iter().map(|path| (*path).to_owned()).collect(),
        tls: None,
        // The discard port: closed on any test machine, so connects are refused at once.
        upstreams: vec![SocketAddr::from(([127, 0, 0, 1], 9))],
    };
    let mut table = RoutingTable::default();
    table.namespaces.insert(
        "fuzz".to_owned(),
        NamespaceTable {
            seq: 1,
            committed_at_unix_ms: 0,
            services: BTreeMap::new(),
            http: vec![
                route("web", &["fuzz.test", "*.fuzz.test"], &["/"]),
                route("api", &["fuzz.test"], &["/api"]),
            ],
            tcp: Vec::new(),
        },
    );
    let (_sender, snapshots) = tokio::sync::watch::channel(Arc::new(Snapshot {
        table,
        ..Snapshot::default()
    }));
    let options = ProxyOptions {
        connect_timeout: Duration::from_millis(50),
        response_header_timeout: Duration::from_millis(500),
        client_header_read_timeout: Duration::from_millis(500),
        shutdown_grace: Duration::from_millis(10),
        ..ProxyOptions::default()
    };
    let proxy = {
        let _entered = runtime.enter();
        Proxy::new(snapshots, options)
    };
    Some(Harness { runtime, proxy })
}

/// Feeds `data` to one plain-HTTP proxy connection as a client would (then
/// closes its write side) and reads whatever the proxy answers. Never panics
/// on any input; a panic here is a bug in the proxy.
pub fn http_request(data: &[u8]) {
    exchange(data);
}

/// Runs one connection over `data` and returns the proxy's answer bytes.
fn exchange(data: &[u8]) -> Vec<u8> {
    HARNESS.with(|harness| {
        let Some(harness) = harness else {
            return Vec::new();
        };
        harness.runtime.block_on(async {
            let (client, server) = tokio::io::duplex(64 * 1024);
            let (mut reader, mut writer) = tokio::io::split(client);
            let shutdown = CancellationToken::new();
            let hard_stop = CancellationToken::new();
            let peer = SocketAddr::from(([192, 0, 2, 1], 40000));
            let serving = Arc::clone(&harness.proxy).serve_connection(
                server,
                peer,
                Scheme::Http,
                shutdown.clone(),
                hard_stop.clone(),
            );
            let writing = async move {
                // The proxy may close before reading everything; that is an answer too.
                let _ = writer.write_all(data).await;
                let _ = writer.shutdown().await;
            };
            let mut answer = Vec::new();
            let reading = reader.read_to_end(&mut answer);
            let all = async { tokio::join!(serving, writing, reading) };
            let _ = tokio::time::timeout(INPUT_DEADLINE, all).await;
            hard_stop.cancel();
            answer
        })
    })
}

#[cfg(test)]
mod tests {
    use rand::{Rng as _, SeedableRng as _, rngs::StdRng};

    use super::*;

    const SEEDS: [&[u8]; 6] = [
        b"GET / HTTP/1.1\r\nHost: fuzz.test\r\n\r\n",
        b"POST /api/x HTTP/1.1\r\nHost: a.fuzz.test\r\nContent-Length: 5\r\n\r\nhello",
        b"GET / HTTP/1.1\r\nHost: fuzz.test\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: fuzz.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
        b"GET http://fuzz.test:80/api HTTP/1.1\r\nHost: other\r\n\r\nGET / HTTP/1.0\r\n\r\n",
    ];

    #[test]
    fn the_harness_reaches_the_proxy() {
        let answer = String::from_utf8_lossy(&exchange(SEEDS[0])).into_owned();
        assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
        let answer = exchange(b"GET / HTTP/1.1\r\nHost: other.test\r\n\r\n");
        assert!(answer.starts_with(b"HTTP/1.1 404"));
        let answer = exchange(b"\x01\x02\r\n\r\n");
        assert!(answer.starts_with(b"HTTP/1.1 400"));
    }

    #[test]
    fn thousands_of_hostile_inputs_do_not_panic() {
        let mut rng = StdRng::seed_from_u64(0x9107_2026);
        for seed in SEEDS {
            http_request(seed);
        }
        for round in 0..3000 {
            let input: Vec<u8> = if round % 3 == 0 {
                let len = rng.random_range(0..512);
                (0..len).map(|_| rng.random()).collect()
            } else {
                let mut input = SEEDS[rng.random_range(0..SEEDS.len())].to_vec();
                for _ in 0..rng.random_range(1..8) {
                    let at = rng.random_range(0..=input.len());
                    match rng.random_range(0..3) {
                        0 if at < input.len() => input[at] = rng.random(),
                        1 if at < input.len() => {
                            input.remove(at);
                        }
                        _ => input.insert(at, rng.random()),
                    }
                }
                input
            };
            http_request(&input);
        }
    }
}
