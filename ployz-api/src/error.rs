//! Typed failures on the wire. A failed call carries a class (which decides the
//! gRPC code and the CLI's exit status), a stable specific code, and a sentence.

use std::fmt;

/// gRPC metadata key carrying the stable, specific error code of a failed call.
pub const ERROR_CODE_METADATA: &str = "ployz-error-code";

/// The broad kind of a failure. Callers branch on it; each has its own exit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The request itself is malformed: bad arguments, bad names, bad files.
    Usage,
    /// The request is well-formed but the cluster is not in a state that allows it.
    PreconditionFailed,
    /// The named thing does not exist.
    NotFound,
    /// Someone else changed or holds what the request needs; retry after inspecting.
    Conflict,
    /// A participant (the daemon, NATS) cannot be reached right now; retry later.
    Unavailable,
    /// A bug or an unexpected failure of the machine.
    Internal,
}

impl ErrorClass {
    /// Every class, for documentation and tests.
    pub const ALL: [ErrorClass; 6] = [
        ErrorClass::Usage,
        ErrorClass::PreconditionFailed,
        ErrorClass::NotFound,
        ErrorClass::Conflict,
        ErrorClass::Unavailable,
        ErrorClass::Internal,
    ];

    /// The stable name used in JSON output and documentation.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Usage => "usage",
            ErrorClass::PreconditionFailed => "precondition_failed",
            ErrorClass::NotFound => "not_found",
            ErrorClass::Conflict => "conflict",
            ErrorClass::Unavailable => "unavailable",
            ErrorClass::Internal => "internal",
        }
    }

    /// The process exit status `ployzctl` uses for this class.
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorClass::Internal => 1,
            ErrorClass::Usage => 2,
            ErrorClass::PreconditionFailed => 3,
            ErrorClass::NotFound => 4,
            ErrorClass::Conflict => 5,
            ErrorClass::Unavailable => 6,
        }
    }

    fn grpc_code(self) -> tonic::Code {
        match self {
            ErrorClass::Usage => tonic::Code::InvalidArgument,
            ErrorClass::PreconditionFailed => tonic::Code::FailedPrecondition,
            ErrorClass::NotFound => tonic::Code::NotFound,
            ErrorClass::Conflict => tonic::Code::Aborted,
            ErrorClass::Unavailable => tonic::Code::Unavailable,
            ErrorClass::Internal => tonic::Code::Internal,
        }
    }

    fn from_grpc_code(code: tonic::Code) -> Self {
        match code {
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => ErrorClass::Usage,
            tonic::Code::FailedPrecondition => ErrorClass::PreconditionFailed,
            tonic::Code::NotFound => ErrorClass::NotFound,
            tonic::Code::Aborted | tonic::Code::AlreadyExists => ErrorClass::Conflict,
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => ErrorClass::Unavailable,
            tonic::Code::Ok
            | tonic::Code::Cancelled
            | tonic::Code::Unknown
            | tonic::Code::PermissionDenied
            | tonic::Code::ResourceExhausted
            | tonic::Code::Unimplemented
            | tonic::Code::Internal
            | tonic::Code::DataLoss
            | tonic::Code::Unauthenticated => ErrorClass::Internal,
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A typed failure as it crosses the API: class, stable code, human sentence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub class: ErrorClass,
    /// Stable, specific, snake_case, e.g. `network_mismatch`.
    pub code: String,
    pub message: String,
}

impl ApiError {
    pub fn new(class: ErrorClass, code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            class,
            code: code.into(),
            message: message.into(),
        }
    }

    /// Encodes this error as a gRPC status.
    pub fn into_status(self) -> tonic::Status {
        let mut status = tonic::Status::new(self.class.grpc_code(), self.message);
        if let Ok(code) = self.code.parse() {
            status.metadata_mut().insert(ERROR_CODE_METADATA, code);
        }
        status
    }

    /// Decodes a gRPC status returned by ployzd (or by the transport).
    pub fn from_status(status: &tonic::Status) -> Self {
        let class = ErrorClass::from_grpc_code(status.code());
        let code = status
            .metadata()
            .get(ERROR_CODE_METADATA)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
            .unwrap_or_else(|| format!("grpc_{}", format!("{:?}", status.code()).to_lowercase()));
        Self::new(class, code, status.message())
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.class, self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_survives_a_round_trip_through_grpc() {
        for class in ErrorClass::ALL {
            let sent = ApiError::new(class, "some_code", "a sentence");
            let received = ApiError::from_status(&sent.clone().into_status());
            assert_eq!(received, sent);
        }
    }

    #[test]
    fn exit_codes_are_distinct_and_nonzero() {
        let mut codes: Vec<i32> = ErrorClass::ALL.iter().map(|c| c.exit_code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), ErrorClass::ALL.len());
        assert!(!codes.contains(&0));
    }
}
