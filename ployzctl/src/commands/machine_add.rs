//! `ployzctl machine add`: brings machines into this machine's network over
//! SSH. Each target goes through named steps; a failure names its step and
//! leaves the target retryable, because every step either checks before it
//! acts or is idempotent on both sides:
//!
//! 1. `connect`: one SSH session runs a read-only probe of the host.
//! 2. `preflight`: Linux, root, TUN, a Docker engine, free ports, not a
//!    member of another network (judged from the probe; nothing changed yet).
//! 3. `install`: copies this build's binaries whose checksum differs.
//! 4. `start`: starts ployzd there unless it answers.
//! 5. `prepare`: the target reports its machine id and WireGuard key.
//! 6. `admit`: this machine claims the target's subnet, records it
//!    `joining` and adds it as a peer; the answer is the join ticket.
//! 7. `join`: the target takes the ticket, brings up its tunnel and NATS.
//! 8. `activate`: this machine waits for the handshake and the target's NATS,
//!    then records it `active`.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use ployz_api::{ApiError, ErrorClass, v1};
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use tokio::{io::AsyncWriteExt as _, process::Command};

use super::{Context, OPERATION_TIMEOUT, READ_TIMEOUT};

/// The binaries a machine runs, installed side by side.
const BINARIES: [&str; 6] = [
    "ployzd",
    "ployzctl",
    "ployz-tunnel",
    "ployz-gateway",
    "ployz-dns",
    "nats-server",
];
/// Where binaries go on the target unless its environment says otherwise.
const DEFAULT_BIN_DIR: &str = "/usr/local/lib/ployz/bin";
/// Bound on the SSH connection itself.
const SSH_CONNECT_TIMEOUT_SECS: u32 = 10;
/// Ports a fresh target must have free: WireGuard (UDP), NATS and the peer API (TCP).
const UDP_PORTS: [u16; 1] = [51820];
const TCP_PORTS: [u16; 4] = [4722, 4723, 4724, 4725];

/// What `machine add` reports per target.
#[derive(Debug, Serialize)]
pub struct AddResult {
    pub target: String,
    /// `added` or `already_member`.
    pub outcome: String,
    pub machine_id: String,
    pub hostname: String,
    pub overlay_address: String,
    pub subnet: String,
    pub endpoint: String,
    pub handshake_unix_ms: u64,
    pub store_servers: u32,
    pub store_replicas: u32,
    /// `core` or `leaf`: its part in the replicated store.
    pub store_role: String,
    /// Binaries copied (those whose checksum differed).
    pub installed: Vec<String>,
}

/// How to reach targets.
pub struct SshOptions {
    pub identity: Option<PathBuf>,
    pub options: Vec<String>,
}

pub async fn add(
    context: &Context<'_>,
    network: &str,
    targets: &[String],
    ssh: &SshOptions,
    timeout: Duration,
) -> Result<(), ApiError> {
    ployz_api::names::check_network_name(network)
        .map_err(|message| ApiError::new(ErrorClass::Usage, "invalid_network_name", message))?;
    for option in &ssh.options {
        if !option.contains('=') || option.starts_with('-') {
            return Err(ApiError::new(
                ErrorClass::Usage,
                "invalid_ssh_option",
                format!("`{option}` is not an ssh option; write KEY=VALUE as for `ssh -o`"),
            ));
        }
    }
    for target in targets {
        if target.is_empty() || target.starts_with('-') || target.contains(char::is_whitespace) {
            return Err(ApiError::new(
                ErrorClass::Usage,
                "invalid_target",
                format!("`{target}` is not an SSH target; write [user@]host"),
            ));
        }
    }
    // This machine must be a member of `network` before anything is touched.
    let mut client = context.client(READ_TIMEOUT).await?;
    let status = client
        .status(v1::StatusRequest {})
        .await
        .map_err(|e| context.call_error(e))?
        .into_inner();
    let local_network = status
        .cluster
        .as_ref()
        .map(|cluster| cluster.network.clone())
        .unwrap_or_default();
    if local_network.is_empty() {
        return Err(ApiError::new(
            ErrorClass::PreconditionFailed,
            "not_initialized",
            "this machine is not part of a network; run `ployzctl mesh init <network>` first",
        ));
    }
    if local_network != network {
        return Err(ApiError::new(
            ErrorClass::PreconditionFailed,
            "network_mismatch",
            format!("this machine belongs to network `{local_network}`, not `{network}`"),
        ));
    }
    let binaries = local_binaries()?;
    let mut results = Vec::new();
    let mut failure = None;
    for target in targets {
        let adder = Adder {
            context,
            target,
            ssh,
            network,
            timeout,
        };
        match adder.run(&binaries).await {
            Ok(result) => results.push(result),
            Err(error) => {
                failure = Some(ApiError::new(
                    error.class,
                    error.code.clone(),
                    format!("{target}: {}", error.message),
                ));
                // The targets after a failed one are left alone: the
                // operator reruns the same command once the cause is fixed.
                break;
            }
        }
    }
    // Targets added before a failure stay added: report them either way
    // (stdout), and the failure as usual (stderr, exit status).
    if let Some(error) = failure {
        if !results.is_empty() {
            emit_results(context, &results);
        }
        return Err(error);
    }
    emit_results(context, &results);
    Ok(())
}

