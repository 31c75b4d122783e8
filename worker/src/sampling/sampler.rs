//! The per-request [`Sampler`]: turns one logits row into one token id.

use orchard_common::SamplingParams;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::kernels::{vec, Isa};

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
    ///
    /// The candidates are walked best first, but ranked only as far as the walk goes
    /// ([`Ranked`]): sorting all of the default model's 49k logits for every token took
    /// milliseconds, as long as a decode step.
    fn sample_random(&mut self, logits: &mut [f32]) -> Result<u32, SamplingError> {
        let inv_t = 1.0 / self.params.temperature;
        logits.iter_mut().for_each(|l| *l *= inv_t);
        let logits = &*logits;
        let mut ranked = Ranked::new(logits, self.params.top_k as usize);
        let first = ranked.best(logits).ok_or(SamplingError::NoCandidates)?;
        // The draw is over the first `keep` candidates (top-p's nucleus), less those under
        // min-p's floor: probabilities descend, so those are a tail of them.
        let floor = self.params.min_p * ranked.p(first);
        let keep = match self.params.top_p < 1.0 {
            true => top_p_len(&mut ranked, logits, self.params.top_p),
            false => ranked.len(),
        };
        let total: f32 = match ranked.keys.get(..keep) {
            // Ranked already (top-p's nucleus, or every top-k candidate): their own sum.
            Some(kept) => kept
                .iter()
                .map(|&k| ranked.p(k as u32))
                .filter(|&q| q >= floor)
                .sum(),
            // Non-candidates have probability 0, under any positive floor.
            None => mass_from(&ranked.probs, floor),
        };
        let mut target = self.rng.random::<f32>() * total;
        let mut last = first;
        for i in 0..keep {
            let Some(id) = ranked.id(logits, i, target) else {
                break;
            };
            let q = ranked.p(id);
            if q < floor {
                break;
            }
            if target < q {
                return Ok(id);
            }
            if q > 0.0 {
                last = id;
            }
            target -= q;
        }
        // Rounding can leave `target` just above the sum: the last kept token with a positive
        // probability.
        Ok(last)
    }
}

/// Candidate ids ranked best first (by logit, ties to the lower id) only as far as a walk goes,
/// with their probabilities (a softmax restricted to the candidates).
struct Ranked {
    /// Per token id; 0 for a token that is not a candidate.
    probs: Vec<f32>,
    /// The ranked prefix: one [`rank_key`] per candidate, in order.
    keys: Vec<u64>,
    /// Every candidate whose probability is at least this is in `keys`, and no other.
    bound: f32,
    /// Candidates, ranked or not.
    len: usize,
}

/// A key whose ascending order is the ranking: logit descending (`f32::total_cmp`'s order,
/// reversed), then id ascending.
fn rank_key(logit: f32, id: u32) -> u64 {
    let bits = logit.to_bits();
    let ascending = if bits >> 31 == 1 {
        !bits
    } else {
        bits | 1 << 31
    };
    (u64::from(!ascending) << 32) | u64::from(id)
}

