//! The multi-host harness itself: three namespaced hosts with sshd and dockerd
//! reach each other over the underlay, a cut host is unreachable until
//! restored, and dropping the cluster leaves nothing behind. Needs root.

use std::{process::Output, time::Duration};

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

    let footprint = cluster.footprint();
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
}
