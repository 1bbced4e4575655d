//! Batched UDP I/O for the serving loop: on Linux, `recvmmsg` and `sendmmsg`
//! move up to [`BATCH`] datagrams per system call, which is where a local
//! answer spends most of its time; elsewhere, one datagram per call. Only
//! the socket plumbing lives here; what to answer is decided elsewhere.

use std::{io, net::SocketAddr};

use tokio::net::UdpSocket;
use tracing::debug;

/// Datagrams per system call.
pub(crate) const BATCH: usize = 32;

/// The longest request read. DNS queries are far shorter; a longer datagram
/// arrives cut and is dropped (see [`Received::truncated`]).
const MAX_REQUEST: usize = 4096;

/// One datagram of a received batch.
pub(crate) struct Received<'batch> {
    pub(crate) packet: &'batch [u8],
    pub(crate) peer: SocketAddr,
    /// The datagram was longer than [`MAX_REQUEST`] and arrived cut.
    pub(crate) truncated: bool,
}

/// Buffers for receiving a batch of datagrams.
pub(crate) struct Receiver {
    buffers: Vec<[u8; MAX_REQUEST]>,
    #[cfg(target_os = "linux")]
    linux: linux::ReceiveHeaders,
    #[cfg(not(target_os = "linux"))]
    portable: Vec<(usize, SocketAddr)>,
}

impl Receiver {
    pub(crate) fn new() -> Self {
        Self {
            buffers: vec![[0u8; MAX_REQUEST]; BATCH],
            #[cfg(target_os = "linux")]
            linux: linux::ReceiveHeaders::new(),
            #[cfg(not(target_os = "linux"))]
            portable: Vec::with_capacity(1),
        }
    }

    /// Receives what is queued on `socket`, up to [`BATCH`] datagrams,
    /// without waiting; `WouldBlock` when nothing is.
    pub(crate) fn try_receive(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        #[cfg(target_os = "linux")]
        {
            self.linux.receive(socket, &mut self.buffers)
        }
        #[cfg(not(target_os = "linux"))]
        {
            self.portable.clear();
            let buffer = self.buffers.first_mut().expect("BATCH is at least one");
            let (length, peer) = socket.try_recv_from(buffer)?;
            self.portable.push((length, peer));
            Ok(1)
        }
    }

    /// The `index`th datagram of the last batch.
    pub(crate) fn get(&self, index: usize) -> Option<Received<'_>> {
        #[cfg(target_os = "linux")]
        let (length, peer, truncated) = self.linux.datagram(index)?;
        #[cfg(not(target_os = "linux"))]
        let (length, peer, truncated) = {
            let (length, peer) = *self.portable.get(index)?;
            (length, peer, false)
        };
        Some(Received {
            packet: self.buffers.get(index)?.get(..length)?,
            peer,
            truncated,
        })
    }
}

/// Responses waiting to be sent as one batch.
pub(crate) struct Sender {
    pending: Vec<(Vec<u8>, SocketAddr)>,
}

impl Sender {
    pub(crate) fn new() -> Self {
        Self {
            pending: Vec::with_capacity(BATCH),
        }
    }

    pub(crate) fn push(&mut self, datagram: Vec<u8>, peer: SocketAddr) {
        self.pending.push((datagram, peer));
    }

    /// Sends every pending datagram, waiting for room in the socket's send
    /// buffer if need be. A datagram the kernel refuses is logged and skipped.
    pub(crate) async fn flush(&mut self, socket: &UdpSocket) {
        let mut start = 0;
        while start < self.pending.len() {
            let Some(rest) = self.pending.get(start..) else {
                break;
            };
            match try_send(socket, rest) {
                Ok(sent) => start += sent.max(1),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    if socket.writable().await.is_err() {
                        break;
                    }
                }
                Err(error) => {
                    debug!(%error, "udp send failed");
                    start += 1;
                }
            }
        }
        self.pending.clear();
    }
}

#[cfg(target_os = "linux")]
fn try_send(socket: &UdpSocket, datagrams: &[(Vec<u8>, SocketAddr)]) -> io::Result<usize> {
    linux::send(socket, datagrams)
}

#[cfg(not(target_os = "linux"))]
fn try_send(socket: &UdpSocket, datagrams: &[(Vec<u8>, SocketAddr)]) -> io::Result<usize> {
    let Some((datagram, peer)) = datagrams.first() else {
        return Ok(0);
    };
    socket.try_send_to(datagram, *peer).map(|_| 1)
}

#[cfg(target_os = "linux")]
mod linux {
    use std::{io, mem, net::SocketAddr, os::fd::AsRawFd, ptr};

    use socket2::{SockAddr, SockAddrStorage};
    use tokio::{io::Interest, net::UdpSocket};

    use super::{BATCH, MAX_REQUEST};

    /// The kernel-facing arrays of one `recvmmsg` call. The pointers inside
    /// `headers` are rebuilt before every call, so moving this struct is fine.
    pub(super) struct ReceiveHeaders {
        addresses: Vec<libc::sockaddr_storage>,
        iovecs: Vec<libc::iovec>,
        headers: Vec<libc::mmsghdr>,
        received: usize,
    }

    // SAFETY: the raw pointers inside `iovecs` and `headers` are only
    // dereferenced by the kernel during a call made through `&mut self`.
    unsafe impl Send for ReceiveHeaders {}
    // SAFETY: as above; `&self` methods only read plain integers.
    unsafe impl Sync for ReceiveHeaders {}

