//! The daemon's half of the mesh: brings the overlay up from what the machine
//! keeps on its own disk (identity, key, the last peers it applied) before
//! the store is reachable, follows membership records into the tunnel's
//! peers, and runs both sides of a join: the member that admits a machine
//! (`MachineAdmit`, `MachineActivate`) and the machine that joins
//! (`MeshJoinPrepare`, `MeshJoin`). `ployzctl machine add` drives the steps.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use ployz_api::{ApiError, ErrorClass};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::{
    Daemon,
    operations::{Finished, journal_error, recorded, replay, store_error},
};
use crate::{
    coordination::{Begin, OperationId, OperationRun, StepStatus},
    error_chain,
    machine::{
        LocalIdentity, MachineRecord, Membership, NetworkName, identity::MeshIdentity,
        records::MachineMesh,
    },
    mesh::{
        addressing::{OverlayPrefix, SubnetIndex, claim_subnet},
        boringtun::{DeviceSnapshot, Key, PeerSnapshot},
        overlay::{self, DeviceSpec, KeyPair, PeerSpec, decode_key, encode_key},
        wg,
    },
    services::tunnel::{TunnelSidecar, TunnelSidecarConfig, find_tunnel_binary},
    store::{RecordStore, encode, nats::NatsStore},
    time::now_unix_ms,
};

/// The machine's WireGuard private key, under the data dir.
const KEY_FILE: &str = "mesh/private.key";
/// The peers last applied to the tunnel: how the overlay comes back after a
/// reboot, before the store (which needs the overlay) can be read.
const PEER_CACHE_FILE: &str = "mesh/peers.json";
/// A machine between `MeshJoinPrepare` and `MeshJoin`: the id it will use.
const PENDING_JOIN_FILE: &str = "join.json";
/// A store move whose import has not finished.
const PENDING_IMPORT_FILE: &str = "nats/pending-import.json";
/// Bound on one reachability probe of a peer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long `MachineActivate` waits unless told otherwise.
const DEFAULT_ACTIVATE_TIMEOUT: Duration = Duration::from_secs(60);
/// The store replicates every record to this many machines once it can.
const STORE_REPLICAS: usize = 3;
/// How long `MeshJoin` waits for the store before answering.
const JOIN_STORE_WAIT: Duration = Duration::from_secs(3);

/// The overlay as this daemon runs it.
pub(super) struct MeshRuntime {
    pub tunnel: Arc<TunnelSidecar>,
    pub spec: DeviceSpec,
    pub mesh: MeshIdentity,
}

impl MeshRuntime {
    fn socket(&self) -> PathBuf {
        self.spec.uapi_socket.clone()
    }

    pub fn overlay_address(&self) -> Ipv6Addr {
        self.spec.subnet.machine_address()
    }
}

/// One other member as the tunnel needs it; also the peer cache's entries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownPeer {
    pub machine_id: String,
    pub public_key: String,
    pub endpoint: Option<SocketAddr>,
    pub subnet: SubnetIndex,
}

/// What a member hands a joining machine (through `machine add`, over SSH).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinTicket {
    pub network: NetworkName,
    pub cluster_id: String,
    pub machine_id: String,
    pub prefix: OverlayPrefix,
    pub subnet: SubnetIndex,
    pub peers: Vec<KnownPeer>,
    /// NATS cluster addresses of the members, for the new server's routes.
    pub routes: Vec<SocketAddr>,
}

/// A machine about to join: the id it announced, kept so a retry reuses it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct PendingJoin {
    machine_id: String,
    network: NetworkName,
}

/// A store move in progress: the export still to be imported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct PendingImport {
    export: PathBuf,
}

/// `MeshJoinPrepare`'s answer.
pub struct JoinPrepared {
    pub state: &'static str,
    pub machine_id: String,
    pub network: String,
    pub cluster_id: String,
    pub public_key: String,
    pub listen_port: u16,
    pub hostname: String,
}

/// `MachineAdmit`'s answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Admitted {
    pub outcome: String,
    pub ticket: String,
    pub machine: MachineRecord,
}

/// `MachineActivate`'s answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Activated {
    pub outcome: String,
    pub machine: MachineRecord,
    pub handshake_unix_ms: u64,
    pub store_servers: usize,
    pub store_replicas: usize,
}

/// One peer in `mesh status`.
pub struct PeerView {
    pub record: Option<MachineRecord>,
    pub snapshot: PeerSnapshot,
    pub observed: &'static str,
}

/// `mesh status`'s answer.
pub struct MeshView {
    pub network: String,
    pub interface: String,
    pub public_key: String,
    pub listen_port: u16,
    pub overlay_address: Ipv6Addr,
    pub subnet: String,
    pub prefix: String,
    pub tunnel: String,
    pub peers: Vec<PeerView>,
}

impl Daemon {
    fn key_path(&self) -> PathBuf {
        self.config.data_dir.join(KEY_FILE)
    }

    fn peer_cache_path(&self) -> PathBuf {
        self.config.data_dir.join(PEER_CACHE_FILE)
    }

    fn pending_import_path(&self) -> PathBuf {
        self.config.data_dir.join(PENDING_IMPORT_FILE)
    }

    /// Finishes a store move: imports the export a marker names into
    /// `store` (the new, clustered one), then removes the marker. Runs before
    /// anything reads the new store, also after a daemon restart mid-move.
    pub(super) async fn finish_store_move(
        &self,
        store: &NatsStore,
    ) -> Result<(), crate::store::StoreError> {
        let _guard = self.store_move_lock.lock().await;
        let marker = self.pending_import_path();
        let Some(pending) = read_json::<PendingImport>(&marker) else {
            return Ok(());
        };
        let export: crate::store::nats::StoreExport =
            read_json(&pending.export).ok_or_else(|| crate::store::StoreError::Backend {
                context: format!(
                    "the store move's export {} is missing or unreadable",
                    pending.export.display()
                ),
                source: None,
            })?;
        store.import(&export).await?;
        std::fs::remove_file(&marker).map_err(|error| crate::store::StoreError::Backend {
            context: format!("cannot remove {}", marker.display()),
            source: Some(Box::new(error)),
        })?;
        tracing::info!(
            records = export.records.len(),
            events = export.events.len(),
            "store moved into the cluster"
        );
        Ok(())
    }

