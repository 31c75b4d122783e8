//! Attention over the paged KV store (PagedAttention, Kwon et al. SOSP 2023), in two
//! implementations that must agree:
//!
//! - [`paged_attention`]: the CPU kernel. Each query token walks its sequence's block table one
//!   KV block at a time with an online (single-pass, FlashAttention-style) softmax, so no score
//!   matrix is materialised; the query heads that share a KV head (GQA) are processed together
//!   so each K/V row is read once per group; a causal offset (the token's absolute position)
//!   lets a prefill chunk see the tokens cached before it plus the chunk up to itself.
//! - [`attention_candle`]: the generic path built from candle ops (gather the sequence's
//!   blocks, `q k^T`, masked softmax, `· v`), which runs on any candle device (Metal, CUDA).

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::kv_store::KvStore;
use crate::engine::batch::StepBatch;
use crate::kernels::{vec, Isa};

/// Head layout of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct HeadLayout {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl HeadLayout {
    /// Query heads per KV head.
    fn group(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }
}

/// Tokens below this count run attention on the calling thread: rayon's hand-off costs more
/// than a decode step's attention for a handful of tokens.
const PARALLEL_MIN_TOKENS: usize = 4;

/// Computes attention for every token of `batch` in `layer` on the CPU.
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
    let owners = token_owners(batch);
    let isa = Isa::detect();
    let one = |t: usize, out_row: &mut [f32], q_row: &[f32]| {
        let Some(&s) = owners.get(t) else { return };
        let Some(&pos) = batch.positions.get(t) else {
            return;
        };
        let token = TokenQuery {
            q_row,
            table: &batch.seqs[s].block_table,
            ctx: pos as usize + 1,
        };
        attend_token(&token, out_row, kv, layer, heads, isa);
    };
    if owners.len() < PARALLEL_MIN_TOKENS {
        for (t, (o, q)) in out.chunks_mut(width).zip(q.chunks(width)).enumerate() {
            one(t, o, q);
        }
    } else {
        out.par_chunks_mut(width)
            .zip(q.par_chunks(width))
            .enumerate()
            .for_each(|(t, (o, q))| one(t, o, q));
    }
    out
}

/// Index into `batch.seqs` of every token of the step.
fn token_owners(batch: &StepBatch) -> Vec<usize> {
    let mut owners = vec![0usize; batch.num_tokens()];
    for (s, seq) in batch.seqs.iter().enumerate() {
        let start = seq.query_start as usize;
        let end = (start + seq.query_len as usize).min(owners.len());
        owners[start.min(end)..end].fill(s);
    }
    owners
}

/// One query token: its rotated query row, its sequence's block table, and how many positions
/// (its own included) it may attend to.
struct TokenQuery<'a> {
    q_row: &'a [f32],
    table: &'a [u32],
    ctx: usize,
}

/// Running softmax state of one query head.
struct HeadState {
    max: f32,
    sum: f32,
}

/// One token, all heads, online softmax over the KV blocks of its first `ctx` positions.
fn attend_token(
    token: &TokenQuery<'_>,
    out_row: &mut [f32],
    kv: &KvStore,
    layer: usize,
    heads: HeadLayout,
    isa: Isa,
) {
    let (d, group) = (heads.head_dim, heads.group());
    let bs = kv.config().block_size;
    let scale = 1.0 / (d as f32).sqrt();
    let mut scores = vec![0f32; group * bs];
    out_row.fill(0.0);
    for g in 0..heads.num_kv_heads {
        let qs = &token.q_row[g * group * d..(g + 1) * group * d];
        let acc = &mut out_row[g * group * d..(g + 1) * group * d];
        let mut state: Vec<HeadState> = (0..group)
            .map(|_| HeadState {
                max: f32::NEG_INFINITY,
                sum: 0.0,
            })
            .collect();
        for (bi, &block) in token.table.iter().enumerate() {
            let first = bi * bs;
            if first >= token.ctx {
                break;
            }
            let n = bs.min(token.ctx - first);
            let (keys, values) = kv.rows(layer, block as usize * bs, n);
            let rows = |data| vec::HeadRows {
                data,
                stride: heads.num_kv_heads * d,
                offset: g * d,
                n,
            };
            for h in 0..group {
                let s = &mut scores[h * bs..h * bs + n];
                vec::scores(isa, &qs[h * d..(h + 1) * d], rows(keys), scale, s);
            }
            for (h, st) in state.iter_mut().enumerate() {
                let s = &mut scores[h * bs..h * bs + n];
                let acc_h = &mut acc[h * d..(h + 1) * d];
                let block_max = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                let new_max = st.max.max(block_max);
                if st.max > f32::NEG_INFINITY && new_max > st.max {
                    let c = (st.max - new_max).exp();
                    acc_h.iter_mut().for_each(|a| *a *= c);
                    st.sum *= c;
                }
                st.max = new_max;
                for x in s.iter_mut() {
                    *x = (*x - new_max).exp();
                    st.sum += *x;
                }
                vec::weighted_sum(isa, acc_h, s, rows(values));
            }
        }
        for (h, st) in state.iter().enumerate() {
            let inv = if st.sum > 0.0 { 1.0 / st.sum } else { 0.0 };
            acc[h * d..(h + 1) * d].iter_mut().for_each(|a| *a *= inv);
        }
    }
}

