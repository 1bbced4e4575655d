//! End-to-end deploys: a real ployzd on a btrfs loop pool, real Docker
//! containers from the busybox example image, checked the way an operator
//! would: `docker ps` / `docker inspect`, HTTP answers, bytes on the volume.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use ployz_tests::{
    Node, docker, image::ensure_example_image, kill, process_alive, wait_until, write_file,
};
use serde_json::Value;
use sha2::{Digest, Sha256};

const IMAGE: &str = "ployz-example:e2e";

/// A node whose daemon keeps volumes on its own btrfs loop pool, with short
/// operation leases so crash tests finish quickly. Removes its namespace's
/// containers and unmounts its pool on drop.
struct DeployNode {
    node: Node,
    namespace: String,
}

impl DeployNode {
    fn new(namespace: &str) -> Self {
        ensure_example_image(IMAGE).expect("build the example image");
        let node = Node::new();
        let deploy_node = Self {
            node,
            namespace: namespace.to_owned(),
        };
        deploy_node.remove_containers();
        deploy_node.start();
        deploy_node.node.ployzctl_json(&["mesh", "init", "e2e"]);
        deploy_node
    }

    fn start(&self) -> u32 {
        let pool = self.pool().display().to_string();
        self.node.start_daemon_with(&[
            "--storage-backend",
            "btrfs",
            "--storage-path",
            &pool,
            "--storage-loop-size",
            "300MiB",
            "--operation-lease-ttl",
            "2s",
        ])
    }

    fn pool(&self) -> PathBuf {
        self.node.dir().join("pool")
    }

    /// The live volume on the host (the btrfs backend's layout).
    fn volume_path(&self, volume: &str) -> PathBuf {
        self.pool()
            .join("volumes")
            .join(&self.namespace)
            .join(volume)
    }

    fn manifest(&self, name: &str, text: &str) -> String {
        let text = text
            .replace("{namespace}", &self.namespace)
            .replace("{image}", IMAGE);
        write_file(self.node.dir(), name, &text)
            .expect("write manifest")
            .display()
            .to_string()
    }

    fn deploy(&self, manifest: &str, extra: &[&str]) -> ployz_tests::Run {
        let mut args = vec!["--json", "deploy", "-f", manifest];
        args.extend_from_slice(extra);
        self.node.ployzctl(&args)
    }

    fn deploy_ok(&self, manifest: &str, extra: &[&str]) -> Value {
        let run = self.deploy(manifest, extra);
        assert!(
            run.succeeded(),
            "deploy {manifest} failed: {}{}",
            run.stdout,
            run.stderr
        );
        run.json()
    }

    /// Containers of this namespace as `docker ps -a` shows them.
    fn containers(&self) -> Vec<Value> {
        let filter = format!("label=ployz.namespace={}", self.namespace);
        let ids = docker(&["ps", "-aq", "--filter", &filter]);
        ids.split_whitespace()
            .map(|id| {
                let inspected: Value =
                    serde_json::from_str(&docker(&["inspect", id])).expect("docker inspect JSON");
                inspected[0].clone()
            })
            .collect()
    }

    fn remove_containers(&self) {
        let filter = format!("label=ployz.namespace={}", self.namespace);
        for id in docker(&["ps", "-aq", "--filter", &filter]).split_whitespace() {
            let _ = Command::new("docker").args(["rm", "-f", id]).output();
        }
    }
}

impl Drop for DeployNode {
    fn drop(&mut self) {
        self.remove_containers();
        let _ = self.node.ployzctl(&["daemon", "stop", "--services"]);
        let pool = self.pool();
        let _ = Command::new("umount").arg("-l").arg(&pool).output();
    }
}

fn exec(container: &str, script: &str) {
    docker(&["exec", container, "sh", "-c", script]);
}

/// SHA-256 over every file under `dir`: relative paths and contents, sorted.
fn tree_checksum(dir: &Path) -> String {
    fn walk(base: &Path, dir: &Path, files: &mut BTreeMap<String, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).expect("read volume dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                walk(base, &path, files);
            } else {
                let relative = path
                    .strip_prefix(base)
                    .expect("under base")
                    .display()
                    .to_string();
                files.insert(relative, std::fs::read(&path).expect("read file"));
            }
        }
    }
    let mut files = BTreeMap::new();
    walk(dir, dir, &mut files);
    let mut hash = Sha256::new();
    for (path, contents) in files {
        hash.update(path.as_bytes());
        hash.update([0]);
        hash.update(&contents);
        hash.update([0]);
    }
    hex::encode(hash.finalize())
}

