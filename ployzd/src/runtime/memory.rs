//! An in-memory [`ContainerRuntime`] for tests: containers are records, no
//! process runs. It answers like the Docker backend does in the same
//! situations (the same errors, states, exit codes and address lifetimes) and
//! is held to the same contract suite. What it cannot know (what a command
//! prints, how a process reacts to SIGTERM) tests tell it up front.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use super::{
    ContainerId, ContainerInfo, ContainerRuntime, ContainerSpec, ContainerState, ExecOutput,
    RuntimeError,
};

/// The smallest memory limit the Docker engine accepts.
const MIN_MEMORY_BYTES: u64 = 6 * 1024 * 1024;

/// Exit code of a process killed by SIGKILL (128 + 9), as the engine reports it.
const KILLED_EXIT_CODE: i64 = 137;
/// Exit code of a process ended by SIGTERM (128 + 15).
const TERMINATED_EXIT_CODE: i64 = 143;

/// How the fake's container processes react to the SIGTERM that `stop` sends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TermBehaviour {
    /// The process exits at once (exit code 143), so `stop` returns immediately.
    #[default]
    ExitOnTerm,
    /// The process ignores SIGTERM, like `sh` or `sleep` as PID 1: `stop` waits
    /// the whole grace period, then kills it (exit code 137).
    IgnoreTerm,
}

/// What an `exec` of a given command does in the fake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExecReply {
    /// The command finishes with this output.
    Output(ExecOutput),
    /// The command never finishes: the exec runs into its timeout.
    Hang,
}

/// Containers as records in memory. Cloning shares the state.
#[derive(Clone, Debug, Default)]
pub struct MemoryRuntime {
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    images: BTreeSet<String>,
    /// By id.
    containers: BTreeMap<String, Container>,
    /// Creation counter: ids, default names and newest-first listing.
    created: u64,
    exec_replies: HashMap<Vec<String>, ExecReply>,
    term: TermBehaviour,
}

#[derive(Debug)]
struct Container {
    sequence: u64,
    name: String,
    spec: ContainerSpec,
    state: ContainerState,
    exit_code: Option<i64>,
    started_at: Option<String>,
    /// Only while running, like a bridge address.
    address: Option<IpAddr>,
}

impl MemoryRuntime {
    /// An engine with no images and no containers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `image` present; a reference without a tag means `:latest`, as on Docker.
    pub fn add_image(&self, image: &str) {
        self.lock().images.insert(normalize_image(image));
    }

    /// Makes `image` absent again (containers made from it keep existing).
    pub fn remove_image(&self, image: &str) {
        self.lock().images.remove(&normalize_image(image));
    }

    /// What `exec` of exactly `command` does from now on. Commands without a
    /// reply succeed with no output.
    pub fn set_exec_reply(&self, command: &[&str], reply: ExecReply) {
        let command = command.iter().map(|part| (*part).to_owned()).collect();
        self.lock().exec_replies.insert(command, reply);
    }

    /// How every container's process reacts to SIGTERM from now on.
    pub fn set_term_behaviour(&self, behaviour: TermBehaviour) {
        self.lock().term = behaviour;
    }

    /// The specification a container was created with, `None` when it does not exist.
    pub fn spec(&self, id: &ContainerId) -> Option<ContainerSpec> {
        let state = self.lock();
        state
            .resolve(id)
            .map(|key| state.containers[key].spec.clone())
    }