fn emit_results(context: &Context<'_>, results: &[AddResult]) {
    context.output.emit(&results, || {
        let mut text = String::new();
        for result in results {
            let what = if result.outcome == "already_member" {
                "already a member; nothing changed"
            } else {
                "added"
            };
            text.push_str(&format!(
                "{}: {what}\n  machine   {} ({})\n  overlay   {} (subnet {})\n  endpoint  {}\n  handshake {}\n  store     {} ({} servers, {} replicas)\n",
                result.target,
                result.machine_id,
                result.hostname,
                result.overlay_address,
                result.subnet,
                result.endpoint,
                crate::output::timestamp(result.handshake_unix_ms),
                result.store_role,
                result.store_servers,
                result.store_replicas,
            ));
        }
        text
    });
}

/// One local binary to install: its name, path and checksum.
struct Binary {
    name: &'static str,
    path: PathBuf,
    sha256: String,
}

/// The binaries of this build: beside ployzctl, nats-server also from
/// `$PLOYZ_NATS_BIN`, the project's `.tools` or PATH.
fn local_binaries() -> Result<Vec<Binary>, ApiError> {
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    BINARIES
        .iter()
        .map(|name| {
            let mut candidates = vec![exe_dir.join(name)];
            if *name == "nats-server" {
                if let Some(path) = std::env::var_os("PLOYZ_NATS_BIN").filter(|p| !p.is_empty()) {
                    candidates.insert(0, PathBuf::from(path));
                }
                for ancestor in exe_dir.ancestors() {
                    candidates.push(ancestor.join(".tools/nats/bin/nats-server"));
                }
                if let Some(path) = std::env::var_os("PATH") {
                    candidates.extend(std::env::split_paths(&path).map(|dir| dir.join(name)));
                }
            }
            let path = candidates
                .into_iter()
                .find(|path| path.is_file())
                .ok_or_else(|| {
                    ApiError::new(
                        ErrorClass::PreconditionFailed,
                        "binary_not_found",
                        format!(
                            "cannot find `{name}` beside ployzctl ({}) to install on the targets; build the workspace first",
                            exe_dir.display()
                        ),
                    )
                })?;
            let bytes = std::fs::read(&path).map_err(|error| {
                ApiError::new(
                    ErrorClass::Internal,
                    "binary_unreadable",
                    format!("cannot read {}: {error}", path.display()),
                )
            })?;
            Ok(Binary {
                name,
                path,
                sha256: hex::encode(Sha256::digest(&bytes)),
            })
        })
        .collect()
}

/// Facts the read-only probe found on the target.
#[derive(Debug, Default)]
struct Probe {
    /// `SSH_CONNECTION`: client ip, client port, server ip, server port.
    ssh_connection: String,
    os: String,
    kernel: String,
    uid: String,
    tun: bool,
    docker: bool,
    docker_socket: String,
    bin_dir: String,
    udp_ports: Vec<u16>,
    tcp_listen_ports: Vec<u16>,
    checksums: Vec<(String, String)>,
}

