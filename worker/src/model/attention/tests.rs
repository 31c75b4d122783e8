//! The CPU kernel and the candle-op path must agree on random data: several sequences of
//! different lengths in one step, decode tokens and a prefill chunk on top of cached tokens,
//! with the cache in either element type (both paths read the same stored values).

use super::*;
use crate::engine::batch::SeqSlice;
use crate::model::kv_store::KvCacheDType;
use crate::model::KvStoreConfig;

/// Every test runs on both cache element types.
const DTYPES: [KvCacheDType; 2] = [KvCacheDType::F32, KvCacheDType::F16];

const HEADS: HeadLayout = HeadLayout {
    num_heads: 6,
    num_kv_heads: 2,
    head_dim: 16,
};
const BLOCK: usize = 4;

/// Deterministic values in [-1, 1).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next() * 2.0).collect()
    }
}

/// A sequence in the step: its block table, positions already cached, tokens this step.
struct Seq {
    table: Vec<u32>,
    cached: usize,
    new: usize,
}

/// [`setup`] for one sequence on `table` with `cached` positions cached and `new` in the step,
/// K/V drawn from seed `seed`.
fn one_seq(
    table: &[u32],
    cached: usize,
    new: usize,
    seed: u64,
    dtype: KvCacheDType,
) -> (KvStore, StepBatch) {
    let seq = Seq {
        table: table.to_vec(),
        cached,
        new,
    };
    setup(&[seq], &mut Lcg(seed), dtype)
}

