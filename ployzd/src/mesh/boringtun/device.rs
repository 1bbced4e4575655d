//! The userspace WireGuard data path: one TUN device, one UDP socket and a
//! boringtun [`Tunn`] per peer. Owns peer state, routes outbound packets to
//! peers by allowed IPs (longest prefix) and inbound datagrams by receiver
//! index (or, for handshake initiations, by the sender's static key), and
//! ticks the protocol timers. Configuration arrives as [`DeviceCommand`]s from
//! the UAPI server; this module knows nothing about sockets' text protocol.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6},
    os::fd::AsRawFd,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ::boringtun::{
    noise::{Packet, Tunn, TunnResult, errors::WireGuardError, handshake::parse_handshake_anon},
    x25519::{PublicKey, StaticSecret},
};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    net::UdpSocket,
    sync::{mpsc, oneshot},
};
use tokio_util::sync::CancellationToken;
use tun_rs::{AsyncDevice, DeviceBuilder};

use super::{
    allowed_ips::AllowedIpTable,
    uapi::{DeviceSnapshot, Key, PeerSnapshot, PeerUpdate, SetRequest},
};

/// The MTU of the TUN device: 1500 minus the IPv6 + UDP + WireGuard overhead.
pub const TUN_MTU: u16 = 1420;
/// The UDP socket buffer size; the 208 KB default overflows under load.
const SOCKET_BUFFER_BYTES: libc::c_int = 4 << 20;
/// How often the protocol timers run (boringtun expects roughly 250 ms).
const TIMER_TICK: Duration = Duration::from_millis(250);
/// The largest packet read from the TUN or the network.
const MAX_PACKET: usize = 65_535;
/// Room for the WireGuard header and tag around the largest packet.
const OUT_BUFFER: usize = MAX_PACKET + 256;
/// How long [`create_tun`] waits for a same-named TUN of a dead process to go.
const TUN_BUSY_WAIT: Duration = Duration::from_secs(5);

/// Why the device could not be set up or reconfigured.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot create the TUN device `{name}`")]
    CreateTun {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot bind the UDP socket to port {port}")]
    BindUdp {
        port: u16,
        #[source]
        source: io::Error,
    },
    #[error("cannot set firewall mark {mark} on the UDP socket")]
    SetFwmark {
        mark: u32,
        #[source]
        source: io::Error,
    },
}

/// A request from the configuration side to the data path.
#[derive(Debug)]
pub enum DeviceCommand {
    /// Report the configuration and statistics.
    Get {
        reply: oneshot::Sender<DeviceSnapshot>,
    },
    /// Apply a configuration change; all of it is parsed before any is applied.
    Set {
        request: SetRequest,
        reply: oneshot::Sender<Result<(), DeviceError>>,
    },
}

/// Creates the TUN device `name` (layer 3, no packet information header).
/// Retries while the kernel still holds a same-named device of a process that
/// just died (EBUSY).
pub async fn create_tun(name: &str) -> Result<AsyncDevice, DeviceError> {
    let deadline = tokio::time::Instant::now() + TUN_BUSY_WAIT;
    loop {
        match DeviceBuilder::new().name(name).mtu(TUN_MTU).build_async() {
            Ok(device) => return Ok(device),
            Err(error)
                if error.raw_os_error() == Some(libc::EBUSY)
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(source) => {
                return Err(DeviceError::CreateTun {
                    name: name.to_owned(),
                    source,
                });
            }
        }
    }
}

/// Binds the dual-stack UDP socket on `[::]:port` with large buffers and the
/// optional firewall mark. Must run inside a Tokio runtime.
pub fn bind_udp(port: u16, fwmark: Option<u32>) -> Result<UdpSocket, DeviceError> {
    let bind_error = |source| DeviceError::BindUdp { port, source };
    let socket = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)).map_err(bind_error)?;
    socket.set_only_v6(false).map_err(bind_error)?;
    force_buffer_size(&socket, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF);
    force_buffer_size(&socket, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF);
    if let Some(mark) = fwmark {
        socket
            .set_mark(mark)
            .map_err(|source| DeviceError::SetFwmark { mark, source })?;
    }
    socket.set_nonblocking(true).map_err(bind_error)?;
    let address = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    socket.bind(&address.into()).map_err(bind_error)?;
    UdpSocket::from_std(socket.into()).map_err(bind_error)
}

