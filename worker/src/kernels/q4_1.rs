//! Q4_1 × f32 matrix product for CPU, with an AVX2 kernel.
//!
//! candle's `BlockQ4_1::vec_dot` is scalar on x86, which makes the default GGUF Q4_1 model
//! decode several times slower than llama.cpp. This module repacks a Q4_1 weight matrix at load
//! time and computes `x @ W^T` the way llama.cpp does: each activation row is quantized once per
//! call to Q8_1 (per 32 values: scale `d_x`, int8 values, and `s = d_x * sum(q)`), then every
//! (weight row, block) contributes `d_w * d_x * dot(q4, q8) + m_w * s`.
//!
//! The repacked layout is built for a memory-bound decode step, where every weight byte is read
//! once per step:
//! - nibbles of two consecutive blocks share 32 bytes (block `2p` in the low nibbles, `2p + 1`
//!   in the high ones, each in natural order), so one 32-byte load and three ALU operations
//!   unpack 64 weights;
//! - scales and mins stay f16 (as in the file: 20 bytes per 32 weights) and are widened eight
//!   blocks at a time with F16C, multiplied by the activation scales as one vector, and then
//!   broadcast per block with a lane permute instead of scalar loads;
//! - four weight rows run together against one activation row (four independent accumulator
//!   chains hide the FMA latency, and the activation block is loaded once for all four).
//!
//! Every (weight row, token) result is computed by the same sequence of operations whatever
//! the tile it falls in, so a token's logits do not depend on how many tokens share its step
//! (batch invariance). The activation quantization mirrors candle's `BlockQ8_1::from_float`
//! bit for bit (including the f16 rounding of `d` and `s`), so results match candle's
//! `QMatMul` up to f32 summation order.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Result, Tensor};
use half::f16;

use super::{par_rows, Isa, RowsJob, Tile, ROW_GROUP};

/// Number of weights in one Q4_1 / Q8_1 block.
const QK: usize = 32;
/// Bytes of one ggml `block_q4_1`: f16 d, f16 m, 16 bytes of nibbles.
const BLOCK_BYTES: usize = 20;
/// Blocks whose scales are widened and multiplied as one vector.
const GROUP: usize = 8;

/// Scale slots per row: the block count rounded up to a whole group (padding is zero, so
/// padded blocks contribute nothing and vector loads of scales never leave the row).
fn padded_blocks(nb: usize) -> usize {
    nb.div_ceil(GROUP) * GROUP
}

/// A Q4_1 weight matrix `[n_out, k]` repacked for fast CPU matrix products (layout in the
/// module docs).
#[derive(Debug, Clone)]
pub struct Q4_1Matrix {
    n_out: usize,
    k: usize,
    /// Per block scale, `[n_out * padded_blocks]`.
    d: Vec<f16>,
    /// Per block min, `[n_out * padded_blocks]`.
    m: Vec<f16>,
    /// Paired nibbles, `[n_out * ceil(nb / 2) * 32]`.
    qs: Vec<u8>,
}

/// An activation matrix `[t, k]` quantized to Q8_1 once and shared by every Q4_1 weight
/// matrix that reads it (q, k and v; gate and up), so the quantization is not repeated per
/// projection.
#[derive(Debug, Clone)]
pub struct Q8_1Activations {
    t: usize,
    k: usize,
    /// `[t * padded_blocks]` per-block scale (zero padding).
    d: Vec<f32>,
    /// `[t * padded_blocks]` per-block `d * sum(q)` (zero padding).
    s: Vec<f32>,
    /// `[t * k]` int8 values.
    q: Vec<i8>,
}

