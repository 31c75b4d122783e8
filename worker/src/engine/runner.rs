//! The model side of an engine step: one forward pass over a flattened [`StepBatch`].
//!
//! The engine loop only sees [`ModelRunner`], so the same scheduler, sampler and streaming code
//! drive the real candle model ([`LlamaRunner`]) and the simulated engine (`sim`).

use super::batch::StepBatch;
use super::EngineError;
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
    /// The compute threads of this engine (`model.threads`). A whole step runs inside the
    /// pool, so the serial parts between kernels (norms, rope, attention of a decode token)
    /// run on a pool thread while its siblings spin for the next kernel: the engine thread
    /// just waits, instead of competing with spinning workers for the cores and paying a
    /// cross-thread hand-off for every one of the ~150 parallel kernels of a step.
    pool: rayon::ThreadPool,
}

impl LlamaRunner {
    /// Pairs a loaded model with a KV store sized for the engine's block pool, computing on
    /// `threads` threads (default: one per core).
    pub fn new(model: Llama, kv: KvStore, threads: Option<usize>) -> Result<Self, EngineError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.unwrap_or(0))
            .thread_name(|i| format!("orchard-compute-{i}"))
            .build()
            .map_err(|e| EngineError::Config(format!("model.threads: {e}")))?;
        Ok(Self { model, kv, pool })
    }
}

impl ModelRunner for LlamaRunner {
    fn execute(&mut self, batch: &StepBatch) -> Result<Vec<Vec<f32>>, EngineError> {
        if batch.num_tokens() == 0 {
            return Ok(Vec::new());
        }
        let Self { model, kv, pool } = self;
        pool.install(|| step(model, kv, batch))
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
