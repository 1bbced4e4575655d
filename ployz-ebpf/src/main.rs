//! The Ployz eBPF programs, compiled for `bpfel-unknown-none` by ployzd's build
//! script and embedded in the daemon. For now one TC classifier that counts the
//! packets and bytes crossing an interface: it proves the toolchain end to end
//! before the mesh fast paths arrive. Depends only on `aya-ebpf` and the shared
//! layouts in `ployz-ebpf-common`; the names below must match that crate's
//! constants, which the loader looks up.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::TC_ACT_OK,
    macros::{classifier, map},
    maps::PerCpuArray,
    programs::TcContext,
};
use ployz_ebpf_common::{PACKET_COUNTS_ENTRIES, PACKET_COUNTS_INDEX, PacketCount};

/// Per-CPU totals, named [`ployz_ebpf_common::PACKET_COUNTS_MAP`]. Per-CPU because
/// `bpfel` `core` has no 64-bit atomic add: each CPU owns its slot and userspace
/// sums them.
#[map]
static PLOYZ_COUNTS: PerCpuArray<PacketCount> =
    PerCpuArray::with_max_entries(PACKET_COUNTS_ENTRIES, 0);

/// Counts every packet and passes it on unchanged. Named
/// [`ployz_ebpf_common::PACKET_COUNTER_PROGRAM`].
#[classifier]
pub fn ployz_counter(ctx: TcContext) -> i32 {
    if let Some(count) = PLOYZ_COUNTS.get_ptr_mut(PACKET_COUNTS_INDEX) {
        // SAFETY: the pointer comes from a successful lookup of this CPU's slot and
        // stays valid while the program runs; the kernel runs TC programs with
        // migration disabled, so no other CPU writes this slot.
        unsafe {
            (*count).packets = (*count).packets.wrapping_add(1);
            (*count).bytes = (*count).bytes.wrapping_add(u64::from(ctx.len()));
        }
    }
    TC_ACT_OK
}

/// Never reached in a verified program. An infinite loop rather than
/// `unreachable_unchecked`: if a panic path survived optimisation, the verifier
/// rejects the loop and loading fails loudly instead of misbehaving.
#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}
