//! KV-cache block manager with vLLM v1 semantics (PagedAttention block tables plus automatic
//! prefix caching).
//!
//! References: vLLM `vllm/v1/core/kv_cache_manager.py`, `block_pool.py` and `kv_cache_utils.py`.
//!
//! * A fixed pool of `num_blocks` blocks of `block_size` tokens, ref-counted so sequences that
//!   share a cached prefix share its blocks.
//! * Full blocks are hashed as a chain (see [`super::hash`]) and registered in a hash -> block map.
//! * Free blocks sit in an LRU [`FreeQueue`]; a free block keeps its hash and stays a cache-hit
//!   candidate until allocation reuses it ("evicted only on reuse").
//!
//! Ownership: the manager is owned by the single engine thread, so it takes `&mut self` and owns
//! every sequence's block table, keyed by sequence id. Freeing is an explicit, idempotent
//! [`BlockManager::free`] rather than a `Drop` on a per-sequence handle (the STYLE.md habit):
//! a handle would need shared access to the pool (`Rc<RefCell>`), and since the manager holds
//! every table, nothing can leak as long as the engine frees finished sequences by id.
//!
//! Unlike vLLM there is no reserved "null block"; every block id in `0..num_blocks` is usable.

use std::collections::HashMap;

use thiserror::Error;

use super::free_queue::FreeQueue;
use super::hash::{hash_block_tokens, BlockHash};

/// Sizing and behaviour of the block pool, fixed for the engine's lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockManagerConfig {
    /// Number of KV blocks the device memory holds; the hard limit on concurrent tokens.
    pub num_blocks: u32,
    /// Tokens per block; the granularity of allocation and of prefix-cache hits.
    pub block_size: u32,
    /// Whether full blocks are hashed and reused across sequences.
    pub enable_prefix_caching: bool,
}

/// Failures the scheduler must react to (preempt, wait, reject), classified here once.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum KvError {
    /// Not enough free blocks; nothing was changed, so the scheduler can retry later or preempt.
    #[error("need {needed} free KV blocks, only {free} available")]
    NoFreeBlocks {
        /// Blocks the request would have taken.
        needed: u32,
        /// Blocks free at the time of the call.
        free: u32,
    },
    /// The configuration cannot describe a usable pool.
    #[error("invalid block manager config: {0}")]
    InvalidConfig(&'static str),
    /// `get_computed_blocks` was called for a sequence that already has a block table.
    #[error("sequence {0} already has a block table")]
    SeqAlreadyExists(u64),
    /// `reset_prefix_cache` needs every block free, or running sequences would lose consistency.
    #[error("cannot reset prefix cache while {0} blocks are in use")]
    BlocksInUse(u32),
}

/// Prefix-cache counters, in tokens, for hit-rate metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// Sequences looked up.
    pub requests: u64,
    /// Prompt tokens looked up.
    pub queries: u64,
    /// Prompt tokens served from cache.
    pub hits: u64,
}

/// Per-block metadata; the KV data itself lives in the paged KV store, indexed by block id.
#[derive(Debug, Clone, Copy, Default)]
struct Block {
    /// Sequences currently using the block; 0 means it is in the free queue.
    ref_cnt: u32,
    /// Set while the block is registered in the prefix-cache map.
    hash: Option<BlockHash>,
}

/// One sequence's allocation.
#[derive(Debug, Clone, Default)]
struct SeqBlocks {
    /// Block ids in token order: the block table handed to the attention kernel.
    blocks: Vec<u32>,
    /// Chain hashes of the leading full blocks already processed by `cache_full_blocks`.
    hashes: Vec<BlockHash>,
    /// Extra keys mixed into every block hash of this sequence (LoRA id, cache salt, ...).
    extra_keys: Vec<u64>,
}

/// Owns the KV block pool, per-sequence block tables and the prefix cache.
#[derive(Debug)]
pub struct BlockManager {
    cfg: BlockManagerConfig,
    blocks: Vec<Block>,
    free_queue: FreeQueue,
    cached: HashMap<BlockHash, u32>,
    seqs: HashMap<u64, SeqBlocks>,
    stats: PrefixCacheStats,
}

