//! Rollback is a deploy: `deploy export <namespace> --commit <id>` turns a past
//! commit into a manifest that, deployed, brings back that commit's services
//! and the volume state it left behind.
//!
//! A commit's volume state is what its services had written when the next
//! deploy replaced them — the deploy point that next commit snapshotted before
//! starting its own containers. So the export pins each volume to the next
//! commit's deploy point. Exporting the head commit pins nothing: its volumes
//! are still live.

use super::{manifest::Manifest, record::DeployRecord};

/// The manifest that reverts to `record`, given the commit that followed it.
pub fn rollback_manifest(record: &DeployRecord, next: Option<&DeployRecord>) -> Manifest {
    let mut manifest = record.manifest.clone();
    manifest.reverts = Some(record.commit.to_string());
    for service in manifest.services.values_mut() {
        for volume in &mut service.volumes {
            volume.restore = next
                .and_then(|next| next.volumes.get(&volume.name))
                .and_then(|state| state.deploy_point.clone());
        }
    }
    manifest
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::deploy::record::{CommitId, VolumeRecord};

    fn record(seq: u64, deploy_point: Option<&str>, restore: Option<&str>) -> DeployRecord {
        let restore = restore
            .map(|s| format!("restore = \"{s}\"\n"))
            .unwrap_or_default();
        let manifest = Manifest::parse(&format!(
            "namespace = \"shop\"\n[services.db]\nimage = \"v{seq}\"\n[[services.db.volumes]]\nname = \"data\"\nmount = \"/data\"\n{restore}"
        ))
        .expect("valid");
        DeployRecord {
            commit: CommitId {
                namespace: "shop".into(),
                seq,
            },
            operation: format!("op-{seq}"),
            created_at_unix_ms: seq,
            machine: "m-1".into(),
            manifest,
            reverts: None,
            services: BTreeMap::new(),
            volumes: BTreeMap::from([(
                "data".to_owned(),
                VolumeRecord {
                    service: "db".into(),
                    machine: "m-1".into(),
                    deploy_point: deploy_point.map(str::to_owned),
                    restored_from: None,
                },
            )]),
            routes: Vec::new(),
        }
    }

    #[test]
    fn a_past_commit_pins_its_volumes_to_the_next_deploy_point() {
        let v1 = record(1, Some("deploy-1"), None);
        let v2 = record(2, Some("deploy-2"), None);
        let manifest = rollback_manifest(&v1, Some(&v2));
        assert_eq!(manifest.reverts.as_deref(), Some("shop/1"));
        assert_eq!(manifest.services["db"].image, "v1");
        assert_eq!(
            manifest.services["db"].volumes[0].restore.as_deref(),
            Some("deploy-2")
        );
    }

    #[test]
    fn the_head_commit_pins_nothing_and_old_pins_are_dropped() {
        let rolled_back = record(3, Some("deploy-3"), Some("deploy-2"));
        let manifest = rollback_manifest(&rolled_back, None);
        assert_eq!(manifest.services["db"].volumes[0].restore, None);
    }

    #[test]
    fn a_backend_without_snapshots_pins_nothing() {
        let manifest = rollback_manifest(&record(1, None, None), Some(&record(2, None, None)));
        assert_eq!(manifest.services["db"].volumes[0].restore, None);
    }
}
