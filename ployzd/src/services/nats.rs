//! services::nats: the nats-server sidecar. Finds the binary, renders its config,
//! then adopts, starts, recreates, supervises and stops the process. nats-server
//! runs in its own session so it outlives ployzd: the data plane keeps serving
//! while the daemon is gone. This module speaks processes, files and TCP only;
//! it must not depend on async-nats, the store domain or the daemon.

use std::{
    env,
    fs::{self, File, OpenOptions},
    io::{self, Read as _, Seek as _, SeekFrom, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    os::unix::{ffi::OsStrExt as _, fs::PermissionsExt as _},
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, BufReader},
    net::TcpStream,
    process::{Child, Command},
    sync::{Mutex, watch},
    time::{Instant, sleep, timeout},
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{
    DriftReason, SidecarError, SidecarOrigin, SidecarState, SidecarStatus, error_chain,
    process::{self, Delivery, Pid, ProcState},
};

/// The client port nats-server listens on unless configured otherwise.
pub const DEFAULT_CLIENT_PORT: u16 = 4222;

const BINARY_NAME: &str = "nats-server";
/// Where `cargo xtask setup` installs nats-server, relative to the repository root.
const TOOLS_BINARY: &str = ".tools/nats/bin/nats-server";
/// Environment variable naming the binary when no path is configured.
const BINARY_ENV: &str = "PLOYZ_NATS_BIN";
const BINARY_HINT: &str = "run `cargo xtask setup` or set `nats.binary` / `PLOYZ_NATS_BIN`";

const CONFIG_FILE: &str = "nats.conf";
const STATE_FILE: &str = "sidecar.json";
const PID_FILE: &str = "nats.pid";
/// The server log, written by nats-server itself (`log_file`).
const LOG_FILE: &str = "nats.log";
/// stdout and stderr of the process: whatever it prints before its log file is
/// open (config errors) or outside it (Go panics).
const OUTPUT_FILE: &str = "nats-output.log";
const STORE_DIR: &str = "jetstream";

/// How often supervision checks that the process is still alive.
const SUPERVISE_INTERVAL: Duration = Duration::from_millis(500);
const RESTART_BACKOFF_MIN: Duration = Duration::from_secs(1);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A process that ran this long before dying restarts after the shortest delay again.
const STABLE_RUN: Duration = Duration::from_secs(60);
/// How long a process may take to disappear after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(5);
const EXIT_POLL_INTERVAL: Duration = Duration::from_millis(50);
const READY_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Bound on one readiness connection attempt and on waiting for its INFO line.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound on the INFO line; real ones are a few hundred bytes to a few KiB.
const PROBE_MAX_LINE: u64 = 64 * 1024;
/// How much of each log file a startup error quotes.
const LOG_TAIL_BYTES: u64 = 4 * 1024;

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
            start_timeout: Duration::from_secs(10),
            stop_grace: Duration::from_secs(10),
        }
    }
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
    if let Some(path) = env::var_os("PATH") {
        candidates.extend(env::split_paths(&path).map(|dir| dir.join(BINARY_NAME)));
    }
    match candidates
        .iter()
        .find(|candidate| is_executable_file(candidate))
    {
        Some(found) => Ok(std::path::absolute(found).unwrap_or_else(|_| found.clone())),
        None => Err(SidecarError::BinaryNotFound {
            name: BINARY_NAME,
            tools_dir: ".tools/nats/bin",
            hint: BINARY_HINT,
            searched: candidates,
        }),
    }
}

fn check_configured_binary(path: &Path) -> Result<PathBuf, SidecarError> {
    let metadata = fs::metadata(path).map_err(|source| SidecarError::ConfiguredBinaryMissing {
        path: path.to_path_buf(),
        source,
    })?;
    if !(metadata.is_file() && metadata.permissions().mode() & 0o111 != 0) {
        return Err(SidecarError::BinaryNotExecutable {
            path: path.to_path_buf(),
        });
    }
    std::path::absolute(path).map_err(|source| SidecarError::ConfiguredBinaryMissing {
        path: path.to_path_buf(),
        source,
    })
}

fn is_executable_file(path: &Path) -> bool {
    fs::metadata(path)
        .is_ok_and(|metadata| metadata.is_file() && metadata.permissions().mode() & 0o111 != 0)
}

/// The files the sidecar keeps in its directory.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SidecarFiles {
    config: PathBuf,
    state: PathBuf,
    pid: PathBuf,
    log: PathBuf,
    output: PathBuf,
    store: PathBuf,
}

impl SidecarFiles {
    fn in_dir(dir: &Path) -> Self {
        Self {
            config: dir.join(CONFIG_FILE),
            state: dir.join(STATE_FILE),
            pid: dir.join(PID_FILE),
            log: dir.join(LOG_FILE),
            output: dir.join(OUTPUT_FILE),
            store: dir.join(STORE_DIR),
        }
    }
}