impl BlockManager {
    /// Builds an empty pool; fails on a zero block size or an empty pool, which could never
    /// serve a token.
    pub fn new(cfg: BlockManagerConfig) -> Result<Self, KvError> {
        if cfg.block_size == 0 {
            return Err(KvError::InvalidConfig("block_size must be > 0"));
        }
        if cfg.num_blocks == 0 || cfg.num_blocks == u32::MAX {
            return Err(KvError::InvalidConfig("num_blocks must be in 1..u32::MAX"));
        }
        Ok(Self {
            cfg,
            blocks: vec![Block::default(); cfg.num_blocks as usize],
            free_queue: FreeQueue::new(cfg.num_blocks),
            cached: HashMap::new(),
            seqs: HashMap::new(),
            stats: PrefixCacheStats::default(),
        })
    }

    /// Tokens per block, so callers can size slot mappings.
    pub fn block_size(&self) -> u32 {
        self.cfg.block_size
    }

    /// Free blocks (including cached-but-free ones, which are reclaimable).
    pub fn num_free_blocks(&self) -> u32 {
        self.free_queue.len() as u32
    }

    /// Blocks referenced by at least one sequence.
    pub fn num_used_blocks(&self) -> u32 {
        self.cfg.num_blocks - self.num_free_blocks()
    }

    /// Fraction of the pool in use, in `[0, 1]`, for the KV-usage gauge and admission control.
    pub fn usage(&self) -> f64 {
        f64::from(self.num_used_blocks()) / f64::from(self.cfg.num_blocks)
    }

    /// Prefix-cache counters accumulated since start (or the last reset).
    pub fn prefix_cache_stats(&self) -> PrefixCacheStats {
        self.stats
    }

    /// The sequence's block table; empty for an unknown or freed sequence.
    pub fn block_table(&self, seq_id: u64) -> &[u32] {
        self.seqs.get(&seq_id).map_or(&[], |s| s.blocks.as_slice())
    }

    /// Starts a sequence: finds the longest chain of cached full blocks for its prompt, takes a
    /// reference on each and returns the number of cached tokens. Hits are capped at
    /// `prompt.len() - 1` tokens (rounded down to whole blocks) so at least one prompt token is
    /// computed and produces logits. `extra_keys` are mixed into every block hash of the
    /// sequence. Call once, when the sequence is first scheduled.
    pub fn get_computed_blocks(
        &mut self,
        seq_id: u64,
        prompt: &[u32],
        extra_keys: &[u64],
    ) -> Result<u32, KvError> {
        if self.seqs.contains_key(&seq_id) {
            return Err(KvError::SeqAlreadyExists(seq_id));
        }
        let mut seq = SeqBlocks {
            extra_keys: extra_keys.to_vec(),
            ..SeqBlocks::default()
        };
        if self.cfg.enable_prefix_caching {
            self.take_cached_prefix(&mut seq, prompt);
        }
        let cached_tokens = seq.blocks.len() as u32 * self.cfg.block_size;
        self.seqs.insert(seq_id, seq);
        Ok(cached_tokens)
    }

    /// Walks the prompt's hash chain and takes references on hit blocks, updating stats.
    fn take_cached_prefix(&mut self, seq: &mut SeqBlocks, prompt: &[u32]) {
        let bs = self.cfg.block_size as usize;
        let max_blocks = prompt.len().saturating_sub(1) / bs;
        let mut parent = None;
        for chunk in prompt.chunks_exact(bs).take(max_blocks) {
            let h = hash_block_tokens(parent, chunk, &seq.extra_keys);
            let Some(&id) = self.cached.get(&h) else {
                break;
            };
            self.touch(id);
            seq.blocks.push(id);
            seq.hashes.push(h);
            parent = Some(h);
        }
        self.stats.requests += 1;
        self.stats.queries += prompt.len() as u64;
        self.stats.hits += (seq.blocks.len() * bs) as u64;
    }

