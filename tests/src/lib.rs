//! The end-to-end test harness: real `ployzd`, `ployzctl` and `nats-server`
//! processes on one machine, each test node in its own temporary directory with
//! its own socket and NATS port. Every process a node started is stopped when
//! the node is dropped, even when the test failed.
//!
//! The binaries come from the same target directory as the test itself
//! (`cargo test --workspace` builds them first).

pub mod cluster;
pub mod image;

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tempfile::TempDir;

/// The directory holding the workspace's binaries (`target/debug`).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PLOYZ_TEST_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // Test executables live in target/<profile>/deps.
    let exe = std::env::current_exe().expect("the test executable has a path");
    let deps = exe.parent().expect("the test executable is in a directory");
    deps.parent()
        .expect("deps is inside the profile directory")
        .to_owned()
}

/// Path of a workspace binary, failing clearly when it was not built.
pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: build it first (`cargo build --workspace` or `cargo xtask test`)",
        path.display()
    );
    path
}

/// A free UDP port (the socket is closed before returning).
pub fn free_udp_port() -> u16 {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind an ephemeral UDP port");
    socket.local_addr().expect("local address").port()
}

/// A free TCP port on loopback (the listener is closed before returning).
pub fn free_port() -> u16 {
    free_addr(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)).port()
}

/// A free TCP address on `host` (the listener is closed before returning).
pub fn free_addr(host: std::net::IpAddr) -> std::net::SocketAddr {
    TcpListener::bind(std::net::SocketAddr::new(host, 0))
        .expect("bind an ephemeral port")
        .local_addr()
        .expect("local address")
}

/// The finished run of a command.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    fn from_output(output: Output, elapsed: Duration) -> Self {
        Self {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            elapsed,
        }
    }

    /// Stdout parsed as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }

    /// The `{"error": {...}}` object a `--json` failure prints on stderr.
    pub fn json_error(&self) -> Value {
        let value: Value = serde_json::from_str(self.stderr.trim())
            .unwrap_or_else(|e| panic!("stderr is not one JSON error ({e}):\n{}", self.stderr));
        value["error"].clone()
    }

    pub fn succeeded(&self) -> bool {
        self.code == Some(0)
    }
}

/// One Ployz machine under test: its own data dir, socket and NATS port.
pub struct Node {
    dir: TempDir,
    pub nats_port: u16,
    /// The gateway's plain HTTP port on 127.0.0.1.
    pub http_port: u16,
    /// The gateway's HTTPS port on 127.0.0.1.
    pub https_port: u16,
    /// DNS (UDP and TCP) on 127.0.0.1.
    pub dns_port: u16,
    /// The overlay's TUN interface, unique per node.
    pub mesh_interface: String,
    /// WireGuard's UDP port.
    pub mesh_port: u16,
    /// NATS's cluster port, on the node's overlay address.
    pub nats_cluster_port: u16,
    pub nats_leaf_port: u16,
    /// The peer API's port on the node's overlay address.
    pub mesh_api_port: u16,
}

impl Node {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("ployz-e2e-")
            .tempdir()
            .expect("create a temporary directory");
        Self {
            dir,
            nats_port: free_port(),
            http_port: free_port(),
            https_port: free_port(),
            dns_port: free_port(),
            mesh_interface: format!("pzn{:08x}", rand_u32()),
            mesh_port: free_udp_port(),
            nats_cluster_port: free_port(),
            nats_leaf_port: free_port(),
            mesh_api_port: free_port(),
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("ployzd.sock")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Runs `ployzctl --socket <ours> ARGS`.
    pub fn ployzctl(&self, args: &[&str]) -> Run {
        let started = Instant::now();
        let output = Command::new(binary("ployzctl"))
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .env_remove("PLOYZ_SOCKET")
            // The overlay of every node lives in this one network namespace:
            // each gets its own interface, ports and UAPI socket.
            .env("PLOYZ_MESH_INTERFACE", &self.mesh_interface)
            .env("PLOYZ_MESH_PORT", self.mesh_port.to_string())
            .env("PLOYZ_MESH_UAPI_DIR", self.dir.path().join("wireguard"))
            .env(
                "PLOYZ_NATS_CLUSTER_PORT",
                self.nats_cluster_port.to_string(),
            )
            .env("PLOYZ_NATS_LEAF_PORT", self.nats_leaf_port.to_string())
            .env("PLOYZ_MESH_API_PORT", self.mesh_api_port.to_string())
            // Nodes share the machine's Docker engine: their containers stay
            // on its default bridge instead of each creating an overlay
            // network there. Multi-host clusters (`cluster.rs`) use the default.
            .env("PLOYZ_MESH_CONTAINER_NETWORK", "none")
            .output()
            .expect("run ployzctl");
        Run::from_output(output, started.elapsed())
    }

    /// Runs `ployzctl --json ARGS`, requires success and returns its JSON.
    pub fn ployzctl_json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let run = self.ployzctl(&all);
        assert!(
            run.succeeded(),
            "ployzctl {args:?} failed ({:?}):\n{}{}",
            run.code,
            run.stdout,
            run.stderr
        );
        run.json()
    }

