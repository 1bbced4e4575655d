//! The daemon's operations: each one inspects, fails before mutating when a
//! precondition is missing, records its steps in the journal, and commits its
//! result as a durable fact. Errors leave here as [`ApiError`]s.

use std::{
    net::{Ipv6Addr, SocketAddr},
    time::Duration,
};

use ployz_api::{ApiError, ErrorClass};
use serde::{Deserialize, Serialize};

use super::{BringUpError, ClusterState, Daemon};
use crate::{
    coordination::{
        Begin, JournalError, OperationId, OperationRecord, OperationState, RecordedError,
        StepEvent, StepStatus,
    },
    error_chain,
    machine::{
        FoundingError, FoundingPlan, IdentityError, LocalIdentity, MachineRecord, NetworkName,
        NetworkRecord, founding::ensure_membership_records, plan_founding, records::MachineMesh,
    },
    mesh::addressing::claim_subnet,
    services::SidecarStatus,
    store::{RecordStore, StoreError},
    time::now_unix_ms,
};

/// How long `machine ls` waits for the store's list.
const LIST_TIMEOUT: Duration = Duration::from_secs(7);
/// How long a live observation made for `status` or `machine ls` may take.
const OBSERVE_TIMEOUT: Duration = Duration::from_secs(1);

/// The request of a `mesh init`, as recorded in the journal.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MeshInitRequest {
    pub network: NetworkName,
    #[serde(default)]
    pub endpoint: Option<SocketAddr>,
}

/// The result of a `mesh init`, as recorded in the journal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshInitResult {
    /// `created` or `already_initialized`.
    pub outcome: String,
    pub network: String,
    pub cluster_id: String,
    pub machine_id: String,
    #[serde(default)]
    pub overlay_address: Option<Ipv6Addr>,
    #[serde(default)]
    pub subnet: String,
    #[serde(default)]
    pub public_key: String,
}

/// `ip` or `ip:port` (the WireGuard port by default); empty means unknown.
fn parse_endpoint(text: &str, default_port: u16) -> Result<Option<SocketAddr>, ApiError> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    if let Ok(address) = text.parse::<SocketAddr>() {
        return Ok(Some(address));
    }
    text.parse::<std::net::IpAddr>()
        .map(|ip| Some(SocketAddr::new(ip, default_port)))
        .map_err(|_| {
            ApiError::new(
                ErrorClass::Usage,
                "invalid_endpoint",
                format!("`{text}` is not an endpoint: give an IP address, optionally with `:port` (IPv6 as `[addr]:port`)"),
            )
        })
}

/// A finished operation and whether this call replayed it.
pub struct Finished<T> {
    pub record: OperationRecord,
    pub result: T,
    pub replayed: bool,
}

/// Live facts for `status`.
pub struct StatusFacts {
    pub identity: Option<LocalIdentity>,
    pub network: Option<NetworkRecord>,
    pub machines: Option<usize>,
    pub nats: Option<SidecarStatus>,
    pub nats_probe: Result<(Duration, String), String>,
    pub cluster_detail: Option<String>,
    /// The gateway's and DNS's supervision state, or why they are not running.
    pub routing: Vec<(super::routing::Component, Result<SidecarStatus, String>)>,
}

/// A member machine with what was observed about it just now.
pub struct ObservedMachine {
    pub record: MachineRecord,
    pub observed: &'static str,
}

