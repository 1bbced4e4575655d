//! services::nats: the nats-server sidecar on top of the shared lifecycle in
//! `services::sidecar`: finds the binary, renders `nats.conf` and probes readiness
//! through the INFO line every NATS server sends first. nats-server runs in its
//! own session so it outlives ployzd: the data plane keeps serving while the
//! daemon is gone. A server is standalone, a core server of the JetStream
//! cluster (which may accept other machines' leaf servers), or a leaf server
//! without JetStream. This module speaks processes, files and TCP only; it
//! must not depend on async-nats, the store domain or the daemon.

use std::{
    env,
    ffi::OsString,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, BufReader},
    net::TcpStream,
    sync::watch,
    time::timeout,
};
use tokio_util::sync::CancellationToken;

use super::{
    SidecarError, SidecarStatus,
    process::Pid,
    sidecar::{
        FileNames, Probe, ProcessConfig, Sidecar, SidecarKind, absolute, check_configured_binary,
        create_dir, first_executable, path_candidates, write_atomically, write_private,
    },
};

/// The client port nats-server listens on unless configured otherwise.
pub const DEFAULT_CLIENT_PORT: u16 = 4222;

const BINARY_NAME: &str = "nats-server";
/// Where `cargo xtask setup` installs nats-server, relative to the repository root.
const TOOLS_BINARY: &str = ".tools/nats/bin/nats-server";
/// Environment variable naming the binary when no path is configured.
const BINARY_ENV: &str = "PLOYZ_NATS_BIN";
const BINARY_PLACES: &str =
    "next to the ployzd executable, under .tools/nats/bin above it, or on PATH";
const BINARY_HINT: &str = "run `cargo xtask setup` or set `nats.binary` / `PLOYZ_NATS_BIN`";

const FILE_NAMES: FileNames = FileNames {
    config: "nats.conf",
    state: "sidecar.json",
    // stdout and stderr of the process: whatever it prints before its log file
    // is open (config errors) or outside it (Go panics).
    output: "nats-output.log",
    // nats-server writes its own (`pid_file`).
    pid: None,
};
const PID_FILE: &str = "nats.pid";
/// A core server's user list, included by `nats.conf` and reloaded in place.
const USERS_FILE: &str = "users.conf";
/// The route certificates a core server trusts and pins, included by the
/// `cluster { tls }` block and reloaded in place.
const ROUTE_PEERS_FILE: &str = "route-peers.conf";
/// Their certificates, the `ca_file` that file names.
const ROUTE_BUNDLE_FILE: &str = "route-peers.pem";
/// The server log, written by nats-server itself (`log_file`).
const LOG_FILE: &str = "nats.log";
const STORE_DIR: &str = "jetstream";

/// Bound on one readiness connection attempt and on waiting for its INFO line.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound on the INFO line; real ones are a few hundred bytes to a few KiB.
const PROBE_MAX_LINE: u64 = 64 * 1024;

/// What the nats-server sidecar should look like. Every field but the two
/// timeouts is part of its identity: changing one makes the next
/// [`NatsSidecar::ensure`] recreate the process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatsSidecarConfig {
    /// The nats-server executable, usually from [`find_binary`].
    pub binary: PathBuf,
    /// Directory the sidecar owns, e.g. `<data_dir>/nats`: config, state file,
    /// logs and the JetStream store.
    pub dir: PathBuf,
    /// NATS `server_name`; JetStream wants it unique in a cluster and free of whitespace.
    pub server_name: String,
    /// Client listen address, `127.0.0.1:4222` by default.
    pub listen: SocketAddr,
    /// HTTP monitoring port on the listen host; `None` disables monitoring.
    pub monitor_port: Option<u16>,
    /// JetStream clustering with other machines' servers; `None` runs a
    /// standalone server (a network of one machine).
    pub cluster: Option<NatsClusterConfig>,
    /// The JetStream domain, the same on every core server; `None` for none.
    /// A hub needs one: nats-server denies the plain JetStream subjects
    /// (`$JS.API.>`, `$KV.>`) across every leaf connection, and clients on a
    /// leaf reach the hub's JetStream only as `$JS.<domain>.API.>`.
    pub jetstream_domain: Option<String>,
    /// This server's part in leaf connections: a core server that accepts
    /// other machines' leaf servers, or a leaf server itself; `None` for neither.
    pub leafnodes: Option<NatsLeafnodes>,
    /// How long a started or adopted server may take to answer on its client port.
    pub start_timeout: Duration,
    /// How long a stopping server gets between SIGTERM and SIGKILL.
    pub stop_grace: Duration,
}

impl NatsSidecarConfig {
    /// A config with the defaults: listen on `127.0.0.1:4222`, no monitoring,
    /// 10 s to start, 10 s to stop.
    pub fn new(binary: PathBuf, dir: PathBuf, server_name: impl Into<String>) -> Self {
        Self {
            binary,
            dir,
            server_name: server_name.into(),
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), DEFAULT_CLIENT_PORT),
            monitor_port: None,
            cluster: None,
            jetstream_domain: None,
            leafnodes: None,
            start_timeout: Duration::from_secs(10),
            stop_grace: Duration::from_secs(10),
        }
    }

    /// True for a leaf server: it runs no JetStream and keeps no store.
    pub fn is_leaf(&self) -> bool {
        matches!(self.leafnodes, Some(NatsLeafnodes::Leaf(_)))
    }

    /// The `nats.conf` text this config renders to, with `binary` and `dir`
    /// made absolute as [`NatsSidecar::ensure`] does. A running server takes a
    /// changed user list by reload (`nats-server --signal reload=<pid>`, or
    /// SIGHUP) once this text is in its config file; `ensure` would instead
    /// replace the process, because the text is the sidecar's identity.
    pub fn render(&self) -> Result<String, SidecarError> {
        Ok(NatsKind::new(self.clone())?.rendered)
    }
}

/// A server's place in a JetStream cluster. JetStream cannot run clustered
/// alone (nats-server refuses a cluster without routes, and a server that
/// only routes to itself waits for a peer forever), so a machine runs
/// standalone until a second machine joins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatsClusterConfig {
    /// The cluster name, the same on every server.
    pub name: String,
    /// Where this server accepts routes: the machine's overlay address.
    pub listen: SocketAddr,
    /// Other servers to route to; they tell each other about the rest.
    pub routes: Vec<SocketAddr>,
    /// The network's route credential: a server accepts routes only from
    /// servers that present it, and presents it on its own routes. Without
    /// it, anything that reaches the route port over the overlay (a
    /// workload container included) could join the store's cluster. `None`
    /// only for networks founded before routes were authenticated.
    pub authorization: Option<NatsUser>,
    /// TLS on routes with this server's own certificate, trusting and
    /// pinning only the certificates of [`NatsRouteTls::peers`]: a
    /// per-server route credential, which one reload takes away (the route
    /// user above is one for the whole cluster). `None`: plain routes.
    pub tls: Option<NatsRouteTls>,
}

/// A core server's route certificate, and the servers it routes with.
///
/// Each server has its own self-signed certificate, for its route listen
/// address. nats-server verifies a route's certificate against `ca_file` in
/// both directions and requires it in `pinned_certs` (the SHA-256 of its
/// public key), both kept in `route-peers.conf`, which `nats.conf` includes:
/// [`NatsSidecar::set_route_peers`] rewrites it and reloads the server in
/// place. A reload that unpins a certificate cuts that server's routes at
/// once; one that only drops it from `ca_file` refuses new routes and keeps
/// the live ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatsRouteTls {
    /// This server's certificate (PEM).
    pub certificate_file: PathBuf,
    /// Its private key (PEM).
    pub key_file: PathBuf,
    /// The servers whose routes are accepted and solicited at start,
    /// normally every core server including this one. Not part of the
    /// sidecar's identity: later lists are set in place.
    pub peers: Vec<NatsRoutePeer>,
}

/// A server whose route certificate is trusted and pinned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatsRoutePeer {
    /// Who it is, for the comment beside its pin.
    pub name: String,
    /// Its self-signed certificate (PEM).
    pub certificate_pem: String,
    /// Hex SHA-256 of the certificate's DER SubjectPublicKeyInfo.
    pub pin: String,
}

/// A freshly made route certificate: self-signed, ECDSA P-256, valid for
/// `address` (the route listen address other servers dial), for both ends of
/// a route (server and client authentication).
pub struct RouteCertificate {
    pub certificate_pem: String,
    /// The private key (PEM, PKCS#8). `Debug` leaves it out.
    pub key_pem: String,
    /// Hex SHA-256 of the DER SubjectPublicKeyInfo: what `pinned_certs` lists.
    pub pin: String,
}

impl std::fmt::Debug for RouteCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteCertificate")
            .field("pin", &self.pin)
            .finish_non_exhaustive()
    }
}

