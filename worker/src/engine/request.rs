//! Per-request streaming state kept by the engine loop: sampler, incremental detokenizer,
//! stop-string checker, the event sender and the timestamps behind the request's timings.
//!
//! Stop conditions follow vLLM's order: nothing stops a request before `min_tokens`; then EOS
//! (unless `ignore_eos`), stop token ids, stop strings, and finally `max_tokens` or the model
//! length.

use std::time::{Duration, Instant};

use orchard_common::{FinishReason, RequestTimings, SamplingParams};
use tokenizers::Tokenizer;
use tokio::sync::mpsc;

use super::api::{EngineEvent, EngineRequest, TokenChunk, TokenLogprobs, TopLogprob};
use super::core::token_text;
use crate::sampling::{Sampled, Sampler};
use crate::text::{DetokenizeError, IncrementalDetokenizer, SpecialTokens, StopChecker};

/// What the engine loop knows about the step when a token is sampled.
pub(crate) struct TokenContext<'a> {
    pub tokenizer: &'a Tokenizer,
    pub eos_token_ids: &'a [u32],
    /// Generated tokens including the new one.
    pub output_len: usize,
    /// The sequence reached the model's context length with the new token.
    pub at_max_model_len: bool,
    pub now: Instant,
}

/// The chunk to stream for one token, and the finish it causes, if any.
pub(crate) struct TokenOutcome {
    pub chunk: TokenChunk,
    pub finish: Option<(FinishReason, Option<String>)>,
}

/// Streaming state of one live request.
pub(crate) struct RequestState {
    /// The client's id, for aborts and logs.
    pub request_id: String,
    pub params: SamplingParams,
    pub events: mpsc::UnboundedSender<EngineEvent>,
    pub sampler: Sampler,
    detokenizer: IncrementalDetokenizer,
    stop: StopChecker,
    arrival: Instant,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    num_tokens: u32,
}

impl RequestState {
    pub(crate) fn new(req: &EngineRequest) -> Self {
        Self {
            request_id: req.id.clone(),
            params: req.params.clone(),
            events: req.events.clone(),
            sampler: Sampler::new(&req.params),
            detokenizer: IncrementalDetokenizer::new(&req.prompt_token_ids, SpecialTokens::Skip),
            stop: StopChecker::new(&req.params.stop),
            arrival: req.arrival,
            first_token: None,
            last_token: None,
            num_tokens: 0,
        }
    }

    /// Before `min_tokens` outputs, EOS and stop tokens must not be sampled (vLLM's min-tokens
    /// logits processor), so their logits are masked out.
    pub(crate) fn mask_before_min_tokens(&self, row: &mut [f32], output_len: usize, eos: &[u32]) {
        if output_len >= self.params.min_tokens as usize {
            return;
        }
        let eos = eos.iter().filter(|_| !self.params.ignore_eos);
        for &id in eos.chain(&self.params.stop_token_ids) {
            if let Some(l) = row.get_mut(id as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
    }

    /// Applies one sampled token: timing, stop conditions, detokenization and logprobs.
    pub(crate) fn on_token(
        &mut self,
        sampled: &Sampled,
        ctx: &TokenContext<'_>,
    ) -> Result<TokenOutcome, DetokenizeError> {
        self.first_token.get_or_insert(ctx.now);
        self.last_token = Some(ctx.now);
        self.num_tokens += 1;
        let token = sampled.token_id;
        let past_min = ctx.output_len >= self.params.min_tokens as usize;
        let mut text = String::new();
        let mut finish = None;
        if past_min && !self.params.ignore_eos && ctx.eos_token_ids.contains(&token) {
            finish = Some((FinishReason::Stop, None));
        } else if past_min && self.params.stop_token_ids.contains(&token) {
            finish = Some((FinishReason::Stop, Some(token_text(ctx.tokenizer, token))));
        } else {
            let piece = self.detokenizer.push(ctx.tokenizer, token)?;
            if past_min {
                let o = self.stop.push(&piece);
                text = o.text;
                if let Some(s) = o.stop {
                    // The stop string ends the text; nothing held back is released.
                    return Ok(self.outcome(sampled, ctx, text, (FinishReason::Stop, Some(s))));
                }
            } else {
                // Stop strings only count from `min_tokens` on.
                text = piece;
            }
        }
        let at_length = ctx.output_len >= self.params.max_tokens as usize || ctx.at_max_model_len;
        if finish.is_none() && at_length {
            finish = Some((FinishReason::Length, None));
        }
        let Some(reason) = finish else {
            return Ok(TokenOutcome {
                chunk: self.chunk(sampled, ctx, text),
                finish: None,
            });
        };
        let reason = self.flush_into(&mut text, ctx.tokenizer)?.unwrap_or(reason);
        Ok(self.outcome(sampled, ctx, text, reason))
    }

    fn outcome(
        &self,
        sampled: &Sampled,
        ctx: &TokenContext<'_>,
        text: String,
        reason: (FinishReason, Option<String>),
    ) -> TokenOutcome {
        TokenOutcome {
            chunk: self.chunk(sampled, ctx, text),
            finish: Some(reason),
        }
    }

    fn chunk(&self, sampled: &Sampled, ctx: &TokenContext<'_>, text: String) -> TokenChunk {
        TokenChunk {
            token_ids: vec![sampled.token_id],
            text,
            logprobs: self.logprobs(sampled, ctx.tokenizer),
        }
    }

    /// Releases held-back text at the end; a stop string completed by that text still wins.
    fn flush_into(
        &mut self,
        text: &mut String,
        tokenizer: &Tokenizer,
    ) -> Result<Option<(FinishReason, Option<String>)>, DetokenizeError> {
        let rest = self.detokenizer.flush(tokenizer)?;
        let o = self.stop.push(&rest);
        text.push_str(&o.text);
        text.push_str(&self.stop.flush());
        Ok(o.stop.map(|s| (FinishReason::Stop, Some(s))))
    }

    fn logprobs(&self, sampled: &Sampled, tokenizer: &Tokenizer) -> Vec<TokenLogprobs> {
        let Some(lp) = &sampled.logprobs else {
            return Vec::new();
        };
        let top = lp
            .top
            .iter()
            .map(|&(token_id, logprob)| TopLogprob {
                token_id,
                text: token_text(tokenizer, token_id),
                logprob,
            })
            .collect();
        vec![TokenLogprobs {
            logprob: lp.logprob,
            top,
        }]
    }

    /// The request's timings as measured by the engine, ending at `now`.
    pub(crate) fn timings(&self, first_scheduled: Option<Instant>, now: Instant) -> RequestTimings {
        let since = |from: Instant, to: Option<Instant>| {
            to.map(|t| t.saturating_duration_since(from))
                .unwrap_or_default()
        };
        let scheduled = first_scheduled.unwrap_or(now);
        let mean_tpot = match (self.first_token, self.last_token, self.num_tokens) {
            (Some(first), Some(last), n) if n > 1 => {
                last.saturating_duration_since(first) / (n - 1)
            }
            _ => Duration::ZERO,
        };
        RequestTimings {
            queue: since(self.arrival, first_scheduled),
            prefill: since(scheduled, self.first_token),
            ttft: since(self.arrival, self.first_token),
            mean_tpot,
            e2e: now.saturating_duration_since(self.arrival),
        }
    }
}
