//! Bringing this machine's overlay interface to what its identity and the
//! membership facts say: the WireGuard private key and listen port, the
//! machine's overlay address on the TUN interface, and one peer per other
//! member (its public key, its endpoint, its subnet as allowed IPs).
//!
//! Every step compares first and changes only what differs, so applying the
//! same facts to a running tunnel (a ployzd restart) touches nothing: live
//! sessions, handshakes and counters stay as they are and no packet is lost.

use std::{
    collections::BTreeMap,
    io::Write as _,
    net::{Ipv6Addr, SocketAddr},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    process::Stdio,
};

use boringtun::x25519::{PublicKey, StaticSecret};
use tokio::process::Command;

use super::{
    addressing::{OverlayPrefix, Subnet},
    boringtun::{AllowedIp, DeviceSnapshot, Key, PeerUpdate, SetRequest},
    wg::{self, WgError},
};

/// Seconds between keepalives: keeps NAT mappings open and lets a restarted
/// peer learn our endpoint quickly.
pub const PERSISTENT_KEEPALIVE: u16 = 25;
/// The WireGuard UDP port unless configured otherwise.
pub const DEFAULT_LISTEN_PORT: u16 = 51820;

/// This machine's WireGuard key pair, kept in `<data_dir>/mesh/private.key`.
#[derive(Clone)]
pub struct KeyPair {
    private: [u8; 32],
    public: [u8; 32],
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair")
            .field("public", &encode_key(&self.public))
            .finish_non_exhaustive()
    }
}

impl KeyPair {
    fn from_private(private: [u8; 32]) -> Self {
        let secret = StaticSecret::from(private);
        Self {
            private: secret.to_bytes(),
            public: PublicKey::from(&secret).to_bytes(),
        }
    }

    /// Reads the key at `path`, or makes one and writes it (mode 0600,
    /// written to a temporary file, fsynced and renamed into place).
    pub fn load_or_generate(path: &Path) -> Result<Self, KeyError> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let bytes = hex::decode(text.trim())
                    .ok()
                    .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
                    .ok_or_else(|| KeyError::Corrupt {
                        path: path.to_owned(),
                    })?;
                Ok(Self::from_private(bytes))
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let pair = Self::from_private(rand::random());
                let write = || -> std::io::Result<()> {
                    let dir = path.parent().unwrap_or(Path::new("."));
                    std::fs::create_dir_all(dir)?;
                    let temporary = dir.join(".private.key.tmp");
                    let mut file = std::fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .mode(0o600)
                        .open(&temporary)?;
                    file.write_all(hex::encode(pair.private).as_bytes())?;
                    file.sync_all()?;
                    std::fs::rename(&temporary, path)?;
                    std::fs::File::open(dir)?.sync_all()
                };
                write().map_err(|source| KeyError::Write {
                    path: path.to_owned(),
                    source,
                })?;
                Ok(pair)
            }
            Err(source) => Err(KeyError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// The public key as `wg` prints it (base64).
    pub fn public_base64(&self) -> String {
        encode_key(&self.public)
    }

    fn private_key(&self) -> Key {
        Key(self.private)
    }
}

/// A WireGuard key in the base64 form `wg` prints.
pub fn encode_key(key: &[u8; 32]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// Parses a base64 WireGuard public key.
pub fn decode_key(text: &str) -> Option<Key> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()
        .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
        .map(Key)
}

/// What the local device must look like.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    pub interface: String,
    pub uapi_socket: PathBuf,
    pub keys: KeyPair,
    pub listen_port: u16,
    pub prefix: OverlayPrefix,
    pub subnet: Subnet,
}

/// One other member, as the mesh needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    pub public_key: Key,
    pub endpoint: Option<SocketAddr>,
    pub subnet: Subnet,
}

