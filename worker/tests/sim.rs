//! The simulated engine through `EngineHandle` directly: the real scheduler and KV manager
//! driven by `SimRunner`.

use std::time::Duration;

use anyhow::{bail, Result};
use orchard_common::config::{EngineKind, WorkerConfig};
use orchard_common::{FinishReason, SamplingParams};
use orchard_worker::engine::{EngineEvent, EngineHandle, EngineRequest, Finished};
use orchard_worker::sim::{self, tokenizer, SimRunner, SimVocab, TimingModel};
use tokio::sync::mpsc;

fn config() -> WorkerConfig {
    let mut cfg = WorkerConfig {
        id: "sim-test".into(),
        engine_kind: EngineKind::Simulated,
        ..WorkerConfig::default()
    };
    cfg.engine.num_kv_blocks = Some(128);
    cfg.sim.step_overhead = Duration::from_millis(1);
    cfg
}

/// A runner identical to the engine's, to compute what the engine should produce.
fn reference_runner(cfg: &WorkerConfig) -> Result<SimRunner> {
    let tok = tokenizer::build_tokenizer()?;
    Ok(SimRunner::new(
        TimingModel::from_config(&cfg.sim),
        SimVocab {
            vocab_size: tok.get_vocab_size(true),
            output_ids: tokenizer::output_token_ids(&tok)?,
            eos_token_id: tokenizer::EOS_TOKEN_ID,
            eos_at_position: cfg.sim.eos_at_position,
        },
    )?)
}

/// Submits one request and collects its tokens and final event.
async fn run_one(
    engine: &EngineHandle,
    id: String,
    prompt: Vec<u32>,
    params: SamplingParams,
) -> Result<(Vec<u32>, Finished)> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    engine.submit(EngineRequest {
        id: id.clone(),
        prompt_token_ids: prompt,
        params,
        arrival: std::time::Instant::now(),
        events: tx,
    })?;
    let mut tokens = Vec::new();
    while let Some(event) = rx.recv().await {
        match event {
            EngineEvent::Tokens(chunk) => tokens.extend(chunk.token_ids),
            EngineEvent::Finished(done) => return Ok((tokens, done)),
            EngineEvent::Failed(err) => bail!("{id} failed: {err}"),
        }
    }
    bail!("{id}: stream ended without Finished")
}

#[tokio::test]
async fn greedy_output_is_the_simulated_models_prediction_chain() -> Result<()> {
    let cfg = config();
    let (parts, frontend) = sim::simulated_engine(&cfg)?;
    let engine = EngineHandle::spawn(parts)?;
    let prompt = frontend.encode_prompt("Simulated engines are deterministic.")?;
    let (tokens, done) = run_one(
        &engine,
        "r".into(),
        prompt.clone(),
        SamplingParams::greedy(16),
    )
    .await?;
    let runner = reference_runner(&cfg)?;
    let mut expected = Vec::new();
    let (mut last, mut pos) = (*prompt.last().unwrap_or(&0), prompt.len() as u32 - 1);
    for _ in 0..16 {
        last = runner.predict(last, pos);
        pos += 1;
        expected.push(last);
    }
    assert_eq!(tokens, expected);
    assert_eq!(done.reason, FinishReason::Length);
    assert_eq!(done.usage.prompt_tokens as usize, prompt.len());
    Ok(())
}

#[tokio::test]
async fn batching_many_requests_does_not_change_outputs_and_frees_every_block() -> Result<()> {
    let mut cfg = config();
    cfg.engine.max_num_seqs = 4;
    let (parts, frontend) = sim::simulated_engine(&cfg)?;
    let engine = EngineHandle::spawn(parts)?;
    let prompts: Vec<Vec<u32>> = (0..12)
        .map(|i| frontend.encode_prompt(&format!("request number {i} says hello")))
        .collect::<Result<_, _>>()?;
    let alone = run_one(
        &engine,
        "alone".into(),
        prompts[5].clone(),
        SamplingParams::greedy(10),
    )
    .await?;
    let runs = prompts.iter().enumerate().map(|(i, p)| {
        run_one(
            &engine,
            format!("r{i}"),
            p.clone(),
            SamplingParams::greedy(10),
        )
    });
    let together = futures::future::try_join_all(runs).await?;
    assert!(together.iter().all(|(t, _)| t.len() == 10));
    assert_eq!(together[5].0, alone.0, "batching changed a greedy output");
    // The gauges are published at the end of the step that sent the last Finished event, so
    // poll (bounded) instead of reading once.
    let idle = |l: &orchard_worker::engine::LoadSnapshot| {
        (l.running, l.waiting, l.kv_blocks_used) == (0, 0, 0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !idle(&engine.load()) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let load = engine.load();
    assert_eq!(
        (load.running, load.waiting, load.kv_blocks_used),
        (0, 0, 0),
        "{load:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_repeated_prompt_hits_the_prefix_cache() -> Result<()> {
    let cfg = config();
    let (parts, frontend) = sim::simulated_engine(&cfg)?;
    let engine = EngineHandle::spawn(parts)?;
    let prompt = frontend.encode_prompt(&"a shared system prompt ".repeat(4))?;
    let (_, first) = run_one(
        &engine,
        "a".into(),
        prompt.clone(),
        SamplingParams::greedy(4),
    )
    .await?;
    let (_, second) = run_one(
        &engine,
        "b".into(),
        prompt.clone(),
        SamplingParams::greedy(4),
    )
    .await?;
    assert_eq!(first.usage.cached_tokens, 0);
    // Full blocks of the prompt, capped at prompt length - 1.
    let block = cfg.engine.block_size as usize;
    let expected = ((prompt.len() - 1) / block * block) as u32;
    assert_eq!(second.usage.cached_tokens, expected);
    Ok(())
}

#[tokio::test]
async fn decode_steps_take_at_least_the_configured_time() -> Result<()> {
    let mut cfg = config();
    cfg.sim.per_decode_seq = Duration::from_millis(4);
    let (parts, frontend) = sim::simulated_engine(&cfg)?;
    let engine = EngineHandle::spawn(parts)?;
    let prompt = frontend.encode_prompt("pace")?;
    let (tokens, done) = run_one(&engine, "p".into(), prompt, SamplingParams::greedy(11)).await?;
    assert_eq!(tokens.len(), 11);
    // Ten decode steps after the first token, each at least overhead + one sequence.
    let floor = (cfg.sim.step_overhead + cfg.sim.per_decode_seq) * 10;
    assert!(
        done.timings.e2e - done.timings.ttft >= floor,
        "{:?}",
        done.timings
    );
    Ok(())
}

#[test]
fn kv_pool_is_derived_from_the_memory_budget() -> Result<()> {
    let mut cfg = config();
    cfg.engine.num_kv_blocks = None;
    cfg.engine.kv_cache_mb = 16;
    let (parts, _) = sim::simulated_engine(&cfg)?;
    // 16 MiB / (46080 B/token * 16 tokens/block) = 22 blocks.
    assert_eq!(parts.num_kv_blocks, 22);
    cfg.engine.kv_cache_mb = 0;
    assert!(sim::simulated_engine(&cfg).is_err());
    cfg.engine.max_model_len = Some(512);
    cfg.engine.num_kv_blocks = Some(8);
    let (parts, _) = sim::simulated_engine(&cfg)?;
    assert_eq!(parts.max_model_len, 512);
    Ok(())
}
