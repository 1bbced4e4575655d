//! services::sidecar: the adopt-first lifecycle every sidecar shares, generic
//! over a [`SidecarKind`] that says what differs (config text, arguments,
//! readiness probe). Identity hash, state file, observation through `/proc`,
//! the adopt/start/recreate plan, starting in a session of its own,
//! supervision with backoff and stopping live here. It knows no particular
//! sidecar and must not depend on the daemon or on any service's client library.

use std::{
    env,
    ffi::OsString,
    fmt,
    fs::{self, File, OpenOptions},
    io::{self, Read as _, Seek as _, SeekFrom, Write as _},
    os::unix::{ffi::OsStrExt as _, fs::PermissionsExt as _},
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::{
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
/// How much of each log file a startup error quotes.
const LOG_TAIL_BYTES: u64 = 4 * 1024;

/// What differs between sidecars. Everything else — files, identity,
/// adoption, supervision — is [`Sidecar`]'s.
pub(crate) trait SidecarKind: fmt::Debug + Send + Sync + 'static {
    /// The process name in logs and errors, e.g. `nats-server`.
    fn name(&self) -> &'static str;

    /// The names of the files the sidecar keeps in its directory.
    fn file_names(&self) -> FileNames;

    /// The config file text. With the binary path it is the process's identity:
    /// when it changes, the running process is recreated.
    fn rendered_config(&self) -> &str;

    /// The arguments after the binary, given the absolute config file path.
    fn args(&self, config_file: &Path) -> Vec<OsString>;

    /// Asks the process `pid` once whether it serves.
    fn probe(&self, pid: Pid) -> impl Future<Output = Probe> + Send;

    /// Where clients reach the process, for status, e.g. `nats://127.0.0.1:4222`.
    fn endpoint(&self) -> String;

    /// Checks and preparations right before each start, e.g. that the ports
    /// are free or that a data directory exists.
    fn prepare_start(&self) -> Result<(), SidecarError> {
        Ok(())
    }

    /// Log files the process writes itself, quoted (with its output) when it
    /// fails to start.
    fn log_files(&self) -> Vec<PathBuf> {
        Vec::new()
    }
}

/// The outcome of one readiness probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Probe {
    /// Our process answered and serves.
    Ready,
    /// Nothing usable answered (yet).
    NotReady { detail: String },
    /// Something else answers where our process should: waiting will not help.
    Wrong { detail: String },
}

/// Names of the files a sidecar keeps in its directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FileNames {
    pub(crate) config: &'static str,
    /// The state file recording which process runs as what.
    pub(crate) state: &'static str,
    /// stdout and stderr of the process.
    pub(crate) output: &'static str,
    /// A pid file ployzd writes after each start; `None` when the process
    /// writes its own.
    pub(crate) pid: Option<&'static str>,
}

/// How ployzd runs a sidecar process, whatever its kind. `binary` and `dir`
/// are part of the identity; the timeouts are not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ProcessConfig {
    pub(crate) binary: PathBuf,
    pub(crate) dir: PathBuf,
    /// How long a started or adopted process may take to answer its probe.
    pub(crate) start_timeout: Duration,
    /// How long a stopping process gets between SIGTERM and SIGKILL.
    pub(crate) stop_grace: Duration,
}

/// Checks a configured binary path: it must be an executable file. Returns it
/// made absolute.
pub(crate) fn check_configured_binary(path: &Path) -> Result<PathBuf, SidecarError> {
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

/// The first executable file among `candidates`, made absolute.
pub(crate) fn first_executable(candidates: &[PathBuf]) -> Option<PathBuf> {
    candidates
        .iter()
        .find(|candidate| is_executable_file(candidate))
        .map(|found| std::path::absolute(found).unwrap_or_else(|_| found.clone()))
}

fn is_executable_file(path: &Path) -> bool {
    fs::metadata(path)
        .is_ok_and(|metadata| metadata.is_file() && metadata.permissions().mode() & 0o111 != 0)
}

/// `name` in every directory of a `PATH`-style list.
pub(crate) fn path_candidates(path_variable: Option<&OsString>, name: &str) -> Vec<PathBuf> {
    path_variable
        .map(|path| env::split_paths(path).map(|dir| dir.join(name)).collect())
        .unwrap_or_default()
}

/// Makes a configured path absolute, naming the field when it cannot be.
pub(crate) fn absolute(field: &'static str, path: &Path) -> Result<PathBuf, SidecarError> {
    std::path::absolute(path).map_err(|error| SidecarError::InvalidConfig {
        field,
        reason: format!("`{}` cannot be made absolute: {error}", path.display()),
    })
}

pub(crate) fn create_dir(path: &Path) -> Result<(), SidecarError> {
    fs::create_dir_all(path).map_err(|source| SidecarError::CreateDir {
        path: path.to_path_buf(),
        source,
    })
}

/// Hex sha256 of the rendered config and the binary path: running another
/// binary is drift just like running another config.
pub(crate) fn identity_hash(rendered: &str, binary: &Path) -> String {
    let mut hasher = Sha256::new();
    hasher.update(rendered.as_bytes());
    hasher.update(b"\0binary=");
    hasher.update(binary.as_os_str().as_bytes());
    hex::encode(hasher.finalize())
}

/// The files a sidecar keeps in its directory, as absolute paths.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SidecarFiles {
    config: PathBuf,
    state: PathBuf,
    output: PathBuf,
    pid: Option<PathBuf>,
}

