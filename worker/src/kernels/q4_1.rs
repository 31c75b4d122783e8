//! Q4_1 × f32 matrix product for CPU, with an AVX2 kernel whose results are bit-identical
//! to candle's `QMatMul`.
//!
//! candle's `BlockQ4_1::vec_dot` is scalar on x86, which makes the default GGUF Q4_1 model
//! decode several times slower than llama.cpp. Like llama.cpp, each activation row is
//! quantized once per call to Q8_1 (per 32 values: scale `d_x`, int8 values, and
//! `s = d_x * sum(q)`), and every (weight row, block) contributes
//! `sumi * d_w * d_x + m_w * s_x` with `sumi` the exact integer dot of the block.
//!
//! The weights are repacked at load time into groups of eight rows (the "x8 interleaved"
//! layout of llama.cpp's repacked CPU kernels): for each block, four chunks of 32 bytes where
//! chunk `c` holds, for each of the eight rows, the four ggml bytes `4c..4c + 4` of that row's
//! block (low nibbles: weights `4c..4c + 4`, high nibbles: weights `16 + 4c..`). One `maddubs`
//! against four broadcast activation bytes then yields partial dot products with one row per
//! 32-bit lane, so:
//! - the eight `sumi` of a block come out of vertical integer adds, with no horizontal
//!   reduction per block (16-bit partial sums cannot overflow: 8 steps × 2 × 15 × 127);
//! - the float part runs in row lanes, in candle's exact operation order per row
//!   (`sumf += sumi * d_w * d_x + m_w * s_x`, block after block), so every output equals
//!   candle's bit for bit, and therefore does not depend on how many tokens share the step
//!   either (batch invariance). The one fused operation is `m_w * s_x + scaled` as an FMA:
//!   `m_w` and `s_x` are both f16 values (11 significant bits each), so their product is
//!   exact in f32 and the FMA's single rounding is the separate add's. Every other product is
//!   rounded where candle rounds it;
//! - scales and mins stay f16, eight per block and group, widened with F16C;
//! - a group's block keeps its eight scales, eight mins and 128 nibble bytes together (one
//!   160-byte [`GroupBlock`]), so a pass over a group reads one stream of memory.
//!
//! On CPUs with AVX-512 VNNI (AMD Zen 4, Intel Ice Lake and later) the integer core uses
//! `vpdpbusd`, which multiplies and accumulates four byte pairs into a 32-bit lane in one
//! instruction where AVX2 needs a `maddubs` and an add; a prefill's passes run two row groups
//! in a 512-bit register against eight tokens at a time. The sums are the same integers, so
//! the results are the same bits.
//!
//! On CPUs with AMX (Intel Sapphire Rapids and later), where Linux grants the process the
//! tile state, a product of at least `AMX_MIN_TOKENS` (64) tokens takes each block's integer
//! sums for 16 tokens × 16 rows from one `tdpbsud` tile product instead (the nibbles
//! unpacked into tiles once per task; `ORCHARD_NO_AMX=1` turns it off). Again the same
//! integers, and the float part is the VNNI kernel's, lane for lane.
//!
//! The activation quantization mirrors candle's `BlockQ8_1::from_float` bit for bit
//! (including the f16 rounding of `d` and `s`).

use super::weights::{self, WeightBuf};
use super::{par_rows, quantize_i8, team, Isa, RowsJob, TileOut, PARALLEL_MIN_ROWS, ROW_ALIGN};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Result, Tensor};
use half::f16;

/// Number of weights in one Q4_1 / Q8_1 block.
const QK: usize = 32;
/// Bytes of one ggml `block_q4_1`: f16 d, f16 m, 16 bytes of nibbles.
const BLOCK_BYTES: usize = 20;
/// Rows interleaved in one group (one per f32 lane of a 256-bit register).
const ROWS: usize = ROW_ALIGN;
/// Nibble bytes of one block of one row group.
const GROUP_BLOCK_BYTES: usize = ROWS * QK / 2;
/// Tokens computed together in a multi-token step (a row group's nibbles are unpacked once
/// for all of them).
const TOKENS: usize = 4;
/// Tokens of a multi-token pass where the kernel has registers for more ([`Passes::WIDE`]:
/// AVX-512's 32): each block's unpacked nibbles and widened scales then serve eight tokens,
/// which cuts the instructions per multiply-add of a prefill by about a sixth. Sixteen spill
/// (a 512-token prefill 25% slower than with eight).
const WIDE_TOKENS: usize = 8;
/// How far ahead of the block being read a streaming pass prefetches its weights, in blocks
/// of a row group (4 KiB of nibbles, and the matching scales and mins). A decode step's
/// matrices are split into tasks of a few dozen KiB each, and the hardware prefetcher alone
/// ramps up too slowly on such short streams: with this, the default model's Q4_1 layers at
/// one token stream at a median 26.4 GB/s instead of 23.2 (2.52 against 2.86 ms per step; 40
/// interleaved rounds, faster in 33 of them).
const PREFETCH_BLOCKS: usize = 4096 / GROUP_BLOCK_BYTES;
/// Tokens from which a product uses AMX tile products where the CPU has them
/// ([`Kernel::for_tokens`]).
const AMX_MIN_TOKENS: usize = 64;

/// Activation blocks one task quantizes in a multi-token step.
const QUANTIZE_TASK_BLOCKS: usize = 64;

/// A Q4_1 weight matrix `[n_out, k]` repacked for fast CPU matrix products (layout in the
/// module docs). Rows past `n_out` in the last group are zero.
#[derive(Debug, Clone)]
pub struct Q4_1Matrix {
    n_out: usize,
    k: usize,
    /// Per (group, block): `[groups * nb]`.
    blocks: WeightBuf<GroupBlock>,
}

/// One block of one row group: the eight rows' scales, mins and interleaved nibbles, side by
/// side so a pass over the group reads one stream.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(32))]
struct GroupBlock {
    d: [f16; ROWS],
    m: [f16; ROWS],
    q: [u8; GROUP_BLOCK_BYTES],
}

impl GroupBlock {
    const ZERO: Self = Self {
        d: [f16::ZERO; ROWS],
        m: [f16::ZERO; ROWS],
        q: [0; GROUP_BLOCK_BYTES],
    };
}

/// An activation matrix `[t, k]` quantized to Q8_1 once and shared by every Q4_1 weight
/// matrix that reads it (q, k and v; gate and up), so the quantization is not repeated per
/// projection.
#[derive(Debug, Clone, Default)]
pub struct Q8_1Activations {
    t: usize,
    k: usize,
    /// `[t * nb]` per-block scale (the buffer may be longer: reused buffers only grow).
    d: Vec<f32>,
    /// `[t * nb]` per-block `d * sum(q)` (the buffer may be longer).
    s: Vec<f32>,
    /// `[t * k]` int8 values (the buffer may be longer).
    q: Vec<i8>,
}

impl Q8_1Activations {
    /// Quantizes `t` rows of `k` activations (`k` a multiple of 32), exactly like candle's
    /// `BlockQ8_1::from_float`, so results line up with candle's `QMatMul`.
    pub fn quantize(x: &[f32], t: usize, k: usize) -> Self {
        Self::quantize_with(x, t, k, Isa::detect())
    }

    fn quantize_with(x: &[f32], t: usize, k: usize, isa: Isa) -> Self {
        let mut act = Self::default();
        act.quantize_into_with(x, t, k, isa);
        act
    }

    /// [`Self::quantize`] into `self`, reusing its buffers: they only grow (zero-filled once),
    /// and every value of the `t` rows is overwritten, so a step's activations cost no
    /// allocation and no clearing (a fresh `[512, 1536]` buffer is a serial `memset` while the
    /// other threads wait).
    pub fn quantize_into(&mut self, x: &[f32], t: usize, k: usize) {
        self.quantize_into_with(x, t, k, Isa::detect())
    }