    impl ReceiveHeaders {
        pub(super) fn new() -> Self {
            Self {
                // SAFETY: all-zero bytes are a valid sockaddr_storage.
                addresses: vec![unsafe { mem::zeroed() }; BATCH],
                iovecs: vec![
                    libc::iovec {
                        iov_base: ptr::null_mut(),
                        iov_len: 0,
                    };
                    BATCH
                ],
                // SAFETY: all-zero bytes are a valid mmsghdr (null pointers, zero lengths).
                headers: vec![unsafe { mem::zeroed() }; BATCH],
                received: 0,
            }
        }

        pub(super) fn receive(
            &mut self,
            socket: &UdpSocket,
            buffers: &mut [[u8; MAX_REQUEST]],
        ) -> io::Result<usize> {
            self.received = 0;
            let slots = buffers
                .iter_mut()
                .zip(&mut self.iovecs)
                .zip(&mut self.addresses)
                .zip(&mut self.headers);
            let mut count = 0;
            for (((buffer, iovec), address), header) in slots {
                *iovec = libc::iovec {
                    iov_base: buffer.as_mut_ptr().cast(),
                    iov_len: buffer.len(),
                };
                // SAFETY: all-zero bytes are a valid mmsghdr.
                *header = unsafe { mem::zeroed() };
                header.msg_hdr.msg_name = ptr::from_mut(address).cast();
                header.msg_hdr.msg_namelen = socklen_of::<libc::sockaddr_storage>();
                header.msg_hdr.msg_iov = ptr::from_mut(iovec);
                header.msg_hdr.msg_iovlen = 1;
                count += 1;
            }
            let count = libc::c_uint::try_from(count).expect("BATCH fits in c_uint");
            let fd = socket.as_raw_fd();
            let headers = self.headers.as_mut_ptr();
            let received = socket.try_io(Interest::READABLE, || {
                // SAFETY: `headers` holds `count` initialised mmsghdr whose
                // name and iovec pointers point into `self.addresses`,
                // `self.iovecs` and `buffers`, all alive and unaliased for the
                // duration of the call; the kernel writes at most the lengths
                // they state.
                let received = unsafe {
                    libc::recvmmsg(fd, headers, count, libc::MSG_DONTWAIT, ptr::null_mut())
                };
                usize::try_from(received).map_err(|_| io::Error::last_os_error())
            })?;
            self.received = received;
            Ok(received)
        }

        /// Length, sender and whether it was cut, of the `index`th datagram.
        pub(super) fn datagram(&self, index: usize) -> Option<(usize, SocketAddr, bool)> {
            if index >= self.received {
                return None;
            }
            let header = self.headers.get(index)?;
            let length = usize::try_from(header.msg_len).ok()?;
            let truncated = header.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            let mut storage = SockAddrStorage::zeroed();
            // SAFETY: sockaddr_storage is one of this platform's sockaddr types.
            unsafe { *storage.view_as::<libc::sockaddr_storage>() = *self.addresses.get(index)? };
            // SAFETY: the kernel wrote a valid address of `msg_namelen` bytes.
            let peer = unsafe { SockAddr::new(storage, header.msg_hdr.msg_namelen) }.as_socket()?;
            Some((length.min(MAX_REQUEST), peer, truncated))
        }
    }

    /// Sends as many of `datagrams` (up to [`BATCH`]) as the socket takes in
    /// one `sendmmsg`.
    pub(super) fn send(
        socket: &UdpSocket,
        datagrams: &[(Vec<u8>, SocketAddr)],
    ) -> io::Result<usize> {
        let datagrams = datagrams
            .get(..datagrams.len().min(BATCH))
            .unwrap_or_default();
        let mut addresses: Vec<SockAddr> = datagrams
            .iter()
            .map(|(_, peer)| SockAddr::from(*peer))
            .collect();
        let mut iovecs: Vec<libc::iovec> = datagrams
            .iter()
            .map(|(datagram, _)| libc::iovec {
                // sendmmsg does not write through iov_base.
                iov_base: datagram.as_ptr().cast_mut().cast(),
                iov_len: datagram.len(),
            })
            .collect();
        let mut headers: Vec<libc::mmsghdr> = addresses
            .iter_mut()
            .zip(&mut iovecs)
            .map(|(address, iovec)| {
                // SAFETY: all-zero bytes are a valid mmsghdr.
                let mut header: libc::mmsghdr = unsafe { mem::zeroed() };
                header.msg_hdr.msg_name = address.as_ptr().cast_mut().cast();
                header.msg_hdr.msg_namelen = address.len();
                header.msg_hdr.msg_iov = ptr::from_mut(iovec);
                header.msg_hdr.msg_iovlen = 1;
                header
            })
            .collect();
        let count = libc::c_uint::try_from(headers.len()).expect("at most BATCH headers");
        let fd = socket.as_raw_fd();
        socket.try_io(Interest::WRITABLE, || {
            // SAFETY: `headers` holds `count` initialised mmsghdr pointing
            // into `addresses`, `iovecs` and `datagrams`, alive for the call;
            // the kernel only reads them (and writes each `msg_len`).
            let sent =
                unsafe { libc::sendmmsg(fd, headers.as_mut_ptr(), count, libc::MSG_DONTWAIT) };
            usize::try_from(sent).map_err(|_| io::Error::last_os_error())
        })
    }

    fn socklen_of<T>() -> libc::socklen_t {
        libc::socklen_t::try_from(mem::size_of::<T>()).expect("a sockaddr fits in socklen_t")
    }
}
