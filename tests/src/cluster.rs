//! Multi-host test clusters on one machine: each "host" is a network namespace
//! with its own data dir, sshd and (optionally) dockerd, joined by an underlay
//! (a Linux bridge in the root namespace, one veth pair per host, a private /24).
//! The harness owns every process and kernel object it creates and removes them
//! all when the [`Cluster`] is dropped, even after a failed test; it depends on
//! nothing in Ployz itself, only on `ip`, `iptables`, OpenSSH and Docker.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, File},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use tempfile::TempDir;

use crate::{kill as send_signal, process_alive, process_start_time, wait_until};

/// Prefix of every kernel object name the harness makes; followed by the test
/// process id in hex, `n` (not a hex digit), and a per-process cluster counter.
const NAME_PREFIX: &str = "pz";
/// Linux limits interface names to 15 bytes (IFNAMSIZ - 1).
const MAX_INTERFACE_NAME: usize = 15;
/// Linux keeps the first 15 bytes of a process name (TASK_COMM_LEN - 1).
const MAX_COMM: usize = 15;
/// The interface name of a host's end of its veth pair, inside its namespace.
const UNDERLAY_INTERFACE: &str = "ul0";
/// Comment marking our iptables rules, so stale ones can be found and removed.
const IPTABLES_COMMENT: &str = "ployz-test";
/// How long a dockerd may take to answer `docker info`.
const DOCKER_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long sshd may take to accept connections.
const SSHD_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a dockerd may take to stop after SIGTERM before it is killed.
const DOCKER_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the processes left in a host's namespace (ployzd and its detached
/// sidecars) may take to exit after SIGTERM before they are killed.
const NAMESPACE_STOP_TIMEOUT: Duration = Duration::from_secs(2);
/// Where wireguard-tools and wireguard-go look for UAPI sockets (`/var/run`
/// is a link to `/run`).
const WG_SOCKET_DIR: &str = "/run/wireguard";
/// The directories under [`Host::ployz_dir`] made with the host.
const PLOYZ_SUBDIRS: [&str; 4] = ["data", "bin", "wireguard", "volumes"];

/// Clusters made by this process so far; part of every name.
static CLUSTER_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Chooses the shape of a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    hosts: usize,
    docker: bool,
    /// Hosts (by index) whose sessions see no TUN device.
    without_tun: BTreeSet<usize>,
}

impl ClusterBuilder {
    /// How many hosts (network namespaces) to make; 1 to 200.
    pub fn hosts(mut self, hosts: usize) -> Self {
        self.hosts = hosts;
        self
    }

    /// Whether every host runs its own dockerd.
    pub fn docker(mut self, docker: bool) -> Self {
        self.docker = docker;
        self
    }

    /// Host `index` (0-based) has no TUN device: its sshd, and so every SSH
    /// session, runs in a mount namespace where `/dev/net` is an empty tmpfs.
    /// Only sessions are affected: [`Host::command`] still sees the device.
    pub fn without_tun(mut self, index: usize) -> Self {
        self.without_tun.insert(index);
        self
    }

    /// Makes the underlay, the hosts and their daemons, and waits until the
    /// daemons answer. Whatever was made before an error is torn down.
    pub fn build(self) -> Result<Cluster> {
        ensure!(
            (1..=200).contains(&self.hosts),
            "a cluster has 1 to 200 hosts, not {}",
            self.hosts
        );
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        ensure!(euid == 0, "the cluster harness needs root (euid is {euid})");
        sweep_dead_clusters();

        let counter = CLUSTER_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{NAME_PREFIX}{:x}n{counter}", std::process::id());
        let dir = tempfile::Builder::new()
            .prefix(&format!("ployz-{tag}-"))
            .tempdir()
            .context("create the cluster's temporary directory")?;
        // The cluster exists from here on, so an error below tears down what was made.
        let mut cluster = Cluster {
            bridge: format!("{tag}br"),
            subnet: [10, 0, 0],
            iptables_rules: Vec::new(),
            hosts: Vec::new(),
            dir,
            tag,
        };
        ensure!(
            cluster.host_name(self.hosts - 1).len() <= MAX_INTERFACE_NAME,
            "interface name {} is longer than {MAX_INTERFACE_NAME} bytes",
            cluster.host_name(self.hosts - 1)
        );
        for index in 0..self.hosts {
            remove_host_objects(&cluster.host_name(index));
        }
        remove_link(&cluster.bridge);
        remove_iptables_rules(&cluster.iptables_comment());

        cluster.subnet = free_subnet(counter)?;
        cluster.make_underlay()?;
        cluster.make_keys()?;
        for index in 0..self.hosts {
            let host = cluster.make_host(index, self.docker, self.without_tun.contains(&index))?;
            cluster.hosts.push(host);
        }
        // Start every daemon first, then wait for all of them: they start in parallel.
        for host in &cluster.hosts {
            host.start_sshd(cluster.dir.path())?;
            if self.docker {
                host.start_dockerd()?;
            }
        }
        for host in &cluster.hosts {
            host.wait_for_sshd()?;
            if self.docker {
                host.wait_for_dockerd()?;
            }
        }
        Ok(cluster)
    }
}

/// Hosts joined by an underlay, torn down completely on drop.
pub struct Cluster {
    /// Names of everything: `pz<pid hex>n<counter>`.
    tag: String,
    bridge: String,
    /// The first three octets of the underlay /24.
    subnet: [u8; 3],
    /// Argument lists (after `-D`/`-I FORWARD`) of the iptables rules we added.
    iptables_rules: Vec<Vec<String>>,
    /// Declared before `dir` so host data dirs go before the cluster's.
    hosts: Vec<Host>,
    /// SSH keys shared by the whole cluster.
    dir: TempDir,
}

