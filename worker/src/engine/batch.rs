//! The flattened step batch: every token scheduled in one engine step (prefill chunks and decode
//! tokens of many sequences) packed into one `[T]` list with per-token positions and KV slots,
//! plus per-sequence metadata. This is the contract between the scheduler and the model.

/// One sequence's share of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqSlice {
    /// Index of this sequence's first token in [`StepBatch::token_ids`].
    pub query_start: u32,
    /// Tokens of this sequence in the step (prefill chunk length, or 1 for decode).
    pub query_len: u32,
    /// Tokens in this sequence's KV cache once the step is done (cached + computed + new).
    pub context_len: u32,
    /// Physical KV block ids, in logical order; covers `context_len` tokens.
    pub block_table: Vec<u32>,
    /// Whether the LM head runs on this sequence's last row (false for a prefill chunk that
    /// does not reach the end of the prompt).
    pub needs_logits: bool,
}

/// Everything the model needs for one forward pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepBatch {
    pub token_ids: Vec<u32>,
    /// Absolute position of each token in its sequence.
    pub positions: Vec<u32>,
    /// KV slot of each token: `block_id * block_size + offset_in_block`.
    pub slot_mapping: Vec<u32>,
    pub seqs: Vec<SeqSlice>,
}

impl StepBatch {
    /// Number of tokens in the step.
    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }

    /// Number of sequences that get logits, i.e. rows of the model's output.
    pub fn num_logit_rows(&self) -> usize {
        self.seqs.iter().filter(|s| s.needs_logits).count()
    }
}