impl Q8_1Activations {
    /// Quantizes `t` rows of `k` activations (`k` a multiple of 32), exactly like candle's
    /// `BlockQ8_1::from_float`, so results line up with candle's `QMatMul`.
    pub fn quantize(x: &[f32], t: usize, k: usize) -> Self {
        assert_eq!(x.len(), t * k, "Q8_1Activations::quantize: x length");
        assert!(k.is_multiple_of(QK), "Q8_1Activations::quantize: k % 32");
        let (nb, nbp) = (k / QK, padded_blocks(k / QK));
        let mut act = Self {
            t,
            k,
            d: vec![0f32; t * nbp],
            s: vec![0f32; t * nbp],
            q: vec![0i8; t * k],
        };
        for (ti, (xr, qr)) in x
            .chunks_exact(k.max(1))
            .zip(act.q.chunks_exact_mut(k.max(1)))
            .enumerate()
        {
            let ds = &mut act.d[ti * nbp..ti * nbp + nb];
            let ss = &mut act.s[ti * nbp..ti * nbp + nb];
            for (((xb, qb), d), s) in xr
                .chunks_exact(QK)
                .zip(qr.chunks_exact_mut(QK))
                .zip(ds.iter_mut())
                .zip(ss.iter_mut())
            {
                (*d, *s) = quantize_block(xb, qb);
            }
        }
        act
    }

    /// Number of rows (tokens).
    pub fn rows(&self) -> usize {
        self.t
    }

    fn row(&self, ti: usize) -> XRow<'_> {
        let nbp = padded_blocks(self.k / QK);
        XRow {
            d: &self.d[ti * nbp..(ti + 1) * nbp],
            s: &self.s[ti * nbp..(ti + 1) * nbp],
            q: &self.q[ti * self.k..(ti + 1) * self.k],
        }
    }
}

