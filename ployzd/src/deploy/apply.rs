//! Applying a deploy plan through the runtime, storage and store contracts.
//!
//! Order of work: take the namespace lease; undo what an interrupted attempt
//! of the same operation left; observe and plan (every precondition fails here,
//! before anything mutates); per service, start the new containers and wait for
//! them to be healthy (stopping the old ones first, snapshotting and restoring
//! volumes, when the service owns volumes); then **commit**: one create-if-absent
//! write of the deploy record, the point of no return; then clean up what the
//! commit replaced. A failure before the commit undoes what this deploy did and
//! says which step failed; a failed cleanup after it is reported, and the next
//! deploy of the namespace removes what is left.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv6Addr,
    sync::Arc,
    time::Duration,
};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{
    health::{self, HealthError},
    manifest::{Manifest, Service},
    plan::{
        self, DeployPlan, Observation, PlanError, ServiceAction, ServicePlan, Strategy,
        VolumeObservation, replica_machines,
    },
    record::{
        ContainerRecord, DeployRecord, RouteRecord, ServiceRecord, VolumeRecord, history_prefix,
    },
    traffic::{self, NoRouting, RouteServing, Served},
};
use crate::{
    coordination::{JournalError, OperationRun, StepStatus},
    machine::{MachineRecord, Membership},
    runtime::{
        ContainerId, ContainerInfo, ContainerRuntime, ContainerSpec, ContainerState, Mount,
        RuntimeError, labels,
    },
    storage::{SnapshotName, StorageError, VolumeBackend, VolumeName},
    store::{
        Key, Store, StoreError, encode,
        lease::{Lease, LeaseError, Leases},
    },
    time::now_unix_ms,
};

/// How long a deploy holds its namespace without renewing; renewed at each step.
const NAMESPACE_LEASE_TTL: Duration = Duration::from_secs(30);

/// How a deployer reaches another machine's engine: from the machine's id
/// and overlay address, a runtime that drives it.
pub type PeerRuntimes<R> = Arc<dyn Fn(&str, Ipv6Addr) -> R + Send + Sync>;

/// Runs deploys from this machine, placing containers on any member.
#[derive(Clone)]
pub struct Deployer<S, R, V> {
    store: S,
    runtime: R,
    volumes: V,
    leases: Leases<S>,
    machine: String,
    runner: String,
    lease_ttl: Duration,
    routing: Arc<dyn RouteServing>,
    /// The DNS servers containers use; empty keeps the engine's default.
    container_dns: Vec<std::net::IpAddr>,
    /// Other machines' engines; `None`: this machine places on itself only.
    peers: Option<PeerRuntimes<R>>,
    /// The peers' engines already found, so a deploy reads each machine's
    /// record once. The daemon makes a deployer per request, so a later
    /// request sees membership as it is then.
    found_peers: Arc<std::sync::Mutex<BTreeMap<String, R>>>,
}

/// Everything a deploy needs, handed in by the composition root.
pub struct DeployerDeps<S, R, V> {
    pub store: S,
    pub runtime: R,
    pub volumes: V,
    /// This machine's id.
    pub machine: String,
    /// Names this daemon in leases.
    pub runner: String,
}

/// A committed deploy and what happened around the commit.
#[derive(Clone, Debug)]
pub struct DeployOutcome {
    pub record: DeployRecord,
    pub plan: DeployPlan,
    /// Containers the cleanup after the commit could not remove, with why.
    pub cleanup_failures: Vec<(String, String)>,
    /// True when an earlier attempt of the same operation had already committed.
    pub resumed: bool,
}

