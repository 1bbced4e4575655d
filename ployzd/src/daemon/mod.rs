//! daemon: the composition root. It is the only module that names concrete
//! backends (`NatsStore`, `NatsSidecar`), binds the gRPC socket, adopts what
//! already runs on start, and dispatches requests to the domains. It owns every
//! task it spawns and joins them on shutdown; it never stops the data plane on
//! its own exit.

pub mod api;
pub mod backends;
pub mod config;
mod deploy;
mod operations;
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
    machine::{IdentityError, LocalIdentity},
    runtime::{ContainerRuntime, ContainerState, docker::DockerRuntime, labels},
    services::{
        SidecarError,
        nats::{NatsSidecar, NatsSidecarConfig},
        routing::{RoutingSidecar, RoutingSidecarConfig, find_routing_binary},
    },
    storage::VolumeBackend,
    store::{
        StoreError,
        nats::{NatsStore, NatsStoreConfig},
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
    /// This machine's volumes, or why they could not be opened.
    volumes: Result<Volumes, String>,
    /// The container engine, connected on first use (it may start after the daemon).
    containers: Mutex<Option<DockerRuntime>>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

/// What this machine's membership looks like to the daemon right now.
enum ClusterState {
    /// No identity: `mesh init` has not run here.
    Uninitialized,
    /// An identity exists but its sidecars or store could not be brought up.
    Degraded {
        identity: LocalIdentity,
        reason: String,
    },
    Ready(Arc<ClusterRuntime>),
}

/// The live parts of a member machine: its NATS sidecar, its store, and the
/// gateway and DNS sidecars (or why each could not start).
struct ClusterRuntime {
    identity: LocalIdentity,
    nats: Arc<NatsSidecar>,
    store: NatsStore,
    journal: Journal<NatsStore>,
    routing: Vec<(routing::Component, Result<Arc<RoutingSidecar>, String>)>,
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
            volumes,
            containers: Mutex::new(None),
            tasks: TaskTracker::new(),
            shutdown,
        });
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

    /// The container engine, connecting on first use.
    async fn containers(&self) -> Result<DockerRuntime, ployz_api::ApiError> {
        let mut cached = self.containers.lock().await;
        if let Some(runtime) = &*cached {
            return Ok(runtime.clone());
        }
        let runtime = DockerRuntime::connect_with_socket(&self.config.docker_socket)
            .await
            .map_err(|error| {
                ployz_api::ApiError::new(
                    ployz_api::ErrorClass::Unavailable,
                    "runtime_unavailable",
                    format!("the Docker engine does not answer: {}", error_chain(&error)),
                )
            })?;
        *cached = Some(runtime.clone());
        Ok(runtime)
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

    /// Adopts or starts NATS for `identity`, connects the store and keeps the
    /// result as the cluster runtime. Idempotent.
    async fn bring_up(
        &self,
        identity: &LocalIdentity,
    ) -> Result<Arc<ClusterRuntime>, BringUpError> {
        let result = self.try_bring_up(identity).await;
        let mut state = self.cluster.write().await;
        match &result {
            Ok(runtime) => *state = ClusterState::Ready(runtime.clone()),
            Err(error) => {
                *state = ClusterState::Degraded {
                    identity: identity.clone(),
                    reason: error_chain(error),
                }
            }
        }
        result
    }

    async fn try_bring_up(
        &self,
        identity: &LocalIdentity,
    ) -> Result<Arc<ClusterRuntime>, BringUpError> {
        if let ClusterState::Ready(runtime) = &*self.cluster.read().await {
            return Ok(runtime.clone());
        }
        let mut nats_config = NatsSidecarConfig::new(
            crate::services::nats::find_binary(self.config.nats.binary.as_deref())?,
            self.config.data_dir.join("nats"),
            identity.machine_id.clone(),
        );
        nats_config.listen = SocketAddr::new(self.config.nats.host, self.config.nats.port);
        nats_config.monitor_port = self.config.nats.monitor_port;
        let nats = Arc::new(NatsSidecar::ensure(nats_config).await?);
        tracing::info!(status = ?nats.status(), "NATS sidecar ready");
        let supervised = nats.clone();
        let shutdown = self.shutdown.clone();
        self.tasks
            .spawn(async move { supervised.supervise(shutdown).await });

        let mut store_config = NatsStoreConfig::new(nats.client_url());
        store_config.startup_timeout = STORE_CONNECT_TIMEOUT;
        let store = NatsStore::connect(store_config).await?;
        let journal = Journal::new(store.clone(), self.runner.clone())
            .with_lease_ttl(self.config.operation_lease_ttl);
        let routing = self.start_routing(&nats.client_url()).await;
        Ok(Arc::new(ClusterRuntime {
            identity: identity.clone(),
            nats,
            store,
            journal,
            routing,
        }))
    }

    /// Adopts or starts the gateway and DNS, following the store at
    /// `nats_url`. One that cannot start is reported in `status` and does not
    /// keep the rest of the machine down.
    async fn start_routing(
        &self,
        nats_url: &str,
    ) -> Vec<(routing::Component, Result<Arc<RoutingSidecar>, String>)> {
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
                    component.render(&self.config, nats_url),
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
    #[error("NATS sidecar")]
    Sidecar(#[from] SidecarError),
    #[error("store")]
    Store(#[from] StoreError),
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}