impl Cluster {
    /// Starts describing a cluster: one host without Docker unless told otherwise.
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder {
            hosts: 1,
            docker: false,
            without_tun: BTreeSet::new(),
        }
    }

    /// The hosts, in order; host `i` has underlay address `.i+1`.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Host `index` (0-based).
    pub fn host(&self, index: usize) -> &Host {
        &self.hosts[index]
    }

    /// The name shared by every object of this cluster (`pz<pid hex>n<counter>`).
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The underlay bridge's name in the root namespace.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The root namespace's own address on the underlay (`.254`), so the test
    /// process itself can reach services on the hosts.
    pub fn gateway_address(&self) -> Ipv4Addr {
        self.address(254)
    }

    /// The private key every host's root accepts.
    pub fn ssh_key(&self) -> PathBuf {
        self.dir.path().join("id_ed25519")
    }

    /// A private key no host accepts.
    pub fn wrong_ssh_key(&self) -> PathBuf {
        self.dir.path().join("wrong_ed25519")
    }

    /// An underlay address no host holds: connections to it go unanswered.
    pub fn unreachable_address(&self) -> Ipv4Addr {
        self.address(250)
    }

    /// Cuts `host` off the underlay: its veth is taken down, so nothing goes in or out.
    pub fn cut(&self, host: &Host) -> Result<()> {
        run(Command::new("ip").args(["link", "set", &host.veth, "down"]))
    }

    /// Puts `host` back on the underlay after [`Cluster::cut`].
    pub fn restore(&self, host: &Host) -> Result<()> {
        run(Command::new("ip").args(["link", "set", &host.veth, "up"]))
    }

    /// Sends `signal` to `pid`, which must run in `host`'s namespace or be one
    /// of its dockerd's containers.
    pub fn kill(&self, host: &Host, pid: u32, signal: i32) -> Result<()> {
        ensure!(
            host.pids().contains(&pid) || cgroup_pids(&host.cgroup_parent()).contains(&pid),
            "process {pid} does not run on host {}",
            host.name
        );
        send_signal(pid, signal);
        Ok(())
    }

    /// What this cluster consists of right now, to check later that it is gone.
    pub fn footprint(&self) -> Footprint {
        let mut processes = BTreeMap::new();
        for host in &self.hosts {
            for pid in host
                .pids()
                .into_iter()
                .chain(cgroup_pids(&host.cgroup_parent()))
            {
                processes.insert(pid, process_start_time(pid));
            }
        }
        Footprint {
            namespaces: self.hosts.iter().map(|host| host.name.clone()).collect(),
            links: self
                .hosts
                .iter()
                .map(|host| host.veth.clone())
                .chain([self.bridge.clone()])
                .collect(),
            cgroups: self.hosts.iter().map(Host::cgroup_parent).collect(),
            processes,
            dirs: self
                .hosts
                .iter()
                .map(|host| host.dir.path().to_owned())
                .chain([self.dir.path().to_owned()])
                .collect(),
            iptables_comment: self.iptables_comment(),
        }
    }

    fn host_name(&self, index: usize) -> String {
        format!("{}h{}", self.tag, index + 1)
    }

    fn address(&self, last: u8) -> Ipv4Addr {
        let [a, b, c] = self.subnet;
        Ipv4Addr::new(a, b, c, last)
    }

    fn iptables_comment(&self) -> String {
        format!("{IPTABLES_COMMENT} {}", self.tag)
    }

    fn make_underlay(&mut self) -> Result<()> {
        run(Command::new("ip").args(["link", "add", &self.bridge, "type", "bridge"]))?;
        let gateway = format!("{}/24", self.gateway_address());
        run(Command::new("ip").args(["addr", "add", &gateway, "dev", &self.bridge]))?;
        run(Command::new("ip").args(["link", "set", &self.bridge, "up"]))?;
        // Bridged frames pass the iptables FORWARD chain (br_netfilter), whose
        // policy dockerd sets to DROP: let everything on our bridge through.
        let comment = self.iptables_comment();
        for direction in ["-i", "-o"] {
            let rule: Vec<String> = [
                "FORWARD",
                direction,
                &self.bridge,
                "-m",
                "comment",
                "--comment",
                &comment,
                "-j",
                "ACCEPT",
            ]
            .map(str::to_owned)
            .to_vec();
            run(Command::new("iptables").args(["-w", "-I"]).args(&rule))?;
            self.iptables_rules.push(rule);
        }
        Ok(())
    }

    fn make_keys(&self) -> Result<()> {
        for (file, comment) in [
            ("id_ed25519", "ployz-test-client"),
            ("ssh_host_ed25519_key", "ployz-test-host"),
            ("wrong_ed25519", "ployz-test-unauthorized"),
        ] {
            let path = self.dir.path().join(file);
            run(Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
                .arg(&path))?;
        }
        Ok(())
    }

    fn make_host(&self, index: usize, docker: bool, without_tun: bool) -> Result<Host> {
        let name = self.host_name(index);
        let last = u8::try_from(index + 1).context("at most 200 hosts")?;
        let address = self.address(last);
        let dir = tempfile::Builder::new()
            .prefix(&format!("ployz-{name}-"))
            .tempdir()
            .context("create a host's data directory")?;
        let host = Host {
            veth: name.clone(),
            name,
            address,
            dir,
            ssh_key: self.ssh_key(),
            docker,
            without_tun,
            cgroup_tag: format!("ployz-test-{}", self.tag),
            children: Mutex::new(Vec::new()),
            spawned: AtomicU32::new(0),
        };
        for sub in PLOYZ_SUBDIRS {
            let path = host.ployz_dir().join(sub);
            fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        }
        // Namespace first, so a half-made host is still found and removed.
        run(Command::new("ip").args(["netns", "add", &host.name]))?;
        run(Command::new("ip").args(["-n", &host.name, "link", "set", "lo", "up"]))?;
        run(Command::new("ip").args([
            "link",
            "add",
            &host.veth,
            "type",
            "veth",
            "peer",
            "name",
            UNDERLAY_INTERFACE,
            "netns",
            &host.name,
        ]))?;
        run(Command::new("ip").args(["link", "set", &host.veth, "master", &self.bridge]))?;
        run(Command::new("ip").args(["link", "set", &host.veth, "up"]))?;
        let cidr = format!("{address}/24");
        run(Command::new("ip").args([
            "-n",
            &host.name,
            "addr",
            "add",
            &cidr,
            "dev",
            UNDERLAY_INTERFACE,
        ]))?;
        run(Command::new("ip").args(["-n", &host.name, "link", "set", UNDERLAY_INTERFACE, "up"]))?;
        Ok(host)
    }

    fn teardown(&mut self) {
        if let Some(dest) = std::env::var_os("PLOYZ_TEST_KEEP_LOGS") {
            for host in &self.hosts {
                keep_logs(host.dir.path(), &Path::new(&dest).join(&host.name));
            }
        }
        // Containers first: dockerd would give each one its stop timeout.
        for host in &self.hosts {
            kill_cgroup_processes(&host.cgroup_parent());
        }
        // Then dockerd, politely, so it stops containerd and cleans its state.
        let dockerds: Vec<(u32, &Host)> = self
            .hosts
            .iter()
            .filter_map(|host| Some((host.dockerd_pid()?, host)))
            .collect();
        for (pid, _) in &dockerds {
            send_signal(*pid, libc::SIGTERM);
        }
        for (pid, host) in &dockerds {
            let _ = wait_until(DOCKER_STOP_TIMEOUT, "dockerd to stop", || {
                !process_alive(*pid)
            });
            host.reap_children();
        }
        for host in &self.hosts {
            host.kill_children();
        }
        // What is left runs detached in the namespaces: ployzd and the sidecars
        // it started through SSH. Ask them all at once, then kill the rest.
        let names: Vec<&str> = self.hosts.iter().map(|host| host.name.as_str()).collect();
        terminate_namespaces(&names, NAMESPACE_STOP_TIMEOUT);
        for host in &self.hosts {
            remove_host_objects(&host.name);
            remove_cgroup(&host.cgroup_parent());
            // A mount left under the host's directory in our namespace would
            // make removing the directory reach into what it mounts.
            unmount_under(host.dir.path());
        }
        for rule in &self.iptables_rules {
            let _ = Command::new("iptables")
                .args(["-w", "-D"])
                .args(rule)
                .output();
        }
        remove_iptables_rules(&self.iptables_comment());
        remove_link(&self.bridge);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// One host: a network namespace with an underlay address, a data dir, an
/// sshd and optionally a dockerd.
pub struct Host {
    /// The network namespace's name.
    name: String,
    /// The root namespace's end of the host's veth pair.
    veth: String,
    address: Ipv4Addr,
    dir: TempDir,
    ssh_key: PathBuf,
    docker: bool,
    /// Sessions on this host see no `/dev/net/tun`.
    without_tun: bool,
    /// Container cgroups of this host's dockerd live under this name.
    cgroup_tag: String,
    /// Every long-lived process started for this host (sshd, dockerd, spawned).
    children: Mutex<Vec<Child>>,
    /// Numbers the logs of spawned processes.
    spawned: AtomicU32,
}

impl Host {
    /// The network namespace's name (also the root-side veth's name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host's address on the underlay.
    pub fn address(&self) -> Ipv4Addr {
        self.address
    }

    /// The host's data directory, removed with the cluster.
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The private key root on every host of the cluster accepts.
    pub fn ssh_key(&self) -> &Path {
        &self.ssh_key
    }

    /// The host's dockerd socket, when the cluster was built with Docker.
    pub fn docker_socket(&self) -> Option<PathBuf> {
        self.docker.then(|| self.dir.path().join("docker.sock"))
    }

    /// `unix://<docker socket>`, for `docker -H` and `DOCKER_HOST`.
    pub fn docker_host(&self) -> Option<String> {
        self.docker_socket()
            .map(|socket| format!("unix://{}", socket.display()))
    }

    /// Where Ployz keeps this host's files: data, socket, binaries, UAPI sockets.
    pub fn ployz_dir(&self) -> PathBuf {
        self.dir.path().join("ployz")
    }

    /// The environment that makes Ployz on this host use this host's files
    /// and Docker engine (hosts share one filesystem). Every SSH session on
    /// the host gets it (sshd `SetEnv`), and so does [`Host::command`].
    pub fn ployz_env(&self) -> Vec<(String, String)> {
        let dir = self.ployz_dir();
        let path = |name: &str| dir.join(name).display().to_string();
        let mut env = vec![
            ("PLOYZ_DATA_DIR".to_owned(), path("data")),
            ("PLOYZ_SOCKET".to_owned(), path("ployzd.sock")),
            ("PLOYZ_BIN_DIR".to_owned(), path("bin")),
            ("PLOYZ_MESH_UAPI_DIR".to_owned(), path("wireguard")),
            ("PLOYZ_STORAGE_BACKEND".to_owned(), "dir".to_owned()),
            ("PLOYZ_STORAGE_PATH".to_owned(), path("volumes")),
        ];
        if let Some(socket) = self.docker_socket() {
            env.push((
                "PLOYZ_DOCKER_SOCKET".to_owned(),
                socket.display().to_string(),
            ));
            env.push((
                "DOCKER_HOST".to_owned(),
                format!("unix://{}", socket.display()),
            ));
        }
        env
    }

    /// A command that runs `program` inside this host's network namespace,
    /// with the host's Ployz environment.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command.envs(self.ployz_env());
        command
    }

    /// A command that runs `args` (program first) inside this host's
    /// namespace with the host's UAPI socket directory
    /// (`<ployz dir>/wireguard`) mounted at `/var/run/wireguard`, where
    /// wireguard-tools and wireguard-go look for sockets. The mounts live in
    /// the private mount namespace `ip netns exec` gives the command, so the
    /// root namespace's `/run` is left as it was (a tmpfs covers `/run` when it
    /// has no `wireguard` directory, rather than creating one there; the
    /// host's directory must then not be under `/run`, and tempdirs are not).
    pub fn wg_command(&self, args: &[&str]) -> Command {
        let uapi = self.ployz_dir().join("wireguard");
        let script = format!(
            "set -e; \
             if [ ! -d {WG_SOCKET_DIR} ]; then \
             mount -t tmpfs -o size=64k,mode=755 tmpfs /run; mkdir {WG_SOCKET_DIR}; fi; \
             mount --bind {} {WG_SOCKET_DIR}; exec \"$@\"",
            shell_quote(&uapi.display().to_string()),
        );
        let mut command = self.command("sh");
        command.args(["-c", &script, "wg-uapi"]).args(args);
        command
    }

    /// Runs `wg show <interface> dump` inside the host, against the userspace
    /// tunnel whose UAPI socket is `<ployz dir>/wireguard/<interface>.sock`
    /// (see [`Host::wg_command`]).
    pub fn wg_show(&self, interface: &str) -> Output {
        self.wg_command(&["wg", "show", interface, "dump"])
            .stdin(Stdio::null())
            .output()
            .expect("run `ip netns exec`")
    }

    /// Peers of the WireGuard interface `interface`, parsed from
    /// [`Host::wg_show`]; fails when `wg` does.
    pub fn wg_peers(&self, interface: &str) -> Result<Vec<WgPeer>> {
        let output = self.wg_show(interface);
        ensure!(
            output.status.success(),
            "wg show {interface} on {} failed ({}): {}",
            self.name,
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        parse_wg_dump(&String::from_utf8_lossy(&output.stdout))
    }

    /// Sends `signal` to every process in this host's namespace whose
    /// `/proc/<pid>/comm` is `name` (the kernel keeps its first 15 bytes, and
    /// so does the comparison); returns their pids.
    pub fn kill_named(&self, name: &str, signal: i32) -> Vec<u32> {
        let wanted = &name.as_bytes()[..name.len().min(MAX_COMM)];
        let pids: Vec<u32> = self
            .pids()
            .into_iter()
            .filter(|pid| {
                fs::read(format!("/proc/{pid}/comm"))
                    .is_ok_and(|comm| comm.strip_suffix(b"\n").unwrap_or(&comm) == wanted)
            })
            .collect();
        for pid in &pids {
            send_signal(*pid, signal);
        }
        pids
    }

    /// Runs `args` (program first) inside the host's namespace and waits for
    /// it; panics only when `ip` itself cannot be started.
    pub fn exec(&self, args: &[&str]) -> Output {
        let (program, rest) = args.split_first().expect("exec needs a program");
        self.command(program)
            .args(rest)
            .stdin(Stdio::null())
            .output()
            .expect("run `ip netns exec`")
    }

    /// Starts `args` (program first) inside the host's namespace as a process
    /// the host owns: it is killed with the cluster. Its output goes to
    /// `<data dir>/<program>-<n>.log` (n counts spawns). Returns its pid.
    pub fn spawn(&self, args: &[&str]) -> Result<u32> {
        let (program, rest) = args.split_first().context("spawn needs a program")?;
        let base = Path::new(program)
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| "process".to_owned());
        let number = self.spawned.fetch_add(1, Ordering::Relaxed);
        let log = self.dir.path().join(format!("{base}-{number}.log"));
        let mut command = self.command(program);
        command.args(rest);
        self.spawn_logged(command, &log)
    }

    /// An OpenSSH client running in this host's namespace, logging in as root
    /// on `target` with the cluster's key; append the remote command.
    pub fn ssh_command(&self, target: &Host) -> Command {
        self.ssh_command_to(&target.address.to_string(), &self.ssh_key)
    }

    /// An OpenSSH client running in this host's namespace, logging in as root
    /// on `address` with the private key `key` and nothing else (no agent, no
    /// config); append the remote command.
    pub fn ssh_command_to(&self, address: &str, key: &Path) -> Command {
        let mut command = self.command("ssh");
        command
            .args(["-F", "/dev/null", "-i"])
            .arg(key)
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "LogLevel=ERROR",
                "-o",
                "ConnectTimeout=5",
            ])
            .arg(format!("root@{address}"))
            .stdin(Stdio::null());
        command
    }

    /// Pids of every live process in this host's network namespace.
    pub fn pids(&self) -> Vec<u32> {
        namespace_pids(&self.name)
    }

    /// The pid of this host's dockerd, from its pidfile.
    pub fn dockerd_pid(&self) -> Option<u32> {
        read_pid(&self.dir.path().join("docker.pid"))
    }

    /// The pid of this host's sshd, from its pidfile.
    pub fn sshd_pid(&self) -> Option<u32> {
        read_pid(&self.dir.path().join("sshd.pid"))
    }

    /// Copies `image` from the machine's Docker engine into this host's dockerd
    /// (`docker save | docker load`): no registry is needed.
    pub fn load_image(&self, image: &str) -> Result<()> {
        let docker_host = self.docker_host().context("the cluster has no docker")?;
        let mut save = Command::new("docker")
            .args(["save", image])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("run docker save")?;
        let saved = save.stdout.take().context("docker save's stdout")?;
        let load = Command::new("docker")
            .args(["-H", &docker_host, "load", "--quiet"])
            .stdin(saved)
            .output()
            .context("run docker load")?;
        let save = save.wait().context("wait for docker save")?;
        ensure!(save.success(), "docker save {image} failed ({save})");
        ensure!(
            load.status.success(),
            "docker load into {} failed ({}): {}",
            self.name,
            load.status,
            String::from_utf8_lossy(&load.stderr).trim()
        );
        Ok(())
    }

    fn spawn_logged(&self, mut command: Command, log: &Path) -> Result<u32> {
        let stdout = File::create(log).with_context(|| format!("create {}", log.display()))?;
        let stderr = stdout.try_clone().context("clone a log file handle")?;
        let child = command
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("spawn {command:?}"))?;
        let pid = child.id();
        self.children
            .lock()
            .expect("no thread panicked holding the children")
            .push(child);
        // `ip netns exec` enters the namespace only after it started: wait, so
        // the pid is found in the host right away.
        wait_until(
            Duration::from_secs(5),
            "the process to enter its namespace",
            || self.pids().contains(&pid) || !process_alive(pid),
        )?;
        Ok(pid)
    }

    fn start_sshd(&self, cluster_dir: &Path) -> Result<()> {
        // sshd refuses to start without its privilege separation directory.
        fs::create_dir_all("/run/sshd").context("create /run/sshd")?;
        let dir = self.dir.path();
        let authorized = dir.join("authorized_keys");
        fs::copy(cluster_dir.join("id_ed25519.pub"), &authorized)
            .context("write authorized_keys")?;
        let config = format!(
            "Port 22\n\
             ListenAddress {address}\n\
             HostKey {host_key}\n\
             PidFile {pid_file}\n\
             AuthorizedKeysFile {authorized}\n\
             StrictModes no\n\
             UsePAM no\n\
             PermitRootLogin prohibit-password\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             X11Forwarding no\n\
             PrintMotd no\n\
             Subsystem sftp internal-sftp\n\
             SetEnv {set_env}\n",
            address = self.address,
            host_key = cluster_dir.join("ssh_host_ed25519_key").display(),
            pid_file = dir.join("sshd.pid").display(),
            authorized = authorized.display(),
            set_env = self
                .ployz_env()
                .iter()
                .map(|(name, value)| format!("\"{name}={value}\""))
                .collect::<Vec<_>>()
                .join(" "),
        );
        let config_path = dir.join("sshd_config");
        fs::write(&config_path, config).context("write sshd_config")?;
        let command = if self.without_tun {
            // `ip netns exec` gives the command its own mount namespace (mounts
            // there do not propagate back): hide /dev/net in it for sshd and
            // every session it starts.
            let mut command = self.command("sh");
            command.args([
                "-c",
                &format!(
                    "mount -t tmpfs -o size=64k,mode=755 tmpfs /dev/net && exec /usr/sbin/sshd -D -e -f {}",
                    shell_quote(&config_path.display().to_string())
                ),
            ]);
            command
        } else {
            let mut command = self.command("/usr/sbin/sshd");
            command.args(["-D", "-e", "-f"]).arg(&config_path);
            command
        };
        self.spawn_logged(command, &dir.join("sshd.log"))?;
        Ok(())
    }

    fn wait_for_sshd(&self) -> Result<()> {
        let address = SocketAddr::from((self.address, 22));
        wait_until(SSHD_READY_TIMEOUT, "sshd to listen", || {
            TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok()
        })
        .with_context(|| log_tail(&self.dir.path().join("sshd.log")))
    }

    fn start_dockerd(&self) -> Result<()> {
        let dir = self.dir.path();
        // Our own (empty) daemon.json: the machine's may set data-root and a
        // storage driver, which dockerd refuses to see twice.
        let config = dir.join("daemon.json");
        fs::write(&config, "{}\n").context("write daemon.json")?;
        let socket = self.docker_host().context("docker is enabled")?;
        let dockerd = [
            "exec dockerd".to_owned(),
            format!("--config-file {}", config.display()),
            format!("--data-root {}", dir.join("docker").display()),
            format!("--exec-root {}", dir.join("docker-exec").display()),
            format!("-H {socket}"),
            format!("--pidfile {}", dir.join("docker.pid").display()),
            // vfs works on any filesystem and needs no kernel feature.
            "--storage-driver vfs".to_owned(),
            format!("--cgroup-parent /{}", self.cgroup_parent()),
            "--shutdown-timeout 1".to_owned(),
        ]
        .join(" ");
        // `ip netns exec` remounts /sys for the namespace, which hides the
        // cgroup mounts dockerd needs: mount the same hierarchies again.
        let script = format!("{} && {dockerd}", cgroup_mount_script()?);
        let mut command = self.command("sh");
        command.args(["-c", &script]);
        self.spawn_logged(command, &dir.join("dockerd.log"))?;
        Ok(())
    }

    fn wait_for_dockerd(&self) -> Result<()> {
        let socket = self.docker_host().context("docker is enabled")?;
        let log = self.dir.path().join("dockerd.log");
        wait_until(
            DOCKER_READY_TIMEOUT,
            "dockerd to answer `docker info`",
            || {
                Command::new("docker")
                    .args(["-H", &socket, "info", "--format", "{{.ID}}"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|status| status.success())
            },
        )
        .with_context(|| log_tail(&log))
    }

    fn cgroup_parent(&self) -> String {
        format!("{}-{}", self.cgroup_tag, self.name)
    }

    /// Waits for children that already exited, so none stays a zombie.
    fn reap_children(&self) {
        let mut children = self
            .children
            .lock()
            .expect("no thread panicked holding the children");
        for child in children.iter_mut() {
            let _ = child.try_wait();
        }
    }

    fn kill_children(&self) {
        let mut children = self
            .children
            .lock()
            .expect("no thread panicked holding the children");
        for child in children.iter_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        children.clear();
    }
}

