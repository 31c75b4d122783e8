//! The model side of an engine step: one forward pass over a flattened [`StepBatch`].
//!
//! The engine loop only sees [`ModelRunner`], so the same scheduler, sampler and streaming code
//! drive the real candle model ([`LlamaRunner`]) and the simulated engine (`sim`).

use super::batch::StepBatch;
use super::EngineError;
use crate::kernels::team::Team;
use crate::model::{KvStore, Llama};

/// One forward pass over a flattened step; implemented by the real model (LlamaRunner, which
/// owns the `Llama` and its paged `KvStore`) and by the simulated engine (`sim::SimRunner`).
pub trait ModelRunner: Send + 'static {
    /// Logits for every sequence of `batch` whose `needs_logits` is true, in `batch.seqs`
    /// order, each row `vocab_size()` long.
    fn execute(&mut self, batch: &StepBatch) -> Result<Vec<Vec<f32>>, EngineError>;
    /// Length of every logits row; also the bound on valid token ids.
    fn vocab_size(&self) -> usize;
}

/// The candle Llama plus the paged KV store it reads and writes; the store lives here (not in
/// the layers) so the engine thread owns all mutable state of a step.
pub struct LlamaRunner {
    model: Llama,
    kv: KvStore,
    /// The compute threads of this engine (`model.threads`). The engine thread runs the step
    /// and takes part in every parallel section; the other threads spin for the next section
    /// instead of sleeping between them (see [`Team`]).
    team: Team,
}

impl LlamaRunner {
    /// Pairs a loaded model with a KV store sized for the engine's block pool, computing on
    /// `threads` threads (default: one per core).
    pub fn new(model: Llama, kv: KvStore, threads: Option<usize>) -> Result<Self, EngineError> {
        let team = Team::new(threads.unwrap_or(0), "orchard-compute")
            .map_err(|e| EngineError::Config(format!("model.threads: {e}")))?;
        Ok(Self { model, kv, team })
    }
}

impl ModelRunner for LlamaRunner {
    fn execute(&mut self, batch: &StepBatch) -> Result<Vec<Vec<f32>>, EngineError> {
        if batch.num_tokens() == 0 {
            return Ok(Vec::new());
        }
        let Self { model, kv, team } = self;
        team.install(|| step(model, kv, batch))
    }

    fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }
}

/// One forward pass; returns the logits rows the batch asks for.
fn step(model: &Llama, kv: &mut KvStore, batch: &StepBatch) -> Result<Vec<Vec<f32>>, EngineError> {
    if batch.num_logit_rows() > 0 {
        let logits = model.forward(batch, kv)?;
        return logits
            .to_vec2::<f32>()
            .map_err(|e| EngineError::Runner(e.to_string()));
    }
    // A step made only of mid-prompt chunks still has to write its KV; the model always
    // projects at least one row, so ask for the last sequence's row and drop it.
    let mut with_row = batch.clone();
    if let Some(last) = with_row.seqs.last_mut() {
        last.needs_logits = true;
    }
    model.forward(&with_row, kv)?;
    Ok(Vec::new())
}
