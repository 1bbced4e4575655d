//! End-to-end: a real ployzd started by `ployzctl daemon install`, its real
//! nats-server, and ployzctl as an operator would run it.

use std::time::Duration;

use ployz_tests::{Node, kill, process_alive, process_start_time, wait_until, write_file};
use serde_json::Value;

#[test]
fn status_reports_live_facts_and_fails_fast_when_the_daemon_is_stopped() {
    let node = Node::new();
    let daemon_pid = node.start_daemon();

    let socket_mode = std::fs::metadata(node.socket())
        .expect("socket exists")
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&socket_mode) & 0o777,
        0o600,
        "only the daemon's user may talk to it"
    );

    let before = node.ployzctl_json(&["status"]);
    assert_eq!(before["daemon"]["pid"], daemon_pid);
    assert_eq!(before["daemon"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        before["cluster"],
        Value::Null,
        "no cluster before mesh init: {before}"
    );
    assert_eq!(before["nats"]["state"], "not_configured");

    let init = node.ployzctl_json(&["mesh", "init", "e2e"]);
    assert_eq!(init["outcome"], "created");
    assert_eq!(init["operation"]["state"], "succeeded");

    let after = node.ployzctl_json(&["status"]);
    assert_eq!(after["cluster"]["network"], "e2e");
    assert_eq!(after["cluster"]["cluster_id"], init["cluster_id"]);
    assert_eq!(after["cluster"]["machines"], 1);
    assert_eq!(after["machine"]["id"], init["machine_id"]);
    assert_eq!(after["nats"]["state"], "running");
    assert_eq!(after["nats"]["reachable"], true, "{after}");
    assert_eq!(
        after["nats"]["client_url"],
        format!("nats://127.0.0.1:{}", node.nats_port)
    );
    let nats_pid = after["nats"]["pid"].as_u64().expect("nats pid") as u32;
    assert!(process_alive(nats_pid));
    assert!(after["daemon"]["uptime_ms"].as_u64().expect("uptime") > 0);

    node.stop_daemon();
    let stopped = node.ployzctl(&["--json", "status"]);
    assert_eq!(stopped.code, Some(6), "{stopped:?}");
    assert_eq!(stopped.json_error()["class"], "unavailable");
    assert_eq!(stopped.json_error()["code"], "daemon_unreachable");
    assert!(
        stopped.elapsed < Duration::from_secs(2),
        "took {:?}",
        stopped.elapsed
    );
    assert!(
        process_alive(nats_pid),
        "stopping the daemon must not stop NATS"
    );
}

#[test]
fn a_daemon_restart_adopts_nats_with_the_same_pid_and_data() {
    let node = Node::new();
    node.start_daemon();
    let init = node.ployzctl_json(&["mesh", "init", "e2e", "--op-id", "found-e2e"]);
    let nats_pid = node.nats_pid();
    let nats_started = process_start_time(nats_pid).expect("nats start time");

    node.stop_daemon();
    assert!(process_alive(nats_pid));
    let second_daemon = node.start_daemon();
    assert_ne!(Some(second_daemon), None);

    let status = node.ployzctl_json(&["status"]);
    assert_eq!(
        status["nats"]["pid"], nats_pid,
        "NATS must be adopted, not restarted: {status}"
    );
    assert_eq!(status["nats"]["origin"], "adopted");
    assert_eq!(
        process_start_time(nats_pid),
        Some(nats_started),
        "same process, not a reused pid"
    );

    // The data written before the restart is still there.
    let machines = node.ployzctl_json(&["machine", "ls"]);
    assert_eq!(machines["machines"][0]["id"], init["machine_id"]);
    let op = node.ployzctl_json(&["op", "show", "found-e2e"]);
    assert_eq!(op["operation"]["state"], "succeeded");
}

#[test]
fn a_crashed_daemon_is_replaced_and_its_stale_socket_reclaimed() {
    let node = Node::new();
    let first = node.start_daemon();
    node.ployzctl_json(&["mesh", "init", "e2e"]);
    let nats_pid = node.nats_pid();

    kill(first, libc::SIGKILL);
    wait_until(Duration::from_secs(5), "ployzd to die", || {
        !process_alive(first)
    })
    .expect("killed");
    assert!(
        node.socket().exists(),
        "a killed daemon leaves its socket behind"
    );

    let second = node.start_daemon();
    assert_ne!(second, first);
    assert_eq!(
        node.nats_pid(),
        nats_pid,
        "NATS survives a daemon crash and is adopted"
    );
}

