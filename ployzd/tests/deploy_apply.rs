//! The deploy executor against the memory store, the memory runtime and the
//! plain-directory volume backend: every path of apply (create, zero-downtime
//! replace, keep, undo on an unhealthy service, a locked namespace, cleanup of
//! removed services) without Docker. The same flows run on real Docker and
//! btrfs in the workspace's `tests/tests/deploy.rs`.

use std::time::Duration;

use ployzd::{
    coordination::{Begin, Journal, OperationId, OperationRun},
    deploy::{DeployError, DeployOutcome, Deployer, DeployerDeps, Manifest, PlanError},
    runtime::{
        ContainerRuntime, ContainerState, ExecOutput, labels,
        memory::{ExecReply, MemoryRuntime},
    },
    storage::dir::DirVolumes,
    store::{lease::Leases, memory::MemoryStore},
};

struct World {
    store: MemoryStore,
    runtime: MemoryRuntime,
    deployer: Deployer<MemoryStore, MemoryRuntime, DirVolumes>,
    journal: Journal<MemoryStore>,
    _volumes: tempfile::TempDir,
}

impl World {
    fn new() -> Self {
        let store = MemoryStore::new();
        let runtime = MemoryRuntime::new();
        runtime.add_image("app:v1");
        runtime.add_image("app:v2");
        let dir = tempfile::tempdir().expect("tempdir");
        let volumes = DirVolumes::open(dir.path()).expect("dir volumes");
        let deployer = Deployer::new(DeployerDeps {
            store: store.clone(),
            runtime: runtime.clone(),
            volumes,
            machine: "m-1".to_owned(),
            runner: "test-runner".to_owned(),
        });
        Self {
            journal: Journal::new(store.clone(), "test-runner"),
            store,
            runtime,
            deployer,
            _volumes: dir,
        }
    }

    async fn run(&self, id: &str, manifest: &Manifest) -> OperationRun<MemoryStore> {
        let id = OperationId::parse(id).expect("valid id");
        match self
            .journal
            .begin(&id, "deploy", &manifest.to_toml())
            .await
            .expect("begin")
        {
            Begin::Run(run) => run,
            Begin::Replay(_) => panic!("a new operation must run"),
        }
    }

    async fn deploy(&self, id: &str, manifest: &Manifest) -> Result<DeployOutcome, DeployError> {
        let mut run = self.run(id, manifest).await;
        self.deployer.apply(&mut run, manifest).await
    }

    async fn running(&self, namespace: &str) -> Vec<String> {
        let filter = [(labels::NAMESPACE.to_owned(), namespace.to_owned())].into();
        let mut ids: Vec<String> = self
            .runtime
            .list(&filter)
            .await
            .expect("list")
            .into_iter()
            .filter(|c| c.state == ContainerState::Running)
            .map(|c| c.id.0)
            .collect();
        ids.sort();
        ids
    }

    async fn all(&self, namespace: &str) -> usize {
        let filter = [(labels::NAMESPACE.to_owned(), namespace.to_owned())].into();
        self.runtime.list(&filter).await.expect("list").len()
    }
}

fn manifest(image: &str, extra: &str) -> Manifest {
    Manifest::parse(&format!(
        "namespace = \"shop\"\n[services.web]\nimage = \"{image}\"\nreplicas = 2\n{extra}"
    ))
    .expect("valid manifest")
}

#[tokio::test]
async fn a_first_deploy_commits_its_containers_and_a_changed_one_replaces_them() {
    let world = World::new();
    let v1 = world
        .deploy("op-1", &manifest("app:v1", ""))
        .await
        .expect("v1");
    assert_eq!(v1.record.commit.to_string(), "shop/1");
    let v1_ids: Vec<String> = v1.record.services["web"]
        .containers
        .iter()
        .map(|c| c.id.clone())
        .collect();
    assert_eq!(v1_ids.len(), 2);
    assert_eq!(world.running("shop").await.len(), 2);

    let v2 = world
        .deploy("op-2", &manifest("app:v2", ""))
        .await
        .expect("v2");
    assert_eq!(v2.record.commit.to_string(), "shop/2");
    assert!(v2.cleanup_failures.is_empty());
    let v2_ids: Vec<String> = v2.record.services["web"]
        .containers
        .iter()
        .map(|c| c.id.clone())
        .collect();
    assert!(v2_ids.iter().all(|id| !v1_ids.contains(id)));
    let mut expected = v2_ids.clone();
    expected.sort();
    assert_eq!(world.running("shop").await, expected, "only v2 runs");
    assert_eq!(
        world.all("shop").await,
        2,
        "v1's containers are removed after the commit"
    );
    let history = world.deployer.history("shop").await.expect("history");
    assert_eq!(history.len(), 2);
}

