//! The paged KV store (PagedAttention, Kwon et al. SOSP 2023): per layer, K and V live in
//! fixed-size blocks of `block_size` token slots. The block manager decides which block ids a
//! sequence owns; the store only holds the numbers. It is owned by the engine and lent to the
//! model for each step, so layers stay `&self`.

/// Shape of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvStoreConfig {
    pub num_layers: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    /// `num_kv_heads * head_dim`.
    pub kv_dim: usize,
}

/// K and V for every layer, `[num_blocks * block_size, kv_dim]` each, on the CPU.
#[derive(Debug)]
pub struct KvStore {
    cfg: KvStoreConfig,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
}

impl KvStore {
    /// Allocates the whole pool up front so a running engine never allocates KV memory.
    pub fn new(cfg: KvStoreConfig) -> Self {
        let len = cfg.num_blocks * cfg.block_size * cfg.kv_dim;
        Self {
            cfg,
            keys: (0..cfg.num_layers).map(|_| vec![0.0; len]).collect(),
            values: (0..cfg.num_layers).map(|_| vec![0.0; len]).collect(),
        }
    }

    /// Number of blocks that fit in `bytes` for a model of this shape.
    pub fn blocks_for_bytes(
        bytes: usize,
        num_layers: usize,
        block_size: usize,
        kv_dim: usize,
    ) -> usize {
        let per_block = 2 * num_layers * block_size * kv_dim * std::mem::size_of::<f32>();
        bytes / per_block.max(1)
    }

    pub fn config(&self) -> KvStoreConfig {
        self.cfg
    }

    /// Writes one token's K and V (`kv_dim` floats each) of `layer` into `slot`.
    pub fn write(&mut self, layer: usize, slot: usize, k: &[f32], v: &[f32]) {
        let d = self.cfg.kv_dim;
        let at = slot * d;
        self.keys[layer][at..at + d].copy_from_slice(k);
        self.values[layer][at..at + d].copy_from_slice(v);
    }

    /// The K and V rows of one slot.
    pub fn slot(&self, layer: usize, slot: usize) -> (&[f32], &[f32]) {
        let d = self.cfg.kv_dim;
        let at = slot * d;
        (
            &self.keys[layer][at..at + d],
            &self.values[layer][at..at + d],
        )
    }

    /// The K row of one slot (`kv_dim` floats).
    #[inline]
    pub fn key(&self, layer: usize, slot: usize) -> &[f32] {
        let d = self.cfg.kv_dim;
        &self.keys[layer][slot * d..(slot + 1) * d]
    }

    /// The V row of one slot (`kv_dim` floats).
    #[inline]
    pub fn value(&self, layer: usize, slot: usize) -> &[f32] {
        let d = self.cfg.kv_dim;
        &self.values[layer][slot * d..(slot + 1) * d]
    }

    /// The K and V rows of `n` consecutive slots from `first` (one block's worth), each
    /// `kv_dim` floats, row after row.
    #[inline]
    pub fn rows(&self, layer: usize, first: usize, n: usize) -> (&[f32], &[f32]) {
        let d = self.cfg.kv_dim;
        let span = first * d..(first + n) * d;
        (&self.keys[layer][span.clone()], &self.values[layer][span])
    }

    /// Slot index of the `pos`-th token of a sequence with this block table.
    pub fn slot_of(&self, block_table: &[u32], pos: usize) -> Option<usize> {
        let bs = self.cfg.block_size;
        block_table
            .get(pos / bs)
            .map(|&b| b as usize * bs + pos % bs)
    }
}
