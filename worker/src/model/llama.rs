//! Llama-family decoder (Llama, SmolLM, TinyLlama, Mistral) over a flattened step batch.
//!
//! Every token of the step is one row of a `[T, hidden]` activation matrix, so each weight
//! matrix is streamed once per step for all sequences; rotary embeddings use per-token
//! positions, K/V go to the paged store through the slot mapping, and only the last row of
//! each sequence that needs logits goes through the LM head.
//!
//! Two execution paths share the weights: on the CPU the layers run on plain `f32` slices with
//! Orchard's kernels (quantized matmuls, paged attention, fused SwiGLU); on any other candle
//! device they run as candle ops with the generic attention path.

use std::sync::{Arc, Mutex};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::attention::{attention_candle, paged_attention_into, HeadLayout};
use super::kv_store::KvStore;
use super::linear::Linear;
use super::{LlamaConfig, ModelError};
use crate::engine::batch::{SeqSlice, StepBatch};
use crate::kernels::q4_1::Q4_1Matrix;
use crate::kernels::q8_0::Q8_0Matrix;
use crate::kernels::{buffer_prefix, par_row_runs, row_run_len, team, vec, Isa};

/// Rotary embedding tables, `[max_pos, head_dim / 2]`, computed like candle's
/// `quantized_llama` (f32 `pos * inv_freq`, then `cos` / `sin`).
#[derive(Debug)]
struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
    max_pos: usize,
    neox: bool,
}

