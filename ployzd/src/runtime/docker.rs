//! The Docker engine backend of [`ContainerRuntime`], through bollard over the
//! local Unix socket. It translates between the runtime's domain types and the
//! engine's API and nothing more: no retries, no policy. bollard types never
//! leave this file; engine errors become [`RuntimeError`]s with the source kept.

use std::{collections::BTreeMap, net::IpAddr, path::Path, time::Duration};

use bollard::{
    Docker,
    container::LogOutput,
    errors::Error as DockerError,
    exec::{CreateExecOptions, StartExecOptions, StartExecResults},
    models::{
        ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum, HostConfig, Ipam,
        IpamConfig, NetworkCreateRequest,
    },
    query_parameters::{
        CreateContainerOptions, InspectContainerOptions, ListContainersOptions,
        RemoveContainerOptions, StartContainerOptions, StopContainerOptions,
    },
};
use futures::{StreamExt, TryStreamExt};

use super::{
    ContainerId, ContainerInfo, ContainerRuntime, ContainerSpec, ContainerState, ExecOutput, Mount,
    RuntimeError,
};

/// The engine's socket when none is given.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

/// How long bollard waits for the engine to answer one request. `stop` raises it
/// for its own request when the grace period is longer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// How long `stop` allows the engine beyond the grace period to kill the
/// process and report back.
const STOP_SLACK: Duration = Duration::from_secs(30);

/// How many containers `list` inspects at once.
const LIST_CONCURRENCY: usize = 8;

/// The engine reports this start time for a container that never ran.
const ZERO_TIME_PREFIX: &str = "0001-01-01";

/// Containers on the local Docker engine. Cloning shares the connection.
#[derive(Clone, Debug)]
pub struct DockerRuntime {
    docker: Docker,
    /// Where containers are attached; `None`: the engine's default bridge.
    network: Option<OverlayNetwork>,
}

/// A bridge network whose containers take IPv6 addresses from this machine's
/// overlay subnet, so that every machine of the mesh reaches them by address
/// (the overlay routes the subnet here; the kernel forwards it to the
/// bridge). Containers also get an IPv4 address from the engine's pools, for
/// reaching the outside through the engine's NAT; only the IPv6 address is
/// reported, because only it means the same thing on every machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverlayNetwork {
    /// The engine's network name.
    pub name: String,
    /// The container range, `<prefix>/<len>`.
    pub subnet: String,
    /// The bridge's address in the range.
    pub gateway: std::net::Ipv6Addr,
}

impl DockerRuntime {
    /// Connects to the engine at [`DEFAULT_SOCKET`] and agrees on an API version.
    pub async fn connect() -> Result<Self, RuntimeError> {
        Self::connect_with_socket(Path::new(DEFAULT_SOCKET)).await
    }

