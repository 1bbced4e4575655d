//! services::routing: the `ployz-gateway` and `ployz-dns` sidecars on top of
//! the shared lifecycle in `services::sidecar`. ployzd renders their config
//! (with `ployz_routing::config`) and hands the text in; this module writes
//! it, starts `<binary> --config <file>` and probes readiness and identity
//! through the process's admin socket. It must not depend on ployz-routing,
//! the store or the daemon: the text and the socket path are all it needs.

use std::{
    env,
    ffi::OsString,
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::{io::AsyncReadExt as _, net::UnixStream, sync::watch, time::timeout};
use tokio_util::sync::CancellationToken;

use super::{
    SidecarError, SidecarStatus,
    process::Pid,
    sidecar::{
        FileNames, Probe, ProcessConfig, Sidecar, SidecarKind, absolute, check_configured_binary,
        first_executable, path_candidates,
    },
};

/// Bound on one admin socket connection and on reading its answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound on the status document; the processes themselves cap it at 4 MiB
/// (`ployz_routing::admin`), and a truncated document would read as garbage.
const PROBE_MAX_BYTES: u64 = 4 * 1024 * 1024;
const BINARY_PLACES: &str = "next to the ployzd executable or on PATH";

/// Which routing process a sidecar runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RoutingProcess {
    /// `ployz-gateway`: the HTTP, HTTPS and TCP proxy.
    Gateway,
    /// `ployz-dns`: the resolver for `ployz.internal`.
    Dns,
}

impl RoutingProcess {
    /// The executable's file name, also the sidecar's name in logs and errors.
    pub fn binary_name(self) -> &'static str {
        match self {
            RoutingProcess::Gateway => "ployz-gateway",
            RoutingProcess::Dns => "ployz-dns",
        }
    }

    /// The environment variable naming the binary when no path is configured.
    pub fn binary_env(self) -> &'static str {
        match self {
            RoutingProcess::Gateway => "PLOYZ_GATEWAY_BIN",
            RoutingProcess::Dns => "PLOYZ_DNS_BIN",
        }
    }

    fn file_names(self) -> FileNames {
        match self {
            RoutingProcess::Gateway => FileNames {
                config: "gateway.toml",
                state: "gateway-sidecar.json",
                output: "gateway.log",
                pid: Some("gateway.pid"),
            },
            RoutingProcess::Dns => FileNames {
                config: "dns.toml",
                state: "dns-sidecar.json",
                output: "dns.log",
                pid: Some("dns.pid"),
            },
        }
    }

    fn hint(self) -> &'static str {
        match self {
            RoutingProcess::Gateway => {
                "build it with `cargo build -p ployz-gateway` or set `PLOYZ_GATEWAY_BIN`"
            }
            RoutingProcess::Dns => {
                "build it with `cargo build -p ployz-dns` or set `PLOYZ_DNS_BIN`"
            }
        }
    }
}

impl fmt::Display for RoutingProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.binary_name())
    }
}

/// What a routing sidecar should look like. The binary, the directory and
/// the rendered config are its identity: changing one makes the next
/// [`RoutingSidecar::ensure`] recreate the process. The timeouts are not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutingSidecarConfig {
    pub process: RoutingProcess,
    /// The executable, usually from [`find_routing_binary`].
    pub binary: PathBuf,
    /// Directory the sidecar owns, e.g. `<data_dir>/gateway`: the config file
    /// (`gateway.toml` or `dns.toml`), the state file, a pid file and the log
    /// of the process's output.
    pub dir: PathBuf,
    /// The config file text, rendered by the caller with `ployz_routing::config::render`.
    pub rendered_config: String,
    /// The admin socket the rendered config names (`source.admin_socket`);
    /// must be absolute.
    pub admin_socket: PathBuf,
    /// How long a started or adopted process may take to answer on its admin socket.
    pub start_timeout: Duration,
    /// How long a stopping process gets between SIGTERM and SIGKILL.
    pub stop_grace: Duration,
}

