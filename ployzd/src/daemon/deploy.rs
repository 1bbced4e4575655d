//! The deploy operations as the daemon serves them: parse and validate the
//! manifest, journal the operation, run the deployer over this machine's
//! runtime and volumes, and map failures to typed API errors.

use ployz_api::{ApiError, ErrorClass};
use serde::{Deserialize, Serialize};

use super::{
    Daemon,
    operations::{journal_error, recorded, replay as replay_recorded, store_error_class},
};
use crate::{
    coordination::{Begin, OperationId, OperationRecord},
    deploy::{
        CommitId, DeployError, DeployPlan, DeployRecord, Deployer, DeployerDeps, Manifest,
        ManifestError, PlanError,
    },
    error_chain,
    runtime::RuntimeError,
    storage::StorageError,
    store::lease::LeaseError,
};

/// The request of a deploy, as recorded in the journal.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeployRequest {
    pub namespace: String,
    /// The manifest as the operator wrote it.
    pub manifest: String,
}

/// The result of a deploy, as recorded in the journal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployResult {
    pub commit: String,
    pub resumed: bool,
    pub cleanup_failures: Vec<(String, String)>,
}

/// A finished deploy: its record, and the plan when this call ran it.
pub struct DeployReply {
    pub operation: OperationRecord,
    pub replayed: bool,
    pub record: DeployRecord,
    pub plan: Option<DeployPlan>,
    pub result: DeployResult,
}

impl Daemon {
    /// `deploy preview`: the plan, changing nothing.
    pub async fn deploy_preview(&self, manifest_text: &str) -> Result<DeployPlan, ApiError> {
        let manifest = Manifest::parse(manifest_text).map_err(manifest_error)?;
        let deployer = self.deployer().await?;
        deployer.preview(&manifest).await.map_err(deploy_error)
    }

    /// `deploy -f`: runs (or replays) a deploy operation.
    pub async fn deploy(
        &self,
        operation: &str,
        manifest_text: &str,
    ) -> Result<DeployReply, ApiError> {
        let operation = OperationId::parse(operation).map_err(journal_error)?;
        let manifest = Manifest::parse(manifest_text).map_err(manifest_error)?;
        let runtime = self.runtime().await?;
        let deployer = self.deployer().await?;
        let request = DeployRequest {
            namespace: manifest.namespace.clone(),
            manifest: manifest_text.to_owned(),
        };
        let mut run = match runtime
            .journal
            .begin(&operation, "deploy", &request)
            .await
            .map_err(journal_error)?
        {
            Begin::Replay(record) => return replay(&deployer, record).await,
            Begin::Run(run) => run,
        };
        // Keep the operation's lease alive while the deploy runs (health checks
        // can outlast it), and stop renewing as soon as the deploy returns.
        let keeper = run.keep_alive();
        let applied_done = tokio_util::sync::CancellationToken::new();
        let applying = async {
            let applied = deployer.apply(&mut run, &manifest).await;
            applied_done.cancel();
            applied
        };
        let keeping = async {
            tokio::select! {
                () = keeper => {}
                () = applied_done.cancelled() => {}
            }
        };
        let (applied, ()) = tokio::join!(applying, keeping);
        match applied {
            Ok(outcome) => {
                let result = DeployResult {
                    commit: outcome.record.commit.to_string(),
                    resumed: outcome.resumed,
                    cleanup_failures: outcome.cleanup_failures.clone(),
                };
                let operation = run.succeed(&result).await.map_err(journal_error)?;
                Ok(DeployReply {
                    operation,
                    replayed: false,
                    record: outcome.record,
                    plan: Some(outcome.plan),
                    result,
                })
            }
            Err(error) => {
                let api = deploy_error(error);
                run.fail(recorded(&api)).await.map_err(journal_error)?;
                Err(api)
            }
        }
    }

    /// `deploy history <namespace>`.
    pub async fn deploy_history(&self, namespace: &str) -> Result<Vec<DeployRecord>, ApiError> {
        ployz_api::names::check_network_name(namespace).map_err(|message| {
            ApiError::new(
                ErrorClass::Usage,
                "invalid_namespace",
                message.replace("network name", "namespace"),
            )
        })?;
        self.deployer()
            .await?
            .history(namespace)
            .await
            .map_err(deploy_error)
    }

    /// `deploy show <commit>`.
    pub async fn deploy_show(&self, commit: &str) -> Result<DeployRecord, ApiError> {
        let commit = parse_commit(commit)?;
        self.deployer()
            .await?
            .show(&commit)
            .await
            .map_err(deploy_error)
    }

    /// `deploy export --commit <commit>`: the rollback manifest.
    pub async fn deploy_export(&self, commit: &str) -> Result<(CommitId, Manifest), ApiError> {
        let commit = parse_commit(commit)?;
        let manifest = self
            .deployer()
            .await?
            .export(&commit)
            .await
            .map_err(deploy_error)?;
        Ok((commit, manifest))
    }

