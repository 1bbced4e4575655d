//! services::nats: the nats-server sidecar on top of the shared lifecycle in
//! `services::sidecar`: finds the binary, renders `nats.conf` and probes readiness
//! through the INFO line every NATS server sends first. nats-server runs in its
//! own session so it outlives ployzd: the data plane keeps serving while the
//! daemon is gone. This module speaks processes, files and TCP only; it must
//! not depend on async-nats, the store domain or the daemon.

use std::{
    env,
    ffi::OsString,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, BufReader},
    net::TcpStream,
    sync::watch,
    time::timeout,
};
use tokio_util::sync::CancellationToken;

use super::{
    SidecarError, SidecarStatus,
    process::Pid,
    sidecar::{
        FileNames, Probe, ProcessConfig, Sidecar, SidecarKind, absolute, check_configured_binary,
        create_dir, first_executable, path_candidates,
    },
};

/// The client port nats-server listens on unless configured otherwise.
pub const DEFAULT_CLIENT_PORT: u16 = 4222;

const BINARY_NAME: &str = "nats-server";
/// Where `cargo xtask setup` installs nats-server, relative to the repository root.
const TOOLS_BINARY: &str = ".tools/nats/bin/nats-server";
/// Environment variable naming the binary when no path is configured.
const BINARY_ENV: &str = "PLOYZ_NATS_BIN";
const BINARY_PLACES: &str =
    "next to the ployzd executable, under .tools/nats/bin above it, or on PATH";
const BINARY_HINT: &str = "run `cargo xtask setup` or set `nats.binary` / `PLOYZ_NATS_BIN`";

const FILE_NAMES: FileNames = FileNames {
    config: "nats.conf",
    state: "sidecar.json",
    // stdout and stderr of the process: whatever it prints before its log file
    // is open (config errors) or outside it (Go panics).
    output: "nats-output.log",
    // nats-server writes its own (`pid_file`).
    pid: None,
};
const PID_FILE: &str = "nats.pid";
/// The server log, written by nats-server itself (`log_file`).
const LOG_FILE: &str = "nats.log";
const STORE_DIR: &str = "jetstream";

/// Bound on one readiness connection attempt and on waiting for its INFO line.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound on the INFO line; real ones are a few hundred bytes to a few KiB.
const PROBE_MAX_LINE: u64 = 64 * 1024;

/// What the nats-server sidecar should look like. Every field but the two
/// timeouts is part of its identity: changing one makes the next
/// [`NatsSidecar::ensure`] recreate the process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatsSidecarConfig {
    /// The nats-server executable, usually from [`find_binary`].
    pub binary: PathBuf,
    /// Directory the sidecar owns, e.g. `<data_dir>/nats`: config, state file,
    /// logs and the JetStream store.
    pub dir: PathBuf,
    /// NATS `server_name`; JetStream wants it unique in a cluster and free of whitespace.
    pub server_name: String,
    /// Client listen address, `127.0.0.1:4222` by default.
    pub listen: SocketAddr,
    /// HTTP monitoring port on the listen host; `None` disables monitoring.
    pub monitor_port: Option<u16>,
    /// JetStream clustering with other machines' servers; `None` runs a
    /// standalone server (a network of one machine).
    pub cluster: Option<NatsClusterConfig>,
    /// How long a started or adopted server may take to answer on its client port.
    pub start_timeout: Duration,
    /// How long a stopping server gets between SIGTERM and SIGKILL.
    pub stop_grace: Duration,
}

impl NatsSidecarConfig {
    /// A config with the defaults: listen on `127.0.0.1:4222`, no monitoring,
    /// 10 s to start, 10 s to stop.
    pub fn new(binary: PathBuf, dir: PathBuf, server_name: impl Into<String>) -> Self {
        Self {
            binary,
            dir,
            server_name: server_name.into(),
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), DEFAULT_CLIENT_PORT),
            monitor_port: None,
            cluster: None,
            start_timeout: Duration::from_secs(10),
            stop_grace: Duration::from_secs(10),
        }
    }
}

