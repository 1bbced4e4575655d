//! Serving the API on a Unix socket (mode 0600), the pidfile, and the daemon's
//! life from start to graceful shutdown.

use std::{
    io::Write,
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use ployz_api::v1::ployz_server::PloyzServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;

use super::{Daemon, DaemonConfig, StartError, api::ApiService, config::check_socket_path};

/// How long shutdown waits for in-flight requests and background tasks.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Runs the daemon until `shutdown` is cancelled (by a signal or the API).
pub async fn run(config: DaemonConfig, shutdown: CancellationToken) -> Result<(), ServerError> {
    let listener = bind(&config.socket).await?;
    let pidfile = Pidfile::write(config.pidfile())?;
    tracing::info!(socket = %config.socket.display(), pid = std::process::id(), "ployzd listening");

    let daemon = Daemon::start(config.clone(), shutdown.clone()).await?;
    let service = PloyzServer::new(ApiService::new(daemon.clone()));
    let served = tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(listener),
            shutdown.clone().cancelled_owned(),
        )
        .await;

    tracing::info!("shutting down: the data plane keeps serving");
    shutdown.cancel();
    daemon.join(SHUTDOWN_GRACE).await;
    remove_socket(&config.socket);
    drop(pidfile);
    served.map_err(ServerError::Serve)
}

/// Binds the socket, refusing to take over one a live daemon still serves.
async fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    check_socket_path(path).map_err(ServerError::Config)?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| ServerError::Socket {
            path: path.to_owned(),
            source,
        })?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                return Err(ServerError::AlreadyRunning {
                    path: path.to_owned(),
                });
            }
            // A socket nobody answers on is left over from a crashed daemon.
            std::fs::remove_file(path).map_err(|source| ServerError::Socket {
                path: path.to_owned(),
                source,
            })?;
        }
        Ok(_) => {
            return Err(ServerError::NotASocket {
                path: path.to_owned(),
            });
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ServerError::Socket {
                path: path.to_owned(),
                source,
            });
        }
    }
    let listener = UnixListener::bind(path).map_err(|source| ServerError::Socket {
        path: path.to_owned(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        ServerError::Socket {
            path: path.to_owned(),
            source,
        }
    })?;
    Ok(listener)
}

fn remove_socket(path: &Path) {
    if let Err(error) = std::fs::remove_file(path) {
        tracing::warn!(path = %path.display(), %error, "could not remove socket");
    }
}

/// The daemon's pidfile, removed on drop if it still names this process.
struct Pidfile {
    path: PathBuf,
}

impl Pidfile {
    fn write(path: PathBuf) -> Result<Self, ServerError> {
        let write = || -> std::io::Result<()> {
            let temporary = path.with_extension("pid.tmp");
            let mut file = std::fs::File::create(&temporary)?;
            writeln!(file, "{}", std::process::id())?;
            file.sync_all()?;
            std::fs::rename(&temporary, &path)
        };
        write().map_err(|source| ServerError::Pidfile {
            path: path.clone(),
            source,
        })?;
        Ok(Self { path })
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        let ours = std::fs::read_to_string(&self.path)
            .map(|text| text.trim() == std::process::id().to_string())
            .unwrap_or(false);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Why the daemon could not serve.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] super::ConfigError),
    #[error("another ployzd is already serving on {}; stop it with `ployzctl daemon stop`", path.display())]
    AlreadyRunning { path: PathBuf },
    #[error("{} exists and is not a socket; remove it or choose another --socket", path.display())]
    NotASocket { path: PathBuf },
    #[error("cannot bind socket {}", path.display())]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write pidfile {}", path.display())]
    Pidfile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("gRPC server failed")]
    Serve(#[source] tonic::transport::Error),
}

impl ServerError {
    /// Problems the operator caused (bad paths, a daemon already running), as
    /// opposed to failures of the machine.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            ServerError::Config(_)
                | ServerError::AlreadyRunning { .. }
                | ServerError::NotASocket { .. }
        )
    }
}