impl RoutingSidecarConfig {
    /// A config with the defaults: 10 s to start, 10 s to stop.
    pub fn new(
        process: RoutingProcess,
        binary: PathBuf,
        dir: PathBuf,
        rendered_config: String,
        admin_socket: PathBuf,
    ) -> Self {
        Self {
            process,
            binary,
            dir,
            rendered_config,
            admin_socket,
            start_timeout: Duration::from_secs(10),
            stop_grace: Duration::from_secs(10),
        }
    }
}

/// Finds the executable of `process`: `configured` if given (it must be an
/// executable file), else `$PLOYZ_GATEWAY_BIN` / `$PLOYZ_DNS_BIN` the same
/// way, else `ployz-gateway` / `ployz-dns` next to the current executable
/// (where cargo puts every workspace binary) or one directory up (a test
/// binary runs from `target/<profile>/deps`), else on `PATH`.
pub fn find_routing_binary(
    process: RoutingProcess,
    configured: Option<&Path>,
) -> Result<PathBuf, SidecarError> {
    let places = SearchPlaces {
        env_value: env::var_os(process.binary_env()),
        current_exe: env::current_exe().ok(),
        path: env::var_os("PATH"),
    };
    search_routing_binary(process, configured, &places)
}

/// What binary lookup reads from the process environment, apart so tests can
/// supply their own.
#[derive(Debug, Default)]
struct SearchPlaces {
    env_value: Option<OsString>,
    current_exe: Option<PathBuf>,
    path: Option<OsString>,
}

fn search_routing_binary(
    process: RoutingProcess,
    configured: Option<&Path>,
    places: &SearchPlaces,
) -> Result<PathBuf, SidecarError> {
    if let Some(path) = configured {
        return check_configured_binary(path);
    }
    if let Some(path) = places.env_value.as_ref().filter(|value| !value.is_empty()) {
        return check_configured_binary(Path::new(path));
    }
    let name = process.binary_name();
    let mut candidates = Vec::new();
    if let Some(exe_dir) = places.current_exe.as_deref().and_then(Path::parent) {
        candidates.push(exe_dir.join(name));
        if let Some(parent) = exe_dir.parent() {
            candidates.push(parent.join(name));
        }
    }
    candidates.extend(path_candidates(places.path.as_ref(), name));
    first_executable(&candidates).ok_or(SidecarError::BinaryNotFound {
        name,
        places: BINARY_PLACES,
        hint: process.hint(),
        searched: candidates,
    })
}

/// The routing part of the sidecar: the config with its paths made absolute.
#[derive(Debug)]
struct RoutingKind {
    config: RoutingSidecarConfig,
}

impl RoutingKind {
    fn new(mut config: RoutingSidecarConfig) -> Result<Self, SidecarError> {
        config.binary = absolute("binary", &config.binary)?;
        config.dir = absolute("dir", &config.dir)?;
        // The process resolves a relative path against its own working
        // directory, ployzd against its own: only an absolute one is the same
        // socket for both.
        if !config.admin_socket.is_absolute() {
            return Err(SidecarError::InvalidConfig {
                field: "admin_socket",
                reason: format!("`{}` must be absolute", config.admin_socket.display()),
            });
        }
        if config.rendered_config.trim().is_empty() {
            return Err(SidecarError::InvalidConfig {
                field: "rendered_config",
                reason: "is empty".to_owned(),
            });
        }
        Ok(Self { config })
    }

    fn process_config(&self) -> ProcessConfig {
        ProcessConfig {
            binary: self.config.binary.clone(),
            dir: self.config.dir.clone(),
            start_timeout: self.config.start_timeout,
            stop_grace: self.config.stop_grace,
        }
    }
}

