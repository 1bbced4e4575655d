//! The DNS server on real loopback sockets, asked by the real `dig`.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use hickory_proto::{
    op::{Message, MessageType, Query},
    rr::{Name, RData, Record, RecordType, rdata::A},
};
use ployz_dns::{DnsOptions, DnsServer};
use ployz_routing::{Instance, NamespaceTable, Origin, RoutingTable, ServiceEntry, Snapshot};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    process::Command,
    sync::watch,
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

fn snapshot(seq: u64, web: &[&str]) -> Arc<Snapshot> {
    let instances = web
        .iter()
        .enumerate()
        .map(|(replica, address)| Instance {
            replica: u32::try_from(replica).expect("few replicas"),
            machine: format!("m{replica}"),
            addresses: vec![address.parse().expect("test address")],
        })
        .collect();
    let mut services = BTreeMap::new();
    services.insert(
        "web".to_owned(),
        ServiceEntry {
            ports: vec![8080],
            instances,
        },
    );
    let mut namespaces = BTreeMap::new();
    namespaces.insert(
        "shop".to_owned(),
        NamespaceTable {
            seq,
            committed_at_unix_ms: 0,
            services,
            http: Vec::new(),
            tcp: Vec::new(),
        },
    );
    Arc::new(Snapshot {
        table: RoutingTable { namespaces },
        origin: Origin::Store,
        loaded_at_unix_ms: 0,
    })
}

/// Binds a UDP socket and a TCP listener on the same free loopback port.
async fn bind_pair() -> Result<(UdpSocket, TcpListener)> {
    for _ in 0..50 {
        let udp = ployz_dns::bind_udp((Ipv4Addr::LOCALHOST, 0).into())?;
        let port = udp.local_addr()?.port();
        if let Ok(tcp) = ployz_dns::bind_tcp((Ipv4Addr::LOCALHOST, port).into()) {
            return Ok((udp, tcp));
        }
    }
    bail!("no port free for both UDP and TCP")
}

/// A running server; dropping it cancels and aborts its loops.
struct Running {
    server: Arc<DnsServer>,
    port: u16,
    snapshots: watch::Sender<Arc<Snapshot>>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl Running {
    async fn start(
        snapshot: Arc<Snapshot>,
        upstreams: Vec<SocketAddr>,
        options: DnsOptions,
    ) -> Result<Self> {
        let (snapshots, receiver) = watch::channel(snapshot);
        let server = DnsServer::new(receiver, upstreams, options);
        let (udp, tcp) = bind_pair().await?;
        let port = udp.local_addr()?.port();
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        tasks.spawn(server.clone().serve_udp(udp, shutdown.clone()));
        tasks.spawn(server.clone().serve_tcp(tcp, shutdown.clone()));
        Ok(Self {
            server,
            port,
            snapshots,
            shutdown,
            tasks,
        })
    }

    fn addr(&self) -> SocketAddr {
        (Ipv4Addr::LOCALHOST, self.port).into()
    }

    async fn dig(&self, args: &[&str]) -> Result<String> {
        dig(self.port, args).await
    }

    /// Cancels and joins both loops; they must stop promptly.
    async fn stop(mut self) -> Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(joined) = self.tasks.join_next().await {
                joined.context("server loop panicked")?;
            }
            Ok::<_, anyhow::Error>(())
        })
        .await
        .context("server did not stop")?
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn dig(port: u16, args: &[&str]) -> Result<String> {
    let output = Command::new("/usr/bin/dig")
        .arg("@127.0.0.1")
        .args(["-p", &port.to_string(), "+time=3", "+tries=1"])
        .args(args)
        .output()
        .await
        .context("running dig")?;
    Ok(String::from_utf8(output.stdout)?)
}

fn lines(text: &str) -> Vec<&str> {
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort_unstable();
    lines
}