/// `GET /` on the container's bridge address.
fn http_get(address: &str, port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(
        &format!("{address}:{port}").parse().ok()?,
        Duration::from_secs(2),
    )
    .ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream
        .write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
        .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    answer
        .split("\r\n\r\n")
        .nth(1)
        .map(|body| body.trim().to_owned())
}

/// The one running container of the namespace: its id and address.
fn the_running_container(node: &DeployNode) -> (String, String) {
    let running: Vec<Value> = node
        .containers()
        .into_iter()
        .filter(|c| c["State"]["Running"] == true)
        .collect();
    assert_eq!(
        running.len(),
        1,
        "exactly one running container: {running:#?}"
    );
    let id = running[0]["Id"].as_str().expect("id").to_owned();
    let address = running[0]["NetworkSettings"]["IPAddress"]
        .as_str()
        .expect("address")
        .to_owned();
    (id, address)
}

const APP: &str = r#"
namespace = "{namespace}"

[services.app]
image = "{image}"
command = ["sh", "-c", "mkdir -p /www && echo $VERSION > /www/index.html && exec httpd -f -p 8080 -h /www"]
env = { VERSION = "VERSION_VALUE" }
stop_grace_period = "1s"
health = { http = { port = 8080, path = "/" }, interval = "200ms", retries = 25 }

[[services.app.volumes]]
name = "data"
mount = "/data"

[[services.app.routes]]
hosts = ["app.test"]
port = 8080
"#;

#[test]
fn rollback_restores_the_v1_container_and_its_volume_bytes() {
    let node = DeployNode::new("e2e-rollback");
    let v1 = node.manifest("v1.toml", &APP.replace("VERSION_VALUE", "v1"));
    let v2 = node.manifest("v2.toml", &APP.replace("VERSION_VALUE", "v2"));

    // The preview changes nothing and is deterministic.
    let preview = node.node.ployzctl_json(&["deploy", "preview", "-f", &v1]);
    assert_eq!(
        preview,
        node.node.ployzctl_json(&["deploy", "preview", "-f", &v1])
    );
    assert_eq!(preview["commit"], "e2e-rollback/1");
    assert_eq!(preview["services"][0]["action"], "create");
    assert!(
        node.containers().is_empty(),
        "preview must not create containers"
    );

    let first = node.deploy_ok(&v1, &[]);
    assert_eq!(first["commit"]["commit"], "e2e-rollback/1");
    let (v1_container, address) = the_running_container(&node);
    assert_eq!(http_get(&address, 8080).as_deref(), Some("v1"));
    exec(
        &v1_container,
        "echo written-under-v1 > /data/a.txt && mkdir -p /data/d && echo deep > /data/d/b.txt",
    );
    let v1_bytes = tree_checksum(&node.volume_path("data"));

    let preview = node.node.ployzctl_json(&["deploy", "preview", "-f", &v2]);
    assert_eq!(preview["services"][0]["action"], "replace");
    assert_eq!(preview["services"][0]["strategy"], "stop_first");
    assert_eq!(preview["volumes"][0]["deploy_point"], "deploy-2");

    let second = node.deploy_ok(&v2, &[]);
    assert_eq!(second["commit"]["commit"], "e2e-rollback/2");
    let (v2_container, address) = the_running_container(&node);
    assert_ne!(v2_container, v1_container);
    assert_eq!(http_get(&address, 8080).as_deref(), Some("v2"));
    exec(
        &v2_container,
        "echo written-under-v2 > /data/a.txt && echo more > /data/c.txt",
    );
    let v2_bytes = tree_checksum(&node.volume_path("data"));
    assert_ne!(v2_bytes, v1_bytes);

    // Roll back to v1: export, then deploy the export.
    let export = node
        .node
        .ployzctl(&["deploy", "export", &node.namespace, "--commit", "1"]);
    assert!(export.succeeded(), "{export:?}");
    assert!(
        export.stdout.contains("restore = \"deploy-2\""),
        "{}",
        export.stdout
    );
    let rollback = write_file(node.node.dir(), "rollback.toml", &export.stdout).expect("write");
    let third = node.deploy_ok(&rollback.display().to_string(), &[]);
    assert_eq!(third["commit"]["commit"], "e2e-rollback/3");
    assert_eq!(third["commit"]["reverts"], "e2e-rollback/1");

    let (rolled_back, address) = the_running_container(&node);
    let env = docker(&["inspect", "-f", "{{json .Config.Env}}", &rolled_back]);
    assert!(
        env.contains("VERSION=v1"),
        "the running container is v1's: {env}"
    );
    assert_eq!(http_get(&address, 8080).as_deref(), Some("v1"));
    assert_eq!(
        tree_checksum(&node.volume_path("data")),
        v1_bytes,
        "the volume holds v1's bytes again"
    );
    assert_eq!(
        node.containers().len(),
        1,
        "replaced containers are removed"
    );

    let history = node
        .node
        .ployzctl_json(&["deploy", "history", &node.namespace]);
    let commits: Vec<&Value> = history["commits"]
        .as_array()
        .expect("commits")
        .iter()
        .collect();
    assert_eq!(commits.len(), 3);
    assert_eq!(commits[2]["reverts"], "e2e-rollback/1");

    // Rolling forward is a deploy too: v2's bytes come back from commit 3's deploy point.
    let export = node
        .node
        .ployzctl(&["deploy", "export", &node.namespace, "--commit", "2"]);
    let forward = write_file(node.node.dir(), "forward.toml", &export.stdout).expect("write");
    node.deploy_ok(&forward.display().to_string(), &[]);
    assert_eq!(tree_checksum(&node.volume_path("data")), v2_bytes);
}

