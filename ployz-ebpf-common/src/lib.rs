//! Types shared by the eBPF programs in `ployz-ebpf` and the userspace loader in
//! `ployzd`. `no_std`, plain `#[repr(C)]` data only: both sides must agree on the
//! byte layout of every map key and value. Depends on nothing but `aya` (for
//! `aya::Pod`, behind the `user` feature).
#![no_std]

/// Name of the TC classifier that counts packets: the function name in `ployz-ebpf`.
///
/// Kernel object names hold at most 15 bytes, so keep every name here that short.
pub const PACKET_COUNTER_PROGRAM: &str = "ployz_counter";

/// Name of the per-CPU array the packet counter writes into: the static's name in
/// `ployz-ebpf`.
pub const PACKET_COUNTS_MAP: &str = "PLOYZ_COUNTS";

/// Index of the one slot of [`PACKET_COUNTS_MAP`] that holds the totals.
pub const PACKET_COUNTS_INDEX: u32 = 0;

/// Number of slots in [`PACKET_COUNTS_MAP`].
pub const PACKET_COUNTS_ENTRIES: u32 = 1;

/// Packets and bytes seen by the counter on one CPU (or summed over all CPUs).
///
/// The value type of [`PACKET_COUNTS_MAP`]; its key is the `u32` array index
/// [`PACKET_COUNTS_INDEX`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketCount {
    /// Packets seen.
    pub packets: u64,
    /// Bytes seen, counting each packet's full length as the classifier sees it
    /// (from the Ethernet header on).
    pub bytes: u64,
}

impl PacketCount {
    /// Adds another count to this one, wrapping like the kernel-side counters do.
    #[must_use]
    pub const fn add(self, other: Self) -> Self {
        Self {
            packets: self.packets.wrapping_add(other.packets),
            bytes: self.bytes.wrapping_add(other.bytes),
        }
    }
}

// SAFETY: `PacketCount` is `#[repr(C)]` and made of two `u64`s, so it has no padding
// and every bit pattern is a valid value, which is what `aya::Pod` requires.
#[cfg(feature = "user")]
unsafe impl aya::Pod for PacketCount {}
