//! Forwarding names outside `ployz.internal` to upstream resolvers, and
//! reading those resolvers from `resolv.conf`.
//!
//! Each forward uses a fresh socket with a random source port and a fresh
//! random id, so an off-path attacker has to guess both; a response is relayed
//! only if its id, QR bit and question match what was sent. UDP queries go
//! upstream over UDP (a truncated upstream answer is relayed as is, and the
//! client retries over TCP); TCP queries go upstream over TCP.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use hickory_proto::op::{Message, MessageType};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
};
use tracing::debug;

use crate::request::{ForwardRequest, Transport};

/// Why a forward got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no upstream resolver is configured")]
    NoUpstreams,
    #[error("upstream {upstream} did not answer within {timeout:?}")]
    Timeout {
        upstream: SocketAddr,
        timeout: Duration,
    },
    #[error("exchange with upstream {upstream} failed")]
    Io {
        upstream: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("upstream {upstream} sent a TCP answer that does not match the query")]
    Mismatch { upstream: SocketAddr },
}

/// Sends queries to a list of upstream resolvers, in order, until one answers.
#[derive(Debug)]
pub(crate) struct Forwarder {
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
}

impl Forwarder {
    pub(crate) fn new(upstreams: Vec<SocketAddr>, timeout: Duration) -> Self {
        Self { upstreams, timeout }
    }

    /// Asks each upstream in turn, giving each `timeout`, and returns the first
    /// matching response with the client's id restored.
    pub(crate) async fn forward(
        &self,
        request: &ForwardRequest,
        transport: Transport,
    ) -> Result<Vec<u8>, ForwardError> {
        let mut last_error = ForwardError::NoUpstreams;
        for &upstream in &self.upstreams {
            let exchange = async {
                match transport {
                    Transport::Udp => exchange_udp(upstream, request).await,
                    Transport::Tcp => exchange_tcp(upstream, request).await,
                }
            };
            let error = match tokio::time::timeout(self.timeout, exchange).await {
                Ok(Ok(response)) => return Ok(response),
                Ok(Err(source)) => match source {
                    ExchangeError::Io(source) => ForwardError::Io { upstream, source },
                    ExchangeError::Mismatch => ForwardError::Mismatch { upstream },
                },
                Err(_elapsed) => ForwardError::Timeout {
                    upstream,
                    timeout: self.timeout,
                },
            };
            debug!(error = %error, "upstream failed; trying the next");
            last_error = error;
        }
        Err(last_error)
    }
}

enum ExchangeError {
    Io(io::Error),
    Mismatch,
}

impl From<io::Error> for ExchangeError {
    fn from(error: io::Error) -> Self {
        Self::Io(error)
    }
}

/// The request's bytes with a fresh random id, and that id.
fn with_fresh_id(request: &ForwardRequest) -> (Vec<u8>, u16) {
    let id: u16 = rand::random();
    let mut packet = request.packet.clone();
    packet[..2].copy_from_slice(&id.to_be_bytes());
    (packet, id)
}

async fn exchange_udp(
    upstream: SocketAddr,
    request: &ForwardRequest,
) -> Result<Vec<u8>, ExchangeError> {
    let local: SocketAddr = match upstream.ip() {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await?;
    // Connected: the kernel drops datagrams from any other source.
    socket.connect(upstream).await?;
    let (packet, id) = with_fresh_id(request);
    socket.send(&packet).await?;
    // Upstreams size their answers by the client's EDNS size, which we pass
    // through; an answer longer than this is cut, fails to parse and is ignored.
    let mut buffer = vec![0u8; request.udp_limit.max(4096)];
    loop {
        let received = socket.recv(&mut buffer).await?;
        let Some(answer) = buffer.get(..received) else {
            continue;
        };
        if let Some(response) = accept_response(answer, id, request) {
            return Ok(response);
        }
        // Not ours (stale, spoofed or garbage): keep waiting until the timeout.
    }
}

async fn exchange_tcp(
    upstream: SocketAddr,
    request: &ForwardRequest,
) -> Result<Vec<u8>, ExchangeError> {
    let mut stream = TcpStream::connect(upstream).await?;
    let (packet, id) = with_fresh_id(request);
    let length = u16::try_from(packet.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "query too long for TCP"))?;
    let mut framed = Vec::with_capacity(packet.len() + 2);
    framed.extend_from_slice(&length.to_be_bytes());
    framed.extend_from_slice(&packet);
    stream.write_all(&framed).await?;
    let length = stream.read_u16().await?;
    let mut answer = vec![0u8; usize::from(length)];
    stream.read_exact(&mut answer).await?;
    accept_response(&answer, id, request).ok_or(ExchangeError::Mismatch)
}

