//! The peer API: one machine's ployzd driving another machine's container
//! engine over the overlay, so that a deploy run on one machine places
//! containers on any member.
//!
//! The serving side ([`PeerService`]) executes [`PeerCall`]s on its local
//! engine and decides nothing: placement, health policy and the commit stay
//! with the deploying machine. The calling side ([`PeerRuntime`]) is a
//! [`ContainerRuntime`] like the local engine, so the deploy domain drives
//! both the same way ([`MachineRuntime`]). The service listens only on the
//! machine's overlay address; the overlay admits only member machines.

use std::{
    collections::BTreeMap,
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use ployz_api::{
    ApiError, ErrorClass,
    v1::{
        PeerRuntimeRequest, PeerRuntimeResponse,
        ployz_peer_client::PloyzPeerClient,
        ployz_peer_server::{PloyzPeer, PloyzPeerServer},
    },
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::runtime::{
    ContainerId, ContainerInfo, ContainerRuntime, ContainerSpec, ExecOutput, RuntimeError,
    docker::DockerRuntime,
};

/// How long connecting to a peer may take before it counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one call may take, beyond what the call itself waits for (a
/// stop's grace period, an exec's timeout).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// One container-runtime call, as it travels between machines.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "call", rename_all = "snake_case")]
pub enum PeerCall {
    ImageExists {
        image: String,
    },
    Create {
        spec: ContainerSpec,
    },
    Start {
        id: ContainerId,
    },
    Stop {
        id: ContainerId,
        grace: Duration,
    },
    Remove {
        id: ContainerId,
    },
    Inspect {
        id: ContainerId,
    },
    List {
        labels: BTreeMap<String, String>,
    },
    Exec {
        id: ContainerId,
        command: Vec<String>,
        timeout: Duration,
    },
}

/// A call's result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", content = "value", rename_all = "snake_case")]
pub enum PeerReply {
    Done,
    Exists(bool),
    Created(ContainerId),
    Inspected(Option<ContainerInfo>),
    Listed(Vec<ContainerInfo>),
    Executed(ExecOutput),
    Failed(WireError),
}

/// A [`RuntimeError`] on the wire; the source chain travels as text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WireError {
    ImageMissing {
        image: String,
    },
    NameInUse {
        name: String,
    },
    NoSuchContainer {
        id: String,
    },
    NotRunning {
        id: String,
    },
    ExecTimeout {
        id: String,
        command: String,
        timeout: Duration,
    },
    Unavailable {
        context: String,
    },
    Engine {
        context: String,
    },
}

impl From<&RuntimeError> for WireError {
    fn from(error: &RuntimeError) -> Self {
        match error {
            RuntimeError::ImageMissing { image } => WireError::ImageMissing {
                image: image.clone(),
            },
            RuntimeError::NameInUse { name } => WireError::NameInUse { name: name.clone() },
            RuntimeError::NoSuchContainer { id } => WireError::NoSuchContainer { id: id.clone() },
            RuntimeError::NotRunning { id } => WireError::NotRunning { id: id.clone() },
            RuntimeError::ExecTimeout {
                id,
                command,
                timeout,
            } => WireError::ExecTimeout {
                id: id.clone(),
                command: command.clone(),
                timeout: *timeout,
            },
            RuntimeError::Unavailable { .. } => WireError::Unavailable {
                context: crate::error_chain(error),
            },
            RuntimeError::Engine { .. } => WireError::Engine {
                context: crate::error_chain(error),
            },
        }
    }
}

impl WireError {
    /// The error as the calling machine reports it, naming the machine where
    /// the engine's own words would not.
    fn into_runtime_error(self, machine: &str) -> RuntimeError {
        match self {
            WireError::ImageMissing { image } => RuntimeError::ImageMissing { image },
            WireError::NameInUse { name } => RuntimeError::NameInUse { name },
            WireError::NoSuchContainer { id } => RuntimeError::NoSuchContainer { id },
            WireError::NotRunning { id } => RuntimeError::NotRunning { id },
            WireError::ExecTimeout {
                id,
                command,
                timeout,
            } => RuntimeError::ExecTimeout {
                id,
                command,
                timeout,
            },
            WireError::Unavailable { context } => RuntimeError::Unavailable {
                context: format!("on machine {machine}: {context}"),
                source: None,
            },
            WireError::Engine { context } => RuntimeError::Engine {
                context: format!("on machine {machine}: {context}"),
                source: None,
            },
        }
    }
}

/// Runs `call` on `runtime`.
pub async fn execute<R: ContainerRuntime>(runtime: &R, call: PeerCall) -> PeerReply {
    let result = match call {
        PeerCall::ImageExists { image } => {
            runtime.image_exists(&image).await.map(PeerReply::Exists)
        }
        PeerCall::Create { spec } => runtime.create(&spec).await.map(PeerReply::Created),
        PeerCall::Start { id } => runtime.start(&id).await.map(|()| PeerReply::Done),
        PeerCall::Stop { id, grace } => runtime.stop(&id, grace).await.map(|()| PeerReply::Done),
        PeerCall::Remove { id } => runtime.remove(&id).await.map(|()| PeerReply::Done),
        PeerCall::Inspect { id } => runtime.inspect(&id).await.map(PeerReply::Inspected),
        PeerCall::List { labels } => runtime.list(&labels).await.map(PeerReply::Listed),
        PeerCall::Exec {
            id,
            command,
            timeout,
        } => runtime
            .exec(&id, &command, timeout)
            .await
            .map(PeerReply::Executed),
    };
    result.unwrap_or_else(|error| PeerReply::Failed(WireError::from(&error)))
}

/// What the serving machine lends the peer service: its id and its engine.
pub trait LocalEngine: Send + Sync + 'static {
    type Runtime: ContainerRuntime;

    /// This machine's id, `None` before it is a member.
    fn machine_id(&self) -> impl Future<Output = Option<String>> + Send;

    /// The local engine, connected.
    fn runtime(&self) -> impl Future<Output = Result<Self::Runtime, RuntimeError>> + Send;

    /// The DNS servers containers created here use: this machine's ployz-dns,
    /// whatever the calling machine's would have been.
    fn container_dns(&self) -> Vec<IpAddr>;

    /// Whether a connection from `source` may drive this engine: only other
    /// member machines may, never a container or a local process.
    fn admits(&self, source: Option<SocketAddr>) -> impl Future<Output = bool> + Send;
}