impl SidecarFiles {
    fn in_dir(dir: &Path, names: FileNames) -> Self {
        Self {
            config: dir.join(names.config),
            state: dir.join(names.state),
            output: dir.join(names.output),
            pid: names.pid.map(|pid| dir.join(pid)),
        }
    }
}

/// Everything derived before looking at the machine: the expected
/// specification that running processes are compared against.
#[derive(Debug)]
struct Spec<K> {
    kind: K,
    /// `binary` and `dir` made absolute.
    process: ProcessConfig,
    files: SidecarFiles,
    /// The arguments after the binary; the last ones name our config file.
    args: Vec<OsString>,
    config_hash: String,
}

impl<K: SidecarKind> Spec<K> {
    fn new(kind: K, mut process: ProcessConfig) -> Result<Self, SidecarError> {
        process.binary = absolute("binary", &process.binary)?;
        process.dir = absolute("dir", &process.dir)?;
        let files = SidecarFiles::in_dir(&process.dir, kind.file_names());
        let args = kind.args(&files.config);
        let config_hash = identity_hash(kind.rendered_config(), &process.binary);
        Ok(Self {
            kind,
            process,
            files,
            args,
            config_hash,
        })
    }

    fn name(&self) -> &'static str {
        self.kind.name()
    }
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
            warn!(path = %path.display(), %error, "ignoring unreadable sidecar state file");
            Ok(None)
        }
    }
}

/// Writes `contents` to a temporary sibling, syncs it and renames it over
/// `path`, so readers see the old file or the new one, never a torn one.
pub(crate) fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), SidecarError> {
    write_file(path, contents, None)
}

/// [`write_atomically`] for a secret: the file is created readable by its
/// owner only (mode 0600), never visible with a wider mode.
pub(crate) fn write_private(path: &Path, contents: &[u8]) -> Result<(), SidecarError> {
    write_file(path, contents, Some(0o600))
}