const WEB: &str = r#"
namespace = "{namespace}"

[services.web]
image = "{image}"
command = ["sh", "-c", "COMMAND_VALUE"]
env = { VERSION = "VERSION_VALUE" }
stop_grace_period = "1s"
health = { http = { port = 8080, path = "/" }, interval = "200ms", retries = RETRIES }
"#;

fn web(version: &str, command: &str, retries: u32) -> String {
    WEB.replace("VERSION_VALUE", version)
        .replace("COMMAND_VALUE", command)
        .replace("RETRIES", &retries.to_string())
}

const SERVE: &str =
    "mkdir -p /www && echo $VERSION > /www/index.html && exec httpd -f -p 8080 -h /www";

#[test]
fn an_unhealthy_v2_leaves_v1_serving_removes_its_container_and_commits_nothing() {
    let node = DeployNode::new("e2e-unhealthy");
    let v1 = node.manifest("v1.toml", &web("v1", SERVE, 25));
    node.deploy_ok(&v1, &[]);
    let (v1_container, address) = the_running_container(&node);
    let started = docker(&["inspect", "-f", "{{.State.StartedAt}}", &v1_container]);

    let broken = node.manifest("v2.toml", &web("v2", "exec sleep 600", 3));
    let failed = node.deploy(&broken, &["--op-id", "broken-v2"]);
    assert_eq!(failed.code, Some(3), "{failed:?}");
    let error = failed.json_error();
    assert_eq!(error["code"], "deploy_unhealthy");
    let message = error["message"].as_str().expect("message");
    assert!(message.contains("step `service web` failed"), "{message}");
    assert!(message.contains("removed new container"), "{message}");

    // v1 still serves, untouched; v2's container is gone; no commit.
    let (still, address_after) = the_running_container(&node);
    assert_eq!(still, v1_container);
    assert_eq!(address_after, address);
    assert_eq!(
        docker(&["inspect", "-f", "{{.State.StartedAt}}", &v1_container]),
        started
    );
    assert_eq!(http_get(&address, 8080).as_deref(), Some("v1"));
    assert_eq!(node.containers().len(), 1);
    let history = node
        .node
        .ployzctl_json(&["deploy", "history", &node.namespace]);
    assert_eq!(history["commits"].as_array().expect("commits").len(), 1);

    // The failure is a recorded fact naming the step.
    let op = node.node.ployzctl_json(&["op", "show", "broken-v2"]);
    assert_eq!(op["operation"]["state"], "failed");
    let failed_steps: Vec<&Value> = op["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["status"] == "failed")
        .collect();
    assert!(
        failed_steps.iter().any(|e| e["step"] == "service web"),
        "{op:#}"
    );
}

#[test]
fn two_concurrent_deploys_to_one_namespace_one_wins_the_other_conflicts_before_mutating() {
    let node = DeployNode::new("e2e-race");
    // A slow start keeps the winner inside its deploy while the other arrives.
    let slow = node.manifest("a.toml", &web("a", &format!("sleep 2; {SERVE}"), 50));
    let other = node.manifest("b.toml", &web("b", SERVE, 25));
    let (a, b) = std::thread::scope(|scope| {
        let a = scope.spawn(|| node.deploy(&slow, &[]));
        std::thread::sleep(Duration::from_millis(300));
        let b = scope.spawn(|| node.deploy(&other, &[]));
        (a.join().expect("a"), b.join().expect("b"))
    });
    assert!(a.succeeded(), "the first deploy wins: {a:?}");
    assert_eq!(b.code, Some(5), "the second gets a conflict: {b:?}");
    assert_eq!(b.json_error()["code"], "namespace_locked");

    let history = node
        .node
        .ployzctl_json(&["deploy", "history", &node.namespace]);
    assert_eq!(history["commits"].as_array().expect("commits").len(), 1);
    let containers = node.containers();
    assert_eq!(containers.len(), 1, "the loser created nothing");
    assert_eq!(
        containers[0]["Config"]["Labels"]["ployz.deploy"],
        "e2e-race/1"
    );
}

#[test]
fn killing_ployzd_mid_deploy_then_retrying_the_operation_ends_in_exactly_one_commit() {
    let node = DeployNode::new("e2e-crash");
    let slow = node.manifest("v1.toml", &web("v1", &format!("sleep 3; {SERVE}"), 50));
    let daemon = node.node.daemon_pid().expect("daemon pid");

    std::thread::scope(|scope| {
        let interrupted = scope.spawn(|| node.deploy(&slow, &["--op-id", "crash-1"]));
        // Kill the daemon once the deploy's container exists.
        wait_until(
            Duration::from_secs(20),
            "the deploy to start its container",
            || !node.containers().is_empty(),
        )
        .expect("container started");
        kill(daemon, libc::SIGKILL);
        let interrupted = interrupted.join().expect("thread");
        assert!(!interrupted.succeeded(), "{interrupted:?}");
    });
    wait_until(Duration::from_secs(5), "ployzd to die", || {
        !process_alive(daemon)
    })
    .expect("dead");
    node.start();

    // The same operation id, retried until the dead runner's lease expires.
    let mut outcome = None;
    wait_until(
        Duration::from_secs(60),
        "the retried deploy to finish",
        || {
            let run = node.deploy(&slow, &["--op-id", "crash-1"]);
            if run.succeeded() {
                outcome = Some(run.json());
                return true;
            }
            assert_eq!(run.json_error()["code"], "operation_in_progress", "{run:?}");
            std::thread::sleep(Duration::from_millis(500));
            false
        },
    )
    .expect("retry succeeds");
    let outcome = outcome.expect("recorded");
    assert_eq!(outcome["commit"]["commit"], "e2e-crash/1");

    let history = node
        .node
        .ployzctl_json(&["deploy", "history", &node.namespace]);
    assert_eq!(
        history["commits"].as_array().expect("commits").len(),
        1,
        "exactly one commit"
    );
    let op = node.node.ployzctl_json(&["op", "show", "crash-1"]);
    assert_eq!(op["operation"]["attempts"], 2);
    let containers = node.containers();
    assert_eq!(
        containers.len(),
        1,
        "the interrupted attempt's container is gone: {containers:#?}"
    );
    assert_eq!(containers[0]["State"]["Running"], true);

    // Replaying again returns the recorded result.
    let replay = node.deploy_ok(&slow, &["--op-id", "crash-1"]);
    assert_eq!(replay["operation"]["replayed"], true);
    assert_eq!(replay["commit"]["commit"], "e2e-crash/1");
}

#[test]
fn a_daemon_restart_keeps_workload_containers_with_their_ids_and_uptime() {
    let node = DeployNode::new("e2e-steady");
    let v1 = node.manifest("v1.toml", &web("v1", SERVE, 25));
    node.deploy_ok(&v1, &[]);
    let (id, address) = the_running_container(&node);
    let started = docker(&["inspect", "-f", "{{.State.StartedAt}}", &id]);

    node.node.stop_daemon();
    assert_eq!(
        http_get(&address, 8080).as_deref(),
        Some("v1"),
        "workloads serve without the daemon"
    );
    node.start();

    let (after, _) = the_running_container(&node);
    assert_eq!(after, id);
    assert_eq!(
        docker(&["inspect", "-f", "{{.State.StartedAt}}", &id]),
        started
    );
    // And the unchanged service is kept by the next deploy.
    let again = node.deploy_ok(&v1, &[]);
    assert_eq!(again["plan"]["services"][0]["action"], "keep");
    assert_eq!(the_running_container(&node).0, id);
}

#[test]
fn a_manifest_with_an_unknown_field_is_refused_naming_field_and_line() {
    let node = DeployNode::new("e2e-badmanifest");
    let bad = node.manifest(
        "bad.toml",
        "namespace = \"{namespace}\"\n[services.web]\nimage = \"{image}\"\nimgae = \"x\"\n",
    );
    let run = node.deploy(&bad, &[]);
    assert_eq!(run.code, Some(2), "{run:?}");
    let error = run.json_error();
    assert_eq!(error["code"], "invalid_manifest");
    let message = error["message"].as_str().expect("message");
    assert!(
        message.contains("line 4") && message.contains("imgae"),
        "{message}"
    );

    let missing = node.manifest(
        "missing.toml",
        &web("v1", SERVE, 3).replace("{image}", "no-such-image:1"),
    );
    let run = node.deploy(&missing, &[]);
    assert_eq!(run.code, Some(3), "{run:?}");
    assert_eq!(run.json_error()["code"], "image_missing");
    assert!(node.containers().is_empty());
}

#[test]
fn an_unhealthy_deploy_of_a_service_with_a_volume_restarts_v1_on_its_exact_bytes() {
    let node = DeployNode::new("e2e-volundo");
    let v1 = node.manifest("v1.toml", &APP.replace("VERSION_VALUE", "v1"));
    node.deploy_ok(&v1, &[]);
    let (v1_container, _) = the_running_container(&node);
    exec(&v1_container, "echo before > /data/a.txt");
    let before = tree_checksum(&node.volume_path("data"));

    // v2 scribbles on the volume, then never becomes healthy.
    let broken = APP
        .replace("VERSION_VALUE", "v2")
        .replace(
            "mkdir -p /www && echo $VERSION > /www/index.html && exec httpd -f -p 8080 -h /www",
            "echo scribbled > /data/a.txt; exec sleep 600",
        )
        .replace("retries = 25", "retries = 3");
    let broken = node.manifest("v2.toml", &broken);
    let failed = node.deploy(&broken, &[]);
    assert_eq!(failed.code, Some(3), "{failed:?}");
    let message = failed.json_error()["message"]
        .as_str()
        .expect("message")
        .to_owned();
    assert!(message.contains("restored volume"), "{message}");
    assert!(message.contains("restarted old container"), "{message}");

    // v1 runs again (stop-first: it had been stopped), on the bytes it had.
    let (running, address) = the_running_container(&node);
    assert_eq!(running, v1_container);
    assert_eq!(http_get(&address, 8080).as_deref(), Some("v1"));
    assert_eq!(tree_checksum(&node.volume_path("data")), before);
    assert_eq!(node.containers().len(), 1);

    // v1 keeps writing; the next deploy's deploy point must hold those writes.
    exec(&v1_container, "echo after-the-failure > /data/b.txt");
    let current = tree_checksum(&node.volume_path("data"));
    let v2 = node.manifest("v2-good.toml", &APP.replace("VERSION_VALUE", "v2"));
    node.deploy_ok(&v2, &[]);
    let export = node
        .node
        .ployzctl(&["deploy", "export", &node.namespace, "--commit", "1"]);
    let rollback = write_file(node.node.dir(), "rollback.toml", &export.stdout).expect("write");
    node.deploy_ok(&rollback.display().to_string(), &[]);
    assert_eq!(
        tree_checksum(&node.volume_path("data")),
        current,
        "the deploy point was taken after the failed attempt, not reused from it"
    );
}
