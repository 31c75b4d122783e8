//! What the engine benchmark runs ([`Sizes`]: full or `--quick`) and the prompts it sends
//! ([`PromptMaker`]: real text cut to an exact token count, a different text every time).

use std::sync::Arc;

use orchard_worker::text::frontend::TextFrontend;
use serde::Serialize;

use super::EngineBenchError;
use crate::prompt::synthetic_prompt;
use crate::scenarios::SEED_SCENARIOS;

/// A prompt length and a fixed output length (`ignore_eos`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Shape {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Output tokens.
    pub output_tokens: u32,
}

impl Shape {
    /// Prompt plus output: the KV slots one sequence of this shape needs.
    fn total(&self) -> usize {
        self.prompt_tokens + self.output_tokens as usize
    }
}

/// One seed scenario at the size this run uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ScenarioShape {
    /// `S1`...`S6`.
    pub id: String,
    /// Prompt and output tokens.
    pub shape: Shape,
}

/// The sizes of every measurement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sizes {
    /// Whether these are the `--quick` sizes (recorded in the report).
    pub quick: bool,
    /// Prompt lengths of the prefill measurement.
    pub prefill_prompts: Vec<usize>,
    /// The single-stream decode run.
    pub decode: Shape,
    /// Each sequence of the aggregate decode runs.
    pub aggregate: Shape,
    /// Concurrent sequences of the aggregate decode runs.
    pub concurrency: Vec<usize>,
    /// The seed scenarios.
    pub scenarios: Vec<ScenarioShape>,
}

impl Sizes {
    /// The sizes the issue asks for: prefill of 128 and 512 tokens, 128 decoded tokens,
    /// 1/4/16 concurrent sequences of 32 + 64 tokens, S1-S6 at their own sizes.
    pub fn full() -> Self {
        Self {
            quick: false,
            prefill_prompts: vec![128, 512],
            decode: Shape {
                prompt_tokens: 16,
                output_tokens: 128,
            },
            aggregate: Shape {
                prompt_tokens: 32,
                output_tokens: 64,
            },
            concurrency: vec![1, 4, 16],
            scenarios: scenarios(|s| s),
        }
    }

    /// Small sizes for tests and smoke runs (seconds in a dev build): the same measurements,
    /// with S1-S6 scaled down 16 times (at least 4 prompt and 4 output tokens).
    pub fn quick() -> Self {
        Self {
            quick: true,
            prefill_prompts: vec![8, 16],
            decode: Shape {
                prompt_tokens: 8,
                output_tokens: 8,
            },
            aggregate: Shape {
                prompt_tokens: 8,
                output_tokens: 6,
            },
            concurrency: vec![1, 4, 16],
            scenarios: scenarios(|s| Shape {
                prompt_tokens: (s.prompt_tokens / 16).max(4),
                output_tokens: (s.output_tokens / 16).max(4),
            }),
        }
    }

    pub(crate) fn check(&self) -> Result<(), EngineBenchError> {
        let bad = |what: &str| Err(EngineBenchError::BadArgument(what.into()));
        if self.prefill_prompts.contains(&0) || self.decode.prompt_tokens == 0 {
            return bad("prompt lengths must be >= 1");
        }
        // A decode rate needs at least two output tokens (the first one comes from prefill).
        if self.decode.output_tokens < 2 || self.aggregate.output_tokens < 2 {
            return bad("decode runs need at least 2 output tokens");
        }
        if self.concurrency.contains(&0) {
            return bad("concurrency levels must be >= 1");
        }
        if self.scenarios.iter().any(|s| s.shape.output_tokens < 2) {
            return bad("scenarios need at least 2 output tokens");
        }
        Ok(())
    }

