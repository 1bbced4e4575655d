//! The runtime contract: one suite of generic assertions, run against
//! `MemoryRuntime` and against `DockerRuntime` on this machine's Docker engine
//! (with the busybox example image from `ployz-tests`), so the fake cannot
//! drift from the real thing. Every test labels its containers with a value of
//! its own and removes them on drop, even when it fails.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use ployzd::runtime::{
    ContainerId, ContainerRuntime, ContainerSpec, ContainerState, ExecOutput, Mount, RuntimeError,
    docker::DockerRuntime,
    labels,
    memory::{ExecReply, MemoryRuntime, TermBehaviour},
};

/// Stamps out one `#[tokio::test]` per backend for every generic case.
macro_rules! contract {
    ($($case:ident),+ $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::Fixture::memory(stringify!($case))).await;
                }
            )+
        }

        mod docker {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::Fixture::docker(stringify!($case)).await).await;
                }
            )+
        }
    };
}

contract!(
    image_presence_is_reported,
    create_with_a_missing_image_is_image_missing,
    started_container_runs_with_its_labels_and_an_address,
    taken_name_is_name_in_use,
    list_finds_exactly_the_labelled_containers,
    exec_returns_the_exit_code_and_both_streams,
    exec_needs_a_running_container,
    exec_is_bounded_by_its_timeout,
    container_writes_through_a_bind_mount_reach_the_host,
    stop_exits_the_container_and_frees_its_address,
    stop_waits_out_the_grace_then_kills,
    removed_container_is_gone_and_absent_ones_are_fine,
);

/// The workload image (built by `ployz_tests::image` for Docker).
const IMAGE: &str = "ployz-example:test";
const ABSENT_IMAGE: &str = "ployz-absent-image:none";
/// The label whose value is unique to one test: its containers and no others.
const TEST_LABEL: &str = "ployz.test";

/// A command that prints on both streams and fails with a known code.
const ECHO_AND_FAIL: [&str; 3] = ["sh", "-c", "echo hi; echo oops >&2; exit 3"];
/// A command that outlives any exec timeout the tests use.
const SLEEP_LONG: [&str; 2] = ["sleep", "30"];
/// A command that writes a file into the bind-mounted directory.
const WRITE_PROOF: [&str; 3] = ["sh", "-c", "echo written-by-the-container > /data/proof"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Memory,
    Docker,
}

/// One test's runtime and the label value that marks its containers. Dropping
/// it removes every container carrying that value.
struct Fixture<R: ContainerRuntime> {
    runtime: R,
    backend: Backend,
    run: String,
    containers: AtomicU32,
}

impl Fixture<MemoryRuntime> {
    fn memory(case: &str) -> Self {
        let runtime = MemoryRuntime::new();
        runtime.add_image(IMAGE);
        // What the fake cannot know, told up front as the Docker workload behaves:
        // busybox `sh` and `sleep` as PID 1 ignore SIGTERM, and these commands
        // print and exit as a shell would run them.
        runtime.set_term_behaviour(TermBehaviour::IgnoreTerm);
        runtime.set_exec_reply(
            &ECHO_AND_FAIL,
            ExecReply::Output(ExecOutput {
                exit_code: 3,
                stdout: b"hi\n".to_vec(),
                stderr: b"oops\n".to_vec(),
            }),
        );
        runtime.set_exec_reply(&SLEEP_LONG, ExecReply::Hang);
        Self::new(runtime, Backend::Memory, case)
    }
}

impl Fixture<DockerRuntime> {
    async fn docker(case: &str) -> Self {
        tokio::task::spawn_blocking(|| ployz_tests::image::ensure_example_image(IMAGE))
            .await
            .expect("the image build did not panic")
            .expect("build the example image");
        let runtime = DockerRuntime::connect()
            .await
            .expect("connect to the Docker engine");
        Self::new(runtime, Backend::Docker, case)
    }
}