impl Rope {
    fn new(cfg: &LlamaConfig) -> Self {
        let half = cfg.head_dim / 2;
        let inv: Vec<f32> = (0..cfg.head_dim)
            .step_by(2)
            .map(|i| 1f32 / cfg.rope_theta.powf(i as f32 / cfg.head_dim as f32))
            .collect();
        let n = cfg.max_position_embeddings * half;
        let (mut cos, mut sin) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for pos in 0..cfg.max_position_embeddings {
            for f in &inv {
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Self {
            cos,
            sin,
            half,
            max_pos: cfg.max_position_embeddings,
            neox: cfg.rope_neox,
        }
    }

    /// Every head of one row at position `pos`, in place.
    fn rotate_row(&self, row: &mut [f32], pos: u32, head_dim: usize) {
        let at = pos as usize * self.half;
        let (cos, sin) = (&self.cos[at..at + self.half], &self.sin[at..at + self.half]);
        for head in row.chunks_mut(head_dim) {
            for i in 0..self.half {
                let (a, b) = if self.neox {
                    (i, i + self.half)
                } else {
                    (2 * i, 2 * i + 1)
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos[i] - x1 * sin[i];
                head[b] = x0 * sin[i] + x1 * cos[i];
            }
        }
    }
}

/// An RMSNorm weight, kept both as a device tensor and as CPU floats.
#[derive(Debug)]
pub(crate) struct Norm {
    weight: Tensor,
    cpu: Vec<f32>,
}

impl Norm {
    pub(crate) fn new(weight: Tensor) -> Result<Self, ModelError> {
        let cpu = weight
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let weight = weight.to_dtype(candle_core::DType::F32)?;
        Ok(Self { weight, cpu })
    }

    fn forward(&self, x: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
        candle_nn::ops::rms_norm(x, &self.weight, eps)
    }

    fn forward_cpu(&self, x: &[f32], eps: f32) -> Vec<f32> {
        let mut out = vec![0f32; x.len()];
        self.forward_cpu_into(x, eps, &mut out);
        out
    }

    /// RMSNorm of the rows of `x` into `out` (same length; every element written).
    fn forward_cpu_into(&self, x: &[f32], eps: f32, out: &mut [f32]) {
        let n = self.cpu.len();
        par_row_runs(out, n, |first, run| {
            vec::rms_norm(&x[first * n..][..run.len()], &self.cpu, eps, run);
        });
    }
}

/// The token embedding table.
#[derive(Debug)]
pub(crate) enum Embedding {
    /// `[vocab, hidden]` f32 on the model's device.
    Dense(Tensor),
    /// Q8_0 rows on the CPU, dequantized per token (the values candle's dequantization gives).
    /// With tied embeddings (the default model) this is the LM head's own matrix, so the
    /// table costs no memory of its own: a dense f32 copy of the default model's would be
    /// 113 MB, more than all its other weights together.
    Q8_0(Arc<Q8_0Matrix>),
}

impl Embedding {
    /// The table for `qtensor` (`[vocab, hidden]`, any GGUF type): Q8_0 stays quantized on
    /// the CPU, anything else is dequantized onto `device`.
    fn from_qtensor(qtensor: QTensor, device: &Device) -> Result<Self, ModelError> {
        Ok(match qtensor.dtype() {
            GgmlDType::Q8_0 if device.is_cpu() => {
                Embedding::Q8_0(Arc::new(Q8_0Matrix::from_qtensor(&qtensor)?))
            }
            _ => Embedding::Dense(qtensor.dequantize(device)?),
        })
    }

    /// The rows of `ids` into `out` (`ids.len() * hidden` values), on the CPU.
    fn rows_cpu(&self, ids: &[u32], out: &mut [f32]) -> Result<(), ModelError> {
        match self {
            Embedding::Dense(table) => {
                let ids = Tensor::new(ids, table.device())?;
                let rows = table
                    .index_select(&ids, 0)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                if rows.len() != out.len() {
                    return Err(ModelError::Unsupported(format!(
                        "embedding: {} values for {} tokens, expected {}",
                        rows.len(),
                        ids.dim(0)?,
                        out.len()
                    )));
                }
                out.copy_from_slice(&rows);
            }
            Embedding::Q8_0(m) => {
                for (&id, row) in ids.iter().zip(out.chunks_exact_mut(m.k())) {
                    m.dequantize_row(id as usize, row)?;
                }
            }
        }
        Ok(())
    }

    /// The rows of `ids` as a `[T, hidden]` tensor on `device`.
    fn rows(&self, ids: &[u32], hidden: usize, device: &Device) -> Result<Tensor, ModelError> {
        match self {
            Embedding::Dense(table) => Ok(table.index_select(&Tensor::new(ids, device)?, 0)?),
            Embedding::Q8_0(_) => {
                let mut out = vec![0f32; ids.len() * hidden];
                self.rows_cpu(ids, &mut out)?;
                Ok(Tensor::from_vec(out, (ids.len(), hidden), device)?)
            }
        }
    }
}

/// One decoder layer. q/k/v are stacked into one matrix, as are gate/up.
#[derive(Debug)]
pub(crate) struct Block {
    pub(crate) attn_norm: Norm,
    pub(crate) qkv: Linear,
    pub(crate) wo: Linear,
    pub(crate) ffn_norm: Norm,
    pub(crate) gate_up: Linear,
    pub(crate) down: Linear,
}

/// Everything a loader supplies to build a [`Llama`].
pub(crate) struct LlamaParts {
    pub(crate) cfg: LlamaConfig,
    pub(crate) embed: Embedding,
    pub(crate) blocks: Vec<Block>,
    pub(crate) norm: Norm,
    pub(crate) lm_head: Linear,
    pub(crate) device: Device,
}

/// A loaded Llama-family model. Layers are immutable; the KV store is passed to `forward`.
#[derive(Debug)]
pub struct Llama {
    cfg: LlamaConfig,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: Norm,
    lm_head: Linear,
    rope: Rope,
    device: Device,
    /// The CPU path's activation buffers, reused by every layer of every step.
    scratch: Mutex<Scratch>,
}

/// Activation buffers of the CPU path, kept at the largest step seen so far and reused by
/// every layer and step: a step allocates and zeroes nothing per layer (each kernel writes
/// every element of its output). One set per model; the engine runs one step at a time.
#[derive(Debug, Default)]
struct Scratch {
    /// Normalized rows (the input of qkv, then of gate/up).
    h: Vec<f32>,
    qkv: Vec<f32>,
    /// Rotated queries and keys, split out of `qkv`.
    q: Vec<f32>,
    k: Vec<f32>,
    attn: Vec<f32>,
    /// Output projection, then the down projection (each added to the residual stream).
    o: Vec<f32>,
    gate_up: Vec<f32>,
    act: Vec<f32>,
}

/// `x += y` for `[rows, width]` rows, on the compute team for a multi-token step.
fn add_rows(x: &mut [f32], y: &[f32], width: usize) {
    par_row_runs(x, width, |first, run| {
        let y = &y[first * width..][..run.len()];
        run.iter_mut().zip(y).for_each(|(x, y)| *x += y);
    });
}

/// Loads GGUF tensors by name onto the CPU (kernels repack them; other devices get a copy).
struct GgufReader<'a, R> {
    ct: &'a gguf_file::Content,
    reader: &'a mut R,
    device: &'a Device,
}

impl<R: std::io::Read + std::io::Seek> GgufReader<'_, R> {
    fn qtensor(&mut self, name: &str) -> Result<candle_core::quantized::QTensor, ModelError> {
        Ok(self.ct.tensor(self.reader, name, &Device::Cpu)?)
    }
    fn linear(&mut self, names: &[String]) -> Result<Linear, ModelError> {
        let parts = names
            .iter()
            .map(|n| self.qtensor(n))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Linear::from_qtensors(parts, self.device)?)
    }
    fn norm(&mut self, name: &str) -> Result<Norm, ModelError> {
        Norm::new(self.qtensor(name)?.dequantize(self.device)?)
    }