/// One Q8_1 block: returns `(d, d * sum(q))` rounded through f16 like ggml.
fn quantize_block(xb: &[f32], qb: &mut [i8]) -> (f32, f32) {
    let amax = xb.iter().fold(0f32, |a, &v| a.max(v.abs()));
    let dx = amax / 127.0;
    let id = if dx != 0.0 { 1.0 / dx } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in qb.iter_mut().zip(xb) {
        *q = (v * id).round() as i8;
        sum += *q as i32;
    }
    let dh = f16::from_f32(dx);
    (dh.to_f32(), (f16::from_f32(sum as f32) * dh).to_f32())
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
        let nb = k / QK;
        if data.len() != n_out * nb * BLOCK_BYTES {
            candle_core::bail!(
                "Q4_1Matrix: {} bytes of data for shape [{n_out}, {k}], expected {}",
                data.len(),
                n_out * nb * BLOCK_BYTES
            );
        }
        let (nbp, row_q) = (padded_blocks(nb), nb.div_ceil(2) * 32);
        let mut d = vec![f16::ZERO; n_out * nbp];
        let mut m = vec![f16::ZERO; n_out * nbp];
        let mut qs = vec![0u8; n_out * row_q];
        for (r, row) in data.chunks_exact(nb * BLOCK_BYTES).enumerate() {
            for (b, block) in row.chunks_exact(BLOCK_BYTES).enumerate() {
                d[r * nbp + b] = f16::from_le_bytes([block[0], block[1]]);
                m[r * nbp + b] = f16::from_le_bytes([block[2], block[3]]);
                // ggml order: byte j holds weight j (low nibble) and weight j + 16 (high).
                let shift = 4 * (b % 2);
                let pair = &mut qs[r * row_q + (b / 2) * 32..][..32];
                for (j, &byte) in block[4..].iter().enumerate() {
                    pair[j] |= (byte & 0x0F) << shift;
                    pair[j + 16] |= (byte >> 4) << shift;
                }
            }
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

    /// Computes `out = act @ W^T` for activations already quantized (`out: [t, n_out]`).
    ///
    /// Panics if the shapes disagree: a caller bug, never bad input data.
    pub fn matmul_q8(&self, act: &Q8_1Activations, out: &mut [f32]) {
        self.matmul_q8_with(act, out, Kernel::detect());
    }

    /// Stacks matrices with the same `k` row-wise into one `[sum n_out, k]` matrix, so
    /// projections that read the same input (q/k/v, gate/up) run as one parallel call.
    pub fn stack(parts: &[&Q4_1Matrix]) -> Result<Self> {
        let Some(first) = parts.first() else {
            candle_core::bail!("Q4_1Matrix::stack: no matrices");
        };
        let k = first.k;
        if parts.iter().any(|p| p.k != k) {
            candle_core::bail!("Q4_1Matrix::stack: matrices differ in k");
        }
        let mut out = Self {
            n_out: 0,
            k,
            d: Vec::new(),
            m: Vec::new(),
            qs: Vec::new(),
        };
        for p in parts {
            out.n_out += p.n_out;
            out.d.extend_from_slice(&p.d);
            out.m.extend_from_slice(&p.m);
            out.qs.extend_from_slice(&p.qs);
        }
        Ok(out)
    }

    fn matmul_with(&self, x: &[f32], t: usize, out: &mut [f32], kernel: Kernel) {
        assert_eq!(x.len(), t * self.k, "Q4_1Matrix::matmul: x length");
        let act = Q8_1Activations::quantize(x, t, self.k);
        self.matmul_q8_with(&act, out, kernel);
    }

    /// Weight row `r`.
    fn row(&self, r: usize) -> WRow<'_> {
        let nb = self.k / QK;
        let (nbp, row_q) = (padded_blocks(nb), nb.div_ceil(2) * 32);
        WRow {
            nb,
            d: &self.d[r * nbp..(r + 1) * nbp],
            m: &self.m[r * nbp..(r + 1) * nbp],
            q: &self.qs[r * row_q..(r + 1) * row_q],
        }
    }

    fn matmul_q8_with(&self, act: &Q8_1Activations, out: &mut [f32], kernel: Kernel) {
        assert_eq!(act.k, self.k, "Q4_1Matrix::matmul: activation k");
        let nb = self.k / QK;
        let job = RowsJob {
            n_out: self.n_out,
            t: act.t,
            row_bytes: nb * BLOCK_BYTES,
        };
        par_rows(job, out, |tile: Tile, o: &mut [f32]| {
            let mut r = tile.rows.start;
            while r < tile.rows.end {
                let full_rows = tile.rows.end - r >= ROW_GROUP;
                let mut ti = tile.tokens.start;
                while ti < tile.tokens.end {
                    let pair = tile.tokens.end - ti >= 2;
                    let at = Place { r, ti, tile: &tile };
                    match (full_rows, pair) {
                        (true, true) => self.tile_into::<ROW_GROUP, 2>(kernel, act, at, o),
                        (true, false) => self.tile_into::<ROW_GROUP, 1>(kernel, act, at, o),
                        (false, true) => self.tile_into::<1, 2>(kernel, act, at, o),
                        (false, false) => self.tile_into::<1, 1>(kernel, act, at, o),
                    }
                    ti += if pair { 2 } else { 1 };
                }
                r += if full_rows { ROW_GROUP } else { 1 };
            }
        });
    }

    /// Computes rows `at.r..at.r + R` against tokens `at.ti..at.ti + C` into the task's
    /// output slice.
    fn tile_into<const R: usize, const C: usize>(
        &self,
        kernel: Kernel,
        act: &Q8_1Activations,
        at: Place<'_>,
        o: &mut [f32],
    ) {
        let w: [WRow<'_>; R] = std::array::from_fn(|i| self.row(at.r + i));
        let x: [XRow<'_>; C] = std::array::from_fn(|j| act.row(at.ti + j));
        for (i, row) in kernel.dot_tile(w, x).iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                o[at.tile.index(at.r + i, at.ti + j)] = v;
            }
        }
    }
}

/// The first weight row and token of a kernel call inside a task's tile.
#[derive(Clone, Copy)]
struct Place<'a> {
    r: usize,
    ti: usize,
    tile: &'a Tile,
}

