//! Joining a network, both halves. On the machine being added (driven by
//! `ployzctl machine add` over SSH): `MeshJoinPrepare` (its id and key) and
//! `MeshJoin` (become the machine the ticket names). On the member that adds
//! it: `MachineAdmit` (claim its subnet, record it `joining`, issue the
//! ticket) and `MachineActivate` (wait for the handshake, bring its NATS into
//! the store's cluster, record it `active`). The second machine of a network
//! turns the first one's standalone NATS into a cluster, which moves the
//! store (`cluster_store`).

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use ployz_api::{ApiError, ErrorClass};
use serde::{Deserialize, Serialize};

use super::{
    Daemon,
    mesh::{
        KnownPeer, identity_api_error, known_peers, list_members, read_json, sync_peers, usage,
        write_json,
    },
    operations::{Finished, journal_error, recorded, replay, store_error},
};
use crate::{
    coordination::{Begin, OperationId, OperationRun, StepStatus},
    error_chain,
    machine::{
        LocalIdentity, MachineRecord, Membership, NetworkName,
        identity::{LeafIdentity, MeshIdentity, NatsPassword},
        records::{MachineMesh, RouteCertificateRecord, StoreRole},
    },
    mesh::{
        addressing::{OverlayPrefix, SubnetIndex, claim_subnet},
        boringtun::{DeviceSnapshot, Key},
        overlay::decode_key,
        wg,
    },
    store::{RecordStore, encode, nats::NatsStore},
    time::now_unix_ms,
};

/// A machine between `MeshJoinPrepare` and `MeshJoin`: the id it will use.
const PENDING_JOIN_FILE: &str = "join.json";
/// A store move whose import has not finished.
const PENDING_IMPORT_FILE: &str = "nats/pending-import.json";
/// How long `MachineActivate` waits unless told otherwise.
const DEFAULT_ACTIVATE_TIMEOUT: Duration = Duration::from_secs(60);
/// The store replicates every record to this many machines once it can.
const STORE_REPLICAS: usize = 3;
/// How long `MeshJoin` waits for the store before answering.
const JOIN_STORE_WAIT: Duration = Duration::from_secs(3);

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
    /// The network's route credential, which the new server presents and
    /// requires; it travels only in the ticket, over SSH. Only core machines
    /// get it.
    #[serde(default)]
    pub route_secret: Option<String>,
    /// For a machine joining as a leaf of the store: the core servers' leaf
    /// listeners and its own password there. `None` for a core machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leaf: Option<LeafIdentity>,
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

