//! The routing table: the part of each namespace's latest deploy commit that the
//! gateway and DNS serve. It is a pure projection of committed facts; nothing
//! here is observed or guessed. A namespace's entry changes only when a commit
//! with a higher sequence number arrives, which is what makes a deploy's commit
//! its traffic flip.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use serde::{Deserialize, Serialize};

/// The DNS zone under which services are named: `<service>.<namespace>.ployz.internal`.
pub const ZONE: &str = "ployz.internal";

/// The store key prefix of deploy commits: `deploys.<namespace>.<seq>`.
pub const COMMIT_KEY_PREFIX: &str = "deploys.";

/// A route as a deploy commits it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RouteRecord {
    pub service: String,
    /// HTTP host names; empty for a TCP route.
    pub hosts: Vec<String>,
    /// HTTP path prefixes; empty means every path.
    pub paths: Vec<String>,
    /// The port the gateway listens on for a TCP route.
    pub tcp: Option<u16>,
    /// The container port traffic goes to.
    pub port: u16,
    /// `ip:port` of every instance.
    pub instances: Vec<String>,
    /// Certificate and key (PEM files on the gateway's machine) for `hosts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsFiles>,
}

/// PEM files of a certificate chain and its private key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TlsFiles {
    pub certificate: String,
    pub key: String,
}

/// The fields of a deploy commit that routing reads. Unknown fields are ignored,
/// so the commit can grow without breaking older gateways.
#[derive(Clone, Debug, Deserialize)]
pub struct CommitView {
    pub commit: CommitRef,
    pub created_at_unix_ms: u64,
    #[serde(default)]
    pub services: BTreeMap<String, ServiceView>,
    #[serde(default)]
    pub routes: Vec<RouteRecord>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct CommitRef {
    pub namespace: String,
    pub seq: u64,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ServiceView {
    #[serde(default)]
    pub containers: Vec<ContainerView>,
    /// Container ports of the service (for SRV answers).
    #[serde(default)]
    pub ports: Vec<u16>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ContainerView {
    #[serde(default)]
    pub replica: u32,
    #[serde(default)]
    pub machine: String,
    #[serde(default)]
    pub addresses: Vec<String>,
}

impl CommitView {
    /// Decodes a commit record's value.
    pub fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// What is served, for every namespace that has a commit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutingTable {
    pub namespaces: BTreeMap<String, NamespaceTable>,
}

/// One namespace as of its latest commit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceTable {
    /// The commit these facts come from.
    pub seq: u64,
    pub committed_at_unix_ms: u64,
    pub services: BTreeMap<String, ServiceEntry>,
    pub http: Vec<HttpRoute>,
    pub tcp: Vec<TcpRoute>,
}

/// A service's instances, for DNS.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceEntry {
    pub ports: Vec<u16>,
    pub instances: Vec<Instance>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub replica: u32,
    pub machine: String,
    pub addresses: Vec<IpAddr>,
}

/// Requests for any of `hosts` whose path starts with one of `paths` go to `upstreams`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpRoute {
    pub service: String,
    /// Lowercase host names, without port or trailing dot.
    pub hosts: Vec<String>,
    /// Path prefixes, each starting with `/`; `["/"]` when the commit named none.
    pub paths: Vec<String>,
    pub tls: Option<TlsFiles>,
    pub upstreams: Vec<SocketAddr>,
}

/// Connections to `listen_port` go to `upstreams`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpRoute {
    pub service: String,
    pub listen_port: u16,
    pub upstreams: Vec<SocketAddr>,
}

impl NamespaceTable {
    /// Projects a commit. Entries a well-behaved ployzd never writes (an
    /// unparsable address, a route without a service) are left out rather than
    /// failing the whole namespace: one bad fact must not take every route down.
    pub fn project(view: &CommitView) -> Self {
        let services = view
            .services
            .iter()
            .map(|(name, service)| {
                let mut ports = service.ports.clone();
                ports.extend(
                    view.routes
                        .iter()
                        .filter(|route| &route.service == name)
                        .map(|route| route.port),
                );
                ports.sort_unstable();
                ports.dedup();
                let instances = service
                    .containers
                    .iter()
                    .map(|container| Instance {
                        replica: container.replica,
                        machine: container.machine.clone(),
                        addresses: container
                            .addresses
                            .iter()
                            .filter_map(|address| address.parse().ok())
                            .collect(),
                    })
                    .collect();
                (name.clone(), ServiceEntry { ports, instances })
            })
            .collect();
        let upstreams = |route: &RouteRecord| -> Vec<SocketAddr> {
            route
                .instances
                .iter()
                .filter_map(|instance| instance.parse().ok())
                .collect()
        };
        let mut http = Vec::new();
        let mut tcp = Vec::new();
        for route in &view.routes {
            if let Some(listen_port) = route.tcp {
                tcp.push(TcpRoute {
                    service: route.service.clone(),
                    listen_port,
                    upstreams: upstreams(route),
                });
            } else if !route.hosts.is_empty() {
                let paths = if route.paths.is_empty() {
                    vec!["/".to_owned()]
                } else {
                    route.paths.clone()
                };
                http.push(HttpRoute {
                    service: route.service.clone(),
                    hosts: route
                        .hosts
                        .iter()
                        .map(|host| normalize_host(host))
                        .collect(),
                    paths,
                    tls: route.tls.clone(),
                    upstreams: upstreams(route),
                });
            }
        }
        Self {
            seq: view.commit.seq,
            committed_at_unix_ms: view.created_at_unix_ms,
            services,
            http,
            tcp,
        }
    }
}