/// A server's place in a JetStream cluster. JetStream cannot run clustered
/// alone (nats-server refuses a cluster without routes, and a server that
/// only routes to itself waits for a peer forever), so a machine runs
/// standalone until a second machine joins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatsClusterConfig {
    /// The cluster name, the same on every server.
    pub name: String,
    /// Where this server accepts routes: the machine's overlay address.
    pub listen: SocketAddr,
    /// Other servers to route to; they tell each other about the rest.
    pub routes: Vec<SocketAddr>,
}

/// Finds the nats-server executable: `configured` if given (it must be an
/// executable file), else `$PLOYZ_NATS_BIN` the same way, else `nats-server`
/// next to the current executable, else `.tools/nats/bin/nats-server` in the
/// nearest ancestor directory of the current executable that has one (where
/// `cargo xtask setup` installs it), else `nats-server` on `PATH`.
pub fn find_binary(configured: Option<&Path>) -> Result<PathBuf, SidecarError> {
    if let Some(path) = configured {
        return check_configured_binary(path);
    }
    if let Some(path) = env::var_os(BINARY_ENV).filter(|value| !value.is_empty()) {
        return check_configured_binary(Path::new(&path));
    }
    let mut candidates = Vec::new();
    if let Some(exe_dir) = env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
    {
        candidates.push(exe_dir.join(BINARY_NAME));
        candidates.extend(exe_dir.ancestors().map(|dir| dir.join(TOOLS_BINARY)));
    }
    candidates.extend(path_candidates(env::var_os("PATH").as_ref(), BINARY_NAME));
    first_executable(&candidates).ok_or(SidecarError::BinaryNotFound {
        name: BINARY_NAME,
        places: BINARY_PLACES,
        hint: BINARY_HINT,
        searched: candidates,
    })
}

/// The files nats-server writes itself, named in its config.
#[derive(Clone, Debug, PartialEq, Eq)]
struct NatsFiles {
    pid: PathBuf,
    log: PathBuf,
    store: PathBuf,
}

impl NatsFiles {
    fn in_dir(dir: &Path) -> Self {
        Self {
            pid: dir.join(PID_FILE),
            log: dir.join(LOG_FILE),
            store: dir.join(STORE_DIR),
        }
    }
}

/// The NATS part of the sidecar: everything derived from the config before
/// looking at the machine.
#[derive(Debug)]
struct NatsKind {
    /// The config with `binary` and `dir` made absolute.
    config: NatsSidecarConfig,
    files: NatsFiles,
    rendered: String,
    /// Where to connect: the listen address, or loopback when it is unspecified.
    client_addr: SocketAddr,
}

impl NatsKind {
    fn new(mut config: NatsSidecarConfig) -> Result<Self, SidecarError> {
        config.dir = absolute("dir", &config.dir)?;
        config.binary = absolute("binary", &config.binary)?;
        let files = NatsFiles::in_dir(&config.dir);
        let rendered = render(&config, &files)?;
        let client_addr = match config.listen.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => {
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), config.listen.port())
            }
            IpAddr::V6(ip) if ip.is_unspecified() => {
                SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), config.listen.port())
            }
            IpAddr::V4(_) | IpAddr::V6(_) => config.listen,
        };
        Ok(Self {
            config,
            files,
            rendered,
            client_addr,
        })
    }

    fn process_config(&self) -> ProcessConfig {
        ProcessConfig {
            binary: self.config.binary.clone(),
            dir: self.config.dir.clone(),
            start_timeout: self.config.start_timeout,
            stop_grace: self.config.stop_grace,
        }
    }

    fn monitor_addr(&self) -> Option<SocketAddr> {
        self.config
            .monitor_port
            .map(|port| SocketAddr::new(self.config.listen.ip(), port))
    }

    fn client_url(&self) -> String {
        format!("nats://{}", self.client_addr)
    }
}

