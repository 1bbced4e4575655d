//! `ployzctl daemon …`: running ployzd on this machine. The daemon writes its
//! own pidfile beside its socket (`<socket>.pid`); these commands read it.

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use ployz_api::{ApiError, ErrorClass, v1};
use serde::Serialize;

use super::{Context, READ_TIMEOUT};
use crate::{
    cli::{DaemonCommand, DaemonLaunchArgs, InstallArgs, Runtime, ServiceMode},
    client,
    output::duration_ms,
};

/// How long `install` waits for a new daemon to answer.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `stop` waits for the daemon process to exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(100);

pub async fn run(context: &Context<'_>, command: DaemonCommand) -> Result<(), ApiError> {
    match command {
        DaemonCommand::Run(launch) => run_foreground(context, &launch),
        DaemonCommand::Install(install) => self::install(context, &install).await,
        DaemonCommand::Stop { services } => stop(context, services).await,
        DaemonCommand::Status => status(context).await,
    }
}

/// Replaces this process with ployzd in the foreground.
fn run_foreground(context: &Context<'_>, launch: &DaemonLaunchArgs) -> Result<(), ApiError> {
    let binary = find_ployzd(launch.ployzd_bin.as_deref())?;
    let error = Command::new(&binary)
        .args(daemon_args(&context.socket, launch))
        .exec();
    Err(ApiError::new(
        ErrorClass::Internal,
        "exec_failed",
        format!("cannot run {}: {error}", binary.display()),
    ))
}

#[derive(Serialize)]
struct InstallResult {
    /// `started` or `already_running`.
    outcome: &'static str,
    pid: u32,
    version: String,
    socket: PathBuf,
    pidfile: PathBuf,
    log: Option<PathBuf>,
}

