//! services: long-lived sidecar processes of the data plane (nats-server, the
//! gateway, DNS and the WireGuard tunnel) and their adopt-first lifecycle: inspect what already
//! runs, compare its identity with the full expected specification, adopt a
//! match untouched, recreate what is missing or drifted, and report which it was.
//! Sidecars run in their own sessions so they outlive ployzd. This module owns
//! processes, their config files and state files; it must not depend on the
//! daemon, the store or any client library of the services it runs.

pub mod nats;
mod process;
pub mod routing;
mod sidecar;
pub mod tunnel;

use std::{fmt, io, net::SocketAddr, path::PathBuf, time::Duration};

use serde::Serialize;

pub(crate) use crate::error_chain;

/// Whether the supervised process is serving.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SidecarState {
    /// The process runs and answered its readiness probe.
    Running,
    /// Stopped on request; supervision will not restart it.
    Stopped,
    /// The process died or could not be started; supervision is retrying.
    Failed,
}

impl SidecarState {
    /// The stable name shown by `status`.
    pub fn as_str(self) -> &'static str {
        match self {
            SidecarState::Running => "running",
            SidecarState::Stopped => "stopped",
            SidecarState::Failed => "failed",
        }
    }
}

/// How the running process came to be the one this daemon supervises.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum SidecarOrigin {
    /// Nothing of ours was running; this daemon started it.
    Started,
    /// A matching process was already running and was kept untouched.
    Adopted,
    /// Something of ours was running but had drifted; it was replaced.
    Recreated {
        /// Why the running process did not match.
        reason: DriftReason,
    },
}

impl SidecarOrigin {
    /// The stable name shown by `status`: `started`, `adopted` or `recreated`.
    pub fn kind(&self) -> &'static str {
        match self {
            SidecarOrigin::Started => "started",
            SidecarOrigin::Adopted => "adopted",
            SidecarOrigin::Recreated { .. } => "recreated",
        }
    }
}

/// Why a running sidecar was not adopted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum DriftReason {
    /// The process runs a different binary than the one configured now.
    BinaryChanged {
        recorded: PathBuf,
        expected: PathBuf,
    },
    /// The config rendered now differs from the one the process was started with.
    ConfigChanged { recorded: String, expected: String },
    /// The process lives in another network namespace than this daemon.
    NetworkNamespaceChanged { found: String, expected: String },
    /// Processes run with our config file but are not the one the state file records.
    Unrecorded { pids: Vec<u32> },
    /// The recorded process is alive but did not answer on its port.
    Unresponsive { pid: u32, detail: String },
}

impl fmt::Display for DriftReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DriftReason::BinaryChanged { recorded, expected } => write!(
                f,
                "binary changed from `{}` to `{}`",
                recorded.display(),
                expected.display()
            ),
            DriftReason::ConfigChanged { recorded, expected } => write!(
                f,
                "config changed (recorded {}, expected {})",
                short_hash(recorded),
                short_hash(expected)
            ),
            DriftReason::NetworkNamespaceChanged { found, expected } => {
                write!(f, "runs in network namespace {found}, expected {expected}")
            }
            DriftReason::Unrecorded { pids } => {
                write!(
                    f,
                    "processes {pids:?} use this config but are not recorded in the state file"
                )
            }
            DriftReason::Unresponsive { pid, detail } => {
                write!(f, "pid {pid} is alive but unresponsive: {detail}")
            }
        }
    }
}

fn short_hash(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// A cheap snapshot of one sidecar, for `ployzctl status` and logs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SidecarStatus {
    pub state: SidecarState,
    /// The pid of the supervised process while there is one.
    pub pid: Option<u32>,
    pub origin: SidecarOrigin,
    /// Hex sha256 identity of the expected specification (rendered config and binary).
    pub config_hash: String,
    /// Where clients connect, e.g. `nats://127.0.0.1:4222`, or for the routing
    /// processes their admin socket, e.g. `unix:///var/lib/ployz/gateway/admin.sock`.
    pub client_url: String,
    /// How many times supervision restarted the process after it died.
    pub restarts: u32,
    /// The latest noteworthy event in a sentence: why it failed, when it restarts.
    pub detail: Option<String>,
}

