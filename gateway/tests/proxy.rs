//! The HTTP proxy through real loopback sockets: routing, balancing, passive
//! health, forwarded headers, HTTP/2, upgrades, TLS by SNI, table swaps and
//! hostile clients.

mod common;

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use ployz_gateway::{http::Proxy, tls::TlsTerminator};
use ployz_routing::TlsFiles;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};
use tokio_rustls::{
    TlsConnector,
    rustls::{self, ClientConfig, RootCertStore, pki_types::ServerName},
};

#[tokio::test]
async fn routes_by_host_and_longest_prefix_and_404s_unknown_hosts() {
    let mut harness = Harness::default();
    let web = harness.backend("web").await;
    let api = harness.backend("api").await;
    let blog = harness.backend("blog").await;
    let table = snapshot(vec![(
        "shop",
        1,
        vec![
            http_route("web", &["shop.test"], &["/"], &[web]),
            http_route("api", &["shop.test"], &["/api"], &[api]),
            http_route("blog", &["blog.test"], &["/"], &[blog]),
        ],
        vec![],
    )]);
    let (proxy, _sender, _) = harness.proxy(table).await;
    let client = client();
    for (host, path, expected) in [
        ("shop.test", "/", "web"),
        ("Shop.Test:8080", "/x", "web"),
        ("shop.test", "/api", "api"),
        ("shop.test", "/api/orders", "api"),
        ("shop.test", "/apix", "web"),
        ("blog.test", "/api", "blog"),
    ] {
        let (status, body) = get(&client, proxy, host, path).await;
        assert_eq!(status, StatusCode::OK, "{host}{path}");
        assert_eq!(name(&body), expected, "{host}{path}");
    }
    let (status, body) = get(&client, proxy, "nowhere.test", "/").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("nowhere.test"), "{body}");
}

#[tokio::test]
async fn balances_across_upstreams() {
    let mut harness = Harness::default();
    let one = harness.backend("one").await;
    let two = harness.backend("two").await;
    let table = snapshot(vec![(
        "shop",
        1,
        vec![http_route("web", &["shop.test"], &["/"], &[one, two])],
        vec![],
    )]);
    let (proxy, _sender, _) = harness.proxy(table).await;
    let client = client();
    let mut seen = Vec::new();
    for _ in 0..6 {
        let (status, body) = get(&client, proxy, "shop.test", "/").await;
        assert_eq!(status, StatusCode::OK);
        seen.push(name(&body).to_owned());
    }
    assert!(seen.iter().any(|name| name == "one"), "{seen:?}");
    assert!(seen.iter().any(|name| name == "two"), "{seen:?}");
}

#[tokio::test]
async fn refused_upstream_cools_down_and_requests_go_to_the_live_one() {
    let mut harness = Harness::default();
    let dead = closed_port().await;
    let live = harness.backend("live").await;
    let table = snapshot(vec![(
        "shop",
        1,
        vec![http_route("web", &["shop.test"], &["/"], &[dead, live])],
        vec![],
    )]);
    let (proxy, _sender, gateway) = harness.proxy(table).await;
    let client = client();
    for _ in 0..20 {
        let (status, body) = get(&client, proxy, "shop.test", "/").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(name(&body), "live");
    }
    let stats = gateway.stats();
    assert_eq!(stats.upstreams_in_cooldown, vec![dead]);
    // Only the first attempt on the dead upstream failed; later requests skipped it.
    assert_eq!(stats.upstream_connect_failures, 1);
    assert_eq!(stats.requests, 20);
    assert_eq!(stats.responses_5xx, 0);
    assert_eq!(stats.commits.get("shop"), Some(&1));
}

