//! Request-level types shared by every component: sampling parameters, finish reasons, usage
//! and per-request timings, with their conversions to and from `orchard.v1` messages.

use std::time::Duration;

use orchard_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::error::OrchardError;

/// Default `max_tokens` when a request leaves it unset.
pub const DEFAULT_MAX_TOKENS: u32 = 256;
/// Upper bound on `logprobs` (top-n alternatives per token).
pub const MAX_LOGPROBS: u32 = 20;

/// Per-request sampling parameters (vLLM semantics).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = disabled.
    pub top_k: u32,
    /// 1.0 = disabled.
    pub top_p: f32,
    /// 0 = disabled.
    pub min_p: f32,
    /// 1.0 = disabled; > 1 discourages tokens already in prompt or output.
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token already generated.
    pub presence_penalty: f32,
    /// Subtracted per occurrence from the logit of every token already generated.
    pub frequency_penalty: f32,
    /// Fixes the random stream of this request for reproducible sampling.
    pub seed: Option<u64>,
    pub max_tokens: u32,
    /// EOS and stop conditions are ignored until this many tokens are produced.
    pub min_tokens: u32,
    /// Keep generating past EOS (benchmarks with fixed output lengths).
    pub ignore_eos: bool,
    /// Stop strings; the matched string is not part of the output.
    pub stop: Vec<String>,
    /// Stop token ids; the matched token is not part of the output text.
    pub stop_token_ids: Vec<u32>,
    /// Number of top alternatives returned with each token; `None` = no logprobs.
    pub logprobs: Option<u32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            max_tokens: DEFAULT_MAX_TOKENS,
            min_tokens: 0,
            ignore_eos: false,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            logprobs: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding of up to `max_tokens` tokens.
    pub fn greedy(max_tokens: u32) -> Self {
        Self {
            temperature: 0.0,
            max_tokens,
            ..Self::default()
        }
    }

    /// Checks every field; the error names the offending parameter.
    pub fn validate(&self) -> Result<(), OrchardError> {
        let bad = |name: &str, why: String| Err(OrchardError::invalid(format!("{name}: {why}")));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(
                "temperature",
                format!("must be >= 0, got {}", self.temperature),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", format!("must be in [0, 1], got {}", self.min_p));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return bad(
                "repetition_penalty",
                format!("must be > 0, got {}", self.repetition_penalty),
            );
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !v.is_finite() || !(-2.0..=2.0).contains(&v) {
                return bad(name, format!("must be in [-2, 2], got {v}"));
            }
        }
        if self.max_tokens == 0 {
            return bad("max_tokens", "must be >= 1".into());
        }
        if self.min_tokens > self.max_tokens {
            return bad(
                "min_tokens",
                format!("{} exceeds max_tokens {}", self.min_tokens, self.max_tokens),
            );
        }
        if let Some(n) = self.logprobs {
            if n > MAX_LOGPROBS {
                return bad("logprobs", format!("must be <= {MAX_LOGPROBS}, got {n}"));
            }
        }
        if self.stop.iter().any(String::is_empty) {
            return bad("stop", "stop strings must not be empty".into());
        }
        Ok(())
    }
}

impl From<&pb::SamplingParams> for SamplingParams {
    fn from(p: &pb::SamplingParams) -> Self {
        let d = SamplingParams::default();
        Self {
            temperature: p.temperature.unwrap_or(d.temperature),
            top_k: p.top_k,
            top_p: p.top_p.unwrap_or(d.top_p),
            min_p: p.min_p,
            repetition_penalty: p.repetition_penalty.unwrap_or(d.repetition_penalty),
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            seed: p.seed,
            max_tokens: p.max_tokens.unwrap_or(d.max_tokens),
            min_tokens: p.min_tokens,
            ignore_eos: p.ignore_eos,
            stop: p.stop.clone(),
            stop_token_ids: p.stop_token_ids.clone(),
            logprobs: p.logprobs,
        }
    }
}