fn write_file(path: &Path, contents: &[u8], mode: Option<u32>) -> Result<(), SidecarError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let write = || -> io::Result<()> {
        let mut options = fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        if let Some(mode) = mode {
            // A leftover temporary keeps its mode through create: start afresh.
            let _ = fs::remove_file(&temporary);
            options.mode(mode);
        }
        let mut file = options.open(&temporary)?;
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

/// True when `pid` is a live process started exactly as this sidecar starts
/// its process (`<binary> <args...>`, the args naming our config file), with
/// `binary` when given. Anything before the binary is an interpreter: a
/// script started through `#!` shows as `<interpreter> <script> <args...>`.
/// A reused pid, a zombie or an unrelated process never matches.
fn is_sidecar_process(pid: Pid, binary: Option<&Path>, args: &[OsString]) -> bool {
    if process::state(pid) != ProcState::Live {
        return false;
    }
    process::argv(pid).is_some_and(|argv| argv_matches(&argv, binary, args))
}

fn argv_matches(argv: &[OsString], binary: Option<&Path>, args: &[OsString]) -> bool {
    let Some(program_index) = argv.len().checked_sub(args.len() + 1) else {
        return false;
    };
    argv[program_index + 1..] == *args
        && binary.is_none_or(|binary| Path::new(&argv[program_index]) == binary)
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

fn observe<K>(spec: &Spec<K>) -> Result<Observation, SidecarError> {
    let recorded = read_state(&spec.files.state)?;
    let recorded_running = recorded
        .as_ref()
        .filter(|record| is_sidecar_process(record.pid, Some(&record.binary), &spec.args))
        .map(|record| RunningProcess {
            pid: record.pid,
            network_namespace: process::network_namespace(Some(record.pid)),
        });
    let own_pid = std::process::id();
    let recorded_pid = recorded_running.as_ref().map(|running| running.pid);
    let unrecorded = process::all_pids()
        .into_iter()
        .filter(|&pid| pid != own_pid && Some(pid) != recorded_pid)
        .filter(|&pid| is_sidecar_process(pid, None, &spec.args))
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
    fn poll_exit<K: SidecarKind>(&mut self, spec: &Spec<K>) -> Option<String> {
        match self {
            Tracked::Child { child, pid, .. } => match child.try_wait() {
                Ok(Some(status)) => Some(status.to_string()),
                Ok(None) => None,
                Err(error) => {
                    warn!(pid = *pid, %error, sidecar = spec.name(), "cannot poll sidecar child; checking /proc instead");
                    (process::state(*pid) != ProcState::Live)
                        .then(|| "exit status unknown".to_owned())
                }
            },
            Tracked::Adopted { pid, .. } => {
                (!is_sidecar_process(*pid, Some(&spec.process.binary), &spec.args))
                    .then(|| "exit status unknown (not a child of this daemon)".to_owned())
            }
        }
    }
}

/// Spawns the process and waits until it answers; records it in the state file.
async fn start<K: SidecarKind>(spec: &Spec<K>) -> Result<Tracked, SidecarError> {
    create_dir(&spec.process.dir)?;
    spec.kind.prepare_start()?;
    write_atomically(&spec.files.config, spec.kind.rendered_config().as_bytes())?;
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

    let mut command = Command::new(&spec.process.binary);
    command
        .args(&spec.args)
        .current_dir(&spec.process.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr));
    // A session of its own detaches the sidecar from the daemon's controlling
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
        binary: spec.process.binary.clone(),
        source,
    })?;
    let pid = child
        .id()
        .expect("a child that has not been waited on still has its pid");
    let ready = match record_start(spec, pid) {
        Ok(()) => wait_ready(spec, Watched::Child(&mut child), pid).await,
        Err(error) => Err(error),
    };
    if let Err(error) = ready {
        // Leave nothing half-started behind: the caller reports the failure and
        // supervision retries from a clean slate.
        if let Err(stop_error) =
            stop_child(spec.name(), &mut child, pid, spec.process.stop_grace).await
        {
            warn!(pid, sidecar = spec.name(), error = %error_chain(&stop_error), "cannot stop a sidecar that failed to start");
        }
        return Err(error);
    }
    info!(pid, endpoint = %spec.kind.endpoint(), "started {}", spec.name());
    Ok(Tracked::Child {
        child,
        pid,
        since: Instant::now(),
    })
}

/// Writes the state file (and the pid file, when ployzd keeps one) for a
/// freshly spawned process.
fn record_start<K: SidecarKind>(spec: &Spec<K>, pid: Pid) -> Result<(), SidecarError> {
    let record = StateRecord {
        pid,
        config_hash: spec.config_hash.clone(),
        binary: spec.process.binary.clone(),
        started_at_unix_ms: crate::time::now_unix_ms(),
        network_namespace: process::network_namespace(None),
    };
    let bytes = serde_json::to_vec_pretty(&record).map_err(|error| SidecarError::WriteFile {
        path: spec.files.state.clone(),
        source: io::Error::other(error),
    })?;
    write_atomically(&spec.files.state, &bytes)?;
    if let Some(pid_file) = &spec.files.pid {
        write_atomically(pid_file, format!("{pid}\n").as_bytes())?;
    }
    Ok(())
}

/// The process whose readiness is awaited.
enum Watched<'a> {
    Child(&'a mut Child),
    Adopted,
}