impl RouteCertificate {
    /// The certificate and key in `certificate_file` and `key_file`; when
    /// either is missing, a new pair for `name` and `address` written there
    /// (the key readable by its owner only).
    pub fn load_or_generate(
        certificate_file: &Path,
        key_file: &Path,
        name: &str,
        address: IpAddr,
    ) -> Result<Self, SidecarError> {
        use rcgen::PublicKeyData as _;
        use sha2::Digest as _;
        let read = |path: &Path| std::fs::read_to_string(path);
        if let (Ok(certificate_pem), Ok(key_pem)) = (read(certificate_file), read(key_file)) {
            let key = rcgen::KeyPair::from_pem(&key_pem).map_err(|error| {
                SidecarError::InvalidConfig {
                    field: "cluster.tls.key_file",
                    reason: format!("`{}` is no usable key: {error}", key_file.display()),
                }
            })?;
            return Ok(Self {
                certificate_pem,
                pin: hex::encode(sha2::Sha256::digest(key.subject_public_key_info())),
                key_pem,
            });
        }
        let made = Self::generate(name, address)?;
        if let Some(parent) = key_file.parent() {
            create_dir(parent)?;
        }
        write_private(key_file, made.key_pem.as_bytes())?;
        write_atomically(certificate_file, made.certificate_pem.as_bytes())?;
        Ok(made)
    }

    /// A new key and certificate for the route listener at `address`, named
    /// `name` (the certificate's common name; nats-server does not check it).
    pub fn generate(name: &str, address: IpAddr) -> Result<Self, SidecarError> {
        use rcgen::PublicKeyData as _;
        let failed = |error: rcgen::Error| SidecarError::InvalidConfig {
            field: "cluster.tls",
            reason: format!("cannot make a route certificate: {error}"),
        };
        let key = rcgen::KeyPair::generate().map_err(failed)?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(failed)?;
        params.subject_alt_names = vec![rcgen::SanType::IpAddress(address)];
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let certificate = params.self_signed(&key).map_err(failed)?;
        use sha2::Digest as _;
        Ok(Self {
            certificate_pem: certificate.pem(),
            key_pem: key.serialize_pem(),
            pin: hex::encode(sha2::Sha256::digest(key.subject_public_key_info())),
        })
    }
}

/// How a server takes part in leaf connections. The first machines of a
/// network (the core) run JetStream as one cluster; every further machine runs
/// a leaf server without JetStream that connects to the core servers, and its
/// ployzd uses that leaf server on loopback like a core server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NatsLeafnodes {
    /// A core server accepting the leaf servers of other machines.
    Hub(NatsHubConfig),
    /// A leaf server: no JetStream and no cluster of its own.
    Leaf(NatsLeafConfig),
}

/// A core server's side of leaf connections.
///
/// Leaf users are checked against the server's one user list (the
/// `authorization` block every client is checked against), not a list in the
/// `leafnodes` block: nats-server 2.15 refuses to reload a change of the
/// `leafnodes` users ("config reload not supported for LeafNode: field
/// Users"), while the main list reloads. Since clients are then checked too,
/// this machine's own clients connect as [`Self::local_user`]. A reload
/// refuses the removed user's next connection but leaves its live one open;
/// [`Self::system_user`] may close it (`$SYS.REQ.SERVER.<id>.KICK`).
///
/// That list lives in its own file (`users.conf`, included by `nats.conf`),
/// outside the sidecar's identity: leaf machines come and go by
/// [`NatsSidecar::set_leaf_users`], which rewrites it and reloads the running
/// server in place instead of replacing it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatsHubConfig {
    /// Where other machines' leaf servers connect: this machine's overlay address.
    pub listen: SocketAddr,
    /// The user this machine's own clients (its ployzd) connect as.
    pub local_user: NatsUser,
    /// A user of the system account (`$SYS`): it lists the leaf connections
    /// (`$SYS.REQ.SERVER.PING.LEAFZ`) and closes a revoked machine's one.
    pub system_user: NatsUser,
}

/// A leaf server's connection to the core servers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatsLeafConfig {
    /// The core servers' leaf listen addresses. The leaf server keeps one
    /// connection, to any of them, and tries the next one every second while
    /// it has none.
    pub hubs: Vec<SocketAddr>,
    /// This machine's own user at the core servers.
    pub user: NatsUser,
}

/// A user name and password nats-server checks. Both are rendered as they
/// are, in the config file and in a leaf server's remote URLs, so they are
/// limited to URL-safe characters: ASCII letters, digits, `-`, `.`, `_`, `~`.
/// `Debug` leaves the password out.
#[derive(Clone, PartialEq, Eq)]
pub struct NatsUser {
    /// The user name, unique on a server.
    pub name: String,
    /// The password, kept in plain text in the rendered config file.
    pub password: String,
}

impl NatsUser {
    /// A user called `name` with `password`.
    pub fn new(name: impl Into<String>, password: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            password: password.into(),
        }
    }
}

impl std::fmt::Debug for NatsUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsUser")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Finds the nats-server executable: `configured` if given (it must be an
/// executable file), else `$PLOYZ_NATS_BIN` the same way, else `nats-server`
/// next to the current executable, else `.tools/nats/bin/nats-server` in the
/// nearest ancestor directory of the current executable that has one (where
/// `cargo xtask setup` installs it), else `nats-server` on `PATH`.
pub fn find_binary(configured: Option<&Path>) -> Result<PathBuf, SidecarError> {
    if let Some(path) = configured {
        return check_configured_binary(path);
    }
    if let Some(path) = env::var_os(BINARY_ENV).filter(|value| !value.is_empty()) {
        return check_configured_binary(Path::new(&path));
    }
    let mut candidates = Vec::new();
    if let Some(exe_dir) = env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
    {
        candidates.push(exe_dir.join(BINARY_NAME));
        candidates.extend(exe_dir.ancestors().map(|dir| dir.join(TOOLS_BINARY)));
    }
    candidates.extend(path_candidates(env::var_os("PATH").as_ref(), BINARY_NAME));
    first_executable(&candidates).ok_or(SidecarError::BinaryNotFound {
        name: BINARY_NAME,
        places: BINARY_PLACES,
        hint: BINARY_HINT,
        searched: candidates,
    })
}

/// The files nats-server writes itself, named in its config.
#[derive(Clone, Debug, PartialEq, Eq)]
struct NatsFiles {
    pid: PathBuf,
    users: PathBuf,
    route_peers: PathBuf,
    route_bundle: PathBuf,
    log: PathBuf,
    store: PathBuf,
}

impl NatsFiles {
    fn in_dir(dir: &Path) -> Self {
        Self {
            pid: dir.join(PID_FILE),
            users: dir.join(USERS_FILE),
            route_peers: dir.join(ROUTE_PEERS_FILE),
            route_bundle: dir.join(ROUTE_BUNDLE_FILE),
            log: dir.join(LOG_FILE),
            store: dir.join(STORE_DIR),
        }
    }
}

/// The NATS part of the sidecar: everything derived from the config before
/// looking at the machine.
#[derive(Debug)]
struct NatsKind {
    /// The config with `binary` and `dir` made absolute.
    config: NatsSidecarConfig,
    files: NatsFiles,
    rendered: String,
    /// Where to connect: the listen address, or loopback when it is unspecified.
    client_addr: SocketAddr,
    /// A core server's leaf users as last set: what `users.conf` holds.
    leaf_users: std::sync::Mutex<Vec<NatsUser>>,
    /// The route peers as last set: what `route-peers.conf` holds.
    route_peers: std::sync::Mutex<Vec<NatsRoutePeer>>,
}

impl NatsKind {
    fn new(mut config: NatsSidecarConfig) -> Result<Self, SidecarError> {
        config.dir = absolute("dir", &config.dir)?;
        config.binary = absolute("binary", &config.binary)?;
        let files = NatsFiles::in_dir(&config.dir);
        let rendered = render(&config, &files)?;
        let client_addr = match config.listen.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => {
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), config.listen.port())
            }
            IpAddr::V6(ip) if ip.is_unspecified() => {
                SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), config.listen.port())
            }
            IpAddr::V4(_) | IpAddr::V6(_) => config.listen,
        };
        let route_peers = config
            .cluster
            .as_ref()
            .and_then(|cluster| cluster.tls.as_ref())
            .map(|tls| tls.peers.clone())
            .unwrap_or_default();
        Ok(Self {
            config,
            files,
            rendered,
            client_addr,
            leaf_users: std::sync::Mutex::new(Vec::new()),
            route_peers: std::sync::Mutex::new(route_peers),
        })
    }

    /// Writes `route-peers.conf` and its certificate bundle for `peers` when
    /// they say something else; true when they did. Does nothing on servers
    /// without route TLS.
    fn write_route_peers(&self, peers: &[NatsRoutePeer]) -> Result<bool, SidecarError> {
        if self
            .config
            .cluster
            .as_ref()
            .and_then(|cluster| cluster.tls.as_ref())
            .is_none()
        {
            return Ok(false);
        }
        let (conf, bundle) = render_route_peers(&self.files.route_bundle, peers)?;
        let same =
            |path: &Path, text: &str| std::fs::read_to_string(path).ok().as_deref() == Some(text);
        if same(&self.files.route_bundle, &bundle) && same(&self.files.route_peers, &conf) {
            return Ok(false);
        }
        // The bundle first: the list it is named by never points at a stale one.
        write_atomically(&self.files.route_bundle, bundle.as_bytes())?;
        write_atomically(&self.files.route_peers, conf.as_bytes())?;
        Ok(true)
    }

    /// Writes `users.conf` for `leaf_users` when it says something else;
    /// true when it did. Does nothing on servers that are no hub.
    fn write_users(&self, leaf_users: &[NatsUser]) -> Result<bool, SidecarError> {
        let Some(NatsLeafnodes::Hub(hub)) = &self.config.leafnodes else {
            return Ok(false);
        };
        let text = render_users(hub, leaf_users)?;
        if std::fs::read_to_string(&self.files.users).ok().as_deref() == Some(text.as_str()) {
            return Ok(false);
        }
        write_atomically(&self.files.users, text.as_bytes())?;
        Ok(true)
    }

    fn process_config(&self) -> ProcessConfig {
        ProcessConfig {
            binary: self.config.binary.clone(),
            dir: self.config.dir.clone(),
            start_timeout: self.config.start_timeout,
            stop_grace: self.config.stop_grace,
        }
    }

    fn monitor_addr(&self) -> Option<SocketAddr> {
        self.config
            .monitor_port
            .map(|port| SocketAddr::new(self.config.listen.ip(), port))
    }

    fn client_url(&self) -> String {
        format!("nats://{}", self.client_addr)
    }
}

