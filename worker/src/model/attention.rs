//! CPU paged attention: each query token attends to its sequence's cached keys through the
//! block table, with an online (streaming) softmax, grouped-query heads and a causal offset so
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
    let mut max = vec![f32::NEG_INFINITY; heads.num_heads];
    let mut denom = vec![0.0f32; heads.num_heads];
    out_row.fill(0.0);
    for p in 0..ctx {
        let Some(slot) = kv.slot_of(table, p) else { break };
        let (k, v) = kv.slot(layer, slot);
        for h in 0..heads.num_heads {
            let g = h / group;
            let qh = &q_row[h * d..(h + 1) * d];
            let kh = &k[g * d..(g + 1) * d];
            let score = dot(qh, kh) * scale;
            let acc = &mut out_row[h * d..(h + 1) * d];
            let vh = &v[g * d..(g + 1) * d];
            if score > max[h] {
                let correction = (max[h] - score).exp();
                denom[h] *= correction;
                acc.iter_mut().for_each(|a| *a *= correction);
                max[h] = score;
            }
            let w = (score - max[h]).exp();
            denom[h] += w;
            acc.iter_mut().zip(vh).for_each(|(a, &x)| *a += w * x);
        }
    }
    for h in 0..heads.num_heads {
        if denom[h] > 0.0 {
            let inv = 1.0 / denom[h];
            out_row[h * d..(h + 1) * d].iter_mut().for_each(|a| *a *= inv);
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
