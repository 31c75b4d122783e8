//! The engine loop over a deterministic fake model (no weights): step failures fail only that
//! step's requests and free their blocks, and the engine keeps serving.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use orchard_common::config::EngineConfig;
use orchard_common::{ErrorKind, FinishReason, SamplingParams};
use orchard_worker::engine::api::{EngineEvent, EngineRequest};
use orchard_worker::engine::batch::StepBatch;
use orchard_worker::engine::{EngineError, EngineHandle, EngineParts, ModelRunner};
use tokenizers::Tokenizer;

const VOCAB: usize = 16;
/// A step containing this token fails.
const POISON: u32 = 13;

/// Predicts `last token + 1` for every sequence; fails any step that contains [`POISON`].
struct Successor;

impl ModelRunner for Successor {
    fn execute(&mut self, batch: &StepBatch) -> Result<Vec<Vec<f32>>, EngineError> {
        if batch.token_ids.contains(&POISON) {
            return Err(EngineError::Runner("poisoned step".into()));
        }
        let rows = batch.seqs.iter().filter(|s| s.needs_logits).map(|s| {
            let last = batch.token_ids[(s.query_start + s.query_len - 1) as usize];
            let mut row = vec![0.0; VOCAB];
            row[(last as usize + 1) % VOCAB] = 10.0;
            row
        });
        Ok(rows.collect())
    }

    fn vocab_size(&self) -> usize {
        VOCAB
    }
}

/// A word-level tokenizer whose token `i` is the word `w<i>`.
fn tokenizer() -> Result<Tokenizer> {
    let vocab: serde_json::Map<String, serde_json::Value> = (0..VOCAB)
        .map(|i| (format!("w{i}"), serde_json::json!(i)))
        .collect();
    let doc = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}
    });
    Tokenizer::from_bytes(doc.to_string().as_bytes()).map_err(|e| anyhow!("{e}"))
}

fn spawn() -> Result<EngineHandle> {
    Ok(EngineHandle::spawn(EngineParts {
        runner: Box::new(Successor),
        tokenizer: Arc::new(tokenizer()?),
        eos_token_ids: vec![15],
        config: EngineConfig {
            num_kv_blocks: Some(8),
            block_size: 4,
            ..EngineConfig::default()
        },
        num_kv_blocks: 8,
        max_model_len: 32,
        model_name: "successor".into(),
    })?)
}

fn request(
    handle: &EngineHandle,
    id: &str,
    prompt: Vec<u32>,
    params: SamplingParams,
) -> Result<Vec<EngineEvent>> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    handle.submit(EngineRequest {
        id: id.into(),
        prompt_token_ids: prompt,
        params,
        arrival: Instant::now(),
        events: tx,
    })?;
    let mut events = Vec::new();
    while let Some(ev) = rx.blocking_recv() {
        events.push(ev);
    }
    Ok(events)
}

/// Polls the gauges until no block is used and nothing runs (5 s cap).
fn wait_idle(handle: &EngineHandle) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let load = handle.load();
        if load.kv_blocks_used == 0 && load.running == 0 && load.waiting == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(anyhow!("engine not idle after 5 s: {load:?}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn text_and_finish(events: &[EngineEvent]) -> (String, Option<(FinishReason, Option<String>)>) {
    let mut text = String::new();
    let mut finish = None;
    for ev in events {
        match ev {
            EngineEvent::Tokens(c) => text.push_str(&c.text),
            EngineEvent::Finished(f) => finish = Some((f.reason, f.stop_reason.clone())),
            EngineEvent::Failed(_) => {}
        }
    }
    (text, finish)
}

#[test]
fn failed_step_fails_its_requests_and_the_engine_keeps_serving() -> Result<()> {
    let handle = spawn()?;
    // Generating 11, 12, 13: the step that feeds 13 back fails.
    let events = request(&handle, "bad", vec![9, 10], SamplingParams::greedy(8))?;
    match events.last() {
        Some(EngineEvent::Failed(e)) => assert_eq!(e.kind, ErrorKind::Internal),
        other => return Err(anyhow!("expected Failed, got {other:?}")),
    }
    wait_idle(&handle)?; // the failed request's blocks are freed

    let events = request(&handle, "good", vec![1, 2], SamplingParams::greedy(4))?;
    let (text, finish) = text_and_finish(&events);
    assert_eq!(finish, Some((FinishReason::Length, None)));
    assert_eq!(
        text.split_whitespace().collect::<Vec<_>>(),
        ["w3", "w4", "w5", "w6"]
    );
    Ok(())
}

#[test]
fn stop_string_eos_and_min_tokens_follow_vllm_order() -> Result<()> {
    let handle = spawn()?;
    let stop = SamplingParams {
        stop: vec!["w5".into()],
        ..SamplingParams::greedy(8)
    };
    let (text, finish) = text_and_finish(&request(&handle, "s", vec![1, 2], stop)?);
    assert_eq!(finish, Some((FinishReason::Stop, Some("w5".into()))));
    assert_eq!(text.split_whitespace().collect::<Vec<_>>(), ["w3", "w4"]);

    // 14 -> 15 (EOS) -> stop; with min_tokens = 3 EOS is masked, so 0 follows 14 instead of 15.
    let (_, finish) = text_and_finish(&request(&handle, "e", vec![14], SamplingParams::greedy(8))?);
    assert_eq!(finish, Some((FinishReason::Stop, None)));
    let min = SamplingParams {
        min_tokens: 3,
        ..SamplingParams::greedy(3)
    };
    let events = request(&handle, "m", vec![14], min)?;
    let tokens: Vec<u32> = events
        .iter()
        .filter_map(|e| match e {
            EngineEvent::Tokens(c) => Some(c.token_ids.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert!(
        !tokens.contains(&15),
        "EOS sampled before min_tokens: {tokens:?}"
    );
    assert_eq!(tokens.len(), 3);
    wait_idle(&handle)
}
