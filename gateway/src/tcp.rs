//! Plain TCP routes: one listener per route port, reconciled on every snapshot
//! (new ports bound, removed ones closed, existing listeners kept when only
//! upstreams change so no connection drops), each connection spliced to an
//! upstream picked round robin. It owns byte forwarding only, no protocols.

use std::{
    collections::BTreeMap,
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use ployz_routing::SnapshotReceiver;
use serde::{Deserialize, Serialize};
use tokio::{
    net::{TcpListener, TcpStream},
    task::JoinSet,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

use crate::http::{health::Cooldowns, routes::Backend};

/// Why a TCP route could not be served.
#[derive(Debug, thiserror::Error)]
pub enum TcpError {
    #[error("cannot listen on {address}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Timeouts of TCP forwarding.
#[derive(Clone, Debug)]
pub struct TcpOptions {
    /// How long a connect to an upstream may take before the next is tried.
    pub connect_timeout: Duration,
    /// How long an upstream whose connect failed is avoided.
    pub cooldown: Duration,
    /// How long open connections may run after shutdown before they are cut.
    pub shutdown_grace: Duration,
    /// How often ports that failed to bind are tried again.
    pub bind_retry: Duration,
}

impl Default for TcpOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            cooldown: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
            bind_retry: Duration::from_secs(5),
        }
    }
}

/// What the TCP routes serve right now, for the admin socket.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpStatus {
    pub listening: Vec<TcpListening>,
    pub bind_errors: Vec<TcpBindError>,
    pub connections: u64,
    pub upstream_connect_failures: u64,
    pub upstreams_in_cooldown: Vec<SocketAddr>,
}

/// A bound route port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpListening {
    pub address: SocketAddr,
    pub namespace: String,
    pub service: String,
    pub upstreams: Vec<SocketAddr>,
}

/// A route port that could not be bound (retried periodically).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpBindError {
    pub port: u16,
    pub namespace: String,
    pub service: String,
    pub error: String,
}

/// The TCP routes of the served table.
pub struct TcpRoutes {
    snapshots: SnapshotReceiver,
    listen_ip: IpAddr,
    options: TcpOptions,
    cooldowns: Cooldowns,
    connections: AtomicU64,
    connect_failures: AtomicU64,
    status: Mutex<(Vec<TcpListening>, Vec<TcpBindError>)>,
}

impl std::fmt::Debug for TcpRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpRoutes")
            .field("listen_ip", &self.listen_ip)
            .finish_non_exhaustive()
    }
}

/// A bound port: its accept task's stop token and the route it serves, which
/// is swapped in place when only the upstreams change.
struct PortListener {
    address: SocketAddr,
    route: Arc<RwLock<Arc<Backend>>>,
    stop: CancellationToken,
}

impl TcpRoutes {
    /// TCP routes listening on `listen_ip`, following `snapshots`.
    pub fn new(snapshots: SnapshotReceiver, listen_ip: IpAddr, options: TcpOptions) -> Arc<Self> {
        Arc::new(Self {
            snapshots,
            listen_ip,
            cooldowns: Cooldowns::new(options.cooldown),
            options,
            connections: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            status: Mutex::new((Vec::new(), Vec::new())),
        })
    }

    /// Ports bound, ports that failed to bind, and counters.
    pub fn status(&self) -> TcpStatus {
        let (listening, bind_errors) = self
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        TcpStatus {
            listening,
            bind_errors,
            connections: self.connections.load(Ordering::Relaxed),
            upstream_connect_failures: self.connect_failures.load(Ordering::Relaxed),
            upstreams_in_cooldown: self.cooldowns.cooling(),
        }
    }