/// The upstream answer with the client's id, if it answers exactly what was
/// asked: same id, a response, and the same question.
fn accept_response(answer: &[u8], id: u16, request: &ForwardRequest) -> Option<Vec<u8>> {
    if answer.get(..2)? != id.to_be_bytes() {
        return None;
    }
    let message = Message::from_vec(answer).ok()?;
    let [question] = message.queries() else {
        return None;
    };
    let matches = message.message_type() == MessageType::Response
        && question.name() == request.query.name()
        && question.query_type() == request.query.query_type()
        && question.query_class() == request.query.query_class();
    if !matches {
        return None;
    }
    let mut response = answer.to_vec();
    response[..2].copy_from_slice(&request.id().to_be_bytes());
    Some(response)
}

/// The upstream resolvers named by `nameserver` lines of a `resolv.conf`, on
/// port 53, in file order, without duplicates.
///
/// A nameserver equal to one of `exclude` (our own listen addresses) is left
/// out, so ployz-dns never forwards to itself; if an excluded address is the
/// unspecified address (we listen on every address), loopback nameservers of
/// the same family on that port are left out too. Other stub resolvers such as
/// `127.0.0.53` are kept: they are a loop only if they are us.
pub fn upstreams_from_resolv_conf(text: &str, exclude: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut upstreams: Vec<SocketAddr> = Vec::new();
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or_default();
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(address) = words.next() else {
            continue;
        };
        // A scoped IPv6 address (`fe80::1%eth0`) cannot be a SocketAddr
        // without its interface index; such resolvers are skipped.
        let Ok(ip) = address.parse::<IpAddr>() else {
            debug!(
                address,
                "skipping a nameserver that is not a plain IP address"
            );
            continue;
        };
        let upstream = SocketAddr::new(ip, 53);
        let is_us = exclude.iter().any(|ours| {
            *ours == upstream
                || (ours.ip().is_unspecified()
                    && ours.port() == upstream.port()
                    && ip.is_loopback()
                    && ours.is_ipv4() == upstream.is_ipv4())
        });
        if !is_us && !upstreams.contains(&upstream) {
            upstreams.push(upstream);
        }
    }
    upstreams
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("socket address")
    }

    #[test]
    fn resolv_conf_nameservers_become_upstreams() {
        let text = "\
# generated
nameserver 127.0.0.53
nameserver 10.0.0.1 # office
options edns0 trust-ad
search example.com
nameserver fd00::53
nameserver 10.0.0.1
nameserver fe80::1%eth0
; nameserver 9.9.9.9
nameserver
";
        assert_eq!(
            upstreams_from_resolv_conf(text, &[]),
            vec![
                addr("127.0.0.53:53"),
                addr("10.0.0.1:53"),
                addr("[fd00::53]:53")
            ]
        );
        assert_eq!(
            upstreams_from_resolv_conf(text, &[addr("127.0.0.53:53")]),
            vec![addr("10.0.0.1:53"), addr("[fd00::53]:53")]
        );
        // Listening on every IPv4 address on port 53 shadows IPv4 loopback resolvers.
        assert_eq!(
            upstreams_from_resolv_conf(text, &[addr("0.0.0.0:53")]),
            vec![addr("10.0.0.1:53"), addr("[fd00::53]:53")]
        );
        // A stub on another port is not us.
        assert_eq!(
            upstreams_from_resolv_conf(text, &[addr("127.0.0.53:5353")]).len(),
            3
        );
    }
}
