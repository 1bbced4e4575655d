//! The DNS server: UDP and TCP loops over caller-bound sockets, serving the
//! zone of the latest routing snapshot and forwarding everything else.
//!
//! Local answers are made in the receive loop itself, without a task per
//! query, from datagrams read and answered in batches (`recvmmsg`/`sendmmsg` on Linux);
//! only forwards (UDP) and connections (TCP) get tasks, each owned by the
//! loop's `JoinSet` and joined (then aborted after a grace period) on
//! shutdown. In-flight forwards and TCP connections are bounded by semaphores.
//! For several cores, run one `serve_udp` per socket of
//! [`crate::bind_udp_shared`].

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use ployz_routing::{Snapshot, SnapshotReceiver};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{OwnedSemaphorePermit, Semaphore},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    forward::Forwarder,
    request::{
        DropReason, ForwardRequest, Outcome, ResponderOptions, ResponseKind, Transport,
        handle_request,
    },
    udp_batch,
    zone::{Zone, ZoneTtls},
};

/// Settings of a [`DnsServer`]; the defaults suit a node-local resolver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsOptions {
    /// TTLs of the records served from the zone.
    pub ttls: ZoneTtls,
    /// How long each upstream gets to answer before the next one is asked.
    pub forward_timeout: Duration,
    /// Forwards in flight at once; beyond this, queries get SERVFAIL at once.
    pub max_forwards_in_flight: usize,
    /// Open TCP connections at once; beyond this, new connections are closed.
    pub max_tcp_connections: usize,
    /// A TCP connection with no complete query for this long is closed.
    pub tcp_idle_timeout: Duration,
    /// The UDP payload size advertised in EDNS (1232 avoids fragmentation).
    pub edns_payload: u16,
    /// How long shutdown waits for forwards and connections before aborting them.
    pub shutdown_grace: Duration,
}

impl Default for DnsOptions {
    fn default() -> Self {
        Self {
            ttls: ZoneTtls::default(),
            forward_timeout: Duration::from_secs(2),
            max_forwards_in_flight: 1024,
            max_tcp_connections: 256,
            tcp_idle_timeout: Duration::from_secs(10),
            edns_payload: 1232,
            shutdown_grace: Duration::from_secs(1),
        }
    }
}

/// Counters since start, and what is being served.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsStats {
    /// Datagrams and TCP messages received.
    pub queries: u64,
    /// Answers from the zone, NXDOMAIN included.
    pub local_answers: u64,
    pub nxdomain: u64,
    /// UDP answers cut to an empty answer with TC set.
    pub truncated: u64,
    /// Queries sent upstream (accepted into the in-flight bound).
    pub forwarded: u64,
    /// Forwards no upstream answered (SERVFAIL sent), rejections included.
    pub forward_failures: u64,
    /// Forwards refused because the in-flight bound was reached.
    pub forwards_rejected: u64,
    /// Forwards in flight now.
    pub forwards_in_flight: u64,
    /// Requests with a readable header but unparseable body (FORMERR sent).
    pub malformed: u64,
    /// Well-formed requests refused (REFUSED, NOTIMP, FORMERR, BADVERS).
    pub rejected: u64,
    /// Packets not answered at all (too short, responses, unencodable).
    pub dropped: u64,
    /// TCP connections closed at once because too many were open.
    pub tcp_connections_rejected: u64,
    /// Where the served routing table came from (`empty`, `last-good`, `store`).
    pub origin: String,
    /// The deploy commit served for each namespace.
    pub serving: BTreeMap<String, u64>,
}