    fn keys(&self) -> Result<KeyPair, ApiError> {
        KeyPair::load_or_generate(&self.key_path())
            .map_err(|error| ApiError::new(ErrorClass::Internal, "mesh_key", error_chain(&error)))
    }

    /// Adopts or starts the tunnel, gives it this machine's key, port and
    /// address, and the peers it last knew. Changes nothing on a tunnel that
    /// already matches (a ployzd restart loses no packet).
    pub(super) async fn bring_up_mesh(
        &self,
        mesh: &MeshIdentity,
    ) -> Result<Arc<MeshRuntime>, MeshError> {
        let keys = KeyPair::load_or_generate(&self.key_path())
            .map_err(|error| MeshError(format!("WireGuard key: {}", error_chain(&error))))?;
        let binary = find_tunnel_binary(self.config.mesh.tunnel_binary.as_deref())
            .map_err(|error| MeshError(error_chain(&error)))?;
        let config = TunnelSidecarConfig::new(
            binary,
            self.config.data_dir.join("mesh"),
            self.config.mesh.interface.clone(),
            self.config.mesh.uapi_dir.clone(),
        );
        let tunnel = Arc::new(
            TunnelSidecar::ensure(config)
                .await
                .map_err(|error| MeshError(format!("tunnel: {}", error_chain(&error))))?,
        );
        tracing::info!(status = ?tunnel.status(), "tunnel ready");
        let supervised = tunnel.clone();
        let shutdown = self.shutdown.clone();
        self.tasks
            .spawn(async move { supervised.supervise(shutdown).await });
        let spec = DeviceSpec {
            interface: self.config.mesh.interface.clone(),
            uapi_socket: tunnel.config().uapi_socket(),
            keys,
            listen_port: self.config.mesh.listen_port,
            prefix: mesh.prefix,
            subnet: mesh.prefix.subnet(mesh.subnet),
        };
        overlay::configure_device(&spec)
            .await
            .map_err(|error| MeshError(format!("overlay device: {}", error_chain(&error))))?;
        let cached = read_peer_cache(&self.peer_cache_path());
        let changes = overlay::apply_peers(&spec.uapi_socket, &peer_specs(mesh.prefix, &cached))
            .await
            .map_err(|error| MeshError(format!("overlay peers: {}", error_chain(&error))))?;
        tracing::info!(
            address = %spec.subnet.machine_address(),
            peers = cached.len(),
            added = changes.added,
            updated = changes.updated,
            removed = changes.removed,
            "overlay up"
        );
        Ok(Arc::new(MeshRuntime {
            tunnel,
            spec,
            mesh: mesh.clone(),
        }))
    }

    /// Keeps the tunnel's peers equal to the membership records: applies
    /// them on every change under `machines.`, and gives a restarted tunnel
    /// (the supervisor brought it back empty) its device settings and peers.
    pub(super) fn follow_membership(
        &self,
        store: NatsStore,
        mesh: Arc<MeshRuntime>,
        self_id: String,
        shutdown: CancellationToken,
    ) {
        let cache = self.peer_cache_path();
        self.tasks.spawn(async move {
            follow(store, mesh, self_id, cache, shutdown).await;
        });
    }

    /// Target side of a join, step 1.
    pub async fn mesh_join_prepare(&self, network: &str) -> Result<JoinPrepared, ApiError> {
        let network = NetworkName::parse(network).map_err(|error| {
            ApiError::new(ErrorClass::Usage, "invalid_network_name", error.to_string())
        })?;
        let _guard = self.identity_lock.lock().await;
        let keys = self.keys()?;
        let identity = LocalIdentity::load(&self.config.data_dir).map_err(identity_api_error)?;
        let (state, machine_id, cluster_id, network_name) = match identity {
            Some(identity) if identity.network == network => (
                "member",
                identity.machine_id,
                identity.cluster_id,
                identity.network.to_string(),
            ),
            Some(identity) => (
                "other",
                identity.machine_id,
                identity.cluster_id,
                identity.network.to_string(),
            ),
            None => {
                let path = self.config.data_dir.join(PENDING_JOIN_FILE);
                let pending = match read_json::<PendingJoin>(&path) {
                    Some(pending) if pending.network == network => pending,
                    _ => {
                        let pending = PendingJoin {
                            machine_id: LocalIdentity::new_machine_id(),
                            network: network.clone(),
                        };
                        write_json(&path, &pending)?;
                        pending
                    }
                };
                (
                    "fresh",
                    pending.machine_id,
                    String::new(),
                    network.to_string(),
                )
            }
        };
        Ok(JoinPrepared {
            state,
            machine_id,
            network: network_name,
            cluster_id,
            public_key: keys.public_base64(),
            listen_port: self.config.mesh.listen_port,
            hostname: self.hostname.clone(),
        })
    }