impl Daemon {
    /// `mesh init <network>`: founds a cluster on this machine.
    pub async fn mesh_init(
        &self,
        operation: &str,
        network: &str,
        endpoint: &str,
    ) -> Result<Finished<MeshInitResult>, ApiError> {
        let operation = OperationId::parse(operation).map_err(journal_error)?;
        let network = NetworkName::parse(network).map_err(identity_error)?;
        let endpoint = parse_endpoint(endpoint, self.config.mesh.listen_port)?;
        let _identity_guard = self.identity_lock.lock().await;

        let local = LocalIdentity::load(&self.config.data_dir).map_err(identity_error)?;
        let plan = plan_founding(local.as_ref(), &network);
        let (identity, wrote_identity) = match plan {
            Ok(FoundingPlan::Found) => {
                let identity = LocalIdentity::generate(network.clone(), now_unix_ms());
                identity
                    .store(&self.config.data_dir)
                    .map_err(identity_error)?;
                tracing::info!(machine = %identity.machine_id, %network, "wrote machine identity");
                (identity, true)
            }
            Ok(FoundingPlan::Resume(identity)) => (identity, false),
            Err(mismatch) => {
                // Nothing was touched. Record the refusal when the journal is up,
                // so the operation id stays a fact.
                let error = founding_error(&mismatch);
                if let Ok(runtime) = self.runtime().await {
                    let request = MeshInitRequest { network, endpoint };
                    if let Begin::Run(run) = runtime
                        .journal
                        .begin(&operation, "mesh_init", &request)
                        .await
                        .map_err(journal_error)?
                    {
                        run.fail(recorded(&error)).await.map_err(journal_error)?;
                    }
                }
                return Err(error);
            }
        };

        let nats_was_up = matches!(&*self.cluster.read().await, ClusterState::Ready(_));
        let runtime = self.bring_up(&identity).await.map_err(bring_up_error)?;
        let request = MeshInitRequest { network, endpoint };
        let mut run = match runtime
            .journal
            .begin(&operation, "mesh_init", &request)
            .await
            .map_err(journal_error)?
        {
            Begin::Replay(record) => return replay(record),
            Begin::Run(run) => run,
        };

        let step = |wrote: bool| {
            if wrote {
                StepStatus::Done
            } else {
                StepStatus::Skipped
            }
        };
        run.step(
            "write_identity",
            step(wrote_identity),
            format!("machine {}", identity.machine_id),
        )
        .await
        .map_err(journal_error)?;
        let nats = runtime.nats.status();
        run.step(
            "start_nats",
            step(!nats_was_up),
            format!(
                "nats-server pid {} at {} ({})",
                nats.pid.unwrap_or(0),
                nats.client_url,
                nats.origin.kind()
            ),
        )
        .await
        .map_err(journal_error)?;

        let identity = runtime.identity.clone();
        let subnet = runtime.mesh.spec.subnet;
        match claim_subnet(
            &runtime.store,
            runtime.mesh.mesh.prefix,
            &identity.machine_id,
            now_unix_ms(),
        )
        .await
        {
            Ok(claimed) if claimed == subnet => {}
            Ok(claimed) => {
                let api = ApiError::new(
                    ErrorClass::Conflict,
                    "subnet_conflict",
                    format!(
                        "the store gives this machine subnet {} but its identity says {}; the store belongs to another network",
                        claimed.base(),
                        subnet.base()
                    ),
                );
                run.fail(recorded(&api)).await.map_err(journal_error)?;
                return Err(api);
            }
            Err(error) => {
                let api =
                    ApiError::new(ErrorClass::Unavailable, "subnet_claim", error_chain(&error));
                run.fail(recorded(&api)).await.map_err(journal_error)?;
                return Err(api);
            }
        }
        let public_key = runtime.mesh.spec.keys.public_base64();
        let mesh = MachineMesh {
            public_key: public_key.clone(),
            endpoint,
            subnet: subnet.index(),
            overlay_address: subnet.machine_address(),
        };
        let written = match ensure_membership_records(
            &runtime.store,
            &identity,
            &self.hostname,
            Some(mesh),
            now_unix_ms(),
        )
        .await
        {
            Ok(written) => written,
            Err(error) => {
                let api = founding_error(&error);
                run.fail(recorded(&api)).await.map_err(journal_error)?;
                return Err(api);
            }
        };
        run.step(
            "write_membership",
            step(written.any()),
            format!(
                "network `{}`, machine {}",
                identity.network, identity.machine_id
            ),
        )
        .await
        .map_err(journal_error)?;

        let result = MeshInitResult {
            outcome: if wrote_identity || written.any() {
                "created"
            } else {
                "already_initialized"
            }
            .to_owned(),
            network: identity.network.to_string(),
            cluster_id: identity.cluster_id.clone(),
            machine_id: identity.machine_id.clone(),
            overlay_address: Some(subnet.machine_address()),
            subnet: format!(
                "{}/{}",
                subnet.base(),
                crate::mesh::addressing::Subnet::PREFIX_LEN
            ),
            public_key,
        };
        let record = run.succeed(&result).await.map_err(journal_error)?;
        Ok(Finished {
            record,
            result,
            replayed: false,
        })
    }