#[tokio::test]
async fn dig_resolves_service_replica_and_srv_names_over_udp_and_tcp() -> Result<()> {
    let running = Running::start(
        snapshot(1, &["10.1.0.1", "10.1.0.2", "fd00::3"]),
        Vec::new(),
        DnsOptions::default(),
    )
    .await?;
    for transport in ["+notcp", "+tcp"] {
        let a = running
            .dig(&[transport, "web.shop.ployz.internal", "A", "+short"])
            .await?;
        assert_eq!(lines(&a), vec!["10.1.0.1", "10.1.0.2"], "{transport}");
        let aaaa = running
            .dig(&[transport, "WEB.Shop.PLOYZ.internal", "AAAA", "+short"])
            .await?;
        assert_eq!(lines(&aaaa), vec!["fd00::3"], "{transport}");
        let replica = running
            .dig(&[transport, "1.web.shop.ployz.internal", "A", "+short"])
            .await?;
        assert_eq!(lines(&replica), vec!["10.1.0.2"], "{transport}");
        let srv = running
            .dig(&[
                transport,
                "_8080._tcp.web.shop.ployz.internal",
                "SRV",
                "+short",
            ])
            .await?;
        assert_eq!(
            lines(&srv),
            vec![
                "0 10 8080 0.web.shop.ployz.internal.",
                "0 10 8080 1.web.shop.ployz.internal.",
                "0 10 8080 2.web.shop.ployz.internal.",
            ],
            "{transport}"
        );
    }

    let full = running
        .dig(&["web.shop.ployz.internal", "SRV", "+nocomments"])
        .await?;
    assert!(
        full.lines()
            .any(|line| line.starts_with("2.web.shop.ployz.internal.")
                && line.contains("AAAA")
                && line.ends_with("fd00::3")),
        "SRV target addresses in the additional section:\n{full}"
    );

    let missing = running.dig(&["nope.shop.ployz.internal", "A"]).await?;
    assert!(missing.contains("status: NXDOMAIN"), "{missing}");
    assert!(missing.contains("flags: qr aa"), "{missing}");
    assert!(missing.contains("AUTHORITY: 1"), "{missing}");
    assert!(
        missing
            .lines()
            .any(|line| line.starts_with("ployz.internal.") && line.contains("SOA")),
        "{missing}"
    );

    let nodata = running.dig(&["0.web.shop.ployz.internal", "AAAA"]).await?;
    assert!(nodata.contains("status: NOERROR"), "{nodata}");
    assert!(nodata.contains("ANSWER: 0, AUTHORITY: 1"), "{nodata}");

    let chaos = running
        .dig(&["web.shop.ployz.internal", "A", "-c", "CH"])
        .await?;
    assert!(chaos.contains("status: REFUSED"), "{chaos}");

    let soa = running.dig(&["ployz.internal", "SOA", "+short"]).await?;
    assert!(
        soa.starts_with("ns.ployz.internal. hostmaster.ployz.internal. 1 "),
        "{soa}"
    );

    let stats = running.server.stats();
    assert_eq!(stats.serving.get("shop"), Some(&1));
    assert!(stats.local_answers >= 10, "{stats:?}");
    assert!(stats.nxdomain >= 1, "{stats:?}");
    running.stop().await
}

#[tokio::test]
async fn a_new_snapshot_changes_the_answer() -> Result<()> {
    let running = Running::start(
        snapshot(1, &["10.1.0.1"]),
        Vec::new(),
        DnsOptions::default(),
    )
    .await?;
    let before = running.dig(&["web.shop.ployz.internal", "+short"]).await?;
    assert_eq!(lines(&before), vec!["10.1.0.1"]);
    running.snapshots.send(snapshot(2, &["10.2.0.9"]))?;
    for transport in ["+notcp", "+tcp"] {
        let after = running
            .dig(&[transport, "web.shop.ployz.internal", "+short"])
            .await?;
        assert_eq!(lines(&after), vec!["10.2.0.9"], "{transport}");
    }
    assert_eq!(running.server.stats().serving.get("shop"), Some(&2));
    // The sender going away (ployzd gone) leaves the last table served.
    let mut running = running;
    running.snapshots = watch::channel(snapshot(0, &[])).0;
    let still = running.dig(&["web.shop.ployz.internal", "+short"]).await?;
    assert_eq!(lines(&still), vec!["10.2.0.9"]);
    running.stop().await
}