/// The serving side of the peer API.
pub struct PeerService<E> {
    engine: Arc<E>,
}

impl<E: LocalEngine> PeerService<E> {
    pub fn new(engine: Arc<E>) -> Self {
        Self { engine }
    }

    pub fn into_server(self) -> PloyzPeerServer<Self> {
        PloyzPeerServer::new(self)
    }
}

#[tonic::async_trait]
impl<E: LocalEngine> PloyzPeer for PeerService<E> {
    async fn runtime(
        &self,
        request: tonic::Request<PeerRuntimeRequest>,
    ) -> Result<tonic::Response<PeerRuntimeResponse>, tonic::Status> {
        let refuse = |class, code: &str, message: String| ApiError::new(class, code, message);
        let source = request.remote_addr();
        if !self.engine.admits(source).await {
            return Err(refuse(
                ErrorClass::PreconditionFailed,
                "not_a_peer",
                format!(
                    "{} is not another member machine's overlay address",
                    source.map_or_else(|| "an unknown source".to_owned(), |s| s.ip().to_string())
                ),
            )
            .into_status());
        }
        let request = request.into_inner();
        let me = self.engine.machine_id().await.ok_or_else(|| {
            refuse(
                ErrorClass::PreconditionFailed,
                "not_a_member",
                "this machine is not a member of a network".to_owned(),
            )
            .into_status()
        })?;
        if request.machine_id != me {
            return Err(refuse(
                ErrorClass::PreconditionFailed,
                "wrong_machine",
                format!(
                    "this is machine {me}, not {}; the caller's address for it is stale",
                    request.machine_id
                ),
            )
            .into_status());
        }
        let mut call: PeerCall = serde_json::from_slice(&request.call).map_err(|error| {
            refuse(
                ErrorClass::Usage,
                "invalid_peer_call",
                format!("the call is not a runtime call: {error}"),
            )
            .into_status()
        })?;
        if let PeerCall::Create { spec } = &mut call {
            // Search domains name the namespace's zone, the same everywhere;
            // the servers are this machine's.
            spec.dns = self.engine.container_dns();
            if spec.dns.is_empty() {
                spec.dns_search.clear();
            }
        }
        let reply = match self.engine.runtime().await {
            Ok(runtime) => execute(&runtime, call).await,
            Err(error) => PeerReply::Failed(WireError::from(&error)),
        };
        let reply = serde_json::to_vec(&reply).map_err(|error| {
            refuse(
                ErrorClass::Internal,
                "peer_reply_unencodable",
                error.to_string(),
            )
            .into_status()
        })?;
        Ok(tonic::Response::new(PeerRuntimeResponse { reply }))
    }
}

