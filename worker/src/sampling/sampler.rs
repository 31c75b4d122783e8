//! The per-request [`Sampler`]: turns one logits row into one token id.

use std::cmp::Ordering;

use orchard_common::SamplingParams;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Why a logits row could not be sampled; the engine fails only the affected request.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SamplingError {
    /// The model produced a row with no entries (a shape bug upstream).
    #[error("empty logits row")]
    EmptyLogits,
    /// Every logit is NaN or -inf, so no token has positive probability.
    #[error("no token has a finite logit")]
    NoCandidates,
}

/// Logprobs of one sampled token, without text: the caller owns the tokenizer and fills it in.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledLogprobs {
    /// Log-probability of the sampled token under the raw (unpenalized, untempered) logits.
    pub logprob: f32,
    /// The `n` most likely tokens as `(token_id, logprob)`, most likely first, ties by lower id.
    pub top: Vec<(u32, f32)>,
}

/// The result of one sampling step.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    /// The chosen token.
    pub token_id: u32,
    /// Present only when the request asked for logprobs, to keep the common path cheap.
    pub logprobs: Option<SampledLogprobs>,
}

/// Samples tokens for one request; owns its RNG so a seeded request is reproducible
/// regardless of what else shares the batch.
#[derive(Debug)]
pub struct Sampler {
    /// The request's parameters, copied so the sampler outlives the request message.
    params: SamplingParams,
    /// Seeded from `params.seed` when set, so identical requests give identical streams.
    rng: StdRng,
}

impl Sampler {
    /// Builds a sampler; seeds its RNG from `params.seed`, or from the OS when unset.
    pub fn new(params: &SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self {
            params: params.clone(),
            rng,
        }
    }

    /// Chooses the next token from `logits` (modified in place: penalties and temperature
    /// are applied to it). `prompt` and `output` are the request's token ids so far; ids
    /// outside the vocabulary are ignored.
    pub fn sample(
        &mut self,
        logits: &mut [f32],
        prompt: &[u32],
        output: &[u32],
    ) -> Result<Sampled, SamplingError> {
        if logits.is_empty() {
            return Err(SamplingError::EmptyLogits);
        }
        sanitize(logits);
        let raw = self
            .params
            .logprobs
            .map(|n| RawLogprobs::new(logits, n as usize));
        apply_repetition_penalty(logits, prompt, output, self.params.repetition_penalty);
        apply_output_penalties(logits, output, &self.params);
        let token_id = if self.params.temperature == 0.0 {
            argmax(logits).ok_or(SamplingError::NoCandidates)?
        } else {
            self.sample_random(logits)?
        };
        let logprobs = raw.map(|r| r.for_token(token_id));
        Ok(Sampled { token_id, logprobs })
    }

    /// Temperature, top-k, top-p and min-p, then one draw from the filtered distribution.
    fn sample_random(&mut self, logits: &mut [f32]) -> Result<u32, SamplingError> {
        let inv_t = 1.0 / self.params.temperature;
        logits.iter_mut().for_each(|l| *l *= inv_t);
        let mut cands = candidates(logits, self.params.top_k as usize);
        if cands.is_empty() {
            return Err(SamplingError::NoCandidates);
        }
        let mut probs = softmax_of(logits, &cands);
        if self.params.top_p < 1.0 {
            let keep = top_p_len(&probs, self.params.top_p);
            cands.truncate(keep);
            probs.truncate(keep);
        }
        if self.params.min_p > 0.0 {
            apply_min_p(&mut probs, self.params.min_p);
        }
        let total: f32 = probs.iter().sum();
        let mut target = self.rng.random::<f32>() * total;
        for (&id, &p) in cands.iter().zip(&probs) {
            if target < p {
                return Ok(id);
            }
            target -= p;
        }
        // Rounding can leave `target` just above the sum; fall back to the last kept token.
        last_positive(&cands, &probs).ok_or(SamplingError::NoCandidates)
    }
}

/// Raw-logit logprobs captured before penalties and temperature change the row.
struct RawLogprobs {
    /// Copy of the raw row, so the sampled token's logprob can be read after sampling.
    logits: Vec<f32>,
    /// Log-partition of the raw row.
    lse: f32,
    /// The top-n alternatives, already computed.
    top: Vec<(u32, f32)>,
}

impl RawLogprobs {
    fn new(logits: &[f32], n: usize) -> Self {
        let lse = log_sum_exp(logits);
        Self {
            logits: logits.to_vec(),
            lse,
            top: top_logprobs(logits, n, lse),
        }
    }

    fn for_token(self, token_id: u32) -> SampledLogprobs {
        SampledLogprobs {
            logprob: self.logits[token_id as usize] - self.lse,
            top: self.top,
        }
    }
}

/// Maps NaN to -inf so comparisons below are total and NaN never wins.
fn sanitize(logits: &mut [f32]) {
    logits
        .iter_mut()
        .filter(|l| l.is_nan())
        .for_each(|l| *l = f32::NEG_INFINITY);
}

