//! The daemon's half of the mesh: brings the overlay up from what the machine
//! keeps on its own disk (identity, key, the last peers it applied) before
//! the store is reachable, follows membership records into the tunnel's
//! peers, and observes peers for `mesh status`, `machine ls` and `status`.
//! Joining lives in `join.rs`.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use futures::StreamExt as _;
use ployz_api::{ApiError, ErrorClass};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::{Daemon, operations::store_error};
use crate::{
    error_chain,
    machine::{MachineRecord, identity::MeshIdentity},
    mesh::{
        addressing::{OverlayPrefix, SubnetIndex},
        boringtun::{Key, PeerSnapshot},
        overlay::{self, DeviceSpec, KeyPair, PeerSpec, decode_key, encode_key},
        wg,
    },
    services::tunnel::{TunnelSidecar, TunnelSidecarConfig, find_tunnel_binary},
    store::{RecordStore, nats::NatsStore},
};

/// The machine's WireGuard private key, under the data dir.
const KEY_FILE: &str = "mesh/private.key";
/// The peers last applied to the tunnel: how the overlay comes back after a
/// reboot, before the store (which needs the overlay) can be read.
const PEER_CACHE_FILE: &str = "mesh/peers.json";
/// Bound on one reachability probe of a peer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The overlay as this daemon runs it.
pub(super) struct MeshRuntime {
    pub tunnel: Arc<TunnelSidecar>,
    pub spec: DeviceSpec,
    pub mesh: MeshIdentity,
}

impl MeshRuntime {
    pub(super) fn socket(&self) -> PathBuf {
        self.spec.uapi_socket.clone()
    }

    pub fn overlay_address(&self) -> Ipv6Addr {
        self.spec.subnet.machine_address()
    }

    /// The network's overlay prefix.
    pub fn prefix(&self) -> crate::mesh::addressing::OverlayPrefix {
        self.spec.prefix
    }

    /// This machine's /64 of the overlay.
    pub fn subnet(&self) -> crate::mesh::addressing::Subnet {
        self.spec.subnet
    }
}

/// One other member as the tunnel needs it; also the peer cache's entries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownPeer {
    pub machine_id: String,
    pub public_key: String,
    pub endpoint: Option<SocketAddr>,
    pub subnet: SubnetIndex,
    /// Its NATS server is a leaf: a core server admits it as a user. Kept
    /// in the cache so a core server restarted before the store answers
    /// admits the leaf machines it admitted before.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub leaf: bool,
    /// A core member's route certificate, which this machine's NATS trusts
    /// and pins; cached for the same reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_certificate: Option<crate::machine::records::RouteCertificateRecord>,
}

/// One peer in `mesh status`.
pub struct PeerView {
    pub record: Option<MachineRecord>,
    pub snapshot: PeerSnapshot,
    pub observed: &'static str,
}

/// `mesh status`'s answer.
pub struct MeshView {
    pub network: String,
    pub interface: String,
    pub public_key: String,
    pub listen_port: u16,
    pub overlay_address: Ipv6Addr,
    pub subnet: String,
    pub prefix: String,
    pub tunnel: String,
    pub peers: Vec<PeerView>,
}

impl Daemon {
    fn key_path(&self) -> PathBuf {
        self.config.data_dir.join(KEY_FILE)
    }

    pub(super) fn peer_cache_path(&self) -> PathBuf {
        self.config.data_dir.join(PEER_CACHE_FILE)
    }

    pub(super) fn keys(&self) -> Result<KeyPair, ApiError> {
        KeyPair::load_or_generate(&self.key_path())
            .map_err(|error| ApiError::new(ErrorClass::Internal, "mesh_key", error_chain(&error)))
    }