impl SidecarKind for NatsKind {
    fn name(&self) -> &'static str {
        BINARY_NAME
    }

    fn file_names(&self) -> FileNames {
        FILE_NAMES
    }

    fn rendered_config(&self) -> &str {
        &self.rendered
    }

    fn args(&self, config_file: &Path) -> Vec<OsString> {
        vec!["-c".into(), config_file.into()]
    }

    /// nats-server does not tell its pid; its server name is the identity check.
    async fn probe(&self, _pid: Pid) -> Probe {
        probe(self.client_addr, &self.config.server_name).await
    }

    fn endpoint(&self) -> String {
        self.client_url()
    }

    fn prepare_start(&self) -> Result<(), SidecarError> {
        if !self.config.is_leaf() {
            create_dir(&self.files.store)?;
        }
        {
            let leaf_users = self
                .leaf_users
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            self.write_users(&leaf_users)?;
        }
        {
            let route_peers = self
                .route_peers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            self.write_route_peers(&route_peers)?;
        }
        ensure_port_free(self.config.listen)?;
        if let Some(monitor) = self.monitor_addr() {
            ensure_port_free(monitor)?;
        }
        if let Some(cluster) = &self.config.cluster {
            // Also fails early when the overlay address is not on this machine.
            ensure_port_free(cluster.listen)?;
        }
        if let Some(NatsLeafnodes::Hub(hub)) = &self.config.leafnodes {
            ensure_port_free(hub.listen)?;
        }
        Ok(())
    }

    fn log_files(&self) -> Vec<PathBuf> {
        vec![self.files.log.clone()]
    }
}

/// Renders the nats-server config file. Deterministic: the same config and
/// files always give the same text, so its hash identifies the specification.
fn render(config: &NatsSidecarConfig, files: &NatsFiles) -> Result<String, SidecarError> {
    if config.server_name.is_empty() || config.server_name.chars().any(char::is_whitespace) {
        return Err(SidecarError::InvalidConfig {
            field: "server_name",
            reason: format!(
                "`{}` must be non-empty and contain no whitespace",
                config.server_name
            ),
        });
    }
    if config.listen.port() == 0 {
        return Err(SidecarError::InvalidConfig {
            field: "listen",
            reason: "needs a fixed port: clients and adoption rely on it".to_owned(),
        });
    }
    if config.monitor_port == Some(0) {
        return Err(SidecarError::InvalidConfig {
            field: "monitor_port",
            reason: "needs a fixed port".to_owned(),
        });
    }
    let mut text = String::from(
        "# Rendered by ployzd (services::nats); do not edit. ployzd records a hash\n\
         # of this text and recreates nats-server when the text it would render changes.\n",
    );
    text.push_str(&format!(
        "server_name: {}\n",
        quoted("server_name", &config.server_name)?
    ));
    text.push_str(&format!(
        "host: {}\n",
        quoted("listen", &config.listen.ip().to_string())?
    ));
    text.push_str(&format!("port: {}\n", config.listen.port()));
    if let Some(port) = config.monitor_port {
        let monitor = SocketAddr::new(config.listen.ip(), port);
        text.push_str(&format!(
            "http: {}\n",
            quoted("monitor_port", &monitor.to_string())?
        ));
    }
    text.push_str(&format!("pid_file: {}\n", quoted_path("dir", &files.pid)?));
    text.push_str(&format!("log_file: {}\n", quoted_path("dir", &files.log)?));
    text.push_str("logfile_size_limit: 64MB\n");
    text.push_str("logfile_max_num: 4\n");
    check_roles(config)?;
    if let Some(NatsLeafnodes::Leaf(leaf)) = &config.leafnodes {
        render_leaf(&mut text, leaf)?;
        return Ok(text);
    }
    text.push_str(
        "\n# JetStream fsyncs every write before acknowledging it. The NATS default\n\
         # syncs every two minutes, so acknowledged writes can be lost on power loss.\n\
         # Ployz keeps durable facts here (deploy commits, leases, membership): a lost\n\
         # acknowledged fact is worse than 2-3x slower writes.\n",
    );
    text.push_str("jetstream {\n");
    text.push_str(&format!(
        "  store_dir: {}\n",
        quoted_path("dir", &files.store)?
    ));
    text.push_str("  sync_interval: always\n");
    if let Some(domain) = &config.jetstream_domain {
        text.push_str(concat!(
            "  # Leaf servers' clients address this JetStream as $JS.<domain>.API:\n",
            "  # the plain $JS.API and $KV subjects never cross a leaf connection.\n",
        ));
        text.push_str(&format!(
            "  domain: {}\n",
            quoted("jetstream_domain", domain)?
        ));
    }
    text.push_str("}\n");
    if let Some(cluster) = &config.cluster {
        render_cluster(&mut text, cluster)?;
    }
    if let Some(NatsLeafnodes::Hub(hub)) = &config.leafnodes {
        render_hub(&mut text, hub)?;
    }
    Ok(text)
}

/// Refuses combinations nats-server would reject or that cannot serve the
/// store: a leaf with JetStream settings or routes, a hub without a domain.
fn check_roles(config: &NatsSidecarConfig) -> Result<(), SidecarError> {
    if let Some(domain) = &config.jetstream_domain
        && !is_name(domain)
    {
        return Err(SidecarError::InvalidConfig {
            field: "jetstream_domain",
            reason: format!("`{domain}` must be non-empty ASCII letters, digits, `-` and `_`"),
        });
    }
    match &config.leafnodes {
        Some(NatsLeafnodes::Leaf(_)) if config.cluster.is_some() => {
            Err(SidecarError::InvalidConfig {
                field: "cluster",
                reason: "a leaf server joins no cluster: it reaches the core servers as a leaf"
                    .to_owned(),
            })
        }
        Some(NatsLeafnodes::Leaf(_)) if config.jetstream_domain.is_some() => {
            Err(SidecarError::InvalidConfig {
                field: "jetstream_domain",
                reason: "a leaf server runs no JetStream; its clients name the core's domain"
                    .to_owned(),
            })
        }
        Some(NatsLeafnodes::Hub(_)) if config.jetstream_domain.is_none() => {
            Err(SidecarError::InvalidConfig {
                field: "jetstream_domain",
                reason: "a hub needs one: leaf servers' clients reach JetStream only through it"
                    .to_owned(),
            })
        }
        Some(NatsLeafnodes::Hub(_) | NatsLeafnodes::Leaf(_)) | None => Ok(()),
    }
}

