//! The CLI on its own: parsing, usage errors, exit statuses, generated docs.
//! (Everything that needs a daemon is in the workspace's `tests/`.)

use std::{
    process::Command,
    time::{Duration, Instant},
};

fn ployzctl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ployzctl"))
        .args(args)
        .env_remove("PLOYZ_SOCKET")
        .output()
        .expect("run ployzctl")
}

#[test]
fn without_a_daemon_every_command_is_unavailable_quickly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("absent.sock");
    let socket = socket.to_str().expect("utf-8 path");
    for args in [
        &["status"][..],
        &["machine", "ls"],
        &["op", "ls"],
        &["mesh", "init", "prod"],
    ] {
        let started = Instant::now();
        let mut all = vec!["--json", "--socket", socket];
        all.extend_from_slice(args);
        let output = ployzctl(&all);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{args:?} took {:?}",
            started.elapsed()
        );
        assert_eq!(output.status.code(), Some(6), "{args:?}");
        let error: serde_json::Value =
            serde_json::from_slice(&output.stderr).expect("one JSON error on stderr");
        assert_eq!(error["error"]["class"], "unavailable");
        assert_eq!(error["error"]["code"], "daemon_unreachable");
    }
}

#[test]
fn usage_errors_exit_2_and_help_exits_0() {
    assert_eq!(ployzctl(&["no-such-command"]).status.code(), Some(2));
    assert_eq!(ployzctl(&["mesh", "init"]).status.code(), Some(2));
    assert_eq!(ployzctl(&["--help"]).status.code(), Some(0));
    assert_eq!(ployzctl(&["--version"]).status.code(), Some(0));
    let bad = ployzctl(&["mesh", "init", "../etc"]);
    assert_eq!(bad.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("invalid network name `../etc`"), "{stderr}");
}

#[test]
fn unsupported_runtimes_are_refused_before_anything_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("d.sock");
    let output = ployzctl(&[
        "--socket",
        socket.to_str().expect("utf-8 path"),
        "daemon",
        "install",
        "--runtime",
        "docker",
    ]);
    assert_eq!(output.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&output.stderr).contains("unsupported_runtime"));
    assert!(!socket.exists());
}

#[test]
fn completions_and_man_pages_are_generated() {
    let bash = ployzctl(&["completions", "bash"]);
    assert!(bash.status.success());
    let script = String::from_utf8_lossy(&bash.stdout);
    assert!(
        script.contains("ployzctl") && script.contains("mesh"),
        "{script}"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("man");
    let output = ployzctl(&[
        "--json",
        "man",
        "--out-dir",
        out.to_str().expect("utf-8 path"),
    ]);
    assert!(output.status.success(), "{output:?}");
    let page =
        std::fs::read_to_string(out.join("ployzctl-mesh-init.1")).expect("mesh init man page");
    assert!(page.contains("Found a cluster"), "{page}");
}