    /// Facts for `status`, observed now.
    pub async fn status_facts(&self) -> StatusFacts {
        let state = self.cluster.read().await;
        match &*state {
            ClusterState::Uninitialized => StatusFacts {
                identity: None,
                network: None,
                machines: None,
                nats: None,
                nats_probe: Err("not started: this machine has no cluster yet".to_owned()),
                cluster_detail: None,
                routing: Vec::new(),
            },
            ClusterState::Degraded { identity, reason } => StatusFacts {
                identity: Some((**identity).clone()),
                network: None,
                machines: None,
                nats: None,
                nats_probe: Err(reason.clone()),
                cluster_detail: Some(reason.clone()),
                routing: Vec::new(),
            },
            ClusterState::Ready(runtime) => {
                let runtime = runtime.clone();
                drop(state);
                let probe = async {
                    let round_trip = runtime.store.ping().await.map_err(|e| error_chain(&e))?;
                    Ok::<_, String>((round_trip, runtime.store.server_version()))
                };
                let nats_probe = tokio::time::timeout(OBSERVE_TIMEOUT, probe)
                    .await
                    .unwrap_or_else(|_| Err(format!("no answer within {OBSERVE_TIMEOUT:?}")));
                let network =
                    tokio::time::timeout(OBSERVE_TIMEOUT, runtime.store.get(&NetworkRecord::key()))
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .flatten()
                        .and_then(|record| record.decode::<NetworkRecord>().ok());
                let machines = tokio::time::timeout(
                    OBSERVE_TIMEOUT,
                    runtime.store.list(&MachineRecord::prefix()),
                )
                .await
                .ok()
                .and_then(Result::ok)
                .map(|records| records.len());
                StatusFacts {
                    identity: Some(runtime.identity.clone()),
                    network,
                    machines,
                    nats: Some(runtime.nats.status()),
                    nats_probe,
                    cluster_detail: None,
                    routing: runtime
                        .routing
                        .iter()
                        .map(|(component, sidecar)| {
                            (
                                *component,
                                sidecar
                                    .as_ref()
                                    .map(|sidecar| sidecar.status())
                                    .map_err(Clone::clone),
                            )
                        })
                        .collect(),
                }
            }
        }
    }

    /// `machine ls`: membership records plus a live observation of each.
    pub async fn list_machines(&self) -> Result<Vec<ObservedMachine>, ApiError> {
        let runtime = self.runtime().await?;
        // Bounded below the CLI's read timeout, so a store busy replacing a
        // lost leader answers with a reason instead of a cut-off call.
        let records = tokio::time::timeout(LIST_TIMEOUT, runtime.store.list(&MachineRecord::prefix()))
            .await
            .map_err(|_| {
                ApiError::new(
                    ErrorClass::Unavailable,
                    "store_slow",
                    format!(
                        "the store did not list the machines within {LIST_TIMEOUT:?}; after losing a machine it elects new leaders for a few seconds: retry"
                    ),
                )
            })?
            .map_err(store_error)?;
        let records = records
            .iter()
            .map(|record| record.decode::<MachineRecord>().map_err(store_error))
            .collect::<Result<Vec<_>, _>>()?;
        let observed = self
            .observe_machines(&records, &runtime.identity.machine_id)
            .await;
        Ok(records
            .into_iter()
            .zip(observed)
            .map(|(record, observed)| ObservedMachine { record, observed })
            .collect())
    }

    /// `op ls`.
    pub async fn list_operations(&self, limit: usize) -> Result<Vec<OperationRecord>, ApiError> {
        let runtime = self.runtime().await?;
        runtime.journal.list(limit).await.map_err(journal_error)
    }

    /// `op show`.
    pub async fn show_operation(
        &self,
        operation: &str,
    ) -> Result<(OperationRecord, Vec<StepEvent>), ApiError> {
        let operation = OperationId::parse(operation).map_err(journal_error)?;
        let runtime = self.runtime().await?;
        runtime
            .journal
            .show(&operation)
            .await
            .map_err(journal_error)
    }

    /// `daemon stop [--services]`: stops the sidecars when asked, then the daemon.
    pub async fn stop(&self, stop_services: bool) -> Result<(), ApiError> {
        if stop_services && let ClusterState::Ready(runtime) = &*self.cluster.read().await {
            let failed = |error: crate::services::SidecarError| {
                ApiError::new(
                    ErrorClass::Internal,
                    "sidecar_stop_failed",
                    error_chain(&error),
                )
            };
            for sidecar in runtime.routing.iter().filter_map(|(_, s)| s.as_ref().ok()) {
                sidecar.stop().await.map_err(failed)?;
            }
            runtime.nats.stop().await.map_err(failed)?;
            // Last: NATS's routes run over the overlay.
            runtime.mesh.tunnel.stop().await.map_err(failed)?;
        }
        self.shutdown.cancel();
        Ok(())
    }
}

