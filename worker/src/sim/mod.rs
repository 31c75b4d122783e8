//! The simulated engine: the real scheduler and KV block manager with a timing model instead of
//! a model, for router scale and fault tests.
//!
//! [`simulated_engine`] builds the same [`EngineParts`] the real loader builds, with a
//! [`SimRunner`] in place of the candle model and a byte-level tokenizer built in code, so a
//! simulated worker starts in milliseconds, needs no model file, and still exercises continuous
//! batching, chunked prefill, prefix caching, preemption, sampling, stop handling and
//! cancellation exactly as a real worker does. Its latencies come from the configured timing
//! model (`[sim]` in the worker config) and are never measurements.

pub mod runner;
pub mod tokenizer;

use std::sync::Arc;
use std::time::Duration;

use orchard_common::config::{EngineKind, WorkerConfig};

pub use runner::{SimRunner, SimVocab, TimingModel};

use crate::engine::{EngineError, EngineParts};
use crate::text::frontend::TextFrontend;

/// Model name a simulated worker reports when `model.name` is unset.
pub const SIMULATED_MODEL_NAME: &str = "simulated";

/// Builds a simulated engine and its text front end from the worker config: timing model and
/// context length from `[sim]`, scheduler limits and KV pool size from `[engine]`.
pub fn simulated_engine(cfg: &WorkerConfig) -> Result<(EngineParts, TextFrontend), EngineError> {
    let tokenizer = Arc::new(tokenizer::build_tokenizer()?);
    let vocab = SimVocab {
        vocab_size: tokenizer.get_vocab_size(true),
        output_ids: tokenizer::output_token_ids(&tokenizer)?,
        eos_token_id: tokenizer::EOS_TOKEN_ID,
        eos_at_position: cfg.sim.eos_at_position,
    };
    let runner = SimRunner::new(TimingModel::from_config(&cfg.sim), vocab)?;
    let max_model_len = match cfg.engine.max_model_len {
        Some(cap) => cap.min(cfg.sim.max_model_len),
        None => cfg.sim.max_model_len,
    };
    let parts = EngineParts {
        runner: Box::new(runner),
        tokenizer: Arc::clone(&tokenizer),
        eos_token_ids: vec![tokenizer::EOS_TOKEN_ID],
        config: cfg.engine.clone(),
        num_kv_blocks: num_kv_blocks(cfg)?,
        max_model_len,
        model_name: cfg
            .model
            .name
            .clone()
            .unwrap_or_else(|| SIMULATED_MODEL_NAME.to_string()),
    };
    let frontend = TextFrontend::new(tokenizer, Some(tokenizer::chat_template()?));
    Ok((parts, frontend))
}

/// A simulated worker's config for tests: a small KV pool (256 blocks) and a fast timing model
/// (1 ms per step), everything else at its default.
pub fn test_worker_config(id: &str) -> WorkerConfig {
    let mut cfg = WorkerConfig {
        id: id.into(),
        engine_kind: EngineKind::Simulated,
        ..WorkerConfig::default()
    };
    cfg.engine.num_kv_blocks = Some(256);
    cfg.sim.step_overhead = Duration::from_millis(1);
    cfg
}

/// `engine.num_kv_blocks`, or as many blocks of `sim.kv_bytes_per_token`-byte tokens as fit in
/// `engine.kv_cache_mb`.
fn num_kv_blocks(cfg: &WorkerConfig) -> Result<u32, EngineError> {
    if let Some(n) = cfg.engine.num_kv_blocks {
        return Ok(n);
    }
    let budget = u64::from(cfg.engine.kv_cache_mb) * 1024 * 1024;
    let per_block = u64::from(cfg.sim.kv_bytes_per_token) * u64::from(cfg.engine.block_size);
    let blocks = budget / per_block.max(1);
    match u32::try_from(blocks) {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(EngineError::Config(format!(
            "engine.kv_cache_mb = {} holds {blocks} simulated blocks of {per_block} bytes; \
             set engine.num_kv_blocks",
            cfg.engine.kv_cache_mb
        ))),
    }
}