    fn quantize_into_with(&mut self, x: &[f32], t: usize, k: usize, isa: Isa) {
        assert_eq!(x.len(), t * k, "Q8_1Activations::quantize: x length");
        assert!(k.is_multiple_of(QK), "Q8_1Activations::quantize: k % 32");
        let nb = k / QK;
        self.t = t;
        self.k = k;
        // Grown, never shrunk: shrinking and growing back would zero the regrown part each
        // time (the quantization of a `[t, 1536]` input after a `[t, 576]` one).
        for (buf, n) in [(&mut self.d, t * nb), (&mut self.s, t * nb)] {
            if buf.len() < n {
                buf.resize(n, 0.0);
            }
        }
        if self.q.len() < t * k {
            self.q.resize(t * k, 0);
        }
        let (q, d, s) = (
            &mut self.q[..t * k],
            &mut self.d[..t * nb],
            &mut self.s[..t * nb],
        );
        // One decode token's few dozen blocks are not worth a hand-off.
        let per_task = if t >= PARALLEL_MIN_ROWS {
            QUANTIZE_TASK_BLOCKS
        } else {
            (t * nb).max(1)
        };
        let mut tasks: Vec<_> = x
            .chunks(per_task * QK)
            .zip(q.chunks_mut(per_task * QK))
            .zip(d.chunks_mut(per_task))
            .zip(s.chunks_mut(per_task))
            .collect();
        team::for_each_mut(&mut tasks, |_, (((x, q), d), s)| {
            let (mut x, mut q, mut d, mut s) = (&x[..], &mut q[..], &mut d[..], &mut s[..]);
            // Eight blocks at a time where the instruction set has a kernel for it.
            #[cfg(target_arch = "x86_64")]
            if isa == Isa::Avx2 {
                let eights = d.len() / 8;
                let (x8, q8) = (x.chunks_exact(8 * QK), q.chunks_exact_mut(8 * QK));
                let (d8, s8) = (d.chunks_exact_mut(8), s.chunks_exact_mut(8));
                for (((xb, qb), d), s) in x8.zip(q8).zip(d8).zip(s8) {
                    // SAFETY: `Avx2` only comes from runtime detection (avx2, fma, f16c);
                    // chunks of eight 32-value blocks and their eight scales.
                    unsafe { avx2::quantize_blocks8(xb, qb, d, s) };
                }
                (x, q) = (&x[eights * 8 * QK..], &mut q[eights * 8 * QK..]);
                (d, s) = (&mut d[eights * 8..], &mut s[eights * 8..]);
            }
            let blocks = x.chunks_exact(QK).zip(q.chunks_exact_mut(QK));
            for ((xb, qb), (d, s)) in blocks.zip(d.iter_mut().zip(s.iter_mut())) {
                match isa {
                    Isa::Scalar => quantize_block(xb, qb, d, s),
                    // SAFETY: `Avx2` only comes from runtime detection (avx2, fma, f16c);
                    // blocks are 32 values (`k % 32 == 0` asserted above).
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => unsafe { avx2::quantize_block(xb, qb, d, s) },
                }
            }
        });
    }
    /// Number of rows (tokens).
    pub fn rows(&self) -> usize {
        self.t
    }

    fn row(&self, ti: usize) -> XRow<'_> {
        let nb = self.k / QK;
        XRow {
            d: &self.d[ti * nb..(ti + 1) * nb],
            s: &self.s[ti * nb..(ti + 1) * nb],
            q: &self.q[ti * self.k..(ti + 1) * self.k],
        }
    }
}

/// One block of 32 activations to Q8_1, as candle's `BlockQ8_1::from_float` computes it.
fn quantize_block(xb: &[f32], qb: &mut [i8], d: &mut f32, s: &mut f32) {
    let dx = quantize_i8(xb, qb);
    let sum: i32 = qb.iter().map(|&q| q as i32).sum();
    let dh = f16::from_f32(dx);
    *d = dh.to_f32();
    *s = (f16::from_f32(sum as f32) * dh).to_f32();
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
        let mut blocks = weights::filled(n_out.div_ceil(ROWS) * nb, GroupBlock::ZERO);
        for (r, row) in data.chunks_exact(nb * BLOCK_BYTES).enumerate() {
            let (g, lane) = (r / ROWS, r % ROWS);
            for (b, block) in row.chunks_exact(BLOCK_BYTES).enumerate() {
                let gb = &mut blocks[g * nb + b];
                gb.d[lane] = f16::from_le_bytes([block[0], block[1]]);
                gb.m[lane] = f16::from_le_bytes([block[2], block[3]]);
                for (c, four) in block[4..].chunks_exact(4).enumerate() {
                    gb.q[c * 32 + lane * 4..][..4].copy_from_slice(four);
                }
            }
        }
        Ok(Self {
            n_out,
            k,
            blocks: WeightBuf::new(blocks),
        })
    }

    /// Moves the weights of `matrices` into one buffer, in the order given (see
    /// [`weights::pack`]); results stay the same.
    pub fn pack(matrices: &mut [&mut Q4_1Matrix]) {
        weights::pack(
            &mut matrices
                .iter_mut()
                .map(|m| &mut m.blocks)
                .collect::<Vec<_>>(),
        );
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

    fn matmul_with(&self, x: &[f32], t: usize, out: &mut [f32], kernel: Kernel) {
        assert_eq!(x.len(), t * self.k, "Q4_1Matrix::matmul: x length");
        let act = Q8_1Activations::quantize(x, t, self.k);
        self.matmul_q8_with(&act, out, kernel);
    }

    /// Row group `g`.
    fn group(&self, g: usize) -> WGroup<'_> {
        let nb = self.k / QK;
        WGroup {
            nb,
            blocks: &self.blocks.as_slice()[g * nb..][..nb],
        }
    }

    fn matmul_q8_with(&self, act: &Q8_1Activations, out: &mut [f32], kernel: Kernel) {
        assert_eq!(act.k, self.k, "Q4_1Matrix::matmul: activation k");
        let nb = self.k / QK;
        let kernel = kernel.for_tokens(act.t);
        let job = RowsJob {
            n_out: self.n_out,
            t: act.t,
            row_bytes: nb * BLOCK_BYTES,
            align: kernel.row_align(),
        };
        par_rows(job, out, |mut o: TileOut<'_>| {
            let tile = o.tile.clone();
            if tile.tokens.len() < TOKENS {
                // Fewer tokens than a token chunk (a decode step, or the end of a prefill):
                // each token against all of the tile's row groups in one kernel call, the
                // first token's pass streaming the weights from memory. One call per tile
                // instead of one per row group: the Q4_1 layers at one token (random weights
                // in the default model's shapes, 2 threads, 60 paired rounds) took a median
                // 2.385 ms against 2.429, less in 39 rounds.
                for ti in tile.tokens.clone() {
                    let stream = ti == 0;
                    kernel.dot_rows_1(self, &tile.rows, act.row(ti), stream, o.row_mut(ti));
                }
                return;
            }
            kernel.dot_tile(self, act, &mut o);
        });
    }
}

/// One group of eight interleaved weight rows.
#[derive(Clone, Copy)]
struct WGroup<'a> {
    nb: usize,
    blocks: &'a [GroupBlock],
}

/// How a kernel computes one pass of a multi-token tile: [`Passes::GROUPS`] adjacent row groups
/// (fewer at the tile's end) against `C` tokens.
trait Passes {
    /// Row groups one pass computes together.
    const GROUPS: usize;
    /// Whether passes of [`WIDE_TOKENS`] tokens come first (then [`TOKENS`], then one).
    const WIDE: bool;

    /// Row groups `groups` of `m` against the token rows `x`, into `out[c]` (token `c`'s values
    /// of the groups' rows; the last group may be cut). With `stream`, the pass that reads the
    /// weights from memory (it prefetches ahead).
    ///
    /// SAFETY: the implementation's instruction set is available, every `x` fits `m`'s groups,
    /// `groups` lies within `m` and every `out[c]` holds at most `groups.len() * ROWS` values.
    unsafe fn pass<const C: usize>(
        m: &Q4_1Matrix,
        groups: std::ops::Range<usize>,
        x: [XRow<'_>; C],
        stream: bool,
        out: [&mut [f32]; C],
    );
}

/// A multi-token tile: its row groups [`Passes::GROUPS`] at a time, each against the tile's
/// tokens [`TOKENS`] at a time and then one by one. Only the first tokens' pass brings a
/// group's weights from memory; the later ones find them in cache. The whole loop is inlined
/// into each instruction set's entry point, so a pass costs no call and no argument copies.
///
/// SAFETY: `P`'s instruction set is available; the tile starts on a group boundary, lies
/// within `m` and `act`, and `act.k == m.k`.
#[inline(always)]
unsafe fn tile_with<P: Passes>(m: &Q4_1Matrix, act: &Q8_1Activations, o: &mut TileOut<'_>) {
    let tile = o.tile.clone();
    // Tasks start on group boundaries (`ROW_ALIGN`); the last may end mid-group.
    let groups = tile.rows.start / ROWS..tile.rows.end.div_ceil(ROWS);
    let mut g = groups.start;
    while g < groups.end {
        let pass = (groups.end - g).min(P::GROUPS);
        let rows = g * ROWS..((g + pass) * ROWS).min(tile.rows.end);
        token_passes::<P>(m, act, o, (g..g + pass, &rows));
        g += pass;
    }
}

/// The tile's tokens against row groups `groups` (rows `rows`): passes of [`WIDE_TOKENS`]
/// tokens first where `P` has them, then [`TOKENS`], then one at a time.
///
/// SAFETY: as [`tile_with`]; `groups` and `rows` lie within the tile.
#[inline(always)]
unsafe fn token_passes<P: Passes>(
    m: &Q4_1Matrix,
    act: &Q8_1Activations,
    o: &mut TileOut<'_>,
    (groups, rows): (std::ops::Range<usize>, &std::ops::Range<usize>),
) {
    let mut ti = o.tile.tokens.start;
    if P::WIDE {
        ti = passes::<P, WIDE_TOKENS>(m, act, o, (groups.clone(), rows), ti);
    }
    ti = passes::<P, TOKENS>(m, act, o, (groups.clone(), rows), ti);
    passes::<P, 1>(m, act, o, (groups, rows), ti);
}

/// [`tile_with`]'s passes of `C` tokens over row groups `groups` (rows `rows`), from token `ti`
/// while `C` tokens are left in the tile; returns the first token left over.
///
/// SAFETY: as [`tile_with`]; `groups` and `rows` lie within the tile.
#[inline(always)]
unsafe fn passes<P: Passes, const C: usize>(
    m: &Q4_1Matrix,
    act: &Q8_1Activations,
    o: &mut TileOut<'_>,
    (groups, rows): (std::ops::Range<usize>, &std::ops::Range<usize>),
    mut ti: usize,
) -> usize {
    while ti + C <= o.tile.tokens.end {
        let x = std::array::from_fn(|c| act.row(ti + c));
        P::pass(m, groups.clone(), x, ti == 0, o.columns_mut::<C>(ti, rows));
        ti += C;
    }
    ti
}

/// Splits the next group's piece (its first [`ROWS`] values, fewer at a cut end) off each
/// `out[c]`, a run of rows starting on a group boundary.
///
/// The SIMD passes call their group kernels in a plain loop over this, not through a closure:
/// a closure does not inherit its enclosing function's `#[target_feature]`s, and where LLVM
/// left one uninlined (it did, in a build with a second instantiation of the tile loop), every
/// intrinsic in it became a call and a 512-token prefill took 4x as long.
#[inline(always)]
fn next_group<'o, const C: usize>(out: &mut [&'o mut [f32]; C]) -> [&'o mut [f32]; C] {
    std::array::from_fn(|c| {
        let o = std::mem::take(&mut out[c]);
        let (part, rest) = o.split_at_mut(o.len().min(ROWS));
        out[c] = rest;
        part
    })
}

