//! The deploy manifest: a namespace and its services, in TOML (see
//! `docs/manifest.md`). Parsing refuses unknown fields naming the field and
//! line; [`Manifest::parse`] then validates everything a deploy relies on, so a
//! deploy never starts on a manifest it would fail on halfway.

use std::{collections::BTreeMap, fmt, time::Duration};

use serde::{Deserialize, Serialize};

use crate::line_of;

/// A parsed and validated manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The namespace this manifest deploys; every service, volume and route lives in it.
    pub namespace: String,
    /// Set by `ployzctl deploy export`: the commit whose services and volume
    /// state this manifest restores. The deploy records it as a revert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverts: Option<String>,
    /// Services by name, sorted.
    #[serde(default)]
    pub services: BTreeMap<String, Service>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Container ports the service listens on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    #[serde(default = "one")]
    pub replicas: u32,
    /// Machine ids to run on, replica `i` on `placement[i % len]`; empty
    /// means the machine that runs the deploy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub placement: Vec<String>,
    #[serde(default = "default_grace", with = "duration_text")]
    pub stop_grace_period: Duration,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthCheck>,
    #[serde(default, skip_serializing_if = "Resources::is_empty")]
    pub resources: Resources,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeMount>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
}

fn one() -> u32 {
    1
}

fn default_grace() -> Duration {
    Duration::from_secs(10)
}

/// How a deploy decides a new container is ready: exactly one of `http`, `tcp`, `command`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpCheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpCheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    #[serde(default = "default_interval", with = "duration_text")]
    pub interval: Duration,
    #[serde(default = "default_timeout", with = "duration_text")]
    pub timeout: Duration,
    /// Consecutive failures after the start period that fail the deploy.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Failures during this period after start do not count.
    #[serde(default, with = "duration_text")]
    pub start_period: Duration,
}

fn default_interval() -> Duration {
    Duration::from_secs(1)
}

fn default_timeout() -> Duration {
    Duration::from_secs(1)
}