/// One peer as `wg show <interface> dump` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgPeer {
    /// The peer's public key, base64.
    pub public_key: String,
    /// Where the peer was last heard from or was configured to be, if anywhere.
    pub endpoint: Option<String>,
    /// The prefixes routed to the peer, in `wg`'s order.
    pub allowed_ips: Vec<String>,
    /// Seconds since the Unix epoch; 0 when there was none.
    pub latest_handshake_unix: u64,
    /// Bytes received from the peer.
    pub rx_bytes: u64,
    /// Bytes sent to the peer.
    pub tx_bytes: u64,
}

/// Parses `wg show <interface> dump`: the interface line, then one
/// tab-separated line per peer (public key, preshared key, endpoint,
/// allowed IPs, latest handshake, rx, tx, keepalive).
pub fn parse_wg_dump(dump: &str) -> Result<Vec<WgPeer>> {
    dump.lines()
        .skip(1)
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let fields: Vec<&str> = line.split('\t').collect();
            ensure!(
                fields.len() >= 8,
                "a wg dump peer line has 8 fields: {line:?}"
            );
            let number = |index: usize| -> Result<u64> {
                fields[index]
                    .parse()
                    .with_context(|| format!("field {index} of {line:?}"))
            };
            Ok(WgPeer {
                public_key: fields[0].to_owned(),
                endpoint: (fields[2] != "(none)").then(|| fields[2].to_owned()),
                allowed_ips: fields[3]
                    .split(',')
                    .filter(|ip| !ip.is_empty() && *ip != "(none)")
                    .map(str::to_owned)
                    .collect(),
                latest_handshake_unix: number(4)?,
                rx_bytes: number(5)?,
                tx_bytes: number(6)?,
            })
        })
        .collect()
}