    /// Adopts or starts the tunnel, gives it this machine's key, port and
    /// address, and the peers it last knew. Changes nothing on a tunnel that
    /// already matches (a ployzd restart loses no packet).
    pub(super) async fn bring_up_mesh(
        &self,
        mesh: &MeshIdentity,
    ) -> Result<Arc<MeshRuntime>, MeshError> {
        let keys = KeyPair::load_or_generate(&self.key_path())
            .map_err(|error| MeshError(format!("WireGuard key: {}", error_chain(&error))))?;
        let binary = find_tunnel_binary(self.config.mesh.tunnel_binary.as_deref())
            .map_err(|error| MeshError(error_chain(&error)))?;
        let config = TunnelSidecarConfig::new(
            binary,
            self.config.data_dir.join("mesh"),
            self.config.mesh.interface.clone(),
            self.config.mesh.uapi_dir.clone(),
        );
        let tunnel = Arc::new(
            TunnelSidecar::ensure(config)
                .await
                .map_err(|error| MeshError(format!("tunnel: {}", error_chain(&error))))?,
        );
        tracing::info!(status = ?tunnel.status(), "tunnel ready");
        let supervised = tunnel.clone();
        let shutdown = self.shutdown.clone();
        self.tasks
            .spawn(async move { supervised.supervise(shutdown).await });
        let spec = DeviceSpec {
            interface: self.config.mesh.interface.clone(),
            uapi_socket: tunnel.config().uapi_socket(),
            keys,
            listen_port: self.config.mesh.listen_port,
            prefix: mesh.prefix,
            subnet: mesh.prefix.subnet(mesh.subnet),
        };
        overlay::configure_device(&spec)
            .await
            .map_err(|error| MeshError(format!("overlay device: {}", error_chain(&error))))?;
        let cached = read_peer_cache(&self.peer_cache_path());
        let changes = overlay::apply_peers(&spec.uapi_socket, &peer_specs(mesh.prefix, &cached))
            .await
            .map_err(|error| MeshError(format!("overlay peers: {}", error_chain(&error))))?;
        tracing::info!(
            address = %spec.subnet.machine_address(),
            peers = cached.len(),
            added = changes.added,
            updated = changes.updated,
            removed = changes.removed,
            "overlay up"
        );
        Ok(Arc::new(MeshRuntime {
            tunnel,
            spec,
            mesh: mesh.clone(),
        }))
    }

    /// Keeps the tunnel's peers equal to the membership records: applies
    /// them on every change under `machines.`, and gives a restarted tunnel
    /// (the supervisor brought it back empty) its device settings and peers.
    /// On a core machine, it also keeps the leaf users its NATS server
    /// admits equal to the leaf machines among the records.
    pub(super) fn follow_membership(
        &self,
        store: NatsStore,
        mesh: Arc<MeshRuntime>,
        hub: Option<super::NatsMembers>,
        self_id: String,
        shutdown: CancellationToken,
    ) {
        let cache = self.peer_cache_path();
        self.tasks.spawn(async move {
            follow(store, mesh, hub, self_id, cache, shutdown).await;
        });
    }

    /// `mesh status`: the tunnel's view of every peer, observed now.
    pub async fn mesh_status(&self) -> Result<MeshView, ApiError> {
        let runtime = self.runtime().await?;
        let snapshot = wg::get(&runtime.mesh.socket()).await.map_err(|error| {
            ApiError::new(
                ErrorClass::Unavailable,
                "tunnel_unavailable",
                error_chain(&error),
            )
        })?;
        let members = list_members(&runtime.store).await.unwrap_or_default();
        let mut peers = Vec::new();
        let probes = snapshot.peers.iter().map(|peer| {
            let record = members
                .iter()
                .find(|m| {
                    m.mesh
                        .as_ref()
                        .and_then(|mesh| decode_key(&mesh.public_key))
                        == Some(peer.public_key)
                })
                .cloned();
            let port = self.config.nats.cluster_port;
            async move {
                let observed = match &record {
                    Some(record) => observe(record, port).await,
                    None if peer.last_handshake.is_some() => "stranger",
                    None => "never",
                };
                (record, observed)
            }
        });
        let observed = futures::future::join_all(probes).await;
        for (peer, (record, observed)) in snapshot.peers.iter().zip(observed) {
            let observed = if peer.last_handshake.is_none() && observed != "reachable" {
                "never"
            } else {
                observed
            };
            peers.push(PeerView {
                record,
                snapshot: peer.clone(),
                observed,
            });
        }
        Ok(MeshView {
            network: runtime.identity.network.to_string(),
            interface: self.config.mesh.interface.clone(),
            public_key: runtime.mesh.spec.keys.public_base64(),
            listen_port: snapshot.listen_port,
            overlay_address: runtime.mesh.overlay_address(),
            subnet: format!(
                "{}/{}",
                runtime.mesh.spec.subnet.base(),
                crate::mesh::addressing::Subnet::PREFIX_LEN
            ),
            prefix: format!(
                "{}/{}",
                runtime.mesh.mesh.prefix.base(),
                OverlayPrefix::PREFIX_LEN
            ),
            tunnel: format!("{:?}", runtime.mesh.tunnel.status()),
            peers,
        })
    }

