//! daemon: the composition root. It is the only module that names concrete
//! backends (`NatsStore`, `NatsSidecar`), binds the gRPC socket, adopts what
//! already runs on start, and dispatches requests to the domains. It owns every
//! task it spawns and joins them on shutdown; it never stops the data plane on
//! its own exit.

pub mod api;
pub mod backends;
pub mod config;
mod deploy;
mod join;
mod mesh;
mod operations;
mod peer;
pub(crate) mod routing;
mod server;

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::{Mutex, RwLock};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use self::backends::Volumes;
pub use self::{
    config::{ConfigError, DaemonArgs, DaemonConfig},
    server::{ServerError, run},
};
pub use crate::error_chain;
use crate::{
    coordination::Journal,
    machine::{IdentityError, LocalIdentity, identity::NatsPassword},
    runtime::{ContainerRuntime, ContainerState, docker::DockerRuntime, labels},
    services::{
        SidecarError,
        nats::{
            NatsClusterConfig, NatsHubConfig, NatsLeafConfig, NatsLeafnodes, NatsRoutePeer,
            NatsRouteTls, NatsSidecar, NatsSidecarConfig, NatsUser, RouteCertificate,
        },
        routing::{RoutingSidecar, RoutingSidecarConfig, find_routing_binary},
    },
    storage::VolumeBackend,
    store::{
        StoreError,
        nats::{NatsCredentials, NatsStore, NatsStoreConfig},
    },
};

/// The daemon version reported by `status`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// How long startup and `mesh init` wait for the store to accept connections.
const STORE_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// The running daemon: configuration, identity, and the cluster it serves.
pub struct Daemon {
    config: DaemonConfig,
    /// Names this daemon process in leases and operation records.
    runner: String,
    hostname: String,
    started_at: SystemTime,
    started: Instant,
    cluster: RwLock<ClusterState>,
    /// Serializes operations that change the local identity.
    identity_lock: Mutex<()>,
    /// Serializes bringing up the overlay and NATS.
    sidecars_lock: Mutex<()>,
    /// Serializes finishing a store move, so an export is imported once.
    store_move_lock: Mutex<()>,
    /// The overlay, once up; it is brought up once per daemon.
    mesh_runtime: Mutex<Option<Arc<mesh::MeshRuntime>>>,
    /// The NATS sidecar as last ensured, with its supervisor running.
    nats_sidecar: Mutex<Option<Arc<NatsSidecar>>>,
    /// The gateway and DNS, started once per daemon.
    routing: Mutex<RoutingSidecars>,
    /// This daemon, for tasks that outlive a request.
    me: std::sync::OnceLock<std::sync::Weak<Daemon>>,
    /// This machine's volumes, or why they could not be opened.
    volumes: Result<Volumes, String>,
    /// The container engine, connected on first use (it may start after the daemon).
    containers: Mutex<Option<DockerRuntime>>,
    /// Where the peer API listens, or why it does not; set once the overlay is up.
    peer_api: std::sync::OnceLock<Result<SocketAddr, String>>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

/// What this machine's membership looks like to the daemon right now.
enum ClusterState {
    /// No identity: `mesh init` has not run here.
    Uninitialized,
    /// An identity exists but its sidecars or store could not be brought up.
    Degraded {
        identity: Box<LocalIdentity>,
        reason: String,
    },
    Ready(Arc<ClusterRuntime>),
}

/// The live parts of a member machine: its NATS sidecar, its store, and the
/// gateway and DNS sidecars (or why each could not start).
struct ClusterRuntime {
    identity: LocalIdentity,
    mesh: Arc<mesh::MeshRuntime>,
    nats: Arc<NatsSidecar>,
    store: NatsStore,
    journal: Journal<NatsStore>,
    routing: RoutingSidecars,
    /// Stops this runtime's membership follower when the runtime is replaced.
    follower: CancellationToken,
}

type RoutingSidecars = Vec<(routing::Component, Result<Arc<RoutingSidecar>, String>)>;

/// The processes a member machine runs, up before its store answers.
#[derive(Clone)]
struct Sidecars {
    identity: LocalIdentity,
    mesh: Arc<mesh::MeshRuntime>,
    nats: Arc<NatsSidecar>,
}

impl Daemon {
    /// Loads the identity and, on a member machine, adopts or starts NATS and
    /// connects the store. A failure there leaves the daemon up but degraded,
    /// so an operator can still ask it what is wrong.
    pub async fn start(
        config: DaemonConfig,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, StartError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::DataDir {
            path: config.data_dir.display().to_string(),
            source,
        })?;
        let identity = LocalIdentity::load(&config.data_dir)?;
        let hostname = hostname();
        let volumes = Volumes::open(&config.storage, &config.data_dir)
            .await
            .map_err(|error| error_chain(&error));
        match &volumes {
            Ok(volumes) => {
                tracing::info!(backend = volumes.kind(), path = %config.storage.path.display(), "volumes ready")
            }
            Err(reason) => {
                tracing::error!(%reason, "volumes unavailable; deploys with volumes will fail their preconditions")
            }
        }
        let daemon = Arc::new(Self {
            runner: format!("ployzd/{hostname}/{}", std::process::id()),
            hostname,
            config,
            started_at: SystemTime::now(),
            started: Instant::now(),
            cluster: RwLock::new(ClusterState::Uninitialized),
            identity_lock: Mutex::new(()),
            sidecars_lock: Mutex::new(()),
            store_move_lock: Mutex::new(()),
            mesh_runtime: Mutex::new(None),
            nats_sidecar: Mutex::new(None),
            routing: Mutex::new(Vec::new()),
            me: std::sync::OnceLock::new(),
            volumes,
            containers: Mutex::new(None),
            peer_api: std::sync::OnceLock::new(),
            tasks: TaskTracker::new(),
            shutdown,
        });
        let _ = daemon.me.set(Arc::downgrade(&daemon));
        if let Some(identity) = identity {
            tracing::info!(machine = %identity.machine_id, network = %identity.network, "member machine: bringing up NATS and the store");
            if let Err(error) = daemon.bring_up(&identity).await {
                tracing::error!(
                    error = &error as &dyn std::error::Error,
                    "cluster runtime unavailable; the daemon stays up degraded"
                );
            }
        } else {
            tracing::info!("no machine identity yet: run `ployzctl mesh init <network>`");
        }
        daemon.adopt_workloads().await;
        Ok(daemon)
    }