/// Everything derived from the config before looking at the machine: the
/// expected specification that running processes are compared against.
#[derive(Debug)]
struct Spec {
    /// The config with `binary` and `dir` made absolute.
    config: NatsSidecarConfig,
    files: SidecarFiles,
    rendered: String,
    config_hash: String,
    /// Where to connect: the listen address, or loopback when it is unspecified.
    client_addr: SocketAddr,
}

impl Spec {
    fn new(mut config: NatsSidecarConfig) -> Result<Self, SidecarError> {
        config.dir = absolute("dir", &config.dir)?;
        config.binary = absolute("binary", &config.binary)?;
        let files = SidecarFiles::in_dir(&config.dir);
        let rendered = render(&config, &files)?;
        let config_hash = identity_hash(&rendered, &config.binary);
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
            config_hash,
            client_addr,
        })
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

fn absolute(field: &'static str, path: &Path) -> Result<PathBuf, SidecarError> {
    std::path::absolute(path).map_err(|error| SidecarError::InvalidConfig {
        field,
        reason: format!("`{}` cannot be made absolute: {error}", path.display()),
    })
}

/// Renders the nats-server config file. Deterministic: the same config and
/// files always give the same text, so its hash identifies the specification.
fn render(config: &NatsSidecarConfig, files: &SidecarFiles) -> Result<String, SidecarError> {
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
    Ok(text)
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

/// Hex sha256 of the rendered config and the binary path: running another
/// binary is drift just like running another config.
fn identity_hash(rendered: &str, binary: &Path) -> String {
    let mut hasher = Sha256::new();
    hasher.update(rendered.as_bytes());
    hasher.update(b"\0binary=");
    hasher.update(binary.as_os_str().as_bytes());
    hex::encode(hasher.finalize())
}

/// The state file: which process this sidecar started, and as what.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct StateRecord {
    pid: Pid,
    config_hash: String,
    binary: PathBuf,
    started_at_unix_ms: u64,
    /// `net:[inode]` of the namespace it was started in; absent in older records.
    #[serde(default)]
    network_namespace: Option<String>,
}

fn read_state(path: &Path) -> Result<Option<StateRecord>, SidecarError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(SidecarError::ReadFile {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    match serde_json::from_slice(&bytes) {
        Ok(record) => Ok(Some(record)),
        Err(error) => {
            // A torn or hand-edited state file must not block startup: without a
            // record, any process still using our config is recreated instead.
            warn!(path = %path.display(), %error, "ignoring unreadable nats sidecar state file");
            Ok(None)
        }
    }
}

/// Writes `contents` to a temporary sibling, syncs it and renames it over
/// `path`, so readers see the old file or the new one, never a torn one.
fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), SidecarError> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let write = || -> io::Result<()> {
        let mut file = File::create(&temporary)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&temporary, path)?;
        if let Some(parent) = path.parent() {
            File::open(parent)?.sync_all()?;
        }
        Ok(())
    };
    write().map_err(|source| SidecarError::WriteFile {
        path: path.to_path_buf(),
        source,
    })
}

fn create_dir(path: &Path) -> Result<(), SidecarError> {
    fs::create_dir_all(path).map_err(|source| SidecarError::CreateDir {
        path: path.to_path_buf(),
        source,
    })
}

/// True when `pid` is a live process started exactly as this sidecar starts
/// nats-server (`<binary> -c <config>`), with `binary` when given. A reused pid,
/// a zombie or an unrelated process never matches.
fn is_sidecar_process(pid: Pid, binary: Option<&Path>, config: &Path) -> bool {
    if process::state(pid) != ProcState::Live {
        return false;
    }
    let Some(argv) = process::argv(pid) else {
        return false;
    };
    match argv.as_slice() {
        [program, flag, path] => {
            flag == "-c"
                && Path::new(path) == config
                && binary.is_none_or(|binary| Path::new(program) == binary)
        }
        _ => false,
    }
}

/// What ensure found before deciding what to do.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Observation {
    recorded: Option<StateRecord>,
    /// The recorded process, when it still runs the recorded binary with our config.
    recorded_running: Option<RunningProcess>,
    /// Other live processes started with our config file.
    unrecorded: Vec<Pid>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct RunningProcess {
    pid: Pid,
    network_namespace: Option<String>,
}

fn observe(spec: &Spec) -> Result<Observation, SidecarError> {
    let recorded = read_state(&spec.files.state)?;
    let recorded_running = recorded
        .as_ref()
        .filter(|record| is_sidecar_process(record.pid, Some(&record.binary), &spec.files.config))
        .map(|record| RunningProcess {
            pid: record.pid,
            network_namespace: process::network_namespace(Some(record.pid)),
        });
    let own_pid = std::process::id();
    let recorded_pid = recorded_running.as_ref().map(|running| running.pid);
    let unrecorded = process::all_pids()
        .into_iter()
        .filter(|&pid| pid != own_pid && Some(pid) != recorded_pid)
        .filter(|&pid| is_sidecar_process(pid, None, &spec.files.config))
        .collect();
    Ok(Observation {
        recorded,
        recorded_running,
        unrecorded,
    })
}

