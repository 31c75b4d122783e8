//! Attention over the paged KV store (PagedAttention, Kwon et al. SOSP 2023), in two
//! implementations that must agree:
//!
//! - [`paged_attention`]: the CPU kernel. Each query token walks its sequence's block table one
//!   KV block at a time, twice: scores, then (after a softmax per head) the weighted sum of
//!   values, each in candle's floating-point order so the result is the reference's bits; the
//!   query heads that share a KV head (GQA) are processed together so each K/V block is
//!   visited once per group; a causal offset (the token's absolute position) lets a prefill
//!   chunk see the tokens cached before it plus the chunk up to itself.
//! - [`attention_candle`]: the generic path built from candle ops (gather the sequence's
//!   blocks, `q k^T`, masked softmax, `· v`), which runs on any candle device (Metal, CUDA).

use super::kv_store::KvStore;
use crate::engine::batch::StepBatch;
use crate::kernels::{team, vec, Isa};
use candle_core::{Device, Tensor};

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

/// From this many tokens a step's attention is spread over the compute team one (token, KV
/// head) at a time, so the query heads of a GQA group share their K/V block visits.
const PARALLEL_MIN_TOKENS: usize = 4;

/// A step with fewer tokens (decode) spreads a token's attention over the compute team (see
/// [`attend_split`]) once the token covers this many (head, position) pairs; below it, the
/// team's hand-offs cost more than the work.
const PARALLEL_MIN_HEAD_POSITIONS: usize = 1024;

/// Value columns per task in [`attend_split`]'s weighted sums, the first of these that divides
/// the head dimension: whole 64-byte cache lines of a value row where possible, so no line is
/// read by two tasks.
const SPLIT_COLUMNS: [usize; 3] = [32, 16, 8];

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
    let mut out = vec![0.0f32; q.len()];
    paged_attention_into(q, batch, kv, layer, heads, &mut out);
    out
}

/// [`paged_attention`] into `out` (`q.len()` values, all written: rows of tokens outside the
/// batch are zero).
pub fn paged_attention_into(
    q: &[f32],
    batch: &StepBatch,
    kv: &KvStore,
    layer: usize,
    heads: HeadLayout,
    out: &mut [f32],
) {
    assert_eq!(out.len(), q.len(), "paged_attention: output length");
    let (width, d) = (heads.num_heads * heads.head_dim, heads.head_dim);
    let owners = token_owners(batch);
    let isa = Isa::detect();
    let tokens = owners.len().min(q.len() / width.max(1));
    let query = |t: usize| token_query(t, q, width, &owners, batch);
    // Heads `first..` of token `t` into `o` (those heads' slices of its output row).
    let unit = |t: usize, first: usize, o: &mut [f32]| {
        if let Some(token) = query(t) {
            attend_heads(&token, first..first + o.len() / d, o, kv, layer, heads, isa);
        }
    };
    // The query heads of KV head `u % num_kv_heads` of token `u / num_kv_heads`.
    let group_unit = |u: usize, o: &mut [f32]| {
        let kvh = heads.num_kv_heads;
        unit(u / kvh, (u % kvh) * heads.group(), o);
    };
    let (out_rows, rest) = out.split_at_mut(tokens * width);
    rest.fill(0.0);
    let group_width = heads.group() * d;
    if tokens >= PARALLEL_MIN_TOKENS {
        team::for_each_chunk_mut(out_rows, group_width, group_unit);
        return;
    }
    for (t, o) in out_rows.chunks_mut(width).enumerate() {
        match (query(t), split_columns(d)) {
            (Some(token), Some(cols))
                if token.ctx * heads.num_heads >= PARALLEL_MIN_HEAD_POSITIONS =>
            {
                attend_split(&token, o, kv, layer, (heads, cols), isa)
            }
            _ => {
                for (g, og) in o.chunks_mut(group_width).enumerate() {
                    unit(t, g * heads.group(), og);
                }
            }
        }
    }
}