/// Waits until process `pid` answers its probe, failing early when it exits
/// or something else answers in its place.
async fn wait_ready<K: SidecarKind>(
    spec: &Spec<K>,
    mut watched: Watched<'_>,
    pid: Pid,
) -> Result<(), SidecarError> {
    let deadline = Instant::now() + spec.process.start_timeout;
    loop {
        let exited = match &mut watched {
            Watched::Child(child) => child
                .try_wait()
                .map_err(|source| SidecarError::Wait { pid, source })?
                .map(|status| status.to_string()),
            Watched::Adopted => (!is_sidecar_process(pid, Some(&spec.process.binary), &spec.args))
                .then(|| "exit status unknown".to_owned()),
        };
        if let Some(status) = exited {
            return Err(SidecarError::ExitedDuringStart {
                binary: spec.process.binary.clone(),
                status,
                log_tail: log_tail(spec),
            });
        }
        let last_probe = match spec.kind.probe(pid).await {
            Probe::Ready => return Ok(()),
            Probe::Wrong { detail } => {
                return Err(SidecarError::WrongServer {
                    endpoint: spec.kind.endpoint(),
                    found: detail,
                });
            }
            Probe::NotReady { detail } => detail,
        };
        if Instant::now() >= deadline {
            return Err(SidecarError::StartTimeout {
                binary: spec.process.binary.clone(),
                endpoint: spec.kind.endpoint(),
                timeout: spec.process.start_timeout,
                last_probe,
                log_tail: log_tail(spec),
            });
        }
        sleep(READY_POLL_INTERVAL).await;
    }
}