/// The portable passes: [`dot_scalar`] per row and token.
struct ScalarPasses;

impl Passes for ScalarPasses {
    const GROUPS: usize = 1;
    const WIDE: bool = false;

    unsafe fn pass<const C: usize>(
        m: &Q4_1Matrix,
        groups: std::ops::Range<usize>,
        x: [XRow<'_>; C],
        _stream: bool,
        out: [&mut [f32]; C],
    ) {
        let mut out = out;
        for g in groups {
            let w = m.group(g);
            for (x, o) in x.into_iter().zip(next_group(&mut out)) {
                for (lane, o) in o.iter_mut().enumerate() {
                    *o = dot_scalar(w, lane, x);
                }
            }
        }
    }
}

/// One quantized activation row: per-block scales, `d * sum(q)`, and its int8 values.
#[derive(Clone, Copy)]
struct XRow<'a> {
    d: &'a [f32],
    s: &'a [f32],
    q: &'a [i8],
}

impl XRow<'_> {
    /// Whether this row's lengths fit weight group `w` (what the SIMD code relies on).
    fn fits(&self, w: &WGroup<'_>) -> bool {
        let nb = w.nb;
        w.blocks.len() == nb && self.d.len() == nb && self.s.len() == nb && self.q.len() == nb * QK
    }
}

/// The instruction set this kernel runs with: [`Isa`]'s, and on x86-64 CPUs with AVX-512
/// VNNI (AMD Zen 4, Intel Ice Lake and later) a faster integer core; all give the same bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Vnni,
    /// [`Kernel::Vnni`], with the multi-token tiles' integer sums on AMX tiles.
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    Amx,
}

impl Kernel {
    /// The best kernel this CPU runs (the feature answers are cached by `std`).
    fn detect() -> Self {
        match Isa::detect() {
            Isa::Scalar => Kernel::Scalar,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 if Isa::has_avx512_vnni() => {
                #[cfg(target_os = "linux")]
                if amx::available() {
                    return Kernel::Amx;
                }
                Kernel::Vnni
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => Kernel::Avx2,
        }
    }

    /// Every kernel this CPU can run, the portable one first (for tests).
    #[cfg(test)]
    fn all_available() -> Vec<Self> {
        let mut all = vec![Kernel::Scalar];
        #[cfg(target_arch = "x86_64")]
        match Kernel::detect() {
            Kernel::Scalar => {}
            Kernel::Avx2 => all.push(Kernel::Avx2),
            Kernel::Vnni => all.extend([Kernel::Avx2, Kernel::Vnni]),
            #[cfg(target_os = "linux")]
            Kernel::Amx => all.extend([Kernel::Avx2, Kernel::Vnni, Kernel::Amx]),
        }
        all
    }

    /// The kernel for a product with `t` tokens: AMX's tile products only from
    /// [`AMX_MIN_TOKENS`]: each task unpacks its weight tiles once, which few token tiles do
    /// not repay (prefills on AMX against VNNI, default model: 16 tokens 12-15% slower, 32
    /// tokens 5% slower, 48 and 64 even, 96 6% faster, 512 5% faster).
    fn for_tokens(self, t: usize) -> Self {
        match self {
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            Kernel::Amx if t < AMX_MIN_TOKENS => Kernel::Vnni,
            kernel => kernel,
        }
    }

    /// The rows a task of a product should start on a multiple of: an AMX tile product takes
    /// two row groups at a time, and a task with an odd group leaves it to the VNNI passes
    /// (a 512-token prefill took 3% longer with tasks of 72 rows than of 80, measured when
    /// tasks were a quarter of a thread's rows).
    fn row_align(self) -> usize {
        match self {
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            Kernel::Amx => 2 * ROWS,
            _ => ROWS,
        }
    }

    /// A multi-token tile of `m`'s product with `act` ([`tile_with`]), into `o`.
    fn dot_tile(self, m: &Q4_1Matrix, act: &Q8_1Activations, o: &mut TileOut<'_>) {
        let rows = &o.tile.rows;
        assert!(
            rows.start.is_multiple_of(ROWS)
                && rows.end <= m.n_out
                && act.k == m.k
                && o.tile.tokens.end <= act.t,
            "Q4_1 dot: tile {:?} of a [{}, {}] matrix against {} tokens of {}",
            o.tile,
            m.n_out,
            m.k,
            act.t,
            act.k
        );
        match self {
            // SAFETY: the portable passes need no instruction set; shapes checked above.
            Kernel::Scalar => unsafe { tile_with::<ScalarPasses>(m, act, o) },
            // SAFETY: `Avx2` is only constructed after runtime detection of avx2, fma and
            // f16c; shapes checked above.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { avx2::tile(m, act, o) },
            // SAFETY: `Vnni` additionally requires avx512f, avx512bw, avx512vl and avx512vnni,
            // detected; shapes checked above.
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni => unsafe { avx2::tile_vnni(m, act, o) },
            // SAFETY: `Amx` is only constructed after `Vnni`'s detection and `amx::available`
            // (CPUID, and the kernel's permission for the tile state); shapes checked above.
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            Kernel::Amx => unsafe { avx2::tile_amx(m, act, o) },
        }
    }

    /// Token row `x` against weight rows `rows` of `m` (starting on a group boundary), into
    /// `out` (`rows.len()` values): what a one-token pass gives group by group, in one call.
    fn dot_rows_1(
        self,
        m: &Q4_1Matrix,
        rows: &std::ops::Range<usize>,
        x: XRow<'_>,
        stream: bool,
        out: &mut [f32],
    ) {
        assert!(
            rows.start.is_multiple_of(ROWS) && rows.end <= m.n_out && out.len() == rows.len(),
            "Q4_1 dot: rows {rows:?} of {} into {} outputs",
            m.n_out,
            out.len()
        );
        let groups = rows.start / ROWS..rows.end.div_ceil(ROWS);
        // Every group of `m` has the same lengths: checking one checks all.
        if let Some(g) = groups.clone().next() {
            assert!(x.fits(&m.group(g)), "Q4_1 dot: mismatched row lengths");
        }
        match self {
            Kernel::Scalar => {
                for (i, g) in groups.enumerate() {
                    let w = m.group(g);
                    for (lane, o) in out[i * ROWS..].iter_mut().take(ROWS).enumerate() {
                        *o = dot_scalar(w, lane, x);
                    }
                }
            }
            // SAFETY: `Avx2` is only constructed after runtime detection of avx2, fma and
            // f16c; the row lengths were checked above, `out` holds one value per row.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { avx2::dot_rows_1(m, groups, x, stream, out) },
            // SAFETY: `Vnni` additionally requires avx512f, avx512vl and avx512vnni, detected.
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            Kernel::Vnni | Kernel::Amx => unsafe {
                avx2::dot_rows_1_vnni(m, groups, x, stream, out)
            },
            #[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
            Kernel::Vnni => unsafe { avx2::dot_rows_1_vnni(m, groups, x, stream, out) },
        }
    }
}

/// Intel AMX (Sapphire Rapids and later): tile registers and the `tdpbsud` integer tile
/// product, through inline assembly (Rust has no stable intrinsics for them). A tile product
/// of a block gives the same exact integer sums as the VNNI kernel, so the same bits.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod amx {
    use std::arch::asm;

