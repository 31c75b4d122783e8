//! f32 vector helpers for the CPU model path: attention scores, softmax and weighted sums, and
//! the element-wise RMSNorm and SwiGLU the layers apply to each row.
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

/// In place: `x[i] = exp(x[i] - max) / sum_j exp(x[j] - max)`, with candle's
/// `softmax_last_dim` arithmetic (`f32::exp`, the sum as candle's `vec_sum` orders it for `isa`,
/// then a division per element). An empty slice is left as it is.
pub fn softmax(isa: Isa, x: &mut [f32]) {
    let Some(max) = x.iter().copied().reduce(f32::max) else {
        return;
    };
    for v in x.iter_mut() {
        *v = (*v - max).exp();
    }
    let sum = match isa {
        Isa::Scalar => x.iter().fold(0.0f32, |s, &v| s + v),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => chunked_sum(x),
    };
    for v in x.iter_mut() {
        *v /= sum;
    }
}

/// candle's AVX `vec_sum`: 32-element chunks into four 8-lane accumulators, the accumulators
/// reduced as `((a0 + a1) + (a2 + a3))`, its lanes as `(l0 + l4) + (l1 + l5)` +
/// `(l2 + l6) + (l3 + l7)`, then the elements after the last whole chunk added one by one.
#[cfg(target_arch = "x86_64")]
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
#[derive(Clone, Copy)]
pub struct HeadRows<'a> {
    pub data: &'a [f32],
    pub stride: usize,
    pub offset: usize,
    pub n: usize,
}

impl HeadRows<'_> {
    /// Whether every row `offset..offset + d` lies inside `data`.
    fn fits(&self, d: usize) -> bool {
        self.offset + d <= self.stride
            && (self.n == 0 || (self.n - 1) * self.stride + self.offset + d <= self.data.len())
    }

    fn row(&self, j: usize, d: usize) -> &[f32] {
        &self.data[j * self.stride + self.offset..][..d]
    }
}

/// Attention scores of one query head against one block: `out[j] = scale * q · k_j`, each dot
/// product as `gemm`'s horizontal kernel orders it: lane `i % 8` accumulates `q[i] * k[i]` with
/// FMA in index order, then the lanes are summed pairwise (`(l0 + l4) + (l2 + l6)` +
/// `(l1 + l5) + (l3 + l7)`).
pub fn scores(isa: Isa, q: &[f32], keys: HeadRows<'_>, scale: f32, out: &mut [f32]) {
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
pub fn weighted_sum(isa: Isa, y: &mut [f32], p: &[f32], values: HeadRows<'_>) {
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
                    .for_each(|(y, &x)| *y = a.mul_add(x, *y));
            }
        }
        // SAFETY: `Avx2` only comes from runtime detection; every row checked by `fits`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::weighted_sum(y, p, values) },
    }
}

/// [`weighted_sum`] for several heads over the same value rows: `ys` holds one `width`-wide
/// output per head, `ps[h]` that head's weights. The heads' FMA chains run interleaved, so a
/// narrow slice of columns is not bound by FMA latency; each output element still adds its rows
/// in `j` order, so the bits are [`weighted_sum`]'s.
pub fn weighted_sum_heads(isa: Isa, ys: &mut [f32], ps: &[&[f32]], values: HeadRows<'_>) {
    let width = ys.len() / ps.len().max(1);
    assert!(
        ys.len() == width * ps.len()
            && values.fits(width)
            && ps.iter().all(|p| p.len() >= values.n),
        "weighted_sum_heads: lengths"
    );
    match isa {
        // SAFETY: `Avx2` only comes from runtime detection; lengths checked above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if width == 16 && ps.len() <= 4 => unsafe {
            avx2::weighted_sum_heads::<2>(ys, ps, values)
        },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if width == 32 && ps.len() <= 4 => unsafe {
            avx2::weighted_sum_heads::<4>(ys, ps, values)
        },
        _ => {
            for (y, p) in ys.chunks_exact_mut(width).zip(ps) {
                weighted_sum(isa, y, p, values);
            }
        }
    }
}

