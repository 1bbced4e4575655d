//! Daemon configuration: defaults, then a TOML file, then environment, then
//! flags — each later source overrides the earlier ones. Every problem is one
//! typed, one-line error naming the file, key and line.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

/// Command-line flags (each also readable from its `PLOYZ_*` environment variable).
#[derive(Debug, Default, Clone, clap::Args)]
pub struct DaemonArgs {
    /// Configuration file (TOML). Default: /etc/ployz/ployzd.toml for root,
    /// $XDG_CONFIG_HOME/ployz/ployzd.toml otherwise; read only if it exists.
    #[arg(long, env = "PLOYZ_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Where the daemon keeps its identity and its sidecars' data.
    #[arg(long, env = "PLOYZ_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The gRPC Unix socket ployzctl talks to.
    #[arg(long, env = "PLOYZ_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// The nats-server binary (default: found beside ployzd, in the project's
    /// .tools folder, or on PATH).
    #[arg(long, env = "PLOYZ_NATS_BIN", value_name = "PATH")]
    pub nats_bin: Option<PathBuf>,
    /// The NATS client port, on loopback.
    #[arg(long, env = "PLOYZ_NATS_PORT", value_name = "PORT")]
    pub nats_port: Option<u16>,
    /// The NATS HTTP monitoring port, on loopback (off by default).
    #[arg(long, env = "PLOYZ_NATS_MONITOR_PORT", value_name = "PORT")]
    pub nats_monitor_port: Option<u16>,
    /// The NATS cluster (route) port, on this machine's overlay address.
    #[arg(long, env = "PLOYZ_NATS_CLUSTER_PORT", value_name = "PORT")]
    pub nats_cluster_port: Option<u16>,
    /// The port core machines' NATS accepts other machines' leaf servers
    /// on, on this machine's overlay address.
    #[arg(long, env = "PLOYZ_NATS_LEAF_PORT", value_name = "PORT")]
    pub nats_leaf_port: Option<u16>,
    /// The overlay's TUN interface.
    #[arg(long, env = "PLOYZ_MESH_INTERFACE", value_name = "NAME")]
    pub mesh_interface: Option<String>,
    /// The overlay's WireGuard UDP port on the underlay.
    #[arg(long, env = "PLOYZ_MESH_PORT", value_name = "PORT")]
    pub mesh_port: Option<u16>,
    /// Where the tunnel's WireGuard UAPI socket lives (`wg` looks in
    /// /var/run/wireguard).
    #[arg(long, env = "PLOYZ_MESH_UAPI_DIR", value_name = "DIR")]
    pub mesh_uapi_dir: Option<PathBuf>,
    /// The port other machines' ployzd reach this one on, on the overlay address.
    #[arg(long, env = "PLOYZ_MESH_API_PORT", value_name = "PORT")]
    pub mesh_api_port: Option<u16>,
    /// The Docker network workload containers join, addressed from this
    /// machine's overlay subnet; `none` keeps Docker's default bridge
    /// (containers then reachable from this machine only).
    #[arg(long, env = "PLOYZ_MESH_CONTAINER_NETWORK", value_name = "NAME")]
    pub mesh_container_network: Option<String>,
    /// Log filter, e.g. `info` or `ployzd=debug,info`.
    #[arg(long, env = "PLOYZ_LOG", value_name = "FILTER")]
    pub log: Option<String>,
    /// Volume backend: `btrfs`, `zfs` or `dir` (no snapshots).
    #[arg(long, env = "PLOYZ_STORAGE_BACKEND", value_name = "BACKEND")]
    pub storage_backend: Option<String>,
    /// The btrfs pool directory, the ZFS parent dataset, or the dir backend's root.
    #[arg(long, env = "PLOYZ_STORAGE_PATH", value_name = "PATH")]
    pub storage_path: Option<PathBuf>,
    /// For btrfs: when the pool path is not on btrfs, create a loop-file pool of
    /// this size (e.g. `2GiB`) under the data dir and mount it there. For dev and tests.
    #[arg(long, env = "PLOYZ_STORAGE_LOOP_SIZE", value_name = "SIZE")]
    pub storage_loop_size: Option<String>,
    /// How long a crashed operation keeps its lease (and its namespace locked), e.g. `30s`.
    #[arg(long, env = "PLOYZ_OPERATION_LEASE_TTL", value_name = "DURATION")]
    pub operation_lease_ttl: Option<String>,
    /// The Docker engine's socket.
    #[arg(long, env = "PLOYZ_DOCKER_SOCKET", value_name = "PATH")]
    pub docker_socket: Option<PathBuf>,
    /// The gateway's plain HTTP listeners, comma-separated (`none` for none).
    #[arg(long, env = "PLOYZ_GATEWAY_HTTP", value_name = "ADDR,...")]
    pub gateway_http: Option<String>,
    /// The gateway's HTTPS listeners, comma-separated (`none` for none).
    #[arg(long, env = "PLOYZ_GATEWAY_HTTPS", value_name = "ADDR,...")]
    pub gateway_https: Option<String>,
    /// The DNS listeners (UDP and TCP), comma-separated. Workload containers
    /// use the first address that is not loopback.
    #[arg(long, env = "PLOYZ_DNS_LISTEN", value_name = "ADDR,...")]
    pub dns_listen: Option<String>,
}

