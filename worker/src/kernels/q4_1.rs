//! Q4_1 × f32 matrix product for CPU, with an AVX2 kernel.
//!
//! candle's `BlockQ4_1::vec_dot` is scalar on x86, which makes the default GGUF Q4_1 model
//! decode several times slower than llama.cpp. This module repacks a Q4_1 weight matrix at load
//! time into separate scale / min / nibble arrays and computes `x @ W^T` the way llama.cpp does:
//! each activation row is quantized once per call to Q8_1 (per 32 values: scale `d_x`, int8
//! values, and `s = d_x * sum(q)`), then every (weight row, block) contributes
//! `d_w * d_x * dot(q4, q8) + m_w * s`.
//!
//! The activation quantization mirrors candle's `BlockQ8_1::from_float` bit for bit (including
//! the f16 rounding of `d` and `s`), so results match candle's `QMatMul` up to f32 summation
//! order.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Result, Tensor};
use half::f16;
use rayon::prelude::*;

/// Number of weights in one Q4_1 / Q8_1 block.
const QK: usize = 32;
/// Bytes of one ggml `block_q4_1`: f16 d, f16 m, 16 bytes of nibbles.
const BLOCK_BYTES: usize = 20;

/// A Q4_1 weight matrix `[n_out, k]` repacked for fast CPU matrix products.
///
/// Scales and mins are widened to f32 once at load time so the inner loop does no f16
/// conversion, and nibbles are stored contiguously per row so one 16-byte load feeds one block.
#[derive(Debug, Clone)]
pub struct Q4_1Matrix {
    n_out: usize,
    k: usize,
    /// Per block scale, `[n_out * k/32]`.
    d: Vec<f32>,
    /// Per block min, `[n_out * k/32]`.
    m: Vec<f32>,
    /// Packed nibbles, `[n_out * k/32 * 16]`, ggml order (low nibble = weight j, high = j+16).
    qs: Vec<u8>,
}

/// One activation matrix quantized to Q8_1, shared by all weight rows of a call.
struct Q8Act {
    /// `[t * nb]` per-block scale.
    d: Vec<f32>,
    /// `[t * nb]` per-block `d * sum(q)`.
    s: Vec<f32>,
    /// `[t * k]` int8 values.
    q: Vec<i8>,
}

impl Q4_1Matrix {
    /// Repacks a candle Q4_1 `QTensor` of shape `[n_out, k]` (k a multiple of 32).
    ///
    /// Errors on a non-Q4_1 dtype, a non-2D shape, a `k` that is not a multiple of 32, or raw
    /// data whose length does not match the shape, since all of those come from model files.
    pub fn from_qtensor(qtensor: &QTensor) -> Result<Self> {
        if qtensor.dtype() != GgmlDType::Q4_1 {
            candle_core::bail!("Q4_1Matrix: expected dtype Q4_1, got {:?}", qtensor.dtype());
        }
        let (n_out, k) = qtensor.shape().dims2()?;
        if !k.is_multiple_of(QK) {
            candle_core::bail!("Q4_1Matrix: k = {k} is not a multiple of {QK}");
        }
        let data = qtensor.data()?;
        Self::from_raw(&data, n_out, k)
    }

    /// Repacks raw ggml `block_q4_1` bytes (row-major `[n_out, k]`).
    pub fn from_raw(data: &[u8], n_out: usize, k: usize) -> Result<Self> {
        if !k.is_multiple_of(QK) {
            candle_core::bail!("Q4_1Matrix: k = {k} is not a multiple of {QK}");
        }
        let nblocks = n_out * (k / QK);
        if data.len() != nblocks * BLOCK_BYTES {
            candle_core::bail!(
                "Q4_1Matrix: {} bytes of data for shape [{n_out}, {k}], expected {}",
                data.len(),
                nblocks * BLOCK_BYTES
            );
        }
        let mut d = Vec::with_capacity(nblocks);
        let mut m = Vec::with_capacity(nblocks);
        let mut qs = Vec::with_capacity(nblocks * QK / 2);
        for block in data.chunks_exact(BLOCK_BYTES) {
            d.push(f16::from_le_bytes([block[0], block[1]]).to_f32());
            m.push(f16::from_le_bytes([block[2], block[3]]).to_f32());
            qs.extend_from_slice(&block[4..BLOCK_BYTES]);
        }
        Ok(Self { n_out, k, d, m, qs })
    }

    /// Number of output features (rows of W).
    pub fn n_out(&self) -> usize {
        self.n_out
    }

