//! Per-request sampling: penalties, temperature, top-k/top-p/min-p, logprobs.
//!
//! Follows vLLM's sampler semantics and order so that results match what clients of an
//! OpenAI-compatible server expect: repetition penalty, frequency/presence penalties,
//! temperature (0 = greedy), top-k, top-p, min-p, then a draw from a per-request RNG.
//! Logprobs are the log-softmax of the *raw* logits, as vLLM reports them by default.

mod sampler;

pub use sampler::{Sampled, SampledLogprobs, Sampler, SamplingError};
