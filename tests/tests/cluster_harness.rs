//! The multi-host harness itself: three namespaced hosts with sshd and dockerd
//! reach each other over the underlay, a cut host is unreachable until
//! restored, SSH sessions get their host's Ployz environment (and no TUN where
//! the cluster says so), `wg show` reads a host's userspace tunnel, and
//! dropping the cluster leaves nothing behind, not even processes detached
//! through SSH. Needs root.

use std::{
    collections::BTreeMap,
    path::Path,
    process::{Command, Output, Stdio},
    time::Duration,
};

use ployz_tests::{
    cluster::{Cluster, Host},
    image::ensure_example_image,
    process_alive, wait_until,
};

/// The busybox workload image, copied from the machine's engine into a host's dockerd.
const IMAGE: &str = "ployz-example:test";

fn describe(output: &Output) -> String {
    format!(
        "{}\nstdout:\n{}stderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The environment a command printed with `env`.
fn parse_env(output: &Output) -> BTreeMap<String, String> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect()
}

/// Asserts that `env` holds exactly `host`'s Ployz environment.
fn assert_has_ployz_env(env: &BTreeMap<String, String>, host: &Host, how: &str) {
    for (name, value) in host.ployz_env() {
        assert_eq!(
            env.get(&name),
            Some(&value),
            "{how} on {} lacks {name}: {env:#?}",
            host.name()
        );
    }
}

/// Starts a shell running `body` on `target` through SSH from `from`,
/// detached the way ployzd detaches its sidecars (`setsid -f`, no descriptor
/// kept on the session). Returns its pid once its `/proc/<pid>/comm` is
/// `comm` (`sleep` when `body` execs sleep, `sh` otherwise).
fn detach_over_ssh(from: &Host, target: &Host, body: &str, comm: &str) -> u32 {
    let script = format!(
        "setsid -f sh -c 'echo $$; exec </dev/null >/dev/null 2>&1; {body}' </dev/null 2>/dev/null"
    );
    let output = from
        .ssh_command(target)
        .arg(script)
        .output()
        .expect("run ssh");
    assert!(output.status.success(), "{}", describe(&output));
    let pid: u32 = String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("the detached shell printed its pid: {}", describe(&output)));
    wait_until(
        Duration::from_secs(5),
        "the detached process to start",
        || {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|name| name.trim() == comm)
        },
    )
    .expect("the detached process runs");
    pid
}

/// Whether `/dev/net` is a mount point in the test's own mount namespace.
fn dev_net_is_mounted_here() -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("read mountinfo")
        .lines()
        .any(|line| line.split(' ').nth(4) == Some("/dev/net"))
}

/// Whether `to` answers one ping from `from` within a second.
fn pings(from: &Host, to: &Host) -> bool {
    let target = to.address().to_string();
    from.exec(&["ping", "-c", "1", "-W", "1", &target])
        .status
        .success()
}

