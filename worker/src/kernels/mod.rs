//! CPU kernels: SIMD quantized matrix products (Q4_1 and Q8_0 weights against activations
//! quantized once per call) and the small f32 vector helpers attention uses.
//!
//! Every kernel picks its instruction set once per call by runtime feature detection (AVX2 +
//! FMA on x86-64; where the CPU also has them, AVX-512 VNNI for the Q4_1 integer core and
//! AVX-512F for `expf`, each giving the same bits as the AVX2 path) and falls back to portable
//! scalar code elsewhere, so the crate builds and runs correctly on any target, including the
//! Apple Silicon hosts that use the `metal` feature.

pub mod q4_1;
pub mod q8_0;
pub mod team;
pub mod vec;
pub mod weights;

/// Which inner-product implementation to use; chosen by CPU feature detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Portable Rust, any target.
    Scalar,
    /// x86-64 with AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Isa {
    /// The best instruction set this CPU supports (the answer is cached by `std`).
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            return Isa::Avx2;
        }
        Isa::Scalar
    }
}

/// Shape of one row-parallel matrix product `out[t, n_out] = x[t, k] @ W[n_out, k]^T`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowsJob {
    pub n_out: usize,
    pub t: usize,
    /// Bytes of weights per output row, to size tasks.
    pub row_bytes: usize,
}

/// Tokens per tile in a multi-token product: the tile's quantized activations (16 rows of at
/// most a few KiB) stay in L1 while a task's weight rows stream past them.
pub(crate) const TOKEN_TILE: usize = 16;

/// A block of a row-parallel product handed to one task: weight rows `rows` against tokens
/// `tokens`.
#[derive(Debug, Clone)]
pub(crate) struct Tile {
    pub rows: std::ops::Range<usize>,
    pub tokens: std::ops::Range<usize>,
}

/// Where a tile's products go: for each token of the tile, its output columns `tile.rows`
/// (a piece of that token's output row, written in place).
pub(crate) struct TileOut<'o, 'r> {
    pub tile: Tile,
    tokens: &'o mut [&'r mut [f32]],
}

impl TileOut<'_, '_> {
    /// Token `ti`'s output columns `tile.rows`.
    #[inline]
    pub fn row_mut(&mut self, ti: usize) -> &mut [f32] {
        self.tokens[ti - self.tile.tokens.start]
    }

    /// Tokens `ti..ti + C`'s output columns for weight rows `rows` (inside the tile), one
    /// slice per token, so a kernel can store a group of rows for several tokens in place.
    #[inline]
    pub fn columns_mut<const C: usize>(
        &mut self,
        ti: usize,
        rows: &std::ops::Range<usize>,
    ) -> [&mut [f32]; C] {
        let at = rows.start - self.tile.rows.start;
        let mut tokens = self.tokens[ti - self.tile.tokens.start..]
            .iter_mut()
            .map(|t| &mut t[at..at + rows.len()]);
        std::array::from_fn(|_| tokens.next().expect("invariant: C tokens left in the tile"))
    }

    /// Stores the products of weight rows `r..r + values.len()` with token `ti`.
    #[inline]
    pub fn put(&mut self, r: usize, ti: usize, values: &[f32]) {
        let at = r - self.tile.rows.start;
        self.tokens[ti - self.tile.tokens.start][at..at + values.len()].copy_from_slice(values);
    }
}

/// Fills `out[t, n_out]` by calling `tile(out)` for contiguous runs of weight rows and tiles of
/// tokens. Weight rows are spread over the compute team so each weight byte is read from
/// memory once per call, however many tokens the step holds; each task writes its own columns
/// of every token's output row in place, so nothing is copied or transposed afterwards.
pub(crate) fn par_rows<F>(job: RowsJob, out: &mut [f32], tile: F)
where
    F: Fn(TileOut<'_, '_>) + Sync,
{
    let RowsJob { n_out, t, .. } = job;
    assert_eq!(out.len(), t * n_out, "par_rows: out length");
    if t == 0 || n_out == 0 {
        return;
    }
    let chunk = row_chunk(job);
    if t == 1 {
        team::for_each_chunk_mut(out, chunk, |ci, o| {
            let r0 = ci * chunk;
            let rows = r0..r0 + o.len();
            tile(TileOut {
                tile: Tile { rows, tokens: 0..1 },
                tokens: &mut [o],
            });
        });
        return;
    }
    // Task `ci` owns columns `ci * chunk..` of every token's row.
    let mut pieces: Vec<Vec<&mut [f32]>> = (0..n_out.div_ceil(chunk))
        .map(|_| Vec::with_capacity(t))
        .collect();
    for row in out.chunks_mut(n_out) {
        for (task, piece) in pieces.iter_mut().zip(row.chunks_mut(chunk)) {
            task.push(piece);
        }
    }
    team::for_each_mut(&mut pieces, |ci, columns| {
        let r0 = ci * chunk;
        let rows = r0..r0 + columns.first().map_or(0, |c| c.len());
        for t0 in (0..t).step_by(TOKEN_TILE) {
            let tokens = t0..(t0 + TOKEN_TILE).min(t);
            tile(TileOut {
                tile: Tile {
                    rows: rows.clone(),
                    tokens: tokens.clone(),
                },
                tokens: &mut columns[tokens],
            });
        }
    });
}