/// A fake upstream resolver answering every A query with 192.0.2.7, over UDP
/// and TCP on one port. Over UDP it first sends two spoofed answers (6.6.6.6):
/// one with the wrong id, one with the right id but another question.
async fn fake_upstream(shutdown: CancellationToken, tasks: &mut JoinSet<()>) -> Result<SocketAddr> {
    let (udp, tcp) = bind_pair().await?;
    let addr = udp.local_addr()?;
    let udp_shutdown = shutdown.clone();
    tasks.spawn(async move {
        let mut buffer = vec![0u8; 4096];
        loop {
            let (length, peer) = tokio::select! {
                () = udp_shutdown.cancelled() => return,
                received = udp.recv_from(&mut buffer) => match received {
                    Ok(received) => received,
                    Err(_) => continue,
                },
            };
            let Ok(request) = Message::from_vec(&buffer[..length]) else {
                continue;
            };
            let mut wrong_id = answer(&request, None, Ipv4Addr::new(6, 6, 6, 6));
            wrong_id.set_id(request.id().wrapping_add(1));
            let wrong_name = answer(
                &request,
                Some(Name::from_ascii("evil.example.").expect("name")),
                Ipv4Addr::new(6, 6, 6, 6),
            );
            for spoof in [wrong_id, wrong_name] {
                let _ = udp.send_to(&spoof.to_vec().expect("encode"), peer).await;
            }
            let reply = answer(&request, None, Ipv4Addr::new(192, 0, 2, 7));
            let _ = udp.send_to(&reply.to_vec().expect("encode"), peer).await;
        }
    });
    tasks.spawn(async move {
        loop {
            let (mut stream, _) = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = tcp.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(_) => continue,
                },
            };
            let Ok(length) = stream.read_u16().await else {
                continue;
            };
            let mut packet = vec![0u8; usize::from(length)];
            if stream.read_exact(&mut packet).await.is_err() {
                continue;
            }
            let Ok(request) = Message::from_vec(&packet) else {
                continue;
            };
            let reply = answer(&request, None, Ipv4Addr::new(192, 0, 2, 7))
                .to_vec()
                .expect("encode");
            let mut framed = u16::try_from(reply.len())
                .expect("short")
                .to_be_bytes()
                .to_vec();
            framed.extend_from_slice(&reply);
            let _ = stream.write_all(&framed).await;
        }
    });
    Ok(addr)
}

fn answer(request: &Message, name: Option<Name>, address: Ipv4Addr) -> Message {
    let mut reply = Message::new();
    reply
        .set_id(request.id())
        .set_message_type(MessageType::Response)
        .set_recursion_desired(true)
        .set_recursion_available(true);
    let query = request.queries().first().cloned().unwrap_or_default();
    let name = name.unwrap_or_else(|| query.name().clone());
    reply.add_query(Query::query(name.clone(), query.query_type()));
    reply.add_answer(Record::from_rdata(name, 60, RData::A(A(address))));
    reply
}

fn fast_forwarding() -> DnsOptions {
    DnsOptions {
        forward_timeout: Duration::from_millis(300),
        ..DnsOptions::default()
    }
}

#[tokio::test]
async fn other_names_are_forwarded_and_only_matching_answers_relayed() -> Result<()> {
    let shutdown = CancellationToken::new();
    let mut upstream_tasks = JoinSet::new();
    let upstream = fake_upstream(shutdown.clone(), &mut upstream_tasks).await?;
    // A resolver that never answers comes first: ours must time out and move on.
    let silent = UdpSocket::bind("127.0.0.1:0").await?;
    let silent_tcp = TcpListener::bind("127.0.0.1:0").await?;
    let _ = silent_tcp;
    let running = Running::start(
        snapshot(1, &["10.1.0.1"]),
        vec![silent.local_addr()?, upstream],
        fast_forwarding(),
    )
    .await?;
    let udp = running.dig(&["example.com", "A", "+short"]).await?;
    assert_eq!(lines(&udp), vec!["192.0.2.7"]);
    let full = running.dig(&["Example.COM", "A"]).await?;
    assert!(full.contains("status: NOERROR"), "{full}");
    assert!(!full.contains("6.6.6.6"), "{full}");
    assert!(!full.contains("evil"), "{full}");

    // Over TCP, straight to the honest upstream.
    let tcp_only = Running::start(snapshot(1, &[]), vec![upstream], fast_forwarding()).await?;
    let tcp = tcp_only
        .dig(&["+tcp", "example.org", "A", "+short"])
        .await?;
    assert_eq!(lines(&tcp), vec!["192.0.2.7"]);

    let stats = running.server.stats();
    assert_eq!(stats.forwarded, 2, "{stats:?}");
    assert_eq!(stats.forward_failures, 0, "{stats:?}");
    running.stop().await?;
    tcp_only.stop().await?;
    shutdown.cancel();
    while upstream_tasks.join_next().await.is_some() {}
    Ok(())
}