impl SidecarKind for NatsKind {
    fn name(&self) -> &'static str {
        BINARY_NAME
    }

    fn file_names(&self) -> FileNames {
        FILE_NAMES
    }

    fn rendered_config(&self) -> &str {
        &self.rendered
    }

    fn args(&self, config_file: &Path) -> Vec<OsString> {
        vec!["-c".into(), config_file.into()]
    }

    /// nats-server does not tell its pid; its server name is the identity check.
    async fn probe(&self, _pid: Pid) -> Probe {
        probe(self.client_addr, &self.config.server_name).await
    }

    fn endpoint(&self) -> String {
        self.client_url()
    }

    fn prepare_start(&self) -> Result<(), SidecarError> {
        create_dir(&self.files.store)?;
        ensure_port_free(self.config.listen)?;
        if let Some(monitor) = self.monitor_addr() {
            ensure_port_free(monitor)?;
        }
        if let Some(cluster) = &self.config.cluster {
            // Also fails early when the overlay address is not on this machine.
            ensure_port_free(cluster.listen)?;
        }
        Ok(())
    }

    fn log_files(&self) -> Vec<PathBuf> {
        vec![self.files.log.clone()]
    }
}

/// Renders the nats-server config file. Deterministic: the same config and
/// files always give the same text, so its hash identifies the specification.
fn render(config: &NatsSidecarConfig, files: &NatsFiles) -> Result<String, SidecarError> {
    if config.server_name.is_empty() || config.server_name.chars().any(char::is_whitespace) {
        return Err(SidecarError::InvalidConfig {
            field: "server_name",
            reason: format!(
                "`{}` must be non-empty and contain no whitespace",
                config.server_name
            ),
        });
    }
    if config.listen.port() == 0 {
        return Err(SidecarError::InvalidConfig {
            field: "listen",
            reason: "needs a fixed port: clients and adoption rely on it".to_owned(),
        });
    }
    if config.monitor_port == Some(0) {
        return Err(SidecarError::InvalidConfig {
            field: "monitor_port",
            reason: "needs a fixed port".to_owned(),
        });
    }
    let mut text = String::from(
        "# Rendered by ployzd (services::nats); do not edit. ployzd records a hash\n\
         # of this text and recreates nats-server when the text it would render changes.\n",
    );
    text.push_str(&format!(
        "server_name: {}\n",
        quoted("server_name", &config.server_name)?
    ));
    text.push_str(&format!(
        "host: {}\n",
        quoted("listen", &config.listen.ip().to_string())?
    ));
    text.push_str(&format!("port: {}\n", config.listen.port()));
    if let Some(port) = config.monitor_port {
        let monitor = SocketAddr::new(config.listen.ip(), port);
        text.push_str(&format!(
            "http: {}\n",
            quoted("monitor_port", &monitor.to_string())?
        ));
    }
    text.push_str(&format!("pid_file: {}\n", quoted_path("dir", &files.pid)?));
    text.push_str(&format!("log_file: {}\n", quoted_path("dir", &files.log)?));
    text.push_str("logfile_size_limit: 64MB\n");
    text.push_str("logfile_max_num: 4\n");
    text.push_str(
        "\n# JetStream fsyncs every write before acknowledging it. The NATS default\n\
         # syncs every two minutes, so acknowledged writes can be lost on power loss.\n\
         # Ployz keeps durable facts here (deploy commits, leases, membership): a lost\n\
         # acknowledged fact is worse than 2-3x slower writes.\n",
    );
    text.push_str("jetstream {\n");
    text.push_str(&format!(
        "  store_dir: {}\n",
        quoted_path("dir", &files.store)?
    ));
    text.push_str("  sync_interval: always\n");
    text.push_str("}\n");
    if let Some(cluster) = &config.cluster {
        render_cluster(&mut text, cluster)?;
    }
    Ok(text)
}