    /// Number of input features (columns of W).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Computes `out = x @ W^T` for `x: [t, k]` and `out: [t, n_out]`, both row-major.
    ///
    /// Panics if the slice lengths do not match `t`, since that is a caller bug rather than
    /// bad input data.
    pub fn matmul(&self, x: &[f32], t: usize, out: &mut [f32]) {
        self.matmul_with(x, t, out, Kernel::detect());
    }

    /// Convenience wrapper over [`Self::matmul`] for a `[.., k]` f32 tensor; returns `[.., n_out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let Some((&k, batch)) = dims.split_last() else {
            candle_core::bail!("Q4_1Matrix::forward: scalar input");
        };
        if k != self.k {
            candle_core::bail!(
                "Q4_1Matrix::forward: input has k = {k}, weight has {}",
                self.k
            );
        }
        let t: usize = batch.iter().product();
        let xs = x
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut out = vec![0f32; t * self.n_out];
        self.matmul(&xs, t, &mut out);
        let mut shape = batch.to_vec();
        shape.push(self.n_out);
        Tensor::from_vec(out, shape, &Device::Cpu)?.to_device(x.device())
    }

    fn matmul_with(&self, x: &[f32], t: usize, out: &mut [f32], kernel: Kernel) {
        assert_eq!(x.len(), t * self.k, "Q4_1Matrix::matmul: x length");
        assert_eq!(out.len(), t * self.n_out, "Q4_1Matrix::matmul: out length");
        if t == 0 || self.n_out == 0 {
            return;
        }
        let act = quantize_q8_1(x, t, self.k);
        let chunk = self.row_chunk(t);
        if t == 1 {
            out.par_chunks_mut(chunk)
                .enumerate()
                .for_each(|(ci, o)| self.rows_block(&act, 1, ci * chunk, o, kernel));
        } else {
            // Compute into a [n_out, t] buffer so each rayon task owns contiguous rows and loops
            // all tokens over a weight chunk that stays in cache, then transpose.
            let mut tmp = vec![0f32; t * self.n_out];
            tmp.par_chunks_mut(chunk * t)
                .enumerate()
                .for_each(|(ci, o)| self.rows_block(&act, t, ci * chunk, o, kernel));
            for (r, row) in tmp.chunks_exact(t).enumerate() {
                for (ti, &v) in row.iter().enumerate() {
                    out[ti * self.n_out + r] = v;
                }
            }
        }
    }

    /// Rows per rayon task: enough tasks to balance across threads, enough rows to amortize
    /// the task overhead.
    fn row_chunk(&self, t: usize) -> usize {
        let threads = rayon::current_num_threads().max(1);
        let target = self.n_out.div_ceil(threads * 4);
        // Keep at least ~16 KiB of weights (or work) per task.
        let min_rows = (16384 / (self.k / 2 + 1) / t.max(1)).clamp(4, 256);
        target.max(min_rows).min(self.n_out).max(1)
    }

    /// Computes rows `row0..row0 + out.len()/t` for all tokens into `out` laid out `[rows, t]`.
    fn rows_block(&self, act: &Q8Act, t: usize, row0: usize, out: &mut [f32], kernel: Kernel) {
        let nb = self.k / QK;
        for (i, o) in out.chunks_exact_mut(t).enumerate() {
            let r = row0 + i;
            let wd = &self.d[r * nb..(r + 1) * nb];
            let wm = &self.m[r * nb..(r + 1) * nb];
            let wq = &self.qs[r * nb * 16..(r + 1) * nb * 16];
            for (ti, v) in o.iter_mut().enumerate() {
                let xd = &act.d[ti * nb..(ti + 1) * nb];
                let xs = &act.s[ti * nb..(ti + 1) * nb];
                let xq = &act.q[ti * self.k..(ti + 1) * self.k];
                *v = kernel.dot(wd, wm, wq, xd, xs, xq);
            }
        }
    }
}

/// Which inner-product implementation to use; chosen once per call by CPU feature detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Kernel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Kernel::Avx2;
        }
        Kernel::Scalar
    }

    #[inline]
    fn dot(self, wd: &[f32], wm: &[f32], wq: &[u8], xd: &[f32], xs: &[f32], xq: &[i8]) -> f32 {
        debug_assert_eq!(wd.len(), wm.len());
        debug_assert_eq!(wq.len(), wd.len() * 16);
        debug_assert_eq!(xd.len(), wd.len());
        debug_assert_eq!(xs.len(), wd.len());
        debug_assert_eq!(xq.len(), wd.len() * QK);
        match self {
            Kernel::Scalar => dot_scalar(wd, wm, wq, xd, xs, xq),
            // SAFETY: `Avx2` is only constructed after runtime detection of avx2 and fma, and
            // all slices have the lengths checked above (guaranteed by `rows_block`).
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { avx2::dot(wd, wm, wq, xd, xs, xq) },
        }
    }
}