async fn install(context: &Context<'_>, install: &InstallArgs) -> Result<(), ApiError> {
    if install.runtime != Runtime::Host || install.service_mode != ServiceMode::User {
        return Err(ApiError::new(
            ErrorClass::PreconditionFailed,
            "unsupported_runtime",
            "this version of Ployz runs only with `--runtime host --service-mode user`",
        ));
    }
    let pidfile = ployz_api::paths::pidfile_for_socket(&context.socket);
    if let Some(status) = probe(&context.socket).await {
        let daemon = status.daemon.unwrap_or_default();
        let result = InstallResult {
            outcome: "already_running",
            pid: daemon.pid,
            version: daemon.version,
            socket: context.socket.clone(),
            pidfile,
            log: None,
        };
        context.output.emit(&result, || {
            format!(
                "ployzd is already running (pid {}) on {}; nothing changed\n",
                result.pid,
                result.socket.display()
            )
        });
        return Ok(());
    }

    let binary = find_ployzd(install.launch.ployzd_bin.as_deref())?;
    let data_dir = install
        .launch
        .data_dir
        .clone()
        .unwrap_or_else(ployz_api::paths::default_data_dir);
    let log = data_dir.join("ployzd.log");
    let log_file = std::fs::create_dir_all(&data_dir)
        .and_then(|()| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
        })
        .map_err(|error| {
            ApiError::new(
                ErrorClass::PreconditionFailed,
                "data_dir_unwritable",
                format!("cannot write the daemon log {}: {error}", log.display()),
            )
        })?;
    let stderr = log_file.try_clone().map_err(|error| {
        ApiError::new(
            ErrorClass::Internal,
            "log_open_failed",
            format!("cannot reopen {}: {error}", log.display()),
        )
    })?;
    let mut launch = install.launch.clone();
    launch.data_dir = Some(data_dir);

    context.output.progress(&format!(
        "starting {} (log: {})",
        binary.display(),
        log.display()
    ));
    let mut command = Command::new(&binary);
    command
        .args(daemon_args(&context.socket, &launch))
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(stderr);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    // A session of its own detaches the daemon from this terminal and its signals.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|error| {
        ApiError::new(
            ErrorClass::Internal,
            "spawn_failed",
            format!("cannot start {}: {error}", binary.display()),
        )
    })?;

    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(exit)) = child.try_wait() {
            let class = if exit.code() == Some(2) {
                ErrorClass::Usage
            } else {
                ErrorClass::Internal
            };
            return Err(ApiError::new(
                class,
                "daemon_exited",
                format!("ployzd exited at start ({exit}): {}", last_error_line(&log)),
            ));
        }
        if let Some(status) = probe(&context.socket).await {
            let daemon = status.daemon.unwrap_or_default();
            let result = InstallResult {
                outcome: "started",
                pid: daemon.pid,
                version: daemon.version,
                socket: context.socket.clone(),
                pidfile,
                log: Some(log),
            };
            context.output.emit(&result, || {
                format!(
                    "ployzd {} started (pid {}) on {}\n",
                    result.version,
                    result.pid,
                    result.socket.display()
                )
            });
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(ApiError::new(
                ErrorClass::Unavailable,
                "daemon_start_timeout",
                format!(
                    "ployzd (pid {}) did not answer on {} within {START_TIMEOUT:?}; see {}",
                    child.id(),
                    context.socket.display(),
                    log.display()
                ),
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

#[derive(Serialize)]
struct StopResult {
    /// `stopped` or `not_running`.
    outcome: &'static str,
    pid: Option<u32>,
    services_stopped: bool,
}

async fn stop(context: &Context<'_>, services: bool) -> Result<(), ApiError> {
    let pid = read_pidfile(&context.socket);
    let asked = match client::connect(&context.socket, READ_TIMEOUT).await {
        Ok(mut client) => client
            .shutdown(v1::ShutdownRequest {
                stop_services: services,
            })
            .await
            .map(|response| Some(response.into_inner().pid))
            .map_err(|e| context.call_error(e))?,
        Err(_) => None,
    };
    let pid = asked.or(pid.filter(|pid| is_ployzd(*pid)));
    let Some(pid) = pid else {
        let result = StopResult {
            outcome: "not_running",
            pid: None,
            services_stopped: false,
        };
        context.output.emit(&result, || {
            "ployzd is not running; nothing to stop\n".to_owned()
        });
        return Ok(());
    };
    if asked.is_none() {
        // The daemon does not answer on its socket: ask the process directly.
        // SAFETY: kill with a pid read from our pidfile and checked to be ployzd.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    while is_alive(pid) {
        if Instant::now() >= deadline {
            return Err(ApiError::new(
                ErrorClass::Unavailable,
                "daemon_stop_timeout",
                format!("ployzd (pid {pid}) is still running after {STOP_TIMEOUT:?}"),
            ));
        }
        tokio::time::sleep(POLL).await;
    }
    let result = StopResult {
        outcome: "stopped",
        pid: Some(pid),
        services_stopped: services && asked.is_some(),
    };
    context.output.emit(&result, || {
        let data_plane = if result.services_stopped {
            "its sidecars were stopped too"
        } else {
            "the data plane keeps serving"
        };
        format!("ployzd (pid {pid}) stopped; {data_plane}\n")
    });
    Ok(())
}

#[derive(Serialize)]
struct DaemonStatusResult {
    running: bool,
    pid: Option<u32>,
    version: Option<String>,
    uptime_ms: Option<u64>,
    socket: PathBuf,
    pidfile: PathBuf,
}

async fn status(context: &Context<'_>) -> Result<(), ApiError> {
    let pidfile = ployz_api::paths::pidfile_for_socket(&context.socket);
    let daemon = probe(&context.socket)
        .await
        .and_then(|status| status.daemon);
    let result = match daemon {
        Some(daemon) => DaemonStatusResult {
            running: true,
            pid: Some(daemon.pid),
            version: Some(daemon.version),
            uptime_ms: Some(daemon.uptime_ms),
            socket: context.socket.clone(),
            pidfile,
        },
        None => DaemonStatusResult {
            running: false,
            pid: read_pidfile(&context.socket).filter(|pid| is_ployzd(*pid)),
            version: None,
            uptime_ms: None,
            socket: context.socket.clone(),
            pidfile,
        },
    };
    context
        .output
        .emit(&result, || match (&result.version, result.pid) {
            (Some(version), Some(pid)) => format!(
                "ployzd {version} running, pid {pid}, up {}, socket {}\n",
                duration_ms(result.uptime_ms.unwrap_or(0)),
                result.socket.display()
            ),
            (None, Some(pid)) => format!(
                "ployzd pid {pid} is alive but does not answer on {}\n",
                result.socket.display()
            ),
            (_, None) => format!(
                "ployzd is not running (socket {})\n",
                result.socket.display()
            ),
        });
    Ok(())
}

/// The daemon's status if it answers on `socket` within a short timeout.
async fn probe(socket: &Path) -> Option<v1::StatusResponse> {
    let mut client = client::connect(socket, Duration::from_secs(2)).await.ok()?;
    client
        .status(v1::StatusRequest {})
        .await
        .ok()
        .map(tonic::Response::into_inner)
}

/// The arguments ployzd gets from `daemon run` and `daemon install`.
fn daemon_args(socket: &Path, launch: &DaemonLaunchArgs) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = vec!["--socket".into(), socket.into()];
    if let Some(config) = &launch.config {
        args.extend(["--config".into(), config.into()]);
    }
    if let Some(data_dir) = &launch.data_dir {
        args.extend(["--data-dir".into(), data_dir.into()]);
    }
    if let Some(port) = launch.nats_port {
        args.extend(["--nats-port".into(), port.to_string().into()]);
    }
    if let Some(binary) = &launch.nats_bin {
        args.extend(["--nats-bin".into(), binary.into()]);
    }
    if let Some(backend) = &launch.storage_backend {
        args.extend(["--storage-backend".into(), backend.into()]);
    }
    if let Some(path) = &launch.storage_path {
        args.extend(["--storage-path".into(), path.into()]);
    }
    if let Some(size) = &launch.storage_loop_size {
        args.extend(["--storage-loop-size".into(), size.into()]);
    }
    if let Some(ttl) = &launch.operation_lease_ttl {
        args.extend(["--operation-lease-ttl".into(), ttl.into()]);
    }
    for (flag, value) in [
        ("--gateway-http", &launch.gateway_http),
        ("--gateway-https", &launch.gateway_https),
        ("--dns-listen", &launch.dns_listen),
    ] {
        if let Some(value) = value {
            args.extend([flag.into(), value.into()]);
        }
    }
    args
}

/// The ployzd binary: the one given, else beside this ployzctl, else on PATH.
fn find_ployzd(given: Option<&Path>) -> Result<PathBuf, ApiError> {
    if let Some(path) = given {
        return if path.is_file() {
            Ok(path.to_owned())
        } else {
            Err(ApiError::new(
                ErrorClass::PreconditionFailed,
                "ployzd_not_found",
                format!("ployzd binary {} does not exist", path.display()),
            ))
        };
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("ployzd")))
        .filter(|path| path.is_file());
    let on_path = || {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("ployzd"))
                .find(|path| path.is_file())
        })
    };
    beside.or_else(on_path).ok_or_else(|| {
        ApiError::new(
            ErrorClass::PreconditionFailed,
            "ployzd_not_found",
            "cannot find the ployzd binary beside ployzctl or on PATH; pass --ployzd-bin",
        )
    })
}

fn read_pidfile(socket: &Path) -> Option<u32> {
    std::fs::read_to_string(ployz_api::paths::pidfile_for_socket(socket))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn is_alive(pid: u32) -> bool {
    // A zombie still answers kill(0); it is gone for our purposes.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// True when `pid` is alive and runs a binary named ployzd (not a reused pid).
fn is_ployzd(pid: u32) -> bool {
    is_alive(pid)
        && std::fs::read(format!("/proc/{pid}/cmdline"))
            .ok()
            .and_then(|cmdline| {
                let argv0 = cmdline.split(|b| *b == 0).next()?.to_vec();
                Some(String::from_utf8_lossy(&argv0).ends_with("ployzd"))
            })
            .unwrap_or(false)
}

/// The last line of the daemon's log that says something, for a start failure.
fn last_error_line(log: &Path) -> String {
    std::fs::read_to_string(log)
        .ok()
        .and_then(|text| {
            text.lines()
                .rev()
                .find(|line| !line.trim().is_empty())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| format!("see {}", log.display()))
}