/// Sets a socket buffer beyond `net.core.*mem_max` (needs CAP_NET_ADMIN), and
/// falls back to the capped option when not permitted. Best effort: a small
/// buffer costs throughput, not correctness.
fn force_buffer_size(socket: &Socket, force_option: libc::c_int, plain_option: libc::c_int) {
    for option in [force_option, plain_option] {
        let size = SOCKET_BUFFER_BYTES;
        // SAFETY: the descriptor belongs to `socket`, which outlives the call;
        // the value pointer refers to a live c_int and the length matches it.
        let result = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&raw const size).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if result == 0 {
            return;
        }
    }
    tracing::warn!("cannot raise the UDP socket buffers; throughput will suffer");
}

/// One configured peer.
struct Peer {
    index: u32,
    /// Absent while the device has no private key.
    tunnel: Option<Tunn>,
    preshared_key: Option<Key>,
    endpoint: Option<SocketAddr>,
    persistent_keepalive: u16,
}

/// The configuration and peers, mutated only by the data-path task.
struct State {
    private_key: Option<(StaticSecret, PublicKey)>,
    listen_port: u16,
    fwmark: Option<u32>,
    peers: HashMap<Key, Peer>,
    by_index: HashMap<u32, Key>,
    routes: AllowedIpTable<Key>,
    next_index: u32,
}

/// Receiver indices are 24 bits: boringtun shifts them left by 8.
const INDEX_MASK: u32 = 0x00ff_ffff;

impl State {
    fn allocate_index(&mut self) -> u32 {
        loop {
            let index = self.next_index & INDEX_MASK;
            self.next_index = self.next_index.wrapping_add(1);
            if !self.by_index.contains_key(&index) {
                return index;
            }
        }
    }

    fn new_tunnel(
        private_key: &Option<(StaticSecret, PublicKey)>,
        public_key: &Key,
        peer: &Peer,
    ) -> Option<Tunn> {
        let (secret, _) = private_key.as_ref()?;
        Some(Tunn::new(
            secret.clone(),
            PublicKey::from(public_key.0),
            peer.preshared_key.map(|key| key.0),
            (peer.persistent_keepalive != 0).then_some(peer.persistent_keepalive),
            peer.index,
            None,
        ))
    }

    fn remove_peer(&mut self, key: &Key) {
        if let Some(peer) = self.peers.remove(key) {
            self.by_index.remove(&peer.index);
            self.routes.remove_value(key);
        }
    }

    fn apply(&mut self, request: SetRequest, udp: &mut UdpSocket) -> Result<(), DeviceError> {
        if let Some(mark) = request.fwmark {
            let mark = (mark != 0).then_some(mark);
            let socket = socket2::SockRef::from(&*udp);
            let value = mark.unwrap_or(0);
            socket
                .set_mark(value)
                .map_err(|source| DeviceError::SetFwmark {
                    mark: value,
                    source,
                })?;
            self.fwmark = mark;
        }
        if let Some(port) = request.listen_port
            && (port != self.listen_port || port == 0)
        {
            *udp = bind_udp(port, self.fwmark)?;
            self.listen_port = udp.local_addr().map_or(port, |address| address.port());
        }
        if let Some(key) = request.private_key {
            self.private_key = (!key.is_zero()).then(|| {
                let secret = StaticSecret::from(key.0);
                let public = PublicKey::from(&secret);
                (secret, public)
            });
            for (public_key, peer) in &mut self.peers {
                peer.tunnel = Self::new_tunnel(&self.private_key, public_key, peer);
            }
        }
        if request.replace_peers {
            let keys: Vec<Key> = self.peers.keys().copied().collect();
            for key in keys {
                self.remove_peer(&key);
            }
        }
        for update in request.peers {
            self.apply_peer(update);
        }
        Ok(())
    }

    fn apply_peer(&mut self, update: PeerUpdate) {
        let key = update.public_key;
        if update.remove {
            self.remove_peer(&key);
            return;
        }
        let exists = self.peers.contains_key(&key);
        if !exists {
            if update.update_only {
                return;
            }
            let index = self.allocate_index();
            self.by_index.insert(index, key);
            self.peers.insert(
                key,
                Peer {
                    index,
                    tunnel: None,
                    preshared_key: None,
                    endpoint: None,
                    persistent_keepalive: 0,
                },
            );
        }
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        let mut rebuild = !exists;
        if let Some(preshared_key) = update.preshared_key {
            let preshared_key = (!preshared_key.is_zero()).then_some(preshared_key);
            rebuild |= preshared_key != peer.preshared_key;
            peer.preshared_key = preshared_key;
        }
        if let Some(interval) = update.persistent_keepalive_interval {
            // boringtun fixes the keepalive at construction: a change restarts
            // the session, which the next packet renegotiates.
            rebuild |= interval != peer.persistent_keepalive;
            peer.persistent_keepalive = interval;
        }
        if let Some(endpoint) = update.endpoint {
            peer.endpoint = Some(canonical(endpoint));
        }
        if rebuild {
            peer.tunnel = Self::new_tunnel(&self.private_key, &key, peer);
        }
        if update.replace_allowed_ips {
            self.routes.remove_value(&key);
        }
        for prefix in update.allowed_ips {
            self.routes.insert(prefix, key);
        }
    }