/// Orders `(id, logit)` pairs by logit descending, then id ascending (deterministic ties).
fn by_logit_desc(logits: &[f32], a: u32, b: u32) -> Ordering {
    logits[b as usize]
        .total_cmp(&logits[a as usize])
        .then(a.cmp(&b))
}

/// Greedy choice in O(V); ties go to the lowest id. `None` when nothing is finite.
fn argmax(logits: &[f32]) -> Option<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &l) in logits.iter().enumerate() {
        if l > f32::NEG_INFINITY && best.is_none_or(|(_, b)| l > b) {
            best = Some((i, l));
        }
    }
    best.map(|(i, _)| i as u32)
}

/// `log(sum(exp(logits)))`, computed stably around the maximum.
fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return max;
    }
    let sum: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
    max + sum.ln()
}

/// The `k` highest-logit ids, sorted best first. Uses a partial selection (O(V)) when
/// `k` is smaller than the vocabulary, so top-k and logprobs avoid a full sort.
fn top_ids(logits: &[f32], k: usize) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    let cmp = |a: &u32, b: &u32| by_logit_desc(logits, *a, *b);
    if k > 0 && k < ids.len() {
        ids.select_nth_unstable_by(k - 1, cmp);
        ids.truncate(k);
    }
    ids.sort_unstable_by(cmp);
    ids
}

/// The `n` most likely tokens under the raw logits, with their logprobs.
fn top_logprobs(logits: &[f32], n: usize, lse: f32) -> Vec<(u32, f32)> {
    if n == 0 {
        return Vec::new();
    }
    top_ids(logits, n)
        .into_iter()
        .map(|id| (id, logits[id as usize] - lse))
        .collect()
}

/// vLLM's repetition penalty over prompt and output: positive logits are divided by the
/// penalty, negative ones multiplied, each seen token once.
fn apply_repetition_penalty(logits: &mut [f32], prompt: &[u32], output: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen: Vec<u32> = prompt.iter().chain(output).copied().collect();
    seen.sort_unstable();
    seen.dedup();
    for id in seen {
        if let Some(l) = logits.get_mut(id as usize) {
            *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
        }
    }
}

/// OpenAI frequency (per occurrence) and presence (once) penalties over output tokens.
fn apply_output_penalties(logits: &mut [f32], output: &[u32], params: &SamplingParams) {
    let (freq, pres) = (params.frequency_penalty, params.presence_penalty);
    if freq == 0.0 && pres == 0.0 {
        return;
    }
    let mut sorted = output.to_vec();
    sorted.sort_unstable();
    for run in sorted.chunk_by(|a, b| a == b) {
        if let Some(l) = logits.get_mut(run[0] as usize) {
            *l -= freq * run.len() as f32 + pres;
        }
    }
}

/// Finite-logit candidate ids, best first, limited to `top_k` when it is set.
fn candidates(logits: &[f32], top_k: usize) -> Vec<u32> {
    let mut ids = top_ids(logits, top_k);
    ids.retain(|&id| logits[id as usize] > f32::NEG_INFINITY);
    ids
}

/// Probabilities of `ids` after a softmax restricted to them.
fn softmax_of(logits: &[f32], ids: &[u32]) -> Vec<f32> {
    let max = ids
        .first()
        .map_or(f32::NEG_INFINITY, |&id| logits[id as usize]);
    let mut probs: Vec<f32> = ids
        .iter()
        .map(|&id| (logits[id as usize] - max).exp())
        .collect();
    let sum: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= sum);
    probs
}

/// How many of the (descending) `probs` the nucleus keeps: the shortest prefix whose mass
/// reaches `top_p`, and always at least one token.
fn top_p_len(probs: &[f32], top_p: f32) -> usize {
    let mut cum = 0.0;
    for (i, &p) in probs.iter().enumerate() {
        cum += p;
        if cum >= top_p {
            return i + 1;
        }
    }
    probs.len()
}

/// Zeroes tokens whose probability is below `min_p` times the most likely one.
fn apply_min_p(probs: &mut [f32], min_p: f32) {
    let max = probs.iter().copied().fold(0.0, f32::max);
    let floor = min_p * max;
    probs
        .iter_mut()
        .filter(|p| **p < floor)
        .for_each(|p| *p = 0.0);
}