    /// Tokens of one tile product: the rows of an activation tile (AMX's 16).
    pub const TOKENS: usize = 16;
    /// Bytes of one block's weight tile: 8 rows (four activations each) × 16 weight rows × 4.
    pub const WEIGHT_TILE_BYTES: usize = 512;

    /// One block's weight tile.
    #[derive(Clone, Copy)]
    #[repr(C, align(64))]
    pub struct WeightTile(pub [u8; WEIGHT_TILE_BYTES]);

    /// A task's unpacked weight tiles and its token tile's scales, reused by every call on
    /// this thread.
    #[derive(Default)]
    struct Scratch {
        /// Which rows `tiles` holds: the matrix's blocks' address, and the rows.
        key: Option<(usize, usize, usize)>,
        /// `[pairs][nb]` weight tiles.
        tiles: Vec<WeightTile>,
        /// `[nb][TOKENS]` activation scales `d`, then `[nb][TOKENS]` sums `s`.
        scales: Vec<f32>,
    }

    thread_local! {
        static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
    }

    /// This thread's buffers for a tile of weight rows `key` (`n` weight tiles, `nb` blocks):
    /// the weight tiles, whether they must be unpacked (they hold other rows, or `refill`),
    /// and room for `2 * nb * TOKENS` scales. The pointers stay valid until the next call on
    /// this thread.
    pub fn scratch(
        key: (usize, usize, usize),
        n: usize,
        nb: usize,
        refill: bool,
    ) -> (*mut WeightTile, bool, *mut f32) {
        SCRATCH.with_borrow_mut(|s| {
            if s.tiles.len() < n {
                s.tiles.resize(n, WeightTile([0; WEIGHT_TILE_BYTES]));
            }
            if s.scales.len() < 2 * nb * TOKENS {
                s.scales.resize(2 * nb * TOKENS, 0.0);
            }
            let fill = refill || s.key != Some(key);
            s.key = Some(key);
            (s.tiles.as_mut_ptr(), fill, s.scales.as_mut_ptr())
        })
    }

    /// One block's sums: `[token][row]`, 16 × 16 `i32`.
    #[derive(Clone, Copy)]
    #[repr(C, align(64))]
    pub struct SumTile(pub [[i32; 16]; TOKENS]);

    /// `ldtilecfg`'s 64-byte operand (palette 1).
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    /// Tiles 0 and 1: sums (16 tokens × 16 `i32`); 2 and 3: activations (16 tokens × one
    /// block's 32 `i8`); 4 and 5: weights (8 rows of four nibbles × 16 weight rows). Each
    /// triple is one block's product; two let a block's product run while the previous one's
    /// sums are read.
    static CONFIG: TileConfig = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [64, 64, 32, 32, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        rows: [16, 16, 16, 16, 8, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    };

    /// Whether this CPU has AMX-TILE and AMX-INT8 and Linux lets this process use the tile
    /// state (asked once, with `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`; a
    /// hypervisor or kernel that does not grant it leaves the VNNI kernel in use). Setting
    /// `ORCHARD_NO_AMX=1` in the environment turns it off.
    pub fn available() -> bool {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            if std::env::var_os("ORCHARD_NO_AMX").is_some_and(|v| v != "0") {
                return false;
            }
            // Asked after the VNNI detection: CPUID leaf 7 exists.
            let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
            const TILE_INT8: u32 = (1 << 24) | (1 << 25);
            if leaf7.edx & TILE_INT8 != TILE_INT8 {
                return false;
            }
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: a request for a permission; it touches no memory of this process.
            let granted = unsafe {
                libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_REQ_XCOMP_PERM,
                    XFEATURE_XTILEDATA,
                )
            } == 0;
            granted && os_saves_tiles()
        })
    }

    /// XCR0 bits 17 and 18 (tile configuration and data saved by the OS).
    fn os_saves_tiles() -> bool {
        if !std::arch::is_x86_feature_detected!("xsave") {
            return false;
        }
        // SAFETY: xsave detected (OSXSAVE included: std checks it before reporting xsave).
        let xcr0 = unsafe { xgetbv0() };
        xcr0 & (3 << 17) == 3 << 17
    }

    /// SAFETY: xsave available.
    #[target_feature(enable = "xsave")]
    unsafe fn xgetbv0() -> u64 {
        std::arch::x86_64::_xgetbv(0)
    }

    /// Loads [`CONFIG`] into this thread's tile configuration.
    ///
    /// SAFETY: [`available`].
    #[inline(always)]
    pub unsafe fn configure() {
        asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, preserves_flags, readonly));
    }

    /// Releases this thread's tiles (a context switch then saves no tile data).
    ///
    /// SAFETY: [`available`].
    #[inline(always)]
    pub unsafe fn release() {
        asm!("tilerelease", options(nostack, preserves_flags, nomem));
    }

    /// Tile set `S` (0 or 1): zeroes the sums and adds the product of the activation tile at
    /// `x` (16 rows of 32 `i8`, `stride` bytes apart) with the weight tile `w`.
    ///
    /// SAFETY: tiles configured; 16 rows readable at `x`.
    #[inline(always)]
    pub unsafe fn product<const S: usize>(x: *const i8, stride: usize, w: &WeightTile) {
        // One asm block per set: tile registers are named in the instruction.
        macro_rules! product {
            ($sums:literal, $x:literal, $w:literal) => {
                asm!(
                    concat!("tileloadd tmm", $x, ", [{x} + {s} * 1]"),
                    concat!("tileloadd tmm", $w, ", [{w} + {ws} * 1]"),
                    concat!("tilezero tmm", $sums),
                    concat!("tdpbsud tmm", $sums, ", tmm", $x, ", tmm", $w),
                    x = in(reg) x, s = in(reg) stride, w = in(reg) w.0.as_ptr(), ws = in(reg) 64usize,
                    options(nostack, preserves_flags, readonly),
                )
            };
        }
        if S == 0 {
            product!("0", "2", "4");
        } else {
            product!("1", "3", "5");
        }
    }

    /// Stores tile set `S`'s sums into `out`.
    ///
    /// SAFETY: tiles configured and set `S` holds a product.
    #[inline(always)]
    pub unsafe fn store<const S: usize>(out: &mut std::mem::MaybeUninit<SumTile>) {
        let p = out.as_mut_ptr();
        if S == 0 {
            asm!("tilestored [{p} + {s} * 1], tmm0", p = in(reg) p, s = in(reg) 64usize, options(nostack, preserves_flags));
        } else {
            asm!("tilestored [{p} + {s} * 1], tmm1", p = in(reg) p, s = in(reg) 64usize, options(nostack, preserves_flags));
        }
    }
}

/// The 4-bit weight `j` of block `b` of row `lane` in an interleaved group.
fn nibble(w: WGroup<'_>, b: usize, lane: usize, j: usize) -> i32 {
    let jj = j % 16;
    let byte = w.blocks[b].q[(jj / 4) * 32 + lane * 4 + jj % 4];
    i32::from(if j < 16 { byte & 0x0F } else { byte >> 4 })
}

