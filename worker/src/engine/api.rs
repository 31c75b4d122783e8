//! What goes into the engine thread and what comes out of it, per request.

use std::time::Instant;

use orchard_common::{FinishReason, OrchardError, RequestTimings, SamplingParams, Usage};
use tokio::sync::mpsc;

/// A request handed to the engine thread.
#[derive(Debug)]
pub struct EngineRequest {
    pub id: String,
    pub prompt_token_ids: Vec<u32>,
    pub params: SamplingParams,
    /// When the request reached the worker; queue time and TTFT count from here.
    pub arrival: Instant,
    /// Where the engine sends this request's output. A closed receiver aborts the request.
    pub events: mpsc::UnboundedSender<EngineEvent>,
}

/// One top-n alternative for a generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct TopLogprob {
    pub token_id: u32,
    pub text: String,
    pub logprob: f32,
}

/// Logprobs of one generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    pub top: Vec<TopLogprob>,
}

/// Output of one engine step for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenChunk {
    pub token_ids: Vec<u32>,
    /// Text completed by these tokens (may be empty while a multi-byte character or a
    /// possible stop string is held back).
    pub text: String,
    pub logprobs: Vec<TokenLogprobs>,
}

/// The end of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    pub reason: FinishReason,
    /// The stop string or token text that ended the request, if any.
    pub stop_reason: Option<String>,
    pub usage: Usage,
    pub timings: RequestTimings,
}

/// What the engine sends on a request's stream.
#[derive(Debug, Clone)]
pub enum EngineEvent {
    Tokens(TokenChunk),
    /// Always the last event of a successful request.
    Finished(Finished),
    /// The request failed; no more events follow.
    Failed(OrchardError),
}

/// Engine gauges and counters, reported to routers and to Prometheus.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadSnapshot {
    pub running: u32,
    pub waiting: u32,
    pub kv_blocks_used: u32,
    pub kv_blocks_total: u32,
    pub max_num_seqs: u32,
    pub block_size: u32,
    pub prefix_cache_queries: u64,
    pub prefix_cache_hits: u64,
    pub preemptions: u64,
}