    fn block(&mut self, i: usize) -> Result<Block, ModelError> {
        let n = |s: &str| format!("blk.{i}.{s}.weight");
        Ok(Block {
            attn_norm: self.norm(&n("attn_norm"))?,
            qkv: self.linear(&[n("attn_q"), n("attn_k"), n("attn_v")])?,
            wo: self.linear(&[n("attn_output")])?,
            ffn_norm: self.norm(&n("ffn_norm"))?,
            gate_up: self.linear(&[n("ffn_gate"), n("ffn_up")])?,
            down: self.linear(&[n("ffn_down")])?,
        })
    }
}

impl Llama {
    /// Loads the weights of a GGUF file already parsed into `ct`.
    pub fn from_gguf<R: std::io::Read + std::io::Seek>(
        ct: &gguf_file::Content,
        reader: &mut R,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let cfg = LlamaConfig::from_gguf(ct)?;
        let mut r = GgufReader { ct, reader, device };
        let embed_q = r.qtensor("token_embd.weight")?;
        let (embed, lm_head) = match ct.tensor_infos.contains_key("output.weight") {
            true => (
                Embedding::from_qtensor(embed_q, device)?,
                r.linear(&["output.weight".to_string()])?,
            ),
            // Tied embeddings (SmolLM): the LM head reuses the quantized embedding matrix, and
            // in Q8_0 on the CPU the embedding reads the head's repacked rows.
            false => match Linear::from_qtensors(vec![embed_q], device)? {
                Linear::Q8_0(head) => (Embedding::Q8_0(head.clone()), Linear::Q8_0(head)),
                head => {
                    let table = r.qtensor("token_embd.weight")?.dequantize(device)?;
                    (Embedding::Dense(table), head)
                }
            },
        };
        let blocks = (0..cfg.num_layers)
            .map(|i| r.block(i))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::from_parts(LlamaParts {
            norm: r.norm("output_norm.weight")?,
            embed,
            blocks,
            lm_head,
            device: device.clone(),
            cfg,
        }))
    }

    /// Assembles a model from loaded weights.
    pub(crate) fn from_parts(mut p: LlamaParts) -> Self {
        pack_weights(&mut p.blocks, &mut p.lm_head);
        Self {
            rope: Rope::new(&p.cfg),
            cfg: p.cfg,
            embed: p.embed,
            blocks: p.blocks,
            norm: p.norm,
            lm_head: p.lm_head,
            device: p.device,
            scratch: Mutex::new(Scratch::default()),
        }
    }

    /// Shapes and constants of the loaded model (for sizing the KV store).
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Runs one step. Returns `[rows, vocab]` f32 logits, one row per sequence of the batch
    /// with `needs_logits`, in batch order.
    pub fn forward(&self, batch: &StepBatch, kv: &mut KvStore) -> Result<Tensor, ModelError> {
        self.check_batch(batch, kv)?;
        if batch.num_tokens() == 0 {
            let shape = (0, self.cfg.vocab_size);
            return Ok(Tensor::zeros(shape, candle_core::DType::F32, &self.device)?);
        }
        match self.device {
            Device::Cpu => self.forward_cpu(batch, kv),
            _ => self.forward_generic(batch, kv),
        }
    }

    /// Rejects a batch the kernels would index out of bounds with: a scheduler bug or a bad
    /// token id must come back as an error, not a panic on the engine thread.
    fn check_batch(&self, b: &StepBatch, kv: &KvStore) -> Result<(), ModelError> {
        let bad = |why: String| Err(ModelError::Unsupported(format!("step batch: {why}")));
        let t = b.num_tokens();
        let store = kv.config();
        let slots = store.num_blocks * store.block_size;
        if store.num_layers < self.cfg.num_layers || store.kv_dim != self.cfg.kv_dim() {
            return bad(format!("KV store shape {store:?} does not fit the model"));
        }
        if b.positions.len() != t || b.slot_mapping.len() != t {
            return bad("positions / slot mapping length differs from token count".into());
        }
        if let Some(id) = b
            .token_ids
            .iter()
            .find(|&&i| i as usize >= self.cfg.vocab_size)
        {
            return bad(format!("token id {id} >= vocab {}", self.cfg.vocab_size));
        }
        if let Some(p) = b
            .positions
            .iter()
            .find(|&&p| p as usize >= self.rope.max_pos)
        {
            return bad(format!("position {p} >= {}", self.rope.max_pos));
        }
        if let Some(s) = b.slot_mapping.iter().find(|&&s| s as usize >= slots) {
            return bad(format!("slot {s} >= {slots} slots in the KV store"));
        }
        for s in &b.seqs {
            if (s.query_start + s.query_len) as usize > t {
                return bad("sequence slice past the end of the batch".into());
            }
            if s.block_table
                .iter()
                .any(|&id| id as usize >= store.num_blocks)
            {
                return bad(format!("block id >= {} blocks", store.num_blocks));
            }
        }
        Ok(())
    }

    /// Rows of the step whose logits are wanted: the last token of each such sequence.
    fn logit_rows(batch: &StepBatch) -> Vec<u32> {
        batch
            .seqs
            .iter()
            .filter(|s| s.needs_logits && s.query_len > 0)
            .map(|s| s.query_start + s.query_len - 1)
            .collect()
    }

    fn heads(&self) -> HeadLayout {
        HeadLayout {
            num_heads: self.cfg.num_heads,
            num_kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
        }
    }

    /// Splits stacked `[t, q | k | v]` rows into rotated q, rotated k, and v, and writes k and
    /// v into the store.
    fn qkv_to_cache(&self, qkv: &[f32], ctx: LayerCtx<'_, '_>) -> Vec<f32> {
        let (mut q, mut k) = (Vec::new(), Vec::new());
        self.qkv_to_cache_into(qkv, ctx, &mut q, &mut k);
        q
    }

    /// [`Self::qkv_to_cache`] with the rotated queries left in `q` (and the rotated keys in
    /// `k`), both buffers reused.
    fn qkv_to_cache_into(
        &self,
        qkv: &[f32],
        ctx: LayerCtx<'_, '_>,
        q: &mut Vec<f32>,
        k: &mut Vec<f32>,
    ) {
        let (h, kvd, hd) = (self.cfg.hidden_size, self.cfg.kv_dim(), self.cfg.head_dim);
        let width = h + 2 * kvd;
        let t = qkv.len() / width;
        // Every value is written below; the buffers only grow, so no clearing either.
        q.resize(t * h, 0.0);
        k.resize(t * kvd, 0.0);
        // Each run of rows copies its queries and keys out of `qkv` and rotates them while
        // they are in cache, on the compute team: one section, no serial copy.
        let per_run = row_run_len(t);
        let mut runs: Vec<_> = q
            .chunks_mut(per_run * h)
            .zip(k.chunks_mut(per_run * kvd))
            .collect();
        let positions = &ctx.batch.positions;
        team::for_each_mut(&mut runs, |r, (q, k)| {
            let first = r * per_run;
            let rows = qkv[first * width..].chunks_exact(width);
            let out = q.chunks_exact_mut(h).zip(k.chunks_exact_mut(kvd));
            for ((row, (q, k)), &pos) in rows.zip(out).zip(&positions[first..]) {
                q.copy_from_slice(&row[..h]);
                k.copy_from_slice(&row[h..h + kvd]);
                self.rope.rotate_row(q, pos, hd);
                self.rope.rotate_row(k, pos, hd);
            }
        });
        for (i, (&slot, row)) in ctx
            .batch
            .slot_mapping
            .iter()
            .zip(qkv.chunks_exact(width))
            .enumerate()
        {
            let v = &row[h + kvd..];
            ctx.kv
                .write(ctx.layer, slot as usize, &k[i * kvd..(i + 1) * kvd], v);
        }
    }
}

