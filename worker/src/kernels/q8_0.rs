//! Q8_0 × f32 matrix product for CPU, with an AVX2 kernel (and an AVX-512 VNNI one giving the
//! same bits where the CPU has it).
//!
//! The default model keeps its (tied) token embedding in Q8_0, so the LM head - a
//! `[49152, 576]` matrix, about a third of the bytes read per decode step - runs here. Like the
//! Q4_1 kernel, the weights are repacked at load time into groups of interleaved rows (scales
//! kept f16) and each activation row is quantized once per call to Q8_0 exactly as candle's
//! `BlockQ8_0::from_float` does; every row then gets candle's AVX2 operations in candle's
//! order, so results equal candle's `QMatMul` bit for bit.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Result;
use half::f16;

use super::weights::{self, WeightBuf};
use super::{par_rows, quantize_i8, Isa, RowsJob, TileOut, ROW_ALIGN};

/// Values per Q8_0 block.
const QK: usize = 32;
/// Bytes of one ggml `block_q8_0`: f16 d, 32 int8.
const BLOCK_BYTES: usize = 34;
/// Rows interleaved in one group: the kernel computes them together and reads one block of
/// all of them as one contiguous run.
const ROWS: usize = 8;
// Tasks start on multiples of `ROW_ALIGN` rows, so no group is split between two tasks.
const _: () = assert!(ROW_ALIGN.is_multiple_of(ROWS));

/// A Q8_0 weight matrix `[n_out, k]` repacked for fast CPU matrix products: groups of
/// [`ROWS`] rows, and in each group block after block, the group's rows side by side (their
/// scales together, then their runs of 32 weights). A task reads its rows as one stream of
/// weights and one of scales, where the file's row-major layout made it follow a stream per
/// row plus the scales, which the hardware prefetcher served more slowly: an LM head of the
/// default model's shape (`[49152, 576]`, 2 threads) took 1.53-1.63 ms a call that way and
/// 0.93-1.09 ms this way (three alternating runs of six rounds each), about 30 MB at 20 and
/// at 30 GB/s. Rows past `n_out` in the last group are zero.
#[derive(Debug, Clone)]
pub struct Q8_0Matrix {
    n_out: usize,
    k: usize,
    /// Per (group, block, row) scale, f16 as in the file: `[groups * nb * ROWS]`.
    d: WeightBuf<f16>,
    /// Per (group, block, row) the block's 32 weights: `[groups * nb * ROWS * 32]`.
    q: WeightBuf<i8>,
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

    fn row(&self, ti: usize) -> Row<'_> {
        let nb = self.k / QK;
        (&self.d[ti * nb..][..nb], &self.q[ti * self.k..][..self.k])
    }
}

/// One activation row: per-block scales and int8 values.
type Row<'a> = (&'a [f32], &'a [i8]);