/// One weight row: scales and mins (padded to whole groups) and its paired nibbles.
#[derive(Clone, Copy)]
struct WRow<'a> {
    nb: usize,
    d: &'a [f16],
    m: &'a [f16],
    q: &'a [u8],
}

/// One quantized activation row: per-block scales, `d * sum(q)` (both padded like the
/// weights), and its int8 values.
#[derive(Clone, Copy)]
struct XRow<'a> {
    d: &'a [f32],
    s: &'a [f32],
    q: &'a [i8],
}

impl XRow<'_> {
    /// Whether this row's lengths fit weight row `w` (what the SIMD code relies on).
    fn fits(&self, w: &WRow<'_>) -> bool {
        let nbp = padded_blocks(w.nb);
        w.d.len() == nbp
            && w.m.len() == nbp
            && w.q.len() == w.nb.div_ceil(2) * 32
            && self.d.len() == nbp
            && self.s.len() == nbp
            && self.q.len() == w.nb * QK
    }
}

/// The instruction set this kernel runs with.
type Kernel = Isa;

impl Isa {
    /// Dot products of `R` weight rows with `C` activation rows.
    #[inline]
    fn dot_tile<const R: usize, const C: usize>(
        self,
        w: [WRow<'_>; R],
        x: [XRow<'_>; C],
    ) -> [[f32; C]; R] {
        assert!(
            w.iter()
                .all(|w| x.iter().all(|x| x.fits(w) && w.nb == x.q.len() / QK)),
            "Q4_1 dot: mismatched row lengths"
        );
        match self {
            Kernel::Scalar => w.map(|w| x.map(|x| dot_scalar(w, x))),
            // SAFETY: `Avx2` is only constructed after runtime detection of avx2, fma and
            // f16c; every row's lengths were checked above.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { avx2::dot_tile(w, x) },
        }
    }
}

/// The 4-bit value of weight `j` of block `b` in a paired-nibble row.
fn nibble(q: &[u8], b: usize, j: usize) -> i32 {
    let byte = q[(b / 2) * 32 + j];
    i32::from(if b % 2 == 0 { byte & 0x0F } else { byte >> 4 })
}

/// Portable Q4_1 · Q8_1 row dot product.
fn dot_scalar(w: WRow<'_>, x: XRow<'_>) -> f32 {
    let mut acc = 0f32;
    for b in 0..w.nb {
        let q8 = &x.q[b * QK..(b + 1) * QK];
        let sumi: i32 = (0..QK).map(|j| nibble(w.q, b, j) * i32::from(q8[j])).sum();
        acc += sumi as f32 * w.d[b].to_f32() * x.d[b] + w.m[b].to_f32() * x.s[b];
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{WRow, XRow, GROUP, QK};
    use std::arch::x86_64::*;

    /// Integer dot of one block (32 unpacked u4 × 32 i8) as 8 f32 lanes.
    ///
    /// SAFETY: caller ensures avx2.
    #[inline(always)]
    unsafe fn block_dot(wv: __m256i, xv: __m256i) -> __m256 {
        // u8 (0..15) × i8 pairs summed into i16: at most 2*15*128 < 32767, no saturation.
        let p16 = _mm256_maddubs_epi16(wv, xv);
        let p32 = _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
        _mm256_cvtepi32_ps(p32)
    }

    #[inline(always)]
    unsafe fn hsum(acc: __m256) -> f32 {
        let s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
        _mm_cvtss_f32(s1)
    }

    /// Eight f16 values widened to f32.
    ///
    /// SAFETY: caller ensures f16c and 8 readable values at `p`.
    #[inline(always)]
    unsafe fn widen(p: *const half::f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    /// Dot products of `R` weight rows with `C` activation rows. Each (row, token)
    /// accumulator sees the same operations in the same order for any `R` and `C`: per group
    /// of eight blocks, the mins term `m_w * s_x` (one vector FMA), then each block's scaled
    /// integer dot in block order. A row's nibbles are unpacked once for all `C` tokens and a
    /// token's blocks are loaded once for all `R` rows.
    ///
    /// The group's eight `d_w * d_x` products are computed as one vector and parked on the
    /// stack, so each block's scale is a broadcast load rather than ALU work.
    ///
    /// SAFETY: caller must ensure avx2, fma and f16c are available and every `x.fits(&w)`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_tile<const R: usize, const C: usize>(
        w: [WRow<'_>; R],
        x: [XRow<'_>; C],
    ) -> [[f32; C]; R] {
        let nb = w[0].nb;
        let mask = _mm256_set1_epi8(0x0F);
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let mut scale = [[[0f32; GROUP]; C]; R];
        let xq = x.map(|x| x.q.as_ptr());
        let (wq, wd, wm) = (
            w.map(|w| w.q.as_ptr()),
            w.map(|w| w.d.as_ptr()),
            w.map(|w| w.m.as_ptr()),
        );
        for g in (0..nb).step_by(GROUP) {
            for c in 0..C {
                let dx = _mm256_loadu_ps(x[c].d.as_ptr().add(g));
                let sx = _mm256_loadu_ps(x[c].s.as_ptr().add(g));
                for r in 0..R {
                    acc[r][c] = _mm256_fmadd_ps(widen(wm[r].add(g)), sx, acc[r][c]);
                    let sc = _mm256_mul_ps(widen(wd[r].add(g)), dx);
                    _mm256_storeu_ps(scale[r][c].as_mut_ptr(), sc);
                }
            }
            let end = (g + GROUP).min(nb);
            let mut b = g;
            while b < end {
                // The last block of an odd count sits alone in the low nibbles of its pair.
                let two = b + 1 < end;
                let x0 = xq.map(|p| _mm256_loadu_si256(p.add(b * QK) as *const __m256i));
                let x1 = match two {
                    true => xq.map(|p| _mm256_loadu_si256(p.add((b + 1) * QK) as *const __m256i)),
                    false => [_mm256_setzero_si256(); C],
                };
                for r in 0..R {
                    let v = _mm256_loadu_si256(wq[r].add(b * 16) as *const __m256i);
                    let lo = _mm256_and_si256(v, mask);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                    for c in 0..C {
                        let s0 = _mm256_broadcast_ss(&scale[r][c][b - g]);
                        acc[r][c] = _mm256_fmadd_ps(block_dot(lo, x0[c]), s0, acc[r][c]);
                        if two {
                            let s1 = _mm256_broadcast_ss(&scale[r][c][b + 1 - g]);
                            acc[r][c] = _mm256_fmadd_ps(block_dot(hi, x1[c]), s1, acc[r][c]);
                        }
                    }
                }
                b += 2;
            }
        }
        acc.map(|row| row.map(|a| hsum(a)))
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
    fn a_token_gets_the_same_bits_alone_or_in_a_batch() -> Result<()> {
        // 21 blocks: two full scale groups and an odd tail; 13 rows: three 4-row groups and
        // one single row; 5 tokens: two token pairs and a single token.
        let (t, k, n) = (5, 672, 13);
        let qt = QTensor::quantize(&random((n, k), 21), GgmlDType::Q4_1)?;
        let ours = Q4_1Matrix::from_qtensor(&qt)?;
        let xs = random((t, k), 22).flatten_all()?.to_vec1::<f32>()?;
        for kernel in [Kernel::Scalar, Kernel::detect()] {
            let mut all = vec![0f32; t * n];
            ours.matmul_with(&xs, t, &mut all, kernel);
            for ti in 0..t {
                let mut one = vec![0f32; n];
                ours.matmul_with(&xs[ti * k..(ti + 1) * k], 1, &mut one, kernel);
                assert_eq!(
                    &all[ti * n..(ti + 1) * n],
                    &one[..],
                    "{kernel:?} token {ti}"
                );
            }
        }
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