/// What a cluster consisted of, to check after drop that nothing remains.
#[derive(Debug, Clone)]
pub struct Footprint {
    namespaces: Vec<String>,
    links: Vec<String>,
    cgroups: Vec<String>,
    /// Pid and start time, so a reused pid is not mistaken for ours.
    processes: BTreeMap<u32, Option<u64>>,
    dirs: Vec<PathBuf>,
    iptables_comment: String,
}

impl Footprint {
    /// The pids of every process the cluster ran (host namespaces and containers).
    pub fn pids(&self) -> Vec<u32> {
        self.processes.keys().copied().collect()
    }

    /// Everything of the footprint that still exists, one line each.
    pub fn remaining(&self) -> Vec<String> {
        let mut left = Vec::new();
        for namespace in &self.namespaces {
            if Path::new("/run/netns").join(namespace).exists() {
                left.push(format!("network namespace {namespace}"));
            }
        }
        for link in &self.links {
            if link_exists(link) {
                left.push(format!("link {link}"));
            }
        }
        for cgroup in &self.cgroups {
            for hierarchy in cgroup_hierarchies() {
                let path = hierarchy.join(cgroup);
                if path.exists() {
                    left.push(format!("cgroup {}", path.display()));
                }
            }
        }
        for (pid, started) in &self.processes {
            if process_alive(*pid) && process_start_time(*pid) == *started {
                let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                left.push(format!("process {pid} ({cmdline})"));
            }
        }
        for dir in &self.dirs {
            if dir.exists() {
                left.push(format!("directory {}", dir.display()));
            }
        }
        if iptables_forward_rules()
            .iter()
            .any(|rule| rule.contains(&self.iptables_comment))
        {
            left.push(format!("iptables rules `{}`", self.iptables_comment));
        }
        left
    }
}