#[tokio::test]
async fn dead_upstreams_give_servfail() -> Result<()> {
    let silent = UdpSocket::bind("127.0.0.1:0").await?;
    // Nothing listens on the port of a closed socket: ICMP refusals or silence.
    let closed = UdpSocket::bind("127.0.0.1:0").await?.local_addr()?;
    let running = Running::start(
        snapshot(1, &["10.1.0.1"]),
        vec![silent.local_addr()?, closed],
        fast_forwarding(),
    )
    .await?;
    let udp = running.dig(&["example.com", "A"]).await?;
    assert!(udp.contains("status: SERVFAIL"), "{udp}");
    let tcp = running.dig(&["+tcp", "example.com", "A"]).await?;
    assert!(tcp.contains("status: SERVFAIL"), "{tcp}");
    let none = Running::start(snapshot(1, &[]), Vec::new(), fast_forwarding()).await?;
    let unconfigured = none.dig(&["example.com", "A"]).await?;
    assert!(unconfigured.contains("status: SERVFAIL"), "{unconfigured}");
    // Local names do not depend on upstreams.
    let local = running.dig(&["web.shop.ployz.internal", "+short"]).await?;
    assert_eq!(lines(&local), vec!["10.1.0.1"]);
    assert_eq!(running.server.stats().forward_failures, 2);
    running.stop().await?;
    none.stop().await
}

fn valid_query(id: u16, name: &str, record_type: RecordType) -> Vec<u8> {
    let mut message = Message::new();
    message
        .set_id(id)
        .set_recursion_desired(true)
        .add_query(Query::query(
            Name::from_ascii(name).expect("name"),
            record_type,
        ));
    message.to_vec().expect("encode")
}

fn garbage(rng: &mut StdRng) -> Vec<u8> {
    match rng.random_range(0..5) {
        // Random bytes of any length.
        0 => {
            let length = rng.random_range(0..600);
            (0..length).map(|_| rng.random()).collect()
        }
        // A truncated header.
        1 => vec![0x12; rng.random_range(0..12)],
        // A header claiming 65535 questions and carrying one.
        2 => {
            let mut packet = valid_query(rng.random(), "web.shop.ployz.internal.", RecordType::A);
            packet[4..6].copy_from_slice(&u16::MAX.to_be_bytes());
            packet
        }
        // A compression pointer loop in the question name.
        3 => vec![
            0, 7, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 14, 0xc0, 12, 0, 1, 0, 1,
        ],
        // A valid query with a few bytes flipped.
        _ => {
            let mut packet = valid_query(rng.random(), "web.shop.ployz.internal.", RecordType::SRV);
            for _ in 0..3 {
                let index = rng.random_range(0..packet.len());
                packet[index] = rng.random();
            }
            packet
        }
    }
}

