//! Binding the listen sockets with the options a busy resolver needs. The
//! binary calls these and hands the sockets to [`crate::DnsServer`]; tests may
//! bind plainly.

use std::{io, net::SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, UdpSocket};

/// The receive buffer asked for; the kernel caps it at `net.core.rmem_max`.
const UDP_RECEIVE_BUFFER: usize = 4 << 20;

/// Binds a UDP socket for [`crate::DnsServer::serve_udp`] with a large
/// receive buffer, so bursts queue instead of being dropped. An IPv6 address
/// binds IPv6 only. Must be called within a Tokio runtime.
pub fn bind_udp(address: SocketAddr) -> io::Result<UdpSocket> {
    udp_socket(address, PortSharing::Exclusive)
}

/// Binds `count` (at least one) UDP sockets on one address with
/// `SO_REUSEPORT`, so the kernel spreads clients over `count` `serve_udp`
/// loops, e.g. one per runtime worker thread. With port 0, all share the port
/// the first one got. Must be called within a Tokio runtime.
pub fn bind_udp_shared(address: SocketAddr, count: usize) -> io::Result<Vec<UdpSocket>> {
    let first = udp_socket(address, PortSharing::ReusePort)?;
    let address = first.local_addr()?;
    let mut sockets = vec![first];
    for _ in 1..count {
        sockets.push(udp_socket(address, PortSharing::ReusePort)?);
    }
    Ok(sockets)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum PortSharing {
    Exclusive,
    ReusePort,
}

fn udp_socket(address: SocketAddr, sharing: PortSharing) -> io::Result<UdpSocket> {
    let socket = Socket::new(
        Domain::for_address(address),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    if address.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if sharing == PortSharing::ReusePort {
        socket.set_reuse_port(true)?;
    }
    // Best effort: a smaller buffer still works.
    let _ = socket.set_recv_buffer_size(UDP_RECEIVE_BUFFER);
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    UdpSocket::from_std(socket.into())
}

/// Binds a TCP listener for [`crate::DnsServer::serve_tcp`] (address reuse,
/// a backlog of 1024). An IPv6 address binds IPv6 only. Must be called within
/// a Tokio runtime.
pub fn bind_tcp(address: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    if address.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}