/// What one layer of one step works on.
struct LayerCtx<'a, 'k> {
    batch: &'a StepBatch,
    kv: &'k mut KvStore,
    layer: usize,
}

/// CPU path: plain `f32` rows and Orchard's kernels.
impl Llama {
    fn forward_cpu(&self, batch: &StepBatch, kv: &mut KvStore) -> Result<Tensor, ModelError> {
        let hsz = self.cfg.hidden_size;
        let rows = Self::logit_rows(batch);
        let mut x = vec![0f32; batch.num_tokens() * hsz];
        self.embed.rows_cpu(&batch.token_ids, &mut x)?;
        // Buffers are only reused, never read before being written: a poisoned lock (a panic
        // in an earlier step) leaves nothing to distrust.
        let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let last = self.blocks.len().saturating_sub(1);
        // Past the last layer's K/V only the logit rows are read, so when the step has other
        // rows (a prompt's), the last layer computes its attention and MLP for those rows
        // alone (llama.cpp's "skip unused outputs"). Each row's arithmetic does not depend
        // on which other rows the step holds, so the logits are the same bits.
        let compact = rows.len() < batch.num_tokens();
        for (layer, block) in self.blocks.iter().enumerate() {
            let ctx = LayerCtx {
                batch,
                kv: &mut *kv,
                layer,
            };
            let keep = (compact && layer == last).then_some(rows.as_slice());
            self.block_cpu(block, ctx, &mut x, &mut scratch, keep)?;
        }
        drop(scratch);
        let last = if compact && !self.blocks.is_empty() {
            x
        } else {
            gather_rows(&x, &rows, hsz)
        };
        let h = self.norm.forward_cpu(&last, self.cfg.rms_norm_eps as f32);
        let logits = self.lm_head.forward_cpu(&h, rows.len())?;
        Ok(Tensor::from_vec(
            logits,
            (rows.len(), self.cfg.vocab_size),
            &self.device,
        )?)
    }