/// `MeshJoin`'s answer.
pub struct Joined {
    pub outcome: &'static str,
    pub machine_id: String,
    pub address: Ipv6Addr,
    /// A core machine's route certificate, for the member that activates it.
    pub route_certificate: Option<RouteCertificateRecord>,
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

impl Daemon {
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
    pub async fn mesh_join(&self, ticket: &str) -> Result<Joined, ApiError> {
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
                        route_secret: ticket.route_secret.clone(),
                        leaf: ticket.leaf.clone(),
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
        let mesh = self.mesh_runtime.lock().await.clone().ok_or_else(|| {
            ApiError::new(
                ErrorClass::Internal,
                "mesh_missing",
                "the overlay is not up after joining",
            )
        })?;
        let route_certificate = self
            .route_certificate(&identity, &mesh)
            .map_err(super::operations::bring_up_error)?
            .map(|certificate| RouteCertificateRecord {
                pem: certificate.certificate_pem,
                pin: certificate.pin,
            });
        Ok(Joined {
            outcome,
            machine_id: identity.machine_id.clone(),
            address: mesh.overlay_address(),
            route_certificate,
        })
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
        // The operation record keeps the ticket without its secrets (anyone
        // who lists operations reads records); the answer has them.
        let mesh = runtime.identity.mesh.as_ref();
        let run = match runtime
            .journal
            .begin(&operation, "machine_admit", &request)
            .await
            .map_err(journal_error)?
        {
            Begin::Replay(record) => {
                let mut finished: Finished<Admitted> = replay(record)?;
                finished.result.ticket = with_secrets(&finished.result.ticket, mesh)?;
                return Ok(finished);
            }
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
            .await
            .and_then(|mut admitted| {
                admitted.ticket = with_secrets(&admitted.ticket, None)?;
                Ok(admitted)
            });
        let mut finished = finish(run, "admit", admitted, |admitted| {
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
        .await?;
        finished.result.ticket = with_secrets(&finished.result.ticket, mesh)?;
        Ok(finished)
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
        // The first three machines are the store's core; every later one
        // joins as a leaf, admitted by a user derived from the route secret
        // (which only core machines hold, so only they can add machines
        // once the core is full).
        let members = list_members(store).await?;
        let cores = members
            .iter()
            .filter(|member| member.id != machine_id && member.store_role == StoreRole::Core)
            .count();
        let store_role = if cores >= STORE_REPLICAS {
            if runtime
                .identity
                .mesh
                .as_ref()
                .and_then(|mesh| mesh.route_secret.as_ref())
                .is_none()
            {
                let core: Vec<&str> = members
                    .iter()
                    .filter(|member| member.store_role == StoreRole::Core)
                    .map(|member| member.id.as_str())
                    .collect();
                return Err(ApiError::new(
                    ErrorClass::PreconditionFailed,
                    "not_a_core_machine",
                    format!(
                        "this machine is a leaf of the store and cannot admit machines; run `ployzctl machine add` on a core machine ({})",
                        core.join(", ")
                    ),
                ));
            }
            StoreRole::Leaf
        } else {
            StoreRole::Core
        };
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
            store_role,
            route_certificate: None,
        };
        let record: MachineRecord = match store
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
        // The ticket carries the core machines' route certificates; the
        // founding machine's record gets its own here, the first time it
        // admits a machine (its record is written after its store starts).
        self.publish_route_certificate(store, &runtime.identity, &runtime.mesh)
            .await;
        let members = list_members(store).await?;
        let peers = sync_peers(
            store,
            &runtime.mesh,
            &runtime.identity.machine_id,
            &self.peer_cache_path(),
        )
        .await
        .map_err(|error| ApiError::new(ErrorClass::Unavailable, "mesh_peers", error))?;
        // This machine's server admits a new leaf at once; the other core
        // servers follow the record.
        if let Some(hub) = super::NatsMembers::for_sidecar(&runtime.identity, &runtime.nats) {
            hub.apply(&peers);
        }
        let active_cores = || {
            members
                .iter()
                .filter(|m| m.id != machine_id && m.membership == Membership::Active)
                .filter(|m| m.store_role == StoreRole::Core)
                .filter_map(|m| m.mesh.as_ref())
                .map(|mesh| IpAddr::V6(mesh.overlay_address))
        };
        let (routes, leaf) = match record.store_role {
            StoreRole::Core => (
                active_cores()
                    .map(|address| SocketAddr::new(address, self.config.nats.cluster_port))
                    .collect(),
                None,
            ),
            StoreRole::Leaf => (
                Vec::new(),
                Some(LeafIdentity {
                    hubs: active_cores()
                        .map(|address| SocketAddr::new(address, self.config.nats.leaf_port))
                        .collect(),
                    // Filled in by `with_secrets` below, never recorded.
                    password: String::new(),
                }),
            ),
        };
        let ticket = JoinTicket {
            network: runtime.identity.network.clone(),
            cluster_id: runtime.identity.cluster_id.clone(),
            machine_id: machine_id.to_owned(),
            prefix: runtime.mesh.mesh.prefix,
            subnet: subnet.index(),
            peers: known_peers(machine_id, &members),
            routes,
            route_secret: None,
            leaf,
        };
        let ticket = serde_json::to_string(&ticket)
            .map_err(|error| ApiError::new(ErrorClass::Internal, "ticket", error.to_string()))?;
        let ticket = with_secrets(&ticket, runtime.identity.mesh.as_ref())?;
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
        route_certificate: Option<RouteCertificateRecord>,
    ) -> Result<Finished<Activated>, ApiError> {
        let operation = OperationId::parse(operation).map_err(journal_error)?;
        if let Some(certificate) = &route_certificate {
            let pin_ok = certificate.pin.len() == 64
                && certificate.pin.chars().all(|c| c.is_ascii_hexdigit());
            let pem = certificate.pem.trim();
            if !pin_ok
                || !pem.starts_with("-----BEGIN CERTIFICATE-----")
                || !pem.ends_with("-----END CERTIFICATE-----")
            {
                return Err(usage(
                    "invalid_route_certificate",
                    "the route certificate is not one PEM certificate with a hex SHA-256 pin"
                        .to_owned(),
                ));
            }
        }
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

        // A core machine's route certificate goes into its record, where
        // every core server reads it to trust and pin it; this one does so now.
        if let Some(certificate) = &route_certificate
            && record.store_role == StoreRole::Core
        {
            super::record_route_certificate(&runtime.store, machine_id, certificate)
                .await
                .map_err(store_error)?;
            let peers = sync_peers(
                &runtime.store,
                &runtime.mesh,
                &runtime.identity.machine_id,
                &self.peer_cache_path(),
            )
            .await
            .map_err(|error| ApiError::new(ErrorClass::Unavailable, "mesh_peers", error))?;
            if let Some(members) = super::NatsMembers::for_sidecar(&runtime.identity, &runtime.nats)
            {
                members.apply(&peers);
            }
        }

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
        let role = members
            .iter()
            .find(|m| m.id == machine_id)
            .map(|m| m.store_role)
            .unwrap_or_default();
        let servers = members
            .iter()
            .filter(|m| m.store_role == StoreRole::Core)
            .filter(|m| m.membership == Membership::Active || m.id == machine_id)
            .count();
        let mut replicas = store.replicas().await.map_err(store_error)?;
        if role == StoreRole::Leaf {
            self.wait_for_leaf(runtime, machine_id, deadline, timeout)
                .await?;
        } else if servers >= STORE_REPLICAS && replicas < STORE_REPLICAS {
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

    /// Waits until machine `machine_id`'s leaf server is connected to a core
    /// server: proof that it was admitted and reaches the store.
    async fn wait_for_leaf(
        &self,
        runtime: &super::ClusterRuntime,
        machine_id: &str,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(), ApiError> {
        let system = super::system_credentials(&runtime.identity).ok_or_else(|| {
            ApiError::new(
                ErrorClass::PreconditionFailed,
                "not_a_core_machine",
                "only a core machine of the store can activate a leaf machine",
            )
        })?;
        let url = runtime.nats.client_url();
        loop {
            let last = match crate::store::nats::connected_leaves(
                &url,
                &system,
                Duration::from_millis(500),
            )
            .await
            {
                Ok(leaves) if leaves.iter().any(|leaf| leaf == machine_id) => return Ok(()),
                Ok(leaves) => format!("connected leaf servers: {leaves:?}"),
                Err(error) => error_chain(&error),
            };
            if Instant::now() >= deadline {
                return Err(ApiError::new(
                    ErrorClass::Unavailable,
                    "leaf_join_timeout",
                    format!(
                        "machine {machine_id}'s NATS leaf server did not connect to a core server within {timeout:?} ({last}); check that TCP port {} is open on the overlay",
                        self.config.nats.leaf_port
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
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
            identity: Box::new(standalone.clone()),
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
}

/// `ticket` (JSON; empty when none was issued) with its secrets taken from
/// `mesh`: the route secret for a core machine, its own password for a leaf
/// machine. Without `mesh`, with none (as operation records keep tickets).
fn with_secrets(ticket: &str, mesh: Option<&MeshIdentity>) -> Result<String, ApiError> {
    if ticket.is_empty() {
        return Ok(String::new());
    }
    let broken = |error: serde_json::Error| {
        ApiError::new(
            ErrorClass::Internal,
            "ticket",
            format!("a join ticket: {error}"),
        )
    };
    let mut parsed: JoinTicket = serde_json::from_str(ticket).map_err(broken)?;
    match parsed.leaf.as_mut() {
        Some(leaf) => {
            parsed.route_secret = None;
            leaf.password = mesh
                .and_then(|mesh| mesh.nats_password(NatsPassword::Leaf, &parsed.machine_id))
                .unwrap_or_default();
        }
        None => parsed.route_secret = mesh.and_then(|mesh| mesh.route_secret.clone()),
    }
    serde_json::to_string(&parsed).map_err(broken)
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

fn handshake_of(snapshot: &DeviceSnapshot, key: &Key) -> Option<Duration> {
    snapshot
        .peers
        .iter()
        .find(|peer| &peer.public_key == key)
        .and_then(|peer| peer.last_handshake)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::mesh::tests::member;

    fn ticket() -> JoinTicket {
        JoinTicket {
            network: NetworkName::parse("prod").expect("name"),
            cluster_id: "c-1".to_owned(),
            machine_id: "m-2".to_owned(),
            prefix: "fd12:3456:789a::/48".parse().expect("prefix"),
            subnet: SubnetIndex::new(2).expect("index"),
            peers: known_peers("m-2", &[member("m-1", 1, Membership::Active)]),
            routes: vec!["[fd12:3456:789a:1::1]:4723".parse().expect("route")],
            route_secret: Some("c0ffee".to_owned()),
            leaf: None,
        }
    }

    #[test]
    fn a_ticket_round_trips_and_unknown_fields_are_refused() {
        let ticket = ticket();
        let text = serde_json::to_string(&ticket).expect("encode");
        assert_eq!(
            serde_json::from_str::<JoinTicket>(&text).expect("decode"),
            ticket
        );
        let tampered = text.replacen('{', "{\"extra\":1,", 1);
        assert!(serde_json::from_str::<JoinTicket>(&tampered).is_err());
    }

    fn mesh() -> MeshIdentity {
        MeshIdentity {
            prefix: "fd12:3456:789a::/48".parse().expect("prefix"),
            subnet: SubnetIndex::new(1).expect("index"),
            routes: Vec::new(),
            route_secret: Some("c0ffee".to_owned()),
            leaf: None,
        }
    }

    #[test]
    fn a_recorded_ticket_drops_the_route_secret_and_a_replay_restores_it() {
        let ticket = ticket();
        let text = serde_json::to_string(&ticket).expect("encode");
        let recorded = with_secrets(&text, None).expect("redacted");
        assert!(!recorded.contains("c0ffee"), "{recorded}");
        let replayed = with_secrets(&recorded, Some(&mesh())).expect("restored");
        assert_eq!(
            serde_json::from_str::<JoinTicket>(&replayed).expect("decode"),
            ticket
        );
        assert_eq!(with_secrets("", Some(&mesh())).expect("none"), "");
    }

    #[test]
    fn a_leaf_ticket_carries_its_own_password_and_never_the_route_secret() {
        let mut leaf = ticket();
        leaf.routes.clear();
        leaf.leaf = Some(LeafIdentity {
            hubs: vec!["[fd12:3456:789a:1::1]:4725".parse().expect("hub")],
            password: String::new(),
        });
        let text = serde_json::to_string(&leaf).expect("encode");
        let issued: JoinTicket =
            serde_json::from_str(&with_secrets(&text, Some(&mesh())).expect("issued"))
                .expect("decode");
        assert_eq!(issued.route_secret, None, "a leaf gets no route secret");
        let password = issued.leaf.as_ref().expect("leaf").password.clone();
        assert_eq!(
            Some(password.clone()),
            mesh().nats_password(NatsPassword::Leaf, "m-2"),
            "the password every core server derives for m-2"
        );
        assert_ne!(
            mesh().nats_password(NatsPassword::Leaf, "m-3"),
            Some(password.clone()),
            "each machine has its own"
        );
        let recorded = with_secrets(&text, None).expect("redacted");
        assert!(!recorded.contains(&password), "{recorded}");
        assert!(!recorded.contains("c0ffee"), "{recorded}");
        // A replay derives the same password again.
        assert_eq!(
            with_secrets(&recorded, Some(&mesh())).expect("replayed"),
            with_secrets(&text, Some(&mesh())).expect("issued")
        );
    }
}
