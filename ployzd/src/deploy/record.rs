//! The deploy commit: the one record a deploy writes at its point of no return
//! (`deploys.<namespace>.<seq>`, created only if absent, so two deploys can
//! never both commit the same step of a namespace's history). It holds the
//! manifest, the containers that serve it, each volume's deploy-point snapshot
//! and the routes, so the gateway, DNS, history and rollback all read one fact.

use std::{collections::BTreeMap, fmt};

use serde::{Deserialize, Serialize};

use super::manifest::Manifest;
use crate::store::{Key, KeyPrefix};

/// A commit's id as operators type it: `<namespace>/<seq>`, e.g. `shop/3`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CommitId {
    pub namespace: String,
    pub seq: u64,
}

impl CommitId {
    /// Parses `shop/3`.
    pub fn parse(text: &str) -> Option<Self> {
        let (namespace, seq) = text.split_once('/')?;
        let valid_namespace = (1..=63).contains(&namespace.len())
            && namespace
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        let seq: u64 = seq.parse().ok()?;
        (valid_namespace && seq > 0).then(|| Self {
            namespace: namespace.to_owned(),
            seq,
        })
    }

    pub fn key(&self) -> Key {
        // Zero-padded so keys sort in commit order.
        Key::new(format!("deploys.{}.{:010}", self.namespace, self.seq))
            .expect("namespaces are valid key segments")
    }

    /// The snapshot name of every volume's deploy point in this commit.
    pub fn deploy_point(&self) -> String {
        format!("deploy-{}", self.seq)
    }
}

impl fmt::Display for CommitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.seq)
    }
}

/// All commits of `namespace`.
pub fn history_prefix(namespace: &str) -> KeyPrefix {
    KeyPrefix::new(format!("deploys.{namespace}")).expect("namespaces are valid key segments")
}

/// One deploy, as committed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeployRecord {
    pub commit: CommitId,
    /// The operation that committed it.
    pub operation: String,
    pub created_at_unix_ms: u64,
    /// The machine that ran the deploy.
    pub machine: String,
    pub manifest: Manifest,
    /// The commit this deploy reverted to, for a rollback.
    pub reverts: Option<String>,
    pub services: BTreeMap<String, ServiceRecord>,
    pub volumes: BTreeMap<String, VolumeRecord>,
    pub routes: Vec<RouteRecord>,
}

/// A service's containers as committed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRecord {
    pub config_hash: String,
    /// The service's container ports, for DNS SRV answers.
    #[serde(default)]
    pub ports: Vec<u16>,
    pub containers: Vec<ContainerRecord>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub id: String,
    pub name: String,
    pub replica: u32,
    pub machine: String,
    /// Addresses the container had when it was committed.
    pub addresses: Vec<String>,
}

/// A volume's state at this commit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub service: String,
    pub machine: String,
    /// The snapshot taken before this deploy started the volume's service: the
    /// state the previous deploy left. `None` when the backend cannot snapshot.
    pub deploy_point: Option<String>,
    /// The snapshot this deploy restored the volume to (a rollback).
    pub restored_from: Option<String>,
}

/// A route as committed: what the gateway and DNS serve for this namespace.
/// The type belongs to the routing domain, which reads it back from the commit.
pub use ployz_routing::RouteRecord;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_ids_parse_and_sort_as_keys() {
        let id = CommitId::parse("shop/12").expect("valid");
        assert_eq!(id.to_string(), "shop/12");
        assert_eq!(id.key().as_str(), "deploys.shop.0000000012");
        assert!(CommitId::parse("shop/2").expect("valid").key() < id.key());
        for bad in [
            "shop", "shop/", "shop/0", "Shop/1", "shop/-1", "/1", "shop/1/2", "a.b/1",
        ] {
            assert_eq!(CommitId::parse(bad), None, "{bad}");
        }
    }

    /// The routing domain reads commits back with its own view of them; this
    /// keeps the two in agreement.
    #[test]
    fn the_routing_domain_reads_a_commit() {
        let manifest = Manifest::parse(
            "namespace = \"shop\"\n[services.web]\nimage = \"x\"\nports = [8080]\n\
             [[services.web.routes]]\nhosts = [\"shop.example.com\"]\nport = 8080\n\
             tls = { certificate = \"/c.pem\", key = \"/k.pem\" }\n",
        )
        .expect("valid manifest");
        let route = super::super::plan::summary("web", &manifest.services["web"].routes[0]);
        let record = DeployRecord {
            commit: CommitId::parse("shop/7").expect("valid"),
            operation: "op".to_owned(),
            created_at_unix_ms: 42,
            machine: "m1".to_owned(),
            reverts: None,
            services: BTreeMap::from([(
                "web".to_owned(),
                ServiceRecord {
                    config_hash: "h".to_owned(),
                    ports: vec![8080],
                    containers: vec![ContainerRecord {
                        id: "c".to_owned(),
                        name: "c".to_owned(),
                        replica: 1,
                        machine: "m1".to_owned(),
                        addresses: vec!["172.17.0.9".to_owned()],
                    }],
                },
            )]),
            volumes: BTreeMap::new(),
            routes: vec![RouteRecord {
                instances: vec!["172.17.0.9:8080".to_owned()],
                ..route
            }],
            manifest,
        };
        let bytes = serde_json::to_vec(&record).expect("serializes");
        let view = ployz_routing::CommitView::decode(&bytes).expect("routing reads it");
        let table = ployz_routing::NamespaceTable::project(&view);
        assert_eq!(table.seq, 7);
        assert_eq!(table.committed_at_unix_ms, 42);
        assert_eq!(table.services["web"].ports, vec![8080]);
        assert_eq!(table.services["web"].instances[0].replica, 1);
        assert_eq!(table.http[0].hosts, vec!["shop.example.com"]);
        assert_eq!(
            table.http[0]
                .tls
                .as_ref()
                .map(|tls| tls.certificate.as_str()),
            Some("/c.pem")
        );
        assert_eq!(
            table.http[0].upstreams,
            vec!["172.17.0.9:8080".parse().expect("addr")]
        );
    }
}