/// The first `n` values of a reusable buffer, which grows (zero-filled) when it is shorter;
/// callers overwrite all of them, so a reused buffer needs no clearing.
pub(crate) fn buffer_prefix(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if buf.len() < n {
        buf.resize(n, 0.0);
    }
    &mut buf[..n]
}

/// Activation rows from which per-row work (quantization, norms, RoPE, SwiGLU) runs on the
/// compute team; a decode step's few rows are not worth a hand-off.
pub(crate) const PARALLEL_MIN_ROWS: usize = 4;

/// Runs `f(first_row, run)` over runs of whole `width`-wide rows of `data`: a few runs per
/// thread on the compute team when there are at least [`PARALLEL_MIN_ROWS`] rows (a prefill),
/// else one run on this thread. For per-row work (norms, rotary embeddings, SwiGLU), whose
/// results do not depend on the split.
pub(crate) fn par_row_runs<F>(data: &mut [f32], width: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    let per_run = row_run_len(data.len() / width.max(1));
    team::for_each_chunk_mut(data, per_run * width.max(1), |i, run| f(i * per_run, run));
}

/// Rows per run when [`par_row_runs`] splits `rows` rows: a few runs per thread from
/// [`PARALLEL_MIN_ROWS`] rows on, else all of them in one run (never 0).
pub(crate) fn row_run_len(rows: usize) -> usize {
    match rows >= PARALLEL_MIN_ROWS {
        true => rows.div_ceil(team::current_threads() * 4),
        false => rows.max(1),
    }
}

/// One block of activations to int8 as candle's `from_float` computes it for Q8_0 and Q8_1:
/// `d = max|x| / 127`, `q = round(x * (1 / d))` with halves away from zero. Returns `d` before
/// any f16 rounding (each format rounds it its own way).
pub(crate) fn quantize_i8(xb: &[f32], qb: &mut [i8]) -> f32 {
    let amax = xb.iter().fold(0f32, |a, &v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (q, &v) in qb.iter_mut().zip(xb) {
        *q = round_half_away(v * id) as i8;
    }
    d
}

/// `x.round()` (halves away from zero) the way the AVX2 Q8_1 quantizer computes it: truncate,
/// then step away from zero when the exact remainder `x - trunc(x)` is at least 0.5. The scalar
/// path rounds the same way so both are visibly the same computation (equal to `f32::round`,
/// tested).
#[inline(always)]
fn round_half_away(x: f32) -> f32 {
    let t = x.trunc();
    if (x - t).abs() >= 0.5 {
        t + 1f32.copysign(x)
    } else {
        t
    }
}

/// Every task starts on a multiple of this many weight rows, so kernels that interleave
/// row groups (Q4_1, Q8_0) never split a group between tasks.
pub(crate) const ROW_ALIGN: usize = 8;

/// Rows per task (a multiple of [`ROW_ALIGN`]): enough tasks to balance the team, enough work per task to amortize
/// scheduling (~16 KiB of weight traffic or equivalent work).
fn row_chunk(job: RowsJob) -> usize {
    let threads = team::current_threads();
    let target = job.n_out.div_ceil(threads * 4);
    let min_rows = (16384 / (job.row_bytes + 1) / job.t.max(1)).clamp(4, 256);
    target.max(min_rows).next_multiple_of(ROW_ALIGN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_half_away_equals_f32_round() {
        let below_half = 0.5f32 - f32::EPSILON / 4.0;
        let mut xs = vec![
            0.0f32, -0.0, 0.5, -0.5, 1.5, -2.5, 126.5, -127.5, below_half,
        ];
        xs.push(-below_half);
        xs.extend((0..20_000).map(|i| (i as f32 - 10_000.0) * 0.013_7));
        xs.extend((0..1_000).map(|i| i as f32 * 0.25 - 125.0));
        for x in xs {
            assert_eq!(round_half_away(x), x.round(), "x = {x}");
        }
    }
}