    /// One layer over the step's rows `x`. Every row's K and V go into the store; with
    /// `keep` (row indices), the attention and MLP then run for those rows alone
    /// and `x` is left holding just them, in that order.
    fn block_cpu(
        &self,
        b: &Block,
        ctx: LayerCtx<'_, '_>,
        x: &mut Vec<f32>,
        s: &mut Scratch,
        keep: Option<&[u32]>,
    ) -> Result<(), ModelError> {
        let eps = self.cfg.rms_norm_eps as f32;
        let t = ctx.batch.num_tokens();
        let LayerCtx { batch, kv, layer } = ctx;
        let h = buffer_prefix(&mut s.h, x.len());
        b.attn_norm.forward_cpu_into(x, eps, h);
        let qkv = buffer_prefix(&mut s.qkv, t * b.qkv.n_out());
        b.qkv.forward_cpu_into(h, t, qkv)?;
        let ctx = LayerCtx {
            batch,
            kv: &mut *kv,
            layer,
        };
        self.qkv_to_cache_into(qkv, ctx, &mut s.q, &mut s.k);
        match keep {
            None => {
                // Lent out of the scratch for the rest of the layer, then put back.
                let q = std::mem::take(&mut s.q);
                let done = self.attention_and_mlp(b, batch, kv, layer, &q, x, s);
                s.q = q;
                done
            }
            Some(rows) => {
                let width = self.cfg.num_heads * self.cfg.head_dim;
                let q = gather_rows(&s.q, rows, width);
                *x = gather_rows(x, rows, self.cfg.hidden_size);
                let kept = rows_batch(batch, rows);
                self.attention_and_mlp(b, &kept, kv, layer, &q, x, s)
            }
        }
    }