/// Portable Q4_1 · Q8_1 row dot product: candle's `vec_dot_unopt`, operation for operation.
fn dot_scalar(w: WGroup<'_>, lane: usize, x: XRow<'_>) -> f32 {
    let mut sumf = 0f32;
    for b in 0..w.nb {
        let q8 = &x.q[b * QK..(b + 1) * QK];
        let sumi: i32 = (0..QK)
            .map(|j| nibble(w, b, lane, j) * i32::from(q8[j]))
            .sum();
        let (dw, mw) = (w.blocks[b].d[lane].to_f32(), w.blocks[b].m[lane].to_f32());
        sumf += sumi as f32 * dw * x.d[b] + mw * x.s[b];
    }
    sumf
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    #[cfg(target_os = "linux")]
    use super::{amx, token_passes};
    use super::{
        next_group, tile_with, GroupBlock, Passes, Q4_1Matrix, Q8_1Activations, WGroup, XRow,
        PREFETCH_BLOCKS, QK, ROWS,
    };
    use crate::kernels::vec::avx2 as vec_avx2;
    use crate::kernels::TileOut;
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// Eight f16 values widened to f32.
    ///
    /// SAFETY: caller ensures f16c and 8 readable values at `p`.
    #[inline(always)]
    unsafe fn widen(p: *const half::f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    /// One f32 rounded to f16 (round to nearest even, as `half::f16::from_f32`) and back.
    ///
    /// SAFETY: caller ensures f16c.
    #[inline(always)]
    unsafe fn through_f16(x: f32) -> f32 {
        let h = _mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(x));
        _mm_cvtss_f32(_mm_cvtph_ps(h))
    }

    /// [`super::quantize_block`] with AVX2: the same `amax`, `1 / d`, products, rounding
    /// (halves away from zero, from a truncation) and f16 roundings, so the same bits.
    ///
    /// SAFETY: caller ensures avx2 + f16c; `xb` and `qb` hold 32 values.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_block(xb: &[f32], qb: &mut [i8], d: &mut f32, s: &mut f32) {
        debug_assert!(xb.len() == QK && qb.len() == QK);
        let v = block_values(xb.as_ptr());
        let m = block_amax(v);
        let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps::<1>(m2, m2)));
        let dx = amax / 127.0;
        let id = if dx != 0.0 { 1.0 / dx } else { 0.0 };
        let total = block_round(v, _mm256_set1_ps(id), !id.is_finite(), qb.as_mut_ptr());
        let t4 = _mm_add_epi32(
            _mm256_castsi256_si128(total),
            _mm256_extracti128_si256::<1>(total),
        );
        let t2 = _mm_add_epi32(t4, _mm_unpackhi_epi64(t4, t4));
        let sum = _mm_cvtsi128_si32(_mm_add_epi32(t2, _mm_shuffle_epi32::<1>(t2)));
        let dh = through_f16(dx);
        *d = dh;
        *s = through_f16(through_f16(sum as f32) * dh);
    }

    /// Eight consecutive blocks (256 values) at once: [`quantize_block`]'s operations on every
    /// value, with the per-block scalars (maximum, scale, its inverse, sum and their f16
    /// roundings) computed for the eight blocks side by side in one vector (IEEE divisions
    /// and roundings lane by lane, so the same bits) instead of one dependent chain of
    /// horizontal reductions and scalar divisions per block.
    ///
    /// SAFETY: caller ensures avx2 + f16c; `xb` and `qb` hold 256 values, `d` and `s` 8.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_blocks8(xb: &[f32], qb: &mut [i8], d: &mut [f32], s: &mut [f32]) {
        debug_assert!(xb.len() == 8 * QK && qb.len() == 8 * QK && d.len() == 8 && s.len() == 8);
        let mut v = [[_mm256_setzero_ps(); 4]; 8];
        let mut m = [_mm256_setzero_ps(); 8];
        for b in 0..8 {
            v[b] = block_values(xb.as_ptr().add(b * QK));
            m[b] = block_amax(v[b]);
        }
        let amax = vec_avx2::reduce8(m, |a, b| _mm256_max_ps(a, b));
        let dx = _mm256_div_ps(amax, _mm256_set1_ps(127.0));
        // `dx != 0.0` as Rust compares (true for NaN): not-equal, unordered.
        let nonzero = _mm256_cmp_ps::<_CMP_NEQ_UQ>(dx, _mm256_setzero_ps());
        let id = _mm256_and_ps(_mm256_div_ps(_mm256_set1_ps(1.0), dx), nonzero);
        let mut ids = [0f32; 8];
        _mm256_storeu_ps(ids.as_mut_ptr(), id);
        let not_finite = _mm256_cmp_ps::<_CMP_NLT_UQ>(
            _mm256_andnot_ps(_mm256_set1_ps(-0.0), id),
            _mm256_set1_ps(f32::INFINITY),
        );
        let saturate = _mm256_movemask_ps(not_finite) != 0;
        let mut totals = [_mm256_setzero_ps(); 8];
        for b in 0..8 {
            let t = block_round(
                v[b],
                _mm256_set1_ps(ids[b]),
                saturate,
                qb.as_mut_ptr().add(b * QK),
            );
            totals[b] = _mm256_castsi256_ps(t);
        }
        let sums = vec_avx2::reduce8(totals, |a, b| {
            _mm256_castsi256_ps(_mm256_add_epi32(
                _mm256_castps_si256(a),
                _mm256_castps_si256(b),
            ))
        });
        let dh = through_f16x8(dx);
        let sh = through_f16x8(_mm256_mul_ps(
            through_f16x8(_mm256_cvtepi32_ps(_mm256_castps_si256(sums))),
            dh,
        ));
        _mm256_storeu_ps(d.as_mut_ptr(), dh);
        _mm256_storeu_ps(s.as_mut_ptr(), sh);
    }

    /// A block's 32 values.
    ///
    /// SAFETY: avx available; 32 readable values at `p`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn block_values(p: *const f32) -> [__m256; 4] {
        std::array::from_fn(|i| _mm256_loadu_ps(p.add(8 * i)))
    }

    /// Lane-wise `max |x|` over a block's four vectors.
    ///
    /// SAFETY: avx available.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn block_amax(v: [__m256; 4]) -> __m256 {
        let abs = v.map(|x| _mm256_andnot_ps(_mm256_set1_ps(-0.0), x));
        _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]))
    }

    /// `round(x * id)` (halves away from zero) of a block's values as int8 at `qb`; returns
    /// the lane-wise sum of the four vectors of rounded values (as i32). `saturate` is for an
    /// `id` that is not finite (a block of values so small that `1 / d` overflowed): the
    /// products are then infinite or NaN, and are cast as the scalar path's saturating
    /// `as i8` casts them (to -128 or 127, NaN to 0).
    ///
    /// SAFETY: avx2 available; 32 writable bytes at `qb`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn block_round(v: [__m256; 4], id: __m256, saturate: bool, qb: *mut i8) -> __m256i {
        let sign = _mm256_set1_ps(-0.0);
        let (half, one) = (_mm256_set1_ps(0.5), _mm256_set1_ps(1.0));
        let q = v.map(|x| {
            let x = _mm256_mul_ps(x, id);
            let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(x);
            let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(x, t));
            let up = _mm256_cmp_ps::<_CMP_GE_OQ>(frac, half);
            let away = _mm256_or_ps(_mm256_and_ps(x, sign), one);
            let r = _mm256_add_ps(t, _mm256_and_ps(up, away));
            if !saturate {
                return _mm256_cvtps_epi32(r);
            }
            let ordered = _mm256_cmp_ps::<_CMP_ORD_Q>(r, r);
            let r = _mm256_min_ps(
                _mm256_max_ps(r, _mm256_set1_ps(-128.0)),
                _mm256_set1_ps(127.0),
            );
            _mm256_cvtps_epi32(_mm256_and_ps(r, ordered))
        });
        // i32 -> i8 (every value is within [-128, 127], so nothing saturates), then undo the
        // 128-bit-lane interleaving of the two packs.
        let w01 = _mm256_packs_epi32(q[0], q[1]);
        let w23 = _mm256_packs_epi32(q[2], q[3]);
        let bytes = _mm256_permutevar8x32_epi32(
            _mm256_packs_epi16(w01, w23),
            _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7),
        );
        _mm256_storeu_si256(qb as *mut __m256i, bytes);
        _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]))
    }

    /// Eight f32 rounded to f16 (round to nearest even, as `half::f16::from_f32`) and back.
    ///
    /// SAFETY: caller ensures f16c.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn through_f16x8(x: __m256) -> __m256 {
        _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x))
    }

    /// Four activation bytes broadcast to every 32-bit lane.
    ///
    /// SAFETY: caller ensures avx2 and 4 readable bytes at `p`.
    #[inline(always)]
    unsafe fn quad(p: *const i8) -> __m256i {
        _mm256_set1_epi32((p as *const i32).read_unaligned())
    }

    /// Prefetches the [`GroupBlock`] [`PREFETCH_BLOCKS`] blocks past block `b` of group `w`
    /// (past the group's end: the next group's, which follow in memory), its three cache
    /// lines. Addresses only (`wrapping_add`: they may lie past the matrix); a prefetch never
    /// faults.
    #[inline(always)]
    unsafe fn prefetch_ahead(w: WGroup<'_>, b: usize) {
        let p = w.blocks.as_ptr().wrapping_add(b + PREFETCH_BLOCKS) as *const i8;
        for line in 0..std::mem::size_of::<GroupBlock>().div_ceil(64) {
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64 * line));
        }
    }

    /// The integer core of a block: for each of `C` tokens, the eight rows' exact `sumi`
    /// (one per 32-bit lane) of one interleaved block against the token's 32 int8 values.
    /// The two implementations give the same integers, so the same bits downstream.
    trait BlockSums {
        /// SAFETY: caller ensures the instruction set, 128 readable weight bytes at `wq` and
        /// 32 readable activation bytes at every `xq[c]`.
        unsafe fn sums<const C: usize>(wq: *const u8, xq: [*const i8; C]) -> [__m256i; C];
    }

    /// AVX2: `maddubs` (unsigned nibbles × signed activations, pairs summed to 16 bits; no
    /// overflow, module docs), 16-bit adds, one `madd` to 32 bits per block.
    pub(super) struct Maddubs;

    impl BlockSums for Maddubs {
        #[inline(always)]
        unsafe fn sums<const C: usize>(wq: *const u8, xq: [*const i8; C]) -> [__m256i; C] {
            let mask = _mm256_set1_epi8(0x0F);
            let mut acc = [_mm256_setzero_si256(); C];
            for chunk in 0..4 {
                let v = _mm256_loadu_si256(wq.add(chunk * 32) as *const __m256i);
                let lo = _mm256_and_si256(v, mask);
                let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                for c in 0..C {
                    let xp = xq[c].add(4 * chunk);
                    let p_lo = _mm256_maddubs_epi16(lo, quad(xp));
                    let p_hi = _mm256_maddubs_epi16(hi, quad(xp.add(16)));
                    acc[c] = _mm256_add_epi16(acc[c], _mm256_add_epi16(p_lo, p_hi));
                }
            }
            acc.map(|a| _mm256_madd_epi16(a, _mm256_set1_epi16(1)))
        }
    }

    /// AVX-512 VNNI on 256-bit registers: `vpdpbusd` multiplies four unsigned nibbles by four
    /// signed activations and adds them straight into a 32-bit lane, one instruction where
    /// AVX2 needs a `maddubs` and an add (and a final `madd`). Two accumulators per token
    /// (low and high nibbles) keep the dependency chains short.
    pub(super) struct Dpbusd;

    impl BlockSums for Dpbusd {
        #[inline(always)]
        unsafe fn sums<const C: usize>(wq: *const u8, xq: [*const i8; C]) -> [__m256i; C] {
            let mask = _mm256_set1_epi8(0x0F);
            let mut lo_acc = [_mm256_setzero_si256(); C];
            let mut hi_acc = [_mm256_setzero_si256(); C];
            for chunk in 0..4 {
                let v = _mm256_loadu_si256(wq.add(chunk * 32) as *const __m256i);
                let lo = _mm256_and_si256(v, mask);
                let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                for c in 0..C {
                    let xp = xq[c].add(4 * chunk);
                    lo_acc[c] = _mm256_dpbusd_epi32(lo_acc[c], lo, quad(xp));
                    hi_acc[c] = _mm256_dpbusd_epi32(hi_acc[c], hi, quad(xp.add(16)));
                }
            }
            std::array::from_fn(|c| _mm256_add_epi32(lo_acc[c], hi_acc[c]))
        }
    }

    /// One group of eight rows against `C` tokens into `out[c]` (token `c`'s values of the
    /// group's first `out[c].len()` rows); each is a row's dot product computed in candle's
    /// operation order (module docs). With `stream`,
    /// each block prefetches the weights [`PREFETCH_BLOCKS`] blocks ahead (past this group's
    /// end: the next group's, which follow in memory). Inlined into the instruction set's
    /// entry points below.
    ///
    /// SAFETY: caller must ensure avx2, f16c and `S`'s instructions are available, every
    /// `x.fits(&w)` and every `out[c].len() <= ROWS`.
    #[inline(always)]
    unsafe fn group_with<S: BlockSums, const C: usize>(
        w: WGroup<'_>,
        x: [XRow<'_>; C],
        stream: bool,
        out: [&mut [f32]; C],
    ) {
        let mut sumf = [_mm256_setzero_ps(); C];
        for b in 0..w.nb {
            let wb = w.blocks.get_unchecked(b);
            if stream {
                prefetch_ahead(w, b);
            }
            let sums = S::sums(wb.q.as_ptr(), x.map(|x| x.q.as_ptr().add(b * QK)));
            let dw = widen(wb.d.as_ptr());
            let mw = widen(wb.m.as_ptr());
            for c in 0..C {
                let sumi = _mm256_cvtepi32_ps(sums[c]);
                let dx = _mm256_set1_ps(*x[c].d.get_unchecked(b));
                let sx = _mm256_set1_ps(*x[c].s.get_unchecked(b));
                let scaled = _mm256_mul_ps(_mm256_mul_ps(sumi, dw), dx);
                // Exact product of two f16 values: the same bits as mul, then add.
                let t = _mm256_fmadd_ps(mw, sx, scaled);
                sumf[c] = _mm256_add_ps(sumf[c], t);
            }
        }
        for (v, o) in sumf.into_iter().zip(out) {
            if o.len() == ROWS {
                _mm256_storeu_ps(o.as_mut_ptr(), v);
            } else {
                let mut lanes = [0f32; ROWS];
                _mm256_storeu_ps(lanes.as_mut_ptr(), v);
                o.copy_from_slice(&lanes[..o.len()]);
            }
        }
    }

    /// Row groups `groups` of `m` against one token, into `out` (lane `r` of the `i`th group
    /// at `out[i * ROWS + r]`, the last group's lanes cut to `out`'s length).
    ///
    /// SAFETY: as [`group_with`], and `x` fits `m`'s groups.
    #[inline(always)]
    unsafe fn rows_1_with<S: BlockSums>(
        m: &Q4_1Matrix,
        groups: std::ops::Range<usize>,
        x: XRow<'_>,
        stream: bool,
        out: &mut [f32],
    ) {
        for (i, g) in groups.enumerate() {
            let dst = &mut out[i * ROWS..];
            let n = dst.len().min(ROWS);
            group_with::<S, 1>(m.group(g), [x], stream, [&mut dst[..n]]);
        }
    }

    /// The AVX2 passes: [`group_with`] on one row group at a time.
    pub(super) struct Avx2Passes;

    impl Passes for Avx2Passes {
        const GROUPS: usize = 1;
        const WIDE: bool = false;

        #[inline(always)]
        unsafe fn pass<const C: usize>(
            m: &Q4_1Matrix,
            groups: Range<usize>,
            x: [XRow<'_>; C],
            stream: bool,
            out: [&mut [f32]; C],
        ) {
            let mut out = out;
            for g in groups {
                group_with::<Maddubs, C>(m.group(g), x, stream, next_group(&mut out));
            }
        }
    }

    /// The AVX-512 VNNI passes: two row groups at a time on 512-bit registers
    /// ([`pair_with`]), a last odd group with [`group_with`].
    pub(super) struct VnniPasses;

    impl Passes for VnniPasses {
        const GROUPS: usize = 2;
        const WIDE: bool = true;

        #[inline(always)]
        unsafe fn pass<const C: usize>(
            m: &Q4_1Matrix,
            groups: Range<usize>,
            x: [XRow<'_>; C],
            stream: bool,
            out: [&mut [f32]; C],
        ) {
            match groups.len() {
                2 => pair_with(
                    m.group(groups.start),
                    m.group(groups.start + 1),
                    x,
                    stream,
                    out,
                ),
                _ => {
                    let mut out = out;
                    for g in groups {
                        group_with::<Dpbusd, C>(m.group(g), x, stream, next_group(&mut out));
                    }
                }
            }
        }
    }

    /// [`tile_with`] with AVX2.
    ///
    /// SAFETY: as [`tile_with`]; avx2, fma and f16c available.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile(m: &Q4_1Matrix, act: &Q8_1Activations, o: &mut TileOut<'_>) {
        tile_with::<Avx2Passes>(m, act, o)
    }

    /// [`tile_with`] with AVX-512 VNNI.
    ///
    /// SAFETY: as [`tile_with`]; avx2, fma, f16c, avx512f, avx512bw, avx512vl and avx512vnni
    /// available.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn tile_vnni(m: &Q4_1Matrix, act: &Q8_1Activations, o: &mut TileOut<'_>) {
        tile_with::<VnniPasses>(m, act, o)
    }

    /// [`tile_with`] with the integer sums of each pair of row groups against a whole tile of
    /// [`amx::TOKENS`] tokens on AMX tiles ([`amx_pair`]); a last odd group, and a tile of
    /// fewer tokens (a prefill's end), take the VNNI passes.
    ///
    /// SAFETY: as [`tile_vnni`], and `amx::available()`.
    #[cfg(target_os = "linux")]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn tile_amx(m: &Q4_1Matrix, act: &Q8_1Activations, o: &mut TileOut<'_>) {
        let tile = o.tile.clone();
        if tile.tokens.len() != amx::TOKENS {
            return tile_with::<VnniPasses>(m, act, o);
        }
        amx::configure();
        let nb = m.k / QK;
        let groups = tile.rows.start / ROWS..tile.rows.end.div_ceil(ROWS);
        let t0 = tile.tokens.start;
        // A task's tiles of tokens come one after another on one thread, the first from token
        // 0 (`par_rows`): that one unpacks the task's weight tiles, the others reuse them.
        let pairs = groups.len() / 2;
        let key = (
            m.blocks.as_slice().as_ptr() as usize,
            tile.rows.start,
            tile.rows.end,
        );
        let (tiles, fill, scales) = amx::scratch(key, pairs * nb, nb, t0 == 0);
        // SAFETY: this thread's buffers, of these lengths, used only here until it returns.
        let tiles = std::slice::from_raw_parts_mut(tiles, pairs * nb);
        let scales = std::slice::from_raw_parts_mut(scales, 2 * nb * amx::TOKENS);
        // The tokens' scales and sums block-major, `[nb][TOKENS]` each.
        let (ds, ss) = scales.split_at_mut(nb * amx::TOKENS);
        for c in 0..amx::TOKENS {
            let x = act.row(t0 + c);
            for b in 0..nb {
                ds[b * amx::TOKENS + c] = x.d[b];
                ss[b * amx::TOKENS + c] = x.s[b];
            }
        }
        let mut g = groups.start;
        while g < groups.end {
            let pass = (groups.end - g).min(2);
            let rows = g * ROWS..((g + pass) * ROWS).min(tile.rows.end);
            if pass == 2 {
                let out = o.columns_mut::<{ amx::TOKENS }>(t0, &rows);
                let pair = (g - groups.start) / 2;
                let weights = &mut tiles[pair * nb..][..nb];
                let (w0, w1) = (m.group(g), m.group(g + 1));
                if fill {
                    for (b, tile) in weights.iter_mut().enumerate() {
                        if t0 == 0 {
                            prefetch_ahead(w0, b);
                            prefetch_ahead(w1, b);
                        }
                        unpack_pair(w0, w1, b, &mut tile.0);
                    }
                }
                amx_pair(w0, w1, act, t0, weights, (ds, ss), out);
            } else {
                token_passes::<VnniPasses>(m, act, o, (g..g + 1, &rows));
            }
            g += pass;
        }
        amx::release();
    }

    /// Two adjacent row groups (16 rows) against [`amx::TOKENS`] tokens from `t0`: per block,
    /// the exact integer sums of all 16 × 16 (token, row) pairs from one `tdpbsud` (signed
    /// activations × unsigned nibbles), then [`pair_with`]'s float part for each token, lane
    /// for lane (same bits). Block `b + 1`'s tile product runs while block `b`'s sums are
    /// scaled (two sets of tiles).
    ///
    /// SAFETY: as [`tile_amx`], tiles configured ([`amx::configure`]); the tokens lie within
    /// `act`, `act.k == w0.nb * QK`, `w1` shaped like `w0`, every `out[c].len() <= 2 * ROWS`.
    #[cfg(target_os = "linux")]
    #[inline(always)]
    unsafe fn amx_pair(
        w0: WGroup<'_>,
        w1: WGroup<'_>,
        act: &Q8_1Activations,
        t0: usize,
        weights: &[amx::WeightTile],
        (xd, xs): (&[f32], &[f32]),
        out: [&mut [f32]; amx::TOKENS],
    ) {
        const T: usize = amx::TOKENS;
        let (nb, k) = (w0.nb, act.k);
        let xq = act.q.as_ptr().add(t0 * k);
        let (xd, xs) = (xd.as_ptr(), xs.as_ptr());
        // Written by each block's tile store before it is read (no clearing: it cost a memset
        // of 2 KiB per call, 1% of a prefill's samples).
        let mut sums = [std::mem::MaybeUninit::<amx::SumTile>::uninit(); 2];
        let mut sumf = [_mm512_setzero_ps(); T];
        // Block `b + 1`'s product starts, block `b - 1`'s sums (stored one iteration earlier)
        // are scaled, then block `b`'s are stored: vector loads of data a tile store has just
        // written, or placed after a tile store still waiting for its product, wait for it.
        amx::product::<0>(xq, k, &weights[0]);
        for b in 0..nb {
            let next = b + 1;
            if next < nb {
                let x = xq.add(next * QK);
                if next % 2 == 0 {
                    amx::product::<0>(x, k, &weights[next]);
                } else {
                    amx::product::<1>(x, k, &weights[next]);
                }
            }
            if b > 0 {
                add_block(
                    &mut sumf,
                    sums[(b - 1) % 2].assume_init_ref(),
                    (w0, w1, b - 1),
                    (xd, xs),
                );
            }
            if b % 2 == 0 {
                amx::store::<0>(&mut sums[0]);
            } else {
                amx::store::<1>(&mut sums[1]);
            }
        }
        add_block(
            &mut sumf,
            sums[(nb - 1) % 2].assume_init_ref(),
            (w0, w1, nb - 1),
            (xd, xs),
        );
        store16(sumf, out);
    }

    /// `sumf[c] += sumi * d_w * d_x + m_w * s_x` for each token `c` of an AMX tile's block `b`
    /// ([`pair_with`]'s float part, the same operations), from the block's stored sums.
    ///
    /// SAFETY: avx512f and f16c; `b < w0.nb`, `w1` shaped like `w0`, and `xd`, `xs` hold
    /// `[nb][TOKENS]` values.
    #[cfg(target_os = "linux")]
    #[inline(always)]
    unsafe fn add_block(
        sumf: &mut [__m512; amx::TOKENS],
        sums: &amx::SumTile,
        (w0, w1, b): (WGroup<'_>, WGroup<'_>, usize),
        (xd, xs): (*const f32, *const f32),
    ) {
        const T: usize = amx::TOKENS;
        let (b0, b1) = (w0.blocks.get_unchecked(b), w1.blocks.get_unchecked(b));
        let dw = widen16(b0.d.as_ptr(), b1.d.as_ptr());
        let mw = widen16(b0.m.as_ptr(), b1.m.as_ptr());
        for (c, sumf) in sumf.iter_mut().enumerate() {
            let sumi = _mm512_loadu_si512(sums.0[c].as_ptr() as *const _);
            let (dx, sx) = (*xd.add(b * T + c), *xs.add(b * T + c));
            *sumf = add_scaled(*sumf, sumi, (dw, mw), (dx, sx));
        }
    }

    /// The tile of block `b`'s unsigned nibbles of groups `w0` and `w1`: row `c` (c < 4) holds
    /// chunk `c`'s low nibbles (weights 4c..4c + 4 of each of the 16 rows, `w0`'s first), row
    /// 4 + c its high nibbles: the `vpdpbusd` operands of [`pair_with`].
    ///
    /// SAFETY: avx512f and avx512bw; `b < w0.nb`, `w1` shaped like `w0`.
    #[cfg(target_os = "linux")]
    #[inline(always)]
    unsafe fn unpack_pair(
        w0: WGroup<'_>,
        w1: WGroup<'_>,
        b: usize,
        dst: &mut [u8; amx::WEIGHT_TILE_BYTES],
    ) {
        let (q0, q1) = (
            w0.blocks.get_unchecked(b).q.as_ptr(),
            w1.blocks.get_unchecked(b).q.as_ptr(),
        );
        let d = dst.as_mut_ptr();
        for chunk in 0..4 {
            let (lo, hi) = nibbles16(q0, q1, chunk);
            _mm512_storeu_si512(d.add(chunk * 64) as *mut _, lo);
            _mm512_storeu_si512(d.add(256 + chunk * 64) as *mut _, hi);
        }
    }

    /// Chunk `chunk` of two groups' interleaved nibble bytes (`q0`'s eight rows in the low
    /// half, `q1`'s in the high), as its low nibbles and its high nibbles, one byte each:
    /// [`pair_with`]'s `vpdpbusd` operands and an AMX weight tile's rows.
    ///
    /// SAFETY: avx512f and avx512bw; 128 readable bytes at `q0` and at `q1`, `chunk < 4`.
    #[inline(always)]
    unsafe fn nibbles16(q0: *const u8, q1: *const u8, chunk: usize) -> (__m512i, __m512i) {
        let mask = _mm512_set1_epi8(0x0F);
        let v0 = _mm256_loadu_si256(q0.add(chunk * 32) as *const __m256i);
        let v1 = _mm256_loadu_si256(q1.add(chunk * 32) as *const __m256i);
        let v = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(v0), v1);
        (
            _mm512_and_si512(v, mask),
            _mm512_and_si512(_mm512_srli_epi16::<4>(v), mask),
        )
    }

    /// `sumf + (sumi * d_w * d_x + m_w * s_x)` for 16 row lanes of one block and token, in
    /// candle's order: the block's exact integer sums converted, scaled by the rows' `d_w`,
    /// then the token's `d_x`, plus `m_w * s_x` (one FMA: both are f16 values, so the product
    /// is exact in f32 and its fused rounding is the add's), then added to the running sum.
    ///
    /// SAFETY: avx512f.
    #[inline(always)]
    unsafe fn add_scaled(
        sumf: __m512,
        sumi: __m512i,
        (dw, mw): (__m512, __m512),
        (dx, sx): (f32, f32),
    ) -> __m512 {
        let scaled = _mm512_mul_ps(
            _mm512_mul_ps(_mm512_cvtepi32_ps(sumi), dw),
            _mm512_set1_ps(dx),
        );
        _mm512_add_ps(sumf, _mm512_fmadd_ps(mw, _mm512_set1_ps(sx), scaled))
    }

    /// Token `c`'s 16 row lanes `v[c]` into `out[c]` (its first `out[c].len()` of them).
    ///
    /// SAFETY: avx512f; every `out[c].len() <= 16`.
    #[inline(always)]
    unsafe fn store16<const C: usize>(v: [__m512; C], out: [&mut [f32]; C]) {
        for (v, o) in v.into_iter().zip(out) {
            if o.len() == 2 * ROWS {
                _mm512_storeu_ps(o.as_mut_ptr(), v);
            } else {
                let mut lanes = [0f32; 2 * ROWS];
                _mm512_storeu_ps(lanes.as_mut_ptr(), v);
                o.copy_from_slice(&lanes[..o.len()]);
            }
        }
    }

    /// Eight f16 scales of each of two groups, widened to 16 f32 lanes (group `a`'s low).
    ///
    /// SAFETY: avx512f; eight values readable at `a` and at `b`.
    #[inline(always)]
    unsafe fn widen16(a: *const half::f16, b: *const half::f16) -> __m512 {
        let lo = _mm_loadu_si128(a as *const __m128i);
        let hi = _mm_loadu_si128(b as *const __m128i);
        _mm512_cvtph_ps(_mm256_inserti128_si256::<1>(_mm256_castsi128_si256(lo), hi))
    }

    /// [`rows_1_with`] with AVX2.
    ///
    /// SAFETY: caller must ensure avx2, fma and f16c and that `x` fits `m`'s groups.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_rows_1(
        m: &Q4_1Matrix,
        groups: std::ops::Range<usize>,
        x: XRow<'_>,
        stream: bool,
        out: &mut [f32],
    ) {
        rows_1_with::<Maddubs>(m, groups, x, stream, out)
    }

    /// Two adjacent row groups (16 rows) against `C` tokens on 512-bit registers: group `w0`'s
    /// rows in the low eight lanes, `w1`'s in the high eight, each activation broadcast
    /// serving all 16; otherwise [`group_with`]'s operations lane for lane (same bits).
    /// `out[c]` gets token `c`'s values of the first `out[c].len()` of the 16 rows.
    ///
    /// SAFETY: caller must ensure avx2, fma, f16c, avx512f, avx512bw, avx512vl and
    /// avx512vnni, every `x.fits(&w0)`, `w1` shaped like `w0` and every
    /// `out[c].len() <= 2 * ROWS`.
    #[inline(always)]
    unsafe fn pair_with<const C: usize>(
        w0: WGroup<'_>,
        w1: WGroup<'_>,
        x: [XRow<'_>; C],
        stream: bool,
        out: [&mut [f32]; C],
    ) {
        let mut sumf = [_mm512_setzero_ps(); C];
        for b in 0..w0.nb {
            let (b0, b1) = (w0.blocks.get_unchecked(b), w1.blocks.get_unchecked(b));
            let (q0, q1) = (b0.q.as_ptr(), b1.q.as_ptr());
            if stream {
                prefetch_ahead(w0, b);
                prefetch_ahead(w1, b);
            }
            // One accumulator per token (low and high nibbles alike): with eight tokens that
            // is eight independent chains, and the registers it saves keep an eight-token pass
            // free of spills (with two per token it was slower, 3 of 3 alternating rounds).
            let mut acc = [_mm512_setzero_si512(); C];
            for chunk in 0..4 {
                let (lo, hi) = nibbles16(q0, q1, chunk);
                for c in 0..C {
                    let xp = x[c].q.as_ptr().add(b * QK + 4 * chunk);
                    let bcast =
                        |p: *const i8| _mm512_set1_epi32((p as *const i32).read_unaligned());
                    acc[c] = _mm512_dpbusd_epi32(acc[c], lo, bcast(xp));
                    acc[c] = _mm512_dpbusd_epi32(acc[c], hi, bcast(xp.add(16)));
                }
            }
            let dw = widen16(b0.d.as_ptr(), b1.d.as_ptr());
            let mw = widen16(b0.m.as_ptr(), b1.m.as_ptr());
            for c in 0..C {
                let (dx, sx) = (*x[c].d.get_unchecked(b), *x[c].s.get_unchecked(b));
                sumf[c] = add_scaled(sumf[c], acc[c], (dw, mw), (dx, sx));
            }
        }
        store16(sumf, out);
    }

    /// [`rows_1_with`] with AVX-512 VNNI.
    ///
    /// SAFETY: caller must ensure avx2, fma, f16c, avx512vl and avx512vnni and that `x`
    /// fits `m`'s groups.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    pub(super) unsafe fn dot_rows_1_vnni(
        m: &Q4_1Matrix,
        groups: std::ops::Range<usize>,
        x: XRow<'_>,
        stream: bool,
        out: &mut [f32],
    ) {
        rows_1_with::<Dpbusd>(m, groups, x, stream, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::Module;

    #[test]
    fn reused_activations_equal_fresh_ones() {
        let x: Vec<f32> = (0..64 * 96).map(|i| ((i as f32) * 0.37).cos()).collect();
        let mut reused = Q8_1Activations::default();
        // Larger, then smaller (stale values past the end must not matter), then a new width.
        for (t, k) in [(64, 96), (3, 96), (5, 64), (64, 96)] {
            reused.quantize_into(&x[..t * k], t, k);
            let fresh = Q8_1Activations::quantize(&x[..t * k], t, k);
            assert_eq!((reused.t, reused.k), (t, k));
            for ti in 0..t {
                let (a, b) = (reused.row(ti), fresh.row(ti));
                assert_eq!((a.q, a.d, a.s), (b.q, b.d, b.s), "[{t}, {k}] row {ti}");
            }
        }
    }

    #[test]
    fn simd_quantization_gives_the_scalar_bits() {
        if Isa::detect() == Isa::Scalar {
            return;
        }
        let mut x: Vec<f32> = (0..32 * 40)
            .map(|i| ((i as f32) * 0.618).sin() * 10f32.powi((i / 32) % 9 - 4))
            .collect();
        x[32..64].fill(0.0); // an all-zero block
        x[64..96].fill(-3.5); // every value at the block's max
        x[96] = 127.0 * 0.5; // halves after scaling
        x[128..160].fill(1e30); // a scale past f16's range
                                // Values so small that `1 / d` overflows to infinity: the products saturate (and zero
                                // times infinity is NaN, cast to 0).
        for (i, v) in x[160..192].iter_mut().enumerate() {
            *v = [1e-40, -1e-40, 0.0, 5e-41][i % 4];
        }
        // One block per row; runs of eight blocks with and without blocks left over (the small
        // block above goes through the one-block kernel at [1, 192]); a decode
        // token's rows.
        for (t, k) in [(40, 32), (4, 320), (3, 352), (1, 192), (1, 576), (1, 1280)] {
            let x = &x[..t * k];
            let (scalar, simd) = (
                Q8_1Activations::quantize_with(x, t, k, Isa::Scalar),
                Q8_1Activations::quantize(x, t, k),
            );
            assert_eq!(scalar.q, simd.q, "[{t}, {k}]");
            assert_eq!(scalar.d, simd.d, "[{t}, {k}]");
            assert_eq!(scalar.s, simd.s, "[{t}, {k}]");
        }
    }

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
        // Same integer block sums and the same float operations in the same order as
        // candle's `vec_dot`: equal bit for bit, not just close.
        assert_eq!(got, reference, "t={t} k={k} n={n}");

        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        for kernel in Kernel::all_available() {
            let mut each = vec![0f32; t * n];
            ours.matmul_with(&xs, t, &mut each, kernel);
            assert_eq!(each, reference, "{kernel:?} t={t} k={k} n={n}");
        }
        Ok(())
    }

    #[test]
    fn equals_candle_decode_576x1536() -> Result<()> {
        check(1, 576, 1536)
    }

    #[test]
    fn equals_candle_prefill_1536x576() -> Result<()> {
        // 15 tokens: a pass of eight (AVX-512 VNNI), one of four and three single tokens.
        check(15, 1536, 576)
    }

    #[test]
    fn equals_candle_in_whole_tiles_of_sixteen_tokens() -> Result<()> {
        // Four tiles of 16 tokens (AMX tile products where the CPU has them: from
        // `AMX_MIN_TOKENS`) and a tail of five; tasks of whole row pairs and a last odd group.
        check(AMX_MIN_TOKENS + 5, 1536, 200)?;
        // A pair of groups whose second holds four rows.
        check(AMX_MIN_TOKENS, 64, 12)
    }

    #[test]
    fn equals_candle_small_odd_rows() -> Result<()> {
        check(33, 64, 100)
    }

    #[test]
    fn equals_candle_when_a_two_group_pass_ends_mid_group() -> Result<()> {
        // 12 rows: one pass over two groups (AVX-512) whose second group has four rows.
        check(9, 64, 12)
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
        for kernel in Kernel::all_available() {
            let mut each = vec![0f32; t * n];
            ours.matmul_with(&xs, t, &mut each, kernel);
            assert_eq!(got, each, "{kernel:?} against the detected kernel");
        }
        Ok(())
    }

    #[test]
    fn a_token_gets_the_same_bits_alone_or_in_a_batch() -> Result<()> {
        // 21 blocks; 13 rows: a full row group and a cut one; 13 tokens: a pass of eight
        // (AVX-512 VNNI), one of four and a single token.
        let (t, k, n) = (13, 672, 13);
        let qt = QTensor::quantize(&random((n, k), 21), GgmlDType::Q4_1)?;
        let ours = Q4_1Matrix::from_qtensor(&qt)?;
        let xs = random((t, k), 22).flatten_all()?.to_vec1::<f32>()?;
        for kernel in Kernel::all_available() {
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