impl<R: ContainerRuntime> Fixture<R> {
    fn new(runtime: R, backend: Backend, case: &str) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("the clock is after 1970")
            .subsec_nanos();
        Self {
            runtime,
            backend,
            run: format!("{case}-{}-{nanos}", std::process::id()),
            containers: AtomicU32::new(0),
        }
    }

    /// The label that selects exactly this test's containers.
    fn own_label(&self) -> BTreeMap<String, String> {
        [(TEST_LABEL.to_owned(), self.run.clone())].into()
    }

    /// A fresh, uniquely named container that sleeps until stopped.
    fn spec(&self) -> ContainerSpec {
        let n = self.containers.fetch_add(1, Ordering::Relaxed);
        let mut labels = self.own_label();
        labels.insert(labels::MANAGED.to_owned(), "true".to_owned());
        ContainerSpec {
            name: format!("ployz-rt-{}-{n}", self.run),
            image: IMAGE.to_owned(),
            command: Some(strings(&["sleep", "3600"])),
            env: [("PLOYZ_TEST".to_owned(), "1".to_owned())].into(),
            labels,
            memory_bytes: Some(64 << 20),
            cpu_millis: Some(500),
            stop_grace: Duration::from_secs(1),
            ..Default::default()
        }
    }

    async fn running(&self, spec: &ContainerSpec) -> ContainerId {
        let id = self.runtime.create(spec).await.expect("create");
        self.runtime.start(&id).await.expect("start");
        id
    }

    async fn state(&self, id: &ContainerId) -> ContainerState {
        self.runtime
            .inspect(id)
            .await
            .expect("inspect")
            .expect("the container exists")
            .state
    }
}

impl<R: ContainerRuntime> Drop for Fixture<R> {
    fn drop(&mut self) {
        // Drop cannot await, and the test's own runtime may be unwinding: clean
        // up on a thread with a runtime of its own.
        let runtime = self.runtime.clone();
        let selector = self.own_label();
        let cleanup = std::thread::spawn(move || {
            let executor = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("build a cleanup runtime");
            executor.block_on(async {
                for container in runtime.list(&selector).await? {
                    runtime.remove(&container.id).await?;
                }
                Ok::<_, RuntimeError>(())
            })
        });
        match cleanup.join() {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                eprintln!("cleanup of test containers {:?} failed: {error}", self.run)
            }
            Err(_) => eprintln!("cleanup of test containers {:?} panicked", self.run),
        }
    }
}

fn strings(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|part| (*part).to_owned()).collect()
}

async fn image_presence_is_reported<R: ContainerRuntime>(fx: Fixture<R>) {
    assert!(
        !fx.runtime
            .image_exists(ABSENT_IMAGE)
            .await
            .expect("image exists")
    );
    assert!(fx.runtime.image_exists(IMAGE).await.expect("image exists"));
}

async fn create_with_a_missing_image_is_image_missing<R: ContainerRuntime>(fx: Fixture<R>) {
    let spec = ContainerSpec {
        image: ABSENT_IMAGE.to_owned(),
        ..fx.spec()
    };
    match fx.runtime.create(&spec).await {
        Err(RuntimeError::ImageMissing { image }) => assert_eq!(image, ABSENT_IMAGE),
        other => panic!("expected ImageMissing, got {other:?}"),
    }
    assert!(
        fx.runtime
            .list(&fx.own_label())
            .await
            .expect("list")
            .is_empty()
    );
}

async fn started_container_runs_with_its_labels_and_an_address<R: ContainerRuntime>(
    fx: Fixture<R>,
) {
    let spec = fx.spec();
    let id = fx.runtime.create(&spec).await.expect("create");

    let created = fx
        .runtime
        .inspect(&id)
        .await
        .expect("inspect")
        .expect("created container exists");
    assert_eq!(created.id, id);
    assert_eq!(created.name, spec.name);
    assert_eq!(created.image, IMAGE);
    assert_eq!(created.labels, spec.labels);
    assert_eq!(created.state, ContainerState::Created);
    assert_eq!(created.exit_code, None);
    assert_eq!(created.started_at, None);
    assert!(created.addresses.is_empty(), "{:?}", created.addresses);

    fx.runtime.start(&id).await.expect("start");
    let running = fx
        .runtime
        .inspect(&id)
        .await
        .expect("inspect")
        .expect("started container exists");
    assert_eq!(running.state, ContainerState::Running);
    assert_eq!(running.labels, spec.labels);
    assert_eq!(running.exit_code, None);
    assert!(running.started_at.is_some());
    assert_eq!(running.addresses.len(), 1, "{:?}", running.addresses);
    assert!(running.addresses.iter().all(|address| address.is_ipv4()));

    // Starting a running container is not an error and changes nothing.
    fx.runtime.start(&id).await.expect("start");
    assert_eq!(
        fx.runtime.inspect(&id).await.expect("inspect"),
        Some(running)
    );
}