    /// The rest of a layer for the rows of `batch` (`x` and the rotated queries `q`, their
    /// K and V already in the store): attention, output projection, MLP, both residuals.
    #[allow(clippy::too_many_arguments)]
    fn attention_and_mlp(
        &self,
        b: &Block,
        batch: &StepBatch,
        kv: &KvStore,
        layer: usize,
        q: &[f32],
        x: &mut [f32],
        s: &mut Scratch,
    ) -> Result<(), ModelError> {
        let eps = self.cfg.rms_norm_eps as f32;
        let (hsz, ff) = (self.cfg.hidden_size, self.cfg.intermediate_size);
        let t = batch.num_tokens();
        let Scratch {
            h,
            attn,
            o,
            gate_up,
            act,
            ..
        } = s;
        let attn = buffer_prefix(attn, q.len());
        paged_attention_into(q, batch, kv, layer, self.heads(), attn);
        let proj = buffer_prefix(o, t * b.wo.n_out());
        b.wo.forward_cpu_into(attn, t, proj)?;
        add_rows(x, proj, hsz);
        let h = buffer_prefix(h, x.len());
        b.ffn_norm.forward_cpu_into(x, eps, h);
        let gu = buffer_prefix(gate_up, t * b.gate_up.n_out());
        b.gate_up.forward_cpu_into(h, t, gu)?;
        let act = buffer_prefix(act, t * ff);
        let isa = Isa::detect();
        par_row_runs(act, ff, |first, run| {
            let rows = gu[first * 2 * ff..].chunks_exact(2 * ff);
            for (row, out) in rows.zip(run.chunks_exact_mut(ff)) {
                vec::swiglu(isa, &row[..ff], &row[ff..], out);
            }
        });
        let d = buffer_prefix(o, t * b.down.n_out());
        b.down.forward_cpu_into(act, t, d)?;
        add_rows(x, d, hsz);
        Ok(())
    }
}

/// Rows `rows` of the `width`-wide rows of `x`, in that order.
fn gather_rows(x: &[f32], rows: &[u32], width: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * width);
    for &r in rows {
        out.extend_from_slice(&x[r as usize * width..(r as usize + 1) * width]);
    }
    out
}

/// A step of only the last token of each sequence that wants logits (rows `rows` of
/// `batch`, from [`Llama::logit_rows`]): each a query of one token at its own position, over
/// the same block table.
fn rows_batch(batch: &StepBatch, rows: &[u32]) -> StepBatch {
    let seqs = batch
        .seqs
        .iter()
        .filter(|s| s.needs_logits && s.query_len > 0);
    let mut kept = StepBatch::default();
    for (i, (seq, &r)) in seqs.zip(rows).enumerate() {
        let r = r as usize;
        kept.token_ids.push(batch.token_ids[r]);
        kept.positions.push(batch.positions[r]);
        kept.slot_mapping.push(batch.slot_mapping[r]);
        kept.seqs.push(SeqSlice {
            query_start: i as u32,
            query_len: 1,
            context_len: seq.context_len,
            block_table: seq.block_table.clone(),
            needs_logits: true,
        });
    }
    kept
}