/// True for a non-empty name of ASCII letters, digits, `-` and `_`: what a
/// JetStream domain may be and what needs no quoting in a subject.
fn is_name(value: &str) -> bool {
    !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Checks a user's name and password: non-empty and URL-safe, because a
/// leaf server sends them inside its remote URLs.
fn check_user(field: &'static str, user: &NatsUser) -> Result<(), SidecarError> {
    let url_safe = |value: &str| {
        !value.is_empty()
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~'))
    };
    if !url_safe(&user.name) {
        return Err(SidecarError::InvalidConfig {
            field,
            reason: format!(
                "user name `{}` must be non-empty ASCII letters, digits, `-`, `.`, `_`, `~`",
                user.name
            ),
        });
    }
    if !url_safe(&user.password) {
        return Err(SidecarError::InvalidConfig {
            field,
            reason: format!(
                "the password of `{}` must be non-empty ASCII letters, digits, `-`, `.`, `_`, `~`",
                user.name
            ),
        });
    }
    Ok(())
}

fn render_user(user: &NatsUser) -> String {
    // Both are checked URL-safe, so quoting them needs no escapes.
    format!(
        "{{ user: \"{}\", password: \"{}\" }}",
        user.name, user.password
    )
}

/// Appends a core server's system account, the include of its user list
/// (`users.conf` beside `nats.conf`, which [`render_users`] writes) and its
/// `leafnodes` listener.
fn render_hub(text: &mut String, hub: &NatsHubConfig) -> Result<(), SidecarError> {
    if hub.listen.port() == 0 {
        return Err(SidecarError::InvalidConfig {
            field: "leafnodes.listen",
            reason: "needs a fixed port: other machines' leaf servers connect to it".to_owned(),
        });
    }
    check_user("leafnodes.local_user", &hub.local_user)?;
    check_user("leafnodes.system_user", &hub.system_user)?;
    if hub.local_user.name == hub.system_user.name {
        // nats-server refuses a config naming a user twice.
        return Err(SidecarError::InvalidConfig {
            field: "leafnodes.system_user",
            reason: format!("user `{}` is named twice", hub.system_user.name),
        });
    }
    text.push_str(concat!(
        "\n# The system account's user lists and closes leaf connections: a reload\n",
        "# refuses a removed user's next connection but leaves its live one open.\n",
        "accounts {\n",
        "  \"$SYS\": {\n",
        "    users = [\n",
    ));
    text.push_str(&format!("      {}\n", render_user(&hub.system_user)));
    text.push_str("    ]\n  }\n}\n");
    text.push_str(concat!(
        "\n# One list for clients and leaf servers: nats-server reloads a change of\n",
        "# this list, not of a list in the leafnodes block. Users bind to the global\n",
        "# account, where the store lives. Never no_auth_user, which would also admit a\n",
        "# leaf server that brings no credentials. The list changes as leaf machines\n",
        "# come and go, so it is a file of its own, rewritten and reloaded in place.\n",
        "authorization {\n",
    ));
    // nats-server resolves an include against the including file's directory.
    text.push_str(&format!("  include \"{USERS_FILE}\"\n"));
    text.push_str("}\n");
    text.push_str(concat!(
        "\n# Leaf servers of the machines beyond the core connect here, over the\n",
        "# overlay. Not advertised: each leaf knows every core server already.\n",
        "leafnodes {\n",
    ));
    text.push_str(&format!(
        "  listen: {}\n",
        quoted("leafnodes.listen", &hub.listen.to_string())?
    ));
    text.push_str("  no_advertise: true\n");
    text.push_str("}\n");
    Ok(())
}

/// The text of a core server's `users.conf`: this machine's own clients'
/// user, then one user per leaf machine, sorted by name so the same set
/// always renders the same text.
fn render_users(hub: &NatsHubConfig, leaf_users: &[NatsUser]) -> Result<String, SidecarError> {
    check_user("leafnodes.local_user", &hub.local_user)?;
    let mut leaf_users: Vec<&NatsUser> = leaf_users.iter().collect();
    leaf_users.sort_by(|a, b| a.name.cmp(&b.name));
    let mut names = std::collections::BTreeSet::new();
    names.insert(hub.local_user.name.as_str());
    names.insert(hub.system_user.name.as_str());
    for user in &leaf_users {
        check_user("leaf_users", user)?;
        if !names.insert(user.name.as_str()) {
            // nats-server refuses a config naming a user twice.
            return Err(SidecarError::InvalidConfig {
                field: "leaf_users",
                reason: format!("user `{}` is named twice", user.name),
            });
        }
    }
    let mut text = String::from(
        "# Rendered by ployzd (services::nats); do not edit. Included by nats.conf;\n\
         # rewritten and reloaded in place as leaf machines come and go.\n\
         users = [\n\
         \x20 # This machine's own clients.\n",
    );
    text.push_str(&format!("  {}\n", render_user(&hub.local_user)));
    if !leaf_users.is_empty() {
        text.push_str("  # The leaf servers of other machines, one user each.\n");
    }
    for user in leaf_users {
        text.push_str(&format!("  {}\n", render_user(user)));
    }
    text.push_str("]\n");
    Ok(text)
}

/// Appends a leaf server's `leafnodes` block: one remote listing every core
/// server, with this machine's credentials in each URL. Sorted and
/// deduplicated, like routes.
fn render_leaf(text: &mut String, leaf: &NatsLeafConfig) -> Result<(), SidecarError> {
    check_user("leafnodes.user", &leaf.user)?;
    let mut hubs = leaf.hubs.clone();
    hubs.sort();
    hubs.dedup();
    if hubs.is_empty() {
        return Err(SidecarError::InvalidConfig {
            field: "leafnodes.hubs",
            reason: "a leaf server needs at least one core server to connect to".to_owned(),
        });
    }
    if let Some(hub) = hubs.iter().find(|hub| hub.port() == 0) {
        return Err(SidecarError::InvalidConfig {
            field: "leafnodes.hubs",
            reason: format!("`{hub}` needs a fixed port"),
        });
    }
    text.push_str(concat!(
        "\n# A core server cut off (silent, not closed) is given up after three\n",
        "# unanswered pings five seconds apart, and the next one is tried: the\n",
        "# default (two minutes, twice) would leave this machine without a store\n",
        "# for four minutes.\n",
        "ping_interval: \"5s\"\n",
        "ping_max: 3\n",
    ));
    text.push_str(concat!(
        "\n# A leaf of the core servers: no JetStream here. Clients of this server\n",
        "# reach the core's JetStream through its domain ($JS.<domain>.API). One\n",
        "# connection at a time, to any core server; while there is none, the next\n",
        "# URL is tried every second.\n",
        "leafnodes {\n",
        "  remotes = [\n",
        "    {\n",
        "      urls: [\n",
    ));
    for hub in hubs {
        let url = format!(
            "nats-leaf://{}:{}@{hub}",
            leaf.user.name, leaf.user.password
        );
        text.push_str(&format!("        {}\n", quoted("leafnodes.hubs", &url)?));
    }
    text.push_str("      ]\n    }\n  ]\n}\n");
    Ok(())
}

/// The text of `route-peers.conf` (naming `bundle` as its `ca_file`) and of
/// the bundle, for `peers`, sorted by name so the same set always renders
/// the same text.
fn render_route_peers(
    bundle: &Path,
    peers: &[NatsRoutePeer],
) -> Result<(String, String), SidecarError> {
    let mut peers: Vec<&NatsRoutePeer> = peers.iter().collect();
    peers.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.pin.cmp(&b.pin)));
    peers.dedup_by(|a, b| a.pin == b.pin);
    if peers.is_empty() {
        // An empty ca_file stops nats-server; no peer means no route anyway.
        return Err(SidecarError::InvalidConfig {
            field: "cluster.tls.peers",
            reason: "needs at least one certificate to trust".to_owned(),
        });
    }
    let mut conf = String::from(
        "# Rendered by ployzd (services::nats); do not edit. Included by the\n\
         # cluster tls block of nats.conf; rewritten and reloaded in place.\n",
    );
    conf.push_str(&format!(
        "ca_file: {}\npinned_certs: [\n",
        quoted_path("cluster.tls.peers", bundle)?
    ));
    let mut text = String::new();
    for peer in peers {
        if peer.pin.len() != 64 || !peer.pin.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(SidecarError::InvalidConfig {
                field: "cluster.tls.peers",
                reason: format!("the pin of `{}` is not a hex SHA-256", peer.name),
            });
        }
        let pem = peer.certificate_pem.trim();
        if !pem.starts_with("-----BEGIN CERTIFICATE-----")
            || !pem.ends_with("-----END CERTIFICATE-----")
        {
            return Err(SidecarError::InvalidConfig {
                field: "cluster.tls.peers",
                reason: format!(
                    "the certificate of `{}` is not one PEM certificate",
                    peer.name
                ),
            });
        }
        // The name becomes a comment: keep it on its line.
        let name: String = peer.name.chars().filter(|c| !c.is_control()).collect();
        conf.push_str(&format!(
            "  \"{}\"  # {name}\n",
            peer.pin.to_ascii_lowercase()
        ));
        text.push_str(&format!("# {name}\n{pem}\n"));
    }
    conf.push_str("]\n");
    Ok((conf, text))
}