/// The configuration file's shape. Unknown keys are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    socket: Option<PathBuf>,
    log: Option<String>,
    #[serde(default)]
    nats: FileNatsConfig,
    #[serde(default)]
    storage: FileStorageConfig,
    #[serde(default)]
    operations: FileOperationsConfig,
    docker_socket: Option<PathBuf>,
    #[serde(default)]
    gateway: FileGatewayConfig,
    #[serde(default)]
    dns: FileDnsConfig,
    #[serde(default)]
    mesh: FileMeshConfig,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMeshConfig {
    interface: Option<String>,
    listen_port: Option<u16>,
    uapi_dir: Option<PathBuf>,
    tunnel_binary: Option<PathBuf>,
    api_port: Option<u16>,
    container_network: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileGatewayConfig {
    binary: Option<PathBuf>,
    http_listen: Option<Vec<SocketAddr>>,
    https_listen: Option<Vec<SocketAddr>>,
    tcp_listen_ip: Option<IpAddr>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDnsConfig {
    binary: Option<PathBuf>,
    listen: Option<Vec<SocketAddr>>,
    upstreams: Option<Vec<SocketAddr>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileStorageConfig {
    backend: Option<String>,
    path: Option<PathBuf>,
    loop_size: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileOperationsConfig {
    lease_ttl: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileNatsConfig {
    binary: Option<PathBuf>,
    port: Option<u16>,
    monitor_port: Option<u16>,
    cluster_port: Option<u16>,
    leaf_port: Option<u16>,
}

/// The resolved configuration the daemon runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonConfig {
    pub data_dir: PathBuf,
    pub socket: PathBuf,
    pub log: String,
    pub nats: NatsConfig,
    pub storage: StorageConfig,
    /// How long a crashed operation's lease (and its namespace lock) lasts.
    pub operation_lease_ttl: Duration,
    pub docker_socket: PathBuf,
    pub gateway: GatewayConfig,
    pub dns: DnsConfig,
    pub mesh: MeshConfig,
}

/// How the daemon runs the overlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshConfig {
    /// The TUN interface `ployz-tunnel` creates.
    pub interface: String,
    /// WireGuard's UDP port on the underlay.
    pub listen_port: u16,
    /// Where the UAPI socket `<interface>.sock` lives.
    pub uapi_dir: PathBuf,
    /// Explicit `ployz-tunnel` binary; `None` means beside ployzd, then PATH.
    pub tunnel_binary: Option<PathBuf>,
    /// The peer API's port on the overlay address; the same on every machine
    /// of a network (a deploy reaches its peers there).
    pub api_port: u16,
    /// The Docker network containers join, addressed from the machine's
    /// subnet; `None`: Docker's default bridge, reachable from this machine only.
    pub container_network: Option<String>,
}

/// The peer API's port unless configured otherwise.
pub const DEFAULT_MESH_API_PORT: u16 = 4724;
/// The container network unless configured otherwise.
pub const DEFAULT_CONTAINER_NETWORK: &str = "ployz";

/// The overlay interface unless configured otherwise.
pub const DEFAULT_MESH_INTERFACE: &str = "ployz0";

/// How the daemon runs the gateway sidecar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayConfig {
    /// Explicit binary; `None` means beside ployzd, then PATH.
    pub binary: Option<PathBuf>,
    pub http_listen: Vec<SocketAddr>,
    pub https_listen: Vec<SocketAddr>,
    /// Where TCP routes listen, at each route's port.
    pub tcp_listen_ip: IpAddr,
}

/// How the daemon runs the DNS sidecar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    pub binary: Option<PathBuf>,
    /// `None`: loopback port 53 plus the Docker bridge's gateway address, port
    /// 53, so that containers reach it.
    pub listen: Option<Vec<SocketAddr>>,
    /// Empty: the host's resolvers from /etc/resolv.conf.
    pub upstreams: Vec<SocketAddr>,
}

/// Where volumes live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageConfig {
    pub backend: StorageBackend,
    /// btrfs pool directory, ZFS parent dataset, or dir root.
    pub path: PathBuf,
    /// btrfs only: size of a loop-file pool to create when `path` is not on btrfs.
    pub loop_size: Option<u64>,
}

