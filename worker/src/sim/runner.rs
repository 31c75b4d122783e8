//! `SimRunner`: a [`ModelRunner`] without a model. It spends the time a configured timing model
//! assigns to the step and returns deterministic logits, so the real scheduler, KV block
//! manager, sampler and detokenizer run exactly as they do around a real model.
//!
//! Timing model (all costs configured in `[sim]`, defaults 2 ms + 0.05 ms/token + 0.5 ms/seq):
//! `step_overhead + per_prefill_token * prompt_tokens + per_decode_seq * decoding_seqs`, where
//! `prompt_tokens` counts the prompt tokens computed in the step and `decoding_seqs` the
//! sequences decoding one token in it.
//! The runner sleeps until that much time has passed since the step began, so the figures a
//! simulated worker reports are the timing model's, never measurements of a model.
//!
//! Logits: for each sequence the argmax is a pure function of its last token and position
//! (a splitmix64 hash picking one of the output alphabet's tokens), so greedy outputs are
//! reproducible across runs, batch compositions and workers. Two runners-up get lower logits,
//! so sampling with a temperature still varies. EOS is predicted only at or after
//! `eos_at_position`, when that is configured.

use std::time::{Duration, Instant};

use orchard_common::config::SimConfig;

use crate::engine::batch::{SeqSlice, StepBatch};
use crate::engine::{EngineError, ModelRunner};

/// Logit of the predicted token.
const TOP_LOGIT: f32 = 8.0;
/// Logits of the two runners-up (sampling with temperature picks them now and then).
const RUNNER_UP_LOGITS: [f32; 2] = [6.0, 5.0];
/// Logit of every other token.
const BASE_LOGIT: f32 = 0.0;

/// The per-step costs of the timing model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimingModel {
    pub step_overhead: Duration,
    pub per_prefill_token: Duration,
    pub per_decode_seq: Duration,
}

impl TimingModel {
    /// Takes the costs from the `[sim]` config section.
    pub fn from_config(cfg: &SimConfig) -> Self {
        Self {
            step_overhead: cfg.step_overhead,
            per_prefill_token: cfg.per_prefill_token,
            per_decode_seq: cfg.per_decode_seq,
        }
    }

    /// Simulated duration of one step: a sequence with one new token and earlier context is
    /// decoding; every other scheduled token is prompt work (prefill or a prefill chunk).
    pub fn step_time(&self, batch: &StepBatch) -> Duration {
        let (mut prefill_tokens, mut decode_seqs) = (0u32, 0u32);
        for seq in &batch.seqs {
            if is_decode(seq) {
                decode_seqs += 1;
            } else {
                prefill_tokens += seq.query_len;
            }
        }
        self.step_overhead
            + self.per_prefill_token * prefill_tokens
            + self.per_decode_seq * decode_seqs
    }
}

fn is_decode(seq: &SeqSlice) -> bool {
    seq.query_len == 1 && seq.context_len > 1
}

/// What the simulated model may predict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimVocab {
    /// Length of each logits row (the tokenizer's vocabulary size).
    pub vocab_size: usize,
    /// Tokens the model predicts (never EOS); must be non-empty and inside the vocabulary.
    pub output_ids: Vec<u32>,
    pub eos_token_id: u32,
    /// Predict EOS for positions at or after this one; `None` = never.
    pub eos_at_position: Option<u32>,
}

/// The simulated model: timing model plus deterministic logits.
#[derive(Debug, Clone)]
pub struct SimRunner {
    timing: TimingModel,
    vocab: SimVocab,
}

impl SimRunner {
    /// Checks that the vocabulary can hold every token it may predict.
    pub fn new(timing: TimingModel, vocab: SimVocab) -> Result<Self, EngineError> {
        let limit = vocab.vocab_size;
        let out_of_range = |id: u32| id as usize >= limit;
        if vocab.output_ids.len() < 3
            || vocab.output_ids.iter().copied().any(out_of_range)
            || out_of_range(vocab.eos_token_id)
        {
            return Err(EngineError::Config(format!(
                "simulated vocabulary: need >= 3 output ids and EOS inside a vocabulary of \
                 {limit}, got {} output ids and EOS {}",
                vocab.output_ids.len(),
                vocab.eos_token_id
            )));
        }
        Ok(Self { timing, vocab })
    }

    /// The token the simulated model predicts after `last_token` at `position` (the position
    /// of `last_token`): a pure function of both, so greedy decoding is reproducible.
    pub fn predict(&self, last_token: u32, position: u32) -> u32 {
        self.ranked(last_token, position)[0]
    }

    /// The predicted token and its two runners-up, all distinct.
    fn ranked(&self, last_token: u32, position: u32) -> [u32; 3] {
        let next_position = position.saturating_add(1);
        let ids = &self.vocab.output_ids;
        let n = ids.len() as u64;
        let h = splitmix64(u64::from(last_token) << 32 | u64::from(position));
        let first = (h % n) as usize;
        let second = (first + 1 + ((h >> 20) % (n - 1)) as usize) % ids.len();
        let mut third = (second + 1) % ids.len();
        if third == first {
            third = (third + 1) % ids.len();
        }
        let top = match self.vocab.eos_at_position {
            Some(at) if next_position >= at => self.vocab.eos_token_id,
            _ => ids[first],
        };
        [top, ids[second], ids[third]]
    }

