//! The eBPF packet counter: loads the TC classifier that ployzd's build script
//! compiled from `ployz-ebpf`, attaches it to an interface's ingress and reads
//! back the per-CPU packet and byte totals. It proves the eBPF toolchain end to
//! end; the mesh fast paths will load the same way. Builds without the eBPF
//! toolchain carry no object: [`availability`] says why and every load fails with
//! [`DataPathError::Unavailable`].

use std::fmt;

use aya::{
    Ebpf, EbpfError,
    maps::{MapData, MapError, PerCpuArray},
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType, TcError,
        tc::{NlOptions, TcAttachOptions, qdisc_add_clsact},
    },
    util::KernelVersion,
};
pub use ployz_ebpf_common::PacketCount;
use ployz_ebpf_common::{PACKET_COUNTER_PROGRAM, PACKET_COUNTS_INDEX, PACKET_COUNTS_MAP};

/// The first kernel with TCX links (`BPF_TCX_INGRESS`), which need no qdisc.
const TCX_SINCE: KernelVersion = KernelVersion::new(6, 6, 0);

/// The eBPF object built into this binary, or the build-time reason it is absent.
fn embedded_object() -> Result<&'static [u8], &'static str> {
    #[cfg(ployz_ebpf)]
    {
        Ok(aya::include_bytes_aligned!(concat!(
            env!("OUT_DIR"),
            "/ployz-datapath"
        )))
    }
    #[cfg(not(ployz_ebpf))]
    {
        Err(env!("PLOYZ_EBPF_UNAVAILABLE"))
    }
}

/// Whether this build carries the eBPF data path, for the daemon's `status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataPathAvailability {
    /// True when the eBPF object is built into this binary.
    pub available: bool,
    /// What was built in, or why nothing was (decided when ployzd was compiled).
    pub detail: String,
}

impl fmt::Display for DataPathAvailability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.available {
            write!(f, "eBPF data path available: {}", self.detail)
        } else {
            write!(f, "eBPF data path unavailable: {}", self.detail)
        }
    }
}

/// Tells whether this build carries the eBPF object, without loading anything.
///
/// Only the build is checked: loading can still fail at run time (no
/// `CAP_BPF`, an old kernel), which [`PacketCounter::load`] reports.
pub fn availability() -> DataPathAvailability {
    match embedded_object() {
        Ok(object) => DataPathAvailability {
            available: true,
            detail: format!("TC packet counter built in ({} bytes)", object.len()),
        },
        Err(reason) => DataPathAvailability {
            available: false,
            detail: reason.to_owned(),
        },
    }
}

/// How a classifier is hooked to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// A TCX link (Linux 6.6+): no qdisc, detached when the link closes.
    Tcx,
    /// A `cls_bpf` filter on the `clsact` qdisc, set up over netlink.
    Clsact,
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcx => "TCX",
            Self::Clsact => "clsact",
        })
    }
}

/// Errors from loading, attaching or reading the eBPF data path.
#[derive(Debug, thiserror::Error)]
pub enum DataPathError {
    /// This ployzd was built without the eBPF object.
    #[error("eBPF data path unavailable: {reason}")]
    Unavailable {
        /// The build-time reason, e.g. "bpf-linker is not on PATH".
        reason: &'static str,
    },
    /// The kernel refused the object (permissions, BTF, map creation).
    #[error("loading the eBPF object failed")]
    Load(#[source] Box<EbpfError>),
    /// The object lacks the program the loader expects: the eBPF crate and
    /// `ployz-ebpf-common`'s names disagree.
    #[error("the eBPF object has no program named `{name}`")]
    MissingProgram {
        /// The name looked up.
        name: &'static str,
    },
    /// The object lacks the map the loader expects.
    #[error("the eBPF object has no map named `{name}`")]
    MissingMap {
        /// The name looked up.
        name: &'static str,
    },
    /// The program was found but could not be verified or loaded.
    #[error("loading eBPF program `{program}` failed")]
    Program {
        /// The program's name.
        program: &'static str,
        /// What the kernel or aya said.
        #[source]
        source: Box<ProgramError>,
    },
    /// The `clsact` qdisc needed for the netlink fallback could not be added.
    #[error("adding the clsact qdisc to `{iface}` failed")]
    Clsact {
        /// The interface.
        iface: String,
        /// The netlink error.
        #[source]
        source: Box<TcError>,
    },
    /// Attaching to the interface failed.
    #[error("attaching eBPF program `{program}` to `{iface}` ingress ({mode}) failed")]
    Attach {
        /// The program's name.
        program: &'static str,
        /// The interface.
        iface: String,
        /// The hook that was tried last.
        mode: AttachMode,
        /// What the kernel or aya said.
        #[source]
        source: Box<ProgramError>,
    },
    /// Reading or wrapping a map failed.
    #[error("reading eBPF map `{map}` failed")]
    Map {
        /// The map's name.
        map: &'static str,
        /// What the kernel or aya said.
        #[source]
        source: Box<MapError>,
    },
}

/// The TC ingress packet counter: a loaded classifier plus its per-CPU counts.
///
/// Dropping it detaches the classifier from every interface and unloads it.
pub struct PacketCounter {
    /// Owns the program and its links; dropping it detaches them.
    ebpf: Ebpf,
    /// Taken out of `ebpf` so reads need no lookup by name.
    counts: PerCpuArray<MapData, PacketCount>,
}

impl fmt::Debug for PacketCounter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PacketCounter").finish_non_exhaustive()
    }
}