/// The probe: prints `key=value` lines, changes nothing.
const PROBE_SCRIPT: &str = r#"
echo "ssh_connection=${SSH_CONNECTION:-}"
echo "os=$(uname -s)"
echo "kernel=$(uname -r)"
echo "uid=$(id -u)"
if [ -c /dev/net/tun ] && (exec 3<>/dev/net/tun) 2>/dev/null; then echo tun=yes; else echo tun=no; fi
sock="${PLOYZ_DOCKER_SOCKET:-/var/run/docker.sock}"
echo "docker_socket=$sock"
if [ -S "$sock" ]; then echo docker=yes; else echo docker=no; fi
bin="${PLOYZ_BIN_DIR:-/usr/local/lib/ployz/bin}"
echo "bin_dir=$bin"
for f in /proc/net/udp /proc/net/udp6; do [ -r "$f" ] && awk 'NR>1 {split($2,a,":"); print "udp_port=" a[2]}' "$f"; done
for f in /proc/net/tcp /proc/net/tcp6; do [ -r "$f" ] && awk 'NR>1 && $4=="0A" {split($2,a,":"); print "tcp_listen=" a[2]}' "$f"; done
if [ -d "$bin" ]; then cd "$bin" && for b in ployzd ployzctl ployz-tunnel ployz-gateway ployz-dns nats-server; do [ -f "$b" ] && echo "sha256=$(sha256sum "$b")"; done; fi
exit 0
"#;

fn parse_probe(text: &str) -> Probe {
    let mut probe = Probe::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim();
        match key {
            "ssh_connection" => probe.ssh_connection = value.to_owned(),
            "os" => probe.os = value.to_owned(),
            "kernel" => probe.kernel = value.to_owned(),
            "uid" => probe.uid = value.to_owned(),
            "tun" => probe.tun = value == "yes",
            "docker" => probe.docker = value == "yes",
            "docker_socket" => probe.docker_socket = value.to_owned(),
            "bin_dir" => probe.bin_dir = value.to_owned(),
            "udp_port" => probe.udp_ports.extend(u16::from_str_radix(value, 16).ok()),
            "tcp_listen" => probe
                .tcp_listen_ports
                .extend(u16::from_str_radix(value, 16).ok()),
            "sha256" => {
                let mut parts = value.split_whitespace();
                if let (Some(sum), Some(name)) = (parts.next(), parts.next()) {
                    probe.checksums.push((name.to_owned(), sum.to_owned()));
                }
            }
            _ => {}
        }
    }
    probe
}

/// The `SSH_CONNECTION` addresses: (this machine as the target sees it,
/// the target as we reached it).
fn connection_addresses(ssh_connection: &str) -> Option<(std::net::IpAddr, std::net::IpAddr)> {
    let parts: Vec<&str> = ssh_connection.split_whitespace().collect();
    let [client, _, server, _] = parts.as_slice() else {
        return None;
    };
    Some((client.parse().ok()?, server.parse().ok()?))
}

struct Adder<'a> {
    context: &'a Context<'a>,
    target: &'a str,
    ssh: &'a SshOptions,
    network: &'a str,
    timeout: Duration,
}