    fn logits_row(&self, last_token: u32, position: u32) -> Vec<f32> {
        let mut row = vec![BASE_LOGIT; self.vocab.vocab_size];
        let [top, second, third] = self.ranked(last_token, position);
        row[second as usize] = RUNNER_UP_LOGITS[0];
        row[third as usize] = RUNNER_UP_LOGITS[1];
        row[top as usize] = TOP_LOGIT;
        row
    }
}

/// splitmix64 finaliser: a well-mixed, stable hash of one integer.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl ModelRunner for SimRunner {
    fn execute(&mut self, batch: &StepBatch) -> Result<Vec<Vec<f32>>, EngineError> {
        let started = Instant::now();
        let mut rows = Vec::with_capacity(batch.num_logit_rows());
        for seq in batch.seqs.iter().filter(|s| s.needs_logits) {
            let last = (seq.query_start + seq.query_len) as usize;
            let index = last.checked_sub(1);
            let token = index.and_then(|i| batch.token_ids.get(i));
            let position = index.and_then(|i| batch.positions.get(i));
            match (token, position) {
                (Some(&t), Some(&p)) => rows.push(self.logits_row(t, p)),
                _ => {
                    return Err(EngineError::Runner(format!(
                        "step batch: sequence slice ends at {last}, outside the batch"
                    )))
                }
            }
        }
        let step = self.timing.step_time(batch);
        if let Some(rest) = step.checked_sub(started.elapsed()) {
            std::thread::sleep(rest);
        }
        Ok(rows)
    }

    fn vocab_size(&self) -> usize {
        self.vocab.vocab_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runner(eos_at_position: Option<u32>) -> anyhow::Result<SimRunner> {
        let timing = TimingModel {
            step_overhead: Duration::from_millis(2),
            per_prefill_token: Duration::from_micros(50),
            per_decode_seq: Duration::from_micros(500),
        };
        let vocab = SimVocab {
            vocab_size: 64,
            output_ids: (10..20).collect(),
            eos_token_id: 2,
            eos_at_position,
        };
        Ok(SimRunner::new(timing, vocab)?)
    }

    /// One 8-token prompt (positions 0..8) and two decoding sequences at positions 20 and 5.
    fn mixed_batch() -> StepBatch {
        let mut token_ids: Vec<u32> = (30..38).collect();
        token_ids.extend([40, 41]);
        let mut positions: Vec<u32> = (0..8).collect();
        positions.extend([20, 5]);
        let seq = |query_start, query_len, context_len| SeqSlice {
            query_start,
            query_len,
            context_len,
            block_table: vec![0, 1],
            needs_logits: true,
        };
        StepBatch {
            slot_mapping: (0..10).collect(),
            token_ids,
            positions,
            seqs: vec![seq(0, 8, 8), seq(8, 1, 21), seq(9, 1, 6)],
        }
    }

    #[test]
    fn step_time_follows_the_timing_model() -> anyhow::Result<()> {
        let r = runner(None)?;
        let expected = Duration::from_millis(2)
            + Duration::from_micros(50) * 8
            + Duration::from_micros(500) * 2;
        assert_eq!(r.timing.step_time(&mixed_batch()), expected);
        Ok(())
    }

    #[test]
    fn execute_waits_and_argmax_depends_on_last_token_and_position() -> anyhow::Result<()> {
        let mut r = runner(None)?;
        let batch = mixed_batch();
        let started = Instant::now();
        let rows = r.execute(&batch)?;
        assert!(started.elapsed() >= r.timing.step_time(&batch));
        assert_eq!(rows.len(), 3);
        let argmax = |row: &Vec<f32>| {
            row.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i as u32)
        };
        assert_eq!(argmax(&rows[0]), Some(r.predict(37, 7)));
        assert_eq!(argmax(&rows[1]), Some(r.predict(40, 20)));
        assert_eq!(argmax(&rows[2]), Some(r.predict(41, 5)));
        // Same inputs, same answer, whatever else is in the batch.
        let again = r.execute(&batch)?;
        assert_eq!(rows, again);
        Ok(())
    }

    #[test]
    fn never_predicts_eos_unless_asked() -> anyhow::Result<()> {
        let r = runner(None)?;
        let mut seen = std::collections::HashSet::new();
        for token in 0..64 {
            for pos in 0..200 {
                let next = r.predict(token, pos);
                assert!((10..20).contains(&next), "{next} outside the output ids");
                seen.insert(next);
            }
        }
        assert_eq!(seen.len(), 10, "the hash spreads over every output id");
        let r = runner(Some(12))?;
        assert_ne!(r.predict(5, 10), 2);
        assert_eq!(r.predict(5, 11), 2, "the token at position 12 is EOS");
        assert_eq!(r.predict(5, 30), 2);
        Ok(())
    }

    #[test]
    fn rejects_a_vocabulary_that_cannot_hold_eos() {
        let vocab = SimVocab {
            vocab_size: 8,
            output_ids: vec![3, 4, 5],
            eos_token_id: 9,
            eos_at_position: None,
        };
        let timing = TimingModel {
            step_overhead: Duration::ZERO,
            per_prefill_token: Duration::ZERO,
            per_decode_seq: Duration::ZERO,
        };
        assert!(SimRunner::new(timing, vocab).is_err());
    }
}
