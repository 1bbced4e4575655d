//! Planning a deploy: a pure function of the manifest and what was observed
//! (the head commit, the namespace's containers, images, volumes). It decides
//! what each service needs (create, replace, keep) and how (start the new
//! containers first, or stop the old ones first when the service owns a
//! volume), and fails on every missing precondition before anything mutates.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::{
    manifest::{Manifest, Route, Service},
    record::{CommitId, ContainerRecord, DeployRecord, RouteRecord},
};
use crate::{
    runtime::{ContainerInfo, ContainerState},
    storage::Capabilities,
};

/// What the planner needs to know, observed right before planning.
#[derive(Clone, Debug)]
pub struct Observation {
    /// This machine's id.
    pub machine: String,
    /// The namespace's latest commit.
    pub head: Option<DeployRecord>,
    /// Every Ployz container of the namespace on the machines the deploy
    /// touches (its placements and its head's), with the machine it is on.
    pub containers: Vec<(String, ContainerInfo)>,
    /// Whether each image the manifest names is present, per machine
    /// placed on: `(machine, image)`.
    pub images: BTreeMap<(String, String), bool>,
    /// Machines a placement names that cannot run containers now, with why.
    pub unavailable: BTreeMap<String, String>,
    /// Each volume the manifest names: present or not, and its snapshots.
    pub volumes: BTreeMap<String, VolumeObservation>,
    pub storage: Capabilities,
    pub storage_kind: &'static str,
    /// Routes other namespaces' latest commits serve, with their namespace.
    pub other_routes: Vec<(String, RouteRecord)>,
    /// Each TLS file the manifest names: `None` when readable, else why not.
    pub tls_files: BTreeMap<String, Option<String>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VolumeObservation {
    pub exists: bool,
    pub snapshots: Vec<String>,
}

/// What a deploy will do, in order. Serialized as the preview.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeployPlan {
    /// The commit this deploy creates.
    pub commit: CommitId,
    pub machine: String,
    pub services: Vec<ServicePlan>,
    /// Services of the head commit that the manifest no longer has: removed after the commit.
    pub removed_services: Vec<RemovedService>,
    pub volumes: Vec<VolumePlan>,
    pub routes: RoutesChange,
    /// Ployz containers of the namespace that no commit owns (left by an
    /// interrupted deploy or a failed cleanup): removed after the commit.
    pub orphans: Vec<Orphan>,
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePlan {
    pub service: String,
    pub action: ServiceAction,
    pub strategy: Strategy,
    pub config_hash: String,
    pub replicas: u32,
    /// The machine each replica runs on, by replica index.
    pub machines: Vec<String>,
    /// The containers serving now, from the head commit.
    pub current: Vec<ContainerRecord>,
    pub reason: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceAction {
    Create,
    Replace,
    Keep,
}

impl ServiceAction {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceAction::Create => "create",
            ServiceAction::Replace => "replace",
            ServiceAction::Keep => "keep",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// New containers start and pass their health check before old ones stop: no downtime.
    StartFirst,
    /// The service owns volumes: old containers stop, the volumes are
    /// snapshotted (and restored if asked), then the new ones start.
    StopFirst,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::StartFirst => "start_first",
            Strategy::StopFirst => "stop_first",
        }
    }
}

/// A container no commit owns, and the machine it is on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Orphan {
    pub id: String,
    pub machine: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RemovedService {
    pub service: String,
    pub containers: Vec<ContainerRecord>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VolumePlan {
    pub volume: String,
    pub service: String,
    /// The volume does not exist yet.
    pub create: bool,
    /// The deploy-point snapshot to take; `None` when the backend cannot snapshot.
    pub deploy_point: Option<String>,
    /// The snapshot to restore the volume to (a rollback).
    pub restore: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RoutesChange {
    pub changed: bool,
    pub routes: Vec<RouteRecord>,
}

/// A precondition the deploy cannot meet; nothing has been touched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("service `{service}` cannot be placed on machine `{machine}`: {reason}")]
    PlacementUnavailable {
        service: String,
        machine: String,
        reason: String,
    },
    #[error(
        "service `{service}` needs image `{image}`, which is not present on machine `{machine}`; build or load it there first"
    )]
    ImageMissing {
        service: String,
        image: String,
        machine: String,
    },
    #[error(
        "volume `{volume}` asks to restore snapshot `{snapshot}`, but the {backend} backend has no snapshots"
    )]
    SnapshotsUnsupported {
        volume: String,
        snapshot: String,
        backend: String,
    },
    #[error("volume `{volume}` has no snapshot `{snapshot}` to restore")]
    RestoreSnapshotMissing { volume: String, snapshot: String },
    #[error("service `{service}` routes {route}, which namespace `{namespace}` already serves")]
    RouteTaken {
        service: String,
        route: String,
        namespace: String,
    },
    #[error("service `{service}` names TLS file `{path}`, which cannot be used here: {reason}")]
    TlsFileUnreadable {
        service: String,
        path: String,
        reason: String,
    },
}