#[tokio::test]
async fn an_identical_redeploy_keeps_the_running_containers() {
    let world = World::new();
    let v1 = world
        .deploy("op-1", &manifest("app:v1", ""))
        .await
        .expect("v1");
    let again = world
        .deploy("op-2", &manifest("app:v1", ""))
        .await
        .expect("again");
    assert_eq!(again.record.services["web"], v1.record.services["web"]);
    assert_eq!(world.all("shop").await, 2);
}

#[tokio::test]
async fn an_unhealthy_service_is_undone_and_nothing_is_committed() {
    let world = World::new();
    world
        .deploy("op-1", &manifest("app:v1", ""))
        .await
        .expect("v1");
    let before = world.running("shop").await;

    world.runtime.set_exec_reply(
        &["check"],
        ExecReply::Output(ExecOutput {
            exit_code: 1,
            stdout: Vec::new(),
            stderr: b"not ready".to_vec(),
        }),
    );
    let broken = manifest(
        "app:v2",
        "health = { command = [\"check\"], interval = \"10ms\", retries = 2 }\n",
    );
    let error = world.deploy("op-2", &broken).await.expect_err("unhealthy");
    let DeployError::StepFailed {
        step,
        unhealthy,
        undone,
        ..
    } = &error
    else {
        panic!("expected StepFailed, got {error}");
    };
    assert_eq!(step, "service web");
    assert!(unhealthy);
    assert!(undone.contains("removed new container"), "{undone}");
    assert_eq!(world.running("shop").await, before, "v1 keeps serving");
    assert_eq!(world.all("shop").await, 2, "the new containers are removed");
    assert_eq!(
        world.deployer.history("shop").await.expect("history").len(),
        1
    );
}

#[tokio::test]
async fn a_locked_namespace_is_a_conflict_before_anything_changes() {
    let world = World::new();
    let other = Leases::new(world.store.clone());
    other
        .acquire("ns-shop", "someone-else", Duration::from_secs(30))
        .await
        .expect("lock");
    let error = world
        .deploy("op-1", &manifest("app:v1", ""))
        .await
        .expect_err("locked");
    assert!(
        matches!(error, DeployError::Locked { ref holder, .. } if holder == "someone-else"),
        "{error}"
    );
    assert_eq!(world.all("shop").await, 0);
}

#[tokio::test]
async fn a_missing_image_fails_the_plan_before_anything_changes() {
    let world = World::new();
    let error = world
        .deploy("op-1", &manifest("app:v3", ""))
        .await
        .expect_err("missing");
    assert!(
        matches!(error, DeployError::Plan(PlanError::ImageMissing { .. })),
        "{error}"
    );
    assert_eq!(world.all("shop").await, 0);
}

#[tokio::test]
async fn a_service_dropped_from_the_manifest_is_removed_after_the_commit() {
    let world = World::new();
    let both = Manifest::parse(
        "namespace = \"shop\"\n[services.web]\nimage = \"app:v1\"\n[services.worker]\nimage = \"app:v1\"\n",
    )
    .expect("valid");
    world.deploy("op-1", &both).await.expect("both");
    assert_eq!(world.all("shop").await, 2);
    let web_only = Manifest::parse("namespace = \"shop\"\n[services.web]\nimage = \"app:v1\"\n")
        .expect("valid");
    let outcome = world.deploy("op-2", &web_only).await.expect("web only");
    assert_eq!(outcome.plan.removed_services.len(), 1);
    assert_eq!(world.all("shop").await, 1);
}