    /// Serves the TCP routes of every snapshot until `shutdown`; then closes
    /// the listeners and lets open connections run for the grace period.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut snapshots = self.snapshots.clone();
        let mut following = true;
        let mut listeners: BTreeMap<u16, PortListener> = BTreeMap::new();
        let mut accept_tasks = JoinSet::new();
        let connections = TaskTracker::new();
        let hard_stop = CancellationToken::new();
        loop {
            let snapshot = Arc::clone(&*snapshots.borrow_and_update());
            let failed = self.reconcile(
                &snapshot,
                &mut listeners,
                &mut accept_tasks,
                &connections,
                &hard_stop,
            );
            tokio::select! {
                () = shutdown.cancelled() => break,
                changed = snapshots.changed(), if following => {
                    // Without a sender the last table stays served.
                    following = changed.is_ok();
                }
                () = tokio::time::sleep(self.options.bind_retry), if failed => {}
            }
        }
        for listener in listeners.values() {
            listener.stop.cancel();
        }
        while accept_tasks.join_next().await.is_some() {}
        connections.close();
        if tokio::time::timeout(self.options.shutdown_grace, connections.wait())
            .await
            .is_err()
        {
            hard_stop.cancel();
            connections.wait().await;
        }
        hard_stop.cancel();
    }

    /// Makes the listeners match the snapshot's TCP routes. Returns whether a
    /// port failed to bind, so the caller tries again later.
    fn reconcile(
        self: &Arc<Self>,
        snapshot: &ployz_routing::Snapshot,
        listeners: &mut BTreeMap<u16, PortListener>,
        accept_tasks: &mut JoinSet<()>,
        connections: &TaskTracker,
        hard_stop: &CancellationToken,
    ) -> bool {
        let mut desired: BTreeMap<u16, Arc<Backend>> = BTreeMap::new();
        for (namespace, route) in snapshot.table.tcp_routes() {
            if let Some(owner) = desired.get(&route.listen_port) {
                warn!(
                    port = route.listen_port,
                    namespace,
                    service = %route.service,
                    owner = %owner.namespace,
                    "TCP port claimed by an earlier namespace; ignoring this route"
                );
                continue;
            }
            desired.insert(
                route.listen_port,
                Arc::new(Backend::new(
                    namespace,
                    &route.service,
                    route.upstreams.clone(),
                )),
            );
        }
        listeners.retain(|port, listener| {
            let keep = desired.contains_key(port);
            if !keep {
                info!(port, "TCP route removed; closing its listener");
                listener.stop.cancel();
            }
            keep
        });
        let mut bind_errors = Vec::new();
        for (port, backend) in desired {
            if let Some(listener) = listeners.get(&port) {
                let mut route = listener
                    .route
                    .write()
                    .unwrap_or_else(PoisonError::into_inner);
                if route.namespace != backend.namespace
                    || route.service != backend.service
                    || route.upstreams != backend.upstreams
                {
                    *route = backend;
                }
                continue;
            }
            match self.bind(port) {
                Ok(listener) => {
                    let address = listener
                        .local_addr()
                        .unwrap_or(SocketAddr::new(self.listen_ip, port));
                    info!(%address, namespace = %backend.namespace, service = %backend.service, "TCP route listening");
                    let route = Arc::new(RwLock::new(backend));
                    let stop = CancellationToken::new();
                    accept_tasks.spawn(Arc::clone(self).accept(
                        listener,
                        Arc::clone(&route),
                        stop.clone(),
                        connections.clone(),
                        hard_stop.clone(),
                    ));
                    listeners.insert(
                        port,
                        PortListener {
                            address,
                            route,
                            stop,
                        },
                    );
                }
                Err(error) => {
                    warn!(error = %ployz_routing::error_chain(&error), namespace = %backend.namespace, service = %backend.service, "cannot bind a TCP route's port");
                    bind_errors.push(TcpBindError {
                        port,
                        namespace: backend.namespace.clone(),
                        service: backend.service.clone(),
                        error: ployz_routing::error_chain(&error),
                    });
                }
            }
        }
        let listening = listeners
            .values()
            .map(|listener| {
                let route = listener
                    .route
                    .read()
                    .unwrap_or_else(PoisonError::into_inner);
                TcpListening {
                    address: listener.address,
                    namespace: route.namespace.clone(),
                    service: route.service.clone(),
                    upstreams: route.upstreams.clone(),
                }
            })
            .collect();
        let failed = !bind_errors.is_empty();
        *self.status.lock().unwrap_or_else(PoisonError::into_inner) = (listening, bind_errors);
        failed
    }

    fn bind(&self, port: u16) -> Result<TcpListener, TcpError> {
        let address = SocketAddr::new(self.listen_ip, port);
        let bind = || -> io::Result<TcpListener> {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(address),
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )?;
            socket.set_reuse_address(true)?;
            socket.set_nonblocking(true)?;
            socket.bind(&address.into())?;
            socket.listen(1024)?;
            TcpListener::from_std(socket.into())
        };
        bind().map_err(|source| TcpError::Bind { address, source })
    }

    async fn accept(
        self: Arc<Self>,
        listener: TcpListener,
        route: Arc<RwLock<Arc<Backend>>>,
        stop: CancellationToken,
        connections: TaskTracker,
        hard_stop: CancellationToken,
    ) {
        loop {
            let accepted = tokio::select! {
                () = stop.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((client, peer)) => {
                    let backend = Arc::clone(&route.read().unwrap_or_else(PoisonError::into_inner));
                    self.connections.fetch_add(1, Ordering::Relaxed);
                    drop(connections.spawn(Arc::clone(&self).forward(
                        client,
                        peer,
                        backend,
                        hard_stop.clone(),
                    )));
                }
                Err(error) => {
                    warn!(%error, "TCP accept failed; backing off");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
            }
        }
    }

    async fn forward(
        self: Arc<Self>,
        mut client: TcpStream,
        peer: SocketAddr,
        backend: Arc<Backend>,
        hard_stop: CancellationToken,
    ) {
        for upstream in self.cooldowns.order(backend.rotation()) {
            let connect =
                tokio::time::timeout(self.options.connect_timeout, TcpStream::connect(upstream));
            let mut upstream_stream = tokio::select! {
                () = hard_stop.cancelled() => return,
                connected = connect => match connected {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        debug!(%upstream, %error, service = %backend.service, "TCP upstream connect failed");
                        self.connect_failures.fetch_add(1, Ordering::Relaxed);
                        self.cooldowns.failed(upstream);
                        continue;
                    }
                    Err(_) => {
                        debug!(%upstream, service = %backend.service, "TCP upstream connect timed out");
                        self.connect_failures.fetch_add(1, Ordering::Relaxed);
                        self.cooldowns.failed(upstream);
                        continue;
                    }
                },
            };
            self.cooldowns.succeeded(upstream);
            // Nagle only adds latency to spliced bytes; failing to disable it is harmless.
            let _ = upstream_stream.set_nodelay(true);
            let _ = client.set_nodelay(true);
            tokio::select! {
                () = hard_stop.cancelled() => {}
                result = tokio::io::copy_bidirectional(&mut client, &mut upstream_stream) => {
                    if let Err(error) = result {
                        debug!(%peer, %upstream, %error, "TCP connection ended with an error");
                    }
                }
            }
            return;
        }
        debug!(%peer, service = %backend.service, "no TCP upstream could be reached; closing the client");
    }
}