/// The volume backends a machine can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageBackend {
    Btrfs,
    Zfs,
    /// Plain directories: no snapshots, clones or transfers.
    Dir,
}

/// How the daemon runs its NATS sidecar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsConfig {
    /// Explicit binary; `None` means search the default places.
    pub binary: Option<PathBuf>,
    pub host: IpAddr,
    pub port: u16,
    pub monitor_port: Option<u16>,
    /// The route port other machines' servers connect to, on this machine's
    /// overlay address only.
    pub cluster_port: u16,
    /// The port a core machine's server accepts leaf servers on (the
    /// machines beyond the first three), on its overlay address only.
    pub leaf_port: u16,
}

/// The default NATS client port. Not 4222, so a Ployz machine can also run an
/// unrelated NATS on the standard port.
pub const DEFAULT_NATS_PORT: u16 = 4722;
/// The default NATS cluster (route) port.
pub const DEFAULT_NATS_CLUSTER_PORT: u16 = 4723;
/// The default port core machines accept leaf servers on.
pub const DEFAULT_NATS_LEAF_PORT: u16 = 4725;

/// How long a crashed operation blocks a retry by default.
pub const DEFAULT_OPERATION_LEASE_TTL: Duration = Duration::from_secs(30);

/// Unix socket paths are limited to 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

