//! The mesh domain: the overlay that carries traffic between machines.
//! [`boringtun`] is the userspace WireGuard tunnel the `ployz-tunnel` process
//! runs; [`wg`] speaks the WireGuard UAPI to it (or to any implementation of
//! the protocol); [`overlay`] brings the device to what the membership facts
//! say (key, port, address, peers), changing only what differs;
//! [`addressing`] cuts the network's ULA prefix into per-machine subnets,
//! claimed by create-if-absent through the store contract (never a backend).
//! [`ebpf`] holds a TC packet counter that proves the eBPF toolchain end to
//! end. Must not depend on the runtime or daemon domains.

pub mod addressing;
pub mod boringtun;
pub mod ebpf;
pub mod overlay;
pub mod wg;
