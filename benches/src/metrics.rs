//! Per-request records and their summary: exact percentiles (sorted samples, linear
//! interpolation between closest ranks, as numpy and vLLM's `benchmark_serving` compute them),
//! throughput and errors by kind.
//!
//! Definitions follow vLLM's serving benchmark: TTFT is request start to first token chunk,
//! TPOT is `(e2e - ttft) / (output_tokens - 1)` for one request, ITL is every gap between
//! consecutive token chunks, e2e is request start to end of stream.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::RequestError;

/// A failed request, kept for the JSON and CSV files and counted by kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailedRequest {
    /// Position in the run.
    pub index: usize,
    /// [`RequestError::kind`].
    pub kind: String,
    /// The error message.
    pub message: String,
}

/// Timings the server reported in the final gRPC message (`FinalInfo.timings`), in seconds.
/// Kept next to the client's own figures so network and router overhead can be seen.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerTimings {
    /// Arrival at the engine to first scheduled.
    pub queue_s: f64,
    /// First scheduled to prompt fully processed.
    pub prefill_s: f64,
    /// Engine arrival to first token.
    pub ttft_s: f64,
    /// Mean time per output token after the first, at the engine.
    pub mean_tpot_s: f64,
    /// Engine arrival to last token.
    pub e2e_s: f64,
    /// The worker that served the request.
    pub worker_id: String,
    /// TTFT as the router saw it.
    pub router_ttft_s: f64,
    /// End-to-end as the router saw it.
    pub router_e2e_s: f64,
    /// Retries the router made before a worker answered.
    pub retries: u32,
}

/// One successful request as the client measured it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Position in the run (0-based), to line records up with prompts and schedules.
    pub index: usize,
    /// When the request was sent, in seconds since the run started.
    pub start_s: f64,
    /// Prompt length the benchmark asked for (synthetic prompts), if known.
    pub prompt_tokens_requested: Option<usize>,
    /// Prompt length the server reported (usage), if it reports one.
    pub prompt_tokens: Option<u32>,
    /// Output tokens: server usage when reported, else the tokens counted in the stream.
    pub output_tokens: u32,
    /// Prompt tokens the server served from its prefix cache, when it reports them.
    pub cached_tokens: Option<u32>,
    /// Request start to first token, seconds.
    pub ttft_s: f64,
    /// Request start to end of stream, seconds.
    pub e2e_s: f64,
    /// Gaps between consecutive token-carrying chunks, seconds.
    pub itl_s: Vec<f64>,
    /// Finish reason as the server named it.
    pub finish_reason: Option<String>,
    /// Server-side timings, when the protocol carries them (gRPC).
    pub server: Option<ServerTimings>,
}

impl RequestRecord {
    /// Mean time per output token after the first; `None` with fewer than two tokens.
    pub fn tpot_s(&self) -> Option<f64> {
        (self.output_tokens > 1)
            .then(|| (self.e2e_s - self.ttft_s) / f64::from(self.output_tokens - 1))
    }

    /// Prompt tokens for throughput: the server's count, else the requested length.
    pub fn prompt_tokens_for_throughput(&self) -> u64 {
        self.prompt_tokens
            .map(u64::from)
            .or(self.prompt_tokens_requested.map(|n| n as u64))
            .unwrap_or(0)
    }
}

/// Timestamps a stream's token chunks as they arrive; both clients feed one.
#[derive(Debug)]
pub struct StreamClock {
    start: Instant,
    chunks: Vec<f64>,
    tokens: u32,
}

impl StreamClock {
    /// Starts the clock; call just before the request is sent.
    pub fn start() -> Self {
        Self {
            start: Instant::now(),
            chunks: Vec::new(),
            tokens: 0,
        }
    }

    /// Records a chunk carrying `tokens` new tokens (chunks without tokens are not timed).
    pub fn on_tokens(&mut self, tokens: u32) {
        if tokens > 0 {
            self.chunks.push(self.start.elapsed().as_secs_f64());
            self.tokens += tokens;
        }
    }

    /// Tokens counted so far in the stream.
    pub fn tokens(&self) -> u32 {
        self.tokens
    }

    /// Ends the clock at the end of the stream and builds the record's timing fields.
    pub fn finish(self) -> Result<RequestRecord, RequestError> {
        let e2e_s = self.start.elapsed().as_secs_f64();
        let Some(&ttft_s) = self.chunks.first() else {
            return Err(RequestError::NoTokens);
        };
        let itl_s = self.chunks.windows(2).map(|w| w[1] - w[0]).collect();
        Ok(RequestRecord {
            output_tokens: self.tokens,
            ttft_s,
            e2e_s,
            itl_s,
            ..RequestRecord::default()
        })
    }
}

/// Distribution of one metric.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Number of samples.
    pub count: usize,
    /// Arithmetic mean.
    pub mean: f64,
    /// Sample standard deviation (n - 1); 0 with fewer than two samples.
    pub std: f64,
    /// Smallest sample.
    pub min: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest sample.
    pub max: f64,
}