/// Serves the peer API on `address` until `shutdown`. Binding fails loudly:
/// a machine whose peers cannot reach it must say so.
pub async fn serve<E: LocalEngine>(
    engine: Arc<E>,
    address: SocketAddr,
    shutdown: CancellationToken,
) -> std::io::Result<impl Future<Output = Result<(), tonic::transport::Error>>> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    Ok(tonic::transport::Server::builder()
        .add_service(PeerService::new(engine).into_server())
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned()))
}

/// Another machine's engine, driven through its peer API.
#[derive(Clone, Debug)]
pub struct PeerRuntime {
    machine_id: String,
    address: SocketAddr,
    client: PloyzPeerClient<Channel>,
}

impl PeerRuntime {
    /// A runtime for machine `machine_id`, whose peer API listens on
    /// `address`. Connects on first use.
    pub fn new(machine_id: String, address: SocketAddr) -> Self {
        let channel = Endpoint::from_shared(format!("http://{address}"))
            .expect("a socket address always makes a valid URI")
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .connect_lazy();
        Self {
            machine_id,
            address,
            client: PloyzPeerClient::new(channel),
        }
    }

    async fn call(&self, call: PeerCall, waits: Duration) -> Result<PeerReply, RuntimeError> {
        let bytes = serde_json::to_vec(&call).map_err(|error| RuntimeError::Engine {
            context: format!("encode a call for machine {}", self.machine_id),
            source: Some(Box::new(error)),
        })?;
        let mut request = tonic::Request::new(PeerRuntimeRequest {
            machine_id: self.machine_id.clone(),
            call: bytes,
        });
        request.set_timeout(CALL_TIMEOUT.saturating_add(waits));
        let response = self
            .client
            .clone()
            .runtime(request)
            .await
            .map_err(|status| self.status_error(&status))?;
        let reply: PeerReply =
            serde_json::from_slice(&response.into_inner().reply).map_err(|error| {
                RuntimeError::Engine {
                    context: format!(
                        "machine {}'s answer is not a runtime reply",
                        self.machine_id
                    ),
                    source: Some(Box::new(error)),
                }
            })?;
        if let PeerReply::Failed(error) = reply {
            return Err(error.into_runtime_error(&self.machine_id));
        }
        Ok(reply)
    }

    fn status_error(&self, status: &tonic::Status) -> RuntimeError {
        let error = ApiError::from_status(status);
        let context = format!(
            "machine {} at {} over the overlay: {} ({})",
            self.machine_id, self.address, error.message, error.code
        );
        if matches!(error.class, ErrorClass::Unavailable) {
            RuntimeError::Unavailable {
                context,
                source: None,
            }
        } else {
            RuntimeError::Engine {
                context,
                source: None,
            }
        }
    }

    fn unexpected(&self, reply: &PeerReply) -> RuntimeError {
        RuntimeError::Engine {
            context: format!(
                "machine {} answered with an unexpected reply {reply:?}",
                self.machine_id
            ),
            source: None,
        }
    }
}