impl PacketCounter {
    /// Loads the embedded classifier into the kernel, not yet attached anywhere.
    ///
    /// Needs `CAP_BPF` and `CAP_NET_ADMIN` (root in practice).
    pub fn load() -> Result<Self, DataPathError> {
        let object = embedded_object().map_err(|reason| DataPathError::Unavailable { reason })?;
        let mut ebpf =
            Ebpf::load(object).map_err(|source| DataPathError::Load(Box::new(source)))?;

        let program = classifier(&mut ebpf)?;
        program.load().map_err(|source| DataPathError::Program {
            program: PACKET_COUNTER_PROGRAM,
            source: Box::new(source),
        })?;

        let map = ebpf
            .take_map(PACKET_COUNTS_MAP)
            .ok_or(DataPathError::MissingMap {
                name: PACKET_COUNTS_MAP,
            })?;
        let counts = PerCpuArray::try_from(map).map_err(|source| DataPathError::Map {
            map: PACKET_COUNTS_MAP,
            source: Box::new(source),
        })?;
        Ok(Self { ebpf, counts })
    }

    /// Attaches the counter to `iface`'s ingress in the caller's network
    /// namespace, returning the hook used.
    ///
    /// Uses a TCX link on Linux 6.6+ (no qdisc involved) and falls back to a
    /// `clsact` filter over netlink on older kernels or when the TCX link is
    /// refused. The attachment lives as long as this counter.
    pub fn attach(&mut self, iface: &str) -> Result<AttachMode, DataPathError> {
        let program = classifier(&mut self.ebpf)?;
        let tcx_supported = KernelVersion::current().is_ok_and(|current| current >= TCX_SINCE);
        if tcx_supported {
            match program.attach_with_options(
                iface,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            ) {
                Ok(_link) => return Ok(AttachMode::Tcx),
                // A failed link_create syscall means this kernel will not hand out
                // a TCX link here; anything else (an unknown interface) would fail
                // the fallback the same way.
                Err(ProgramError::SyscallError(error)) => tracing::warn!(
                    iface,
                    error = &error as &dyn std::error::Error,
                    "TCX attach refused, falling back to clsact"
                ),
                Err(source) => {
                    return Err(DataPathError::Attach {
                        program: PACKET_COUNTER_PROGRAM,
                        iface: iface.to_owned(),
                        mode: AttachMode::Tcx,
                        source: Box::new(source),
                    });
                }
            }
        }

        add_clsact(iface)?;
        program
            .attach_with_options(
                iface,
                TcAttachType::Ingress,
                TcAttachOptions::Netlink(NlOptions::default()),
            )
            .map_err(|source| DataPathError::Attach {
                program: PACKET_COUNTER_PROGRAM,
                iface: iface.to_owned(),
                mode: AttachMode::Clsact,
                source: Box::new(source),
            })?;
        Ok(AttachMode::Clsact)
    }

    /// The packets and bytes counted so far, summed over all CPUs and every
    /// interface this counter is attached to.
    pub fn count(&self) -> Result<PacketCount, DataPathError> {
        let per_cpu =
            self.counts
                .get(&PACKET_COUNTS_INDEX, 0)
                .map_err(|source| DataPathError::Map {
                    map: PACKET_COUNTS_MAP,
                    source: Box::new(source),
                })?;
        Ok(per_cpu
            .iter()
            .fold(PacketCount::default(), |total, cpu| total.add(*cpu)))
    }
}

/// The counter's program inside `ebpf`, as a TC classifier.
fn classifier(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, DataPathError> {
    ebpf.program_mut(PACKET_COUNTER_PROGRAM)
        .ok_or(DataPathError::MissingProgram {
            name: PACKET_COUNTER_PROGRAM,
        })?
        .try_into()
        .map_err(|source| DataPathError::Program {
            program: PACKET_COUNTER_PROGRAM,
            source: Box::new(source),
        })
}

/// Adds the `clsact` qdisc to `iface`; one already there is fine.
fn add_clsact(iface: &str) -> Result<(), DataPathError> {
    match qdisc_add_clsact(iface) {
        Ok(()) => Ok(()),
        Err(TcError::AlreadyAttached) => Ok(()),
        Err(TcError::NetlinkError(error)) if error.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        Err(source) => Err(DataPathError::Clsact {
            iface: iface.to_owned(),
            source: Box::new(source),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn availability_matches_the_build() {
        let availability = availability();
        assert_eq!(availability.available, cfg!(ployz_ebpf));
        assert!(!availability.detail.is_empty());
        let line = availability.to_string();
        assert!(!line.contains('\n'), "one line for `status`: {line:?}");
    }

    #[test]
    fn per_cpu_counts_add_up() {
        let one = PacketCount {
            packets: 1,
            bytes: 98,
        };
        let total = [one, one, PacketCount::default()]
            .into_iter()
            .fold(PacketCount::default(), PacketCount::add);
        assert_eq!(
            total,
            PacketCount {
                packets: 2,
                bytes: 196
            }
        );
    }
}