/// Token `t`'s query: its row of `q`, its sequence's block table and its context length; `None`
/// for a token outside the batch.
fn token_query<'a>(
    t: usize,
    q: &'a [f32],
    width: usize,
    owners: &[usize],
    batch: &'a StepBatch,
) -> Option<TokenQuery<'a>> {
    let (&s, &pos) = (owners.get(t)?, batch.positions.get(t)?);
    Some(TokenQuery {
        q_row: q.get(t * width..(t + 1) * width)?,
        table: &batch.seqs.get(s)?.block_table,
        ctx: pos as usize + 1,
    })
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

/// Query heads `heads_range` of one token (all in one KV head's group), into `out` (those
/// heads' `head_dim`-wide slices, in order): scores against the token's first `ctx` positions
/// block by block, a softmax per head, then the weighted sum of the value rows block by block.
///
/// Two passes rather than an online softmax, so that each step is the operation candle's
/// reference runs (`q k^T`, `softmax_last_dim`, `p V`) in the same floating-point order (see
/// `kernels::vec`): the model's attention then gives candle's bits, however the heads and
/// tokens are spread over threads. Scores live in a buffer of `heads * ctx` floats.
fn attend_heads(
    token: &TokenQuery<'_>,
    heads_range: std::ops::Range<usize>,
    out: &mut [f32],
    kv: &KvStore,
    layer: usize,
    heads: HeadLayout,
    isa: Isa,
) {
    let (d, ctx) = (heads.head_dim, token.ctx);
    let g = heads_range.start / heads.group();
    let bs = kv.config().block_size;
    let scale = 1.0 / (d as f32).sqrt();
    out.fill(0.0);
    let qs = &token.q_row[heads_range.start * d..heads_range.end * d];
    let blocks = || context_blocks(token.table, ctx, bs);
    let rows = |data, n| vec::HeadRows {
        data,
        stride: heads.num_kv_heads * d,
        offset: g * d,
        n,
    };
    PROBS.with_borrow_mut(|probs| {
        // Every position `0..ctx` of every head gets its score below, so a reused buffer needs
        // no clearing.
        if probs.len() < heads_range.len() * ctx {
            probs.resize(heads_range.len() * ctx, 0.0);
        }
        let probs = &mut probs[..heads_range.len() * ctx];
        for (block, first, n) in blocks() {
            let (keys, _) = kv.rows(layer, block * bs, n);
            for (p, q) in probs.chunks_exact_mut(ctx).zip(qs.chunks_exact(d)) {
                vec::scores(isa, q, rows(keys, n), scale, &mut p[first..first + n]);
            }
        }
        for p in probs.chunks_exact_mut(ctx) {
            vec::softmax(isa, p);
        }
        for (block, first, n) in blocks() {
            let (_, values) = kv.rows(layer, block * bs, n);
            for (p, acc) in probs.chunks_exact(ctx).zip(out.chunks_exact_mut(d)) {
                if ctx == 2 && n == 2 {
                    vec::weighted_pair(acc, [p[0], p[1]], rows(values, n));
                } else {
                    vec::weighted_sum(isa, acc, &p[first..first + n], rows(values, n));
                }
            }
        }
    });
}

thread_local! {
    /// [`attend_heads`]' score rows, reused by every call on this thread (a prefill makes one
    /// call per token and KV head).
    static PROBS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Value columns per weighted-sum task of [`attend_split`] for head dimension `d`, if any
/// width fits.
fn split_columns(d: usize) -> Option<usize> {
    SPLIT_COLUMNS.into_iter().find(|&c| d.is_multiple_of(c))
}

/// The KV blocks holding a token's positions `0..ctx`: (block id, first position, rows).
fn context_blocks(
    table: &[u32],
    ctx: usize,
    bs: usize,
) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
    table
        .iter()
        .enumerate()
        .map(move |(bi, &block)| (block as usize, bi * bs))
        .take_while(move |&(_, first)| first < ctx)
        .map(move |(block, first)| (block, first, bs.min(ctx - first)))
}