/// `text` in single quotes for `sh`.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// Runs `command`, failing with its stderr when it does not succeed.
fn run(command: &mut Command) -> Result<()> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

fn read_pid(path: &Path) -> Option<u32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(15)..].join("\n");
    format!("last lines of {}:\n{tail}", path.display())
}

/// Picks 10.<200+k>.<x>.0/24 from the pid and the counter, skipping any /24
/// that an address or route on this machine already uses.
fn free_subnet(counter: u32) -> Result<[u8; 3]> {
    let pid = std::process::id();
    let second = 200 + u8::try_from(pid % 50).expect("below 50");
    let used = Command::new("sh")
        .args(["-c", "ip -4 -o addr show; ip -4 route show table all"])
        .output()
        .context("list addresses and routes")?;
    let used = String::from_utf8_lossy(&used.stdout);
    for attempt in 0..256 {
        let third = u8::try_from((pid / 50 + counter * 7 + attempt) % 256).expect("below 256");
        let prefix = format!("10.{second}.{third}.");
        if !used.contains(&prefix) {
            return Ok([10, second, third]);
        }
    }
    bail!("no free /24 in 10.{second}.0.0/16")
}

/// A shell fragment that mounts the root namespace's cgroup hierarchies again
/// under a fresh /sys/fs/cgroup.
fn cgroup_mount_script() -> Result<String> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("read /proc/self/mounts")?;
    let mut script = vec!["mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup".to_owned()];
    for line in mounts.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [source, target, kind, options, ..] = fields[..] else {
            continue;
        };
        if target.starts_with("/sys/fs/cgroup/") && kind.starts_with("cgroup") {
            script.push(format!(
                "mkdir -p {target} && mount -t {kind} -o {options} {source} {target}"
            ));
        }
    }
    Ok(script.join(" && "))
}