/// Fills the store with random K/V for every position of every sequence and builds the step.
fn setup(seqs: &[Seq], rng: &mut Lcg, dtype: KvCacheDType) -> (KvStore, StepBatch) {
    let kv_dim = HEADS.num_kv_heads * HEADS.head_dim;
    let blocks = seqs
        .iter()
        .flat_map(|s| s.table.iter())
        .max()
        .map_or(0, |&b| b + 1);
    let mut kv = KvStore::new(KvStoreConfig {
        num_layers: 2,
        num_blocks: (blocks as usize).max(32),
        block_size: BLOCK,
        kv_dim,
        dtype,
    });
    let mut batch = StepBatch::default();
    for s in seqs {
        let total = s.cached + s.new;
        for p in 0..total {
            let slot = kv.slot_of(&s.table, p).expect("table covers sequence");
            kv.write(1, slot, &rng.vec(kv_dim), &rng.vec(kv_dim));
        }
        batch.seqs.push(SeqSlice {
            query_start: batch.token_ids.len() as u32,
            query_len: s.new as u32,
            context_len: total as u32,
            block_table: s.table.clone(),
            needs_logits: true,
        });
        for p in s.cached..total {
            batch.token_ids.push(0);
            batch.positions.push(p as u32);
            let slot = kv.slot_of(&s.table, p).expect("table covers sequence");
            batch.slot_mapping.push(slot as u32);
        }
    }
    (kv, batch)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn cpu_kernel_matches_candle_ops_on_mixed_step() -> candle_core::Result<()> {
    for dtype in DTYPES {
        mixed_step(dtype)?;
    }
    Ok(())
}

fn mixed_step(dtype: KvCacheDType) -> candle_core::Result<()> {
    let mut rng = Lcg(7);
    let seqs = [
        // decode at position 37 (10 blocks, scattered)
        Seq {
            table: vec![9, 3, 17, 0, 21, 5, 30, 11, 2, 14],
            cached: 37,
            new: 1,
        },
        // prefill chunk of 9 tokens on top of 13 cached, not block aligned
        Seq {
            table: vec![4, 25, 1, 19, 8, 27],
            cached: 13,
            new: 9,
        },
        // first chunk of a fresh prompt
        Seq {
            table: vec![6, 12],
            cached: 0,
            new: 5,
        },
        // decode at position 0
        Seq {
            table: vec![31],
            cached: 0,
            new: 1,
        },
    ];
    let (kv, batch) = setup(&seqs, &mut rng, dtype);
    let width = HEADS.num_heads * HEADS.head_dim;
    let q = rng.vec(batch.num_tokens() * width);
    let ours = paged_attention(&q, &batch, &kv, 1, HEADS);
    let qt = Tensor::from_vec(q.clone(), (batch.num_tokens(), width), &Device::Cpu)?;
    let generic = attention_candle(&qt, &batch, &kv, 1, HEADS)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    assert_eq!(ours.len(), generic.len());
    let diff = max_abs_diff(&ours, &generic);
    assert!(diff < 1e-5, "{dtype:?}: cpu vs candle: max abs diff {diff}");
    Ok(())
}

/// Decode tokens (one query per sequence, up to 256 positions, where candle's `q k^T` runs
/// gemm's horizontal kernel): the CPU kernel gives the candle path's bits, not just its values,
/// whether the step is spread over the pool by (token, KV head), by (token, query head), or
/// not at all.
#[test]
fn decode_tokens_equal_candle_ops_bit_for_bit() -> candle_core::Result<()> {
    // Spread per (token, KV head); split in three phases (plus a short one done per group);
    // on the calling thread.
    let steps: [&[usize]; 3] = [&[1, 2, 3, 17, 33, 90, 256], &[2, 200, 256], &[5, 9]];
    for (i, (contexts, dtype)) in steps
        .into_iter()
        .flat_map(|c| DTYPES.map(|d| (c, d)))
        .enumerate()
    {
        let mut rng = Lcg(11 + i as u64);
        let mut next_block = 0u32;
        let seqs: Vec<Seq> = contexts
            .iter()
            .map(|&ctx| {
                let n = ctx.div_ceil(BLOCK) as u32;
                // Blocks in reverse order, so the table is really followed.
                let table = (next_block..next_block + n).rev().collect();
                next_block += n;
                Seq {
                    table,
                    cached: ctx - 1,
                    new: 1,
                }
            })
            .collect();
        let (kv, batch) = setup(&seqs, &mut rng, dtype);
        let width = HEADS.num_heads * HEADS.head_dim;
        let q = rng.vec(batch.num_tokens() * width);
        let ours = paged_attention(&q, &batch, &kv, 1, HEADS);
        let qt = Tensor::from_vec(q, (batch.num_tokens(), width), &Device::Cpu)?;
        let generic = attention_candle(&qt, &batch, &kv, 1, HEADS)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for (t, (a, b)) in ours.chunks(width).zip(generic.chunks(width)).enumerate() {
            let ctx = batch.positions[t] + 1;
            assert_eq!(a, b, "{dtype:?}: token {t} (context {ctx})");
        }
    }
    Ok(())
}

#[test]
fn chunked_prefill_equals_whole_prefill() {
    for dtype in DTYPES {
        chunked_prefill(dtype);
    }
}

fn chunked_prefill(dtype: KvCacheDType) {
    let table = vec![7, 2, 11, 5, 0, 9];
    let (total, split) = (21usize, 12usize);
    let (kv, batch) = one_seq(&table, 0, total, 3, dtype);
    let width = HEADS.num_heads * HEADS.head_dim;
    let q = Lcg(99).vec(total * width);
    let all = paged_attention(&q, &batch, &kv, 1, HEADS);
    // Same K/V (same seed), second chunk only: tokens split..total on top of `split` cached.
    let (kv2, batch2) = one_seq(&table, split, total - split, 3, dtype);
    let tail = paged_attention(&q[split * width..], &batch2, &kv2, 1, HEADS);
    assert_eq!(max_abs_diff(&tail, &all[split * width..]), 0.0);
    // And a token that sees only itself returns its own V row exactly.
    let slot = kv.slot_of(&batch.seqs[0].block_table, 0).expect("slot 0");
    let mut v0 = Vec::new();
    kv.read_row(1, slot, false, &mut v0);
    let d = HEADS.head_dim;
    for h in 0..HEADS.num_heads {
        let g = h / (HEADS.num_heads / HEADS.num_kv_heads);
        let diff = max_abs_diff(&all[h * d..(h + 1) * d], &v0[g * d..(g + 1) * d]);
        assert!(diff < 1e-6, "{dtype:?}: head {h}: {diff}");
    }
}

#[test]
fn a_prefill_token_gets_the_bits_it_gets_alone() {
    for dtype in DTYPES {
        prefill_token_alone(dtype);
    }
}

fn prefill_token_alone(dtype: KvCacheDType) {
    // A 21-token prefill runs in tiles of `QUERY_TILE` tokens; each token alone (one-token
    // step on top of its cached prefix, same K/V) must give the same bits.
    let table = vec![7, 2, 11, 5, 0, 9];
    let total = 21usize;
    let (kv, batch) = one_seq(&table, 0, total, 5, dtype);
    let width = HEADS.num_heads * HEADS.head_dim;
    let q = Lcg(77).vec(total * width);
    let all = paged_attention(&q, &batch, &kv, 1, HEADS);
    for t in [0usize, 3, 4, 13, 20] {
        let (kv1, batch1) = one_seq(&table, t, 1, 5, dtype);
        let alone = paged_attention(&q[t * width..(t + 1) * width], &batch1, &kv1, 1, HEADS);
        assert_eq!(
            alone,
            &all[t * width..(t + 1) * width],
            "{dtype:?}: token {t}"
        );
    }
}

#[test]
fn query_tiles_split_runs_of_one_sequence() {
    // One token more than a tile of sequence 0, then two of sequence 1 and one of 2.
    let qt = QUERY_TILE;
    let mut owners = vec![0; qt + 1];
    owners.extend([1, 1, 2]);
    assert_eq!(
        query_tiles(&owners),
        vec![0..qt, qt..qt + 1, qt + 1..qt + 3, qt + 3..qt + 4]
    );
    assert!(query_tiles(&[]).is_empty());
}