    /// Connects to the engine listening on the Unix socket at `path` and agrees
    /// on an API version (bollard speaks a newer one than older engines accept).
    pub async fn connect_with_socket(path: &Path) -> Result<Self, RuntimeError> {
        let context = || format!("connect to the Docker engine at {}", path.display());
        let path_text = path.to_str().ok_or_else(|| RuntimeError::Engine {
            context: format!("{}: the socket path is not UTF-8", context()),
            source: None,
        })?;
        let docker = Docker::connect_with_unix(
            path_text,
            REQUEST_TIMEOUT.as_secs(),
            bollard::API_DEFAULT_VERSION,
        )
        .map_err(|error| classify(context(), error))?;
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|error| classify(context(), error))?;
        Ok(Self {
            docker,
            network: None,
        })
    }

    /// Attaches every container this runtime creates to `network`, and reports
    /// their addresses on it. [`Self::ensure_network`] creates it.
    pub fn on_network(mut self, network: OverlayNetwork) -> Self {
        self.network = Some(network);
        self
    }

    /// Creates the overlay network when absent. An existing network of that
    /// name is kept when its IPv6 range is this machine's, and refused
    /// otherwise: it holds containers Ployz must not renumber behind the
    /// operator's back.
    pub async fn ensure_network(&self) -> Result<(), RuntimeError> {
        let Some(network) = &self.network else {
            return Ok(());
        };
        let context = || format!("ensure network `{}`", network.name);
        match self.docker.inspect_network(&network.name, None).await {
            Ok(existing) => {
                let subnets: Vec<String> = existing
                    .ipam
                    .and_then(|ipam| ipam.config)
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|config| config.subnet)
                    .collect();
                if existing.enable_ipv6 == Some(true) && subnets.contains(&network.subnet) {
                    return Ok(());
                }
                Err(RuntimeError::Engine {
                    context: format!(
                        "{}: it exists with subnets {subnets:?} (IPv6 {}), not this machine's \
                         {}; move its containers and remove it (`docker network rm {}`)",
                        context(),
                        if existing.enable_ipv6 == Some(true) {
                            "on"
                        } else {
                            "off"
                        },
                        network.subnet,
                        network.name
                    ),
                    source: None,
                })
            }
            Err(error) if status(&error) == Some(404) => {
                let request = NetworkCreateRequest {
                    name: network.name.clone(),
                    driver: Some("bridge".to_owned()),
                    enable_ipv6: Some(true),
                    ipam: Some(Ipam {
                        config: Some(vec![IpamConfig {
                            subnet: Some(network.subnet.clone()),
                            gateway: Some(network.gateway.to_string()),
                            ..Default::default()
                        }]),
                        ..Default::default()
                    }),
                    labels: Some(
                        [(super::labels::MANAGED.to_owned(), "true".to_owned())]
                            .into_iter()
                            .collect(),
                    ),
                    ..Default::default()
                };
                match self.docker.create_network(request).await {
                    Ok(_) => Ok(()),
                    // Created meanwhile by a concurrent call: check it again.
                    Err(error) if status(&error) == Some(409) => {
                        Box::pin(self.ensure_network()).await
                    }
                    Err(error) => Err(classify(context(), error)),
                }
            }
            Err(error) => Err(classify(context(), error)),
        }
    }

    /// The network containers join, `None` for the default bridge.
    pub fn network(&self) -> Option<&OverlayNetwork> {
        self.network.as_ref()
    }

    fn network_name(&self) -> Option<&str> {
        self.network.as_ref().map(|network| network.name.as_str())
    }
}

impl DockerRuntime {
    /// The engine's version, asked now (an observation for `status`).
    pub async fn version(&self) -> Result<String, RuntimeError> {
        let version = self
            .docker
            .version()
            .await
            .map_err(|error| classify("ask the Docker engine its version".to_owned(), error))?;
        Ok(version
            .version
            .unwrap_or_else(|| "(unknown version)".to_owned()))
    }
}

impl ContainerRuntime for DockerRuntime {
    async fn image_exists(&self, image: &str) -> Result<bool, RuntimeError> {
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(error) if status(&error) == Some(404) => Ok(false),
            Err(error) => Err(classify(format!("inspect image `{image}`"), error)),
        }
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<ContainerId, RuntimeError> {
        let body = create_body(spec, self.network_name())?;
        let options = CreateContainerOptions {
            name: (!spec.name.is_empty()).then(|| spec.name.clone()),
            ..Default::default()
        };
        match self.docker.create_container(Some(options), body).await {
            Ok(created) => Ok(ContainerId(created.id)),
            Err(error) => Err(match (status(&error), &error) {
                (Some(409), _) => RuntimeError::NameInUse {
                    name: spec.name.clone(),
                },
                (Some(404), DockerError::DockerResponseServerError { message, .. })
                    if message.to_ascii_lowercase().contains("no such image") =>
                {
                    RuntimeError::ImageMissing {
                        image: spec.image.clone(),
                    }
                }
                _ => classify(format!("create container `{}`", spec.name), error),
            }),
        }
    }