#[test]
fn hosts_reach_each_other_until_cut_and_leave_nothing_behind() {
    ensure_example_image(IMAGE).expect("build the example image");
    let cluster = Cluster::builder()
        .hosts(3)
        .docker(true)
        .build()
        .expect("build a 3-host cluster with docker");
    let [one, two, three] = cluster.hosts() else {
        panic!("three hosts");
    };

    for from in cluster.hosts() {
        for to in cluster.hosts() {
            if from.name() != to.name() {
                // A few tries: the first ping also waits for ARP on a busy machine.
                let reached =
                    wait_until(Duration::from_secs(5), "a ping answer", || pings(from, to));
                assert!(
                    reached.is_ok(),
                    "{} cannot ping {} ({})",
                    from.name(),
                    to.name(),
                    to.address()
                );
            }
        }
    }

    for target in [two, three] {
        let output = one
            .ssh_command(target)
            .args([
                "hostname", "&&", "true", "&&", "ip", "-4", "-o", "addr", "show",
            ])
            .output()
            .expect("run ssh");
        assert!(
            output.status.success(),
            "ssh from {} to {} failed: {}",
            one.name(),
            target.name(),
            describe(&output)
        );
        assert!(
            String::from_utf8_lossy(&output.stdout).contains(&format!("{}/24", target.address())),
            "the ssh session did not land in {}'s namespace: {}",
            target.name(),
            describe(&output)
        );
    }

    // Sessions get the host's Ployz environment, Docker included: plain
    // `docker` in a session talks to that host's engine.
    let session = one
        .ssh_command(three)
        .args([
            "env",
            "&&",
            "docker",
            "info",
            "--format",
            "'{{.DockerRootDir}}'",
        ])
        .output()
        .expect("run ssh");
    assert!(session.status.success(), "{}", describe(&session));
    let env = parse_env(&session);
    assert_has_ployz_env(&env, three, "an ssh session");
    assert!(
        env.contains_key("PLOYZ_DOCKER_SOCKET") && env.contains_key("DOCKER_HOST"),
        "{env:#?}"
    );
    assert_eq!(
        String::from_utf8_lossy(&session.stdout).lines().last(),
        Some(
            three
                .data_dir()
                .join("docker")
                .display()
                .to_string()
                .as_str()
        ),
        "{}",
        describe(&session)
    );

    let docker_host = three.docker_host().expect("the cluster has docker");
    let root_dir = three.data_dir().join("docker").display().to_string();
    let outside = std::process::Command::new("docker")
        .args(["-H", &docker_host, "info", "--format", "{{.DockerRootDir}}"])
        .output()
        .expect("run docker");
    assert!(outside.status.success(), "{}", describe(&outside));
    assert_eq!(String::from_utf8_lossy(&outside.stdout).trim(), root_dir);
    let inside = three.exec(&[
        "docker",
        "-H",
        &docker_host,
        "info",
        "--format",
        "{{.Driver}}",
    ]);
    assert!(inside.status.success(), "{}", describe(&inside));
    assert_eq!(String::from_utf8_lossy(&inside.stdout).trim(), "vfs");
    let dockerd = three.dockerd_pid().expect("dockerd wrote its pidfile");
    assert!(
        three.pids().contains(&dockerd),
        "dockerd runs inside {}'s namespace",
        three.name()
    );

    three.load_image(IMAGE).expect("load the image into host 3");
    let run = std::process::Command::new("docker")
        .args(["-H", &docker_host, "run", "-d", IMAGE, "sleep", "600"])
        .output()
        .expect("run docker run");
    assert!(run.status.success(), "{}", describe(&run));
    let container = String::from_utf8_lossy(&run.stdout).trim().to_owned();
    let inspect = std::process::Command::new("docker")
        .args([
            "-H",
            &docker_host,
            "inspect",
            "-f",
            "{{.State.Pid}}",
            &container,
        ])
        .output()
        .expect("run docker inspect");
    let container_pid: u32 = String::from_utf8_lossy(&inspect.stdout)
        .trim()
        .parse()
        .expect("docker inspect prints the container's pid");
    assert!(container_pid > 0, "{}", describe(&inspect));

    let doomed = two.spawn(&["sleep", "600"]).expect("spawn on host 2");
    let survivor = two.spawn(&["sleep", "600"]).expect("spawn on host 2");
    assert!(two.pids().contains(&doomed), "spawned inside host 2");
    assert!(
        cluster.kill(one, doomed, libc::SIGKILL).is_err(),
        "kill refuses a pid of another host"
    );
    cluster
        .kill(two, doomed, libc::SIGKILL)
        .expect("kill on host 2");
    wait_until(Duration::from_secs(5), "the killed process to die", || {
        !process_alive(doomed)
    })
    .expect("the killed process dies");

    cluster.cut(three).expect("cut host 3");
    assert!(!pings(one, three), "host 3 answers while cut");
    cluster.restore(three).expect("restore host 3");
    wait_until(Duration::from_secs(10), "host 3 to answer again", || {
        pings(one, three)
    })
    .expect("host 3 answers after restore");

    // Processes detached through SSH, as ployzd detaches its sidecars: one
    // exits on SIGTERM (and says so), one ignores it and must be killed.
    let marker_dir = tempfile::tempdir().expect("a directory outliving the cluster");
    let marker = marker_dir.path().join("terminated");
    let polite = detach_over_ssh(
        one,
        two,
        &format!(
            "trap \"echo \\$\\$ > {}; exit 0\" TERM; sleep 1000 & wait",
            marker.display()
        ),
        "sh",
    );
    let stubborn = detach_over_ssh(one, three, "trap \"\" TERM; exec sleep 1000", "sleep");
    assert!(two.pids().contains(&polite) && three.pids().contains(&stubborn));

    let footprint = cluster.footprint();
    for pid in [polite, stubborn] {
        assert!(
            footprint.pids().contains(&pid),
            "processes detached through ssh belong to the cluster: {footprint:?}"
        );
    }
    assert!(
        footprint.pids().len() >= 9,
        "sshd, dockerd and containerd on each host: {footprint:?}"
    );
    assert!(
        footprint.pids().contains(&container_pid),
        "the container's process belongs to the cluster: {footprint:?}"
    );
    assert!(
        footprint.pids().contains(&survivor),
        "spawned processes belong to the cluster: {footprint:?}"
    );
    drop(cluster);
    let remaining = footprint.remaining();
    assert!(
        remaining.is_empty(),
        "left behind after drop: {remaining:#?}"
    );
    assert!(!process_alive(polite) && !process_alive(stubborn));
    assert!(
        marker.exists(),
        "teardown sends SIGTERM before SIGKILL: the trapping shell never ran its handler"
    );
}

