//! Membership facts kept in the store: the network (`network`) and each member
//! machine (`machines.<id>`). They record intent; whether a machine is
//! reachable is observed live and never written here.

use std::net::{Ipv6Addr, SocketAddr};

use serde::{Deserialize, Serialize};

use super::identity::NetworkName;
use crate::{
    mesh::addressing::{OverlayPrefix, SubnetIndex},
    store::{Key, KeyPrefix},
};

/// The network this store belongs to. Written once, by the founding machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    pub network: NetworkName,
    pub cluster_id: String,
    pub founded_by: String,
    pub created_at_unix_ms: u64,
    /// The network's overlay prefix; absent only in networks founded before
    /// the mesh existed (they are given one on their next start).
    #[serde(default)]
    pub overlay_prefix: Option<OverlayPrefix>,
}

impl NetworkRecord {
    pub fn key() -> Key {
        Key::new("network").expect("static key is valid")
    }
}

/// Membership intent for a machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Membership {
    /// Admitted by a member (subnet claimed, peer added) but not yet seen
    /// reachable over the mesh; `machine add` finishes or retries it.
    Joining,
    Active,
}

impl Membership {
    pub fn as_str(self) -> &'static str {
        match self {
            Membership::Joining => "joining",
            Membership::Active => "active",
        }
    }
}

/// One member machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineRecord {
    pub id: String,
    pub hostname: String,
    pub network: NetworkName,
    pub membership: Membership,
    pub joined_at_unix_ms: u64,
    /// How the mesh reaches the machine; absent only on records written
    /// before the mesh existed.
    #[serde(default)]
    pub mesh: Option<MachineMesh>,
    /// How its NATS server takes part in the store; decided when it is
    /// admitted and never changed. Records written before leaf servers
    /// existed read as core.
    #[serde(default)]
    pub store_role: StoreRole,
    /// A core machine's NATS route certificate, which the other core
    /// servers trust and pin: its own route credential. Absent on leaf
    /// machines and until the machine has made one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_certificate: Option<RouteCertificateRecord>,
}

/// A route certificate as the store keeps it: public facts only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteCertificateRecord {
    /// The self-signed certificate (PEM).
    pub pem: String,
    /// Hex SHA-256 of its DER SubjectPublicKeyInfo, as nats-server pins it.
    pub pin: String,
}

/// A machine's part in the replicated store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreRole {
    /// One of the first machines: a server of the JetStream cluster, holding
    /// a copy of the store. A network has at most three.
    #[default]
    Core,
    /// A machine beyond the core: a leaf server without JetStream, connected
    /// to the core servers with its own user; its clients use the store
    /// through it.
    Leaf,
}

impl StoreRole {
    pub fn as_str(self) -> &'static str {
        match self {
            StoreRole::Core => "core",
            StoreRole::Leaf => "leaf",
        }
    }
}

/// A member's place in the overlay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineMesh {
    /// WireGuard public key, base64 as `wg` prints it.
    pub public_key: String,
    /// Where its WireGuard listens on the underlay, when known.
    pub endpoint: Option<SocketAddr>,
    pub subnet: SubnetIndex,
    pub overlay_address: Ipv6Addr,
}

impl MachineRecord {
    pub fn key(machine_id: &str) -> Key {
        Key::from_segments(["machines", machine_id]).expect("machine ids are valid key segments")
    }

    pub fn prefix() -> KeyPrefix {
        KeyPrefix::new("machines").expect("static prefix is valid")
    }
}