impl ContainerRuntime for PeerRuntime {
    async fn image_exists(&self, image: &str) -> Result<bool, RuntimeError> {
        let call = PeerCall::ImageExists {
            image: image.to_owned(),
        };
        let reply = self.call(call, Duration::ZERO).await?;
        let PeerReply::Exists(exists) = reply else {
            return Err(self.unexpected(&reply));
        };
        Ok(exists)
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<ContainerId, RuntimeError> {
        let call = PeerCall::Create { spec: spec.clone() };
        let reply = self.call(call, Duration::ZERO).await?;
        let PeerReply::Created(id) = reply else {
            return Err(self.unexpected(&reply));
        };
        Ok(id)
    }

    async fn start(&self, id: &ContainerId) -> Result<(), RuntimeError> {
        let call = PeerCall::Start { id: id.clone() };
        let reply = self.call(call, Duration::ZERO).await?;
        if let PeerReply::Done = reply {
            return Ok(());
        }
        Err(self.unexpected(&reply))
    }

    async fn stop(&self, id: &ContainerId, grace: Duration) -> Result<(), RuntimeError> {
        let call = PeerCall::Stop {
            id: id.clone(),
            grace,
        };
        let reply = self.call(call, grace).await?;
        if let PeerReply::Done = reply {
            return Ok(());
        }
        Err(self.unexpected(&reply))
    }

    async fn remove(&self, id: &ContainerId) -> Result<(), RuntimeError> {
        let call = PeerCall::Remove { id: id.clone() };
        let reply = self.call(call, Duration::ZERO).await?;
        if let PeerReply::Done = reply {
            return Ok(());
        }
        Err(self.unexpected(&reply))
    }

    async fn inspect(&self, id: &ContainerId) -> Result<Option<ContainerInfo>, RuntimeError> {
        let call = PeerCall::Inspect { id: id.clone() };
        let reply = self.call(call, Duration::ZERO).await?;
        let PeerReply::Inspected(info) = reply else {
            return Err(self.unexpected(&reply));
        };
        Ok(info)
    }

    async fn list(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<ContainerInfo>, RuntimeError> {
        let call = PeerCall::List {
            labels: labels.clone(),
        };
        let reply = self.call(call, Duration::ZERO).await?;
        let PeerReply::Listed(found) = reply else {
            return Err(self.unexpected(&reply));
        };
        Ok(found)
    }

    async fn exec(
        &self,
        id: &ContainerId,
        command: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, RuntimeError> {
        let call = PeerCall::Exec {
            id: id.clone(),
            command: command.to_vec(),
            timeout,
        };
        let reply = self.call(call, timeout).await?;
        let PeerReply::Executed(output) = reply else {
            return Err(self.unexpected(&reply));
        };
        Ok(output)
    }
}

/// The engine of some machine of the network: this one's, or a peer's.
#[derive(Clone, Debug)]
pub enum MachineRuntime {
    Local(DockerRuntime),
    Peer(PeerRuntime),
}

impl ContainerRuntime for MachineRuntime {
    async fn image_exists(&self, image: &str) -> Result<bool, RuntimeError> {
        match self {
            MachineRuntime::Local(runtime) => runtime.image_exists(image).await,
            MachineRuntime::Peer(runtime) => runtime.image_exists(image).await,
        }
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<ContainerId, RuntimeError> {
        match self {
            MachineRuntime::Local(runtime) => runtime.create(spec).await,
            MachineRuntime::Peer(runtime) => runtime.create(spec).await,
        }
    }

    async fn start(&self, id: &ContainerId) -> Result<(), RuntimeError> {
        match self {
            MachineRuntime::Local(runtime) => runtime.start(id).await,
            MachineRuntime::Peer(runtime) => runtime.start(id).await,
        }
    }

    async fn stop(&self, id: &ContainerId, grace: Duration) -> Result<(), RuntimeError> {
        match self {
            MachineRuntime::Local(runtime) => runtime.stop(id, grace).await,
            MachineRuntime::Peer(runtime) => runtime.stop(id, grace).await,
        }
    }

    async fn remove(&self, id: &ContainerId) -> Result<(), RuntimeError> {
        match self {
            MachineRuntime::Local(runtime) => runtime.remove(id).await,
            MachineRuntime::Peer(runtime) => runtime.remove(id).await,
        }
    }

    async fn inspect(&self, id: &ContainerId) -> Result<Option<ContainerInfo>, RuntimeError> {
        match self {
            MachineRuntime::Local(runtime) => runtime.inspect(id).await,
            MachineRuntime::Peer(runtime) => runtime.inspect(id).await,
        }
    }

    async fn list(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<ContainerInfo>, RuntimeError> {
        match self {
            MachineRuntime::Local(runtime) => runtime.list(labels).await,
            MachineRuntime::Peer(runtime) => runtime.list(labels).await,
        }
    }

    async fn exec(
        &self,
        id: &ContainerId,
        command: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, RuntimeError> {
        match self {
            MachineRuntime::Local(runtime) => runtime.exec(id, command, timeout).await,
            MachineRuntime::Peer(runtime) => runtime.exec(id, command, timeout).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::memory::MemoryRuntime;

    struct Engine {
        runtime: MemoryRuntime,
        refuse_everyone: bool,
    }

    impl LocalEngine for Engine {
        type Runtime = MemoryRuntime;

        async fn machine_id(&self) -> Option<String> {
            Some("m-peer".to_owned())
        }

        async fn runtime(&self) -> Result<MemoryRuntime, RuntimeError> {
            Ok(self.runtime.clone())
        }

        fn container_dns(&self) -> Vec<IpAddr> {
            vec!["10.9.9.9".parse().expect("an address")]
        }

        async fn admits(&self, source: Option<SocketAddr>) -> bool {
            source.is_some_and(|source| source.ip().is_loopback()) && !self.refuse_everyone
        }
    }

    async fn peer() -> (MemoryRuntime, SocketAddr, CancellationToken) {
        serve_engine(false).await
    }

    async fn serve_engine(refuse_everyone: bool) -> (MemoryRuntime, SocketAddr, CancellationToken) {
        let runtime = MemoryRuntime::new();
        runtime.add_image("web:1");
        let engine = Arc::new(Engine {
            runtime: runtime.clone(),
            refuse_everyone,
        });
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        let address = probe.local_addr().expect("an address");
        drop(probe);
        let shutdown = CancellationToken::new();
        let server = serve(engine, address, shutdown.clone())
            .await
            .expect("bind the peer API");
        tokio::spawn(server);
        (runtime, address, shutdown)
    }

    fn spec(name: &str) -> ContainerSpec {
        ContainerSpec {
            name: name.to_owned(),
            image: "web:1".to_owned(),
            labels: [("ployz.namespace".to_owned(), "shop".to_owned())].into(),
            dns: vec!["10.1.1.1".parse().expect("an address")],
            dns_search: vec!["shop.ployz.internal".to_owned()],
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_peer_runs_containers_on_its_engine_with_its_own_dns() {
        let (engine, address, shutdown) = peer().await;
        let remote = PeerRuntime::new("m-peer".to_owned(), address);

        assert!(remote.image_exists("web:1").await.expect("asked"));
        assert!(!remote.image_exists("absent:1").await.expect("asked"));
        let id = remote.create(&spec("web-0")).await.expect("created");
        remote.start(&id).await.expect("started");
        let info = remote
            .inspect(&id)
            .await
            .expect("inspected")
            .expect("exists");
        assert_eq!(info.state, crate::runtime::ContainerState::Running);
        // The serving machine's DNS replaces the caller's.
        let created = engine.spec(&id).expect("the engine has it");
        assert_eq!(created.dns, vec!["10.9.9.9".parse::<IpAddr>().expect("ip")]);
        assert_eq!(created.dns_search, vec!["shop.ployz.internal".to_owned()]);

        let listed = remote
            .list(&[("ployz.namespace".to_owned(), "shop".to_owned())].into())
            .await
            .expect("listed");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id, id);

        remote
            .stop(&id, Duration::from_millis(10))
            .await
            .expect("stopped");
        remote.remove(&id).await.expect("removed");
        assert_eq!(remote.inspect(&id).await.expect("inspected"), None);
        shutdown.cancel();
    }

    #[tokio::test]
    async fn runtime_errors_keep_their_kind_across_machines() {
        let (_engine, address, shutdown) = peer().await;
        let remote = PeerRuntime::new("m-peer".to_owned(), address);
        let missing = ContainerSpec {
            image: "absent:1".to_owned(),
            ..spec("web-1")
        };
        assert!(matches!(
            remote.create(&missing).await,
            Err(RuntimeError::ImageMissing { image }) if image == "absent:1"
        ));
        remote.create(&spec("web-2")).await.expect("created");
        assert!(matches!(
            remote.create(&spec("web-2")).await,
            Err(RuntimeError::NameInUse { .. })
        ));
        assert!(matches!(
            remote.start(&ContainerId("nope".to_owned())).await,
            Err(RuntimeError::NoSuchContainer { .. })
        ));
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_peer_refuses_calls_meant_for_another_machine() {
        let (engine, address, shutdown) = peer().await;
        let stale = PeerRuntime::new("m-other".to_owned(), address);
        let error = stale.create(&spec("web-0")).await.expect_err("refused");
        assert!(error.to_string().contains("wrong_machine"), "{error}");
        let all = engine.list(&BTreeMap::new()).await.expect("listed");
        assert!(all.is_empty(), "nothing was created: {all:?}");
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_source_that_is_not_a_member_machine_is_refused() {
        let (engine, address, shutdown) = serve_engine(true).await;
        let remote = PeerRuntime::new("m-peer".to_owned(), address);
        let error = remote.create(&spec("web-0")).await.expect_err("refused");
        assert!(error.to_string().contains("not_a_peer"), "{error}");
        let all = engine.list(&BTreeMap::new()).await.expect("listed");
        assert!(all.is_empty(), "nothing was created: {all:?}");
        shutdown.cancel();
    }

    #[tokio::test]
    async fn an_unreachable_peer_is_unavailable_and_names_the_machine() {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        let address = probe.local_addr().expect("an address");
        drop(probe);
        let remote = PeerRuntime::new("m-gone".to_owned(), address);
        let error = remote.image_exists("web:1").await.expect_err("unreachable");
        assert!(error.is_retryable(), "{error:?}");
        assert!(error.to_string().contains("m-gone"), "{error}");
    }
}
