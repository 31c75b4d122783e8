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

use super::kv_store::{KvPlanes, KvStore, KvView};
use crate::engine::batch::StepBatch;
use crate::kernels::vec::KvElem;
use crate::kernels::{buffer_prefix, team, vec, Isa};
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

/// Consecutive tokens of one sequence that a prefill task attends together: each K/V block is
/// brought into cache once for all of them (a long prompt's K/V does not fit in L2).
const QUERY_TILE: usize = 8;

/// From this many tokens a tile's scores read each block's keys transposed ([`vec::KeysT`]);
/// a tile of one token (a decode step's) keeps the per-key kernel, which needs no transpose.
/// Not tuned: the A/B that kept the transposed kernel ran 512-token prefills (tiles of
/// [`QUERY_TILE`] tokens).
const TRANSPOSE_MIN_TOKENS: usize = 2;

/// A step with fewer tokens (decode) spreads a token's attention over the compute team (see
/// [`attend_split`]) once the token covers this many (head, position) pairs; below it, the
/// team's hand-offs cost more than the work.
const PARALLEL_MIN_HEAD_POSITIONS: usize = 512;

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
    match kv.view() {
        KvView::F16(planes) => attention_cpu(q, batch, planes, layer, heads, out),
        KvView::F32(planes) => attention_cpu(q, batch, planes, layer, heads, out),
    }
}