    async fn start(&self, id: &ContainerId) -> Result<(), RuntimeError> {
        // 304 (already running) is a success for bollard.
        match self
            .docker
            .start_container(&id.0, None::<StartContainerOptions>)
            .await
        {
            Ok(()) => Ok(()),
            Err(error) if status(&error) == Some(404) => {
                Err(RuntimeError::NoSuchContainer { id: id.0.clone() })
            }
            Err(error) => Err(classify(format!("start container `{id}`"), error)),
        }
    }

    async fn stop(&self, id: &ContainerId, grace: Duration) -> Result<(), RuntimeError> {
        // The engine blocks until the container is down, which takes up to the
        // grace period: make sure the request outlives it.
        let needed = grace.saturating_add(STOP_SLACK);
        let patient;
        let docker = if needed > REQUEST_TIMEOUT {
            patient = self.docker.clone().with_timeout(needed);
            &patient
        } else {
            &self.docker
        };
        let options = StopContainerOptions {
            signal: None,
            t: Some(whole_seconds(grace)),
        };
        // 304 (already stopped) is a success for bollard; an absent container
        // is as stopped as it gets.
        match docker.stop_container(&id.0, Some(options)).await {
            Ok(()) => Ok(()),
            Err(error) if status(&error) == Some(404) => Ok(()),
            Err(error) => Err(classify(format!("stop container `{id}`"), error)),
        }
    }

    async fn remove(&self, id: &ContainerId) -> Result<(), RuntimeError> {
        let options = RemoveContainerOptions {
            force: true,
            // Anonymous volumes the image declared would otherwise leak.
            v: true,
            link: false,
        };
        match self.docker.remove_container(&id.0, Some(options)).await {
            Ok(()) => Ok(()),
            // 404: already gone. 409: another removal of it is in progress.
            Err(error) if matches!(status(&error), Some(404 | 409)) => Ok(()),
            Err(error) => Err(classify(format!("remove container `{id}`"), error)),
        }
    }

    async fn inspect(&self, id: &ContainerId) -> Result<Option<ContainerInfo>, RuntimeError> {
        match self
            .docker
            .inspect_container(&id.0, None::<InspectContainerOptions>)
            .await
        {
            Ok(response) => info_from_inspect(response, self.network_name()).map(Some),
            Err(error) if status(&error) == Some(404) => Ok(None),
            Err(error) => Err(classify(format!("inspect container `{id}`"), error)),
        }
    }

    async fn list(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<ContainerInfo>, RuntimeError> {
        let filters = (!labels.is_empty()).then(|| {
            let selectors = labels
                .iter()
                .map(|(key, value)| format!("{key}={value}"))
                .collect();
            [("label".to_owned(), selectors)].into_iter().collect()
        });
        let options = ListContainersOptions {
            all: true,
            filters,
            ..Default::default()
        };
        let summaries = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|error| classify("list containers", error))?;
        // The summary lacks the exit code and start time: inspect each one. A
        // container removed in between is simply no longer listed.
        let ids = summaries
            .into_iter()
            .filter_map(|summary| summary.id)
            .map(ContainerId);
        let inspected: Vec<Option<ContainerInfo>> = futures::stream::iter(ids)
            .map(|id| async move { self.inspect(&id).await })
            .buffered(LIST_CONCURRENCY)
            .try_collect()
            .await?;
        Ok(inspected.into_iter().flatten().collect())
    }