    /// Looks at the workload containers already running and leaves them be: a
    /// daemon restart never stops or recreates a workload.
    async fn adopt_workloads(&self) {
        let Ok(containers) = self.containers().await else {
            tracing::info!("no container engine reachable yet; workloads are not inspected");
            return;
        };
        let filter =
            std::collections::BTreeMap::from([(labels::MANAGED.to_owned(), "true".to_owned())]);
        match containers.list(&filter).await {
            Ok(found) => {
                let running = found
                    .iter()
                    .filter(|c| c.state == ContainerState::Running)
                    .count();
                tracing::info!(
                    containers = found.len(),
                    running,
                    "adopted workload containers as they are"
                );
            }
            Err(error) => {
                tracing::warn!(error = %error_chain(&error), "cannot list workload containers")
            }
        }
    }

    /// The container engine, connecting on first use. Once the overlay is
    /// up, containers join the overlay network (created here when absent),
    /// addressed from this machine's subnet.
    async fn containers(&self) -> Result<DockerRuntime, ployz_api::ApiError> {
        let network = self.container_network().await;
        let mut cached = self.containers.lock().await;
        if let Some(runtime) = &*cached
            && runtime.network() == network.as_ref()
        {
            return Ok(runtime.clone());
        }
        let unavailable = |what: &str, error: &crate::runtime::RuntimeError| {
            ployz_api::ApiError::new(
                ployz_api::ErrorClass::Unavailable,
                "runtime_unavailable",
                format!("{what}: {}", error_chain(error)),
            )
        };
        let mut runtime = DockerRuntime::connect_with_socket(&self.config.docker_socket)
            .await
            .map_err(|error| unavailable("the Docker engine does not answer", &error))?;
        if let Some(network) = network {
            runtime = runtime.on_network(network.clone());
            runtime
                .ensure_network()
                .await
                .map_err(|error| unavailable("the container network is not usable", &error))?;
            // The overlay delivers containers' packets to this machine; the
            // kernel must forward them to the network's bridge and back.
            if let Err(error) = enable_ipv6_forwarding() {
                tracing::warn!(%error, "cannot enable IPv6 forwarding; other machines will not reach this machine's containers");
            }
            tracing::info!(network = %network.name, subnet = %network.subnet, "containers join the overlay network");
        }
        *cached = Some(runtime.clone());
        Ok(runtime)
    }

