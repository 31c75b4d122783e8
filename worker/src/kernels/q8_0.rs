//! Q8_0 × f32 matrix product for CPU, with an AVX2 kernel.
//!
//! The default model keeps its (tied) token embedding in Q8_0, so the LM head - a
//! `[49152, 576]` matrix, about a third of the bytes read per decode step - runs here. Like the
//! Q4_1 kernel, the weights are repacked at load time (f16 scales widened to f32) and each
//! activation row is quantized once per call to Q8_0 exactly as candle's
//! `BlockQ8_0::from_float` does, so results match candle's `QMatMul` up to f32 summation order.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Result;
use half::f16;

use super::{fill_tile, par_rows, quantize_i8, Isa, RowsJob, TileOut};

/// Values per Q8_0 block.
const QK: usize = 32;
/// Bytes of one ggml `block_q8_0`: f16 d, 32 int8.
const BLOCK_BYTES: usize = 34;

/// A Q8_0 weight matrix `[n_out, k]` repacked for fast CPU matrix products.
#[derive(Debug, Clone)]
pub struct Q8_0Matrix {
    n_out: usize,
    k: usize,
    /// Per block scale, `[n_out * k/32]`.
    d: Vec<f32>,
    /// `[n_out * k]` int8 weights.
    q: Vec<i8>,
}

/// Activations `[t, k]` quantized to Q8_0.
#[derive(Debug, Clone)]
pub struct Q8_0Activations {
    t: usize,
    k: usize,
    d: Vec<f32>,
    q: Vec<i8>,
}

impl Q8_0Activations {
    /// Quantizes `t` rows of `k` values (`k` a multiple of 32) like `BlockQ8_0::from_float`.
    pub fn quantize(x: &[f32], t: usize, k: usize) -> Self {
        assert_eq!(x.len(), t * k, "Q8_0Activations::quantize: x length");
        assert!(k.is_multiple_of(QK), "Q8_0Activations::quantize: k % 32");
        let mut d = vec![0f32; t * k / QK];
        let mut q = vec![0i8; t * k];
        for ((xb, qb), d) in x
            .chunks_exact(QK)
            .zip(q.chunks_exact_mut(QK))
            .zip(d.iter_mut())
        {
            *d = f16::from_f32(quantize_i8(xb, qb)).to_f32();
        }
        Self { t, k, d, q }
    }
}

impl Q8_0Matrix {
    /// Repacks a candle Q8_0 `QTensor` of shape `[n_out, k]`; errors on any other dtype or
    /// shape, since those come from model files.
    pub fn from_qtensor(qtensor: &QTensor) -> Result<Self> {
        if qtensor.dtype() != GgmlDType::Q8_0 {
            candle_core::bail!("Q8_0Matrix: expected dtype Q8_0, got {:?}", qtensor.dtype());
        }
        let (n_out, k) = qtensor.shape().dims2()?;
        Self::from_raw(&qtensor.data()?, n_out, k)
    }

    /// Repacks raw ggml `block_q8_0` bytes (row-major `[n_out, k]`).
    pub fn from_raw(data: &[u8], n_out: usize, k: usize) -> Result<Self> {
        if !k.is_multiple_of(QK) {
            candle_core::bail!("Q8_0Matrix: k = {k} is not a multiple of {QK}");
        }
        let nblocks = n_out * (k / QK);
        if data.len() != nblocks * BLOCK_BYTES {
            candle_core::bail!(
                "Q8_0Matrix: {} bytes of data for shape [{n_out}, {k}], expected {}",
                data.len(),
                nblocks * BLOCK_BYTES
            );
        }
        let mut d = Vec::with_capacity(nblocks);
        let mut q = Vec::with_capacity(n_out * k);
        for block in data.chunks_exact(BLOCK_BYTES) {
            d.push(f16::from_le_bytes([block[0], block[1]]).to_f32());
            q.extend(block[2..].iter().map(|&b| b as i8));
        }
        Ok(Self { n_out, k, d, q })
    }

