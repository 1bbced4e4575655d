//! ployzd: the Ployz daemon. Runs the primitives requested over gRPC and
//! supervises the data-plane sidecars. Each module is one domain of the
//! architecture (see ARCHITECTURE.md); only `daemon` names concrete backends.

pub mod store;
