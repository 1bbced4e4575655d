//! The daemon's side of routing: it renders the gateway's and DNS's config
//! files, asks the running processes what they serve (for `routes ls` and for a
//! deploy's traffic flip), and finds the address containers reach DNS on.

use std::{
    future::Future,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    pin::Pin,
    time::Duration,
};

use ployz_routing::{
    admin::{self, AdminStatus},
    config::{DnsConfig, GatewayConfig, SourceConfig},
};

use super::config::DaemonConfig;
use crate::{
    deploy::{
        CommitId,
        traffic::{RouteServing, Served},
    },
    services::routing::RoutingProcess,
};

/// How long one status query may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(1);
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// The two routing processes a machine runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    Gateway,
    Dns,
}

impl Component {
    pub const ALL: [Component; 2] = [Component::Gateway, Component::Dns];

    pub fn name(self) -> &'static str {
        match self {
            Component::Gateway => "gateway",
            Component::Dns => "dns",
        }
    }

    pub fn process(self) -> RoutingProcess {
        match self {
            Component::Gateway => RoutingProcess::Gateway,
            Component::Dns => RoutingProcess::Dns,
        }
    }

    /// The binary the configuration names, if any.
    pub fn configured_binary(self, config: &DaemonConfig) -> Option<&std::path::Path> {
        match self {
            Component::Gateway => config.gateway.binary.as_deref(),
            Component::Dns => config.dns.binary.as_deref(),
        }
    }

    /// The directory the sidecar owns under the data dir.
    pub fn dir(self, config: &DaemonConfig) -> PathBuf {
        config.data_dir.join(self.name())
    }

    pub fn admin_socket(self, config: &DaemonConfig) -> PathBuf {
        self.dir(config).join("admin.sock")
    }

    fn source(self, config: &DaemonConfig, nats: &super::NatsClient) -> SourceConfig {
        SourceConfig {
            nats_url: Some(nats.url.clone()),
            credentials: nats.credentials.as_ref().map(|credentials| {
                ployz_routing::config::NatsCredentials {
                    user: credentials.user.clone(),
                    password: credentials.password.clone(),
                }
            }),
            jetstream_domain: nats.jetstream_domain.clone(),
            bucket: "ployz".to_owned(),
            state_dir: self.dir(config).join("state"),
            admin_socket: self.admin_socket(config),
        }
    }

    /// The process's config file, rendered.
    pub(crate) fn render(self, config: &DaemonConfig, nats: &super::NatsClient) -> String {
        let source = self.source(config, nats);
        match self {
            Component::Gateway => ployz_routing::config::render(&GatewayConfig {
                source,
                http_listen: config.gateway.http_listen.clone(),
                https_listen: config.gateway.https_listen.clone(),
                tcp_listen_ip: config.gateway.tcp_listen_ip,
            }),
            Component::Dns => ployz_routing::config::render(&DnsConfig {
                source,
                listen: dns_listen(config),
                upstreams: config.dns.upstreams.clone(),
                resolv_conf: PathBuf::from("/etc/resolv.conf"),
            }),
        }
    }
}

/// Where DNS listens: as configured, else loopback and the Docker bridge's
/// address, port 53.
pub fn dns_listen(config: &DaemonConfig) -> Vec<SocketAddr> {
    config.dns.listen.clone().unwrap_or_else(|| {
        let mut listen = vec![SocketAddr::from((Ipv4Addr::LOCALHOST, 53))];
        if let Some(bridge) = interface_ipv4("docker0") {
            listen.push(SocketAddr::from((bridge, 53)));
        }
        listen
    })
}

/// The DNS servers containers are given: listeners they can reach (not
/// loopback, not unspecified) on port 53, the only port resolv.conf can name.
pub fn container_dns(config: &DaemonConfig) -> Vec<IpAddr> {
    dns_listen(config)
        .into_iter()
        .filter(|addr| addr.port() == 53 && !addr.ip().is_loopback() && !addr.ip().is_unspecified())
        .map(|addr| addr.ip())
        .collect()
}

/// The first IPv4 address of a network interface.
fn interface_ipv4(name: &str) -> Option<Ipv4Addr> {
    let mut addresses: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a linked list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut addresses) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cursor = addresses;
    while !cursor.is_null() {
        // SAFETY: cursor points into the list getifaddrs returned.
        let entry = unsafe { &*cursor };
        cursor = entry.ifa_next;
        if entry.ifa_addr.is_null() || entry.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let entry_name = unsafe { std::ffi::CStr::from_ptr(entry.ifa_name) };
        // SAFETY: ifa_addr is non-null and points to a sockaddr of its family.
        let family = unsafe { (*entry.ifa_addr).sa_family };
        if entry_name.to_bytes() == name.as_bytes() && i32::from(family) == libc::AF_INET {
            // SAFETY: an AF_INET address is a sockaddr_in.
            let address = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_in) };
            found = Some(Ipv4Addr::from(u32::from_be(address.sin_addr.s_addr)));
            break;
        }
    }
    // SAFETY: the list came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(addresses) };
    found
}

/// Asks one routing process what it serves.
pub async fn query(config: &DaemonConfig, component: Component) -> Result<AdminStatus, String> {
    admin::query(&component.admin_socket(config), QUERY_TIMEOUT)
        .await
        .map_err(|error| crate::error_chain(&error))
}

/// The traffic flip, confirmed by asking the gateway and DNS.
pub struct AdminRouteServing {
    config: DaemonConfig,
}

impl AdminRouteServing {
    pub fn new(config: DaemonConfig) -> Self {
        Self { config }
    }

    async fn wait(&self, commit: &CommitId, within: Duration) -> Served {
        let deadline = tokio::time::Instant::now() + within;
        let mut confirmed = Vec::new();
        for component in Component::ALL {
            loop {
                let outcome = query(&self.config, component).await;
                let serves = outcome.as_ref().is_ok_and(|status| {
                    status
                        .namespaces
                        .iter()
                        .any(|ns| ns.namespace == commit.namespace && ns.seq >= commit.seq)
                });
                if serves {
                    confirmed.push(component.name().to_owned());
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    let detail = match outcome {
                        Ok(status) => format!(
                            "{} serves {} (origin {})",
                            component.name(),
                            status
                                .namespaces
                                .iter()
                                .find(|ns| ns.namespace == commit.namespace)
                                .map_or("nothing of the namespace".to_owned(), |ns| format!(
                                    "{}/{}",
                                    ns.namespace, ns.seq
                                )),
                            status.origin.as_str()
                        ),
                        Err(error) => format!("{}: {error}", component.name()),
                    };
                    return Served::Unconfirmed { detail };
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        }
        Served::Confirmed { by: confirmed }
    }
}

impl RouteServing for AdminRouteServing {
    fn wait_served<'a>(
        &'a self,
        commit: &'a CommitId,
        within: Duration,
    ) -> Pin<Box<dyn Future<Output = Served> + Send + 'a>> {
        Box::pin(self.wait(commit, within))
    }
}

impl super::Daemon {
    /// Each routing process's own report, asked now, concurrently.
    pub async fn routing_processes(&self) -> Vec<(Component, Result<AdminStatus, String>)> {
        let (gateway, dns) = tokio::join!(
            query(&self.config, Component::Gateway),
            query(&self.config, Component::Dns)
        );
        vec![(Component::Gateway, gateway), (Component::Dns, dns)]
    }
}
