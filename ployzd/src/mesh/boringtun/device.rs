//! The userspace WireGuard data path: one TUN device, one UDP socket and a
//! boringtun [`Tunn`] per peer. Owns peer state, routes outbound packets to
//! peers by allowed IPs (longest prefix) and inbound datagrams by receiver
//! index (or, for handshake initiations, by the sender's static key), and
//! ticks the protocol timers. Configuration arrives as [`DeviceCommand`]s from
//! the UAPI server; this module knows nothing about sockets' text protocol.
//!
//! The cost of a userspace tunnel is one system call per packet, so both
//! sides move packets in batches. The TUN device runs with offloads
//! (virtio-net headers): one read yields a whole TCP burst the kernel has not
//! segmented yet, split here into MTU-sized packets, and one write hands the
//! kernel many decrypted packets coalesced (GRO). The UDP socket sends runs of
//! equal-sized datagrams to one peer as a single GSO send and reads
//! coalesced datagrams with GRO (quinn-udp).

use std::{
    collections::HashMap,
    io::{self, IoSliceMut},
    net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6},
    os::fd::AsRawFd,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ::boringtun::{
    noise::{Packet, Tunn, TunnResult, errors::WireGuardError, handshake::parse_handshake_anon},
    x25519::{PublicKey, StaticSecret},
};
use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    io::Interest,
    net::UdpSocket,
    sync::{mpsc, oneshot},
};
use tokio_util::sync::CancellationToken;
use tun_rs::{AsyncDevice, DeviceBuilder, GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

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
/// The most packets one TUN read yields, and one TUN write takes.
const BATCH: usize = IDEAL_BATCH_SIZE;
/// Room for one packet of the MTU once the kernel's burst is split.
const SEGMENT_BUFFER: usize = 4096;
/// Where a decrypted packet starts in a TUN write buffer: after the room for
/// the virtio-net header the offload path writes in front of it.
const TUN_OFFSET: usize = 16;
/// A GSO send stays below the 64 KiB a UDP send may carry (EMSGSIZE beyond).
const GSO_MAX_BYTES: usize = 65_000;
/// How many (possibly coalesced) reads one UDP wake-up drains at most, so
/// the TUN side and the commands get their turn.
const UDP_READS_PER_WAKE: usize = 16;
/// Buffers handed to one UDP receive call (recvmmsg), each a GRO batch.
const UDP_RECV_BUFFERS: usize = 4;

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

/// Creates the TUN device `name` (layer 3, no packet information header),
/// with offloads where the kernel offers them. Retries while the kernel still
/// holds a same-named device of a process that just died (EBUSY).
pub async fn create_tun(name: &str) -> Result<AsyncDevice, DeviceError> {
    let deadline = tokio::time::Instant::now() + TUN_BUSY_WAIT;
    let mut offload = true;
    loop {
        match DeviceBuilder::new()
            .name(name)
            .mtu(TUN_MTU)
            .offload(offload)
            .build_async()
        {
            Ok(device) => return Ok(device),
            Err(error) if offload && error.raw_os_error() == Some(libc::EINVAL) => {
                tracing::warn!(%error, "the TUN device refuses offloads; packets move one per system call");
                offload = false;
            }
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

    fn apply(&mut self, request: SetRequest, udp: &mut Udp) -> Result<(), DeviceError> {
        if let Some(mark) = request.fwmark {
            let mark = (mark != 0).then_some(mark);
            let socket = socket2::SockRef::from(&udp.socket);
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
            *udp = Udp::new(bind_udp(port, self.fwmark)?)?;
            self.listen_port = udp
                .socket
                .local_addr()
                .map_or(port, |address| address.port());
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

/// The UDP socket with its offload state (GSO and GRO where the kernel has them).
struct Udp {
    socket: UdpSocket,
    state: UdpSocketState,
}

impl Udp {
    fn new(socket: UdpSocket) -> Result<Self, DeviceError> {
        let port = socket.local_addr().map_or(0, |address| address.port());
        let state = UdpSocketState::new((&socket).into())
            .map_err(|source| DeviceError::BindUdp { port, source })?;
        Ok(Self { socket, state })
    }

    /// Sends `contents` to `endpoint`: one datagram, or with `segment` a GSO
    /// run of datagrams of that size (the last may be shorter).
    async fn send(&self, contents: &[u8], endpoint: SocketAddr, segment: Option<usize>) {
        let transmit = Transmit {
            destination: on_socket(endpoint),
            ecn: None,
            contents,
            segment_size: segment,
            src_ip: None,
        };
        loop {
            if let Err(error) = self.socket.writable().await {
                tracing::debug!(%endpoint, %error, "cannot send a WireGuard datagram");
                return;
            }
            match self.socket.try_io(Interest::WRITABLE, || {
                self.state.try_send((&self.socket).into(), &transmit)
            }) {
                Ok(()) => return,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => {
                    tracing::debug!(%endpoint, %error, "cannot send a WireGuard datagram");
                    return;
                }
            }
        }
    }

    fn try_recv(&self, buffers: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> io::Result<usize> {
        self.socket.try_io(Interest::READABLE, || {
            self.state.recv((&self.socket).into(), buffers, meta)
        })
    }
}

/// Collects encrypted datagrams into GSO runs: consecutive datagrams to one
/// endpoint, all of one size but the last, sent with a single system call.
struct GsoBatch {
    buffer: Vec<u8>,
    endpoint: Option<SocketAddr>,
    segment: usize,
    segments: usize,
}

impl GsoBatch {
    fn new() -> Self {
        Self {
            buffer: Vec::with_capacity(GSO_MAX_BYTES),
            endpoint: None,
            segment: 0,
            segments: 0,
        }
    }

    async fn push(&mut self, udp: &Udp, datagram: &[u8], endpoint: SocketAddr) {
        let joins = self.segments > 0
            && self.endpoint == Some(endpoint)
            && datagram.len() <= self.segment
            && self.segments < udp.state.max_gso_segments()
            && self.buffer.len() + datagram.len() <= GSO_MAX_BYTES;
        if !joins {
            self.flush(udp).await;
            self.endpoint = Some(endpoint);
            self.segment = datagram.len();
        }
        self.buffer.extend_from_slice(datagram);
        self.segments += 1;
        // A shorter datagram can only end a run.
        if datagram.len() < self.segment {
            self.flush(udp).await;
        }
    }

    async fn flush(&mut self, udp: &Udp) {
        if let Some(endpoint) = self.endpoint.take()
            && self.segments > 0
        {
            let segment = (self.segments > 1).then_some(self.segment);
            udp.send(&self.buffer, endpoint, segment).await;
        }
        self.buffer.clear();
        self.segments = 0;
    }
}

/// Decrypted packets waiting for one batched TUN write.
struct TunBatch {
    /// Each buffer holds [`TUN_OFFSET`] bytes of room, then a packet.
    buffers: Vec<Vec<u8>>,
    filled: usize,
    gro: GROTable,
}

impl TunBatch {
    fn new() -> Self {
        let buffers = (0..BATCH)
            .map(|_| {
                // Room to grow: the write may coalesce packets into a buffer.
                let mut buffer = Vec::with_capacity(TUN_OFFSET + MAX_PACKET);
                buffer.resize(TUN_OFFSET + SEGMENT_BUFFER, 0);
                buffer
            })
            .collect();
        Self {
            buffers,
            filled: 0,
            gro: GROTable::default(),
        }
    }

    /// Where the next packet is decrypted to.
    fn next_slot(&mut self) -> &mut [u8] {
        &mut self.buffers[self.filled][TUN_OFFSET..]
    }

    /// Keeps the `length` bytes just decrypted into the next slot.
    async fn commit(&mut self, length: usize, tun: &AsyncDevice) {
        self.buffers[self.filled].truncate(TUN_OFFSET + length);
        self.filled += 1;
        if self.filled == self.buffers.len() {
            self.flush(tun).await;
        }
    }

    async fn flush(&mut self, tun: &AsyncDevice) {
        if self.filled == 0 {
            return;
        }
        let written = tun
            .send_multiple(&mut self.gro, &mut self.buffers[..self.filled], TUN_OFFSET)
            .await;
        if let Err(error) = written {
            tracing::debug!(%error, "cannot write to the TUN device");
        }
        for buffer in &mut self.buffers[..self.filled] {
            buffer.resize(TUN_OFFSET + SEGMENT_BUFFER, 0);
        }
        self.filled = 0;
    }
}

/// The data path: a TUN device, a UDP socket and the command channel.
pub struct Device {
    tun: AsyncDevice,
    udp: Udp,
    commands: mpsc::Receiver<DeviceCommand>,
}

impl Device {
    /// A device over an already created TUN and bound UDP socket.
    pub fn new(
        tun: AsyncDevice,
        udp: UdpSocket,
        commands: mpsc::Receiver<DeviceCommand>,
    ) -> Result<Self, DeviceError> {
        Ok(Self {
            tun,
            udp: Udp::new(udp)?,
            commands,
        })
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
            listen_port: udp.socket.local_addr().map_or(0, |address| address.port()),
            fwmark: None,
            peers: HashMap::new(),
            by_index: HashMap::new(),
            routes: AllowedIpTable::default(),
            next_index: rand::random::<u32>(),
        };
        // Reusable buffers: nothing is allocated per packet.
        let mut tun_read = vec![0; VIRTIO_NET_HDR_LEN + MAX_PACKET];
        let mut segments = vec![vec![0; SEGMENT_BUFFER]; BATCH];
        let mut sizes = vec![0; BATCH];
        let mut udp_buffers = vec![vec![0; MAX_PACKET]; UDP_RECV_BUFFERS];
        let mut udp_meta = vec![RecvMeta::default(); UDP_RECV_BUFFERS];
        let mut out = vec![0; OUT_BUFFER];
        let mut gso = GsoBatch::new();
        let mut to_tun = TunBatch::new();
        let mut timers = tokio::time::interval(TIMER_TICK);
        timers.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                read = tun.recv_multiple(&mut tun_read, &mut segments, &mut sizes, 0) => match read {
                    Ok(count) => {
                        for (segment, size) in segments.iter().zip(&sizes).take(count) {
                            outbound(&mut state, &segment[..*size], &mut out, &mut gso, &udp).await;
                        }
                        gso.flush(&udp).await;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "cannot read from the TUN device");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
                ready = udp.socket.readable() => {
                    if let Err(error) = ready {
                        tracing::debug!(%error, "the UDP socket is not readable");
                        continue;
                    }
                    for _ in 0..UDP_READS_PER_WAKE {
                        let mut slices: Vec<IoSliceMut<'_>> =
                            udp_buffers.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                        let received = match udp.try_recv(&mut slices, &mut udp_meta) {
                            Ok(received) => received,
                            Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                            Err(error) => {
                                tracing::debug!(%error, "cannot read from the UDP socket");
                                break;
                            }
                        };
                        drop(slices);
                        for (buffer, meta) in udp_buffers.iter().zip(&udp_meta).take(received) {
                            let stride = meta.stride.max(1);
                            let source = canonical(meta.addr);
                            for datagram in buffer[..meta.len].chunks(stride) {
                                inbound(&mut state, datagram, source, &mut out, &udp, &mut to_tun, &tun)
                                    .await;
                            }
                        }
                    }
                    to_tun.flush(&tun).await;
                },
                _ = timers.tick() => tick(&mut state, &mut out, &udp).await,
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

/// Encrypts a packet read from the TUN and queues it for the peer whose
/// allowed IPs hold its destination.
async fn outbound(state: &mut State, packet: &[u8], out: &mut [u8], gso: &mut GsoBatch, udp: &Udp) {
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
                gso.push(udp, datagram, endpoint).await;
            }
        }
        TunnResult::Err(error) => tracing::debug!(?error, "cannot encapsulate a packet"),
        TunnResult::Done | TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {}
    }
}

/// Handles a datagram from the network: handshake replies go back to the
/// sender, decrypted packets join the TUN batch if the sender may use the source.
async fn inbound(
    state: &mut State,
    datagram: &[u8],
    source: SocketAddr,
    out: &mut [u8],
    udp: &Udp,
    to_tun: &mut TunBatch,
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
    let (length, address) =
        match tunnel.decapsulate(Some(source.ip()), datagram, to_tun.next_slot()) {
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
                udp.send(reply, source, None).await;
                // Packets queued while the handshake was pending go out now.
                while let TunnResult::WriteToNetwork(queued) = tunnel.decapsulate(None, &[], out) {
                    udp.send(queued, source, None).await;
                }
                return;
            }
            TunnResult::WriteToTunnelV4(packet, address) => (packet.len(), IpAddr::V4(address)),
            TunnResult::WriteToTunnelV6(packet, address) => (packet.len(), IpAddr::V6(address)),
        };
    peer.endpoint = Some(source);
    // Cryptokey routing: the inner source must be one of the peer's allowed IPs.
    if state.routes.lookup(address) != Some(&key) {
        tracing::debug!(%address, "dropping a packet from a source the peer may not use");
        return;
    }
    to_tun.commit(length, tun).await;
}

/// Runs every peer's protocol timers: handshake retries, rekeys, keepalives.
async fn tick(state: &mut State, out: &mut [u8], udp: &Udp) {
    for peer in state.peers.values_mut() {
        let Some(tunnel) = peer.tunnel.as_mut() else {
            continue;
        };
        match tunnel.update_timers(out) {
            TunnResult::WriteToNetwork(datagram) => {
                if let Some(endpoint) = peer.endpoint {
                    udp.send(datagram, endpoint, None).await;
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
