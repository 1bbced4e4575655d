//! Membership facts kept in the store: the network (`network`) and each member
//! machine (`machines.<id>`). They record intent; whether a machine is
//! reachable is observed live and never written here.

use serde::{Deserialize, Serialize};

use super::identity::NetworkName;
use crate::store::{Key, KeyPrefix};

/// The network this store belongs to. Written once, by the founding machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    pub network: NetworkName,
    pub cluster_id: String,
    pub founded_by: String,
    pub created_at_unix_ms: u64,
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
    Active,
}

impl Membership {
    pub fn as_str(self) -> &'static str {
        match self {
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
}

impl MachineRecord {
    pub fn key(machine_id: &str) -> Key {
        Key::from_segments(["machines", machine_id]).expect("machine ids are valid key segments")
    }

    pub fn prefix() -> KeyPrefix {
        KeyPrefix::new("machines").expect("static prefix is valid")
    }
}
