//! The mesh across real hosts: network namespaces made by the cluster harness,
//! each with its own sshd and Docker engine. A cluster is built only with
//! `ployzctl mesh init` and `ployzctl machine add` over SSH; then the overlay,
//! membership, the replicated store, deploys across machines and the failure
//! paths are checked the way an operator would: `ping`, `machine ls`,
//! `wg show`, `docker ps`, `curl` through the gateway, `dig`, and killing
//! things. Ends with a fourth machine joining the running cluster.
//! Needs root and Docker.

use std::{
    process::{Output, Stdio},
    time::{Duration, SystemTime},
};

use ployz_tests::{
    binary,
    cluster::{Cluster, Host},
    wait_until,
};
use serde_json::Value;

const NETWORK: &str = "mesh-e2e";
/// The overlay interface ployzd creates on every host (the default).
const INTERFACE: &str = "ployz0";

fn describe(output: &Output) -> String {
    format!(
        "{}\nstdout:\n{}stderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs this build's `ployzctl` on `host` (its environment names the host's
/// daemon socket and data dir).
fn ployzctl(host: &Host, args: &[&str]) -> Output {
    host.command(&binary("ployzctl").display().to_string())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ployzctl")
}

/// `ployzctl --json ARGS` on `host`; must succeed.
fn ployzctl_json(host: &Host, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let output = ployzctl(host, &all);
    assert!(
        output.status.success(),
        "ployzctl {args:?} on {} failed: {}",
        host.name(),
        describe(&output)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "ployzctl {args:?} printed no JSON ({error}): {}",
            describe(&output)
        )
    })
}