/// Why a deploy failed. Every variant before the commit leaves the namespace
/// as it was (what the deploy started is removed; what it stopped is restarted).
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("namespace `{namespace}` is being deployed by {holder}; retry when it finishes")]
    Locked { namespace: String, holder: String },
    #[error("step `{step}` failed: {cause}; undone: {undone}")]
    StepFailed {
        step: String,
        cause: String,
        /// What was rolled back, in words.
        undone: String,
        unhealthy: bool,
    },
    #[error("commit `{commit}` was written by someone else; nothing of this deploy was kept")]
    CommitConflict { commit: String },
    #[error("no deploy commit `{commit}`")]
    NoSuchCommit { commit: String },
    #[error("deploy record")]
    Store(#[from] StoreError),
    #[error("namespace lease")]
    Lease(#[from] LeaseError),
    #[error("operation journal")]
    Journal(#[from] JournalError),
    #[error("container runtime")]
    Runtime(#[from] RuntimeError),
    #[error("volumes")]
    Storage(#[from] StorageError),
}

/// What this deploy changed so far, to undo it before the commit.
struct Progress<R> {
    /// Containers started, with the engine of their machine.
    started: Vec<(R, ContainerId)>,
    /// Old containers stopped, with the engine of their machine.
    stopped: Vec<(R, ContainerId)>,
    /// Volumes whose content this deploy may have changed, with the deploy point to return to.
    touched_volumes: Vec<(VolumeName, SnapshotName)>,
    /// Deploy-point snapshots this deploy used; stale once it is undone.
    deploy_points: Vec<(VolumeName, SnapshotName)>,
    /// Volumes this deploy created.
    created_volumes: Vec<VolumeName>,
}

impl<R> Default for Progress<R> {
    fn default() -> Self {
        Self {
            started: Vec::new(),
            stopped: Vec::new(),
            touched_volumes: Vec::new(),
            deploy_points: Vec::new(),
            created_volumes: Vec::new(),
        }
    }
}

impl<S: Store, R: ContainerRuntime, V: VolumeBackend> Deployer<S, R, V> {
    pub fn new(deps: DeployerDeps<S, R, V>) -> Self {
        Self {
            leases: Leases::new(deps.store.clone()),
            store: deps.store,
            runtime: deps.runtime,
            volumes: deps.volumes,
            machine: deps.machine,
            runner: deps.runner,
            lease_ttl: NAMESPACE_LEASE_TTL,
            routing: Arc::new(NoRouting),
            container_dns: Vec::new(),
            peers: None,
            found_peers: Arc::default(),
        }
    }

    /// Lets placements name other machines, whose engines `peers` drives.
    pub fn with_peers(mut self, peers: PeerRuntimes<R>) -> Self {
        self.peers = Some(peers);
        self
    }

    /// The engine of `machine`, or why it cannot run containers now: not a
    /// member, not active, or without a place in the overlay.
    async fn runtime_on(&self, machine: &str) -> Result<R, String> {
        if machine == self.machine {
            return Ok(self.runtime.clone());
        }
        let Some(peers) = &self.peers else {
            return Err("this machine places containers on itself only (no overlay)".to_owned());
        };
        if let Some(found) = self.found_peers().get(machine) {
            return Ok(found.clone());
        }
        let key =
            Key::from_segments(["machines", machine]).map_err(|_| "not a machine id".to_owned())?;
        let record = match self.store.get(&key).await {
            Ok(Some(record)) => record
                .decode::<MachineRecord>()
                .map_err(|error| format!("its record is unreadable: {error}"))?,
            Ok(None) => return Err("not a member of this network".to_owned()),
            Err(error) => {
                return Err(format!(
                    "cannot read its record: {}",
                    crate::error_chain(&error)
                ));
            }
        };
        if record.membership != Membership::Active {
            return Err(format!(
                "it is `{}`, not active",
                record.membership.as_str()
            ));
        }
        let mesh = record
            .mesh
            .ok_or_else(|| "it has no place in the overlay".to_owned())?;
        let runtime = peers(machine, mesh.overlay_address);
        self.found_peers()
            .insert(machine.to_owned(), runtime.clone());
        Ok(runtime)
    }

    fn found_peers(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, R>> {
        // The map holds no invariant a panicking holder could break.
        self.found_peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// [`Self::runtime_on`] for a step that needs the engine.
    async fn engine(&self, machine: &str) -> Result<R, RuntimeError> {
        self.runtime_on(machine)
            .await
            .map_err(|reason| RuntimeError::Unavailable {
                context: format!("machine `{machine}`: {reason}"),
                source: None,
            })
    }

    /// Every machine a deploy of `manifest` touches: this one, its
    /// placements, and where the head commit's containers run.
    fn involved_machines(&self, manifest: &Manifest, head: Option<&DeployRecord>) -> Vec<String> {
        let mut machines = BTreeSet::from([self.machine.clone()]);
        for service in manifest.services.values() {
            machines.extend(replica_machines(service, &self.machine));
        }
        for service in head.iter().flat_map(|head| head.services.values()) {
            machines.extend(service.containers.iter().map(|c| c.machine.clone()));
        }
        machines.into_iter().collect()
    }

    /// Every machine a deploy of `manifest` looks at: the ones it touches
    /// and, when it can reach other machines, every active member, so that
    /// containers of the namespace left on a machine no commit names any
    /// more (a cleanup that could not reach it) are found and removed.
    async fn observed_machines(
        &self,
        manifest: &Manifest,
        head: Option<&DeployRecord>,
    ) -> Vec<String> {
        let mut machines: BTreeSet<String> =
            self.involved_machines(manifest, head).into_iter().collect();
        if self.peers.is_some() {
            match self.store.list(&MachineRecord::prefix()).await {
                Ok(records) => machines.extend(
                    records
                        .iter()
                        .filter_map(|record| record.decode::<MachineRecord>().ok())
                        .filter(|machine| machine.membership == Membership::Active)
                        .map(|machine| machine.id),
                ),
                Err(error) => tracing::warn!(
                    error = %crate::error_chain(&error),
                    "cannot list the members; looking only at the machines this deploy touches"
                ),
            }
        }
        machines.into_iter().collect()
    }

    /// The containers carrying `filter` on each of `machines`, asked of all
    /// machines at once (one that does not answer costs one connect timeout,
    /// not one per machine). A machine's entry says why it could not answer.
    async fn list_on(
        &self,
        machines: &[String],
        filter: &BTreeMap<String, String>,
    ) -> Vec<(String, Result<(R, Vec<ContainerInfo>), Unlisted>)> {
        let asks = machines.iter().map(|machine| async move {
            let listed = match self.runtime_on(machine).await {
                Ok(runtime) => match runtime.list(filter).await {
                    Ok(found) => Ok((runtime, found)),
                    Err(error) => Err(Unlisted::Engine(error)),
                },
                Err(reason) => Err(Unlisted::Unavailable(reason)),
            };
            (machine.clone(), listed)
        });
        futures::future::join_all(asks).await
    }

    /// Points containers at this machine's DNS, searching their namespace's
    /// zone so a bare service name resolves.
    pub fn with_container_dns(mut self, servers: Vec<std::net::IpAddr>) -> Self {
        self.container_dns = servers;
        self
    }

    /// Makes cleanup wait for `routing` to serve each commit before the
    /// replaced instances stop.
    pub fn with_routing(mut self, routing: Arc<dyn RouteServing>) -> Self {
        self.routing = routing;
        self
    }

    /// Overrides how long a crashed deploy keeps its namespace locked.
    pub fn with_lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// The plan `manifest` would run now, without changing anything.
    pub async fn preview(&self, manifest: &Manifest) -> Result<DeployPlan, DeployError> {
        let observed = self.observe(manifest).await?;
        Ok(plan::plan(manifest, &observed)?)
    }

    /// The namespace's commits, oldest first.
    pub async fn history(&self, namespace: &str) -> Result<Vec<DeployRecord>, DeployError> {
        let records = self.store.list(&history_prefix(namespace)).await?;
        records
            .iter()
            .map(|record| record.decode::<DeployRecord>().map_err(DeployError::from))
            .collect()
    }

    /// One commit.
    pub async fn show(
        &self,
        commit: &super::record::CommitId,
    ) -> Result<DeployRecord, DeployError> {
        self.store
            .get(&commit.key())
            .await?
            .ok_or_else(|| DeployError::NoSuchCommit {
                commit: commit.to_string(),
            })?
            .decode()
            .map_err(DeployError::from)
    }

    /// Deploys `manifest` as operation `run`, recording each step in it. The
    /// namespace's lease is renewed while the deploy runs and proven held at the commit.
    pub async fn apply(
        &self,
        run: &mut OperationRun<S>,
        manifest: &Manifest,
    ) -> Result<DeployOutcome, DeployError> {
        let namespace = manifest.namespace.clone();
        let lease = watch::channel(self.lock(&namespace, &run.id().to_string()).await?).0;
        let done = CancellationToken::new();
        let work = async {
            let result = self.apply_locked(run, manifest, &lease).await;
            done.cancel();
            result
        };
        let keeper = self.leases.keep_alive(&lease, self.lease_ttl, done.clone());
        let (result, kept) = tokio::join!(work, keeper);
        if let Err(error) = kept {
            tracing::warn!(%namespace, error = %crate::error_chain(&error), "namespace lease was lost during the deploy");
        }
        let current = lease.borrow().clone();
        if let Err(error) = self.leases.release(&current).await {
            tracing::warn!(%namespace, error = %crate::error_chain(&error), "could not release the namespace lease; it expires on its own");
        }
        result
    }

    async fn apply_locked(
        &self,
        run: &mut OperationRun<S>,
        manifest: &Manifest,
        lease: &watch::Sender<Lease>,
    ) -> Result<DeployOutcome, DeployError> {
        let operation = run.id().to_string();
        // An earlier attempt of this operation may have committed before its
        // runner died: then the commit stands, and only its cleanup is left.
        if let Some(record) = self
            .history(&manifest.namespace)
            .await?
            .into_iter()
            .rev()
            .find(|record| record.operation == operation)
        {
            run.step(
                "commit",
                StepStatus::Skipped,
                format!("{} was committed by an earlier attempt", record.commit),
            )
            .await?;
            let observed = self.observe(&record.manifest).await?;
            let plan = plan::plan(&record.manifest, &observed)?;
            let cleanup_failures = self.clean_up(run, &plan, &record).await?;
            return Ok(DeployOutcome {
                record,
                plan,
                cleanup_failures,
                resumed: true,
            });
        }

        self.clear_leftovers(run, manifest).await?;
        let observed = self.observe(manifest).await?;
        let plan = plan::plan(manifest, &observed)?;
        run.step(
            "plan",
            StepStatus::Done,
            format!(
                "commit {} on {}: {}",
                plan.commit,
                plan.machine,
                summarize(&plan)
            ),
        )
        .await?;

        let mut progress = Progress::default();
        let mut containers: BTreeMap<String, Vec<ContainerRecord>> = BTreeMap::new();
        let mut volume_records = BTreeMap::new();
        for service_plan in &plan.services {
            let service = &manifest.services[&service_plan.service];
            let step = format!("service {}", service_plan.service);
            match self
                .deploy_service(run, manifest, service, service_plan, &plan, &mut progress)
                .await
            {
                Ok(records) => {
                    containers.insert(service_plan.service.clone(), records);
                }
                Err(cause) => {
                    let unhealthy = matches!(&cause, StepCause::Health(_));
                    let cause = cause.to_string();
                    run.step(&step, StepStatus::Failed, cause.clone()).await?;
                    let undone = self.undo(&progress).await;
                    run.step("undo", StepStatus::Done, undone.clone()).await?;
                    return Err(DeployError::StepFailed {
                        step,
                        cause,
                        undone,
                        unhealthy,
                    });
                }
            }
        }
        for volume in &plan.volumes {
            volume_records.insert(
                volume.volume.clone(),
                VolumeRecord {
                    service: volume.service.clone(),
                    machine: self.machine.clone(),
                    deploy_point: volume.deploy_point.clone(),
                    restored_from: volume.restore.clone(),
                },
            );
        }

        let record = DeployRecord {
            commit: plan.commit.clone(),
            operation,
            created_at_unix_ms: now_unix_ms(),
            machine: self.machine.clone(),
            manifest: manifest.clone(),
            reverts: manifest.reverts.clone(),
            routes: routes(manifest, &containers),
            services: plan
                .services
                .iter()
                .map(|s| {
                    (
                        s.service.clone(),
                        ServiceRecord {
                            config_hash: s.config_hash.clone(),
                            ports: manifest
                                .services
                                .get(&s.service)
                                .map(|service| service.ports.clone())
                                .unwrap_or_default(),
                            containers: containers.get(&s.service).cloned().unwrap_or_default(),
                        },
                    )
                })
                .collect(),
            volumes: volume_records,
        };

        // The point of no return: prove the namespace is still ours, then write
        // the one record that makes this deploy true.
        let held = lease.borrow().clone();
        if let Err(error) = self.leases.ensure_held(&held).await {
            let undone = self.undo(&progress).await;
            run.step(
                "commit",
                StepStatus::Failed,
                format!("{error}; undone: {undone}"),
            )
            .await?;
            return Err(error.into());
        }
        let key = record.commit.key();
        match self.store.create(&key, encode(&key, &record)?).await {
            Ok(_) => {}
            Err(StoreError::AlreadyExists { .. }) => {
                let undone = self.undo(&progress).await;
                run.step(
                    "commit",
                    StepStatus::Failed,
                    format!("{} exists; undone: {undone}", record.commit),
                )
                .await?;
                return Err(DeployError::CommitConflict {
                    commit: record.commit.to_string(),
                });
            }
            Err(error) => {
                let undone = self.undo(&progress).await;
                run.step(
                    "commit",
                    StepStatus::Failed,
                    format!("{error}; undone: {undone}"),
                )
                .await?;
                return Err(error.into());
            }
        }
        run.step("commit", StepStatus::Done, record.commit.to_string())
            .await?;

        let cleanup_failures = self.clean_up(run, &plan, &record).await?;
        Ok(DeployOutcome {
            record,
            plan,
            cleanup_failures,
            resumed: false,
        })
    }

    /// Takes the namespace's lease for `operation`; held by anyone else, even
    /// another operation of this daemon, it is a conflict.
    async fn lock(&self, namespace: &str, operation: &str) -> Result<Lease, DeployError> {
        let holder = format!("{} (operation {operation})", self.runner);
        self.leases
            .acquire(&format!("ns-{namespace}"), &holder, self.lease_ttl)
            .await
            .map_err(|error| match error {
                LeaseError::Held { holder, .. } => DeployError::Locked {
                    namespace: namespace.to_owned(),
                    holder,
                },
                other @ (LeaseError::Lost { .. }
                | LeaseError::InvalidName { .. }
                | LeaseError::InvalidTtl { .. }
                | LeaseError::Store(_)) => DeployError::Lease(other),
            })
    }

    /// Observes what the planner needs.
    async fn observe(&self, manifest: &Manifest) -> Result<Observation, DeployError> {
        // One read of every namespace's latest commit: ours is the head, the
        // others' routes are what ours must not take.
        let mut heads = self.heads().await?;
        let head = heads.remove(&manifest.namespace);
        let other_routes = heads
            .into_iter()
            .flat_map(|(other, commit)| {
                commit
                    .routes
                    .into_iter()
                    .map(move |route| (other.clone(), route))
            })
            .collect();
        let filter = BTreeMap::from([
            (labels::MANAGED.to_owned(), "true".to_owned()),
            (labels::NAMESPACE.to_owned(), manifest.namespace.clone()),
        ]);
        // This machine's engine failing fails the deploy; another machine's
        // makes that machine unavailable, which fails the plan only when a
        // placement names it.
        let mut containers = Vec::new();
        let mut unavailable = BTreeMap::new();
        let mut runtimes = BTreeMap::new();
        let machines = self.observed_machines(manifest, head.as_ref()).await;
        for (machine, listed) in self.list_on(&machines, &filter).await {
            match listed {
                Ok((runtime, found)) => {
                    containers.extend(found.into_iter().map(|info| (machine.clone(), info)));
                    runtimes.insert(machine, runtime);
                }
                Err(Unlisted::Engine(error)) if machine == self.machine => {
                    return Err(error.into());
                }
                Err(Unlisted::Engine(error)) => {
                    unavailable.insert(machine, crate::error_chain(&error));
                }
                Err(Unlisted::Unavailable(reason)) => {
                    unavailable.insert(machine, reason);
                }
            }
        }
        let mut images = BTreeMap::new();
        for service in manifest.services.values() {
            for machine in replica_machines(service, &self.machine) {
                let Some(runtime) = runtimes.get(&machine) else {
                    continue;
                };
                let key = (machine.clone(), service.image.clone());
                if images.contains_key(&key) {
                    continue;
                }
                match runtime.image_exists(&service.image).await {
                    Ok(present) => {
                        images.insert(key, present);
                    }
                    Err(error) if machine == self.machine => return Err(error.into()),
                    Err(error) => {
                        unavailable.insert(machine, crate::error_chain(&error));
                    }
                }
            }
        }
        let capabilities = self.volumes.capabilities();
        let mut volumes = BTreeMap::new();
        for service in manifest.services.values() {
            for mount in &service.volumes {
                let name = VolumeName::new(&manifest.namespace, &mount.name)?;
                let exists = self.volumes.get(&name).await?.is_some();
                let snapshots = if exists && capabilities.snapshots {
                    self.volumes
                        .snapshots(&name)
                        .await?
                        .into_iter()
                        .map(|s| s.name.as_str().to_owned())
                        .collect()
                } else {
                    Vec::new()
                };
                volumes.insert(mount.name.clone(), VolumeObservation { exists, snapshots });
            }
        }
        Ok(Observation {
            other_routes,
            tls_files: tls_files(manifest),
            machine: self.machine.clone(),
            head,
            containers,
            images,
            unavailable,
            volumes,
            storage: capabilities,
            storage_kind: self.volumes.kind(),
        })
    }

    /// Every namespace's latest commit.
    async fn heads(&self) -> Result<BTreeMap<String, DeployRecord>, DeployError> {
        let prefix = crate::store::KeyPrefix::new("deploys").expect("a valid prefix");
        let records = self.store.list(&prefix).await?;
        // Keys sort by namespace then zero-padded sequence: the last record
        // of each namespace is its latest commit.
        let mut latest: BTreeMap<String, &crate::store::Record> = BTreeMap::new();
        for record in &records {
            if let Some((namespace, _)) =
                ployz_routing::table::parse_commit_key(record.key.as_str())
            {
                latest.insert(namespace.to_owned(), record);
            }
        }
        latest
            .into_iter()
            .map(|(namespace, record)| Ok((namespace, record.decode()?)))
            .collect()
    }

    /// Clears what an interrupted deploy at the next commit left behind (this
    /// operation's earlier attempt, or another operation whose runner died):
    /// its containers can never be committed, so they are removed. Its
    /// deploy-point snapshots are kept, and the volume returned to them, only
    /// where the volume's service has not run since (it was stopped for the
    /// deploy); elsewhere the snapshot is stale and is destroyed so this deploy
    /// takes a fresh one.
    async fn clear_leftovers(
        &self,
        run: &mut OperationRun<S>,
        manifest: &Manifest,
    ) -> Result<(), DeployError> {
        let head = self.history(&manifest.namespace).await?.pop();
        let next = super::record::CommitId {
            namespace: manifest.namespace.clone(),
            seq: head.as_ref().map_or(1, |head| head.commit.seq + 1),
        };
        let filter = BTreeMap::from([
            (labels::MANAGED.to_owned(), "true".to_owned()),
            (labels::DEPLOY.to_owned(), next.to_string()),
        ]);
        let mut leftovers = 0;
        let machines = self.observed_machines(manifest, head.as_ref()).await;
        for (machine, listed) in self.list_on(&machines, &filter).await {
            // A machine that cannot be reached now fails the plan if the
            // deploy places on it; otherwise its leftovers wait for a
            // deploy that can reach it.
            let (runtime, found) = match listed {
                Ok(listed) => listed,
                Err(Unlisted::Engine(error)) if machine == self.machine => {
                    return Err(error.into());
                }
                Err(Unlisted::Engine(_) | Unlisted::Unavailable(_)) => continue,
            };
            for container in &found {
                runtime.remove(&container.id).await?;
            }
            leftovers += found.len();
        }

        let mut restored = Vec::new();
        let mut discarded = Vec::new();
        if self.volumes.capabilities().snapshots {
            let deploy_point = SnapshotName::new(&next.deploy_point())?;
            for (service_name, service) in &manifest.services {
                if service.volumes.is_empty() {
                    continue;
                }
                let head_containers = head
                    .as_ref()
                    .and_then(|head| head.services.get(service_name))
                    .map(|record| record.containers.clone())
                    .unwrap_or_default();
                let mut service_ran = false;
                for container in &head_containers {
                    let info = self
                        .engine(&container.machine)
                        .await?
                        .inspect(&ContainerId(container.id.clone()))
                        .await?;
                    service_ran |= info.is_some_and(|info| info.state == ContainerState::Running);
                }
                for mount in &service.volumes {
                    let name = VolumeName::new(&manifest.namespace, &mount.name)?;
                    let left = self.volumes.get(&name).await?.is_some()
                        && self
                            .volumes
                            .snapshots(&name)
                            .await?
                            .iter()
                            .any(|s| s.name == deploy_point);
                    if !left {
                        continue;
                    }
                    if service_ran {
                        self.volumes.destroy_snapshot(&name, &deploy_point).await?;
                        discarded.push(name.to_string());
                    } else {
                        self.volumes.rollback(&name, &deploy_point).await?;
                        restored.push(name.to_string());
                    }
                }
            }
        }
        let status = if leftovers == 0 && restored.is_empty() && discarded.is_empty() {
            StepStatus::Skipped
        } else {
            StepStatus::Done
        };
        let detail = if status == StepStatus::Skipped {
            format!("nothing left by an interrupted {next}")
        } else {
            format!(
                "removed {leftovers} container(s) of an interrupted {next}; volumes returned to {}: {restored:?}; stale snapshots discarded: {discarded:?}",
                next.deploy_point()
            )
        };
        run.step("clear_leftovers", status, detail).await?;
        Ok(())
    }

    /// Brings one service to its planned state, recording what it changed.
    async fn deploy_service(
        &self,
        run: &mut OperationRun<S>,
        manifest: &Manifest,
        service: &Service,
        service_plan: &ServicePlan,
        plan: &DeployPlan,
        progress: &mut Progress<R>,
    ) -> Result<Vec<ContainerRecord>, StepCause> {
        let name = &service_plan.service;
        let step = format!("service {name}");
        if service_plan.strategy == Strategy::StopFirst
            && service_plan.action != ServiceAction::Keep
        {
            for container in &service_plan.current {
                let id = ContainerId(container.id.clone());
                let runtime = self.engine(&container.machine).await?;
                runtime.stop(&id, service.stop_grace_period).await?;
                progress.stopped.push((runtime, id));
            }
        }
        // Volumes: create, take the deploy point (also for a kept service: a
        // live, crash-consistent snapshot), restore when asked.
        for volume_plan in plan.volumes.iter().filter(|v| &v.service == name) {
            let volume = VolumeName::new(&manifest.namespace, &volume_plan.volume)?;
            if volume_plan.create && self.volumes.get(&volume).await?.is_none() {
                self.volumes.create(&volume).await?;
                progress.created_volumes.push(volume.clone());
            }
            if let Some(snapshot) = &volume_plan.deploy_point {
                let snapshot = SnapshotName::new(snapshot)?;
                let exists = self
                    .volumes
                    .snapshots(&volume)
                    .await?
                    .iter()
                    .any(|s| s.name == snapshot);
                if !exists {
                    self.volumes.snapshot(&volume, &snapshot).await?;
                }
                progress
                    .deploy_points
                    .push((volume.clone(), snapshot.clone()));
                if service_plan.action != ServiceAction::Keep {
                    progress.touched_volumes.push((volume.clone(), snapshot));
                }
            }
            if let Some(restore) = &volume_plan.restore {
                self.volumes
                    .rollback(&volume, &SnapshotName::new(restore)?)
                    .await?;
            }
        }
        if service_plan.action == ServiceAction::Keep {
            run.step(&step, StepStatus::Skipped, "unchanged and running")
                .await?;
            return Ok(service_plan.current.clone());
        }

        run.step(
            &step,
            StepStatus::Started,
            format!(
                "{} ({})",
                service_plan.action.as_str(),
                service_plan.strategy.as_str()
            ),
        )
        .await?;
        let mut started = Vec::new();
        for replica in 0..service_plan.replicas {
            let machine = service_plan
                .machines
                .get(replica as usize)
                .cloned()
                .unwrap_or_else(|| self.machine.clone());
            let runtime = self.engine(&machine).await?;
            let spec = self
                .container_spec(manifest, service, service_plan, plan, replica, run)
                .await?;
            let id = runtime.create(&spec).await?;
            progress.started.push((runtime.clone(), id.clone()));
            runtime.start(&id).await?;
            started.push((replica, machine, runtime, spec.name, id));
        }
        let mut records = Vec::new();
        for (replica, machine, runtime, container_name, id) in started {
            health::wait_ready(&runtime, &id, service.health.as_ref()).await?;
            let addresses = runtime
                .inspect(&id)
                .await?
                .map(|info| info.addresses.iter().map(ToString::to_string).collect())
                .unwrap_or_default();
            records.push(ContainerRecord {
                id: id.0,
                name: container_name,
                replica,
                machine,
                addresses,
            });
        }
        let ids: Vec<String> = records
            .iter()
            .map(|r| format!("{} on {}", short(&r.id), r.machine))
            .collect();
        run.step(
            &step,
            StepStatus::Done,
            format!("healthy: {}", ids.join(", ")),
        )
        .await?;
        Ok(records)
    }

    async fn container_spec(
        &self,
        manifest: &Manifest,
        service: &Service,
        service_plan: &ServicePlan,
        plan: &DeployPlan,
        replica: u32,
        run: &OperationRun<S>,
    ) -> Result<ContainerSpec, StepCause> {
        let mut mounts = Vec::new();
        for mount in &service.volumes {
            let name = VolumeName::new(&manifest.namespace, &mount.name)?;
            let volume =
                self.volumes
                    .get(&name)
                    .await?
                    .ok_or_else(|| StorageError::NoSuchVolume {
                        volume: name.to_string(),
                    })?;
            mounts.push(Mount {
                host_path: volume.path,
                container_path: mount.mount.clone(),
                read_only: false,
            });
        }
        let labels = BTreeMap::from([
            (labels::MANAGED.to_owned(), "true".to_owned()),
            (labels::NAMESPACE.to_owned(), manifest.namespace.clone()),
            (labels::SERVICE.to_owned(), service_plan.service.clone()),
            (labels::DEPLOY.to_owned(), plan.commit.to_string()),
            (labels::OPERATION.to_owned(), run.id().to_string()),
            (labels::REPLICA.to_owned(), replica.to_string()),
            (
                labels::CONFIG_HASH.to_owned(),
                service_plan.config_hash.clone(),
            ),
        ]);
        Ok(ContainerSpec {
            name: format!(
                "ployz-{}-{}-{}-{replica}",
                manifest.namespace, service_plan.service, plan.commit.seq
            ),
            image: service.image.clone(),
            entrypoint: service.entrypoint.clone(),
            command: service.command.clone(),
            env: service.env.clone(),
            labels,
            mounts,
            memory_bytes: service.resources.memory_bytes(),
            cpu_millis: service.resources.cpu_millis(),
            stop_grace: service.stop_grace_period,
            dns: self.container_dns.clone(),
            dns_search: if self.container_dns.is_empty() {
                Vec::new()
            } else {
                vec![format!("{}.{}", manifest.namespace, ployz_routing::ZONE)]
            },
        })
    }

    /// Undoes a deploy that will not commit; returns what it did, in words.
    /// Best effort: every step is tried, and failures are named.
    async fn undo(&self, progress: &Progress<R>) -> String {
        let mut done = Vec::new();
        for (runtime, id) in progress.started.iter().rev() {
            match runtime.remove(id).await {
                Ok(()) => done.push(format!("removed new container {}", short(&id.0))),
                Err(error) => done.push(format!(
                    "FAILED to remove new container {}: {error}",
                    short(&id.0)
                )),
            }
        }
        for (volume, snapshot) in &progress.touched_volumes {
            match self.volumes.rollback(volume, snapshot).await {
                Ok(()) => done.push(format!("restored volume {volume} to {snapshot}")),
                Err(error) => done.push(format!(
                    "FAILED to restore volume {volume} to {snapshot}: {error}"
                )),
            }
        }
        for (runtime, id) in &progress.stopped {
            match runtime.start(id).await {
                Ok(()) => done.push(format!("restarted old container {}", short(&id.0))),
                Err(error) => done.push(format!(
                    "FAILED to restart old container {}: {error}",
                    short(&id.0)
                )),
            }
        }
        // The old containers run again, so these deploy points no longer
        // describe their volumes: a later deploy must take fresh ones.
        for (volume, snapshot) in &progress.deploy_points {
            if let Err(error) = self.volumes.destroy_snapshot(volume, snapshot).await {
                done.push(format!(
                    "FAILED to discard snapshot {volume}@{snapshot}: {error}"
                ));
            }
        }
        if !progress.created_volumes.is_empty() {
            let names: Vec<String> = progress
                .created_volumes
                .iter()
                .map(ToString::to_string)
                .collect();
            done.push(format!("kept new empty volumes {names:?}"));
        }
        if done.is_empty() {
            "nothing to undo".to_owned()
        } else {
            done.join("; ")
        }
    }

    /// Removes what the commit replaced: old containers of replaced services,
    /// containers of removed services, and orphans.
    async fn clean_up(
        &self,
        run: &mut OperationRun<S>,
        plan: &DeployPlan,
        record: &DeployRecord,
    ) -> Result<Vec<(String, String)>, DeployError> {
        // Containers are known by (machine, id).
        let kept: Vec<(&str, &str)> = record
            .services
            .values()
            .flat_map(|s| {
                s.containers
                    .iter()
                    .map(|c| (c.machine.as_str(), c.id.as_str()))
            })
            .collect();
        // (container id, its machine, stop grace)
        let mut doomed: Vec<(String, String, Duration)> = Vec::new();
        for service in &plan.services {
            let grace = record
                .manifest
                .services
                .get(&service.service)
                .map_or(Duration::from_secs(10), |s| s.stop_grace_period);
            doomed.extend(
                service
                    .current
                    .iter()
                    .map(|c| (c.id.clone(), c.machine.clone(), grace)),
            );
        }
        for removed in &plan.removed_services {
            doomed.extend(
                removed
                    .containers
                    .iter()
                    .map(|c| (c.id.clone(), c.machine.clone(), Duration::from_secs(10))),
            );
        }
        doomed.extend(
            plan.orphans
                .iter()
                .map(|o| (o.id.clone(), o.machine.clone(), Duration::from_secs(10))),
        );
        doomed.retain(|(id, machine, _)| !kept.contains(&(machine.as_str(), id.as_str())));
        doomed.sort();
        doomed.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);

        // Even a first deploy waits, so that when it returns its routes answer.
        self.switch_traffic(run, &record.commit, !doomed.is_empty())
            .await?;

        let mut failures = Vec::new();
        for (id, machine, grace) in &doomed {
            let id = ContainerId(id.clone());
            let result = async {
                let runtime = self.engine(machine).await?;
                if let Some(info) = runtime.inspect(&id).await?
                    && info.state == ContainerState::Running
                {
                    runtime.stop(&id, *grace).await?;
                }
                runtime.remove(&id).await
            }
            .await;
            if let Err(error) = result {
                failures.push((id.0.clone(), crate::error_chain(&error)));
            }
        }
        let status = if !failures.is_empty() {
            StepStatus::Failed
        } else if doomed.is_empty() {
            StepStatus::Skipped
        } else {
            StepStatus::Done
        };
        let detail = if failures.is_empty() {
            format!("removed {} replaced container(s)", doomed.len())
        } else {
            format!(
                "could not remove {:?}; the next deploy of the namespace removes them",
                failures
                    .iter()
                    .map(|(id, why)| format!("{}: {why}", short(id)))
                    .collect::<Vec<_>>()
            )
        };
        run.step("cleanup", status, detail).await?;
        Ok(failures)
    }
}

impl<S: Store, R: ContainerRuntime, V: VolumeBackend> Deployer<S, R, V> {
    /// Waits for the routing processes to serve `commit`, so that no request
    /// reaches an instance cleanup is about to stop (`drain`: give requests
    /// already sent to those instances a moment). Not confirming in time is
    /// reported and cleanup goes on: the commit stands either way.
    async fn switch_traffic(
        &self,
        run: &mut OperationRun<S>,
        commit: &super::record::CommitId,
        drain: bool,
    ) -> Result<(), DeployError> {
        let (status, detail) = match self.routing.wait_served(commit, traffic::SERVE_WAIT).await {
            Served::Confirmed { by } => {
                if drain {
                    tokio::time::sleep(traffic::DRAIN).await;
                }
                (
                    StepStatus::Done,
                    format!("{} serve {commit}", by.join(" and ")),
                )
            }
            Served::NoRouting => (
                StepStatus::Skipped,
                "no routing process on this machine".to_owned(),
            ),
            Served::Unconfirmed { detail } => (
                StepStatus::Failed,
                format!("{commit} not confirmed served: {detail}; replaced instances stop anyway"),
            ),
        };
        run.step("traffic", status, detail).await?;
        Ok(())
    }
}

/// Why a machine's containers could not be listed.
enum Unlisted {
    /// The machine cannot run containers now (not a member, not reachable).
    Unavailable(String),
    /// Its engine answered with a failure.
    Engine(RuntimeError),
}

/// Why a service step failed.
#[derive(Debug, thiserror::Error)]
enum StepCause {
    #[error("not healthy: {0}")]
    Health(#[from] HealthError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Journal(#[from] JournalError),
}

fn routes(
    manifest: &Manifest,
    containers: &BTreeMap<String, Vec<ContainerRecord>>,
) -> Vec<RouteRecord> {
    manifest
        .services
        .iter()
        .flat_map(|(name, service)| {
            service.routes.iter().map(move |route| RouteRecord {
                instances: containers
                    .get(name)
                    .into_iter()
                    .flatten()
                    .flat_map(|c| {
                        c.addresses
                            .iter()
                            .map(|address| format_socket(address, route.port))
                    })
                    .collect(),
                ..super::plan::summary(name, route)
            })
        })
        .collect()
}

/// Whether each TLS file the manifest names can be read here, as PEM.
fn tls_files(manifest: &Manifest) -> BTreeMap<String, Option<String>> {
    manifest
        .services
        .values()
        .flat_map(|service| service.routes.iter())
        .filter_map(|route| route.tls.as_ref())
        .flat_map(|tls| [tls.certificate.clone(), tls.key.clone()])
        .map(|path| {
            let problem = match std::fs::read(&path) {
                Ok(bytes) if bytes.windows(11).any(|w| w == b"-----BEGIN ") => None,
                Ok(_) => Some("not a PEM file".to_owned()),
                Err(error) => Some(error.to_string()),
            };
            (path, problem)
        })
        .collect()
}

fn format_socket(address: &str, port: u16) -> String {
    if address.contains(':') {
        format!("[{address}]:{port}")
    } else {
        format!("{address}:{port}")
    }
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// One line describing a plan, for the journal.
pub fn summarize(plan: &DeployPlan) -> String {
    let count = |action: ServiceAction| plan.services.iter().filter(|s| s.action == action).count();
    format!(
        "{} to create, {} to replace, {} to keep, {} to remove; {} volume(s); routes {}",
        count(ServiceAction::Create),
        count(ServiceAction::Replace),
        count(ServiceAction::Keep),
        plan.removed_services.len(),
        plan.volumes.len(),
        if plan.routes.changed {
            "change"
        } else {
            "unchanged"
        }
    )
}