    /// One line on the overlay for `status`: whether the tunnel runs, and
    /// what it carries, asked now.
    pub async fn mesh_summary(&self) -> (bool, String) {
        let Some(mesh) = self.mesh_runtime.lock().await.clone() else {
            return (
                false,
                "not started: this machine has no network yet".to_owned(),
            );
        };
        let status = mesh.tunnel.status();
        let running = status.state == crate::services::SidecarState::Running;
        let peers = match tokio::time::timeout(PROBE_TIMEOUT, wg::get(&mesh.socket())).await {
            Ok(Ok(snapshot)) => {
                let shaken = snapshot
                    .peers
                    .iter()
                    .filter(|peer| peer.last_handshake.is_some())
                    .count();
                format!(
                    "{} peer(s), {shaken} with a handshake",
                    snapshot.peers.len()
                )
            }
            Ok(Err(error)) => format!("tunnel does not answer: {}", error_chain(&error)),
            Err(_) => format!("tunnel does not answer within {PROBE_TIMEOUT:?}"),
        };
        let peer_api = match self.peer_api.get() {
            Some(Ok(address)) => format!("peer API on {address}"),
            Some(Err(reason)) => format!("peer API down: {reason}"),
            None => "peer API not started".to_owned(),
        };
        let containers = match &self.config.mesh.container_network {
            Some(network) => format!(
                "containers on network `{network}` in {}",
                mesh.subnet().containers()
            ),
            None => "containers on Docker's default bridge (this machine only)".to_owned(),
        };
        (
            running,
            format!(
                "ployz-tunnel pid {} ({}) on {} port {}; overlay {} in {}/{}; {peers}; {peer_api}; {containers}",
                status.pid.unwrap_or(0),
                status.origin.kind(),
                mesh.spec.interface,
                mesh.spec.listen_port,
                mesh.overlay_address(),
                mesh.spec.subnet.base(),
                crate::mesh::addressing::Subnet::PREFIX_LEN,
            ),
        )
    }

    /// Live reachability of every member, for `machine ls`.
    pub(super) async fn observe_machines(
        &self,
        records: &[MachineRecord],
        self_id: &str,
    ) -> Vec<&'static str> {
        let port = self.config.nats.cluster_port;
        futures::future::join_all(records.iter().map(|record| async move {
            if record.id == self_id {
                "self"
            } else {
                observe(record, port).await
            }
        }))
        .await
    }
}

/// `reachable` when the machine's overlay address accepts (or refuses) a TCP
/// connection to its NATS cluster port within a second: either answer means
/// packets crossed the tunnel both ways. `unreachable` on silence.
async fn observe(record: &MachineRecord, port: u16) -> &'static str {
    let Some(mesh) = &record.mesh else {
        return "unknown";
    };
    let target = SocketAddr::new(IpAddr::V6(mesh.overlay_address), port);
    match tokio::time::timeout(PROBE_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(_)) => "reachable",
        Ok(Err(error)) if error.kind() == std::io::ErrorKind::ConnectionRefused => "reachable",
        Ok(Err(_)) | Err(_) => "unreachable",
    }
}

pub(super) async fn list_members(store: &NatsStore) -> Result<Vec<MachineRecord>, ApiError> {
    store
        .list(&MachineRecord::prefix())
        .await
        .map_err(store_error)?
        .iter()
        .map(|record| record.decode::<MachineRecord>().map_err(store_error))
        .collect()
}