async fn taken_name_is_name_in_use<R: ContainerRuntime>(fx: Fixture<R>) {
    let spec = fx.spec();
    let first = fx.runtime.create(&spec).await.expect("create");
    match fx.runtime.create(&spec).await {
        Err(RuntimeError::NameInUse { name }) => assert_eq!(name, spec.name),
        other => panic!("expected NameInUse, got {other:?}"),
    }
    let listed = fx.runtime.list(&fx.own_label()).await.expect("list");
    assert_eq!(
        listed.iter().map(|info| &info.id).collect::<Vec<_>>(),
        vec![&first]
    );
}

async fn list_finds_exactly_the_labelled_containers<R: ContainerRuntime>(fx: Fixture<R>) {
    let with_role = |role: &str| {
        let mut spec = fx.spec();
        spec.labels
            .insert(labels::SERVICE.to_owned(), role.to_owned());
        spec
    };
    let web_running = fx.running(&with_role("web")).await;
    let web_created = fx.runtime.create(&with_role("web")).await.expect("create");
    let db = fx.runtime.create(&with_role("db")).await.expect("create");

    let ids = |selector: BTreeMap<String, String>| {
        let runtime = fx.runtime.clone();
        async move {
            runtime
                .list(&selector)
                .await
                .expect("list")
                .into_iter()
                .map(|info| info.id)
                .collect::<BTreeSet<_>>()
        }
    };
    let select = |extra: &[(&str, &str)]| {
        let mut selector = fx.own_label();
        selector.extend(
            extra
                .iter()
                .map(|(key, value)| ((*key).to_owned(), (*value).to_owned())),
        );
        selector
    };

    assert_eq!(
        ids(select(&[])).await,
        [web_running.clone(), web_created.clone(), db.clone()].into()
    );
    assert_eq!(
        ids(select(&[(labels::SERVICE, "web")])).await,
        [web_running, web_created].into()
    );
    assert_eq!(ids(select(&[(labels::SERVICE, "db")])).await, [db].into());
    assert_eq!(
        ids(select(&[(labels::SERVICE, "cache")])).await,
        BTreeSet::new()
    );
    let other_test = [(TEST_LABEL.to_owned(), format!("{}-other", fx.run))].into();
    assert_eq!(ids(other_test).await, BTreeSet::new());
}

async fn exec_returns_the_exit_code_and_both_streams<R: ContainerRuntime>(fx: Fixture<R>) {
    let id = fx.running(&fx.spec()).await;
    let output = fx
        .runtime
        .exec(&id, &strings(&ECHO_AND_FAIL), Duration::from_secs(20))
        .await
        .expect("exec");
    assert_eq!(
        output,
        ExecOutput {
            exit_code: 3,
            stdout: b"hi\n".to_vec(),
            stderr: b"oops\n".to_vec(),
        }
    );
}

async fn exec_needs_a_running_container<R: ContainerRuntime>(fx: Fixture<R>) {
    let created = fx.runtime.create(&fx.spec()).await.expect("create");
    let command = strings(&["true"]);
    match fx
        .runtime
        .exec(&created, &command, Duration::from_secs(20))
        .await
    {
        Err(RuntimeError::NotRunning { id }) => assert_eq!(id, created.0),
        other => panic!("expected NotRunning, got {other:?}"),
    }
    let absent = ContainerId(format!("ployz-rt-{}-absent", fx.run));
    match fx
        .runtime
        .exec(&absent, &command, Duration::from_secs(20))
        .await
    {
        Err(RuntimeError::NoSuchContainer { id }) => assert_eq!(id, absent.0),
        other => panic!("expected NoSuchContainer, got {other:?}"),
    }
}

async fn exec_is_bounded_by_its_timeout<R: ContainerRuntime>(fx: Fixture<R>) {
    let id = fx.running(&fx.spec()).await;
    let timeout = Duration::from_millis(500);
    let started = Instant::now();
    match fx.runtime.exec(&id, &strings(&SLEEP_LONG), timeout).await {
        Err(RuntimeError::ExecTimeout {
            timeout: reported, ..
        }) => assert_eq!(reported, timeout),
        other => panic!("expected ExecTimeout, got {other:?}"),
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= timeout && elapsed < Duration::from_secs(10),
        "{elapsed:?}"
    );
}

