//! A tiny random-weight Llama for the model tests: Hugging Face weights, written as a
//! safetensors directory or as GGUF, and greedy generation through `Llama::forward`; and the
//! one-sequence step batch that the model tests (this one's and the reference test's) feed.

#![allow(dead_code)] // each test binary uses a different subset of these helpers

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use orchard_worker::engine::batch::{SeqSlice, StepBatch};
use orchard_worker::model::{KvStore, KvStoreConfig, Llama};

pub const HIDDEN: usize = 64;
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 2;
pub const HEAD_DIM: usize = 16;
pub const FF: usize = 96;
pub const LAYERS: usize = 2;
pub const VOCAB: usize = 128;

/// Hugging Face weights by checkpoint name.
pub fn random_weights() -> Result<HashMap<String, Tensor>> {
    let dev = Device::Cpu;
    let mut w = HashMap::new();
    let mut put = |name: String, shape: &[usize], std: f64| -> Result<()> {
        let t = match shape.len() {
            1 => (Tensor::randn(0f32, std as f32, shape[0], &dev)? + 1.0)?,
            _ => Tensor::randn(0f32, std as f32, shape, &dev)?,
        };
        w.insert(name, t);
        Ok(())
    };
    put("model.embed_tokens.weight".into(), &[VOCAB, HIDDEN], 1.0)?;
    put("lm_head.weight".into(), &[VOCAB, HIDDEN], 0.2)?;
    put("model.norm.weight".into(), &[HIDDEN], 0.1)?;
    let kvd = KV_HEADS * HEAD_DIM;
    for i in 0..LAYERS {
        let p = |s: &str| format!("model.layers.{i}.{s}.weight");
        put(p("input_layernorm"), &[HIDDEN], 0.1)?;
        put(p("post_attention_layernorm"), &[HIDDEN], 0.1)?;
        put(p("self_attn.q_proj"), &[HIDDEN, HIDDEN], 0.3)?;
        put(p("self_attn.k_proj"), &[kvd, HIDDEN], 0.3)?;
        put(p("self_attn.v_proj"), &[kvd, HIDDEN], 0.2)?;
        put(p("self_attn.o_proj"), &[HIDDEN, HIDDEN], 0.2)?;
        put(p("mlp.gate_proj"), &[FF, HIDDEN], 0.2)?;
        put(p("mlp.up_proj"), &[FF, HIDDEN], 0.2)?;
        put(p("mlp.down_proj"), &[HIDDEN, FF], 0.2)?;
    }
    Ok(w)
}

/// `w` with every matrix rounded through `dtype` and back to f32 (the norms unchanged): the
/// values a `dtype` model computes with, as an F32 model.
pub fn round_trip(
    w: &HashMap<String, Tensor>,
    dtype: GgmlDType,
) -> Result<HashMap<String, Tensor>> {
    w.iter()
        .map(|(name, t)| {
            let t = match t.rank() {
                1 => t.clone(),
                _ => QTensor::quantize(t, dtype)?.dequantize(&Device::Cpu)?,
            };
            Ok((name.clone(), t))
        })
        .collect()
}

/// Reorders each head's rows from half-split to interleaved pairs (what llama.cpp's converter
/// does to q/k so that its interleaved rotary matches `rotate_half`).
pub fn permute_for_gguf(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    Ok(w.reshape((heads, 2, rows / heads / 2, cols))?
        .transpose(1, 2)?
        .reshape((rows, cols))?)
}

pub fn write_safetensors(dir: &Path, w: &HashMap<String, Tensor>) -> Result<()> {
    candle_core::safetensors::save(w, dir.join("model.safetensors"))?;
    let config = serde_json::json!({
        "model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": FF,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 256,
        "tie_word_embeddings": false, "rope_scaling": null, "eos_token_id": 2
    });
    std::fs::write(dir.join("config.json"), config.to_string())?;
    let vocab: HashMap<String, u32> = (0..VOCAB as u32).map(|i| (format!("t{i}"), i)).collect();
    let model = tokenizers::models::wordlevel::WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("t0".into())
        .build()
        .map_err(anyhow::Error::msg)?;
    tokenizers::Tokenizer::new(model)
        .save(dir.join("tokenizer.json"), false)
        .map_err(anyhow::Error::msg)?;
    Ok(())
}

pub fn write_gguf(path: &Path, w: &HashMap<String, Tensor>) -> Result<()> {
    write_gguf_as(path, w, GgmlDType::F32)
}

