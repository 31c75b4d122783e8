//! Llama-family decoder (Llama, SmolLM, TinyLlama, Mistral) over a flattened step batch.
//!
//! Every token of the step is one row of a `[T, hidden]` activation matrix, so each weight
//! matrix is streamed once per step for all sequences; rotary embeddings use per-token
//! positions, K/V go to the paged store through the slot mapping, and only the last row of
//! each sequence that needs logits goes through the LM head.

use candle_core::quantized::{gguf_file, QMatMul};
use candle_core::{Device, Module, Tensor};

use super::attention::{paged_attention, HeadLayout};
use super::kv_store::KvStore;
use super::{LlamaConfig, ModelError};
use crate::engine::batch::StepBatch;

/// Rotary embedding tables, `[max_pos, head_dim / 2]`.
#[derive(Debug)]
struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
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
            neox: cfg.rope_neox,
        }
    }

    /// Rotates every head of every row in place; `x` is `[T, heads * head_dim]`.
    fn apply(&self, x: &mut [f32], positions: &[u32], head_dim: usize) {
        let width = x.len() / positions.len().max(1);
        for (row, &pos) in x.chunks_mut(width).zip(positions) {
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
}

/// One decoder layer; weights named as in the GGUF checkpoint (`blk.N.*`).
#[derive(Debug)]
struct Block {
    attn_norm: Tensor,
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    wo: QMatMul,
    ffn_norm: Tensor,
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
}

/// Loads GGUF tensors by name.
struct GgufReader<'a, R> {
    ct: &'a gguf_file::Content,
    reader: &'a mut R,
    device: &'a Device,
}

impl<R: std::io::Read + std::io::Seek> GgufReader<'_, R> {
    fn qtensor(&mut self, name: &str) -> Result<candle_core::quantized::QTensor, ModelError> {
        Ok(self.ct.tensor(self.reader, name, self.device)?)
    }
    fn matmul(&mut self, name: &str) -> Result<QMatMul, ModelError> {
        Ok(QMatMul::from_qtensor(self.qtensor(name)?)?)
    }
    fn dense(&mut self, name: &str) -> Result<Tensor, ModelError> {
        Ok(self.qtensor(name)?.dequantize(self.device)?)
    }
}

impl Block {
    fn load<R: std::io::Read + std::io::Seek>(
        r: &mut GgufReader<'_, R>,
        i: usize,
    ) -> Result<Self, ModelError> {
        let p = format!("blk.{i}");
        Ok(Self {
            attn_norm: r.dense(&format!("{p}.attn_norm.weight"))?,
            wq: r.matmul(&format!("{p}.attn_q.weight"))?,
            wk: r.matmul(&format!("{p}.attn_k.weight"))?,
            wv: r.matmul(&format!("{p}.attn_v.weight"))?,
            wo: r.matmul(&format!("{p}.attn_output.weight"))?,
            ffn_norm: r.dense(&format!("{p}.ffn_norm.weight"))?,
            gate: r.matmul(&format!("{p}.ffn_gate.weight"))?,
            up: r.matmul(&format!("{p}.ffn_up.weight"))?,
            down: r.matmul(&format!("{p}.ffn_down.weight"))?,
        })
    }
}

/// A loaded Llama-family model. Layers are immutable; the KV store is passed to `forward`.
#[derive(Debug)]
pub struct Llama {
    cfg: LlamaConfig,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: QMatMul,
    rope: Rope,
    device: Device,
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
        let embed = embed_q.dequantize(device)?;
        let lm_head = match ct.tensor_infos.contains_key("output.weight") {
            true => r.matmul("output.weight")?,
            // Tied embeddings (SmolLM): the LM head reuses the quantized embedding matrix.
            false => QMatMul::from_qtensor(embed_q)?,
        };
        let blocks = (0..cfg.num_layers)
            .map(|i| Block::load(&mut r, i))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            norm: r.dense("output_norm.weight")?,
            rope: Rope::new(&cfg),
            embed,
            blocks,
            lm_head,
            device: device.clone(),
            cfg,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Runs one step. Returns `[rows, vocab]` f32 logits, one row per sequence of the batch
    /// with `needs_logits`, in batch order.
    pub fn forward(&self, batch: &StepBatch, kv: &mut KvStore) -> Result<Tensor, ModelError> {
        let ids = Tensor::new(batch.token_ids.as_slice(), &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        for (layer, block) in self.blocks.iter().enumerate() {
            x = self.block_forward(block, layer, &x, batch, kv)?;
        }
        let rows: Vec<u32> = batch
            .seqs
            .iter()
            .filter(|s| s.needs_logits)
            .map(|s| s.query_start + s.query_len - 1)
            .collect();
        let rows = Tensor::new(rows.as_slice(), &self.device)?;
        let x = x.index_select(&rows, 0)?;
        let x = candle_nn::ops::rms_norm(&x, &self.norm, self.cfg.rms_norm_eps as f32)?;
        Ok(self.lm_head.forward(&x)?)
    }

    fn block_forward(
        &self,
        b: &Block,
        layer: usize,
        x: &Tensor,
        batch: &StepBatch,
        kv: &mut KvStore,
    ) -> Result<Tensor, ModelError> {
        let eps = self.cfg.rms_norm_eps as f32;
        let t = batch.num_tokens();
        let h = candle_nn::ops::rms_norm(x, &b.attn_norm, eps)?;
        let mut q = b.wq.forward(&h)?.flatten_all()?.to_vec1::<f32>()?;
        let mut k = b.wk.forward(&h)?.flatten_all()?.to_vec1::<f32>()?;
        let v = b.wv.forward(&h)?.flatten_all()?.to_vec1::<f32>()?;
        let hd = self.cfg.head_dim;
        self.rope.apply(&mut q, &batch.positions, hd);
        self.rope.apply(&mut k, &batch.positions, hd);
        let kvd = self.cfg.kv_dim();
        for (i, &slot) in batch.slot_mapping.iter().enumerate() {
            let span = i * kvd..(i + 1) * kvd;
            kv.write(layer, slot as usize, &k[span.clone()], &v[span]);
        }
        let heads = HeadLayout {
            num_heads: self.cfg.num_heads,
            num_kv_heads: self.cfg.num_kv_heads,
            head_dim: hd,
        };
        let attn = paged_attention(&q, batch, kv, layer, heads);
        let attn = Tensor::from_vec(attn, (t, self.cfg.hidden_size), &self.device)?;
        let x = (x + b.wo.forward(&attn)?)?;
        let h = candle_nn::ops::rms_norm(&x, &b.ffn_norm, eps)?;
        let ff = (candle_nn::ops::silu(&b.gate.forward(&h)?)? * b.up.forward(&h)?)?;
        Ok((x + b.down.forward(&ff)?)?)
    }
}
