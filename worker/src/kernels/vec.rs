//! f32 vector helpers for the CPU model path: dot products and `y += a * x` for attention, and
//! the element-wise RMSNorm and SwiGLU the layers apply to each row.
//!
//! RMSNorm and SiLU use the same formulas and summation order as candle's CPU ops
//! (`candle_nn::ops::rms_norm`, `Tensor::silu`) so the CPU fast path stays numerically next to
//! the candle reference model.

use super::Isa;

/// `sum(a[i] * b[i])`.
#[inline]
pub fn dot(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot: lengths");
    match isa {
        Isa::Scalar => dot_scalar(a, b),
        // SAFETY: `Avx2` only comes from runtime detection; lengths checked above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::dot(a, b) },
    }
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

/// Attention scores of one query head against one block: `out[j] = scale * q · k_j`, with the
/// same arithmetic as [`dot`] for each row.
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
                    .for_each(|(y, &x)| *y += a * x);
            }
        }
        // SAFETY: `Avx2` only comes from runtime detection; every row checked by `fits`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::weighted_sum(y, p, values) },
    }
}

fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent partial sums so the compiler can vectorize without reassociating.
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for ((a, x), y) in acc.iter_mut().zip(x).zip(y) {
            *a += x * y;
        }
    }
    acc.iter().sum::<f32>() + tail
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
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(ap.add(i)), _mm256_loadu_ps(bp.add(i)), acc0);
            acc1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(ap.add(i + 8)),
                _mm256_loadu_ps(bp.add(i + 8)),
                acc1,
            );
            i += 16;
        }
        let mut sum = hsum(_mm256_add_ps(acc0, acc1));
        while i < n {
            sum += a[i] * b[i];
            i += 1;
        }
        sum
    }

    /// SAFETY: avx2 and fma available; `keys.fits(q.len())`, `out.len() >= keys.n`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scores(q: &[f32], keys: HeadRows<'_>, scale: f32, out: &mut [f32]) {
        let d = q.len();
        for (j, o) in out[..keys.n].iter_mut().enumerate() {
            let k = std::slice::from_raw_parts(
                keys.data.as_ptr().add(j * keys.stride + keys.offset),
                d,
            );
            *o = dot(q, k) * scale;
        }
    }

    /// SAFETY: avx2 and fma available; `values.fits(y.len())`, `p.len() >= values.n`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn weighted_sum(y: &mut [f32], p: &[f32], values: HeadRows<'_>) {
        let d = y.len();
        let (yp, base) = (y.as_mut_ptr(), values.data.as_ptr().add(values.offset));
        let mut i = 0;
        while i + 8 <= d {
            let mut acc = _mm256_loadu_ps(yp.add(i));
            for (j, &a) in p[..values.n].iter().enumerate() {
                let x = _mm256_loadu_ps(base.add(j * values.stride + i));
                acc = _mm256_fmadd_ps(_mm256_set1_ps(a), x, acc);
            }
            _mm256_storeu_ps(yp.add(i), acc);
            i += 8;
        }
        while i < d {
            for (j, &a) in p[..values.n].iter().enumerate() {
                *yp.add(i) += a * *base.add(j * values.stride + i);
            }
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn rms_norm_scales_rows_to_unit_rms() {
        let x = [3.0f32, 4.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0];
        let mut out = [0f32; 8];
        rms_norm(&x, &[1.0, 1.0, 1.0, 2.0], 0.0, &mut out);
        assert!((out[0] - 1.2).abs() < 1e-6 && (out[1] - 1.6).abs() < 1e-6);
        assert_eq!(&out[4..], &[1.0, 1.0, 1.0, 2.0]);
    }
}
