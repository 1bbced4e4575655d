//! Test harness: routing tables, small hyper backends that answer with their
//! name and the forwarded headers they saw, and a proxy on a loopback port.
//! Every task belongs to a `JoinSet` that aborts it when the harness drops.

#![allow(dead_code, reason = "each test binary uses part of the harness")]

use std::{collections::BTreeMap, convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
};
use ployz_gateway::http::{Proxy, ProxyOptions};
use ployz_routing::{HttpRoute, NamespaceTable, RoutingTable, Snapshot, TcpRoute, TlsFiles};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
    sync::watch,
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

pub fn http_route(
    service: &str,
    hosts: &[&str],
    paths: &[&str],
    upstreams: &[SocketAddr],
) -> HttpRoute {
    HttpRoute {
        service: service.to_owned(),
        hosts: hosts.iter().map(|host| (*host).to_owned()).collect(),
        paths: paths.iter().map(|path| (*path).to_owned()).collect(),
        tls: None,
        upstreams: upstreams.to_vec(),
    }
}

pub fn tls_route(service: &str, host: &str, files: TlsFiles, upstream: SocketAddr) -> HttpRoute {
    HttpRoute {
        tls: Some(files),
        ..http_route(service, &[host], &["/"], &[upstream])
    }
}

pub fn tcp_route(service: &str, listen_port: u16, upstreams: &[SocketAddr]) -> TcpRoute {
    TcpRoute {
        service: service.to_owned(),
        listen_port,
        upstreams: upstreams.to_vec(),
    }
}

/// A snapshot of namespaces, each `(name, seq, http routes, tcp routes)`.
pub fn snapshot(namespaces: Vec<(&str, u64, Vec<HttpRoute>, Vec<TcpRoute>)>) -> Arc<Snapshot> {
    let mut table = RoutingTable::default();
    for (name, seq, http, tcp) in namespaces {
        table.namespaces.insert(
            name.to_owned(),
            NamespaceTable {
                seq,
                committed_at_unix_ms: 0,
                services: BTreeMap::new(),
                http,
                tcp,
            },
        );
    }
    Arc::new(Snapshot {
        table,
        ..Snapshot::default()
    })
}

/// A loopback port nothing listens on.
pub async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("local addr")
}

/// Owns the tasks of one test; dropping it stops them.
pub struct Harness {
    pub tasks: JoinSet<()>,
    pub shutdown: CancellationToken,
}

impl Default for Harness {
    fn default() -> Self {
        Self {
            tasks: JoinSet::new(),
            shutdown: CancellationToken::new(),
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Harness {
    /// An HTTP/1.1 backend answering `name` plus the forwarded headers it saw,
    /// one `key=value` per line. A request asking for an upgrade gets 101 and
    /// the upgraded connection echoes bytes back.
    pub async fn backend(&mut self, name: &str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let address = listener.local_addr().expect("local addr");
        let name = name.to_owned();
        self.tasks.spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let name = name.clone();
                connections.spawn(async move {
                    let service = service_fn(move |request| answer(name.clone(), request));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        address
    }

    /// A TCP backend that writes `name\n` and then echoes.
    pub async fn echo(&mut self, name: &str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
        let address = listener.local_addr().expect("local addr");
        let greeting = format!("{name}\n");
        self.tasks.spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                let greeting = greeting.clone();
                connections.spawn(async move {
                    if stream.write_all(greeting.as_bytes()).await.is_err() {
                        return;
                    }
                    let (mut reader, mut writer) = stream.split();
                    let _ = tokio::io::copy(&mut reader, &mut writer).await;
                });
            }
        });
        address
    }

    /// A proxy following a new watch channel, serving plain HTTP on a loopback port.
    pub async fn proxy(
        &mut self,
        first: Arc<Snapshot>,
    ) -> (SocketAddr, watch::Sender<Arc<Snapshot>>, Arc<Proxy>) {
        let (sender, receiver) = watch::channel(first);
        let proxy = Proxy::new(receiver, test_options());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let address = listener.local_addr().expect("local addr");
        self.tasks
            .spawn(Arc::clone(&proxy).serve(listener, self.shutdown.clone()));
        (address, sender, proxy)
    }
}

pub fn test_options() -> ProxyOptions {
    ProxyOptions {
        connect_timeout: Duration::from_millis(500),
        response_header_timeout: Duration::from_secs(5),
        shutdown_grace: Duration::from_millis(200),
        ..ProxyOptions::default()
    }
}

async fn answer(
    name: String,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("-")
            .to_owned()
    };
    if request.headers().contains_key(header::UPGRADE) {
        let protocol = header("upgrade");
        let upgrade = hyper::upgrade::on(request);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let mut io = TokioIo::new(upgraded);
                let mut buffer = [0_u8; 1024];
                while let Ok(read) = io.read(&mut buffer).await {
                    if read == 0 || io.write_all(&buffer[..read]).await.is_err() {
                        break;
                    }
                }
            }
        });
        let response = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, protocol)
            .body(Full::new(Bytes::new()))
            .expect("response");
        return Ok(response);
    }
    let head = format!(
        "{name}\nhost={}\nxff={}\nproto={}\nxfh={}\nconnection={}\npath={}\n",
        header("host"),
        header("x-forwarded-for"),
        header("x-forwarded-proto"),
        header("x-forwarded-host"),
        header("connection"),
        request.uri().path(),
    );
    let sent = match request.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::from_static(b"<body error>"),
    };
    let body = format!("{head}body={}\n", String::from_utf8_lossy(&sent));
    Ok(Response::new(Full::new(Bytes::from(body))))
}

/// A pooled HTTP/1.1 test client.
pub fn client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// GETs `path` from the proxy with `host`: the status and body.
pub async fn get(
    client: &Client<HttpConnector, Empty<Bytes>>,
    proxy: SocketAddr,
    host: &str,
    path: &str,
) -> (StatusCode, String) {
    let request = Request::get(format!("http://{proxy}{path}"))
        .header(header::HOST, host)
        .body(Empty::new())
        .expect("request");
    let response = client.request(request).await.expect("proxy answers");
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The first line of a backend's answer: its name.
pub fn name(body: &str) -> &str {
    body.lines().next().unwrap_or("")
}

/// Sends raw bytes on a new connection and reads until the proxy closes or
/// `until` appears.
pub async fn raw(proxy: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    // The proxy may answer and close before taking every byte.
    let _ = stream.write_all(bytes).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}