    /// Target side of a join, step 2: become the machine the ticket names.
    pub async fn mesh_join(
        &self,
        ticket: &str,
    ) -> Result<(&'static str, String, Ipv6Addr), ApiError> {
        let ticket: JoinTicket = serde_json::from_str(ticket).map_err(|error| {
            ApiError::new(
                ErrorClass::Usage,
                "invalid_join_ticket",
                format!("the join ticket is not valid: {error}"),
            )
        })?;
        let _guard = self.identity_lock.lock().await;
        let existing = LocalIdentity::load(&self.config.data_dir).map_err(identity_api_error)?;
        let outcome = match existing {
            Some(identity)
                if identity.machine_id == ticket.machine_id
                    && identity.cluster_id == ticket.cluster_id =>
            {
                "already_joined"
            }
            Some(identity) => {
                return Err(ApiError::new(
                    ErrorClass::PreconditionFailed,
                    "other_network",
                    format!(
                        "this machine is already {} in network `{}`; remove it from that network first",
                        identity.machine_id, identity.network
                    ),
                ));
            }
            None => {
                let pending =
                    read_json::<PendingJoin>(&self.config.data_dir.join(PENDING_JOIN_FILE));
                if pending.as_ref().map(|p| p.machine_id.as_str())
                    != Some(ticket.machine_id.as_str())
                {
                    return Err(ApiError::new(
                        ErrorClass::PreconditionFailed,
                        "join_ticket_mismatch",
                        format!(
                            "the ticket is for machine {}, but this machine prepared no join under that id; rerun `ployzctl machine add`",
                            ticket.machine_id
                        ),
                    ));
                }
                write_json(&self.peer_cache_path(), &ticket.peers)?;
                let identity = LocalIdentity {
                    machine_id: ticket.machine_id.clone(),
                    network: ticket.network.clone(),
                    cluster_id: ticket.cluster_id.clone(),
                    created_at_unix_ms: now_unix_ms(),
                    mesh: Some(MeshIdentity {
                        prefix: ticket.prefix,
                        subnet: ticket.subnet,
                        routes: ticket.routes.clone(),
                    }),
                };
                identity
                    .store(&self.config.data_dir)
                    .map_err(identity_api_error)?;
                let _ = std::fs::remove_file(self.config.data_dir.join(PENDING_JOIN_FILE));
                tracing::info!(machine = %identity.machine_id, network = %identity.network, "joined: wrote machine identity");
                "joined"
            }
        };
        let identity = LocalIdentity::load(&self.config.data_dir)
            .map_err(identity_api_error)?
            .ok_or_else(|| {
                ApiError::new(
                    ErrorClass::Internal,
                    "identity_vanished",
                    "the identity written a moment ago is gone",
                )
            })?;
        // The overlay and NATS must come up; the store may not answer yet (on
        // the second machine of a network it answers only once the member that
        // admitted this one turned its NATS into a cluster, in `activate`).
        match self.bring_up_within(&identity, JOIN_STORE_WAIT).await {
            Ok(_) | Err(super::BringUpError::Store(_)) => {}
            Err(error) => return Err(super::operations::bring_up_error(error)),
        }
        let address = self
            .mesh_runtime
            .lock()
            .await
            .as_ref()
            .map(|mesh| mesh.overlay_address())
            .ok_or_else(|| {
                ApiError::new(
                    ErrorClass::Internal,
                    "mesh_missing",
                    "the overlay is not up after joining",
                )
            })?;
        Ok((outcome, identity.machine_id.clone(), address))
    }

    /// Member side of a join: claim the new machine's subnet, record it
    /// `joining`, peer with it, and issue its ticket.
    pub async fn machine_admit(
        &self,
        operation: &str,
        machine_id: &str,
        public_key: &str,
        endpoint: &str,
        hostname: &str,
        local_endpoint_ip: &str,
    ) -> Result<Finished<Admitted>, ApiError> {
        let operation = OperationId::parse(operation).map_err(journal_error)?;
        let runtime = self.runtime().await?;
        let request = serde_json::json!({
            "machine_id": machine_id,
            "public_key": public_key,
            "endpoint": endpoint,
            "hostname": hostname,
            "local_endpoint_ip": local_endpoint_ip,
        });
        let run = match runtime
            .journal
            .begin(&operation, "machine_admit", &request)
            .await
            .map_err(journal_error)?
        {
            Begin::Replay(record) => return replay(record),
            Begin::Run(run) => run,
        };
        let admitted = self
            .admit(
                machine_id,
                public_key,
                endpoint,
                hostname,
                local_endpoint_ip,
            )
            .await;
        finish(run, "admit", admitted, |admitted| {
            format!(
                "machine {} {}: subnet {}",
                admitted.machine.id,
                admitted.outcome,
                admitted
                    .machine
                    .mesh
                    .as_ref()
                    .map(|m| m.overlay_address.to_string())
                    .unwrap_or_default()
            )
        })
        .await
    }

