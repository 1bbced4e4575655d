//! services::tunnel: the `ployz-tunnel` sidecar (userspace WireGuard) on top of
//! the shared lifecycle in `services::sidecar`. The TUN device lives and dies
//! with the tunnel process, so the process runs in its own session and
//! outlives ployzd; ployzd adopts it when its identity (binary, interface,
//! UAPI directory) matches, and configures keys, addresses and peers through
//! the UAPI socket afterwards (`mesh::overlay`). The probe asks the socket's
//! peer credentials for the serving pid, so another tunnel answering on the
//! same socket is never mistaken for ours.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{
    SidecarError, SidecarStatus,
    process::Pid,
    sidecar::{
        FileNames, Probe, ProcessConfig, Sidecar, SidecarKind, absolute, check_configured_binary,
        create_dir, first_executable, path_candidates,
    },
};
use crate::mesh::wg;

const BINARY_NAME: &str = "ployz-tunnel";
const BINARY_ENV: &str = "PLOYZ_TUNNEL_BIN";
const BINARY_PLACES: &str = "next to the ployzd executable or on PATH";
const BINARY_HINT: &str =
    "build it with `cargo build -p ployzd --bin ployz-tunnel` or set `PLOYZ_TUNNEL_BIN`";
/// Linux limits interface names to 15 bytes.
const MAX_INTERFACE_NAME: usize = 15;

const FILE_NAMES: FileNames = FileNames {
    config: "tunnel.conf",
    state: "tunnel-sidecar.json",
    output: "tunnel.log",
    pid: Some("tunnel.pid"),
};

/// What the tunnel sidecar should look like; every field but the timeouts is
/// its identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunnelSidecarConfig {
    pub binary: PathBuf,
    /// Directory the sidecar owns, e.g. `<data_dir>/mesh`.
    pub dir: PathBuf,
    /// The TUN interface, e.g. `ployz0`.
    pub interface: String,
    /// Where the UAPI socket `<interface>.sock` lives (`wg` looks in
    /// `/var/run/wireguard`).
    pub uapi_dir: PathBuf,
    pub start_timeout: Duration,
    pub stop_grace: Duration,
}

impl TunnelSidecarConfig {
    /// A config with the defaults: 10 s to start, 5 s to stop.
    pub fn new(binary: PathBuf, dir: PathBuf, interface: String, uapi_dir: PathBuf) -> Self {
        Self {
            binary,
            dir,
            interface,
            uapi_dir,
            start_timeout: Duration::from_secs(10),
            stop_grace: Duration::from_secs(5),
        }
    }

    /// The UAPI socket the tunnel serves.
    pub fn uapi_socket(&self) -> PathBuf {
        wg::socket_path(&self.uapi_dir, &self.interface)
    }
}

/// Finds `ployz-tunnel`: `configured`, else `$PLOYZ_TUNNEL_BIN`, else next to
/// the current executable or one directory up (test binaries run from
/// `target/<profile>/deps`), else on `PATH`.
pub fn find_tunnel_binary(configured: Option<&Path>) -> Result<PathBuf, SidecarError> {
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
        if let Some(parent) = exe_dir.parent() {
            candidates.push(parent.join(BINARY_NAME));
        }
    }
    candidates.extend(path_candidates(env::var_os("PATH").as_ref(), BINARY_NAME));
    first_executable(&candidates).ok_or(SidecarError::BinaryNotFound {
        name: BINARY_NAME,
        places: BINARY_PLACES,
        hint: BINARY_HINT,
        searched: candidates,
    })
}

#[derive(Debug)]
struct TunnelKind {
    config: TunnelSidecarConfig,
    rendered: String,
}

impl TunnelKind {
    fn new(mut config: TunnelSidecarConfig) -> Result<Self, SidecarError> {
        config.dir = absolute("dir", &config.dir)?;
        config.binary = absolute("binary", &config.binary)?;
        config.uapi_dir = absolute("uapi_dir", &config.uapi_dir)?;
        if config.interface.is_empty()
            || config.interface.len() > MAX_INTERFACE_NAME
            || !config
                .interface
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_')
        {
            return Err(SidecarError::InvalidConfig {
                field: "interface",
                reason: format!(
                    "`{}` must be 1 to {MAX_INTERFACE_NAME} letters, digits, `-` or `_`",
                    config.interface
                ),
            });
        }
        let rendered = format!(
            "# Rendered by ployzd (services::tunnel); ployz-tunnel takes these as flags.\n\
             interface = {:?}\n\
             uapi_dir = {:?}\n",
            config.interface,
            config.uapi_dir.display().to_string(),
        );
        Ok(Self { config, rendered })
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

impl SidecarKind for TunnelKind {
    fn name(&self) -> &'static str {
        BINARY_NAME
    }

    fn file_names(&self) -> FileNames {
        FILE_NAMES
    }

    fn rendered_config(&self) -> &str {
        &self.rendered
    }

    fn args(&self, _config_file: &Path) -> Vec<OsString> {
        vec![
            "--interface".into(),
            self.config.interface.clone().into(),
            "--uapi-dir".into(),
            self.config.uapi_dir.clone().into(),
        ]
    }

    async fn probe(&self, pid: Pid) -> Probe {
        let socket = self.config.uapi_socket();
        match wg::server_pid(&socket).await {
            Ok(serving) if serving == pid => match wg::get(&socket).await {
                Ok(_) => Probe::Ready,
                Err(error) => Probe::NotReady {
                    detail: crate::error_chain(&error),
                },
            },
            Ok(serving) => Probe::Wrong {
                detail: format!("{} is served by pid {serving}", socket.display()),
            },
            Err(error) => Probe::NotReady {
                detail: crate::error_chain(&error),
            },
        }
    }

    fn endpoint(&self) -> String {
        format!("unix://{}", self.config.uapi_socket().display())
    }

    fn prepare_start(&self) -> Result<(), SidecarError> {
        create_dir(&self.config.uapi_dir)
    }
}

/// The running `ployz-tunnel`, adopted or started.
#[derive(Debug)]
pub struct TunnelSidecar {
    sidecar: Sidecar<TunnelKind>,
}

impl TunnelSidecar {
    /// Makes the tunnel run as `config` describes, adopt-first: a running
    /// tunnel with the recorded identity whose UAPI socket is served by its pid
    /// is adopted untouched (its TUN device, keys and sessions stay up).
    pub async fn ensure(config: TunnelSidecarConfig) -> Result<Self, SidecarError> {
        let kind = TunnelKind::new(config)?;
        let process = kind.process_config();
        Ok(Self {
            sidecar: Sidecar::ensure(kind, process).await?,
        })
    }

    /// Restarts the tunnel with back-off if it dies, until `shutdown`.
    pub async fn supervise(&self, shutdown: CancellationToken) {
        self.sidecar.supervise(shutdown).await;
    }

    pub fn status(&self) -> SidecarStatus {
        self.sidecar.status()
    }

    pub fn watch_status(&self) -> watch::Receiver<SidecarStatus> {
        self.sidecar.watch_status()
    }

    pub fn config(&self) -> &TunnelSidecarConfig {
        &self.sidecar.kind().config
    }

    /// Stops the tunnel: the overlay goes down with it.
    pub async fn stop(&self) -> Result<(), SidecarError> {
        self.sidecar.stop().await
    }
}