impl DaemonConfig {
    /// Resolves defaults, the configuration file, environment and flags.
    pub fn resolve(args: &DaemonArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => {
                let path = default_config_path();
                if path.exists() {
                    read_file(&path)?
                } else {
                    FileConfig::default()
                }
            }
        };
        let mut config = DaemonConfig {
            data_dir: args
                .data_dir
                .clone()
                .or(file.data_dir)
                .unwrap_or_else(ployz_api::paths::default_data_dir),
            socket: args
                .socket
                .clone()
                .or(file.socket)
                .unwrap_or_else(ployz_api::paths::default_socket),
            log: args
                .log
                .clone()
                .or(file.log)
                .unwrap_or_else(|| "info".to_owned()),
            nats: NatsConfig {
                binary: args.nats_bin.clone().or(file.nats.binary),
                host: IpAddr::V4(Ipv4Addr::LOCALHOST),
                port: args
                    .nats_port
                    .or(file.nats.port)
                    .unwrap_or(DEFAULT_NATS_PORT),
                monitor_port: args.nats_monitor_port.or(file.nats.monitor_port),
                cluster_port: args
                    .nats_cluster_port
                    .or(file.nats.cluster_port)
                    .unwrap_or(DEFAULT_NATS_CLUSTER_PORT),
                leaf_port: args
                    .nats_leaf_port
                    .or(file.nats.leaf_port)
                    .unwrap_or(DEFAULT_NATS_LEAF_PORT),
            },
            storage: StorageConfig {
                backend: StorageBackend::Dir,
                path: PathBuf::new(),
                loop_size: None,
            },
            operation_lease_ttl: DEFAULT_OPERATION_LEASE_TTL,
            docker_socket: args
                .docker_socket
                .clone()
                .or(file.docker_socket)
                .unwrap_or_else(|| PathBuf::from("/var/run/docker.sock")),
            gateway: GatewayConfig {
                binary: file.gateway.binary,
                http_listen: file
                    .gateway
                    .http_listen
                    .unwrap_or_else(|| vec![SocketAddr::from((Ipv4Addr::UNSPECIFIED, 80))]),
                https_listen: file
                    .gateway
                    .https_listen
                    .unwrap_or_else(|| vec![SocketAddr::from((Ipv4Addr::UNSPECIFIED, 443))]),
                tcp_listen_ip: file
                    .gateway
                    .tcp_listen_ip
                    .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            },
            dns: DnsConfig {
                binary: file.dns.binary,
                listen: file.dns.listen,
                upstreams: file.dns.upstreams.unwrap_or_default(),
            },
            mesh: MeshConfig {
                interface: args
                    .mesh_interface
                    .clone()
                    .or(file.mesh.interface)
                    .unwrap_or_else(|| DEFAULT_MESH_INTERFACE.to_owned()),
                listen_port: args
                    .mesh_port
                    .or(file.mesh.listen_port)
                    .unwrap_or(crate::mesh::overlay::DEFAULT_LISTEN_PORT),
                uapi_dir: args
                    .mesh_uapi_dir
                    .clone()
                    .or(file.mesh.uapi_dir)
                    .unwrap_or_else(|| PathBuf::from(crate::mesh::boringtun::DEFAULT_UAPI_DIR)),
                tunnel_binary: file.mesh.tunnel_binary,
                api_port: args
                    .mesh_api_port
                    .or(file.mesh.api_port)
                    .unwrap_or(DEFAULT_MESH_API_PORT),
                container_network: match args
                    .mesh_container_network
                    .clone()
                    .or(file.mesh.container_network)
                {
                    Some(name) if name == "none" => None,
                    Some(name) => Some(name),
                    None => Some(DEFAULT_CONTAINER_NETWORK.to_owned()),
                },
            },
        };
        if let Some(list) = &args.gateway_http {
            config.gateway.http_listen = parse_listeners("gateway.http_listen", list)?;
        }
        if let Some(list) = &args.gateway_https {
            config.gateway.https_listen = parse_listeners("gateway.https_listen", list)?;
        }
        if let Some(list) = &args.dns_listen {
            config.dns.listen = Some(parse_listeners("dns.listen", list)?);
        }
        config.storage.backend = match args
            .storage_backend
            .clone()
            .or(file.storage.backend)
            .as_deref()
        {
            None | Some("dir") => StorageBackend::Dir,
            Some("btrfs") => StorageBackend::Btrfs,
            Some("zfs") => StorageBackend::Zfs,
            Some(other) => {
                return Err(ConfigError::InvalidValue {
                    key: "storage.backend",
                    message: format!("`{other}` is not one of btrfs, zfs, dir"),
                });
            }
        };
        config.storage.path = match (
            args.storage_path.clone().or(file.storage.path),
            config.storage.backend,
        ) {
            (Some(path), _) => path,
            (None, StorageBackend::Dir) => config.data_dir.join("volumes"),
            (None, StorageBackend::Btrfs) => config.data_dir.join("pool"),
            (None, StorageBackend::Zfs) => {
                return Err(ConfigError::InvalidValue {
                    key: "storage.path",
                    message: "the zfs backend needs a parent dataset, e.g. `tank/ployz`".to_owned(),
                });
            }
        };
        if let Some(size) = args.storage_loop_size.clone().or(file.storage.loop_size) {
            let bytes = crate::deploy::manifest::parse_bytes(&size).map_err(|message| {
                ConfigError::InvalidValue {
                    key: "storage.loop_size",
                    message,
                }
            })?;
            config.storage.loop_size = Some(bytes);
        }
        if let Some(ttl) = args
            .operation_lease_ttl
            .clone()
            .or(file.operations.lease_ttl)
        {
            config.operation_lease_ttl =
                parse_duration(&ttl).map_err(|message| ConfigError::InvalidValue {
                    key: "operations.lease_ttl",
                    message,
                })?;
        }
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        check_socket_path(&self.socket)?;
        if self.data_dir.is_file() {
            return Err(ConfigError::DataDirIsFile {
                path: self.data_dir.clone(),
            });
        }
        if self.nats.port == 0 {
            return Err(ConfigError::InvalidPort { key: "nats.port" });
        }
        if self.nats.cluster_port == 0 {
            return Err(ConfigError::InvalidPort {
                key: "nats.cluster_port",
            });
        }
        if self.nats.leaf_port == 0 {
            return Err(ConfigError::InvalidPort {
                key: "nats.leaf_port",
            });
        }
        if self.mesh.listen_port == 0 {
            return Err(ConfigError::InvalidPort {
                key: "mesh.listen_port",
            });
        }
        if self.mesh.api_port == 0 {
            return Err(ConfigError::InvalidPort {
                key: "mesh.api_port",
            });
        }
        if let Some(network) = &self.mesh.container_network
            && (network.is_empty()
                || network.len() > 64
                || !network
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.')))
        {
            return Err(ConfigError::InvalidValue {
                key: "mesh.container_network",
                message: format!(
                    "`{network}` is not a Docker network name (letters, digits, `-`, `_`, `.`)"
                ),
            });
        }
        let interface = &self.mesh.interface;
        if interface.is_empty()
            || interface.len() > 15
            || !interface
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_')
        {
            return Err(ConfigError::InvalidValue {
                key: "mesh.interface",
                message: format!("`{interface}` must be 1 to 15 letters, digits, `-` or `_`"),
            });
        }
        if self.nats.monitor_port == Some(0) {
            return Err(ConfigError::InvalidPort {
                key: "nats.monitor_port",
            });
        }
        Ok(())
    }

