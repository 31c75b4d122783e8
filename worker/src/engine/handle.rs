//! The cheap, cloneable handle the async side holds; the engine thread owns everything else.
//!
//! Submissions and aborts go to the engine thread over a channel; the gauges come back through
//! shared memory updated every step, so `load()` never waits for a step to finish.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use orchard_common::OrchardError;

use super::api::{EngineRequest, LoadSnapshot};
use super::core::{Command, EngineCore};
use super::scheduler::{Scheduler, SchedulerConfig};
use super::{EngineError, EngineInfo, EngineParts};

/// State shared between the engine thread and its handles.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// Gauges as of the last step; `waiting` excludes requests still in the channel.
    gauges: Mutex<LoadSnapshot>,
    /// Requests submitted but not yet taken off the channel by the engine thread.
    pending: AtomicU32,
}

impl Shared {
    /// Replaces the gauges (engine thread, once per step).
    pub(crate) fn publish(&self, snapshot: LoadSnapshot) {
        let mut g = self.gauges.lock().unwrap_or_else(|e| e.into_inner());
        *g = snapshot;
    }

    /// Marks one submitted request as received by the engine thread.
    pub(crate) fn received(&self) {
        // Saturating: never underflows even if a send raced with a failed submit.
        let _ = self
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| p.checked_sub(1));
    }

    fn snapshot(&self) -> LoadSnapshot {
        let mut s = *self.gauges.lock().unwrap_or_else(|e| e.into_inner());
        s.waiting += self.pending.load(Ordering::Acquire);
        s
    }
}

/// Talks to the engine thread. Clones share the same engine; the thread stops once every
/// handle is dropped and the requests in flight have finished.
#[derive(Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    info: Arc<EngineInfo>,
    max_waiting: u32,
}

impl EngineHandle {
    /// Starts the engine loop on its own OS thread.
    pub fn spawn(parts: EngineParts) -> Result<EngineHandle, EngineError> {
        let info = Arc::new(EngineInfo {
            model_name: parts.model_name.clone(),
            max_model_len: parts.max_model_len,
            vocab_size: parts.runner.vocab_size() as u32,
            block_size: parts.config.block_size,
            num_kv_blocks: parts.num_kv_blocks,
            max_num_seqs: parts.config.max_num_seqs,
            eos_token_ids: parts.eos_token_ids.clone(),
        });
        let scheduler = Scheduler::new(SchedulerConfig::from_engine(
            &parts.config,
            parts.num_kv_blocks,
        ))?;
        let shared = Arc::new(Shared::default());
        let (tx, rx) = mpsc::channel();
        let max_waiting = parts.config.max_waiting;
        let core = EngineCore::new(parts, scheduler, rx, Arc::clone(&shared));
        core.publish_gauges();
        std::thread::Builder::new()
            .name("orchard-engine".into())
            .spawn(move || core.run())?;
        Ok(EngineHandle {
            commands: tx,
            shared,
            info,
            max_waiting,
        })
    }

    /// Queues a request (api.rs EngineRequest: id, prompt_token_ids, params, arrival, events
    /// sender). Err(INVALID_ARGUMENT) if the prompt is empty, holds an id outside the
    /// vocabulary, or prompt + max_tokens exceeds max_model_len or the KV pool; Err(
    /// RESOURCE_EXHAUSTED) if the waiting queue is full; Err(UNAVAILABLE) if the engine stopped.
    pub fn submit(&self, req: EngineRequest) -> Result<(), OrchardError> {
        self.validate(&req)?;
        if self.load().waiting >= self.max_waiting {
            return Err(OrchardError::exhausted(format!(
                "engine queue full ({} waiting requests)",
                self.max_waiting
            )));
        }
        self.shared.pending.fetch_add(1, Ordering::AcqRel);
        self.commands.send(Command::Submit(req)).map_err(|_| {
            self.shared.received();
            OrchardError::unavailable("engine stopped")
        })
    }

    fn validate(&self, req: &EngineRequest) -> Result<(), OrchardError> {
        let prompt_len = req.prompt_token_ids.len() as u64;
        if prompt_len == 0 {
            return Err(OrchardError::invalid("prompt: must not be empty"));
        }
        req.params.validate()?;
        let info = &self.info;
        if let Some(&bad) = req.prompt_token_ids.iter().find(|&&t| t >= info.vocab_size) {
            return Err(OrchardError::invalid(format!(
                "prompt: token id {bad} is outside the vocabulary ({} tokens)",
                info.vocab_size
            )));
        }
        let total = prompt_len + u64::from(req.params.max_tokens);
        if total > u64::from(info.max_model_len) {
            return Err(OrchardError::invalid(format!(
                "prompt ({prompt_len} tokens) + max_tokens ({}) exceeds max_model_len ({})",
                req.params.max_tokens, info.max_model_len
            )));
        }
        let capacity = u64::from(info.num_kv_blocks) * u64::from(info.block_size);
        if total > capacity {
            return Err(OrchardError::invalid(format!(
                "prompt ({prompt_len} tokens) + max_tokens ({}) exceeds the KV cache ({capacity} tokens)",
                req.params.max_tokens
            )));
        }
        Ok(())
    }

    /// Aborts a request by id at any point; its stream gets Finished{reason: Abort}; blocks are
    /// freed. Unknown or finished ids are ignored.
    pub fn abort(&self, request_id: &str) {
        // A stopped engine has nothing left to abort.
        let _ = self.commands.send(Command::Abort(request_id.to_string()));
    }

    /// Latest gauges, without a round trip to the engine thread (updated every step).
    pub fn load(&self) -> LoadSnapshot {
        self.shared.snapshot()
    }

    /// Static facts about the engine and its model.
    pub fn info(&self) -> &EngineInfo {
        &self.info
    }
}
