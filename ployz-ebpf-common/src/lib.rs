//! Types shared by the eBPF programs in `ployz-ebpf` and the userspace loader in
//! `ployzd`. `no_std`, plain `#[repr(C)]` data only: both sides must agree on the
//! byte layout of every map key and value.
#![no_std]