/// Sets the private key and listen port if they differ, then gives the
/// interface the machine's overlay address (with the network's /48, so the
/// whole overlay routes into the tunnel) and brings it up.
pub async fn configure_device(spec: &DeviceSpec) -> Result<(), OverlayError> {
    let snapshot = wg::get(&spec.uapi_socket).await?;
    let mut change = SetRequest::default();
    if snapshot.private_key != Some(spec.keys.private_key()) {
        change.private_key = Some(spec.keys.private_key());
    }
    if snapshot.listen_port != spec.listen_port {
        change.listen_port = Some(spec.listen_port);
    }
    if change != SetRequest::default() {
        wg::set(&spec.uapi_socket, &change).await?;
    }
    let address = format!(
        "{}/{}",
        spec.subnet.machine_address(),
        OverlayPrefix::PREFIX_LEN
    );
    if !has_address(&spec.interface, spec.subnet.machine_address()).await? {
        ip(&[
            "-6",
            "addr",
            "replace",
            &address,
            "dev",
            &spec.interface,
            "nodad",
        ])
        .await?;
    }
    ip(&["link", "set", "dev", &spec.interface, "up"]).await?;
    Ok(())
}

/// Makes the device's peers `desired`, changing only what differs.
pub async fn apply_peers(socket: &Path, desired: &[PeerSpec]) -> Result<PeerChanges, OverlayError> {
    let snapshot = wg::get(socket).await?;
    let (change, summary) = peer_changes(&snapshot, desired);
    if let Some(change) = change {
        wg::set(socket, &change).await?;
    }
    Ok(summary)
}

/// How many peers a change added, updated and removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerChanges {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
}

/// The UAPI change that turns `snapshot`'s peers into `desired`, or `None`.
/// A known peer keeps the endpoint it has (WireGuard follows a roaming peer
/// to its new address); the recorded endpoint is only given to a peer that
/// has none.
pub fn peer_changes(
    snapshot: &DeviceSnapshot,
    desired: &[PeerSpec],
) -> (Option<SetRequest>, PeerChanges) {
    let current: BTreeMap<Key, _> = snapshot
        .peers
        .iter()
        .map(|peer| (peer.public_key, peer))
        .collect();
    let wanted: BTreeMap<Key, &PeerSpec> =
        desired.iter().map(|peer| (peer.public_key, peer)).collect();
    let mut change = SetRequest::default();
    let mut summary = PeerChanges::default();
    for (key, spec) in &wanted {
        let allowed = allowed_ips(spec.subnet);
        match current.get(key) {
            None => {
                let mut update = PeerUpdate::new(*key);
                update.endpoint = spec.endpoint;
                update.persistent_keepalive_interval = Some(PERSISTENT_KEEPALIVE);
                update.replace_allowed_ips = true;
                update.allowed_ips = allowed;
                change.peers.push(update);
                summary.added += 1;
            }
            Some(peer) => {
                let mut update = PeerUpdate::new(*key);
                update.update_only = true;
                let mut differs = false;
                if peer.endpoint.is_none() && spec.endpoint.is_some() {
                    update.endpoint = spec.endpoint;
                    differs = true;
                }
                if peer.persistent_keepalive_interval != PERSISTENT_KEEPALIVE {
                    update.persistent_keepalive_interval = Some(PERSISTENT_KEEPALIVE);
                    differs = true;
                }
                if peer.allowed_ips != allowed {
                    update.replace_allowed_ips = true;
                    update.allowed_ips = allowed;
                    differs = true;
                }
                if differs {
                    change.peers.push(update);
                    summary.updated += 1;
                }
            }
        }
    }
    for key in current.keys() {
        if !wanted.contains_key(key) {
            let mut update = PeerUpdate::new(*key);
            update.remove = true;
            change.peers.push(update);
            summary.removed += 1;
        }
    }
    let change = (!change.peers.is_empty()).then_some(change);
    (change, summary)
}

fn allowed_ips(subnet: Subnet) -> Vec<AllowedIp> {
    vec![
        AllowedIp::new(subnet.base().into(), Subnet::PREFIX_LEN)
            .expect("a /64 of an IPv6 address is a valid prefix"),
    ]
}

async fn has_address(interface: &str, address: Ipv6Addr) -> Result<bool, OverlayError> {
    let output = ip(&["-6", "-o", "addr", "show", "dev", interface]).await?;
    let needle = format!("inet6 {address}/");
    Ok(output.lines().any(|line| line.contains(&needle)))
}

