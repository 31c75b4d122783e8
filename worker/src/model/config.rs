//! Hyper-parameters of a Llama-family decoder, read from GGUF metadata.

use candle_core::quantized::gguf_file;

use super::ModelError;

/// Shapes and constants the layers need.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rope_theta: f32,
    pub rms_norm_eps: f64,
    /// Longest context the model was trained for.
    pub max_position_embeddings: usize,
    /// NeoX-style (half-split) rotary pairs instead of Llama's interleaved pairs.
    pub rope_neox: bool,
}

impl LlamaConfig {
    /// Reads the `<arch>.*` keys of a GGUF file.
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Self, ModelError> {
        let arch = metadata_string(ct, "general.architecture")?;
        let get = |key: &str| -> Result<&gguf_file::Value, ModelError> {
            let full = format!("{arch}.{key}");
            ct.metadata
                .get(&full)
                .ok_or(ModelError::MissingMetadata(full))
        };
        let u = |key: &str| -> Result<usize, ModelError> { Ok(get(key)?.to_u32()? as usize) };
        let num_heads = u("attention.head_count")?;
        let hidden_size = u("embedding_length")?;
        let num_kv_heads = match get("attention.head_count_kv") {
            Ok(v) => v.to_u32()? as usize,
            Err(_) => num_heads,
        };
        let head_dim = match get("rope.dimension_count") {
            Ok(v) => v.to_u32()? as usize,
            Err(_) => hidden_size / num_heads.max(1),
        };
        let vocab_size = match get("vocab_size") {
            Ok(v) => v.to_u32()? as usize,
            Err(_) => match ct.metadata.get("tokenizer.ggml.tokens") {
                Some(v) => v.to_vec()?.len(),
                None => return Err(ModelError::MissingMetadata(format!("{arch}.vocab_size"))),
            },
        };
        let cfg = Self {
            hidden_size,
            intermediate_size: u("feed_forward_length")?,
            num_layers: u("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rope_theta: get("rope.freq_base")
                .and_then(|v| Ok(v.to_f32()?))
                .unwrap_or(10_000.0),
            rms_norm_eps: get("attention.layer_norm_rms_epsilon")
                .and_then(|v| Ok(v.to_f32()? as f64))
                .unwrap_or(1e-5),
            max_position_embeddings: u("context_length").unwrap_or(4096),
            rope_neox: matches!(arch.as_str(), "qwen2" | "qwen3"),
        };
        cfg.check()?;
        Ok(cfg)
    }

    /// Rejects shapes the layers cannot serve.
    pub fn check(&self) -> Result<(), ModelError> {
        let bad = |why: String| Err(ModelError::Unsupported(why));
        if self.num_heads == 0
            || self.num_kv_heads == 0
            || !self.num_heads.is_multiple_of(self.num_kv_heads)
        {
            return bad(format!(
                "{} attention heads are not a multiple of {} kv heads",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) || self.head_dim * self.num_heads != self.hidden_size {
            return bad(format!(
                "head_dim {} x {} heads does not match hidden size {}",
                self.head_dim, self.num_heads, self.hidden_size
            ));
        }
        Ok(())
    }

    /// Floats of K (or V) per token per layer.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

/// A string metadata value, or an error naming the key.
pub fn metadata_string(ct: &gguf_file::Content, key: &str) -> Result<String, ModelError> {
    match ct.metadata.get(key) {
        Some(v) => Ok(v.to_string()?.clone()),
        None => Err(ModelError::MissingMetadata(key.to_string())),
    }
}

/// The fields of a Hugging Face `config.json` a Llama-family decoder needs.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct HfConfig {
    #[serde(default)]
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f32,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Only `null` (no scaling) is supported.
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub attention_bias: bool,
    /// A single id or a list.
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

fn default_rope_theta() -> f32 {
    10_000.0
}
fn default_rms_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}

impl LlamaConfig {
    /// Reads a Hugging Face `config.json` of a Llama / Mistral model.
    ///
    /// Hugging Face checkpoints rotate half-split pairs (`rotate_half`), so `rope_neox` is set;
    /// GGUF converters permute the q/k rows instead and use interleaved pairs.
    pub fn from_hf(hf: &HfConfig) -> Result<Self, ModelError> {
        let arch = hf.model_type.as_deref().unwrap_or("llama");
        if !matches!(arch, "llama" | "mistral") {
            return Err(ModelError::Unsupported(format!("model_type {arch}")));
        }
        if hf.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) || hf.attention_bias {
            return Err(ModelError::Unsupported(
                "rope_scaling / attention_bias are not supported".into(),
            ));
        }
        let num_heads = hf.num_attention_heads;
        let cfg = Self {
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads,
            num_kv_heads: hf.num_key_value_heads.unwrap_or(num_heads),
            head_dim: hf.head_dim.unwrap_or(hf.hidden_size / num_heads.max(1)),
            vocab_size: hf.vocab_size,
            rope_theta: hf.rope_theta,
            rms_norm_eps: hf.rms_norm_eps,
            max_position_embeddings: hf.max_position_embeddings,
            rope_neox: true,
        };
        cfg.check()?;
        Ok(cfg)
    }
}