    /// Number of output features.
    pub fn n_out(&self) -> usize {
        self.n_out
    }

    /// Number of input features.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Row `r` of the matrix as f32, each value `q * d` exactly as candle's
    /// `BlockQ8_0::to_float` dequantizes it: a tied LM head serves as the token embedding
    /// table this way, without a dense f32 copy of it. Errors when `r` is out of range or
    /// `out` is not `k` long.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) -> Result<()> {
        if r >= self.n_out || out.len() != self.k {
            candle_core::bail!(
                "Q8_0Matrix: row {r} into {} values of a [{}, {}] matrix",
                out.len(),
                self.n_out,
                self.k
            );
        }
        let nb = self.k / QK;
        let (d, q) = (&self.d[r * nb..][..nb], &self.q[r * self.k..][..self.k]);
        for ((o, q), &d) in out.chunks_exact_mut(QK).zip(q.chunks_exact(QK)).zip(d) {
            o.iter_mut()
                .zip(q)
                .for_each(|(o, &q)| *o = f32::from(q) * d);
        }
        Ok(())
    }

    /// Computes `out = x @ W^T` for `x: [t, k]`, `out: [t, n_out]`.
    pub fn matmul(&self, x: &[f32], t: usize, out: &mut [f32]) {
        let act = Q8_0Activations::quantize(x, t, self.k);
        self.matmul_q8(&act, out, Isa::detect());
    }

    fn matmul_q8(&self, act: &Q8_0Activations, out: &mut [f32], isa: Isa) {
        assert_eq!(act.k, self.k, "Q8_0Matrix::matmul: activation k");
        let (k, nb) = (self.k, self.k / QK);
        let job = RowsJob {
            n_out: self.n_out,
            t: act.t,
            row_bytes: nb * BLOCK_BYTES,
        };
        let row = |r: usize| (&self.d[r * nb..(r + 1) * nb], &self.q[r * k..(r + 1) * k]);
        let x = |ti: usize| (&act.d[ti * nb..(ti + 1) * nb], &act.q[ti * k..(ti + 1) * k]);
        par_rows(job, out, |mut o: TileOut<'_, '_>| {
            if o.tile.tokens.len() == 1 {
                // One token (a decode step's LM head): all of the tile's rows in one kernel
                // call rather than one per row group.
                let (rows, ti) = (o.tile.rows.clone(), o.tile.tokens.start);
                let (d, q) = (
                    &self.d[rows.start * nb..rows.end * nb],
                    &self.q[rows.start * k..rows.end * k],
                );
                isa.dot_row_run_q8_0((d, q), x(ti), o.row_mut(ti));
                return;
            }
            fill_tile(
                o,
                |r, ti| isa.dot_rows_q8_0([row(r), row(r + 1), row(r + 2), row(r + 3)], x(ti)),
                |r, ti| isa.dot_rows_q8_0([row(r)], x(ti))[0],
            )
        });
    }
}

/// One row: per-block scales and int8 values.
type Row<'a> = (&'a [f32], &'a [i8]);

