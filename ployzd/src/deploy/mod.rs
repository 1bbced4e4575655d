//! deploy: the deploy primitive — preview, apply, commit, cleanup — and its
//! history, on one machine. Promote and rollback are deploys of a manifest
//! (`export` turns a past commit into one). A deploy commits one record per
//! step of the namespace's history (`record`), written create-if-absent under
//! the namespace's lease: that write is the point of no return.
//!
//! Depends on the runtime, storage and store contracts, never on backends.

pub mod apply;
pub mod export;
pub mod health;
pub mod manifest;
pub mod plan;
pub mod record;
pub mod traffic;

pub use apply::{DeployError, DeployOutcome, Deployer, DeployerDeps};
pub use manifest::{Manifest, ManifestError};
pub use plan::{DeployPlan, PlanError};
pub use record::{CommitId, DeployRecord};

use crate::{runtime::ContainerRuntime, storage::VolumeBackend, store::Store};

impl<S: Store, R: ContainerRuntime, V: VolumeBackend> Deployer<S, R, V> {
    /// A manifest that reverts the namespace to `commit` (see [`export`]).
    pub async fn export(&self, commit: &CommitId) -> Result<Manifest, DeployError> {
        let record = self.show(commit).await?;
        let next_id = CommitId {
            namespace: commit.namespace.clone(),
            seq: commit.seq + 1,
        };
        let next = match self.show(&next_id).await {
            Ok(next) => Some(next),
            Err(DeployError::NoSuchCommit { .. }) => None,
            Err(error) => return Err(error),
        };
        Ok(export::rollback_manifest(&record, next.as_ref()))
    }
}
