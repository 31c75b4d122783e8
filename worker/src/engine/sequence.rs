//! A sequence as the scheduler sees it: its tokens and how many of them are in the KV cache.
//!
//! Sampling, detokenization and streaming state live in the engine loop, keyed by the same
//! [`SeqId`], so the scheduler stays model-free and is shared with the simulated engine.

use std::time::Instant;

/// Engine-internal id of a sequence; also its key in the block manager.
pub type SeqId = u64;

/// Where a sequence is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqStatus {
    /// Queued: never scheduled, or preempted and waiting to be recomputed.
    Waiting,
    /// Holds KV blocks and is scheduled every step until it finishes.
    Running,
}

/// One request's token state.
#[derive(Debug, Clone)]
pub struct Sequence {
    /// Key in the block manager and in the engine's request table.
    pub id: SeqId,
    /// Prompt followed by every generated token; a preempted sequence recomputes all of them.
    pub tokens: Vec<u32>,
    /// Length of the original prompt, so output can be told apart from input.
    pub prompt_len: usize,
    /// Tokens whose KV is in the cache (or is being computed by the current step).
    pub num_computed: usize,
    /// Prompt tokens served from the prefix cache the first time the sequence was scheduled.
    pub cached_tokens: u32,
    /// Times this sequence lost its blocks to preemption.
    pub num_preemptions: u32,
    /// Waiting or running.
    pub status: SeqStatus,
    /// When the sequence was first scheduled; `None` while it has never run.
    pub first_scheduled: Option<Instant>,
}

impl Sequence {
    /// A new waiting sequence for `prompt`.
    pub fn new(id: SeqId, prompt: Vec<u32>) -> Self {
        Self {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            num_computed: 0,
            cached_tokens: 0,
            num_preemptions: 0,
            status: SeqStatus::Waiting,
            first_scheduled: None,
        }
    }

    /// The prompt tokens.
    pub fn prompt(&self) -> &[u32] {
        &self.tokens[..self.prompt_len]
    }

    /// The generated tokens so far.
    pub fn output(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// Known tokens whose KV still has to be computed (1 for a decode).
    pub fn num_uncomputed(&self) -> usize {
        self.tokens.len() - self.num_computed
    }
}