impl Isa {
    /// Dot products of `R` weight rows with one activation row.
    fn dot_rows_q8_0<const R: usize>(self, w: [Row<'_>; R], x: Row<'_>) -> [f32; R] {
        let nb = x.0.len();
        assert!(
            x.1.len() == nb * QK && w.iter().all(|w| w.0.len() == nb && w.1.len() == nb * QK),
            "Q8_0 dot: mismatched row lengths"
        );
        match self {
            Isa::Scalar => w.map(|w| dot_scalar(w, x)),
            // SAFETY: `Avx2` only comes from runtime detection; lengths checked above.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { avx2::dot_rows(w, x) },
        }
    }

    /// Dot products of consecutive weight rows `w` (`out.len()` of them) with one activation
    /// row, into `out`: each row as [`Self::dot_rows_q8_0`] computes it, in one call.
    fn dot_row_run_q8_0(self, w: Row<'_>, x: Row<'_>, out: &mut [f32]) {
        let nb = x.0.len();
        assert!(
            x.1.len() == nb * QK && w.0.len() == out.len() * nb && w.1.len() == out.len() * nb * QK,
            "Q8_0 dot: mismatched row lengths"
        );
        match self {
            Isa::Scalar => {
                for (r, o) in out.iter_mut().enumerate() {
                    *o = dot_scalar((&w.0[r * nb..][..nb], &w.1[r * nb * QK..][..nb * QK]), x);
                }
            }
            // SAFETY: `Avx2` only comes from runtime detection; lengths checked above.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { avx2::dot_row_run(w, x, out) },
        }
    }
}

/// Portable Q8_0 · Q8_0 row dot product.
fn dot_scalar((wd, wq): (&[f32], &[i8]), (xd, xq): (&[f32], &[i8])) -> f32 {
    let mut acc = 0f32;
    for b in 0..wd.len() {
        let sumi: i32 = wq[b * QK..(b + 1) * QK]
            .iter()
            .zip(&xq[b * QK..(b + 1) * QK])
            .map(|(&a, &b)| a as i32 * b as i32)
            .sum();
        acc += sumi as f32 * wd[b] * xd[b];
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Row, QK};
    use crate::kernels::ROW_GROUP;
    use std::arch::x86_64::*;

    // `dot_row_run` passes groups of four rows.
    const _: () = assert!(ROW_GROUP == 4);

    /// `out.len()` consecutive weight rows (`w`) against one activation row: [`dot_rows`] on
    /// each group of [`ROW_GROUP`] rows, then on the remaining rows one at a time.
    ///
    /// SAFETY: caller ensures avx2 and fma, `x.1.len() == 32 * x.0.len()`, and that `w` holds
    /// `out.len()` rows of that size.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_row_run(w: Row<'_>, x: Row<'_>, out: &mut [f32]) {
        let (nb, k) = (x.0.len(), x.1.len());
        let row = |r: usize| -> Row<'_> {
            (
                w.0.get_unchecked(r * nb..(r + 1) * nb),
                w.1.get_unchecked(r * k..(r + 1) * k),
            )
        };
        let groups = out.len() / ROW_GROUP;
        for g in 0..groups {
            let r = g * ROW_GROUP;
            let res = dot_rows([row(r), row(r + 1), row(r + 2), row(r + 3)], x);
            out.get_unchecked_mut(r..r + ROW_GROUP)
                .copy_from_slice(&res);
        }
        for r in groups * ROW_GROUP..out.len() {
            *out.get_unchecked_mut(r) = dot_rows([row(r)], x)[0];
        }
    }

    /// AVX2 + FMA dot products of `R` Q8_0 weight rows with one Q8_0 activation row; each
    /// row's accumulator sees the same operations whatever `R` is.
    ///
    /// SAFETY: caller ensures avx2 and fma, and that every row has `x.0.len()` scales and
    /// `32 * x.0.len()` values, like `x`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(super) unsafe fn dot_rows<const R: usize>(w: [Row<'_>; R], x: Row<'_>) -> [f32; R] {
        let (xd, xq) = x;
        let (wd, wq) = (w.map(|w| w.0.as_ptr()), w.map(|w| w.1.as_ptr()));
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..xd.len() {
            let xv = _mm256_loadu_si256(xq.as_ptr().add(b * QK) as *const __m256i);
            let dx = *xd.get_unchecked(b);
            for r in 0..R {
                // The same block of the row R rows ahead (the next call's rows, which follow
                // these in memory): the hardware prefetcher does not keep up with R streams.
                // Every other block (about one prefetch per 64-byte line) and the last one:
                // the default model's LM head alone (dbench, paired rounds) took a median
                // 1.352-1.394 ms this way against 1.480-1.567 with a prefetch per block
                // (faster in 81 of 96 rounds); dropping the last block's prefetch, or moving
                // it to the row's last byte, was slower in 48 and 46 of 60 rounds.
                if b % 2 == 0 || b + 1 == xd.len() {
                    _mm_prefetch::<_MM_HINT_T0>(wq[r].wrapping_add(R * xq.len() + b * QK));
                }
                let wv = _mm256_loadu_si256(wq[r].add(b * QK) as *const __m256i);
                // maddubs wants unsigned × signed: move w's sign onto x.
                let aw = _mm256_sign_epi8(wv, wv);
                let sx = _mm256_sign_epi8(xv, wv);
                let p16 = _mm256_maddubs_epi16(aw, sx);
                let p32 = _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
                let f = _mm256_cvtepi32_ps(p32);
                let scale = _mm256_set1_ps(*wd[r].add(b) * dx);
                acc[r] = _mm256_fmadd_ps(scale, f, acc[r]);
            }
        }
        acc.map(|a| {
            let s4 = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
            let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
            _mm_cvtss_f32(s1)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::{Device, Module, Tensor};

    fn random(shape: (usize, usize), seed: u64) -> Tensor {
        let mut s = seed
            .wrapping_mul(2862933555777941757)
            .wrapping_add(3037000493);
        let v: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| {
                s = s.wrapping_mul(2862933555777941757).wrapping_add(3037000493);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
    }

    fn max_rel_err(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    #[test]
    fn a_row_dequantizes_to_candles_bits() -> Result<()> {
        let (n, k) = (7, 96);
        let qt = QTensor::quantize(&random((n, k), 5), GgmlDType::Q8_0)?;
        let reference = qt.dequantize(&Device::Cpu)?.to_vec2::<f32>()?;
        let ours = Q8_0Matrix::from_qtensor(&qt)?;
        let mut row = vec![0f32; k];
        for (r, expected) in reference.iter().enumerate() {
            ours.dequantize_row(r, &mut row)?;
            assert_eq!(&row, expected, "row {r}");
        }
        assert!(ours.dequantize_row(n, &mut row).is_err());
        assert!(ours.dequantize_row(0, &mut row[1..]).is_err());
        Ok(())
    }

    fn check(t: usize, k: usize, n: usize) -> Result<()> {
        let w = random((n, k), (t + 31 * k + n) as u64);
        let x = random((t, k), (k * 3 + n) as u64);
        let qt = QTensor::quantize(&w, GgmlDType::Q8_0)?;
        let ours = Q8_0Matrix::from_qtensor(&qt)?;
        let reference = QMatMul::from_qtensor(qt)?.forward(&x)?;
        let reference = reference.flatten_all()?.to_vec1::<f32>()?;
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let mut got = vec![0f32; t * n];
        ours.matmul(&xs, t, &mut got);
        // The same operations in the same order as candle's AVX2 `vec_dot_q8_0_q8_0`.
        assert_eq!(got, reference, "t={t} k={k} n={n}");
        let act = Q8_0Activations::quantize(&xs, t, k);
        let mut scalar = vec![0f32; t * n];
        ours.matmul_q8(&act, &mut scalar, Isa::Scalar);
        let err = max_rel_err(&scalar, &got);
        assert!(err < 1e-5, "scalar vs simd t={t}: rel err {err}");
        Ok(())
    }

    #[test]
    fn matches_candle_lm_head_shape() -> Result<()> {
        check(1, 576, 2048)
    }

    #[test]
    fn matches_candle_several_rows() -> Result<()> {
        check(5, 96, 40)
    }

    #[test]
    fn matches_candle_one_token_rows_not_a_multiple_of_four() -> Result<()> {
        // One token takes the single-call path; 43 rows end in a run of 3 single rows.
        check(1, 96, 43)
    }

    #[test]
    fn rejects_other_dtypes_and_bad_lengths() -> Result<()> {
        let w = random((4, 64), 1);
        assert!(Q8_0Matrix::from_qtensor(&QTensor::quantize(&w, GgmlDType::Q4_1)?).is_err());
        assert!(Q8_0Matrix::from_raw(&[0u8; 33], 1, 32).is_err());
        assert!(Q8_0Matrix::from_raw(&[0u8; 34], 1, 16).is_err());
        Ok(())
    }
}