/// Every member but `self_id` that has mesh facts.
pub(super) fn known_peers(self_id: &str, members: &[MachineRecord]) -> Vec<KnownPeer> {
    members
        .iter()
        .filter(|member| member.id != self_id)
        .filter_map(|member| {
            let mesh = member.mesh.as_ref()?;
            Some(KnownPeer {
                machine_id: member.id.clone(),
                public_key: mesh.public_key.clone(),
                endpoint: mesh.endpoint,
                subnet: mesh.subnet,
                leaf: member.store_role == crate::machine::records::StoreRole::Leaf,
                route_certificate: (member.store_role == crate::machine::records::StoreRole::Core)
                    .then(|| member.route_certificate.clone())
                    .flatten(),
            })
        })
        .collect()
}

fn peer_specs(prefix: OverlayPrefix, peers: &[KnownPeer]) -> Vec<PeerSpec> {
    peers
        .iter()
        .filter_map(|peer| {
            Some(PeerSpec {
                public_key: decode_key(&peer.public_key)?,
                endpoint: peer.endpoint,
                subnet: prefix.subnet(peer.subnet),
            })
        })
        .collect()
}

/// Applies the membership records to the tunnel and caches them on disk;
/// answers the peers applied.
pub(super) async fn sync_peers(
    store: &NatsStore,
    mesh: &MeshRuntime,
    self_id: &str,
    cache: &std::path::Path,
) -> Result<Vec<KnownPeer>, String> {
    let members = list_members(store).await.map_err(|error| error.message)?;
    if !members.iter().any(|member| member.id == self_id) {
        // A store that does not list this machine is not (yet) this
        // network's: never tear the overlay down on its word.
        return Err(
            "the store does not list this machine; overlay peers left as they are".to_owned(),
        );
    }
    let peers = known_peers(self_id, &members);
    let changes = overlay::apply_peers(&mesh.socket(), &peer_specs(mesh.mesh.prefix, &peers))
        .await
        .map_err(|error| error_chain(&error))?;
    if changes != overlay::PeerChanges::default() {
        tracing::info!(
            added = changes.added,
            updated = changes.updated,
            removed = changes.removed,
            "overlay peers follow membership"
        );
    }
    if read_peer_cache(cache) != peers {
        write_json(cache, &peers).map_err(|error| error.message)?;
    }
    Ok(peers)
}

/// Applies the membership records to the tunnel and, on a core machine, to
/// the leaf users its NATS server admits.
async fn sync_members(
    store: &NatsStore,
    mesh: &MeshRuntime,
    hub: Option<&super::NatsMembers>,
    self_id: &str,
    cache: &std::path::Path,
) {
    match sync_peers(store, mesh, self_id, cache).await {
        Ok(peers) => {
            if let Some(hub) = hub {
                hub.apply_and_revoke(&peers).await;
            }
        }
        Err(error) => tracing::warn!(%error, "cannot apply membership to the overlay"),
    }
}

async fn follow(
    store: NatsStore,
    mesh: Arc<MeshRuntime>,
    hub: Option<super::NatsMembers>,
    self_id: String,
    cache: PathBuf,
    shutdown: CancellationToken,
) {
    let mut tunnel = mesh.tunnel.watch_status();
    let mut tunnel_pid = tunnel.borrow().pid;
    loop {
        let mut watch = match store.watch(&MachineRecord::prefix()).await {
            Ok(watch) => watch,
            Err(error) => {
                tracing::debug!(error = %error_chain(&error), "cannot watch membership yet");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        sync_members(&store, &mesh, hub.as_ref(), &self_id, &cache).await;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                event = watch.next() => match event {
                    Some(Ok(_)) => {
                        sync_members(&store, &mesh, hub.as_ref(), &self_id, &cache).await;
                    }
                    Some(Err(_)) | None => break,
                },
                changed = tunnel.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let pid = tunnel.borrow().pid;
                    if pid.is_some() && pid != tunnel_pid {
                        tunnel_pid = pid;
                        tracing::info!(?pid, "tunnel restarted: restoring its device and peers");
                        if let Err(error) = overlay::configure_device(&mesh.spec).await {
                            tracing::warn!(error = %error_chain(&error), "cannot configure the restarted tunnel");
                        }
                        let cached = read_peer_cache(&cache);
                        if let Err(error) = overlay::apply_peers(&mesh.socket(), &peer_specs(mesh.mesh.prefix, &cached)).await {
                            tracing::warn!(error = %error_chain(&error), "cannot restore the tunnel's peers");
                        }
                    }
                }
            }
        }
    }
}