/// Moves the CPU kernels' weights of every layer, then of the LM head, into one buffer per
/// kind, in the order a step reads them, so that all of them get huge pages
/// (`kernels::weights`). A head shared with the token embedding stays where it is (it is one
/// large buffer already).
fn pack_weights(blocks: &mut [Block], lm_head: &mut Linear) {
    let (mut q4_1, mut q8_0) = (Vec::new(), Vec::new());
    let linears = blocks
        .iter_mut()
        .flat_map(|b| [&mut b.qkv, &mut b.wo, &mut b.gate_up, &mut b.down])
        .chain([lm_head]);
    for linear in linears {
        match linear {
            Linear::Q4_1(m) => q4_1.push(m),
            Linear::Q8_0(m) => q8_0.extend(Arc::get_mut(m)),
            Linear::Candle(_) => {}
        }
    }
    Q4_1Matrix::pack(&mut q4_1);
    Q8_0Matrix::pack(&mut q8_0);
}

/// Generic path: candle ops on the model's device; K/V still live in the (CPU) paged store.
impl Llama {
    fn forward_generic(&self, batch: &StepBatch, kv: &mut KvStore) -> Result<Tensor, ModelError> {
        let mut x = self
            .embed
            .rows(&batch.token_ids, self.cfg.hidden_size, &self.device)?;
        for (layer, block) in self.blocks.iter().enumerate() {
            let ctx = LayerCtx {
                batch,
                kv: &mut *kv,
                layer,
            };
            x = self.block_generic(block, ctx, &x)?;
        }
        let rows = Tensor::new(Self::logit_rows(batch).as_slice(), &self.device)?;
        let x = x.index_select(&rows, 0)?;
        let x = self.norm.forward(&x, self.cfg.rms_norm_eps as f32)?;
        Ok(self.lm_head.forward(&x)?)
    }