    /// Makes a running container's process exit by itself with `exit_code`
    /// (a crash, or a command that finished). No effect unless it runs.
    pub fn exit(&self, id: &ContainerId, exit_code: i64) {
        let mut state = self.lock();
        if let Some(key) = state.resolve(id).map(str::to_owned)
            && let Some(container) = state.containers.get_mut(&key)
            && container.state == ContainerState::Running
        {
            container.halt(exit_code);
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No invariant spans a panic: every update is one assignment group.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    /// The id of the container `id` names: its id, its name or a unique id
    /// prefix, as the engine accepts.
    fn resolve(&self, id: &ContainerId) -> Option<&str> {
        let wanted = id.0.as_str();
        if wanted.is_empty() {
            return None;
        }
        if let Some((key, _)) = self.containers.get_key_value(wanted) {
            return Some(key);
        }
        if let Some((key, _)) = self
            .containers
            .iter()
            .find(|(_, container)| container.name == wanted)
        {
            return Some(key);
        }
        let mut prefixed = self.containers.keys().filter(|key| key.starts_with(wanted));
        match (prefixed.next(), prefixed.next()) {
            (Some(key), None) => Some(key),
            _ => None,
        }
    }

    /// The lowest free address on the fake bridge, 172.17.0.2 upwards.
    fn free_address(&self) -> Result<IpAddr, RuntimeError> {
        let used: BTreeSet<IpAddr> = self
            .containers
            .values()
            .filter_map(|container| container.address)
            .collect();
        (u32::from(Ipv4Addr::new(172, 17, 0, 2))..u32::from(Ipv4Addr::new(172, 17, 255, 255)))
            .map(|bits| IpAddr::V4(Ipv4Addr::from(bits)))
            .find(|address| !used.contains(address))
            .ok_or_else(|| RuntimeError::Engine {
                context: "no free address left on the bridge network".to_owned(),
                source: None,
            })
    }
}

impl Container {
    fn info(&self, id: &str) -> ContainerInfo {
        ContainerInfo {
            id: ContainerId(id.to_owned()),
            name: self.name.clone(),
            image: self.spec.image.clone(),
            labels: self.spec.labels.clone(),
            state: self.state,
            exit_code: self.exit_code,
            started_at: self.started_at.clone(),
            addresses: self.address.into_iter().collect(),
        }
    }

    fn halt(&mut self, exit_code: i64) {
        self.state = ContainerState::Exited;
        self.exit_code = Some(exit_code);
        self.address = None;
    }
}

impl ContainerRuntime for MemoryRuntime {
    async fn image_exists(&self, image: &str) -> Result<bool, RuntimeError> {
        Ok(self.lock().images.contains(&normalize_image(image)))
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<ContainerId, RuntimeError> {
        let mut state = self.lock();
        // The engine checks the settings, then the image, then the name.
        if let Some(bytes) = spec.memory_bytes
            && bytes < MIN_MEMORY_BYTES
        {
            return Err(invalid(spec, "the minimum memory limit is 6MB"));
        }
        for mount in &spec.mounts {
            if !mount.host_path.is_absolute() {
                return Err(RuntimeError::Engine {
                    context: format!(
                        "mount source `{}` is not an absolute host path",
                        mount.host_path.display()
                    ),
                    source: None,
                });
            }
            if !mount.container_path.starts_with('/') {
                return Err(invalid(spec, "mount targets must be absolute paths"));
            }
        }
        if !state.images.contains(&normalize_image(&spec.image)) {
            return Err(RuntimeError::ImageMissing {
                image: spec.image.clone(),
            });
        }
        state.created += 1;
        let sequence = state.created;
        let name = if spec.name.is_empty() {
            format!("memory_{sequence}")
        } else {
            spec.name.clone()
        };
        if !valid_container_name(&name) {
            return Err(invalid(spec, "names are [a-zA-Z0-9][a-zA-Z0-9_.-]+"));
        }
        if state
            .containers
            .values()
            .any(|container| container.name == name)
        {
            return Err(RuntimeError::NameInUse { name });
        }
        // 64 hex digits like the engine's ids; unique within this fake.
        let id = format!("{sequence:064x}");
        state.containers.insert(
            id.clone(),
            Container {
                sequence,
                name,
                spec: spec.clone(),
                state: ContainerState::Created,
                exit_code: None,
                started_at: None,
                address: None,
            },
        );
        Ok(ContainerId(id))
    }

    async fn start(&self, id: &ContainerId) -> Result<(), RuntimeError> {
        let mut state = self.lock();
        let key = state
            .resolve(id)
            .map(str::to_owned)
            .ok_or_else(|| RuntimeError::NoSuchContainer { id: id.0.clone() })?;
        if state.containers[&key].state == ContainerState::Running {
            return Ok(());
        }
        let address = state.free_address()?;
        let container = state
            .containers
            .get_mut(&key)
            .expect("resolve returned an existing key");
        container.state = ContainerState::Running;
        container.exit_code = None;
        container.started_at = Some(rfc3339(SystemTime::now()));
        container.address = Some(address);
        Ok(())
    }

    async fn stop(&self, id: &ContainerId, grace: Duration) -> Result<(), RuntimeError> {
        let key = {
            let mut state = self.lock();
            let term = state.term;
            let Some(key) = state.resolve(id).map(str::to_owned) else {
                return Ok(());
            };
            let container = state
                .containers
                .get_mut(&key)
                .expect("resolve returned an existing key");
            if container.state != ContainerState::Running {
                return Ok(());
            }
            if term == TermBehaviour::ExitOnTerm && !grace.is_zero() {
                container.halt(TERMINATED_EXIT_CODE);
                return Ok(());
            }
            key
        };
        // The process ignores SIGTERM: the engine waits out the grace (in whole
        // seconds, as it counts them), then kills it.
        let whole_seconds = grace.as_secs() + u64::from(grace.subsec_nanos() > 0);
        tokio::time::sleep(Duration::from_secs(whole_seconds)).await;
        let mut state = self.lock();
        if let Some(container) = state.containers.get_mut(&key)
            && container.state == ContainerState::Running
        {
            container.halt(KILLED_EXIT_CODE);
        }
        Ok(())
    }

    async fn remove(&self, id: &ContainerId) -> Result<(), RuntimeError> {
        let mut state = self.lock();
        if let Some(key) = state.resolve(id).map(str::to_owned) {
            state.containers.remove(&key);
        }
        Ok(())
    }

    async fn inspect(&self, id: &ContainerId) -> Result<Option<ContainerInfo>, RuntimeError> {
        let state = self.lock();
        Ok(state.resolve(id).map(|key| state.containers[key].info(key)))
    }

    async fn list(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<ContainerInfo>, RuntimeError> {
        let state = self.lock();
        let mut matching: Vec<(&String, &Container)> = state
            .containers
            .iter()
            .filter(|(_, container)| {
                labels
                    .iter()
                    .all(|(key, value)| container.spec.labels.get(key) == Some(value))
            })
            .collect();
        // Newest first, as the engine lists them.
        matching.sort_by_key(|(_, container)| std::cmp::Reverse(container.sequence));
        Ok(matching
            .into_iter()
            .map(|(id, container)| container.info(id))
            .collect())
    }

    async fn exec(
        &self,
        id: &ContainerId,
        command: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, RuntimeError> {
        let reply = {
            let state = self.lock();
            let key = state
                .resolve(id)
                .ok_or_else(|| RuntimeError::NoSuchContainer { id: id.0.clone() })?;
            if state.containers[key].state != ContainerState::Running {
                return Err(RuntimeError::NotRunning { id: id.0.clone() });
            }
            state.exec_replies.get(command).cloned()
        };
        match reply {
            Some(ExecReply::Output(output)) => Ok(output),
            None => Ok(ExecOutput {
                exit_code: 0,
                stdout: Vec::new(),
                stderr: Vec::new(),
            }),
            Some(ExecReply::Hang) => {
                tokio::time::sleep(timeout).await;
                Err(RuntimeError::ExecTimeout {
                    id: id.0.clone(),
                    command: command.join(" "),
                    timeout,
                })
            }
        }
    }
}

fn invalid(spec: &ContainerSpec, why: &str) -> RuntimeError {
    RuntimeError::Engine {
        context: format!("create container `{}`: {why}", spec.name),
        source: None,
    }
}

/// `name` with `:latest` when it names no tag or digest, as the engine reads it.
fn normalize_image(image: &str) -> String {
    let last_component = image.rsplit('/').next().unwrap_or(image);
    if last_component.contains(':') || last_component.contains('@') {
        image.to_owned()
    } else {
        format!("{image}:latest")
    }
}

/// The engine's rule for container names: `[a-zA-Z0-9][a-zA-Z0-9_.-]+`.
fn valid_container_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|first| first.is_ascii_alphanumeric())
        && name.len() >= 2
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// `time` in RFC 3339 with nanoseconds, UTC, as the engine writes start times.
fn rfc3339(time: SystemTime) -> String {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let seconds = since_epoch.as_secs();
    let days = i64::try_from(seconds / 86_400).expect("days since 1970 fit in i64");
    let of_day = seconds % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60,
        since_epoch.subsec_nanos()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_without_a_tag_mean_latest() {
        assert_eq!(normalize_image("web"), "web:latest");
        assert_eq!(normalize_image("web:1"), "web:1");
        assert_eq!(
            normalize_image("localhost:5000/web"),
            "localhost:5000/web:latest"
        );
        assert_eq!(normalize_image("web@sha256:ab"), "web@sha256:ab");
    }

    #[test]
    fn container_names_follow_the_engine_rule() {
        assert!(valid_container_name("web-0"));
        assert!(valid_container_name("a.b_c"));
        assert!(!valid_container_name("-web"));
        assert!(!valid_container_name("w"));
        assert!(!valid_container_name("web/0"));
    }

    #[test]
    fn start_times_are_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
        let leap_day = UNIX_EPOCH + Duration::new(951_782_400 + 3_723, 5);
        assert_eq!(rfc3339(leap_day), "2000-02-29T01:02:03.000000005Z");
        let new_year = UNIX_EPOCH + Duration::from_secs(1_735_689_599);
        assert_eq!(rfc3339(new_year), "2024-12-31T23:59:59.000000000Z");
    }

    #[tokio::test]
    async fn ids_resolve_by_name_and_unique_prefix_and_keep_the_spec() {
        let runtime = MemoryRuntime::new();
        runtime.add_image("example");
        let spec = ContainerSpec {
            name: "web-0".to_owned(),
            image: "example:latest".to_owned(),
            mounts: vec![super::super::Mount {
                host_path: "/srv/web".into(),
                container_path: "/data".to_owned(),
                read_only: false,
            }],
            ..Default::default()
        };
        let id = runtime.create(&spec).await.expect("create");
        let by_name = runtime
            .inspect(&ContainerId("web-0".to_owned()))
            .await
            .expect("inspect")
            .expect("the container exists");
        assert_eq!(by_name.id, id);
        let prefix = ContainerId(id.0[..60].to_owned());
        assert_eq!(
            runtime
                .inspect(&prefix)
                .await
                .expect("inspect")
                .expect("the container exists")
                .id,
            id
        );
        assert_eq!(runtime.spec(&id), Some(spec));
    }

    #[tokio::test]
    async fn exited_processes_free_their_address() {
        let runtime = MemoryRuntime::new();
        runtime.add_image("example");
        let spec = |name: &str| ContainerSpec {
            name: name.to_owned(),
            image: "example".to_owned(),
            ..Default::default()
        };
        let first = runtime.create(&spec("one")).await.expect("create");
        let second = runtime.create(&spec("two")).await.expect("create");
        runtime.start(&first).await.expect("start");
        runtime.start(&second).await.expect("start");
        let address = |info: Option<ContainerInfo>| info.expect("the container exists").addresses;
        assert_eq!(
            address(runtime.inspect(&first).await.expect("inspect")),
            vec!["172.17.0.2".parse::<IpAddr>().expect("an IP address")]
        );
        assert_eq!(
            address(runtime.inspect(&second).await.expect("inspect")),
            vec!["172.17.0.3".parse::<IpAddr>().expect("an IP address")]
        );
        runtime.exit(&first, 1);
        let exited = runtime
            .inspect(&first)
            .await
            .expect("inspect")
            .expect("the container exists");
        assert_eq!(
            (exited.state, exited.exit_code),
            (ContainerState::Exited, Some(1))
        );
        assert!(exited.addresses.is_empty());
        runtime.start(&first).await.expect("start");
        assert_eq!(
            address(runtime.inspect(&first).await.expect("inspect")),
            vec!["172.17.0.2".parse::<IpAddr>().expect("an IP address")]
        );
    }
}