fn cgroup_hierarchies() -> Vec<PathBuf> {
    fs::read_dir("/sys/fs/cgroup")
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok())
                .map(|entry| entry.path())
                .filter(|path| path.is_dir())
                .collect()
        })
        .unwrap_or_default()
}

/// Pids in the cgroup `name` (and below) of any hierarchy.
fn cgroup_pids(name: &str) -> BTreeSet<u32> {
    let mut pids = BTreeSet::new();
    for hierarchy in cgroup_hierarchies() {
        collect_cgroup_pids(&hierarchy.join(name), &mut pids);
    }
    pids
}

fn collect_cgroup_pids(dir: &Path, pids: &mut BTreeSet<u32>) {
    if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(
            text.lines()
                .filter_map(|line| line.trim().parse::<u32>().ok()),
        );
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.filter_map(|entry| entry.ok()) {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                collect_cgroup_pids(&entry.path(), pids);
            }
        }
    }
}

/// Kills every process in the cgroup `name` (and below) and waits for them to die.
fn kill_cgroup_processes(name: &str) {
    let _ = wait_until(Duration::from_secs(5), "cgroup processes to die", || {
        let pids = cgroup_pids(name);
        for pid in &pids {
            send_signal(*pid, libc::SIGKILL);
        }
        pids.iter().all(|pid| !process_alive(*pid))
    });
}

