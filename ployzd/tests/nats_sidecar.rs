//! The nats-server sidecar against a real nats-server (found like the daemon
//! finds it, e.g. `.tools/nats/bin/nats-server` from `cargo xtask setup`): it
//! starts in its own session, is adopted untouched, is recreated on drift,
//! never adopts a stale pid, is restarted by supervision and stays stopped
//! after an explicit stop. Each test uses its own directory and loopback ports
//! and kills whatever it started when it ends, even on failure.

use std::{
    fs,
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command},
    sync::Arc,
    time::Duration,
};

use ployz_tests::{kill, processes_under};
use ployzd::services::{
    DriftReason, SidecarError, SidecarOrigin, SidecarState,
    nats::{NatsSidecar, NatsSidecarConfig, find_binary},
};
use tempfile::TempDir;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::TcpStream,
    time::{Instant, sleep, timeout},
};
use tokio_util::sync::CancellationToken;

/// A temporary sidecar directory plus a config pointing into it. Dropping it
/// SIGKILLs every process whose command line mentions the directory.
struct Harness {
    dir: TempDir,
    config: NatsSidecarConfig,
}

impl Harness {
    fn new(server_name: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let binary = find_binary(None).expect("nats-server is installed (cargo xtask setup)");
        let mut config = NatsSidecarConfig::new(binary, dir.path().join("nats"), server_name);
        config.listen = SocketAddr::new([127, 0, 0, 1].into(), free_port());
        config.stop_grace = Duration::from_secs(5);
        Self { dir, config }
    }

    fn state_file(&self) -> PathBuf {
        self.config.dir.join("sidecar.json")
    }

    fn config_file(&self) -> PathBuf {
        self.config.dir.join("nats.conf")
    }

    /// Pids of live processes started with this harness's config file.
    fn our_processes(&self) -> Vec<u32> {
        processes_under(self.dir.path())
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        for pid in self.our_processes() {
            kill(pid, libc::SIGKILL);
        }
    }
}

/// A `sleep` process that is killed and reaped when dropped.
struct Sleeper(Child);

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind an ephemeral port")
        .local_addr()
        .expect("local address")
        .port()
}

/// `/proc/<pid>/stat` fields after the command name: state is [0], session [3].
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    Some(after_name.split_whitespace().map(str::to_owned).collect())
}

/// Alive and not a zombie.
fn is_running(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|fields| fields[0] != "Z" && fields[0] != "X")
}

fn session_of(pid: u32) -> u32 {
    stat_fields(pid).expect("process exists")[3]
        .parse()
        .expect("numeric session id")
}

/// The server name a NATS server at `addr` reports in its INFO line.
async fn server_name_at(addr: SocketAddr) -> Option<String> {
    let stream = timeout(Duration::from_secs(1), TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    let mut line = String::new();
    let mut reader = BufReader::new(stream.take(64 * 1024));
    timeout(Duration::from_secs(2), reader.read_line(&mut line))
        .await
        .ok()?
        .ok()?;
    let info: serde_json::Value = serde_json::from_str(line.strip_prefix("INFO ")?.trim()).ok()?;
    Some(info.get("server_name")?.as_str()?.to_owned())
}

/// Polls `condition` every 100 ms until it holds or `limit` passes.
async fn eventually(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        sleep(Duration::from_millis(100)).await;
    }
    condition()
}

#[tokio::test]
async fn ensure_starts_nats_in_its_own_session() {
    let harness = Harness::new("start-test");
    let sidecar = NatsSidecar::ensure(harness.config.clone())
        .await
        .expect("ensure starts nats");
    let status = sidecar.status();
    assert_eq!(status.state, SidecarState::Running);
    assert_eq!(status.origin, SidecarOrigin::Started);
    assert_eq!(status.restarts, 0);
    assert_eq!(
        status.client_url,
        format!("nats://{}", harness.config.listen)
    );
    assert_eq!(sidecar.client_url(), status.client_url);
    let pid = status.pid.expect("a running sidecar has a pid");

    assert_eq!(
        server_name_at(harness.config.listen).await.as_deref(),
        Some("start-test")
    );
    // Its own session: the daemon's terminal, process group and exit do not reach it.
    assert_eq!(session_of(pid), pid);
    assert_ne!(session_of(pid), session_of(std::process::id()));

    let state: serde_json::Value =
        serde_json::from_slice(&fs::read(harness.state_file()).expect("state file"))
            .expect("state JSON");
    assert_eq!(state["pid"], pid);
    assert_eq!(state["config_hash"], status.config_hash.as_str());
    assert_eq!(
        state["binary"],
        harness.config.binary.to_str().expect("UTF-8 binary path")
    );
    assert!(
        state["started_at_unix_ms"]
            .as_u64()
            .is_some_and(|ms| ms > 0)
    );
    let rendered = fs::read_to_string(harness.config_file()).expect("config file");
    assert!(rendered.contains("sync_interval: always"), "{rendered}");
}