    /// `daemon install` with this node's paths; returns the daemon's pid.
    pub fn start_daemon(&self) -> u32 {
        self.start_daemon_with(&[])
    }

    /// `daemon install` with this node's paths and `extra` flags; returns the daemon's pid.
    pub fn start_daemon_with(&self, extra: &[&str]) -> u32 {
        let data_dir = self.data_dir().display().to_string();
        let port = self.nats_port.to_string();
        let http = format!("127.0.0.1:{}", self.http_port);
        let https = format!("127.0.0.1:{}", self.https_port);
        let dns = format!("127.0.0.1:{}", self.dns_port);
        let mut args = vec![
            "daemon",
            "install",
            "--runtime",
            "host",
            "--service-mode",
            "user",
            "--data-dir",
            &data_dir,
            "--nats-port",
            &port,
            "--gateway-http",
            &http,
            "--gateway-https",
            &https,
        ];
        // A test may listen elsewhere too (the Docker bridge, for containers).
        if !extra.contains(&"--dns-listen") {
            args.extend(["--dns-listen", &dns]);
        }
        args.extend_from_slice(extra);
        let value = self.ployzctl_json(&args);
        pid_field(&value, "pid")
    }

    /// `daemon stop`, leaving NATS running.
    pub fn stop_daemon(&self) {
        self.ployzctl_json(&["daemon", "stop"]);
    }

    /// The nats-server pid as `status` reports it.
    pub fn nats_pid(&self) -> u32 {
        pid_field(&self.ployzctl_json(&["status"])["nats"], "pid")
    }

    /// The nats-server pid recorded by the sidecar, whether or not the daemon runs.
    pub fn recorded_nats_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.data_dir().join("nats/sidecar.json")).ok()?;
        let value: Value = serde_json::from_str(&text).ok()?;
        value["pid"]
            .as_u64()
            .and_then(|pid| u32::try_from(pid).ok())
    }

    /// The daemon pid from its pidfile.
    pub fn daemon_pid(&self) -> Option<u32> {
        let mut pidfile = self.socket().into_os_string();
        pidfile.push(".pid");
        std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()
    }
}

impl Default for Node {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Politely first, so the daemon removes its socket and pidfile.
        let _ = Command::new(bin_dir().join("ployzctl"))
            .arg("--socket")
            .arg(self.socket())
            .args(["daemon", "stop", "--services"])
            .output();
        // Then make sure: nothing this node started survives it (ployzd and
        // every sidecar carry the node's directory on their command line).
        for pid in processes_under(self.dir.path()) {
            kill(pid, libc::SIGKILL);
        }
    }
}

/// A random number from the kernel, for unique names.
fn rand_u32() -> u32 {
    let mut bytes = [0u8; 4];
    if let Ok(mut file) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut file, &mut bytes);
    }
    u32::from_ne_bytes(bytes) ^ std::process::id()
}

fn pid_field(value: &Value, field: &str) -> u32 {
    value[field]
        .as_u64()
        .and_then(|pid| u32::try_from(pid).ok())
        .filter(|pid| *pid > 0)
        .unwrap_or_else(|| panic!("no `{field}` in {value}"))
}

/// True when `pid` exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// How long `pid` has been running, in clock ticks since boot (its start time).
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22 (starttime), counting from after the `(comm)` field.
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// True when the command line of `pid` mentions `dir` (so it belongs to this node).
/// Processes whose command line mentions `dir`.
pub fn processes_under(dir: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != std::process::id() && owned_by(*pid, dir))
        .collect()
}

fn owned_by(pid: u32, dir: &Path) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|cmdline| String::from_utf8_lossy(&cmdline).contains(&*dir.to_string_lossy()))
        .unwrap_or(false)
}

pub fn kill(pid: u32, signal: i32) {
    // SAFETY: sending a signal has no memory-safety preconditions.
    unsafe { libc::kill(pid as libc::pid_t, signal) };
}

/// Polls `condition` until it holds or `timeout` passes.
pub fn wait_until(
    timeout: Duration,
    what: &str,
    mut condition: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !condition() {
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Runs `docker ARGS`, panicking with its stderr when it fails; returns stdout.
pub fn docker(args: &[&str]) -> String {
    let output = Command::new("docker")
        .args(args)
        .output()
        .expect("run docker");
    assert!(
        output.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Writes `text` to `name` inside `dir` and returns the path.
pub fn write_file(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}
