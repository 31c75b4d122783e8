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

    /// Whether this CPU also has AVX-512 F, BW, VL and VNNI, on top of [`Isa::Avx2`]: the
    /// Q4_1 and Q8_0 kernels' `vpdpbusd` paths (the answers are cached by `std`).
    pub fn has_avx512_vnni() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            Isa::detect() == Isa::Avx2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }
}

/// Shape of one row-parallel matrix product `out[t, n_out] = x[t, k] @ W[n_out, k]^T`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowsJob {
    pub n_out: usize,
    pub t: usize,
    /// Bytes of weights per output row, to size tasks.
    pub row_bytes: usize,
    /// Tasks start on multiples of this many rows (at least [`ROW_ALIGN`]): a kernel that
    /// computes wider runs of rows at once then gets no odd piece per task.
    pub align: usize,
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
///
/// Only [`par_rows`] makes these, one per task, and no two tasks' `tile.rows` overlap; the
/// slices handed out below lie inside the tile (checked), so the tasks never alias. The rows
/// are reached through a pointer rather than a list of per-token slices because building
/// that list cost `t` pushes per task on the calling thread, serially (1% of a 512-token
/// prefill's samples, the other threads waiting).
pub(crate) struct TileOut<'o> {
    pub tile: Tile,
    out: OutRows<'o>,
}

/// `par_rows`' output, `[t, n_out]`, shared by the tasks that each write their own columns.
#[derive(Clone, Copy)]
struct OutRows<'o> {
    ptr: *mut f32,
    n_out: usize,
    _out: std::marker::PhantomData<&'o mut [f32]>,
}

// SAFETY: tasks reach only their own tiles' columns through it (see `TileOut`).
unsafe impl Send for OutRows<'_> {}
// SAFETY: as above.
unsafe impl Sync for OutRows<'_> {}

impl TileOut<'_> {
    /// Token `ti`'s output columns `rows` (inside the tile).
    #[inline]
    fn columns(&mut self, ti: usize, rows: &std::ops::Range<usize>) -> &mut [f32] {
        let Tile { rows: own, tokens } = &self.tile;
        assert!(
            tokens.contains(&ti)
                && own.start <= rows.start
                && rows.start <= rows.end
                && rows.end <= own.end,
            "TileOut: token {ti}, rows {rows:?} outside the tile {:?}",
            self.tile
        );
        // SAFETY: `par_rows` made the tile inside `[t, n_out]` and gave these columns of these
        // tokens to this task alone; the borrow of `self` keeps two calls from overlapping.
        unsafe {
            let at = self.out.ptr.add(ti * self.out.n_out + rows.start);
            std::slice::from_raw_parts_mut(at, rows.len())
        }
    }

    /// Token `ti`'s output columns `tile.rows`.
    #[inline]
    pub fn row_mut(&mut self, ti: usize) -> &mut [f32] {
        let rows = self.tile.rows.clone();
        self.columns(ti, &rows)
    }

    /// Tokens `ti..ti + C`'s output columns for weight rows `rows` (inside the tile), one
    /// slice per token, so a kernel can store a group of rows for several tokens in place.
    #[inline]
    pub fn columns_mut<const C: usize>(
        &mut self,
        ti: usize,
        rows: &std::ops::Range<usize>,
    ) -> [&mut [f32]; C] {
        let mut out: [&mut [f32]; C] = std::array::from_fn(|_| <&mut [f32]>::default());
        for (c, o) in out.iter_mut().enumerate() {
            let piece = self.columns(ti + c, rows);
            // SAFETY: distinct tokens' pieces are disjoint (different output rows), so the C
            // slices may live together; each stays inside this tile's columns.
            *o = unsafe { std::slice::from_raw_parts_mut(piece.as_mut_ptr(), piece.len()) };
        }
        out
    }

    /// Stores the products of weight rows `r..r + values.len()` with token `ti`.
    #[inline]
    pub fn put(&mut self, r: usize, ti: usize, values: &[f32]) {
        self.columns(ti, &(r..r + values.len()))
            .copy_from_slice(values);
    }
}

/// Fills `out[t, n_out]` by calling `tile(out)` for contiguous runs of weight rows and tiles of
/// tokens. Weight rows are spread over the compute team so each weight byte is read from
/// memory once per call, however many tokens the step holds; each task writes its own columns
/// of every token's output row in place, so nothing is copied or transposed afterwards.
pub(crate) fn par_rows<F>(job: RowsJob, out: &mut [f32], tile: F)
where
    F: Fn(TileOut<'_>) + Sync,
{
    let RowsJob { n_out, t, .. } = job;
    assert_eq!(out.len(), t * n_out, "par_rows: out length");
    if t == 0 || n_out == 0 {
        return;
    }
    let chunk = row_chunk(job).max(1);
    let rows = OutRows {
        ptr: out.as_mut_ptr(),
        n_out,
        _out: std::marker::PhantomData,
    };
    let tokens_per_tile = if t == 1 { 1 } else { TOKEN_TILE };
    // Task `ci` owns columns `ci * chunk..` of every token's row.
    team::for_each(n_out.div_ceil(chunk), |ci| {
        let cols = ci * chunk..((ci + 1) * chunk).min(n_out);
        for t0 in (0..t).step_by(tokens_per_tile) {
            tile(TileOut {
                tile: Tile {
                    rows: cols.clone(),
                    tokens: t0..(t0 + tokens_per_tile).min(t),
                },
                out: rows,
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

/// Rows per task (a multiple of `job.align` and [`ROW_ALIGN`]): one task per thread of the
/// team, each a contiguous run of rows (one long weight stream per thread), but at least ~16
/// KiB of weight traffic or equivalent work. Finer tasks let a thread that finishes early take
/// more, but on this project's 2-core host the longer streams won: against four tasks per
/// thread, two took 3.5% less time for a 512-token prefill and 6.5% for a 128-token one (4 of 4
/// alternating rounds each) and about 4% less per decoded token (4-5 of 6); one took another 3%
/// and 1.4% off the prefills (4 of 4) and about 4% off decoding (5 of 6). Eight per thread was
/// slower (5 of 6).
fn row_chunk(job: RowsJob) -> usize {
    let threads = team::current_threads();
    let target = job.n_out.div_ceil(threads);
    let min_rows = (16384 / (job.row_bytes + 1) / job.t.max(1)).clamp(4, 256);
    target
        .max(min_rows)
        .next_multiple_of(job.align.max(ROW_ALIGN))
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