/// Appends the `cluster` block. Routes are sorted and deduplicated and the
/// server's own listen address is left out, so the same set of machines
/// always renders the same text (and the same identity hash).
fn render_cluster(text: &mut String, cluster: &NatsClusterConfig) -> Result<(), SidecarError> {
    if cluster.name.is_empty() || cluster.name.chars().any(char::is_whitespace) {
        return Err(SidecarError::InvalidConfig {
            field: "cluster.name",
            reason: format!(
                "`{}` must be non-empty and contain no whitespace",
                cluster.name
            ),
        });
    }
    if cluster.listen.port() == 0 {
        return Err(SidecarError::InvalidConfig {
            field: "cluster.listen",
            reason: "needs a fixed port: other machines route to it".to_owned(),
        });
    }
    let mut routes: Vec<SocketAddr> = cluster
        .routes
        .iter()
        .copied()
        .filter(|route| *route != cluster.listen)
        .collect();
    routes.sort();
    routes.dedup();
    if routes.is_empty() {
        // nats-server exits at start ("JetStream cluster requires configured
        // routes"), and routes to itself only leave the meta group waiting
        // for a second server forever.
        return Err(SidecarError::InvalidConfig {
            field: "cluster.routes",
            reason: "needs at least one other server: JetStream does not cluster alone".to_owned(),
        });
    }
    if let Some(route) = routes.iter().find(|route| route.port() == 0) {
        return Err(SidecarError::InvalidConfig {
            field: "cluster.routes",
            reason: format!("`{route}` needs a fixed port"),
        });
    }
    text.push_str(
        "\n# Routes run over the overlay only: the listen address is this machine's\n\
         # overlay address, so nothing of the store is reachable from the underlay.\n\
         # Configured routes are retried every second for as long as the server runs;\n\
         # servers learn about the rest of the cluster from each other.\n",
    );
    text.push_str("cluster {\n");
    text.push_str(&format!(
        "  name: {}\n",
        quoted("cluster.name", &cluster.name)?
    ));
    text.push_str(&format!(
        "  listen: {}\n",
        quoted("cluster.listen", &cluster.listen.to_string())?
    ));
    text.push_str(concat!(
        "  # Each machine's clients are its own ployzd on its own client address.\n",
        "  # Advertised, other machines' client addresses would join the clients'\n",
        "  # reconnect pools and move them onto another machine's server (or, for a\n",
        "  # loopback address, onto whatever listens there on this machine).\n",
    ));
    text.push_str("  no_advertise: true\n");
    text.push_str("  routes: [\n");
    for route in routes {
        text.push_str(&format!(
            "    {}\n",
            quoted("cluster.routes", &format!("nats-route://{route}"))?
        ));
    }
    text.push_str("  ]\n");
    text.push_str("}\n");
    Ok(())
}

/// Quotes a config string. Characters that would need escaping are refused
/// rather than escaped, so the rendered file stays obviously correct.
fn quoted(field: &'static str, value: &str) -> Result<String, SidecarError> {
    if value
        .chars()
        .any(|c| c == '"' || c == '\\' || c.is_control())
    {
        return Err(SidecarError::InvalidConfig {
            field,
            reason: format!("`{value}` contains a quote, backslash or control character"),
        });
    }
    Ok(format!("\"{value}\""))
}

fn quoted_path(field: &'static str, path: &Path) -> Result<String, SidecarError> {
    let Some(value) = path.to_str() else {
        return Err(SidecarError::InvalidConfig {
            field,
            reason: format!("`{}` is not valid UTF-8", path.display()),
        });
    };
    quoted(field, value)
}

/// Fails with [`SidecarError::PortInUse`] when another socket listens on `addr`,
/// so the caller learns about the conflict instead of a confusing start failure
/// (or, worse, a readiness probe answered by someone else's server).
fn ensure_port_free(addr: SocketAddr) -> Result<(), SidecarError> {
    // std sets SO_REUSEADDR, so only a listener (not TIME_WAIT leftovers of a
    // previous nats-server) makes this fail.
    match TcpListener::bind(addr) {
        Ok(_listener) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::AddrInUse => {
            Err(SidecarError::PortInUse { addr })
        }
        Err(source) => Err(SidecarError::PortCheck { addr, source }),
    }
}