/// Turns a recorded operation back into what its first run returned.
pub(super) fn replay<T: serde::de::DeserializeOwned>(
    record: OperationRecord,
) -> Result<Finished<T>, ApiError> {
    match (record.state, &record.result, &record.error) {
        (OperationState::Succeeded, Some(result), _) => {
            let result = serde_json::from_value(result.clone()).map_err(|error| {
                ApiError::new(
                    ErrorClass::Internal,
                    "corrupt_operation_record",
                    format!(
                        "operation `{}` has an unreadable result: {error}",
                        record.id
                    ),
                )
            })?;
            Ok(Finished {
                record,
                result,
                replayed: true,
            })
        }
        (OperationState::Failed, _, Some(error)) => Err(ApiError::new(
            class_from_str(&error.class),
            error.code.clone(),
            format!(
                "{} (recorded result of operation {})",
                error.message, record.id
            ),
        )),
        (OperationState::Succeeded | OperationState::Failed | OperationState::Running, _, _) => {
            Err(ApiError::new(
                ErrorClass::Internal,
                "corrupt_operation_record",
                format!(
                    "operation `{}` is {} without a result",
                    record.id,
                    record.state.as_str()
                ),
            ))
        }
    }
}

pub(super) fn recorded(error: &ApiError) -> RecordedError {
    RecordedError {
        class: error.class.as_str().to_owned(),
        code: error.code.clone(),
        message: error.message.clone(),
    }
}

pub(super) fn class_from_str(class: &str) -> ErrorClass {
    ErrorClass::ALL
        .into_iter()
        .find(|c| c.as_str() == class)
        .unwrap_or(ErrorClass::Internal)
}

pub(super) fn store_error(error: StoreError) -> ApiError {
    store_error_class(&error)
}

pub(super) fn journal_error(error: JournalError) -> ApiError {
    let (class, code) = match &error {
        JournalError::InvalidOperationId { .. } => (ErrorClass::Usage, "invalid_operation_id"),
        JournalError::OperationIdReused { .. } => (ErrorClass::Usage, "operation_id_reused"),
        JournalError::InProgress { .. } => (ErrorClass::Conflict, "operation_in_progress"),
        JournalError::NotFound { .. } => (ErrorClass::NotFound, "operation_not_found"),
        JournalError::Lease(lease) if lease.is_conflict() => (ErrorClass::Conflict, "lease_lost"),
        JournalError::Store(store) => return store_error_ref(store, &error),
        JournalError::Lease(_) | JournalError::Encode(_) => {
            (ErrorClass::Internal, "journal_failed")
        }
    };
    ApiError::new(class, code, error_chain(&error))
}

fn store_error_ref(store: &StoreError, whole: &JournalError) -> ApiError {
    let mut api = store_error_class(store);
    api.message = error_chain(whole);
    api
}

pub(super) fn store_error_class(error: &StoreError) -> ApiError {
    let (class, code) = match error {
        StoreError::Unavailable { .. } => (ErrorClass::Unavailable, "store_unavailable"),
        StoreError::AlreadyExists { .. } | StoreError::RevisionMismatch { .. } => {
            (ErrorClass::Conflict, "store_conflict")
        }
        StoreError::InvalidKey { .. }
        | StoreError::Encode { .. }
        | StoreError::Decode { .. }
        | StoreError::Backend { .. } => (ErrorClass::Internal, "store_failed"),
    };
    ApiError::new(class, code, error_chain(error))
}

fn identity_error(error: IdentityError) -> ApiError {
    let (class, code) = match &error {
        IdentityError::InvalidNetworkName { .. } => (ErrorClass::Usage, "invalid_network_name"),
        IdentityError::Corrupt { .. } => (ErrorClass::PreconditionFailed, "identity_corrupt"),
        IdentityError::Read { .. } | IdentityError::Write { .. } => {
            (ErrorClass::Internal, "identity_io")
        }
    };
    ApiError::new(class, code, error_chain(&error))
}

fn founding_error(error: &FoundingError) -> ApiError {
    match error {
        FoundingError::NetworkMismatch { .. } => ApiError::new(
            ErrorClass::PreconditionFailed,
            "network_mismatch",
            error.to_string(),
        ),
        FoundingError::StoreDisagrees { .. } => ApiError::new(
            ErrorClass::PreconditionFailed,
            "store_disagrees",
            error.to_string(),
        ),
        FoundingError::RecordVanished { .. } => {
            ApiError::new(ErrorClass::Conflict, "record_vanished", error.to_string())
        }
        FoundingError::Store(store) => store_error_class(store),
    }
}

pub(super) fn bring_up_error(error: BringUpError) -> ApiError {
    let (class, code) = match &error {
        BringUpError::Mesh(_) => (ErrorClass::Unavailable, "mesh_unavailable"),
        BringUpError::Identity(_) => (ErrorClass::Internal, "identity"),
        BringUpError::Store(_) => (ErrorClass::Unavailable, "nats_unavailable"),
        BringUpError::Sidecar(sidecar) if sidecar.is_precondition() => {
            (ErrorClass::PreconditionFailed, "nats_unavailable")
        }
        BringUpError::Sidecar(_) => (ErrorClass::Unavailable, "nats_unavailable"),
    };
    ApiError::new(class, code, error_chain(&error))
}
