//! The identity a machine keeps on its own disk: who it is and which network
//! it belongs to. Written once by `mesh init` (or a later join), atomically.

use std::{
    fmt,
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::mesh::addressing::{OverlayPrefix, SubnetIndex};

/// A network name: 1–63 characters of `[a-z0-9-]`, starting with a letter and
/// not ending with `-` (it is used in DNS names and store keys).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NetworkName(String);

impl NetworkName {
    pub fn parse(name: &str) -> Result<Self, IdentityError> {
        ployz_api::names::check_network_name(name)
            .map_err(|reason| IdentityError::InvalidNetworkName { reason })?;
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for NetworkName {
    type Error = IdentityError;

    fn try_from(name: String) -> Result<Self, Self::Error> {
        Self::parse(&name)
    }
}

impl From<NetworkName> for String {
    fn from(name: NetworkName) -> Self {
        name.0
    }
}

impl fmt::Display for NetworkName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// This machine's identity, persisted at `<data_dir>/identity.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalIdentity {
    pub machine_id: String,
    pub network: NetworkName,
    pub cluster_id: String,
    pub created_at_unix_ms: u64,
    /// Where this machine sits in the overlay. Kept on disk, not only in the
    /// store, because the overlay must come up before the store can be
    /// reached. Absent only in identities written before the mesh existed.
    #[serde(default)]
    pub mesh: Option<MeshIdentity>,
}

/// The overlay facts a machine needs before its store is reachable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshIdentity {
    pub prefix: OverlayPrefix,
    pub subnet: SubnetIndex,
    /// NATS cluster addresses of the members known when this machine
    /// joined (empty on the founding machine): its server's routes. The
    /// servers gossip every later member to each other.
    #[serde(default)]
    pub routes: Vec<SocketAddr>,
    /// The network's NATS route credential (hex), the same on every
    /// machine: servers accept routes only from servers that present it.
    /// Absent on networks founded before routes were authenticated.
    #[serde(default)]
    pub route_secret: Option<String>,
    /// On a leaf machine: how its leaf server reaches the core servers.
    /// Absent on core machines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leaf: Option<LeafIdentity>,
}

/// What a leaf machine's NATS server needs: the core servers' leaf listeners
/// and its own password there (its user is its machine id). A leaf machine
/// holds no route secret, so removing it can revoke everything it held.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeafIdentity {
    pub hubs: Vec<std::net::SocketAddr>,
    pub password: String,
}

impl std::fmt::Debug for LeafIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeafIdentity")
            .field("hubs", &self.hubs)
            .finish_non_exhaustive()
    }
}

/// What a password derived from the route secret is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NatsPassword {
    /// A leaf machine's user at every core server.
    Leaf,
    /// A core machine's own clients (ployzd, the gateway, DNS) at its server.
    Local,
    /// A core machine's system-account user, which lists and closes leaf connections.
    System,
}

impl MeshIdentity {
    /// The NATS password for `purpose` and `machine_id`, derived from the
    /// route secret: every core machine computes the same one, so none is
    /// stored, and a leaf machine learns only its own, from its ticket.
    /// `None` without a route secret (leaf machines, and networks founded
    /// before routes were authenticated).
    pub fn nats_password(&self, purpose: NatsPassword, machine_id: &str) -> Option<String> {
        use sha2::Digest as _;
        let secret = self.route_secret.as_deref()?;
        let label = match purpose {
            NatsPassword::Leaf => "leaf",
            NatsPassword::Local => "local",
            NatsPassword::System => "system",
        };
        let mut hasher = sha2::Sha256::new();
        for part in ["ployz-nats-password", label, machine_id, secret] {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part.as_bytes());
        }
        Some(hex::encode(hasher.finalize()))
    }

    /// A fresh route credential for a network being founded.
    pub fn new_route_secret() -> String {
        hex::encode(rand::random::<[u8; 32]>())
    }
}

impl LocalIdentity {
    /// A fresh identity for a machine founding `network`, with a new overlay
    /// prefix and the subnet this machine prefers (the store is empty, so
    /// nothing can hold it yet).
    pub fn generate(network: NetworkName, now_unix_ms: u64) -> Self {
        let machine_id = new_id("m");
        let subnet = SubnetIndex::preferred_for(&machine_id);
        Self {
            machine_id,
            network,
            cluster_id: new_id("c"),
            created_at_unix_ms: now_unix_ms,
            mesh: Some(MeshIdentity {
                prefix: OverlayPrefix::generate(),
                subnet,
                routes: Vec::new(),
                route_secret: Some(MeshIdentity::new_route_secret()),
                leaf: None,
            }),
        }
    }

    /// A fresh machine id, for a machine about to join a network.
    pub fn new_machine_id() -> String {
        new_id("m")
    }

    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("identity.json")
    }

    /// Reads the identity, `None` when the machine has none yet.
    pub fn load(data_dir: &Path) -> Result<Option<Self>, IdentityError> {
        let path = Self::path(data_dir);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(IdentityError::Read { path, source }),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| IdentityError::Corrupt { path, source })
    }

    /// Writes the identity atomically (temporary file, fsync, rename), mode 0600.
    pub fn store(&self, data_dir: &Path) -> Result<(), IdentityError> {
        let path = Self::path(data_dir);
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(data_dir)?;
            let temporary = data_dir.join(".identity.json.tmp");
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode_0600()
                .open(&temporary)?;
            let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
            file.write_all(&json)?;
            file.sync_all()?;
            std::fs::rename(&temporary, &path)?;
            std::fs::File::open(data_dir)?.sync_all()
        };
        write().map_err(|source| IdentityError::Write { path, source })
    }
}

trait OpenOptionsExt {
    fn mode_0600(&mut self) -> &mut Self;
}

impl OpenOptionsExt for std::fs::OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::mode(self, 0o600)
    }
}

/// A random identifier like `m-4f1c9a0b2d7e8f31`.
fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

/// What can go wrong with the local identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// `reason` is a whole sentence naming the name and what is wrong with it.
    #[error("{reason}")]
    InvalidNetworkName { reason: String },
    #[error("cannot read machine identity {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("machine identity {} is corrupt; restore it from a backup or move it away", path.display())]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot write machine identity {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_round_trips_through_disk_with_private_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(LocalIdentity::load(dir.path()).expect("load"), None);
        let identity = LocalIdentity::generate(NetworkName::parse("prod").expect("valid"), 42);
        identity.store(dir.path()).expect("store");
        assert_eq!(
            LocalIdentity::load(dir.path()).expect("load"),
            Some(identity)
        );
        let mode = std::fs::metadata(LocalIdentity::path(dir.path())).expect("stat");
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
    }

    #[test]
    fn a_corrupt_identity_is_reported_not_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(LocalIdentity::path(dir.path()), b"{not json").expect("write");
        assert!(matches!(
            LocalIdentity::load(dir.path()),
            Err(IdentityError::Corrupt { .. })
        ));
    }
}
