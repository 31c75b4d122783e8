//! The paged KV store (PagedAttention, Kwon et al. SOSP 2023): per layer, K and V live in
//! fixed-size blocks of `block_size` token slots. The block manager decides which block ids a
//! sequence owns; the store only holds the numbers. It is owned by the engine and lent to the
//! model for each step, so layers stay `&self`.
//!
//! The numbers are `f16` or `f32` ([`KvCacheDType`]): K and V are rounded to the store's type
//! when written and widened back to `f32` exactly when read, so every attention path sees the
//! same values.

use half::f16;
pub use orchard_common::config::KvCacheDType;

use crate::kernels::vec::KvElem;
use crate::kernels::weights;

/// Shape of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvStoreConfig {
    pub num_layers: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    /// `num_kv_heads * head_dim`.
    pub kv_dim: usize,
    pub dtype: KvCacheDType,
}

/// K and V of every layer in one element type, `[num_blocks * block_size, kv_dim]` each.
#[derive(Debug)]
pub struct KvPlanes<T> {
    kv_dim: usize,
    block_size: usize,
    keys: Vec<Vec<T>>,
    values: Vec<Vec<T>>,
}

impl<T: KvElem> KvPlanes<T> {
    fn new(cfg: &KvStoreConfig) -> Self {
        let len = cfg.num_blocks * cfg.block_size * cfg.kv_dim;
        let planes = || {
            (0..cfg.num_layers)
                .map(|_| weights::filled(len, T::default()))
                .collect()
        };
        Self {
            kv_dim: cfg.kv_dim,
            block_size: cfg.block_size,
            keys: planes(),
            values: planes(),
        }
    }

    fn write(&mut self, layer: usize, slot: usize, k: &[f32], v: &[f32]) {
        let at = slot * self.kv_dim..(slot + 1) * self.kv_dim;
        let put = |dst: &mut [T], src: &[f32]| {
            dst.iter_mut()
                .zip(src)
                .for_each(|(d, &s)| *d = T::from_f32(s));
        };
        put(&mut self.keys[layer][at.clone()], k);
        put(&mut self.values[layer][at], v);
    }

    /// Token slots per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The K and V rows of `n` consecutive slots from `first` (one block's worth), each
    /// `kv_dim` values, row after row.
    #[inline]
    pub fn rows(&self, layer: usize, first: usize, n: usize) -> (&[T], &[T]) {
        let span = first * self.kv_dim..(first + n) * self.kv_dim;
        (&self.keys[layer][span.clone()], &self.values[layer][span])
    }
}

#[derive(Debug)]
enum Planes {
    F16(KvPlanes<f16>),
    F32(KvPlanes<f32>),
}

