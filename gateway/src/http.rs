//! The HTTP/1.1 and HTTP/2 reverse proxy: requests are routed by host and the
//! longest path prefix of the served routing table, balanced round robin over
//! the route's upstreams (skipping ones in passive-health cooldown) and sent
//! over pooled HTTP/1.1 connections. It owns request handling only; TLS comes
//! from [`crate::tls`] and the table from `ployz-routing`, never from ployzd.

mod body;
pub(crate) mod health;
pub(crate) mod routes;

use std::{
    collections::BTreeMap,
    convert::Infallible,
    future::Future,
    io,
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header,
};
use http_body_util::BodyExt;
use hyper::{body::Incoming, service::service_fn, upgrade::OnUpgrade};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioIo, TokioTimer},
    server::conn::auto,
};
use ployz_routing::SnapshotReceiver;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    task::JoinSet,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, warn};

pub use self::body::ProxyBody;
use self::{
    body::{RetryableBody, text},
    health::Cooldowns,
    routes::{Backend, CompiledRoutes, normalize_host},
};
use crate::tls::TlsTerminator;

/// Timeouts and limits of the proxy.
#[derive(Clone, Debug)]
pub struct ProxyOptions {
    /// How long a TCP connect to an upstream may take before the next is tried.
    pub connect_timeout: Duration,
    /// How long an upstream may take to send its response headers (504 after).
    pub response_header_timeout: Duration,
    /// How long a client may take to send its request headers (and the TLS
    /// handshake on HTTPS listeners).
    pub client_header_read_timeout: Duration,
    /// The largest request head accepted; larger ones get 431.
    pub max_request_header_bytes: usize,
    /// How long an upstream whose connect failed is avoided.
    pub cooldown: Duration,
    /// How long an idle pooled upstream connection is kept.
    pub pool_idle_timeout: Duration,
    /// How long in-flight connections may run after shutdown before they are cut.
    pub shutdown_grace: Duration,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            response_header_timeout: Duration::from_secs(60),
            client_header_read_timeout: Duration::from_secs(10),
            max_request_header_bytes: 64 * 1024,
            cooldown: Duration::from_secs(10),
            pool_idle_timeout: Duration::from_secs(90),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// How a client reached the proxy, for `X-Forwarded-Proto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// Counters and state of a [`Proxy`], for the admin socket.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyStats {
    /// Requests answered (by an upstream or by the proxy itself).
    pub requests: u64,
    pub responses_4xx: u64,
    pub responses_5xx: u64,
    /// Upstream TCP connects that were refused or timed out.
    pub upstream_connect_failures: u64,
    /// Upgraded connections (WebSocket and the like) tunnelled.
    pub upgrades: u64,
    /// Upstreams avoided right now because their connect failed recently.
    pub upstreams_in_cooldown: Vec<SocketAddr>,
    /// The commit sequence served for each namespace.
    pub commits: BTreeMap<String, u64>,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    responses_4xx: AtomicU64,
    responses_5xx: AtomicU64,
    upstream_connect_failures: AtomicU64,
    upgrades: AtomicU64,
}

/// Spawns hyper's background futures (HTTP/2 streams, pooled upstream
/// connections) on a tracker the proxy owns instead of detaching them.
#[derive(Clone, Debug)]
struct TrackedExecutor {
    tracker: TaskTracker,
}

impl<F> hyper::rt::Executor<F> for TrackedExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        // The tracker keeps the task; its handle is not needed because the
        // future ends with the connection or stream it drives.
        drop(self.tracker.spawn(future));
    }
}

/// The reverse proxy. One value serves any number of listeners (plain and
/// TLS) and routes every request by exactly one compiled table.
///
/// The proxy follows the snapshot receiver by itself: each request compares
/// the receiver's current snapshot with the one its compiled table was built
/// from and compiles the new one once when it changed, so no follower task is
/// needed and a table swap is atomic (one `Arc` replaced under a lock).
pub struct Proxy {
    snapshots: SnapshotReceiver,
    routes: RwLock<Arc<CompiledRoutes>>,
    compile: Mutex<()>,
    options: ProxyOptions,
    client: Client<HttpConnector, RetryableBody>,
    server: auto::Builder<TrackedExecutor>,
    background: TaskTracker,
    cooldowns: Cooldowns,
    counters: Counters,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("options", &self.options)
            .field("background_tasks", &self.background.len())
            .finish_non_exhaustive()
    }
}