#[test]
fn replaying_an_operation_id_returns_the_recorded_result_without_acting_again() {
    let node = Node::new();
    node.start_daemon();
    let first = node.ployzctl_json(&["mesh", "init", "e2e", "--op-id", "op-replay-1"]);
    assert_eq!(first["outcome"], "created");
    assert_eq!(first["operation"]["replayed"], false);

    let replay = node.ployzctl_json(&["mesh", "init", "e2e", "--op-id", "op-replay-1"]);
    assert_eq!(replay["operation"]["replayed"], true);
    for field in ["outcome", "network", "cluster_id", "machine_id"] {
        assert_eq!(replay[field], first[field], "{field}");
    }
    assert_eq!(
        replay["operation"]["finished_at_unix_ms"],
        first["operation"]["finished_at_unix_ms"]
    );

    // Exactly one operation with that id, run once: one intent, one result.
    let ops = node.ployzctl_json(&["op", "ls"]);
    let matching: Vec<&Value> = ops["operations"]
        .as_array()
        .expect("operations")
        .iter()
        .filter(|op| op["id"] == "op-replay-1")
        .collect();
    assert_eq!(matching.len(), 1);
    assert_eq!(matching[0]["attempts"], 1);
    let shown = node.ployzctl_json(&["op", "show", "op-replay-1"]);
    let steps: Vec<(String, String)> = shown["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| {
            (
                e["step"].as_str().unwrap_or("").to_owned(),
                e["status"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let names: Vec<&str> = steps.iter().map(|(step, _)| step.as_str()).collect();
    assert_eq!(
        names,
        [
            "intent",
            "write_identity",
            "start_nats",
            "write_membership",
            "result"
        ],
        "{steps:?}"
    );

    // A new id on an initialized machine: a recorded no-op that says so.
    let again = node.ployzctl_json(&["mesh", "init", "e2e"]);
    assert_eq!(again["outcome"], "already_initialized");
    assert_eq!(again["machine_id"], first["machine_id"]);

    // The same id with another request is refused, not replayed.
    let reused = node.ployzctl(&["--json", "mesh", "init", "other", "--op-id", "op-replay-1"]);
    assert_eq!(reused.code, Some(2), "{reused:?}");
    assert_eq!(reused.json_error()["code"], "operation_id_reused");
}

#[test]
fn founding_another_network_is_a_precondition_failure_that_changes_nothing() {
    let node = Node::new();
    node.start_daemon();
    let init = node.ployzctl_json(&["mesh", "init", "alpha"]);
    let identity_before = std::fs::read(node.data_dir().join("identity.json")).expect("identity");

    let other = node.ployzctl(&["--json", "mesh", "init", "beta", "--op-id", "refused-1"]);
    assert_eq!(other.code, Some(3), "{other:?}");
    let error = other.json_error();
    assert_eq!(error["class"], "precondition_failed");
    assert_eq!(error["code"], "network_mismatch");
    assert!(
        error["message"]
            .as_str()
            .expect("message")
            .contains("alpha")
    );

    assert_eq!(
        std::fs::read(node.data_dir().join("identity.json")).expect("identity"),
        identity_before
    );
    let status = node.ployzctl_json(&["status"]);
    assert_eq!(status["cluster"]["network"], "alpha");
    assert_eq!(status["cluster"]["cluster_id"], init["cluster_id"]);
    // The refusal is itself a recorded fact.
    let refused = node.ployzctl_json(&["op", "show", "refused-1"]);
    assert_eq!(refused["operation"]["state"], "failed");
    assert_eq!(refused["operation"]["error"]["code"], "network_mismatch");
}

#[test]
fn daemon_install_is_idempotent_and_daemon_status_tells_the_truth() {
    let node = Node::new();
    let stopped = node.ployzctl_json(&["daemon", "status"]);
    assert_eq!(stopped["running"], false);

    let pid = node.start_daemon();
    let again = node.ployzctl_json(&[
        "daemon",
        "install",
        "--runtime",
        "host",
        "--service-mode",
        "user",
    ]);
    assert_eq!(again["outcome"], "already_running");
    assert_eq!(again["pid"], pid);
    assert_eq!(
        node.daemon_pid(),
        Some(pid),
        "the daemon writes its pidfile"
    );

    let running = node.ployzctl_json(&["daemon", "status"]);
    assert_eq!(running["running"], true);
    assert_eq!(running["pid"], pid);

    let stop = node.ployzctl_json(&["daemon", "stop"]);
    assert_eq!(stop["outcome"], "stopped");
    assert!(!process_alive(pid));
    assert_eq!(
        node.daemon_pid(),
        None,
        "a stopped daemon removes its pidfile"
    );
    assert!(
        !node.socket().exists(),
        "a stopped daemon removes its socket"
    );
    let stop_again = node.ployzctl_json(&["daemon", "stop"]);
    assert_eq!(stop_again["outcome"], "not_running");
}

#[test]
fn daemon_stop_with_services_stops_nats_too() {
    let node = Node::new();
    node.start_daemon();
    node.ployzctl_json(&["mesh", "init", "e2e"]);
    let nats_pid = node.nats_pid();
    let stop = node.ployzctl_json(&["daemon", "stop", "--services"]);
    assert_eq!(stop["services_stopped"], true);
    wait_until(Duration::from_secs(10), "nats-server to exit", || {
        !process_alive(nats_pid)
    })
    .expect("stopped");
}

#[test]
fn machine_ls_and_op_ls_before_mesh_init_say_what_to_do() {
    let node = Node::new();
    node.start_daemon();
    let run = node.ployzctl(&["machine", "ls"]);
    assert_eq!(run.code, Some(3), "{run:?}");
    assert!(run.stderr.contains("not_initialized"), "{}", run.stderr);
    assert!(run.stderr.contains("ployzctl mesh init"), "{}", run.stderr);
}

/// Each bad input gets one line naming the problem, the class's exit status,
/// and never a panic or a backtrace.
#[test]
fn bad_input_gets_a_one_line_typed_error() {
    let node = Node::new();

    let assert_one_line = |what: &str, run: &ployz_tests::Run, code: i32| {
        assert_eq!(run.code, Some(code), "{what}: {run:?}");
        let stderr = run.stderr.trim();
        assert_eq!(stderr.lines().count(), 1, "{what}: not one line: {stderr}");
        assert!(
            !stderr.contains("panicked") && !stderr.contains("backtrace"),
            "{what}: {stderr}"
        );
    };

    // A network name with characters that are not allowed, caught before any request.
    let bad_name = node.ployzctl(&["mesh", "init", "My_Net"]);
    assert_one_line("bad network name", &bad_name, 2);
    assert!(bad_name.stderr.contains("invalid_network_name"));

    // A config file with a wrong type: the daemon refuses to start, saying where.
    let config = write_file(node.dir(), "bad.toml", "[nats]\nport = \"four\"\n").expect("write");
    let daemon = std::process::Command::new(ployz_tests::binary("ployzd"))
        .arg("--config")
        .arg(&config)
        .arg("--socket")
        .arg(node.socket())
        .output()
        .expect("run ployzd");
    let run = ployz_tests::Run {
        code: daemon.status.code(),
        stdout: String::from_utf8_lossy(&daemon.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&daemon.stderr).into_owned(),
        elapsed: Duration::ZERO,
    };
    assert_one_line("config with a wrong type", &run, 2);
    assert!(run.stderr.contains("bad.toml line 2"), "{}", run.stderr);

    // The same through `daemon install`: a usage error, not a hang.
    let config_arg = config.display().to_string();
    let data_dir = node.data_dir().display().to_string();
    let install = node.ployzctl(&[
        "-q",
        "daemon",
        "install",
        "--config",
        &config_arg,
        "--data-dir",
        &data_dir,
    ]);
    assert_one_line("install with a bad config", &install, 2);
    assert!(
        install.stderr.contains("daemon_exited"),
        "{}",
        install.stderr
    );

    // A socket path that is a directory.
    let dir = node.dir().display().to_string();
    let daemon = std::process::Command::new(ployz_tests::binary("ployzd"))
        .args(["--socket", &dir])
        .output()
        .expect("run ployzd");
    let run = ployz_tests::Run {
        code: daemon.status.code(),
        stdout: String::new(),
        stderr: String::from_utf8_lossy(&daemon.stderr).into_owned(),
        elapsed: Duration::ZERO,
    };
    assert_one_line("socket path is a directory", &run, 2);
    assert!(run.stderr.contains("is a directory"), "{}", run.stderr);

    // Malformed operation ids and unknown operations, answered by a running daemon.
    node.start_daemon();
    node.ployzctl_json(&["mesh", "init", "e2e"]);
    let bad_id = node.ployzctl(&["mesh", "init", "e2e", "--op-id", "not valid!"]);
    assert_one_line("bad operation id", &bad_id, 2);
    assert!(bad_id.stderr.contains("invalid_operation_id"));
    let missing = node.ployzctl(&["op", "show", "never-ran"]);
    assert_one_line("unknown operation", &missing, 4);
    assert!(missing.stderr.contains("operation_not_found"));

    // An unknown flag is a usage error from the parser.
    let unknown = node.ployzctl(&["status", "--frobnicate"]);
    assert_eq!(unknown.code, Some(2));
}
