//! The default model served through the gRPC service agrees with the engine used directly.

use anyhow::{bail, Context, Result};
use orchard_common::config::WorkerConfig;
use orchard_common::SamplingParams;
use orchard_worker::engine::{load_model, EngineEvent, EngineHandle, EngineRequest};
use orchard_worker::model::gguf::default_model_path;
use orchard_worker::text::chat_template::Message;
use tokio::sync::mpsc;

use crate::support::{chat_request, generate_all, tokens_and_final, TestWorker};

const QUESTION: &str = "What is the capital of France?";
const MAX_TOKENS: u32 = 12;

/// Greedy tokens straight from an `EngineHandle` on the same config.
async fn direct_tokens(cfg: &WorkerConfig) -> Result<Vec<u32>> {
    let cfg = cfg.clone();
    let (parts, frontend) = tokio::task::spawn_blocking(move || load_model(&cfg)).await??;
    let engine = EngineHandle::spawn(parts)?;
    let prompt = frontend.encode_chat(&[Message {
        role: "user".into(),
        content: QUESTION.into(),
    }])?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    engine.submit(EngineRequest {
        id: "direct".into(),
        prompt_token_ids: prompt,
        params: SamplingParams::greedy(MAX_TOKENS),
        arrival: std::time::Instant::now(),
        events: tx,
    })?;
    let mut tokens = Vec::new();
    while let Some(event) = rx.recv().await {
        match event {
            EngineEvent::Tokens(chunk) => tokens.extend(chunk.token_ids),
            EngineEvent::Finished(_) => return Ok(tokens),
            EngineEvent::Failed(err) => bail!("engine failed: {err}"),
        }
    }
    bail!("engine stream ended without Finished")
}

#[tokio::test]
async fn greedy_chat_through_the_service_matches_the_engine() -> Result<()> {
    let path = default_model_path();
    anyhow::ensure!(
        path.exists(),
        "default model {} missing (run deploy/fetch-model.sh)",
        path.display()
    );
    let mut cfg = WorkerConfig {
        id: "model-worker".into(),
        ..WorkerConfig::default()
    };
    cfg.engine.num_kv_blocks = Some(64);
    let expected = direct_tokens(&cfg).await?;
    assert!(!expected.is_empty());

    let worker = TestWorker::serving(cfg).await?;
    let mut client = worker.client();
    let msgs = generate_all(&mut client, chat_request(QUESTION, MAX_TOKENS)).await?;
    let (tokens, info) = tokens_and_final(&msgs)?;
    assert_eq!(tokens, expected);
    let usage = info.usage.context("usage")?;
    assert_eq!(usage.completion_tokens as usize, tokens.len());
    let text: String = msgs.iter().map(|m| m.text.as_str()).collect();
    assert!(!text.trim().is_empty(), "the answer has text: {text:?}");
    Ok(())
}
