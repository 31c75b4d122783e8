//! CPU paged attention: each query token attends to its sequence's cached keys through the
//! block table, grouped-query heads and a causal offset so
//! a prefill chunk sees the tokens cached before it plus the chunk tokens up to itself.

use rayon::prelude::*;

use super::kv_store::KvStore;
use crate::engine::batch::StepBatch;

/// Head layout of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct HeadLayout {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// Computes attention for every token of `batch` in `layer`.
///
/// `q` is `[T, num_heads * head_dim]` (rotary already applied); the K/V of the step's tokens
/// must already be written to the store. Returns `[T, num_heads * head_dim]`.
pub fn paged_attention(
    q: &[f32],
    batch: &StepBatch,
    kv: &KvStore,
    layer: usize,
    heads: HeadLayout,
) -> Vec<f32> {
    let width = heads.num_heads * heads.head_dim;
    let mut out = vec![0.0f32; q.len()];
    // Which sequence each token belongs to, and its absolute position.
    let mut owners = Vec::with_capacity(batch.num_tokens());
    for (s, seq) in batch.seqs.iter().enumerate() {
        for i in 0..seq.query_len as usize {
            owners.push((s, seq.query_start as usize + i));
        }
    }
    out.par_chunks_mut(width)
        .zip(q.par_chunks(width))
        .enumerate()
        .for_each(|(t, (out_row, q_row))| {
            let Some(&(s, _)) = owners.get(t) else { return };
            let seq = &batch.seqs[s];
            let pos = batch.positions[t] as usize;
            let table = &seq.block_table;
            attend_token(q_row, out_row, kv, layer, heads, table, pos + 1);
        });
    out
}

/// One token, all heads: attends to the first `ctx` positions of the sequence.
///
/// Softmax is taken in two passes (scores, then normalised weights times V), the same order
/// of operations as a dense `softmax(q k^T) v`, so results match the reference model's
/// rounding as closely as f32 allows.
fn attend_token(
    q_row: &[f32],
    out_row: &mut [f32],
    kv: &KvStore,
    layer: usize,
    heads: HeadLayout,
    table: &[u32],
    ctx: usize,
) {
    let d = heads.head_dim;
    let group = heads.num_heads / heads.num_kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let slots: Vec<usize> = (0..ctx).map_while(|p| kv.slot_of(table, p)).collect();
    let mut weights = vec![0.0f32; slots.len()];
    out_row.fill(0.0);
    for h in 0..heads.num_heads {
        let g = h / group;
        let qh = &q_row[h * d..(h + 1) * d];
        let mut max = f32::NEG_INFINITY;
        for (w, &slot) in weights.iter_mut().zip(&slots) {
            let (k, _) = kv.slot(layer, slot);
            *w = dot(qh, &k[g * d..(g + 1) * d]) * scale;
            max = max.max(*w);
        }
        let mut sum = 0.0f32;
        for w in weights.iter_mut() {
            *w = (*w - max).exp();
            sum += *w;
        }
        let acc = &mut out_row[h * d..(h + 1) * d];
        for (w, &slot) in weights.iter().zip(&slots) {
            let p = w / sum;
            let (_, v) = kv.slot(layer, slot);
            acc.iter_mut()
                .zip(&v[g * d..(g + 1) * d])
                .for_each(|(a, &x)| *a += p * x);
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
