//! The mesh domain: owns the overlay data paths that carry traffic between
//! machines: [`boringtun`] is the userspace WireGuard tunnel that the
//! `ployz-tunnel` process runs. The eBPF fast paths that steer overlay packets in
//! the kernel arrive later; today [`ebpf`] holds a TC packet counter that proves the eBPF toolchain
//! end to end (build, embed, load, attach, read back). Must not depend on the
//! store, runtime or daemon domains.

pub mod boringtun;
pub mod ebpf;
