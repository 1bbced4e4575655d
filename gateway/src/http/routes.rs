//! The compiled form of a routing table's HTTP routes: a host map whose entries
//! are path prefixes sorted longest first. It is built once per snapshot and is
//! pure (no I/O), so the matching rules are unit-tested here exhaustively.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use ployz_routing::Snapshot;

/// Where one matched request goes: a route's upstreams and its round-robin cursor.
#[derive(Debug)]
pub struct Backend {
    pub namespace: String,
    pub service: String,
    pub upstreams: Vec<SocketAddr>,
    next: AtomicUsize,
}

impl Backend {
    pub fn new(namespace: &str, service: &str, upstreams: Vec<SocketAddr>) -> Self {
        Self {
            namespace: namespace.to_owned(),
            service: service.to_owned(),
            upstreams,
            next: AtomicUsize::new(0),
        }
    }

    /// The upstreams in round-robin order for one request: every call starts
    /// one further along, so consecutive requests spread across upstreams.
    pub fn rotation(&self) -> Vec<SocketAddr> {
        let count = self.upstreams.len();
        if count == 0 {
            return Vec::new();
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % count;
        (0..count)
            .map(|offset| self.upstreams[(start + offset) % count])
            .collect()
    }
}

#[derive(Debug)]
struct PrefixRoute {
    prefix: String,
    backend: Arc<Backend>,
}

/// The HTTP routes of one snapshot, ready for lookups.
#[derive(Debug)]
pub struct CompiledRoutes {
    pub snapshot: Arc<Snapshot>,
    hosts: HashMap<String, Vec<PrefixRoute>>,
}

impl CompiledRoutes {
    /// Compiles a snapshot. Namespaces come in name order, so when two claim
    /// the same host and prefix the one whose name sorts first keeps it.
    pub fn compile(snapshot: Arc<Snapshot>) -> Self {
        let mut hosts: HashMap<String, Vec<PrefixRoute>> = HashMap::new();
        for (namespace, route) in snapshot.table.http_routes() {
            let backend = Arc::new(Backend::new(
                namespace,
                &route.service,
                route.upstreams.clone(),
            ));
            for host in &route.hosts {
                let entries = hosts.entry(normalize_host(host)).or_default();
                for path in &route.paths {
                    let prefix = normalize_prefix(path);
                    if entries.iter().any(|entry| entry.prefix == prefix) {
                        continue;
                    }
                    entries.push(PrefixRoute {
                        prefix,
                        backend: Arc::clone(&backend),
                    });
                }
            }
        }
        for entries in hosts.values_mut() {
            // Longest first; the sort is stable, so equal lengths keep table order.
            entries.sort_by_key(|entry| std::cmp::Reverse(entry.prefix.len()));
        }
        Self { snapshot, hosts }
    }

    /// The backend for a host (already normalized by [`normalize_host`]) and a
    /// path: the longest matching prefix of the exact host, else of a
    /// `*.parent` wildcard host.
    pub fn lookup(&self, host: &str, path: &str) -> Option<&Arc<Backend>> {
        if let Some(backend) = self.lookup_exact(host, path) {
            return Some(backend);
        }
        let (_, parent) = host.split_once('.')?;
        self.lookup_exact(&format!("*.{parent}"), path)
    }

    fn lookup_exact(&self, host: &str, path: &str) -> Option<&Arc<Backend>> {
        self.hosts
            .get(host)?
            .iter()
            .find(|entry| prefix_matches(&entry.prefix, path))
            .map(|entry| &entry.backend)
    }
}

/// Whether `prefix` matches `path` on a segment boundary: `/api` matches `/api`
/// and `/api/x` but not `/apix`; `/api/` and `/` match everything below them.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
    }
}

/// A prefix as matched: it starts with `/`.
fn normalize_prefix(path: &str) -> String {
    if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    }
}