/// [`write_gguf`] with the matrices stored as `dtype` (the norms stay F32).
pub fn write_gguf_as(path: &Path, w: &HashMap<String, Tensor>, dtype: GgmlDType) -> Result<()> {
    use gguf_file::Value::{String as S, F32, U32};
    let md: Vec<(&str, gguf_file::Value)> = vec![
        ("general.architecture", S("llama".into())),
        ("llama.embedding_length", U32(HIDDEN as u32)),
        ("llama.feed_forward_length", U32(FF as u32)),
        ("llama.block_count", U32(LAYERS as u32)),
        ("llama.attention.head_count", U32(HEADS as u32)),
        ("llama.attention.head_count_kv", U32(KV_HEADS as u32)),
        ("llama.rope.dimension_count", U32(HEAD_DIM as u32)),
        ("llama.rope.freq_base", F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon", F32(1e-5)),
        ("llama.context_length", U32(256)),
        ("llama.vocab_size", U32(VOCAB as u32)),
    ];
    let get = |n: &str| w.get(n).ok_or_else(|| anyhow::anyhow!("missing {n}"));
    let q = |t: &Tensor| match t.rank() {
        1 => QTensor::quantize(t, GgmlDType::F32),
        _ => QTensor::quantize(t, dtype),
    };
    let mut ts: Vec<(String, QTensor)> = vec![
        (
            "token_embd.weight".into(),
            q(get("model.embed_tokens.weight")?)?,
        ),
        ("output.weight".into(), q(get("lm_head.weight")?)?),
        ("output_norm.weight".into(), q(get("model.norm.weight")?)?),
    ];
    for i in 0..LAYERS {
        let hf = |s: &str| get(&format!("model.layers.{i}.{s}.weight")).cloned();
        let g = |s: &str| format!("blk.{i}.{s}.weight");
        ts.push((g("attn_norm"), q(&hf("input_layernorm")?)?));
        ts.push((g("ffn_norm"), q(&hf("post_attention_layernorm")?)?));
        ts.push((
            g("attn_q"),
            q(&permute_for_gguf(&hf("self_attn.q_proj")?, HEADS)?)?,
        ));
        ts.push((
            g("attn_k"),
            q(&permute_for_gguf(&hf("self_attn.k_proj")?, KV_HEADS)?)?,
        ));
        ts.push((g("attn_v"), q(&hf("self_attn.v_proj")?)?));
        ts.push((g("attn_output"), q(&hf("self_attn.o_proj")?)?));
        ts.push((g("ffn_gate"), q(&hf("mlp.gate_proj")?)?));
        ts.push((g("ffn_up"), q(&hf("mlp.up_proj")?)?));
        ts.push((g("ffn_down"), q(&hf("mlp.down_proj")?)?));
    }
    let md: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = ts.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path)?;
    gguf_file::write(&mut f, &md, &ts)?;
    Ok(())
}

/// Greedy generation: the prompt as one prefill step, then `n - 1` decode steps; the logits
/// of the first step and the tokens.
pub fn greedy(model: &Llama, prompt: &[u32], n: usize) -> Result<(Vec<f32>, Vec<u32>)> {
    let (mut rows, tokens) = run_steps(model, prompt, n, None)?;
    Ok((rows.swap_remove(0), tokens))
}

/// The prompt as one prefill step, then `n - 1` decode steps, each feeding back the step's
/// argmax, or `forced[i]` after step `i` when given (teacher forcing); every step's logits
/// and argmax tokens.
pub fn run_steps(
    model: &Llama,
    prompt: &[u32],
    n: usize,
    forced: Option<&[u32]>,
) -> Result<(Vec<Vec<f32>>, Vec<u32>)> {
    let cfg = model.config();
    let mut kv = KvStore::new(KvStoreConfig {
        num_layers: cfg.num_layers,
        num_blocks: 8,
        block_size: 8,
        kv_dim: cfg.kv_dim(),
        dtype: orchard_worker::model::kv_store::KvCacheDType::default(),
    });
    let table: Vec<u32> = vec![5, 2, 7, 0, 3, 6, 1, 4];
    run_steps_in(model, &mut kv, &table, prompt, n, forced)
}

/// [`run_steps`] on a given KV store, the sequence's blocks listed in `table`.
pub fn run_steps_in(
    model: &Llama,
    kv: &mut KvStore,
    table: &[u32],
    prompt: &[u32],
    n: usize,
    forced: Option<&[u32]>,
) -> Result<(Vec<Vec<f32>>, Vec<u32>)> {
    let (mut feed, mut done, mut out, mut rows) = (prompt.to_vec(), 0usize, vec![], vec![]);
    while out.len() < n {
        let batch = one_sequence_step(kv, table, &feed, done)?;
        done += feed.len();
        let row = model.forward(&batch, kv)?.squeeze(0)?.to_vec1::<f32>()?;
        let next = (0..row.len()).fold(0, |b, i| if row[i] > row[b] { i } else { b }) as u32;
        feed = vec![forced
            .and_then(|f| f.get(out.len()).copied())
            .unwrap_or(next)];
        out.push(next);
        rows.push(row);
    }
    Ok((rows, out))
}

/// One step of one sequence: `feed` at positions `first..`, its slots looked up through the
/// sequence's block table `table`, logits for its last token.
pub fn one_sequence_step(
    kv: &KvStore,
    table: &[u32],
    feed: &[u32],
    first: usize,
) -> Result<StepBatch> {
    let positions: Vec<u32> = (first..first + feed.len()).map(|p| p as u32).collect();
    let slot_mapping = positions
        .iter()
        .map(|&p| kv.slot_of(table, p as usize).map(|s| s as u32))
        .collect::<Option<Vec<_>>>()
        .context("block table too short")?;
    Ok(StepBatch {
        token_ids: feed.to_vec(),
        positions,
        slot_mapping,
        seqs: vec![SeqSlice {
            query_start: 0,
            query_len: feed.len() as u32,
            context_len: (first + feed.len()) as u32,
            block_table: table.to_vec(),
            needs_logits: true,
        }],
    })
}