    /// KV blocks for the largest single run (all concurrent sequences at once), plus one block
    /// per sequence of slack.
    pub(crate) fn kv_blocks_needed(&self, block_size: u32) -> u32 {
        let blocks = |tokens: usize| tokens.div_ceil(block_size as usize) + 1;
        let widest = self.concurrency.iter().copied().max().unwrap_or(1);
        let longest_prefill = self.prefill_prompts.iter().map(|&p| blocks(p + 1));
        let singles = [self.decode.total()]
            .into_iter()
            .chain(self.scenarios.iter().map(|s| s.shape.total()))
            .map(blocks);
        let needed = longest_prefill
            .chain(singles)
            .chain([widest * blocks(self.aggregate.total())])
            .max()
            .unwrap_or(1);
        u32::try_from(needed).unwrap_or(u32::MAX)
    }

    /// Progress steps: every measured run of both engines plus the warm-ups.
    pub(crate) fn step_count(&self, repeat: u32, warmup: u32) -> u64 {
        let ours = self.prefill_prompts.len() + 1 + self.concurrency.len() + self.scenarios.len();
        let candle = self.prefill_prompts.len() + 1;
        ((ours + candle) as u64) * u64::from(repeat) + 2 * u64::from(warmup)
    }
}

fn scenarios(resize: impl Fn(Shape) -> Shape) -> Vec<ScenarioShape> {
    SEED_SCENARIOS
        .iter()
        .map(|s| ScenarioShape {
            id: s.id.to_owned(),
            shape: resize(Shape {
                prompt_tokens: s.prompt_tokens,
                output_tokens: s.decode_tokens,
            }),
        })
        .collect()
}

/// Makes prompts of exact token counts from real text: English words
/// ([`synthetic_prompt`]) encoded with the model's own tokenizer (BOS included) and cut to
/// length. Each prompt uses the next seed, so no two prompts of a run share a first block.
pub struct PromptMaker {
    frontend: TextFrontend,
    next_seed: u64,
}

impl PromptMaker {
    /// A maker that encodes with `frontend`'s tokenizer.
    pub fn new(frontend: &TextFrontend) -> Self {
        Self {
            frontend: TextFrontend::new(Arc::clone(frontend.tokenizer()), None),
            next_seed: 0,
        }
    }

    /// The next prompt of exactly `tokens` tokens.
    pub fn next(&mut self, tokens: usize) -> Result<Vec<u32>, EngineBenchError> {
        let seed = self.next_seed;
        self.next_seed += 1;
        // Every word is at least one token, so `tokens` words always suffice; a few more cover
        // words the tokenizer merges with a neighbour.
        let text = synthetic_prompt(tokens + 8, seed);
        let mut ids = self.frontend.encode_prompt(&text)?;
        if ids.len() < tokens {
            return Err(EngineBenchError::ShortPrompt {
                wanted: tokens,
                got: ids.len(),
            });
        }
        ids.truncate(tokens);
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_and_full_sizes_are_valid_and_keep_the_scenario_ids() -> Result<(), EngineBenchError> {
        for sizes in [Sizes::full(), Sizes::quick()] {
            sizes.check()?;
            let ids: Vec<_> = sizes.scenarios.iter().map(|s| s.id.as_str()).collect();
            assert_eq!(ids, ["S1", "S2", "S3", "S4", "S5", "S6"]);
        }
        let full = Sizes::full();
        assert_eq!(full.scenarios[4].shape.prompt_tokens, 1024);
        assert_eq!(full.scenarios[5].shape.output_tokens, 512);
        Ok(())
    }

    #[test]
    fn the_kv_pool_holds_the_widest_concurrent_run() {
        let sizes = Sizes::full();
        // 16 sequences x (32 + 64) tokens = 16 x 6 blocks, + 1 slack block each.
        assert_eq!(sizes.kv_blocks_needed(16), 16 * 7);
        let mut long = Sizes::full();
        long.concurrency = vec![1];
        // S6: 64 + 512 = 576 tokens = 36 blocks + 1; S5: 1024 + 128 = 72 + 1.
        assert_eq!(long.kv_blocks_needed(16), 73);
    }

    #[test]
    fn a_single_output_token_is_refused() {
        let mut sizes = Sizes::quick();
        sizes.decode.output_tokens = 1;
        assert!(matches!(
            sizes.check(),
            Err(EngineBenchError::BadArgument(_))
        ));
    }
}