/// Routes must not take what another namespace serves (the same host and
/// path, or the same TCP port), and TLS files must be usable on this machine.
fn check_routes(manifest: &Manifest, observed: &Observation) -> Result<(), PlanError> {
    // A route without paths serves every path.
    let paths = |paths: &[String]| -> Vec<String> {
        if paths.is_empty() {
            vec!["/".to_owned()]
        } else {
            paths.to_vec()
        }
    };
    for (name, service) in &manifest.services {
        for route in &service.routes {
            let taken = |route_text: String, namespace: &str| PlanError::RouteTaken {
                service: name.clone(),
                route: route_text,
                namespace: namespace.to_owned(),
            };
            for (namespace, other) in &observed.other_routes {
                if let (Some(port), Some(other_port)) = (route.tcp, other.tcp)
                    && port == other_port
                {
                    return Err(taken(format!("TCP port {port}"), namespace));
                }
                for host in &route.hosts {
                    let host = ployz_routing::table::normalize_host(host);
                    let shared = other
                        .hosts
                        .iter()
                        .any(|other_host| ployz_routing::table::normalize_host(other_host) == host);
                    if !shared {
                        continue;
                    }
                    let theirs = paths(&other.paths);
                    if let Some(path) = paths(&route.paths).into_iter().find(|p| theirs.contains(p))
                    {
                        return Err(taken(format!("`{host}{path}`"), namespace));
                    }
                }
            }
            if let Some(tls) = &route.tls {
                for path in [&tls.certificate, &tls.key] {
                    if let Some(Some(reason)) = observed.tls_files.get(path) {
                        return Err(PlanError::TlsFileUnreadable {
                            service: name.clone(),
                            path: path.clone(),
                            reason: reason.clone(),
                        });
                    }
                }
            }
        }
    }
    Ok(())
}