/// Hop-by-hop headers, never forwarded (RFC 9110 §7.6.1); `Connection` and
/// `Upgrade` are put back for an upgrade.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// How long the accept loop waits after an accept error such as `EMFILE`.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

impl Proxy {
    /// A proxy serving what `snapshots` holds, now and after every change.
    pub fn new(snapshots: SnapshotReceiver, options: ProxyOptions) -> Arc<Self> {
        let background = TaskTracker::new();
        let executor = TrackedExecutor {
            tracker: background.clone(),
        };
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(options.connect_timeout));
        let client = Client::builder(executor.clone())
            .pool_idle_timeout(options.pool_idle_timeout)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        let mut server = auto::Builder::new(executor);
        server
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(options.client_header_read_timeout)
            // A client that shuts down its write side after the request still
            // gets the answer.
            .half_close(true)
            // hyper requires at least 8 KiB.
            .max_buf_size(options.max_request_header_bytes.max(8192));
        server
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(
                u32::try_from(options.max_request_header_bytes).unwrap_or(u32::MAX),
            );
        let first = Arc::clone(&*snapshots.borrow());
        Arc::new(Self {
            routes: RwLock::new(Arc::new(CompiledRoutes::compile(first))),
            snapshots,
            compile: Mutex::new(()),
            cooldowns: Cooldowns::new(options.cooldown),
            options,
            client,
            server,
            background,
            counters: Counters::default(),
        })
    }

    /// Serves plain HTTP (HTTP/1.1, and HTTP/2 with prior knowledge) on
    /// `listener` until `shutdown`; then stops accepting and lets open
    /// connections finish for [`ProxyOptions::shutdown_grace`].
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        self.accept_loop(listener, None, shutdown).await;
    }

    /// Serves HTTPS on `listener`: TLS with the certificate chosen by SNI
    /// (ALPN `h2` and `http/1.1`), then the same proxy as [`Self::serve`].
    pub async fn serve_tls(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Arc<TlsTerminator>,
        shutdown: CancellationToken,
    ) {
        self.accept_loop(listener, Some(tls), shutdown).await;
    }

    /// Counters, upstreams in cooldown and the commits served.
    pub fn stats(&self) -> ProxyStats {
        let routes = self.routes();
        ProxyStats {
            requests: self.counters.requests.load(Ordering::Relaxed),
            responses_4xx: self.counters.responses_4xx.load(Ordering::Relaxed),
            responses_5xx: self.counters.responses_5xx.load(Ordering::Relaxed),
            upstream_connect_failures: self
                .counters
                .upstream_connect_failures
                .load(Ordering::Relaxed),
            upgrades: self.counters.upgrades.load(Ordering::Relaxed),
            upstreams_in_cooldown: self.cooldowns.cooling(),
            commits: routes
                .snapshot
                .table
                .commits()
                .map(|(namespace, seq)| (namespace.to_owned(), seq))
                .collect(),
        }
    }

    /// The compiled table of the receiver's current snapshot.
    fn routes(&self) -> Arc<CompiledRoutes> {
        let current = Arc::clone(&self.routes.read().unwrap_or_else(PoisonError::into_inner));
        if Arc::ptr_eq(&current.snapshot, &*self.snapshots.borrow()) {
            return current;
        }
        let _compiling = self.compile.lock().unwrap_or_else(PoisonError::into_inner);
        // Read the snapshot again under the lock: a caller that saw an older
        // one must not install it over a newer table.
        let latest = Arc::clone(&*self.snapshots.borrow());
        let current = Arc::clone(&self.routes.read().unwrap_or_else(PoisonError::into_inner));
        if Arc::ptr_eq(&current.snapshot, &latest) {
            return current;
        }
        let compiled = Arc::new(CompiledRoutes::compile(latest));
        *self.routes.write().unwrap_or_else(PoisonError::into_inner) = Arc::clone(&compiled);
        debug!(commits = ?compiled.snapshot.table.commits().collect::<Vec<_>>(), "serving a new routing table");
        compiled
    }

    async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Option<Arc<TlsTerminator>>,
        shutdown: CancellationToken,
    ) {
        let mut connections = JoinSet::new();
        // Cancelled when the grace ends: cuts upgraded tunnels too.
        let hard_stop = CancellationToken::new();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        // Nagle only delays proxied responses; failing to turn it off is harmless.
                        let _ = stream.set_nodelay(true);
                        let proxy = Arc::clone(&self);
                        let shutdown = shutdown.clone();
                        let hard_stop = hard_stop.clone();
                        match &tls {
                            None => {
                                connections.spawn(async move {
                                    proxy.serve_connection(stream, peer, Scheme::Http, shutdown, hard_stop).await;
                                });
                            }
                            Some(tls) => {
                                let tls = Arc::clone(tls);
                                connections.spawn(async move {
                                    proxy.serve_tls_connection(stream, peer, &tls, shutdown, hard_stop).await;
                                });
                            }
                        }
                    }
                    Err(error) if is_per_connection(&error) => {
                        debug!(%error, "accept failed for one connection");
                    }
                    Err(error) => {
                        warn!(%error, "accept failed; backing off");
                        tokio::select! {
                            () = shutdown.cancelled() => break,
                            () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                        }
                    }
                },
            }
        }
        drop(listener);
        let drained = async { while connections.join_next().await.is_some() {} };
        if tokio::time::timeout(self.options.shutdown_grace, drained)
            .await
            .is_err()
        {
            debug!(
                open = connections.len(),
                "shutdown grace over; closing connections"
            );
            hard_stop.cancel();
            connections.abort_all();
            while connections.join_next().await.is_some() {}
        }
        hard_stop.cancel();
    }

    async fn serve_tls_connection(
        self: Arc<Self>,
        stream: tokio::net::TcpStream,
        peer: SocketAddr,
        tls: &TlsTerminator,
        shutdown: CancellationToken,
        hard_stop: CancellationToken,
    ) {
        let handshake = tokio::time::timeout(
            self.options.client_header_read_timeout,
            tls.acceptor().accept(stream),
        );
        let stream = tokio::select! {
            () = shutdown.cancelled() => return,
            result = handshake => match result {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => {
                    debug!(%peer, %error, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "TLS handshake timed out");
                    return;
                }
            },
        };
        self.serve_connection(stream, peer, Scheme::Https, shutdown, hard_stop)
            .await;
    }

    /// Serves one client connection until it closes, or gracefully after
    /// `shutdown`. Upgraded tunnels it started are joined before it returns.
    pub(crate) async fn serve_connection<I>(
        self: Arc<Self>,
        io: I,
        peer: SocketAddr,
        scheme: Scheme,
        shutdown: CancellationToken,
        hard_stop: CancellationToken,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let tunnels = TaskTracker::new();
        let service = {
            let proxy = Arc::clone(&self);
            let tunnels = tunnels.clone();
            service_fn(move |request| {
                let proxy = Arc::clone(&proxy);
                let tunnels = tunnels.clone();
                let hard_stop = hard_stop.clone();
                async move {
                    let context = RequestContext {
                        peer,
                        scheme,
                        tunnels: &tunnels,
                        hard_stop: &hard_stop,
                    };
                    Ok::<_, Infallible>(proxy.handle(request, context).await)
                }
            })
        };
        let connection = self
            .server
            .serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(connection);
        let result = tokio::select! {
            result = connection.as_mut() => result,
            () = shutdown.cancelled() => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        if let Err(error) = result {
            debug!(%peer, error = %error_chain(&*error), "client connection ended with an error");
        }
        tunnels.close();
        tunnels.wait().await;
    }

    async fn handle(
        &self,
        request: Request<Incoming>,
        context: RequestContext<'_>,
    ) -> Response<ProxyBody> {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let response = self.forward(request, context).await;
        if response.status().is_client_error() {
            self.counters.responses_4xx.fetch_add(1, Ordering::Relaxed);
        } else if response.status().is_server_error() {
            self.counters.responses_5xx.fetch_add(1, Ordering::Relaxed);
        }
        response
    }

    async fn forward(
        &self,
        mut request: Request<Incoming>,
        context: RequestContext<'_>,
    ) -> Response<ProxyBody> {
        let authority = match request_authority(&request) {
            Some(authority) => authority,
            None => return plain(StatusCode::BAD_REQUEST, "missing Host header\n".to_owned()),
        };
        let host = normalize_host(&authority);
        let routes = self.routes();
        let Some(backend) = routes.lookup(&host, request.uri().path()) else {
            let shown: String = host.chars().take(255).collect();
            return plain(
                StatusCode::NOT_FOUND,
                format!("no route for host `{shown}`\n"),
            );
        };
        let backend = Arc::clone(backend);
        drop(routes);

        let upgrade = upgrade_protocol(&request);
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut request));
        let (parts, body) = request.into_parts();
        let headers = forwarded_headers(&parts.headers, &authority, upgrade, &context);
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |path| path.as_str())
            .to_owned();
        let body = RetryableBody::new(body);

        let candidates = self.cooldowns.order(backend.rotation());
        if candidates.is_empty() {
            return plain(
                StatusCode::BAD_GATEWAY,
                format!("service `{}` has no upstreams\n", backend.service),
            );
        }
        for upstream in candidates {
            let uri: Uri = match format!("http://{upstream}{path}").parse() {
                Ok(uri) => uri,
                Err(_) => {
                    return plain(
                        StatusCode::BAD_REQUEST,
                        "invalid request target\n".to_owned(),
                    );
                }
            };
            let mut attempt = Request::new(body.clone());
            *attempt.method_mut() = parts.method.clone();
            *attempt.uri_mut() = uri;
            *attempt.version_mut() = Version::HTTP_11;
            *attempt.headers_mut() = headers.clone();
            let sent = tokio::time::timeout(
                self.options.response_header_timeout,
                self.client.request(attempt),
            )
            .await;
            match sent {
                Err(_) => {
                    return plain(
                        StatusCode::GATEWAY_TIMEOUT,
                        format!("service `{}` did not answer in time\n", backend.service),
                    );
                }
                Ok(Ok(response)) => {
                    self.cooldowns.succeeded(upstream);
                    return self.respond(response, client_upgrade, &context);
                }
                Ok(Err(error)) if error.is_connect() => {
                    self.counters
                        .upstream_connect_failures
                        .fetch_add(1, Ordering::Relaxed);
                    self.cooldowns.failed(upstream);
                    debug!(%upstream, namespace = %backend.namespace, service = %backend.service, error = %error_chain(&error), "upstream connect failed");
                    if !body.untouched() {
                        break;
                    }
                }
                Ok(Err(error)) => {
                    debug!(%upstream, service = %backend.service, error = %error_chain(&error), "upstream request failed");
                    return bad_gateway(&backend);
                }
            }
        }
        bad_gateway(&backend)
    }

    fn respond(
        &self,
        mut response: Response<Incoming>,
        client_upgrade: Option<OnUpgrade>,
        context: &RequestContext<'_>,
    ) -> Response<ProxyBody> {
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            let Some(client_upgrade) = client_upgrade else {
                return plain(
                    StatusCode::BAD_GATEWAY,
                    "upstream switched protocols unasked\n".to_owned(),
                );
            };
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            self.counters.upgrades.fetch_add(1, Ordering::Relaxed);
            let stop = context.hard_stop.clone();
            drop(
                context
                    .tunnels
                    .spawn(tunnel(client_upgrade, upstream_upgrade, stop)),
            );
            let upgrade = response.headers().get(header::UPGRADE).cloned();
            strip_hop_by_hop(response.headers_mut());
            if let Some(upgrade) = upgrade {
                response.headers_mut().insert(header::UPGRADE, upgrade);
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            }
        } else {
            strip_hop_by_hop(response.headers_mut());
        }
        response.map(BodyExt::boxed)
    }
}