    /// Serves the peer API on the overlay address, for the daemon's life. A
    /// failure to bind is logged: this machine then cannot be placed on,
    /// and deploys that try say so.
    async fn serve_peers(&self, mesh: &mesh::MeshRuntime) {
        let Some(me) = self.me.get().cloned() else {
            return;
        };
        let address = SocketAddr::new(
            std::net::IpAddr::V6(mesh.overlay_address()),
            self.config.mesh.api_port,
        );
        let engine = Arc::new(PeerEngine { daemon: me });
        match peer::serve(engine, address, self.shutdown.clone()).await {
            Ok(serving) => {
                let _ = self.peer_api.set(Ok(address));
                tracing::info!(%address, "peer API listening on the overlay");
                self.tasks.spawn(async move {
                    if let Err(error) = serving.await {
                        tracing::error!(error = %error_chain(&error), "peer API stopped");
                    }
                });
            }
            Err(error) => {
                let _ = self
                    .peer_api
                    .set(Err(format!("cannot listen on {address}: {error}")));
                tracing::error!(%address, %error, "cannot serve the peer API; other machines cannot place containers here");
            }
        }
    }

    /// The overlay network containers join, once this machine has a subnet.
    async fn container_network(&self) -> Option<crate::runtime::docker::OverlayNetwork> {
        let name = self.config.mesh.container_network.clone()?;
        let mesh = self.mesh_runtime.lock().await.clone()?;
        let range = mesh.subnet().containers();
        Some(crate::runtime::docker::OverlayNetwork {
            name,
            subnet: range.to_string(),
            gateway: range.gateway(),
        })
    }

    pub fn config(&self) -> &DaemonConfig {
        &self.config
    }

