//! The config files of the gateway and DNS processes. ployzd renders them (and
//! hashes the rendering as the process's identity); the processes parse them.
//! Keeping both sides on these types is what keeps them in agreement.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// Where a routing process reads committed facts and keeps its own state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// NATS to follow, e.g. `nats://127.0.0.1:4222`. Without it the process
    /// serves the last good table from `state_dir` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats_url: Option<String>,
    /// The KV bucket holding the deploy commits.
    #[serde(default = "default_bucket")]
    pub bucket: String,
    /// Directory of the last good table (`table.json`).
    pub state_dir: PathBuf,
    /// The unix socket answering status queries (`ployzctl routes ls`).
    pub admin_socket: PathBuf,
}

fn default_bucket() -> String {
    "ployz".to_owned()
}

/// `ployz-gateway --config <file>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    pub source: SourceConfig,
    /// Plain HTTP listeners.
    #[serde(default)]
    pub http_listen: Vec<SocketAddr>,
    /// TLS listeners; the certificate is chosen by SNI among the routes' files.
    #[serde(default)]
    pub https_listen: Vec<SocketAddr>,
    /// The address TCP routes listen on, at each route's port.
    #[serde(default = "unspecified")]
    pub tcp_listen_ip: IpAddr,
}

fn unspecified() -> IpAddr {
    IpAddr::V4(Ipv4Addr::UNSPECIFIED)
}

/// `ployz-dns --config <file>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    pub source: SourceConfig,
    /// UDP and TCP listeners.
    pub listen: Vec<SocketAddr>,
    /// Resolvers for every name outside `ployz.internal`. Empty: the
    /// nameservers of `resolv_conf`, read at start.
    #[serde(default)]
    pub upstreams: Vec<SocketAddr>,
    #[serde(default = "default_resolv_conf")]
    pub resolv_conf: PathBuf,
}

fn default_resolv_conf() -> PathBuf {
    PathBuf::from("/etc/resolv.conf")
}

/// Why a config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config `{path}`")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config `{path}` is invalid")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
}

/// Reads and parses a config file.
pub fn load<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_owned(),
        source,
    })
}

/// Renders a config file; deterministic, so its hash identifies the process.
pub fn render<T: Serialize>(config: &T) -> String {
    toml::to_string(config).expect("routing configs always serialize to TOML")
}