/// One token's attention, all heads, spread over the compute team in three phases so that each
/// K and V byte is read once however many threads share the work (splitting by query head
/// would read a GQA group's K/V once per head, which at long contexts no longer comes from
/// cache): scores one task per KV block, a softmax per head, then weighted sums one task per
/// (KV head, `cols` value columns) for all the query heads of the group. The K and V rows a
/// task reads next are prefetched a block ahead (the cache of a long context comes from
/// memory). Every score, softmax and output element goes through the same operations in the
/// same order as in [`attend_heads`], so the result is the same bits.
fn attend_split(
    token: &TokenQuery<'_>,
    out: &mut [f32],
    kv: &KvStore,
    layer: usize,
    (heads, cols): (HeadLayout, usize),
    isa: Isa,
) {
    let (d, ctx, nh, group) = (heads.head_dim, token.ctx, heads.num_heads, heads.group());
    let bs = kv.config().block_size;
    let scale = 1.0 / (d as f32).sqrt();
    let blocks: Vec<_> = context_blocks(token.table, ctx, bs).collect();
    let rows = |data, g: usize, col: usize, n| vec::HeadRows {
        data,
        stride: heads.num_kv_heads * d,
        offset: g * d + col,
        n,
    };
    // Scores, block-major: `[block][head][bs]`.
    let mut scores = vec![0f32; blocks.len() * nh * bs];
    team::for_each_chunk_mut(&mut scores, nh * bs, |bi, sc| {
        let (block, _, n) = blocks[bi];
        let (keys, _) = kv.rows(layer, block * bs, n);
        // With two or more threads the next block is another task's: prefetch the one after.
        if let Some(&(ahead, _, an)) = blocks.get(bi + 2) {
            let (keys, _) = kv.rows(layer, ahead * bs, an);
            vec::prefetch_rows(rows(keys, 0, 0, an), heads.num_kv_heads * d);
        }
        for (h, (s, q)) in sc
            .chunks_exact_mut(bs)
            .zip(token.q_row.chunks_exact(d))
            .enumerate()
        {
            vec::scores(isa, q, rows(keys, h / group, 0, n), scale, &mut s[..n]);
        }
    });
    // Each head's row gathered in position order, then its softmax.
    let mut probs = vec![0f32; nh * ctx];
    team::for_each_chunk_mut(&mut probs, ctx, |h, p| {
        for (bi, &(_, first, n)) in blocks.iter().enumerate() {
            p[first..first + n].copy_from_slice(&scores[(bi * nh + h) * bs..][..n]);
        }
        vec::softmax(isa, p);
    });
    // Weighted sums: task `u` = (KV head `g`, columns `c * cols..`) for the group's heads.
    let chunks = d / cols;
    let mut parts = vec![0f32; heads.num_kv_heads * chunks * group * cols];
    team::for_each_chunk_mut(&mut parts, group * cols, |u, acc| {
        let (g, c) = (u / chunks, u % chunks);
        let mut ps: Vec<&[f32]> = Vec::with_capacity(group);
        for (bi, &(block, first, n)) in blocks.iter().enumerate() {
            let (_, values) = kv.rows(layer, block * bs, n);
            let v = rows(values, g, c * cols, n);
            if let Some(&(ahead, _, an)) = blocks.get(bi + 1) {
                vec::prefetch_rows(
                    rows(kv.rows(layer, ahead * bs, an).1, g, c * cols, an),
                    cols,
                );
            }
            ps.clear();
            ps.extend((0..group).map(|hi| &probs[(g * group + hi) * ctx + first..][..n]));
            vec::weighted_sum_heads(isa, acc, &ps, v);
        }
    });
    for (u, acc) in parts.chunks_exact(group * cols).enumerate() {
        let (g, c) = (u / chunks, u % chunks);
        for (hi, a) in acc.chunks_exact(cols).enumerate() {
            let h = g * group + hi;
            out[h * d + c * cols..][..cols].copy_from_slice(a);
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