impl Adder<'_> {
    fn step(&self, name: &str, detail: &str) {
        self.context
            .output
            .progress(&format!("{}: {name}: {detail}", self.target));
    }

    async fn run(&self, binaries: &[Binary]) -> Result<AddResult, ApiError> {
        let started = Instant::now();
        self.step("connect", "opening an SSH session");
        let probe = parse_probe(&self.ssh("connect", PROBE_SCRIPT, None).await?);
        let Some((local_ip, target_ip)) = connection_addresses(&probe.ssh_connection) else {
            return Err(step_error(
                "connect",
                ErrorClass::PreconditionFailed,
                "ssh_no_connection_info",
                "the SSH session did not report SSH_CONNECTION; is the login shell a POSIX shell?"
                    .to_owned(),
            ));
        };

        self.step("preflight", &format!("{} {}", probe.os, probe.kernel));
        if probe.os != "Linux" {
            return Err(step_error(
                "preflight",
                ErrorClass::PreconditionFailed,
                "unsupported_os",
                format!("the host runs `{}`; Ployz machines run Linux", probe.os),
            ));
        }
        if probe.uid != "0" {
            return Err(step_error(
                "preflight",
                ErrorClass::PreconditionFailed,
                "not_root",
                format!(
                    "logged in as uid {}; the tunnel and containers need root: log in as root",
                    probe.uid
                ),
            ));
        }
        if !probe.tun {
            return Err(step_error("preflight", ErrorClass::PreconditionFailed, "no_tun", "the host has no usable TUN device (/dev/net/tun); load the `tun` module or give the host /dev/net/tun".to_owned()));
        }
        if !probe.docker {
            return Err(step_error(
                "preflight",
                ErrorClass::PreconditionFailed,
                "no_docker",
                format!(
                    "no Docker engine socket at {}; install and start Docker",
                    probe.docker_socket
                ),
            ));
        }
        let bin_dir = if probe.bin_dir.is_empty() {
            DEFAULT_BIN_DIR.to_owned()
        } else {
            probe.bin_dir.clone()
        };
        let state = self.remote_prepare_state(&bin_dir).await;
        if let Some(prepared) = &state {
            if prepared.state == "other" {
                return Err(step_error(
                    "preflight",
                    ErrorClass::PreconditionFailed,
                    "other_network",
                    format!(
                        "the host is already machine {} of network `{}`; remove it there first",
                        prepared.machine_id, prepared.network
                    ),
                ));
            }
        } else {
            // No ployzd answers there: the ports must be free for ours.
            let busy: Vec<String> = UDP_PORTS
                .iter()
                .filter(|port| probe.udp_ports.contains(port))
                .map(|port| format!("udp/{port}"))
                .chain(
                    TCP_PORTS
                        .iter()
                        .filter(|port| probe.tcp_listen_ports.contains(port))
                        .map(|port| format!("tcp/{port}")),
                )
                .collect();
            if !busy.is_empty() {
                return Err(step_error(
                    "preflight",
                    ErrorClass::PreconditionFailed,
                    "port_busy",
                    format!(
                        "ports Ployz needs are in use on the host: {}",
                        busy.join(", ")
                    ),
                ));
            }
        }

        // Install what differs.
        let mut installed = Vec::new();
        for binary in binaries {
            let current = probe
                .checksums
                .iter()
                .find(|(name, _)| name == binary.name)
                .map(|(_, sum)| sum.as_str());
            if current == Some(binary.sha256.as_str()) {
                continue;
            }
            self.step(
                "install",
                &format!("{} → {bin_dir}/{}", binary.path.display(), binary.name),
            );
            let script = format!(
                "set -e; d={dir}; mkdir -p \"$d\"; t=\"$d/.{name}.tmp\"; cat > \"$t\"; chmod 755 \"$t\"; mv -f \"$t\" \"$d/{name}\"",
                dir = shell_quote(&bin_dir),
                name = binary.name
            );
            let bytes = tokio::fs::read(&binary.path).await.map_err(|error| {
                step_error(
                    "install",
                    ErrorClass::Internal,
                    "binary_unreadable",
                    format!("cannot read {}: {error}", binary.path.display()),
                )
            })?;
            self.ssh("install", &script, Some(bytes)).await?;
            installed.push(binary.name.to_owned());
        }
        if installed.is_empty() {
            self.step("install", "binaries up to date");
        }

        // Start (or restart onto new binaries) ployzd.
        let ployzctl = format!("{}/ployzctl", shell_quote(&bin_dir));
        if state.is_some() && installed.iter().any(|name| name == "ployzd") {
            self.step(
                "start",
                "stopping the old ployzd (its data plane keeps serving)",
            );
            self.ssh("start", &format!("{ployzctl} daemon stop"), None)
                .await?;
        }
        self.step("start", "starting ployzd");
        self.ssh(
            "start",
            &format!("{ployzctl} --json daemon install --runtime host --service-mode user"),
            None,
        )
        .await?;

        // Keys and id.
        let prepared = self.remote_prepare(&bin_dir).await?;
        self.step(
            "prepare",
            &format!(
                "machine {} ({}), key {}",
                prepared.machine_id, prepared.hostname, prepared.public_key
            ),
        );
        if prepared.state == "other" {
            return Err(step_error(
                "prepare",
                ErrorClass::PreconditionFailed,
                "other_network",
                format!(
                    "the host is already machine {} of network `{}`",
                    prepared.machine_id, prepared.network
                ),
            ));
        }
        let endpoint = std::net::SocketAddr::new(
            target_ip,
            u16::try_from(prepared.listen_port).unwrap_or(51820),
        );

        let mut client = self.context.client(OPERATION_TIMEOUT).await?;
        let admitted = client
            .machine_admit(v1::MachineAdmitRequest {
                operation_id: new_operation_id(),
                machine_id: prepared.machine_id.clone(),
                public_key: prepared.public_key.clone(),
                endpoint: endpoint.to_string(),
                hostname: prepared.hostname.clone(),
                local_endpoint_ip: local_ip.to_string(),
            })
            .await
            .map_err(|e| step_api_error("admit", self.context.call_error(e)))?
            .into_inner();
        let machine = admitted.machine.unwrap_or_default();
        if admitted.outcome == "already_member" && prepared.state == "member" {
            self.step("admit", "already an active member");
            return Ok(AddResult {
                target: self.target.to_owned(),
                outcome: "already_member".to_owned(),
                machine_id: machine.id,
                hostname: machine.hostname,
                overlay_address: machine.overlay_address,
                subnet: machine.subnet,
                endpoint: machine.endpoint,
                store_role: machine.store_role,
                handshake_unix_ms: 0,
                store_servers: 0,
                store_replicas: 0,
                installed,
            });
        }
        self.step(
            "admit",
            &format!(
                "subnet {} claimed, address {}, store {}",
                machine.subnet, machine.overlay_address, machine.store_role
            ),
        );

        let mut joined = v1::MeshJoinResponse::default();
        if !admitted.ticket.is_empty() {
            self.step("join", "bringing up the tunnel and NATS on the host");
            let output = self
                .ssh(
                    "join",
                    &format!("{ployzctl} --json mesh join"),
                    Some(admitted.ticket.into_bytes()),
                )
                .await?;
            joined = serde_json::from_str(output.trim()).map_err(|error| {
                step_error(
                    "join",
                    ErrorClass::Internal,
                    "join_answer",
                    format!("the host's `mesh join` answered something unreadable: {error}"),
                )
            })?;
        }

        self.step("activate", "waiting for the handshake and the store");
        let remaining = self
            .timeout
            .saturating_sub(started.elapsed())
            .max(Duration::from_secs(5));
        let mut client = self.context.client(remaining + OPERATION_TIMEOUT).await?;
        let activated = client
            .machine_activate(v1::MachineActivateRequest {
                operation_id: new_operation_id(),
                machine_id: prepared.machine_id.clone(),
                timeout_ms: u32::try_from(remaining.as_millis()).unwrap_or(u32::MAX),
                route_certificate_pem: joined.route_certificate_pem,
                route_certificate_pin: joined.route_certificate_pin,
            })
            .await
            .map_err(|e| step_api_error("activate", self.context.call_error(e)))?
            .into_inner();
        let machine = activated.machine.unwrap_or_default();
        Ok(AddResult {
            target: self.target.to_owned(),
            outcome: if activated.outcome == "already_active" && prepared.state == "member" {
                "already_member".to_owned()
            } else {
                "added".to_owned()
            },
            machine_id: machine.id,
            hostname: machine.hostname,
            overlay_address: machine.overlay_address,
            subnet: machine.subnet,
            endpoint: machine.endpoint,
            store_role: machine.store_role,
            handshake_unix_ms: activated.handshake_unix_ms,
            store_servers: activated.store_servers,
            store_replicas: activated.store_replicas,
            installed,
        })
    }

    /// `mesh join-prepare` on the target, or `None` when no ployzd answers there.
    async fn remote_prepare_state(&self, bin_dir: &str) -> Option<v1::MeshJoinPrepareResponse> {
        let script = format!(
            "[ -x {dir}/ployzctl ] && {dir}/ployzctl --json mesh join-prepare --network {network}",
            dir = shell_quote(bin_dir),
            network = self.network
        );
        let output = self.ssh("preflight", &script, None).await.ok()?;
        serde_json::from_str(&output).ok()
    }

    async fn remote_prepare(&self, bin_dir: &str) -> Result<v1::MeshJoinPrepareResponse, ApiError> {
        let script = format!(
            "{dir}/ployzctl --json mesh join-prepare --network {network}",
            dir = shell_quote(bin_dir),
            network = self.network
        );
        let output = self.ssh("prepare", &script, None).await?;
        serde_json::from_str(&output).map_err(|error| {
            step_error(
                "prepare",
                ErrorClass::Internal,
                "bad_answer",
                format!(
                    "the host's ployzctl answered something unreadable ({error}): {}",
                    output.trim()
                ),
            )
        })
    }

    /// Runs `script` on the target through `ssh`, feeding `stdin`; returns stdout.
    async fn ssh(
        &self,
        step: &str,
        script: &str,
        stdin: Option<Vec<u8>>,
    ) -> Result<String, ApiError> {
        let mut command = Command::new("ssh");
        command.args([
            "-o",
            "BatchMode=yes",
            "-o",
            &format!("ConnectTimeout={SSH_CONNECT_TIMEOUT_SECS}"),
            "-o",
            "ServerAliveInterval=10",
        ]);
        if let Some(identity) = &self.ssh.identity {
            command
                .arg("-i")
                .arg(identity)
                .args(["-o", "IdentitiesOnly=yes"]);
        }
        for option in &self.ssh.options {
            command.args(["-o", option]);
        }
        command
            .arg("--")
            .arg(self.target)
            .arg(format!("sh -c {}", shell_quote(script)))
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().map_err(|error| {
            step_error(
                step,
                ErrorClass::PreconditionFailed,
                "ssh_missing",
                format!("cannot run `ssh` (OpenSSH client): {error}"),
            )
        })?;
        if let Some(bytes) = stdin
            && let Some(mut pipe) = child.stdin.take()
        {
            // A write error shows up as the remote command's failure below.
            let _ = pipe.write_all(&bytes).await;
            drop(pipe);
        }
        let output = child.wait_with_output().await.map_err(|error| {
            step_error(
                step,
                ErrorClass::Internal,
                "ssh_failed",
                format!("ssh did not finish: {error}"),
            )
        })?;
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        if output.status.code() == Some(255) {
            return Err(classify_ssh_failure(step, &stderr));
        }
        if !output.status.success() {
            // The remote command failed; a ployzctl there prints its error as JSON.
            if let Some(error) = remote_api_error(&stderr) {
                return Err(step_api_error(step, error));
            }
            return Err(step_error(
                step,
                ErrorClass::Unavailable,
                "remote_command_failed",
                format!(
                    "the command on the host failed ({}): {}",
                    output.status,
                    last_line(&stderr)
                ),
            ));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

/// Maps OpenSSH's own failures (exit 255) to typed errors.
fn classify_ssh_failure(step: &str, stderr: &str) -> ApiError {
    let lower = stderr.to_ascii_lowercase();
    let (class, code, what) = if lower.contains("permission denied") {
        (
            ErrorClass::PreconditionFailed,
            "ssh_auth_failed",
            "the host refused the SSH key",
        )
    } else if lower.contains("host key verification failed")
        || lower.contains("remote host identification has changed")
    {
        (
            ErrorClass::PreconditionFailed,
            "ssh_host_key",
            "the host's SSH key is unknown or changed",
        )
    } else if lower.contains("could not resolve hostname") {
        (
            ErrorClass::Usage,
            "ssh_unknown_host",
            "the host name does not resolve",
        )
    } else if [
        "timed out",
        "no route to host",
        "connection refused",
        "network is unreachable",
        "connection closed",
        "connection reset",
    ]
    .iter()
    .any(|needle| lower.contains(needle))
    {
        (
            ErrorClass::Unavailable,
            "ssh_unreachable",
            "cannot reach the host's SSH server",
        )
    } else {
        (ErrorClass::Unavailable, "ssh_failed", "ssh failed")
    };
    step_error(step, class, code, format!("{what}: {}", last_line(stderr)))
}

/// A ployzctl error printed with `--json` on the host.
fn remote_api_error(stderr: &str) -> Option<ApiError> {
    stderr.lines().rev().find_map(|line| {
        let value: serde_json::Value = serde_json::from_str(line).ok()?;
        let error = value.get("error")?;
        let class = match error.get("class")?.as_str()? {
            "usage" => ErrorClass::Usage,
            "precondition_failed" => ErrorClass::PreconditionFailed,
            "not_found" => ErrorClass::NotFound,
            "conflict" => ErrorClass::Conflict,
            "unavailable" => ErrorClass::Unavailable,
            _ => ErrorClass::Internal,
        };
        Some(ApiError::new(
            class,
            error.get("code")?.as_str()?.to_owned(),
            format!("on the host: {}", error.get("message")?.as_str()?),
        ))
    })
}

fn step_error(step: &str, class: ErrorClass, code: &str, message: String) -> ApiError {
    ApiError::new(class, code.to_owned(), format!("step {step}: {message}"))
}

fn step_api_error(step: &str, error: ApiError) -> ApiError {
    ApiError::new(
        error.class,
        error.code,
        format!("step {step}: {}", error.message),
    )
}

fn last_line(text: &str) -> &str {
    text.lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .unwrap_or("(no output)")
}

/// A fresh operation id for one recorded step of the join.
fn new_operation_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// `text` as one single-quoted POSIX shell word.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// `90s`, `2m`, `1500ms` or plain seconds.
pub fn parse_timeout(text: &str) -> Result<Duration, ApiError> {
    let text = text.trim();
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let value: u64 = number.parse().map_err(|_| bad_timeout(text))?;
    let duration = match unit {
        "" | "s" => Duration::from_secs(value),
        "ms" => Duration::from_millis(value),
        "m" => Duration::from_secs(value.saturating_mul(60)),
        _ => return Err(bad_timeout(text)),
    };
    if duration.is_zero() {
        return Err(bad_timeout(text));
    }
    Ok(duration)
}

fn bad_timeout(text: &str) -> ApiError {
    ApiError::new(
        ErrorClass::Usage,
        "invalid_timeout",
        format!("`{text}` is not a timeout; write e.g. `90s` or `2m`"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_is_parsed_into_facts() {
        let probe = parse_probe(
            "ssh_connection=10.0.0.1 40000 10.0.0.2 22\nos=Linux\nkernel=6.1\nuid=0\ntun=no\ndocker=yes\ndocker_socket=/d.sock\nbin_dir=/b\nudp_port=CA6C\ntcp_listen=1272\nsha256=abc  ployzd\n",
        );
        assert_eq!(probe.os, "Linux");
        assert!(!probe.tun);
        assert!(probe.docker);
        assert_eq!(probe.udp_ports, vec![51820]);
        assert_eq!(probe.tcp_listen_ports, vec![4722]);
        assert_eq!(
            probe.checksums,
            vec![("ployzd".to_owned(), "abc".to_owned())]
        );
        let (local, target) = connection_addresses(&probe.ssh_connection).expect("addresses");
        assert_eq!(local.to_string(), "10.0.0.1");
        assert_eq!(target.to_string(), "10.0.0.2");
    }

    #[test]
    fn ssh_failures_are_typed() {
        let auth = classify_ssh_failure("connect", "root@10.0.0.2: Permission denied (publickey).");
        assert_eq!(auth.code, "ssh_auth_failed");
        assert!(auth.message.starts_with("step connect:"));
        let unreachable = classify_ssh_failure(
            "connect",
            "ssh: connect to host 10.0.0.9 port 22: Connection timed out",
        );
        assert_eq!(unreachable.code, "ssh_unreachable");
        assert_eq!(unreachable.class, ErrorClass::Unavailable);
    }

    #[test]
    fn remote_json_errors_keep_their_code() {
        let error = remote_api_error("noise\n{\"error\":{\"class\":\"precondition_failed\",\"code\":\"other_network\",\"message\":\"x\"}}")
            .expect("parsed");
        assert_eq!(error.code, "other_network");
        assert_eq!(error.class, ErrorClass::PreconditionFailed);
    }

    #[test]
    fn quoting_survives_single_quotes_and_timeouts_parse() {
        assert_eq!(shell_quote("a'b"), r"'a'\''b'");
        assert_eq!(parse_timeout("90s").expect("90s"), Duration::from_secs(90));
        assert_eq!(parse_timeout("2m").expect("2m"), Duration::from_secs(120));
        assert!(parse_timeout("0").is_err());
        assert!(parse_timeout("soon").is_err());
    }
}
