//! Named benchmark presets, taken from the reports Orchard is compared with:
//!
//! - **S1-S6** (prompt / decode tokens 16/32, 64/64, 256/128, 512/256, 1024/128, 64/512) from
//!   the candle/Metal Qwen2.5 benchmark report, each at concurrency 1, 2, 4 and 5 (the tinyvllm
//!   "throughput vs concurrent requests" and vllm-mlx "batch of 5" levels). Reported as TTFT,
//!   decode TPS (1 / TPOT) and prefill TPS (prompt tokens / TTFT), mean ± standard deviation.
//! - **Prefix cache** (vllm-mlx "paged cache" test): every request shares a ~286-token system
//!   prompt; the first request is cold, the later ones should reuse its KV blocks. Reports the
//!   cold / warm TTFT ratio and the cached tokens the server reports.
//! - **Continuous batching** (vllm-mlx): one request alone vs five at once; reports aggregate
//!   output tok/s of each and their ratio.

use serde::{Deserialize, Serialize};

use crate::client::Client;
use crate::error::BenchError;
use crate::metrics::{Percentiles, RequestRecord, Summary};
use crate::prompt::{synthetic_prompt, PromptSource};
use crate::runner::{LevelResult, Settings};

/// A fixed prompt / decode shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Scenario {
    /// Short id (`S1`...).
    pub id: &'static str,
    /// Prompt tokens (synthetic prompt, see [`crate::prompt`]).
    pub prompt_tokens: usize,
    /// Output tokens (`max_tokens` with `ignore_eos`).
    pub decode_tokens: u32,
    /// What workload it stands for.
    pub description: &'static str,
}

/// The six seed scenarios.
pub const SEED_SCENARIOS: [Scenario; 6] = [
    Scenario {
        id: "S1",
        prompt_tokens: 16,
        decode_tokens: 32,
        description: "minimal load (overhead ratio)",
    },
    Scenario {
        id: "S2",
        prompt_tokens: 64,
        decode_tokens: 64,
        description: "short conversation",
    },
    Scenario {
        id: "S3",
        prompt_tokens: 256,
        decode_tokens: 128,
        description: "medium conversation",
    },
    Scenario {
        id: "S4",
        prompt_tokens: 512,
        decode_tokens: 256,
        description: "long context",
    },
    Scenario {
        id: "S5",
        prompt_tokens: 1024,
        decode_tokens: 128,
        description: "long document summary (prefill-heavy)",
    },
    Scenario {
        id: "S6",
        prompt_tokens: 64,
        decode_tokens: 512,
        description: "short question, long answer (decode-heavy)",
    },
];

/// Concurrency levels the seed reports use.
pub const SEED_CONCURRENCY: [usize; 4] = [1, 2, 4, 5];

/// Looks a scenario up by id, case-insensitively.
pub fn find_scenario(id: &str) -> Option<Scenario> {
    SEED_SCENARIOS
        .iter()
        .copied()
        .find(|s| s.id.eq_ignore_ascii_case(id))
}

/// Which scenarios at which concurrency.
#[derive(Debug, Clone)]
pub struct ScenarioPlan {
    /// Scenarios to run, in order.
    pub scenarios: Vec<Scenario>,
    /// Concurrency levels for each.
    pub concurrency: Vec<usize>,
    /// Requests per level = concurrency x this.
    pub requests_per_client: usize,
    /// Unmeasured requests before each scenario (first-call costs, lazy allocation).
    pub warmup_requests: usize,
    /// Shared settings.
    pub settings: Settings,
}

/// Runs every scenario at every concurrency level. Each level draws fresh prompts (its own
/// seed range), so no level hits the prefix cache warmed by another.
pub async fn run_scenarios(
    client: &Client,
    plan: &ScenarioPlan,
) -> Result<Vec<LevelResult>, BenchError> {
    let mut levels = Vec::new();
    let mut seed = plan.settings.seed;
    for scenario in &plan.scenarios {
        if plan.warmup_requests > 0 {
            seed = seed.wrapping_add(1_000_000);
            let prompts = PromptSource::Synthetic {
                tokens: scenario.prompt_tokens,
                seed,
            };
            let spec =
                plan.settings
                    .closed(1, plan.warmup_requests, prompts, scenario.decode_tokens);
            LevelResult::measure(
                client,
                &spec,
                format!("{} warm-up", scenario.id),
                plan.settings.progress,
            )
            .await?;
        }
        for &concurrency in &plan.concurrency {
            seed = seed.wrapping_add(1_000_000);
            let prompts = PromptSource::Synthetic {
                tokens: scenario.prompt_tokens,
                seed,
            };
            let requests = concurrency * plan.requests_per_client;
            let spec = plan
                .settings
                .closed(concurrency, requests, prompts, scenario.decode_tokens);
            let label = format!("{} c={concurrency}", scenario.id);
            let mut level =
                LevelResult::measure(client, &spec, label, plan.settings.progress).await?;
            level.scenario = Some(scenario.id.to_owned());
            levels.push(level);
        }
    }
    Ok(levels)
}

/// The shared-prefix test.
#[derive(Debug, Clone)]
pub struct PrefixSpec {
    /// Tokens of the shared system prompt (286 in the seed report).
    pub system_tokens: usize,
    /// Tokens of each request's own question.
    pub question_tokens: usize,
    /// Requests in all; the first is cold.
    pub requests: usize,
    /// Output tokens per request.
    pub max_tokens: u32,
}