/// Connects to `addr` and reads the INFO line every NATS server sends first.
async fn probe(addr: SocketAddr, server_name: &str) -> Probe {
    let stream = match timeout(PROBE_TIMEOUT, TcpStream::connect(addr)).await {
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
    let mut line = String::new();
    let mut reader = BufReader::new(stream.take(PROBE_MAX_LINE));
    match timeout(PROBE_TIMEOUT, reader.read_line(&mut line)).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => {
            return Probe::NotReady {
                detail: format!("read INFO: {error}"),
            };
        }
        Err(_elapsed) => {
            return Probe::NotReady {
                detail: format!("no INFO line within {PROBE_TIMEOUT:?}"),
            };
        }
    }
    parse_info(&line, server_name)
}

fn parse_info(line: &str, server_name: &str) -> Probe {
    let Some(info) = line.strip_prefix("INFO ") else {
        return Probe::NotReady {
            detail: "the answer is not a NATS INFO line".to_owned(),
        };
    };
    let found = serde_json::from_str::<serde_json::Value>(info.trim())
        .ok()
        .and_then(|info| info.get("server_name")?.as_str().map(str::to_owned));
    match found {
        Some(found) if found == server_name => Probe::Ready,
        Some(found) => Probe::Wrong {
            detail: format!("server name `{found}`, expected `{server_name}`"),
        },
        None => Probe::NotReady {
            detail: "the INFO line has no server_name".to_owned(),
        },
    }
}

/// The nats-server sidecar of this machine: the process, how it came to run,
/// and its supervision. Share it behind an `Arc` between [`Self::supervise`]
/// and callers of [`Self::status`] and [`Self::stop`]. Dropping it leaves
/// nats-server running.
#[derive(Debug)]
pub struct NatsSidecar {
    sidecar: Sidecar<NatsKind>,
}

impl NatsSidecar {
    /// Makes nats-server run as `config` describes, adopt-first: a running
    /// process that matches the recorded identity (same binary, same rendered
    /// config, same network namespace) and answers is adopted untouched;
    /// drifted or unrecorded ones are stopped and replaced; otherwise one is
    /// started. The result says which in [`SidecarStatus::origin`].
    pub async fn ensure(config: NatsSidecarConfig) -> Result<Self, SidecarError> {
        let kind = NatsKind::new(config)?;
        let process = kind.process_config();
        Ok(Self {
            sidecar: Sidecar::ensure(kind, process).await?,
        })
    }

    /// Watches the process until `shutdown` is cancelled or [`Self::stop`] is
    /// called, restarting it with exponential backoff (1 s to 30 s) whenever it
    /// dies. Returning never stops nats-server: the data plane outlives the
    /// daemon. Run at most one supervision per sidecar.
    pub async fn supervise(&self, shutdown: CancellationToken) {
        self.sidecar.supervise(shutdown).await;
    }

    /// A snapshot of the sidecar's state.
    pub fn status(&self) -> SidecarStatus {
        self.sidecar.status()
    }

    /// A receiver that sees every status change.
    pub fn watch_status(&self) -> watch::Receiver<SidecarStatus> {
        self.sidecar.watch_status()
    }

    /// Where NATS clients connect, e.g. `nats://127.0.0.1:4222`.
    pub fn client_url(&self) -> String {
        self.sidecar.kind().client_url()
    }

    /// The config this sidecar runs with (`binary` and `dir` made absolute).
    pub fn config(&self) -> &NatsSidecarConfig {
        &self.sidecar.kind().config
    }