/// What a request handler needs from its connection.
struct RequestContext<'a> {
    peer: SocketAddr,
    scheme: Scheme,
    tunnels: &'a TaskTracker,
    hard_stop: &'a CancellationToken,
}

/// Copies bytes both ways between an upgraded client and upstream until either
/// side closes or the shutdown grace ends.
async fn tunnel(client: OnUpgrade, upstream: OnUpgrade, stop: CancellationToken) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(error) => {
            debug!(error = %error_chain(&error), "upgrade did not complete");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    tokio::select! {
        () = stop.cancelled() => {}
        result = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
            if let Err(error) = result {
                debug!(%error, "upgraded tunnel ended with an error");
            }
        }
    }
}

/// The authority a request names: the URI's (HTTP/2 `:authority`, HTTP/1
/// absolute form) or else the `Host` header.
fn request_authority<B>(request: &Request<B>) -> Option<String> {
    if let Some(authority) = request.uri().authority() {
        return Some(authority.as_str().to_owned());
    }
    let host = request.headers().get(header::HOST)?.to_str().ok()?;
    (!host.is_empty()).then(|| host.to_owned())
}

/// The `Upgrade` header of an HTTP/1.1 request that asks for an upgrade.
fn upgrade_protocol<B>(request: &Request<B>) -> Option<HeaderValue> {
    if request.version() != Version::HTTP_11 || request.method() == Method::CONNECT {
        return None;
    }
    let asks = request
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    if asks {
        request.headers().get(header::UPGRADE).cloned()
    } else {
        None
    }
}