/// The last candidate with positive probability (fallback for rounding at the tail).
fn last_positive(ids: &[u32], probs: &[f32]) -> Option<u32> {
    ids.iter()
        .zip(probs)
        .rev()
        .find(|(_, &p)| p > 0.0)
        .map(|(&id, _)| id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::{Context, Result};

    /// A sampler with the defaults overridden by `f`.
    fn sampler(f: impl FnOnce(&mut SamplingParams)) -> Sampler {
        let mut p = SamplingParams::default();
        f(&mut p);
        Sampler::new(&p)
    }

    fn row() -> Vec<f32> {
        vec![1.0, 3.0, 2.5, 3.0, -1.0, 0.5, 2.9, 0.0]
    }

    fn draw(s: &mut Sampler, n: usize) -> Result<Vec<u32>> {
        (0..n)
            .map(|_| Ok(s.sample(&mut row(), &[], &[])?.token_id))
            .collect()
    }

    #[test]
    fn greedy_picks_argmax_lowest_id_on_ties() -> Result<()> {
        let mut s = sampler(|p| p.temperature = 0.0);
        assert_eq!(s.sample(&mut row(), &[], &[])?.token_id, 1);
        Ok(())
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_seed_dependent() -> Result<()> {
        let a = draw(&mut sampler(|p| p.seed = Some(7)), 64)?;
        let b = draw(&mut sampler(|p| p.seed = Some(7)), 64)?;
        let c = draw(&mut sampler(|p| p.seed = Some(8)), 64)?;
        assert_eq!(a, b);
        assert_ne!(a, c);
        Ok(())
    }

    #[test]
    fn top_k_one_equals_greedy() -> Result<()> {
        let got = draw(&mut sampler(|p| p.top_k = 1), 32)?;
        assert!(got.iter().all(|&t| t == 1), "{got:?}");
        Ok(())
    }

    #[test]
    fn top_k_limits_to_k_best() -> Result<()> {
        let got = draw(&mut sampler(|p| p.top_k = 3), 200)?;
        assert!(got.iter().all(|t| [1, 3, 6].contains(t)), "{got:?}");
        Ok(())
    }

    #[test]
    fn tiny_top_p_equals_greedy() -> Result<()> {
        let got = draw(&mut sampler(|p| p.top_p = 1e-6), 32)?;
        assert!(got.iter().all(|&t| t == 1), "{got:?}");
        Ok(())
    }

    #[test]
    fn min_p_filters_unlikely_tokens() -> Result<()> {
        // exp(2.5 - 3) ~ 0.61 of the max survives; exp(1 - 3) ~ 0.14 does not.
        let got = draw(&mut sampler(|p| p.min_p = 0.5), 300)?;
        assert!(got.iter().all(|t| [1, 2, 3, 6].contains(t)), "{got:?}");
        assert!(got.contains(&2), "min_p must keep token 2: {got:?}");
        Ok(())
    }

    #[test]
    fn repetition_penalty_changes_argmax() -> Result<()> {
        let mut s = sampler(|p| {
            p.temperature = 0.0;
            p.repetition_penalty = 2.0;
        });
        // 1 and 3 are penalized to 1.5; 6 (2.9) wins. A negative seen logit gets more negative.
        let mut logits = row();
        let got = s.sample(&mut logits, &[1, 4], &[3])?;
        assert_eq!(got.token_id, 6);
        assert_eq!(logits[4], -2.0);
        Ok(())
    }

    #[test]
    fn frequency_and_presence_penalties_scale_with_output_counts() -> Result<()> {
        let mut s = sampler(|p| {
            p.temperature = 0.0;
            p.frequency_penalty = 0.5;
            p.presence_penalty = 0.25;
        });
        let mut logits = row();
        // Prompt tokens are not penalized by these penalties.
        let got = s.sample(&mut logits, &[6], &[1, 1, 3])?;
        assert_eq!(logits[1], 3.0 - 2.0 * 0.5 - 0.25);
        assert_eq!(logits[3], 3.0 - 0.5 - 0.25);
        assert_eq!(logits[6], 2.9);
        assert_eq!(got.token_id, 6);
        Ok(())
    }

    #[test]
    fn logprobs_are_raw_log_softmax_sorted() -> Result<()> {
        let mut s = sampler(|p| {
            p.temperature = 0.0;
            p.repetition_penalty = 2.0;
            p.logprobs = Some(3);
        });
        let got = s.sample(&mut row(), &[1, 3], &[])?;
        let lp = got.logprobs.context("logprobs requested")?;
        let raw = row();
        let lse = log_sum_exp(&raw);
        let total: f32 = raw.iter().map(|l| (l - lse).exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
        let ids: Vec<u32> = lp.top.iter().map(|&(id, _)| id).collect();
        assert_eq!(ids, vec![1, 3, 6]);
        assert!((lp.top[0].1 - (3.0 - lse)).abs() < 1e-6);
        assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
        // Sampled token 6 reports its raw logprob, not the penalized one.
        assert_eq!(got.token_id, 6);
        assert!((lp.logprob - (2.9 - lse)).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn no_logprobs_unless_requested() -> Result<()> {
        let got = sampler(|_| {}).sample(&mut row(), &[], &[])?;
        assert_eq!(got.logprobs, None);
        Ok(())
    }

    #[test]
    fn rejects_empty_and_all_nan_rows() {
        let mut s = sampler(|_| {});
        assert_eq!(s.sample(&mut [], &[], &[]), Err(SamplingError::EmptyLogits));
        let mut nan = [f32::NAN, f32::NEG_INFINITY];
        assert_eq!(
            s.sample(&mut nan, &[], &[]),
            Err(SamplingError::NoCandidates)
        );
    }
}