/// The specification a running process must match to be adopted.
#[derive(Clone, Copy, Debug)]
struct Expected<'a> {
    config_hash: &'a str,
    binary: &'a Path,
    network_namespace: Option<&'a str>,
}

/// What ensure does.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Plan {
    /// Keep the running process untouched.
    Adopt { pid: Pid },
    /// Nothing of ours runs: start one.
    Start,
    /// Stop these processes, then start one.
    Recreate { stop: Vec<Pid>, reason: DriftReason },
}

/// Decides between adopting, starting and recreating. Pure, so every case is
/// a unit test.
fn plan(expected: Expected<'_>, observation: &Observation) -> Plan {
    let (Some(record), Some(running)) = (&observation.recorded, &observation.recorded_running)
    else {
        if observation.unrecorded.is_empty() {
            return Plan::Start;
        }
        return Plan::Recreate {
            stop: observation.unrecorded.clone(),
            reason: DriftReason::Unrecorded {
                pids: observation.unrecorded.clone(),
            },
        };
    };
    let reason = if record.binary != expected.binary {
        DriftReason::BinaryChanged {
            recorded: record.binary.clone(),
            expected: expected.binary.to_path_buf(),
        }
    } else if record.config_hash != expected.config_hash {
        DriftReason::ConfigChanged {
            recorded: record.config_hash.clone(),
            expected: expected.config_hash.to_owned(),
        }
    } else if let (Some(found), Some(expected)) =
        (&running.network_namespace, expected.network_namespace)
        && found != expected
    {
        DriftReason::NetworkNamespaceChanged {
            found: found.clone(),
            expected: expected.to_owned(),
        }
    } else if !observation.unrecorded.is_empty() {
        DriftReason::Unrecorded {
            pids: observation.unrecorded.clone(),
        }
    } else {
        return Plan::Adopt { pid: running.pid };
    };
    let mut stop = vec![running.pid];
    stop.extend(&observation.unrecorded);
    Plan::Recreate { stop, reason }
}

/// The process a sidecar supervises.
#[derive(Debug)]
enum Tracked {
    /// Started by this daemon and reaped through its handle, so it never
    /// lingers as a zombie (which `kill(pid, 0)` would report as alive).
    Child {
        child: Child,
        pid: Pid,
        since: Instant,
    },
    /// Adopted from an earlier daemon: not our child, observed through `/proc`.
    Adopted { pid: Pid, since: Instant },
}

impl Tracked {
    fn pid(&self) -> Pid {
        match self {
            Tracked::Child { pid, .. } | Tracked::Adopted { pid, .. } => *pid,
        }
    }

    fn since(&self) -> Instant {
        match self {
            Tracked::Child { since, .. } | Tracked::Adopted { since, .. } => *since,
        }
    }

    /// How the process ended, or `None` while it still runs.
    fn poll_exit(&mut self, spec: &Spec) -> Option<String> {
        match self {
            Tracked::Child { child, pid, .. } => match child.try_wait() {
                Ok(Some(status)) => Some(status.to_string()),
                Ok(None) => None,
                Err(error) => {
                    warn!(pid = *pid, %error, "cannot poll nats-server child; checking /proc instead");
                    (process::state(*pid) != ProcState::Live)
                        .then(|| "exit status unknown".to_owned())
                }
            },
            Tracked::Adopted { pid, .. } => {
                (!is_sidecar_process(*pid, Some(&spec.config.binary), &spec.files.config))
                    .then(|| "exit status unknown (not a child of this daemon)".to_owned())
            }
        }
    }
}