    /// A deployer over this machine's store, container runtime and volumes.
    async fn deployer(
        &self,
    ) -> Result<
        Deployer<
            crate::store::nats::NatsStore,
            super::peer::MachineRuntime,
            super::backends::Volumes,
        >,
        ApiError,
    > {
        let cluster = self.runtime().await?;
        let containers = self.containers().await?;
        let volumes = self.volumes.clone().map_err(|reason| {
            ApiError::new(
                ErrorClass::PreconditionFailed,
                "storage_unavailable",
                format!("volumes are unavailable on this machine: {reason}"),
            )
        })?;
        let port = self.config.mesh.api_port;
        let peers: crate::deploy::apply::PeerRuntimes<super::peer::MachineRuntime> =
            std::sync::Arc::new(move |machine, address| {
                super::peer::MachineRuntime::Peer(super::peer::PeerRuntime::new(
                    machine.to_owned(),
                    std::net::SocketAddr::new(address.into(), port),
                ))
            });
        Ok(Deployer::new(DeployerDeps {
            store: cluster.store.clone(),
            runtime: super::peer::MachineRuntime::Local(containers),
            volumes,
            machine: cluster.identity.machine_id.clone(),
            runner: self.runner.clone(),
        })
        .with_lease_ttl(self.config.operation_lease_ttl)
        .with_routing(std::sync::Arc::new(super::routing::AdminRouteServing::new(
            self.config.clone(),
        )))
        .with_container_dns(super::routing::container_dns(&self.config))
        .with_peers(peers))
    }
}

fn parse_commit(commit: &str) -> Result<CommitId, ApiError> {
    CommitId::parse(commit).ok_or_else(|| {
        ApiError::new(
            ErrorClass::Usage,
            "invalid_commit",
            format!("`{commit}` is not a commit id like `shop/3`"),
        )
    })
}

/// Replays a finished deploy: the recorded result, with its commit read back.
async fn replay<S, R, V>(
    deployer: &Deployer<S, R, V>,
    record: OperationRecord,
) -> Result<DeployReply, ApiError>
where
    S: crate::store::Store,
    R: crate::runtime::ContainerRuntime,
    V: crate::storage::VolumeBackend,
{
    let finished = replay_recorded::<DeployResult>(record)?;
    let commit = parse_commit(&finished.result.commit)?;
    let deployed = deployer.show(&commit).await.map_err(deploy_error)?;
    Ok(DeployReply {
        operation: finished.record,
        replayed: true,
        record: deployed,
        plan: None,
        result: finished.result,
    })
}

fn manifest_error(error: ManifestError) -> ApiError {
    ApiError::new(ErrorClass::Usage, "invalid_manifest", error.to_string())
}

fn deploy_error(error: DeployError) -> ApiError {
    let message = error_chain(&error);
    let (class, code) = match &error {
        DeployError::Plan(plan) => (
            ErrorClass::PreconditionFailed,
            match plan {
                PlanError::PlacementUnavailable { .. } => "placement_unavailable",
                PlanError::ImageMissing { .. } => "image_missing",
                PlanError::SnapshotsUnsupported { .. } => "snapshots_unsupported",
                PlanError::RestoreSnapshotMissing { .. } => "restore_snapshot_missing",
                PlanError::RouteTaken { .. } => "route_taken",
                PlanError::TlsFileUnreadable { .. } => "tls_file_unreadable",
            },
        ),
        DeployError::Locked { .. } => (ErrorClass::Conflict, "namespace_locked"),
        DeployError::StepFailed {
            unhealthy: true, ..
        } => (ErrorClass::PreconditionFailed, "deploy_unhealthy"),
        DeployError::StepFailed {
            unhealthy: false, ..
        } => (ErrorClass::Internal, "deploy_step_failed"),
        DeployError::CommitConflict { .. } => (ErrorClass::Conflict, "commit_conflict"),
        DeployError::NoSuchCommit { .. } => (ErrorClass::NotFound, "commit_not_found"),
        DeployError::Store(store) => {
            let mut api = store_error_class(store);
            api.message = message;
            return api;
        }
        DeployError::Lease(lease) if lease.is_conflict() => (ErrorClass::Conflict, "lease_lost"),
        DeployError::Lease(LeaseError::Store(_)) => (ErrorClass::Unavailable, "store_unavailable"),
        DeployError::Lease(_) => (ErrorClass::Internal, "lease_failed"),
        DeployError::Journal(_) => (ErrorClass::Unavailable, "journal_failed"),
        DeployError::Runtime(runtime) if runtime.is_retryable() => {
            (ErrorClass::Unavailable, "runtime_unavailable")
        }
        DeployError::Runtime(RuntimeError::ImageMissing { .. }) => {
            (ErrorClass::PreconditionFailed, "image_missing")
        }
        DeployError::Runtime(_) => (ErrorClass::Internal, "runtime_failed"),
        DeployError::Storage(StorageError::Unsupported { .. }) => {
            (ErrorClass::PreconditionFailed, "storage_unsupported")
        }
        DeployError::Storage(_) => (ErrorClass::Internal, "storage_failed"),
    };
    ApiError::new(class, code, message)
}