#[tokio::test]
async fn a_request_with_a_body_is_retried_when_the_connect_failed() {
    let mut harness = Harness::default();
    let dead = closed_port().await;
    let live = harness.backend("live").await;
    let table = snapshot(vec![(
        "shop",
        1,
        vec![http_route("web", &["shop.test"], &["/"], &[dead, live])],
        vec![],
    )]);
    let (proxy, _sender, gateway) = harness.proxy(table).await;
    // The first request's rotation starts at the dead upstream.
    let answer = raw(
        proxy,
        b"POST /form HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 11\r\nConnection: close\r\n\r\nhello world",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\nbody=hello world\n"), "{answer}");
    assert_eq!(gateway.stats().upstream_connect_failures, 1);
}

#[tokio::test]
async fn an_upstream_that_never_answers_is_504() {
    let mut harness = Harness::default();
    // Connects complete in the backlog, but nobody ever reads or answers.
    let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let table = snapshot(vec![(
        "shop",
        1,
        vec![http_route(
            "web",
            &["shop.test"],
            &["/"],
            &[silent.local_addr().expect("addr")],
        )],
        vec![],
    )]);
    let (sender, receiver) = tokio::sync::watch::channel(table);
    let options = ployz_gateway::http::ProxyOptions {
        response_header_timeout: Duration::from_millis(200),
        ..test_options()
    };
    let gateway = Proxy::new(receiver, options);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let proxy = listener.local_addr().expect("addr");
    harness
        .tasks
        .spawn(Arc::clone(&gateway).serve(listener, harness.shutdown.clone()));
    let (status, body) = get(&client(), proxy, "shop.test", "/").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert_eq!(gateway.stats().responses_5xx, 1);
    drop((sender, silent));
}

#[tokio::test]
async fn all_upstreams_down_is_502() {
    let mut harness = Harness::default();
    let table = snapshot(vec![(
        "shop",
        1,
        vec![http_route(
            "web",
            &["shop.test"],
            &["/"],
            &[closed_port().await, closed_port().await],
        )],
        vec![],
    )]);
    let (proxy, _sender, gateway) = harness.proxy(table).await;
    let client = client();
    for _ in 0..2 {
        let (status, body) = get(&client, proxy, "shop.test", "/").await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert!(body.contains("web"), "{body}");
    }
    assert_eq!(gateway.stats().responses_5xx, 2);
    assert_eq!(gateway.stats().upstreams_in_cooldown.len(), 2);
}

#[tokio::test]
async fn backend_sees_forwarded_headers_and_no_hop_by_hop_ones() {
    let mut harness = Harness::default();
    let web = harness.backend("web").await;
    let table = snapshot(vec![(
        "shop",
        1,
        vec![http_route("web", &["shop.test"], &["/"], &[web])],
        vec![],
    )]);
    let (proxy, _sender, _) = harness.proxy(table).await;
    let answer = raw(
        proxy,
        b"GET /p HTTP/1.1\r\nHost: shop.test:8080\r\nX-Forwarded-For: 203.0.113.9\r\nConnection: close, x-drop\r\nX-Drop: 1\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\nhost=shop.test:8080\n"), "{answer}");
    assert!(
        answer.contains("\nxff=203.0.113.9, 127.0.0.1\n"),
        "{answer}"
    );
    assert!(answer.contains("\nproto=http\n"), "{answer}");
    assert!(answer.contains("\nxfh=shop.test:8080\n"), "{answer}");
    assert!(!answer.contains("connection=close"), "{answer}");
    assert!(answer.contains("\npath=/p\n"), "{answer}");
}

#[tokio::test]
async fn http2_prior_knowledge_is_served() {
    let mut harness = Harness::default();
    let web = harness.backend("web").await;
    let table = snapshot(vec![(
        "shop",
        1,
        vec![http_route("web", &["shop.test"], &["/"], &[web])],
        vec![],
    )]);
    let (proxy, _sender, _) = harness.proxy(table).await;
    let stream = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    harness.tasks.spawn(async move {
        let _ = connection.await;
    });
    // The URI's authority becomes :authority, which names the virtual host.
    let request = Request::get("http://shop.test/h2")
        .version(Version::HTTP_2)
        .body(Empty::<Bytes>::new())
        .expect("request");
    let response = sender.send_request(request).await.expect("h2 answer");
    assert_eq!(response.version(), Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::OK);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert_eq!(name(&body), "web", "{body}");
    assert!(body.contains("\npath=/h2\n"), "{body}");
}