/// Spawns nats-server and waits until it answers; records it in the state file.
async fn start(spec: &Spec) -> Result<Tracked, SidecarError> {
    create_dir(&spec.config.dir)?;
    create_dir(&spec.files.store)?;
    ensure_port_free(spec.config.listen)?;
    if let Some(monitor) = spec.monitor_addr() {
        ensure_port_free(monitor)?;
    }
    write_atomically(&spec.files.config, spec.rendered.as_bytes())?;
    let output_error = |source| SidecarError::WriteFile {
        path: spec.files.output.clone(),
        source,
    };
    let stdout = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.files.output)
        .map_err(output_error)?;
    let stderr = stdout.try_clone().map_err(output_error)?;

    let mut command = Command::new(&spec.config.binary);
    command
        .arg("-c")
        .arg(&spec.files.config)
        .current_dir(&spec.config.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr));
    // A session of its own detaches nats-server from the daemon's controlling
    // terminal and process group: ^C at the daemon's terminal, `kill -- -<pgid>`
    // or the daemon exiting leave it running.
    let new_session = || -> io::Result<()> {
        // SAFETY: setsid(2) takes no arguments and touches no memory of ours; in
        // a freshly forked child it cannot fail with EPERM, as the child leads
        // no process group.
        if unsafe { libc::setsid() } == -1 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the hook runs in the forked child before exec. It only calls
    // setsid(2), which is async-signal-safe, and reads errno: no allocation, no
    // locks, nothing that could deadlock in a child of a multithreaded process.
    unsafe {
        command.pre_exec(new_session);
    }
    let mut child = command.spawn().map_err(|source| SidecarError::Spawn {
        binary: spec.config.binary.clone(),
        source,
    })?;
    let pid = child
        .id()
        .expect("a child that has not been waited on still has its pid");
    let record = StateRecord {
        pid,
        config_hash: spec.config_hash.clone(),
        binary: spec.config.binary.clone(),
        started_at_unix_ms: crate::time::now_unix_ms(),
        network_namespace: process::network_namespace(None),
    };
    let recorded = serde_json::to_vec_pretty(&record)
        .map_err(|error| SidecarError::WriteFile {
            path: spec.files.state.clone(),
            source: io::Error::other(error),
        })
        .and_then(|bytes| write_atomically(&spec.files.state, &bytes));
    let ready = match recorded {
        Ok(()) => wait_ready(spec, Watched::Child(&mut child)).await,
        Err(error) => Err(error),
    };
    if let Err(error) = ready {
        // Leave nothing half-started behind: the caller reports the failure and
        // supervision retries from a clean slate.
        if let Err(stop_error) = stop_child(&mut child, pid, spec.config.stop_grace).await {
            warn!(pid, error = %error_chain(&stop_error), "cannot stop nats-server that failed to start");
        }
        return Err(error);
    }
    info!(pid, url = %spec.client_url(), "started nats-server");
    Ok(Tracked::Child {
        child,
        pid,
        since: Instant::now(),
    })
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

/// The process whose readiness is awaited.
enum Watched<'a> {
    Child(&'a mut Child),
    Adopted(Pid),
}

/// Waits until the process answers on the client port with our server name,
/// failing early when it exits or someone else's server answers.
async fn wait_ready(spec: &Spec, mut watched: Watched<'_>) -> Result<(), SidecarError> {
    let deadline = Instant::now() + spec.config.start_timeout;
    loop {
        let exited = match &mut watched {
            Watched::Child(child) => child
                .try_wait()
                .map_err(|source| SidecarError::Wait {
                    pid: child.id().unwrap_or_default(),
                    source,
                })?
                .map(|status| status.to_string()),
            Watched::Adopted(pid) => {
                (!is_sidecar_process(*pid, Some(&spec.config.binary), &spec.files.config))
                    .then(|| "exit status unknown".to_owned())
            }
        };
        if let Some(status) = exited {
            return Err(SidecarError::ExitedDuringStart {
                binary: spec.config.binary.clone(),
                status,
                log_tail: log_tail(&spec.files),
            });
        }
        let last_probe = match probe(spec.client_addr, &spec.config.server_name).await {
            Probe::Ready => return Ok(()),
            Probe::OtherServer { server_name } => {
                return Err(SidecarError::WrongServer {
                    addr: spec.client_addr,
                    expected: spec.config.server_name.clone(),
                    found: format!("server name `{server_name}`"),
                });
            }
            Probe::NotReady { detail } => detail,
        };
        if Instant::now() >= deadline {
            return Err(SidecarError::StartTimeout {
                binary: spec.config.binary.clone(),
                addr: spec.client_addr,
                timeout: spec.config.start_timeout,
                last_probe,
                log_tail: log_tail(&spec.files),
            });
        }
        sleep(READY_POLL_INTERVAL).await;
    }
}

/// The outcome of one readiness probe.
#[derive(Debug, PartialEq, Eq)]
enum Probe {
    /// A NATS server with our server name answered.
    Ready,
    /// A NATS server with another name answered.
    OtherServer { server_name: String },
    /// Nothing usable answered (yet).
    NotReady { detail: String },
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
        Some(found) => Probe::OtherServer { server_name: found },
        None => Probe::NotReady {
            detail: "the INFO line has no server_name".to_owned(),
        },
    }
}

/// The last lines of the server log and of the process output, for errors.
fn log_tail(files: &SidecarFiles) -> String {
    let mut tail = String::new();
    for path in [&files.log, &files.output] {
        let Some(text) = read_tail(path).filter(|text| !text.trim().is_empty()) else {
            continue;
        };
        tail.push_str(&format!("==> {} <==\n{}", path.display(), text));
        if !tail.ends_with('\n') {
            tail.push('\n');
        }
    }
    if tail.is_empty() {
        tail.push_str("(no log output)\n");
    }
    tail
}

