//! Iteration-level scheduling (Orca, OSDI 2022) with vLLM v1's unified token budget.
//!
//! Every step the scheduler walks the running sequences first (decodes and continuing prefill
//! chunks), then admits waiting ones, until the step's token budget
//! (`max_num_batched_tokens`) or the running cap (`max_num_seqs`) is reached. A prompt longer
//! than the remaining budget is chunked across steps. When the block pool cannot hold a running
//! sequence's next tokens, the newest running sequence is preempted by recompute: its blocks
//! are freed, its generated tokens kept, and it is requeued at the front of the waiting queue
//! to be prefilled again (prompt + output) later. References: vLLM `v1/core/sched/scheduler.py`.

use std::collections::VecDeque;
use std::time::Instant;

use orchard_common::config::EngineConfig;

use super::batch::{SeqSlice, StepBatch};
use super::sequence::{SeqId, SeqStatus, Sequence};
use crate::kv::{BlockManager, BlockManagerConfig, KvError, PrefixCacheStats};

/// Limits the scheduler enforces, fixed for the engine's lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Cap on sequences holding KV blocks and scheduled each step.
    pub max_num_seqs: u32,
    /// Token budget of one step: prefill chunks plus decodes.
    pub max_num_batched_tokens: u32,
    /// Sizing of the KV block pool the scheduler allocates from.
    pub blocks: BlockManagerConfig,
}

impl SchedulerConfig {
    /// The scheduler limits of an engine config with a pool of `num_kv_blocks` blocks.
    pub fn from_engine(cfg: &EngineConfig, num_kv_blocks: u32) -> Self {
        Self {
            max_num_seqs: cfg.max_num_seqs,
            max_num_batched_tokens: cfg.max_num_batched_tokens,
            blocks: BlockManagerConfig {
                num_blocks: num_kv_blocks,
                block_size: cfg.block_size,
                enable_prefix_caching: cfg.enable_prefix_caching,
            },
        }
    }
}

/// One sequence's share of a step, in the same order as `StepBatch::seqs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub id: SeqId,
    /// Tokens of this sequence computed by the step.
    pub num_new_tokens: u32,
    /// Whether the step produces logits for it (its chunk reaches the end of its tokens), i.e.
    /// whether the engine samples a token for it after the step.
    pub needs_logits: bool,
}

/// What one call to [`Scheduler::schedule`] decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchedulerOutput {
    /// The flattened step for the model.
    pub batch: StepBatch,
    /// Per-sequence view of the batch.
    pub scheduled: Vec<ScheduledSeq>,
    /// Sequences preempted this step (now at the front of the waiting queue).
    pub preempted: Vec<SeqId>,
}

impl SchedulerOutput {
    /// True when nothing was scheduled (nothing to run, or nothing fits).
    pub fn is_empty(&self) -> bool {
        self.scheduled.is_empty()
    }
}

/// A planned chunk: sequence, first token index, token count.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    id: SeqId,
    start: usize,
    len: usize,
}

/// Owns the waiting queue, the running set and the KV block manager.
#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    kv: BlockManager,
    /// FIFO of sequences to admit; preempted sequences go to the front.
    waiting: VecDeque<Sequence>,
    /// Running sequences in admission order: the last one is the newest (first to preempt).
    running: Vec<Sequence>,
    /// Preemptions since start, for the engine gauges.
    preemptions: u64,
}

impl Scheduler {
    /// A scheduler with an empty block pool of the configured size.
    pub fn new(cfg: SchedulerConfig) -> Result<Self, KvError> {
        Ok(Self {
            kv: BlockManager::new(cfg.blocks)?,
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
            preemptions: 0,
        })
    }

    /// Queues a new sequence at the back of the waiting queue.
    pub fn add(&mut self, mut seq: Sequence) {
        seq.status = SeqStatus::Waiting;
        self.waiting.push_back(seq);
    }

    /// Removes a sequence wherever it is (waiting or running) and frees its blocks; used for
    /// aborts, failures and finished sequences alike.
    pub fn remove(&mut self, id: SeqId) -> Option<Sequence> {
        self.kv.free(id);
        if let Some(i) = self.running.iter().position(|s| s.id == id) {
            return Some(self.running.remove(i));
        }
        let i = self.waiting.iter().position(|s| s.id == id)?;
        self.waiting.remove(i)
    }

    /// The sequence with this id, waiting or running.
    pub fn get(&self, id: SeqId) -> Option<&Sequence> {
        self.running
            .iter()
            .chain(self.waiting.iter())
            .find(|s| s.id == id)
    }

    /// Appends a sampled token to a running sequence; its KV is computed next step.
    pub fn append_token(&mut self, id: SeqId, token: u32) {
        if let Some(seq) = self.running.iter_mut().find(|s| s.id == id) {
            seq.tokens.push(token);
        }
    }

    /// Sequences holding blocks.
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Sequences queued (new or preempted).
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// True while any sequence is waiting or running.
    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    /// Preemptions since start.
    pub fn num_preemptions(&self) -> u64 {
        self.preemptions
    }

    /// Blocks referenced by some sequence.
    pub fn kv_blocks_used(&self) -> u32 {
        self.kv.num_used_blocks()
    }

    /// Prefix-cache counters of the block manager.
    pub fn prefix_cache_stats(&self) -> PrefixCacheStats {
        self.kv.prefix_cache_stats()
    }