#[test]
fn ssh_sessions_get_their_hosts_environment_devices_and_keys() {
    let cluster = Cluster::builder()
        .hosts(3)
        .without_tun(2)
        .build()
        .expect("build a 3-host cluster, host 3 without TUN");
    let [one, two, no_tun] = cluster.hosts() else {
        panic!("three hosts");
    };

    for target in [one, two, no_tun] {
        for sub in ["data", "bin", "wireguard", "volumes"] {
            assert!(
                target.ployz_dir().join(sub).is_dir(),
                "{sub} on {}",
                target.name()
            );
        }
        let session = one
            .ssh_command(target)
            .arg("env")
            .output()
            .expect("run ssh");
        assert!(session.status.success(), "{}", describe(&session));
        let env = parse_env(&session);
        assert_has_ployz_env(&env, target, "an ssh session");
        assert!(
            !env.contains_key("DOCKER_HOST"),
            "no docker, no DOCKER_HOST: {env:#?}"
        );
        // `ip netns exec` hands the environment on.
        assert_has_ployz_env(&parse_env(&target.exec(&["env"])), target, "Host::command");
    }
    let names: Vec<String> = one.ployz_env().into_iter().map(|(name, _)| name).collect();
    assert_eq!(
        names,
        [
            "PLOYZ_DATA_DIR",
            "PLOYZ_SOCKET",
            "PLOYZ_BIN_DIR",
            "PLOYZ_MESH_UAPI_DIR",
            "PLOYZ_STORAGE_BACKEND",
            "PLOYZ_STORAGE_PATH",
        ]
    );
    assert_ne!(
        one.ployz_env(),
        two.ployz_env(),
        "every host has its own files"
    );

    // TUN: only the host built without it lacks it, and only inside.
    let has_tun = |target: &Host| {
        one.ssh_command(target)
            .args(["test", "-c", "/dev/net/tun"])
            .output()
            .expect("run ssh")
            .status
            .success()
    };
    assert!(
        has_tun(one) && has_tun(two),
        "ordinary hosts have /dev/net/tun"
    );
    assert!(!has_tun(no_tun), "{} has no /dev/net/tun", no_tun.name());
    assert!(
        Path::new("/dev/net/tun").exists(),
        "the machine keeps its TUN device"
    );
    assert!(
        !dev_net_is_mounted_here(),
        "the tmpfs on /dev/net stays in the host"
    );

    // A key no host authorizes is refused.
    let refused = one
        .ssh_command_to(&two.address().to_string(), &cluster.wrong_ssh_key())
        .arg("true")
        .output()
        .expect("run ssh");
    assert!(!refused.status.success(), "{}", describe(&refused));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("Permission denied"),
        "{}",
        describe(&refused)
    );

    // Nobody holds the unreachable address.
    let unreachable = cluster.unreachable_address();
    assert!(
        cluster
            .hosts()
            .iter()
            .all(|host| host.address() != unreachable)
            && cluster.gateway_address() != unreachable
    );
    let lost = one
        .ssh_command_to(&unreachable.to_string(), &cluster.ssh_key())
        .arg("true")
        .output()
        .expect("run ssh");
    assert!(!lost.status.success(), "{}", describe(&lost));
    let stderr = String::from_utf8_lossy(&lost.stderr);
    assert!(
        stderr.contains("No route to host") || stderr.contains("timed out"),
        "{}",
        describe(&lost)
    );

    // kill_named reaches only its own host.
    let doomed = [
        detach_over_ssh(one, two, "exec sleep 1000", "sleep"),
        detach_over_ssh(one, two, "exec sleep 1000", "sleep"),
    ];
    let bystander = detach_over_ssh(one, no_tun, "exec sleep 1000", "sleep");
    let mut killed = two.kill_named("sleep", libc::SIGKILL);
    killed.sort_unstable();
    let mut expected = doomed.to_vec();
    expected.sort_unstable();
    assert_eq!(killed, expected);
    wait_until(Duration::from_secs(5), "the named processes to die", || {
        doomed.iter().all(|pid| !process_alive(*pid))
    })
    .expect("kill_named kills");
    assert!(process_alive(bystander), "another host's sleep survives");
    assert!(two.kill_named("no-such-process", libc::SIGKILL).is_empty());

    let footprint = cluster.footprint();
    drop(cluster);
    assert!(
        !process_alive(bystander),
        "a detached process dies with the cluster"
    );
    let remaining = footprint.remaining();
    assert!(
        remaining.is_empty(),
        "left behind after drop: {remaining:#?}"
    );
}

