//! The eBPF packet counter against a real kernel: two network namespaces made by
//! this test, joined by a veth pair; the classifier sits on one end's ingress and
//! must count every datagram sent from the other end while passing it through.
//! Needs root (CI runs as root) and a ployzd built with the eBPF toolchain: a
//! build without it fails here rather than skipping.

use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::AsRawFd as _,
    process::Command,
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use ployzd::mesh::ebpf::{PacketCounter, availability};

/// Datagrams sent through the counter.
const DATAGRAMS: u64 = 20;
/// UDP payload of each datagram.
const PAYLOAD: usize = 200;
/// Ethernet (14) + IPv4 (20) + UDP (8) headers around each payload.
const HEADERS: u64 = 42;
const SENDER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 1);
const RECEIVER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 2);

#[test]
fn classifier_counts_every_ingress_datagram_and_passes_it_on() -> Result<()> {
    let availability = availability();
    ensure!(
        availability.available,
        "{availability}. This test needs a ployzd built with the eBPF toolchain: run \
         `cargo xtask setup`, then rebuild"
    );
    // SAFETY: geteuid only reads the calling process's credentials.
    let euid = unsafe { libc::geteuid() };
    ensure!(
        euid == 0,
        "loading eBPF and creating network namespaces needs root (euid is {euid})"
    );

    let hosts = TwoHosts::create()?;
    let mut counter = PacketCounter::load().context("loading the packet counter")?;

    // The classifier attaches to an interface of the loader's namespace, so
    // attach (and open the receiving socket) from inside the receiver's.
    let receiver = in_netns(&hosts.receiver_ns, || -> Result<UdpSocket> {
        let mode = counter
            .attach(&hosts.receiver_if)
            .context("attaching the counter")?;
        eprintln!("attached to {} ingress via {mode}", hosts.receiver_if);
        let socket = UdpSocket::bind(SocketAddrV4::new(RECEIVER_ADDR, 0))?;
        socket.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(socket)
    })?;
    let before = counter.count()?;
    let target = receiver.local_addr()?;

    in_netns(&hosts.sender_ns, || -> Result<()> {
        let socket = UdpSocket::bind(SocketAddrV4::new(SENDER_ADDR, 0))?;
        for sequence in 0..DATAGRAMS {
            let mut payload = [0_u8; PAYLOAD];
            payload[..8].copy_from_slice(&sequence.to_be_bytes());
            socket.send_to(&payload, target)?;
        }
        Ok(())
    })?;

    // Pass-through: every datagram reaches the receiving socket.
    let mut buffer = [0_u8; 2048];
    for received in 0..DATAGRAMS {
        let (len, _) = receiver
            .recv_from(&mut buffer)
            .with_context(|| format!("datagram {received} of {DATAGRAMS} never arrived"))?;
        ensure!(len == PAYLOAD, "datagram {received} is {len} bytes");
    }

    let after = counter.count()?;
    let packets = after.packets - before.packets;
    let bytes = after.bytes - before.bytes;
    eprintln!("counted {packets} packets, {bytes} bytes");
    // At least the datagrams; also ARP and IPv6 chatter, which is small.
    ensure!(
        packets >= DATAGRAMS,
        "counted {packets} packets, sent {DATAGRAMS}"
    );
    let datagram_bytes = DATAGRAMS * (HEADERS + PAYLOAD as u64);
    ensure!(
        bytes >= datagram_bytes,
        "counted {bytes} bytes, sent {datagram_bytes} in datagrams alone"
    );
    ensure!(
        bytes <= packets * 1514,
        "counted {bytes} bytes in {packets} packets: more than an MTU each"
    );
    Ok(())
}

/// Runs `work` on a thread that has entered network namespace `netns`.
///
/// `setns` only moves the calling thread, and the thread ends with `work`, so
/// the test's own threads stay in their namespace.
fn in_netns<T: Send>(netns: &str, work: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let handle = File::open(format!("/run/netns/{netns}"))
        .with_context(|| format!("opening network namespace {netns}"))?;
    thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: `handle` is an open namespace file for the whole call,
                // and CLONE_NEWNET only changes this thread's network namespace.
                let entered = unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) };
                if entered != 0 {
                    bail!(
                        "entering network namespace {netns}: {}",
                        std::io::Error::last_os_error()
                    );
                }
                work()
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the thread inside {netns} panicked"))?
    })
}

/// Two network namespaces joined by a veth pair, deleted again on drop.
struct TwoHosts {
    sender_ns: String,
    receiver_ns: String,
    receiver_if: String,
}

impl TwoHosts {
    /// Creates `pz-ebpf-{tx,rx}-<pid>` with `SENDER_ADDR` and `RECEIVER_ADDR`
    /// on the two ends of one veth pair.
    fn create() -> Result<Self> {
        let pid = std::process::id();
        let hosts = Self {
            sender_ns: format!("pz-ebpf-tx-{pid}"),
            receiver_ns: format!("pz-ebpf-rx-{pid}"),
            // Interface names hold at most 15 bytes.
            receiver_if: format!("pzrx{pid}"),
        };
        let sender_if = format!("pztx{pid}");
        // A leftover from an earlier run with the same pid would make `add` fail.
        hosts.delete();
        // From here on, `hosts` deletes whatever exists when it drops.
        let (tx, rx) = (&hosts.sender_ns, &hosts.receiver_ns);
        let sender_cidr = format!("{SENDER_ADDR}/30");
        let receiver_cidr = format!("{RECEIVER_ADDR}/30");
        for args in [
            vec!["netns", "add", tx],
            vec!["netns", "add", rx],
            vec![
                "link",
                "add",
                &sender_if,
                "netns",
                tx,
                "type",
                "veth",
                "peer",
                "name",
                &hosts.receiver_if,
                "netns",
                rx,
            ],
            vec!["-n", tx, "addr", "add", &sender_cidr, "dev", &sender_if],
            vec![
                "-n",
                rx,
                "addr",
                "add",
                &receiver_cidr,
                "dev",
                &hosts.receiver_if,
            ],
            vec!["-n", tx, "link", "set", &sender_if, "up"],
            vec!["-n", rx, "link", "set", &hosts.receiver_if, "up"],
        ] {
            ip(&args)?;
        }
        Ok(hosts)
    }

    /// Deletes both namespaces, and with them the veth pair; missing ones are fine.
    fn delete(&self) {
        for netns in [&self.sender_ns, &self.receiver_ns] {
            // Errors mean "already gone" here; a real leak shows in `ip netns`.
            let _status = Command::new("ip").args(["netns", "del", netns]).output();
        }
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        self.delete();
    }
}

/// Runs `ip <args>`, failing with its stderr.
fn ip(args: &[&str]) -> Result<()> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (iproute2)")?;
    if !output.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}