/// The last lines of the process's own logs and of its output, for errors.
fn log_tail<K: SidecarKind>(spec: &Spec<K>) -> String {
    let mut tail = String::new();
    let mut paths = spec.kind.log_files();
    paths.push(spec.files.output.clone());
    for path in paths {
        let Some(text) = read_tail(&path).filter(|text| !text.trim().is_empty()) else {
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
async fn stop_child(
    name: &str,
    child: &mut Child,
    pid: Pid,
    grace: Duration,
) -> Result<(), SidecarError> {
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
    warn!(pid, ?grace, "{name} ignored SIGTERM; sending SIGKILL");
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
async fn stop_process<K: SidecarKind>(spec: &Spec<K>, pid: Pid) -> Result<(), SidecarError> {
    let args = &spec.args;
    let grace = spec.process.stop_grace;
    if !is_sidecar_process(pid, None, args) {
        return Ok(());
    }
    if signal(pid, libc::SIGTERM)? == Delivery::NoSuchProcess || wait_gone(pid, args, grace).await {
        return Ok(());
    }
    warn!(
        pid,
        ?grace,
        "{} ignored SIGTERM; sending SIGKILL",
        spec.name()
    );
    if !is_sidecar_process(pid, None, args)
        || signal(pid, libc::SIGKILL)? == Delivery::NoSuchProcess
        || wait_gone(pid, args, KILL_WAIT).await
    {
        return Ok(());
    }
    Err(SidecarError::StopTimeout {
        pid,
        waited: KILL_WAIT,
    })
}

/// Polls until `pid` no longer is our sidecar; false when `limit` passes first.
async fn wait_gone(pid: Pid, args: &[OsString], limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if !is_sidecar_process(pid, None, args) {
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
async fn terminate<K: SidecarKind>(
    tracked: &mut Tracked,
    spec: &Spec<K>,
) -> Result<(), SidecarError> {
    match tracked {
        Tracked::Child { child, pid, .. } => {
            stop_child(spec.name(), child, *pid, spec.process.stop_grace).await
        }
        Tracked::Adopted { pid, .. } => stop_process(spec, *pid).await,
    }
}

/// Stops `stop` and starts a fresh process.
async fn recreate<K: SidecarKind>(
    spec: &Spec<K>,
    stop: &[Pid],
    reason: DriftReason,
) -> Result<(Tracked, SidecarOrigin), SidecarError> {
    warn!(%reason, pids = ?stop, "recreating {}", spec.name());
    for &pid in stop {
        stop_process(spec, pid).await?;
    }
    Ok((start(spec).await?, SidecarOrigin::Recreated { reason }))
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

/// One sidecar of this machine: the process, how it came to run, and its
/// supervision. Share it behind an `Arc` between [`Self::supervise`] and
/// callers of [`Self::status`] and [`Self::stop`]. Dropping it leaves the
/// process running.
#[derive(Debug)]
pub(crate) struct Sidecar<K> {
    spec: Spec<K>,
    process: Mutex<Option<Tracked>>,
    status: watch::Sender<SidecarStatus>,
    stop_requested: CancellationToken,
}

impl<K: SidecarKind> Sidecar<K> {
    /// Makes the process run as `kind` and `process` describe, adopt-first: a
    /// running process that matches the recorded identity (same binary, same
    /// rendered config, same network namespace) and answers its probe is
    /// adopted untouched; drifted or unrecorded ones are stopped and replaced;
    /// otherwise one is started. The result says which in
    /// [`SidecarStatus::origin`].
    pub(crate) async fn ensure(kind: K, process: ProcessConfig) -> Result<Self, SidecarError> {
        let spec = Spec::new(kind, process)?;
        let observation = observe(&spec)?;
        let own_namespace = process::network_namespace(None);
        let expected = Expected {
            config_hash: &spec.config_hash,
            binary: &spec.process.binary,
            network_namespace: own_namespace.as_deref(),
        };
        let (tracked, origin) = match plan(expected, &observation) {
            Plan::Adopt { pid } => match wait_ready(&spec, Watched::Adopted, pid).await {
                Ok(()) => {
                    info!(pid, endpoint = %spec.kind.endpoint(), "adopted running {}", spec.name());
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
                        "recorded {} is no longer running",
                        spec.name()
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
            client_url: spec.kind.endpoint(),
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
    /// dies. Returning never stops the process: the data plane outlives the
    /// daemon. Run at most one supervision per sidecar.
    pub(crate) async fn supervise(&self, shutdown: CancellationToken) {
        let name = self.spec.name();
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
            warn!(pid = exit.pid, status = %exit.status, ran_for = ?exit.ran_for, "{name} died");
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
                        warn!(error = %chain, "restarting {name} failed");
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
                info!(pid, "restarted {}", self.spec.name());
                RestartOutcome::Restarted
            }
            Err(error) => RestartOutcome::Failed(error),
        }
    }

    /// A snapshot of the sidecar's state.
    pub(crate) fn status(&self) -> SidecarStatus {
        self.status.borrow().clone()
    }

    /// A receiver that sees every status change.
    pub(crate) fn watch_status(&self) -> watch::Receiver<SidecarStatus> {
        self.status.subscribe()
    }

    /// What kind of sidecar this is, with its kind-specific config.
    pub(crate) fn kind(&self) -> &K {
        &self.spec.kind
    }

    /// Stops the process (SIGTERM, the grace period, then SIGKILL) and ends
    /// supervision for good: it will not be restarted by this sidecar.
    pub(crate) async fn stop(&self) -> Result<(), SidecarError> {
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
            if let Some(pid_file) = &self.spec.files.pid
                && let Err(error) = fs::remove_file(pid_file)
                && error.kind() != io::ErrorKind::NotFound
            {
                warn!(path = %pid_file.display(), %error, "cannot remove the pid file of a stopped sidecar");
            }
            info!(pid, "stopped {}", self.spec.name());
        }
        self.status.send_modify(|status| {
            status.state = SidecarState::Stopped;
            status.pid = None;
            status.detail = Some("stopped on request".to_owned());
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::*;

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

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn argv_matches_the_binary_followed_by_exactly_our_args() {
        let args = os(&["-c", "/d/nats.conf"]);
        let binary = Some(Path::new("/bin/nats-server"));
        let direct = os(&["/bin/nats-server", "-c", "/d/nats.conf"]);
        assert!(argv_matches(&direct, binary, &args));
        assert!(argv_matches(&direct, None, &args));
        // A script started through `#!` runs under its interpreter.
        let script = os(&["python3", "/bin/nats-server", "-c", "/d/nats.conf"]);
        assert!(argv_matches(&script, binary, &args));
        for other in [
            os(&["/bin/other", "-c", "/d/nats.conf"]),
            os(&["/bin/nats-server", "-c", "/e/nats.conf"]),
            os(&["/bin/nats-server", "-c", "/d/nats.conf", "--extra"]),
            os(&["-c", "/d/nats.conf"]),
            os(&[]),
        ] {
            assert!(!argv_matches(&other, binary, &args), "{other:?}");
        }
        assert!(!argv_matches(&os(&["-c", "/d/nats.conf"]), None, &args));
    }

    #[test]
    fn identity_hash_covers_config_text_and_binary() {
        let base = identity_hash("a = 1\n", Path::new("/bin/x"));
        assert_eq!(base.len(), 64);
        assert_eq!(base, identity_hash("a = 1\n", Path::new("/bin/x")));
        assert_ne!(base, identity_hash("a = 2\n", Path::new("/bin/x")));
        assert_ne!(base, identity_hash("a = 1\n", Path::new("/bin/y")));
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
    fn restart_delay_doubles_up_to_thirty_seconds() {
        let delays: Vec<u64> = (0..8)
            .map(|failures| restart_delay(failures).as_secs())
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(restart_delay(u32::MAX), RESTART_BACKOFF_MAX);
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