/// `wg genkey` and its public key, made in the root namespace.
fn wg_key_pair() -> (String, String) {
    let private = Command::new("wg")
        .arg("genkey")
        .output()
        .expect("run wg genkey");
    assert!(private.status.success(), "{}", describe(&private));
    let mut pubkey = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run wg pubkey");
    std::io::Write::write_all(
        &mut pubkey.stdin.take().expect("piped stdin"),
        &private.stdout,
    )
    .expect("write the private key");
    let public = pubkey.wait_with_output().expect("wait for wg pubkey");
    assert!(public.status.success(), "{}", describe(&public));
    (
        String::from_utf8_lossy(&private.stdout).trim().to_owned(),
        String::from_utf8_lossy(&public.stdout).trim().to_owned(),
    )
}

/// Runs `args` on `host`, which must succeed.
fn must(host: &Host, output: Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} on {} failed: {}",
        host.name(),
        describe(&output)
    );
}

#[test]
fn wg_show_reads_a_hosts_userspace_tunnel_without_touching_the_machine() {
    const INTERFACE: &str = "pzwgtest0";
    let wireguard_dir_existed = Path::new("/run/wireguard").exists();
    let cluster = Cluster::builder()
        .hosts(2)
        .build()
        .expect("build a 2-host cluster");
    let [one, two] = cluster.hosts() else {
        panic!("two hosts");
    };
    let keys = [wg_key_pair(), wg_key_pair()];
    let overlay = ["10.77.0.1", "10.77.0.2"];

    // A userspace tunnel on each host, detached like ployz-tunnel: wireguard-go
    // daemonizes, and its UAPI socket lands in the host's own directory.
    for (index, host) in [one, two].into_iter().enumerate() {
        let (private, _) = &keys[index];
        let (_, peer_public) = &keys[1 - index];
        let peer = [two, one][index];
        let key_file = host.data_dir().join("wg.key");
        std::fs::write(&key_file, format!("{private}\n")).expect("write the key");
        must(
            host,
            host.wg_command(&["wireguard-go", INTERFACE])
                .output()
                .expect("run"),
            "wireguard-go",
        );
        assert!(
            host.ployz_dir()
                .join(format!("wireguard/{INTERFACE}.sock"))
                .exists(),
            "wireguard-go's socket is in the host's UAPI dir"
        );
        let endpoint = format!("{}:51820", peer.address());
        let key_path = key_file.display().to_string();
        let allowed = format!("{}/32", overlay[1 - index]);
        let set = host.wg_command(&[
            "wg",
            "set",
            INTERFACE,
            "private-key",
            &key_path,
            "listen-port",
            "51820",
            "peer",
            peer_public,
            "endpoint",
            &endpoint,
            "allowed-ips",
            &allowed,
        ]);
        must(
            host,
            {
                let mut set = set;
                set.output().expect("run")
            },
            "wg set",
        );
        let address = format!("{}/24", overlay[index]);
        must(
            host,
            host.exec(&["ip", "addr", "add", &address, "dev", INTERFACE]),
            "ip addr",
        );
        must(
            host,
            host.exec(&["ip", "link", "set", INTERFACE, "up"]),
            "ip link",
        );
    }

    let before = one.wg_peers(INTERFACE).expect("wg show on host 1");
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0].public_key, keys[1].1);
    assert_eq!(before[0].endpoint, Some(format!("{}:51820", two.address())));
    assert_eq!(before[0].allowed_ips, vec![format!("{}/32", overlay[1])]);

    let reached = wait_until(Duration::from_secs(10), "a ping through the tunnel", || {
        one.exec(&["ping", "-c", "1", "-W", "1", overlay[1]])
            .status
            .success()
    });
    assert!(reached.is_ok(), "host 1 cannot ping host 2 over WireGuard");
    let after = one.wg_peers(INTERFACE).expect("wg show on host 1");
    assert!(after[0].latest_handshake_unix > 0, "{after:?}");
    assert!(after[0].rx_bytes > 0 && after[0].tx_bytes > 0, "{after:?}");
    let dump = one.wg_show(INTERFACE);
    let interface_line = String::from_utf8_lossy(&dump.stdout)
        .lines()
        .next()
        .map(str::to_owned);
    assert!(
        interface_line.is_some_and(|line| line.split('\t').nth(1) == Some(keys[0].1.as_str())),
        "the first line is host 1's interface: {}",
        describe(&dump)
    );

    assert_eq!(
        Path::new("/run/wireguard").exists(),
        wireguard_dir_existed,
        "wg show leaves the machine's /run alone"
    );
    let tunnels = one.kill_named("wireguard-go", 0);
    assert_eq!(tunnels.len(), 1, "wireguard-go runs detached on host 1");
    let footprint = cluster.footprint();
    drop(cluster);
    assert!(
        !process_alive(tunnels[0]),
        "the detached tunnel dies with the cluster"
    );
    let remaining = footprint.remaining();
    assert!(
        remaining.is_empty(),
        "left behind after drop: {remaining:#?}"
    );
}
