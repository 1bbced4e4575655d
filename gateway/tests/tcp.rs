//! TCP routes through real loopback sockets: echo through the gateway, a
//! listener kept across upstream changes, removal, bind errors and refused
//! upstreams skipped.

mod common;

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use common::*;
use ployz_gateway::tcp::{TcpOptions, TcpRoutes, TcpStatus};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpListener, TcpStream},
};

fn options() -> TcpOptions {
    TcpOptions {
        connect_timeout: Duration::from_millis(500),
        shutdown_grace: Duration::from_millis(200),
        bind_retry: Duration::from_millis(100),
        ..TcpOptions::default()
    }
}

/// Waits until the routes' status satisfies `done`.
async fn status_until(routes: &TcpRoutes, done: impl Fn(&TcpStatus) -> bool) -> TcpStatus {
    for _ in 0..200 {
        let status = routes.status();
        if done(&status) {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("status never matched: {:?}", routes.status());
}

/// Connects, reads the backend's greeting line, and checks one echo.
async fn connect(port: u16) -> (BufReader<TcpStream>, String) {
    let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .await
        .expect("connect");
    let mut stream = BufReader::new(stream);
    let mut greeting = String::new();
    stream.read_line(&mut greeting).await.expect("greeting");
    echo(&mut stream, b"hello").await;
    (stream, greeting.trim_end().to_owned())
}

async fn echo(stream: &mut BufReader<TcpStream>, message: &[u8]) {
    stream.get_mut().write_all(message).await.expect("write");
    let mut echoed = vec![0_u8; message.len()];
    stream.read_exact(&mut echoed).await.expect("echo");
    assert_eq!(echoed, message);
}

#[tokio::test]
async fn tcp_routes_echo_and_keep_connections_when_upstreams_change() {
    let mut harness = Harness::default();
    let a = harness.echo("a").await;
    let b = harness.echo("b").await;
    let port = closed_port().await.port();
    let (sender, receiver) = tokio::sync::watch::channel(snapshot(vec![(
        "db",
        1,
        vec![],
        vec![tcp_route("pg", port, &[a])],
    )]));
    let routes = TcpRoutes::new(receiver, Ipv4Addr::LOCALHOST.into(), options());
    harness
        .tasks
        .spawn(Arc::clone(&routes).run(harness.shutdown.clone()));
    let status = status_until(&routes, |status| !status.listening.is_empty()).await;
    assert_eq!(
        status.listening[0].address,
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    );
    assert_eq!(status.listening[0].service, "pg");

    let (mut first, greeting) = connect(port).await;
    assert_eq!(greeting, "a");

    sender.send_replace(snapshot(vec![(
        "db",
        2,
        vec![],
        vec![tcp_route("pg", port, &[b])],
    )]));
    status_until(&routes, |status| {
        status
            .listening
            .first()
            .is_some_and(|port| port.upstreams == [b])
    })
    .await;
    echo(&mut first, b"still here").await;
    let (_, greeting) = connect(port).await;
    assert_eq!(greeting, "b");

    sender.send_replace(snapshot(vec![("db", 3, vec![], vec![])]));
    status_until(&routes, |status| status.listening.is_empty()).await;
    assert!(
        TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .await
            .is_err()
    );
    echo(&mut first, b"open connections outlive their route").await;
}

#[tokio::test]
async fn a_busy_port_is_reported_and_retried() {
    let mut harness = Harness::default();
    let a = harness.echo("a").await;
    let busy = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = busy.local_addr().expect("addr").port();
    let (_sender, receiver) = tokio::sync::watch::channel(snapshot(vec![(
        "db",
        1,
        vec![],
        vec![tcp_route("pg", port, &[a])],
    )]));
    let routes = TcpRoutes::new(receiver, Ipv4Addr::LOCALHOST.into(), options());
    harness
        .tasks
        .spawn(Arc::clone(&routes).run(harness.shutdown.clone()));
    let status = status_until(&routes, |status| !status.bind_errors.is_empty()).await;
    assert_eq!(status.bind_errors[0].port, port);
    assert!(status.listening.is_empty());
    drop(busy);
    status_until(&routes, |status| {
        status.bind_errors.is_empty() && status.listening.len() == 1
    })
    .await;
    let (_, greeting) = connect(port).await;
    assert_eq!(greeting, "a");
}

#[tokio::test]
async fn refused_tcp_upstreams_are_skipped() {
    let mut harness = Harness::default();
    let dead = closed_port().await;
    let live = harness.echo("live").await;
    let port = closed_port().await.port();
    let (_sender, receiver) = tokio::sync::watch::channel(snapshot(vec![(
        "db",
        1,
        vec![],
        vec![tcp_route("pg", port, &[dead, live])],
    )]));
    let routes = TcpRoutes::new(receiver, Ipv4Addr::LOCALHOST.into(), options());
    harness
        .tasks
        .spawn(Arc::clone(&routes).run(harness.shutdown.clone()));
    status_until(&routes, |status| status.listening.len() == 1).await;
    for _ in 0..6 {
        let (_, greeting) = connect(port).await;
        assert_eq!(greeting, "live");
    }
    let status = routes.status();
    assert_eq!(status.upstreams_in_cooldown, vec![dead]);
    assert_eq!(status.upstream_connect_failures, 1);
    assert_eq!(status.connections, 6);
}
