//! CPU kernels: SIMD quantized matrix products (Q4_1 and Q8_0 weights against activations
//! quantized once per call) and the small f32 vector helpers attention uses.
//!
//! Every kernel picks its instruction set once per call by runtime feature detection (AVX2 +
//! FMA on x86-64) and falls back to portable scalar code elsewhere, so the crate builds and runs
//! correctly on any target, including the Apple Silicon hosts that use the `metal` feature.

pub mod q4_1;
pub mod q8_0;
pub mod vec;

use rayon::prelude::*;

/// Which inner-product implementation to use; chosen by CPU feature detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Portable Rust, any target.
    Scalar,
    /// x86-64 with AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Isa {
    /// The best instruction set this CPU supports (the answer is cached by `std`).
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
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
    /// Bytes of weights per output row, to size rayon tasks.
    pub row_bytes: usize,
}

/// Tokens per tile in a multi-token product: the tile's quantized activations (16 rows of at
/// most a few KiB) stay in L1 while a task's weight rows stream past them.
pub(crate) const TOKEN_TILE: usize = 16;

/// Fills `out[t, n_out]` by calling `rows(row, tokens, out_row)` for every weight row and
/// every tile of tokens, where `out_row[i]` receives the product of `row` with token
/// `tokens.start + i`. Weight rows are spread over the rayon pool so each weight byte is read
/// from memory once per call, however many tokens the step holds.
pub(crate) fn par_rows<F>(job: RowsJob, out: &mut [f32], rows: F)
where
    F: Fn(usize, std::ops::Range<usize>, &mut [f32]) + Sync,
{
    let RowsJob { n_out, t, .. } = job;
    assert_eq!(out.len(), t * n_out, "par_rows: out length");
    if t == 0 || n_out == 0 {
        return;
    }
    let chunk = row_chunk(job);
    if t == 1 {
        out.par_chunks_mut(chunk).enumerate().for_each(|(ci, o)| {
            for (i, v) in o.chunks_exact_mut(1).enumerate() {
                rows(ci * chunk + i, 0..1, v);
            }
        });
        return;
    }
    // Compute into `[n_out, t]` so each task owns contiguous memory, then transpose.
    let mut tmp = vec![0f32; t * n_out];
    tmp.par_chunks_mut(chunk * t)
        .enumerate()
        .for_each(|(ci, o)| {
            for t0 in (0..t).step_by(TOKEN_TILE) {
                let t1 = (t0 + TOKEN_TILE).min(t);
                for (i, row) in o.chunks_exact_mut(t).enumerate() {
                    rows(ci * chunk + i, t0..t1, &mut row[t0..t1]);
                }
            }
        });
    for (r, row) in tmp.chunks_exact(t).enumerate() {
        for (ti, &v) in row.iter().enumerate() {
            out[ti * n_out + r] = v;
        }
    }
}

/// Rows per rayon task: enough tasks to balance the pool, enough work per task to amortize
/// scheduling (~16 KiB of weight traffic or equivalent work).
fn row_chunk(job: RowsJob) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let target = job.n_out.div_ceil(threads * 4);
    let min_rows = (16384 / (job.row_bytes + 1) / job.t.max(1)).clamp(4, 256);
    target.max(min_rows).min(job.n_out).max(1)
}