impl SidecarKind for RoutingKind {
    fn name(&self) -> &'static str {
        self.config.process.binary_name()
    }

    fn file_names(&self) -> FileNames {
        self.config.process.file_names()
    }

    fn rendered_config(&self) -> &str {
        &self.config.rendered_config
    }

    fn args(&self, config_file: &Path) -> Vec<OsString> {
        vec!["--config".into(), config_file.into()]
    }

    async fn probe(&self, pid: Pid) -> Probe {
        probe_admin_socket(&self.config.admin_socket, pid).await
    }

    fn endpoint(&self) -> String {
        format!("unix://{}", self.config.admin_socket.display())
    }
}

/// Connects to the admin socket, reads the status document it sends and
/// closes, and checks it for readiness and the pid.
async fn probe_admin_socket(socket: &Path, pid: Pid) -> Probe {
    let stream = match timeout(PROBE_TIMEOUT, UnixStream::connect(socket)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            return Probe::NotReady {
                detail: format!("connect: {error}"),
            };
        }
        Err(_elapsed) => {
            return Probe::NotReady {
                detail: format!("connect timed out after {PROBE_TIMEOUT:?}"),
            };
        }
    };
    let mut document = Vec::new();
    match timeout(
        PROBE_TIMEOUT,
        stream.take(PROBE_MAX_BYTES).read_to_end(&mut document),
    )
    .await
    {
        Ok(Ok(_)) => parse_admin_status(&document, pid),
        Ok(Err(error)) => Probe::NotReady {
            detail: format!("read status: {error}"),
        },
        Err(_elapsed) => Probe::NotReady {
            detail: format!("no complete status within {PROBE_TIMEOUT:?}"),
        },
    }
}

/// Ready when the document says `"ready": true` for pid `pid`; another pid
/// answering is another process, which waiting will not fix.
fn parse_admin_status(document: &[u8], pid: Pid) -> Probe {
    let status = match serde_json::from_slice::<serde_json::Value>(document) {
        Ok(status) => status,
        Err(error) => {
            return Probe::NotReady {
                detail: format!("the status is not JSON: {error}"),
            };
        }
    };
    let Some(found) = status.get("pid").and_then(serde_json::Value::as_u64) else {
        return Probe::NotReady {
            detail: "the status has no pid".to_owned(),
        };
    };
    if found != u64::from(pid) {
        return Probe::Wrong {
            detail: format!("pid {found} answers, expected pid {pid}"),
        };
    }
    match status.get("ready") {
        Some(serde_json::Value::Bool(true)) => Probe::Ready,
        _ => Probe::NotReady {
            detail: format!("pid {pid} is not ready yet"),
        },
    }
}

/// A routing sidecar of this machine (the gateway or DNS): the process, how
/// it came to run, and its supervision. Share it behind an `Arc` between
/// [`Self::supervise`] and callers of [`Self::status`] and [`Self::stop`].
/// Dropping it leaves the process running.
#[derive(Debug)]
pub struct RoutingSidecar {
    sidecar: Sidecar<RoutingKind>,
}

impl RoutingSidecar {
    /// Makes the routing process run as `config` describes, adopt-first: a
    /// running process with the recorded identity (same binary, same config
    /// text, same network namespace) whose admin socket answers ready with
    /// its pid is adopted untouched; drifted or unrecorded ones are stopped
    /// and replaced; otherwise one is started. The result says which in
    /// [`SidecarStatus::origin`].
    pub async fn ensure(config: RoutingSidecarConfig) -> Result<Self, SidecarError> {
        let kind = RoutingKind::new(config)?;
        let process = kind.process_config();
        Ok(Self {
            sidecar: Sidecar::ensure(kind, process).await?,
        })
    }

    /// Watches the process until `shutdown` is cancelled or [`Self::stop`] is
    /// called, restarting it with exponential backoff (1 s to 30 s) whenever it
    /// dies. Returning never stops the process: the data plane outlives the
    /// daemon. Run at most one supervision per sidecar.
    pub async fn supervise(&self, shutdown: CancellationToken) {
        self.sidecar.supervise(shutdown).await;
    }