/// Failures of sidecar lifecycle operations.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("{name} not found {places}; {hint}")]
    BinaryNotFound {
        name: &'static str,
        /// Where it was looked for, in words, e.g. `next to the ployzd executable or on PATH`.
        places: &'static str,
        hint: &'static str,
        /// Every path that was tried, in order.
        searched: Vec<PathBuf>,
    },
    #[error("configured binary `{}` cannot be used", .path.display())]
    ConfiguredBinaryMissing {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("configured binary `{}` is not an executable file", .path.display())]
    BinaryNotExecutable { path: PathBuf },
    #[error("invalid sidecar config: `{field}` {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    #[error("cannot create directory `{}`", .path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write `{}`", .path.display())]
    WriteFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read `{}`", .path.display())]
    ReadFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{addr} is already in use by another process; stop it or configure another address for the sidecar"
    )]
    PortInUse { addr: SocketAddr },
    #[error("cannot bind {addr} to check that it is free")]
    PortCheck {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot start `{}`", .binary.display())]
    Spawn {
        binary: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("`{}` exited during startup ({status}); log tail:\n{log_tail}", .binary.display())]
    ExitedDuringStart {
        binary: PathBuf,
        status: String,
        log_tail: String,
    },
    #[error(
        "`{}` did not answer on {endpoint} within {timeout:?} (last probe: {last_probe}); log tail:\n{log_tail}",
        .binary.display()
    )]
    StartTimeout {
        binary: PathBuf,
        /// Where it was probed, e.g. `nats://127.0.0.1:4222`.
        endpoint: String,
        timeout: Duration,
        last_probe: String,
        log_tail: String,
    },
    #[error("{endpoint} is answered by another server: {found}")]
    WrongServer {
        /// Where it was probed, e.g. `nats://127.0.0.1:4222`.
        endpoint: String,
        /// What answered instead, in words.
        found: String,
    },
    #[error("cannot send {signal} to pid {pid}")]
    Signal {
        pid: u32,
        signal: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot wait for pid {pid}")]
    Wait {
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("pid {pid} is still running {waited:?} after SIGKILL")]
    StopTimeout { pid: u32, waited: Duration },
}

impl SidecarError {
    /// True when the operator must change something (install the binary, free
    /// the port, fix the config) before a retry can succeed.
    pub fn is_precondition(&self) -> bool {
        matches!(
            self,
            SidecarError::BinaryNotFound { .. }
                | SidecarError::ConfiguredBinaryMissing { .. }
                | SidecarError::BinaryNotExecutable { .. }
                | SidecarError::InvalidConfig { .. }
                | SidecarError::PortInUse { .. }
                | SidecarError::WrongServer { .. }
        )
    }

    /// A stable identifier of the failure, for API responses and `--json` output.
    pub fn code(&self) -> &'static str {
        match self {
            SidecarError::BinaryNotFound { .. } => "sidecar.binary_not_found",
            SidecarError::ConfiguredBinaryMissing { .. } => "sidecar.configured_binary_missing",
            SidecarError::BinaryNotExecutable { .. } => "sidecar.binary_not_executable",
            SidecarError::InvalidConfig { .. } => "sidecar.invalid_config",
            SidecarError::CreateDir { .. }
            | SidecarError::WriteFile { .. }
            | SidecarError::ReadFile { .. } => "sidecar.filesystem",
            SidecarError::PortInUse { .. } => "sidecar.port_in_use",
            SidecarError::PortCheck { .. } => "sidecar.port_check",
            SidecarError::Spawn { .. } => "sidecar.spawn",
            SidecarError::ExitedDuringStart { .. } => "sidecar.exited_during_start",
            SidecarError::StartTimeout { .. } => "sidecar.start_timeout",
            SidecarError::WrongServer { .. } => "sidecar.wrong_server",
            SidecarError::Signal { .. }
            | SidecarError::Wait { .. }
            | SidecarError::StopTimeout { .. } => "sidecar.stop_failed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drift_reasons_read_as_sentences() {
        let reason = DriftReason::ConfigChanged {
            recorded: "0123456789abcdef".into(),
            expected: "fedcba9876543210".into(),
        };
        assert_eq!(
            reason.to_string(),
            "config changed (recorded 0123456789ab, expected fedcba987654)"
        );
    }

    #[test]
    fn error_chain_includes_sources() {
        let error = SidecarError::Spawn {
            binary: PathBuf::from("/bin/nats-server"),
            source: io::Error::new(io::ErrorKind::NotFound, "gone"),
        };
        assert_eq!(error_chain(&error), "cannot start `/bin/nats-server`: gone");
        assert_eq!(error.code(), "sidecar.spawn");
    }
}