    /// Stops nats-server (SIGTERM, the grace period, then SIGKILL) and ends
    /// supervision for good: it will not be restarted by this sidecar.
    pub async fn stop(&self) -> Result<(), SidecarError> {
        self.sidecar.stop().await
    }
}

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::PermissionsExt as _};

    use super::{super::sidecar::identity_hash, *};

    fn config() -> NatsSidecarConfig {
        NatsSidecarConfig::new(
            PathBuf::from("/opt/nats/nats-server"),
            PathBuf::from("/var/lib/ployz/nats"),
            "node-1",
        )
    }

    fn hash_of(config: NatsSidecarConfig) -> String {
        let kind = NatsKind::new(config).expect("valid config");
        identity_hash(&kind.rendered, &kind.config.binary)
    }

    #[test]
    fn rendering_is_deterministic_and_complete() {
        let spec = NatsKind::new(config()).expect("valid config");
        let again = NatsKind::new(config()).expect("valid config");
        assert_eq!(spec.rendered, again.rendered);
        assert_eq!(
            identity_hash(&spec.rendered, &spec.config.binary),
            identity_hash(&again.rendered, &again.config.binary)
        );
        let rendered = &spec.rendered;
        for line in [
            "server_name: \"node-1\"\n",
            "host: \"127.0.0.1\"\n",
            "port: 4222\n",
            "pid_file: \"/var/lib/ployz/nats/nats.pid\"\n",
            "log_file: \"/var/lib/ployz/nats/nats.log\"\n",
            "  store_dir: \"/var/lib/ployz/nats/jetstream\"\n",
            "  sync_interval: always\n",
        ] {
            assert!(rendered.contains(line), "missing {line:?} in\n{rendered}");
        }
        assert!(!rendered.contains("http:"), "monitoring is off by default");
    }

    #[test]
    fn monitor_port_renders_on_the_listen_host() {
        let mut config = config();
        config.listen = "[::1]:4333".parse().expect("socket address");
        config.monitor_port = Some(8222);
        let spec = NatsKind::new(config).expect("valid config");
        assert!(spec.rendered.contains("host: \"::1\"\nport: 4333\n"));
        assert!(spec.rendered.contains("http: \"[::1]:8222\"\n"));
        assert_eq!(spec.client_url(), "nats://[::1]:4333");
    }

    #[test]
    fn every_identity_field_changes_the_hash() {
        let base = hash_of(config());
        let changes = [
            NatsSidecarConfig {
                server_name: "node-2".into(),
                ..config()
            },
            NatsSidecarConfig {
                monitor_port: Some(8222),
                ..config()
            },
            NatsSidecarConfig {
                listen: "127.0.0.1:4223".parse().expect("socket address"),
                ..config()
            },
            NatsSidecarConfig {
                dir: PathBuf::from("/srv/nats"),
                ..config()
            },
            NatsSidecarConfig {
                binary: PathBuf::from("/usr/bin/nats-server"),
                ..config()
            },
            NatsSidecarConfig {
                cluster: Some(cluster()),
                ..config()
            },
            NatsSidecarConfig {
                cluster: Some(NatsClusterConfig {
                    routes: vec!["[fd00:0:0:3::1]:4723".parse().expect("route")],
                    ..cluster()
                }),
                ..config()
            },
            NatsSidecarConfig {
                cluster: Some(NatsClusterConfig {
                    name: "c-4567".into(),
                    ..cluster()
                }),
                ..config()
            },
            NatsSidecarConfig {
                cluster: Some(NatsClusterConfig {
                    listen: "[fd00:0:0:1::1]:4724".parse().expect("listen"),
                    ..cluster()
                }),
                ..config()
            },
        ];
        let mut hashes = vec![base.clone()];
        for changed in changes {
            let hash = hash_of(changed.clone());
            assert!(!hashes.contains(&hash), "{changed:?}");
            hashes.push(hash);
        }
        // Routes are a set: order and repeats do not make another server.
        let mut reordered = cluster();
        reordered.routes.reverse();
        reordered.routes.push(reordered.routes[0]);
        assert_eq!(
            hash_of(NatsSidecarConfig {
                cluster: Some(reordered),
                ..config()
            }),
            hash_of(NatsSidecarConfig {
                cluster: Some(cluster()),
                ..config()
            })
        );
        // Timeouts are how ployzd treats the process, not what the process is.
        let timeouts = NatsSidecarConfig {
            start_timeout: Duration::from_secs(1),
            stop_grace: Duration::from_secs(1),
            ..config()
        };
        assert_eq!(hash_of(timeouts), base);
    }

    fn cluster() -> NatsClusterConfig {
        NatsClusterConfig {
            name: "c-0123".into(),
            listen: "[fd00:0:0:1::1]:4723".parse().expect("listen"),
            routes: vec![
                "[fd00:0:0:2::1]:4723".parse().expect("route"),
                "[fd00:0:0:1::1]:4723".parse().expect("route"),
                "[fd00:0:0:2::1]:4723".parse().expect("route"),
            ],
        }
    }

    #[test]
    fn a_cluster_block_routes_over_the_overlay_to_others_only() {
        let plain = NatsKind::new(config()).expect("valid").rendered;
        assert!(!plain.contains("cluster"), "{plain}");
        let clustered = NatsKind::new(NatsSidecarConfig {
            cluster: Some(cluster()),
            ..config()
        })
        .expect("valid")
        .rendered;
        assert!(
            clustered.starts_with(&plain),
            "the standalone part is unchanged"
        );
        assert!(clustered.contains("  name: \"c-0123\"\n"), "{clustered}");
        assert!(
            clustered.contains("  listen: \"[fd00:0:0:1::1]:4723\"\n"),
            "{clustered}"
        );
        assert_eq!(
            clustered.matches("nats-route://").count(),
            1,
            "itself excluded, duplicates merged: {clustered}"
        );
        assert!(
            clustered.contains("    \"nats-route://[fd00:0:0:2::1]:4723\"\n"),
            "{clustered}"
        );
        assert!(clustered.contains("  no_advertise: true\n"), "{clustered}");
        assert!(clustered.ends_with("  ]\n}\n"), "{clustered}");
    }

    #[test]
    fn ipv4_routes_render_sorted_without_brackets() {
        let clustered = NatsKind::new(NatsSidecarConfig {
            cluster: Some(NatsClusterConfig {
                name: "c-0123".into(),
                listen: "10.0.0.1:6222".parse().expect("listen"),
                routes: vec![
                    "10.0.0.3:6222".parse().expect("route"),
                    "10.0.0.2:6222".parse().expect("route"),
                ],
            }),
            ..config()
        })
        .expect("valid")
        .rendered;
        assert!(
            clustered.contains(
                "  listen: \"10.0.0.1:6222\"\n\
                 \x20 # Each machine's"
            ),
            "{clustered}"
        );
        assert!(
            clustered.contains(
                "  routes: [\n\
                 \x20   \"nats-route://10.0.0.2:6222\"\n\
                 \x20   \"nats-route://10.0.0.3:6222\"\n\
                 \x20 ]\n"
            ),
            "{clustered}"
        );
    }

    #[test]
    fn invalid_cluster_configs_are_refused_with_the_field() {
        let cases = [
            (
                NatsClusterConfig {
                    name: "two words".into(),
                    ..cluster()
                },
                "cluster.name",
            ),
            (
                NatsClusterConfig {
                    name: String::new(),
                    ..cluster()
                },
                "cluster.name",
            ),
            (
                NatsClusterConfig {
                    name: "with\"quote".into(),
                    ..cluster()
                },
                "cluster.name",
            ),
            (
                NatsClusterConfig {
                    listen: "[fd00:0:0:1::1]:0".parse().expect("listen"),
                    ..cluster()
                },
                "cluster.listen",
            ),
            (
                NatsClusterConfig {
                    routes: vec![],
                    ..cluster()
                },
                "cluster.routes",
            ),
            (
                NatsClusterConfig {
                    routes: vec!["[fd00:0:0:1::1]:4723".parse().expect("itself")],
                    ..cluster()
                },
                "cluster.routes",
            ),
            (
                NatsClusterConfig {
                    routes: vec!["[fd00:0:0:2::1]:0".parse().expect("route")],
                    ..cluster()
                },
                "cluster.routes",
            ),
        ];
        for (cluster, expected_field) in cases {
            let result = NatsKind::new(NatsSidecarConfig {
                cluster: Some(cluster),
                ..config()
            });
            let Err(SidecarError::InvalidConfig { field, .. }) = result else {
                panic!("expected InvalidConfig for {expected_field}, got {result:?}");
            };
            assert_eq!(field, expected_field);
        }
    }

    #[test]
    fn unspecified_listen_address_connects_over_loopback() {
        let mut config = config();
        config.listen = "0.0.0.0:4222".parse().expect("socket address");
        assert_eq!(
            NatsKind::new(config).expect("valid config").client_url(),
            "nats://127.0.0.1:4222"
        );
    }

    #[test]
    fn invalid_configs_are_refused_with_the_field() {
        let cases = [
            (
                NatsSidecarConfig {
                    server_name: "two words".into(),
                    ..config()
                },
                "server_name",
            ),
            (
                NatsSidecarConfig {
                    server_name: String::new(),
                    ..config()
                },
                "server_name",
            ),
            (
                NatsSidecarConfig {
                    listen: "127.0.0.1:0".parse().expect("socket address"),
                    ..config()
                },
                "listen",
            ),
            (
                NatsSidecarConfig {
                    monitor_port: Some(0),
                    ..config()
                },
                "monitor_port",
            ),
            (
                NatsSidecarConfig {
                    dir: PathBuf::from("/tmp/with\"quote"),
                    ..config()
                },
                "dir",
            ),
        ];
        for (config, expected_field) in cases {
            let result = NatsKind::new(config);
            let Err(SidecarError::InvalidConfig { field, .. }) = result else {
                panic!("expected InvalidConfig for {expected_field}, got {result:?}");
            };
            assert_eq!(field, expected_field);
        }
    }

    #[test]
    fn info_lines_are_checked_for_our_server_name() {
        let info = "INFO {\"server_id\":\"X\",\"server_name\":\"node-1\",\"port\":4222}\r\n";
        assert_eq!(parse_info(info, "node-1"), Probe::Ready);
        assert_eq!(
            parse_info(info, "node-2"),
            Probe::Wrong {
                detail: "server name `node-1`, expected `node-2`".into()
            }
        );
        assert!(matches!(
            parse_info("HTTP/1.1 400\r\n", "node-1"),
            Probe::NotReady { .. }
        ));
        assert!(matches!(
            parse_info("INFO {}\r\n", "node-1"),
            Probe::NotReady { .. }
        ));
    }

    #[test]
    fn configured_binary_must_be_an_executable_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let missing = dir.path().join("missing");
        let result = find_binary(Some(&missing));
        let Err(error @ SidecarError::ConfiguredBinaryMissing { .. }) = result else {
            panic!("expected ConfiguredBinaryMissing, got {result:?}");
        };
        assert!(
            error.to_string().contains(&missing.display().to_string()),
            "{error}"
        );
        let plain = dir.path().join("plain");
        fs::write(&plain, b"not a program").expect("write file");
        assert!(matches!(
            find_binary(Some(&plain)),
            Err(SidecarError::BinaryNotExecutable { .. })
        ));
        assert!(matches!(
            find_binary(Some(dir.path())),
            Err(SidecarError::BinaryNotExecutable { .. })
        ));
        fs::set_permissions(&plain, fs::Permissions::from_mode(0o755)).expect("chmod");
        assert_eq!(find_binary(Some(&plain)).expect("executable"), plain);
    }

    #[test]
    fn binary_not_found_tells_how_to_fix_it() {
        let error = SidecarError::BinaryNotFound {
            name: BINARY_NAME,
            places: BINARY_PLACES,
            hint: BINARY_HINT,
            searched: vec![],
        };
        let message = error.to_string();
        assert!(message.contains("cargo xtask setup"), "{message}");
        assert!(message.contains("PLOYZ_NATS_BIN"), "{message}");
        assert!(message.contains("nats.binary"), "{message}");
    }
}