/// [`paged_attention_into`] on a store of element type `T`.
fn attention_cpu<T: KvElem>(
    q: &[f32],
    batch: &StepBatch,
    kv: &KvPlanes<T>,
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
    // The query heads of KV head `g` for the tokens of `tile`, into their output slices.
    let attend_group = |tile: &mut [(TokenQuery<'_>, &mut [f32])], g: usize| {
        let first = g * heads.group();
        attend_heads(tile, first..first + heads.group(), kv, layer, heads, isa);
    };
    let (out_rows, rest) = out.split_at_mut(tokens * width);
    rest.fill(0.0);
    let group_width = heads.group() * d;
    if tokens >= PARALLEL_MIN_TOKENS {
        // One task per (tile of consecutive tokens of one sequence, KV head).
        let tiles = query_tiles(&owners[..tokens]);
        let kvh = heads.num_kv_heads;
        let mut units: Vec<Vec<&mut [f32]>> = (0..tiles.len() * kvh)
            .map(|_| Vec::with_capacity(QUERY_TILE))
            .collect();
        let mut tile = 0;
        for (t, row) in out_rows.chunks_mut(width).enumerate() {
            if tiles[tile].end <= t {
                tile += 1;
            }
            for (g, piece) in row.chunks_mut(group_width).enumerate() {
                units[tile * kvh + g].push(piece);
            }
        }
        team::for_each_mut(&mut units, |u, outs| {
            let (k, g) = (u / kvh, u % kvh);
            let mut tile = Vec::with_capacity(outs.len());
            for (t, o) in tiles[k].clone().zip(outs.drain(..)) {
                match query(t) {
                    Some(token) => tile.push((token, o)),
                    None => o.fill(0.0),
                }
            }
            attend_group(&mut tile, g);
        });
        return;
    }
    for (t, o) in out_rows.chunks_mut(width).enumerate() {
        let Some(token) = query(t) else {
            o.fill(0.0);
            continue;
        };
        match split_columns(d) {
            Some(cols) if token.ctx * heads.num_heads >= PARALLEL_MIN_HEAD_POSITIONS => {
                attend_split(&token, o, kv, layer, (heads, cols), isa)
            }
            _ => {
                for (g, og) in o.chunks_mut(group_width).enumerate() {
                    attend_group(&mut [(token, og)], g);
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

/// Runs of at most [`QUERY_TILE`] consecutive tokens with the same owner sequence, covering
/// `0..owners.len()` in order.
fn query_tiles(owners: &[usize]) -> Vec<std::ops::Range<usize>> {
    let mut tiles: Vec<std::ops::Range<usize>> = Vec::new();
    for (t, &s) in owners.iter().enumerate() {
        match tiles.last_mut() {
            Some(r) if owners[r.start] == s && r.len() < QUERY_TILE => r.end = t + 1,
            _ => tiles.push(t..t + 1),
        }
    }
    tiles
}

/// One query token: its rotated query row, its sequence's block table, and how many positions
/// (its own included) it may attend to.
#[derive(Clone, Copy)]
struct TokenQuery<'a> {
    q_row: &'a [f32],
    table: &'a [u32],
    ctx: usize,
}

/// Query heads `heads_range` (all in one KV head's group) of each token of `tile` (tokens of one
/// sequence), into that token's output slice (those heads' `head_dim`-wide slices, in order):
/// scores against the token's first `ctx` positions block by block, a softmax per head, then
/// the weighted sum of the value rows block by block. The tokens walk the blocks together, so
/// each K/V block is fetched into cache once for the whole tile, and the next block's rows are
/// prefetched while one is read (a decode step's K/V comes from memory: the weights streamed
/// through since the previous step have evicted it).
///
/// Two passes rather than an online softmax, so that each step is the operation candle's
/// reference runs (`q k^T`, `softmax_last_dim`, `p V`) in the same floating-point order (see
/// `kernels::vec`): the model's attention then gives candle's bits, however the heads and
/// tokens are spread over threads and tiles. Scores live in a per-thread buffer of
/// `tokens * heads * ctx` floats.
fn attend_heads<T: KvElem>(
    tile: &mut [(TokenQuery<'_>, &mut [f32])],
    heads_range: std::ops::Range<usize>,
    kv: &KvPlanes<T>,
    layer: usize,
    heads: HeadLayout,
    isa: Isa,
) {
    let Some(first_token) = tile.first() else {
        return;
    };
    let (d, nh) = (heads.head_dim, heads_range.len());
    let table = first_token.0.table;
    let span = tile.iter().map(|(t, _)| t.ctx).max().unwrap_or(0);
    let g = heads_range.start / heads.group();
    let bs = kv.block_size();
    let scale = 1.0 / (d as f32).sqrt();
    let rows = |data, n| vec::HeadRows {
        data,
        stride: heads.num_kv_heads * d,
        offset: g * d,
        n,
    };
    for (_, out) in tile.iter_mut() {
        out.fill(0.0);
    }
    // Of a block's `n` rows from position `first`, those a token with context `ctx` sees.
    let seen = |ctx: usize, first: usize, n: usize| (first < ctx).then(|| n.min(ctx - first));
    // A tile of several tokens reads each block's keys transposed (one transpose, then
    // sixteen keys a vector for every query row).
    let transposed = tile.len() >= TRANSPOSE_MIN_TOKENS && vec::KeysT::supported(isa, d);
    SCRATCH.with_borrow_mut(|Scratch { probs, keys_t }| {
        // Token `i`'s head `h` scores its first `ctx` positions in row `i * nh + h` (`span`
        // wide); every one of them is written below.
        let probs = buffer_prefix(probs, tile.len() * nh * span);
        let mut blocks = context_blocks(table, span, bs).peekable();
        while let Some((block, first, n)) = blocks.next() {
            let (keys, _) = kv.rows(layer, block * bs, n);
            if let Some(&(ahead, _, an)) = blocks.peek() {
                vec::prefetch_rows(rows(kv.rows(layer, ahead * bs, an).0, an), d);
            }
            if transposed {
                keys_t.fill(isa, rows(keys, n), d);
            }
            for ((token, _), p) in tile.iter().zip(probs.chunks_exact_mut(nh * span)) {
                let Some(n) = seen(token.ctx, first, n) else {
                    continue;
                };
                let qs = &token.q_row[heads_range.start * d..heads_range.end * d];
                let out = (&mut p[first..], span);
                if transposed {
                    keys_t.scores_heads(qs, n, scale, out);
                } else {
                    vec::scores_heads(isa, qs, d, rows(keys, n), scale, out);
                }
            }
        }
        for ((token, _), p) in tile.iter().zip(probs.chunks_exact_mut(nh * span)) {
            for p in p.chunks_exact_mut(span) {
                vec::softmax(isa, &mut p[..token.ctx]);
            }
        }
        let mut blocks = context_blocks(table, span, bs).peekable();
        while let Some((block, first, n)) = blocks.next() {
            let (_, values) = kv.rows(layer, block * bs, n);
            if let Some(&(ahead, _, an)) = blocks.peek() {
                vec::prefetch_rows(rows(kv.rows(layer, ahead * bs, an).1, an), d);
            }
            for ((token, out), p) in tile.iter_mut().zip(probs.chunks_exact(nh * span)) {
                let ctx = token.ctx;
                let Some(n) = seen(ctx, first, n) else {
                    continue;
                };
                if ctx == 2 && n == 2 {
                    for (p, acc) in p.chunks_exact(span).zip(out.chunks_exact_mut(d)) {
                        vec::weighted_pair(acc, [p[0], p[1]], rows(values, n));
                    }
                } else {
                    vec::weighted_sum_heads(isa, out, nh, (&p[first..], span), rows(values, n));
                }
            }
        }
    });
}

/// [`attend_heads`]' buffers, reused by every call on this thread (a prefill makes one call per
/// tile and KV head).
#[derive(Default)]
struct Scratch {
    /// Score rows.
    probs: Vec<f32>,
    /// The current block's keys, transposed.
    keys_t: vec::KeysT,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
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
fn attend_split<T: KvElem>(
    token: &TokenQuery<'_>,
    out: &mut [f32],
    kv: &KvPlanes<T>,
    layer: usize,
    (heads, cols): (HeadLayout, usize),
    isa: Isa,
) {
    let (d, ctx, nh, group) = (heads.head_dim, token.ctx, heads.num_heads, heads.group());
    let bs = kv.block_size();
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
        for (g, (s, qs)) in sc
            .chunks_exact_mut(group * bs)
            .zip(token.q_row.chunks_exact(group * d))
            .enumerate()
        {
            vec::scores_heads(isa, qs, d, rows(keys, g, 0, n), scale, (s, bs));
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
        for (bi, &(block, first, n)) in blocks.iter().enumerate() {
            let (_, values) = kv.rows(layer, block * bs, n);
            let v = rows(values, g, c * cols, n);
            if let Some(&(ahead, _, an)) = blocks.get(bi + 1) {
                vec::prefetch_rows(
                    rows(kv.rows(layer, ahead * bs, an).1, g, c * cols, an),
                    cols,
                );
            }
            let ps = &probs[g * group * ctx + first..];
            vec::weighted_sum_heads(isa, acc, group, (ps, ctx), v);
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
        kv.read_row(layer, slot, true, &mut ks);
        kv.read_row(layer, slot, false, &mut vs);
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