#[tokio::test]
async fn volumes_on_the_dir_backend_deploy_without_deploy_points_and_refuse_restores() {
    let world = World::new();
    let with_volume = Manifest::parse(
        "namespace = \"shop\"\n[services.db]\nimage = \"app:v1\"\n[[services.db.volumes]]\nname = \"data\"\nmount = \"/data\"\n",
    )
    .expect("valid");
    let outcome = world.deploy("op-1", &with_volume).await.expect("deploy");
    assert_eq!(outcome.record.volumes["data"].deploy_point, None);
    let spec = world
        .runtime
        .spec(&ployzd::runtime::ContainerId(
            outcome.record.services["db"].containers[0].id.clone(),
        ))
        .expect("spec");
    assert!(
        spec.mounts[0].host_path.ends_with("volumes/shop/data"),
        "{:?}",
        spec.mounts
    );

    let restore = Manifest::parse(
        "namespace = \"shop\"\n[services.db]\nimage = \"app:v1\"\n[[services.db.volumes]]\nname = \"data\"\nmount = \"/data\"\nrestore = \"deploy-1\"\n",
    )
    .expect("valid");
    let error = world
        .deploy("op-2", &restore)
        .await
        .expect_err("no snapshots");
    assert!(
        matches!(
            error,
            DeployError::Plan(PlanError::SnapshotsUnsupported { .. })
        ),
        "{error}"
    );
}

/// Routing that records, when asked, which containers were running.
struct WatchingRouting {
    runtime: MemoryRuntime,
    answer: ployzd::deploy::traffic::Served,
    running_when_asked: std::sync::Mutex<Vec<(String, usize)>>,
}

impl ployzd::deploy::traffic::RouteServing for WatchingRouting {
    fn wait_served<'a>(
        &'a self,
        commit: &'a ployzd::deploy::CommitId,
        _within: Duration,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = ployzd::deploy::traffic::Served> + Send + 'a>,
    > {
        Box::pin(async move {
            let filter = [(labels::NAMESPACE.to_owned(), commit.namespace.clone())].into();
            let running = self
                .runtime
                .list(&filter)
                .await
                .expect("list")
                .into_iter()
                .filter(|c| c.state == ContainerState::Running)
                .count();
            self.running_when_asked
                .lock()
                .expect("not poisoned")
                .push((commit.to_string(), running));
            self.answer.clone()
        })
    }
}

async fn deploy_with_routing(
    answer: ployzd::deploy::traffic::Served,
) -> (World, std::sync::Arc<WatchingRouting>) {
    let mut world = World::new();
    let routing = std::sync::Arc::new(WatchingRouting {
        runtime: world.runtime.clone(),
        answer,
        running_when_asked: Default::default(),
    });
    world.deployer = world.deployer.clone().with_routing(routing.clone());
    world
        .deploy("op-1", &manifest("app:v1", ""))
        .await
        .expect("v1");
    world
        .deploy("op-2", &manifest("app:v2", ""))
        .await
        .expect("v2 commits whatever routing says");
    (world, routing)
}

async fn traffic_step(world: &World, id: &str) -> (String, String) {
    let (_, steps) = world
        .journal
        .show(&OperationId::parse(id).expect("valid id"))
        .await
        .expect("recorded");
    let step = steps
        .iter()
        .rev()
        .find(|step| step.step == "traffic")
        .expect("a traffic step");
    (step.status.as_str().to_owned(), step.detail.clone())
}

#[tokio::test]
async fn replaced_instances_keep_running_until_routing_serves_the_new_commit() {
    let (world, routing) = deploy_with_routing(ployzd::deploy::traffic::Served::Confirmed {
        by: vec!["gateway".to_owned(), "dns".to_owned()],
    })
    .await;
    assert_eq!(
        *routing.running_when_asked.lock().expect("not poisoned"),
        vec![("shop/1".to_owned(), 2), ("shop/2".to_owned(), 4)],
        "v1's two instances still ran beside v2's when the flip was confirmed"
    );
    assert_eq!(world.running("shop").await.len(), 2, "then v1 was removed");
    let (status, detail) = traffic_step(&world, "op-2").await;
    assert_eq!(status, "done");
    assert_eq!(detail, "gateway and dns serve shop/2");
}

#[tokio::test]
async fn an_unconfirmed_flip_is_reported_and_the_commit_stands() {
    let (world, _routing) = deploy_with_routing(ployzd::deploy::traffic::Served::Unconfirmed {
        detail: "gateway: not answering".to_owned(),
    })
    .await;
    assert_eq!(
        world.deployer.history("shop").await.expect("history").len(),
        2
    );
    assert_eq!(world.running("shop").await.len(), 2);
    let (status, detail) = traffic_step(&world, "op-2").await;
    assert_eq!(status, "failed");
    assert!(detail.contains("gateway: not answering"), "{detail}");
}