fn read_tail(path: &Path) -> Option<String> {
    let mut file = File::open(path).ok()?;
    let length = file.metadata().ok()?.len();
    let start = length.saturating_sub(LOG_TAIL_BYTES);
    file.seek(SeekFrom::Start(start)).ok()?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).ok()?;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    // Drop the partial first line when the tail starts mid-file.
    if start > 0
        && let Some(newline) = text.find('\n')
    {
        return Some(text[newline + 1..].to_owned());
    }
    Some(text)
}

/// Stops a child of this daemon: SIGTERM, `grace`, then SIGKILL; reaps it.
async fn stop_child(child: &mut Child, pid: Pid, grace: Duration) -> Result<(), SidecarError> {
    let wait_error = |source| SidecarError::Wait { pid, source };
    if child.try_wait().map_err(wait_error)?.is_some() {
        return Ok(());
    }
    // An unreaped child keeps its pid, so signalling by pid cannot hit a stranger.
    signal(pid, libc::SIGTERM)?;
    if let Ok(waited) = timeout(grace, child.wait()).await {
        waited.map_err(wait_error)?;
        return Ok(());
    }
    warn!(pid, ?grace, "nats-server ignored SIGTERM; sending SIGKILL");
    child.start_kill().map_err(|source| SidecarError::Signal {
        pid,
        signal: process::signal_name(libc::SIGKILL),
        source,
    })?;
    match timeout(KILL_WAIT, child.wait()).await {
        Ok(waited) => waited.map(drop).map_err(wait_error),
        Err(_elapsed) => Err(SidecarError::StopTimeout {
            pid,
            waited: KILL_WAIT,
        }),
    }
}

/// Stops a process that is not our child but runs with our config:
/// SIGTERM, `grace`, then SIGKILL. Each signal goes out only after checking
/// that the pid still is that process, so a pid reused meanwhile is left alone.
async fn stop_process(pid: Pid, config: &Path, grace: Duration) -> Result<(), SidecarError> {
    if !is_sidecar_process(pid, None, config) {
        return Ok(());
    }
    if signal(pid, libc::SIGTERM)? == Delivery::NoSuchProcess || wait_gone(pid, config, grace).await
    {
        return Ok(());
    }
    warn!(pid, ?grace, "nats-server ignored SIGTERM; sending SIGKILL");
    if !is_sidecar_process(pid, None, config)
        || signal(pid, libc::SIGKILL)? == Delivery::NoSuchProcess
        || wait_gone(pid, config, KILL_WAIT).await
    {
        return Ok(());
    }
    Err(SidecarError::StopTimeout {
        pid,
        waited: KILL_WAIT,
    })
}

/// Polls until `pid` no longer is our nats-server; false when `limit` passes first.
async fn wait_gone(pid: Pid, config: &Path, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if !is_sidecar_process(pid, None, config) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        sleep(EXIT_POLL_INTERVAL).await;
    }
}

fn signal(pid: Pid, signal: libc::c_int) -> Result<Delivery, SidecarError> {
    process::send_signal(pid, signal).map_err(|source| SidecarError::Signal {
        pid,
        signal: process::signal_name(signal),
        source,
    })
}

/// Stops whichever process is tracked, with the configured grace period.
async fn terminate(tracked: &mut Tracked, spec: &Spec) -> Result<(), SidecarError> {
    match tracked {
        Tracked::Child { child, pid, .. } => stop_child(child, *pid, spec.config.stop_grace).await,
        Tracked::Adopted { pid, .. } => {
            stop_process(*pid, &spec.files.config, spec.config.stop_grace).await
        }
    }
}

/// Delay before restart attempt number `consecutive_failures + 1`: 1 s, 2 s,
/// 4 s, ... capped at 30 s.
fn restart_delay(consecutive_failures: u32) -> Duration {
    let factor = 1_u32.checked_shl(consecutive_failures).unwrap_or(u32::MAX);
    RESTART_BACKOFF_MIN
        .saturating_mul(factor)
        .min(RESTART_BACKOFF_MAX)
}

/// How a supervised process ended.
#[derive(Debug)]
struct Exit {
    pid: Pid,
    status: String,
    ran_for: Duration,
}

/// What one restart attempt came to.
enum RestartOutcome {
    Restarted,
    /// Shutdown or an explicit stop arrived; supervision ends.
    Abandoned,
    Failed(SidecarError),
}

/// The nats-server sidecar of this machine: the process, how it came to run,
/// and its supervision. Share it behind an `Arc` between [`Self::supervise`]
/// and callers of [`Self::status`] and [`Self::stop`]. Dropping it leaves
/// nats-server running.
#[derive(Debug)]
pub struct NatsSidecar {
    spec: Spec,
    process: Mutex<Option<Tracked>>,
    status: watch::Sender<SidecarStatus>,
    stop_requested: CancellationToken,
}

