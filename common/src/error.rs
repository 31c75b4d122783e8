//! Error kinds and their single mapping to gRPC status codes (and metric labels).
//!
//! The component closest to a failure classifies it once with an [`ErrorKind`]; everything
//! downstream only forwards it, so a failure has exactly one status code and one label.

use thiserror::Error;

/// How a failure is classified for clients and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The request is malformed (bad parameter, empty prompt, too long).
    InvalidArgument,
    /// Unknown model, worker or request id.
    NotFound,
    /// Every worker is full; retry later.
    ResourceExhausted,
    /// No healthy worker, or a worker failed mid-request.
    Unavailable,
    /// Deadline passed.
    DeadlineExceeded,
    /// The client went away or aborted.
    Cancelled,
    /// Missing or wrong API key.
    Unauthenticated,
    /// A bug or an unexpected engine failure.
    Internal,
}

impl ErrorKind {
    /// The gRPC status code for this kind.
    pub fn code(self) -> tonic::Code {
        match self {
            Self::InvalidArgument => tonic::Code::InvalidArgument,
            Self::NotFound => tonic::Code::NotFound,
            Self::ResourceExhausted => tonic::Code::ResourceExhausted,
            Self::Unavailable => tonic::Code::Unavailable,
            Self::DeadlineExceeded => tonic::Code::DeadlineExceeded,
            Self::Cancelled => tonic::Code::Cancelled,
            Self::Unauthenticated => tonic::Code::Unauthenticated,
            Self::Internal => tonic::Code::Internal,
        }
    }

    /// Label used in the `code` dimension of error metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::InvalidArgument => "invalid_argument",
            Self::NotFound => "not_found",
            Self::ResourceExhausted => "resource_exhausted",
            Self::Unavailable => "unavailable",
            Self::DeadlineExceeded => "deadline_exceeded",
            Self::Cancelled => "cancelled",
            Self::Unauthenticated => "unauthenticated",
            Self::Internal => "internal",
        }
    }

    /// The kind a received status code stands for (router side of a worker call).
    pub fn from_code(code: tonic::Code) -> Self {
        match code {
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => Self::InvalidArgument,
            tonic::Code::NotFound => Self::NotFound,
            tonic::Code::ResourceExhausted => Self::ResourceExhausted,
            tonic::Code::DeadlineExceeded => Self::DeadlineExceeded,
            tonic::Code::Cancelled => Self::Cancelled,
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => Self::Unauthenticated,
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Aborted => {
                Self::Unavailable
            }
            _ => Self::Internal,
        }
    }
}

/// A classified failure with a message meant for the client.
#[derive(Debug, Clone, Error)]
#[error("{message}")]
pub struct OrchardError {
    pub kind: ErrorKind,
    pub message: String,
}

impl OrchardError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }
    pub fn exhausted(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::ResourceExhausted, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
}

impl From<OrchardError> for tonic::Status {
    fn from(e: OrchardError) -> Self {
        tonic::Status::new(e.kind.code(), e.message)
    }
}

impl From<tonic::Status> for OrchardError {
    fn from(s: tonic::Status) -> Self {
        Self::new(ErrorKind::from_code(s.code()), s.message().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_status_codes() {
        for kind in [
            ErrorKind::InvalidArgument,
            ErrorKind::NotFound,
            ErrorKind::ResourceExhausted,
            ErrorKind::Unavailable,
            ErrorKind::DeadlineExceeded,
            ErrorKind::Cancelled,
            ErrorKind::Unauthenticated,
            ErrorKind::Internal,
        ] {
            let status: tonic::Status = OrchardError::new(kind, "x").into();
            assert_eq!(OrchardError::from(status).kind, kind);
        }
    }
}