    /// Where the daemon writes its pid: beside its socket.
    pub fn pidfile(&self) -> PathBuf {
        ployz_api::paths::pidfile_for_socket(&self.socket)
    }
}

/// Checks that `path` can be a Unix socket path: short enough and not a directory.
pub fn check_socket_path(path: &Path) -> Result<(), ConfigError> {
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(ConfigError::SocketPathTooLong {
            path: path.to_owned(),
            length: path.as_os_str().len(),
        });
    }
    if path.is_dir() {
        return Err(ConfigError::SocketPathIsDirectory {
            path: path.to_owned(),
        });
    }
    Ok(())
}

fn default_config_path() -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/etc/ployz/ployzd.toml");
    }
    let config_home = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")));
    config_home
        .unwrap_or_else(|| PathBuf::from("/etc"))
        .join("ployz/ployzd.toml")
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|error| {
        let line = error.span().map(|span| crate::line_of(&text, span.start));
        ConfigError::Invalid {
            path: path.to_owned(),
            line,
            // toml's Display draws a multi-line snippet; keep the one-line message.
            message: error.message().trim().replace('\n', " "),
        }
    })
}

/// A configuration problem, always reported on one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {}{}: {message}", path.display(), line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Invalid {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },
    #[error("socket path {} is a directory; name a file path such as {}/ployzd.sock", path.display(), path.display())]
    SocketPathIsDirectory { path: PathBuf },
    #[error("socket path {} is {length} bytes long; Unix sockets allow at most 107", path.display())]
    SocketPathTooLong { path: PathBuf, length: usize },
    #[error("data dir {} is a file, not a directory", path.display())]
    DataDirIsFile { path: PathBuf },
    #[error("`{key}` must be a port between 1 and 65535")]
    InvalidPort { key: &'static str },
    #[error("`{key}`: {message}")]
    InvalidValue { key: &'static str, message: String },
}

/// Parses `500ms`, `30s`, `2m`; at least one second, at most one day.
/// Parses `addr,addr,...`; `none` (or nothing) is the empty list.
fn parse_listeners(key: &'static str, text: &str) -> Result<Vec<SocketAddr>, ConfigError> {
    let text = text.trim();
    if text.is_empty() || text == "none" {
        return Ok(Vec::new());
    }
    text.split(',')
        .map(|part| {
            part.trim().parse().map_err(|_| ConfigError::InvalidValue {
                key,
                message: format!("`{}` is not an address like 127.0.0.1:8080", part.trim()),
            })
        })
        .collect()
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = crate::deploy::manifest::parse_duration(text)?;
    if duration < Duration::from_secs(1) || duration > Duration::from_secs(86_400) {
        return Err(format!("`{text}` must be between 1s and 24h"));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args_with_config(text: &str) -> (tempfile::TempDir, DaemonArgs) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ployzd.toml");
        std::fs::write(&path, text).expect("write config");
        let args = DaemonArgs {
            config: Some(path),
            socket: Some(dir.path().join("s.sock")),
            data_dir: Some(dir.path().join("data")),
            ..DaemonArgs::default()
        };
        (dir, args)
    }

    #[test]
    fn flags_override_the_file() {
        let (_dir, mut args) =
            args_with_config("log = \"debug\"\n[nats]\nport = 5000\nmonitor_port = 8222\n");
        args.nats_port = Some(6000);
        let config = DaemonConfig::resolve(&args).expect("valid");
        assert_eq!(config.nats.port, 6000);
        assert_eq!(config.nats.monitor_port, Some(8222));
        assert_eq!(config.log, "debug");
    }

    #[test]
    fn routing_listeners_come_from_the_file_and_flags() {
        let (_dir, mut args) = args_with_config(
            "[gateway]\nhttp_listen = [\"127.0.0.1:8080\"]\n[dns]\nlisten = [\"127.0.0.1:5353\"]\n",
        );
        let config = DaemonConfig::resolve(&args).expect("valid");
        assert_eq!(
            config.gateway.http_listen,
            vec!["127.0.0.1:8080".parse().expect("addr")]
        );
        assert_eq!(
            config.gateway.https_listen,
            vec!["0.0.0.0:443".parse().expect("addr")]
        );
        assert_eq!(
            config.dns.listen,
            Some(vec!["127.0.0.1:5353".parse().expect("addr")])
        );
        args.gateway_http = Some("127.0.0.1:1, [::1]:2".to_owned());
        args.gateway_https = Some("none".to_owned());
        let config = DaemonConfig::resolve(&args).expect("valid");
        assert_eq!(config.gateway.http_listen.len(), 2);
        assert!(config.gateway.https_listen.is_empty());
        args.dns_listen = Some("localhost:53".to_owned());
        assert!(matches!(
            DaemonConfig::resolve(&args),
            Err(ConfigError::InvalidValue {
                key: "dns.listen",
                ..
            })
        ));
    }

    #[test]
    fn a_wrong_type_is_one_line_naming_file_and_line() {
        let (_dir, args) = args_with_config("log = \"info\"\n[nats]\nport = \"four\"\n");
        let error = DaemonConfig::resolve(&args).expect_err("wrong type");
        let message = error.to_string();
        assert!(
            matches!(error, ConfigError::Invalid { line: Some(3), .. }),
            "{message}"
        );
        assert!(!message.contains('\n'), "{message}");
        assert!(message.contains("invalid type"), "{message}");
    }

    #[test]
    fn an_unknown_key_is_refused() {
        let (_dir, args) = args_with_config("nats_port = 1\n");
        let message = DaemonConfig::resolve(&args)
            .expect_err("unknown")
            .to_string();
        assert!(message.contains("unknown field `nats_port`"), "{message}");
    }

    #[test]
    fn a_socket_path_that_is_a_directory_is_refused() {
        let (dir, mut args) = args_with_config("");
        args.socket = Some(dir.path().to_owned());
        assert!(matches!(
            DaemonConfig::resolve(&args),
            Err(ConfigError::SocketPathIsDirectory { .. })
        ));
    }

    #[test]
    fn an_overlong_socket_path_is_refused() {
        let (_dir, mut args) = args_with_config("");
        args.socket = Some(PathBuf::from(format!("/tmp/{}.sock", "x".repeat(120))));
        assert!(matches!(
            DaemonConfig::resolve(&args),
            Err(ConfigError::SocketPathTooLong { .. })
        ));
    }
}
