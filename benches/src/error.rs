//! Errors of the load generator: [`BenchError`] stops a benchmark (bad arguments, unreachable
//! target, unwritable output), [`RequestError`] fails one request and is counted by kind.

use std::path::PathBuf;
use std::time::Duration;

/// A failure that stops the benchmark before or after the load, reported to the user as is.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The `--target` string is not `grpc://HOST:PORT` or `http://HOST:PORT`.
    #[error("bad target `{target}`: {reason}")]
    BadTarget {
        /// What the user passed.
        target: String,
        /// Why it was rejected.
        reason: String,
    },
    /// The target did not answer the probe sent before any load.
    #[error("cannot reach {target}: {detail}")]
    Unreachable {
        /// The target as the user wrote it.
        target: String,
        /// The underlying connection or protocol error.
        detail: String,
    },
    /// A prompt file could not be read or holds no usable prompt.
    #[error("bad prompt file {}: {detail}", path.display())]
    PromptFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// An argument combination that cannot describe a benchmark (zero rate, zero requests...).
    #[error("bad argument: {0}")]
    BadArgument(String),
    /// A result file or chart could not be written.
    #[error("cannot write {}: {detail}", path.display())]
    Output {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        detail: String,
    },
}

/// Why one request failed. Failed requests are counted per [`RequestError::kind`] and left out
/// of the latency figures, so a fast error never makes a server look fast.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RequestError {
    /// gRPC status from the server (or from the transport, e.g. `Unavailable`).
    #[error("gRPC status {code}: {message}")]
    Grpc {
        /// The status code name, e.g. `ResourceExhausted`.
        code: String,
        /// The status message.
        message: String,
    },
    /// HTTP status other than 2xx from an OpenAI-compatible server.
    #[error("HTTP status {status}: {body}")]
    Http {
        /// The status code.
        status: u16,
        /// The start of the response body.
        body: String,
    },
    /// The connection could not be made or broke mid-stream.
    #[error("transport: {0}")]
    Transport(String),
    /// The server sent something that is not the protocol (bad JSON, an error event).
    #[error("protocol: {0}")]
    Protocol(String),
    /// The request took longer than `--request-timeout`.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The stream ended without a single token.
    #[error("the stream ended without any token")]
    NoTokens,
}

impl RequestError {
    /// Short label used to count errors by kind in tables and JSON (`grpc:Unavailable`,
    /// `http:503`, `timeout`...).
    pub fn kind(&self) -> String {
        match self {
            Self::Grpc { code, .. } => format!("grpc:{code}"),
            Self::Http { status, .. } => format!("http:{status}"),
            Self::Transport(_) => "transport".to_owned(),
            Self::Protocol(_) => "protocol".to_owned(),
            Self::Timeout(_) => "timeout".to_owned(),
            Self::NoTokens => "no_tokens".to_owned(),
        }
    }
}