impl NatsSidecar {
    /// Makes nats-server run as `config` describes, adopt-first: a running
    /// process that matches the recorded identity (same binary, same rendered
    /// config, same network namespace) and answers is adopted untouched;
    /// drifted or unrecorded ones are stopped and replaced; otherwise one is
    /// started. The result says which in [`SidecarStatus::origin`].
    pub async fn ensure(config: NatsSidecarConfig) -> Result<Self, SidecarError> {
        let spec = Spec::new(config)?;
        let observation = observe(&spec)?;
        let own_namespace = process::network_namespace(None);
        let expected = Expected {
            config_hash: &spec.config_hash,
            binary: &spec.config.binary,
            network_namespace: own_namespace.as_deref(),
        };
        let (tracked, origin) = match plan(expected, &observation) {
            Plan::Adopt { pid } => match wait_ready(&spec, Watched::Adopted(pid)).await {
                Ok(()) => {
                    info!(pid, url = %spec.client_url(), "adopted running nats-server");
                    (
                        Tracked::Adopted {
                            pid,
                            since: Instant::now(),
                        },
                        SidecarOrigin::Adopted,
                    )
                }
                Err(error) => {
                    let reason = DriftReason::Unresponsive {
                        pid,
                        detail: error_chain(&error),
                    };
                    recreate(&spec, &[pid], reason).await?
                }
            },
            Plan::Start => {
                if let Some(record) = &observation.recorded {
                    info!(
                        pid = record.pid,
                        "recorded nats-server is no longer running"
                    );
                }
                (start(&spec).await?, SidecarOrigin::Started)
            }
            Plan::Recreate { stop, reason } => recreate(&spec, &stop, reason).await?,
        };
        let status = SidecarStatus {
            state: SidecarState::Running,
            pid: Some(tracked.pid()),
            origin,
            config_hash: spec.config_hash.clone(),
            client_url: spec.client_url(),
            restarts: 0,
            detail: None,
        };
        Ok(Self {
            spec,
            process: Mutex::new(Some(tracked)),
            status: watch::Sender::new(status),
            stop_requested: CancellationToken::new(),
        })
    }

    /// Watches the process until `shutdown` is cancelled or [`Self::stop`] is
    /// called, restarting it with exponential backoff (1 s to 30 s) whenever it
    /// dies. Returning never stops nats-server: the data plane outlives the
    /// daemon. Run at most one supervision per sidecar.
    pub async fn supervise(&self, shutdown: CancellationToken) {
        let mut consecutive_failures = 0_u32;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.stop_requested.cancelled() => return,
                () = sleep(SUPERVISE_INTERVAL) => {}
            }
            let Some(exit) = self.take_exit().await else {
                continue;
            };
            if exit.ran_for >= STABLE_RUN {
                consecutive_failures = 0;
            }
            warn!(pid = exit.pid, status = %exit.status, ran_for = ?exit.ran_for, "nats-server died");
            let mut cause = format!("pid {} exited ({})", exit.pid, exit.status);
            loop {
                let delay = restart_delay(consecutive_failures);
                consecutive_failures = consecutive_failures.saturating_add(1);
                self.status.send_modify(|status| {
                    status.state = SidecarState::Failed;
                    status.pid = None;
                    status.detail = Some(format!("{cause}; restarting in {delay:?}"));
                });
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = self.stop_requested.cancelled() => return,
                    () = sleep(delay) => {}
                }
                match self.restart(&shutdown, &cause).await {
                    RestartOutcome::Restarted => break,
                    RestartOutcome::Abandoned => return,
                    RestartOutcome::Failed(error) => {
                        let chain = error_chain(&error);
                        warn!(error = %chain, "restarting nats-server failed");
                        cause = format!("restart failed: {chain}");
                    }
                }
            }
        }
    }

    /// Takes the tracked process out when it has exited.
    async fn take_exit(&self) -> Option<Exit> {
        let mut process = self.process.lock().await;
        let tracked = process.as_mut()?;
        let status = tracked.poll_exit(&self.spec)?;
        let exit = Exit {
            pid: tracked.pid(),
            status,
            ran_for: tracked.since().elapsed(),
        };
        *process = None;
        Some(exit)
    }

    async fn restart(&self, shutdown: &CancellationToken, cause: &str) -> RestartOutcome {
        // Holding the lock across the start makes a concurrent stop() wait for
        // it and then stop the new process, instead of racing it.
        let mut process = self.process.lock().await;
        if self.stop_requested.is_cancelled() {
            return RestartOutcome::Abandoned;
        }
        // Cancelling mid-start drops the child handle without killing it: the
        // process and its state file remain for the next daemon to adopt.
        let started = tokio::select! {
            () = shutdown.cancelled() => return RestartOutcome::Abandoned,
            started = start(&self.spec) => started,
        };
        match started {
            Ok(tracked) => {
                let pid = tracked.pid();
                *process = Some(tracked);
                self.status.send_modify(|status| {
                    status.state = SidecarState::Running;
                    status.pid = Some(pid);
                    status.restarts = status.restarts.saturating_add(1);
                    status.detail = Some(format!("restarted after: {cause}"));
                });
                info!(pid, "restarted nats-server");
                RestartOutcome::Restarted
            }
            Err(error) => RestartOutcome::Failed(error),
        }
    }

    /// A snapshot of the sidecar's state.
    pub fn status(&self) -> SidecarStatus {
        self.status.borrow().clone()
    }

    /// A receiver that sees every status change.
    pub fn watch_status(&self) -> watch::Receiver<SidecarStatus> {
        self.status.subscribe()
    }

    /// Where NATS clients connect, e.g. `nats://127.0.0.1:4222`.
    pub fn client_url(&self) -> String {
        self.spec.client_url()
    }

    /// The config this sidecar runs with (`binary` and `dir` made absolute).
    pub fn config(&self) -> &NatsSidecarConfig {
        &self.spec.config
    }

    /// Stops nats-server (SIGTERM, the grace period, then SIGKILL) and ends
    /// supervision for good: it will not be restarted by this sidecar.
    pub async fn stop(&self) -> Result<(), SidecarError> {
        self.stop_requested.cancel();
        let mut process = self.process.lock().await;
        if let Some(tracked) = process.as_mut() {
            let pid = tracked.pid();
            if let Err(error) = terminate(tracked, &self.spec).await {
                let chain = error_chain(&error);
                self.status.send_modify(|status| {
                    status.state = SidecarState::Failed;
                    status.detail = Some(format!("stop failed: {chain}"));
                });
                return Err(error);
            }
            *process = None;
            info!(pid, "stopped nats-server");
        }
        self.status.send_modify(|status| {
            status.state = SidecarState::Stopped;
            status.pid = None;
            status.detail = Some("stopped on request".to_owned());
        });
        Ok(())
    }
}

