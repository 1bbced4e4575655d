//! Daemon configuration: defaults, then a TOML file, then environment, then
//! flags — each later source overrides the earlier ones. Every problem is one
//! typed, one-line error naming the file, key and line.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
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
    /// Log filter, e.g. `info` or `ployzd=debug,info`.
    #[arg(long, env = "PLOYZ_LOG", value_name = "FILTER")]
    pub log: Option<String>,
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
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileNatsConfig {
    binary: Option<PathBuf>,
    port: Option<u16>,
    monitor_port: Option<u16>,
}

/// The resolved configuration the daemon runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonConfig {
    pub data_dir: PathBuf,
    pub socket: PathBuf,
    pub log: String,
    pub nats: NatsConfig,
}

/// How the daemon runs its NATS sidecar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsConfig {
    /// Explicit binary; `None` means search the default places.
    pub binary: Option<PathBuf>,
    pub host: IpAddr,
    pub port: u16,
    pub monitor_port: Option<u16>,
}

/// The default NATS client port. Not 4222, so a Ployz machine can also run an
/// unrelated NATS on the standard port.
pub const DEFAULT_NATS_PORT: u16 = 4722;

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
        let config = DaemonConfig {
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
            },
        };
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
        let line = error
            .span()
            .map(|span| text[..span.start.min(text.len())].lines().count().max(1));
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
