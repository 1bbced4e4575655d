//! The admin socket of a routing process: a unix socket that answers every
//! connection with one JSON [`AdminStatus`] and closes. ployzd uses it as the
//! readiness probe and identity check (the pid) of the sidecar, and
//! `ployzctl routes ls` shows what the processes themselves say they serve.

use std::{
    io,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{UnixListener, UnixStream},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::{Origin, RoutingTable, source::FollowerStatus};

/// Bound on a status document.
const MAX_STATUS_BYTES: u64 = 4 * 1024 * 1024;
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// What a routing process says about itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdminStatus {
    /// `gateway` or `dns`.
    pub component: String,
    pub pid: u32,
    /// Listeners are bound and a table (possibly empty) is being served.
    pub ready: bool,
    pub started_at_unix_ms: u64,
    /// Where the served table came from.
    pub origin: Origin,
    /// When the served table was taken in.
    pub loaded_at_unix_ms: u64,
    pub follower: FollowerStatus,
    /// The addresses the process listens on.
    pub listeners: Vec<String>,
    pub namespaces: Vec<NamespaceStatus>,
    /// Counters of the component.
    pub stats: serde_json::Value,
}

/// One namespace as served.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceStatus {
    pub namespace: String,
    pub seq: u64,
    pub committed_at_unix_ms: u64,
    pub routes: Vec<RouteStatus>,
}

/// One served entry: an HTTP route, a TCP route or a DNS name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteStatus {
    /// `http`, `https`, `tcp` or `dns`.
    pub kind: String,
    pub service: String,
    /// Host names and path prefixes, the TCP port, or the DNS name.
    pub matches: Vec<String>,
    /// Where traffic goes (`ip:port`), or the addresses a name resolves to.
    pub targets: Vec<String>,
}

/// The gateway's view of a table: its HTTP and TCP routes.
pub fn gateway_namespaces(table: &RoutingTable) -> Vec<NamespaceStatus> {
    namespaces(table, |_, table| {
        let http = table.http.iter().map(|route| RouteStatus {
            kind: if route.tls.is_some() { "https" } else { "http" }.to_owned(),
            service: route.service.clone(),
            matches: route
                .hosts
                .iter()
                .flat_map(|host| route.paths.iter().map(move |path| format!("{host}{path}")))
                .collect(),
            targets: route.upstreams.iter().map(ToString::to_string).collect(),
        });
        let tcp = table.tcp.iter().map(|route| RouteStatus {
            kind: "tcp".to_owned(),
            service: route.service.clone(),
            matches: vec![format!(":{}", route.listen_port)],
            targets: route.upstreams.iter().map(ToString::to_string).collect(),
        });
        http.chain(tcp).collect()
    })
}

/// DNS's view of a table: one name per service.
pub fn dns_namespaces(table: &RoutingTable) -> Vec<NamespaceStatus> {
    namespaces(table, |namespace, entry| {
        entry
            .services
            .iter()
            .map(|(service, endpoints)| RouteStatus {
                kind: "dns".to_owned(),
                service: service.clone(),
                matches: vec![format!("{service}.{namespace}.{}", crate::ZONE)],
                targets: endpoints
                    .instances
                    .iter()
                    .flat_map(|instance| instance.addresses.iter().map(ToString::to_string))
                    .collect(),
            })
            .collect()
    })
}

fn namespaces(
    table: &RoutingTable,
    routes: impl Fn(&str, &crate::NamespaceTable) -> Vec<RouteStatus>,
) -> Vec<NamespaceStatus> {
    table
        .namespaces
        .iter()
        .map(|(namespace, entry)| NamespaceStatus {
            namespace: namespace.clone(),
            seq: entry.seq,
            committed_at_unix_ms: entry.committed_at_unix_ms,
            routes: routes(namespace, entry),
        })
        .collect()
}

/// Why the admin socket could not be bound or asked.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot bind the admin socket `{path}`")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot reach the admin socket `{path}`")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the admin socket `{path}` did not answer within {timeout:?}")]
    Timeout { path: PathBuf, timeout: Duration },
    #[error("the admin socket `{path}` answered something that is not a status")]
    Decode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Binds the admin socket, replacing a stale socket file; only the owner
/// (root, like ployzd) may connect.
pub fn bind(path: &Path) -> Result<UnixListener, AdminError> {
    let bind = || -> io::Result<UnixListener> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(listener)
    };
    bind().map_err(|source| AdminError::Bind {
        path: path.to_owned(),
        source,
    })
}

/// Answers every connection with `status()` until `shutdown`.
pub async fn serve<F>(listener: UnixListener, status: Arc<F>, shutdown: CancellationToken)
where
    F: Fn() -> AdminStatus + Send + Sync + 'static,
{
    let mut answers = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((mut stream, _)) => {
                    let mut document = serde_json::to_vec(&status()).unwrap_or_default();
                    document.push(b'\n');
                    answers.spawn(async move {
                        let written = tokio::time::timeout(WRITE_TIMEOUT, async {
                            stream.write_all(&document).await?;
                            stream.shutdown().await
                        })
                        .await;
                        if !matches!(written, Ok(Ok(()))) {
                            debug!("an admin client left before reading its status");
                        }
                    });
                }
                Err(error) => {
                    debug!(%error, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = answers.join_next(), if !answers.is_empty() => {}
            () = shutdown.cancelled() => break,
        }
    }
    answers.shutdown().await;
}

/// Asks a routing process for its status.
pub async fn query(path: &Path, timeout: Duration) -> Result<AdminStatus, AdminError> {
    let ask = async {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| AdminError::Connect {
                path: path.to_owned(),
                source,
            })?;
        let mut bytes = Vec::new();
        stream
            .take(MAX_STATUS_BYTES)
            .read_to_end(&mut bytes)
            .await
            .map_err(|source| AdminError::Connect {
                path: path.to_owned(),
                source,
            })?;
        serde_json::from_slice(&bytes).map_err(|source| AdminError::Decode {
            path: path.to_owned(),
            source,
        })
    };
    tokio::time::timeout(timeout, ask)
        .await
        .map_err(|_| AdminError::Timeout {
            path: path.to_owned(),
            timeout,
        })?
}