/// Asks for the cache lines of the first `width` floats of every row of `rows` ahead of their
/// use (a hint that changes no result: the KV cache of a long context comes from memory, and
/// each task's short run of rows is over before the hardware prefetcher ramps up).
pub fn prefetch_rows(rows: HeadRows<'_>, width: usize) {
    #[cfg(target_arch = "x86_64")]
    if rows.fits(width) {
        for j in 0..rows.n {
            for line in rows.row(j, width).chunks(16) {
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
pub fn weighted_pair(y: &mut [f32], p: [f32; 2], values: HeadRows<'_>) {
    let d = y.len();
    assert!(values.fits(d) && values.n == 2, "weighted_pair: lengths");
    let (v0, v1) = (values.row(0, d), values.row(1, d));
    for ((y, &a), &b) in y.iter_mut().zip(v0).zip(v1) {
        *y = p[1] * b + p[0] * a;
    }
}

/// One dot product in [`scores`]' order, with `f32::mul_add` (a fused multiply-add, as the
/// AVX2 path uses).
fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        lanes[i % 8] = x.mul_add(y, lanes[i % 8]);
    }
    let t0: [f32; 4] = std::array::from_fn(|l| lanes[l] + lanes[l + 4]);
    (t0[0] + t0[2]) + (t0[1] + t0[3])
}

/// RMSNorm of each `weight.len()`-wide row of `x` into `out`, as candle computes it.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let n = weight.len();
    assert_eq!(x.len(), out.len(), "rms_norm: lengths");
    for (src, dst) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let sum2 = src.iter().map(|&v| v * v).sum::<f32>();
        let m = (sum2 / n as f32 + eps).sqrt();
        for ((d, &s), &w) in dst.iter_mut().zip(src).zip(weight) {
            *d = s / m * w;
        }
    }
}