/// One row group of a [`Q8_0Matrix`]: `nb * ROWS` scales and `nb * ROWS * 32` weights.
#[derive(Debug, Clone, Copy)]
struct Group<'a> {
    d: &'a [f16],
    q: &'a [i8],
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
        let nb = k / QK;
        if data.len() != n_out * nb * BLOCK_BYTES {
            candle_core::bail!(
                "Q8_0Matrix: {} bytes of data for shape [{n_out}, {k}], expected {}",
                data.len(),
                n_out * nb * BLOCK_BYTES
            );
        }
        let slots = n_out.div_ceil(ROWS) * nb * ROWS;
        let mut d = weights::filled(slots, f16::ZERO);
        let mut q = weights::filled(slots * QK, 0i8);
        for (i, block) in data.chunks_exact(BLOCK_BYTES).enumerate() {
            let at = Self::slot(nb, i / nb, i % nb);
            d[at] = f16::from_le_bytes([block[0], block[1]]);
            q[at * QK..][..QK]
                .iter_mut()
                .zip(&block[2..])
                .for_each(|(q, &b)| *q = b as i8);
        }
        Ok(Self {
            n_out,
            k,
            d: WeightBuf::new(d),
            q: WeightBuf::new(q),
        })
    }

    /// Moves the weights of `matrices` into one buffer for the scales and one for the values,
    /// in the order given (see [`weights::pack`]); results stay the same.
    pub fn pack(matrices: &mut [&mut Q8_0Matrix]) {
        weights::pack(&mut matrices.iter_mut().map(|m| &mut m.d).collect::<Vec<_>>());
        weights::pack(&mut matrices.iter_mut().map(|m| &mut m.q).collect::<Vec<_>>());
    }

    /// Index of row `r`'s block `b` among the scales (times 32: among the weights).
    fn slot(nb: usize, r: usize, b: usize) -> usize {
        ((r / ROWS) * nb + b) * ROWS + r % ROWS
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
        for (b, o) in out.chunks_exact_mut(QK).enumerate() {
            let at = Self::slot(nb, r, b);
            let d = self.d.as_slice()[at].to_f32();
            o.iter_mut()
                .zip(&self.q.as_slice()[at * QK..][..QK])
                .for_each(|(o, &q)| *o = f32::from(q) * d);
        }
        Ok(())
    }

    fn group(&self, g: usize) -> Group<'_> {
        let n = self.k / QK * ROWS;
        Group {
            d: &self.d.as_slice()[g * n..][..n],
            q: &self.q.as_slice()[g * n * QK..][..n * QK],
        }
    }

    /// Computes `out = x @ W^T` for `x: [t, k]`, `out: [t, n_out]`.
    pub fn matmul(&self, x: &[f32], t: usize, out: &mut [f32]) {
        let act = Q8_0Activations::quantize(x, t, self.k);
        self.matmul_q8(&act, out, Isa::detect());
    }

    fn matmul_q8(&self, act: &Q8_0Activations, out: &mut [f32], isa: Isa) {
        self.matmul_q8_with(act, out, isa, Isa::has_avx512_vnni())
    }

    fn matmul_q8_with(&self, act: &Q8_0Activations, out: &mut [f32], isa: Isa, vnni: bool) {
        assert_eq!(act.k, self.k, "Q8_0Matrix::matmul: activation k");
        let job = RowsJob {
            n_out: self.n_out,
            t: act.t,
            row_bytes: self.k / QK * BLOCK_BYTES,
            align: ROW_ALIGN,
        };
        par_rows(job, out, |o| match isa {
            Isa::Scalar => fill(self, act, o, dot_scalar),
            // SAFETY: `vnni` only comes from `Isa::has_avx512_vnni` (runtime detection of
            // AVX-512 VNNI, and of `Avx2`).
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 if vnni => unsafe { avx2::fill_vnni(self, act, o) },
            // SAFETY: `Avx2` only comes from runtime detection (avx2, fma, f16c).
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { avx2::fill(self, act, o) },
        });
    }
}