async fn container_writes_through_a_bind_mount_reach_the_host<R: ContainerRuntime>(fx: Fixture<R>) {
    let host_dir = tempfile::tempdir().expect("create a host directory");
    let mut spec = fx.spec();
    spec.mounts.push(Mount {
        host_path: host_dir.path().to_owned(),
        container_path: "/data".to_owned(),
        read_only: false,
    });
    let id = fx.running(&spec).await;
    let output = fx
        .runtime
        .exec(&id, &strings(&WRITE_PROOF), Duration::from_secs(20))
        .await
        .expect("exec");
    assert_eq!(output.exit_code, 0, "{output:?}");

    match fx.backend {
        Backend::Docker => {
            let proof: PathBuf = host_dir.path().join("proof");
            let written =
                std::fs::read_to_string(&proof).expect("the container's file is on the host");
            assert_eq!(written, "written-by-the-container\n");
        }
        // The fake runs no process, so nothing writes the file; it only keeps
        // the mount as given (checked by the memory module's own tests).
        Backend::Memory => {}
    }
}

async fn stop_exits_the_container_and_frees_its_address<R: ContainerRuntime>(fx: Fixture<R>) {
    let id = fx.running(&fx.spec()).await;
    // No grace: killed at once.
    fx.runtime.stop(&id, Duration::ZERO).await.expect("stop");
    let stopped = fx
        .runtime
        .inspect(&id)
        .await
        .expect("inspect")
        .expect("stopped container exists");
    assert_eq!(stopped.state, ContainerState::Exited);
    assert_eq!(stopped.exit_code, Some(137), "killed by SIGKILL");
    assert!(stopped.addresses.is_empty(), "{:?}", stopped.addresses);
    assert!(stopped.started_at.is_some());

    // Stopping a stopped container is fine; it starts again with an address.
    fx.runtime.stop(&id, Duration::ZERO).await.expect("stop");
    fx.runtime.start(&id).await.expect("start");
    let restarted = fx
        .runtime
        .inspect(&id)
        .await
        .expect("inspect")
        .expect("restarted container exists");
    assert_eq!(restarted.state, ContainerState::Running);
    assert_eq!(restarted.exit_code, None);
    assert_eq!(restarted.addresses.len(), 1, "{:?}", restarted.addresses);
}

async fn stop_waits_out_the_grace_then_kills<R: ContainerRuntime>(fx: Fixture<R>) {
    let spec = ContainerSpec {
        // Explicitly deaf to SIGTERM, whatever PID 1 does by default.
        command: Some(strings(&[
            "sh",
            "-c",
            "trap '' TERM; while true; do sleep 1; done",
        ])),
        ..fx.spec()
    };
    let id = fx.running(&spec).await;
    let grace = Duration::from_secs(2);
    let started = Instant::now();
    fx.runtime.stop(&id, grace).await.expect("stop");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= grace,
        "stop returned after {elapsed:?}, before the grace ran out"
    );
    assert!(
        elapsed < grace + Duration::from_secs(10),
        "stop took {elapsed:?}"
    );
    let stopped = fx
        .runtime
        .inspect(&id)
        .await
        .expect("inspect")
        .expect("stopped container exists");
    assert_eq!(stopped.state, ContainerState::Exited);
    assert_eq!(
        stopped.exit_code,
        Some(137),
        "killed by SIGKILL after the grace"
    );
}

async fn removed_container_is_gone_and_absent_ones_are_fine<R: ContainerRuntime>(fx: Fixture<R>) {
    let id = fx.running(&fx.spec()).await;
    assert_eq!(fx.state(&id).await, ContainerState::Running);
    // Removing force-stops a running container.
    fx.runtime.remove(&id).await.expect("remove");
    assert_eq!(fx.runtime.inspect(&id).await.expect("inspect"), None);
    assert!(
        fx.runtime
            .list(&fx.own_label())
            .await
            .expect("list")
            .is_empty()
    );

    fx.runtime.remove(&id).await.expect("remove");
    fx.runtime
        .stop(&id, Duration::from_secs(1))
        .await
        .expect("stop");
    match fx.runtime.start(&id).await {
        Err(RuntimeError::NoSuchContainer { id: missing }) => assert_eq!(missing, id.0),
        other => panic!("expected NoSuchContainer, got {other:?}"),
    }
}