impl Percentiles {
    /// Summarises samples (any order); `None` when there are none or any is not finite.
    pub fn from_samples(samples: &[f64]) -> Option<Self> {
        if samples.is_empty() || samples.iter().any(|s| !s.is_finite()) {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len() as f64;
        let mean = sorted.iter().sum::<f64>() / n;
        let var = if sorted.len() > 1 {
            sorted.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (n - 1.0)
        } else {
            0.0
        };
        Some(Self {
            count: sorted.len(),
            mean,
            std: var.sqrt(),
            min: sorted[0],
            p50: quantile_sorted(&sorted, 0.50),
            p90: quantile_sorted(&sorted, 0.90),
            p99: quantile_sorted(&sorted, 0.99),
            max: sorted[sorted.len() - 1],
        })
    }
}

/// Quantile `q` in [0, 1] of ascending samples, interpolating linearly between the closest
/// ranks (numpy's default). Empty input gives NaN.
pub fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

/// The figures of one load level, all latencies in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Successful requests.
    pub requests_ok: usize,
    /// Failed requests.
    pub requests_failed: usize,
    /// Failed requests per [`RequestError::kind`].
    pub errors_by_kind: BTreeMap<String, usize>,
    /// Wall time of the whole level, seconds.
    pub wall_s: f64,
    /// Prompt tokens of successful requests (server count, else requested length).
    pub prompt_tokens: u64,
    /// Output tokens of successful requests.
    pub output_tokens: u64,
    /// Output tokens per wall second.
    pub output_tok_s: f64,
    /// Prompt plus output tokens per wall second.
    pub total_tok_s: f64,
    /// Successful requests per wall second.
    pub request_rate: f64,
    /// Time to first token.
    pub ttft_ms: Option<Percentiles>,
    /// Time per output token, one sample per request.
    pub tpot_ms: Option<Percentiles>,
    /// Every inter-token gap of every request.
    pub itl_ms: Option<Percentiles>,
    /// End-to-end latency.
    pub e2e_ms: Option<Percentiles>,
    /// Per-request decode speed, 1 / TPOT (tokens per second).
    pub decode_tps: Option<Percentiles>,
    /// Per-request prefill speed, prompt tokens / TTFT (tokens per second).
    pub prefill_tps: Option<Percentiles>,
    /// Server-reported TTFT (engine), when the server reports timings.
    pub server_ttft_ms: Option<Percentiles>,
    /// Server-reported queue time, when reported.
    pub server_queue_ms: Option<Percentiles>,
    /// Server-reported mean TPOT, when reported.
    pub server_tpot_ms: Option<Percentiles>,
    /// Server-reported end-to-end time, when reported.
    pub server_e2e_ms: Option<Percentiles>,
    /// Prompt tokens served from the prefix cache, summed, when reported.
    pub cached_tokens: Option<u64>,
}

impl Summary {
    /// Summarises one level: its successful records, its failures and its wall time.
    pub fn from_outcomes(records: &[RequestRecord], errors: &[FailedRequest], wall_s: f64) -> Self {
        let ms = |f: &dyn Fn(&RequestRecord) -> Option<f64>| {
            let v: Vec<f64> = records.iter().filter_map(f).map(|s| s * 1e3).collect();
            Percentiles::from_samples(&v)
        };
        let server =
            |f: &dyn Fn(&ServerTimings) -> f64| ms(&|r: &RequestRecord| r.server.as_ref().map(f));
        let itl: Vec<f64> = records
            .iter()
            .flat_map(|r| r.itl_s.iter().map(|s| s * 1e3))
            .collect();
        let prompt_tokens: u64 = records
            .iter()
            .map(|r| r.prompt_tokens_for_throughput())
            .sum();
        let output_tokens: u64 = records.iter().map(|r| u64::from(r.output_tokens)).sum();
        let per_s = |x: f64| if wall_s > 0.0 { x / wall_s } else { 0.0 };
        let mut errors_by_kind = BTreeMap::new();
        for e in errors {
            *errors_by_kind.entry(e.kind.clone()).or_insert(0) += 1;
        }
        let rate = |f: &dyn Fn(&RequestRecord) -> Option<f64>| {
            let v: Vec<f64> = records.iter().filter_map(f).collect();
            Percentiles::from_samples(&v)
        };
        let cached: Vec<u64> = records
            .iter()
            .filter_map(|r| r.cached_tokens)
            .map(u64::from)
            .collect();
        Self {
            requests_ok: records.len(),
            requests_failed: errors.len(),
            errors_by_kind,
            wall_s,
            prompt_tokens,
            output_tokens,
            output_tok_s: per_s(output_tokens as f64),
            total_tok_s: per_s((prompt_tokens + output_tokens) as f64),
            request_rate: per_s(records.len() as f64),
            ttft_ms: ms(&|r| Some(r.ttft_s)),
            tpot_ms: ms(&|r| r.tpot_s()),
            itl_ms: Percentiles::from_samples(&itl),
            e2e_ms: ms(&|r| Some(r.e2e_s)),
            decode_tps: rate(&|r| r.tpot_s().filter(|t| *t > 0.0).map(|t| 1.0 / t)),
            prefill_tps: rate(&|r| {
                let p = r.prompt_tokens_for_throughput();
                (p > 0 && r.ttft_s > 0.0).then(|| p as f64 / r.ttft_s)
            }),
            server_ttft_ms: server(&|s| s.ttft_s),
            server_queue_ms: server(&|s| s.queue_s),
            server_tpot_ms: server(&|s| s.mean_tpot_s),
            server_e2e_ms: server(&|s| s.e2e_s),
            cached_tokens: (!cached.is_empty()).then(|| cached.iter().sum()),
        }
    }
}

/// Decode speed at each step: for step `k` (the gap before token `k + 1`), the mean gap over
/// every request that reached it, as tokens per second. This is the "per-step TPS" curve:
/// flat means decode does not slow down as the context grows.
pub fn per_step_tps(records: &[RequestRecord]) -> Vec<(usize, f64)> {
    let steps = records.iter().map(|r| r.itl_s.len()).max().unwrap_or(0);
    (0..steps)
        .filter_map(|k| {
            let gaps: Vec<f64> = records
                .iter()
                .filter_map(|r| r.itl_s.get(k).copied())
                .collect();
            let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
            (mean > 0.0).then(|| (k + 1, 1.0 / mean))
        })
        .collect()
}