/// Plans deploying `manifest` given `observed`.
pub fn plan(manifest: &Manifest, observed: &Observation) -> Result<DeployPlan, PlanError> {
    let head = observed.head.as_ref();
    let commit = CommitId {
        namespace: manifest.namespace.clone(),
        seq: head.map_or(1, |head| head.commit.seq + 1),
    };
    // Containers are known by (machine, id): an id means something only on
    // the engine that made it.
    let running: BTreeSet<(&str, &str)> = observed
        .containers
        .iter()
        .filter(|(_, c)| c.state == ContainerState::Running)
        .map(|(machine, c)| (machine.as_str(), c.id.0.as_str()))
        .collect();

    check_routes(manifest, observed)?;
    let mut services = Vec::new();
    let mut volumes = Vec::new();
    let mut notes = Vec::new();
    for (name, service) in &manifest.services {
        let machines = replica_machines(service, &observed.machine);
        for machine in unique(&machines) {
            if let Some(reason) = observed.unavailable.get(machine) {
                return Err(PlanError::PlacementUnavailable {
                    service: name.clone(),
                    machine: machine.clone(),
                    reason: reason.clone(),
                });
            }
            if !service.volumes.is_empty() && *machine != observed.machine {
                return Err(PlanError::PlacementUnavailable {
                    service: name.clone(),
                    machine: machine.clone(),
                    reason: format!(
                        "the service owns volumes, which live on the machine that deploys it \
                         (`{}`); deploy from `{machine}`, or move the volumes there first",
                        observed.machine
                    ),
                });
            }
            let present = observed
                .images
                .get(&(machine.clone(), service.image.clone()))
                .copied()
                .unwrap_or(false);
            if !present {
                return Err(PlanError::ImageMissing {
                    service: name.clone(),
                    image: service.image.clone(),
                    machine: machine.clone(),
                });
            }
        }
        let config_hash = config_hash(&manifest.namespace, name, service);
        let current = head
            .and_then(|head| head.services.get(name))
            .map(|record| record.containers.clone())
            .unwrap_or_default();
        let restoring = service.volumes.iter().any(|v| v.restore.is_some());
        let all_running = !current.is_empty()
            && current
                .iter()
                .all(|c| running.contains(&(c.machine.as_str(), c.id.as_str())));
        let placed_as_before = current.len() == machines.len()
            && current
                .iter()
                .all(|c| machines.get(c.replica as usize) == Some(&c.machine));
        let unchanged = head
            .and_then(|head| head.services.get(name))
            .is_some_and(|record| record.config_hash == config_hash)
            && placed_as_before;
        let (action, reason) = match (current.is_empty(), unchanged && all_running && !restoring) {
            (true, _) => (ServiceAction::Create, "new service".to_owned()),
            (false, true) => (ServiceAction::Keep, "unchanged and running".to_owned()),
            (false, false) if restoring => {
                (ServiceAction::Replace, "restores volume state".to_owned())
            }
            (false, false) if !placed_as_before => {
                (ServiceAction::Replace, "placement changed".to_owned())
            }
            (false, false) if !unchanged => {
                (ServiceAction::Replace, "specification changed".to_owned())
            }
            (false, false) => (
                ServiceAction::Replace,
                "not all of its containers are running".to_owned(),
            ),
        };
        let strategy = if service.volumes.is_empty() {
            Strategy::StartFirst
        } else {
            Strategy::StopFirst
        };
        if strategy == Strategy::StopFirst && action == ServiceAction::Replace {
            notes.push(format!(
                "service `{name}` owns volumes: its container stops before the new one starts (brief downtime)"
            ));
        }
        if strategy == Strategy::StartFirst
            && action == ServiceAction::Replace
            && service.health.is_none()
        {
            notes.push(format!(
                "service `{name}` has no health check: its new containers count as ready once running"
            ));
        }

        for volume in &service.volumes {
            let seen = observed
                .volumes
                .get(&volume.name)
                .cloned()
                .unwrap_or_default();
            if let Some(snapshot) = &volume.restore {
                if !observed.storage.snapshots {
                    return Err(PlanError::SnapshotsUnsupported {
                        volume: volume.name.clone(),
                        snapshot: snapshot.clone(),
                        backend: observed.storage_kind.to_owned(),
                    });
                }
                if !seen.snapshots.contains(snapshot) {
                    return Err(PlanError::RestoreSnapshotMissing {
                        volume: volume.name.clone(),
                        snapshot: snapshot.clone(),
                    });
                }
            }
            let deploy_point =
                (observed.storage.snapshots && seen.exists).then(|| commit.deploy_point());
            if !observed.storage.snapshots && seen.exists {
                notes.push(format!(
                    "volume `{}`: the {} backend cannot snapshot, so this deploy keeps no deploy point to roll back to",
                    volume.name, observed.storage_kind
                ));
            }
            volumes.push(VolumePlan {
                volume: volume.name.clone(),
                service: name.clone(),
                create: !seen.exists,
                deploy_point,
                restore: volume.restore.clone(),
            });
        }
        services.push(ServicePlan {
            service: name.clone(),
            action,
            strategy,
            config_hash,
            replicas: service.replicas,
            machines,
            current,
            reason,
        });
    }

    let removed_services: Vec<RemovedService> = head
        .map(|head| {
            head.services
                .iter()
                .filter(|(name, _)| !manifest.services.contains_key(*name))
                .map(|(name, record)| RemovedService {
                    service: name.clone(),
                    containers: record.containers.clone(),
                })
                .collect()
        })
        .unwrap_or_default();
    for removed in &removed_services {
        let kept_volumes: Vec<&String> = head
            .map(|head| {
                head.volumes
                    .iter()
                    .filter(|(_, v)| v.service == removed.service)
                    .map(|(name, _)| name)
                    .collect()
            })
            .unwrap_or_default();
        if !kept_volumes.is_empty() {
            notes.push(format!(
                "service `{}` is removed; its volumes {kept_volumes:?} are kept (Ployz never deletes data implicitly)",
                removed.service
            ));
        }
    }

    let owned: BTreeSet<(&str, &str)> = head
        .map(|head| {
            head.services
                .values()
                .flat_map(|s| {
                    s.containers
                        .iter()
                        .map(|c| (c.machine.as_str(), c.id.as_str()))
                })
                .collect()
        })
        .unwrap_or_default();
    let orphans: Vec<Orphan> = observed
        .containers
        .iter()
        .filter(|(machine, c)| !owned.contains(&(machine.as_str(), c.id.0.as_str())))
        .map(|(machine, c)| Orphan {
            id: c.id.0.clone(),
            machine: machine.clone(),
        })
        .collect();

    let after = route_summaries(manifest);
    let before = head
        .map(|head| route_summaries(&head.manifest))
        .unwrap_or_default();
    Ok(DeployPlan {
        commit,
        machine: observed.machine.clone(),
        services,
        removed_services,
        volumes,
        routes: RoutesChange {
            changed: before != after,
            routes: after,
        },
        orphans,
        notes,
    })
}