/// A tile's outputs, row group after row group: each group's weights (a few KiB) are read
/// from memory once and serve every token of the tile from L1. `dot` computes one group
/// against one token; every row gets the same operations whichever group or tile it is in.
#[inline(always)]
fn fill<D>(w: &Q8_0Matrix, act: &Q8_0Activations, mut out: TileOut<'_>, dot: D)
where
    D: Fn(Group<'_>, Row<'_>) -> [f32; ROWS],
{
    let (rows, tokens) = (out.tile.rows.clone(), out.tile.tokens.clone());
    for g in rows.start / ROWS..rows.end.div_ceil(ROWS) {
        let r = g * ROWS;
        let n = ROWS.min(rows.end - r);
        let group = w.group(g);
        for ti in tokens.clone() {
            out.put(r, ti, &dot(group, act.row(ti))[..n]);
        }
    }
}

/// Portable Q8_0 · Q8_0 dot products of a row group with one activation row.
fn dot_scalar(w: Group<'_>, (xd, xq): Row<'_>) -> [f32; ROWS] {
    std::array::from_fn(|lane| {
        let mut acc = 0f32;
        for (b, (&dx, xq)) in xd.iter().zip(xq.chunks_exact(QK)).enumerate() {
            let at = b * ROWS + lane;
            let sumi: i32 = w.q[at * QK..][..QK]
                .iter()
                .zip(xq)
                .map(|(&a, &b)| i32::from(a) * i32::from(b))
                .sum();
            acc += sumi as f32 * w.d[at].to_f32() * dx;
        }
        acc
    })
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Group, Q8_0Activations, Q8_0Matrix, Row, QK, ROWS};
    // Candle's pairing of a row's eight lanes (halves, then pairs, then the two).
    use crate::kernels::vec::avx2::hsum;
    use crate::kernels::TileOut;
    use std::arch::x86_64::*;

    /// [`super::fill`] with [`dot_group`].
    ///
    /// SAFETY: caller ensures avx2, fma and f16c.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn fill(w: &Q8_0Matrix, act: &Q8_0Activations, out: TileOut<'_>) {
        super::fill(w, act, out, |g, x| {
            // SAFETY: this function's features; `fill` passes whole groups and rows of `k`.
            unsafe { dot_group(g, x) }
        });
    }

    /// [`super::fill`] with [`dot_group_vnni`].
    ///
    /// SAFETY: caller ensures avx2, fma, f16c, avx512f, avx512bw, avx512vl and avx512vnni.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn fill_vnni(w: &Q8_0Matrix, act: &Q8_0Activations, out: TileOut<'_>) {
        super::fill(w, act, out, |g, x| {
            // SAFETY: this function's features; `fill` passes whole groups and rows of `k`.
            unsafe { dot_group_vnni(g, x) }
        });
    }

    /// [`dot_group`]'s results with AVX-512 VNNI, two rows a 512-bit register (row `2j` in
    /// lanes 0-7, row `2j + 1` in lanes 8-15). Lane `l` of a row is still the exact integer
    /// `sum(w[4l..4l + 4] * x[4l..4l + 4])` of the block: `dot_group`'s `maddubs` of `|w|` and
    /// `x` signed by `w` cannot saturate, since activations quantized by [`super::quantize_i8`]
    /// lie in [-127, 127] (pairs of products stay within 2 × 128 × 127), and `vpdpbusd` takes
    /// `w + 128` as unsigned bytes against `x`, starting from `-128 * sum(x)` per lane. Then
    /// the same float operations per lane (`d_w * d_x`, one FMA per block, the same horizontal
    /// sum at the end), so the same bits with about a third of the instructions.
    ///
    /// SAFETY: as [`dot_group`], and avx512f, avx512bw, avx512vl and avx512vnni.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn dot_group_vnni(w: Group<'_>, (xd, xq): Row<'_>) -> [f32; ROWS] {
        debug_assert!(w.d.len() == xd.len() * ROWS && w.q.len() == w.d.len() * QK);
        debug_assert!(xq.len() == xd.len() * QK);
        let (wd, wq) = (w.d.as_ptr(), w.q.as_ptr());
        let mut acc = [_mm512_setzero_ps(); ROWS / 2];
        let bias = _mm512_set1_epi8(i8::MIN);
        // Scale vector `j`: row 2j's scale in lanes 0-7, row 2j + 1's in lanes 8-15.
        let pick: [__m512i; ROWS / 2] = std::array::from_fn(|j| {
            let (a, b) = (2 * j as i32, 2 * j as i32 + 1);
            _mm512_setr_epi32(a, a, a, a, a, a, a, a, b, b, b, b, b, b, b, b)
        });
        for b in 0..xd.len() {
            let x = _mm512_broadcast_i64x4(_mm256_loadu_si256(
                xq.as_ptr().add(b * QK) as *const __m256i
            ));
            // -128 * (the lane's four activations), so that adding (w + 128) * x gives w * x.
            let start = _mm512_sub_epi32(
                _mm512_setzero_si512(),
                _mm512_dpbusd_epi32(_mm512_setzero_si512(), bias, x),
            );
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(wd.add(b * ROWS) as *const __m128i));
            let scales =
                _mm512_castps256_ps512(_mm256_mul_ps(dw, _mm256_set1_ps(*xd.get_unchecked(b))));
            for (j, acc) in acc.iter_mut().enumerate() {
                let wv = _mm512_loadu_si512(wq.add((b * ROWS + 2 * j) * QK) as *const _);
                let sumi = _mm512_dpbusd_epi32(start, _mm512_xor_si512(wv, bias), x);
                let scale = _mm512_permutexvar_ps(pick[j], scales);
                *acc = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(sumi), *acc);
            }
        }
        let mut out = [0f32; ROWS];
        for (j, a) in acc.into_iter().enumerate() {
            out[2 * j] = hsum(_mm512_castps512_ps256(a));
            out[2 * j + 1] = hsum(_mm512_extractf32x8_ps::<1>(a));
        }
        out
    }

    /// AVX2 + FMA dot products of a row group with one activation row: per row, candle's
    /// AVX2 `vec_dot_q8_0_q8_0` operation for operation (eight lane sums of
    /// `maddubs`/`madd` products, one FMA per block with the scale `d_w * d_x`, one
    /// horizontal sum at the end), so the same bits.
    ///
    /// SAFETY: caller ensures avx2, fma and f16c, `w` holding `x.0.len()` blocks of the
    /// group and `x.1` being 32 values per block.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn dot_group(w: Group<'_>, (xd, xq): Row<'_>) -> [f32; ROWS] {
        debug_assert!(w.d.len() == xd.len() * ROWS && w.q.len() == w.d.len() * QK);
        debug_assert!(xq.len() == xd.len() * QK);
        let (wd, wq) = (w.d.as_ptr(), w.q.as_ptr());
        let mut acc = [_mm256_setzero_ps(); ROWS];
        for b in 0..xd.len() {
            let xv = _mm256_loadu_si256(xq.as_ptr().add(b * QK) as *const __m256i);
            // The group's four f16 scales of this block, widened (exactly) and times d_x.
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(wd.add(b * ROWS) as *const __m128i));
            let mut scales = [0f32; ROWS];
            _mm256_storeu_ps(
                scales.as_mut_ptr(),
                _mm256_mul_ps(dw, _mm256_set1_ps(*xd.get_unchecked(b))),
            );
            for (r, acc) in acc.iter_mut().enumerate() {
                let wv = _mm256_loadu_si256(wq.add((b * ROWS + r) * QK) as *const __m256i);
                // maddubs wants unsigned × signed: move w's sign onto x.
                let aw = _mm256_sign_epi8(wv, wv);
                let sx = _mm256_sign_epi8(xv, wv);
                let p16 = _mm256_maddubs_epi16(aw, sx);
                let p32 = _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
                let f = _mm256_cvtepi32_ps(p32);
                *acc = _mm256_fmadd_ps(_mm256_set1_ps(scales[r]), f, *acc);
            }
        }
        // SAFETY: this function's features.
        acc.map(|a| unsafe { hsum(a) })
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
        // Both SIMD kernels this CPU runs give candle's bits.
        for vnni in [false, Isa::has_avx512_vnni()] {
            let mut each = vec![0f32; t * n];
            ours.matmul_q8_with(&act, &mut each, Isa::detect(), vnni);
            assert_eq!(each, reference, "vnni {vnni}, t={t} k={k} n={n}");
        }
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
    fn matches_candle_rows_not_a_multiple_of_the_group() -> Result<()> {
        // 43 rows: the last group holds 3 rows and 5 zero rows, whose products are dropped.
        check(1, 96, 43)?;
        check(3, 96, 43)
    }

    /// Weights at both ends of the int8 range (-128 included, which `vpdpbusd` takes as 0 after
    /// the bias) and activations at ±127 (their range): the VNNI kernel gives the AVX2
    /// kernel's (candle's) bits.
    #[test]
    fn extreme_weights_give_the_same_bits_on_both_kernels() -> Result<()> {
        let (n, k, t) = (16, 64, 2);
        let mut raw = Vec::new();
        for r in 0..n {
            for b in 0..k / QK {
                raw.extend(f16::from_f32(0.01 * (r + b + 1) as f32).to_le_bytes());
                raw.extend((0..QK).map(|i| match (r + i + b) % 4 {
                    0 => i8::MIN,
                    1 => i8::MAX,
                    2 => -1,
                    _ => (i as i8) - 16,
                } as u8));
            }
        }
        let w = Q8_0Matrix::from_raw(&raw, n, k)?;
        let xs: Vec<f32> = (0..t * k)
            .map(|i| {
                if i % 3 == 0 {
                    -1.0
                } else {
                    1.0 - (i % 7) as f32 * 0.01
                }
            })
            .collect();
        let act = Q8_0Activations::quantize(&xs, t, k);
        assert!(act.q.contains(&-127) && act.q.contains(&127));
        let (mut avx2, mut vnni) = (vec![0f32; t * n], vec![0f32; t * n]);
        w.matmul_q8_with(&act, &mut avx2, Isa::detect(), false);
        w.matmul_q8_with(&act, &mut vnni, Isa::detect(), Isa::has_avx512_vnni());
        assert_eq!(vnni, avx2);
        Ok(())
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