    /// The configuration in force.
    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Plans one step: running sequences first, then waiting ones, within the token budget and
    /// the running cap, preempting the newest running sequences when blocks run out. Marks the
    /// planned tokens as computed; a failed step must remove the scheduled sequences.
    pub fn schedule(&mut self, now: Instant) -> SchedulerOutput {
        let mut budget = self.cfg.max_num_batched_tokens as usize;
        let mut plan = Vec::new();
        let mut preempted = Vec::new();
        self.schedule_running(&mut budget, &mut plan, &mut preempted);
        if preempted.is_empty() {
            self.schedule_waiting(&mut budget, &mut plan, now);
        }
        let (batch, scheduled) = self.build_batch(&plan);
        SchedulerOutput {
            batch,
            scheduled,
            preempted,
        }
    }

    /// Registers the full blocks computed by a successful step in the prefix cache. Call after
    /// the step ran, so a failed step never publishes blocks with unwritten KV.
    pub fn on_step_done(&mut self, out: &SchedulerOutput) {
        for s in &out.scheduled {
            if let Some(seq) = self.running.iter().find(|q| q.id == s.id) {
                self.kv
                    .cache_full_blocks(seq.id, &seq.tokens[..seq.num_computed]);
            }
        }
    }

    fn schedule_running(
        &mut self,
        budget: &mut usize,
        plan: &mut Vec<Chunk>,
        preempted: &mut Vec<SeqId>,
    ) {
        let mut i = 0;
        while i < self.running.len() && *budget > 0 {
            let seq = &self.running[i];
            let chunk = Chunk {
                id: seq.id,
                start: seq.num_computed,
                len: seq.num_uncomputed().min(*budget),
            };
            if chunk.len == 0 {
                i += 1;
                continue;
            }
            if !self.allocate_or_preempt(chunk, preempted) {
                break;
            }
            self.running[i].num_computed += chunk.len;
            *budget -= chunk.len;
            plan.push(chunk);
            i += 1;
        }
    }

    /// Allocates slots for `chunk`, preempting the newest running sequences until it fits.
    /// Returns false when the chunk's own sequence had to be preempted.
    fn allocate_or_preempt(&mut self, chunk: Chunk, preempted: &mut Vec<SeqId>) -> bool {
        let total = (chunk.start + chunk.len) as u32;
        while self.kv.allocate_slots(chunk.id, total).is_err() {
            let Some(victim) = self.running.pop() else {
                return false;
            };
            let victim_id = victim.id;
            self.preempt(victim);
            preempted.push(victim_id);
            if victim_id == chunk.id {
                return false;
            }
        }
        true
    }

    /// Frees a running sequence's blocks and requeues it at the front for recompute.
    fn preempt(&mut self, mut seq: Sequence) {
        self.kv.free(seq.id);
        seq.num_computed = 0;
        seq.num_preemptions += 1;
        seq.status = SeqStatus::Waiting;
        self.preemptions += 1;
        self.waiting.push_front(seq);
    }

    fn schedule_waiting(&mut self, budget: &mut usize, plan: &mut Vec<Chunk>, now: Instant) {
        let max_seqs = self.cfg.max_num_seqs as usize;
        while *budget > 0 && self.running.len() < max_seqs {
            let Some(seq) = self.waiting.front() else {
                break;
            };
            let id = seq.id;
            // A waiting sequence holds no blocks; make sure of it before the lookup.
            self.kv.free(id);
            let cached = match self.kv.get_computed_blocks(id, &seq.tokens, &[]) {
                Ok(c) => c as usize,
                Err(_) => 0,
            };
            let len = (seq.tokens.len() - cached).min(*budget);
            if self.kv.allocate_slots(id, (cached + len) as u32).is_err() {
                self.kv.free(id);
                break;
            }
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            if seq.first_scheduled.is_none() {
                seq.first_scheduled = Some(now);
                seq.cached_tokens = cached as u32;
            }
            seq.num_computed = cached + len;
            seq.status = SeqStatus::Running;
            self.running.push(seq);
            *budget -= len;
            plan.push(Chunk {
                id,
                start: cached,
                len,
            });
        }
    }

    fn build_batch(&self, plan: &[Chunk]) -> (StepBatch, Vec<ScheduledSeq>) {
        let bs = self.cfg.blocks.block_size as usize;
        let mut batch = StepBatch::default();
        let mut scheduled = Vec::with_capacity(plan.len());
        for chunk in plan {
            let Some(seq) = self.running.iter().find(|s| s.id == chunk.id) else {
                continue;
            };
            let table = self.kv.block_table(chunk.id).to_vec();
            let end = chunk.start + chunk.len;
            let query_start = batch.token_ids.len() as u32;
            batch
                .token_ids
                .extend_from_slice(&seq.tokens[chunk.start..end]);
            for pos in chunk.start..end {
                batch.positions.push(pos as u32);
                batch
                    .slot_mapping
                    .push(table[pos / bs] * bs as u32 + (pos % bs) as u32);
            }
            let needs_logits = end == seq.tokens.len();
            batch.seqs.push(SeqSlice {
                query_start,
                query_len: chunk.len as u32,
                context_len: end as u32,
                block_table: table,
                needs_logits,
            });
            scheduled.push(ScheduledSeq {
                id: chunk.id,
                num_new_tokens: chunk.len as u32,
                needs_logits,
            });
        }
        (batch, scheduled)
    }
}

#[cfg(test)]
mod tests;