    /// Cancels request handling and background tasks.
    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Waits for every task the daemon spawned, at most `grace`.
    pub async fn join(&self, grace: Duration) {
        self.tasks.close();
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                ?grace,
                "background tasks did not stop within the grace period"
            );
        }
    }

    /// Brings up the overlay and NATS for `identity`, connects the store and
    /// keeps the result as the cluster runtime. Idempotent. When the store
    /// does not answer in time (its cluster has no quorum yet: a machine
    /// joining, or the first of several machines to come back), the daemon
    /// stays degraded and keeps connecting in the background.
    async fn bring_up(
        &self,
        identity: &LocalIdentity,
    ) -> Result<Arc<ClusterRuntime>, BringUpError> {
        self.bring_up_within(identity, STORE_CONNECT_TIMEOUT).await
    }

    async fn bring_up_within(
        &self,
        identity: &LocalIdentity,
        store_timeout: Duration,
    ) -> Result<Arc<ClusterRuntime>, BringUpError> {
        if let ClusterState::Ready(runtime) = &*self.cluster.read().await {
            return Ok(runtime.clone());
        }
        let sidecars = match self.bring_up_sidecars(identity).await {
            Ok(sidecars) => sidecars,
            Err(error) => {
                *self.cluster.write().await = ClusterState::Degraded {
                    identity: Box::new(identity.clone()),
                    reason: error_chain(&error),
                };
                return Err(error);
            }
        };
        match self.connect_store(&sidecars, store_timeout).await {
            Ok(runtime) => Ok(runtime),
            Err(error) => {
                *self.cluster.write().await = ClusterState::Degraded {
                    identity: Box::new(sidecars.identity.clone()),
                    reason: format!(
                        "waiting for the store (its cluster may not have a quorum yet): {}",
                        error_chain(&error)
                    ),
                };
                self.keep_connecting(sidecars);
                Err(error)
            }
        }
    }

    /// The overlay, then NATS (its cluster port binds the overlay address).
    async fn bring_up_sidecars(&self, identity: &LocalIdentity) -> Result<Sidecars, BringUpError> {
        let _guard = self.sidecars_lock.lock().await;
        let identity = self.with_mesh_identity(identity)?;
        let mesh_identity = identity
            .mesh
            .clone()
            .expect("with_mesh_identity gives every identity its mesh facts");
        let existing = self.mesh_runtime.lock().await.clone();
        let mesh = match existing {
            Some(mesh) => mesh,
            None => {
                let mesh = self.bring_up_mesh(&mesh_identity).await?;
                *self.mesh_runtime.lock().await = Some(mesh.clone());
                self.serve_peers(&mesh).await;
                mesh
            }
        };
        let nats_config = self.nats_config(&identity, &mesh)?;
        let mut current = self.nats_sidecar.lock().await;
        let nats = match &*current {
            Some(nats) if same_process(nats.config(), &nats_config) => nats.clone(),
            _ => {
                let nats = Arc::new(NatsSidecar::ensure(nats_config).await?);
                // Until the store answers, a core server admits the leaf
                // machines this machine last knew of.
                if let Some(hub) = NatsMembers::for_sidecar(&identity, &nats) {
                    hub.apply(&mesh::read_peer_cache(&self.peer_cache_path()));
                }
                tracing::info!(status = ?nats.status(), "NATS sidecar ready");
                let supervised = nats.clone();
                let shutdown = self.shutdown.clone();
                self.tasks
                    .spawn(async move { supervised.supervise(shutdown).await });
                *current = Some(nats.clone());
                nats
            }
        };
        Ok(Sidecars {
            identity,
            mesh,
            nats,
        })
    }

    /// What NATS must look like for `identity`. A core machine runs
    /// JetStream, standalone until the machine has routes to others, then
    /// clustered over the overlay, and accepts the leaf servers of the
    /// machines beyond the core on its overlay address; a leaf machine runs a
    /// leaf server connected to the core servers.
    fn nats_config(
        &self,
        identity: &LocalIdentity,
        mesh: &mesh::MeshRuntime,
    ) -> Result<NatsSidecarConfig, BringUpError> {
        let mut nats_config = NatsSidecarConfig::new(
            crate::services::nats::find_binary(self.config.nats.binary.as_deref())?,
            self.config.data_dir.join("nats"),
            identity.machine_id.clone(),
        );
        nats_config.listen = SocketAddr::new(self.config.nats.host, self.config.nats.port);
        nats_config.monitor_port = self.config.nats.monitor_port;
        let Some(mesh_identity) = identity.mesh.as_ref() else {
            return Ok(nats_config);
        };
        if let Some(leaf) = &mesh_identity.leaf {
            nats_config.leafnodes = Some(NatsLeafnodes::Leaf(NatsLeafConfig {
                hubs: leaf.hubs.clone(),
                user: NatsUser::new(identity.machine_id.clone(), leaf.password.clone()),
            }));
            return Ok(nats_config);
        }
        let overlay = std::net::IpAddr::V6(mesh.overlay_address());
        if !mesh_identity.routes.is_empty() {
            // Each core server routes with its own certificate, and trusts
            // and pins the other core machines' (from their records, cached
            // for a start before the store answers).
            let tls = self
                .route_certificate(identity, mesh)?
                .map(|own| NatsRouteTls {
                    certificate_file: self.config.data_dir.join(ROUTE_CERTIFICATE_FILE),
                    key_file: self.config.data_dir.join(ROUTE_KEY_FILE),
                    peers: route_peers(
                        Some(NatsRoutePeer {
                            name: identity.machine_id.clone(),
                            certificate_pem: own.certificate_pem,
                            pin: own.pin,
                        }),
                        &mesh::read_peer_cache(&self.peer_cache_path()),
                    ),
                });
            nats_config.cluster = Some(NatsClusterConfig {
                name: identity.cluster_id.clone(),
                listen: SocketAddr::new(overlay, self.config.nats.cluster_port),
                routes: mesh_identity.routes.clone(),
                authorization: mesh_identity
                    .route_secret
                    .clone()
                    .map(|secret| NatsUser::new(ROUTE_USER, secret)),
                tls,
            });
        }
        // Users need the route secret, which networks founded before routes
        // were authenticated lack: those run without users and take no leaves.
        let local = mesh_identity.nats_password(NatsPassword::Local, &identity.machine_id);
        let system = mesh_identity.nats_password(NatsPassword::System, &identity.machine_id);
        if let (Some(local), Some(system)) = (local, system) {
            nats_config.jetstream_domain = Some(JETSTREAM_DOMAIN.to_owned());
            nats_config.leafnodes = Some(NatsLeafnodes::Hub(NatsHubConfig {
                listen: SocketAddr::new(overlay, self.config.nats.leaf_port),
                local_user: NatsUser::new(LOCAL_USER, local),
                system_user: NatsUser::new(SYSTEM_USER, system),
            }));
        }
        Ok(nats_config)
    }

    /// A core machine's route certificate, made on first use for its
    /// overlay address; `None` on leaf machines and in networks without a
    /// route secret (founded before routes were authenticated).
    fn route_certificate(
        &self,
        identity: &LocalIdentity,
        mesh: &mesh::MeshRuntime,
    ) -> Result<Option<RouteCertificate>, BringUpError> {
        let Some(mesh_identity) = identity.mesh.as_ref() else {
            return Ok(None);
        };
        if mesh_identity.leaf.is_some() || mesh_identity.route_secret.is_none() {
            return Ok(None);
        }
        Ok(Some(RouteCertificate::load_or_generate(
            &self.config.data_dir.join(ROUTE_CERTIFICATE_FILE),
            &self.config.data_dir.join(ROUTE_KEY_FILE),
            &identity.machine_id,
            std::net::IpAddr::V6(mesh.overlay_address()),
        )?))
    }

    /// Records this core machine's route certificate in its membership
    /// record, where the other core machines read it, unless it is there
    /// already. A failure is logged: the next start tries again.
    async fn publish_route_certificate(
        &self,
        store: &NatsStore,
        identity: &LocalIdentity,
        mesh: &mesh::MeshRuntime,
    ) {
        let certificate = match self.route_certificate(identity, mesh) {
            Ok(Some(certificate)) => certificate,
            Ok(None) => return,
            Err(error) => {
                tracing::warn!(error = %error_chain(&error), "no route certificate");
                return;
            }
        };
        let record = crate::machine::records::RouteCertificateRecord {
            pem: certificate.certificate_pem,
            pin: certificate.pin,
        };
        if let Err(error) = record_route_certificate(store, &identity.machine_id, &record).await {
            tracing::warn!(error = %error_chain(&error), "cannot record this machine's route certificate");
        }
    }

    /// Connects the store through `sidecars` and makes the runtime ready.
    async fn connect_store(
        &self,
        sidecars: &Sidecars,
        timeout: Duration,
    ) -> Result<Arc<ClusterRuntime>, BringUpError> {
        let client = NatsClient::of(&sidecars.nats);
        let mut store_config = NatsStoreConfig::new(client.url.clone());
        store_config.startup_timeout = timeout;
        store_config.credentials = client.credentials.clone();
        store_config.jetstream_domain = client.jetstream_domain.clone();
        let store = NatsStore::connect(store_config).await?;
        self.finish_store_move(&store).await?;
        self.publish_route_certificate(&store, &sidecars.identity, &sidecars.mesh)
            .await;
        let mut state = self.cluster.write().await;
        if let ClusterState::Ready(runtime) = &*state {
            return Ok(runtime.clone());
        }
        let journal = Journal::new(store.clone(), self.runner.clone())
            .with_lease_ttl(self.config.operation_lease_ttl);
        let follower = self.shutdown.child_token();
        self.follow_membership(
            store.clone(),
            sidecars.mesh.clone(),
            NatsMembers::for_sidecar(&sidecars.identity, &sidecars.nats),
            sidecars.identity.machine_id.clone(),
            follower.clone(),
        );
        let routing = {
            let mut started = self.routing.lock().await;
            if started.is_empty() {
                *started = self.start_routing(&client).await;
            }
            started.clone()
        };
        let runtime = Arc::new(ClusterRuntime {
            identity: sidecars.identity.clone(),
            mesh: sidecars.mesh.clone(),
            nats: sidecars.nats.clone(),
            store,
            journal,
            routing,
            follower,
        });
        *state = ClusterState::Ready(runtime.clone());
        tracing::info!("store connected; the machine is ready");
        Ok(runtime)
    }

    /// Retries the store until it answers, then makes the runtime ready.
    fn keep_connecting(&self, sidecars: Sidecars) {
        let Some(daemon) = self.me.get().and_then(std::sync::Weak::upgrade) else {
            return;
        };
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                if matches!(&*daemon.cluster.read().await, ClusterState::Ready(_)) {
                    return;
                }
                match daemon
                    .connect_store(&sidecars, Duration::from_secs(5))
                    .await
                {
                    Ok(_) => return,
                    Err(error) => {
                        tracing::debug!(error = %error_chain(&error), "store not ready yet")
                    }
                }
            }
        });
    }

    /// `identity`, given its overlay facts if it was written before the mesh
    /// existed (such a network has one machine: it takes a fresh prefix and
    /// its preferred subnet) and saved.
    fn with_mesh_identity(&self, identity: &LocalIdentity) -> Result<LocalIdentity, BringUpError> {
        if identity.mesh.is_some() {
            return Ok(identity.clone());
        }
        let mut upgraded = identity.clone();
        upgraded.mesh = Some(crate::machine::identity::MeshIdentity {
            prefix: crate::mesh::addressing::OverlayPrefix::generate(),
            subnet: crate::mesh::addressing::SubnetIndex::preferred_for(&identity.machine_id),
            routes: Vec::new(),
            // Still alone in its network: no other machine holds a credential yet.
            route_secret: Some(crate::machine::identity::MeshIdentity::new_route_secret()),
            leaf: None,
        });
        upgraded.store(&self.config.data_dir)?;
        tracing::info!("gave this machine's identity its overlay prefix and subnet");
        Ok(upgraded)
    }

    /// Adopts or starts the gateway and DNS, following the store through
    /// `nats`. One that cannot start is reported in `status` and does not
    /// keep the rest of the machine down.
    async fn start_routing(&self, nats: &NatsClient) -> RoutingSidecars {
        let mut started = Vec::new();
        for component in routing::Component::ALL {
            let ensured = async {
                let binary = find_routing_binary(
                    component.process(),
                    component.configured_binary(&self.config),
                )?;
                let config = RoutingSidecarConfig::new(
                    component.process(),
                    binary,
                    component.dir(&self.config),
                    component.render(&self.config, nats),
                    component.admin_socket(&self.config),
                );
                RoutingSidecar::ensure(config).await
            }
            .await;
            match ensured {
                Ok(sidecar) => {
                    let sidecar = Arc::new(sidecar);
                    tracing::info!(status = ?sidecar.status(), "{} ready", component.name());
                    let supervised = sidecar.clone();
                    let shutdown = self.shutdown.clone();
                    self.tasks
                        .spawn(async move { supervised.supervise(shutdown).await });
                    started.push((component, Ok(sidecar)));
                }
                Err(error) => {
                    let reason = error_chain(&error);
                    tracing::error!(%reason, "{} did not start; routes are not served here", component.name());
                    started.push((component, Err(reason)));
                }
            }
        }
        started
    }

    /// The cluster runtime, or why there is none.
    async fn runtime(&self) -> Result<Arc<ClusterRuntime>, ployz_api::ApiError> {
        use ployz_api::{ApiError, ErrorClass};
        match &*self.cluster.read().await {
            ClusterState::Ready(runtime) => Ok(runtime.clone()),
            ClusterState::Uninitialized => Err(ApiError::new(
                ErrorClass::PreconditionFailed,
                "not_initialized",
                "this machine is not part of a cluster yet; run `ployzctl mesh init <network>`",
            )),
            ClusterState::Degraded { reason, .. } => Err(ApiError::new(
                ErrorClass::Unavailable,
                "store_unavailable",
                format!("the cluster store is unavailable on this machine: {reason}"),
            )),
        }
    }
}