#[tokio::test]
async fn second_ensure_adopts_the_running_server_untouched() {
    let harness = Harness::new("adopt-test");
    let first = NatsSidecar::ensure(harness.config.clone())
        .await
        .expect("first ensure");
    let pid = first.status().pid.expect("pid");
    let config_modified = fs::metadata(harness.config_file())
        .and_then(|m| m.modified())
        .expect("mtime");
    sleep(Duration::from_millis(20)).await;

    let second = NatsSidecar::ensure(harness.config.clone())
        .await
        .expect("second ensure");
    let status = second.status();
    assert_eq!(status.origin, SidecarOrigin::Adopted);
    assert_eq!(status.state, SidecarState::Running);
    assert_eq!(status.pid, Some(pid));
    assert_eq!(status.config_hash, first.status().config_hash);
    assert!(is_running(pid));
    assert_eq!(
        fs::metadata(harness.config_file())
            .and_then(|m| m.modified())
            .expect("mtime"),
        config_modified,
        "adoption must not rewrite the config"
    );
    assert_eq!(harness.our_processes(), [pid]);
}

#[tokio::test]
async fn changed_config_recreates_the_server() {
    let mut harness = Harness::new("recreate-test");
    let first = NatsSidecar::ensure(harness.config.clone())
        .await
        .expect("first ensure");
    let old_pid = first.status().pid.expect("pid");

    let monitor_port = free_port();
    harness.config.monitor_port = Some(monitor_port);
    let second = NatsSidecar::ensure(harness.config.clone())
        .await
        .expect("ensure with a monitor port");
    let status = second.status();
    let new_pid = status.pid.expect("pid");
    assert_ne!(new_pid, old_pid);
    assert!(!is_running(old_pid), "the drifted server is stopped");
    assert_ne!(status.config_hash, first.status().config_hash);
    let SidecarOrigin::Recreated {
        reason: DriftReason::ConfigChanged { recorded, expected },
    } = &status.origin
    else {
        panic!("expected Recreated(ConfigChanged), got {:?}", status.origin);
    };
    assert_eq!(recorded, &first.status().config_hash);
    assert_eq!(expected, &status.config_hash);
    // The new config is live: the monitoring endpoint answers.
    let mut monitor = TcpStream::connect(("127.0.0.1", monitor_port))
        .await
        .expect("monitor port");
    monitor
        .write_all(b"GET /healthz HTTP/1.0\r\n\r\n")
        .await
        .expect("send request");
    let mut response = String::new();
    monitor
        .read_to_string(&mut response)
        .await
        .expect("read response");
    assert!(
        response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"),
        "{response}"
    );

    harness.config.server_name = "recreate-test-renamed".into();
    let third = NatsSidecar::ensure(harness.config.clone())
        .await
        .expect("ensure with a new name");
    assert!(matches!(
        third.status().origin,
        SidecarOrigin::Recreated { .. }
    ));
    assert_ne!(third.status().pid, Some(new_pid));
    assert_eq!(
        server_name_at(harness.config.listen).await.as_deref(),
        Some("recreate-test-renamed")
    );
    assert_eq!(harness.our_processes().len(), 1);
}