/// The headers sent upstream: hop-by-hop ones removed, `Host` and the
/// `X-Forwarded-*` set, and the upgrade asked for kept.
fn forwarded_headers(
    original: &HeaderMap,
    authority: &str,
    upgrade: Option<HeaderValue>,
    context: &RequestContext<'_>,
) -> HeaderMap {
    let mut headers = original.clone();
    strip_hop_by_hop(&mut headers);
    let client_ip = context.peer.ip().to_canonical().to_string();
    let forwarded_for = {
        let earlier: Vec<&str> = original
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .collect();
        if earlier.is_empty() {
            client_ip
        } else {
            format!("{}, {client_ip}", earlier.join(", "))
        }
    };
    if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
        headers.insert(X_FORWARDED_FOR, value);
    }
    headers.insert(
        X_FORWARDED_PROTO,
        HeaderValue::from_static(context.scheme.as_str()),
    );
    if let Ok(value) = HeaderValue::from_str(authority) {
        headers.insert(X_FORWARDED_HOST, value.clone());
        headers.insert(header::HOST, value);
    }
    headers.append(header::VIA, HeaderValue::from_static("1.1 ployz-gateway"));
    if let Some(upgrade) = upgrade {
        headers.insert(header::UPGRADE, upgrade);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    headers
}

/// Removes hop-by-hop headers, including those `Connection` names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

fn plain(status: StatusCode, message: String) -> Response<ProxyBody> {
    let mut response = Response::new(text(message));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn bad_gateway(backend: &Backend) -> Response<ProxyBody> {
    plain(
        StatusCode::BAD_GATEWAY,
        format!(
            "no upstream of service `{}` could be reached\n",
            backend.service
        ),
    )
}

/// Accept errors that concern one connection only (it was reset before it
/// was accepted); anything else, like `EMFILE`, calls for a back-off.
fn is_per_connection(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    ployz_routing::error_chain(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_including_those_connection_names() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("x-kept"));
    }

    #[test]
    fn upgrade_needs_connection_upgrade_on_http11() {
        let request = Request::builder()
            .header(header::CONNECTION, "keep-alive, Upgrade")
            .header(header::UPGRADE, "websocket")
            .body(())
            .expect("request");
        assert_eq!(
            upgrade_protocol(&request),
            Some(HeaderValue::from_static("websocket"))
        );
        let request = Request::builder()
            .header(header::UPGRADE, "websocket")
            .body(())
            .expect("request");
        assert_eq!(upgrade_protocol(&request), None);
    }
}
