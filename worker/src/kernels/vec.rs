//! f32 vector helpers for the CPU model path: attention scores, softmax and weighted sums, and
//! the element-wise RMSNorm and SwiGLU the layers apply to each row. K and V rows come from the
//! KV cache as f32 or f16 ([`KvElem`]); they are widened to f32 exactly and everything is
//! computed in f32.
//!
//! Every helper uses the same formulas and the same order of floating-point operations as the
//! candle CPU ops the reference model runs (`candle_nn::ops::rms_norm`, `Tensor::silu`,
//! `softmax_last_dim`, and the `gemm` kernels behind `Tensor::matmul` for attention's shapes),
//! so the CPU fast path gives the reference's bits, not just values near them:
//!
//! - a score `q · k` is one 8-lane FMA chain over the head dimension followed by the pairwise
//!   horizontal sum of `gemm`'s horizontal kernel (what `q k^T` runs for up to 256 outputs);
//! - a softmax sum is candle's `vec_sum` (four 8-lane accumulators over 32-element chunks, a
//!   fixed reduction tree, then the tail one by one) when AVX2 is present, a plain sequential
//!   sum otherwise;
//! - a weighted sum of value rows is one FMA per row in position order (`gemm`'s `gemv` and
//!   microkernel for `p · V`), except over exactly two rows, which `gemm` sums unfused.

use super::Isa;
use half::f16;

/// An element type of the KV cache: `f32`, or `f16` (half the bytes a long context's attention
/// reads per token). Kernels widen every element to `f32` exactly and then run the same
/// operations, so a cache's values give the same bits in every kernel whatever its type.
pub trait KvElem: Copy + Default + Send + Sync + 'static {
    /// The stored value nearest `x` (round to nearest even; beyond the type's finite range,
    /// its largest finite value of that sign, so a cache never turns a value into infinity).
    fn from_f32(x: f32) -> Self;
    /// The stored value, exactly.
    fn to_f32(self) -> f32;
    /// Eight values from `p` widened to `f32`.
    ///
    /// # Safety
    /// avx and f16c available; eight values readable at `p`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    /// Sixteen values from `p` widened to `f32`.
    ///
    /// # Safety
    /// avx512f available; sixteen values readable at `p`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl KvElem for f32 {
    fn from_f32(x: f32) -> Self {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
}

impl KvElem for f16 {
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x.clamp(f16::MIN.to_f32(), f16::MAX.to_f32()))
    }
    fn to_f32(self) -> f32 {
        self.to_f32()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::{__m128i, _mm256_cvtph_ps, _mm_loadu_si128};
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::{__m256i, _mm256_loadu_si256, _mm512_cvtph_ps};
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
}

/// In place: `x[i] = exp(x[i] - max) / sum_j exp(x[j] - max)`, with candle's
/// `softmax_last_dim` arithmetic (`f32::exp`, the sum as candle's `vec_sum` orders it for `isa`,
/// then a division per element). An empty slice is left as it is.
pub fn softmax(isa: Isa, x: &mut [f32]) {
    if x.is_empty() {
        return;
    }
    let max = match isa {
        Isa::Scalar => x.iter().copied().fold(f32::NEG_INFINITY, f32::max),
        // SAFETY: `Avx2` only comes from runtime detection.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::max(x) },
    };
    match isa {
        Isa::Scalar => {
            exp_shifted(isa, x, max);
            let sum = x.iter().fold(0.0f32, |s, &v| s + v);
            for v in x.iter_mut() {
                *v /= sum;
            }
        }
        // SAFETY: `Avx2` only comes from runtime detection, avx512f too.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if has_avx512f() => unsafe { avx2::exp_normalize_avx512(x, max) },
        // SAFETY: `Avx2` only comes from runtime detection.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::exp_normalize(x, max) },
    }
}

/// candle's AVX `vec_sum`: 32-element chunks into four 8-lane accumulators, the accumulators
/// reduced as `((a0 + a1) + (a2 + a3))`, its lanes as `(l0 + l4) + (l1 + l5)` +
/// `(l2 + l6) + (l3 + l7)`, then the elements after the last whole chunk added one by one.
#[cfg(all(test, target_arch = "x86_64"))]
fn chunked_sum(x: &[f32]) -> f32 {
    let mut acc = [[0f32; 8]; 4];
    let chunks = x.chunks_exact(32);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (a, part) in acc.iter_mut().zip(chunk.chunks_exact(8)) {
            a.iter_mut().zip(part).for_each(|(a, &v)| *a += v);
        }
    }
    let lanes: [f32; 8] =
        std::array::from_fn(|l| (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]));
    let t0: [f32; 4] = std::array::from_fn(|l| lanes[l] + lanes[l + 4]);
    let mut sum = (t0[0] + t0[1]) + (t0[2] + t0[3]);
    for &v in tail {
        sum += v;
    }
    sum
}

/// `n` rows of a head's K or V inside a block of the KV store: row `j` is
/// `data[j * stride + offset..][..d]` (the store keeps all KV heads of a slot side by side).
pub struct HeadRows<'a, T = f32> {
    pub data: &'a [T],
    pub stride: usize,
    pub offset: usize,
    pub n: usize,
}

// Not derived: a derive would ask `T: Copy` of the struct's users.
impl<T> Clone for HeadRows<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for HeadRows<'_, T> {}

impl<T> HeadRows<'_, T> {
    /// Whether every row `offset..offset + d` lies inside `data`.
    fn fits(&self, d: usize) -> bool {
        self.offset + d <= self.stride
            && (self.n == 0 || (self.n - 1) * self.stride + self.offset + d <= self.data.len())
    }

    fn row(&self, j: usize, d: usize) -> &[T] {
        &self.data[j * self.stride + self.offset..][..d]
    }
}

/// Attention scores of one query head against one block: `out[j] = scale * q · k_j`, each dot
/// product as `gemm`'s horizontal kernel orders it: lane `i % 8` accumulates `q[i] * k[i]` with
/// FMA in index order, then the lanes are summed pairwise (`(l0 + l4) + (l2 + l6)` +
/// `(l1 + l5) + (l3 + l7)`).
pub fn scores<T: KvElem>(isa: Isa, q: &[f32], keys: HeadRows<'_, T>, scale: f32, out: &mut [f32]) {
    let d = q.len();
    assert!(keys.fits(d) && out.len() >= keys.n, "scores: lengths");
    match isa {
        Isa::Scalar => {
            for (j, o) in out[..keys.n].iter_mut().enumerate() {
                *o = dot_scalar(q, keys.row(j, d)) * scale;
            }
        }
        // SAFETY: `Avx2` only comes from runtime detection; every row checked by `fits`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::scores(q, keys, scale, out) },
    }
}

/// `y += sum_j p[j] * v_j` over one block's value rows, element by element in `j` order.
pub fn weighted_sum<T: KvElem>(isa: Isa, y: &mut [f32], p: &[f32], values: HeadRows<'_, T>) {
    let d = y.len();
    assert!(
        values.fits(d) && p.len() >= values.n,
        "weighted_sum: lengths"
    );
    match isa {
        Isa::Scalar => {
            for (j, &a) in p[..values.n].iter().enumerate() {
                y.iter_mut()
                    .zip(values.row(j, d))
                    .for_each(|(y, &x)| *y = a.mul_add(x.to_f32(), *y));
            }
        }
        // SAFETY: `Avx2` only comes from runtime detection; every row checked by `fits`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::weighted_sum(y, p, values) },
    }
}

/// Query heads one multi-head kernel call takes (the register tiles have 1-4 heads); larger
/// groups run in several calls.
const MAX_TILE_HEADS: usize = 4;

/// [`scores`] for several query heads against the same keys: `qs` holds the heads' `d`-wide
/// query rows one after another, and head `h`'s scores go to `out[h * out_stride..][..keys.n]`.
/// The heads share every key load and their FMA chains run interleaved; each score is still
/// [`scores`]' chain in its order, so the bits are the per-head call's.
pub fn scores_heads<T: KvElem>(
    isa: Isa,
    qs: &[f32],
    d: usize,
    keys: HeadRows<'_, T>,
    scale: f32,
    (out, out_stride): (&mut [f32], usize),
) {
    let heads = qs.len().checked_div(d).unwrap_or(0);
    assert!(
        heads * d == qs.len()
            && keys.fits(d)
            && out_stride >= keys.n
            && (heads == 0 || (heads - 1) * out_stride + keys.n <= out.len()),
        "scores_heads: lengths"
    );
    match isa {
        // SAFETY: `Avx2` only comes from runtime detection; lengths checked above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if d.is_multiple_of(8) && (1..=MAX_TILE_HEADS).contains(&heads) => unsafe {
            avx2::scores_heads(avx2::has_avx512vl(), qs, d, keys, scale, (out, out_stride))
        },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if d.is_multiple_of(8) && heads > 0 => {
            let wide = avx2::has_avx512vl();
            // Groups of more than four heads (TinyLlama's 8, ...) in runs of at most four.
            for (i, qs) in qs.chunks(MAX_TILE_HEADS * d).enumerate() {
                let out = &mut out[i * MAX_TILE_HEADS * out_stride..];
                // SAFETY: `Avx2` only comes from runtime detection; each run of 1-4 heads lies
                // inside the lengths checked above.
                unsafe { avx2::scores_heads(wide, qs, d, keys, scale, (out, out_stride)) };
            }
        }
        _ => {
            for (h, q) in qs.chunks_exact(d.max(1)).enumerate() {
                scores(isa, q, keys, scale, &mut out[h * out_stride..][..keys.n]);
            }
        }
    }
}