    async fn admit(
        &self,
        machine_id: &str,
        public_key: &str,
        endpoint: &str,
        hostname: &str,
        local_endpoint_ip: &str,
    ) -> Result<Admitted, ApiError> {
        let runtime = self.runtime().await?;
        let key = crate::store::Key::from_segments(["machines", machine_id])
            .ok()
            .filter(|_| machine_id.starts_with("m-") && machine_id.len() <= 64)
            .ok_or_else(|| {
                usage(
                    "invalid_machine_id",
                    format!("`{machine_id}` is not a machine id"),
                )
            })?;
        if decode_key(public_key).is_none() {
            return Err(usage(
                "invalid_public_key",
                format!("`{public_key}` is not a WireGuard public key (base64 of 32 bytes)"),
            ));
        }
        let endpoint: SocketAddr = endpoint.parse().map_err(|_| {
            usage(
                "invalid_endpoint",
                format!("`{endpoint}` is not an `ip:port` endpoint"),
            )
        })?;
        let local_ip: Option<IpAddr> = if local_endpoint_ip.is_empty() {
            None
        } else {
            Some(local_endpoint_ip.parse().map_err(|_| {
                usage(
                    "invalid_endpoint",
                    format!("`{local_endpoint_ip}` is not an IP address"),
                )
            })?)
        };
        if machine_id == runtime.identity.machine_id {
            return Err(usage(
                "admit_self",
                "a machine cannot add itself".to_owned(),
            ));
        }
        let store = &runtime.store;
        if let Some(existing) = store.get(&key).await.map_err(store_error)? {
            let record: MachineRecord = existing.decode().map_err(store_error)?;
            let same_key = record.mesh.as_ref().map(|m| m.public_key.as_str()) == Some(public_key);
            if !same_key {
                return Err(ApiError::new(
                    ErrorClass::Conflict,
                    "machine_key_mismatch",
                    format!(
                        "machine {machine_id} is recorded with another WireGuard key; it is not the machine that was admitted"
                    ),
                ));
            }
            if record.membership == Membership::Active {
                return Ok(Admitted {
                    outcome: "already_member".to_owned(),
                    ticket: String::new(),
                    machine: record,
                });
            }
        }
        if let Some(ip) = local_ip {
            self.record_own_endpoint(&runtime, SocketAddr::new(ip, self.config.mesh.listen_port))
                .await?;
        }
        let subnet = claim_subnet(store, runtime.mesh.mesh.prefix, machine_id, now_unix_ms())
            .await
            .map_err(|error| {
                ApiError::new(ErrorClass::Unavailable, "subnet_claim", error_chain(&error))
            })?;
        let record = MachineRecord {
            id: machine_id.to_owned(),
            hostname: hostname.to_owned(),
            network: runtime.identity.network.clone(),
            membership: Membership::Joining,
            joined_at_unix_ms: now_unix_ms(),
            mesh: Some(MachineMesh {
                public_key: public_key.to_owned(),
                endpoint: Some(endpoint),
                subnet: subnet.index(),
                overlay_address: subnet.machine_address(),
            }),
        };
        let record = match store
            .create(&key, encode(&key, &record).map_err(store_error)?)
            .await
        {
            Ok(_) => record,
            Err(crate::store::StoreError::AlreadyExists { .. }) => store
                .get(&key)
                .await
                .map_err(store_error)?
                .ok_or_else(|| {
                    ApiError::new(
                        ErrorClass::Conflict,
                        "record_vanished",
                        "the machine record was deleted while admitting; retry",
                    )
                })?
                .decode()
                .map_err(store_error)?,
            Err(error) => return Err(store_error(error)),
        };
        let members = list_members(store).await?;
        sync_peers(
            store,
            &runtime.mesh,
            &runtime.identity.machine_id,
            &self.peer_cache_path(),
        )
        .await
        .map_err(|error| ApiError::new(ErrorClass::Unavailable, "mesh_peers", error))?;
        let ticket = JoinTicket {
            network: runtime.identity.network.clone(),
            cluster_id: runtime.identity.cluster_id.clone(),
            machine_id: machine_id.to_owned(),
            prefix: runtime.mesh.mesh.prefix,
            subnet: subnet.index(),
            peers: known_peers(machine_id, &members),
            routes: members
                .iter()
                .filter(|m| m.id != machine_id && m.membership == Membership::Active)
                .filter_map(|m| m.mesh.as_ref())
                .map(|mesh| {
                    SocketAddr::new(
                        IpAddr::V6(mesh.overlay_address),
                        self.config.nats.cluster_port,
                    )
                })
                .collect(),
        };
        let ticket = serde_json::to_string(&ticket)
            .map_err(|error| ApiError::new(ErrorClass::Internal, "ticket", error.to_string()))?;
        Ok(Admitted {
            outcome: "admitted".to_owned(),
            ticket,
            machine: record,
        })
    }

    /// Records `endpoint` as this machine's WireGuard endpoint if its record has none.
    async fn record_own_endpoint(
        &self,
        runtime: &super::ClusterRuntime,
        endpoint: SocketAddr,
    ) -> Result<(), ApiError> {
        let key = MachineRecord::key(&runtime.identity.machine_id);
        let Some(found) = runtime.store.get(&key).await.map_err(store_error)? else {
            return Ok(());
        };
        let mut record: MachineRecord = found.decode().map_err(store_error)?;
        let Some(mesh) = record.mesh.as_mut() else {
            return Ok(());
        };
        if mesh.endpoint.is_some() {
            return Ok(());
        }
        mesh.endpoint = Some(endpoint);
        match runtime
            .store
            .update(
                &key,
                encode(&key, &record).map_err(store_error)?,
                found.revision,
            )
            .await
        {
            Ok(_) => {
                tracing::info!(%endpoint, "recorded this machine's WireGuard endpoint");
                Ok(())
            }
            // Someone else recorded one meanwhile: theirs stands.
            Err(error) if error.is_conflict() => Ok(()),
            Err(error) => Err(store_error(error)),
        }
    }