/// Why the daemon could not start at all.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot create data dir {path}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// Why NATS or the store could not be brought up.
#[derive(Debug, thiserror::Error)]
pub enum BringUpError {
    #[error("overlay")]
    Mesh(#[from] mesh::MeshError),
    #[error("machine identity")]
    Identity(#[from] IdentityError),
    #[error("NATS sidecar")]
    Sidecar(#[from] SidecarError),
    #[error("store")]
    Store(#[from] StoreError),
}

/// The user name NATS routes authenticate as (with the network's route secret).
const ROUTE_USER: &str = "ployz-route";
/// A core machine's route certificate and key, under the data dir.
const ROUTE_CERTIFICATE_FILE: &str = "nats/route.crt";
const ROUTE_KEY_FILE: &str = "nats/route.key";

/// True when `running` and `wanted` describe the same process: they differ
/// at most in what is reloaded in place (the route peers).
fn same_process(running: &NatsSidecarConfig, wanted: &NatsSidecarConfig) -> bool {
    let without_peers = |config: &NatsSidecarConfig| {
        let mut config = config.clone();
        if let Some(tls) = config
            .cluster
            .as_mut()
            .and_then(|cluster| cluster.tls.as_mut())
        {
            tls.peers.clear();
        }
        config
    };
    without_peers(running) == without_peers(wanted)
}

/// The route certificates a core server trusts and pins: its own and every
/// core member's in `peers`.
fn route_peers(own: Option<NatsRoutePeer>, peers: &[mesh::KnownPeer]) -> Vec<NatsRoutePeer> {
    own.into_iter()
        .chain(peers.iter().filter_map(|peer| {
            let certificate = peer.route_certificate.as_ref()?;
            Some(NatsRoutePeer {
                name: peer.machine_id.clone(),
                certificate_pem: certificate.pem.clone(),
                pin: certificate.pin.clone(),
            })
        }))
        .collect()
}

/// Writes `certificate` into machine `machine_id`'s record unless it holds
/// it already; retries a lost compare-and-set.
pub(super) async fn record_route_certificate(
    store: &NatsStore,
    machine_id: &str,
    certificate: &crate::machine::records::RouteCertificateRecord,
) -> Result<bool, StoreError> {
    use crate::store::RecordStore as _;
    let key = crate::machine::MachineRecord::key(machine_id);
    for _ in 0..5 {
        let Some(found) = store.get(&key).await? else {
            return Ok(false);
        };
        let mut record: crate::machine::MachineRecord = found.decode()?;
        if record.route_certificate.as_ref() == Some(certificate) {
            return Ok(false);
        }
        record.route_certificate = Some(certificate.clone());
        match store
            .update(&key, crate::store::encode(&key, &record)?, found.revision)
            .await
        {
            Ok(_) => return Ok(true),
            Err(error) if error.is_conflict() => continue,
            Err(error) => return Err(error),
        }
    }
    Err(StoreError::Backend {
        context: format!("machine {machine_id}'s record kept changing"),
        source: None,
    })
}
/// The user a core machine's own clients connect to its NATS server as.
const LOCAL_USER: &str = "ployz-local";
/// A core server's system-account user.
const SYSTEM_USER: &str = "ployz-system";
/// The core servers' JetStream domain; clients on a leaf server reach the
/// store only through it.
pub(crate) const JETSTREAM_DOMAIN: &str = "ployz";

/// How this machine's own clients (its ployzd, gateway and DNS) use its NATS
/// server: with the local user on a core server, through the core's domain on
/// a leaf server.
#[derive(Clone, Debug)]
pub(crate) struct NatsClient {
    pub url: String,
    pub credentials: Option<NatsCredentials>,
    pub jetstream_domain: Option<String>,
}

impl NatsClient {
    fn of(nats: &NatsSidecar) -> Self {
        let config = nats.config();
        let (credentials, jetstream_domain) = match &config.leafnodes {
            Some(NatsLeafnodes::Hub(hub)) => (
                Some(NatsCredentials {
                    user: hub.local_user.name.clone(),
                    password: hub.local_user.password.clone(),
                }),
                None,
            ),
            Some(NatsLeafnodes::Leaf(_)) => (None, Some(JETSTREAM_DOMAIN.to_owned())),
            None => (None, None),
        };
        Self {
            url: nats.client_url(),
            credentials,
            jetstream_domain,
        }
    }
}

/// This core machine's system-account user at its NATS server, which lists
/// and closes leaf connections. `None` without a route secret.
pub(super) fn system_credentials(identity: &LocalIdentity) -> Option<NatsCredentials> {
    let password = identity
        .mesh
        .as_ref()?
        .nats_password(NatsPassword::System, &identity.machine_id)?;
    Some(NatsCredentials {
        user: SYSTEM_USER.to_owned(),
        password,
    })
}

/// What a core machine's NATS server takes from membership, in place: one
/// leaf user per leaf machine (its password derived from the route secret),
/// and the route certificates of the core machines it trusts and pins.
pub(super) struct NatsMembers {
    nats: Arc<NatsSidecar>,
    identity: LocalIdentity,
}

impl NatsMembers {
    /// `None` unless `nats` is a core server accepting leaf servers or
    /// routing over TLS.
    fn for_sidecar(identity: &LocalIdentity, nats: &Arc<NatsSidecar>) -> Option<Self> {
        identity.mesh.as_ref()?;
        let config = nats.config();
        let hub = matches!(config.leafnodes, Some(NatsLeafnodes::Hub(_)));
        (hub || Self::route_tls(config).is_some()).then(|| Self {
            nats: nats.clone(),
            identity: identity.clone(),
        })
    }

    fn route_tls(config: &NatsSidecarConfig) -> Option<&NatsRouteTls> {
        config.cluster.as_ref()?.tls.as_ref()
    }

    /// The users for the leaf machines among `peers`.
    fn users(&self, peers: &[mesh::KnownPeer]) -> Vec<NatsUser> {
        let Some(mesh) = self.identity.mesh.as_ref() else {
            return Vec::new();
        };
        peers
            .iter()
            .filter(|peer| peer.leaf)
            .filter_map(|peer| {
                let password = mesh.nats_password(NatsPassword::Leaf, &peer.machine_id)?;
                Some(NatsUser::new(peer.machine_id.clone(), password))
            })
            .collect()
    }

    /// Makes the server admit exactly the leaf machines among `peers` and
    /// trust exactly the core machines' route certificates among them (and
    /// its own), reloading it in place when that changes anything. Answers
    /// the leaf users now admitted when they changed. A failure is logged:
    /// the server keeps what it had.
    fn apply(&self, peers: &[mesh::KnownPeer]) -> Option<Vec<String>> {
        let config = self.nats.config();
        if let Some(tls) = Self::route_tls(config) {
            let own = tls
                .peers
                .iter()
                .find(|peer| peer.name == self.identity.machine_id)
                .cloned();
            let trusted = route_peers(own, peers);
            let names: Vec<String> = trusted.iter().map(|peer| peer.name.clone()).collect();
            match self.nats.set_route_peers(trusted) {
                Ok(true) => {
                    tracing::info!(servers = ?names, "NATS routes with the core machines' certificates")
                }
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), "cannot update the route certificates NATS trusts")
                }
            }
        }
        if !matches!(config.leafnodes, Some(NatsLeafnodes::Hub(_))) {
            return None;
        }
        let users = self.users(peers);
        let names: Vec<String> = users.iter().map(|user| user.name.clone()).collect();
        match self.nats.set_leaf_users(users) {
            Ok(true) => {
                tracing::info!(leaves = ?names, "NATS admits the leaf machines of the network");
                Some(names)
            }
            Ok(false) => None,
            Err(error) => {
                tracing::warn!(error = %error_chain(&error), "cannot update the leaf machines NATS admits");
                None
            }
        }
    }

    /// [`Self::apply`] for `peers` read from the store, then closes the
    /// connections this server still has from leaf machines that are no
    /// longer among them: a reload alone refuses only their next connection.
    async fn apply_and_revoke(&self, peers: &[mesh::KnownPeer]) {
        let Some(admitted) = self.apply(peers) else {
            return;
        };
        let Some(system) = system_credentials(&self.identity) else {
            return;
        };
        match crate::store::nats::close_leaves_except(
            &self.nats.client_url(),
            &system,
            &admitted,
            Duration::from_millis(500),
        )
        .await
        {
            Ok(closed) if !closed.is_empty() => {
                tracing::info!(
                    ?closed,
                    "closed the leaf connections of machines no longer admitted"
                )
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(error = %error_chain(&error), "cannot close the leaf connections of machines no longer admitted")
            }
        }
    }
}

/// Lets the kernel forward IPv6 between the overlay and the container bridge.
fn enable_ipv6_forwarding() -> std::io::Result<()> {
    const PATH: &str = "/proc/sys/net/ipv6/conf/all/forwarding";
    if std::fs::read_to_string(PATH)?.trim() == "1" {
        return Ok(());
    }
    std::fs::write(PATH, "1\n")
}

/// What the peer API lends other machines: this machine's id and engine.
struct PeerEngine {
    daemon: std::sync::Weak<Daemon>,
}

impl peer::LocalEngine for PeerEngine {
    type Runtime = DockerRuntime;