    async fn exec(
        &self,
        id: &ContainerId,
        command: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, RuntimeError> {
        let run = async {
            let options = CreateExecOptions {
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                cmd: Some(command.to_vec()),
                ..Default::default()
            };
            let exec = self
                .docker
                .create_exec(&id.0, options)
                .await
                .map_err(|error| exec_error(id, command, error))?;
            let started = self
                .docker
                .start_exec(&exec.id, Some(StartExecOptions::default()))
                .await
                .map_err(|error| exec_error(id, command, error))?;
            let StartExecResults::Attached {
                mut output,
                input: _input,
            } = started
            else {
                return Err(RuntimeError::Engine {
                    context: format!(
                        "exec `{}` in container `{id}`: the engine detached an attached exec",
                        command.join(" ")
                    ),
                    source: None,
                });
            };
            let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
            while let Some(frame) = output.next().await {
                match frame.map_err(|error| exec_error(id, command, error))? {
                    LogOutput::StdOut { message } | LogOutput::Console { message } => {
                        stdout.extend_from_slice(&message)
                    }
                    LogOutput::StdErr { message } => stderr.extend_from_slice(&message),
                    LogOutput::StdIn { .. } => {}
                }
            }
            // The output ends when the process does; the engine may record the
            // exit code a moment later.
            loop {
                let inspected = self
                    .docker
                    .inspect_exec(&exec.id)
                    .await
                    .map_err(|error| exec_error(id, command, error))?;
                match (inspected.running, inspected.exit_code) {
                    (Some(false), Some(exit_code)) => {
                        return Ok(ExecOutput {
                            exit_code,
                            stdout,
                            stderr,
                        });
                    }
                    _ => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        };
        // On timeout the command keeps running inside the container: the engine
        // has no call to kill an exec. Removing the container ends it.
        tokio::time::timeout(timeout, run)
            .await
            .unwrap_or_else(|_elapsed| {
                Err(RuntimeError::ExecTimeout {
                    id: id.0.clone(),
                    command: command.join(" "),
                    timeout,
                })
            })
    }
}

/// The engine's create request for `spec`, on `network` (the default bridge when `None`).
fn create_body(
    spec: &ContainerSpec,
    network: Option<&str>,
) -> Result<ContainerCreateBody, RuntimeError> {
    let binds = spec
        .mounts
        .iter()
        .map(bind)
        .collect::<Result<Vec<_>, _>>()?;
    let memory = spec
        .memory_bytes
        .map(|bytes| {
            i64::try_from(bytes)
                .map_err(|_| invalid(spec, "the memory limit does not fit the engine's range"))
        })
        .transpose()?;
    let nano_cpus = spec
        .cpu_millis
        .map(|millis| {
            millis
                .checked_mul(1_000_000)
                .and_then(|nanos| i64::try_from(nanos).ok())
                .ok_or_else(|| invalid(spec, "the CPU limit does not fit the engine's range"))
        })
        .transpose()?;
    let stop_timeout = i64::from(whole_seconds(spec.stop_grace));
    Ok(ContainerCreateBody {
        image: Some(spec.image.clone()),
        entrypoint: spec.entrypoint.clone(),
        cmd: spec.command.clone(),
        env: Some(
            spec.env
                .iter()
                .map(|(key, value)| format!("{key}={value}"))
                .collect(),
        ),
        labels: Some(
            spec.labels
                .iter()
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect(),
        ),
        stop_timeout: Some(stop_timeout),
        host_config: Some(HostConfig {
            binds: Some(binds),
            memory,
            nano_cpus,
            dns: Some(spec.dns.iter().map(IpAddr::to_string).collect()),
            dns_search: Some(spec.dns_search.clone()),
            network_mode: Some(network.unwrap_or("bridge").to_owned()),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// `host:container[:ro]`, the engine's bind syntax.
fn bind(mount: &Mount) -> Result<String, RuntimeError> {
    // The engine reads a relative source as the name of a volume and creates
    // it silently; a bind must name a host directory.
    if !mount.host_path.is_absolute() {
        return Err(RuntimeError::Engine {
            context: format!(
                "mount source `{}` is not an absolute host path",
                mount.host_path.display()
            ),
            source: None,
        });
    }
    let host = mount
        .host_path
        .to_str()
        .ok_or_else(|| RuntimeError::Engine {
            context: format!("mount source `{}` is not UTF-8", mount.host_path.display()),
            source: None,
        })?;
    let mode = if mount.read_only { ":ro" } else { "" };
    Ok(format!("{host}:{}{mode}", mount.container_path))
}

fn invalid(spec: &ContainerSpec, why: &str) -> RuntimeError {
    RuntimeError::Engine {
        context: format!("create container `{}`: {why}", spec.name),
        source: None,
    }
}

/// The engine counts stop timeouts in whole seconds; round up so the process
/// always gets at least the grace it was promised.
fn whole_seconds(grace: Duration) -> i32 {
    let seconds = grace.as_secs() + u64::from(grace.subsec_nanos() > 0);
    i32::try_from(seconds).unwrap_or(i32::MAX)
}

/// What the engine said about a container, in the runtime's terms. On the
/// overlay network (`network`), only its IPv6 addresses are reported.
fn info_from_inspect(
    response: ContainerInspectResponse,
    network: Option<&str>,
) -> Result<ContainerInfo, RuntimeError> {
    let id = response.id.ok_or_else(|| RuntimeError::Engine {
        context: "inspect container: the engine's answer has no id".to_owned(),
        source: None,
    })?;
    let config = response.config.unwrap_or_default();
    let engine_state = response.state.unwrap_or_default();
    let state = match engine_state.status {
        Some(ContainerStateStatusEnum::CREATED) => ContainerState::Created,
        Some(ContainerStateStatusEnum::RUNNING) => ContainerState::Running,
        Some(ContainerStateStatusEnum::EXITED) => ContainerState::Exited,
        Some(
            ContainerStateStatusEnum::EMPTY
            | ContainerStateStatusEnum::PAUSED
            | ContainerStateStatusEnum::RESTARTING
            | ContainerStateStatusEnum::REMOVING
            | ContainerStateStatusEnum::DEAD
            | ContainerStateStatusEnum::STOPPING,
        )
        | None => ContainerState::Other,
    };
    let networks = response
        .network_settings
        .and_then(|settings| settings.networks)
        .unwrap_or_default();
    let overlay = network
        .and_then(|name| networks.get(name))
        .and_then(|endpoint| {
            endpoint
                .global_ipv6_address
                .as_deref()
                .and_then(|address| address.parse::<IpAddr>().ok())
        });
    let mut addresses: Vec<IpAddr> = match overlay {
        Some(address) => vec![address],
        None => networks
            .into_values()
            .flat_map(|endpoint| [endpoint.ip_address, endpoint.global_ipv6_address])
            .flatten()
            .filter_map(|address| address.parse().ok())
            .collect(),
    };
    addresses.sort();
    addresses.dedup();
    Ok(ContainerInfo {
        id: ContainerId(id),
        name: response
            .name
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_owned(),
        // The reference the container was created from, not the image id.
        image: config.image.or(response.image).unwrap_or_default(),
        labels: config.labels.unwrap_or_default().into_iter().collect(),
        state,
        exit_code: (state == ContainerState::Exited)
            .then_some(engine_state.exit_code)
            .flatten(),
        started_at: engine_state
            .started_at
            .filter(|started| !started.is_empty() && !started.starts_with(ZERO_TIME_PREFIX)),
        addresses,
    })
}

/// The HTTP status of an engine answer, when the failure was one.
fn status(error: &DockerError) -> Option<u16> {
    if let DockerError::DockerResponseServerError { status_code, .. } = error {
        Some(*status_code)
    } else {
        None
    }
}

fn exec_error(id: &ContainerId, command: &[String], error: DockerError) -> RuntimeError {
    match status(&error) {
        Some(404) => RuntimeError::NoSuchContainer { id: id.0.clone() },
        // "Container … is not running" (or paused).
        Some(409) => RuntimeError::NotRunning { id: id.0.clone() },
        _ => classify(
            format!("exec `{}` in container `{id}`", command.join(" ")),
            error,
        ),
    }
}

/// `Unavailable` when the engine could not be reached (retry later), `Engine`
/// when it answered with a failure.
fn classify(context: impl Into<String>, error: DockerError) -> RuntimeError {
    let context = context.into();
    let unreachable = matches!(
        error,
        DockerError::SocketNotFoundError(_)
            | DockerError::IOError { .. }
            | DockerError::HyperLegacyError { .. }
            | DockerError::HyperResponseError { .. }
            | DockerError::RequestTimeoutError
    ) || status(&error) == Some(503);
    let source = Some(Box::new(error) as Box<dyn std::error::Error + Send + Sync>);
    if unreachable {
        RuntimeError::Unavailable { context, source }
    } else {
        RuntimeError::Engine { context, source }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use bollard::models::{
        ContainerConfig, ContainerState as EngineState, EndpointSettings, NetworkSettings,
    };

    use super::*;

    fn mount(host: &str, container: &str, read_only: bool) -> Mount {
        Mount {
            host_path: PathBuf::from(host),
            container_path: container.to_owned(),
            read_only,
        }
    }

    #[test]
    fn binds_use_the_engine_syntax() {
        assert_eq!(
            bind(&mount("/srv/a", "/data", false)).expect("a valid bind"),
            "/srv/a:/data"
        );
        assert_eq!(
            bind(&mount("/srv/a", "/data", true)).expect("a valid bind"),
            "/srv/a:/data:ro"
        );
    }

    #[test]
    fn relative_bind_sources_are_refused() {
        assert!(matches!(
            bind(&mount("srv/a", "/data", false)),
            Err(RuntimeError::Engine { .. })
        ));
    }

    #[test]
    fn grace_rounds_up_to_whole_seconds() {
        assert_eq!(whole_seconds(Duration::ZERO), 0);
        assert_eq!(whole_seconds(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds(Duration::from_secs(2)), 2);
        assert_eq!(whole_seconds(Duration::from_millis(2500)), 3);
    }

    #[test]
    fn create_body_carries_the_spec() {
        let spec = ContainerSpec {
            name: "web-0".to_owned(),
            image: "example:1".to_owned(),
            command: Some(vec!["httpd".to_owned(), "-f".to_owned()]),
            env: [("A".to_owned(), "1".to_owned())].into(),
            labels: [("ployz.managed".to_owned(), "true".to_owned())].into(),
            mounts: vec![mount("/srv/a", "/data", true)],
            memory_bytes: Some(64 << 20),
            cpu_millis: Some(500),
            stop_grace: Duration::from_millis(1500),
            dns: vec!["10.0.0.53".parse().expect("an IP address")],
            dns_search: vec!["shop.ployz.internal".to_owned()],
            ..Default::default()
        };
        let body = create_body(&spec, None).expect("a valid spec");
        assert_eq!(body.image.as_deref(), Some("example:1"));
        assert_eq!(body.entrypoint, None);
        assert_eq!(body.env, Some(vec!["A=1".to_owned()]));
        assert_eq!(body.stop_timeout, Some(2));
        let host = body.host_config.expect("a host config");
        assert_eq!(host.binds, Some(vec!["/srv/a:/data:ro".to_owned()]));
        assert_eq!(host.memory, Some(64 << 20));
        assert_eq!(host.nano_cpus, Some(500_000_000));
        assert_eq!(host.dns, Some(vec!["10.0.0.53".to_owned()]));
        assert_eq!(host.network_mode.as_deref(), Some("bridge"));
        let on_overlay = create_body(&spec, Some("ployz")).expect("a valid spec");
        let host = on_overlay.host_config.expect("a host config");
        assert_eq!(host.network_mode.as_deref(), Some("ployz"));
    }

    #[test]
    fn on_the_overlay_network_only_the_overlay_address_is_reported() {
        let endpoint = |ipv4: &str, ipv6: &str| EndpointSettings {
            ip_address: Some(ipv4.to_owned()),
            global_ipv6_address: Some(ipv6.to_owned()),
            ..Default::default()
        };
        let response = ContainerInspectResponse {
            id: Some("abc".to_owned()),
            network_settings: Some(NetworkSettings {
                networks: Some(
                    [
                        (
                            "ployz".to_owned(),
                            endpoint("172.18.0.2", "fd00:1:2:3:1::2"),
                        ),
                        ("other".to_owned(), endpoint("172.19.0.2", "")),
                    ]
                    .into(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        };
        let overlay = info_from_inspect(response.clone(), Some("ployz")).expect("an answer");
        assert_eq!(
            overlay.addresses,
            vec!["fd00:1:2:3:1::2".parse::<IpAddr>().expect("an IP address")]
        );
        let everything = info_from_inspect(response, None).expect("an answer");
        assert_eq!(everything.addresses.len(), 3);
    }

    #[test]
    fn inspect_maps_state_addresses_and_the_zero_start_time() {
        let response = |status, started: &str, ip: &str| ContainerInspectResponse {
            id: Some("abc".to_owned()),
            name: Some("/web-0".to_owned()),
            image: Some("sha256:feed".to_owned()),
            config: Some(ContainerConfig {
                image: Some("example:1".to_owned()),
                labels: Some([("k".to_owned(), "v".to_owned())].into()),
                ..Default::default()
            }),
            state: Some(EngineState {
                status: Some(status),
                exit_code: Some(137),
                started_at: Some(started.to_owned()),
                ..Default::default()
            }),
            network_settings: Some(NetworkSettings {
                networks: Some(
                    [(
                        "bridge".to_owned(),
                        EndpointSettings {
                            ip_address: Some(ip.to_owned()),
                            global_ipv6_address: Some(String::new()),
                            ..Default::default()
                        },
                    )]
                    .into(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        };

        let created = info_from_inspect(
            response(
                ContainerStateStatusEnum::CREATED,
                "0001-01-01T00:00:00Z",
                "",
            ),
            None,
        )
        .expect("a complete inspect answer");
        assert_eq!(created.name, "web-0");
        assert_eq!(created.image, "example:1");
        assert_eq!(created.state, ContainerState::Created);
        assert_eq!(created.exit_code, None);
        assert_eq!(created.started_at, None);
        assert!(created.addresses.is_empty());

        let running = info_from_inspect(
            response(
                ContainerStateStatusEnum::RUNNING,
                "2025-01-01T00:00:00.5Z",
                "172.17.0.2",
            ),
            None,
        )
        .expect("a complete inspect answer");
        assert_eq!(running.state, ContainerState::Running);
        assert_eq!(running.exit_code, None);
        assert_eq!(
            running.started_at.as_deref(),
            Some("2025-01-01T00:00:00.5Z")
        );
        assert_eq!(
            running.addresses,
            vec!["172.17.0.2".parse::<IpAddr>().expect("an IP address")]
        );
        assert_eq!(running.labels.get("k").map(String::as_str), Some("v"));

        let exited = info_from_inspect(
            response(ContainerStateStatusEnum::EXITED, "2025-01-01T00:00:00Z", ""),
            None,
        )
        .expect("a complete inspect answer");
        assert_eq!(exited.state, ContainerState::Exited);
        assert_eq!(exited.exit_code, Some(137));

        let dead = info_from_inspect(
            response(ContainerStateStatusEnum::DEAD, "2025-01-01T00:00:00Z", ""),
            None,
        )
        .expect("a complete inspect answer");
        assert_eq!(dead.state, ContainerState::Other);
    }

    #[test]
    fn engine_failures_keep_their_kind() {
        let refused = DockerError::IOError {
            err: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        };
        assert!(classify("x", refused).is_retryable());
        let answered = DockerError::DockerResponseServerError {
            status_code: 500,
            message: "boom".to_owned(),
        };
        assert!(!classify("x", answered).is_retryable());
    }
}