    /// Takes a reference on a block, pulling it out of the free queue if nobody held it.
    fn touch(&mut self, id: u32) {
        let block = &mut self.blocks[id as usize];
        if block.ref_cnt == 0 {
            self.free_queue.remove(id);
        }
        block.ref_cnt += 1;
    }

    /// Ensures the sequence's table covers `total_tokens` tokens, allocating from the head of
    /// the free queue (evicting cached-but-free blocks). On `NoFreeBlocks` nothing changes, so
    /// the scheduler can preempt and retry. An unknown sequence is started with no cached prefix.
    pub fn allocate_slots(&mut self, seq_id: u64, total_tokens: u32) -> Result<(), KvError> {
        let have = self.block_table(seq_id).len() as u32;
        let want = total_tokens.div_ceil(self.cfg.block_size);
        let needed = want.saturating_sub(have);
        let free = self.num_free_blocks();
        if needed > free {
            return Err(KvError::NoFreeBlocks { needed, free });
        }
        let mut new_blocks = Vec::with_capacity(needed as usize);
        for _ in 0..needed {
            new_blocks.push(self.pop_free_block());
        }
        self.seqs
            .entry(seq_id)
            .or_default()
            .blocks
            .extend(new_blocks);
        Ok(())
    }

    /// Pops the LRU free block and evicts its cached hash, since its contents will be overwritten.
    fn pop_free_block(&mut self) -> u32 {
        let id = self
            .free_queue
            .popleft()
            .expect("invariant: caller checked the free queue has enough blocks");
        let block = &mut self.blocks[id as usize];
        if let Some(h) = block.hash.take() {
            if self.cached.get(&h) == Some(&id) {
                self.cached.remove(&h);
            }
        }
        block.ref_cnt = 1;
        id
    }

    /// Hashes and registers the sequence's newly full blocks, given all its tokens so far
    /// (prompt plus generated). Only blocks both full in `tokens` and allocated are cached.
    /// If an identical block is already registered, the existing entry is kept and this block
    /// stays private (it is simply not a hit candidate).
    pub fn cache_full_blocks(&mut self, seq_id: u64, tokens: &[u32]) {
        if !self.cfg.enable_prefix_caching {
            return;
        }
        let bs = self.cfg.block_size as usize;
        let Some(seq) = self.seqs.get_mut(&seq_id) else {
            return;
        };
        let num_full = (tokens.len() / bs).min(seq.blocks.len());
        for idx in seq.hashes.len()..num_full {
            let parent = seq.hashes.last().copied();
            let h = hash_block_tokens(parent, &tokens[idx * bs..(idx + 1) * bs], &seq.extra_keys);
            seq.hashes.push(h);
            let id = seq.blocks[idx];
            let block = &mut self.blocks[id as usize];
            if block.hash.is_none() && !self.cached.contains_key(&h) {
                block.hash = Some(h);
                self.cached.insert(h, id);
            }
        }
    }

    /// Releases the sequence's blocks. Blocks go to the free-queue tail in reverse table order,
    /// so a sequence's tail blocks (least likely to be shared) are evicted before its prefix.
    /// Idempotent: freeing an unknown or already-freed sequence does nothing.
    pub fn free(&mut self, seq_id: u64) {
        let Some(seq) = self.seqs.remove(&seq_id) else {
            return;
        };
        for &id in seq.blocks.iter().rev() {
            let block = &mut self.blocks[id as usize];
            block.ref_cnt = block.ref_cnt.saturating_sub(1);
            if block.ref_cnt == 0 {
                self.free_queue.append(id);
            }
        }
    }

    /// Drops every cached hash (e.g. after a weight reload makes cached KV stale). Only allowed
    /// when no block is in use, as in vLLM; resets the hit-rate counters too.
    pub fn reset_prefix_cache(&mut self) -> Result<(), KvError> {
        let used = self.num_used_blocks();
        if used > 0 {
            return Err(KvError::BlocksInUse(used));
        }
        self.cached.clear();
        for block in &mut self.blocks {
            block.hash = None;
        }
        self.stats = PrefixCacheStats::default();
        Ok(())
    }
}

#[cfg(test)]
mod tests;