    async fn machine_id(&self) -> Option<String> {
        let daemon = self.daemon.upgrade()?;
        let state = daemon.cluster.read().await;
        match &*state {
            ClusterState::Uninitialized => None,
            ClusterState::Degraded { identity, .. } => Some(identity.machine_id.clone()),
            ClusterState::Ready(runtime) => Some(runtime.identity.machine_id.clone()),
        }
    }

    async fn runtime(&self) -> Result<DockerRuntime, crate::runtime::RuntimeError> {
        let daemon =
            self.daemon
                .upgrade()
                .ok_or_else(|| crate::runtime::RuntimeError::Unavailable {
                    context: "ployzd is shutting down".to_owned(),
                    source: None,
                })?;
        daemon
            .containers()
            .await
            .map_err(|error| crate::runtime::RuntimeError::Unavailable {
                context: error.message,
                source: None,
            })
    }

    fn container_dns(&self) -> Vec<std::net::IpAddr> {
        self.daemon
            .upgrade()
            .map(|daemon| routing::container_dns(&daemon.config))
            .unwrap_or_default()
    }

    /// Another machine's overlay address (`<subnet>::1` of the network's
    /// prefix), and not this machine's: containers, whose addresses are in
    /// `<subnet>:1::/80`, and local processes are refused. The overlay's
    /// cryptokey routing makes the source address trustworthy: a peer can
    /// only send from its own subnet, and a spoofed source never sees the
    /// answer it would need to complete a TCP handshake.
    async fn admits(&self, source: Option<SocketAddr>) -> bool {
        let Some(daemon) = self.daemon.upgrade() else {
            return false;
        };
        let Some(mesh) = daemon.mesh_runtime.lock().await.clone() else {
            return false;
        };
        match source.map(|source| source.ip()) {
            Some(std::net::IpAddr::V6(address)) => {
                mesh.prefix().is_machine_address(address) && address != mesh.overlay_address()
            }
            Some(std::net::IpAddr::V4(_)) | None => false,
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}