    /// Member side, last step: the machine shook hands and its NATS server
    /// is in the store's cluster: record it `active`, and replicate the
    /// store three ways once there are three machines.
    pub async fn machine_activate(
        &self,
        operation: &str,
        machine_id: &str,
        timeout: Duration,
    ) -> Result<Finished<Activated>, ApiError> {
        let operation = OperationId::parse(operation).map_err(journal_error)?;
        let runtime = self.runtime().await?;
        let timeout = if timeout.is_zero() {
            DEFAULT_ACTIVATE_TIMEOUT
        } else {
            timeout
        };
        let deadline = Instant::now() + timeout;
        let key = crate::store::Key::from_segments(["machines", machine_id]).map_err(|_| {
            usage(
                "invalid_machine_id",
                format!("`{machine_id}` is not a machine id"),
            )
        })?;
        let found = runtime
            .store
            .get(&key)
            .await
            .map_err(store_error)?
            .ok_or_else(|| {
                ApiError::new(
                    ErrorClass::NotFound,
                    "machine_not_found",
                    format!("no machine {machine_id} in this network"),
                )
            })?;
        let record: MachineRecord = found.decode().map_err(store_error)?;
        let peer_key = record
            .mesh
            .as_ref()
            .and_then(|mesh| decode_key(&mesh.public_key))
            .ok_or_else(|| {
                ApiError::new(
                    ErrorClass::PreconditionFailed,
                    "machine_without_mesh",
                    format!("machine {machine_id} has no WireGuard key recorded"),
                )
            })?;

        // The handshake: proof that both tunnels know each other.
        let handshake = loop {
            let snapshot = wg::get(&runtime.mesh.socket()).await.map_err(|error| {
                ApiError::new(
                    ErrorClass::Unavailable,
                    "tunnel_unavailable",
                    error_chain(&error),
                )
            })?;
            if let Some(at) = handshake_of(&snapshot, &peer_key) {
                break at;
            }
            if Instant::now() >= deadline {
                return Err(ApiError::new(
                    ErrorClass::Unavailable,
                    "handshake_timeout",
                    format!(
                        "machine {machine_id} did not complete a WireGuard handshake within {timeout:?}; check that UDP port {} is open between the machines",
                        self.config.mesh.listen_port
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };

        // Its NATS server joined the store's cluster. A machine whose NATS
        // still runs standalone (the network's only machine so far) turns it
        // into a cluster with the new machine now: the new server makes the
        // quorum, so the store answering again proves it joined.
        let mut runtime = runtime;
        if runtime
            .identity
            .mesh
            .as_ref()
            .is_some_and(|mesh| mesh.routes.is_empty())
        {
            let route = record
                .mesh
                .as_ref()
                .map(|mesh| {
                    SocketAddr::new(
                        IpAddr::V6(mesh.overlay_address),
                        self.config.nats.cluster_port,
                    )
                })
                .ok_or_else(|| {
                    ApiError::new(
                        ErrorClass::PreconditionFailed,
                        "machine_without_mesh",
                        format!("machine {machine_id} has no overlay address recorded"),
                    )
                })?;
            runtime = self.cluster_store(runtime, route, deadline).await?;
        }
        // Recorded from here: the store the operation is recorded in is the
        // one that stays (turning NATS into a cluster moved it).
        let request = serde_json::json!({ "machine_id": machine_id });
        let mut run = match runtime
            .journal
            .begin(&operation, "machine_activate", &request)
            .await
            .map_err(journal_error)?
        {
            Begin::Replay(record) => return replay(record),
            Begin::Run(run) => run,
        };
        let _ = run
            .step(
                "handshake",
                StepStatus::Done,
                format!("handshake at {} ms", handshake.as_millis()),
            )
            .await;
        let activated = self
            .activate_member(&runtime, &key, machine_id, handshake, deadline, timeout)
            .await;
        finish(run, "activate", activated, |activated| {
            format!(
                "machine {} {}; store: {} servers, {} replicas",
                activated.machine.id,
                activated.outcome,
                activated.store_servers,
                activated.store_replicas
            )
        })
        .await
    }

    async fn activate_member(
        &self,
        runtime: &super::ClusterRuntime,
        key: &crate::store::Key,
        machine_id: &str,
        handshake: Duration,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Activated, ApiError> {
        let key = key.clone();
        let store = &runtime.store;
        let members = list_members(store).await?;
        let servers = members
            .iter()
            .filter(|m| m.membership == Membership::Active || m.id == machine_id)
            .count();
        let mut replicas = store.replicas().await.map_err(store_error)?;
        if servers >= STORE_REPLICAS && replicas < STORE_REPLICAS {
            // Placing three replicas needs three servers in the cluster:
            // success proves the new machine's server joined.
            loop {
                match store.set_replicas(STORE_REPLICAS).await {
                    Ok(()) => {
                        replicas = STORE_REPLICAS;
                        tracing::info!(replicas, "store replicated across machines");
                        break;
                    }
                    Err(error) if Instant::now() < deadline => {
                        tracing::debug!(error = %error_chain(&error), "store not ready for more replicas yet");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    Err(error) => {
                        return Err(ApiError::new(
                            ErrorClass::Unavailable,
                            "store_join_timeout",
                            format!(
                                "machine {machine_id}'s NATS did not join the store's cluster within {timeout:?}: {}",
                                error_chain(&error)
                            ),
                        ));
                    }
                }
            }
        }

        // Right after the store changed its replicas its streams elect
        // leaders: a write may time out meanwhile, so retry until the deadline.
        let (outcome, record) = loop {
            let attempt =
                async {
                    let found = store.get(&key).await?.ok_or_else(|| {
                        crate::store::StoreError::Backend {
                            context: format!("machine {machine_id}'s record vanished"),
                            source: None,
                        }
                    })?;
                    let mut current: MachineRecord = found.decode()?;
                    if current.membership == Membership::Active {
                        return Ok(("already_active", current));
                    }
                    current.membership = Membership::Active;
                    store
                        .update(&key, encode(&key, &current)?, found.revision)
                        .await?;
                    Ok::<_, crate::store::StoreError>(("activated", current))
                };
            match attempt.await {
                Ok((outcome, current)) => break (outcome, current),
                Err(error)
                    if (error.is_retryable() || error.is_conflict())
                        && Instant::now() < deadline =>
                {
                    tracing::debug!(error = %error_chain(&error), "membership write not accepted yet; retrying");
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                Err(error) => return Err(store_error(error)),
            }
        };
        Ok(Activated {
            outcome: outcome.to_owned(),
            machine: record,
            handshake_unix_ms: u64::try_from(handshake.as_millis()).unwrap_or(u64::MAX),
            store_servers: servers,
            store_replicas: replicas,
        })
    }

    /// Turns this machine's standalone NATS into a cluster with the server at
    /// `route`. JetStream cannot adopt a standalone server's streams into a
    /// cluster, so the store moves: everything is exported (and written to
    /// `nats/standalone-export-<ms>.json`), the standalone JetStream directory
    /// is set aside (never deleted), NATS restarts clustered, and the export
    /// is imported once the cluster has a quorum. If the cluster does not form
    /// in time, the standalone server comes back as it was.
    async fn cluster_store(
        &self,
        runtime: Arc<super::ClusterRuntime>,
        route: SocketAddr,
        deadline: Instant,
    ) -> Result<Arc<super::ClusterRuntime>, ApiError> {
        let _guard = self.identity_lock.lock().await;
        tracing::info!(%route, "turning this machine's NATS into a cluster with the new machine");
        let export = runtime.store.export().await.map_err(store_error)?;
        let nats_dir = self.config.data_dir.join("nats");
        let stamp = now_unix_ms();
        let export_path = nats_dir.join(format!("standalone-export-{stamp}.json"));
        write_json(&export_path, &export)?;
        // Until the import is done, a restarted daemon must finish it: the
        // marker names the export to import into the new store.
        write_json(
            &self.pending_import_path(),
            &PendingImport {
                export: export_path,
            },
        )?;
        let standalone = runtime.identity.clone();
        let mut clustered = standalone.clone();
        if let Some(mesh) = clustered.mesh.as_mut() {
            mesh.routes = vec![route];
        }

        // Stop serving from the standalone store.
        runtime.follower.cancel();
        *self.cluster.write().await = super::ClusterState::Degraded {
            identity: standalone.clone(),
            reason: "turning NATS into a cluster with a joining machine".to_owned(),
        };
        let internal = |code: &'static str, message: String| {
            ApiError::new(ErrorClass::Internal, code, message)
        };
        runtime
            .nats
            .stop()
            .await
            .map_err(|error| internal("nats_stop", error_chain(&error)))?;
        *self.nats_sidecar.lock().await = None;
        let store_dir = nats_dir.join("jetstream");
        let aside = nats_dir.join(format!("jetstream.standalone-{stamp}"));
        if store_dir.exists() {
            std::fs::rename(&store_dir, &aside).map_err(|error| {
                internal(
                    "nats_store_move",
                    format!("cannot set {} aside: {error}", store_dir.display()),
                )
            })?;
        }
        clustered
            .store(&self.config.data_dir)
            .map_err(identity_api_error)?;

        let attempt = async {
            let sidecars = self
                .bring_up_sidecars(&clustered)
                .await
                .map_err(super::operations::bring_up_error)?;
            let wait = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_secs(10));
            // `connect_store` imports the export the marker names before
            // anything reads the new store.
            self.connect_store(&sidecars, wait)
                .await
                .map_err(super::operations::bring_up_error)
        };
        match attempt.await {
            Ok(runtime) => Ok(runtime),
            Err(error) => {
                tracing::error!(error = %error.message, "the cluster did not form; going back to the standalone store");
                if let Some(nats) = self.nats_sidecar.lock().await.take() {
                    let _ = nats.stop().await;
                }
                if store_dir.exists() {
                    let failed = nats_dir.join(format!("jetstream.cluster-failed-{stamp}"));
                    let _ = std::fs::rename(&store_dir, failed);
                }
                if aside.exists() {
                    let _ = std::fs::rename(&aside, &store_dir);
                }
                let _ = std::fs::remove_file(self.pending_import_path());
                standalone
                    .store(&self.config.data_dir)
                    .map_err(identity_api_error)?;
                let _ = self.bring_up(&standalone).await;
                Err(ApiError::new(
                    ErrorClass::Unavailable,
                    "store_cluster_failed",
                    format!(
                        "the new machine's NATS did not form a cluster with this one: {}; this machine's store is back as it was",
                        error.message
                    ),
                ))
            }
        }
    }

    /// `mesh status`: the tunnel's view of every peer, observed now.
    pub async fn mesh_status(&self) -> Result<MeshView, ApiError> {
        let runtime = self.runtime().await?;
        let snapshot = wg::get(&runtime.mesh.socket()).await.map_err(|error| {
            ApiError::new(
                ErrorClass::Unavailable,
                "tunnel_unavailable",
                error_chain(&error),
            )
        })?;
        let members = list_members(&runtime.store).await.unwrap_or_default();
        let mut peers = Vec::new();
        let probes = snapshot.peers.iter().map(|peer| {
            let record = members
                .iter()
                .find(|m| {
                    m.mesh
                        .as_ref()
                        .and_then(|mesh| decode_key(&mesh.public_key))
                        == Some(peer.public_key)
                })
                .cloned();
            let port = self.config.nats.cluster_port;
            async move {
                let observed = match &record {
                    Some(record) => observe(record, port).await,
                    None if peer.last_handshake.is_some() => "stranger",
                    None => "never",
                };
                (record, observed)
            }
        });
        let observed = futures::future::join_all(probes).await;
        for (peer, (record, observed)) in snapshot.peers.iter().zip(observed) {
            let observed = if peer.last_handshake.is_none() && observed != "reachable" {
                "never"
            } else {
                observed
            };
            peers.push(PeerView {
                record,
                snapshot: peer.clone(),
                observed,
            });
        }
        Ok(MeshView {
            network: runtime.identity.network.to_string(),
            interface: self.config.mesh.interface.clone(),
            public_key: runtime.mesh.spec.keys.public_base64(),
            listen_port: snapshot.listen_port,
            overlay_address: runtime.mesh.overlay_address(),
            subnet: format!(
                "{}/{}",
                runtime.mesh.spec.subnet.base(),
                crate::mesh::addressing::Subnet::PREFIX_LEN
            ),
            prefix: format!(
                "{}/{}",
                runtime.mesh.mesh.prefix.base(),
                OverlayPrefix::PREFIX_LEN
            ),
            tunnel: format!("{:?}", runtime.mesh.tunnel.status()),
            peers,
        })
    }

    /// One line on the overlay for `status`: whether the tunnel runs, and
    /// what it carries, asked now.
    pub async fn mesh_summary(&self) -> (bool, String) {
        let Some(mesh) = self.mesh_runtime.lock().await.clone() else {
            return (
                false,
                "not started: this machine has no network yet".to_owned(),
            );
        };
        let status = mesh.tunnel.status();
        let running = status.state == crate::services::SidecarState::Running;
        let peers = match tokio::time::timeout(PROBE_TIMEOUT, wg::get(&mesh.socket())).await {
            Ok(Ok(snapshot)) => {
                let shaken = snapshot
                    .peers
                    .iter()
                    .filter(|peer| peer.last_handshake.is_some())
                    .count();
                format!(
                    "{} peer(s), {shaken} with a handshake",
                    snapshot.peers.len()
                )
            }
            Ok(Err(error)) => format!("tunnel does not answer: {}", error_chain(&error)),
            Err(_) => format!("tunnel does not answer within {PROBE_TIMEOUT:?}"),
        };
        (
            running,
            format!(
                "ployz-tunnel pid {} ({}) on {} port {}; overlay {} in {}/{}; {peers}",
                status.pid.unwrap_or(0),
                status.origin.kind(),
                mesh.spec.interface,
                mesh.spec.listen_port,
                mesh.overlay_address(),
                mesh.spec.subnet.base(),
                crate::mesh::addressing::Subnet::PREFIX_LEN,
            ),
        )
    }

    /// Live reachability of every member, for `machine ls`.
    pub(super) async fn observe_machines(
        &self,
        records: &[MachineRecord],
        self_id: &str,
    ) -> Vec<&'static str> {
        let port = self.config.nats.cluster_port;
        futures::future::join_all(records.iter().map(|record| async move {
            if record.id == self_id {
                "self"
            } else {
                observe(record, port).await
            }
        }))
        .await
    }
}

/// Records `result` as the operation's last step and its outcome.
async fn finish<T: Serialize>(
    mut run: OperationRun<NatsStore>,
    step: &str,
    result: Result<T, ApiError>,
    detail: impl FnOnce(&T) -> String,
) -> Result<Finished<T>, ApiError> {
    match result {
        Ok(value) => {
            run.step(step, StepStatus::Done, detail(&value))
                .await
                .map_err(journal_error)?;
            let record = run.succeed(&value).await.map_err(journal_error)?;
            Ok(Finished {
                record,
                result: value,
                replayed: false,
            })
        }
        Err(error) => {
            if let Err(journal) = run.fail(recorded(&error)).await {
                tracing::warn!(error = %error_chain(&journal), "cannot record the operation's failure");
            }
            Err(error)
        }
    }
}

/// `reachable` when the machine's overlay address accepts (or refuses) a TCP
/// connection to its NATS cluster port within a second: either answer means
/// packets crossed the tunnel both ways. `unreachable` on silence.
async fn observe(record: &MachineRecord, port: u16) -> &'static str {
    let Some(mesh) = &record.mesh else {
        return "unknown";
    };
    let target = SocketAddr::new(IpAddr::V6(mesh.overlay_address), port);
    match tokio::time::timeout(PROBE_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(_)) => "reachable",
        Ok(Err(error)) if error.kind() == std::io::ErrorKind::ConnectionRefused => "reachable",
        Ok(Err(_)) | Err(_) => "unreachable",
    }
}

fn handshake_of(snapshot: &DeviceSnapshot, key: &Key) -> Option<Duration> {
    snapshot
        .peers
        .iter()
        .find(|peer| &peer.public_key == key)
        .and_then(|peer| peer.last_handshake)
}

async fn list_members(store: &NatsStore) -> Result<Vec<MachineRecord>, ApiError> {
    store
        .list(&MachineRecord::prefix())
        .await
        .map_err(store_error)?
        .iter()
        .map(|record| record.decode::<MachineRecord>().map_err(store_error))
        .collect()
}

/// Every member but `self_id` that has mesh facts.
fn known_peers(self_id: &str, members: &[MachineRecord]) -> Vec<KnownPeer> {
    members
        .iter()
        .filter(|member| member.id != self_id)
        .filter_map(|member| {
            let mesh = member.mesh.as_ref()?;
            Some(KnownPeer {
                machine_id: member.id.clone(),
                public_key: mesh.public_key.clone(),
                endpoint: mesh.endpoint,
                subnet: mesh.subnet,
            })
        })
        .collect()
}

fn peer_specs(prefix: OverlayPrefix, peers: &[KnownPeer]) -> Vec<PeerSpec> {
    peers
        .iter()
        .filter_map(|peer| {
            Some(PeerSpec {
                public_key: decode_key(&peer.public_key)?,
                endpoint: peer.endpoint,
                subnet: prefix.subnet(peer.subnet),
            })
        })
        .collect()
}

/// Applies the membership records to the tunnel and caches them on disk.
async fn sync_peers(
    store: &NatsStore,
    mesh: &MeshRuntime,
    self_id: &str,
    cache: &std::path::Path,
) -> Result<(), String> {
    let members = list_members(store).await.map_err(|error| error.message)?;
    if !members.iter().any(|member| member.id == self_id) {
        // A store that does not list this machine is not (yet) this
        // network's: never tear the overlay down on its word.
        return Err(
            "the store does not list this machine; overlay peers left as they are".to_owned(),
        );
    }
    let peers = known_peers(self_id, &members);
    let changes = overlay::apply_peers(&mesh.socket(), &peer_specs(mesh.mesh.prefix, &peers))
        .await
        .map_err(|error| error_chain(&error))?;
    if changes != overlay::PeerChanges::default() {
        tracing::info!(
            added = changes.added,
            updated = changes.updated,
            removed = changes.removed,
            "overlay peers follow membership"
        );
    }
    if read_peer_cache(cache) != peers {
        write_json(cache, &peers).map_err(|error| error.message)?;
    }
    Ok(())
}

async fn follow(
    store: NatsStore,
    mesh: Arc<MeshRuntime>,
    self_id: String,
    cache: PathBuf,
    shutdown: CancellationToken,
) {
    let mut tunnel = mesh.tunnel.watch_status();
    let mut tunnel_pid = tunnel.borrow().pid;
    loop {
        let mut watch = match store.watch(&MachineRecord::prefix()).await {
            Ok(watch) => watch,
            Err(error) => {
                tracing::debug!(error = %error_chain(&error), "cannot watch membership yet");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        if let Err(error) = sync_peers(&store, &mesh, &self_id, &cache).await {
            tracing::warn!(%error, "cannot apply membership to the overlay");
        }
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                event = watch.next() => match event {
                    Some(Ok(_)) => {
                        if let Err(error) = sync_peers(&store, &mesh, &self_id, &cache).await {
                            tracing::warn!(%error, "cannot apply membership to the overlay");
                        }
                    }
                    Some(Err(_)) | None => break,
                },
                changed = tunnel.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let pid = tunnel.borrow().pid;
                    if pid.is_some() && pid != tunnel_pid {
                        tunnel_pid = pid;
                        tracing::info!(?pid, "tunnel restarted: restoring its device and peers");
                        if let Err(error) = overlay::configure_device(&mesh.spec).await {
                            tracing::warn!(error = %error_chain(&error), "cannot configure the restarted tunnel");
                        }
                        let cached = read_peer_cache(&cache);
                        if let Err(error) = overlay::apply_peers(&mesh.socket(), &peer_specs(mesh.mesh.prefix, &cached)).await {
                            tracing::warn!(error = %error_chain(&error), "cannot restore the tunnel's peers");
                        }
                    }
                }
            }
        }
    }
}

fn read_peer_cache(path: &std::path::Path) -> Vec<KnownPeer> {
    read_json(path).unwrap_or_default()
}

fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Option<T> {
    let bytes = std::fs::read(path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(value) => Some(value),
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "ignoring an unreadable file");
            None
        }
    }
}

