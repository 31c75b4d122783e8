//! Loading a Llama-family model from a Hugging Face directory: `config.json`,
//! `tokenizer.json` and one or more `*.safetensors` files (f32, f16 or bf16), with the
//! checkpoint's own weight names (`model.layers.N.self_attn.q_proj.weight`, ...). Weights are
//! widened to f32 and go into the same [`Llama`] as GGUF models.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::config::HfConfig;
use super::linear::Linear;
use super::llama::{Block, Embedding, LlamaParts, Norm};
use super::{Llama, LlamaConfig, ModelError};

/// A model loaded from a safetensors directory.
pub struct SafetensorsModel {
    pub model: Llama,
    pub tokenizer: tokenizers::Tokenizer,
    /// End-of-sequence ids from `config.json` (empty when it names none).
    pub eos_token_ids: Vec<u32>,
}

/// Loads `dir/config.json`, `dir/tokenizer.json` and every `dir/*.safetensors`.
pub fn load_dir(dir: &Path, device: &Device) -> Result<SafetensorsModel, ModelError> {
    let io = |path: PathBuf| move |source| ModelError::Io { path, source };
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(io(config_path.clone()))?;
    let hf: HfConfig = serde_json::from_str(&text)
        .map_err(|e| ModelError::Unsupported(format!("{}: {e}", config_path.display())))?;
    let cfg = LlamaConfig::from_hf(&hf)?;
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    let mut tensors = HashMap::new();
    for file in safetensors_files(dir)? {
        tensors.extend(candle_core::safetensors::load(&file, device)?);
    }
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    let model = build(&cfg, hf.tie_word_embeddings, &vb, device)?;
    Ok(SafetensorsModel {
        model,
        tokenizer,
        eos_token_ids: eos_ids(hf.eos_token_id.as_ref()),
    })
}

/// The `*.safetensors` files of `dir`, sorted so shards load in order.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let io = |source| ModelError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            files.push(path);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(ModelError::MissingMetadata(format!(
            "{}/*.safetensors",
            dir.display()
        )));
    }
    Ok(files)
}

fn eos_ids(v: Option<&serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|n| vec![n as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|n| n as u32))
            .collect(),
        _ => Vec::new(),
    }
}

fn build(
    cfg: &LlamaConfig,
    tied: bool,
    vb: &VarBuilder,
    device: &Device,
) -> Result<Llama, ModelError> {
    let (h, kvd) = (cfg.hidden_size, cfg.kv_dim());
    let embed = vb.get((cfg.vocab_size, h), "model.embed_tokens.weight")?;
    let lm_head = match tied {
        true => embed.clone(),
        false => vb.get((cfg.vocab_size, h), "lm_head.weight")?,
    };
    let blocks = (0..cfg.num_layers)
        .map(|i| block(cfg, &vb.pp(format!("model.layers.{i}")), (h, kvd)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Llama::from_parts(LlamaParts {
        cfg: cfg.clone(),
        embed: Embedding::Dense(embed),
        blocks,
        norm: Norm::new(vb.get(h, "model.norm.weight")?)?,
        lm_head: Linear::from_dense(&[lm_head])?,
        device: device.clone(),
    }))
}

fn block(
    cfg: &LlamaConfig,
    vb: &VarBuilder,
    (h, kvd): (usize, usize),
) -> Result<Block, ModelError> {
    let ff = cfg.intermediate_size;
    let w = |rows: usize, cols: usize, name: &str| -> Result<Tensor, ModelError> {
        Ok(vb.get((rows, cols), &format!("{name}.weight"))?)
    };
    Ok(Block {
        attn_norm: Norm::new(vb.get(h, "input_layernorm.weight")?)?,
        qkv: Linear::from_dense(&[
            w(h, h, "self_attn.q_proj")?,
            w(kvd, h, "self_attn.k_proj")?,
            w(kvd, h, "self_attn.v_proj")?,
        ])?,
        wo: Linear::from_dense(&[w(h, h, "self_attn.o_proj")?])?,
        ffn_norm: Norm::new(vb.get(h, "post_attention_layernorm.weight")?)?,
        gate_up: Linear::from_dense(&[w(ff, h, "mlp.gate_proj")?, w(ff, h, "mlp.up_proj")?])?,
        down: Linear::from_dense(&[w(h, ff, "mlp.down_proj")?])?,
    })
}