impl From<&SamplingParams> for pb::SamplingParams {
    fn from(p: &SamplingParams) -> Self {
        Self {
            temperature: Some(p.temperature),
            top_k: p.top_k,
            top_p: Some(p.top_p),
            min_p: p.min_p,
            repetition_penalty: Some(p.repetition_penalty),
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            seed: p.seed,
            max_tokens: Some(p.max_tokens),
            min_tokens: p.min_tokens,
            ignore_eos: p.ignore_eos,
            stop: p.stop.clone(),
            stop_token_ids: p.stop_token_ids.clone(),
            logprobs: p.logprobs,
        }
    }
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// EOS, a stop string or a stop token id.
    Stop,
    /// `max_tokens` or the model's context length.
    Length,
    /// Cancelled by the client or an operator.
    Abort,
    /// The engine failed while serving the request.
    Error,
}

impl FinishReason {
    /// Label used in metrics and the OpenAI API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Abort => "abort",
            Self::Error => "error",
        }
    }
}

impl From<FinishReason> for pb::FinishReason {
    fn from(r: FinishReason) -> Self {
        match r {
            FinishReason::Stop => Self::Stop,
            FinishReason::Length => Self::Length,
            FinishReason::Abort => Self::Abort,
            FinishReason::Error => Self::Error,
        }
    }
}

impl TryFrom<pb::FinishReason> for FinishReason {
    type Error = OrchardError;
    fn try_from(r: pb::FinishReason) -> Result<Self, OrchardError> {
        match r {
            pb::FinishReason::Stop => Ok(Self::Stop),
            pb::FinishReason::Length => Ok(Self::Length),
            pb::FinishReason::Abort => Ok(Self::Abort),
            pb::FinishReason::Error => Ok(Self::Error),
            pb::FinishReason::Unspecified => {
                Err(OrchardError::internal("finish reason unspecified"))
            }
        }
    }
}

/// Token counts of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: u32,
}

impl From<Usage> for pb::Usage {
    fn from(u: Usage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            cached_tokens: u.cached_tokens,
        }
    }
}

impl From<pb::Usage> for Usage {
    fn from(u: pb::Usage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            cached_tokens: u.cached_tokens,
        }
    }
}

/// Latency breakdown of one request as measured by the engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestTimings {
    /// Arrival at the engine -> first scheduled.
    pub queue: Duration,
    /// First scheduled -> prompt fully processed.
    pub prefill: Duration,
    /// Arrival -> first output token.
    pub ttft: Duration,
    /// Mean time per output token after the first (zero with a single token).
    pub mean_tpot: Duration,
    /// Arrival -> last token.
    pub e2e: Duration,
}

impl RequestTimings {
    /// The wire form, tagged with the worker that measured it.
    pub fn to_proto(&self, worker_id: &str) -> pb::Timings {
        pb::Timings {
            queue_s: self.queue.as_secs_f64(),
            prefill_s: self.prefill.as_secs_f64(),
            ttft_s: self.ttft.as_secs_f64(),
            mean_tpot_s: self.mean_tpot.as_secs_f64(),
            e2e_s: self.e2e.as_secs_f64(),
            worker_id: worker_id.to_string(),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_parameter() {
        let p = SamplingParams {
            top_p: 1.5,
            ..SamplingParams::default()
        };
        let err = p.validate().unwrap_err().to_string();
        assert!(err.contains("top_p"), "{err}");
        let p = SamplingParams {
            max_tokens: 0,
            ..SamplingParams::default()
        };
        assert!(p.validate().unwrap_err().to_string().contains("max_tokens"));
        assert!(SamplingParams::default().validate().is_ok());
    }

    #[test]
    fn proto_round_trip_keeps_defaults() {
        let unset = pb::SamplingParams::default();
        let p = SamplingParams::from(&unset);
        assert_eq!(p, SamplingParams::default());
        let g = SamplingParams::greedy(7);
        assert_eq!(SamplingParams::from(&pb::SamplingParams::from(&g)), g);
    }
}
