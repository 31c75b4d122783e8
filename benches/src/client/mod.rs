//! One streamed generation request against a target, timed chunk by chunk.

mod grpc;
mod openai;

use std::time::Duration;

pub use grpc::GrpcClient;
pub use openai::OpenAiClient;

use crate::error::{BenchError, RequestError};
use crate::metrics::RequestRecord;
use crate::target::Target;

/// What to generate for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestSpec {
    /// Prompt text.
    pub prompt: String,
    /// Requested prompt length, recorded next to the server's count.
    pub approx_prompt_tokens: Option<usize>,
    /// Output token budget.
    pub max_tokens: u32,
    /// Sampling temperature; 0 = greedy, the benchmark default for repeatable work.
    pub temperature: f32,
    /// Keep generating past EOS so every request produces exactly `max_tokens`.
    pub ignore_eos: bool,
}

/// How to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Model name to request; `None` = the server's default (gRPC) or the first model the
    /// server lists (HTTP).
    pub model: Option<String>,
    /// Limit on connecting and on the reachability probe.
    pub connect_timeout: Duration,
}

/// A connected client for either protocol; cheap to clone (shares the connection).
#[derive(Debug, Clone)]
pub enum Client {
    /// Orchard gRPC.
    Grpc(GrpcClient),
    /// OpenAI-compatible HTTP.
    OpenAi(OpenAiClient),
}

impl Client {
    /// Connects and probes the target (gRPC `ListModels`, HTTP `GET /v1/models`), so an
    /// unreachable or wrong target fails before any load with a clear message.
    pub async fn connect(target: &Target, opts: &ConnectOptions) -> Result<Self, BenchError> {
        let unreachable = |detail: String| BenchError::Unreachable {
            target: target.to_string(),
            detail,
        };
        let probe = async {
            match target {
                Target::Grpc { endpoint } => {
                    GrpcClient::connect(endpoint, opts).await.map(Self::Grpc)
                }
                Target::OpenAi { base_url } => OpenAiClient::connect(base_url, opts)
                    .await
                    .map(Self::OpenAi),
            }
        };
        tokio::time::timeout(opts.connect_timeout, probe)
            .await
            .map_err(|_| unreachable(format!("no answer within {:?}", opts.connect_timeout)))?
            .map_err(unreachable)
    }

    /// Runs one request to the end of its stream and returns what the client measured.
    pub async fn generate(&self, spec: &RequestSpec) -> Result<RequestRecord, RequestError> {
        let mut record = match self {
            Self::Grpc(c) => c.generate(spec).await?,
            Self::OpenAi(c) => c.generate(spec).await?,
        };
        record.prompt_tokens_requested = spec.approx_prompt_tokens;
        Ok(record)
    }

    /// The model name requests carry (empty = the server's default).
    pub fn model(&self) -> &str {
        match self {
            Self::Grpc(c) => c.model(),
            Self::OpenAi(c) => c.model(),
        }
    }
}