/// Appends the `cluster` block. Routes are sorted and deduplicated and the
/// server's own listen address is left out, so the same set of machines
/// always renders the same text (and the same identity hash).
fn render_cluster(text: &mut String, cluster: &NatsClusterConfig) -> Result<(), SidecarError> {
    if cluster.name.is_empty() || cluster.name.chars().any(char::is_whitespace) {
        return Err(SidecarError::InvalidConfig {
            field: "cluster.name",
            reason: format!(
                "`{}` must be non-empty and contain no whitespace",
                cluster.name
            ),
        });
    }
    if cluster.listen.port() == 0 {
        return Err(SidecarError::InvalidConfig {
            field: "cluster.listen",
            reason: "needs a fixed port: other machines route to it".to_owned(),
        });
    }
    let mut routes: Vec<SocketAddr> = cluster
        .routes
        .iter()
        .copied()
        .filter(|route| *route != cluster.listen)
        .collect();
    routes.sort();
    routes.dedup();
    if routes.is_empty() {
        // nats-server exits at start ("JetStream cluster requires configured
        // routes"), and routes to itself only leave the meta group waiting
        // for a second server forever.
        return Err(SidecarError::InvalidConfig {
            field: "cluster.routes",
            reason: "needs at least one other server: JetStream does not cluster alone".to_owned(),
        });
    }
    if let Some(route) = routes.iter().find(|route| route.port() == 0) {
        return Err(SidecarError::InvalidConfig {
            field: "cluster.routes",
            reason: format!("`{route}` needs a fixed port"),
        });
    }
    text.push_str(
        "\n# Routes run over the overlay only: the listen address is this machine's\n\
         # overlay address, so nothing of the store is reachable from the underlay.\n\
         # Configured routes are retried every second for as long as the server runs;\n\
         # servers learn about the rest of the cluster from each other.\n",
    );
    text.push_str("cluster {\n");
    text.push_str(&format!(
        "  name: {}\n",
        quoted("cluster.name", &cluster.name)?
    ));
    text.push_str(&format!(
        "  listen: {}\n",
        quoted("cluster.listen", &cluster.listen.to_string())?
    ));
    text.push_str(concat!(
        "  # Each machine's clients are its own ployzd on its own client address.\n",
        "  # Advertised, other machines' client addresses would join the clients'\n",
        "  # reconnect pools and move them onto another machine's server (or, for a\n",
        "  # loopback address, onto whatever listens there on this machine).\n",
    ));
    text.push_str("  no_advertise: true\n");
    let credentials = match &cluster.authorization {
        Some(user) => {
            check_user("cluster.authorization", user)?;
            text.push_str(
                "  # Routes present the network's route credential, and only servers that\n",
            );
            text.push_str("  # present it may route here.\n");
            text.push_str("  authorization {\n");
            text.push_str(&format!(
                "    user: {}\n    password: {}\n",
                quoted("cluster.authorization", &user.name)?,
                quoted("cluster.authorization", &user.password)?
            ));
            text.push_str("  }\n");
            format!("{}:{}@", user.name, user.password)
        }
        None => String::new(),
    };
    if let Some(tls) = &cluster.tls {
        text.push_str(concat!(
            "  # This server's own route certificate. Routes are verified both ways\n",
            "  # against the core servers' certificates, trusted (ca_file) and pinned\n",
            "  # (pinned_certs) in the included file, which is rewritten and reloaded in\n",
            "  # place: unpinning a server cuts its routes at once.\n",
            "  tls {\n",
        ));
        text.push_str(&format!(
            "    cert_file: {}\n",
            quoted_path("cluster.tls.certificate_file", &tls.certificate_file)?
        ));
        text.push_str(&format!(
            "    key_file: {}\n",
            quoted_path("cluster.tls.key_file", &tls.key_file)?
        ));
        // nats-server resolves an include against the including file's directory.
        text.push_str(&format!("    include \"{ROUTE_PEERS_FILE}\"\n"));
        text.push_str("  }\n");
    }
    text.push_str("  routes: [\n");
    for route in routes {
        text.push_str(&format!(
            "    {}\n",
            quoted(
                "cluster.routes",
                &format!("nats-route://{credentials}{route}")
            )?
        ));
    }
    text.push_str("  ]\n");
    text.push_str("}\n");
    Ok(())
}

/// Quotes a config string. Characters that would need escaping are refused
/// rather than escaped, so the rendered file stays obviously correct.
fn quoted(field: &'static str, value: &str) -> Result<String, SidecarError> {
    if value
        .chars()
        .any(|c| c == '"' || c == '\\' || c.is_control())
    {
        return Err(SidecarError::InvalidConfig {
            field,
            reason: format!("`{value}` contains a quote, backslash or control character"),
        });
    }
    Ok(format!("\"{value}\""))
}

fn quoted_path(field: &'static str, path: &Path) -> Result<String, SidecarError> {
    let Some(value) = path.to_str() else {
        return Err(SidecarError::InvalidConfig {
            field,
            reason: format!("`{}` is not valid UTF-8", path.display()),
        });
    };
    quoted(field, value)
}

/// Fails with [`SidecarError::PortInUse`] when another socket listens on `addr`,
/// so the caller learns about the conflict instead of a confusing start failure
/// (or, worse, a readiness probe answered by someone else's server).
fn ensure_port_free(addr: SocketAddr) -> Result<(), SidecarError> {
    // std sets SO_REUSEADDR, so only a listener (not TIME_WAIT leftovers of a
    // previous nats-server) makes this fail.
    match TcpListener::bind(addr) {
        Ok(_listener) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::AddrInUse => {
            Err(SidecarError::PortInUse { addr })
        }
        Err(source) => Err(SidecarError::PortCheck { addr, source }),
    }
}

/// Connects to `addr` and reads the INFO line every NATS server sends first.
async fn probe(addr: SocketAddr, server_name: &str) -> Probe {
    let stream = match timeout(PROBE_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            return Probe::NotReady {
                detail: format!("connect: {error}"),
            };
        }
        Err(_elapsed) => {
            return Probe::NotReady {
                detail: format!("connect timed out after {PROBE_TIMEOUT:?}"),
            };
        }
    };
    let mut line = String::new();
    let mut reader = BufReader::new(stream.take(PROBE_MAX_LINE));
    match timeout(PROBE_TIMEOUT, reader.read_line(&mut line)).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => {
            return Probe::NotReady {
                detail: format!("read INFO: {error}"),
            };
        }
        Err(_elapsed) => {
            return Probe::NotReady {
                detail: format!("no INFO line within {PROBE_TIMEOUT:?}"),
            };
        }
    }
    parse_info(&line, server_name)
}

fn parse_info(line: &str, server_name: &str) -> Probe {
    let Some(info) = line.strip_prefix("INFO ") else {
        return Probe::NotReady {
            detail: "the answer is not a NATS INFO line".to_owned(),
        };
    };
    let found = serde_json::from_str::<serde_json::Value>(info.trim())
        .ok()
        .and_then(|info| info.get("server_name")?.as_str().map(str::to_owned));
    match found {
        Some(found) if found == server_name => Probe::Ready,
        Some(found) => Probe::Wrong {
            detail: format!("server name `{found}`, expected `{server_name}`"),
        },
        None => Probe::NotReady {
            detail: "the INFO line has no server_name".to_owned(),
        },
    }
}

/// The nats-server sidecar of this machine: the process, how it came to run,
/// and its supervision. Share it behind an `Arc` between [`Self::supervise`]
/// and callers of [`Self::status`] and [`Self::stop`]. Dropping it leaves
/// nats-server running.
#[derive(Debug)]
pub struct NatsSidecar {
    sidecar: Sidecar<NatsKind>,
}

impl NatsSidecar {
    /// Makes nats-server run as `config` describes, adopt-first: a running
    /// process that matches the recorded identity (same binary, same rendered
    /// config, same network namespace) and answers is adopted untouched;
    /// drifted or unrecorded ones are stopped and replaced; otherwise one is
    /// started. The result says which in [`SidecarStatus::origin`].
    pub async fn ensure(config: NatsSidecarConfig) -> Result<Self, SidecarError> {
        let kind = NatsKind::new(config)?;
        let process = kind.process_config();
        Ok(Self {
            sidecar: Sidecar::ensure(kind, process).await?,
        })
    }

    /// Watches the process until `shutdown` is cancelled or [`Self::stop`] is
    /// called, restarting it with exponential backoff (1 s to 30 s) whenever it
    /// dies. Returning never stops nats-server: the data plane outlives the
    /// daemon. Run at most one supervision per sidecar.
    pub async fn supervise(&self, shutdown: CancellationToken) {
        self.sidecar.supervise(shutdown).await;
    }

    /// A snapshot of the sidecar's state.
    pub fn status(&self) -> SidecarStatus {
        self.sidecar.status()
    }

    /// A receiver that sees every status change.
    pub fn watch_status(&self) -> watch::Receiver<SidecarStatus> {
        self.sidecar.watch_status()
    }

    /// Where NATS clients connect, e.g. `nats://127.0.0.1:4222`.
    pub fn client_url(&self) -> String {
        self.sidecar.kind().client_url()
    }

    /// The config this sidecar runs with (`binary` and `dir` made absolute).
    pub fn config(&self) -> &NatsSidecarConfig {
        &self.sidecar.kind().config
    }

    /// Stops nats-server (SIGTERM, the grace period, then SIGKILL) and ends
    /// supervision for good: it will not be restarted by this sidecar.
    pub async fn stop(&self) -> Result<(), SidecarError> {
        self.sidecar.stop().await
    }

    /// Makes a core server admit exactly `leaf_users` (besides this machine's
    /// own clients): rewrites `users.conf` and has the running server reload
    /// it (SIGHUP) when the list changed. True when it changed. A removed
    /// user's next connection is refused; a connection it has open stays
    /// until closed through the system account. Refused on servers that
    /// accept no leaf servers.
    pub fn set_leaf_users(&self, leaf_users: Vec<NatsUser>) -> Result<bool, SidecarError> {
        let kind = self.sidecar.kind();
        if !matches!(kind.config.leafnodes, Some(NatsLeafnodes::Hub(_))) {
            return Err(SidecarError::InvalidConfig {
                field: "leafnodes",
                reason: "only a core server accepting leaf servers has leaf users".to_owned(),
            });
        }
        let mut current = kind
            .leaf_users
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let changed = kind.write_users(&leaf_users)?;
        *current = leaf_users;
        if changed {
            self.reload()?;
        }
        Ok(changed)
    }