/// Keys a score kernel reads 16 at a time, lane `u` of a vector being key `u` of a run of
/// sixteen: [`KeysT::fill`] transposes a block's key rows (widened to f32) into runs of
/// `[d][16]`, zero past the block's last key, and [`KeysT::scores_heads`] then computes every
/// query head's scores for sixteen keys per vector. Each lane does a key's [`scores`] chain:
/// eight FMA accumulators per key (the chain of lane `i % 8`, in index order), summed in
/// [`scores`]' pairing and scaled, so the bits are [`scores_heads`]'; but where that kernel
/// spends eight 8-wide FMAs and a horizontal sum per key and 64-wide head, this one spends
/// four 16-wide FMAs per key and no shuffle. The transpose is paid once per block for all the
/// query rows of a prefill tile. Only on CPUs with AVX-512F ([`KeysT::supported`]).
#[derive(Debug, Default)]
pub struct KeysT {
    /// `[n.div_ceil(16)][d][16]`.
    data: Vec<f32>,
    d: usize,
    n: usize,
}

impl KeysT {
    /// Whether this CPU runs the transposed kernels for head dimension `d` (AVX-512F, and `d`
    /// a multiple of 8).
    pub fn supported(isa: Isa, d: usize) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            isa == Isa::Avx2 && has_avx512f() && d > 0 && d.is_multiple_of(8)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (isa, d);
            false
        }
    }

    /// Transposes the `keys.n` rows of `keys` (`d` values each) into runs of sixteen keys.
    ///
    /// # Panics
    /// If `!Self::supported(isa, d)` or a row lies outside `keys.data`.
    pub fn fill<T: KvElem>(&mut self, isa: Isa, keys: HeadRows<'_, T>, d: usize) {
        assert!(
            Self::supported(isa, d) && keys.fits(d),
            "KeysT::fill: unsupported or lengths"
        );
        let len = keys.n.div_ceil(16) * d * 16;
        if self.data.len() < len {
            self.data.resize(len, 0.0);
        }
        (self.d, self.n) = (d, keys.n);
        // SAFETY: `supported` checked avx512f (runtime detection) and `d % 8`; the rows by
        // `fits`, the output length just above.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            avx2::transpose_keys(keys, d, &mut self.data[..len])
        };
    }

    /// `out[h * out_stride + j] = scale * q_h · k_j` for the first `n` keys filled (`q_h` the
    /// `h`th `d`-wide row of `qs`): [`scores_heads`]' bits.
    ///
    /// # Panics
    /// If `n` exceeds the keys filled, `qs` is not whole heads, or `out` is too short.
    pub fn scores_heads(
        &self,
        qs: &[f32],
        n: usize,
        scale: f32,
        (out, out_stride): (&mut [f32], usize),
    ) {
        let d = self.d;
        let heads = qs.len().checked_div(d).unwrap_or(0);
        assert!(
            n <= self.n
                && heads * d == qs.len()
                && out_stride >= n
                && (heads == 0 || (heads - 1) * out_stride + n <= out.len()),
            "KeysT::scores_heads: lengths"
        );
        // SAFETY: a filled `KeysT` has passed `supported` (avx512f); lengths checked above,
        // and `data` holds `n.div_ceil(16)` runs of `d * 16`.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            avx2::scores_transposed(qs, d, &self.data, n, scale, (out, out_stride))
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (scale, out);
    }
}

/// [`weighted_sum`] for several heads over the same value rows: `ys` holds one `width`-wide
/// output per head, and head `h`'s weights are `p[h * p_stride..][..values.n]`. The heads share
/// every value load and their FMA chains run interleaved; each output element still adds its
/// rows in `j` order, so the bits are [`weighted_sum`]'s.
pub fn weighted_sum_heads<T: KvElem>(
    isa: Isa,
    ys: &mut [f32],
    heads: usize,
    (p, p_stride): (&[f32], usize),
    values: HeadRows<'_, T>,
) {
    let width = ys.len() / heads.max(1);
    assert!(
        ys.len() == width * heads
            && values.fits(width)
            && p_stride >= values.n
            && (heads == 0 || (heads - 1) * p_stride + values.n <= p.len()),
        "weighted_sum_heads: lengths"
    );
    match isa {
        // SAFETY: `Avx2` only comes from runtime detection; lengths checked above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if width.is_multiple_of(8) && (1..=MAX_TILE_HEADS).contains(&heads) => unsafe {
            avx2::weighted_sum_heads(avx2::has_avx512vl(), ys, heads, (p, p_stride), values)
        },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if width.is_multiple_of(8) && heads > 0 => {
            let wide = avx2::has_avx512vl();
            for (i, ys) in ys.chunks_mut(MAX_TILE_HEADS * width).enumerate() {
                let (n, p) = (ys.len() / width, &p[i * MAX_TILE_HEADS * p_stride..]);
                // SAFETY: as in `scores_heads`: runs of 1-4 heads inside the checked lengths.
                unsafe { avx2::weighted_sum_heads(wide, ys, n, (p, p_stride), values) };
            }
        }
        _ => {
            for (h, y) in ys.chunks_exact_mut(width.max(1)).enumerate() {
                weighted_sum(isa, y, &p[h * p_stride..][..values.n], values);
            }
        }
    }
}

/// Asks for the cache lines of the first `width` values of every row of `rows` ahead of their
/// use (a hint that changes no result: the KV cache of a long context comes from memory, and
/// each task's short run of rows is over before the hardware prefetcher ramps up).
pub fn prefetch_rows<T>(rows: HeadRows<'_, T>, width: usize) {
    #[cfg(target_arch = "x86_64")]
    if rows.fits(width) {
        let per_line = (64 / std::mem::size_of::<T>().max(1)).max(1);
        for j in 0..rows.n {
            for line in rows.row(j, width).chunks(per_line) {
                // SAFETY: SSE is part of x86-64; a prefetch of an in-bounds address.
                unsafe {
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                        line.as_ptr() as *const i8,
                    )
                };
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (rows, width);
}

/// `y = p[0] * v_0 + p[1] * v_1` with each product rounded before the sum: `gemm` computes a
/// product whose inner dimension is 2 this way (its `gevv`), not with FMA, so a softmax over
/// exactly two positions is weighted like this.
pub fn weighted_pair<T: KvElem>(y: &mut [f32], p: [f32; 2], values: HeadRows<'_, T>) {
    let d = y.len();
    assert!(values.fits(d) && values.n == 2, "weighted_pair: lengths");
    let (v0, v1) = (values.row(0, d), values.row(1, d));
    for ((y, &a), &b) in y.iter_mut().zip(v0).zip(v1) {
        *y = p[1] * b.to_f32() + p[0] * a.to_f32();
    }
}

/// One dot product in [`scores`]' order, with `f32::mul_add` (a fused multiply-add, as the
/// AVX2 path uses).
fn dot_scalar<T: KvElem>(a: &[f32], b: &[T]) -> f32 {
    let mut lanes = [0f32; 8];
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        lanes[i % 8] = x.mul_add(y.to_f32(), lanes[i % 8]);
    }
    let t0: [f32; 4] = std::array::from_fn(|l| lanes[l] + lanes[l + 4]);
    (t0[0] + t0[2]) + (t0[1] + t0[3])
}

/// RMSNorm of each `weight.len()`-wide row of `x` into `out`, as candle computes it.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let n = weight.len();
    assert_eq!(x.len(), out.len(), "rms_norm: lengths");
    if n == 0 {
        return;
    }
    let isa = Isa::detect();
    // A row's sum of squares is one chain of dependent adds in index order (candle's), so a
    // row alone waits on the add latency; eight rows at once keep eight chains in flight.
    let whole = x.len() / (NORM_ROWS * n) * (NORM_ROWS * n);
    let (x, x_tail) = x.split_at(whole);
    let (out, out_tail) = out.split_at_mut(whole);
    for (src, dst) in x
        .chunks_exact(NORM_ROWS * n)
        .zip(out.chunks_exact_mut(NORM_ROWS * n))
    {
        let sum2 = match isa {
            Isa::Scalar => {
                let mut sum2 = [0f32; NORM_ROWS];
                for i in 0..n {
                    for (r, s) in sum2.iter_mut().enumerate() {
                        let v = src[r * n + i];
                        *s += v * v;
                    }
                }
                sum2
            }
            // SAFETY: `Avx2` only comes from runtime detection; `src` is eight rows of `n`.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { avx2::sum_squares8(src, n) },
        };
        for ((src, dst), sum2) in src.chunks_exact(n).zip(dst.chunks_exact_mut(n)).zip(sum2) {
            norm_row(isa, src, weight, (sum2 / n as f32 + eps).sqrt(), dst);
        }
    }
    for (src, dst) in x_tail.chunks_exact(n).zip(out_tail.chunks_exact_mut(n)) {
        let sum2 = src.iter().map(|&v| v * v).sum::<f32>();
        norm_row(isa, src, weight, (sum2 / n as f32 + eps).sqrt(), dst);
    }
}

/// `dst[i] = src[i] / m * weight[i]`.
fn norm_row(isa: Isa, src: &[f32], weight: &[f32], m: f32, dst: &mut [f32]) {
    let done = match isa {
        Isa::Scalar => 0,
        // SAFETY: `Avx2` only comes from runtime detection; the three slices are one row long.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::norm_row(src, weight, m, dst) },
    };
    for ((d, &s), &w) in dst[done..]
        .iter_mut()
        .zip(&src[done..])
        .zip(&weight[done..])
    {
        *d = s / m * w;
    }
}

/// Rows [`rms_norm`] sums together.
const NORM_ROWS: usize = 8;

/// Whether the CPU has AVX-512F, for the `exp` paths that use 512-bit vectors of doubles
/// (the answer is cached by `std`).
#[cfg(target_arch = "x86_64")]
fn has_avx512f() -> bool {
    is_x86_feature_detected!("avx512f")
}