/// Three machines, each with its own engine; the deployer runs on `m-1` and
/// drives `m-2` and `m-3` through its peers, as ployzd does over the overlay.
struct Fleet {
    engines: std::collections::BTreeMap<String, MemoryRuntime>,
    deployer: Deployer<MemoryStore, MemoryRuntime, DirVolumes>,
    journal: Journal<MemoryStore>,
    _volumes: tempfile::TempDir,
}

impl Fleet {
    async fn new() -> Self {
        use ployzd::{
            machine::{
                MachineRecord, Membership, NetworkName,
                records::{MachineMesh, StoreRole},
            },
            mesh::addressing::SubnetIndex,
            store::RecordStore,
        };
        let store = MemoryStore::new();
        let engines: std::collections::BTreeMap<String, MemoryRuntime> = ["m-1", "m-2", "m-3"]
            .into_iter()
            .map(|machine| {
                let engine = MemoryRuntime::new();
                engine.add_image("app:v1");
                engine.add_image("app:v2");
                (machine.to_owned(), engine)
            })
            .collect();
        for (index, machine) in ["m-1", "m-2", "m-3"].into_iter().enumerate() {
            let record = MachineRecord {
                id: machine.to_owned(),
                hostname: machine.to_owned(),
                network: NetworkName::parse("fleet").expect("a network name"),
                membership: Membership::Active,
                joined_at_unix_ms: 1,
                mesh: Some(MachineMesh {
                    public_key: String::new(),
                    endpoint: None,
                    subnet: SubnetIndex::new(index as u16 + 1).expect("an index"),
                    overlay_address: format!("fd00:0:0:{}::1", index + 1)
                        .parse()
                        .expect("an address"),
                }),
                store_role: StoreRole::Core,
                route_certificate: None,
            };
            store
                .create(
                    &MachineRecord::key(machine),
                    serde_json::to_vec(&record).expect("encode"),
                )
                .await
                .expect("record the machine");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let volumes = DirVolumes::open(dir.path()).expect("dir volumes");
        let peers = engines.clone();
        let deployer = Deployer::new(DeployerDeps {
            store: store.clone(),
            runtime: engines["m-1"].clone(),
            volumes,
            machine: "m-1".to_owned(),
            runner: "test-runner".to_owned(),
        })
        .with_peers(std::sync::Arc::new(move |machine, _address| {
            // An engine nobody knows has nothing and runs nothing.
            peers.get(machine).cloned().unwrap_or_default()
        }));
        Self {
            journal: Journal::new(store, "test-runner"),
            engines,
            deployer,
            _volumes: dir,
        }
    }

    async fn deploy(&self, id: &str, manifest: &Manifest) -> Result<DeployOutcome, DeployError> {
        let id = OperationId::parse(id).expect("valid id");
        let mut run = match self
            .journal
            .begin(&id, "deploy", &manifest.to_toml())
            .await
            .expect("begin")
        {
            Begin::Run(run) => run,
            Begin::Replay(_) => panic!("a new operation must run"),
        };
        self.deployer.apply(&mut run, manifest).await
    }

    /// Each machine's containers of `shop`: (running ids, all count).
    async fn on(&self, machine: &str) -> (Vec<String>, usize) {
        let filter = [(labels::NAMESPACE.to_owned(), "shop".to_owned())].into();
        let all = self.engines[machine].list(&filter).await.expect("list");
        let mut running: Vec<String> = all
            .iter()
            .filter(|c| c.state == ContainerState::Running)
            .map(|c| c.id.0.clone())
            .collect();
        running.sort();
        (running, all.len())
    }
}

fn spread(image: &str, placement: &str, extra: &str) -> Manifest {
    Manifest::parse(&format!(
        "namespace = \"shop\"\n[services.web]\nimage = \"{image}\"\nreplicas = 3\nplacement = [{placement}]\n{extra}"
    ))
    .expect("valid manifest")
}

const ALL_THREE: &str = "\"m-1\", \"m-2\", \"m-3\"";

#[tokio::test]
async fn replicas_run_on_the_machines_their_placement_names_and_are_replaced_there() {
    let fleet = Fleet::new().await;
    let v1 = fleet
        .deploy("op-1", &spread("app:v1", ALL_THREE, ""))
        .await
        .expect("v1");
    for (replica, machine) in ["m-1", "m-2", "m-3"].into_iter().enumerate() {
        let container = v1.record.services["web"]
            .containers
            .iter()
            .find(|c| c.replica as usize == replica)
            .expect("each replica is recorded");
        assert_eq!(container.machine, machine);
        let (running, all) = fleet.on(machine).await;
        assert_eq!(running, std::slice::from_ref(&container.id), "{machine}");
        assert_eq!(all, 1, "{machine}");
    }

    let v2 = fleet
        .deploy("op-2", &spread("app:v2", ALL_THREE, ""))
        .await
        .expect("v2");
    assert!(v2.cleanup_failures.is_empty(), "{:?}", v2.cleanup_failures);
    for container in &v2.record.services["web"].containers {
        let (running, all) = fleet.on(&container.machine).await;
        assert_eq!(
            running,
            std::slice::from_ref(&container.id),
            "{}",
            container.machine
        );
        assert_eq!(all, 1, "the old replica is gone from {}", container.machine);
    }
}

#[tokio::test]
async fn an_unhealthy_replica_on_another_machine_undoes_the_deploy_on_every_machine() {
    let fleet = Fleet::new().await;
    fleet
        .deploy("op-1", &spread("app:v1", ALL_THREE, ""))
        .await
        .expect("v1");
    let mut before = Vec::new();
    for machine in ["m-1", "m-2", "m-3"] {
        before.push(fleet.on(machine).await);
    }
    // Only machine 3's replica fails its check (the others answer exit 0,
    // the memory engine's default).
    fleet.engines["m-3"].set_exec_reply(
        &["check"],
        ExecReply::Output(ExecOutput {
            exit_code: 1,
            stdout: Vec::new(),
            stderr: b"not ready".to_vec(),
        }),
    );
    let broken = spread(
        "app:v2",
        ALL_THREE,
        "health = { command = [\"check\"], interval = \"10ms\", retries = 2 }\n",
    );
    let error = fleet.deploy("op-2", &broken).await.expect_err("unhealthy");
    let DeployError::StepFailed {
        unhealthy, undone, ..
    } = &error
    else {
        panic!("expected StepFailed, got {error}");
    };
    assert!(unhealthy);
    assert_eq!(
        undone.matches("removed new container").count(),
        3,
        "{undone}"
    );
    for (machine, before) in ["m-1", "m-2", "m-3"].into_iter().zip(before) {
        assert_eq!(fleet.on(machine).await, before, "{machine} is as it was");
    }
    assert_eq!(
        fleet.deployer.history("shop").await.expect("history").len(),
        1
    );
}

#[tokio::test]
async fn a_placement_on_a_machine_that_is_not_a_member_fails_before_anything_changes() {
    let fleet = Fleet::new().await;
    let error = fleet
        .deploy("op-1", &spread("app:v1", "\"m-1\", \"m-9\"", ""))
        .await
        .expect_err("m-9 is no member");
    assert!(
        matches!(
            &error,
            DeployError::Plan(PlanError::PlacementUnavailable { machine, .. }) if machine == "m-9"
        ),
        "{error}"
    );
    for machine in ["m-1", "m-2", "m-3"] {
        assert_eq!(fleet.on(machine).await, (Vec::new(), 0), "{machine}");
    }
}

#[tokio::test]
async fn a_leftover_on_a_machine_the_deploy_does_not_place_on_is_removed() {
    let fleet = Fleet::new().await;
    let two = "\"m-1\", \"m-2\"";
    fleet
        .deploy("op-1", &spread("app:v1", two, ""))
        .await
        .expect("v1");
    // A replica of the namespace that no commit owns sits on machine 3 (a
    // cleanup that could not reach it left it there).
    let leftover = fleet.engines["m-3"]
        .create(&ployzd::runtime::ContainerSpec {
            name: "ployz-shop-web-0-0".to_owned(),
            image: "app:v1".to_owned(),
            labels: [
                (labels::MANAGED.to_owned(), "true".to_owned()),
                (labels::NAMESPACE.to_owned(), "shop".to_owned()),
            ]
            .into(),
            ..Default::default()
        })
        .await
        .expect("create the leftover");
    fleet.engines["m-3"].start(&leftover).await.expect("start");
    assert_eq!(fleet.on("m-3").await.1, 1);

    let v2 = fleet
        .deploy("op-2", &spread("app:v2", two, ""))
        .await
        .expect("v2");
    assert!(v2.cleanup_failures.is_empty(), "{:?}", v2.cleanup_failures);
    assert_eq!(
        fleet.on("m-3").await,
        (Vec::new(), 0),
        "the leftover on machine 3 is gone"
    );
}
