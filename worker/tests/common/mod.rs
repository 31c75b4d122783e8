//! Shared fixtures for the engine integration tests: an engine on the default model, request
//! helpers, and a poll for "the engine is idle and holds no KV blocks".

#![allow(dead_code)] // each test binary uses a different subset of these helpers

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use orchard_common::config::{EngineConfig, WorkerConfig};
use orchard_common::SamplingParams;
use orchard_worker::engine::api::{EngineEvent, EngineRequest, Finished};
use orchard_worker::engine::{load_model, EngineHandle};
use orchard_worker::model::gguf::default_model_path;
use orchard_worker::text::chat_template::Message;
use orchard_worker::text::frontend::TextFrontend;
use tokio::sync::mpsc::UnboundedReceiver;

/// Longest wait for an idle engine.
pub const IDLE_CAP: Duration = Duration::from_secs(30);

/// A running engine on the default model plus its text frontend.
pub struct TestEngine {
    pub handle: EngineHandle,
    pub frontend: TextFrontend,
}

/// Starts an engine on the default model with a small KV pool (tests need few blocks), after
/// `tweak` adjusts the engine config.
pub fn engine(tweak: impl FnOnce(&mut EngineConfig)) -> Result<TestEngine> {
    let mut cfg = WorkerConfig::default();
    cfg.model.path = default_model_path();
    cfg.engine.num_kv_blocks = Some(256);
    tweak(&mut cfg.engine);
    let (parts, frontend) = load_model(&cfg)?;
    Ok(TestEngine {
        handle: EngineHandle::spawn(parts)?,
        frontend,
    })
}

impl TestEngine {
    /// A user message rendered with the chat template and encoded.
    pub fn chat(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.frontend.encode_chat(&[Message {
            role: "user".into(),
            content: text.into(),
        }])?)
    }

    /// Submits a request and returns its event stream.
    pub fn submit(
        &self,
        id: &str,
        prompt: Vec<u32>,
        params: SamplingParams,
    ) -> Result<UnboundedReceiver<EngineEvent>> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.handle.submit(EngineRequest {
            id: id.into(),
            prompt_token_ids: prompt,
            params,
            arrival: Instant::now(),
            events: tx,
        })?;
        Ok(rx)
    }

    /// Runs one request to completion.
    pub fn run(&self, id: &str, prompt: Vec<u32>, params: SamplingParams) -> Result<Outcome> {
        collect(self.submit(id, prompt, params)?)
    }

    /// Polls the gauges until nothing runs or waits and no KV block is used. The engine frees
    /// within one step; the cap only bounds a hang, and is generous because a step on the
    /// shared 2-core CI machine can take seconds under load.
    pub fn wait_idle(&self) -> Result<()> {
        let deadline = Instant::now() + IDLE_CAP;
        loop {
            let load = self.handle.load();
            if load.kv_blocks_used == 0 && load.running == 0 && load.waiting == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("engine not idle after {IDLE_CAP:?}: {load:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Everything one request produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub tokens: Vec<u32>,
    pub text: String,
    pub chunks: usize,
    pub logprobs: Vec<orchard_worker::engine::api::TokenLogprobs>,
    pub finished: Finished,
}

/// Reads a stream to its `Finished` event.
pub fn collect(mut rx: UnboundedReceiver<EngineEvent>) -> Result<Outcome> {
    let (mut tokens, mut text, mut chunks, mut logprobs) =
        (Vec::new(), String::new(), 0, Vec::new());
    while let Some(event) = rx.blocking_recv() {
        match event {
            EngineEvent::Tokens(c) => {
                tokens.extend(c.token_ids);
                text.push_str(&c.text);
                logprobs.extend(c.logprobs);
                chunks += 1;
            }
            EngineEvent::Finished(finished) => {
                return Ok(Outcome {
                    tokens,
                    text,
                    chunks,
                    logprobs,
                    finished,
                })
            }
            EngineEvent::Failed(e) => bail!("request failed: {e}"),
        }
    }
    Err(anyhow!("stream ended without Finished"))
}

/// Greedy decoding of exactly `n` tokens (EOS ignored), so lengths do not depend on content.
pub fn greedy_fixed(n: u32) -> SamplingParams {
    SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(n)
    }
}

/// Eight user prompts of clearly different lengths.
pub const PROMPTS: [&str; 8] = [
    "Hi.",
    "What is the capital of France?",
    "Write a haiku about autumn leaves falling in a quiet forest.",
    "Explain in two sentences why the sky is blue during the day and red at sunset.",
    "List three fruits.",
    "You are a helpful assistant for a bakery. A customer asks which of your breads keeps \
     longest, how to store it, and whether it can be frozen. Answer briefly.",
    "Translate 'good morning' into Spanish.",
    "Describe the water cycle: evaporation, condensation, precipitation and collection, \
     giving one everyday example of each stage so that a ten year old could follow it.",
];