/// Quantizes `t` rows of `k` activations to Q8_1, exactly like candle's
/// `BlockQ8_1::from_float`, so our results line up with candle's `QMatMul`.
fn quantize_q8_1(x: &[f32], t: usize, k: usize) -> Q8Act {
    let nb = k / QK;
    let mut act = Q8Act {
        d: vec![0f32; t * nb],
        s: vec![0f32; t * nb],
        q: vec![0i8; t * k],
    };
    for (((xb, qb), d), s) in x
        .chunks_exact(QK)
        .zip(act.q.chunks_exact_mut(QK))
        .zip(act.d.iter_mut())
        .zip(act.s.iter_mut())
    {
        let amax = xb.iter().fold(0f32, |a, &v| a.max(v.abs()));
        let dx = amax / 127.0;
        let id = if dx != 0.0 { 1.0 / dx } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in qb.iter_mut().zip(xb) {
            *q = (v * id).round() as i8;
            sum += *q as i32;
        }
        let dh = f16::from_f32(dx);
        *d = dh.to_f32();
        *s = (f16::from_f32(sum as f32) * dh).to_f32();
    }
    act
}

/// Portable Q4_1 · Q8_1 row dot product.
fn dot_scalar(wd: &[f32], wm: &[f32], wq: &[u8], xd: &[f32], xs: &[f32], xq: &[i8]) -> f32 {
    let mut acc = 0f32;
    for b in 0..wd.len() {
        let q4 = &wq[b * 16..(b + 1) * 16];
        let q8 = &xq[b * QK..(b + 1) * QK];
        let mut sumi = 0i32;
        for j in 0..16 {
            let lo = (q4[j] & 0x0F) as i32;
            let hi = (q4[j] >> 4) as i32;
            sumi += lo * q8[j] as i32 + hi * q8[j + 16] as i32;
        }
        acc += sumi as f32 * wd[b] * xd[b] + wm[b] * xs[b];
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::QK;
    use std::arch::x86_64::*;

    /// Expands 16 bytes of nibbles into 32 unsigned bytes in ggml order (low nibbles first).
    ///
    /// SAFETY: caller must ensure avx2 is available and `p` points at 16 readable bytes.
    #[inline(always)]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let v = _mm_loadu_si128(p as *const __m128i);
        let lo = v;
        let hi = _mm_srli_epi16(v, 4);
        let both = _mm256_set_m128i(hi, lo);
        _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
    }

    /// Integer dot of one block (32 u4 × 32 i8) as 8 i32 lanes converted to f32.
    ///
    /// SAFETY: caller ensures avx2 and valid pointers (16 bytes at `w`, 32 at `x`).
    #[inline(always)]
    unsafe fn block_dot(w: *const u8, x: *const i8) -> __m256 {
        let wv = nibbles(w);
        let xv = _mm256_loadu_si256(x as *const __m256i);
        // u8 (0..15) × i8 pairs summed into i16: at most 2*15*128 < 32767, no saturation.
        let p16 = _mm256_maddubs_epi16(wv, xv);
        let p32 = _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
        _mm256_cvtepi32_ps(p32)
    }

    /// AVX2 + FMA Q4_1 · Q8_1 row dot product.
    ///
    /// SAFETY: caller must ensure avx2 and fma are available, `wm`, `xd`, `xs` have
    /// `wd.len()` elements, `wq` has `16 * wd.len()` and `xq` has `32 * wd.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot(
        wd: &[f32],
        wm: &[f32],
        wq: &[u8],
        xd: &[f32],
        xs: &[f32],
        xq: &[i8],
    ) -> f32 {
        let nb = wd.len();
        let wqp = wq.as_ptr();
        let xqp = xq.as_ptr();
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut macc = 0f32;
        let mut b = 0;
        while b + 2 <= nb {
            let f0 = block_dot(wqp.add(b * 16), xqp.add(b * QK));
            let f1 = block_dot(wqp.add((b + 1) * 16), xqp.add((b + 1) * QK));
            acc0 = _mm256_fmadd_ps(_mm256_set1_ps(wd[b] * xd[b]), f0, acc0);
            acc1 = _mm256_fmadd_ps(_mm256_set1_ps(wd[b + 1] * xd[b + 1]), f1, acc1);
            macc += wm[b] * xs[b] + wm[b + 1] * xs[b + 1];
            b += 2;
        }
        if b < nb {
            let f0 = block_dot(wqp.add(b * 16), xqp.add(b * QK));
            acc0 = _mm256_fmadd_ps(_mm256_set1_ps(wd[b] * xd[b]), f0, acc0);
            macc += wm[b] * xs[b];
        }
        let acc = _mm256_add_ps(acc0, acc1);
        let s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
        _mm_cvtss_f32(s1) + macc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::Module;

    fn random(shape: (usize, usize), seed: u64) -> Tensor {
        // Small deterministic LCG so tests do not depend on a global RNG.
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let n = shape.0 * shape.1;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
    }

    fn max_rel_err(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    fn check(t: usize, k: usize, n: usize) -> Result<()> {
        let w = random((n, k), (t * 1000 + k * 7 + n) as u64);
        let x = random((t, k), (k + n) as u64);
        let qt = QTensor::quantize(&w, GgmlDType::Q4_1)?;
        let ours = Q4_1Matrix::from_qtensor(&qt)?;
        let reference = QMatMul::from_qtensor(qt)?.forward(&x)?;
        let reference = reference.flatten_all()?.to_vec1::<f32>()?;

        let got = ours.forward(&x)?;
        assert_eq!(got.dims(), &[t, n]);
        let got = got.flatten_all()?.to_vec1::<f32>()?;
        let err = max_rel_err(&got, &reference);
        assert!(err < 1e-4, "t={t} k={k} n={n}: rel err {err}");

        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let mut scalar = vec![0f32; t * n];
        ours.matmul_with(&xs, t, &mut scalar, Kernel::Scalar);
        let err = max_rel_err(&scalar, &reference);
        assert!(err < 1e-4, "scalar t={t} k={k} n={n}: rel err {err}");
        let err = max_rel_err(&got, &scalar);
        assert!(
            err < 1e-5,
            "simd vs scalar t={t} k={k} n={n}: rel err {err}"
        );
        Ok(())
    }

    #[test]
    fn matches_candle_decode_576x1536() -> Result<()> {
        check(1, 576, 1536)
    }

    #[test]
    fn matches_candle_prefill_1536x576() -> Result<()> {
        check(7, 1536, 576)
    }

    #[test]
    fn matches_candle_small_odd_blocks() -> Result<()> {
        check(33, 64, 96)
    }

    #[test]
    fn odd_block_count_matches_dequantized_reference() -> Result<()> {
        // k = 96 is 3 blocks: exercises the AVX2 tail. candle's Q4_1 vec_dot debug-asserts an
        // even block count, so compare against an f32 matmul with the dequantized weights
        // instead; the gap is the Q8_1 activation rounding (~1/254 per value, relative).
        let (t, k, n) = (3, 96, 5);
        let w = random((n, k), 11);
        let x = random((t, k), 12);
        let qt = QTensor::quantize(&w, GgmlDType::Q4_1)?;
        let wdq = qt.dequantize(&Device::Cpu)?;
        let reference = x.matmul(&wdq.t()?)?.flatten_all()?.to_vec1::<f32>()?;
        let ours = Q4_1Matrix::from_qtensor(&qt)?;
        let got = ours.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
        let err = max_rel_err(&got, &reference);
        assert!(err < 1e-2, "vs dequantized: rel err {err}");
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let mut scalar = vec![0f32; t * n];
        ours.matmul_with(&xs, t, &mut scalar, Kernel::Scalar);
        let err = max_rel_err(&got, &scalar);
        assert!(err < 1e-5, "simd vs scalar: rel err {err}");
        Ok(())
    }

    #[test]
    fn forward_keeps_batch_dims() -> Result<()> {
        let w = random((8, 64), 1);
        let qt = QTensor::quantize(&w, GgmlDType::Q4_1)?;
        let ours = Q4_1Matrix::from_qtensor(&qt)?;
        let x = random((6, 64), 2).reshape((2, 3, 64))?;
        assert_eq!(ours.forward(&x)?.dims(), &[2, 3, 8]);
        Ok(())
    }

    #[test]
    fn rejects_bad_inputs() -> Result<()> {
        let w = random((4, 64), 3);
        let q8 = QTensor::quantize(&w, GgmlDType::Q8_0)?;
        assert!(Q4_1Matrix::from_qtensor(&q8).is_err());
        assert!(Q4_1Matrix::from_raw(&[0u8; 10], 1, 32).is_err());
        assert!(Q4_1Matrix::from_raw(&[0u8; 20], 1, 16).is_err());
        let ours = Q4_1Matrix::from_qtensor(&QTensor::quantize(&w, GgmlDType::Q4_1)?)?;
        assert!(ours.forward(&random((1, 32), 4)).is_err());
        Ok(())
    }
}