    fn block_generic(
        &self,
        b: &Block,
        ctx: LayerCtx<'_, '_>,
        x: &Tensor,
    ) -> Result<Tensor, ModelError> {
        let eps = self.cfg.rms_norm_eps as f32;
        let (batch, layer) = (ctx.batch, ctx.layer);
        let (t, hsz) = (batch.num_tokens(), self.cfg.hidden_size);
        let h = b.attn_norm.forward(x, eps)?;
        let qkv = b.qkv.forward(&h)?.flatten_all()?.to_vec1::<f32>()?;
        let q = self.qkv_to_cache(
            &qkv,
            LayerCtx {
                batch,
                kv: &mut *ctx.kv,
                layer,
            },
        );
        let q = Tensor::from_vec(q, (t, hsz), &self.device)?;
        let attn = attention_candle(&q, batch, &*ctx.kv, layer, self.heads())?;
        let x = (x + b.wo.forward(&attn)?)?;
        let h = b.ffn_norm.forward(&x, eps)?;
        let gu = b.gate_up.forward(&h)?;
        let ff = self.cfg.intermediate_size;
        let act = (candle_nn::ops::silu(&gu.narrow(1, 0, ff)?)? * gu.narrow(1, ff, ff)?)?;
        Ok((x + b.down.forward(&act)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(neox: bool) -> LlamaConfig {
        LlamaConfig {
            hidden_size: 128,
            intermediate_size: 256,
            num_layers: 1,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 64,
            vocab_size: 16,
            rope_theta: 100_000.0,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 64,
            rope_neox: neox,
        }
    }

    /// Our rotary tables and rotation equal candle's (`rope_i` for GGUF Llama, `rope` for
    /// half-split checkpoints) bit for bit, at several positions.
    #[test]
    fn rope_equals_candles_rotary_embedding() -> candle_core::Result<()> {
        for neox in [false, true] {
            let cfg = config(neox);
            let rope = Rope::new(&cfg);
            let (heads, d, positions) = (2usize, 64usize, [0u32, 1, 7, 63]);
            let n = positions.len() * heads * d;
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                .collect();
            let mut ours = x.clone();
            for (row, &pos) in ours.chunks_mut(heads * d).zip(&positions) {
                rope.rotate_row(row, pos, d);
            }
            let dev = Device::Cpu;
            // candle wants [batch, heads, seq, d] and [seq, d/2] tables.
            let xs = Tensor::from_vec(x, (positions.len(), heads, d), &dev)?
                .transpose(0, 1)?
                .contiguous()?
                .unsqueeze(0)?;
            let idx = Tensor::new(&positions, &dev)?;
            let half = d / 2;
            let cos =
                Tensor::from_vec(rope.cos.clone(), (cfg.max_position_embeddings, half), &dev)?
                    .index_select(&idx, 0)?;
            let sin =
                Tensor::from_vec(rope.sin.clone(), (cfg.max_position_embeddings, half), &dev)?
                    .index_select(&idx, 0)?;
            let theirs = match neox {
                false => candle_nn::rotary_emb::rope_i(&xs, &cos, &sin)?,
                true => candle_nn::rotary_emb::rope(&xs, &cos, &sin)?,
            };
            let theirs = theirs
                .squeeze(0)?
                .transpose(0, 1)?
                .contiguous()?
                .flatten_all()?
                .to_vec1::<f32>()?;
            assert_eq!(ours, theirs, "neox = {neox}");
        }
        Ok(())
    }

    /// The tables equal the ones candle-transformers' `quantized_llama` builds
    /// (`pos * inv_freq` as a `[max_pos, 1] x [1, d/2]` matmul, then `cos` / `sin`).
    #[test]
    fn rope_tables_equal_candles() -> candle_core::Result<()> {
        let cfg = config(false);
        let rope = Rope::new(&cfg);
        let dev = Device::Cpu;
        let d = cfg.head_dim;
        let theta: Vec<f32> = (0..d)
            .step_by(2)
            .map(|i| 1f32 / cfg.rope_theta.powf(i as f32 / d as f32))
            .collect();
        let theta = Tensor::new(theta.as_slice(), &dev)?.reshape((1, d / 2))?;
        let max = cfg.max_position_embeddings;
        let idx_theta = Tensor::arange(0, max as u32, &dev)?
            .to_dtype(candle_core::DType::F32)?
            .reshape((max, 1))?
            .matmul(&theta)?;
        assert_eq!(rope.cos, idx_theta.cos()?.flatten_all()?.to_vec1::<f32>()?);
        assert_eq!(rope.sin, idx_theta.sin()?.flatten_all()?.to_vec1::<f32>()?);
        Ok(())
    }

    /// A Q8_0 table read row by row gives the rows of candle's dequantized table, bit for bit,
    /// through both the CPU path and the tensor path; an id past the table is an error.
    #[test]
    fn q8_0_embedding_rows_equal_the_dequantized_table() -> Result<(), ModelError> {
        let (vocab, hidden) = (11, 64);
        let values: Vec<f32> = (0..vocab * hidden)
            .map(|i| (i as f32 * 0.37).sin())
            .collect();
        let table = Tensor::from_vec(values, (vocab, hidden), &Device::Cpu)?;
        let qt = QTensor::quantize(&table, GgmlDType::Q8_0)?;
        let dense = qt.dequantize(&Device::Cpu)?;
        let embed = Embedding::from_qtensor(qt, &Device::Cpu)?;
        assert!(matches!(embed, Embedding::Q8_0(_)));
        let ids = [3u32, 0, 10, 3];
        let expected = dense.index_select(&Tensor::new(&ids[..], &Device::Cpu)?, 0)?;
        let mut rows = vec![0f32; ids.len() * hidden];
        embed.rows_cpu(&ids, &mut rows)?;
        assert_eq!(rows, expected.flatten_all()?.to_vec1::<f32>()?);
        let tensor = embed.rows(&ids, hidden, &Device::Cpu)?;
        assert_eq!(tensor.to_vec2::<f32>()?, expected.to_vec2::<f32>()?);
        assert!(embed.rows_cpu(&[11], &mut rows[..hidden]).is_err());
        Ok(())
    }
}