    /// Makes a core server trust and pin exactly `peers`' route
    /// certificates: rewrites `route-peers.conf` and its bundle and has the
    /// running server reload them (SIGHUP) when they changed. True when they
    /// changed. Routes from a server no longer pinned are cut at the reload.
    /// Refused on servers without route TLS.
    pub fn set_route_peers(&self, peers: Vec<NatsRoutePeer>) -> Result<bool, SidecarError> {
        let kind = self.sidecar.kind();
        if kind
            .config
            .cluster
            .as_ref()
            .and_then(|cluster| cluster.tls.as_ref())
            .is_none()
        {
            return Err(SidecarError::InvalidConfig {
                field: "cluster.tls",
                reason: "only a server with route TLS has route peers".to_owned(),
            });
        }
        let mut current = kind
            .route_peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let changed = kind.write_route_peers(&peers)?;
        *current = peers;
        if changed {
            self.reload()?;
        }
        Ok(changed)
    }

    /// Has the running server reread its config files (SIGHUP). A process
    /// gone meanwhile reads them when restarted.
    fn reload(&self) -> Result<(), SidecarError> {
        if let Some(pid) = self.status().pid {
            super::process::send_signal(pid, libc::SIGHUP).map_err(|source| {
                SidecarError::Signal {
                    pid,
                    signal: "SIGHUP",
                    source,
                }
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::PermissionsExt as _};

    use super::{super::sidecar::identity_hash, *};

    fn config() -> NatsSidecarConfig {
        NatsSidecarConfig::new(
            PathBuf::from("/opt/nats/nats-server"),
            PathBuf::from("/var/lib/ployz/nats"),
            "node-1",
        )
    }

    fn hash_of(config: NatsSidecarConfig) -> String {
        let kind = NatsKind::new(config).expect("valid config");
        identity_hash(&kind.rendered, &kind.config.binary)
    }

    #[test]
    fn rendering_is_deterministic_and_complete() {
        let spec = NatsKind::new(config()).expect("valid config");
        let again = NatsKind::new(config()).expect("valid config");
        assert_eq!(spec.rendered, again.rendered);
        assert_eq!(
            identity_hash(&spec.rendered, &spec.config.binary),
            identity_hash(&again.rendered, &again.config.binary)
        );
        let rendered = &spec.rendered;
        for line in [
            "server_name: \"node-1\"\n",
            "host: \"127.0.0.1\"\n",
            "port: 4222\n",
            "pid_file: \"/var/lib/ployz/nats/nats.pid\"\n",
            "log_file: \"/var/lib/ployz/nats/nats.log\"\n",
            "  store_dir: \"/var/lib/ployz/nats/jetstream\"\n",
            "  sync_interval: always\n",
        ] {
            assert!(rendered.contains(line), "missing {line:?} in\n{rendered}");
        }
        assert!(!rendered.contains("http:"), "monitoring is off by default");
    }

    #[test]
    fn monitor_port_renders_on_the_listen_host() {
        let mut config = config();
        config.listen = "[::1]:4333".parse().expect("socket address");
        config.monitor_port = Some(8222);
        let spec = NatsKind::new(config).expect("valid config");
        assert!(spec.rendered.contains("host: \"::1\"\nport: 4333\n"));
        assert!(spec.rendered.contains("http: \"[::1]:8222\"\n"));
        assert_eq!(spec.client_url(), "nats://[::1]:4333");
    }

    #[test]
    fn every_identity_field_changes_the_hash() {
        let base = hash_of(config());
        let changes = [
            NatsSidecarConfig {
                server_name: "node-2".into(),
                ..config()
            },
            NatsSidecarConfig {
                monitor_port: Some(8222),
                ..config()
            },
            NatsSidecarConfig {
                listen: "127.0.0.1:4223".parse().expect("socket address"),
                ..config()
            },
            NatsSidecarConfig {
                dir: PathBuf::from("/srv/nats"),
                ..config()
            },
            NatsSidecarConfig {
                binary: PathBuf::from("/usr/bin/nats-server"),
                ..config()
            },
            NatsSidecarConfig {
                cluster: Some(cluster()),
                ..config()
            },
            NatsSidecarConfig {
                cluster: Some(NatsClusterConfig {
                    routes: vec!["[fd00:0:0:3::1]:4723".parse().expect("route")],
                    ..cluster()
                }),
                ..config()
            },
            NatsSidecarConfig {
                cluster: Some(NatsClusterConfig {
                    name: "c-4567".into(),
                    ..cluster()
                }),
                ..config()
            },
            NatsSidecarConfig {
                cluster: Some(NatsClusterConfig {
                    listen: "[fd00:0:0:1::1]:4724".parse().expect("listen"),
                    ..cluster()
                }),
                ..config()
            },
            NatsSidecarConfig {
                jetstream_domain: Some("ployz".into()),
                ..config()
            },
            hub_config(),
            NatsSidecarConfig {
                leafnodes: Some(NatsLeafnodes::Hub(NatsHubConfig {
                    system_user: NatsUser::new("system", "another-system-pw"),
                    ..hub()
                })),
                ..hub_config()
            },
            leaf_config(),
            NatsSidecarConfig {
                leafnodes: Some(NatsLeafnodes::Leaf(NatsLeafConfig {
                    user: NatsUser::new("m-4", "another-password"),
                    ..leaf()
                })),
                ..config()
            },
        ];
        let mut hashes = vec![base.clone()];
        for changed in changes {
            let hash = hash_of(changed.clone());
            assert!(!hashes.contains(&hash), "{changed:?}");
            hashes.push(hash);
        }
        // Routes are a set: order and repeats do not make another server.
        let mut reordered = cluster();
        reordered.routes.reverse();
        reordered.routes.push(reordered.routes[0]);
        assert_eq!(
            hash_of(NatsSidecarConfig {
                cluster: Some(reordered),
                ..config()
            }),
            hash_of(NatsSidecarConfig {
                cluster: Some(cluster()),
                ..config()
            })
        );
        // Timeouts are how ployzd treats the process, not what the process is.
        let timeouts = NatsSidecarConfig {
            start_timeout: Duration::from_secs(1),
            stop_grace: Duration::from_secs(1),
            ..config()
        };
        assert_eq!(hash_of(timeouts), base);
    }

    fn cluster() -> NatsClusterConfig {
        NatsClusterConfig {
            name: "c-0123".into(),
            listen: "[fd00:0:0:1::1]:4723".parse().expect("listen"),
            routes: vec![
                "[fd00:0:0:2::1]:4723".parse().expect("route"),
                "[fd00:0:0:1::1]:4723".parse().expect("route"),
                "[fd00:0:0:2::1]:4723".parse().expect("route"),
            ],
            authorization: None,
            tls: None,
        }
    }

    #[test]
    fn a_cluster_block_routes_over_the_overlay_to_others_only() {
        let plain = NatsKind::new(config()).expect("valid").rendered;
        assert!(!plain.contains("cluster"), "{plain}");
        let clustered = NatsKind::new(NatsSidecarConfig {
            cluster: Some(cluster()),
            ..config()
        })
        .expect("valid")
        .rendered;
        assert!(
            clustered.starts_with(&plain),
            "the standalone part is unchanged"
        );
        assert!(clustered.contains("  name: \"c-0123\"\n"), "{clustered}");
        assert!(
            clustered.contains("  listen: \"[fd00:0:0:1::1]:4723\"\n"),
            "{clustered}"
        );
        assert_eq!(
            clustered.matches("nats-route://").count(),
            1,
            "itself excluded, duplicates merged: {clustered}"
        );
        assert!(
            clustered.contains("    \"nats-route://[fd00:0:0:2::1]:4723\"\n"),
            "{clustered}"
        );
        assert!(clustered.contains("  no_advertise: true\n"), "{clustered}");
        assert!(clustered.ends_with("  ]\n}\n"), "{clustered}");
    }

    #[test]
    fn ipv4_routes_render_sorted_without_brackets() {
        let clustered = NatsKind::new(NatsSidecarConfig {
            cluster: Some(NatsClusterConfig {
                name: "c-0123".into(),
                listen: "10.0.0.1:6222".parse().expect("listen"),
                routes: vec![
                    "10.0.0.3:6222".parse().expect("route"),
                    "10.0.0.2:6222".parse().expect("route"),
                ],
                authorization: None,
                tls: None,
            }),
            ..config()
        })
        .expect("valid")
        .rendered;
        assert!(
            clustered.contains(
                "  listen: \"10.0.0.1:6222\"\n\
                 \x20 # Each machine's"
            ),
            "{clustered}"
        );
        assert!(
            clustered.contains(
                "  routes: [\n\
                 \x20   \"nats-route://10.0.0.2:6222\"\n\
                 \x20   \"nats-route://10.0.0.3:6222\"\n\
                 \x20 ]\n"
            ),
            "{clustered}"
        );
    }

    #[test]
    fn invalid_cluster_configs_are_refused_with_the_field() {
        let cases = [
            (
                NatsClusterConfig {
                    name: "two words".into(),
                    ..cluster()
                },
                "cluster.name",
            ),
            (
                NatsClusterConfig {
                    name: String::new(),
                    ..cluster()
                },
                "cluster.name",
            ),
            (
                NatsClusterConfig {
                    name: "with\"quote".into(),
                    ..cluster()
                },
                "cluster.name",
            ),
            (
                NatsClusterConfig {
                    listen: "[fd00:0:0:1::1]:0".parse().expect("listen"),
                    ..cluster()
                },
                "cluster.listen",
            ),
            (
                NatsClusterConfig {
                    routes: vec![],
                    ..cluster()
                },
                "cluster.routes",
            ),
            (
                NatsClusterConfig {
                    routes: vec!["[fd00:0:0:1::1]:4723".parse().expect("itself")],
                    ..cluster()
                },
                "cluster.routes",
            ),
            (
                NatsClusterConfig {
                    routes: vec!["[fd00:0:0:2::1]:0".parse().expect("route")],
                    ..cluster()
                },
                "cluster.routes",
            ),
        ];
        for (cluster, expected_field) in cases {
            let result = NatsKind::new(NatsSidecarConfig {
                cluster: Some(cluster),
                ..config()
            });
            let Err(SidecarError::InvalidConfig { field, .. }) = result else {
                panic!("expected InvalidConfig for {expected_field}, got {result:?}");
            };
            assert_eq!(field, expected_field);
        }
    }

    fn hub() -> NatsHubConfig {
        NatsHubConfig {
            listen: "[fd00:0:0:1::1]:7422".parse().expect("listen"),
            local_user: NatsUser::new("ployzd", "local-pw"),
            system_user: NatsUser::new("system", "system-pw"),
        }
    }

    fn hub_config() -> NatsSidecarConfig {
        NatsSidecarConfig {
            cluster: Some(cluster()),
            jetstream_domain: Some("ployz".into()),
            leafnodes: Some(NatsLeafnodes::Hub(hub())),
            ..config()
        }
    }

    fn leaf() -> NatsLeafConfig {
        NatsLeafConfig {
            hubs: vec![
                "[fd00:0:0:3::1]:7422".parse().expect("hub"),
                "[fd00:0:0:1::1]:7422".parse().expect("hub"),
                "[fd00:0:0:2::1]:7422".parse().expect("hub"),
                "[fd00:0:0:1::1]:7422".parse().expect("hub"),
            ],
            user: NatsUser::new("m-4", "pw-4"),
        }
    }

    fn leaf_config() -> NatsSidecarConfig {
        NatsSidecarConfig {
            leafnodes: Some(NatsLeafnodes::Leaf(leaf())),
            ..config()
        }
    }

    #[test]
    fn a_hub_renders_its_domain_users_and_leaf_listener() {
        let rendered = NatsKind::new(hub_config()).expect("valid").rendered;
        assert!(
            rendered.contains("  sync_interval: always\n  # Leaf servers' clients"),
            "{rendered}"
        );
        assert!(rendered.contains("  domain: \"ployz\"\n}\n"), "{rendered}");
        assert!(
            rendered.contains(
                "accounts {\n\
                 \x20 \"$SYS\": {\n\
                 \x20   users = [\n\
                 \x20     { user: \"system\", password: \"system-pw\" }\n\
                 \x20   ]\n\
                 \x20 }\n\
                 }\n"
            ),
            "{rendered}"
        );
        assert!(
            rendered.contains(
                "authorization {\n\
                 \x20 include \"users.conf\"\n\
                 }\n"
            ),
            "{rendered}"
        );
        assert!(
            rendered.ends_with(
                "leafnodes {\n\
                 \x20 listen: \"[fd00:0:0:1::1]:7422\"\n\
                 \x20 no_advertise: true\n\
                 }\n"
            ),
            "{rendered}"
        );
        assert!(!rendered.contains("\nno_auth_user"), "{rendered}");
        assert!(!rendered.contains("local-pw"), "users live in users.conf");
    }

    #[test]
    fn a_hub_user_list_holds_its_own_clients_and_the_leaf_users_sorted() {
        let leaf_users = [NatsUser::new("m-5", "pw-5"), NatsUser::new("m-4", "pw-4")];
        let text = render_users(&hub(), &leaf_users).expect("valid");
        assert!(
            text.ends_with(
                "users = [\n\
                 \x20 # This machine's own clients.\n\
                 \x20 { user: \"ployzd\", password: \"local-pw\" }\n\
                 \x20 # The leaf servers of other machines, one user each.\n\
                 \x20 { user: \"m-4\", password: \"pw-4\" }\n\
                 \x20 { user: \"m-5\", password: \"pw-5\" }\n\
                 ]\n"
            ),
            "{text}"
        );
        let mut reversed = leaf_users.clone();
        reversed.reverse();
        assert_eq!(render_users(&hub(), &reversed).expect("valid"), text);
        // Without leaf users the list still requires this machine's user:
        // with none at all, nats-server would admit any leaf server.
        let alone = render_users(&hub(), &[]).expect("valid");
        assert!(
            alone.ends_with("{ user: \"ployzd\", password: \"local-pw\" }\n]\n"),
            "{alone}"
        );
        for (users, why) in [
            (vec![NatsUser::new("m-4", "p@ss")], "not URL-safe"),
            (
                vec![NatsUser::new("m-4", "a"), NatsUser::new("m-4", "b")],
                "twice",
            ),
            (vec![NatsUser::new("ployzd", "other")], "the local user"),
            (vec![NatsUser::new("system", "other")], "the system user"),
        ] {
            let result = render_users(&hub(), &users);
            let Err(SidecarError::InvalidConfig { field, .. }) = result else {
                panic!("expected InvalidConfig ({why}), got {result:?}");
            };
            assert_eq!(field, "leaf_users", "{why}");
        }
    }

    fn route_peer(name: &str, seed: char) -> NatsRoutePeer {
        NatsRoutePeer {
            name: name.to_owned(),
            certificate_pem: format!(
                "-----BEGIN CERTIFICATE-----\n{name}\n-----END CERTIFICATE-----\n"
            ),
            pin: seed.to_string().repeat(64),
        }
    }

    #[test]
    fn route_peers_render_sorted_with_their_pins_and_bundle() {
        let bundle = Path::new("/var/lib/ployz/nats/route-peers.pem");
        let peers = [route_peer("m-2", 'b'), route_peer("m-1", 'a')];
        let (conf, pem) = render_route_peers(bundle, &peers).expect("valid");
        assert!(
            conf.ends_with(&format!(
                "ca_file: \"/var/lib/ployz/nats/route-peers.pem\"\n\
                 pinned_certs: [\n  \"{}\"  # m-1\n  \"{}\"  # m-2\n]\n",
                "a".repeat(64),
                "b".repeat(64)
            )),
            "{conf}"
        );
        assert_eq!(
            pem,
            "# m-1\n-----BEGIN CERTIFICATE-----\nm-1\n-----END CERTIFICATE-----\n\
             # m-2\n-----BEGIN CERTIFICATE-----\nm-2\n-----END CERTIFICATE-----\n"
        );
        let mut reversed = peers.to_vec();
        reversed.reverse();
        reversed.push(route_peer("m-1", 'a'));
        assert_eq!(
            render_route_peers(bundle, &reversed).expect("valid"),
            (conf, pem),
            "order and repeats make no other file"
        );
        for (peers, why) in [
            (vec![], "nothing to trust"),
            (
                vec![NatsRoutePeer {
                    pin: "xyz".to_owned(),
                    ..route_peer("m-1", 'a')
                }],
                "a pin that is no SHA-256",
            ),
            (
                vec![NatsRoutePeer {
                    certificate_pem: "not a certificate".to_owned(),
                    ..route_peer("m-1", 'a')
                }],
                "no PEM certificate",
            ),
        ] {
            let result = render_route_peers(bundle, &peers);
            assert!(
                matches!(
                    result,
                    Err(SidecarError::InvalidConfig {
                        field: "cluster.tls.peers",
                        ..
                    })
                ),
                "{why}: {result:?}"
            );
        }
    }

    #[test]
    fn a_route_certificate_is_for_its_address_and_pins_its_public_key() {
        use rcgen::PublicKeyData as _;
        use sha2::Digest as _;
        let made =
            RouteCertificate::generate("m-1", "fd00:0:0:1::1".parse().expect("ip")).expect("made");
        let key = rcgen::KeyPair::from_pem(&made.key_pem).expect("a key");
        assert_eq!(
            made.pin,
            hex::encode(sha2::Sha256::digest(key.subject_public_key_info()))
        );
        assert!(
            made.certificate_pem
                .starts_with("-----BEGIN CERTIFICATE-----")
        );
        assert!(!format!("{made:?}").contains("PRIVATE KEY"));
        let dir = tempfile::tempdir().expect("tempdir");
        let (certificate, key) = (dir.path().join("route.crt"), dir.path().join("route.key"));
        let address = "fd00:0:0:1::1".parse().expect("ip");
        let first =
            RouteCertificate::load_or_generate(&certificate, &key, "m-1", address).expect("made");
        let again =
            RouteCertificate::load_or_generate(&certificate, &key, "m-1", address).expect("loaded");
        assert_eq!(
            (first.pin, first.certificate_pem),
            (again.pin, again.certificate_pem)
        );
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            fs::metadata(&key).expect("key").permissions().mode() & 0o777,
            0o600,
            "the key is its owner's only"
        );
    }

    #[test]
    fn a_leaf_renders_its_remotes_with_its_credentials_and_no_jetstream() {
        let spec = NatsKind::new(leaf_config()).expect("valid");
        let rendered = &spec.rendered;
        assert!(!rendered.contains("jetstream"), "{rendered}");
        assert!(!rendered.contains("store_dir"), "{rendered}");
        assert!(!rendered.contains("cluster"), "{rendered}");
        assert!(
            rendered.contains("\nping_interval: \"5s\"\nping_max: 3\n"),
            "{rendered}"
        );
        assert!(
            rendered.ends_with(
                "leafnodes {\n\
                 \x20 remotes = [\n\
                 \x20   {\n\
                 \x20     urls: [\n\
                 \x20       \"nats-leaf://m-4:pw-4@[fd00:0:0:1::1]:7422\"\n\
                 \x20       \"nats-leaf://m-4:pw-4@[fd00:0:0:2::1]:7422\"\n\
                 \x20       \"nats-leaf://m-4:pw-4@[fd00:0:0:3::1]:7422\"\n\
                 \x20     ]\n\
                 \x20   }\n\
                 \x20 ]\n\
                 }\n"
            ),
            "hubs sorted and deduplicated: {rendered}"
        );
        assert!(rendered.contains("server_name: \"node-1\"\n"), "{rendered}");
        assert_eq!(spec.client_url(), "nats://127.0.0.1:4222");
        assert!(spec.config.is_leaf());
        let ipv4 = NatsKind::new(NatsSidecarConfig {
            leafnodes: Some(NatsLeafnodes::Leaf(NatsLeafConfig {
                hubs: vec!["10.0.0.1:7422".parse().expect("hub")],
                ..leaf()
            })),
            ..config()
        })
        .expect("valid")
        .rendered;
        assert!(
            ipv4.contains("\"nats-leaf://m-4:pw-4@10.0.0.1:7422\"\n"),
            "{ipv4}"
        );
    }

    #[test]
    fn a_users_password_stays_out_of_debug_output() {
        let debug = format!("{:?} {:?}", hub_config(), leaf_config());
        assert!(debug.contains("m-4"), "{debug}");
        assert!(debug.contains("ployzd"), "{debug}");
        assert!(!debug.contains("pw-4"), "{debug}");
        assert!(!debug.contains("local-pw"), "{debug}");
        assert!(!debug.contains("system-pw"), "{debug}");
    }

    #[test]
    fn invalid_leaf_configs_are_refused_with_the_field() {
        let with_hub = |hub: NatsHubConfig| NatsSidecarConfig {
            leafnodes: Some(NatsLeafnodes::Hub(hub)),
            ..hub_config()
        };
        let with_leaf = |leaf: NatsLeafConfig| NatsSidecarConfig {
            leafnodes: Some(NatsLeafnodes::Leaf(leaf)),
            ..config()
        };
        let cases = [
            (
                NatsSidecarConfig {
                    jetstream_domain: None,
                    ..hub_config()
                },
                "jetstream_domain",
            ),
            (
                NatsSidecarConfig {
                    jetstream_domain: Some("ploy.z".into()),
                    ..config()
                },
                "jetstream_domain",
            ),
            (
                NatsSidecarConfig {
                    jetstream_domain: Some(String::new()),
                    ..config()
                },
                "jetstream_domain",
            ),
            (
                NatsSidecarConfig {
                    jetstream_domain: Some("ployz".into()),
                    ..leaf_config()
                },
                "jetstream_domain",
            ),
            (
                NatsSidecarConfig {
                    cluster: Some(cluster()),
                    ..leaf_config()
                },
                "cluster",
            ),
            (
                with_hub(NatsHubConfig {
                    listen: "[fd00:0:0:1::1]:0".parse().expect("listen"),
                    ..hub()
                }),
                "leafnodes.listen",
            ),
            (
                with_hub(NatsHubConfig {
                    local_user: NatsUser::new("ployzd", ""),
                    ..hub()
                }),
                "leafnodes.local_user",
            ),
            (
                with_hub(NatsHubConfig {
                    system_user: NatsUser::new("sys tem", "pw"),
                    ..hub()
                }),
                "leafnodes.system_user",
            ),
            (
                with_hub(NatsHubConfig {
                    system_user: NatsUser::new("ployzd", "other"),
                    ..hub()
                }),
                "leafnodes.system_user",
            ),
            (
                with_leaf(NatsLeafConfig {
                    hubs: vec![],
                    ..leaf()
                }),
                "leafnodes.hubs",
            ),
            (
                with_leaf(NatsLeafConfig {
                    hubs: vec!["[fd00:0:0:1::1]:0".parse().expect("hub")],
                    ..leaf()
                }),
                "leafnodes.hubs",
            ),
            (
                with_leaf(NatsLeafConfig {
                    user: NatsUser::new("m:4", "pw"),
                    ..leaf()
                }),
                "leafnodes.user",
            ),
            (
                with_leaf(NatsLeafConfig {
                    user: NatsUser::new("m-4", "pass/word"),
                    ..leaf()
                }),
                "leafnodes.user",
            ),
        ];
        for (config, expected_field) in cases {
            let result = NatsKind::new(config);
            let Err(SidecarError::InvalidConfig { field, .. }) = result else {
                panic!("expected InvalidConfig for {expected_field}, got {result:?}");
            };
            assert_eq!(field, expected_field);
        }
    }

    #[test]
    fn render_gives_the_text_ensure_writes() {
        assert_eq!(
            hub_config().render().expect("valid"),
            NatsKind::new(hub_config()).expect("valid").rendered
        );
    }

    #[test]
    fn unspecified_listen_address_connects_over_loopback() {
        let mut config = config();
        config.listen = "0.0.0.0:4222".parse().expect("socket address");
        assert_eq!(
            NatsKind::new(config).expect("valid config").client_url(),
            "nats://127.0.0.1:4222"
        );
    }

    #[test]
    fn invalid_configs_are_refused_with_the_field() {
        let cases = [
            (
                NatsSidecarConfig {
                    server_name: "two words".into(),
                    ..config()
                },
                "server_name",
            ),
            (
                NatsSidecarConfig {
                    server_name: String::new(),
                    ..config()
                },
                "server_name",
            ),
            (
                NatsSidecarConfig {
                    listen: "127.0.0.1:0".parse().expect("socket address"),
                    ..config()
                },
                "listen",
            ),
            (
                NatsSidecarConfig {
                    monitor_port: Some(0),
                    ..config()
                },
                "monitor_port",
            ),
            (
                NatsSidecarConfig {
                    dir: PathBuf::from("/tmp/with\"quote"),
                    ..config()
                },
                "dir",
            ),
        ];
        for (config, expected_field) in cases {
            let result = NatsKind::new(config);
            let Err(SidecarError::InvalidConfig { field, .. }) = result else {
                panic!("expected InvalidConfig for {expected_field}, got {result:?}");
            };
            assert_eq!(field, expected_field);
        }
    }

    #[test]
    fn info_lines_are_checked_for_our_server_name() {
        let info = "INFO {\"server_id\":\"X\",\"server_name\":\"node-1\",\"port\":4222}\r\n";
        assert_eq!(parse_info(info, "node-1"), Probe::Ready);
        assert_eq!(
            parse_info(info, "node-2"),
            Probe::Wrong {
                detail: "server name `node-1`, expected `node-2`".into()
            }
        );
        assert!(matches!(
            parse_info("HTTP/1.1 400\r\n", "node-1"),
            Probe::NotReady { .. }
        ));
        assert!(matches!(
            parse_info("INFO {}\r\n", "node-1"),
            Probe::NotReady { .. }
        ));
    }

    #[test]
    fn configured_binary_must_be_an_executable_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let missing = dir.path().join("missing");
        let result = find_binary(Some(&missing));
        let Err(error @ SidecarError::ConfiguredBinaryMissing { .. }) = result else {
            panic!("expected ConfiguredBinaryMissing, got {result:?}");
        };
        assert!(
            error.to_string().contains(&missing.display().to_string()),
            "{error}"
        );
        let plain = dir.path().join("plain");
        fs::write(&plain, b"not a program").expect("write file");
        assert!(matches!(
            find_binary(Some(&plain)),
            Err(SidecarError::BinaryNotExecutable { .. })
        ));
        assert!(matches!(
            find_binary(Some(dir.path())),
            Err(SidecarError::BinaryNotExecutable { .. })
        ));
        fs::set_permissions(&plain, fs::Permissions::from_mode(0o755)).expect("chmod");
        assert_eq!(find_binary(Some(&plain)).expect("executable"), plain);
    }

    #[test]
    fn binary_not_found_tells_how_to_fix_it() {
        let error = SidecarError::BinaryNotFound {
            name: BINARY_NAME,
            places: BINARY_PLACES,
            hint: BINARY_HINT,
            searched: vec![],
        };
        let message = error.to_string();
        assert!(message.contains("cargo xtask setup"), "{message}");
        assert!(message.contains("PLOYZ_NATS_BIN"), "{message}");
        assert!(message.contains("nats.binary"), "{message}");
    }
}