/// The machine of each replica: the placement's machines in turn (replica
/// `i` on `placement[i % len]`), or `local` for every replica when the
/// placement is empty.
pub fn replica_machines(service: &Service, local: &str) -> Vec<String> {
    (0..service.replicas as usize)
        .map(|replica| {
            if service.placement.is_empty() {
                local.to_owned()
            } else {
                service.placement[replica % service.placement.len()].clone()
            }
        })
        .collect()
}

/// `machines` without repeats, in first-seen order.
fn unique(machines: &[String]) -> Vec<&String> {
    let mut seen = BTreeSet::new();
    machines
        .iter()
        .filter(|machine| seen.insert(machine.as_str()))
        .collect()
}

/// The identity of a service's containers: equal hashes mean identical containers.
pub fn config_hash(namespace: &str, name: &str, service: &Service) -> String {
    #[derive(Serialize)]
    struct Identity<'a> {
        namespace: &'a str,
        name: &'a str,
        image: &'a str,
        entrypoint: &'a Option<Vec<String>>,
        command: &'a Option<Vec<String>>,
        env: &'a BTreeMap<String, String>,
        memory: Option<u64>,
        cpu_millis: Option<u64>,
        stop_grace_ms: u128,
        mounts: Vec<(&'a str, &'a str)>,
    }
    let identity = Identity {
        namespace,
        name,
        image: &service.image,
        entrypoint: &service.entrypoint,
        command: &service.command,
        env: &service.env,
        memory: service.resources.memory_bytes(),
        cpu_millis: service.resources.cpu_millis(),
        stop_grace_ms: service.stop_grace_period.as_millis(),
        mounts: service
            .volumes
            .iter()
            .map(|v| (v.name.as_str(), v.mount.as_str()))
            .collect(),
    };
    let bytes = serde_json::to_vec(&identity).expect("plain data always serializes");
    hex::encode(Sha256::digest(bytes))
}

fn route_summaries(manifest: &Manifest) -> Vec<RouteRecord> {
    let mut routes: Vec<RouteRecord> = manifest
        .services
        .iter()
        .flat_map(|(name, service)| service.routes.iter().map(move |route| summary(name, route)))
        .collect();
    routes.sort();
    routes
}