    fn snapshot(&self) -> DeviceSnapshot {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut peers: Vec<(&Key, &Peer)> = self.peers.iter().collect();
        peers.sort_by_key(|(_, peer)| peer.index);
        DeviceSnapshot {
            private_key: self
                .private_key
                .as_ref()
                .map(|(secret, _)| Key(secret.to_bytes())),
            listen_port: self.listen_port,
            fwmark: self.fwmark,
            peers: peers
                .into_iter()
                .map(|(key, peer)| {
                    let mut snapshot = PeerSnapshot::new(*key);
                    snapshot.preshared_key = peer.preshared_key;
                    snapshot.endpoint = peer.endpoint;
                    snapshot.persistent_keepalive_interval = peer.persistent_keepalive;
                    snapshot.allowed_ips = self.routes.prefixes_of(key).collect();
                    if let Some(tunnel) = &peer.tunnel {
                        let (since_handshake, tx_bytes, rx_bytes, _, _) = tunnel.stats();
                        snapshot.last_handshake =
                            since_handshake.and_then(|since| now.checked_sub(since));
                        snapshot.tx_bytes = tx_bytes as u64;
                        snapshot.rx_bytes = rx_bytes as u64;
                    }
                    snapshot
                })
                .collect(),
        }
    }

    /// Which peer a datagram from the network belongs to.
    fn peer_for_datagram(&self, datagram: &[u8]) -> Option<Key> {
        let index = match Tunn::parse_incoming_packet(datagram).ok()? {
            Packet::HandshakeInit(packet) => {
                let (secret, public) = self.private_key.as_ref()?;
                let half = parse_handshake_anon(secret, public, &packet).ok()?;
                return Some(Key(half.peer_static_public));
            }
            Packet::HandshakeResponse(packet) => packet.receiver_idx,
            Packet::PacketCookieReply(packet) => packet.receiver_idx,
            Packet::PacketData(packet) => packet.receiver_idx,
        };
        self.by_index.get(&(index >> 8)).copied()
    }
}

/// The endpoint as users write it: IPv4-mapped IPv6 shown as IPv4.
fn canonical(address: SocketAddr) -> SocketAddr {
    SocketAddr::new(address.ip().to_canonical(), address.port())
}

/// The destination in the dual-stack socket's family (IPv4 as mapped IPv6).
fn on_socket(address: SocketAddr) -> SocketAddr {
    match address.ip() {
        IpAddr::V4(v4) => {
            SocketAddr::V6(SocketAddrV6::new(v4.to_ipv6_mapped(), address.port(), 0, 0))
        }
        IpAddr::V6(_) => address,
    }
}

async fn send_to(udp: &UdpSocket, packet: &[u8], endpoint: SocketAddr) {
    if let Err(error) = udp.send_to(packet, on_socket(endpoint)).await {
        tracing::debug!(%endpoint, %error, "cannot send a WireGuard datagram");
    }
}

/// The data path: a TUN device, a UDP socket and the command channel.
pub struct Device {
    tun: AsyncDevice,
    udp: UdpSocket,
    commands: mpsc::Receiver<DeviceCommand>,
}

/// The reusable packet buffers of the data path (no per-packet allocation).
struct Buffers {
    tun: Vec<u8>,
    udp: Vec<u8>,
    out: Vec<u8>,
}

impl Device {
    /// A device over an already created TUN and bound UDP socket.
    pub fn new(tun: AsyncDevice, udp: UdpSocket, commands: mpsc::Receiver<DeviceCommand>) -> Self {
        Self { tun, udp, commands }
    }