#[derive(Debug, Default)]
struct Counters {
    queries: AtomicU64,
    local_answers: AtomicU64,
    nxdomain: AtomicU64,
    truncated: AtomicU64,
    forwarded: AtomicU64,
    forward_failures: AtomicU64,
    forwards_rejected: AtomicU64,
    malformed: AtomicU64,
    rejected: AtomicU64,
    dropped: AtomicU64,
    tcp_connections_rejected: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The zone compiled from one snapshot.
#[derive(Debug)]
struct Compiled {
    snapshot: Arc<Snapshot>,
    zone: Arc<Zone>,
}

/// A DNS server for `ployz.internal` that forwards every other name.
#[derive(Debug)]
pub struct DnsServer {
    snapshots: SnapshotReceiver,
    compiled: Mutex<Compiled>,
    forwarder: Forwarder,
    forward_permits: Arc<Semaphore>,
    options: DnsOptions,
    responder: ResponderOptions,
    counters: Counters,
}

impl DnsServer {
    /// A server answering from the latest snapshot of `snapshots` and
    /// forwarding other names to `upstreams`, tried in order.
    pub fn new(
        snapshots: SnapshotReceiver,
        upstreams: Vec<SocketAddr>,
        options: DnsOptions,
    ) -> Arc<Self> {
        let snapshot = snapshots.borrow().clone();
        let zone = Arc::new(Zone::compile(&snapshot.table, options.ttls));
        Arc::new(Self {
            snapshots,
            compiled: Mutex::new(Compiled { snapshot, zone }),
            forwarder: Forwarder::new(upstreams, options.forward_timeout),
            forward_permits: Arc::new(Semaphore::new(options.max_forwards_in_flight)),
            responder: ResponderOptions {
                edns_payload: options.edns_payload,
            },
            options,
            counters: Counters::default(),
        })
    }

    /// Counters and the commits being served.
    pub fn stats(&self) -> DnsStats {
        let snapshot = self.snapshots.borrow().clone();
        let zone = self.zone_for(snapshot.clone());
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let counters = &self.counters;
        let in_flight = self
            .options
            .max_forwards_in_flight
            .saturating_sub(self.forward_permits.available_permits());
        DnsStats {
            queries: load(&counters.queries),
            local_answers: load(&counters.local_answers),
            nxdomain: load(&counters.nxdomain),
            truncated: load(&counters.truncated),
            forwarded: load(&counters.forwarded),
            forward_failures: load(&counters.forward_failures),
            forwards_rejected: load(&counters.forwards_rejected),
            forwards_in_flight: u64::try_from(in_flight).unwrap_or(u64::MAX),
            malformed: load(&counters.malformed),
            rejected: load(&counters.rejected),
            dropped: load(&counters.dropped),
            tcp_connections_rejected: load(&counters.tcp_connections_rejected),
            origin: snapshot.origin.as_str().to_owned(),
            serving: zone.commits().clone(),
        }
    }