/// Kills every process in the cgroup `name` and removes it from all hierarchies.
fn remove_cgroup(name: &str) {
    kill_cgroup_processes(name);
    for hierarchy in cgroup_hierarchies() {
        remove_cgroup_dir(&hierarchy.join(name));
    }
}

fn remove_cgroup_dir(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.filter_map(|entry| entry.ok()) {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                remove_cgroup_dir(&entry.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

/// Copies every `*.log` under `from` to `to`, keeping relative paths (for
/// looking at a failed test after the cluster is gone).
fn keep_logs(from: &Path, to: &Path) {
    let Ok(entries) = fs::read_dir(from) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() && entry.file_name() != "docker" {
            keep_logs(&path, &to.join(entry.file_name()));
        } else if kind.is_file()
            && path
                .extension()
                .is_some_and(|ext| ext == "log" || ext == "json" || ext == "conf")
        {
            let _ = fs::create_dir_all(to);
            let _ = fs::copy(&path, to.join(entry.file_name()));
        }
    }
}

/// Pids of live processes whose network namespace is `/run/netns/<name>`.
fn namespace_pids(name: &str) -> Vec<u32> {
    let Ok(namespace) = fs::metadata(Path::new("/run/netns").join(name)) else {
        return Vec::new();
    };
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|net| net.dev() == namespace.dev() && net.ino() == namespace.ino())
        })
        .filter(|pid| process_alive(*pid))
        .collect()
}

/// Sends SIGTERM to every process in the namespaces `names` and waits up to
/// `timeout` for them to exit (what remains is killed by [`remove_host_objects`]).
fn terminate_namespaces(names: &[&str], timeout: Duration) {
    let pids: Vec<u32> = names.iter().flat_map(|name| namespace_pids(name)).collect();
    if pids.is_empty() {
        return;
    }
    for pid in &pids {
        send_signal(*pid, libc::SIGTERM);
    }
    let _ = wait_until(timeout, "namespace processes to exit", || {
        pids.iter().all(|pid| !process_alive(*pid))
    });
}

/// Lazily unmounts every mount point at or below `dir` in our mount namespace,
/// deepest first.
fn unmount_under(dir: &Path) {
    let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    // Field 5 is the mount point, with spaces and the like octal-escaped.
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|point| PathBuf::from(unescape_mount_point(point)))
        .filter(|point| point.starts_with(dir))
        .collect();
    points.sort_by_key(|point| std::cmp::Reverse(point.components().count()));
    for point in points {
        let _ = Command::new("umount").arg("-l").arg(&point).output();
    }
}