/// The generic attention path from candle ops, for any device.
///
/// `q` is `[T, num_heads * head_dim]` on `device`; the K/V of the step's tokens must already be
/// in the store. For each sequence the cached K/V rows are gathered through the block table,
/// moved to `device`, and attention is a masked `softmax(q k^T / sqrt(d)) v`, where a query at
/// absolute position `p` sees positions `0..=p`. Returns `[T, num_heads * head_dim]`.
pub fn attention_candle(
    q: &Tensor,
    batch: &StepBatch,
    kv: &KvStore,
    layer: usize,
    heads: HeadLayout,
) -> candle_core::Result<Tensor> {
    let device = q.device();
    let (h, d) = (heads.num_heads, heads.head_dim);
    let mut outs = Vec::with_capacity(batch.seqs.len());
    for seq in &batch.seqs {
        let (start, len) = (seq.query_start as usize, seq.query_len as usize);
        if len == 0 {
            continue;
        }
        let positions = &batch.positions[start..start + len];
        let ctx = positions.iter().copied().max().unwrap_or(0) as usize + 1;
        let (k, v) = gather_kv(kv, layer, &seq.block_table, ctx, heads, device)?;
        let qs = q
            .narrow(0, start, len)?
            .reshape((len, h, d))?
            .transpose(0, 1)?;
        let att = (qs.contiguous()?.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?;
        let mask = causal_mask(positions, ctx, device)?;
        let att = att.broadcast_add(&mask)?;
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att.matmul(&v)?.transpose(0, 1)?.reshape((len, h * d))?;
        outs.push(y);
    }
    Tensor::cat(&outs, 0)
}

/// K and V of the first `ctx` positions, `[num_heads, ctx, head_dim]` each (KV heads repeated
/// for their query-head group).
fn gather_kv(
    kv: &KvStore,
    layer: usize,
    table: &[u32],
    ctx: usize,
    heads: HeadLayout,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let kv_dim = heads.num_kv_heads * heads.head_dim;
    let (mut ks, mut vs) = (
        Vec::with_capacity(ctx * kv_dim),
        Vec::with_capacity(ctx * kv_dim),
    );
    for p in 0..ctx {
        let Some(slot) = kv.slot_of(table, p) else {
            candle_core::bail!("block table covers {} positions, need {ctx}", p);
        };
        ks.extend_from_slice(kv.key(layer, slot));
        vs.extend_from_slice(kv.value(layer, slot));
    }
    let shape = (ctx, heads.num_kv_heads, heads.head_dim);
    let expand = |x: Vec<f32>| -> candle_core::Result<Tensor> {
        let t = Tensor::from_vec(x, shape, device)?.transpose(0, 1)?;
        let (kvh, c, dd) = (heads.num_kv_heads, ctx, heads.head_dim);
        t.unsqueeze(1)?
            .broadcast_as((kvh, heads.group(), c, dd))?
            .reshape((heads.num_heads, c, dd))
    };
    Ok((expand(ks)?, expand(vs)?))
}

/// `[len, ctx]` additive mask: 0 where key position <= the query's position, -inf elsewhere.
fn causal_mask(positions: &[u32], ctx: usize, device: &Device) -> candle_core::Result<Tensor> {
    let mask: Vec<f32> = positions
        .iter()
        .flat_map(|&p| {
            (0..ctx).map(move |j| {
                if j <= p as usize {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (positions.len(), ctx), device)?.unsqueeze(0)
}

#[cfg(test)]
mod tests;