/// What the prefix test measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrefixResult {
    /// Shared prefix length requested.
    pub system_tokens: usize,
    /// Seed of the shared prefix (rerun with another to get a cold cache again).
    pub seed: u64,
    /// TTFT of the first (cold) request, ms.
    pub cold_ttft_ms: f64,
    /// TTFT of the later (warm) requests, ms.
    pub warm_ttft_ms: Option<Percentiles>,
    /// Cold TTFT / mean warm TTFT: above 1 means the cache helps.
    pub ttft_ratio: Option<f64>,
    /// Cached tokens the server reported for the cold request.
    pub cold_cached_tokens: Option<u32>,
    /// Mean cached tokens the server reported for the warm requests.
    pub warm_cached_tokens_mean: Option<f64>,
    /// The whole level.
    pub level: LevelResult,
}

/// Sends `requests` requests one after another, all starting with the same system prompt.
pub async fn run_prefix_cache(
    client: &Client,
    spec: &PrefixSpec,
    settings: &Settings,
) -> Result<PrefixResult, BenchError> {
    if spec.requests < 2 {
        return Err(BenchError::BadArgument(
            "the prefix test needs at least 2 requests".into(),
        ));
    }
    let prompts = PromptSource::SharedPrefix {
        prefix: synthetic_prompt(spec.system_tokens, settings.seed),
        prefix_tokens: spec.system_tokens,
        suffix_tokens: spec.question_tokens,
        seed: settings.seed,
    };
    let load = settings.closed(1, spec.requests, prompts, spec.max_tokens);
    let level = LevelResult::measure(client, &load, "prefix".into(), settings.progress).await?;
    let records = &level.run.records;
    let cold = records.first().filter(|r| r.index == 0).ok_or_else(|| {
        BenchError::BadArgument(format!(
            "the cold request failed: {:?}",
            level.run.errors.first()
        ))
    })?;
    let warm: Vec<&RequestRecord> = records.iter().skip(1).collect();
    let warm_ttft: Vec<f64> = warm.iter().map(|r| r.ttft_s * 1e3).collect();
    let warm_ttft_ms = Percentiles::from_samples(&warm_ttft);
    let cached: Vec<f64> = warm
        .iter()
        .filter_map(|r| r.cached_tokens)
        .map(f64::from)
        .collect();
    Ok(PrefixResult {
        system_tokens: spec.system_tokens,
        seed: settings.seed,
        cold_ttft_ms: cold.ttft_s * 1e3,
        ttft_ratio: warm_ttft_ms
            .as_ref()
            .filter(|w| w.mean > 0.0)
            .map(|w| cold.ttft_s * 1e3 / w.mean),
        warm_ttft_ms,
        cold_cached_tokens: cold.cached_tokens,
        warm_cached_tokens_mean: (!cached.is_empty())
            .then(|| cached.iter().sum::<f64>() / cached.len() as f64),
        level: level.clone(),
    })
}

/// The continuous-batching test.
#[derive(Debug, Clone)]
pub struct BatchingSpec {
    /// Simultaneous requests in the batched run (5 in the seed report).
    pub batch: usize,
    /// Prompt tokens per request.
    pub prompt_tokens: usize,
    /// Output tokens per request.
    pub max_tokens: u32,
}

/// What the batching test measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchingResult {
    /// Simultaneous requests in the batched run.
    pub batch: usize,
    /// Output tok/s of one request alone.
    pub single_tok_s: f64,
    /// Aggregate output tok/s of `batch` simultaneous requests.
    pub batch_tok_s: f64,
    /// `batch_tok_s / single_tok_s`: near `batch` means decode steps are shared well.
    pub speedup: Option<f64>,
    /// The single-request level.
    pub single: Summary,
    /// The batched level.
    pub batched: LevelResult,
}

/// One request alone, then `batch` at once (after one unmeasured warm-up request).
pub async fn run_batching(
    client: &Client,
    spec: &BatchingSpec,
    settings: &Settings,
) -> Result<BatchingResult, BenchError> {
    let prompts = |offset: u64| PromptSource::Synthetic {
        tokens: spec.prompt_tokens,
        seed: settings.seed.wrapping_add(offset),
    };
    let warm = settings.closed(1, 1, prompts(7_000_000), spec.max_tokens);
    LevelResult::measure(client, &warm, "batching warm-up".into(), settings.progress).await?;
    let one = settings.closed(1, 1, prompts(8_000_000), spec.max_tokens);
    let single = LevelResult::measure(client, &one, "single".into(), settings.progress).await?;
    let many = settings.closed(spec.batch, spec.batch, prompts(9_000_000), spec.max_tokens);
    let batched = LevelResult::measure(
        client,
        &many,
        format!("batch of {}", spec.batch),
        settings.progress,
    )
    .await?;
    let single_tok_s = single.summary.output_tok_s;
    let batch_tok_s = batched.summary.output_tok_s;
    Ok(BatchingResult {
        batch: spec.batch,
        single_tok_s,
        batch_tok_s,
        speedup: (single_tok_s > 0.0).then(|| batch_tok_s / single_tok_s),
        single: single.summary,
        batched,
    })
}