/// Undoes the `\ooo` escapes of a mount point in `/proc/self/mountinfo`.
fn unescape_mount_point(point: &str) -> String {
    let bytes = point.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let octal = bytes.get(index + 1..index + 4).and_then(|digits| {
            std::str::from_utf8(digits)
                .ok()
                .and_then(|digits| u8::from_str_radix(digits, 8).ok())
        });
        match (bytes[index], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                index += 4;
            }
            (byte, _) => {
                out.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes the namespace `name` with everything running in it, and its veth.
fn remove_host_objects(name: &str) {
    let _ = wait_until(Duration::from_secs(5), "namespace processes to die", || {
        let pids = namespace_pids(name);
        for pid in &pids {
            send_signal(*pid, libc::SIGKILL);
        }
        pids.iter().all(|pid| !process_alive(*pid))
    });
    if Path::new("/run/netns").join(name).exists() {
        let _ = Command::new("ip").args(["netns", "delete", name]).output();
    }
    remove_link(name);
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

fn remove_link(name: &str) {
    if link_exists(name) {
        let _ = Command::new("ip").args(["link", "delete", name]).output();
    }
}

fn iptables_forward_rules() -> Vec<String> {
    Command::new("iptables")
        .args(["-w", "-S", "FORWARD"])
        .output()
        .map(|output| {
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Deletes every FORWARD rule carrying `comment`.
fn remove_iptables_rules(comment: &str) {
    let quoted = format!("--comment \"{comment}\"");
    for rule in iptables_forward_rules() {
        let Some(rest) = rule.strip_prefix("-A FORWARD ") else {
            continue;
        };
        if !rule.contains(&quoted) {
            continue;
        }
        // `iptables -S` quotes the comment; split it back into one argument.
        let mut args: Vec<String> = Vec::new();
        let (before, after) = rest.split_once(&quoted).expect("the rule has the comment");
        args.extend(before.split_whitespace().map(str::to_owned));
        args.push("--comment".to_owned());
        args.push(comment.to_owned());
        args.extend(after.split_whitespace().map(str::to_owned));
        let _ = Command::new("iptables")
            .args(["-w", "-D", "FORWARD"])
            .args(&args)
            .output();
    }
}

/// The pid in an object name `pz<pid hex>n<counter>…`, when it has that shape.
fn owner_pid(name: &str) -> Option<(u32, String)> {
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let (pid, rest) = rest.split_once('n')?;
    let pid = u32::from_str_radix(pid, 16).ok()?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    if digits.is_empty() {
        return None;
    }
    Some((pid, format!("{NAME_PREFIX}{pid:x}n{digits}")))
}

/// Removes clusters left behind by test processes that no longer run (killed
/// before their `Drop` could run), so leftovers never pile up.
fn sweep_dead_clusters() {
    let dead = |name: &str| owner_pid(name).filter(|(pid, _)| !process_alive(*pid));
    let mut tags = BTreeSet::new();
    if let Ok(entries) = fs::read_dir("/run/netns") {
        for entry in entries.filter_map(|entry| entry.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some((_, tag)) = dead(&name) {
                remove_host_objects(&name);
                tags.insert(tag);
            }
        }
    }
    if let Ok(entries) = fs::read_dir("/sys/class/net") {
        for entry in entries.filter_map(|entry| entry.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some((_, tag)) = dead(&name) {
                remove_link(&name);
                tags.insert(tag);
            }
        }
    }
    for rule in iptables_forward_rules() {
        if let Some((_, after)) = rule.split_once(&format!("--comment \"{IPTABLES_COMMENT} ")) {
            let name = after.split('"').next().unwrap_or_default();
            if let Some((_, tag)) = dead(name) {
                tags.insert(tag);
            }
        }
    }
    for tag in tags {
        remove_iptables_rules(&format!("{IPTABLES_COMMENT} {tag}"));
    }
    // Container cgroups are `ployz-test-<tag>-<host name>` in every hierarchy.
    let mut cgroups = BTreeSet::new();
    for hierarchy in cgroup_hierarchies() {
        if let Ok(entries) = fs::read_dir(hierarchy) {
            for entry in entries.filter_map(|entry| entry.ok()) {
                let name = entry.file_name().to_string_lossy().into_owned();
                let object = name.strip_prefix("ployz-test-").unwrap_or_default();
                if dead(object).is_some() {
                    cgroups.insert(name);
                }
            }
        }
    }
    for cgroup in cgroups {
        remove_cgroup(&cgroup);
    }
    // Data dirs are `ployz-<tag or host name>-<random>` in the temp dir.
    if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
        for entry in entries.filter_map(|entry| entry.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(object) = name.strip_prefix("ployz-") else {
                continue;
            };
            if dead(object).is_some() && entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_reads_the_pid_and_tag_from_object_names() {
        assert_eq!(
            owner_pid("pz1c2bn0h3"),
            Some((0x1c2b, "pz1c2bn0".to_owned()))
        );
        assert_eq!(
            owner_pid("pz1c2bn12br"),
            Some((0x1c2b, "pz1c2bn12".to_owned()))
        );
        assert_eq!(owner_pid("pzn1"), None);
        assert_eq!(owner_pid("pz1a2bn"), None);
        assert_eq!(owner_pid("pzxyn1h1"), None);
        assert_eq!(owner_pid("eth0"), None);
    }

    #[test]
    fn mount_points_are_unescaped() {
        assert_eq!(unescape_mount_point("/tmp/a\\040b"), "/tmp/a b");
        assert_eq!(unescape_mount_point("/tmp/tab\\011x\\134"), "/tmp/tab\tx\\");
        assert_eq!(unescape_mount_point("/plain\\9"), "/plain\\9");
    }

    #[test]
    fn shell_quote_survives_single_quotes() {
        assert_eq!(shell_quote("/tmp/x"), "'/tmp/x'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}

#[cfg(test)]
mod wg_dump_tests {
    use super::*;

    #[test]
    fn a_wg_dump_is_parsed_into_peers() {
        let dump = "cHJpdmF0ZQ==\tcHVibGlj\t51820\toff\n\
                    a2V5MQ==\t(none)\t10.0.0.2:51820\tfd00:0:0:2::/64\t1764800000\t1200\t3400\t25\n\
                    a2V5Mg==\t(none)\t(none)\t(none)\t0\t0\t0\toff\n\
                    a2V5Mw==\tcHNr\t[fd00::3]:51820\t10.1.3.0/24,fd00:0:0:3::/64\t1\t2\t3\toff\n";
        let peers = parse_wg_dump(dump).expect("parse");
        assert_eq!(peers.len(), 3);
        assert_eq!(peers[0].public_key, "a2V5MQ==");
        assert_eq!(peers[0].endpoint.as_deref(), Some("10.0.0.2:51820"));
        assert_eq!(peers[0].allowed_ips, vec!["fd00:0:0:2::/64".to_owned()]);
        assert_eq!(peers[0].latest_handshake_unix, 1_764_800_000);
        assert_eq!((peers[0].rx_bytes, peers[0].tx_bytes), (1200, 3400));
        assert_eq!(peers[1].endpoint, None);
        assert!(peers[1].allowed_ips.is_empty());
        assert_eq!(peers[1].latest_handshake_unix, 0);
        assert_eq!(peers[2].endpoint.as_deref(), Some("[fd00::3]:51820"));
        assert_eq!(
            peers[2].allowed_ips,
            vec!["10.1.3.0/24".to_owned(), "fd00:0:0:3::/64".to_owned()]
        );
        assert!(
            parse_wg_dump("only the interface line\n")
                .expect("parse")
                .is_empty()
        );
        assert!(parse_wg_dump("iface\nshort\tline\n").is_err());
    }
}