pub(super) fn read_peer_cache(path: &std::path::Path) -> Vec<KnownPeer> {
    read_json(path).unwrap_or_default()
}

pub(super) fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Option<T> {
    let bytes = std::fs::read(path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(value) => Some(value),
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "ignoring an unreadable file");
            None
        }
    }
}

pub(super) fn write_json<T: Serialize>(path: &std::path::Path, value: &T) -> Result<(), ApiError> {
    let bytes = serde_json::to_vec_pretty(value)
        .map_err(|error| ApiError::new(ErrorClass::Internal, "encode", error.to_string()))?;
    write_atomically(path, &bytes).map_err(|error| {
        ApiError::new(
            ErrorClass::Internal,
            "write_file",
            format!("cannot write {}: {error}", path.display()),
        )
    })
}

/// Writes `bytes` to a temporary file beside `path`, fsyncs it and renames it
/// into place, mode 0600.
fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Unique: the membership follower and a request may write at once.
    let temporary = dir.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)?;
    std::fs::File::open(dir)?.sync_all()
}

pub(super) fn usage(code: &'static str, message: String) -> ApiError {
    ApiError::new(ErrorClass::Usage, code, message)
}

pub(super) fn identity_api_error(error: crate::machine::IdentityError) -> ApiError {
    ApiError::new(ErrorClass::Internal, "identity", error_chain(&error))
}

/// Why the overlay could not come up.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct MeshError(String);

/// The public key in the form `wg` prints, for API answers.
pub fn public_key_text(key: &Key) -> String {
    encode_key(&key.0)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::machine::{Membership, NetworkName, records::MachineMesh};

    pub(in crate::daemon) fn member(id: &str, index: u16, membership: Membership) -> MachineRecord {
        let prefix: OverlayPrefix = "fd12:3456:789a::/48".parse().expect("prefix");
        let subnet = prefix.subnet(SubnetIndex::new(index).expect("index"));
        MachineRecord {
            id: id.to_owned(),
            hostname: format!("host-{index}"),
            network: NetworkName::parse("prod").expect("name"),
            membership,
            joined_at_unix_ms: 1,
            mesh: Some(MachineMesh {
                public_key: encode_key(&[u8::try_from(index).unwrap_or(0); 32]),
                endpoint: Some(SocketAddr::from(([10, 0, 0, 1], 51820))),
                subnet: subnet.index(),
                overlay_address: subnet.machine_address(),
            }),
            store_role: crate::machine::records::StoreRole::Core,
            route_certificate: None,
        }
    }

    #[test]
    fn peers_are_every_other_member_with_mesh_facts() {
        let mut legacy = member("m-3", 3, Membership::Active);
        legacy.mesh = None;
        let members = [
            member("m-1", 1, Membership::Active),
            member("m-2", 2, Membership::Joining),
            legacy,
        ];
        let peers = known_peers("m-1", &members);
        assert_eq!(
            peers.len(),
            1,
            "itself and a member without mesh facts are left out"
        );
        assert_eq!(peers[0].machine_id, "m-2");
        let prefix: OverlayPrefix = "fd12:3456:789a::/48".parse().expect("prefix");
        let specs = peer_specs(prefix, &peers);
        assert_eq!(specs.len(), 1);
        assert_eq!(
            specs[0].subnet.machine_address().to_string(),
            "fd12:3456:789a:2::1"
        );
    }

    #[test]
    fn a_peer_with_an_unreadable_key_is_skipped_not_applied() {
        let peers = [KnownPeer {
            machine_id: "m-9".to_owned(),
            public_key: "not base64!".to_owned(),
            endpoint: None,
            subnet: SubnetIndex::new(9).expect("index"),
            leaf: false,
            route_certificate: None,
        }];
        let prefix: OverlayPrefix = "fd12:3456:789a::/48".parse().expect("prefix");
        assert!(peer_specs(prefix, &peers).is_empty());
    }
}