/// The host part of a `Host` header or `:authority`, as routes name it:
/// without port, userinfo or trailing dot, lowercase. IPv6 literals keep
/// their brackets.
pub fn normalize_host(authority: &str) -> String {
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let host = if host.starts_with('[') {
        host.find(']').map_or(host, |end| &host[..=end])
    } else {
        host.split_once(':').map_or(host, |(name, _)| name)
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ployz_routing::{HttpRoute, NamespaceTable, RoutingTable};

    use super::*;

    fn route(service: &str, hosts: &[&str], paths: &[&str]) -> HttpRoute {
        HttpRoute {
            service: service.to_owned(),
            hosts: hosts.iter().map(|host| (*host).to_owned()).collect(),
            paths: paths.iter().map(|path| (*path).to_owned()).collect(),
            tls: None,
            upstreams: vec!["127.0.0.1:1".parse().expect("addr")],
        }
    }

    fn compiled(namespaces: &[(&str, Vec<HttpRoute>)]) -> CompiledRoutes {
        let mut table = RoutingTable::default();
        for (name, http) in namespaces {
            table.namespaces.insert(
                (*name).to_owned(),
                NamespaceTable {
                    seq: 1,
                    committed_at_unix_ms: 0,
                    services: BTreeMap::new(),
                    http: http.clone(),
                    tcp: Vec::new(),
                },
            );
        }
        CompiledRoutes::compile(Arc::new(Snapshot {
            table,
            ..Snapshot::default()
        }))
    }

    fn service(routes: &CompiledRoutes, host: &str, path: &str) -> Option<String> {
        routes
            .lookup(host, path)
            .map(|backend| format!("{}/{}", backend.namespace, backend.service))
    }

    #[test]
    fn prefixes_match_on_segment_boundaries() {
        assert!(prefix_matches("/", "/"));
        assert!(prefix_matches("/", "/anything/below"));
        assert!(prefix_matches("/api", "/api"));
        assert!(prefix_matches("/api", "/api/x"));
        assert!(!prefix_matches("/api", "/apix"));
        assert!(prefix_matches("/api/", "/api/x"));
        assert!(!prefix_matches("/api/", "/api"));
        assert!(!prefix_matches("/api", "/"));
    }

    #[test]
    fn hosts_normalize() {
        assert_eq!(normalize_host("Shop.Example.COM"), "shop.example.com");
        assert_eq!(normalize_host("shop.example.com:8080"), "shop.example.com");
        assert_eq!(normalize_host("shop.example.com."), "shop.example.com");
        assert_eq!(normalize_host("user@shop:1"), "shop");
        assert_eq!(normalize_host("[::1]:8080"), "[::1]");
        assert_eq!(normalize_host("[::1"), "[::1");
        assert_eq!(normalize_host(""), "");
    }

    #[test]
    fn longest_prefix_wins() {
        let routes = compiled(&[(
            "shop",
            vec![
                route("web", &["shop.test"], &["/"]),
                route("api", &["shop.test"], &["/api"]),
                route("v2", &["shop.test"], &["/api/v2"]),
            ],
        )]);
        assert_eq!(
            service(&routes, "shop.test", "/").as_deref(),
            Some("shop/web")
        );
        assert_eq!(
            service(&routes, "shop.test", "/apix").as_deref(),
            Some("shop/web")
        );
        assert_eq!(
            service(&routes, "shop.test", "/api").as_deref(),
            Some("shop/api")
        );
        assert_eq!(
            service(&routes, "shop.test", "/api/v1").as_deref(),
            Some("shop/api")
        );
        assert_eq!(
            service(&routes, "shop.test", "/api/v2/x").as_deref(),
            Some("shop/v2")
        );
        assert_eq!(service(&routes, "other.test", "/"), None);
    }

    #[test]
    fn first_namespace_by_name_wins_a_conflict() {
        let routes = compiled(&[
            ("zeta", vec![route("z", &["shop.test"], &["/"])]),
            ("alpha", vec![route("a", &["shop.test"], &["/"])]),
        ]);
        assert_eq!(
            service(&routes, "shop.test", "/x").as_deref(),
            Some("alpha/a")
        );
    }

    #[test]
    fn no_prefix_matches_means_no_route() {
        let routes = compiled(&[("shop", vec![route("api", &["shop.test"], &["/api"])])]);
        assert_eq!(service(&routes, "shop.test", "/"), None);
    }

    #[test]
    fn wildcard_hosts_match_one_label() {
        let routes = compiled(&[(
            "shop",
            vec![
                route("any", &["*.shop.test"], &["/"]),
                route("www", &["www.shop.test"], &["/"]),
            ],
        )]);
        assert_eq!(
            service(&routes, "www.shop.test", "/").as_deref(),
            Some("shop/www")
        );
        assert_eq!(
            service(&routes, "eu.shop.test", "/").as_deref(),
            Some("shop/any")
        );
        assert_eq!(service(&routes, "shop.test", "/"), None);
    }

    #[test]
    fn rotation_starts_one_further_each_time() {
        let backend = Backend {
            namespace: "n".into(),
            service: "s".into(),
            upstreams: vec![
                "127.0.0.1:1".parse().expect("addr"),
                "127.0.0.1:2".parse().expect("addr"),
            ],
            next: AtomicUsize::new(0),
        };
        let first = backend.rotation();
        let second = backend.rotation();
        assert_eq!(first[0], second[1]);
        assert_eq!(first[1], second[0]);
    }
}