#[tokio::test]
async fn upgrade_tunnels_bytes_both_ways() {
    let mut harness = Harness::default();
    let web = harness.backend("ws").await;
    let table = snapshot(vec![(
        "shop",
        1,
        vec![http_route("ws", &["shop.test"], &["/"], &[web])],
        vec![],
    )]);
    let (proxy, _sender, gateway) = harness.proxy(table).await;
    let mut stream = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    stream
        .write_all(b"GET /socket HTTP/1.1\r\nHost: shop.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        .await
        .expect("write");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0_u8; 1];
        assert_eq!(
            stream.read(&mut byte).await.expect("read head"),
            1,
            "closed early: {head:?}"
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    for message in [&b"ping"[..], b"second message"] {
        stream.write_all(message).await.expect("write");
        let mut echoed = vec![0_u8; message.len()];
        stream.read_exact(&mut echoed).await.expect("echo");
        assert_eq!(echoed, message);
    }
    assert_eq!(gateway.stats().upgrades, 1);
}

#[tokio::test]
async fn table_swap_under_load_never_fails_nor_goes_back() {
    let mut harness = Harness::default();
    let v1 = harness.backend("v1").await;
    let v2 = harness.backend("v2").await;
    let first = snapshot(vec![(
        "shop",
        1,
        vec![http_route("web", &["shop.test"], &["/"], &[v1])],
        vec![],
    )]);
    let (proxy, sender, gateway) = harness.proxy(first).await;
    let looping = tokio::spawn(async move {
        let client = client();
        let mut answers = Vec::new();
        let mut v2_seen = 0;
        while v2_seen < 20 {
            let (status, body) = get(&client, proxy, "shop.test", "/").await;
            assert_eq!(status, StatusCode::OK, "{body}");
            if name(&body) == "v2" {
                v2_seen += 1;
            }
            answers.push(name(&body).to_owned());
        }
        answers
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    sender.send_replace(snapshot(vec![(
        "shop",
        2,
        vec![http_route("web", &["shop.test"], &["/"], &[v2])],
        vec![],
    )]));
    let answers = tokio::time::timeout(Duration::from_secs(10), looping)
        .await
        .expect("loop ends")
        .expect("every request succeeded");
    let flip = answers
        .iter()
        .position(|name| name == "v2")
        .expect("v2 answered");
    assert!(flip > 0, "v1 answered before the swap");
    assert!(
        answers[..flip].iter().all(|name| name == "v1"),
        "{answers:?}"
    );
    assert!(
        answers[flip..].iter().all(|name| name == "v2"),
        "{answers:?}"
    );
    assert_eq!(gateway.stats().commits.get("shop"), Some(&2));
}

#[tokio::test]
async fn oversized_headers_get_431_and_the_proxy_keeps_serving() {
    let mut harness = Harness::default();
    let web = harness.backend("web").await;
    let table = snapshot(vec![(
        "shop",
        1,
        vec![http_route("web", &["shop.test"], &["/"], &[web])],
        vec![],
    )]);
    let (proxy, _sender, _) = harness.proxy(table).await;
    let mut request = b"GET / HTTP/1.1\r\nHost: shop.test\r\nX-Big: ".to_vec();
    request.extend(std::iter::repeat_n(b'a', 100 * 1024));
    request.extend(b"\r\n\r\n");
    let answer = raw(proxy, &request).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    let (status, body) = get(&client(), proxy, "shop.test", "/").await;
    assert_eq!((status, name(&body)), (StatusCode::OK, "web"));
}

#[tokio::test]
async fn garbage_gets_400_and_the_proxy_keeps_serving() {
    let mut harness = Harness::default();
    let web = harness.backend("web").await;
    let table = snapshot(vec![(
        "shop",
        1,
        vec![http_route("web", &["shop.test"], &["/"], &[web])],
        vec![],
    )]);
    let (proxy, _sender, _) = harness.proxy(table).await;
    for garbage in [
        &b"\x00\x01\x02garbage\r\n\r\n"[..],
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost shop\r\n\r\n",
    ] {
        let answer = raw(proxy, garbage).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    }
    let answer = raw(proxy, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "no Host: {answer}");
    let (status, body) = get(&client(), proxy, "shop.test", "/").await;
    assert_eq!((status, name(&body)), (StatusCode::OK, "web"));
}

#[tokio::test]
async fn shutdown_stops_accepting() {
    let (sender, receiver) = tokio::sync::watch::channel(snapshot(vec![]));
    let proxy = Proxy::new(receiver, test_options());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("addr");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let serving = tokio::spawn(Arc::clone(&proxy).serve(listener, shutdown.clone()));
    let (status, _) = get(&client(), address, "x.test", "/").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(2), serving)
        .await
        .expect("serve returns after shutdown")
        .expect("serve task");
    assert!(tokio::net::TcpStream::connect(address).await.is_err());
    drop(sender);
}

struct Certificates {
    roots: RootCertStore,
    files: Vec<(TlsFiles, Vec<u8>)>,
    _dir: tempfile::TempDir,
}

/// A CA and one leaf certificate per host, written as PEM files.
fn certificates(hosts: &[&str]) -> Certificates {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca =
        rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().expect("ca key"))
            .expect("ca");
    let mut roots = RootCertStore::empty();
    roots.add(ca.der().clone()).expect("root");
    let mut files = Vec::new();
    for host in hosts {
        let key = rcgen::KeyPair::generate().expect("key");
        let certificate = rcgen::CertificateParams::new(vec![(*host).to_owned()])
            .expect("params")
            .signed_by(&key, &ca)
            .expect("leaf");
        let certificate_path = dir.path().join(format!("{host}.crt"));
        let key_path = dir.path().join(format!("{host}.key"));
        std::fs::write(&certificate_path, certificate.pem()).expect("write cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        files.push((
            TlsFiles {
                certificate: certificate_path.display().to_string(),
                key: key_path.display().to_string(),
            },
            certificate.der().to_vec(),
        ));
    }
    Certificates {
        roots,
        files,
        _dir: dir,
    }
}