    /// A snapshot of the sidecar's state; `client_url` is the admin socket
    /// as `unix://<path>`.
    pub fn status(&self) -> SidecarStatus {
        self.sidecar.status()
    }

    /// A receiver that sees every status change.
    pub fn watch_status(&self) -> watch::Receiver<SidecarStatus> {
        self.sidecar.watch_status()
    }

    /// Which routing process this sidecar runs.
    pub fn process(&self) -> RoutingProcess {
        self.sidecar.kind().config.process
    }

    /// The config this sidecar runs with (`binary` and `dir` made absolute).
    pub fn config(&self) -> &RoutingSidecarConfig {
        &self.sidecar.kind().config
    }

    /// Stops the process (SIGTERM, the grace period, then SIGKILL) and ends
    /// supervision for good: it will not be restarted by this sidecar.
    pub async fn stop(&self) -> Result<(), SidecarError> {
        self.sidecar.stop().await
    }
}

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::PermissionsExt as _};

    use super::{super::sidecar::identity_hash, *};
    use crate::services::{DriftReason, SidecarOrigin, SidecarState};

    fn config(process: RoutingProcess, text: &str) -> RoutingSidecarConfig {
        RoutingSidecarConfig::new(
            process,
            PathBuf::from("/opt/ployz/ployz-gateway"),
            PathBuf::from("/var/lib/ployz/gateway"),
            text.to_owned(),
            PathBuf::from("/var/lib/ployz/gateway/admin.sock"),
        )
    }

    fn hash_of(config: RoutingSidecarConfig) -> String {
        let kind = RoutingKind::new(config).expect("valid config");
        identity_hash(kind.rendered_config(), &kind.config.binary)
    }

    #[test]
    fn identity_hash_changes_with_config_text_and_binary() {
        let base = hash_of(config(RoutingProcess::Gateway, "a = 1\n"));
        assert_eq!(base, hash_of(config(RoutingProcess::Gateway, "a = 1\n")));
        assert_ne!(base, hash_of(config(RoutingProcess::Gateway, "a = 2\n")));
        let other_binary = RoutingSidecarConfig {
            binary: PathBuf::from("/usr/bin/ployz-gateway"),
            ..config(RoutingProcess::Gateway, "a = 1\n")
        };
        assert_ne!(base, hash_of(other_binary));
        // Timeouts are how ployzd treats the process, not what the process is.
        let timeouts = RoutingSidecarConfig {
            start_timeout: Duration::from_secs(1),
            stop_grace: Duration::from_secs(1),
            ..config(RoutingProcess::Gateway, "a = 1\n")
        };
        assert_eq!(base, hash_of(timeouts));
    }

    #[test]
    fn each_process_has_its_files_and_is_started_with_its_config() {
        let gateway =
            RoutingKind::new(config(RoutingProcess::Gateway, "x = 1\n")).expect("valid config");
        assert_eq!(gateway.name(), "ployz-gateway");
        assert_eq!(gateway.rendered_config(), "x = 1\n");
        assert_eq!(gateway.file_names().config, "gateway.toml");
        assert_eq!(gateway.file_names().pid, Some("gateway.pid"));
        assert_eq!(
            gateway.args(Path::new("/d/gateway.toml")),
            [
                OsString::from("--config"),
                OsString::from("/d/gateway.toml")
            ]
        );
        assert_eq!(
            gateway.endpoint(),
            "unix:///var/lib/ployz/gateway/admin.sock"
        );
        let dns = RoutingKind::new(config(RoutingProcess::Dns, "x = 1\n")).expect("valid config");
        assert_eq!(dns.name(), "ployz-dns");
        assert_eq!(dns.file_names().config, "dns.toml");
        assert_ne!(dns.file_names().state, gateway.file_names().state);
    }

    #[test]
    fn relative_admin_socket_and_empty_config_are_refused() {
        let relative = RoutingSidecarConfig {
            admin_socket: PathBuf::from("admin.sock"),
            ..config(RoutingProcess::Dns, "x = 1\n")
        };
        let empty = config(RoutingProcess::Dns, " \n");
        for (config, expected_field) in [(relative, "admin_socket"), (empty, "rendered_config")] {
            let result = RoutingKind::new(config);
            let Err(SidecarError::InvalidConfig { field, .. }) = result else {
                panic!("expected InvalidConfig for {expected_field}, got {result:?}");
            };
            assert_eq!(field, expected_field);
        }
    }

    #[test]
    fn admin_status_is_checked_for_readiness_and_pid() {
        assert_eq!(
            parse_admin_status(br#"{"component":"gateway","pid":42,"ready":true}"#, 42),
            Probe::Ready
        );
        assert!(matches!(
            parse_admin_status(br#"{"pid":42,"ready":false}"#, 42),
            Probe::NotReady { .. }
        ));
        assert!(matches!(
            parse_admin_status(br#"{"pid":42}"#, 42),
            Probe::NotReady { .. }
        ));
        assert_eq!(
            parse_admin_status(br#"{"pid":7,"ready":true}"#, 42),
            Probe::Wrong {
                detail: "pid 7 answers, expected pid 42".into()
            }
        );
        for garbage in [&b"not json"[..], b"", b"{\"pid\":42,\"ready\":tr", b"[1,2]"] {
            assert!(
                matches!(parse_admin_status(garbage, 42), Probe::NotReady { .. }),
                "{garbage:?}"
            );
        }
    }

    fn executable(path: &Path) -> PathBuf {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).expect("create dir");
        }
        fs::write(path, b"#!/bin/sh\n").expect("write file");
        fs::set_permissions(path, fs::Permissions::from_mode(0o755)).expect("chmod");
        path.to_path_buf()
    }

    #[test]
    fn binary_lookup_follows_its_precedence() {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path();
        let configured = executable(&root.join("configured/ployz-dns"));
        let from_env = executable(&root.join("env/ployz-dns"));
        let beside = executable(&root.join("target/debug/ployz-dns"));
        let above_deps = executable(&root.join("target/ployz-dns"));
        let on_path = executable(&root.join("bin/ployz-dns"));
        let search = |configured: Option<&Path>, places: &SearchPlaces| {
            search_routing_binary(RoutingProcess::Dns, configured, places)
        };
        let mut places = SearchPlaces {
            env_value: Some(from_env.clone().into()),
            current_exe: Some(root.join("target/debug/ployzd")),
            path: Some(root.join("bin").into()),
        };
        assert_eq!(
            search(Some(&configured), &places).expect("configured"),
            configured
        );
        assert_eq!(search(None, &places).expect("env"), from_env);
        places.env_value = None;
        assert_eq!(search(None, &places).expect("beside ployzd"), beside);
        // A test binary runs from target/debug/deps.
        places.current_exe = Some(root.join("target/debug/deps/daemon-1234"));
        assert_eq!(search(None, &places).expect("above deps"), beside);
        places.current_exe = Some(root.join("target/deps/daemon-1234"));
        assert_eq!(search(None, &places).expect("one up"), above_deps);
        places.current_exe = Some(root.join("elsewhere/ployzd"));
        assert_eq!(search(None, &places).expect("on PATH"), on_path);

        places.path = None;
        let result = search(None, &places);
        let Err(error @ SidecarError::BinaryNotFound { .. }) = result else {
            panic!("expected BinaryNotFound, got {result:?}");
        };
        assert!(error.is_precondition());
        let message = error.to_string();
        assert!(message.contains("PLOYZ_DNS_BIN"), "{message}");
        assert!(message.contains("cargo build -p ployz-dns"), "{message}");
        // A configured path that is not there is an error, not a fallback.
        places.env_value = Some(root.join("missing").into());
        assert!(matches!(
            search(None, &places),
            Err(SidecarError::ConfiguredBinaryMissing { .. })
        ));
    }

    /// A stand-in routing process: serves `{"ready":true,"pid":<pid>}` on the
    /// admin socket its config names, as the real ones do.
    const FAKE_PROCESS: &str = r#"#!/usr/bin/env python3
import json, os, socket, sys
config = sys.argv[sys.argv.index("--config") + 1]
path = None
for line in open(config):
    key, _, value = line.partition("=")
    if key.strip() == "admin_socket":
        path = value.strip().strip('"')
try:
    os.unlink(path)
except FileNotFoundError:
    pass
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path)
server.listen(8)
answer = json.dumps({"component": "gateway", "ready": True, "pid": os.getpid()}).encode()
while True:
    connection, _ = server.accept()
    connection.sendall(answer)
    connection.close()
"#;

    /// SIGKILLs the fake processes of a test's directory when dropped, even
    /// when an assertion failed first.
    struct KillOnDrop(Vec<Pid>);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            for &pid in &self.0 {
                if crate::services::process::state(pid) == crate::services::process::ProcState::Live
                {
                    let _ = crate::services::process::send_signal(pid, libc::SIGKILL);
                }
            }
        }
    }

    #[tokio::test]
    async fn routing_sidecar_starts_adopts_recreates_and_stops() {
        let dir = tempfile::tempdir().expect("temp dir");
        let binary = dir.path().join("ployz-gateway");
        fs::write(&binary, FAKE_PROCESS).expect("write fake process");
        fs::set_permissions(&binary, fs::Permissions::from_mode(0o755)).expect("chmod");
        let socket = dir.path().join("gateway/admin.sock");
        let rendered = |extra: &str| {
            format!(
                "[source]\nstate_dir = \"/tmp\"\nadmin_socket = \"{}\"\n{extra}",
                socket.display()
            )
        };
        let mut config = RoutingSidecarConfig::new(
            RoutingProcess::Gateway,
            binary,
            dir.path().join("gateway"),
            rendered(""),
            socket.clone(),
        );
        config.stop_grace = Duration::from_secs(2);
        let mut cleanup = KillOnDrop(Vec::new());

        let first = RoutingSidecar::ensure(config.clone())
            .await
            .expect("first ensure starts the process");
        let status = first.status();
        let pid = status.pid.expect("a running sidecar has a pid");
        cleanup.0.push(pid);
        assert_eq!(status.origin, SidecarOrigin::Started);
        assert_eq!(status.state, SidecarState::Running);
        assert_eq!(status.client_url, format!("unix://{}", socket.display()));
        let pid_file = dir.path().join("gateway/gateway.pid");
        assert_eq!(
            fs::read_to_string(&pid_file).expect("pid file"),
            format!("{pid}\n")
        );
        assert!(dir.path().join("gateway/gateway.toml").exists());

        let second = RoutingSidecar::ensure(config.clone())
            .await
            .expect("second ensure adopts");
        assert_eq!(second.status().origin, SidecarOrigin::Adopted);
        assert_eq!(second.status().pid, Some(pid));

        config.rendered_config = rendered("http_listen = [\"127.0.0.1:1\"]\n");
        let third = RoutingSidecar::ensure(config.clone())
            .await
            .expect("changed config recreates");
        let status = third.status();
        let new_pid = status.pid.expect("pid");
        cleanup.0.push(new_pid);
        assert_ne!(new_pid, pid);
        assert!(matches!(
            status.origin,
            SidecarOrigin::Recreated {
                reason: DriftReason::ConfigChanged { .. }
            }
        ));
        assert_ne!(
            crate::services::process::state(pid),
            crate::services::process::ProcState::Live,
            "the drifted process is stopped"
        );

        third.stop().await.expect("stop");
        assert_eq!(third.status().state, SidecarState::Stopped);
        assert_ne!(
            crate::services::process::state(new_pid),
            crate::services::process::ProcState::Live
        );
        assert!(!pid_file.exists(), "stop removes the pid file");
    }
}