/// The store's K and V in their element type, for kernels generic over it.
#[derive(Debug, Clone, Copy)]
pub enum KvView<'a> {
    F16(&'a KvPlanes<f16>),
    F32(&'a KvPlanes<f32>),
}

/// K and V for every layer, on the CPU.
#[derive(Debug)]
pub struct KvStore {
    cfg: KvStoreConfig,
    planes: Planes,
}

impl KvStore {
    /// Allocates the whole pool up front and writes it (zeros, in huge pages where the OS
    /// allows), so a running engine never allocates KV memory: a worker that cannot hold its
    /// pool fails when it starts, not in the middle of a request, and no step pays for the
    /// first touch of fresh pages. Left to fault in lazily, a 128-token prefill on the default
    /// model wrote about 1,400 new pages of the pool (30 layers x K and V x 128 x 768 bytes);
    /// engine prefill in that case took 69-72 ms against 67-69 ms for the same step on a
    /// touched pool.
    pub fn new(cfg: KvStoreConfig) -> Self {
        let planes = match cfg.dtype {
            KvCacheDType::F16 => Planes::F16(KvPlanes::new(&cfg)),
            KvCacheDType::F32 => Planes::F32(KvPlanes::new(&cfg)),
        };
        Self { cfg, planes }
    }

    /// Number of blocks that fit in `bytes` for a model of this shape.
    pub fn blocks_for_bytes(
        bytes: usize,
        num_layers: usize,
        block_size: usize,
        kv_dim: usize,
        dtype: KvCacheDType,
    ) -> usize {
        let per_block = 2 * num_layers * block_size * kv_dim * dtype.size();
        bytes / per_block.max(1)
    }

    pub fn config(&self) -> KvStoreConfig {
        self.cfg
    }

    /// The K and V planes in their element type.
    pub fn view(&self) -> KvView<'_> {
        match &self.planes {
            Planes::F16(p) => KvView::F16(p),
            Planes::F32(p) => KvView::F32(p),
        }
    }

    /// Writes one token's K and V (`kv_dim` floats each) of `layer` into `slot`, rounded to
    /// the store's element type.
    pub fn write(&mut self, layer: usize, slot: usize, k: &[f32], v: &[f32]) {
        match &mut self.planes {
            Planes::F16(p) => p.write(layer, slot, k, v),
            Planes::F32(p) => p.write(layer, slot, k, v),
        }
    }

    /// Appends the K row (`key`) or V row of one slot to `out`, as `f32`.
    pub fn read_row(&self, layer: usize, slot: usize, key: bool, out: &mut Vec<f32>) {
        fn read<T: KvElem>(p: &KvPlanes<T>, layer: usize, slot: usize, key: bool) -> &[T] {
            let (k, v) = p.rows(layer, slot, 1);
            if key {
                k
            } else {
                v
            }
        }
        match self.view() {
            KvView::F16(p) => out.extend(read(p, layer, slot, key).iter().map(|x| x.to_f32())),
            KvView::F32(p) => out.extend_from_slice(read(p, layer, slot, key)),
        }
    }

    /// Slot index of the `pos`-th token of a sequence with this block table.
    pub fn slot_of(&self, block_table: &[u32], pos: usize) -> Option<usize> {
        let bs = self.cfg.block_size;
        block_table
            .get(pos / bs)
            .map(|&b| b as usize * bs + pos % bs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dtype: KvCacheDType) -> KvStore {
        KvStore::new(KvStoreConfig {
            num_layers: 2,
            num_blocks: 3,
            block_size: 4,
            kv_dim: 8,
            dtype,
        })
    }

    /// K: steps of 1/3, which f16 must round. V: a value under f16's normal range, one beyond
    /// its largest finite value, and ordinary ones.
    fn rows() -> (Vec<f32>, Vec<f32>) {
        let k = (0..8).map(|i| 0.5 + i as f32 / 3.0).collect();
        (k, vec![1e-5, -70000.0, 0.1, 2.0, -3.0, 4.5, 1.0 / 3.0, 0.0])
    }

    /// Writes `rows()` into `slot` of `layer` and reads them back as f32.
    fn round_trip(kv: &mut KvStore, layer: usize, slot: usize) -> (Vec<f32>, Vec<f32>) {
        let (k, v) = rows();
        kv.write(layer, slot, &k, &v);
        let (mut k2, mut v2) = (Vec::new(), Vec::new());
        kv.read_row(layer, slot, true, &mut k2);
        kv.read_row(layer, slot, false, &mut v2);
        (k2, v2)
    }

    #[test]
    fn f32_store_reads_back_what_was_written() {
        let mut kv = store(KvCacheDType::F32);
        assert_eq!(round_trip(&mut kv, 1, 9), rows());
        // Other slots and layers untouched.
        let mut other = Vec::new();
        kv.read_row(0, 9, true, &mut other);
        kv.read_row(1, 8, false, &mut other);
        assert!(other.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn f16_store_rounds_to_nearest_f16_and_reads_back_exactly() {
        let mut kv = store(KvCacheDType::F16);
        let (k2, v2) = round_trip(&mut kv, 0, 11);
        let (k, v) = rows();
        let rounded =
            |x: &[f32]| -> Vec<f32> { x.iter().map(|&x| f16::from_f32(x).to_f32()).collect() };
        assert_eq!(k2, rounded(&k));
        assert_ne!(k2, k, "1/3 steps are not f16 values");
        // Beyond f16's range: its largest finite value, not infinity.
        assert_eq!(v2[1], -65504.0);
        assert_eq!(v2[..1], rounded(&v)[..1]);
        assert_eq!(v2[2..], rounded(&v)[2..]);
        // The typed view gives the same stored values.
        match kv.view() {
            KvView::F16(p) => {
                let (keys, _) = p.rows(0, 11, 1);
                assert_eq!(keys.iter().map(|x| x.to_f32()).collect::<Vec<_>>(), k2);
            }
            KvView::F32(_) => panic!("an f16 store viewed as f32"),
        }
    }

    #[test]
    fn an_f16_pool_holds_twice_the_blocks() {
        let blocks = |dtype| KvStore::blocks_for_bytes(512 << 20, 30, 16, 192, dtype);
        // 30 layers x 16 slots x 192 values x K and V.
        assert_eq!(
            blocks(KvCacheDType::F32),
            (512 << 20) / (2 * 30 * 16 * 192 * 4)
        );
        assert_eq!(
            blocks(KvCacheDType::F16),
            (512 << 20) / (2 * 30 * 16 * 192 * 2)
        );
    }
}