/// A route as the plan shows it: what will be served, before any instance exists.
pub(super) fn summary(service: &str, route: &Route) -> RouteRecord {
    RouteRecord {
        service: service.to_owned(),
        hosts: route.hosts.clone(),
        paths: route.paths.clone(),
        tcp: route.tcp,
        port: route.port,
        instances: Vec::new(),
        tls: route.tls.as_ref().map(|tls| ployz_routing::TlsFiles {
            certificate: tls.certificate.clone(),
            key: tls.key.clone(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        deploy::record::{ServiceRecord, VolumeRecord},
        runtime::ContainerId,
    };

    const MACHINE: &str = "m-1";

    fn manifest(text: &str) -> Manifest {
        Manifest::parse(text).expect("valid manifest")
    }

    fn web(image: &str) -> Manifest {
        manifest(&format!(
            "namespace = \"shop\"\n[services.web]\nimage = \"{image}\"\n[[services.web.routes]]\nhosts = [\"shop.test\"]\nport = 80\n"
        ))
    }

    fn with_volume(restore: Option<&str>) -> Manifest {
        let restore = restore
            .map(|s| format!("restore = \"{s}\"\n"))
            .unwrap_or_default();
        manifest(&format!(
            "namespace = \"shop\"\n[services.db]\nimage = \"img\"\n[[services.db.volumes]]\nname = \"data\"\nmount = \"/data\"\n{restore}"
        ))
    }

    fn observation(head: Option<DeployRecord>, containers: Vec<ContainerInfo>) -> Observation {
        Observation {
            other_routes: Vec::new(),
            tls_files: BTreeMap::new(),
            machine: MACHINE.to_owned(),
            head,
            containers: containers
                .into_iter()
                .map(|container| (MACHINE.to_owned(), container))
                .collect(),
            images: [MACHINE, "m-2", "m-3"]
                .into_iter()
                .flat_map(|machine| {
                    ["v1", "v2", "img"]
                        .into_iter()
                        .map(move |image| ((machine.to_owned(), image.to_owned()), true))
                })
                .collect(),
            unavailable: BTreeMap::new(),
            volumes: BTreeMap::new(),
            storage: Capabilities {
                snapshots: true,
                clones: true,
                send_receive: true,
            },
            storage_kind: "btrfs",
        }
    }

    fn container(id: &str, state: ContainerState) -> ContainerInfo {
        ContainerInfo {
            id: ContainerId(id.to_owned()),
            name: id.to_owned(),
            image: "v1".to_owned(),
            labels: BTreeMap::new(),
            state,
            exit_code: None,
            started_at: None,
            addresses: Vec::new(),
        }
    }

    fn head_for(manifest: &Manifest, seq: u64, container_id: &str) -> DeployRecord {
        let services = manifest
            .services
            .iter()
            .map(|(name, service)| {
                (
                    name.clone(),
                    ServiceRecord {
                        config_hash: config_hash(&manifest.namespace, name, service),
                        ports: service.ports.clone(),
                        containers: vec![ContainerRecord {
                            id: container_id.to_owned(),
                            name: container_id.to_owned(),
                            replica: 0,
                            machine: MACHINE.to_owned(),
                            addresses: Vec::new(),
                        }],
                    },
                )
            })
            .collect();
        DeployRecord {
            commit: CommitId {
                namespace: manifest.namespace.clone(),
                seq,
            },
            operation: "op".to_owned(),
            created_at_unix_ms: 1,
            machine: MACHINE.to_owned(),
            manifest: manifest.clone(),
            reverts: None,
            services,
            volumes: BTreeMap::<String, VolumeRecord>::new(),
            routes: Vec::new(),
        }
    }

    #[test]
    fn a_first_deploy_creates_every_service_as_commit_one() {
        let plan = plan(&web("v1"), &observation(None, Vec::new())).expect("plan");
        assert_eq!(plan.commit.to_string(), "shop/1");
        assert_eq!(plan.services[0].action, ServiceAction::Create);
        assert_eq!(plan.services[0].strategy, Strategy::StartFirst);
        assert!(plan.routes.changed);
    }

    #[test]
    fn an_unchanged_running_service_is_kept() {
        let v1 = web("v1");
        let head = head_for(&v1, 1, "c1");
        let plan = plan(
            &v1,
            &observation(Some(head), vec![container("c1", ContainerState::Running)]),
        )
        .expect("plan");
        assert_eq!(plan.commit.seq, 2);
        assert_eq!(plan.services[0].action, ServiceAction::Keep);
        assert!(!plan.routes.changed);
        assert!(plan.orphans.is_empty());
    }

    #[test]
    fn a_changed_or_stopped_service_is_replaced() {
        let v1 = web("v1");
        let head = head_for(&v1, 1, "c1");
        let changed = plan(
            &web("v2"),
            &observation(
                Some(head.clone()),
                vec![container("c1", ContainerState::Running)],
            ),
        )
        .expect("plan");
        assert_eq!(changed.services[0].action, ServiceAction::Replace);
        assert_eq!(changed.services[0].reason, "specification changed");
        let stopped = plan(
            &v1,
            &observation(Some(head), vec![container("c1", ContainerState::Exited)]),
        )
        .expect("plan");
        assert_eq!(stopped.services[0].action, ServiceAction::Replace);
    }

    #[test]
    fn containers_no_commit_owns_are_orphans() {
        let v1 = web("v1");
        let head = head_for(&v1, 1, "c1");
        let plan = plan(
            &v1,
            &observation(
                Some(head),
                vec![
                    container("c1", ContainerState::Running),
                    container("left-over", ContainerState::Exited),
                ],
            ),
        )
        .expect("plan");
        assert_eq!(
            plan.orphans,
            [Orphan {
                id: "left-over".to_owned(),
                machine: MACHINE.to_owned()
            }]
        );
    }

    #[test]
    fn a_service_with_a_volume_stops_first_and_snapshots_its_deploy_point() {
        let m = with_volume(None);
        let head = head_for(&m, 4, "c1");
        let mut observed = observation(Some(head), vec![container("c1", ContainerState::Running)]);
        observed.volumes.insert(
            "data".to_owned(),
            VolumeObservation {
                exists: true,
                snapshots: Vec::new(),
            },
        );
        let mut changed = m.clone();
        changed
            .services
            .get_mut("db")
            .expect("db")
            .env
            .insert("A".into(), "1".into());
        let plan = plan(&changed, &observed).expect("plan");
        assert_eq!(plan.services[0].strategy, Strategy::StopFirst);
        assert_eq!(plan.volumes[0].deploy_point.as_deref(), Some("deploy-5"));
        assert!(!plan.volumes[0].create);
        assert!(plan.notes.iter().any(|n| n.contains("brief downtime")));
    }

    fn spread(replicas: u32, placement: &str) -> Manifest {
        manifest(&format!(
            "namespace = \"shop\"\n[services.web]\nimage = \"v1\"\nreplicas = {replicas}\nplacement = [{placement}]\n"
        ))
    }

    #[test]
    fn replicas_spread_over_the_placement_in_turn() {
        let plan = plan(
            &spread(4, "\"m-1\", \"m-2\", \"m-3\""),
            &observation(None, Vec::new()),
        )
        .expect("plan");
        assert_eq!(plan.services[0].machines, ["m-1", "m-2", "m-3", "m-1"]);
        let local = super::plan(&web("v1"), &observation(None, Vec::new())).expect("plan");
        assert_eq!(local.services[0].machines, [MACHINE]);
    }

    #[test]
    fn a_moved_replica_replaces_the_service() {
        let before = spread(1, "\"m-1\"");
        let head = head_for(&before, 1, "c1");
        let running = vec![container("c1", ContainerState::Running)];
        let same = plan(&before, &observation(Some(head.clone()), running.clone())).expect("plan");
        assert_eq!(same.services[0].action, ServiceAction::Keep);
        let moved = plan(&spread(1, "\"m-2\""), &observation(Some(head), running)).expect("plan");
        assert_eq!(moved.services[0].action, ServiceAction::Replace);
        assert_eq!(moved.services[0].reason, "placement changed");
    }

    #[test]
    fn an_image_missing_on_one_placed_machine_names_that_machine() {
        let mut observed = observation(None, Vec::new());
        observed
            .images
            .insert(("m-3".to_owned(), "v1".to_owned()), false);
        assert!(matches!(
            plan(&spread(3, "\"m-1\", \"m-2\", \"m-3\""), &observed),
            Err(PlanError::ImageMissing { machine, .. }) if machine == "m-3"
        ));
    }

    #[test]
    fn a_service_with_volumes_stays_on_the_deploying_machine() {
        let remote = manifest(
            "namespace = \"shop\"\n[services.db]\nimage = \"img\"\nplacement = [\"m-2\"]\n[[services.db.volumes]]\nname = \"data\"\nmount = \"/data\"\n",
        );
        assert!(matches!(
            plan(&remote, &observation(None, Vec::new())),
            Err(PlanError::PlacementUnavailable { machine, reason, .. })
                if machine == "m-2" && reason.contains("volumes")
        ));
    }

    #[test]
    fn preconditions_fail_before_anything_is_planned() {
        let mut observed = observation(None, Vec::new());
        observed
            .images
            .insert((MACHINE.to_owned(), "v1".to_owned()), false);
        assert!(matches!(
            plan(&web("v1"), &observed),
            Err(PlanError::ImageMissing { .. })
        ));

        let placed = manifest(
            "namespace = \"shop\"\n[services.web]\nimage = \"v2\"\nplacement = [\"m-9\"]\n",
        );
        let mut observed = observation(None, Vec::new());
        observed
            .unavailable
            .insert("m-9".to_owned(), "not a member".to_owned());
        assert!(matches!(
            plan(&placed, &observed),
            Err(PlanError::PlacementUnavailable { machine, reason, .. })
                if machine == "m-9" && reason == "not a member"
        ));

        let restore = with_volume(Some("deploy-3"));
        assert!(matches!(
            plan(&restore, &observation(None, Vec::new())),
            Err(PlanError::RestoreSnapshotMissing { .. })
        ));
        let mut dir = observation(None, Vec::new());
        dir.storage = Capabilities {
            snapshots: false,
            clones: false,
            send_receive: false,
        };
        dir.storage_kind = "dir";
        assert!(matches!(
            plan(&restore, &dir),
            Err(PlanError::SnapshotsUnsupported { .. })
        ));
    }

    #[test]
    fn a_restore_replaces_even_an_unchanged_service() {
        let m = with_volume(Some("deploy-2"));
        let head = head_for(&m, 3, "c1");
        let mut observed = observation(Some(head), vec![container("c1", ContainerState::Running)]);
        observed.volumes.insert(
            "data".to_owned(),
            VolumeObservation {
                exists: true,
                snapshots: vec!["deploy-2".to_owned(), "deploy-3".to_owned()],
            },
        );
        let plan = plan(&m, &observed).expect("plan");
        assert_eq!(plan.services[0].action, ServiceAction::Replace);
        assert_eq!(plan.volumes[0].restore.as_deref(), Some("deploy-2"));
    }

    #[test]
    fn removed_services_are_listed_with_their_containers() {
        let both = manifest(
            "namespace = \"shop\"\n[services.a]\nimage = \"v1\"\n[services.b]\nimage = \"v1\"\n",
        );
        let head = head_for(&both, 1, "c1");
        let only_a = manifest("namespace = \"shop\"\n[services.a]\nimage = \"v1\"\n");
        let plan = plan(
            &only_a,
            &observation(Some(head), vec![container("c1", ContainerState::Running)]),
        )
        .expect("plan");
        assert_eq!(plan.removed_services.len(), 1);
        assert_eq!(plan.removed_services[0].service, "b");
    }

    fn routed(route: &str) -> Manifest {
        manifest(&format!(
            "namespace = \"shop\"\n[services.web]\nimage = \"img\"\n[[services.web.routes]]\n{route}\n"
        ))
    }

    fn served_by_blog(hosts: &[&str], paths: &[&str], tcp: Option<u16>) -> (String, RouteRecord) {
        (
            "blog".to_owned(),
            RouteRecord {
                service: "site".to_owned(),
                hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
                paths: paths.iter().map(|p| (*p).to_owned()).collect(),
                tcp,
                port: 80,
                instances: Vec::new(),
                tls: None,
            },
        )
    }

    #[test]
    fn a_route_another_namespace_serves_is_refused() {
        let mut observed = observation(None, Vec::new());
        observed.other_routes = vec![
            served_by_blog(&["Example.com"], &[], None),
            served_by_blog(&[], &[], Some(5432)),
        ];
        let taken = |route: &str| match plan(&routed(route), &observed) {
            Err(PlanError::RouteTaken {
                route, namespace, ..
            }) => Some((route, namespace)),
            Err(other) => panic!("unexpected {other}"),
            Ok(_) => None,
        };
        assert_eq!(
            taken("hosts = [\"example.com\"]\nport = 80"),
            Some(("`example.com/`".to_owned(), "blog".to_owned()))
        );
        assert_eq!(
            taken("tcp = 5432\nport = 5432"),
            Some(("TCP port 5432".to_owned(), "blog".to_owned()))
        );
        // Another path on the same host, another host, another port: fine.
        assert_eq!(
            taken("hosts = [\"example.com\"]\npaths = [\"/api\"]\nport = 80"),
            None
        );
        assert_eq!(taken("hosts = [\"shop.example.com\"]\nport = 80"), None);
        assert_eq!(taken("tcp = 5433\nport = 5432"), None);
    }

    #[test]
    fn an_unreadable_tls_file_fails_the_plan() {
        let mut observed = observation(None, Vec::new());
        observed.tls_files = BTreeMap::from([
            ("/c.pem".to_owned(), None),
            (
                "/k.pem".to_owned(),
                Some("No such file or directory".to_owned()),
            ),
        ]);
        let route =
            "hosts = [\"a.test\"]\nport = 80\ntls = { certificate = \"/c.pem\", key = \"/k.pem\" }";
        assert!(matches!(
            plan(&routed(route), &observed),
            Err(PlanError::TlsFileUnreadable { path, .. }) if path == "/k.pem"
        ));
    }
}