async fn https_get(
    proxy: std::net::SocketAddr,
    roots: &RootCertStore,
    sni: &str,
) -> Result<(Vec<u8>, String), std::io::Error> {
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
    let connector = TlsConnector::from(Arc::new(config));
    let stream = tokio::net::TcpStream::connect(proxy).await?;
    let name = ServerName::try_from(sni.to_owned()).expect("server name");
    let mut stream = connector.connect(name, stream).await?;
    let peer = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|certificate| certificate.to_vec())
        .unwrap_or_default();
    stream
        .write_all(format!("GET / HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    Ok((peer, String::from_utf8_lossy(&answer).into_owned()))
}

#[tokio::test]
async fn tls_picks_the_certificate_by_sni() {
    let mut harness = Harness::default();
    let alpha = harness.backend("alpha").await;
    let beta = harness.backend("beta").await;
    let certificates = certificates(&["alpha.test", "beta.test"]);
    let table = snapshot(vec![(
        "shop",
        1,
        vec![
            tls_route(
                "alpha",
                "alpha.test",
                certificates.files[0].0.clone(),
                alpha,
            ),
            tls_route("beta", "beta.test", certificates.files[1].0.clone(), beta),
            tls_route(
                "gamma",
                "gamma.test",
                TlsFiles {
                    certificate: "/nonexistent/gamma.crt".to_owned(),
                    key: "/nonexistent/gamma.key".to_owned(),
                },
                beta,
            ),
        ],
        vec![],
    )]);
    let (sender, receiver) = tokio::sync::watch::channel(table);
    let tls = TlsTerminator::new(receiver.clone()).expect("terminator");
    assert_eq!(tls.hosts(), vec!["alpha.test", "beta.test"]);
    let proxy = Proxy::new(receiver, test_options());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("addr");
    harness
        .tasks
        .spawn(proxy.serve_tls(listener, tls, harness.shutdown.clone()));

    for (index, host) in ["alpha.test", "beta.test"].into_iter().enumerate() {
        let (peer, answer) = https_get(address, &certificates.roots, host)
            .await
            .expect("https answer");
        assert_eq!(
            peer, certificates.files[index].1,
            "{host} got its own certificate"
        );
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or("");
        assert_eq!(name(body), host.trim_end_matches(".test"), "{answer}");
        assert!(body.contains("\nproto=https\n"), "{answer}");
    }
    assert!(
        https_get(address, &certificates.roots, "unknown.test")
            .await
            .is_err()
    );
    // A route whose files cannot be read is skipped, not served with another's certificate.
    assert!(
        https_get(address, &certificates.roots, "gamma.test")
            .await
            .is_err()
    );
    h2_over_tls(&mut harness, address, &certificates.roots).await;

    // A new snapshot without beta's route: its certificate is no longer served.
    let table = snapshot(vec![(
        "shop",
        2,
        vec![tls_route(
            "alpha",
            "alpha.test",
            certificates.files[0].0.clone(),
            alpha,
        )],
        vec![],
    )]);
    sender.send_replace(table);
    assert!(
        https_get(address, &certificates.roots, "beta.test")
            .await
            .is_err()
    );
    assert!(
        https_get(address, &certificates.roots, "alpha.test")
            .await
            .is_ok()
    );
}

/// HTTP/2 negotiated by ALPN on the TLS listener.
async fn h2_over_tls(harness: &mut Harness, proxy: std::net::SocketAddr, roots: &RootCertStore) {
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let stream = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    let server_name = ServerName::try_from("alpha.test").expect("server name");
    let stream = TlsConnector::from(Arc::new(config))
        .connect(server_name, stream)
        .await
        .expect("handshake");
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    harness.tasks.spawn(async move {
        let _ = connection.await;
    });
    let request = Request::get("https://alpha.test/over-h2")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let response = sender.send_request(request).await.expect("h2 answer");
    assert_eq!(response.version(), Version::HTTP_2);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert_eq!(name(&body), "alpha", "{body}");
    assert!(body.contains("\nproto=https\n"), "{body}");
}