impl RoutingTable {
    /// Takes in a commit if it is newer than what the table holds for its
    /// namespace. Returns whether the table changed.
    pub fn apply(&mut self, view: &CommitView) -> bool {
        let newer = self
            .namespaces
            .get(&view.commit.namespace)
            .is_none_or(|current| current.seq < view.commit.seq);
        if newer {
            self.namespaces
                .insert(view.commit.namespace.clone(), NamespaceTable::project(view));
        }
        newer
    }

    /// Every HTTP route with its namespace, namespaces in name order.
    pub fn http_routes(&self) -> impl Iterator<Item = (&str, &HttpRoute)> {
        self.namespaces
            .iter()
            .flat_map(|(ns, table)| table.http.iter().map(move |route| (ns.as_str(), route)))
    }

    /// Every TCP route with its namespace, namespaces in name order.
    pub fn tcp_routes(&self) -> impl Iterator<Item = (&str, &TcpRoute)> {
        self.namespaces
            .iter()
            .flat_map(|(ns, table)| table.tcp.iter().map(move |route| (ns.as_str(), route)))
    }

    /// The commit served for each namespace, as `<namespace>/<seq>`.
    pub fn commits(&self) -> impl Iterator<Item = (&str, u64)> {
        self.namespaces
            .iter()
            .map(|(ns, table)| (ns.as_str(), table.seq))
    }
}

/// Lowercases a host and drops a trailing dot, the form routes are matched in.
pub fn normalize_host(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// Parses a commit key `deploys.<namespace>.<seq>` into its namespace and sequence.
pub fn parse_commit_key(key: &str) -> Option<(&str, u64)> {
    let rest = key.strip_prefix(COMMIT_KEY_PREFIX)?;
    let (namespace, seq) = rest.split_once('.')?;
    let seq = seq.parse().ok()?;
    (!namespace.is_empty()).then_some((namespace, seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(ns: &str, seq: u64, body: &str) -> CommitView {
        CommitView::decode(
            format!(
                r#"{{"commit":{{"namespace":"{ns}","seq":{seq}}},"created_at_unix_ms":{seq}000,{body}}}"#
            )
            .as_bytes(),
        )
        .expect("valid commit")
    }

    #[test]
    fn projects_services_and_routes() {
        let view = commit(
            "shop",
            3,
            r#""services":{"web":{"containers":[{"replica":0,"machine":"m1","addresses":["172.17.0.2","fd00::2","bogus"]}]}},
               "routes":[{"service":"web","hosts":["Shop.Example.COM."],"paths":[],"tcp":null,"port":8080,"instances":["172.17.0.2:8080","nope"]},
                         {"service":"db","hosts":[],"paths":[],"tcp":15432,"port":5432,"instances":["[fd00::3]:5432"]}],
               "manifest":{"ignored":true}"#,
        );
        let table = NamespaceTable::project(&view);
        assert_eq!(table.seq, 3);
        let web = &table.services["web"];
        assert_eq!(web.ports, vec![8080]);
        assert_eq!(
            web.instances[0].addresses,
            vec![
                "172.17.0.2".parse::<IpAddr>().expect("ip"),
                "fd00::2".parse().expect("ip")
            ]
        );
        assert_eq!(table.http.len(), 1);
        assert_eq!(table.http[0].hosts, vec!["shop.example.com"]);
        assert_eq!(table.http[0].paths, vec!["/"]);
        assert_eq!(
            table.http[0].upstreams,
            vec!["172.17.0.2:8080".parse().expect("addr")]
        );
        assert_eq!(table.tcp[0].listen_port, 15432);
        assert_eq!(
            table.tcp[0].upstreams,
            vec!["[fd00::3]:5432".parse().expect("addr")]
        );
    }

    #[test]
    fn only_newer_commits_replace_a_namespace() {
        let mut table = RoutingTable::default();
        assert!(table.apply(&commit("shop", 2, r#""routes":[]"#)));
        assert!(!table.apply(&commit("shop", 1, r#""routes":[]"#)));
        assert!(!table.apply(&commit("shop", 2, r#""routes":[]"#)));
        assert!(table.apply(&commit("shop", 3, r#""routes":[]"#)));
        assert_eq!(table.commits().collect::<Vec<_>>(), vec![("shop", 3)]);
    }

    #[test]
    fn commit_keys_parse() {
        assert_eq!(
            parse_commit_key("deploys.shop.0000000012"),
            Some(("shop", 12))
        );
        assert_eq!(parse_commit_key("deploys.shop"), None);
        assert_eq!(parse_commit_key("deploys..1"), None);
        assert_eq!(parse_commit_key("ops.x.1"), None);
    }
}