/// SwiGLU: `out[i] = silu(gate[i]) * up[i]`, as `g / (1 + exp(-g)) * u` in f32.
pub fn swiglu(isa: Isa, gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(
        gate.len() == out.len() && up.len() == out.len(),
        "swiglu: lengths"
    );
    let done = match isa {
        Isa::Scalar => 0,
        // SAFETY: `Avx2` only comes from runtime detection, avx512f too; lengths checked above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if has_avx512f() => unsafe { avx2::swiglu_avx512(gate, up, out) },
        // SAFETY: `Avx2` only comes from runtime detection; lengths checked above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::swiglu(gate, up, out) },
    };
    for ((o, &g), &u) in out[done..].iter_mut().zip(&gate[done..]).zip(&up[done..]) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

/// In place: `x[i] = exp(x[i] - sub)`, each value the bits of `(x[i] - sub).exp()`.
///
/// `f32::exp` is a call into the C library per element; on x86-64 Linux with FMA that is
/// glibc's `__expf_fma` (ARM's optimized-routines `expf`: a 32-entry table of `2^(i/32)` and a
/// cubic in double precision). The AVX2 path runs that same algorithm, operation for operation
/// with the same fused multiply-adds and constants, four doubles at a time (eight, with the
/// table read by permutes instead of a gather, where the CPU has AVX-512F), and hands any
/// vector holding an input outside the fast path's range (`|x| >= 88`, infinities, NaN) to
/// `f32::exp`, so the results are the library's bits (checked against `f32::exp` in the tests).
pub fn exp_shifted(isa: Isa, x: &mut [f32], sub: f32) {
    let done = match isa {
        Isa::Scalar => 0,
        // SAFETY: `Avx2` only comes from runtime detection, avx512f too.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if has_avx512f() => unsafe { avx2::exp_shifted_avx512(x, sub) },
        // SAFETY: `Avx2` only comes from runtime detection.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::exp_shifted(x, sub) },
    };
    for v in &mut x[done..] {
        *v = (*v - sub).exp();
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::{HeadRows, KvElem};
    use std::arch::x86_64::*;

    /// glibc's `__exp2f_data` (ARM optimized-routines): `TAB[i]` = bits of `2^(i/32)` minus
    /// `i << 47`, so that adding `k << 47` scales it by `2^(k div 32)`.
    const EXP_TAB: [u64; 32] = [
        0x3ff0000000000000,
        0x3fefd9b0d3158574,
        0x3fefb5586cf9890f,
        0x3fef9301d0125b51,
        0x3fef72b83c7d517b,
        0x3fef54873168b9aa,
        0x3fef387a6e756238,
        0x3fef1e9df51fdee1,
        0x3fef06fe0a31b715,
        0x3feef1a7373aa9cb,
        0x3feedea64c123422,
        0x3feece086061892d,
        0x3feebfdad5362a27,
        0x3feeb42b569d4f82,
        0x3feeab07dd485429,
        0x3feea47eb03a5585,
        0x3feea09e667f3bcd,
        0x3fee9f75e8ec5f74,
        0x3feea11473eb0187,
        0x3feea589994cce13,
        0x3feeace5422aa0db,
        0x3feeb737b0cdc5e5,
        0x3feec49182a3f090,
        0x3feed503b23e255d,
        0x3feee89f995ad3ad,
        0x3feeff76f2fb5e47,
        0x3fef199bdd85529c,
        0x3fef3720dcef9069,
        0x3fef5818dcfba487,
        0x3fef7c97337b9b5f,
        0x3fefa4afa2a490da,
        0x3fefd0765b6e4540,
    ];
    /// `32 / ln 2`.
    const EXP_INVLN2_N: u64 = 0x40471547652b82fe;
    /// `0x1.8p52`: adding it rounds a double to an integer held in the low mantissa bits.
    const EXP_SHIFT: u64 = 0x4338000000000000;
    /// The cubic's coefficients, scaled for `r` in units of `1/32`.
    const EXP_C: [u64; 3] = [0x3ebc6af84b912394, 0x3f2ebfce50fac4f3, 0x3f962e42ff0c52d6];
    /// Bits of `|x|` from which `expf` leaves its fast path (top 12 bits above `0x42a`).
    const EXP_SLOW_BITS: i32 = 0x42b0_0000;

    /// `expf` of four floats widened to doubles, glibc's fast path step for step.
    ///
    /// SAFETY: caller ensures avx2 + fma.
    #[inline(always)]
    unsafe fn exp4(xd: __m256d) -> __m128 {
        let f = |bits: u64| _mm256_set1_pd(f64::from_bits(bits));
        let (invln2, shift) = (f(EXP_INVLN2_N), f(EXP_SHIFT));
        let kd0 = _mm256_fmadd_pd(invln2, xd, shift);
        let ki = _mm256_castpd_si256(kd0);
        let kd = _mm256_sub_pd(kd0, shift);
        let r = _mm256_fmsub_pd(invln2, xd, kd);
        let idx = _mm256_and_si256(ki, _mm256_set1_epi64x(31));
        let tab = _mm256_i64gather_epi64::<8>(EXP_TAB.as_ptr() as *const i64, idx);
        let t = _mm256_add_epi64(tab, _mm256_slli_epi64::<47>(ki));
        let z = _mm256_fmadd_pd(r, f(EXP_C[0]), f(EXP_C[1]));
        let r2 = _mm256_mul_pd(r, r);
        let y = _mm256_fmadd_pd(r, f(EXP_C[2]), _mm256_set1_pd(1.0));
        let y = _mm256_fmadd_pd(z, r2, y);
        _mm256_cvtpd_ps(_mm256_mul_pd(y, _mm256_castsi256_pd(t)))
    }

    /// Eight `expf`s at a time: glibc's fast path on doubles.
    pub(super) trait Exp8 {
        /// `expf` of eight floats widened to doubles (the caller has ruled out the slow path).
        ///
        /// SAFETY: caller ensures the implementation's instruction set.
        unsafe fn exp8_fast(x: __m256) -> __m256;
    }

    /// AVX2: two halves of four doubles, the table read with a gather.
    pub(super) struct Avx2Exp;

    impl Exp8 for Avx2Exp {
        #[inline(always)]
        unsafe fn exp8_fast(x: __m256) -> __m256 {
            let lo = exp4(_mm256_cvtps_pd(_mm256_castps256_ps128(x)));
            let hi = exp4(_mm256_cvtps_pd(_mm256_extractf128_ps::<1>(x)));
            _mm256_set_m128(hi, lo)
        }
    }

    /// AVX-512F: all eight lanes in one vector of doubles, and the 32-entry table read from
    /// four registers with two `vpermt2q` and a blend instead of a gather (slow on AMD Zen 4).
    /// The same operations on the same values as [`Avx2Exp`], so the same bits.
    pub(super) struct Avx512Exp;

    impl Exp8 for Avx512Exp {
        #[inline(always)]
        unsafe fn exp8_fast(x: __m256) -> __m256 {
            let f = |bits: u64| _mm512_set1_pd(f64::from_bits(bits));
            let (invln2, shift) = (f(EXP_INVLN2_N), f(EXP_SHIFT));
            let xd = _mm512_cvtps_pd(x);
            let kd0 = _mm512_fmadd_pd(invln2, xd, shift);
            let ki = _mm512_castpd_si512(kd0);
            let kd = _mm512_sub_pd(kd0, shift);
            let r = _mm512_fmsub_pd(invln2, xd, kd);
            let idx = _mm512_and_si512(ki, _mm512_set1_epi64(31));
            let part = |i: usize| _mm512_loadu_si512(EXP_TAB.as_ptr().add(8 * i) as *const _);
            let low16 = _mm512_permutex2var_epi64(part(0), idx, part(1));
            let high16 = _mm512_permutex2var_epi64(part(2), idx, part(3));
            let upper = _mm512_test_epi64_mask(idx, _mm512_set1_epi64(16));
            let tab = _mm512_mask_blend_epi64(upper, low16, high16);
            let t = _mm512_add_epi64(tab, _mm512_slli_epi64::<47>(ki));
            let z = _mm512_fmadd_pd(r, f(EXP_C[0]), f(EXP_C[1]));
            let r2 = _mm512_mul_pd(r, r);
            let y = _mm512_fmadd_pd(r, f(EXP_C[2]), _mm512_set1_pd(1.0));
            let y = _mm512_fmadd_pd(z, r2, y);
            _mm512_cvtpd_ps(_mm512_mul_pd(y, _mm512_castsi512_pd(t)))
        }
    }

    /// Eight `expf`s, or `None` when a lane needs `expf`'s slow path.
    ///
    /// SAFETY: caller ensures avx2 and `E`'s instruction set.
    #[inline(always)]
    unsafe fn exp8<E: Exp8>(x: __m256) -> Option<__m256> {
        let abs = _mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32(0x7fff_ffff));
        let slow = _mm256_cmpgt_epi32(abs, _mm256_set1_epi32(EXP_SLOW_BITS - 1));
        if _mm256_movemask_epi8(slow) != 0 {
            return None;
        }
        Some(E::exp8_fast(x))
    }

    /// [`super::exp_shifted`] over whole vectors of eight; returns how many elements it did.
    ///
    /// SAFETY: caller ensures avx2, fma and `E`'s instruction set.
    #[inline(always)]
    unsafe fn exp_shifted_with<E: Exp8>(x: &mut [f32], sub: f32) -> usize {
        let n = x.len() / 8 * 8;
        let s = _mm256_set1_ps(sub);
        for chunk in x[..n].chunks_exact_mut(8) {
            let p = chunk.as_mut_ptr();
            let v = _mm256_sub_ps(_mm256_loadu_ps(p), s);
            match exp8::<E>(v) {
                Some(e) => _mm256_storeu_ps(p, e),
                None => chunk.iter_mut().for_each(|c| *c = (*c - sub).exp()),
            }
        }
        n
    }

    /// The rest of [`super::softmax`] after the maximum, in one pass where the library does
    /// three: each 32-element chunk's exponentials are stored and added into candle's four
    /// 8-lane accumulators while in registers, then the elements after the last whole chunk
    /// are exponentiated and added one by one after the accumulators' reduction, and every
    /// element divided by the sum: [`super::chunked_sum`]'s order, `f32::exp`'s bits, one
    /// IEEE division each.
    ///
    /// SAFETY: caller ensures avx2, fma and `E`'s instruction set.
    #[inline(always)]
    unsafe fn exp_normalize_with<E: Exp8>(x: &mut [f32], max: f32) {
        let whole = x.len() / 32 * 32;
        let m = _mm256_set1_ps(max);
        let mut acc = [_mm256_setzero_ps(); 4];
        for chunk in x[..whole].chunks_exact_mut(32) {
            for (j, a) in acc.iter_mut().enumerate() {
                let p = chunk.as_mut_ptr().add(8 * j);
                let v = _mm256_sub_ps(_mm256_loadu_ps(p), m);
                match exp8::<E>(v) {
                    Some(e) => _mm256_storeu_ps(p, e),
                    None => {
                        for i in 0..8 {
                            *p.add(i) = (*p.add(i) - max).exp();
                        }
                    }
                }
                *a = _mm256_add_ps(*a, _mm256_loadu_ps(p));
            }
        }
        let tail = &mut x[whole..];
        let done = exp_shifted_with::<E>(tail, max);
        for v in &mut tail[done..] {
            *v = (*v - max).exp();
        }
        let lanes = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let t0 = _mm_add_ps(
            _mm256_castps256_ps128(lanes),
            _mm256_extractf128_ps::<1>(lanes),
        );
        let mut t = [0f32; 4];
        _mm_storeu_ps(t.as_mut_ptr(), t0);
        let mut sum = (t[0] + t[1]) + (t[2] + t[3]);
        for &v in tail.iter() {
            sum += v;
        }
        let n8 = x.len() / 8 * 8;
        let d = _mm256_set1_ps(sum);
        for chunk in x[..n8].chunks_exact_mut(8) {
            let p = chunk.as_mut_ptr();
            _mm256_storeu_ps(p, _mm256_div_ps(_mm256_loadu_ps(p), d));
        }
        for v in &mut x[n8..] {
            *v /= sum;
        }
    }

    /// [`exp_normalize_with`] with AVX2.
    ///
    /// SAFETY: caller ensures avx2 + fma.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_normalize(x: &mut [f32], max: f32) {
        exp_normalize_with::<Avx2Exp>(x, max)
    }

    /// [`exp_normalize_with`] with AVX-512F.
    ///
    /// SAFETY: caller ensures avx2, fma and avx512f.
    #[target_feature(enable = "avx2,fma,avx512f")]
    pub(super) unsafe fn exp_normalize_avx512(x: &mut [f32], max: f32) {
        exp_normalize_with::<Avx512Exp>(x, max)
    }

    /// [`super::swiglu`] over whole vectors of eight; returns how many elements it did.
    ///
    /// SAFETY: caller ensures avx2, fma, `E`'s instruction set and equal lengths.
    #[inline(always)]
    unsafe fn swiglu_with<E: Exp8>(gate: &[f32], up: &[f32], out: &mut [f32]) -> usize {
        let n = out.len() / 8 * 8;
        let (neg, one) = (_mm256_set1_ps(-0.0), _mm256_set1_ps(1.0));
        for i in (0..n).step_by(8) {
            let g = _mm256_loadu_ps(gate.as_ptr().add(i));
            let u = _mm256_loadu_ps(up.as_ptr().add(i));
            let e = match exp8::<E>(_mm256_xor_ps(g, neg)) {
                Some(e) => e,
                None => {
                    let mut lanes = [0f32; 8];
                    for (l, g) in lanes.iter_mut().zip(&gate[i..i + 8]) {
                        *l = (-g).exp();
                    }
                    _mm256_loadu_ps(lanes.as_ptr())
                }
            };
            let y = _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), u);
            _mm256_storeu_ps(out.as_mut_ptr().add(i), y);
        }
        n
    }

    /// [`exp_shifted_with`] with AVX2.
    ///
    /// SAFETY: caller ensures avx2 + fma.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_shifted(x: &mut [f32], sub: f32) -> usize {
        exp_shifted_with::<Avx2Exp>(x, sub)
    }

    /// [`exp_shifted_with`] with AVX-512F.
    ///
    /// SAFETY: caller ensures avx2, fma and avx512f.
    #[target_feature(enable = "avx2,fma,avx512f")]
    pub(super) unsafe fn exp_shifted_avx512(x: &mut [f32], sub: f32) -> usize {
        exp_shifted_with::<Avx512Exp>(x, sub)
    }

    /// [`swiglu_with`] with AVX2.
    ///
    /// SAFETY: caller ensures avx2 + fma and equal lengths.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) -> usize {
        swiglu_with::<Avx2Exp>(gate, up, out)
    }

    /// [`swiglu_with`] with AVX-512F.
    ///
    /// SAFETY: caller ensures avx2, fma, avx512f and equal lengths.
    #[target_feature(enable = "avx2,fma,avx512f")]
    pub(super) unsafe fn swiglu_avx512(gate: &[f32], up: &[f32], out: &mut [f32]) -> usize {
        swiglu_with::<Avx512Exp>(gate, up, out)
    }

    /// The sums of squares of eight `n`-wide rows of `src`, each in index order from `0.0`
    /// (`sum += v * v`, a multiply then an add, as the scalar loop does): eight columns of
    /// the eight rows are transposed so that lane `r` of every vector is row `r`.
    ///
    /// SAFETY: avx available; `src.len() == 8 * n`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn sum_squares8(src: &[f32], n: usize) -> [f32; 8] {
        let p = src.as_ptr();
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            let mut v = [_mm256_setzero_ps(); 8];
            for (r, v) in v.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(p.add(r * n + i));
            }
            for c in transpose8(v) {
                acc = _mm256_add_ps(acc, _mm256_mul_ps(c, c));
            }
            i += 8;
        }
        let mut sum2 = [0f32; 8];
        _mm256_storeu_ps(sum2.as_mut_ptr(), acc);
        for i in i..n {
            for (r, s) in sum2.iter_mut().enumerate() {
                let v = *p.add(r * n + i);
                *s += v * v;
            }
        }
        sum2
    }

    /// `out[j]` lane `r` = `v[r]` lane `j`. Written out without closures: a closure does not
    /// inherit the caller's target features, and an uninlined one would call its intrinsics.
    #[inline(always)]
    unsafe fn transpose8(v: [__m256; 8]) -> [__m256; 8] {
        // Rows in pairs: columns {0, 1 | 4, 5} and {2, 3 | 6, 7} of two rows each.
        let t0 = _mm256_unpacklo_ps(v[0], v[1]);
        let t1 = _mm256_unpackhi_ps(v[0], v[1]);
        let t2 = _mm256_unpacklo_ps(v[2], v[3]);
        let t3 = _mm256_unpackhi_ps(v[2], v[3]);
        let t4 = _mm256_unpacklo_ps(v[4], v[5]);
        let t5 = _mm256_unpackhi_ps(v[4], v[5]);
        let t6 = _mm256_unpacklo_ps(v[6], v[7]);
        let t7 = _mm256_unpackhi_ps(v[6], v[7]);
        // Four rows of columns {j | j + 4}: rows 0-3 in u0-u3, rows 4-7 in u4-u7.
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ]
    }

    /// [`super::norm_row`] over whole vectors of eight; returns how many elements it did.
    ///
    /// SAFETY: avx available; `src`, `weight` and `dst` of equal lengths.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn norm_row(src: &[f32], weight: &[f32], m: f32, dst: &mut [f32]) -> usize {
        let n = dst.len() / 8 * 8;
        let mv = _mm256_set1_ps(m);
        for i in (0..n).step_by(8) {
            let q = _mm256_div_ps(_mm256_loadu_ps(src.as_ptr().add(i)), mv);
            let y = _mm256_mul_ps(q, _mm256_loadu_ps(weight.as_ptr().add(i)));
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), y);
        }
        n
    }

    /// The largest element of `x`, NaNs ignored as `f32::max` ignores them (`-inf` for an
    /// empty or all-NaN slice): the maximum does not depend on the order it is taken in, so
    /// four vectors of running maxima give `f32::max`'s fold.
    ///
    /// SAFETY: avx available.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn max(x: &[f32]) -> f32 {
        let mut acc = [_mm256_set1_ps(f32::NEG_INFINITY); 4];
        let chunks = x.chunks_exact(32);
        let tail = chunks.remainder();
        for chunk in chunks {
            for (i, a) in acc.iter_mut().enumerate() {
                // `max_ps(v, a)` is `a` when `v` is NaN, and `a` is never NaN.
                *a = _mm256_max_ps(_mm256_loadu_ps(chunk.as_ptr().add(8 * i)), *a);
            }
        }
        let m = _mm256_max_ps(_mm256_max_ps(acc[0], acc[1]), _mm256_max_ps(acc[2], acc[3]));
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), m);
        lanes
            .into_iter()
            .chain(tail.iter().copied())
            .fold(f32::NEG_INFINITY, f32::max)
    }

    /// The eight lanes of `v` summed as `gemm`'s and candle's horizontal kernels pair them:
    /// `(l0 + l4) + (l2 + l6)`, then `+ ((l1 + l5) + (l3 + l7))`.
    ///
    /// SAFETY: avx available.
    #[inline(always)]
    pub(crate) unsafe fn hsum(v: __m256) -> f32 {
        let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)))
    }

    /// SAFETY: avx2, fma and f16c available; `a.len() == b.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot<T: KvElem>(a: &[f32], b: &[T]) -> f32 {
        let n = a.len();
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(ap.add(i)), T::load8(bp.add(i)), acc);
            i += 8;
        }
        if i < n {
            // The tail goes into the low lanes, zero-padded, as gemm's masked load does.
            let (mut x, mut y) = ([0f32; 8], [0f32; 8]);
            x[..n - i].copy_from_slice(&a[i..]);
            y.iter_mut().zip(&b[i..]).for_each(|(y, b)| *y = b.to_f32());
            acc = _mm256_fmadd_ps(
                _mm256_loadu_ps(x.as_ptr()),
                _mm256_loadu_ps(y.as_ptr()),
                acc,
            );
        }
        hsum(acc)
    }

    /// SAFETY: avx2, fma and f16c available; `keys.fits(q.len())`, `out.len() >= keys.n`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn scores<T: KvElem>(
        q: &[f32],
        keys: HeadRows<'_, T>,
        scale: f32,
        out: &mut [f32],
    ) {
        let d = q.len();
        if !d.is_multiple_of(8) {
            for (j, o) in out[..keys.n].iter_mut().enumerate() {
                *o = dot(q, keys.row(j, d)) * scale;
            }
            return;
        }
        // Eight, then four keys at a time: independent FMA chains per query load, each in
        // `dot`'s order, so the scores are the one-key path's bits.
        let (qp, base) = (q.as_ptr(), keys.data.as_ptr().add(keys.offset));
        let mut j = 0;
        while j + 8 <= keys.n {
            let kp = base.add(j * keys.stride);
            // The common head widths with a constant trip count (no loop overhead per FMA).
            let acc = match d {
                64 => head_key_dots::<T, 1, 8>(qp, 64, kp, keys.stride),
                128 => head_key_dots::<T, 1, 8>(qp, 128, kp, keys.stride),
                _ => head_key_dots::<T, 1, 8>(qp, d, kp, keys.stride),
            };
            let s = _mm256_mul_ps(hsum8(acc[0]), _mm256_set1_ps(scale));
            _mm256_storeu_ps(out.as_mut_ptr().add(j), s);
            j += 8;
        }
        while j + 4 <= keys.n {
            let [acc] = head_key_dots::<T, 1, 4>(qp, d, base.add(j * keys.stride), keys.stride);
            for (u, a) in acc.into_iter().enumerate() {
                out[j + u] = hsum(a) * scale;
            }
            j += 4;
        }
        for (jj, o) in out[j..keys.n].iter_mut().enumerate() {
            *o = dot(q, keys.row(j + jj, d)) * scale;
        }
    }

    /// `[hsum(a[0]), .., hsum(a[7])]` with the same additions in the same pairing as
    /// [`hsum`] (`(l0 + l4) + (l2 + l6)` + `(l1 + l5) + (l3 + l7)`), eight vectors at once.
    ///
    /// SAFETY: avx2 available.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn hsum8(a: [__m256; 8]) -> __m256 {
        reduce8(a, |p, q| _mm256_add_ps(p, q))
    }

    /// Lane `j` of the result: `op` folded over the eight lanes of `a[j]`, paired as
    /// `op(op(op(l0, l4), op(l2, l6)), op(op(l1, l5), op(l3, l7)))` ([`hsum`]'s pairing, which
    /// a floating-point sum needs to be its bits; an associative and commutative `op` such
    /// as a maximum or an integer sum gives the same result in any pairing).
    ///
    /// SAFETY: avx available.
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(crate) unsafe fn reduce8(a: [__m256; 8], op: impl Fn(__m256, __m256) -> __m256) -> __m256 {
        // t_j: lanes 0-3 fold a_j's halves (l, l + 4), lanes 4-7 a_{j+4}'s.
        let t: [__m256; 4] = std::array::from_fn(|j| {
            op(
                _mm256_permute2f128_ps::<0x20>(a[j], a[j + 4]),
                _mm256_permute2f128_ps::<0x31>(a[j], a[j + 4]),
            )
        });
        // (t0 op t2, t1 op t3) for two vectors per half.
        let x = |p: __m256, q: __m256| {
            op(
                _mm256_shuffle_ps::<0x44>(p, q),
                _mm256_shuffle_ps::<0xEE>(p, q),
            )
        };
        let (x01, x23) = (x(t[0], t[1]), x(t[2], t[3]));
        op(
            _mm256_shuffle_ps::<0x88>(x01, x23),
            _mm256_shuffle_ps::<0xDD>(x01, x23),
        )
    }

    /// Whether the CPU has AVX-512VL, whose 32 vector registers (ymm16-31 as well) hold the
    /// wider multi-head tiles (the answer is cached by `std`).
    pub(super) fn has_avx512vl() -> bool {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl")
    }

    /// [`super::scores_heads`] for 1-4 heads, `d % 8 == 0`: a tile of the heads times `K` keys
    /// of accumulators, `K` as large as the registers allow (32 of them with `wide`).
    ///
    /// SAFETY: avx2, fma and f16c available, and avx512f and avx512vl with `wide`; the lengths
    /// `super::scores_heads` checks.
    pub(super) unsafe fn scores_heads<T: KvElem>(
        wide: bool,
        qs: &[f32],
        d: usize,
        keys: HeadRows<'_, T>,
        scale: f32,
        (out, out_stride): (&mut [f32], usize),
    ) {
        let a = (qs, d, keys, scale, out, out_stride);
        match (qs.len() / d, wide) {
            (1, _) => scores_heads_avx2::<T, 1, 8>(a),
            (2, false) => scores_heads_avx2::<T, 2, 4>(a),
            (3, false) => scores_heads_avx2::<T, 3, 4>(a),
            (4, false) => scores_heads_avx2::<T, 4, 2>(a),
            (2, true) => scores_heads_wide::<T, 2, 8>(a),
            (3, true) => scores_heads_wide::<T, 3, 8>(a),
            _ => scores_heads_wide::<T, 4, 4>(a),
        }
    }

    /// [`super::scores_heads`]' arguments.
    type ScoresHeadsArgs<'a, 'k, T> =
        (&'a [f32], usize, HeadRows<'k, T>, f32, &'a mut [f32], usize);

    /// SAFETY: avx2, fma and f16c available; as [`scores_heads`].
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scores_heads_avx2<T: KvElem, const H: usize, const K: usize>(
        a: ScoresHeadsArgs<'_, '_, T>,
    ) {
        scores_heads_with::<T, H, K>(a)
    }

    /// SAFETY: avx2, fma, f16c, avx512f and avx512vl available; as [`scores_heads`].
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
    unsafe fn scores_heads_wide<T: KvElem, const H: usize, const K: usize>(
        a: ScoresHeadsArgs<'_, '_, T>,
    ) {
        scores_heads_with::<T, H, K>(a)
    }

    /// `H` heads against `K` keys at a time, then the keys left over head by head.
    ///
    /// SAFETY: as [`scores_heads`], `qs.len() == H * d`.
    #[inline(always)]
    unsafe fn scores_heads_with<T: KvElem, const H: usize, const K: usize>(
        (qs, d, keys, scale, out, out_stride): ScoresHeadsArgs<'_, '_, T>,
    ) {
        let (qp, base, op) = (
            qs.as_ptr(),
            keys.data.as_ptr().add(keys.offset),
            out.as_mut_ptr(),
        );
        let mut j = 0;
        while j + K <= keys.n {
            let kp = base.add(j * keys.stride);
            let acc = match d {
                64 => head_key_dots::<T, H, K>(qp, 64, kp, keys.stride),
                _ => head_key_dots::<T, H, K>(qp, d, kp, keys.stride),
            };
            for (h, acc) in acc.iter().enumerate() {
                let o = op.add(h * out_stride + j);
                if let Ok(acc) = <[__m256; 8]>::try_from(acc.as_slice()) {
                    _mm256_storeu_ps(o, _mm256_mul_ps(hsum8(acc), _mm256_set1_ps(scale)));
                } else {
                    for (u, a) in acc.iter().enumerate() {
                        *o.add(u) = hsum(*a) * scale;
                    }
                }
            }
            j += K;
        }
        if j < keys.n {
            let rest = HeadRows {
                data: &keys.data[j * keys.stride..],
                n: keys.n - j,
                ..keys
            };
            for h in 0..H {
                let o = std::slice::from_raw_parts_mut(op.add(h * out_stride + j), rest.n);
                scores(&qs[h * d..][..d], rest, scale, o);
            }
        }
    }

    /// The lane accumulators of `q_h · k_u` for `H` query rows (`q_h` at `q + h * d`) and `K`
    /// keys (`k_u` at `keys + u * stride`): lane `i % 8` adds `q[i] * k[i]` with FMA in index
    /// order, as `dot` does.
    ///
    /// SAFETY: avx2, fma and f16c available; `d % 8 == 0`, `H * d` values at `q`, `d` at every
    /// key.
    #[inline(always)]
    unsafe fn head_key_dots<T: KvElem, const H: usize, const K: usize>(
        q: *const f32,
        d: usize,
        keys: *const T,
        stride: usize,
    ) -> [[__m256; K]; H] {
        let mut acc = [[_mm256_setzero_ps(); K]; H];
        let mut i = 0;
        while i < d {
            let mut x = [_mm256_setzero_ps(); H];
            for (h, x) in x.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(q.add(h * d + i));
            }
            // `u` picks a key and a column of the tile.
            #[allow(clippy::needless_range_loop)]
            for u in 0..K {
                let k = T::load8(keys.add(u * stride + i));
                for h in 0..H {
                    acc[h][u] = _mm256_fmadd_ps(x[h], k, acc[h][u]);
                }
            }
            i += 8;
        }
        acc
    }

    /// [`super::KeysT::fill`]: runs of sixteen keys as `[d][16]`, zero lanes past `keys.n`.
    ///
    /// SAFETY: avx2, f16c and avx512f available; `d % 8 == 0`, `keys.fits(d)`,
    /// `out.len() >= keys.n.div_ceil(16) * d * 16`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f")]
    pub(super) unsafe fn transpose_keys<T: KvElem>(
        keys: HeadRows<'_, T>,
        d: usize,
        out: &mut [f32],
    ) {
        let (base, o) = (keys.data.as_ptr().add(keys.offset), out.as_mut_ptr());
        for run in 0..keys.n.div_ceil(16) {
            for half in 0..2 {
                let first = run * 16 + half * 8;
                let rows = keys.n.saturating_sub(first).min(8);
                let mut i = 0;
                while i < d {
                    let mut v = [_mm256_setzero_ps(); 8];
                    for (u, v) in v.iter_mut().enumerate().take(rows) {
                        *v = T::load8(base.add((first + u) * keys.stride + i));
                    }
                    for (r, t) in transpose8(v).into_iter().enumerate() {
                        _mm256_storeu_ps(o.add((run * d + i + r) * 16 + half * 8), t);
                    }
                    i += 8;
                }
            }
        }
    }

    /// [`super::KeysT::scores_heads`], in runs of at most three heads (24 accumulators).
    ///
    /// SAFETY: avx2, fma and avx512f available; `d % 8 == 0`, `qs` whole heads, `kt` holds
    /// `n.div_ceil(16)` runs of `d * 16`, `out` as `super::KeysT::scores_heads` checks.
    #[target_feature(enable = "avx2,fma,f16c,avx512f")]
    pub(super) unsafe fn scores_transposed(
        qs: &[f32],
        d: usize,
        kt: &[f32],
        n: usize,
        scale: f32,
        (out, out_stride): (&mut [f32], usize),
    ) {
        for (i, q) in qs.chunks(3 * d).enumerate() {
            let o = out.as_mut_ptr().add(i * 3 * out_stride);
            let a = (q.as_ptr(), d, kt.as_ptr(), n, scale, o, out_stride);
            match (q.len() / d, d) {
                (3, 64) => scores_transposed_with::<3, 64>(a),
                (3, _) => scores_transposed_with::<3, 0>(a),
                (2, _) => scores_transposed_with::<2, 0>(a),
                _ => scores_transposed_with::<1, 0>(a),
            }
        }
    }

    /// [`scores_transposed`]' arguments for `H` heads: queries, `d`, transposed keys, key
    /// count, scale, output and its stride.
    type TransposedArgs = (*const f32, usize, *const f32, usize, f32, *mut f32, usize);

    /// `H` heads against each run of sixteen keys: head `h`'s accumulator `r` is lane `r` of
    /// [`head_key_dots`]' chain for all sixteen keys at once (`q[i] * k[i]` for `i % 8 == r`,
    /// FMA in index order from zero), reduced in [`hsum`]'s pairing, then scaled. `D` is `d`
    /// when it is a constant worth a fixed trip count, else 0.
    ///
    /// SAFETY: as [`scores_transposed`], `H` heads at `q`, `H` output rows.
    #[inline(always)]
    unsafe fn scores_transposed_with<const H: usize, const D: usize>(
        (q, d, kt, n, scale, out, out_stride): TransposedArgs,
    ) {
        let d = if D == 0 { d } else { D };
        let scale = _mm512_set1_ps(scale);
        for run in 0..n.div_ceil(16) {
            let k = kt.add(run * d * 16);
            let mut acc = [[_mm512_setzero_ps(); 8]; H];
            let mut i = 0;
            while i < d {
                for r in 0..8 {
                    let kv = _mm512_loadu_ps(k.add((i + r) * 16));
                    for (h, acc) in acc.iter_mut().enumerate() {
                        acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(*q.add(h * d + i + r)), kv, acc[r]);
                    }
                }
                i += 8;
            }
            let lanes = (n - run * 16).min(16);
            let mask = (u32::MAX >> (32 - lanes)) as __mmask16;
            for (h, a) in acc.iter().enumerate() {
                let s = _mm512_add_ps(
                    _mm512_add_ps(_mm512_add_ps(a[0], a[4]), _mm512_add_ps(a[2], a[6])),
                    _mm512_add_ps(_mm512_add_ps(a[1], a[5]), _mm512_add_ps(a[3], a[7])),
                );
                let o = out.add(h * out_stride + run * 16);
                _mm512_mask_storeu_ps(o, mask, _mm512_mul_ps(s, scale));
            }
        }
    }

    /// [`super::weighted_sum_heads`] for 1-4 heads, `width % 8 == 0`: `L` vectors of columns
    /// per head in registers, `L` as large as the registers allow; with `wide` (AVX-512), 16
    /// columns a vector in [`weighted_heads_wide`].
    ///
    /// SAFETY: avx2, fma and f16c available, and avx512f and avx512vl with `wide`; the lengths
    /// `super::weighted_sum_heads` checks.
    pub(super) unsafe fn weighted_sum_heads<T: KvElem>(
        wide: bool,
        ys: &mut [f32],
        heads: usize,
        (p, p_stride): (&[f32], usize),
        values: HeadRows<'_, T>,
    ) {
        let a = (ys, p, p_stride, values);
        match (heads, wide) {
            (1, _) => weighted_heads_avx2::<T, 1, 8>(a),
            (2, false) => weighted_heads_avx2::<T, 2, 4>(a),
            (3, false) => weighted_heads_avx2::<T, 3, 2>(a),
            (4, false) => weighted_heads_avx2::<T, 4, 2>(a),
            (2, true) => weighted_heads_wide::<T, 2>(a),
            (3, true) => weighted_heads_wide::<T, 3>(a),
            _ => weighted_heads_wide::<T, 4>(a),
        }
    }

    /// [`super::weighted_sum_heads`]' arguments.
    type WeightedHeadsArgs<'a, 'v, T> = (&'a mut [f32], &'a [f32], usize, HeadRows<'v, T>);

    /// SAFETY: avx2, fma and f16c available; as [`weighted_sum_heads`].
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn weighted_heads_avx2<T: KvElem, const H: usize, const L: usize>(
        a: WeightedHeadsArgs<'_, '_, T>,
    ) {
        weighted_heads_with::<Ymm, T, H, L>(a)
    }

    /// 512-bit registers ([`Zmm`]): 64 columns a pass (four vectors per head). Each lane is a
    /// column whose rows are added in `j` order as in the 256-bit kernel, so the same bits with
    /// half the instructions.
    ///
    /// SAFETY: avx2, fma, f16c, avx512f and avx512vl available; as [`weighted_sum_heads`].
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
    unsafe fn weighted_heads_wide<T: KvElem, const H: usize>(a: WeightedHeadsArgs<'_, '_, T>) {
        weighted_heads_with::<Zmm, T, H, 4>(a)
    }

    /// The columns `W::N * L` at a time, then in narrower passes of `W`'s registers, then (on
    /// registers wider than 8 lanes) a last 8 columns on 256-bit ones.
    ///
    /// SAFETY: as [`weighted_heads_columns`] for `W` (and AVX2), `ys.len() == H * width`,
    /// `width % 8 == 0`.
    #[inline(always)]
    unsafe fn weighted_heads_with<W: Lanes, T: KvElem, const H: usize, const L: usize>(
        (ys, p, p_stride, values): WeightedHeadsArgs<'_, '_, T>,
    ) {
        let (width, n) = (ys.len() / H, W::N);
        let mut c = 0;
        while c + n * L <= width {
            weighted_heads_columns::<W, T, H, L>(ys, width, c, (p, p_stride), values);
            c += n * L;
        }
        // Narrower passes for what is left (all of a split task's columns, when they are fewer
        // than `N * L`).
        if L > 4 {
            while c + 4 * n <= width {
                weighted_heads_columns::<W, T, H, 4>(ys, width, c, (p, p_stride), values);
                c += 4 * n;
            }
        }
        if L > 2 {
            while c + 2 * n <= width {
                weighted_heads_columns::<W, T, H, 2>(ys, width, c, (p, p_stride), values);
                c += 2 * n;
            }
        }
        while c + n <= width {
            weighted_heads_columns::<W, T, H, 1>(ys, width, c, (p, p_stride), values);
            c += n;
        }
        while c < width {
            weighted_heads_columns::<Ymm, T, H, 1>(ys, width, c, (p, p_stride), values);
            c += 8;
        }
    }

    /// A register of `f32` lanes for [`weighted_heads_columns`]: 256-bit ([`Ymm`]) or 512-bit
    /// ([`Zmm`]), the same operations lane by lane.
    trait Lanes {
        type V: Copy;
        /// Lanes per register.
        const N: usize;
        unsafe fn zero() -> Self::V;
        unsafe fn load(p: *const f32) -> Self::V;
        /// `N` K/V values widened to `f32`.
        unsafe fn load_kv<T: KvElem>(p: *const T) -> Self::V;
        unsafe fn store(p: *mut f32, v: Self::V);
        unsafe fn splat(x: f32) -> Self::V;
        /// `a * b + c`, fused.
        unsafe fn fmadd(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    }

    /// AVX2's 256-bit registers.
    struct Ymm;

    impl Lanes for Ymm {
        type V = __m256;
        const N: usize = 8;
        #[inline(always)]
        unsafe fn zero() -> __m256 {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn load_kv<T: KvElem>(p: *const T) -> __m256 {
            T::load8(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            _mm256_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m256 {
            _mm256_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn fmadd(a: __m256, b: __m256, c: __m256) -> __m256 {
            _mm256_fmadd_ps(a, b, c)
        }
    }

    /// AVX-512's 512-bit registers (avx512f available).
    struct Zmm;

    impl Lanes for Zmm {
        type V = __m512;
        const N: usize = 16;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn load_kv<T: KvElem>(p: *const T) -> __m512 {
            T::load16(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            _mm512_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m512 {
            _mm512_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn fmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, c)
        }
    }

    /// Columns `c..c + W::N * L` of each head's output: `y_h += sum_j p_h[j] * row_j`, rows in
    /// `j` order, the `H * L` accumulators in registers.
    ///
    /// SAFETY: `W`'s instruction set and f16c available; `c + W::N * L <= width`,
    /// `ys.len() == H * width`, the weights and rows `super::weighted_sum_heads` checks.
    #[inline(always)]
    unsafe fn weighted_heads_columns<W: Lanes, T: KvElem, const H: usize, const L: usize>(
        ys: &mut [f32],
        width: usize,
        c: usize,
        (p, p_stride): (&[f32], usize),
        values: HeadRows<'_, T>,
    ) {
        let (yp, pp) = (ys.as_mut_ptr().add(c), p.as_ptr());
        let base = values.data.as_ptr().add(values.offset + c);
        let mut acc = [[W::zero(); L]; H];
        for (h, a) in acc.iter_mut().enumerate() {
            for (l, a) in a.iter_mut().enumerate() {
                *a = W::load(yp.add(h * width + W::N * l));
            }
        }
        for j in 0..values.n {
            let row = base.add(j * values.stride);
            let mut w = [W::zero(); H];
            for (h, w) in w.iter_mut().enumerate() {
                *w = W::splat(*pp.add(h * p_stride + j));
            }
            // `l` picks a vector of the row and a column of the tile.
            #[allow(clippy::needless_range_loop)]
            for l in 0..L {
                let v = W::load_kv(row.add(W::N * l));
                for h in 0..H {
                    acc[h][l] = W::fmadd(w[h], v, acc[h][l]);
                }
            }
        }
        for (h, a) in acc.iter().enumerate() {
            for (l, a) in a.iter().enumerate() {
                W::store(yp.add(h * width + W::N * l), *a);
            }
        }
    }

    /// SAFETY: avx2, fma and f16c available; `values.fits(y.len())`, `p.len() >= values.n`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn weighted_sum<T: KvElem>(
        y: &mut [f32],
        p: &[f32],
        values: HeadRows<'_, T>,
    ) {
        // Whole vectors as one head of the multi-head kernel (64 columns a pass in registers,
        // so the FMA chains of different columns overlap; each column still adds its rows in
        // `j` order), then the columns after the last whole vector one by one.
        let (y, tail) = y.split_at_mut(y.len() / 8 * 8);
        weighted_heads_with::<Ymm, T, 1, 8>((y, p, values.n, values));
        let (first, base) = (y.len(), values.data.as_ptr().add(values.offset));
        for (i, y) in tail.iter_mut().enumerate() {
            for (j, &a) in p[..values.n].iter().enumerate() {
                *y = a.mul_add((*base.add(j * values.stride + first + i)).to_f32(), *y);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One SIMD implementation of `exp_shifted` and `swiglu` (each does whole vectors of
    /// eight and returns how many elements it did).
    struct SimdPath {
        name: &'static str,
        exp: unsafe fn(&mut [f32], f32) -> usize,
        swiglu: unsafe fn(&[f32], &[f32], &mut [f32]) -> usize,
    }

    /// Every SIMD path this CPU runs.
    fn simd_paths() -> Vec<SimdPath> {
        let mut all = Vec::new();
        #[cfg(target_arch = "x86_64")]
        if Isa::detect() == Isa::Avx2 {
            all.push(SimdPath {
                name: "avx2",
                exp: avx2::exp_shifted,
                swiglu: avx2::swiglu,
            });
            if has_avx512f() {
                all.push(SimdPath {
                    name: "avx512",
                    exp: avx2::exp_shifted_avx512,
                    swiglu: avx2::swiglu_avx512,
                });
            }
        }
        all
    }

    /// `exp_shifted` on every `stride`-th f32 bit pattern (NaNs and infinities included)
    /// against `f32::exp`, bit for bit. Only glibc's `expf` is the reference the AVX2 path
    /// reproduces, so elsewhere there is nothing to compare.
    fn exp_agrees_with_libm(stride: usize) {
        if !cfg!(all(target_os = "linux", target_env = "gnu")) || Isa::detect() == Isa::Scalar {
            return;
        }
        let paths = simd_paths();
        let mut batch = Vec::with_capacity(1 << 16);
        let check = |batch: &mut Vec<f32>| {
            for &SimdPath { name, exp, .. } in &paths {
                let mut got = batch.clone();
                // SAFETY: `simd_paths` lists only what this CPU runs.
                let done = unsafe { exp(&mut got, 0.0) };
                got[done..].iter_mut().for_each(|v| *v = v.exp());
                for (x, e) in batch.iter().zip(&got) {
                    let want = x.exp();
                    assert!(
                        want.to_bits() == e.to_bits() || (want.is_nan() && e.is_nan()),
                        "{name}: exp({x:e}) = {e:e}, f32::exp gives {want:e}"
                    );
                }
            }
            batch.clear();
        };
        for bits in (0..=u32::MAX).step_by(stride) {
            batch.push(f32::from_bits(bits));
            if batch.len() == batch.capacity() {
                check(&mut batch);
            }
        }
        // Around the fast path's edges and the softmax's usual range, densely.
        let edges = [-103.98f32, -103.27, -88.73, -87.99, -1.0, 0.0, 87.99, 88.73];
        for e in edges {
            batch.extend((0..4096).map(|i| e + (i as f32 - 2048.0) * 1e-4));
        }
        batch.extend([
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MIN_POSITIVE,
            -0.0,
        ]);
        check(&mut batch);
    }

    #[test]
    fn exp_is_the_c_librarys_expf() {
        exp_agrees_with_libm(251);
    }

    /// All 2^32 inputs; minutes on two cores, so run on demand (`--ignored`).
    #[test]
    #[ignore]
    fn exp_is_the_c_librarys_expf_for_every_input() {
        exp_agrees_with_libm(1);
    }

    #[test]
    fn swiglu_simd_gives_the_scalar_bits() {
        let gate: Vec<f32> = (0..1001)
            .map(|i| ((i as f32) * 0.37).sin() * [1.0, 10.0, 95.0, 150.0][i % 4])
            .collect();
        let up: Vec<f32> = (0..1001).map(|i| ((i as f32) * 0.11).cos() * 3.0).collect();
        let (mut scalar, mut simd) = (vec![0f32; 1001], vec![0f32; 1001]);
        swiglu(Isa::Scalar, &gate, &up, &mut scalar);
        swiglu(Isa::detect(), &gate, &up, &mut simd);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&scalar), bits(&simd));
        for SimdPath {
            name,
            swiglu: simd_swiglu,
            ..
        } in simd_paths()
        {
            let mut each = vec![0f32; 1001];
            // SAFETY: `simd_paths` lists only what this CPU runs; equal lengths.
            let done = unsafe { simd_swiglu(&gate, &up, &mut each) };
            assert_eq!(done, 1000, "{name}");
            assert_eq!(bits(&scalar[..done]), bits(&each[..done]), "{name}");
        }
    }

    /// `a · b` through [`scores`] (one key row, scale 1).
    fn dot(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
        let row = HeadRows {
            data: b,
            stride: b.len(),
            offset: 0,
            n: 1,
        };
        let mut out = [0f32];
        scores(isa, a, row, 1.0, &mut out);
        out[0]
    }

    #[test]
    fn simd_and_scalar_agree_on_odd_lengths() {
        let a: Vec<f32> = (0..70).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..70).map(|i| (i as f32 * 0.11).cos()).collect();
        let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        for isa in [Isa::Scalar, Isa::detect()] {
            assert!((dot(isa, &a, &b) as f64 - exact).abs() < 1e-4);
            // One value row of 70: `y += 0.5 * a`.
            let mut y = b.clone();
            let rows = HeadRows {
                data: &a,
                stride: a.len(),
                offset: 0,
                n: 1,
            };
            weighted_sum(isa, &mut y, &[0.5], rows);
            for ((y, a), b) in y.iter().zip(&a).zip(&b) {
                assert!((y - (b + 0.5 * a)).abs() < 1e-6);
            }
        }
    }

    fn wave(n: usize, f: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * f + 0.3).sin() * 3.0).collect()
    }

    /// Scores, softmax and weighted sum give the bits of candle's `q k^T`, `softmax_last_dim`
    /// and `p V` for a decode-shaped attention row (one query, `n` positions, head dim 64),
    /// on both instruction sets where candle takes the same path.
    #[test]
    fn attention_steps_equal_candles_ops_bit_for_bit() -> candle_core::Result<()> {
        use candle_core::{Device, Tensor};
        let d = 64;
        for n in [1usize, 2, 7, 31, 32, 45, 100, 256] {
            let q = wave(d, 0.37);
            let k = wave(n * d, 0.11);
            let v = wave(n * d, 0.23);
            let scale = 1.0 / (d as f32).sqrt();
            let dev = &Device::Cpu;
            let qt = Tensor::from_vec(q.clone(), (1, d), dev)?;
            let kt = Tensor::from_vec(k.clone(), (n, d), dev)?;
            let vt = Tensor::from_vec(v.clone(), (n, d), dev)?;
            let att = (qt.matmul(&kt.t()?)? / (d as f64).sqrt())?;
            let want_scores = att.flatten_all()?.to_vec1::<f32>()?;
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let want_probs = att.flatten_all()?.to_vec1::<f32>()?;
            let want_out = att.matmul(&vt)?.flatten_all()?.to_vec1::<f32>()?;
            // candle's own AVX2 detection decides its softmax sum; ours must follow the same.
            let isas = if Isa::detect() == Isa::Scalar {
                vec![Isa::Scalar]
            } else {
                vec![Isa::detect()]
            };
            for isa in isas {
                let keys = HeadRows {
                    data: &k,
                    stride: d,
                    offset: 0,
                    n,
                };
                let mut p = vec![0f32; n];
                scores(isa, &q, keys, scale, &mut p);
                assert_eq!(p, want_scores, "{isa:?} scores, n = {n}");
                softmax(isa, &mut p);
                assert_eq!(p, want_probs, "{isa:?} softmax, n = {n}");
                let mut out = vec![0f32; d];
                let values = HeadRows { data: &v, ..keys };
                if n == 2 {
                    weighted_pair(&mut out, [p[0], p[1]], values);
                } else {
                    weighted_sum(isa, &mut out, &p, values);
                }
                assert_eq!(out, want_out, "{isa:?} weighted sum, n = {n}");
            }
        }
        Ok(())
    }

    /// Several heads at once give each head's `weighted_sum` and `scores` bits: 1-9 heads (in
    /// runs of at most four), widths the tiles take whole, in narrower passes, or leave to the
    /// per-head path.
    #[test]
    fn multi_head_kernels_equal_the_per_head_kernels() {
        let v = wave(37 * 200, 0.29);
        multi_head_equals_per_head(&v);
        let v: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
        multi_head_equals_per_head(&v);
    }

    /// [`multi_head_kernels_equal_the_per_head_kernels`] on K/V rows of type `T` (rows of 200).
    fn multi_head_equals_per_head<T: KvElem>(v: &[T]) {
        let isa = Isa::detect();
        let stride = 200usize;
        // Key counts below one tile, whole tiles, and tiles plus four-key and one-key tails.
        for (heads, n) in (1..=9usize).flat_map(|h| [3usize, 16, 37].map(|n| (h, n))) {
            let p_stride = n + 3;
            let p = wave(heads * p_stride, 0.1 + heads as f32);
            for width in [64usize, 32, 16, 8, 24, 12] {
                let values = HeadRows {
                    data: v,
                    stride,
                    offset: 16,
                    n,
                };
                let mut together = wave(heads * width, 0.5);
                let mut apart = together.clone();
                weighted_sum_heads(isa, &mut together, heads, (&p, p_stride), values);
                for (h, y) in apart.chunks_exact_mut(width).enumerate() {
                    weighted_sum(isa, y, &p[h * p_stride..][..n], values);
                }
                assert_eq!(
                    together, apart,
                    "weighted sums, {heads} heads, width {width}, n {n}"
                );

                let qs = wave(heads * width, 0.37);
                let out_stride = n + 5;
                let mut together = vec![0f32; heads * out_stride];
                let mut apart = together.clone();
                scores_heads(isa, &qs, width, values, 0.125, (&mut together, out_stride));
                for (h, q) in qs.chunks_exact(width).enumerate() {
                    scores(isa, q, values, 0.125, &mut apart[h * out_stride..][..n]);
                }
                assert_eq!(
                    together, apart,
                    "scores, {heads} heads, width {width}, n {n}"
                );

                // Keys transposed into runs of sixteen (AVX-512F): every prefix of the keys.
                if KeysT::supported(isa, width) {
                    let mut kt = KeysT::default();
                    kt.fill(isa, values, width);
                    for m in [n, n - 1, n.min(16), 1] {
                        let mut t = vec![0f32; heads * out_stride];
                        kt.scores_heads(&qs, m, 0.125, (&mut t, out_stride));
                        let want: Vec<f32> = (0..heads * out_stride)
                            .map(|i| if i % out_stride < m { apart[i] } else { 0.0 })
                            .collect();
                        assert_eq!(
                            t, want,
                            "transposed scores, {heads} heads, width {width}, n {n}, first {m}"
                        );
                    }
                }

                // The 16-register tiles a CPU without AVX-512VL gets.
                #[cfg(target_arch = "x86_64")]
                if isa == Isa::Avx2 && (1..=4).contains(&heads) && width % 8 == 0 {
                    let mut narrow = vec![0f32; heads * out_stride];
                    // SAFETY: AVX2 detected; the lengths are the checked call's above.
                    unsafe {
                        avx2::scores_heads(
                            false,
                            &qs,
                            width,
                            values,
                            0.125,
                            (&mut narrow, out_stride),
                        )
                    };
                    assert_eq!(
                        narrow, apart,
                        "narrow scores, {heads} heads, width {width}, n {n}"
                    );
                    let mut narrow = wave(heads * width, 0.5);
                    let mut wide = narrow.clone();
                    // SAFETY: as above, against the checked public call.
                    unsafe {
                        avx2::weighted_sum_heads(false, &mut narrow, heads, (&p, p_stride), values)
                    };
                    weighted_sum_heads(isa, &mut wide, heads, (&p, p_stride), values);
                    assert_eq!(
                        narrow, wide,
                        "narrow weighted sums, {heads} heads, width {width}, n {n}"
                    );
                }
            }
        }
    }

    /// The scalar path computes the AVX2 path's bits, tails included.
    #[test]
    fn scores_and_weighted_sums_are_the_same_bits_on_both_instruction_sets() {
        // Head widths with 64-column passes, 8-column passes and scalar tails; key counts that
        // use the eight-key, four-key and one-key score paths; rows strided inside a wider
        // slot (offset 8), as the KV store lays out several KV heads.
        let isa = Isa::detect();
        for d in [8usize, 64, 72, 136, 13] {
            for n in [1usize, 3, 4, 8, 12, 15, 16, 29] {
                let stride = d + 16;
                let q = wave(d, 0.37);
                let kv = wave(n * stride, 0.11);
                let rows = HeadRows {
                    data: &kv,
                    stride,
                    offset: 8,
                    n,
                };
                let (mut want, mut got) = (vec![0f32; n], vec![0f32; n]);
                scores(Isa::Scalar, &q, rows, 0.125, &mut want);
                scores(isa, &q, rows, 0.125, &mut got);
                assert_eq!(got, want, "scores, d = {d}, n = {n}");
                let p = wave(n, 0.7);
                let (mut want, mut got) = (wave(d, 0.3), wave(d, 0.3));
                weighted_sum(Isa::Scalar, &mut want, &p, rows);
                weighted_sum(isa, &mut got, &p, rows);
                assert_eq!(got, want, "weighted sum, d = {d}, n = {n}");
            }
        }
    }

    /// The vector maximum is `f32::max`'s fold: wherever the largest element is (in a whole
    /// chunk or the tail), with NaNs among the values, and for all -inf.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_max_is_the_scalar_fold() {
        if Isa::detect() == Isa::Scalar {
            return;
        }
        for n in [1usize, 7, 32, 33, 64, 100, 517] {
            for at in [0, n / 2, n - 1] {
                let mut x = wave(n, 0.37);
                x[at] = 9.5;
                if n > 3 {
                    x[(at + 1) % n] = f32::NAN;
                }
                let want = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                // SAFETY: AVX2 detected above.
                assert_eq!(unsafe { avx2::max(&x) }, want, "n = {n}, max at {at}");
            }
            let x = vec![f32::NEG_INFINITY; n];
            // SAFETY: as above.
            assert_eq!(unsafe { avx2::max(&x) }, f32::NEG_INFINITY);
        }
    }

    /// The one-pass AVX softmax (both exponential kernels) gives the bits of the three passes
    /// it replaced: `f32::exp` of each shifted element, [`chunked_sum`], a division each.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn one_pass_softmax_equals_exp_then_chunked_sum_then_division() {
        if Isa::detect() == Isa::Scalar {
            return;
        }
        let lengths = (0..=100).chain([127, 128, 129, 255, 257, 1000, 1031]);
        for n in lengths {
            let mut x = wave(n, 0.91);
            // Far below the maximum (exp's slow path, `|x - max| >= 88`), in a whole chunk and
            // in the tail.
            for i in [3usize, n.saturating_sub(2)] {
                if i < n && n > 4 {
                    x[i] = -120.0;
                }
            }
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut want: Vec<f32> = x.iter().map(|v| (v - max).exp()).collect();
            let sum = chunked_sum(&want);
            want.iter_mut().for_each(|v| *v /= sum);
            let mut got = x.clone();
            // SAFETY: AVX2 and FMA detected above.
            unsafe { avx2::exp_normalize(&mut got, max) };
            assert_eq!(got, want, "AVX2, n = {n}");
            if has_avx512f() {
                let mut got = x.clone();
                // SAFETY: AVX-512F detected.
                unsafe { avx2::exp_normalize_avx512(&mut got, max) };
                assert_eq!(got, want, "AVX-512, n = {n}");
            }
        }
    }

    #[test]
    fn dot_and_softmax_are_the_same_on_both_instruction_sets() {
        let isa = Isa::detect();
        for n in [1usize, 5, 8, 13, 64, 70] {
            let (a, b) = (wave(n, 0.37), wave(n, 0.11));
            assert_eq!(dot(Isa::Scalar, &a, &b), dot(isa, &a, &b), "dot, n = {n}");
        }
        // Below one 32-element chunk candle's AVX2 sum is the sequential sum.
        let mut x = wave(31, 0.7);
        let mut y = x.clone();
        softmax(Isa::Scalar, &mut x);
        softmax(isa, &mut y);
        assert_eq!(x, y);
        let total: f32 = x.iter().sum();
        assert!((total - 1.0).abs() < 1e-6);
    }

    #[test]
    fn rms_norm_rows_are_candles_bits_in_groups_and_alone() -> candle_core::Result<()> {
        // 19 rows: two groups of eight summed together, then three rows one by one; widths
        // of whole vectors and with a tail of columns.
        for n in [576, 52, 5] {
            rms_norm_against_candle(19, n)?;
        }
        Ok(())
    }

    fn rms_norm_against_candle(rows: usize, n: usize) -> candle_core::Result<()> {
        let x: Vec<f32> = (0..rows * n)
            .map(|i| ((i as f32) * 0.377).sin() * (1.0 + (i % 97) as f32))
            .collect();
        let w: Vec<f32> = (0..n).map(|i| 0.5 + (i as f32 * 0.01).cos()).collect();
        let mut out = vec![0f32; rows * n];
        rms_norm(&x, &w, 1e-5, &mut out);
        let dev = candle_core::Device::Cpu;
        let reference = candle_nn::ops::rms_norm(
            &candle_core::Tensor::from_slice(&x, (rows, n), &dev)?,
            &candle_core::Tensor::from_slice(&w, n, &dev)?,
            1e-5,
        )?;
        assert_eq!(out, reference.flatten_all()?.to_vec1::<f32>()?, "width {n}");
        for (r, expected) in out.chunks_exact(n).enumerate() {
            let mut one = vec![0f32; n];
            rms_norm(&x[r * n..(r + 1) * n], &w, 1e-5, &mut one);
            assert_eq!(one, expected, "width {n}, row {r}");
        }
        Ok(())
    }

    #[test]
    fn rms_norm_scales_rows_to_unit_rms() {
        let x = [3.0f32, 4.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0];
        let mut out = [0f32; 8];
        rms_norm(&x, &[1.0, 1.0, 1.0, 2.0], 0.0, &mut out);
        assert!((out[0] - 1.2).abs() < 1e-6 && (out[1] - 1.6).abs() < 1e-6);
        assert_eq!(&out[4..], &[1.0, 1.0, 1.0, 2.0]);
    }
}
