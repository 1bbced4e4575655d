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
    /// serves the last good table from `state_dir` only. Credentials in the
    /// URL are not used (async-nats ignores them); put them in `credentials`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats_url: Option<String>,
    /// The user and password to connect to `nats_url` with, for servers whose
    /// `authorization` block requires one of every client. Absent: connect
    /// without authenticating.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<NatsCredentials>,
    /// The JetStream domain holding the bucket, for a `nats_url` that is a
    /// leaf node without JetStream of its own: requests then go to
    /// `$JS.<domain>.API.>`, the only JetStream subjects that cross a leaf
    /// connection. Absent: the server's own JetStream (`$JS.API.>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jetstream_domain: Option<String>,
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

/// A NATS user and password (`[source.credentials]`). `Debug` never shows the
/// password, so configs can be logged; the rendered file does hold it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsCredentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for NatsCredentials {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("NatsCredentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn source() -> SourceConfig {
        SourceConfig {
            nats_url: Some("nats://127.0.0.1:4222".to_owned()),
            credentials: None,
            jetstream_domain: None,
            bucket: "ployz".to_owned(),
            state_dir: PathBuf::from("/var/lib/ployz/gateway/state"),
            admin_socket: PathBuf::from("/var/lib/ployz/gateway/admin.sock"),
        }
    }

    #[test]
    fn absent_credentials_and_domain_are_not_rendered() {
        let rendered = toml::to_string(&source()).expect("renders");
        assert!(!rendered.contains("credentials"), "{rendered}");
        assert!(!rendered.contains("jetstream_domain"), "{rendered}");
        let parsed: SourceConfig = toml::from_str(&rendered).expect("parses");
        assert_eq!(parsed, source());
    }

    #[test]
    fn credentials_and_domain_round_trip() {
        let config = SourceConfig {
            credentials: Some(NatsCredentials {
                user: "ployzd".to_owned(),
                password: "s3cret-pw".to_owned(),
            }),
            jetstream_domain: Some("ployz".to_owned()),
            ..source()
        };
        let rendered = toml::to_string(&config).expect("renders");
        let parsed: SourceConfig = toml::from_str(&rendered).expect("parses");
        assert_eq!(parsed, config);

        let written = r#"
            nats_url = "nats://127.0.0.1:4222"
            jetstream_domain = "ployz"
            state_dir = "/state"
            admin_socket = "/admin.sock"
            [credentials]
            user = "ployzd"
            password = "s3cret-pw"
        "#;
        let parsed: SourceConfig = toml::from_str(written).expect("parses");
        assert_eq!(parsed.credentials, config.credentials);
        assert_eq!(parsed.jetstream_domain.as_deref(), Some("ployz"));
    }

    #[test]
    fn unknown_credential_fields_are_refused() {
        let written = r#"
            state_dir = "/state"
            admin_socket = "/admin.sock"
            [credentials]
            user = "ployzd"
            password = "pw"
            token = "nope"
        "#;
        assert!(toml::from_str::<SourceConfig>(written).is_err());
    }

    #[test]
    fn debug_output_never_shows_the_password() {
        let config = SourceConfig {
            credentials: Some(NatsCredentials {
                user: "ployzd".to_owned(),
                password: "s3cret-pw".to_owned(),
            }),
            ..source()
        };
        for text in [format!("{config:?}"), format!("{config:#?}")] {
            assert!(!text.contains("s3cret-pw"), "{text}");
            assert!(text.contains("ployzd"), "{text}");
            assert!(text.contains(r#"password: "<redacted>""#), "{text}");
        }
    }
}