#[tokio::test]
async fn garbage_packets_get_formerr_or_nothing_and_the_server_keeps_answering() -> Result<()> {
    let running = Running::start(
        snapshot(1, &["10.1.0.1"]),
        Vec::new(),
        DnsOptions::default(),
    )
    .await?;
    let client = UdpSocket::bind("127.0.0.1:0").await?;
    client.connect(running.addr()).await?;

    // Header readable, body not: FORMERR with the id echoed.
    let mut huge = valid_query(0xbeef, "web.shop.ployz.internal.", RecordType::A);
    huge[4..6].copy_from_slice(&u16::MAX.to_be_bytes());
    client.send(&huge).await?;
    let mut buffer = vec![0u8; 4096];
    let length = tokio::time::timeout(Duration::from_secs(2), client.recv(&mut buffer))
        .await
        .context("no FORMERR")??;
    assert_eq!(&buffer[..2], &[0xbe, 0xef]);
    assert_eq!(buffer[3] & 0x0f, 1, "FORMERR");
    assert!(length >= 12);

    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..500 {
        client.send(&garbage(&mut rng)).await?;
    }
    // Over TCP too: garbage frames, an oversized length, then a hang-up.
    for _ in 0..20 {
        let mut stream = TcpStream::connect(running.addr()).await?;
        let packet = garbage(&mut rng);
        let mut framed = u16::try_from(packet.len())?.to_be_bytes().to_vec();
        framed.extend_from_slice(&packet);
        stream.write_all(&framed).await?;
        stream.write_all(&[0xff, 0xff, 1, 2, 3]).await?;
    }
    let answer = running.dig(&["web.shop.ployz.internal", "+short"]).await?;
    assert_eq!(lines(&answer), vec!["10.1.0.1"]);
    let tcp = running
        .dig(&["+tcp", "web.shop.ployz.internal", "+short"])
        .await?;
    assert_eq!(lines(&tcp), vec!["10.1.0.1"]);
    assert!(running.server.stats().malformed > 0);
    running.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_storm_leaves_the_server_answering_and_forwards_bounded() -> Result<()> {
    // The upstream never answers, so forwards pile up against the bound.
    let silent = UdpSocket::bind("127.0.0.1:0").await?;
    let options = DnsOptions {
        forward_timeout: Duration::from_millis(500),
        max_forwards_in_flight: 64,
        ..DnsOptions::default()
    };
    let running = Running::start(
        snapshot(1, &["10.1.0.1"]),
        vec![silent.local_addr()?],
        options,
    )
    .await?;
    let target = running.addr();
    let mut clients = JoinSet::new();
    for client in 0..4u64 {
        clients.spawn(async move {
            let socket = UdpSocket::bind("127.0.0.1:0").await?;
            socket.connect(target).await?;
            let mut rng = StdRng::seed_from_u64(client);
            let mut answers = 0u64;
            let mut buffer = vec![0u8; 4096];
            // Batches of 16, each followed by waiting for half of them to be
            // answered (or 50 ms), so the kernel's socket buffer is the
            // server's limit rather than the test's.
            for batch in 0..(5000u32 / 16) {
                let mut batch_answers = 0;
                for offset in 0..16 {
                    let packet = match (batch * 16 + offset) % 4 {
                        0 => valid_query(rng.random(), "web.shop.ployz.internal.", RecordType::A),
                        1 => valid_query(rng.random(), "example.com.", RecordType::A),
                        2 => valid_query(rng.random(), "nope.ployz.internal.", RecordType::SRV),
                        _ => garbage(&mut rng),
                    };
                    socket.send(&packet).await?;
                }
                let deadline = tokio::time::Instant::now() + Duration::from_millis(50);
                while batch_answers < 8 {
                    match tokio::time::timeout_at(deadline, socket.recv(&mut buffer)).await {
                        Ok(received) => {
                            received?;
                            batch_answers += 1;
                        }
                        Err(_) => break,
                    }
                }
                while socket.try_recv(&mut buffer).is_ok() {
                    batch_answers += 1;
                }
                answers += batch_answers;
            }
            Ok::<_, anyhow::Error>(answers)
        });
    }
    let mut answers = 0;
    while let Some(joined) = clients.join_next().await {
        answers += joined??;
    }
    assert!(answers > 0);
    let stats = running.server.stats();
    assert!(stats.forwards_in_flight <= 64, "{stats:?}");
    assert!(stats.forwards_rejected > 0, "{stats:?}");
    let answer = running.dig(&["web.shop.ployz.internal", "+short"]).await?;
    assert_eq!(lines(&answer), vec!["10.1.0.1"]);
    let stats = running.server.stats();
    assert!(stats.queries >= 15_000, "{stats:?}");
    running.stop().await
}

#[tokio::test]
async fn large_answers_truncate_over_udp_and_complete_over_tcp() -> Result<()> {
    let addresses: Vec<String> = (1..=100).map(|host| format!("10.9.0.{host}")).collect();
    let addresses: Vec<&str> = addresses.iter().map(String::as_str).collect();
    let running =
        Running::start(snapshot(1, &addresses), Vec::new(), DnsOptions::default()).await?;
    let cut = running
        .dig(&["+noedns", "+ignore", "web.shop.ployz.internal", "A"])
        .await?;
    assert!(cut.contains("flags: qr aa tc"), "{cut}");
    assert!(cut.contains("ANSWER: 0"), "{cut}");
    // dig retries over TCP on TC, as resolvers do.
    let whole = running
        .dig(&["+noedns", "web.shop.ployz.internal", "A", "+short"])
        .await?;
    assert_eq!(whole.lines().count(), 100, "{whole}");
    assert!(running.server.stats().truncated >= 1);
    running.stop().await
}

#[tokio::test]
async fn tcp_connections_are_bounded_and_idle_ones_closed() -> Result<()> {
    let options = DnsOptions {
        max_tcp_connections: 2,
        tcp_idle_timeout: Duration::from_millis(300),
        ..DnsOptions::default()
    };
    let running = Running::start(snapshot(1, &["10.1.0.1"]), Vec::new(), options).await?;
    let mut first = TcpStream::connect(running.addr()).await?;
    let mut second = TcpStream::connect(running.addr()).await?;
    // Two queries on one connection, in one write.
    let mut pipelined = Vec::new();
    for id in [1u16, 2] {
        let query = valid_query(id, "web.shop.ployz.internal.", RecordType::A);
        pipelined.extend_from_slice(&u16::try_from(query.len())?.to_be_bytes());
        pipelined.extend_from_slice(&query);
    }
    first.write_all(&pipelined).await?;
    for id in [1u16, 2] {
        let length = first.read_u16().await?;
        let mut response = vec![0u8; usize::from(length)];
        first.read_exact(&mut response).await?;
        let response = Message::from_vec(&response)?;
        assert_eq!(response.id(), id);
        assert_eq!(response.answers().len(), 1);
    }
    // A third connection is over the bound and is closed at once.
    let mut third = TcpStream::connect(running.addr()).await?;
    let mut byte = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(2), third.read(&mut byte)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    // Idle connections are closed after the idle timeout, freeing their slots.
    for stream in [&mut first, &mut second] {
        let closed = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut byte)).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let answer = running
        .dig(&["+tcp", "web.shop.ployz.internal", "+short"])
        .await?;
    assert_eq!(lines(&answer), vec!["10.1.0.1"]);
    assert_eq!(running.server.stats().tcp_connections_rejected, 1);
    running.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_udp_sockets_all_answer() -> Result<()> {
    let (_snapshots, receiver) = watch::channel(snapshot(1, &["10.1.0.1"]));
    let server = DnsServer::new(receiver, Vec::new(), DnsOptions::default());
    let sockets = ployz_dns::bind_udp_shared((Ipv4Addr::LOCALHOST, 0).into(), 3)?;
    let port = sockets[0].local_addr()?.port();
    assert!(
        sockets
            .iter()
            .all(|socket| socket.local_addr().is_ok_and(|addr| addr.port() == port))
    );
    let shutdown = CancellationToken::new();
    let mut loops = JoinSet::new();
    for socket in sockets {
        loops.spawn(server.clone().serve_udp(socket, shutdown.clone()));
    }
    // Many source ports, so the kernel spreads them over the sockets.
    for client in 0..30u16 {
        let socket = UdpSocket::bind("127.0.0.1:0").await?;
        socket.connect((Ipv4Addr::LOCALHOST, port)).await?;
        socket
            .send(&valid_query(
                client,
                "web.shop.ployz.internal.",
                RecordType::A,
            ))
            .await?;
        let mut buffer = vec![0u8; 512];
        let length = tokio::time::timeout(Duration::from_secs(2), socket.recv(&mut buffer))
            .await
            .context("no answer")??;
        let response = Message::from_vec(&buffer[..length])?;
        assert_eq!(response.id(), client);
        assert_eq!(response.answers().len(), 1);
    }
    assert_eq!(server.stats().local_answers, 30);
    shutdown.cancel();
    while let Some(joined) = loops.join_next().await {
        joined?;
    }
    Ok(())
}