impl Ranked {
    /// The `top_k` best finite-logit ids when `top_k` is set (ranked at once); otherwise every
    /// token with a positive probability (ranked as walks need). Tokens whose probability
    /// rounds to 0 are never drawn either way.
    fn new(logits: &[f32], top_k: usize) -> Self {
        if top_k > 0 {
            let keys: Vec<u64> = (0..logits.len() as u32)
                .filter(|&id| logits[id as usize] > f32::NEG_INFINITY)
                .map(|id| rank_key(logits[id as usize], id))
                .collect();
            if top_k < keys.len() {
                let keys = first_keys(keys, top_k);
                let mut some: Vec<f32> = keys.iter().map(|&k| logits[k as u32 as usize]).collect();
                vec::softmax(Isa::detect(), &mut some);
                let mut probs = vec![0.0; logits.len()];
                for (&k, q) in keys.iter().zip(some) {
                    probs[k as u32 as usize] = q;
                }
                return Self {
                    probs,
                    len: keys.len(),
                    keys,
                    bound: 0.0,
                };
            }
        }
        let mut probs = logits.to_vec();
        if logits.iter().any(|&l| l > f32::NEG_INFINITY) {
            vec::softmax(Isa::detect(), &mut probs);
        }
        let len = probs
            .chunks(8)
            .map(|c| c.iter().map(|&q| usize::from(q > 0.0)).sum::<usize>())
            .sum();
        Self {
            probs,
            keys: Vec::new(),
            bound: f32::INFINITY,
            len,
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    /// The best candidate (the first of the ranking), without ranking anything.
    fn best(&self, logits: &[f32]) -> Option<u32> {
        match self.keys.first() {
            Some(&k) => Some(k as u32),
            None if self.len > 0 => argmax(logits),
            None => None,
        }
    }

    /// Probability of token `id` (0 when it is not a candidate).
    fn p(&self, id: u32) -> f32 {
        self.probs[id as usize]
    }

    /// The `i`-th best candidate. Past the ranked prefix, first ranks at least the candidates
    /// that hold `mass` more probability (a walk's remaining target), at least one.
    fn id(&mut self, logits: &[f32], i: usize, mass: f32) -> Option<u32> {
        while i >= self.keys.len() && self.keys.len() < self.len {
            self.rank_more(logits, mass);
        }
        self.keys.get(i).map(|&k| k as u32)
    }

    /// Ranks the best unranked candidates that together hold at least `mass` of the
    /// probability (at least one), in two passes over the row: probabilities are bucketed by
    /// their binary exponent, which never increases down the ranking, so the candidates from
    /// some bucket up are the next part of it.
    fn rank_more(&mut self, logits: &[f32], mass: f32) {
        let bucket = |q: f32| (q.to_bits() >> 23) as usize;
        let unranked = |q: f32| q > 0.0 && q < self.bound;
        // Four histograms in turn, so that runs of one bucket do not wait on each other's sums.
        let mut hists = [[0f32; 256]; 4];
        for four in self.probs.chunks(4) {
            for (hist, &q) in hists.iter_mut().zip(four) {
                if unranked(q) {
                    hist[bucket(q)] += q;
                }
            }
        }
        let per_bucket: [f32; 256] = std::array::from_fn(|b| hists.iter().map(|h| h[b]).sum());
        // A little over `mass`: the walk sums in rank order, the buckets here in another.
        let want = mass * (1.0 + 1e-3);
        let (mut cut, mut acc) = (0, 0f32);
        for b in (0..256).rev().filter(|&b| per_bucket[b] > 0.0) {
            cut = b;
            acc += per_bucket[b];
            if acc > want {
                break;
            }
        }
        let from = self.keys.len();
        for (id, &q) in self.probs.iter().enumerate() {
            if unranked(q) && bucket(q) >= cut {
                self.keys.push(rank_key(logits[id], id as u32));
            }
        }
        self.keys[from..].sort_unstable();
        self.bound = f32::from_bits((cut as u32) << 23);
    }
}

/// The sum of the probabilities of at least `floor`, over eight running sums (so it
/// vectorizes; a row's mass in any order serves as a draw's total).
fn mass_from(probs: &[f32], floor: f32) -> f32 {
    let mut sums = [0f32; 8];
    let chunks = probs.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().filter(|&&q| q >= floor).sum();
    for c in chunks {
        for (s, &q) in sums.iter_mut().zip(c) {
            *s += if q >= floor { q } else { 0.0 };
        }
    }
    sums.iter().sum::<f32>() + tail
}

/// How many of the best candidates form top-p's nucleus: the shortest prefix whose mass
/// reaches `top_p`, and always at least one token.
fn top_p_len(ranked: &mut Ranked, logits: &[f32], top_p: f32) -> usize {
    let mut cum = 0.0;
    let mut i = 0;
    while let Some(id) = ranked.id(logits, i, top_p - cum) {
        cum += ranked.p(id);
        i += 1;
        if cum >= top_p {
            return i;
        }
    }
    ranked.len()
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
    let mut e = logits.to_vec();
    vec::exp_shifted(Isa::detect(), &mut e, max);
    max + mass_from(&e, 0.0).ln()
}

/// The `k` highest-logit ids, sorted best first (all of them when `k` is 0). Uses a partial
/// selection (O(V)) when `k` is smaller than the vocabulary, so logprobs avoid a full sort.
fn top_ids(logits: &[f32], k: usize) -> Vec<u32> {
    let keys = (0..logits.len() as u32).map(|id| rank_key(logits[id as usize], id));
    first_keys(keys.collect(), k)
        .into_iter()
        .map(|key| key as u32)
        .collect()
}

/// The `k` smallest of `keys` (all of them when `k` is 0 or not smaller), sorted: a partial
/// selection, O(V), then a sort of the `k`.
fn first_keys(mut keys: Vec<u64>, k: usize) -> Vec<u64> {
    if k > 0 && k < keys.len() {
        keys.select_nth_unstable(k - 1);
        keys.truncate(k);
    }
    keys.sort_unstable();
    keys
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

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::{Context, Result};

    use std::cmp::Ordering;

    /// Orders `(id, logit)` pairs by logit descending, then id ascending (deterministic ties).
    fn by_logit_desc(logits: &[f32], a: u32, b: u32) -> Ordering {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    }

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

    /// A large row: many ties, a few -inf, logits spread so that draws go deep.
    fn wide_row(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| match i % 97 {
                0 => f32::NEG_INFINITY,
                _ => ((i * 7919) % 61) as f32 * 0.25 - 6.0,
            })
            .collect()
    }

    #[test]
    fn ranking_in_steps_equals_a_full_sort() {
        let logits = wide_row(5000);
        for top_k in [0usize, 1, 100, 4000] {
            let mut ranked = Ranked::new(&logits, top_k);
            let walked: Vec<u32> = (0..ranked.len())
                .map(|i| ranked.id(&logits, i, 1e-4 * i as f32))
                .collect::<Option<_>>()
                .unwrap_or_default();
            let mut expected: Vec<u32> = (0..logits.len() as u32)
                .filter(|&id| logits[id as usize] > f32::NEG_INFINITY)
                .collect();
            expected.sort_unstable_by(|&a, &b| by_logit_desc(&logits, a, b));
            if top_k > 0 {
                expected.truncate(top_k);
            }
            assert_eq!(walked, expected, "top_k {top_k}");
            let total: f32 = ranked.probs.iter().sum();
            assert!((total - 1.0).abs() < 1e-4, "top_k {top_k}: total {total}");
        }
        // Logprobs' top-n ranks every id, -inf ones last.
        let mut all: Vec<u32> = (0..logits.len() as u32).collect();
        all.sort_unstable_by(|&a, &b| by_logit_desc(&logits, a, b));
        assert_eq!(top_ids(&logits, 0), all);
        assert_eq!(top_ids(&logits, 10), all[..10]);
    }

    #[test]
    fn draws_deep_in_a_flat_row_follow_its_distribution() -> Result<()> {
        // 300 equal logits: each token is drawn with probability 1/300, ranked by id.
        let mut s = sampler(|p| p.seed = Some(3));
        let n = 30_000;
        let mut counts = [0usize; 3];
        for _ in 0..n {
            let id = s.sample(&mut vec![0.5f32; 300], &[], &[])?.token_id;
            counts[id as usize / 100] += 1;
        }
        // Binomial(30000, 1/3): standard deviation ~82 around 10000.
        for c in counts {
            assert!((9_600..=10_400).contains(&c), "{counts:?}");
        }
        Ok(())
    }

    #[test]
    fn top_p_and_min_p_on_a_large_row_keep_the_exact_sets() -> Result<()> {
        let logits = wide_row(5000);
        let mut ranked = Ranked::new(&logits, 0);
        let probs = ranked.probs.clone();
        let mut order: Vec<u32> = (0..logits.len() as u32)
            .filter(|&id| logits[id as usize] > f32::NEG_INFINITY)
            .collect();
        order.sort_unstable_by(|&a, &b| by_logit_desc(&logits, a, b));
        let mut cum = 0.0;
        let nucleus = 1 + order
            .iter()
            .position(|&id| {
                cum += probs[id as usize];
                cum >= 0.3
            })
            .unwrap_or(order.len() - 1);
        assert_eq!(top_p_len(&mut ranked, &logits, 0.3), nucleus);
        let allowed = &order[..nucleus];
        let mut s = sampler(|p| {
            p.top_p = 0.3;
            p.seed = Some(5);
        });
        let mut seen = std::collections::HashSet::new();
        for _ in 0..3000 {
            let id = s.sample(&mut logits.clone(), &[], &[])?.token_id;
            assert!(allowed.contains(&id), "{id} is outside the nucleus");
            seen.insert(id);
        }
        assert!(
            seen.contains(&allowed[nucleus - 1]),
            "the nucleus' last token is never drawn"
        );
        // min-p: only tokens at least half as likely as the best (logit within ln 2 of it).
        let best = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut s = sampler(|p| {
            p.min_p = 0.5;
            p.seed = Some(6);
        });
        for _ in 0..500 {
            let id = s.sample(&mut logits.clone(), &[], &[])?.token_id;
            assert!(
                logits[id as usize] >= best - 2f32.ln(),
                "{id} is under min_p"
            );
        }
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