    /// Moves packets and applies commands until `shutdown` is cancelled or the
    /// command channel closes.
    pub async fn run(self, shutdown: CancellationToken) {
        let Self {
            tun,
            mut udp,
            mut commands,
        } = self;
        let mut state = State {
            private_key: None,
            listen_port: udp.local_addr().map_or(0, |address| address.port()),
            fwmark: None,
            peers: HashMap::new(),
            by_index: HashMap::new(),
            routes: AllowedIpTable::default(),
            next_index: rand::random::<u32>(),
        };
        let mut buffers = Buffers {
            tun: vec![0; MAX_PACKET],
            udp: vec![0; MAX_PACKET],
            out: vec![0; OUT_BUFFER],
        };
        let mut timers = tokio::time::interval(TIMER_TICK);
        timers.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                read = tun.recv(&mut buffers.tun) => match read {
                    Ok(length) => {
                        outbound(&mut state, &buffers.tun[..length], &mut buffers.out, &udp).await;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "cannot read from the TUN device");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
                read = udp.recv_from(&mut buffers.udp) => match read {
                    Ok((length, source)) => {
                        inbound(
                            &mut state,
                            &buffers.udp[..length],
                            canonical(source),
                            &mut buffers.out,
                            &udp,
                            &tun,
                        )
                        .await;
                    }
                    Err(error) => tracing::debug!(%error, "cannot read from the UDP socket"),
                },
                _ = timers.tick() => tick(&mut state, &mut buffers.out, &udp).await,
                command = commands.recv() => match command {
                    None => break,
                    Some(DeviceCommand::Get { reply }) => {
                        // The asker may have gone; nothing to do then.
                        let _ = reply.send(state.snapshot());
                    }
                    Some(DeviceCommand::Set { request, reply }) => {
                        let result = state.apply(request, &mut udp);
                        let _ = reply.send(result);
                    }
                },
            }
        }
    }
}

/// Encrypts a packet read from the TUN and sends it to the peer whose allowed
/// IPs hold its destination.
async fn outbound(state: &mut State, packet: &[u8], out: &mut [u8], udp: &UdpSocket) {
    let Some(destination) = Tunn::dst_address(packet) else {
        return;
    };
    let Some(key) = state.routes.lookup(destination) else {
        return;
    };
    let Some(peer) = state.peers.get_mut(key) else {
        return;
    };
    let Some(tunnel) = peer.tunnel.as_mut() else {
        return;
    };
    match tunnel.encapsulate(packet, out) {
        TunnResult::WriteToNetwork(datagram) => {
            if let Some(endpoint) = peer.endpoint {
                send_to(udp, datagram, endpoint).await;
            }
        }
        TunnResult::Err(error) => tracing::debug!(?error, "cannot encapsulate a packet"),
        TunnResult::Done | TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {}
    }
}

/// Handles a datagram from the network: handshake replies go back to the
/// sender, decrypted packets go to the TUN if the sender may use the source.
async fn inbound(
    state: &mut State,
    datagram: &[u8],
    source: SocketAddr,
    out: &mut [u8],
    udp: &UdpSocket,
    tun: &AsyncDevice,
) {
    let Some(key) = state.peer_for_datagram(datagram) else {
        return;
    };
    let Some(peer) = state.peers.get_mut(&key) else {
        return;
    };
    let Some(tunnel) = peer.tunnel.as_mut() else {
        return;
    };
    let (packet, address) = match tunnel.decapsulate(Some(source.ip()), datagram, out) {
        TunnResult::Done => {
            peer.endpoint = Some(source);
            return;
        }
        TunnResult::Err(error) => {
            tracing::debug!(?error, %source, "dropping a datagram");
            return;
        }
        TunnResult::WriteToNetwork(reply) => {
            peer.endpoint = Some(source);
            send_to(udp, reply, source).await;
            // Packets queued while the handshake was pending go out now.
            while let TunnResult::WriteToNetwork(queued) = tunnel.decapsulate(None, &[], out) {
                send_to(udp, queued, source).await;
            }
            return;
        }
        TunnResult::WriteToTunnelV4(packet, address) => (packet, IpAddr::V4(address)),
        TunnResult::WriteToTunnelV6(packet, address) => (packet, IpAddr::V6(address)),
    };
    peer.endpoint = Some(source);
    // Cryptokey routing: the inner source must be one of the peer's allowed IPs.
    if state.routes.lookup(address) != Some(&key) {
        tracing::debug!(%address, "dropping a packet from a source the peer may not use");
        return;
    }
    if let Err(error) = tun.send(packet).await {
        tracing::debug!(%error, "cannot write to the TUN device");
    }
}

/// Runs every peer's protocol timers: handshake retries, rekeys, keepalives.
async fn tick(state: &mut State, out: &mut [u8], udp: &UdpSocket) {
    for peer in state.peers.values_mut() {
        let Some(tunnel) = peer.tunnel.as_mut() else {
            continue;
        };
        match tunnel.update_timers(out) {
            TunnResult::WriteToNetwork(datagram) => {
                if let Some(endpoint) = peer.endpoint {
                    send_to(udp, datagram, endpoint).await;
                }
            }
            TunnResult::Err(WireGuardError::ConnectionExpired) => {}
            TunnResult::Err(error) => tracing::debug!(?error, "peer timer error"),
            TunnResult::Done
            | TunnResult::WriteToTunnelV4(..)
            | TunnResult::WriteToTunnelV6(..) => {}
        }
    }
}
