//! runtime: running workload containers on this machine through a narrow
//! contract ([`ContainerRuntime`]). Backends: [`docker::DockerRuntime`] (the
//! Docker engine, through bollard) and [`memory::MemoryRuntime`] (unit tests),
//! held to the same contract suite. The runtime executes; it never decides
//! placement, health policy or what to replace — that is the deploy domain's.
//! Domains depend on the types here, never on bollard's.

pub mod docker;
pub mod memory;

use std::{collections::BTreeMap, future::Future, net::IpAddr, path::PathBuf, time::Duration};

/// Label keys Ployz puts on every container it creates. They are the
/// container's identity: a restarted daemon finds and adopts its workloads by them.
pub mod labels {
    /// Always `true`: the container is managed by Ployz.
    pub const MANAGED: &str = "ployz.managed";
    pub const NAMESPACE: &str = "ployz.namespace";
    pub const SERVICE: &str = "ployz.service";
    /// The deploy commit that created the container.
    pub const DEPLOY: &str = "ployz.deploy";
    /// The operation that created the container.
    pub const OPERATION: &str = "ployz.operation";
    /// Replica index within the service, `0`, `1`, …
    pub const REPLICA: &str = "ployz.replica";
    /// Hash of the full container specification; equal hashes mean an identical container.
    pub const CONFIG_HASH: &str = "ployz.config-hash";
}

/// The engine's id of a container.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct ContainerId(pub String);

impl std::fmt::Display for ContainerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Everything needed to create a container. Plain data, comparable, hashable
/// into the `ployz.config-hash` label by the caller.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ContainerSpec {
    /// Container name; unique on the engine.
    pub name: String,
    pub image: String,
    /// Replaces the image's entrypoint when set.
    pub entrypoint: Option<Vec<String>>,
    /// Replaces the image's command when set.
    pub command: Option<Vec<String>>,
    /// Sorted for determinism.
    pub env: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub mounts: Vec<Mount>,
    /// Memory limit in bytes.
    pub memory_bytes: Option<u64>,
    /// CPU limit in thousandths of a CPU (`500` = half a CPU).
    pub cpu_millis: Option<u64>,
    /// How long `stop` waits after SIGTERM before SIGKILL.
    pub stop_grace: Duration,
    /// DNS servers for the container: this machine's ployz-dns.
    pub dns: Vec<IpAddr>,
    /// Search domains, so `<service>` resolves within the namespace.
    pub dns_search: Vec<String>,
}

/// A host directory bind-mounted into the container.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Mount {
    pub host_path: PathBuf,
    pub container_path: String,
    pub read_only: bool,
}

/// Whether a container's process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContainerState {
    Created,
    Running,
    /// Stopped or exited; `exit_code` says how.
    Exited,
    /// Paused, restarting, dead or removing: not serving.
    Other,
}

/// What the engine reports about a container, observed now.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ContainerInfo {
    pub id: ContainerId,
    pub name: String,
    pub image: String,
    pub labels: BTreeMap<String, String>,
    pub state: ContainerState,
    pub exit_code: Option<i64>,
    /// When the current (or last) run started, as the engine reports it (RFC 3339).
    pub started_at: Option<String>,
    /// Addresses on the engine's networks (the bridge address on Docker).
    pub addresses: Vec<IpAddr>,
}

/// The result of running a command inside a container.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExecOutput {
    pub exit_code: i64,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Running containers on one machine.
pub trait ContainerRuntime: Clone + Send + Sync + 'static {
    /// True when `image` is present locally (Ployz never pulls implicitly).
    fn image_exists(&self, image: &str) -> impl Future<Output = Result<bool, RuntimeError>> + Send;

    /// Creates (does not start) a container. A name already taken is [`RuntimeError::NameInUse`].
    fn create(
        &self,
        spec: &ContainerSpec,
    ) -> impl Future<Output = Result<ContainerId, RuntimeError>> + Send;

    /// Starts a created or exited container; starting a running one is not an error.
    fn start(&self, id: &ContainerId) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// Stops a container, waiting at most `grace` before killing it; stopping a
    /// stopped one is not an error.
    fn stop(
        &self,
        id: &ContainerId,
        grace: Duration,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// Removes a container (force-stopping it if it runs); removing an absent one is not an error.
    fn remove(&self, id: &ContainerId) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// The container's current state, `None` when it does not exist.
    fn inspect(
        &self,
        id: &ContainerId,
    ) -> impl Future<Output = Result<Option<ContainerInfo>, RuntimeError>> + Send;

    /// Every container (running or not) carrying all the given labels.
    fn list(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> impl Future<Output = Result<Vec<ContainerInfo>, RuntimeError>> + Send;

    /// Runs `command` inside a running container and waits for it, at most `timeout`.
    fn exec(
        &self,
        id: &ContainerId,
        command: &[String],
        timeout: Duration,
    ) -> impl Future<Output = Result<ExecOutput, RuntimeError>> + Send;
}

/// What can go wrong running containers.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("image `{image}` is not present on this machine; build or load it first")]
    ImageMissing { image: String },
    #[error("container name `{name}` is already in use")]
    NameInUse { name: String },
    #[error("container `{id}` does not exist")]
    NoSuchContainer { id: String },
    #[error("container `{id}` is not running")]
    NotRunning { id: String },
    #[error("`{command}` in container `{id}` did not finish within {timeout:?}")]
    ExecTimeout {
        id: String,
        command: String,
        timeout: Duration,
    },
    #[error("container engine is unavailable: {context}")]
    Unavailable {
        context: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    #[error("container engine failed: {context}")]
    Engine {
        context: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl RuntimeError {
    /// True when retrying later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, RuntimeError::Unavailable { .. })
    }
}