/// `ployzctl --json ARGS` on `host`; must fail; returns the error object.
fn ployzctl_error(host: &Host, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let output = ployzctl(host, &all);
    assert!(
        !output.status.success(),
        "ployzctl {args:?} on {} should have failed: {}",
        host.name(),
        describe(&output)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    let line = stderr.lines().last().unwrap_or_default();
    let value: Value = serde_json::from_str(line)
        .unwrap_or_else(|error| panic!("no JSON error ({error}): {}", describe(&output)));
    value["error"].clone()
}

fn machine_add(cluster: &Cluster, from: &Host, targets: &[&Host], key: &str) -> Output {
    let target_args: Vec<String> = targets
        .iter()
        .map(|host| format!("root@{}", host.address()))
        .collect();
    let mut args = vec![
        "--json",
        "machine",
        "add",
        "--network",
        NETWORK,
        "--identity",
        key,
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "--timeout",
        "90s",
    ];
    args.extend(target_args.iter().map(String::as_str));
    let _ = cluster;
    ployzctl(from, &args)
}

/// Retries a recorded no-op write (`mesh init` of the network again) on
/// `host` until it succeeds, at most `within`; on failure, the last answer.
fn write_within(host: &Host, within: Duration, what: &str) -> Result<(), String> {
    let mut last = None;
    let written = wait_until(within, what, || {
        let output = ployzctl(host, &["--json", "mesh", "init", NETWORK]);
        let ok = output.status.success()
            && serde_json::from_slice::<Value>(&output.stdout)
                .is_ok_and(|write| write["outcome"] == "already_initialized");
        last = Some(output);
        ok
    });
    written.map_err(|_| last.as_ref().map(describe).unwrap_or_default())
}

fn overlay_address(host: &Host) -> String {
    let status = ployzctl_json(host, &["mesh", "status"]);
    status["overlay_address"]
        .as_str()
        .expect("overlay address")
        .to_owned()
}

fn pings(from: &Host, address: &str) -> bool {
    from.exec(&["ping", "-6", "-c", "1", "-W", "2", address])
        .status
        .success()
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

/// What `deploy_across_machines` deployed.
struct Across {
    /// The manifest, on machine 1.
    manifest: String,
    /// The machine ids, in host order.
    machines: Vec<String>,
    /// Each host's replica, in host order.
    containers: Vec<String>,
}

/// The ids of the `across` namespace's running containers, as `docker ps`
/// on `host`'s engine lists them.
fn across_containers(host: &Host) -> Vec<String> {
    let docker_host = host.docker_host().expect("the host runs dockerd");
    let listed = host.exec(&[
        "docker",
        "-H",
        &docker_host,
        "ps",
        "-q",
        "--no-trunc",
        "--filter",
        "label=ployz.namespace=across",
    ]);
    assert!(listed.status.success(), "docker ps: {}", describe(&listed));
    String::from_utf8_lossy(&listed.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// A service whose every replica answers `GET /` with its container's
/// hostname (the short container id), on port 8080.
const ACROSS_MANIFEST: &str = r#"namespace = "across"

[services.web]
image = "{image}"
replicas = 3
placement = [{placement}]
command = ["sh", "-c", "mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 8080 -h /www"]

[services.web.health]
http = { port = 8080, path = "/" }

[[services.web.routes]]
hosts = ["across.test"]
port = 8080
"#;

/// The example image the deploy runs, copied into every host's engine.
const ACROSS_IMAGE: &str = "ployz-example:mesh";

/// A deploy from machine 1 with one replica on each machine: `docker ps` on
/// each host shows its replica; the gateway on machine 1 reaches all three;
/// `dig` on machine 3's DNS answers three addresses; a container on machine 2
/// reaches one on machine 3 by its overlay address.
fn deploy_across_machines(hosts: [&Host; 3]) -> Across {
    ployz_tests::image::ensure_example_image(ACROSS_IMAGE).expect("build the example image");
    let ids: Vec<String> = hosts
        .iter()
        .map(|host| {
            host.load_image(ACROSS_IMAGE).expect("load the image");
            ployzctl_json(host, &["status"])["machine"]["id"]
                .as_str()
                .expect("a machine id")
                .to_owned()
        })
        .collect();
    let placement = ids
        .iter()
        .map(|id| format!("\"{id}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let manifest = ACROSS_MANIFEST
        .replace("{image}", ACROSS_IMAGE)
        .replace("{placement}", &placement);
    let path = hosts[0].ployz_dir().join("across.toml");
    std::fs::write(&path, manifest).expect("write the manifest");
    let path = path.display().to_string();

    let preview = ployzctl_json(hosts[0], &["deploy", "preview", "-f", &path]);
    assert_eq!(
        preview["services"][0]["machines"],
        serde_json::json!(ids),
        "{preview}"
    );
    let deployed = ployzctl_json(hosts[0], &["deploy", "-f", &path]);
    let containers = deployed["commit"]["services"][0]["containers"]
        .as_array()
        .unwrap_or_else(|| panic!("containers in {deployed:#}"))
        .clone();
    assert_eq!(containers.len(), 3, "{deployed:#}");

    // Each replica runs on the machine its placement names, as that
    // machine's engine reports it, with an address from that machine's subnet.
    let mut hostnames = std::collections::BTreeSet::new();
    let mut addresses = Vec::new();
    let mut replica_ids = Vec::new();
    for (replica, host) in hosts.iter().enumerate() {
        let container = containers
            .iter()
            .find(|c| c["replica"].as_u64() == Some(replica as u64))
            .unwrap_or_else(|| panic!("replica {replica} in {deployed:#}"));
        assert_eq!(container["machine"], ids[replica], "{deployed:#}");
        let id = container["id"].as_str().expect("a container id");
        assert_eq!(
            across_containers(host),
            [id],
            "docker ps on {}",
            host.name()
        );
        let address = container["addresses"][0]
            .as_str()
            .unwrap_or_else(|| panic!("an address in {container}"))
            .to_owned();
        let machine_address = overlay_address(host);
        let subnet = machine_address.trim_end_matches("::1");
        assert!(
            address.starts_with(subnet),
            "{address} is not in {}'s subnet ({machine_address})",
            host.name()
        );
        hostnames.insert(id[..12].to_owned());
        addresses.push(address);
        replica_ids.push(id.to_owned());
    }

    // The gateway on machine 1 routes to the replicas on all three machines.
    let mut answered = std::collections::BTreeSet::new();
    for _ in 0..60 {
        let output = hosts[0].exec(&[
            "curl",
            "-sS",
            "--max-time",
            "5",
            "-H",
            "Host: across.test",
            "http://127.0.0.1/",
        ]);
        assert!(output.status.success(), "curl: {}", describe(&output));
        answered.insert(String::from_utf8_lossy(&output.stdout).trim().to_owned());
        if answered == hostnames {
            break;
        }
    }
    assert_eq!(
        answered, hostnames,
        "replicas answering through machine 1's gateway"
    );

    // Machine 3's DNS answers the service with the three replicas' addresses.
    let mut expected = addresses.clone();
    expected.sort();
    let mut dug = Vec::new();
    let found = wait_until(Duration::from_secs(10), "three AAAA answers", || {
        let output = hosts[2].exec(&[
            "dig",
            "@127.0.0.1",
            "+short",
            "+time=2",
            "+tries=1",
            "AAAA",
            "web.across.ployz.internal",
        ]);
        dug = String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|line| {
                line.trim()
                    .parse::<std::net::Ipv6Addr>()
                    .map(|a| a.to_string())
                    .unwrap_or_else(|_| line.trim().to_owned())
            })
            .collect();
        dug.sort();
        dug == expected
    });
    assert!(
        found.is_ok(),
        "dig on machine 3: {dug:?}, expected {expected:?}"
    );

    // A container on machine 2 reaches the one on machine 3 by its overlay
    // address, straight over the mesh.
    let on_two = &replica_ids[1];
    // (busybox's wget crashes in a static build; its nc speaks the request.)
    let request = format!(
        "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc {} 8080",
        addresses[2]
    );
    let fetched = exec_in(hosts[1], on_two, &["sh", "-c", &request]);
    assert!(fetched.status.success(), "nc: {}", describe(&fetched));
    let third = &replica_ids[2];
    let answer = String::from_utf8_lossy(&fetched.stdout).to_string();
    assert!(
        answer.starts_with("HTTP/1.") && answer.contains(" 200 "),
        "{answer}"
    );
    assert_eq!(
        answer.lines().last().map(str::trim),
        Some(&third[..12]),
        "{answer}"
    );

    // And by name: the container's DNS (machine 2's ployz-dns) knows the
    // replicas on every machine, and a connection by name reaches one.
    let looked_up = exec_in(
        hosts[1],
        on_two,
        &["nslookup", "-type=AAAA", "web.across.ployz.internal"],
    );
    let looked_up_text = String::from_utf8_lossy(&looked_up.stdout).to_string();
    assert!(
        looked_up.status.success(),
        "nslookup: {}",
        describe(&looked_up)
    );
    for address in &addresses {
        let address: std::net::Ipv6Addr = address.parse().expect("an IPv6 address");
        assert!(
            looked_up_text
                .split_whitespace()
                .any(|word| word.parse::<std::net::Ipv6Addr>() == Ok(address)),
            "{address} missing from nslookup: {looked_up_text}"
        );
    }
    let by_name = exec_in(
        hosts[1],
        on_two,
        &[
            "sh",
            "-c",
            "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc web.across.ployz.internal 8080",
        ],
    );
    let answer = String::from_utf8_lossy(&by_name.stdout).to_string();
    assert!(
        by_name.status.success(),
        "nc by name: {}",
        describe(&by_name)
    );
    assert!(
        answer
            .lines()
            .last()
            .is_some_and(|body| hostnames.contains(body.trim())),
        "{answer}"
    );

    Across {
        manifest: path,
        machines: ids,
        containers: replica_ids,
    }
}

/// Runs `command` in `container` on `host`'s Docker engine.
fn exec_in(host: &Host, container: &str, command: &[&str]) -> Output {
    let docker_host = host.docker_host().expect("the host runs dockerd");
    let mut args = vec!["docker", "-H", &docker_host, "exec", container];
    args.extend_from_slice(command);
    host.exec(&args)
}

fn start_daemon(host: &Host) {
    ployzctl_json(
        host,
        &[
            "daemon",
            "install",
            "--runtime",
            "host",
            "--service-mode",
            "user",
        ],
    );
}

#[test]
fn a_cluster_built_over_ssh_meshes_replicates_and_survives_a_lost_machine() {
    let cluster = Cluster::builder()
        .hosts(5)
        .docker(true)
        .without_tun(3)
        .build()
        .expect("build a 4-host cluster");
    let [one, two, three, no_tun, four] = cluster.hosts() else {
        panic!("five hosts");
    };
    let key = cluster.ssh_key().display().to_string();

    // Found the network on machine 1, then add 2 and 3 over SSH.
    start_daemon(one);
    let init = ployzctl_json(one, &["mesh", "init", NETWORK]);
    assert_eq!(init["outcome"], "created");
    let added = machine_add(&cluster, one, &[two, three], &key);
    assert!(added.status.success(), "machine add: {}", describe(&added));
    let results: Value = serde_json::from_slice(&added.stdout).expect("machine add JSON");
    let results = results.as_array().expect("one result per target");
    assert_eq!(results.len(), 2);
    for result in results {
        assert_eq!(result["outcome"], "added", "{result}");
        assert!(
            result["overlay_address"]
                .as_str()
                .is_some_and(|a| a.starts_with("fd"))
        );
        assert!(
            result["handshake_unix_ms"]
                .as_u64()
                .is_some_and(|at| at > 0)
        );
    }
    assert_eq!(results[1]["store_servers"], 3);
    assert_eq!(results[1]["store_replicas"], 3);

    // Every machine pings every other's overlay address.
    let addresses: Vec<(&Host, String)> = [one, two, three]
        .into_iter()
        .map(|h| (h, overlay_address(h)))
        .collect();
    for (from, _) in &addresses {
        for (to, address) in &addresses {
            if from.name() != to.name() {
                wait_until(Duration::from_secs(10), "an overlay ping answer", || {
                    pings(from, address)
                })
                .unwrap_or_else(|_| {
                    panic!("{} cannot ping {} at {address}", from.name(), to.name())
                });
            }
        }
    }

    // NATS routes authenticate with the network's route credential: every
    // server presents it on its routes and requires it on its route port.
    for host in [one, two, three] {
        let config = std::fs::read_to_string(host.ployz_dir().join("data/nats/nats.conf"))
            .expect("the rendered NATS config");
        assert!(
            config.contains("nats-route://ployz-route:") && config.contains("authorization {"),
            "{} routes without the credential:\n{config}",
            host.name()
        );
    }

    // Each core server also routes with its own certificate, trusting and
    // pinning exactly the three core machines' (one reload per new machine).
    for host in [one, two, three] {
        let config = std::fs::read_to_string(host.ployz_dir().join("data/nats/nats.conf"))
            .expect("the rendered NATS config");
        assert!(
            config.contains("  tls {\n") && config.contains("include \"route-peers.conf\""),
            "{} routes without TLS:\n{config}",
            host.name()
        );
        let peers = std::fs::read_to_string(host.ployz_dir().join("data/nats/route-peers.conf"))
            .expect("the route peers");
        assert_eq!(
            peers.matches("  # m-").count(),
            3,
            "{} does not pin the three core machines:\n{peers}",
            host.name()
        );
    }

    // `machine ls` on each shows all three active and reachable.
    for (host, _) in &addresses {
        let listed = ployzctl_json(host, &["machine", "ls"]);
        let machines = listed["machines"].as_array().expect("machines");
        assert_eq!(machines.len(), 3, "{listed}");
        for machine in machines {
            assert_eq!(machine["membership"], "active", "{listed}");
            assert!(
                machine["observed"] == "self" || machine["observed"] == "reachable",
                "{listed}"
            );
        }
    }

    // `wg show` (wireguard-tools) on machine 1: two peers, recent handshakes.
    let peers = one.wg_peers(INTERFACE).expect("wg show on machine 1");
    assert_eq!(peers.len(), 2, "{peers:?}");
    for peer in &peers {
        assert!(
            now_unix().saturating_sub(peer.latest_handshake_unix) < 120,
            "stale handshake: {peer:?}"
        );
        assert!(peer.rx_bytes > 0 && peer.tx_bytes > 0, "{peer:?}");
    }

    // `mesh status` tells the same from ployzd: each peer's endpoint, last
    // handshake, bytes and reachability observed now.
    let status = ployzctl_json(one, &["mesh", "status"]);
    let mesh_peers = status["peers"].as_array().expect("peers");
    assert_eq!(mesh_peers.len(), 2, "{status}");
    for peer in mesh_peers {
        assert!(
            peer["machine_id"]
                .as_str()
                .is_some_and(|id| id.starts_with("m-")),
            "{status}"
        );
        assert!(
            peer["endpoint"]
                .as_str()
                .is_some_and(|e| e.ends_with(":51820")),
            "{status}"
        );
        assert!(
            peer["last_handshake_unix_ms"]
                .as_u64()
                .is_some_and(|at| at > 0),
            "{status}"
        );
        assert!(
            peer["rx_bytes"].as_u64().is_some_and(|bytes| bytes > 0),
            "{status}"
        );
        assert_eq!(peer["observed"], "reachable", "{status}");
    }

    let across = deploy_across_machines([one, two, three]);

    // A second add of a member is a no-op that says so.
    let again = machine_add(&cluster, one, &[two], &key);
    assert!(again.status.success(), "{}", describe(&again));
    let again: Value = serde_json::from_slice(&again.stdout).expect("JSON");
    assert_eq!(again[0]["outcome"], "already_member", "{again}");

    // Bad targets: typed errors naming the step; nothing half-joined.
    let unreachable = cluster.unreachable_address().to_string();
    let error = ployzctl_error(
        one,
        &[
            "machine",
            "add",
            "--network",
            NETWORK,
            "-i",
            &key,
            "-o",
            "ConnectTimeout=2",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            &format!("root@{unreachable}"),
        ],
    );
    assert_eq!(error["code"], "ssh_unreachable", "{error}");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("step connect")),
        "{error}"
    );

    let wrong_key = cluster.wrong_ssh_key().display().to_string();
    let error = ployzctl_error(
        one,
        &[
            "machine",
            "add",
            "--network",
            NETWORK,
            "-i",
            &wrong_key,
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            &format!("root@{}", no_tun.address()),
        ],
    );
    assert_eq!(error["code"], "ssh_auth_failed", "{error}");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("step connect")),
        "{error}"
    );

    let error = ployzctl_error(
        one,
        &[
            "machine",
            "add",
            "--network",
            NETWORK,
            "-i",
            &key,
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            &format!("root@{}", no_tun.address()),
        ],
    );
    assert_eq!(error["code"], "no_tun", "{error}");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("step preflight")),
        "{error}"
    );
    assert!(
        !no_tun.ployz_dir().join("bin/ployzd").exists(),
        "a failed preflight installs nothing"
    );
    let listed = ployzctl_json(one, &["machine", "ls"]);
    assert_eq!(
        listed["machines"].as_array().map(Vec::len),
        Some(3),
        "{listed}"
    );

    // Restart ployzd on machine 2 while it pings machine 1: no packet lost.
    let target = &addresses[0].1;
    let ping = two
        .command("ping")
        .args(["-6", "-i", "0.05", "-c", "120", "-W", "1", target])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ping");
    std::thread::sleep(Duration::from_millis(500));
    // The binaries `machine add` installed there: the restarted daemon must
    // find the same tunnel and NATS binaries to adopt them.
    let installed = two.ployz_dir().join("bin/ployzctl").display().to_string();
    for args in [
        &["--json", "daemon", "stop"][..],
        &[
            "--json",
            "daemon",
            "install",
            "--runtime",
            "host",
            "--service-mode",
            "user",
        ][..],
    ] {
        let output = two
            .command(&installed)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ployzctl");
        assert!(output.status.success(), "{args:?}: {}", describe(&output));
    }
    let ping = ping.wait_with_output().expect("ping finishes");
    let report = String::from_utf8_lossy(&ping.stdout);
    assert!(
        report.contains(" 0% packet loss"),
        "packets lost across a ployzd restart: {report}"
    );
    let status = ployzctl_json(two, &["status"]);
    assert_eq!(status["cluster"]["network"], NETWORK, "{status}");
    let detail = status["mesh"]["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("peer API on [") && detail.contains("containers on network `ployz`"),
        "{status}"
    );

    // Lose machine 3 entirely: the store stays writable from 1 and 2, and
    // `machine ls` observes 3 unreachable while its record still says active.
    cluster.cut(three).expect("cut machine 3 off the underlay");
    for host in [one, two] {
        // A `mesh init` of the same network is a recorded no-op: the
        // operation journal writes to the store. If machine 3 led a stream,
        // the other two elect a new leader within seconds: a write may answer
        // `unavailable` until then, never for longer.
        if let Err(last) = write_within(host, Duration::from_secs(30), "a write to succeed") {
            panic!(
                "the store takes no writes on {} without machine 3: {}",
                host.name(),
                last
            );
        }
        // The store may take a few seconds to replace a leader it lost; the
        // observation itself is made at the time of asking.
        let lost_id = results[1]["machine_id"].clone();
        let mut listed = Value::Null;
        let mut lost = Value::Null;
        let _ = wait_until(Duration::from_secs(45), "machine ls to answer", || {
            let output = ployzctl(host, &["--json", "machine", "ls"]);
            if !output.status.success() {
                return false;
            }
            listed = serde_json::from_slice(&output.stdout).unwrap_or_default();
            lost = listed["machines"]
                .as_array()
                .and_then(|machines| machines.iter().find(|m| m["id"] == lost_id).cloned())
                .unwrap_or_default();
            true
        });
        assert!(lost.is_object(), "machine 3 is still listed: {listed}");
        assert_eq!(lost["membership"], "active", "{listed}");
        assert_eq!(lost["observed"], "unreachable", "{listed}");
    }

    // A deploy that places on the lost machine fails its precondition,
    // naming the machine, and changes nothing on the other two.
    let changed = std::fs::read_to_string(&across.manifest)
        .expect("read the manifest")
        .replace("replicas = 3", "replicas = 3\nenv = { VERSION = \"2\" }");
    let changed_path = one.ployz_dir().join("across-2.toml");
    std::fs::write(&changed_path, changed).expect("write the manifest");
    let error = ployzctl_error(one, &["deploy", "-f", &changed_path.display().to_string()]);
    assert_eq!(error["code"], "placement_unavailable", "{error}");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains(across.machines[2].as_str())),
        "{error}"
    );
    for (index, host) in [one, two].into_iter().enumerate() {
        assert_eq!(
            across_containers(host),
            [across.containers[index].clone()],
            "docker ps on {} after the refused deploy",
            host.name()
        );
    }

    // Back on the underlay, machine 3 catches up: it sees both others over
    // the mesh again and its store takes writes, with no command run for it.
    cluster
        .restore(three)
        .expect("put machine 3 back on the underlay");
    let recovered = wait_until(Duration::from_secs(90), "machine 3 to rejoin", || {
        let output = ployzctl(three, &["--json", "machine", "ls"]);
        let Ok(listed) = serde_json::from_slice::<Value>(&output.stdout) else {
            return false;
        };
        listed["machines"].as_array().is_some_and(|machines| {
            machines.len() == 3
                && machines
                    .iter()
                    .all(|m| m["observed"] == "self" || m["observed"] == "reachable")
        })
    });
    assert!(
        recovered.is_ok(),
        "machine 3 did not come back: {}",
        describe(&ployzctl(three, &["machine", "ls"]))
    );
    // Its JetStream catches up with the others a little after the overlay
    // is back; until then writes answer `unavailable` (retry later).
    if let Err(last) = write_within(three, Duration::from_secs(60), "machine 3 to take writes") {
        panic!("machine 3 takes no writes after rejoining: {}", last);
    }

    // A fourth machine joins beyond the core: a leaf of the store. Its NATS
    // runs no JetStream and connects to the core servers with a user of its
    // own; the store keeps its three copies on the three core machines.
    let added = machine_add(&cluster, one, &[four], &key);
    let joined = std::time::Instant::now();
    assert!(
        added.status.success(),
        "machine add 4: {}",
        describe(&added)
    );
    let result: Value = serde_json::from_slice(&added.stdout).expect("machine add JSON");
    assert_eq!(result[0]["outcome"], "added", "{result}");
    assert_eq!(result[0]["store_role"], "leaf", "{result}");
    assert_eq!(result[0]["store_servers"], 3, "{result}");
    assert_eq!(result[0]["store_replicas"], 3, "{result}");
    let four_id = result[0]["machine_id"]
        .as_str()
        .expect("machine 4's id")
        .to_owned();
    let fourth = overlay_address(four);
    wait_until(
        Duration::from_secs(10),
        "machine 1 to ping machine 4",
        || pings(one, &fourth),
    )
    .expect("machine 1 pings machine 4 over the overlay");

    let leaf_config = std::fs::read_to_string(four.ployz_dir().join("data/nats/nats.conf"))
        .expect("machine 4's NATS config");
    assert!(
        leaf_config.contains(&format!("\"nats-leaf://{four_id}:"))
            && !leaf_config.contains("jetstream")
            && !leaf_config.contains("cluster {"),
        "machine 4 is no leaf:\n{leaf_config}"
    );
    // It holds no route credential: removing it later can revoke all it has.
    let route_secret = |host: &Host| -> Value {
        let identity =
            std::fs::read_to_string(host.ployz_dir().join("data/identity.json")).expect("identity");
        let identity: Value = serde_json::from_str(&identity).expect("identity JSON");
        identity["mesh"]["route_secret"].clone()
    };
    assert!(
        route_secret(one).is_string(),
        "machine 1 has the credential"
    );
    assert!(
        route_secret(four).is_null(),
        "a leaf got the route credential"
    );
    // Every core server admits machine 4's user, and only by a reload.
    for host in [one, two, three] {
        let users = std::fs::read_to_string(host.ployz_dir().join("data/nats/users.conf"))
            .expect("a core server's user list");
        assert!(
            users.contains(&format!("{{ user: \"{four_id}\", password: ")),
            "{} does not admit machine 4:\n{users}",
            host.name()
        );
        let log = std::fs::read_to_string(host.ployz_dir().join("data/nats/nats.log"))
            .unwrap_or_default();
        assert!(
            log.contains("Reloaded: authorization users"),
            "{} did not reload its users",
            host.name()
        );
    }

    // The store works through the leaf: `machine ls` on machine 4 lists the
    // four machines and their parts, and writes go through. Its first reads
    // have been seen to stall for some seconds right after the join
    // (`store_slow`), so they get 30 s, and the wait is printed.
    let mut last = None;
    let answered = wait_until(Duration::from_secs(30), "machine ls on machine 4", || {
        let output = ployzctl(four, &["--json", "machine", "ls"]);
        let ok = output.status.success();
        last = Some(output);
        ok
    });
    assert!(
        answered.is_ok(),
        "machine ls on machine 4: {}",
        last.as_ref().map(describe).unwrap_or_default()
    );
    println!(
        "machine ls on the new leaf answered {:?} after machine add returned",
        joined.elapsed()
    );
    let listed: Value =
        serde_json::from_slice(&last.expect("an answer").stdout).expect("machine ls JSON");
    let machines = listed["machines"].as_array().expect("machines");
    assert_eq!(machines.len(), 4, "{listed}");
    assert!(
        machines.iter().all(|m| m["membership"] == "active"),
        "{listed}"
    );
    for machine in machines {
        let expected = if machine["id"] == four_id.as_str() {
            "leaf"
        } else {
            "core"
        };
        assert_eq!(machine["store_role"], expected, "{listed}");
    }
    let write = ployzctl_json(four, &["mesh", "init", NETWORK]);
    assert_eq!(write["outcome"], "already_initialized", "{write}");

    // Machine 4's gateway and DNS follow the deploy commits through the
    // leaf: its gateway reaches the replicas on machines 1, 2 and 3, and its
    // DNS answers their three addresses.
    let hostnames: std::collections::BTreeSet<String> = across
        .containers
        .iter()
        .map(|id| id[..12].to_owned())
        .collect();
    let mut answered = std::collections::BTreeSet::new();
    let reached = wait_until(Duration::from_secs(30), "machine 4's gateway", || {
        let output = four.exec(&[
            "curl",
            "-sS",
            "--max-time",
            "5",
            "-H",
            "Host: across.test",
            "http://127.0.0.1/",
        ]);
        if output.status.success() {
            answered.insert(String::from_utf8_lossy(&output.stdout).trim().to_owned());
        }
        answered == hostnames
    });
    assert!(
        reached.is_ok(),
        "replicas answering through machine 4's gateway: {answered:?}, expected {hostnames:?}"
    );
    let dug = four.exec(&[
        "dig",
        "@127.0.0.1",
        "+short",
        "+time=2",
        "+tries=1",
        "AAAA",
        "web.across.ployz.internal",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&dug.stdout).lines().count(),
        3,
        "dig on machine 4: {}",
        describe(&dug)
    );

    // No core machine is special to a leaf: cut off the one its leaf server
    // is connected to, and the leaf connects to another core server and the
    // store takes writes through it again.
    let nats_log = |host: &Host| {
        std::fs::read_to_string(host.ployz_dir().join("data/nats/nats.log")).unwrap_or_default()
    };
    let leaf_seen = |host: &Host| {
        nats_log(host)
            .lines()
            .filter(|line| line.contains("Leafnode connection created"))
            .filter(|line| line.contains(&format!("[{fourth}]:")))
            .count()
    };
    let hub = [one, two, three]
        .into_iter()
        .find(|host| leaf_seen(host) > 0)
        .expect("a core server logged machine 4's leaf connection");
    let others: Vec<(&Host, usize)> = [one, two, three]
        .into_iter()
        .filter(|host| host.name() != hub.name())
        .map(|host| (host, leaf_seen(host)))
        .collect();
    cluster
        .cut(hub)
        .expect("cut machine 4's core server off the underlay");
    if let Err(last) = write_within(four, Duration::from_secs(60), "a write through the leaf") {
        panic!("machine 4 takes no writes without {}: {}", hub.name(), last);
    }
    assert!(
        others
            .iter()
            .any(|(host, before)| leaf_seen(host) > *before),
        "no other core server took machine 4's leaf connection"
    );
    cluster
        .restore(hub)
        .expect("put the core server back on the underlay");
}