/// SwiGLU: `out[i] = silu(gate[i]) * up[i]`.
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::HeadRows;
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)))
    }

    /// SAFETY: avx2 and fma available; `a.len() == b.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(ap.add(i)), _mm256_loadu_ps(bp.add(i)), acc);
            i += 8;
        }
        if i < n {
            // The tail goes into the low lanes, zero-padded, as gemm's masked load does.
            let (mut x, mut y) = ([0f32; 8], [0f32; 8]);
            x[..n - i].copy_from_slice(&a[i..]);
            y[..n - i].copy_from_slice(&b[i..]);
            acc = _mm256_fmadd_ps(
                _mm256_loadu_ps(x.as_ptr()),
                _mm256_loadu_ps(y.as_ptr()),
                acc,
            );
        }
        hsum(acc)
    }

    /// SAFETY: avx2 and fma available; `keys.fits(q.len())`, `out.len() >= keys.n`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scores(q: &[f32], keys: HeadRows<'_>, scale: f32, out: &mut [f32]) {
        let d = q.len();
        if !d.is_multiple_of(8) {
            for (j, o) in out[..keys.n].iter_mut().enumerate() {
                *o = dot(q, keys.row(j, d)) * scale;
            }
            return;
        }
        // Four keys at a time: four independent FMA chains per query load, each in `dot`'s
        // order, so the scores are the one-key path's bits.
        let (qp, base) = (q.as_ptr(), keys.data.as_ptr().add(keys.offset));
        let mut j = 0;
        while j + 4 <= keys.n {
            let k: [*const f32; 4] = std::array::from_fn(|u| base.add((j + u) * keys.stride));
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i < d {
                let x = _mm256_loadu_ps(qp.add(i));
                for (a, kp) in acc.iter_mut().zip(k) {
                    *a = _mm256_fmadd_ps(x, _mm256_loadu_ps(kp.add(i)), *a);
                }
                i += 8;
            }
            for (u, a) in acc.into_iter().enumerate() {
                out[j + u] = hsum(a) * scale;
            }
            j += 4;
        }
        for (jj, o) in out[j..keys.n].iter_mut().enumerate() {
            *o = dot(q, keys.row(j + jj, d)) * scale;
        }
    }

    /// `L` lanes of 8 columns per head.
    ///
    /// SAFETY: avx2 and fma available; `ys.len() == 8 * L * ps.len()`, `ps.len() <= 4`,
    /// `values.fits(8 * L)`, every `p.len() >= values.n`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn weighted_sum_heads<const L: usize>(
        ys: &mut [f32],
        ps: &[&[f32]],
        values: HeadRows<'_>,
    ) {
        let (heads, w) = (ps.len(), 8 * L);
        let (yp, base) = (ys.as_mut_ptr(), values.data.as_ptr().add(values.offset));
        let mut acc = [[_mm256_setzero_ps(); L]; 4];
        for (h, a) in acc[..heads].iter_mut().enumerate() {
            for (l, a) in a.iter_mut().enumerate() {
                *a = _mm256_loadu_ps(yp.add(w * h + 8 * l));
            }
        }
        for j in 0..values.n {
            let row = base.add(j * values.stride);
            let v: [__m256; L] = std::array::from_fn(|l| _mm256_loadu_ps(row.add(8 * l)));
            for (a, p) in acc[..heads].iter_mut().zip(ps) {
                let wj = _mm256_set1_ps(*p.get_unchecked(j));
                for (a, v) in a.iter_mut().zip(v) {
                    *a = _mm256_fmadd_ps(wj, v, *a);
                }
            }
        }
        for (h, a) in acc[..heads].iter().enumerate() {
            for (l, a) in a.iter().enumerate() {
                _mm256_storeu_ps(yp.add(w * h + 8 * l), *a);
            }
        }
    }

    /// SAFETY: avx2 and fma available; `values.fits(y.len())`, `p.len() >= values.n`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn weighted_sum(y: &mut [f32], p: &[f32], values: HeadRows<'_>) {
        let d = y.len();
        let (yp, base) = (y.as_mut_ptr(), values.data.as_ptr().add(values.offset));
        let mut i = 0;
        // Up to 64 columns per pass in registers, so the FMA chains of different columns
        // overlap; each column still adds its rows in `j` order.
        while i + 8 <= d {
            let lanes = ((d - i) / 8).min(8);
            let mut acc = [_mm256_setzero_ps(); 8];
            for (c, a) in acc[..lanes].iter_mut().enumerate() {
                *a = _mm256_loadu_ps(yp.add(i + 8 * c));
            }
            for (j, &a) in p[..values.n].iter().enumerate() {
                let w = _mm256_set1_ps(a);
                let row = base.add(j * values.stride + i);
                for (c, acc) in acc[..lanes].iter_mut().enumerate() {
                    *acc = _mm256_fmadd_ps(w, _mm256_loadu_ps(row.add(8 * c)), *acc);
                }
            }
            for (c, a) in acc[..lanes].iter().enumerate() {
                _mm256_storeu_ps(yp.add(i + 8 * c), *a);
            }
            i += 8 * lanes;
        }
        while i < d {
            for (j, &a) in p[..values.n].iter().enumerate() {
                *yp.add(i) = a.mul_add(*base.add(j * values.stride + i), *yp.add(i));
            }
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// Several heads at once give each head's `weighted_sum` bits.
    #[test]
    fn weighted_sum_heads_equals_weighted_sum_per_head() {
        let isa = Isa::detect();
        let (stride, n) = (48usize, 37usize);
        let v = wave(n * stride, 0.29);
        let ps: Vec<Vec<f32>> = (0..3).map(|h| wave(n, 0.1 + h as f32)).collect();
        let refs: Vec<&[f32]> = ps.iter().map(|p| p.as_slice()).collect();
        for width in [32usize, 16, 8] {
            let values = HeadRows {
                data: &v,
                stride,
                offset: 16,
                n,
            };
            let mut together = wave(3 * width, 0.5);
            let mut apart = together.clone();
            weighted_sum_heads(isa, &mut together, &refs, values);
            for (y, p) in apart.chunks_exact_mut(width).zip(&refs) {
                weighted_sum(isa, y, p, values);
            }
            assert_eq!(together, apart, "width {width}");
        }
    }

    /// The scalar path computes the AVX2 path's bits, tails included.
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
    fn rms_norm_scales_rows_to_unit_rms() {
        let x = [3.0f32, 4.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0];
        let mut out = [0f32; 8];
        rms_norm(&x, &[1.0, 1.0, 1.0, 2.0], 0.0, &mut out);
        assert!((out[0] - 1.2).abs() < 1e-6 && (out[1] - 1.6).abs() < 1e-6);
        assert_eq!(&out[4..], &[1.0, 1.0, 1.0, 2.0]);
    }
}