/// Runs `ip <args>` (iproute2) and returns its stdout.
async fn ip(args: &[&str]) -> Result<String, OverlayError> {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|source| OverlayError::IpUnavailable { source })?;
    if !output.status.success() {
        return Err(OverlayError::IpFailed {
            command: format!("ip {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// What can go wrong with the machine's key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the WireGuard key {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the WireGuard key {} is corrupt; restore it from a backup", path.display())]
    Corrupt { path: PathBuf },
    #[error("cannot write the WireGuard key {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What can go wrong configuring the overlay.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error(transparent)]
    Wg(#[from] WgError),
    #[error("cannot run `ip` (iproute2)")]
    IpUnavailable {
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    IpFailed { command: String, stderr: String },
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::mesh::{addressing::SubnetIndex, boringtun::PeerSnapshot};

    fn subnet(index: u16) -> Subnet {
        "fd12:3456:789a::/48"
            .parse::<OverlayPrefix>()
            .expect("prefix")
            .subnet(SubnetIndex::new(index).expect("index"))
    }

    fn spec(byte: u8, index: u16) -> PeerSpec {
        PeerSpec {
            public_key: Key([byte; 32]),
            endpoint: Some(SocketAddr::from(([10, 0, 0, byte], 51820))),
            subnet: subnet(index),
        }
    }

    fn running(spec: &PeerSpec, endpoint: Option<SocketAddr>) -> PeerSnapshot {
        let mut peer = PeerSnapshot::new(spec.public_key);
        peer.endpoint = endpoint;
        peer.persistent_keepalive_interval = PERSISTENT_KEEPALIVE;
        peer.allowed_ips = allowed_ips(spec.subnet);
        peer.last_handshake = Some(Duration::from_secs(1));
        peer
    }

    #[test]
    fn a_device_that_matches_is_left_alone() {
        let a = spec(1, 1);
        let b = spec(2, 2);
        let snapshot = DeviceSnapshot {
            peers: vec![running(&a, a.endpoint), running(&b, b.endpoint)],
            ..DeviceSnapshot::default()
        };
        let (change, summary) = peer_changes(&snapshot, &[b, a]);
        assert_eq!(change, None);
        assert_eq!(summary, PeerChanges::default());
    }

    #[test]
    fn new_members_are_added_and_departed_ones_removed() {
        let a = spec(1, 1);
        let b = spec(2, 2);
        let gone = spec(3, 3);
        let snapshot = DeviceSnapshot {
            peers: vec![running(&a, a.endpoint), running(&gone, gone.endpoint)],
            ..DeviceSnapshot::default()
        };
        let (change, summary) = peer_changes(&snapshot, &[a, b.clone()]);
        let change = change.expect("a change");
        assert!(!change.replace_peers, "live sessions must survive");
        assert_eq!(
            summary,
            PeerChanges {
                added: 1,
                updated: 0,
                removed: 1
            }
        );
        let added = &change.peers[0];
        assert_eq!(added.public_key, b.public_key);
        assert_eq!(added.endpoint, b.endpoint);
        assert_eq!(added.allowed_ips, allowed_ips(b.subnet));
        assert!(change.peers[1].remove);
        assert_eq!(change.peers[1].public_key, gone.public_key);
    }

    #[test]
    fn a_roamed_endpoint_is_kept_and_a_missing_one_filled_in() {
        let a = spec(1, 1);
        let roamed = SocketAddr::from(([192, 0, 2, 7], 40000));
        let snapshot = DeviceSnapshot {
            peers: vec![running(&a, Some(roamed))],
            ..DeviceSnapshot::default()
        };
        assert_eq!(peer_changes(&snapshot, std::slice::from_ref(&a)).0, None);
        let snapshot = DeviceSnapshot {
            peers: vec![running(&a, None)],
            ..DeviceSnapshot::default()
        };
        let change = peer_changes(&snapshot, std::slice::from_ref(&a))
            .0
            .expect("change");
        assert_eq!(change.peers[0].endpoint, a.endpoint);
        assert!(change.peers[0].update_only);
    }

    #[test]
    fn keys_round_trip_through_base64_and_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mesh/private.key");
        let first = KeyPair::load_or_generate(&path).expect("generate");
        let again = KeyPair::load_or_generate(&path).expect("load");
        assert_eq!(first.public_base64(), again.public_base64());
        assert_eq!(
            decode_key(&first.public_base64()).expect("decode"),
            Key(first.public)
        );
        let mode = std::fs::metadata(&path).expect("stat");
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
        std::fs::write(&path, "not a key").expect("write");
        assert!(matches!(
            KeyPair::load_or_generate(&path),
            Err(KeyError::Corrupt { .. })
        ));
    }
}