#[tokio::test]
async fn stale_state_file_pid_is_never_adopted_or_signalled() {
    let harness = Harness::new("stale-test");
    let first = NatsSidecar::ensure(harness.config.clone())
        .await
        .expect("first ensure");
    first.stop().await.expect("stop");
    let record: serde_json::Value =
        serde_json::from_slice(&fs::read(harness.state_file()).expect("state file"))
            .expect("state JSON");

    let sleeper = Sleeper(
        Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("spawn sleep"),
    );
    let strangers = [sleeper.0.id(), std::process::id()];
    for stranger in strangers {
        // Same hash and binary as a real record: only the pid's identity differs.
        let mut forged = record.clone();
        forged["pid"] = stranger.into();
        fs::write(
            harness.state_file(),
            serde_json::to_vec(&forged).expect("JSON"),
        )
        .expect("forge state file");

        let sidecar = NatsSidecar::ensure(harness.config.clone())
            .await
            .expect("ensure");
        let status = sidecar.status();
        assert_eq!(
            status.origin,
            SidecarOrigin::Started,
            "pid {stranger} is not ours"
        );
        assert_ne!(status.pid, Some(stranger));
        assert!(is_running(stranger), "pid {stranger} must not be signalled");
        assert_eq!(
            server_name_at(harness.config.listen).await.as_deref(),
            Some("stale-test")
        );
        sidecar.stop().await.expect("stop");
    }
}

#[tokio::test]
async fn supervision_restarts_a_killed_server_and_leaves_it_running_on_shutdown() {
    let harness = Harness::new("supervise-test");
    let sidecar = Arc::new(
        NatsSidecar::ensure(harness.config.clone())
            .await
            .expect("ensure"),
    );
    let first_pid = sidecar.status().pid.expect("pid");
    let shutdown = CancellationToken::new();
    let supervision = tokio::spawn({
        let sidecar = Arc::clone(&sidecar);
        let shutdown = shutdown.clone();
        async move { sidecar.supervise(shutdown).await }
    });

    let target = libc::pid_t::try_from(first_pid).expect("pid fits");
    // SAFETY: kill(2) reads no memory of ours; `target` is the positive pid of
    // the nats-server this test started.
    assert_eq!(unsafe { libc::kill(target, libc::SIGKILL) }, 0);

    let restarted = eventually(Duration::from_secs(20), || {
        let status = sidecar.status();
        status.restarts == 1 && status.state == SidecarState::Running
    })
    .await;
    let status = sidecar.status();
    assert!(restarted, "not restarted: {status:?}");
    let second_pid = status.pid.expect("pid");
    assert_ne!(second_pid, first_pid);
    assert!(
        status
            .detail
            .as_deref()
            .is_some_and(|detail| detail.contains("signal")),
        "{status:?}"
    );
    assert_eq!(
        server_name_at(harness.config.listen).await.as_deref(),
        Some("supervise-test")
    );

    shutdown.cancel();
    timeout(Duration::from_secs(2), supervision)
        .await
        .expect("supervision ends promptly on shutdown")
        .expect("supervision task");
    // The data plane outlives the daemon.
    assert!(is_running(second_pid));
    assert_eq!(
        server_name_at(harness.config.listen).await.as_deref(),
        Some("supervise-test")
    );
}

#[tokio::test]
async fn stop_stops_the_server_and_supervision_does_not_restart_it() {
    let harness = Harness::new("stop-test");
    let sidecar = Arc::new(
        NatsSidecar::ensure(harness.config.clone())
            .await
            .expect("ensure"),
    );
    let pid = sidecar.status().pid.expect("pid");
    let supervision = tokio::spawn({
        let sidecar = Arc::clone(&sidecar);
        async move { sidecar.supervise(CancellationToken::new()).await }
    });

    sidecar.stop().await.expect("stop");
    let status = sidecar.status();
    assert_eq!(status.state, SidecarState::Stopped);
    assert_eq!(status.pid, None);
    assert!(!is_running(pid));
    timeout(Duration::from_secs(2), supervision)
        .await
        .expect("supervision ends after stop")
        .expect("supervision task");

    sleep(Duration::from_secs(2)).await;
    assert!(harness.our_processes().is_empty(), "restarted after stop");
    assert_eq!(server_name_at(harness.config.listen).await, None);
    assert_eq!(sidecar.status().restarts, 0);
    assert_eq!(sidecar.status().state, SidecarState::Stopped);
}

#[tokio::test]
async fn port_taken_by_another_process_is_a_clear_error() {
    let harness = Harness::new("port-test");
    let _squatter = TcpListener::bind(harness.config.listen).expect("take the port first");
    let result = NatsSidecar::ensure(harness.config.clone()).await;
    let Err(error @ SidecarError::PortInUse { addr }) = result else {
        panic!("expected PortInUse, got {result:?}");
    };
    assert_eq!(addr, harness.config.listen);
    assert!(error.to_string().contains(&addr.to_string()), "{error}");
    assert_eq!(error.code(), "sidecar.port_in_use");
    assert!(harness.our_processes().is_empty());
}
