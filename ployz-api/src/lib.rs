//! The Ployz gRPC API: protobuf messages and tonic stubs generated from
//! `proto/ployz/v1/ployz.proto`, plus the error-code convention both ends share.
//! It depends on nothing of the daemon or the CLI.

/// Version 1 of the API.
pub mod v1 {
    #![expect(clippy::all, reason = "generated code")]
    tonic::include_proto!("ployz.v1");
}

/// gRPC metadata key carrying the stable, specific error code of a failed call.
pub const ERROR_CODE_METADATA: &str = "ployz-error-code";