fn default_retries() -> u32 {
    3
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpCheck {
    pub port: u16,
    #[serde(default = "root_path")]
    pub path: String,
}

fn root_path() -> String {
    "/".to_owned()
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpCheck {
    pub port: u16,
}

/// The probe a health check runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe<'a> {
    Http { port: u16, path: &'a str },
    Tcp { port: u16 },
    Command(&'a [String]),
}

impl HealthCheck {
    /// The one probe this check names (validated by [`Manifest::parse`]).
    pub fn probe(&self) -> Option<Probe<'_>> {
        match (&self.http, &self.tcp, &self.command) {
            (Some(http), None, None) => Some(Probe::Http {
                port: http.port,
                path: &http.path,
            }),
            (None, Some(tcp), None) => Some(Probe::Tcp { port: tcp.port }),
            (None, None, Some(command)) => Some(Probe::Command(command)),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Memory limit, e.g. `256MiB`, `1GiB`, `500MB`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// CPU limit in CPUs, e.g. `0.5`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
}

impl Resources {
    fn is_empty(&self) -> bool {
        self.memory.is_none() && self.cpus.is_none()
    }

    /// The memory limit in bytes (validated by [`Manifest::parse`]).
    pub fn memory_bytes(&self) -> Option<u64> {
        self.memory
            .as_deref()
            .and_then(|text| parse_bytes(text).ok())
    }

    /// The CPU limit in thousandths of a CPU.
    pub fn cpu_millis(&self) -> Option<u64> {
        self.cpus.map(|cpus| (cpus * 1000.0).round() as u64)
    }
}

/// A volume of the namespace mounted into a service. A volume belongs to one
/// service (it is exclusive), so that service is stopped before it is replaced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeMount {
    pub name: String,
    /// Absolute path inside the container.
    pub mount: String,
    /// How a branch of the namespace gets this volume: a copy-on-write clone
    /// (`branch`) or a new empty volume (`fresh`).
    #[serde(default)]
    pub mode: VolumeMode,
    /// Restore the volume to this snapshot at this deploy's commit point
    /// (written by `ployzctl deploy export` for a rollback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeMode {
    #[default]
    Branch,
    Fresh,
}

/// Traffic the gateway sends to the service: HTTP by host and path prefix, or a TCP port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// A TCP port the gateway listens on for this service (instead of HTTP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<u16>,
    /// The container port traffic goes to.
    pub port: u16,
    /// TLS certificate and key files for these hosts (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsFiles>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub certificate: String,
    pub key: String,
}

/// Why a manifest was refused. `field` is a dotted path; `line` is known for
/// syntax and shape errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ManifestError {
    pub field: Option<String>,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("manifest")?;
        if let Some(line) = self.line {
            write!(f, " line {line}")?;
        }
        if let Some(field) = &self.field {
            write!(f, " `{field}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ManifestError {
    ManifestError {
        field: Some(field.into()),
        line: None,
        message: message.into(),
    }
}

/// The largest manifest accepted, to bound memory on hostile input.
pub const MAX_MANIFEST_BYTES: usize = 1024 * 1024;

impl Manifest {
    /// Parses and validates a manifest.
    pub fn parse(text: &str) -> Result<Self, ManifestError> {
        if text.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError {
                field: None,
                line: None,
                message: format!("is {} bytes; the limit is {MAX_MANIFEST_BYTES}", text.len()),
            });
        }
        let manifest: Manifest = toml::from_str(text).map_err(|error| ManifestError {
            field: None,
            line: error.span().map(|span| line_of(text, span.start)),
            message: error.message().trim().replace('\n', " "),
        })?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// The manifest as TOML (what `deploy export` prints).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self)
            .unwrap_or_else(|error| format!("# cannot render manifest: {error}\n"))
    }

    fn validate(&self) -> Result<(), ManifestError> {
        check_label("namespace", &self.namespace)?;
        if self.services.is_empty() {
            return Err(invalid("services", "a manifest needs at least one service"));
        }
        let mut volume_owner: BTreeMap<&str, &str> = BTreeMap::new();
        for (name, service) in &self.services {
            let at = |field: &str| format!("services.{name}.{field}");
            check_label(&format!("services.{name}"), name)?;
            if service.image.trim().is_empty() {
                return Err(invalid(at("image"), "must name an image"));
            }
            for key in service.env.keys() {
                let valid = !key.is_empty()
                    && !key.starts_with(|c: char| c.is_ascii_digit())
                    && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                if !valid {
                    return Err(invalid(
                        at("env"),
                        format!("`{key}` is not a valid variable name"),
                    ));
                }
            }
            if !(1..=64).contains(&service.replicas) {
                return Err(invalid(at("replicas"), "must be between 1 and 64"));
            }
            for (index, machine) in service.placement.iter().enumerate() {
                check_label(&at(&format!("placement[{index}]")), machine)?;
                if service.placement[..index].contains(machine) {
                    return Err(invalid(
                        at("placement"),
                        format!("names machine `{machine}` twice"),
                    ));
                }
            }
            if service.stop_grace_period > Duration::from_secs(3600) {
                return Err(invalid(at("stop_grace_period"), "must be at most 1h"));
            }
            if let Some(health) = &service.health {
                if health.probe().is_none() {
                    return Err(invalid(
                        at("health"),
                        "name exactly one of `http`, `tcp`, `command`",
                    ));
                }
                if let Some(http) = &health.http
                    && !http.path.starts_with('/')
                {
                    return Err(invalid(at("health.http.path"), "must start with `/`"));
                }
                if matches!(&health.command, Some(command) if command.is_empty()) {
                    return Err(invalid(at("health.command"), "must not be empty"));
                }
                if health.interval.is_zero() || health.timeout.is_zero() {
                    return Err(invalid(
                        at("health"),
                        "`interval` and `timeout` must be positive",
                    ));
                }
                if health.retries == 0 {
                    return Err(invalid(at("health.retries"), "must be at least 1"));
                }
            }
            if let Some(memory) = &service.resources.memory {
                let bytes = parse_bytes(memory)
                    .map_err(|message| invalid(at("resources.memory"), message))?;
                if bytes < 4 * 1024 * 1024 {
                    return Err(invalid(at("resources.memory"), "must be at least 4MiB"));
                }
            }
            if let Some(cpus) = service.resources.cpus
                && !(cpus.is_finite() && (0.01..=1024.0).contains(&cpus))
            {
                return Err(invalid(
                    at("resources.cpus"),
                    "must be between 0.01 and 1024",
                ));
            }
            let mut mounts = Vec::new();
            for volume in &service.volumes {
                check_label(&at("volumes.name"), &volume.name)?;
                if !volume.mount.starts_with('/') || volume.mount.contains("..") {
                    return Err(invalid(
                        at("volumes.mount"),
                        format!("`{}` must be an absolute path", volume.mount),
                    ));
                }
                if mounts.contains(&volume.mount.as_str()) {
                    return Err(invalid(
                        at("volumes.mount"),
                        format!("`{}` is mounted twice", volume.mount),
                    ));
                }
                mounts.push(&volume.mount);
                if let Some(owner) = volume_owner.insert(&volume.name, name) {
                    return Err(invalid(
                        at("volumes.name"),
                        format!(
                            "volume `{}` is already mounted by service `{owner}`; a volume belongs to one service",
                            volume.name
                        ),
                    ));
                }
                if let Some(snapshot) = &volume.restore {
                    let valid = (1..=64).contains(&snapshot.len())
                        && snapshot
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                    if !valid {
                        return Err(invalid(
                            at("volumes.restore"),
                            format!("`{snapshot}` is not a snapshot name"),
                        ));
                    }
                }
            }
            if !service.volumes.is_empty() && service.replicas != 1 {
                return Err(invalid(
                    at("replicas"),
                    "a service with volumes runs exactly 1 replica (its volumes are exclusive)",
                ));
            }
            for route in &service.routes {
                match (route.tcp, route.hosts.is_empty()) {
                    (Some(_), false) => {
                        return Err(invalid(
                            at("routes"),
                            "a route is either HTTP (`hosts`) or TCP (`tcp`), not both",
                        ));
                    }
                    (None, true) => {
                        return Err(invalid(
                            at("routes"),
                            "an HTTP route needs at least one host",
                        ));
                    }
                    (Some(_), true) | (None, false) => {}
                }
                for host in &route.hosts {
                    let valid = !host.is_empty()
                        && host.len() <= 253
                        && host.split('.').all(|label| {
                            !label.is_empty()
                                && label
                                    .bytes()
                                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'*')
                        });
                    if !valid {
                        return Err(invalid(
                            at("routes.hosts"),
                            format!("`{host}` is not a host name"),
                        ));
                    }
                }
                if let Some(path) = route.paths.iter().find(|path| !path.starts_with('/')) {
                    return Err(invalid(
                        at("routes.paths"),
                        format!("`{path}` must start with `/`"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Checks a DNS-label-like name: 1–63 of `[a-z0-9-]`, starting with a letter, not ending with `-`.
fn check_label(field: &str, name: &str) -> Result<(), ManifestError> {
    let valid = (1..=63).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("`{name}` must be 1-63 of a-z, 0-9 and -, starting with a letter"),
        ))
    }
}

/// Splits `250ms` into its number and its unit (`250`, `ms`); `None` when
/// there is no number or it does not fit a u64.
fn number_and_unit(text: &str) -> Option<(u64, &str)> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    Some((number.parse().ok()?, unit))
}

/// Parses `512MiB`, `1GiB`, `100MB`, `1048576` into bytes.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit) =
        number_and_unit(text).ok_or_else(|| format!("`{text}` is not a size like 256MiB"))?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1000,
        "KiB" => 1024,
        "MB" => 1000 * 1000,
        "MiB" => 1024 * 1024,
        "GB" => 1000 * 1000 * 1000,
        "GiB" => 1024 * 1024 * 1024,
        other => {
            return Err(format!(
                "unknown size unit `{other}` (use B, KiB, MiB, GiB, KB, MB, GB)"
            ));
        }
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("`{text}` is too large"))
}

/// Parses a duration written as text: `500ms`, `10s`, `2m`, `1h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    duration_text::parse(text)
}

/// Durations in manifests are text: `500ms`, `10s`, `2m`, `1h`.
mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        let ms = duration.as_millis();
        let text = if !ms.is_multiple_of(1000) {
            format!("{ms}ms")
        } else if !ms.is_multiple_of(60_000) || ms == 0 {
            format!("{}s", ms / 1000)
        } else {
            format!("{}m", ms / 60_000)
        };
        serializer.serialize_str(&text)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse(&text).map_err(D::Error::custom)
    }

    pub fn parse(text: &str) -> Result<Duration, String> {
        let text = text.trim();
        let (number, unit) = super::number_and_unit(text)
            .ok_or_else(|| format!("`{text}` is not a duration like 500ms, 10s, 2m or 1h"))?;
        let ms = match unit {
            "ms" => Some(number),
            "s" => number.checked_mul(1000),
            "m" => number.checked_mul(60_000),
            "h" => number.checked_mul(3_600_000),
            _ => {
                return Err(format!(
                    "`{text}` is not a duration like 500ms, 10s, 2m or 1h"
                ));
            }
        };
        ms.map(Duration::from_millis)
            .ok_or_else(|| format!("`{text}` is too long"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
namespace = "shop"

[services.web]
image = "ployz-example:latest"
command = ["httpd", "-f", "-p", "8080", "-h", "/www"]
env = { GREETING = "hello" }
ports = [8080]
stop_grace_period = "2s"
resources = { memory = "64MiB", cpus = 0.5 }
health = { http = { port = 8080, path = "/" }, interval = "500ms", retries = 5 }

[[services.web.volumes]]
name = "data"
mount = "/www"

[[services.web.routes]]
hosts = ["shop.example.com"]
paths = ["/"]
port = 8080

[services.db]
image = "ployz-example:latest"
replicas = 1

[[services.db.routes]]
tcp = 5432
port = 5432
"#;

    #[test]
    fn a_full_manifest_parses_with_defaults() {
        let manifest = Manifest::parse(FULL).expect("valid");
        assert_eq!(manifest.namespace, "shop");
        let web = &manifest.services["web"];
        assert_eq!(web.replicas, 1);
        assert_eq!(web.stop_grace_period, Duration::from_secs(2));
        assert_eq!(web.resources.memory_bytes(), Some(64 * 1024 * 1024));
        assert_eq!(web.resources.cpu_millis(), Some(500));
        let health = web.health.as_ref().expect("health");
        assert_eq!(
            health.probe(),
            Some(Probe::Http {
                port: 8080,
                path: "/"
            })
        );
        assert_eq!(health.interval, Duration::from_millis(500));
        assert_eq!(health.timeout, Duration::from_secs(1));
        assert_eq!(web.volumes[0].mode, VolumeMode::Branch);
        assert_eq!(
            manifest.services["db"].stop_grace_period,
            Duration::from_secs(10)
        );
    }

    #[test]
    fn the_documented_example_is_valid() {
        let doc = include_str!("../../../docs/manifest.md");
        let start = doc
            .find("```toml\n")
            .expect("docs/manifest.md has a TOML example")
            + "```toml\n".len();
        let end = start + doc[start..].find("```").expect("the example is closed");
        let manifest = Manifest::parse(&doc[start..end]).expect("the documented example parses");
        assert_eq!(manifest.services.len(), 2);
    }

    #[test]
    fn export_round_trips() {
        let manifest = Manifest::parse(FULL).expect("valid");
        let again = Manifest::parse(&manifest.to_toml()).expect("exported manifest parses");
        assert_eq!(again, manifest);
    }

    #[test]
    fn an_unknown_field_is_named_with_its_line() {
        let text = "namespace = \"shop\"\n[services.web]\nimage = \"x\"\nimgae = \"y\"\n";
        let error = Manifest::parse(text).expect_err("unknown field");
        assert_eq!(error.line, Some(4), "{error}");
        assert!(
            error.to_string().contains("unknown field `imgae`"),
            "{error}"
        );
    }

    #[test]
    fn invalid_values_are_refused_naming_the_field() {
        let cases = [
            (
                "namespace = \"Shop\"\n[services.web]\nimage = \"x\"\n",
                "namespace",
            ),
            ("namespace = \"shop\"\n", "services"),
            (
                "namespace = \"shop\"\n[services.web]\nimage = \"\"\n",
                "services.web.image",
            ),
            (
                "namespace = \"shop\"\n[services.web]\nimage = \"x\"\nreplicas = 0\n",
                "services.web.replicas",
            ),
            (
                "namespace = \"shop\"\n[services.web]\nimage = \"x\"\nhealth = { tcp = { port = 1 }, command = [\"true\"] }\n",
                "services.web.health",
            ),
            (
                "namespace = \"shop\"\n[services.web]\nimage = \"x\"\nresources = { memory = \"12 parsecs\" }\n",
                "services.web.resources.memory",
            ),
            (
                "namespace = \"shop\"\n[services.web]\nimage = \"x\"\nreplicas = 2\n[[services.web.volumes]]\nname = \"d\"\nmount = \"/d\"\n",
                "services.web.replicas",
            ),
            (
                "namespace = \"shop\"\n[services.a]\nimage = \"x\"\n[[services.a.volumes]]\nname = \"d\"\nmount = \"/d\"\n[services.b]\nimage = \"x\"\n[[services.b.volumes]]\nname = \"d\"\nmount = \"/d\"\n",
                "services.b.volumes.name",
            ),
            (
                "namespace = \"shop\"\n[services.web]\nimage = \"x\"\n[[services.web.routes]]\nport = 80\n",
                "services.web.routes",
            ),
            (
                "namespace = \"shop\"\n[services.web]\nimage = \"x\"\nenv = { \"A-B\" = \"1\" }\n",
                "services.web.env",
            ),
        ];
        for (text, field) in cases {
            let error = Manifest::parse(text).expect_err(field);
            assert_eq!(error.field.as_deref(), Some(field), "{error}");
        }
    }

    #[test]
    fn a_wrong_type_is_a_shape_error_with_a_line() {
        let error = Manifest::parse("namespace = \"shop\"\n[services.web]\nimage = 3\n")
            .expect_err("wrong type");
        assert_eq!(error.line, Some(3), "{error}");
    }

    #[test]
    fn durations_and_sizes_parse() {
        assert_eq!(
            duration_text::parse("250ms"),
            Ok(Duration::from_millis(250))
        );
        assert_eq!(duration_text::parse("2m"), Ok(Duration::from_secs(120)));
        assert!(duration_text::parse("2 weeks").is_err());
        assert!(duration_text::parse("99999999999999999999h").is_err());
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("100MB"), Ok(100_000_000));
        assert!(parse_bytes("18446744073709551615GiB").is_err());
    }

    #[test]
    fn hostile_input_never_panics() {
        for text in [
            "",
            "\0",
            "[[[",
            "namespace = ",
            &"a".repeat(MAX_MANIFEST_BYTES + 1),
            "namespace=\"\u{202e}\"",
        ] {
            assert!(Manifest::parse(text).is_err());
        }
    }
}