/// Stops `stop` and starts a fresh process.
async fn recreate(
    spec: &Spec,
    stop: &[Pid],
    reason: DriftReason,
) -> Result<(Tracked, SidecarOrigin), SidecarError> {
    warn!(%reason, pids = ?stop, "recreating nats-server");
    for &pid in stop {
        stop_process(pid, &spec.files.config, spec.config.stop_grace).await?;
    }
    Ok((start(spec).await?, SidecarOrigin::Recreated { reason }))
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::*;

    fn config() -> NatsSidecarConfig {
        NatsSidecarConfig::new(
            PathBuf::from("/opt/nats/nats-server"),
            PathBuf::from("/var/lib/ployz/nats"),
            "node-1",
        )
    }

    fn hash_of(config: NatsSidecarConfig) -> String {
        Spec::new(config).expect("valid config").config_hash
    }

    #[test]
    fn rendering_is_deterministic_and_complete() {
        let spec = Spec::new(config()).expect("valid config");
        let again = Spec::new(config()).expect("valid config");
        assert_eq!(spec.rendered, again.rendered);
        assert_eq!(spec.config_hash, again.config_hash);
        assert_eq!(spec.config_hash.len(), 64);
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
        let spec = Spec::new(config).expect("valid config");
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
        ];
        for changed in changes {
            assert_ne!(hash_of(changed.clone()), base, "{changed:?}");
        }
        // Timeouts are how ployzd treats the process, not what the process is.
        let timeouts = NatsSidecarConfig {
            start_timeout: Duration::from_secs(1),
            stop_grace: Duration::from_secs(1),
            ..config()
        };
        assert_eq!(hash_of(timeouts), base);
    }

    #[test]
    fn unspecified_listen_address_connects_over_loopback() {
        let mut config = config();
        config.listen = "0.0.0.0:4222".parse().expect("socket address");
        assert_eq!(
            Spec::new(config).expect("valid config").client_url(),
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
            let result = Spec::new(config);
            let Err(SidecarError::InvalidConfig { field, .. }) = result else {
                panic!("expected InvalidConfig for {expected_field}, got {result:?}");
            };
            assert_eq!(field, expected_field);
        }
    }

    fn record(pid: Pid, hash: &str, binary: &str) -> StateRecord {
        StateRecord {
            pid,
            config_hash: hash.into(),
            binary: binary.into(),
            started_at_unix_ms: 1,
            network_namespace: Some("net:[1]".into()),
        }
    }

    fn running(pid: Pid, namespace: Option<&str>) -> Option<RunningProcess> {
        Some(RunningProcess {
            pid,
            network_namespace: namespace.map(str::to_owned),
        })
    }

    fn expected() -> Expected<'static> {
        Expected {
            config_hash: "hash-a",
            binary: Path::new("/bin/nats-server"),
            network_namespace: Some("net:[1]"),
        }
    }

    #[test]
    fn plan_starts_when_nothing_of_ours_runs() {
        let nothing = Observation {
            recorded: None,
            recorded_running: None,
            unrecorded: vec![],
        };
        assert_eq!(plan(expected(), &nothing), Plan::Start);
        let gone = Observation {
            recorded: Some(record(10, "hash-a", "/bin/nats-server")),
            recorded_running: None,
            unrecorded: vec![],
        };
        assert_eq!(plan(expected(), &gone), Plan::Start);
    }

    #[test]
    fn plan_adopts_a_matching_process() {
        let observation = Observation {
            recorded: Some(record(10, "hash-a", "/bin/nats-server")),
            recorded_running: running(10, Some("net:[1]")),
            unrecorded: vec![],
        };
        assert_eq!(plan(expected(), &observation), Plan::Adopt { pid: 10 });
        // An unreadable namespace cannot prove drift.
        let unknown = Observation {
            recorded_running: running(10, None),
            ..observation
        };
        assert_eq!(plan(expected(), &unknown), Plan::Adopt { pid: 10 });
    }

    #[test]
    fn plan_recreates_drifted_processes_with_the_reason() {
        let cases = [
            (
                record(10, "hash-b", "/old/nats-server"),
                running(10, Some("net:[1]")),
                DriftReason::BinaryChanged {
                    recorded: "/old/nats-server".into(),
                    expected: "/bin/nats-server".into(),
                },
            ),
            (
                record(10, "hash-b", "/bin/nats-server"),
                running(10, Some("net:[1]")),
                DriftReason::ConfigChanged {
                    recorded: "hash-b".into(),
                    expected: "hash-a".into(),
                },
            ),
            (
                record(10, "hash-a", "/bin/nats-server"),
                running(10, Some("net:[2]")),
                DriftReason::NetworkNamespaceChanged {
                    found: "net:[2]".into(),
                    expected: "net:[1]".into(),
                },
            ),
        ];
        for (recorded, recorded_running, reason) in cases {
            let observation = Observation {
                recorded: Some(recorded),
                recorded_running,
                unrecorded: vec![],
            };
            assert_eq!(
                plan(expected(), &observation),
                Plan::Recreate {
                    stop: vec![10],
                    reason
                }
            );
        }
    }

    #[test]
    fn plan_recreates_when_unrecorded_processes_use_our_config() {
        let alongside = Observation {
            recorded: Some(record(10, "hash-a", "/bin/nats-server")),
            recorded_running: running(10, Some("net:[1]")),
            unrecorded: vec![11],
        };
        assert_eq!(
            plan(expected(), &alongside),
            Plan::Recreate {
                stop: vec![10, 11],
                reason: DriftReason::Unrecorded { pids: vec![11] },
            }
        );
        let without_record = Observation {
            recorded: None,
            recorded_running: None,
            unrecorded: vec![11, 12],
        };
        assert_eq!(
            plan(expected(), &without_record),
            Plan::Recreate {
                stop: vec![11, 12],
                reason: DriftReason::Unrecorded { pids: vec![11, 12] },
            }
        );
    }

    #[test]
    fn state_record_uses_the_documented_field_names() {
        let json =
            serde_json::to_value(record(7, "abc", "/bin/nats-server")).expect("serializable");
        for field in ["pid", "config_hash", "binary", "started_at_unix_ms"] {
            assert!(json.get(field).is_some(), "missing {field} in {json}");
        }
        let minimal: StateRecord = serde_json::from_str(
            r#"{"pid": 7, "config_hash": "abc", "binary": "/bin/nats-server", "started_at_unix_ms": 1}"#,
        )
        .expect("a record without a namespace parses");
        assert_eq!(minimal.network_namespace, None);
    }

    #[test]
    fn info_lines_are_checked_for_our_server_name() {
        let info = "INFO {\"server_id\":\"X\",\"server_name\":\"node-1\",\"port\":4222}\r\n";
        assert_eq!(parse_info(info, "node-1"), Probe::Ready);
        assert_eq!(
            parse_info(info, "node-2"),
            Probe::OtherServer {
                server_name: "node-1".into()
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
    fn restart_delay_doubles_up_to_thirty_seconds() {
        let delays: Vec<u64> = (0..8)
            .map(|failures| restart_delay(failures).as_secs())
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(restart_delay(u32::MAX), RESTART_BACKOFF_MAX);
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
            tools_dir: ".tools/nats/bin",
            hint: BINARY_HINT,
            searched: vec![],
        };
        let message = error.to_string();
        assert!(message.contains("cargo xtask setup"), "{message}");
        assert!(message.contains("PLOYZ_NATS_BIN"), "{message}");
        assert!(message.contains("nats.binary"), "{message}");
    }

    #[test]
    fn atomic_writes_replace_the_whole_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("nats.conf");
        write_atomically(&path, b"first version, longer").expect("first write");
        write_atomically(&path, b"second").expect("second write");
        assert_eq!(fs::read(&path).expect("read back"), b"second");
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .expect("list dir")
            .filter_map(Result::ok)
            .map(|entry| entry.file_name())
            .collect();
        assert_eq!(leftovers, [OsStr::new("nats.conf")]);
    }
}