fn write_json<T: Serialize>(path: &std::path::Path, value: &T) -> Result<(), ApiError> {
    let bytes = serde_json::to_vec_pretty(value)
        .map_err(|error| ApiError::new(ErrorClass::Internal, "encode", error.to_string()))?;
    write_atomically(path, &bytes).map_err(|error| {
        ApiError::new(
            ErrorClass::Internal,
            "write_file",
            format!("cannot write {}: {error}", path.display()),
        )
    })
}

/// Writes `bytes` to a temporary file beside `path`, fsyncs it and renames it
/// into place, mode 0600.
fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Unique: the membership follower and a request may write at once.
    let temporary = dir.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)?;
    std::fs::File::open(dir)?.sync_all()
}

fn usage(code: &'static str, message: String) -> ApiError {
    ApiError::new(ErrorClass::Usage, code, message)
}

fn identity_api_error(error: crate::machine::IdentityError) -> ApiError {
    ApiError::new(ErrorClass::Internal, "identity", error_chain(&error))
}

/// Why the overlay could not come up.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct MeshError(String);

/// The public key in the form `wg` prints, for API answers.
pub fn public_key_text(key: &Key) -> String {
    encode_key(&key.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str, index: u16, membership: Membership) -> MachineRecord {
        let prefix: OverlayPrefix = "fd12:3456:789a::/48".parse().expect("prefix");
        let subnet = prefix.subnet(SubnetIndex::new(index).expect("index"));
        MachineRecord {
            id: id.to_owned(),
            hostname: format!("host-{index}"),
            network: NetworkName::parse("prod").expect("name"),
            membership,
            joined_at_unix_ms: 1,
            mesh: Some(MachineMesh {
                public_key: encode_key(&[u8::try_from(index).unwrap_or(0); 32]),
                endpoint: Some(SocketAddr::from(([10, 0, 0, 1], 51820))),
                subnet: subnet.index(),
                overlay_address: subnet.machine_address(),
            }),
        }
    }

    #[test]
    fn peers_are_every_other_member_with_mesh_facts() {
        let mut legacy = member("m-3", 3, Membership::Active);
        legacy.mesh = None;
        let members = [
            member("m-1", 1, Membership::Active),
            member("m-2", 2, Membership::Joining),
            legacy,
        ];
        let peers = known_peers("m-1", &members);
        assert_eq!(
            peers.len(),
            1,
            "itself and a member without mesh facts are left out"
        );
        assert_eq!(peers[0].machine_id, "m-2");
        let prefix: OverlayPrefix = "fd12:3456:789a::/48".parse().expect("prefix");
        let specs = peer_specs(prefix, &peers);
        assert_eq!(specs.len(), 1);
        assert_eq!(
            specs[0].subnet.machine_address().to_string(),
            "fd12:3456:789a:2::1"
        );
    }

    #[test]
    fn a_peer_with_an_unreadable_key_is_skipped_not_applied() {
        let peers = [KnownPeer {
            machine_id: "m-9".to_owned(),
            public_key: "not base64!".to_owned(),
            endpoint: None,
            subnet: SubnetIndex::new(9).expect("index"),
        }];
        let prefix: OverlayPrefix = "fd12:3456:789a::/48".parse().expect("prefix");
        assert!(peer_specs(prefix, &peers).is_empty());
    }

    #[test]
    fn a_ticket_round_trips_and_unknown_fields_are_refused() {
        let ticket = JoinTicket {
            network: NetworkName::parse("prod").expect("name"),
            cluster_id: "c-1".to_owned(),
            machine_id: "m-2".to_owned(),
            prefix: "fd12:3456:789a::/48".parse().expect("prefix"),
            subnet: SubnetIndex::new(2).expect("index"),
            peers: known_peers("m-2", &[member("m-1", 1, Membership::Active)]),
            routes: vec!["[fd12:3456:789a:1::1]:4723".parse().expect("route")],
        };
        let text = serde_json::to_string(&ticket).expect("encode");
        assert_eq!(
            serde_json::from_str::<JoinTicket>(&text).expect("decode"),
            ticket
        );
        let tampered = text.replacen('{', "{\"extra\":1,", 1);
        assert!(serde_json::from_str::<JoinTicket>(&tampered).is_err());
    }
}