    /// Serves DNS over UDP on `socket` until `shutdown` is cancelled; then
    /// waits for forwards in flight (up to the shutdown grace) and returns.
    pub async fn serve_udp(self: Arc<Self>, socket: UdpSocket, shutdown: CancellationToken) {
        let socket = Arc::new(socket);
        let mut forwards = JoinSet::new();
        let mut snapshots = self.snapshots.clone();
        let mut zone = self.zone_for(snapshots.borrow_and_update().clone());
        let mut receiver = udp_batch::Receiver::new();
        let mut sender = udp_batch::Sender::new();
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(_) = forwards.join_next(), if !forwards.is_empty() => continue,
                readable = socket.readable() => {
                    if let Err(error) = readable {
                        warn!(%error, "udp socket failed");
                        break;
                    }
                }
            }
            // Drain what is queued without going back through `select!`, but
            // only a few batches at a time so shutdown and reaping stay prompt.
            for _ in 0..UDP_BATCHES_PER_WAKEUP {
                let received = match receiver.try_receive(&socket) {
                    Ok(received) => received,
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(error) => {
                        debug!(%error, "udp receive failed");
                        break;
                    }
                };
                // A version check per batch is one atomic load; the zone is
                // compiled once per snapshot and shared by every loop.
                if snapshots.has_changed().unwrap_or(false) {
                    zone = self.zone_for(snapshots.borrow_and_update().clone());
                }
                for index in 0..received {
                    let Some(datagram) = receiver.get(index) else {
                        continue;
                    };
                    if datagram.truncated {
                        bump(&self.counters.queries);
                        bump(&self.counters.dropped);
                        continue;
                    }
                    match self.handle(&zone, datagram.packet, Transport::Udp) {
                        Some(Handled::Respond(response)) => sender.push(response, datagram.peer),
                        Some(Handled::Forward(request)) => {
                            self.start_udp_forward(
                                request,
                                datagram.peer,
                                &socket,
                                &mut forwards,
                                &shutdown,
                            )
                            .await;
                        }
                        None => {}
                    }
                }
                sender.flush(&socket).await;
                if received < udp_batch::BATCH {
                    break;
                }
            }
        }
        drain(forwards, self.options.shutdown_grace, "udp forwards").await;
    }

    /// Serves DNS over TCP (RFC 7766 framing, several queries per connection)
    /// on `listener` until `shutdown` is cancelled; then closes connections
    /// (after the shutdown grace at most) and returns.
    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        let connection_permits = Arc::new(Semaphore::new(self.options.max_tcp_connections));
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let Ok(permit) = connection_permits.clone().try_acquire_owned() else {
                            bump(&self.counters.tcp_connections_rejected);
                            drop(stream);
                            continue;
                        };
                        connections.spawn(self.clone().serve_connection(
                            stream,
                            peer,
                            permit,
                            shutdown.clone(),
                        ));
                    }
                    Err(error) => {
                        // Usually out of file descriptors: back off instead of spinning.
                        warn!(%error, "tcp accept failed");
                        tokio::select! {
                            () = shutdown.cancelled() => break,
                            () = tokio::time::sleep(Duration::from_millis(50)) => {}
                        }
                    }
                },
            }
        }
        drain(connections, self.options.shutdown_grace, "tcp connections").await;
    }

    /// The zone of `snapshot`, compiled if no loop has compiled it yet.
    fn zone_for(&self, snapshot: Arc<Snapshot>) -> Arc<Zone> {
        let mut compiled = self.compiled.lock().unwrap_or_else(PoisonError::into_inner);
        if !Arc::ptr_eq(&compiled.snapshot, &snapshot) {
            let zone = Arc::new(Zone::compile(&snapshot.table, self.options.ttls));
            info!(
                origin = snapshot.origin.as_str(),
                namespaces = zone.commits().len(),
                "serving a new routing snapshot"
            );
            *compiled = Compiled { snapshot, zone };
        }
        compiled.zone.clone()
    }

    fn current_zone(&self) -> Arc<Zone> {
        self.zone_for(self.snapshots.borrow().clone())
    }

    /// Runs a request through [`handle_request`] and counts the outcome.
    fn handle(&self, zone: &Zone, packet: &[u8], transport: Transport) -> Option<Handled> {
        let counters = &self.counters;
        bump(&counters.queries);
        match handle_request(zone, packet, transport, &self.responder) {
            Outcome::Respond { response, kind } => {
                match kind {
                    ResponseKind::Answer { truncated } => {
                        bump(&counters.local_answers);
                        if truncated {
                            bump(&counters.truncated);
                        }
                    }
                    ResponseKind::NxDomain => {
                        bump(&counters.local_answers);
                        bump(&counters.nxdomain);
                    }
                    ResponseKind::Malformed => bump(&counters.malformed),
                    ResponseKind::Rejected => bump(&counters.rejected),
                }
                Some(Handled::Respond(response))
            }
            Outcome::Forward(request) => Some(Handled::Forward(request)),
            Outcome::Drop(reason) => {
                match reason {
                    DropReason::TooShort => bump(&counters.malformed),
                    DropReason::NotAQuery | DropReason::Unencodable => {}
                }
                bump(&counters.dropped);
                None
            }
        }
    }

    /// Takes a forward slot or answers SERVFAIL right away.
    fn forward_permit(&self, request: &ForwardRequest) -> Result<OwnedSemaphorePermit, Vec<u8>> {
        match self.forward_permits.clone().try_acquire_owned() {
            Ok(permit) => {
                bump(&self.counters.forwarded);
                Ok(permit)
            }
            Err(_) => {
                bump(&self.counters.forwards_rejected);
                bump(&self.counters.forward_failures);
                Err(request.servfail(&self.responder).unwrap_or_default())
            }
        }
    }

    async fn start_udp_forward(
        self: &Arc<Self>,
        request: ForwardRequest,
        peer: SocketAddr,
        socket: &Arc<UdpSocket>,
        forwards: &mut JoinSet<()>,
        shutdown: &CancellationToken,
    ) {
        let permit = match self.forward_permit(&request) {
            Ok(permit) => permit,
            Err(servfail) => {
                if !servfail.is_empty() {
                    send_udp(socket, &servfail, peer).await;
                }
                return;
            }
        };
        let server = self.clone();
        let socket = socket.clone();
        let shutdown = shutdown.clone();
        forwards.spawn(async move {
            let _permit = permit;
            let response = tokio::select! {
                () = shutdown.cancelled() => return,
                response = server.forward(&request, Transport::Udp) => response,
            };
            if let Some(response) = response {
                send_udp(&socket, &response, peer).await;
            }
        });
    }

    /// The upstream answer, or SERVFAIL if none came.
    async fn forward(&self, request: &ForwardRequest, transport: Transport) -> Option<Vec<u8>> {
        match self.forwarder.forward(request, transport).await {
            Ok(response) => Some(response),
            Err(error) => {
                bump(&self.counters.forward_failures);
                debug!(
                    error = %ployz_routing::error_chain(&error),
                    name = %request.query.name(),
                    "forward failed"
                );
                request.servfail(&self.responder)
            }
        }
    }

    async fn serve_connection(
        self: Arc<Self>,
        mut stream: TcpStream,
        peer: SocketAddr,
        _permit: OwnedSemaphorePermit,
        shutdown: CancellationToken,
    ) {
        let idle = self.options.tcp_idle_timeout;
        loop {
            let read = async {
                let length = stream.read_u16().await?;
                let mut packet = vec![0u8; usize::from(length)];
                stream.read_exact(&mut packet).await?;
                Ok::<_, std::io::Error>(packet)
            };
            let packet = tokio::select! {
                () = shutdown.cancelled() => return,
                read = tokio::time::timeout(idle, read) => match read {
                    Ok(Ok(packet)) => packet,
                    // Closed, reset or idle: all end the connection quietly.
                    Ok(Err(_)) | Err(_) => return,
                },
            };
            let zone = self.current_zone();
            let response = match self.handle(&zone, &packet, Transport::Tcp) {
                Some(Handled::Respond(response)) => response,
                Some(Handled::Forward(request)) => match self.forward_permit(&request) {
                    Ok(_permit) => {
                        let forwarded = tokio::select! {
                            () = shutdown.cancelled() => return,
                            response = self.forward(&request, Transport::Tcp) => response,
                        };
                        match forwarded {
                            Some(response) => response,
                            None => return,
                        }
                    }
                    Err(servfail) => servfail,
                },
                // Nothing sensible to answer: the client would wait forever.
                None => return,
            };
            let Ok(length) = u16::try_from(response.len()) else {
                return;
            };
            let mut framed = Vec::with_capacity(response.len() + 2);
            framed.extend_from_slice(&length.to_be_bytes());
            framed.extend_from_slice(&response);
            match tokio::time::timeout(idle, stream.write_all(&framed)).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    debug!(%error, %peer, "tcp write failed");
                    return;
                }
                Err(_) => return,
            }
        }
    }
}

/// Batches handled per wake-up before checking shutdown again.
const UDP_BATCHES_PER_WAKEUP: usize = 4;

/// Sends a datagram, without a trip through the reactor when the socket's
/// send buffer has room (the usual case).
async fn send_udp(socket: &UdpSocket, datagram: &[u8], peer: SocketAddr) {
    let sent = match socket.try_send_to(datagram, peer) {
        Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
            socket.send_to(datagram, peer).await
        }
        other => other,
    };
    if let Err(error) = sent {
        debug!(%error, %peer, "udp send failed");
    }
}

enum Handled {
    Respond(Vec<u8>),
    Forward(ForwardRequest),
}

/// Joins `tasks` for up to `grace`, then aborts what is left.
async fn drain(mut tasks: JoinSet<()>, grace: Duration, what: &str) {
    let joined =
        tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    if joined.is_err() {
        warn!(
            remaining = tasks.len(),
            what, "aborting after the shutdown grace"
        );
        tasks.shutdown().await;
    }
}
